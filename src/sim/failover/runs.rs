//! The failover as the commands run it against the nodes in this process: with one target
//! (`cmd::failover`), with several (`cmd::failover_several` and `cmd::catchup`), the records
//! moved and relayed in blocks (invariant 3); and what follows the primary's crash
//! (`Sim::failover`): the nodes restart, a run may be cut off and run again, and a second run
//! must find nothing to do (invariant 4).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use super::model::Model;
use super::world::{Sim, World};
use super::{Bunker, Listing, Target};
use crate::proto::wire::Frame;
use crate::proto::wire::control::ControlMsg;
use crate::replica::catchup::{self, Action, Peer};
use crate::replica::failover::{IncompleteScan, LogView, Overrides, Plan, plan};
use crate::replica::target::FrameHandler;
use crate::sim::listing::{listing_diff, visible};
use crate::types::Lsn;

/// Where a node's log stands, as the command reads its `LogInfo`.
fn log_view(msg: ControlMsg) -> Result<LogView, String> {
    match msg {
        ControlMsg::LogInfo { epoch, start_lsn, next_lsn, applied_next, primary_connected, promoted, .. } => {
            Ok(LogView { epoch, start_lsn, next_lsn, applied_next, primary_connected, promoted, mixed_until: 0 })
        }
        other => Err(format!("{other:?} instead of a LogInfo")),
    }
}

/// A target as `ferryfs failover` and `ferryfs catchup` see it: its `LogInfo` and how long its
/// directory stays mixed.
fn target_view(target: &Target) -> Result<LogView, String> {
    Ok(LogView { mixed_until: target.mixed_until(), ..log_view(target.log_info(false))? })
}

#[derive(Debug)]
enum Outcome {
    Refused(String),
    AlreadyDone {
        epoch: u64,
        end_lsn: u64,
    },
    /// Cut off after the fences (and some blocks).
    Interrupted,
    Promoted {
        epoch: u64,
        end: u64,
        moved: u64,
        incomplete: u64,
    },
}

/// Reads the block of records from an LSN on into a buffer; returns where it ended.
type ReadBlock<'a> = dyn Fn(Lsn, &mut Vec<u8>) -> Result<Lsn, String> + 'a;

/// Moves the records `[from, next)` that `read` serves in blocks to `to` (a target's
/// `receive_failover_block`), checking each against the primary's (invariant 3) and
/// counting it in `blocks`; `Ok(None)` when `cut_after` blocks were moved (a killed tool),
/// else what moved and the last LSN the receiver acked.
fn move_blocks(
    what: &str,
    read: &ReadBlock<'_>,
    to: &Target,
    from: u64,
    model: &Model,
    blocks: &mut u64,
    cut_after: Option<u64>,
) -> Result<Option<(IncompleteScan, Option<Lsn>)>, String> {
    let (mut at, mut acked, mut scan) = (Lsn(from), None, IncompleteScan::default());
    let mut block = Vec::new();
    // As `cmd::failover::move_records`: a read ahead for the aborts, told to the target first.
    let mut ahead = IncompleteScan::default();
    let mut end = at;
    loop {
        block.clear();
        let next = read(end, &mut block)?;
        if next == end {
            break;
        }
        ahead.feed(&block);
        end = next;
    }
    to.known_outcomes(end, &ahead.aborted, true);
    loop {
        block.clear();
        let next = read(at, &mut block)?;
        if next == at {
            break;
        }
        model.check_block(what, at.0, next.0, &block)?;
        scan.feed(&block);
        acked =
            Some(to.receive_failover_block(&block).map_err(|e| format!("a target refused a block of {what}: {e}"))?);
        at = next;
        *blocks += 1;
        if cut_after == Some(*blocks) {
            return Ok(None);
        }
    }
    Ok(Some((scan, acked)))
}

