//! Simulated seams and the seeded crash runner: the journal, replay and the write path
//! driven with no kernel, no disk and no sleeping.

pub mod crash;
pub mod failover;
pub mod listing;
mod primary;
pub mod replication;
pub mod seeds;
pub mod storage;
pub mod tree;
mod wire;
