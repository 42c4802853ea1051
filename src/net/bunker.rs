//! `ferryfs bunker` on the network (tokio): keeps a real-time copy of one primary's journal in
//! a [`BunkerCore`] and serves it back to a failover tool (docs/PROTOCOL.md, "Bunker and
//! failover"). Disk work runs on blocking threads, with heartbeats to the peer meanwhile.
//!
//! Connection rules:
//! - a `primary`: the log is created on the first one's arrival (its hello's set id and
//!   epoch); a primary of another set is sent `Bye`; one of an epoch a failover fenced is sent
//!   `Fenced` (with the fork) and closed; while one primary is connected (heard from within
//!   [`PEER_SILENCE_MAX`]) a second is refused; a silent one loses its slot;
//! - a `failover tool`: of the log's set if there is a log (a hello with an all-zero set id
//!   asks, and compares the set of the bunker's hello itself); served `LogInfo`, then
//!   `ReadLog` and `Fence` requests until it closes;
//! - any other role gets `Bye`; any bad frame closes its connection with the reason logged,
//!   and nothing of the frame is kept.
//!
//! **Fences and records.** An append and a fence never overlap (`ingest`): each append checks
//! its primary's epoch under that lock, so once a fence returns no record of a fenced primary
//! is added, whatever its connection is doing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::conn::{HANDSHAKE_TIMEOUT, instance_id, nonce};
pub use super::target::hex;
use crate::journal::JournalGeometry;
use crate::os::storage::DirStorage;
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{
    FRAME_BODY_MAX, FRAME_HEADER_LEN, Frame, FrameDecoder, FrameEncoder, HandshakeConfig, Hello, Key, Role,
};
use crate::replica::bunker::BunkerCore;
use crate::status::bunker_node::{BunkerNodeStatus, PrimaryLink};
use crate::types::Lsn;

/// A primary that sends nothing (not even a heartbeat) for this long is lost.
pub const PEER_SILENCE_MAX: Duration = Duration::from_secs(5);
/// A failover tool may think longer (it drives a target too); it holds no slot, so waiting
/// for it costs a socket and nothing else.
pub const TOOL_SILENCE_MAX: Duration = Duration::from_secs(30);
/// The bunker sends a heartbeat when it has sent nothing else for this long.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A send that takes longer than this means a peer that stopped reading: the connection is
/// given up rather than hold its task (and a primary's slot) forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Records per frame served to a failover tool: about this many bytes (reading stops after
/// the record that reaches it, so a frame holds at most this plus one record).
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// Frames read from the log ahead of the socket while serving a `ReadLog`.
const READ_AHEAD_CHUNKS: usize = 2;
/// What a primary's connection may read ahead while its last frame's disk work runs.
const READ_AHEAD_WHILE_BUSY_MAX: usize = FRAME_BODY_MAX + (1 << 20);
const READ_BUF_BYTES: usize = 256 << 10;

const _: () = assert!(READ_CHUNK_BYTES + (2 << 20) <= FRAME_BODY_MAX);
const _: () = assert!(HEARTBEAT_EVERY.as_millis() * 3 <= PEER_SILENCE_MAX.as_millis());

pub type Core = BunkerCore<DirStorage>;

pub struct BunkerConfig {
    pub listen: SocketAddr,
    /// The log's directory (`--dir`): superblock, segments, the marker, the fence record.
    pub dir: PathBuf,
    pub key: Option<Key>,
    /// For the log created on the first primary's arrival.
    pub geometry: JournalGeometry,
}

/// The shared state of a running bunker.
pub struct Bunker {
    config: BunkerConfig,
    core: Mutex<Option<Arc<Core>>>,
    /// Held by every append, restart and fence (see the module docs).
    ingest: Mutex<()>,
    primary: Mutex<PrimarySlot>,
    next_conn: AtomicU64,
    stop: AtomicBool,
    /// Bound by the caller before `serve` ([`Bunker::set_listener`]), if it was.
    listener: Mutex<Option<std::net::TcpListener>>,
    local_addr: Mutex<Option<SocketAddr>>,
}

/// The one primary a bunker follows, and the last one it lost (for the status).
#[derive(Default)]
struct PrimarySlot {
    active: Option<Active>,
    lost: Option<Lost>,
}

struct Active {
    conn: u64,
    addr: SocketAddr,
    epoch: u64,
    heard: Instant,
    /// Told when a fence drops this primary.
    kick: Arc<Notify>,
}

struct Lost {
    conn: u64,
    addr: SocketAddr,
    heard: Instant,
    at_unix: u64,
    last_record: u64,
    reason: String,
}

impl Bunker {
    /// Opens the log in `config.dir` if there is one (its torn tail, never acked, is cut off).
    pub fn new(config: BunkerConfig) -> anyhow::Result<Arc<Bunker>> {
        let storage = DirStorage::new(&config.dir);
        storage.read_superblock_if_any()?;
        let core = Core::open_if_any(storage)
            .map_err(|e| anyhow::anyhow!("opening the bunker's log in {}: {e}", config.dir.display()))?
            .map(Arc::new);
        Ok(Arc::new(Bunker {
            config,
            core: Mutex::new(core),
            ingest: Mutex::new(()),
            primary: Mutex::new(PrimarySlot::default()),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            listener: Mutex::new(None),
            local_addr: Mutex::new(None),
        }))
    }

