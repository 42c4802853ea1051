//! `ferryfs failback`: an old primary, failed over while it was away, becomes a mirror target
//! of the new primary and is resynchronized from the locations that differ (claim 003:10).

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::common::{self, parse_size};
use super::replication::read_key;
use crate::format::ids::IdSnapshot;
use crate::io::{Storage, Tree};
use crate::journal::{JournalGeometry, recovery};
use crate::net::target::{Target, TargetConfig};
use crate::os::storage::DirStorage;
use crate::os::tree::OsTree;
use crate::replica::apply::CREATED_MARK_XATTR;
use crate::replica::target::{FAILBACK_FILE, TargetCore};
use crate::ship::hub;
use crate::syncmap::SyncMap;
use crate::types::{FileId, Lsn};

#[derive(clap::Args, Debug)]
#[command(
    about = "Turn an old primary into a mirror target of the new one, resynchronizing only what differs",
    long_about = "Run on the old primary's node after a failover (`ferryfs failover`) promoted a target while \
this node was away. Its mount refuses to ship once it learns of the higher epoch (status: fenced); its \
directory may hold writes the new primary never received, and it lacks what the new primary wrote since.\n\n\
With the old primary unmounted, `ferryfs failback` (1) replays the old journal if it was not closed \
cleanly, (2) prepares a target state under --state from it (the old id table; every object tagged with \
its file id, so nothing is copied), and (3) serves as a mirror target on --listen, like `ferryfs target`. \
Then mount the new primary with `--target tcp://<this node>`: when it connects, it tells this node the \
fork (the LSN where the histories part), this node answers with the locations it changed from the fork \
on (from its old journal, or its sync maps when the journal no longer holds them), and the new primary \
resynchronizes the union of those and of its own changes since the promotion. Only those blocks move; \
never a silent full copy (a full resync happens only when one side's changes cannot be known, and the \
new primary's log says so).\n\n\
When the resync is applied, this node is a plain mirror target of the new primary (its directory equals \
the new primary's); from then on run `ferryfs target --dir <--backing> --state <--state>`. The old \
journal is not changed beyond its own replay; remove it once you no longer need it.\n\n\
Exit status: 0 on a clean stop (SIGINT/SIGTERM), 1 on a refusal or error (nothing changed by a refusal).",
    after_help = "EXAMPLE (old primary, after `ferryfs failover` promoted tcp://mirror:7070):\n  \
ferryfs failback --journal /var/lib/ferryfs/j --backing /srv/data --state /var/lib/ferryfs/fb --listen 0.0.0.0:7070 --key K\n  \
# on the new primary:\n  ferryfs mount /mnt/data --backing /srv/mirror --journal /var/lib/ferryfs/mirror/log --target tcp://oldprimary:7070 --key K"
)]
pub struct FailbackArgs {
    /// The old primary's journal directory.
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// The old primary's backing directory (becomes the mirror directory).
    #[arg(long, value_name = "DIR")]
    pub backing: PathBuf,
    /// The target state to prepare and use (must exist, outside --backing; empty the first time).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Address to listen on for the new primary (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Shared secret file, the same as the new primary's --key. Required off loopback.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Size of the target log created under --state.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    pub log_size: u64,
}

