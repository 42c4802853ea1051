//! Bad input never loses data: every unreadable or mismatched journal is refused by
//! `ferryfs replay` with a message naming what is wrong, a non-zero exit, and the backing
//! directory unchanged. Journals are made with the library on real temp dirs, then damaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferryfs::format::ops::NodeKind;
use ferryfs::io::NewNode;
use ferryfs::journal::{JournalGeometry, recovery};
use ferryfs::os::storage::DirStorage;
use ferryfs::os::tree::OsTree;
use ferryfs::passthrough::{Core, CoreConfig, IdTable};
use ferryfs::types::FileId;

const SEGMENT: u64 = 256 << 10;

struct Setup {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    journal: PathBuf,
}

fn superblock_for(backing: &Path) -> ferryfs::format::superblock::Superblock {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(backing).unwrap();
    let path = backing.to_str().unwrap().as_bytes().to_vec();
    ferryfs::format::superblock::Superblock::new([7; 16], m.dev(), m.ino(), path, [0; 16])
}

/// A crashed journal (never closed) with `files` files of 3 writes each, all fsynced; the
/// backing directory is then emptied, so a replay would have to recreate everything.
fn crashed_journal(files: usize) -> Setup {
    crashed_journal_with(files, false)
}

/// As `crashed_journal`, optionally with a checkpoint after the workload (it writes `ids`).
fn crashed_journal_with(files: usize, checkpoint: bool) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("backing");
    let journal = tmp.path().join("journal");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&journal).unwrap();
    let storage = DirStorage::new(&journal);
    let geometry = JournalGeometry { segment_size: SEGMENT, segment_count: 4 };
    let opened = recovery::create(storage, geometry, superblock_for(&backing)).unwrap();
    let tree = OsTree::open(&backing).unwrap();
    let core =
        Core::new(opened.journal, tree, IdTable::from_snapshot(opened.ids.snapshot()), CoreConfig::default()).unwrap();
    for i in 0..files {
        let new = NewNode { kind: NodeKind::File, mode: 0o644, uid: 0, gid: 0, rdev: 0, target: b"" };
        let (id, _) = core.create(FileId::ROOT, format!("f{i}").as_bytes(), &new).unwrap();
        for k in 0..3u64 {
            core.write_via_tree(id, k * 1000, &vec![b'a' + (i % 26) as u8; 1000]).unwrap();
        }
    }
    core.sync().unwrap();
    if checkpoint {
        core.checkpoint().unwrap();
    }
    drop(core);
    // The backing directory loses everything since the journal's start, as a machine crash
    // that kept none of it would leave it: the files and the applied marker on its root.
    for e in std::fs::read_dir(&backing).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let root = std::ffi::CString::new(backing.to_str().unwrap()).unwrap();
    // SAFETY: both strings are NUL-terminated and outlive the call.
    unsafe { libc::removexattr(root.as_ptr(), c"trusted.ferryfs.applied".as_ptr()) };
    Setup { _tmp: tmp, backing, journal }
}

fn listing(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default());
    }
    out
}

fn replay(s: &Setup, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferryfs"))
        .arg("replay")
        .arg("--journal")
        .arg(&s.journal)
        .arg("--backing")
        .arg(&s.backing)
        .args(extra)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs replay, expects refusal with `needle` in the message and no change to the backing.
fn assert_refused(s: &Setup, needle: &str) {
    let before = listing(&s.backing);
    let (code, text) = replay(s, &[]);
    assert_ne!(code, 0, "replay accepted a bad journal:\n{text}");
    assert!(text.contains(needle), "message lacks `{needle}`:\n{text}");
    assert_eq!(listing(&s.backing), before, "the backing directory changed");
}

fn segment0(s: &Setup) -> PathBuf {
    s.journal.join("seg-00000000")
}

/// Offsets of records in segment 0, read with `ferryfs inspect --json`.
fn record_offsets(s: &Setup) -> Vec<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferryfs"))
        .arg("inspect")
        .arg("--journal")
        .arg(&s.journal)
        .arg("--json")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "record")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect()
}

fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut u8)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b[offset as usize]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_flipped_bit_inside_the_log_is_refused_unchanged() {
    let s = crashed_journal(6);
    let offs = record_offsets(&s);
    patch(&segment0(&s), offs[offs.len() / 2] + 70, |b| *b ^= 0x10);
    assert_refused(&s, "corrupt");
    assert!(replay(&s, &[]).1.contains("--discard-after-corruption"), "the message names the way out");
}

