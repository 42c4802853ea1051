//! One target's shipper: its own thread; connects with backoff, resyncs from the sync map when
//! ordered shipping cannot simply go on, then ships the journal in LSN order with a window of
//! unacked bytes, batching records into frames.
//!
//! ```text
//!  connect ──> target's position ──ordered & the journal still holds it──> ship records
//!                               └─otherwise──> resync (000:13) ──ResyncDone──> ship records
//!  any error, silence or overflow ──> disconnected ──backoff──> connect
//! ```
//!
//! Only records that are durable in the journal and belong to ended transactions are sent
//! (below `min(durable, settled_below)`): a target never holds a record the primary could lose
//! in a crash, and a transaction's marks (made before it ends) always precede its records'
//! acks. Memory: at most [`WINDOW_BYTES`] unacked plus one batch being read.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::hub::{Hub, Link, LinkState};
use super::session::{Connector, Event, Session};
use super::source::Source;
use crate::format::ops::NodeKind;
use crate::io::Storage;
use crate::journal::{CursorError, LogCursor};
use crate::proto::wire::control::{ControlMsg, NodeDesc};
use crate::proto::wire::{Frame, MINOR_RESYNC_READ, MINOR_WATERMARK};
use crate::syncmap::{Mode, ResyncPlan};
use crate::types::{FileId, Lsn};

/// Unacked bytes in flight to one target at most.
pub const WINDOW_BYTES: usize = 8 << 20;
/// Bytes of records per frame at most (plus one record).
pub const BATCH_BYTES: usize = 1 << 20;
/// Bytes of file data per resync frame.
pub const RESYNC_CHUNK: usize = 1 << 20;
/// How often the shipper makes the journal durable itself when it has records to send.
const SYNC_EVERY: Duration = Duration::from_millis(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// The all-acked watermark goes to each target at most this often (claim 002:1).
const WATERMARK_EVERY: Duration = Duration::from_millis(100);
/// An unchanged watermark goes again this often (the target answers with its log's state).
const WATERMARK_REFRESH: Duration = Duration::from_secs(1);
/// How long a resync's end waits for the bunker to hold the records up to its read end.
const MIRROR_WAIT_MAX: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Settled notices remembered until the records they need are sent (a bound on memory; a
/// notice not remembered is observed again later).
const SETTLED_OBSERVED_MAX: usize = 4096;
/// Entries per ResyncEntries message (keeps a control body well under its limit).
const ENTRIES_PER_MESSAGE: usize = 256;

pub struct Shipper<S: Storage> {
    pub hub: Arc<Hub<S>>,
    pub link: Arc<Link>,
    pub source: Arc<dyn Source>,
    pub stop: Arc<AtomicBool>,
    pub timing: Timing,
}

/// The shipper's clocks. The simulation sets them so that nothing depends on wall time.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Make the journal durable at most this often when records wait for it.
    pub sync_every: Duration,
    /// Send a heartbeat after this long without a frame.
    pub heartbeat_every: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long an idle shipper waits for news.
    pub idle_wait: Duration,
    /// A target silent for this long is taken for gone.
    pub silence_max: Duration,
    /// Send the all-acked watermark at most this often when it moved ...
    pub watermark_every: Duration,
    /// ... and unchanged again this often.
    pub watermark_refresh: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            sync_every: SYNC_EVERY,
            heartbeat_every: HEARTBEAT_EVERY,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
            idle_wait: Duration::from_millis(5),
            silence_max: super::session::TARGET_SILENCE_MAX,
            watermark_every: WATERMARK_EVERY,
            watermark_refresh: WATERMARK_REFRESH,
        }
    }
}

