//! The backing tree on a real filesystem: every object is held as an `O_PATH | O_NOFOLLOW` fd
//! and reached from such an fd plus one name component with the `*at` calls, as virtiofsd does
//! (design §3). Objects are identified by `name_to_handle_at` handles, reopened with
//! `open_by_handle_at`.
//!
//! Rules this file keeps, and why:
//! - A name is one component: empty names, names containing `/` or NUL, `.` and `..` are
//!   `EINVAL`, so no call can walk out of the tree or along a path.
//! - Nothing follows a symlink. Operations the kernel offers only on a path or an open file
//!   (chmod, truncate, write, xattrs, fallocate) go through the magic link `/proc/self/fd/N`
//!   of the `O_PATH` fd, which resolves to the object itself, never to a symlink's target.
//!   Data operations check first that the object is a regular file, so a device node or a
//!   FIFO in the tree is never opened.
//! - ferryfs runs as root: `open_by_handle_at` and `linkat(AT_EMPTY_PATH)` need
//!   CAP_DAC_READ_SEARCH, exact owners need CAP_CHOWN, and CAP_FSETID keeps writes and
//!   truncates from clearing suid/sgid (a chown still clears them, as the kernel defines).
//! - Handles are only taken for objects on the mount of the root (`EXDEV` otherwise), since
//!   `open_by_handle_at` decodes them against that mount.
//!
//! Errors are the kernel's errno, unchanged.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::ops::{NodeKind, SetAttr, Timestamp};
use crate::io::{NewNode, Tree};
use crate::limits::HANDLE_MAX;
use crate::proto::wire::control::NodeDesc;
use crate::types::Handle;

/// Bytes of the handle type that precede `f_handle` in an encoded `Handle`.
const HANDLE_TYPE_LEN: usize = 4;
const F_HANDLE_MAX: usize = libc::MAX_HANDLE_SZ as usize;
const _: () = assert!(HANDLE_MAX == HANDLE_TYPE_LEN + F_HANDLE_MAX);

/// Bytes read per `getdents64` call.
const DIRENT_BUF_LEN: usize = 32 << 10;
/// First buffer size for readlink and xattr reads; grown when the value is larger.
const VALUE_BUF_LEN_FIRST: usize = 256;

/// One object of the backing tree, held open as `O_PATH | O_NOFOLLOW` (a symlink node is the
/// link itself). Plain, not shared: wrap it in an `Arc` to share it; `try_clone` dups the fd.
#[derive(Debug)]
pub struct OsNode {
    pub fd: OwnedFd,
}

