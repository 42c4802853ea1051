//! A shipper's connection to one target, whatever carries it: TCP to `ferryfs target`, or a
//! target core in this process applying to a locally mounted directory (`--target DIR`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::journal::JournalGeometry;
use crate::net::conn::{self, NetError, Writer};
use crate::os::storage::DirStorage;
use crate::os::tree::OsTree;
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Frame, HandshakeConfig, Key, Role};
use crate::replica::target::{FrameHandler, TargetCore, TargetPosition};
use crate::types::Lsn;

/// What the target sent back.
#[derive(Debug)]
pub enum Event {
    Ack(Lsn),
    ResyncDone(u64),
    Heartbeat,
    /// A piece of a failing-back old primary's changes past the fork (`ControlMsg::DirtyMap`).
    DirtyMap(Vec<u8>, bool),
    /// Where the target's log stands (its `LogInfo`, the answer to a `Watermark`): the oldest
    /// record it holds and the next it expects.
    TargetLog {
        start: u64,
        next: u64,
    },
    Closed(String),
}

pub trait Session: Send {
    /// Where the target stood when the session began.
    fn position(&self) -> TargetPosition;
    fn send(&mut self, frame: &Frame) -> Result<(), String>;
    fn send_records(&mut self, records: &[u8]) -> Result<(), String>;
    /// The next event, waiting at most `wait`; `None` when there is none yet.
    fn event(&mut self, wait: Duration) -> Option<Event>;
    /// The protocol minor both sides speak (a target in this process speaks ours).
    fn minor(&self) -> u16 {
        crate::proto::wire::PROTOCOL_VERSION.minor
    }
}

/// Opens sessions to one target.
pub trait Connector: Send {
    fn connect(&mut self) -> Result<Box<dyn Session>, String>;
    /// Set once the peer said a failover fenced it (`ControlMsg::Fenced`): (epoch, fork LSN).
    fn fenced(&self) -> Option<(u64, u64)> {
        None
    }
}

// ----- TCP ---------------------------------------------------------------------------------

pub struct TcpConnector {
    pub addr: SocketAddr,
    pub set_id: [u8; 16],
    pub epoch: u64,
    pub key: Option<Key>,
    /// The peer's `Fenced` (epoch, fork), from the handshake or from any later frame.
    pub fence: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
}

impl TcpConnector {
    pub fn new(addr: SocketAddr, set_id: [u8; 16], epoch: u64, key: Option<Key>) -> TcpConnector {
        TcpConnector { addr, set_id, epoch, key, fence: Default::default() }
    }
}

/// How long a target may stay silent (no ack, no heartbeat) before the connection is dropped.
pub const TARGET_SILENCE_MAX: Duration = Duration::from_secs(10);

impl Connector for TcpConnector {
    fn fenced(&self) -> Option<(u64, u64)> {
        *self.fence.lock().unwrap()
    }

