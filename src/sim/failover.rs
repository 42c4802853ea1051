//! Failover in the deterministic simulation: a primary whose fsyncs wait for its bunker (the
//! production `BunkerLink` in sync mode), shipping to one to three lagging targets (one
//! production `Shipper` each), crashes of all of them, and then the failover exactly as
//! `ferryfs failover` runs it: with one target as `cmd::failover` does
//! (`replica::failover::plan`, fence the bunker, fence the target, move the bunker's records in
//! blocks, promote); with several as `cmd::failover_several` and `cmd::catchup` do (fence the
//! bunker and every target at one epoch above all of theirs, move the bunker's records to the
//! most advanced target, level the others from its log by `replica::catchup::plan`, have every
//! leveled target apply its log up to the common end, promote the one named by `--promote`).
//!
//! **Invariants**, checked after the promotion:
//! 1. every fsync that returned while the link was in sync mode (not degraded) is held: the
//!    promoted end LSN is past every record it covered;
//! 2. the promoted target's tree is the primary's journal applied up to that end LSN, in
//!    order, with no hole: it equals the primary's own tree after the last operation whose
//!    records all lie below the end (or, when the end cuts an operation's records, before or
//!    after that one); the tree states come from the primary itself, not from the apply code
//!    under test. With several targets, every target catch-up leveled (all but those it says
//!    need blocks) holds and has applied every record below the end, and shows the same tree
//!    as the promoted one;
//! 3. the records moved from the bunker, and those relayed from the most advanced target's
//!    log to the others, are the primary's, byte for byte;
//! 4. running the failover again (after every node restarts) is a no-op: `Plan::AlreadyDone`,
//!    and the tree does not change.
//!
//! A refusal by `plan` because the bunker no longer holds what the (most advanced) target
//! lacks passes only when a journal overflow explains it: the bunker's link recorded one (its
//! status says so), or the hub let that target go (`Retention::release`: it lagged past the
//! journal and resyncs); or the target owed a resync it had not landed (its initial copy: it
//! holds no state a failover could complete). Any other gap is a bug.
//!
//! A target catch-up leaves behind (`catchup::Action::Blocks`) is counted (`needs_blocks`) and
//! passes only when explained: a resync left its directory mixed past the end while the bunker
//! link was degraded (as for the single target's `--allow-mixed` refusal); or the most advanced
//! target's log no longer holds what it lacks because (a) a watermark at or past its next LSN
//! was sent while it did not hold the watermark back (it had fallen back, was resyncing, or had
//! not landed its initial copy: it gets blocks by design), (b) the most advanced target's own
//! log restarted past it (a resync landed there: its log begins at the resync's resume LSN),
//! or (c) that log filled and let go of what the watermark held (`LogFloor::release`). Any
//! other is a bug. When the target named to be promoted is one of them, the command promotes
//! none; the simulated operator runs it again with `--promote` one of the leveled targets.
//!
//! **Fault model.**
//! - *Networks* (all links; TCP, so faults show as a broken connection): each tick moves a
//!   random part of the bytes in flight; a run of bytes may be lost or duplicated (the
//!   receiver's decoder finds it, or a silence deadline in ticks closes the connection: the
//!   link's own ack timeout is set out of reach, so the network's model stands for it); cuts
//!   close the connection and refuse new ones for a while. The targets' networks move bytes
//!   only on some ticks and lose more: they lag, each by its own draws.
//! - *Bunker crash*: the process dies and comes back some ticks later; its log storage loses
//!   unflushed pages (`SimStorage::crash_machine`, torn or whole) or nothing (a process crash).
//!   It acks only what it flushed, so it may lose nothing it acked. Now and then it stays away
//!   for thousands of ticks; in a quarter of the seeds fsyncs are rare, so the workload writes on
//!   meanwhile and the primary's journal overflows (the link lets the bunker go and degrades).
//! - *Target outages* of hundreds of ticks: the journal overflows past it and it resyncs.
//! - *Target crash*: process crashes, and machine crashes that lose unflushed log pages and the
//!   directory's changes since its last sync (`SimTree::crash_machine`).
//! - *Primary crash*: at a random tick, for good. Every node may crash once more before the
//!   failover; the failover itself may be cut off (after the fences, or after some blocks moved
//!   from the bunker or relayed between targets), every node restarts, and it runs again.
//!
//! **Determinism with real threads.** The link runs on its own thread (`BunkerLink::start`),
//! and so does each target's shipper (`Shipper::run`); the main thread drives the ticks. They
//! take turns, so that at any moment one thread runs: each tick the main thread runs the
//! workload and the targets' apply, then hands the turn to the link and waits for it back, then
//! to each shipper in order and waits for it back. A thread holding the turn runs until its next
//! call to its session (or connector), its turn point, where it does that connection's tick
//! (the link also counts a tick with the bunker's faults), hands the turn back to the main
//! thread and waits for its next turn. Each thread starts holding the turn, up to its first
//! turn point. The primary's tree (`TurnTree`) also gives the link a turn inside an operation,
//! between its journaled intent and its outcome, as a link thread running beside the writers
//! may see it. While the main thread is inside an fsync (blocked in `Mirror::wait`, in
//! production code), the link keeps the turn and drives the ticks itself until the link's state
//! releases the fsync (the same condition `wait` tests: acked, degraded or fenced), then hands
//! the turn back; the shippers wait meanwhile. The clocks of the link and the shippers are set
//! so that no decision depends on wall time: no heartbeats, no backoff, watermarks whenever
//! they move (`Timing::watermark_every` zero), never a refresh, and a `--bunker-timeout` out of
//! reach. Once the primary is dead every thread is let go (its turn points fail) and joined or
//! stopped before the failover, which runs on the main thread alone. With one target the order of
//! events is the earlier single-target simulation's (checked: with `targets_max` 1 and the
//! shipper's production watermark clocks, 50 seeds replayed its counters exactly).
//!
//! **Sync mode that cannot degrade by time.** With the timeout out of reach, sync mode under
//! `--bunker-unreachable degrade` behaves like `wait` during a bunker outage (fsyncs block until
//! the bunker acks), and degrades only when the journal overflows while the bunker lags
//! (`Retention::release`). Each fsync records whether the link released it by an ack in sync
//! mode or by being degraded; only the former count for invariant 1.
//!
//! **Not modelled**: the link's and the shippers' wall-clock timeouts (the network's silence
//! deadline stands for them), `--target-timeout` (600 s of wall time), degradation by timeout,
//! `--bunker-unreachable wait` (its overflow error is not visible in the link's status, so the
//! turn-taking could not tell when an fsync returns), a bunker that loses acked data (a wiped
//! disk), the primary's recovery (it never comes back), the bunker's and the targets' TCP servers
//! (their per-frame handling is mirrored here from `net::bunker` and done by the production
//! `FrameHandler`), the new primary's shipping to the leveled siblings, two primaries at once,
//! concurrent writers (one operation at a time), a shipper reading the tree in the middle of an
//! operation, xattrs, modes and times in the tree comparison (names, kinds, contents and symlink
//! targets are compared).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::crash::new_superblock;
use super::storage::SimStorage;
use super::tree::{SimNode, SimTree};
use crate::format::ops::{NodeKind, SetAttr};
use crate::io::{NewNode, Storage, Tree};
use crate::journal::{AllRetentions, JournalGeometry, LogCursor, Retention, recovery};
use crate::passthrough::{Core, CoreConfig, Errno, IdTable};
use crate::proto::wire::control::{ControlMsg, NodeDesc};
use crate::proto::wire::{Frame, FrameDecoder, FrameEncoder, split_records};
use crate::replica::bunker::BunkerCore;
use crate::replica::catchup::{self, Action, BlocksWhy, Peer};
use crate::replica::failover::{IncompleteScan, LogView, Overrides, Plan, plan};
use crate::replica::target::{FrameHandler, TargetCore, TargetPosition};
use crate::ship::bunker::{
    BunkerConfig, BunkerConnector, BunkerEvent, BunkerLink, BunkerPosition, BunkerSession, Hooks, LinkError, Mode,
    Timing as LinkTiming, Unreachable, Waker,
};
use crate::ship::hub::Hub;
use crate::ship::session::{Connector, Event, Session, event_of};
use crate::ship::shipper::{Shipper, Timing};
use crate::ship::source::Source;
use crate::syncmap::{Mode as MapMode, SyncMap};
use crate::types::{FileId, Handle, Lsn};

type Primary = Core<SimStorage, TurnTree>;
type Target = TargetCore<SimStorage, SimTree>;
type Bunker = BunkerCore<SimStorage>;
type Link = BunkerLink<SimStorage>;
type Listing = BTreeMap<String, (NodeKind, Vec<u8>)>;

