//! Tests of the applier. Each body runs on the simulated tree and on the real one (a temp
//! directory; run as root, on a filesystem with file handles and user/trusted xattrs).

use std::collections::BTreeMap;
use std::io::Read;

use super::apply::{Applied, Applier, ApplyError, NodeDesc, STASH_NAME};
use crate::format::ids::IdSnapshot;
use crate::format::ops::{NodeKind, Op, SetAttr, Timestamp};
use crate::io::{Tree, is_private_xattr};
use crate::os::tree::{self as ostree, OsTree};
use crate::sim::tree::SimTree;
use crate::types::FileId;

const SET: [u8; 16] = *b"replica-test-set";

/// What the tests need of a tree beyond the `Tree` seam: a fresh one, the same one again
/// (a restarted target), and what an object holds.
trait Backend: Tree + Sized {
    fn fresh() -> (Self, Option<tempfile::TempDir>);
    fn again(&self, dir: &Option<tempfile::TempDir>) -> Self;
    /// A file's bytes or a symlink's target; empty for anything else.
    fn content(&self, node: &Self::Node) -> Vec<u8>;
    /// (uid, gid, permission bits), the bits as 0 for a symlink (fixed on Linux).
    fn owner_mode(&self, node: &Self::Node) -> (u32, u32, u32);
    /// The modification time, where the backend keeps one.
    fn mtime(&self, node: &Self::Node) -> Option<(i64, u32)>;
}

impl Backend for SimTree {
    fn fresh() -> (Self, Option<tempfile::TempDir>) {
        (SimTree::new(), None)
    }
    fn again(&self, _: &Option<tempfile::TempDir>) -> Self {
        self.clone()
    }
    fn content(&self, node: &Self::Node) -> Vec<u8> {
        let i = self.inode(node).unwrap();
        if i.kind == NodeKind::Symlink { i.target } else { i.data }
    }
    fn owner_mode(&self, node: &Self::Node) -> (u32, u32, u32) {
        let i = self.inode(node).unwrap();
        (i.uid, i.gid, if i.kind == NodeKind::Symlink { 0 } else { i.mode & 0o7777 })
    }
    fn mtime(&self, _: &Self::Node) -> Option<(i64, u32)> {
        None
    }
}

impl Backend for OsTree {
    fn fresh() -> (Self, Option<tempfile::TempDir>) {
        let dir = tempfile::tempdir().unwrap();
        (OsTree::open(dir.path()).unwrap(), Some(dir))
    }
    fn again(&self, dir: &Option<tempfile::TempDir>) -> Self {
        OsTree::open(dir.as_ref().unwrap().path()).unwrap()
    }
    fn content(&self, node: &Self::Node) -> Vec<u8> {
        match self.kind(node).unwrap() {
            NodeKind::Symlink => ostree::read_link(node).unwrap(),
            NodeKind::File => {
                let mut out = Vec::new();
                std::fs::File::from(ostree::reopen(node, libc::O_RDONLY).unwrap()).read_to_end(&mut out).unwrap();
                out
            }
            _ => Vec::new(),
        }
    }
    fn owner_mode(&self, node: &Self::Node) -> (u32, u32, u32) {
        let st = ostree::stat(node).unwrap();
        let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        (st.st_uid, st.st_gid, if symlink { 0 } else { st.st_mode & 0o7777 })
    }
    fn mtime(&self, node: &Self::Node) -> Option<(i64, u32)> {
        let st = ostree::stat(node).unwrap();
        Some((st.st_mtime, st.st_mtime_nsec as u32))
    }
}

/// One object as the comparisons see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Obj {
    kind: NodeKind,
    tag: Option<u64>,
    owner_mode: (u32, u32, u32),
    content: Vec<u8>,
    /// Users' xattrs, sorted.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The first path (in listing order) of the same object: hard links show here.
    same_as: Option<String>,
}

type Listing = BTreeMap<String, Obj>;

/// The whole tree, through the seam (so every lookup is the applier's own kind of call).
fn listing<T: Backend>(tree: &T) -> Listing {
    let mut out = Listing::new();
    let mut seen: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut stack = vec![(tree.root().unwrap(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut names = tree.read_dir(&dir).unwrap();
        names.sort();
        for name in names {
            let node = tree.lookup(&dir, &name).unwrap();
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&name));
            let handle = tree.handle_of(&node).unwrap().0;
            let obj = describe(tree, &node, seen.get(&handle).cloned());
            seen.entry(handle).or_insert_with(|| path.clone());
            if obj.kind == NodeKind::Dir {
                stack.push((node, path.clone()));
            }
            out.insert(path, obj);
        }
    }
    out
}

