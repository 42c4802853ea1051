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

/// Sends SIGTERM to process `pid` (a child the caller has not waited for yet).
pub fn terminate(pid: u32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn c_path(p: &std::path::Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// Sets extended attribute `name` of `p`, not following a symlink (lsetxattr).
pub fn set_xattr_at_path(p: &std::path::Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let (c, n) = (c_path(p)?, std::ffi::CString::new(name).map_err(std::io::Error::other)?);
    // SAFETY: NUL-terminated path and name; the value buffer is valid for its length.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The names of the extended attributes of `p`, not following a symlink (llistxattr);
/// empty where the filesystem has none (EOPNOTSUPP).
pub fn list_xattrs_at_path(p: &std::path::Path) -> std::io::Result<Vec<Vec<u8>>> {
    let c = c_path(p)?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EOPNOTSUPP) { Ok(Vec::new()) } else { Err(e) };
    }
    Ok(names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect())
}

/// The value of extended attribute `name` of `p` (up to 64 KiB), not following a symlink.
pub fn get_xattr_at_path(p: &std::path::Path, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let (c, n) = (c_path(p)?, std::ffi::CString::new(name).map_err(std::io::Error::other)?);
    let mut v = vec![0u8; 64 << 10];
    // SAFETY: NUL-terminated path and name; the buffer is valid for its length.
    let len = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    v.truncate(len as usize);
    Ok(v)
}

#[cfg(test)]
mod path_xattr_tests {
    #[test]
    fn set_list_and_get_an_xattr_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        super::set_xattr_at_path(&f, b"user.k", b"value").unwrap();
        assert!(super::list_xattrs_at_path(&f).unwrap().contains(&b"user.k".to_vec()));
        assert_eq!(super::get_xattr_at_path(&f, b"user.k").unwrap(), b"value");
        let e = super::get_xattr_at_path(&f, b"user.missing").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA));
        assert!(super::set_xattr_at_path(&dir.path().join("nope"), b"user.k", b"v").is_err());
    }
}
