//! Claim-by-claim unit tests, extent edge cases, the memory bound, ack cost and persistence.
//! The seeded comparison with a naive model is in model_tests.rs.

use std::time::{Duration, Instant};

use super::*;
use crate::limits::BLOCK_SIZE;
use crate::types::{FileId, Lsn};

const F: FileId = FileId(10);
const G: FileId = FileId(11);
const DIR: FileId = FileId(1);
const B: u64 = BLOCK_SIZE;

fn blocks(map: &SyncMap, file: FileId) -> Vec<(u64, u64)> {
    map.dirty_ranges(file).iter().map(|r| (r.first, r.last)).collect()
}

fn dirty(map: &SyncMap, file: FileId, range: std::ops::RangeInclusive<u64>) -> bool {
    range.into_iter().all(|b| map.is_block_dirty(file, b))
}

fn clean(map: &SyncMap, file: FileId, range: std::ops::RangeInclusive<u64>) -> bool {
    range.into_iter().all(|b| !map.is_block_dirty(file, b))
}

// ---- 000:1–2: marking ----

#[test]
fn a_journaled_write_sets_the_indicator_of_every_block_it_touches() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, B + 1, 2 * B); // bytes 4097..=12288: blocks 1..=3
    assert!(clean(&m, F, 0..=0));
    assert!(dirty(&m, F, 1..=3));
    assert!(clean(&m, F, 4..=9));
    assert!(clean(&m, G, 0..=9), "another file is untouched");
    assert_eq!(m.dirty_blocks(), 3);
}

#[test]
fn a_block_aligned_write_touches_only_its_blocks() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 2 * B, 2 * B);
    assert_eq!(blocks(&m, F), vec![(2, 3)]);
}

#[test]
fn a_write_of_no_bytes_touches_no_block() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 5 * B, 0);
    assert!(m.is_clean());
    assert_eq!(m.oldest_pending(), None);
}

#[test]
fn a_write_adds_its_update_id_to_the_pending_set_of_its_blocks() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(7), F, 0, B);
    assert_eq!(m.oldest_pending(), Some(Lsn(7)));
    assert_eq!(m.ack(Lsn(6)), 0, "an ack below the pending id clears nothing");
    assert!(dirty(&m, F, 0..=0));
    assert_eq!(m.ack(Lsn(7)), 1);
    assert!(m.is_clean());
}

#[test]
fn attribute_and_entry_changes_set_their_indicators() {
    let mut m = SyncMap::new();
    m.mark_attr(Lsn(3), F);
    m.mark_entries(Lsn(4), DIR);
    assert!(m.is_attr_dirty(F) && !m.is_entries_dirty(F));
    assert!(m.is_entries_dirty(DIR) && !m.is_attr_dirty(DIR));
    assert!(clean(&m, F, 0..=3), "a flag marks no block");
    assert_eq!(m.oldest_pending(), Some(Lsn(3)));
    m.ack(Lsn(3));
    assert!(!m.is_attr_dirty(F) && m.is_entries_dirty(DIR));
    m.ack(Lsn(4));
    assert!(m.is_clean());
}

// ---- 000:4, 7–11: acks ----

#[test]
fn an_ack_of_the_last_pending_update_resets_the_indicator() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, B);
    m.mark_write(Lsn(2), F, 0, B);
    m.ack(Lsn(1));
    assert!(dirty(&m, F, 0..=0), "update 2 is still pending for block 0");
    m.ack(Lsn(2));
    assert!(clean(&m, F, 0..=0));
    assert!(m.is_clean());
}

#[test]
fn an_ack_resets_only_locations_whose_updates_are_all_acked() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, 4 * B); // blocks 0..=3 at 1
    m.mark_write(Lsn(2), F, B, B); // block 1 at 2
    m.mark_write(Lsn(3), G, 0, B);
    m.mark_attr(Lsn(4), F);
    assert_eq!(m.ack(Lsn(1)), 2, "blocks 0 and 2..=3 of F, as two extents");
    assert_eq!(blocks(&m, F), vec![(1, 1)]);
    assert!(m.is_block_dirty(G, 0) && m.is_attr_dirty(F));
    m.ack(Lsn(3));
    assert!(clean(&m, F, 0..=3) && !m.is_block_dirty(G, 0) && m.is_attr_dirty(F));
}

