//! The primary's bunker link end to end (issue 4, points 2 and 5): real mounts with `--bunker`,
//! writes and fsyncs through the kernel, then the bunker's log compared with the journal record
//! for record, and the bunker taken away to see sync mode degrade without losing anything.
//! Every test uses its own temp dirs and ports, and unmounts on panic (`Mount`'s drop).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::node::NodeProc;
use common::target::status;
use common::{Mount, ferryfs, is_fuse_mounted, pattern};
use ferryfs::format::record::{Header, Kind};
use ferryfs::format::segment::{SEGMENT_HEADER_SIZE, SegmentHeader};
use ferryfs::io::{SegmentFile, Storage};
use ferryfs::journal::{self, reader};
use ferryfs::os::storage::DirStorage;

/// Small journals: a DIR bunker preallocates the journal's size.
const SMALL: [&str; 6] = ["--journal-size", "4M", "--segment-size", "1M", "--checkpoint-interval", "1h"];
/// Segments no test fills: the bunker frees only whole segments below its watermark (with no
/// target, what it acked), so every record a test writes stays there to be compared.
const WHOLE: [&str; 6] = ["--journal-size", "24M", "--segment-size", "8M", "--checkpoint-interval", "1h"];

/// Every record of the journal (or bunker log) in `dir`, from its start, as stored.
fn records(dir: &Path) -> Vec<(Header, Vec<u8>)> {
    let storage = DirStorage::new(dir);
    let sb = journal::read_superblock(&storage).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out = Vec::new();
    reader::scan(&storage, &sb, |r| {
        out.push((r.header, r.payload.to_vec()));
        true
    })
    .unwrap();
    out
}

/// Every record written in the log in `dir` since it began, past the start a checkpoint moved:
/// with no target the bunker's watermark is what it acked, and it lets everything below go at
/// once. Valid while the log has not wrapped (the tests write far less than a segment).
fn records_written(dir: &Path) -> Vec<(Header, Vec<u8>)> {
    let storage = DirStorage::new(dir);
    if !matches!(storage.read_superblock_if_any(), Ok(Some(_))) {
        return Vec::new(); // async: the link may be creating it right now
    }
    let mut sb = journal::read_superblock(&storage).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let seg = storage.open_segment(0, sb.segment_size, false).unwrap();
    let mut hb = [0u8; SEGMENT_HEADER_SIZE];
    seg.read(0, &mut hb);
    let first = SegmentHeader::decode(&hb).unwrap();
    assert_eq!(first.seq, 0, "the log in {} has wrapped", dir.display());
    (sb.start_lsn, sb.start_seq, sb.start_offset) = (first.first_lsn, 0, SEGMENT_HEADER_SIZE as u64);
    let mut out = Vec::new();
    reader::scan(&storage, &sb, |r| {
        out.push((r.header, r.payload.to_vec()));
        true
    })
    .unwrap();
    out
}

/// Whether some write record in `dir` carries `data` (at its end: the payload starts with the
/// file id and offset).
fn journal_has_write(dir: &Path, data: &[u8]) -> bool {
    records(dir).iter().any(|(h, p)| h.kind == Kind::Write && p.ends_with(data))
}

fn write_synced(path: &Path, data: &[u8]) -> Duration {
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(path).unwrap();
    f.write_all(data).unwrap();
    let started = Instant::now();
    f.sync_all().unwrap();
    started.elapsed()
}

fn bunker_of(m: &Mount) -> serde_json::Value {
    let st = status(&m.journal);
    assert!(st["bunker"].is_object(), "the status has a bunker: {st:#}");
    st["bunker"].clone()
}

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(50));
    }
}

/// A directory for the bunker's log, outside the mount's dirs.
fn bunker_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new().prefix("ferryfs-bunker-").tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap().join("log");
    fs::create_dir(&dir).unwrap();
    (tmp, dir)
}

/// The bunker's log, record by record, as sampled over a test (a record seen once must never
/// change).
#[derive(Default)]
struct Seen(BTreeMap<u64, (Header, Vec<u8>)>);

impl Seen {
    fn sample(&mut self, bunker: &Path) {
        for (h, p) in records_written(bunker) {
            if let Some(was) = self.0.insert(h.lsn.0, (h, p.clone())) {
                assert_eq!(was, (h, p), "the bunker's record {} changed", h.lsn.0);
            }
        }
    }

