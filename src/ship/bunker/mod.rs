//! The primary's link to its bunker (design §5 "Bunker"; claims 003:2, 4, 14, 22, 29, 30): every
//! record goes to the bunker as soon as it is appended, while the local flush runs, and an fsync
//! in sync mode returns only once both hold it ([`Mirror`]).
//!
//! ```text
//!  connect ──> bunker's Status, LogInfo ──its next LSN is in our journal──> stream from there
//!                                       └─otherwise──> RestartAt{our start} ──LogInfo──> stream
//!  stream: Records as appended (≤ 1 MiB a frame, ≤ 8 MiB unacked) ──> Ack(n) per frame
//!          Watermark{every target acked ≤ n} at most every 100 ms; Heartbeat after 1 s idle
//!  error, no ack for --bunker-timeout ──> disconnected ──backoff──> connect
//!  Fenced (a failover promoted a target) ──> stopped for good; the local journal goes on
//! ```
//!
//! **Every record, at once.** The link reads the journal below `next_lsn` (records there are
//! whole, transactions still in flight included) without waiting for the local flush: the two
//! copies are written at the same time (003:4). A record may thus reach the bunker before the
//! local disk; after a crash the primary's recovered log may end earlier, so the first session
//! after a recovery restarts the bunker's log (`BunkerConfig::restart_first`).
//!
//! **Sync, async, degraded.** In async mode [`Mirror::wait`] returns at once. In sync mode it
//! returns once the bunker acked every record the fsync covers. A bunker that is unreachable,
//! or has not acked, for `--bunker-timeout` *degrades* the link (`--bunker-unreachable
//! degrade`): it behaves as async, with a loud warning, until the bunker has caught up again
//! (it acked everything appended, or everything is sent and at most one batch is unacked).
//! With `--bunker-unreachable wait` an fsync waits for as long as it takes (the status shows
//! the blocked fsyncs); only a stopping mount gives up on it, with an error.
//!
//! **Retention.** The journal keeps every record the bunker has not acked (the floor), so it can
//! catch up after an outage. When the journal is full and the bunker's floor holds it, the link
//! lets go ([`Retention::release`]): the bunker's log is restarted at a later LSN when it is
//! back, and the status says from where failover can no longer be lossless.
//!
//! **Fault model of the peer.** The bunker may refuse the connection, vanish mid-frame, stall
//! without closing (only acks prove progress: silence while records are unacked for the timeout
//! drops the connection), lose what it acked (a wiped directory: its log restarts), or say a
//! failover fenced this primary. A `--bunker DIR` may vanish or be replaced (an unmounted disk):
//! every frame checks that the directory is still the one whose log is open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::session::fenced_text;
use crate::io::Storage;
use crate::journal::{CursorError, Journal, LogCursor, Mirror, Retention};
use crate::types::Lsn;

mod local;
mod tcp;
#[cfg(test)]
mod tests;

pub use local::LocalBunkerConnector;
pub use tcp::TcpBunkerConnector;

/// Unacked bytes in flight to the bunker at most.
pub const WINDOW_BYTES: usize = 8 << 20;
/// Bytes of records per frame at most (plus one record).
pub const BATCH_BYTES: usize = 1 << 20;
/// `--bunker-timeout` unless given.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Bytes a frame adds to its body (for `bytes_sent`).
const FRAME_OVERHEAD: u64 = 16;

/// `--bunker-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// fsync returns once the local journal *and* the bunker hold the records.
    Sync,
    /// fsync returns once the local journal holds them; the bunker follows as fast as it can.
    Async,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

/// `--bunker-unreachable`: what sync mode does when the bunker does not ack in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// Switch to async (loudly) until the bunker has caught up.
    Degrade,
    /// Keep fsyncs waiting.
    Wait,
}

