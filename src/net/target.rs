//! `ferryfs target` on the network (tokio): accepts one primary at a time, runs the handshake,
//! feeds frames to the [`TargetCore`], and acks what is durable. Disk work runs on blocking
//! threads; a separate thread applies the log to `--dir` and checkpoints.
//!
//! Connection rules:
//! - only a peer whose hello says `primary` is served; others get `Bye` and are closed;
//! - a primary of another replication set than the one the target's log belongs to is refused;
//! - while one primary is connected (heard from within [`PEER_SILENCE_MAX`]), a second is
//!   refused ("two primaries at once"); a connection silent for longer is dropped in its favour;
//! - any bad frame closes that connection with the reason in the log; nothing from it is kept.
//!
//! Sessions with failover and catch-up tools are in `target_tool.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::conn::{instance_id, nonce};
use crate::journal::JournalGeometry;
use crate::os::storage::DirStorage;
use crate::os::tree::OsTree;
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Established, Frame, FrameDecoder, FrameEncoder, Handshake, HandshakeConfig, Key, Role};
use crate::replica::target::{FrameHandler, TargetCore};

/// A primary that sends nothing (not even a heartbeat) for this long is taken for gone.
pub const PEER_SILENCE_MAX: Duration = Duration::from_secs(5);
/// A failover or catch-up tool may stay silent this long (it works on other targets between
/// its requests to this one); a tool that dies closes its connection, which ends the session
/// at once.
pub const TOOL_SILENCE_MAX: Duration = Duration::from_secs(600);
/// How often a target busy with one frame tells its primary it is still there.
const HEARTBEAT_WHILE_BUSY: Duration = Duration::from_secs(1);
/// How often the apply thread checkpoints the target's directory and log.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

pub type Core = TargetCore<DirStorage, OsTree>;

#[path = "target_tool.rs"]
mod tool;

pub struct TargetConfig {
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub key: Option<Key>,
    pub geometry: JournalGeometry,
}

/// The shared state of a running target.
pub struct Target {
    config: TargetConfig,
    core: Mutex<Option<Arc<Core>>>,
    /// The connected primary: its connection number and when it was last heard from.
    active: Mutex<Option<(u64, Instant)>>,
    next_conn: AtomicU64,
    stop: AtomicBool,
}

impl Target {
    /// Opens the target's log if it has one (finishing an interrupted resync).
    pub fn new(config: TargetConfig) -> anyhow::Result<Arc<Target>> {
        let log = config.state.join("log");
        std::fs::create_dir_all(&log)?;
        let storage = DirStorage::new(&log);
        let core = match storage.read_superblock_if_any()? {
            Some(_) => {
                let tree = OsTree::open(&config.dir)?;
                Some(Arc::new(Core::open(storage, tree, &config.state)?))
            }
            None => None,
        };
        Ok(Arc::new(Target {
            config,
            core: Mutex::new(core),
            active: Mutex::new(None),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
        }))
    }

    pub fn core(&self) -> Option<Arc<Core>> {
        self.core.lock().unwrap().clone()
    }

    /// The core for a primary of set `set_id`, created on the first primary's arrival.
    fn core_for(&self, set_id: [u8; 16]) -> Result<Arc<Core>, String> {
        let mut g = self.core.lock().unwrap();
        if let Some(c) = g.as_ref() {
            if c.set_id() != set_id {
                return Err(format!(
                    "this target belongs to replication set {}, the primary's is {}: refusing it (use a new --state \
                     and --dir to mirror another primary)",
                    hex(&c.set_id()),
                    hex(&set_id)
                ));
            }
            return Ok(c.clone());
        }
        let storage = DirStorage::new(&self.config.state.join("log"));
        let tree =
            OsTree::open(&self.config.dir).map_err(|e| format!("opening --dir {}: {e}", self.config.dir.display()))?;
        let core =
            Core::create(storage, self.config.geometry, set_id, tree, &self.config.state).map_err(|e| e.to_string())?;
        let core = Arc::new(core);
        *g = Some(core.clone());
        Ok(core)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Serves until `stop`. Runs its own tokio runtime.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let applier = self.start_apply_thread();
        let r = rt.block_on(self.clone().accept_loop());
        self.stop();
        let _ = applier.join();
        r
    }

