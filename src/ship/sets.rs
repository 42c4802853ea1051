//! A set-mode target's consistent sets, at the primary (issue 7, claims 004;
//! docs/CONSISTENCY.md). The target's sync map records what changed (004:8); at a swap, under
//! the gate, its marks become a resync plan (the first structure, what this set sends) while new
//! marks get a newer generation (the second structure); this module holds the set in flight:
//! what of it is still to send, and the images set aside for locations changed after the swap.
//!
//! ```text
//!  mutation ──before──> preserve(location) ──> image set aside, bit cleared   (004:3–7)
//!          ──after───> sync map mark (a newer generation than the plan's)    (004:8)
//!  swap (gate held) ──> plan = map.resync_plan(); begin(plan's locations)     (004:1, 10)
//!  sender ──> next_item: an image set aside, or the current contents          (004:9)
//!  target commits ──> map.resync_done(plan): what the plan covered is clear
//! ```
//!
//! The rule that makes a set the primary's state at its swap: a location of the set is either
//! sent as the backing directory holds it now (nothing changed it since the swap: any change
//! would have set its image aside first), or from the image set aside before the first change.
//! Both steps must each be atomic against the other, so the caller holds one lock around
//! `preserve_*` and the mutation's *check*, and around `next_item` and its read (lock order in
//! docs/CONSISTENCY.md); nothing here blocks.
//!
//! Pure: the backing directory is reached through [`Source`], so a model test drives it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use super::source::Source;
use crate::format::ops::Op;
use crate::limits::BLOCK_SIZE;
use crate::proto::wire::control::NodeDesc;
use crate::syncmap::ResyncPlan;
use crate::types::FileId;

/// Blocks per file as disjoint inclusive ranges (`first → last`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocks {
    files: BTreeMap<FileId, BTreeMap<u64, u64>>,
}

impl Blocks {
    /// Adds blocks `first..=last` of `file`, merging with what touches them.
    pub fn insert(&mut self, file: FileId, first: u64, last: u64) {
        let ranges = self.files.entry(file).or_default();
        let (mut lo, mut hi) = (first, last);
        let touching: Vec<u64> = ranges
            .range(..=hi.saturating_add(1))
            .filter(|(_, l)| **l >= lo.saturating_sub(1))
            .map(|(f, _)| *f)
            .collect();
        for f in touching {
            let l = ranges.remove(&f).expect("listed");
            lo = lo.min(f);
            hi = hi.max(l);
        }
        ranges.insert(lo, hi);
    }

    pub fn contains(&self, file: FileId, block: u64) -> bool {
        self.files.get(&file).and_then(|r| r.range(..=block).next_back()).is_some_and(|(_, last)| *last >= block)
    }

    /// Removes one block; whether it was there.
    pub fn remove(&mut self, file: FileId, block: u64) -> bool {
        let Some(ranges) = self.files.get_mut(&file) else { return false };
        let Some((&first, &last)) = ranges.range(..=block).next_back() else { return false };
        if last < block {
            return false;
        }
        ranges.remove(&first);
        if first < block {
            ranges.insert(first, block - 1);
        }
        if block < last {
            ranges.insert(block + 1, last);
        }
        if ranges.is_empty() {
            self.files.remove(&file);
        }
        true
    }

    /// The first block of `file` at or past `from`.
    pub fn next_from(&self, file: FileId, from: u64) -> Option<u64> {
        let ranges = self.files.get(&file)?;
        if let Some((_, &last)) = ranges.range(..=from).next_back()
            && last >= from
        {
            return Some(from);
        }
        ranges.range(from..).next().map(|(f, _)| *f)
    }

    /// Drops every block of `file` at or past `from`.
    pub fn remove_from(&mut self, file: FileId, from: u64) {
        let Some(ranges) = self.files.get_mut(&file) else { return };
        let cut: Vec<(u64, u64)> = ranges.iter().filter(|(_, l)| **l >= from).map(|(f, l)| (*f, *l)).collect();
        for (first, _) in &cut {
            ranges.remove(first);
        }
        if let Some((first, _)) = cut.first().filter(|(f, _)| *f < from) {
            ranges.insert(*first, from - 1);
        }
        if ranges.is_empty() {
            self.files.remove(&file);
        }
    }

