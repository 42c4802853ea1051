//! The status channel against real sockets in private temp directories (so tests run in parallel),
//! and the table against golden fragments.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Longer than the server gives a silent client, so a query queued behind one still succeeds.
const PATIENT: Duration = Duration::from_secs(10);

fn sample() -> StatusReport {
    StatusReport::new(
        JournalStatus {
            dir: "/var/lib/ferry/j".into(),
            size_bytes: 1 << 30,
            used_bytes: 412 << 20,
            start_lsn: 1,
            next_lsn: 52312,
            durable_lsn: 52311,
            checkpoint_lsn: 52000,
        },
        vec![
            TargetStatus {
                url: "ferry://backup-1:7070".into(),
                state: "in-sync".into(),
                acked_lsn: 52311,
                bytes_sent: 3 << 30,
                ..TargetStatus::default()
            },
            TargetStatus {
                url: "ferry://dr.example.net:7070".into(),
                state: "disconnected".into(),
                acked_lsn: 40000,
                lag_records: 12311,
                lag_bytes: 96 << 20,
                lag_seconds: 73.25,
                dirty_blocks: 2048,
                bytes_sent: 5 << 20,
                bytes_resync: 1 << 20,
                reconnects: 3,
                last_error: Some("connection refused\n(os error 111)".into()),
                ..TargetStatus::default()
            },
        ],
    )
}

fn serve(dir: &Path, report: StatusReport) -> StatusServer {
    StatusServer::start(dir, Arc::new(move || report.clone())).expect("start the status server")
}

/// The line the server sends back to a raw request. Only the line: after a request the server did
/// not read to its end, its close resets the connection (ECONNRESET after the reply, not EOF).
fn raw_exchange(dir: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket_path(dir)).unwrap();
    s.set_read_timeout(Some(PATIENT)).unwrap();
    s.write_all(request).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    reply
}

/// A stand-in mount that answers every connection with `reply` after reading its request.
fn fake_mount(dir: &Path, reply: &'static [u8]) {
    let listener = UnixListener::bind(socket_path(dir)).unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = s.write_all(reply);
        }
    });
}

/// A socket file whose listener is gone, as a killed mount leaves it.
fn leave_stale_socket(dir: &Path) {
    drop(UnixListener::bind(socket_path(dir)).unwrap());
    assert!(socket_path(dir).exists());
}

#[test]
fn query_returns_what_the_source_reports() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), sample());
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample());
}

#[test]
fn socket_is_private_and_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), sample());
    assert_eq!(server.path(), socket_path(dir.path()));
    let mode = std::fs::metadata(server.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(server);
    assert!(!socket_path(dir.path()).exists());
    assert!(matches!(query(dir.path(), PATIENT), Err(StatusError::NoSocket { .. })));
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    leave_stale_socket(dir.path());
    let _server = serve(dir.path(), sample());
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample());
}

#[test]
fn second_server_on_a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = serve(dir.path(), sample());
    let err = StatusServer::start(dir.path(), Arc::new(StatusReport::default)).err().expect("refused");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("another ferryfs mount is running"), "{err}");
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample(), "the first server still answers");
}

#[test]
fn a_file_in_the_way_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(socket_path(dir.path()), b"precious").unwrap();
    let err = StatusServer::start(dir.path(), Arc::new(StatusReport::default)).err().expect("refused");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(socket_path(dir.path())).unwrap(), b"precious");
}

#[test]
fn drop_leaves_a_socket_that_replaced_ours() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), sample());
    std::fs::remove_file(socket_path(dir.path())).unwrap();
    let _other = UnixListener::bind(socket_path(dir.path())).unwrap();
    drop(server); // must return, not wait for a thread nothing can wake
    assert!(socket_path(dir.path()).exists());
}

