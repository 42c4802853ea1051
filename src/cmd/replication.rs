//! The mount's replication options: `--target`, `--key`, and the status it serves.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::format::record;
use crate::journal::{Journal, JournalGeometry};
use crate::os::storage::DirStorage;
use crate::proto::wire::Key;
use crate::ship::hub::{self, Hub};
use crate::ship::session::{Connector, LocalConnector, TcpConnector};
use crate::status::{JournalStatus, StatusReport, TargetStatus};
use crate::syncmap::SyncMap;
use crate::types::Lsn;

/// Where one `--target` points.
#[derive(Clone, Debug)]
pub enum TargetUrl {
    Tcp { url: String, addr: SocketAddr },
    Dir { url: String, dir: PathBuf },
}

impl TargetUrl {
    pub fn url(&self) -> &str {
        match self {
            TargetUrl::Tcp { url, .. } | TargetUrl::Dir { url, .. } => url,
        }
    }
}

/// `tcp://HOST:PORT` or a directory.
pub fn parse_target(s: &str) -> Result<TargetUrl> {
    if let Some(rest) = s.strip_prefix("tcp://") {
        let addr = rest
            .to_socket_addrs()
            .with_context(|| format!("--target {s}: not a HOST:PORT"))?
            .next()
            .with_context(|| format!("--target {s}: the host has no address"))?;
        return Ok(TargetUrl::Tcp { url: s.to_string(), addr });
    }
    if s.contains("://") {
        bail!("--target {s}: unknown scheme; use tcp://HOST:PORT or a directory path");
    }
    let dir = super::common::existing_dir("--target", Path::new(s))?;
    Ok(TargetUrl::Dir { url: dir.display().to_string(), dir })
}

/// Reads `--key FILE` (docs/PROTOCOL.md, "Key file").
pub fn read_key(path: &Path) -> Result<Key> {
    let bytes = std::fs::read(path).with_context(|| format!("--key {}: cannot read it", path.display()))?;
    Key::from_file_bytes(&bytes).map_err(|e| anyhow::anyhow!("--key {}: {e}", path.display()))
}

/// Checks the targets against the mount's own directories.
pub fn check_targets(targets: &[TargetUrl], backing: &Path, journal: &Path, mountpoint: &Path) -> Result<()> {
    for t in targets {
        if let TargetUrl::Dir { dir, url } = t {
            for (what, p) in
                [("the backing directory", backing), ("the journal", journal), ("the mountpoint", mountpoint)]
            {
                if dir.starts_with(p) || p.starts_with(dir) {
                    bail!("--target {url} overlaps {what} ({}); a target must be a separate directory", p.display());
                }
            }
        }
    }
    let mut urls: Vec<&str> = targets.iter().map(|t| t.url()).collect();
    urls.sort();
    if let Some(w) = urls.windows(2).find(|w| w[0] == w[1]) {
        bail!("--target {} is given twice", w[0]);
    }
    Ok(())
}

/// Each target's map as the journal directory holds it, with every mark the journal's records
/// since imply (000:12 across a crash), written back before recovery may free the log.
///
/// Map files of targets not given this time (a target left off the command line) can no longer
/// follow the changes: they are written back owing a full resync, so the target is never
/// taken for more current than it is if it is given again later.
pub fn load_maps(storage: &DirStorage, targets: &[TargetUrl], has_journal: bool) -> Result<Vec<(Lsn, SyncMap)>> {
    let urls: Vec<String> = targets.iter().map(|t| t.url().to_string()).collect();
    let mut maps = Vec::new();
    for url in &urls {
        maps.push(hub::load_map(storage, url).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    if has_journal {
        mark_and_save(storage, &urls, &mut maps)?;
    }
    retire_absent(storage, &urls)?;
    Ok(maps)
}

/// Re-marks `maps` (named by `urls`) from the journal and writes them, covering everything
/// the journal holds now.
pub fn mark_and_save(storage: &DirStorage, urls: &[String], maps: &mut [(Lsn, SyncMap)]) -> Result<()> {
    let names: Vec<String> = urls.iter().map(|u| hub::map_file_name(u)).collect();
    mark_and_save_named(storage, &names, maps)
}

/// `mark_and_save` for maps named by their file names.
pub fn mark_and_save_named(storage: &DirStorage, names: &[String], maps: &mut [(Lsn, SyncMap)]) -> Result<()> {
    if maps.is_empty() {
        return Ok(());
    }
    let end = hub::remark_from_journal(storage, maps).map_err(|e| anyhow::anyhow!("re-marking the sync maps: {e}"))?;
    for (name, (upto, map)) in names.iter().zip(maps.iter_mut()) {
        *upto = end;
        crate::io::Storage::write_file_atomic(storage, name, &hub::encode_map_file(end, map))
            .with_context(|| format!("writing the sync map {name}"))?;
    }
    Ok(())
}

/// The target map files in the journal directory: (file name, the map).
pub fn map_files(storage: &DirStorage) -> Result<Vec<(String, Lsn, SyncMap)>> {
    let mut out = Vec::new();
    let dir = storage.dir();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("target-") && name.ends_with(".map")) {
            continue;
        }
        let bytes = std::fs::read(dir.join(&name)).with_context(|| format!("reading {name}"))?;
        let (upto, map) = hub::decode_map_file(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "the sync map `{name}` in {} is damaged: {e}; move it away to resync that target in full",
                dir.display()
            )
        })?;
        out.push((name, upto, map));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn retire_absent(storage: &DirStorage, urls: &[String]) -> Result<()> {
    let given: Vec<String> = urls.iter().map(|u| hub::map_file_name(u)).collect();
    for (name, upto, mut map) in map_files(storage)? {
        if given.contains(&name) || map.full_resync_owed() {
            continue;
        }
        eprintln!("ferryfs: {name}: that target is not given this time; it will get a full resync when it is");
        map.require_full_resync();
        map.fall_back();
        crate::io::Storage::write_file_atomic(storage, &name, &hub::encode_map_file(upto, &map))
            .with_context(|| format!("writing the sync map {name}"))?;
    }
    Ok(())
}

