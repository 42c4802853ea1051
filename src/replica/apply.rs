//! The mirror target's applier: settled transactions of the primary's journal, and resync
//! descriptions of its current state, applied to the target's directory through the `Tree`
//! seam (design §5).
//!
//! Records name objects by the primary's file ids; the primary's handles mean nothing here.
//! So every object the applier makes is *tagged* with its primary id (`io::TAG_XATTR`), and
//! "is `name` in `dir` the object `id`?" is a lookup and a tag read. That makes every apply
//! idempotent, like `journal::replay`'s redo, even when the target crashed at any point and
//! restarts from an older id → handle snapshot than its tree.
//!
//! Rules, and why:
//! - Names are single components and everything goes through `*at` calls on nodes, never
//!   following a symlink: nothing outside the directory can be touched (design §5).
//! - `Create` of a name that exists tagged as the new id is already done. Tagged otherwise,
//!   the tree is past the op (a later record replaced the name): skipped. *Untagged*, it is
//!   the object this very create made before a crash cut it off from its tag (the target is
//!   the only writer of its directory, and makes nothing it does not tag at once): adopted,
//!   with its owner and mode set again.
//! - `Create` of an absent name first asks whether the id exists elsewhere: made before a
//!   crash and moved by a later record. The root's *created mark* (`CREATED_MARK_XATTR`, the
//!   highest id ever made here, raised before each make) says when that question needs a
//!   look at all: above the mark, the id was never made. Below it, and missing from the
//!   map, one scan of the tree indexes every tag; after that the applier keeps the map and
//!   the directory locations complete itself, so it never scans twice.
//! - Link, unlink and rename follow `Redo::op_redo`, with tags for identity.
//! - Records never set or remove a `trusted.ferryfs.*` xattr: the primary's mount hides
//!   them, so such a record is not a user's change. It is skipped, with a reason, rather
//!   than refused: refusing would stop replication for something that changes nothing.
//! - Resync parks objects it has no name for in the *stash* (`STASH_NAME` in the root)
//!   instead of deleting them, so an object the primary moved elsewhere is found again with
//!   its data; `finish_resync` removes what nobody claimed. Resync expects a directory's
//!   entries before those of its subdirectories, and an object's `apply_node` after its
//!   data (and, for a directory, after its entries), so the times it sets stay.
//!
//! Costs: per record, the object is reopened from its handle and its tag read (one
//! getxattr) to check it; a make adds a tag and, when the id is new, the root's mark. The
//! scan reads every directory and every tag once, at most once per applier, and only after
//! a restart from a snapshot behind the tree (or during resync).
//!
//! Known limit: two distinct objects with one tag (a copy made by hand, xattrs included)
//! are one object to the applier, whichever it finds; the directory was changed by hand
//! and needs a resync, which keeps one of them.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;

use crate::format::codec::is_single_component;
use crate::format::ids::IdSnapshot;
use crate::format::ops::{NodeKind, Op, SetAttr, Timestamp};
use crate::io::{NewNode, Tree, is_private_xattr};
use crate::types::{FileId, Handle};

/// The directory in the target's root where resync parks objects until `finish_resync`.
pub const STASH_NAME: &[u8] = b".ferryfs-stash";
/// The stash's tag: never a primary's file id, so the stash is never taken for a user object.
pub const STASH_ID: FileId = FileId(u64::MAX);
/// xattr of the target's root: set id (16 bytes) ‖ the highest file id ever made (u64 LE).
pub const CREATED_MARK_XATTR: &[u8] = b"trusted.ferryfs.created";

/// What one apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The tree changed.
    Done,
    /// The effect was already there (applied before a crash, or applied twice).
    Already,
    /// Nothing to do, and why: the object is gone, or the tree is past this record.
    Skipped(&'static str),
}

#[derive(thiserror::Error, Debug)]
pub enum ApplyError {
    /// The target's disk failed. Stop applying, log it, retry later from the same record.
    #[error("the target directory failed while {what}: {source}; applying stops here and resumes on retry")]
    Io { what: String, source: io::Error },
    /// The directory does not hold what the log says it must (changed by hand?), or a
    /// record is one the applier refuses. Retrying will not help: resynchronize the target.
    #[error("the target directory does not match the log: {0}; resynchronize this target")]
    Diverged(String),
}

/// The wire's description of an object (one type on the wire, in staging and here).
pub use crate::proto::wire::control::NodeDesc;

type Res = Result<Applied, ApplyError>;

/// An object and the directory entry it was found by.
struct Found<N> {
    dir: N,
    name: Vec<u8>,
    node: N,
}

