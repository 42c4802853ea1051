//! Appending records, group commit and checkpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::JournalError;
use crate::format::ops::Op;
use crate::format::record::{self, HEADER_SIZE, Header, Kind};
use crate::format::segment::{SEGMENT_HEADER_SIZE, SegmentHeader};
use crate::format::superblock::Superblock;
use crate::io::{SegmentFile, Storage};
use crate::limits::WRITE_RECORD_DATA_MAX;
use crate::types::{FileId, Handle, Lsn, TxId};

/// How a journal is laid out on disk; fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalGeometry {
    pub segment_size: u64,
    pub segment_count: u32,
}

/// A place in the log: the segment's global sequence number and the byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

/// Syncs the backing directory and persists the id table; returns the next free file id.
/// Called by a checkpoint before it moves the start of the log.
pub type CheckpointHook = Box<dyn Fn() -> std::io::Result<FileId> + Send + Sync>;

/// See [`Journal::settled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settled {
    pub settled_below: Lsn,
    pub records_below: Lsn,
}

/// Replicas that still need records of this log (mirror targets that have not acked them).
/// A checkpoint never frees a record at or above `floor`. When the log is full and the floor
/// is what holds it, the journal calls `release`: whoever holds the floor gives the records up
/// (a target falls back to its sync map, claim 000:12) rather than block writers for ever.
pub trait Retention: Send + Sync {
    fn floor(&self) -> Option<Lsn>;
    fn release(&self);
}

/// Several holders of log space (the targets' hub and the bunker link): the lowest floor
/// holds; on a full log each is asked to release, and lets go only if it is what holds it
/// (its floor lies below `Journal::oldest_segment_end`).
pub struct AllRetentions(pub Vec<Arc<dyn Retention>>);

impl Retention for AllRetentions {
    fn floor(&self) -> Option<Lsn> {
        self.0.iter().filter_map(|r| r.floor()).min()
    }
    fn release(&self) {
        for r in &self.0 {
            r.release();
        }
    }
}

/// A copy of the log kept elsewhere in real time (the bunker, claims 003:2, 4, 14, 22): an
/// fsync is answered once the local flush *and* the mirror hold its records. The mirror's
/// link sends records as they are appended; `push` only says "someone waits: send now".
pub trait Mirror: Send + Sync {
    /// Records below `below` are appended; a caller is about to wait for them.
    fn push(&self, below: Lsn);
    /// Returns once the mirror holds every record below `below` durably, or once its policy
    /// says to stop waiting (async mode; degraded after `--bunker-timeout`). An error fails
    /// the fsync (a policy that prefers failing to degrading).
    fn wait(&self, below: Lsn) -> Result<(), String>;
    /// Whether `wait(below)` would return at once (without waiting, without degrading):
    /// the mirror holds every record below `below`, or its mode or state asks no waiting.
    fn holds(&self, below: Lsn) -> bool;
}

/// Pieces a record's payload may be given in (a write record: position, data).
const MAX_PAYLOAD_PIECES: usize = 2;

/// How long a writer waits for log space (checkpoints free it) before failing with ENOSPC.
const FULL_WAIT_DEFAULT: Duration = Duration::from_secs(30);

struct State<G> {
    next_lsn: Lsn,
    /// Where the next record goes.
    pos: Position,
    /// Everything before this position has been flushed.
    flushed: Position,
    /// Transactions whose effect on the backing directory is not yet complete, with the
    /// position of their first record: a checkpoint may not move past the oldest.
    inflight: BTreeMap<Lsn, Position>,
    /// The start of the log as the last superblock write recorded it.
    start_seq: u64,
    bytes_appended: u64,
    /// The segment `pos` is in, kept at hand: no segment-table lock per record.
    current: Option<(u64, Arc<G>)>,
}

