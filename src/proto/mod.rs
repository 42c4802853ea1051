//! The replication protocol (design §5): codecs and state machines that do no I/O themselves.
//! `net/` drives them over byte streams; `sim/` drives them over a simulated network.

pub mod wire;