    pub fn core(&self) -> Option<Arc<Core>> {
        self.core.lock().unwrap().clone()
    }

    /// Serves on `listener` (bound and non-blocking) rather than binding `config.listen` in
    /// `serve`: the caller can then fail on a bad address before it touches anything.
    pub fn set_listener(&self, listener: std::net::TcpListener) {
        *self.listener.lock().unwrap() = Some(listener);
    }

    /// The address it listens on, once it does.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        *self.local_addr.lock().unwrap()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Serves until `stop` or Ctrl-C. Runs its own tokio runtime; returns once every
    /// connection is closed and all disk work finished (the caller then closes the core).
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let r = rt.block_on(self.clone().accept_loop());
        self.stop();
        // Dropping the runtime cancels the connections and waits for their blocking work.
        drop(rt);
        r
    }

    async fn accept_loop(self: Arc<Self>) -> anyhow::Result<()> {
        let bound = self.listener.lock().unwrap().take();
        let listener = match bound {
            Some(l) => TcpListener::from_std(l)?,
            None => TcpListener::bind(self.config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {}: cannot listen there: {e}", self.config.listen))?,
        };
        let addr = listener.local_addr()?;
        *self.local_addr.lock().unwrap() = Some(addr);
        tracing::info!("bunker listening on {addr}");
        eprintln!("ferryfs bunker: listening on {addr}");
        while !self.stop.load(Ordering::Acquire) {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            let (sock, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(why) = me.serve_conn(sock, peer).await {
                    tracing::warn!("connection from {peer} closed: {why}");
                    eprintln!("ferryfs bunker: connection from {peer} closed: {why}");
                }
            });
        }
        Ok(())
    }

    async fn serve_conn(self: Arc<Self>, mut sock: TcpStream, peer: SocketAddr) -> Result<(), String> {
        sock.set_nodelay(true).ok();
        let core = self.core();
        let cfg = HandshakeConfig {
            role: Role::Bunker,
            set_id: core.as_ref().map_or([0; 16], |c| c.set_id()),
            epoch: core.as_ref().map_or(0, |c| c.epoch()),
            instance_id: instance_id(),
            nonce: nonce(),
            key: self.config.key.clone(),
        };
        let (est, leftover) = tokio::time::timeout(HANDSHAKE_TIMEOUT, super::target::handshake(&mut sock, cfg))
            .await
            .map_err(|_| "the handshake did not complete in time".to_string())??;
        let mut link = Link::new(sock, &leftover);
        match est.peer.role {
            Role::Primary => self.primary(link, est.peer, peer, est.authenticated).await,
            Role::FailoverTool => self.tool(link, est.peer, peer).await,
            other => {
                let why = format!(
                    "this is a bunker; a {} cannot connect to it (only a primary and a failover tool may)",
                    other.name()
                );
                link.bye(&why).await;
                Err(format!("refused a {}: {why}", other.name()))
            }
        }
    }

    // ----- the primary ----------------------------------------------------------------------

    /// The log for a primary (or a failover tool's fence) of set `set_id`, created on the
    /// first arrival at `epoch`.
    fn core_for(&self, set_id: [u8; 16], epoch: u64) -> Result<Arc<Core>, String> {
        let mut g = self.core.lock().unwrap();
        if let Some(c) = g.as_ref() {
            if c.set_id() != set_id {
                return Err(format!(
                    "this bunker keeps the log of replication set {}, the peer's is {}: refusing it (give the \
                     bunker of another primary a --dir of its own)",
                    hex(&c.set_id()),
                    hex(&set_id)
                ));
            }
            return Ok(c.clone());
        }
        if set_id == [0; 16] {
            return Err("the peer's hello names no replication set; a bunker's log needs one".into());
        }
        let storage = DirStorage::new(&self.config.dir);
        let core = Core::create(storage, self.config.geometry, set_id, epoch)
            .map_err(|e| format!("creating the bunker's log in {}: {e}", self.config.dir.display()))?;
        tracing::info!("created the bunker's log for set {} at epoch {epoch}", hex(&set_id));
        eprintln!(
            "ferryfs bunker: created the log in {} for replication set {} (epoch {epoch})",
            self.config.dir.display(),
            hex(&set_id)
        );
        let core = Arc::new(core);
        *g = Some(core.clone());
        Ok(core)
    }

    async fn primary(
        self: Arc<Self>,
        mut link: Link,
        hello: Hello,
        addr: SocketAddr,
        authenticated: bool,
    ) -> Result<(), String> {
        let (set_id, epoch) = (hello.set_id, hello.epoch);
        let me = self.clone();
        let core = match blocking(move || me.core_for(set_id, epoch)).await {
            Ok(c) => c,
            Err(why) => {
                link.bye(&why).await;
                return Err(format!("refused primary {addr}: {why}"));
            }
        };
        if core.admits(epoch).is_err() {
            let _ = link.send(&fenced_msg(&core)).await;
            return Err(format!(
                "refused primary {addr} of epoch {epoch}: a failover fenced this bunker at epoch {} (sent it Fenced)",
                core.epoch()
            ));
        }
        if epoch > core.epoch() {
            let (me, c) = (self.clone(), core.clone());
            blocking(move || {
                let _one = me.ingest.lock().unwrap();
                c.follow_epoch(epoch)
            })
            .await?;
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        if let Err(why) = self.claim(conn, addr, epoch, kick.clone()) {
            link.bye(&why).await;
            return Err(format!("refused primary {addr}: {why}"));
        }
        tracing::info!("primary {addr} connected (epoch {epoch}, authenticated: {authenticated})");
        eprintln!("ferryfs bunker: primary {addr} connected (epoch {epoch})");
        let Err(why) = self.primary_session(&mut link, &core, conn, epoch, &kick).await;
        if self.release(conn, &core, &why) {
            tracing::warn!("lost the primary {addr}: {why}");
            eprintln!("ferryfs bunker: lost the primary {addr}: {why}");
            Ok(())
        } else {
            Err(why)
        }
    }

    /// Takes the single primary slot, or says why not. A primary silent for
    /// [`PEER_SILENCE_MAX`] has lost it already.
    fn claim(&self, conn: u64, addr: SocketAddr, epoch: u64, kick: Arc<Notify>) -> Result<(), String> {
        let mut s = self.primary.lock().unwrap();
        if let Some(a) = &s.active
            && a.heard.elapsed() < PEER_SILENCE_MAX
        {
            return Err(format!(
                "another primary ({}) is connected to this bunker; two primaries at once are refused",
                a.addr
            ));
        }
        s.active = Some(Active { conn, addr, epoch, heard: Instant::now(), kick });
        Ok(())
    }

    /// Notes that `conn` was heard from; false when it no longer holds the slot.
    fn heard(&self, conn: u64) -> bool {
        let mut s = self.primary.lock().unwrap();
        match s.active.as_mut() {
            Some(a) if a.conn == conn => {
                a.heard = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Gives up the slot when the connection ends; true when `conn` held it (or a fence took
    /// it), false when a newer primary had replaced it.
    fn release(&self, conn: u64, core: &Core, why: &str) -> bool {
        let mut s = self.primary.lock().unwrap();
        match s.active.take_if(|a| a.conn == conn) {
            Some(a) => {
                let last_record = core.log().durable_next.0.saturating_sub(1);
                let reason = why.into();
                s.lost = Some(Lost { conn, addr: a.addr, heard: a.heard, at_unix: now_unix(), last_record, reason });
                true
            }
            None => s.lost.as_ref().is_some_and(|l| l.conn == conn),
        }
    }

    /// After a fence at `epoch`: the connected primary, if its epoch is lower, loses the slot
    /// at once and is told (`Fenced`) by its connection.
    fn drop_primary_below(&self, epoch: u64, core: &Core) {
        let mut s = self.primary.lock().unwrap();
        if let Some(a) = s.active.take_if(|a| a.epoch < epoch) {
            a.kick.notify_one();
            let reason = format!("{FENCED_REASON} at epoch {epoch}");
            let last_record = core.log().durable_next.0.saturating_sub(1);
            s.lost =
                Some(Lost { conn: a.conn, addr: a.addr, heard: a.heard, at_unix: now_unix(), last_record, reason });
        }
    }

    /// Whether a primary is connected and was heard from lately.
    fn primary_connected(&self) -> bool {
        self.primary.lock().unwrap().active.as_ref().is_some_and(|a| a.heard.elapsed() < PEER_SILENCE_MAX)
    }

    /// Until the connection ends (the `Err` is why): `Status` and `LogInfo`, then records and
    /// notices from the primary, acks and heartbeats to it.
    async fn primary_session(
        self: &Arc<Self>,
        link: &mut Link,
        core: &Arc<Core>,
        conn: u64,
        epoch: u64,
        kick: &Notify,
    ) -> Result<Infallible, String> {
        link.send(&Frame::Control(core.status_msg())).await?;
        link.send(&Frame::Control(core.log_info(true))).await?;
        loop {
            while let Some(frame) = link.next_frame()? {
                self.primary_frame(link, core, conn, epoch, frame).await?;
            }
            if link.eof {
                return Err("the primary closed the connection".into());
            }
            let (heartbeat_at, silent_at) = (link.heartbeat_at(), link.silent_at(PEER_SILENCE_MAX));
            tokio::select! {
                biased;
                _ = kick.notified() => {
                    let _ = link.send(&fenced_msg(core)).await;
                    return Err(format!("{FENCED_REASON} at epoch {} (sent it Fenced)", core.epoch()));
                }
                r = link.fill() => {
                    r?;
                    if !link.eof && !self.heard(conn) {
                        return Err("replaced by a newer primary connection".into());
                    }
                }
                _ = tokio::time::sleep_until(heartbeat_at) => link.send(&Frame::Heartbeat).await?,
                _ = tokio::time::sleep_until(silent_at) => {
                    return Err(format!("the primary was silent for {PEER_SILENCE_MAX:?}"));
                }
            }
        }
    }

    async fn primary_frame(
        self: &Arc<Self>,
        link: &mut Link,
        core: &Arc<Core>,
        conn: u64,
        epoch: u64,
        frame: Frame,
    ) -> Result<(), String> {
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Records(body) => {
                let (me, c) = (self.clone(), core.clone());
                let work = blocking(move || me.ingest(&c, epoch, &body));
                match self.busy(link, Some((conn, core)), work).await? {
                    Some(lsn) => link.send(&Frame::Ack(lsn)).await,
                    None => {
                        let _ = link.send(&fenced_msg(core)).await;
                        Err(format!("{FENCED_REASON} at epoch {}; its records were refused", core.epoch()))
                    }
                }
            }
            Frame::Control(ControlMsg::RestartAt { lsn }) => {
                if lsn == 0 {
                    return Err("RestartAt { lsn: 0 } refused: LSNs start at 1".into());
                }
                let (me, c) = (self.clone(), core.clone());
                let work = blocking(move || {
                    let _one = me.ingest.lock().unwrap();
                    if c.admits(epoch).is_err() {
                        return Ok(false);
                    }
                    c.restart_at(Lsn(lsn)).map(|()| true).map_err(|e| format!("RestartAt {lsn}: {e}"))
                });
                if !self.busy(link, Some((conn, core)), work).await? {
                    let _ = link.send(&fenced_msg(core)).await;
                    return Err(format!("{FENCED_REASON} at epoch {}", core.epoch()));
                }
                eprintln!("ferryfs bunker: the primary restarted the log at LSN {lsn}");
                link.send(&Frame::Control(core.log_info(true))).await
            }
            Frame::Control(ControlMsg::Watermark { all_acked_lsn }) => {
                let c = core.clone();
                let work = blocking(move || c.watermark(Lsn(all_acked_lsn)).map_err(|e| format!("watermark: {e}")));
                self.busy(link, Some((conn, core)), work).await
            }
            Frame::Control(ControlMsg::StatusRequest) => link.send(&Frame::Control(core.status_msg())).await,
            // Meant for targets, which apply; a bunker keeps every record as it is.
            Frame::Control(ControlMsg::Settled { .. }) => Ok(()),
            Frame::Control(ControlMsg::Bye { reason }) => Err(format!("the primary said goodbye: {reason}")),
            other => Err(format!("the primary sent {}, which a bunker does not take", describe(&other))),
        }
    }

    /// Appends one Records frame, unless a fence now refuses its primary (`None`).
    fn ingest(&self, core: &Core, epoch: u64, body: &[u8]) -> Result<Option<Lsn>, String> {
        let _one = self.ingest.lock().unwrap();
        if core.admits(epoch).is_err() {
            return Ok(None);
        }
        core.receive(body).map(Some).map_err(|e| format!("records refused: {e}"))
    }

    /// Runs disk work; meanwhile heartbeats go out and, for a primary (`conn` and its log),
    /// its frames are read and decoded ahead (bounded), so slow disk work never reads as
    /// silence on either side. A watermark read ahead raises the log's floor at once: an
    /// append waiting for space may be waiting for exactly that.
    async fn busy<T>(
        &self,
        link: &mut Link,
        primary: Option<(u64, &Core)>,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        tokio::pin!(work);
        // What already arrived with the frame being worked on counts too.
        if let Some((_, core)) = primary {
            for w in link.decode_ahead() {
                core.raise_watermark(Lsn(w));
            }
        }
        loop {
            let heartbeat_at = link.heartbeat_at();
            let read_ahead = primary.is_some() && !link.eof && link.read_ahead_bytes() < READ_AHEAD_WHILE_BUSY_MAX;
            tokio::select! {
                biased;
                r = &mut work => return r,
                r = link.fill(), if read_ahead => {
                    r?;
                    if let Some((conn, core)) = primary {
                        self.heard(conn);
                        for w in link.decode_ahead() {
                            core.raise_watermark(Lsn(w));
                        }
                    }
                }
                _ = tokio::time::sleep_until(heartbeat_at) => link.send(&Frame::Heartbeat).await?,
            }
        }
    }

    // ----- the failover tool ----------------------------------------------------------------

    async fn tool(self: Arc<Self>, mut link: Link, hello: Hello, addr: SocketAddr) -> Result<(), String> {
        // A tool that names no set ("tell me") compares the set in our hello itself.
        if let Some(c) = self.core()
            && hello.set_id != [0; 16]
            && c.set_id() != hello.set_id
        {
            let why = format!(
                "this bunker keeps the log of replication set {}, the failover names set {}",
                hex(&c.set_id()),
                hex(&hello.set_id)
            );
            link.bye(&why).await;
            return Err(format!("refused failover tool {addr}: {why}"));
        }
        tracing::info!("failover tool {addr} connected");
        eprintln!("ferryfs bunker: failover tool {addr} connected");
        link.send(&self.log_info_msg()).await?;
        loop {
            while let Some(frame) = link.next_frame()? {
                match frame {
                    Frame::Heartbeat => {}
                    Frame::Control(ControlMsg::ReadLog { from_lsn }) => self.serve_read(&mut link, from_lsn).await?,
                    Frame::Control(ControlMsg::Fence { epoch }) => {
                        self.serve_fence(&mut link, hello.set_id, epoch, addr).await?
                    }
                    Frame::Control(ControlMsg::StatusRequest) => {
                        if let Some(c) = self.core() {
                            link.send(&Frame::Control(c.status_msg())).await?;
                        }
                    }
                    Frame::Control(ControlMsg::Bye { .. }) => return Ok(()),
                    other => {
                        let why = format!("the failover tool sent {}, which a bunker does not take", describe(&other));
                        link.bye(&why).await;
                        return Err(why);
                    }
                }
                // The tool is not expected to talk while the bunker works for it.
                link.heard = tokio::time::Instant::now();
            }
            if link.eof {
                tracing::info!("failover tool {addr} closed the connection");
                return Ok(());
            }
            let (heartbeat_at, silent_at) = (link.heartbeat_at(), link.silent_at(TOOL_SILENCE_MAX));
            tokio::select! {
                biased;
                r = link.fill() => r?,
                _ = tokio::time::sleep_until(heartbeat_at) => link.send(&Frame::Heartbeat).await?,
                _ = tokio::time::sleep_until(silent_at) => {
                    return Err(format!("the failover tool was silent for {TOOL_SILENCE_MAX:?}"));
                }
            }
        }
    }

    /// `LogInfo` for a failover tool; a bunker without a log yet reads as an empty log.
    fn log_info_msg(&self) -> Frame {
        let primary_connected = self.primary_connected();
        Frame::Control(match self.core() {
            Some(c) => c.log_info(primary_connected),
            None => ControlMsg::LogInfo {
                epoch: 0,
                start_lsn: 1,
                next_lsn: 1,
                applied_next: 1,
                primary_connected,
                promoted: false,
                failback: false,
            },
        })
    }

    /// `ReadLog`: the durable records from `from` to the durable end as it is now, in frames
    /// of about [`READ_CHUNK_BYTES`], read ahead on a blocking thread while the last is sent;
    /// then `ReadEnd`. A record the log no longer holds ends the connection with `Bye`.
    async fn serve_read(&self, link: &mut Link, from: u64) -> Result<(), String> {
        let Some(core) = self.core() else {
            if from <= 1 {
                return link.send(&Frame::Control(ControlMsg::ReadEnd { next_lsn: 1 })).await;
            }
            let why = format!("ReadLog from {from}: this bunker holds no log yet (no primary ever connected)");
            link.bye(&why).await;
            return Err(why);
        };
        let end = core.log().durable_next;
        let (tx, mut rx) = mpsc::channel(READ_AHEAD_CHUNKS);
        tokio::task::spawn_blocking(move || read_ahead(&core, Lsn(from), end, &tx));
        let (mut frames, mut bytes) = (0u64, 0u64);
        loop {
            let heartbeat_at = link.heartbeat_at();
            let chunk = tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(heartbeat_at) => {
                    link.send(&Frame::Heartbeat).await?;
                    continue;
                }
            };
            match chunk {
                None => break,
                Some(Ok(mut frame)) => {
                    bytes += (frame.len() - FRAME_HEADER_LEN) as u64;
                    frames += 1;
                    link.send_records_in(&mut frame).await?;
                }
                Some(Err(why)) => {
                    let why = format!("ReadLog from {from}: {why}");
                    link.bye(&why).await;
                    return Err(why);
                }
            }
        }
        tracing::info!("served records {from}..{} ({frames} frames, {bytes} bytes) to a failover tool", end.0);
        link.send(&Frame::Control(ControlMsg::ReadEnd { next_lsn: end.0.max(from) })).await
    }

    /// `Fence`: refuse every primary below `epoch` from now on (durable), drop a connected
    /// one of a lower epoch, reply `LogInfo`.
    async fn serve_fence(
        self: &Arc<Self>,
        link: &mut Link,
        set_id: [u8; 16],
        epoch: u64,
        addr: SocketAddr,
    ) -> Result<(), String> {
        let core = match self.core() {
            Some(c) => c,
            None => {
                // Never had a primary: the log is made now, so the fence outlasts a restart.
                let me = self.clone();
                match blocking(move || me.core_for(set_id, epoch)).await {
                    Ok(c) => c,
                    Err(why) => {
                        link.bye(&why).await;
                        return Err(why);
                    }
                }
            }
        };
        let (me, c) = (self.clone(), core.clone());
        let work = blocking(move || {
            let _one = me.ingest.lock().unwrap();
            c.fence(epoch).map_err(|e| format!("fencing at epoch {epoch}: {e}"))
        });
        self.busy(link, None, work).await?;
        self.drop_primary_below(core.epoch(), &core);
        tracing::warn!("fenced at epoch {} by failover tool {addr}; fork at LSN {}", core.epoch(), core.fork_lsn());
        eprintln!(
            "ferryfs bunker: fenced at epoch {} by failover tool {addr}: primaries of lower epochs are refused from \
             now on (fork at LSN {})",
            core.epoch(),
            core.fork_lsn()
        );
        link.send(&self.log_info_msg()).await
    }

    // ----- status ---------------------------------------------------------------------------

    /// What the status socket shows.
    pub fn status(&self) -> BunkerNodeStatus {
        let mut s = BunkerNodeStatus::new(&self.config.dir);
        if let Some(core) = self.core() {
            let log = core.log();
            let g = core.journal().geometry();
            let size = g.segment_size * u64::from(g.segment_count);
            s.set_id = Some(hex(&log.set_id));
            s.epoch = log.epoch;
            s.fenced = core.fenced();
            s.start_lsn = log.start_lsn.0;
            s.next_lsn = log.next_lsn.0;
            s.durable_lsn = log.durable_next.0.saturating_sub(1);
            s.watermark_lsn = log.watermark_next.0.saturating_sub(1);
            s.log_bytes_used = core.journal().bytes_appended_since_start().min(size);
            s.log_size = size;
            s.records_received = core.records_received.load(Ordering::Relaxed);
            s.bytes_received = core.bytes_received.load(Ordering::Relaxed);
        }
        let slot = self.primary.lock().unwrap();
        if let Some(a) = &slot.active {
            s.primary = PrimaryLink {
                state: "connected".into(),
                addr: Some(a.addr.to_string()),
                last_heard_secs_ago: Some(a.heard.elapsed().as_secs_f64()),
                ..PrimaryLink::default()
            };
        } else if let Some(l) = &slot.lost {
            s.primary = PrimaryLink {
                state: "lost".into(),
                addr: Some(l.addr.to_string()),
                last_heard_secs_ago: Some(l.heard.elapsed().as_secs_f64()),
                lost_reason: Some(l.reason.clone()),
                lost_since_unix: Some(l.at_unix),
                last_record_lsn: Some(l.last_record),
            };
        }
        s
    }
}

/// How a fenced primary's loss begins (the status shows it; `release` recognizes it).
const FENCED_REASON: &str = "fenced by a failover";

fn fenced_msg(core: &Core) -> Frame {
    Frame::Control(ControlMsg::Fenced { epoch: core.epoch(), fork_lsn: core.fork_lsn() })
}

/// The blocking half of `serve_read`: one cursor for the whole read, each frame's records
/// read into a buffer with room for its header in front. Ends when the receiver is gone.
fn read_ahead(core: &Core, from: Lsn, end: Lsn, tx: &mpsc::Sender<Result<Vec<u8>, String>>) {
    let mut cur = match core.cursor(from) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.blocking_send(Err(e.to_string()));
            return;
        }
    };
    while cur.next < end {
        let before = cur.next;
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + 2 * READ_CHUNK_BYTES);
        frame.resize(FRAME_HEADER_LEN, 0);
        let item = match core.read_at(&mut cur, end, READ_CHUNK_BYTES, &mut frame) {
            Err(e) => Err(e.to_string()),
            // Only a restart of the log during the read moves its durable end back.
            Ok(_) if cur.next == before => {
                Err(format!("the log changed during the read; it no longer holds record {}", before.0))
            }
            Ok(_) => Ok(frame),
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
    }
}