pub struct Journal<S: Storage> {
    storage: S,
    geometry: JournalGeometry,
    set_id: [u8; 16],
    /// The replication epoch stamped in new records (design §3); changed by a promotion.
    epoch: AtomicU64,
    segments: Mutex<Vec<Option<Arc<S::Segment>>>>,
    state: Mutex<State<S::Segment>>,
    full_wait: Mutex<Duration>,
    flush_lock: Mutex<()>,
    /// Every record with an LSN below this is durable.
    durable: AtomicU64,
    superblock: Mutex<Superblock>,
    checkpoint_lock: Mutex<()>,
    checkpoint_hook: OnceLock<CheckpointHook>,
    retention: OnceLock<Arc<dyn Retention>>,
    mirror: OnceLock<Arc<dyn Mirror>>,
}

impl<S: Storage> Journal<S> {
    /// Creates a new, empty journal in `storage` (which must hold none).
    pub fn create(storage: S, geometry: JournalGeometry, mut sb: Superblock) -> Result<Journal<S>, JournalError> {
        if storage.read_superblock().map_err(io("reading the superblock"))?.is_some() {
            return Err(JournalError::Corrupt("a superblock already exists; refusing to overwrite a journal".into()));
        }
        sb.segment_size = geometry.segment_size;
        sb.segment_count = geometry.segment_count;
        sb.start_lsn = Lsn(1);
        sb.start_seq = 0;
        sb.start_offset = SEGMENT_HEADER_SIZE as u64;
        sb.seq = 0;
        let j = Journal::assemble(storage, sb.clone(), Position { seq: 0, offset: 0 }, Lsn(1));
        // Every segment now, so no writer ever waits for a segment file to be made.
        for index in 1..geometry.segment_count as u64 {
            j.segment_create(index)?;
        }
        j.start_segment(0, Lsn(1))?;
        j.state.lock().unwrap().pos.offset = SEGMENT_HEADER_SIZE as u64;
        j.sync_all_written()?;
        j.write_superblock(|s| *s = sb)?;
        Ok(j)
    }

    /// Opens a journal whose valid records end at `end` (with `next_lsn` the next LSN), as
    /// recovery found it. Everything the crashed run wrote after `end` is zeroed
    /// (`clear_after`), so none of it can ever be read as continuing the new log.
    pub fn open(storage: S, sb: Superblock, end: Position, next_lsn: Lsn) -> Result<Journal<S>, JournalError> {
        let j = Journal::assemble(storage, sb, end, next_lsn);
        j.clear_after(end)?;
        Ok(j)
    }

    fn assemble(storage: S, sb: Superblock, end: Position, next_lsn: Lsn) -> Journal<S> {
        let geometry = JournalGeometry { segment_size: sb.segment_size, segment_count: sb.segment_count };
        // After a process crash the log read back may still be only in the page cache: the
        // first flush covers it all, from the start of the log.
        let state = State {
            next_lsn,
            pos: end,
            flushed: Position { seq: sb.start_seq, offset: 0 },
            inflight: BTreeMap::new(),
            start_seq: sb.start_seq,
            bytes_appended: 0,
            current: None,
        };
        Journal {
            storage,
            geometry,
            set_id: sb.set_id,
            epoch: AtomicU64::new(sb.epoch),
            segments: Mutex::new(vec![None; geometry.segment_count as usize]),
            state: Mutex::new(state),
            full_wait: Mutex::new(FULL_WAIT_DEFAULT),
            flush_lock: Mutex::new(()),
            durable: AtomicU64::new(next_lsn.0),
            superblock: Mutex::new(sb),
            checkpoint_lock: Mutex::new(()),
            checkpoint_hook: OnceLock::new(),
            retention: OnceLock::new(),
            mirror: OnceLock::new(),
        }
    }

