//! Unit tests of the bunker link (`mod.rs`) and its `--bunker DIR` connector (`local.rs`).
//!
//! The link's state machine against a real bunker log in a directory (the `--bunker DIR`
//! path) and against a fake bunker whose reachability and acks a test switches.
//!
//! Fault model of the fake: unreachable (connect and every send fail), or reachable but
//! silent (records are taken and never acked; on a reconnect it stands where it last acked,
//! as a bunker that crashed before its fsync would).

use std::path::Path;

use super::*;
use crate::format::record;
use crate::format::superblock::Superblock;
use crate::journal::JournalGeometry;
use crate::os::storage::DirStorage;
use crate::proto::wire::split_records;
use crate::replica::bunker::BunkerCore;
use crate::types::FileId;

const GEO: JournalGeometry = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
const SET: [u8; 16] = [7; 16];
const TIMEOUT: Duration = Duration::from_millis(300);

fn journal(dir: &Path, geometry: JournalGeometry) -> Arc<Journal<DirStorage>> {
    let sb = Superblock::new(SET, 0, 0, Vec::new(), [0; 16]);
    Arc::new(Journal::create(DirStorage::new(dir), geometry, sb).unwrap())
}

fn write(j: &Journal<DirStorage>, n: usize, len: usize) {
    for i in 0..n {
        let tx = j.append_write(FileId(100), (i * len) as u64, &vec![i as u8; len]).unwrap();
        j.done(tx);
    }
}

fn config(mode: Mode, unreachable: Unreachable) -> BunkerConfig {
    let mut c = BunkerConfig::new("fake", mode, unreachable, TIMEOUT);
    c.timing = Timing {
        heartbeat_every: Duration::from_millis(200),
        watermark_every: Duration::from_millis(20),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        idle_wait: Duration::from_millis(1),
    };
    c
}

/// Every record of `j` from `from` on, as the journal holds them.
fn records_from(j: &Journal<DirStorage>, from: Lsn) -> Vec<u8> {
    let mut cur = j.cursor_at(from).unwrap();
    let mut out = Vec::new();
    j.read_records(&mut cur, j.next_lsn(), usize::MAX, &mut out).unwrap();
    out
}

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ----- the fake bunker -------------------------------------------------------------------

