//! A set-mode target's staging of consistent sets (issue 7 point 4, docs/CONSISTENCY.md): each
//! set is written whole to its own file under `<--state>/sets/` and counts only once its commit
//! record is durable, so after a crash the target knows exactly which sets are complete.
//!
//! ```text
//!  set-<id>.partial   while the set arrives: items, each `len u32 ‖ crc32c u32 ‖ item`
//!  set-<id>           committed: the same items, then the commit record
//!                     "FRYSETC1" ‖ id u64 ‖ items u64 ‖ crc32c of the 24 bytes before it (u32),
//!                     fsynced, renamed from `.partial` (atomic), the directory fsynced
//! ```
//!
//! A `.partial` left by a crash is an incomplete set: removed at the next start (the primary
//! sends the set again: it clears its marks only once the target acknowledged the commit). A
//! committed set stays until both copies hold it (`remove`). Items use the resync staging's
//! encoding (`StagedItem`), so a set applies exactly as a resync does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::target::StagedItem;

const COMMIT_MAGIC: [u8; 8] = *b"FRYSETC1";
/// The commit record: magic, id, items, crc.
const COMMIT_LEN: usize = 28;
const PARTIAL: &str = ".partial";

/// The staging of one target's sets.
pub struct SetStage {
    dir: PathBuf,
    /// The set arriving now: its id, item count and file.
    open: Option<(u64, u64, BufWriter<File>)>,
}

