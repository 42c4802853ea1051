//! Journal storage on a real directory: segment files mapped with memmap2, the superblock
//! and the id table as small files written with pwrite + fdatasync / rename.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

use crate::format::superblock::SUPERBLOCK_FILE_SIZE;
use crate::io::{SegmentFile, Storage};

pub const SUPERBLOCK_NAME: &str = "superblock";

pub use crate::format::segment::segment_name;

pub struct DirStorage {
    dir: PathBuf,
}

impl DirStorage {
    pub fn new(dir: &Path) -> DirStorage {
        DirStorage { dir: dir.to_path_buf() }
    }

    /// The superblock file's bytes, `None` when this directory has no journal yet; errors
    /// when segment files exist without a superblock (a damaged journal, not a new one).
    pub fn read_superblock_if_any(&self) -> io::Result<Option<Vec<u8>>> {
        let sb = self.read_superblock()?;
        if sb.is_none() && self.segment_count()? > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds journal segments but no superblock: the journal is damaged; nothing was changed",
                    self.dir.display()
                ),
            ));
        }
        Ok(sb)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

pub struct MappedSegment {
    map: MmapRaw,
    file: File,
}

/// A write of at least this many bytes goes through `pwrite` instead of a copy into the map:
/// the first touch of a mapped page faults it in, and the kernel zeroes it before the copy
/// overwrites it (a quarter of a catch-up target's CPU time, measured with perf); `pwrite` of
/// whole pages fills the page cache without that. Both share the page cache, so the map reads
/// what was written, and the map's flush (msync) writes back either.
const PWRITE_MIN: usize = 64 << 10;

impl SegmentFile for MappedSegment {
    fn len(&self) -> usize {
        self.map.len()
    }

    fn write(&self, offset: usize, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        assert!(offset + total <= self.map.len(), "segment write past the end");
        let mut at = offset;
        for p in parts {
            // A failed pwrite (EIO) falls back to the copy, which is what happened before.
            if total >= PWRITE_MIN && self.file.write_all_at(p, at as u64).is_ok() {
                at += p.len();
                continue;
            }
            // SAFETY: the range is inside the mapping (checked above); the journal's writer lock
            // serializes writers, and no reader looks at bytes past the published end.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), self.map.as_mut_ptr().add(at), p.len()) };
            at += p.len();
        }
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.map.len(), "segment read past the end");
        // SAFETY: the range is inside the mapping (checked above); bytes being read are not
        // being written (see `write`).
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(offset), out.as_mut_ptr(), out.len()) };
    }

    fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        self.map.flush_range(offset, len)
    }
}

impl Storage for DirStorage {
    type Segment = MappedSegment;

    fn open_segment(&self, index: u32, size: u64, create: bool) -> io::Result<MappedSegment> {
        let path = self.dir.join(segment_name(index));
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => create_zeroed(&path, size)?,
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {len} bytes, the superblock says {size}", path.display()),
            ));
        }
        let map = MmapRaw::map_raw(&file)?;
        Ok(MappedSegment { map, file })
    }

    fn segment_count(&self) -> io::Result<u32> {
        let mut n = 0;
        while self.dir.join(segment_name(n)).exists() {
            n += 1;
        }
        Ok(n)
    }

    fn read_superblock(&self) -> io::Result<Option<Vec<u8>>> {
        self.read_file(SUPERBLOCK_NAME)
    }

    fn write_superblock(&self, offset: usize, slot: &[u8]) -> io::Result<()> {
        let path = self.dir.join(SUPERBLOCK_NAME);
        let fresh = !path.exists();
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        if f.metadata()?.len() < SUPERBLOCK_FILE_SIZE as u64 {
            f.set_len(SUPERBLOCK_FILE_SIZE as u64)?;
        }
        f.write_all_at(slot, offset as u64)?;
        f.sync_data()?;
        if fresh {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_file_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }
}

/// Creates a segment file with all its blocks allocated (fallocate), so writes through the
/// mapping never fail for lack of space and the file's size never changes again. Made under a
/// temporary name and renamed, so a crash never leaves a short segment behind.
fn create_zeroed(path: &Path, size: u64) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let tmp = path.with_extension("new");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
    // SAFETY: fallocate on an fd we own; no memory is involved.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as i64) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        f.set_len(size)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(f)
}
