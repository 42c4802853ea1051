//! The status channel of a running mount: `ferryfs status` asks, the mount answers.
//!
//! The mount listens on a Unix socket named [`SOCKET_NAME`] in its journal directory: the journal
//! is what identifies a mount (one mount per journal), so the operator already knows where to ask,
//! and the directory's permissions, plus mode 0600 on the socket, keep other users out.
//!
//! One exchange per connection:
//!
//! | step | who    | bytes                                                                  |
//! |------|--------|------------------------------------------------------------------------|
//! | 1    | client | `status\n`, at most [`REQUEST_MAX_BYTES`] bytes, within [`CLIENT_TIMEOUT`] |
//! | 2    | mount  | one line of JSON: a [`StatusReport`], or `{"error": "..."}`              |
//! | 3    | mount  | closes the connection                                                  |
//!
//! Fault model of the server: clients are local but may be buggy or hostile: they may send garbage,
//! send nothing, drip bytes, or hang up before the reply. The server answers one client at a time
//! and bounds each by a deadline, so such a client delays the next answer by at most
//! [`CLIENT_TIMEOUT`] per exchange and can never stop the server or the mount. (A client that hangs
//! up cannot raise SIGPIPE in the mount, although `main` restores its default action: std's
//! `UnixStream` writes with `MSG_NOSIGNAL`, so the write fails with `EPIPE` instead.)

pub mod bunker_node;
#[cfg(test)]
mod tests;

use std::fs::{self, Permissions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The socket's file name inside the journal directory.
pub const SOCKET_NAME: &str = "ferryfs.sock";
/// The [`StatusReport::version`] this build writes and reads; a reader refuses any other rather
/// than misread it.
pub const REPORT_VERSION: u32 = 1;
/// The words [`TargetStatus::state`] may hold, in the order a new target passes through most of them:
/// - `connected`: the link is up and live records are shipped, but some are not acked yet;
/// - `disconnected`: no link; changes accumulate as dirty blocks (and unacked records);
/// - `initial-sync`: the first full copy of the backing directory to the target;
/// - `resyncing`: after a reconnect, the dirty blocks are copied before live shipping resumes;
/// - `in-sync`: the link is up and the target has acked every record.
pub const STATES: [&str; 5] = ["connected", "disconnected", "initial-sync", "resyncing", "in-sync"];

/// The one request the server understands (without its newline).
const REQUEST_STATUS: &str = "status";
/// A request is one short word; anything longer is garbage, and reading it would cost memory.
pub const REQUEST_MAX_BYTES: usize = 256;
/// How long the server gives one client for its request and for taking the reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// A report is a few hundred bytes per target; a reply past this is not one of ours.
const REPLY_MAX_BYTES: usize = 4 << 20;
/// `sizeof(sockaddr_un.sun_path)` on Linux; the path and its NUL must fit.
const SUN_PATH_MAX: usize = 108;
/// Accept can fail for a while (e.g. out of file descriptors); the pause keeps that from spinning.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The table shows an error's start; the JSON form has all of it.
const ERROR_SHOWN_MAX_CHARS: usize = 80;

/// What a running mount reports about itself; the JSON form is the wire format (one line).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// [`REPORT_VERSION`]; `Default` leaves 0, so build reports with [`StatusReport::new`].
    pub version: u32,
    pub journal: JournalStatus,
    pub targets: Vec<TargetStatus>,
    /// The bunker link (`--bunker`), if the mount has one. Absent in reports of older mounts.
    #[serde(default)]
    pub bunker: Option<BunkerStatus>,
}

/// The journal's size, usage and LSN positions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalStatus {
    /// The journal directory as the mount was given it.
    pub dir: String,
    /// Capacity of all segments.
    pub size_bytes: u64,
    /// Bytes from the log's start (the last checkpoint) to its end: space not yet reusable.
    pub used_bytes: u64,
    /// First LSN still in the journal.
    pub start_lsn: u64,
    /// LSN the next record will get; the journal holds `start_lsn..next_lsn`.
    pub next_lsn: u64,
    /// Highest LSN known to be on stable storage.
    pub durable_lsn: u64,
    /// LSN of the last checkpoint.
    pub checkpoint_lsn: u64,
}

