//! `ferryfs bunker` end to end (issue 4, point 1): the real binary on 127.0.0.1, spoken to by
//! this test process as a fake primary and a fake failover tool with the crate's own codecs
//! (`net::conn`, `proto::wire`). The records are a real primary journal's (`Journal` in a
//! tempdir), read back with `cursor_at`/`read_records`, so the bunker sees exactly what a
//! mount ships. Each test has its own bunker, directories and replication set, and kills
//! what it starts (also when it panics).

mod common;

use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::ferryfs;
use common::node::NodeProc;
use ferryfs::format::superblock::Superblock;
use ferryfs::journal::{Journal, JournalGeometry};
use ferryfs::net::conn::{self, NetError, Reader, Writer};
use ferryfs::os::storage::DirStorage;
use ferryfs::proto::wire::control::ControlMsg;
use ferryfs::proto::wire::{Frame, HandshakeConfig, Key, Role, split_records};
use ferryfs::types::{FileId, Lsn};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);
/// The primary's journal: 1 MiB segments, so writes of 4 KiB fill one in about 250 records.
const PRIMARY_GEO: JournalGeometry = JournalGeometry { segment_size: 1 << 20, segment_count: 8 };
/// The bunker's log in most tests: 8 segments of 1 MiB.
const SMALL_LOG: [&str; 4] = ["--log-size", "8M", "--segment-size", "1M"];

// ---------------------------------------------------------------------------------------------
// The bunker process

/// A `ferryfs bunker` child on a port of its own choosing, with its own `--dir`.
struct BunkerProc {
    dir: PathBuf,
    addr: SocketAddr,
    node: NodeProc,
    _tmp: TempDir,
}

impl BunkerProc {
    fn start(args: &[&str]) -> BunkerProc {
        let tmp = tempfile::Builder::new().prefix("ferryfs-bunker-").tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let dir = base.join("dir");
        fs::create_dir(&dir).unwrap();
        let mut after_listen: Vec<OsString> = vec!["--dir".into(), dir.clone().into()];
        after_listen.extend(args.iter().map(OsString::from));
        let node = NodeProc::start_with(base.join("bunker.log"), vec!["bunker".into()], after_listen, WAIT);
        BunkerProc { dir, addr: node.addr, node, _tmp: tmp }
    }

    fn log(&self) -> String {
        self.node.log()
    }

    /// SIGKILL: no clean shutdown.
    fn kill9(&mut self) {
        self.node.kill9();
    }

    /// Starts again on the same address and directory.
    fn restart(&mut self) {
        self.node.restart();
    }

