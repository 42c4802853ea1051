//! `ferryfs failover`: brings a mirror target to the primary's last acknowledged write from
//! the bunker's copy of the journal, and promotes it (claims 003:1, 7–9).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::common;
use super::replication::read_key;
use crate::net::conn::{self, NetError, Reader, Writer};
use crate::os::storage::DirStorage;
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Frame, HandshakeConfig, Key, Role};
use crate::proto::wire::{MINOR_BLOCKS, MINOR_RESYNC_READ};
use crate::replica::bunker::BunkerCore;
use crate::replica::failover::{IncompleteScan, LogView, Overrides, Plan, plan};
use crate::types::Lsn;

/// How long a peer may stay silent (no frame, no heartbeat) during a failover.
pub(super) const SILENCE_MAX: Duration = Duration::from_secs(30);
/// How long to wait for the bunker and the target to notice a dead primary's silence.
pub(super) const NOTICE_WAIT: Duration = Duration::from_secs(10);
/// Records read at once from a bunker directory (a frame's worth).
const BLOCK_BYTES: usize = 1 << 20;
/// A block of records moved to a target is at least this large (its frames gathered), but
/// for the last: each block is staged, checked and flushed there (claim 003:9).
const MOVE_BLOCK_BYTES: usize = 8 << 20;

