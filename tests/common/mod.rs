//! Test harness shared by the integration suites: mounts ferryfs on fresh temp
//! dirs and never leaves a mount behind, even when a test panics.
//!
//! `FERRYFS_TEST_FS` picks what is mounted instead:
//!   ferryfs (default)  `ferryfs mount MNT --backing B --journal J [args]`
//!   bindfs             `bindfs -f -o allow_other,default_permissions B MNT`, a
//!                      plain FUSE passthrough without a journal
//!   bind               `mount --bind B MNT` (no FUSE): the reference semantics,
//!                      to check the tests themselves; all should pass on it
//! `FERRYFS_TEST_ARGS="--writeback-cache ..."` adds options to every
//! `ferryfs mount` (to run the suites in another mode).
//! `FERRYFS_TEST_SHOW_LOG=1` prints the daemon's output at the end of every test
//! (it is always printed when a test fails).
//!
//! Layout of one mount's temp dir (mode 0755 so that uid 65534 can reach it):
//!   backing/   the backing directory (`--backing`)
//!   journal/   the journal directory (`--journal`), created empty
//!   mnt/       the mount point
//!   plain-N/   scratch directories on the same filesystem as backing/, for
//!              comparing behaviour with the native filesystem (`plain_dir`)
//!   mount.log  stdout and stderr of every daemon started on these dirs
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod node;
pub mod proxy;
pub mod target;
pub mod workload;

/// The address in a daemon's "listening on ADDR" line, once the whole line is in its log (the
/// log may be read while the line is half written: found by a CI run).
pub fn listening_on(log: &str) -> Option<std::net::SocketAddr> {
    let at = log.find("listening on ")?;
    let line = log[at + "listening on ".len()..].split_inclusive('\n').next()?;
    if !line.ends_with('\n') {
        return None;
    }
    Some(line.trim().parse().unwrap_or_else(|e| panic!("`{line}` is no address: {e}")))
}

/// How long `start` waits for the mount to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drop` waits after SIGTERM before forcing the unmount.
pub const DROP_GRACE: Duration = Duration::from_secs(5);
/// How long `stop` waits after SIGTERM for a clean exit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn ferryfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferryfs"))
}

/// Which filesystem the suite mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `ferryfs mount` (the default).
    Ferryfs,
    /// `bindfs`, a plain FUSE passthrough without a journal: lets the suite be
    /// developed and sanity-checked before ferryfs exists. It has no journal, so
    /// `replay`/`inspect` are not run against it.
    Bindfs,
    /// No FUSE at all: a bind mount of the backing directory, held by a small
    /// shell that unmounts on SIGTERM (root only). Checks the suite itself
    /// against the reference semantics; every test should pass on it.
    Bind,
}

impl Backend {
    /// Whether there is a journal to replay or inspect.
    pub fn has_journal(self) -> bool {
        self == Backend::Ferryfs
    }
}