    /// SIGTERM; the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        self.node.terminate(WAIT).unwrap_or_else(|| panic!("ferryfs bunker did not stop on SIGTERM:\n{}", self.log()))
    }

    /// `ferryfs status --journal DIR` (`--json` parsed, or the table).
    fn status(&self) -> serde_json::Value {
        let out = ferryfs().arg("status").arg("--journal").arg(&self.dir).arg("--json").output().unwrap();
        assert!(out.status.success(), "ferryfs status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn status_table(&self) -> String {
        let out = ferryfs().arg("status").arg("--journal").arg(&self.dir).output().unwrap();
        assert!(out.status.success(), "ferryfs status failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Waits until the status satisfies `ok`; panics with the last one after `timeout`.
    fn wait_status(&self, timeout: Duration, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if ok(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "status never got there: {st:#}\n{}", self.log());
            sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fake primary and the fake failover tool

/// A real primary journal in a tempdir, with a replication set of its own.
struct PrimaryJournal {
    journal: Journal<DirStorage>,
    set_id: [u8; 16],
    _tmp: TempDir,
}

impl PrimaryJournal {
    fn new() -> PrimaryJournal {
        let tmp = tempfile::tempdir().unwrap();
        let set_id: [u8; 16] = rand::random();
        let sb = Superblock::new(set_id, 0, 0, Vec::new(), [0; 16]);
        let journal = Journal::create(DirStorage::new(tmp.path()), PRIMARY_GEO, sb).unwrap();
        PrimaryJournal { journal, set_id, _tmp: tmp }
    }

    /// `n` more writes of `len` bytes, one record each; returns the last LSN.
    fn write(&self, n: usize, len: usize) -> Lsn {
        for i in 0..n {
            let at = self.journal.next_lsn().0;
            let tx = self.journal.append_write(FileId(100), at * 4096, &common::pattern(at ^ i as u64, len)).unwrap();
            self.journal.done(tx);
        }
        self.journal.sync().unwrap();
        Lsn(self.journal.next_lsn().0 - 1)
    }

    /// The records `from..upto`, byte for byte as the journal holds them.
    fn records(&self, from: Lsn, upto: Lsn) -> Vec<u8> {
        let mut cur = self.journal.cursor_at(from).unwrap();
        let mut out = Vec::new();
        self.journal.read_records(&mut cur, upto, usize::MAX, &mut out).unwrap();
        out
    }
}

fn hello(role: Role, set_id: [u8; 16], epoch: u64, key: Option<Key>) -> HandshakeConfig {
    HandshakeConfig { role, set_id, epoch, instance_id: conn::instance_id(), nonce: conn::nonce(), key }
}

fn connect(addr: SocketAddr, cfg: HandshakeConfig) -> Result<(Reader, Writer), NetError> {
    let (r, w, est) = conn::connect(addr, cfg, WAIT)?;
    assert_eq!(est.peer.role, Role::Bunker);
    Ok((r, w))
}

/// The next frame that is not a heartbeat.
fn next(r: &mut Reader) -> Frame {
    loop {
        match r.recv(WAIT) {
            Ok(Frame::Heartbeat) => continue,
            Ok(f) => return f,
            Err(e) => panic!("waiting for a frame from the bunker: {e}"),
        }
    }
}

fn bye_reason(f: Frame) -> String {
    match f {
        Frame::Control(ControlMsg::Bye { reason }) => reason,
        f => panic!("expected Bye, got {f:?}"),
    }
}

/// The connection ends: the bunker closed it (any frames before the end are skipped).
fn assert_closed(r: &mut Reader) {
    let deadline = Instant::now() + WAIT;
    loop {
        match r.recv(WAIT) {
            Err(NetError::Closed) => return,
            Err(NetError::Io(_)) => return,
            Err(e) => panic!("expected the bunker to close the connection, got {e}"),
            Ok(_) => assert!(Instant::now() < deadline, "the bunker kept the connection open"),
        }
    }
}

/// A connected fake primary past the bunker's greeting.
struct FakePrimary {
    r: Reader,
    w: Writer,
    /// `Status.next_lsn` and `LogInfo` of the greeting.
    next_lsn: u64,
    log_info: ControlMsg,
}

impl FakePrimary {
    fn connect(addr: SocketAddr, set_id: [u8; 16], epoch: u64, key: Option<Key>) -> FakePrimary {
        let (mut r, w) = connect(addr, hello(Role::Primary, set_id, epoch, key)).unwrap();
        let next_lsn = match next(&mut r) {
            Frame::Control(ControlMsg::Status { next_lsn, durable_lsn, applied_lsn }) => {
                assert_eq!((durable_lsn, applied_lsn), (next_lsn - 1, next_lsn - 1));
                next_lsn
            }
            f => panic!("expected Status first, got {f:?}"),
        };
        let log_info = match next(&mut r) {
            Frame::Control(m @ ControlMsg::LogInfo { .. }) => m,
            f => panic!("expected LogInfo second, got {f:?}"),
        };
        FakePrimary { r, w, next_lsn, log_info }
    }

    /// Ships `records` in one frame and waits for its ack, which must name its last LSN.
    fn ship(&mut self, records: &[u8]) -> Lsn {
        let last = split_records(records).last().unwrap().unwrap();
        let last_lsn = u64::from_le_bytes(last[8..16].try_into().unwrap());
        self.w.send_records(records).unwrap();
        match next(&mut self.r) {
            Frame::Ack(lsn) => {
                assert_eq!(lsn, Lsn(last_lsn), "the ack names the frame's last record");
                lsn
            }
            f => panic!("expected Ack({last_lsn}), got {f:?}"),
        }
    }
}

/// `ReadLog{from}` as a failover tool: the records and `ReadEnd`'s LSN, or the `Bye` reason.
fn read_log(addr: SocketAddr, set_id: [u8; 16], from: u64) -> Result<(Vec<u8>, u64), String> {
    let (mut r, mut w) = connect(addr, hello(Role::FailoverTool, set_id, 0, None)).unwrap();
    assert!(matches!(next(&mut r), Frame::Control(ControlMsg::LogInfo { .. })));
    w.send(&Frame::Control(ControlMsg::ReadLog { from_lsn: from })).unwrap();
    let mut got = Vec::new();
    loop {
        match next(&mut r) {
            Frame::Records(b) => {
                // About 1 MiB: reading stops after the record that reaches it (these are small).
                assert!(b.len() <= (1 << 20) + (64 << 10), "a frame of {} bytes", b.len());
                got.extend_from_slice(&b);
            }
            Frame::Control(ControlMsg::ReadEnd { next_lsn }) => return Ok((got, next_lsn)),
            Frame::Control(ControlMsg::Bye { reason }) => return Err(reason),
            f => panic!("unexpected {f:?} while reading the log"),
        }
    }
}

fn tool_log_info(addr: SocketAddr, set_id: [u8; 16]) -> ControlMsg {
    let (mut r, _w) = connect(addr, hello(Role::FailoverTool, set_id, 0, None)).unwrap();
    match next(&mut r) {
        Frame::Control(m @ ControlMsg::LogInfo { .. }) => m,
        f => panic!("expected LogInfo, got {f:?}"),
    }
}

fn dir_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn acked_records_survive_a_kill9_and_are_served_back_byte_for_byte() {
    let mut b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 1, None);
    assert_eq!(primary.next_lsn, 1, "a new bunker expects record 1");
    assert!(matches!(primary.log_info, ControlMsg::LogInfo { epoch: 1, start_lsn: 1, next_lsn: 1, .. }));
    // Three frames, one of them larger than a read chunk (served back in several).
    let mut sent = Vec::new();
    let mut from = Lsn(1);
    for (n, len) in [(10, 100), (300, 4096), (40, 30_000)] {
        let last = p.write(n, len);
        let records = p.records(from, Lsn(last.0 + 1));
        assert_eq!(primary.ship(&records), last);
        sent.extend_from_slice(&records);
        from = Lsn(last.0 + 1);
    }
    let end = from.0;
    assert_eq!(end, 351);
    b.kill9();
    b.restart();

    let (got, read_end) = read_log(b.addr, p.set_id, 1).expect("the log is served");
    assert_eq!(read_end, end);
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the bunker serves the records byte for byte");
    let (tail, _) = read_log(b.addr, p.set_id, 200).unwrap();
    assert_eq!(tail, p.records(Lsn(200), Lsn(end)));
    let (none, at) = read_log(b.addr, p.set_id, end).unwrap();
    assert_eq!((none.len(), at), (0, end), "from the end: nothing, then ReadEnd");
    let past = read_log(b.addr, p.set_id, end + 5).unwrap_err();
    assert!(past.contains("past the bunker's durable end"), "{past}");

    // The primary coming back hears where the bunker stands and continues from there.
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 1, None);
    assert_eq!(primary.next_lsn, end);
    let last = p.write(5, 100);
    primary.ship(&p.records(Lsn(end), Lsn(last.0 + 1)));
}

#[test]
fn inspect_reads_the_bunkers_dir() {
    let b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 3, None);
    let last = p.write(25, 2000);
    primary.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));
    let out: Output = ferryfs().arg("inspect").arg("--journal").arg(&b.dir).arg("--json").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let sb = &lines[0];
    assert_eq!(sb["type"], "superblock");
    assert_eq!(sb["set_id"], p.set_id.iter().map(|x| format!("{x:02x}")).collect::<String>());
    assert_eq!(sb["epoch"], 3);
    let records = lines.iter().filter(|l| l["type"] == "record").count();
    assert_eq!(records, 25, "every record, as inspect reads it:\n{text}");
}

