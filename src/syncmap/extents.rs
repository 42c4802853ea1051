//! Marked blocks: per file, sorted, non-overlapping ranges, each with the [`Tag`] saying what
//! clears it. Pure data; the map above keeps its indexes in step through [`Change`].

use std::collections::BTreeMap;

use crate::limits::BLOCK_SIZE;
use crate::types::{FileId, Lsn};

/// An inclusive range of block indices (`first..=last`). Inclusive, so the last block index
/// `u64::MAX` is representable without a special case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRange {
    pub first: u64,
    pub last: u64,
}

impl BlockRange {
    /// `first..=last`; panics when `first > last` (only a bug builds an empty range).
    pub fn new(first: u64, last: u64) -> BlockRange {
        assert!(first <= last, "empty block range {first}..={last}");
        BlockRange { first, last }
    }

    /// The blocks a byte range touches; `None` for an empty one. A range running past the last
    /// byte a u64 offset can name is cut there (no file can hold bytes beyond it).
    pub fn of_bytes(offset: u64, len: u64) -> Option<BlockRange> {
        if len == 0 {
            return None;
        }
        let last_byte = offset.saturating_add(len - 1);
        Some(BlockRange::new(offset / BLOCK_SIZE, last_byte / BLOCK_SIZE))
    }

    /// Number of blocks, as u128 because `0..=u64::MAX` holds 2^64 of them.
    pub fn blocks(&self) -> u128 {
        u128::from(self.last - self.first) + 1
    }

    /// The byte offset of the first block, saturating for block indices past any file size.
    pub fn byte_offset(&self) -> u64 {
        self.first.saturating_mul(BLOCK_SIZE)
    }

    /// The byte length of the range, saturating like [`BlockRange::byte_offset`].
    pub fn byte_len(&self) -> u64 {
        u64::try_from(self.blocks() * u128::from(BLOCK_SIZE)).unwrap_or(u64::MAX)
    }

    pub fn contains(&self, block: u64) -> bool {
        self.first <= block && block <= self.last
    }
}

/// What a marked piece still waits for before its indicator may be reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Ordered shipping: the piece's set of pending update ids, represented by its highest
    /// member `max` (see the module docs for why that is the whole set under in-order acks).
    /// `min` is a lower bound of the lowest member, kept only to answer `oldest_pending`.
    Ordered { min: Lsn, max: Lsn },
    /// Not tied to any update id (the target fell back, or the update id was already past the
    /// ordered stream): only a resync that sends the block's current contents clears it.
    Unordered,
}

/// A piece's state: the resync generation it was last marked in, and what it waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tag {
    /// The map's generation when the piece was last marked; a resync plan with id ≥ `generation`
    /// covers it (plans take the current generation and then advance it).
    pub generation: u64,
    pub pending: Pending,
}

impl Tag {
    pub fn ordered(generation: u64, lsn: Lsn) -> Tag {
        Tag { generation, pending: Pending::Ordered { min: lsn, max: lsn } }
    }

    pub fn unordered(generation: u64) -> Tag {
        Tag { generation, pending: Pending::Unordered }
    }

    /// The tag of a block carrying both `self` and `other`. A newer generation wins outright:
    /// everything of an older one is in a resync plan already taken, so its only remaining duty
    /// is the newer one's. Within one generation the pending sets unite: the highest id stays
    /// the maximum and an unordered duty can't be discharged by an ack, so it dominates.
    /// Associative and commutative, so merge order never matters.
    pub fn combine(self, other: Tag) -> Tag {
        if self.generation != other.generation {
            return if self.generation > other.generation { self } else { other };
        }
        let pending = match (self.pending, other.pending) {
            (Pending::Ordered { min: a, max: b }, Pending::Ordered { min: c, max: d }) => {
                Pending::Ordered { min: a.min(c), max: b.max(d) }
            }
            _ => Pending::Unordered,
        };
        Tag { generation: self.generation, pending }
    }

    /// Whether two adjacent pieces with these tags may become one without clearing any block
    /// later or earlier than its own tag says (`min` is only a lower bound, so it may differ).
    fn merges_with(&self, other: &Tag) -> bool {
        self.generation == other.generation
            && match (self.pending, other.pending) {
                (Pending::Ordered { max: a, .. }, Pending::Ordered { max: b, .. }) => a == b,
                (Pending::Unordered, Pending::Unordered) => true,
                _ => false,
            }
    }
}

/// One stored range with its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub range: BlockRange,
    pub tag: Tag,
}