/// One replication target, as its shipper sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub url: String,
    /// One of [`STATES`].
    pub state: String,
    /// Highest LSN the target acknowledged as durable.
    pub acked_lsn: u64,
    /// Records written here but not acked by the target.
    pub lag_records: u64,
    /// Bytes of those records.
    pub lag_bytes: u64,
    /// Age of the oldest unacked update; 0 when there is none. Always finite.
    pub lag_seconds: f64,
    /// Blocks the sync map marks as changed and not yet copied to the target.
    pub dirty_blocks: u64,
    /// Bytes sent to the target since the mount started, resync included.
    pub bytes_sent: u64,
    /// The part of `bytes_sent` sent by initial sync and resync.
    pub bytes_resync: u64,
    /// Connections re-established since the mount started.
    pub reconnects: u64,
    /// The last failure talking to the target, if any since the last success.
    pub last_error: Option<String>,
    /// Claims 002:7–8: the highest LSN sent to it on the current connection (its sent
    /// indicator; `acked_lsn` is its received indicator).
    #[serde(default)]
    pub sent_lsn: u64,
    /// The all-acked watermark the primary tells its targets (claim 002:1): every target that
    /// holds it back has every record up to it; 0 when no target holds it.
    #[serde(default)]
    pub watermark_lsn: u64,
    /// The target's own log as it last said: oldest record held, next expected (1.3 targets).
    #[serde(default)]
    pub log_start_lsn: Option<u64>,
    #[serde(default)]
    pub log_next_lsn: Option<u64>,
    /// This target is the one keeping the watermark where it is (it acked least of those that
    /// hold it, and another acked more).
    #[serde(default)]
    pub holds_watermark: bool,
    /// Unreachable longer than `--target-timeout`: it no longer holds the watermark back and
    /// gets a resync from its sync map when it returns.
    #[serde(default)]
    pub timed_out: bool,
}

/// The words [`BunkerStatus::state`] may hold:
/// - `connecting`: the first connection of this run is being made;
/// - `catching-up`: connected; the bunker lacks records written here;
/// - `in-sync`: connected; the bunker acknowledged every record;
/// - `disconnected`: no link (see `last_error`); the journal keeps what the bunker lacks;
/// - `degraded`: sync mode fell back to async (see `degraded_reason`) until the bunker catches up;
/// - `fenced`: a failover promoted another node; this mount is no longer the primary.
pub const BUNKER_STATES: [&str; 6] = ["connecting", "catching-up", "in-sync", "disconnected", "degraded", "fenced"];

/// The primary's link to its bunker (`--bunker`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BunkerStatus {
    pub url: String,
    /// What fsync follows now: `sync` (waits for the bunker) or `async`.
    pub mode: String,
    /// `--bunker-mode` as given; differs from `mode` while degraded or fenced.
    pub configured_mode: String,
    /// One of [`BUNKER_STATES`].
    pub state: String,
    /// Sync mode fell back to async: fsync'd writes since are only in the local journal.
    pub degraded: bool,
    /// Since when (seconds since the Unix epoch), while degraded.
    pub degraded_since: Option<u64>,
    pub degraded_reason: Option<String>,
    /// Highest LSN the bunker acknowledged as durable.
    pub acked_lsn: u64,
    /// Records written here and not acked by the bunker.
    pub lag_records: u64,
    /// Bytes of those records.
    pub lag_bytes: u64,
    /// Age of the oldest record the bunker has not acked; 0 when there is none.
    pub lag_seconds: f64,
    /// Bytes sent to the bunker since the mount started.
    pub bytes_sent: u64,
    /// Connections re-established since the mount started.
    pub reconnects: u64,
    /// The last failure, or the note that an overflow cut the bunker's copy short.
    pub last_error: Option<String>,
    /// The epoch of the failover that fenced this primary.
    pub fenced_epoch: Option<u64>,
    /// fsyncs waiting for the bunker now (`--bunker-unreachable wait` keeps them waiting).
    #[serde(default)]
    pub fsyncs_waiting: u64,
    /// How long the oldest of them has waited.
    #[serde(default)]
    pub fsyncs_waiting_seconds: f64,
    /// `--bunker-unreachable`: `degrade` or `wait`.
    #[serde(default)]
    pub unreachable_policy: String,
    /// `--bunker-timeout`, in seconds.
    #[serde(default)]
    pub timeout_seconds: f64,
}