#[test]
fn a_watermark_trims_whole_segments_below_it() {
    // Four segments of 1 MiB; about three of them filled.
    let b = BunkerProc::start(&["--log-size", "4M", "--segment-size", "1M"]);
    let p = PrimaryJournal::new();
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 0, None);
    let mut from = Lsn(1);
    for _ in 0..7 {
        let last = p.write(100, 4096);
        primary.ship(&p.records(from, Lsn(last.0 + 1)));
        from = Lsn(last.0 + 1);
    }
    let st = b.status();
    assert_eq!((st["start_lsn"].as_u64(), st["next_lsn"].as_u64()), (Some(1), Some(701)), "{st:#}");
    primary.w.send(&Frame::Control(ControlMsg::Watermark { all_acked_lsn: 400 })).unwrap();
    let st = b.wait_status(WAIT, |s| s["start_lsn"].as_u64() > Some(1));
    let start = st["start_lsn"].as_u64().unwrap();
    assert!(start <= 401, "only records up to the watermark are freed: start {start}");
    assert_eq!(st["watermark_lsn"], 400);
    let gone = read_log(b.addr, p.set_id, 1).unwrap_err();
    assert!(gone.contains("no longer holds record 1"), "{gone}");
    let (kept, end) = read_log(b.addr, p.set_id, 401).unwrap();
    assert_eq!((kept, end), (p.records(Lsn(401), Lsn(701)), 701), "everything past the watermark is kept");
}

