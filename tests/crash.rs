//! Crash consistency: SIGKILL the mount in the middle of an fsync workload,
//! then recover (by `ferryfs replay`, or by mounting again) and check that
//! every byte whose fsync returned is in the backing directory.
//!
//! With `FERRYFS_TEST_FS=bindfs` (or `bind`) there is no journal: the
//! replay/inspect steps are skipped and only the workload and the checks on the
//! backing dir run.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, sleep};
use std::time::{Duration, Instant};

use common::*;

/// One record: 4 KiB whose bytes are derived from (writer, index).
const REC: usize = 4096;
const WRITERS: usize = 2;
const FILES_PER_WRITER: u64 = 2;

fn record(writer: usize, k: u64) -> Vec<u8> {
    let mut v = pattern(((writer as u64) << 40) ^ k ^ 0x5eed_0000_0000_0000, REC);
    v[..8].copy_from_slice(&k.to_le_bytes());
    v[8..16].copy_from_slice(&(writer as u64).to_le_bytes());
    v
}

fn location(writer: usize, k: u64) -> (String, u64) {
    (format!("w{writer}-f{}", k % FILES_PER_WRITER), (k / FILES_PER_WRITER) * REC as u64)
}

/// Writer threads appending numbered records to their files under `dir`,
/// fsyncing (or fdatasyncing) after each, and publishing the number of records
/// whose sync returned.
struct Workload {
    stop: Arc<AtomicBool>,
    durable: Vec<Arc<AtomicU64>>,
    handles: Vec<JoinHandle<String>>,
}

impl Workload {
    fn start(dir: &Path) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut durable = Vec::new();
        let mut handles = Vec::new();
        for w in 0..WRITERS {
            let d = Arc::new(AtomicU64::new(0));
            durable.push(d.clone());
            let stop = stop.clone();
            let dir = dir.to_path_buf();
            handles.push(std::thread::spawn(move || {
                let files: Vec<fs::File> = (0..FILES_PER_WRITER)
                    .map(|i| {
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(dir.join(format!("w{w}-f{i}")))
                            .unwrap()
                    })
                    .collect();
                let mut k = 0u64;
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return format!("writer {w}: stopped after {k} records");
                    }
                    let f = &files[(k % FILES_PER_WRITER) as usize];
                    let (_, off) = location(w, k);
                    if let Err(e) = f.write_all_at(&record(w, k), off) {
                        return format!("writer {w}: write of record {k} failed: {e}");
                    }
                    let r = if k % 3 == 2 { f.sync_data() } else { f.sync_all() };
                    if let Err(e) = r {
                        return format!("writer {w}: sync of record {k} failed: {e}");
                    }
                    d.store(k + 1, Ordering::SeqCst);
                    k += 1;
                }
            }));
        }
        Workload { stop, durable, handles }
    }

    fn durable(&self) -> Vec<u64> {
        self.durable.iter().map(|d| d.load(Ordering::SeqCst)).collect()
    }

    /// Stops the writers (they also stop by themselves once the mount dies)
    /// and returns the durable counts.
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        for h in self.handles {
            while !h.is_finished() {
                assert!(Instant::now() < deadline, "a writer thread is stuck on the dead mount");
                sleep(Duration::from_millis(10));
            }
            eprintln!("{}", h.join().unwrap());
        }
        self.durable.iter().map(|d| d.load(Ordering::SeqCst)).collect()
    }
}

/// Checks that every durable record is present under `dir` with its bytes.
fn verify_records(dir: &Path, durable: &[u64], where_: &str) {
    let mut errors = Vec::new();
    let mut bad = 0u64;
    for (w, &n) in durable.iter().enumerate() {
        let mut open = BTreeMap::new();
        for k in 0..n {
            let (name, off) = location(w, k);
            let f = open.entry(name.clone()).or_insert_with(|| fs::File::open(dir.join(&name)));
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    bad += 1;
                    if errors.len() < 10 {
                        errors.push(format!("writer {w} record {k}: open {name}: {e}"));
                    }
                    continue;
                }
            };
            let mut buf = vec![0u8; REC];
            let got = f.read_at(&mut buf, off).unwrap_or(0);
            if got != REC || buf != record(w, k) {
                bad += 1;
                if errors.len() < 10 {
                    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    let first = if got >= 16 {
                        format!(
                            "holds record {} of writer {}",
                            u64::from_le_bytes(buf[..8].try_into().unwrap()),
                            u64::from_le_bytes(buf[8..16].try_into().unwrap())
                        )
                    } else {
                        "short".into()
                    };
                    errors.push(format!(
                        "writer {w} record {k}: {name} @ {off}: read {got} bytes, {first}; file size {size}"
                    ));
                }
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{where_}: {bad} of {:?} fsynced records missing or wrong:\n  {}",
        durable,
        errors.join("\n  ")
    );
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(PathBuf),
    Other(u32),
}