/// A wall-clock bound on waiting for the other thread's turn: only a broken simulation (a turn
/// never handed back) reaches it.
const TURN_WAIT_MAX: Duration = Duration::from_secs(120);
/// Out of reach: no decision of the link depends on wall time.
const NEVER: Duration = Duration::from_secs(1 << 30);

/// Knobs of one run.
#[derive(Clone, Copy, Debug)]
pub struct FailoverConfig {
    /// The primary crashes at a tick drawn from this range (ticks of both threads count).
    pub crash_tick_min: u64,
    pub crash_tick_max: u64,
    /// Per main tick, in 1/1000: a workload operation, an fsync, a checkpoint of the primary.
    pub op_permille: u32,
    pub fsync_permille: u32,
    pub checkpoint_permille: u32,
    /// Per link tick, in 1/1000: bytes lost, bytes duplicated, a cut, a bunker crash.
    pub bunker_drop_permille: u32,
    pub bunker_dup_permille: u32,
    pub bunker_cut_permille: u32,
    pub bunker_crash_permille: u32,
    /// Per link tick, in 1/1000: the bunker goes away for thousands of ticks.
    pub bunker_outage_permille: u32,
    /// Per seed, in 1/1000: fsyncs are rare (1 to 5 in 1000 ticks), so the workload runs on
    /// through a bunker outage and the journal overflows: the link lets the bunker go,
    /// degrades, and restarts the bunker's log when it is back.
    pub sparse_fsync_permille: u32,
    /// Per main tick, in 1/1000: the same for the target's network and the target.
    pub target_drop_permille: u32,
    pub target_dup_permille: u32,
    pub target_cut_permille: u32,
    pub target_crash_permille: u32,
    /// Per main tick, in 1/1000: the target becomes unreachable for hundreds of ticks (long
    /// enough for the primary's journal to let it go: an overflow, then a resync).
    pub target_outage_permille: u32,
    /// Per main tick, in 1/1000: the target's network moves bytes at all (the rest: it lags).
    pub target_move_permille: u32,
    /// Target crashes may be machine crashes (else process crashes only).
    pub target_machine_crashes: bool,
    /// Per seed, in 1/1000: the first failover run is cut off and run again.
    pub interrupt_permille: u32,
    /// Mirror targets per seed: drawn from `1..=targets_max`.
    pub targets_max: usize,
    /// Per seed with several targets, in 1/1000: the targets' logs are only as large as the
    /// primary's journal (the documented minimum), so one may fill with records the watermark
    /// holds and let them go (`LogFloor::release`): a laggard then needs blocks. Off by
    /// default: it finds a known failure (seed 49 at 250: a restarted laggard's log, full of
    /// records it may not apply before `apply_log`, cannot take the records catch-up relays,
    /// and the failover stops with every target fenced and none promoted).
    pub small_target_log_permille: u32,
    pub primary_geometry: JournalGeometry,
    pub bunker_geometry: JournalGeometry,
    pub target_geometry: JournalGeometry,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            crash_tick_min: 300,
            crash_tick_max: 6000,
            op_permille: 350,
            fsync_permille: 60,
            checkpoint_permille: 10,
            bunker_drop_permille: 2,
            bunker_dup_permille: 2,
            bunker_cut_permille: 2,
            bunker_crash_permille: 2,
            bunker_outage_permille: 1,
            sparse_fsync_permille: 250,
            target_drop_permille: 6,
            target_dup_permille: 3,
            target_cut_permille: 4,
            target_crash_permille: 2,
            target_outage_permille: 1,
            target_move_permille: 400,
            target_machine_crashes: true,
            interrupt_permille: 250,
            targets_max: 3,
            small_target_log_permille: 0,
            // Small segments, so the journal wraps and overflows within a run; the bunker and
            // the target hold four times the primary's journal, so the primary's overflow (its
            // retention lets them go) comes before theirs.
            primary_geometry: JournalGeometry { segment_size: 64 << 10, segment_count: 4 },
            bunker_geometry: JournalGeometry { segment_size: 64 << 10, segment_count: 16 },
            target_geometry: JournalGeometry { segment_size: 64 << 10, segment_count: 16 },
        }
    }
}

/// What one seed did, for the runner's summary.
#[derive(Clone, Debug, Default)]
pub struct FailoverStats {
    pub ticks: u64,
    pub ops: u64,
    pub fsyncs: u64,
    /// fsyncs released by the bunker's ack in sync mode (invariant 1 holds for these).
    pub fsyncs_sync_acked: u64,
    /// fsyncs released because the link was degraded (async).
    pub fsyncs_degraded: u64,
    pub bunker_connections: u64,
    pub target_connections: u64,
    pub broken: u64,
    pub bunker_crashes: u64,
    pub target_crashes: u64,
    /// Seeds whose link recorded a journal overflow.
    pub overflows: u64,
    pub promoted: u64,
    pub records_moved: u64,
    /// Incomplete op transactions among the moved records (redone by the failover rule).
    pub incomplete: u64,
    /// Promotions whose end cut an operation's records.
    pub cut_ops: u64,
    pub interrupted: u64,
    /// Refused for a gap a journal overflow explains: the bunker link's, the target's.
    pub refused_overflow: u64,
    pub refused_target_overflow: u64,
    /// Refused because the target had not landed a resync it owed (its initial copy, say).
    pub refused_resync_owed: u64,
    /// Refused because a resync left the target's directory mixed past what the bunker held
    /// (the bunker link was degraded when the primary died).
    pub refused_mixed: u64,
    /// Mirror targets (one to three per seed).
    pub targets: u64,
    /// Seeds with several targets, and of those the failovers that promoted one.
    pub several: u64,
    pub several_promoted: u64,
    /// Targets catch-up leveled from the most advanced one's log, and the records relayed.
    pub caught_up: u64,
    pub records_caught_up: u64,
    /// Targets catch-up left behind (`Action::Blocks`), each explained by one of: a watermark
    /// passed it while it did not hold it back (it fell back, resynced, had no initial copy);
    /// the most advanced one's log restarted past it (a resync landed there); that log filled
    /// and let go (`LogFloor::release`); a resync left it mixed past the end (the bunker link
    /// was degraded).
    pub needs_blocks: u64,
    pub blocks_unheld: u64,
    pub blocks_source_resynced: u64,
    pub blocks_log_freed: u64,
    pub blocks_mixed: u64,
    /// Of those left behind, the ones whose lacking records the bunker held up to where the
    /// most advanced target's log starts: `ferryfs failover` moves the bunker's records to the
    /// most advanced target only, so they need blocks though records would have done.
    pub blocks_bunker_held: u64,
    /// Failovers whose `--promote` target needed blocks: none was promoted, and the operator
    /// ran it again naming a leveled one.
    pub promote_behind: u64,
}

impl FailoverStats {
    pub fn add(&mut self, o: &FailoverStats) {
        self.ticks += o.ticks;
        self.ops += o.ops;
        self.fsyncs += o.fsyncs;
        self.fsyncs_sync_acked += o.fsyncs_sync_acked;
        self.fsyncs_degraded += o.fsyncs_degraded;
        self.bunker_connections += o.bunker_connections;
        self.target_connections += o.target_connections;
        self.broken += o.broken;
        self.bunker_crashes += o.bunker_crashes;
        self.target_crashes += o.target_crashes;
        self.overflows += o.overflows;
        self.promoted += o.promoted;
        self.records_moved += o.records_moved;
        self.incomplete += o.incomplete;
        self.cut_ops += o.cut_ops;
        self.interrupted += o.interrupted;
        self.refused_overflow += o.refused_overflow;
        self.refused_target_overflow += o.refused_target_overflow;
        self.refused_resync_owed += o.refused_resync_owed;
        self.refused_mixed += o.refused_mixed;
        self.targets += o.targets;
        self.several += o.several;
        self.several_promoted += o.several_promoted;
        self.caught_up += o.caught_up;
        self.records_caught_up += o.records_caught_up;
        self.needs_blocks += o.needs_blocks;
        self.blocks_unheld += o.blocks_unheld;
        self.blocks_source_resynced += o.blocks_source_resynced;
        self.blocks_log_freed += o.blocks_log_freed;
        self.blocks_mixed += o.blocks_mixed;
        self.blocks_bunker_held += o.blocks_bunker_held;
        self.promote_behind += o.promote_behind;
    }
}

// ----- the world ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    Main,
    Link,
    /// The shipper of target `i`.
    Shipper(usize),
}

/// Why the link let an fsync return (the conditions `Mirror::wait` tests).
#[derive(Clone, Copy, Debug)]
struct Released {
    acked: bool,
    degraded: bool,
    fenced: bool,
}

/// The main thread is inside an fsync waiting for records below `below`.
struct PendingFsync {
    below: Lsn,
    released: Option<Released>,
}

struct BunkerNode {
    storage: SimStorage,
    core: Option<Arc<Bunker>>,
    /// Ticks until the crashed process is back.
    down: u32,
    /// Ticks during which connecting fails (a cut).
    cut: u32,
    /// Bumped by a cut or a crash: a session of an older generation is broken.
    generation: u64,
}

