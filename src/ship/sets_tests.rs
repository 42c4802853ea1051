//! The set state against a model (simulation first, docs/CONSISTENCY.md): a primary of a few
//! files, one directory and attributes, random mutations each preserving before it changes and
//! marking after, swaps at random points, a sender sending a few items at a time to a model
//! target, sets abandoned now and then (a broken connection). Invariants: when a set is
//! complete, the target equals the primary as it was at that set's swap, every location the
//! swap took was sent once, and the images set aside never pass their bound.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::format::ops::SetAttr;
use crate::syncmap::{PlanId, SyncMap};
use crate::types::Lsn;

const DIR: FileId = FileId(1);
const FILES: [u64; 4] = [10, 11, 12, 13];
const BS: usize = BLOCK_SIZE as usize;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    data: BTreeMap<u64, Vec<u8>>,
    mode: BTreeMap<u64, u32>,
    /// The directory's names: name → file id.
    names: BTreeMap<Vec<u8>, u64>,
}

impl State {
    fn new() -> State {
        let mut s = State::default();
        for (i, f) in FILES.iter().enumerate() {
            s.data.insert(*f, vec![i as u8; BS * 2 + 100]);
            s.mode.insert(*f, 0o644);
            s.names.insert(format!("f{i}").into_bytes(), *f);
        }
        s
    }

    fn desc(&self, id: u64) -> NodeDesc {
        NodeDesc { id, size: self.data[&id].len() as u64, mode: self.mode[&id], ..NodeDesc::default() }
    }

    fn listing(&self) -> Vec<(Vec<u8>, NodeDesc)> {
        self.names.iter().map(|(n, id)| (n.clone(), self.desc(*id))).collect()
    }
}

/// The primary's backing directory as `Source` sees it.
struct Primary(Mutex<State>);

impl Source for Primary {
    fn describe(&self, id: FileId) -> io::Result<NodeDesc> {
        Ok(self.0.lock().unwrap().desc(id.0))
    }
    fn entries(&self, dir: FileId) -> io::Result<Vec<(Vec<u8>, NodeDesc)>> {
        assert_eq!(dir, DIR);
        Ok(self.0.lock().unwrap().listing())
    }
    fn read(&self, id: FileId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.0.lock().unwrap();
        let d = &s.data[&id.0];
        let from = (offset as usize).min(d.len());
        let n = buf.len().min(d.len() - from);
        buf[..n].copy_from_slice(&d[from..from + n]);
        Ok(n)
    }
}

/// Applies one item to the model target, as a target applies a staged set.
fn apply(t: &mut State, item: Item) {
    match item {
        Item::Block { file, block, data } => {
            let d = t.data.get_mut(&file.0).unwrap();
            let at = block as usize * BS;
            if d.len() < at + data.len() {
                d.resize(at + data.len(), 0);
            }
            d[at..at + data.len()].copy_from_slice(&data);
        }
        Item::Node(n) => {
            t.data.get_mut(&n.id).unwrap().resize(n.size as usize, 0);
            t.mode.insert(n.id, n.mode);
        }
        Item::Entries { dir, entries } => {
            assert_eq!(dir, DIR);
            t.names = entries.into_iter().map(|(n, d)| (n, d.id)).collect();
        }
    }
}

/// Where two states differ, briefly.
fn diff(a: &State, b: &State) -> String {
    let mut out = Vec::new();
    for f in FILES {
        let (x, y) = (&a.data[&f], &b.data[&f]);
        if x != y {
            let at = x.iter().zip(y.iter()).position(|(p, q)| p != q);
            out.push(format!("file {f}: len {} vs {}, first difference at {at:?}", x.len(), y.len()));
        }
        if a.mode[&f] != b.mode[&f] {
            out.push(format!("file {f}: mode {:o} vs {:o}", a.mode[&f], b.mode[&f]));
        }
    }
    if a.names != b.names {
        out.push(format!("names {:?} vs {:?}", a.names, b.names));
    }
    out.join("; ")
}

