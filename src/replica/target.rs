//! A mirror target's core: its own copy of the primary's log, the in-order apply of settled
//! transactions to `--dir`, and staged resyncs. No network here: `net::target` drives it.
//!
//! ```text
//!  Records ──append_raw + sync──> log (primary's LSNs, byte for byte) ──ack──> primary
//!  Settled{H, E} ─> once the log holds every record below E, apply records below H in order
//!  Resync items ──> staging file ──(complete)──> apply log, apply staging, restart log at L
//! ```
//!
//! **Ack = durable in the log** (design §5). Applying is separate and idempotent (the applier
//! identifies objects by tag), so after a crash the target re-applies from its last checkpoint
//! and converges. The log's space is freed only below what was applied and synced: the
//! journal's retention floor is the apply position.
//!
//! **Settled.** The primary's log interleaves transactions; an op's intent may precede its
//! outcome by other records. The primary says which prefix is settled (every transaction
//! with an id below H has ended and all its records lie below E); the target applies records
//! below H once it holds every record below E, so it knows every abort among them.
//!
//! **Resync** (000:13). The items are staged in `resync-staging` and only applied once the
//! whole resync has arrived; a crash during the apply is finished at the next start
//! (`resync-pending` says so). Before the staged items, the target applies every record its
//! log holds, outcome known or not: a transaction whose outcome it lacks has its locations
//! still marked at the primary (its outcome record was never acked), so the resync sends
//! them as they are and overrides whatever the guess did.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::apply::{Applied, Applier, ApplyError};
use super::blocks;
pub use super::frames::FrameHandler;
use super::staged::StagedApply;
pub use super::staged::StagedItem;
use crate::format::ids::IdSnapshot;
use crate::format::ops::Op;
use crate::format::record::{self, HEADER_SIZE, Kind};
use crate::format::superblock::Superblock;
use crate::io::{Storage, Tree};
use crate::journal::{self, Journal, JournalError, JournalGeometry, LogCursor, Retention, Settled};
use crate::proto::wire::control::ControlMsg;
use crate::types::{FileId, Lsn};

pub const IDS_FILE: &str = "ids";
/// In the log's directory once a failover promoted this target (docs/FORMAT.md): the new
/// epoch and the fork LSN. The log directory then serves as the new primary's journal.
pub const PROMOTION_FILE: &str = "promotion";
const PROMOTION_MAGIC: [u8; 8] = *b"FRYPROM1";
/// The failover's landing area for one block of records (claim 003:9).
const FAILOVER_STAGING_FILE: &str = "failover-staging";
/// In `--state` while this target is an old primary failing back (`ferryfs failback`): it
/// holds the old journal's directory, where its changes past the fork are read from.
pub const FAILBACK_FILE: &str = "failback";
const STAGING_FILE: &str = "resync-staging";
pub(super) const PENDING_FILE: &str = "resync-pending";
/// After a resync is staged: the LSN its read of the primary's tree ended at (text, one
/// decimal number and a newline). The directory shows a mix of states until the log holds
/// every record below it (docs/FORMAT.md, "Target state").
pub const MIXED_FILE: &str = "resync-mixed-until";
/// Records applied per step before the lock is let go.
const APPLY_BATCH_BYTES: usize = 4 << 20;

/// Where a target stands, as it reports it to the primary (`ControlMsg::Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetPosition {
    /// The next LSN its log expects.
    pub next_lsn: u64,
    /// Every record below this is durable in its log.
    pub durable_next: u64,
    /// Every record below this is applied to its directory.
    pub applied_next: u64,
    /// The replication epoch of its log.
    pub epoch: u64,
    /// An old primary waiting to fail back (`ferryfs failback`): it sends its own changes
    /// past the fork when asked (`ForkPoint`).
    pub failback: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Protocol(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TargetError {
    let what = what.into();
    move |source| TargetError::Io { what, source }
}

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub records_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub resync_bytes_received: AtomicU64,
    pub records_applied: AtomicU64,
    pub skipped: AtomicU64,
    pub resyncs: AtomicU64,
}

/// The log's hold for the all-acked watermark (see `LogFloor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatermarkHold {
    /// Records from this LSN on are kept; 0 when no watermark is followed.
    pub keep_from: u64,
    /// Times a full log let go of records the watermark still held.
    pub overflows: u64,
}

struct ApplyState {
    cursor: LogCursor,
    /// Settled notices not yet usable (the log does not yet hold their `records_below`).
    settled: VecDeque<Settled>,
    /// Usable limit: every record below it may be applied.
    limit: Lsn,
    /// Aborted transactions at or past the cursor.
    aborted: BTreeSet<u64>,
    /// Ops applied whose commit is still to come: the objects it gives the commit's time.
    awaiting_commit: std::collections::BTreeMap<u64, Vec<FileId>>,
    /// The LSN of the last namespace op applied, as the target directory's own applied marker
    /// records it (`Tree::applied_marker`, as on the primary). After a crash the target
    /// re-applies from its checkpoint; namespace ops up to the marker are in the tree and are
    /// not redone (their checks would judge them against a tree later ops changed). Writes
    /// and attribute changes are idempotent and are redone.
    marker: u64,
    /// A failover or catch-up tool told every abort among the records below this LSN
    /// (`known_outcomes`): records below it (and held) may be applied by the failover rule
    /// while the rest still comes, as `ApplyLog` and `Promote` would at the end. 0: none.
    outcomes_below: Lsn,
}

struct Staging {
    plan: u64,
    resume: u64,
    /// The primary's read end (`ResyncRead`), once told.
    read_end: Option<u64>,
    out: BufWriter<File>,
}

