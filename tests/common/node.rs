//! A long-running `ferryfs` node process (`bunker`, `failback`, `target` …) that listens on a
//! 127.0.0.1 port of its own choosing, logs to a file, and is killed when dropped: the one
//! harness the tests start, stop, restart and read the log of their daemons with (`TargetProc`
//! and the bunker tests' `BunkerProc` wrap it).

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::ferryfs;

/// How long `start` waits for a node to say where it listens.
const LISTEN_WITHIN: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(20);

pub struct NodeProc {
    pub addr: SocketAddr,
    /// Arguments after `ferryfs`, then `--listen ADDR` (port 0 the first time, the same
    /// address on restart), then `after_listen`.
    args: Vec<OsString>,
    after_listen: Vec<OsString>,
    /// How long a start waits for the "listening on" line.
    listen_within: Duration,
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProc {
    /// Starts `ferryfs ARGS --listen 127.0.0.1:0`, logging to `log`.
    pub fn start(log: PathBuf, args: Vec<OsString>) -> NodeProc {
        NodeProc::start_with(log, args, Vec::new(), LISTEN_WITHIN)
    }

    /// Starts `ferryfs ARGS --listen 127.0.0.1:0 AFTER_LISTEN`, logging to `log`, waiting at
    /// most `listen_within` for it to listen.
    pub fn start_with(
        log: PathBuf,
        args: Vec<OsString>,
        after_listen: Vec<OsString>,
        listen_within: Duration,
    ) -> NodeProc {
        let mut n =
            NodeProc { addr: "127.0.0.1:0".parse().unwrap(), args, after_listen, listen_within, child: None, log };
        n.spawn();
        n
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Everything the node (all its runs) wrote to its log.
    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The subcommand, for messages.
    fn name(&self) -> String {
        self.args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let before = self.log().len();
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = ferryfs();
        cmd.args(&self.args)
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.after_listen)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child before exec; it only sets the death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn ferryfs {}: {e}", self.name())));
        let deadline = Instant::now() + self.listen_within;
        loop {
            let log = self.log();
            if let Some(addr) = super::listening_on(&log[before..]) {
                self.addr = addr;
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ferryfs {} exited with {st}:\n{log}", self.name());
            }
            assert!(Instant::now() < deadline, "ferryfs {} did not listen:\n{log}", self.name());
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same address (and arguments).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: still running");
        self.spawn();
    }

    /// SIGTERM and wait (bounded), then SIGKILL.
    pub fn stop(&mut self) {
        self.terminate(STOP_WITHIN);
    }

    /// SIGTERM and wait at most `within`: the exit status, or `None` (after a SIGKILL) when it
    /// did not exit in time or was not running.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: a signal to our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let status = super::wait_timeout(&mut c, within);
        if status.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        status
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- {} output ({}) ----\n{}\n---- end ----", self.name(), self.log.display(), self.log());
        }
    }
}