    async fn accept_loop(self: Arc<Self>) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.config.listen).await?;
        tracing::info!("target listening on {}", listener.local_addr()?);
        eprintln!("ferryfs target: listening on {}", listener.local_addr()?);
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
                    eprintln!("ferryfs target: connection from {peer} closed: {why}");
                }
            });
        }
        Ok(())
    }

    async fn serve_conn(self: Arc<Self>, mut sock: TcpStream, peer: SocketAddr) -> Result<(), String> {
        sock.set_nodelay(true).ok();
        let own_set = self.core().map(|c| c.set_id()).unwrap_or([0; 16]);
        let cfg = HandshakeConfig {
            role: Role::Target,
            set_id: own_set,
            epoch: 0,
            instance_id: instance_id(),
            nonce: nonce(),
            key: self.config.key.clone(),
        };
        let (est, leftover) = tokio::time::timeout(super::conn::HANDSHAKE_TIMEOUT, handshake(&mut sock, cfg))
            .await
            .map_err(|_| "the handshake did not complete in time".to_string())??;
        let mut out = Out { enc: FrameEncoder::new(), buf: Vec::new() };
        if est.peer.role == Role::FailoverTool {
            return self.failover_session(&mut sock, &mut out, leftover, est, peer).await;
        }
        if est.peer.role != Role::Primary {
            out.bye(&mut sock, &format!("this is a mirror target; a {} cannot connect to it", est.peer.role.name()))
                .await;
            return Err(format!("refused a {} (only a primary may connect)", est.peer.role.name()));
        }
        let core = match self.core_for(est.peer.set_id) {
            Ok(c) => c,
            Err(why) => {
                out.bye(&mut sock, &why).await;
                return Err(why);
            }
        };
        if let Err(fenced) = core.admits(est.peer.epoch) {
            let _ = out.send(&mut sock, &Frame::Control(fenced)).await;
            return Err(format!(
                "refused primary {peer} of epoch {}: a failover moved this target to epoch {}",
                est.peer.epoch,
                core.epoch()
            ));
        }
        // A primary of a higher epoch (the new primary after a failover): followed from now on.
        let c = core.clone();
        let epoch = est.peer.epoch;
        blocking(move || c.fence(epoch)).await?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Err(why) = self.claim(conn) {
            out.bye(&mut sock, &why).await;
            return Err(why);
        }
        tracing::info!("primary {peer} connected (authenticated: {})", est.authenticated);
        eprintln!("ferryfs target: primary {peer} connected");
        let r = self.clone().session(&mut sock, &mut out, leftover, core, (conn, epoch, est.version)).await;
        let mut a = self.active.lock().unwrap();
        if a.is_some_and(|(c, _)| c == conn) {
            *a = None;
        }
        r
    }

    /// Takes the single primary slot, or says why not.
    fn claim(&self, conn: u64) -> Result<(), String> {
        let mut a = self.active.lock().unwrap();
        match *a {
            Some((_, heard)) if heard.elapsed() < PEER_SILENCE_MAX => {
                Err("another primary is connected to this target; two primaries at once are refused".to_string())
            }
            _ => {
                *a = Some((conn, Instant::now()));
                Ok(())
            }
        }
    }

    /// True while `conn` holds the slot (a silent one may have lost it to a newer primary).
    fn heard(&self, conn: u64) -> bool {
        let mut a = self.active.lock().unwrap();
        match a.as_mut() {
            Some((c, t)) if *c == conn => {
                *t = Instant::now();
                true
            }
            _ => false,
        }
    }

    async fn session(
        self: Arc<Self>,
        sock: &mut TcpStream,
        out: &mut Out,
        leftover: Vec<u8>,
        core: Arc<Core>,
        (conn, peer_epoch, version): (u64, u64, crate::proto::wire::Version),
    ) -> Result<(), String> {
        out.send(sock, &Frame::Control(core.status_msg())).await?;
        if version.minor >= crate::proto::wire::MINOR_FAILOVER {
            out.send(sock, &Frame::Control(core.log_info(true))).await?;
        }
        if version.minor < crate::proto::wire::MINOR_WATERMARK {
            // It will send no all-acked watermark: free what is applied, as it expects.
            core.follow_applied();
        }
        let mut dec = FrameDecoder::new();
        dec.push(&leftover);
        let mut buf = vec![0u8; 1 << 20];
        let handler = Arc::new(Mutex::new(FrameHandler::new()));
        loop {
            let frame = loop {
                match dec.next_frame() {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
                    Err(e) => return Err(format!("bad frame: {e}")),
                }
                let n = tokio::time::timeout(PEER_SILENCE_MAX, sock.read(&mut buf))
                    .await
                    .map_err(|_| format!("the primary was silent for {PEER_SILENCE_MAX:?}"))?
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("the primary closed the connection".into());
                }
                dec.push(&buf[..n]);
            };
            if let Err(fenced) = core.admits(peer_epoch) {
                let _ = out.send(sock, &Frame::Control(fenced)).await;
                return Err("fenced by a failover: the old primary is refused from now on".into());
            }
            if !self.heard(conn) || self.stop.load(Ordering::Acquire) {
                return Err("replaced by a newer primary connection, or stopping".into());
            }
            let resync_end = matches!(frame, Frame::Control(ControlMsg::ResyncEnd { .. }));
            if let Frame::Control(ControlMsg::ResyncBegin { full, .. }) = &frame {
                eprintln!("ferryfs target: resync begins (full: {full})");
            }
            let (c, h) = (core.clone(), handler.clone());
            // Slow disk work (a full log waiting for the apply, a checkpoint's syncfs, a
            // resync's apply) must not read as silence: the primary hears heartbeats meanwhile.
            let work = blocking(move || h.lock().unwrap().handle(&c, frame));
            tokio::pin!(work);
            let replies = loop {
                tokio::select! {
                    r = &mut work => break r?,
                    _ = tokio::time::sleep(HEARTBEAT_WHILE_BUSY) => out.send(sock, &Frame::Heartbeat).await?,
                }
            };
            if resync_end {
                eprintln!("ferryfs target: resync applied");
            }
            for r in replies {
                out.send(sock, &r).await?;
            }
        }
    }

    /// Runs disk work, with heartbeats to the peer while it lasts.
    async fn busy(
        &self,
        sock: &mut TcpStream,
        out: &mut Out,
        work: impl std::future::Future<Output = Result<Frame, String>>,
    ) -> Result<Frame, String> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep(HEARTBEAT_WHILE_BUSY) => out.send(sock, &Frame::Heartbeat).await?,
            }
        }
    }

    /// Whether a primary is connected and was heard from lately.
    fn primary_connected(&self) -> bool {
        self.active.lock().unwrap().is_some_and(|(_, t)| t.elapsed() < PEER_SILENCE_MAX)
    }

    /// Applies settled records as they come, and checkpoints now and then.
    fn start_apply_thread(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("target-apply".into())
            .spawn(move || {
                let mut last_checkpoint = Instant::now();
                let mut failing = false;
                while !me.stop.load(Ordering::Acquire) {
                    let Some(core) = me.core() else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    match core.apply_available() {
                        Ok(0) => std::thread::sleep(Duration::from_millis(2)),
                        Ok(_) => failing = false,
                        Err(e) => {
                            if !failing {
                                tracing::error!("applying to the target directory failed: {e}; retrying");
                                eprintln!("ferryfs target: applying failed: {e}; retrying every second");
                            }
                            failing = true;
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                        if let Err(e) = core.checkpoint() {
                            tracing::error!("target checkpoint failed: {e}");
                        }
                        last_checkpoint = Instant::now();
                    }
                }
                if let Some(core) = me.core() {
                    let _ = core.apply_available();
                    let _ = core.checkpoint();
                }
            })
            .expect("spawning the apply thread")
    }
}

