//! Redo: re-applies every transaction past the checkpoint to the backing tree (design §1).
//!
//! The rule for transactions, documented in docs/FORMAT.md ("Replay"):
//! - a `Write` is redone unless an `Abort` for it follows;
//! - an `Op` with a `Commit` is redone (its effect may not have reached the synced backing);
//! - an `Op` with an `Abort` is skipped (it failed on the primary, with that errno);
//! - an `Op` with no outcome (the crash came between intent and outcome; the client never got
//!   a reply) is redone; if the redo fails it is counted as aborted.
//!
//! Every redo checks, by file id and single name component, whether its effect is already
//! there, so replaying twice equals replaying once, and replaying from a backing directory
//! that is ahead of the checkpoint converges to the same state.

use std::collections::{HashMap, HashSet};
use std::io;

use super::error::JournalError;
use super::reader::{self, ScanEnd};
use super::writer::Journal;
use crate::format::ids::IdSnapshot;
use crate::format::ops::Op;
use crate::format::record::{self, Kind};
use crate::format::superblock::Superblock;
use crate::io::{NewNode, Storage, Tree};
use crate::types::{FileId, Handle, TxId};

pub const IDS_FILE: &str = "ids";

/// What a replay did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub from_lsn: u64,
    pub records: u64,
    pub bytes: u64,
    /// Transactions redone (writes and ops).
    pub redone: u64,
    /// Of those, ops that had no outcome record (incomplete at the crash).
    pub incomplete: u64,
    /// Transactions skipped because they had an `Abort` record.
    pub aborted: u64,
    /// Redo attempts of committed transactions that failed, with the reason: the backing
    /// directory disagrees with the journal (an operator must look).
    pub failed: Vec<String>,
    /// Incomplete ops (no outcome record) whose redo failed: treated as aborted.
    pub incomplete_failed: Vec<String>,
    /// Redo attempts that found their effect already there.
    pub already: u64,
    pub end: Option<ScanEnd>,
    pub next_file_id: u64,
}

/// The file-id → handle table as replay rebuilds it: the checkpoint's snapshot plus binds.
#[derive(Default)]
pub struct IdMap {
    pub map: HashMap<FileId, Handle>,
    pub next_file_id: FileId,
}

impl IdMap {
    /// The id table as of the superblock's checkpoint. A checkpoint that handed out ids always
    /// wrote the table first, so its absence then is damage, not a fresh journal.
    pub fn load<S: Storage>(storage: &S, sb: &Superblock) -> Result<IdMap, JournalError> {
        let bytes = storage.read_file(IDS_FILE).map_err(|e| JournalError::Io("reading the id table".into(), e))?;
        let snap = match bytes {
            Some(b) => {
                IdSnapshot::decode(&b).map_err(|e| JournalError::Corrupt(format!("id table file `{IDS_FILE}`: {e}")))?
            }
            None if sb.next_file_id > FileId::FIRST_FREE => {
                return Err(JournalError::Corrupt(format!(
                    "the id table file `{IDS_FILE}` is missing, yet the last checkpoint had handed out file ids up to {}; \
                     nothing was changed",
                    sb.next_file_id.0 - 1
                )));
            }
            None => IdSnapshot::default(),
        };
        let mut m = IdMap { map: snap.entries.into_iter().collect(), next_file_id: snap.next_file_id };
        m.next_file_id = m.next_file_id.max(FileId::FIRST_FREE).max(sb.next_file_id);
        Ok(m)
    }

    pub fn snapshot(&self) -> IdSnapshot {
        let mut entries: Vec<_> = self.map.iter().map(|(k, v)| (*k, v.clone())).collect();
        entries.sort();
        IdSnapshot { next_file_id: self.next_file_id, entries }
    }

    fn bind(&mut self, id: FileId, h: Handle) {
        self.map.insert(id, h);
        if id.0 >= self.next_file_id.0 {
            self.next_file_id = FileId(id.0 + 1);
        }
    }
}