/// `ferryfs catchup`'s block-level resync of target `to` from target `from` (applied below
/// `end`), its frames handed over as the tool relays them; a frame of data counts as a block
/// for `cut_after` (false: cut off there, as a killed tool).
fn block_resync(
    from: &Target,
    to: &Target,
    end: u64,
    blocks: &mut u64,
    cut_after: Option<u64>,
) -> Result<bool, String> {
    let mut theirs = crate::replica::blocks::PeerDigests::default();
    to.send_digests(&mut |f| match f {
        Frame::Control(m) => theirs.take(m).map(drop),
        other => Err(format!("a {:?} frame among digests", other.kind())),
    })
    .map_err(|e| format!("the digests of the target behind: {e}"))?;
    let mut handler = FrameHandler::new();
    let plan = 0xb10c + *blocks;
    let r = from.send_block_resync(&theirs, plan, Lsn(end), &mut |f| {
        if matches!(f, Frame::Data { .. }) {
            *blocks += 1;
            if cut_after == Some(*blocks) {
                return Err("cut".into());
            }
        }
        handler.handle(to, f).map(drop)
    });
    match r {
        Ok(_) => Ok(true),
        Err(_) if cut_after == Some(*blocks) => Ok(false),
        Err(e) => Err(format!("a block-level resync: {e}")),
    }
}

/// One run of `ferryfs failover` against a bunker and a target in this process, in the
/// command's order; `cut_after` blocks (0: right after the fences) it stops, as a killed tool.
fn run_failover(
    bunker: &Bunker,
    target: &Target,
    model: &Model,
    block_bytes: usize,
    cut_after: Option<u64>,
) -> Result<Outcome, String> {
    if bunker.set_id() != target.set_id() {
        return Err("the bunker and the target belong to different replication sets".into());
    }
    let b = log_view(bunker.log_info(false))?;
    let t = target_view(target)?;
    if std::env::var_os("FERRYFS_SIM_DEBUG").is_some() {
        eprintln!("DEBUG failover: bunker {b:?} target {t:?} target pos {:?}", target.position());
    }
    let (from, bunker_next, end, epoch) = match plan(b, t, Overrides::default()) {
        Err(why) => return Ok(Outcome::Refused(why)),
        Ok(Plan::AlreadyDone { epoch, end_lsn }) => return Ok(Outcome::AlreadyDone { epoch, end_lsn }),
        Ok(Plan::Move { from, bunker_next, end, epoch }) => (from, bunker_next, end, epoch),
    };
    bunker.fence(epoch).map_err(|e| format!("fencing the bunker: {e}"))?;
    target.fence(epoch).map_err(|e| format!("fencing the target: {e}"))?;
    if bunker.epoch() < epoch || target.epoch() < epoch {
        return Err(format!(
            "a fence at epoch {epoch} did not take: bunker {}, target {}",
            bunker.epoch(),
            target.epoch()
        ));
    }
    if cut_after == Some(0) {
        return Ok(Outcome::Interrupted);
    }
    let to_move = bunker_next.saturating_sub(from);
    if to_move > 0 && bunker.log().start_lsn.0 > from {
        return Err(format!("the bunker no longer holds record {from} after the fence"));
    }
    let mut scan = IncompleteScan::default();
    if to_move > 0 {
        let read = |at: Lsn, out: &mut Vec<u8>| {
            bunker.read(at, block_bytes, out).map_err(|e| format!("reading the bunker: {e}"))
        };
        let Some((moved, acked)) = move_blocks("the bunker's records", &read, target, from, model, &mut 0, cut_after)?
        else {
            return Ok(Outcome::Interrupted);
        };
        if from + moved.records != bunker_next || acked != Some(Lsn(bunker_next - 1)) {
            return Err(format!(
                "the bunker's records ended at {} (said {bunker_next}); the target acked {acked:?}",
                from + moved.records
            ));
        }
        scan = moved;
    }
    target.promote(epoch, Lsn(end), (0, 0, b"sim".to_vec())).map_err(|e| format!("promoting the target: {e}"))?;
    let v = log_view(target.log_info(false))?;
    if !v.promoted || v.epoch < epoch || v.next_lsn != end {
        return Err(format!("the target did not confirm its promotion at epoch {epoch}, end {end}: {v:?}"));
    }
    Ok(Outcome::Promoted { epoch, end, moved: scan.records, incomplete: scan.incomplete().len() as u64 })
}

/// What the catch-up of a failover with several targets did.
#[derive(Debug, Default)]
pub(super) struct CatchUp {
    /// The most advanced target, whose log the others were leveled from, and where its log
    /// started.
    pub(super) source: usize,
    pub(super) source_start: u64,
    /// The bunker's records (as the failover saw them): `[bunker_start, bunker_next)`.
    pub(super) bunker_start: u64,
    pub(super) bunker_next: u64,
    /// The targets that hold and have applied every record below the end, in order.
    leveled: Vec<usize>,
    /// The targets left behind (`Action::Blocks`), with catch-up's word on each: those the
    /// source could not resync (it is mixed past its end itself) …
    behind: Vec<(usize, Action)>,
    /// … and those it did, by a block-level resync; they hold and show the same as the leveled.
    resynced: Vec<(usize, Action)>,
    /// Targets that got records from the source's log, and how many records in all.
    caught_up: u64,
    records: u64,
}