impl StatusReport {
    /// A report of the current [`REPORT_VERSION`], without a bunker.
    pub fn new(journal: JournalStatus, targets: Vec<TargetStatus>) -> StatusReport {
        StatusReport { version: REPORT_VERSION, journal, targets, bunker: None }
    }
}

/// Why `ferryfs status` got no report; each message names the journal and the next step.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("journal directory {} does not exist; pass the --journal the mount was started with", .dir.display())]
    NoJournal { dir: PathBuf },
    #[error(
        "no ferryfs mount is running on journal {}: no status socket at {}; \
         start one with `ferryfs mount --backing DIR --journal {} MOUNTPOINT`",
        .dir.display(), .path.display(), .dir.display()
    )]
    NoSocket { dir: PathBuf, path: PathBuf },
    #[error(
        "no ferryfs mount is running on journal {}: the status socket {} is stale (connection refused), \
         left by a mount that ended without cleaning up; the next mount replaces it",
        .dir.display(), .path.display()
    )]
    Stale { dir: PathBuf, path: PathBuf },
    #[error(
        "the status socket path {} is {len} bytes, but a Unix socket address holds at most {max}; \
         reach the journal through a shorter path (e.g. a symlink) and pass that",
        .path.display(), max = SUN_PATH_MAX - 1
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error(
        "the ferryfs mount on journal {} did not answer within {timeout:?}; it may be stuck: check its log",
        .dir.display()
    )]
    Timeout { dir: PathBuf, timeout: Duration },
    #[error(
        "the ferryfs mount on journal {} sent a reply this ferryfs cannot read: {detail}; \
         are the mount and this command the same ferryfs version?",
        .dir.display()
    )]
    BadReply { dir: PathBuf, detail: String },
    #[error("the ferryfs mount on journal {} refused the request: {message}", .dir.display())]
    Refused { dir: PathBuf, message: String },
    #[error(
        "the status socket {} of journal {} belongs to another user (the mount's); run `ferryfs status` as that user",
        .path.display(), .dir.display()
    )]
    PermissionDenied { dir: PathBuf, path: PathBuf },
    #[error("cannot talk to the status socket {} of journal {}: {source}", .path.display(), .dir.display())]
    Io { dir: PathBuf, path: PathBuf, source: io::Error },
}

/// Where the mount on `journal_dir` listens.
pub fn socket_path(journal_dir: &Path) -> PathBuf {
    journal_dir.join(SOCKET_NAME)
}

/// std would refuse a longer path too, but with a message that names neither the path nor a fix.
fn fits_sun_path(path: &Path) -> bool {
    path.as_os_str().len() < SUN_PATH_MAX
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

// ---------------------------------------------------------------------------------------------
// The server, in the mount.

/// Answers status requests on the journal's socket from a thread of its own until dropped.
pub struct StatusServer {
    path: PathBuf,
    /// (device, inode) of the socket file we bound: `Drop` removes the file only if it still is ours.
    identity: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusServer {
    /// Binds the socket (replacing a stale one, refusing a live one) and starts answering;
    /// `source` is called once per request, on the server's thread.
    pub fn start(journal_dir: &Path, source: Arc<dyn Fn() -> StatusReport + Send + Sync>) -> io::Result<StatusServer> {
        let path = socket_path(journal_dir);
        if !fits_sun_path(&path) {
            let len = path.as_os_str().len();
            let msg = format!(
                "the status socket path {} is {len} bytes, but a Unix socket address holds at most {}; \
                 give the journal a shorter path (e.g. a symlink)",
                path.display(),
                SUN_PATH_MAX - 1
            );
            return Err(io::Error::new(ErrorKind::InvalidInput, msg));
        }
        clear_stale(&path)?;
        let listener = bind_private(&path)?;
        let meta = fs::symlink_metadata(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("ferryfs-status".into())
                .spawn(move || accept_loop(&listener, &*source, &stop))?
        };
        Ok(StatusServer { path, identity: (meta.dev(), meta.ino()), stop, thread: Some(thread) })
    }

    /// The socket this server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn still_ours(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity)
    }
}

impl Drop for StatusServer {
    /// Accept has no timeout, so the thread is woken by a connection of our own; if someone removed
    /// or replaced our socket file, nothing can reach the listener, and the thread is left behind
    /// (one idle thread and descriptor) rather than have drop hang.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if !self.still_ours() {
            tracing::warn!("status socket {} was removed or replaced; leaving its thread", self.path.display());
            return;
        }
        if UnixStream::connect(&self.path).is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!("removing the status socket {}: {e}", self.path.display());
        }
    }
}

