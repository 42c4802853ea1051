//! The sync map file (000:12): one target's map as bytes, written when acks stop and read back
//! after a restart. Pure codec, no I/O; the caller writes the bytes (to a temp file, fsync,
//! rename) under `--journal`.
//!
//! All integers little-endian. One file is one encoding: a fixed header, the file records in
//! ascending file id order, a crc32c (Castagnoli) over everything before it. The encoding of a
//! map is deterministic (same map, same bytes).
//!
//! Header (64 bytes):
//!
//! | offset | size | meaning |
//! |---|---|---|
//! | 0  | 8 | magic `FRYSMAP1` |
//! | 8  | 2 | format version, u16; this build writes 1 and refuses newer |
//! | 10 | 1 | mode: 0 ordered, 1 fallen back, 2 resyncing |
//! | 11 | 1 | flags: bit 0 = a full resync is owed; other bits 0 |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | total length of the encoding in bytes, header and crc included |
//! | 24 | 8 | mode LSN: ordered → every update below it is acked; resyncing → where ordered shipping resumes; fallen back → 0 |
//! | 32 | 8 | resyncing → the outstanding plan's id; else 0 |
//! | 40 | 8 | generation: the id the next resync plan takes (greater than every tag's generation) |
//! | 48 | 8 | flag bit 0 → the generation the full resync was owed in (≤ generation); else 0 |
//! | 56 | 4 | number of file records, u32 |
//! | 60 | 4 | number of extent records in all file records, u32 |
//!
//! File record (16 bytes, then 32 per flag set, then 48 per extent):
//!
//! | offset | size | meaning |
//! |---|---|---|
//! | +0  | 8 | file id (not 0; strictly ascending from record to record) |
//! | +8  | 1 | flags: bit 0 attributes changed, bit 1 entries changed; other bits 0 |
//! | +9  | 3 | reserved, 0 |
//! | +12 | 4 | n: number of extents, u32 (a record with no flag has n ≥ 1) |
//! | +16 | 32 | the attributes' tag, if flag bit 0 |
//! | …   | 32 | the entries' tag, if flag bit 1 |
//! | …   | 48 × n | the extents, ascending, non-overlapping |
//!
//! Extent (48 bytes):
//!
//! | offset | size | meaning |
//! |---|---|---|
//! | +0  | 8  | first block index (block = 4096 bytes) |
//! | +8  | 8  | last block index, inclusive (≥ first) |
//! | +16 | 32 | tag |
//!
//! Tag (32 bytes): what clears a mark.
//!
//! | offset | size | meaning |
//! |---|---|---|
//! | +0  | 8 | generation it was last marked in: a resync plan with an id ≥ it covers it |
//! | +8  | 1 | 1 ordered: cleared by an ack of the highest pending LSN; 0 unordered: only a resync clears it |
//! | +9  | 7 | reserved, 0 |
//! | +16 | 8 | ordered → highest pending LSN; unordered → 0 |
//! | +24 | 8 | ordered → a lower bound of the lowest pending LSN (≤ the highest); unordered → 0 |
//!
//! Ordered tags appear only in ordered mode, and in resyncing mode with a generation above the
//! outstanding plan's id (marks made during the resync).
//!
//! Trailer: 4 bytes, crc32c of every byte before it, u32.

use super::extents::{BlockRange, Extents, Pending, Piece, Tag};
use super::map::{FileMarks, Limits, Mode, PlanId, SyncMap};
use crate::types::{FileId, Lsn};

pub const SYNCMAP_MAGIC: [u8; 8] = *b"FRYSMAP1";
pub const SYNCMAP_VERSION: u16 = 1;
pub const SYNCMAP_HEADER_LEN: usize = 64;
const FILE_RECORD_LEN: usize = 16;
const TAG_LEN: usize = 32;
const EXTENT_LEN: usize = 16 + TAG_LEN;
const CRC_LEN: usize = 4;

const MODE_ORDERED: u8 = 0;
const MODE_FALLEN_BACK: u8 = 1;
const MODE_RESYNCING: u8 = 2;
const FLAG_FULL: u8 = 1;
const FILE_ATTR: u8 = 1;
const FILE_ENTRIES: u8 = 2;