impl OsNode {
    pub fn try_clone(&self) -> io::Result<OsNode> {
        Ok(OsNode { fd: self.fd.try_clone()? })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The backing directory.
#[derive(Debug)]
pub struct OsTree {
    /// `O_PATH | O_DIRECTORY` fd of the backing root.
    root: OwnedFd,
    /// A readable fd of the root: `open_by_handle_at` and `syncfs` refuse `O_PATH` fds.
    mount: OwnedFd,
    /// The mount id `name_to_handle_at` reports for the root.
    mount_id: libc::c_int,
}

impl OsTree {
    /// Opens the backing directory at `path` (the operator's path; symlinks in it are
    /// followed). Fails here, not later, when its filesystem has no file handles.
    pub fn open(path: &Path) -> io::Result<OsTree> {
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| einval())?;
        let root = open_at(libc::AT_FDCWD, &path, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let mount = open_at(libc::AT_FDCWD, &proc_path(root.as_raw_fd()), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let (_, mount_id) = name_to_handle(root.as_raw_fd())?;
        Ok(OsTree { root, mount, mount_id })
    }
}

impl Tree for OsTree {
    type Node = OsNode;

    fn root(&self) -> io::Result<OsNode> {
        Ok(OsNode { fd: self.root.try_clone()? })
    }

    fn open_handle(&self, handle: &Handle) -> io::Result<OsNode> {
        let mut raw = RawHandle::decode(&handle.0)?;
        // SAFETY: `raw` is a `struct file_handle` header followed by `handle_bytes` (≤ its
        // array) bytes of f_handle, and it outlives the call; the kernel only reads it.
        let fd = unsafe {
            libc::open_by_handle_at(self.mount.as_raw_fd(), raw.as_mut_ptr(), libc::O_PATH | libc::O_CLOEXEC)
        };
        Ok(OsNode { fd: owned(fd)? })
    }

    fn handle_of(&self, node: &OsNode) -> io::Result<Handle> {
        let (raw, mount_id) = name_to_handle(node.raw())?;
        if mount_id != self.mount_id {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        Ok(Handle(raw.encode()))
    }

    fn lookup(&self, dir: &OsNode, name: &[u8]) -> io::Result<OsNode> {
        let name = component(name)?;
        Ok(OsNode { fd: open_at(dir.raw(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)? })
    }

    fn create(&self, dir: &OsNode, name: &[u8], new: &NewNode<'_>) -> io::Result<OsNode> {
        let name = component(name)?;
        let made_file = make_object(dir, &name, new)?;
        let finish = || {
            let node = match &made_file {
                // Exactly the file we made, not whatever `name` names by now.
                Some(file) => OsNode { fd: open_at(libc::AT_FDCWD, &proc_path(file.as_raw_fd()), libc::O_PATH, 0)? },
                None => lookup_at(dir, &name)?,
            };
            set_owner_and_mode(&node, new.uid, new.gid, new.mode, new.kind == NodeKind::Symlink)?;
            Ok(node)
        };
        let finished = finish();
        if finished.is_err() {
            // Leave no half-made object behind: redo and the live path both retry from "absent".
            let _ = unlink_at(dir, &name, new.kind == NodeKind::Dir);
        }
        finished
    }

    fn link(&self, node: &OsNode, dir: &OsNode, name: &[u8]) -> io::Result<()> {
        let name = component(name)?;
        // SAFETY: all pointers are NUL-terminated strings that outlive the call.
        let ret = unsafe { libc::linkat(node.raw(), c"".as_ptr(), dir.raw(), name.as_ptr(), libc::AT_EMPTY_PATH) };
        match cvt(ret) {
            // Without CAP_DAC_READ_SEARCH the kernel refuses AT_EMPTY_PATH.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => link_via_proc(node, dir, &name),
            other => other.map(drop),
        }
    }

    fn unlink(&self, dir: &OsNode, name: &[u8], is_dir: bool) -> io::Result<()> {
        unlink_at(dir, &component(name)?, is_dir)
    }

    fn rename(&self, dir: &OsNode, name: &[u8], new_dir: &OsNode, new_name: &[u8], flags: u32) -> io::Result<()> {
        let (name, new_name) = (component(name)?, component(new_name)?);
        // SAFETY: renameat2(int, const char *, int, const char *, unsigned int); the names are
        // NUL-terminated and outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                dir.raw(),
                name.as_ptr(),
                new_dir.raw(),
                new_name.as_ptr(),
                flags as libc::c_uint,
            )
        };
        cvt_long(ret).map(drop)
    }

    fn set_attr(&self, node: &OsNode, attr: &SetAttr) -> io::Result<()> {
        // Order matters: chown clears suid/sgid, so mode comes after it; truncate sets mtime,
        // so times come last.
        if attr.uid.is_some() || attr.gid.is_some() {
            chown(node, attr.uid, attr.gid)?;
        }
        if let Some(mode) = attr.mode {
            // A symlink's mode is fixed (0777 on Linux); chmod never applies to the link itself.
            if !is_symlink(node)? {
                chmod(node, mode)?;
            }
        }
        if let Some(size) = attr.size {
            let size = libc::off_t::try_from(size).map_err(|_| einval())?;
            let file = open_regular(node, libc::O_WRONLY)?;
            // SAFETY: ftruncate on an fd we own.
            cvt(unsafe { libc::ftruncate(file.as_raw_fd(), size) })?;
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            set_times(node, attr.atime, attr.mtime)?;
        }
        Ok(())
    }

    fn write(&self, node: &OsNode, offset: u64, data: &[u8]) -> io::Result<()> {
        // Reopened per write: a cache keyed by anything but the node could outlive it and
        // write into a reused fd number. `write_all_at` loops on short writes and EINTR.
        let file = File::from(open_regular(node, libc::O_WRONLY)?);
        file.write_all_at(data, offset)
    }

    fn set_xattr(&self, node: &OsNode, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
        set_xattr_fd(node.raw(), name, value, flags)
    }

    fn remove_xattr(&self, node: &OsNode, name: &[u8]) -> io::Result<()> {
        let name = CString::new(name).map_err(|_| einval())?;
        let path = proc_path(node.raw());
        // SAFETY: both strings are NUL-terminated and outlive the call.
        cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
    }

    fn fallocate(&self, node: &OsNode, mode: u32, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let len = libc::off_t::try_from(len).map_err(|_| einval())?;
        let file = open_regular(node, libc::O_WRONLY)?;
        // SAFETY: fallocate on an fd we own; no memory is passed.
        cvt(unsafe { libc::fallocate(file.as_raw_fd(), mode as libc::c_int, offset, len) }).map(drop)
    }

    fn applied_marker(&self, set_id: &[u8; 16]) -> io::Result<u64> {
        let root = self.root()?;
        match get_xattr(&root, APPLIED_MARKER_XATTR) {
            // set id (16 bytes), then the LSN (u64 LE).
            Ok(v) if v.len() == 24 && v[..16] == set_id[..] => Ok(u64::from_le_bytes(v[16..].try_into().unwrap())),
            Ok(_) => Ok(0),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn set_applied_marker(&self, set_id: &[u8; 16], lsn: u64) -> io::Result<()> {
        let mut value = [0u8; 24];
        value[..16].copy_from_slice(set_id);
        value[16..].copy_from_slice(&lsn.to_le_bytes());
        // On the held root fd itself: this runs once per namespace op, no dup.
        match set_xattr_fd(self.root.as_raw_fd(), APPLIED_MARKER_XATTR, &value, 0) {
            // A filesystem without xattrs: replay falls back to judging each op by the tree.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn sync_all(&self) -> io::Result<()> {
        // SAFETY: syncfs on an fd we own.
        cvt(unsafe { libc::syncfs(self.mount.as_raw_fd()) }).map(drop)
    }

    fn read_dir(&self, dir: &OsNode) -> io::Result<Vec<Vec<u8>>> {
        Ok(read_dir(dir)?.into_iter().map(|(name, _, _)| name).collect())
    }

    fn size(&self, node: &OsNode) -> io::Result<u64> {
        Ok(stat(node)?.st_size as u64)
    }

    fn kind(&self, node: &OsNode) -> io::Result<NodeKind> {
        kind_of_mode(stat(node)?.st_mode)
    }

    fn get_xattr(&self, node: &OsNode, name: &[u8]) -> io::Result<Vec<u8>> {
        get_xattr(node, name)
    }

    fn list_xattrs(&self, node: &OsNode) -> io::Result<Vec<Vec<u8>>> {
        Ok(list_xattr(node)?.split(|&b| b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect())
    }

    fn describe(&self, node: &OsNode) -> io::Result<NodeDesc> {
        describe(node)
    }

    fn read(&self, node: &OsNode, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        File::from(reopen(node, libc::O_RDONLY)?).read_at(buf, offset)
    }
}

/// The object as a resync describes it: id 0 and no xattrs (the caller adds those).
pub fn describe(node: &OsNode) -> io::Result<NodeDesc> {
    let st = stat(node)?;
    let kind = kind_of_mode(st.st_mode)?;
    let target = if kind == NodeKind::Symlink { read_link(node)? } else { Vec::new() };
    Ok(NodeDesc {
        id: 0,
        kind: kind as u8,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: if kind == NodeKind::File { st.st_size as u64 } else { 0 },
        atime: (st.st_atime, st.st_atime_nsec as u32),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        target,
        xattrs: Vec::new(),
    })
}

/// The node kind of an `st_mode`; `EINVAL` for a type ferryfs does not know.
fn kind_of_mode(mode: libc::mode_t) -> io::Result<NodeKind> {
    Ok(match mode & libc::S_IFMT {
        libc::S_IFREG => NodeKind::File,
        libc::S_IFDIR => NodeKind::Dir,
        libc::S_IFLNK => NodeKind::Symlink,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        libc::S_IFCHR => NodeKind::CharDev,
        libc::S_IFBLK => NodeKind::BlockDev,
        _ => return Err(einval()),
    })
}

// ---- helpers for the live FUSE path (reads; the Tree trait holds the mutations) ----

/// The attributes of the object itself (a symlink's own, never its target's).
pub fn stat(node: &OsNode) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable storage for one `struct stat`; the path is an empty C string.
    let ret = unsafe {
        libc::fstatat(node.raw(), c"".as_ptr(), st.as_mut_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    };
    cvt(ret)?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Opens the object for I/O with `flags` through `/proc/self/fd/N` (`O_CREAT`, `O_EXCL` and
/// `O_NOFOLLOW` are dropped: the object exists, and `O_NOFOLLOW` would open the magic link
/// itself). `O_CLOEXEC` is added. The caller decides what may be opened: opening a device
/// node opens the device, opening a FIFO may block.
pub fn reopen(node: &OsNode, flags: i32) -> io::Result<OwnedFd> {
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW);
    open_at(libc::AT_FDCWD, &proc_path(node.raw()), flags, 0)
}

/// The target of a symlink node (`ENOENT` for anything else: readlinkat with an empty path).
pub fn read_link(node: &OsNode) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; VALUE_BUF_LEN_FIRST];
    loop {
        // SAFETY: buf has buf.len() writable bytes; the path is an empty C string.
        let ret = unsafe { libc::readlinkat(node.raw(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = cvt_size(ret)?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        // Filled the buffer: the target may be longer.
        buf.resize(buf.len() * 2, 0);
    }
}

/// The entries of a directory node as (name, inode number, d_type), without `.` and `..`
/// (the FUSE layer adds those), in the order the filesystem returns them.
pub fn read_dir(node: &OsNode) -> io::Result<Vec<(Vec<u8>, u64, u32)>> {
    let dir = reopen(node, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut buf = vec![0u8; DIRENT_BUF_LEN];
    let mut entries = Vec::new();
    loop {
        // SAFETY: getdents64(int, void *, size_t) writes at most buf.len() bytes into buf.
        let ret = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        let n = cvt_long(ret)? as usize;
        if n == 0 {
            return Ok(entries);
        }
        parse_dirents(&buf[..n], &mut entries)?;
    }
}

/// Appends the entries of one getdents64 buffer: records of
/// `d_ino u64 | d_off i64 | d_reclen u16 | d_type u8 | d_name (NUL-terminated)`.
fn parse_dirents(mut buf: &[u8], out: &mut Vec<(Vec<u8>, u64, u32)>) -> io::Result<()> {
    const NAME_AT: usize = 19;
    while !buf.is_empty() {
        let corrupt = || io::Error::new(io::ErrorKind::InvalidData, "getdents64 returned a malformed record");
        if buf.len() < NAME_AT {
            return Err(corrupt());
        }
        let ino = u64::from_ne_bytes(buf[0..8].try_into().unwrap());
        let reclen = u16::from_ne_bytes(buf[16..18].try_into().unwrap()) as usize;
        let d_type = buf[18] as u32;
        if reclen < NAME_AT || reclen > buf.len() {
            return Err(corrupt());
        }
        let name_field = &buf[NAME_AT..reclen];
        let name = &name_field[..name_field.iter().position(|&b| b == 0).ok_or_else(corrupt)?];
        if name != b"." && name != b".." {
            out.push((name.to_vec(), ino, d_type));
        }
        buf = &buf[reclen..];
    }
    Ok(())
}

/// Statistics of the filesystem holding `node`.
pub fn statfs(node: &OsNode) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable storage for one `struct statvfs` (fstatfs accepts O_PATH fds).
    cvt(unsafe { libc::fstatvfs(node.raw(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// The value of extended attribute `name` of the object itself.
/// setxattr on the object an fd (O_PATH included) refers to, through its /proc magic link.
fn set_xattr_fd(fd: RawFd, name: &[u8], value: &[u8], flags: u32) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| einval())?;
    let path = proc_path(fd);
    // SAFETY: path and name are NUL-terminated; value points to value.len() readable bytes;
    // all outlive the call. The magic link resolves to the object itself (a symlink node is
    // the link: the kernel then refuses user.* with EPERM, as it should).
    let ret = unsafe {
        libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags as libc::c_int)
    };
    cvt(ret).map(drop)
}

/// The xattr of the backing root holding the applied-namespace marker (hidden from the mount).
pub const APPLIED_MARKER_XATTR: &[u8] = b"trusted.ferryfs.applied";

pub fn get_xattr(node: &OsNode, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = CString::new(name).map_err(|_| einval())?;
    let path = proc_path(node.raw());
    read_growing(|buf| {
        // SAFETY: strings are NUL-terminated; buf has buf.len() writable bytes.
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// The names of the object's extended attributes, raw: each followed by a NUL.
pub fn list_xattr(node: &OsNode) -> io::Result<Vec<u8>> {
    let path = proc_path(node.raw());
    read_growing(|buf| {
        // SAFETY: the path is NUL-terminated; buf has buf.len() writable bytes.
        unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

// ---- private helpers ----

/// `struct file_handle` with room for the largest f_handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; F_HANDLE_MAX],
}

impl RawHandle {
    fn empty() -> RawHandle {
        RawHandle { handle_bytes: F_HANDLE_MAX as libc::c_uint, handle_type: 0, f_handle: [0; F_HANDLE_MAX] }
    }

    /// `Handle` bytes: handle_type as u32 little-endian, then the f_handle bytes.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HANDLE_TYPE_LEN + self.handle_bytes as usize);
        out.extend_from_slice(&self.handle_type.to_le_bytes());
        out.extend_from_slice(&self.f_handle[..self.handle_bytes as usize]);
        out
    }

    fn decode(bytes: &[u8]) -> io::Result<RawHandle> {
        if bytes.len() < HANDLE_TYPE_LEN || bytes.len() > HANDLE_MAX {
            return Err(einval());
        }
        let (ty, f_handle) = bytes.split_at(HANDLE_TYPE_LEN);
        let mut raw = RawHandle::empty();
        raw.handle_type = libc::c_int::from_le_bytes(ty.try_into().unwrap());
        raw.handle_bytes = f_handle.len() as libc::c_uint;
        raw.f_handle[..f_handle.len()].copy_from_slice(f_handle);
        Ok(raw)
    }

    fn as_mut_ptr(&mut self) -> *mut libc::file_handle {
        (self as *mut RawHandle).cast()
    }
}

/// The handle of the object open as `fd`, and the id of the mount it was reached through.
fn name_to_handle(fd: RawFd) -> io::Result<(RawHandle, libc::c_int)> {
    let mut raw = RawHandle::empty();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` has room for handle_bytes (MAX_HANDLE_SZ) bytes of f_handle; mount_id is a
    // writable int; the path is an empty C string.
    let ret =
        unsafe { libc::name_to_handle_at(fd, c"".as_ptr(), raw.as_mut_ptr(), &mut mount_id, libc::AT_EMPTY_PATH) };
    cvt(ret)?;
    assert!(raw.handle_bytes as usize <= F_HANDLE_MAX, "kernel returned an oversized file handle");
    Ok((raw, mount_id))
}

/// Makes the object with the kernel's default owner and a provisional mode (`create` then sets
/// both exactly); for a regular file, returns it open. Nothing exists when this fails.
fn make_object(dir: &OsNode, name: &CStr, new: &NewNode<'_>) -> io::Result<Option<OwnedFd>> {
    let perm = (new.mode & 0o7777) as libc::mode_t;
    let (fmt, rdev) = match new.kind {
        NodeKind::File => {
            let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
            return open_at(dir.raw(), name, flags, perm).map(Some);
        }
        NodeKind::Dir => {
            // SAFETY: name is NUL-terminated and outlives the call.
            return cvt(unsafe { libc::mkdirat(dir.raw(), name.as_ptr(), perm) }).map(|_| None);
        }
        NodeKind::Symlink => {
            let target = CString::new(new.target).map_err(|_| einval())?;
            // SAFETY: both strings are NUL-terminated and outlive the call.
            return cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.raw(), name.as_ptr()) }).map(|_| None);
        }
        NodeKind::Fifo => (libc::S_IFIFO, 0),
        NodeKind::Socket => (libc::S_IFSOCK, 0),
        NodeKind::CharDev => (libc::S_IFCHR, new.rdev),
        NodeKind::BlockDev => (libc::S_IFBLK, new.rdev),
    };
    // SAFETY: name is NUL-terminated and outlives the call.
    cvt(unsafe { libc::mknodat(dir.raw(), name.as_ptr(), fmt | perm, rdev as libc::dev_t) }).map(|_| None)
}

/// Sets owner, then mode (a chown clears suid/sgid; the mode also undoes the umask).
fn set_owner_and_mode(node: &OsNode, uid: u32, gid: u32, mode: u32, symlink: bool) -> io::Result<()> {
    // Only what differs from what the create already made: each chown/chmod dirties the inode.
    let st = stat(node)?;
    let owner_differs = st.st_uid != uid || st.st_gid != gid;
    if owner_differs {
        chown(node, Some(uid), Some(gid))?;
    }
    // A chown clears suid/sgid, and the process umask may have masked the create's mode.
    if !symlink && (owner_differs || st.st_mode & 0o7777 != mode & 0o7777) {
        chmod(node, mode)?;
    }
    Ok(())
}

fn chown(node: &OsNode, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let uid = uid.unwrap_or(u32::MAX) as libc::uid_t; // -1: unchanged
    let gid = gid.unwrap_or(u32::MAX) as libc::gid_t;
    // SAFETY: the path is an empty C string; AT_EMPTY_PATH makes it act on the fd's object,
    // which for a symlink node is the link itself.
    cvt(unsafe { libc::fchownat(node.raw(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) }).map(drop)
}

/// chmod of the object itself (the type bits of `mode` are ignored). Not for symlinks.
fn chmod(node: &OsNode, mode: u32) -> io::Result<()> {
    let path = proc_path(node.raw());
    // SAFETY: the path is NUL-terminated and outlives the call.
    cvt(unsafe { libc::chmod(path.as_ptr(), (mode & 0o7777) as libc::mode_t) }).map(drop)
}

fn set_times(node: &OsNode, atime: Option<Timestamp>, mtime: Option<Timestamp>) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: `times` is an array of two timespecs; the path is an empty C string.
    let ret = unsafe { libc::utimensat(node.raw(), c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) };
    match cvt(ret) {
        // Older kernels reject AT_EMPTY_PATH in utimensat.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => set_times_via_proc(node, &times),
        other => other.map(drop),
    }
}

/// utimensat through the magic link, which names the object itself, symlinks included.
fn set_times_via_proc(node: &OsNode, times: &[libc::timespec; 2]) -> io::Result<()> {
    let path = proc_path(node.raw());
    // SAFETY: the path is NUL-terminated; `times` is an array of two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// linkat through the magic link: AT_SYMLINK_FOLLOW follows only the magic link, to the
/// object itself (never a symlink's target).
fn link_via_proc(node: &OsNode, dir: &OsNode, name: &CStr) -> io::Result<()> {
    let from = proc_path(node.raw());
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), dir.raw(), name.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    cvt(ret).map(drop)
}

fn timespec(t: Option<Timestamp>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec { tv_sec: t.secs as libc::time_t, tv_nsec: t.nanos as libc::c_long },
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
    }
}

fn is_symlink(node: &OsNode) -> io::Result<bool> {
    Ok(stat(node)?.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

/// Opens a regular file for data I/O, refusing anything else before opening it (the type of
/// an inode never changes, so the check cannot go stale): `EISDIR` for a directory, `EINVAL`
/// for other types, as truncate(2) answers.
fn open_regular(node: &OsNode, flags: i32) -> io::Result<OwnedFd> {
    match stat(node)?.st_mode & libc::S_IFMT {
        libc::S_IFREG => reopen(node, flags),
        libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        _ => Err(einval()),
    }
}

fn lookup_at(dir: &OsNode, name: &CStr) -> io::Result<OsNode> {
    Ok(OsNode { fd: open_at(dir.raw(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)? })
}

fn unlink_at(dir: &OsNode, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: name is NUL-terminated and outlives the call.
    cvt(unsafe { libc::unlinkat(dir.raw(), name.as_ptr(), flags) }).map(drop)
}

/// openat with O_CLOEXEC and O_NOCTTY added.
fn open_at(dir: RawFd, path: &CStr, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated and outlives the call; mode is passed as the variadic
    // argument openat reads when O_CREAT is set.
    let fd =
        unsafe { libc::openat(dir, path.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY, mode as libc::c_uint) };
    owned(fd)
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: a successful open returned `fd`, a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Calls `read` (a getxattr-like call) with a buffer grown until the value fits.
fn read_growing(mut read: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; VALUE_BUF_LEN_FIRST];
    loop {
        match cvt_size(read(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                // Ask for the size now (it may change again before the next read).
                let size = cvt_size(read(&mut []))?;
                buf.resize(size.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A single name component as a C string; `EINVAL` for anything that could walk elsewhere.
fn component(name: &[u8]) -> io::Result<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(einval());
    }
    CString::new(name).map_err(|_| einval())
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a formatted number")
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

#[cfg(test)]
mod tests {
    //! Run as root on a filesystem with file handles and user/trusted xattrs (ext4 /tmp).

    use super::*;

    fn setup() -> (tempfile::TempDir, OsTree, OsNode) {
        let tmp = tempfile::tempdir().unwrap();
        let tree = OsTree::open(tmp.path()).unwrap();
        let root = tree.root().unwrap();
        (tmp, tree, root)
    }

    fn new(kind: NodeKind, mode: u32) -> NewNode<'static> {
        NewNode { kind, mode, uid: 0, gid: 0, rdev: 0, target: b"" }
    }

    fn errno(r: io::Result<impl std::fmt::Debug>) -> i32 {
        r.unwrap_err().raw_os_error().expect("an OS error")
    }

    fn perm(node: &OsNode) -> u32 {
        stat(node).unwrap().st_mode & 0o7777
    }

    fn read_all(node: &OsNode) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut File::from(reopen(node, libc::O_RDONLY).unwrap()), &mut out).unwrap();
        out
    }

    #[test]
    fn handle_survives_rename_and_reopens_the_same_inode() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"a", &new(NodeKind::File, 0o644)).unwrap();
        let handle = tree.handle_of(&file).unwrap();
        assert_eq!(handle.0.len(), HANDLE_TYPE_LEN + 8, "ext4 handles are 8 bytes (ino, generation)");
        let dir = tree.create(&root, b"d", &new(NodeKind::Dir, 0o755)).unwrap();
        tree.rename(&root, b"a", &dir, b"b", 0).unwrap();
        let reopened = tree.open_handle(&handle).unwrap();
        assert_eq!(stat(&reopened).unwrap().st_ino, stat(&file).unwrap().st_ino);
        assert_eq!(tree.handle_of(&reopened).unwrap(), handle);
        let looked_up = tree.lookup(&dir, b"b").unwrap();
        assert_eq!(tree.handle_of(&looked_up).unwrap(), handle);
        assert_eq!(errno(tree.lookup(&root, b"a")), libc::ENOENT);
    }

    #[test]
    fn open_handle_fails_once_the_last_name_is_gone() {
        let (_tmp, tree, root) = setup();
        let handle = {
            let file = tree.create(&root, b"gone", &new(NodeKind::File, 0o644)).unwrap();
            tree.handle_of(&file).unwrap()
        };
        tree.unlink(&root, b"gone", false).unwrap();
        let e = errno(tree.open_handle(&handle));
        // ESTALE or ENOENT as documented; this kernel (ext4) sometimes answers ENOMEM for a
        // handle whose inode was just freed (seen in CI runs). The applier treats ENOMEM as
        // "no way in by handle" and searches by name instead (`Applier::by_handle`).
        assert!(e == libc::ESTALE || e == libc::ENOENT || e == libc::ENOMEM, "errno {e}");
    }

    #[test]
    fn open_handle_of_a_removed_directory_fails_as_gone() {
        let (_tmp, tree, root) = setup();
        let d = tree.create(&root, b"d", &new(NodeKind::Dir, 0o755)).unwrap();
        let handle = tree.handle_of(&d).unwrap();
        // Still held open (the applier may hold it) while it is removed.
        tree.unlink(&root, b"d", true).unwrap();
        let e = tree.open_handle(&handle).err().and_then(|e| e.raw_os_error()).unwrap_or(0);
        assert!(tree.open_handle(&handle).is_ok() || e == libc::ESTALE || e == libc::ENOENT, "errno {e}");
        drop(d);
        // A directory moved under another, then removed with its old parent held nowhere.
        let a = tree.create(&root, b"a", &new(NodeKind::Dir, 0o755)).unwrap();
        let c = tree.create(&root, b"c", &new(NodeKind::Dir, 0o755)).unwrap();
        let b = tree.create(&a, b"b", &new(NodeKind::Dir, 0o755)).unwrap();
        let hb = tree.handle_of(&b).unwrap();
        let ha = tree.handle_of(&a).unwrap();
        drop(b);
        tree.rename(&a, b"b", &c, b"b2", 0).unwrap();
        tree.unlink(&root, b"a", true).unwrap();
        drop(a);
        eprintln!("moved dir: {:?}", tree.open_handle(&hb).map(|_| ()));
        eprintln!("removed dir: {:?}", tree.open_handle(&ha).map(|_| ()));
        tree.unlink(&c, b"b2", true).unwrap();
        eprintln!("removed moved dir: {:?}", tree.open_handle(&hb).map(|_| ()));
    }

    #[test]
    fn malformed_handles_are_einval() {
        let (_tmp, tree, _root) = setup();
        assert_eq!(errno(tree.open_handle(&Handle(vec![1, 0]))), libc::EINVAL);
        assert_eq!(errno(tree.open_handle(&Handle(vec![0; HANDLE_MAX + 1]))), libc::EINVAL);
    }

    #[test]
    fn root_handle_roundtrips() {
        let (_tmp, tree, root) = setup();
        let handle = tree.handle_of(&root).unwrap();
        let reopened = tree.open_handle(&handle).unwrap();
        assert_eq!(stat(&reopened).unwrap().st_ino, stat(&root).unwrap().st_ino);
    }

    #[test]
    fn symlink_handle_reopens_the_link() {
        let (_tmp, tree, root) = setup();
        let spec = NewNode { target: b"elsewhere", ..new(NodeKind::Symlink, 0o777) };
        let link = tree.create(&root, b"ln", &spec).unwrap();
        let reopened = tree.open_handle(&tree.handle_of(&link).unwrap()).unwrap();
        assert_eq!(read_link(&reopened).unwrap(), b"elsewhere");
    }

    #[test]
    fn handle_of_an_object_on_another_mount_is_exdev() {
        let (tmp, tree, _root) = setup();
        let other = OsNode { fd: open_at(libc::AT_FDCWD, c"/dev", libc::O_PATH, 0).unwrap() };
        let tmp_dev = std::fs::metadata(tmp.path()).unwrap();
        if std::os::unix::fs::MetadataExt::dev(&tmp_dev) == stat(&other).unwrap().st_dev {
            return; // /dev is not a separate mount here: nothing to check.
        }
        assert_eq!(errno(tree.handle_of(&other)), libc::EXDEV);
    }

    #[test]
    fn fallbacks_through_proc_act_on_the_object_itself() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"f", &new(NodeKind::File, 0o644)).unwrap();
        let spec = NewNode { target: b"f", ..new(NodeKind::Symlink, 0o777) };
        let link = tree.create(&root, b"l", &spec).unwrap();
        link_via_proc(&file, &root, c"f2").unwrap();
        link_via_proc(&link, &root, c"l2").unwrap();
        let (f2, l2) = (tree.lookup(&root, b"f2").unwrap(), tree.lookup(&root, b"l2").unwrap());
        assert_eq!(stat(&f2).unwrap().st_ino, stat(&file).unwrap().st_ino);
        assert_eq!(stat(&l2).unwrap().st_ino, stat(&link).unwrap().st_ino, "linked the symlink, not its target");
        let times = [timespec(Some(Timestamp { secs: 111, nanos: 1 })), timespec(None)];
        set_times_via_proc(&link, &times).unwrap();
        assert_eq!(stat(&link).unwrap().st_atime, 111);
        assert_ne!(stat(&file).unwrap().st_atime, 111);
    }

    #[test]
    fn hard_link_has_the_same_handle() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"one", &new(NodeKind::File, 0o644)).unwrap();
        tree.link(&file, &root, b"two").unwrap();
        let two = tree.lookup(&root, b"two").unwrap();
        assert_eq!(tree.handle_of(&two).unwrap(), tree.handle_of(&file).unwrap());
        assert_eq!(stat(&file).unwrap().st_nlink, 2);
        assert_eq!(errno(tree.link(&file, &root, b"two")), libc::EEXIST);
    }

    #[test]
    fn symlink_is_made_and_held_as_the_link_itself() {
        let (_tmp, tree, root) = setup();
        let spec = NewNode { uid: 1234, gid: 5678, target: b"../outside/target", ..new(NodeKind::Symlink, 0o777) };
        let link = tree.create(&root, b"ln", &spec).unwrap();
        assert_eq!(read_link(&link).unwrap(), b"../outside/target");
        let st = stat(&link).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!((st.st_uid, st.st_gid), (1234, 5678));
        let looked_up = tree.lookup(&root, b"ln").unwrap();
        assert_eq!(read_link(&looked_up).unwrap(), b"../outside/target");
        // A long target is read whole.
        let long = vec![b'x'; 4000];
        let spec = NewNode { target: &long, ..new(NodeKind::Symlink, 0o777) };
        assert_eq!(read_link(&tree.create(&root, b"long", &spec).unwrap()).unwrap(), long);
        // Not a symlink: the kernel's readlinkat(fd, "") answers ENOENT.
        assert_eq!(errno(read_link(&root)), libc::ENOENT);
    }

    #[test]
    fn create_sets_owner_and_suid_mode_exactly() {
        let (_tmp, tree, root) = setup();
        let spec = NewNode { uid: 1000, gid: 1001, ..new(NodeKind::File, 0o106755) };
        let file = tree.create(&root, b"suid", &spec).unwrap();
        let st = stat(&file).unwrap();
        assert_eq!((st.st_mode & 0o7777, st.st_uid, st.st_gid), (0o6755, 1000, 1001));
        // The umask does not apply. (Other tests running meanwhile set their modes exactly
        // too, so the process-wide change cannot disturb them.)
        // SAFETY: umask only swaps the process's mask.
        let old = unsafe { libc::umask(0o077) };
        let open = tree.create(&root, b"open", &new(NodeKind::File, 0o777)).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert_eq!(perm(&open), 0o777);
        let spec = NewNode { uid: 7, gid: 8, ..new(NodeKind::Dir, 0o3775) };
        let dir = tree.create(&root, b"sgid-dir", &spec).unwrap();
        let st = stat(&dir).unwrap();
        assert_eq!(
            (st.st_mode & libc::S_IFMT, st.st_mode & 0o7777, st.st_uid, st.st_gid),
            (libc::S_IFDIR, 0o3775, 7, 8)
        );
    }

    #[test]
    fn create_makes_special_files() {
        let (_tmp, tree, root) = setup();
        let fifo = tree.create(&root, b"fifo", &new(NodeKind::Fifo, 0o640)).unwrap();
        assert_eq!(stat(&fifo).unwrap().st_mode, libc::S_IFIFO | 0o640);
        let sock = tree.create(&root, b"sock", &new(NodeKind::Socket, 0o600)).unwrap();
        assert_eq!(stat(&sock).unwrap().st_mode, libc::S_IFSOCK | 0o600);
        let rdev = libc::makedev(1, 3);
        let spec = NewNode { rdev, ..new(NodeKind::CharDev, 0o666) };
        let chr = tree.create(&root, b"null", &spec).unwrap();
        let st = stat(&chr).unwrap();
        assert_eq!((st.st_mode, st.st_rdev), (libc::S_IFCHR | 0o666, rdev));
        let spec = NewNode { rdev: libc::makedev(7, 0), ..new(NodeKind::BlockDev, 0o660) };
        let blk = tree.create(&root, b"loop", &spec).unwrap();
        assert_eq!(stat(&blk).unwrap().st_mode & libc::S_IFMT, libc::S_IFBLK);
        // Data operations refuse what is not a regular file, before opening it.
        assert_eq!(errno(tree.write(&chr, 0, b"x")), libc::EINVAL);
        assert_eq!(errno(tree.write(&fifo, 0, b"x")), libc::EINVAL);
        assert_eq!(errno(tree.set_attr(&fifo, &SetAttr { size: Some(0), ..SetAttr::default() })), libc::EINVAL);
        assert_eq!(errno(tree.write(&root, 0, b"x")), libc::EISDIR);
        assert_eq!(errno(tree.fallocate(&blk, 0, 0, 1)), libc::EINVAL);
    }

    #[test]
    fn create_of_an_existing_name_is_eexist_and_changes_nothing() {
        let (_tmp, tree, root) = setup();
        let spec = NewNode { uid: 5, ..new(NodeKind::File, 0o600) };
        let file = tree.create(&root, b"x", &spec).unwrap();
        for kind in [NodeKind::File, NodeKind::Dir, NodeKind::Fifo] {
            let spec = NewNode { uid: 9, ..new(kind, 0o777) };
            assert_eq!(errno(tree.create(&root, b"x", &spec)), libc::EEXIST);
        }
        let st = stat(&file).unwrap();
        assert_eq!((st.st_mode & 0o7777, st.st_uid), (0o600, 5));
        // A dangling symlink is a name too: O_EXCL does not follow it.
        let spec = NewNode { target: b"nowhere", ..new(NodeKind::Symlink, 0o777) };
        tree.create(&root, b"dangling", &spec).unwrap();
        assert_eq!(errno(tree.create(&root, b"dangling", &new(NodeKind::File, 0o644))), libc::EEXIST);
        assert_eq!(errno(tree.lookup(&root, b"nowhere")), libc::ENOENT);
    }

    #[test]
    fn names_that_are_not_one_component_are_einval() {
        let (_tmp, tree, root) = setup();
        for name in [&b""[..], b".", b"..", b"a/b", b"/etc", b"nul\0byte"] {
            assert_eq!(errno(tree.lookup(&root, name)), libc::EINVAL, "{name:?}");
            assert_eq!(errno(tree.create(&root, name, &new(NodeKind::File, 0o644))), libc::EINVAL);
            assert_eq!(errno(tree.unlink(&root, name, false)), libc::EINVAL);
            assert_eq!(errno(tree.rename(&root, name, &root, b"z", 0)), libc::EINVAL);
        }
        let spec = NewNode { target: b"a\0b", ..new(NodeKind::Symlink, 0o777) };
        assert_eq!(errno(tree.create(&root, b"s", &spec)), libc::EINVAL);
        assert_eq!(errno(tree.lookup(&root, b"s")), libc::ENOENT);
    }

    #[test]
    fn set_attr_applies_owner_then_mode_then_size_then_times() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"f", &new(NodeKind::File, 0o644)).unwrap();
        tree.write(&file, 0, &[7u8; 10_000]).unwrap();
        let attr = SetAttr {
            mode: Some(0o4750),
            uid: Some(42),
            gid: Some(43),
            size: Some(100),
            atime: Some(Timestamp { secs: 1_000_000_000, nanos: 123 }),
            mtime: Some(Timestamp { secs: 1_500_000_000, nanos: 456_789 }),
        };
        tree.set_attr(&file, &attr).unwrap();
        let st = stat(&file).unwrap();
        assert_eq!((st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size), (0o4750, 42, 43, 100));
        assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000_000, 123));
        assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_500_000_000, 456_789));

        // A chown alone clears suid, as the kernel defines it.
        tree.set_attr(&file, &SetAttr { uid: Some(44), ..SetAttr::default() }).unwrap();
        let st = stat(&file).unwrap();
        assert_eq!((st.st_mode & 0o7777, st.st_uid, st.st_gid), (0o750, 44, 43));

        // None leaves a time alone; growing by truncate zero-fills.
        tree.set_attr(&file, &SetAttr { size: Some(200), ..SetAttr::default() }).unwrap();
        let atime = Timestamp { secs: 2_000_000_000, nanos: 0 };
        tree.set_attr(&file, &SetAttr { atime: Some(atime), ..SetAttr::default() }).unwrap();
        let st = stat(&file).unwrap();
        assert_eq!(st.st_atime, 2_000_000_000);
        assert_ne!(st.st_mtime, 1_500_000_000, "the truncate set mtime");
        let data = read_all(&file);
        assert_eq!(data.len(), 200);
        assert!(data[..100].iter().all(|&b| b == 7) && data[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn set_attr_on_a_symlink_changes_the_link_not_its_target() {
        let (_tmp, tree, root) = setup();
        let target = tree.create(&root, b"target", &new(NodeKind::File, 0o600)).unwrap();
        let spec = NewNode { target: b"target", ..new(NodeKind::Symlink, 0o777) };
        let link = tree.create(&root, b"link", &spec).unwrap();
        let mtime = Timestamp { secs: 1_234_567_890, nanos: 5 };
        let attr = SetAttr { mode: Some(0o600), uid: Some(77), mtime: Some(mtime), ..SetAttr::default() };
        tree.set_attr(&link, &attr).unwrap();
        let (ls, ts) = (stat(&link).unwrap(), stat(&target).unwrap());
        assert_eq!((ls.st_uid, ls.st_mtime, ls.st_mtime_nsec), (77, 1_234_567_890, 5));
        assert_eq!(ls.st_mode & 0o7777, 0o777, "mode is skipped on symlinks");
        assert_eq!((ts.st_uid, ts.st_mode & 0o7777), (0, 0o600));
        assert_ne!(ts.st_mtime, 1_234_567_890);
    }

    #[test]
    fn write_lands_at_its_offset() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"w", &new(NodeKind::File, 0o644)).unwrap();
        tree.write(&file, 0, b"hello world").unwrap();
        tree.write(&file, 6, b"WORLD").unwrap();
        tree.write(&file, 20, b"!").unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        tree.write(&file, 4096, &big).unwrap();
        let data = read_all(&file);
        assert_eq!(&data[..11], b"hello WORLD");
        assert_eq!(data[20], b'!');
        assert_eq!(&data[4096..], &big[..]);
        tree.write(&file, 0, b"").unwrap();
        assert_eq!(read_all(&file).len(), 4096 + big.len());
    }

    #[test]
    fn xattrs_set_get_list_remove() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"x", &new(NodeKind::File, 0o644)).unwrap();
        tree.set_xattr(&file, b"user.one", b"1", 0).unwrap();
        tree.set_xattr(&file, b"user.empty", b"", 0).unwrap();
        let big = vec![b'v'; 3000];
        tree.set_xattr(&file, b"user.big", &big, 0).unwrap();
        assert_eq!(get_xattr(&file, b"user.one").unwrap(), b"1");
        assert_eq!(get_xattr(&file, b"user.empty").unwrap(), b"");
        assert_eq!(get_xattr(&file, b"user.big").unwrap(), big);
        let mut names: Vec<&[u8]> = Vec::new();
        let list = list_xattr(&file).unwrap();
        names.extend(list.split(|&b| b == 0).filter(|n| !n.is_empty()));
        names.sort();
        assert_eq!(names, [&b"user.big"[..], b"user.empty", b"user.one"]);
        assert_eq!(errno(tree.set_xattr(&file, b"user.one", b"2", libc::XATTR_CREATE as u32)), libc::EEXIST);
        assert_eq!(errno(tree.set_xattr(&file, b"user.two", b"2", libc::XATTR_REPLACE as u32)), libc::ENODATA);
        tree.remove_xattr(&file, b"user.one").unwrap();
        assert_eq!(errno(get_xattr(&file, b"user.one")), libc::ENODATA);
        assert_eq!(errno(tree.remove_xattr(&file, b"user.one")), libc::ENODATA);
        assert_eq!(errno(tree.set_xattr(&file, b"user.\0", b"", 0)), libc::EINVAL);
        // Directories take user.* too.
        tree.set_xattr(&root, b"user.dir", b"d", 0).unwrap();
        assert_eq!(get_xattr(&root, b"user.dir").unwrap(), b"d");
    }

    #[test]
    fn xattrs_on_a_symlink_apply_to_the_link_itself() {
        let (_tmp, tree, root) = setup();
        let target = tree.create(&root, b"t", &new(NodeKind::File, 0o644)).unwrap();
        let spec = NewNode { target: b"t", ..new(NodeKind::Symlink, 0o777) };
        let link = tree.create(&root, b"l", &spec).unwrap();
        assert_eq!(errno(tree.set_xattr(&link, b"user.a", b"1", 0)), libc::EPERM);
        tree.set_xattr(&link, b"trusted.a", b"on-link", 0).unwrap();
        assert_eq!(get_xattr(&link, b"trusted.a").unwrap(), b"on-link");
        assert_eq!(errno(get_xattr(&target, b"trusted.a")), libc::ENODATA);
        tree.remove_xattr(&link, b"trusted.a").unwrap();
    }

    #[test]
    fn rename_noreplace_refuses_an_existing_name() {
        let (_tmp, tree, root) = setup();
        tree.create(&root, b"a", &new(NodeKind::File, 0o644)).unwrap();
        tree.create(&root, b"b", &new(NodeKind::File, 0o644)).unwrap();
        assert_eq!(errno(tree.rename(&root, b"a", &root, b"b", libc::RENAME_NOREPLACE)), libc::EEXIST);
        tree.rename(&root, b"a", &root, b"c", libc::RENAME_NOREPLACE).unwrap();
        assert_eq!(errno(tree.lookup(&root, b"a")), libc::ENOENT);
    }

    #[test]
    fn rename_exchange_swaps_the_two_names() {
        let (_tmp, tree, root) = setup();
        let a = tree.create(&root, b"a", &new(NodeKind::File, 0o644)).unwrap();
        let dir = tree.create(&root, b"d", &new(NodeKind::Dir, 0o755)).unwrap();
        let b = tree.create(&dir, b"b", &new(NodeKind::Dir, 0o755)).unwrap();
        tree.rename(&root, b"a", &dir, b"b", libc::RENAME_EXCHANGE).unwrap();
        let (ha, hb) = (tree.handle_of(&a).unwrap(), tree.handle_of(&b).unwrap());
        assert_eq!(tree.handle_of(&tree.lookup(&dir, b"b").unwrap()).unwrap(), ha);
        assert_eq!(tree.handle_of(&tree.lookup(&root, b"a").unwrap()).unwrap(), hb);
        assert_eq!(errno(tree.rename(&root, b"a", &root, b"none", libc::RENAME_EXCHANGE)), libc::ENOENT);
    }

    #[test]
    fn unlink_and_rmdir() {
        let (_tmp, tree, root) = setup();
        let dir = tree.create(&root, b"d", &new(NodeKind::Dir, 0o755)).unwrap();
        tree.create(&dir, b"f", &new(NodeKind::File, 0o644)).unwrap();
        assert_eq!(errno(tree.unlink(&root, b"d", true)), libc::ENOTEMPTY);
        assert_eq!(errno(tree.unlink(&root, b"d", false)), libc::EISDIR);
        assert_eq!(errno(tree.unlink(&dir, b"f", true)), libc::ENOTDIR);
        tree.unlink(&dir, b"f", false).unwrap();
        tree.unlink(&root, b"d", true).unwrap();
        assert_eq!(errno(tree.lookup(&root, b"d")), libc::ENOENT);
        assert_eq!(errno(tree.unlink(&root, b"d", true)), libc::ENOENT);
    }

    #[test]
    fn fallocate_punches_a_hole_and_keeps_the_size() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"p", &new(NodeKind::File, 0o644)).unwrap();
        tree.write(&file, 0, &[0xAA; 3 * 65536]).unwrap();
        tree.sync_all().unwrap();
        let blocks_before = stat(&file).unwrap().st_blocks;
        let mode = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32;
        tree.fallocate(&file, mode, 65536, 65536).unwrap();
        let st = stat(&file).unwrap();
        assert_eq!(st.st_size, 3 * 65536);
        assert!(st.st_blocks < blocks_before, "{} < {blocks_before}", st.st_blocks);
        let data = read_all(&file);
        assert!(data[..65536].iter().all(|&b| b == 0xAA));
        assert!(data[65536..131072].iter().all(|&b| b == 0));
        assert!(data[131072..].iter().all(|&b| b == 0xAA));
        // Plain preallocation past the end grows the file.
        tree.fallocate(&file, 0, 0, 4 * 65536).unwrap();
        assert_eq!(stat(&file).unwrap().st_size, 4 * 65536);
        assert_eq!(errno(tree.fallocate(&file, 0, u64::MAX, 1)), libc::EINVAL);
    }

    #[test]
    fn read_dir_lists_entries_without_dot_and_dotdot() {
        let (_tmp, tree, root) = setup();
        assert!(read_dir(&root).unwrap().is_empty());
        let mut want = Vec::new();
        for i in 0..1000 {
            let name = format!("entry-with-a-longish-name-{i:04}").into_bytes();
            let kind = if i % 10 == 0 { NodeKind::Dir } else { NodeKind::File };
            let node = tree.create(&root, &name, &new(kind, 0o755)).unwrap();
            let d_type = if kind == NodeKind::Dir { libc::DT_DIR } else { libc::DT_REG } as u32;
            want.push((name, stat(&node).unwrap().st_ino, d_type));
        }
        let mut got = read_dir(&root).unwrap();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let file = tree.lookup(&root, b"entry-with-a-longish-name-0001").unwrap();
        assert_eq!(errno(read_dir(&file)), libc::ENOTDIR);
    }

    #[test]
    fn statfs_and_sync_all_work_on_o_path_nodes() {
        let (_tmp, tree, root) = setup();
        let st = statfs(&root).unwrap();
        assert!(st.f_bsize > 0 && st.f_blocks > 0);
        assert_eq!(st.f_namemax, 255);
        tree.sync_all().unwrap();
    }

    #[test]
    fn reopen_drops_create_excl_and_nofollow() {
        let (_tmp, tree, root) = setup();
        let file = tree.create(&root, b"r", &new(NodeKind::File, 0o644)).unwrap();
        tree.write(&file, 0, b"abc").unwrap();
        let fd = reopen(&file, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW).unwrap();
        let mut buf = [0u8; 3];
        File::from(fd).read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc");
    }
}
