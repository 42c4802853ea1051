//! The shipper and a target in the deterministic simulation: the production `Shipper`, `Hub`,
//! `TargetCore` and frame codecs, over a simulated network, with a random workload on a
//! simulated primary, all on one thread.
//!
//! **Fault model** of the network (a TCP connection, so faults show as a broken connection):
//! - *delay*: each tick moves only a random part of the bytes in flight, in either direction;
//! - *drop*: a random run of bytes in flight is lost; the receiver's frame decoder finds a bad
//!   magic, crc or sequence number and the connection closes (as it must: a gap is loud);
//! - *duplicate*: a run of bytes is delivered twice; the same;
//! - *cut*: the connection closes and new connections fail for a while;
//! - *target crash*: the target process dies (its log keeps what it flushed; its directory
//!   everything: a process crash) and restarts from its state.
//!
//! Nothing waits on wall time: the shipper's clocks are set so that no decision depends on
//! them (it syncs whenever it has records to send, sends no heartbeats, never times out),
//! and every step of the workload and the network happens inside the shipper's own calls to
//! the session, driven by one seeded generator. **Invariant**: after the faults stop and the
//! network heals, the target's directory equals the primary's backing tree.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::crash::{SeedStats, new_superblock, step};
use super::listing::{listing_diff, visible};
use super::storage::SimStorage;
use super::tree::SimTree;
use super::wire::{FaultDraws, Wire};
use crate::journal::{JournalGeometry, recovery};
use crate::passthrough::{Core, CoreConfig, IdTable};
use crate::proto::wire::Frame;
use crate::replica::target::{FrameHandler, TargetCore, TargetPosition};
use crate::ship::hub::Hub;
use crate::ship::session::{Connector, Event, Session, event_of};
use crate::ship::shipper::{Shipper, Timing};
use crate::syncmap::SyncMap;
use crate::types::Lsn;

type Primary = Core<SimStorage, SimTree>;
type Target = TargetCore<SimStorage, SimTree>;

/// Knobs of one run.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    /// Ticks with workload and faults; then the network heals.
    pub fault_ticks: u32,
    /// Per tick, in 1/1000: a workload op, a drop, a duplicate, a cut, a target crash.
    pub op_permille: u32,
    pub drop_permille: u32,
    pub dup_permille: u32,
    pub cut_permille: u32,
    pub crash_permille: u32,
    /// Ticks allowed after healing before the run counts as not converging.
    pub heal_ticks: u32,
    pub geometry: JournalGeometry,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            fault_ticks: 3000,
            op_permille: 300,
            drop_permille: 3,
            dup_permille: 3,
            cut_permille: 3,
            crash_permille: 2,
            heal_ticks: 20_000,
            geometry: JournalGeometry { segment_size: 64 << 10, segment_count: 8 },
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct NetStats {
    pub ops: u64,
    pub connections: u64,
    pub broken: u64,
    pub target_crashes: u64,
    pub ticks: u64,
}

/// Everything the simulation owns, shared by the connector and its sessions.
struct World {
    rng: ChaCha8Rng,
    cfg: NetConfig,
    primary: Arc<Primary>,
    target_storage: SimStorage,
    target_tree: SimTree,
    target: Option<Arc<Target>>,
    stats: NetStats,
    workload: SeedStats,
    /// Ticks left during which connecting fails (a cut).
    down: u32,
    tick: u64,
    healed_at: Option<u64>,
    converged: bool,
    failure: Option<String>,
    stop: Arc<AtomicBool>,
    /// The target's resync staging files (the one part of a target that is plain files, not
    /// the storage seam).
    state_dir: tempfile::TempDir,
}

impl World {
    fn healed(&self) -> bool {
        self.tick >= self.cfg.fault_ticks as u64
    }

    fn permille(&mut self, p: u32) -> bool {
        !self.healed() && self.rng.gen_range(0..1000) < p
    }