    fn connect(&mut self) -> Result<Box<dyn Session>, String> {
        let cfg = HandshakeConfig {
            role: Role::Primary,
            set_id: self.set_id,
            epoch: self.epoch,
            instance_id: conn::instance_id(),
            nonce: conn::nonce(),
            key: self.key.clone(),
        };
        let (mut reader, writer, est) = conn::connect(self.addr, cfg, Duration::from_secs(5))
            .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        if est.peer.role != Role::Target {
            return Err(format!("{} is a {}, not a mirror target", self.addr, est.peer.role.name()));
        }
        if est.peer.set_id != [0; 16] && est.peer.set_id != self.set_id {
            return Err(format!("{} mirrors another replication set; refusing to ship to it", self.addr));
        }
        writer.set_timeout(TARGET_SILENCE_MAX).map_err(|e| e.to_string())?;
        let mut position = match reader.recv(TARGET_SILENCE_MAX) {
            Ok(Frame::Control(ControlMsg::Status { next_lsn, durable_lsn, applied_lsn })) => TargetPosition {
                next_lsn,
                durable_next: durable_lsn + 1,
                applied_next: applied_lsn + 1,
                epoch: 0,
                failback: false,
            },
            Ok(Frame::Control(ControlMsg::Fenced { epoch, fork_lsn })) => {
                *self.fence.lock().unwrap() = Some((epoch, fork_lsn));
                return Err(fenced_text(self.addr, epoch, fork_lsn, self.epoch));
            }
            Ok(Frame::Control(ControlMsg::Bye { reason })) => return Err(format!("the target refused: {reason}")),
            Ok(other) => return Err(format!("the target began with {:?} instead of its status", other.kind())),
            Err(e) => return Err(format!("waiting for the target's status: {e}")),
        };
        if est.version.minor < crate::proto::wire::MINOR_FAILOVER {
            // A 1.0 target sends no LogInfo: it knows no epoch but its hello's.
            position.epoch = est.peer.epoch;
        } else {
            match reader.recv(TARGET_SILENCE_MAX) {
                Ok(Frame::Control(ControlMsg::LogInfo { epoch, failback, .. })) => {
                    position.epoch = epoch;
                    position.failback = failback;
                }
                Ok(other) => return Err(format!("the target sent {:?} instead of its log info", other.kind())),
                Err(e) => return Err(format!("waiting for the target's log info: {e}")),
            }
        }
        let (tx, rx) = mpsc::sync_channel(1024);
        let (fence, addr, ours) = (self.fence.clone(), self.addr, self.epoch);
        std::thread::Builder::new()
            .name("ship-acks".into())
            .spawn(move || {
                loop {
                    let ev = match reader.recv(TARGET_SILENCE_MAX) {
                        Ok(Frame::Ack(l)) => Event::Ack(l),
                        Ok(Frame::Heartbeat) => Event::Heartbeat,
                        Ok(Frame::Control(ControlMsg::ResyncDone { plan })) => Event::ResyncDone(plan),
                        Ok(Frame::Control(ControlMsg::Bye { reason })) => {
                            Event::Closed(format!("the target said: {reason}"))
                        }
                        Ok(Frame::Control(ControlMsg::Status { .. })) => continue,
                        Ok(Frame::Control(ControlMsg::DirtyMap { chunk, last })) => Event::DirtyMap(chunk, last),
                        Ok(Frame::Control(ControlMsg::LogInfo { start_lsn, next_lsn, .. })) => {
                            Event::TargetLog { start: start_lsn, next: next_lsn }
                        }
                        Ok(Frame::Control(ControlMsg::Fenced { epoch, fork_lsn })) => {
                            *fence.lock().unwrap() = Some((epoch, fork_lsn));
                            Event::Closed(fenced_text(addr, epoch, fork_lsn, ours))
                        }
                        Ok(f) => Event::Closed(format!("the target sent an unexpected {} frame", f.kind().name())),
                        Err(NetError::Timeout(t)) => Event::Closed(format!("the target was silent for {t:?}")),
                        Err(e) => Event::Closed(e.to_string()),
                    };
                    let last = matches!(ev, Event::Closed(_));
                    if tx.send(ev).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Box::new(TcpSession { writer, events: rx, position, minor: est.version.minor }))
    }
}

/// Marks a connection refused because a failover fenced the peer: the shipper stops for
/// good instead of reconnecting (see `Hub::fence`).
pub const FENCED_PREFIX: &str = "FENCED: ";

/// The refusal of a fenced peer, as the shipper's error text (starts with `FENCED_PREFIX`).
pub fn fenced_text(peer: impl std::fmt::Display, epoch: u64, fork_lsn: u64, ours: u64) -> String {
    format!(
        "{FENCED_PREFIX}{peer} was fenced by a failover at epoch {epoch} (this primary is at epoch {ours}; histories \
         agree below LSN {fork_lsn}): this node is no longer the primary and ships nothing; fail it back \
         (docs/OPERATIONS.md, \"Failback\")"
    )
}

struct TcpSession {
    writer: Writer,
    events: Receiver<Event>,
    position: TargetPosition,
    minor: u16,
}

impl Session for TcpSession {
    fn position(&self) -> TargetPosition {
        self.position
    }
    fn minor(&self) -> u16 {
        self.minor
    }
    fn send(&mut self, frame: &Frame) -> Result<(), String> {
        self.writer.send(frame).map_err(|e| e.to_string())
    }
    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.writer.send_records(records).map_err(|e| e.to_string())
    }
    fn event(&mut self, wait: Duration) -> Option<Event> {
        match self.events.recv_timeout(wait) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Event::Closed("the connection ended".into())),
        }
    }
}

