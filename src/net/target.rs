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

    /// A failover tool (`ferryfs failover`, claims 003:7–9): it reads where the log stands,
    /// fences this target, sends the records it lacks (each block staged, then appended), and
    /// promotes it. A fence takes the primary's slot: a primary still connected is dropped at
    /// its next frame and refused from then on (its epoch is lower).
    async fn failover_session(
        self: Arc<Self>,
        sock: &mut TcpStream,
        out: &mut Out,
        leftover: Vec<u8>,
        est: Established,
        peer: SocketAddr,
    ) -> Result<(), String> {
        let set_id = est.peer.set_id;
        let core = match self.core() {
            // An all-zero set id: a tool asking which set this is (our hello says it).
            Some(c) if c.set_id() == set_id || set_id == [0; 16] => c,
            Some(c) => {
                let why = format!(
                    "this target belongs to replication set {}, the failover names set {}",
                    hex(&c.set_id()),
                    hex(&set_id)
                );
                out.bye(sock, &why).await;
                return Err(why);
            }
            None => {
                let why = "this target has never received anything from a primary: there is nothing to fail over to";
                out.bye(sock, why).await;
                return Err(why.into());
            }
        };
        eprintln!("ferryfs target: failover tool {peer} connected");
        out.send(sock, &Frame::Control(core.log_info(self.primary_connected()))).await?;
        if est.version.minor >= crate::proto::wire::MINOR_RESYNC_READ {
            out.send(sock, &Frame::Control(ControlMsg::MixedUntil { lsn: core.mixed_until() })).await?;
        }
        let mut dec = FrameDecoder::new();
        dec.push(&leftover);
        let mut buf = vec![0u8; 1 << 20];
        let backing = {
            use std::os::unix::fs::MetadataExt;
            let m =
                std::fs::metadata(&self.config.dir).map_err(|e| format!("--dir {}: {e}", self.config.dir.display()))?;
            (m.dev(), m.ino(), self.config.dir.as_os_str().as_encoded_bytes().to_vec())
        };
        // A resync from a catch-up tool (a block-level one, `replica::blocks`).
        let mut resync = FrameHandler::new();
        let mut flush = Flush::default();
        loop {
            let frame = tokio::select! {
                done = flush.done(), if flush.running() => {
                    flush.finished(done, &core, sock, out).await?;
                    continue;
                }
                _ = tokio::time::sleep(HEARTBEAT_WHILE_BUSY), if flush.running() => {
                    out.send(sock, &Frame::Heartbeat).await?;
                    continue;
                }
                f = tool_frame(sock, &mut dec, &mut buf) => match f? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            let c = core.clone();
            if let Frame::Records(body) = frame {
                // Staged and appended now, made durable while the next block comes in.
                let last = blocking(move || c.stage_failover_block(&body)).await?;
                flush.appended(last, &core);
                continue;
            }
            // Anything else comes after every block sent before it is durable and acked.
            while flush.running() {
                let done = flush.done().await;
                flush.finished(done, &core, sock, out).await?;
            }
            let reply: Frame = match frame {
                Frame::Heartbeat => continue,
                Frame::Records(_) => unreachable!("handled above"),
                Frame::Control(ControlMsg::Fence { epoch }) => {
                    *self.active.lock().unwrap() = None;
                    let work = blocking(move || c.fence(epoch).map(|_| Frame::Control(c.log_info(false))));
                    let r = self.busy(sock, out, work).await?;
                    eprintln!("ferryfs target: fenced at epoch {epoch} by failover tool {peer}");
                    r
                }
                Frame::Control(ControlMsg::Promote { epoch, end_lsn }) => {
                    let b = backing.clone();
                    let work = blocking(move || {
                        c.promote(epoch, crate::types::Lsn(end_lsn), b).map(|_| Frame::Control(c.log_info(false)))
                    });
                    let r = self.busy(sock, out, work).await?;
                    eprintln!(
                        "ferryfs target: PROMOTED to primary of epoch {epoch}: every record below LSN {end_lsn} is applied \
                         to {}; stop this target and mount the directory with --journal {}",
                        self.config.dir.display(),
                        self.config.state.join("log").display()
                    );
                    r
                }
                Frame::Control(ControlMsg::ReadLog { from_lsn }) => {
                    self.serve_log(sock, out, &core, crate::types::Lsn(from_lsn)).await?;
                    continue;
                }
                Frame::Control(ControlMsg::ApplyLog { end_lsn }) => {
                    let work = blocking(move || {
                        c.apply_log(crate::types::Lsn(end_lsn)).map(|_| Frame::Control(c.log_info(false)))
                    });
                    let r = self.busy(sock, out, work).await?;
                    eprintln!("ferryfs target: caught up: every record below LSN {end_lsn} is applied");
                    r
                }
                Frame::Control(ControlMsg::Aborts { below_lsn, txids, last }) => {
                    core.known_outcomes(crate::types::Lsn(below_lsn), &txids, last);
                    continue;
                }
                Frame::Control(ControlMsg::DigestRequest) => {
                    let (files, blocks) =
                        self.stream(sock, out, move |sink| c.send_digests(sink).map_err(|e| e.to_string())).await?;
                    eprintln!("ferryfs target: sent the digests of {files} files ({blocks} blocks) to {peer}");
                    continue;
                }
                Frame::Control(ControlMsg::BlockResync { plan, resume_lsn }) => {
                    let mut theirs = crate::replica::blocks::PeerDigests::default();
                    while !theirs.complete() {
                        match tool_frame(sock, &mut dec, &mut buf).await? {
                            Some(Frame::Heartbeat) => {}
                            Some(Frame::Control(m)) => drop(theirs.take(m).map_err(|e| format!("{peer}: {e}"))?),
                            Some(f) => return Err(format!("{peer} sent a {} frame among digests", f.kind().name())),
                            None => return Ok(()),
                        }
                    }
                    let resume = crate::types::Lsn(resume_lsn);
                    let st = self
                        .stream(sock, out, move |sink| {
                            c.send_block_resync(&theirs, plan, resume, sink).map_err(|e| e.to_string())
                        })
                        .await?;
                    eprintln!(
                        "ferryfs target: block-level resync {plan} sent to {peer}: {} of {} blocks differed ({} bytes), \
                         {} directories, {} files",
                        st.blocks_sent, st.blocks, st.data_bytes, st.dirs, st.files
                    );
                    continue;
                }
                Frame::Control(ControlMsg::ResyncEnd { plan }) => {
                    let work =
                        blocking(move || c.resync_end(plan).map(|_| Frame::Control(ControlMsg::ResyncDone { plan })));
                    let r = self.busy(sock, out, work).await?;
                    eprintln!(
                        "ferryfs target: block-level resync {plan} from {peer} applied; the log continues at its end"
                    );
                    r
                }
                f @ (Frame::Data { .. }
                | Frame::Control(
                    ControlMsg::ResyncBegin { .. } | ControlMsg::ResyncEntries { .. } | ControlMsg::ResyncNode { .. },
                )) => {
                    resync.handle(&core, f)?;
                    continue;
                }
                Frame::Control(ControlMsg::Bye { .. }) => return Ok(()),
                other => return Err(format!("the failover tool sent an unexpected {} frame", other.kind().name())),
            };
            out.send(sock, &reply).await?;
        }
    }

    /// `ReadLog{from}` from a catch-up tool (claims 002:5–6): this log's records from `from` to
    /// its durable end in Records frames of about 1 MiB, then `ReadEnd{next}`. A log that no
    /// longer holds `from` says so (`Bye`) and the connection ends.
    async fn serve_log(
        &self,
        sock: &mut TcpStream,
        out: &mut Out,
        core: &Arc<Core>,
        from: crate::types::Lsn,
    ) -> Result<(), String> {
        let mut at = from;
        loop {
            let c = core.clone();
            let read = blocking(move || {
                let mut block = Vec::new();
                c.read_log(at, 1 << 20, &mut block).map(|next| (next, block))
            })
            .await;
            let (next, block) = match read {
                Ok(r) => r,
                Err(why) => {
                    out.bye(sock, &why).await;
                    return Err(why);
                }
            };
            if next == at {
                return out.send(sock, &Frame::Control(ControlMsg::ReadEnd { next_lsn: next.0 })).await;
            }
            out.send(sock, &Frame::Records(block)).await?;
            at = next;
        }
    }

    /// Runs `produce` on a blocking thread and sends every frame it gives to the peer, with
    /// heartbeats while it is quiet; returns what it returned.
    async fn stream<R: Send + 'static>(
        &self,
        sock: &mut TcpStream,
        out: &mut Out,
        produce: impl FnOnce(crate::replica::blocks::Sink<'_>) -> Result<R, String> + Send + 'static,
    ) -> Result<R, String> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
        let work = tokio::task::spawn_blocking(move || {
            produce(&mut |f| tx.blocking_send(f).map_err(|_| "the connection to the tool ended".to_string()))
        });
        loop {
            match tokio::time::timeout(HEARTBEAT_WHILE_BUSY, rx.recv()).await {
                Ok(Some(f)) => out.send(sock, &f).await?,
                Ok(None) => break,
                Err(_) => out.send(sock, &Frame::Heartbeat).await?,
            }
        }
        let r = work.await.map_err(|e| e.to_string())?;
        if let Err(why) = &r {
            out.bye(sock, why).await;
        }
        r
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

/// The failover blocks of a tool session (records staged and appended, `Records` frames) and
/// the flush that makes them durable in the background: one `Ack` per block, once durable, so
/// the tool's window of unacknowledged blocks counts right.
#[derive(Default)]
struct Flush {
    task: Option<tokio::task::JoinHandle<Result<crate::types::Lsn, crate::replica::target::TargetError>>>,
    /// The last LSN of each block appended and not yet acked, in order.
    blocks: std::collections::VecDeque<crate::types::Lsn>,
}

impl Flush {
    fn running(&self) -> bool {
        self.task.is_some()
    }

    /// Waits for the running flush (only called while one runs).
    async fn done(&mut self) -> Result<crate::types::Lsn, String> {
        let task = self.task.as_mut().expect("a flush runs");
        let r = task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
        self.task = None;
        r
    }

    /// A block was appended: a flush starts unless one runs (it starts again when that ends).
    fn appended(&mut self, last: crate::types::Lsn, core: &Arc<Core>) {
        self.blocks.push_back(last);
        self.start(core);
    }

    fn start(&mut self, core: &Arc<Core>) {
        if self.task.is_none() && !self.blocks.is_empty() {
            let c = core.clone();
            self.task = Some(tokio::task::spawn_blocking(move || c.sync_log()));
        }
    }

    /// A flush ended: acks every block now durable, and flushes again for those appended since.
    async fn finished(
        &mut self,
        done: Result<crate::types::Lsn, String>,
        core: &Arc<Core>,
        sock: &mut TcpStream,
        out: &mut Out,
    ) -> Result<(), String> {
        let durable = done?;
        while self.blocks.front().is_some_and(|l| *l <= durable) {
            self.blocks.pop_front();
            out.send(sock, &Frame::Ack(durable)).await?;
        }
        // Those left were appended during the flush: one more flush covers them all.
        self.start(core);
        Ok(())
    }
}

/// The next frame from a tool; `None` when it closed the connection.
async fn tool_frame(sock: &mut TcpStream, dec: &mut FrameDecoder, buf: &mut [u8]) -> Result<Option<Frame>, String> {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame from the failover tool: {e}")),
        }
        let n = tokio::time::timeout(TOOL_SILENCE_MAX, sock.read(buf))
            .await
            .map_err(|_| format!("the failover tool was silent for {TOOL_SILENCE_MAX:?}"))?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        dec.push(&buf[..n]);
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