#[test]
fn acks_are_cumulative_and_never_go_back() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(5), F, 0, B);
    m.mark_write(Lsn(9), F, B, B);
    assert_eq!(m.ack(Lsn(10)), 2);
    assert_eq!(m.mode(), Mode::Ordered { acked_below: Lsn(11) });
    m.ack(Lsn(3));
    assert_eq!(m.mode(), Mode::Ordered { acked_below: Lsn(11) }, "a stale ack does not move the position back");
}

#[test]
fn a_mark_below_the_acked_position_waits_for_a_resync() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(5), F, 0, B);
    m.ack(Lsn(5));
    assert!(!m.needs_resync());
    m.mark_write(Lsn(4), F, B, B); // never shipped in order again
    assert!(m.is_block_dirty(F, 1));
    assert!(m.needs_resync());
    assert_eq!(m.oldest_pending(), None, "it pins no journal record");
    m.ack(Lsn(100));
    assert!(m.is_block_dirty(F, 1), "no ack clears it");
    let plan = m.resync_plan(Lsn(101));
    assert_eq!(plan.files[0].blocks, vec![BlockRange::new(1, 1)]);
    m.resync_done(plan.id).unwrap();
    assert!(m.is_clean() && !m.needs_resync());
}

// ---- 000:5: what the journal may free ----

#[test]
fn oldest_pending_is_the_lowest_update_still_awaited() {
    let mut m = SyncMap::new();
    assert_eq!(m.oldest_pending(), None);
    m.mark_write(Lsn(10), F, 0, B);
    m.mark_write(Lsn(11), G, 0, B);
    m.mark_write(Lsn(12), F, 0, B);
    assert_eq!(m.oldest_pending(), Some(Lsn(10)));
    m.ack(Lsn(10));
    assert_eq!(m.oldest_pending(), Some(Lsn(11)), "block F:0 waits for 12, G:0 for 11");
    m.ack(Lsn(11));
    assert_eq!(m.oldest_pending(), Some(Lsn(12)));
    m.ack(Lsn(12));
    assert_eq!(m.oldest_pending(), None);
}

#[test]
fn the_journal_may_free_below_the_minimum_over_targets() {
    let mut maps: SyncMaps<&str> = SyncMaps::new();
    maps.insert("near", SyncMap::new());
    maps.insert("far", SyncMap::new());
    for i in 1..=10 {
        maps.mark_write(Lsn(i), F, i * B, B);
    }
    maps.get_mut(&"near").unwrap().ack(Lsn(8));
    maps.get_mut(&"far").unwrap().ack(Lsn(3));
    assert_eq!(maps.get(&"near").unwrap().oldest_pending(), Some(Lsn(9)));
    assert_eq!(maps.min_pending(), Some(Lsn(4)));
    assert_eq!(maps.complete_upto(Lsn(11)), Lsn(4));
    assert_eq!(maps.complete_upto(Lsn(2)), Lsn(2), "never past what is not marked yet");
    maps.get_mut(&"far").unwrap().fall_back();
    assert_eq!(maps.min_pending(), Some(Lsn(9)), "a fallen-back target pins nothing: its map covers it");
    maps.get_mut(&"near").unwrap().ack(Lsn(10));
    assert_eq!(maps.min_pending(), None);
    assert_eq!(maps.complete_upto(Lsn(11)), Lsn(11));
    assert!(maps.get(&"far").unwrap().is_block_dirty(F, 10), "and still knows every block it lacks");
}

// ---- 000:12–13: fall-back and resync ----

#[test]
fn a_fallen_back_target_ignores_acks_and_keeps_every_mark() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, B);
    m.mark_attr(Lsn(2), F);
    m.fall_back();
    m.mark_write(Lsn(3), F, 4 * B, B);
    assert_eq!(m.ack(Lsn(100)), 0);
    assert!(dirty(&m, F, 0..=0) && dirty(&m, F, 4..=4) && m.is_attr_dirty(F));
    assert_eq!(m.oldest_pending(), None);
    assert!(m.needs_resync());
}

#[test]
fn a_sequential_write_during_an_outage_is_one_extent() {
    let mut m = SyncMap::new();
    m.fall_back();
    let chunk = 1 << 20; // 1 GiB in 1 MiB records, as the journal splits it
    for i in 0..1024 {
        m.mark_write(Lsn(i + 1), F, i * chunk, chunk);
    }
    assert_eq!(m.extent_count(), 1);
    assert_eq!(blocks(&m, F), vec![(0, (1 << 30) / B - 1)]);
}