/// One connection after the handshake: frames in both directions and the times that drive
/// heartbeats and silence.
struct Link {
    sock: TcpStream,
    dec: FrameDecoder,
    enc: FrameEncoder,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Frames decoded ahead while disk work ran, in order, and the bytes of their bodies.
    pending: VecDeque<Frame>,
    pending_bytes: usize,
    /// When the peer was last heard from (any bytes).
    heard: tokio::time::Instant,
    /// When anything was last sent.
    sent: tokio::time::Instant,
    /// The peer closed its side.
    eof: bool,
}

impl Link {
    fn new(sock: TcpStream, leftover: &[u8]) -> Link {
        let mut dec = FrameDecoder::new();
        dec.push(leftover);
        let now = tokio::time::Instant::now();
        Link {
            sock,
            dec,
            enc: FrameEncoder::new(),
            rbuf: vec![0; READ_BUF_BYTES],
            wbuf: Vec::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            heard: now,
            sent: now,
            eof: false,
        }
    }

    fn heartbeat_at(&self) -> tokio::time::Instant {
        self.sent + HEARTBEAT_EVERY
    }

    fn silent_at(&self, limit: Duration) -> tokio::time::Instant {
        self.heard + limit
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        if let Some(f) = self.pending.pop_front() {
            self.pending_bytes -= body_len(&f);
            return Ok(Some(f));
        }
        self.dec.next_frame().map_err(|e| format!("bad frame: {e}"))
    }