fn describe<T: Backend>(tree: &T, node: &T::Node, same_as: Option<String>) -> Obj {
    let mut xattrs: Vec<_> = tree
        .list_xattrs(node)
        .unwrap()
        .into_iter()
        .filter(|n| !is_private_xattr(n) && !n.starts_with(b"security."))
        .map(|n| (n.clone(), tree.get_xattr(node, &n).unwrap()))
        .collect();
    xattrs.sort();
    Obj {
        kind: tree.kind(node).unwrap(),
        tag: tree.tag(node, &SET).unwrap().map(|id| id.0),
        owner_mode: tree.owner_mode(node),
        content: tree.content(node),
        xattrs,
        same_as,
    }
}

fn node_at<T: Tree>(tree: &T, path: &[&str]) -> T::Node {
    let mut node = tree.root().unwrap();
    for name in path {
        node = tree.lookup(&node, name.as_bytes()).unwrap();
    }
    node
}

// ---- the op sequence ----

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    Write(u64, u64, &'static [u8]),
}

fn create(parent: u64, name: &str, id: u64, kind: NodeKind, mode: u32, owner: u32) -> Step {
    let target = if kind == NodeKind::Symlink { b"d/f".to_vec() } else { Vec::new() };
    Step::Op(Op::Create {
        parent: FileId(parent),
        name: name.into(),
        new_id: FileId(id),
        kind,
        mode,
        uid: owner,
        gid: owner,
        rdev: 0,
        target,
    })
}

fn rename(parent: u64, name: &str, new_parent: u64, new_name: &str, flags: u32, id: u64, replaced: u64) -> Step {
    Step::Op(Op::Rename {
        parent: FileId(parent),
        name: name.into(),
        new_parent: FileId(new_parent),
        new_name: new_name.into(),
        flags,
        id: FileId(id),
        replaced: FileId(replaced),
    })
}

fn unlink(parent: u64, name: &str, id: u64, dir: bool) -> Step {
    Step::Op(Op::Unlink { parent: FileId(parent), name: name.into(), id: FileId(id), dir })
}

fn xattr(id: u64, name: &str, value: Option<&str>) -> Step {
    let (id, name) = (FileId(id), name.as_bytes().to_vec());
    Step::Op(match value {
        Some(v) => Op::SetXattr { id, name, value: v.into(), flags: 0 },
        None => Op::RemoveXattr { id, name },
    })
}

const MTIME: Timestamp = Timestamp { secs: 1_500_000_000, nanos: 123_456 };

/// Every kind of record: creates of each kind, writes, a hard link across directories,
/// renames across directories, over an existing name and of directories, an exchange,
/// unlink and rmdir, setattr with truncate and times, xattrs, fallocate, and records on
/// objects that are gone by then.
fn steps() -> Vec<Step> {
    use NodeKind::*;
    vec![
        create(1, "d", 10, Dir, 0o755, 0),
        create(10, "f", 11, File, 0o644, 1000),
        Step::Write(11, 0, b"hello world"),
        create(1, "s", 12, Symlink, 0o777, 0),
        create(10, "p", 13, Fifo, 0o600, 0),
        create(1, "e", 14, Dir, 0o700, 0),
        Step::Op(Op::Link { id: FileId(11), new_parent: FileId(14), new_name: b"f2".to_vec() }),
        create(14, "g", 15, File, 0o640, 0),
        Step::Write(15, 0, b"ggg"),
        rename(10, "f", 1, "f", 0, 11, 0),
        rename(1, "f", 14, "g", 0, 11, 15),
        Step::Write(15, 0, b"lost"),
        create(1, "x", 16, File, 0o644, 0),
        Step::Write(16, 0, b"xxxx"),
        rename(14, "g", 1, "x", libc::RENAME_EXCHANGE, 11, 16),
        xattr(11, "user.k", Some("v")),
        xattr(16, "user.a", Some("1")),
        xattr(16, "user.a", None),
        xattr(16, "user.b", Some("2")),
        Step::Op(Op::SetAttr {
            id: FileId(16),
            attr: SetAttr {
                mode: Some(0o600),
                uid: Some(7),
                gid: Some(8),
                size: Some(2),
                atime: None,
                mtime: Some(MTIME),
            },
        }),
        create(10, "sub", 17, Dir, 0o750, 0),
        create(17, "deep", 18, File, 0o644, 0),
        Step::Write(18, 0, b"deep"),
        rename(10, "sub", 1, "sub2", libc::RENAME_NOREPLACE, 17, 0),
        unlink(10, "p", 13, false),
        create(1, "gone", 19, Dir, 0o755, 0),
        unlink(1, "gone", 19, true),
        rename(1, "d", 14, "d", 0, 10, 0),
        Step::Op(Op::Fallocate { id: FileId(18), mode: 0, offset: 0, len: 8192 }),
        unlink(14, "f2", 11, false),
    ]
}

