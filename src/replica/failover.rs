//! Failover's decisions (claims 003:7–9), apart from any socket so the simulation and the
//! command share them: what to move from the bunker to the target, at which epoch, and which
//! transactions of the moved records were incomplete at the crash.
//!
//! **The failover rule for incomplete transactions** (003:8, docs/OPERATIONS.md): the moved
//! records are applied at the target exactly as the primary's own replay would apply them
//! after a crash. A data write has no outcome record unless its `pwrite` failed (then an
//! abort follows), so a write record without an abort is applied. An op (create, rename,
//! chmod …) whose intent is in the log but whose commit or abort is not was cut off by the
//! crash: its client never got a reply, so either outcome is allowed; it is redone, and if
//! the redo cannot be done (the tree does not allow it) it is skipped. Either way the
//! target's tree is the primary's journal applied up to the end, in order.

use std::collections::BTreeMap;

use crate::format::ops::Op;
use crate::format::record::{self, HEADER_SIZE, Kind};
use crate::types::Lsn;

/// Where a node's log stands, as its `LogInfo` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogView {
    pub epoch: u64,
    pub start_lsn: u64,
    pub next_lsn: u64,
    /// The next record it would apply (a bunker applies nothing: `next_lsn`).
    pub applied_next: u64,
    pub primary_connected: bool,
    pub promoted: bool,
    /// A target's `MixedUntil`: its directory shows a mix of states until its log holds
    /// every record below this (a resync's read end); 0 when it shows one state.
    pub mixed_until: u64,
}

/// Refusals an operator may override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Overrides {
    /// `--force`: the bunker or the target still hears a primary; it is fenced anyway.
    pub live_primary: bool,
    /// `--allow-mixed`: promote a target whose directory a resync left mixed past the end
    /// the bunker can bring it to.
    pub mixed: bool,
}

/// What a failover will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The target was promoted by an earlier run and holds everything the bunker has.
    AlreadyDone { epoch: u64, end_lsn: u64 },
    /// Fence both at `epoch`, move the bunker's records `[from, bunker_next)` to the target
    /// (none when the target is ahead), promote it at `epoch` with everything below `end`.
    Move { from: u64, bunker_next: u64, end: u64, epoch: u64 },
}

/// Decides the failover, or says why it must not happen.
pub fn plan(bunker: LogView, target: LogView, allow: Overrides) -> Result<Plan, String> {
    if target.promoted && target.epoch >= bunker.epoch && target.next_lsn >= bunker.next_lsn {
        return Ok(Plan::AlreadyDone { epoch: target.epoch, end_lsn: target.next_lsn });
    }
    if !allow.live_primary && (bunker.primary_connected || target.primary_connected) {
        let who = if bunker.primary_connected { "the bunker" } else { "the target" };
        return Err(format!(
            "{who} is still connected to a live primary: failing over now would fork the data (two primaries). \
             Stop the primary (or make sure it is dead) and run again; --force fences it anyway"
        ));
    }
    if target.promoted {
        return Err(format!(
            "the target was already promoted (epoch {}) but holds records only below LSN {}, while the bunker \
             holds records up to {}: it is a primary now; fail it back instead (docs/OPERATIONS.md)",
            target.epoch,
            target.next_lsn,
            bunker.next_lsn.saturating_sub(1)
        ));
    }
    let from = target.next_lsn;
    if from < bunker.next_lsn && from < bunker.start_lsn {
        return Err(format!(
            "the target lacks records from LSN {from} on, but the bunker holds only records from {} on: the \
             records between were freed (the bunker was restarted past them, or the target fell back to a \
             resync). A zero-loss failover from this bunker is not possible; nothing was changed",
            bunker.start_lsn
        ));
    }
    let epoch = bunker.epoch.max(target.epoch) + 1;
    let end = bunker.next_lsn.max(target.next_lsn);
    if target.mixed_until > end && !allow.mixed {
        return Err(format!(
            "the target was being resynchronized when the primary was lost: its directory shows a mix of the \
             primary's states until its log holds every record below LSN {}, and the bunker holds records only \
             below {end}. Promoting it would expose a directory the primary never had. Nothing was changed. Bring \
             the old primary back and let the resync finish if you can; --allow-mixed promotes it anyway (files \
             changed at or after LSN {end} may then hold newer or partly newer contents)",
            target.mixed_until
        ));
    }
    Ok(Plan::Move { from, bunker_next: bunker.next_lsn, end, epoch })
}

/// An op transaction among the moved records whose outcome is not among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incomplete {
    pub lsn: Lsn,
    pub what: String,
}

