//! The primary's tree and workload: `TurnTree` (a `SimTree` that gives the link a turn inside
//! each operation), what a resync reads from the primary (its `Source`), and the random
//! operations of the workload (`step`).

use std::io;
use std::sync::{OnceLock, Weak};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::Primary;
use super::world::Sim;
use crate::format::ops::{NodeKind, SetAttr};
use crate::io::{NewNode, Tree};
use crate::passthrough::Errno;
use crate::proto::wire::control::NodeDesc;
use crate::ship::source::Source;
use crate::sim::tree::{SimNode, SimTree};
use crate::types::{FileId, Handle};

/// The primary's simulated tree, which gives the link a turn before each change (the op's
/// intent is journaled by then, its outcome not yet): the interleavings a link thread running
/// beside the writers sees, within one operation.
pub(super) struct TurnTree {
    pub(super) sim: SimTree,
    pub(super) world: OnceLock<Weak<Sim>>,
}

impl TurnTree {
    fn turn(&self) {
        if let Some(sim) = self.world.get().and_then(Weak::upgrade) {
            sim.mid_op_turn();
        }
    }
}

impl Tree for TurnTree {
    type Node = SimNode;

    fn root(&self) -> io::Result<SimNode> {
        self.sim.root()
    }
    fn open_handle(&self, handle: &Handle) -> io::Result<SimNode> {
        self.sim.open_handle(handle)
    }
    fn handle_of(&self, node: &SimNode) -> io::Result<Handle> {
        self.sim.handle_of(node)
    }
    fn lookup(&self, dir: &SimNode, name: &[u8]) -> io::Result<SimNode> {
        self.sim.lookup(dir, name)
    }
    fn create(&self, dir: &SimNode, name: &[u8], new: &NewNode<'_>) -> io::Result<SimNode> {
        self.turn();
        self.sim.create(dir, name, new)
    }
    fn link(&self, node: &SimNode, dir: &SimNode, name: &[u8]) -> io::Result<()> {
        self.turn();
        self.sim.link(node, dir, name)
    }
    fn unlink(&self, dir: &SimNode, name: &[u8], is_dir: bool) -> io::Result<()> {
        self.turn();
        self.sim.unlink(dir, name, is_dir)
    }
    fn rename(&self, dir: &SimNode, name: &[u8], new_dir: &SimNode, new_name: &[u8], flags: u32) -> io::Result<()> {
        self.turn();
        self.sim.rename(dir, name, new_dir, new_name, flags)
    }
    fn set_attr(&self, node: &SimNode, attr: &SetAttr) -> io::Result<()> {
        self.turn();
        self.sim.set_attr(node, attr)
    }
    fn write(&self, node: &SimNode, offset: u64, data: &[u8]) -> io::Result<()> {
        self.turn();
        self.sim.write(node, offset, data)
    }
    fn set_xattr(&self, node: &SimNode, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
        self.sim.set_xattr(node, name, value, flags)
    }
    fn remove_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<()> {
        self.sim.remove_xattr(node, name)
    }
    fn fallocate(&self, node: &SimNode, mode: u32, offset: u64, len: u64) -> io::Result<()> {
        self.turn();
        self.sim.fallocate(node, mode, offset, len)
    }
    fn applied_marker(&self, set_id: &[u8; 16]) -> io::Result<u64> {
        self.sim.applied_marker(set_id)
    }
    fn set_applied_marker(&self, set_id: &[u8; 16], lsn: u64) -> io::Result<()> {
        self.sim.set_applied_marker(set_id, lsn)
    }
    fn sync_all(&self) -> io::Result<()> {
        self.sim.sync_all()
    }
    fn read_dir(&self, dir: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        self.sim.read_dir(dir)
    }
    fn size(&self, node: &SimNode) -> io::Result<u64> {
        self.sim.size(node)
    }
    fn kind(&self, node: &SimNode) -> io::Result<NodeKind> {
        self.sim.kind(node)
    }
    fn get_xattr(&self, node: &SimNode, name: &[u8]) -> io::Result<Vec<u8>> {
        self.sim.get_xattr(node, name)
    }
    fn list_xattrs(&self, node: &SimNode) -> io::Result<Vec<Vec<u8>>> {
        self.sim.list_xattrs(node)
    }
    fn describe(&self, node: &SimNode) -> io::Result<crate::proto::wire::control::NodeDesc> {
        self.sim.describe(node)
    }
    fn read(&self, node: &SimNode, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.sim.read(node, offset, buf)
    }
}

