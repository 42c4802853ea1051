//! A simulated backing tree: inodes in memory.
//!
//! Fault model:
//! - Process crash: nothing is lost (the backing filesystem's page cache survives).
//! - Machine crash (`crash_machine`): everything since the last `sync_all` is lost; the tree
//!   returns to the state the last syncfs made durable. (Worse than a real filesystem, which
//!   may keep some of it; recovery must not depend on either.)
//!
//! Handles are (inode number, generation); inode numbers are never reused, so a handle of a
//! removed object is stale forever, as with a real file handle.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use crate::format::ops::{NodeKind, SetAttr};
use crate::io::{NewNode, Tree};
use crate::proto::wire::control::NodeDesc;
use crate::types::Handle;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
    pub entries: BTreeMap<Vec<u8>, u64>,
    pub nlink: u32,
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    /// The applied-namespace marker, kept with the namespace (as an xattr of the root is).
    marker: ([u8; 16], u64),
}

#[derive(Default)]
struct Shared {
    current: State,
    durable: State,
    /// The states after each change since the last `sync_all` (for prefix crashes).
    history: Vec<State>,
}

/// Clones share one tree.
#[derive(Clone)]
pub struct SimTree {
    s: Arc<Mutex<Shared>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimNode(pub u64);

const ROOT_INO: u64 = 1;

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Default for SimTree {
    fn default() -> Self {
        SimTree::new()
    }
}

impl SimTree {
    pub fn new() -> SimTree {
        let root = Inode {
            kind: NodeKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            data: vec![],
            entries: BTreeMap::new(),
            nlink: 2,
            target: vec![],
            xattrs: BTreeMap::new(),
        };
        let st = State { inodes: BTreeMap::from([(ROOT_INO, root)]), next_ino: 2, marker: ([0; 16], 0) };
        SimTree { s: Arc::new(Mutex::new(Shared { current: st.clone(), durable: st, history: vec![] })) }
    }

    /// A machine crash after which the filesystem kept a prefix of its changes since the last
    /// `sync_all` (as a filesystem that journals in order, ext4 or XFS, does): `keep` of them.
    pub fn crash_machine_keeping(&self, keep: usize) {
        let mut s = self.s.lock().unwrap();
        let next_ino = s.current.next_ino;
        let kept = if keep == 0 { s.durable.clone() } else { s.history[(keep - 1).min(s.history.len() - 1)].clone() };
        s.current = kept;
        s.current.next_ino = next_ino;
        s.durable = s.current.clone();
        s.history.clear();
    }

    /// Records the current state as one step the filesystem may keep in a prefix crash (the
    /// runner calls this after each operation).
    pub fn note_step(&self) {
        let mut s = self.s.lock().unwrap();
        let changed = s.history.last().map_or(s.current != s.durable, |last| *last != s.current);
        if changed {
            let now = s.current.clone();
            s.history.push(now);
        }
    }

    /// Changes since the last `sync_all`.
    pub fn unsynced_changes(&self) -> usize {
        self.s.lock().unwrap().history.len()
    }

    /// Loses everything since the last `sync_all`.
    pub fn crash_machine(&self) {
        let mut s = self.s.lock().unwrap();
        // Inode numbers are not handed out again (a real filesystem's generation numbers
        // make a reused inode a different handle).
        let next_ino = s.current.next_ino;
        s.current = s.durable.clone();
        s.current.next_ino = next_ino;
        s.history.clear();
    }

    /// An independent copy of the current state (durable = current).
    pub fn fork(&self) -> SimTree {
        let s = self.s.lock().unwrap();
        SimTree {
            s: Arc::new(Mutex::new(Shared { current: s.current.clone(), durable: s.current.clone(), history: vec![] })),
        }
    }

    /// `path → inode number`, for traces.
    pub fn inodes(&self) -> Vec<(String, u64)> {
        let s = self.s.lock().unwrap();
        let mut out = vec![];
        fn go(st: &State, ino: u64, p: String, out: &mut Vec<(String, u64)>) {
            for (n, c) in &st.inodes[&ino].entries {
                let path = format!("{p}/{}", String::from_utf8_lossy(n));
                out.push((path.clone(), *c));
                if st.inodes[c].kind == NodeKind::Dir {
                    go(st, *c, path, out);
                }
            }
        }
        go(&s.current, ROOT_INO, String::new(), &mut out);
        out
    }

    /// A copy of one object's inode (`None` when it is gone), for checkers.
    pub fn inode(&self, node: &SimNode) -> Option<Inode> {
        self.s.lock().unwrap().current.inodes.get(&node.0).cloned()
    }