#[test]
fn garbage_requests_get_an_error_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), sample());
    let unknown = raw_exchange(dir.path(), b"hello\n");
    assert!(unknown.starts_with(r#"{"error":"unknown request \"hello\""#), "{unknown}");
    let long = raw_exchange(dir.path(), &[b'x'; 1000]);
    assert!(long.contains("request longer than 256 bytes"), "{long}");
    let binary = raw_exchange(dir.path(), b"\xff\x00\xfe\n");
    assert!(binary.starts_with(r#"{"error":"unknown request"#), "{binary}");
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample());
}

#[test]
fn a_client_that_hangs_up_early_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), sample());
    for _ in 0..3 {
        let mut s = UnixStream::connect(socket_path(dir.path())).unwrap();
        s.write_all(b"status\n").unwrap();
    }
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample());
}

#[test]
fn a_silent_client_delays_the_next_answer_by_at_most_the_client_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), sample());
    let _silent = UnixStream::connect(socket_path(dir.path())).unwrap();
    thread::sleep(Duration::from_millis(50)); // let the server take the silent one first
    let started = Instant::now();
    assert_eq!(query(dir.path(), PATIENT).unwrap(), sample());
    assert!(started.elapsed() < CLIENT_TIMEOUT + Duration::from_secs(2), "{:?}", started.elapsed());
}

#[test]
fn a_silent_client_is_told_why_it_was_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), sample());
    let reply = raw_exchange(dir.path(), b"stat"); // and then nothing, with the socket kept open
    assert!(reply.contains("no request line within 2s"), "{reply}");
}

#[test]
fn query_without_a_mount_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = query(dir.path(), PATIENT).unwrap_err();
    assert!(matches!(err, StatusError::NoSocket { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("no ferryfs mount is running on journal {}", dir.path().display())), "{msg}");
    assert!(msg.contains(&socket_path(dir.path()).display().to_string()), "{msg}");
}

#[test]
fn query_of_a_missing_directory_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = query(&dir.path().join("nope"), PATIENT).unwrap_err();
    assert!(matches!(err, StatusError::NoJournal { .. }), "{err:?}");
}

#[test]
fn query_of_a_stale_socket_says_stale() {
    let dir = tempfile::tempdir().unwrap();
    leave_stale_socket(dir.path());
    let err = query(dir.path(), PATIENT).unwrap_err();
    assert!(matches!(err, StatusError::Stale { .. }), "{err:?}");
    assert!(err.to_string().contains("stale"));
}

