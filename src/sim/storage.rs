//! A simulated journal disk.
//!
//! Fault model:
//! - Process crash (`crash_process`): nothing is lost; the page cache survives the process.
//! - Machine crash (`crash_machine`): every byte written since the last flush that covered it
//!   is at risk. Each dirty 4 KiB page independently reaches the disk whole, reaches it torn
//!   (a seeded prefix of 512-byte sectors), or is lost. Pages reach the disk in any order, so
//!   a later record may survive while an earlier one is lost; recovery must cope.
//! - The superblock and side files are written synchronously and atomically (their own
//!   two-slot and rename protocols are unit-tested separately).
//!
//! Every write and flush can also be counted, so a test can fail "the Nth flush".

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::io::{SegmentFile, Storage};

const PAGE: usize = 4096;
const SECTOR: usize = 512;

struct SegData {
    current: Vec<u8>,
    durable: Vec<u8>,
    dirty: BTreeSet<usize>,
}

#[derive(Default)]
struct Disk {
    segments: HashMap<u32, Arc<Mutex<SegData>>>,
    superblock: Option<Vec<u8>>,
    files: HashMap<String, Vec<u8>>,
    /// When set, the flush with this number (counting from 1) fails with EIO.
    fail_flush_at: Option<u64>,
    flushes: u64,
}

/// Cheap to clone: clones share one disk.
#[derive(Clone, Default)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
}

pub struct SimSegment {
    data: Arc<Mutex<SegData>>,
    disk: Arc<Mutex<Disk>>,
}

impl SimStorage {
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// A deep copy of the disk, current and durable images alike.
    pub fn fork(&self) -> SimStorage {
        let d = self.disk.lock().unwrap();
        let segments = d
            .segments
            .iter()
            .map(|(i, s)| {
                let s = s.lock().unwrap();
                let copy = SegData { current: s.current.clone(), durable: s.durable.clone(), dirty: s.dirty.clone() };
                (*i, Arc::new(Mutex::new(copy)))
            })
            .collect();
        let disk = Disk {
            segments,
            superblock: d.superblock.clone(),
            files: d.files.clone(),
            fail_flush_at: None,
            flushes: 0,
        };
        SimStorage { disk: Arc::new(Mutex::new(disk)) }
    }

    /// A process crash: the page cache survives, so nothing is lost.
    pub fn crash_process(&self) {}

    /// A machine crash: unflushed pages are kept, torn or lost, as `rng` decides.
    pub fn crash_machine(&self, rng: &mut ChaCha8Rng) {
        let disk = self.disk.lock().unwrap();
        let mut indexes: Vec<_> = disk.segments.keys().copied().collect();
        indexes.sort();
        for i in indexes {
            let mut seg = disk.segments[&i].lock().unwrap();
            let dirty: Vec<usize> = std::mem::take(&mut seg.dirty).into_iter().collect();
            for page in dirty {
                let start = page * PAGE;
                let end = (start + PAGE).min(seg.current.len());
                match rng.gen_range(0..4) {
                    0 | 1 => {}
                    2 => {
                        let (cur, dur) = split(&mut seg);
                        dur[start..end].copy_from_slice(&cur[start..end]);
                    }
                    _ => {
                        let sectors = rng.gen_range(1..PAGE / SECTOR);
                        let cut = (start + sectors * SECTOR).min(end);
                        let (cur, dur) = split(&mut seg);
                        dur[start..cut].copy_from_slice(&cur[start..cut]);
                    }
                }
            }
            let durable = seg.durable.clone();
            seg.current = durable;
        }
    }

    /// Flushes so far (each `SegmentFile::flush` call).
    pub fn flush_count(&self) -> u64 {
        self.disk.lock().unwrap().flushes
    }

    /// A machine crash that loses every unflushed page (the worst case, for exact tests).
    pub fn crash_machine_losing_all(&self) {
        let disk = self.disk.lock().unwrap();
        for seg in disk.segments.values() {
            let mut seg = seg.lock().unwrap();
            seg.dirty.clear();
            let durable = seg.durable.clone();
            seg.current = durable;
        }
    }

    /// Makes the `n`th flush from now (1 = the next) fail with EIO.
    pub fn fail_flush(&self, n: u64) {
        let mut d = self.disk.lock().unwrap();
        d.fail_flush_at = Some(d.flushes + n);
    }
}

fn split(seg: &mut SegData) -> (&Vec<u8>, &mut Vec<u8>) {
    let SegData { current, durable, .. } = seg;
    (current, durable)
}

impl SegmentFile for SimSegment {
    fn len(&self) -> usize {
        self.data.lock().unwrap().current.len()
    }

    fn write(&self, offset: usize, parts: &[&[u8]]) {
        let mut seg = self.data.lock().unwrap();
        let mut at = offset;
        for p in parts {
            seg.current[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        if at > offset {
            for page in offset / PAGE..=(at - 1) / PAGE {
                seg.dirty.insert(page);
            }
        }
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        let seg = self.data.lock().unwrap();
        out.copy_from_slice(&seg.current[offset..offset + out.len()]);
    }

    fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        {
            let mut d = self.disk.lock().unwrap();
            d.flushes += 1;
            if d.fail_flush_at == Some(d.flushes) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        if len == 0 {
            return Ok(());
        }
        let mut seg = self.data.lock().unwrap();
        let first = offset / PAGE;
        let last = (offset + len - 1) / PAGE;
        let pages: Vec<usize> = seg.dirty.range(first..=last).copied().collect();
        for page in pages {
            let start = page * PAGE;
            let end = (start + PAGE).min(seg.current.len());
            let (cur, dur) = split(&mut seg);
            dur[start..end].copy_from_slice(&cur[start..end]);
            seg.dirty.remove(&page);
        }
        Ok(())
    }
}

impl Storage for SimStorage {
    type Segment = SimSegment;

    fn open_segment(&self, index: u32, size: u64, create: bool) -> io::Result<SimSegment> {
        let mut d = self.disk.lock().unwrap();
        let data = match d.segments.get(&index) {
            Some(s) => s.clone(),
            None if create => {
                let s = Arc::new(Mutex::new(SegData {
                    current: vec![0; size as usize],
                    durable: vec![0; size as usize],
                    dirty: BTreeSet::new(),
                }));
                d.segments.insert(index, s.clone());
                s
            }
            None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
        };
        if data.lock().unwrap().current.len() as u64 != size {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "segment size differs"));
        }
        Ok(SimSegment { data, disk: self.disk.clone() })
    }

    fn segment_count(&self) -> io::Result<u32> {
        let d = self.disk.lock().unwrap();
        let mut n = 0;
        while d.segments.contains_key(&n) {
            n += 1;
        }
        Ok(n)
    }

    fn read_superblock(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.disk.lock().unwrap().superblock.clone())
    }

    fn write_superblock(&self, offset: usize, slot: &[u8]) -> io::Result<()> {
        let mut d = self.disk.lock().unwrap();
        let sb = d.superblock.get_or_insert_with(|| vec![0; crate::format::superblock::SUPERBLOCK_FILE_SIZE]);
        sb[offset..offset + slot.len()].copy_from_slice(slot);
        Ok(())
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.disk.lock().unwrap().files.get(name).cloned())
    }

    fn write_file_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.disk.lock().unwrap().files.insert(name.to_string(), data.to_vec());
        Ok(())
    }
}