#[test]
fn a_zeroed_page_inside_the_log_is_refused_unchanged() {
    let s = crashed_journal(8);
    let mut b = std::fs::read(segment0(&s)).unwrap();
    b[8192..12288].fill(0);
    std::fs::write(segment0(&s), b).unwrap();
    assert_refused(&s, "valid records follow");
}

#[test]
fn corruption_can_be_discarded_on_request_keeping_the_prefix() {
    let s = crashed_journal(6);
    let offs = record_offsets(&s);
    let bad = offs[offs.len() / 2];
    patch(&segment0(&s), bad + 70, |b| *b ^= 0x10);
    let (code, text) = replay(&s, &["--discard-after-corruption"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("stopped at a corrupt record"), "{text}");
    assert!(!listing(&s.backing).is_empty(), "the records before the damage were applied");
    assert!(
        std::fs::read_dir(&s.journal).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("discarded-lsn-"))
    );
}

#[test]
fn a_torn_last_record_stops_replay_there_and_reports_it() {
    let s = crashed_journal(3);
    let offs = record_offsets(&s);
    let last = *offs.last().unwrap();
    patch(&segment0(&s), last + 64 + 3, |b| *b ^= 0xFF);
    let (code, text) = replay(&s, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("stopped at a torn record"), "{text}");
    assert!(text.contains(&format!("offset {last}")), "names the position: {text}");
    let files = listing(&s.backing);
    assert_eq!(files.len(), 3);
    // The torn record was the last write of f2: its first 2000 bytes are there, not the third 1000.
    assert_eq!(files["f2"].len(), 2000);
    assert_eq!(files["f0"], vec![b'a'; 3000]);
}

#[test]
fn a_truncated_segment_is_refused_unchanged() {
    let s = crashed_journal(2);
    let f = std::fs::OpenOptions::new().write(true).open(segment0(&s)).unwrap();
    f.set_len(SEGMENT / 2).unwrap();
    assert_refused(&s, "seg-00000000");
}

#[test]
fn a_journal_from_a_newer_version_is_refused_unchanged() {
    let s = crashed_journal(2);
    let sbp = s.journal.join("superblock");
    let mut b = std::fs::read(&sbp).unwrap();
    for slot in [0usize, 2048] {
        b[slot + 8] = 9; // the version field
        let crc = crc32c::crc32c(&b[slot..slot + 508]);
        b[slot + 508..slot + 512].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&sbp, b).unwrap();
    assert_refused(&s, "newer than this build");
}

#[test]
fn a_missing_superblock_is_refused_unchanged() {
    let s = crashed_journal(2);
    std::fs::remove_file(s.journal.join("superblock")).unwrap();
    assert_refused(&s, "not a ferryfs journal");
}

#[test]
fn a_wrong_magic_is_refused_unchanged() {
    let s = crashed_journal(2);
    let sbp = s.journal.join("superblock");
    let mut b = std::fs::read(&sbp).unwrap();
    b[0] = b'X';
    b[2048] = b'X';
    std::fs::write(&sbp, b).unwrap();
    assert_refused(&s, "not a ferryfs journal");
}

#[test]
fn a_missing_backing_directory_is_refused() {
    let s = crashed_journal(1);
    let gone =
        Setup { _tmp: tempfile::tempdir().unwrap(), backing: s.backing.join("nope"), journal: s.journal.clone() };
    let (code, text) = replay(&gone, &[]);
    assert_ne!(code, 0);
    assert!(text.contains("--backing") && text.contains("nope"), "{text}");
}

#[test]
fn a_journal_of_another_backing_directory_is_refused_unchanged() {
    let s = crashed_journal(2);
    let other = s.backing.parent().unwrap().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep"), b"x").unwrap();
    let wrong = Setup { _tmp: tempfile::tempdir().unwrap(), backing: other.clone(), journal: s.journal.clone() };
    assert_refused(&wrong, "belongs to backing directory");
}

#[test]
fn a_dry_run_changes_nothing_and_a_replay_twice_equals_once() {
    let s = crashed_journal(4);
    let (code, text) = replay(&s, &["--dry-run"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("would redo"), "{text}");
    assert!(listing(&s.backing).is_empty(), "dry run changed the backing directory");
    assert_eq!(replay(&s, &[]).0, 0);
    let once = listing(&s.backing);
    assert_eq!(once.len(), 4);
    assert_eq!(once["f3"], vec![b'd'; 3000]);
    let (code, text) = replay(&s, &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(listing(&s.backing), once);
}

#[test]
fn a_missing_id_table_after_a_checkpoint_is_refused_unchanged() {
    let s = crashed_journal_with(3, true);
    std::fs::remove_file(s.journal.join("ids")).unwrap();
    assert_refused(&s, "id table file `ids` is missing");
}
