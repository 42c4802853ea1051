//! Test harness for replication: a `ferryfs target` process on temp dirs, a tree comparison
//! that says what differs, and waiting for a mount's targets to converge.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ferryfs;
use super::node::NodeProc;

/// How long a start waits for the target to listen.
const LISTEN_WITHIN: Duration = Duration::from_secs(20);

/// A `ferryfs target` child process with its own `--dir` and `--state`.
pub struct TargetProc {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub addr: SocketAddr,
    node: NodeProc,
    _tmp: TempDir,
}

impl TargetProc {
    /// Starts a target on a port of its own choosing (127.0.0.1:0).
    pub fn start(args: &[&str]) -> TargetProc {
        let tmp = tempfile::Builder::new().prefix("ferryfs-target-").tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let (dir, state) = (base.join("dir"), base.join("state"));
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&state).unwrap();
        let mut after_listen: Vec<OsString> =
            vec!["--dir".into(), dir.clone().into(), "--state".into(), state.clone().into()];
        after_listen.extend(args.iter().map(OsString::from));
        let node = NodeProc::start_with(base.join("target.log"), vec!["target".into()], after_listen, LISTEN_WITHIN);
        TargetProc { dir, state, addr: node.addr, node, _tmp: tmp }
    }

    pub fn url(&self) -> String {
        self.node.url()
    }

    pub fn log(&self) -> String {
        self.node.log()
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill9(&mut self) {
        self.node.kill9();
    }

    /// Starts again on the same address and directories.
    pub fn restart(&mut self) {
        self.node.restart();
    }

    /// SIGTERM and wait (bounded).
    pub fn stop(&mut self) {
        self.node.stop();
    }
}

/// What a comparison looks at for one name.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    content: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    mtime: (i64, i64),
}

/// The ways `b` differs from `a`: tree, types, contents, modes, owners, symlink targets, hard
/// links (names grouped by inode), xattrs (but ferryfs's own) and mtimes. Empty when equal.
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    let (ea, la) = scan(a);
    let (eb, lb) = scan(b);
    let mut out = Vec::new();
    for k in ea.keys().chain(eb.keys().filter(|k| !ea.contains_key(*k))) {
        match (ea.get(k), eb.get(k)) {
            (Some(x), Some(y)) if x != y => out.push(format!("{k}: {}", describe_diff(x, y))),
            (Some(_), None) => out.push(format!("{k}: missing in {}", b.display())),
            (None, Some(_)) => out.push(format!("{k}: extra in {}", b.display())),
            _ => {}
        }
    }
    if la != lb {
        out.push(format!("hard-link groups differ: {la:?} vs {lb:?}"));
    }
    out
}

fn describe_diff(x: &Entry, y: &Entry) -> String {
    let mut d = Vec::new();
    if x.kind != y.kind {
        d.push(format!("type {:o} vs {:o}", x.kind, y.kind));
    }
    if x.mode != y.mode {
        d.push(format!("mode {:o} vs {:o}", x.mode, y.mode));
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        d.push(format!("owner {}:{} vs {}:{}", x.uid, x.gid, y.uid, y.gid));
    }
    if x.nlink != y.nlink {
        d.push(format!("nlink {} vs {}", x.nlink, y.nlink));
    }
    if x.content != y.content {
        d.push(format!("content ({} vs {} bytes)", x.content.len(), y.content.len()));
    }
    if x.xattrs != y.xattrs {
        d.push(format!(
            "xattrs {:?} vs {:?}",
            x.xattrs.keys().collect::<Vec<_>>(),
            y.xattrs.keys().collect::<Vec<_>>()
        ));
    }
    if x.mtime != y.mtime {
        d.push(format!("mtime {:?} vs {:?}", x.mtime, y.mtime));
    }
    d.join(", ")
}

type LinkGroups = Vec<Vec<String>>;

fn scan(root: &Path) -> (BTreeMap<String, Entry>, LinkGroups) {
    let mut out = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    out.insert(".".to_string(), entry(root));
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            } else if m.nlink() > 1 {
                by_ino.entry(m.ino()).or_default().push(rel.clone());
            }
            out.insert(rel, entry(&p));
        }
    }
    let mut groups: LinkGroups = by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (out, groups)
}

fn entry(p: &Path) -> Entry {
    let m = fs::symlink_metadata(p).unwrap();
    let kind = m.mode() & libc::S_IFMT;
    let content = if m.is_file() {
        fs::read(p).unwrap()
    } else if m.file_type().is_symlink() {
        fs::read_link(p).unwrap().into_os_string().into_encoded_bytes()
    } else {
        Vec::new()
    };
    Entry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        nlink: if m.is_dir() { 0 } else { m.nlink() },
        content,
        xattrs: xattrs(p),
        mtime: (m.mtime(), m.mtime_nsec()),
    }
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = super::cpath(p);
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    // SAFETY: buffers are valid for their lengths; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr() as *mut libc::c_char, names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty() && !n.starts_with(b"trusted.ferryfs."))
    {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr() as *mut libc::c_void, v.len()) };
        if len >= 0 {
            v.truncate(len as usize);
            out.insert(name.to_vec(), v);
        }
    }
    out
}

/// `ferryfs status --journal J --json` of a running mount, parsed.
pub fn status(journal: &Path) -> serde_json::Value {
    let out = ferryfs().arg("status").arg("--journal").arg(journal).arg("--json").output().unwrap();
    assert!(out.status.success(), "ferryfs status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until every target of the mount is in sync with nothing left to send, and `dirs`
/// equal `backing`; panics with the differences after `timeout`.
pub fn wait_converged(journal: &Path, backing: &Path, dirs: &[&Path], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(journal);
        let synced = st["targets"].as_array().unwrap().iter().all(|t| t["state"] == "in-sync" && t["lag_records"] == 0);
        let diffs: Vec<String> =
            if synced { dirs.iter().flat_map(|d| tree_diff(backing, d)).collect() } else { vec!["not in sync".into()] };
        if diffs.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "targets did not converge in {timeout:?}:\nstatus: {st:#}\ndiffs (first 20): {:#?}",
                &diffs[..diffs.len().min(20)]
            );
        }
        sleep(Duration::from_millis(200));
    }
}
