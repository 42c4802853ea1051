//! Unit tests of the target core: resync staging and its read end, the watermark's hold on
//! the log, and where a session starts.

use std::fs;

use super::target::{MIXED_FILE, PENDING_FILE, StagedItem, TargetCore};
use crate::format::record;
use crate::format::superblock::Superblock;
use crate::journal::{Journal, JournalGeometry, Settled};
use crate::proto::wire::control::ControlMsg;
use crate::sim::storage::SimStorage;
use crate::sim::tree::SimTree;
use crate::types::{FileId, Lsn};

#[test]
fn a_resync_begun_again_after_a_cut_off_one_stages_only_its_own_items() {
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 64 << 10, segment_count: 4 };
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    // Plan 1 is cut off with one item written through to the file and one still buffered.
    t.resync_begin(1, 1).unwrap();
    t.resync_item(&StagedItem::Data { file: 100, offset: 0, data: vec![1; 3 << 20] }).unwrap();
    t.resync_item(&StagedItem::Data { file: 100, offset: 0, data: vec![2; 100] }).unwrap();
    t.resync_begin(2, 1).unwrap();
    t.resync_end(2).expect("the staging holds plan 2's items only (none), nothing of plan 1");
    assert!(!state.path().join(PENDING_FILE).exists());
}

/// A primary's journal holding `n` write records (LSN 1..=n) and those records' bytes.
fn primary_records(n: usize) -> Vec<u8> {
    primary_records_of(n, 512)
}

/// `n` write records of `bytes` bytes each.
fn primary_records_of(n: usize, bytes: usize) -> Vec<u8> {
    let sb = Superblock::new([7; 16], 0, 0, Vec::new(), [0; 16]);
    let g = JournalGeometry { segment_size: 4 << 20, segment_count: 4 };
    let j = Journal::create(SimStorage::new(), g, sb).unwrap();
    for i in 0..n {
        let tx = j.append_write(FileId(100), (i * bytes) as u64, &vec![i as u8; bytes]).unwrap();
        j.done(tx);
    }
    let mut cur = j.cursor_at(Lsn(1)).unwrap();
    let mut out = Vec::new();
    j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
    out
}