pub struct TargetCore<S: Storage, T: Tree> {
    journal: Arc<Journal<S>>,
    applier: Arc<Mutex<Applier<T>>>,
    apply: Mutex<ApplyState>,
    applied_next: Arc<AtomicU64>,
    staging: Mutex<Option<Staging>>,
    /// The failover block being landed, as read back from `FAILOVER_STAGING_FILE`.
    failover_block: Mutex<Vec<u8>>,
    state_dir: PathBuf,
    pub counters: TargetCounters,
    /// An old primary failing back: the locations it changed from a fork LSN on.
    failback_source: Mutex<Option<FailbackSource>>,
    checkpoint_lock: Mutex<()>,
    /// A staged resync's read end (`MIXED_FILE`); 0 when none is outstanding.
    mixed_until: AtomicU64,
    /// `LogFloor::hold` and its overflow count.
    hold: Arc<AtomicU64>,
    hold_overflows: Arc<AtomicU64>,
}

/// Computes an old primary's own changes from a fork LSN on (`ferryfs failback`).
pub type FailbackSource = Box<dyn Fn(u64) -> Result<crate::syncmap::SyncMap, String> + Send>;

/// What the log may free (claims 002:2–4): only what is applied (and synced by the checkpoint
/// hook), and, while the primary sends the all-acked watermark, only what every target holds,
/// so a lagging peer can be caught up from this log after the primary's loss (`ferryfs
/// catchup`).
struct LogFloor {
    applied: Arc<AtomicU64>,
    /// Keep every record from this LSN on; 0: no watermark is followed (free what is applied).
    hold: Arc<AtomicU64>,
    overflows: Arc<AtomicU64>,
}

impl Retention for LogFloor {
    fn floor(&self) -> Option<Lsn> {
        let applied = self.applied.load(Ordering::Acquire);
        let hold = self.hold.load(Ordering::Acquire);
        Some(Lsn(if hold == 0 { applied } else { applied.min(hold) }))
    }

    /// The log is full of records some target may still lack: they go (a writer never waits
    /// for a peer), and a catch-up of that peer from here will need blocks instead.
    fn release(&self) {
        if self.hold.swap(0, Ordering::AcqRel) != 0 {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "the target's log is full of records below the all-acked watermark's reach: freeing what is \
                 applied; a peer lagging behind them can only be caught up from blocks (--log-size is too small \
                 for the lag between the targets)"
            );
        }
    }
}

impl<S: Storage, T: Tree> TargetCore<S, T> {
    /// Creates the log for replication set `set_id` (a target's first primary).
    pub fn create(
        storage: S,
        geometry: JournalGeometry,
        set_id: [u8; 16],
        tree: T,
        state_dir: &Path,
    ) -> Result<Self, TargetError> {
        let sb = Superblock::new(set_id, 0, 0, Vec::new(), [0; 16]);
        let journal = Journal::create(storage, geometry, sb)?;
        Self::assemble(journal, IdSnapshot::default(), tree, state_dir)
    }

    /// Opens an existing log: finds its end, keeps every record after the last checkpoint for
    /// re-apply, and finishes a resync that a crash interrupted.
    pub fn open(storage: S, tree: T, state_dir: &Path) -> Result<Self, TargetError> {
        let sb = journal::read_superblock(&storage)?;
        let end = journal::replay::find_end(&storage, &sb)?;
        let ids = match storage.read_file(IDS_FILE).map_err(io_err("reading the target's id table"))? {
            Some(b) => IdSnapshot::decode(&b)
                .map_err(|e| TargetError::Protocol(format!("the target's id table `{IDS_FILE}` is damaged: {e}")))?,
            None => IdSnapshot::default(),
        };
        let journal = Journal::open(storage, sb, end.pos, end.next_lsn)?;
        let core = Self::assemble(journal, ids, tree, state_dir)?;
        core.rescan_aborts()?;
        if core.state_dir.join(PENDING_FILE).exists() {
            tracing::warn!("a resync was received completely but not yet applied: applying it now");
            core.apply_staged()?;
        }
        Ok(core)
    }

    fn assemble(journal: Journal<S>, ids: IdSnapshot, tree: T, state_dir: &Path) -> Result<Self, TargetError> {
        let sb = journal.superblock();
        let marker = tree.applied_marker(&sb.set_id).map_err(io_err("reading the applied marker"))?;
        let applier = Arc::new(Mutex::new(Applier::new(tree, sb.set_id, ids)));
        let applied_next = Arc::new(AtomicU64::new(sb.start_lsn.0));
        // Until a primary says otherwise, everything held is kept: after the primary's loss
        // this log may be what a lagging peer is caught up from.
        let hold = Arc::new(AtomicU64::new(sb.start_lsn.0.max(1)));
        let hold_overflows = Arc::new(AtomicU64::new(0));
        journal.set_retention(Arc::new(LogFloor {
            applied: applied_next.clone(),
            hold: hold.clone(),
            overflows: hold_overflows.clone(),
        }));
        let a = applier.clone();
        let storage_ids = move || -> io::Result<FileId> {
            let a = a.lock().unwrap();
            a.tree().sync_all()?;
            Ok(a.snapshot().next_file_id)
        };
        journal.set_checkpoint_hook(Box::new(storage_ids));
        let cursor = LogCursor {
            pos: crate::journal::Position { seq: sb.start_seq, offset: sb.start_offset },
            next: sb.start_lsn,
        };
        let mixed_until = read_mixed_until(state_dir)?;
        Ok(TargetCore {
            journal: Arc::new(journal),
            applier,
            apply: Mutex::new(ApplyState {
                cursor,
                settled: VecDeque::new(),
                limit: sb.start_lsn,
                aborted: BTreeSet::new(),
                awaiting_commit: Default::default(),
                marker,
                outcomes_below: Lsn(0),
            }),
            applied_next,
            staging: Mutex::new(None),
            failover_block: Mutex::new(Vec::new()),
            state_dir: state_dir.to_path_buf(),
            counters: TargetCounters::default(),
            failback_source: Mutex::new(None),
            checkpoint_lock: Mutex::new(()),
            mixed_until: AtomicU64::new(mixed_until),
            hold,
            hold_overflows,
        })
    }

