//! Bad input to `ferryfs failover` and `ferryfs failback`: a clear message naming what is
//! wrong, a non-zero exit, nothing changed (issue 4; README "Bad input never loses data").

mod common;

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::node::NodeProc;
use common::target::{TargetProc, status, wait_converged};
use common::{Mount, ferryfs};

fn run(args: &[&str]) -> (bool, String) {
    let out = ferryfs().args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn key_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A primary with a sync bunker process and a target, some data shipped to both, then the
/// primary stopped cleanly. Returns them (the primary stopped).
fn pair(key: Option<&str>) -> (tempfile::TempDir, Mount, NodeProc, TargetProc) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let mut extra: Vec<&str> = Vec::new();
    if let Some(k) = key {
        extra.extend(["--key", k]);
    }
    let bdir = base.join("bunker");
    fs::create_dir(&bdir).unwrap();
    let mut bargs: Vec<std::ffi::OsString> = vec!["bunker".into(), "--dir".into(), bdir.into()];
    bargs.extend(extra.iter().map(Into::into));
    let bunker = NodeProc::start(base.join("bunker.log"), bargs);
    let target = TargetProc::start(&extra);
    let (turl, burl) = (target.url(), bunker.url());
    let mut args = vec!["--target", &turl, "--bunker", &burl];
    args.extend(&extra);
    let mut m = Mount::start_with(&args);
    fs::write(m.mnt.join("a"), b"data").unwrap();
    fs::File::open(m.mnt.join("a")).unwrap().sync_all().unwrap();
    wait_converged(&m.journal, &m.backing, &[&target.dir], Duration::from_secs(60));
    assert!(m.stop().success());
    (tmp, m, bunker, target)
}