async fn blocking<R: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<R, E> + Send + 'static,
) -> Result<R, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// The async side of the handshake (targets and bunkers): the established peer and any
/// bytes read past the handshake.
pub(super) async fn handshake(sock: &mut TcpStream, cfg: HandshakeConfig) -> Result<(Established, Vec<u8>), String> {
    let mut hs = Handshake::new(cfg);
    let mut buf = [0u8; 4096];
    loop {
        let out = hs.take_outgoing();
        if !out.is_empty() {
            sock.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        if let Some(e) = hs.established() {
            return Ok((*e, Vec::new()));
        }
        let n = sock.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the peer closed the connection during the handshake".into());
        }
        let used = match hs.push(&buf[..n]) {
            Ok(u) => u,
            Err(e) => {
                // Our proof may be queued: the peer learns its own reason from it.
                let out = hs.take_outgoing();
                if !out.is_empty() {
                    let _ = sock.write_all(&out).await;
                }
                return Err(format!("handshake refused: {e}"));
            }
        };
        if let Some(e) = hs.established().copied() {
            let out = hs.take_outgoing();
            if !out.is_empty() {
                sock.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            return Ok((e, buf[used..n].to_vec()));
        }
    }
}

struct Out {
    enc: FrameEncoder,
    buf: Vec<u8>,
}

impl Out {
    async fn send(&mut self, sock: &mut TcpStream, f: &Frame) -> Result<(), String> {
        self.buf.clear();
        self.enc.encode(f, &mut self.buf).map_err(|e| e.to_string())?;
        sock.write_all(&self.buf).await.map_err(|e| e.to_string())
    }

    async fn bye(&mut self, sock: &mut TcpStream, reason: &str) {
        let _ = self.send(sock, &Frame::Control(ControlMsg::Bye { reason: reason.to_string() })).await;
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