    /// The bunker held every record of the journal up to LSN `upto`, byte for byte. (The
    /// kernel may journal more at any time, an mtime written back: only what an fsync covered
    /// is compared.)
    fn assert_holds(&self, journal: &Path, upto: u64) {
        let ours: Vec<_> = records(journal).into_iter().filter(|(h, _)| h.lsn.0 <= upto).collect();
        assert_eq!(ours.last().map(|r| r.0.lsn.0), Some(upto), "the journal holds LSN {upto}");
        for (h, p) in &ours {
            match self.0.get(&h.lsn.0) {
                Some(theirs) => assert_eq!(theirs, &(*h, p.clone()), "record {} differs", h.lsn.0),
                None => panic!(
                    "the bunker never held record {} (it held {:?}..={:?})",
                    h.lsn.0,
                    self.0.keys().next(),
                    self.0.keys().last()
                ),
            }
        }
    }
}

/// The journal's next LSN now.
fn next_lsn(m: &Mount) -> u64 {
    status(&m.journal)["journal"]["next_lsn"].as_u64().unwrap()
}

#[test]
fn a_dir_bunker_in_sync_mode_holds_every_fsynced_record_byte_for_byte() {
    let (_tmp, bdir) = bunker_dir();
    let mut args = WHOLE.to_vec();
    args.extend(["--bunker", bdir.to_str().unwrap(), "--bunker-mode", "sync", "--commit-interval", "1h"]);
    let mut m = Mount::start_with(&args);
    let mut seen = Seen::default();
    for i in 0..20u64 {
        let waited = write_synced(&m.mnt.join(format!("f{i}")), &pattern(i, 10_000 + i as usize * 3_000));
        assert!(waited < Duration::from_secs(4), "fsync {i} took {waited:?}: answered by a timeout?");
        seen.sample(&bdir);
    }
    fs::rename(m.mnt.join("f0"), m.mnt.join("renamed")).unwrap();
    let synced = next_lsn(&m) - 1;
    File::open(&m.mnt).unwrap().sync_all().unwrap();
    let b = bunker_of(&m);
    assert_eq!((b["mode"].as_str(), b["degraded"].as_bool()), (Some("sync"), Some(false)), "{b:#}");
    assert!(b["acked_lsn"].as_u64().unwrap() >= synced, "the fsync waited for the bunker: {b:#}");
    seen.sample(&bdir);
    seen.assert_holds(&m.journal, synced);
    // `ferryfs inspect` reads the bunker's log like any journal, to past the fsync.
    let out = ferryfs().args(["inspect", "--journal"]).arg(&bdir).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let end = text.lines().last().unwrap();
    let next: u64 = end.split("next_lsn=").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(end.starts_with("end clean") && next > synced, "{end}");
    let st = m.stop();
    assert!(st.success(), "{st}; {}", m.log());
}

#[test]
fn a_dir_bunker_in_async_mode_follows_the_journal() {
    let (_tmp, bdir) = bunker_dir();
    let mut args = WHOLE.to_vec();
    args.extend(["--bunker", bdir.to_str().unwrap(), "--bunker-mode", "async", "--commit-interval", "1h"]);
    let mut m = Mount::start_with(&args);
    let mut seen = Seen::default();
    for i in 0..10u64 {
        write_synced(&m.mnt.join(format!("a{i}")), &pattern(100 + i, 50_000));
        seen.sample(&bdir);
    }
    let b = bunker_of(&m);
    assert_eq!((b["mode"].as_str(), b["configured_mode"].as_str()), (Some("async"), Some("async")), "{b:#}");
    let synced = next_lsn(&m) - 1;
    eventually("the bunker catches up", Duration::from_secs(10), || {
        seen.sample(&bdir);
        bunker_of(&m)["acked_lsn"].as_u64().unwrap() >= synced
    });
    seen.sample(&bdir);
    seen.assert_holds(&m.journal, synced);
    assert!(m.stop().success(), "{}", m.log());
}