/// The target's log position and epoch, from a dry run (which changes nothing).
fn target_view(bunker: &str, target: &str, extra: &[&str]) -> String {
    let mut args = vec!["failover", "--bunker", bunker, "--target", target, "--dry-run"];
    args.extend(extra);
    let (ok, text) = run(&args);
    assert!(ok, "dry run failed: {text}");
    text.lines().filter(|l| l.starts_with("target ") || l.starts_with("bunker ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn malformed_urls_and_missing_peers_are_refused_naming_the_flag() {
    for (args, names) in [
        (vec!["failover", "--bunker", "nonsense://x", "--target", "tcp://127.0.0.1:9"], "--bunker"),
        (vec!["failover", "--bunker", "tcp://127.0.0.1:9", "--target", "/some/dir"], "--target"),
        (vec!["failover", "--bunker", "tcp://127.0.0.1:9", "--target", "tcp://no-such-host.invalid:1"], "--target"),
        (vec!["failover", "--bunker", "tcp://127.0.0.1:1", "--target", "tcp://127.0.0.1:1"], "bunker"),
        (vec!["failover", "--bunker", "/nonexistent-bunker-dir", "--target", "tcp://127.0.0.1:1"], "--bunker"),
    ] {
        let (ok, text) = run(&args);
        assert!(!ok, "{args:?} succeeded: {text}");
        assert!(text.contains(names), "{args:?}: the message does not name {names}: {text}");
    }
}

#[test]
fn peers_of_different_sets_a_wrong_key_and_swapped_roles_change_nothing() {
    let (_t1, _m1, bunker1, target1) = pair(None);
    let (_t2, _m2, bunker2, target2) = pair(None);
    let before1 = target_view(&bunker1.url(), &target1.url(), &[]);
    let before2 = target_view(&bunker2.url(), &target2.url(), &[]);

    let (ok, text) = run(&["failover", "--bunker", &bunker1.url(), "--target", &target2.url()]);
    assert!(!ok && text.contains("different replication sets"), "{text}");
    // Roles swapped: a target given as the bunker, a bunker as the target.
    let (ok, text) = run(&["failover", "--bunker", &target1.url(), "--target", &target1.url()]);
    assert!(!ok && text.contains("not a bunker"), "{text}");
    let (ok, text) = run(&["failover", "--bunker", &bunker1.url(), "--target", &bunker1.url()]);
    assert!(!ok && text.contains("not a mirror target"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "k", "a key that nobody else has, 32 b\n");
    let (ok, text) = run(&["failover", "--bunker", &bunker1.url(), "--target", &target1.url(), "--key", &k]);
    assert!(!ok && text.contains("key"), "{text}");

    assert_eq!(target_view(&bunker1.url(), &target1.url(), &[]), before1, "set 1 changed");
    assert_eq!(target_view(&bunker2.url(), &target2.url(), &[]), before2, "set 2 changed");
    // And the real failover of set 1 still works, at epoch 1 (nothing above fenced it).
    let (ok, text) = run(&["failover", "--bunker", &bunker1.url(), "--target", &target1.url()]);
    assert!(ok && text.contains("at epoch 1"), "{text}");
}

#[test]
fn failover_with_a_live_primary_is_refused_without_force() {
    let (_t, mut m, bunker, target) = pair(None);
    m.restart();
    // Wait until both hear the primary.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&m.journal)["bunker"]["state"] != "in-sync" {
        assert!(Instant::now() < deadline, "bunker link not up");
        sleep(Duration::from_millis(100));
    }
    let (ok, text) = run(&["failover", "--bunker", &bunker.url(), "--target", &target.url()]);
    assert!(!ok && text.contains("live primary") && text.contains("--force"), "{text}");
    fs::write(m.mnt.join("b"), b"still shipping").unwrap();
    fs::File::open(m.mnt.join("b")).unwrap().sync_all().unwrap();
    wait_converged(&m.journal, &m.backing, &[&target.dir], Duration::from_secs(60));
}

#[test]
fn failback_refuses_bad_directories_and_creates_nothing() {
    let m = Mount::start();
    let j = m.journal.display().to_string();
    let b = m.backing.display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    fs::create_dir(&state).unwrap();
    let s = state.display().to_string();
    let failback =
        |j: &str, s: &str| run(&["failback", "--journal", j, "--backing", &b, "--state", s, "--listen", "127.0.0.1:0"]);
    // Mounted: its journal is locked.
    let (ok, text) = failback(&j, &s);
    assert!(!ok && (text.contains("lock") || text.contains("in use")), "{text}");
    // Overlapping state and backing.
    let inside = m.backing.join("st");
    let (ok, text) = failback(&j, &inside.display().to_string());
    assert!(!ok && text.contains("--state"), "{text}");
    // Not a journal.
    let (ok, text) = failback(&s, &s);
    assert!(!ok, "{text}");
    let (ok, text) = failback(&j, "/nonexistent-state");
    assert!(!ok && text.contains("--state"), "{text}");
    assert!(fs::read_dir(&state).unwrap().next().is_none(), "something was created in --state");
    assert!(!inside.exists());
}

#[test]
fn a_target_left_mixed_by_a_resync_is_not_promoted_without_allow_mixed() {
    let (_t, _m, bunker, mut target) = pair(None);
    // The state a resync whose read ended at LSN 1,000,000 leaves (docs/FORMAT.md): the
    // bunker cannot bring the target's log that far.
    target.stop();
    fs::write(target.state.join("resync-mixed-until"), b"1000000\n").unwrap();
    target.restart();
    let (ok, text) = run(&["failover", "--bunker", &bunker.url(), "--target", &target.url(), "--dry-run"]);
    assert!(!ok && text.contains("--allow-mixed"), "a dry run did not say it would refuse: {text}");
    let before = target_view(&bunker.url(), &target.url(), &["--allow-mixed"]);
    assert!(before.contains("directory mixed by a resync until LSN 1000000"), "{before}");
    let (ok, text) = run(&["failover", "--bunker", &bunker.url(), "--target", &target.url()]);
    assert!(!ok, "a mixed directory was promoted: {text}");
    assert!(
        text.contains("--allow-mixed") && text.contains("LSN 1000000") && text.contains("Nothing was changed"),
        "{text}"
    );
    assert_eq!(target_view(&bunker.url(), &target.url(), &["--allow-mixed"]), before, "the refusal changed something");
    // The operator's override: promoted, and the record of the mix is gone with it.
    let (ok, text) = run(&["failover", "--bunker", &bunker.url(), "--target", &target.url(), "--allow-mixed"]);
    assert!(ok && text.contains("failover complete"), "{text}");
    assert!(!target.state.join("resync-mixed-until").exists());
}
