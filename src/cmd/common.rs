//! What every subcommand checks before it touches a journal or a backing directory.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::format::superblock::Superblock;
use crate::journal::{JournalError, read_superblock};
use crate::os::storage::DirStorage;

/// A directory the operator named, canonical, or a message naming the flag and the path.
pub fn existing_dir(flag: &str, p: &Path) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => {
            Ok(p.canonicalize().with_context(|| format!("{flag} {}: cannot resolve", p.display()))?)
        }
        Ok(_) => bail!("{flag} {}: not a directory", p.display()),
        Err(e) => bail!("{flag} {}: {e}", p.display()),
    }
}

/// Parses `64M`, `1G`, `4096`, `512k` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let m = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in `{s}` (use k, M, G or T)")),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (like 64M or 1G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses `5s`, `100ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let i = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..i].parse().map_err(|_| format!("`{s}` is not a duration (like 5s or 100ms)"))?;
    Ok(match &s[i..] {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        u => return Err(format!("unknown duration unit `{u}` in `{s}` (use ms, s, m or h)")),
    })
}

/// The journal's superblock, with a message an operator can act on when it is unreadable.
pub fn superblock(storage: &DirStorage) -> Result<Superblock> {
    read_superblock(storage).map_err(|e| {
        let dir = storage.dir().display();
        match e {
            JournalError::NoSuperblock => anyhow::anyhow!(
                "{dir} is not a ferryfs journal: it has no `superblock` file (wrong directory, or the superblock was deleted)"
            ),
            JournalError::Superblock(crate::format::superblock::SuperblockError::NoMagic) => anyhow::anyhow!(
                "{dir} is not a ferryfs journal: its superblock file lacks the magic \"FRYSUPER\" in both slots; nothing was changed"
            ),
            e => anyhow::anyhow!("{dir}: {e}; nothing was changed"),
        }
    })
}

/// Refuses a backing directory other than the one the journal was made for.
pub fn check_backing(sb: &Superblock, backing: &Path, journal: &Path) -> Result<()> {
    let m = std::fs::metadata(backing)?;
    if m.dev() != sb.backing_dev || m.ino() != sb.backing_ino {
        bail!(
            "journal {} belongs to backing directory {} (device {}, inode {}), not {} (device {}, inode {}); nothing was changed",
            journal.display(),
            String::from_utf8_lossy(&sb.backing_path),
            sb.backing_dev,
            sb.backing_ino,
            backing.display(),
            m.dev(),
            m.ino()
        );
    }
    Ok(())
}

/// An exclusive lock on the journal directory, held while a mount or a replay uses it.
pub struct JournalLock {
    _file: File,
}

pub fn lock_journal(journal: &Path) -> Result<JournalLock> {
    let path = journal.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    if !crate::os::try_lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))? {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "journal {} is in use by another ferryfs process{}; unmount it first",
            journal.display(),
            if holder.trim().is_empty() { String::new() } else { format!(" (pid {})", holder.trim()) }
        );
    }
    file.set_len(0)?;
    std::io::Write::write_all(&mut &file, std::process::id().to_string().as_bytes())?;
    Ok(JournalLock { _file: file })
}

/// This boot of the kernel: a recovery in the same boot knows the page cache survived.
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("0"), 16).unwrap_or(0);
    }
    id
}

/// A progress bar on stderr for long journal work (drawn only on a terminal).
pub fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    let template = format!("{what} {{bytes}}/{{total_bytes}} [{{bar:30}}] {{eta}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