/// Where the connection stands. A degraded link shows as `degraded` in the status whatever its
/// connection does (see [`LinkSnapshot::state_name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// The first attempt of this run is under way.
    Connecting,
    /// Connected; the bunker lacks records we appended.
    CatchingUp,
    /// Connected; the bunker acked every record appended.
    InSync,
    /// The last session or attempt failed (`last_error`); retrying with backoff.
    Disconnected,
    /// A failover fenced this primary; the link has stopped for good.
    Fenced,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::CatchingUp => "catching-up",
            LinkState::InSync => "in-sync",
            LinkState::Disconnected => "disconnected",
            LinkState::Fenced => "fenced",
        }
    }
}

/// The link's clocks; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat_every: Duration,
    /// Watermarks go out at most this often, and only when they moved.
    pub watermark_every: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// An idle link looks for new records this often (a `push` wakes it sooner).
    pub idle_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_every: Duration::from_secs(1),
            watermark_every: Duration::from_millis(100),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            idle_wait: Duration::from_millis(1),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BunkerConfig {
    /// As the operator gave it (`tcp://HOST:PORT` or the directory).
    pub url: String,
    pub mode: Mode,
    pub unreachable: Unreachable,
    /// `--bunker-timeout`.
    pub timeout: Duration,
    /// The journal was recovered after a crash: its log may end before what the bunker got
    /// (records go to the bunker before the local flush), so the first session restarts the
    /// bunker's log at our start instead of trusting its position.
    pub restart_first: bool,
    pub timing: Timing,
}

impl BunkerConfig {
    pub fn new(url: &str, mode: Mode, unreachable: Unreachable, timeout: Duration) -> BunkerConfig {
        BunkerConfig {
            url: url.to_string(),
            mode,
            unreachable,
            timeout,
            restart_first: false,
            timing: Timing::default(),
        }
    }
}

/// Where the bunker's log stands, as it said at the start of a session or after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BunkerPosition {
    pub epoch: u64,
    /// The oldest record it holds.
    pub start_lsn: Lsn,
    /// The next record it expects.
    pub next_lsn: Lsn,
    /// Every record below this is durable there.
    pub durable_next: Lsn,
}

/// What the bunker sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BunkerEvent {
    /// Every record up to and including this one is durable at the bunker.
    Ack(Lsn),
    Heartbeat,
    /// Where its log stands (the reply to `RestartAt`).
    LogInfo(BunkerPosition),
    /// A failover promoted a target at `epoch`: this primary is stale.
    Fenced {
        epoch: u64,
        fork_lsn: u64,
    },
    Closed(String),
}

/// Why a session ended or never began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The bunker refuses this primary for good (a failover moved the set on).
    Fenced { epoch: u64, fork_lsn: u64 },
    /// Anything else: retried with backoff.
    Failed(String),
}

impl From<String> for LinkError {
    fn from(s: String) -> LinkError {
        LinkError::Failed(s)
    }
}

/// Called by a session's reader when an event arrived, so an idle link looks at once.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// One connection to the bunker, whatever carries it.
pub trait BunkerSession: Send {
    /// Where the bunker stood when the session began.
    fn position(&self) -> BunkerPosition;
    /// Asks the bunker to restart its log at `lsn`; returns where it then stands.
    fn restart_at(&mut self, lsn: Lsn) -> Result<BunkerPosition, LinkError>;
    fn send_records(&mut self, records: &[u8]) -> Result<(), String>;
    fn watermark(&mut self, all_acked: Lsn) -> Result<(), String>;
    fn heartbeat(&mut self) -> Result<(), String>;
    fn bye(&mut self, reason: &str);
    /// The next event, waiting at most `wait`.
    fn event(&mut self, wait: Duration) -> Option<BunkerEvent>;
}

/// Opens sessions to the bunker.
pub trait BunkerConnector: Send {
    fn connect(&mut self, waker: Waker) -> Result<Box<dyn BunkerSession>, LinkError>;
}

/// A fence as the hooks pass it: (epoch, fork LSN, the words for the operator).
pub type FenceNote = (u64, u64, String);

/// Tells whether this primary is fenced already.
pub type FencedHook = Box<dyn Fn() -> Option<FenceNote> + Send + Sync>;

