//! Failover in the deterministic simulation (sim/failover/): a primary mirrored in sync mode
//! to a bunker and shipping to one to three lagging targets, faults on every network, bunker
//! and target crashes, then the primary's crash and the failover as `ferryfs failover` runs it
//! (with several `--target`s: the bunker's records to the most advanced, catch-up levels the
//! others from its log, one is promoted). After the promotion the target must hold every write
//! whose fsync returned in sync mode, its tree must be the primary's journal applied up to the
//! promoted end (no hole, no reordering), every other target catch-up leveled must show the
//! same tree, one it left behind (needing blocks) must be explained and, once it got its
//! block-level resync from the most advanced target, show the same tree too; a second
//! failover must find nothing to do.
//!
//! Seeds: `FERRYFS_SIM_FAILOVER_SEEDS` (default 50) from `FERRYFS_SIM_SEED_BASE`;
//! `FERRYFS_SIM_TARGETS_MAX=n` draws 1..=n targets per seed (default 3; 1: one target only);
//! `FERRYFS_SIM_SMALL_TARGET_LOGS=p` gives p/1000 of the seeds with several targets logs only
//! as large as the primary's journal (default 0: see `FailoverConfig::small_target_log_permille`);
//! `FERRYFS_SEED=n` runs one; `FERRYFS_SIM_KEEP_GOING=1` runs on past a failing seed and lists
//! them all; `FERRYFS_SIM_VERBOSE=1` prints each seed's counters; `FERRYFS_SIM_DEBUG=1` prints
//! the failover's view of every node (and the catch-up's plan); `FERRYFS_LOG=trace` adds each resync plan. A wrong
//! promoted tree's message says which primary states each differing path matches. A failure prints the line that
//! replays it exactly.

use ferryfs::sim::failover::{FailoverConfig, FailoverStats, run_failover_seed};
use ferryfs::sim::seeds::{env_u64, seeds};

#[test]
fn after_failover_the_target_holds_every_write_acknowledged_in_sync_mode() {
    if let Ok(filter) = std::env::var("FERRYFS_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let defaults = FailoverConfig::default();
    let targets_max = env_u64("FERRYFS_SIM_TARGETS_MAX", defaults.targets_max as u64) as usize;
    let small = env_u64("FERRYFS_SIM_SMALL_TARGET_LOGS", defaults.small_target_log_permille as u64) as u32;
    let cfg = FailoverConfig { targets_max, small_target_log_permille: small, ..defaults };
    let seeds = seeds("FERRYFS_SIM_FAILOVER_SEEDS", 50);
    let keep_going = std::env::var_os("FERRYFS_SIM_KEEP_GOING").is_some();
    let mut total = FailoverStats::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let failure = match std::panic::catch_unwind(|| run_failover_seed(seed, &cfg)) {
            Ok(Ok(s)) => {
                if std::env::var_os("FERRYFS_SIM_VERBOSE").is_some() {
                    println!("seed {seed}: {s:?}");
                }
                total.add(&s);
                continue;
            }
            Ok(Err(msg)) => msg,
            Err(_) => "panicked (see above)".to_string(),
        };
        println!("seed {seed} failed: {failure}");
        failed.push(seed);
        if !keep_going {
            break;
        }
    }
    if let Some(first) = failed.first() {
        panic!(
            "{} of {} seeds failed ({failed:?}; the reasons are above)\nreplay one with: FERRYFS_SEED={first} cargo \
             test --release --test sim_failover",
            failed.len(),
            seeds.len()
        );
    }
    println!("{} seeds: {total:?}", seeds.len());
    // The same seed, the same run: the link's thread takes turns, it does not race.
    let again = |seed| run_failover_seed(seed, &cfg).map(|s| format!("{s:?}"));
    assert_eq!(again(seeds[0]), again(seeds[0]), "seed {} does not replay exactly", seeds[0]);
    if seeds.len() >= 20 {
        // The faults and the paths the invariants are about must actually happen.
        assert!(
            total.promoted > 0
                && total.fsyncs_sync_acked > 0
                && total.bunker_crashes > 0
                && total.target_crashes > 0
                && total.broken > 0
                && total.records_moved > 0
                && (cfg.targets_max < 2 || total.caught_up > 0)
                && (cfg.targets_max < 2 || seeds.len() < 50 || total.blocks_resynced > 0),
            "the simulation exercised too little: {total:?}"
        );
    }
}