pub fn run(a: FailbackArgs) -> Result<()> {
    let journal = common::existing_dir("--journal", &a.journal)?;
    let backing = common::existing_dir("--backing", &a.backing)?;
    let state = common::existing_dir("--state", &a.state)?;
    for (name, dir) in [("--journal", &journal), ("--backing", &backing)] {
        if state.starts_with(dir) || dir.starts_with(&state) {
            bail!("--state {} and {name} {} overlap; keep the target state apart", state.display(), dir.display());
        }
    }
    let listen = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}: not a HOST:PORT", a.listen))?
        .next()
        .with_context(|| format!("--listen {}: no address", a.listen))?;
    let key = a.key.as_deref().map(read_key).transpose()?;
    if key.is_none() && !listen.ip().is_loopback() {
        bail!("--listen {listen} is not a loopback address: a --key FILE is required there");
    }
    let _journal_lock = common::lock_journal(&journal)?;
    let _state_lock = common::lock_journal(&state)?;
    let storage = DirStorage::new(&journal);
    let sb = common::superblock(&storage)?;
    common::check_backing(&sb, &backing, &journal)?;
    let segment_size = 16u64 << 20;
    let geometry = JournalGeometry { segment_size, segment_count: (a.log_size / segment_size).max(4) as u32 };
    let log = state.join("log");
    std::fs::create_dir_all(&log).with_context(|| format!("creating {}", log.display()))?;
    let _log_lock = common::lock_journal(&log)?;
    if DirStorage::new(&log).read_superblock_if_any()?.is_none() {
        prepare(&journal, &backing, &state, geometry)?;
    } else if !state.join(FAILBACK_FILE).exists() {
        eprintln!(
            "ferryfs failback: {} already completed its failback; serving as a plain target (use `ferryfs target` \
             from now on)",
            state.display()
        );
    } else {
        eprintln!(
            "ferryfs failback: resuming: the state in {} is prepared, waiting for the new primary",
            state.display()
        );
    }
    let target = Target::new(TargetConfig { listen, dir: backing, state: state.clone(), key, geometry })?;
    let core = target.core().context("the prepared target log did not open")?;
    let old = journal.clone();
    core.set_failback_source(Box::new(move |fork| changes_since(&old, fork)));
    let t = target.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        t.stop();
    });
    eprintln!("ferryfs failback: waiting for the new primary to connect (mount it with --target tcp://{listen})");
    target.serve()?;
    eprintln!("ferryfs failback: stopped");
    Ok(())
}

/// Makes the old primary's journal and directory into a target state: replays the journal,
/// tags every object it knows with its file id, and starts a target log where the old
/// journal ends, at its epoch.
fn prepare(journal: &Path, backing: &Path, state: &Path, geometry: JournalGeometry) -> Result<()> {
    let storage = DirStorage::new(journal);
    let sb = common::superblock(&storage)?;
    let tree = OsTree::open(backing).with_context(|| format!("--backing {}", backing.display()))?;
    if !sb.clean {
        eprintln!("ferryfs failback: the old journal was not closed cleanly: replaying it first");
    }
    let opened = recovery::recover(storage, sb.clone(), &tree, common::boot_id(), false, &mut |_, _| {})
        .map_err(|e| anyhow::anyhow!("replaying the old journal {}: {e}", journal.display()))?;
    let old_next = opened.journal.next_lsn();
    opened.journal.close_clean().map_err(|e| anyhow::anyhow!("closing the old journal: {e}"))?;
    let ids: IdSnapshot = opened.ids.snapshot();
    drop(opened);
    let (mut tagged, mut gone) = (0u64, 0u64);
    for (id, handle) in &ids.entries {
        let node = if *id == FileId::ROOT { tree.root() } else { tree.open_handle(handle) };
        match node {
            Ok(n) => {
                tree.set_tag(&n, &sb.set_id, *id).with_context(|| format!("tagging file id {}", id.0))?;
                tagged += 1;
            }
            Err(_) => gone += 1,
        }
    }
    let mut mark = [0u8; 24];
    mark[..16].copy_from_slice(&sb.set_id);
    mark[16..].copy_from_slice(&ids.next_file_id.0.saturating_sub(1).to_le_bytes());
    tree.set_xattr(&tree.root()?, CREATED_MARK_XATTR, &mark, 0).context("setting the created mark")?;
    tree.set_applied_marker(&sb.set_id, old_next.0.saturating_sub(1)).context("setting the applied marker")?;
    let core = TargetCore::create(DirStorage::new(&state.join("log")), geometry, sb.set_id, tree, state)
        .map_err(|e| anyhow::anyhow!("creating the target log: {e}"))?;
    core.journal()
        .storage()
        .write_file_atomic(crate::replica::target::IDS_FILE, &ids.encode())
        .context("writing the target's id table")?;
    core.journal().restart_at(old_next, ids.next_file_id).map_err(|e| anyhow::anyhow!("{e}"))?;
    core.journal().set_epoch(sb.epoch).map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(core);
    std::fs::write(state.join(FAILBACK_FILE), journal.as_os_str().as_encoded_bytes())
        .context("writing the failback marker")?;
    eprintln!(
        "ferryfs failback: prepared {}: {tagged} objects tagged ({gone} ids no longer present), log continues at LSN {} \
         of epoch {}",
        state.display(),
        old_next.0,
        sb.epoch
    );
    Ok(())
}

