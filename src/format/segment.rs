//! The 64-byte header at the start of every segment file (docs/FORMAT.md, "Segment header").
//! A segment is reused round-robin: its `seq` grows by the segment count at each reuse, so a
//! reader never takes a stale segment (or the stale records in its tail) for the current one.

use super::codec::{Cursor, Put};
use super::record::FORMAT_VERSION;
use crate::types::Lsn;

pub const SEGMENT_MAGIC: [u8; 8] = *b"FRYSEGMT";
pub const SEGMENT_HEADER_SIZE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Global sequence number of this use of the segment; file index = seq % segment count.
    pub seq: u64,
    /// LSN of the first record in this use of the segment.
    pub first_lsn: Lsn,
    pub set_id: [u8; 16],
    pub segment_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    #[error("no segment header (bad magic)")]
    NoMagic,
    #[error("segment format version {0} is newer than this build's {FORMAT_VERSION}")]
    NewerVersion(u16),
    #[error("segment header crc mismatch")]
    Crc,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE] {
        let mut v = Vec::with_capacity(SEGMENT_HEADER_SIZE);
        v.extend_from_slice(&SEGMENT_MAGIC);
        v.put_u16(FORMAT_VERSION);
        v.put_u16(0);
        v.put_u32(0);
        v.put_u64(self.seq);
        v.put_u64(self.first_lsn.0);
        v.extend_from_slice(&self.set_id);
        v.put_u64(self.segment_size);
        let crc = crc32c::crc32c(&v);
        v.put_u32(crc);
        v.resize(SEGMENT_HEADER_SIZE, 0);
        v.try_into().unwrap()
    }

    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        if buf.len() < SEGMENT_HEADER_SIZE || buf[..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::NoMagic);
        }
        let mut c = Cursor::new(&buf[8..SEGMENT_HEADER_SIZE]);
        let version = c.u16().unwrap();
        let crc_ok = crc32c::crc32c(&buf[..56]) == u32::from_le_bytes(buf[56..60].try_into().unwrap());
        if !crc_ok {
            return Err(SegmentHeaderError::Crc);
        }
        if version > FORMAT_VERSION {
            return Err(SegmentHeaderError::NewerVersion(version));
        }
        let _ = (c.u16(), c.u32());
        let seq = c.u64().unwrap();
        let first_lsn = Lsn(c.u64().unwrap());
        let set_id: [u8; 16] = c.take(16).unwrap().try_into().unwrap();
        let segment_size = c.u64().unwrap();
        let stored = c.u32().unwrap();
        if crc32c::crc32c(&buf[..56]) != stored {
            return Err(SegmentHeaderError::Crc);
        }
        Ok(SegmentHeader { seq, first_lsn, set_id, segment_size })
    }
}

/// The file name of segment `index` in a journal directory.
pub fn segment_name(index: u32) -> String {
    format!("seg-{index:08}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let h = SegmentHeader { seq: 5, first_lsn: Lsn(99), set_id: [7; 16], segment_size: 1 << 20 };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[20] ^= 4;
        assert_eq!(SegmentHeader::decode(&bad), Err(SegmentHeaderError::Crc));
        assert_eq!(SegmentHeader::decode(&[0; 64]), Err(SegmentHeaderError::NoMagic));
    }
}