    /// Sets what a checkpoint does to the backing directory before it frees log space.
    pub fn set_checkpoint_hook(&self, hook: CheckpointHook) {
        let _ = self.checkpoint_hook.set(hook);
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn geometry(&self) -> JournalGeometry {
        self.geometry
    }

    pub fn superblock(&self) -> Superblock {
        self.superblock.lock().unwrap().clone()
    }

    /// The replication epoch (design §3).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Moves to replication epoch `epoch` (a promotion, or a fence): durable in the superblock
    /// before it returns; records appended afterwards carry it.
    pub fn set_epoch(&self, epoch: u64) -> Result<(), JournalError> {
        self.write_superblock(|sb| sb.epoch = epoch)?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Records which backing directory the journal belongs to (a promoted target's log
    /// becomes the new primary's journal over the target's directory).
    pub fn set_backing(&self, dev: u64, ino: u64, path: Vec<u8>) -> Result<(), JournalError> {
        self.write_superblock(|sb| {
            sb.backing_dev = dev;
            sb.backing_ino = ino;
            sb.backing_path = path;
        })
    }

    /// The next LSN to be assigned.
    pub fn next_lsn(&self) -> Lsn {
        self.state.lock().unwrap().next_lsn
    }

    /// Every record below this LSN is durable.
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Acquire))
    }

    pub fn bytes_appended(&self) -> u64 {
        self.state.lock().unwrap().bytes_appended
    }

    // ----- appending ---------------------------------------------------------------------

    /// Journals a data write as its own transaction (split into records of at most
    /// `WRITE_RECORD_DATA_MAX` bytes). The transaction stays in flight until `done`/`abort`.
    pub fn append_write(&self, file: FileId, offset: u64, data: &[u8]) -> Result<TxId, JournalError> {
        self.append_write_stamped(file, offset, data).map(|(tx, _)| tx)
    }

    /// `append_write`, also returning the time stamped in its last record: the file's mtime
    /// once the write is applied, on the primary and at every target (so they agree).
    pub fn append_write_stamped(&self, file: FileId, offset: u64, data: &[u8]) -> Result<(TxId, u64), JournalError> {
        let max = self.write_chunk_max();
        let mut first: Option<TxId> = None;
        let mut at = 0usize;
        loop {
            let n = (data.len() - at).min(max);
            let prefix = record::write_prefix(file, offset + at as u64);
            let chunk = &data[at..at + n];
            let (lsn, time) = self.append_stamped(Kind::Write, first, &[&prefix, chunk], first.is_none())?;
            first.get_or_insert(TxId(lsn.0));
            at += n;
            if at >= data.len() {
                return Ok((first.unwrap(), time));
            }
        }
    }

    fn write_chunk_max(&self) -> usize {
        let room = self.geometry.segment_size as usize - SEGMENT_HEADER_SIZE - HEADER_SIZE - 16;
        WRITE_RECORD_DATA_MAX.min(room / 2)
    }

    /// Journals the intent of a namespace or attribute operation; in flight until its outcome.
    pub fn append_op(&self, op: &Op) -> Result<TxId, JournalError> {
        let mut payload = Vec::with_capacity(64);
        op.encode(&mut payload);
        let lsn = self.append(Kind::Op, None, &[&payload], true)?;
        Ok(TxId(lsn.0))
    }

    /// Journals "file id → backing handle", as part of transaction `tx` (or on its own).
    pub fn append_bind(&self, tx: Option<TxId>, id: FileId, handle: &Handle) -> Result<Lsn, JournalError> {
        self.append(Kind::Bind, tx, &[&record::encode_bind(id, handle)], false)
    }

    /// Records that `tx` was applied, and ends it.
    pub fn commit(&self, tx: TxId) -> Result<Lsn, JournalError> {
        let r = self.append(Kind::Commit, Some(tx), &[], false);
        self.done(tx);
        r
    }

    /// Records that `tx` was applied, leaving it in flight until `done` (the caller has more
    /// to do first that must precede shipping, such as marking sync maps).
    /// Returns the commit's LSN and the time in its header, which is the mtime the op gives the
    /// objects it changes (see `passthrough::Core`).
    pub fn append_commit(&self, tx: TxId) -> Result<(Lsn, u64), JournalError> {
        self.append_stamped(Kind::Commit, Some(tx), &[], false)
    }

    /// Records that `tx` failed with `errno`, leaving it in flight until `done`.
    pub fn append_abort(&self, tx: TxId, errno: i32) -> Result<Lsn, JournalError> {
        self.append(Kind::Abort, Some(tx), &[&(errno as u32).to_le_bytes()], false)
    }

