//! The mount's replication options: `--target`, `--bunker`, `--key`, and the status it serves.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::format::record;
use crate::journal::{AllRetentions, Journal, JournalGeometry, Retention};
use crate::os::storage::DirStorage;
use crate::proto::wire::Key;
use crate::ship::bunker::{
    self as bunker_link, BunkerConfig, BunkerConnector, BunkerLink, Hooks, LocalBunkerConnector, TcpBunkerConnector,
};
use crate::ship::hub::{self, Hub};
use crate::ship::session::{Connector, LocalConnector, TcpConnector};
use crate::status::{BunkerStatus, JournalStatus, StatusReport, TargetStatus};
use crate::syncmap::SyncMap;
use crate::types::Lsn;

/// Where one `--target` (or the `--bunker`) points.
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
    parse_url("--target", s)
}

/// `--bunker`: `tcp://HOST:PORT` or a directory.
pub fn parse_bunker(s: &str) -> Result<TargetUrl> {
    parse_url("--bunker", s)
}

/// `tcp://HOST:PORT` or an existing directory; errors name `flag`.
fn parse_url(flag: &str, s: &str) -> Result<TargetUrl> {
    if let Some(rest) = s.strip_prefix("tcp://") {
        if let Some((_, options)) = rest.split_once('?') {
            bail!(
                "{flag} {s}: `?{options}`: options in a target's URL (set mode, `consistency-interval=`) are not in \
                 this build yet (docs/CONSISTENCY.md); nothing was changed"
            );
        }
        let addr = rest
            .to_socket_addrs()
            .with_context(|| format!("{flag} {s}: not a HOST:PORT"))?
            .next()
            .with_context(|| format!("{flag} {s}: the host has no address"))?;
        return Ok(TargetUrl::Tcp { url: s.to_string(), addr });
    }
    if s.contains("://") {
        bail!("{flag} {s}: unknown scheme; use tcp://HOST:PORT or a directory path");
    }
    if s.is_empty() {
        bail!("{flag}: empty; use tcp://HOST:PORT or a directory path");
    }
    let dir = super::common::existing_dir(flag, Path::new(s))?;
    Ok(TargetUrl::Dir { url: dir.display().to_string(), dir })
}

/// `--bunker-mode`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BunkerModeArg {
    Sync,
    Async,
}

/// `--bunker-unreachable`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnreachableArg {
    Degrade,
    Wait,
}

/// The link's configuration from the mount's flags (checked before anything is created). Set
/// `restart_first` when the journal was replayed after a crash.
pub fn bunker_config(
    url: &TargetUrl,
    mode: BunkerModeArg,
    unreachable: UnreachableArg,
    timeout: Duration,
) -> Result<BunkerConfig> {
    if timeout.is_zero() {
        bail!("--bunker-timeout 0: must be longer than nothing (e.g. 5s, 500ms)");
    }
    let mode = match mode {
        BunkerModeArg::Sync => bunker_link::Mode::Sync,
        BunkerModeArg::Async => bunker_link::Mode::Async,
    };
    let unreachable = match unreachable {
        UnreachableArg::Degrade => bunker_link::Unreachable::Degrade,
        UnreachableArg::Wait => bunker_link::Unreachable::Wait,
    };
    Ok(BunkerConfig::new(url.url(), mode, unreachable, timeout))
}

/// Checks a `--bunker DIR` against the mount's own directories and the targets: the bunker's
/// log needs a directory of its own (ideally on another disk).
pub fn check_bunker(
    bunker: &TargetUrl,
    targets: &[TargetUrl],
    backing: &Path,
    journal: &Path,
    mountpoint: &Path,
) -> Result<()> {
    if let TargetUrl::Dir { dir, url } = bunker {
        for (what, p) in [("the backing directory", backing), ("the journal", journal), ("the mountpoint", mountpoint)]
        {
            if dir.starts_with(p) || p.starts_with(dir) {
                bail!(
                    "--bunker {url} overlaps {what} ({}); the bunker needs a directory of its own, ideally on another \
                     disk",
                    p.display()
                );
            }
        }
    }
    for t in targets {
        let overlaps = match (bunker, t) {
            (TargetUrl::Dir { dir: b, .. }, TargetUrl::Dir { dir: t, .. }) => b.starts_with(t) || t.starts_with(b),
            (TargetUrl::Tcp { addr: b, .. }, TargetUrl::Tcp { addr: t, .. }) => b == t,
            _ => false,
        };
        if overlaps {
            bail!("--bunker {} is also a --target ({}); give the bunker a place of its own", bunker.url(), t.url());
        }
    }
    Ok(())
}