/// The locations the old primary changed from `fork` on: its journal's records from there,
/// or, when the journal no longer holds them all (a crash recovery frees the log once it is
/// replayed), its targets' sync maps: every map holds what its target never acked, each
/// location with its pending update ids while shipping was ordered, so the locations whose
/// updates all lie below the fork are dropped; a map that fell back keeps all its marks (a
/// superset). A full resync when neither can tell.
fn changes_since(journal: &Path, fork: u64) -> Result<SyncMap, String> {
    let storage = DirStorage::new(journal);
    let sb = crate::journal::read_superblock(&storage).map_err(|e| format!("the old journal: {e}"))?;
    // After a machine crash the bunker (and so the new primary) may hold records this node's
    // journal lost; its own records since then reuse those LSNs.
    let recovered_at = storage
        .read_file(super::mount::RECOVERED_AT_FILE)
        .ok()
        .flatten()
        .and_then(|b| b.try_into().ok().map(u64::from_le_bytes));
    if let Some(r) = recovered_at.filter(|r| *r < fork) {
        // The records [r, fork) exist only in the new history (this node lost them in a
        // machine crash) and this node's own records reuse their LSNs: neither side can say
        // which locations they touched. Safe, and said loudly: a full resync.
        eprintln!(
            "ferryfs failback: this node's journal restarted at LSN {r} after a crash, below the fork {fork}: the \
             records between exist only on the new primary and their locations are unknown here: a FULL resync is \
             needed"
        );
        let mut full = SyncMap::new_in_sync(Lsn(fork));
        full.fall_back();
        full.require_full_resync();
        return Ok(full);
    }
    let mut fresh = SyncMap::new_in_sync(Lsn(fork));
    fresh.fall_back();
    if sb.start_lsn.0 <= fork {
        let mut maps = [(Lsn(fork), fresh)];
        hub::remark_from_journal(&storage, &mut maps).map_err(|e| format!("reading the old journal: {e}"))?;
        let [(_, map)] = maps;
        eprintln!(
            "ferryfs failback: the new primary's history forks at LSN {fork}; this node changed {} blocks since (from its journal)",
            map.dirty_blocks()
        );
        return Ok(map);
    }
    let mut maps = super::replication::map_files(&storage).map_err(|e| e.to_string())?;
    maps.retain(|(name, _, _)| *name != hub::map_file_name(hub::PROMOTION_LINK));
    if maps.is_empty() {
        eprintln!(
            "ferryfs failback: the old journal starts at LSN {} past the fork {fork} and no sync map is left: a FULL \
             resync is needed",
            sb.start_lsn.0
        );
        fresh.require_full_resync();
        return Ok(fresh);
    }
    let mut pairs: Vec<(Lsn, SyncMap)> = maps.into_iter().map(|(_, upto, map)| (upto, map)).collect();
    hub::remark_from_journal(&storage, &mut pairs).map_err(|e| format!("reading the old journal: {e}"))?;
    for (_, m) in &mut pairs {
        // An ordered map knows each location's pending updates: one whose updates all lie
        // below the fork changed only in the history both sides share. "Acking" up to the
        // fork drops exactly those. (A fallen-back map knows no update ids: all of it stays.)
        m.ack(Lsn(fork.saturating_sub(1)));
        fresh.mark_all_of(m, Lsn(fork));
    }
    eprintln!(
        "ferryfs failback: the old journal no longer holds the fork LSN {fork}: using the union of its {} sync maps \
         ({} blocks, a superset of its own changes)",
        pairs.len(),
        fresh.dirty_blocks()
    );
    Ok(fresh)
}
