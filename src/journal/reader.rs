//! Scanning the log from its start (the checkpoint) to its end.
//!
//! Recovery as a table (style.md, example 3). At each position the scan expects the record
//! with LSN `expected`:
//!
//! | what is at the position                                   | verdict                       |
//! |-----------------------------------------------------------|-------------------------------|
//! | header ok, LSN = expected, crc ok                          | accept, go on                 |
//! | header ok, LSN = expected, crc bad                         | **corrupt/torn**: stop here   |
//! | header from a newer format version                         | refuse the whole journal      |
//! | zeros, no magic, stale record (LSN ≠ expected), or no room | end of this segment: continue |
//! |   in the next segment if its header has seq + 1 and first  |   there, else **end of log**  |
//! |   LSN = expected                                           |                               |
//!
//! A stale record in a recycled segment always has a lower LSN than expected (LSNs are never
//! reused) and a stale segment has an older seq, so neither is ever taken for the live log.

use super::error::JournalError;
use super::writer::Position;
use crate::format::record::{self, HEADER_SIZE, Header, RecordError};
use crate::format::segment::{SEGMENT_HEADER_SIZE, SegmentHeader, SegmentHeaderError};
use crate::format::superblock::Superblock;
use crate::io::{SegmentFile, Storage};
use crate::types::Lsn;

/// Why the scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// No further record: the log ends cleanly here.
    Clean,
    /// The record expected here fails its checks and nothing valid follows: the torn last
    /// write of a crash. Its transaction was never acknowledged.
    Torn(String),
    /// The record expected here is bad or missing, yet valid records with higher LSNs follow:
    /// corruption inside the log (or pages written out of order before a power loss).
    /// Recovery refuses unless told to discard everything from here on.
    Corrupt(String),
}

/// Where and why the scan stopped; `pos` is where the next record would go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    pub pos: Position,
    pub next_lsn: Lsn,
    pub kind: EndKind,
    /// What the scan found at `pos`, for operators.
    pub found: String,
}

/// One accepted record, borrowed for the duration of the visit.
pub struct RecordRef<'a> {
    pub pos: Position,
    pub header: Header,
    pub payload: &'a [u8],
}