    /// What the network's faults (`sim::wire`) draw from this tick: none once healed.
    fn fault_draws(&mut self) -> FaultDraws<'_> {
        FaultDraws { faults_on: !self.healed(), rng: &mut self.rng, tick: self.tick }
    }

    fn target(&mut self) -> Result<Arc<Target>, String> {
        if let Some(t) = &self.target {
            return Ok(t.clone());
        }
        let has_log = crate::io::Storage::read_superblock(&self.target_storage).ok().flatten().is_some();
        let core = if has_log {
            Target::open(self.target_storage.clone(), self.target_tree.clone(), self.state_dir.path())
        } else {
            let set_id = self.primary.journal.superblock().set_id;
            let g = JournalGeometry { segment_size: 64 << 10, segment_count: 16 };
            Target::create(self.target_storage.clone(), g, set_id, self.target_tree.clone(), self.state_dir.path())
        }
        .map_err(|e| format!("target: {e}"))?;
        let core = Arc::new(core);
        self.target = Some(core.clone());
        Ok(core)
    }

    /// One step of the world besides the network: workload, target apply, target crash,
    /// and, once healed, the convergence check.
    fn tick_world(&mut self) {
        self.tick += 1;
        self.stats.ticks += 1;
        let op = self.cfg.op_permille;
        if self.permille(op) {
            let mut rng = ChaCha8Rng::seed_from_u64(self.rng.r#gen());
            step(&self.primary, &mut rng, &mut self.workload);
            self.stats.ops += 1;
        }
        if let Some(t) = self.target.clone() {
            if let Err(e) = t.apply_available() {
                self.failure = Some(format!("tick {}: target apply failed: {e}", self.tick));
                self.stop.store(true, Ordering::Release);
            }
            if self.rng.gen_ratio(1, 50) {
                let _ = t.checkpoint();
            }
        }
        if self.healed() {
            let at = *self.healed_at.get_or_insert(self.tick);
            if self.tick.is_multiple_of(50) && self.check_converged() {
                self.converged = true;
                self.stop.store(true, Ordering::Release);
            } else if self.tick - at > self.cfg.heal_ticks as u64 {
                self.failure = Some(format!(
                    "no convergence {} ticks after healing (target applied below {:?} [{:?}], primary next {}, settled {:?}): {}",
                    self.cfg.heal_ticks,
                    self.target.as_ref().map(|t| t.position()),
                    self.target.as_ref().map(|t| t.apply_state()),
                    self.primary.journal.next_lsn().0,
                    self.primary.journal.settled(),
                    listing_diff(&self.primary.tree.listing(), &self.target_tree.listing())
                ));
                self.stop.store(true, Ordering::Release);
            }
        }
    }

    fn check_converged(&mut self) -> bool {
        let _ = self.primary.sync();
        let Some(t) = self.target.clone() else { return false };
        let p = t.position();
        if p.applied_next < self.primary.journal.next_lsn().0 {
            return false;
        }
        visible(self.primary.tree.listing()) == visible(self.target_tree.listing())
    }

    fn crash_target(&mut self) {
        if self.target.take().is_some() {
            self.target_storage.crash_process();
            self.stats.target_crashes += 1;
        }
    }
}

struct SimConnector(Arc<Mutex<World>>);

impl Connector for SimConnector {
    fn connect(&mut self) -> Result<Box<dyn Session>, String> {
        let mut w = self.0.lock().unwrap();
        w.tick_world();
        if w.down > 0 {
            w.down -= 1;
            return Err("simulated cut".into());
        }
        let t = w.target()?;
        w.stats.connections += 1;
        let position = t.position();
        let mut s = SimSession {
            world: self.0.clone(),
            position,
            wire: Wire::new(),
            handler: FrameHandler::new(),
            events: VecDeque::new(),
            broken: None,
        };
        // The target speaks first after the handshake: its status, as over TCP.
        s.queue_to_primary(&Frame::Control(t.status_msg()));
        let first = s.pump_until_frame();
        match first {
            Some(Frame::Control(crate::proto::wire::control::ControlMsg::Status { .. })) => Ok(Box::new(s)),
            _ => Err("the connection broke before the target's status".into()),
        }
    }
}

struct SimSession {
    world: Arc<Mutex<World>>,
    position: TargetPosition,
    /// The bytes each way: the primary's frames to the target, the target's replies.
    wire: Wire,
    handler: FrameHandler,
    events: VecDeque<Event>,
    broken: Option<String>,
}

impl SimSession {
    fn queue_to_primary(&mut self, f: &Frame) {
        self.wire.to_primary.send(f).expect("encoding a reply");
    }

    /// Moves the first frame the primary receives (status), fault-free.
    fn pump_until_frame(&mut self) -> Option<Frame> {
        self.wire.to_primary.deliver_all();
        self.wire.to_primary.receive().ok().flatten()
    }