    /// Records that replay redid the namespace op `tx` in boot `boot_id`.
    pub fn redone(&self, tx: TxId, boot_id: [u8; 16]) -> Result<Lsn, JournalError> {
        self.append(Kind::Redone, Some(tx), &[&boot_id], false)
    }

    /// Records that `tx` failed with `errno` (redo skips it), and ends it.
    pub fn abort(&self, tx: TxId, errno: i32) -> Result<Lsn, JournalError> {
        let r = self.append(Kind::Abort, Some(tx), &[&(errno as u32).to_le_bytes()], false);
        self.done(tx);
        r
    }

    /// Ends a transaction that needs no outcome record (a data write that succeeded).
    pub fn done(&self, tx: TxId) {
        self.state.lock().unwrap().inflight.remove(&Lsn(tx.0));
    }

    /// How long a writer waits for log space before it fails with ENOSPC (default 30 s).
    pub fn set_full_wait(&self, wait: Duration) {
        *self.full_wait.lock().unwrap() = wait;
    }

    /// Appends one record; waits (bounded) for log space when the journal is full.
    fn append(&self, kind: Kind, tx: Option<TxId>, payload: &[&[u8]], inflight: bool) -> Result<Lsn, JournalError> {
        self.append_stamped(kind, tx, payload, inflight).map(|(lsn, _)| lsn)
    }

    /// Appends one record; returns its LSN and the time stamped in its header.
    fn append_stamped(
        &self,
        kind: Kind,
        tx: Option<TxId>,
        payload: &[&[u8]],
        inflight: bool,
    ) -> Result<(Lsn, u64), JournalError> {
        let wait = *self.full_wait.lock().unwrap();
        let deadline = Instant::now() + wait;
        loop {
            match self.try_append(kind, tx, payload, inflight)? {
                Some(stamped) => return Ok(stamped),
                None if Instant::now() < deadline => self.make_room()?,
                None => {
                    return Err(JournalError::Full(format!(
                        "no free segment after {:?}; a transaction stays in flight or checkpoints fail",
                        wait
                    )));
                }
            }
        }
    }

    /// Appends, or returns `None` when the next segment is still needed by the log.
    fn try_append(
        &self,
        kind: Kind,
        tx: Option<TxId>,
        payload: &[&[u8]],
        inflight: bool,
    ) -> Result<Option<(Lsn, u64)>, JournalError> {
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        let len = record::record_len(payload_len) as u64;
        let mut st = self.state.lock().unwrap();
        if st.pos.offset + len > self.geometry.segment_size {
            let next = st.pos.seq + 1;
            if next - st.start_seq >= self.geometry.segment_count as u64 {
                return Ok(None);
            }
            self.start_segment(next, st.next_lsn)?;
            st.pos = Position { seq: next, offset: SEGMENT_HEADER_SIZE as u64 };
        }
        let lsn = st.next_lsn;
        let time_ns = now_ns();
        let header = Header {
            kind,
            lsn,
            txid: tx.unwrap_or(TxId(lsn.0)),
            payload_len: 0,
            crc: 0,
            set_id: self.set_id,
            epoch: self.epoch.load(Ordering::Relaxed),
            time_ns,
        };
        let hdr = record::encode_header(header, payload);
        let pad = [0u8; record::RECORD_ALIGN];
        // Header, payload pieces, padding: gathered on the stack (no allocation per record).
        assert!(payload.len() <= MAX_PAYLOAD_PIECES, "a record's payload comes in at most {MAX_PAYLOAD_PIECES} pieces");
        let mut parts: [&[u8]; MAX_PAYLOAD_PIECES + 2] = [&[]; MAX_PAYLOAD_PIECES + 2];
        parts[0] = &hdr;
        parts[1..=payload.len()].copy_from_slice(payload);
        parts[payload.len() + 1] = &pad[..record::padding_len(payload_len)];
        if st.current.as_ref().is_none_or(|(seq, _)| *seq != st.pos.seq) {
            st.current = Some((st.pos.seq, self.segment(st.pos.seq)?));
        }
        let (_, seg) = st.current.as_ref().expect("set just above");
        seg.write(st.pos.offset as usize, &parts[..payload.len() + 2]);
        if inflight {
            let at = st.pos;
            st.inflight.insert(lsn, at);
        }
        st.pos.offset += len;
        st.next_lsn = lsn.next();
        st.bytes_appended += len;
        Ok(Some((lsn, time_ns)))
    }

