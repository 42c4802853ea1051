//! The primary's replication hub: one [`Link`] per mirror target with its sync map, the marks
//! every journaled change makes in all of them (000:1–2), the acks that clear them (000:4,
//! 7–11), how much of the journal they hold (000:5–6, [`Retention`]), and their persistence
//! (000:12).
//!
//! **What a map file guarantees.** `targets/<name>.map` holds the map as of `upto`: every mark
//! of a transaction below `upto` is in it. The journal keeps every record from `upto` on (the
//! retention floor never passes it), so after a crash of the primary the marks made since are
//! re-derived from the journal ([`remark_from_journal`]) before recovery frees it. Maps are
//! written at every [`Hub::persist`] (the mount calls it on a timer and when a target falls
//! back) and at a clean shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::source::Source;
use crate::format::ops::Op;
use crate::format::record::{self, Kind};
use crate::io::Storage;
use crate::journal::{Journal, JournalError, Retention, reader};
use crate::passthrough::Marks;
use crate::syncmap::{Mode, SyncMap};
use crate::types::{FileId, Lsn};

/// What the status shows for a target (the words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Disconnected,
    Connected,
    InitialSync,
    Resyncing,
    InSync,
    /// A failover promoted a target past this primary: it ships nothing (`Hub::fence`).
    Fenced,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Disconnected => "disconnected",
            LinkState::Connected => "connected",
            LinkState::InitialSync => "initial-sync",
            LinkState::Resyncing => "resyncing",
            LinkState::InSync => "in-sync",
            LinkState::Fenced => "fenced",
        }
    }
}

/// One target's shared state, under the link's lock.
pub struct LinkInner {
    pub map: SyncMap,
    /// The map file holds every mark of transactions below this.
    pub persisted_upto: Lsn,
    pub state: LinkState,
    /// Records below this have been sent on the current connection.
    pub sent_below: Lsn,
    pub bytes_sent: u64,
    pub bytes_resync: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// The journal overflowed while this target held it: the shipper must drop ordered
    /// shipping and resync from the map.
    pub released: bool,
    /// When the map file was last written.
    pub persisted_at: Instant,
    /// Since when the target has been unreachable (`None` while connected).
    pub disconnected_since: Option<Instant>,
    /// It stayed unreachable longer than `--target-timeout`: it no longer holds the all-acked
    /// watermark back and is resynchronized from its map when it returns (cleared then).
    pub timed_out: bool,
    /// The target's log as it last said (`LogInfo`): oldest record held, next expected.
    pub target_log: Option<(u64, u64)>,
}

pub struct Link {
    pub url: String,
    /// Set mode (`?consistency-interval=`): the target gets consistent sets, not every record.
    pub sets: std::sync::OnceLock<Arc<super::set_link::SetLink>>,
    /// The map file's name in the journal directory.
    pub map_file: String,
    inner: Mutex<LinkInner>,
    /// Woken when the journal has new records or the link must act.
    pub wake: Condvar,
}

impl Link {
    pub fn lock(&self) -> MutexGuard<'_, LinkInner> {
        self.inner.lock().unwrap()
    }

    /// Every update below this is durable at the target (ordered mode), else `None`.
    pub fn acked_below(&self) -> Option<Lsn> {
        match self.lock().map.mode() {
            Mode::Ordered { acked_below } => Some(acked_below),
            _ => None,
        }
    }

    /// What a bunker must keep for a zero-loss failover to this target: every record from
    /// this LSN on. Ordered: what it acked. Resyncing: the LSN its log continues at once the
    /// resync lands (`resume_from`, which the journal keeps too), not its acks, which it
    /// ignores meanwhile; a bunker that freed records past it could no longer complete the
    /// target after the resync. Fallen back: `None` (its next resync resumes past what is
    /// written now).
    pub fn bunker_floor(&self) -> Option<Lsn> {
        match self.lock().map.mode() {
            Mode::Ordered { acked_below } => Some(acked_below),
            Mode::Resyncing { resume_from, .. } => Some(resume_from),
            Mode::FallenBack => None,
        }
    }

    /// What this target holds the all-acked watermark at (claims 002:1, 7–9): in ordered
    /// mode, every record below its acks is durable there (sent and received). A target that
    /// is resynchronizing, fell back to its map or stayed away past `--target-timeout` holds
    /// nothing back: it will get blocks, not records.
    pub fn watermark_hold(&self) -> Option<Lsn> {
        let st = self.lock();
        match st.map.mode() {
            Mode::Ordered { acked_below } if !st.timed_out => Some(acked_below),
            _ => None,
        }
    }

    fn floor(&self) -> Lsn {
        let st = self.lock();
        let mode = match st.map.mode() {
            Mode::Ordered { acked_below } => acked_below,
            Mode::Resyncing { resume_from, .. } => resume_from,
            Mode::FallenBack => st.persisted_upto,
        };
        mode.min(st.persisted_upto)
    }
}

