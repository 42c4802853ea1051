//! `ferryfs bunker`: a recovery node that keeps a real-time copy of a primary's journal, in the
//! foreground.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use super::common::{self, parse_size};
use super::replication::read_key;
use crate::journal::JournalGeometry;
use crate::limits::{SEGMENT_SIZE_MIN, SEGMENTS_MIN};
use crate::net::bunker::{Bunker, BunkerConfig};
use crate::os::storage::DirStorage;
use crate::replica::bunker::{FENCE_FILE, MARKER_FILE, is_bunker_log};
use crate::status::SOCKET_NAME;
use crate::status::bunker_node::BunkerStatusServer;

/// Files a bunker keeps in `--dir` besides its log; anything else there, before the log
/// exists, means the directory is someone else's.
const OWN_FILES: [&str; 4] = ["lock", SOCKET_NAME, MARKER_FILE, FENCE_FILE];

#[derive(clap::Args, Debug)]
#[command(
    about = "Serve as a bunker: keep a real-time copy of a primary's journal for failover",
    long_about = "A bunker is a recovery node near the primary (`ferryfs mount --bunker tcp://HOST:PORT`). \
It keeps a copy of the primary's journal, record for record and byte for byte, in the journal's own format \
in --dir (`ferryfs inspect --journal DIR` reads it). It applies nothing: it has no directory of files, only \
the log.\n\n\
What it keeps: every record the primary ships, appended and made durable (fsync) before it is acknowledged, \
so an acknowledged record survives a crash of the bunker. The log is created when the first primary \
connects and belongs to that primary's replication set from then on; a primary of another set is refused.\n\n\
What trims it: the primary's watermark, the last record every one of its mirror targets holds. Records up \
to the watermark may be freed, whole segments at a time; everything after it is kept. A log that fills \
while the watermark holds it stops acknowledging, and the primary goes on without it (its status says \
so). The primary may also restart the log at its own position (after the bunker was away longer than \
the primary's journal reaches back).\n\n\
How failover uses it: when the primary is lost, `ferryfs failover` fences the bunker at a new epoch (from \
then on the old primary is refused: it is told `Fenced`, with the LSN where the histories fork, kept in \
DIR/fence), reads the records a surviving target lacks from the bunker, and promotes that target. So no \
acknowledged write is lost while the bunker survives the primary.\n\n\
One primary at a time: a second is refused while the first is alive; a primary silent for 5 s is lost \
(logged as `ferryfs bunker: lost the primary ADDR: WHY`, and shown by `ferryfs status --journal DIR`).\n\n\
Authentication: with --key FILE both sides prove knowledge of the shared key (HMAC-SHA256 \
challenge-response) before any record moves. --key is required to listen on a non-loopback address. The \
traffic itself is not encrypted (docs/PROTOCOL.md, Security).\n\n\
Stops on SIGINT or SIGTERM: connections are closed, the log is synced and checkpointed.",
    after_help = "FILES in --dir:\n  \
superblock, seg-*  the log (docs/FORMAT.md)\n  \
bunker             marks the log as a bunker's\n  \
fence              the last fence: epoch and fork LSN (docs/PROTOCOL.md, \"Bunker and failover\")\n  \
lock               held while the bunker runs\n  \
ferryfs.sock       the status socket (`ferryfs status --journal DIR`)\n\n\
EXIT STATUS:\n  \
0  stopped by SIGINT or SIGTERM\n  \
1  an error: a bad --dir, --listen or --key, a --dir in use, or the log could not be opened or closed\n  \
2  bad command-line arguments\n\n\
EXAMPLE:\n  \
ferryfs bunker --listen 10.0.0.2:7080 --dir /var/lib/ferryfs/bunker --key /etc/ferryfs/key\n  \
ferryfs mount /mnt/data --backing /srv/data --journal /var/lib/ferryfs/j --bunker tcp://10.0.0.2:7080 \
--key /etc/ferryfs/key"
)]
pub struct BunkerArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// The bunker's log directory (must exist; empty, or a bunker's log from an earlier run).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Shared secret file, the same as the primary's and the failover tool's --key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Size of the log when it is created. Must be at least the primary's --journal-size: the
    /// bunker keeps everything past the watermark, which can be as much as the primary's whole
    /// journal while a target is away.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    pub log_size: u64,
    /// Segment file size of the log when it is created. A segment must hold the primary's
    /// largest record: keep it at least the primary's --segment-size.
    #[arg(long, default_value = "64M", value_parser = parse_size, value_name = "SIZE")]
    pub segment_size: u64,
}