struct TargetNode {
    storage: SimStorage,
    tree: SimTree,
    core: Option<Arc<Target>>,
    cut: u32,
    generation: u64,
    /// The target's staging files (the one part of a target that is plain files).
    state_dir: tempfile::TempDir,
    /// Times its log let go of records the watermark held (`LogFloor::release`), summed over
    /// the processes that crashed (the count lives in memory).
    log_overflows: u64,
    /// One past the highest all-acked watermark a shipper sent (to any target) while this
    /// target did not hold it back (`Link::watermark_hold` was `None`): a target's log may
    /// free records below it that this one lacks.
    unheld_below: u64,
    /// The highest LSN a resync that landed here restarted its log at (its log holds
    /// nothing below it from then on).
    restarted_at: u64,
}

impl TargetNode {
    fn new() -> Result<TargetNode, String> {
        Ok(TargetNode {
            storage: SimStorage::new(),
            tree: SimTree::new(),
            core: None,
            cut: 0,
            generation: 0,
            state_dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            log_overflows: 0,
            unheld_below: 0,
            restarted_at: 0,
        })
    }

    /// `log_overflows` with the running process's.
    fn overflows(&self) -> u64 {
        self.log_overflows + self.core.as_ref().map_or(0, |c| c.watermark_hold().overflows)
    }
}