#[test]
fn while_ordered_a_sequential_write_keeps_one_extent_per_unacked_update() {
    // Exact tracking: each record's blocks clear as soon as it is acked.
    let mut m = SyncMap::new();
    for i in 0..8 {
        m.mark_write(Lsn(i + 1), F, i * 4 * B, 4 * B);
    }
    assert_eq!(m.extent_count(), 8);
    m.ack(Lsn(5));
    assert_eq!(blocks(&m, F), vec![(20, 31)]);
}

#[test]
fn the_resync_plan_is_every_marked_location_coalesced() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, 2 * B);
    m.mark_write(Lsn(2), F, 2 * B, 2 * B); // adjacent, another update: two extents while ordered
    m.mark_write(Lsn(3), F, 10 * B, B);
    m.mark_attr(Lsn(4), G);
    m.mark_entries(Lsn(5), DIR);
    m.fall_back();
    let plan = m.resync_plan(Lsn(6));
    assert!(!plan.full);
    assert_eq!(plan.resume_from, Lsn(6));
    assert_eq!(
        plan.files,
        vec![
            FileResync { file: DIR, attr: false, entries: true, blocks: vec![] },
            FileResync {
                file: F,
                attr: false,
                entries: false,
                blocks: vec![BlockRange::new(0, 3), BlockRange::new(10, 10)]
            },
            FileResync { file: G, attr: true, entries: false, blocks: vec![] },
        ]
    );
    assert_eq!(plan.block_count(), 5);
    assert_eq!(m.oldest_pending(), Some(Lsn(6)), "the journal keeps what ordered shipping resumes from");
    m.resync_done(plan.id).unwrap();
    assert!(m.is_clean());
    assert_eq!(m.mode(), Mode::Ordered { acked_below: Lsn(6) }, "ordered shipping resumes");
}

#[test]
fn a_write_during_a_resync_keeps_its_block_dirty() {
    let mut m = SyncMap::new();
    m.fall_back();
    m.mark_write(Lsn(1), F, 0, 8 * B);
    m.mark_attr(Lsn(2), F);
    let plan = m.resync_plan(Lsn(3));
    // The shipper reads blocks 0..=7; meanwhile a write lands on block 5 and the attributes.
    m.mark_write(Lsn(3), F, 5 * B, B);
    m.mark_attr(Lsn(4), F);
    m.resync_done(plan.id).unwrap();
    assert_eq!(blocks(&m, F), vec![(5, 5)]);
    assert!(m.is_attr_dirty(F));
    assert!(!m.needs_resync(), "the racing write is shipped in order from the resume point");
    assert_eq!(m.oldest_pending(), Some(Lsn(3)));
    m.ack(Lsn(4));
    assert!(m.is_clean());
}

#[test]
fn a_write_during_a_resync_below_the_resume_point_needs_another_resync() {
    let mut m = SyncMap::new();
    m.fall_back();
    m.mark_write(Lsn(1), F, 0, B);
    let plan = m.resync_plan(Lsn(10));
    m.mark_write(Lsn(9), F, 0, B); // a caller that picked the resume point too high
    m.resync_done(plan.id).unwrap();
    assert!(m.is_block_dirty(F, 0));
    assert!(m.needs_resync());
    m.ack(Lsn(50));
    assert!(m.is_block_dirty(F, 0), "an ack can't clear what is not shipped in order");
}

#[test]
fn an_abandoned_resync_is_refused_and_its_locations_stay_marked() {
    let mut m = SyncMap::new();
    m.fall_back();
    m.mark_write(Lsn(1), F, 0, B);
    let first = m.resync_plan(Lsn(2));
    m.fall_back(); // the connection dropped mid-resync
    assert_eq!(m.resync_done(first.id), Err(ResyncError::StalePlan { given: first.id, outstanding: None }));
    assert!(m.is_block_dirty(F, 0));
    let second = m.resync_plan(Lsn(2));
    assert_ne!(first.id, second.id);
    assert_eq!(m.resync_done(first.id), Err(ResyncError::StalePlan { given: first.id, outstanding: Some(second.id) }));
    assert_eq!(m.outstanding_plan(), Some(second.id));
    m.resync_done(second.id).unwrap();
    assert!(m.is_clean());
}