/// Applies records and resync descriptions to one target directory.
pub struct Applier<T: Tree> {
    tree: T,
    set_id: [u8; 16],
    /// Primary id → target handle: the caller's snapshot, then every object found or made.
    ids: HashMap<FileId, Handle>,
    next_file_id: FileId,
    /// Primary id → where it was last seen: (handle of its directory, name). Needed to move
    /// a directory (rename wants its name) and to find an object the map lacks.
    hints: HashMap<FileId, (Handle, Vec<u8>)>,
    /// `CREATED_MARK_XATTR`, read on first need.
    created_mark: Option<u64>,
    /// Set once a scan indexed every tag: from then on an id missing from `ids` is gone.
    complete: bool,
    root_handle: Option<Handle>,
    /// The stash's handle while this applier knows it exists.
    stash: Option<Handle>,
    /// For stash names of untagged objects.
    untagged_count: u64,
}

impl<T: Tree> Applier<T> {
    /// `ids` is the target's last checkpoint; it may be behind the tree (records after it
    /// are applied again), which the tags make harmless.
    pub fn new(tree: T, set_id: [u8; 16], ids: IdSnapshot) -> Applier<T> {
        let entries = ids.entries.into_iter().filter(|(id, _)| is_object_id(*id));
        Applier {
            tree,
            set_id,
            ids: entries.collect(),
            next_file_id: ids.next_file_id,
            hints: HashMap::new(),
            created_mark: None,
            complete: false,
            root_handle: None,
            stash: None,
            untagged_count: 0,
        }
    }

    /// The id → handle map to persist at a checkpoint.
    pub fn snapshot(&self) -> IdSnapshot {
        let mut entries: Vec<_> = self.ids.iter().map(|(k, v)| (*k, v.clone())).collect();
        entries.sort();
        IdSnapshot { next_file_id: self.next_file_id, entries }
    }

    pub fn tree(&self) -> &T {
        &self.tree
    }

    /// A data write; a file that is gone (removed later in the log) is skipped.
    pub fn apply_write(&mut self, file: FileId, offset: u64, data: &[u8]) -> Res {
        check_id(file, "write")?;
        self.on(file, || format!("writing {} bytes at {offset} of {file}", data.len()), |t, n| t.write(n, offset, data))
    }

    /// One settled namespace or attribute op.
    pub fn apply_op(&mut self, op: &Op) -> Res {
        match op {
            Op::Create { parent, name, new_id, kind, mode, uid, gid, rdev, target } => {
                let new = NewNode { kind: *kind, mode: *mode, uid: *uid, gid: *gid, rdev: *rdev, target };
                self.create(*parent, name, *new_id, &new)
            }
            Op::Link { id, new_parent, new_name } => self.link(*id, *new_parent, new_name),
            Op::Unlink { parent, name, id, dir } => self.unlink(*parent, name, *id, *dir),
            Op::Rename { parent, name, new_parent, new_name, flags, id, replaced } => {
                self.rename(*parent, name, *new_parent, new_name, *flags, *id, *replaced)
            }
            Op::SetAttr { id, attr } => {
                check_id(*id, "setattr")?;
                self.on(*id, || format!("setting attributes of {id}"), |t, n| t.set_attr(n, attr))
            }
            Op::SetXattr { id, name, value, flags: _ } => self.set_xattr(*id, name, value),
            Op::RemoveXattr { id, name } => self.remove_xattr(*id, name),
            Op::Fallocate { id, mode, offset, len } => {
                check_id(*id, "fallocate")?;
                self.on(*id, || format!("fallocate of {id}"), |t, n| t.fallocate(n, *mode, *offset, *len))
            }
        }
    }

    // ---- ops ----

    fn create(&mut self, parent: FileId, name: &[u8], new_id: FileId, new: &NewNode<'_>) -> Res {
        check_name(name)?;
        check_id(parent, "create's parent")?;
        check_child_id(new_id)?;
        let Some(dir) = self.node(parent)? else { return Ok(Applied::Skipped("parent unknown")) };
        if let Some(found) = self.lookup(&dir, name, || format!("looking up {parent}/{}", show(name)))? {
            return self.create_found(&dir, name, new_id, new, found);
        }
        if self.node(new_id)?.is_some() {
            // Made before a crash and moved by a later record, which will move it again.
            return Ok(Applied::Already);
        }
        tracing::trace!(
            "create {new_id}: not found (complete {}, created mark {:?}, ids {})",
            self.complete,
            self.created_mark,
            self.ids.len()
        );
        self.make(&dir, name, new_id, new)?;
        Ok(Applied::Done)
    }

    /// `Create` of a name that exists (see the module's rules).
    fn create_found(&mut self, dir: &T::Node, name: &[u8], id: FileId, new: &NewNode<'_>, found: T::Node) -> Res {
        match self.tag_of(&found)? {
            Some(tag) if tag == id => {
                self.bind_node(id, &found)?;
                self.remember(id, dir, name)?;
                Ok(Applied::Already)
            }
            Some(_) => Ok(Applied::Skipped("name taken by another object")),
            None if self.kind_of(&found)? != new.kind => Ok(Applied::Skipped("name taken by an untagged object")),
            None if self.node(id)?.is_some() => Ok(Applied::Skipped("name taken by an untagged object")),
            None => {
                let attr =
                    SetAttr { mode: Some(new.mode), uid: Some(new.uid), gid: Some(new.gid), ..SetAttr::default() };
                let what = || format!("adopting {} as {id}", show(name));
                self.tree.set_attr(&found, &attr).map_err(on_err(what))?;
                self.tag_new(&found, id)?;
                self.remember(id, dir, name)?;
                Ok(Applied::Done)
            }
        }
    }