#[test]
fn query_of_a_mount_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let _listener = UnixListener::bind(socket_path(dir.path())).unwrap(); // never accepts
    let started = Instant::now();
    let err = query(dir.path(), Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, StatusError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn query_rejects_replies_it_cannot_read() {
    let cases: [(&'static [u8], &str); 4] = [
        (b"not json\n", "not JSON"),
        (b"{\"version\":2}\n", "report version Some(2)"),
        (b"{\"version\":1}\n", "not a status report"),
        (b"", "empty reply"),
    ];
    for (reply, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        fake_mount(dir.path(), reply);
        let err = query(dir.path(), PATIENT).unwrap_err();
        assert!(matches!(err, StatusError::BadReply { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}

#[test]
fn query_reports_an_error_reply_as_refused() {
    let dir = tempfile::tempdir().unwrap();
    fake_mount(dir.path(), b"{\"error\":\"busy\"}\n");
    let err = query(dir.path(), PATIENT).unwrap_err();
    assert!(matches!(&err, StatusError::Refused { message, .. } if message == "busy"), "{err:?}");
}

#[test]
fn paths_too_long_for_a_socket_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(120));
    std::fs::create_dir(&deep).unwrap();
    let err = query(&deep, PATIENT).unwrap_err();
    assert!(matches!(err, StatusError::PathTooLong { .. }), "{err:?}");
    assert!(err.to_string().contains("shorter path"), "{err}");
    let err = StatusServer::start(&deep, Arc::new(StatusReport::default)).err().expect("refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("shorter path"), "{err}");
}

#[test]
fn report_json_round_trips_and_omits_nothing() {
    let json = serde_json::to_string(&sample()).unwrap();
    for field in ["\"lag_seconds\":73.25", "\"last_error\":null", "\"checkpoint_lsn\":52000", "\"version\":1"] {
        assert!(json.contains(field), "{field} in {json}");
    }
    assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), sample());
}

#[test]
fn human_bytes_uses_binary_units() {
    let cases = [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (412 << 20, "412 MiB"),
        (1 << 30, "1.0 GiB"),
        (u64::MAX, "16.0 EiB"),
    ];
    for (n, expected) in cases {
        assert_eq!(human_bytes(n), expected, "{n}");
    }
}

#[test]
fn table_shows_the_journal_line_and_aligned_columns() {
    let table = render_table(&sample());
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "journal /var/lib/ferry/j: 412 MiB of 1.0 GiB used (40%), lsn 1..=52311, durable 52311, checkpoint 52000"
    );
    for header in HEADERS {
        assert!(lines[1].contains(header), "{header} in {}", lines[1]);
    }
    // The table rows, then the watermark line and one line per target (two targets).
    assert_eq!(lines.len(), 4 + 3, "{table}");
    let state_column = lines[1].find("STATE").unwrap();
    assert_eq!(lines[2].find("in-sync"), Some(state_column));
    assert_eq!(lines[3].find("disconnected"), Some(state_column));
    let sent_end = lines[1].find("SENT").unwrap() + "SENT".len();
    assert_eq!(lines[2].find("3.0 GiB").map(|i| i + "3.0 GiB".len()), Some(sent_end));
    assert!(lines[3].contains("96.0 MiB"), "{}", lines[3]);
    assert!(lines[3].contains("73.2"), "{}", lines[3]);
    assert!(lines[3].ends_with("connection refused (os error 111)"), "{}", lines[3]);
    assert!(lines[2].ends_with(" -"), "no error shows as a dash: {}", lines[2]);
    assert!(table.lines().all(|l| l == l.trim_end()), "no trailing spaces");
}

#[test]
fn table_without_targets_says_so() {
    let mut r = sample();
    r.targets.clear();
    r.journal = JournalStatus { dir: "/j".into(), start_lsn: 7, next_lsn: 7, ..JournalStatus::default() };
    assert_eq!(
        render_table(&r),
        "journal /j: 0 B of 0 B used (-%), no records, next lsn 7, durable 0, checkpoint 0\nno targets\n"
    );
}

#[test]
fn long_errors_are_cut_in_the_table() {
    let mut r = sample();
    r.targets[0].last_error = Some("e".repeat(500));
    let table = render_table(&r);
    let row = table.lines().nth(2).unwrap();
    assert!(row.ends_with('…'), "{row}");
    assert!(row.chars().count() < 200, "{row}");
}

fn bunker_sample() -> BunkerStatus {
    BunkerStatus {
        url: "tcp://bunker:7080".into(),
        mode: "sync".into(),
        configured_mode: "sync".into(),
        state: "in-sync".into(),
        acked_lsn: 52311,
        bytes_sent: 3 << 30,
        unreachable_policy: "degrade".into(),
        timeout_seconds: 5.0,
        ..BunkerStatus::default()
    }
}

#[test]
fn table_shows_the_bunker_under_the_journal_line() {
    let mut r = sample();
    r.bunker = Some(bunker_sample());
    let table = render_table(&r);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[1],
        "bunker tcp://bunker:7080: sync, in-sync, acked lsn 52311, lag 0 records (0 B, 0.0 s), sent 3.0 GiB, \
         reconnects 0"
    );
    assert!(lines[2].starts_with("URL"), "the targets follow: {table}");
    assert!(!table.contains("WARNING"), "{table}");
}

#[test]
fn a_degraded_bunker_gets_a_loud_line_with_since_and_why() {
    let b = BunkerStatus {
        mode: "async".into(),
        state: "degraded".into(),
        degraded: true,
        degraded_since: Some(1_000),
        degraded_reason: Some("unreachable for 5s (last error: connection\nrefused)".into()),
        lag_records: 12,
        last_error: Some("connecting to 10.0.0.9:7080: connection refused".into()),
        ..bunker_sample()
    };
    let text = bunker_lines(&b, 1_042);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("bunker tcp://bunker:7080: async (configured sync), degraded, "), "{text}");
    assert!(lines[0].ends_with("error: connecting to 10.0.0.9:7080: connection refused"), "{text}");
    assert_eq!(
        lines[1],
        "WARNING: bunker DEGRADED to async for 42s (unreachable for 5s (last error: connection refused)): fsync'd \
         writes are only in the local journal until it catches up"
    );
}

