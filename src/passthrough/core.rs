//! "Journal, apply, outcome": the one place every mutation goes through (design §1).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use super::ids::IdTable;
use crate::format::ops::{Op, SetAttr};
use crate::io::{NewNode, Storage, Tree};
use crate::journal::replay::IDS_FILE;
use crate::journal::{Journal, JournalError};
use crate::types::{FileId, Handle, Lsn, TxId};

/// An errno for the FUSE reply. Only `fuse/` turns it into the kernel's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<JournalError> for Errno {
    fn from(e: JournalError) -> Errno {
        tracing::error!("journal: {e}");
        Errno(e.errno())
    }
}

type R<T> = Result<T, Errno>;

/// Where a journaled change marks the locations it touched (the sync maps of every target,
/// claims 000:1–2). Called before the transaction ends, so before any of its records can be
/// shipped and acked; `lsn` is at or past the transaction's last record.
pub trait Marks: Send + Sync {
    fn write(&self, lsn: Lsn, file: FileId, offset: u64, len: u64);
    fn op(&self, lsn: Lsn, op: &Op);
    /// Right before a write changes the backing file (its record journaled, the file's lock
    /// held): a set-mode target preserves the images it still needs (claims 004:3–7,
    /// docs/CONSISTENCY.md). May wait for the sender; never fails the write.
    fn before_write(&self, _file: FileId, _offset: u64, _len: u64) {}
    /// Right before an op changes the backing directory (its intent journaled, the namespace
    /// or file lock held), likewise.
    fn before_op(&self, _op: &Op) {}
}

#[derive(Clone, Copy, Debug)]
pub struct CoreConfig {
    /// Stripes of per-file locks: writes to one file are journaled and applied in one order.
    pub file_lock_stripes: usize,
    /// A set-mode target needs swaps (`Core::swap`): every mutation then enters the gate. Off,
    /// mutations take no gate at all (the write path of a mount without set mode is unchanged).
    pub sets_gate: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig { file_lock_stripes: 64, sets_gate: false }
    }
}

pub struct Core<S: Storage, T: Tree> {
    pub journal: Arc<Journal<S>>,
    pub tree: Arc<T>,
    ids: Arc<Mutex<IdTable<T::Node>>>,
    /// Held from "is this handle known" to "its bind record is in the log", so no record can
    /// name an id before the record that binds it.
    bind_lock: Mutex<()>,
    /// Namespace ops are journaled and applied in one order.
    namespace: Mutex<()>,
    files: Vec<Mutex<()>>,
    root: Arc<T::Node>,
    root_handle: Handle,
    /// The journal's replication set id, which the applied marker carries.
    set_id: [u8; 16],
    marks: std::sync::OnceLock<Arc<dyn Marks>>,
    /// Every mutation holds it shared from its first record to its marks; a swap of consistent
    /// sets takes it exclusively (`swap`): new mutations wait, those in flight end first
    /// (claims 004:1–2). Taken before any other lock of the core. `None` without set mode
    /// (`CoreConfig::sets_gate`).
    gate: Option<RwLock<()>>,
}

impl<S: Storage, T: Tree> Core<S, T> {
    /// Wires the write path over an opened journal and tree; `ids` is the table recovery
    /// rebuilt. Installs the checkpoint hook (sync the tree, persist the id table).
    pub fn new(journal: Journal<S>, tree: T, ids: IdTable<T::Node>, config: CoreConfig) -> io::Result<Self> {
        let journal = Arc::new(journal);
        let tree = Arc::new(tree);
        let ids = Arc::new(Mutex::new(ids));
        let root = Arc::new(tree.root()?);
        let root_handle = tree.handle_of(&root)?;
        let set_id = journal.superblock().set_id;
        {
            let (tree, ids, j) = (tree.clone(), ids.clone(), Arc::downgrade(&journal));
            journal.set_checkpoint_hook(Box::new(move || {
                tree.sync_all()?;
                let snap = ids.lock().unwrap().snapshot();
                if let Some(j) = j.upgrade() {
                    j.storage().write_file_atomic(IDS_FILE, &snap.encode())?;
                }
                Ok(snap.next_file_id)
            }));
        }
        let files = (0..config.file_lock_stripes.max(1)).map(|_| Mutex::new(())).collect();
        Ok(Core {
            journal,
            tree,
            ids,
            bind_lock: Mutex::new(()),
            namespace: Mutex::new(()),
            files,
            root,
            root_handle,
            set_id,
            marks: std::sync::OnceLock::new(),
            gate: config.sets_gate.then(|| RwLock::new(())),
        })
    }