    fn link(&mut self, id: FileId, new_parent: FileId, new_name: &[u8]) -> Res {
        check_name(new_name)?;
        check_id(id, "link")?;
        check_id(new_parent, "link's parent")?;
        let Some(dir) = self.node(new_parent)? else { return Ok(Applied::Skipped("parent unknown")) };
        let what = || format!("looking up {new_parent}/{}", show(new_name));
        if let Some(found) = self.lookup(&dir, new_name, what)? {
            if self.tag_of(&found)? != Some(id) {
                return Ok(Applied::Skipped("name taken by another object"));
            }
            self.bind_node(id, &found)?;
            return Ok(Applied::Already);
        }
        let Some(node) = self.node(id)? else { return Ok(Applied::Skipped("unknown id")) };
        let what = || format!("linking {id} as {new_parent}/{}", show(new_name));
        self.tree.link(&node, &dir, new_name).map_err(on_err(what))?;
        self.remember(id, &dir, new_name)?;
        Ok(Applied::Done)
    }

    fn unlink(&mut self, parent: FileId, name: &[u8], id: FileId, is_dir: bool) -> Res {
        check_name(name)?;
        check_id(parent, "unlink's parent")?;
        let Some(dir) = self.node(parent)? else { return Ok(Applied::Skipped("parent unknown")) };
        if !self.names(&dir, parent, name, id)? {
            return Ok(Applied::Already);
        }
        let what = || format!("removing {parent}/{} ({id})", show(name));
        self.tree.unlink(&dir, name, is_dir).map_err(on_err(what))?;
        self.hints.remove(&id);
        Ok(Applied::Done)
    }