/// Hears that the bunker fenced this primary: (epoch, fork LSN, the words for the operator).
pub type OnFencedHook = Box<dyn Fn(u64, u64, &str) + Send + Sync>;

/// What the link needs from the rest of the mount.
pub struct Hooks {
    /// No target needs a record below this from the bunker (`hub::Link::bunker_floor`: what
    /// ordered targets acked, where resyncing ones continue); `None` when no target is ordered
    /// or resyncing (then the bunker's own acks make the watermark).
    pub targets_acked_below: Box<dyn Fn() -> Option<Lsn> + Send + Sync>,
    /// Set when this primary is already fenced (a target said so, or an earlier run recorded
    /// it): (epoch, fork LSN, the words for the operator).
    pub fenced: FencedHook,
    /// The bunker fenced this primary: (epoch, fork LSN, the words for the operator).
    pub on_fenced: OnFencedHook,
}

impl Default for Hooks {
    fn default() -> Hooks {
        Hooks { targets_acked_below: Box::new(|| None), fenced: Box::new(|| None), on_fenced: Box::new(|_, _, _| {}) }
    }
}

#[derive(Clone, Debug)]
struct Degraded {
    since: SystemTime,
    at: Instant,
    reason: String,
}

struct Inner {
    state: LinkState,
    /// Every record below this the bunker holds durably, or will never get (its log was
    /// restarted past it). The journal keeps what lies above (the floor).
    acked_below: Lsn,
    sent_below: Lsn,
    bytes_sent: u64,
    reconnects: u64,
    last_error: Option<String>,
    /// Set when the journal overflowed while the bunker lagged; never cleared in this run.
    overflow: Option<String>,
    degraded: Option<Degraded>,
    /// When contact was lost (`None` while connected).
    unreachable_since: Option<Instant>,
    /// The journal let the bunker's records go: the next session restarts its log.
    released: bool,
    /// Records given up by an overflow: `[from, to)`.
    lost: Option<(Lsn, Lsn)>,
    fenced: Option<(u64, u64)>,
    /// The mount is stopping: a waiting fsync gives up after the timeout whatever the policy.
    stopping: bool,
    /// Someone wants the link thread to look now (records pushed, an event arrived).
    poked: bool,
    fsyncs_waiting: u64,
    waiting_since: Option<Instant>,
    blocked_warned: bool,
}

/// The link's shared state and its thread.
pub struct BunkerLink<S: Storage> {
    pub url: String,
    config: BunkerConfig,
    journal: Arc<Journal<S>>,
    hooks: Hooks,
    inner: Mutex<Inner>,
    /// Waiting fsyncs: acks arrived, or the link degraded or was fenced.
    acked: Condvar,
    /// The link thread: records pushed or an event arrived.
    wake: Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The link as the status shows it.
#[derive(Clone, Debug)]
pub struct LinkSnapshot {
    pub url: String,
    pub configured_mode: Mode,
    pub unreachable: Unreachable,
    pub link_state: LinkState,
    /// When and why sync mode degraded to async (`None`: it did not, or it is async anyway).
    pub degraded: Option<(SystemTime, String)>,
    /// Every record below this is durable at the bunker.
    pub acked_below: Lsn,
    pub sent_below: Lsn,
    pub bytes_sent: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub fenced_epoch: Option<u64>,
    /// fsyncs waiting for the bunker now, and for how long the oldest has.
    pub fsyncs_waiting: u64,
    pub waiting_for: Duration,
}

impl LinkSnapshot {
    /// The mode fsync follows now.
    pub fn mode(&self) -> Mode {
        if self.configured_mode == Mode::Sync && self.degraded.is_none() && self.fenced_epoch.is_none() {
            Mode::Sync
        } else {
            Mode::Async
        }
    }

    /// `fenced`, else `degraded`, else the connection's state.
    pub fn state_name(&self) -> &'static str {
        if self.fenced_epoch.is_some() {
            "fenced"
        } else if self.degraded.is_some() {
            "degraded"
        } else {
            self.link_state.name()
        }
    }
}

