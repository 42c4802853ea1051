//! Replication bad input, end to end (issue 3, "Bad input"): wrong or missing keys, garbage on
//! the target's port, bad frames and bad records from a fake primary, bad command lines, a
//! second primary. Each is refused with a message naming what is wrong (asserted on the log
//! text), nothing is written outside `--dir` (the target's directory stays as it was), and the
//! other side keeps running: the target still serves a good primary afterwards, and a primary's
//! mount still serves reads and writes.
//!
//! The fake primary is this test process: a real handshake (`net::conn::handshake`) on a
//! `TcpStream` it keeps a clone of, so it can write any bytes after the handshake. A target's
//! first primary fixes its replication set, so the fake uses the set id of the mount that is
//! shown to be served afterwards (read with `ferryfs inspect --json`).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::target::{TargetProc, status, tree_diff, wait_converged};
use common::{Mount, ferryfs, pattern};
use ferryfs::format::ops::{NodeKind, Op};
use ferryfs::format::record::{self, Header, Kind};
use ferryfs::net::conn::{self, NetError, Reader};
use ferryfs::proto::wire::control::ControlMsg;
use ferryfs::proto::wire::{FRAME_BODY_MAX, Frame, HandshakeConfig, Hello, PROTOCOL_VERSION, Role};
use ferryfs::types::{FileId, Lsn, TxId};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONVERGE: Duration = Duration::from_secs(90);
/// How long a log line or a closed connection is waited for (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers

fn seed() -> u64 {
    std::env::var("FERRYFS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// A key file in `dir`.
fn key_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, contents).unwrap();
    p
}

/// Polls `log` until it contains `needle`; returns the log. Panics with the log after `WAIT`.
fn wait_log(what: &str, log: impl Fn() -> String, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = log();
        if l.contains(needle) {
            return l;
        }
        assert!(Instant::now() < deadline, "{what} never said {needle:?} within {WAIT:?}; it says:\n{l}");
        sleep(Duration::from_millis(50));
    }
}

/// Waits for the target's log line about the end of the connection from `local` (every
/// connection the target refuses or closes ends with "connection from PEER closed: WHY"), and
/// returns WHY. Only the log from byte `from` on (its length before the connection was made)
/// is searched, so an earlier connection from the same port cannot be taken for this one.
fn target_refusal(t: &TargetProc, local: SocketAddr, from: usize) -> String {
    let needle = format!("connection from {local} closed: ");
    let since = || t.log().get(from..).unwrap_or("").to_string();
    let log = wait_log("the target", since, &needle);
    let at = log.find(&needle).unwrap() + needle.len();
    log[at..].lines().next().unwrap_or("").to_string()
}

/// Flushes the kernel's writeback cache into the journal.
fn sync_mount(m: &Mount) {
    let f = fs::File::open(&m.mnt).unwrap();
    // SAFETY: a valid fd.
    unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
}

/// The mount serves writes and reads, and its backing directory gets the data.
fn assert_mount_works(m: &Mount, name: &str) {
    let data = pattern(name.len() as u64, 100_000);
    fs::write(m.mnt.join(name), &data).unwrap();
    assert_eq!(fs::read(m.mnt.join(name)).unwrap(), data, "reading back {name} through the mount");
    fs::create_dir_all(m.mnt.join("d").join(name)).unwrap();
    assert!(m.mnt.join("d").join(name).is_dir());
    sync_mount(m);
    assert_eq!(fs::read(m.backing.join(name)).unwrap(), data, "{name} in the backing directory");
}

/// Every path under `root`, relative, with a `/` after directories.
fn listing(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
                out.insert(format!("{rel}/"));
            } else {
                out.insert(rel);
            }
        }
    }
    out
}

fn assert_empty(dir: &Path, why: &str) {
    let l = listing(dir);
    assert!(l.is_empty(), "{} should be empty ({why}) but holds {l:?}", dir.display());
}

