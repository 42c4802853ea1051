//! File id ↔ backing handle, with the open nodes the kernel currently holds.

use std::collections::HashMap;
use std::sync::Arc;

use crate::format::ids::IdSnapshot;
use crate::limits::NODES_CACHED_MAX;
use crate::types::{FileId, Handle};

struct Entry<N> {
    handle: Handle,
    /// The open node while the kernel holds lookups on the id.
    node: Option<Arc<N>>,
    lookups: u64,
}

/// Every id ever bound (so an object seen again keeps its id) and the nodes in use.
pub struct IdTable<N> {
    by_id: HashMap<FileId, Entry<N>>,
    by_handle: HashMap<Handle, FileId>,
    next: FileId,
    /// Entries holding an open node; at most `NODES_CACHED_MAX`.
    cached: usize,
}

impl<N> IdTable<N> {
    pub fn from_snapshot(snap: IdSnapshot) -> IdTable<N> {
        let mut t = IdTable {
            by_id: HashMap::new(),
            by_handle: HashMap::new(),
            next: snap.next_file_id.max(FileId::FIRST_FREE),
            cached: 0,
        };
        for (id, h) in snap.entries {
            t.insert(id, h);
        }
        t
    }

    pub fn snapshot(&self) -> IdSnapshot {
        let mut entries: Vec<_> = self.by_id.iter().map(|(id, e)| (*id, e.handle.clone())).collect();
        entries.sort();
        IdSnapshot { next_file_id: self.next, entries }
    }

    pub fn next_file_id(&self) -> FileId {
        self.next
    }

    pub fn allocate(&mut self) -> FileId {
        let id = self.next;
        self.next = FileId(id.0 + 1);
        id
    }

    pub fn insert(&mut self, id: FileId, handle: Handle) {
        if let Some(old) = self.by_id.get(&id) {
            self.by_handle.remove(&old.handle);
            if old.node.is_some() {
                self.cached -= 1;
            }
        }
        self.by_handle.insert(handle.clone(), id);
        self.by_id.insert(id, Entry { handle, node: None, lookups: 0 });
        if id >= self.next {
            self.next = FileId(id.0 + 1);
        }
    }

    pub fn id_of(&self, h: &Handle) -> Option<FileId> {
        self.by_handle.get(h).copied()
    }

    pub fn handle(&self, id: FileId) -> Option<&Handle> {
        self.by_id.get(&id).map(|e| &e.handle)
    }

    pub fn node(&self, id: FileId) -> Option<Arc<N>> {
        self.by_id.get(&id).and_then(|e| e.node.clone())
    }

    /// The kernel learned of `id` once more (a lookup, create, …): keep its node open while
    /// fewer than `NODES_CACHED_MAX` are.
    pub fn hold(&mut self, id: FileId, node: Arc<N>) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.lookups += 1;
            if e.node.is_none() && self.cached < NODES_CACHED_MAX {
                e.node = Some(node);
                self.cached += 1;
            }
        }
    }

    /// The kernel forgot `n` lookups of `id`: close its node when none are left.
    pub fn forget(&mut self, id: FileId, n: u64) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.lookups = e.lookups.saturating_sub(n);
            if e.lookups == 0 && e.node.take().is_some() {
                self.cached -= 1;
            }
        }
    }

    /// Open nodes held now.
    pub fn cached_nodes(&self) -> usize {
        self.cached
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_nodes_are_bounded_and_released_on_forget() {
        let mut t: IdTable<u32> = IdTable::from_snapshot(IdSnapshot::default());
        for i in 0..(NODES_CACHED_MAX as u64 + 100) {
            let id = t.allocate();
            t.insert(id, Handle(i.to_le_bytes().to_vec()));
            t.hold(id, Arc::new(0));
        }
        assert_eq!(t.cached_nodes(), NODES_CACHED_MAX);
        let first = FileId::FIRST_FREE;
        assert!(t.node(first).is_some());
        t.forget(first, 1);
        assert!(t.node(first).is_none());
        assert_eq!(t.cached_nodes(), NODES_CACHED_MAX - 1);
    }
}