/// Progress callback: (bytes of log done, bytes of log in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Where the valid log ends (and why), without applying anything.
pub fn find_end<S: Storage>(storage: &S, sb: &Superblock) -> Result<ScanEnd, JournalError> {
    reader::scan(storage, sb, |_| true)
}

/// Replays the journal in `storage` onto `tree`. With `journal` = `None` this is a dry run:
/// nothing is changed and the report says what would be done. Otherwise `journal` must be the
/// same log opened at its end (`find_end`): when redo has to make an object anew, its new
/// handle is journaled there as a `Bind` of the create's transaction, so a replay that is
/// interrupted and run again finds the object instead of making it twice.
/// The caller persists the id table and moves the checkpoint.
pub fn replay<S: Storage, T: Tree>(
    storage: &S,
    sb: &Superblock,
    tree: &T,
    ids: &mut IdMap,
    journal: Option<&Journal<S>>,
    boot_id: [u8; 16],
    progress: Progress<'_>,
) -> Result<ReplayReport, JournalError> {
    let dry_run = journal.is_none();
    // In the boot that wrote the log, the backing directory's page cache survived the crash:
    // a committed namespace op is in the tree. After a reboot only the checkpoint is sure.
    let same_boot = sb.boot_id == boot_id;
    // Namespace ops up to the tree's own marker are in the tree (see `Tree::applied_marker`).
    let applied = tree
        .applied_marker(&sb.set_id)
        .map_err(|e| JournalError::Io("reading the backing root's applied marker".into(), e))?;
    let mut redone_here = HashSet::new();
    // Pass 1: outcomes and binds of every transaction, and the log's size.
    let mut aborted = HashSet::new();
    let mut committed = HashSet::new();
    let mut binds: HashMap<TxId, Vec<(FileId, Handle)>> = HashMap::new();
    let mut total = 0u64;
    let end = reader::scan(storage, sb, |r| {
        total += record::record_len(r.header.payload_len as usize) as u64;
        match r.header.kind {
            Kind::Abort => {
                aborted.insert(r.header.txid);
            }
            Kind::Commit => {
                committed.insert(r.header.txid);
            }
            Kind::Redone if r.payload == boot_id => {
                redone_here.insert(r.header.txid);
            }
            Kind::Bind if r.header.txid.0 != r.header.lsn.0 => {
                if let Ok(b) = record::decode_bind(r.payload) {
                    binds.entry(r.header.txid).or_default().push(b);
                }
            }
            _ => {}
        }
        true
    })?;

    // Pass 2: redo in log order.
    let mut rep = ReplayReport { from_lsn: sb.start_lsn.0, ..Default::default() };
    let mut redo = Redo { tree, ids, dry_run, journal, boot_id, set_id: sb.set_id };
    let mut done = 0u64;
    let mut mtimes: HashMap<TxId, Vec<FileId>> = HashMap::new();
    reader::scan(storage, sb, |r| {
        if r.header.lsn.0 >= end.next_lsn.0 {
            return false;
        }
        rep.records += 1;
        let len = record::record_len(r.header.payload_len as usize) as u64;
        done += len;
        rep.bytes += len;
        let tx = r.header.txid;
        let result = match r.header.kind {
            Kind::Write | Kind::Op if aborted.contains(&tx) => {
                if r.header.txid.0 == r.header.lsn.0 {
                    rep.aborted += 1;
                }
                Ok(Outcome::Skipped)
            }
            Kind::Write => match record::decode_write(r.payload) {
                // A data write's redo fails only where the primary's write failed too (same
                // object, same bytes) and the `Abort` after it was lost: counted as aborted.
                Ok((file, offset, data)) => {
                    let done = redo.write(file, offset, data).or_else(|e| {
                        rep.incomplete_failed.push(format!("lsn {}: write failed on redo: {e}", r.header.lsn.0));
                        Ok(Outcome::Skipped)
                    });
                    if matches!(done, Ok(Outcome::Done)) {
                        redo.set_mtime(file, r.header.time_ns);
                    }
                    done
                }
                Err(e) => Err(format!("write record {}: {e}", r.header.lsn.0)),
            },
            Kind::Commit => {
                // The times the primary gave the objects at this commit (Op::mtime_ids): a
                // redo made them "now", and every mirror has the commit's time.
                for id in mtimes.remove(&tx).unwrap_or_default() {
                    redo.set_mtime(id, r.header.time_ns);
                }
                Ok(Outcome::Skipped)
            }
            Kind::Op => match Op::decode(r.payload) {
                Ok(op) => {
                    mtimes.insert(tx, op.mtime_ids());
                    if !committed.contains(&tx) {
                        rep.incomplete += 1;
                    }
                    let in_tree =
                        tx.0 <= applied || (same_boot && committed.contains(&tx)) || redone_here.contains(&tx);
                    let res = redo.op(tx, in_tree, &op, binds.get(&tx).map(|v| v.as_slice()).unwrap_or(&[]));
                    match res {
                        // The client never got a reply for an incomplete op: failing now is
                        // an allowed outcome (design §1), counted as aborted.
                        Err(e) if !committed.contains(&tx) => {
                            // Recorded, so a mirror target that receives this op skips it
                            // too instead of succeeding where the primary did not.
                            if let Some(j) = journal {
                                j.abort(tx, libc::EIO).map_err(|_| ()).ok();
                            }
                            rep.incomplete_failed.push(format!(
                                "lsn {}: {} failed on redo: {e}",
                                r.header.lsn.0,
                                op.name()
                            ));
                            Ok(Outcome::Skipped)
                        }
                        r => r.map_err(|e| format!("{op:?}: {e}")),
                    }
                }
                Err(e) => Err(format!("op record {}: {e}", r.header.lsn.0)),
            },
            Kind::Bind if tx.0 == r.header.lsn.0 => match record::decode_bind(r.payload) {
                Ok((id, h)) => {
                    redo.ids.bind(id, h);
                    Ok(Outcome::Skipped)
                }
                Err(e) => Err(format!("bind record {}: {e}", r.header.lsn.0)),
            },
            _ => Ok(Outcome::Skipped),
        };
        match result {
            Ok(Outcome::Done) => rep.redone += 1,
            Ok(Outcome::Already) => {
                rep.redone += 1;
                rep.already += 1
            }
            Ok(Outcome::Skipped) => {}
            Err(msg) => rep.failed.push(format!("lsn {}: {msg}", r.header.lsn.0)),
        }
        if rep.records.is_multiple_of(1024) {
            progress(done, total);
        }
        true
    })?;
    progress(total, total);
    if !dry_run {
        // The tree now holds every namespace op of the log; LSNs past the end may be handed
        // out again (a discarded tail), so the marker must not stay above it.
        if end.next_lsn.0 > 1 {
            tree.set_applied_marker(&sb.set_id, end.next_lsn.0 - 1)
                .map_err(|e| JournalError::Io("recording the applied marker".into(), e))?;
        }
        tree.sync_all().map_err(|e| JournalError::Io("syncing the backing directory after replay".into(), e))?;
    }
    rep.next_file_id = ids.next_file_id.0;
    rep.end = Some(end);
    Ok(rep)
}

