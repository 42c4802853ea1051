//! `SyncMaps`: the sync maps of every target, and what the journal may free given all of them.

use std::collections::BTreeMap;

use super::map::SyncMap;
use crate::types::{FileId, Lsn};

/// One [`SyncMap`] per target, keyed by whatever names a target (its url, or an id). A
/// `BTreeMap`, so iteration order, and with it every decision, is deterministic.
#[derive(Clone, Debug)]
pub struct SyncMaps<K: Ord> {
    targets: BTreeMap<K, SyncMap>,
}

impl<K: Ord> Default for SyncMaps<K> {
    fn default() -> Self {
        SyncMaps { targets: BTreeMap::new() }
    }
}

impl<K: Ord> SyncMaps<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a target's map; returns the one it replaced.
    pub fn insert(&mut self, target: K, map: SyncMap) -> Option<SyncMap> {
        self.targets.insert(target, map)
    }

    pub fn remove(&mut self, target: &K) -> Option<SyncMap> {
        self.targets.remove(target)
    }

    pub fn get(&self, target: &K) -> Option<&SyncMap> {
        self.targets.get(target)
    }

    pub fn get_mut(&mut self, target: &K) -> Option<&mut SyncMap> {
        self.targets.get_mut(target)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &SyncMap)> {
        self.targets.iter()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// 000:1–2 at every target: a journaled write marks each target's map (design §1 step 2).
    pub fn mark_write(&mut self, lsn: Lsn, file: FileId, offset: u64, len: u64) {
        self.targets.values_mut().for_each(|m| m.mark_write(lsn, file, offset, len));
    }

    pub fn mark_attr(&mut self, lsn: Lsn, file: FileId) {
        self.targets.values_mut().for_each(|m| m.mark_attr(lsn, file));
    }

    pub fn mark_entries(&mut self, lsn: Lsn, dir: FileId) {
        self.targets.values_mut().for_each(|m| m.mark_entries(lsn, dir));
    }

    /// 000:5–6: the lowest update id any location at any target still waits for; `None` when
    /// no target pins the journal. The journal may free records below it (and below its
    /// checkpoint and the bunker's ack).
    pub fn min_pending(&self) -> Option<Lsn> {
        self.targets.values().filter_map(SyncMap::oldest_pending).min()
    }

    /// 000:5: every transaction whose records all have LSNs below the result has no pending
    /// location left at any target, so it may get its `complete` record. `horizon` is the
    /// lowest LSN whose transaction may not have marked the maps yet (its marks could still pin
    /// it); with no target pinning anything, the result is `horizon`.
    pub fn complete_upto(&self, horizon: Lsn) -> Lsn {
        self.min_pending().map_or(horizon, |p| p.min(horizon))
    }
}
