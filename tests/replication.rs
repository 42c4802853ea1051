//! Replication end to end, with real processes on loopback: a mount with `--target`s, `ferryfs
//! target` processes, and a fault-injecting proxy between them (issue 3, "Tests").

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::target::{TargetProc, status, tree_diff, wait_converged};
use common::{Mount, cpath, pattern};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONVERGE: Duration = Duration::from_secs(90);

fn seed() -> u64 {
    std::env::var("FERRYFS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// Flushes the kernel's writeback cache into the journal (as the committer would within
/// --commit-interval) so a test need not wait for it.
fn sync_mount(m: &Mount) {
    let f = fs::File::open(&m.mnt).unwrap();
    // SAFETY: a valid fd.
    unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let (c, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings and buffer.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr() as *const _, value.len(), 0) };
    assert_eq!(r, 0, "setxattr {}: {}", p.display(), std::io::Error::last_os_error());
}

/// A seeded random workload over the mount: writes, truncates, renames (files and
/// directories), hard links, symlinks, xattrs, chmod/chown, mkdir/rmdir, and unlink of files
/// still open and written afterwards.
fn random_workload(root: &Path, seed: u64, steps: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut files: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut n = 0;
    let mut name = |rng: &mut ChaCha8Rng, dirs: &Vec<PathBuf>| {
        n += 1;
        dirs[rng.gen_range(0..dirs.len())].join(format!("n{n}"))
    };
    for _ in 0..steps {
        match rng.gen_range(0..100) {
            0..=24 => {
                let p = name(&mut rng, &dirs);
                let len = rng.gen_range(0..200_000);
                fs::write(&p, pattern(rng.r#gen(), len)).unwrap();
                files.push(p);
            }
            25..=44 if !files.is_empty() => {
                let p = &files[rng.gen_range(0..files.len())];
                let f = OpenOptions::new().write(true).open(p).unwrap();
                let off = rng.gen_range(0..300_000u64);
                f.write_all_at(&pattern(rng.r#gen(), rng.gen_range(1..50_000)), off).unwrap();
            }
            45..=49 if !files.is_empty() => {
                let p = &files[rng.gen_range(0..files.len())];
                OpenOptions::new().write(true).open(p).unwrap().set_len(rng.gen_range(0..100_000)).unwrap();
            }
            50..=57 if !files.is_empty() => {
                let i = rng.gen_range(0..files.len());
                let to = name(&mut rng, &dirs);
                fs::rename(&files[i], &to).unwrap();
                files[i] = to;
            }
            58..=61 if !files.is_empty() => {
                let to = name(&mut rng, &dirs);
                fs::hard_link(&files[rng.gen_range(0..files.len())], &to).unwrap();
                files.push(to);
            }
            62..=65 => {
                let to = name(&mut rng, &dirs);
                std::os::unix::fs::symlink(format!("target-{}", rng.gen_range(0..100)), &to).unwrap();
            }
            66..=71 if !files.is_empty() => {
                let p = &files[rng.gen_range(0..files.len())];
                setxattr(p, &format!("user.k{}", rng.gen_range(0..4)), &pattern(rng.r#gen(), rng.gen_range(0..300)));
            }
            72..=76 if !files.is_empty() => {
                let p = &files[rng.gen_range(0..files.len())];
                fs::set_permissions(p, fs::Permissions::from_mode(rng.gen_range(0o400..0o777))).unwrap();
                let c = cpath(p);
                // SAFETY: a valid path.
                unsafe { libc::lchown(c.as_ptr(), rng.gen_range(0..3), rng.gen_range(0..3)) };
            }
            77..=83 => {
                let d = name(&mut rng, &dirs);
                fs::create_dir(&d).unwrap();
                dirs.push(d);
            }
            84..=87 if dirs.len() > 2 => {
                // Move a directory (not the root) under another one that is not inside it.
                let i = rng.gen_range(1..dirs.len());
                let to_parent = dirs[rng.gen_range(0..dirs.len())].clone();
                if to_parent.starts_with(&dirs[i]) {
                    continue;
                }
                let to = to_parent.join(format!("m{}", rng.r#gen::<u32>()));
                fs::rename(&dirs[i], &to).unwrap();
                let from = std::mem::replace(&mut dirs[i], to.clone());
                for p in files.iter_mut().chain(dirs.iter_mut()) {
                    if let Ok(rest) = p.strip_prefix(&from) {
                        *p = to.join(rest);
                    }
                }
            }
            88..=93 if !files.is_empty() => {
                // Unlink a file while it is open, then write to it: the data goes nowhere
                // visible, and nothing of it may appear at a target.
                let i = rng.gen_range(0..files.len());
                let p = files.swap_remove(i);
                let mut f = OpenOptions::new().write(true).open(&p).unwrap();
                fs::remove_file(&p).unwrap();
                f.seek(SeekFrom::Start(0)).unwrap();
                f.write_all(&pattern(rng.r#gen(), 10_000)).unwrap();
                files.retain(|q| q.exists());
            }
            94..=99 if dirs.len() > 1 => {
                let i = rng.gen_range(1..dirs.len());
                if fs::remove_dir(&dirs[i]).is_ok() {
                    dirs.swap_remove(i);
                }
            }
            _ => {}
        }
    }
}

fn mount_with(targets: &[String], extra: &[&str]) -> Mount {
    let mut args: Vec<String> = Vec::new();
    for t in targets {
        args.push("--target".into());
        args.push(t.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Mount::start_with(&refs)
}

#[test]
fn two_targets_equal_the_backing_directory_after_a_random_workload() {
    let seed = seed();
    eprintln!("FERRYFS_SEED={seed}");
    let (t1, t2) = (TargetProc::start(&[]), TargetProc::start(&[]));
    let m = mount_with(&[t1.url(), t2.url()], &[]);
    random_workload(&m.mnt, seed, 600);
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t1.dir, &t2.dir], CONVERGE);
}

#[test]
fn a_backing_directory_with_data_gets_a_full_initial_sync_while_writes_go_on() {
    let seed = seed();
    let mut m = Mount::start();
    random_workload(&m.mnt, seed, 300);
    let t = TargetProc::start(&[]);
    let url = t.url();
    m.restart_with(&["--target", &url]);
    // Writes go on during the initial sync.
    fs::create_dir(m.mnt.join("during")).unwrap();
    random_workload(&m.mnt.join("during"), seed ^ 1, 100);
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
}

#[test]
fn a_target_killed_mid_stream_converges_after_restart() {
    let mut t = TargetProc::start(&[]);
    let m = mount_with(&[t.url()], &[]);
    let mnt = m.mnt.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..300 {
            fs::write(mnt.join(format!("f{}", i % 50)), pattern(i, 20_000 + i as usize)).unwrap();
            sleep(Duration::from_millis(5));
        }
    });
    sleep(Duration::from_millis(600));
    t.kill9();
    sleep(Duration::from_millis(800));
    t.restart();
    writer.join().unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
}

#[test]
fn a_cut_with_a_primary_restart_resyncs_only_the_marked_blocks() {
    let t = TargetProc::start(&[]);
    let proxy = FaultProxy::start(t.addr);
    let mut m = mount_with(&[proxy.url()], &["--commit-interval", "1s"]);
    let big = m.mnt.join("big");
    fs::write(&big, pattern(7, 16 << 20)).unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);

    proxy.cut();
    // The shipper writes the map (with every ack so far) when it notices the cut, before it
    // shows `disconnected`; a kill before that would leave the map of the last 2 s timer, and
    // the restart would mark again every record since (found in a loaded CI run).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&m.journal)["targets"][0]["state"] != "disconnected" {
        assert!(Instant::now() < deadline, "the cut was not noticed");
        sleep(Duration::from_millis(20));
    }
    let f = OpenOptions::new().write(true).open(&big).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for _ in 0..200 {
        let block = rng.gen_range(0..4096u64);
        f.write_all_at(&pattern(rng.r#gen(), 4096), block * 4096).unwrap();
    }
    drop(f);
    sync_mount(&m);
    m.kill9();
    m.restart();
    let st = status(&m.journal);
    let dirty = st["targets"][0]["dirty_blocks"].as_u64().unwrap();
    assert!(dirty > 0 && dirty <= 200, "dirty blocks after the restart: {dirty}\n{st:#}");
    let before = proxy.bytes_to_upstream();
    proxy.heal();
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    let sent = proxy.bytes_to_upstream() - before;
    let bound = (dirty * 4096) as f64 * 1.1 + 64.0 * 1024.0;
    assert!(
        (sent as f64) <= bound,
        "the resync sent {sent} bytes for {dirty} dirty blocks (bound {bound}: 1.1 × dirty bytes + 64 KiB framing)"
    );
}

#[test]
fn a_stalled_target_falls_back_when_the_journal_overflows_and_converges_after() {
    let t = TargetProc::start(&[]);
    let proxy = FaultProxy::start(t.addr);
    let m = mount_with(&[proxy.url()], &["--journal-size", "1M", "--segment-size", "256K", "--commit-interval", "1s"]);
    fs::write(m.mnt.join("first"), b"before the stall").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    proxy.blackhole();
    let started = Instant::now();
    for i in 0..40 {
        let f = OpenOptions::new().create(true).write(true).truncate(true).open(m.mnt.join(format!("w{i}"))).unwrap();
        f.write_all_at(&pattern(i, 256 << 10), 0).unwrap();
        f.sync_all().unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "writers were held up by the stalled target: {:?}",
        started.elapsed()
    );
    let st = status(&m.journal);
    assert_ne!(st["targets"][0]["state"], "in-sync", "{st:#}");
    proxy.heal();
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
}

#[test]
fn the_status_table_and_json_show_journal_and_targets() {
    let t = TargetProc::start(&[]);
    let m = mount_with(&[t.url()], &[]);
    fs::write(m.mnt.join("x"), b"x").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    let st = status(&m.journal);
    for field in ["url", "state", "lag_records", "lag_bytes", "lag_seconds", "dirty_blocks", "bytes_sent", "last_error"]
    {
        assert!(st["targets"][0].get(field).is_some(), "status lacks {field}: {st:#}");
    }
    assert!(st["journal"]["size_bytes"].as_u64().unwrap() > 0);
    let out = common::ferryfs().arg("status").arg("--journal").arg(&m.journal).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&t.url()) && table.contains("in-sync"), "{table}");
}

#[test]
fn a_target_directory_with_a_symlink_pointing_outside_is_never_written_through() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), b"untouched").unwrap();
    let t = TargetProc::start(&[]);
    std::os::unix::fs::symlink(outside.path(), t.dir.join("evil")).unwrap();
    let m = mount_with(&[t.url()], &[]);
    fs::create_dir(m.mnt.join("evil")).unwrap();
    fs::write(m.mnt.join("evil/keep"), b"replicated").unwrap();
    fs::write(m.mnt.join("evil/new"), b"replicated").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"untouched");
    assert!(!outside.path().join("new").exists());
    assert!(tree_diff(&m.backing, &t.dir).is_empty());
}

#[test]
fn a_directory_target_is_applied_directly_and_survives_a_primary_restart() {
    let mirror = tempfile::tempdir().unwrap();
    let dir = mirror.path().canonicalize().unwrap();
    let url = dir.display().to_string();
    let mut m = mount_with(std::slice::from_ref(&url), &[]);
    random_workload(&m.mnt, seed(), 200);
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&dir], CONVERGE);
    m.kill9();
    m.restart();
    fs::write(m.mnt.join("after-restart"), b"x").unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&dir], CONVERGE);
}