/// A socket file left by a mount that died is stale and removed; a live one means another mount
/// of this journal, whose status channel must not be stolen.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !meta.file_type().is_socket() {
        let msg = format!("{} exists and is not a socket; ferryfs will not remove it: move it away", path.display());
        return Err(io::Error::new(ErrorKind::AlreadyExists, msg));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            let msg = format!(
                "another ferryfs mount is running on this journal: its status socket {} answers; unmount it first",
                path.display()
            );
            Err(io::Error::new(ErrorKind::AddrInUse, msg))
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!("replacing the stale status socket {}", path.display());
            fs::remove_file(path).or_else(|e| if e.kind() == ErrorKind::NotFound { Ok(()) } else { Err(e) })
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("probing the status socket {}: {e}", path.display()))),
    }
}

/// Binds and narrows the socket to its owner. The mode is set after bind (umask is per process,
/// so it cannot be narrowed for this thread alone); the journal directory guards that instant.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("binding the status socket {}: {e}", path.display())))?;
    if let Err(e) = fs::set_permissions(path, Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

fn accept_loop(listener: &UnixListener, source: &(dyn Fn() -> StatusReport + Send + Sync), stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, source) {
                    tracing::debug!("status client: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("status socket: accept failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
            }
        }
    }
}

/// One exchange; an empty request (a probe, or a client that gave up) gets no reply.
fn answer(mut stream: UnixStream, source: &dyn Fn() -> StatusReport) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let reply = match read_line_by(&mut stream, deadline, REQUEST_MAX_BYTES) {
        Ok(line) if line.is_empty() => return Ok(()),
        Ok(line) if line.strip_suffix(b"\r").unwrap_or(&line) == REQUEST_STATUS.as_bytes() => report_line(&source()),
        Ok(line) => {
            let req = String::from_utf8_lossy(&line);
            error_line(&format!("unknown request {req:?}; the only request is \"{REQUEST_STATUS}\""))
        }
        Err(ReadFail::Timeout) => error_line(&format!("no request line within {CLIENT_TIMEOUT:?}")),
        Err(ReadFail::TooLong) => error_line(&format!("request longer than {REQUEST_MAX_BYTES} bytes")),
        Err(ReadFail::Io(e)) => return Err(e),
    };
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(reply.as_bytes())
}

fn report_line(r: &StatusReport) -> String {
    match serde_json::to_string(r) {
        Ok(json) => json + "\n",
        Err(e) => error_line(&format!("cannot encode the report: {e}")),
    }
}

fn error_line(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string() + "\n"
}

enum ReadFail {
    Timeout,
    TooLong,
    Io(io::Error),
}

/// Reads one line (returned without its newline; EOF also ends it) of at most `max` bytes by
/// `deadline`. A deadline for the whole line, not per read, so a peer that drips one byte at a time
/// is cut off in time too.
fn read_line_by(stream: &mut UnixStream, deadline: Instant, max: usize) -> Result<Vec<u8>, ReadFail> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadFail::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadFail::Io)?;
        let room = (max - line.len()).min(chunk.len());
        let n = match stream.read(&mut chunk[..room]) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(ReadFail::Timeout),
            Err(e) => return Err(ReadFail::Io(e)),
        };
        let got = &chunk[..n];
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&got[..end]);
            return Ok(line);
        }
        if n == 0 {
            return Ok(line);
        }
        line.extend_from_slice(got);
        if line.len() >= max {
            return Err(ReadFail::TooLong);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client, in `ferryfs status`.

/// Asks the mount on `journal_dir` for its report, giving it `timeout` for the whole exchange.
pub fn query(journal_dir: &Path, timeout: Duration) -> Result<StatusReport, StatusError> {
    let dir = journal_dir.to_path_buf();
    let path = socket_path(journal_dir);
    if !fits_sun_path(&path) {
        return Err(StatusError::PathTooLong { len: path.as_os_str().len(), path });
    }
    let mut stream = connect(&dir, &path)?;
    let deadline = Instant::now() + timeout;
    let write_timeout = timeout.max(Duration::from_millis(1)); // std refuses a zero timeout
    let sent = stream.set_write_timeout(Some(write_timeout)).and_then(|()| stream.write_all(b"status\n"));
    match sent {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(StatusError::Timeout { dir, timeout }),
        Err(source) => return Err(StatusError::Io { dir, path, source }),
    }
    match read_line_by(&mut stream, deadline, REPLY_MAX_BYTES) {
        Ok(line) => parse_reply(dir, &line),
        Err(ReadFail::Timeout) => Err(StatusError::Timeout { dir, timeout }),
        Err(ReadFail::TooLong) => {
            Err(StatusError::BadReply { dir, detail: format!("a reply longer than {REPLY_MAX_BYTES} bytes") })
        }
        Err(ReadFail::Io(source)) => Err(StatusError::Io { dir, path, source }),
    }
}

fn connect(dir: &Path, path: &Path) -> Result<UnixStream, StatusError> {
    let (dir, path_buf) = (dir.to_path_buf(), path.to_path_buf());
    UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound if !dir.is_dir() => StatusError::NoJournal { dir },
        ErrorKind::NotFound => StatusError::NoSocket { dir, path: path_buf },
        ErrorKind::ConnectionRefused => StatusError::Stale { dir, path: path_buf },
        ErrorKind::PermissionDenied => StatusError::PermissionDenied { dir, path: path_buf },
        _ => StatusError::Io { dir, path: path_buf, source: e },
    })
}