struct Fake {
    reachable: bool,
    acking: bool,
    start: Lsn,
    /// Durable: acked.
    next: Lsn,
    /// Taken on this connection, not yet acked.
    pending: Vec<u8>,
    pending_next: Lsn,
    records: Vec<u8>,
    restarts: Vec<Lsn>,
    watermarks: Vec<Lsn>,
    connects: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn fake(reachable: bool, acking: bool) -> Shared {
    Arc::new(Mutex::new(Fake {
        reachable,
        acking,
        start: Lsn(1),
        next: Lsn(1),
        pending: Vec::new(),
        pending_next: Lsn(1),
        records: Vec::new(),
        restarts: Vec::new(),
        watermarks: Vec::new(),
        connects: 0,
    }))
}

struct FakeConnector(Shared);
struct FakeSession(Shared, VecDeque<BunkerEvent>);

impl BunkerConnector for FakeConnector {
    fn connect(&mut self, _waker: Waker) -> Result<Box<dyn BunkerSession>, LinkError> {
        let mut f = self.0.lock().unwrap();
        if !f.reachable {
            return Err(LinkError::Failed("connection refused (fake)".into()));
        }
        f.connects += 1;
        f.pending.clear();
        f.pending_next = f.next;
        Ok(Box::new(FakeSession(self.0.clone(), VecDeque::new())))
    }
}

impl BunkerSession for FakeSession {
    fn position(&self) -> BunkerPosition {
        let f = self.0.lock().unwrap();
        BunkerPosition { epoch: 0, start_lsn: f.start, next_lsn: f.next, durable_next: f.next }
    }
    fn restart_at(&mut self, lsn: Lsn) -> Result<BunkerPosition, LinkError> {
        let mut f = self.0.lock().unwrap();
        f.restarts.push(lsn);
        f.records.clear();
        f.pending.clear();
        (f.start, f.next, f.pending_next) = (lsn, lsn, lsn);
        Ok(BunkerPosition { epoch: 0, start_lsn: lsn, next_lsn: lsn, durable_next: lsn })
    }
    fn send_records(&mut self, body: &[u8]) -> Result<(), String> {
        let mut f = self.0.lock().unwrap();
        if !f.reachable {
            return Err("connection reset (fake)".into());
        }
        for r in split_records(body) {
            let r = r.unwrap();
            let h = record::decode_header(r, r.len()).unwrap();
            assert_eq!(h.lsn, f.pending_next, "records arrive in order, none skipped");
            f.pending.extend_from_slice(r);
            f.pending_next = f.pending_next.next();
        }
        if f.acking {
            let pending = std::mem::take(&mut f.pending);
            f.records.extend_from_slice(&pending);
            f.next = f.pending_next;
            self.1.push_back(BunkerEvent::Ack(Lsn(f.next.0 - 1)));
        }
        Ok(())
    }
    fn watermark(&mut self, all_acked: Lsn) -> Result<(), String> {
        self.0.lock().unwrap().watermarks.push(all_acked);
        Ok(())
    }
    fn heartbeat(&mut self) -> Result<(), String> {
        if self.0.lock().unwrap().reachable { Ok(()) } else { Err("connection reset (fake)".into()) }
    }
    fn bye(&mut self, _reason: &str) {}
    fn event(&mut self, _wait: Duration) -> Option<BunkerEvent> {
        self.1.pop_front()
    }
}

fn linked(
    j: &Arc<Journal<DirStorage>>,
    c: BunkerConfig,
    hooks: Hooks,
    connector: Box<dyn BunkerConnector>,
) -> Arc<BunkerLink<DirStorage>> {
    let link = BunkerLink::new(j.clone(), c, hooks);
    j.set_mirror(link.clone());
    j.set_retention(link.clone());
    link.start(connector);
    link
}

/// Hooks of a mount whose one target holds nothing yet: the watermark stays at 0, so the
/// bunker frees nothing and a test can read back everything it got.
fn holding() -> Hooks {
    Hooks { targets_acked_below: Box::new(|| Some(Lsn(1))), ..Hooks::default() }
}

// ----- the tests -------------------------------------------------------------------------

#[test]
fn a_dir_bunker_in_sync_mode_holds_every_record_byte_for_byte_when_fsync_returns() {
    let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let j = journal(p.path(), GEO);
    let link = linked(
        &j,
        config(Mode::Sync, Unreachable::Degrade),
        holding(),
        Box::new(LocalBunkerConnector::new(b.path(), SET, 0, GEO)),
    );
    write(&j, 30, 5000);
    // A transaction still in flight goes too: the bunker gets every record.
    j.append_write(FileId(101), 0, b"in flight").unwrap();
    let started = Instant::now();
    let upto = j.sync_mirrored().unwrap();
    assert!(started.elapsed() < TIMEOUT, "answered by the bunker, not by a timeout");
    let snap = link.snapshot();
    assert!(snap.acked_below >= upto, "{snap:?}");
    assert_eq!((snap.state_name(), snap.mode()), ("in-sync", Mode::Sync));
    link.stop();
    let bunker = BunkerCore::open(DirStorage::new(b.path())).unwrap();
    let mut held = Vec::new();
    bunker.read(Lsn(1), usize::MAX, &mut held).unwrap();
    assert_eq!(held, records_from(&j, Lsn(1)));
}

#[test]
fn async_mode_answers_fsync_at_once_and_the_records_follow() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(false, true);
    let link =
        linked(&j, config(Mode::Async, Unreachable::Degrade), Hooks::default(), Box::new(FakeConnector(f.clone())));
    write(&j, 10, 1000);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    std::thread::sleep(TIMEOUT * 2);
    let snap = link.snapshot();
    assert!(snap.degraded.is_none(), "async mode never degrades: {snap:?}");
    assert_eq!(snap.state_name(), "disconnected");
    f.lock().unwrap().reachable = true;
    eventually("the bunker catches up", Duration::from_secs(5), || link.snapshot().link_state == LinkState::InSync);
    assert_eq!(f.lock().unwrap().records, records_from(&j, Lsn(1)));
    link.stop();
}