/// Why a sync map file was refused. Every variant means the same to an operator: this map
/// can't be trusted, so the target must get a full resync (delete the file; ferryfs then
/// starts with a full initial sync of that target).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncMapDecodeError {
    #[error("not a ferryfs sync map: it starts with {found:02x?}, not \"FRYSMAP1\"")]
    BadMagic { found: Vec<u8> },
    #[error("sync map format version {0} is newer than this build's {SYNCMAP_VERSION}; use a newer ferryfs")]
    NewerVersion(u16),
    #[error("sync map format version {0} does not exist (the file is damaged); remove it to resync the target in full")]
    UnknownVersion(u16),
    #[error("sync map truncated: {have} bytes, {need} expected; remove it to resync the target in full")]
    Truncated { have: usize, need: usize },
    #[error("sync map has {have} bytes, its header says {need}; remove it to resync the target in full")]
    TrailingBytes { have: usize, need: usize },
    #[error(
        "sync map crc mismatch: stored {stored:#010x}, computed {computed:#010x}; remove it to resync the target in full"
    )]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("sync map corrupt at byte {offset}: {what}; remove it to resync the target in full")]
    Corrupt { offset: usize, what: &'static str },
}

type Result<T> = std::result::Result<T, SyncMapDecodeError>;

impl SyncMap {
    /// The map as bytes (format above). Deterministic.
    pub fn encode(&self) -> Vec<u8> {
        let flag_count: usize =
            self.files.values().map(|m| usize::from(m.attr.is_some()) + usize::from(m.entries.is_some())).sum();
        let total = SYNCMAP_HEADER_LEN
            + FILE_RECORD_LEN * self.files.len()
            + TAG_LEN * flag_count
            + EXTENT_LEN * self.extent_count()
            + CRC_LEN;
        let mut out = Vec::with_capacity(total);
        let (mode, mode_lsn, plan) = match self.mode {
            Mode::Ordered { acked_below } => (MODE_ORDERED, acked_below, PlanId(0)),
            Mode::FallenBack => (MODE_FALLEN_BACK, Lsn(0), PlanId(0)),
            Mode::Resyncing { plan, resume_from } => (MODE_RESYNCING, resume_from, plan),
        };
        out.extend_from_slice(&SYNCMAP_MAGIC);
        out.extend_from_slice(&SYNCMAP_VERSION.to_le_bytes());
        out.push(mode);
        out.push(if self.full_gen.is_some() { FLAG_FULL } else { 0 });
        out.extend_from_slice(&[0; 4]);
        put_u64(&mut out, total as u64);
        put_u64(&mut out, mode_lsn.0);
        put_u64(&mut out, plan.0);
        put_u64(&mut out, self.generation);
        put_u64(&mut out, self.full_gen.unwrap_or(0));
        put_u32(&mut out, count_u32(self.files.len()));
        put_u32(&mut out, count_u32(self.extent_count()));
        debug_assert_eq!(out.len(), SYNCMAP_HEADER_LEN);
        for (file, marks) in &self.files {
            put_u64(&mut out, file.0);
            let attr = if marks.attr.is_some() { FILE_ATTR } else { 0 };
            let entries = if marks.entries.is_some() { FILE_ENTRIES } else { 0 };
            out.push(attr | entries);
            out.extend_from_slice(&[0; 3]);
            put_u32(&mut out, count_u32(marks.extents));
            for tag in marks.attr.iter().chain(marks.entries.iter()) {
                put_tag(&mut out, tag);
            }
            for piece in self.pieces.of(*file) {
                put_u64(&mut out, piece.range.first);
                put_u64(&mut out, piece.range.last);
                put_tag(&mut out, &piece.tag);
            }
        }
        let crc = crc32c::crc32c(&out);
        put_u32(&mut out, crc);
        assert_eq!(out.len(), total, "sync map length computed wrong");
        out
    }

