//! The shipper and a target in the deterministic simulation (sim/replication.rs): a random
//! workload on the primary, a network that delays, drops, duplicates and cuts, target
//! crashes; then heal, and every target must equal the primary. Seeds: `FERRYFS_SIM_NET_SEEDS`
//! (default 100) from `FERRYFS_SIM_SEED_BASE`; `FERRYFS_SEED=n` runs one. A failing seed prints
//! the line that replays it exactly.

use ferryfs::sim::replication::{NetConfig, NetStats, run_net_seed};
use ferryfs::sim::seeds::seeds;

#[test]
fn after_healing_the_target_equals_the_primary() {
    if let Ok(filter) = std::env::var("FERRYFS_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let cfg = NetConfig::default();
    let seeds = seeds("FERRYFS_SIM_NET_SEEDS", 100);
    let mut total = NetStats::default();
    for &seed in &seeds {
        let result = std::panic::catch_unwind(|| run_net_seed(seed, &cfg));
        let failure = match result {
            Ok(Ok(s)) => {
                total.ops += s.ops;
                total.connections += s.connections;
                total.broken += s.broken;
                total.target_crashes += s.target_crashes;
                total.ticks += s.ticks;
                continue;
            }
            Ok(Err(msg)) => msg,
            Err(_) => "panicked (see above)".to_string(),
        };
        panic!(
            "seed {seed} failed: {failure}\nreplay it with: FERRYFS_SEED={seed} cargo test --release --test sim_replication"
        );
    }
    println!("{} seeds: {total:?}", seeds.len());
    assert!(
        total.broken > 0 && total.target_crashes > 0 && total.ops > 0,
        "the simulation injected no faults: {total:?}"
    );
}
