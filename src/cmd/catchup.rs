//! `ferryfs catchup`: after the primary's loss, levels the mirror targets of one replication
//! set at the most advanced one's end, from its own log (claims 002:5–6).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::common;
use super::failover::{SILENCE_MAX, TcpTarget, hex, move_records, recv, tcp_addr};
use super::replication::read_key;
use crate::proto::wire::control::ControlMsg;
use crate::proto::wire::{Frame, Key, MINOR_BLOCKS};
use crate::replica::blocks::{DIGEST_BLOCK, PeerDigests};
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
appends it to its log and makes it durable before it acknowledges it. The records are read once ahead \
first, and the target told which transactions among them abort, so it applies them as they land.\n\
4. Has every target apply its whole log up to the common end (transactions without an outcome by the \
failover rule, as `ferryfs failover` does), so all show the same tree: the primary's journal applied up to \
that LSN.\n\
5. A target behind the start of the advanced target's log (its records were freed: it was away longer \
than --target-timeout, or a log filled), or left mixed by a resync past the end, cannot be caught up from \
records: it gets a block-level resync from the advanced target instead. It sends the digest of every 64 KiB \
block of its directory; the advanced target compares them with its own blocks and sends only the blocks \
that differ, with every directory's entries and every object's attributes; the target stages all of it and \
applies it only once complete (a crash meanwhile finishes it at the next start), then its log continues at \
the common end.\n\n\
Progress is shown; --dry-run says what would be moved. Running it again is harmless: level targets get \
nothing.\n\n\
Exit status: 0 when every target ends at the same LSN, 1 on any refusal or error, 2 when a block-level \
resync could not be done (named in the output; the others were leveled): resynchronize that target from \
the new primary.",
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
    // Targets that get a block-level resync (`Action::Blocks`), by index.
    let mut wanted = Vec::new();
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
                if dry_run {
                    println!(
                        "{url}: would get a block-level resync from {} (only the blocks whose digests differ): {reason}",
                        urls[adv]
                    );
                } else {
                    println!("{url}: needs a block-level resync: {reason}; it follows once the others are leveled");
                }
                wanted.push(i);
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
                let t0 = Instant::now();
                let (n, bytes) = relay(&mut targets, adv, i, from, end)?;
                println!(
                    "{url}: received {n} records ({}, {bytes} bytes) of LSN {from}..{end} in {:.2}s",
                    common::human_bytes(bytes),
                    t0.elapsed().as_secs_f64()
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
        if wanted.contains(&i) {
            continue;
        }
        apply_log(t, end, &urls[i])?;
    }
    // The source's directory is now the journal applied below `end`: the targets behind its
    // log get the blocks in which they differ from it.
    for &i in &wanted {
        let done = if plan.actions[adv] != Action::Level {
            Err(anyhow::anyhow!(
                "{} itself is left mixed past its end, so no target shows a state to copy blocks from",
                urls[adv]
            ))
        } else {
            block_resync(&mut targets, adv, i, end, urls).and_then(|()| apply_log(&mut targets[i], end, &urls[i]))
        };
        if let Err(e) = done {
            println!("{}: NEEDS A RESYNC: the block-level resync failed: {e:#}; left as it is", urls[i]);
            behind.push(urls[i].clone());
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

/// Has target `t` apply its log below `end` and checks that it did.
fn apply_log(t: &mut TcpTarget, end: u64, url: &str) -> Result<()> {
    let t0 = Instant::now();
    let v = t.apply_log(end).map_err(|e| anyhow::anyhow!("{url}: applying its log: {e:#}"))?;
    if v.applied_next != end {
        bail!("{url} says it applied below {}, not below {end}", v.applied_next);
    }
    eprintln!("{url}: applied its log below LSN {end} in {:.2}s", t0.elapsed().as_secs_f64());
    Ok(())
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

// ----- block-level resync (`replica::blocks`) ------------------------------------------------

impl TcpTarget {
    /// Every block digest of this target's directory (`FileDigests`…, `DigestEnd`), checked.
    fn digests(&mut self) -> Result<Vec<ControlMsg>> {
        self.writer.send(&Frame::Control(ControlMsg::DigestRequest))?;
        let mut check = PeerDigests::default();
        let mut msgs = Vec::new();
        while !check.complete() {
            match recv(&mut self.reader, "the target behind")? {
                Frame::Control(m) => {
                    check.take(m.clone()).map_err(|e| anyhow::anyhow!("the target behind sent bad digests: {e}"))?;
                    msgs.push(m);
                }
                f => bail!("the target behind sent a {} frame among its digests", f.kind().name()),
            }
        }
        Ok(msgs)
    }

    /// Asks this (advanced) target for the resync `plan` of a peer with `digests`, and gives
    /// each frame of it to `sink` (heartbeats too, so the peer hears the source is alive).
    /// Returns (Data frames, bytes of data) once `ResyncEnd` went to the sink.
    fn block_resync(
        &mut self,
        plan: u64,
        resume: u64,
        digests: &[ControlMsg],
        sink: &mut dyn FnMut(&Frame) -> Result<()>,
    ) -> Result<(u64, u64)> {
        self.writer.send(&Frame::Control(ControlMsg::BlockResync { plan, resume_lsn: resume }))?;
        for m in digests {
            self.writer.send(&Frame::Control(m.clone()))?;
        }
        let mut sent = (0u64, 0u64);
        loop {
            let f = match self.reader.recv(SILENCE_MAX) {
                Ok(Frame::Control(ControlMsg::Bye { reason })) => bail!("the advanced target refused: {reason}"),
                Ok(f) => f,
                Err(e) => bail!("the advanced target: {e}"),
            };
            match &f {
                Frame::Data { data, .. } => sent = (sent.0 + 1, sent.1 + data.len() as u64),
                Frame::Heartbeat => {}
                Frame::Control(
                    ControlMsg::ResyncBegin { .. }
                    | ControlMsg::ResyncEntries { .. }
                    | ControlMsg::ResyncNode { .. }
                    | ControlMsg::ResyncEnd { .. },
                ) => {}
                other => bail!("the advanced target sent an unexpected {:?} in a resync", other.kind()),
            }
            sink(&f)?;
            if matches!(f, Frame::Control(ControlMsg::ResyncEnd { plan: p }) if p == plan) {
                return Ok(sent);
            }
        }
    }

    /// Waits until this target says resync `plan` is applied (it heartbeats meanwhile).
    fn resync_done(&mut self, plan: u64) -> Result<()> {
        match recv(&mut self.reader, "the target behind")? {
            Frame::Control(ControlMsg::ResyncDone { plan: p }) if p == plan => Ok(()),
            f => bail!("the target behind sent {f:?} instead of ResyncDone"),
        }
    }
}

/// Brings target `dst` to the tree of target `src` (applied below `end`) by a block-level
/// resync: the blocks that differ, the whole namespace and every object's attributes.
fn block_resync(targets: &mut [TcpTarget], src: usize, dst: usize, end: u64, urls: &[String]) -> Result<()> {
    for i in [src, dst] {
        if targets[i].minor < MINOR_BLOCKS {
            bail!(
                "{} speaks protocol 1.{}; a block-level resync needs 1.{MINOR_BLOCKS} on both targets (upgrade it)",
                urls[i],
                targets[i].minor
            );
        }
    }
    let started = Instant::now();
    let (a, b) = if src < dst { targets.split_at_mut(dst) } else { targets.split_at_mut(src) };
    let (source, sink) = if src < dst { (&mut a[src], &mut b[0]) } else { (&mut b[0], &mut a[dst]) };
    eprintln!("{}: reading the digest of every block of its directory ...", urls[dst]);
    let digests = sink.digests()?;
    let (files, blocks) = match digests.last() {
        Some(ControlMsg::DigestEnd { files, blocks }) => (*files, *blocks),
        _ => (0, 0),
    };
    eprintln!("{}: {files} files, {blocks} blocks; comparing with {} ...", urls[dst], urls[src]);
    let plan = rand::random::<u64>();
    let bar = common::progress_bar("block-level resync");
    bar.set_style(
        indicatif::ProgressStyle::with_template("block-level resync: {bytes} of differing blocks sent {spinner}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let (frames, bytes) = source.block_resync(plan, end, &digests, &mut |f| {
        if let Frame::Data { data, .. } = f {
            bar.inc(data.len() as u64);
        }
        sink.writer.send(f).map_err(|e| anyhow::anyhow!("{}: {e}", urls[dst]))
    })?;
    bar.finish_and_clear();
    eprintln!("{}: applying the resync ...", urls[dst]);
    sink.resync_done(plan)?;
    println!(
        "{}: block-level resync from {}: {} of differing blocks sent in {frames} pieces ({bytes} bytes; it held {files} \
         files, {blocks} blocks of {} KiB) in {:.1}s",
        urls[dst],
        urls[src],
        common::human_bytes(bytes),
        DIGEST_BLOCK >> 10,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
