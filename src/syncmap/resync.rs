//! Fall-back and resynchronization (000:12–13): when ordered shipping stops, the map alone
//! says what the target lacks; a resync plan sends the current contents of those locations,
//! and a write made meanwhile stays marked.
//!
//! Generations make the last part hold without locks or copies: a plan takes the current
//! generation as its id and advances it, so every mark made after the plan carries a higher
//! generation, and `resync_done(id)` clears only what carries `id` or lower. A block written
//! during the resync therefore stays marked, whatever the order of the read and the write.

use super::extents::{BlockRange, Tag};
use super::map::{Mode, PlanId, SyncMap};
use crate::types::{FileId, Lsn};

/// What a resync must send: the current contents of these locations, read from the backing
/// files by the caller, coalesced into maximal block ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncPlan {
    pub id: PlanId,
    /// Where ordered shipping resumes once the plan is sent (see [`SyncMap::resync_plan`]).
    pub resume_from: Lsn,
    /// Every file is owed (initial sync, file bound): compare or send the whole tree; `files`
    /// then only says what is known to have changed.
    pub full: bool,
    /// In file id order.
    pub files: Vec<FileResync>,
}

/// One file's part of a resync plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileResync {
    pub file: FileId,
    /// Send its attributes (mode, owner, times, size, xattrs).
    pub attr: bool,
    /// A directory: send its entries (the target adds and removes names to match).
    pub entries: bool,
    /// Send these blocks' contents (clipped by the caller to the file's current size).
    pub blocks: Vec<BlockRange>,
}

impl ResyncPlan {
    /// Blocks to send, for status and for checking that a resync sent nothing more.
    pub fn block_count(&self) -> u128 {
        self.files.iter().flat_map(|f| &f.blocks).map(BlockRange::blocks).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResyncError {
    #[error(
        "resync plan {given:?} is not the outstanding one ({outstanding:?}): it was superseded or the \
         target fell back since; its locations stay marked and the next plan sends them"
    )]
    StalePlan { given: PlanId, outstanding: Option<PlanId> },
}

impl SyncMap {
    /// 000:12: ordered shipping to this target stops (ack timeout, disconnect, journal
    /// overflow). From now on acks are ignored and marks only set indicators; every location
    /// already marked stays marked until a resync clears it. An outstanding plan is abandoned
    /// (its `resync_done` is refused). The caller persists [`SyncMap::encode`] after this.
    pub fn fall_back(&mut self) {
        self.mode = Mode::FallenBack;
        self.unorder_all(self.generation);
    }

    /// 000:13: takes a resync plan: every marked location, coalesced. Ordered shipping is
    /// abandoned (if it was still on) until [`SyncMap::resync_done`].
    ///
    /// `resume_from` is where ordered shipping resumes after the plan: the caller must pick an
    /// LSN no higher than that of any transaction not yet applied to the backing files, so
    /// every update below it is in the contents the resync reads, and keep the journal from it
    /// on ([`SyncMap::oldest_pending`] says so meanwhile). A mark arriving later with a lower
    /// id (a caller that got this wrong) stays marked for another resync.
    pub fn resync_plan(&mut self, resume_from: Lsn) -> ResyncPlan {
        let id = PlanId(self.generation);
        // Everything marked now is in this plan: one tag, so neighbours merge.
        self.unorder_all(id.0);
        self.generation += 1;
        self.mode = Mode::Resyncing { plan: id, resume_from };
        let files = self
            .files
            .iter()
            .map(|(&file, m)| FileResync {
                file,
                attr: m.attr.is_some(),
                entries: m.entries.is_some(),
                blocks: self.pieces.coalesced(file),
            })
            .collect();
        ResyncPlan { id, resume_from, full: self.full_gen.is_some(), files }
    }

    /// The target has durably received everything plan `plan` listed (contents read after
    /// the plan was taken). Clears what the plan covered unless it was marked again since, and
    /// resumes ordered shipping at the plan's `resume_from`. Refused for any plan but the
    /// outstanding one.
    pub fn resync_done(&mut self, plan: PlanId) -> Result<(), ResyncError> {
        let Mode::Resyncing { plan: outstanding, resume_from } = self.mode else {
            return Err(ResyncError::StalePlan { given: plan, outstanding: None });
        };
        if plan != outstanding {
            return Err(ResyncError::StalePlan { given: plan, outstanding: Some(outstanding) });
        }
        let covered = |tag: &Tag| tag.generation <= plan.0;
        self.pieces.remove_where(covered);
        for marks in self.files.values_mut() {
            marks.attr = marks.attr.filter(|t| !covered(t));
            marks.entries = marks.entries.filter(|t| !covered(t));
        }
        if self.full_gen.is_some_and(|g| g <= plan.0) {
            self.full_gen = None;
        }
        self.mode = Mode::Ordered { acked_below: resume_from };
        self.reindex();
        Ok(())
    }

    /// The plan awaiting `resync_done`, if any.
    pub fn outstanding_plan(&self) -> Option<PlanId> {
        match self.mode {
            Mode::Resyncing { plan, .. } => Some(plan),
            _ => None,
        }
    }

    /// Owe a full resync of every file (e.g. the operator asks for a verify-and-repair pass).
    /// Marks go on as before; the next plan has `full` set.
    pub fn require_full_resync(&mut self) {
        self.full_gen = Some(self.generation);
    }

    /// Every mark becomes "only a resync clears it", in generation `generation`.
    fn unorder_all(&mut self, generation: u64) {
        let tag = Tag::unordered(generation);
        self.pieces.retag_all(tag);
        for marks in self.files.values_mut() {
            marks.attr = marks.attr.map(|_| tag);
            marks.entries = marks.entries.map(|_| tag);
        }
        self.reindex();
    }
}