    #[allow(clippy::too_many_arguments)] // the fields of `Op::Rename`
    fn rename(
        &mut self,
        parent: FileId,
        name: &[u8],
        new_parent: FileId,
        new_name: &[u8],
        flags: u32,
        id: FileId,
        replaced: FileId,
    ) -> Res {
        check_name(name)?;
        check_name(new_name)?;
        check_id(parent, "rename's parent")?;
        check_id(new_parent, "rename's new parent")?;
        let (Some(from), Some(to)) = (self.node(parent)?, self.node(new_parent)?) else {
            return Ok(Applied::Skipped("parent unknown"));
        };
        if !self.names(&from, parent, name, id)? {
            return Ok(Applied::Already);
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if !exchange && self.names(&to, new_parent, new_name, id)? {
            // Both names are links to the object here. On the primary the new name was free
            // (or another object's): a resync read the new name's directory after this rename
            // and the old one's before it, so it made both names (found by the two-targets
            // replication test). The primary's rename took the old name away: so does this.
            // (Were they links to one object there too, `replaced` is `id` and the rename did
            // nothing.)
            if replaced == id {
                return Ok(Applied::Already);
            }
            let old = self.lookup(&from, name, || format!("looking up {parent}/{}", show(name)))?;
            let is_dir = match old {
                Some(n) => self.kind_of(&n)? == NodeKind::Dir,
                None => false,
            };
            let what = || format!("removing {parent}/{} (renamed to {new_parent}/{})", show(name), show(new_name));
            self.tree.unlink(&from, name, is_dir).map_err(on_err(what))?;
            self.remember(id, &to, new_name)?;
            return Ok(Applied::Done);
        }
        let target_ok = if self.exists(&to, new_parent, new_name)? {
            !noreplace && replaced != FileId::NONE && self.names(&to, new_parent, new_name, replaced)?
        } else {
            !exchange
        };
        if !target_ok {
            return Ok(Applied::Skipped("the new name is not what it was on the primary"));
        }
        let what = || format!("renaming {parent}/{} to {new_parent}/{}", show(name), show(new_name));
        self.tree.rename(&from, name, &to, new_name, flags).map_err(on_err(what))?;
        self.remember(id, &to, new_name)?;
        if exchange {
            self.remember(replaced, &from, name)?;
        } else {
            self.hints.remove(&replaced);
        }
        Ok(Applied::Done)
    }

    fn set_xattr(&mut self, id: FileId, name: &[u8], value: &[u8]) -> Res {
        check_id(id, "setxattr")?;
        if is_private_xattr(name) {
            return Ok(Applied::Skipped("private xattr"));
        }
        // XATTR_CREATE/REPLACE held on the primary; here the value is set either way.
        self.on(id, || format!("setting xattr {} of {id}", show(name)), |t, n| t.set_xattr(n, name, value, 0))
    }

    fn remove_xattr(&mut self, id: FileId, name: &[u8]) -> Res {
        check_id(id, "removexattr")?;
        if is_private_xattr(name) {
            return Ok(Applied::Skipped("private xattr"));
        }
        self.on(id, || format!("removing xattr {} of {id}", show(name)), |t, n| absent_ok(t.remove_xattr(n, name)))
    }

    /// Applies `f` to the object `id`; an object the target does not have is skipped.
    fn on(&mut self, id: FileId, what: impl FnOnce() -> String, f: impl FnOnce(&T, &T::Node) -> io::Result<()>) -> Res {
        let Some(node) = self.node(id)? else { return Ok(Applied::Skipped("unknown id")) };
        f(&self.tree, &node).map_err(on_err(what))?;
        Ok(Applied::Done)
    }

    // ---- resync ----

    /// Makes directory `dir` hold exactly `entries`, each name the object with that id:
    /// found by its tag where it is, taken from elsewhere (hard link, or rename for a
    /// directory), or made from its description. Names that do not belong go to the stash.
    /// Call it for a directory before the entries of its subdirectories.
    pub fn apply_entries(&mut self, dir: FileId, entries: &[(Vec<u8>, NodeDesc)]) -> Res {
        check_id(dir, "resync directory")?;
        check_entries(dir, entries)?;
        let Some(dnode) = self.node(dir)? else { return Ok(Applied::Skipped("unknown id")) };
        if self.kind_of(&dnode)? != NodeKind::Dir {
            return Err(ApplyError::Diverged(format!("{dir} is not a directory here")));
        }
        let mut changed = self.stash_extras(dir, &dnode, entries)?;
        for (name, desc) in entries {
            changed |= self.place(&dnode, dir, name, desc)?;
        }
        Ok(if changed { Applied::Done } else { Applied::Already })
    }

    /// Sets one object's xattrs (the exact set, ferryfs's own aside), attributes, size and,
    /// last, its times (an xattr or a truncate would change them). Call it for a directory
    /// after its entries.
    pub fn apply_node(&mut self, desc: &NodeDesc) -> Res {
        let id = FileId(desc.id);
        check_id(id, "resync node")?;
        let kind = desc_kind(desc)?;
        let Some(node) = self.node(id)? else { return Ok(Applied::Skipped("unknown id")) };
        let have = self.kind_of(&node)?;
        if have != kind {
            return Err(ApplyError::Diverged(format!("{id} is a {have:?} here, a {kind:?} on the primary")));
        }
        self.sync_xattrs(&node, id, &desc.xattrs)?;
        let attr = SetAttr {
            mode: Some(desc.mode & 0o7777),
            uid: Some(desc.uid),
            gid: Some(desc.gid),
            size: (kind == NodeKind::File).then_some(desc.size),
            atime: Some(Timestamp { secs: desc.atime.0, nanos: desc.atime.1 }),
            mtime: Some(Timestamp { secs: desc.mtime.0, nanos: desc.mtime.1 }),
        };
        self.tree.set_attr(&node, &attr).map_err(on_err(|| format!("setting attributes of {id}")))?;
        Ok(Applied::Done)
    }

    /// Ends a resync: removes the stash and everything still in it (nothing claimed it),
    /// name by name, never following a symlink.
    pub fn finish_resync(&mut self) -> Result<(), ApplyError> {
        self.stash = None;
        let root = self.root()?;
        let Some(stash) = self.lookup(&root, STASH_NAME, || "looking up the stash".into())? else { return Ok(()) };
        if !matches!(self.tag_of(&stash)?, None | Some(STASH_ID)) {
            return Ok(()); // A primary's object of that name (refused by resync): not ours.
        }
        self.remove_tree(root, STASH_NAME).map_err(on_err(|| "removing the stash".into()))
    }

    /// Stashes every name of `dnode` that `entries` does not list.
    fn stash_extras(
        &mut self,
        dir: FileId,
        dnode: &T::Node,
        entries: &[(Vec<u8>, NodeDesc)],
    ) -> Result<bool, ApplyError> {
        let wanted: HashSet<&[u8]> = entries.iter().map(|(n, _)| n.as_slice()).collect();
        let names = self.tree.read_dir(dnode).map_err(on_err(|| format!("listing {dir}")))?;
        let mut changed = false;
        for name in names {
            if wanted.contains(name.as_slice()) || (dir == FileId::ROOT && name == STASH_NAME) {
                continue;
            }
            self.stash_name(dnode, &name)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Puts the object `desc` at `name` in `dnode`; true when anything changed.
    fn place(&mut self, dnode: &T::Node, dir: FileId, name: &[u8], desc: &NodeDesc) -> Result<bool, ApplyError> {
        let id = FileId(desc.id);
        if let Some(found) = self.lookup(dnode, name, || format!("looking up {dir}/{}", show(name)))? {
            if self.tag_of(&found)? == Some(id) {
                self.bind_node(id, &found)?;
                self.remember(id, dnode, name)?;
                return Ok(false);
            }
            self.stash_name(dnode, name)?;
        }
        let kind = desc_kind(desc)?;
        match self.node(id)? {
            Some(found) => self.move_into(&found, id, kind, dnode, name)?,
            None => {
                let new = NewNode {
                    kind,
                    mode: desc.mode & 0o7777,
                    uid: desc.uid,
                    gid: desc.gid,
                    rdev: desc.rdev,
                    target: &desc.target,
                };
                self.make(dnode, name, id, &new)?;
            }
        }
        Ok(true)
    }

    /// Gives the existing object `id` the name `name` in `dnode`: a new hard link, or for a
    /// directory (which has one name) a rename from where it is.
    fn move_into(
        &mut self,
        found: &T::Node,
        id: FileId,
        kind: NodeKind,
        dnode: &T::Node,
        name: &[u8],
    ) -> Result<(), ApplyError> {
        let have = self.kind_of(found)?;
        if have != kind {
            return Err(ApplyError::Diverged(format!("{id} is a {have:?} here, a {kind:?} on the primary")));
        }
        let what = || format!("moving {id} to {}", show(name));
        if kind != NodeKind::Dir {
            self.tree.link(found, dnode, name).map_err(on_err(what))?;
        } else {
            let Some(from) = self.locate(id)? else {
                return Err(ApplyError::Diverged(format!("directory {id} exists, but not in any directory")));
            };
            self.tree.rename(&from.dir, &from.name, dnode, name, libc::RENAME_NOREPLACE).map_err(on_err(what))?;
        }
        self.remember(id, dnode, name)
    }

    /// Moves `name` in `dnode` into the stash, under its id in hex (so it is found again)
    /// or, untagged, a counter. Another name of a file already in the stash is just removed.
    fn stash_name(&mut self, dnode: &T::Node, name: &[u8]) -> Result<(), ApplyError> {
        let stash = self.stash_dir()?;
        let what = || format!("moving {} into the stash", show(name));
        let found = self.tree.lookup(dnode, name).map_err(on_err(what))?;
        let tag = self.tag_of(&found)?.filter(|id| is_object_id(*id));
        let mut stashed = match tag {
            Some(id) => format!("{:016x}", id.0).into_bytes(),
            None => self.untagged_name(),
        };
        loop {
            match self.tree.rename(dnode, name, &stash, &stashed, libc::RENAME_NOREPLACE) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    if tag.is_some() && self.is_other_name_of(&stash, &stashed, &found)? {
                        return self.tree.unlink(dnode, name, false).map_err(on_err(what));
                    }
                    stashed = self.untagged_name();
                }
                Err(e) => return Err(on_err(what)(e)),
            }
        }
        match tag {
            Some(id) => self.remember(id, &stash, &stashed),
            None => Ok(()),
        }
    }

    /// True when `stashed` in the stash is another name of the file `found`: dropping this
    /// name then loses nothing.
    fn is_other_name_of(&self, stash: &T::Node, stashed: &[u8], found: &T::Node) -> Result<bool, ApplyError> {
        if self.kind_of(found)? == NodeKind::Dir {
            return Ok(false);
        }
        let Some(there) = self.lookup(stash, stashed, || "looking into the stash".into())? else { return Ok(false) };
        let what = || "comparing handles in the stash".to_string();
        Ok(self.tree.handle_of(&there).map_err(on_err(what))? == self.tree.handle_of(found).map_err(on_err(what))?)
    }

    fn untagged_name(&mut self) -> Vec<u8> {
        self.untagged_count += 1;
        format!("untagged-{}", self.untagged_count).into_bytes()
    }

    /// The stash directory, made (mode 0700, tagged `STASH_ID`) when missing.
    fn stash_dir(&mut self) -> Result<T::Node, ApplyError> {
        if let Some(h) = &self.stash
            && let Ok(node) = self.tree.open_handle(h)
        {
            return Ok(node);
        }
        let root = self.root()?;
        let what = || "making the stash".to_string();
        let stash = match self.lookup(&root, STASH_NAME, what)? {
            Some(node) => self.adopt_stash(node)?,
            None => {
                let new = NewNode { kind: NodeKind::Dir, mode: 0o700, uid: 0, gid: 0, rdev: 0, target: b"" };
                let node = self.tree.create(&root, STASH_NAME, &new).map_err(on_err(what))?;
                self.tree.set_tag(&node, &self.set_id, STASH_ID).map_err(on_err(what))?;
                node
            }
        };
        self.stash = Some(self.tree.handle_of(&stash).map_err(on_err(what))?);
        Ok(stash)
    }

    /// An existing `STASH_NAME`: the stash of an interrupted resync (untagged when the
    /// crash came before its tag), or a primary's object, which resync refuses to hide.
    fn adopt_stash(&mut self, node: T::Node) -> Result<T::Node, ApplyError> {
        match self.tag_of(&node)? {
            Some(STASH_ID) => Ok(node),
            None if self.kind_of(&node)? == NodeKind::Dir => {
                self.tree.set_tag(&node, &self.set_id, STASH_ID).map_err(on_err(|| "tagging the stash".into()))?;
                Ok(node)
            }
            _ => Err(ApplyError::Diverged(format!(
                "the target's root holds {}, which is not ferryfs's stash; move it out of the directory",
                show(STASH_NAME)
            ))),
        }
    }

    /// Removes `name` in `dir` and everything under it: depth first, with an explicit
    /// stack (a deep tree cannot exhaust the thread's), unlinking names (a symlink is
    /// removed, never followed).
    fn remove_tree(&self, dir: T::Node, name: &[u8]) -> io::Result<()> {
        let mut stack = vec![(Arc::new(dir), name.to_vec())];
        while let Some((parent, name)) = stack.last().cloned() {
            let node = self.tree.lookup(&parent, &name)?;
            let is_dir = self.tree.kind(&node)? == NodeKind::Dir;
            let children = if is_dir { self.tree.read_dir(&node)? } else { Vec::new() };
            if children.is_empty() {
                self.tree.unlink(&parent, &name, is_dir)?;
                stack.pop();
            } else {
                // The directory stays below its children and is removed when it comes up
                // again, empty.
                let node = Arc::new(node);
                stack.extend(children.into_iter().map(|c| (node.clone(), c)));
            }
        }
        Ok(())
    }

    /// Makes the object's xattrs exactly `want` (ferryfs's own left alone).
    fn sync_xattrs(&mut self, node: &T::Node, id: FileId, want: &[(Vec<u8>, Vec<u8>)]) -> Result<(), ApplyError> {
        let what = || format!("setting the xattrs of {id}");
        let have = self.tree.list_xattrs(node).map_err(on_err(what))?;
        for name in have.iter().filter(|n| !is_private_xattr(n)) {
            if !want.iter().any(|(w, _)| w == name) {
                absent_ok(self.tree.remove_xattr(node, name)).map_err(on_err(what))?;
            }
        }
        for (name, value) in want.iter().filter(|(n, _)| !is_private_xattr(n)) {
            self.tree.set_xattr(node, name, value, 0).map_err(on_err(what))?;
        }
        Ok(())
    }

    // ---- identity ----

    /// The object `id`, checked by its tag; `None` when the target does not have it.
    fn node(&mut self, id: FileId) -> Result<Option<T::Node>, ApplyError> {
        if id == FileId::ROOT {
            return self.root().map(Some);
        }
        if let Some(node) = self.by_handle(id)? {
            return Ok(Some(node));
        }
        if let Some(found) = self.by_hint(id)? {
            return Ok(Some(found.node));
        }
        if !self.may_exist_unindexed(id)? {
            return Ok(None);
        }
        self.scan()?;
        self.by_handle(id)
    }

    /// Where the object `id` is: its directory and name (from the hints, after a scan if
    /// they may be incomplete).
    fn locate(&mut self, id: FileId) -> Result<Option<Found<T::Node>>, ApplyError> {
        if let Some(found) = self.by_hint(id)? {
            return Ok(Some(found));
        }
        if !self.may_exist_unindexed(id)? {
            return Ok(None);
        }
        self.scan()?;
        self.by_hint(id)
    }

    /// True when `id` may exist without the map or the hints knowing it: no scan yet, and
    /// the created mark says it may have been made.
    fn may_exist_unindexed(&mut self, id: FileId) -> Result<bool, ApplyError> {
        Ok(!self.complete && id.0 <= self.created_mark()?)
    }

    fn by_handle(&mut self, id: FileId) -> Result<Option<T::Node>, ApplyError> {
        let Some(h) = self.ids.get(&id) else { return Ok(None) };
        let node = match self.tree.open_handle(h) {
            Ok(node) => node,
            Err(e) if is_gone(&e) => {
                self.ids.remove(&id);
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                // Seen on this kernel for handles of objects moved and removed under load:
                // the handle is no way in, but the object may still exist. Tags keep the
                // search safe: look again by name (hints) or by a scan.
                tracing::debug!("opening {id} by handle: {e}; searching for it instead");
                self.ids.remove(&id);
                self.complete = false;
                return Ok(None);
            }
            Err(e) => return Err(on_err(|| format!("opening {id}"))(e)),
        };
        if self.tag_of(&node)? != Some(id) {
            self.ids.remove(&id);
            return Ok(None);
        }
        Ok(Some(node))
    }

    /// The object `id` where its hint says, with that directory and name.
    fn by_hint(&mut self, id: FileId) -> Result<Option<Found<T::Node>>, ApplyError> {
        let Some((dir_handle, name)) = self.hints.get(&id).cloned() else { return Ok(None) };
        let found = match self.tree.open_handle(&dir_handle) {
            Ok(dir) => match self.tree.lookup(&dir, &name) {
                Ok(node) => Some((dir, node)),
                Err(e) if is_gone(&e) => None,
                Err(e) => return Err(on_err(|| format!("looking up {id}"))(e)),
            },
            Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::ENOMEM) => None,
            Err(e) => return Err(on_err(|| format!("looking up {id}"))(e)),
        };
        match found {
            Some((dir, node)) if self.tag_of(&node)? == Some(id) => {
                self.bind_node(id, &node)?;
                Ok(Some(Found { dir, name, node }))
            }
            _ => {
                self.hints.remove(&id);
                Ok(None)
            }
        }
    }

