//! The superblock: where the log starts, and what the journal belongs to (docs/FORMAT.md,
//! "Superblock"). Two 512-byte slots in one file; each update writes the slot the older copy
//! is in, with a higher `seq`, so a torn superblock write leaves the other slot intact.

use super::codec::{Cursor, DecodeError, Put};
use super::record::FORMAT_VERSION;
use crate::types::{FileId, Lsn};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"FRYSUPER";
pub const SLOT_SIZE: usize = 512;
pub const SUPERBLOCK_FILE_SIZE: usize = 4096;
/// Slot offsets: in different 512-byte sectors of one 4 KiB page (see docs/FORMAT.md, media
/// assumptions: a torn page write must not damage sectors rewritten with unchanged bytes).
pub const SLOT_OFFSETS: [usize; 2] = [0, 2048];
const PATH_MAX_STORED: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped at every superblock write; the valid slot with the higher value wins.
    pub seq: u64,
    /// True when the mount that last wrote it shut down cleanly (no replay needed).
    pub clean: bool,
    /// The replication set's uuid, chosen when the journal is created.
    pub set_id: [u8; 16],
    pub epoch: u64,
    pub segment_size: u64,
    pub segment_count: u32,
    /// Checkpoint: every record below this LSN is reflected in the synced backing directory.
    pub start_lsn: Lsn,
    /// Where the record `start_lsn` is (or will be written): segment sequence and byte offset.
    pub start_seq: u64,
    pub start_offset: u64,
    /// The lowest file id never handed out, as of the checkpoint.
    pub next_file_id: FileId,
    /// The backing directory this journal belongs to: its device and inode, and its path.
    pub backing_dev: u64,
    pub backing_ino: u64,
    pub backing_path: Vec<u8>,
    /// The kernel boot id of the mount that last opened the journal: a recovery in the same
    /// boot knows the backing directory's page cache survived (docs/FORMAT.md, "Replay").
    pub boot_id: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("no superblock: neither slot holds the magic \"FRYSUPER\"")]
    NoMagic,
    #[error("superblock format version {0} is newer than this build's {FORMAT_VERSION}; use a newer ferryfs")]
    NewerVersion(u16),
    #[error("both superblock slots fail their crc")]
    Corrupt,
    #[error("superblock field: {0}")]
    Field(#[from] DecodeError),
}

impl Superblock {
    /// The superblock of a journal about to be created (geometry and start are set by
    /// `Journal::create`).
    pub fn new(
        set_id: [u8; 16],
        backing_dev: u64,
        backing_ino: u64,
        backing_path: Vec<u8>,
        boot_id: [u8; 16],
    ) -> Superblock {
        Superblock {
            seq: 0,
            clean: false,
            set_id,
            epoch: 0,
            segment_size: 0,
            segment_count: 0,
            start_lsn: Lsn(1),
            start_seq: 0,
            start_offset: 0,
            next_file_id: FileId::FIRST_FREE,
            backing_dev,
            backing_ino,
            backing_path,
            boot_id,
        }
    }

    pub fn encode_slot(&self) -> [u8; SLOT_SIZE] {
        let mut v = Vec::with_capacity(SLOT_SIZE);
        v.extend_from_slice(&SUPERBLOCK_MAGIC);
        v.put_u16(FORMAT_VERSION);
        v.put_u16(self.clean as u16);
        v.put_u32(0);
        v.put_u64(self.seq);
        v.extend_from_slice(&self.set_id);
        v.put_u64(self.epoch);
        v.put_u64(self.segment_size);
        v.put_u32(self.segment_count);
        v.put_u32(0);
        v.put_u64(self.start_lsn.0);
        v.put_u64(self.start_seq);
        v.put_u64(self.start_offset);
        v.put_u64(self.next_file_id.0);
        v.put_u64(self.backing_dev);
        v.put_u64(self.backing_ino);
        v.extend_from_slice(&self.boot_id);
        let path = &self.backing_path[..self.backing_path.len().min(PATH_MAX_STORED)];
        v.put_bytes(path);
        v.resize(SLOT_SIZE - 4, 0);
        let crc = crc32c::crc32c(&v);
        v.put_u32(crc);
        v.try_into().unwrap()
    }