#[test]
fn restart_at_moves_the_log_to_the_primarys_position() {
    let b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let first = p.write(60, 500);
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 0, None);
    primary.ship(&p.records(Lsn(1), Lsn(11)));
    // The primary's journal no longer reaches back to 11, say: the log restarts at 50.
    primary.w.send(&Frame::Control(ControlMsg::RestartAt { lsn: 50 })).unwrap();
    match next(&mut primary.r) {
        Frame::Control(ControlMsg::LogInfo { start_lsn, next_lsn, .. }) => assert_eq!((start_lsn, next_lsn), (50, 50)),
        f => panic!("expected LogInfo after RestartAt, got {f:?}"),
    }
    let tail = p.records(Lsn(50), Lsn(first.0 + 1));
    assert_eq!(primary.ship(&tail), first);
    let (got, end) = read_log(b.addr, p.set_id, 50).unwrap();
    assert_eq!((got, end), (tail, 61));
    let gone = read_log(b.addr, p.set_id, 5).unwrap_err();
    assert!(gone.contains("no longer holds record 5"), "{gone}");
    let st = b.status();
    assert_eq!((st["start_lsn"].as_u64(), st["durable_lsn"].as_u64()), (Some(50), Some(60)));
}

#[test]
fn a_second_primary_is_refused_while_one_is_connected() {
    let b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let mut first = FakePrimary::connect(b.addr, p.set_id, 0, None);
    let last = p.write(3, 100);
    first.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));
    let (mut r, _w) = connect(b.addr, hello(Role::Primary, p.set_id, 0, None)).unwrap();
    let why = bye_reason(next(&mut r));
    assert!(why.contains("two primaries at once"), "{why}");
    assert_closed(&mut r);
    // The first keeps its connection: it is still acked.
    let more = p.write(2, 100);
    first.ship(&p.records(Lsn(last.0 + 1), Lsn(more.0 + 1)));
    // Once it is gone, the next primary is served.
    first.w.shutdown();
    b.wait_status(WAIT, |s| s["primary"]["state"] == "lost");
    let again = FakePrimary::connect(b.addr, p.set_id, 0, None);
    assert_eq!(again.next_lsn, more.0 + 1);
}