#[derive(Debug)]
enum SeveralOutcome {
    /// `plan` refused for the most advanced target, `advanced`.
    Refused {
        advanced: usize,
        why: String,
    },
    AlreadyDone {
        epoch: u64,
        end_lsn: u64,
    },
    /// Cut off after the fences (and some blocks, moved or relayed).
    Interrupted,
    /// Every target fenced and the others leveled, but the one named to be promoted needs
    /// blocks: the command promotes none and says to name another.
    PromoteBehind {
        catch_up: CatchUp,
    },
    Promoted {
        epoch: u64,
        end: u64,
        moved: u64,
        incomplete: u64,
        catch_up: CatchUp,
    },
}

/// One run of `ferryfs failover --target … --promote <targets[promote]>` against a bunker and
/// several targets in this process, in the order of `cmd::failover_several` and its
/// `cmd::catchup::catch_up`; `cut_after` blocks (0: right after the fences; the bunker's and
/// the relayed ones count) it stops, as a killed tool.
fn run_failover_several(
    bunker: &Bunker,
    targets: &[Arc<Target>],
    promote: usize,
    model: &Model,
    block_bytes: usize,
    cut_after: Option<u64>,
) -> Result<SeveralOutcome, String> {
    let p = promote;
    if let Some(i) = targets.iter().position(|t| t.set_id() != bunker.set_id()) {
        return Err(format!("the bunker and target {i} belong to different replication sets"));
    }
    let b = log_view(bunker.log_info(false))?;
    let views = targets.iter().map(|t| target_view(t)).collect::<Result<Vec<_>, _>>()?;
    if std::env::var_os("FERRYFS_SIM_DEBUG").is_some() {
        eprintln!("DEBUG failover (--promote target {p}): bunker {b:?}");
        for (i, v) in views.iter().enumerate() {
            eprintln!("DEBUG   target {i}: {v:?}, hold {:?}", targets[i].watermark_hold());
        }
    }
    let allow = Overrides::default();
    // Done already: the one to promote was promoted and holds everything the bunker has.
    if let Ok(Plan::AlreadyDone { epoch, end_lsn }) = plan(b, views[p], allow) {
        return Ok(SeveralOutcome::AlreadyDone { epoch, end_lsn });
    }
    // The bunker's records go to the most advanced target (the one to promote among equals).
    let adv = (0..targets.len()).fold(p, |best, i| if views[i].next_lsn > views[best].next_lsn { i } else { best });
    let (from, bunker_next, end, epoch) = match plan(b, views[adv], allow) {
        Err(why) => return Ok(SeveralOutcome::Refused { advanced: adv, why }),
        Ok(Plan::AlreadyDone { .. }) => {
            return Err(format!("target {adv} was promoted already, but target {p} is named to be"));
        }
        Ok(Plan::Move { from, bunker_next, end, epoch }) => (from, bunker_next, end, epoch),
    };
    let epoch = views.iter().map(|v| v.epoch + 1).fold(epoch, u64::max);
    bunker.fence(epoch).map_err(|e| format!("fencing the bunker: {e}"))?;
    for (i, t) in targets.iter().enumerate() {
        t.fence(epoch).map_err(|e| format!("fencing target {i}: {e}"))?;
    }
    if bunker.epoch() < epoch || targets.iter().any(|t| t.epoch() < epoch) {
        let epochs: Vec<u64> = targets.iter().map(|t| t.epoch()).collect();
        return Err(format!("a fence at epoch {epoch} did not take: bunker {}, targets {epochs:?}", bunker.epoch()));
    }
    if cut_after == Some(0) {
        return Ok(SeveralOutcome::Interrupted);
    }
    let to_move = bunker_next.saturating_sub(from);
    if to_move > 0 && bunker.log().start_lsn.0 > from {
        return Err(format!("the bunker no longer holds record {from} after the fence"));
    }
    let mut blocks = 0u64;
    let mut scan = IncompleteScan::default();
    if to_move > 0 {
        let read = |at: Lsn, out: &mut Vec<u8>| {
            bunker.read(at, block_bytes, out).map_err(|e| format!("reading the bunker: {e}"))
        };
        let what = "the bunker's records";
        let Some((moved, acked)) = move_blocks(what, &read, &targets[adv], from, model, &mut blocks, cut_after)? else {
            return Ok(SeveralOutcome::Interrupted);
        };
        if from + moved.records != bunker_next || acked != Some(Lsn(bunker_next - 1)) {
            return Err(format!(
                "the bunker's records ended at {} (said {bunker_next}); target {adv} acked {acked:?}",
                from + moved.records
            ));
        }
        scan = moved;
    }
    // Every other target the bunker can serve gets its records from the bunker too: catch-up
    // from the most advanced target's log cannot reach one behind that log's start (found by
    // this simulation, seed 61: a target in order, the bunker holding what it lacked).
    for i in (0..targets.len()).filter(|i| *i != adv) {
        let from_i = targets[i].position().next_lsn;
        if from_i >= bunker_next || from_i < bunker.log().start_lsn.0 {
            continue;
        }
        let read = |at: Lsn, out: &mut Vec<u8>| {
            bunker.read(at, block_bytes, out).map_err(|e| format!("reading the bunker: {e}"))
        };
        let what = format!("the bunker's records to target {i}");
        let Some((_, acked)) = move_blocks(&what, &read, &targets[i], from_i, model, &mut blocks, cut_after)? else {
            return Ok(SeveralOutcome::Interrupted);
        };
        if acked != Some(Lsn(bunker_next - 1)) {
            return Err(format!("target {i} acked {acked:?} of the bunker's records below {bunker_next}"));
        }
    }
    // `ferryfs catchup`: each target as it stands now.
    let peers = targets
        .iter()
        .map(|t| Ok(Peer { set_id: t.set_id(), view: target_view(t)? }))
        .collect::<Result<Vec<_>, String>>()?;
    let names: Vec<String> = (0..targets.len()).map(|i| format!("sim://target{i}")).collect();
    let cplan = catchup::plan(&peers, &names, false).map_err(|e| format!("catch-up refused: {e}"))?;
    let (src, cend) = (cplan.advanced, cplan.end);
    if std::env::var_os("FERRYFS_SIM_DEBUG").is_some() {
        eprintln!("DEBUG catch-up from target {src} to {cend}: {:?}", cplan.actions);
    }
    let mut c = CatchUp {
        source: src,
        source_start: peers[src].view.start_lsn,
        bunker_start: b.start_lsn,
        bunker_next: b.next_lsn,
        ..CatchUp::default()
    };
    for (i, action) in cplan.actions.iter().enumerate() {
        match *action {
            Action::Level => c.leveled.push(i),
            Action::Blocks { .. } => c.behind.push((i, *action)),
            Action::Records { from } => {
                let read = |at: Lsn, out: &mut Vec<u8>| {
                    targets[src].read_log(at, block_bytes, out).map_err(|e| format!("reading target {src}'s log: {e}"))
                };
                let what = format!("target {src}'s log relayed to target {i}");
                let Some((relayed, acked)) =
                    move_blocks(&what, &read, &targets[i], from, model, &mut blocks, cut_after)?
                else {
                    return Ok(SeveralOutcome::Interrupted);
                };
                if relayed.records != cend - from || acked != Some(Lsn(cend - 1)) {
                    return Err(format!(
                        "target {src} sent {} records of LSN {from}..{cend} to target {i}, which acked {acked:?}",
                        relayed.records
                    ));
                }
                c.leveled.push(i);
                c.caught_up += 1;
                c.records += relayed.records;
            }
        }
    }
    for &i in &c.leveled {
        targets[i].apply_log(Lsn(cend)).map_err(|e| format!("target {i}: applying its log: {e}"))?;
        let v = target_view(&targets[i])?;
        if v.applied_next != cend {
            return Err(format!("target {i} says it applied below {}, not below {cend}", v.applied_next));
        }
    }
    // The targets behind the source's log get a block-level resync from it (`replica::blocks`),
    // unless the source itself is left mixed past its end.
    if cplan.actions[src] == Action::Level {
        for (i, action) in std::mem::take(&mut c.behind) {
            if !block_resync(&targets[src], &targets[i], cend, &mut blocks, cut_after)? {
                return Ok(SeveralOutcome::Interrupted);
            }
            targets[i].apply_log(Lsn(cend)).map_err(|e| format!("target {i}: after its block-level resync: {e}"))?;
            let v = target_view(&targets[i])?;
            if v.applied_next != cend || v.next_lsn != cend {
                return Err(format!("target {i} after its block-level resync: {v:?}, not at {cend}"));
            }
            c.resynced.push((i, action));
        }
    }
    if cend != end {
        return Err(format!("the targets were leveled at LSN {cend}, not at the failover's end {end}"));
    }
    if c.behind.iter().any(|(i, _)| *i == p) {
        return Ok(SeveralOutcome::PromoteBehind { catch_up: c });
    }
    targets[p].promote(epoch, Lsn(end), (0, 0, b"sim".to_vec())).map_err(|e| format!("promoting target {p}: {e}"))?;
    let v = target_view(&targets[p])?;
    if !v.promoted || v.epoch < epoch || v.next_lsn != end {
        return Err(format!("target {p} did not confirm its promotion at epoch {epoch}, end {end}: {v:?}"));
    }
    Ok(SeveralOutcome::Promoted {
        epoch,
        end,
        moved: scan.records,
        incomplete: scan.incomplete().len() as u64,
        catch_up: c,
    })
}