    /// Reads a map written by [`SyncMap::encode`], with the default [`Limits`] (coarsening at
    /// once if it holds more than they allow). Refuses anything damaged, truncated or newer.
    pub fn decode(bytes: &[u8]) -> Result<SyncMap> {
        check_frame(bytes)?;
        let mut r = Reader { bytes: &bytes[..bytes.len() - CRC_LEN], pos: 10, field: 10 };
        let mode_byte = r.u8()?;
        let flags = r.u8()?;
        r.expect(flags & !FLAG_FULL == 0, "unknown header flag bits")?;
        let reserved = r.u32()?;
        r.expect(reserved == 0, "reserved header bytes not zero")?;
        r.u64()?; // total length, checked by check_frame
        let mode_lsn = Lsn(r.u64()?);
        let plan = PlanId(r.u64()?);
        let generation = r.u64()?;
        let full_gen = r.u64()?;
        let file_count = r.u32()?;
        let extent_count = r.u32()?;
        let mode = match mode_byte {
            MODE_ORDERED => Mode::Ordered { acked_below: mode_lsn },
            MODE_FALLEN_BACK => Mode::FallenBack,
            MODE_RESYNCING => Mode::Resyncing { plan, resume_from: mode_lsn },
            _ => return Err(r.corrupt(10, "unknown mode")),
        };
        r.expect(mode_byte == MODE_RESYNCING || plan.0 == 0, "a plan id outside resyncing mode")?;
        r.expect(mode_byte != MODE_FALLEN_BACK || mode_lsn.0 == 0, "a mode LSN in fallen-back mode")?;
        r.expect(mode_byte != MODE_RESYNCING || plan.0 < generation, "the plan id is not below the generation")?;
        let full_gen = if flags & FLAG_FULL != 0 {
            r.expect(full_gen <= generation, "the full-resync generation is above the generation")?;
            Some(full_gen)
        } else {
            r.expect(full_gen == 0, "a full-resync generation without its flag")?;
            None
        };
        let mut map = SyncMap::with_mode(mode, full_gen);
        map.generation = generation;
        let rules = TagRules { generation, mode };
        let mut extents_seen: u64 = 0;
        let mut previous: Option<FileId> = None;
        for _ in 0..file_count {
            let at = r.pos;
            let file = FileId(r.u64()?);
            r.expect(file != FileId::NONE, "file id 0")?;
            r.expect(previous.is_none_or(|p| p < file), "file ids not ascending")?;
            previous = Some(file);
            let file_flags = r.u8()?;
            r.expect(file_flags & !(FILE_ATTR | FILE_ENTRIES) == 0, "unknown file flag bits")?;
            let reserved_zero = r.take(3)? == [0; 3];
            r.expect(reserved_zero, "reserved file bytes not zero")?;
            let n = r.u32()?;
            r.expect(n > 0 || file_flags != 0, "a file record with nothing marked")?;
            let mut marks = FileMarks::default();
            if file_flags & FILE_ATTR != 0 {
                marks.attr = Some(r.tag(&rules)?);
            }
            if file_flags & FILE_ENTRIES != 0 {
                marks.entries = Some(r.tag(&rules)?);
            }
            r.extents(file, n, &rules, &mut map.pieces)?;
            extents_seen += u64::from(n);
            map.files.insert(file, marks);
            debug_assert!(r.pos > at);
        }
        if extents_seen != u64::from(extent_count) {
            return Err(r.corrupt(60, "the extent count differs from the file records'"));
        }
        if r.pos != r.bytes.len() {
            return Err(r.corrupt(r.pos, "bytes left over after the last file record"));
        }
        map.reindex();
        map.set_limits(Limits::DEFAULT);
        Ok(map)
    }
}