impl SetStage {
    /// Opens `<state>/sets`, making it on first use, and removes every incomplete set (a crash
    /// cut it off before its commit). Returns the stage and the committed sets, oldest first.
    pub fn open(state_dir: &Path) -> Result<(SetStage, Vec<u64>), String> {
        let dir = state_dir.join("sets");
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut committed = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(PARTIAL) {
                fs::remove_file(entry.path()).map_err(|e| format!("removing the incomplete set {name}: {e}"))?;
                continue;
            }
            match name.strip_prefix("set-").and_then(|n| n.parse::<u64>().ok()) {
                Some(id) => committed.push(id),
                None => return Err(format!("{} holds {name}, which is no staged set: move it away", dir.display())),
            }
        }
        committed.sort_unstable();
        Ok((SetStage { dir, open: None }, committed))
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("set-{id}"))
    }

    fn partial(&self, id: u64) -> PathBuf {
        self.dir.join(format!("set-{id}{PARTIAL}"))
    }

    /// Set `id` begins; one still arriving is dropped (the connection that sent it broke).
    pub fn begin(&mut self, id: u64) -> Result<(), String> {
        if let Some((old, _, w)) = self.open.take() {
            drop(w.into_parts());
            let _ = fs::remove_file(self.partial(old));
        }
        if self.path(id).exists() {
            return Err(format!("set {id} is committed already; a set id is never used twice"));
        }
        let p = self.partial(id);
        let f = File::create(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        self.open = Some((id, 0, BufWriter::with_capacity(1 << 20, f)));
        Ok(())
    }

    /// One item of the set arriving.
    pub fn add(&mut self, item: &StagedItem) -> Result<(), String> {
        let (id, n, w) = self.open.as_mut().ok_or("a set item without a set begun")?;
        let bytes = item.encode().map_err(|e| e.to_string())?;
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        w.write_all(&head).and_then(|()| w.write_all(&bytes)).map_err(|e| format!("staging set {id}: {e}"))?;
        *n += 1;
        Ok(())
    }

    /// The set is complete, `items` long as its sender counted: its commit record is written
    /// and it is made durable; from here on a crash keeps it.
    pub fn commit(&mut self, id: u64, items: u64) -> Result<(), String> {
        let (open, n, w) = self.open.take().ok_or("a set commit without a set begun")?;
        if open != id || n != items {
            let _ = fs::remove_file(self.partial(open));
            return Err(format!("set {id} of {items} items commits, but set {open} with {n} items arrived: dropped"));
        }
        let mut rec = Vec::with_capacity(COMMIT_LEN);
        rec.extend_from_slice(&COMMIT_MAGIC);
        rec.extend_from_slice(&id.to_le_bytes());
        rec.extend_from_slice(&items.to_le_bytes());
        rec.extend_from_slice(&crc32c::crc32c(&rec).to_le_bytes());
        let f = (|| -> io::Result<File> {
            let mut w = w;
            w.write_all(&rec)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(f)
        })()
        .map_err(|e| format!("committing set {id}: {e}"))?;
        drop(f);
        fs::rename(self.partial(id), self.path(id)).map_err(|e| format!("committing set {id}: {e}"))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| format!("syncing {}: {e}", self.dir.display()))
    }

    /// The items of committed set `id`, each checked (crc), and the commit record checked.
    pub fn items(&self, id: u64) -> Result<Vec<StagedItem>, String> {
        let p = self.path(id);
        let damaged =
            |why: &str| format!("the staged set {} is damaged ({why}); nothing of it was applied", p.display());
        let mut r =
            BufReader::new(OpenOptions::new().read(true).open(&p).map_err(|e| format!("{}: {e}", p.display()))?);
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        if bytes.len() < COMMIT_LEN {
            return Err(damaged("no commit record"));
        }
        let (body, rec) = bytes.split_at(bytes.len() - COMMIT_LEN);
        let crc = u32::from_le_bytes(rec[24..].try_into().unwrap());
        if rec[..8] != COMMIT_MAGIC || crc32c::crc32c(&rec[..24]) != crc {
            return Err(damaged("bad commit record"));
        }
        if u64::from_le_bytes(rec[8..16].try_into().unwrap()) != id {
            return Err(damaged("the commit record names another set"));
        }
        let count = u64::from_le_bytes(rec[16..24].try_into().unwrap());
        let mut items = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let head = body.get(at..at + 8).ok_or_else(|| damaged("an item cut short"))?;
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
            let item = body.get(at + 8..at + 8 + len).ok_or_else(|| damaged("an item cut short"))?;
            if crc32c::crc32c(item) != u32::from_le_bytes(head[4..].try_into().unwrap()) {
                return Err(damaged("an item's crc"));
            }
            items.push(StagedItem::decode(item).map_err(|e| damaged(&e.to_string()))?);
            at += 8 + len;
        }
        if items.len() as u64 != count {
            return Err(damaged("fewer or more items than its commit record counts"));
        }
        Ok(items)
    }

    /// Set `id` is in both copies: its staging goes.
    pub fn remove(&self, id: u64) -> Result<(), String> {
        match fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing the staged set {id}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: u8) -> StagedItem {
        StagedItem::Data { file: 5, offset: u64::from(n) * 4096, data: vec![n; 100] }
    }

    #[test]
    fn a_committed_set_survives_a_restart_and_reads_back_whole() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, committed) = SetStage::open(t.path()).unwrap();
        assert!(committed.is_empty());
        s.begin(7).unwrap();
        for n in 0..3 {
            s.add(&data(n)).unwrap();
        }
        s.commit(7, 3).unwrap();
        drop(s);
        let (s, committed) = SetStage::open(t.path()).unwrap();
        assert_eq!(committed, vec![7]);
        assert_eq!(s.items(7).unwrap(), vec![data(0), data(1), data(2)]);
        s.remove(7).unwrap();
        assert_eq!(SetStage::open(t.path()).unwrap().1, Vec::<u64>::new());
    }

    #[test]
    fn a_set_cut_off_before_its_commit_is_gone_after_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, _) = SetStage::open(t.path()).unwrap();
        s.begin(1).unwrap();
        s.add(&data(1)).unwrap();
        s.commit(1, 1).unwrap();
        s.begin(2).unwrap();
        s.add(&data(2)).unwrap();
        // The crash: the process dies with set 2 partly written.
        drop(s);
        let (_, committed) = SetStage::open(t.path()).unwrap();
        assert_eq!(committed, vec![1], "only the complete set counts");
        assert!(!t.path().join("sets/set-2.partial").exists());
    }

    #[test]
    fn a_miscounted_or_damaged_set_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, _) = SetStage::open(t.path()).unwrap();
        s.begin(3).unwrap();
        s.add(&data(1)).unwrap();
        assert!(s.commit(3, 2).unwrap_err().contains("dropped"), "the sender counted two items");
        assert!(!t.path().join("sets/set-3").exists());
        s.begin(4).unwrap();
        s.add(&data(1)).unwrap();
        s.add(&data(2)).unwrap();
        s.commit(4, 2).unwrap();
        // A flipped bit in the first item.
        let p = t.path().join("sets/set-4");
        let mut b = fs::read(&p).unwrap();
        b[10] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(s.items(4).unwrap_err().contains("damaged"));
        // A commit record cut off.
        fs::write(&p, &b[..b.len() - 3]).unwrap();
        assert!(s.items(4).unwrap_err().contains("damaged"));
        assert!(s.begin(4).unwrap_err().contains("never used twice"));
        assert!(s.add(&data(1)).unwrap_err().contains("without a set begun"));
    }

    #[test]
    fn a_set_begun_again_drops_the_one_that_was_arriving() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, _) = SetStage::open(t.path()).unwrap();
        s.begin(5).unwrap();
        s.add(&data(9)).unwrap();
        s.begin(6).unwrap();
        s.add(&data(1)).unwrap();
        s.commit(6, 1).unwrap();
        assert_eq!(SetStage::open(t.path()).unwrap().1, vec![6]);
        assert_eq!(s.items(6).unwrap(), vec![data(1)]);
    }
}