#[test]
fn a_fence_refuses_the_old_primary_and_drops_its_connection() {
    let b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let mut old = FakePrimary::connect(b.addr, p.set_id, 1, None);
    let last = p.write(20, 1000);
    old.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));

    let (mut tr, mut tw) = connect(b.addr, hello(Role::FailoverTool, p.set_id, 0, None)).unwrap();
    assert!(matches!(next(&mut tr), Frame::Control(ControlMsg::LogInfo { primary_connected: true, .. })));
    tw.send(&Frame::Control(ControlMsg::Fence { epoch: 2 })).unwrap();
    match next(&mut tr) {
        Frame::Control(ControlMsg::LogInfo { epoch, next_lsn, primary_connected, .. }) => {
            assert_eq!((epoch, next_lsn, primary_connected), (2, 21, false));
        }
        f => panic!("expected LogInfo after Fence, got {f:?}"),
    }
    // The old primary is told, with the fork, and its connection closed; nothing more of it
    // is kept.
    assert_eq!(next(&mut old.r), Frame::Control(ControlMsg::Fenced { epoch: 2, fork_lsn: 21 }));
    let more = p.write(3, 1000);
    let _ = old.w.send_records(&p.records(Lsn(21), Lsn(more.0 + 1)));
    assert_closed(&mut old.r);
    assert!(fs::metadata(b.dir.join("fence")).is_ok(), "the fence is recorded in --dir");
    let (mut r, _w) = connect(b.addr, hello(Role::Primary, p.set_id, 1, None)).unwrap();
    assert_eq!(next(&mut r), Frame::Control(ControlMsg::Fenced { epoch: 2, fork_lsn: 21 }));
    assert_closed(&mut r);
    let st = b.status();
    assert_eq!(
        (st["fenced"].as_bool(), st["epoch"].as_u64(), st["next_lsn"].as_u64()),
        (Some(true), Some(2), Some(21))
    );
    assert!(st["primary"]["lost_reason"].as_str().unwrap().contains("fenced by a failover"), "{st:#}");
    assert!(b.log().contains("fenced at epoch 2 by failover tool"), "{}", b.log());
    // The tool reads what the old primary shipped, and nothing after.
    let (got, end) = read_log(b.addr, p.set_id, 1).unwrap();
    assert_eq!((got, end), (p.records(Lsn(1), Lsn(21)), 21));
    // A primary of the new epoch is served.
    let new = FakePrimary::connect(b.addr, p.set_id, 2, None);
    assert_eq!(new.next_lsn, 21);
}

#[test]
fn another_replication_set_is_refused() {
    let b = BunkerProc::start(&SMALL_LOG);
    let p = PrimaryJournal::new();
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 0, None);
    let last = p.write(2, 100);
    primary.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));
    let other = PrimaryJournal::new();
    let (mut r, _w) = connect(b.addr, hello(Role::Primary, other.set_id, 0, None)).unwrap();
    let why = bye_reason(next(&mut r));
    assert!(why.contains("replication set"), "{why}");
    let (mut r, _w) = connect(b.addr, hello(Role::FailoverTool, other.set_id, 0, None)).unwrap();
    let why = bye_reason(next(&mut r));
    assert!(why.contains("replication set"), "{why}");
    // Records of another set on the right primary's connection: refused, connection closed.
    let foreign = other.write(1, 100);
    primary.w.send_records(&other.records(Lsn(1), Lsn(foreign.0 + 1))).unwrap();
    assert_closed(&mut primary.r);
    assert_eq!(b.status()["next_lsn"], 3, "nothing of the refused frame was kept");
    assert!(b.log().contains("another replication set"), "{}", b.log());
    // A target is not served at all.
    let (mut r, _w) = connect(b.addr, hello(Role::Target, p.set_id, 0, None)).unwrap();
    assert!(bye_reason(next(&mut r)).contains("a target cannot connect"));
}

