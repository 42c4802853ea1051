//! A mirror target's side of replication that touches its directory (design §5).

pub mod apply;
#[cfg(test)]
mod apply_tests;
pub mod blocks;
pub mod bunker;
pub mod catchup;
pub mod copies;
pub mod failover;
pub mod frames;
pub mod set_stage;
pub mod staged;
pub mod target;
#[cfg(test)]
mod target_tests;