    /// A swap of consistent sets (claims 004:1–2, 10): waits until no mutation is in flight,
    /// holding new ones back, runs `swap` (which must only move maps: nothing slow), and lets
    /// them go. Returns how long mutations were held: from asking for the gate to releasing it.
    pub fn swap(&self, swap: impl FnOnce()) -> std::time::Duration {
        let gate = self.gate.as_ref().expect("a swap needs the gate (CoreConfig::sets_gate)");
        let asked = std::time::Instant::now();
        let held = gate.write().unwrap_or_else(|e| e.into_inner());
        swap();
        drop(held);
        asked.elapsed()
    }

    /// Entered by every mutation first (see `gate`).
    fn enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.gate.as_ref().map(|g| g.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replication: every change from now on marks `marks` before its transaction ends.
    pub fn set_marks(&self, marks: Arc<dyn Marks>) {
        let _ = self.marks.set(marks);
    }

    /// Ends op `tx` with a commit, marking the sync maps in between.
    fn commit(&self, tx: TxId, op: &Op) -> R<()> {
        self.commit_marking(tx, op, None)
    }

    /// `commit`, also marking `bytes` (file, offset, len) as changed: the bytes a truncate
    /// destroyed, which the op's record does not name.
    fn commit_marking(&self, tx: TxId, op: &Op, bytes: Option<(FileId, u64, u64)>) -> R<()> {
        let r = self.journal.append_commit(tx);
        if let Ok((lsn, time)) = &r {
            if let Some(m) = self.marks.get() {
                m.op(*lsn, op);
                if let Some((id, offset, len)) = bytes {
                    m.write(*lsn, id, offset, len);
                }
            }
            for id in op.mtime_ids() {
                self.set_mtime(id, *time);
            }
        }
        self.journal.done(tx);
        r?;
        Ok(())
    }

    /// Gives `id` the mtime `time_ns` (a record's time), as every target will: see
    /// `Op::mtime_ids`. A failure costs only an mtime: logged, not returned.
    fn set_mtime(&self, id: FileId, time_ns: u64) {
        let attr = SetAttr { mtime: Some(crate::format::ops::Timestamp::from_ns(time_ns)), ..Default::default() };
        let r =
            self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0)).and_then(|n| self.tree.set_attr(&n, &attr));
        if let Err(e) = r {
            tracing::debug!("setting the mtime of {id}: {e}");
        }
    }

    /// Ends `tx` with an abort; its locations are marked too (a target that got its intent
    /// must learn it failed, and the abort is what tells it).
    fn abort(&self, tx: TxId, errno: Errno, mark: impl FnOnce(&dyn Marks, Lsn)) -> Errno {
        match self.journal.append_abort(tx, errno.0) {
            Ok(lsn) => {
                if let Some(m) = self.marks.get() {
                    mark(m.as_ref(), lsn);
                }
                self.journal.done(tx);
                errno
            }
            Err(e) => {
                self.journal.done(tx);
                e.into()
            }
        }
    }

    fn file_lock(&self, id: FileId) -> MutexGuard<'_, ()> {
        self.files[(id.0 as usize) % self.files.len()].lock().unwrap()
    }

    pub fn ids(&self) -> MutexGuard<'_, IdTable<T::Node>> {
        self.ids.lock().unwrap()
    }

    // ----- resolving ids -----------------------------------------------------------------

    /// The open node of `id`: held by the kernel, or reopened from its handle.
    pub fn node(&self, id: FileId) -> R<Arc<T::Node>> {
        if id == FileId::ROOT {
            return Ok(self.root.clone());
        }
        let handle = {
            let ids = self.ids();
            if let Some(n) = ids.node(id) {
                return Ok(n);
            }
            ids.handle(id).cloned().ok_or(Errno(libc::ESTALE))?
        };
        Ok(Arc::new(self.tree.open_handle(&handle)?))
    }

    /// The id of an object, binding a new one (journaled) when ferryfs has not seen it.
    fn id_for(&self, node: &T::Node) -> R<FileId> {
        let handle = self.tree.handle_of(node)?;
        if handle == self.root_handle {
            return Ok(FileId::ROOT);
        }
        let _bind = self.bind_lock.lock().unwrap();
        if let Some(id) = self.ids().id_of(&handle) {
            return Ok(id);
        }
        let id = {
            let mut ids = self.ids();
            let id = ids.allocate();
            ids.insert(id, handle.clone());
            id
        };
        self.journal.append_bind(None, id, &handle)?;
        Ok(id)
    }

    /// The kernel now holds one more reference to `id`.
    fn hold(&self, id: FileId, node: Arc<T::Node>) {
        if id != FileId::ROOT {
            self.ids().hold(id, node);
        }
    }

    pub fn forget(&self, id: FileId, n: u64) {
        self.ids().forget(id, n);
    }

    /// Looks up `name` in `parent` and counts a kernel reference to the result.
    pub fn lookup(&self, parent: FileId, name: &[u8]) -> R<(FileId, Arc<T::Node>)> {
        let dir = self.node(parent)?;
        let node = Arc::new(self.tree.lookup(&dir, name)?);
        let id = self.id_for(&node)?;
        self.hold(id, node.clone());
        Ok((id, node))
    }

    /// Records in the tree that namespace op `tx` is applied (see `Tree::applied_marker`). A
    /// failure only costs replay precision, never data: it is logged, not returned.
    fn mark_applied(&self, tx: TxId) {
        if let Err(e) = self.tree.set_applied_marker(&self.set_id, tx.0) {
            tracing::warn!("recording the applied marker: {e}");
        }
    }

    // ----- the transaction pattern -------------------------------------------------------

    /// Journals `op`, applies it with `apply`, then journals the outcome.
    fn transact<X>(&self, op: &Op, apply: impl FnOnce() -> io::Result<X>) -> R<(TxId, X)> {
        let tx = self.journal.append_op(op)?;
        if let Some(m) = self.marks.get() {
            m.before_op(op);
        }
        match apply() {
            Ok(x) => Ok((tx, x)),
            Err(e) => Err(self.abort(tx, Errno::from(e), |m, lsn| m.op(lsn, op))),
        }
    }

    // ----- namespace ---------------------------------------------------------------------

    /// Creates an object of any kind; the id is assigned before the intent is journaled.
    pub fn create(&self, parent: FileId, name: &[u8], new: &NewNode<'_>) -> R<(FileId, Arc<T::Node>)> {
        let _gate = self.enter();
        let dir = self.node(parent)?;
        let _ns = self.namespace.lock().unwrap();
        let new_id = self.ids().allocate();
        let op = Op::Create {
            parent,
            name: name.to_vec(),
            new_id,
            kind: new.kind,
            mode: new.mode,
            uid: new.uid,
            gid: new.gid,
            rdev: new.rdev,
            target: new.target.to_vec(),
        };
        // Held from the object's making to its binding: a lookup that found the new object in
        // between would bind it to a second id, and the kernel would then name it by that id,
        // which no target knows (its writes would reach no mirror).
        let bind = self.bind_lock.lock().unwrap();
        let (tx, node) = self.transact(&op, || self.tree.create(&dir, name, new))?;
        self.mark_applied(tx);
        let node = Arc::new(node);
        let handle = self.tree.handle_of(&node);
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                self.commit(tx, &op)?;
                return Err(e.into());
            }
        };
        self.ids().insert(new_id, handle.clone());
        drop(bind);
        self.journal.append_bind(Some(tx), new_id, &handle)?;
        self.commit(tx, &op)?;
        self.hold(new_id, node.clone());
        Ok((new_id, node))
    }

    pub fn link(&self, id: FileId, new_parent: FileId, new_name: &[u8]) -> R<Arc<T::Node>> {
        let _gate = self.enter();
        let node = self.node(id)?;
        let dir = self.node(new_parent)?;
        let _ns = self.namespace.lock().unwrap();
        let op = Op::Link { id, new_parent, new_name: new_name.to_vec() };
        let (tx, ()) = self.transact(&op, || self.tree.link(&node, &dir, new_name))?;
        self.mark_applied(tx);
        self.commit(tx, &op)?;
        self.hold(id, node.clone());
        Ok(node)
    }

    /// The id a name currently refers to, without counting a kernel reference.
    fn peek(&self, dir: &T::Node, name: &[u8]) -> R<FileId> {
        let node = self.tree.lookup(dir, name)?;
        self.id_for(&node)
    }

    pub fn unlink(&self, parent: FileId, name: &[u8], is_dir: bool) -> R<()> {
        let _gate = self.enter();
        let dir = self.node(parent)?;
        let _ns = self.namespace.lock().unwrap();
        let id = self.peek(&dir, name)?;
        let op = Op::Unlink { parent, name: name.to_vec(), id, dir: is_dir };
        let (tx, ()) = self.transact(&op, || self.tree.unlink(&dir, name, is_dir))?;
        self.mark_applied(tx);
        self.commit(tx, &op)?;
        Ok(())
    }

    pub fn rename(&self, parent: FileId, name: &[u8], new_parent: FileId, new_name: &[u8], flags: u32) -> R<()> {
        let _gate = self.enter();
        let from = self.node(parent)?;
        let to = self.node(new_parent)?;
        let _ns = self.namespace.lock().unwrap();
        let id = self.peek(&from, name)?;
        let replaced = match self.peek(&to, new_name) {
            Ok(r) => r,
            Err(Errno(libc::ENOENT)) => FileId::NONE,
            Err(e) => return Err(e),
        };
        let op =
            Op::Rename { parent, name: name.to_vec(), new_parent, new_name: new_name.to_vec(), flags, id, replaced };
        let (tx, ()) = self.transact(&op, || self.tree.rename(&from, name, &to, new_name, flags))?;
        self.mark_applied(tx);
        self.commit(tx, &op)?;
        Ok(())
    }

    // ----- attributes --------------------------------------------------------------------

    pub fn set_attr(&self, id: FileId, attr: &SetAttr) -> R<Arc<T::Node>> {
        let _gate = self.enter();
        let node = self.node(id)?;
        let _f = self.file_lock(id);
        let op = Op::SetAttr { id, attr: attr.clone() };
        // A truncate destroys the bytes from the new size to the old one: a target that lacks
        // the op must get them again even if the file grows back over them (as zeros or new
        // data) before a resync. A size that cannot be read marks everything past the new one.
        // Without targets nothing is marked, and the size is not read.
        let destroyed = attr.size.filter(|_| self.marks.get().is_some()).and_then(|new| {
            let old = self.tree.size(&node).unwrap_or(u64::MAX);
            (old > new).then(|| (id, new, old - new))
        });
        let (tx, ()) = self.transact(&op, || self.tree.set_attr(&node, attr))?;
        self.commit_marking(tx, &op, destroyed)?;
        Ok(node)
    }

    pub fn set_xattr(&self, id: FileId, name: &[u8], value: &[u8], flags: u32) -> R<()> {
        let _gate = self.enter();
        let node = self.node(id)?;
        let _f = self.file_lock(id);
        let op = Op::SetXattr { id, name: name.to_vec(), value: value.to_vec(), flags };
        let (tx, ()) = self.transact(&op, || self.tree.set_xattr(&node, name, value, flags))?;
        self.commit(tx, &op)?;
        Ok(())
    }

    pub fn remove_xattr(&self, id: FileId, name: &[u8]) -> R<()> {
        let _gate = self.enter();
        let node = self.node(id)?;
        let _f = self.file_lock(id);
        let op = Op::RemoveXattr { id, name: name.to_vec() };
        let (tx, ()) = self.transact(&op, || self.tree.remove_xattr(&node, name))?;
        self.commit(tx, &op)?;
        Ok(())
    }

    /// `apply` runs the fallocate on an open fd when the caller has one.
    pub fn fallocate(
        &self,
        id: FileId,
        mode: u32,
        offset: u64,
        len: u64,
        apply: Option<&dyn Fn() -> io::Result<()>>,
    ) -> R<()> {
        let _gate = self.enter();
        let node = self.node(id)?;
        let _f = self.file_lock(id);
        let op = Op::Fallocate { id, mode, offset, len };
        let (tx, ()) = self.transact(&op, || match apply {
            Some(f) => f(),
            None => self.tree.fallocate(&node, mode, offset, len),
        })?;
        self.commit(tx, &op)?;
        Ok(())
    }

    // ----- data --------------------------------------------------------------------------

    /// Journals `data` at `offset` of `id`, then writes it with `apply` (a pwrite on the open
    /// fd, which must write everything or fail). An `Abort` follows a failed write.
    pub fn write(&self, id: FileId, offset: u64, data: &[u8], apply: impl FnOnce() -> io::Result<()>) -> R<TxId> {
        let _gate = self.enter();
        let _f = self.file_lock(id);
        let (tx, time) = self.journal.append_write_stamped(id, offset, data)?;
        let len = data.len() as u64;
        if let Some(m) = self.marks.get() {
            m.before_write(id, offset, len);
            // At or past the write's last record (its chunks may interleave with others).
            m.write(Lsn(self.journal.next_lsn().0 - 1), id, offset, len);
        }
        match apply() {
            Ok(()) => {
                self.set_mtime(id, time);
                self.journal.done(tx);
                Ok(tx)
            }
            Err(e) => Err(self.abort(tx, Errno::from(e), |m, lsn| m.write(lsn, id, offset, len))),
        }
    }

    /// Writes through the tree (no open fd): used by the simulation and tools.
    pub fn write_via_tree(&self, id: FileId, offset: u64, data: &[u8]) -> R<TxId> {
        let node = self.node(id)?;
        self.write(id, offset, data, || self.tree.write(&node, offset, data))
    }

    /// fsync/fdatasync/O_SYNC: every record journaled so far is durable when this returns.
    /// Concurrent callers share one flush.
    /// With a bunker in sync mode, also held there (`Journal::sync_mirrored`).
    pub fn sync(&self) -> R<Lsn> {
        Ok(self.journal.sync_mirrored()?)
    }

    pub fn checkpoint(&self) -> R<Lsn> {
        Ok(self.journal.checkpoint()?)
    }

    /// The id of `name` in `dir` (bound on first sight), without a kernel reference.
    pub fn peek_id(&self, dir: &T::Node, name: &[u8]) -> R<FileId> {
        self.peek(dir, name)
    }

    /// Runs `f` with no namespace op in progress. A reader that binds ids to what it finds
    /// (a resync listing a directory) needs it: between a create's effect on the tree and its
    /// id's binding, a lookup would bind the new object to a second, wrong id.
    pub fn with_namespace_quiet<X>(&self, f: impl FnOnce() -> X) -> X {
        let _ns = self.namespace.lock().unwrap();
        f()
    }
}

#[cfg(test)]
#[path = "gate_tests.rs"]
mod gate_tests;