/// Sessions for each target, in order.
pub fn connectors(
    targets: &[TargetUrl],
    journal_dir: &Path,
    set_id: [u8; 16],
    epoch: u64,
    key: Option<&Key>,
) -> Vec<Box<dyn Connector>> {
    targets
        .iter()
        .map(|t| -> Box<dyn Connector> {
            match t {
                TargetUrl::Tcp { addr, .. } => Box::new(TcpConnector::new(*addr, set_id, epoch, key.cloned())),
                TargetUrl::Dir { url, dir } => {
                    let state = journal_dir.join("targets").join(hub::map_file_name(url).trim_end_matches(".map"));
                    let g = JournalGeometry { segment_size: 16 << 20, segment_count: 8 };
                    Box::new(LocalConnector::new(dir, &state, set_id, g))
                }
            }
        })
        .collect()
}

/// The status report of a running mount.
pub fn report(journal: &Journal<DirStorage>, hub: Option<&Hub<DirStorage>>, dir: &Path) -> StatusReport {
    let sb = journal.superblock();
    let g = journal.geometry();
    let next = journal.next_lsn();
    let size = g.segment_size * g.segment_count as u64;
    let used = journal.bytes_appended_since_start();
    let js = JournalStatus {
        dir: dir.display().to_string(),
        size_bytes: size,
        used_bytes: used.min(size),
        start_lsn: sb.start_lsn.0,
        next_lsn: next.0,
        durable_lsn: journal.durable_lsn().0.saturating_sub(1),
        checkpoint_lsn: sb.start_lsn.0,
    };
    let targets = hub.map(|h| h.links.iter().map(|l| target_status(journal, l, next)).collect()).unwrap_or_default();
    StatusReport::new(js, targets)
}

fn target_status(journal: &Journal<DirStorage>, link: &hub::Link, next: Lsn) -> TargetStatus {
    let acked = link.acked_below();
    let st = link.lock();
    let (lag_records, lag_seconds) = match acked {
        Some(a) if a < next => (next.0 - a.0, record_age(journal, a)),
        Some(_) => (0, 0.0),
        None => (next.0.saturating_sub(st.sent_below.0), 0.0),
    };
    TargetStatus {
        url: link.url.clone(),
        state: st.state.name().to_string(),
        acked_lsn: acked.map_or(0, |a| a.0.saturating_sub(1)),
        lag_records,
        lag_bytes: acked.map_or(0, |a| journal.bytes_from(a)),
        lag_seconds,
        dirty_blocks: st.map.dirty_blocks(),
        bytes_sent: st.bytes_sent,
        bytes_resync: st.bytes_resync,
        reconnects: st.reconnects,
        last_error: st.last_error.clone(),
    }
}

/// Seconds since record `lsn` was journaled (0 when it is not in the journal any more).
fn record_age(journal: &Journal<DirStorage>, lsn: Lsn) -> f64 {
    let Ok(mut cur) = journal.cursor_at(lsn) else { return 0.0 };
    let mut buf = Vec::new();
    if journal.read_records(&mut cur, Lsn(lsn.0 + 1), 1, &mut buf).is_err() || buf.len() < record::HEADER_SIZE {
        return 0.0;
    }
    let Ok(h) = record::decode_header(&buf, buf.len()) else { return 0.0 };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    now.saturating_sub(h.time_ns) as f64 / 1e9
}

/// Shared for the status server.
pub type SharedHub = Option<Arc<Hub<DirStorage>>>;
