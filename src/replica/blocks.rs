//! Block-level resync of one mirror target from another (issue 6 point 3): after the
//! primary's loss, a target behind the start of the most advanced target's log cannot be
//! caught up from records (they were freed), so it gets the blocks in which its directory
//! differs, the way rsync finds them:
//!
//! ```text
//!  catch-up tool          behind target B                   advanced target A (applied to E)
//!     │── DigestRequest ──────>│ walks its tree by tags,
//!     │<── FileDigests… DigestEnd  one digest per 64 KiB block
//!     │── BlockResync{plan, E}, the same FileDigests… DigestEnd ───────────────>│ walks its tree,
//!     │<─────────── ResyncBegin, ResyncEntries (every directory), Data (only   │ digests each
//!     │             the blocks whose digests differ), ResyncNode (every        │ block, compares
//!     │             object), ResyncEnd ───────────────────────────────────────│
//!     │── the same frames ────>│ stages them, applies at ResyncEnd (as a primary's resync),
//!     │<──────── ResyncDone ───│ restarts its log at E
//! ```
//!
//! Both targets name objects by the primary's file ids (their tags, `io::TAG_XATTR`), so "the
//! same file" is the same id on both sides, wherever it lives in either tree. The namespace
//! (every directory's entries) and every object's attributes are always sent: they are small,
//! and B's own may be anything older. The result at B is A's tree, the primary's journal
//! applied below E, by the resync's rules (`replica::target`, "Resync"): staged, applied only
//! when complete, finished after a crash.
//!
//! Digest: the first `DIGEST_LEN` bytes of SHA-256 of the block's bytes (a file's last block
//! is shorter; a block past B's end has no digest and is sent). A 128-bit truncation makes an
//! accidental match of two different blocks as unlikely as a disk's undetected error, many
//! orders of magnitude below. Memory at A: `DIGEST_LEN` bytes per `DIGEST_BLOCK` of B's
//! data (1/4096: 256 MiB for 1 TiB).
//!
//! Pure over the `Tree` seam: the simulation runs it on simulated trees, `ferryfs target`
//! on its directory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;

use sha2::{Digest as _, Sha256};

use super::apply::STASH_NAME;
use crate::format::ops::NodeKind;
use crate::io::{Tree, is_private_xattr};
use crate::proto::wire::Frame;
use crate::proto::wire::control::{ControlMsg, NodeDesc};
use crate::types::{FileId, Handle};

/// The unit of comparison, in bytes.
pub const DIGEST_BLOCK: u64 = 64 << 10;
/// Bytes of one block's digest.
pub const DIGEST_LEN: usize = 16;
/// Digests per `FileDigests` message (128 KiB, well under a control body's limit).
pub const DIGESTS_PER_MESSAGE: usize = 8192;
/// Names per `ResyncEntries` message (as the primary's resync).
const ENTRIES_PER_MESSAGE: usize = 256;
/// Largest `Data` frame: adjacent differing blocks are sent together up to this.
const DATA_MAX: usize = 1 << 20;

/// The digest of one block.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    let full = Sha256::digest(data);
    full[..DIGEST_LEN].try_into().expect("SHA-256 is longer")
}

/// A directory's names, each with the object it names (without xattrs).
pub type Entries = Vec<(Vec<u8>, NodeDesc)>;

/// A target's directory as its tags name it: every object reachable from the root, the stash
/// and untagged objects left out (they are no object of the primary's).
pub struct Walk {
    /// Directories, parents first, each with its entries (without xattrs).
    pub dirs: Vec<(FileId, Handle, Entries)>,
    /// Regular files, each once (a hard link's other names are only entries), with sizes.
    pub files: Vec<(FileId, Handle, u64)>,
    /// Every other object (symlinks, devices, FIFOs, sockets), each once.
    pub others: Vec<(FileId, Handle)>,
    /// Objects without a tag of this set (changed by hand?): left out.
    pub untagged: u64,
}

/// Walks `tree` from its root, breadth first. Keeps handles, not open objects, so a tree of
/// millions of files needs no more descriptors than its depth.
pub fn walk<T: Tree>(tree: &T, set_id: &[u8; 16]) -> io::Result<Walk> {
    let root = tree.root()?;
    let mut w = Walk { dirs: Vec::new(), files: Vec::new(), others: Vec::new(), untagged: 0 };
    let mut seen = HashSet::from([FileId::ROOT]);
    let mut queue = VecDeque::from([(FileId::ROOT, tree.handle_of(&root)?)]);
    while let Some((dir_id, dir_handle)) = queue.pop_front() {
        let dir = tree.open_handle(&dir_handle)?;
        let mut names = tree.read_dir(&dir)?;
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            if dir_id == FileId::ROOT && name == STASH_NAME {
                continue;
            }
            let child = tree.lookup(&dir, &name)?;
            let Some(id) = tree.tag(&child, set_id)? else {
                w.untagged += 1;
                continue;
            };
            let desc = NodeDesc { id: id.0, ..tree.describe(&child)? };
            if seen.insert(id) {
                let handle = tree.handle_of(&child)?;
                match NodeKind::from_u8(desc.kind) {
                    Some(NodeKind::Dir) => queue.push_back((id, handle)),
                    Some(NodeKind::File) => w.files.push((id, handle, desc.size)),
                    _ => w.others.push((id, handle)),
                }
            }
            entries.push((name, desc));
        }
        w.dirs.push((dir_id, dir_handle, entries));
    }
    Ok(w)
}