pub struct Hub<S: Storage> {
    journal: Arc<Journal<S>>,
    pub links: Vec<Arc<Link>>,
    persist_lock: Mutex<()>,
    pub started: Instant,
    fence: Mutex<Option<Fence>>,
    /// `--target-timeout`, in milliseconds.
    target_timeout_ms: AtomicU64,
    /// What set-mode targets' hooks read the backing directory through (the core).
    source: std::sync::OnceLock<Arc<dyn Source>>,
}

/// `--target-timeout`'s default: how long a target may stay unreachable before it stops
/// holding the all-acked watermark back.
pub const TARGET_TIMEOUT_DEFAULT: Duration = Duration::from_secs(600);

/// A failover moved the replication set on past this primary (design §5, "Failback"): a
/// target or the bunker answered with a higher epoch. Kept in `FENCE_FILE` in the journal
/// directory, so every later mount knows it at once and ships nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub epoch: u64,
    /// Histories agree below this LSN (0: unknown).
    pub fork_lsn: u64,
    /// Who said so, and the words for the operator.
    pub text: String,
}

pub const FENCE_FILE: &str = "fenced";

/// The pseudo-target of a primary made by a failover: never connected, never acked, it only
/// collects the marks of every change since the promotion, so the old primary can later be
/// failed back from the locations that differ (design §5, "Failback"). Its map is kept in
/// `target-since-promotion.map` like a target's.
pub const PROMOTION_LINK: &str = "since-promotion";
const FENCE_MAGIC: [u8; 8] = *b"FRYPFNC1";

impl Fence {
    /// "FRYPFNC1", epoch (u64 LE), fork LSN (u64 LE), the text (UTF-8, to the end).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = FENCE_MAGIC.to_vec();
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.fork_lsn.to_le_bytes());
        v.extend_from_slice(self.text.as_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Fence, String> {
        if b.len() < 24 || b[..8] != FENCE_MAGIC {
            return Err(format!("`{FENCE_FILE}` is not a fence record"));
        }
        Ok(Fence {
            epoch: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            fork_lsn: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            text: String::from_utf8_lossy(&b[24..]).into_owned(),
        })
    }
}

/// The fence recorded in a journal directory, if any.
pub fn read_fence<S: Storage>(storage: &S) -> Result<Option<Fence>, String> {
    match storage.read_file(FENCE_FILE) {
        Ok(None) => Ok(None),
        Ok(Some(b)) => Fence::decode(&b).map(Some),
        Err(e) => Err(format!("reading `{FENCE_FILE}` in the journal directory: {e}")),
    }
}

/// A file name for a target's map: its url with everything but `[A-Za-z0-9.-]` as `_`.
pub fn map_file_name(url: &str) -> String {
    let clean: String =
        url.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    format!("target-{clean}.map")
}

const MAP_FILE_MAGIC: [u8; 8] = *b"FRYTMAP1";

/// The map file: magic, `upto` (u64), then the sync map's own encoding (which carries its crc).
pub fn encode_map_file(upto: Lsn, map: &SyncMap) -> Vec<u8> {
    let mut v = MAP_FILE_MAGIC.to_vec();
    v.extend_from_slice(&upto.0.to_le_bytes());
    v.extend_from_slice(&map.encode());
    v
}

pub fn decode_map_file(b: &[u8]) -> Result<(Lsn, SyncMap), String> {
    if b.len() < 16 || b[..8] != MAP_FILE_MAGIC {
        return Err("not a ferryfs target map file (bad magic)".into());
    }
    let upto = Lsn(u64::from_le_bytes(b[8..16].try_into().unwrap()));
    let map = SyncMap::decode(&b[16..]).map_err(|e| e.to_string())?;
    Ok((upto, map))
}

