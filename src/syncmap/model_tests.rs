//! The sync map against a naive model, over seeded random runs of marks, acks, fall-backs,
//! resyncs, restarts (encode/decode) and the memory bound.
//!
//! The model keeps, per location, the set of duties the claims give it: `Ack(lsn)` (the
//! update's id is pending; an ack of lsn or later removes it, 000:4) or `Resync(generation)`
//! (ordered shipping was abandoned for it; a resync plan with id ≥ generation removes it,
//! 000:13). A location is dirty while it has a duty. Checked after every step:
//! - never lose a block: every location the model says is dirty is dirty in the map;
//! - no duty can be dropped early: the map's tag on it is cleared no sooner than the duty;
//! - with limits too large to coarsen, the map's dirty set is exactly the model's;
//! - after a full ack with no resync owed, clean means clean; and each run ends healed.
//!
//! Seeds: `FERRYFS_SIM_SEEDS` (default 200) from `FERRYFS_SIM_SEED_BASE` (default 0);
//! `FERRYFS_SEED=n` runs one. A failure prints the line that replays it.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::extents::{Pending, Tag};
use super::*;
use crate::limits::BLOCK_SIZE;
use crate::types::{FileId, Lsn};

const STEPS: usize = 1_000;
const FILES: u64 = 6;
const BLOCKS: u64 = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Loc {
    Block(FileId, u64),
    Attr(FileId),
    Entries(FileId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Duty {
    Ack(Lsn),
    Resync(u64),
}

struct Model {
    duties: BTreeMap<Loc, BTreeSet<Duty>>,
    mode: Mode,
    generation: u64,
    /// A full resync owed since this generation.
    full: Option<u64>,
}

impl Model {
    fn new() -> Model {
        Model { duties: BTreeMap::new(), mode: Mode::Ordered { acked_below: Lsn(0) }, generation: 0, full: None }
    }

    fn mark(&mut self, loc: Loc, lsn: Lsn) {
        let duty = match self.mode {
            Mode::Ordered { acked_below } if lsn >= acked_below => Duty::Ack(lsn),
            Mode::Resyncing { resume_from, .. } if lsn >= resume_from => Duty::Ack(lsn),
            _ => Duty::Resync(self.generation),
        };
        self.duties.entry(loc).or_default().insert(duty);
    }

    fn ack(&mut self, upto: Lsn) {
        let Mode::Ordered { acked_below } = &mut self.mode else { return };
        *acked_below = (*acked_below).max(Lsn(upto.0 + 1));
        self.retain(|d| !matches!(d, Duty::Ack(l) if *l <= upto));
    }

    fn unorder(&mut self, generation: u64) {
        for set in self.duties.values_mut() {
            *set = set.iter().map(|&d| if let Duty::Ack(_) = d { Duty::Resync(generation) } else { d }).collect();
        }
    }

    fn fall_back(&mut self) {
        self.mode = Mode::FallenBack;
        self.unorder(self.generation);
    }

    fn plan(&mut self, resume_from: Lsn) -> PlanId {
        let id = PlanId(self.generation);
        self.unorder(id.0);
        self.generation += 1;
        self.mode = Mode::Resyncing { plan: id, resume_from };
        id
    }

    fn done(&mut self, id: PlanId) -> bool {
        let Mode::Resyncing { plan, resume_from } = self.mode else { return false };
        if plan != id {
            return false;
        }
        self.retain(|d| !matches!(d, Duty::Resync(g) if *g <= id.0));
        if self.full.is_some_and(|g| g <= id.0) {
            self.full = None;
        }
        self.mode = Mode::Ordered { acked_below: resume_from };
        true
    }

    /// The map hit its file bound: it owes a full resync, and an ordered map falls back.
    fn overflow(&mut self) {
        self.full = Some(self.generation);
        if let Mode::Ordered { .. } = self.mode {
            self.fall_back();
        }
    }

    fn retain(&mut self, keep: impl Fn(&Duty) -> bool) {
        for set in self.duties.values_mut() {
            set.retain(&keep);
        }
        self.duties.retain(|_, s| !s.is_empty());
    }

    fn resync_owed(&self) -> bool {
        self.full.is_some() || self.duties.values().flatten().any(|d| matches!(d, Duty::Resync(_)))
    }
}

fn is_dirty(map: &SyncMap, loc: Loc) -> bool {
    match loc {
        Loc::Block(f, b) => map.is_block_dirty(f, b),
        Loc::Attr(f) => map.is_attr_dirty(f),
        Loc::Entries(f) => map.is_entries_dirty(f),
    }
}

fn tag_of(map: &SyncMap, loc: Loc) -> Option<Tag> {
    let (Loc::Block(f, _) | Loc::Attr(f) | Loc::Entries(f)) = loc;
    let marks = map.files.get(&f)?;
    match loc {
        Loc::Block(_, b) => map.pieces.covering(f, b).map(|p| p.tag),
        Loc::Attr(_) => marks.attr,
        Loc::Entries(_) => marks.entries,
    }
}

fn map_dirty_set(map: &SyncMap) -> BTreeSet<Loc> {
    let mut out = BTreeSet::new();
    for f in map.dirty_files() {
        for r in map.dirty_ranges(f) {
            out.extend((r.first..=r.last).map(|b| Loc::Block(f, b)));
        }
        // The stored flags, not is_*_dirty: those also answer true while a full resync is owed.
        if map.files[&f].attr.is_some() {
            out.insert(Loc::Attr(f));
        }
        if map.files[&f].entries.is_some() {
            out.insert(Loc::Entries(f));
        }
    }
    out
}

fn check(map: &SyncMap, model: &Model, exact: bool) -> Result<(), String> {
    map.check_invariants();
    if map.mode() != model.mode {
        return Err(format!("mode {:?}, model {:?}", map.mode(), model.mode));
    }
    if map.full_resync_owed() != model.full.is_some() {
        return Err(format!("full resync owed {}, model {:?}", map.full_resync_owed(), model.full));
    }
    if map.needs_resync() != (model.resync_owed() || !matches!(model.mode, Mode::Ordered { .. })) && exact {
        return Err(format!("needs_resync {}, model disagrees", map.needs_resync()));
    }
    for (&loc, duties) in &model.duties {
        if !is_dirty(map, loc) {
            return Err(format!("lost {loc:?}: the model still has {duties:?}"));
        }
        if model.full.is_some() {
            continue; // the map may have forgotten its files; the full resync covers them
        }
        let tag = tag_of(map, loc).expect("dirty and no full resync: a tag covers it");
        for &duty in duties {
            match (duty, tag.pending) {
                (Duty::Ack(l), Pending::Ordered { max, .. }) => {
                    if max < l {
                        return Err(format!("{loc:?}: would clear at ack {max:?}, before {l:?}"));
                    }
                    if map.oldest_pending().is_none_or(|p| p > l) {
                        return Err(format!("{loc:?} awaits {l:?} but oldest_pending is {:?}", map.oldest_pending()));
                    }
                }
                (Duty::Ack(_), Pending::Unordered) => {}
                (Duty::Resync(g), pending) => {
                    let plan_covers = matches!(model.mode, Mode::Resyncing { plan, .. } if g <= plan.0);
                    if tag.generation < g || (matches!(pending, Pending::Ordered { .. }) && !plan_covers) {
                        return Err(format!("{loc:?}: duty {duty:?} under tag {tag:?}"));
                    }
                }
            }
        }
    }
    if exact {
        let mine = map_dirty_set(map);
        let model_set: BTreeSet<Loc> = model.duties.keys().copied().collect();
        if mine != model_set {
            let extra: Vec<_> = mine.difference(&model_set).take(5).collect();
            return Err(format!("not exact: the map also marks {extra:?}"));
        }
    }
    Ok(())
}

struct Run {
    map: SyncMap,
    model: Model,
    limits: Limits,
    next_lsn: u64,
    overflows_seen: u64,
}

impl Run {
    fn lsn(&mut self, rng: &mut ChaCha8Rng) -> Lsn {
        if rng.gen_bool(0.1) {
            Lsn(rng.gen_range(0..=self.next_lsn)) // out of order, or already passed
        } else {
            self.next_lsn += 1;
            Lsn(self.next_lsn)
        }
    }

    /// Mirrors a file-bound overflow the last call caused into the model.
    fn follow_overflow(&mut self) {
        let overflows = self.map.stats().file_overflows;
        if overflows > self.overflows_seen {
            self.overflows_seen = overflows;
            self.model.overflow();
        }
    }

    fn mark(&mut self, loc: Loc, lsn: Lsn) {
        match loc {
            Loc::Block(f, b) => self.map.mark_blocks(lsn, f, BlockRange::new(b, b)),
            Loc::Attr(f) => self.map.mark_attr(lsn, f),
            Loc::Entries(f) => self.map.mark_entries(lsn, f),
        }
        self.follow_overflow();
        self.model.mark(loc, lsn);
    }

    fn step(&mut self, rng: &mut ChaCha8Rng) -> Result<String, String> {
        let file = FileId(2 + rng.gen_range(0..FILES));
        let roll = rng.gen_range(0..100);
        Ok(match roll {
            0..=49 => {
                let lsn = self.lsn(rng);
                let offset = rng.gen_range(0..BLOCKS * BLOCK_SIZE);
                let len = if rng.gen_bool(0.5) { rng.gen_range(1..8) * BLOCK_SIZE } else { rng.gen_range(0..20_000) };
                self.map.mark_write(lsn, file, offset, len);
                self.follow_overflow();
                if let Some(r) = BlockRange::of_bytes(offset, len) {
                    for b in r.first..=r.last {
                        self.model.mark(Loc::Block(file, b), lsn);
                    }
                }
                format!("mark_write({lsn:?}, {file}, {offset}, {len})")
            }
            50..=57 => {
                let lsn = self.lsn(rng);
                let loc = if rng.gen_bool(0.5) { Loc::Attr(file) } else { Loc::Entries(file) };
                self.mark(loc, lsn);
                format!("mark {loc:?} {lsn:?}")
            }
            58..=79 => {
                let upto = if rng.gen_bool(0.2) { Lsn(self.next_lsn) } else { Lsn(rng.gen_range(0..=self.next_lsn)) };
                self.map.ack(upto);
                self.model.ack(upto);
                format!("ack({upto:?})")
            }
            80..=83 => {
                self.map.fall_back();
                self.model.fall_back();
                "fall_back()".into()
            }
            84..=89 => {
                let resume_from = Lsn((self.next_lsn + 1).saturating_sub(rng.gen_range(0..3)));
                let plan = self.map.resync_plan(resume_from);
                let id = self.model.plan(resume_from);
                if plan.id != id || plan.full != self.model.full.is_some() {
                    return Err(format!("plan {:?} full {}, model {id:?} {:?}", plan.id, plan.full, self.model.full));
                }
                let listed: BTreeSet<Loc> = plan
                    .files
                    .iter()
                    .flat_map(|f| {
                        let blocks =
                            f.blocks.iter().flat_map(move |r| (r.first..=r.last).map(move |b| Loc::Block(f.file, b)));
                        let flags = [(f.attr, Loc::Attr(f.file)), (f.entries, Loc::Entries(f.file))];
                        blocks.chain(flags.into_iter().filter(|(set, _)| *set).map(|(_, l)| l))
                    })
                    .collect();
                if !plan.full
                    && let Some(missing) = self.model.duties.keys().find(|l| !listed.contains(l))
                {
                    return Err(format!("the plan leaves out {missing:?}"));
                }
                format!("resync_plan({resume_from:?}) = {:?}", plan.id)
            }
            90..=95 => {
                let current = self.map.outstanding_plan();
                let id = match current {
                    Some(id) if rng.gen_bool(0.9) => id,
                    _ => PlanId(rng.gen_range(0..=self.model.generation)),
                };
                let accepted = self.map.resync_done(id).is_ok();
                if accepted != self.model.done(id) {
                    return Err(format!("resync_done({id:?}) accepted: {accepted}, model disagrees"));
                }
                format!("resync_done({id:?}) = {accepted}")
            }
            96..=97 => {
                let bytes = self.map.encode();
                let back = SyncMap::decode(&bytes).map_err(|e| format!("decode of our own encoding: {e}"))?;
                self.map = back.with_limits(self.limits);
                self.overflows_seen = 0;
                if self.map.encode() != bytes {
                    return Err("restart changed the map".into());
                }
                "restart (encode, decode)".into()
            }
            98 => {
                self.map.require_full_resync();
                self.model.full = Some(self.model.generation);
                "require_full_resync()".into()
            }
            _ => {
                // A healing point: a full ack; with no resync owed, clean means clean.
                let upto = Lsn(self.next_lsn);
                self.map.ack(upto);
                self.model.ack(upto);
                if matches!(self.model.mode, Mode::Ordered { .. }) && !self.model.resync_owed() {
                    if !self.map.is_clean() {
                        return Err(format!(
                            "after a full ack with nothing to resync, {:?} stays",
                            map_dirty_set(&self.map)
                        ));
                    }
                    assert!(self.model.duties.is_empty());
                }
                format!("full ack({upto:?})")
            }
        })
    }

    /// The end of a run: resync whatever is owed, ack everything; both must be clean.
    fn heal(&mut self) -> Result<(), String> {
        if self.map.needs_resync() {
            let resume_from = Lsn(self.next_lsn + 1);
            let plan = self.map.resync_plan(resume_from);
            let id = self.model.plan(resume_from);
            self.map.resync_done(plan.id).map_err(|e| e.to_string())?;
            self.model.done(id);
        }
        self.map.ack(Lsn(self.next_lsn));
        self.model.ack(Lsn(self.next_lsn));
        if !self.map.is_clean() || !self.model.duties.is_empty() || self.map.needs_resync() {
            return Err(format!("not clean after healing: {:?}", map_dirty_set(&self.map)));
        }
        Ok(())
    }
}

fn run_seed(seed: u64) -> Result<(u64, u64), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A third of the seeds can't coarsen (exact comparison), a third coarsen, a third also
    // overflow the file bound.
    let (limits, exact) = match seed % 3 {
        0 => (Limits::DEFAULT, true),
        1 => (Limits::new(12, FILES as usize), false),
        _ => (Limits::new(8, 3), false),
    };
    let mut run =
        Run { map: SyncMap::new().with_limits(limits), model: Model::new(), limits, next_lsn: 0, overflows_seen: 0 };
    let trace = std::env::var_os("FERRYFS_SIM_TRACE").is_some();
    let mut coarsenings = 0;
    for step in 0..STEPS {
        let before = run.map.stats().coarsenings;
        let what = run.step(&mut rng).map_err(|e| format!("step {step}: {e}"))?;
        coarsenings += run.map.stats().coarsenings.saturating_sub(before);
        if trace {
            println!("seed {seed} step {step}: {what}");
        }
        check(&run.map, &run.model, exact).map_err(|e| format!("step {step} ({what}): {e}"))?;
    }
    run.heal()?;
    Ok((coarsenings, run.map.stats().file_overflows))
}

#[test]
fn the_sync_map_never_loses_a_location_the_model_says_is_dirty() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let seeds: Vec<u64> = match std::env::var("FERRYFS_SEED") {
        Ok(s) => vec![s.parse().expect("FERRYFS_SEED must be a number")],
        Err(_) => {
            let base = env("FERRYFS_SIM_SEED_BASE", 0);
            (base..base + env("FERRYFS_SIM_SEEDS", 200)).collect()
        }
    };
    let (mut coarsenings, mut overflows) = (0, 0);
    for &seed in &seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed));
        let failure = match result {
            Ok(Ok((c, o))) => {
                coarsenings += c;
                overflows += o;
                continue;
            }
            Ok(Err(msg)) => msg,
            Err(_) => "panicked (see above)".to_string(),
        };
        panic!(
            "seed {seed} failed: {failure}\nreplay it with: FERRYFS_SEED={seed} FERRYFS_SIM_TRACE=1 cargo test --release --lib syncmap::model_tests"
        );
    }
    println!("{} seeds × {STEPS} steps: {coarsenings} coarsenings, {overflows} file overflows", seeds.len());
    if seeds.len() >= 3 {
        assert!(coarsenings > 0 && overflows > 0, "the runs never reached the memory bound");
    }
}