    /// Indexes every object tagged by this set: handles, and where each directory is.
    /// Runs at most once per applier; the applier keeps both complete afterwards. Handles
    /// on the stack, not open nodes, so a wide tree cannot run out of descriptors.
    fn scan(&mut self) -> Result<(), ApplyError> {
        let what = || "scanning the target directory for tagged objects".to_string();
        let mut stack = vec![self.root_handle()?];
        while let Some(dir_handle) = stack.pop() {
            let dir = self.tree.open_handle(&dir_handle).map_err(on_err(what))?;
            for name in self.tree.read_dir(&dir).map_err(on_err(what))? {
                let child = match self.tree.lookup(&dir, &name) {
                    Ok(child) => child,
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(on_err(what)(e)),
                };
                let is_dir = self.kind_of(&child)? == NodeKind::Dir;
                let tag = self.tag_of(&child)?.filter(|id| is_object_id(*id));
                if !is_dir && tag.is_none() {
                    continue;
                }
                let handle = match self.tree.handle_of(&child) {
                    Ok(h) => h,
                    // Another filesystem mounted inside: nothing there is ours.
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => continue,
                    Err(e) => return Err(on_err(what)(e)),
                };
                if let Some(id) = tag {
                    self.bind(id, handle.clone());
                    if is_dir {
                        self.hints.insert(id, (dir_handle.clone(), name));
                    }
                }
                if is_dir {
                    stack.push(handle);
                }
            }
        }
        self.complete = true;
        Ok(())
    }