/// Loads a target's map from the journal directory: a target never seen owes a full sync.
pub fn load_map<S: Storage>(storage: &S, url: &str) -> Result<(Lsn, SyncMap), String> {
    let name = map_file_name(url);
    match storage.read_file(&name).map_err(|e| format!("reading {name}: {e}"))? {
        Some(b) => decode_map_file(&b).map_err(|e| {
            format!(
                "the sync map of target {url} (`{name}` in the journal directory) is damaged: {e}. Nothing was \
                 changed; move the file away to make ferryfs resynchronize that target in full"
            )
        }),
        None => Ok((Lsn(0), SyncMap::new_needing_full_sync())),
    }
}

/// 000:12 after a crash: marks every location the journal's records from `from` on touch, in
/// every map, so no mark made after the last persist is lost. Run before recovery frees the log.
/// Returns the LSN the scan ended at: the maps now hold every mark of every record below it.
pub fn remark_from_journal<S: Storage>(storage: &S, maps: &mut [(Lsn, SyncMap)]) -> Result<Lsn, JournalError> {
    let sb = crate::journal::read_superblock(storage)?;
    let end = reader::scan(storage, &sb, |r| {
        let lsn = r.header.lsn;
        for (upto, map) in maps.iter_mut() {
            if lsn >= *upto {
                mark_record(map, lsn, r.header.kind, r.payload);
            }
        }
        true
    })?;
    Ok(end.next_lsn)
}

fn mark_record(map: &mut SyncMap, lsn: Lsn, kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Write => {
            if let Ok((file, offset, data)) = record::decode_write(payload) {
                map.mark_write(lsn, file, offset, data.len() as u64);
            }
        }
        Kind::Op => {
            if let Ok(op) = Op::decode(payload) {
                mark_op(map, lsn, &op);
                // A truncate destroyed the bytes past its new size, and its record does not
                // say how many (the live path marks them exactly, from the size before it):
                // everything past it is marked; a resync stops at the file's end.
                if let Op::SetAttr { id, attr } = &op
                    && let Some(size) = attr.size
                {
                    map.mark_write(lsn, *id, size, u64::MAX - size);
                }
            }
        }
        _ => {}
    }
}

/// The locations an op touches (design §3): names in directories, attributes of objects, and
/// for fallocate the blocks it zeroes or allocates.
pub fn mark_op(map: &mut SyncMap, lsn: Lsn, op: &Op) {
    match op {
        Op::Create { parent, new_id, .. } => {
            map.mark_entries(lsn, *parent);
            map.mark_attr(lsn, *new_id);
        }
        Op::Link { id, new_parent, .. } => {
            map.mark_entries(lsn, *new_parent);
            map.mark_attr(lsn, *id);
        }
        Op::Unlink { parent, .. } => map.mark_entries(lsn, *parent),
        Op::Rename { parent, new_parent, .. } => {
            map.mark_entries(lsn, *parent);
            map.mark_entries(lsn, *new_parent);
        }
        Op::SetAttr { id, .. } | Op::SetXattr { id, .. } | Op::RemoveXattr { id, .. } => map.mark_attr(lsn, *id),
        Op::Fallocate { id, offset, len, .. } => {
            map.mark_write(lsn, *id, *offset, *len);
            map.mark_attr(lsn, *id);
        }
    }
}