/// What the primary did, kept outside the code under test.
struct Model {
    /// Every record the primary appended, as its journal holds them, from LSN 1 on.
    records: Vec<u8>,
    /// Where record `i + 1` begins in `records`.
    offsets: Vec<usize>,
    cursor: LogCursor,
    /// (the primary's next LSN, its tree) at the start and after each operation.
    states: Vec<(u64, Listing)>,
    /// The LSN below which each fsync acknowledged in sync mode held every record.
    sync_acked: Vec<u64>,
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
    fn note_records(&mut self, primary: &Primary) -> Result<(), String> {
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
    fn check_block(&self, what: &str, from: u64, next: u64, block: &[u8]) -> Result<(), String> {
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

struct World {
    rng: ChaCha8Rng,
    cfg: FailoverConfig,
    tick: u64,
    crash_at: u64,
    turn: Turn,
    fsync: Option<PendingFsync>,
    dead: bool,
    primary: Arc<Primary>,
    set_id: [u8; 16],
    /// Each target's sync map mode when the primary crashed.
    target_modes: Vec<Option<MapMode>>,
    /// Whether the bunker link was degraded to async when the primary crashed.
    link_degraded: bool,
    model: Model,
    bunker: BunkerNode,
    targets: Vec<TargetNode>,
    hub: Arc<Hub<SimStorage>>,
    stats: FailoverStats,
    failure: Option<String>,
}

impl World {
    fn permille(&mut self, p: u32) -> bool {
        self.rng.gen_range(0..1000) < p
    }

    fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    /// What an operation of the workload did, in the model.
    fn note_step(&mut self) {
        let primary = self.primary.clone();
        self.stats.ops += 1;
        if let Err(e) = self.model.note_records(&primary) {
            return self.fail(e);
        }
        let next = primary.journal.next_lsn().0;
        let tree = visible(primary.tree.sim.listing());
        let (last_next, last_tree) = self.model.states.last().expect("the first state");
        if *last_next == next && *last_tree != tree {
            let diff = listing_diff(last_tree, &tree);
            return self.fail(format!("an operation changed the primary's tree without a record: {diff}"));
        }
        self.model.states.push((next, tree));
    }

    fn bunker_core(&mut self) -> Result<Arc<Bunker>, String> {
        if let Some(c) = &self.bunker.core {
            return Ok(c.clone());
        }
        let storage = self.bunker.storage.clone();
        let has_log = storage.read_superblock().map_err(|e| e.to_string())?.is_some();
        let core = if has_log {
            BunkerCore::open(storage)
        } else {
            BunkerCore::create(storage, self.cfg.bunker_geometry, self.set_id, self.primary.journal.epoch())
        }
        .map_err(|e| format!("bunker: {e}"))?;
        // A full log fails an append at once instead of after 30 s of wall time (nothing else
        // runs meanwhile that could free it).
        core.journal().set_full_wait(Duration::from_millis(1));
        let core = Arc::new(core);
        self.bunker.core = Some(core.clone());
        Ok(core)
    }

    fn target_core(&mut self, i: usize) -> Result<Arc<Target>, String> {
        if let Some(t) = &self.targets[i].core {
            return Ok(t.clone());
        }
        let t = &self.targets[i];
        let has_log = t.storage.read_superblock().map_err(|e| e.to_string())?.is_some();
        // A resync received whole before a crash is applied when the target opens: its log
        // restarts at the resync's resume LSN then.
        let pending = t.state_dir.path().join("resync-pending").exists(); // `replica::target`'s PENDING_FILE
        let core = if has_log {
            Target::open(t.storage.clone(), t.tree.clone(), t.state_dir.path())
        } else {
            let g = self.cfg.target_geometry;
            Target::create(t.storage.clone(), g, self.set_id, t.tree.clone(), t.state_dir.path())
        }
        .map_err(|e| format!("target {i}: {e}"))?;
        core.journal().set_full_wait(Duration::from_millis(1));
        let core = Arc::new(core);
        let t = &mut self.targets[i];
        if pending {
            t.restarted_at = t.restarted_at.max(core.journal().superblock().start_lsn.0);
        }
        t.core = Some(core.clone());
        Ok(core)
    }

    /// A shipper sends the all-acked watermark `all_acked_lsn`: the targets that do not hold
    /// it back now may find it past them in a peer's log (`TargetNode::unheld_below`).
    fn note_watermark(&mut self, all_acked_lsn: u64) {
        for (link, t) in self.hub.links.iter().zip(self.targets.iter_mut()) {
            if link.watermark_hold().is_none() {
                t.unheld_below = t.unheld_below.max(all_acked_lsn + 1);
            }
        }
    }

    fn crash_bunker(&mut self) {
        if self.bunker.core.take().is_some() {
            if self.rng.gen_bool(0.5) {
                let mut rng = ChaCha8Rng::seed_from_u64(self.rng.r#gen());
                self.bunker.storage.crash_machine(&mut rng);
            } else {
                self.bunker.storage.crash_process();
            }
            self.stats.bunker_crashes += 1;
        }
        self.bunker.down = self.rng.gen_range(1..300);
        self.bunker.generation += 1;
    }

    fn crash_target(&mut self, i: usize) {
        if let Some(core) = self.targets[i].core.take() {
            self.targets[i].log_overflows += core.watermark_hold().overflows;
            drop(core);
            let t = &self.targets[i];
            if self.cfg.target_machine_crashes && self.rng.gen_bool(0.5) {
                let mut rng = ChaCha8Rng::seed_from_u64(self.rng.r#gen());
                t.storage.crash_machine(&mut rng);
                t.tree.crash_machine();
            } else {
                t.storage.crash_process();
            }
            self.stats.target_crashes += 1;
        }
        self.targets[i].generation += 1;
    }

    /// The bunker's faults and clocks, once per link tick.
    fn bunker_faults(&mut self) {
        self.bunker.down = self.bunker.down.saturating_sub(1);
        self.bunker.cut = self.bunker.cut.saturating_sub(1);
        let (cut, crash, outage) =
            (self.cfg.bunker_cut_permille, self.cfg.bunker_crash_permille, self.cfg.bunker_outage_permille);
        if self.permille(outage) {
            self.crash_bunker();
            self.bunker.down = self.rng.gen_range(300..3000);
        }
        if self.permille(cut) {
            self.bunker.cut = self.rng.gen_range(1..60);
            self.bunker.generation += 1;
        }
        if self.permille(crash) {
            self.crash_bunker();
        }
    }
}

/// Shared by the main thread, the link's thread and the connectors.
struct Sim {
    world: Mutex<World>,
    turn_changed: Condvar,
    /// The primary crashed: read by the link's hooks, which run outside the world's lock.
    dead: AtomicBool,
    stop_shipper: Arc<AtomicBool>,
    link: OnceLock<Weak<Link>>,
    /// The highest floor a watermark made of the bunker's own acks (no target in ordered mode)
    /// could give the bunker's log.
    own_floor_max: AtomicU64,
    /// Per target: the journal overflowed while it lagged: the hub let it go (it resyncs).
    target_released: Vec<AtomicBool>,
    seed: u64,
}

impl Sim {
    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.link.get().and_then(Weak::upgrade)
    }

    fn wait_turn<'a>(&self, mut w: MutexGuard<'a, World>, who: Turn) -> MutexGuard<'a, World> {
        let started = Instant::now();
        while w.turn != who && !w.dead {
            let (g, _) = self.turn_changed.wait_timeout(w, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner());
            w = g;
            if started.elapsed() > TURN_WAIT_MAX {
                // A turn never handed back: the turn-taking is broken, and a thread blocked in
                // production code cannot be freed; say so and stop rather than hang.
                eprintln!(
                    "sim failover seed {}: {who:?} waited {TURN_WAIT_MAX:?} for its turn (tick {}, fsync pending: {}); \
                     the simulation's turn-taking is broken",
                    self.seed,
                    w.tick,
                    w.fsync.is_some()
                );
                std::process::abort();
            }
        }
        w
    }

    fn hand_turn(&self, w: &mut World, to: Turn) {
        w.turn = to;
        self.turn_changed.notify_all();
    }

    /// Counts a tick; the primary dies at `crash_at`. Returns whether it is alive.
    fn advance(&self, w: &mut World) -> bool {
        w.tick += 1;
        w.stats.ticks += 1;
        if !w.dead && w.tick >= w.crash_at {
            self.die(w);
        }
        !w.dead
    }

    fn die(&self, w: &mut World) {
        w.dead = true;
        self.dead.store(true, Ordering::Release);
        self.stop_shipper.store(true, Ordering::Release);
        self.turn_changed.notify_all();
    }

    /// One tick of the main thread: the workload, the targets' apply, then one turn of the
    /// link and one of each shipper, in order. The main thread holds the turn when it calls
    /// this. Returns whether the primary is alive.
    fn main_tick(&self) -> bool {
        let mut w = self.lock();
        if w.dead || !self.advance(&mut w) {
            return false;
        }
        let (op, fsync) = (w.cfg.op_permille, w.cfg.fsync_permille);
        let roll = w.rng.gen_range(0..1000);
        if roll < op {
            // Without the world's lock: the primary's tree gives the link turns inside the
            // operation (`TurnTree`).
            let (primary, mut rng) = (w.primary.clone(), ChaCha8Rng::seed_from_u64(w.rng.r#gen()));
            drop(w);
            step(&primary, &mut rng);
            w = self.lock();
            w.note_step();
            if w.dead {
                return false;
            }
        } else if roll < op + fsync {
            w = self.fsync(w);
            if w.dead {
                return false;
            }
        }
        let checkpoint = w.cfg.checkpoint_permille;
        if w.permille(checkpoint) {
            let _ = w.primary.checkpoint();
        }
        for i in 0..w.targets.len() {
            let Some(t) = w.targets[i].core.clone() else { continue };
            if let Err(e) = t.apply_available() {
                let tick = w.tick;
                w.fail(format!("tick {tick}: target {i}'s apply failed: {e}"));
                self.die(&mut w);
                return false;
            }
            if w.rng.gen_ratio(1, 50) {
                let _ = t.checkpoint();
            }
        }
        self.hand_turn(&mut w, Turn::Link);
        w = self.wait_turn(w, Turn::Main);
        for i in 0..w.targets.len() {
            if w.dead {
                return false;
            }
            self.hand_turn(&mut w, Turn::Shipper(i));
            w = self.wait_turn(w, Turn::Main);
        }
        !w.dead
    }

    /// The turn point of shipper `i`, called by each call to its session or connector (it
    /// holds the turn then): hands the turn to the main thread and waits for its next turn.
    /// Once the primary is dead it returns at once: the shipper must touch no target.
    fn shipper_turn(&self, i: usize) -> MutexGuard<'_, World> {
        let mut w = self.lock();
        if w.dead {
            return w;
        }
        self.hand_turn(&mut w, Turn::Main);
        self.wait_turn(w, Turn::Shipper(i))
    }

    /// A turn of the link in the middle of a workload operation (`TurnTree`), on one call in
    /// three: the link may then see an op's intent without its outcome, as a link thread
    /// running beside the writers does.
    fn mid_op_turn(&self) {
        let mut w = self.lock();
        if w.dead || !w.rng.gen_ratio(1, 3) {
            return;
        }
        self.hand_turn(&mut w, Turn::Link);
        let _w = self.wait_turn(w, Turn::Main);
    }

    /// An fsync of the workload, through the production path (`Core::sync` → the link's
    /// `Mirror::wait`). The link drives the ticks until it releases it.
    fn fsync<'a>(&'a self, mut w: MutexGuard<'a, World>) -> MutexGuard<'a, World> {
        let primary = w.primary.clone();
        let below = primary.journal.next_lsn();
        w.stats.fsyncs += 1;
        w.fsync = Some(PendingFsync { below, released: None });
        self.hand_turn(&mut w, Turn::Link);
        drop(w);
        let result = primary.sync();
        let mut w = self.lock();
        w = self.wait_turn(w, Turn::Main);
        let pending = w.fsync.take().expect("the fsync is pending until the main thread takes it");
        if w.dead {
            // The primary died meanwhile: whatever the call says, no client heard it.
            return w;
        }
        match (result, pending.released) {
            (Ok(_), Some(r)) if r.acked && !r.degraded && !r.fenced => {
                w.stats.fsyncs_sync_acked += 1;
                w.model.sync_acked.push(below.0);
            }
            (Ok(_), Some(_)) => w.stats.fsyncs_degraded += 1,
            (Ok(_), None) => w.fail(format!("fsync of LSN < {} returned before the link released it", below.0)),
            (Err(e), _) => w.fail(format!("fsync of LSN < {} failed: {e:?}", below.0)),
        }
        w
    }

    /// The link's turn point, called by each session call: hands the turn to the main thread
    /// (unless the main thread is inside an fsync the link has not released yet: then the link
    /// keeps it and drives the tick itself), waits for it back, and counts a tick with the
    /// bunker's faults. `Err` once the primary is dead: the link must touch nothing more.
    fn link_turn(&self) -> Result<MutexGuard<'_, World>, String> {
        let mut w = self.lock();
        if w.dead {
            return Err("the primary crashed".into());
        }
        let keep = match &mut w.fsync {
            Some(f) if f.released.is_none() => match self.link().and_then(|l| released(&l, f.below)) {
                Some(r) => {
                    f.released = Some(r);
                    false
                }
                None => true,
            },
            _ => false,
        };
        if !keep {
            self.hand_turn(&mut w, Turn::Main);
            w = self.wait_turn(w, Turn::Link);
        }
        if w.dead || !self.advance(&mut w) {
            return Err("the primary crashed".into());
        }
        w.bunker_faults();
        Ok(w)
    }
}

/// Whether `Mirror::wait(below)` returns now, and why: its conditions with `--bunker-unreachable
/// degrade` and a timeout out of reach.
fn released(link: &Link, below: Lsn) -> Option<Released> {
    let s = link.snapshot();
    let r =
        Released { acked: s.acked_below >= below, degraded: s.degraded.is_some(), fenced: s.fenced_epoch.is_some() };
    (r.acked || r.degraded || r.fenced).then_some(r)
}

// ----- the bunker's network --------------------------------------------------------------

struct SimBunkerConnector {
    sim: Arc<Sim>,
    epoch: u64,
}

impl BunkerConnector for SimBunkerConnector {
    fn connect(&mut self, _waker: Waker) -> Result<Box<dyn BunkerSession>, LinkError> {
        let mut w = self.sim.link_turn()?;
        if w.bunker.down > 0 {
            return Err(LinkError::Failed("connection refused: the bunker is down".into()));
        }
        if w.bunker.cut > 0 {
            return Err(LinkError::Failed("simulated cut".into()));
        }
        let core = w.bunker_core()?;
        if core.admits(self.epoch).is_err() {
            return Err(LinkError::Fenced { epoch: core.epoch(), fork_lsn: core.fork_lsn() });
        }
        w.stats.bunker_connections += 1;
        let generation = w.bunker.generation;
        drop(w);
        let mut s = SimBunkerSession {
            sim: self.sim.clone(),
            generation,
            epoch: self.epoch,
            position: BunkerPosition { epoch: 0, start_lsn: Lsn(0), next_lsn: Lsn(0), durable_next: Lsn(0) },
            to_bunker: VecDeque::new(),
            to_primary: VecDeque::new(),
            enc_p: FrameEncoder::new(),
            dec_b: FrameDecoder::new(),
            enc_b: FrameEncoder::new(),
            dec_p: FrameDecoder::new(),
            events: VecDeque::new(),
            broken: None,
            silence_deadline: None,
        };
        s.position = s.greeting(&core)?;
        Ok(Box::new(s))
    }
}

/// One connection between the link and the simulated bunker.
struct SimBunkerSession {
    sim: Arc<Sim>,
    generation: u64,
    /// The primary's epoch, as its hello says.
    epoch: u64,
    position: BunkerPosition,
    to_bunker: VecDeque<u8>,
    to_primary: VecDeque<u8>,
    enc_p: FrameEncoder,
    dec_b: FrameDecoder,
    enc_b: FrameEncoder,
    dec_p: FrameDecoder,
    events: VecDeque<BunkerEvent>,
    broken: Option<String>,
    silence_deadline: Option<u64>,
}

impl SimBunkerSession {
    /// The bunker's first two frames (`Status`, `LogInfo`) through the codecs, fault-free, read
    /// as `TcpBunkerConnector` reads them.
    fn greeting(&mut self, core: &Bunker) -> Result<BunkerPosition, LinkError> {
        let mut bytes = Vec::new();
        for m in [core.status_msg(), core.log_info(true)] {
            self.enc_b.encode(&Frame::Control(m), &mut bytes).map_err(|e| LinkError::Failed(e.to_string()))?;
        }
        self.dec_p.push(&bytes);
        let mut next = || self.dec_p.next_frame().ok().flatten();
        let durable_lsn = match next() {
            Some(Frame::Control(ControlMsg::Status { durable_lsn, .. })) => durable_lsn,
            f => return Err(LinkError::Failed(format!("the bunker began with {f:?} instead of its status"))),
        };
        match next() {
            Some(Frame::Control(ControlMsg::LogInfo { epoch, start_lsn, next_lsn, .. })) => Ok(BunkerPosition {
                epoch,
                start_lsn: Lsn(start_lsn),
                next_lsn: Lsn(next_lsn),
                durable_next: Lsn(durable_lsn + 1),
            }),
            f => Err(LinkError::Failed(format!("the bunker sent {f:?} instead of its log info"))),
        }
    }

    fn queue(&mut self, f: &Frame) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let mut out = Vec::new();
        self.enc_p.encode(f, &mut out).map_err(|e| e.to_string())?;
        self.to_bunker.extend(out);
        Ok(())
    }

    /// A turn of the link and one tick of this connection.
    fn turn(&mut self) -> Result<(), String> {
        let sim = self.sim.clone();
        let mut w = sim.link_turn()?;
        self.tick(&mut w);
        Ok(())
    }

    fn break_with(&mut self, w: &mut World, why: &str) {
        if self.broken.is_none() {
            w.stats.broken += 1;
            self.broken = Some(why.to_string());
        }
    }

    /// Part of the bytes in flight each way, with faults; the bunker handles what arrives.
    fn tick(&mut self, w: &mut World) {
        if self.broken.is_some() {
            return;
        }
        if w.bunker.generation != self.generation {
            return self.break_with(w, "the connection to the bunker broke (a cut or its crash)");
        }
        let (d, u) = (w.cfg.bunker_drop_permille, w.cfg.bunker_dup_permille);
        if fault_bytes(w, &mut self.to_bunker, d, u) | fault_bytes(w, &mut self.to_primary, d, u) {
            let later = w.rng.gen_range(1..50);
            self.silence_deadline.get_or_insert(w.tick + later);
        }
        if self.silence_deadline.is_some_and(|t| w.tick >= t) {
            return self.break_with(w, "silence after damaged bytes (the timeout)");
        }
        let Some(core) = w.bunker.core.clone() else {
            return self.break_with(w, "the bunker is gone");
        };
        let n = w.rng.gen_range(0..=self.to_bunker.len());
        let chunk: Vec<u8> = self.to_bunker.drain(..n).collect();
        self.dec_b.push(&chunk);
        loop {
            match self.dec_b.next_frame() {
                Ok(Some(f)) => match bunker_frame(&core, self.epoch, f) {
                    Ok(Some(reply)) => {
                        let mut out = Vec::new();
                        self.enc_b.encode(&reply, &mut out).expect("encoding a reply");
                        self.to_primary.extend(out);
                    }
                    Ok(None) => {}
                    Err(e) => return self.break_with(w, &format!("the bunker closed the connection: {e}")),
                },
                Ok(None) => break,
                Err(e) => return self.break_with(w, &format!("the bunker: bad frame: {e}")),
            }
        }
        let n = w.rng.gen_range(0..=self.to_primary.len());
        let chunk: Vec<u8> = self.to_primary.drain(..n).collect();
        self.dec_p.push(&chunk);
        loop {
            match self.dec_p.next_frame() {
                Ok(Some(f)) => {
                    if let Some(ev) = bunker_event(f) {
                        self.events.push_back(ev);
                    }
                }
                Ok(None) => break,
                Err(e) => return self.break_with(w, &format!("the primary: bad frame from the bunker: {e}")),
            }
        }
    }
}

/// What `ferryfs bunker` does with one frame of its primary (`net::bunker::primary_frame`):
/// the reply to send, or why it closes the connection.
fn bunker_frame(core: &Bunker, epoch: u64, frame: Frame) -> Result<Option<Frame>, String> {
    match frame {
        Frame::Heartbeat => Ok(None),
        Frame::Records(body) => {
            core.admits(epoch).map_err(|e| e.to_string())?;
            let lsn = core.receive(&body).map_err(|e| format!("records refused: {e}"))?;
            Ok(Some(Frame::Ack(lsn)))
        }
        Frame::Control(ControlMsg::RestartAt { lsn }) => {
            if lsn == 0 {
                return Err("RestartAt { lsn: 0 } refused: LSNs start at 1".into());
            }
            core.admits(epoch).map_err(|e| e.to_string())?;
            core.restart_at(Lsn(lsn)).map_err(|e| format!("RestartAt {lsn}: {e}"))?;
            Ok(Some(Frame::Control(core.log_info(true))))
        }
        Frame::Control(ControlMsg::Watermark { all_acked_lsn }) => {
            core.watermark(Lsn(all_acked_lsn)).map_err(|e| format!("watermark: {e}"))?;
            Ok(None)
        }
        Frame::Control(ControlMsg::StatusRequest) => Ok(Some(Frame::Control(core.status_msg()))),
        Frame::Control(ControlMsg::Settled { .. }) => Ok(None),
        Frame::Control(ControlMsg::Bye { reason }) => Err(format!("the primary said goodbye: {reason}")),
        other => Err(format!("the primary sent {:?}, which a bunker does not take", other.kind())),
    }
}

/// A frame from the bunker as the link's event (`ship::bunker::read_events`).
fn bunker_event(f: Frame) -> Option<BunkerEvent> {
    Some(match f {
        Frame::Ack(l) => BunkerEvent::Ack(l),
        Frame::Heartbeat => BunkerEvent::Heartbeat,
        Frame::Control(ControlMsg::LogInfo { epoch, start_lsn, next_lsn, .. }) => {
            BunkerEvent::LogInfo(BunkerPosition {
                epoch,
                start_lsn: Lsn(start_lsn),
                next_lsn: Lsn(next_lsn),
                durable_next: Lsn(next_lsn),
            })
        }
        Frame::Control(ControlMsg::Fenced { epoch, fork_lsn }) => BunkerEvent::Fenced { epoch, fork_lsn },
        Frame::Control(ControlMsg::Bye { reason }) => BunkerEvent::Closed(format!("the bunker said: {reason}")),
        Frame::Control(ControlMsg::Status { .. }) => return None,
        f => BunkerEvent::Closed(format!("the bunker sent an unexpected {} frame", f.kind().name())),
    })
}

impl BunkerSession for SimBunkerSession {
    fn position(&self) -> BunkerPosition {
        self.position
    }

