//! A fault-injecting TCP proxy for integration tests of replication: a primary
//! connects to a target through it, and the test adds latency, cuts the
//! network, silently drops bytes or resets every connection.
//!
//! Standalone (no dependency on the rest of `tests/common`): include it with
//! `#[path = "common/proxy.rs"] mod proxy;` or `mod proxy;` in a `common` module.
//!
//! Design: one accept thread (`poll` on the listener with a 50 ms timeout), and
//! per connection a short-lived setup thread (connects upstream) plus four pump
//! threads: for each direction a reader, which timestamps every chunk it reads
//! and appends it to a bounded queue, and a writer, which writes each chunk once
//! its deadline (read time + delay) has passed. Latency therefore never caps
//! throughput and byte order is kept. Every blocking call wakes at least every
//! 50 ms (socket timeouts, `Condvar::wait_timeout`) to look at the flags, so
//! `Drop` can stop and join every thread within a bounded wait.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often blocked threads wake up to look at the flags.
const POLL: Duration = Duration::from_millis(50);
/// Size of one read.
const CHUNK: usize = 256 * 1024;
/// Bytes queued per direction before the reader stops reading (back-pressure).
/// With a delay `d`, one connection's throughput is at most `QUEUE_CAP / d`.
const QUEUE_CAP: usize = 16 << 20;
/// Time allowed to connect upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `Drop` waits for its threads before giving up on them.
const DROP_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Distinguishes the threads of the proxies of one process (thread names).
static NEXT_PROXY: AtomicU32 = AtomicU32::new(0);

const RUNNING: u8 = 0;
const CLOSED: u8 = 1;
const RESET: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// SO_LINGER {on, 0}: the last close of the socket sends a RST instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd owned by `s`, pointer and length describe `l`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

enum Item {
    Data(Vec<u8>),
    Eof,
}

#[derive(Default)]
struct QState {
    items: VecDeque<(Instant, Item)>,
    bytes: usize,
}

/// One direction's timestamped FIFO.
#[derive(Default)]
struct Queue {
    st: Mutex<QState>,
    cv: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// client → upstream
    Up,
    /// upstream → client
    Down,
}

struct Conn {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
    /// RUNNING, CLOSED (cut / drop) or RESET.
    action: AtomicU8,
    /// Pump threads still running; the last one unregisters the connection,
    /// after which the sockets close when the last `Arc` goes.
    live: AtomicUsize,
    up: Queue,
    down: Queue,
}

impl Conn {
    fn notify(&self) {
        self.up.cv.notify_all();
        self.down.cv.notify_all();
    }

    /// Orderly close of both sockets (FIN to both peers).
    fn close(&self) {
        if self.action.compare_exchange(RUNNING, CLOSED, SeqCst, SeqCst).is_ok() {
            let _ = self.client.shutdown(Shutdown::Both);
            let _ = self.upstream.shutdown(Shutdown::Both);
        }
        self.notify();
    }

    /// Abort: both sockets send a RST when their last descriptor is closed
    /// (the pump threads exit within `POLL`; `SHUT_RD` wakes blocked readers
    /// without sending anything).
    fn reset(&self) {
        if self.action.swap(RESET, SeqCst) == RUNNING {
            set_linger_zero(&self.client);
            set_linger_zero(&self.upstream);
            let _ = self.client.shutdown(Shutdown::Read);
            let _ = self.upstream.shutdown(Shutdown::Read);
        }
        self.notify();
    }
}

struct Shared {
    /// Prefix of the names of this proxy's threads.
    tag: String,
    stop: AtomicBool,
    cut: AtomicBool,
    blackhole: AtomicBool,
    delay_ns: AtomicU64,
    upstream: Mutex<SocketAddr>,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    accepted: AtomicU64,
    reset_gen: AtomicU64,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Every thread spawned and not yet joined. A thread pushes the handles of
    /// the threads it spawns before it ends, so once this is empty, none runs.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(SeqCst))
    }

    fn halted(&self, conn: &Conn) -> bool {
        self.stop.load(SeqCst) || conn.action.load(SeqCst) != RUNNING
    }

    fn spawn(self: &Arc<Self>, role: &str, f: impl FnOnce() + Send + 'static) -> bool {
        match thread::Builder::new().name(format!("{}{}", self.tag, role)).spawn(f) {
            Ok(h) => {
                lock(&self.threads).push(h);
                true
            }
            Err(_) => false,
        }
    }

    /// Joins the threads that have finished.
    fn reap(&self) -> usize {
        let done: Vec<JoinHandle<()>> = {
            let mut v = lock(&self.threads);
            let mut done = Vec::new();
            let mut i = 0;
            while i < v.len() {
                if v[i].is_finished() { done.push(v.swap_remove(i)) } else { i += 1 }
            }
            done
        };
        for h in done {
            let _ = h.join();
        }
        lock(&self.threads).len()
    }

    fn snapshot(&self) -> Vec<Arc<Conn>> {
        lock(&self.conns).values().cloned().collect()
    }
}