impl<S: Storage> Shipper<S> {
    /// Runs until `stop`: connect, serve, back off, again.
    pub fn run(&self, mut connector: Box<dyn Connector>) {
        let mut backoff = self.timing.backoff_min;
        while !self.stop.load(Ordering::Acquire) {
            if self.hub.fenced().is_some() {
                return;
            }
            let result = connector.connect().and_then(|mut s| {
                backoff = self.timing.backoff_min;
                {
                    let mut st = self.link.lock();
                    st.disconnected_since = None;
                    st.timed_out = false;
                }
                self.serve(s.as_mut())
            });
            let why = match result {
                Ok(()) => return,
                Err(why) => why,
            };
            if let Some((epoch, fork_lsn)) = connector.fenced() {
                let text =
                    format!("target {}: {}", self.link.url, why.trim_start_matches(super::session::FENCED_PREFIX));
                self.hub.fence(super::hub::Fence { epoch, fork_lsn, text });
                return;
            }
            // 000:12: acks stopped; the map goes to disk now, not at the next timer.
            if let Err(e) = self.hub.persist_link(&self.link) {
                tracing::error!("{e}");
            }
            {
                let mut st = self.link.lock();
                if st.last_error.as_deref() != Some(&why) {
                    tracing::warn!("target {}: {why}", self.link.url);
                }
                st.state = LinkState::Disconnected;
                st.last_error = Some(why);
                st.reconnects += 1;
                st.disconnected_since.get_or_insert_with(Instant::now);
            }
            self.hub.check_timeout(&self.link);
            self.sleep(backoff);
            backoff = (backoff * 2).min(self.timing.backoff_max);
        }
    }

