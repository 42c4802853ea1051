//! ferryfs: a journaled, replicating FUSE filesystem. See README.md and docs/.
//!
//! Layers, from pure to wiring (a module imports only those above it in this list):
//! `types`, `limits` → `format` → `io` → `journal`, `syncmap`, `proto` → `passthrough` → `os`, `sim` → `fuse` → `cmd`.

pub mod cmd;
pub mod format;
pub mod fuse;
pub mod io;
pub mod journal;
pub mod limits;
pub mod net;
pub mod os;
pub mod passthrough;
pub mod proto;
pub mod replica;
pub mod ship;
pub mod sim;
pub mod status;
pub mod syncmap;
pub mod types;
