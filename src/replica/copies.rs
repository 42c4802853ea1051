//! The two copies of a set-mode target's mirror, and the symlink that shows one of them
//! (issue 7 point 4, docs/CONSISTENCY.md, "The target: staging and the atomic switch").
//!
//! ```text
//!  --dir ──symlink──> <--state>/copies/a      (shown: the primary at some swap)
//!                     <--state>/copies/b      (standby: the next set is applied here)
//!  show(b): symlink "<--dir>.ferryfs-flip" ──> copies/b, renamed over --dir (rename(2) is
//!           atomic), the parent directory synced
//! ```
//!
//! A reader resolving a path from `--dir` gets one copy or the other, never a mix. The symlink
//! is the only record of which copy is shown: a crash at any point leaves `--dir` pointing at a
//! copy (or, during the one-time conversion of a plain directory, absent with copy `a` made, which
//! `open` completes).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One of the two copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    A,
    B,
}

impl Which {
    pub fn other(self) -> Which {
        match self {
            Which::A => Which::B,
            Which::B => Which::A,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Which::A => "a",
            Which::B => "b",
        }
    }
}

/// `--dir` and the copies behind it.
#[derive(Debug)]
pub struct Copies {
    dir: PathBuf,
    root: PathBuf,
}

/// Suffix of the symlink made next to `--dir` before it is renamed over it.
const FLIP_SUFFIX: &str = ".ferryfs-flip";

impl Copies {
    /// Opens the copies under `root` (`<--state>/copies`) shown at `dir` (`--dir`), making them
    /// on first use. A plain directory at `dir` (a target's mirror so far) becomes copy `a`,
    /// moved, not copied; copy `b` starts empty (the caller fills it). Refused, changing
    /// nothing: `dir` a file, or a symlink to anything but one of the copies.
    pub fn open(dir: &Path, root: &Path) -> Result<Copies, String> {
        let c = Copies { dir: dir.to_path_buf(), root: root.to_path_buf() };
        let _ = fs::remove_file(c.flip_path()); // a flip cut off before its rename
        match fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => {
                c.shown()?;
            }
            Ok(m) if m.is_dir() => {
                c.make_root()?;
                let a = c.path(Which::A);
                if a.exists() {
                    return Err(format!(
                        "--dir {} is a directory, and {} exists too: which one holds the mirror is not clear; move one \
                         of them away (nothing was changed)",
                        dir.display(),
                        a.display()
                    ));
                }
                fs::rename(dir, &a).map_err(|e| format!("moving --dir {} to {}: {e}", dir.display(), a.display()))?;
                sync_parent(&a)?;
                c.show(Which::A)?;
            }
            Ok(_) => return Err(format!("--dir {} is not a directory (nothing was changed)", dir.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // New, or a conversion cut off between its move and its symlink.
                c.make_root()?;
                let a = c.path(Which::A);
                if !a.exists() {
                    fs::create_dir(&a).map_err(|e| format!("creating {}: {e}", a.display()))?;
                }
                c.show(Which::A)?;
            }
            Err(e) => return Err(format!("--dir {}: {e}", dir.display())),
        }
        for w in [Which::A, Which::B] {
            let p = c.path(w);
            if !p.exists() {
                fs::create_dir(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
            }
        }
        Ok(c)
    }

    /// The copy `--dir` shows now.
    pub fn shown(&self) -> Result<Which, String> {
        let target =
            fs::read_link(&self.dir).map_err(|e| format!("reading the symlink --dir {}: {e}", self.dir.display()))?;
        for w in [Which::A, Which::B] {
            if target == self.path(w) {
                return Ok(w);
            }
        }
        Err(format!(
            "--dir {} points to {}, not to one of ferryfs's copies ({} or {}); nothing was changed",
            self.dir.display(),
            target.display(),
            self.path(Which::A).display(),
            self.path(Which::B).display()
        ))
    }

    /// The copy the next set is applied to.
    pub fn standby(&self) -> Result<Which, String> {
        self.shown().map(Which::other)
    }

    pub fn path(&self, w: Which) -> PathBuf {
        self.root.join(w.name())
    }

    /// Shows copy `w` at `--dir`, atomically, durably (the parent directory synced).
    pub fn show(&self, w: Which) -> Result<(), String> {
        let flip = self.flip_path();
        let _ = fs::remove_file(&flip);
        std::os::unix::fs::symlink(self.path(w), &flip)
            .map_err(|e| format!("making the symlink {}: {e}", flip.display()))?;
        fs::rename(&flip, &self.dir)
            .map_err(|e| format!("renaming {} over --dir {}: {e}", flip.display(), self.dir.display()))?;
        sync_parent(&self.dir)
    }

    fn flip_path(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(FLIP_SUFFIX);
        self.dir.with_file_name(name)
    }

    fn make_root(&self) -> Result<(), String> {
        fs::create_dir_all(&self.root).map_err(|e| format!("creating {}: {e}", self.root.display()))
    }
}

fn sync_parent(p: &Path) -> Result<(), String> {
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(parent).and_then(|f| f.sync_all()).map_err(|e| format!("syncing {}: {e}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (dir, root) = (t.path().join("mirror"), t.path().join("state/copies"));
        (t, dir, root)
    }

    #[test]
    fn a_new_target_shows_copy_a_and_flips_between_the_two() {
        let (_t, dir, root) = setup();
        let c = Copies::open(&dir, &root).unwrap();
        assert_eq!(c.shown().unwrap(), Which::A);
        assert_eq!(c.standby().unwrap(), Which::B);
        fs::write(c.path(Which::B).join("f"), b"set 2").unwrap();
        assert!(!dir.join("f").exists(), "the standby is not shown");
        c.show(Which::B).unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"set 2");
        // Opened again (a restart), it shows what it showed.
        let c = Copies::open(&dir, &root).unwrap();
        assert_eq!(c.shown().unwrap(), Which::B);
        assert!(!c.flip_path().exists());
    }

    #[test]
    fn a_plain_mirror_becomes_copy_a_with_its_files() {
        let (_t, dir, root) = setup();
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("kept"), b"old mirror").unwrap();
        let c = Copies::open(&dir, &root).unwrap();
        assert!(fs::symlink_metadata(&dir).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(dir.join("kept")).unwrap(), b"old mirror");
        assert_eq!(fs::read(c.path(Which::A).join("kept")).unwrap(), b"old mirror");
    }