fn overflow_text(lsn: Lsn) -> String {
    format!(
        "the journal overflowed while the bunker was away: its copy restarts at LSN {}; failover cannot reach zero \
         data loss for writes before that",
        lsn.0
    )
}

impl<S: Storage> BunkerLink<S> {
    /// A link for `journal`; nothing runs until [`start`](Self::start).
    pub fn new(journal: Arc<Journal<S>>, config: BunkerConfig, hooks: Hooks) -> Arc<BunkerLink<S>> {
        let start = journal.superblock().start_lsn;
        let fenced = (hooks.fenced)();
        let inner = Inner {
            state: if fenced.is_some() { LinkState::Fenced } else { LinkState::Connecting },
            acked_below: start,
            sent_below: start,
            bytes_sent: 0,
            reconnects: 0,
            last_error: fenced.as_ref().map(|f| f.2.clone()),
            overflow: None,
            degraded: None,
            unreachable_since: Some(Instant::now()),
            released: false,
            lost: None,
            fenced: fenced.map(|f| (f.0, f.1)),
            stopping: false,
            poked: false,
            fsyncs_waiting: 0,
            waiting_since: None,
            blocked_warned: false,
        };
        Arc::new(BunkerLink {
            url: config.url.clone(),
            config,
            journal,
            hooks,
            inner: Mutex::new(inner),
            acked: Condvar::new(),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        })
    }

    /// Starts the link's thread.
    pub fn start(self: &Arc<Self>, connector: Box<dyn BunkerConnector>) {
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("bunker-link".into())
            .spawn(move || me.run(connector))
            .expect("spawning the bunker link");
        *self.thread.lock().unwrap() = Some(handle);
    }

    /// The mount is stopping: from now on a waiting fsync gives up after `--bunker-timeout`
    /// even under `--bunker-unreachable wait` (with an error), so an unmount never hangs.
    pub fn begin_stop(&self) {
        self.lock().stopping = true;
        self.acked.notify_all();
    }