    pub fn set_id(&self) -> [u8; 16] {
        self.journal.superblock().set_id
    }

    pub fn journal(&self) -> &Journal<S> {
        &self.journal
    }

    /// The Status message a target opens each connection with. Records appended but not yet
    /// durable (a frame cut off by an error, e.g. a full log) are made durable first: the
    /// primary resumes at the durable end, and the log continues only at its next LSN (found
    /// by the log-bound test under load: the primary resent from the durable end, the log
    /// refused it as out of order, for ever).
    pub fn status_msg(&self) -> ControlMsg {
        self.settle_log();
        let p = self.position();
        ControlMsg::Status {
            next_lsn: p.next_lsn,
            durable_lsn: p.durable_next.saturating_sub(1),
            applied_lsn: p.applied_next.saturating_sub(1),
        }
    }

    /// Makes every record appended so far durable, so that the durable end a new session
    /// reports is the log's end (see `status_msg`).
    pub fn settle_log(&self) {
        if let Err(e) = self.journal.sync() {
            tracing::error!("syncing the target's log before reporting where it stands: {e}");
        }
    }

    pub fn position(&self) -> TargetPosition {
        TargetPosition {
            next_lsn: self.journal.next_lsn().0,
            durable_next: self.journal.durable_lsn().0,
            applied_next: self.applied_next.load(Ordering::Acquire),
            epoch: self.journal.epoch(),
            failback: self.failback_pending(),
        }
    }

    /// Appends a Records frame's body to the log and makes it durable; returns the LSN to ack
    /// (every record up to it is durable here).
    pub fn receive(&self, body: &[u8]) -> Result<Lsn, TargetError> {
        self.append(body)?;
        self.sync_log()
    }

    /// Checks a Records frame's body and appends it to the log, not yet durable; returns the
    /// last LSN appended.
    fn append(&self, body: &[u8]) -> Result<Lsn, TargetError> {
        check_frame(body, self.journal.next_lsn(), &self.set_id())?;
        // Known before the records are: the apply thread may go past them as soon as they
        // are appended, and must not apply an aborted transaction.
        self.apply.lock().unwrap().aborted.extend(aborts_in(body));
        let next = self.journal.append_raw(body)?;
        self.counters.bytes_received.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(Lsn(next.0 - 1))
    }

    /// Makes this target an old primary failing back: `source` gives its own changes past a
    /// fork, asked for by the new primary's `ForkPoint`.
    pub fn set_failback_source(&self, source: FailbackSource) {
        *self.failback_source.lock().unwrap() = Some(source);
    }

    /// Whether this target still waits for its failback resync.
    pub fn failback_pending(&self) -> bool {
        self.state_dir.join(FAILBACK_FILE).exists()
    }

