//! What the primary did (`Model`), kept outside the code under test, and the checks against it
//! after the promotion: invariants 1 and 2 (`check_sync_acked`, `check_tree`), the judging of a
//! refusal and of a target catch-up left behind, and the tree listings compared, with the
//! diagnostics of a wrong tree.

use std::sync::atomic::Ordering;

use super::Primary;
use super::runs::CatchUp;
use super::world::{Sim, World};
use crate::journal::LogCursor;
use crate::proto::wire::split_records;
use crate::replica::catchup::{Action, BlocksWhy};
use crate::sim::listing::{Listing, listing_diff, visible};
use crate::syncmap::Mode as MapMode;

/// What the primary did, kept outside the code under test.
pub(super) struct Model {
    /// Every record the primary appended, as its journal holds them, from LSN 1 on.
    pub(super) records: Vec<u8>,
    /// Where record `i + 1` begins in `records`.
    pub(super) offsets: Vec<usize>,
    pub(super) cursor: LogCursor,
    /// (the primary's next LSN, its tree) at the start and after each operation.
    pub(super) states: Vec<(u64, Listing)>,
    /// The LSN below which each fsync acknowledged in sync mode held every record.
    pub(super) sync_acked: Vec<u64>,
}

impl Model {
    /// For each path where `have` differs from `want`: the primary states whose version of
    /// it `have` matches, and how each version of it on the primary differs from `have`
    /// (lengths and first/last differing byte): where a wrong tree's content came from.
    fn history_of_differences(&self, want: &Listing, have: &Listing) -> String {
        let mut out = String::new();
        for (path, v) in have.iter().filter(|(p, v)| want.get(*p) != Some(*v)) {
            let same: Vec<u64> = self.states.iter().filter(|(_, l)| l.get(path) == Some(v)).map(|(l, _)| *l).collect();
            out += &format!(
                "\n  {path}: the target's version is the primary's below LSNs {same:?}; the primary's versions:"
            );
            let mut prev: Option<&Vec<u8>> = None;
            for (lsn, l) in &self.states {
                let Some((_, bytes)) = l.get(path) else { continue };
                if prev == Some(bytes) {
                    continue;
                }
                prev = Some(bytes);
                let first = bytes.iter().zip(&v.1).position(|(x, y)| x != y);
                let last = bytes.iter().zip(&v.1).rposition(|(x, y)| x != y);
                out += &format!(
                    "\n    below LSN {lsn}: {} bytes, differs from the target's at bytes {first:?}..={last:?}",
                    bytes.len()
                );
            }
        }
        out
    }

    /// Reads the records appended since the last call (before a checkpoint could let them go).
    pub(super) fn note_records(&mut self, primary: &Primary) -> Result<(), String> {
        let next = primary.journal.next_lsn();
        if self.cursor.next >= next {
            return Ok(());
        }
        let start = self.records.len();
        primary
            .journal
            .read_records(&mut self.cursor, next, usize::MAX, &mut self.records)
            .map_err(|e| format!("the model lost the primary's records: {e}"))?;
        let mut at = start;
        for r in split_records(&self.records[start..]) {
            let r = r.map_err(|e| format!("the primary's own records do not split: {e}"))?;
            self.offsets.push(at);
            at += r.len();
        }
        Ok(())
    }

    fn offset(&self, lsn: u64) -> Option<usize> {
        let i = lsn.checked_sub(1)? as usize;
        match i.cmp(&self.offsets.len()) {
            std::cmp::Ordering::Less => Some(self.offsets[i]),
            std::cmp::Ordering::Equal => Some(self.records.len()),
            std::cmp::Ordering::Greater => None,
        }
    }

    /// Invariant 3: a moved block (of `what`) holds exactly the primary's records `[from, next)`.
    pub(super) fn check_block(&self, what: &str, from: u64, next: u64, block: &[u8]) -> Result<(), String> {
        let (Some(a), Some(b)) = (self.offset(from), self.offset(next)) else {
            return Err(format!("{what}: records {from}..{next} served, past the primary's end"));
        };
        if &self.records[a..b] != block {
            return Err(format!("{what}: records {from}..{next} differ from the primary's"));
        }
        Ok(())
    }

    /// The trees the target may hold once it applied every record below `end`: the primary's
    /// after the last operation whose records all lie below it, and, when `end` cuts an
    /// operation's records, also the one after that operation (the failover rule redoes it).
    fn expected(&self, end: u64) -> Result<(Vec<&Listing>, bool), String> {
        let upto = self.states.iter().rposition(|(n, _)| *n <= end).expect("the first state is at LSN 1");
        if self.states[upto].0 == end {
            return Ok((vec![&self.states[upto].1], false));
        }
        match self.states.get(upto + 1) {
            Some((_, after)) => Ok((vec![&self.states[upto].1, after], true)),
            None => Err(format!(
                "the promoted end LSN {end} is past every record the primary wrote (its next LSN was {})",
                self.states[upto].0
            )),
        }
    }
}

impl Sim {
    /// Invariant 1: every fsync acknowledged in sync mode is below the promoted `end`.
    pub(super) fn check_sync_acked(&self, w: &World, end: u64) -> Result<(), String> {
        if let Some(&lost) = w.model.sync_acked.iter().filter(|&&b| b > end).max() {
            return Err(format!(
                "an fsync acknowledged in sync mode covered records below LSN {lost}, but the promoted target holds \
                 records only below {end}"
            ));
        }
        Ok(())
    }

