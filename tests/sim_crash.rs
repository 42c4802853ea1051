//! The deterministic crash simulation (sim/crash.rs). Seeds: `FERRYFS_SIM_SEEDS` (default
//! 1000) starting at `FERRYFS_SIM_SEED_BASE` (default 0); `FERRYFS_SEED=n` runs one seed.
//! A failing seed prints the line that replays it exactly.

use ferryfs::sim::crash::{CrashConfig, run_seed};
use ferryfs::sim::seeds::{env_u64, seeds};

#[test]
fn fsynced_writes_survive_any_crash_and_replay_is_idempotent() {
    let cfg = CrashConfig::default();
    let seeds = seeds("FERRYFS_SIM_SEEDS", 1000);
    let (mut ops, mut syncs, mut crashes, mut records) = (0, 0, 0, 0);
    for &seed in &seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed, &cfg));
        let failure = match result {
            Ok(Ok(s)) => {
                ops += s.ops;
                syncs += s.syncs;
                crashes += s.machine_crashes;
                records += s.records_replayed;
                continue;
            }
            Ok(Err(msg)) => msg,
            Err(_) => "panicked (see above)".to_string(),
        };
        panic!(
            "seed {seed} failed: {failure}\nreplay it with: FERRYFS_SEED={seed} cargo test --release --test sim_crash"
        );
    }
    println!(
        "{} seeds: {ops} operations, {syncs} fsyncs, {crashes} machine crashes, {records} records replayed",
        seeds.len()
    );
    assert!(crashes > 0 && records > 0, "the simulation crashed nothing or replayed nothing");
}

/// The same, with machine crashes that leave the backing tree holding a random prefix of its
/// changes since the last checkpoint (what ext4 and XFS keep), so replay starts from a tree
/// that is already past the checkpoint — possibly past the journal's durable end too, since
/// the backing filesystem writes back without waiting for the journal. Then the recovered tree
/// may mix bytes of un-acknowledged writes (docs/FORMAT.md, "Residual risk"), so the check is
/// the invariant at byte level: every name and every byte comes from a state at or after
/// the last fsync (every fsynced byte that nothing later overwrote is there; nothing appears
/// that was never written).
#[test]
fn fsynced_bytes_survive_crashes_that_keep_part_of_the_backing_tree() {
    let cfg = CrashConfig { prefix_crashes: true, ..CrashConfig::default() };
    let base = env_u64("FERRYFS_SIM_SEED_BASE", 0);
    let n = env_u64("FERRYFS_SIM_SEEDS", 1000);
    let (mut mixed, mut crashes) = (0, 0);
    for seed in base..base + n {
        match std::panic::catch_unwind(|| run_seed(seed, &cfg)) {
            Ok(Ok(s)) => {
                mixed += s.mixed_states;
                crashes += s.machine_crashes;
            }
            Ok(Err(e)) => panic!(
                "seed {seed} failed: {e}\nreplay it with: FERRYFS_SEED={seed} cargo test --release --test sim_crash prefix"
            ),
            Err(_) => panic!(
                "seed {seed} panicked\nreplay it with: FERRYFS_SEED={seed} cargo test --release --test sim_crash"
            ),
        }
    }
    println!("{n} seeds, {crashes} machine crashes keeping part of the tree; {mixed} recovered to a mix of states");
}
