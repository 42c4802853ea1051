//! Which seeds a simulation test runs, from the environment, as the `tests/sim_*.rs` runners
//! share it: `FERRYFS_SEED=n` runs seed n alone; otherwise a count (each simulation names its
//! own variable) from `FERRYFS_SIM_SEED_BASE` (default 0).

/// The number in environment variable `name`, or `default` when it is unset or no number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The seeds to run: `FERRYFS_SEED` alone when set (a failing seed's replay), else `count_var`
/// seeds (`default_count` when unset) from `FERRYFS_SIM_SEED_BASE`.
pub fn seeds(count_var: &str, default_count: u64) -> Vec<u64> {
    match std::env::var("FERRYFS_SEED") {
        Ok(s) => vec![s.parse().expect("FERRYFS_SEED must be a number")],
        Err(_) => {
            let base = env_u64("FERRYFS_SIM_SEED_BASE", 0);
            (base..base + env_u64(count_var, default_count)).collect()
        }
    }
}