    /// Appends records that another node journaled, byte for byte (a mirror target's or a
    /// bunker's copy of the primary's log: style.md example 2). Each must be whole, pass its
    /// crc, carry this journal's set id and continue its LSNs; the first that does not is
    /// refused, and nothing from it on is appended. Returns the next LSN.
    pub fn append_raw(&self, records: &[u8]) -> Result<Lsn, JournalError> {
        let mut at = 0;
        while at < records.len() {
            let rest = &records[at..];
            let h = record::decode_header(rest, rest.len())
                .map_err(|e| JournalError::Corrupt(format!("received record at byte {at}: {e}")))?;
            let len = record::record_len(h.payload_len as usize);
            let rec = rest
                .get(..len)
                .ok_or_else(|| JournalError::Corrupt(format!("received record {} is cut short", h.lsn.0)))?;
            record::verify(rec, &h).map_err(|e| JournalError::Corrupt(format!("received record {}: {e}", h.lsn.0)))?;
            if h.set_id != self.set_id {
                return Err(JournalError::Corrupt(format!(
                    "received record {} belongs to another replication set",
                    h.lsn.0
                )));
            }
            let wait = *self.full_wait.lock().unwrap();
            let deadline = Instant::now() + wait;
            while !self.try_append_raw(rec, h.lsn)? {
                if Instant::now() >= deadline {
                    return Err(JournalError::Full(format!("no free segment after {wait:?} for received records")));
                }
                self.make_room()?;
            }
            at += len;
        }
        Ok(self.next_lsn())
    }

    fn try_append_raw(&self, rec: &[u8], lsn: Lsn) -> Result<bool, JournalError> {
        let mut st = self.state.lock().unwrap();
        if lsn != st.next_lsn {
            return Err(JournalError::Corrupt(format!(
                "received record {} out of order: the log expects {}",
                lsn.0, st.next_lsn.0
            )));
        }
        if st.pos.offset + rec.len() as u64 > self.geometry.segment_size {
            let next = st.pos.seq + 1;
            if next - st.start_seq >= self.geometry.segment_count as u64 {
                return Ok(false);
            }
            self.start_segment(next, lsn)?;
            st.pos = Position { seq: next, offset: SEGMENT_HEADER_SIZE as u64 };
        }
        if st.current.as_ref().is_none_or(|(seq, _)| *seq != st.pos.seq) {
            st.current = Some((st.pos.seq, self.segment(st.pos.seq)?));
        }
        let (_, seg) = st.current.as_ref().expect("set just above");
        seg.write(st.pos.offset as usize, &[rec]);
        st.pos.offset += rec.len() as u64;
        st.next_lsn = lsn.next();
        st.bytes_appended += rec.len() as u64;
        Ok(true)
    }

    /// Restarts an empty-of-work log at LSN `lsn` (a mirror target after a resync: records
    /// before `lsn` will never come). Everything appended so far must be applied and synced
    /// (the caller checkpoints first). The log continues in a fresh segment whose header
    /// names `lsn` as its first, and the superblock's start moves there.
    pub fn restart_at(&self, lsn: Lsn, next_file_id: FileId) -> Result<(), JournalError> {
        let (seq, end) = {
            let st = self.state.lock().unwrap();
            assert!(st.inflight.is_empty(), "restart with transactions in flight");
            (st.pos.seq, st.pos)
        };
        // First the start at the current end, so the fresh segment is no longer live ...
        self.move_start(self.next_lsn(), self.normalize(end), next_file_id)?;
        let next = seq + 1;
        self.start_segment(next, lsn)?;
        let at = Position { seq: next, offset: SEGMENT_HEADER_SIZE as u64 };
        {
            let mut st = self.state.lock().unwrap();
            st.pos = at;
            st.flushed = at;
            st.next_lsn = lsn;
        }
        self.durable.store(lsn.0, Ordering::Release);
        // ... then the start in it.
        self.move_start(lsn, at, next_file_id)
    }