    /// The first block of the first file, if any.
    pub fn first(&self) -> Option<(FileId, u64)> {
        self.files.iter().next().and_then(|(f, r)| r.keys().next().map(|b| (*f, *b)))
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Locations marked: blocks, directories whose entries changed, objects whose attributes did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marked {
    pub blocks: Blocks,
    pub entries: BTreeSet<FileId>,
    pub attrs: BTreeSet<FileId>,
}

impl Marked {
    /// The locations of a sync map's resync plan.
    pub fn from_plan(plan: &ResyncPlan) -> Marked {
        let mut m = Marked::default();
        for f in &plan.files {
            for r in &f.blocks {
                m.blocks.insert(f.file, r.first, r.last);
            }
            if f.entries {
                m.entries.insert(f.file);
            }
            if f.attr {
                m.attrs.insert(f.file);
            }
        }
        m
    }
}

/// One item of a set as it goes to the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Directory `dir`'s names at the swap.
    Entries { dir: FileId, entries: Vec<(Vec<u8>, NodeDesc)> },
    /// Block `block` of `file` at the swap: its bytes (shorter at the file's end; none when the
    /// file was shorter than the block, or gone).
    Block { file: FileId, block: u64, data: Vec<u8> },
    /// An object's attributes at the swap.
    Node(NodeDesc),
}

/// What a mutation must do after `preserve_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preserve {
    /// Every location it changes that the set still needs is set aside (or was not needed).
    Done,
    /// The images set aside reached their bound: the mutation must wait until the sender has
    /// sent this block (`is_pending` false), then call again ("send it now", 004:3).
    SendFirst { file: FileId, block: u64 },
}

/// The set being sent.
#[derive(Debug)]
struct Sending {
    id: u64,
    /// Still to send, from the backing directory as it is now.
    todo: Marked,
    /// Images set aside before a change, each sent instead of the current contents.
    blocks_aside: BTreeMap<(FileId, u64), Vec<u8>>,
    entries_aside: BTreeMap<FileId, Vec<(Vec<u8>, NodeDesc)>>,
    attrs_aside: BTreeMap<FileId, NodeDesc>,
    bytes_aside: usize,
}

/// One set-mode target's set in flight. Which locations a set holds is the sync map's business
/// (a resync plan taken under the gate: `SyncMap::resync_plan`, cleared by `resync_done` once
/// the target commits the set); this is what happens to them between the swap and the commit.
#[derive(Debug)]
pub struct SetState {
    sending: Option<Sending>,
    /// Bound of the images set aside, in bytes.
    aside_max: usize,
}

impl SetState {
    pub fn new(aside_max: usize) -> SetState {
        SetState { sending: None, aside_max }
    }

    /// Under the gate (no mutation in flight), at the swap: set `id` of `locations` begins.
    /// Refused (false) while another set is being sent; its locations are still marked in the
    /// sync map, so the next swap takes them.
    pub fn begin(&mut self, id: u64, mut locations: Marked) -> bool {
        if self.sending.is_some() {
            return false;
        }
        // A file whose blocks changed gets its attributes sent too: its size and mtime at the
        // swap. The size also makes every block past the swap's end irrelevant (the target cuts
        // the file to it), which is why blocks found past the end later are dropped unsent.
        let changed: Vec<FileId> = locations.blocks.files.keys().copied().collect();
        locations.attrs.extend(changed);
        self.sending = Some(Sending {
            id,
            todo: locations,
            blocks_aside: BTreeMap::new(),
            entries_aside: BTreeMap::new(),
            attrs_aside: BTreeMap::new(),
            bytes_aside: 0,
        });
        true
    }

    /// The set being sent, if any.
    pub fn sending_id(&self) -> Option<u64> {
        self.sending.as_ref().map(|s| s.id)
    }

    // ----- before a mutation (004:3–7) -----