impl<S: Storage> Hub<S> {
    /// A hub over `journal` with one link per `(url, upto, map)`.
    pub fn new(journal: Arc<Journal<S>>, maps: Vec<(String, Lsn, SyncMap)>) -> Arc<Hub<S>> {
        let links = maps
            .into_iter()
            .map(|(url, upto, map)| {
                Arc::new(Link {
                    map_file: map_file_name(&url),
                    url,
                    inner: Mutex::new(LinkInner {
                        map,
                        persisted_upto: upto,
                        state: LinkState::Disconnected,
                        sent_below: Lsn(0),
                        bytes_sent: 0,
                        bytes_resync: 0,
                        reconnects: 0,
                        last_error: None,
                        released: false,
                        persisted_at: Instant::now(),
                        disconnected_since: Some(Instant::now()),
                        timed_out: false,
                        target_log: None,
                    }),
                    wake: Condvar::new(),
                    sets: std::sync::OnceLock::new(),
                })
            })
            .collect();
        let fence = match read_fence(journal.storage()) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("{e}; taking this primary for fenced");
                Some(Fence { epoch: u64::MAX, fork_lsn: 0, text: e })
            }
        };
        let hub = Hub {
            journal,
            links,
            persist_lock: Mutex::new(()),
            started: Instant::now(),
            fence: Mutex::new(None),
            target_timeout_ms: (TARGET_TIMEOUT_DEFAULT.as_millis() as u64).into(),
            source: std::sync::OnceLock::new(),
        };
        if let Some(f) = fence {
            hub.set_fenced(f);
        }
        Arc::new(hub)
    }

    /// Records that a failover moved the set on past this primary: every link stops for good
    /// (shippers check `fenced`), durable in `FENCE_FILE` first. The first fence heard wins.
    pub fn fence(&self, f: Fence) {
        if self.fenced().is_some() {
            return;
        }
        eprintln!("ferryfs: ERROR: {}", f.text);
        tracing::error!("{}", f.text);
        if let Err(e) = self.journal.storage().write_file_atomic(FENCE_FILE, &f.encode()) {
            tracing::error!("writing `{FENCE_FILE}`: {e}");
        }
        self.set_fenced(f);
    }

    fn set_fenced(&self, f: Fence) {
        for link in &self.links {
            let mut st = link.lock();
            st.state = LinkState::Fenced;
            st.last_error = Some(f.text.clone());
            drop(st);
            link.wake.notify_all();
        }
        *self.fence.lock().unwrap() = Some(f);
    }

    /// On a primary made by a failover: the fork LSN and the map of every location changed
    /// since the promotion (the `PROMOTION_LINK` pseudo-target), for a failback.
    pub fn since_promotion(&self) -> Option<(u64, SyncMap)> {
        let promotion = crate::replica::target::read_promotion(self.journal.storage()).ok().flatten()?;
        let link = self.links.iter().find(|l| l.url == PROMOTION_LINK)?;
        let map = link.lock().map.clone();
        Some((promotion.fork_lsn, map))
    }

    /// Set once a failover fenced this primary: nothing is shipped.
    pub fn fenced(&self) -> Option<Fence> {
        self.fence.lock().unwrap().clone()
    }

    pub fn journal(&self) -> &Arc<Journal<S>> {
        &self.journal
    }

    /// Writes every map whose marks changed since it was last written (000:12).
    pub fn persist(&self) -> Result<(), String> {
        for link in &self.links {
            self.persist_link(link)?;
        }
        Ok(())
    }

    /// Writes `link`'s map file. One writer at a time: the file is replaced through one
    /// temporary name.
    pub fn persist_link(&self, link: &Link) -> Result<(), String> {
        let _one = self.persist_lock.lock().unwrap();
        let (upto, bytes) = {
            let st = link.lock();
            // Every transaction below `upto` has ended, so its marks are in the map now.
            let upto = self.journal.settled().settled_below;
            (upto, encode_map_file(upto, &st.map))
        };
        self.journal
            .storage()
            .write_file_atomic(&link.map_file, &bytes)
            .map_err(|e| format!("writing the sync map of {} ({}): {e}", link.url, link.map_file))?;
        let mut st = link.lock();
        st.persisted_upto = st.persisted_upto.max(upto);
        st.persisted_at = Instant::now();
        Ok(())
    }

    /// Whether `link`'s map should be written now (see `ship::PERSIST_EVERY`).
    pub fn persist_due(&self, link: &Link) -> bool {
        let st = link.lock();
        let behind_acks = matches!(st.map.mode(), Mode::Ordered { acked_below } if acked_below > st.persisted_upto);
        let age = st.persisted_at.elapsed();
        age >= super::PERSIST_EVERY || (behind_acks && age >= super::PERSIST_AFTER_ACKS)
    }

    /// How long ago `link`'s map was last written.
    pub fn since_persist(&self, link: &Link) -> std::time::Duration {
        link.lock().persisted_at.elapsed()
    }

    /// 000:12: ordered shipping to `link` stops; its map alone says what it lacks.
    pub fn set_target_timeout(&self, d: Duration) {
        self.target_timeout_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn target_timeout(&self) -> Duration {
        Duration::from_millis(self.target_timeout_ms.load(Ordering::Relaxed))
    }

    /// The all-acked watermark (claim 002:1): every record below it is durable at every
    /// target that holds it back (`Link::watermark_hold`); `None` when none does.
    pub fn all_acked_below(&self) -> Option<Lsn> {
        self.links.iter().filter(|l| l.url != PROMOTION_LINK).filter_map(|l| l.watermark_hold()).min()
    }

    /// A target unreachable for longer than `--target-timeout` stops holding the watermark
    /// back (the other targets' logs may then shrink): it falls back to its sync map and is
    /// resynchronized from blocks when it returns. Returns whether it timed out now.
    pub fn check_timeout(&self, link: &Link) -> bool {
        let timeout = self.target_timeout();
        {
            let mut st = link.lock();
            let away = st.disconnected_since.map(|t| t.elapsed());
            if st.timed_out || away.is_none_or(|a| a < timeout) {
                return false;
            }
            st.timed_out = true;
            st.last_error = Some(format!(
                "unreachable for longer than --target-timeout ({timeout:?}): it no longer holds the all-acked \
                 watermark back; it will be resynchronized from its sync map when it returns"
            ));
        }
        self.fall_back(link, &format!("unreachable for longer than --target-timeout ({timeout:?})"));
        true
    }

    pub fn fall_back(&self, link: &Link, why: &str) {
        {
            let mut st = link.lock();
            if st.map.mode() != Mode::FallenBack {
                tracing::warn!("target {}: falling back to its sync map: {why}", link.url);
                st.map.fall_back();
            }
        }
        if let Err(e) = self.persist_link(link) {
            tracing::error!("{e}");
        }
    }
}