/// Where to send a stream of frames; an error ends the stream.
pub type Sink<'a> = &'a mut dyn FnMut(Frame) -> Result<(), String>;

/// The digest stream of a target's directory (B's side): `FileDigests` for every regular file,
/// then `DigestEnd`. Returns (files, blocks).
pub fn send_digests<T: Tree>(tree: &T, set_id: &[u8; 16], sink: Sink<'_>) -> Result<(u64, u64), String> {
    let w = walk(tree, set_id).map_err(|e| format!("walking the directory for its digests: {e}"))?;
    let mut buf = vec![0u8; DATA_MAX];
    let mut blocks = 0u64;
    for (id, handle, _) in &w.files {
        let node = match tree.open_handle(handle) {
            Ok(n) => n,
            Err(e) => return Err(format!("reopening file {id} for its digests: {e}")),
        };
        let mut digests = Vec::new();
        let mut first_block = 0u64;
        let mut at = 0u64;
        loop {
            let n = read_full(tree, &node, at, &mut buf).map_err(|e| format!("reading file {id} at {at}: {e}"))?;
            for block in buf[..n].chunks(DIGEST_BLOCK as usize) {
                digests.extend_from_slice(&digest(block));
            }
            at += n as u64;
            let full = digests.len() / DIGEST_LEN >= DIGESTS_PER_MESSAGE;
            if full || n < buf.len() {
                let count = (digests.len() / DIGEST_LEN) as u64;
                sink(Frame::Control(ControlMsg::FileDigests {
                    file: id.0,
                    first_block,
                    digests: std::mem::take(&mut digests),
                }))?;
                first_block += count;
            }
            if n < buf.len() {
                break;
            }
        }
        blocks += first_block;
    }
    let files = w.files.len() as u64;
    sink(Frame::Control(ControlMsg::DigestEnd { files, blocks }))?;
    Ok((files, blocks))
}