#[test]
fn a_resync_plan_taken_while_ordered_covers_unacked_updates() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, B);
    m.mark_write(Lsn(2), F, 3 * B, B);
    m.ack(Lsn(1));
    let plan = m.resync_plan(Lsn(3));
    assert_eq!(plan.files[0].blocks, vec![BlockRange::new(3, 3)]);
    assert_eq!(m.ack(Lsn(2)), 0, "acks wait until the resync is done");
    m.resync_done(plan.id).unwrap();
    assert!(m.is_clean());
}

#[test]
fn a_new_target_with_data_owes_a_full_sync_that_survives_until_done() {
    let mut m = SyncMap::new_needing_full_sync();
    assert!(m.is_block_dirty(F, 123) && m.is_attr_dirty(G) && m.is_entries_dirty(DIR));
    assert!(m.needs_resync() && m.full_resync_owed());
    m.mark_write(Lsn(1), F, 0, B);
    let plan = m.resync_plan(Lsn(2));
    assert!(plan.full);
    assert!(m.is_block_dirty(F, 123), "owed until the plan is done");
    m.require_full_resync(); // e.g. the operator asks again while it runs: a newer one is owed
    m.resync_done(plan.id).unwrap();
    assert!(m.full_resync_owed());
    let plan = m.resync_plan(Lsn(2));
    m.resync_done(plan.id).unwrap();
    assert!(m.is_clean() && !m.needs_resync());
}

// ---- extent sets: merging and splitting ----

#[test]
fn overlapping_marks_with_one_update_id_merge() {
    let mut m = SyncMap::new();
    m.fall_back(); // one tag for everything
    m.mark_blocks(Lsn(1), F, BlockRange::new(10, 20));
    m.mark_blocks(Lsn(2), F, BlockRange::new(15, 30));
    m.mark_blocks(Lsn(3), F, BlockRange::new(5, 12));
    m.mark_blocks(Lsn(4), F, BlockRange::new(40, 50));
    m.mark_blocks(Lsn(5), F, BlockRange::new(31, 39)); // bridges exactly
    assert_eq!(blocks(&m, F), vec![(5, 50)]);
    assert_eq!(m.extent_count(), 1);
    assert_eq!(m.dirty_blocks(), 46);
}

#[test]
fn adjacent_marks_merge_and_a_gap_of_one_block_does_not() {
    let mut m = SyncMap::new();
    m.fall_back();
    m.mark_blocks(Lsn(1), F, BlockRange::new(0, 9));
    m.mark_blocks(Lsn(1), F, BlockRange::new(10, 19));
    m.mark_blocks(Lsn(1), F, BlockRange::new(21, 29));
    assert_eq!(blocks(&m, F), vec![(0, 19), (21, 29)]);
    assert_eq!(m.extent_count(), 2);
}

#[test]
fn a_mark_inside_an_extent_splits_it_by_pending_update() {
    let mut m = SyncMap::new();
    m.mark_blocks(Lsn(1), F, BlockRange::new(0, 99));
    m.mark_blocks(Lsn(2), F, BlockRange::new(40, 59));
    assert_eq!(m.extent_count(), 3, "0..=39 at 1, 40..=59 at 2, 60..=99 at 1");
    assert_eq!(blocks(&m, F), vec![(0, 99)], "coalesced for the outside world");
    m.ack(Lsn(1));
    assert_eq!(blocks(&m, F), vec![(40, 59)]);
}

#[test]
fn a_mark_spanning_many_extents_keeps_the_highest_update_of_each_block() {
    let mut m = SyncMap::new();
    m.mark_blocks(Lsn(5), F, BlockRange::new(0, 0));
    m.mark_blocks(Lsn(9), F, BlockRange::new(2, 2));
    m.mark_blocks(Lsn(5), F, BlockRange::new(4, 4));
    m.mark_blocks(Lsn(7), F, BlockRange::new(0, 4)); // out of LSN order, still unacked
    m.ack(Lsn(7));
    assert_eq!(blocks(&m, F), vec![(2, 2)], "block 2 still waits for 9");
    m.ack(Lsn(9));
    assert!(m.is_clean());
}

