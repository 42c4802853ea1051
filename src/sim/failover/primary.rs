//! The primary's tree: `TurnTree` (a `SimTree` that gives the link a turn inside each
//! operation), with which the simulations' shared workload (`sim::primary::step`) and resync
//! source run over it.

use std::io;
use std::sync::{OnceLock, Weak};

use super::world::Sim;
use crate::format::ops::{NodeKind, SetAttr};
use crate::io::{NewNode, Tree};
use crate::sim::primary::SimBacked;
use crate::sim::tree::{SimNode, SimTree};
use crate::types::Handle;

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

/// What a resync reads from the primary comes from the `SimTree` inside (`sim::primary`'s
/// `Source`).
impl SimBacked for TurnTree {
    fn sim_tree(&self) -> &SimTree {
        &self.sim
    }
}