/// The entries directly in the target's base directory (the parent of `--dir`): `dir`,
/// `state` and the log; a name like `../x` applied through `--dir` would show up here.
fn base_entries(t: &TargetProc) -> BTreeSet<String> {
    fs::read_dir(t.dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The replication set id of a mount's journal (`ferryfs inspect --json`, superblock line).
fn set_id_of(m: &Mount) -> [u8; 16] {
    let out = m.inspect(&["--json"]);
    assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let sb: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let hex = sb["set_id"].as_str().unwrap_or_else(|| panic!("no set_id in {sb}"));
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

fn mount_with_target(url: &str, extra: &[&str]) -> Mount {
    let mut args = vec!["--target", url];
    args.extend_from_slice(extra);
    Mount::start_with(&args)
}

/// The target's state for the mount's single target, once its last_error contains `needle`.
fn wait_status_error(m: &Mount, needle: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = status(&m.journal);
        let t = &st["targets"][0];
        if t["last_error"].as_str().is_some_and(|e| e.contains(needle)) {
            return t.clone();
        }
        assert!(Instant::now() < deadline, "status never showed a last_error with {needle:?}: {st:#}\n{}", m.log());
        sleep(Duration::from_millis(200));
    }
}

/// A good primary (a mount with `args`) replicates to `t` from scratch: a few files, converged.
fn assert_target_serves(t: &TargetProc, m: &Mount) {
    fs::write(m.mnt.join("after-bad-input"), pattern(1, 300_000)).unwrap();
    fs::create_dir(m.mnt.join("dir-after")).unwrap();
    fs::write(m.mnt.join("dir-after/f"), b"fine").unwrap();
    sync_mount(m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
}

// ---------------------------------------------------------------------------------------------
// Bytes built by hand: frames and records

/// A frame: magic, kind, body length, seq, crc32c over the header (crc field zero) and body.
fn frame(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    frame_claiming(kind, seq, body.len() as u32, body)
}

/// A frame whose header claims `body_len` (with `body` after it, whatever its length).
fn frame_claiming(kind: u16, seq: u32, body_len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + body.len());
    f.extend_from_slice(b"FW");
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&body_len.to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(body);
    let crc = crc32c::crc32c(&f);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    f
}

const RECORDS: u16 = 1;
const HEARTBEAT: u16 = 4;

/// One journal record with a correct crc.
fn record_bytes(kind: Kind, lsn: u64, set_id: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let h = Header {
        kind,
        lsn: Lsn(lsn),
        txid: TxId(lsn),
        payload_len: 0,
        crc: 0,
        set_id,
        epoch: 0,
        time_ns: 1_700_000_000_000_000_000,
    };
    let mut out = vec![0u8; record::record_len(payload.len())];
    record::encode_into(&mut out, h, &[payload]);
    out
}

/// An Op record creating the file `name` in the root.
fn create_record(lsn: u64, set_id: [u8; 16], name: &[u8]) -> Vec<u8> {
    let op = Op::Create {
        parent: FileId::ROOT,
        name: name.to_vec(),
        new_id: FileId(1000 + lsn),
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    };
    let mut payload = Vec::new();
    op.encode(&mut payload);
    record_bytes(Kind::Op, lsn, set_id, &payload)
}

#[test]
fn the_hand_built_frames_match_the_protocol_golden_bytes() {
    // docs/PROTOCOL.md, "Golden example": seq 0 Heartbeat and seq 1 Ack(7).
    assert_eq!(frame(HEARTBEAT, 0, &[]), [0x46, 0x57, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0, 0x57, 0xdc, 0xa8]);
    let ack = frame(2, 1, &7u64.to_le_bytes());
    assert_eq!(&ack[..16], [0x46, 0x57, 2, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0xff, 0x84, 0xfe, 0x1a]);
    // A record built here passes the journal's own checks.
    let r = create_record(1, [9; 16], b"ok");
    let h = record::decode_header(&r, r.len()).unwrap();
    record::verify(&r, &h).unwrap();
    assert!(Op::decode(&r[64..64 + h.payload_len as usize]).is_ok());
}

// ---------------------------------------------------------------------------------------------
// The fake primary

struct FakePrimary {
    /// A clone of the connection for raw writes after the handshake.
    raw: TcpStream,
    reader: Reader,
    local: SocketAddr,
    /// The target's log length before this connection (see `target_refusal`).
    log_from: usize,
    /// The target's opening Status: (next_lsn, durable_lsn, applied_lsn).
    status: (u64, u64, u64),
}

fn handshake_as(
    addr: SocketAddr,
    role: Role,
    set_id: [u8; 16],
) -> (TcpStream, Result<(Reader, ferryfs::proto::wire::Established), NetError>) {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    stream.set_nodelay(true).unwrap();
    let raw = stream.try_clone().unwrap();
    let cfg =
        HandshakeConfig { role, set_id, epoch: 0, instance_id: conn::instance_id(), nonce: conn::nonce(), key: None };
    let r = conn::handshake(stream, cfg).map(|(reader, _writer, est)| (reader, est));
    (raw, r)
}

impl FakePrimary {
    /// A primary of set `set_id`: handshake, then the target's Status.
    fn connect(t: &TargetProc, set_id: [u8; 16]) -> FakePrimary {
        let (addr, log_from) = (t.addr, t.log().len());
        let (raw, r) = handshake_as(addr, Role::Primary, set_id);
        let (mut reader, est) = r.unwrap_or_else(|e| panic!("fake primary: handshake with {addr}: {e}"));
        assert_eq!(est.peer.role, Role::Target);
        let local = raw.local_addr().unwrap();
        let status = match reader.recv(WAIT) {
            Ok(Frame::Control(ControlMsg::Status { next_lsn, durable_lsn, applied_lsn })) => {
                (next_lsn, durable_lsn, applied_lsn)
            }
            other => panic!("fake primary: expected the target's Status, got {other:?}"),
        };
        match reader.recv(WAIT) {
            Ok(Frame::Control(ControlMsg::LogInfo { .. })) => {}
            other => panic!("fake primary: expected the target's LogInfo after its Status, got {other:?}"),
        }
        FakePrimary { raw, reader, local, log_from, status }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.raw.write_all(bytes).unwrap();
    }

    /// Waits until the target closes the connection; with `trickle`, keeps sending a byte
    /// every 200 ms meanwhile (a target waiting for a body would never see silence). Panics if
    /// the target answers with anything but a heartbeat, or keeps the connection for `WAIT`.
    fn wait_closed(&mut self, trickle: bool) -> Duration {
        let start = Instant::now();
        loop {
            if trickle {
                let _ = self.raw.write_all(&[0]);
            }
            match self.reader.recv(Duration::from_millis(200)) {
                Err(NetError::Timeout(_)) => {}
                Err(_) => return start.elapsed(),
                Ok(Frame::Heartbeat) => {}
                Ok(f) => panic!("the target answered a refused frame with {f:?}"),
            }
            assert!(start.elapsed() < WAIT, "the target kept the connection open for {WAIT:?}");
        }
    }

    /// Ends the connection and waits until the target has let go of it (so the next fake
    /// primary is not taken for a second one).
    fn close(self, t: &TargetProc) {
        let _ = self.raw.shutdown(std::net::Shutdown::Both);
        let why = target_refusal(t, self.local, self.log_from);
        assert!(why.contains("closed the connection"), "{why}");
    }
}

/// What the target holds, seen by a new fake primary: its Status. Closes that connection.
fn target_position(t: &TargetProc, set_id: [u8; 16]) -> (u64, u64, u64) {
    let p = FakePrimary::connect(t, set_id);
    let s = p.status;
    p.close(t);
    s
}

/// One bad input from a fake primary of set `set_id`: `send` writes it, the target must close
/// the connection (promptly: with `trickle`, bytes keep coming meanwhile), log a reason
/// containing `needle`, keep its log where it was and write nothing (its directory stays
/// empty).
fn refused_from_fake_primary(
    t: &TargetProc,
    set_id: [u8; 16],
    what: &str,
    needle: &str,
    trickle: bool,
    send: impl FnOnce(&mut FakePrimary),
) {
    refused_from_fake_primary_into(t, set_id, &BTreeSet::new(), what, needle, trickle, send)
}

/// As `refused_from_fake_primary`, for a target whose directory holds `mirrored`.
fn refused_from_fake_primary_into(
    t: &TargetProc,
    set_id: [u8; 16],
    mirrored: &BTreeSet<String>,
    what: &str,
    needle: &str,
    trickle: bool,
    send: impl FnOnce(&mut FakePrimary),
) {
    let base_before = base_entries(t);
    let mut p = FakePrimary::connect(t, set_id);
    let before = p.status;
    send(&mut p);
    let took = p.wait_closed(trickle);
    let why = target_refusal(t, p.local, p.log_from);
    eprintln!("{what}: closed after {took:?}: {why}");
    assert!(why.contains(needle), "{what}: the target's reason should contain {needle:?}, it is: {why}");
    assert_eq!(&listing(&t.dir), mirrored, "{what}: the target directory changed");
    assert_eq!(base_entries(t), base_before, "{what}: something appeared next to --dir");
    let after = target_position(t, set_id);
    assert_eq!(after, before, "{what}: the target's log moved (next, durable, applied) after a refused frame");
}

// ---------------------------------------------------------------------------------------------
// 1. Keys

/// Target and mount with these keys (None: no --key) cannot talk: each log names the reason,
/// the status shows it, the target's directory stays empty, the mount works; then a mount
/// with the target's key replicates to the same target.
fn refused_for_keys(target_key: Option<&[u8]>, mount_key: Option<&[u8]>, mount_says: &str, target_says: &str) {
    let keys = tempfile::tempdir().unwrap();
    let tkey = target_key.map(|k| key_file(keys.path(), "target.key", k));
    let mkey = mount_key.map(|k| key_file(keys.path(), "mount.key", k));
    let targs: Vec<&str> = tkey.as_ref().map(|k| vec!["--key", k.to_str().unwrap()]).unwrap_or_default();
    let t = TargetProc::start(&targs);
    let base_before = base_entries(&t);
    let url = t.url();
    let margs: Vec<&str> = mkey.as_ref().map(|k| vec!["--key", k.to_str().unwrap()]).unwrap_or_default();
    let m = mount_with_target(&url, &margs);

    wait_log("the mount", || m.log(), mount_says);
    wait_log("the target", || t.log(), target_says);
    let st = wait_status_error(&m, "key");
    assert_ne!(st["state"], "in-sync", "{st:#}");
    assert_eq!(st["acked_lsn"], 0, "{st:#}");
    assert!(!t.log().contains("primary 127.0.0.1"), "the target took the primary in:\n{}", t.log());

    assert_mount_works(&m, "still-served");
    // Retries go on (backoff) and keep failing the same way, the mount keeps serving.
    sleep(Duration::from_secs(2));
    assert_mount_works(&m, "still-served-2");
    assert_empty(&t.dir, "no primary got through");
    assert_eq!(base_entries(&t), base_before);
    assert!(
        t.state.join("log").read_dir().map(|d| d.flatten().all(|e| e.file_name() == "lock")).unwrap_or(true),
        "the target's log was created"
    );
    drop(m);

    // The target keeps serving: a primary with the right key (or none, as the target has).
    let gargs: Vec<&str> = tkey.as_ref().map(|k| vec!["--key", k.to_str().unwrap()]).unwrap_or_default();
    let good = mount_with_target(&url, &gargs);
    assert_target_serves(&t, &good);
}

#[test]
fn a_wrong_key_is_refused_on_both_sides_and_the_mount_keeps_serving() {
    let phrase = "the two sides' --key files differ";
    refused_for_keys(
        Some(b"the target's key, 32 bytes long\n"),
        Some(b"another key, also long enough\n"),
        phrase,
        phrase,
    );
}

#[test]
fn a_key_on_the_target_only_is_refused_on_both_sides() {
    refused_for_keys(Some(b"the target's key, 32 bytes long\n"), None, "peer requires a key", "peer sent no proof");
}

#[test]
fn a_key_on_the_mount_only_is_refused_on_both_sides() {
    refused_for_keys(None, Some(b"the mount's key, 32 bytes long!\n"), "peer sent no proof", "peer requires a key");
}

// ---------------------------------------------------------------------------------------------
// 2. Garbage on the target's port

/// Sends `bytes` on a new connection, then waits until the target closes it; returns the
/// target's reason.
fn garbage(t: &TargetProc, bytes: &[u8]) -> String {
    let from = t.log().len();
    let mut s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(10)).unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    // EOF or a reset: the target closed it (a timeout would fail below with the log).
    let r = s.read_to_end(&mut sink);
    if let Err(e) = &r {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the target kept a garbage connection open for {WAIT:?}:\n{}",
            t.log()
        );
    }
    // Whatever the target sent is at most its hello: never a frame.
    assert!(sink.len() <= 96, "the target sent {} bytes to a garbage peer", sink.len());
    target_refusal(t, local, from)
}

