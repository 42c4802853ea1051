//! The simulated networks: the bunker link's connector and session to the bunker (its frame
//! handling mirrored from `net::bunker`), each shipper's connector and session to its target
//! (the production `FrameHandler`), and the faults on the bytes in flight. Every call to a
//! session or a connector is its thread's turn point.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::Bunker;
use super::world::{Sim, World};
use crate::proto::wire::Frame;
use crate::proto::wire::control::ControlMsg;
use crate::replica::target::{FrameHandler, TargetPosition};
use crate::ship::bunker::{BunkerConnector, BunkerEvent, BunkerPosition, BunkerSession, LinkError, Waker};
use crate::ship::session::{Connector, Event, Session, event_of};
use crate::sim::wire::Wire;
use crate::types::Lsn;

// ----- the bunker's network --------------------------------------------------------------

pub(super) struct SimBunkerConnector {
    pub(super) sim: Arc<Sim>,
    pub(super) epoch: u64,
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
            wire: Wire::new(),
            events: VecDeque::new(),
            broken: None,
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
    /// The bytes each way: the primary's frames to the bunker, the bunker's replies.
    wire: Wire,
    events: VecDeque<BunkerEvent>,
    broken: Option<String>,
}

impl SimBunkerSession {
    /// The bunker's first two frames (`Status`, `LogInfo`) through the codecs, fault-free, read
    /// as `TcpBunkerConnector` reads them.
    fn greeting(&mut self, core: &Bunker) -> Result<BunkerPosition, LinkError> {
        for m in [core.status_msg(), core.log_info(true)] {
            self.wire.to_primary.send(&Frame::Control(m)).map_err(LinkError::Failed)?;
        }
        self.wire.to_primary.deliver_all();
        let mut next = || self.wire.to_primary.receive().ok().flatten();
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
        self.wire.to_peer.send(f)
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
        if self.wire.damage(w.fault_draws(), d, u) {
            return self.break_with(w, "silence after damaged bytes (the timeout)");
        }
        let Some(core) = w.bunker.core.clone() else {
            return self.break_with(w, "the bunker is gone");
        };
        self.wire.to_peer.deliver_some(&mut w.rng);
        loop {
            match self.wire.to_peer.receive() {
                Ok(Some(f)) => match bunker_frame(&core, self.epoch, f) {
                    Ok(Some(reply)) => self.wire.to_primary.send(&reply).expect("encoding a reply"),
                    Ok(None) => {}
                    Err(e) => return self.break_with(w, &format!("the bunker closed the connection: {e}")),
                },
                Ok(None) => break,
                Err(e) => return self.break_with(w, &format!("the bunker: bad frame: {e}")),
            }
        }
        self.wire.to_primary.deliver_some(&mut w.rng);
        loop {
            match self.wire.to_primary.receive() {
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

/// A frame from the bunker as the link's event (`ship::bunker::tcp::read_events`).
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
pub(super) struct SimTargetConnector {
    pub(super) sim: Arc<Sim>,
    pub(super) i: usize,
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
            wire: Wire::new(),
            handler: FrameHandler::new(),
            events: VecDeque::new(),
            broken: None,
        };
        // The target speaks first after the handshake: its status, as over TCP.
        s.wire.to_primary.send(&Frame::Control(t.status_msg()))?;
        s.wire.to_primary.deliver_all();
        match s.wire.to_primary.receive() {
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
    /// The bytes each way: the shipper's frames to the target, the target's replies.
    wire: Wire,
    handler: FrameHandler,
    events: VecDeque<Event>,
    broken: Option<String>,
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
        if self.wire.damage(w.fault_draws(), d, u) {
            return self.break_with(&mut w, "silence after damaged bytes (the timeout)");
        }
        let moves = w.cfg.target_move_permille;
        if !w.permille(moves) {
            return;
        }
        let Some(target) = w.targets[i].core.clone() else {
            return self.break_with(&mut w, "the target is gone");
        };
        self.wire.to_peer.deliver_some(&mut w.rng);
        loop {
            match self.wire.to_peer.receive() {
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
                        self.wire.to_primary.send(r).expect("encoding a reply");
                    }
                }
                Ok(None) => break,
                Err(e) => return self.break_with(&mut w, &format!("the target: bad frame: {e}")),
            }
        }
        self.wire.to_primary.deliver_some(&mut w.rng);
        loop {
            match self.wire.to_primary.receive() {
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
        self.wire.to_peer.send(frame)?;
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
