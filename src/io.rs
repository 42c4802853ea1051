//! The seams between ferryfs's logic and the world: journal storage and the backing tree.
//! `os/` implements them for real, `sim/` in memory with seeded faults; everything above
//! (journal, replay, passthrough) is written against these traits only.

use std::io;

use crate::format::ops::{NodeKind, SetAttr};
use crate::types::{FileId, Handle};

/// Every xattr ferryfs keeps for itself starts with this. A mount hides them from users, and a
/// mirror target never sets or removes one on behalf of a record.
pub const PRIVATE_XATTR_PREFIX: &[u8] = b"trusted.ferryfs.";

/// The tag a mirror target puts on every object it makes: set id (16 bytes) ‖ the primary's
/// file id (u64 LE). It tells the target which object a name holds after a crash, when its
/// own id → handle map may be behind the tree.
pub const TAG_XATTR: &[u8] = b"trusted.ferryfs.id";
const TAG_LEN: usize = 24;

/// True for ferryfs's own xattrs (`PRIVATE_XATTR_PREFIX`).
pub fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(PRIVATE_XATTR_PREFIX)
}

/// Where a journal lives: its superblock, its segment files and its id-table snapshot.
///
/// Durability contract an implementation must keep:
/// - `SegmentFile::write` lands in memory only (a page cache / a mapping); it is durable only
///   after a `flush` that covers it returns.
/// - `write_superblock` and `write_file_atomic` are durable when they return; a crash during
///   them leaves either the old or the new content (the superblock may tear inside its slot,
///   which its two-slot format survives).
pub trait Storage: Send + Sync + 'static {
    type Segment: SegmentFile;
    /// Opens segment file `index`, creating it with all `size` bytes allocated (reading as zeros)
    /// bytes when `create` is set and it does not exist.
    fn open_segment(&self, index: u32, size: u64, create: bool) -> io::Result<Self::Segment>;
    /// The number of segment files that exist (`seg-00000000` … contiguous from 0).
    fn segment_count(&self) -> io::Result<u32>;
    /// The whole superblock file, or `None` when there is none.
    fn read_superblock(&self) -> io::Result<Option<Vec<u8>>>;
    /// Writes `slot` at `offset` in the superblock file and makes it durable.
    fn write_superblock(&self, offset: usize, slot: &[u8]) -> io::Result<()>;
    /// Reads a small side file (the id table), `None` when it does not exist.
    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces a small side file atomically and durably.
    fn write_file_atomic(&self, name: &str, data: &[u8]) -> io::Result<()>;
}

/// One preallocated segment file of fixed size, mapped or simulated.
pub trait SegmentFile: Send + Sync + 'static {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `parts` one after another to `offset`. The caller serializes writers and never
    /// lets a write overlap a range another thread is reading.
    fn write(&self, offset: usize, parts: &[&[u8]]);
    /// Copies `len` bytes at `offset` into `out`.
    fn read(&self, offset: usize, out: &mut [u8]);
    /// Makes `[offset, offset + len)` durable.
    fn flush(&self, offset: usize, len: usize) -> io::Result<()>;
}

/// A new object's description, as a `Create` op carries it.
#[derive(Clone, Copy, Debug)]
pub struct NewNode<'a> {
    pub kind: NodeKind,
    /// Permission bits and suid/sgid/sticky (the type bits are ignored).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    /// The target of a symlink; empty otherwise.
    pub target: &'a [u8],
}

