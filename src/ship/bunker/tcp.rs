//! `--bunker tcp://HOST:PORT`: the connector and session of a bunker link to a `ferryfs bunker`
//! process (the handshake, its greeting, the frames both ways).

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{BunkerConnector, BunkerEvent, BunkerPosition, BunkerSession, LinkError, Waker};
use crate::net::conn::{self, NetError, Writer};
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Frame, HandshakeConfig, Key, Role};
use crate::types::Lsn;

/// `--bunker tcp://HOST:PORT`: a `ferryfs bunker` process.
pub struct TcpBunkerConnector {
    pub addr: SocketAddr,
    pub set_id: [u8; 16],
    pub epoch: u64,
    pub key: Option<Key>,
    /// `--bunker-timeout`: bounds the connect, a blocked send and every reply awaited.
    pub timeout: Duration,
}

/// How long the bunker may take for its first messages after the handshake.
const GREETING_WAIT_MIN: Duration = Duration::from_secs(5);

impl TcpBunkerConnector {
    fn greeting(&self, reader: &mut conn::Reader) -> Result<BunkerPosition, LinkError> {
        let wait = self.timeout.max(GREETING_WAIT_MIN);
        let durable_lsn = match reader.recv(wait) {
            Ok(Frame::Control(ControlMsg::Status { durable_lsn, .. })) => durable_lsn,
            Ok(Frame::Control(ControlMsg::Fenced { epoch, fork_lsn })) => {
                return Err(LinkError::Fenced { epoch, fork_lsn });
            }
            Ok(Frame::Control(ControlMsg::Bye { reason })) => {
                return Err(LinkError::Failed(format!("the bunker refused: {reason}")));
            }
            Ok(f) => {
                return Err(LinkError::Failed(format!(
                    "the bunker began with a {} frame instead of its status",
                    f.kind().name()
                )));
            }
            Err(e) => return Err(LinkError::Failed(format!("waiting for the bunker's status: {e}"))),
        };
        match reader.recv(wait) {
            Ok(Frame::Control(ControlMsg::LogInfo { epoch, start_lsn, next_lsn, .. })) => Ok(BunkerPosition {
                epoch,
                start_lsn: Lsn(start_lsn),
                next_lsn: Lsn(next_lsn),
                durable_next: Lsn(durable_lsn + 1),
            }),
            Ok(Frame::Control(ControlMsg::Fenced { epoch, fork_lsn })) => Err(LinkError::Fenced { epoch, fork_lsn }),
            Ok(Frame::Control(ControlMsg::Bye { reason })) => {
                Err(LinkError::Failed(format!("the bunker refused: {reason}")))
            }
            Ok(f) => {
                Err(LinkError::Failed(format!("the bunker sent a {} frame instead of its log info", f.kind().name())))
            }
            Err(e) => Err(LinkError::Failed(format!("waiting for the bunker's log info: {e}"))),
        }
    }
}

impl BunkerConnector for TcpBunkerConnector {
    fn connect(&mut self, waker: Waker) -> Result<Box<dyn BunkerSession>, LinkError> {
        let cfg = HandshakeConfig {
            role: Role::Primary,
            set_id: self.set_id,
            epoch: self.epoch,
            instance_id: conn::instance_id(),
            nonce: conn::nonce(),
            key: self.key.clone(),
        };
        let (mut reader, writer, est) = conn::connect(self.addr, cfg, self.timeout)
            .map_err(|e| LinkError::Failed(format!("connecting to {}: {e}", self.addr)))?;
        if est.peer.role != Role::Bunker {
            return Err(LinkError::Failed(format!("{} is a {}, not a bunker", self.addr, est.peer.role.name())));
        }
        if est.peer.set_id != [0; 16] && est.peer.set_id != self.set_id {
            return Err(LinkError::Failed(format!(
                "{} keeps the log of another replication set; refusing to mirror to it",
                self.addr
            )));
        }
        writer.set_timeout(self.timeout).map_err(|e| LinkError::Failed(e.to_string()))?;
        let position = self.greeting(&mut reader)?;
        let (tx, rx) = mpsc::sync_channel(1024);
        std::thread::Builder::new()
            .name("bunker-acks".into())
            .spawn(move || read_events(reader, tx, waker))
            .map_err(|e| LinkError::Failed(e.to_string()))?;
        Ok(Box::new(TcpBunkerSession { writer, events: rx, position, timeout: self.timeout }))
    }
}