#[test]
fn extents_reach_the_last_block_index() {
    let mut m = SyncMap::new();
    m.mark_blocks(Lsn(1), F, BlockRange::new(u64::MAX - 1, u64::MAX));
    m.mark_blocks(Lsn(1), F, BlockRange::new(u64::MAX, u64::MAX));
    m.mark_blocks(Lsn(1), F, BlockRange::new(u64::MAX - 5, u64::MAX - 2));
    assert_eq!(blocks(&m, F), vec![(u64::MAX - 5, u64::MAX)]);
    m.mark_blocks(Lsn(2), F, BlockRange::new(0, u64::MAX));
    assert_eq!(blocks(&m, F), vec![(0, u64::MAX)]);
    assert_eq!(m.dirty_blocks(), u64::MAX, "2^64 blocks, saturated");
    m.ack(Lsn(2));
    assert!(m.is_clean());
    m.mark_blocks(Lsn(3), F, BlockRange::new(0, 0));
    m.mark_blocks(Lsn(3), F, BlockRange::new(1, u64::MAX));
    assert_eq!(m.extent_count(), 1);
}

#[test]
fn byte_ranges_at_the_end_of_the_offset_space_are_cut_not_wrapped() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, u64::MAX - 10, u64::MAX);
    let last = u64::MAX / B;
    assert_eq!(blocks(&m, F), vec![(last, last)]);
    assert_eq!(BlockRange::of_bytes(u64::MAX, 1), Some(BlockRange::new(last, last)));
    assert_eq!(BlockRange::of_bytes(0, u64::MAX), Some(BlockRange::new(0, last)));
    assert_eq!(BlockRange::new(last, last).byte_offset(), last * B);
    assert_eq!(BlockRange::new(0, u64::MAX).byte_len(), u64::MAX);
}

// ---- the memory bound ----

#[test]
fn past_the_extent_bound_extents_merge_and_no_marked_block_is_lost() {
    let limits = Limits::new(16, 4);
    let mut m = SyncMap::new().with_limits(limits);
    let mut marked = vec![];
    for i in 0..200u64 {
        let (file, block) = (FileId(2 + i % 3), (i * 7919) % 1000);
        m.mark_blocks(Lsn(i + 1), file, BlockRange::new(block, block));
        marked.push((file, block));
        assert!(m.extent_count() <= 16, "{} extents after mark {i}", m.extent_count());
        assert!(marked.iter().all(|&(f, b)| m.is_block_dirty(f, b)), "a marked block was dropped at mark {i}");
    }
    assert!(m.stats().coarsenings > 0);
    assert!(!m.full_resync_owed(), "three files fit the file bound");
    m.ack(Lsn(200));
    assert!(m.is_clean(), "coarser, but still cleared by the ack of its highest update");
}

#[test]
fn past_the_extent_bound_the_closest_extents_merge_first_down_to_three_quarters() {
    let mut m = SyncMap::new().with_limits(Limits::new(16, 4));
    m.fall_back();
    // 17 single blocks: the gaps after the 3rd, 6th, 9th, 12th and 15th are one block wide,
    // the others 100.
    let mut block = 0;
    let mut starts = vec![];
    for i in 0..17 {
        starts.push(block);
        m.mark_blocks(Lsn(1), F, BlockRange::new(block, block));
        block += if i % 3 == 2 { 2 } else { 101 };
    }
    assert_eq!(m.extent_count(), 12, "back to ¾ of the bound, no further");
    assert_eq!(m.dirty_blocks(), 17 + 5, "the five one-block gaps were the ones filled");
    assert!(starts.iter().all(|&b| m.is_block_dirty(F, b)));
    assert_eq!(m.stats().coarsenings, 1);
}

#[test]
fn past_the_file_bound_the_map_owes_a_full_resync() {
    let mut m = SyncMap::new().with_limits(Limits::new(8, 4));
    for f in 0..4 {
        m.mark_write(Lsn(f + 1), FileId(100 + f), 0, B);
    }
    assert!(!m.full_resync_owed());
    m.mark_write(Lsn(5), FileId(200), 0, B);
    assert!(m.full_resync_owed());
    assert_eq!(m.mode(), Mode::FallenBack, "ordered tracking stopped with the files it forgot");
    assert!(m.is_block_dirty(FileId(100), 0) && m.is_block_dirty(FileId(200), 0));
    assert!(m.file_count() <= 4 && m.stats().file_overflows == 1);
    let plan = m.resync_plan(Lsn(6));
    assert!(plan.full);
    m.resync_done(plan.id).unwrap();
    assert!(m.is_clean());
}