    /// Writes the header of segment `seq` (its first record will be `first_lsn`).
    /// The header reaches the disk before any record of the segment can: so a segment whose
    /// durable header shows an older use (or none) holds no record of the current run, which
    /// recovery relies on (`clear_after`). One small flush per segment.
    fn start_segment(&self, seq: u64, first_lsn: Lsn) -> Result<(), JournalError> {
        let seg = self.segment_create(seq)?;
        let h = SegmentHeader { seq, first_lsn, set_id: self.set_id, segment_size: self.geometry.segment_size };
        seg.write(0, &[&h.encode()]);
        seg.flush(0, SEGMENT_HEADER_SIZE).map_err(io("writing a segment header"))
    }

    fn segment_create(&self, seq: u64) -> Result<Arc<S::Segment>, JournalError> {
        let index = (seq % self.geometry.segment_count as u64) as usize;
        let mut segs = self.segments.lock().unwrap();
        if let Some(s) = &segs[index] {
            return Ok(s.clone());
        }
        let s = Arc::new(
            self.storage
                .open_segment(index as u32, self.geometry.segment_size, true)
                .map_err(io(&format!("opening segment {index}")))?,
        );
        segs[index] = Some(s.clone());
        Ok(s)
    }

    pub(super) fn segment(&self, seq: u64) -> Result<Arc<S::Segment>, JournalError> {
        self.segment_create(seq)
    }

    /// The live log as the writer sees it: (start position, start LSN, end position, next LSN).
    pub(super) fn live(&self) -> (Position, Lsn, Position, Lsn) {
        let sb = self.superblock.lock().unwrap();
        let st = self.state.lock().unwrap();
        (Position { seq: sb.start_seq, offset: sb.start_offset }, sb.start_lsn, st.pos, st.next_lsn)
    }

    /// Where replication may read up to: every transaction with an id below `settled_below`
    /// has ended, and all of their records (outcomes included) lie below `records_below`.
    /// Records from `settled_below` on may belong to transactions still in flight.
    pub fn settled(&self) -> Settled {
        let st = self.state.lock().unwrap();
        let below = st.inflight.first_key_value().map_or(st.next_lsn, |(lsn, _)| *lsn);
        Settled { settled_below: below, records_below: st.next_lsn }
    }

    /// Lets replicas hold log space (see [`Retention`]).
    pub fn set_retention(&self, r: Arc<dyn Retention>) {
        let _ = self.retention.set(r);
    }

