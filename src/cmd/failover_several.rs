//! `ferryfs failover` with several `--target`s (design §5, "Several targets"): the bunker
//! brings the most advanced target up to the primary's last acknowledged write, `catchup`
//! levels the others from its log, and the named target is promoted; the others, left at the
//! promotion's LSN and epoch, follow the new primary without a full copy (its shipper knows
//! them as leveled siblings).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::catchup::{catch_up, connect_all};
use super::common;
use super::failover::{
    BunkerSide, DirBunker, FailoverArgs, NOTICE_WAIT, TcpBunker, TcpTarget, hex, move_records, report_incomplete,
    tcp_addr,
};
use super::replication::read_key;
use crate::replica::failover::{Overrides, Plan, plan};

pub fn run(a: &FailoverArgs) -> Result<()> {
    let key = a.key.as_deref().map(read_key).transpose()?;
    let urls = &a.targets;
    let promote = a.promote.clone().unwrap_or_else(|| urls[0].clone());
    let Some(p) = urls.iter().position(|u| *u == promote) else {
        bail!("--promote {promote} is not one of the --target URLs given");
    };
    let mut addrs = Vec::new();
    for url in urls {
        let addr = tcp_addr("--target", url)?;
        if addrs.contains(&addr) {
            bail!("--target {url} is given twice");
        }
        addrs.push(addr);
    }
    let connect_bunker = || -> Result<Box<dyn BunkerSide>> {
        Ok(match a.bunker.strip_prefix("tcp://") {
            Some(_) => Box::new(TcpBunker::connect(tcp_addr("--bunker", &a.bunker)?, key.clone())?),
            None => Box::new(DirBunker::open(&a.bunker)?),
        })
    };
    let connect_targets = || connect_all(&addrs, urls, &key);
    let mut bunker = connect_bunker()?;
    let mut targets = connect_targets()?;
    let patience = Instant::now() + NOTICE_WAIT;
    while !a.force
        && (bunker.view().primary_connected || targets.iter().any(|t| t.view.primary_connected))
        && Instant::now() < patience
    {
        eprintln!("waiting for the bunker and the targets to notice that the primary is gone ...");
        std::thread::sleep(Duration::from_secs(1));
        if a.bunker.starts_with("tcp://") {
            bunker = connect_bunker()?;
        }
        targets = connect_targets()?;
    }
    for (t, url) in targets.iter().zip(urls) {
        if t.set_id != bunker.set_id() {
            bail!(
                "the bunker ({}) and the target {url} belong to different replication sets ({} and {}); nothing was \
                 changed",
                a.bunker,
                hex(&bunker.set_id()),
                hex(&t.set_id)
            );
        }
    }
    let b = bunker.view();
    eprintln!("bunker {}: epoch {}, holds records {}..{}", a.bunker, b.epoch, b.start_lsn, b.next_lsn);
    for (t, url) in targets.iter().zip(urls) {
        let v = t.view;
        eprintln!(
            "target {url}: epoch {}, log holds records {}..{}{}",
            v.epoch,
            v.start_lsn,
            v.next_lsn,
            if v.promoted { ", promoted" } else { "" }
        );
    }
    let allow = Overrides { live_primary: a.force, mixed: a.allow_mixed };
    // Done already: the one to promote was promoted and holds everything the bunker has.
    if let Ok(Plan::AlreadyDone { epoch, end_lsn }) = plan(b, targets[p].view, allow) {
        println!(
            "already failed over: {promote} is the primary of epoch {epoch} and holds every record below LSN \
             {end_lsn}; nothing to do"
        );
        return Ok(());
    }
    // The bunker's records go to the most advanced target (the one to promote among equals).
    let adv = (0..targets.len())
        .fold(p, |best, i| if targets[i].view.next_lsn > targets[best].view.next_lsn { i } else { best });
    let (from, bunker_next, end, epoch) = match plan(b, targets[adv].view, allow).map_err(anyhow::Error::msg)? {
        Plan::Move { from, bunker_next, end, epoch } => (from, bunker_next, end, epoch),
        Plan::AlreadyDone { .. } => bail!("{} was promoted already, but {promote} is named to be", urls[adv]),
    };
    let epoch = targets.iter().map(|t| t.view.epoch + 1).fold(epoch, u64::max);
    let to_move = bunker_next.saturating_sub(from);
    if a.dry_run {
        println!(
            "dry run: would fence the bunker and {} targets at epoch {epoch}, send {to_move} records (LSN \
             {from}..{bunker_next}) from the bunker to {}, level the other targets at LSN {end} from its log \
             (ferryfs catchup), and promote {promote}; nothing was changed",
            urls.len(),
            urls[adv]
        );
        return Ok(());
    }
    bunker.fence(epoch)?;
    for (t, url) in targets.iter_mut().zip(urls) {
        t.fence(epoch).map_err(|e| anyhow::anyhow!("fencing {url}: {e:#}"))?;
    }
    eprintln!("fenced the bunker and every target at epoch {epoch}: the old primary is refused from now on");
    if to_move > 0 && bunker.view().start_lsn > from {
        bail!("the bunker no longer holds record {from}; the targets were fenced at epoch {epoch} but not changed");
    }
    let started = Instant::now();
    let scan = move_records(&mut |at, sink| bunker.read(at, sink), &mut targets[adv], from, bunker_next)?;
    eprintln!(
        "moved {} records ({}) from the bunker to {} in {:.1}s",
        scan.records,
        common::human_bytes(scan.bytes),
        urls[adv],
        started.elapsed().as_secs_f64()
    );
    report_incomplete(&scan);
    // Every other target the bunker can serve gets its records from the bunker too: catch-up
    // from the most advanced target's log cannot reach one behind that log's start (found by
    // the failover simulation, seed 61).
    let bunker_start = bunker.view().start_lsn;
    for (i, t) in targets.iter_mut().enumerate() {
        let from_i = t.view.next_lsn;
        if i == adv || from_i >= bunker_next || from_i < bunker_start {
            continue;
        }
        let moved = move_records(&mut |at, sink| bunker.read(at, sink), t, from_i, bunker_next)?;
        eprintln!(
            "moved {} records ({}) from the bunker to {}",
            moved.records,
            common::human_bytes(moved.bytes),
            urls[i]
        );
    }
    eprintln!("leveling the targets from the most advanced one's log");
    drop(targets);
    let leveled = catch_up(urls, a.key.as_deref(), false, true)?;
    if leveled.end != end {
        bail!("the targets were leveled at LSN {}, not at the failover's end {end}", leveled.end);
    }
    if leveled.behind.contains(&promote) {
        bail!(
            "{promote} could not be leveled, from records or blocks (see above): promote another target with --promote, or \
             resynchronize it; every target is fenced at epoch {epoch}, none is promoted"
        );
    }
    let mut chosen = TcpTarget::connect(addrs[p], key.clone())?;
    let promoted = chosen.promote(epoch, end)?;
    println!(
        "failover complete: {promote} is the primary of epoch {} and holds every record below LSN {end}; {} other \
         target(s) hold the same{}",
        promoted.epoch,
        urls.len() - 1 - leveled.behind.len(),
        if leveled.behind.is_empty() {
            String::new()
        } else {
            format!(" ({} need a resync: {})", leveled.behind.len(), leveled.behind.join(", "))
        }
    );
    let others: Vec<String> = urls.iter().filter(|u| **u != promote).map(|u| format!("--target {u}")).collect();
    println!(
        "next: stop `ferryfs target` on {promote} and mount its directory as the new primary: ferryfs mount MNT \
         --backing <its --dir> --journal <its --state>/log {}; the other targets follow it without a full copy",
        others.join(" ")
    );
    Ok(())
}
