//! The status channel of a running `ferryfs bunker`: the same socket, request and framing as a
//! mount's (see the parent module: `status\n` in, one line of JSON out, then close), in the
//! bunker's `--dir`, answering with a [`BunkerNodeStatus`]. Its `"role": "bunker"` tells
//! `ferryfs status` which report it got ([`query_any`]); a mount's report has no `role`.
//!
//! The server has the parent's fault model: one client at a time, each bounded by
//! [`CLIENT_TIMEOUT`], so a stuck or hostile local client delays the next answer and nothing
//! else.

use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    ACCEPT_RETRY_DELAY, CLIENT_TIMEOUT, REPLY_MAX_BYTES, REQUEST_MAX_BYTES, REQUEST_STATUS, ReadFail, StatusError,
    StatusReport, bind_private, clear_stale, connect, error_line, fits_sun_path, human_bytes, is_timeout, parse_reply,
    read_line_by, socket_path,
};

/// The [`BunkerNodeStatus::role`] of a bunker's report.
pub const ROLE: &str = "bunker";
/// The [`BunkerNodeStatus::version`] this build writes and reads.
pub const BUNKER_REPORT_VERSION: u32 = 1;
/// The words [`PrimaryLink::state`] may hold.
pub const PRIMARY_STATES: [&str; 3] = ["connected", "lost", "never"];

/// What a running bunker reports about itself; the JSON form is the wire format (one line).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BunkerNodeStatus {
    /// Always [`ROLE`].
    pub role: String,
    /// [`BUNKER_REPORT_VERSION`].
    pub version: u32,
    /// The bunker's `--dir`.
    pub dir: String,
    /// The replication set of its log, hex; `None` until the first primary arrived.
    pub set_id: Option<String>,
    /// The replication epoch of its log.
    pub epoch: u64,
    /// A failover fenced this bunker at `epoch`: primaries of lower epochs are refused.
    pub fenced: bool,
    /// The oldest record the log holds.
    pub start_lsn: u64,
    /// The next record it expects.
    pub next_lsn: u64,
    /// The last record it holds durably (what it has acked).
    pub durable_lsn: u64,
    /// The last record every target of the primary holds (the primary's last watermark);
    /// the log may free records up to it, and keeps everything after.
    pub watermark_lsn: u64,
    /// Bytes from the log's start to its end, segment tails included.
    pub log_bytes_used: u64,
    /// The log's capacity (`--log-size` when it was created).
    pub log_size: u64,
    pub primary: PrimaryLink,
    /// Records received and made durable since the bunker started.
    pub records_received: u64,
    /// Bytes of those records.
    pub bytes_received: u64,
}

/// The bunker's primary, as the bunker sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryLink {
    /// One of [`PRIMARY_STATES`]: `connected` (heard from within 5 s), `lost` (was connected,
    /// is not now: see `lost_reason`), `never` (no primary since the bunker started).
    pub state: String,
    /// The primary's address (the current one, or the last one).
    pub addr: Option<String>,
    /// Seconds since anything was last heard from it.
    pub last_heard_secs_ago: Option<f64>,
    /// Why the connection ended.
    pub lost_reason: Option<String>,
    /// When it ended, in seconds since the Unix epoch.
    pub lost_since_unix: Option<u64>,
    /// The last record the bunker held when it ended.
    pub last_record_lsn: Option<u64>,
}