/// What a resync reads from the primary (as `sim::replication` has it for a plain `SimTree`).
impl Source for Primary {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        describe(&self.tree.sim, id, &node)
    }

    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.with_namespace_quiet(|| {
            let d = self.node(dir).map_err(|e| io::Error::from_raw_os_error(e.0))?;
            let mut out = Vec::new();
            for name in self.tree.read_dir(&d)? {
                let child = self.tree.lookup(&d, &name)?;
                let id = self.peek_id(&d, &name).map_err(|e| io::Error::from_raw_os_error(e.0))?;
                let mut desc = describe(&self.tree.sim, id, &child)?;
                desc.xattrs.clear();
                out.push((name, desc));
            }
            Ok(out)
        })
    }

    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        let inode = self.tree.sim.inode(&node).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let start = (offset as usize).min(inode.data.len());
        let n = buf.len().min(inode.data.len() - start);
        buf[..n].copy_from_slice(&inode.data[start..start + n]);
        Ok(n)
    }
}

fn describe(tree: &SimTree, id: FileId, node: &SimNode) -> io::Result<NodeDesc> {
    let i = tree.inode(node).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    Ok(NodeDesc {
        id: id.0,
        kind: i.kind as u8,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        size: if i.kind == NodeKind::File { i.data.len() as u64 } else { 0 },
        atime: (0, 0),
        mtime: (0, 0),
        target: i.target.clone(),
        xattrs: i
            .xattrs
            .iter()
            .filter(|(k, _)| !crate::io::is_private_xattr(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];

/// One random operation through the write path (`sim::crash::step`'s mix, over the turn-taking
/// tree); errors (ENOENT, EEXIST …) are part of the workload: the primary's tree is the truth.
pub(super) fn step(core: &Primary, rng: &mut ChaCha8Rng) {
    let dir = if rng.gen_ratio(1, 4) {
        core.lookup(FileId::ROOT, b"sub").map(|(id, _)| id).unwrap_or(FileId::ROOT)
    } else {
        FileId::ROOT
    };
    let name = NAMES[rng.gen_range(0..NAMES.len())];
    let new = |kind, mode, target| NewNode { kind, mode, uid: 0, gid: 0, rdev: 0, target };
    let _: Result<(), Errno> = (|| {
        match rng.gen_range(0..100) {
            0..=14 => drop(core.create(dir, name, &new(NodeKind::File, 0o644, b""))?),
            15..=17 => drop(core.create(FileId::ROOT, b"sub", &new(NodeKind::Dir, 0o755, b""))?),
            18..=19 => drop(core.create(dir, name, &new(NodeKind::Symlink, 0o777, b"a"))?),
            20..=59 => {
                let (id, _) = core.lookup(dir, name)?;
                let len = rng.gen_range(1..6000);
                let offset = rng.gen_range(0..20_000);
                let byte: u8 = rng.r#gen();
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                core.write_via_tree(id, offset, &data)?;
            }
            60..=67 => {
                let (id, _) = core.lookup(dir, name)?;
                core.set_attr(id, &SetAttr { size: Some(rng.gen_range(0..12_000)), ..Default::default() })?;
            }
            68..=79 => {
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                let flags = [0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][rng.gen_range(0..4)];
                core.rename(dir, name, FileId::ROOT, to, flags)?;
            }
            80..=89 => core.unlink(dir, name, false)?,
            90..=94 => {
                let (id, _) = core.lookup(dir, name)?;
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                drop(core.link(id, FileId::ROOT, to)?);
            }
            _ => core.unlink(FileId::ROOT, b"sub", true)?,
        }
        Ok(())
    })();
}