struct World {
    p: Primary,
    sets: SetState,
    /// The target's sync map: marks after each mutation, a plan at each swap.
    map: SyncMap,
    lsn: u64,
    plan: Option<PlanId>,
    /// The target as it shows after each complete set.
    target: State,
    /// The set being applied at the target, staged until complete (then switched in).
    staged: Vec<Item>,
    /// The primary at the swap of the set being sent.
    at_swap: Option<State>,
    aside_max: usize,
    stats: (u64, u64, u64),
    seed: u64,
    log: Vec<String>,
}

impl World {
    /// One mutation: preserve (waiting for the sender past the bound), change, mark.
    fn mutate(&mut self, rng: &mut ChaCha8Rng) {
        let f = FILES[rng.gen_range(0..FILES.len())];
        match rng.gen_range(0..10) {
            0..=5 => {
                let len = rng.gen_range(1..3 * BS as u64);
                let offset = rng.gen_range(0..4 * BS as u64);
                self.until_preserved(|s, p| s.preserve_write(p, FileId(f), offset, len));
                let byte = rng.r#gen::<u8>();
                self.log.push(format!("write {f} [{offset}, {}) = {byte}", offset + len));
                let mut st = self.p.0.lock().unwrap();
                let d = st.data.get_mut(&f).unwrap();
                let end = (offset + len) as usize;
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[offset as usize..end].fill(byte);
                drop(st);
                let lsn = self.next_lsn();
                self.map.mark_write(lsn, FileId(f), offset, len);
            }
            6 | 7 => {
                let size = rng.gen_range(0..5 * BS as u64);
                let old = self.p.0.lock().unwrap().data[&f].len() as u64;
                self.log.push(format!("truncate {f} {old} -> {size}"));
                let op = Op::SetAttr { id: FileId(f), attr: SetAttr { size: Some(size), ..Default::default() } };
                self.until_preserved(|s, p| s.preserve_op(p, &op));
                self.p.0.lock().unwrap().data.get_mut(&f).unwrap().resize(size as usize, 0);
                // As `Core::set_attr`: the bytes a truncate destroyed are marked too; or, as a
                // re-mark from the journal after a crash does, everything past the new size.
                let lsn = self.next_lsn();
                if rng.gen_range(0..2) == 0 {
                    self.map.mark_write(lsn, FileId(f), size, u64::MAX - size);
                } else if old > size {
                    self.map.mark_write(lsn, FileId(f), size, old - size);
                }
                self.map.mark_attr(lsn, FileId(f));
            }
            8 => {
                let op = Op::SetAttr { id: FileId(f), attr: SetAttr { mode: Some(0o600), ..Default::default() } };
                self.until_preserved(|s, p| s.preserve_op(p, &op));
                self.p.0.lock().unwrap().mode.insert(f, 0o600 + rng.gen_range(0..8));
                let lsn = self.next_lsn();
                self.map.mark_attr(lsn, FileId(f));
            }
            _ => {
                // Two names trade places (a rename with RENAME_EXCHANGE).
                self.sets.preserve_entries(&self.p, DIR).unwrap();
                let mut st = self.p.0.lock().unwrap();
                let names: Vec<Vec<u8>> = st.names.keys().cloned().collect();
                let (a, b) =
                    (names[rng.gen_range(0..names.len())].clone(), names[rng.gen_range(0..names.len())].clone());
                let (ia, ib) = (st.names[&a], st.names[&b]);
                st.names.insert(a, ib);
                st.names.insert(b, ia);
                drop(st);
                let lsn = self.next_lsn();
                self.map.mark_entries(lsn, DIR);
            }
        }
        assert!(self.sets.bytes_aside() <= self.aside_max, "images aside past their bound");
    }

