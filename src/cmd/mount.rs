//! `ferryfs mount`: the journaled FUSE mount, in the foreground.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fuser::{Config, MountOption, SessionACL};

use super::common::{self, parse_duration, parse_size};
use super::replication::{self, BunkerModeArg, UnreachableArg};
use crate::format::superblock::Superblock;
use crate::fuse::{FerryFs, FuseOptions};
use crate::journal::{JournalGeometry, recovery};
use crate::limits::{SEGMENT_SIZE_MIN, SEGMENTS_MIN};
use crate::os::storage::DirStorage;
use crate::os::tree::OsTree;
use crate::passthrough::{Background, Core, CoreConfig, IdTable, KernelFlush};
use crate::ship::Replication;
use crate::ship::hub::Hub;
use crate::status::StatusServer;

#[derive(clap::Args, Debug)]
#[command(
    about = "Mount a journaled view of a backing directory (runs in the foreground)",
    long_about = "Mounts MOUNTPOINT as a FUSE filesystem that passes every operation through to the backing \
directory and records every change in the journal before it answers.\n\n\
Durability: when fsync, fdatasync or an O_SYNC/O_DSYNC write returns, the data is durable in the \
journal (concurrent fsyncs share one flush). Other writes become durable within --commit-interval. \
The backing directory is synced at each checkpoint (--checkpoint-interval), which frees journal space.\n\n\
The journal directory is created on first use and belongs to this backing directory from then on. \
If the journal was not closed cleanly (a crash, kill -9, power loss), mount first replays it, as \
`ferryfs replay` would.\n\n\
Run as root, the mount is shared by every user with the kernel's permission checks \
(allow_other, default_permissions); --private restricts it to the mounting user.\n\n\
Stops with a clean unmount on SIGINT, SIGTERM or `umount MOUNTPOINT`."
)]
pub struct MountArgs {
    /// Where to mount (an existing, empty, not already mounted directory).
    pub mountpoint: PathBuf,
    /// The directory whose contents are served and journaled.
    #[arg(long, value_name = "DIR")]
    pub backing: PathBuf,
    /// The journal directory (must exist; a journal is created in it on first use).
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// Threads serving kernel requests.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub threads: usize,
    /// Total journal size for a new journal (e.g. 1G, 256M).
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    pub journal_size: u64,
    /// Segment file size for a new journal.
    #[arg(long, default_value = "64M", value_parser = parse_size, value_name = "SIZE")]
    pub segment_size: u64,
    /// Un-synced writes become durable in the journal within this time.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub commit_interval: Duration,
    /// How often the backing directory is synced and journal space freed.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub checkpoint_interval: Duration,
    /// Only the mounting user may use the mount (no allow_other).
    #[arg(long)]
    pub private: bool,
    /// Do not use the kernel's writeback cache (on by default: the kernel gathers small writes
    /// into large requests; the committer syncs the mount before each commit, so un-synced
    /// writes still reach the journal within --commit-interval).
    #[arg(long)]
    pub no_writeback_cache: bool,
    /// Seconds the kernel may cache names and attributes.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub attr_timeout: Duration,
    /// A mirror target: `tcp://HOST:PORT` (a `ferryfs target`) or a directory (a locally mounted
    /// remote filesystem such as NFS, applied to directly). Repeatable. A target seen for the
    /// first time receives a full initial sync while writes go on.
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// With several targets, each keeps the records it received in its own log until every
    /// target has them (the all-acked watermark), so after this machine's loss `ferryfs
    /// catchup` can level them from the most advanced one. A target unreachable for longer
    /// than this stops holding the others' logs back: it falls back to its sync map and is
    /// resynchronized from the changed blocks when it returns (`ferryfs status` says
    /// `timed out`). E.g. 10m, 30s.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub target_timeout: Duration,
    /// A shared secret for every tcp target and a tcp bunker: both sides prove they hold it
    /// (HMAC-SHA256) before any record moves. Make one with
    /// `head -c 32 /dev/urandom | base64 > FILE`.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The bunker: a copy of the journal kept in real time near this machine, from which
    /// `ferryfs failover` brings a target up to the last acknowledged write if this machine is
    /// lost. `tcp://HOST:PORT` is a `ferryfs bunker` process (with --key, as for targets);
    /// a directory (an existing, empty one at first, on another disk or a mounted remote disk,
    /// not inside the backing, journal or mount directories) holds the bunker's log itself,
    /// created on first use with the journal's segment size and count. Every record goes to
    /// the bunker as soon as it is journaled, while the local journal is flushed; the journal
    /// keeps what the bunker has not acknowledged, so it catches up after an outage. If the
    /// journal fills meanwhile, the bunker's copy restarts at a later record (`ferryfs status`
    /// says from where). See also --bunker-mode, --bunker-timeout, --bunker-unreachable.
    #[arg(long, value_name = "URL")]
    pub bunker: Option<String>,
    /// `sync`: fsync, fdatasync and O_SYNC/O_DSYNC writes return only once the journal *and*
    /// the bunker hold the data (no acknowledged write is lost with this machine; each costs
    /// a round trip to the bunker). `async`: they return once the journal holds the data; the
    /// bunker follows within its lag (see `ferryfs status`).
    #[arg(long, requires = "bunker", value_enum, default_value = "sync", value_name = "MODE")]
    pub bunker_mode: BunkerModeArg,
    /// In sync mode, a bunker that is unreachable or has not acknowledged for this long counts
    /// as gone, and --bunker-unreachable decides what fsync does (e.g. 5s, 500ms).
    #[arg(long, requires = "bunker", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub bunker_timeout: Duration,
    /// What sync mode does when the bunker is gone for --bunker-timeout. `degrade`: switch to
    /// async with a loud warning (fsync returns after at most the timeout; acknowledged writes
    /// are then only in the local journal), and back to sync, logged, once the bunker has
    /// caught up. `wait`: fsync keeps waiting until the bunker is back (writes without fsync go
    /// on; `ferryfs status` shows the blocked fsyncs; an unmount gives up on them with EIO).
    #[arg(long, requires = "bunker", value_enum, default_value = "degrade", value_name = "POLICY")]
    pub bunker_unreachable: UnreachableArg,
}

