//! The primary's side of replication (design §5): the hub of sync maps, a shipper thread per
//! target, and what a resync reads. `net/` carries the bytes; `replica/` is the target's side.

pub mod bunker;
pub mod hub;
pub mod session;
pub mod set_link;
pub mod sets;
pub mod shipper;
pub mod source;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::io::Storage;
use hub::Hub;
use session::Connector;
use shipper::Shipper;
use source::Source;

/// How often a sync map is written at least (each write lets the journal free what it covers).
pub const PERSIST_EVERY: Duration = Duration::from_secs(2);
/// How soon a map is written once acks have passed what its file covers: a crash of the
/// primary then re-marks only what was journaled since, not what the target already has.
pub const PERSIST_AFTER_ACKS: Duration = Duration::from_millis(200);

/// Running replication: one shipper per target and the timer that persists the maps.
pub struct Replication<S: Storage> {
    pub hub: Arc<Hub<S>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl<S: Storage> Replication<S> {
    /// Starts a shipper for each link of `hub`, with the connector of the same index.
    pub fn start(hub: Arc<Hub<S>>, connectors: Vec<Box<dyn Connector>>, source: Arc<dyn Source>) -> Replication<S> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let shipped = hub.links.iter().filter(|l| l.url != hub::PROMOTION_LINK);
        for (link, connector) in shipped.zip(connectors) {
            let shipper = Shipper {
                hub: hub.clone(),
                link: link.clone(),
                source: source.clone(),
                stop: stop.clone(),
                timing: shipper::Timing::default(),
            };
            let name = format!(
                "ship-{}",
                link.url.chars().rev().take(8).collect::<String>().chars().rev().collect::<String>()
            );
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || shipper.run(connector))
                    .expect("spawning a shipper"),
            );
        }
        let (h, st) = (hub.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("syncmap-persist".into())
                .spawn(move || {
                    while !st.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(50));
                        for link in &h.links {
                            if h.persist_due(link)
                                && let Err(e) = h.persist_link(link)
                            {
                                tracing::error!("{e}");
                            }
                        }
                    }
                })
                .expect("spawning the persist thread"),
        );
        Replication { hub, stop, threads }
    }

    /// Stops every shipper and writes the maps.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for l in &self.hub.links {
            l.wake.notify_all();
        }
        for t in self.threads {
            let _ = t.join();
        }
        if let Err(e) = self.hub.persist() {
            tracing::error!("{e}");
        }
    }
}