fn obj(kind: NodeKind, tag: u64, owner_mode: (u32, u32, u32), content: &[u8]) -> Obj {
    Obj { kind, tag: Some(tag), owner_mode, content: content.to_vec(), xattrs: vec![], same_as: None }
}

/// The tree `steps()` must leave.
fn expected() -> Listing {
    use NodeKind::*;
    let mut deep = b"deep".to_vec();
    deep.resize(8192, 0);
    let mut g = obj(File, 16, (7, 8, 0o600), b"xx");
    g.xattrs = vec![(b"user.b".to_vec(), b"2".to_vec())];
    let mut x = obj(File, 11, (1000, 1000, 0o644), b"hello world");
    x.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    BTreeMap::from([
        ("/e".to_string(), obj(Dir, 14, (0, 0, 0o700), b"")),
        ("/e/d".to_string(), obj(Dir, 10, (0, 0, 0o755), b"")),
        ("/e/g".to_string(), g),
        ("/s".to_string(), obj(Symlink, 12, (0, 0, 0), b"d/f")),
        ("/sub2".to_string(), obj(Dir, 17, (0, 0, 0o750), b"")),
        ("/sub2/deep".to_string(), obj(File, 18, (0, 0, 0o644), &deep)),
        ("/x".to_string(), x),
    ])
}

fn apply<T: Tree>(a: &mut Applier<T>, step: &Step) -> Applied {
    let r = match step {
        Step::Op(op) => a.apply_op(op),
        Step::Write(id, offset, data) => a.apply_write(FileId(*id), *offset, data),
    };
    r.unwrap_or_else(|e| panic!("{step:?}: {e}"))
}

fn is_namespace(step: &Step) -> bool {
    matches!(step, Step::Op(Op::Create { .. } | Op::Link { .. } | Op::Unlink { .. } | Op::Rename { .. }))
}

// ---- bodies ----

fn sequence_gives_the_expected_tree_and_applying_twice_changes_nothing<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    for step in steps() {
        apply(&mut a, &step);
    }
    assert_eq!(listing(a.tree()), expected());
    assert_eq!(a.tree().mtime(&node_at(a.tree(), &["e", "g"])).map_or(MTIME.secs, |t| t.0), MTIME.secs);
    let skipped = apply(&mut a, &Step::Write(15, 0, b"x"));
    assert_eq!(skipped, Applied::Skipped("unknown id"));
    // The whole log again, on the same applier: the tree passes through older states (the
    // records say so) and ends where it was.
    for step in steps() {
        apply(&mut a, &step);
    }
    assert_eq!(listing(a.tree()), expected());
}

/// A target that crashed after `k` records restarts from a snapshot taken before record
/// `j` and applies `j..`: for every k and j ≤ k, the tree ends as the log says. When record
/// `k` is a create, also with the crash between making the object and tagging it.
fn every_crash_point_and_stale_snapshot_converge<T: Backend>() {
    let steps = steps();
    let want = expected();
    for k in 0..=steps.len() {
        for j in 0..=k {
            for torn_create in [false, true] {
                if torn_create && !matches!(steps.get(k), Some(Step::Op(Op::Create { .. }))) {
                    continue;
                }
                let got = crash_and_resume::<T>(&steps, j, k, torn_create);
                assert_eq!(got, want, "crash after {k} records, snapshot before {j}, torn create {torn_create}");
            }
        }
    }
}

