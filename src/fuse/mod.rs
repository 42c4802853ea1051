//! The only module that imports fuser: thin adapters from kernel requests to
//! `passthrough::Core` (mutations) and the backing tree (reads). Each handler decodes,
//! calls the core, maps the error, replies.

mod attr;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno as KErrno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::format::ops::{NodeKind, SetAttr};
use crate::io::NewNode;
use crate::os::storage::DirStorage;
use crate::os::tree::{self as ostree, OsNode, OsTree};
use crate::passthrough::{Core, Errno};
use crate::types::FileId;
use attr::{errno, file_attr, io_errno, timestamp};

pub type OsCore = Core<DirStorage, OsTree>;

/// Mount-time choices that change how the kernel talks to us.
#[derive(Clone, Copy, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache attributes and names.
    pub ttl: Duration,
    /// Ask for the kernel's writeback cache (the kernel gathers small writes; the mount's
    /// committer syncs the mount so un-synced writes still reach the journal within the
    /// commit interval).
    pub writeback_cache: bool,
}

struct OpenFile {
    id: FileId,
    fd: OwnedFd,
    /// O_SYNC / O_DSYNC: every write waits for the journal flush.
    sync: bool,
}

struct OpenDir {
    entries: Vec<(Vec<u8>, u32)>,
}

pub struct FerryFs {
    core: Arc<OsCore>,
    opts: FuseOptions,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
}

fn name_bytes(n: &OsStr) -> &[u8] {
    n.as_bytes()
}

/// Flags the backing fd must not get: the journal covers sync, the kernel gives offsets for
/// appends, and creation already happened.
const OPEN_FLAGS_DROPPED: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_DIRECT;