impl BunkerNodeStatus {
    /// The report of a bunker with no log yet.
    pub fn new(dir: &Path) -> BunkerNodeStatus {
        BunkerNodeStatus {
            role: ROLE.into(),
            version: BUNKER_REPORT_VERSION,
            dir: dir.display().to_string(),
            primary: PrimaryLink { state: "never".into(), ..PrimaryLink::default() },
            ..BunkerNodeStatus::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server, in the bunker.

/// Answers status requests on `DIR/ferryfs.sock` from a thread of its own until dropped.
pub struct BunkerStatusServer {
    path: PathBuf,
    /// (device, inode) of the socket we bound: `Drop` removes the file only if it still is ours.
    identity: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Source = Arc<dyn Fn() -> BunkerNodeStatus + Send + Sync>;

impl BunkerStatusServer {
    /// Binds the socket (replacing a stale one, refusing a live one) and starts answering;
    /// `source` is called once per request, on the server's thread.
    pub fn start(dir: &Path, source: Source) -> io::Result<BunkerStatusServer> {
        let path = socket_path(dir);
        if !fits_sun_path(&path) {
            let msg = format!(
                "the status socket path {} is {} bytes, too long for a Unix socket; give --dir a shorter path \
                 (e.g. a symlink)",
                path.display(),
                path.as_os_str().len()
            );
            return Err(io::Error::new(ErrorKind::InvalidInput, msg));
        }
        clear_stale(&path)?;
        let listener = bind_private(&path)?;
        let meta = fs::symlink_metadata(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::Builder::new().name("bunker-status".into()).spawn(move || accept_loop(&listener, &source, &stop))?
        };
        Ok(BunkerStatusServer { path, identity: (meta.dev(), meta.ino()), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BunkerStatusServer {
    /// As the mount's server: wakes the accept with a connection of its own, unless the socket
    /// file was removed or replaced (then the idle thread is left rather than hang).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if !ours {
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

fn accept_loop(listener: &UnixListener, source: &Source, stop: &AtomicBool) {
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
fn answer(mut stream: UnixStream, source: &Source) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let reply = match read_line_by(&mut stream, deadline, REQUEST_MAX_BYTES) {
        Ok(line) if line.is_empty() => return Ok(()),
        Ok(line) if line.strip_suffix(b"\r").unwrap_or(&line) == REQUEST_STATUS.as_bytes() => {
            match serde_json::to_string(&source()) {
                Ok(json) => json + "\n",
                Err(e) => error_line(&format!("cannot encode the report: {e}")),
            }
        }
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

// ---------------------------------------------------------------------------------------------
// The client, in `ferryfs status`.

/// What answered on a directory's status socket.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyReport {
    /// A mount, on its journal directory.
    Mount(StatusReport),
    /// A bunker, on its `--dir`.
    Bunker(BunkerNodeStatus),
}

/// Asks whatever runs on `dir` (a mount's journal, a bunker's `--dir`) for its report, giving
/// it `timeout` for the whole exchange. A mount's reply is read exactly as [`super::query`]
/// reads it.
pub fn query_any(dir: &Path, timeout: Duration) -> Result<AnyReport, StatusError> {
    let dir = dir.to_path_buf();
    let path = socket_path(&dir);
    if !fits_sun_path(&path) {
        return Err(StatusError::PathTooLong { len: path.as_os_str().len(), path });
    }
    let mut stream = connect(&dir, &path)?;
    let deadline = Instant::now() + timeout;
    let write_timeout = timeout.max(Duration::from_millis(1)); // std refuses a zero timeout
    match stream.set_write_timeout(Some(write_timeout)).and_then(|()| stream.write_all(b"status\n")) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(StatusError::Timeout { dir, timeout }),
        Err(source) => return Err(StatusError::Io { dir, path, source }),
    }
    let line = match read_line_by(&mut stream, deadline, REPLY_MAX_BYTES) {
        Ok(line) => line,
        Err(ReadFail::Timeout) => return Err(StatusError::Timeout { dir, timeout }),
        Err(ReadFail::TooLong) => {
            return Err(StatusError::BadReply { dir, detail: format!("a reply longer than {REPLY_MAX_BYTES} bytes") });
        }
        Err(ReadFail::Io(source)) => return Err(StatusError::Io { dir, path, source }),
    };
    match serde_json::from_slice::<serde_json::Value>(&line) {
        Ok(v) if v.get("role").and_then(serde_json::Value::as_str) == Some(ROLE) => parse_bunker(dir, v),
        _ => parse_reply(dir, &line).map(AnyReport::Mount),
    }
}

fn parse_bunker(dir: PathBuf, value: serde_json::Value) -> Result<AnyReport, StatusError> {
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(BUNKER_REPORT_VERSION)) {
        let detail = format!("bunker report version {version:?}, this ferryfs reads version {BUNKER_REPORT_VERSION}");
        return Err(StatusError::BadReply { dir, detail });
    }
    serde_json::from_value(value)
        .map(AnyReport::Bunker)
        .map_err(|e| StatusError::BadReply { dir, detail: format!("not a bunker report ({e})") })
}

// ---------------------------------------------------------------------------------------------
// The human form.

/// A few labelled lines: what the node is (mode), its log, its primary (state), how much it
/// holds for lagging targets (lag), what it received.
pub fn render_bunker(s: &BunkerNodeStatus, now_unix: u64) -> String {
    let set = s.set_id.as_deref().unwrap_or("none yet (no primary has connected)");
    let fenced = if s.fenced { "yes: primaries of lower epochs are refused" } else { "no" };
    let mut out = format!("bunker {}\n", s.dir);
    out += &format!("mode:     bunker (recovery node), replication set {set}, epoch {}, fenced: {fenced}\n", s.epoch);
    out += &format!("log:      {}\n", log_line(s));
    out += &format!("primary:  {}\n", primary_line(&s.primary, now_unix));
    let held = s.durable_lsn.saturating_sub(s.watermark_lsn.max(s.start_lsn.saturating_sub(1)));
    out += &format!(
        "lag:      {held} records past the watermark ({}), kept for targets that may lack them\n",
        if s.watermark_lsn == 0 { "none yet".to_string() } else { format!("lsn {}", s.watermark_lsn) }
    );
    out += &format!(
        "received: {} records, {} since the bunker started\n",
        s.records_received,
        human_bytes(s.bytes_received)
    );
    out
}

fn log_line(s: &BunkerNodeStatus) -> String {
    if s.set_id.is_none() {
        return "none yet: it is created when the first primary connects".into();
    }
    let percent = match s.log_size {
        0 => "-".to_string(),
        size => (u128::from(s.log_bytes_used) * 100 / u128::from(size)).to_string(),
    };
    let lsns = match s.next_lsn.checked_sub(1) {
        Some(last) if last >= s.start_lsn => format!("lsn {}..={last}", s.start_lsn),
        _ => format!("no records, next lsn {}", s.next_lsn),
    };
    format!(
        "{} of {} used ({percent}%), {lsns}, durable {}",
        human_bytes(s.log_bytes_used),
        human_bytes(s.log_size),
        s.durable_lsn
    )
}

fn primary_line(p: &PrimaryLink, now_unix: u64) -> String {
    let addr = p.addr.as_deref().unwrap_or("?");
    let heard = p.last_heard_secs_ago.map_or(String::new(), |s| format!(", last heard {s:.1} s ago"));
    match p.state.as_str() {
        "connected" => format!("connected {addr}{heard}"),
        "lost" => {
            let since = p
                .lost_since_unix
                .map_or("?".to_string(), |t| format!("{} ({} s ago)", utc(t), now_unix.saturating_sub(t)));
            let last = p.last_record_lsn.map_or("?".to_string(), |l| l.to_string());
            let why = p.lost_reason.as_deref().unwrap_or("unknown");
            format!("lost since {since}, last record {last}: {addr}: {why}")
        }
        "never" => "none since the bunker started".into(),
        other => format!("{other} {addr}{heard}"),
    }
}

/// `2024-05-01T10:00:00Z` from seconds since the Unix epoch (proleptic Gregorian calendar).
fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days, shifted so that eras start on 0000-03-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_right_around_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    fn report() -> BunkerNodeStatus {
        let mut s = BunkerNodeStatus::new(Path::new("/b"));
        s.set_id = Some("07".repeat(16));
        s.epoch = 3;
        s.start_lsn = 1;
        s.next_lsn = 101;
        s.durable_lsn = 100;
        s.watermark_lsn = 60;
        s.log_size = 1 << 30;
        s.log_bytes_used = 1 << 20;
        s
    }

    #[test]
    fn the_table_says_mode_state_and_lag() {
        let mut s = report();
        s.primary = PrimaryLink {
            state: "lost".into(),
            addr: Some("127.0.0.1:9".into()),
            last_heard_secs_ago: Some(7.0),
            lost_reason: Some("the primary was silent for 5s".into()),
            lost_since_unix: Some(1_700_000_000),
            last_record_lsn: Some(100),
        };
        let t = render_bunker(&s, 1_700_000_012);
        assert!(t.contains("mode:     bunker (recovery node)"), "{t}");
        assert!(t.contains("epoch 3, fenced: no"), "{t}");
        assert!(t.contains("lsn 1..=100, durable 100"), "{t}");
        assert!(t.contains("primary:  lost since 2023-11-14T22:13:20Z (12 s ago), last record 100"), "{t}");
        assert!(t.contains("lag:      40 records past the watermark (lsn 60)"), "{t}");
    }

    #[test]
    fn a_bunker_report_round_trips_through_its_json_and_keeps_its_role() {
        let s = report();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["role"], "bunker");
        assert_eq!(parse_bunker(PathBuf::from("/b"), json).unwrap(), AnyReport::Bunker(s));
        let mut newer = serde_json::to_value(report()).unwrap();
        newer["version"] = 2.into();
        let e = parse_bunker(PathBuf::from("/b"), newer).unwrap_err().to_string();
        assert!(e.contains("bunker report version Some(2)"), "{e}");
    }

    #[test]
    fn the_server_answers_with_the_bunker_report_and_the_client_tells_it_from_a_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let source: Source = Arc::new(report);
        let server = BunkerStatusServer::start(dir.path(), source).unwrap();
        match query_any(dir.path(), Duration::from_secs(5)).unwrap() {
            AnyReport::Bunker(b) => assert_eq!(b, report()),
            other => panic!("expected a bunker report, got {other:?}"),
        }
        drop(server);
        assert!(!socket_path(dir.path()).exists(), "the socket is removed on drop");
    }
}
