//! `--bunker DIR`: the connector and session of a bunker link whose log is kept in a local
//! directory by a [`BunkerCore`] in this process.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{BunkerConnector, BunkerEvent, BunkerPosition, BunkerSession, LinkError, Waker};
use crate::journal::JournalGeometry;
use crate::os::storage::DirStorage;
use crate::replica::bunker::{BunkerCore, is_bunker_log};
use crate::types::Lsn;

/// A directory's (device, inode): which directory a path named when a log was opened there.
type DirIdentity = (u64, u64);

/// `--bunker DIR`: the bunker's log in a directory here (a second disk, a mounted remote
/// disk), kept by a [`BunkerCore`] in this process; the link thread appends and syncs.
pub struct LocalBunkerConnector {
    pub dir: PathBuf,
    pub set_id: [u8; 16],
    pub epoch: u64,
    /// For a new log: the primary journal's.
    pub geometry: JournalGeometry,
    /// The open log, with the (device, inode) of the directory it was opened in.
    core: Option<(Arc<BunkerCore<DirStorage>>, DirIdentity)>,
}

impl LocalBunkerConnector {
    pub fn new(dir: &Path, set_id: [u8; 16], epoch: u64, geometry: JournalGeometry) -> LocalBunkerConnector {
        LocalBunkerConnector { dir: dir.to_path_buf(), set_id, epoch, geometry, core: None }
    }

    fn open(&self) -> Result<BunkerCore<DirStorage>, String> {
        let shown = self.dir.display();
        let storage = DirStorage::new(&self.dir);
        let has = storage.read_superblock_if_any().map_err(|e| format!("bunker directory {shown}: {e}"))?.is_some();
        if has {
            if !is_bunker_log(&storage).map_err(|e| format!("bunker directory {shown}: {e}"))? {
                return Err(format!(
                    "bunker directory {shown} holds a ferryfs journal that is not a bunker's log; give --bunker a \
                     directory of its own"
                ));
            }
            return BunkerCore::open(storage).map_err(|e| format!("the bunker log in {shown}: {e}"));
        }
        let entries = std::fs::read_dir(&self.dir).map_err(|e| format!("bunker directory {shown}: {e}"))?;
        if let Some(e) = entries.flatten().next() {
            return Err(format!(
                "bunker directory {shown} is not empty ({} and maybe more) and holds no bunker log; give --bunker an \
                 empty directory",
                e.file_name().to_string_lossy()
            ));
        }
        tracing::info!("creating a bunker log in {shown}");
        BunkerCore::create(storage, self.geometry, self.set_id, self.epoch)
            .map_err(|e| format!("creating the bunker log in {shown}: {e}"))
    }
}

fn dir_identity(dir: &Path) -> Result<DirIdentity, String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok((m.dev(), m.ino())),
        Ok(_) => Err(format!("bunker directory {}: not a directory", dir.display())),
        Err(e) => Err(format!("bunker directory {}: {e}", dir.display())),
    }
}

impl BunkerConnector for LocalBunkerConnector {
    fn connect(&mut self, _waker: Waker) -> Result<Box<dyn BunkerSession>, LinkError> {
        let identity = dir_identity(&self.dir)?;
        if self.core.as_ref().is_some_and(|(_, was)| *was != identity) {
            tracing::warn!("bunker directory {} was replaced; opening what is there now", self.dir.display());
            self.core = None;
        }
        let core = match &self.core {
            Some((c, _)) => c.clone(),
            None => {
                let c = Arc::new(self.open()?);
                self.core = Some((c.clone(), identity));
                c
            }
        };
        if core.set_id() != self.set_id {
            return Err(LinkError::Failed(format!(
                "bunker directory {} keeps the log of another replication set",
                self.dir.display()
            )));
        }
        if core.admits(self.epoch).is_err() {
            return Err(LinkError::Fenced { epoch: core.epoch(), fork_lsn: core.fork_lsn() });
        }
        let position = local_position(&core);
        Ok(Box::new(LocalBunkerSession { core, dir: self.dir.clone(), identity, events: VecDeque::new(), position }))
    }
}

fn local_position(core: &BunkerCore<DirStorage>) -> BunkerPosition {
    let log = core.log();
    BunkerPosition {
        epoch: log.epoch,
        start_lsn: log.start_lsn,
        next_lsn: log.next_lsn,
        durable_next: log.durable_next,
    }
}

struct LocalBunkerSession {
    core: Arc<BunkerCore<DirStorage>>,
    dir: PathBuf,
    identity: DirIdentity,
    events: VecDeque<BunkerEvent>,
    position: BunkerPosition,
}

impl LocalBunkerSession {
    /// A directory that vanished or was replaced (an unmounted disk shows the mountpoint's own
    /// directory) no longer keeps what the open log writes.
    fn check_dir(&self) -> Result<(), String> {
        if dir_identity(&self.dir)? != self.identity {
            return Err(format!(
                "bunker directory {} was removed or replaced (unmounted?) since its log was opened",
                self.dir.display()
            ));
        }
        Ok(())
    }
}

impl BunkerSession for LocalBunkerSession {
    fn position(&self) -> BunkerPosition {
        self.position
    }

    fn restart_at(&mut self, lsn: Lsn) -> Result<BunkerPosition, LinkError> {
        self.check_dir()?;
        self.core.restart_at(lsn).map_err(|e| LinkError::Failed(format!("restarting the bunker log: {e}")))?;
        Ok(local_position(&self.core))
    }

    fn send_records(&mut self, records: &[u8]) -> Result<(), String> {
        self.check_dir()?;
        let acked = self.core.receive(records).map_err(|e| format!("the bunker log in {}: {e}", self.dir.display()))?;
        self.events.push_back(BunkerEvent::Ack(acked));
        Ok(())
    }

    fn watermark(&mut self, all_acked: Lsn) -> Result<(), String> {
        self.core.watermark(all_acked).map_err(|e| format!("trimming the bunker log: {e}"))
    }

    fn heartbeat(&mut self) -> Result<(), String> {
        self.check_dir()
    }

    fn bye(&mut self, _reason: &str) {}

    fn event(&mut self, _wait: Duration) -> Option<BunkerEvent> {
        self.events.pop_front()
    }
}