/// Starts the bunker link (before the FUSE session): the journal's mirror, whose fsyncs wait
/// for it in sync mode. Its retention is combined with the hub's by [`set_retention`].
pub fn start_bunker(
    url: &TargetUrl,
    config: BunkerConfig,
    journal: &Arc<Journal<DirStorage>>,
    hub: Option<Arc<Hub<DirStorage>>>,
    key: Option<&Key>,
) -> Arc<BunkerLink<DirStorage>> {
    let (set_id, epoch) = (journal.superblock().set_id, journal.epoch());
    let connector: Box<dyn BunkerConnector> = match url {
        TargetUrl::Tcp { addr, .. } => {
            Box::new(TcpBunkerConnector { addr: *addr, set_id, epoch, key: key.cloned(), timeout: config.timeout })
        }
        TargetUrl::Dir { dir, .. } => Box::new(LocalBunkerConnector::new(dir, set_id, epoch, journal.geometry())),
    };
    let link = BunkerLink::new(journal.clone(), config, bunker_hooks(journal, hub));
    journal.set_mirror(link.clone());
    link.start(connector);
    link
}

/// The watermark from the targets' acks, and a fence shared with the targets' hub (recorded in
/// the journal directory either way, so the next mount knows it).
fn bunker_hooks(journal: &Arc<Journal<DirStorage>>, hub: Option<Arc<Hub<DirStorage>>>) -> Hooks {
    let Some(hub) = hub else {
        let recorded = hub::read_fence(journal.storage()).unwrap_or_else(|e| {
            Some(hub::Fence { epoch: u64::MAX, fork_lsn: 0, text: format!("{e}; taking this primary for fenced") })
        });
        let j = journal.clone();
        return Hooks {
            targets_acked_below: Box::new(|| None),
            fenced: Box::new(move || recorded.clone().map(|f| (f.epoch, f.fork_lsn, f.text))),
            on_fenced: Box::new(move |epoch, fork_lsn, text| {
                eprintln!("ferryfs: ERROR: {text}");
                let f = hub::Fence { epoch, fork_lsn, text: text.to_string() };
                if let Err(e) = crate::io::Storage::write_file_atomic(j.storage(), hub::FENCE_FILE, &f.encode()) {
                    tracing::error!("writing `{}`: {e}", hub::FENCE_FILE);
                }
            }),
        };
    };
    let (h1, h2, h3) = (hub.clone(), hub.clone(), hub);
    Hooks {
        targets_acked_below: Box::new(move || {
            h1.links.iter().filter(|l| l.url != hub::PROMOTION_LINK).filter_map(|l| l.bunker_floor()).min()
        }),
        fenced: Box::new(move || h2.fenced().map(|f| (f.epoch, f.fork_lsn, f.text))),
        on_fenced: Box::new(move |epoch, fork_lsn, text| {
            h3.fence(hub::Fence { epoch, fork_lsn, text: text.to_string() })
        }),
    }
}

