//! Journals written by this version, kept in fixtures/, must replay the same forever: a
//! change that breaks them needs a format version bump and a migration (docs/FORMAT.md).
//!
//! Regenerate (only when the format version changes, into a new fixtures/vN/):
//! `FERRYFS_WRITE_FIXTURES=1 cargo test --test format_compat`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferryfs::format::ops::{NodeKind, Op, SetAttr};
use ferryfs::io::NewNode;
use ferryfs::journal::reader::EndKind;
use ferryfs::journal::{JournalGeometry, read_superblock, recovery};
use ferryfs::os::storage::DirStorage;
use ferryfs::os::tree::OsTree;
use ferryfs::passthrough::{Core, CoreConfig, IdTable};
use ferryfs::sim::tree::SimTree;
use ferryfs::types::FileId;

const VERSION_DIR: &str = "v1";
const CASES: [&str; 3] = ["clean", "crashed-mid-transaction", "torn-tail"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(VERSION_DIR)
}

/// `path kind size first-bytes-hex` lines for a real directory tree.
fn describe_dir(root: &Path) -> String {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let line = if m.is_dir() {
                walk(&e.path(), &name, out);
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("symlink {}", std::fs::read_link(e.path()).unwrap().display())
            } else {
                let data = std::fs::read(e.path()).unwrap();
                format!("file {} crc32c={:08x}", data.len(), crc32c::crc32c(&data))
            };
            out.insert(name, line);
        }
    }
    let mut m = BTreeMap::new();
    walk(root, "", &mut m);
    m.into_iter().map(|(k, v)| format!("{k} {v}\n")).collect()
}

fn describe_sim(t: &SimTree) -> String {
    t.listing()
        .into_iter()
        .map(|(p, (k, c))| match k {
            NodeKind::Dir => format!("{p} dir\n"),
            NodeKind::Symlink => format!("{p} symlink {}\n", String::from_utf8_lossy(&c)),
            _ => format!("{p} file {} crc32c={:08x}\n", c.len(), crc32c::crc32c(&c)),
        })
        .collect()
}

fn sb() -> ferryfs::format::superblock::Superblock {
    ferryfs::format::superblock::Superblock::new(*b"ferryfs-fixture!", 0, 0, b"fixture".to_vec(), [0xF1; 16])
}