pub struct FaultProxy {
    addr: SocketAddr,
    sh: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("proxy: set_nonblocking");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let sh = Arc::new(Shared {
            tag: format!("fpx{}:", NEXT_PROXY.fetch_add(1, SeqCst)),
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            delay_ns: AtomicU64::new(0),
            upstream: Mutex::new(upstream),
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            reset_gen: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh2 = sh.clone();
        assert!(sh.spawn("acc", move || accept_loop(sh2, listener)), "proxy: cannot spawn the accept thread");
        FaultProxy { addr, sh }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// One-way latency added to every chunk in both directions (0 by default).
    /// Applies to chunks read from now on; byte order is always kept.
    pub fn set_delay(&self, d: Duration) {
        self.sh.delay_ns.store(d.as_nanos().min(u64::MAX as u128) as u64, SeqCst);
    }

    /// Where new connections go (a restarted target may listen on a new port).
    pub fn set_upstream(&self, a: SocketAddr) {
        *lock(&self.sh.upstream) = a;
    }

    /// Network cut: closes every current connection (shutdown both ways, both
    /// sides), and accepts then closes at once every new one, until `heal`.
    pub fn cut(&self) {
        self.sh.cut.store(true, SeqCst);
        for c in self.sh.snapshot() {
            c.close();
        }
    }

    /// Bytes are silently discarded in both directions, connections stay open
    /// (a FIN read meanwhile is passed on after `heal`), until `heal`.
    pub fn blackhole(&self) {
        self.sh.blackhole.store(true, SeqCst);
    }

    /// Ends `cut` and `blackhole`.
    pub fn heal(&self) {
        self.sh.cut.store(false, SeqCst);
        self.sh.blackhole.store(false, SeqCst);
    }

    /// Aborts every current connection with a TCP RST to both peers (SO_LINGER
    /// 0, then close); new connections are still allowed.
    pub fn reset_all(&self) {
        self.sh.reset_gen.fetch_add(1, SeqCst);
        for c in self.sh.snapshot() {
            c.reset();
        }
    }

    /// Bytes written upstream so far.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.sh.to_upstream.load(SeqCst)
    }

    /// Bytes written to clients so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.sh.to_client.load(SeqCst)
    }

    /// Connections accepted so far (including those closed at once by a cut).
    pub fn connections(&self) -> u64 {
        self.sh.accepted.load(SeqCst)
    }

    /// Connections currently forwarded.
    pub fn active_connections(&self) -> usize {
        lock(&self.sh.conns).len()
    }

    /// Every thread of this proxy has a name starting with this (to check for
    /// leaks in /proc/self/task/*/comm).
    pub fn thread_name_prefix(&self) -> String {
        self.sh.tag.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let sh = &self.sh;
        sh.stop.store(true, SeqCst);
        for c in sh.snapshot() {
            c.close();
        }
        let deadline = Instant::now() + DROP_JOIN_TIMEOUT;
        loop {
            let left = sh.reap();
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!("FaultProxy {}: {left} thread(s) did not stop within {DROP_JOIN_TIMEOUT:?}", self.addr);
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        // Sockets of connections whose threads did not stop: close what we can.
        lock(&sh.conns).clear();
    }
}

fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    let fd = listener.as_raw_fd();
    while !sh.stop.load(SeqCst) {
        sh.reap();
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
        loop {
            if sh.stop.load(SeqCst) {
                return;
            }
            match listener.accept() {
                Ok((client, _)) => {
                    sh.accepted.fetch_add(1, SeqCst);
                    if sh.cut.load(SeqCst) {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let reset_gen = sh.reset_gen.load(SeqCst);
                    let sh2 = sh.clone();
                    // On failure the closure, hence `client`, is dropped: closed.
                    sh.spawn("set", move || setup(sh2, client, reset_gen));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // EMFILE and the like: do not spin.
                    thread::sleep(POLL);
                    break;
                }
            }
        }
    }
}

fn configure(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(POLL))?;
    s.set_write_timeout(Some(POLL))
}