/// The journal's retention: the targets' hub and the bunker link, whichever there are (the
/// journal takes one, once).
pub fn set_retention(
    journal: &Journal<DirStorage>,
    hub: Option<Arc<Hub<DirStorage>>>,
    bunker: Option<Arc<BunkerLink<DirStorage>>>,
) {
    let mut all: Vec<Arc<dyn Retention>> = Vec::new();
    if let Some(h) = hub {
        all.push(h);
    }
    if let Some(b) = bunker {
        all.push(b);
    }
    match all.len() {
        0 => {}
        1 => journal.set_retention(all.pop().expect("one")),
        _ => journal.set_retention(Arc::new(AllRetentions(all))),
    }
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

/// On a journal made by a failover's promotion (a promoted target's log mounted as the new
/// primary's journal): the since-promotion map (`hub::PROMOTION_LINK`), re-marked from the
/// journal and written, to be kept in the hub so a later failback of the old primary sends
/// only what changed here since the fork. `None` on any other journal.
pub fn promotion_map(storage: &DirStorage, has_journal: bool) -> Result<Option<(String, Lsn, SyncMap)>> {
    if !has_journal {
        return Ok(None);
    }
    let Some(p) = crate::replica::target::read_promotion(storage).map_err(|e| anyhow::anyhow!("{e}"))? else {
        return Ok(None);
    };
    let name = hub::map_file_name(hub::PROMOTION_LINK);
    let (upto, map) = match crate::io::Storage::read_file(storage, &name).with_context(|| format!("reading {name}"))? {
        Some(b) => {
            hub::decode_map_file(&b).map_err(|e| anyhow::anyhow!("the since-promotion map `{name}` is damaged: {e}"))?
        }
        None => {
            let mut m = SyncMap::new_in_sync(Lsn(p.fork_lsn));
            m.fall_back();
            (Lsn(p.fork_lsn), m)
        }
    };
    let mut maps = [(upto, map)];
    mark_and_save_named(storage, std::slice::from_ref(&name), &mut maps)?;
    let [(upto, map)] = maps;
    Ok(Some((hub::PROMOTION_LINK.to_string(), upto, map)))
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
        // The since-promotion map is no target's: kept for a failback (`hub::PROMOTION_LINK`).
        if given.contains(&name) || map.full_resync_owed() || name == hub::map_file_name(hub::PROMOTION_LINK) {
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
pub fn report(
    journal: &Journal<DirStorage>,
    hub: Option<&Hub<DirStorage>>,
    bunker: Option<&BunkerLink<DirStorage>>,
    dir: &Path,
) -> StatusReport {
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
    let targets = hub
        .map(|h| {
            let watermark = h.all_acked_below();
            let holds: Vec<Option<Lsn>> = h.links.iter().map(|l| l.watermark_hold()).collect();
            let top = holds.iter().flatten().max().copied();
            h.links
                .iter()
                .zip(&holds)
                .filter(|(l, _)| l.url != hub::PROMOTION_LINK)
                .map(|(l, hold)| {
                    let mut t = target_status(journal, l, next);
                    t.watermark_lsn = watermark.map_or(0, |w| w.0.saturating_sub(1));
                    t.holds_watermark = hold.is_some() && *hold == watermark && top > watermark;
                    t
                })
                .collect()
        })
        .unwrap_or_default();
    let mut report = StatusReport::new(js, targets);
    report.bunker = bunker.map(|b| bunker_status(journal, b, next));
    report
}

fn bunker_status(journal: &Journal<DirStorage>, link: &BunkerLink<DirStorage>, next: Lsn) -> BunkerStatus {
    let s = link.snapshot();
    let acked = s.acked_below;
    let (lag_records, lag_bytes, lag_seconds) = if acked < next {
        (next.0 - acked.0, journal.bytes_from(acked), record_age(journal, acked))
    } else {
        (0, 0, 0.0)
    };
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    BunkerStatus {
        url: s.url.clone(),
        mode: s.mode().name().to_string(),
        configured_mode: s.configured_mode.name().to_string(),
        state: s.state_name().to_string(),
        degraded: s.degraded.is_some(),
        degraded_since: s.degraded.as_ref().map(|d| unix(d.0)),
        degraded_reason: s.degraded.as_ref().map(|d| d.1.clone()),
        acked_lsn: acked.0.saturating_sub(1),
        lag_records,
        lag_bytes,
        lag_seconds,
        bytes_sent: s.bytes_sent,
        reconnects: s.reconnects,
        last_error: s.last_error.clone(),
        fenced_epoch: s.fenced_epoch,
        fsyncs_waiting: s.fsyncs_waiting,
        fsyncs_waiting_seconds: s.waiting_for.as_secs_f64(),
        unreachable_policy: match s.unreachable {
            bunker_link::Unreachable::Degrade => "degrade".into(),
            bunker_link::Unreachable::Wait => "wait".into(),
        },
        timeout_seconds: link.config().timeout.as_secs_f64(),
    }
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
        sent_lsn: st.sent_below.0.saturating_sub(1),
        watermark_lsn: 0,
        log_start_lsn: st.target_log.map(|(s, _)| s),
        log_next_lsn: st.target_log.map(|(_, n)| n),
        holds_watermark: false,
        timed_out: st.timed_out,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_url_with_options_is_refused_by_name() {
        let err = parse_target("tcp://127.0.0.1:7070?consistency-interval=5s").unwrap_err().to_string();
        assert!(err.contains("consistency-interval") && err.contains("not in this build"), "{err}");
        assert!(matches!(parse_target("tcp://127.0.0.1:7070").unwrap(), TargetUrl::Tcp { .. }));
    }
}