fn hello_bytes(role: Role) -> [u8; 96] {
    Hello {
        version: PROTOCOL_VERSION,
        role,
        flags: 0,
        set_id: [0; 16],
        epoch: 0,
        instance_id: rand::random(),
        nonce: rand::random(),
    }
    .encode()
}

fn with_crc(mut h: [u8; 96]) -> [u8; 96] {
    let crc = crc32c::crc32c(&h[..92]);
    h[92..].copy_from_slice(&crc.to_le_bytes());
    h
}

#[test]
fn garbage_on_the_target_port_is_refused_and_a_good_primary_still_converges() {
    let seed = seed();
    eprintln!("FERRYFS_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = TargetProc::start(&[]);
    let base_before = base_entries(&t);

    let why = garbage(&t, b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\n\r\n");
    assert!(why.contains("not a ferryfs peer") && why.contains("is something else listening"), "{why}");

    let mut noise = vec![0u8; 8192];
    rng.fill_bytes(&mut noise);
    noise[0] = b'x';
    let why = garbage(&t, &noise);
    assert!(why.contains("not a ferryfs peer"), "{why}");

    // The right magic, then a wrong byte in it: refused at that byte.
    let why = garbage(&t, b"FRYWIRX\0and more");
    assert!(why.contains("not a ferryfs peer"), "{why}");

    // A hello from a future major version: refused naming both versions.
    let mut h = hello_bytes(Role::Primary);
    h[8..10].copy_from_slice(&9u16.to_le_bytes());
    let why = garbage(&t, &with_crc(h));
    let ours = ferryfs::proto::wire::PROTOCOL_VERSION;
    assert!(why.contains(&format!("wire protocol 9.{}", ours.minor)) && why.contains(&ours.to_string()), "{why}");

    // A hello damaged in transit.
    let mut h = hello_bytes(Role::Primary);
    h[20] ^= 0xff;
    let why = garbage(&t, &h);
    assert!(why.contains("hello fails its crc"), "{why}");

    // A hello claiming a length outside 96..=1024.
    let mut h = hello_bytes(Role::Primary);
    h[12..14].copy_from_slice(&5000u16.to_le_bytes());
    let why = garbage(&t, &with_crc(h));
    assert!(why.contains("claims 5000 bytes"), "{why}");

    // An unknown role.
    let mut h = hello_bytes(Role::Primary);
    h[14] = 77;
    let why = garbage(&t, &with_crc(h));
    assert!(why.contains("unknown role 77"), "{why}");

    // A valid handshake from another role than a primary: told why, then closed.
    let from = t.log().len();
    let (raw, r) = handshake_as(t.addr, Role::Bunker, rand::random());
    let (mut reader, _) = r.unwrap();
    match reader.recv(WAIT) {
        Ok(Frame::Control(ControlMsg::Bye { reason })) => {
            assert!(reason.contains("a bunker cannot connect"), "{reason}")
        }
        other => panic!("a bunker should get a Bye, got {other:?}"),
    }
    let why = target_refusal(&t, raw.local_addr().unwrap(), from);
    assert!(why.contains("refused a bunker (only a primary may connect)"), "{why}");

    assert_empty(&t.dir, "garbage only");
    assert_eq!(base_entries(&t), base_before);

    let m = mount_with_target(&t.url(), &[]);
    assert_target_serves(&t, &m);
}

#[test]
fn a_half_sent_hello_is_dropped_after_the_handshake_timeout() {
    let t = TargetProc::start(&[]);
    let from = t.log().len();
    let mut s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(10)).unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(&hello_bytes(Role::Primary)[..50]).unwrap();
    let start = Instant::now();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let took = start.elapsed();
    assert!(took < WAIT, "a half hello held the connection for {took:?}");
    let why = target_refusal(&t, local, from);
    assert!(why.contains("the handshake did not complete in time"), "{why}");
    assert_empty(&t.dir, "half a hello");
    let m = mount_with_target(&t.url(), &[]);
    assert_target_serves(&t, &m);
}

// ---------------------------------------------------------------------------------------------
// 3. A fake primary's bad frames and records

/// A mount without targets (to learn its set id), a target, and the target's opening Status.
fn fake_primary_setup() -> (Mount, TargetProc, [u8; 16]) {
    let m = Mount::start();
    fs::write(m.mnt.join("before"), pattern(3, 50_000)).unwrap();
    let set = set_id_of(&m);
    let t = TargetProc::start(&[]);
    (m, t, set)
}

/// The real primary `m`, now told about the target, replicates to it from scratch.
fn then_the_real_primary_is_served(mut m: Mount, t: &TargetProc) {
    assert_empty(&t.dir, "before the real primary");
    let url = t.url();
    m.restart_with(&["--target", &url]);
    assert_target_serves(t, &m);
}

#[test]
fn bad_frames_from_a_primary_are_refused_before_anything_is_kept() {
    let (m, t, set) = fake_primary_setup();
    let (next, ..) = target_position(&t, set);
    let good = create_record(next, set, b"planted");

    refused_from_fake_primary(&t, set, "frame crc", "frame 0: crc mismatch", false, |p| {
        let mut f = frame(RECORDS, 0, &good);
        let last = f.len() - 1;
        f[last] ^= 0x01; // a padding byte: the record is unchanged but for it, the frame crc fails
        p.send(&f);
    });
    refused_from_fake_primary(&t, set, "frame magic", "frame 0: bad magic 0x5858", false, |p| {
        let mut f = frame(RECORDS, 0, &good);
        f[..2].copy_from_slice(b"XX");
        p.send(&f);
    });
    refused_from_fake_primary(&t, set, "frame seq", "frame 0: carries sequence number 5", false, |p| {
        p.send(&frame(RECORDS, 5, &good));
    });
    refused_from_fake_primary(&t, set, "unknown kind", "frame 0: unknown kind 99", false, |p| {
        p.send(&frame(99, 0, &good));
    });
    refused_from_fake_primary(&t, set, "records body not whole records", "record at offset 0", false, |p| {
        p.send(&frame(RECORDS, 0, &good[..good.len() - 8]));
    });
    refused_from_fake_primary(&t, set, "empty records body", "frame 0", false, |p| {
        p.send(&frame(RECORDS, 0, &[]));
    });
    refused_from_fake_primary(&t, set, "second frame damaged", "frame 1: crc mismatch", false, |p| {
        p.send(&frame(HEARTBEAT, 0, &[]));
        let mut f = frame(RECORDS, 1, &good);
        f[16 + 70] ^= 0x01;
        p.send(&f);
    });

    // Over FRAME_BODY_MAX: refused on the header, while bytes keep coming (a target waiting
    // for the body would never close this connection).
    let over = (FRAME_BODY_MAX + 1) as u32;
    let needle = format!("frame 0: body of {over} bytes is over the limit of {FRAME_BODY_MAX}");
    refused_from_fake_primary(&t, set, "body over the limit", &needle, true, |p| {
        p.send(&frame_claiming(RECORDS, 0, over, &good));
    });
    let needle = format!("frame 0: body of {} bytes is over the limit", u32::MAX);
    refused_from_fake_primary(&t, set, "body of u32::MAX", &needle, true, |p| {
        p.send(&frame_claiming(RECORDS, 0, u32::MAX, &[]));
    });

    then_the_real_primary_is_served(m, &t);
}

#[test]
fn bad_records_from_a_primary_are_refused_naming_the_record() {
    let (m, t, set) = fake_primary_setup();
    let (next, ..) = target_position(&t, set);
    let records = |body: Vec<u8>| move |p: &mut FakePrimary| p.send(&frame(RECORDS, 0, &body));

    let mut bad_crc = create_record(next, set, b"planted");
    bad_crc[28] ^= 0x01;
    refused_from_fake_primary(
        &t,
        set,
        "record crc",
        &format!("received record {next} refused: crc mismatch"),
        false,
        records(bad_crc),
    );

    let other_set = create_record(next, [0xee; 16], b"planted");
    let needle = format!("received record {next} refused: it belongs to another replication set");
    refused_from_fake_primary(&t, set, "record of another set", &needle, false, records(other_set));

    let ahead = create_record(next + 5, set, b"planted");
    let needle = format!("received record {} refused: out of order: the log expects {next}", next + 5);
    refused_from_fake_primary(&t, set, "record out of order", &needle, false, records(ahead));

    let mut bad_magic = create_record(next, set, b"planted");
    bad_magic[..4].copy_from_slice(b"XXXX");
    refused_from_fake_primary(
        &t,
        set,
        "record magic",
        "received record at byte 0: no record here",
        false,
        records(bad_magic),
    );

    let short_write = record_bytes(Kind::Write, next, set, &[1, 0, 0, 0, 0, 0, 0, 0]);
    let needle = format!("received record {next} refused: payload ends early");
    refused_from_fake_primary(&t, set, "write payload too short", &needle, false, records(short_write));

    // Names that would leave --dir or are not one component, in every op that takes a name.
    // `Op::encode` writes any name; the decoder refuses them.
    let needle = format!("received record {next} refused: bad name component");
    for name in [&b"../x"[..], b"a/b", b"..", b".", b"", b"/x", b"x\0y"] {
        let what = format!("create {:?}", String::from_utf8_lossy(name));
        refused_from_fake_primary(&t, set, &what, &needle, false, records(create_record(next, set, name)));
    }
    for (what, op) in [
        ("link as ../x", Op::Link { id: FileId::ROOT, new_parent: FileId::ROOT, new_name: b"../x".to_vec() }),
        ("unlink ..", Op::Unlink { parent: FileId::ROOT, name: b"..".to_vec(), id: FileId(5), dir: true }),
        (
            "rename to a/b",
            Op::Rename {
                parent: FileId::ROOT,
                name: b"ok".to_vec(),
                new_parent: FileId::ROOT,
                new_name: b"a/b".to_vec(),
                flags: 0,
                id: FileId(5),
                replaced: FileId::NONE,
            },
        ),
        (
            "rename from ..",
            Op::Rename {
                parent: FileId::ROOT,
                name: b"..".to_vec(),
                new_parent: FileId::ROOT,
                new_name: b"ok".to_vec(),
                flags: 0,
                id: FileId(5),
                replaced: FileId::NONE,
            },
        ),
    ] {
        let mut payload = Vec::new();
        op.encode(&mut payload);
        refused_from_fake_primary(&t, set, what, &needle, false, records(record_bytes(Kind::Op, next, set, &payload)));
    }
    // A bad name after a good record in the same frame: the whole frame is refused.
    let mut body = create_record(next, set, b"planted");
    body.extend(create_record(next + 1, set, b"../x"));
    let needle = format!("received record {} refused: bad name component", next + 1);
    refused_from_fake_primary(&t, set, "good record then ../x", &needle, false, records(body));

    assert!(!t.dir.parent().unwrap().join("x").exists());
    assert!(!t.dir.join("a").exists());
    then_the_real_primary_is_served(m, &t);
}

/// The journal checks (crc, set id, LSN order) refuse a bad record after a good one in the
/// same Records frame: the whole frame must be refused, nothing of it appended
/// (docs/PROTOCOL.md, "Errors": "the frame is refused before anything of it is appended").
/// The target here mirrors a real primary, stopped meanwhile; once restarted, that primary
/// must still be served.
#[test]
fn a_frame_with_good_records_then_a_bad_one_is_refused_whole() {
    let t = TargetProc::start(&[]);
    let url = t.url();
    let mut m = mount_with_target(&url, &[]);
    fs::write(m.mnt.join("first"), pattern(4, 100_000)).unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    let set = set_id_of(&m);
    let st = m.stop();
    assert!(st.success(), "{st}: {}", m.log());
    wait_log("the target", || t.log(), "the primary said goodbye");
    let mirrored = listing(&t.dir);
    let (next, ..) = target_position(&t, set);
    let records = |body: Vec<u8>| move |p: &mut FakePrimary| p.send(&frame(RECORDS, 0, &body));

    let mut body = create_record(next, set, b"planted");
    let mut bad = create_record(next + 1, set, b"planted2");
    bad[28] ^= 0x01;
    body.extend(bad);
    let needle = format!("received record {} refused: crc mismatch", next + 1);
    refused_from_fake_primary_into(&t, set, &mirrored, "good record then a bad crc", &needle, false, records(body));

    let mut body = create_record(next, set, b"planted");
    body.extend(create_record(next + 1, [0xee; 16], b"planted2"));
    let needle = format!("received record {} refused: it belongs to another replication set", next + 1);
    refused_from_fake_primary_into(&t, set, &mirrored, "good record then another set", &needle, false, records(body));

    let mut body = create_record(next, set, b"planted");
    body.extend(create_record(next + 7, set, b"planted2"));
    let needle = format!("received record {} refused: out of order", next + 7);
    refused_from_fake_primary_into(&t, set, &mirrored, "good record then a gap", &needle, false, records(body));

    // The real primary comes back and is served as if nothing happened.
    m.restart();
    for i in 0..5 {
        fs::write(m.mnt.join(format!("after-{i}")), pattern(i, 20_000)).unwrap();
    }
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    assert!(!t.dir.join("planted").exists());
}

// ---------------------------------------------------------------------------------------------
// 4. Bad command lines

fn run(cmd: &mut std::process::Command) -> (std::process::ExitStatus, String) {
    let (st, out) = common::output_with_timeout(cmd, Duration::from_secs(30));
    (st.unwrap_or_else(|| panic!("{cmd:?} did not exit within 30 s (it should refuse at once); output:\n{out}")), out)
}

fn target_cmd(dirs: &Path, args: &[&str]) -> std::process::Command {
    let (dir, state) = (dirs.join("dir"), dirs.join("state"));
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&state).unwrap();
    let mut c = ferryfs();
    c.arg("target").arg("--dir").arg(&dir).arg("--state").arg(&state).args(args);
    c
}

