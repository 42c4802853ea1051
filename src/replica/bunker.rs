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
//! alive cannot add records behind the failover's back. The fence also records where the
//! histories fork ([`FENCE_FILE`]), which the bunker tells an old primary it refuses.
//!
//! **Side files** in the log's directory, next to the superblock and the segments:
//! [`MARKER_FILE`] says the journal there is a bunker's log (a target's log or a primary's
//! journal is not one); [`FENCE_FILE`] holds the last fence.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::record;
use crate::format::segment::SEGMENT_HEADER_SIZE;
use crate::format::superblock::Superblock;
use crate::io::Storage;
use crate::journal::{self, CursorError, Journal, JournalError, JournalGeometry, LogCursor, Retention};
use crate::proto::wire::ControlMsg;
use crate::types::{FileId, Lsn};

/// Written before the log is created: the journal in this directory is a bunker's log.
pub const MARKER_FILE: &str = "bunker";
const MARKER: &[u8] = b"ferryfs bunker log\n";
/// The last fence: its epoch and the fork, the bunker's next LSN when it was fenced
/// ([`FenceRecord::encode`]).
pub const FENCE_FILE: &str = "fence";
const FENCE_MAGIC: [u8; 8] = *b"FRYFENC1";
const FENCE_LEN: usize = 28;

/// A fence, as [`FENCE_FILE`] keeps it: from `epoch` on, the old primary's history and the
/// failover's agree below `fork_lsn` (every record the bunker held then, and nothing after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceRecord {
    pub epoch: u64,
    pub fork_lsn: u64,
}

