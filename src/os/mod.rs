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
