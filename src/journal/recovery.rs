//! Opening a journal for use: create it, or recover it (replay past the checkpoint) and
//! rebase the log at its end. Shared by `ferryfs mount` and `ferryfs replay`.

use super::error::JournalError;
use super::reader::EndKind;
use super::replay::{self, IDS_FILE, IdMap, Progress, ReplayReport};
use super::writer::{Journal, JournalGeometry, Position};
use crate::format::superblock::Superblock;
use crate::io::{SegmentFile, Storage, Tree};

/// A journal ready for appending, the id table as of its end, and what recovery did.
pub struct Opened<S: Storage> {
    pub journal: Journal<S>,
    pub ids: IdMap,
    pub report: ReplayReport,
}

/// Creates a fresh journal (the storage holds none).
pub fn create<S: Storage>(storage: S, geometry: JournalGeometry, sb: Superblock) -> Result<Opened<S>, JournalError> {
    if storage.segment_count().map_err(|e| JournalError::Io("listing segments".into(), e))? > 0 {
        return Err(JournalError::NoSuperblock);
    }
    let journal = Journal::create(storage, geometry, sb)?;
    let ids = IdMap::load(journal.storage(), &journal.superblock())?;
    Ok(Opened { journal, ids, report: ReplayReport::default() })
}

/// Replays everything past the checkpoint onto `tree`, persists the id table, keeps the bytes
/// of a corrupt tail aside in the journal directory, and rebases the log at its end, so a
/// second replay finds nothing to do.
pub fn recover<S: Storage, T: Tree>(
    storage: S,
    sb: Superblock,
    tree: &T,
    boot_id: [u8; 16],
    discard_after_corruption: bool,
    progress: Progress<'_>,
) -> Result<Opened<S>, JournalError> {
    let mut ids = IdMap::load(&storage, &sb)?;
    let end = replay::find_end(&storage, &sb)?;
    match &end.kind {
        EndKind::Corrupt(why) if !discard_after_corruption => {
            return Err(JournalError::Corrupt(format!(
                "{}, segment file {} offset {}: {why}. Nothing was changed. Replaying would apply the records \
                 before it and discard everything after it: check the disk, keep a copy of the journal directory, \
                 then run `ferryfs replay --discard-after-corruption` to do so",
                end.next_lsn,
                crate::format::segment::segment_name((end.pos.seq % sb.segment_count as u64) as u32),
                end.pos.offset
            )));
        }
        EndKind::Corrupt(_) | EndKind::Torn(_) => keep_tail(&storage, &sb, end.pos, end.next_lsn.0)?,
        EndKind::Clean => {}
    }
    let journal = Journal::open(storage, sb.clone(), end.pos, end.next_lsn)?;
    let mut report = replay::replay(journal.storage(), &sb, tree, &mut ids, Some(&journal), boot_id, progress)?;
    // Opening zeroed a torn or corrupt tail: the end replay saw is no longer the one found.
    report.end = Some(end);
    journal.sync()?;
    journal
        .storage()
        .write_file_atomic(IDS_FILE, &ids.snapshot().encode())
        .map_err(|e| JournalError::Io("writing the id table".into(), e))?;
    journal.rebase_here(ids.next_file_id)?;
    Ok(Opened { journal, ids, report })
}

/// Copies the unreadable rest of a segment to `discarded-lsn-N.bin`, so an operator can
/// still look at it after the log is rebased over it.
fn keep_tail<S: Storage>(storage: &S, sb: &Superblock, pos: Position, lsn: u64) -> Result<(), JournalError> {
    let index = (pos.seq % sb.segment_count as u64) as u32;
    let seg = storage
        .open_segment(index, sb.segment_size, false)
        .map_err(|e| JournalError::Io(format!("opening segment {index}"), e))?;
    let mut tail = vec![0u8; seg.len() - pos.offset as usize];
    seg.read(pos.offset as usize, &mut tail);
    storage
        .write_file_atomic(&format!("discarded-lsn-{lsn}.bin"), &tail)
        .map_err(|e| JournalError::Io("keeping the discarded tail".into(), e))
}