impl FenceRecord {
    /// "FRYFENC1", epoch (u64 LE), fork LSN (u64 LE), crc32c of the 24 bytes before it.
    pub fn encode(&self) -> [u8; FENCE_LEN] {
        let mut b = [0u8; FENCE_LEN];
        b[..8].copy_from_slice(&FENCE_MAGIC);
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.fork_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<FenceRecord, String> {
        if b.len() != FENCE_LEN || b[..8] != FENCE_MAGIC {
            return Err(format!("not a fence record ({} bytes)", b.len()));
        }
        if crc32c::crc32c(&b[..24]) != u32::from_le_bytes(b[24..].try_into().expect("4 bytes")) {
            return Err("the fence record fails its crc".into());
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Ok(FenceRecord { epoch: u(8), fork_lsn: u(16) })
    }
}

/// Whether the journal in `storage` (if any) is a bunker's log: it has the marker.
pub fn is_bunker_log<S: Storage>(storage: &S) -> std::io::Result<bool> {
    Ok(storage.read_file(MARKER_FILE)?.is_some_and(|m| m == MARKER))
}

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
    /// The marker goes first: a crash before the superblock leaves a marked empty directory.
    pub fn create(storage: S, geometry: JournalGeometry, set_id: [u8; 16], epoch: u64) -> Result<Self, BunkerError> {
        storage
            .write_file_atomic(MARKER_FILE, MARKER)
            .map_err(|e| JournalError::Io(format!("writing the `{MARKER_FILE}` marker"), e))?;
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

    /// The `Status` message a primary gets first: the bunker applies nothing, so its applied
    /// LSN is its durable one.
    pub fn status_msg(&self) -> ControlMsg {
        let durable = self.journal.durable_lsn().0.saturating_sub(1);
        ControlMsg::Status { next_lsn: self.journal.next_lsn().0, durable_lsn: durable, applied_lsn: durable }
    }

    /// The `LogInfo` message: where the log stands. A bunker is never promoted and never
    /// fails back.
    pub fn log_info(&self, primary_connected: bool) -> ControlMsg {
        let log = self.log();
        ControlMsg::LogInfo {
            epoch: log.epoch,
            start_lsn: log.start_lsn.0,
            next_lsn: log.next_lsn.0,
            applied_next: log.next_lsn.0,
            primary_connected,
            promoted: false,
            failback: false,
        }
    }

    /// Appends a Records frame's body and makes it durable; returns the LSN to ack. The frame
    /// is checked whole first (every record whole, its crc good, of this set, continuing the
    /// log): a bad one is refused with nothing of it appended.
    pub fn receive(&self, body: &[u8]) -> Result<Lsn, BunkerError> {
        let room = self.journal.geometry().segment_size as usize - SEGMENT_HEADER_SIZE;
        let count = check_frame(body, self.journal.next_lsn(), &self.set_id(), room)?;
        self.journal.append_raw(body)?;
        let next = self.journal.sync()?;
        self.records_received.fetch_add(count, Ordering::Relaxed);
        self.bytes_received.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(Lsn(next.0 - 1))
    }

    /// The primary says every target holds every record up to `all_acked`: the log may free
    /// them. Frees whole segments at once when it can.
    pub fn watermark(&self, all_acked: Lsn) -> Result<(), BunkerError> {
        let (before, next) = self.raise_watermark(all_acked);
        if next > before && Lsn(next) >= self.journal.oldest_segment_end() {
            self.journal.checkpoint()?;
        }
        Ok(())
    }

    /// The floor part of [`watermark`](Self::watermark) alone: no disk work, so it can run
    /// while an append waits for space (the append's own checkpoint then frees it). Returns
    /// the floor before and the one asked for.
    pub fn raise_watermark(&self, all_acked: Lsn) -> (u64, u64) {
        let next = all_acked.0.saturating_add(1).min(self.journal.durable_lsn().0);
        (self.floor.fetch_max(next, Ordering::AcqRel), next)
    }

    /// Appends records from `from` on to `out` (at most about `max_bytes`); returns the LSN
    /// after the last one read. Only durable records are served.
    pub fn read(&self, from: Lsn, max_bytes: usize, out: &mut Vec<u8>) -> Result<Lsn, BunkerError> {
        let end = self.journal.durable_lsn();
        if from >= end {
            return Ok(from);
        }
        let mut cur = self.cursor(from)?;
        self.read_at(&mut cur, end, max_bytes, out)
    }

    /// A cursor at record `from`, for reading on with [`read_at`](Self::read_at): a long read
    /// finds its place in the log once, not once per piece (each search reads the segment
    /// from its start).
    pub fn cursor(&self, from: Lsn) -> Result<LogCursor, BunkerError> {
        let durable = self.journal.durable_lsn();
        if from > durable {
            return Err(BunkerError::Refused(format!(
                "record {} is past the bunker's durable end ({})",
                from.0, durable.0
            )));
        }
        self.journal.cursor_at(from).map_err(|e| self.cursor_error(e))
    }

    /// Appends the records from `cur` on, below `upto` and below the durable end, to `out`
    /// (about `max_bytes`: at least one record, stopping after the one that reaches it);
    /// returns the LSN after the last one read, where `cur` now stands.
    pub fn read_at(
        &self,
        cur: &mut LogCursor,
        upto: Lsn,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<Lsn, BunkerError> {
        let end = upto.min(self.journal.durable_lsn());
        if cur.next < end {
            self.journal.read_records(cur, end, max_bytes, out).map_err(|e| self.cursor_error(e))?;
        }
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
    /// lowers the epoch. A fence that raises the epoch records the fork first (the log's next
    /// LSN, every record before it durable): a crash between the two leaves the old epoch and
    /// a record the next fence replaces. The caller keeps records from arriving meanwhile.
    pub fn fence(&self, epoch: u64) -> Result<(), BunkerError> {
        if epoch > self.epoch() {
            let fork_lsn = self.journal.sync()?.0;
            let record = FenceRecord { epoch, fork_lsn };
            self.journal
                .storage()
                .write_file_atomic(FENCE_FILE, &record.encode())
                .map_err(|e| JournalError::Io(format!("writing the `{FENCE_FILE}` record"), e))?;
            self.journal.set_epoch(epoch)?;
        }
        Ok(())
    }

    /// Follows a primary of a higher epoch (the new primary after a failover that did not
    /// fence this bunker): primaries below it are refused from now on. No fence record: the
    /// fork is the failover's to know, not this bunker's.
    pub fn follow_epoch(&self, epoch: u64) -> Result<(), BunkerError> {
        if epoch > self.epoch() {
            self.journal.set_epoch(epoch)?;
        }
        Ok(())
    }

    /// The last fence, if this log was ever fenced (an unreadable record reads as none: it
    /// only ever informs an old primary).
    pub fn fence_record(&self) -> Option<FenceRecord> {
        match self.journal.storage().read_file(FENCE_FILE) {
            Ok(Some(b)) => FenceRecord::decode(&b)
                .inspect_err(|e| tracing::warn!("`{FENCE_FILE}` in the bunker's log directory: {e}"))
                .ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("reading `{FENCE_FILE}` in the bunker's log directory: {e}");
                None
            }
        }
    }

    /// Whether a failover fenced this log at its current epoch.
    pub fn fenced(&self) -> bool {
        self.fence_record().is_some_and(|f| f.epoch == self.epoch())
    }

    /// Where the refused old primary's history and the failover's agree below (`Fenced`): the
    /// fork of the fence that set the current epoch, or 0 (unknown).
    pub fn fork_lsn(&self) -> u64 {
        self.fence_record().filter(|f| f.epoch == self.epoch()).map_or(0, |f| f.fork_lsn)
    }

    /// A clean stop: syncs, checkpoints, marks the superblock clean.
    pub fn close(&self) -> Result<(), BunkerError> {
        self.journal.sync()?;
        self.journal.checkpoint()?;
        Ok(())
    }
}

/// Checks a Records body whole before any of it is appended; returns how many records it
/// holds. The journal checks each record again as it appends it (cheap next to the fsync).
/// `room` is what one segment holds: a longer record could never be appended.
fn check_frame(body: &[u8], mut next: Lsn, set_id: &[u8; 16], room: usize) -> Result<u64, BunkerError> {
    if body.is_empty() {
        return Err(BunkerError::Refused("a records frame with no record".into()));
    }
    let mut at = 0;
    let mut count = 0;
    while at < body.len() {
        let rest = &body[at..];
        let h = record::decode_header(rest, rest.len())
            .map_err(|e| BunkerError::Refused(format!("received record at byte {at}: {e}")))?;
        let bad = |e: String| BunkerError::Refused(format!("received record {} refused: {e}", h.lsn.0));
        let rec = rest.get(..record::record_len(h.payload_len as usize)).ok_or_else(|| bad("cut short".into()))?;
        record::verify(rec, &h).map_err(|e| bad(e.to_string()))?;
        if &h.set_id != set_id {
            return Err(bad("it belongs to another replication set".into()));
        }
        if h.lsn != next {
            return Err(bad(format!("out of order: the log expects {}", next.0)));
        }
        if rec.len() > room {
            return Err(bad(format!(
                "its {} bytes do not fit in this bunker's segments ({room} bytes for records): restart the bunker \
                 on a new --dir with a --segment-size at least the primary's",
                rec.len()
            )));
        }
        next = next.next();
        at += rec.len();
        count += 1;
    }
    Ok(count)
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

    #[test]
    fn a_fence_records_the_fork_and_a_retried_one_keeps_it() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pj, records) = primary(p.path(), 10);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 2).unwrap();
        assert!(is_bunker_log(&DirStorage::new(b.path())).unwrap(), "the marker is written on create");
        assert_eq!((bunker.fenced(), bunker.fork_lsn()), (false, 0));
        bunker.receive(&records).unwrap();
        bunker.fence(3).unwrap();
        assert_eq!(bunker.fence_record(), Some(FenceRecord { epoch: 3, fork_lsn: pj.next_lsn().0 }));
        bunker.fence(3).unwrap();
        bunker.restart_at(Lsn(100)).unwrap();
        bunker.fence(3).unwrap();
        assert_eq!(bunker.fork_lsn(), pj.next_lsn().0, "a fence at the same epoch changes nothing");
        drop(bunker);
        let bunker = BunkerCore::open(DirStorage::new(b.path())).unwrap();
        assert!(bunker.fenced());
        bunker.follow_epoch(4).unwrap();
        assert_eq!((bunker.fenced(), bunker.fork_lsn()), (false, 0), "a newer epoch without a fence: fork unknown");
    }