/// The whole tree under `root`: names, kinds, modes, contents, link targets.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let mode = md.mode() & 0o7777;
            let node = if md.is_dir() {
                walk(root, &p, out);
                Node::Dir(mode)
            } else if md.file_type().is_symlink() {
                Node::Symlink(fs::read_link(&p).unwrap())
            } else if md.is_file() {
                Node::File(mode, fs::read(&p).unwrap())
            } else {
                Node::Other(md.mode())
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn describe_diff(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) -> String {
    let mut lines = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => lines.push(format!("{} only before", k.display())),
            Some(w) if w != v => lines.push(format!("{} differs", k.display())),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            lines.push(format!("{} only after", k.display()));
        }
    }
    lines.truncate(20);
    lines.join("\n  ")
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the fsync workload on `m` for `dur`, then SIGKILLs the mount while the
/// writers are still going. Returns the durable counts.
fn workload_then_kill9(m: &mut Mount, dur: Duration) -> Vec<u64> {
    let data = m.mnt.join("data");
    fs::create_dir(&data).unwrap();
    let w = Workload::start(&data);
    sleep(dur);
    let before = w.durable();
    m.kill9();
    let durable = w.finish();
    eprintln!("durable records per writer: {durable:?} (at kill: >= {before:?})");
    assert!(durable.iter().all(|&n| n >= 10), "the workload made almost no progress before the kill: {durable:?}");
    durable
}

#[test]
fn fsynced_records_survive_kill9_and_replay_restores_them_idempotently() {
    let mut m = Mount::start();
    let durable = workload_then_kill9(&mut m, Duration::from_secs(2));
    let data = m.backing.join("data");
    if !backend().has_journal() {
        eprintln!("{:?} backend: no journal, skipping replay", backend());
        verify_records(&data, &durable, "backing after kill -9 (bindfs)");
        return;
    }

    // A dry run reports but changes nothing.
    let before = snapshot(&m.backing);
    let out = m.replay(&["--dry-run"]);
    assert_ok(&out, "ferryfs replay --dry-run");
    let after = snapshot(&m.backing);
    assert!(before == after, "replay --dry-run changed the backing dir:\n  {}", describe_diff(&before, &after));

    let out = m.replay(&[]);
    assert_ok(&out, "ferryfs replay");
    eprintln!("replay: {}", String::from_utf8_lossy(&out.stdout));
    verify_records(&data, &durable, "backing after replay");

    // Replaying again leaves exactly the same bytes.
    let once = snapshot(&m.backing);
    let out = m.replay(&[]);
    assert_ok(&out, "second ferryfs replay");
    let twice = snapshot(&m.backing);
    assert!(once == twice, "second replay changed the backing dir:\n  {}", describe_diff(&once, &twice));
    verify_records(&data, &durable, "backing after second replay");

    // And the replayed journal mounts again with the data visible.
    m.restart();
    verify_records(&m.mnt.join("data"), &durable, "mount after replay");
    let st = m.stop();
    assert!(st.success(), "stop: {st}");
    let out = m.replay(&[]);
    assert_ok(&out, "replay after a clean stop");
    let clean = snapshot(&m.backing);
    assert!(clean == twice, "replay after a clean stop changed the backing dir:\n  {}", describe_diff(&twice, &clean));
}