#[test]
fn a_fenced_bunker_and_blocked_fsyncs_get_loud_lines() {
    let b = BunkerStatus {
        mode: "async".into(),
        state: "fenced".into(),
        fenced_epoch: Some(4),
        last_error: Some("FENCED: bunker tcp://bunker:7080 was fenced by a failover at epoch 4".into()),
        ..bunker_sample()
    };
    let text = bunker_lines(&b, 0);
    assert!(text.lines().nth(1).unwrap().starts_with("WARNING: FENCED at epoch 4: a failover promoted"), "{text}");
    assert!(!text.lines().next().unwrap().contains("error:"), "the error is on the loud line: {text}");
    let b = BunkerStatus {
        unreachable_policy: "wait".into(),
        state: "disconnected".into(),
        fsyncs_waiting: 3,
        fsyncs_waiting_seconds: 12.5,
        ..bunker_sample()
    };
    let text = bunker_lines(&b, 0);
    assert_eq!(
        text.lines().nth(1),
        Some("WARNING: 3 fsync(s) BLOCKED for 12.5s waiting for the bunker (--bunker-unreachable wait)")
    );
    let short = BunkerStatus { fsyncs_waiting_seconds: 0.01, ..b };
    assert_eq!(bunker_lines(&short, 0).lines().count(), 1, "an fsync waiting a moment is normal in sync mode");
}

#[test]
fn the_bunker_is_in_the_json_and_reports_without_it_still_parse() {
    let mut r = sample();
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"bunker\":null"), "{json}");
    r.bunker = Some(BunkerStatus { degraded: true, degraded_since: Some(7), ..bunker_sample() });
    let json = serde_json::to_string(&r).unwrap();
    for field in ["\"degraded\":true", "\"degraded_since\":7", "\"configured_mode\":\"sync\"", "\"fenced_epoch\":null"]
    {
        assert!(json.contains(field), "{field} in {json}");
    }
    assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), r);
    let older = serde_json::to_string(&sample()).unwrap().replace(",\"bunker\":null", "");
    assert!(!older.contains("bunker"));
    assert_eq!(serde_json::from_str::<StatusReport>(&older).unwrap(), sample());
}

#[test]
fn the_table_shows_the_watermark_each_targets_log_and_who_holds_it_back() {
    let mut r = sample();
    let (a, b) = (r.targets[0].url.clone(), r.targets[1].url.clone());
    for t in &mut r.targets {
        t.watermark_lsn = 40000;
    }
    r.targets[0].sent_lsn = 52311;
    (r.targets[0].log_start_lsn, r.targets[0].log_next_lsn) = (Some(40001), Some(52312));
    r.targets[1].holds_watermark = true;
    let text = render_table(&r);
    assert!(text.contains("all-acked watermark: lsn 40000"), "{text}");
    assert!(text.contains(&format!("{a}: sent 52311, acked 52311, its log holds lsn 40001..52312\n")), "{text}");
    assert!(
        text.contains(&format!("{b}: sent 0, acked 40000, its log: not reported, holds the watermark back")),
        "{text}"
    );
    r.targets[1].timed_out = true;
    assert!(render_table(&r).contains("TIMED OUT (--target-timeout)"));
    // One target: no watermark lines (its own acks are the watermark).
    r.targets.truncate(1);
    assert!(!render_table(&r).contains("watermark"));
}