    /// Frees log space: runs a checkpoint, or waits a moment when the oldest in-flight
    /// transaction still holds the segment we need.
    fn make_room(&self) -> Result<(), JournalError> {
        let before = self.superblock().start_lsn;
        self.checkpoint()?;
        if self.superblock().start_lsn == before {
            if let Some(r) = self.retention.get()
                && r.floor().is_some_and(|f| f < self.oldest_segment_end())
            {
                // A lagging replica holds the full log: it falls back (never a writer waiting
                // for a target that may be gone for days).
                r.release();
                self.checkpoint()?;
                if self.superblock().start_lsn != before {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    // ----- durability --------------------------------------------------------------------

    /// Makes every record appended so far durable. Concurrent callers share one flush
    /// (group commit): a caller whose records an earlier flush covered returns at once.
    pub fn sync(&self) -> Result<Lsn, JournalError> {
        let target = self.state.lock().unwrap().next_lsn;
        self.sync_to(target)
    }

    /// Sets the real-time copy an fsync also waits for (`sync_mirrored`).
    pub fn set_mirror(&self, m: Arc<dyn Mirror>) {
        let _ = self.mirror.set(m);
    }

    /// fsync's durability (design §1, "Durability contract"): every record appended so far is
    /// durable here and, with a mirror, at the mirror. The mirror is told first, so its copy
    /// travels while the local flush runs (003:4, "substantially simultaneously").
    pub fn sync_mirrored(&self) -> Result<Lsn, JournalError> {
        let Some(m) = self.mirror.get() else { return self.sync() };
        let target = self.state.lock().unwrap().next_lsn;
        m.push(target);
        let upto = self.sync_to(target)?;
        m.wait(target).map_err(JournalError::Mirror)?;
        Ok(upto)
    }

    /// Whether the mirror (if any) holds every record below `below` now, or would not be
    /// waited for (`Mirror::holds`). True without a mirror.
    pub fn mirror_holds(&self, below: Lsn) -> bool {
        self.mirror.get().is_none_or(|m| m.holds(below))
    }

    /// Flushes everything written, even when no record was appended (a fresh segment header).
    fn sync_all_written(&self) -> Result<(), JournalError> {
        let _flushing = self.flush_lock.lock().unwrap();
        let (from, to) = {
            let mut st = self.state.lock().unwrap();
            let r = (st.flushed, st.pos);
            st.flushed = st.pos;
            r
        };
        self.flush_range(from, to)
    }

    /// Makes every record below `target` durable.
    pub fn sync_to(&self, target: Lsn) -> Result<Lsn, JournalError> {
        if self.durable_lsn() >= target {
            return Ok(self.durable_lsn());
        }
        let _flushing = self.flush_lock.lock().unwrap();
        if self.durable_lsn() >= target {
            return Ok(self.durable_lsn());
        }
        let (from, to, upto) = {
            let mut st = self.state.lock().unwrap();
            let r = (st.flushed, st.pos, st.next_lsn);
            st.flushed = st.pos;
            r
        };
        if let Err(e) = self.flush_range(from, to) {
            self.state.lock().unwrap().flushed = from;
            return Err(e);
        }
        self.durable.store(upto.0, Ordering::Release);
        Ok(upto)
    }

    fn flush_range(&self, from: Position, to: Position) -> Result<(), JournalError> {
        for seq in from.seq..=to.seq {
            let start = if seq == from.seq { from.offset } else { 0 };
            let end = if seq == to.seq { to.offset } else { self.geometry.segment_size };
            if end > start {
                let seg = self.segment(seq)?;
                seg.flush(start as usize, (end - start) as usize).map_err(io("flushing the journal"))?;
            }
        }
        Ok(())
    }

    // ----- checkpoints -------------------------------------------------------------------

    /// Moves the start of the log past every transaction whose effect is complete: syncs the
    /// backing directory (the hook), then records the new start in the superblock. Whole
    /// segments before the new start become free for reuse (claim 000:6).
    pub fn checkpoint(&self) -> Result<Lsn, JournalError> {
        let _one = self.checkpoint_lock.lock().unwrap();
        let (mut bound, mut at) = {
            let st = self.state.lock().unwrap();
            match st.inflight.first_key_value() {
                Some((lsn, pos)) => (*lsn, *pos),
                None => (st.next_lsn, st.pos),
            }
        };
        if let Some(floor) = self.retention.get().and_then(|r| r.floor())
            && floor < bound
        {
            (bound, at) = self.segment_holding(floor)?;
        }
        let at = self.normalize(at);
        let next_file_id = match self.checkpoint_hook.get() {
            Some(hook) => hook().map_err(io("syncing the backing directory for a checkpoint"))?,
            None => self.superblock().next_file_id,
        };
        if self.superblock().start_lsn >= bound {
            return Ok(bound);
        }
        self.move_start(bound, at, next_file_id)?;
        Ok(bound)
    }

    /// Records a new start of the log. It must be readable after a crash: the log up to it
    /// (and its segment's header) reaches the disk before the superblock points there.
    fn move_start(&self, lsn: Lsn, at: Position, next_file_id: FileId) -> Result<(), JournalError> {
        self.sync_all_written()?;
        self.write_superblock(|sb| {
            sb.start_lsn = lsn;
            sb.start_seq = at.seq;
            sb.start_offset = at.offset;
            sb.next_file_id = next_file_id;
        })?;
        self.state.lock().unwrap().start_seq = at.seq;
        Ok(())
    }

    /// Moves the start of the log to its current end (nothing in flight): after recovery.
    pub fn rebase_here(&self, next_file_id: FileId) -> Result<(), JournalError> {
        let (lsn, at) = {
            let st = self.state.lock().unwrap();
            assert!(st.inflight.is_empty(), "rebase with transactions in flight");
            (st.next_lsn, st.pos)
        };
        self.move_start(lsn, self.normalize(at), next_file_id)
    }

    /// A position at the very start of a fresh segment (offset 0) names its first record.
    fn normalize(&self, at: Position) -> Position {
        if at.offset < SEGMENT_HEADER_SIZE as u64 {
            Position { seq: at.seq, offset: SEGMENT_HEADER_SIZE as u64 }
        } else {
            at
        }
    }

    /// Records a clean shutdown: a final checkpoint, then `clean` in the superblock.
    pub fn close_clean(&self) -> Result<(), JournalError> {
        self.sync()?;
        self.checkpoint()?;
        self.write_superblock(|sb| sb.clean = true)
    }

    /// Marks the journal in use (not clean) until `close_clean`, by a mount in boot `boot_id`.
    pub fn mark_open(&self, boot_id: [u8; 16]) -> Result<(), JournalError> {
        self.write_superblock(|sb| {
            sb.clean = false;
            sb.boot_id = boot_id;
        })
    }

    fn write_superblock(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), JournalError> {
        let mut sb = self.superblock.lock().unwrap();
        let mut next = sb.clone();
        change(&mut next);
        next.seq = sb.seq + 1;
        self.storage.write_superblock(next.slot_offset(), &next.encode_slot()).map_err(io("writing the superblock"))?;
        *sb = next;
        Ok(())
    }

    /// Makes sure nothing written after `end` by the crashed run can ever be read as part of
    /// the new log: zeroes the rest of the segment at `end`, and every segment whose header
    /// says the crashed run started it after `end` (a higher seq). Recovery hands out the
    /// crashed run's LSNs again, so a stale record with a matching LSN at a matching offset
    /// would otherwise be accepted. A segment with no header or an older one holds no record
    /// of that run, because `start_segment` makes the header durable before any record.
    /// Durable before any new record is appended.
    fn clear_after(&self, end: Position) -> Result<(), JournalError> {
        let count = self.geometry.segment_count as u64;
        let on_disk = self.storage.segment_count().map_err(io("listing segments"))? as u64;
        let start_seq = self.state.lock().unwrap().start_seq;
        let seg = self.segment(end.seq)?;
        let from = end.offset.max(SEGMENT_HEADER_SIZE as u64) as usize;
        zero_range(seg.as_ref(), from, seg.len())?;
        let live: Vec<u64> = (start_seq..=end.seq).map(|s| s % count).collect();
        debug_assert!(start_seq <= end.seq);
        for index in 0..on_disk.min(count) {
            if live.contains(&index) {
                continue;
            }
            let s = self.segment_create(index)?;
            let mut hb = [0u8; SEGMENT_HEADER_SIZE];
            s.read(0, &mut hb);
            if matches!(SegmentHeader::decode(&hb), Ok(h) if h.seq > end.seq) {
                zero_range(s.as_ref(), 0, s.len())?;
            }
        }
        if end.offset < SEGMENT_HEADER_SIZE as u64 {
            // The scan ended before this segment's first record: (re)write its header.
            let first = self.state.lock().unwrap().next_lsn;
            self.start_segment(end.seq, first)?;
            let mut st = self.state.lock().unwrap();
            st.pos.offset = SEGMENT_HEADER_SIZE as u64;
            st.flushed = Position { seq: end.seq, offset: 0 };
        }
        Ok(())
    }
}

const ZERO_CHUNK: usize = 1 << 20;

fn zero_range<G: SegmentFile>(seg: &G, from: usize, to: usize) -> Result<(), JournalError> {
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZERO_CHUNK);
        seg.write(at, &[&zeros[..n]]);
        at += n;
    }
    if to > from {
        seg.flush(from, to - from).map_err(io("zeroing stale journal bytes"))?;
    }
    Ok(())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |e| JournalError::Io(what.to_string(), e)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
