//! The workload of the failover and catch-up tests: fsynced appends of numbered records,
//! round-robin over a few files, and the check that a directory holds that stream applied up
//! to some point (no reordering, no hole).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use super::pattern;

/// Size of one logged record; files are written in whole records.
pub const REC: usize = 700;
/// Files the records go round-robin to: record i goes to f{i % FILES}.
pub const FILES: u64 = 4;

pub fn record(i: u64) -> Vec<u8> {
    let mut r = format!("record {i:010} ").into_bytes();
    r.extend_from_slice(&pattern(i, REC - r.len() - 1));
    r.push(b'\n');
    r
}

/// Appends record i to f{i % FILES} and fdatasyncs it, for i = 0, 1, …; after each fsync
/// that returned, `acked` is i + 1. Every 50 records a small file m{i} is created and fsynced
/// too (namespace operations in the stream). Stops at the first error (the mount died).
pub struct Workload {
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Workload {
    pub fn start(mnt: &Path) -> Workload {
        let (acked, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (a, s, mnt) = (acked.clone(), stop.clone(), mnt.to_path_buf());
        let thread = thread::spawn(move || {
            let files: Vec<File> = (0..FILES)
                .map(|k| OpenOptions::new().create(true).append(true).open(mnt.join(format!("f{k}"))).unwrap())
                .collect();
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let f = &files[(i % FILES) as usize];
                let ok = (&*f).write_all(&record(i)).is_ok() && f.sync_data().is_ok();
                if !ok {
                    return;
                }
                if i % 50 == 49 {
                    let p = mnt.join(format!("m{i}"));
                    let ok = fs::write(&p, record(i)).is_ok() && File::open(&p).and_then(|f| f.sync_all()).is_ok();
                    if !ok {
                        return;
                    }
                }
                i += 1;
                a.store(i, Ordering::Release);
            }
        });
        Workload { acked, stop, thread: Some(thread) }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    pub fn join(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().unwrap().join();
        self.acked()
    }
}

/// Checks a directory holds the workload's stream applied up to some point: every file f{k}
/// is a byte prefix of its records, with no hole across files (record j present whenever a
/// later record is), and every acked record present (with its m-file). Returns how many
/// records are present.
pub fn check_prefix(dir: &Path, acked: u64) -> u64 {
    let mut complete = Vec::new();
    for k in 0..FILES {
        let data = fs::read(dir.join(format!("f{k}"))).unwrap_or_default();
        let n = (data.len() / REC) as u64;
        for (j, chunk) in data.chunks(REC).enumerate() {
            let i = k + FILES * j as u64;
            let want = record(i);
            assert_eq!(chunk, &want[..chunk.len()], "f{k}: record {i} differs (reordered or damaged)");
        }
        complete.push(n);
    }
    // Record i is in f{i%FILES} at index i/FILES: present iff i/FILES < complete[i%FILES].
    let present = |i: u64| i / FILES < complete[(i % FILES) as usize];
    let top = (0..FILES).filter(|k| complete[*k as usize] > 0).map(|k| k + FILES * (complete[k as usize] - 1)).max();
    let count = top.map_or(0, |t| t + 1);
    for i in 0..count {
        assert!(present(i), "record {i} is missing but record {} is present: a hole", count - 1);
    }
    assert!(count >= acked, "only {count} records present, {acked} were acknowledged by fsync");
    for i in (49..acked).step_by(50) {
        assert_eq!(fs::read(dir.join(format!("m{i}"))).ok(), Some(record(i)), "m{i} (acknowledged) missing or wrong");
    }
    count
}