    fn restart_at(&mut self, lsn: Lsn) -> Result<BunkerPosition, LinkError> {
        self.queue(&Frame::Control(ControlMsg::RestartAt { lsn: lsn.0 }))?;
        loop {
            self.turn()?;
            // As `TcpBunkerSession::restart_at`: acks meanwhile are passed over.
            while let Some(ev) = self.events.pop_front() {
                match ev {
                    BunkerEvent::LogInfo(p) => return Ok(p),
                    BunkerEvent::Ack(_) | BunkerEvent::Heartbeat => {}
                    BunkerEvent::Fenced { epoch, fork_lsn } => return Err(LinkError::Fenced { epoch, fork_lsn }),
                    BunkerEvent::Closed(why) => return Err(LinkError::Failed(why)),
                }
            }
            if let Some(why) = &self.broken {
                return Err(LinkError::Failed(why.clone()));
            }
        }
    }

    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.queue(&Frame::Records(records.to_vec()))?;
        self.turn()
    }

    fn watermark(&mut self, all_acked: Lsn) -> Result<(), String> {
        self.queue(&Frame::Control(ControlMsg::Watermark { all_acked_lsn: all_acked.0 }))?;
        self.turn()
    }

    fn heartbeat(&mut self) -> Result<(), String> {
        self.queue(&Frame::Heartbeat)?;
        self.turn()
    }

    fn bye(&mut self, reason: &str) {
        let _ = self.queue(&Frame::Control(ControlMsg::Bye { reason: reason.into() }));
    }

    fn event(&mut self, _wait: Duration) -> Option<BunkerEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if let Some(why) = &self.broken {
            return Some(BunkerEvent::Closed(why.clone()));
        }
        if let Err(why) = self.turn() {
            return Some(BunkerEvent::Closed(why));
        }
        self.events.pop_front()
    }
}

