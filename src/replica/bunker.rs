//! The bunker's core (claims 003:1–2, 29–30): a copy of the primary's journal, record for
//! record, in the journal's own format (so `ferryfs inspect` reads it). No network here:
//! `net::bunker` and the primary's `--bunker DIR` link drive it.
//!
//! ```text
//!  Records ──append_raw + sync──> log (the primary's LSNs, byte for byte) ──ack──> primary
//!  Watermark{n} ──> every target holds records up to n: the log may free them
//!  ReadLog{from} <── failover tool: the records from `from` to the end
//!  Fence{epoch} <── failover tool: refuse every primary of a lower epoch from now on
//! ```
//!
//! **Ack = durable.** `receive` returns only after the records are flushed.
//!
//! **What it keeps.** Every record from the primary's last watermark on (the lowest LSN
//! some target may still lack): the journal's retention floor is the watermark, so a
//! checkpoint frees only segments wholly below it. The log is as large as `--log-size`;
//! when it is full and the watermark holds it, `receive` waits (the journal's bounded
//! wait) and then fails: the primary sees the bunker stop acking (sync mode degrades).
//!
//! **Epoch.** The log's superblock carries the replication epoch. A failover fences the
//! bunker at the new epoch before it reads the records, so a primary that is somehow still
//! alive cannot add records behind the failover's back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::superblock::Superblock;
use crate::io::Storage;
use crate::journal::{self, CursorError, Journal, JournalError, JournalGeometry, Retention};
use crate::types::{FileId, Lsn};

/// Where the bunker's log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BunkerLog {
    pub set_id: [u8; 16],
    pub epoch: u64,
    /// The oldest record it still holds.
    pub start_lsn: Lsn,
    /// The next record it expects.
    pub next_lsn: Lsn,
    /// Every record below this is durable.
    pub durable_next: Lsn,
    /// The last watermark the primary sent (records below it may be freed).
    pub watermark_next: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum BunkerError {
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Refused(String),
}

/// The log may free what every target holds (the primary's watermark), nothing more.
struct WatermarkFloor(Arc<AtomicU64>);

impl Retention for WatermarkFloor {
    fn floor(&self) -> Option<Lsn> {
        Some(Lsn(self.0.load(Ordering::Acquire)))
    }
    fn release(&self) {}
}

pub struct BunkerCore<S: Storage> {
    journal: Journal<S>,
    /// Records below this may be freed.
    floor: Arc<AtomicU64>,
    pub records_received: AtomicU64,
    pub bytes_received: AtomicU64,
}

impl<S: Storage> BunkerCore<S> {
    /// Creates the log for replication set `set_id` at `epoch` (the bunker's first primary).
    pub fn create(storage: S, geometry: JournalGeometry, set_id: [u8; 16], epoch: u64) -> Result<Self, BunkerError> {
        let mut sb = Superblock::new(set_id, 0, 0, Vec::new(), [0; 16]);
        sb.epoch = epoch;
        let journal = Journal::create(storage, geometry, sb)?;
        Ok(Self::assemble(journal))
    }

    /// Opens an existing log and finds its end (a torn tail after a crash is cut off: those
    /// records were never acked).
    pub fn open(storage: S) -> Result<Self, BunkerError> {
        let sb = journal::read_superblock(&storage)?;
        let end = journal::replay::find_end(&storage, &sb)?;
        let journal = Journal::open(storage, sb, end.pos, end.next_lsn)?;
        Ok(Self::assemble(journal))
    }

    /// Opens the log in `storage` if there is one.
    pub fn open_if_any(storage: S) -> Result<Option<Self>, BunkerError> {
        match storage.read_superblock() {
            Ok(Some(_)) => Ok(Some(Self::open(storage)?)),
            Ok(None) => Ok(None),
            Err(e) => Err(JournalError::Io("reading the superblock".into(), e).into()),
        }
    }

    fn assemble(journal: Journal<S>) -> Self {
        let floor = Arc::new(AtomicU64::new(journal.superblock().start_lsn.0));
        journal.set_retention(Arc::new(WatermarkFloor(floor.clone())));
        BunkerCore { journal, floor, records_received: AtomicU64::new(0), bytes_received: AtomicU64::new(0) }
    }

    pub fn journal(&self) -> &Journal<S> {
        &self.journal
    }

    pub fn set_id(&self) -> [u8; 16] {
        self.journal.superblock().set_id
    }