#[test]
fn replay_by_hand_keeps_what_a_target_lacks_in_its_map() {
    let t = TargetProc::start(&[]);
    let proxy = FaultProxy::start(t.addr);
    let mut m = mount_with(&[proxy.url()], &[]);
    fs::write(m.mnt.join("before"), pattern(1, 100_000)).unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
    proxy.cut();
    fs::write(m.mnt.join("during-the-cut"), pattern(2, 300_000)).unwrap();
    let f = OpenOptions::new().write(true).open(m.mnt.join("before")).unwrap();
    f.write_all_at(&pattern(3, 5000), 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    sync_mount(&m);
    m.kill9();
    let out = m.replay(&[]);
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    m.restart();
    proxy.heal();
    wait_converged(&m.journal, &m.backing, &[&t.dir], CONVERGE);
}

/// Issue 6 point 2, "log bound": three healthy targets with 256 MiB logs (the stated bound:
/// twice the primary's 128 MiB journal, as `ferryfs target --help` asks for at least the
/// journal's size) take `FERRYFS_LOG_BOUND_MIB` (default 2048) MiB of writes. The all-acked
/// watermark keeps moving, so every target's log frees what all have: its start moves on, and
/// it never has to let records go for want of room (which it would say: "log is full").
/// Without the watermark's frees the first 256 MiB would fill it.
#[test]
fn three_healthy_targets_keep_their_logs_below_the_bound_while_2_gib_go_through() {
    let ts: Vec<TargetProc> = (0..3).map(|_| TargetProc::start(&["--log-size", "256M"])).collect();
    let urls: Vec<String> = ts.iter().map(|t| t.url()).collect();
    let m = mount_with(&urls, &["--journal-size", "128M", "--segment-size", "16M"]);
    let mib: u64 = std::env::var("FERRYFS_LOG_BOUND_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    for i in 0..mib {
        fs::write(m.mnt.join(format!("f{}", i % 16)), pattern(i, 1 << 20)).unwrap();
        if i % 16 == 15 {
            sync_mount(&m);
        }
    }
    sync_mount(&m);
    let dirs: Vec<&Path> = ts.iter().map(|t| t.dir.as_path()).collect();
    wait_converged(&m.journal, &m.backing, &dirs, CONVERGE);
    // The last watermark and each target's answer arrive within a few hundred ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = status(&m.journal);
        let targets = st["targets"].as_array().unwrap().clone();
        let next = st["journal"]["next_lsn"].as_u64().unwrap();
        let settled = targets
            .iter()
            .all(|t| t["watermark_lsn"].as_u64() == Some(next - 1) && t["log_next_lsn"].as_u64() == Some(next));
        if settled || Instant::now() > deadline {
            break st;
        }
        sleep(Duration::from_millis(100));
    };
    let next = st["journal"]["next_lsn"].as_u64().unwrap();
    for (t, proc_) in st["targets"].as_array().unwrap().iter().zip(&ts) {
        assert_eq!(t["watermark_lsn"].as_u64(), Some(next - 1), "{st:#}");
        assert_eq!(t["log_next_lsn"].as_u64(), Some(next), "{st:#}");
        let start = t["log_start_lsn"].as_u64().unwrap();
        assert!(start > 1, "the target's log never freed anything: {st:#}");
        assert!(!t["holds_watermark"].as_bool().unwrap(), "{st:#}");
        let log = proc_.log();
        assert!(!log.contains("log is full"), "a target's log overflowed: {log}");
    }
}

