//! Reading the live log by LSN while it is written: the shipper's view of the journal.
//!
//! A reader only ever reads records below `next_lsn`, which the writer has finished copying
//! (it copies under the state lock before it hands out the next LSN). Records it needs are
//! kept from reuse by [`Retention`](super::Retention); should a record be reused anyway (the
//! replica was released on overflow), the reader sees a stale LSN or a bad crc and says
//! [`CursorError::Gone`], never returning other bytes.

use super::error::JournalError;
use super::reader::{Verdict, read_record};
use super::writer::{Journal, Position};
use crate::format::record::{self, HEADER_SIZE};
use crate::format::segment::{SEGMENT_HEADER_SIZE, SegmentHeader};
use crate::io::{SegmentFile, Storage};
use crate::types::Lsn;

/// A place to read the log from: the position of the record with LSN `next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCursor {
    pub pos: Position,
    pub next: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// The record is no longer in the log: its space was freed or reused.
    #[error("record {0} is no longer in the journal (its space was freed)")]
    Gone(Lsn),
    /// The record has not been written yet.
    #[error("record {0} is past the end of the journal (next is {1})")]
    Future(Lsn, Lsn),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl<S: Storage> Journal<S> {
    /// A cursor at record `lsn`, found from the nearest segment start before it.
    pub fn cursor_at(&self, lsn: Lsn) -> Result<LogCursor, CursorError> {
        let (start, start_lsn, end, next) = self.live();
        if lsn > next {
            return Err(CursorError::Future(lsn, next));
        }
        if lsn < start_lsn {
            return Err(CursorError::Gone(lsn));
        }
        let mut from = LogCursor { pos: start, next: start_lsn };
        for seq in start.seq + 1..=end.seq {
            match self.segment_first(seq)? {
                Some(first) if first <= lsn => from = LogCursor { pos: first_pos(seq), next: first },
                _ => break,
            }
        }
        let mut skip = Vec::new();
        while from.next < lsn {
            skip.clear();
            self.read_records(&mut from, lsn, 1 << 20, &mut skip)?;
        }
        Ok(from)
    }

    /// Appends whole records from `cur` on to `out`, stopping before `upto` or once `out` has
    /// grown by `max_bytes` (at least one record is read when one is there). Returns how many.
    pub fn read_records(
        &self,
        cur: &mut LogCursor,
        upto: Lsn,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, CursorError> {
        let size = self.geometry().segment_size as usize;
        let set_id = self.superblock().set_id;
        let mut seg = self.segment(cur.pos.seq)?;
        let mut buf = Vec::new();
        let mut count = 0;
        let first_len = out.len();
        while cur.next < upto && (count == 0 || out.len() - first_len < max_bytes) {
            let room = size - cur.pos.offset as usize;
            match read_record(seg.as_ref(), cur.pos.offset as usize, room, cur.next, &set_id, &mut buf)? {
                Verdict::Accept(h) => {
                    let len = record::record_len(h.payload_len as usize);
                    out.extend_from_slice(&buf[..HEADER_SIZE + h.payload_len as usize]);
                    out.resize(out.len() + len - HEADER_SIZE - h.payload_len as usize, 0);
                    cur.pos.offset += len as u64;
                    cur.next = cur.next.next();
                    count += 1;
                }
                Verdict::SegmentEnd(_) => {
                    let seq = cur.pos.seq + 1;
                    if self.segment_first(seq)? != Some(cur.next) {
                        return Err(CursorError::Gone(cur.next));
                    }
                    seg = self.segment(seq)?;
                    cur.pos = first_pos(seq);
                }
                Verdict::Corrupt(_) => return Err(CursorError::Gone(cur.next)),
            }
        }
        Ok(count)
    }

    /// The first LSN of segment `seq`, if that segment's header says it is that use of it.
    fn segment_first(&self, seq: u64) -> Result<Option<Lsn>, JournalError> {
        let seg = self.segment(seq)?;
        let mut hb = [0u8; SEGMENT_HEADER_SIZE];
        seg.read(0, &mut hb);
        Ok(match SegmentHeader::decode(&hb) {
            Ok(h) if h.seq == seq && h.set_id == self.superblock().set_id => Some(h.first_lsn),
            _ => None,
        })
    }

    /// The first LSN past the oldest live segment: a replica whose floor lies below it keeps
    /// that whole segment from reuse.
    pub fn oldest_segment_end(&self) -> Lsn {
        let (start, _, end, next) = self.live();
        if start.seq == end.seq {
            return next;
        }
        self.segment_first(start.seq + 1).ok().flatten().unwrap_or(next)
    }

    /// Bytes of the live log (from its start to its end), segment tails counted.
    pub fn bytes_appended_since_start(&self) -> u64 {
        let (start, _, end, _) = self.live();
        self.distance(start, end)
    }

    /// Bytes of log from record `lsn` to the end (0 when it is not in the log).
    pub fn bytes_from(&self, lsn: Lsn) -> u64 {
        let (_, _, end, next) = self.live();
        if lsn >= next {
            return 0;
        }
        match self.cursor_at(lsn) {
            Ok(c) => self.distance(c.pos, end),
            Err(_) => 0,
        }
    }

    fn distance(&self, from: Position, to: Position) -> u64 {
        let size = self.geometry().segment_size;
        ((to.seq * size) + to.offset).saturating_sub((from.seq * size) + from.offset)
    }

    /// The start of the segment that holds record `lsn` (or the log's start, if that is
    /// later): where a checkpoint may move the log's start while keeping `lsn`.
    pub(super) fn segment_holding(&self, lsn: Lsn) -> Result<(Lsn, Position), JournalError> {
        let (start, start_lsn, end, _) = self.live();
        let mut best = (start_lsn, start);
        for seq in start.seq + 1..=end.seq {
            match self.segment_first(seq)? {
                Some(first) if first <= lsn => best = (first, first_pos(seq)),
                _ => break,
            }
        }
        Ok(best)
    }
}

fn first_pos(seq: u64) -> Position {
    Position { seq, offset: SEGMENT_HEADER_SIZE as u64 }
}