    /// Decodes every whole frame read so far into `pending` (a bad one stays in the decoder,
    /// which reports it again in its turn); returns the watermarks among them.
    fn decode_ahead(&mut self) -> Vec<u64> {
        let mut watermarks = Vec::new();
        while let Ok(Some(f)) = self.dec.next_frame() {
            if let Frame::Control(ControlMsg::Watermark { all_acked_lsn }) = &f {
                watermarks.push(*all_acked_lsn);
            }
            self.pending_bytes += body_len(&f);
            self.pending.push_back(f);
        }
        watermarks
    }

    /// Bytes read and not yet handled.
    fn read_ahead_bytes(&self) -> usize {
        self.dec.buffered() + self.pending_bytes
    }

    /// Reads what the peer sent into the decoder. Cancel safe: nothing is lost if another
    /// branch of a `select!` wins.
    async fn fill(&mut self) -> Result<(), String> {
        let n = self.sock.read(&mut self.rbuf).await.map_err(|e| format!("reading from the peer: {e}"))?;
        if n == 0 {
            self.eof = true;
        } else {
            self.dec.push(&self.rbuf[..n]);
            self.heard = tokio::time::Instant::now();
        }
        Ok(())
    }

    async fn send(&mut self, f: &Frame) -> Result<(), String> {
        self.wbuf.clear();
        self.enc.encode(f, &mut self.wbuf).map_err(|e| e.to_string())?;
        let buf = std::mem::take(&mut self.wbuf);
        let r = self.write(&buf).await;
        self.wbuf = buf;
        r
    }