    fn sleep(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20).min(d));
        }
    }

    /// One connection: resync if needed, then ordered shipping until an error or stop.
    fn serve(&self, s: &mut dyn Session) -> Result<(), String> {
        let journal = self.hub.journal();
        let pos = s.position();
        if pos.failback {
            let cursor = self.failback(s)?;
            return self.ship(s, cursor);
        }
        if let Some(cursor) = self.sibling(s)? {
            return self.ship(s, cursor);
        }
        let resume = {
            let mut st = self.link.lock();
            st.released = false;
            match st.map.mode() {
                Mode::Ordered { acked_below } if pos.durable_next < acked_below.0 => {
                    // The target lost what it had acked (a new machine, a wiped --state).
                    tracing::warn!("target {} holds less than it acked: a full resync follows", self.link.url);
                    st.map.require_full_resync();
                    st.map.fall_back();
                    None
                }
                Mode::Ordered { .. } if !st.map.needs_resync() => {
                    if pos.durable_next > 0 {
                        st.map.ack(Lsn(pos.durable_next - 1));
                    }
                    Some(Lsn(pos.durable_next))
                }
                _ => None,
            }
        };
        let cursor = match resume.map(|l| journal.cursor_at(l)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                self.hub.fall_back(&self.link, &format!("ordered shipping cannot resume: {e}"));
                self.resync(s)?
            }
            None => self.resync(s)?,
        };
        self.ship(s, cursor)
    }

    /// 000:13: sends the current contents of every marked location, staged at the target,
    /// then ordered shipping resumes at the plan's LSN.
    fn resync(&self, s: &mut dyn Session) -> Result<LogCursor, String> {
        let journal = self.hub.journal();
        let plan = {
            let mut st = self.link.lock();
            // Every transaction below this has ended: its effects are in what we read.
            let resume = journal.settled().settled_below;
            let plan = st.map.resync_plan(resume);
            st.state = if plan.full { LinkState::InitialSync } else { LinkState::Resyncing };
            plan
        };
        tracing::info!(
            "target {}: resync {} ({}, {} files, {} blocks), then ordered from {}",
            self.link.url,
            plan.id.0,
            if plan.full { "full" } else { "marked locations" },
            plan.files.len(),
            plan.block_count(),
            plan.resume_from.0
        );
        tracing::trace!("target {}: resync {} at {:?}: {:?}", self.link.url, plan.id.0, s.position(), plan.files);
        s.send(&Frame::Control(ControlMsg::ResyncBegin {
            plan: plan.id.0,
            resume_lsn: plan.resume_from.0,
            full: plan.full,
        }))?;
        self.send_plan(s, &plan)?;
        // Every change the read saw was journaled first (write-ahead): its record lies below
        // this LSN. Until the target's log is applied up to here, its directory shows a mix.
        let read_end = journal.next_lsn();
        self.await_mirror(s, read_end)?;
        if s.minor() >= MINOR_RESYNC_READ {
            s.send(&Frame::Control(ControlMsg::ResyncRead { plan: plan.id.0, read_end_lsn: read_end.0 }))?;
        }
        s.send(&Frame::Control(ControlMsg::ResyncEnd { plan: plan.id.0 }))?;
        self.await_resync_done(s, plan.id.0)?;
        {
            let mut st = self.link.lock();
            st.map.resync_done(plan.id).map_err(|e| e.to_string())?;
        }
        if let Err(e) = self.hub.persist_link(&self.link) {
            tracing::error!("{e}");
        }
        journal.cursor_at(plan.resume_from).map_err(|e| format!("after the resync: {e}"))
    }

    /// A target new to this primary that was leveled with it at the failover that promoted it
    /// (design §5, "Several targets"; `ferryfs failover` with several `--target`s): same
    /// epoch, its log ending exactly at the promotion's fork. Its history is ours up to
    /// there, so it follows without a full copy: ordered from the fork when the journal still
    /// holds it, else a resync of the locations changed since the promotion (the
    /// since-promotion map). `None` when the target is no such sibling.
    fn sibling(&self, s: &mut dyn Session) -> Result<Option<LogCursor>, String> {
        let pos = s.position();
        let journal = self.hub.journal();
        let Some((fork, _)) = self.hub.since_promotion() else { return Ok(None) };
        // Its log ends at the fork; what it has not applied yet (a restart resets that to its
        // checkpoint) it applies once our first `Settled` covers it, as any target does.
        let leveled = pos.epoch == journal.epoch() && pos.next_lsn == fork;
        if !leveled || !self.link.lock().map.full_resync_owed() {
            return Ok(None);
        }
        let ordered = journal.cursor_at(Lsn(fork));
        {
            let mut st = self.link.lock();
            // Under this link's lock, so that no write's marks fall between the maps: what it
            // marked here already (the old map) or in the since-promotion map is in the new
            // one; what it marks after goes to the new one.
            let since = self.hub.since_promotion().map(|(_, m)| m).unwrap_or_default();
            let now = Lsn(journal.next_lsn().0.saturating_sub(1).max(fork));
            let mut map = crate::syncmap::SyncMap::new_in_sync(Lsn(fork)).with_limits(st.map.limits());
            if ordered.is_err() {
                map.fall_back();
            }
            // Tagged with the newest LSN: cleared only once the target holds everything up to now.
            map.mark_locations_of(&since, now);
            map.mark_locations_of(&st.map, now);
            let how = if ordered.is_ok() {
                "in order from there".to_string()
            } else {
                format!("after a resync of the {} blocks changed since", map.dirty_blocks())
            };
            eprintln!(
                "ferryfs: target {} was leveled with this node when it was promoted (epoch {}, LSN {fork}): it \
                 follows {how}, without a full copy",
                self.link.url, pos.epoch
            );
            st.map = map;
        }
        if let Err(e) = self.hub.persist_link(&self.link) {
            tracing::error!("{e}");
        }
        match ordered {
            Ok(c) => Ok(Some(c)),
            Err(_) => self.resync(s).map(Some),
        }
    }

    /// Failback (design §5): the target is this set's old primary, its history forked from
    /// ours at the promotion that made us primary. It is resynchronized from the locations
    /// either side changed since the fork — its own changes (it sends them as a `DirtyMap`
    /// when told the fork) and ours (the since-promotion map the hub keeps) — never a full
    /// copy, unless one side's changes cannot be known.
    fn failback(&self, s: &mut dyn Session) -> Result<LogCursor, String> {
        let ours = self.hub.since_promotion();
        let Some((fork, since)) = ours else {
            tracing::warn!(
                "target {} is an old primary failing back, but this primary's journal holds no record of the promotion that made it (or its since-promotion map): a full resync follows",
                self.link.url
            );
            let mut st = self.link.lock();
            st.map.require_full_resync();
            st.map.fall_back();
            drop(st);
            return self.resync(s);
        };
        s.send(&Frame::Control(ControlMsg::ForkPoint { fork_lsn: fork }))?;
        let mut bytes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if self.stop.load(Ordering::Acquire) || Instant::now() > deadline {
                return Err("stopping, or no complete DirtyMap from the failing-back target".into());
            }
            match s.event(Duration::from_millis(200)) {
                Some(Event::DirtyMap(chunk, last)) => {
                    bytes.extend_from_slice(&chunk);
                    if last {
                        break;
                    }
                }
                Some(Event::Closed(why)) => return Err(why),
                _ => {}
            }
        }
        let theirs = crate::syncmap::SyncMap::decode(&bytes)
            .map_err(|e| format!("the failing-back target's map of its own changes does not decode: {e}"))?;
        {
            let mut st = self.link.lock();
            let mut map = crate::syncmap::SyncMap::new_in_sync(Lsn(fork)).with_limits(st.map.limits());
            map.fall_back();
            map.mark_all_of(&since, Lsn(fork));
            map.mark_all_of(&theirs, Lsn(fork));
            // What writes marked here since `since` was taken (they may not be in it yet).
            map.mark_locations_of(&st.map, Lsn(fork));
            tracing::info!(
                "target {}: failback from fork LSN {fork}: {} blocks changed there, {} here, {} to send",
                self.link.url,
                theirs.dirty_blocks(),
                since.dirty_blocks(),
                map.dirty_blocks()
            );
            st.map = map;
        }
        self.resync(s)
    }

    /// Before a resync ends (design §3, "A resync's read end"): waits until the bunker, if
    /// any, holds every record below `read_end`, so a failover after the primary's loss can
    /// always bring the target past the mix the resync leaves until then. Gives up after
    /// `MIRROR_WAIT_MAX` (the bunker away): the target then knows its directory is mixed
    /// until `read_end` (`ResyncRead`), and a failover says so instead of promoting a mix.
    fn await_mirror(&self, s: &mut dyn Session, read_end: Lsn) -> Result<(), String> {
        let journal = self.hub.journal();
        let (started, mut last_beat) = (Instant::now(), Instant::now());
        while !journal.mirror_holds(read_end) {
            if self.stop.load(Ordering::Acquire) {
                return Err("stopping".into());
            }
            if started.elapsed() > MIRROR_WAIT_MAX {
                tracing::warn!(
                    "target {}: the resync read the tree up to LSN {}, and the bunker has not acknowledged the records up to there within {MIRROR_WAIT_MAX:?}; the resync ends anyway (until the target applies them, a failover from the bunker would have to be forced)",
                    self.link.url,
                    read_end.0
                );
                return Ok(());
            }
            if let Some(Event::Closed(why)) = s.event(Duration::from_millis(20)) {
                return Err(why);
            }
            if last_beat.elapsed() >= self.timing.heartbeat_every {
                s.send(&Frame::Heartbeat)?;
                last_beat = Instant::now();
            }
        }
        Ok(())
    }

    fn await_resync_done(&self, s: &mut dyn Session, plan: u64) -> Result<(), String> {
        let mut last_beat = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Err("stopping".into());
            }
            match s.event(Duration::from_millis(200)) {
                Some(Event::ResyncDone(p)) if p == plan => return Ok(()),
                Some(Event::Closed(why)) => return Err(why),
                _ => {}
            }
            if last_beat.elapsed() >= self.timing.heartbeat_every {
                s.send(&Frame::Heartbeat)?;
                last_beat = Instant::now();
            }
        }
    }

    fn send_plan(&self, s: &mut dyn Session, plan: &ResyncPlan) -> Result<(), String> {
        let src = self.source.as_ref();
        let (dirs, files, others) = if plan.full { self.walk_all()? } else { self.plan_objects(plan)? };
        for dir in &dirs {
            self.send_entries(s, *dir)?;
        }
        for (id, ranges) in &files {
            self.send_data(s, *id, ranges)?;
        }
        // The root always: emptying the target's stash at the end changes its mtime.
        let root = (!dirs.contains(&FileId::ROOT)).then_some(FileId::ROOT);
        for id in dirs.iter().chain(files.iter().map(|(id, _)| id)).chain(others.iter()).chain(root.iter()) {
            match src.describe(*id) {
                Ok(node) => {
                    self.count_resync(64 + node.xattrs.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>());
                    s.send(&Frame::Control(ControlMsg::ResyncNode { node }))?
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(format!("reading file {id} for the resync: {e}")),
            }
        }
        Ok(())
    }

    /// A full sync: every directory (parents first), every file (whole), every other object.
    #[allow(clippy::type_complexity)]
    fn walk_all(&self) -> Result<(Vec<FileId>, Vec<(FileId, Vec<(u64, u64)>)>, Vec<FileId>), String> {
        let mut dirs = vec![FileId::ROOT];
        let mut files = Vec::new();
        let mut others = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut i = 0;
        while i < dirs.len() {
            let entries = match self.source.entries(dirs[i]) {
                Ok(e) => e,
                Err(e) if gone(&e) => Vec::new(),
                Err(e) => return Err(format!("listing directory {} for the initial sync: {e}", dirs[i])),
            };
            for (_, d) in entries {
                if !seen.insert(d.id) {
                    continue; // a hard link seen before
                }
                match NodeKind::from_u8(d.kind) {
                    Some(NodeKind::Dir) => dirs.push(FileId(d.id)),
                    Some(NodeKind::File) => files.push((FileId(d.id), vec![(0, u64::MAX)])),
                    _ => others.push(FileId(d.id)),
                }
            }
            i += 1;
        }
        Ok((dirs, files, others))
    }

    /// The plan's objects: directories whose entries changed, files with marked blocks (byte
    /// ranges), and objects whose attributes changed.
    #[allow(clippy::type_complexity)]
    fn plan_objects(
        &self,
        plan: &ResyncPlan,
    ) -> Result<(Vec<FileId>, Vec<(FileId, Vec<(u64, u64)>)>, Vec<FileId>), String> {
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        let mut others = Vec::new();
        for f in &plan.files {
            if f.entries {
                dirs.push(f.file);
            }
            if !f.blocks.is_empty() {
                files.push((f.file, f.blocks.iter().map(|b| (b.byte_offset(), b.byte_len())).collect()));
            }
            if f.attr && !f.entries && f.blocks.is_empty() {
                others.push(f.file);
            }
        }
        Ok((dirs, files, others))
    }

    fn send_entries(&self, s: &mut dyn Session, dir: FileId) -> Result<(), String> {
        let entries = match self.source.entries(dir) {
            Ok(e) => e,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(format!("listing directory {dir} for the resync: {e}")),
        };
        let mut chunks: Vec<Vec<(Vec<u8>, NodeDesc)>> =
            entries.chunks(ENTRIES_PER_MESSAGE).map(|c| c.to_vec()).collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let n = chunks.len();
        for (i, entries) in chunks.into_iter().enumerate() {
            self.count_resync(entries.iter().map(|(n, d)| n.len() + 48 + d.target.len()).sum());
            s.send(&Frame::Control(ControlMsg::ResyncEntries { dir: dir.0, entries, last: i + 1 == n }))?;
        }
        Ok(())
    }

    /// The current contents of `ranges` of file `id`, clipped to its size now.
    fn send_data(&self, s: &mut dyn Session, id: FileId, ranges: &[(u64, u64)]) -> Result<(), String> {
        let mut buf = vec![0u8; RESYNC_CHUNK];
        for &(offset, len) in ranges {
            let end = offset.saturating_add(len);
            let mut at = offset;
            while at < end {
                let want = ((end - at) as usize).min(RESYNC_CHUNK);
                let n = match self.source.read(id, at, &mut buf[..want]) {
                    Ok(n) => n,
                    Err(e) if gone(&e) => return Ok(()),
                    Err(e) => return Err(format!("reading file {id} at {at} for the resync: {e}")),
                };
                if n == 0 {
                    break;
                }
                self.count_resync(n + 16);
                s.send(&Frame::Data { file: id.0, offset: at, data: buf[..n].to_vec() })?;
                at += n as u64;
            }
        }
        Ok(())
    }

    fn count_resync(&self, n: usize) {
        let mut st = self.link.lock();
        st.bytes_resync += n as u64;
        st.bytes_sent += n as u64;
    }

    /// Ordered shipping from `cur` until an error or stop.
    fn ship(&self, s: &mut dyn Session, mut cur: LogCursor) -> Result<(), String> {
        let journal = self.hub.journal().clone();
        let mut window: VecDeque<(Lsn, usize)> = VecDeque::new();
        let mut inflight = 0usize;
        let mut batch = Vec::with_capacity(BATCH_BYTES + (2 << 20));
        let mut last_sync = Instant::now();
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut last_settled = None;
        let mut observed: VecDeque<crate::journal::Settled> = VecDeque::new();
        let mut watermark = Watermark::new(s.minor(), self.timing.watermark_every, self.timing.watermark_refresh);
        self.link.lock().sent_below = cur.next;
        loop {
            if self.stop.load(Ordering::Acquire) {
                let _ = s.send(&Frame::Control(ControlMsg::Bye { reason: "the primary is stopping".into() }));
                return Ok(());
            }
            if self.link.lock().released {
                return Err("the journal overflowed while this target lagged: resynchronizing from the sync map".into());
            }
            // Acks and other news from the target.
            while let Some(ev) = s.event(Duration::ZERO) {
                last_heard = Instant::now();
                match ev {
                    Event::Ack(l) => {
                        while window.front().is_some_and(|(last, _)| *last <= l) {
                            inflight -= window.pop_front().unwrap().1;
                        }
                        self.link.lock().map.ack(l);
                    }
                    Event::TargetLog { start, next } => self.link.lock().target_log = Some((start, next)),
                    Event::Closed(why) => return Err(why),
                    _ => {}
                }
            }
            if last_heard.elapsed() > self.timing.silence_max {
                return Err(format!("the target was silent for {:?}", self.timing.silence_max));
            }
            let settled = journal.settled();
            let mut durable = journal.durable_lsn();
            if durable < settled.settled_below
                && cur.next < settled.settled_below
                && last_sync.elapsed() >= self.timing.sync_every
            {
                durable = journal.sync().map_err(|e| e.to_string())?;
                last_sync = Instant::now();
            }
            let limit = durable.min(settled.settled_below);
            let mut idle = true;
            if cur.next < limit && inflight < WINDOW_BYTES {
                batch.clear();
                match journal.read_records(&mut cur, limit, BATCH_BYTES, &mut batch) {
                    Ok(_) => {}
                    Err(CursorError::Gone(l)) => {
                        self.hub.fall_back(&self.link, &format!("record {} left the journal before it was sent", l.0));
                        return Err(format!("record {} left the journal before it was sent: resynchronizing", l.0));
                    }
                    Err(e) => return Err(e.to_string()),
                }
                s.send_records(&batch)?;
                window.push_back((Lsn(cur.next.0 - 1), batch.len()));
                inflight += batch.len();
                let mut st = self.link.lock();
                st.sent_below = cur.next;
                st.bytes_sent += batch.len() as u64 + 16;
                idle = false;
                last_sent = Instant::now();
            }
            // Only a notice whose records are all sent is useful to the target: it applies
            // below `settled_below` once it holds everything below `records_below`. Sending
            // newer ones would let a target whose log filled up wait for records it has no
            // room for (found by the benchmark: a 1 GiB burst into a 256 MiB target log).
            if observed.back() != Some(&settled) && observed.len() < SETTLED_OBSERVED_MAX {
                observed.push_back(settled);
            }
            let mut usable = None;
            while observed.front().is_some_and(|o| o.records_below <= cur.next) {
                usable = observed.pop_front();
            }
            if let Some(u) = usable
                && last_settled != Some(u)
            {
                s.send(&Frame::Control(ControlMsg::Settled {
                    settled_below: u.settled_below.0,
                    records_below: u.records_below.0,
                }))?;
                last_settled = Some(u);
            }
            if let Some(w) = watermark.due(self.hub.all_acked_below()) {
                s.send(&Frame::Control(ControlMsg::Watermark { all_acked_lsn: w }))?;
                last_sent = Instant::now();
            }
            self.update_state(&journal, &cur);
            if last_sent.elapsed() >= self.timing.heartbeat_every {
                s.send(&Frame::Heartbeat)?;
                last_sent = Instant::now();
            }
            if idle {
                let st = self.link.lock();
                let _ = self.link.wake.wait_timeout(st, self.timing.idle_wait).unwrap();
            }
        }
    }

    fn update_state(&self, journal: &crate::journal::Journal<S>, cur: &LogCursor) {
        let next = journal.next_lsn();
        let mut st = self.link.lock();
        let caught_up =
            matches!(st.map.mode(), Mode::Ordered { acked_below } if acked_below >= next) && cur.next >= next;
        st.state = if caught_up { LinkState::InSync } else { LinkState::Connected };
        if caught_up {
            st.last_error = None;
        }
    }
}

