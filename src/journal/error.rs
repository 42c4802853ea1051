use std::io;

use crate::format::superblock::SuperblockError;

/// What can go wrong with a journal. `Corrupt`-like errors (the journal's bytes are wrong)
/// are kept apart from `Io` (the OS failed us), because an operator acts differently on each.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("I/O error while {0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("the journal directory has no superblock file: it is not a ferryfs journal (or was never initialised)")]
    NoSuperblock,
    #[error("unreadable superblock: {0}")]
    Superblock(#[from] SuperblockError),
    #[error("the journal is corrupt: {0}")]
    Corrupt(String),
    #[error("the journal is full: {0}")]
    Full(String),
    /// The real-time copy (the bunker) did not take the records and its policy is to fail.
    #[error("the bunker does not hold the records: {0}")]
    Mirror(String),
}

impl JournalError {
    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            JournalError::Io(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
            JournalError::Full(_) => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}
