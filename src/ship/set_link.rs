//! A set-mode target's link at the primary (issue 7, docs/CONSISTENCY.md): its set in flight
//! ([`SetState`]), the wait of a mutation for the sender when the images set aside reach their
//! bound, and the holds measured at each swap.
//!
//! Lock order: the core's gate, then its namespace or file lock, then this link's state. A
//! before-change hook runs under the op's locks, so it reads directory entries without taking
//! the namespace again ([`InOp`]); the sender takes the namespace (through
//! `Source::namespace_quiet`) before this link's state, never after.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::sets::{Item, Marked, Preserve, SetState};
use super::source::Source;
use crate::proto::wire::control::NodeDesc;
use crate::syncmap::{PlanId, ResyncPlan};
use crate::types::FileId;

/// How many swaps' holds are kept for the status percentiles.
const HOLDS_KEPT: usize = 1024;
/// A mutation waiting for the sender says so in the log after this long.
const WAIT_WARN: Duration = Duration::from_secs(5);

pub struct SetLink {
    /// `consistency-interval`: how often a swap is tried.
    pub interval: Duration,
    state: Mutex<Inner>,
    /// Notified whenever the sender took an item (a waiting mutation may go on).
    sent: Condvar,
    holds: Mutex<VecDeque<Duration>>,
}

struct Inner {
    set: SetState,
    /// The sync map's plan behind the set in flight.
    plan: Option<PlanId>,
}

/// A source as a before-change hook sees it: the op holds the namespace, so directory entries
/// are read without taking it again.
pub struct InOp<'a>(pub &'a dyn Source);

impl Source for InOp<'_> {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        self.0.describe(id)
    }
    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.0.entries_in_op(dir)
    }
    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(id, offset, buf)
    }
}

impl SetLink {
    pub fn new(interval: Duration, aside_max: usize) -> SetLink {
        SetLink {
            interval,
            state: Mutex::new(Inner { set: SetState::new(aside_max), plan: None }),
            sent: Condvar::new(),
            holds: Mutex::new(VecDeque::new()),
        }
    }

    /// At the swap, under the core's gate: the plan's locations become the set in flight.
    /// False (and the plan is left to the next swap) while another set is being sent.
    pub fn begin(&self, plan: &ResyncPlan) -> bool {
        let mut st = self.state.lock().unwrap();
        if !st.set.begin(plan.id.0, Marked::from_plan(plan)) {
            return false;
        }
        st.plan = Some(plan.id);
        true
    }

    /// Whether a set is in flight.
    pub fn sending(&self) -> bool {
        self.state.lock().unwrap().set.sending_id().is_some()
    }

    /// A before-change hook: runs `step` (a `SetState::preserve_*`) until it is done, waiting
    /// for the sender when the images set aside reached their bound. A failure to read an
    /// image abandons the set (its locations stay marked; the next set carries them): a
    /// mutation never fails for a target.
    pub fn preserve(&self, src: &dyn Source, step: impl Fn(&mut SetState, &dyn Source) -> io::Result<Preserve>) {
        let src = InOp(src);
        let mut st = self.state.lock().unwrap();
        loop {
            match step(&mut st.set, &src) {
                Ok(Preserve::Done) => return,
                Ok(Preserve::SendFirst { file, block }) => {
                    let mut waited = Duration::ZERO;
                    while st.set.is_pending(file, block) {
                        let (g, t) = self.sent.wait_timeout(st, Duration::from_millis(100)).unwrap();
                        st = g;
                        if t.timed_out() {
                            waited += Duration::from_millis(100);
                            if waited == WAIT_WARN {
                                tracing::warn!(
                                    "a write waits {waited:?} for a set-mode target's sender (block {block} of file {file}): the images kept aside reached their bound"
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "a consistent set could not keep an image ({e}): the set is abandoned and sent again"
                    );
                    st.set.abandon();
                    st.plan = None;
                    self.sent.notify_all();
                    return;
                }
            }
        }
    }

    /// The sender's next item (see `SetState::next_item`), `waited` first when given.
    pub fn next_item(&self, src: &dyn Source, waited: Option<(FileId, u64)>) -> io::Result<Option<Item>> {
        let mut st = self.state.lock().unwrap();
        let r = st.set.next_item(src, waited);
        self.sent.notify_all();
        r
    }

    /// The target committed the set: returns the plan to clear in the sync map.
    pub fn finish(&self) -> Option<PlanId> {
        let mut st = self.state.lock().unwrap();
        st.set.finish();
        self.sent.notify_all();
        st.plan.take()
    }

    /// The set in flight is dropped (connection lost): its locations stay marked.
    pub fn abandon(&self) {
        let mut st = self.state.lock().unwrap();
        st.set.abandon();
        st.plan = None;
        self.sent.notify_all();
    }

    /// Records a swap's hold (`Core::swap`).
    pub fn record_hold(&self, held: Duration) {
        let mut h = self.holds.lock().unwrap();
        if h.len() == HOLDS_KEPT {
            h.pop_front();
        }
        h.push_back(held);
    }

    /// The `p`-th percentile (0–100, nearest rank) of the holds kept, if any.
    pub fn hold_percentile(&self, p: u32) -> Option<Duration> {
        let mut v: Vec<Duration> = self.holds.lock().unwrap().iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let rank = (v.len() * p.min(100) as usize).div_ceil(100).max(1);
        Some(v[rank - 1])
    }

    /// Bytes of images kept aside now.
    pub fn bytes_aside(&self) -> usize {
        self.state.lock().unwrap().set.bytes_aside()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_percentiles_come_from_the_last_holds() {
        let l = SetLink::new(Duration::from_secs(5), 1 << 20);
        assert_eq!(l.hold_percentile(99), None);
        for ms in 1..=100 {
            l.record_hold(Duration::from_millis(ms));
        }
        assert_eq!(l.hold_percentile(50), Some(Duration::from_millis(50)));
        assert_eq!(l.hold_percentile(99), Some(Duration::from_millis(99)));
        assert_eq!(l.hold_percentile(100), Some(Duration::from_millis(100)));
        for _ in 0..HOLDS_KEPT {
            l.record_hold(Duration::from_micros(10));
        }
        assert_eq!(l.hold_percentile(100), Some(Duration::from_micros(10)), "only the last holds count");
    }
}
