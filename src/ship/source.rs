//! What a resync reads from the primary: objects as the backing directory holds them now.

use std::io;
use std::os::unix::fs::FileExt;

use crate::io::Storage;
use crate::os::tree::{self as ostree, OsNode, OsTree};
use crate::passthrough::Core;
use crate::proto::wire::control::NodeDesc;
use crate::types::FileId;

/// The primary's current state, read for a resync (000:13: "the current contents").
pub trait Source: Send + Sync {
    /// The object `id` now: kind, mode, owner, size, times, symlink target, xattrs.
    fn describe(&self, id: FileId) -> io::Result<NodeDesc>;
    /// The names in directory `dir`, each with the object it names (without xattrs).
    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>>;
    /// Reads from a regular file; returns how many bytes (0 at its end).
    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// `entries` for a caller inside a namespace op (a before-change hook: the op holds the
    /// namespace quiet already, and taking it again would deadlock).
    fn entries_in_op(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.entries(dir)
    }
}

/// The xattrs ferryfs keeps for itself; never replicated.
pub const PRIVATE_XATTR_PREFIX: &[u8] = b"trusted.ferryfs.";

impl<S: Storage> Source for Core<S, OsTree> {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        describe_node(id, &node, true)
    }

    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.with_namespace_quiet(|| self.entries_now(dir))
    }

    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let node = self.node(id).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        let fd = ostree::reopen(&node, libc::O_RDONLY)?;
        let f = std::fs::File::from(fd);
        f.read_at(buf, offset)
    }

    fn entries_in_op(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        self.entries_now(dir)
    }
}

trait EntriesNow {
    fn entries_now(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>>;
}

impl<S: Storage> EntriesNow for Core<S, OsTree> {
    /// The listing itself; the caller holds the namespace quiet.
    fn entries_now(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        let d = self.node(dir).map_err(|e| io::Error::from_raw_os_error(e.0))?;
        let mut out = Vec::new();
        for (name, _, _) in ostree::read_dir(&d)? {
            let child = match crate::io::Tree::lookup(self.tree.as_ref(), &d, &name) {
                Ok(c) => c,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // removed meanwhile
                Err(e) => return Err(e),
            };
            let id = match self.peek_id(&d, &name) {
                Ok(id) => id,
                Err(e) if e.0 == libc::ENOENT => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.0)),
            };
            out.push((name, describe_node(id, &child, false)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn describe_node(id: FileId, node: &OsNode, xattrs: bool) -> io::Result<NodeDesc> {
    let mut desc = NodeDesc { id: id.0, ..ostree::describe(node)? };
    if xattrs {
        let list = ostree::list_xattr(node)?;
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty() && !n.starts_with(PRIVATE_XATTR_PREFIX)) {
            match ostree::get_xattr(node, name) {
                Ok(v) => desc.xattrs.push((name.to_vec(), v)),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(e),
            }
        }
        desc.xattrs.sort();
    }
    Ok(desc)
}
