//! `ferryfs demo`: a journaled, replicating mount on temp dirs with a mirror target in this
//! process: a workload, status as it goes, a mirror check, a crash, a replay, a resync, a check.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::common::human_bytes;
use crate::journal::JournalGeometry;
use crate::net::target::{Target, TargetConfig};
use crate::status::StatusReport;

#[derive(clap::Args, Debug)]
#[command(
    about = "Show ferryfs at work on temp dirs: mount, replicate, crash, recover, resync, then a bunker and a failover",
    long_about = "Runs a self-contained demonstration in a new temporary directory and removes it afterwards \
(unless --keep). Nothing outside that directory is touched, and no network beyond loopback is used.\n\n\
Steps:\n  \
1. Data that exists before the mount: a few files (32 MiB) are put straight into the backing directory.\n  \
2. A mirror target starts inside the demo process, as `ferryfs target` would, on a free loopback port \
(127.0.0.1), with its --dir and --state in the temporary directory and a log of 8 segments of 16 MiB.\n  \
3. `ferryfs mount` runs as a child process with `--target tcp://127.0.0.1:PORT --commit-interval 1s`; \
the new target receives the existing data by initial sync.\n  \
4. A sample workload goes through the mount: files of various sizes (empty to 24 MiB) with and without \
fsync, renames of files and of a directory, a hard link, a symlink, an extended attribute, chmod, chown \
(as root), an overwrite in place, a truncate and an unlink. `ferryfs status` is shown as it goes: the \
target's state (initial-sync, connected, in-sync), its lag and the bytes sent.\n  \
5. The demo waits until `ferryfs status --json` shows the target in-sync with no records unacked, then \
compares the mirror with the backing directory: names, types, contents, modes, owners, symlink targets, \
hard links, extended attributes (but ferryfs's own trusted.ferryfs.*) and mtimes. It prints `mirror \
identical: N files, M bytes`, or the first differences and fails.\n  \
6. More fsynced writes, then a crash: the mount is killed with SIGKILL. `ferryfs replay --dry-run` \
shows what recovery will redo.\n  \
7. The mount restarts with the same target. Its recovery marks in the target's sync map everything the \
journal holds that the target may not have acknowledged, then replays the journal into the backing \
directory; every fsynced byte is verified there. The primary resyncs the target from the sync map, one \
more file is written, and the mirror is compared again as in step 5.\n\n\
8. A bunker (`ferryfs bunker`, a child process on another loopback port) is added: the mount \
restarts with `--bunker tcp://127.0.0.1:PORT --bunker-mode sync`. The target goes away, 20 files are \
written with fsync (the bunker holds them, the target does not), and the primary is killed. The target \
comes back without them; `ferryfs failover --bunker … --target …` copies the records it lacks from the \
bunker and promotes it; every one of the 20 files is then verified in the mirror.\n\n\
Finally the target and the bunker are stopped. On any failure, interruption (Ctrl-C, \
SIGTERM) or panic, the mount is killed and detached, the target stopped and the temporary directory \
removed (unless --keep); the exit status is then 1. The whole run takes a few seconds.\n\n\
Needs root (or FUSE access) and /dev/fuse. The mount runs as `ferryfs mount` from this same \
executable; its log is mount.log (mount-after-crash.log after the crash) in the temporary directory.",
    after_help = "EXAMPLES:\n  cargo run --release -- demo\n  ferryfs demo --files 1000 --keep"
)]
pub struct DemoArgs {
    /// Small files the workload writes (each fsynced).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(5..=100_000))]
    pub files: u64,
    /// Keep the temporary directory afterwards (for a look around), even when the demo fails.
    #[arg(long)]
    pub keep: bool,
}

/// Data in the backing directory before the mount: the new target's initial sync copies it.
const EXISTING_FILES: u64 = 8;
/// Files fsynced while the target is away, just before the primary dies.
const DISASTER_FILES: u64 = 20;
const EXISTING_FILE_BYTES: usize = 4 << 20;
/// The big file of the workload, written without fsync in chunks.
const BIG_FILE_BYTES: usize = 24 << 20;
const CHUNK: usize = 1 << 20;
/// The embedded target's log.
const TARGET_GEOMETRY: JournalGeometry = JournalGeometry { segment_size: 16 << 20, segment_count: 8 };
/// Waits, all far above what the demo needs on loopback.
const MOUNT_UP: Duration = Duration::from_secs(10);
const TARGET_UP: Duration = Duration::from_secs(5);
const IN_SYNC: Duration = Duration::from_secs(20);
const APPLIED: Duration = Duration::from_secs(10);
const CLEAN_STOP: Duration = Duration::from_secs(10);
/// How often the status table is shown while waiting for the target.
const SHOW_EVERY: Duration = Duration::from_millis(1000);
/// Differences shown when the mirror is not identical.
const DIFFS_SHOWN: usize = 20;

pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    // The embedded target's runtime takes over SIGINT (tokio's ctrl_c); the demo watches
    // SIGINT and SIGTERM itself, so that an interruption still cleans up.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;

    let tmp = tempfile::Builder::new().prefix("ferryfs-demo-").tempdir()?;
    let base = tmp.path().canonicalize()?;
    let demo = Demo {
        exe: std::env::current_exe().context("finding the ferryfs executable")?,
        mnt: base.join("mnt"),
        backing: base.join("backing"),
        journal: base.join("journal"),
        mirror: base.join("mirror"),
        target_state: base.join("target-state"),
        base,
        files: a.files,
        interrupted,
        step: Cell::new(0),
    };
    println!("ferryfs demo in {}", demo.base.display());
    let mut guards = Guards { mount: None, target: None, bunker: None };
    let result = demo.run(&mut guards);
    // The mount goes before the target, so the primary does not see its target vanish first.
    drop(guards.mount.take());
    drop(guards.target.take());
    drop(guards.bunker.take());
    let result = match result {
        Err(e) if demo.interrupted.load(Ordering::Relaxed) => Err(e.context("interrupted")),
        r => r,
    };
    if a.keep {
        println!("\nkept {} (mount.log is the mount's log)", tmp.keep().display());
    } else {
        let shown = demo.base.display().to_string();
        tmp.close().with_context(|| format!("removing {shown}"))?;
        println!("\nremoved {shown}");
    }
    result?;
    println!("demo passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

struct Demo {
    exe: PathBuf,
    base: PathBuf,
    mnt: PathBuf,
    backing: PathBuf,
    journal: PathBuf,
    mirror: PathBuf,
    target_state: PathBuf,
    files: u64,
    interrupted: Arc<AtomicBool>,
    step: Cell<u32>,
}

/// What must be undone on every path; dropped mount first, then target, then bunker.
struct Guards {
    mount: Option<MountGuard>,
    target: Option<TargetGuard>,
    bunker: Option<ChildGuard>,
}

/// A child process killed when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills and detaches the demo mount even when the demo fails half way.
struct MountGuard {
    child: Option<Child>,
    mnt: PathBuf,
}

impl MountGuard {
    /// kill -9: no clean shutdown, the journal stays open, as in a crash.
    fn crash(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        detach(&self.mnt);
        Ok(())
    }

    /// SIGTERM and wait: the mount unmounts and closes its journal cleanly.
    fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else { return Ok(()) };
        // Our own child, not yet waited for: the pid is still its.
        let _ = crate::os::terminate(c.id());
        let deadline = Instant::now() + CLEAN_STOP;
        let status = loop {
            if let Some(s) = c.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                detach(&self.mnt);
                bail!("the mount did not stop within {CLEAN_STOP:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            detach(&self.mnt);
            bail!("the mount exited with {status} on SIGTERM");
        }
        if is_mounted(&self.mnt) {
            detach(&self.mnt);
            bail!("the mount exited but {} was still mounted", self.mnt.display());
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.mnt);
    }
}

/// Stops the embedded target and waits for its thread (a final apply and checkpoint).
struct TargetGuard {
    target: Arc<Target>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        self.target.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn detach(mnt: &Path) {
    if let Ok(c) = CString::new(mnt.as_os_str().as_bytes()) {
        crate::os::detach_mount(&c);
    }
}

/// Whether `mnt` is a mount point, per /proc/self/mountinfo (which escapes space, tab, newline
/// and backslash in octal).
fn is_mounted(mnt: &Path) -> bool {
    let mut want = String::new();
    for c in mnt.to_string_lossy().chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => want.push_str(&format!("\\{:03o}", c as u32)),
            c => want.push(c),
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Whether something listens on TCP `port` (per /proc/net/tcp: local address `ADDR:PORT`,
/// state 0A), so the mount can be started without a first failed connection.
fn is_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
    })
}

/// A loopback port nobody listens on right now (the kernel's pick).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// `line` without terminal colour codes (the log's tracing lines have them).
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Deterministic bytes (xorshift64) for file `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Sizes of the small files, in turn: empty, one byte, page edges, up to 150 KB.
fn msg_len(i: u64) -> usize {
    [700, 4096, 12_000, 1, 33_333, 0, 8191, 65_536, 2_500, 150_000][(i % 10) as usize]
}

fn msg_name(i: u64) -> String {
    if i.is_multiple_of(2) { format!("mail/msg-{i:04}") } else { format!("mail/msg-{i:04}.tmp") }
}

/// The overwrite of the crash step: where, and what, inside the big file.
const OVERWRITE_AT: u64 = 5 * (1 << 20) + 123;
const OVERWRITE_SEED: u64 = 0xC0FFEE;
const OVERWRITE_BYTES: usize = 1 << 20;
const AFTER_FILES: u64 = 40;

fn set_xattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    crate::os::set_xattr_at_path(p, name.as_bytes(), value)
}

fn chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

impl Demo {
    fn step(&self, text: &str) {
        self.step.set(self.step.get() + 1);
        println!("\n== {}. {text}", self.step.get());
    }

    fn check_interrupted(&self) -> Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("stopped by a signal");
        }
        Ok(())
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn run(&self, g: &mut Guards) -> Result<()> {
        for d in [&self.mnt, &self.backing, &self.journal, &self.mirror, &self.target_state] {
            std::fs::create_dir(d)?;
        }

        self.step(&format!(
            "existing data: {EXISTING_FILES} files of {} put straight into the backing directory (archive/)",
            human_bytes(EXISTING_FILE_BYTES as u64)
        ));
        std::fs::create_dir(self.backing.join("archive"))?;
        for i in 0..EXISTING_FILES {
            std::fs::write(self.backing.join(format!("archive/part-{i}.bin")), pattern(1000 + i, EXISTING_FILE_BYTES))?;
        }
        println!("  a target new to this mount gets them by initial sync");

        let port = self.start_target(g)?;
        let url = format!("tcp://127.0.0.1:{port}");

        self.step(&format!(
            "mount the primary: ferryfs mount mnt --backing backing --journal journal --target {url} --commit-interval 1s"
        ));
        self.mount(g, &url, "mount.log")?;
        println!("  mounted on {}", self.mnt.display());
        self.wait_connected("just mounted")?;

        self.step(&format!(
            "workload: {} small files (0 B to 150 KB) with fsync, half renamed; a 24 MiB file without fsync; \
             links, a symlink, an xattr, chmod, chown, a directory rename, a truncate, an unlink",
            self.files
        ));
        self.workload()?;

        self.step("wait for the mirror: until `ferryfs status --json` shows the target in-sync, lag_records 0");
        self.wait_in_sync()?;

        self.step(&format!("compare the mirror ({}) with the backing directory", self.mirror.display()));
        self.compare()?;

        self.step("crash: more fsynced writes, then kill -9 the mount (no clean shutdown)");
        self.crash_writes()?;
        g.mount.as_mut().expect("the mount is running").crash()?;
        g.mount = None;
        println!("  killed; mount detached; the target saw its primary go");

        // Not `ferryfs replay`: it frees the log without re-marking the sync maps, so what the
        // target had not acked would never reach it. The mount re-marks first, then replays.
        self.step("what recovery will redo: ferryfs replay --journal journal --backing backing --dry-run");
        let out = Command::new(&self.exe)
            .arg("replay")
            .arg("--journal")
            .arg(&self.journal)
            .arg("--backing")
            .arg(&self.backing)
            .arg("--dry-run")
            .output()
            .context("running ferryfs replay --dry-run")?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {l}");
        }
        if !out.status.success() {
            bail!("replay --dry-run failed: {}", String::from_utf8_lossy(&out.stderr));
        }

        self.step(&format!(
            "restart the mount with the same target ({url}): it marks what the target had not acked, replays \
             the journal, and resyncs the target"
        ));
        let log = "mount-after-crash.log";
        self.mount(g, &url, log)?;
        let text = std::fs::read_to_string(self.base.join(log)).unwrap_or_default();
        for l in text.lines().filter(|l| !l.contains("open files allowed")) {
            println!("  {}", strip_ansi(l));
        }
        self.wait_connected("just mounted again")?;

        self.step("verify: every fsynced byte is in the backing directory");
        self.verify_fsynced()?;

        self.step("wait for the mirror again, with one more file written after the restart");
        std::fs::write(self.m("after/written-after-restart"), b"the mirror gets this too\n")?;
        self.wait_in_sync()?;
        self.compare()?;

        self.disaster(g, &url)?;

        self.step("clean up: stop the promoted target and the bunker");
        drop(g.target.take());
        println!("  target stopped");
        drop(g.bunker.take());
        println!("  bunker stopped");
        Ok(())
    }

    /// The bunker and a failover (issue 4): the primary with a sync bunker; the mirror target
    /// goes away while fsynced writes go on; the primary dies; `ferryfs failover` brings the
    /// target up to the last acknowledged write from the bunker and promotes it.
    fn disaster(&self, g: &mut Guards, url: &str) -> Result<()> {
        let bunker_dir = self.base.join("bunker");
        std::fs::create_dir(&bunker_dir)?;
        let burl = self.start_bunker(g, &bunker_dir)?;
        self.step(&format!(
            "remount the primary with a bunker in sync mode: --bunker {burl} (an fsync returns once the local journal \
             and the bunker hold it)"
        ));
        g.mount.as_mut().expect("the mount is running").stop()?;
        g.mount = None;
        self.mount_with(g, url, "mount-with-bunker.log", &["--bunker", &burl, "--bunker-mode", "sync"])?;
        let deadline = Instant::now() + IN_SYNC;
        while self.status_json()?.bunker.as_ref().is_none_or(|b| b.state != "in-sync") {
            self.check_interrupted()?;
            if Instant::now() > deadline {
                bail!("the bunker link did not come up within {IN_SYNC:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.show_status("with the bunker")?;

        self.step(&format!(
            "disaster: the mirror target goes away; {DISASTER_FILES} files are written with fsync (the bunker gets \
             them, the target does not); then the primary is killed with SIGKILL"
        ));
        drop(g.target.take());
        std::fs::create_dir(self.m("disaster"))?;
        let mut written = Vec::new();
        for i in 0..DISASTER_FILES {
            let data = pattern(9000 + i, 32 << 10);
            let mut f = std::fs::File::create(self.m(&format!("disaster/d-{i:02}")))?;
            f.write_all(&data)?;
            f.sync_all()?;
            written.push((format!("disaster/d-{i:02}"), data));
        }
        std::fs::File::open(self.m("disaster"))?.sync_all()?;
        g.mount.as_mut().expect("the mount is running").crash()?;
        g.mount = None;
        println!("  {DISASTER_FILES} files of 32 KiB fsynced, then the primary was killed");

        let port = self.start_target(g)?;
        let turl = format!("tcp://127.0.0.1:{port}");
        let missing = written.iter().filter(|(p, _)| !self.mirror.join(p).exists()).count();
        println!("  the target is back: {missing} of the {DISASTER_FILES} fsynced files are missing from the mirror");

        self.step(&format!("ferryfs failover --bunker {burl} --target {turl}"));
        let out = Command::new(&self.exe)
            .args(["failover", "--bunker", &burl, "--target", &turl])
            .output()
            .context("running ferryfs failover")?;
        for l in String::from_utf8_lossy(&out.stderr).lines().chain(String::from_utf8_lossy(&out.stdout).lines()) {
            println!("  {}", strip_ansi(l));
        }
        if !out.status.success() {
            bail!("ferryfs failover failed");
        }

        self.step("verify: every file fsynced before the disaster is in the promoted mirror, byte for byte");
        for (p, data) in &written {
            let got = std::fs::read(self.mirror.join(p)).with_context(|| format!("{p} is missing from the mirror"))?;
            if &got != data {
                bail!("{p} differs in the mirror");
            }
        }
        println!(
            "  all {DISASTER_FILES} present: zero data loss. The mirror is the primary of the new epoch; it could be \
             mounted with --backing mirror --journal target-state/log"
        );
        Ok(())
    }

    /// Starts `ferryfs bunker` as a child process on a free loopback port.
    fn start_bunker(&self, g: &mut Guards, dir: &Path) -> Result<String> {
        let port = free_port()?;
        self.step(&format!("bunker: ferryfs bunker --listen 127.0.0.1:{port} --dir bunker"));
        let log = std::fs::File::create(self.base.join("bunker.log"))?;
        let child = Command::new(&self.exe)
            .args(["bunker", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferryfs bunker")?;
        let guard = g.bunker.insert(ChildGuard(child));
        let deadline = Instant::now() + TARGET_UP;
        while !is_listening(port) {
            self.check_interrupted()?;
            if Instant::now() > deadline || guard.0.try_wait()?.is_some() {
                bail!(
                    "the bunker did not listen on 127.0.0.1:{port}; its log:\n{}",
                    std::fs::read_to_string(self.base.join("bunker.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(format!("tcp://127.0.0.1:{port}"))
    }

    /// Starts the mirror target on a free loopback port, in a thread of this process.
    fn start_target(&self, g: &mut Guards) -> Result<u16> {
        let mut last_error = None;
        for _attempt in 0..3 {
            let port = free_port()?;
            self.step(&format!(
                "mirror target in this process: listen 127.0.0.1:{port}, --dir mirror, --state target-state, \
                 log {} × {}",
                TARGET_GEOMETRY.segment_count,
                human_bytes(TARGET_GEOMETRY.segment_size)
            ));
            let target = Target::new(TargetConfig {
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                dir: self.mirror.clone(),
                state: self.target_state.clone(),
                key: None,
                geometry: TARGET_GEOMETRY,
            })?;
            let serving = target.clone();
            let thread = std::thread::Builder::new()
                .name("demo-target".into())
                .spawn(move || serving.serve())
                .context("starting the target thread")?;
            g.target = Some(TargetGuard { target, thread: Some(thread) });
            let deadline = Instant::now() + TARGET_UP;
            loop {
                self.check_interrupted()?;
                if is_listening(port) {
                    return Ok(port);
                }
                let guard = g.target.as_mut().expect("just set");
                if guard.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    let ended = guard.thread.take().expect("checked").join();
                    last_error = Some(match ended {
                        Ok(Ok(())) => anyhow::anyhow!("the target stopped at once"),
                        Ok(Err(e)) => e,
                        Err(_) => anyhow::anyhow!("the target thread panicked"),
                    });
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the target did not listen on 127.0.0.1:{port} within {TARGET_UP:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            g.target = None;
            // Someone took the port between our probe and the target's bind: another port.
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no target")).context("starting the mirror target"))
    }

    /// Starts `ferryfs mount` as a child with the target, and waits for the mount to appear.
    fn mount(&self, g: &mut Guards, url: &str, log_name: &str) -> Result<()> {
        self.mount_with(g, url, log_name, &[])
    }

    fn mount_with(&self, g: &mut Guards, url: &str, log_name: &str, extra: &[&str]) -> Result<()> {
        let log_path = self.base.join(log_name);
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&self.exe)
            .arg("mount")
            .arg(&self.mnt)
            .arg("--backing")
            .arg(&self.backing)
            .arg("--journal")
            .arg(&self.journal)
            .args(["--journal-size", "256M", "--commit-interval", "1s", "--target", url])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferryfs mount")?;
        let guard = g.mount.insert(MountGuard { child: Some(child), mnt: self.mnt.clone() });
        let deadline = Instant::now() + MOUNT_UP;
        while !is_mounted(&self.mnt) {
            self.check_interrupted()?;
            let exited = guard.child.as_mut().expect("just started").try_wait()?;
            if Instant::now() > deadline || exited.is_some() {
                bail!(
                    "the mount did not come up; its log ({}):\n{}",
                    log_path.display(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Prints `ferryfs status --journal J`, indented.
    fn show_status(&self, when: &str) -> Result<()> {
        let out = Command::new(&self.exe)
            .arg("status")
            .arg("--journal")
            .arg(&self.journal)
            .output()
            .context("running ferryfs status")?;
        if !out.status.success() {
            bail!("ferryfs status failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        println!("  $ ferryfs status --journal journal    ({when})");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {l}");
        }
        Ok(())
    }

    /// `ferryfs status --journal J --json`, parsed.
    fn status_json(&self) -> Result<StatusReport> {
        let out = Command::new(&self.exe)
            .arg("status")
            .arg("--journal")
            .arg(&self.journal)
            .arg("--json")
            .output()
            .context("running ferryfs status --json")?;
        if !out.status.success() {
            bail!("ferryfs status --json failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("reading the output of ferryfs status --json")
    }

    fn workload(&self) -> Result<()> {
        let t = Instant::now();
        std::fs::create_dir(self.m("mail"))?;
        for i in 0..self.files {
            self.check_interrupted()?;
            let tmp = self.m(&format!("mail/msg-{i:04}.tmp"));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&pattern(i, msg_len(i)))?;
            f.sync_all()?;
            if i.is_multiple_of(2) {
                std::fs::rename(&tmp, self.m(&msg_name(i)))?;
            }
            if (i + 1) % 100 == 0 || i + 1 == self.files {
                println!("  {} small files written and fsynced", i + 1);
            }
        }
        std::fs::File::open(self.m("mail"))?.sync_all()?;
        self.show_status("small files written")?;

        std::fs::create_dir(self.m("media"))?;
        let mut big = std::fs::File::create(self.m("media/video.bin"))?;
        let data = pattern(0xB16, BIG_FILE_BYTES);
        for chunk in data.chunks(CHUNK) {
            self.check_interrupted()?;
            big.write_all(chunk)?;
        }
        drop(big);
        std::fs::write(self.m("media/clip.bin"), pattern(0xC11, 3 << 20))?;
        OpenOptions::new().write(true).open(self.m("media/clip.bin"))?.set_len(1_500_001)?;
        std::fs::File::create(self.m("media/empty"))?;
        println!(
            "  media/video.bin ({}, no fsync: durable within --commit-interval), clip.bin truncated, empty",
            human_bytes(BIG_FILE_BYTES as u64)
        );
        self.show_status("24 MiB just written, not fsynced")?;

        std::fs::hard_link(self.m("mail/msg-0000"), self.m("first"))?;
        std::os::unix::fs::symlink("mail/msg-0002", self.m("latest"))?;
        let xattr = match set_xattr(&self.m("mail/msg-0000"), "user.demo.origin", b"ferryfs demo") {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                set_xattr(&self.m("mail/msg-0000"), "trusted.demo.origin", b"ferryfs demo")
                    .context("setting an xattr on mail/msg-0000")?;
                "trusted.demo.origin"
            }
            r => {
                r.context("setting an xattr on mail/msg-0000")?;
                "user.demo.origin"
            }
        };
        std::fs::set_permissions(self.m("mail/msg-0004"), std::fs::Permissions::from_mode(0o600))?;
        std::fs::set_permissions(self.m("media"), std::fs::Permissions::from_mode(0o750))?;
        let owner = if crate::os::is_root() {
            chown(&self.m("media/clip.bin"), 1000, 1000).context("chown media/clip.bin")?;
            ", chown 1000:1000 media/clip.bin"
        } else {
            ""
        };
        std::fs::create_dir_all(self.m("docs/drafts"))?;
        std::fs::write(self.m("docs/drafts/plan.txt"), b"1. mount\n2. mirror\n3. crash\n4. converge\n")?;
        std::fs::write(self.m("docs/drafts/scratch"), b"gone soon")?;
        std::fs::remove_file(self.m("docs/drafts/scratch"))?;
        std::fs::rename(self.m("docs/drafts"), self.m("docs/final"))?;
        std::fs::File::open(&self.mnt)?.sync_all()?;
        println!(
            "  first -> hard link of mail/msg-0000 ({xattr}), latest -> symlink to mail/msg-0002, \
             chmod 600 mail/msg-0004, chmod 750 media{owner}, docs/drafts renamed to docs/final"
        );
        // What the kernel still caches (writeback) goes to the journal now, not within 1 s.
        crate::os::syncfs_path(&self.mnt);
        println!("  workload done in {:.2?}; syncfs of the mount", t.elapsed());
        Ok(())
    }

    /// Shows the status once the mount's shipper has reached the target (or after a second).
    fn wait_connected(&self, when: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            self.check_interrupted()?;
            if self.status_json()?.targets.first().is_some_and(|t| t.state != "disconnected") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.show_status(when)
    }

    /// Waits until the target is in-sync with nothing unacked, showing the status now and then.
    fn wait_in_sync(&self) -> Result<()> {
        crate::os::syncfs_path(&self.mnt);
        let t = Instant::now();
        let deadline = t + IN_SYNC;
        let mut shown: Option<(Instant, String, u64)> = None;
        loop {
            self.check_interrupted()?;
            let r = self.status_json()?;
            let Some(target) = r.targets.first() else { bail!("the mount reports no target") };
            if target.state == "in-sync" && target.lag_records == 0 {
                self.show_status(&format!("in sync after {:.1} s", t.elapsed().as_secs_f64()))?;
                println!(
                    "  state {}, lag_records {}, acked_lsn {}, bytes_sent {} (resync {}), reconnects {}",
                    target.state,
                    target.lag_records,
                    target.acked_lsn,
                    target.bytes_sent,
                    target.bytes_resync,
                    target.reconnects
                );
                return Ok(());
            }
            let changed = shown.as_ref().is_none_or(|(at, state, lag)| {
                at.elapsed() >= SHOW_EVERY && (state != &target.state || *lag != target.lag_records)
            });
            if changed {
                self.show_status(&format!("waiting, {:.1} s", t.elapsed().as_secs_f64()))?;
                shown = Some((Instant::now(), target.state.clone(), target.lag_records));
            }
            if Instant::now() > deadline {
                bail!(
                    "the target was not in sync after {IN_SYNC:?}; the last status:\n{}",
                    serde_json::to_string_pretty(&r).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Compares the mirror with the backing directory. Acked records are applied to the mirror
    /// by the target's apply thread right after, so a difference is looked at again for a while.
    fn compare(&self) -> Result<()> {
        let deadline = Instant::now() + APPLIED;
        loop {
            self.check_interrupted()?;
            let (want, got) = (scan(&self.backing)?, scan(&self.mirror)?);
            let diffs = tree_diff(&want, &got);
            if diffs.is_empty() {
                let c = want.counts();
                println!(
                    "  mirror identical: {} files, {} bytes ({}; {} directories, {} symlink(s), {} hard-link group(s); \
                     contents, modes, owners, xattrs and mtimes equal)",
                    c.files,
                    c.bytes,
                    human_bytes(c.bytes),
                    c.dirs,
                    c.symlinks,
                    want.groups.len()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                println!("  the mirror differs from the backing directory (first {DIFFS_SHOWN}):");
                for d in diffs.iter().take(DIFFS_SHOWN) {
                    println!("    {d}");
                }
                bail!("the mirror is not identical to the backing directory: {} difference(s)", diffs.len());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes that the crash must not lose: fsynced new files and an fsynced overwrite.
    fn crash_writes(&self) -> Result<()> {
        std::fs::create_dir(self.m("after"))?;
        for i in 0..AFTER_FILES {
            let mut f = std::fs::File::create(self.m(&format!("after/f-{i:02}")))?;
            f.write_all(&pattern(5000 + i, 64 << 10))?;
            f.sync_all()?;
        }
        std::fs::File::open(self.m("after"))?.sync_all()?;
        let f = OpenOptions::new().write(true).open(self.m("media/video.bin"))?;
        f.write_all_at(&pattern(OVERWRITE_SEED, OVERWRITE_BYTES), OVERWRITE_AT)?;
        f.sync_all()?;
        println!("  {AFTER_FILES} files of 64 KiB in after/ and a 1 MiB overwrite inside media/video.bin, all fsynced");
        Ok(())
    }

    fn verify_fsynced(&self) -> Result<()> {
        let b = |rel: &str| self.backing.join(rel);
        let same = |rel: &str, want: &[u8]| -> Result<()> {
            let got = std::fs::read(b(rel)).with_context(|| format!("{rel} is missing after replay"))?;
            if got != want {
                bail!("{rel} differs after replay ({} bytes, {} expected)", got.len(), want.len());
            }
            Ok(())
        };
        let mut files = 0;
        for i in 0..self.files {
            same(&msg_name(i), &pattern(i, msg_len(i)))?;
            files += 1;
        }
        for i in 0..AFTER_FILES {
            same(&format!("after/f-{i:02}"), &pattern(5000 + i, 64 << 10))?;
            files += 1;
        }
        let mut got = vec![0u8; OVERWRITE_BYTES];
        std::fs::File::open(b("media/video.bin"))?
            .read_exact_at(&mut got, OVERWRITE_AT)
            .context("reading the overwrite in media/video.bin")?;
        if got != pattern(OVERWRITE_SEED, OVERWRITE_BYTES) {
            bail!("the fsynced overwrite in media/video.bin is not there after replay");
        }
        let (first, msg0) = (std::fs::metadata(b("first"))?, std::fs::metadata(b("mail/msg-0000"))?);
        if (first.dev(), first.ino()) != (msg0.dev(), msg0.ino()) {
            bail!("first is no longer a hard link of mail/msg-0000 after replay");
        }
        if std::fs::read_link(b("latest"))? != Path::new("mail/msg-0002") {
            bail!("the symlink latest is wrong after replay");
        }
        println!(
            "  {files} fsynced files byte for byte, the overwrite in media/video.bin, the hard link and the symlink"
        );
        Ok(())
    }
}

// -------------------------------------------------------------------------------------------
// Comparing two trees.

/// What the comparison looks at for one name.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    /// 0 for directories (their link count depends on the file system's bookkeeping).
    nlink: u64,
    size: u64,
    /// SHA-256 of a file's contents or a symlink's target.
    digest: [u8; 32],
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    mtime: (i64, i64),
}

struct Scan {
    entries: BTreeMap<String, Entry>,
    /// Names of the same inode, for every inode with more than one.
    groups: Vec<Vec<String>>,
}

struct Counts {
    files: u64,
    bytes: u64,
    dirs: u64,
    symlinks: u64,
}

impl Scan {
    fn counts(&self) -> Counts {
        let mut c = Counts { files: 0, bytes: 0, dirs: 0, symlinks: 0 };
        for e in self.entries.values() {
            match e.kind {
                libc::S_IFREG => {
                    c.files += 1;
                    c.bytes += e.size;
                }
                libc::S_IFDIR => c.dirs += 1,
                libc::S_IFLNK => c.symlinks += 1,
                _ => {}
            }
        }
        c
    }
}

/// The ways `b` differs from `a`: names, types, contents, modes, owners, symlink targets, hard
/// links, xattrs (but ferryfs's own) and mtimes. Empty when equal.
fn tree_diff(a: &Scan, b: &Scan) -> Vec<String> {
    let mut out = Vec::new();
    for k in a.entries.keys().chain(b.entries.keys().filter(|k| !a.entries.contains_key(*k))) {
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), Some(y)) if x != y => out.push(format!("{k}: {}", describe_diff(x, y))),
            (Some(_), None) => out.push(format!("{k}: missing in the mirror")),
            (None, Some(_)) => out.push(format!("{k}: in the mirror only")),
            _ => {}
        }
    }
    if a.groups != b.groups {
        out.push(format!("hard links differ: {:?} here, {:?} in the mirror", a.groups, b.groups));
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
        d.push(format!("links {} vs {}", x.nlink, y.nlink));
    }
    if (x.size, x.digest) != (y.size, y.digest) {
        d.push(format!("content ({} vs {} bytes)", x.size, y.size));
    }
    if x.xattrs != y.xattrs {
        let names = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
            m.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>()
        };
        d.push(format!("xattrs {:?} vs {:?}", names(&x.xattrs), names(&y.xattrs)));
    }
    if x.mtime != y.mtime {
        d.push(format!("mtime {}.{:09} vs {}.{:09}", x.mtime.0, x.mtime.1, y.mtime.0, y.mtime.1));
    }
    format!("{} (backing vs mirror)", d.join(", "))
}

fn scan(root: &Path) -> Result<Scan> {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    entries.insert(".".to_string(), entry(root)?);
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                stack.push(p.clone());
            } else if m.nlink() > 1 {
                by_ino.entry(m.ino()).or_default().push(rel.clone());
            }
            entries.insert(rel, entry(&p)?);
        }
    }
    let mut groups: Vec<Vec<String>> = by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    Ok(Scan { entries, groups })
}

fn entry(p: &Path) -> Result<Entry> {
    let m = std::fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
    let mut h = Sha256::new();
    if m.is_file() {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    } else if m.file_type().is_symlink() {
        h.update(std::fs::read_link(p)?.as_os_str().as_bytes());
    }
    Ok(Entry {
        kind: m.mode() & libc::S_IFMT,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        nlink: if m.is_dir() { 0 } else { m.nlink() },
        size: if m.is_dir() { 0 } else { m.size() },
        digest: h.finalize().into(),
        xattrs: xattrs(p)?,
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// Every extended attribute of `p` (not following a symlink) but ferryfs's own.
fn xattrs(p: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = crate::os::list_xattrs_at_path(p).with_context(|| format!("listing the xattrs of {}", p.display()))?;
    let private = crate::io::PRIVATE_XATTR_PREFIX;
    for name in names.into_iter().filter(|n| !n.starts_with(private)) {
        let v = crate::os::get_xattr_at_path(p, &name)
            .with_context(|| format!("reading xattr {} of {}", String::from_utf8_lossy(&name), p.display()))?;
        out.insert(name, v);
    }
    Ok(out)
}
