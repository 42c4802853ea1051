//! The bytes of a simulated TCP connection, as the simulations' sessions share them: each
//! direction a `Pipe` (the sender's frame encoder, the bytes in flight, the receiver's frame
//! decoder), both directions and the silence deadline a `Wire`, and the faults on the bytes in
//! flight (a run lost or duplicated), drawn as `FaultDraws` says.
//!
//! A damaged stream is found by the receiver's decoder at its next frame; if no frame follows,
//! the silence deadline stands for the timeout that ends the connection.

use std::collections::VecDeque;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::proto::wire::{Frame, FrameDecoder, FrameEncoder, WireError};

/// What a connection's faults draw from during one tick. The order of the draws is part of a
/// seed's replay: each helper here documents the draws it makes.
pub(crate) struct FaultDraws<'a> {
    /// The simulation's seeded generator.
    pub(crate) rng: &'a mut ChaCha8Rng,
    /// The simulation's clock, in ticks.
    pub(crate) tick: u64,
    /// Whether faults happen at all (no longer once a simulation's network healed).
    pub(crate) faults_on: bool,
}

impl FaultDraws<'_> {
    /// Whether a fault of chance `p`/1000 happens now: one draw, none while faults are off.
    fn permille(&mut self, p: u32) -> bool {
        self.faults_on && self.rng.gen_range(0..1000) < p
    }
}

/// One direction of a simulated connection: the sender's encoder, the bytes in flight, the
/// receiver's decoder.
pub(crate) struct Pipe {
    enc: FrameEncoder,
    in_flight: VecDeque<u8>,
    dec: FrameDecoder,
}

impl Pipe {
    pub(crate) fn new() -> Pipe {
        Pipe { enc: FrameEncoder::new(), in_flight: VecDeque::new(), dec: FrameDecoder::new() }
    }

    /// Encodes `frame` at the sending end and puts its bytes in flight.
    pub(crate) fn send(&mut self, frame: &Frame) -> Result<(), String> {
        let mut out = Vec::new();
        self.enc.encode(frame, &mut out).map_err(|e| e.to_string())?;
        self.in_flight.extend(out);
        Ok(())
    }

    /// Moves a random part of the bytes in flight (one draw: how many) to the receiving end.
    pub(crate) fn deliver_some(&mut self, rng: &mut ChaCha8Rng) {
        let n = rng.gen_range(0..=self.in_flight.len());
        let chunk: Vec<u8> = self.in_flight.drain(..n).collect();
        self.dec.push(&chunk);
    }

    /// Moves every byte in flight to the receiving end, with no draw (a fault-free greeting).
    pub(crate) fn deliver_all(&mut self) {
        let chunk: Vec<u8> = self.in_flight.drain(..).collect();
        self.dec.push(&chunk);
    }

    /// The next whole frame at the receiving end, `None` until one is; an error when the bytes
    /// delivered were damaged (bad magic, crc or sequence number).
    pub(crate) fn receive(&mut self) -> Result<Option<Frame>, WireError> {
        self.dec.next_frame()
    }

    /// Drops, then duplicates, a random run of the bytes in flight (draws: the drop's chance and,
    /// if it hits, where and how long; the same for the duplicate); returns whether it did.
    fn fault(&mut self, draws: &mut FaultDraws<'_>, drop_permille: u32, dup_permille: u32) -> bool {
        let q = &mut self.in_flight;
        if q.is_empty() {
            return false;
        }
        let before = q.len();
        if draws.permille(drop_permille) {
            let at = draws.rng.gen_range(0..q.len());
            let n = draws.rng.gen_range(1..=(q.len() - at).min(64));
            q.drain(at..at + n);
        }
        if !q.is_empty() && draws.permille(dup_permille) {
            let at = draws.rng.gen_range(0..q.len());
            let n = draws.rng.gen_range(1..=(q.len() - at).min(64));
            let dup: Vec<u8> = q.range(at..at + n).copied().collect();
            for (i, b) in dup.into_iter().enumerate() {
                q.insert(at + n + i, b);
            }
        }
        q.len() != before
    }
}

/// Both directions of a simulated connection between the primary and its peer (a target or a
/// bunker), and the deadline by which damaged bytes end it.
pub(crate) struct Wire {
    /// The primary's frames to the peer.
    pub(crate) to_peer: Pipe,
    /// The peer's frames to the primary.
    pub(crate) to_primary: Pipe,
    /// Set when bytes were damaged: by this tick the connection is gone, found by the decoder
    /// or, if no frame follows the damage, by the silence timeout.
    silence_deadline: Option<u64>,
}

impl Wire {
    pub(crate) fn new() -> Wire {
        Wire { to_peer: Pipe::new(), to_primary: Pipe::new(), silence_deadline: None }
    }

    /// Damages the bytes in flight each way (`Pipe::fault`, toward the peer first); on damage
    /// draws the silence deadline, 1 to 49 ticks on (a draw made even when one is set already:
    /// the first stands). Returns whether that deadline has come: the caller breaks the
    /// connection for silence after damaged bytes.
    pub(crate) fn damage(&mut self, mut draws: FaultDraws<'_>, drop_permille: u32, dup_permille: u32) -> bool {
        if self.to_peer.fault(&mut draws, drop_permille, dup_permille)
            | self.to_primary.fault(&mut draws, drop_permille, dup_permille)
        {
            let later = draws.rng.gen_range(1..50);
            self.silence_deadline.get_or_insert(draws.tick + later);
        }
        self.silence_deadline.is_some_and(|t| draws.tick >= t)
    }
}
