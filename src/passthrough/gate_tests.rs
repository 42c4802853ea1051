//! The core's gate and its before-change hooks (consistent sets, claims 004:1–7): a swap waits
//! for the mutations in flight and holds new ones; a hook sees the backing directory as it was
//! before the change.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use super::*;
use crate::format::ops::{NodeKind, Op, SetAttr};
use crate::io::NewNode;
use crate::journal::{JournalGeometry, recovery};
use crate::passthrough::{CoreConfig, IdTable};
use crate::sim::storage::SimStorage;
use crate::sim::tree::SimTree;

fn core(tree: SimTree) -> Arc<Core<SimStorage, SimTree>> {
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let opened = recovery::create(SimStorage::new(), g, crate::sim::crash::new_superblock()).unwrap();
    let ids = IdTable::from_snapshot(opened.ids.snapshot());
    Arc::new(Core::new(opened.journal, tree, ids, CoreConfig { sets_gate: true, ..CoreConfig::default() }).unwrap())
}

const FILE: NewNode<'static> = NewNode { kind: NodeKind::File, mode: 0o644, uid: 0, gid: 0, rdev: 0, target: b"" };

/// Records what `/f` held when each hook ran.
struct Recorder {
    tree: SimTree,
    seen: Mutex<Vec<String>>,
}

impl Recorder {
    fn f(&self) -> Vec<u8> {
        self.tree.listing().get("/f").map(|(_, d)| d.clone()).unwrap_or_default()
    }
}

impl Marks for Recorder {
    fn write(&self, _: Lsn, _: FileId, _: u64, _: u64) {}
    fn op(&self, _: Lsn, _: &Op) {}
    fn before_write(&self, _: FileId, offset: u64, len: u64) {
        let f = self.f();
        self.seen.lock().unwrap().push(format!(
            "before write {offset}+{len}: f holds {} bytes {:?}",
            f.len(),
            f.first()
        ));
    }
    fn before_op(&self, op: &Op) {
        let f = self.f();
        self.seen.lock().unwrap().push(format!("before {}: f holds {} bytes", op.name(), f.len()));
    }
}

#[test]
fn the_hooks_run_before_the_backing_directory_changes() {
    let tree = SimTree::new();
    let c = core(tree.clone());
    let rec = Arc::new(Recorder { tree, seen: Mutex::new(Vec::new()) });
    c.set_marks(rec.clone());
    let (id, _) = c.create(FileId::ROOT, b"f", &FILE).unwrap();
    c.write_via_tree(id, 0, &[7; 100]).unwrap();
    c.write_via_tree(id, 0, &[8; 10]).unwrap();
    c.set_attr(id, &SetAttr { size: Some(40), ..Default::default() }).unwrap();
    c.unlink(FileId::ROOT, b"f", false).unwrap();
    assert_eq!(
        *rec.seen.lock().unwrap(),
        vec![
            "before create: f holds 0 bytes",
            "before write 0+100: f holds 0 bytes None",
            "before write 0+10: f holds 100 bytes Some(7)",
            "before setattr: f holds 100 bytes",
            "before unlink: f holds 40 bytes",
        ]
    );
}

#[test]
fn a_swap_waits_for_the_mutation_in_flight_and_holds_new_ones() {
    let c = core(SimTree::new());
    let (id, _) = c.create(FileId::ROOT, b"f", &FILE).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    // A write in flight: its apply blocks until released.
    let (release, blocked) = mpsc::channel::<()>();
    let in_apply = Arc::new(AtomicBool::new(false));
    let a = {
        let (c, order, in_apply) = (c.clone(), order.clone(), in_apply.clone());
        std::thread::spawn(move || {
            c.write(id, 0, b"first", || {
                in_apply.store(true, Ordering::Release);
                blocked.recv().unwrap();
                order.lock().unwrap().push("write in flight ends");
                Ok(())
            })
            .unwrap();
        })
    };
    while !in_apply.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let swapped = Arc::new(AtomicBool::new(false));
    let s = {
        let (c, order, swapped) = (c.clone(), order.clone(), swapped.clone());
        std::thread::spawn(move || {
            let held = c.swap(|| order.lock().unwrap().push("swap"));
            swapped.store(true, Ordering::Release);
            held
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!swapped.load(Ordering::Acquire), "the swap did not wait for the write in flight");
    // A new mutation now waits behind the swap.
    let started = Arc::new(AtomicU32::new(0));
    let n = {
        let (c, order, started) = (c.clone(), order.clone(), started.clone());
        std::thread::spawn(move || {
            started.store(1, Ordering::Release);
            c.set_attr(id, &SetAttr { mode: Some(0o600), ..Default::default() }).unwrap();
            order.lock().unwrap().push("new mutation");
        })
    };
    while started.load(Ordering::Acquire) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(*order.lock().unwrap(), Vec::<&str>::new(), "nothing may pass while the write is in flight");
    release.send(()).unwrap();
    a.join().unwrap();
    let held = s.join().unwrap();
    n.join().unwrap();
    assert_eq!(*order.lock().unwrap(), vec!["write in flight ends", "swap", "new mutation"]);
    assert!(held >= Duration::from_millis(50), "the hold counts from asking for the gate: {held:?}");
}

/// Without set mode the core takes no gate at all, so a swap has nothing to hold mutations
/// with: asking for one is a programming error, not a silent swap that holds nothing.
#[test]
#[should_panic(expected = "a swap needs the gate")]
fn a_swap_without_the_gate_is_refused() {
    let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
    let opened = recovery::create(SimStorage::new(), g, crate::sim::crash::new_superblock()).unwrap();
    let ids = IdTable::from_snapshot(opened.ids.snapshot());
    let c = Core::new(opened.journal, SimTree::new(), ids, CoreConfig::default()).unwrap();
    c.swap(|| {});
}