/// The backing directory, as the journal's redo and the live path mutate it.
///
/// Every object is reached from an open `Node` (for the real tree an `O_PATH` fd) and a
/// single name component, never a path, and never by following a symlink, so nothing outside
/// the tree can be touched. Errors are the OS's errno as `io::Error`.
pub trait Tree: Send + Sync + 'static {
    type Node: Send + Sync + 'static;

    fn root(&self) -> io::Result<Self::Node>;
    /// Reopens an object from its persistent handle; `ESTALE`/`ENOENT` when it is gone.
    fn open_handle(&self, handle: &Handle) -> io::Result<Self::Node>;
    /// The persistent handle of an object (includes the inode generation).
    fn handle_of(&self, node: &Self::Node) -> io::Result<Handle>;
    /// The object `name` in `dir`, without following a final symlink.
    fn lookup(&self, dir: &Self::Node, name: &[u8]) -> io::Result<Self::Node>;
    /// Makes `name` in `dir`; fails with `EEXIST` when it exists. Owner and mode are set
    /// exactly as given (including suid/sgid bits, which a chown would clear).
    fn create(&self, dir: &Self::Node, name: &[u8], new: &NewNode<'_>) -> io::Result<Self::Node>;
    /// Adds the name `name` in `dir` for `node` (a hard link).
    fn link(&self, node: &Self::Node, dir: &Self::Node, name: &[u8]) -> io::Result<()>;
    /// Removes `name` from `dir` (`rmdir` when `is_dir`).
    fn unlink(&self, dir: &Self::Node, name: &[u8], is_dir: bool) -> io::Result<()>;
    /// `renameat2` with its flags (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2).
    fn rename(
        &self,
        dir: &Self::Node,
        name: &[u8],
        new_dir: &Self::Node,
        new_name: &[u8],
        flags: u32,
    ) -> io::Result<()>;
    /// Applies the given attributes (size = truncate; times are absolute).
    fn set_attr(&self, node: &Self::Node, attr: &SetAttr) -> io::Result<()>;
    /// The size in bytes of a regular file (what a truncate changes).
    fn size(&self, node: &Self::Node) -> io::Result<u64>;
    /// Writes `data` at `offset` of a regular file.
    fn write(&self, node: &Self::Node, offset: u64, data: &[u8]) -> io::Result<()>;
    fn set_xattr(&self, node: &Self::Node, name: &[u8], value: &[u8], flags: u32) -> io::Result<()>;
    fn remove_xattr(&self, node: &Self::Node, name: &[u8]) -> io::Result<()>;
    fn fallocate(&self, node: &Self::Node, mode: u32, offset: u64, len: u64) -> io::Result<()>;
    /// Makes everything applied so far durable (syncfs of the backing filesystem).
    fn sync_all(&self) -> io::Result<()>;

    /// The LSN of the last namespace operation applied to the tree, as the tree itself records
    /// it (0 when it records none). Stored in the tree's own metadata, so a filesystem that
    /// keeps its metadata changes in order across a crash (ext4, XFS) keeps the marker
    /// consistent with the namespace it kept: replay then knows exactly which namespace
    /// operations the tree already holds (docs/FORMAT.md, "Replay").
    /// A marker written for another journal (another `set_id`, e.g. a backing directory
    /// copied with its xattrs) reads as 0.
    fn applied_marker(&self, set_id: &[u8; 16]) -> io::Result<u64>;
    /// Records `lsn` as the last namespace operation of journal `set_id` applied.
    fn set_applied_marker(&self, set_id: &[u8; 16], lsn: u64) -> io::Result<()>;

    /// The names in directory `dir`, without `.` and `..`, in no particular order.
    fn read_dir(&self, dir: &Self::Node) -> io::Result<Vec<Vec<u8>>>;
    /// The type of the object itself (a symlink is `Symlink`, whatever it points to).
    fn kind(&self, node: &Self::Node) -> io::Result<NodeKind>;
    /// The value of xattr `name` of the object itself; `ENODATA` when it has none.
    fn get_xattr(&self, node: &Self::Node, name: &[u8]) -> io::Result<Vec<u8>>;
    /// The names of the object's xattrs (every namespace the process may see).
    fn list_xattrs(&self, node: &Self::Node) -> io::Result<Vec<Vec<u8>>>;
    /// The object as a resync describes it (kind, mode, owner, rdev, size, times, a symlink's
    /// target), with id 0 and no xattrs: a target's tree serving a peer (`replica::blocks`).
    fn describe(&self, node: &Self::Node) -> io::Result<crate::proto::wire::control::NodeDesc>;
    /// Reads a regular file at `offset` into `buf`; returns how many bytes (0 at its end).
    fn read(&self, node: &Self::Node, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// The primary's file id this object was tagged with by replication set `set_id`
    /// (`TAG_XATTR`); `None` when it has no tag, or one of another set.
    fn tag(&self, node: &Self::Node, set_id: &[u8; 16]) -> io::Result<Option<FileId>> {
        match self.get_xattr(node, TAG_XATTR) {
            Ok(v) if v.len() == TAG_LEN && v[..16] == set_id[..] => {
                Ok(Some(FileId(u64::from_le_bytes(v[16..].try_into().expect("8 bytes")))))
            }
            Ok(_) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Tags the object as the primary's file `id` of replication set `set_id`.
    fn set_tag(&self, node: &Self::Node, set_id: &[u8; 16], id: FileId) -> io::Result<()> {
        let mut value = [0u8; TAG_LEN];
        value[..16].copy_from_slice(set_id);
        value[16..].copy_from_slice(&id.0.to_le_bytes());
        self.set_xattr(node, TAG_XATTR, &value, 0)
    }
}
