//! Journal unit tests. Each body runs on the simulated disk and on real files
//! (style.md, example 10).

use std::sync::Arc;

use super::reader::{self, EndKind};
use super::{Journal, JournalGeometry, read_superblock};
use crate::format::superblock::Superblock;
use crate::io::{SegmentFile, Storage};
use crate::os::storage::DirStorage;
use crate::sim::storage::SimStorage;
use crate::types::{FileId, Lsn};

const GEO: JournalGeometry = JournalGeometry { segment_size: 64 << 10, segment_count: 3 };

fn sb() -> Superblock {
    Superblock::new([9; 16], 0, 0, vec![], [0; 16])
}

/// Everything after the checkpoint, as (lsn, file, offset, len) of write records.
fn writes<S: Storage>(s: &S) -> (Vec<(u64, u64, u64, usize)>, reader::ScanEnd) {
    let sb = read_superblock(s).unwrap();
    let mut v = vec![];
    let end = reader::scan(s, &sb, |r| {
        if let Ok((f, off, d)) = crate::format::record::decode_write(r.payload) {
            v.push((r.header.lsn.0, f.0, off, d.len()));
        }
        true
    })
    .unwrap();
    (v, end)
}

fn rollover_and_reuse<S: Storage + Clone>(s: S) {
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    let data = vec![0xAB; 10_000];
    // 3 segments of 64 KiB hold about 18 such records: write 100, so segments are reused
    // several times; checkpoints (no hook: nothing in flight) free them as needed.
    for i in 0..100u64 {
        let tx = j.append_write(FileId(5), i * 10_000, &data).unwrap();
        j.done(tx);
        if i == 97 {
            j.checkpoint().unwrap();
        }
    }
    j.sync().unwrap();
    let (w, end) = writes(&s);
    assert_eq!(end.kind, EndKind::Clean);
    assert_eq!(w.len(), 2, "only the records after the last checkpoint remain: {w:?}");
    assert_eq!(w[0].2, 98 * 10_000);
    assert!(j.superblock().start_seq >= 10, "segments were reused: start seq {}", j.superblock().start_seq);
    assert_eq!(s.segment_count().unwrap(), 3, "no segment file beyond the journal's size");
}

#[test]
fn segments_roll_over_and_are_reused_sim() {
    rollover_and_reuse(SimStorage::new());
}

#[derive(Clone)]
struct SharedDir(Arc<tempfile::TempDir>);

impl Storage for SharedDir {
    type Segment = <DirStorage as Storage>::Segment;
    fn open_segment(&self, index: u32, size: u64, create: bool) -> std::io::Result<Self::Segment> {
        DirStorage::new(self.0.path()).open_segment(index, size, create)
    }
    fn segment_count(&self) -> std::io::Result<u32> {
        DirStorage::new(self.0.path()).segment_count()
    }
    fn read_superblock(&self) -> std::io::Result<Option<Vec<u8>>> {
        DirStorage::new(self.0.path()).read_superblock()
    }
    fn write_superblock(&self, offset: usize, slot: &[u8]) -> std::io::Result<()> {
        DirStorage::new(self.0.path()).write_superblock(offset, slot)
    }
    fn read_file(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        DirStorage::new(self.0.path()).read_file(name)
    }
    fn write_file_atomic(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        DirStorage::new(self.0.path()).write_file_atomic(name, data)
    }
}

fn real() -> SharedDir {
    SharedDir(Arc::new(tempfile::tempdir().unwrap()))
}

#[test]
fn segments_roll_over_and_are_reused_real() {
    rollover_and_reuse(real());
}

fn torn_tail_is_found<S: Storage + Clone>(s: S) {
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    for i in 0..5u64 {
        j.done(j.append_write(FileId(2), i, b"abcdefgh").unwrap());
    }
    j.sync().unwrap();
    let (w, end) = writes(&s);
    assert_eq!(w.len(), 5);
    // Tear the last record: flip a byte of its payload.
    let seg = s.open_segment(0, GEO.segment_size, false).unwrap();
    let at = end.pos.offset as usize - 8;
    let mut b = [0u8; 1];
    seg.read(at, &mut b);
    seg.write(at, &[&[b[0] ^ 0xFF]]);
    let (w, end) = writes(&s);
    assert_eq!(w.len(), 4, "the torn record is not read");
    assert!(matches!(end.kind, EndKind::Torn(_)), "{end:?}");
    assert_eq!(end.next_lsn, Lsn(5));
}

#[test]
fn a_torn_tail_ends_the_log_sim() {
    torn_tail_is_found(SimStorage::new());
}

#[test]
fn a_torn_tail_ends_the_log_real() {
    torn_tail_is_found(real());
}