    #[test]
    fn a_fence_record_is_pinned_and_a_damaged_one_is_refused() {
        let r = FenceRecord { epoch: 3, fork_lsn: 0x0102 };
        let b = r.encode();
        assert_eq!(&b[..8], b"FRYFENC1");
        assert_eq!(&b[8..24], &[3, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(FenceRecord::decode(&b), Ok(r));
        let mut bad = b;
        bad[9] ^= 1;
        assert!(FenceRecord::decode(&bad).unwrap_err().contains("crc"));
        assert!(FenceRecord::decode(&b[..20]).is_err());
    }

    #[test]
    fn a_frame_with_one_bad_record_is_refused_whole() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_pj, records) = primary(p.path(), 5);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 0).unwrap();
        let mut damaged = records.clone();
        let last = crate::proto::wire::split_records(&records).last().unwrap().unwrap().len();
        let at = records.len() - last + record::HEADER_SIZE + 20;
        damaged[at] ^= 0xff;
        let why = bunker.receive(&damaged).unwrap_err().to_string();
        assert!(why.contains("received record 5 refused"), "{why}");
        assert_eq!(bunker.log().next_lsn, Lsn(1), "nothing of the frame was appended");
        bunker.receive(&records).unwrap();
        assert_eq!(bunker.log().next_lsn, Lsn(6));
    }

    #[test]
    fn a_record_larger_than_a_segment_is_refused_not_appended() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_pj, records) = primary(p.path(), 1);
        let small = JournalGeometry { segment_size: 4096, segment_count: 4 };
        let bunker = BunkerCore::create(DirStorage::new(b.path()), small, [7; 16], 0).unwrap();
        let why = bunker.receive(&records).unwrap_err().to_string();
        assert!(why.contains("--segment-size"), "{why}");
        assert_eq!(bunker.log().next_lsn, Lsn(1));
    }

    #[test]
    fn reading_on_from_one_cursor_gives_the_same_bytes_as_one_read() {
        let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pj, records) = primary(p.path(), 300);
        let bunker = BunkerCore::create(DirStorage::new(b.path()), GEO, [7; 16], 0).unwrap();
        bunker.receive(&records).unwrap();
        let mut cur = bunker.cursor(Lsn(1)).unwrap();
        let (mut pieces, mut frames) = (Vec::new(), 0);
        while cur.next < pj.next_lsn() {
            bunker.read_at(&mut cur, pj.next_lsn(), 64 << 10, &mut pieces).unwrap();
            frames += 1;
        }
        assert_eq!(pieces, records);
        assert!(frames > 10, "read in pieces: {frames}");
        assert!(bunker.cursor(Lsn(pj.next_lsn().0 + 1)).is_err(), "past the durable end");
    }
}