#[test]
fn a_bunker_that_never_acks_degrades_fsync_after_the_timeout_and_sync_returns_once_it_catches_up() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(true, false);
    let link =
        linked(&j, config(Mode::Sync, Unreachable::Degrade), Hooks::default(), Box::new(FakeConnector(f.clone())));
    write(&j, 5, 1000);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    let waited = started.elapsed();
    assert!(waited >= TIMEOUT - Duration::from_millis(20) && waited < TIMEOUT + Duration::from_secs(1), "{waited:?}");
    let snap = link.snapshot();
    assert_eq!((snap.state_name(), snap.mode()), ("degraded", Mode::Async), "{snap:?}");
    assert!(snap.degraded.as_ref().unwrap().1.contains("has not acknowledged"), "{snap:?}");
    // Degraded: the next fsync does not wait.
    write(&j, 1, 10);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    // Back: the link reconnects, the bunker catches up, sync mode returns.
    f.lock().unwrap().acking = true;
    eventually("sync mode restored", Duration::from_secs(5), || link.snapshot().degraded.is_none());
    write(&j, 3, 1000);
    let upto = j.sync_mirrored().unwrap();
    assert!(link.snapshot().acked_below >= upto);
    assert_eq!(f.lock().unwrap().records, records_from(&j, Lsn(1)));
    assert!(link.snapshot().reconnects >= 1);
    link.stop();
}

#[test]
fn an_unreachable_bunker_degrades_sync_mode_even_before_any_fsync() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(false, true);
    let link =
        linked(&j, config(Mode::Sync, Unreachable::Degrade), Hooks::default(), Box::new(FakeConnector(f.clone())));
    eventually("degraded", TIMEOUT + Duration::from_secs(2), || link.snapshot().degraded.is_some());
    let snap = link.snapshot();
    assert!(snap.degraded.as_ref().unwrap().1.starts_with("unreachable for 300ms"), "{snap:?}");
    assert!(snap.last_error.as_deref().unwrap().contains("connection refused"), "{snap:?}");
    write(&j, 2, 100);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    f.lock().unwrap().reachable = true;
    eventually("sync mode restored", Duration::from_secs(5), || link.snapshot().degraded.is_none());
    assert_eq!(link.snapshot().mode(), Mode::Sync);
    link.stop();
}

#[test]
fn the_wait_policy_keeps_fsync_blocked_until_the_bunker_acks() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(true, false);
    let link = linked(&j, config(Mode::Sync, Unreachable::Wait), Hooks::default(), Box::new(FakeConnector(f.clone())));
    write(&j, 5, 1000);
    let jj = j.clone();
    let fsync = std::thread::spawn(move || jj.sync_mirrored().map(|_| Instant::now()));
    std::thread::sleep(TIMEOUT * 4);
    assert!(!fsync.is_finished(), "fsync waits for the bunker");
    let snap = link.snapshot();
    assert!(snap.degraded.is_none() && snap.mode() == Mode::Sync, "{snap:?}");
    assert_eq!(snap.fsyncs_waiting, 1);
    assert!(snap.waiting_for >= TIMEOUT * 3, "{snap:?}");
    let released = Instant::now();
    f.lock().unwrap().acking = true;
    let answered = fsync.join().unwrap().unwrap();
    assert!(answered >= released, "answered only once the bunker acked");
    assert_eq!(link.snapshot().fsyncs_waiting, 0);
    link.stop();
}

#[test]
fn a_stopping_mount_gives_a_blocked_fsync_an_error_under_the_wait_policy() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(false, false);
    let link = linked(&j, config(Mode::Sync, Unreachable::Wait), Hooks::default(), Box::new(FakeConnector(f)));
    write(&j, 2, 100);
    link.begin_stop();
    let e = j.sync_mirrored().unwrap_err().to_string();
    assert!(e.contains("the mount is stopping"), "{e}");
    link.stop();
}

