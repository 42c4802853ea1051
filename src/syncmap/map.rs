//! `SyncMap`: one target's marks, its mode, and the indexes that make an ack touch only what
//! it clears.

use std::collections::{BTreeMap, BTreeSet};

use super::extents::{BlockRange, Change, Extents, Pending, Piece, Tag};
use super::{EXTENTS_MAX, FILES_MAX};
use crate::types::{FileId, Lsn};

/// How a target is being kept up to date, as far as its sync map is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Updates are shipped in LSN order and acked cumulatively; every update below
    /// `acked_below` is durable at the target.
    Ordered { acked_below: Lsn },
    /// Ordered shipping was abandoned (outage, journal overflow): marks only set indicators,
    /// acks are ignored, and the target waits for a resync.
    FallenBack,
    /// The resync plan `plan` is being sent; after it, ordered shipping resumes at
    /// `resume_from`, which the journal must keep.
    Resyncing { plan: PlanId, resume_from: Lsn },
}

/// Identifies one resync plan: the map's generation when the plan was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlanId(pub u64);

/// The memory bound a map keeps. Construct with [`Limits::new`], which checks the relation the
/// coarsening relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    extents_max: usize,
    files_max: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits { extents_max: EXTENTS_MAX, files_max: FILES_MAX };

    /// Panics unless `files_max * 2 <= extents_max` and `extents_max >= 4`: with at most half as
    /// many files as extents, merging within files can always get back under the bound.
    pub fn new(extents_max: usize, files_max: usize) -> Limits {
        assert!(extents_max >= 4, "extents_max {extents_max} below 4");
        assert!(files_max >= 1 && files_max.saturating_mul(2) <= extents_max, "files_max {files_max} too large");
        Limits { extents_max, files_max }
    }

    pub fn extents_max(&self) -> usize {
        self.extents_max
    }

    pub fn files_max(&self) -> usize {
        self.files_max
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// What changed for one file besides its blocks (those are in `SyncMap::pieces`).
#[derive(Clone, Debug, Default)]
pub(super) struct FileMarks {
    pub attr: Option<Tag>,
    pub entries: Option<Tag>,
    /// How many pieces of `SyncMap::pieces` belong to this file.
    pub extents: usize,
}

impl FileMarks {
    fn is_empty(&self) -> bool {
        self.extents == 0 && self.attr.is_none() && self.entries.is_none()
    }
}

/// Where in a file a tag lives; part of the ack index key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Attr,
    Entries,
    Blocks(u64),
}

/// Counters for status and tests; not persisted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncMapStats {
    /// Times extents of a file were merged coarser to keep the extent bound.
    pub coarsenings: u64,
    /// Times the file bound was hit and the map fell back to a full resync.
    pub file_overflows: u64,
}

/// One target's sync map. See the module docs for the claims it implements.
#[derive(Clone, Debug)]
pub struct SyncMap {
    /// Every file with a mark (flags, or pieces in `pieces`).
    pub(super) files: BTreeMap<FileId, FileMarks>,
    pub(super) pieces: Extents,
    pub(super) mode: Mode,
    /// The id the next resync plan takes.
    pub(super) generation: u64,
    /// Set when every location must be resynchronized (initial sync, file bound): the
    /// generation it was set in, cleared by the plan that covers it.
    pub(super) full_gen: Option<u64>,
    pub(super) limits: Limits,
    // Derived from `files` and `pieces` (rebuilt by `reindex`), never persisted:
    /// (highest pending LSN, file, slot) of every ordered tag: an ack pops from the front.
    by_max: BTreeSet<(Lsn, FileId, Slot)>,
    /// Multiset of the ordered tags' lowest pending LSNs, for `oldest_pending`.
    mins: BTreeMap<Lsn, usize>,
    /// Tags only a resync can clear.
    unordered: usize,
    /// Marked blocks (u128: one extent can hold 2^64).
    blocks: u128,
    pub(super) stats: SyncMapStats,
}

impl Default for SyncMap {
    fn default() -> Self {
        SyncMap::new()
    }
}

impl SyncMap {
    /// An empty, ordered map with nothing acked yet (a target that starts with the journal).
    pub fn new() -> SyncMap {
        SyncMap::new_in_sync(Lsn(0))
    }

    /// An empty map of a target that holds every update below `next` (e.g. after a restart
    /// with a clean map, or a target attached to an empty backing directory at LSN `next`).
    pub fn new_in_sync(next: Lsn) -> SyncMap {
        SyncMap::with_mode(Mode::Ordered { acked_below: next }, None)
    }