/// When the all-acked watermark goes to a target (claims 002:1, 9): when it moved, at most
/// every `WATERMARK_EVERY` (`Timing::watermark_every`), only to a target that speaks 1.3 (an
/// older one would refuse the message). A small control frame between record batches: it
/// never holds shipping up.
struct Watermark {
    enabled: bool,
    sent: Option<Lsn>,
    at: Option<Instant>,
    every: Duration,
    refresh: Duration,
}

impl Watermark {
    fn new(minor: u16, every: Duration, refresh: Duration) -> Watermark {
        Watermark { enabled: minor >= MINOR_WATERMARK, sent: None, at: None, every, refresh }
    }

    /// The `all_acked_lsn` to send now, if any (`below` is the hub's all-acked LSN). An
    /// unchanged one goes again every `WATERMARK_REFRESH`: the target's `LogInfo` answer keeps
    /// the status of its log fresh (its checkpoints move the log's start in between).
    fn due(&mut self, below: Option<Lsn>) -> Option<u64> {
        let since = self.at.map(|t| t.elapsed());
        let moved = since.is_none_or(|t| t >= self.every) && below.is_some_and(|b| self.sent.is_none_or(|s| b > s));
        let refresh = since.is_some_and(|t| t >= self.refresh);
        let below = below.filter(|b| self.enabled && b.0 > 1 && (moved || refresh))?;
        let below = self.sent.map_or(below, |s| below.max(s));
        self.sent = Some(below);
        self.at = Some(Instant::now());
        Some(below.0 - 1)
    }
}

fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_goes_when_it_moves_at_most_every_100_ms_and_again_every_second() {
        let mut w = Watermark::new(MINOR_WATERMARK, WATERMARK_EVERY, WATERMARK_REFRESH);
        assert_eq!(w.due(None), None, "no target holds it");
        assert_eq!(w.due(Some(Lsn(1))), None, "nothing acked yet");
        assert_eq!(w.due(Some(Lsn(10))), Some(9));
        assert_eq!(w.due(Some(Lsn(20))), None, "too soon");
        std::thread::sleep(WATERMARK_EVERY);
        assert_eq!(w.due(Some(Lsn(20))), Some(19));
        std::thread::sleep(WATERMARK_EVERY);
        assert_eq!(w.due(Some(Lsn(20))), None, "unchanged");
        // A lower one (a target that came back) never takes it back.
        w.at = Some(Instant::now() - WATERMARK_REFRESH);
        assert_eq!(w.due(Some(Lsn(15))), Some(19), "refreshed, not lowered");
        // An older target gets none.
        assert_eq!(Watermark::new(MINOR_WATERMARK - 1, WATERMARK_EVERY, WATERMARK_REFRESH).due(Some(Lsn(10))), None);
    }
}