/// Visits every valid record from the superblock's start of log, in order. The visitor may
/// stop the scan early by returning `false`.
pub fn scan<S: Storage>(
    storage: &S,
    sb: &Superblock,
    mut visit: impl FnMut(&RecordRef<'_>) -> bool,
) -> Result<ScanEnd, JournalError> {
    let count = sb.segment_count as u64;
    let size = sb.segment_size as usize;
    let mut pos = Position { seq: sb.start_seq, offset: sb.start_offset };
    let mut expected = sb.start_lsn;
    let mut seg = match open_checked(storage, sb, pos.seq)? {
        Some(s) => s,
        None => {
            return Err(JournalError::Corrupt(format!(
                "segment file {} (the start of the log) is missing",
                crate::format::segment::segment_name((pos.seq % count) as u32)
            )));
        }
    };
    let mut buf = Vec::new();
    loop {
        let room = size - pos.offset as usize;
        let verdict = read_record(&seg, pos.offset as usize, room, expected, &sb.set_id, &mut buf)?;
        match verdict {
            Verdict::Accept(header) => {
                let payload = &buf[HEADER_SIZE..HEADER_SIZE + header.payload_len as usize];
                if !visit(&RecordRef { pos, header, payload }) {
                    return Ok(ScanEnd {
                        pos,
                        next_lsn: expected,
                        kind: EndKind::Clean,
                        found: "scan stopped by caller".into(),
                    });
                }
                pos.offset += record::record_len(header.payload_len as usize) as u64;
                expected = expected.next();
            }
            Verdict::Corrupt(why) => {
                let kind = match find_later_record(&seg, pos.offset as usize + record::RECORD_ALIGN, expected) {
                    Some((lsn, off)) => {
                        EndKind::Corrupt(format!("{why}; valid records follow (lsn {lsn} at offset {off})"))
                    }
                    None => match find_later_segment(storage, sb, pos.seq, expected) {
                        Some((file, lsn)) => {
                            EndKind::Corrupt(format!("{why}; valid records follow in {file} (from lsn {lsn})"))
                        }
                        None => EndKind::Torn(why.clone()),
                    },
                };
                return Ok(ScanEnd { pos, next_lsn: expected, kind, found: why });
            }
            Verdict::SegmentEnd(found) => {
                let next = pos.seq + 1;
                let continues = match open_checked(storage, sb, next)? {
                    Some(s) => {
                        let mut hb = [0u8; SEGMENT_HEADER_SIZE];
                        s.read(0, &mut hb);
                        match SegmentHeader::decode(&hb) {
                            Ok(h) if h.seq == next && h.first_lsn == expected && h.set_id == sb.set_id => Some(s),
                            Err(SegmentHeaderError::NewerVersion(v)) => {
                                return Err(JournalError::Corrupt(format!(
                                    "segment {} has format version {v}, newer than this build",
                                    next % count
                                )));
                            }
                            _ => None,
                        }
                    }
                    None => None,
                };
                match continues {
                    Some(s) => {
                        seg = s;
                        pos = Position { seq: next, offset: SEGMENT_HEADER_SIZE as u64 };
                    }
                    None => {
                        let later = find_later_record(&seg, pos.offset as usize, expected)
                            .map(|(lsn, off)| format!("a valid record with a higher LSN ({lsn}) lies at offset {off}"))
                            .or_else(|| {
                                find_later_segment(storage, sb, pos.seq, expected)
                                    .map(|(file, lsn)| format!("segment {file} continues the log from lsn {lsn}"))
                            });
                        let kind = match later {
                            Some(what) => EndKind::Corrupt(format!(
                                "{found} where record {expected} should be, yet {what}: a hole in the log"
                            )),
                            None => EndKind::Clean,
                        };
                        return Ok(ScanEnd { pos, next_lsn: expected, kind, found });
                    }
                }
            }
        }
    }
}

pub(super) enum Verdict {
    Accept(Header),
    Corrupt(String),
    SegmentEnd(String),
}

pub(super) fn read_record<G: SegmentFile>(
    seg: &G,
    offset: usize,
    room: usize,
    expected: Lsn,
    set_id: &[u8; 16],
    buf: &mut Vec<u8>,
) -> Result<Verdict, JournalError> {
    if room < HEADER_SIZE {
        return Ok(Verdict::SegmentEnd("end of segment".into()));
    }
    buf.resize(HEADER_SIZE, 0);
    seg.read(offset, &mut buf[..HEADER_SIZE]);
    let header = match record::decode_header(&buf[..HEADER_SIZE], room) {
        Ok(h) => h,
        Err(RecordError::NewerVersion(v)) => {
            // A newer build's record, or a damaged version field: only the crc tells.
            if newer_record_verifies(seg, offset, room, buf) {
                return Err(JournalError::Corrupt(format!(
                    "a record at offset {offset} has format version {v}, newer than this build; use a newer ferryfs"
                )));
            }
            let lsn = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            if lsn == expected.0 {
                return Ok(Verdict::Corrupt(format!("record {expected} has a damaged header (version field {v})")));
            }
            return Ok(Verdict::SegmentEnd(format!("no valid record (version field {v})")));
        }
        Err(RecordError::NoMagic(0)) if buf.iter().all(|&b| b == 0) => {
            return Ok(Verdict::SegmentEnd("zeros (never written)".into()));
        }
        Err(e) => {
            // A header we cannot decode is either the torn start of the expected record or
            // the middle of a stale one; only an LSN match tells them apart.
            let lsn = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            if lsn == expected.0 {
                return Ok(Verdict::Corrupt(format!("record {expected} has a bad header: {e}")));
            }
            return Ok(Verdict::SegmentEnd(format!("no valid record ({e})")));
        }
    };
    if header.lsn != expected {
        return Ok(Verdict::SegmentEnd(format!("stale record (lsn {}, expected {})", header.lsn.0, expected.0)));
    }
    if &header.set_id != set_id {
        return Ok(Verdict::SegmentEnd(format!(
            "a record of another journal (set {:02x?}) at lsn {}",
            &header.set_id[..4],
            expected.0
        )));
    }
    let total = HEADER_SIZE + header.payload_len as usize;
    buf.resize(total, 0);
    seg.read(offset + HEADER_SIZE, &mut buf[HEADER_SIZE..total]);
    if let Err(e) = record::verify(buf, &header) {
        return Ok(Verdict::Corrupt(format!("record {expected}: {e}")));
    }
    Ok(Verdict::Accept(header))
}

/// Opens the segment for `seq` if its file exists and its header says it is that use of it.
fn open_checked<S: Storage>(storage: &S, sb: &Superblock, seq: u64) -> Result<Option<S::Segment>, JournalError> {
    let index = (seq % sb.segment_count as u64) as u32;
    let existing = storage.segment_count().map_err(|e| JournalError::Io("listing segments".into(), e))?;
    if index >= existing {
        return Ok(None);
    }
    let seg = storage
        .open_segment(index, sb.segment_size, false)
        .map_err(|e| JournalError::Io(format!("opening segment {index}"), e))?;
    let mut hb = [0u8; SEGMENT_HEADER_SIZE];
    seg.read(0, &mut hb);
    match SegmentHeader::decode(&hb) {
        Ok(h) if h.seq == seq && h.set_id == sb.set_id => Ok(Some(seg)),
        Err(SegmentHeaderError::NewerVersion(v)) => {
            Err(JournalError::Corrupt(format!("segment {index} has format version {v}, newer than this build")))
        }
        _ if seq == sb.start_seq => Err(JournalError::Corrupt(format!(
            "segment {index} should hold the start of the log (segment seq {seq}) but its header does not match"
        ))),
        _ => Ok(None),
    }
}

/// Looks past the end of the log, in the rest of its segment, for a valid record with a
/// higher LSN than expected, so an operator learns of a hole instead of a silent end.
fn find_later_record<G: SegmentFile>(seg: &G, from: usize, expected: Lsn) -> Option<(u64, usize)> {
    let size = seg.len();
    let mut off = from.next_multiple_of(record::RECORD_ALIGN);
    let mut buf = vec![0u8; HEADER_SIZE];
    while off + HEADER_SIZE <= size {
        seg.read(off, &mut buf[..HEADER_SIZE]);
        if buf[..4] == record::RECORD_MAGIC.to_le_bytes()
            && let Ok(h) = record::decode_header(&buf[..HEADER_SIZE], size - off)
            && h.lsn > expected
        {
            buf.resize(HEADER_SIZE + h.payload_len as usize, 0);
            seg.read(off + HEADER_SIZE, &mut buf[HEADER_SIZE..]);
            if record::verify(&buf, &h).is_ok() {
                return Some((h.lsn.0, off));
            }
            buf.truncate(HEADER_SIZE);
        }
        off += record::RECORD_ALIGN;
    }
    None
}

/// True when the record at `offset`, read with this build's header layout despite its newer
/// version number, passes its crc: then it really is a newer build's record.
fn newer_record_verifies<G: SegmentFile>(seg: &G, offset: usize, room: usize, buf: &mut Vec<u8>) -> bool {
    let len = u32::from_le_bytes(buf[24..28].try_into().unwrap()) as usize;
    if record::record_len(len) > room {
        return false;
    }
    let stored = u32::from_le_bytes(buf[28..32].try_into().unwrap());
    buf.resize(HEADER_SIZE + len, 0);
    seg.read(offset + HEADER_SIZE, &mut buf[HEADER_SIZE..]);
    let mut head = buf[..HEADER_SIZE].to_vec();
    head[28..32].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&head), &buf[HEADER_SIZE..]) == stored
}

/// A segment written after `seq` by the same run (a higher seq, first LSN past `expected`):
/// its records follow a damaged end of the log.
fn find_later_segment<S: Storage>(storage: &S, sb: &Superblock, seq: u64, expected: Lsn) -> Option<(String, u64)> {
    let existing = storage.segment_count().ok()?;
    for index in 0..existing.min(sb.segment_count) {
        let Ok(seg) = storage.open_segment(index, sb.segment_size, false) else { continue };
        let mut hb = [0u8; SEGMENT_HEADER_SIZE];
        seg.read(0, &mut hb);
        if let Ok(h) = SegmentHeader::decode(&hb)
            && h.set_id == sb.set_id
            && h.seq > seq
            && h.first_lsn > expected
        {
            return Some((crate::format::segment::segment_name(index), h.first_lsn.0));
        }
    }
    None
}