/// Connects upstream, registers the connection and starts its pumps.
fn setup(sh: Arc<Shared>, client: TcpStream, reset_gen: u64) {
    let up_addr = *lock(&sh.upstream);
    let Ok(upstream) = TcpStream::connect_timeout(&up_addr, CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    if configure(&client).is_err() || configure(&upstream).is_err() {
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    }
    let id = sh.next_id.fetch_add(1, SeqCst);
    let conn = Arc::new(Conn {
        id,
        client,
        upstream,
        action: AtomicU8::new(RUNNING),
        live: AtomicUsize::new(4),
        up: Queue::default(),
        down: Queue::default(),
    });
    lock(&sh.conns).insert(id, conn.clone());
    // cut()/reset_all()/drop set their flag before sweeping the registry, so a
    // connection registered after the sweep sees the flag here.
    if sh.stop.load(SeqCst) || sh.cut.load(SeqCst) {
        conn.close();
    } else if sh.reset_gen.load(SeqCst) != reset_gen {
        conn.reset();
    }
    for (role, dir, reader) in
        [("cuR", Dir::Up, true), ("cuW", Dir::Up, false), ("ucR", Dir::Down, true), ("ucW", Dir::Down, false)]
    {
        let guard = LiveGuard { sh: sh.clone(), conn: conn.clone() };
        let ok = sh.spawn(role, move || {
            if reader {
                pump_read(&guard.sh, &guard.conn, dir)
            } else {
                pump_write(&guard.sh, &guard.conn, dir)
            }
            drop(guard);
        });
        if !ok {
            conn.reset();
        }
    }
}

/// Held by each pump thread; the last one to go unregisters the connection.
struct LiveGuard {
    sh: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.conn.live.fetch_sub(1, SeqCst) == 1 {
            lock(&self.sh.conns).remove(&self.conn.id);
        } else {
            // The other side of this direction may be waiting on the queue.
            self.conn.notify();
        }
    }
}

fn pump_read(sh: &Shared, conn: &Conn, dir: Dir) {
    let (mut src, q) = match dir {
        Dir::Up => (&conn.client, &conn.up),
        Dir::Down => (&conn.upstream, &conn.down),
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        if sh.halted(conn) {
            return;
        }
        match src.read(&mut buf) {
            Ok(0) => {
                if sh.halted(conn) {
                    return;
                }
                let deadline = Instant::now() + sh.delay();
                lock(&q.st).items.push_back((deadline, Item::Eof));
                q.cv.notify_all();
                return;
            }
            Ok(n) => {
                if sh.blackhole.load(SeqCst) {
                    continue;
                }
                let deadline = Instant::now() + sh.delay();
                let mut st = lock(&q.st);
                while st.bytes >= QUEUE_CAP {
                    if sh.halted(conn) {
                        return;
                    }
                    st = q.cv.wait_timeout(st, POLL).unwrap_or_else(|e| e.into_inner()).0;
                }
                st.bytes += n;
                st.items.push_back((deadline, Item::Data(buf[..n].to_vec())));
                drop(st);
                q.cv.notify_all();
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => {
                // The peer reset (or worse): pass the abort on.
                conn.reset();
                return;
            }
        }
    }
}

fn pump_write(sh: &Shared, conn: &Conn, dir: Dir) {
    let (mut dst, q, counter) = match dir {
        Dir::Up => (&conn.upstream, &conn.up, &sh.to_upstream),
        Dir::Down => (&conn.client, &conn.down, &sh.to_client),
    };
    loop {
        let item = {
            let mut st = lock(&q.st);
            loop {
                if sh.halted(conn) {
                    return;
                }
                let wait = match st.items.front() {
                    None => POLL,
                    Some((deadline, _)) => {
                        let now = Instant::now();
                        if *deadline <= now {
                            break;
                        }
                        (*deadline - now).min(POLL)
                    }
                };
                st = q.cv.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0;
            }
            let (_, item) = st.items.pop_front().expect("front checked");
            if let Item::Data(d) = &item {
                st.bytes -= d.len();
            }
            drop(st);
            q.cv.notify_all();
            item
        };
        match item {
            Item::Data(d) => {
                let mut off = 0;
                while off < d.len() {
                    if sh.halted(conn) {
                        return;
                    }
                    if sh.blackhole.load(SeqCst) {
                        break;
                    }
                    match dst.write(&d[off..]) {
                        Ok(0) => {
                            conn.reset();
                            return;
                        }
                        Ok(n) => {
                            off += n;
                            counter.fetch_add(n as u64, SeqCst);
                        }
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => {
                            conn.reset();
                            return;
                        }
                    }
                }
            }
            Item::Eof => {
                // A blackholed FIN is "retransmitted" once healed.
                while sh.blackhole.load(SeqCst) {
                    if sh.halted(conn) {
                        return;
                    }
                    thread::sleep(POLL);
                }
                if !sh.halted(conn) {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                return;
            }
        }
    }
}