    /// The `DirtyMap` messages for a new primary's `ForkPoint`: the locations this old
    /// primary changed from `fork_lsn` on, encoded, in pieces a control frame can carry.
    pub fn dirty_since(&self, fork_lsn: u64) -> Result<Vec<ControlMsg>, TargetError> {
        let g = self.failback_source.lock().unwrap();
        let source = g
            .as_ref()
            .ok_or_else(|| TargetError::Protocol("a ForkPoint came, but this target is not failing back".into()))?;
        let map = source(fork_lsn).map_err(TargetError::Protocol)?;
        let bytes = map.encode();
        const PIECE: usize = 128 << 10;
        let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(PIECE).collect() };
        let n = pieces.len();
        Ok(pieces
            .into_iter()
            .enumerate()
            .map(|(i, c)| ControlMsg::DirtyMap { chunk: c.to_vec(), last: i + 1 == n })
            .collect())
    }

    /// The replication epoch of this target's log (design §3).
    pub fn epoch(&self) -> u64 {
        self.journal.epoch()
    }

    /// The promotion a failover made of this target, if any.
    pub fn promotion(&self) -> Result<Option<Promotion>, TargetError> {
        read_promotion(self.journal.storage())
    }

    /// Where histories agree below (`Fenced`): the promotion's fork, else 0 (unknown).
    pub fn fork_lsn(&self) -> u64 {
        self.promotion().ok().flatten().map_or(0, |p| p.fork_lsn)
    }

    /// The `LogInfo` message: where this target's log stands.
    pub fn log_info(&self, primary_connected: bool) -> ControlMsg {
        let p = self.position();
        ControlMsg::LogInfo {
            epoch: self.epoch(),
            start_lsn: self.journal.superblock().start_lsn.0,
            next_lsn: p.next_lsn,
            applied_next: p.applied_next,
            primary_connected,
            promoted: self.promotion().ok().flatten().is_some(),
            failback: self.failback_pending(),
        }
    }

    /// Whether a primary of `epoch` may ship here: not below this log's epoch (a failover
    /// fenced or promoted it). The refusal is the `Fenced` message to send.
    pub fn admits(&self, epoch: u64) -> Result<(), ControlMsg> {
        if epoch < self.epoch() {
            return Err(ControlMsg::Fenced { epoch: self.epoch(), fork_lsn: self.fork_lsn() });
        }
        Ok(())
    }

    /// From now on refuse every primary below `epoch`; durable when it returns.
    pub fn fence(&self, epoch: u64) -> Result<(), TargetError> {
        if epoch > self.epoch() {
            self.journal.set_epoch(epoch)?;
        }
        Ok(())
    }

    /// A failover's block of records (claim 003:9): landed whole in the staging file, checked
    /// there (every record whole, crc good, this set, continuing the log), then appended to
    /// the log and made durable, then the staging is emptied. Returns the LSN to ack. A crash
    /// in between loses only the unacked block; the tool resends from the log's end.
    pub fn receive_failover_block(&self, body: &[u8]) -> Result<Lsn, TargetError> {
        self.stage_failover_block(body)?;
        self.sync_log()
    }

    /// The first half of `receive_failover_block`: stages the block, checks it and appends it
    /// to the log, not yet durable (`sync_log` makes it so). Returns the last LSN appended.
    /// A session pipelines the two: the next block lands while the last one is flushed.
    pub fn stage_failover_block(&self, body: &[u8]) -> Result<Lsn, TargetError> {
        use std::os::unix::fs::FileExt;
        let path = self.state_dir.join(FAILOVER_STAGING_FILE);
        // Overwritten in place, and read back into a buffer kept for the next block: fresh
        // pages are what a block costs most here (perf: the kernel's first touch of each page),
        // and these stay in memory from block to block.
        let mut staged = self.failover_block.lock().unwrap();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        f.write_all_at(body, 0)
            .and_then(|()| f.set_len(body.len() as u64))
            .map_err(io_err(format!("writing {}", path.display())))?;
        staged.resize(body.len(), 0);
        f.read_exact_at(&mut staged, 0).map_err(io_err(format!("reading {}", path.display())))?;
        // A crash from here on loses the block only if it is not durable yet, and then the
        // tool, never acked, sends it again. The staging file is never replayed.
        match self.append(&staged) {
            Err(TargetError::Journal(JournalError::Full(why))) if self.outcomes_known() => {
                // A log full of records not applied yet (after a restart): with every outcome
                // known they may be applied now, and the checkpoint frees their space.
                tracing::info!("the log is full ({why}): applying what it holds, then landing the block again");
                self.apply_available()?;
                self.checkpoint()?;
                // The records before the one that did not fit are in the log already.
                let next = self.journal.next_lsn();
                match records_from(&staged, next)? {
                    [] => Ok(Lsn(next.0 - 1)),
                    rest => self.append(rest),
                }
            }
            r => r,
        }
    }

    /// From a failover or catch-up tool, before it sends the records below `below`: the ids
    /// of every transaction among them that aborts (`txids`, in parts; `last` on the final
    /// one). The transactions of the records this log holds already are known here (their
    /// aborts are in this log). So every outcome below `below` is known, and the records
    /// below it are applied as they land, by the failover rule (a transaction without an
    /// outcome is redone), exactly as `ApplyLog` or `Promote` would apply them at the end:
    /// the apply keeps pace with the catch-up and frees the log for the records still to come.
    pub fn known_outcomes(&self, below: Lsn, txids: &[u64], last: bool) {
        let mut st = self.apply.lock().unwrap();
        let keep = st.cursor.next.0.saturating_sub(1 << 20);
        st.aborted.extend(txids.iter().copied().filter(|t| *t >= keep));
        if last {
            st.outcomes_below = st.outcomes_below.max(below);
        }
    }

    fn outcomes_known(&self) -> bool {
        self.apply.lock().unwrap().outcomes_below.0 > self.applied_next.load(Ordering::Acquire)
    }

    /// Makes every record appended so far durable; returns the last durable LSN (to ack).
    pub fn sync_log(&self) -> Result<Lsn, TargetError> {
        let next = self.journal.sync()?;
        Ok(Lsn(next.0 - 1))
    }

    /// The failover's last step (claims 003:8–9): the log holds every record below
    /// `end_lsn`; apply them all, a transaction without an outcome by the failover rule (it
    /// is redone, like the primary's own replay would; an op whose redo cannot be done is
    /// skipped), sync, and become the primary of `epoch`: the log's directory is then a
    /// journal for `ferryfs mount --backing <--dir> --journal <--state>/log`. Running it
    /// again with the same arguments changes nothing.
    pub fn promote(&self, epoch: u64, end_lsn: Lsn, backing: (u64, u64, Vec<u8>)) -> Result<Promotion, TargetError> {
        if let Some(p) = self.promotion()? {
            if p.epoch == epoch && p.fork_lsn == end_lsn.0 {
                return Ok(p);
            }
            if p.epoch >= epoch {
                return Err(TargetError::Protocol(format!(
                    "this target was already promoted at epoch {} (fork at LSN {}); refusing a promotion at epoch {epoch}",
                    p.epoch, p.fork_lsn
                )));
            }
        }
        let next = self.journal.next_lsn();
        if next != end_lsn {
            return Err(TargetError::Protocol(format!(
                "the failover ends at LSN {} but this target's log holds records up to {}: refusing to promote",
                end_lsn.0,
                next.0.saturating_sub(1)
            )));
        }
        self.apply_all(end_lsn)?;
        let mixed = self.mixed_until();
        if mixed > end_lsn.0 {
            tracing::warn!(
                "promoting with records below LSN {} although a resync left this directory mixed until LSN {mixed}: \
                 it may hold changes the promoted log does not (forced by the failover)",
                end_lsn.0
            );
        }
        self.checkpoint()?;
        let promotion = Promotion { epoch, fork_lsn: end_lsn.0 };
        self.journal
            .storage()
            .write_file_atomic(PROMOTION_FILE, &promotion.encode())
            .map_err(io_err("writing the promotion record"))?;
        // Whatever the resync left is what the new primary's history starts from.
        remove_if_present(&self.state_dir.join(MIXED_FILE)).map_err(io_err("removing resync-mixed-until"))?;
        self.mixed_until.store(0, Ordering::Release);
        let (dev, ino, path) = backing;
        self.journal.set_backing(dev, ino, path)?;
        self.fence(epoch)?;
        self.journal.close_clean()?;
        Ok(promotion)
    }

    /// Applies every record below `end_lsn` whatever the primary said was settled: a
    /// transaction without an outcome by the failover rule (module docs of
    /// `replica::failover`). For a promotion and a catch-up, after the primary's loss.
    fn apply_all(&self, end_lsn: Lsn) -> Result<(), TargetError> {
        let mut st = self.apply.lock().unwrap();
        st.settled.clear();
        st.limit = st.limit.max(end_lsn);
        self.apply_upto(&mut st, end_lsn)?;
        Ok(())
    }

    /// Catch-up (claims 002:5–6, `ferryfs catchup`): records `[from, end)` of this log, in
    /// blocks of about `max_bytes`, for a peer that lacks them. Returns where the block ended
    /// (`from` again when the log holds nothing from there: its end). Refused when the log no
    /// longer holds `from` (its start moved past it: the peer needs blocks instead).
    pub fn read_log(&self, from: Lsn, max_bytes: usize, out: &mut Vec<u8>) -> Result<Lsn, TargetError> {
        let end = Lsn(self.journal.durable_lsn().0.max(1)).min(self.journal.next_lsn());
        if from >= end {
            return Ok(from);
        }
        let mut cur = self.journal.cursor_at(from).map_err(|e| {
            TargetError::Protocol(format!(
                "this target's log no longer holds record {} (it starts at {}): {e}",
                from.0,
                self.journal.superblock().start_lsn.0
            ))
        })?;
        self.journal
            .read_records(&mut cur, end, max_bytes, out)
            .map_err(|e| TargetError::Protocol(format!("reading this target's log at {}: {e}", from.0)))?;
        Ok(cur.next)
    }

    /// Catch-up's last step on each target: its log holds every record below `end_lsn` (the
    /// most advanced target's end); apply them all, as a promotion does but without becoming
    /// a primary, and checkpoint. Then every target of the set shows the same tree.
    pub fn apply_log(&self, end_lsn: Lsn) -> Result<(), TargetError> {
        let next = self.journal.next_lsn();
        if next != end_lsn {
            return Err(TargetError::Protocol(format!(
                "the catch-up ends at LSN {} but this target's log holds records up to {}: refusing to apply",
                end_lsn.0,
                next.0.saturating_sub(1)
            )));
        }
        self.apply_all(end_lsn)?;
        self.checkpoint()
    }

    /// Block-level resync, the behind target's side (`replica::blocks`): the digest of every
    /// block of its directory, to `sink`. Returns (files, blocks).
    pub fn send_digests(&self, sink: blocks::Sink<'_>) -> Result<(u64, u64), TargetError> {
        let a = self.applier.lock().unwrap();
        blocks::send_digests(a.tree(), &self.set_id(), sink).map_err(TargetError::Protocol)
    }

    /// Block-level resync, the source's side (`replica::blocks`): this directory, the primary's
    /// journal applied below `resume`, as a resync of a peer whose digests are `theirs`. Refused
    /// unless every record below `resume`, and none past it, is applied here.
    pub fn send_block_resync(
        &self,
        theirs: &blocks::PeerDigests,
        plan: u64,
        resume: Lsn,
        sink: blocks::Sink<'_>,
    ) -> Result<blocks::BlockStats, TargetError> {
        let applied = self.applied_next.load(Ordering::Acquire);
        let next = self.journal.next_lsn();
        if applied != resume.0 || next != resume {
            return Err(TargetError::Protocol(format!(
                "a block-level resync from this target must show the journal applied below LSN {}, but it \
                 holds records below {} and applied below {applied} (run the catch-up's ApplyLog first)",
                resume.0, next.0
            )));
        }
        let a = self.applier.lock().unwrap();
        blocks::send_block_resync(a.tree(), &self.set_id(), theirs, plan, resume.0, sink).map_err(TargetError::Protocol)
    }

    /// Where applying stands, for diagnostics: cursor, usable limit, queued notices.
    pub fn apply_state(&self) -> String {
        let st = self.apply.lock().unwrap();
        format!("cursor {} limit {} marker {} notices {:?}", st.cursor.next.0, st.limit.0, st.marker, st.settled)
    }

    /// Takes a Settled notice from the primary.
    pub fn settled(&self, s: Settled) {
        let mut st = self.apply.lock().unwrap();
        if st.settled.back().is_none_or(|last| *last != s) {
            st.settled.push_back(s);
        }
    }

    /// Applies what is settled and held; returns how many records it went past.
    pub fn apply_available(&self) -> Result<u64, TargetError> {
        let next = self.journal.next_lsn();
        let mut st = self.apply.lock().unwrap();
        while let Some(s) = st.settled.front().copied() {
            if s.records_below > next {
                break;
            }
            st.limit = st.limit.max(s.settled_below);
            st.settled.pop_front();
        }
        st.limit = st.limit.max(st.outcomes_below.min(next));
        let limit = st.limit.min(next);
        self.apply_upto(&mut st, limit)
    }

    fn apply_upto(&self, st: &mut ApplyState, limit: Lsn) -> Result<u64, TargetError> {
        let mut done = 0;
        let mut buf = Vec::new();
        while st.cursor.next < limit {
            buf.clear();
            let mut cur = st.cursor;
            self.journal.read_records(&mut cur, limit, APPLY_BATCH_BYTES, &mut buf).map_err(|e| {
                TargetError::Protocol(format!("reading the target's own log at {}: {e}", st.cursor.next))
            })?;
            let mut at = 0;
            while at < buf.len() {
                let h = record::decode_header(&buf[at..], buf.len() - at)
                    .map_err(|e| TargetError::Protocol(format!("own log record: {e}")))?;
                let payload = &buf[at + HEADER_SIZE..at + HEADER_SIZE + h.payload_len as usize];
                if !st.aborted.contains(&h.txid.0) {
                    self.apply_record(st, &h, payload)?;
                }
                at += record::record_len(h.payload_len as usize);
                st.cursor.next = h.lsn.next();
                done += 1;
            }
            st.cursor = cur;
            let below = st.cursor.next.0;
            let keep = below.saturating_sub(1 << 20);
            st.aborted = st.aborted.split_off(&keep);
            st.awaiting_commit = st.awaiting_commit.split_off(&keep);
            self.applied_next.store(below, Ordering::Release);
        }
        self.counters.records_applied.fetch_add(done, Ordering::Relaxed);
        Ok(done)
    }

    fn apply_record(&self, st: &mut ApplyState, h: &record::Header, payload: &[u8]) -> Result<(), TargetError> {
        let mut a = self.applier.lock().unwrap();
        let r = match h.kind {
            Kind::Write => {
                let (file, offset, data) = record::decode_write(payload)
                    .map_err(|e| TargetError::Protocol(format!("a write record does not decode: {e}")))?;
                let r = a.apply_write(file, offset, data);
                if let Ok(Applied::Skipped(why)) = &r {
                    tracing::info!(
                        "lsn {}: write of {} bytes at {offset} of {file} skipped: {why}",
                        h.lsn.0,
                        data.len()
                    );
                }
                if matches!(r, Ok(Applied::Done)) {
                    // The primary gave the file this mtime (`Core::write`).
                    self.note(a.apply_op(&mtime_op(file, h.time_ns)))?;
                }
                r
            }
            Kind::Op => {
                let op = Op::decode(payload)
                    .map_err(|e| TargetError::Protocol(format!("an op record does not decode: {e}")))?;
                let namespace =
                    matches!(op, Op::Create { .. } | Op::Link { .. } | Op::Unlink { .. } | Op::Rename { .. });
                let r = if namespace && h.lsn.0 <= st.marker {
                    // In the tree already (see `ApplyState::marker`): judging it again against
                    // a tree that later ops changed could undo or double them.
                    Ok(Applied::Already)
                } else {
                    let r = a.apply_op(&op);
                    if let Ok(Applied::Skipped(why)) = &r
                        && why.contains("untagged")
                    {
                        // Only something made in --dir by hand (or by another program) is
                        // untagged: say which entry, since the mirror now differs there.
                        eprintln!(
                            "ferryfs target: warning: lsn {}: {}: {why}: an entry ferryfs did not make is in the way; it is \
                             left alone and the mirror differs there until it is removed and the target resynchronized",
                            h.lsn.0,
                            op.describe()
                        );
                    }
                    if namespace && r.is_ok() {
                        a.tree()
                            .set_applied_marker(&self.set_id(), h.lsn.0)
                            .map_err(|e| TargetError::Io { what: "recording the applied marker".into(), source: e })?;
                        st.marker = h.lsn.0;
                    }
                    r
                };
                tracing::trace!("apply lsn {} {op:?}: {:?}", h.lsn.0, r.as_ref().map(|a| format!("{a:?}")));
                st.awaiting_commit.insert(h.txid.0, op.mtime_ids());
                r
            }
            Kind::Commit => {
                for id in st.awaiting_commit.remove(&h.txid.0).unwrap_or_default() {
                    self.note(a.apply_op(&mtime_op(id, h.time_ns)))?;
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        self.note(r)
    }

    fn note(&self, r: Result<Applied, ApplyError>) -> Result<(), TargetError> {
        match r {
            Ok(Applied::Skipped(why)) => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("skipped: {why}");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(ApplyError::Diverged(why)) => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("the target directory disagrees with the log: {why}; going on");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Syncs the directory, persists the id map and frees the log below what is applied.
    pub fn checkpoint(&self) -> Result<(), TargetError> {
        // One at a time: a promotion checkpoints while the apply thread may too, and both
        // replace the same id table file (found by the failover benchmark).
        let _one = self.checkpoint_lock.lock().unwrap();
        let snap = self.applier.lock().unwrap().snapshot();
        self.journal
            .storage()
            .write_file_atomic(IDS_FILE, &snap.encode())
            .map_err(io_err("writing the target's id table"))?;
        self.journal.checkpoint()?;
        let mixed = self.mixed_until.load(Ordering::Acquire);
        if mixed != 0 && self.journal.durable_lsn().0 >= mixed {
            remove_if_present(&self.state_dir.join(MIXED_FILE)).map_err(io_err("removing resync-mixed-until"))?;
            let _ = self.mixed_until.compare_exchange(mixed, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(())
    }

    /// The all-acked watermark (claim 002:2–3): every target holds every record up to
    /// `all_acked_lsn`, so the log may free them (at its next checkpoint: the start-of-log
    /// pointer moves). Only ever moves forward.
    pub fn watermark(&self, all_acked_lsn: u64) {
        let keep_from = all_acked_lsn.saturating_add(1);
        let _ = self.hold.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (keep_from > h).then_some(keep_from));
    }

    /// A primary that sends no watermark (older than protocol 1.3): the log frees what is
    /// applied, as before.
    pub fn follow_applied(&self) {
        self.hold.store(0, Ordering::Release);
    }

    pub fn watermark_hold(&self) -> WatermarkHold {
        WatermarkHold {
            keep_from: self.hold.load(Ordering::Acquire),
            overflows: self.hold_overflows.load(Ordering::Relaxed),
        }
    }

    /// Where this target's directory stops showing a mix of states (design §3, "A resync's
    /// read end"): the read end of the last resync, while its log does not yet hold every
    /// record below it; else 0. A promotion must reach at least this LSN, or its directory
    /// is no state the primary ever had.
    pub fn mixed_until(&self) -> u64 {
        let mixed = self.mixed_until.load(Ordering::Acquire);
        if mixed != 0 && self.journal.durable_lsn().0 < mixed { mixed } else { 0 }
    }

    // ----- resync ------------------------------------------------------------------------

    pub fn resync_begin(&self, plan: u64, resume: u64) -> Result<(), TargetError> {
        let mut staging = self.staging.lock().unwrap();
        // A resync cut off by a broken connection leaves its writer here. Its buffered items
        // are discarded, never flushed: dropping the writer after the truncation below would
        // write them into the new staging file at the old offset, and the apply would read
        // them as damage (found by the failover simulation, seed 430).
        if let Some(old) = staging.take() {
            drop(old.out.into_parts());
        }
        let path = self.state_dir.join(STAGING_FILE);
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        *staging = Some(Staging { plan, resume, read_end: None, out: BufWriter::with_capacity(1 << 20, f) });
        Ok(())
    }

    /// The primary's read end for the resync being staged (`ControlMsg::ResyncRead`).
    pub fn resync_read(&self, plan: u64, read_end: u64) -> Result<(), TargetError> {
        let mut g = self.staging.lock().unwrap();
        let s = g.as_mut().ok_or_else(|| TargetError::Protocol("ResyncRead without a ResyncBegin".into()))?;
        if s.plan != plan {
            return Err(TargetError::Protocol(format!("ResyncRead for plan {plan}, staging holds plan {}", s.plan)));
        }
        if read_end < s.resume {
            return Err(TargetError::Protocol(format!(
                "ResyncRead says the read ended at LSN {read_end}, before the resync's resume LSN {}",
                s.resume
            )));
        }
        s.read_end = Some(read_end);
        Ok(())
    }

    /// Stages one resync item (an entries or node message, or data).
    pub fn resync_item(&self, item: &StagedItem) -> Result<(), TargetError> {
        let mut g = self.staging.lock().unwrap();
        let s = g.as_mut().ok_or_else(|| TargetError::Protocol("resync data without a ResyncBegin".into()))?;
        let bytes = item.encode()?;
        self.counters.resync_bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        s.out.write_all(&head).and_then(|_| s.out.write_all(&bytes)).map_err(io_err("writing the resync staging file"))
    }

    /// The resync is complete: makes the staging durable, then applies it (see module docs).
    pub fn resync_end(&self, plan: u64) -> Result<(), TargetError> {
        let s = self
            .staging
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| TargetError::Protocol("ResyncEnd without a ResyncBegin".into()))?;
        if s.plan != plan {
            return Err(TargetError::Protocol(format!("ResyncEnd for plan {plan}, staging holds plan {}", s.plan)));
        }
        let f = s
            .out
            .into_inner()
            .map_err(|e| TargetError::Io { what: "flushing the staging file".into(), source: e.into_error() })?;
        f.sync_all().map_err(io_err("syncing the staging file"))?;
        // Durable before the apply mixes the directory. A primary older than 1.2 does not
        // say where its read ended: then nothing is known (docs/PROTOCOL.md).
        let mixed_path = self.state_dir.join(MIXED_FILE);
        match s.read_end {
            Some(end) => write_atomic(&mixed_path, format!("{end}\n").as_bytes())?,
            None => remove_if_present(&mixed_path).map_err(io_err("removing resync-mixed-until"))?,
        }
        self.mixed_until.store(s.read_end.unwrap_or(0), Ordering::Release);
        let pending = format!("{} {}\n", s.plan, s.resume);
        write_atomic(&self.state_dir.join(PENDING_FILE), pending.as_bytes())?;
        self.apply_staged()
    }

    fn apply_staged(&self) -> Result<(), TargetError> {
        let text = fs::read_to_string(self.state_dir.join(PENDING_FILE)).map_err(io_err("reading resync-pending"))?;
        let resume: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| TargetError::Protocol(format!("resync-pending is damaged: {text:?}")))?;
        {
            // Everything the log holds first, whatever its outcome (module docs).
            let mut st = self.apply.lock().unwrap();
            let end = self.journal.next_lsn();
            self.apply_upto(&mut st, end)?;
        }
        let path = self.state_dir.join(STAGING_FILE);
        let mut r = BufReader::with_capacity(1 << 20, File::open(&path).map_err(io_err("opening the staging file"))?);
        let mut head = [0u8; 8];
        let mut staged = StagedApply::default();
        loop {
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err("reading the staging file")(e)),
            }
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
            let mut bytes = vec![0u8; len];
            r.read_exact(&mut bytes).map_err(io_err("reading the staging file"))?;
            if crc32c::crc32c(&bytes) != u32::from_le_bytes(head[4..].try_into().unwrap()) {
                return Err(TargetError::Protocol("the resync staging file is damaged (crc)".into()));
            }
            let item = StagedItem::decode(&bytes)?;
            let mut a = self.applier.lock().unwrap();
            staged.item(&mut a, item, |r| self.note(r))?;
        }
        staged.finish(&mut self.applier.lock().unwrap(), |r| self.note(r))?;
        let next_file_id = {
            let a = self.applier.lock().unwrap();
            a.tree().sync_all().map_err(io_err("syncing the target directory"))?;
            let snap = a.snapshot();
            self.journal
                .storage()
                .write_file_atomic(IDS_FILE, &snap.encode())
                .map_err(io_err("writing the id table"))?;
            snap.next_file_id
        };
        // The staged state is the primary's as read after `resume`'s predecessors; ops from
        // `resume` on come again and must all be judged afresh.
        self.applier
            .lock()
            .unwrap()
            .tree()
            .set_applied_marker(&self.set_id(), resume.saturating_sub(1))
            .map_err(io_err("resetting the applied marker"))?;
        self.apply.lock().unwrap().marker = resume.saturating_sub(1);
        self.journal.restart_at(Lsn(resume), next_file_id)?;
        {
            let mut st = self.apply.lock().unwrap();
            st.cursor = self.journal.cursor_at(Lsn(resume)).map_err(|e| TargetError::Protocol(e.to_string()))?;
            st.limit = Lsn(resume);
            st.settled.clear();
            st.aborted.clear();
            // Outcomes a tool told are about the log that was: it restarts here.
            st.outcomes_below = Lsn(0);
            self.applied_next.store(resume, Ordering::Release);
        }
        fs::remove_file(self.state_dir.join(PENDING_FILE)).map_err(io_err("removing resync-pending"))?;
        // An old primary failing back is now a plain target of the new primary.
        match fs::remove_file(self.state_dir.join(FAILBACK_FILE)) {
            Ok(()) => tracing::info!("failback complete: this node now mirrors the new primary"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the failback marker")(e)),
        }
        let _ = fs::remove_file(&path);
        self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// After a restart: the aborts among the records not yet applied.
    fn rescan_aborts(&self) -> Result<(), TargetError> {
        let mut st = self.apply.lock().unwrap();
        let mut cur = st.cursor;
        let end = self.journal.next_lsn();
        let mut buf = Vec::new();
        while cur.next < end {
            buf.clear();
            self.journal
                .read_records(&mut cur, end, APPLY_BATCH_BYTES, &mut buf)
                .map_err(|e| TargetError::Protocol(e.to_string()))?;
            let aborts = aborts_in(&buf);
            st.aborted.extend(aborts);
        }
        Ok(())
    }
}

/// A failover's promotion of a target (`PROMOTION_FILE`): the epoch it made this target the
/// primary of, and the fork: both histories hold the same records below `fork_lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub epoch: u64,
    pub fork_lsn: u64,
}

impl Promotion {
    /// "FRYPROM1", epoch (u64 LE), fork LSN (u64 LE), crc32c of the 24 bytes before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = PROMOTION_MAGIC.to_vec();
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.fork_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Promotion, String> {
        if b.len() != 28 || b[..8] != PROMOTION_MAGIC {
            return Err(format!("not a promotion record ({} bytes)", b.len()));
        }
        if crc32c::crc32c(&b[..24]) != u32::from_le_bytes(b[24..28].try_into().unwrap()) {
            return Err("the promotion record fails its crc".into());
        }
        Ok(Promotion {
            epoch: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            fork_lsn: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }
}

/// The promotion record in a log's (or a journal's) directory, if there is one.
pub fn read_promotion<S: Storage>(storage: &S) -> Result<Option<Promotion>, TargetError> {
    match storage.read_file(PROMOTION_FILE).map_err(io_err("reading the promotion record"))? {
        None => Ok(None),
        Some(b) => Promotion::decode(&b)
            .map(Some)
            .map_err(|e| TargetError::Protocol(format!("`{PROMOTION_FILE}` in the log directory: {e}"))),
    }
}

/// The part of a block of whole records (checked) that begins with record `lsn`.
fn records_from(body: &[u8], lsn: Lsn) -> Result<&[u8], TargetError> {
    let mut at = 0;
    while at < body.len() {
        let h = record::decode_header(&body[at..], body.len() - at)
            .map_err(|e| TargetError::Protocol(format!("a staged block: {e}")))?;
        if h.lsn >= lsn {
            return Ok(&body[at..]);
        }
        at += record::record_len(h.payload_len as usize);
    }
    Ok(&body[body.len()..])
}

/// "Set the mtime of `id` to `time_ns`", as the primary did (`Op::mtime_ids`).
fn mtime_op(id: FileId, time_ns: u64) -> Op {
    let attr = crate::format::ops::SetAttr {
        mtime: Some(crate::format::ops::Timestamp::from_ns(time_ns)),
        ..Default::default()
    };
    Op::SetAttr { id, attr }
}

/// Checks a whole Records frame before anything of it is kept: every record whole, its crc
/// good, of this replication set, continuing the log's LSNs from `next`, and (for writes and
/// ops) with a payload that decodes — a name that is not a single component, a bad length…
/// A frame with one bad record is refused whole (docs/PROTOCOL.md, "Errors"): a prefix kept
/// would leave the log ahead of what the primary thinks the target has.
fn check_frame(body: &[u8], mut next: Lsn, set_id: &[u8; 16]) -> Result<(), TargetError> {
    let mut at = 0;
    if body.is_empty() {
        return Err(TargetError::Protocol("a records frame with no record".into()));
    }
    while at < body.len() {
        let rest = &body[at..];
        let h = record::decode_header(rest, rest.len())
            .map_err(|e| TargetError::Protocol(format!("received record at byte {at}: {e}")))?;
        let bad = |e: String| TargetError::Protocol(format!("received record {} refused: {e}", h.lsn.0));
        let len = record::record_len(h.payload_len as usize);
        let rec = rest.get(..len).ok_or_else(|| bad("cut short".into()))?;
        record::verify(rec, &h).map_err(|e| bad(e.to_string()))?;
        if &h.set_id != set_id {
            return Err(bad("it belongs to another replication set".into()));
        }
        if h.lsn != next {
            return Err(bad(format!("out of order: the log expects {}", next.0)));
        }
        let payload = &rec[HEADER_SIZE..HEADER_SIZE + h.payload_len as usize];
        match h.kind {
            Kind::Write => drop(record::decode_write(payload).map_err(|e| bad(e.to_string()))?),
            Kind::Op => drop(Op::decode(payload).map_err(|e| bad(e.to_string()))?),
            _ => {}
        }
        next = next.next();
        at += len;
    }
    Ok(())
}

/// The transaction ids that Abort records in `body` end.
fn aborts_in(body: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER_SIZE <= body.len() {
        let Ok(h) = record::decode_header(&body[at..], body.len() - at) else { break };
        if h.kind == Kind::Abort {
            out.push(h.txid.0);
        }
        at += record::record_len(h.payload_len as usize);
    }
    out
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TargetError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing the state directory"))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The read end a staged resync left (`MIXED_FILE`), 0 when there is none.
fn read_mixed_until(state_dir: &Path) -> Result<u64, TargetError> {
    let path = state_dir.join(MIXED_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            TargetError::Protocol(format!(
                "{} is damaged ({text:?}, expected one LSN): it records where a resync left this directory \
                 mixed; remove it only if the target's log holds every record below that LSN",
                path.display()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}