fn pwrite_all(fd: &OwnedFd, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        // SAFETY: fd is open for the duration of the call; data is a valid slice.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), offset as i64) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

fn pread(fd: &OwnedFd, size: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut got = 0;
    while got < size {
        // SAFETY: fd is open; the destination range lies inside `buf`.
        let n = unsafe {
            libc::pread(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), size - got, (offset + got as u64) as i64)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    buf.truncate(got);
    Ok(buf)
}

impl FerryFs {
    pub fn new(core: Arc<OsCore>, opts: FuseOptions) -> FerryFs {
        FerryFs {
            core,
            opts,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn attr(&self, id: FileId, node: &OsNode) -> Result<fuser::FileAttr, KErrno> {
        let st = ostree::stat(node).map_err(io_errno)?;
        Ok(file_attr(id, &st))
    }

    /// Replies with an entry the core has counted a kernel reference for; if the reply cannot
    /// be made, the reference is given back (the kernel will never forget it).
    fn entry(&self, reply: ReplyEntry, r: Result<(FileId, Arc<OsNode>), Errno>) {
        let (id, node) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(errno(e)),
        };
        match self.attr(id, &node) {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => {
                self.core.forget(id, 1);
                reply.error(e)
            }
        }
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, KErrno> {
        self.files.lock().unwrap().get(&fh.0).cloned().ok_or(KErrno::EBADF)
    }

    fn add_file(&self, f: OpenFile) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().unwrap().insert(fh, Arc::new(f));
        FileHandle(fh)
    }

    /// Owner and mode of a new object: the caller's uid, the parent's gid when the parent is
    /// set-group-id (and then new directories inherit the bit), else the caller's gid.
    fn new_owner(&self, req: &Request, parent: FileId, kind: NodeKind, mode: u32) -> Result<(u32, u32, u32), KErrno> {
        let dir = self.core.node(parent).map_err(errno)?;
        let st = ostree::stat(&dir).map_err(io_errno)?;
        let mut mode = mode & 0o7777;
        let gid = if st.st_mode & libc::S_ISGID != 0 {
            if kind == NodeKind::Dir {
                mode |= libc::S_ISGID;
            }
            st.st_gid
        } else {
            req.gid()
        };
        Ok((req.uid(), gid, mode))
    }

    #[allow(clippy::too_many_arguments)] // the kernel's create/mknod/symlink fields, as given
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: NodeKind,
        mode: u32,
        rdev: u64,
        target: &[u8],
    ) -> Result<(FileId, Arc<OsNode>), KErrno> {
        let parent = FileId(parent.0);
        let (uid, gid, mode) = self.new_owner(req, parent, kind, mode)?;
        let new = NewNode { kind, mode, uid, gid, rdev, target };
        self.core.create(parent, name_bytes(name), &new).map_err(errno)
    }

    /// Clears set-user-id, and set-group-id where the backing filesystem would (group execute
    /// set, or the caller not in the file's group), as an unprivileged write or truncate does.
    fn kill_privs(&self, req: &Request, id: FileId) -> Result<(), KErrno> {
        let node = self.core.node(id).map_err(errno)?;
        let st = ostree::stat(&node).map_err(io_errno)?;
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if st.st_mode & libc::S_IXGRP != 0 || !in_group(req, st.st_gid) {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            self.core.set_attr(id, &SetAttr { mode: Some(mode), ..Default::default() }).map_err(errno)?;
        }
        Ok(())
    }

    /// fsync and fsyncdir: every record journaled so far is durable (the backing file is not
    /// synced: the journal covers it); concurrent callers share one flush.
    fn reply_synced(&self, reply: ReplyEmpty) {
        match self.core.sync() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Flags for the backing fd. With the writeback cache the kernel reads whole pages to fill
    /// partial writes, so a write-only open must be able to read.
    fn backing_flags(&self, flags: i32) -> i32 {
        let mut f = flags & !OPEN_FLAGS_DROPPED;
        if self.opts.writeback_cache && f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        f
    }

    fn open_flags(&self, flags: i32) -> FopenFlags {
        let _ = flags;
        if self.opts.writeback_cache { FopenFlags::empty() } else { FopenFlags::FOPEN_KEEP_CACHE }
    }
}

impl Filesystem for FerryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // KILLPRIV_V2: the kernel tells us when a write or truncate must clear set-user-id and
        // set-group-id, and we clear them with the backing filesystem's rules (the kernel's own
        // FUSE fallback keeps a set-group-id bit without group execute, unlike ext4).
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if let Err(missing) = config.add_capabilities(want) {
            tracing::warn!("kernel lacks FUSE capabilities {missing:?}; continuing without them");
            let _ = config.add_capabilities(want & !missing);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.core.sync() {
            tracing::error!("final journal flush failed: {e:?}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.core.lookup(FileId(parent.0), name_bytes(name)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(FileId(ino.0), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let id = FileId(ino.0);
        let st = match fh.and_then(|fh| self.file(fh).ok()) {
            Some(f) => {
                let mut st: libc::stat = unsafe_zeroed_stat();
                // SAFETY: the fd is open and `st` is a valid out-parameter.
                let r = unsafe { libc::fstat(f.fd.as_raw_fd(), &mut st) };
                if r < 0 { Err(io_errno(std::io::Error::last_os_error())) } else { Ok(st) }
            }
            None => self.core.node(id).map_err(errno).and_then(|n| ostree::stat(&n).map_err(io_errno)),
        };
        match st {
            Ok(st) => reply.attr(&self.opts.ttl, &file_attr(id, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let now = SystemTime::now();
        let resolve = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::SpecificTime(t) => attr::kernel_timestamp(t),
                TimeOrNow::Now => timestamp(now),
            })
        };
        let attr = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid: uid.filter(|&u| u != u32::MAX),
            gid: gid.filter(|&g| g != u32::MAX),
            size,
            atime: resolve(atime),
            mtime: resolve(mtime),
        };
        let id = FileId(ino.0);
        if size.is_some()
            && _req.uid() != 0
            && let Err(e) = self.kill_privs(_req, id)
        {
            return reply.error(e);
        }
        match self.core.set_attr(id, &attr).map_err(errno).and_then(|n| self.attr(id, &n)) {
            Ok(a) => reply.attr(&self.opts.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.node(FileId(ino.0)).map_err(errno).and_then(|n| ostree::read_link(&n).map_err(io_errno)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = attr::node_kind(mode);
        match self.make(req, parent, name, kind, mode, rdev as u64, b"") {
            Ok(r) => self.entry(reply, Ok(r)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        match self.make(req, parent, name, NodeKind::Dir, mode, 0, b"") {
            Ok(r) => self.entry(reply, Ok(r)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.unlink(FileId(parent.0), name_bytes(name), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.unlink(FileId(parent.0), name_bytes(name), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        match self.make(req, parent, link_name, NodeKind::Symlink, 0o777, 0, target.as_os_str().as_bytes()) {
            Ok(r) => self.entry(reply, Ok(r)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.core.rename(
            FileId(parent.0),
            name_bytes(name),
            FileId(newparent.0),
            name_bytes(newname),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let id = FileId(ino.0);
        self.entry(reply, self.core.link(id, FileId(newparent.0), name_bytes(newname)).map(|n| (id, n)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let id = FileId(ino.0);
        let opened = self
            .core
            .node(id)
            .map_err(errno)
            .and_then(|n| ostree::reopen(&n, self.backing_flags(flags.0)).map_err(io_errno));
        match opened {
            Ok(fd) => {
                let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
                let fh = self.add_file(OpenFile { id, fd, sync });
                reply.opened(fh, self.open_flags(flags.0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.file(fh).and_then(|f| pread(&f.fd, size as usize, offset).map_err(io_errno)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && let Err(e) = self.kill_privs(req, f.id)
        {
            return reply.error(e);
        }
        let r = self.core.write(f.id, offset, data, || pwrite_all(&f.fd, data, offset));
        let sync = f.sync || flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match r.and_then(|_| if sync { self.core.sync().map(|_| ()) } else { Ok(()) }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.reply_synced(reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let listed = self.core.node(FileId(ino.0)).map_err(errno).and_then(|n| ostree::read_dir(&n).map_err(io_errno));
        match listed {
            Ok(list) => {
                let entries = list.into_iter().map(|(name, _ino, t)| (name, t)).collect();
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().unwrap().insert(fh, Arc::new(OpenDir { entries }));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(dir) = self.dirs.lock().unwrap().get(&fh.0).cloned() else { return reply.error(KErrno::EBADF) };
        let id = FileId(ino.0);
        let mut index = offset as usize;
        if index == 0 {
            if reply.add(ino, 1, fuser::FileType::Directory, ".") {
                return reply.ok();
            }
            index = 1;
        }
        if index == 1 {
            if reply.add(ino, 2, fuser::FileType::Directory, "..") {
                return reply.ok();
            }
            index = 2;
        }
        let parent_node = match self.core.node(id) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, (name, t)) in dir.entries.iter().enumerate().skip(index - 2) {
            // The entry's id (bound on first sight, so `ls -i` agrees with `stat`).
            let child = match self.core.peek_id(&parent_node, name) {
                Ok(c) => c,
                Err(_) => continue, // removed since opendir
            };
            if reply.add(INodeNo(child.0), (i + 3) as u64, attr::dirent_type(*t), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(dir) = self.dirs.lock().unwrap().get(&fh.0).cloned() else { return reply.error(KErrno::EBADF) };
        let id = FileId(ino.0);
        let dir_attr = match self.core.node(id).map_err(errno).and_then(|n| self.attr(id, &n)) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        let ttl = self.opts.ttl;
        let mut index = offset as usize;
        // "." and "..": the kernel takes no reference for them.
        for (i, name) in [(0usize, "."), (1, "..")] {
            if index == i {
                if reply.add(ino, (i + 1) as u64, name, &ttl, &dir_attr, Generation(0)) {
                    return reply.ok();
                }
                index = i + 1;
            }
        }
        for (i, (name, _t)) in dir.entries.iter().enumerate().skip(index - 2) {
            // A full lookup: the kernel counts a reference for every entry it receives.
            let Ok((child, node)) = self.core.lookup(id, name) else { continue };
            let Ok(a) = self.attr(child, &node) else {
                self.core.forget(child, 1);
                continue;
            };
            if reply.add(INodeNo(child.0), (i + 3) as u64, OsStr::from_bytes(name), &ttl, &a, Generation(0)) {
                // Did not fit: the kernel never saw it, so it holds no reference.
                self.core.forget(child, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.reply_synced(reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.core.node(FileId(ino.0)).map_err(errno).and_then(|n| ostree::statfs(&n).map_err(io_errno)) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if is_private_xattr(name) {
            return reply.error(KErrno::EPERM);
        }
        match self.core.set_xattr(FileId(ino.0), name_bytes(name), value, flags as u32) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_private_xattr(name) {
            return reply.error(KErrno::ENODATA);
        }
        let r = self
            .core
            .node(FileId(ino.0))
            .map_err(errno)
            .and_then(|n| ostree::get_xattr(&n, name_bytes(name)).map_err(io_errno));
        xattr_reply(reply, r, size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.core.node(FileId(ino.0)).map_err(errno).and_then(|n| ostree::list_xattr(&n).map_err(io_errno));
        xattr_reply(reply, r.map(without_private_xattrs), size);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if is_private_xattr(name) {
            return reply.error(KErrno::EPERM);
        }
        match self.core.remove_xattr(FileId(ino.0), name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let made = match self.make(req, parent, name, NodeKind::File, mode, 0, b"") {
            Ok(m) => Ok(m),
            // Lost a race with another creator and O_EXCL was not asked for: open it.
            Err(e) if e == KErrno::EEXIST && flags & libc::O_EXCL == 0 => {
                self.core.lookup(FileId(parent.0), name_bytes(name)).map_err(errno)
            }
            Err(e) => Err(e),
        };
        let opened = made.and_then(|(id, node)| {
            let fd_and_attr = ostree::reopen(&node, self.backing_flags(flags))
                .map_err(io_errno)
                .and_then(|fd| Ok((self.attr(id, &node)?, fd)));
            match fd_and_attr {
                Ok((a, fd)) => Ok((id, a, fd)),
                Err(e) => {
                    // The kernel gets no entry: give back the reference the core counted.
                    self.core.forget(id, 1);
                    Err(e)
                }
            }
        });
        match opened {
            Ok((id, a, fd)) => {
                let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
                let fh = self.add_file(OpenFile { id, fd, sync });
                reply.created(&self.opts.ttl, &a, Generation(0), fh, self.open_flags(flags));
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let apply = || {
            // SAFETY: the fd is open for the duration of the call.
            let r = unsafe { libc::fallocate(f.fd.as_raw_fd(), mode, offset as i64, length as i64) };
            if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        };
        match self.core.fallocate(f.id, mode as u32, offset, length, Some(&apply)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // SAFETY: the fd is open; lseek on our private fd only moves its own offset.
        let r = unsafe { libc::lseek(f.fd.as_raw_fd(), offset, whence) };
        if r < 0 {
            reply.error(io_errno(std::io::Error::last_os_error()));
        } else {
            reply.offset(r);
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // Journaled as a plain write of the bytes read: the journal must carry the data.
        let r = (|| {
            let src = self.file(fh_in)?;
            let dst = self.file(fh_out)?;
            let n = len.min(1 << 20) as usize;
            let data = pread(&src.fd, n, offset_in).map_err(io_errno)?;
            self.core.write(dst.id, offset_out, &data, || pwrite_all(&dst.fd, &data, offset_out)).map_err(errno)?;
            Ok::<_, KErrno>(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }
}

/// True when the caller is in group `gid` (primary or supplementary, from /proc).
fn in_group(req: &Request, gid: u32) -> bool {
    if req.gid() == gid {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", req.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse::<u32>() == Ok(gid)))
}

/// ferryfs's own xattrs (`trusted.ferryfs.*`: the applied marker on the backing root, a mirror
/// target's object tags when its directory becomes a backing directory): invisible and
/// untouchable through the mount.
fn is_private_xattr(name: &OsStr) -> bool {
    crate::io::is_private_xattr(name.as_bytes())
}

fn without_private_xattrs(list: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty() && !crate::io::is_private_xattr(n)) {
        out.extend_from_slice(name);
        out.push(0);
    }
    out
}

fn xattr_reply(reply: ReplyXattr, r: Result<Vec<u8>, KErrno>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(KErrno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e),
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trusted_ferryfs_xattr_is_hidden_and_only_those() {
        let list = b"user.a\0trusted.ferryfs.applied\0trusted.ferryfs.id\0trusted.ferryfsx\0security.s\0".to_vec();
        assert_eq!(without_private_xattrs(list), b"user.a\0trusted.ferryfsx\0security.s\0");
        assert!(is_private_xattr(OsStr::new("trusted.ferryfs.created")));
        assert!(!is_private_xattr(OsStr::new("trusted.ferryfs")));
    }
}