pub fn run(a: BunkerArgs) -> Result<()> {
    let dir = common::existing_dir("--dir", &a.dir)?;
    let listen = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}: not a HOST:PORT", a.listen))?
        .next()
        .with_context(|| format!("--listen {}: no address", a.listen))?;
    let key = a.key.as_deref().map(read_key).transpose()?;
    if key.is_none() && !listen.ip().is_loopback() {
        bail!(
            "--listen {listen} is not a loopback address: a --key FILE is required there (make one with \
             `head -c 32 /dev/urandom | base64 > FILE` and give the primary the same file)"
        );
    }
    let geometry = geometry(a.log_size, a.segment_size)?;
    vet_dir(&dir)?;
    let listener = bind(listen)?;
    // Before the log is opened: opening cuts a torn tail, which must not happen under a
    // bunker still running on the same directory.
    let _lock = common::lock_journal(&dir).with_context(|| {
        format!("--dir {}: another ferryfs process uses it (a bunker already running?)", dir.display())
    })?;
    let bunker = Bunker::new(BunkerConfig { listen, dir: dir.clone(), key, geometry })?;
    bunker.set_listener(listener);
    if let Some(core) = bunker.core() {
        let log = core.log();
        eprintln!(
            "ferryfs bunker: log of replication set {} at epoch {}: records {}..{} ({} past the watermark)",
            crate::net::bunker::hex(&log.set_id),
            log.epoch,
            log.start_lsn.0,
            log.next_lsn.0,
            log.next_lsn.0.saturating_sub(log.watermark_next.0)
        );
    }
    let source = {
        let b = bunker.clone();
        Arc::new(move || b.status())
    };
    let status = BunkerStatusServer::start(&dir, source)
        .with_context(|| format!("starting the status socket in --dir {}", dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    {
        let b = bunker.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            b.stop();
        });
    }
    let served = bunker.serve();
    drop(status);
    if let Some(core) = bunker.core() {
        core.close().with_context(|| format!("closing the log in {}", dir.display()))?;
    }
    served?;
    eprintln!("ferryfs bunker: stopped");
    Ok(())
}

/// Binds now, so a bad or busy address fails before anything is written to --dir.
fn bind(listen: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(listen).with_context(|| format!("--listen {listen}: cannot listen there"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn geometry(log_size: u64, segment_size: u64) -> Result<JournalGeometry> {
    if segment_size < SEGMENT_SIZE_MIN || !segment_size.is_multiple_of(4096) {
        bail!("--segment-size {segment_size}: must be a multiple of 4 KiB and at least {SEGMENT_SIZE_MIN} bytes");
    }
    let count = log_size / segment_size;
    if count < SEGMENTS_MIN {
        bail!("--log-size {log_size}: must hold at least {SEGMENTS_MIN} segments of --segment-size {segment_size}");
    }
    let count = u32::try_from(count).map_err(|_| anyhow::anyhow!("--log-size {log_size}: too many segments"))?;
    Ok(JournalGeometry { segment_size, segment_count: count })
}

/// `dir` holds a bunker's log, or nothing but a bunker's own files; anything else is refused
/// before a byte is written there.
fn vet_dir(dir: &Path) -> Result<()> {
    let storage = DirStorage::new(dir);
    let found = storage.read_superblock_if_any().map_err(|e| anyhow::anyhow!("--dir {}: {e}", dir.display()))?;
    if found.is_some() {
        let sb = common::superblock(&storage)?;
        if !sb.backing_path.is_empty() || sb.backing_ino != 0 {
            bail!(
                "--dir {} holds a primary's journal (of backing directory {}), not a bunker's log; nothing was \
                 changed: give the bunker an empty directory of its own",
                dir.display(),
                String::from_utf8_lossy(&sb.backing_path)
            );
        }
        let marked =
            is_bunker_log(&storage).with_context(|| format!("--dir {}: reading `{MARKER_FILE}`", dir.display()))?;
        if !marked {
            bail!(
                "--dir {} holds a ferryfs journal that is not a bunker's log (no `{MARKER_FILE}` marker: a mirror \
                 target's log?); nothing was changed: give the bunker an empty directory of its own",
                dir.display()
            );
        }
        return Ok(());
    }
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("--dir {}: cannot list it", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !OWN_FILES.contains(&name.as_str()) && !name.ends_with(".tmp") {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        let shown = foreign.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let more = if foreign.len() > 3 { format!(" and {} more", foreign.len() - 3) } else { String::new() };
        bail!(
            "--dir {} holds {shown}{more} but no bunker log; nothing was changed: give the bunker an empty \
             directory of its own",
            dir.display()
        );
    }
    Ok(())
}
