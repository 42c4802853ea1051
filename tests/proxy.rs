//! Self-test of the fault-injecting TCP proxy (`tests/common/proxy.rs`) used by
//! the replication tests, against small echo / sink / silent servers.

#[path = "common/proxy.rs"]
mod proxy;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proxy::FaultProxy;

/// Generous bound for anything that should happen "at once" (loaded CI machine).
const PROMPT: Duration = Duration::from_secs(10);

/// Starts a server on 127.0.0.1:0 running `serve` on every connection, each in
/// its own thread. The threads live until the test process exits.
fn server(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Echoes everything back; on EOF, half-closes.
fn echo_server() -> SocketAddr {
    server(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Accepts and never reads nor writes (keeps the sockets open).
fn silent_server() -> SocketAddr {
    let held = Arc::new(Mutex::new(Vec::new()));
    server(move |s| held.lock().unwrap().push(s))
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn connect(p: &FaultProxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    s.set_write_timeout(Some(PROMPT)).unwrap();
    s
}

/// Deterministic pseudo-random bytes.
struct Rng(u64);
impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        Rng(seed | 1).fill(&mut v);
        v
    }
}

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Sends `data` from another thread while reading the echo; returns what came back.
fn echo_bulk(s: &TcpStream, data: Vec<u8>) -> Vec<u8> {
    let n = data.len();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&data).unwrap());
    let mut back = vec![0u8; n];
    (&*s).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    back
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PROMPT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that the peer closed `s` (EOF or reset) within `PROMPT`.
fn assert_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(PROMPT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                panic!("{what}: connection still open after {PROMPT:?}")
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Asserts that nothing arrives on `s` for `quiet`, and that it is not closed.
fn assert_stalled(s: &mut TcpStream, quiet: Duration, what: &str) {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected a read timeout, got {other:?}"),
    }
    s.set_read_timeout(Some(PROMPT)).unwrap();
}

/// Threads whose name starts with `prefix` in this process.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with(prefix))
        .count()
}

#[test]
fn passes_bytes_unchanged_and_counts_them() {
    let p = FaultProxy::start(echo_server());
    assert_eq!(p.url(), format!("tcp://127.0.0.1:{}", p.addr().port()));
    let mut s = connect(&p);
    let data = Rng::bytes(1, 1 << 20);
    let back = echo_bulk(&s, data.clone());
    assert!(back == data, "1 MiB came back altered");
    // Half-close passes through: the echo server sees EOF and closes.
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    wait_until("counters", || p.bytes_to_upstream() == 1 << 20 && p.bytes_to_client() == 1 << 20);
    assert_eq!(p.connections(), 1);
    wait_until("connection to be unregistered", || p.active_connections() == 0);
}

#[test]
fn large_transfer_at_loopback_speed() {
    const TOTAL: usize = 100 << 20;
    const BLOCK: usize = 1 << 20;
    let p = FaultProxy::start(echo_server());
    let s = connect(&p);
    let mut w = s.try_clone().unwrap();
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        let mut rng = Rng(7);
        let mut buf = vec![0u8; BLOCK];
        for _ in 0..TOTAL / BLOCK {
            rng.fill(&mut buf);
            w.write_all(&buf).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut rng = Rng(7);
    let (mut want, mut got) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    for i in 0..TOTAL / BLOCK {
        rng.fill(&mut want);
        (&s).read_exact(&mut got).unwrap();
        assert!(got == want, "block {i} altered");
    }
    assert_eq!((&s).read(&mut got).unwrap(), 0, "expected EOF after the echo");
    writer.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("100 MiB echoed through the proxy in {secs:.2} s ({:.0} MiB/s each way)", 100.0 / secs);
    assert!(secs < 60.0, "100 MiB took {secs:.1} s");
    wait_until("counters", || p.bytes_to_upstream() == TOTAL as u64 && p.bytes_to_client() == TOTAL as u64);
}

#[test]
fn delay_is_observed_without_capping_throughput() {
    let p = FaultProxy::start(echo_server());
    p.set_delay(Duration::from_millis(200));
    let mut s = connect(&p);
    for _ in 0..3 {
        let t0 = Instant::now();
        echo_roundtrip(&mut s, b"ping");
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(400), "round trip {rtt:?} < 2 x 200 ms");
        assert!(rtt < Duration::from_secs(5), "round trip {rtt:?}");
    }
    // 10 MiB both ways, order kept, not one chunk per delay.
    let data = Rng::bytes(2, 10 << 20);
    let t0 = Instant::now();
    let back = echo_bulk(&s, data.clone());
    let took = t0.elapsed();
    assert!(back == data, "10 MiB came back altered or reordered");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(10), "10 MiB with 200 ms delay took {took:?}");
    // Back to no delay.
    p.set_delay(Duration::ZERO);
    let t0 = Instant::now();
    echo_roundtrip(&mut s, b"pong");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn cut_closes_live_connections_and_refuses_new_ones_until_heal() {
    let p = FaultProxy::start(echo_server());
    let mut live = connect(&p);
    echo_roundtrip(&mut live, b"before");
    let mut idle = connect(&p);
    echo_roundtrip(&mut idle, b"idle");

    p.cut();
    assert_closed(&mut live, "live connection after cut");
    assert_closed(&mut idle, "idle connection after cut");
    for i in 0..3 {
        // Accepted, then closed at once.
        let mut s = connect(&p);
        assert_closed(&mut s, &format!("new connection {i} during cut"));
    }
    wait_until("connections to be unregistered", || p.active_connections() == 0);
    assert_eq!((p.bytes_to_upstream(), p.bytes_to_client()), (10, 10));

    p.heal();
    let mut s = connect(&p);
    echo_roundtrip(&mut s, b"after heal");
    assert_eq!(p.connections(), 6);
}