    /// The tree as `path → (kind, content or target)`, for comparing states in checkers.
    pub fn listing(&self) -> BTreeMap<String, (NodeKind, Vec<u8>)> {
        let s = self.s.lock().unwrap();
        let mut out = BTreeMap::new();
        walk(&s.current, ROOT_INO, String::new(), &mut out);
        out
    }
}

fn walk(st: &State, ino: u64, prefix: String, out: &mut BTreeMap<String, (NodeKind, Vec<u8>)>) {
    for (name, child) in &st.inodes[&ino].entries {
        let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
        let i = &st.inodes[child];
        let content = match i.kind {
            NodeKind::Symlink => i.target.clone(),
            _ => i.data.clone(),
        };
        out.insert(path.clone(), (i.kind, content));
        if i.kind == NodeKind::Dir {
            walk(st, *child, path, out);
        }
    }
}

impl State {
    fn get(&self, n: &SimNode) -> io::Result<&Inode> {
        self.inodes.get(&n.0).ok_or_else(|| err(libc::ESTALE))
    }
    fn get_mut(&mut self, n: &SimNode) -> io::Result<&mut Inode> {
        self.inodes.get_mut(&n.0).ok_or_else(|| err(libc::ESTALE))
    }
    fn dir(&self, n: &SimNode) -> io::Result<&Inode> {
        let i = self.get(n)?;
        if i.kind != NodeKind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        Ok(i)
    }
    fn child(&self, dir: &SimNode, name: &[u8]) -> io::Result<u64> {
        self.dir(dir)?.entries.get(name).copied().ok_or_else(|| err(libc::ENOENT))
    }
    fn drop_link(&mut self, ino: u64) {
        let i = self.inodes.get_mut(&ino).unwrap();
        i.nlink -= if i.kind == NodeKind::Dir { 2 } else { 1 };
        if i.nlink == 0 {
            self.inodes.remove(&ino);
        }
    }
}

impl Tree for SimTree {
    type Node = SimNode;

    fn root(&self) -> io::Result<SimNode> {
        Ok(SimNode(ROOT_INO))
    }

    fn open_handle(&self, handle: &Handle) -> io::Result<SimNode> {
        let ino = u64::from_le_bytes(handle.0.as_slice().try_into().map_err(|_| err(libc::EINVAL))?);
        let s = self.s.lock().unwrap();
        s.current.get(&SimNode(ino))?;
        Ok(SimNode(ino))
    }

    fn handle_of(&self, node: &SimNode) -> io::Result<Handle> {
        Ok(Handle(node.0.to_le_bytes().to_vec()))
    }

    fn lookup(&self, dir: &SimNode, name: &[u8]) -> io::Result<SimNode> {
        Ok(SimNode(self.s.lock().unwrap().current.child(dir, name)?))
    }

    fn create(&self, dir: &SimNode, name: &[u8], new: &NewNode<'_>) -> io::Result<SimNode> {
        let mut s = self.s.lock().unwrap();
        let st = &mut s.current;
        if st.dir(dir)?.entries.contains_key(name) {
            return Err(err(libc::EEXIST));
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let is_dir = new.kind == NodeKind::Dir;
        st.inodes.insert(
            ino,
            Inode {
                kind: new.kind,
                mode: new.mode,
                uid: new.uid,
                gid: new.gid,
                data: vec![],
                entries: BTreeMap::new(),
                nlink: if is_dir { 2 } else { 1 },
                target: new.target.to_vec(),
                xattrs: BTreeMap::new(),
            },
        );
        st.get_mut(dir)?.entries.insert(name.to_vec(), ino);
        Ok(SimNode(ino))
    }

    fn link(&self, node: &SimNode, dir: &SimNode, name: &[u8]) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let st = &mut s.current;
        if st.get(node)?.kind == NodeKind::Dir {
            return Err(err(libc::EPERM));
        }
        if st.dir(dir)?.entries.contains_key(name) {
            return Err(err(libc::EEXIST));
        }
        st.get_mut(node)?.nlink += 1;
        st.get_mut(dir)?.entries.insert(name.to_vec(), node.0);
        Ok(())
    }

    fn unlink(&self, dir: &SimNode, name: &[u8], is_dir: bool) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let st = &mut s.current;
        let ino = st.child(dir, name)?;
        let victim = &st.inodes[&ino];
        match (is_dir, victim.kind == NodeKind::Dir) {
            (true, false) => return Err(err(libc::ENOTDIR)),
            (false, true) => return Err(err(libc::EISDIR)),
            (true, true) if !victim.entries.is_empty() => return Err(err(libc::ENOTEMPTY)),
            _ => {}
        }
        st.get_mut(dir)?.entries.remove(name);
        st.drop_link(ino);
        Ok(())
    }

