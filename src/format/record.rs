//! The journal record: a fixed 64-byte little-endian header and a payload, crc32c over both
//! (docs/FORMAT.md, "Record"). The same bytes travel to bunkers and targets unchanged.

use super::codec::{Cursor, DecodeError, Put};
use crate::types::{FileId, Handle, Lsn, TxId};

/// "FRYR" in the file, read as a little-endian u32.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"FRYR");
/// The version of the record and segment format this build writes.
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_SIZE: usize = 64;
/// Records start on 8-byte boundaries; the gap after a payload is zero.
pub const RECORD_ALIGN: usize = 8;

/// Offset of the crc field inside the header.
const CRC_OFFSET: usize = 28;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// File data: file id, offset, bytes. A transaction on its own; no commit record unless
    /// the write to the backing file failed (then an `Abort` follows).
    Write = 1,
    /// The intent of a namespace or attribute mutation (`ops::Op`).
    Op = 2,
    /// The outcome "applied" of the `Op` transaction `txid`.
    Commit = 3,
    /// The outcome "failed with errno" of transaction `txid`; redo skips it.
    Abort = 4,
    /// File id → backing handle, journaled before any record that names the id.
    Bind = 5,
    /// Transaction `txid` needs nothing more from the log (claim 000:5); written by replication.
    Complete = 6,
    /// Replay redid the namespace op `txid` (payload: the 16-byte boot id it ran in), so a
    /// replay run again in the same boot knows the effect is in the backing directory.
    Redone = 7,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Op,
            3 => Kind::Commit,
            4 => Kind::Abort,
            5 => Kind::Bind,
            6 => Kind::Complete,
            7 => Kind::Redone,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Op => "op",
            Kind::Commit => "commit",
            Kind::Abort => "abort",
            Kind::Bind => "bind",
            Kind::Complete => "complete",
            Kind::Redone => "redone",
        }
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub lsn: Lsn,
    pub txid: TxId,
    pub payload_len: u32,
    pub crc: u32,
    pub set_id: [u8; 16],
    pub epoch: u64,
    pub time_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no record here (magic {0:#010x})")]
    NoMagic(u32),
    #[error("record format version {0} is newer than this build's {FORMAT_VERSION}")]
    NewerVersion(u16),
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("record of {0} bytes runs past the end of its segment")]
    TooLong(u64),
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("payload: {0}")]
    Payload(#[from] DecodeError),
}

/// Bytes a record with `payload_len` bytes of payload occupies, including alignment padding.
pub fn record_len(payload_len: usize) -> usize {
    (HEADER_SIZE + payload_len).next_multiple_of(RECORD_ALIGN)
}

/// Writes header + payload into `out` (exactly `record_len(payload.len())` bytes) and returns
/// the crc. `payload` is given in pieces so data can be copied straight from the caller's
/// buffer into the mapped segment with no intermediate copy.
pub fn encode_into(out: &mut [u8], mut h: Header, payload: &[&[u8]]) -> u32 {
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    assert_eq!(out.len(), record_len(payload_len), "record buffer size");
    h.payload_len = payload_len as u32;
    h.crc = 0;
    write_header(&mut out[..HEADER_SIZE], &h);
    let mut at = HEADER_SIZE;
    for p in payload {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    out[at..].fill(0);
    let crc = crc32c::crc32c(&out[..HEADER_SIZE + payload_len]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    crc
}

fn write_header(out: &mut [u8], h: &Header) {
    // Straight into the output (this runs once per record on the write path).
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&(h.kind as u16).to_le_bytes());
    out[8..16].copy_from_slice(&h.lsn.0.to_le_bytes());
    out[16..24].copy_from_slice(&h.txid.0.to_le_bytes());
    out[24..28].copy_from_slice(&h.payload_len.to_le_bytes());
    out[28..32].copy_from_slice(&h.crc.to_le_bytes());
    out[32..48].copy_from_slice(&h.set_id);
    out[48..56].copy_from_slice(&h.epoch.to_le_bytes());
    out[56..64].copy_from_slice(&h.time_ns.to_le_bytes());
}

/// Encodes a header whose crc covers the header and the payload given in pieces; the caller
/// writes the header, the pieces and `padding_len` zero bytes one after another. This is the
/// write path's encoder: the payload is never copied into an intermediate buffer.
pub fn encode_header(mut h: Header, payload: &[&[u8]]) -> [u8; HEADER_SIZE] {
    h.payload_len = payload.iter().map(|p| p.len()).sum::<usize>() as u32;
    h.crc = 0;
    let mut out = [0u8; HEADER_SIZE];
    write_header(&mut out, &h);
    let mut crc = crc32c::crc32c(&out);
    for p in payload {
        crc = crc32c::crc32c_append(crc, p);
    }
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Zero bytes after a payload of `payload_len` bytes, up to the record alignment.
pub fn padding_len(payload_len: usize) -> usize {
    record_len(payload_len) - HEADER_SIZE - payload_len
}

/// Decodes the header at the start of `buf` without checking the crc (the caller needs the
/// length first). `room` is how many bytes the segment has from here on.
pub fn decode_header(buf: &[u8], room: usize) -> Result<Header, RecordError> {
    let mut c = Cursor::new(buf);
    let magic = c.u32().map_err(|_| RecordError::NoMagic(0))?;
    if magic != RECORD_MAGIC {
        return Err(RecordError::NoMagic(magic));
    }
    let version = c.u16()?;
    if version > FORMAT_VERSION {
        return Err(RecordError::NewerVersion(version));
    }
    let kind_raw = c.u16()?;
    let lsn = Lsn(c.u64()?);
    let txid = TxId(c.u64()?);
    let payload_len = c.u32()?;
    let crc = c.u32()?;
    let set_id: [u8; 16] = c.take(16)?.try_into().unwrap();
    let epoch = c.u64()?;
    let time_ns = c.u64()?;
    if record_len(payload_len as usize) > room {
        return Err(RecordError::TooLong(payload_len as u64));
    }
    let kind = Kind::from_u16(kind_raw).ok_or(RecordError::UnknownKind(kind_raw))?;
    Ok(Header { kind, lsn, txid, payload_len, crc, set_id, epoch, time_ns })
}

/// Checks the crc of a whole record (`buf` starts at the header and holds at least the payload).
pub fn verify(buf: &[u8], h: &Header) -> Result<(), RecordError> {
    let end = HEADER_SIZE + h.payload_len as usize;
    let mut hasher_input = buf[..HEADER_SIZE].to_vec();
    hasher_input[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&hasher_input), &buf[HEADER_SIZE..end]);
    if crc != h.crc {
        return Err(RecordError::Crc { stored: h.crc, computed: crc });
    }
    Ok(())
}

/// Payload of a `Write` record: 16 bytes of position, then the data.
pub fn write_prefix(file: FileId, offset: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&file.0.to_le_bytes());
    p[8..].copy_from_slice(&offset.to_le_bytes());
    p
}

