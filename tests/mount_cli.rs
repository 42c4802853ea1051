//! `ferryfs mount` as an operator meets it: how it stops, and what it refuses.

mod common;

use std::process::Command;

use common::{Mount, ferryfs};

fn journal_is_clean(m: &Mount) -> bool {
    let out = m.inspect(&["--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let sb: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    sb["clean"] == true
}

#[test]
fn sigint_unmounts_cleanly_and_closes_the_journal() {
    let mut m = Mount::start();
    common::write(m.mnt.join("f"), b"data");
    let st = m.signal_and_wait(libc::SIGINT).expect("exits on SIGINT");
    assert!(st.success(), "{st}: {}", m.log());
    assert!(!m.is_mounted());
    assert!(journal_is_clean(&m), "{}", m.log());
    assert_eq!(std::fs::read(m.backing.join("f")).unwrap(), b"data");
}

#[test]
fn sigterm_unmounts_cleanly_and_closes_the_journal() {
    let mut m = Mount::start();
    common::write(m.mnt.join("f"), b"data");
    let st = m.signal_and_wait(libc::SIGTERM).expect("exits on SIGTERM");
    assert!(st.success(), "{st}: {}", m.log());
    assert!(journal_is_clean(&m));
}

#[test]
fn an_external_umount_ends_the_daemon_cleanly() {
    let mut m = Mount::start();
    common::write(m.mnt.join("f"), b"data");
    let out = Command::new("umount").arg(&m.mnt).output().unwrap();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    let st = m.signal_and_wait(0).expect("exits after umount");
    assert!(st.success(), "{st}: {}", m.log());
    assert!(journal_is_clean(&m), "{}", m.log());
}

fn refused(args: &[&std::ffi::OsStr], needle: &str) {
    let out = ferryfs().arg("mount").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mount accepted {args:?}");
    assert!(text.contains(needle), "message lacks `{needle}`: {text}");
}

#[test]
fn a_missing_directory_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let (mnt, b, j) = (t.path().join("m"), t.path().join("b"), t.path().join("j"));
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&j).unwrap();
    refused(&[mnt.as_os_str(), "--backing".as_ref(), b.as_os_str(), "--journal".as_ref(), j.as_os_str()], "--backing");
    std::fs::create_dir(&b).unwrap();
    std::fs::remove_dir(&j).unwrap();
    refused(&[mnt.as_os_str(), "--backing".as_ref(), b.as_os_str(), "--journal".as_ref(), j.as_os_str()], "--journal");
    assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0, "nothing was created in the backing directory");
}

#[test]
fn a_busy_mountpoint_is_refused() {
    let m = Mount::start();
    let t = tempfile::tempdir().unwrap();
    let (b, j) = (t.path().join("b"), t.path().join("j"));
    std::fs::create_dir(&b).unwrap();
    std::fs::create_dir(&j).unwrap();
    refused(&[m.mnt.as_os_str(), "--backing".as_ref(), b.as_os_str(), "--journal".as_ref(), j.as_os_str()], "busy");
}

#[test]
fn a_journal_in_use_is_refused() {
    let m = Mount::start();
    let t = tempfile::tempdir().unwrap();
    let mnt2 = t.path().join("m2");
    std::fs::create_dir(&mnt2).unwrap();
    refused(
        &[mnt2.as_os_str(), "--backing".as_ref(), m.backing.as_os_str(), "--journal".as_ref(), m.journal.as_os_str()],
        "in use",
    );
}

#[test]
fn a_journal_of_another_backing_directory_is_refused() {
    let mut m = Mount::start();
    assert!(m.stop().success());
    let t = tempfile::tempdir().unwrap();
    let other = t.path().join("other");
    std::fs::create_dir(&other).unwrap();
    refused(
        &[m.mnt.as_os_str(), "--backing".as_ref(), other.as_os_str(), "--journal".as_ref(), m.journal.as_os_str()],
        "belongs to backing directory",
    );
}

/// With the kernel's writeback cache (the default) an un-synced write may sit in the kernel's
/// page cache, not in ferryfs, until something flushes it; the committer syncs the mount
/// before each commit so it reaches the journal within the interval. On this kernel FUSE's
/// strict dirty limits usually start writeback sooner anyway, so this checks the behaviour,
/// not that the committer's syncfs is what caused it. (That the journal flush then makes the
/// write durable is tested in passthrough::background.)
#[test]
fn un_synced_writes_of_a_file_kept_open_reach_the_journal_within_the_commit_interval() {
    let m = Mount::start_with(&["--commit-interval", "300ms"]);
    // Kept open: closing would flush the kernel's cache by itself (FUSE flushes on close).
    let mut f = common::open_rw(m.mnt.join("f"));
    std::io::Write::write_all(&mut f, b"0123456789abcdef-not-fsynced").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let out = m.inspect(&[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.lines().any(|l| l.contains("kind=write") && l.contains("len=28")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the write never reached the journal:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(f);
}

#[test]
fn help_documents_every_subcommand() {
    for sub in ["mount", "replay", "inspect"] {
        let out = ferryfs().arg(sub).arg("--help").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.len() > 400, "{sub} --help is thin:\n{text}");
    }
}

/// Run as root, the mount is shared (allow_other) with the kernel's permission checks;
/// `--private` keeps every other user out.
#[test]
fn private_keeps_other_users_out_while_the_default_lets_them_in() {
    if !common::is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let stat_as_nobody = |m: &Mount| {
        let path = common::cpath(&m.mnt);
        common::as_user(65534, 65534, || {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::stat(path.as_ptr(), &mut st) } == 0 { 0 } else { common::errno() }
        })
    };
    let shared = Mount::start();
    assert_eq!(stat_as_nobody(&shared), 0, "another user can use the shared mount");
    let private = Mount::start_with(&["--private"]);
    assert_eq!(stat_as_nobody(&private), libc::EACCES, "another user is kept out of a --private mount");
}

/// ferryfs keeps its applied marker as an xattr of the backing root; through the mount it
/// can be neither seen nor touched.
#[test]
fn the_applied_marker_is_invisible_and_untouchable_through_the_mount() {
    if !common::is_root() {
        eprintln!("skipped: trusted.* xattrs need root");
        return;
    }
    let m = Mount::start();
    std::fs::create_dir(m.mnt.join("d")).unwrap(); // a namespace op: the marker is set
    let name = c"trusted.ferryfs.applied";
    let backing = common::cpath(&m.backing);
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe { libc::getxattr(backing.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, 24, "the backing root carries the marker");
    let mnt = common::cpath(&m.mnt);
    // SAFETY: as above.
    let n = unsafe { libc::getxattr(mnt.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!((n, common::errno()), (-1, libc::ENODATA));
    let mut list = [0u8; 4096];
    // SAFETY: as above.
    let n = unsafe { libc::listxattr(mnt.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n >= 0);
    assert!(!list[..n as usize].windows(23).any(|w| w == b"trusted.ferryfs.applied"));
    // SAFETY: as above.
    let r = unsafe { libc::setxattr(mnt.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
    assert_eq!((r, common::errno()), (-1, libc::EPERM));
    // SAFETY: as above.
    let r = unsafe { libc::removexattr(mnt.as_ptr(), name.as_ptr()) };
    assert_eq!((r, common::errno()), (-1, libc::EPERM));
}
