//! Catch-up's decisions (claims 002:5–6), apart from any socket so the simulation and
//! `ferryfs catchup` share them: after the primary's loss the targets of one replication set
//! stand at different LSNs; the most advanced one's log (kept from the all-acked watermark on,
//! claim 002:2) holds every record the others lack, so they are brought to its end from it.

use super::failover::LogView;

/// One target as catch-up sees it: the set its hello named, and where its log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub set_id: [u8; 16],
    pub view: LogView,
}

/// What happens to one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// It holds every record below the end already (the most advanced one, or one level with it).
    Level,
    /// Records `[from, end)` go to it from the most advanced target's log.
    Records { from: u64 },
    /// It lacks records the most advanced target's log no longer holds (its start moved past
    /// them), or a resync left its directory mixed beyond the end: only a block-level resync
    /// can bring it there.
    Blocks { from: u64, why: BlocksWhy },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlocksWhy {
    /// The most advanced target's log starts at this LSN.
    LogStartsAt(u64),
    /// A resync left its directory mixed until this LSN, past the end.
    MixedUntil(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Index of the most advanced target (the source of the records).
    pub advanced: usize,
    /// Every target ends holding every record below this LSN (the advanced one's next).
    pub end: u64,
    /// One per target, in the order given.
    pub actions: Vec<Action>,
}

/// Decides the catch-up, or says why it must not happen (nothing is changed then).
/// `names` name the targets in messages (their URLs), in the order of `peers`.
pub fn plan(peers: &[Peer], names: &[String], force: bool) -> Result<Plan, String> {
    if peers.len() < 2 {
        return Err("catch-up needs at least two targets (give --target more than once)".into());
    }
    let (first, first_name) = (&peers[0], &names[0]);
    for (p, name) in peers.iter().zip(names).skip(1) {
        if p.set_id != first.set_id {
            return Err(format!(
                "{name} and {first_name} belong to different replication sets: refusing to mix their logs; nothing \
                 was changed"
            ));
        }
        if p.view.epoch != first.view.epoch {
            return Err(format!(
                "{name} is at epoch {} and {first_name} at epoch {}: a failover moved one of them on, and their \
                 histories may differ past it; fail the older one back instead (docs/OPERATIONS.md). Nothing was \
                 changed",
                p.view.epoch, first.view.epoch
            ));
        }
    }
    for (p, name) in peers.iter().zip(names) {
        if p.view.promoted {
            return Err(format!(
                "{name} was promoted by a failover: it is a primary now, not a target to level; nothing was changed"
            ));
        }
        if p.view.primary_connected && !force {
            return Err(format!(
                "{name} is still connected to a live primary: catch-up is for after the primary's loss (its \
                 shipping would race the records moved here). Stop the primary and run again; --force runs anyway. \
                 Nothing was changed"
            ));
        }
    }
    // The first of the most advanced, so the choice is stable across runs.
    let advanced =
        (0..peers.len()).fold(0, |best, i| if peers[i].view.next_lsn > peers[best].view.next_lsn { i } else { best });
    let adv = peers[advanced].view;
    let end = adv.next_lsn;
    let actions = peers
        .iter()
        .map(|p| {
            let from = p.view.next_lsn;
            if p.view.mixed_until > end {
                Action::Blocks { from, why: BlocksWhy::MixedUntil(p.view.mixed_until) }
            } else if from >= end {
                Action::Level
            } else if from >= adv.start_lsn {
                Action::Records { from }
            } else {
                Action::Blocks { from, why: BlocksWhy::LogStartsAt(adv.start_lsn) }
            }
        })
        .collect();
    Ok(Plan { advanced, end, actions })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(set: u8, epoch: u64, start: u64, next: u64) -> Peer {
        Peer { set_id: [set; 16], view: LogView { epoch, start_lsn: start, next_lsn: next, ..Default::default() } }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("tcp://t{i}:1")).collect()
    }

    #[test]
    fn the_most_advanced_target_feeds_the_others_from_its_log() {
        let peers = [peer(1, 0, 90, 120), peer(1, 0, 100, 200), peer(1, 0, 80, 200), peer(1, 0, 50, 60)];
        let p = plan(&peers, &names(4), false).unwrap();
        assert_eq!(p.advanced, 1, "the first of the most advanced");
        assert_eq!(p.end, 200);
        assert_eq!(
            p.actions,
            vec![
                Action::Records { from: 120 },
                Action::Level,
                Action::Level,
                Action::Blocks { from: 60, why: BlocksWhy::LogStartsAt(100) },
            ]
        );
    }

    #[test]
    fn a_target_left_mixed_past_the_end_needs_blocks() {
        let mut t = peer(1, 0, 10, 50);
        t.view.mixed_until = 300;
        let p = plan(&[peer(1, 0, 10, 200), t], &names(2), false).unwrap();
        assert_eq!(p.actions[1], Action::Blocks { from: 50, why: BlocksWhy::MixedUntil(300) });
    }

    #[test]
    fn refuses_other_sets_other_epochs_promoted_targets_and_a_live_primary() {
        let why = plan(&[peer(1, 0, 1, 10), peer(2, 0, 1, 10)], &names(2), false).unwrap_err();
        assert!(why.contains("different replication sets"), "{why}");
        let why = plan(&[peer(1, 0, 1, 10), peer(1, 1, 1, 10)], &names(2), false).unwrap_err();
        assert!(why.contains("epoch"), "{why}");
        let mut promoted = peer(1, 0, 1, 10);
        promoted.view.promoted = true;
        assert!(plan(&[peer(1, 0, 1, 10), promoted], &names(2), false).unwrap_err().contains("promoted"));
        let mut live = peer(1, 0, 1, 10);
        live.view.primary_connected = true;
        assert!(plan(&[peer(1, 0, 1, 10), live], &names(2), false).unwrap_err().contains("--force"));
        assert!(plan(&[peer(1, 0, 1, 10), live], &names(2), true).is_ok());
        assert!(plan(&[peer(1, 0, 1, 10)], &names(1), false).is_err(), "one target");
    }

    #[test]
    fn a_second_run_finds_every_target_level() {
        let p = plan(&[peer(1, 0, 90, 200), peer(1, 0, 100, 200)], &names(2), false).unwrap();
        assert!(p.actions.iter().all(|a| *a == Action::Level));
    }
}