    fn rename(&self, dir: &SimNode, name: &[u8], new_dir: &SimNode, new_name: &[u8], flags: u32) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let st = &mut s.current;
        let ino = st.child(dir, name)?;
        let existing = st.dir(new_dir)?.entries.get(new_name).copied();
        if flags & libc::RENAME_EXCHANGE != 0 {
            let other = existing.ok_or_else(|| err(libc::ENOENT))?;
            st.get_mut(dir)?.entries.insert(name.to_vec(), other);
            st.get_mut(new_dir)?.entries.insert(new_name.to_vec(), ino);
            return Ok(());
        }
        if let Some(other) = existing {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(err(libc::EEXIST));
            }
            if other == ino {
                return Ok(());
            }
            let o = &st.inodes[&other];
            if o.kind == NodeKind::Dir && !o.entries.is_empty() {
                return Err(err(libc::ENOTEMPTY));
            }
            st.drop_link(other);
        }
        st.get_mut(dir)?.entries.remove(name);
        st.get_mut(new_dir)?.entries.insert(new_name.to_vec(), ino);
        Ok(())
    }

    fn set_attr(&self, node: &SimNode, attr: &SetAttr) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let i = s.current.get_mut(node)?;
        if let Some(m) = attr.mode {
            i.mode = m;
        }
        if let Some(u) = attr.uid {
            i.uid = u;
        }
        if let Some(g) = attr.gid {
            i.gid = g;
        }
        if let Some(size) = attr.size {
            if i.kind != NodeKind::File {
                return Err(err(libc::EISDIR));
            }
            i.data.resize(size as usize, 0);
        }
        Ok(())
    }

    fn write(&self, node: &SimNode, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let i = s.current.get_mut(node)?;
        if i.kind != NodeKind::File {
            return Err(err(libc::EISDIR));
        }
        let end = offset as usize + data.len();
        if i.data.len() < end {
            i.data.resize(end, 0);
        }
        i.data[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn set_xattr(&self, node: &SimNode, name: &[u8], value: &[u8], _flags: u32) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        s.current.get_mut(node)?.xattrs.insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        s.current.get_mut(node)?.xattrs.remove(name).map(|_| ()).ok_or_else(|| err(libc::ENODATA))
    }

    fn fallocate(&self, node: &SimNode, _mode: u32, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        let i = s.current.get_mut(node)?;
        let end = (offset + len) as usize;
        if i.data.len() < end {
            i.data.resize(end, 0);
        }
        Ok(())
    }

    fn applied_marker(&self, set_id: &[u8; 16]) -> io::Result<u64> {
        let m = self.s.lock().unwrap().current.marker;
        Ok(if &m.0 == set_id { m.1 } else { 0 })
    }

    fn set_applied_marker(&self, set_id: &[u8; 16], lsn: u64) -> io::Result<()> {
        self.s.lock().unwrap().current.marker = (*set_id, lsn);
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut s = self.s.lock().unwrap();
        s.durable = s.current.clone();
        s.history.clear();
        Ok(())
    }

    fn read_dir(&self, dir: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        Ok(self.s.lock().unwrap().current.dir(dir)?.entries.keys().cloned().collect())
    }

    fn size(&self, node: &SimNode) -> io::Result<u64> {
        Ok(self.s.lock().unwrap().current.get(node)?.data.len() as u64)
    }

    fn kind(&self, node: &SimNode) -> io::Result<NodeKind> {
        Ok(self.s.lock().unwrap().current.get(node)?.kind)
    }

    fn get_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<Vec<u8>> {
        let s = self.s.lock().unwrap();
        s.current.get(node)?.xattrs.get(name).cloned().ok_or_else(|| err(libc::ENODATA))
    }

    fn list_xattrs(&self, node: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        Ok(self.s.lock().unwrap().current.get(node)?.xattrs.keys().cloned().collect())
    }

    /// The simulated tree keeps no times and no device numbers: those are 0.
    fn describe(&self, node: &SimNode) -> io::Result<NodeDesc> {
        let s = self.s.lock().unwrap();
        let i = s.current.get(node)?;
        Ok(NodeDesc {
            kind: i.kind as u8,
            mode: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            size: if i.kind == NodeKind::File { i.data.len() as u64 } else { 0 },
            target: i.target.clone(),
            ..NodeDesc::default()
        })
    }

    fn read(&self, node: &SimNode, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.s.lock().unwrap();
        let i = s.current.get(node)?;
        if i.kind != NodeKind::File {
            return Err(err(libc::EISDIR));
        }
        let from = (offset as usize).min(i.data.len());
        let n = buf.len().min(i.data.len() - from);
        buf[..n].copy_from_slice(&i.data[from..from + n]);
        Ok(n)
    }
}