    /// Runs a preserve step; past the bound, has the sender send the waited-for block first.
    fn until_preserved(&mut self, mut step: impl FnMut(&mut SetState, &Primary) -> io::Result<Preserve>) {
        loop {
            match step(&mut self.sets, &self.p).unwrap() {
                Preserve::Done => return,
                Preserve::SendFirst { file, block } => {
                    self.stats.2 += 1;
                    while self.sets.is_pending(file, block) {
                        self.send(1, Some((file, block)));
                    }
                }
            }
        }
    }

    fn next_lsn(&mut self) -> Lsn {
        self.lsn += 1;
        Lsn(self.lsn)
    }

    /// Under the gate (no mutation is in flight here): the map's marks become the next set.
    fn swap(&mut self) {
        if self.sets.sending_id().is_some() || self.map.is_clean() {
            return;
        }
        let plan = self.map.resync_plan(Lsn(self.lsn + 1));
        assert!(self.sets.begin(plan.id.0, Marked::from_plan(&plan)));
        self.log.push(format!("swap {}", plan.id.0));
        self.plan = Some(plan.id);
        self.at_swap = Some(self.p.0.lock().unwrap().clone());
        self.staged.clear();
    }

    /// Up to `n` items of the set; at its end the staged set is switched in and checked.
    fn send(&mut self, n: usize, first: Option<(FileId, u64)>) {
        for _ in 0..n {
            match self.sets.next_item(&self.p, first).unwrap() {
                Some(item) => {
                    self.log.push(match &item {
                        Item::Block { file, block, data } => {
                            format!("  send block {file} {block} ({} bytes)", data.len())
                        }
                        Item::Node(n) => format!("  send node {} size {}", n.id, n.size),
                        Item::Entries { .. } => "  send entries".to_string(),
                    });
                    self.staged.push(item)
                }
                None => {
                    if self.sets.finish().is_some() {
                        self.map.resync_done(self.plan.take().unwrap()).unwrap();
                        let mut t = self.target.clone();
                        for item in self.staged.drain(..) {
                            apply(&mut t, item);
                        }
                        let want = self.at_swap.take().expect("a swap began this set");
                        assert!(
                            t == want,
                            "seed {}: the target after a set is not the primary at its swap: {}\n{}",
                            self.seed,
                            diff(&t, &want),
                            self.log[self.log.len().saturating_sub(80)..].join("\n")
                        );
                        self.target = t;
                        self.stats.0 += 1;
                    }
                    return;
                }
            }
        }
    }

    /// The connection broke: the target drops the set it had staged; the set goes back.
    fn abandon(&mut self) {
        if self.sets.sending_id().is_some() {
            self.sets.abandon();
            self.plan = None;
            self.log.push("abandon".into());
            self.staged.clear();
            self.at_swap = None;
            self.stats.1 += 1;
        }
    }
}

#[test]
fn every_complete_set_is_the_primary_at_its_swap() {
    let seeds = std::env::var("FERRYFS_SIM_SETS_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300u64);
    let base = std::env::var("FERRYFS_SIM_SEED_BASE").ok().and_then(|v| v.parse().ok()).unwrap_or(0u64);
    let mut totals = (0, 0, 0);
    for seed in base..base + seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let aside_max = [2 * BS, 8 * BS, 1 << 20][rng.gen_range(0..3)];
        let mut w = World {
            p: Primary(Mutex::new(State::new())),
            sets: SetState::new(aside_max),
            map: SyncMap::new_in_sync(Lsn(1)),
            lsn: 1,
            plan: None,
            target: State::new(),
            staged: Vec::new(),
            at_swap: None,
            aside_max,
            stats: (0, 0, 0),
            seed,
            log: Vec::new(),
        };
        for _ in 0..400 {
            match rng.gen_range(0..20) {
                0..=11 => w.mutate(&mut rng),
                12..=13 => w.swap(),
                14..=18 => {
                    let n = rng.gen_range(1..6);
                    w.send(n, None);
                }
                _ => {
                    if rng.gen_range(0..4) == 0 {
                        w.abandon()
                    }
                }
            }
        }
        // Quiesce: finish the set in flight, then one more swap and send carries the rest.
        for _ in 0..3 {
            w.send(usize::MAX, None);
            w.swap();
        }
        w.send(usize::MAX, None);
        let p = w.p.0.lock().unwrap().clone();
        assert!(w.target == p, "seed {seed}: quiet, the target is not the primary: {}", diff(&w.target, &p));
        totals = (totals.0 + w.stats.0, totals.1 + w.stats.1, totals.2 + w.stats.2);
    }
    eprintln!("{seeds} seeds: {} sets complete, {} abandoned, {} waits for the sender", totals.0, totals.1, totals.2);
    if seeds >= 50 {
        assert!(totals.0 > seeds && totals.1 > 0 && totals.2 > 0, "the model exercised too little: {totals:?}");
    }
}