    /// Sends a Records frame whose records follow `FRAME_HEADER_LEN` free bytes in `frame`:
    /// the header goes there, and the frame leaves in one write.
    async fn send_records_in(&mut self, frame: &mut [u8]) -> Result<(), String> {
        let header = self.enc.records_header(&[&frame[FRAME_HEADER_LEN..]]).map_err(|e| e.to_string())?;
        frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
        self.write(frame).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(SEND_TIMEOUT, self.sock.write_all(bytes))
            .await
            .map_err(|_| format!("the peer took no data for {SEND_TIMEOUT:?}"))?
            .map_err(|e| format!("writing to the peer: {e}"))?;
        self.sent = tokio::time::Instant::now();
        Ok(())
    }

    async fn bye(&mut self, reason: &str) {
        let _ = self.send(&Frame::Control(ControlMsg::Bye { reason: reason.to_string() })).await;
    }
}

fn body_len(f: &Frame) -> usize {
    match f {
        Frame::Records(b) => b.len(),
        Frame::Data { data, .. } => data.len(),
        _ => 0,
    }
}

/// A frame named for a log line: its kind, and a control message's variant.
fn describe(f: &Frame) -> String {
    match f {
        Frame::Control(m) => {
            let name = format!("{m:?}");
            let variant = name.split([' ', '{', '(']).next().unwrap_or("?").to_string();
            format!("a control message {variant}")
        }
        other => format!("a {} frame", other.kind().name()),
    }
}

