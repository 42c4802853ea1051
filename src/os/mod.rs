//! Real implementations of the seams in `io`: journal storage on a directory, and the
//! backing tree through O_PATH fds and `*at` calls. The only place besides `fuse/` with `unsafe`.

pub mod storage;
pub mod tree;

/// Lets a command whose output is piped into `head` end quietly, as Unix tools do.
pub fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to the default has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Lazily detaches whatever is mounted at `path` (umount2 with MNT_DETACH); errors ignored.
pub fn detach_mount(path: &std::ffi::CStr) {
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    unsafe {
        libc::umount2(path.as_ptr(), libc::MNT_DETACH);
    }
}

/// Raises the open-file limit as far as allowed: to fs.nr_open when privileged, else to the
/// hard limit. The mount keeps `O_PATH` fds for objects the kernel holds (at most
/// `limits::NODES_CACHED_MAX`) and one fd per open file. Returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let want = libc::rlimit { rlim_cur: nr_open.max(r.rlim_max), rlim_max: nr_open.max(r.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
        let hard = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &hard) == 0 {
            return hard.rlim_cur;
        }
    }
    r.rlim_cur
}

/// syncfs of the filesystem mounted at `path`; errors are logged, not returned (the caller
/// is a timer that tries again).
pub fn syncfs_path(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    match std::fs::File::open(path) {
        Ok(f) => {
            // SAFETY: syncfs on an fd we own.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                tracing::warn!("syncfs {}: {}", path.display(), std::io::Error::last_os_error());
            }
        }
        Err(e) => tracing::warn!("opening {} for syncfs: {e}", path.display()),
    }
}

/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Takes an exclusive, non-blocking flock on `file`; `Ok(false)` when another holds it.
pub fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}