#[test]
fn the_target_refuses_a_public_address_without_a_key_and_a_short_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (st, out) = run(&mut target_cmd(tmp.path(), &["--listen", "0.0.0.0:0"]));
    assert!(!st.success(), "{out}");
    assert!(out.contains("is not a loopback address: a --key FILE is required"), "{out}");
    assert!(!out.contains("listening on"), "{out}");

    let short = key_file(tmp.path(), "short.key", b"0123456789abcde\n");
    let (st, out) = run(&mut target_cmd(tmp.path(), &["--listen", "127.0.0.1:0", "--key", short.to_str().unwrap()]));
    assert!(!st.success(), "{out}");
    assert!(out.contains("key file holds 15 bytes after trimming the newline; a key needs at least 16"), "{out}");
    assert!(out.contains(short.to_str().unwrap()), "the message should name the file: {out}");
    assert!(out.contains("head -c 32 /dev/urandom"), "the message should say how to make a key: {out}");

    let missing = tmp.path().join("no-such.key");
    let (st, out) = run(&mut target_cmd(tmp.path(), &["--listen", "127.0.0.1:0", "--key", missing.to_str().unwrap()]));
    assert!(!st.success(), "{out}");
    assert!(out.contains("cannot read it"), "{out}");

    let (st, out) = run(&mut target_cmd(tmp.path(), &["--listen", "not-an-address"]));
    assert!(!st.success(), "{out}");
    assert!(out.contains("--listen not-an-address: not a HOST:PORT"), "{out}");

    assert_empty(&tmp.path().join("dir"), "refused command lines");

    // 16 bytes and a newline: just long enough.
    let ok = key_file(tmp.path(), "ok.key", b"0123456789abcdef\n");
    let t = TargetProc::start(&["--key", ok.to_str().unwrap()]);
    let m = mount_with_target(&t.url(), &["--key", ok.to_str().unwrap()]);
    assert_target_serves(&t, &m);
}