#[test]
fn a_resync_read_end_marks_the_directory_mixed_until_the_log_holds_it() {
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let storage = SimStorage::new();
    let t = TargetCore::create(storage.clone(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    assert_eq!(t.mixed_until(), 0);
    t.resync_begin(1, 1).unwrap();
    // A read end before the resume point is nonsense: refused, the staging goes on.
    assert!(t.resync_read(1, 0).is_err());
    assert!(t.resync_read(2, 6).is_err(), "another plan's read end");
    t.resync_read(1, 6).unwrap();
    t.resync_end(1).unwrap();
    assert_eq!(t.mixed_until(), 6);
    assert_eq!(fs::read_to_string(state.path().join(MIXED_FILE)).unwrap(), "6\n");
    // Durable across a restart.
    drop(t);
    let t = TargetCore::open(storage.clone(), SimTree::new(), state.path()).unwrap();
    assert_eq!(t.mixed_until(), 6);
    // The log holds records 1..=4: still mixed; a checkpoint keeps the file.
    let records = primary_records(5);
    let four = {
        let mut at = 0;
        for _ in 0..4 {
            let h = record::decode_header(&records[at..], records.len() - at).unwrap();
            at += record::record_len(h.payload_len as usize);
        }
        at
    };
    t.receive(&records[..four]).unwrap();
    t.checkpoint().unwrap();
    assert_eq!(t.mixed_until(), 6);
    assert!(state.path().join(MIXED_FILE).exists());
    // Record 5 arrives: every record below 6 is held; the file goes at the checkpoint.
    t.receive(&records[four..]).unwrap();
    assert_eq!(t.mixed_until(), 0);
    t.checkpoint().unwrap();
    assert!(!state.path().join(MIXED_FILE).exists());
}

#[test]
fn a_damaged_mixed_until_record_stops_the_target_naming_the_file() {
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let storage = SimStorage::new();
    drop(TargetCore::create(storage.clone(), g, [7; 16], SimTree::new(), state.path()).unwrap());
    fs::write(state.path().join(MIXED_FILE), b"twelve\n").unwrap();
    let err = TargetCore::open(storage, SimTree::new(), state.path()).err().expect("refused");
    assert!(err.to_string().contains(MIXED_FILE), "{err}");
}

#[test]
fn a_resync_without_a_read_end_clears_an_old_one() {
    // A 1.1 primary sends no ResyncRead: nothing is known, and an old record would lie.
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    t.resync_begin(1, 1).unwrap();
    t.resync_read(1, 9).unwrap();
    t.resync_end(1).unwrap();
    assert_eq!(t.mixed_until(), 9);
    t.resync_begin(2, 1).unwrap();
    t.resync_end(2).unwrap();
    assert_eq!(t.mixed_until(), 0);
    assert!(!state.path().join(MIXED_FILE).exists());
}

#[test]
fn the_log_keeps_what_the_watermark_has_not_passed() {
    // 40 records of 8 KiB in 64 KiB segments: about 7 per segment. The log frees whole
    // segments, so the start moves to the segment holding the first record kept.
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 64 << 10, segment_count: 16 };
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    t.receive(&primary_records_of(40, 8 << 10)).unwrap();
    t.settled(Settled { settled_below: Lsn(41), records_below: Lsn(41) });
    t.apply_available().unwrap();
    assert_eq!(t.position().applied_next, 41);
    // Applied, but no watermark yet: every record stays (a peer may need them).
    t.checkpoint().unwrap();
    assert_eq!(t.journal().superblock().start_lsn, Lsn(1));
    // Every target holds records up to 20: the start-of-log pointer moves up to the
    // segment holding record 21, and no further.
    t.watermark(20);
    t.checkpoint().unwrap();
    let start = t.journal().superblock().start_lsn;
    assert!(start > Lsn(1) && start <= Lsn(21), "start {start:?}");
    // A lower watermark (a late frame) never moves it back.
    t.watermark(5);
    assert_eq!(t.watermark_hold().keep_from, 21);
    // A primary without watermarks: what is applied goes.
    t.follow_applied();
    t.checkpoint().unwrap();
    assert!(t.journal().superblock().start_lsn > Lsn(21), "{:?}", t.journal().superblock().start_lsn);
}

#[test]
fn a_session_starts_with_every_appended_record_durable() {
    // A frame cut off after its records were appended, before the flush (a full log): the
    // durable end must not lag the log's end when the next session begins, or the
    // primary resends from there and the log refuses it as out of order, for ever.
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    t.journal().append_raw(&primary_records(3)).unwrap();
    assert_eq!(t.position().next_lsn, 4);
    assert!(t.position().durable_next < 4, "the test needs records appended and not yet durable");
    match t.status_msg() {
        ControlMsg::Status { next_lsn, durable_lsn, .. } => assert_eq!((next_lsn, durable_lsn), (4, 3)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_catch_up_applies_only_a_log_that_ends_where_it_says_and_serves_only_what_it_holds() {
    let state = tempfile::tempdir().unwrap();
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    t.receive(&primary_records(5)).unwrap();
    // ApplyLog{end} is refused unless the log ends exactly there; nothing is applied.
    assert!(t.apply_log(Lsn(9)).is_err());
    assert!(t.apply_log(Lsn(3)).is_err());
    assert_eq!(t.position().applied_next, 1);
    t.apply_log(Lsn(6)).unwrap();
    assert_eq!(t.position().applied_next, 6);
    // ReadLog: records from an LSN to the end; nothing past it; a freed start is refused.
    let mut out = Vec::new();
    assert_eq!(t.read_log(Lsn(3), 1 << 20, &mut out).unwrap(), Lsn(6));
    assert_eq!(crate::proto::wire::split_records(&out).count(), 3);
    out.clear();
    assert_eq!(t.read_log(Lsn(6), 1 << 20, &mut out).unwrap(), Lsn(6));
    assert!(out.is_empty());
    t.follow_applied();
    t.journal().restart_at(Lsn(6), FileId(100)).unwrap();
    assert!(t.read_log(Lsn(3), 1 << 20, &mut out).unwrap_err().to_string().contains("no longer holds record 3"));
}

/// A primary's records: file 100 created, then `n` writes of 8 KiB (write i holds byte i at
/// offset i × 8 KiB), write `aborted` failing (its abort comes 5 writes later). Returns the
/// records and the aborted write's transaction id.
fn records_with_an_abort(n: usize, aborted: usize) -> (Vec<u8>, u64) {
    use crate::format::ops::{NodeKind, Op};
    let sb = Superblock::new([7; 16], 0, 0, Vec::new(), [0; 16]);
    let g = JournalGeometry { segment_size: 4 << 20, segment_count: 4 };
    let j = Journal::create(SimStorage::new(), g, sb).unwrap();
    let create = Op::Create {
        parent: FileId::ROOT,
        name: b"f".to_vec(),
        new_id: FileId(100),
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    };
    let tx = j.append_op(&create).unwrap();
    j.commit(tx).unwrap();
    j.done(tx);
    let mut failed = None;
    for i in 0..n {
        let tx = j.append_write(FileId(100), (i * 8192) as u64, &[i as u8; 8192]).unwrap();
        if i == aborted {
            failed = Some(tx);
        } else {
            j.done(tx);
        }
        if i == aborted + 5 {
            let f = failed.unwrap();
            j.abort(f, libc::EIO).unwrap();
            j.done(f);
        }
    }
    let mut cur = j.cursor_at(Lsn(1)).unwrap();
    let mut out = Vec::new();
    j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
    (out, failed.unwrap().0)
}

/// Splits whole records into blocks of about `size` bytes.
fn blocks_of(records: &[u8], size: usize) -> Vec<&[u8]> {
    let (mut out, mut start, mut at) = (Vec::new(), 0, 0);
    while at < records.len() {
        let h = record::decode_header(&records[at..], records.len() - at).unwrap();
        at += record::record_len(h.payload_len as usize);
        if at - start >= size || at == records.len() {
            out.push(&records[start..at]);
            start = at;
        }
    }
    out
}

/// A failover or catch-up into a log too small for everything moved (a restarted target's log
/// full of records it had not applied): refused as "full" without the tool's aborts; with them
/// the target applies as it goes, takes every block, and ends with exactly the journal's
/// effect (the aborted write left out).
#[test]
fn a_small_log_takes_a_failover_larger_than_itself_once_the_tool_told_every_abort() {
    let (records, aborted_tx) = records_with_an_abort(60, 10);
    assert!(records.len() > 256 << 10, "more than the target's log holds");
    let blocks = blocks_of(&records, 32 << 10);
    let end = Lsn(1 + blocks.iter().map(|b| crate::proto::wire::split_records(b).count() as u64).sum::<u64>());
    let g = JournalGeometry { segment_size: 64 << 10, segment_count: 4 };
    let land = |t: &TargetCore<SimStorage, SimTree>| -> Result<(), String> {
        for b in &blocks {
            t.stage_failover_block(b).map_err(|e| e.to_string())?;
            t.sync_log().map_err(|e| e.to_string())?;
        }
        Ok(())
    };

    let state = tempfile::tempdir().unwrap();
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], SimTree::new(), state.path()).unwrap();
    t.journal().set_full_wait(std::time::Duration::from_millis(1));
    let err = land(&t).expect_err("nothing may be applied without the outcomes: the log fills");
    assert!(err.contains("full"), "{err}");

    let state = tempfile::tempdir().unwrap();
    let tree = SimTree::new();
    let t = TargetCore::create(SimStorage::new(), g, [7; 16], tree.clone(), state.path()).unwrap();
    t.journal().set_full_wait(std::time::Duration::from_millis(1));
    t.known_outcomes(end, &[aborted_tx], true);
    land(&t).unwrap();
    t.apply_log(end).unwrap();
    let mut want = vec![0u8; 60 * 8192];
    for i in (0..60).filter(|i| *i != 10) {
        want[i * 8192..(i + 1) * 8192].fill(i as u8);
    }
    let listing = tree.listing();
    assert!(listing["/f"].1 == want, "the file holds the journal's writes but the aborted one");
}
