//! The two timers of a mount: the committer makes un-synced writes durable within the commit
//! interval, the checkpointer syncs the backing directory and frees log space.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::core::Core;
use crate::io::{Storage, Tree};

/// How often the timers look at the clock and the stop flag.
const TICK: Duration = Duration::from_millis(20);

/// Pushes writes the kernel still caches into the journal (a syncfs of the mount when the
/// kernel's writeback cache is on); runs before each commit.
pub type KernelFlush = Arc<dyn Fn() + Send + Sync>;

pub struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Background {
    pub fn start<S: Storage, T: Tree>(
        core: &Arc<Core<S, T>>,
        commit: Duration,
        checkpoint: Duration,
        kernel_flush: Option<KernelFlush>,
    ) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (name, every, is_checkpoint) in
            [("ferryfs-commit", commit, false), ("ferryfs-checkpoint", checkpoint, true)]
        {
            let (core, stop, kernel_flush) = (core.clone(), stop.clone(), kernel_flush.clone());
            let t = thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        thread::sleep(TICK.min(every));
                        if last.elapsed() < every {
                            continue;
                        }
                        last = Instant::now();
                        if let (false, Some(flush)) = (is_checkpoint, &kernel_flush) {
                            flush();
                        }
                        let r = if is_checkpoint {
                            core.checkpoint().map(|_| ())
                        } else {
                            core.journal.sync().map(|_| ()).map_err(|e| crate::passthrough::Errno(e.errno()))
                        };
                        if let Err(e) = r {
                            tracing::error!("{name}: errno {}", e.0);
                        }
                    }
                })
                .expect("spawning a background thread");
            threads.push(t);
        }
        Background { stop, threads }
    }

    /// Stops both timers and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ops::NodeKind;
    use crate::io::NewNode;
    use crate::journal::{JournalGeometry, read_superblock, recovery};
    use crate::passthrough::{CoreConfig, IdTable};
    use crate::sim::storage::SimStorage;
    use crate::sim::tree::SimTree;
    use crate::types::FileId;

    #[test]
    fn un_synced_writes_survive_a_machine_crash_after_the_commit_interval() {
        let storage = SimStorage::new();
        let tree = SimTree::new();
        let mut sb = crate::sim::crash::new_superblock();
        sb.boot_id = [1; 16];
        let geo = JournalGeometry { segment_size: 64 << 10, segment_count: 4 };
        let opened = recovery::create(storage.clone(), geo, sb).unwrap();
        let core = Arc::new(
            Core::new(
                opened.journal,
                tree.clone(),
                IdTable::from_snapshot(opened.ids.snapshot()),
                CoreConfig::default(),
            )
            .unwrap(),
        );
        let bg = Background::start(&core, Duration::from_millis(50), Duration::from_secs(3600), None);
        let new = NewNode { kind: NodeKind::File, mode: 0o644, uid: 0, gid: 0, rdev: 0, target: b"" };
        let (id, _) = core.create(FileId::ROOT, b"f", &new).unwrap();
        core.write_via_tree(id, 0, b"never fsynced").unwrap();
        thread::sleep(Duration::from_millis(300));
        bg.stop();
        drop(core);
        // Every unflushed page is lost in this crash, and the tree keeps nothing.
        storage.crash_machine_losing_all();
        tree.crash_machine();
        let sb = read_superblock(&storage).unwrap();
        recovery::recover(storage, sb, &tree, [2; 16], false, &mut |_, _| {}).unwrap();
        assert_eq!(tree.listing()["/f"].1, b"never fsynced");
    }
}
