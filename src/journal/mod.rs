//! The write-ahead journal: preallocated segments used round-robin, a superblock holding the
//! start of the log (the checkpoint), group commit, and recovery (docs/FORMAT.md).
//!
//! Knows nothing of FUSE or the network: it appends records, makes them durable, scans them
//! back and frees log space once a checkpoint covers it (claims 000:3, 5, 6).

mod cursor;
mod error;
pub mod reader;
pub mod recovery;
pub mod replay;
mod writer;

#[cfg(test)]
mod tests;

pub use cursor::{CursorError, LogCursor};
pub use error::JournalError;
pub use writer::{AllRetentions, Journal, JournalGeometry, Mirror, Position, Retention, Settled};

use crate::format::superblock::Superblock;
use crate::io::Storage;

/// Reads and decodes the superblock; the journal is unusable without one.
pub fn read_superblock<S: Storage>(storage: &S) -> Result<Superblock, JournalError> {
    let bytes = storage
        .read_superblock()
        .map_err(|e| JournalError::Io("reading the superblock".into(), e))?
        .ok_or(JournalError::NoSuperblock)?;
    Ok(Superblock::decode_file(&bytes)?)
}
