//! `ferryfs catchup`: after the primary's loss, levels the mirror targets of one replication
//! set at the most advanced one's end, from its own log (claims 002:5–6).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::common;
use super::failover::{TcpTarget, hex, move_records, tcp_addr};
use super::replication::read_key;
use crate::proto::wire::Key;
use crate::replica::catchup::{Action, BlocksWhy, Peer, plan};
use crate::replica::failover::IncompleteScan;
use crate::types::Lsn;

/// How long to wait for the targets to notice a dead primary's silence.
const NOTICE_WAIT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
#[command(
    about = "After the primary's loss: bring every mirror target to the most advanced one's end",
    long_about = "Run by an operator once the primary is lost, before promoting a target (or by \
`ferryfs failover` with several --target). The targets of a replication set stand at different points: \
each keeps the records it received from the all-acked watermark on (the last LSN every target held), so \
the most advanced one's log holds every record the others lack (claims 002:5-6). In order:\n\n\
1. Asks every target where its log stands (replication set, epoch, oldest and next LSN). Refuses, changing \
nothing, when they belong to different replication sets, stand at different epochs (a failover moved one \
on: fail it back instead), one was promoted, or one still hears a live primary (--force overrides).\n\
2. Picks the most advanced target (the highest next LSN; the first given among equals).\n\
3. Streams to every other target the records it lacks, straight from the advanced target's log, in blocks \
of about 8 MiB; each target lands a block in its staging file, checks every record (crc, set, LSN order), \
appends it to its log and makes it durable before it acknowledges it.\n\
4. Has every target apply its whole log up to the common end (transactions without an outcome by the \
failover rule, as `ferryfs failover` does), so all show the same tree: the primary's journal applied up to \
that LSN.\n\n\
A target behind the start of the advanced target's log (its records were freed: it was away longer than \
--target-timeout, or a log filled) cannot be caught up from records; the output says so and it is left as it \
is (resynchronize it from the new primary after the failover). Progress is shown; --dry-run says what would \
be moved. Running it again is harmless: level targets get nothing.\n\n\
Exit status: 0 when every target ends at the same LSN, 1 on any refusal or error, 2 when some target \
needs a block-level resync (the others were leveled).",
    after_help = "EXAMPLE:\n  ferryfs catchup --target tcp://10.1.0.9:7070 --target tcp://10.2.0.4:7070 \
--target tcp://10.3.0.7:7070 --key /etc/ferryfs/key"
)]
pub struct CatchupArgs {
    /// A mirror target of the set: `tcp://HOST:PORT` (a `ferryfs target`). Give every target.
    #[arg(long = "target", value_name = "URL", required = true)]
    pub targets: Vec<String>,
    /// Say what would be moved; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Catch up even though a target still hears a primary.
    #[arg(long)]
    pub force: bool,
    /// Shared secret file, the same as the targets' --key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// What a catch-up did, for its caller (`ferryfs failover` with several targets).
pub struct Leveled {
    pub end: u64,
    /// Targets left behind (they need blocks), by URL.
    pub behind: Vec<String>,
}

pub fn run(a: CatchupArgs) -> Result<()> {
    let leveled = catch_up(&a.targets, a.key.as_deref(), a.dry_run, a.force)?;
    if !leveled.behind.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}

/// Catches `urls` up (see the command's help); shared with `ferryfs failover`.
pub fn catch_up(urls: &[String], key: Option<&std::path::Path>, dry_run: bool, force: bool) -> Result<Leveled> {
    let key = key.map(read_key).transpose()?;
    let mut addrs = Vec::new();
    for url in urls {
        addrs.push(tcp_addr("--target", url)?);
    }
    for (i, a) in addrs.iter().enumerate() {
        if addrs[..i].contains(a) {
            bail!("--target {} is given twice", urls[i]);
        }
    }
    let connect_all = || connect_all(&addrs, urls, &key);
    // A primary killed a moment ago is still "connected" until the targets notice the silence
    // (a few seconds): ask again for a while before refusing.
    let patience = Instant::now() + NOTICE_WAIT;
    let mut targets = connect_all()?;
    while !force && targets.iter().any(|t| t.view.primary_connected) && Instant::now() < patience {
        eprintln!("waiting for the targets to notice that the primary is gone ...");
        std::thread::sleep(Duration::from_secs(1));
        targets = connect_all()?;
    }
    let peers: Vec<Peer> = targets.iter().map(|t| Peer { set_id: t.set_id, view: t.view }).collect();
    for (p, url) in peers.iter().zip(urls) {
        eprintln!(
            "target {url}: set {}, epoch {}, log holds records {}..{}{}",
            &hex(&p.set_id)[..8],
            p.view.epoch,
            p.view.start_lsn,
            p.view.next_lsn,
            if p.view.primary_connected { ", a primary is CONNECTED" } else { "" }
        );
    }
    let plan = plan(&peers, urls, force).map_err(anyhow::Error::msg)?;
    let (adv, end) = (plan.advanced, plan.end);
    eprintln!("most advanced: {} (every record below LSN {end})", urls[adv]);
    let mut behind = Vec::new();
    let mut moved = (0u64, 0u64);
    let started = Instant::now();
    for (i, action) in plan.actions.iter().enumerate() {
        let url = &urls[i];
        match *action {
            Action::Level => println!("{url}: level (holds every record below LSN {end})"),
            Action::Blocks { from, why } => {
                let reason = match why {
                    BlocksWhy::LogStartsAt(s) => format!(
                        "it lacks records from LSN {from} on and {}'s log starts at {s} (they were freed)",
                        urls[adv]
                    ),
                    BlocksWhy::MixedUntil(m) => {
                        format!("a resync left its directory mixed until LSN {m}, past the end {end}")
                    }
                };
                println!("{url}: NEEDS A BLOCK-LEVEL RESYNC: {reason}; left as it is");
                behind.push(url.clone());
            }
            Action::Records { from } if dry_run => {
                let mut scan = IncompleteScan::default();
                targets[adv].read_log(Lsn(from), &mut |block| {
                    scan.feed(block);
                    Ok(())
                })?;
                println!(
                    "{url}: would receive {} records ({}) of LSN {from}..{end} from {}",
                    scan.records,
                    common::human_bytes(scan.bytes),
                    urls[adv]
                );
            }
            Action::Records { from } => {
                let (n, bytes) = relay(&mut targets, adv, i, from, end)?;
                println!(
                    "{url}: received {n} records ({}, {bytes} bytes) of LSN {from}..{end}",
                    common::human_bytes(bytes)
                );
                moved = (moved.0 + n, moved.1 + bytes);
            }
        }
    }
    if dry_run {
        println!("dry run: nothing was changed");
        return Ok(Leveled { end, behind });
    }
    for (i, t) in targets.iter_mut().enumerate() {
        if behind.contains(&urls[i]) {
            continue;
        }
        let v = t.apply_log(end).map_err(|e| anyhow::anyhow!("{}: applying its log: {e:#}", urls[i]))?;
        if v.applied_next != end {
            bail!("{} says it applied below {}, not below {end}", urls[i], v.applied_next);
        }
    }
    println!(
        "caught up: {} of {} targets hold and show every record below LSN {end}; {} records ({}) moved in {:.1}s",
        urls.len() - behind.len(),
        urls.len(),
        moved.0,
        common::human_bytes(moved.1),
        started.elapsed().as_secs_f64()
    );
    Ok(Leveled { end, behind })
}

/// Connects to every target, as a failover tool; an error names the target.
pub(super) fn connect_all(addrs: &[SocketAddr], urls: &[String], key: &Option<Key>) -> Result<Vec<TcpTarget>> {
    addrs
        .iter()
        .zip(urls)
        .map(|(addr, url)| TcpTarget::connect(*addr, key.clone()).map_err(|e| anyhow::anyhow!("--target {url}: {e:#}")))
        .collect()
}

/// Streams records `[from, end)` from target `src`'s log to target `dst`; returns how many
/// records and bytes.
fn relay(targets: &mut [TcpTarget], src: usize, dst: usize, from: u64, end: u64) -> Result<(u64, u64)> {
    let (a, b) = if src < dst { targets.split_at_mut(dst) } else { targets.split_at_mut(src) };
    let (source, sink) = if src < dst { (&mut a[src], &mut b[0]) } else { (&mut b[0], &mut a[dst]) };
    let scan = move_records(&mut |at, out| source.read_log(at, out), sink, from, end)?;
    Ok((scan.records, scan.bytes))
}
