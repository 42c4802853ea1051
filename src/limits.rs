//! Every bound in one place, with compile-time checks on how they relate.

/// Bytes in one sync-map block (design §3, Locations).
pub const BLOCK_SIZE: u64 = 4096;
/// Default size of one journal segment file.
pub const SEGMENT_SIZE_DEFAULT: u64 = 64 << 20;
/// Smallest segment a journal may be created with (tests use small ones).
pub const SEGMENT_SIZE_MIN: u64 = 64 << 10;
/// Default total journal size (`--journal-size`).
pub const JOURNAL_SIZE_DEFAULT: u64 = 1 << 30;
/// Fewest segments in a journal: one being written, one being freed, one spare.
pub const SEGMENTS_MIN: u64 = 3;
/// Largest data payload of one write record; larger writes are split.
pub const WRITE_RECORD_DATA_MAX: usize = 1 << 20;
/// Longest single name component (as Linux NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest symlink target / xattr value carried in one record.
pub const VALUE_MAX: usize = 64 << 10;
/// Longest opaque backing-object handle (MAX_HANDLE_SZ is 128 plus the 4-byte type).
pub const HANDLE_MAX: usize = 132;
/// Open nodes (O_PATH fds) kept for objects the kernel holds; past this, an object is reopened
/// from its handle on each use. Bounded because a mount's open-file limit may be as low as
/// 20,000 here, and the kernel can hold far more inodes than that.
pub const NODES_CACHED_MAX: usize = 4096;

const _: () = assert!(SEGMENT_SIZE_MIN >= 16 * 4096);
const _: () = assert!(SEGMENT_SIZE_DEFAULT as usize >= 4 * (WRITE_RECORD_DATA_MAX + 4096));
const _: () = assert!(JOURNAL_SIZE_DEFAULT >= SEGMENTS_MIN * SEGMENT_SIZE_DEFAULT);