    /// Makes `name` in `dir` as `id`, tagged; the created mark is raised first, so a crash
    /// anywhere here leaves nothing the mark does not cover.
    fn make(&mut self, dir: &T::Node, name: &[u8], id: FileId, new: &NewNode<'_>) -> Result<(), ApplyError> {
        self.raise_created_mark(id)?;
        let what = || format!("creating {} as {id}", show(name));
        let node = self.tree.create(dir, name, new).map_err(on_err(what))?;
        self.tag_new(&node, id)?;
        self.remember(id, dir, name)
    }

    /// Tags an object this applier made or adopted as `id` and binds it.
    fn tag_new(&mut self, node: &T::Node, id: FileId) -> Result<(), ApplyError> {
        self.raise_created_mark(id)?;
        self.tree.set_tag(node, &self.set_id, id).map_err(on_err(|| format!("tagging {id}")))?;
        self.bind_node(id, node)
    }

    fn created_mark(&mut self) -> Result<u64, ApplyError> {
        if let Some(mark) = self.created_mark {
            return Ok(mark);
        }
        let root = self.root()?;
        let mark = match self.tree.get_xattr(&root, CREATED_MARK_XATTR) {
            Ok(v) if v.len() == 24 && v[..16] == self.set_id[..] => u64::from_le_bytes(v[16..].try_into().unwrap()),
            Ok(_) => 0,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => 0,
            Err(e) => return Err(on_err(|| "reading the created mark".into())(e)),
        };
        self.created_mark = Some(mark);
        Ok(mark)
    }