fn crash_and_resume<T: Backend>(steps: &[Step], j: usize, k: usize, torn_create: bool) -> Listing {
    let (tree, dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    let mut snapshot = IdSnapshot::default();
    for (i, step) in steps[..k].iter().enumerate() {
        if i == j {
            snapshot = a.snapshot();
        }
        apply(&mut a, step);
    }
    if j == k {
        snapshot = a.snapshot();
    }
    if torn_create && let Step::Op(Op::Create { parent, name, kind, rdev, target, .. }) = &steps[k] {
        // The object exists with a provisional owner and mode, and no tag.
        let parent = find(a.tree(), parent.0).expect("the parent exists");
        let new = crate::io::NewNode { kind: *kind, mode: 0, uid: 0, gid: 0, rdev: *rdev, target };
        a.tree().create(&parent, name, &new).unwrap();
    }
    let mut b = Applier::new(a.tree().again(&dir), SET, snapshot);
    drop(a);
    for step in &steps[j..] {
        apply(&mut b, step);
    }
    listing(b.tree())
}

/// The object tagged `id` (the root for 1), by walking the tree.
fn find<T: Tree>(tree: &T, id: u64) -> Option<T::Node> {
    if id == 1 {
        return Some(tree.root().unwrap());
    }
    let mut stack = vec![tree.root().unwrap()];
    while let Some(dir) = stack.pop() {
        for name in tree.read_dir(&dir).unwrap() {
            let node = tree.lookup(&dir, &name).unwrap();
            if tree.tag(&node, &SET).unwrap() == Some(FileId(id)) {
                return Some(node);
            }
            if tree.kind(&node).unwrap() == NodeKind::Dir {
                stack.push(node);
            }
        }
    }
    None
}

fn namespace_ops_applied_twice_report_already_or_skipped<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    for step in steps() {
        let first = apply(&mut a, &step);
        if is_namespace(&step) {
            assert_ne!(apply(&mut a, &step), Applied::Done, "{step:?} (first: {first:?})");
        }
    }
    assert_eq!(listing(a.tree()), expected());
}

fn untagged_leftover_of_a_create_is_adopted_with_its_exact_owner_and_mode<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let root = tree.root().unwrap();
    let new = crate::io::NewNode { kind: NodeKind::File, mode: 0, uid: 0, gid: 0, rdev: 0, target: b"" };
    tree.create(&root, b"f", &new).unwrap();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    assert_eq!(apply(&mut a, &create(1, "f", 5, NodeKind::File, 0o4755, 1000)), Applied::Done);
    let f = node_at(a.tree(), &["f"]);
    assert_eq!((a.tree().tag(&f, &SET).unwrap(), a.tree().owner_mode(&f)), (Some(FileId(5)), (1000, 1000, 0o4755)));
    assert_eq!(apply(&mut a, &create(1, "f", 5, NodeKind::File, 0o4755, 1000)), Applied::Already);
    // Untagged, but of another kind: not this create's object.
    a.tree().create(&root, b"fifo", &crate::io::NewNode { kind: NodeKind::Fifo, ..new }).unwrap();
    let r = apply(&mut a, &create(1, "fifo", 6, NodeKind::Dir, 0o755, 0));
    assert_eq!(r, Applied::Skipped("name taken by an untagged object"));
}

fn names_that_are_not_one_component_and_reserved_ids_are_refused<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    apply(&mut a, &create(1, "d", 10, NodeKind::Dir, 0o755, 0));
    let before = listing(a.tree());
    for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"a\0b"] {
        let ops = [
            Op::Create {
                parent: FileId(1),
                name: bad.to_vec(),
                new_id: FileId(20),
                kind: NodeKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: vec![],
            },
            Op::Link { id: FileId(10), new_parent: FileId(1), new_name: bad.to_vec() },
            Op::Unlink { parent: FileId(1), name: bad.to_vec(), id: FileId(10), dir: true },
            Op::Rename {
                parent: FileId(1),
                name: b"d".to_vec(),
                new_parent: FileId(1),
                new_name: bad.to_vec(),
                flags: 0,
                id: FileId(10),
                replaced: FileId(0),
            },
        ];
        for op in ops {
            assert_refused(a.apply_op(&op), "refused name", &op);
        }
        let entries = vec![(bad.to_vec(), desc(20, NodeKind::File))];
        assert_refused(a.apply_entries(FileId(1), &entries), "refused name", &bad);
    }
    for id in [0, u64::MAX] {
        assert_refused(a.apply_write(FileId(id), 0, b"x"), "refused id", &id);
        assert_refused(a.apply_op(&create(id, "n", 21, NodeKind::File, 0o644, 0).op()), "refused id", &id);
        assert_refused(a.apply_op(&create(1, "n", id, NodeKind::File, 0o644, 0).op()), "refused id", &id);
    }
    let entries = vec![(STASH_NAME.to_vec(), desc(20, NodeKind::Dir))];
    assert_refused(a.apply_entries(FileId(1), &entries), "reserves for resync", &"stash");
    assert_eq!(listing(a.tree()), before);
}