/// The bunker's frames, as events, until the connection ends (the session's drop shuts it).
fn read_events(mut reader: conn::Reader, tx: mpsc::SyncSender<BunkerEvent>, waker: Waker) {
    loop {
        let ev = match reader.recv(Duration::from_secs(1)) {
            Ok(Frame::Ack(l)) => BunkerEvent::Ack(l),
            Ok(Frame::Heartbeat) => BunkerEvent::Heartbeat,
            Ok(Frame::Control(ControlMsg::LogInfo { epoch, start_lsn, next_lsn, .. })) => {
                BunkerEvent::LogInfo(BunkerPosition {
                    epoch,
                    start_lsn: Lsn(start_lsn),
                    next_lsn: Lsn(next_lsn),
                    durable_next: Lsn(next_lsn),
                })
            }
            Ok(Frame::Control(ControlMsg::Fenced { epoch, fork_lsn })) => BunkerEvent::Fenced { epoch, fork_lsn },
            Ok(Frame::Control(ControlMsg::Bye { reason })) => BunkerEvent::Closed(format!("the bunker said: {reason}")),
            Ok(Frame::Control(ControlMsg::Status { .. })) => continue,
            Ok(f) => BunkerEvent::Closed(format!("the bunker sent an unexpected {} frame", f.kind().name())),
            // Silence alone is no error: the link judges it by the acks it awaits.
            Err(NetError::Timeout(_)) => continue,
            Err(e) => BunkerEvent::Closed(e.to_string()),
        };
        let last = matches!(ev, BunkerEvent::Closed(_) | BunkerEvent::Fenced { .. });
        if tx.send(ev).is_err() {
            return;
        }
        waker();
        if last {
            return;
        }
    }
}

struct TcpBunkerSession {
    writer: Writer,
    events: Receiver<BunkerEvent>,
    position: BunkerPosition,
    timeout: Duration,
}

impl BunkerSession for TcpBunkerSession {
    fn position(&self) -> BunkerPosition {
        self.position
    }

    fn restart_at(&mut self, lsn: Lsn) -> Result<BunkerPosition, LinkError> {
        self.writer
            .send(&Frame::Control(ControlMsg::RestartAt { lsn: lsn.0 }))
            .map_err(|e| LinkError::Failed(e.to_string()))?;
        let wait = self.timeout.max(GREETING_WAIT_MIN);
        let mut deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(BunkerEvent::LogInfo(p)) => return Ok(p),
                Ok(BunkerEvent::Heartbeat) => deadline = Instant::now() + wait,
                Ok(BunkerEvent::Ack(_)) => {}
                Ok(BunkerEvent::Fenced { epoch, fork_lsn }) => return Err(LinkError::Fenced { epoch, fork_lsn }),
                Ok(BunkerEvent::Closed(why)) => return Err(LinkError::Failed(why)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(LinkError::Failed(format!(
                        "the bunker did not answer RestartAt{{{}}} within {wait:?}",
                        lsn.0
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(LinkError::Failed("the connection ended".into())),
            }
        }
    }

    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.writer.send_records(records).map_err(|e| e.to_string())
    }

    fn watermark(&mut self, all_acked: Lsn) -> Result<(), String> {
        self.writer
            .send(&Frame::Control(ControlMsg::Watermark { all_acked_lsn: all_acked.0 }))
            .map_err(|e| e.to_string())
    }

    fn heartbeat(&mut self) -> Result<(), String> {
        self.writer.send(&Frame::Heartbeat).map_err(|e| e.to_string())
    }

    fn bye(&mut self, reason: &str) {
        let _ = self.writer.send(&Frame::Control(ControlMsg::Bye { reason: reason.into() }));
    }

    fn event(&mut self, wait: Duration) -> Option<BunkerEvent> {
        match self.events.recv_timeout(wait) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(BunkerEvent::Closed("the connection ended".into())),
        }
    }
}

impl Drop for TcpBunkerSession {
    fn drop(&mut self) {
        self.writer.shutdown();
    }
}
