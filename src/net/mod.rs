//! The network: the only module that opens sockets. `conn` is the blocking client side the
//! primary's shipper threads use; `target` is `ferryfs target` and `bunker` is
//! `ferryfs bunker`, both on tokio.

pub mod bunker;
pub mod conn;
pub mod target;