impl World {
    /// The failover against the nodes as they are now (a crashed one is restarted first).
    fn run_failover(&mut self, block_bytes: usize, cut_after: Option<u64>) -> Result<Outcome, String> {
        let (bunker, target) = (self.bunker_core()?, self.target_core(0)?);
        run_failover(&bunker, &target, &self.model, block_bytes, cut_after)
    }

    /// The same with several targets, `promote` named to be promoted.
    fn run_failover_several(
        &mut self,
        promote: usize,
        block_bytes: usize,
        cut_after: Option<u64>,
    ) -> Result<SeveralOutcome, String> {
        let bunker = self.bunker_core()?;
        let targets = (0..self.targets.len()).map(|i| self.target_core(i)).collect::<Result<Vec<_>, _>>()?;
        run_failover_several(&bunker, &targets, promote, &self.model, block_bytes, cut_after)
    }

    fn crash_targets(&mut self) {
        for i in 0..self.targets.len() {
            self.crash_target(i);
        }
    }

    fn listings(&self, which: &[usize]) -> Vec<Listing> {
        which.iter().map(|&i| visible(self.targets[i].tree.listing())).collect()
    }
}

impl Sim {
    /// After the primary's crash: the nodes come back (some crash once more first), the
    /// failover runs (maybe cut off, then again), and the invariants are checked.
    pub(super) fn failover(&self, w: &mut World, overflow: Option<String>) -> Result<(), String> {
        if w.rng.gen_ratio(1, 3) {
            w.crash_bunker();
        }
        for i in 0..w.targets.len() {
            if w.rng.gen_ratio(1, 3) {
                w.crash_target(i);
            }
        }
        let block_bytes = w.rng.gen_range(1usize..=256) << 10;
        let interrupt = w.cfg.interrupt_permille;
        let cut_after = w.permille(interrupt).then(|| w.rng.gen_range(0..4));
        if w.targets.len() > 1 {
            return self.failover_several(w, overflow, block_bytes, cut_after);
        }
        let mut outcome = w.run_failover(block_bytes, cut_after)?;
        if matches!(outcome, Outcome::Interrupted) {
            w.stats.interrupted += 1;
            w.crash_bunker();
            w.crash_targets();
            outcome = w.run_failover(block_bytes, None)?;
        }
        let (epoch, end) = match outcome {
            Outcome::Promoted { epoch, end, moved, incomplete } => {
                w.stats.promoted += 1;
                w.stats.records_moved += moved;
                w.stats.incomplete += incomplete;
                (epoch, end)
            }
            Outcome::Refused(why) => return self.judge_refusal(w, 0, &why, overflow),
            other => return Err(format!("the failover did not promote the target: {other:?}")),
        };
        self.check_sync_acked(w, end)?;
        if self.check_tree(w, 0, end)? {
            w.stats.cut_ops += 1;
        }
        // Invariant 4: again, after both restart: nothing to do, nothing changes.
        let before = visible(w.targets[0].tree.listing());
        w.crash_bunker();
        w.crash_targets();
        match w.run_failover(block_bytes, None)? {
            Outcome::AlreadyDone { epoch: e, end_lsn } if e == epoch && end_lsn == end => {}
            other => return Err(format!("a second failover after promoting at epoch {epoch}, end {end}: {other:?}")),
        }
        let after = visible(w.targets[0].tree.listing());
        if after != before {
            return Err(format!("the second failover changed the tree: {}", listing_diff(&before, &after)));
        }
        Ok(())
    }