    /// Before an op changes the backing directory: every location it may change.
    pub fn preserve_op(&mut self, src: &dyn Source, op: &Op) -> io::Result<Preserve> {
        if self.sending.is_none() {
            return Ok(Preserve::Done);
        }
        let (dirs, objects, gone): (Vec<FileId>, Vec<FileId>, Option<FileId>) = match op {
            Op::Create { parent, .. } => (vec![*parent], vec![], None),
            Op::Link { id, new_parent, .. } => (vec![*new_parent], vec![*id], None),
            Op::Unlink { parent, id, .. } => (vec![*parent], vec![*id], Some(*id)),
            Op::Rename { parent, new_parent, id, replaced, .. } => {
                let replaced = (*replaced != FileId::NONE).then_some(*replaced);
                (vec![*parent, *new_parent], [Some(*id), replaced].into_iter().flatten().collect(), replaced)
            }
            Op::SetAttr { id, attr } => {
                if let Some(size) = attr.size {
                    let p = self.preserve_from(src, *id, size)?;
                    if p != Preserve::Done {
                        return Ok(p);
                    }
                }
                (vec![], vec![*id], None)
            }
            Op::SetXattr { id, .. } | Op::RemoveXattr { id, .. } => (vec![], vec![*id], None),
            Op::Fallocate { id, offset, len, .. } => return self.preserve_write(src, *id, *offset, *len),
        };
        for dir in &dirs {
            self.preserve_entries(src, *dir)?;
            self.preserve_attr(src, *dir)?;
        }
        for id in objects.iter().chain(op.mtime_ids().iter()) {
            self.preserve_attr(src, *id)?;
        }
        // An object that may lose its last name: its data may go with it.
        match gone {
            Some(id) => self.preserve_from(src, id, 0),
            None => Ok(Preserve::Done),
        }
    }

    /// Before bytes `[offset, offset + len)` of `file` change; its attributes too (a write
    /// may change its size, and changes its mtime).
    pub fn preserve_write(&mut self, src: &dyn Source, file: FileId, offset: u64, len: u64) -> io::Result<Preserve> {
        if len == 0 || self.sending.is_none() {
            return Ok(Preserve::Done);
        }
        self.preserve_attr(src, file)?;
        let last = offset.saturating_add(len - 1) / BLOCK_SIZE;
        self.preserve_blocks(src, file, offset / BLOCK_SIZE, Some(last))
    }

    /// Before `file` is cut to `size` bytes, or loses its last name (`size` 0): every block
    /// still to send from there on, and its attributes.
    pub fn preserve_from(&mut self, src: &dyn Source, file: FileId, size: u64) -> io::Result<Preserve> {
        if self.sending.is_none() {
            return Ok(Preserve::Done);
        }
        self.preserve_attr(src, file)?;
        self.preserve_blocks(src, file, size / BLOCK_SIZE, None)
    }

    /// Sets aside the images of the blocks of `file` still to send in `from..=last` (to its
    /// end when `last` is `None`). A block past the file's end now is past its end at the swap
    /// too (see `begin`): it and the rest are dropped unsent.
    fn preserve_blocks(
        &mut self,
        src: &dyn Source,
        file: FileId,
        from: u64,
        last: Option<u64>,
    ) -> io::Result<Preserve> {
        let s = self.sending.as_mut().expect("checked by the callers");
        let mut at = from;
        while let Some(block) = s.todo.blocks.next_from(file, at).filter(|b| last.is_none_or(|l| *b <= l)) {
            // The end first: past it nothing is kept or waited for (a range marked to the end
            // of a file holds some 2^52 blocks).
            let data = read_block(src, file, block)?;
            if data.is_empty() {
                s.todo.blocks.remove_from(file, block);
                break;
            }
            if s.bytes_aside + data.len() > self.aside_max {
                return Ok(Preserve::SendFirst { file, block });
            }
            s.bytes_aside += data.len();
            s.blocks_aside.insert((file, block), data);
            s.todo.blocks.remove(file, block);
            at = block + 1;
        }
        Ok(Preserve::Done)
    }