impl<S: Storage> Hub<S> {
    /// What set-mode targets read the backing directory through (the core; once).
    pub fn set_source(&self, source: Arc<dyn Source>) {
        let _ = self.source.set(source);
    }

    /// The set-mode links, with the source their hooks read through.
    fn set_links(&self) -> impl Iterator<Item = (&super::set_link::SetLink, &dyn Source)> {
        let src = self.source.get();
        self.links.iter().filter_map(move |l| Some((l.sets.get()?.as_ref(), src?.as_ref())))
    }

    /// A swap of link `link`'s consistent sets (004:1, 10); the caller holds the core's gate
    /// (`Core::swap`), so no mutation is in flight. The sync map's marks become the set's plan.
    /// Returns the set's id, or `None` when nothing changed or the last set is still in flight.
    pub fn swap_set(&self, link: &Link) -> Option<u64> {
        let sets = link.sets.get()?;
        let mut st = link.lock();
        if sets.sending() || st.map.is_clean() {
            return None;
        }
        let plan = st.map.resync_plan(self.journal.next_lsn());
        sets.begin(&plan).then_some(plan.id.0)
    }

    /// The target committed link `link`'s set: what its plan covered is clear, unless marked
    /// again since.
    pub fn set_committed(&self, link: &Link) -> Result<(), String> {
        let Some(plan) = link.sets.get().and_then(|s| s.finish()) else { return Ok(()) };
        link.lock().map.resync_done(plan).map_err(|e| e.to_string())
    }
}

impl<S: Storage> Marks for Hub<S> {
    fn before_write(&self, file: FileId, offset: u64, len: u64) {
        for (sets, src) in self.set_links() {
            sets.preserve(src, |s, src| s.preserve_write(src, file, offset, len));
        }
    }

    fn before_op(&self, op: &Op) {
        for (sets, src) in self.set_links() {
            sets.preserve(src, |s, src| s.preserve_op(src, op));
        }
    }

    fn write(&self, lsn: Lsn, file: FileId, offset: u64, len: u64) {
        for link in &self.links {
            link.lock().map.mark_write(lsn, file, offset, len);
            link.wake.notify_all();
        }
    }

    fn op(&self, lsn: Lsn, op: &Op) {
        for link in &self.links {
            mark_op(&mut link.lock().map, lsn, op);
            link.wake.notify_all();
        }
    }
}

impl<S: Storage> Retention for Hub<S> {
    fn floor(&self) -> Option<Lsn> {
        self.links.iter().map(|l| l.floor()).min()
    }