/// Writes one fixture journal (and what replaying it must produce) with the simulated tree.
fn write_fixture(case: &str, dir: &Path) {
    std::fs::create_dir_all(dir.join("journal")).unwrap();
    let storage = DirStorage::new(&dir.join("journal"));
    let geometry = JournalGeometry { segment_size: 64 << 10, segment_count: 3 };
    let opened = recovery::create(storage, geometry, sb()).unwrap();
    let tree = SimTree::new();
    let core =
        Core::new(opened.journal, tree.clone(), IdTable::from_snapshot(opened.ids.snapshot()), CoreConfig::default())
            .unwrap();
    let file = |_: &[u8]| NewNode { kind: NodeKind::File, mode: 0o640, uid: 1000, gid: 100, rdev: 0, target: b"" };
    let (d, _) = core
        .create(
            FileId::ROOT,
            b"docs",
            &NewNode { kind: NodeKind::Dir, mode: 0o755, uid: 0, gid: 0, rdev: 0, target: b"" },
        )
        .unwrap();
    let (a, _) = core.create(d, b"a.txt", &file(b"")).unwrap();
    core.write_via_tree(a, 0, b"the quick brown fox").unwrap();
    core.write_via_tree(a, 4096, &[7u8; 5000]).unwrap();
    let (b, _) = core.create(FileId::ROOT, b"b.bin", &file(b"")).unwrap();
    core.write_via_tree(b, 0, &(0..20_000u32).map(|i| (i * 31) as u8).collect::<Vec<_>>()).unwrap();
    core.set_attr(b, &SetAttr { size: Some(12_345), ..Default::default() }).unwrap();
    core.create(
        FileId::ROOT,
        b"link",
        &NewNode { kind: NodeKind::Symlink, mode: 0o777, uid: 0, gid: 0, rdev: 0, target: b"docs/a.txt" },
    )
    .unwrap();
    core.link(a, FileId::ROOT, b"hard").unwrap();
    core.rename(FileId::ROOT, b"b.bin", d, b"b2.bin", 0).unwrap();
    core.set_xattr(a, b"user.colour", b"blue", 0).unwrap();
    core.sync().unwrap();
    match case {
        "clean" => core.journal.close_clean().unwrap(),
        "crashed-mid-transaction" => {
            // An intent with no outcome: the crash came between journaling and applying.
            let (link, _) = core.lookup(FileId::ROOT, b"link").unwrap();
            core.journal
                .append_op(&Op::Unlink { parent: FileId::ROOT, name: b"link".to_vec(), id: link, dir: false })
                .unwrap();
            core.journal.sync().unwrap();
            // What replay must do with it: redo it (applied to the model tree only, not journaled).
            use ferryfs::io::Tree;
            tree.unlink(&tree.root().unwrap(), b"link", false).unwrap();
        }
        "torn-tail" => {
            core.write_via_tree(a, 0, b"THE QUICK").unwrap();
            core.journal.sync().unwrap();
        }
        _ => unreachable!(),
    }
    let mut expected = describe_sim(&tree);
    drop(core);
    if case == "torn-tail" {
        // Tear the last record (the second write to a.txt): its last bytes never reached disk.
        let seg = dir.join("journal").join("seg-00000000");
        let mut bytes = std::fs::read(&seg).unwrap();
        let end = bytes.iter().rposition(|&b| b != 0).unwrap();
        bytes[end - 4..=end].fill(0);
        std::fs::write(&seg, bytes).unwrap();
        // a.txt and its hard link keep the content from before the torn write.
        expected = expected.replace(&a_crc(b"THE QUICK brown fox"), &a_crc(b"the quick brown fox"));
    }
    if case == "clean" {
        // A clean journal has nothing past its checkpoint: replay onto an empty tree does nothing.
        expected = String::new();
    }
    std::fs::write(dir.join("expected.txt"), expected).unwrap();
    let _ = std::fs::remove_file(dir.join("journal").join("lock"));
}

fn a_crc(head: &[u8]) -> String {
    let mut data = head.to_vec();
    data.resize(4096, 0);
    data.extend_from_slice(&[7u8; 5000]);
    format!("crc32c={:08x}", crc32c::crc32c(&data))
}

/// Copies a fixture journal to a temp dir (the fixture itself is never changed).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn fixture_journals_of_this_version_replay_to_their_recorded_trees() {
    if std::env::var_os("FERRYFS_WRITE_FIXTURES").is_some() {
        for case in CASES {
            let dir = fixtures().join(case);
            let _ = std::fs::remove_dir_all(&dir);
            write_fixture(case, &dir);
        }
    }
    for case in CASES {
        let dir = fixtures().join(case);
        assert!(dir.exists(), "fixture {} is missing", dir.display());
        let tmp = tempfile::tempdir().unwrap();
        let journal = tmp.path().join("journal");
        let backing = tmp.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        copy_dir(&dir.join("journal"), &journal);
        let storage = DirStorage::new(&journal);
        let sb = read_superblock(&storage).unwrap_or_else(|e| panic!("{case}: superblock: {e}"));
        assert_eq!(sb.clean, case == "clean", "{case}: clean flag");
        let tree = OsTree::open(&backing).unwrap();
        let opened = recovery::recover(storage, sb, &tree, [0; 16], false, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{case}: replay failed: {e}"));
        let end = opened.report.end.clone().unwrap();
        match case {
            "torn-tail" => assert!(matches!(end.kind, EndKind::Torn(_)), "{case}: {end:?}"),
            _ => assert_eq!(end.kind, EndKind::Clean, "{case}"),
        }
        assert!(opened.report.failed.is_empty(), "{case}: {:?}", opened.report.failed);
        let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
        assert_eq!(
            describe_dir(&backing),
            expected,
            "{case}: replayed tree differs from fixtures/{VERSION_DIR}/{case}/expected.txt"
        );
    }
}