#[test]
fn a_fenced_dir_bunker_stops_the_link_and_fsync_goes_on_locally() {
    let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let core = BunkerCore::create(DirStorage::new(b.path()), GEO, SET, 0).unwrap();
    core.fence(3).unwrap();
    drop(core);
    let j = journal(p.path(), GEO);
    let heard = Arc::new(Mutex::new(None));
    let h = heard.clone();
    let hooks = Hooks {
        on_fenced: Box::new(move |epoch, fork, text| *h.lock().unwrap() = Some((epoch, fork, text.to_string()))),
        ..Hooks::default()
    };
    let link = linked(
        &j,
        config(Mode::Sync, Unreachable::Wait),
        hooks,
        Box::new(LocalBunkerConnector::new(b.path(), SET, 0, GEO)),
    );
    eventually("fenced", Duration::from_secs(5), || link.snapshot().fenced_epoch == Some(3));
    let (epoch, _, text) = heard.lock().unwrap().clone().expect("the callback ran");
    assert_eq!(epoch, 3);
    assert!(text.contains("fenced by a failover at epoch 3"), "{text}");
    assert_eq!((link.snapshot().state_name(), link.floor()), ("fenced", None));
    write(&j, 2, 100);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    link.stop();
}

#[test]
fn a_fence_heard_from_a_target_stops_the_bunker_link_too() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let fenced = Arc::new(Mutex::new(None::<FenceNote>));
    let (seen, told) = (fenced.clone(), Arc::new(Mutex::new(0)));
    let t = told.clone();
    let hooks = Hooks {
        fenced: Box::new(move || seen.lock().unwrap().clone()),
        on_fenced: Box::new(move |_, _, _| *t.lock().unwrap() += 1),
        ..Hooks::default()
    };
    let link = linked(&j, config(Mode::Sync, Unreachable::Degrade), hooks, Box::new(FakeConnector(fake(true, true))));
    eventually("connected", Duration::from_secs(5), || link.snapshot().link_state == LinkState::InSync);
    *fenced.lock().unwrap() = Some((5, 9, "FENCED: target tcp://t:1 was fenced at epoch 5".into()));
    eventually("fenced", Duration::from_secs(5), || link.snapshot().fenced_epoch == Some(5));
    let snap = link.snapshot();
    assert_eq!(snap.last_error.as_deref(), Some("FENCED: target tcp://t:1 was fenced at epoch 5"));
    assert_eq!(*told.lock().unwrap(), 1);
    assert_eq!(link.floor(), None, "a fenced link holds no journal space");
    link.stop();
}

#[test]
fn an_overflow_lets_the_bunker_go_and_its_log_restarts_at_our_start_when_it_is_back() {
    let p = tempfile::tempdir().unwrap();
    let small = JournalGeometry { segment_size: 64 << 10, segment_count: 3 };
    let j = journal(p.path(), small);
    j.set_full_wait(Duration::from_secs(5));
    let f = fake(false, true);
    let link =
        linked(&j, config(Mode::Async, Unreachable::Degrade), Hooks::default(), Box::new(FakeConnector(f.clone())));
    assert_eq!(link.floor(), Some(Lsn(1)), "the journal keeps what the bunker lacks");
    write(&j, 60, 8000); // about 480 KiB through a 192 KiB journal
    let snap = link.snapshot();
    let e = snap.last_error.clone().unwrap_or_default();
    assert!(e.contains("the journal overflowed while the bunker was away"), "{snap:?}");
    f.lock().unwrap().reachable = true;
    eventually("in sync again", Duration::from_secs(5), || link.snapshot().link_state == LinkState::InSync);
    let fk = f.lock().unwrap();
    assert_eq!(fk.restarts.len(), 1);
    let restart = fk.restarts[0];
    assert!(restart > Lsn(1));
    assert_eq!(fk.records, records_from(&j, restart));
    let e = link.snapshot().last_error.unwrap_or_default();
    assert!(e.contains(&format!("its copy restarts at LSN {}", restart.0)), "{e}");
    drop(fk);
    link.stop();
}