/// Magic, version, length and crc, in the order that gives the most useful error.
fn check_frame(bytes: &[u8]) -> Result<()> {
    let min = SYNCMAP_HEADER_LEN + CRC_LEN;
    if bytes.len() < SYNCMAP_MAGIC.len() {
        return Err(SyncMapDecodeError::Truncated { have: bytes.len(), need: min });
    }
    if bytes[..8] != SYNCMAP_MAGIC {
        return Err(SyncMapDecodeError::BadMagic { found: bytes[..8].to_vec() });
    }
    if bytes.len() < 10 {
        return Err(SyncMapDecodeError::Truncated { have: bytes.len(), need: min });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version > SYNCMAP_VERSION {
        return Err(SyncMapDecodeError::NewerVersion(version));
    }
    if version != SYNCMAP_VERSION {
        return Err(SyncMapDecodeError::UnknownVersion(version));
    }
    if bytes.len() < min {
        return Err(SyncMapDecodeError::Truncated { have: bytes.len(), need: min });
    }
    let total = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let need = usize::try_from(total).unwrap_or(usize::MAX);
    if bytes.len() < need {
        return Err(SyncMapDecodeError::Truncated { have: bytes.len(), need });
    }
    if bytes.len() > need || need < min {
        return Err(SyncMapDecodeError::TrailingBytes { have: bytes.len(), need });
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(SyncMapDecodeError::CrcMismatch { stored, computed });
    }
    Ok(())
}

/// What a tag may say, given the map it is in.
struct TagRules {
    generation: u64,
    mode: Mode,
}

/// Reads fields in order; every read is bounds-checked and errors name the byte offset.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Where the last field read starts: the offset an error names.
    field: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else { return Err(self.corrupt(self.pos, "a record runs past the end")) };
        let slice = &self.bytes[self.pos..end];
        self.field = self.pos;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn corrupt(&self, offset: usize, what: &'static str) -> SyncMapDecodeError {
        SyncMapDecodeError::Corrupt { offset, what }
    }

    /// An error naming the last field read unless `ok`.
    fn expect(&self, ok: bool, what: &'static str) -> Result<()> {
        if ok { Ok(()) } else { Err(self.corrupt(self.field, what)) }
    }

    fn tag(&mut self, rules: &TagRules) -> Result<Tag> {
        let at = self.pos;
        let generation = self.u64()?;
        let kind = self.u8()?;
        let reserved_zero = self.take(7)? == [0; 7];
        let (max, min) = (self.u64()?, self.u64()?);
        let bad = |what| Err(SyncMapDecodeError::Corrupt { offset: at, what });
        if !reserved_zero {
            return bad("reserved tag bytes not zero");
        }
        if generation > rules.generation {
            return bad("a tag generation above the map's");
        }
        let pending = match kind {
            0 if max == 0 && min == 0 => Pending::Unordered,
            0 => return bad("pending LSNs in an unordered tag"),
            1 if min <= max => Pending::Ordered { min: Lsn(min), max: Lsn(max) },
            1 => return bad("an ordered tag's lowest LSN above its highest"),
            _ => return bad("unknown tag kind"),
        };
        let ordered_allowed = match rules.mode {
            Mode::Ordered { .. } => true,
            Mode::FallenBack => false,
            Mode::Resyncing { plan, .. } => generation > plan.0,
        };
        if matches!(pending, Pending::Ordered { .. }) && !ordered_allowed {
            return bad("an ordered tag where the mode allows none");
        }
        Ok(Tag { generation, pending })
    }

    fn extents(&mut self, file: FileId, n: u32, rules: &TagRules, into: &mut Extents) -> Result<()> {
        for _ in 0..n {
            let at = self.pos;
            let (first, last) = (self.u64()?, self.u64()?);
            if first > last {
                return Err(self.corrupt(at, "an extent ending before it starts"));
            }
            let tag = self.tag(rules)?;
            if !into.push_back(file, Piece { range: BlockRange { first, last }, tag }) {
                return Err(self.corrupt(at, "extents overlapping or not ascending"));
            }
        }
        Ok(())
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_tag(out: &mut Vec<u8>, tag: &Tag) {
    put_u64(out, tag.generation);
    let (kind, max, min) = match tag.pending {
        Pending::Ordered { min, max } => (1, max.0, min.0),
        Pending::Unordered => (0, 0, 0),
    };
    out.push(kind);
    out.extend_from_slice(&[0; 7]);
    put_u64(out, max);
    put_u64(out, min);
}

/// Counts fit: the limits keep them far below 2^32.
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).expect("sync map counts are bounded far below 2^32")
}