    /// The failover with several targets: the operator names one to promote at random; when
    /// catch-up leaves that one behind, the command promotes none, and the operator runs it
    /// again naming one of the leveled ones (as its message says).
    fn failover_several(
        &self,
        w: &mut World,
        overflow: Option<String>,
        block_bytes: usize,
        mut cut_after: Option<u64>,
    ) -> Result<(), String> {
        let n = w.targets.len();
        let mut promote = w.rng.gen_range(0..n);
        if std::env::var_os("FERRYFS_SIM_DEBUG").is_some() {
            for (i, t) in w.targets.iter().enumerate() {
                eprintln!(
                    "DEBUG target {i}: map at the crash {:?}, released {}, watermark unheld below {}, log restarted at \
                     {}, log overflows {}",
                    w.target_modes[i],
                    self.target_released[i].load(Ordering::Acquire),
                    t.unheld_below,
                    t.restarted_at,
                    t.overflows()
                );
            }
        }
        let mut runs = 0;
        let (epoch, end, c) = loop {
            runs += 1;
            if runs > 3 {
                return Err("three runs of the failover promoted no target".into());
            }
            match w.run_failover_several(promote, block_bytes, cut_after.take())? {
                SeveralOutcome::Interrupted => {
                    w.stats.interrupted += 1;
                    w.crash_bunker();
                    w.crash_targets();
                }
                SeveralOutcome::Refused { advanced, why } => return self.judge_refusal(w, advanced, &why, overflow),
                SeveralOutcome::PromoteBehind { catch_up } => {
                    w.stats.promote_behind += 1;
                    promote = catch_up.leveled[w.rng.gen_range(0..catch_up.leveled.len())];
                }
                SeveralOutcome::Promoted { epoch, end, moved, incomplete, catch_up } => {
                    w.stats.promoted += 1;
                    w.stats.several_promoted += 1;
                    w.stats.records_moved += moved;
                    w.stats.incomplete += incomplete;
                    break (epoch, end, catch_up);
                }
                other @ SeveralOutcome::AlreadyDone { .. } => {
                    return Err(format!("the failover did not promote target {promote}: {other:?}"));
                }
            }
        };
        w.stats.caught_up += c.caught_up;
        w.stats.records_caught_up += c.records;
        for &(i, action) in c.behind.iter().chain(&c.resynced) {
            self.judge_blocks(w, i, action, &c)?;
        }
        w.stats.blocks_resynced += c.resynced.len() as u64;
        self.check_sync_acked(w, end)?;
        let mut cut = false;
        let promoted = visible(w.targets[promote].tree.listing());
        let level: Vec<usize> = c.leveled.iter().copied().chain(c.resynced.iter().map(|(i, _)| *i)).collect();
        for &i in &level {
            cut |= self.check_tree(w, i, end)?;
            let have = visible(w.targets[i].tree.listing());
            if have != promoted {
                return Err(format!(
                    "target {i}, leveled at LSN {end}, shows another tree than the promoted target {promote}: {}",
                    listing_diff(&promoted, &have)
                ));
            }
        }
        if cut {
            w.stats.cut_ops += 1;
        }
        // Invariant 4: again, after every node restarts: nothing to do, nothing changes.
        let before = w.listings(&level);
        w.crash_bunker();
        w.crash_targets();
        match w.run_failover_several(promote, block_bytes, None)? {
            SeveralOutcome::AlreadyDone { epoch: e, end_lsn } if e == epoch && end_lsn == end => {}
            other => return Err(format!("a second failover after promoting at epoch {epoch}, end {end}: {other:?}")),
        }
        for ((i, before), after) in level.iter().zip(&before).zip(w.listings(&level)) {
            if after != *before {
                return Err(format!("the second failover changed target {i}'s tree: {}", listing_diff(before, &after)));
            }
        }
        Ok(())
    }
}