    fn decode_slot(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf[..8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        // The crc first: a damaged version field must read as damage, not as a newer build.
        let stored = u32::from_le_bytes(buf[SLOT_SIZE - 4..SLOT_SIZE].try_into().unwrap());
        if crc32c::crc32c(&buf[..SLOT_SIZE - 4]) != stored {
            return Err(SuperblockError::Corrupt);
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version > FORMAT_VERSION {
            return Err(SuperblockError::NewerVersion(version));
        }
        let mut c = Cursor::new(&buf[10..SLOT_SIZE - 4]);
        let clean = c.u16()? & 1 != 0;
        let _ = c.u32()?;
        let seq = c.u64()?;
        let set_id: [u8; 16] = c.take(16)?.try_into().unwrap();
        let epoch = c.u64()?;
        let segment_size = c.u64()?;
        let segment_count = c.u32()?;
        let _ = c.u32()?;
        let start_lsn = Lsn(c.u64()?);
        let start_seq = c.u64()?;
        let start_offset = c.u64()?;
        let next_file_id = FileId(c.u64()?);
        let backing_dev = c.u64()?;
        let backing_ino = c.u64()?;
        let boot_id: [u8; 16] = c.take(16)?.try_into().unwrap();
        let backing_path = c.bytes()?;
        Ok(Superblock {
            seq,
            clean,
            set_id,
            epoch,
            segment_size,
            segment_count,
            start_lsn,
            start_seq,
            start_offset,
            next_file_id,
            backing_dev,
            backing_ino,
            backing_path,
            boot_id,
        })
    }

    /// Picks the newest valid slot of a superblock file. A newer version in either slot is
    /// refused outright: this build must not guess at a format it does not know.
    pub fn decode_file(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf.len() < SUPERBLOCK_FILE_SIZE {
            return Err(SuperblockError::NoMagic);
        }
        let slots: Vec<_> = SLOT_OFFSETS.iter().map(|&o| Self::decode_slot(&buf[o..o + SLOT_SIZE])).collect();
        // A slot that passes its crc with a newer version: this build must not guess at it.
        for s in &slots {
            if let Err(SuperblockError::NewerVersion(v)) = s {
                return Err(SuperblockError::NewerVersion(*v));
            }
        }
        let best = slots.iter().filter_map(|s| s.as_ref().ok()).max_by_key(|s| s.seq);
        match best {
            Some(sb) => Ok(sb.clone()),
            None if slots.iter().all(|s| matches!(s, Err(SuperblockError::NoMagic))) => Err(SuperblockError::NoMagic),
            None => Err(SuperblockError::Corrupt),
        }
    }

    /// The byte offset of the slot this superblock (by its `seq`) is written to.
    pub fn slot_offset(&self) -> usize {
        SLOT_OFFSETS[(self.seq % 2) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Superblock {
        Superblock {
            seq,
            clean: false,
            set_id: [1; 16],
            epoch: 0,
            segment_size: 1 << 20,
            segment_count: 4,
            start_lsn: Lsn(10 + seq),
            start_seq: 2,
            start_offset: 64,
            next_file_id: FileId(5),
            backing_dev: 7,
            backing_ino: 8,
            backing_path: b"/b".to_vec(),
            boot_id: [3; 16],
        }
    }

    fn file_with(sbs: &[Superblock]) -> Vec<u8> {
        let mut f = vec![0u8; SUPERBLOCK_FILE_SIZE];
        for sb in sbs {
            let o = sb.slot_offset();
            f[o..o + SLOT_SIZE].copy_from_slice(&sb.encode_slot());
        }
        f
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_falls_back() {
        let f = file_with(&[sample(3), sample(4)]);
        assert_eq!(Superblock::decode_file(&f).unwrap().seq, 4);
        let mut torn = f.clone();
        torn[sample(4).slot_offset() + 100] ^= 1;
        assert_eq!(Superblock::decode_file(&torn).unwrap().seq, 3);
    }

    #[test]
    fn refusals() {
        assert_eq!(Superblock::decode_file(&[0; 4096]), Err(SuperblockError::NoMagic));
        let mut f = file_with(&[sample(3)]);
        let o = sample(3).slot_offset();
        f[o + 8] = 9;
        assert_eq!(Superblock::decode_file(&f), Err(SuperblockError::Corrupt), "a damaged version is damage");
        let crc = crc32c::crc32c(&f[o..o + SLOT_SIZE - 4]);
        f[o + SLOT_SIZE - 4..o + SLOT_SIZE].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Superblock::decode_file(&f), Err(SuperblockError::NewerVersion(9)));
        let mut g = file_with(&[sample(3)]);
        g[sample(3).slot_offset() + 40] ^= 1;
        assert_eq!(Superblock::decode_file(&g), Err(SuperblockError::Corrupt));
    }
}