#[test]
fn a_bunker_behind_continues_where_it_stands_and_a_recovered_primary_restarts_it() {
    let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let j = journal(p.path(), GEO);
    let first = BunkerLink::new(j.clone(), config(Mode::Sync, Unreachable::Degrade), holding());
    first.start(Box::new(LocalBunkerConnector::new(b.path(), SET, 0, GEO)));
    write(&j, 10, 1000);
    first.push(j.next_lsn());
    first.wait(j.next_lsn()).unwrap();
    first.stop();
    write(&j, 10, 1000);
    // The bunker stands at LSN 11; the journal still holds it: no restart.
    let second = BunkerLink::new(j.clone(), config(Mode::Sync, Unreachable::Degrade), holding());
    second.start(Box::new(LocalBunkerConnector::new(b.path(), SET, 0, GEO)));
    second.push(j.next_lsn());
    second.wait(j.next_lsn()).unwrap();
    second.stop();
    let held = |b: &Path| {
        let bunker = BunkerCore::open(DirStorage::new(b)).unwrap();
        let mut out = Vec::new();
        bunker.read(bunker.log().start_lsn, usize::MAX, &mut out).unwrap();
        (bunker.log().start_lsn, out)
    };
    assert_eq!(held(b.path()), (Lsn(1), records_from(&j, Lsn(1))));
    // After a crash recovery the bunker's position is not trusted: restart at our start.
    write(&j, 2, 1000);
    let mut c = config(Mode::Sync, Unreachable::Degrade);
    c.restart_first = true;
    let third = BunkerLink::new(j.clone(), c, holding());
    third.start(Box::new(LocalBunkerConnector::new(b.path(), SET, 0, GEO)));
    third.push(j.next_lsn());
    third.wait(j.next_lsn()).unwrap();
    third.stop();
    assert_eq!(held(b.path()), (Lsn(1), records_from(&j, Lsn(1))));
}

#[test]
fn the_watermark_is_what_every_ordered_target_acked_else_what_the_bunker_acked() {
    let p = tempfile::tempdir().unwrap();
    let j = journal(p.path(), GEO);
    let f = fake(true, true);
    let hooks = Hooks { targets_acked_below: Box::new(|| Some(Lsn(5))), ..Hooks::default() };
    let link = BunkerLink::new(j.clone(), config(Mode::Sync, Unreachable::Degrade), hooks);
    link.start(Box::new(FakeConnector(f.clone())));
    write(&j, 10, 100);
    link.wait(j.next_lsn()).unwrap();
    eventually("watermark 4", Duration::from_secs(2), || f.lock().unwrap().watermarks.contains(&Lsn(4)));
    link.stop();
    let g = fake(true, true);
    let link = BunkerLink::new(j.clone(), config(Mode::Sync, Unreachable::Degrade), Hooks::default());
    link.start(Box::new(FakeConnector(g.clone())));
    link.wait(j.next_lsn()).unwrap();
    let last = Lsn(j.next_lsn().0 - 1);
    eventually("the bunker's own ack", Duration::from_secs(2), || g.lock().unwrap().watermarks.contains(&last));
    let w = g.lock().unwrap().watermarks.clone();
    assert!(w.windows(2).all(|p| p[0] < p[1]), "sent only when it moved: {w:?}");
    link.stop();
}

#[test]
fn a_dir_bunker_that_vanishes_is_unreachable_and_sync_mode_degrades() {
    let (p, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = b.path().join("bunker");
    std::fs::create_dir(&dir).unwrap();
    let j = journal(p.path(), GEO);
    let link = linked(
        &j,
        config(Mode::Sync, Unreachable::Degrade),
        Hooks::default(),
        Box::new(LocalBunkerConnector::new(&dir, SET, 0, GEO)),
    );
    write(&j, 3, 100);
    j.sync_mirrored().unwrap();
    assert!(link.snapshot().degraded.is_none());
    std::fs::rename(&dir, b.path().join("gone")).unwrap();
    write(&j, 3, 100);
    let started = Instant::now();
    j.sync_mirrored().unwrap();
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));
    let snap = link.snapshot();
    assert!(snap.degraded.is_some(), "{snap:?}");
    assert!(snap.last_error.unwrap_or_default().contains("bunker directory"), "names the directory");
    link.stop();
}