#[test]
fn overwrites_within_an_interval_send_each_block_once() {
    let p = Primary(Mutex::new(State::new()));
    let mut map = SyncMap::new_in_sync(Lsn(1));
    let mut sets = SetState::new(1 << 20);
    for i in 0..1000u64 {
        let off = (i % 4) * BLOCK_SIZE;
        sets.preserve_write(&p, FileId(10), off, BLOCK_SIZE).unwrap();
        let mut st = p.0.lock().unwrap();
        let d = st.data.get_mut(&10).unwrap();
        d.resize(d.len().max(off as usize + BS), 0);
        d[off as usize..off as usize + BS].fill(i as u8);
        drop(st);
        map.mark_write(Lsn(i + 2), FileId(10), off, BLOCK_SIZE);
    }
    let plan = map.resync_plan(Lsn(1002));
    assert!(sets.begin(plan.id.0, Marked::from_plan(&plan)));
    let (mut blocks, mut nodes) = (0, 0);
    while let Some(item) = sets.next_item(&p, None).unwrap() {
        match item {
            Item::Block { .. } => blocks += 1,
            Item::Node(n) => {
                assert_eq!(n.id, 10);
                nodes += 1
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(blocks, 4, "1,000 writes to 4 blocks in one interval are 4 blocks sent");
    assert_eq!(nodes, 1, "and the file's attributes once (its size and mtime at the swap)");
    assert!(sets.finish().is_some());
    map.resync_done(plan.id).unwrap();
    assert!(map.is_clean(), "nothing changed since");
}

/// Every block of file 1, through `next_from`.
fn listed(b: &Blocks) -> Vec<u64> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(x) = b.next_from(FileId(1), at) {
        out.push(x);
        at = x + 1;
    }
    out
}

#[test]
fn block_ranges_merge_split_and_list() {
    let mut b = Blocks::default();
    b.insert(FileId(1), 5, 7);
    b.insert(FileId(1), 8, 9);
    b.insert(FileId(1), 1, 2);
    assert_eq!(listed(&b).len(), 7);
    assert!(b.remove(FileId(1), 6));
    assert!(!b.remove(FileId(1), 6));
    assert!(!b.contains(FileId(1), 6) && b.contains(FileId(1), 7) && b.contains(FileId(1), 5));
    assert_eq!(listed(&b), vec![1, 2, 5, 7, 8, 9]);
    assert_eq!(b.next_from(FileId(1), 3), Some(5));
    assert_eq!(b.next_from(FileId(1), 8), Some(8));
    let mut c = b.clone();
    c.remove_from(FileId(1), 8);
    assert_eq!(listed(&c), vec![1, 2, 5, 7]);
    assert_eq!(b.first(), Some((FileId(1), 1)));
    for x in [1, 2, 5, 7, 8, 9] {
        assert!(b.remove(FileId(1), x));
    }
    assert!(b.is_empty());
}