/// Reads until `buf` is full or the file ends.
fn read_full<T: Tree>(tree: &T, node: &T::Node, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = tree.read(node, offset + n as u64, &mut buf[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

/// A peer's digests as they arrive (A's side), checked: in order, whole digests, the counts
/// its `DigestEnd` states.
#[derive(Default)]
pub struct PeerDigests {
    files: HashMap<u64, Vec<u8>>,
    blocks: u64,
    ended: bool,
}

impl PeerDigests {
    /// Takes one message of the stream; `Ok(true)` once it ended.
    pub fn take(&mut self, msg: ControlMsg) -> Result<bool, String> {
        if self.ended {
            return Err("digests after DigestEnd".into());
        }
        match msg {
            ControlMsg::FileDigests { file, first_block, digests } => {
                if digests.len() % DIGEST_LEN != 0 {
                    return Err(format!("file {file}: {} digest bytes, not whole digests", digests.len()));
                }
                let have = self.files.entry(file).or_default();
                if first_block != (have.len() / DIGEST_LEN) as u64 {
                    return Err(format!(
                        "file {file}: digests from block {first_block}, after {} blocks",
                        have.len() / DIGEST_LEN
                    ));
                }
                have.extend_from_slice(&digests);
                self.blocks += (digests.len() / DIGEST_LEN) as u64;
                Ok(false)
            }
            ControlMsg::DigestEnd { files, blocks } => {
                if files != self.files.len() as u64 || blocks != self.blocks {
                    return Err(format!(
                        "the digest stream says {files} files and {blocks} blocks; it held {} and {}",
                        self.files.len(),
                        self.blocks
                    ));
                }
                self.ended = true;
                Ok(true)
            }
            other => Err(format!("expected digests, got {other:?}")),
        }
    }

    /// Whether the stream ended (`DigestEnd` taken).
    pub fn complete(&self) -> bool {
        self.ended
    }

    /// The peer's digest of block `block` of file `file`, if it has that block.
    fn get(&self, file: FileId, block: u64) -> Option<&[u8]> {
        let d = self.files.get(&file.0)?;
        let at = usize::try_from(block).ok()?.checked_mul(DIGEST_LEN)?;
        d.get(at..at + DIGEST_LEN)
    }
}

/// What a block-level resync sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub dirs: u64,
    pub files: u64,
    /// Blocks compared (every block of every file at the source).
    pub blocks: u64,
    /// Blocks that differed (or the peer lacked) and were sent.
    pub blocks_sent: u64,
    /// Bytes of file data sent.
    pub data_bytes: u64,
}

/// The resync of a peer whose digests are `theirs` (A's side): the whole namespace, the blocks
/// that differ, every object's attributes; `ResyncBegin` … `ResyncEnd` of `plan`, to resume
/// at `resume`.
pub fn send_block_resync<T: Tree>(
    tree: &T,
    set_id: &[u8; 16],
    theirs: &PeerDigests,
    plan: u64,
    resume: u64,
    sink: Sink<'_>,
) -> Result<BlockStats, String> {
    if !theirs.complete() {
        return Err("the peer's digest stream did not end".into());
    }
    let w = walk(tree, set_id).map_err(|e| format!("walking the directory for a block-level resync: {e}"))?;
    let mut stats = BlockStats { dirs: w.dirs.len() as u64, files: w.files.len() as u64, ..Default::default() };
    sink(Frame::Control(ControlMsg::ResyncBegin { plan, resume_lsn: resume, full: true }))?;
    for (dir, _, entries) in &w.dirs {
        let n = entries.len().div_ceil(ENTRIES_PER_MESSAGE).max(1);
        for i in 0..n {
            let part = entries.iter().skip(i * ENTRIES_PER_MESSAGE).take(ENTRIES_PER_MESSAGE).cloned().collect();
            sink(Frame::Control(ControlMsg::ResyncEntries { dir: dir.0, entries: part, last: i + 1 == n }))?;
        }
    }
    let mut buf = vec![0u8; DATA_MAX];
    for (id, handle, _) in &w.files {
        let node = tree.open_handle(handle).map_err(|e| format!("reopening file {id}: {e}"))?;
        let mut at = 0u64;
        loop {
            let n = read_full(tree, &node, at, &mut buf).map_err(|e| format!("reading file {id} at {at}: {e}"))?;
            // Runs of differing blocks within this read go as one Data frame each.
            let mut run: Option<(usize, usize)> = None;
            for (i, block) in buf[..n].chunks(DIGEST_BLOCK as usize).enumerate() {
                let index = at / DIGEST_BLOCK + i as u64;
                stats.blocks += 1;
                let differs = theirs.get(*id, index) != Some(&digest(block)[..]);
                let (from, to) = (i * DIGEST_BLOCK as usize, i * DIGEST_BLOCK as usize + block.len());
                match (&mut run, differs) {
                    (Some((_, end)), true) => *end = to,
                    (None, true) => run = Some((from, to)),
                    (Some(_), false) => send_run(sink, *id, at, &buf, run.take().unwrap(), &mut stats)?,
                    (None, false) => {}
                }
            }
            if let Some(r) = run {
                send_run(sink, *id, at, &buf, r, &mut stats)?;
            }
            at += n as u64;
            if n < buf.len() {
                break;
            }
        }
    }
    let objects = w
        .dirs
        .iter()
        .map(|(id, h, _)| (id, h))
        .chain(w.files.iter().map(|(id, h, _)| (id, h)))
        .chain(w.others.iter().map(|(id, h)| (id, h)));
    for (id, handle) in objects {
        let node = tree.open_handle(handle).map_err(|e| format!("reopening object {id}: {e}"))?;
        let mut desc = NodeDesc { id: id.0, ..tree.describe(&node).map_err(|e| format!("object {id}: {e}"))? };
        for name in tree.list_xattrs(&node).map_err(|e| format!("object {id}'s xattrs: {e}"))? {
            if is_private_xattr(&name) {
                continue;
            }
            match tree.get_xattr(&node, &name) {
                Ok(v) => desc.xattrs.push((name, v)),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(format!("object {id}'s xattrs: {e}")),
            }
        }
        desc.xattrs.sort();
        sink(Frame::Control(ControlMsg::ResyncNode { node: desc }))?;
    }
    sink(Frame::Control(ControlMsg::ResyncEnd { plan }))?;
    Ok(stats)
}

fn send_run(
    sink: Sink<'_>,
    id: FileId,
    at: u64,
    buf: &[u8],
    (from, to): (usize, usize),
    stats: &mut BlockStats,
) -> Result<(), String> {
    stats.blocks_sent += (to - from).div_ceil(DIGEST_BLOCK as usize) as u64;
    stats.data_bytes += (to - from) as u64;
    sink(Frame::Data { file: id.0, offset: at + from as u64, data: buf[from..to].to_vec() })
}

#[cfg(test)]
#[path = "blocks_tests.rs"]
mod tests;