#[test]
fn a_tcp_bunker_with_nothing_listening_degrades_sync_mode_and_loses_nothing() {
    // A port nothing listens on: bound, then freed.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut args = SMALL.to_vec();
    args.extend(["--bunker", &url, "--bunker-timeout", "1s", "--commit-interval", "1h"]);
    let mut m = Mount::start_with(&args);
    let data = pattern(7, 300_000);
    let waited = write_synced(&m.mnt.join("kept"), &data);
    assert!(waited < Duration::from_millis(2500), "fsync took {waited:?}, the timeout is 1s");
    let b = bunker_of(&m);
    assert_eq!(
        (b["state"].as_str(), b["mode"].as_str(), b["configured_mode"].as_str()),
        (Some("degraded"), Some("async"), Some("sync")),
        "{b:#}"
    );
    assert!(b["degraded_reason"].as_str().unwrap().contains("unreachable for 1s"), "{b:#}");
    assert!(b["last_error"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")), "{b:#}");
    assert!(m.log().contains("sync mode DEGRADED to async"), "a loud warning: {}", m.log());
    let table = ferryfs().args(["status", "--journal"]).arg(&m.journal).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("WARNING: bunker DEGRADED to async"));
    // Degraded: the next fsync does not wait.
    let more = pattern(8, 10_000);
    assert!(write_synced(&m.mnt.join("more"), &more) < Duration::from_millis(500));
    assert!(journal_has_write(&m.journal, &data[data.len() - 4096..]) && journal_has_write(&m.journal, &more));
    m.restart();
    assert_eq!(fs::read(m.mnt.join("kept")).unwrap(), data);
    assert_eq!(fs::read(m.mnt.join("more")).unwrap(), more);
    assert!(m.stop().success(), "{}", m.log());
}

#[test]
fn a_dir_bunker_that_goes_away_degrades_fsync_after_the_timeout_and_loses_nothing() {
    let (tmp, bdir) = bunker_dir();
    let mut args = SMALL.to_vec();
    args.extend(["--bunker", bdir.to_str().unwrap(), "--bunker-timeout", "1s", "--commit-interval", "1h"]);
    let mut m = Mount::start_with(&args);
    let first = pattern(1, 40_000);
    assert!(write_synced(&m.mnt.join("first"), &first) < Duration::from_millis(900));
    assert_eq!(bunker_of(&m)["mode"], "sync");
    // The bunker's disk goes away (as an unmount would): its directory is no longer there.
    fs::rename(&bdir, tmp.path().join("moved-away")).unwrap();
    let second = pattern(2, 40_000);
    let waited = write_synced(&m.mnt.join("second"), &second);
    assert!(waited >= Duration::from_millis(700) && waited < Duration::from_millis(3000), "fsync took {waited:?}");
    let b = bunker_of(&m);
    assert_eq!((b["degraded"].as_bool(), b["mode"].as_str()), (Some(true), Some("async")), "{b:#}");
    assert!(b["last_error"].as_str().unwrap().contains("bunker directory"), "{b:#}");
    assert!(journal_has_write(&m.journal, &second[second.len() - 4096..]));
    // Back (an empty directory in its place): a new log restarts there and sync mode returns.
    fs::create_dir(&bdir).unwrap();
    eventually("sync mode restored", Duration::from_secs(10), || bunker_of(&m)["mode"] == "sync");
    assert!(m.log().contains("sync mode restored"), "{}", m.log());
    let third = pattern(3, 40_000);
    assert!(write_synced(&m.mnt.join("third"), &third) < Duration::from_millis(900));
    assert!(m.stop().success(), "{}", m.log());
    m.restart();
    for (name, data) in [("first", &first), ("second", &second), ("third", &third)] {
        assert_eq!(&fs::read(m.mnt.join(name)).unwrap(), data, "{name}");
    }
}

/// A `ferryfs bunker` process on 127.0.0.1, a port of its choosing; killed on drop.
struct BunkerProc {
    dir: PathBuf,
    node: NodeProc,
    _tmp: tempfile::TempDir,
}

impl BunkerProc {
    fn start() -> BunkerProc {
        let (tmp, dir) = bunker_dir();
        let log = tmp.path().join("bunker.log");
        let after_listen = ["--log-size", "24M", "--segment-size", "8M", "--dir"].map(OsString::from);
        let mut after_listen = after_listen.to_vec();
        after_listen.push(dir.clone().into());
        let node = NodeProc::start_with(log, vec!["bunker".into()], after_listen, Duration::from_secs(20));
        BunkerProc { dir, node, _tmp: tmp }
    }
}

#[test]
fn a_tcp_bunker_in_sync_mode_holds_every_record_and_catches_up_after_a_restart() {
    let mut bunker = BunkerProc::start();
    let url = bunker.node.url();
    let mut args = WHOLE.to_vec();
    args.extend(["--bunker", &url, "--bunker-timeout", "1s", "--commit-interval", "1h"]);
    let mut m = Mount::start_with(&args);
    let mut seen = Seen::default();
    for i in 0..10u64 {
        let waited = write_synced(&m.mnt.join(format!("t{i}")), &pattern(200 + i, 30_000));
        assert!(waited < Duration::from_millis(900), "fsync {i} took {waited:?}: answered by a timeout?");
        seen.sample(&bunker.dir);
    }
    let synced = next_lsn(&m) - 1;
    File::open(&m.mnt).unwrap().sync_all().unwrap();
    let b = bunker_of(&m);
    assert_eq!(b["mode"].as_str(), Some("sync"), "{b:#}");
    assert!(b["acked_lsn"].as_u64().unwrap() >= synced, "the fsync waited for the bunker: {b:#}");
    seen.sample(&bunker.dir);
    seen.assert_holds(&m.journal, synced);
    // The bunker dies: fsync degrades after the timeout; it comes back and catches up.
    bunker.node.kill9();
    let during = pattern(300, 30_000);
    let waited = write_synced(&m.mnt.join("during"), &during);
    assert!(waited < Duration::from_millis(3000), "fsync took {waited:?}");
    assert_eq!(bunker_of(&m)["degraded"], true);
    bunker.node.restart();
    eventually("sync mode restored", Duration::from_secs(15), || {
        let b = bunker_of(&m);
        b["mode"] == "sync" && b["state"] == "in-sync"
    });
    assert!(bunker_of(&m)["reconnects"].as_u64().unwrap() >= 1);
    let synced = next_lsn(&m) - 1;
    assert!(write_synced(&m.mnt.join("after"), &pattern(301, 1000)) < Duration::from_millis(900));
    seen.sample(&bunker.dir);
    seen.assert_holds(&m.journal, synced);
    assert!(m.stop().success(), "{}", m.log());
}

/// `ferryfs mount` with these extra arguments on fresh dirs must fail before anything is
/// mounted or created, naming `flag`.
fn refused(extra: &[&str], flag: &str, make: impl FnOnce(&Path) -> Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let (mnt, backing, journal) = (base.join("mnt"), base.join("backing"), base.join("journal"));
    for d in [&mnt, &backing, &journal] {
        fs::create_dir(d).unwrap();
    }
    let mut args: Vec<String> = make(&base);
    let listing = |d: &Path| {
        let mut names: Vec<_> = fs::read_dir(d).unwrap().flatten().map(|e| e.file_name()).collect();
        names.sort();
        names
    };
    let before: Vec<_> = [&journal, &backing].iter().map(|d| listing(d)).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = ferryfs()
        .arg("mount")
        .arg(&mnt)
        .arg("--backing")
        .arg(&backing)
        .arg("--journal")
        .arg(&journal)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if is_fuse_mounted(&mnt) {
        common::force_unmount(&mnt);
        panic!("{args:?} mounted");
    }
    assert!(!out.status.success(), "{args:?} was accepted: {stderr}");
    assert!(stderr.contains(flag), "{args:?}: the message names {flag}: {stderr}");
    let after: Vec<_> = [&journal, &backing].iter().map(|d| listing(d)).collect();
    assert_eq!(before, after, "{args:?} created files in the journal or backing directory");
    if base.join("bunker").exists() {
        assert_eq!(fs::read_dir(base.join("bunker")).unwrap().count(), 0, "{args:?} wrote in the bunker dir");
    }
}

#[test]
fn bad_bunker_values_are_refused_by_flag_before_anything_is_created() {
    let none = |_: &Path| Vec::new();
    let bunker_dir = |b: &Path| {
        fs::create_dir(b.join("bunker")).unwrap();
        vec!["--bunker".to_string(), b.join("bunker").display().to_string()]
    };
    refused(&["--bunker", "ftp://host:1"], "--bunker", none);
    refused(&["--bunker", "tcp://no-such-host.invalid:7080"], "--bunker", none);
    refused(&["--bunker", "tcp://127.0.0.1"], "--bunker", none);
    refused(&["--bunker", "/no/such/directory"], "--bunker", none);
    refused(&["--bunker", ""], "--bunker", none);
    refused(&[], "--bunker", |b: &Path| vec!["--bunker".into(), b.join("backing").display().to_string()]);
    refused(&[], "--bunker", |b: &Path| {
        fs::create_dir(b.join("journal/inside")).unwrap();
        vec!["--bunker".into(), b.join("journal/inside").display().to_string()]
    });
    refused(&[], "--bunker", |b: &Path| vec!["--bunker".into(), b.join("mnt").display().to_string()]);
    refused(&[], "--bunker", |b: &Path| vec!["--bunker".into(), b.display().to_string()]);
    refused(&["--bunker-mode", "fast"], "--bunker-mode", bunker_dir);
    refused(&["--bunker-unreachable", "panic"], "--bunker-unreachable", bunker_dir);
    refused(&["--bunker-timeout", "soon"], "--bunker-timeout", bunker_dir);
    refused(&["--bunker-timeout", "0s"], "--bunker-timeout", bunker_dir);
    refused(&["--bunker-mode", "async"], "--bunker", none);
}

#[test]
fn the_bunker_is_in_status_json_and_absent_without_one() {
    let m = Mount::start_with(&SMALL);
    assert!(status(&m.journal)["bunker"].is_null());
}