#[test]
fn mount_after_kill9_recovers_fsynced_data_by_itself() {
    let mut m = Mount::start();
    // Namespace and metadata changes before the data workload; the workload's
    // later fsyncs cover them (the journal is one ordered log).
    let ns = m.mnt.join("ns");
    fs::create_dir(&ns).unwrap();
    write(ns.join("a"), b"hello");
    fs::rename(ns.join("a"), ns.join("b")).unwrap();
    fs::hard_link(ns.join("b"), ns.join("c")).unwrap();
    std::os::unix::fs::symlink("b", ns.join("s")).unwrap();
    fs::set_permissions(ns.join("b"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    write(ns.join("gone"), b"x");
    fs::remove_file(ns.join("gone")).unwrap();
    let f = fs::File::open(ns.join("b")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::File::open(&ns).unwrap().sync_all().unwrap();

    let durable = workload_then_kill9(&mut m, Duration::from_millis(1500));

    // No replay by hand: mounting again must recover.
    m.restart();
    verify_records(&m.mnt.join("data"), &durable, "mount after kill -9");
    let check_ns = |root: &Path, where_: &str| {
        let ns = root.join("ns");
        assert_eq!(read(ns.join("b")), b"hello", "{where_}");
        assert_eq!(read(ns.join("c")), b"hello", "{where_}");
        let (b, c) = (fs::symlink_metadata(ns.join("b")).unwrap(), fs::symlink_metadata(ns.join("c")).unwrap());
        assert_eq!(b.ino(), c.ino(), "{where_}: hard link");
        assert_eq!(b.nlink(), 2, "{where_}: nlink");
        assert_eq!(b.mode() & 0o7777, 0o640, "{where_}: mode");
        assert_eq!(fs::read_link(ns.join("s")).unwrap(), PathBuf::from("b"), "{where_}");
        assert!(fs::symlink_metadata(ns.join("a")).is_err(), "{where_}: rename source still there");
        assert!(fs::symlink_metadata(ns.join("gone")).is_err(), "{where_}: unlinked file back");
    };
    check_ns(&m.mnt, "mount after kill -9");

    // The recovered mount takes new writes and stops cleanly.
    write(m.mnt.join("after"), b"after recovery");
    let st = m.stop();
    assert!(st.success(), "stop after recovery: {st}\n{}", m.log());
    verify_records(&m.backing.join("data"), &durable, "backing after recovery and clean stop");
    check_ns(&m.backing, "backing after recovery and clean stop");
    assert_eq!(read(m.backing.join("after")), b"after recovery");
}

#[test]
fn namespace_changes_synced_before_kill9_survive_replay() {
    // Each step k: create n{k} with content, for odd k rename it to r{k}, for
    // k >= 10 with k % 5 == 0 unlink the final name of k-10; then fsync the
    // file and the directory. After recovery, every step whose syncs returned
    // is reflected exactly.
    let mut m = Mount::start();
    let dir = m.mnt.join("ns");
    fs::create_dir(&dir).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let final_name = |j: u64| if j % 2 == 1 { format!("r{j}") } else { format!("n{j}") };
    let handle = {
        let (stop, done, dir) = (stop.clone(), done.clone(), dir.clone());
        std::thread::spawn(move || -> Result<(), std::io::Error> {
            let dfd = fs::File::open(&dir)?;
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let p = dir.join(format!("n{k}"));
                let f = fs::File::create(&p)?;
                f.write_all_at(&pattern(k, 100 + (k as usize % 5000)), 0)?;
                if k % 2 == 1 {
                    fs::rename(&p, dir.join(format!("r{k}")))?;
                }
                if k >= 10 && k.is_multiple_of(5) {
                    fs::remove_file(dir.join(final_name(k - 10)))?;
                }
                f.sync_all()?;
                dfd.sync_all()?;
                k += 1;
                done.store(k, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    sleep(Duration::from_secs(2));
    m.kill9();
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !handle.is_finished() {
        assert!(Instant::now() < deadline, "namespace writer stuck on the dead mount");
        sleep(Duration::from_millis(10));
    }
    eprintln!("namespace writer ended: {:?}", handle.join().unwrap());
    let n = done.load(Ordering::SeqCst);
    eprintln!("namespace steps synced: {n}");
    assert!(n >= 10, "too few namespace steps before the kill: {n}");

    let root = if !backend().has_journal() {
        m.backing.join("ns")
    } else {
        let out = m.replay(&[]);
        assert_ok(&out, "ferryfs replay");
        m.backing.join("ns")
    };
    let mut errors = Vec::new();
    for j in 0..n {
        let deleted_by = j + 10;
        let deleted = deleted_by % 5 == 0 && deleted_by < n;
        let unknown = deleted_by % 5 == 0 && deleted_by == n; // the step in flight
        let p = root.join(final_name(j));
        let other = root.join(if j % 2 == 1 { format!("n{j}") } else { format!("r{j}") });
        if fs::symlink_metadata(&other).is_ok() {
            errors.push(format!("step {j}: stale name {}", other.display()));
        }
        if unknown {
            continue;
        }
        match (deleted, fs::read(&p)) {
            (true, Ok(_)) => errors.push(format!("step {j}: {} was unlinked but is back", p.display())),
            (false, Err(e)) => errors.push(format!("step {j}: {} missing: {e}", p.display())),
            (false, Ok(b)) if b != pattern(j, 100 + (j as usize % 5000)) => {
                errors.push(format!("step {j}: {} has wrong contents", p.display()))
            }
            _ => {}
        }
    }
    errors.truncate(20);
    assert!(errors.is_empty(), "after kill -9 and recovery ({n} steps synced):\n  {}", errors.join("\n  "));
}

#[test]
fn small_journal_wraps_under_sustained_writes_and_recovers_after_kill9() {
    // 4 MiB of journal in 256 KiB segments, and 40 MiB of synced writes: the
    // journal must checkpoint and reuse its space many times, and whatever it
    // freed must already be durable in the backing dir.
    let mut m = Mount::start_with(&[
        "--journal-size",
        "4M",
        "--segment-size",
        "256k",
        "--checkpoint-interval",
        "100ms",
        "--commit-interval",
        "50ms",
    ]);
    const CHUNK: usize = 1 << 20;
    let bulk = m.mnt.join("bulk");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&bulk).unwrap();
    for round in 0..2u64 {
        for i in 0..20u64 {
            f.write_all_at(&pattern(round * 100 + i, CHUNK), i * CHUNK as u64).unwrap();
            f.sync_data().unwrap();
        }
    }
    drop(f);
    let want: Vec<u8> = (0..20u64).flat_map(|i| pattern(100 + i, CHUNK)).collect();
    assert!(read(&bulk) == want, "bulk file wrong through the mount");
    // Many small namespace transactions too.
    fs::create_dir(m.mnt.join("many")).unwrap();
    for i in 0..2000 {
        write(m.mnt.join(format!("many/{i}")), format!("{i}"));
    }
    fs::File::open(m.mnt.join("many")).unwrap().sync_all().unwrap();

    let durable = workload_then_kill9(&mut m, Duration::from_secs(1));
    if backend().has_journal() {
        let out = m.replay(&[]);
        assert_ok(&out, "ferryfs replay");
    }
    verify_records(&m.backing.join("data"), &durable, "backing after kill -9 and replay");
    assert!(read(m.backing.join("bulk")) == want, "bulk file wrong in the backing dir after replay");
    for i in 0..2000 {
        assert_eq!(read(m.backing.join(format!("many/{i}"))), format!("{i}").as_bytes());
    }
    m.restart();
    assert!(read(m.mnt.join("bulk")) == want, "bulk file wrong through the mount after recovery");
}

#[test]
fn inspect_reads_the_journal_left_by_kill9() {
    if !backend().has_journal() {
        eprintln!("skipped: the {:?} backend has no journal", backend());
        return;
    }
    let mut m = Mount::start();
    workload_then_kill9(&mut m, Duration::from_millis(500));
    let out = m.inspect(&[]);
    assert_ok(&out, "ferryfs inspect");
    assert!(!out.stdout.is_empty(), "ferryfs inspect printed nothing");
    let out = m.inspect(&["--json"]);
    assert_ok(&out, "ferryfs inspect --json");
    // One JSON document, or JSON Lines (one object per line).
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("inspect --json: line is not JSON ({e}): {l}")))
            .collect(),
    };
    assert!(!values.is_empty(), "inspect --json printed nothing");
    assert!(values.iter().all(|v| v.is_object()), "inspect --json: expected objects:\n{text}");
    // inspect only reads: a replay afterwards still recovers everything.
    let out = m.replay(&[]);
    assert_ok(&out, "ferryfs replay after inspect");
}

#[test]
fn replay_after_a_clean_stop_changes_nothing() {
    if !backend().has_journal() {
        eprintln!("skipped: the {:?} backend has no journal", backend());
        return;
    }
    let mut m = Mount::start();
    fs::create_dir(m.mnt.join("d")).unwrap();
    write(m.mnt.join("d/f"), pattern(1, 100_000));
    write(m.mnt.join("g"), b"g");
    fs::rename(m.mnt.join("g"), m.mnt.join("d/g")).unwrap();
    fs::hard_link(m.mnt.join("d/f"), m.mnt.join("h")).unwrap();
    write(m.mnt.join("x"), b"x");
    fs::remove_file(m.mnt.join("x")).unwrap();
    let st = m.stop();
    assert!(st.success(), "stop: {st}");
    let before = snapshot(&m.backing);
    let out = m.replay(&[]);
    assert_ok(&out, "ferryfs replay on a cleanly closed journal");
    let after = snapshot(&m.backing);
    assert!(
        before == after,
        "replay after a clean stop changed the backing dir:\n  {}",
        describe_diff(&before, &after)
    );
}