async fn blocking<R: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<R, E> + Send + 'static,
) -> Result<R, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::superblock::Superblock;
    use crate::journal::Journal;
    use crate::net::conn::{self, NetError, Reader, Writer};
    use crate::types::FileId;

    const GEO: JournalGeometry = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    const SET: [u8; 16] = [7; 16];
    const WAIT: Duration = Duration::from_secs(10);

    /// A bunker serving on 127.0.0.1 from a thread of its own; stopped on drop.
    struct Running {
        bunker: Arc<Bunker>,
        addr: SocketAddr,
        thread: Option<std::thread::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Running {
        fn start() -> Running {
            let dir = tempfile::tempdir().unwrap();
            let config = BunkerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                dir: dir.path().to_path_buf(),
                key: None,
                geometry: GEO,
            };
            let bunker = Bunker::new(config).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            bunker.set_listener(listener);
            let b = bunker.clone();
            let thread = std::thread::spawn(move || b.serve().unwrap());
            Running { bunker, addr, thread: Some(thread), _dir: dir }
        }

        fn connect(&self, role: Role, epoch: u64) -> (Reader, Writer) {
            let cfg = HandshakeConfig { role, set_id: SET, epoch, instance_id: [9; 16], nonce: nonce(), key: None };
            let (r, w, est) = conn::connect(self.addr, cfg, WAIT).unwrap();
            assert_eq!(est.peer.role, Role::Bunker);
            (r, w)
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.bunker.stop();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The next frame that is not a heartbeat.
    fn next(r: &mut Reader) -> Frame {
        loop {
            match r.recv(WAIT).unwrap() {
                Frame::Heartbeat => continue,
                f => return f,
            }
        }
    }

    /// `n` records of `len` bytes of a primary journal of set `SET`, from LSN 1.
    fn records_of(n: usize, len: usize) -> Vec<u8> {
        let p = tempfile::tempdir().unwrap();
        let sb = Superblock::new(SET, 0, 0, Vec::new(), [0; 16]);
        let geo = JournalGeometry { segment_size: 1 << 20, segment_count: 16 };
        let j = Journal::create(DirStorage::new(p.path()), geo, sb).unwrap();
        for i in 0..n {
            let tx = j.append_write(FileId(100), i as u64 * 4096, &vec![i as u8; len]).unwrap();
            j.done(tx);
        }
        let mut cur = j.cursor_at(Lsn(1)).unwrap();
        let mut out = Vec::new();
        j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
        out
    }

    #[test]
    fn a_primary_is_acked_what_is_durable_and_a_tool_reads_it_back_then_fences_it_out() {
        let b = Running::start();
        let (mut pr, mut pw) = b.connect(Role::Primary, 1);
        assert!(matches!(next(&mut pr), Frame::Control(ControlMsg::Status { next_lsn: 1, .. })));
        assert!(matches!(next(&mut pr), Frame::Control(ControlMsg::LogInfo { epoch: 1, next_lsn: 1, .. })));
        let body = records_of(40, 512);
        pw.send_records(&body).unwrap();
        assert_eq!(next(&mut pr), Frame::Ack(Lsn(40)), "one record per write");
        assert_eq!(b.bunker.core().unwrap().log().durable_next, Lsn(41));

        let (mut tr, mut tw) = b.connect(Role::FailoverTool, 0);
        match next(&mut tr) {
            Frame::Control(ControlMsg::LogInfo { primary_connected, next_lsn, .. }) => {
                assert!(primary_connected);
                assert_eq!(next_lsn, 41);
            }
            f => panic!("expected LogInfo, got {f:?}"),
        }
        tw.send(&Frame::Control(ControlMsg::ReadLog { from_lsn: 1 })).unwrap();
        let mut got = Vec::new();
        loop {
            match next(&mut tr) {
                Frame::Records(r) => got.extend_from_slice(&r),
                Frame::Control(ControlMsg::ReadEnd { next_lsn }) => {
                    assert_eq!(next_lsn, 41);
                    break;
                }
                f => panic!("unexpected {f:?}"),
            }
        }
        assert_eq!(got, body);

        tw.send(&Frame::Control(ControlMsg::Fence { epoch: 2 })).unwrap();
        assert!(matches!(
            next(&mut tr),
            Frame::Control(ControlMsg::LogInfo { epoch: 2, primary_connected: false, .. })
        ));
        assert_eq!(next(&mut pr), Frame::Control(ControlMsg::Fenced { epoch: 2, fork_lsn: 41 }));
        assert!(matches!(pr.recv(WAIT), Err(NetError::Closed)), "the fenced primary's connection is closed");
        let st = b.bunker.status();
        assert!(st.fenced);
        assert_eq!(st.primary.state, "lost");
        assert!(st.primary.lost_reason.unwrap().starts_with(FENCED_REASON));

        let (mut old, _w) = b.connect(Role::Primary, 1);
        assert_eq!(next(&mut old), Frame::Control(ControlMsg::Fenced { epoch: 2, fork_lsn: 41 }));
    }

    #[test]
    fn the_slot_holds_one_heard_primary_and_frees_itself_when_it_falls_silent() {
        let dir = tempfile::tempdir().unwrap();
        let config = BunkerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().to_path_buf(),
            key: None,
            geometry: GEO,
        };
        let b = Bunker::new(config).unwrap();
        let (a1, a2): (SocketAddr, SocketAddr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        b.claim(1, a1, 0, Arc::new(Notify::new())).unwrap();
        let why = b.claim(2, a2, 0, Arc::new(Notify::new())).unwrap_err();
        assert!(why.contains("two primaries at once") && why.contains("127.0.0.1:1"), "{why}");
        assert!(b.primary_connected());
        // Silent past the limit: the slot goes to the next primary; the old one is replaced.
        b.primary.lock().unwrap().active.as_mut().unwrap().heard -= PEER_SILENCE_MAX;
        assert!(!b.primary_connected());
        b.claim(2, a2, 0, Arc::new(Notify::new())).unwrap();
        assert!(!b.heard(1));
        assert!(b.heard(2));
        assert_eq!(b.status().primary.addr.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(b.status().primary.state, "connected");
    }

    #[test]
    fn a_watermark_behind_records_that_wait_for_space_frees_it_in_time() {
        let b = Running::start();
        let (mut pr, mut pw) = b.connect(Role::Primary, 0);
        next(&mut pr);
        next(&mut pr);
        let all = records_of(1100, 4096);
        let cut: usize = split_records_len(&all, 1000);
        pw.send_records(&all[..cut]).unwrap();
        assert_eq!(next(&mut pr), Frame::Ack(Lsn(1000)), "four segments, nearly full");
        // The next frame needs a fifth segment: its append waits for space, which only the
        // watermark queued behind it can give.
        let started = Instant::now();
        pw.send_records(&all[cut..]).unwrap();
        pw.send(&Frame::Control(ControlMsg::Watermark { all_acked_lsn: 600 })).unwrap();
        assert_eq!(next(&mut pr), Frame::Ack(Lsn(1100)));
        assert!(started.elapsed() < Duration::from_secs(10), "acked after {:?}", started.elapsed());
        assert!(b.bunker.core().unwrap().log().start_lsn > Lsn(1));
    }

    /// Bytes of the first `n` records of `body`.
    fn split_records_len(body: &[u8], n: usize) -> usize {
        crate::proto::wire::split_records(body).take(n).map(|r| r.unwrap().len()).sum()
    }
}