/// Issue 6 point 2: a target cut for longer than --target-timeout stops holding the all-acked
/// watermark back: the watermark moves on, the other target's log frees what it held for it,
/// and the cut target, healed, converges from its sync map (a resync, not the records).
#[test]
fn a_target_cut_past_the_target_timeout_stops_holding_the_watermark_and_resyncs_after() {
    let t1 = TargetProc::start(&["--log-size", "256M"]);
    let t2 = TargetProc::start(&[]);
    let p2 = FaultProxy::start(t2.addr);
    let m = mount_with(
        &[t1.url(), p2.url()],
        &["--target-timeout", "2s", "--journal-size", "128M", "--segment-size", "16M"],
    );
    fs::write(m.mnt.join("before"), pattern(1, 1 << 20)).unwrap();
    sync_mount(&m);
    wait_converged(&m.journal, &m.backing, &[&t1.dir, &t2.dir], CONVERGE);
    let cut_at = status(&m.journal)["targets"][1]["acked_lsn"].as_u64().unwrap();
    p2.cut();
    // Enough for the first target's log to fill a few segments past the cut.
    for i in 0..48u64 {
        fs::write(m.mnt.join(format!("during{}", i % 8)), pattern(100 + i, 1 << 20)).unwrap();
        if i % 8 == 7 {
            sync_mount(&m);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&m.journal);
        let (a, b) = (&st["targets"][0], &st["targets"][1]);
        let moved = a["log_start_lsn"].as_u64().unwrap_or(0) > cut_at + 1;
        if b["timed_out"] == true && st["targets"][0]["watermark_lsn"].as_u64().unwrap() > cut_at && moved {
            break st;
        }
        assert!(Instant::now() < deadline, "the cut target still holds the watermark back: {st:#}");
        sleep(Duration::from_millis(200));
    };
    assert!(render(&m).contains("TIMED OUT"), "{}", render(&m));
    assert_eq!(st["targets"][1]["state"], "disconnected", "{st:#}");
    let resync_before = st["targets"][1]["bytes_resync"].as_u64().unwrap();
    p2.heal();
    wait_converged(&m.journal, &m.backing, &[&t1.dir, &t2.dir], CONVERGE);
    let st = status(&m.journal);
    assert!(st["targets"][1]["bytes_resync"].as_u64().unwrap() > resync_before, "no resync after healing: {st:#}");
    assert_eq!(st["targets"][1]["timed_out"], false, "{st:#}");
}

/// `ferryfs status` of the mount, as text.
fn render(m: &Mount) -> String {
    let out = common::ferryfs().args(["status", "--journal"]).arg(&m.journal).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
