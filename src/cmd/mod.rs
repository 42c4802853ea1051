//! One file per subcommand; `anyhow` lives here and in main.rs only.

pub mod bunker;
pub mod catchup;
pub mod common;
pub mod demo;
pub mod failback;
pub mod failover;
pub mod failover_several;
pub mod inspect;
pub mod mount;
pub mod replay;
pub mod replication;
pub mod status;
pub mod target;
