//! The simulated world and its turn-taking: the nodes (the primary and its model, the bunker,
//! the targets) with their crashes and faults (`World`), and the `Sim` the main thread, the
//! link's thread and the shippers' threads share, which hands the one turn between them and
//! drives the ticks (the module docs: determinism with real threads).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::Model;
use super::{Bunker, FailoverConfig, FailoverStats, Link, Primary, TURN_WAIT_MAX, Target};
use crate::io::Storage;
use crate::replica::bunker::BunkerCore;
use crate::ship::hub::Hub;
use crate::sim::listing::{listing_diff, visible};
use crate::sim::primary::step;
use crate::sim::storage::SimStorage;
use crate::sim::tree::SimTree;
use crate::sim::wire::FaultDraws;
use crate::syncmap::Mode as MapMode;
use crate::types::Lsn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Turn {
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
pub(super) struct PendingFsync {
    below: Lsn,
    released: Option<Released>,
}

pub(super) struct BunkerNode {
    pub(super) storage: SimStorage,
    pub(super) core: Option<Arc<Bunker>>,
    /// Ticks until the crashed process is back.
    pub(super) down: u32,
    /// Ticks during which connecting fails (a cut).
    pub(super) cut: u32,
    /// Bumped by a cut or a crash: a session of an older generation is broken.
    pub(super) generation: u64,
}

pub(super) struct TargetNode {
    storage: SimStorage,
    pub(super) tree: SimTree,
    pub(super) core: Option<Arc<Target>>,
    pub(super) cut: u32,
    pub(super) generation: u64,
    /// The target's staging files (the one part of a target that is plain files).
    state_dir: tempfile::TempDir,
    /// Times its log let go of records the watermark held (`LogFloor::release`), summed over
    /// the processes that crashed (the count lives in memory).
    log_overflows: u64,
    /// One past the highest all-acked watermark a shipper sent (to any target) while this
    /// target did not hold it back (`Link::watermark_hold` was `None`): a target's log may
    /// free records below it that this one lacks.
    pub(super) unheld_below: u64,
    /// The highest LSN a resync that landed here restarted its log at (its log holds
    /// nothing below it from then on).
    pub(super) restarted_at: u64,
}

impl TargetNode {
    pub(super) fn new() -> Result<TargetNode, String> {
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
    pub(super) fn overflows(&self) -> u64 {
        self.log_overflows + self.core.as_ref().map_or(0, |c| c.watermark_hold().overflows)
    }
}

pub(super) struct World {
    pub(super) rng: ChaCha8Rng,
    pub(super) cfg: FailoverConfig,
    pub(super) tick: u64,
    pub(super) crash_at: u64,
    pub(super) turn: Turn,
    pub(super) fsync: Option<PendingFsync>,
    pub(super) dead: bool,
    pub(super) primary: Arc<Primary>,
    pub(super) set_id: [u8; 16],
    /// Each target's sync map mode when the primary crashed.
    pub(super) target_modes: Vec<Option<MapMode>>,
    /// Whether the bunker link was degraded to async when the primary crashed.
    pub(super) link_degraded: bool,
    pub(super) model: Model,
    pub(super) bunker: BunkerNode,
    pub(super) targets: Vec<TargetNode>,
    pub(super) hub: Arc<Hub<SimStorage>>,
    pub(super) stats: FailoverStats,
    pub(super) failure: Option<String>,
}

impl World {
    pub(super) fn permille(&mut self, p: u32) -> bool {
        self.rng.gen_range(0..1000) < p
    }

    /// What the networks' faults (`sim::wire`) draw from this tick.
    pub(super) fn fault_draws(&mut self) -> FaultDraws<'_> {
        FaultDraws { rng: &mut self.rng, tick: self.tick, faults_on: true }
    }

    pub(super) fn fail(&mut self, why: String) {
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

    pub(super) fn bunker_core(&mut self) -> Result<Arc<Bunker>, String> {
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

    pub(super) fn target_core(&mut self, i: usize) -> Result<Arc<Target>, String> {
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
    pub(super) fn note_watermark(&mut self, all_acked_lsn: u64) {
        for (link, t) in self.hub.links.iter().zip(self.targets.iter_mut()) {
            if link.watermark_hold().is_none() {
                t.unheld_below = t.unheld_below.max(all_acked_lsn + 1);
            }
        }
    }

    pub(super) fn crash_bunker(&mut self) {
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

    pub(super) fn crash_target(&mut self, i: usize) {
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
pub(super) struct Sim {
    pub(super) world: Mutex<World>,
    pub(super) turn_changed: Condvar,
    /// The primary crashed: read by the link's hooks, which run outside the world's lock.
    pub(super) dead: AtomicBool,
    pub(super) stop_shipper: Arc<AtomicBool>,
    pub(super) link: OnceLock<Weak<Link>>,
    /// The highest floor a watermark made of the bunker's own acks (no target in ordered mode)
    /// could give the bunker's log.
    pub(super) own_floor_max: AtomicU64,
    /// Per target: the journal overflowed while it lagged: the hub let it go (it resyncs).
    pub(super) target_released: Vec<AtomicBool>,
    pub(super) seed: u64,
}

impl Sim {
    pub(super) fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn link(&self) -> Option<Arc<Link>> {
        self.link.get().and_then(Weak::upgrade)
    }

    pub(super) fn wait_turn<'a>(&self, mut w: MutexGuard<'a, World>, who: Turn) -> MutexGuard<'a, World> {
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

    pub(super) fn hand_turn(&self, w: &mut World, to: Turn) {
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

    pub(super) fn die(&self, w: &mut World) {
        w.dead = true;
        self.dead.store(true, Ordering::Release);
        self.stop_shipper.store(true, Ordering::Release);
        self.turn_changed.notify_all();
    }

    /// One tick of the main thread: the workload, the targets' apply, then one turn of the
    /// link and one of each shipper, in order. The main thread holds the turn when it calls
    /// this. Returns whether the primary is alive.
    pub(super) fn main_tick(&self) -> bool {
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
    pub(super) fn shipper_turn(&self, i: usize) -> MutexGuard<'_, World> {
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
    pub(super) fn mid_op_turn(&self) {
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
    pub(super) fn link_turn(&self) -> Result<MutexGuard<'_, World>, String> {
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