pub fn backend() -> Backend {
    match std::env::var("FERRYFS_TEST_FS").as_deref() {
        Err(_) | Ok("") | Ok("ferryfs") => Backend::Ferryfs,
        Ok("bindfs") => Backend::Bindfs,
        Ok("bind") => Backend::Bind,
        Ok(other) => panic!("FERRYFS_TEST_FS={other:?}: expected \"ferryfs\", \"bindfs\" or \"bind\""),
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

pub struct Mount {
    pub mnt: PathBuf,
    pub backing: PathBuf,
    pub journal: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    starts: usize,
    /// st_dev of the live mount; its minor number names the connection in
    /// /sys/fs/fuse/connections.
    fuse_dev: u64,
    _tmp: TempDir,
}

impl Mount {
    /// Mounts with default options on fresh temp dirs.
    pub fn start() -> Mount {
        Mount::start_with(&[])
    }

    /// Mounts on fresh temp dirs, passing `args` after the required ones
    /// (`ferryfs mount MNT --backing B --journal J ARGS...`), after those from
    /// `FERRYFS_TEST_ARGS`. `args` are ignored by the bindfs and bind backends.
    pub fn start_with(args: &[&str]) -> Mount {
        let mut all: Vec<String> =
            std::env::var("FERRYFS_TEST_ARGS").unwrap_or_default().split_whitespace().map(String::from).collect();
        all.extend(args.iter().map(|s| s.to_string()));
        let tmp = tempfile::Builder::new().prefix("ferryfs-test-").tempdir().expect("create temp dir");
        // tempfile makes the dir 0700; permission tests run as uid 65534 and
        // must be able to reach the mount point.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let mnt = base.join("mnt");
        let backing = base.join("backing");
        let journal = base.join("journal");
        for d in [&mnt, &backing, &journal] {
            fs::create_dir(d).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut m = Mount {
            mnt,
            backing,
            journal,
            child: None,
            args: all,
            log: base.join("mount.log"),
            starts: 0,
            fuse_dev: 0,
            _tmp: tmp,
        };
        m.spawn_and_wait();
        m
    }

    /// Mounts existing `backing` and `journal` directories (a promoted target's, say) on a
    /// fresh temp mount point, with `args`.
    pub fn start_on(backing: &Path, journal: &Path, args: &[&str]) -> Mount {
        let tmp = tempfile::Builder::new().prefix("ferryfs-test-").tempdir().expect("create temp dir");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let mnt = base.join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mut m = Mount {
            mnt,
            backing: backing.to_path_buf(),
            journal: journal.to_path_buf(),
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            log: base.join("mount.log"),
            starts: 0,
            fuse_dev: 0,
            _tmp: tmp,
        };
        m.spawn_and_wait();
        m
    }

    /// The temp dir holding backing/, journal/ and mnt/.
    pub fn base(&self) -> &Path {
        self._tmp.path()
    }

    /// A fresh, empty directory on the same filesystem as the backing
    /// directory, for doing the same thing natively and comparing.
    pub fn plain_dir(&self) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = self.base().canonicalize().unwrap().join(format!("plain-{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether anything is mounted on `mnt` (the mount point is ours alone).
    pub fn is_mounted(&self) -> bool {
        mount_fstype(&self.mnt).is_some()
    }

    /// Mounted with the filesystem type the backend makes (fuse* for ferryfs
    /// and bindfs).
    fn is_backend_mounted(&self) -> bool {
        match mount_fstype(&self.mnt) {
            None => false,
            Some(t) => backend() == Backend::Bind || t.starts_with("fuse"),
        }
    }

    /// Everything the daemon(s) printed so far.
    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn command(&self) -> Command {
        match backend() {
            Backend::Ferryfs => {
                let mut c = ferryfs();
                c.arg("mount")
                    .arg(&self.mnt)
                    .arg("--backing")
                    .arg(&self.backing)
                    .arg("--journal")
                    .arg(&self.journal)
                    .args(&self.args);
                c
            }
            Backend::Bindfs => {
                let mut c = Command::new("bindfs");
                c.arg("-f");
                if is_root() {
                    // Mirrors ferryfs as root: allow_other + default_permissions.
                    c.args(["-o", "allow_other,default_permissions"]);
                } else {
                    c.args(["--no-allow-other", "-o", "default_permissions"]);
                }
                c.arg(&self.backing).arg(&self.mnt);
                c
            }
            Backend::Bind => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(
                        "trap 'umount \"$1\" && exit 0; exit 1' TERM INT; \
                         mount --bind \"$0\" \"$1\" || exit 1; \
                         while :; do sleep 0.05; done",
                    )
                    .arg(&self.backing)
                    .arg(&self.mnt);
                c
            }
        }
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        assert!(!self.is_mounted(), "{} is still mounted before start", self.mnt.display());
        self.starts += 1;
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        use std::io::Write;
        writeln!(&log, "===== start #{} =====", self.starts).unwrap();
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        // Safety net: if the test thread that spawned the daemon dies without
        // running Drop (e.g. the test binary is SIGKILLed), the daemon gets
        // SIGTERM and unmounts.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        self.child = Some(child);

        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                force_unmount(&self.mnt);
                panic!(
                    "{:?} exited with {status} before {} was mounted; output:\n{}",
                    backend(),
                    self.mnt.display(),
                    self.log()
                );
            }
            if self.is_backend_mounted() {
                let dev = st_dev(&self.mnt);
                // (A bind mount of a directory on the same filesystem keeps
                // its st_dev.)
                if dev != 0 && (dev != st_dev(self.mnt.parent().unwrap()) || backend() == Backend::Bind) {
                    self.fuse_dev = dev;
                    return;
                }
            }
            if Instant::now() > deadline {
                self.shutdown(Duration::from_millis(500));
                panic!("{} was not mounted after {:?}; output:\n{}", self.mnt.display(), MOUNT_TIMEOUT, self.log());
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon (no clean shutdown, journal not closed), reap it, and
    /// lazily detach the dead mount.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: daemon not running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        // The connection normally aborts when the daemon's /dev/fuse fd closes;
        // abort it explicitly too in case a stray process inherited that fd, so
        // that no test thread stays blocked on the dead mount.
        abort_connection(self.fuse_dev);
        force_unmount(&self.mnt);
        assert!(!self.is_mounted(), "dead mount still attached after kill9");
    }

    /// Like `restart`, with `args` in place of the extra arguments given at start.
    pub fn restart_with(&mut self, args: &[&str]) {
        if self.child.is_some() {
            let st = self.stop();
            assert!(st.success(), "stop before restart: {st}; output:\n{}", self.log());
        }
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.spawn_and_wait();
    }

    /// Start the daemon again on the same dirs with the same arguments. If it is
    /// still running, it is first stopped cleanly (and must exit 0).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let st = self.stop();
            assert!(st.success(), "stop before restart: {st}; output:\n{}", self.log());
        }
        self.spawn_and_wait();
    }

    /// Sends `sig` to the daemon and waits for it to exit (and detach) on its own; the
    /// mount is detached in any case. Returns the exit status, or `None` on timeout.
    pub fn signal_and_wait(&mut self, sig: i32) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("signal: daemon not running");
        if sig != 0 {
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
        let status = wait_timeout(&mut child, STOP_TIMEOUT);
        if status.is_none() {
            force_unmount(&self.mnt);
            unsafe {
                libc::kill(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        status
    }

    /// Clean shutdown: SIGTERM, wait for exit. Panics if the daemon does not exit
    /// within STOP_TIMEOUT or exits leaving the mount in place (the mount is
    /// detached first, so no mount is left behind either way).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("stop: daemon not running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = wait_timeout(&mut child, STOP_TIMEOUT);
        let status = match status {
            Some(s) => s,
            None => {
                force_unmount(&self.mnt);
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGKILL);
                }
                let _ = child.wait();
                panic!("daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM; output:\n{}", self.log());
            }
        };
        // The daemon unmounts before it exits; allow a moment for the kernel.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.is_mounted() && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        if self.is_mounted() {
            force_unmount(&self.mnt);
            panic!(
                "daemon exited ({status}) on SIGTERM but left {} mounted; output:\n{}",
                self.mnt.display(),
                self.log()
            );
        }
        status
    }

    /// `ferryfs replay --journal J --backing B [extra...]`, output captured.
    /// Must not be called while mounted.
    pub fn replay(&self, extra: &[&str]) -> Output {
        assert!(self.child.is_none(), "replay while the mount is running");

        ferryfs()
            .arg("replay")
            .arg("--journal")
            .arg(&self.journal)
            .arg("--backing")
            .arg(&self.backing)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run ferryfs replay")
    }

    /// `ferryfs inspect --journal J [extra...]`, output captured.
    pub fn inspect(&self, extra: &[&str]) -> Output {
        ferryfs()
            .arg("inspect")
            .arg("--journal")
            .arg(&self.journal)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run ferryfs inspect")
    }

    /// SIGTERM, wait up to `grace`, then force: lazy unmount and SIGKILL.
    /// Never panics; always leaves nothing mounted.
    fn shutdown(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut status = None;
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            status = wait_timeout(&mut child, grace);
            if status.is_none() {
                force_unmount(&self.mnt);
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGKILL);
                }
                status = child.wait().ok();
                abort_connection(self.fuse_dev);
            }
        }
        if self.is_mounted() {
            force_unmount(&self.mnt);
        }
        status
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.shutdown(DROP_GRACE);
        if std::thread::panicking() || std::env::var_os("FERRYFS_TEST_SHOW_LOG").is_some() {
            eprintln!("---- daemon output ({}) ----\n{}---- end ----", self.log.display(), self.log());
        }
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().ok().flatten() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` with a time limit, capturing output; kills it on timeout.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> (Option<ExitStatus>, String) {
    let f = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let st = wait_timeout(&mut child, timeout);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut s = String::new();
    let mut f = f;
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(0)).unwrap();
    let mut b = Vec::new();
    f.read_to_end(&mut b).unwrap();
    s.push_str(&String::from_utf8_lossy(&b));
    (st, s)
}

fn st_dev(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).map(|m| m.dev()).unwrap_or(0)
}

/// Writes to /sys/fs/fuse/connections/N/abort for the mount with st_dev `dev`
/// (if fusectl is mounted and the connection still exists). Harmless when the
/// connection is already gone.
pub fn abort_connection(dev: u64) {
    if dev == 0 {
        return;
    }
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    let p = format!("/sys/fs/fuse/connections/{minor}/abort");
    let _ = fs::write(p, b"1");
}

/// Unescapes a path field of /proc/self/mountinfo (`\040` etc.).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|t| u8::from_str_radix(t, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The filesystem type of the topmost mount whose mount point is `mnt` in
/// this mount namespace (per /proc/self/mountinfo), if any.
pub fn mount_fstype(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.as_os_str().as_bytes();
    info.lines()
        .filter_map(|line| {
            let mut parts = line.split(" - ");
            let (pre, post) = (parts.next()?, parts.next()?);
            let point = pre.split(' ').nth(4)?;
            let fstype = post.split(' ').next()?;
            (unescape_mountinfo(point) == want).then(|| fstype.to_string())
        })
        .next_back()
}

/// True when `mnt` is the mount point of a FUSE filesystem.
pub fn is_fuse_mounted(mnt: &Path) -> bool {
    mount_fstype(mnt).is_some_and(|t| t.starts_with("fuse"))
}

/// Detaches whatever is mounted at `mnt`, lazily: umount2(MNT_DETACH), then
/// `umount -l`, then `fusermount3 -u -z`.
pub fn force_unmount(mnt: &Path) {
    if mount_fstype(mnt).is_none() {
        return;
    }
    let c = cpath(mnt);
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
    if mount_fstype(mnt).is_none() {
        return;
    }
    let _ = Command::new("umount").arg("-l").arg(mnt).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if mount_fstype(mnt).is_none() {
        return;
    }
    for tool in ["fusermount3", "fusermount"] {
        let _ = Command::new(tool).args(["-u", "-z"]).arg(mnt).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if mount_fstype(mnt).is_none() {
            return;
        }
    }
    eprintln!("WARNING: could not unmount {}", mnt.display());
}

// ---------------------------------------------------------------------------
// Small libc helpers shared by the suites.

pub fn cpath<P: AsRef<Path>>(p: P) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).unwrap()
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc return value into Ok(value) or Err(errno).
pub fn check<T: Into<i64> + Copy>(ret: T) -> Result<i64, i32> {
    let v: i64 = ret.into();
    if v < 0 { Err(errno()) } else { Ok(v) }
}

/// 0 on success, else the errno.
pub fn rc<T: Into<i64> + Copy>(ret: T) -> i32 {
    match check(ret) {
        Ok(_) => 0,
        Err(e) => e,
    }
}

pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "OK",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::E2BIG => "E2BIG",
        libc::ETXTBSY => "ETXTBSY",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Runs `f` in a forked child with the given uid/gid (supplementary groups
/// cleared) and returns what it returns (meant to be 0 or an errno, < 200).
///
/// The child runs in a copy of a multi-threaded process, so `f` must only make
/// async-signal-safe calls: raw libc syscalls on buffers prepared beforehand,
/// no allocation, no locks, no panics. Credentials are changed with raw
/// syscalls (per-thread in the kernel; the child has one thread).
pub fn as_user<F: FnOnce() -> i32>(uid: u32, gid: u32, f: F) -> i32 {
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                libc::_exit(250);
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                libc::_exit(251);
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                libc::_exit(252);
            }
            let code = f();
            libc::_exit(code.clamp(0, 249));
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            assert!(r < 0 && errno() == libc::EINTR, "waitpid: {}", io::Error::last_os_error());
        }
        let st = ExitStatus::from_raw(status);
        let code = st.code().unwrap_or_else(|| panic!("as_user child died: {st}"));
        assert!(code < 250, "as_user child could not switch to {uid}:{gid} (exit {code})");
        code
    }
}

/// The uid/gid used for "non-root user" tests.
pub const NOBODY: u32 = 65534;

/// Reads a whole file, panicking with the path on error.
pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn write(p: impl AsRef<Path>, data: impl AsRef<[u8]>) {
    let p = p.as_ref();
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
}

pub fn open_rw(p: impl AsRef<Path>) -> File {
    let p = p.as_ref();
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A deterministic pseudo-random buffer.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}