impl Drop for TcpSession {
    fn drop(&mut self) {
        self.writer.shutdown();
    }
}

/// What a target's reply frame means to the shipper.
pub fn event_of(f: Frame) -> Option<Event> {
    match f {
        Frame::Ack(l) => Some(Event::Ack(l)),
        Frame::Heartbeat => Some(Event::Heartbeat),
        Frame::Control(ControlMsg::ResyncDone { plan }) => Some(Event::ResyncDone(plan)),
        Frame::Control(ControlMsg::DirtyMap { chunk, last }) => Some(Event::DirtyMap(chunk, last)),
        Frame::Control(ControlMsg::LogInfo { start_lsn, next_lsn, .. }) => {
            Some(Event::TargetLog { start: start_lsn, next: next_lsn })
        }
        Frame::Control(ControlMsg::Bye { reason }) => Some(Event::Closed(format!("the target said: {reason}"))),
        _ => None,
    }
}

// ----- a local directory ------------------------------------------------------------------

/// `--target DIR`: the target core runs in this process; its log and staging live under the
/// primary's journal directory (`state`), its data in `dir`.
pub struct LocalConnector {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub set_id: [u8; 16],
    pub geometry: JournalGeometry,
    core: Option<Arc<TargetCore<DirStorage, OsTree>>>,
}

impl LocalConnector {
    pub fn new(dir: &Path, state: &Path, set_id: [u8; 16], geometry: JournalGeometry) -> LocalConnector {
        LocalConnector { dir: dir.to_path_buf(), state: state.to_path_buf(), set_id, geometry, core: None }
    }

    fn open(&mut self) -> Result<Arc<TargetCore<DirStorage, OsTree>>, String> {
        if let Some(c) = &self.core {
            return Ok(c.clone());
        }
        let log = self.state.join("log");
        std::fs::create_dir_all(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let storage = DirStorage::new(&log);
        let tree =
            OsTree::open(&self.dir).map_err(|e| format!("opening target directory {}: {e}", self.dir.display()))?;
        let has = storage.read_superblock_if_any().map_err(|e| e.to_string())?.is_some();
        let core = if has {
            TargetCore::open(storage, tree, &self.state)
        } else {
            TargetCore::create(storage, self.geometry, self.set_id, tree, &self.state)
        }
        .map_err(|e| format!("target directory {}: {e}", self.dir.display()))?;
        if core.set_id() != self.set_id {
            return Err(format!("{} holds the state of another replication set", self.state.display()));
        }
        let core = Arc::new(core);
        self.core = Some(core.clone());
        Ok(core)
    }
}

impl Connector for LocalConnector {
    fn connect(&mut self) -> Result<Box<dyn Session>, String> {
        let core = self.open()?;
        // As a target process does before its Status: a cut-off append leaves no gap.
        core.settle_log();
        let position = core.position();
        Ok(Box::new(LocalSession {
            core,
            handler: FrameHandler::new(),
            events: Vec::new(),
            position,
            last_checkpoint: Instant::now(),
        }))
    }
}

struct LocalSession {
    core: Arc<TargetCore<DirStorage, OsTree>>,
    handler: FrameHandler,
    events: Vec<Event>,
    position: TargetPosition,
    last_checkpoint: Instant,
}

impl LocalSession {
    fn after(&mut self) -> Result<(), String> {
        self.core.apply_available().map_err(|e| e.to_string())?;
        if self.last_checkpoint.elapsed() > Duration::from_secs(2) {
            self.core.checkpoint().map_err(|e| e.to_string())?;
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }
}

impl Session for LocalSession {
    fn position(&self) -> TargetPosition {
        self.position
    }

    fn send(&mut self, frame: &Frame) -> Result<(), String> {
        let replies = self.handler.handle(&self.core, frame.clone())?;
        self.events.extend(replies.into_iter().filter_map(event_of));
        self.after()
    }

    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.send(&Frame::Records(records.to_vec()))
    }

    fn event(&mut self, wait: Duration) -> Option<Event> {
        if self.events.is_empty() {
            std::thread::sleep(wait.min(Duration::from_millis(1)));
            return None;
        }
        Some(self.events.remove(0))
    }
}
