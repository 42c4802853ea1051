//! The simulated primary as the simulations share it: one random operation of the workload
//! (`step`), and what a resync reads from it (its `Source`, for any tree backed by a
//! `SimTree`).

use std::io;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::storage::SimStorage;
use super::tree::{SimNode, SimTree};
use crate::format::ops::{NodeKind, SetAttr};
use crate::io::{NewNode, Tree};
use crate::passthrough::{Core, Errno};
use crate::proto::wire::control::NodeDesc;
use crate::ship::source::Source;
use crate::types::FileId;

/// The names the workload uses, in the root and in `/sub`.
const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];

/// One random operation through the write path; errors (ENOENT, EEXIST …) are part of the
/// workload: the primary's tree is the truth either way. Its draws are part of a seed's replay.
pub(crate) fn step<T: Tree>(core: &Core<SimStorage, T>, rng: &mut ChaCha8Rng) {
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

/// A tree the simulations back with a `SimTree` (itself, or one it wraps): what a resync reads
/// of the primary comes from that `SimTree`'s inodes.
pub(crate) trait SimBacked: Tree<Node = SimNode> {
    fn sim_tree(&self) -> &SimTree;
}

impl SimBacked for SimTree {
    fn sim_tree(&self) -> &SimTree {
        self
    }
}

/// What a resync reads from a simulated primary.
impl<T: SimBacked + Send + Sync> Source for Core<SimStorage, T> {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        describe(self.tree.sim_tree(), id, &node)
    }

    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.with_namespace_quiet(|| {
            let d = self.node(dir).map_err(|e| io::Error::from_raw_os_error(e.0))?;
            let mut out = Vec::new();
            for name in self.tree.read_dir(&d)? {
                let child = self.tree.lookup(&d, &name)?;
                let id = self.peek_id(&d, &name).map_err(|e| io::Error::from_raw_os_error(e.0))?;
                let mut desc = describe(self.tree.sim_tree(), id, &child)?;
                desc.xattrs.clear();
                out.push((name, desc));
            }
            Ok(out)
        })
    }

    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        let inode = self.tree.sim_tree().inode(&node).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let start = (offset as usize).min(inode.data.len());
        let n = buf.len().min(inode.data.len() - start);
        buf[..n].copy_from_slice(&inode.data[start..start + n]);
        Ok(n)
    }
}

/// One node as a resync describes it (private xattrs left out; times zero).
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
