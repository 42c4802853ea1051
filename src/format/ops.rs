//! Payloads of `Op` records: namespace and attribute mutations (docs/FORMAT.md, "Op payloads").
//!
//! Every op names objects by file id and single name components, never by path, so redo can
//! check whether its effect is already there (design §1). Encoding is little-endian, fixed
//! fields first, variable fields as `u32 length + bytes`.

use super::codec::{Cursor, DecodeError, Put};
use crate::types::FileId;

/// What kind of object a `Create` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl NodeKind {
    pub fn from_u8(v: u8) -> Option<NodeKind> {
        Some(match v {
            1 => NodeKind::File,
            2 => NodeKind::Dir,
            3 => NodeKind::Symlink,
            4 => NodeKind::Fifo,
            5 => NodeKind::Socket,
            6 => NodeKind::CharDev,
            7 => NodeKind::BlockDev,
            _ => return None,
        })
    }
}

/// A point in time as stored in records: resolved before journaling (UTIME_NOW becomes the
/// concrete time), so redo sets exactly what the primary set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// A record header's time (nanoseconds since the epoch).
    pub fn from_ns(ns: u64) -> Timestamp {
        Timestamp { secs: (ns / 1_000_000_000) as i64, nanos: (ns % 1_000_000_000) as u32 }
    }
}

/// Attribute changes of one `setattr`; `None` leaves the attribute as it is (UTIME_OMIT).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// One namespace or attribute mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make `name` in `parent` as `new_id`: a file, directory, symlink (`target`) or special file.
    Create {
        parent: FileId,
        name: Vec<u8>,
        new_id: FileId,
        kind: NodeKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: Vec<u8>,
    },
    /// Add the name `new_name` in `new_parent` for the existing object `id`.
    Link {
        id: FileId,
        new_parent: FileId,
        new_name: Vec<u8>,
    },
    /// Remove `name` (object `id`) from `parent`; `dir` for rmdir.
    Unlink {
        parent: FileId,
        name: Vec<u8>,
        id: FileId,
        dir: bool,
    },
    /// renameat2: `id` moves from (parent, name) to (new_parent, new_name); `replaced` is the id
    /// that `new_name` named before (exchanged with RENAME_EXCHANGE), or `FileId::NONE`.
    Rename {
        parent: FileId,
        name: Vec<u8>,
        new_parent: FileId,
        new_name: Vec<u8>,
        flags: u32,
        id: FileId,
        replaced: FileId,
    },
    SetAttr {
        id: FileId,
        attr: SetAttr,
    },
    SetXattr {
        id: FileId,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        id: FileId,
        name: Vec<u8>,
    },
    Fallocate {
        id: FileId,
        mode: u32,
        offset: u64,
        len: u64,
    },
}

const OP_CREATE: u16 = 1;
const OP_LINK: u16 = 2;
const OP_UNLINK: u16 = 3;
const OP_RENAME: u16 = 4;
const OP_SETATTR: u16 = 5;
const OP_SETXATTR: u16 = 6;
const OP_REMOVEXATTR: u16 = 7;
const OP_FALLOCATE: u16 = 8;

const ATTR_MODE: u32 = 1;
const ATTR_UID: u32 = 2;
const ATTR_GID: u32 = 4;
const ATTR_SIZE: u32 = 8;
const ATTR_ATIME: u32 = 16;
const ATTR_MTIME: u32 = 32;

impl Op {
    /// The objects whose mtime this op changes. ferryfs sets their mtime to the time in the
    /// op's commit record, on the primary and at every target, so a mirror's times equal the
    /// primary's instead of being the times the target applied the op.
    pub fn mtime_ids(&self) -> Vec<FileId> {
        match self {
            Op::Create { parent, new_id, .. } => vec![*parent, *new_id],
            Op::Link { new_parent, .. } => vec![*new_parent],
            Op::Unlink { parent, .. } => vec![*parent],
            Op::Rename { parent, new_parent, .. } if parent == new_parent => vec![*parent],
            Op::Rename { parent, new_parent, .. } => vec![*parent, *new_parent],
            Op::SetAttr { id, attr } if attr.size.is_some() && attr.mtime.is_none() => vec![*id],
            Op::Fallocate { id, .. } => vec![*id],
            Op::SetAttr { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } => Vec::new(),
        }
    }