    /// A final sync (the bunker gets the journal's tail, waited for as an fsync would), then
    /// the thread says goodbye and ends.
    pub fn stop(&self) {
        self.begin_stop();
        let next = self.journal.next_lsn();
        self.push(next);
        if let Err(e) = self.wait(next) {
            eprintln!("ferryfs: bunker {}: the final sync: {e}", self.url);
        }
        self.stop.store(true, Ordering::Release);
        self.poke();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    pub fn config(&self) -> &BunkerConfig {
        &self.config
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        let g = self.lock();
        let last_error = match (&g.last_error, &g.overflow) {
            (Some(e), Some(o)) if e != o => Some(format!("{e}; {o}")),
            (e, o) => e.clone().or_else(|| o.clone()),
        };
        LinkSnapshot {
            url: self.url.clone(),
            configured_mode: self.config.mode,
            unreachable: self.config.unreachable,
            link_state: g.state,
            degraded: g.degraded.as_ref().map(|d| (d.since, d.reason.clone())),
            acked_below: g.acked_below,
            sent_below: g.sent_below,
            bytes_sent: g.bytes_sent,
            reconnects: g.reconnects,
            last_error,
            fenced_epoch: g.fenced.map(|f| f.0),
            fsyncs_waiting: g.fsyncs_waiting,
            waiting_for: g.waiting_since.map_or(Duration::ZERO, |t| t.elapsed()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn poke(&self) {
        self.lock().poked = true;
        self.wake.notify_all();
    }

    // ----- the thread ----------------------------------------------------------------------

    fn run(self: Arc<Self>, mut connector: Box<dyn BunkerConnector>) {
        let weak = Arc::downgrade(&self);
        let waker: Waker = Arc::new(move || {
            if let Some(link) = weak.upgrade() {
                link.poke();
            }
        });
        let timing = self.config.timing;
        let mut backoff = timing.backoff_min;
        let mut sessions = 0u64;
        while !self.stopped() && self.lock().fenced.is_none() {
            if let Some((epoch, fork_lsn, text)) = (self.hooks.fenced)() {
                self.fence(epoch, fork_lsn, Some(text));
                return;
            }
            let result = connector.connect(waker.clone()).and_then(|mut s| {
                backoff = timing.backoff_min;
                sessions += 1;
                self.serve(s.as_mut(), sessions)
            });
            match result {
                Ok(()) => return,
                Err(LinkError::Fenced { epoch, fork_lsn }) => {
                    self.fence(epoch, fork_lsn, None);
                    return;
                }
                Err(LinkError::Failed(why)) => self.lost(why),
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(timing.backoff_max);
        }
    }

    /// Sleeps `d` in short steps, degrading meanwhile if the bunker stays away too long.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            let mut g = self.lock();
            self.degrade_if_unreachable(&mut g);
            let left = until.saturating_duration_since(Instant::now()).min(Duration::from_millis(20));
            let _ = self.wake.wait_timeout(g, left).unwrap();
        }
    }

    fn lost(&self, why: String) {
        let mut g = self.lock();
        if g.last_error.as_deref() != Some(why.as_str()) {
            tracing::warn!("bunker {}: {why}", self.url);
        }
        g.state = LinkState::Disconnected;
        g.last_error = Some(why);
        g.unreachable_since.get_or_insert_with(Instant::now);
        self.degrade_if_unreachable(&mut g);
    }

    fn fence(&self, epoch: u64, fork_lsn: u64, text: Option<String>) {
        let text = text.unwrap_or_else(|| {
            let peer = format!("bunker {}", self.url);
            fenced_text(peer, epoch, fork_lsn, self.journal.epoch())
        });
        {
            let mut g = self.lock();
            g.fenced = Some((epoch, fork_lsn));
            g.state = LinkState::Fenced;
            g.last_error = Some(text.clone());
        }
        self.acked.notify_all();
        (self.hooks.on_fenced)(epoch, fork_lsn, &text);
    }

    /// One session: find where the bunker continues, then stream until an error or stop.
    fn serve(&self, s: &mut dyn BunkerSession, session: u64) -> Result<(), LinkError> {
        let pos = s.position();
        {
            let mut g = self.lock();
            if session > 1 {
                g.reconnects += 1;
            }
            g.state = LinkState::CatchingUp;
            g.unreachable_since = None;
        }
        tracing::info!(
            "bunker {}: connected; its log holds LSN {}..{} (durable below {}) at epoch {}",
            self.url,
            pos.start_lsn.0,
            pos.next_lsn.0,
            pos.durable_next.0,
            pos.epoch
        );
        if pos.epoch > self.journal.epoch() {
            return Err(LinkError::Fenced { epoch: pos.epoch, fork_lsn: 0 });
        }
        let trust = !(session == 1 && self.config.restart_first);
        let resume = (trust && pos.next_lsn <= self.journal.next_lsn())
            .then(|| self.journal.cursor_at(pos.next_lsn).ok())
            .flatten();
        let cursor = match resume {
            Some(c) => {
                let mut g = self.lock();
                let durable = pos.durable_next.min(pos.next_lsn);
                if durable < g.acked_below && g.lost.is_none() {
                    tracing::warn!(
                        "bunker {} holds records below LSN {} only, but had acked up to {}",
                        self.url,
                        durable.0,
                        g.acked_below.0
                    );
                }
                g.acked_below = durable;
                g.released = false;
                self.acked.notify_all();
                c
            }
            None => self.restart(s, pos)?,
        };
        self.stream(s, cursor)
    }

    /// The bunker's log cannot continue from what our journal holds: restart it at the oldest
    /// record we hold, kept from a checkpoint by our floor meanwhile.
    fn restart(&self, s: &mut dyn BunkerSession, was: BunkerPosition) -> Result<LogCursor, LinkError> {
        let (start, cursor) = loop {
            let start = self.journal.superblock().start_lsn;
            {
                let mut g = self.lock();
                g.acked_below = start;
                g.released = false;
            }
            match self.journal.cursor_at(start) {
                Ok(c) => break (start, c),
                Err(CursorError::Gone(_)) => continue, // a checkpoint moved the start meanwhile
                Err(e) => return Err(LinkError::Failed(format!("reading the journal at LSN {}: {e}", start.0))),
            }
        };
        let now = s.restart_at(start)?;
        if now.next_lsn != start {
            return Err(LinkError::Failed(format!(
                "asked the bunker to restart its log at LSN {}; it answered that its next LSN is {}",
                start.0, now.next_lsn.0
            )));
        }
        let mut g = self.lock();
        if let Some((from, to)) = g.lost {
            g.lost = Some((from, to.max(start)));
            g.overflow = Some(overflow_text(start));
        }
        eprintln!(
            "ferryfs: bunker {}: its log restarts at LSN {} (it held LSN {}..{}, which this journal cannot continue)",
            self.url, start.0, was.start_lsn.0, was.next_lsn.0
        );
        Ok(cursor)
    }

    /// Sends every record as soon as it is appended; takes acks; until an error or stop.
    fn stream(&self, s: &mut dyn BunkerSession, mut cur: LogCursor) -> Result<(), LinkError> {
        let timing = self.config.timing;
        let timeout = self.config.timeout;
        let mut window: VecDeque<(Lsn, usize)> = VecDeque::new();
        let mut inflight = 0usize;
        let mut acks = 0u64;
        let mut batch = Vec::with_capacity(BATCH_BYTES + (2 << 20));
        let mut last_sent = Instant::now();
        // While records are unacked: since when nothing was heard.
        let mut silent_since: Option<Instant> = None;
        let mut watermark_at: Option<Instant> = None;
        let mut watermark_sent: Option<Lsn> = None;
        self.lock().sent_below = cur.next;
        loop {
            if self.stopped() {
                s.bye("the primary is stopping");
                return Ok(());
            }
            if let Some((epoch, fork_lsn, text)) = (self.hooks.fenced)() {
                // A target said so: the bunker link stops too, with the target's words.
                s.bye("this primary was fenced by a failover");
                self.fence(epoch, fork_lsn, Some(text));
                return Ok(());
            }
            if self.lock().released {
                return Err(LinkError::Failed(
                    "the journal overflowed while the bunker lagged: its log restarts at a later LSN".into(),
                ));
            }
            while let Some(ev) = s.event(Duration::ZERO) {
                match ev {
                    BunkerEvent::Ack(l) => {
                        while window.front().is_some_and(|(last, _)| *last <= l) {
                            inflight -= window.pop_front().expect("checked").1;
                        }
                        acks += 1;
                        self.acked_upto(l);
                    }
                    BunkerEvent::Heartbeat | BunkerEvent::LogInfo(_) => {}
                    BunkerEvent::Fenced { epoch, fork_lsn } => return Err(LinkError::Fenced { epoch, fork_lsn }),
                    BunkerEvent::Closed(why) => return Err(LinkError::Failed(why)),
                }
                silent_since = (!window.is_empty()).then(Instant::now);
            }
            if silent_since.is_some_and(|t| t.elapsed() >= timeout) {
                let mut g = self.lock();
                self.degrade_if_sync(&mut g, format!("has not acknowledged for {timeout:?}"));
                return Err(LinkError::Failed(format!("the bunker has not acknowledged for {timeout:?}")));
            }
            let next = self.journal.next_lsn();
            let mut idle = true;
            if cur.next < next && inflight < WINDOW_BYTES {
                batch.clear();
                match self.journal.read_records(&mut cur, next, BATCH_BYTES, &mut batch) {
                    Ok(_) => {}
                    Err(CursorError::Gone(l)) => {
                        return Err(LinkError::Failed(format!(
                            "record {} left the journal before it was sent to the bunker",
                            l.0
                        )));
                    }
                    Err(e) => return Err(LinkError::Failed(format!("reading the journal: {e}"))),
                }
                s.send_records(&batch)?;
                window.push_back((Lsn(cur.next.0 - 1), batch.len()));
                inflight += batch.len();
                silent_since.get_or_insert_with(Instant::now);
                let mut g = self.lock();
                g.sent_below = cur.next;
                g.bytes_sent += batch.len() as u64 + FRAME_OVERHEAD;
                idle = false;
                last_sent = Instant::now();
            }
            if watermark_at.is_none_or(|t| t.elapsed() >= timing.watermark_every) {
                let wm = self.watermark();
                if wm.0 > 0 && watermark_sent != Some(wm) {
                    s.watermark(wm)?;
                    watermark_sent = Some(wm);
                }
                watermark_at = Some(Instant::now());
            }
            if last_sent.elapsed() >= timing.heartbeat_every {
                s.heartbeat()?;
                last_sent = Instant::now();
            }
            self.settle(next, cur.next, inflight, acks);
            if idle {
                let mut g = self.lock();
                if !g.poked {
                    g = self.wake.wait_timeout(g, timing.idle_wait).unwrap().0;
                }
                g.poked = false;
            }
        }
    }

    fn acked_upto(&self, l: Lsn) {
        let next = self.journal.next_lsn();
        let mut g = self.lock();
        let below = Lsn(l.0 + 1);
        if below > g.acked_below {
            g.acked_below = below;
            if below >= next {
                // Before the waiters hear of it: a status asked right after an fsync agrees.
                g.state = LinkState::InSync;
            }
            g.blocked_warned = false;
            drop(g);
            self.acked.notify_all();
        }
    }

    /// What the bunker may free: every record every ordered target acked (claim 002:1),
    /// or, with no target in ordered mode, what the bunker itself acked.
    fn watermark(&self) -> Lsn {
        let own = self.lock().acked_below;
        let below = (self.hooks.targets_acked_below)().unwrap_or(own);
        Lsn(below.0.saturating_sub(1))
    }

    /// The connection's state after a turn of the loop; a degraded link that has caught up
    /// goes back to sync.
    fn settle(&self, next: Lsn, sent_below: Lsn, inflight: usize, acks: u64) {
        let mut g = self.lock();
        let caught_up = g.acked_below >= next;
        g.state = if caught_up { LinkState::InSync } else { LinkState::CatchingUp };
        if caught_up {
            g.last_error = None;
        }
        let nearly = acks > 0 && sent_below >= next && inflight <= BATCH_BYTES;
        if g.degraded.is_some() && !g.released && (caught_up || nearly) {
            let d = g.degraded.take().expect("checked");
            eprintln!(
                "ferryfs: bunker {} has caught up (it acked every record below LSN {}): sync mode restored after \
                 {:.1}s degraded; fsync waits for the bunker again",
                self.url,
                g.acked_below.0,
                d.at.elapsed().as_secs_f64()
            );
        }
    }

    // ----- degrading -------------------------------------------------------------------------

    fn degrade_if_unreachable(&self, g: &mut Inner) {
        if let Some(t) = g.unreachable_since
            && t.elapsed() >= self.config.timeout
        {
            self.degrade_if_sync(g, format!("unreachable for {:?}", self.config.timeout));
        }
    }

    /// Sync mode with `--bunker-unreachable degrade` turns async, loudly; otherwise nothing.
    fn degrade_if_sync(&self, g: &mut Inner, reason: String) {
        if self.config.mode != Mode::Sync
            || self.config.unreachable != Unreachable::Degrade
            || g.degraded.is_some()
            || g.fenced.is_some()
        {
            return;
        }
        let detail = g.last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
        eprintln!(
            "ferryfs: WARNING: bunker {} {reason}: sync mode DEGRADED to async; acknowledged writes are now only in \
             the local journal until it catches up{detail}",
            self.url
        );
        g.degraded =
            Some(Degraded { since: SystemTime::now(), at: Instant::now(), reason: format!("{reason}{detail}") });
        self.acked.notify_all();
    }
}

impl<S: Storage> Mirror for BunkerLink<S> {
    fn push(&self, _below: Lsn) {
        self.poke();
    }

    fn holds(&self, below: Lsn) -> bool {
        if self.config.mode == Mode::Async {
            return true;
        }
        let g = self.lock();
        g.fenced.is_some() || g.degraded.is_some() || g.acked_below >= below
    }

    fn wait(&self, below: Lsn) -> Result<(), String> {
        if self.config.mode == Mode::Async {
            return Ok(());
        }
        let started = Instant::now();
        let timeout = self.config.timeout;
        let mut g = self.lock();
        g.fsyncs_waiting += 1;
        g.waiting_since.get_or_insert(started);
        let result = loop {
            if g.fenced.is_some() {
                break Ok(());
            }
            if self.config.unreachable == Unreachable::Wait
                && let Some((from, to)) = g.lost
                && from < below
                && below <= to
            {
                break Err(format!(
                    "the journal overflowed while bunker {} was away: records {}..{} were given up before it held \
                     them",
                    self.url, from.0, to.0
                ));
            }
            if g.acked_below >= below || g.degraded.is_some() {
                break Ok(());
            }
            let waited = started.elapsed();
            if waited >= timeout {
                let connected = matches!(g.state, LinkState::CatchingUp | LinkState::InSync);
                match self.config.unreachable {
                    Unreachable::Degrade => {
                        let reason = if connected {
                            format!("has not acknowledged LSN {} within {timeout:?}", below.0 - 1)
                        } else {
                            format!("unreachable for {timeout:?}")
                        };
                        self.degrade_if_sync(&mut g, reason);
                        break Ok(());
                    }
                    Unreachable::Wait if g.stopping => {
                        break Err(format!(
                            "the mount is stopping and bunker {} has not acknowledged LSN {} within {timeout:?} \
                             (--bunker-unreachable wait)",
                            self.url,
                            below.0 - 1
                        ));
                    }
                    Unreachable::Wait if !g.blocked_warned => {
                        g.blocked_warned = true;
                        eprintln!(
                            "ferryfs: WARNING: bunker {} has not acknowledged LSN {} for {timeout:?}: fsync is \
                             BLOCKED until it does (--bunker-unreachable wait)",
                            self.url,
                            below.0 - 1
                        );
                    }
                    Unreachable::Wait => {}
                }
            }
            let left = timeout.saturating_sub(waited).clamp(Duration::from_millis(1), Duration::from_millis(100));
            g = self.acked.wait_timeout(g, left).unwrap().0;
        };
        g.fsyncs_waiting -= 1;
        if g.fsyncs_waiting == 0 {
            g.waiting_since = None;
        }
        result
    }
}

impl<S: Storage> Retention for BunkerLink<S> {
    fn floor(&self) -> Option<Lsn> {
        let g = self.lock();
        (g.fenced.is_none() && !g.released).then_some(g.acked_below)
    }

    /// The journal is full and holds records only the bunker lacks: let them go (writers never
    /// wait for a bunker that may stay away); its log restarts at a later LSN when it is back.
    fn release(&self) {
        let needed = self.journal.oldest_segment_end();
        let next = self.journal.next_lsn();
        let mut g = self.lock();
        if g.released || g.fenced.is_some() || g.acked_below >= needed {
            return;
        }
        g.released = true;
        let from = g.acked_below;
        g.lost = Some(match g.lost {
            Some((f, t)) => (f.min(from), t.max(next)),
            None => (from, next),
        });
        g.overflow = Some(overflow_text(needed));
        eprintln!(
            "ferryfs: WARNING: the journal is full and bunker {} lacks records from LSN {}: they are given up; its \
             log restarts at a later LSN when it is back",
            self.url, from.0
        );
        self.degrade_if_sync(&mut g, "lost records when the journal overflowed".into());
        drop(g);
        self.acked.notify_all();
        self.wake.notify_all();
    }
}