    /// Invariant 2 for target `i`, which holds and applied every record below `end`; returns
    /// whether `end` cut an operation's records.
    pub(super) fn check_tree(&self, w: &World, i: usize, end: u64) -> Result<bool, String> {
        let who = if w.targets.len() == 1 { "the promoted target".to_string() } else { format!("target {i}") };
        let applied = w.targets[i].core.as_ref().map(|t| t.position().applied_next);
        if applied != Some(end) {
            return Err(format!("{who} applied below {applied:?}, not below its end {end}"));
        }
        let have = visible(w.targets[i].tree.listing());
        let (want, cut) = w.model.expected(end)?;
        if !want.iter().any(|l| **l == have) {
            let last = want.last().expect("at least one");
            let other = match w.model.states.iter().position(|(_, l)| *l == have) {
                Some(i) => format!("it is the primary's tree with the records below LSN {}", w.model.states[i].0),
                None => "it is the primary's tree at no point".to_string(),
            };
            return Err(format!(
                "the tree of {who} is not the primary's journal applied below LSN {end} ({other}): {}{}",
                listing_diff(last, &have),
                w.model.history_of_differences(last, &have)
            ));
        }
        Ok(cut)
    }

    /// A gap passes only when a journal overflow explains it (module docs); `i` is the target
    /// the plan was made for.
    pub(super) fn judge_refusal(
        &self,
        w: &mut World,
        i: usize,
        why: &str,
        overflow: Option<String>,
    ) -> Result<(), String> {
        if why.contains("--allow-mixed") {
            // The primary ends a resync only once the bunker holds the records up to its read
            // end, unless the link is degraded (async): only then may the bunker lack them.
            if w.link_degraded {
                w.stats.refused_mixed += 1;
                return Ok(());
            }
            return Err(format!(
                "the failover was refused for a resync's mixed directory though the bunker link was in sync mode: \
                 {why}"
            ));
        }
        if !why.contains("not possible") {
            return Err(format!("the failover was refused: {why}"));
        }
        if overflow.is_some() {
            w.stats.refused_overflow += 1;
            return Ok(());
        }
        if self.target_released[i].load(Ordering::Acquire) {
            w.stats.refused_target_overflow += 1;
            return Ok(());
        }
        let target_next = w.targets[i].core.as_ref().map_or(0, |t| t.position().next_lsn);
        // A target that owes a resync (its initial copy, say) holds no state a failover could
        // complete until the resync lands and its log continues at the resync's LSN.
        let owes = match w.target_modes[i] {
            Some(MapMode::FallenBack) => true,
            Some(MapMode::Resyncing { resume_from, .. }) => target_next < resume_from.0,
            _ => false,
        };
        if owes {
            w.stats.refused_resync_owed += 1;
            return Ok(());
        }
        let own = self.own_floor_max.load(Ordering::Acquire);
        let hint = if own > target_next {
            format!(
                "; the bunker's watermark followed its own acks up to LSN {own} while the target was in no ordered \
                 mode (resyncing), past the target's next LSN"
            )
        } else {
            String::new()
        };
        Err(format!(
            "the failover was refused for a gap though neither the bunker's link nor target {i}'s recorded a journal \
             overflow{hint}: {why}"
        ))
    }

    /// A target catch-up left behind passes only when explained (module docs).
    pub(super) fn judge_blocks(&self, w: &mut World, i: usize, action: Action, c: &CatchUp) -> Result<(), String> {
        w.stats.needs_blocks += 1;
        let Action::Blocks { from, why } = action else {
            return Err(format!("target {i} is behind with {action:?}"));
        };
        match why {
            BlocksWhy::MixedUntil(m) => {
                // As for one target's `--allow-mixed` refusal: only a degraded link lets a
                // resync end before the bunker holds the records up to its read end.
                if w.link_degraded {
                    w.stats.blocks_mixed += 1;
                    return Ok(());
                }
                Err(format!(
                    "catch-up left target {i} behind: a resync left its directory mixed until LSN {m}, past the end, \
                     though the bunker link was in sync mode"
                ))
            }
            BlocksWhy::LogStartsAt(start) => {
                if from >= c.bunker_start && c.bunker_next >= start {
                    w.stats.blocks_bunker_held += 1;
                }
                let (t, src) = (&w.targets[i], &w.targets[c.source]);
                if t.unheld_below > from {
                    w.stats.blocks_unheld += 1;
                } else if src.restarted_at > from {
                    w.stats.blocks_source_resynced += 1;
                } else if src.overflows() > 0 {
                    w.stats.blocks_log_freed += 1;
                } else {
                    return Err(format!(
                        "catch-up left target {i} behind: it lacks records from LSN {from} on, and the log of target \
                         {} (the most advanced) starts at {start} (it started at {} when catch-up looked), though \
                         no watermark past {from} was sent while target {i} did not hold it back (the highest: {}), \
                         no resync restarted that log past it (the last at {}) and that log never let go; target \
                         {i}'s sync map at the crash: {:?}, target {}'s hold now: {:?}",
                        c.source,
                        c.source_start,
                        t.unheld_below.saturating_sub(1),
                        src.restarted_at,
                        w.target_modes[i],
                        c.source,
                        src.core.as_ref().map(|c| c.watermark_hold()),
                    ));
                }
                Ok(())
            }
        }
    }
}