    /// One tick of the network: part of the bytes in flight each way, with faults.
    fn tick_net(&mut self) {
        let world = self.world.clone();
        let mut w = world.lock().unwrap();
        w.tick_world();
        if self.broken.is_some() {
            return;
        }
        let (cut, crash) = (w.cfg.cut_permille, w.cfg.crash_permille);
        if w.permille(cut) {
            w.down = w.rng.gen_range(1..20);
            self.break_with("simulated cut", &mut w);
            return;
        }
        if w.permille(crash) {
            w.crash_target();
            self.break_with("the target crashed", &mut w);
            return;
        }
        let (drop_p, dup_p) = (w.cfg.drop_permille, w.cfg.dup_permille);
        if self.wire.damage(w.fault_draws(), drop_p, dup_p) {
            self.break_with("silence after damaged bytes (the timeout)", &mut w);
            return;
        }
        self.wire.to_peer.deliver_some(&mut w.rng);
        let Some(target) = w.target.clone() else {
            self.break_with("no target", &mut w);
            return;
        };
        drop(w);
        loop {
            match self.wire.to_peer.receive() {
                Ok(Some(f)) => match self.handler.handle(&target, f) {
                    Ok(replies) => replies.iter().for_each(|r| self.queue_to_primary(r)),
                    Err(e) => return self.break_now(format!("target refused a frame: {e}")),
                },
                Ok(None) => break,
                Err(e) => return self.break_now(format!("target: bad frame: {e}")),
            }
        }
        self.wire.to_primary.deliver_some(&mut self.world.lock().unwrap().rng);
        loop {
            match self.wire.to_primary.receive() {
                Ok(Some(f)) => self.events.extend(event_of(f)),
                Ok(None) => break,
                Err(e) => return self.break_now(format!("primary: bad frame: {e}")),
            }
        }
    }

    fn break_with(&mut self, why: &str, w: &mut World) {
        w.stats.broken += 1;
        self.broken = Some(why.to_string());
    }

    fn break_now(&mut self, why: String) {
        self.world.lock().unwrap().stats.broken += 1;
        self.broken = Some(why);
    }
}

impl Session for SimSession {
    fn position(&self) -> TargetPosition {
        self.position
    }

    fn send(&mut self, frame: &Frame) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        self.wire.to_peer.send(frame)?;
        if let Frame::Control(c) = frame {
            tracing::trace!("sim send {c:?}");
        }
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
        if let Some(why) = self.broken.take() {
            return Some(Event::Closed(why));
        }
        self.tick_net();
        self.events.pop_front()
    }
}

/// Runs one seed: workload and faults for `fault_ticks`, then heal and require convergence.
pub fn run_net_seed(seed: u64, cfg: &NetConfig) -> Result<NetStats, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let storage = SimStorage::new();
    let tree = SimTree::new();
    let opened = recovery::create(storage.clone(), cfg.geometry, new_superblock()).map_err(|e| e.to_string())?;
    let primary = Arc::new(
        Core::new(opened.journal, tree, IdTable::from_snapshot(opened.ids.snapshot()), CoreConfig::default())
            .map_err(|e| e.to_string())?,
    );
    let hub =
        Hub::new(primary.journal.clone(), vec![("sim://target".into(), Lsn(0), SyncMap::new_needing_full_sync())]);
    primary.set_marks(hub.clone());
    primary.journal.set_retention(hub.clone());
    hub.persist()?;
    let stop = Arc::new(AtomicBool::new(false));
    let world = Arc::new(Mutex::new(World {
        rng: ChaCha8Rng::seed_from_u64(rng.r#gen()),
        cfg: *cfg,
        primary: primary.clone(),
        target_storage: SimStorage::new(),
        target_tree: SimTree::new(),
        target: None,
        stats: NetStats::default(),
        workload: SeedStats::default(),
        down: 0,
        tick: 0,
        healed_at: None,
        converged: false,
        failure: None,
        stop: stop.clone(),
        state_dir: tempfile::tempdir().map_err(|e| e.to_string())?,
    }));
    let timing = Timing {
        sync_every: Duration::ZERO,
        heartbeat_every: Duration::from_secs(1 << 30),
        backoff_min: Duration::ZERO,
        backoff_max: Duration::ZERO,
        idle_wait: Duration::ZERO,
        silence_max: Duration::from_secs(1 << 30),
        ..Timing::default()
    };
    let shipper = Shipper { hub: hub.clone(), link: hub.links[0].clone(), source: primary.clone(), stop, timing };
    shipper.run(Box::new(SimConnector(world.clone())));
    let w = world.lock().unwrap();
    if let Some(f) = &w.failure {
        return Err(f.clone());
    }
    if !w.converged {
        return Err("the shipper stopped before the target converged".into());
    }
    Ok(w.stats.clone())
}
