//! Newtypes shared by every layer. No I/O here.

use std::fmt;

/// A stable 64-bit identity of a file, directory, symlink or special file (design §3).
/// Assigned when ferryfs first sees or creates the object; survives rename, hard links
/// and restart; never reused. FUSE node ids are file ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FileId(pub u64);

impl FileId {
    /// The root of the backing directory.
    pub const ROOT: FileId = FileId(1);
    /// "No object": used in records where an id is optional (e.g. no file was replaced).
    pub const NONE: FileId = FileId(0);
    /// The first id handed out to objects other than the root.
    pub const FIRST_FREE: FileId = FileId(2);
}

/// A log sequence number: the position of one record in the journal, strictly increasing and
/// never reused within the valid log (it survives segment reuse and restart). Only the LSNs of
/// records that recovery discarded (a torn or corrupt tail, never acknowledged) are handed out
/// again, after recovery has zeroed those records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

/// A transaction id: the LSN of the transaction's first record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TxId(pub u64);

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lsn {}", self.0)
    }
}

/// An opaque, persistent reference to a backing object: for the real filesystem the bytes
/// of a `name_to_handle_at` file handle (type + f_handle), which include the inode
/// generation, so a reused inode number is never taken for the old file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub Vec<u8>);
