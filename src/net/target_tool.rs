//! A `ferryfs target`'s sessions with failover and catch-up tools (claims 003:7–9, 002:5–6):
//! the tool fences, moves records in blocks (landed while the last one flushes), promotes,
//! reads the log, applies it, and runs the block-level resync of one target from another.
//! The target's primary sessions are in the parent module.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{Core, HEARTBEAT_WHILE_BUSY, Out, TOOL_SILENCE_MAX, Target, blocking, hex};
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Established, Frame, FrameDecoder};
use crate::replica::target::FrameHandler;

impl Target {
    /// A failover tool (`ferryfs failover`, claims 003:7–9): it reads where the log stands,
    /// fences this target, sends the records it lacks (each block staged, then appended), and
    /// promotes it. A fence takes the primary's slot: a primary still connected is dropped at
    /// its next frame and refused from then on (its epoch is lower).
    pub(super) async fn failover_session(
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