    fn raise_created_mark(&mut self, id: FileId) -> Result<(), ApplyError> {
        if id.0 <= self.created_mark()? {
            return Ok(());
        }
        let mut value = [0u8; 24];
        value[..16].copy_from_slice(&self.set_id);
        value[16..].copy_from_slice(&id.0.to_le_bytes());
        let root = self.root()?;
        let what = || "raising the created mark".to_string();
        self.tree.set_xattr(&root, CREATED_MARK_XATTR, &value, 0).map_err(on_err(what))?;
        self.created_mark = Some(id.0);
        Ok(())
    }

    /// True when `name` in `dir` is the object `id`.
    fn names(&self, dir: &T::Node, dir_id: FileId, name: &[u8], id: FileId) -> Result<bool, ApplyError> {
        let Some(node) = self.lookup(dir, name, || format!("looking up {dir_id}/{}", show(name)))? else {
            return Ok(false);
        };
        Ok(self.tag_of(&node)? == Some(id))
    }

    fn exists(&self, dir: &T::Node, dir_id: FileId, name: &[u8]) -> Result<bool, ApplyError> {
        Ok(self.lookup(dir, name, || format!("looking up {dir_id}/{}", show(name)))?.is_some())
    }

    /// `name` in `dir`, `None` when absent. A `dir` that is not a directory is an error.
    fn lookup(&self, dir: &T::Node, name: &[u8], what: impl FnOnce() -> String) -> Result<Option<T::Node>, ApplyError> {
        match self.tree.lookup(dir, name) {
            Ok(node) => Ok(Some(node)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(on_err(what)(e)),
        }
    }

    fn tag_of(&self, node: &T::Node) -> Result<Option<FileId>, ApplyError> {
        self.tree.tag(node, &self.set_id).map_err(on_err(|| "reading a tag".into()))
    }

    fn kind_of(&self, node: &T::Node) -> Result<NodeKind, ApplyError> {
        self.tree.kind(node).map_err(on_err(|| "reading an object's type".into()))
    }

    fn root(&self) -> Result<T::Node, ApplyError> {
        self.tree.root().map_err(on_err(|| "opening the target directory".into()))
    }

    fn root_handle(&mut self) -> Result<Handle, ApplyError> {
        if let Some(h) = &self.root_handle {
            return Ok(h.clone());
        }
        let h = self.tree.handle_of(&self.root()?).map_err(on_err(|| "reading the root's handle".into()))?;
        self.root_handle = Some(h.clone());
        Ok(h)
    }

    /// Notes that `id` is `name` in `dir` (see `hints`).
    fn remember(&mut self, id: FileId, dir: &T::Node, name: &[u8]) -> Result<(), ApplyError> {
        let h = self.tree.handle_of(dir).map_err(on_err(|| format!("reading the handle of {id}'s directory")))?;
        self.hints.insert(id, (h, name.to_vec()));
        Ok(())
    }

    fn bind_node(&mut self, id: FileId, node: &T::Node) -> Result<(), ApplyError> {
        let h = self.tree.handle_of(node).map_err(on_err(|| format!("reading the handle of {id}")))?;
        self.bind(id, h);
        Ok(())
    }

    fn bind(&mut self, id: FileId, h: Handle) {
        self.ids.insert(id, h);
        if id.0 >= self.next_file_id.0 {
            self.next_file_id = FileId(id.0 + 1);
        }
    }
}

// ---- checks and errors ----

/// Ids a record may name as an object: not "none", not the stash.
fn is_object_id(id: FileId) -> bool {
    id != FileId::NONE && id != STASH_ID
}

fn check_id(id: FileId, what: &str) -> Result<(), ApplyError> {
    if is_object_id(id) { Ok(()) } else { Err(ApplyError::Diverged(format!("refused id {} in a {what}", id.0))) }
}

/// An object that gets a name: any object id but the root's.
fn check_child_id(id: FileId) -> Result<(), ApplyError> {
    check_id(id, "new name")?;
    if id == FileId::ROOT {
        return Err(ApplyError::Diverged("refused id 1 (the root) as a new object".into()));
    }
    Ok(())
}

/// Records and entry lists name single components only; the decoder refuses others
/// already, and this checks again so nothing can ever walk out of the directory.
fn check_name(name: &[u8]) -> Result<(), ApplyError> {
    if is_single_component(name) { Ok(()) } else { Err(ApplyError::Diverged(format!("refused name {}", show(name)))) }
}

fn check_entries(dir: FileId, entries: &[(Vec<u8>, NodeDesc)]) -> Result<(), ApplyError> {
    let mut seen = HashSet::new();
    for (name, desc) in entries {
        check_name(name)?;
        check_child_id(FileId(desc.id))?;
        desc_kind(desc)?;
        if !seen.insert(name.as_slice()) {
            return Err(ApplyError::Diverged(format!("the entries of {dir} list {} twice", show(name))));
        }
        if dir == FileId::ROOT && name == STASH_NAME {
            return Err(stash_name_taken());
        }
    }
    Ok(())
}

fn stash_name_taken() -> ApplyError {
    ApplyError::Diverged(format!(
        "the primary's root holds {}, a name the target reserves for resync; rename it on the primary",
        show(STASH_NAME)
    ))
}

fn desc_kind(desc: &NodeDesc) -> Result<NodeKind, ApplyError> {
    NodeKind::from_u8(desc.kind)
        .ok_or_else(|| ApplyError::Diverged(format!("refused node kind {} of #{}", desc.kind, desc.id)))
}

/// An `ENODATA` answer to removing an xattr: already removed.
fn absent_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r,
    }
}

/// Errors that mean "this object is not there (any more)".
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::EINVAL))
}

/// Turns a failed call into `Diverged` when the errno says the tree is not as the log
/// expects (retrying cannot help), and into `Io` otherwise (a disk, space or permission
/// problem that a retry later may get past).
fn on_err(what: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> ApplyError {
    move |e| match e.raw_os_error() {
        Some(
            libc::ENOENT
            | libc::ESTALE
            | libc::EEXIST
            | libc::ENOTEMPTY
            | libc::EISDIR
            | libc::ENOTDIR
            | libc::EINVAL
            | libc::ELOOP
            | libc::EPERM,
        ) => ApplyError::Diverged(format!("{}: {e}", what())),
        _ => ApplyError::Io { what: what(), source: e },
    }
}

fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}