/// The version is checked before the fields, so a newer mount gets "version 2", not a missing field.
fn parse_reply(dir: PathBuf, line: &[u8]) -> Result<StatusReport, StatusError> {
    let bad = |detail: String| StatusError::BadReply { dir: dir.clone(), detail };
    if line.is_empty() {
        return Err(bad("an empty reply (the mount closed the connection without answering)".into()));
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| bad(format!("not JSON ({e})")))?;
    if let Some(message) = value.get("error") {
        let message = message.as_str().map_or_else(|| message.to_string(), str::to_owned);
        return Err(StatusError::Refused { dir, message });
    }
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(REPORT_VERSION)) {
        return Err(bad(format!("report version {version:?}, this ferryfs reads version {REPORT_VERSION}")));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("not a status report ({e})")))
}

// ---------------------------------------------------------------------------------------------
// The human form.

const HEADERS: [&str; 8] = ["URL", "STATE", "LAG(REC)", "LAG(BYTES)", "LAG(S)", "DIRTY", "SENT", "ERROR"];
/// Numbers right-aligned so their magnitudes line up; text left-aligned.
const RIGHT_ALIGNED: [bool; 8] = [false, false, true, true, true, true, true, false];

/// The journal on one line, the bunker on one (and a loud line when it is degraded, fenced or
/// holds fsyncs up), then one row per target under a header, columns aligned.
pub fn render_table(r: &StatusReport) -> String {
    let mut out = journal_line(&r.journal) + "\n";
    if let Some(b) = &r.bunker {
        out.push_str(&bunker_lines(b, unix_now()));
    }
    if r.targets.is_empty() {
        out.push_str("no targets\n");
        return out;
    }
    let mut rows = vec![HEADERS.map(String::from)];
    rows.extend(r.targets.iter().map(target_row));
    out + &align(&rows) + &watermark_lines(&r.targets)
}

/// With more than one target: the all-acked watermark, each target's log, and who holds the
/// watermark back or no longer does.
fn watermark_lines(targets: &[TargetStatus]) -> String {
    if targets.len() < 2 {
        return String::new();
    }
    let wm = targets.iter().map(|t| t.watermark_lsn).max().unwrap_or(0);
    let mut out = if wm == 0 {
        "all-acked watermark: none yet (no target holds records in order)\n".to_string()
    } else {
        format!("all-acked watermark: lsn {wm}\n")
    };
    for t in targets {
        let log = match (t.log_start_lsn, t.log_next_lsn) {
            (Some(s), Some(n)) => format!("its log holds lsn {s}..{n}"),
            _ => "its log: not reported".to_string(),
        };
        let role = if t.timed_out {
            ", TIMED OUT (--target-timeout): no longer holds the watermark; resync from its sync map on return"
        } else if t.holds_watermark {
            ", holds the watermark back"
        } else {
            ""
        };
        out.push_str(&format!("  {}: sent {}, acked {}, {log}{role}\n", t.url, t.sent_lsn, t.acked_lsn));
    }
    out
}