#[test]
fn blackhole_stalls_without_closing_until_heal() {
    let p = FaultProxy::start(echo_server());
    let mut old = connect(&p);
    echo_roundtrip(&mut old, b"before");
    wait_until("counters", || (p.bytes_to_upstream(), p.bytes_to_client()) == (6, 6));

    p.blackhole();
    old.write_all(b"lost").unwrap();
    assert_stalled(&mut old, Duration::from_millis(500), "old connection in blackhole");
    let mut new = connect(&p);
    new.write_all(b"lost too").unwrap();
    assert_stalled(&mut new, Duration::from_millis(500), "new connection in blackhole");
    // Still open: writes succeed and nothing was forwarded.
    old.write_all(b"still open").unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!((p.bytes_to_upstream(), p.bytes_to_client()), (6, 6));
    assert_eq!(p.active_connections(), 2);

    p.heal();
    let mut fresh = connect(&p);
    echo_roundtrip(&mut fresh, b"after heal");
    // The old connections carry bytes again (what was sent before is gone,
    // barring a pump thread that did not run at all for 500 ms).
    for s in [&mut old, &mut new] {
        s.write_all(b"!").unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while got.last() != Some(&b'!') {
            s.read_exact(&mut b).unwrap();
            got.push(b[0]);
        }
    }
}

#[test]
fn reset_all_gives_the_client_econnreset() {
    let p = FaultProxy::start(echo_server());
    let mut a = connect(&p);
    echo_roundtrip(&mut a, b"a");
    let mut b = connect(&p);
    echo_roundtrip(&mut b, b"b");

    p.reset_all();
    for (s, name) in [(&mut a, "a"), (&mut b, "b")] {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("{name}: expected ECONNRESET, got {other:?}"),
        }
    }
    // New connections are still allowed.
    let mut c = connect(&p);
    echo_roundtrip(&mut c, b"c");
    assert_eq!(p.connections(), 3);
}

#[test]
fn upstream_failure_closes_the_client_and_set_upstream_redirects() {
    let p = FaultProxy::start(dead_addr());
    let mut s = connect(&p);
    assert_closed(&mut s, "client of an unreachable upstream");

    // The target "restarts" on another port.
    p.set_upstream(echo_server());
    let mut s = connect(&p);
    echo_roundtrip(&mut s, b"restarted");
}

#[test]
fn drop_returns_promptly_and_leaves_no_threads() {
    let p = FaultProxy::start(echo_server());
    let prefix = p.thread_name_prefix();

    // An idle connection, one with delayed bytes in flight, and one whose
    // upstream never reads while the client keeps writing (pump blocked in write).
    let mut idle = connect(&p);
    echo_roundtrip(&mut idle, b"idle");
    p.set_delay(Duration::from_secs(3600));
    let mut delayed = connect(&p);
    delayed.write_all(&[1u8; 100_000]).unwrap();
    p.set_delay(Duration::ZERO);
    p.set_upstream(silent_server());
    let stuck = connect(&p);
    let mut w = stuck.try_clone().unwrap();
    let flooder = thread::spawn(move || {
        let buf = vec![0u8; 1 << 20];
        // Ends with an error once the proxy closes the connection.
        for _ in 0..1024 {
            if w.write_all(&buf).is_err() {
                return;
            }
        }
        panic!("1 GiB went into a server that never reads");
    });
    wait_until("the flood to reach the silent server", || p.bytes_to_upstream() > 1 << 20);
    thread::sleep(Duration::from_millis(500));
    assert!(!flooder.is_finished());
    assert!(threads_named(&prefix) >= 13, "{} threads", threads_named(&prefix));

    let t0 = Instant::now();
    drop(p);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "drop took {took:?}");
    assert_eq!(threads_named(&prefix), 0, "proxy threads left after drop");

    assert_closed(&mut idle, "idle connection after drop");
    assert_closed(&mut delayed, "delayed connection after drop");
    flooder.join().unwrap();
}