/// `ferryfs mount` with `args` on fresh dirs: refused with a message containing `needle`,
/// non-zero exit, nothing mounted, no journal created.
fn mount_refused(args: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (mnt, backing, journal) = (tmp.path().join("mnt"), tmp.path().join("backing"), tmp.path().join("journal"));
    for d in [&mnt, &backing, &journal] {
        fs::create_dir(d).unwrap();
    }
    fs::write(backing.join("data"), b"kept").unwrap();
    let mut c = ferryfs();
    c.arg("mount").arg(&mnt).arg("--backing").arg(&backing).arg("--journal").arg(&journal).args(args);
    let (st, out) = common::output_with_timeout(&mut c, Duration::from_secs(30));
    let mounted = common::is_fuse_mounted(&mnt);
    if mounted {
        common::force_unmount(&mnt);
    }
    assert!(!mounted, "mount {args:?} mounted; output:\n{out}");
    let st = st.unwrap_or_else(|| panic!("mount {args:?} did not exit within 30 s; output:\n{out}"));
    assert!(!st.success(), "mount {args:?} exited 0: {out}");
    assert!(out.contains(needle), "mount {args:?}: expected {needle:?} in:\n{out}");
    let made: BTreeSet<String> = listing(&journal).into_iter().filter(|n| n != "lock").collect();
    assert!(made.is_empty(), "mount {args:?} left a journal behind: {made:?}");
    assert_eq!(listing(&backing), BTreeSet::from(["data".to_string()]));
    assert_eq!(fs::read(backing.join("data")).unwrap(), b"kept");
}

