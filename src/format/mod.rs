//! Pure codecs: every byte ferryfs writes to disk or wire is encoded here (no I/O).
//! docs/FORMAT.md is the byte-by-byte description; the golden tests pin it.

pub mod codec;
pub mod ids;
pub mod ops;
pub mod record;
pub mod segment;
pub mod superblock;
