//! `ferryfs replay`: re-apply the journal to the backing directory after a crash.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::common::{self, human_bytes};
use crate::format::segment::segment_name;
use crate::journal::reader::EndKind;
use crate::journal::recovery;
use crate::journal::replay::{self, IdMap, ReplayReport};
use crate::os::storage::DirStorage;
use crate::os::tree::OsTree;

#[derive(clap::Args, Debug)]
#[command(
    about = "Re-apply the journal to the backing directory after a crash",
    long_about = "Re-applies every transaction past the journal's last checkpoint to the backing directory, \
in log order. Redo is idempotent: running replay twice leaves the same result as once.\n\n\
Transactions: a data write is redone unless an abort record follows it; a namespace or attribute \
operation with a commit record is redone where its effect may be missing; one with an abort is \
skipped; one with no outcome (the crash came before its reply) is redone, and counted as aborted \
if that fails. See docs/FORMAT.md, \"Replay\".\n\n\
Replay stops at the first torn or corrupt record and reports its position and how many records it \
recovered. A torn last record (the normal result of a crash) is set aside in \
discarded-lsn-N.bin in the journal directory. A bad record with valid records after it is \
corruption: replay then changes nothing unless --discard-after-corruption is given.\n\n\
An unreadable journal (no superblock, wrong magic, a newer format version, a segment of the \
wrong size) is refused with nothing changed. `ferryfs mount` runs the same recovery on start \
when the journal was not closed cleanly.\n\n\
Exit status: 0 when the journal was replayed (or, with --dry-run, could be); 1 when it was \
refused."
)]
pub struct ReplayArgs {
    /// The journal directory (as given to `ferryfs mount --journal`).
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// The backing directory the journal belongs to.
    #[arg(long, value_name = "DIR")]
    pub backing: PathBuf,
    /// Say what would be redone; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// When records are corrupt in the middle of the log, apply those before the damage and
    /// discard the rest (they are kept in discarded-lsn-N.bin).
    #[arg(long)]
    pub discard_after_corruption: bool,
}

pub fn run(a: ReplayArgs) -> Result<()> {
    let journal = common::existing_dir("--journal", &a.journal)?;
    let backing = common::existing_dir("--backing", &a.backing)?;
    let _lock = common::lock_journal(&journal)?;
    let storage = DirStorage::new(&journal);
    let sb = common::superblock(&storage)?;
    if !a.dry_run {
        // The records replay frees may be ones a mirror target has not acknowledged: their
        // locations go into the targets' sync maps first, as `mount` does (000:12).
        let files = super::replication::map_files(&storage)?;
        let names: Vec<String> = files.iter().map(|(n, _, _)| n.clone()).collect();
        let mut maps: Vec<(crate::types::Lsn, crate::syncmap::SyncMap)> =
            files.into_iter().map(|(_, upto, map)| (upto, map)).collect();
        super::replication::mark_and_save_named(&storage, &names, &mut maps)?;
    }
    common::check_backing(&sb, &backing, &journal)?;
    let tree = OsTree::open(&backing).map_err(|e| anyhow::anyhow!("--backing {}: {e}", backing.display()))?;
    let bar = common::progress_bar("replaying");
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = if a.dry_run {
        let end = replay::find_end(&storage, &sb)?;
        if let EndKind::Corrupt(why) = &end.kind
            && !a.discard_after_corruption
        {
            bail!("{}: {why}; a replay would refuse (see --discard-after-corruption)", where_(&sb, &end.pos));
        }
        let mut ids = IdMap::load(&storage, &sb)?;
        replay::replay(&storage, &sb, &tree, &mut ids, None, common::boot_id(), &mut progress)?
    } else {
        recovery::recover(storage, sb.clone(), &tree, common::boot_id(), a.discard_after_corruption, &mut progress)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .report
    };
    bar.finish_and_clear();
    print!("{}", describe(&report, &sb, a.dry_run));
    Ok(())
}

fn where_(sb: &crate::format::superblock::Superblock, pos: &crate::journal::Position) -> String {
    format!("segment file {} offset {}", segment_name((pos.seq % sb.segment_count as u64) as u32), pos.offset)
}

/// The operator's summary of a replay (also printed by `mount` when it recovers).
pub fn describe(r: &ReplayReport, sb: &crate::format::superblock::Superblock, dry_run: bool) -> String {
    let mut out = String::new();
    let verb = if dry_run { "would redo" } else { "redid" };
    out += &format!(
        "{} {} records ({}) from lsn {}: {verb} {} transactions ({} already in place), {} aborted transactions skipped\n",
        if dry_run { "dry run: read" } else { "replayed" },
        r.records,
        human_bytes(r.bytes),
        r.from_lsn,
        r.redone,
        r.already,
        r.aborted
    );
    out += &format!(
        "incomplete transactions (no outcome record; the client never got a reply): {} — rule: redone; {} of them failed on redo and count as aborted\n",
        r.incomplete,
        r.incomplete_failed.len()
    );
    for f in &r.incomplete_failed {
        out += &format!("  {f}\n");
    }
    if let Some(end) = &r.end {
        match &end.kind {
            EndKind::Clean => {
                out += &format!("log ended cleanly at {} (next lsn {})\n", where_(sb, &end.pos), end.next_lsn.0)
            }
            EndKind::Torn(why) => {
                out += &format!(
                    "stopped at a torn record at {} (lsn {}): {why}; {} records recovered before it; the torn tail {} kept in discarded-lsn-{}.bin\n",
                    where_(sb, &end.pos),
                    end.next_lsn.0,
                    r.records,
                    if dry_run { "would be" } else { "is" },
                    end.next_lsn.0
                )
            }
            EndKind::Corrupt(why) => {
                out += &format!(
                    "stopped at a corrupt record at {} (lsn {}): {why}; {} records recovered before it; everything after it {} discarded (kept in discarded-lsn-{}.bin)\n",
                    where_(sb, &end.pos),
                    end.next_lsn.0,
                    r.records,
                    if dry_run { "would be" } else { "was" },
                    end.next_lsn.0
                )
            }
        }
    }
    for f in &r.failed {
        out += &format!("WARNING: a committed transaction could not be redone: {f}\n");
    }
    out
}