enum Outcome {
    Done,
    Already,
    Skipped,
}

struct Redo<'a, S: Storage, T: Tree> {
    tree: &'a T,
    ids: &'a mut IdMap,
    dry_run: bool,
    journal: Option<&'a Journal<S>>,
    boot_id: [u8; 16],
    set_id: [u8; 16],
}

type RedoResult = Result<Outcome, String>;

fn why(e: io::Error) -> String {
    e.to_string()
}

impl<S: Storage, T: Tree> Redo<'_, S, T> {
    fn node(&self, id: FileId) -> Result<T::Node, String> {
        if id == FileId::ROOT {
            return self.tree.root().map_err(why);
        }
        let h = self.ids.map.get(&id).ok_or_else(|| format!("file {id} has no known handle"))?;
        self.tree.open_handle(h).map_err(|e| format!("file {id}: {e}"))
    }

    /// True when `name` in `dir` is the object `id`.
    fn names(&self, dir: &T::Node, name: &[u8], id: FileId) -> bool {
        let Ok(n) = self.tree.lookup(dir, name) else { return false };
        let Ok(h) = self.tree.handle_of(&n) else { return false };
        self.ids.map.get(&id) == Some(&h)
    }

    fn write(&mut self, file: FileId, offset: u64, data: &[u8]) -> RedoResult {
        let node = match self.node(file) {
            Ok(n) => n,
            // The file is gone from the backing directory: a later unlink in this log (or
            // before the crash) removed it, so its data has nowhere to go.
            Err(_) => return Ok(Outcome::Skipped),
        };
        if !self.dry_run {
            self.tree.write(&node, offset, data).map_err(why)?;
        }
        Ok(Outcome::Done)
    }

    /// Redoes one op. `in_tree`: its effect is known to be in the backing directory (applied
    /// in this boot), so a namespace op is not redone: only its binds are taken over.
    fn op(&mut self, tx: TxId, in_tree: bool, op: &Op, binds: &[(FileId, Handle)]) -> RedoResult {
        let namespace = matches!(op, Op::Create { .. } | Op::Link { .. } | Op::Unlink { .. } | Op::Rename { .. });
        if namespace && in_tree {
            if let Op::Create { new_id, .. } = op
                && let Some((_, h)) = binds.iter().rev().find(|(id, _)| id == new_id)
            {
                self.ids.bind(*new_id, h.clone());
            }
            return Ok(Outcome::Already);
        }
        let outcome = self.op_redo(tx, op, binds)?;
        // Settled in this boot, whether redone, found in place or found superseded: a replay
        // run again in this boot must not judge it anew against a tree this one has changed.
        if namespace && let Some(j) = self.journal {
            self.tree.set_applied_marker(&self.set_id, tx.0).map_err(why)?;
            j.redone(tx, self.boot_id).map_err(|e| e.to_string())?;
        }
        Ok(outcome)
    }

    fn op_redo(&mut self, tx: TxId, op: &Op, binds: &[(FileId, Handle)]) -> RedoResult {
        match op {
            Op::Create { parent, name, new_id, kind, mode, uid, gid, rdev, target } => {
                // The commit's bind names the object the primary created, and a bind that an
                // earlier replay journaled names the one it made anew: if one still exists,
                // the create is there already.
                for (_, h) in binds.iter().filter(|(id, _)| id == new_id).rev() {
                    if self.tree.open_handle(h).is_ok() {
                        self.ids.bind(*new_id, h.clone());
                        return Ok(Outcome::Already);
                    }
                }
                let Ok(dir) = self.node(*parent) else { return Ok(Outcome::Skipped) };
                if self.tree.lookup(&dir, name).is_ok() {
                    // The name is taken, and no object this create made exists: the tree is
                    // past this op and the object was removed later in the log (committed), or
                    // the crash came before its bind (incomplete: the client never saw the
                    // object, so no later record names it). Either way nothing to redo.
                    return Ok(Outcome::Skipped);
                }
                if self.dry_run {
                    return Ok(Outcome::Done);
                }
                let new = NewNode { kind: *kind, mode: *mode, uid: *uid, gid: *gid, rdev: *rdev, target };
                let node = self.tree.create(&dir, name, &new).map_err(why)?;
                let h = self.tree.handle_of(&node).map_err(why)?;
                if let Some(j) = self.journal {
                    j.append_bind(Some(tx), *new_id, &h).map_err(|e| e.to_string())?;
                }
                self.ids.bind(*new_id, h);
                Ok(Outcome::Done)
            }
            Op::Link { id, new_parent, new_name } => {
                let Ok(dir) = self.node(*new_parent) else { return Ok(Outcome::Skipped) };
                if self.names(&dir, new_name, *id) {
                    return Ok(Outcome::Already);
                }
                if self.tree.lookup(&dir, new_name).is_ok() {
                    // Taken by another object: the tree is past this op (see `Create`).
                    return Ok(Outcome::Skipped);
                }
                let Ok(node) = self.node(*id) else { return Ok(Outcome::Skipped) };
                if !self.dry_run {
                    self.tree.link(&node, &dir, new_name).map_err(why)?;
                }
                Ok(Outcome::Done)
            }
            Op::Unlink { parent, name, id, dir: is_dir } => {
                let Ok(dir) = self.node(*parent) else { return Ok(Outcome::Skipped) };
                if !self.names(&dir, name, *id) {
                    return Ok(Outcome::Already);
                }
                if !self.dry_run {
                    self.tree.unlink(&dir, name, *is_dir).map_err(why)?;
                }
                Ok(Outcome::Done)
            }
            Op::Rename { parent, name, new_parent, new_name, flags, id, replaced } => {
                let (Ok(from), Ok(to)) = (self.node(*parent), self.node(*new_parent)) else {
                    return Ok(Outcome::Skipped);
                };
                if !self.names(&from, name, *id) {
                    return Ok(Outcome::Already);
                }
                let exchange = flags & libc::RENAME_EXCHANGE != 0;
                let target_taken = self.tree.lookup(&to, new_name).is_ok();
                let noreplace = flags & libc::RENAME_NOREPLACE != 0;
                let target_ok = if target_taken {
                    !noreplace && *replaced != FileId::NONE && self.names(&to, new_name, *replaced)
                } else {
                    !exchange
                };
                if !target_ok {
                    // The target is not what it was on the primary: the tree is past this op.
                    return Ok(Outcome::Skipped);
                }
                if !self.dry_run {
                    self.tree.rename(&from, name, &to, new_name, *flags).map_err(why)?;
                }
                Ok(Outcome::Done)
            }
            Op::SetAttr { id, attr } => self.on(*id, |t, n| t.set_attr(n, attr)),
            Op::SetXattr { id, name, value, flags } => {
                // XATTR_CREATE/REPLACE held on the primary; redo sets the value either way.
                let _ = flags;
                self.on(*id, |t, n| t.set_xattr(n, name, value, 0))
            }
            Op::RemoveXattr { id, name } => self.on(*id, |t, n| match t.remove_xattr(n, name) {
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                r => r,
            }),
            Op::Fallocate { id, mode, offset, len } => self.on(*id, |t, n| t.fallocate(n, *mode, *offset, *len)),
        }
    }

    /// Gives `id` the mtime `time_ns` from a record (see `Op::mtime_ids`); an object gone is
    /// skipped, and a failure costs only an mtime.
    fn set_mtime(&self, id: FileId, time_ns: u64) {
        if self.dry_run {
            return;
        }
        let attr = crate::format::ops::SetAttr {
            mtime: Some(crate::format::ops::Timestamp::from_ns(time_ns)),
            ..Default::default()
        };
        if let Ok(node) = self.node(id) {
            let _ = self.tree.set_attr(&node, &attr);
        }
    }

    /// Applies `f` to the object `id`; an object that no longer exists is skipped.
    fn on(&mut self, id: FileId, f: impl FnOnce(&T, &T::Node) -> io::Result<()>) -> RedoResult {
        let Ok(node) = self.node(id) else { return Ok(Outcome::Skipped) };
        if !self.dry_run {
            f(self.tree, &node).map_err(why)?;
        }
        Ok(Outcome::Done)
    }
}
