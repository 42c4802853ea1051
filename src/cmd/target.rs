//! `ferryfs target`: a mirror target, in the foreground.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::common::{self, parse_size};
use super::replication::read_key;
use crate::journal::JournalGeometry;
use crate::net::target::{Target, TargetConfig};

#[derive(clap::Args, Debug)]
#[command(
    about = "Serve as a mirror target: receive a primary's journal, keep it, apply it to a directory",
    long_about = "Listens for one primary (`ferryfs mount --target tcp://HOST:PORT`). Every update is appended \
to this target's own log under --state and made durable before it is acknowledged (an ack means durable \
here), then applied in journal order to --dir. After a restart the target resumes exactly where it stopped; \
applying is idempotent.\n\n\
A primary that finds this target behind what its journal still holds, or new, resynchronizes it from its \
sync map (or in full): the resync is staged under --state and applied only once it is complete.\n\n\
Safety: nothing outside --dir is ever created, changed or removed. Records name objects by id and single \
name components, applied with *at calls relative to directory fds, never following symlinks. Names that \
are empty, `.`, `..`, or contain `/` are refused. Only one primary at a time is served; a second is \
refused while the first is alive. A primary of another replication set is refused.\n\n\
Authentication: with --key FILE both sides prove knowledge of the shared key (HMAC-SHA256 \
challenge-response) before any record moves. --key is required to listen on a non-loopback address. \
The traffic itself is not encrypted (docs/PROTOCOL.md, Security).\n\n\
Stops on SIGINT or SIGTERM after a final checkpoint.",
    after_help = "EXAMPLE:\n  ferryfs target --listen 127.0.0.1:7070 --dir /srv/mirror --state /var/lib/ferryfs/mirror\n  \
ferryfs mount /mnt/data --backing /srv/data --journal /var/lib/ferryfs/j --target tcp://127.0.0.1:7070"
)]
pub struct TargetArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// The mirror directory the updates are applied to (must exist).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// This target's own state: its log, id table and resync staging (must exist; outside --dir).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Shared secret file, the same as the primary's --key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Size of this target's log when it is created. Keep it at least the primary's
    /// --journal-size: a backlog the primary ships after an outage can be that large, and the
    /// target applies a record only once it holds the records that settle it.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    pub log_size: u64,
}

pub fn run(a: TargetArgs) -> Result<()> {
    let dir = common::existing_dir("--dir", &a.dir)?;
    let state = common::existing_dir("--state", &a.state)?;
    if state.starts_with(&dir) || dir.starts_with(&state) {
        bail!(
            "--state {} and --dir {} overlap; keep the target's state outside its directory",
            state.display(),
            dir.display()
        );
    }
    let listen = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}: not a HOST:PORT", a.listen))?
        .next()
        .with_context(|| format!("--listen {}: no address", a.listen))?;
    let key = a.key.as_deref().map(read_key).transpose()?;
    if key.is_none() && !listen.ip().is_loopback() {
        bail!(
            "--listen {listen} is not a loopback address: a --key FILE is required there (make one with \
             `head -c 32 /dev/urandom | base64 > FILE` and give the primary the same file)"
        );
    }
    let segment_size = 16u64 << 20;
    let count = (a.log_size / segment_size).max(4) as u32;
    let _lock = common::lock_journal(&state)?;
    // The log too: after a failover promotes this target, `ferryfs mount --journal STATE/log`
    // must find it in use (two writers of one superblock) until this process stops.
    let log_dir = state.join("log");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let _log_lock = common::lock_journal(&log_dir)?;
    let target = Target::new(TargetConfig {
        listen,
        dir,
        state,
        key,
        geometry: JournalGeometry { segment_size, segment_count: count },
    })?;
    let t = target.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        t.stop();
    });
    target.serve()?;
    eprintln!("ferryfs target: stopped");
    Ok(())
}