fn journal_line(j: &JournalStatus) -> String {
    let percent = match j.size_bytes {
        0 => "-".to_string(),
        size => (u128::from(j.used_bytes) * 100 / u128::from(size)).to_string(),
    };
    let lsns = match j.next_lsn.checked_sub(1) {
        Some(last) if last >= j.start_lsn => format!("lsn {}..={last}", j.start_lsn),
        _ => format!("no records, next lsn {}", j.next_lsn),
    };
    format!(
        "journal {}: {} of {} used ({percent}%), {lsns}, durable {}, checkpoint {}",
        j.dir,
        human_bytes(j.used_bytes),
        human_bytes(j.size_bytes),
        j.durable_lsn,
        j.checkpoint_lsn
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `bunker URL: MODE, STATE, acked lsn N, lag …, sent …`, then the warnings; `now` in Unix seconds.
fn bunker_lines(b: &BunkerStatus, now: u64) -> String {
    let lag_seconds = if b.lag_seconds.is_finite() { format!("{:.1}", b.lag_seconds) } else { "-".into() };
    let mode = if b.mode == b.configured_mode {
        b.mode.clone()
    } else {
        format!("{} (configured {})", b.mode, b.configured_mode)
    };
    let mut out = format!(
        "bunker {}: {mode}, {}, acked lsn {}, lag {} records ({}, {lag_seconds} s), sent {}, reconnects {}",
        b.url,
        b.state,
        b.acked_lsn,
        b.lag_records,
        human_bytes(b.lag_bytes),
        human_bytes(b.bytes_sent),
        b.reconnects
    );
    if let Some(e) = &b.last_error
        && b.fenced_epoch.is_none()
    {
        out.push_str(&format!(", error: {}", error_cell(Some(e))));
    }
    out.push('\n');
    if let Some(epoch) = b.fenced_epoch {
        let why = b.last_error.as_deref().map(|e| format!(": {}", one_line(e))).unwrap_or_default();
        out.push_str(&format!(
            "WARNING: FENCED at epoch {epoch}: a failover promoted another node; this mount is no longer the primary \
             and its bunker takes nothing{why}\n"
        ));
    } else if b.degraded {
        let since = b.degraded_since.map(|s| format!(" for {}s", now.saturating_sub(s))).unwrap_or_default();
        let why = b.degraded_reason.as_deref().map(|r| format!(" ({})", one_line(r))).unwrap_or_default();
        out.push_str(&format!(
            "WARNING: bunker DEGRADED to async{since}{why}: fsync'd writes are only in the local journal until it \
             catches up\n"
        ));
    }
    if b.fsyncs_waiting > 0 && b.fsyncs_waiting_seconds >= b.timeout_seconds {
        out.push_str(&format!(
            "WARNING: {} fsync(s) BLOCKED for {:.1}s waiting for the bunker (--bunker-unreachable {})\n",
            b.fsyncs_waiting, b.fsyncs_waiting_seconds, b.unreachable_policy
        ));
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn target_row(t: &TargetStatus) -> [String; 8] {
    let lag_seconds = if t.lag_seconds.is_finite() { format!("{:.1}", t.lag_seconds) } else { "-".into() };
    [
        t.url.clone(),
        t.state.clone(),
        t.lag_records.to_string(),
        human_bytes(t.lag_bytes),
        lag_seconds,
        t.dirty_blocks.to_string(),
        human_bytes(t.bytes_sent),
        error_cell(t.last_error.as_deref()),
    ]
}

/// One line, and short: a multi-line error would break the table.
fn error_cell(error: Option<&str>) -> String {
    let Some(error) = error else { return "-".into() };
    let one_line = error.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= ERROR_SHOWN_MAX_CHARS {
        return one_line;
    }
    one_line.chars().take(ERROR_SHOWN_MAX_CHARS - 1).chain(['…']).collect()
}

fn align(rows: &[[String; 8]]) -> String {
    let widths: [usize; 8] = std::array::from_fn(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0));
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = (0..8)
            .map(|c| {
                if RIGHT_ALIGNED[c] {
                    format!("{:>1$}", row[c], widths[c])
                } else {
                    format!("{:<1$}", row[c], widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Binary units, three significant digits or so: `0 B`, `1023 B`, `1.0 KiB`, `41.2 MiB`, `412 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 100.0 { format!("{value:.0} {}", UNITS[unit]) } else { format!("{value:.1} {}", UNITS[unit]) }
}
