//! `ferryfs status`: asks the running mount of a journal how its journal and targets are doing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::status;
use crate::status::bunker_node::{self, AnyReport};

/// Longer than the mount gives any one client, so a status request queued behind a stuck client
/// still gets its answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds for --watch: faster only loads the mount; slower is better served by cron.
const WATCH_SECONDS_MIN: f64 = 0.1;
const WATCH_SECONDS_MAX: f64 = 86_400.0;
/// How often a --watch sleep checks for Ctrl-C.
const WATCH_POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
#[command(
    about = "Show the running mount's journal usage and the replication state of each target (or a bunker's state)",
    long_about = "Asks the ferryfs mount running on a journal directory how it is doing, through the Unix \
socket ferryfs.sock that the mount keeps in that directory (mode 0600: run as the mount's user). Prints a \
line about the journal, then one row per replication target. Read-only, and cheap enough to run every \
second.\n\n\
The journal line: the journal directory; bytes used (from the last checkpoint to the end of the log, space \
not yet reusable) of its size; the LSNs it holds; the highest LSN on stable storage (durable); and the LSN \
of the last checkpoint.\n\n\
A bunker (`ferryfs bunker`) answers on its --dir the same way: pass that as --journal. Its report has \
\"role\": \"bunker\" and shows, line by line: mode (replication set, epoch, whether a failover fenced it), \
log (usage and the LSNs it holds, durable), primary (connected, with when it was last heard; lost, with \
since when, the last record it sent and why; or none yet), lag (records kept past the primary's watermark \
for targets that may lack them) and what it received since it started. --json prints it whole.",
    after_help = "COLUMNS:\n  \
URL         the target's address, as given to the mount\n  \
STATE       connected     link up, live records shipped, some not acked yet\n              \
disconnected  no link; changes accumulate as dirty blocks\n              \
initial-sync  first full copy of the backing directory\n              \
resyncing     copying dirty blocks after a reconnect\n              \
in-sync       link up, every record acked\n  \
LAG(REC)    records written here that the target has not acked\n  \
LAG(BYTES)  the size of those records\n  \
LAG(S)      age in seconds of the oldest update the target has not acked\n  \
DIRTY       blocks changed here and not yet copied to the target\n  \
SENT        bytes sent to the target since the mount started\n  \
ERROR       the last failure talking to the target, cut short (--json has it whole)\n\n\
--json prints the whole report, exact byte counts and all, and adds acked_lsn, bytes_resync and reconnects \
per target (format version 1, in the `version` field).\n\n\
EXIT STATUS:\n  \
0  the mount answered (with --watch: the first time; later failures are printed and watching goes on\n     \
   until interrupted by Ctrl-C or SIGTERM)\n  \
1  an error: no mount is running on the journal, a stale socket, a socket of another user, no answer within 5 s, or a reply this \
ferryfs cannot read\n  \
2  bad command-line arguments\n\n\
EXAMPLES:\n  \
ferryfs status --journal /var/lib/ferryfs/journal\n  \
ferryfs status --journal /var/lib/ferryfs/journal --json | jq '.targets[].lag_seconds'\n  \
ferryfs status --journal /var/lib/ferryfs/journal --watch 2\n  \
ferryfs status --journal /var/lib/ferryfs/bunker        (a bunker's --dir)"
)]
pub struct StatusArgs {
    /// The journal directory of the running mount (the mount's --journal), or a bunker's --dir.
    #[arg(long, value_name = "DIR")]
    pub journal: PathBuf,
    /// Print the full report as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Ask again every SECONDS (0.1 to 86400) until interrupted; on a terminal, the table replaces
    /// the previous one.
    #[arg(long, value_name = "SECONDS", value_parser = parse_watch_seconds)]
    pub watch: Option<f64>,
}

fn parse_watch_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(WATCH_SECONDS_MIN..=WATCH_SECONDS_MAX).contains(&seconds) {
        return Err(format!("{s} s is out of range: use {WATCH_SECONDS_MIN} to {WATCH_SECONDS_MAX}"));
    }
    Ok(seconds)
}

pub fn run(a: StatusArgs) -> Result<()> {
    let Some(seconds) = a.watch else {
        return show(&a, false);
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;
    let every = Duration::from_secs_f64(seconds);
    let redraw = !a.json && std::io::stdout().is_terminal();
    let mut next = Instant::now() + every;
    show(&a, redraw)?; // a wrong --journal fails at once rather than print errors forever
    loop {
        sleep_until(next, &interrupted);
        if interrupted.load(Ordering::Relaxed) {
            return Ok(());
        }
        next = Instant::now() + every;
        if let Err(e) = show(&a, redraw) {
            // The mount may be restarting; keep watching, as watch(1) would.
            eprintln!("ferryfs: {e:#}");
        }
    }
}

fn show(a: &StatusArgs, redraw: bool) -> Result<()> {
    let (json, table) = match bunker_node::query_any(&a.journal, QUERY_TIMEOUT)? {
        AnyReport::Mount(report) => (serde_json::to_string_pretty(&report)?, status::render_table(&report)),
        AnyReport::Bunker(report) => {
            let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            (serde_json::to_string_pretty(&report)?, bunker_node::render_bunker(&report, now_unix))
        }
    };
    if a.json {
        println!("{json}");
    } else if redraw {
        // Home and clear, as watch(1) does, so the table stays in place.
        print!("\x1b[H\x1b[2J{table}");
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Sleeps in short steps so Ctrl-C ends --watch promptly, with exit status 0.
fn sleep_until(deadline: Instant, interrupted: &AtomicBool) {
    while !interrupted.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(WATCH_POLL));
    }
}