/// Finds the incomplete op transactions in records seen in order (feed every block).
#[derive(Default)]
pub struct IncompleteScan {
    open: BTreeMap<u64, Incomplete>,
    /// Every transaction with an `Abort` record among those seen.
    pub aborted: Vec<u64>,
    pub records: u64,
    pub bytes: u64,
}

impl IncompleteScan {
    pub fn feed(&mut self, body: &[u8]) {
        self.bytes += body.len() as u64;
        let mut at = 0;
        while at + HEADER_SIZE <= body.len() {
            let Ok(h) = record::decode_header(&body[at..], body.len() - at) else { return };
            self.records += 1;
            let payload = &body[at + HEADER_SIZE..(at + HEADER_SIZE + h.payload_len as usize).min(body.len())];
            match h.kind {
                Kind::Op => {
                    let what = Op::decode(payload).map(|op| op.describe()).unwrap_or_else(|_| "an op".into());
                    self.open.insert(h.txid.0, Incomplete { lsn: h.lsn, what });
                }
                Kind::Commit => {
                    self.open.remove(&h.txid.0);
                }
                Kind::Abort => {
                    self.open.remove(&h.txid.0);
                    self.aborted.push(h.txid.0);
                }
                _ => {}
            }
            at += record::record_len(h.payload_len as usize);
        }
    }

    /// The op transactions still without an outcome, oldest first.
    pub fn incomplete(&self) -> Vec<Incomplete> {
        let mut v: Vec<Incomplete> = self.open.values().cloned().collect();
        v.sort_by_key(|i| i.lsn);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Overrides = Overrides { live_primary: false, mixed: false };
    const FORCE: Overrides = Overrides { live_primary: true, mixed: false };

    fn view(epoch: u64, start: u64, next: u64) -> LogView {
        LogView { epoch, start_lsn: start, next_lsn: next, ..Default::default() }
    }

    #[test]
    fn moves_what_the_target_lacks_at_a_higher_epoch() {
        let p = plan(view(0, 100, 500), view(0, 1, 300), NONE).unwrap();
        assert_eq!(p, Plan::Move { from: 300, bunker_next: 500, end: 500, epoch: 1 });
    }

    #[test]
    fn a_target_ahead_of_the_bunker_keeps_its_end() {
        let p = plan(view(0, 100, 500), view(0, 1, 700), NONE).unwrap();
        assert_eq!(p, Plan::Move { from: 700, bunker_next: 500, end: 700, epoch: 1 });
    }

    #[test]
    fn refuses_a_gap_and_a_live_primary() {
        let gap = plan(view(0, 400, 500), view(0, 1, 300), NONE).unwrap_err();
        assert!(gap.contains("not possible"), "{gap}");
        let live = plan(LogView { primary_connected: true, ..view(0, 1, 500) }, view(0, 1, 300), NONE).unwrap_err();
        assert!(live.contains("--force"), "{live}");
        assert!(plan(LogView { primary_connected: true, ..view(0, 1, 500) }, view(0, 1, 300), FORCE).is_ok());
    }

    #[test]
    fn a_second_run_is_harmless() {
        // After a complete run: bunker fenced at 1, target promoted at 1 holding everything.
        let done = plan(view(1, 1, 500), LogView { promoted: true, ..view(1, 1, 500) }, NONE).unwrap();
        assert_eq!(done, Plan::AlreadyDone { epoch: 1, end_lsn: 500 });
        // After a run cut off between the fences and the promotion: it goes on, epoch higher.
        let again = plan(view(1, 1, 500), view(1, 1, 420), NONE).unwrap();
        assert_eq!(again, Plan::Move { from: 420, bunker_next: 500, end: 500, epoch: 2 });
    }

    #[test]
    fn refuses_to_promote_a_mix_unless_allowed() {
        // The resync's read ended at 520; the bunker can bring the target only below 500.
        let mixed = LogView { mixed_until: 520, ..view(0, 1, 300) };
        let why = plan(view(0, 100, 500), mixed, NONE).unwrap_err();
        assert!(why.contains("LSN 520") && why.contains("--allow-mixed"), "{why}");
        let allowed = Overrides { mixed: true, ..NONE };
        assert_eq!(
            plan(view(0, 100, 500), mixed, allowed).unwrap(),
            Plan::Move { from: 300, bunker_next: 500, end: 500, epoch: 1 }
        );
        // A bunker holding the records up to the read end: nothing mixed is promoted.
        assert!(plan(view(0, 100, 520), mixed, NONE).is_ok());
        assert!(plan(view(0, 100, 519), mixed, NONE).is_err());
    }
}