/// In the journal directory: the LSN the last run after a crash recovery began appending at
/// (u64 LE).
pub const RECOVERED_AT_FILE: &str = "recovered-at";

pub fn run(a: MountArgs) -> Result<()> {
    let mountpoint = common::existing_dir("mountpoint", &a.mountpoint)?;
    let backing = common::existing_dir("--backing", &a.backing)?;
    let journal = common::existing_dir("--journal", &a.journal)?;
    check_layout(&mountpoint, &backing, &journal)?;
    let bunker_url = a.bunker.as_deref().map(replication::parse_bunker).transpose()?;
    let bunker_config = match &bunker_url {
        Some(b) => {
            replication::check_bunker(b, &[], &backing, &journal, &mountpoint)?;
            Some(replication::bunker_config(b, a.bunker_mode, a.bunker_unreachable, a.bunker_timeout)?)
        }
        None => None,
    };
    let _lock = common::lock_journal(&journal)?;
    let fd_limit = crate::os::raise_fd_limit();
    if fd_limit < 65_536 {
        eprintln!(
            "ferryfs: warning: only {fd_limit} open files allowed; a large tree may hit EMFILE (raise `ulimit -Hn`)"
        );
    }
    let storage = DirStorage::new(&journal);
    let tree = OsTree::open(&backing).with_context(|| format!("--backing {}", backing.display()))?;
    let boot = common::boot_id();
    let targets = a.targets.iter().map(|t| replication::parse_target(t)).collect::<Result<Vec<_>>>()?;
    replication::check_targets(&targets, &backing, &journal, &mountpoint)?;
    if let Some(b) = &bunker_url {
        replication::check_bunker(b, &targets, &backing, &journal, &mountpoint)?;
    }
    let key = a.key.as_deref().map(replication::read_key).transpose()?;
    let has_journal = storage.read_superblock_if_any()?.is_some();
    let maps = replication::load_maps(&storage, &targets, has_journal)?;
    let promotion = replication::promotion_map(&storage, has_journal)?;

    let mut recovered = false;
    let opened = match storage.read_superblock_if_any()? {
        None => {
            let geometry = geometry(a.journal_size, a.segment_size)?;
            eprintln!(
                "ferryfs: creating a journal in {} ({} segments of {})",
                journal.display(),
                geometry.segment_count,
                common::human_bytes(geometry.segment_size)
            );
            recovery::create(storage, geometry, new_superblock(&backing)?).map_err(|e| anyhow::anyhow!("{e}"))?
        }
        Some(_) => {
            let sb = common::superblock(&storage)?;
            common::check_backing(&sb, &backing, &journal)?;
            let dirty = !sb.clean;
            recovered = dirty;
            if dirty {
                eprintln!("ferryfs: journal {} was not closed cleanly: replaying it", journal.display());
            }
            let bar = common::progress_bar("recovering");
            let opened = recovery::recover(storage, sb.clone(), &tree, boot, false, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .map_err(|e| anyhow::anyhow!("recovery of {} failed: {e}", journal.display()))?;
            bar.finish_and_clear();
            if dirty {
                eprint!("{}", super::replay::describe(&opened.report, &sb, false));
            }
            opened
        }
    };
    if recovered {
        // Where this run's own records begin after a crash: a bunker may hold records past it
        // that this journal lost (a machine crash), so a later failback counts this node's
        // changes from here when it is below the fork (`cmd::failback`, docs/FORMAT.md).
        let at = opened.journal.next_lsn().0;
        crate::io::Storage::write_file_atomic(opened.journal.storage(), RECOVERED_AT_FILE, &at.to_le_bytes())
            .with_context(|| format!("writing {RECOVERED_AT_FILE} in {}", journal.display()))?;
    }
    opened.journal.mark_open(boot).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids = IdTable::from_snapshot(opened.ids.snapshot());
    let core = Arc::new(Core::new(opened.journal, tree, ids, CoreConfig::default())?);
    let hub = (!targets.is_empty() || promotion.is_some()).then(|| {
        let mut named: Vec<_> =
            targets.iter().zip(maps).map(|(t, (upto, map))| (t.url().to_string(), upto, map)).collect();
        named.extend(promotion);
        let hub = Hub::new(core.journal.clone(), named);
        hub.set_target_timeout(a.target_timeout);
        core.set_marks(hub.clone());
        hub
    });
    let bunker = bunker_url.as_ref().zip(bunker_config).map(|(b, mut config)| {
        // Records reach the bunker before the local flush: after a crash it may hold some the
        // recovered journal lost, so its log restarts at the first contact.
        config.restart_first = recovered;
        replication::start_bunker(b, config, &core.journal, hub.clone(), key.as_ref())
    });
    replication::set_retention(&core.journal, hub.clone(), bunker.clone());
    let repl = hub.map(|hub| {
        let sb = core.journal.superblock();
        let conns = replication::connectors(&targets, &journal, sb.set_id, sb.epoch, key.as_ref());
        Replication::start(hub, conns, core.clone())
    });
    if let Some(r) = &repl {
        r.hub.persist().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let status = {
        let (j, h, b, dir) =
            (core.journal.clone(), repl.as_ref().map(|r| r.hub.clone()), bunker.clone(), journal.clone());
        StatusServer::start(&journal, Arc::new(move || replication::report(&j, h.as_deref(), b.as_deref(), &dir)))
            .with_context(|| format!("starting the status socket in {}", journal.display()))?
    };

    let writeback_cache = !a.no_writeback_cache;
    let kernel_flush: Option<KernelFlush> = writeback_cache.then(|| {
        let mnt = mountpoint.clone();
        Arc::new(move || crate::os::syncfs_path(&mnt)) as KernelFlush
    });
    let background = Background::start(&core, a.commit_interval, a.checkpoint_interval, kernel_flush);

    let opts = FuseOptions { ttl: a.attr_timeout, writeback_cache };
    let fs = FerryFs::new(core.clone(), opts);
    let session = fuser::Session::new(fs, &mountpoint, &fuse_config(&a, &backing))
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
    let bg = session.spawn()?;
    eprintln!("ferryfs: {} mounted on {} (journal {})", backing.display(), mountpoint.display(), journal.display());

    let signalled = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, signalled.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, signalled.clone())?;
    while !signalled.load(Ordering::Relaxed) && !bg.guard.is_finished() {
        thread::sleep(Duration::from_millis(50));
    }
    // The timers stop first: the committer's syncfs of the mount must not race the unmount.
    background.stop();
    if let Some(b) = &bunker {
        // An fsync held by `--bunker-unreachable wait` must not hold the unmount for ever.
        b.begin_stop();
    }
    let ended = if bg.guard.is_finished() { bg.join() } else { bg.umount_and_join() };
    if let Err(e) = ended {
        eprintln!("ferryfs: the FUSE session ended with an error: {e}");
    }
    if let Some(r) = repl {
        r.stop();
    }
    if let Some(b) = &bunker {
        b.stop(); // after a final sync: the bunker gets the journal's tail
    }
    drop(status);
    core.journal.close_clean().map_err(|e| anyhow::anyhow!("closing the journal: {e}"))?;
    eprintln!("ferryfs: unmounted {}; journal closed cleanly", mountpoint.display());
    Ok(())
}

fn check_layout(mountpoint: &Path, backing: &Path, journal: &Path) -> Result<()> {
    if mountpoint == backing {
        bail!("the mountpoint and --backing are the same directory ({}); mount somewhere else", backing.display());
    }
    if journal.starts_with(backing) || journal.starts_with(mountpoint) {
        bail!(
            "--journal {} lies inside the backing directory or the mountpoint; put it outside both",
            journal.display()
        );
    }
    if backing.starts_with(mountpoint) {
        bail!("--backing {} lies inside the mountpoint {}", backing.display(), mountpoint.display());
    }
    let here = std::fs::metadata(mountpoint)?;
    let parent = std::fs::metadata(mountpoint.join(".."))?;
    if here.dev() != parent.dev() || here.ino() == parent.ino() {
        bail!(
            "mountpoint {} is busy: something is already mounted there (see /proc/self/mountinfo)",
            mountpoint.display()
        );
    }
    Ok(())
}

fn geometry(journal_size: u64, segment_size: u64) -> Result<JournalGeometry> {
    if segment_size < SEGMENT_SIZE_MIN || !segment_size.is_multiple_of(4096) {
        bail!("--segment-size {segment_size}: must be a multiple of 4 KiB and at least {SEGMENT_SIZE_MIN} bytes");
    }
    let count = journal_size / segment_size;
    if count < SEGMENTS_MIN {
        bail!(
            "--journal-size {journal_size}: must hold at least {SEGMENTS_MIN} segments of --segment-size {segment_size}"
        );
    }
    let count = u32::try_from(count).map_err(|_| anyhow::anyhow!("--journal-size: too many segments"))?;
    Ok(JournalGeometry { segment_size, segment_count: count })
}

fn new_superblock(backing: &Path) -> Result<Superblock> {
    let m = std::fs::metadata(backing)?;
    let path = backing.as_os_str().as_encoded_bytes().to_vec();
    Ok(Superblock::new(rand::random(), m.dev(), m.ino(), path, common::boot_id()))
}

fn fuse_config(a: &MountArgs, backing: &Path) -> Config {
    let root = crate::os::is_root();
    let mut options = vec![
        MountOption::FSName(format!("ferryfs:{}", backing.display())),
        MountOption::Subtype("ferryfs".into()),
        MountOption::DefaultPermissions,
    ];
    if root {
        options.push(MountOption::Dev);
        options.push(MountOption::Suid);
    }
    let mut c = Config::default();
    c.mount_options = options;
    c.acl = if a.private || !root { SessionACL::Owner } else { SessionACL::All };
    c.n_threads = Some(a.threads.max(1));
    c.clone_fd = true;
    c
}
