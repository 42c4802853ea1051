//! Several targets and `ferryfs catchup` end to end, with real processes on loopback (issue 6,
//! "Tests"): a primary with three targets — one direct, one behind the fault-injecting proxy
//! with delay so it lags, one cut for a while — a workload of numbered fsynced records, kill -9
//! of the primary, then `ferryfs catchup`.

mod common;

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::target::{TargetProc, status, tree_diff};
use common::workload::{Workload, check_prefix};
use common::{Mount, ferryfs};

fn catchup(urls: &[String], extra: &[&str]) -> (i32, String) {
    let mut cmd = ferryfs();
    cmd.arg("catchup");
    for u in urls {
        cmd.args(["--target", u]);
    }
    let out = cmd.args(extra).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

/// The number after `key` in `text` (e.g. "every record below LSN ").
fn number_after(text: &str, key: &str) -> u64 {
    let at = text.find(key).unwrap_or_else(|| panic!("no `{key}` in:\n{text}"));
    text[at + key.len()..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// "URL: received N records (…, B bytes)" → B, or 0 when the URL received nothing.
fn bytes_received(text: &str, url: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{url}: received "))).unwrap_or("");
    match line.find(" bytes)") {
        Some(end) => line[..end].rsplit(' ').next().unwrap().parse().unwrap(),
        None => 0,
    }
}

#[test]
fn catchup_levels_three_targets_at_the_most_advanced_ones_end_after_the_primary_dies() {
    let (t1, t2, t3) = (TargetProc::start(&[]), TargetProc::start(&[]), TargetProc::start(&[]));
    let (p2, p3) = (FaultProxy::start(t2.addr), FaultProxy::start(t3.addr));
    p2.set_delay(Duration::from_millis(40));
    let urls = vec![t1.url(), p2.url(), p3.url()];
    let mut m = Mount::start_with(&["--target", &urls[0], "--target", &urls[1], "--target", &urls[2]]);
    let w = Workload::start(&m.mnt);
    wait_for("200 records", || w.acked() >= 200);
    p3.cut();
    wait_for("700 records", || w.acked() >= 700);
    p3.heal();
    wait_for("1000 records", || w.acked() >= 1000);
    // Every target acked at least the watermark; the primary dies a moment later.
    let st = status(&m.journal);
    let all_acked = st["targets"].as_array().unwrap().iter().map(|t| t["acked_lsn"].as_u64().unwrap()).min().unwrap();
    m.kill9();
    let acked = w.join();
    assert!(acked >= 1000);

    let before: Vec<u64> = [&p2, &p3].iter().map(|p| p.bytes_to_upstream()).collect();
    let (code, text) = catchup(&urls, &[]);
    assert_eq!(code, 0, "catchup failed:\n{text}");
    let end = number_after(&text, "every record below LSN ");
    // The delayed target had records in flight when the primary died: it is the one caught up.
    assert!(text.contains(&format!("{}: received ", urls[1])), "the lagging target received nothing:\n{text}");
    assert!(end > all_acked, "caught up below LSN {end}, but every target had acked LSN {all_acked}:\n{text}");
    // The three directories are identical, and each is the workload's stream applied in order
    // up to one point (no hole, no reordering).
    let dirs: Vec<&Path> = vec![&t1.dir, &t2.dir, &t3.dir];
    for d in &dirs[1..] {
        let diff = tree_diff(dirs[0], d);
        assert!(diff.is_empty(), "{} and {} differ after catchup: {diff:?}\n{text}", dirs[0].display(), d.display());
    }
    let present = check_prefix(dirs[0], 0);
    assert!(present > 0);
    // Only the missing records moved: what went through each proxy stays within 1.1 x the
    // record bytes the tool moved to it, plus framing (frame headers, acks, the handshake).
    for (i, p) in [&p2, &p3].iter().enumerate() {
        let sent = p.bytes_to_upstream() - before[i];
        let records = bytes_received(&text, &urls[i + 1]);
        let bound = records as f64 * 1.1 + 64.0 * 1024.0;
        assert!((sent as f64) <= bound, "{} got {sent} bytes for {records} bytes of records:\n{text}", urls[i + 1]);
    }

    // Twice is harmless: every target is level, nothing moves, nothing changes.
    let (code, again) = catchup(&urls, &[]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(number_after(&again, "every record below LSN "), end, "{again}");
    assert!(!again.contains(": received "), "records moved a second time:\n{again}");
    for d in &dirs[1..] {
        assert!(tree_diff(dirs[0], d).is_empty());
    }
}

#[test]
fn catchup_refuses_targets_of_two_sets_and_a_wrong_key_and_changes_nothing() {
    let (a, b) = (TargetProc::start(&[]), TargetProc::start(&[]));
    let ma = Mount::start_with(&["--target", &a.url()]);
    let mb = Mount::start_with(&["--target", &b.url()]);
    for (m, t) in [(&ma, &a), (&mb, &b)] {
        std::fs::write(m.mnt.join("x"), b"data").unwrap();
        std::fs::File::open(m.mnt.join("x")).unwrap().sync_all().unwrap();
        common::target::wait_converged(&m.journal, &m.backing, &[&t.dir], Duration::from_secs(60));
    }
    drop((ma, mb));
    let (code, text) = catchup(&[a.url(), b.url()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("different replication sets") && text.contains("nothing was changed"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "a key that nobody else has, 32 b\n").unwrap();
    let (code, text) = catchup(&[a.url(), b.url()], &["--key", key.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("key"), "{text}");
    let (code, text) = catchup(&[a.url()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("at least two targets"), "{text}");
    let (code, text) = catchup(&[a.url(), a.url()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("given twice"), "{text}");
    assert_eq!(std::fs::read(a.dir.join("x")).unwrap(), b"data");
    assert_eq!(std::fs::read(b.dir.join("x")).unwrap(), b"data");
}

#[test]
fn catchup_refuses_a_peer_that_serves_garbage_and_changes_nothing() {
    let a = TargetProc::start(&[]);
    let m = Mount::start_with(&["--target", &a.url()]);
    std::fs::write(m.mnt.join("x"), b"data").unwrap();
    std::fs::File::open(m.mnt.join("x")).unwrap().sync_all().unwrap();
    common::target::wait_converged(&m.journal, &m.backing, &[&a.dir], Duration::from_secs(60));
    drop(m);
    // A "target" that answers every connection with bytes that are no hello.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = format!("tcp://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            use std::io::Write;
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nthis is not ferryfs at all, not even close");
        }
    });
    let before = std::fs::read(a.dir.join("x")).unwrap();
    let (code, text) = catchup(&[a.url(), garbage.clone()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&garbage), "the message does not name the bad peer:\n{text}");
    assert_eq!(std::fs::read(a.dir.join("x")).unwrap(), before);
    assert!(!a.log().contains("caught up"), "the good target applied something:\n{}", a.log());
}

#[test]
fn catchup_refuses_targets_of_two_epochs_and_changes_nothing() {
    // One set, a bunker and two targets; the primary stops; a failover promotes the first
    // target alone (epoch 1): the second stays at epoch 0, its history may differ from there.
    let base = tempfile::tempdir().unwrap();
    let bdir = base.path().join("bunker");
    std::fs::create_dir(&bdir).unwrap();
    let bunker = common::node::NodeProc::start(
        base.path().join("bunker.log"),
        vec!["bunker".into(), "--dir".into(), bdir.into_os_string()],
    );
    let (a, b) = (TargetProc::start(&[]), TargetProc::start(&[]));
    let mut m = Mount::start_with(&["--target", &a.url(), "--target", &b.url(), "--bunker", &bunker.url()]);
    std::fs::write(m.mnt.join("x"), b"data").unwrap();
    std::fs::File::open(m.mnt.join("x")).unwrap().sync_all().unwrap();
    common::target::wait_converged(&m.journal, &m.backing, &[&a.dir, &b.dir], Duration::from_secs(60));
    assert!(m.stop().success());
    let out = ferryfs().args(["failover", "--bunker", &bunker.url(), "--target", &a.url()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = std::fs::read(b.dir.join("x")).unwrap();
    let (code, text) = catchup(&[a.url(), b.url()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("epoch") && text.contains("Nothing was changed"), "{text}");
    assert_eq!(std::fs::read(b.dir.join("x")).unwrap(), before);
    assert!(!b.log().contains("caught up"), "{}", b.log());
}

/// Bytes of `len` that differ per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i as u64 / 7) % 251) as u8).collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Issue 6 point 3: a target behind the start of the most advanced target's log (cut past
/// --target-timeout while the other's log moved on) gets a block-level resync of only the
/// blocks that differ, after the primary's loss; the directories end identical.
#[test]
fn catchup_gives_a_target_behind_every_log_a_block_level_resync_of_only_the_differing_blocks() {
    let t1 = TargetProc::start(&["--log-size", "256M"]);
    let t2 = TargetProc::start(&[]);
    let p2 = FaultProxy::start(t2.addr);
    let urls = vec![t1.url(), p2.url()];
    let mut m = Mount::start_with(&[
        "--target",
        &urls[0],
        "--target",
        &urls[1],
        "--target-timeout",
        "2s",
        "--journal-size",
        "128M",
        "--segment-size",
        "16M",
    ]);
    // What both hold: a 16 MiB file, a directory of small files, a file to be removed.
    std::fs::create_dir(m.mnt.join("dir")).unwrap();
    write_synced(&m.mnt.join("big"), &pattern(1, 16 << 20));
    for i in 0..20 {
        write_synced(&m.mnt.join(format!("dir/small{i}")), &pattern(10 + i, 3000));
    }
    write_synced(&m.mnt.join("doomed"), &pattern(2, 100_000));
    common::target::wait_converged(&m.journal, &m.backing, &[&t1.dir, &t2.dir], Duration::from_secs(60));
    let cut_at = status(&m.journal)["targets"][1]["acked_lsn"].as_u64().unwrap();
    p2.cut();
    // While it is cut: one block of big changes, the directory is renamed, a file removed,
    // and 48 MiB of new files go by, so the first target's log frees what the cut one lacks.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(m.mnt.join("big")).unwrap();
        f.write_all_at(&pattern(3, 4096), 5 << 20).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::rename(m.mnt.join("dir"), m.mnt.join("renamed")).unwrap();
    std::fs::remove_file(m.mnt.join("doomed")).unwrap();
    for i in 0..48u64 {
        write_synced(&m.mnt.join(format!("new{}", i % 8)), &pattern(100 + i, 1 << 20));
    }
    wait_for("the first target's log to start past the cut", || {
        let st = status(&m.journal);
        st["targets"][1]["timed_out"] == true && st["targets"][0]["log_start_lsn"].as_u64().unwrap_or(0) > cut_at + 1
    });
    m.kill9();
    p2.heal();

    let before = p2.bytes_to_upstream();
    let (code, text) = catchup(&urls, &[]);
    assert_eq!(code, 0, "catchup failed:\n{text}");
    assert!(text.contains(&format!("{}: block-level resync from {}", urls[1], urls[0])), "{text}");
    let diff = tree_diff(&t1.dir, &t2.dir);
    assert!(diff.is_empty(), "the directories differ after the block-level resync: {diff:?}\n{text}");
    assert_eq!(std::fs::read(t2.dir.join("big")).unwrap().len(), 16 << 20);
    assert!(!t2.dir.join("doomed").exists() && t2.dir.join("renamed/small3").exists());
    // Only the differing blocks moved: the 8 new files (8 MiB) and one 64 KiB block of big,
    // not big's other 16 MiB; the namespace and attributes are a few KiB more.
    let line = text.lines().find(|l| l.contains("block-level resync from")).unwrap();
    let data = number_after(line, "pieces (");
    assert_eq!(data, 8 * (1 << 20) + (64 << 10), "{line}");
    let sent = p2.bytes_to_upstream() - before;
    assert!((sent as f64) <= data as f64 * 1.1 + 256.0 * 1024.0, "{sent} bytes went to the target behind:\n{text}");

    // Twice is harmless: both are level, nothing moves.
    let (code, again) = catchup(&urls, &[]);
    assert_eq!(code, 0, "{again}");
    assert!(!again.contains("block-level resync from"), "{again}");
    assert!(tree_diff(&t1.dir, &t2.dir).is_empty());
}