impl Step {
    fn op(self) -> Op {
        match self {
            Step::Op(op) => op,
            Step::Write(..) => panic!("not an op"),
        }
    }
}

fn assert_refused(r: Result<Applied, ApplyError>, want: &str, what: &dyn std::fmt::Debug) {
    match r {
        Err(ApplyError::Diverged(msg)) if msg.contains(want) => {}
        other => panic!("{what:?}: expected Diverged({want}…), got {other:?}"),
    }
}

fn private_xattrs_are_never_set_or_removed_for_a_record<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    apply(&mut a, &create(1, "f", 10, NodeKind::File, 0o644, 0));
    let id_xattr = crate::io::TAG_XATTR;
    let op = Op::SetXattr { id: FileId(10), name: id_xattr.to_vec(), value: vec![0; 24], flags: 0 };
    assert_eq!(a.apply_op(&op).unwrap(), Applied::Skipped("private xattr"));
    let op = Op::RemoveXattr { id: FileId(10), name: id_xattr.to_vec() };
    assert_eq!(a.apply_op(&op).unwrap(), Applied::Skipped("private xattr"));
    let f = node_at(a.tree(), &["f"]);
    assert_eq!(a.tree().tag(&f, &SET).unwrap(), Some(FileId(10)));
    // A tag of another replication set counts as none.
    assert_eq!(a.tree().tag(&f, b"another-set-id!!").unwrap(), None);
}

// ---- resync ----

fn desc(id: u64, kind: NodeKind) -> NodeDesc {
    let mode = if kind == NodeKind::Dir { 0o755 } else { 0o644 };
    NodeDesc {
        id,
        kind: kind as u8,
        mode,
        atime: (1_600_000_000, 1),
        mtime: (1_600_000_000 + id as i64, 7),
        ..NodeDesc::default()
    }
}

/// The primary's state for the resync tests:
/// `/a` (20, dir) ─ `moved` (24, dir) ─ `inner` (26, file "inner data")
///                └ `x` (25, file "new-x", user.new=2, 0o600 owned by 5:6)
/// `/h1`, `/h2` (21, one file "hh", two names), `/l` (22, symlink "a/x"), `/n` (23, file "nn").
/// A directory's entries as resync sends them.
type Entries = Vec<(Vec<u8>, NodeDesc)>;