    /// The journal is full and a target holds it: that target falls back (never a writer
    /// blocked for a target that may stay away for days), and resyncs from its map later.
    fn release(&self) {
        // A map written now no longer holds the log: only a real laggard is let go.
        if let Err(e) = self.persist() {
            tracing::error!("{e}");
        }
        let needed = self.journal.oldest_segment_end();
        for link in &self.links {
            if link.floor() < needed {
                {
                    let mut st = link.lock();
                    st.released = true;
                    st.last_error = Some(
                        "the journal overflowed while this target lagged: it will be resynchronized from its sync map"
                            .into(),
                    );
                }
                self.fall_back(link, "journal overflow");
                link.wake.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ops::{NodeKind, SetAttr};
    use crate::io::NewNode;
    use crate::journal::{JournalGeometry, recovery};
    use crate::passthrough::{Core, CoreConfig, IdTable};
    use crate::sim::storage::SimStorage;
    use crate::sim::tree::SimTree;
    use crate::syncmap::BlockRange;

    /// A primary over a simulated tree whose one target is in sync, with a file `f` of
    /// 10,000 bytes the target already holds.
    fn primary() -> (Core<SimStorage, SimTree>, Arc<Hub<SimStorage>>, FileId) {
        let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
        let opened = recovery::create(SimStorage::new(), g, crate::sim::crash::new_superblock()).unwrap();
        let core = Core::new(
            opened.journal,
            SimTree::new(),
            IdTable::from_snapshot(opened.ids.snapshot()),
            CoreConfig::default(),
        )
        .unwrap();
        let hub = Hub::new(core.journal.clone(), vec![("tcp://t:1".into(), Lsn(0), SyncMap::new_in_sync(Lsn(1)))]);
        core.set_marks(hub.clone());
        let new = NewNode { kind: NodeKind::File, mode: 0o644, uid: 0, gid: 0, rdev: 0, target: b"" };
        let (id, _) = core.create(FileId::ROOT, b"f", &new).unwrap();
        core.write_via_tree(id, 0, &[7; 10_000]).unwrap();
        hub.links[0].lock().map.ack(Lsn(core.journal.next_lsn().0 - 1));
        assert!(hub.links[0].lock().map.is_clean());
        (core, hub, id)
    }

    #[test]
    fn a_truncate_marks_the_bytes_it_destroyed() {
        // Found by the failover simulation (seed 839): a file cut to 743 bytes and grown back
        // kept the target's old bytes 743..3706, because only its attributes were marked.
        let (core, hub, id) = primary();
        core.set_attr(id, &SetAttr { size: Some(743), ..Default::default() }).unwrap();
        let map = &hub.links[0].lock().map;
        assert!(map.is_attr_dirty(id));
        // Bytes 743..10,000: blocks 0 (from byte 743) to 2.
        assert_eq!(map.dirty_ranges(id), vec![BlockRange::new(0, 2)]);
    }

    #[test]
    fn a_truncate_that_grows_marks_only_attributes() {
        let (core, hub, id) = primary();
        core.set_attr(id, &SetAttr { size: Some(20_000), ..Default::default() }).unwrap();
        let map = &hub.links[0].lock().map;
        assert!(map.is_attr_dirty(id));
        assert!(map.dirty_ranges(id).is_empty(), "{:?}", map.dirty_ranges(id));
    }

    #[test]
    fn a_truncate_remarked_from_the_journal_marks_everything_past_its_size() {
        // After a crash the maps are re-derived from records, which do not hold the old size.
        let (core, _hub, id) = primary();
        let from = core.journal.next_lsn();
        core.set_attr(id, &SetAttr { size: Some(5000), ..Default::default() }).unwrap();
        core.journal.sync().unwrap();
        let mut maps = vec![(from, SyncMap::new_in_sync(from))];
        remark_from_journal(core.journal.storage(), &mut maps).unwrap();
        let ranges = maps[0].1.dirty_ranges(id);
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        assert_eq!(ranges[0].first, 1, "from the block holding byte 5000");
        assert!(ranges[0].last >= u64::MAX / crate::limits::BLOCK_SIZE - 1, "{ranges:?}");
    }

    #[test]
    fn the_watermark_is_the_least_ack_of_the_targets_that_hold_it() {
        let (core, _, _) = primary();
        let maps =
            ["tcp://a:1", "tcp://b:1", "tcp://c:1"].map(|u| (u.to_string(), Lsn(0), SyncMap::new_in_sync(Lsn(1))));
        let mut maps = maps.to_vec();
        maps.push((PROMOTION_LINK.to_string(), Lsn(0), SyncMap::new_in_sync(Lsn(1))));
        let hub = Hub::new(core.journal.clone(), maps);
        for (link, acked) in hub.links.iter().zip([9, 5, 7, 1]) {
            link.lock().map.ack(Lsn(acked));
        }
        // b acked least (records up to 5); the since-promotion pseudo-link never counts.
        assert_eq!(hub.all_acked_below(), Some(Lsn(6)));
        // b falls back to its map (an overflow): it will get blocks, so it holds nothing back.
        hub.fall_back(&hub.links[1], "test");
        assert_eq!(hub.all_acked_below(), Some(Lsn(8)));
        // c stays away past --target-timeout: it stops holding the watermark back too.
        hub.set_target_timeout(Duration::from_millis(1));
        hub.links[2].lock().disconnected_since = Some(Instant::now());
        assert!(hub.links[0].lock().disconnected_since.is_some(), "never connected counts as away");
        hub.links[0].lock().disconnected_since = None;
        std::thread::sleep(Duration::from_millis(5));
        assert!(!hub.check_timeout(&hub.links[0]), "a connected target never times out");
        assert!(hub.check_timeout(&hub.links[2]));
        assert!(!hub.check_timeout(&hub.links[2]), "once");
        assert!(hub.links[2].lock().last_error.as_deref().is_some_and(|e| e.contains("--target-timeout")));
        assert_eq!(hub.all_acked_below(), Some(Lsn(10)));
    }

    /// Set mode over a real directory: a set taken at a swap is the tree as it was then,
    /// though a write, a rename and a truncate come after the swap and before the sender.
    #[test]
    fn a_set_is_the_tree_at_its_swap_while_changes_go_on() {
        use crate::os::tree::OsTree;
        use crate::ship::set_link::SetLink;
        use crate::ship::sets::Item;
        let dir = tempfile::tempdir().unwrap();
        let g = JournalGeometry { segment_size: 1 << 20, segment_count: 4 };
        let opened = recovery::create(SimStorage::new(), g, crate::sim::crash::new_superblock()).unwrap();
        let ids = IdTable::from_snapshot(opened.ids.snapshot());
        let core = Arc::new(
            Core::new(
                opened.journal,
                OsTree::open(dir.path()).unwrap(),
                ids,
                CoreConfig { sets_gate: true, ..CoreConfig::default() },
            )
            .unwrap(),
        );
        let hub = Hub::new(core.journal.clone(), vec![("tcp://t:1".into(), Lsn(0), SyncMap::new_in_sync(Lsn(1)))]);
        let sets = Arc::new(SetLink::new(Duration::from_secs(5), 1 << 20));
        assert!(hub.links[0].sets.set(sets.clone()).is_ok());
        hub.set_source(core.clone());
        core.set_marks(hub.clone());
        let new = NewNode { kind: NodeKind::File, mode: 0o644, uid: 0, gid: 0, rdev: 0, target: b"" };
        let (id, _) = core.create(FileId::ROOT, b"f", &new).unwrap();
        core.write_via_tree(id, 0, &[b'a'; 3 * 4096]).unwrap();

        let mut set = None;
        let held = core.swap(|| set = hub.swap_set(&hub.links[0]));
        assert!(set.is_some(), "the changes so far make a set");
        sets.record_hold(held);
        core.write_via_tree(id, 4096, &[b'b'; 4096]).unwrap();
        core.rename(FileId::ROOT, b"f", FileId::ROOT, b"g", 0).unwrap();
        core.set_attr(id, &SetAttr { size: Some(4096), ..Default::default() }).unwrap();
        assert_eq!(sets.bytes_aside(), 2 * 4096, "blocks 1 (written) and 2 (cut) were kept aside, block 0 not");

        let src: Arc<dyn Source> = core.clone();
        let mut blocks = std::collections::BTreeMap::new();
        let (mut names, mut size) = (Vec::new(), None);
        while let Some(item) = sets.next_item(src.as_ref(), None).unwrap() {
            match item {
                Item::Block { file, block, data } if file == id => drop(blocks.insert(block, data)),
                Item::Entries { dir, entries } if dir == FileId::ROOT => {
                    names = entries.into_iter().map(|(n, _)| n).collect()
                }
                Item::Node(n) if n.id == id.0 => size = Some(n.size),
                _ => {}
            }
        }
        assert_eq!(names, vec![b"f".to_vec()], "the root's names at the swap");
        assert_eq!(size, Some(3 * 4096), "the file's size at the swap");
        assert_eq!(blocks.len(), 3);
        assert!(blocks.values().all(|d| d == &vec![b'a'; 4096]), "every block as it was at the swap");
        hub.set_committed(&hub.links[0]).unwrap();
        let map = &hub.links[0].lock().map;
        assert!(
            map.is_entries_dirty(FileId::ROOT) && map.is_attr_dirty(id),
            "what changed after the swap waits for the next set"
        );
    }
}