#[derive(clap::Args, Debug)]
#[command(
    about = "After the primary's loss: bring a mirror target up to date from the bunker and promote it",
    long_about = "Run by an operator once the primary is lost (claim 003:7). In order:\n\n\
1. Asks the bunker and the target where their logs stand (epoch, oldest and next LSN) and refuses when \
either still hears a live primary (--force overrides), when they belong to different replication sets, \
when the bunker no longer holds records the target lacks, or when the target was being resynchronized and \
the bunker cannot bring it past the point where the resync's read of the primary ended: until then its \
directory is a mix of the primary's states, none of which the primary ever had (--allow-mixed overrides).\n\
2. Fences both at a new epoch (the highest seen + 1), durably: from then on both refuse the old primary, \
which learns at its next contact that it was failed over (it stops shipping; see `ferryfs failback`).\n\
3. Copies every record the target lacks from the bunker, in blocks of about 8 MiB. The target lands each \
block in a staging file, checks every record (crc, set, LSN order), appends them to its own log and makes \
them durable before it acknowledges the block (claim 003:9).\n\
4. Promotes the target: it applies its whole log, in LSN order, to its directory, syncs it, and becomes the \
primary of the new epoch. Records of transactions that were incomplete at the crash are applied by the \
failover rule (below) and listed.\n\n\
Failover rule for incomplete transactions (claim 003:8): the target applies the moved records exactly as \
the primary's own crash recovery would. A data write carries no outcome record unless it failed, so a write \
record without an abort is applied. An operation (create, rename, chmod, ...) whose commit or abort is not \
in the log was cut off by the crash: its client never got a reply, so either outcome is allowed; it is \
redone, and skipped if the redo cannot be done.\n\n\
Afterwards, with the bunker in sync mode, the target holds every write whose fsync returned on the \
primary, in write order. Running failover again is harmless: a promoted target that holds everything the \
bunker has is reported as done. --dry-run reads both sides and the records, and prints what would be \
sent, changing nothing.\n\n\
Then: stop `ferryfs target` on the promoted node and mount its directory as the new primary, with its \
state's log as the journal: `ferryfs mount MNT --backing <target --dir> --journal <target --state>/log`.\n\n\
With several --target: every target is fenced, the bunker's records go to the most advanced one, the others \
are leveled from its log, or by a block-level resync from it when they are behind its log (as `ferryfs \
catchup` does), and --promote (default: the first --target) is promoted. Mount it with the other targets as its --target: they follow it without a full copy.\n\n\
Exit status: 0 when the target is promoted (or already was), 1 on any refusal or error (nothing is \
changed by a refusal before step 2).",
    after_help = "EXAMPLES:\n  ferryfs failover --bunker tcp://10.0.0.2:7301 --target tcp://10.1.0.9:7070 --dry-run\n  \
ferryfs failover --bunker tcp://10.0.0.2:7301 --target tcp://10.1.0.9:7070 --key /etc/ferryfs/key\n  \
ferryfs failover --bunker /mnt/second-disk/bunker --target tcp://10.1.0.9:7070"
)]
pub struct FailoverArgs {
    /// The bunker: `tcp://HOST:PORT` (a `ferryfs bunker`) or the directory of a `--bunker DIR`
    /// mirror.
    #[arg(long, value_name = "URL")]
    pub bunker: String,
    /// A mirror target: `tcp://HOST:PORT` (a `ferryfs target`). One: it is brought up to date
    /// and promoted. Several (repeat the flag): the most advanced gets the bunker's records,
    /// the others are leveled from its log (`ferryfs catchup`), then --promote is promoted.
    #[arg(long = "target", value_name = "URL", required = true)]
    pub targets: Vec<String>,
    /// With several --target: the one to promote (default: the first given).
    #[arg(long, value_name = "URL")]
    pub promote: Option<String>,
    /// Say what would be sent; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Fail over even though the bunker or the target still hears a primary (it is fenced).
    #[arg(long)]
    pub force: bool,
    /// Promote the target even though a resync left its directory mixed past what the bunker
    /// holds (it then shows no state the primary ever had; see the refusal's text).
    #[arg(long)]
    pub allow_mixed: bool,
    /// Shared secret file, the same as the bunker's and the target's --key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

pub fn run(a: FailoverArgs) -> Result<()> {
    if a.targets.len() > 1 {
        return super::failover_several::run(&a);
    }
    if let Some(p) = a.promote.as_ref().filter(|p| **p != a.targets[0]) {
        bail!("--promote {p} is not the --target given ({})", a.targets[0]);
    }
    let target_url = &a.targets[0];
    let key = a.key.as_deref().map(read_key).transpose()?;
    let target_addr = tcp_addr("--target", target_url)?;
    let mut bunker: Box<dyn BunkerSide> = match a.bunker.strip_prefix("tcp://") {
        Some(_) => Box::new(TcpBunker::connect(tcp_addr("--bunker", &a.bunker)?, key.clone())?),
        None => Box::new(DirBunker::open(&a.bunker)?),
    };
    let mut target = TcpTarget::connect(target_addr, key.clone())?;
    // A primary killed a moment ago is still "connected" until its peers notice the silence
    // (a few seconds): ask again for a while before refusing.
    let patience = Instant::now() + NOTICE_WAIT;
    while !a.force && (bunker.view().primary_connected || target.view.primary_connected) && Instant::now() < patience {
        eprintln!("waiting for the bunker and the target to notice that the primary is gone ...");
        std::thread::sleep(Duration::from_secs(1));
        if a.bunker.starts_with("tcp://") {
            bunker = Box::new(TcpBunker::connect(tcp_addr("--bunker", &a.bunker)?, key.clone())?);
        }
        target = TcpTarget::connect(target_addr, key.clone())?;
    }
    if bunker.set_id() != target.set_id {
        bail!(
            "the bunker ({}) and the target ({}) belong to different replication sets ({} and {}); nothing was changed",
            a.bunker,
            target_url,
            hex(&bunker.set_id()),
            hex(&target.set_id)
        );
    }
    let (b, t) = (bunker.view(), target.view);
    eprintln!(
        "bunker {}: epoch {}, holds records {}..{}{}",
        a.bunker,
        b.epoch,
        b.start_lsn,
        b.next_lsn,
        if b.primary_connected { ", a primary is CONNECTED" } else { "" }
    );
    eprintln!(
        "target {}: epoch {}, log holds records below {}{}{}",
        target_url,
        t.epoch,
        t.next_lsn,
        if t.promoted { ", promoted" } else { "" },
        if t.mixed_until > 0 {
            format!(", directory mixed by a resync until LSN {}", t.mixed_until)
        } else {
            String::new()
        }
    );
    let (from, bunker_next, end, epoch) = match plan(b, t, Overrides { live_primary: a.force, mixed: a.allow_mixed })
        .map_err(anyhow::Error::msg)?
    {
        Plan::AlreadyDone { epoch, end_lsn } => {
            println!(
                "already failed over: {} is the primary of epoch {epoch} and holds every record below LSN {end_lsn}; \
                 nothing to do",
                target_url
            );
            return Ok(());
        }
        Plan::Move { from, bunker_next, end, epoch } => (from, bunker_next, end, epoch),
    };
    let to_move = bunker_next.saturating_sub(from);
    if a.dry_run {
        let mut scan = IncompleteScan::default();
        if to_move > 0 {
            bunker.read(Lsn(from), &mut |block| {
                scan.feed(block);
                Ok(())
            })?;
        }
        println!(
            "dry run: would fence the bunker and the target at epoch {epoch}, send {} records ({}) of LSN {from}..{bunker_next} \
             from the bunker to the target, and promote it with every record below LSN {end}",
            scan.records,
            common::human_bytes(scan.bytes)
        );
        report_incomplete(&scan);
        println!("nothing was changed");
        return Ok(());
    }
    bunker.fence(epoch)?;
    target.fence(epoch)?;
    eprintln!("fenced the bunker and the target at epoch {epoch}: the old primary is refused from now on");
    // The bunker's start cannot have moved past `from` since the plan (no primary feeds it now),
    // but a bunker restarted by hand could have: checked again.
    if to_move > 0 && bunker.view().start_lsn > from {
        bail!("the bunker no longer holds record {from}; the target was fenced at epoch {epoch} but not changed");
    }
    let started = Instant::now();
    let scan = move_records(&mut |at, sink| bunker.read(at, sink), &mut target, from, bunker_next)?;
    let moved = started.elapsed();
    eprintln!(
        "moved {} records ({}) in {:.1}s; promoting the target (it applies its log to its directory)",
        scan.records,
        common::human_bytes(scan.bytes),
        moved.as_secs_f64()
    );
    report_incomplete(&scan);
    let promoted = target.promote(epoch, end)?;
    println!(
        "failover complete: {} is the primary of epoch {} and holds every record below LSN {} (applied {}); \
         {} records ({}) came from the bunker in {:.1}s",
        target_url,
        promoted.epoch,
        end,
        promoted.next_lsn,
        scan.records,
        common::human_bytes(scan.bytes),
        started.elapsed().as_secs_f64()
    );
    println!(
        "next: stop `ferryfs target` there and mount its directory as the new primary: \
         ferryfs mount MNT --backing <its --dir> --journal <its --state>/log"
    );
    Ok(())
}

/// Moves the records `[from, end)` that `read` gives (a bunker's or a target's log, in
/// blocks, from an LSN on) to `sink`, with a progress bar, and waits until it holds them all
/// durably. Returns what moved (records, bytes, incomplete operations).
/// A log read from an LSN on, block by block into a sink (a bunker's or a target's).
pub(super) type LogReader<'a> = dyn FnMut(Lsn, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> + 'a;

pub(super) fn move_records(
    read: &mut LogReader<'_>,
    sink: &mut TcpTarget,
    from: u64,
    end: u64,
) -> Result<IncompleteScan> {
    let mut scan = IncompleteScan::default();
    if end <= from {
        return Ok(scan);
    }
    // First a read of what will move, for its aborts: told to the target, they let it apply
    // the records as they land (its apply keeps pace, and a log full of records it had not
    // applied makes room) instead of only at the end.
    if sink.minor >= MINOR_BLOCKS {
        let mut ahead = IncompleteScan::default();
        read(Lsn(from), &mut |frame| {
            ahead.feed(frame);
            Ok(())
        })?;
        sink.known_outcomes(end, &ahead.aborted)?;
    }
    let bar = common::progress_bar("moving records");
    bar.set_style(
        indicatif::ProgressStyle::with_template("moving records {pos}/{len} [{bar:30}] {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_length(end - from);
    // The source's frames (about 1 MiB) gathered into blocks of up to `MOVE_BLOCK_BYTES`: the
    // target stages, checks and fsyncs each block, so fewer, larger blocks cost fewer flushes.
    let mut block = Vec::with_capacity(MOVE_BLOCK_BYTES + (1 << 20));
    read(Lsn(from), &mut |frame| {
        scan.feed(frame);
        block.extend_from_slice(frame);
        if block.len() >= MOVE_BLOCK_BYTES {
            sink.send_block(&block)?;
            block.clear();
        }
        bar.set_position(scan.records);
        Ok(())
    })?;
    if !block.is_empty() {
        sink.send_block(&block)?;
    }
    if scan.records != end - from {
        bail!("{} records of LSN {from}..{end} came to be moved", scan.records);
    }
    sink.wait_acked(Lsn(end - 1))?;
    bar.finish_and_clear();
    Ok(scan)
}

pub(super) fn report_incomplete(scan: &IncompleteScan) {
    let open = scan.incomplete();
    if open.is_empty() {
        println!("incomplete transactions among the moved records: none");
        return;
    }
    println!(
        "incomplete transactions among the moved records: {} (no commit or abort in the log; redone by the \
         failover rule):",
        open.len()
    );
    for i in open.iter().take(10) {
        println!("  lsn {}: {}", i.lsn.0, i.what);
    }
    if open.len() > 10 {
        println!("  ... and {} more", open.len() - 10);
    }
}

pub(super) fn tcp_addr(flag: &str, url: &str) -> Result<SocketAddr> {
    let Some(rest) = url.strip_prefix("tcp://") else {
        bail!("{flag} {url}: expected tcp://HOST:PORT");
    };
    rest.to_socket_addrs()
        .with_context(|| format!("{flag} {url}: not a HOST:PORT"))?
        .next()
        .with_context(|| format!("{flag} {url}: the host has no address"))
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn handshake_cfg(key: Option<Key>) -> HandshakeConfig {
    HandshakeConfig {
        role: Role::FailoverTool,
        // "Tell me": the peers' hellos carry their set ids, compared here.
        set_id: [0; 16],
        epoch: 0,
        instance_id: conn::instance_id(),
        nonce: conn::nonce(),
        key,
    }
}

fn log_view(msg: ControlMsg, who: &str) -> Result<LogView> {
    match msg {
        ControlMsg::LogInfo { epoch, start_lsn, next_lsn, applied_next, primary_connected, promoted, .. } => {
            Ok(LogView { epoch, start_lsn, next_lsn, applied_next, primary_connected, promoted, mixed_until: 0 })
        }
        ControlMsg::Bye { reason } => bail!("{who} refused: {reason}"),
        other => bail!("{who} sent {other:?} instead of where its log stands"),
    }
}

/// The next frame that is not a heartbeat.
pub(super) fn recv(r: &mut Reader, who: &str) -> Result<Frame> {
    loop {
        match r.recv(SILENCE_MAX) {
            Ok(Frame::Heartbeat) => continue,
            Ok(Frame::Control(ControlMsg::Bye { reason })) => bail!("{who} closed the connection: {reason}"),
            Ok(f) => return Ok(f),
            Err(NetError::Timeout(t)) => bail!("{who} was silent for {t:?}"),
            Err(e) => bail!("{who}: {e}"),
        }
    }
}

/// `ReadLog{from}` to a bunker or a target, then every Records frame it sends to `sink`, each
/// checked to continue the last (LSN order, no gap), until its `ReadEnd`.
fn read_log(
    reader: &mut Reader,
    writer: &mut Writer,
    who: &str,
    from: Lsn,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    writer.send(&Frame::Control(ControlMsg::ReadLog { from_lsn: from.0 }))?;
    let mut expect = from;
    let mut last_beat = Instant::now();
    loop {
        match recv(reader, who)? {
            Frame::Records(body) => {
                let first = crate::format::record::decode_header(&body, body.len())
                    .map_err(|e| anyhow::anyhow!("{who} sent a bad record: {e}"))?;
                if first.lsn != expect {
                    bail!("{who} sent record {} where {} was due", first.lsn.0, expect.0);
                }
                let count = crate::proto::wire::split_records(&body).count() as u64;
                expect = Lsn(expect.0 + count);
                sink(&body)?;
            }
            Frame::Control(ControlMsg::ReadEnd { next_lsn }) => {
                if next_lsn != expect.0 {
                    bail!("{who} ended its records at {next_lsn} but sent records up to {}", expect.0);
                }
                return Ok(());
            }
            f => bail!("{who} sent an unexpected {} frame while sending records", f.kind().name()),
        }
        if last_beat.elapsed() >= Duration::from_secs(1) {
            writer.send(&Frame::Heartbeat)?;
            last_beat = Instant::now();
        }
    }
}

fn control(r: &mut Reader, who: &str) -> Result<ControlMsg> {
    match recv(r, who)? {
        Frame::Control(m) => Ok(m),
        f => bail!("{who} sent an unexpected {} frame", f.kind().name()),
    }
}

// ----- the bunker's side --------------------------------------------------------------------

pub(super) trait BunkerSide {
    fn set_id(&self) -> [u8; 16];
    fn view(&mut self) -> LogView;
    fn fence(&mut self, epoch: u64) -> Result<()>;
    /// Every record from `from` to the bunker's end, in blocks.
    fn read(&mut self, from: Lsn, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>;
}

pub(super) struct TcpBunker {
    reader: Reader,
    writer: Writer,
    set_id: [u8; 16],
    view: LogView,
}

impl TcpBunker {
    pub(super) fn connect(addr: SocketAddr, key: Option<Key>) -> Result<TcpBunker> {
        let (mut reader, writer, est) = conn::connect(addr, handshake_cfg(key), Duration::from_secs(5))
            .with_context(|| format!("connecting to the bunker at {addr}"))?;
        if est.peer.role != Role::Bunker {
            bail!("{addr} is a {}, not a bunker", est.peer.role.name());
        }
        let view = log_view(control(&mut reader, "the bunker")?, "the bunker")?;
        Ok(TcpBunker { reader, writer, set_id: est.peer.set_id, view })
    }
}

impl BunkerSide for TcpBunker {
    fn set_id(&self) -> [u8; 16] {
        self.set_id
    }
    fn view(&mut self) -> LogView {
        self.view
    }
    fn fence(&mut self, epoch: u64) -> Result<()> {
        self.writer.send(&Frame::Control(ControlMsg::Fence { epoch }))?;
        self.view = log_view(control(&mut self.reader, "the bunker")?, "the bunker")?;
        if self.view.epoch < epoch {
            bail!("the bunker did not take the fence at epoch {epoch} (it says epoch {})", self.view.epoch);
        }
        Ok(())
    }
    fn read(&mut self, from: Lsn, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        read_log(&mut self.reader, &mut self.writer, "the bunker", from, sink)
    }
}

/// A `--bunker DIR` mirror, read in this process.
pub(super) struct DirBunker {
    core: BunkerCore<DirStorage>,
}

impl DirBunker {
    pub(super) fn open(dir: &str) -> Result<DirBunker> {
        let dir = common::existing_dir("--bunker", Path::new(dir))?;
        let core = BunkerCore::open(DirStorage::new(&dir))
            .map_err(|e| anyhow::anyhow!("--bunker {}: not a bunker's journal copy: {e}", dir.display()))?;
        eprintln!(
            "note: --bunker {} is a directory: whether its primary is still alive cannot be checked from here",
            dir.display()
        );
        Ok(DirBunker { core })
    }
}

impl BunkerSide for DirBunker {
    fn set_id(&self) -> [u8; 16] {
        self.core.set_id()
    }
    fn view(&mut self) -> LogView {
        let l = self.core.log();
        LogView {
            epoch: l.epoch,
            start_lsn: l.start_lsn.0,
            next_lsn: l.next_lsn.0,
            applied_next: l.next_lsn.0,
            primary_connected: false,
            promoted: false,
            mixed_until: 0,
        }
    }
    fn fence(&mut self, epoch: u64) -> Result<()> {
        self.core.fence(epoch).map_err(|e| anyhow::anyhow!("fencing the bunker directory: {e}"))
    }
    fn read(&mut self, from: Lsn, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut at = from;
        let mut block = Vec::with_capacity(BLOCK_BYTES + (64 << 10));
        loop {
            block.clear();
            let next = self.core.read(at, BLOCK_BYTES, &mut block).map_err(|e| anyhow::anyhow!("{e}"))?;
            if next == at {
                return Ok(());
            }
            sink(&block)?;
            at = next;
        }
    }
}

// ----- the target's side --------------------------------------------------------------------

/// A `ferryfs target` as a failover or catch-up tool talks to it.
pub(super) struct TcpTarget {
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    /// The protocol minor both sides speak.
    pub(super) minor: u16,
    pub(super) set_id: [u8; 16],
    pub(super) view: LogView,
    /// Blocks sent whose ack has not been read yet.
    unacked: u64,
    acked: Option<Lsn>,
}

impl TcpTarget {
    pub(super) fn connect(addr: SocketAddr, key: Option<Key>) -> Result<TcpTarget> {
        let (mut reader, writer, est) = conn::connect(addr, handshake_cfg(key), Duration::from_secs(5))
            .with_context(|| format!("connecting to the target at {addr}"))?;
        if est.peer.role != Role::Target {
            bail!("{addr} is a {}, not a mirror target", est.peer.role.name());
        }
        let mut view = log_view(control(&mut reader, "the target")?, "the target")?;
        if est.version.minor >= MINOR_RESYNC_READ {
            match control(&mut reader, "the target")? {
                ControlMsg::MixedUntil { lsn } => view.mixed_until = lsn,
                other => bail!("the target sent {other:?} instead of whether its directory is mixed"),
            }
        }
        Ok(TcpTarget {
            reader,
            writer,
            minor: est.version.minor,
            set_id: est.peer.set_id,
            view,
            unacked: 0,
            acked: None,
        })
    }

    pub(super) fn fence(&mut self, epoch: u64) -> Result<()> {
        self.writer.send(&Frame::Control(ControlMsg::Fence { epoch }))?;
        let mixed_until = self.view.mixed_until;
        self.view = LogView { mixed_until, ..log_view(control(&mut self.reader, "the target")?, "the target")? };
        if self.view.epoch < epoch {
            bail!("the target did not take the fence at epoch {epoch} (it says epoch {})", self.view.epoch);
        }
        Ok(())
    }

    /// Every record of its log from `from` to its end, in blocks (catch-up, claims 002:5–6).
    pub(super) fn read_log(&mut self, from: Lsn, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        read_log(&mut self.reader, &mut self.writer, "the most advanced target", from, sink)
    }

    /// Catch-up's last step: apply every record below `end`; returns where its log stands.
    pub(super) fn apply_log(&mut self, end: u64) -> Result<LogView> {
        self.writer.send(&Frame::Control(ControlMsg::ApplyLog { end_lsn: end }))?;
        let v = log_view(control(&mut self.reader, "the target")?, "the target")?;
        if v.next_lsn != end {
            bail!("the target applied its log but holds records below {}, not {end}", v.next_lsn);
        }
        Ok(v)
    }

    /// Every abort among the records below `below` that follow (`ControlMsg::Aborts`).
    pub(super) fn known_outcomes(&mut self, below: u64, aborted: &[u64]) -> Result<()> {
        let parts: Vec<&[u64]> = if aborted.is_empty() { vec![&[]] } else { aborted.chunks(16384).collect() };
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let msg = ControlMsg::Aborts { below_lsn: below, txids: part.to_vec(), last: i + 1 == n };
            self.writer.send(&Frame::Control(msg))?;
        }
        Ok(())
    }

    /// Sends one block; keeps at most 8 blocks unacknowledged.
    pub(super) fn send_block(&mut self, block: &[u8]) -> Result<()> {
        self.writer.send_records(block)?;
        self.unacked += 1;
        while self.unacked > 8 {
            self.read_ack()?;
        }
        Ok(())
    }

    fn read_ack(&mut self) -> Result<()> {
        match recv(&mut self.reader, "the target")? {
            Frame::Ack(l) => {
                self.acked = Some(l);
                self.unacked = self.unacked.saturating_sub(1);
                Ok(())
            }
            f => bail!("the target sent an unexpected {} frame instead of an ack", f.kind().name()),
        }
    }

    /// Reads the ack of every block sent (one each, in order: a target that made several
    /// durable at once still acks each), then checks that they cover `last`. Stopping at the
    /// first ack past `last` would leave the others to be read as the reply to the next request.
    pub(super) fn wait_acked(&mut self, last: Lsn) -> Result<()> {
        while self.unacked > 0 {
            self.read_ack()?;
        }
        if self.acked.is_none_or(|a| a < last) {
            bail!("the target acknowledged records only up to {:?}, {} was sent", self.acked.map(|l| l.0), last.0);
        }
        Ok(())
    }

    pub(super) fn promote(&mut self, epoch: u64, end: u64) -> Result<LogView> {
        self.writer.send(&Frame::Control(ControlMsg::Promote { epoch, end_lsn: end }))?;
        let v = log_view(control(&mut self.reader, "the target")?, "the target")?;
        if !v.promoted || v.epoch < epoch {
            bail!("the target did not confirm its promotion (it says epoch {}, promoted {})", v.epoch, v.promoted);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that made three blocks durable in one flush acks each block, all with the same
    /// LSN. The tool must read all three before its next request, or it reads an ack as that
    /// request's reply (found by `tools/bench --targets`: "the target sent an unexpected ack
    /// frame" at `ApplyLog` after a 512 MiB catch-up).
    #[test]
    fn the_tool_reads_one_ack_per_block_even_when_a_flush_covers_several() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let info = |next| ControlMsg::LogInfo {
            epoch: 0,
            start_lsn: 1,
            next_lsn: next,
            applied_next: next,
            primary_connected: false,
            promoted: false,
            failback: false,
        };
        let fake = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let cfg = HandshakeConfig {
                role: Role::Target,
                set_id: [3; 16],
                epoch: 0,
                instance_id: [9; 16],
                nonce: [1; 32],
                key: None,
            };
            let (mut r, mut w, _) = conn::handshake(stream, cfg).unwrap();
            w.send(&Frame::Control(info(1))).unwrap();
            w.send(&Frame::Control(ControlMsg::MixedUntil { lsn: 0 })).unwrap();
            for _ in 0..3 {
                assert!(matches!(r.recv(Duration::from_secs(5)).unwrap(), Frame::Records(_)));
            }
            for _ in 0..3 {
                w.send(&Frame::Ack(Lsn(10))).unwrap();
            }
            match r.recv(Duration::from_secs(5)).unwrap() {
                Frame::Control(ControlMsg::ApplyLog { end_lsn: 11 }) => w.send(&Frame::Control(info(11))).unwrap(),
                other => panic!("expected ApplyLog, got {other:?}"),
            }
        });
        let mut t = TcpTarget::connect(addr, None).unwrap();
        for block in three_blocks() {
            t.send_block(&block).unwrap();
        }
        t.wait_acked(Lsn(10)).unwrap();
        let v = t.apply_log(11).expect("the reply to ApplyLog, not a leftover ack");
        assert_eq!(v.applied_next, 11);
        fake.join().unwrap();
    }

    /// Three blocks of one record each (a journal's write records).
    fn three_blocks() -> Vec<Vec<u8>> {
        use crate::format::superblock::Superblock;
        use crate::journal::{Journal, JournalGeometry};
        let sb = Superblock::new([3; 16], 0, 0, Vec::new(), [0; 16]);
        let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
        let j = Journal::create(crate::sim::storage::SimStorage::new(), g, sb).unwrap();
        (0..3u8)
            .map(|i| {
                let at = j.next_lsn();
                let tx = j.append_write(crate::types::FileId(100), u64::from(i) * 10, &[i; 10]).unwrap();
                j.done(tx);
                let mut cur = j.cursor_at(at).unwrap();
                let mut out = Vec::new();
                j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
                out
            })
            .collect()
    }
}