struct Primary {
    /// Each directory's entries, top-down.
    dirs: Vec<(u64, Entries)>,
    /// File contents the target lacks.
    data: Vec<(u64, &'static [u8])>,
    /// Every object's attributes, directories after their entries.
    nodes: Vec<NodeDesc>,
}

fn primary() -> Primary {
    use NodeKind::*;
    let mut x = NodeDesc { size: 5, mode: 0o600, uid: 5, gid: 6, ..desc(25, File) };
    x.xattrs = vec![(b"user.new".to_vec(), b"2".to_vec())];
    let link = NodeDesc { target: b"a/x".to_vec(), mode: 0o777, ..desc(22, Symlink) };
    let h = NodeDesc { size: 2, ..desc(21, File) };
    let n = NodeDesc { size: 2, ..desc(23, File) };
    let inner = NodeDesc { size: 10, ..desc(26, File) };
    let e = |name: &str, d: &NodeDesc| (name.as_bytes().to_vec(), d.clone());
    let dirs = vec![
        (1, vec![e("a", &desc(20, Dir)), e("h1", &h), e("h2", &h), e("l", &link), e("n", &n)]),
        (20, vec![e("moved", &desc(24, Dir)), e("x", &x)]),
        (24, vec![e("inner", &inner)]),
    ];
    let data: Vec<(u64, &'static [u8])> = vec![(25, b"new-x"), (21, b"hh"), (23, b"nn")];
    let nodes = vec![x, link, h, n, inner, desc(24, Dir), desc(20, Dir)];
    Primary { dirs, data, nodes }
}

/// Sends the primary's state: entries top-down, then data, then attributes (directories
/// last, after their entries). `inner`'s data is not sent: resync sends only what changed,
/// and the target has it, in a directory that moved.
fn resync<T: Tree>(a: &mut Applier<T>, send_inner: bool) {
    let Primary { dirs, data, nodes } = primary();
    for (dir, entries) in &dirs {
        a.apply_entries(FileId(*dir), entries).unwrap();
    }
    for (id, bytes) in data {
        a.apply_write(FileId(id), 0, bytes).unwrap();
    }
    if send_inner {
        a.apply_write(FileId(26), 0, b"inner data").unwrap();
    }
    for node in &nodes {
        assert_eq!(a.apply_node(node).unwrap(), Applied::Done, "{node:?}");
    }
}

fn resync_expected() -> Listing {
    use NodeKind::*;
    let mut x = obj(File, 25, (5, 6, 0o600), b"new-x");
    x.xattrs = vec![(b"user.new".to_vec(), b"2".to_vec())];
    let mut h2 = obj(File, 21, (0, 0, 0o644), b"hh");
    h2.same_as = Some("/h1".into());
    BTreeMap::from([
        ("/a".into(), obj(Dir, 20, (0, 0, 0o755), b"")),
        ("/a/moved".into(), obj(Dir, 24, (0, 0, 0o755), b"")),
        ("/a/moved/inner".into(), obj(File, 26, (0, 0, 0o644), b"inner data")),
        ("/a/x".into(), x),
        ("/h1".into(), obj(File, 21, (0, 0, 0o644), b"hh")),
        ("/h2".into(), h2),
        ("/l".into(), obj(Symlink, 22, (0, 0, 0), b"a/x")),
        ("/n".into(), obj(File, 23, (0, 0, 0o644), b"nn")),
    ])
}

/// A target whose directory differs from the primary in every way resync must mend:
/// `moved` (24) sits at `/m_old` holding `inner` (26) with its data; `x` (25) at `/x_old`
/// with old contents and an old xattr; `/n` is another object (30) with data; `/h1` (21)
/// has two more names, `/extra` and `/extra2` (the second finds the first in the stash); an
/// untagged file and an untagged directory with contents.
fn messy_target<T: Backend>(a: &mut Applier<T>) {
    use NodeKind::*;
    for step in [
        create(1, "m_old", 24, Dir, 0o700, 3),
        create(24, "inner", 26, File, 0o644, 0),
        Step::Write(26, 0, b"inner data"),
        create(1, "x_old", 25, File, 0o666, 0),
        Step::Write(25, 0, b"old-x-contents"),
        xattr(25, "user.old", Some("1")),
        create(1, "n", 30, File, 0o644, 0),
        Step::Write(30, 0, b"not n"),
        create(1, "h1", 21, File, 0o644, 0),
        Step::Op(Op::Link { id: FileId(21), new_parent: FileId(1), new_name: b"extra".to_vec() }),
        Step::Op(Op::Link { id: FileId(21), new_parent: FileId(1), new_name: b"extra2".to_vec() }),
    ] {
        apply(a, &step);
    }
    let t = a.tree();
    let root = t.root().unwrap();
    let plain = |kind| crate::io::NewNode { kind, mode: 0o755, uid: 0, gid: 0, rdev: 0, target: b"" };
    let stray = t.create(&root, b"stray", &plain(File)).unwrap();
    t.write(&stray, 0, b"by hand").unwrap();
    let userdir = t.create(&root, b"userdir", &plain(Dir)).unwrap();
    t.create(&userdir, b"inside", &plain(File)).unwrap();
}

fn resync_mends_a_target_in_any_state_and_keeps_moved_data<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    messy_target(&mut a);
    let inner_before = a.tree().handle_of(&node_at(a.tree(), &["m_old", "inner"])).unwrap();
    resync(&mut a, false);
    assert!(a.tree().lookup(&a.tree().root().unwrap(), STASH_NAME).is_ok(), "the stash holds the extras");
    a.finish_resync().unwrap();
    assert_eq!(listing(a.tree()), resync_expected());
    assert_eq!(a.tree().handle_of(&node_at(a.tree(), &["a", "moved", "inner"])).unwrap(), inner_before);
    check_resync_times(a.tree());
    // Resyncing an equal tree changes no name.
    for (dir, entries) in &primary().dirs {
        assert_eq!(a.apply_entries(FileId(*dir), entries).unwrap(), Applied::Already);
    }
    a.finish_resync().unwrap();
    assert_eq!(listing(a.tree()), resync_expected());
}

/// Times are set last: neither the truncate nor the xattrs of `apply_node` move them.
fn check_resync_times<T: Backend>(tree: &T) {
    for (path, id) in [(&["a", "x"][..], 25), (&["a"], 20), (&["l"], 22), (&["a", "moved"], 24)] {
        if let Some(t) = tree.mtime(&node_at(tree, path)) {
            assert_eq!(t, (1_600_000_000 + id, 7), "{path:?}");
        }
    }
}

fn resync_of_an_empty_target_is_a_full_copy<T: Backend>() {
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    resync(&mut a, true);
    a.finish_resync().unwrap();
    assert_eq!(listing(a.tree()), resync_expected());
}

/// A resync cut off after its first directory (extras in the stash), resumed by a new
/// applier with an empty map: the stash is found again and nothing is made twice.
fn interrupted_resync_resumes_with_a_fresh_applier<T: Backend>() {
    let (tree, dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    messy_target(&mut a);
    a.apply_entries(FileId(1), &primary().dirs[0].1).unwrap();
    let mut b = Applier::new(a.tree().again(&dir), SET, IdSnapshot::default());
    drop(a);
    resync(&mut b, false);
    b.finish_resync().unwrap();
    assert_eq!(listing(b.tree()), resync_expected());
}

macro_rules! both {
    ($($body:ident),* $(,)?) => {
        mod sim {
            $(#[test] fn $body() { super::$body::<crate::sim::tree::SimTree>() })*
        }
        mod os {
            $(#[test] fn $body() { super::$body::<crate::os::tree::OsTree>() })*
        }
    };
}

/// A resync read a file's new directory after the primary renamed it there, and its old one
/// before: the target has both names (hard links). The rename's record, applied after, takes
/// the old name away, as the rename did on the primary (the two-targets replication test
/// found the extra name). Were both names links already on the primary (`replaced` is the
/// object itself), the rename did nothing there and does nothing here.
fn rename_onto_a_link_of_itself_that_a_resync_made_removes_the_old_name<T: Backend>() {
    use NodeKind::*;
    let (tree, _dir) = T::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    for step in
        [create(1, "q", 20, Dir, 0o755, 0), create(1, "r", 21, Dir, 0o755, 0), create(20, "n51", 22, File, 0o644, 0)]
    {
        assert_eq!(apply(&mut a, &step), Applied::Done);
    }
    let link = Step::Op(Op::Link { id: FileId(22), new_parent: FileId(21), new_name: b"n95".to_vec() });
    assert_eq!(apply(&mut a, &link), Applied::Done);
    let both = listing(a.tree());
    // The primary's rename of a link onto another link of the same file: nothing changes.
    assert_eq!(apply(&mut a, &rename(20, "n51", 21, "n95", 0, 22, 22)), Applied::Already);
    assert_eq!(listing(a.tree()), both);
    // The primary's rename to a free name: the old name goes.
    assert_eq!(apply(&mut a, &rename(20, "n51", 21, "n95", 0, 22, 0)), Applied::Done);
    let after = listing(a.tree());
    assert!(!after.contains_key("/q/n51") && after.contains_key("/r/n95"), "{after:#?}");
    assert_eq!(apply(&mut a, &rename(20, "n51", 21, "n95", 0, 22, 0)), Applied::Already);
}

both!(
    rename_onto_a_link_of_itself_that_a_resync_made_removes_the_old_name,
    sequence_gives_the_expected_tree_and_applying_twice_changes_nothing,
    every_crash_point_and_stale_snapshot_converge,
    namespace_ops_applied_twice_report_already_or_skipped,
    untagged_leftover_of_a_create_is_adopted_with_its_exact_owner_and_mode,
    names_that_are_not_one_component_and_reserved_ids_are_refused,
    private_xattrs_are_never_set_or_removed_for_a_record,
    resync_mends_a_target_in_any_state_and_keeps_moved_data,
    resync_of_an_empty_target_is_a_full_copy,
    interrupted_resync_resumes_with_a_fresh_applier,
);

// ---- the real tree only ----

/// `evil` in the target directory points outside it. Records naming it as a directory, or
/// writing through it, fail; resync stashes it and removes the link, never what it points to.
#[test]
fn a_symlink_out_of_the_directory_is_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"keep").unwrap();
    let target_bytes = outside.path().as_os_str().as_encoded_bytes().to_vec();
    let (tree, dir) = OsTree::fresh();
    let mut a = Applier::new(tree, SET, IdSnapshot::default());
    let evil = Op::Create {
        parent: FileId(1),
        name: b"evil".to_vec(),
        new_id: FileId(40),
        kind: NodeKind::Symlink,
        mode: 0o777,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: target_bytes,
    };
    a.apply_op(&evil).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.as_ref().unwrap().path().join("evil2")).unwrap();
    let attempts = [
        a.apply_op(&create(40, "x", 41, NodeKind::File, 0o644, 0).op()),
        a.apply_write(FileId(40), 0, b"pwned"),
        a.apply_op(&Op::SetAttr { id: FileId(40), attr: SetAttr { size: Some(0), ..SetAttr::default() } }),
        a.apply_op(&rename(40, "secret", 1, "stolen", 0, 42, 0).op()),
        a.apply_op(&unlink(40, "secret", 42, false).op()),
        a.apply_op(&Op::Link { id: FileId(40), new_parent: FileId(40), new_name: b"l".to_vec() }),
        a.apply_entries(FileId(40), &[]),
    ];
    for (i, r) in attempts.into_iter().enumerate() {
        assert!(matches!(r, Err(ApplyError::Diverged(_)) | Ok(Applied::Skipped(_))), "attempt {i}: {r:?}");
    }
    let mode = Op::SetAttr { id: FileId(40), attr: SetAttr { mode: Some(0o777), uid: Some(9), ..SetAttr::default() } };
    a.apply_op(&mode).unwrap();
    let entries = vec![(b"evil2".to_vec(), desc(43, NodeKind::Dir))];
    a.apply_entries(FileId(1), &entries).unwrap();
    a.apply_op(&create(43, "inside", 44, NodeKind::File, 0o644, 0).op()).unwrap();
    a.finish_resync().unwrap();
    let names: Vec<_> = std::fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["secret"]);
    assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"keep");
    let meta = std::fs::metadata(outside.path()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "the chown went to the link, not its target");
    assert_eq!(listing(a.tree()).keys().collect::<Vec<_>>(), ["/evil2", "/evil2/inside"]);
}

