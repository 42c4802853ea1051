//! The per-target sync map (design §3 "Locations", claims 000:1–13): for one mirror target,
//! every location it still lacks. A location is `(file id, block index)`, a block 4 KiB; per
//! file the map keeps an extent set of marked blocks (a 1 GiB write is one extent) and the
//! flags "attributes changed" and, for directories, "entries changed", so namespace and
//! attribute changes survive an outage too. Pure data: no I/O, no threads, no clock. The
//! shipper drives it; persistence is bytes in, bytes out ([`SyncMap::encode`]).
//!
//! ## The claims, in this module
//! | claim | here |
//! |---|---|
//! | 000:1 | [`SyncMap::mark_write`], [`SyncMap::mark_attr`], [`SyncMap::mark_entries`] set the unsynchronized indicator ([`SyncMap::is_block_dirty`] …) |
//! | 000:2 | the same calls add the update id (LSN) to the location's pending set (kept as its maximum, below) |
//! | 000:3 | not here: the journal's records name their locations |
//! | 000:4 | [`SyncMap::ack`]: an ack of n removes every id ≤ n from every location's set; a transaction whose locations are all acked at every target is below [`SyncMaps::complete_upto`] |
//! | 000:5 | [`SyncMap::oldest_pending`], [`SyncMaps::min_pending`], [`SyncMaps::complete_upto`] |
//! | 000:6 | not here: the journal frees below `min_pending` (and its checkpoint) |
//! | 000:7–11 | [`SyncMap::ack`]: a location whose set is empty has its indicator reset |
//! | 000:12 | [`SyncMap::fall_back`] when acks stop, then [`SyncMap::encode`] / [`SyncMap::decode`] |
//! | 000:13 | [`SyncMap::resync_plan`] (current contents of every marked location, coalesced), [`SyncMap::resync_done`], then ordered shipping resumes |
//!
//! ## Why the highest pending LSN stands for the whole set
//! The claims keep, per location L, a set P(L) of pending update ids and reset L's indicator
//! when P(L) becomes empty. ferryfs ships updates in LSN order and a target acks cumulatively
//! ("every update ≤ n is durable here"), so an ack of n removes from every P(L) exactly the ids
//! ≤ n. After any sequence of acks, P(L) = {ids marked on L} ∩ (acked, ∞), which is empty
//! exactly when the highest id marked on L is acked. So storing max P(L) decides every reset
//! the set would, at the same moment; an extent is a run of blocks with the same maximum, and
//! an ack of n clears exactly the extents whose maximum is ≤ n. An index by that maximum lets
//! an ack touch only what it clears. What the maximum forgets is min P(L), which only
//! [`SyncMap::oldest_pending`] needs: each extent keeps a lower bound of it, and the answer is
//! clamped to the first unacked LSN (everything below is gone from every set).
//!
//! One case breaks the premise: a mark whose id the ordered stream has already passed (at or
//! below the acked position, or below a resync's resume point) will never be acked again. The
//! design's write path rules it out (a write is marked before it can be shipped), but if it
//! happens the location is kept as *unordered*: only a resync clears it, and
//! [`SyncMap::needs_resync`] says so. Never lost, at worst resent.
//!
//! ## Modes
//! ```text
//!   Ordered ──fall_back()──> FallenBack ──resync_plan(r)──> Resyncing{id, r} ──resync_done(id)──> Ordered{acked_below: r}
//!      └───────────────resync_plan(r)─────────────────────────────┘ │ ↺ resync_plan: a new id
//!                                                                    └──fall_back()──> FallenBack
//!   (a file-bound overflow makes an ordered map fall back by itself, owing a full resync)
//! ```
//! Fallen back, acks are ignored, marks carry no id, and all marks merge into one extent set.
//! A resync plan takes a generation number; marks made during the resync carry a newer one and
//! survive `resync_done`, so a write racing the resync's read is never lost (resync.rs).
//!
//! ## Memory
//! At most [`EXTENTS_MAX`] extents and [`FILES_MAX`] files per target. Past the first, the file
//! with the most extents is halved by joining its closest extents (the gap becomes marked too:
//! coarser, never dropped); past the second, the map owes a full resync and forgets its files.

// ---- syncmap limits (kept here, not in limits.rs, while this module is new) ----

/// Extents one target's map holds at most; past it extents are merged coarser. Measured heap
/// per extent: about 200 bytes while ordered (its node share in the extent tree and in the two
/// ack indexes), about 100 while fallen back (no ack index); 48 bytes in the map file. Ordered,
/// a million extents takes a million unacked writes to separate ranges (≈ 4 GiB of journal for
/// 4 KiB writes, four times the default), so such a target has usually fallen back first: the
/// bound costs ≈ 110 MiB of memory then (≈ 210 MiB at worst) and 48 MiB on disk per target,
/// reached only by random writes against a target that stays away.
pub const EXTENTS_MAX: usize = 1 << 20;

/// Files one target's map tracks at most (about 150–250 bytes each besides their extents).
/// Past it the map owes a full resync instead. At most half of [`EXTENTS_MAX`], so that merging
/// extents within files can always get back under the extent bound (every file keeps one).
pub const FILES_MAX: usize = 1 << 19;

const _: () = assert!(FILES_MAX * 2 <= EXTENTS_MAX);
const _: () = assert!(EXTENTS_MAX <= u32::MAX as usize, "the map file stores counts as u32");

mod bound;
mod encode;
mod extents;
mod map;
mod maps;
mod resync;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

pub use encode::{SYNCMAP_HEADER_LEN, SYNCMAP_MAGIC, SYNCMAP_VERSION, SyncMapDecodeError};
pub use extents::BlockRange;
pub use map::{Limits, Mode, PlanId, SyncMap, SyncMapStats};
pub use maps::SyncMaps;
pub use resync::{FileResync, ResyncError, ResyncPlan};