    #[test]
    fn a_conversion_cut_off_after_its_move_is_completed() {
        let (_t, dir, root) = setup();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::write(root.join("a/kept"), b"moved").unwrap();
        let c = Copies::open(&dir, &root).unwrap();
        assert_eq!(c.shown().unwrap(), Which::A);
        assert_eq!(fs::read(dir.join("kept")).unwrap(), b"moved");
    }

    #[test]
    fn a_file_or_a_foreign_symlink_at_dir_is_refused_and_left_alone() {
        let (t, dir, root) = setup();
        fs::write(&dir, b"a file").unwrap();
        assert!(Copies::open(&dir, &root).unwrap_err().contains("not a directory"));
        assert_eq!(fs::read(&dir).unwrap(), b"a file");
        fs::remove_file(&dir).unwrap();
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let err = Copies::open(&dir, &root).unwrap_err();
        assert!(err.contains("not to one of ferryfs's copies"), "{err}");
        assert_eq!(fs::read_link(&dir).unwrap(), elsewhere);
        // A directory at --dir while copy a exists: which is the mirror? Refused.
        fs::remove_file(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        fs::create_dir_all(root.join("a")).unwrap();
        assert!(Copies::open(&dir, &root).unwrap_err().contains("not clear"));
        assert!(dir.is_dir() && !fs::symlink_metadata(&dir).unwrap().file_type().is_symlink());
    }

    /// A reader that resolves paths while flips go on sees one whole copy: each copy holds
    /// two files with the same number, and a reader that resolves `--dir` once and reads both
    /// never sees two numbers. As in the target, a copy is written only a grace time after the
    /// flip that left it (a reader slower than that is not judged: the grace is the bound).
    #[test]
    fn a_reader_through_the_symlink_sees_one_copy_at_a_time() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};
        const GRACE: Duration = Duration::from_millis(20);
        let (_t, dir, root) = setup();
        let c = Copies::open(&dir, &root).unwrap();
        let write = |w: Which, n: u32| {
            for f in ["x", "y"] {
                fs::write(c.path(w).join(f), n.to_string()).unwrap();
            }
        };
        write(Which::A, 0);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut judged, mut slow) = (0, 0);
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    let Ok(d) = fs::canonicalize(&dir) else { continue };
                    let (x, y) = (fs::read_to_string(d.join("x")), fs::read_to_string(d.join("y")));
                    if t.elapsed() >= GRACE / 2 {
                        slow += 1;
                        continue;
                    }
                    if let (Ok(x), Ok(y)) = (x, y) {
                        assert_eq!(x, y, "a mix of two copies");
                        judged += 1;
                    }
                }
                (judged, slow)
            })
        };
        for n in 1..100 {
            let standby = c.standby().unwrap();
            write(standby, n);
            c.show(standby).unwrap();
            std::thread::sleep(GRACE);
        }
        stop.store(true, Ordering::Release);
        let (judged, slow) = reader.join().unwrap();
        assert!(judged > slow, "the reader was too slow to judge: {judged} judged, {slow} slow");
    }
}
