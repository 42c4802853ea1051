//! The write path without the kernel: "journal, apply, outcome" for every mutation, and the
//! file-id table. Generic over the journal's storage and the backing tree, so the simulation
//! drives exactly the code the FUSE mount runs. Never imports fuser.

mod background;
mod core;
mod ids;

pub use background::{Background, KernelFlush};
pub use core::{Core, CoreConfig, Errno, Marks};
pub use ids::IdTable;