    /// The map of a target attached to a backing directory that already holds data: fallen
    /// back, owing a full resync (the initial sync), while writes are marked as usual.
    pub fn new_needing_full_sync() -> SyncMap {
        SyncMap::with_mode(Mode::FallenBack, Some(0))
    }

    pub(super) fn with_mode(mode: Mode, full_gen: Option<u64>) -> SyncMap {
        SyncMap {
            files: BTreeMap::new(),
            pieces: Extents::default(),
            mode,
            generation: 0,
            full_gen,
            limits: Limits::DEFAULT,
            by_max: BTreeSet::new(),
            mins: BTreeMap::new(),
            unordered: 0,
            blocks: 0,
            stats: SyncMapStats::default(),
        }
    }

    /// Replaces the memory bound, coarsening (or overflowing into a full resync) at once if the
    /// map is past the new one.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        if self.files.len() > limits.files_max {
            self.overflow_files();
        }
        self.keep_extent_bound();
    }

    pub fn with_limits(mut self, limits: Limits) -> SyncMap {
        self.set_limits(limits);
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// 000:1–2: a journaled write of `len` bytes at `offset` of `file`, update id `lsn`, sets
    /// the unsynchronized indicator of every block it touches and adds `lsn` to their pending
    /// updates. A write of no bytes touches no block.
    pub fn mark_write(&mut self, lsn: Lsn, file: FileId, offset: u64, len: u64) {
        if let Some(range) = BlockRange::of_bytes(offset, len) {
            self.mark_blocks(lsn, file, range);
        }
    }

    /// [`SyncMap::mark_write`] in blocks.
    pub fn mark_blocks(&mut self, lsn: Lsn, file: FileId, range: BlockRange) {
        // The file first: overflowing the file bound changes the mode, and so the tag.
        self.file_entry(file);
        let tag = self.tag_for(lsn);
        let mut change = Change::default();
        self.pieces.mark(file, range, tag, &mut change);
        self.apply(file, change);
        self.keep_extent_bound();
    }

    /// 000:1–2 for the "attributes changed" flag (mode, owner, times, size by truncate, xattrs).
    pub fn mark_attr(&mut self, lsn: Lsn, file: FileId) {
        self.mark_flag(lsn, file, Slot::Attr);
    }

    /// 000:1–2 for a directory's "entries changed" flag (create, link, unlink, rename in it).
    pub fn mark_entries(&mut self, lsn: Lsn, dir: FileId) {
        self.mark_flag(lsn, dir, Slot::Entries);
    }

    /// Adds every mark of `other` (its blocks, attribute and entries flags, a full resync it
    /// owes) as marks with update id `lsn`: a failback's union of both sides' changes.
    pub fn mark_all_of(&mut self, other: &SyncMap, lsn: Lsn) {
        if other.full_resync_owed() {
            self.require_full_resync();
        }
        self.mark_locations_of(other, lsn);
    }

    /// [`SyncMap::mark_all_of`] without the full resync `other` may owe: only the locations
    /// it marks.
    pub fn mark_locations_of(&mut self, other: &SyncMap, lsn: Lsn) {
        for file in other.dirty_files() {
            for range in other.dirty_ranges(file) {
                self.mark_blocks(lsn, file, range);
            }
            if other.is_attr_dirty(file) {
                self.mark_attr(lsn, file);
            }
            if other.is_entries_dirty(file) {
                self.mark_entries(lsn, file);
            }
        }
    }

    /// 000:4, 7–11: the target has durably received every update ≤ `upto`. Each location
    /// whose pending updates are then all acked (its highest pending id ≤ `upto`) has its
    /// indicator reset. Ignored unless shipping is ordered. Cost: O(log n) per location
    /// cleared, nothing for the ones that stay. Returns the number of entries cleared.
    pub fn ack(&mut self, upto: Lsn) -> usize {
        let Mode::Ordered { acked_below } = &mut self.mode else { return 0 };
        *acked_below = (*acked_below).max(Lsn(upto.0.saturating_add(1)));
        let mut cleared = 0;
        while let Some(&(max, file, slot)) = self.by_max.first()
            && max <= upto
        {
            self.remove_slot(file, slot);
            cleared += 1;
        }
        cleared
    }

    /// 000:5: the lowest update id some location still waits for from this target, or `None`
    /// when it pins nothing in the journal. A lower bound, never above the true value and never
    /// below the first unacked id; the journal may free records below the minimum of this over
    /// all targets (and its checkpoint). Fallen back: `None`, the map itself covers the target.
    /// Resyncing: the resume point, from which ordered shipping restarts.
    pub fn oldest_pending(&self) -> Option<Lsn> {
        match self.mode {
            Mode::Ordered { acked_below } => self.mins.keys().next().map(|&min| min.max(acked_below)),
            Mode::FallenBack => None,
            Mode::Resyncing { resume_from, .. } => Some(resume_from),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True when acks alone can't bring this target up to date: it has fallen back or is
    /// resyncing, owes a full resync, or holds a location no ack can clear (marked with an
    /// update id the ordered stream had already passed). The shipper then takes a resync plan.
    pub fn needs_resync(&self) -> bool {
        !matches!(self.mode, Mode::Ordered { .. }) || self.full_gen.is_some() || self.unordered > 0
    }

    /// True when a full resync (every file) is owed.
    pub fn full_resync_owed(&self) -> bool {
        self.full_gen.is_some()
    }

    /// The unsynchronized indicator of one block.
    pub fn is_block_dirty(&self, file: FileId, block: u64) -> bool {
        self.full_gen.is_some() || self.pieces.covering(file, block).is_some()
    }

    pub fn is_attr_dirty(&self, file: FileId) -> bool {
        self.full_gen.is_some() || self.files.get(&file).is_some_and(|f| f.attr.is_some())
    }

    pub fn is_entries_dirty(&self, dir: FileId) -> bool {
        self.full_gen.is_some() || self.files.get(&dir).is_some_and(|f| f.entries.is_some())
    }

    /// Nothing marked and no full resync owed.
    pub fn is_clean(&self) -> bool {
        self.files.is_empty() && self.full_gen.is_none()
    }

    /// A file's marked blocks as maximal ranges.
    pub fn dirty_ranges(&self, file: FileId) -> Vec<BlockRange> {
        self.pieces.coalesced(file)
    }

    /// The files with any mark, in id order.
    pub fn dirty_files(&self) -> impl Iterator<Item = FileId> + '_ {
        self.files.keys().copied()
    }

    /// Marked blocks (status `dirty_blocks`), saturating; a full resync owed is not counted.
    pub fn dirty_blocks(&self) -> u64 {
        u64::try_from(self.blocks).unwrap_or(u64::MAX)
    }

    /// Stored extents, the quantity the extent bound limits.
    pub fn extent_count(&self) -> usize {
        self.pieces.len()
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    pub fn stats(&self) -> SyncMapStats {
        self.stats
    }

    /// The tag a mark with update id `lsn` gets now. An id below the ordered stream's position
    /// (already acked, or below the resume point) will never be shipped in order again, so it
    /// can't be cleared by an ack: it waits for a resync.
    fn tag_for(&self, lsn: Lsn) -> Tag {
        match self.mode {
            Mode::Ordered { acked_below } if lsn >= acked_below => Tag::ordered(self.generation, lsn),
            Mode::Resyncing { resume_from, .. } if lsn >= resume_from => Tag::ordered(self.generation, lsn),
            _ => Tag::unordered(self.generation),
        }
    }

    fn mark_flag(&mut self, lsn: Lsn, file: FileId, slot: Slot) {
        self.file_entry(file);
        let tag = self.tag_for(lsn);
        let marks = self.file_entry(file);
        let flag = match slot {
            Slot::Attr => &mut marks.attr,
            Slot::Entries => &mut marks.entries,
            Slot::Blocks(_) => unreachable!("blocks are marked as ranges"),
        };
        let old = *flag;
        let new = old.map_or(tag, |o| o.combine(tag));
        *flag = Some(new);
        if old != Some(new) {
            if let Some(old) = old {
                self.index_remove(file, slot, old);
            }
            self.index_add(file, slot, new);
        }
    }

    /// The marks of `file`, created if need be. Past the file bound every file's marks are
    /// replaced by one "resync everything" first.
    fn file_entry(&mut self, file: FileId) -> &mut FileMarks {
        if !self.files.contains_key(&file) && self.files.len() >= self.limits.files_max {
            self.overflow_files();
        }
        self.files.entry(file).or_default()
    }

    /// Brings the indexes and counters in step with a change to `file`'s pieces.
    pub(super) fn apply(&mut self, file: FileId, change: Change) {
        let (removed, added) = (change.removed.len(), change.added.len());
        for p in change.removed {
            self.index_remove(file, Slot::Blocks(p.range.first), p.tag);
            self.blocks -= p.range.blocks();
        }
        for p in change.added {
            self.index_add(file, Slot::Blocks(p.range.first), p.tag);
            self.blocks += p.range.blocks();
        }
        let marks = self.files.get_mut(&file).expect("a file with pieces has marks");
        marks.extents = marks.extents + added - removed;
        if marks.is_empty() {
            self.files.remove(&file);
        }
    }

    fn remove_slot(&mut self, file: FileId, slot: Slot) {
        match slot {
            Slot::Blocks(first) => {
                let piece = self.pieces.remove(file, first).expect("an indexed piece is stored");
                self.apply(file, Change { removed: vec![piece], added: vec![] });
            }
            Slot::Attr | Slot::Entries => {
                let marks = self.files.get_mut(&file).expect("an indexed file has marks");
                let flag = if slot == Slot::Attr { &mut marks.attr } else { &mut marks.entries };
                let tag = flag.take().expect("an indexed flag is set");
                self.index_remove(file, slot, tag);
                if self.files.get(&file).is_some_and(FileMarks::is_empty) {
                    self.files.remove(&file);
                }
            }
        }
    }

    fn index_add(&mut self, file: FileId, slot: Slot, tag: Tag) {
        match tag.pending {
            Pending::Ordered { min, max } => {
                let fresh = self.by_max.insert((max, file, slot));
                assert!(fresh, "slot {slot:?} of {file} indexed twice");
                *self.mins.entry(min).or_insert(0) += 1;
            }
            Pending::Unordered => self.unordered += 1,
        }
    }

    fn index_remove(&mut self, file: FileId, slot: Slot, tag: Tag) {
        match tag.pending {
            Pending::Ordered { min, max } => {
                let found = self.by_max.remove(&(max, file, slot));
                assert!(found, "slot {slot:?} of {file} was not indexed");
                let count = self.mins.get_mut(&min).expect("min indexed with its slot");
                *count -= 1;
                if *count == 0 {
                    self.mins.remove(&min);
                }
            }
            Pending::Unordered => self.unordered -= 1,
        }
    }

    /// Recomputes every derived field from `files` (after a bulk change: fall-back, plan,
    /// resync done, decode). O(n log n), on events that are O(n) anyway.
    pub(super) fn reindex(&mut self) {
        self.by_max.clear();
        self.mins.clear();
        (self.unordered, self.blocks) = (0, 0);
        self.files.values_mut().for_each(|m| m.extents = 0);
        let mut entries: Vec<(FileId, Slot, Tag)> = Vec::new();
        for (file, Piece { range, tag }) in self.pieces.iter() {
            entries.push((file, Slot::Blocks(range.first), tag));
            self.files.entry(file).or_default().extents += 1;
            self.blocks += range.blocks();
        }
        self.files.retain(|_, m| !m.is_empty());
        for (&file, marks) in &self.files {
            entries.extend(marks.attr.map(|t| (file, Slot::Attr, t)));
            entries.extend(marks.entries.map(|t| (file, Slot::Entries, t)));
        }
        for (file, slot, tag) in entries {
            self.index_add(file, slot, tag);
        }
    }
}

#[cfg(test)]
impl SyncMap {
    /// Every structural invariant, checked from scratch (tests only).
    pub(super) fn check_invariants(&self) {
        let mut fresh = self.clone();
        fresh.reindex();
        assert_eq!(fresh.by_max, self.by_max, "ack index out of step");
        assert_eq!(fresh.mins, self.mins, "min index out of step");
        assert_eq!((fresh.unordered, fresh.blocks), (self.unordered, self.blocks), "counters out of step");
        let counts = |m: &SyncMap| m.files.iter().map(|(&f, marks)| (f, marks.extents)).collect::<Vec<_>>();
        assert_eq!(counts(&fresh), counts(self), "per-file extent counts out of step");
        let extents = self.extent_count();
        assert!(extents <= self.limits.extents_max, "{extents} extents past the bound");
        assert!(self.files.len() <= self.limits.files_max, "{} files past the bound", self.files.len());
        assert!(self.full_gen.is_none_or(|g| g <= self.generation));
        for (file, marks) in &self.files {
            assert!(!marks.is_empty(), "{file} kept with nothing marked");
            let mut previous: Option<u64> = None;
            let tags = self.pieces.of(*file).map(|p| (Some(p.range), p.tag));
            for (range, tag) in tags.chain(marks.attr.iter().chain(marks.entries.iter()).map(|&t| (None, t))) {
                if let Some(r) = range {
                    assert!(r.first <= r.last);
                    assert!(previous.is_none_or(|p| p < r.first), "{file}: pieces overlap at {r:?}");
                    previous = Some(r.last);
                }
                assert!(tag.generation <= self.generation, "{file}: a tag from a future generation");
                if let Pending::Ordered { min, max } = tag.pending {
                    assert!(min <= max);
                    match self.mode {
                        Mode::Ordered { acked_below } => assert!(max >= acked_below, "{file}: acked but kept"),
                        Mode::FallenBack => panic!("{file}: an ordered tag while fallen back"),
                        Mode::Resyncing { plan, resume_from } => {
                            assert!(tag.generation > plan.0 && max >= resume_from, "{file}: ordered tag in the plan")
                        }
                    }
                }
            }
        }
    }
}