#[test]
fn the_mount_refuses_bad_targets_and_keys_and_mounts_nothing() {
    mount_refused(
        &["--target", "bogus://x"],
        "--target bogus://x: unknown scheme; use tcp://HOST:PORT or a directory path",
    );
    mount_refused(
        &["--target", "/nonexistent/ferryfs-target"],
        "--target /nonexistent/ferryfs-target: No such file or directory",
    );
    mount_refused(&["--target", "tcp://127.0.0.1"], "--target tcp://127.0.0.1: not a HOST:PORT");
    let keys = tempfile::tempdir().unwrap();
    let short = key_file(keys.path(), "short.key", b"short\n");
    mount_refused(
        &["--target", "tcp://127.0.0.1:9", "--key", short.to_str().unwrap()],
        "key file holds 5 bytes after trimming the newline; a key needs at least 16",
    );
    let missing = keys.path().join("missing.key");
    mount_refused(&["--target", "tcp://127.0.0.1:9", "--key", missing.to_str().unwrap()], "cannot read it");
}

// ---------------------------------------------------------------------------------------------
// 5. Two primaries

#[test]
fn a_second_primary_is_refused_while_the_first_keeps_replicating() {
    let t = TargetProc::start(&[]);
    let url = t.url();
    let m1 = mount_with_target(&url, &[]);
    fs::write(m1.mnt.join("first"), pattern(5, 200_000)).unwrap();
    sync_mount(&m1);
    wait_converged(&m1.journal, &m1.backing, &[&t.dir], CONVERGE);
    let set = set_id_of(&m1);

    // A second primary of the same set (the fake): told why, then closed.
    let from = t.log().len();
    let (raw, r) = handshake_as(t.addr, Role::Primary, set);
    let (mut reader, _) = r.expect("the handshake itself succeeds");
    match reader.recv(WAIT) {
        Ok(Frame::Control(ControlMsg::Bye { reason })) => assert!(reason.contains("two primaries"), "{reason}"),
        other => panic!("a second primary should get a Bye, got {other:?}"),
    }
    let why = target_refusal(&t, raw.local_addr().unwrap(), from);
    assert!(why.contains("another primary is connected to this target; two primaries at once are refused"), "{why}");

    // A second real mount (another set): refused too, and it keeps serving its own mount.
    let m2 = mount_with_target(&url, &[]);
    fs::write(m2.mnt.join("from-the-second"), b"must not reach the target").unwrap();
    sync_mount(&m2);
    wait_log("the target", || t.log(), "this target belongs to replication set");
    let needle = "mirrors another replication set; refusing to ship to it";
    wait_log("the second mount", || m2.log(), needle);
    let st = wait_status_error(&m2, needle);
    assert_ne!(st["state"], "in-sync", "{st:#}");
    assert_mount_works(&m2, "second-still-served");

    // The first keeps replicating.
    for i in 0..20 {
        fs::write(m1.mnt.join(format!("more-{i}")), pattern(i, 30_000)).unwrap();
    }
    fs::create_dir(m1.mnt.join("sub")).unwrap();
    fs::write(m1.mnt.join("sub/x"), b"x").unwrap();
    sync_mount(&m1);
    wait_converged(&m1.journal, &m1.backing, &[&t.dir], CONVERGE);
    assert!(!t.dir.join("from-the-second").exists());
    let st = status(&m1.journal);
    assert_eq!(st["targets"][0]["state"], "in-sync", "{st:#}");
}