    /// Before directory `dir`'s names change.
    pub fn preserve_entries(&mut self, src: &dyn Source, dir: FileId) -> io::Result<()> {
        let Some(s) = self.sending.as_mut() else { return Ok(()) };
        if s.todo.entries.remove(&dir) {
            let entries = gone_as_empty(src.entries(dir))?;
            s.entries_aside.insert(dir, entries);
        }
        Ok(())
    }

    /// Before object `id`'s attributes change.
    pub fn preserve_attr(&mut self, src: &dyn Source, id: FileId) -> io::Result<()> {
        let Some(s) = self.sending.as_mut() else { return Ok(()) };
        if s.todo.attrs.remove(&id) {
            match src.describe(id) {
                Ok(d) => {
                    s.attrs_aside.insert(id, d);
                }
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether block `block` of `file` still waits in the set (a `SendFirst` waiter polls it).
    pub fn is_pending(&self, file: FileId, block: u64) -> bool {
        self.sending.as_ref().is_some_and(|s| s.todo.blocks.contains(file, block))
    }

    // ----- the sender (004:9) -----

    /// The next item of the set: directories first, then blocks, then attributes; `next_first`
    /// is a block a mutation waits for (sent before the others). `None` when the set is all sent
    /// (then `finish`).
    pub fn next_item(&mut self, src: &dyn Source, next_first: Option<(FileId, u64)>) -> io::Result<Option<Item>> {
        let Some(s) = self.sending.as_mut() else { return Ok(None) };
        if let Some((file, block)) = next_first.filter(|(f, b)| s.todo.blocks.contains(*f, *b)) {
            s.todo.blocks.remove(file, block);
            return Ok(Some(Item::Block { file, block, data: read_block(src, file, block)? }));
        }
        if let Some((dir, entries)) = s.entries_aside.pop_first() {
            return Ok(Some(Item::Entries { dir, entries }));
        }
        if let Some(dir) = s.todo.entries.pop_first() {
            return Ok(Some(Item::Entries { dir, entries: gone_as_empty(src.entries(dir))? }));
        }
        if let Some(((file, block), data)) = s.blocks_aside.pop_first() {
            s.bytes_aside -= data.len();
            return Ok(Some(Item::Block { file, block, data }));
        }
        while let Some((file, block)) = s.todo.blocks.first() {
            let data = read_block(src, file, block)?;
            if data.is_empty() {
                // Past the file's end: so is the rest of it (see `begin`).
                s.todo.blocks.remove_from(file, block);
                continue;
            }
            s.todo.blocks.remove(file, block);
            return Ok(Some(Item::Block { file, block, data }));
        }
        if let Some((_, desc)) = s.attrs_aside.pop_first() {
            return Ok(Some(Item::Node(desc)));
        }
        while let Some(id) = s.todo.attrs.pop_first() {
            match src.describe(id) {
                Ok(d) => return Ok(Some(Item::Node(d))),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The set is all sent and the target committed it: the next swap may come (the caller
    /// clears the sync map's plan).
    pub fn finish(&mut self) -> Option<u64> {
        self.sending.take().map(|s| s.id)
    }

    /// The set could not be completed (the connection broke, the target restarted): it is
    /// dropped. Its locations are still marked in the sync map (only a commit clears them),
    /// so the next set carries them.
    pub fn abandon(&mut self) -> Option<u64> {
        self.sending.take().map(|s| s.id)
    }

    /// Bytes of images set aside now.
    pub fn bytes_aside(&self) -> usize {
        self.sending.as_ref().map_or(0, |s| s.bytes_aside)
    }
}

/// A block's bytes now (short at the file's end; empty past it or when the file is gone).
fn read_block(src: &dyn Source, file: FileId, block: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut n = 0;
    while n < buf.len() {
        match src.read(file, block * BLOCK_SIZE + n as u64, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if is_gone(&e) => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

fn gone_as_empty<T>(r: io::Result<Vec<T>>) -> io::Result<Vec<T>> {
    match r {
        Err(e) if is_gone(&e) => Ok(Vec::new()),
        r => r,
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE))
}

#[cfg(test)]
#[path = "sets_tests.rs"]
mod tests;