/// Tags sit on the object itself, whatever its kind: on a symlink, the link (its target,
/// a file of the tree, keeps its own tag).
#[test]
fn tags_apply_to_every_kind_of_object_itself() {
    let (tree, _dir) = OsTree::fresh();
    let root = tree.root().unwrap();
    let mut tagged = vec![];
    for (i, kind) in
        [NodeKind::File, NodeKind::Dir, NodeKind::Symlink, NodeKind::Fifo, NodeKind::Socket, NodeKind::CharDev]
            .into_iter()
            .enumerate()
    {
        let rdev = if kind == NodeKind::CharDev { libc::makedev(1, 3) } else { 0 };
        let new = crate::io::NewNode { kind, mode: 0o644, uid: 0, gid: 0, rdev, target: b"o0" };
        let node = tree.create(&root, format!("o{i}").as_bytes(), &new).unwrap();
        assert_eq!(tree.tag(&node, &SET).unwrap(), None);
        tree.set_tag(&node, &SET, FileId(100 + i as u64)).unwrap();
        assert_eq!(tree.kind(&node).unwrap(), kind);
        tagged.push((format!("o{i}"), 100 + i as u64));
    }
    for (name, id) in tagged {
        let node = tree.lookup(&root, name.as_bytes()).unwrap();
        assert_eq!(tree.tag(&node, &SET).unwrap(), Some(FileId(id)), "{name}");
        assert_eq!(tree.tag(&node, b"another-set-id!!").unwrap(), None);
    }
}