#[test]
fn lowering_the_limits_coarsens_at_once() {
    let mut m = SyncMap::new();
    for i in 0..100 {
        m.mark_blocks(Lsn(1), F, BlockRange::new(i * 3, i * 3));
    }
    m.set_limits(Limits::new(10, 2));
    assert!(m.extent_count() <= 10);
    assert!((0..100).all(|i| m.is_block_dirty(F, i * 3)));
}

#[test]
#[should_panic(expected = "too large")]
fn limits_with_too_many_files_for_the_extents_are_refused() {
    Limits::new(8, 5);
}

// ---- ack cost ----

#[test]
fn a_million_marks_then_acks_in_order_run_fast() {
    let n = 1_000_000u64;
    let start = Instant::now();
    let mut m = SyncMap::new();
    for i in 0..n {
        m.mark_write(Lsn(i + 1), F, i * B, B);
    }
    assert_eq!(m.extent_count(), n as usize);
    for i in 0..n {
        assert_eq!(m.ack(Lsn(i + 1)), 1, "each ack clears exactly its own extent");
    }
    assert!(m.is_clean());
    let elapsed = start.elapsed();
    // O(log n) per mark and per ack: about 0.6 s here in release; O(n) per ack would take hours.
    assert!(elapsed < Duration::from_secs(30), "1e6 marks and acks took {elapsed:?}");
}

#[test]
fn an_ack_that_clears_nothing_costs_nothing_per_extent() {
    let mut m = SyncMap::new();
    for i in 0..200_000u64 {
        m.mark_write(Lsn(1_000_000 + i), F, 2 * i * B, B);
    }
    let start = Instant::now();
    for i in 0..200_000u64 {
        assert_eq!(m.ack(Lsn(i)), 0);
    }
    assert!(start.elapsed() < Duration::from_secs(5), "200,000 empty acks took {:?}", start.elapsed());
}

// ---- persistence ----

/// A map in resyncing mode with every kind of entry: flags, ordered and unordered tags,
/// several generations, a full resync owed.
fn varied_map() -> SyncMap {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(1), F, 0, 4 * B);
    m.mark_attr(Lsn(2), F);
    m.fall_back();
    m.mark_entries(Lsn(3), DIR);
    m.require_full_resync();
    let _ = m.resync_plan(Lsn(4));
    m.mark_write(Lsn(5), F, 2 * B, 4 * B);
    m.mark_write(Lsn(3), G, 9 * B, B); // below the resume point: unordered, new generation
    m.mark_attr(Lsn(6), G);
    m
}

#[test]
fn an_encoded_map_decodes_to_the_same_map() {
    let mut ordered = SyncMap::new();
    ordered.mark_write(Lsn(5), F, 0, 3 * B);
    ordered.mark_write(Lsn(6), F, B, B);
    ordered.mark_entries(Lsn(7), DIR);
    ordered.ack(Lsn(5));
    let mut fallen = ordered.clone();
    fallen.fall_back();
    let maps = [SyncMap::new(), SyncMap::new_needing_full_sync(), ordered, fallen, varied_map()];
    for m in maps {
        let bytes = m.encode();
        let back = SyncMap::decode(&bytes).unwrap();
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.mode(), m.mode());
        assert_eq!(back.oldest_pending(), m.oldest_pending());
        assert_eq!(back.needs_resync(), m.needs_resync());
        assert_eq!((back.extent_count(), back.dirty_blocks()), (m.extent_count(), m.dirty_blocks()));
        for file in [DIR, F, G] {
            assert_eq!(back.dirty_ranges(file), m.dirty_ranges(file));
            assert_eq!(back.is_attr_dirty(file), m.is_attr_dirty(file));
            assert_eq!(back.is_entries_dirty(file), m.is_entries_dirty(file));
        }
    }
}

#[test]
fn a_decoded_map_goes_on_as_the_original_would() {
    let m = varied_map();
    let mut a = m.clone();
    let mut b = SyncMap::decode(&m.encode()).unwrap();
    for map in [&mut a, &mut b] {
        let id = map.outstanding_plan().unwrap();
        map.resync_done(id).unwrap();
        map.ack(Lsn(5));
    }
    assert_eq!(a.encode(), b.encode());
    assert!(a.is_attr_dirty(G) && a.is_block_dirty(G, 9) && a.needs_resync());
}

