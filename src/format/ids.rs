//! The id-table snapshot (`ids` in the journal directory): file id → backing handle as of a
//! checkpoint (docs/FORMAT.md, "Id table"). Binds after the checkpoint are `Bind` records.

use super::codec::{Cursor, DecodeError, Put};
use super::record::FORMAT_VERSION;
use crate::types::{FileId, Handle};

pub const IDS_MAGIC: [u8; 8] = *b"FRYIDS01";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSnapshot {
    pub next_file_id: FileId,
    /// Sorted by id.
    pub entries: Vec<(FileId, Handle)>,
}

impl IdSnapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.entries.len() * 24);
        v.extend_from_slice(&IDS_MAGIC);
        v.put_u16(FORMAT_VERSION);
        v.put_u16(0);
        v.put_u32(0);
        v.put_u64(self.next_file_id.0);
        v.put_u64(self.entries.len() as u64);
        for (id, h) in &self.entries {
            v.put_u64(id.0);
            v.put_bytes(&h.0);
        }
        let crc = crc32c::crc32c(&v);
        v.put_u32(crc);
        v
    }

    pub fn decode(buf: &[u8]) -> Result<IdSnapshot, DecodeError> {
        if buf.len() < 36 || buf[..8] != IDS_MAGIC {
            return Err(DecodeError::BadValue("id table magic"));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(DecodeError::BadValue("id table crc"));
        }
        let mut c = Cursor::new(&body[8..]);
        if c.u16()? > FORMAT_VERSION {
            return Err(DecodeError::BadValue("id table version (newer than this build)"));
        }
        let _ = (c.u16()?, c.u32()?);
        let next_file_id = FileId(c.u64()?);
        let count = c.u64()?;
        let mut entries = Vec::with_capacity(count.min(1 << 20) as usize);
        for _ in 0..count {
            let id = FileId(c.u64()?);
            entries.push((id, Handle(c.bytes()?)));
        }
        c.finish()?;
        Ok(IdSnapshot { next_file_id, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_crc() {
        let s = IdSnapshot {
            next_file_id: FileId(9),
            entries: vec![(FileId(1), Handle(vec![1, 2])), (FileId(4), Handle(vec![3; 12]))],
        };
        let b = s.encode();
        assert_eq!(IdSnapshot::decode(&b).unwrap(), s);
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert!(IdSnapshot::decode(&bad).is_err());
        assert!(IdSnapshot::decode(&b[..b.len() - 1]).is_err());
    }
}