// ---------------------------------------------------------------------------------------------
// 6. Symlinks in the target directory pointing outside

#[test]
fn symlinks_in_the_target_dir_to_outside_files_and_dirs_are_replaced_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), b"untouched").unwrap();
    fs::create_dir(outside.path().join("sub")).unwrap();
    let outside_before = listing(outside.path());
    let t = TargetProc::start(&[]);
    std::os::unix::fs::symlink(outside.path().join("keep"), t.dir.join("file")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("sub"), t.dir.join("dir")).unwrap();
    std::os::unix::fs::symlink(outside.path(), t.dir.join("later")).unwrap();
    let m = mount_with_target(&t.url(), &[]);
    fs::write(m.mnt.join("file"), b"replicated").unwrap();
    fs::create_dir(m.mnt.join("dir")).unwrap();
    fs::write(m.mnt.join("dir/keep"), b"replicated").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    // After the initial sync: names that the target had as symlinks are written as they are.
    fs::write(m.mnt.join("later"), b"replicated").unwrap();
    fs::write(m.mnt.join("file"), b"rewritten").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"untouched");
    assert_eq!(listing(outside.path()), outside_before, "something was written outside --dir");
    assert!(!fs::symlink_metadata(t.dir.join("file")).unwrap().file_type().is_symlink());
    assert!(tree_diff(&m.backing, &t.dir).is_empty());
}