    /// The short name used by `ferryfs inspect`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rename { .. } => "rename",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Fallocate { .. } => "fallocate",
        }
    }

    /// One line for operators: ids as `#n`, names as text.
    pub fn describe(&self) -> String {
        let n = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Op::Create { parent, name, new_id, kind, mode, uid, gid, rdev, target } => format!(
                "create {parent}/{:?} -> {new_id} {kind:?} mode={mode:o} owner={uid}:{gid}{}{}",
                n(name),
                if *rdev != 0 { format!(" rdev={rdev}") } else { String::new() },
                if target.is_empty() { String::new() } else { format!(" target={:?}", n(target)) }
            ),
            Op::Link { id, new_parent, new_name } => format!("link {id} as {new_parent}/{:?}", n(new_name)),
            Op::Unlink { parent, name, id, dir } => {
                format!("{} {parent}/{:?} ({id})", if *dir { "rmdir" } else { "unlink" }, n(name))
            }
            Op::Rename { parent, name, new_parent, new_name, flags, id, replaced } => {
                format!(
                    "rename {parent}/{:?} ({id}) to {new_parent}/{:?} (replacing {replaced}) flags={flags}",
                    n(name),
                    n(new_name)
                )
            }
            Op::SetAttr { id, attr } => format!("setattr {id} {attr:?}"),
            Op::SetXattr { id, name, value, flags } => {
                format!("setxattr {id} {:?} ({} bytes) flags={flags}", n(name), value.len())
            }
            Op::RemoveXattr { id, name } => format!("removexattr {id} {:?}", n(name)),
            Op::Fallocate { id, mode, offset, len } => format!("fallocate {id} mode={mode} offset={offset} len={len}"),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Create { parent, name, new_id, kind, mode, uid, gid, rdev, target } => {
                out.put_u16(OP_CREATE);
                out.put_u16(*kind as u16);
                out.put_u32(*mode);
                out.put_u64(parent.0);
                out.put_u64(new_id.0);
                out.put_u32(*uid);
                out.put_u32(*gid);
                out.put_u64(*rdev);
                out.put_bytes(name);
                out.put_bytes(target);
            }
            Op::Link { id, new_parent, new_name } => {
                out.put_u16(OP_LINK);
                out.put_u16(0);
                out.put_u32(0);
                out.put_u64(id.0);
                out.put_u64(new_parent.0);
                out.put_bytes(new_name);
            }
            Op::Unlink { parent, name, id, dir } => {
                out.put_u16(OP_UNLINK);
                out.put_u16(*dir as u16);
                out.put_u32(0);
                out.put_u64(parent.0);
                out.put_u64(id.0);
                out.put_bytes(name);
            }
            Op::Rename { parent, name, new_parent, new_name, flags, id, replaced } => {
                out.put_u16(OP_RENAME);
                out.put_u16(0);
                out.put_u32(*flags);
                out.put_u64(parent.0);
                out.put_u64(new_parent.0);
                out.put_u64(id.0);
                out.put_u64(replaced.0);
                out.put_bytes(name);
                out.put_bytes(new_name);
            }
            Op::SetAttr { id, attr } => {
                out.put_u16(OP_SETATTR);
                out.put_u16(0);
                let mut valid = 0;
                valid |= if attr.mode.is_some() { ATTR_MODE } else { 0 };
                valid |= if attr.uid.is_some() { ATTR_UID } else { 0 };
                valid |= if attr.gid.is_some() { ATTR_GID } else { 0 };
                valid |= if attr.size.is_some() { ATTR_SIZE } else { 0 };
                valid |= if attr.atime.is_some() { ATTR_ATIME } else { 0 };
                valid |= if attr.mtime.is_some() { ATTR_MTIME } else { 0 };
                out.put_u32(valid);
                out.put_u64(id.0);
                out.put_u32(attr.mode.unwrap_or(0));
                out.put_u32(attr.uid.unwrap_or(0));
                out.put_u32(attr.gid.unwrap_or(0));
                out.put_u32(0);
                out.put_u64(attr.size.unwrap_or(0));
                let zero = Timestamp { secs: 0, nanos: 0 };
                for t in [attr.atime.unwrap_or(zero), attr.mtime.unwrap_or(zero)] {
                    out.put_u64(t.secs as u64);
                    out.put_u32(t.nanos);
                    out.put_u32(0);
                }
            }
            Op::SetXattr { id, name, value, flags } => {
                out.put_u16(OP_SETXATTR);
                out.put_u16(0);
                out.put_u32(*flags);
                out.put_u64(id.0);
                out.put_bytes(name);
                out.put_bytes(value);
            }
            Op::RemoveXattr { id, name } => {
                out.put_u16(OP_REMOVEXATTR);
                out.put_u16(0);
                out.put_u32(0);
                out.put_u64(id.0);
                out.put_bytes(name);
            }
            Op::Fallocate { id, mode, offset, len } => {
                out.put_u16(OP_FALLOCATE);
                out.put_u16(0);
                out.put_u32(*mode);
                out.put_u64(id.0);
                out.put_u64(*offset);
                out.put_u64(*len);
            }
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Op, DecodeError> {
        let mut c = Cursor::new(buf);
        let code = c.u16()?;
        let small = c.u16()?;
        let word = c.u32()?;
        let op = match code {
            OP_CREATE => {
                let kind = NodeKind::from_u8(small as u8).ok_or(DecodeError::BadValue("node kind"))?;
                let parent = FileId(c.u64()?);
                let new_id = FileId(c.u64()?);
                let uid = c.u32()?;
                let gid = c.u32()?;
                let rdev = c.u64()?;
                let name = c.name()?;
                let target = c.bytes()?;
                Op::Create { parent, name, new_id, kind, mode: word, uid, gid, rdev, target }
            }
            OP_LINK => {
                let id = FileId(c.u64()?);
                let new_parent = FileId(c.u64()?);
                Op::Link { id, new_parent, new_name: c.name()? }
            }
            OP_UNLINK => {
                let parent = FileId(c.u64()?);
                let id = FileId(c.u64()?);
                Op::Unlink { parent, name: c.name()?, id, dir: small != 0 }
            }
            OP_RENAME => {
                let parent = FileId(c.u64()?);
                let new_parent = FileId(c.u64()?);
                let id = FileId(c.u64()?);
                let replaced = FileId(c.u64()?);
                let name = c.name()?;
                let new_name = c.name()?;
                Op::Rename { parent, name, new_parent, new_name, flags: word, id, replaced }
            }
            OP_SETATTR => {
                let id = FileId(c.u64()?);
                let mode = c.u32()?;
                let uid = c.u32()?;
                let gid = c.u32()?;
                let _pad = c.u32()?;
                let size = c.u64()?;
                let mut times = [Timestamp { secs: 0, nanos: 0 }; 2];
                for t in &mut times {
                    t.secs = c.u64()? as i64;
                    t.nanos = c.u32()?;
                    let _pad = c.u32()?;
                }
                let has = |bit: u32| word & bit != 0;
                let attr = SetAttr {
                    mode: has(ATTR_MODE).then_some(mode),
                    uid: has(ATTR_UID).then_some(uid),
                    gid: has(ATTR_GID).then_some(gid),
                    size: has(ATTR_SIZE).then_some(size),
                    atime: has(ATTR_ATIME).then_some(times[0]),
                    mtime: has(ATTR_MTIME).then_some(times[1]),
                };
                Op::SetAttr { id, attr }
            }
            OP_SETXATTR => {
                let id = FileId(c.u64()?);
                let name = c.bytes()?;
                let value = c.bytes()?;
                Op::SetXattr { id, name, value, flags: word }
            }
            OP_REMOVEXATTR => {
                let id = FileId(c.u64()?);
                Op::RemoveXattr { id, name: c.bytes()? }
            }
            OP_FALLOCATE => {
                let id = FileId(c.u64()?);
                let offset = c.u64()?;
                let len = c.u64()?;
                Op::Fallocate { id, mode: word, offset, len }
            }
            _ => return Err(DecodeError::BadValue("op code")),
        };
        c.finish()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(op: Op) {
        let mut buf = Vec::new();
        op.encode(&mut buf);
        assert_eq!(Op::decode(&buf).unwrap(), op);
        // Every strict prefix must be refused, never misread.
        for cut in 0..buf.len() {
            assert!(Op::decode(&buf[..cut]).is_err(), "prefix {cut} of {op:?} decoded");
        }
    }

    #[test]
    fn every_op_roundtrips_and_refuses_truncation() {
        let t = Timestamp { secs: -5, nanos: 999_999_999 };
        roundtrip(Op::Create {
            parent: FileId(1),
            name: b"a".to_vec(),
            new_id: FileId(9),
            kind: NodeKind::Symlink,
            mode: 0o777,
            uid: 1000,
            gid: 100,
            rdev: 0,
            target: b"../x".to_vec(),
        });
        roundtrip(Op::Link { id: FileId(9), new_parent: FileId(3), new_name: b"b".to_vec() });
        roundtrip(Op::Unlink { parent: FileId(3), name: b"b".to_vec(), id: FileId(9), dir: true });
        roundtrip(Op::Rename {
            parent: FileId(1),
            name: b"x".to_vec(),
            new_parent: FileId(2),
            new_name: b"y".to_vec(),
            flags: 2,
            id: FileId(4),
            replaced: FileId(5),
        });
        roundtrip(Op::SetAttr {
            id: FileId(4),
            attr: SetAttr { mode: Some(0o4755), size: Some(7), mtime: Some(t), ..Default::default() },
        });
        roundtrip(Op::SetXattr { id: FileId(4), name: b"user.k".to_vec(), value: vec![0, 1], flags: 1 });
        roundtrip(Op::RemoveXattr { id: FileId(4), name: b"user.k".to_vec() });
        roundtrip(Op::Fallocate { id: FileId(4), mode: 3, offset: 4096, len: 8192 });
    }

    #[test]
    fn names_with_slash_or_dots_are_refused() {
        for bad in [&b"a/b"[..], b".", b"..", b"", b"a\0b"] {
            let op = Op::Link { id: FileId(9), new_parent: FileId(3), new_name: bad.to_vec() };
            let mut buf = Vec::new();
            op.encode(&mut buf);
            assert!(Op::decode(&buf).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn golden_encoding_is_pinned() {
        let mut buf = Vec::new();
        Op::Unlink { parent: FileId(1), name: b"f".to_vec(), id: FileId(2), dir: false }.encode(&mut buf);
        assert_eq!(buf, [3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, b'f']);
    }
}
