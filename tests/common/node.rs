//! A long-running `ferryfs` node process (`bunker`, `failback`, …) that listens on a
//! 127.0.0.1 port of its own choosing, logs to a file, and is killed when dropped.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::ferryfs;

pub struct NodeProc {
    pub addr: SocketAddr,
    /// Arguments after `ferryfs`; `--listen ADDR` is added (port 0 the first time, the same
    /// address on restart).
    args: Vec<OsString>,
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProc {
    pub fn start(log: PathBuf, args: Vec<OsString>) -> NodeProc {
        let mut n = NodeProc { addr: "127.0.0.1:0".parse().unwrap(), args, child: None, log };
        n.spawn();
        n
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let before = self.log().len();
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = ferryfs();
        cmd.args(&self.args)
            .arg("--listen")
            .arg(self.addr.to_string())
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
        self.child = Some(cmd.spawn().expect("spawn ferryfs node"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(addr) = super::listening_on(&log[before..]) {
                self.addr = addr;
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ferryfs {:?} exited with {st}:\n{log}", self.args.first());
            }
            assert!(Instant::now() < deadline, "ferryfs {:?} did not listen:\n{log}", self.args.first());
            sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: still running");
        self.spawn();
    }

    /// SIGTERM and wait (bounded), then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a signal to our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- node output ({}) ----\n{}\n---- end ----", self.log.display(), self.log());
        }
    }
}
