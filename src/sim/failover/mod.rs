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
//!
//! **Layout.** This file: the knobs (`FailoverConfig`), the counters (`FailoverStats`) and the
//! run of one seed (`run_failover_seed`: the wiring of the primary, the link, the shippers and
//! their threads). `world`: the nodes, their faults and the turn-taking (`World`, `Sim`); `net`:
//! the simulated connections to the bunker and the targets; `primary`: the primary's tree (the
//! workload and the resync source over it are `sim::primary`'s); `model`: what the primary did and the invariant checks; `runs`: the failover runs
//! and what follows the primary's crash.

mod model;
mod net;
mod primary;
mod runs;
mod world;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::journal::{AllRetentions, JournalGeometry, Retention, recovery};
use crate::passthrough::{Core, CoreConfig, IdTable};
use crate::replica::bunker::BunkerCore;
use crate::replica::target::TargetCore;
use crate::ship::bunker::{BunkerConfig, BunkerLink, Hooks, Mode, Timing as LinkTiming, Unreachable};
use crate::ship::hub::Hub;
use crate::ship::shipper::{Shipper, Timing};
use crate::sim::crash::new_superblock;
use crate::sim::listing::{Listing, visible};
use crate::sim::storage::SimStorage;
use crate::sim::tree::SimTree;
use crate::syncmap::SyncMap;
use crate::types::Lsn;
use model::Model;
use net::{SimBunkerConnector, SimTargetConnector};
use primary::TurnTree;
use world::{BunkerNode, Sim, TargetNode, Turn, World};

type Primary = Core<SimStorage, TurnTree>;
type Target = TargetCore<SimStorage, SimTree>;
type Bunker = BunkerCore<SimStorage>;
type Link = BunkerLink<SimStorage>;

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
    /// Of those left behind, the ones a block-level resync from the most advanced target
    /// leveled (all but those behind a source left mixed past its end).
    pub blocks_resynced: u64,
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
        self.blocks_resynced += o.blocks_resynced;
        self.promote_behind += o.promote_behind;
    }
}

// ----- one seed's run ----------------------------------------------------------------------

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