    pub fn epoch(&self) -> u64 {
        self.journal.epoch()
    }

    pub fn log(&self) -> BunkerLog {
        let sb = self.journal.superblock();
        BunkerLog {
            set_id: sb.set_id,
            epoch: self.journal.epoch(),
            start_lsn: sb.start_lsn,
            next_lsn: self.journal.next_lsn(),
            durable_next: self.journal.durable_lsn(),
            watermark_next: Lsn(self.floor.load(Ordering::Acquire)),
        }
    }

    /// Whether a primary at `epoch` may ship here: not if a failover fenced this bunker at a
    /// higher one.
    pub fn admits(&self, epoch: u64) -> Result<(), BunkerError> {
        let own = self.epoch();
        if epoch < own {
            return Err(BunkerError::Refused(format!(
                "this bunker was fenced at epoch {own} by a failover; a primary of epoch {epoch} is stale and must \
                 fail back (docs/OPERATIONS.md, \"Failback\")"
            )));
        }
        Ok(())
    }

    /// Restarts the log at `lsn`: the primary's journal no longer holds what would continue
    /// it (a new bunker, or one cut off while the journal overflowed). Records before `lsn`
    /// will never come; the old ones are let go.
    pub fn restart_at(&self, lsn: Lsn) -> Result<(), BunkerError> {
        self.journal.sync()?;
        let next_file_id: FileId = self.journal.superblock().next_file_id;
        self.journal.restart_at(lsn, next_file_id)?;
        self.floor.store(lsn.0, Ordering::Release);
        Ok(())
    }

    /// Appends a Records frame's body and makes it durable; returns the LSN to ack.
    pub fn receive(&self, body: &[u8]) -> Result<Lsn, BunkerError> {
        let count = crate::proto::wire::split_records(body).count() as u64;
        self.journal.append_raw(body)?;
        let next = self.journal.sync()?;
        self.records_received.fetch_add(count, Ordering::Relaxed);
        self.bytes_received.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(Lsn(next.0 - 1))
    }

    /// The primary says every target holds every record up to `all_acked`: the log may free
    /// them. Frees whole segments at once when it can.
    pub fn watermark(&self, all_acked: Lsn) -> Result<(), BunkerError> {
        let next = all_acked.0.saturating_add(1).min(self.journal.durable_lsn().0);
        let before = self.floor.fetch_max(next, Ordering::AcqRel);
        if next > before && Lsn(next) >= self.journal.oldest_segment_end() {
            self.journal.checkpoint()?;
        }
        Ok(())
    }

    /// Appends records from `from` on to `out` (at most about `max_bytes`); returns the LSN
    /// after the last one read. Only durable records are served.
    pub fn read(&self, from: Lsn, max_bytes: usize, out: &mut Vec<u8>) -> Result<Lsn, BunkerError> {
        let end = self.journal.durable_lsn();
        if from >= end {
            return Ok(from);
        }
        let mut cur = self.journal.cursor_at(from).map_err(|e| self.cursor_error(e))?;
        self.journal.read_records(&mut cur, end, max_bytes, out).map_err(|e| self.cursor_error(e))?;
        Ok(cur.next)
    }

    fn cursor_error(&self, e: CursorError) -> BunkerError {
        match e {
            CursorError::Gone(l) => BunkerError::Refused(format!(
                "the bunker no longer holds record {} (its log starts at {}): every target had acked it, or the \
                 bunker was restarted past it",
                l.0,
                self.journal.superblock().start_lsn.0
            )),
            CursorError::Future(l, n) => {
                BunkerError::Refused(format!("record {} is past the bunker's end ({})", l.0, n.0))
            }
            CursorError::Journal(j) => BunkerError::Journal(j),
        }
    }

    /// Refuses every primary below `epoch` from now on; durable before it returns. Never
    /// lowers the epoch.
    pub fn fence(&self, epoch: u64) -> Result<(), BunkerError> {
        if epoch > self.epoch() {
            self.journal.set_epoch(epoch)?;
        }
        Ok(())
    }

    /// A clean stop: syncs, checkpoints, marks the superblock clean.
    pub fn close(&self) -> Result<(), BunkerError> {
        self.journal.sync()?;
        self.journal.checkpoint()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::storage::DirStorage;

    const GEO: JournalGeometry = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };

    /// A primary's journal with `n` one-op transactions, and its records from LSN 1.
    fn primary(dir: &std::path::Path, n: usize) -> (Journal<DirStorage>, Vec<u8>) {
        let sb = Superblock::new([7; 16], 0, 0, Vec::new(), [0; 16]);
        let j = Journal::create(DirStorage::new(dir), GEO, sb).unwrap();
        for i in 0..n {
            let tx = j.append_write(FileId(100), i as u64 * 4096, &[i as u8; 4096]).unwrap();
            j.done(tx);
        }
        let mut cur = j.cursor_at(Lsn(1)).unwrap();
        let mut out = Vec::new();
        j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
        (j, out)
    }

    #[test]
    fn receives_acks_and_serves_records_byte_for_byte() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pj, records) = primary(p.path(), 50);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 0).unwrap();
        let acked = bunker.receive(&records).unwrap();
        assert_eq!(acked, Lsn(pj.next_lsn().0 - 1));
        let mut out = Vec::new();
        assert_eq!(bunker.read(Lsn(1), usize::MAX, &mut out).unwrap(), pj.next_lsn());
        assert_eq!(out, records);
        // Reopened, it still holds them.
        drop(bunker);
        let bunker = BunkerCore::open(DirStorage::new(b.path())).unwrap();
        assert_eq!(bunker.log().next_lsn, pj.next_lsn());
        let mut again = Vec::new();
        bunker.read(Lsn(10), usize::MAX, &mut again).unwrap();
        assert_eq!(&again[..], &records[records.len() - again.len()..]);
    }

    #[test]
    fn refuses_records_of_another_set_or_out_of_order_and_keeps_what_it_had() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_pj, records) = primary(p.path(), 5);
        let other = BunkerCore::create(DirStorage::new(b.path()), GEO, [8; 16], 0).unwrap();
        assert!(other.receive(&records).is_err());
        assert_eq!(other.log().next_lsn, Lsn(1));
        let b2 = tempfile::tempdir().unwrap();
        let bunker = BunkerCore::create(DirStorage::new(b2.path()), GEO, [7; 16], 0).unwrap();
        let second = crate::proto::wire::split_records(&records).nth(1).unwrap().unwrap();
        assert!(bunker.receive(second).is_err(), "record 2 before record 1 is refused");
        assert_eq!(bunker.log().next_lsn, Lsn(1));
    }

    #[test]
    fn restart_at_continues_from_the_primarys_position() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_pj, records) = primary(p.path(), 20);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 0).unwrap();
        bunker.restart_at(Lsn(11)).unwrap();
        let tail: Vec<u8> =
            crate::proto::wire::split_records(&records).skip(10).flat_map(|r| r.unwrap().to_vec()).collect();
        bunker.receive(&tail).unwrap();
        assert_eq!(bunker.log().start_lsn, Lsn(11));
        let mut out = Vec::new();
        assert!(bunker.read(Lsn(5), usize::MAX, &mut out).is_err(), "records before the restart are not there");
        bunker.read(Lsn(11), usize::MAX, &mut out).unwrap();
        assert_eq!(out, tail);
    }

    #[test]
    fn watermark_frees_whole_segments_only_below_it() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // Three segments' worth of records into a four-segment log.
        let (pj, records) = primary(p.path(), 700);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 0).unwrap();
        bunker.receive(&records).unwrap();
        assert_eq!(bunker.log().start_lsn, Lsn(1));
        bunker.watermark(Lsn(400)).unwrap();
        let start = bunker.log().start_lsn;
        assert!(start > Lsn(1) && start <= Lsn(401), "start moved to a segment start at or below 401: {start:?}");
        let mut out = Vec::new();
        bunker.read(Lsn(401), usize::MAX, &mut out).unwrap();
        assert_eq!(crate::proto::wire::split_records(&out).count() as u64, pj.next_lsn().0 - 401);
    }

    #[test]
    fn a_fence_is_durable_and_refuses_lower_epochs() {
        let b = tempfile::tempdir().unwrap();
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 3).unwrap();
        assert!(bunker.admits(3).is_ok());
        bunker.fence(4).unwrap();
        bunker.fence(2).unwrap();
        drop(bunker);
        let bunker = BunkerCore::open(DirStorage::new(b.path())).unwrap();
        assert_eq!(bunker.epoch(), 4);
        let why = bunker.admits(3).unwrap_err().to_string();
        assert!(why.contains("fenced at epoch 4"), "{why}");
        assert!(bunker.admits(4).is_ok());
    }
}
