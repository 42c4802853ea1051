//! `ferryfs demo`: a journaled mount on temp dirs, a workload, a crash, a replay, a check.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(clap::Args, Debug)]
#[command(
    about = "Show ferryfs at work on temp dirs: mount, write, crash (kill -9), replay, verify",
    long_about = "Runs a self-contained demonstration in a temporary directory and removes it afterwards: \
mounts a journaled ferryfs over an empty backing directory, writes a sample workload (files, \
fsyncs, renames, links), kills the mount with SIGKILL as a crash would, runs `ferryfs replay`, \
and verifies that every fsynced byte is in the backing directory. Needs root (or FUSE access) \
and /dev/fuse. Replication targets join the demo when they exist (issue 3)."
)]
pub struct DemoArgs {
    /// Files the workload writes.
    #[arg(long, default_value_t = 200)]
    pub files: usize,
    /// Keep the temporary directory afterwards (for a look around).
    #[arg(long)]
    pub keep: bool,
}

/// Kills and detaches the demo mount even when the demo fails half way.
struct MountGuard {
    child: Option<Child>,
    mnt: PathBuf,
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

fn detach(mnt: &Path) {
    if let Ok(c) = CString::new(mnt.as_os_str().as_bytes()) {
        crate::os::detach_mount(&c);
    }
}

fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn content(i: usize) -> Vec<u8> {
    (0..16 * 1024).map(|k| ((i * 7919 + k * 31) % 251) as u8).collect()
}

pub fn run(a: DemoArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("ferryfs-demo-").tempdir()?;
    let base = tmp.path().to_path_buf();
    let (mnt, backing, journal) = (base.join("mnt"), base.join("backing"), base.join("journal"));
    for d in [&mnt, &backing, &journal] {
        std::fs::create_dir(d)?;
    }
    let exe = std::env::current_exe()?;
    step(&format!(
        "mount: ferryfs mount {} --backing {} --journal {}",
        mnt.display(),
        backing.display(),
        journal.display()
    ));
    let log = std::fs::File::create(base.join("mount.log"))?;
    let child = Command::new(&exe)
        .arg("mount")
        .arg(&mnt)
        .arg("--backing")
        .arg(&backing)
        .arg("--journal")
        .arg(&journal)
        .args(["--journal-size", "256M", "--commit-interval", "1s"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting ferryfs mount")?;
    let mut guard = MountGuard { child: Some(child), mnt: mnt.clone() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&mnt) {
        if Instant::now() > deadline || guard.child.as_mut().unwrap().try_wait()?.is_some() {
            bail!(
                "the mount did not come up; its log:\n{}",
                std::fs::read_to_string(base.join("mount.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("mounted");

    step(&format!("write {} files of 16 KiB with fsync, rename half of them, add links", a.files));
    let started = Instant::now();
    std::fs::create_dir(mnt.join("mail"))?;
    for i in 0..a.files {
        let mut f = std::fs::File::create(mnt.join("mail").join(format!("msg-{i:04}.tmp")))?;
        f.write_all(&content(i))?;
        f.sync_all()?;
        if i % 2 == 0 {
            std::fs::rename(
                mnt.join("mail").join(format!("msg-{i:04}.tmp")),
                mnt.join("mail").join(format!("msg-{i:04}")),
            )?;
        }
        if (i + 1) % 50 == 0 {
            println!("  {} files written", i + 1);
        }
    }
    std::fs::hard_link(mnt.join("mail/msg-0000"), mnt.join("first"))?;
    std::os::unix::fs::symlink("mail/msg-0002", mnt.join("latest"))?;
    std::fs::File::open(&mnt)?.sync_all()?;
    println!("  done in {:.2?}", started.elapsed());

    let out = Command::new(&exe).arg("inspect").arg("--journal").arg(&journal).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let records = text.lines().filter(|l| l.starts_with("record ")).count();
    step(&format!("the journal holds {records} records past its last checkpoint (`ferryfs inspect`); the last lines:"));
    for l in text
        .lines()
        .filter(|l| l.starts_with("record ") || l.starts_with("end "))
        .collect::<Vec<_>>()
        .iter()
        .rev()
        .take(4)
        .rev()
    {
        println!("  {l}");
    }

    step("crash: kill -9 the mount (no clean shutdown, the journal stays open)");
    if let Some(mut c) = guard.child.take() {
        c.kill()?;
        c.wait()?;
    }
    detach(&mnt);
    println!("killed; mount detached");

    step(&format!("replay: ferryfs replay --journal {} --backing {}", journal.display(), backing.display()));
    let out =
        Command::new(&exe).arg("replay").arg("--journal").arg(&journal).arg("--backing").arg(&backing).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("replay failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    step("verify: every fsynced file is in the backing directory, byte for byte");
    let mut checked = 0;
    for i in 0..a.files {
        let name = if i % 2 == 0 { format!("msg-{i:04}") } else { format!("msg-{i:04}.tmp") };
        let got = std::fs::read(backing.join("mail").join(&name)).with_context(|| format!("mail/{name} is missing"))?;
        if got != content(i) {
            bail!("mail/{name} differs after replay");
        }
        checked += 1;
    }
    if std::fs::read(backing.join("first"))? != content(0)
        || std::fs::read_link(backing.join("latest"))? != Path::new("mail/msg-0002")
    {
        bail!("the hard link or the symlink is wrong after replay");
    }
    println!("{checked} files, 1 hard link and 1 symlink verified");
    drop(guard);
    if a.keep {
        let kept = tmp.keep();
        println!("\nkept {}", kept.display());
    } else {
        println!("\ncleaned up {}", base.display());
    }
    println!("demo passed");
    Ok(())
}