/// Pinned bytes of a small map: a change to the format shows up here first.
#[test]
fn the_encoding_of_a_small_map_is_pinned() {
    let mut m = SyncMap::new();
    m.mark_write(Lsn(7), FileId(2), 0, 2 * B);
    m.mark_attr(Lsn(8), FileId(2));
    let bytes = m.encode();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let expected = concat!(
        "465259534d415031",
        "0100",
        "00",
        "00",
        "00000000",
        "a400000000000000", // magic..total 164
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000000000000000", // lsn plan gen full
        "01000000",
        "01000000", // 1 file, 1 extent
        "0200000000000000",
        "01",
        "000000",
        "01000000", // file 2, attr, 1 extent
        "0000000000000000",
        "01",
        "00000000000000",
        "0800000000000000",
        "0800000000000000", // attr tag
        "0000000000000000",
        "0100000000000000", // blocks 0..=1
        "0000000000000000",
        "01",
        "00000000000000",
        "0700000000000000",
        "0700000000000000", // tag
    );
    assert_eq!(&hex[..hex.len() - 8], expected);
    assert_eq!(bytes.len(), 164);
    assert_eq!(u32::from_le_bytes(bytes[160..].try_into().unwrap()), PINNED_CRC);
}

const PINNED_CRC: u32 = 0x5d8ca8ff;

#[test]
fn every_single_bit_flip_is_refused() {
    let bytes = varied_map().encode();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            let err = SyncMap::decode(&bad).err();
            assert!(err.is_some(), "flipping bit {bit} of byte {i} was accepted");
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = varied_map().encode();
    for len in 0..bytes.len() {
        let err = SyncMap::decode(&bytes[..len]).unwrap_err();
        if len >= 8 {
            assert!(matches!(err, SyncMapDecodeError::Truncated { have, .. } if have == len), "{len}: {err}");
        }
    }
}

#[test]
fn decode_errors_say_what_is_wrong() {
    let good = varied_map().encode();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(SyncMap::decode(&bad), Err(SyncMapDecodeError::BadMagic { .. })));
    let mut newer = good.clone();
    newer[8..10].copy_from_slice(&2u16.to_le_bytes());
    let err = SyncMap::decode(&newer).unwrap_err();
    assert_eq!(err, SyncMapDecodeError::NewerVersion(2));
    assert!(err.to_string().contains("use a newer ferryfs"), "{err}");
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(SyncMap::decode(&longer), Err(SyncMapDecodeError::TrailingBytes { .. })));
    let mut flipped = good.clone();
    flipped[70] ^= 1;
    let err = SyncMap::decode(&flipped).unwrap_err();
    assert!(matches!(err, SyncMapDecodeError::CrcMismatch { .. }));
    assert!(err.to_string().contains("resync the target in full"), "{err}");
}

/// Bytes with a valid crc but impossible contents (what a buggy writer could produce).
#[test]
fn well_framed_but_impossible_maps_are_refused() {
    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    }
    let mut m = SyncMap::new();
    m.mark_blocks(Lsn(7), F, BlockRange::new(10, 20));
    m.mark_blocks(Lsn(8), F, BlockRange::new(30, 40));
    let good = m.encode();
    let first_extent = 64 + 16;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("unknown mode", Box::new(|b| b[10] = 3)),
        ("unknown header flag", Box::new(|b| b[11] = 2)),
        ("file id 0", Box::new(|b| b[64..72].fill(0))),
        ("extent ending before it starts", Box::new(move |b| b[first_extent..first_extent + 8].fill(0xff))),
        (
            "extents not ascending",
            Box::new(move |b| b[first_extent + 48..first_extent + 56].copy_from_slice(&15u64.to_le_bytes())),
        ),
        ("unknown tag kind", Box::new(move |b| b[first_extent + 24] = 2)),
        ("extent count", Box::new(|b| b[60] = 3)),
        ("ordered tag while fallen back", Box::new(|b| b[10] = 1)),
    ];
    for (what, edit) in cases {
        let mut b = good.clone();
        edit(&mut b);
        let err = SyncMap::decode(&reseal(b)).unwrap_err();
        assert!(matches!(err, SyncMapDecodeError::Corrupt { .. }), "{what}: {err}");
    }
}