#[test]
fn a_wrong_or_missing_key_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let (k1, k2) = (keys.path().join("k1"), keys.path().join("k2"));
    fs::write(&k1, "0123456789abcdef0123456789abcdef\n").unwrap();
    fs::write(&k2, "fedcba9876543210fedcba9876543210\n").unwrap();
    let key = |p: &Path| Key::from_file_bytes(&fs::read(p).unwrap()).unwrap();
    let mut args: Vec<&str> = SMALL_LOG.to_vec();
    args.extend(["--key", k1.to_str().unwrap()]);
    let b = BunkerProc::start(&args);
    let p = PrimaryJournal::new();
    let wrong =
        connect(b.addr, hello(Role::Primary, p.set_id, 0, Some(key(&k2)))).err().expect("a wrong key is refused");
    assert!(wrong.to_string().contains("--key files differ"), "{wrong}");
    let none = connect(b.addr, hello(Role::Primary, p.set_id, 0, None)).err().expect("no key is refused");
    assert!(none.to_string().contains("requires a key"), "{none}");
    let tool = connect(b.addr, hello(Role::FailoverTool, p.set_id, 0, Some(key(&k2)))).err();
    assert!(tool.is_some(), "a failover tool with a wrong key is refused too");
    assert!(b.status()["set_id"].is_null(), "no log was made for a refused primary");
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 0, Some(key(&k1)));
    let last = p.write(2, 100);
    primary.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));
    assert!(b.log().contains("handshake refused"), "{}", b.log());
}