/// A target in sync with a mount; then symlinks to a file and a directory outside are planted
/// in the target's directory (by hand, behind the target's back) under names the primary
/// creates next: a file with data, a directory with files.
fn planted_symlinks() -> (TargetProc, Mount, tempfile::TempDir) {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), b"untouched").unwrap();
    let t = TargetProc::start(&[]);
    let m = mount_with_target(&t.url(), &[]);
    fs::write(m.mnt.join("x"), b"x").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    std::os::unix::fs::symlink(outside.path().join("keep"), t.dir.join("planted")).unwrap();
    std::os::unix::fs::symlink(outside.path(), t.dir.join("planted-dir")).unwrap();
    fs::write(m.mnt.join("planted"), b"replicated").unwrap();
    fs::create_dir(m.mnt.join("planted-dir")).unwrap();
    fs::write(m.mnt.join("planted-dir/keep"), b"replicated").unwrap();
    fs::write(m.mnt.join("planted-dir/new"), b"replicated").unwrap();
    sync_mount(&m);
    (t, m, outside)
}

#[test]
fn symlinks_planted_in_the_target_dir_are_never_followed() {
    let (t, m, outside) = planted_symlinks();
    // Until the target has gone past every record of the writes above (in sync, nothing
    // left to send), then a little longer for the apply thread.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let st = status(&m.journal);
        let tgt = &st["targets"][0];
        if tgt["state"] == "in-sync" && tgt["lag_records"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the target never caught up: {st:#}");
        sleep(Duration::from_millis(200));
    }
    sleep(Duration::from_secs(3));
    assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"untouched");
    assert_eq!(listing(outside.path()), BTreeSet::from(["keep".to_string()]), "written through a symlink");
    // The primary's own mount is unaffected.
    assert_mount_works(&m, "still-served");
    assert_eq!(fs::read(m.mnt.join("planted")).unwrap(), b"replicated");
    drop(t);
}

#[test]
fn a_symlink_planted_in_the_target_dir_is_reported_naming_it() {
    let (t, m, outside) = planted_symlinks();
    // Issue 3: "a symlink in the target dir pointing outside — refused with its message".
    wait_log("the target", || t.log(), "planted");
    assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"untouched");
    drop(m);
}