/// The pieces one operation took out and put in, so the caller can update its indexes. Pieces
/// that came out unchanged are in neither list.
#[derive(Default, Debug)]
pub(crate) struct Change {
    pub removed: Vec<Piece>,
    pub added: Vec<Piece>,
}

/// Every file's marked blocks, in one tree keyed by (file, first block): one tree per target
/// rather than one per file, because a tree's first node costs about 550 bytes and a target may
/// track hundreds of thousands of files with a single dirty range each.
///
/// Invariant: per file, pieces are sorted and non-overlapping. Marking merges adjacent pieces
/// whose tags `merges_with` each other, so a run marked with one tag is one piece.
#[derive(Clone, Debug, Default)]
pub(crate) struct Extents {
    /// (file, first block) → (last block, tag)
    pieces: BTreeMap<(FileId, u64), (u64, Tag)>,
}

impl Extents {
    /// Pieces in all files.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn clear(&mut self) {
        self.pieces.clear();
    }

    /// Every piece, by file then block.
    pub fn iter(&self) -> impl Iterator<Item = (FileId, Piece)> + '_ {
        self.pieces
            .iter()
            .map(|(&(file, first), &(last, tag))| (file, Piece { range: BlockRange { first, last }, tag }))
    }

    /// One file's pieces, in block order.
    pub fn of(&self, file: FileId) -> impl DoubleEndedIterator<Item = Piece> + '_ {
        self.pieces.range((file, 0)..=(file, u64::MAX)).map(piece)
    }

    pub fn covering(&self, file: FileId, block: u64) -> Option<Piece> {
        let p = self.pieces.range((file, 0)..=(file, block)).next_back().map(piece)?;
        (p.range.last >= block).then_some(p)
    }

    pub fn remove(&mut self, file: FileId, first: u64) -> Option<Piece> {
        let (last, tag) = self.pieces.remove(&(file, first))?;
        Some(Piece { range: BlockRange { first, last }, tag })
    }

    /// Appends a piece past every stored one of `file` (decoding). Returns false, changing
    /// nothing, when it would overlap or come before the file's last stored piece.
    pub fn push_back(&mut self, file: FileId, p: Piece) -> bool {
        if self.of(file).next_back().is_some_and(|last| p.range.first <= last.range.last) {
            return false;
        }
        self.pieces.insert((file, p.range.first), (p.range.last, p.tag));
        true
    }

    /// Marks `range` of `file` with `tag`: blocks already marked get `old.combine(tag)`, the
    /// others `tag`; then equal neighbours merge. Touches only the pieces overlapping or
    /// adjacent to `range`.
    pub fn mark(&mut self, file: FileId, range: BlockRange, tag: Tag, change: &mut Change) {
        let touching = self.touching(file, range);
        let mut out: Vec<Piece> = Vec::with_capacity(touching.len() + 2);
        // The first block of `range` not yet emitted; None once all of it is.
        let mut next = Some(range.first);
        for p in &touching {
            if p.range.first < range.first {
                push_merged(&mut out, BlockRange::new(p.range.first, range.first - 1), p.tag);
            }
            let (ov_first, ov_last) = (p.range.first.max(range.first), p.range.last.min(range.last));
            if ov_first <= ov_last {
                if let Some(n) = next
                    && n < ov_first
                {
                    push_merged(&mut out, BlockRange::new(n, ov_first - 1), tag);
                }
                push_merged(&mut out, BlockRange::new(ov_first, ov_last), p.tag.combine(tag));
                next = ov_last.checked_add(1).filter(|&n| n <= range.last);
            }
            if p.range.last > range.last {
                if let Some(n) = next.take() {
                    push_merged(&mut out, BlockRange::new(n, range.last), tag);
                }
                push_merged(&mut out, BlockRange::new(range.last + 1, p.range.last), p.tag);
            }
        }
        if let Some(n) = next {
            push_merged(&mut out, BlockRange::new(n, range.last), tag);
        }
        self.replace(file, touching, out, change);
    }

    /// Joins pieces of `file` across the `merges` smallest gaps (ties: leftmost first). The
    /// joined piece covers the gap too, with the tags combined: coarser, never losing a block.
    pub fn coarsen(&mut self, file: FileId, merges: usize, change: &mut Change) {
        let pieces: Vec<Piece> = self.of(file).collect();
        if pieces.len() < 2 || merges == 0 {
            return;
        }
        let mut gaps: Vec<(u64, usize)> =
            pieces.windows(2).enumerate().map(|(i, w)| (w[1].range.first - w[0].range.last - 1, i)).collect();
        gaps.sort_unstable();
        let mut join = vec![false; pieces.len() - 1];
        for &(_, i) in gaps.iter().take(merges) {
            join[i] = true;
        }
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i;
            while j < join.len() && join[j] {
                j += 1;
            }
            if j > i {
                let tag = pieces[i..=j].iter().map(|p| p.tag).reduce(Tag::combine).expect("a run of two or more");
                let range = BlockRange::new(pieces[i].range.first, pieces[j].range.last);
                for p in &pieces[i..=j] {
                    self.pieces.remove(&(file, p.range.first));
                    change.removed.push(*p);
                }
                self.pieces.insert((file, range.first), (range.last, tag));
                change.added.push(Piece { range, tag });
            }
            i = j + 1;
        }
    }

    /// Gives every piece of every file `tag` and merges the neighbours that then become equal.
    pub fn retag_all(&mut self, tag: Tag) {
        let old = std::mem::take(&mut self.pieces);
        let mut out: Vec<(FileId, Piece)> = Vec::with_capacity(old.len());
        for ((file, first), (last, _)) in old {
            let range = BlockRange { first, last };
            match out.last_mut() {
                Some((f, prev)) if *f == file && prev.range.last.checked_add(1) == Some(first) => {
                    prev.range.last = last;
                }
                _ => out.push((file, Piece { range, tag })),
            }
        }
        self.pieces = out.into_iter().map(|(f, p)| ((f, p.range.first), (p.range.last, p.tag))).collect();
    }

    /// Drops every piece whose tag `clear` says is done.
    pub fn remove_where(&mut self, clear: impl Fn(&Tag) -> bool) {
        self.pieces.retain(|_, (_, tag)| !clear(tag));
    }

    /// A file's marked blocks as maximal ranges, whatever their tags.
    pub fn coalesced(&self, file: FileId) -> Vec<BlockRange> {
        let mut out: Vec<BlockRange> = Vec::new();
        for p in self.of(file) {
            match out.last_mut() {
                Some(prev) if prev.last.checked_add(1) == Some(p.range.first) => prev.last = p.range.last,
                _ => out.push(p.range),
            }
        }
        out
    }

    /// The stored pieces of `file` overlapping `range` or adjacent to it, in order.
    fn touching(&self, file: FileId, range: BlockRange) -> Vec<Piece> {
        let hi = range.last.saturating_add(1);
        let mut found: Vec<Piece> = self
            .pieces
            .range((file, 0)..=(file, hi))
            .rev()
            .take_while(|(_, (last, _))| last.saturating_add(1) >= range.first)
            .map(piece)
            .collect();
        found.reverse();
        found
    }

    /// Swaps the sorted pieces `old` (all stored) for the sorted pieces `new`, reporting only
    /// those that actually differ.
    fn replace(&mut self, file: FileId, old: Vec<Piece>, new: Vec<Piece>, change: &mut Change) {
        let (mut o, mut n) = (old.into_iter().peekable(), new.into_iter().peekable());
        loop {
            match (o.peek(), n.peek()) {
                (Some(a), Some(b)) if a == b => {
                    o.next();
                    n.next();
                }
                (Some(a), Some(b)) if a.range.first <= b.range.first => {
                    self.pieces.remove(&(file, a.range.first));
                    change.removed.push(o.next().expect("peeked"));
                }
                (Some(a), None) => {
                    self.pieces.remove(&(file, a.range.first));
                    change.removed.push(o.next().expect("peeked"));
                }
                (_, Some(_)) => {
                    let b = n.next().expect("peeked");
                    // Any stored piece at b's first block comes before it in `old` and was
                    // removed already (old pieces with first ≤ b.first go first).
                    self.pieces.insert((file, b.range.first), (b.range.last, b.tag));
                    change.added.push(b);
                }
                (None, None) => break,
            }
        }
    }
}

fn piece((&(_, first), &(last, tag)): (&(FileId, u64), &(u64, Tag))) -> Piece {
    Piece { range: BlockRange { first, last }, tag }
}

/// Appends `range` with `tag` to sorted `out`, merging it into the last piece when they touch
/// and their tags may merge.
fn push_merged(out: &mut Vec<Piece>, range: BlockRange, tag: Tag) {
    if let Some(prev) = out.last_mut()
        && prev.range.last.checked_add(1) == Some(range.first)
        && prev.tag.merges_with(&tag)
    {
        prev.range.last = range.last;
        prev.tag = prev.tag.combine(tag);
        return;
    }
    out.push(Piece { range, tag });
}