// ----- the target's network --------------------------------------------------------------

/// Connects shipper `i` to target `i`.
struct SimTargetConnector {
    sim: Arc<Sim>,
    i: usize,
}

impl Connector for SimTargetConnector {
    fn connect(&mut self) -> Result<Box<dyn Session>, String> {
        let i = self.i;
        let mut w = self.sim.shipper_turn(i);
        if w.dead {
            return Err("the primary crashed".into());
        }
        if w.targets[i].cut > 0 {
            w.targets[i].cut -= 1;
            return Err("simulated cut".into());
        }
        let t = w.target_core(i)?;
        w.stats.target_connections += 1;
        let generation = w.targets[i].generation;
        drop(w);
        let mut s = SimTargetSession {
            sim: self.sim.clone(),
            i,
            generation,
            position: t.position(),
            to_target: VecDeque::new(),
            to_primary: VecDeque::new(),
            enc_p: FrameEncoder::new(),
            dec_t: FrameDecoder::new(),
            enc_t: FrameEncoder::new(),
            dec_p: FrameDecoder::new(),
            handler: FrameHandler::new(),
            events: VecDeque::new(),
            broken: None,
            silence_deadline: None,
        };
        // The target speaks first after the handshake: its status, as over TCP.
        let mut out = Vec::new();
        s.enc_t.encode(&Frame::Control(t.status_msg()), &mut out).map_err(|e| e.to_string())?;
        s.dec_p.push(&out);
        match s.dec_p.next_frame() {
            Ok(Some(Frame::Control(ControlMsg::Status { .. }))) => Ok(Box::new(s)),
            f => Err(format!("the target began with {f:?} instead of its status")),
        }
    }
}

/// One connection between shipper `i` and target `i` (as `sim::replication` has it).
struct SimTargetSession {
    sim: Arc<Sim>,
    i: usize,
    generation: u64,
    position: TargetPosition,
    to_target: VecDeque<u8>,
    to_primary: VecDeque<u8>,
    enc_p: FrameEncoder,
    dec_t: FrameDecoder,
    enc_t: FrameEncoder,
    dec_p: FrameDecoder,
    handler: FrameHandler,
    events: VecDeque<Event>,
    broken: Option<String>,
    silence_deadline: Option<u64>,
}

impl SimTargetSession {
    fn break_with(&mut self, w: &mut World, why: &str) {
        if self.broken.is_none() {
            w.stats.broken += 1;
            self.broken = Some(why.to_string());
        }
    }

    /// The shipper's turn point, then one tick of this connection: part of the bytes in
    /// flight each way (on some ticks only: the target lags), with faults.
    fn tick_net(&mut self) {
        let (sim, i) = (self.sim.clone(), self.i);
        let mut w = sim.shipper_turn(i);
        if w.dead {
            return self.break_with(&mut w, "the primary crashed");
        }
        if self.broken.is_some() {
            return;
        }
        if w.targets[i].generation != self.generation {
            return self.break_with(&mut w, "the connection to the target broke (a cut or its crash)");
        }
        let (cut, outage, crash) =
            (w.cfg.target_cut_permille, w.cfg.target_outage_permille, w.cfg.target_crash_permille);
        if w.permille(outage) {
            w.targets[i].cut = w.rng.gen_range(100..1500);
            w.targets[i].generation += 1;
            return self.break_with(&mut w, "the target is unreachable");
        }
        if w.permille(cut) {
            w.targets[i].cut = w.rng.gen_range(1..40);
            w.targets[i].generation += 1;
            return self.break_with(&mut w, "simulated cut");
        }
        if w.permille(crash) {
            w.crash_target(i);
            return self.break_with(&mut w, "the target crashed");
        }
        let (d, u) = (w.cfg.target_drop_permille, w.cfg.target_dup_permille);
        if fault_bytes(&mut w, &mut self.to_target, d, u) | fault_bytes(&mut w, &mut self.to_primary, d, u) {
            let later = w.rng.gen_range(1..50);
            self.silence_deadline.get_or_insert(w.tick + later);
        }
        if self.silence_deadline.is_some_and(|t| w.tick >= t) {
            return self.break_with(&mut w, "silence after damaged bytes (the timeout)");
        }
        let moves = w.cfg.target_move_permille;
        if !w.permille(moves) {
            return;
        }
        let Some(target) = w.targets[i].core.clone() else {
            return self.break_with(&mut w, "the target is gone");
        };
        let n = w.rng.gen_range(0..=self.to_target.len());
        let chunk: Vec<u8> = self.to_target.drain(..n).collect();
        self.dec_t.push(&chunk);
        loop {
            match self.dec_t.next_frame() {
                Ok(Some(f)) => {
                    let resync_end = matches!(f, Frame::Control(ControlMsg::ResyncEnd { .. }));
                    let replies = match self.handler.handle(&target, f) {
                        Ok(replies) => replies,
                        Err(e) => return self.break_with(&mut w, &format!("the target refused a frame: {e}")),
                    };
                    if resync_end {
                        // The resync landed: the target's log restarts at its resume LSN.
                        let t = &mut w.targets[i];
                        t.restarted_at = t.restarted_at.max(target.journal().superblock().start_lsn.0);
                    }
                    for r in &replies {
                        let mut out = Vec::new();
                        self.enc_t.encode(r, &mut out).expect("encoding a reply");
                        self.to_primary.extend(out);
                    }
                }
                Ok(None) => break,
                Err(e) => return self.break_with(&mut w, &format!("the target: bad frame: {e}")),
            }
        }
        let n = w.rng.gen_range(0..=self.to_primary.len());
        let chunk: Vec<u8> = self.to_primary.drain(..n).collect();
        self.dec_p.push(&chunk);
        loop {
            match self.dec_p.next_frame() {
                Ok(Some(f)) => self.events.extend(event_of(f)),
                Ok(None) => break,
                Err(e) => return self.break_with(&mut w, &format!("the primary: bad frame from the target: {e}")),
            }
        }
    }
}

impl Session for SimTargetSession {
    fn position(&self) -> TargetPosition {
        self.position
    }

    fn send(&mut self, frame: &Frame) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        if let Frame::Control(ControlMsg::Watermark { all_acked_lsn }) = frame {
            // Still in the shipper's turn: the hub is as the shipper saw it.
            let mut w = self.sim.lock();
            if !w.dead {
                w.note_watermark(*all_acked_lsn);
            }
        }
        let mut out = Vec::new();
        self.enc_p.encode(frame, &mut out).map_err(|e| e.to_string())?;
        self.to_target.extend(out);
        self.tick_net();
        Ok(())
    }

    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.send(&Frame::Records(records.to_vec()))
    }

    fn event(&mut self, _wait: Duration) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if let Some(why) = &self.broken {
            return Some(Event::Closed(why.clone()));
        }
        self.tick_net();
        self.events.pop_front()
    }
}

/// Drops or duplicates a random run of the bytes in flight; returns whether it did.
fn fault_bytes(w: &mut World, q: &mut VecDeque<u8>, drop_permille: u32, dup_permille: u32) -> bool {
    if q.is_empty() {
        return false;
    }
    let before = q.len();
    if w.permille(drop_permille) {
        let at = w.rng.gen_range(0..q.len());
        let n = w.rng.gen_range(1..=(q.len() - at).min(64));
        q.drain(at..at + n);
    }
    if !q.is_empty() && w.permille(dup_permille) {
        let at = w.rng.gen_range(0..q.len());
        let n = w.rng.gen_range(1..=(q.len() - at).min(64));
        let dup: Vec<u8> = q.range(at..at + n).copied().collect();
        for (i, b) in dup.into_iter().enumerate() {
            q.insert(at + n + i, b);
        }
    }
    q.len() != before
}