#[test]
fn bad_dir_or_listen_exits_nonzero_naming_it_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let run = |listen: &str, dir: &Path, extra: &[&str]| -> (i32, String) {
        let (st, out) = common::output_with_timeout(
            ferryfs().arg("bunker").arg("--listen").arg(listen).arg("--dir").arg(dir).args(extra),
            WAIT,
        );
        (st.expect("exits").code().unwrap_or(-1), out)
    };
    // --dir missing: named, not created.
    let missing = base.join("missing");
    let (code, out) = run("127.0.0.1:0", &missing, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--dir") && out.contains(missing.to_str().unwrap()), "{out}");
    assert!(!missing.exists(), "--dir was not created");
    // --dir is a file.
    let file = base.join("file");
    fs::write(&file, b"x").unwrap();
    let (code, out) = run("127.0.0.1:0", &file, &[]);
    assert!(code == 1 && out.contains("not a directory"), "{out}");

    let empty = base.join("empty");
    fs::create_dir(&empty).unwrap();
    // --listen unparsable, or taken.
    let (code, out) = run("not-an-address", &empty, &[]);
    assert!(code == 1 && out.contains("--listen not-an-address"), "{out}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, out) = run(&taken.local_addr().unwrap().to_string(), &empty, &[]);
    assert!(code == 1 && out.contains("--listen") && out.contains("cannot listen there"), "{out}");
    // Off loopback without a key.
    let (code, out) = run("0.0.0.0:0", &empty, &[]);
    assert!(code == 1 && out.contains("--key FILE is required"), "{out}");
    // A log size that cannot hold three segments.
    let (code, out) = run("127.0.0.1:0", &empty, &["--log-size", "1M", "--segment-size", "1M"]);
    assert!(code == 1 && out.contains("--log-size"), "{out}");
    assert!(dir_listing(&empty).is_empty(), "nothing was created in --dir: {:?}", dir_listing(&empty));

    // A primary's journal.
    let journal = base.join("journal");
    fs::create_dir(&journal).unwrap();
    let sb = Superblock::new([1; 16], 1, 2, b"/srv/data".to_vec(), [0; 16]);
    drop(Journal::create(DirStorage::new(&journal), PRIMARY_GEO, sb).unwrap());
    let before = dir_listing(&journal);
    let (code, out) = run("127.0.0.1:0", &journal, &[]);
    assert!(code == 1 && out.contains("a primary's journal") && out.contains("/srv/data"), "{out}");
    assert_eq!(dir_listing(&journal), before);
    // A journal that is not a bunker's log (a target's log has no backing directory).
    let target_log = base.join("target-log");
    fs::create_dir(&target_log).unwrap();
    let sb = Superblock::new([1; 16], 0, 0, Vec::new(), [0; 16]);
    drop(Journal::create(DirStorage::new(&target_log), PRIMARY_GEO, sb).unwrap());
    let before = dir_listing(&target_log);
    let (code, out) = run("127.0.0.1:0", &target_log, &[]);
    assert!(code == 1 && out.contains("not a bunker's log"), "{out}");
    assert_eq!(dir_listing(&target_log), before);
    // Someone else's files.
    let busy = base.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let (code, out) = run("127.0.0.1:0", &busy, &[]);
    assert!(code == 1 && out.contains("`notes.txt`") && out.contains("no bunker log"), "{out}");
    assert_eq!(dir_listing(&busy), ["notes.txt"]);
}

#[test]
fn status_shows_the_primary_lost_after_it_goes_silent_or_disconnects() {
    let mut b = BunkerProc::start(&SMALL_LOG);
    let st = b.status();
    assert_eq!((st["role"].as_str(), st["primary"]["state"].as_str()), (Some("bunker"), Some("never")));
    let p = PrimaryJournal::new();
    let mut primary = FakePrimary::connect(b.addr, p.set_id, 0, None);
    let last = p.write(7, 100);
    primary.ship(&p.records(Lsn(1), Lsn(last.0 + 1)));
    let st = b.status();
    assert_eq!(st["primary"]["state"], "connected", "{st:#}");
    assert_eq!((st["records_received"].as_u64(), st["durable_lsn"].as_u64()), (Some(7), Some(7)));
    assert!(matches!(
        tool_log_info(b.addr, p.set_id),
        ControlMsg::LogInfo { primary_connected: true, next_lsn: 8, .. }
    ));

    // Silent: no heartbeat from the fake primary. Lost after 5 s, and said so.
    let st = b.wait_status(Duration::from_secs(15), |s| s["primary"]["state"] == "lost");
    assert!(st["primary"]["lost_reason"].as_str().unwrap().contains("silent"), "{st:#}");
    assert_eq!(st["primary"]["last_record_lsn"], 7);
    assert!(matches!(tool_log_info(b.addr, p.set_id), ControlMsg::LogInfo { primary_connected: false, .. }));
    assert!(b.log().contains("ferryfs bunker: lost the primary 127.0.0.1:"), "{}", b.log());
    let table = b.status_table();
    assert!(table.contains("primary:  lost since ") && table.contains("last record 7"), "{table}");
    assert!(table.contains("mode:     bunker"), "{table}");
    assert_closed(&mut primary.r);

    // Connected again, then gone: lost at once, with the reason.
    let primary = FakePrimary::connect(b.addr, p.set_id, 0, None);
    b.wait_status(WAIT, |s| s["primary"]["state"] == "connected");
    primary.w.shutdown();
    let st = b.wait_status(WAIT, |s| s["primary"]["state"] == "lost");
    assert!(st["primary"]["lost_reason"].as_str().unwrap().contains("closed the connection"), "{st:#}");

    // A clean stop exits 0 and leaves a log that opens again.
    assert!(b.stop().success(), "{}", b.log());
    assert!(!b.dir.join("ferryfs.sock").exists(), "the status socket is removed on stop");
    b.restart();
    assert_eq!(b.status()["next_lsn"], 8);
}