#[test]
fn concurrent_fsyncs_share_flushes() {
    let s = SimStorage::new();
    let j = Arc::new(Journal::create(s.clone(), GEO, sb()).unwrap());
    let before = s.flush_count();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let tx = j.append_write(FileId(t + 2), i, b"x").unwrap();
                    j.done(tx);
                    let lsn = Lsn(tx.0 + 1);
                    j.sync_to(lsn).unwrap();
                    assert!(j.durable_lsn() >= lsn, "sync returned before its record was durable");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(s.flush_count() > before);
}

#[test]
fn one_flush_covers_every_waiter_appended_before_it() {
    let s = SimStorage::new();
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    let txs: Vec<_> = (0..8u64).map(|i| j.append_write(FileId(2), i, b"x").unwrap()).collect();
    let before = s.flush_count();
    for tx in &txs {
        j.sync_to(Lsn(tx.0 + 1)).unwrap();
    }
    assert_eq!(s.flush_count() - before, 1, "eight fsyncs of records appended together share one flush");
}

#[test]
fn a_failed_flush_is_reported_and_retried() {
    let s = SimStorage::new();
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    j.done(j.append_write(FileId(2), 0, b"data").unwrap());
    s.fail_flush(1);
    assert!(j.sync().is_err(), "an EIO from the disk reaches the fsync caller");
    j.sync().unwrap();
    assert!(j.durable_lsn() > Lsn(1));
}

/// A crash leaves the log's end in segment 0 (a damaged record) while the crashed run had
/// already written records into segment 1. Recovery hands those LSNs out again; none of the
/// crashed run's records may ever be read back as part of the new log.
#[test]
fn records_discarded_at_recovery_never_come_back() {
    use crate::journal::recovery;
    use crate::sim::tree::SimTree;
    let s = SimStorage::new();
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    let data = [0x5Au8; 3000];
    let mut n = 0u64;
    while j.superblock().start_seq == 0 && n < 30 {
        j.done(j.append_write(FileId(2), n * 3000, &data).unwrap());
        n += 1;
    }
    j.sync().unwrap();
    drop(j);
    // Damage record 10 in segment 0: everything from it on is discarded.
    let (w, _) = writes(&s);
    assert!(w.len() > 25, "records reach segment 1: {}", w.len());
    let seg0 = s.open_segment(0, GEO.segment_size, false).unwrap();
    let mut off = 0;
    let sbk = read_superblock(&s).unwrap();
    reader::scan(&s, &sbk, |r| {
        if r.header.lsn == Lsn(10) {
            off = r.pos.offset as usize;
        }
        true
    })
    .unwrap();
    seg0.write(off + 70, &[&[0xFF]]);
    let tree = SimTree::new();
    let opened =
        recovery::recover(s.clone(), read_superblock(&s).unwrap(), &tree, [0; 16], true, &mut |_, _| {}).unwrap();
    // The new run writes the same sizes again, into segment 1 but stopping short of where the
    // crashed run stopped: the old records after the new end sit at the offsets and LSNs the
    // scan expects next.
    let j = opened.journal;
    let again = n - 13;
    for i in 0..again {
        j.done(j.append_write(FileId(3), i * 3000, &data).unwrap());
    }
    j.close_clean().unwrap();
    drop(j);
    let mut sbk = read_superblock(&s).unwrap();
    sbk.start_lsn = Lsn(1);
    sbk.start_seq = 0;
    sbk.start_offset = crate::format::segment::SEGMENT_HEADER_SIZE as u64;
    let mut files = vec![];
    reader::scan(&s, &sbk, |r| {
        if let Ok((f, _, _)) = crate::format::record::decode_write(r.payload) {
            files.push(f.0);
        }
        true
    })
    .unwrap();
    let old = files.iter().filter(|&&f| f == 2).count();
    assert_eq!(old, 9, "only the 9 records before the damage are from the crashed run: {files:?}");
    assert_eq!(files.iter().filter(|&&f| f == 3).count() as u64, again);
}

/// A writer never waits for log space forever: when a transaction in flight holds the oldest
/// segment, appends fail with ENOSPC after the wait, and succeed again once it ends.
#[test]
fn a_full_journal_fails_with_enospc_after_the_wait_and_recovers() {
    let s = SimStorage::new();
    let j = Journal::create(s.clone(), GEO, sb()).unwrap();
    j.set_full_wait(std::time::Duration::from_millis(50));
    let held = j.append_write(FileId(2), 0, b"held in flight").unwrap();
    let data = [1u8; 8000];
    let mut i = 0u64;
    let err = loop {
        match j.append_write(FileId(3), i * 8000, &data) {
            Ok(tx) => j.done(tx),
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 1000, "a 192 KiB journal took {i} records of 8 KB");
    };
    assert!(matches!(err, super::JournalError::Full(_)), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    j.done(held);
    j.done(j.append_write(FileId(3), 0, &data).unwrap());
}