// ----- the failover ------------------------------------------------------------------------

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
struct CatchUp {
    /// The most advanced target, whose log the others were leveled from, and where its log
    /// started.
    source: usize,
    source_start: u64,
    /// The bunker's records (as the failover saw them): `[bunker_start, bunker_next)`.
    bunker_start: u64,
    bunker_next: u64,
    /// The targets that hold and have applied every record below the end, in order.
    leveled: Vec<usize>,
    /// The targets left behind (`Action::Blocks`), with catch-up's word on each.
    behind: Vec<(usize, Action)>,
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
    fn failover(&self, w: &mut World, overflow: Option<String>) -> Result<(), String> {
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
        for &(i, action) in &c.behind {
            self.judge_blocks(w, i, action, &c)?;
        }
        self.check_sync_acked(w, end)?;
        let mut cut = false;
        let promoted = visible(w.targets[promote].tree.listing());
        for &i in &c.leveled {
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
        let before = w.listings(&c.leveled);
        w.crash_bunker();
        w.crash_targets();
        match w.run_failover_several(promote, block_bytes, None)? {
            SeveralOutcome::AlreadyDone { epoch: e, end_lsn } if e == epoch && end_lsn == end => {}
            other => return Err(format!("a second failover after promoting at epoch {epoch}, end {end}: {other:?}")),
        }
        for ((i, before), after) in c.leveled.iter().zip(&before).zip(w.listings(&c.leveled)) {
            if after != *before {
                return Err(format!("the second failover changed target {i}'s tree: {}", listing_diff(before, &after)));
            }
        }
        Ok(())
    }

    /// Invariant 1: every fsync acknowledged in sync mode is below the promoted `end`.
    fn check_sync_acked(&self, w: &World, end: u64) -> Result<(), String> {
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
    fn check_tree(&self, w: &World, i: usize, end: u64) -> Result<bool, String> {
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
    fn judge_refusal(&self, w: &mut World, i: usize, why: &str, overflow: Option<String>) -> Result<(), String> {
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
    fn judge_blocks(&self, w: &mut World, i: usize, action: Action, c: &CatchUp) -> Result<(), String> {
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

// ----- the primary's tree and workload -------------------------------------------------

/// The primary's simulated tree, which gives the link a turn before each change (the op's
/// intent is journaled by then, its outcome not yet): the interleavings a link thread running
/// beside the writers sees, within one operation.
struct TurnTree {
    sim: SimTree,
    world: OnceLock<Weak<Sim>>,
}

impl TurnTree {
    fn turn(&self) {
        if let Some(sim) = self.world.get().and_then(Weak::upgrade) {
            sim.mid_op_turn();
        }
    }
}

impl Tree for TurnTree {
    type Node = SimNode;

    fn root(&self) -> io::Result<SimNode> {
        self.sim.root()
    }
    fn open_handle(&self, handle: &Handle) -> io::Result<SimNode> {
        self.sim.open_handle(handle)
    }
    fn handle_of(&self, node: &SimNode) -> io::Result<Handle> {
        self.sim.handle_of(node)
    }
    fn lookup(&self, dir: &SimNode, name: &[u8]) -> io::Result<SimNode> {
        self.sim.lookup(dir, name)
    }
    fn create(&self, dir: &SimNode, name: &[u8], new: &NewNode<'_>) -> io::Result<SimNode> {
        self.turn();
        self.sim.create(dir, name, new)
    }
    fn link(&self, node: &SimNode, dir: &SimNode, name: &[u8]) -> io::Result<()> {
        self.turn();
        self.sim.link(node, dir, name)
    }
    fn unlink(&self, dir: &SimNode, name: &[u8], is_dir: bool) -> io::Result<()> {
        self.turn();
        self.sim.unlink(dir, name, is_dir)
    }
    fn rename(&self, dir: &SimNode, name: &[u8], new_dir: &SimNode, new_name: &[u8], flags: u32) -> io::Result<()> {
        self.turn();
        self.sim.rename(dir, name, new_dir, new_name, flags)
    }
    fn set_attr(&self, node: &SimNode, attr: &SetAttr) -> io::Result<()> {
        self.turn();
        self.sim.set_attr(node, attr)
    }
    fn write(&self, node: &SimNode, offset: u64, data: &[u8]) -> io::Result<()> {
        self.turn();
        self.sim.write(node, offset, data)
    }
    fn set_xattr(&self, node: &SimNode, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
        self.sim.set_xattr(node, name, value, flags)
    }
    fn remove_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<()> {
        self.sim.remove_xattr(node, name)
    }
    fn fallocate(&self, node: &SimNode, mode: u32, offset: u64, len: u64) -> io::Result<()> {
        self.turn();
        self.sim.fallocate(node, mode, offset, len)
    }
    fn applied_marker(&self, set_id: &[u8; 16]) -> io::Result<u64> {
        self.sim.applied_marker(set_id)
    }
    fn set_applied_marker(&self, set_id: &[u8; 16], lsn: u64) -> io::Result<()> {
        self.sim.set_applied_marker(set_id, lsn)
    }
    fn sync_all(&self) -> io::Result<()> {
        self.sim.sync_all()
    }
    fn read_dir(&self, dir: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        self.sim.read_dir(dir)
    }
    fn size(&self, node: &SimNode) -> io::Result<u64> {
        self.sim.size(node)
    }
    fn kind(&self, node: &SimNode) -> io::Result<NodeKind> {
        self.sim.kind(node)
    }
    fn get_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<Vec<u8>> {
        self.sim.get_xattr(node, name)
    }
    fn list_xattrs(&self, node: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        self.sim.list_xattrs(node)
    }
}

/// What a resync reads from the primary (as `sim::replication` has it for a plain `SimTree`).
impl Source for Primary {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        describe(&self.tree.sim, id, &node)
    }

    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.with_namespace_quiet(|| {
            let d = self.node(dir).map_err(|e| io::Error::from_raw_os_error(e.0))?;
            let mut out = Vec::new();
            for name in self.tree.read_dir(&d)? {
                let child = self.tree.lookup(&d, &name)?;
                let id = self.peek_id(&d, &name).map_err(|e| io::Error::from_raw_os_error(e.0))?;
                let mut desc = describe(&self.tree.sim, id, &child)?;
                desc.xattrs.clear();
                out.push((name, desc));
            }
            Ok(out)
        })
    }

    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        let inode = self.tree.sim.inode(&node).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let start = (offset as usize).min(inode.data.len());
        let n = buf.len().min(inode.data.len() - start);
        buf[..n].copy_from_slice(&inode.data[start..start + n]);
        Ok(n)
    }
}

fn describe(tree: &SimTree, id: FileId, node: &SimNode) -> io::Result<NodeDesc> {
    let i = tree.inode(node).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    Ok(NodeDesc {
        id: id.0,
        kind: i.kind as u8,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        size: if i.kind == NodeKind::File { i.data.len() as u64 } else { 0 },
        atime: (0, 0),
        mtime: (0, 0),
        target: i.target.clone(),
        xattrs: i
            .xattrs
            .iter()
            .filter(|(k, _)| !crate::io::is_private_xattr(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];

/// One random operation through the write path (`sim::crash::step`'s mix, over the turn-taking
/// tree); errors (ENOENT, EEXIST …) are part of the workload: the primary's tree is the truth.
fn step(core: &Primary, rng: &mut ChaCha8Rng) {
    let dir = if rng.gen_ratio(1, 4) {
        core.lookup(FileId::ROOT, b"sub").map(|(id, _)| id).unwrap_or(FileId::ROOT)
    } else {
        FileId::ROOT
    };
    let name = NAMES[rng.gen_range(0..NAMES.len())];
    let new = |kind, mode, target| NewNode { kind, mode, uid: 0, gid: 0, rdev: 0, target };
    let _: Result<(), Errno> = (|| {
        match rng.gen_range(0..100) {
            0..=14 => drop(core.create(dir, name, &new(NodeKind::File, 0o644, b""))?),
            15..=17 => drop(core.create(FileId::ROOT, b"sub", &new(NodeKind::Dir, 0o755, b""))?),
            18..=19 => drop(core.create(dir, name, &new(NodeKind::Symlink, 0o777, b"a"))?),
            20..=59 => {
                let (id, _) = core.lookup(dir, name)?;
                let len = rng.gen_range(1..6000);
                let offset = rng.gen_range(0..20_000);
                let byte: u8 = rng.r#gen();
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                core.write_via_tree(id, offset, &data)?;
            }
            60..=67 => {
                let (id, _) = core.lookup(dir, name)?;
                core.set_attr(id, &SetAttr { size: Some(rng.gen_range(0..12_000)), ..Default::default() })?;
            }
            68..=79 => {
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                let flags = [0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][rng.gen_range(0..4)];
                core.rename(dir, name, FileId::ROOT, to, flags)?;
            }
            80..=89 => core.unlink(dir, name, false)?,
            90..=94 => {
                let (id, _) = core.lookup(dir, name)?;
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                drop(core.link(id, FileId::ROOT, to)?);
            }
            _ => core.unlink(FileId::ROOT, b"sub", true)?,
        }
        Ok(())
    })();
}

// ----- the run -----------------------------------------------------------------------------

/// The tree as compared: the target's own stash excluded.
fn visible(mut l: Listing) -> Listing {
    l.retain(|k, _| !k.starts_with("/.ferryfs"));
    l
}

/// What differs between two listings, briefly.
fn listing_diff(want: &Listing, have: &Listing) -> String {
    let mut out = Vec::new();
    for (k, (kind, data)) in want {
        match have.get(k) {
            None => out.push(format!("{k}: missing")),
            Some((hk, hd)) if hk != kind || hd != data => {
                let at = data.iter().zip(hd).position(|(a, b)| a != b);
                out.push(format!(
                    "{k}: {kind:?} {} bytes vs {hk:?} {} bytes, first difference at {at:?}",
                    data.len(),
                    hd.len()
                ))
            }
            _ => {}
        }
    }
    out.extend(have.keys().filter(|k| !want.contains_key(*k)).map(|k| format!("{k}: extra")));
    out.join("; ")
}

fn link_config() -> BunkerConfig {
    let mut c = BunkerConfig::new("sim://bunker", Mode::Sync, Unreachable::Degrade, NEVER);
    c.timing = LinkTiming {
        heartbeat_every: NEVER,
        watermark_every: Duration::ZERO,
        backoff_min: Duration::ZERO,
        backoff_max: Duration::ZERO,
        idle_wait: Duration::ZERO,
    };
    c
}

/// The hub's retention, noting when it lets a target go (a journal overflow).
struct NotedRelease {
    hub: Arc<Hub<SimStorage>>,
    sim: Weak<Sim>,
}

impl Retention for NotedRelease {
    fn floor(&self) -> Option<Lsn> {
        self.hub.floor()
    }

    fn release(&self) {
        self.hub.release();
        let Some(sim) = self.sim.upgrade() else { return };
        for (link, noted) in self.hub.links.iter().zip(&sim.target_released) {
            if link.lock().released {
                noted.store(true, Ordering::Release);
            }
        }
    }
}

/// The link's hooks as a mount wires them (`cmd::replication::bunker_hooks`), with the
/// primary's crash as the fence that ends the link's thread, and the own-ack watermarks noted.
fn link_hooks(hub: Arc<Hub<SimStorage>>, sim: Weak<Sim>) -> Hooks {
    let dead = sim.clone();
    Hooks {
        targets_acked_below: Box::new(move || {
            let acked = hub.links.iter().filter_map(|l| l.bunker_floor()).min();
            if acked.is_none()
                && let Some(sim) = sim.upgrade()
                && let Some(link) = sim.link()
            {
                sim.own_floor_max.fetch_max(link.snapshot().acked_below.0, Ordering::AcqRel);
            }
            acked
        }),
        fenced: Box::new(move || {
            let crashed = dead.upgrade().is_none_or(|s| s.dead.load(Ordering::Acquire));
            crashed.then(|| (0, 0, "the simulated primary crashed".to_string()))
        }),
        on_fenced: Box::new(|_, _, _| {}),
    }
}

/// Runs one seed: workload and faults until the primary's crash, then the failover and its
/// invariants. `Err` says which broke and where.
pub fn run_failover_seed(seed: u64, cfg: &FailoverConfig) -> Result<FailoverStats, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cfg = *cfg;
    if rng.gen_range(0..1000) < cfg.sparse_fsync_permille {
        cfg.fsync_permille = rng.gen_range(1..6);
    }
    let crash_at = rng.gen_range(cfg.crash_tick_min..=cfg.crash_tick_max);
    let world_seed: u64 = rng.r#gen();
    let n = rng.gen_range(1..=cfg.targets_max.max(1));
    if n > 1 && rng.gen_range(0..1000) < cfg.small_target_log_permille {
        cfg.target_geometry = cfg.primary_geometry;
    }
    let cfg = &cfg;
    let storage = SimStorage::new();
    let tree = TurnTree { sim: SimTree::new(), world: OnceLock::new() };
    let opened = recovery::create(storage, cfg.primary_geometry, new_superblock()).map_err(|e| e.to_string())?;
    let primary = Arc::new(
        Core::new(opened.journal, tree, IdTable::from_snapshot(opened.ids.snapshot()), CoreConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let maps = (0..n).map(|i| (format!("sim://target{i}"), Lsn(0), SyncMap::new_needing_full_sync())).collect();
    let hub = Hub::new(primary.journal.clone(), maps);
    primary.set_marks(hub.clone());
    hub.persist()?;
    let set_id = primary.journal.superblock().set_id;
    let cursor = primary.journal.cursor_at(Lsn(1)).map_err(|e| e.to_string())?;
    let model = Model {
        records: Vec::new(),
        offsets: Vec::new(),
        cursor,
        states: vec![(1, visible(primary.tree.sim.listing()))],
        sync_acked: Vec::new(),
    };
    let stop_shipper = Arc::new(AtomicBool::new(false));
    let world = World {
        rng: ChaCha8Rng::seed_from_u64(world_seed),
        cfg: *cfg,
        tick: 0,
        crash_at,
        // The link's thread runs first, up to its first call to its session.
        turn: Turn::Link,
        fsync: None,
        dead: false,
        primary: primary.clone(),
        set_id,
        target_modes: vec![None; n],
        link_degraded: false,
        model,
        bunker: BunkerNode { storage: SimStorage::new(), core: None, down: 0, cut: 0, generation: 0 },
        targets: (0..n).map(|_| TargetNode::new()).collect::<Result<_, _>>()?,
        hub: hub.clone(),
        stats: FailoverStats { targets: n as u64, several: (n > 1) as u64, ..FailoverStats::default() },
        failure: None,
    };
    let sim = Arc::new(Sim {
        world: Mutex::new(world),
        turn_changed: Condvar::new(),
        dead: AtomicBool::new(false),
        stop_shipper: stop_shipper.clone(),
        link: OnceLock::new(),
        own_floor_max: AtomicU64::new(0),
        target_released: (0..n).map(|_| AtomicBool::new(false)).collect(),
        seed,
    });
    let link = BunkerLink::new(primary.journal.clone(), link_config(), link_hooks(hub.clone(), Arc::downgrade(&sim)));
    let _ = sim.link.set(Arc::downgrade(&link));
    let _ = primary.tree.world.set(Arc::downgrade(&sim));
    primary.journal.set_mirror(link.clone());
    let noted = Arc::new(NotedRelease { hub: hub.clone(), sim: Arc::downgrade(&sim) });
    let retention: Vec<Arc<dyn Retention>> = vec![noted, link.clone()];
    primary.journal.set_retention(Arc::new(AllRetentions(retention)));
    link.start(Box::new(SimBunkerConnector { sim: sim.clone(), epoch: primary.journal.epoch() }));
    drop(sim.wait_turn(sim.lock(), Turn::Main));
    let timing = Timing {
        sync_every: Duration::ZERO,
        heartbeat_every: NEVER,
        backoff_min: Duration::ZERO,
        backoff_max: Duration::ZERO,
        idle_wait: Duration::ZERO,
        silence_max: NEVER,
        watermark_every: Duration::ZERO,
        watermark_refresh: NEVER,
    };
    // One shipper per target, each on its own thread, which runs first up to its first call
    // to its connector (module docs).
    let mut shippers = Vec::new();
    for i in 0..n {
        let shipper = Shipper {
            hub: hub.clone(),
            link: hub.links[i].clone(),
            source: primary.clone(),
            stop: stop_shipper.clone(),
            timing,
        };
        {
            let mut w = sim.lock();
            sim.hand_turn(&mut w, Turn::Shipper(i));
        }
        let s = sim.clone();
        let thread = std::thread::Builder::new().name(format!("sim-shipper-{i}")).spawn(move || {
            let connector = Box::new(SimTargetConnector { sim: s.clone(), i });
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shipper.run(connector)));
            // A shipper returns only once the primary is dead; if it did before, or panicked,
            // the main thread waiting for its turn is let go.
            let mut w = s.lock();
            if run.is_err() {
                w.fail(format!("the shipper of target {i} panicked (see above)"));
            } else if !w.dead {
                w.fail(format!("the shipper of target {i} returned while the primary was alive"));
            }
            if !w.dead {
                s.die(&mut w);
            }
        });
        shippers.push(thread.map_err(|e| format!("starting a shipper's thread: {e}"))?);
        drop(sim.wait_turn(sim.lock(), Turn::Main));
    }
    while sim.main_tick() {}
    // The shippers return once the primary is dead; the link's thread ends at its next turn
    // point (its fence hook says so); then both are joined.
    if !sim.dead.load(Ordering::Acquire) {
        let mut w = sim.lock();
        sim.die(&mut w);
    }
    for (i, t) in shippers.into_iter().enumerate() {
        if t.join().is_err() {
            return Err(format!("the shipper of target {i}'s thread panicked"));
        }
    }
    let until = Instant::now() + TURN_WAIT_MAX;
    while link.snapshot().fenced_epoch.is_none() {
        if Instant::now() > until {
            return Err("the link's thread did not end after the primary's crash".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let snap = link.snapshot();
    link.stop();
    let overflow = snap.last_error.filter(|e| e.contains("overflowed"));
    let mut w = sim.lock();
    w.target_modes = hub.links.iter().map(|l| Some(l.lock().map.mode())).collect();
    w.link_degraded = snap.degraded.is_some();
    if overflow.is_some() {
        w.stats.overflows += 1;
    }
    if let Some(f) = w.failure.take() {
        return Err(f);
    }
    sim.failover(&mut w, overflow).map_err(|e| format!("{e} (primary crashed at tick {crash_at}, {n} targets)"))?;
    Ok(w.stats.clone())
}