pub fn decode_write(payload: &[u8]) -> Result<(FileId, u64, &[u8]), DecodeError> {
    let mut c = Cursor::new(payload);
    let file = FileId(c.u64()?);
    let offset = c.u64()?;
    Ok((file, offset, c.rest()))
}

/// Payload of a `Bind` record.
pub fn encode_bind(id: FileId, handle: &Handle) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + handle.0.len());
    v.put_u64(id.0);
    v.put_bytes(&handle.0);
    v
}

pub fn decode_bind(payload: &[u8]) -> Result<(FileId, Handle), DecodeError> {
    let mut c = Cursor::new(payload);
    let id = FileId(c.u64()?);
    let h = c.bytes()?;
    if h.len() > crate::limits::HANDLE_MAX {
        return Err(DecodeError::BadValue("handle length"));
    }
    c.finish()?;
    Ok((id, Handle(h)))
}

/// Payload of an `Abort` record: the errno the operation failed with.
pub fn decode_abort(payload: &[u8]) -> Result<i32, DecodeError> {
    let mut c = Cursor::new(payload);
    let e = c.u32()? as i32;
    c.finish()?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Write,
            lsn: Lsn(7),
            txid: TxId(7),
            payload_len: 0,
            crc: 0,
            set_id: [0xAB; 16],
            epoch: 1,
            time_ns: 42,
        }
    }

    fn encode(h: Header, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0xEE; record_len(payload.len())];
        encode_into(&mut buf, h, &[payload]);
        buf
    }

    #[test]
    fn header_roundtrips_and_crc_verifies() {
        let p = [write_prefix(FileId(3), 4096).as_slice(), b"hello"].concat();
        let buf = encode(sample(), &p);
        assert_eq!(buf.len(), 64 + 24); // 21 bytes of payload padded to 24
        let h = decode_header(&buf, buf.len()).unwrap();
        assert_eq!(h.lsn, Lsn(7));
        assert_eq!(h.payload_len, 21);
        verify(&buf, &h).unwrap();
        let (f, off, data) = decode_write(&buf[64..64 + 21]).unwrap();
        assert_eq!((f, off, data), (FileId(3), 4096, &b"hello"[..]));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let buf = encode(sample(), b"payload bytes");
        for bit in 0..(64 + 13) * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let caught = match decode_header(&b, b.len()) {
                Err(_) => true,
                Ok(h) => verify(&b, &h).is_err(),
            };
            assert!(caught, "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn newer_version_and_overlong_are_refused() {
        let mut b = encode(sample(), b"x");
        assert!(matches!(decode_header(&b, 64), Err(RecordError::TooLong(1))));
        b[4] = 9;
        assert_eq!(decode_header(&b, b.len()), Err(RecordError::NewerVersion(9)));
    }

    /// Pins the bytes on disk: if this changes, old journals no longer read (FORMAT.md).
    #[test]
    fn golden_crc_is_pinned() {
        let buf = encode(sample(), b"golden");
        assert_eq!(&buf[..4], b"FRYR");
        assert_eq!(u32::from_le_bytes(buf[28..32].try_into().unwrap()), GOLDEN_CRC);
    }
    const GOLDEN_CRC: u32 = 852_052_960;
}
