//! The memory bound: past `extents_max` extents, merge neighbouring extents coarser; past
//! `files_max` files, owe a full resync. Neither ever drops a marked location.

use std::collections::BinaryHeap;

use super::extents::Change;
use super::map::{Mode, SyncMap};

impl SyncMap {
    /// Brings the extent count back to ¾ of the bound once it passes the bound, so the O(files)
    /// setup of a round is paid once per ¼ of the bound in new extents (a mark adds at most two).
    /// Each step halves the file with the most extents by joining across its smallest gaps, so
    /// the blocks added are the fewest a step could add for that file.
    pub(super) fn keep_extent_bound(&mut self) {
        if self.extent_count() <= self.limits.extents_max() {
            return;
        }
        let target = self.limits.extents_max() - self.limits.extents_max() / 4;
        let mut heap: BinaryHeap<(usize, crate::types::FileId)> =
            self.files.iter().filter(|(_, m)| m.extents >= 2).map(|(&f, m)| (m.extents, f)).collect();
        while self.extent_count() > target {
            // Files ≤ files_max ≤ extents_max / 2 ≤ target (Limits::new), so while we are above
            // the target some file still has two extents to join.
            let (len, file) = heap.pop().expect("above the target, some file has two extents");
            let merges = (len / 2).min(self.extent_count() - target);
            let mut change = Change::default();
            self.pieces.coarsen(file, merges, &mut change);
            self.apply(file, change);
            let left = self.files[&file].extents;
            self.stats.coarsenings += 1;
            if left >= 2 {
                heap.push((left, file));
            }
        }
        assert!(self.extent_count() <= self.limits.extents_max());
    }

    /// Past the file bound: replace every file's marks by "resync everything", which covers
    /// them all. Ordered tracking can't continue without them, so an ordered map falls back; a
    /// resyncing one keeps its plan, and the full resync owed (newer than the plan) survives it.
    pub(super) fn overflow_files(&mut self) {
        self.full_gen = Some(self.generation);
        self.files.clear();
        self.pieces.clear();
        if let Mode::Ordered { .. } = self.mode {
            self.mode = Mode::FallenBack;
        }
        self.stats.file_overflows += 1;
        self.reindex();
    }
}
