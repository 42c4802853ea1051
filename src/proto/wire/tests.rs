//! Tests of the wire codecs (golden bytes, damage, auth, fuzzing).
use super::*;
use crate::format::record::{self, Header, Kind};
use crate::types::TxId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ----- helpers -----

fn key(s: &str) -> Key {
    Key::from_file_bytes(s.as_bytes()).unwrap()
}

fn config(role: Role, instance: u8, nonce: u8, key: Option<Key>) -> HandshakeConfig {
    HandshakeConfig { role, set_id: [0xAB; 16], epoch: 3, instance_id: [instance; 16], nonce: [nonce; 32], key }
}

/// The documented example is a protocol 1.0 hello (1.1 keeps its layout).
fn golden_hello() -> Hello {
    Hello {
        version: Version { major: 1, minor: 0 },
        role: Role::Primary,
        flags: HELLO_FLAG_KEY,
        set_id: std::array::from_fn(|i| 0x10 + i as u8),
        epoch: 3,
        instance_id: [0x11; 16],
        nonce: [0x22; 32],
    }
}

fn journal_record(lsn: u64, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        kind: Kind::Write,
        lsn: Lsn(lsn),
        txid: TxId(lsn),
        payload_len: 0,
        crc: 0,
        set_id: [0xAB; 16],
        epoch: 1,
        time_ns: 42,
    };
    let mut buf = vec![0xEE; record::record_len(payload.len())];
    record::encode_into(&mut buf, h, &[payload]);
    buf
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut enc = FrameEncoder::new();
    let mut out = Vec::new();
    for f in frames {
        enc.encode(f, &mut out).unwrap();
    }
    out
}

/// Every frame in `stream`, pushed in `pieces`; stops at the first error.
fn decode_pieces(pieces: &[&[u8]]) -> (Vec<Frame>, Option<WireError>) {
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    for p in pieces {
        dec.push(p);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Records([journal_record(7, b"golden"), journal_record(8, b"")].concat()),
        Frame::Ack(Lsn(8)),
        Frame::Control(ControlMsg::Watermark { all_acked_lsn: 8 }),
        Frame::Heartbeat,
        Frame::Control(ControlMsg::Bye { reason: "shutting down".into() }),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Side of an in-memory connection: its handshake and its first error.
struct Side {
    hs: Handshake,
    error: Option<WireError>,
}

impl Side {
    fn new(config: HandshakeConfig) -> Side {
        Side { hs: Handshake::new(config), error: None }
    }
    /// Feeds `bytes` in 7-byte pieces, as a slow network would.
    fn receive(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(7) {
            if self.error.is_some() {
                return;
            }
            match self.hs.push(piece) {
                Ok(used) => assert_eq!(used, piece.len(), "the peer sent nothing past its handshake"),
                Err(e) => self.error = Some(e),
            }
        }
    }
    fn outcome(&self) -> Result<Established, WireError> {
        match (&self.error, self.hs.established()) {
            (Some(e), _) => Err(e.clone()),
            (None, Some(est)) => Ok(*est),
            (None, None) => panic!("handshake stuck"),
        }
    }
}

fn run_pair(a: &mut Side, b: &mut Side) {
    for _ in 0..4 {
        let to_b = a.hs.take_outgoing();
        let to_a = b.hs.take_outgoing();
        b.receive(&to_b);
        a.receive(&to_a);
    }
}

fn handshake(
    a: HandshakeConfig,
    b: HandshakeConfig,
) -> (Result<Established, WireError>, Result<Established, WireError>) {
    let (mut a, mut b) = (Side::new(a), Side::new(b));
    run_pair(&mut a, &mut b);
    (a.outcome(), b.outcome())
}

// ----- golden encodings -----

/// Computed by an independent implementation (Python's struct and a bitwise crc32c), not
/// by this code. docs/PROTOCOL.md shows the same bytes.
const GOLDEN_HELLO_HEX: &str = concat!(
    "4652595749524500",                                                 // magic "FRYWIRE\0"
    "0100",                                                             // major 1
    "0000",                                                             // minor 0
    "6000",                                                             // length 96
    "01",                                                               // role primary
    "01",                                                               // flags: key
    "101112131415161718191a1b1c1d1e1f",                                 // set id
    "0300000000000000",                                                 // epoch 3
    "11111111111111111111111111111111",                                 // instance id
    "2222222222222222222222222222222222222222222222222222222222222222", // nonce
    "00000000",                                                         // reserved
    "fac92d97",                                                         // crc32c
);
const GOLDEN_HELLO_CRC: u32 = 0x972d_c9fa;

#[test]
fn golden_hello_is_pinned() {
    let bytes = golden_hello().encode();
    assert_eq!(hex(&bytes), GOLDEN_HELLO_HEX);
    assert_eq!(le_u32(&bytes, 92), GOLDEN_HELLO_CRC);
    assert_eq!(&bytes[..8], b"FRYWIRE\0");
}

/// Python: hmac.new(key, b"ferryfs-auth-v1" + prover_hello + verifier_hello, sha256).
const GOLDEN_PROOF_HEX: &str = "075041659ad1c98207d40737febab180490cb0a1d32ae8313df8ea27d57f85b4";

#[test]
fn golden_proof_is_pinned() {
    let prover = golden_hello().encode();
    let verifier = Hello { role: Role::Target, instance_id: [0x33; 16], nonce: [0x44; 32], ..golden_hello() }.encode();
    let proof = auth_proof(&key("0123456789abcdef\n"), &prover, &verifier);
    assert_eq!(hex(&proof), GOLDEN_PROOF_HEX);
    let message = encode_proof(&proof);
    assert_eq!(&message[..8], b"FRYP\0\0\0\0");
    assert_eq!(&message[8..], &proof);
}

/// Independent computation, as for the hello. The records frame carries the golden record of
/// docs/FORMAT.md unchanged.
const GOLDEN_FRAMES_HEX: [&str; 4] = [
    "465704000000000000000000f057dca8",
    "465702000800000001000000ff84fe1a0700000000000000",
    "4657030006000000020000005511acd1010002fb2c01",
    concat!(
        "465701004800000003000000c2ef0acb",
        "46525952010001000700000000000000070000000000000006000000e04bc932",
        "abababababababababababababababab01000000000000002a00000000000000",
        "676f6c64656e0000",
    ),
];
const GOLDEN_FRAME_CRCS: [u32; 4] = [2_833_012_720, 452_887_807, 3_517_714_773, 3_406_491_586];

#[test]
fn golden_frames_are_pinned() {
    let frames = [
        Frame::Heartbeat,
        Frame::Ack(Lsn(7)),
        Frame::Control(ControlMsg::Resume { from_lsn: 300 }),
        Frame::Records(journal_record(7, b"golden")),
    ];
    let mut enc = FrameEncoder::new();
    for (i, frame) in frames.iter().enumerate() {
        let mut out = Vec::new();
        enc.encode(frame, &mut out).unwrap();
        assert_eq!(hex(&out), GOLDEN_FRAMES_HEX[i], "frame {i}");
        assert_eq!(le_u32(&out, 12), GOLDEN_FRAME_CRCS[i], "frame {i}");
    }
}

#[test]
fn golden_control_bodies_are_pinned() {
    let cases: [(ControlMsg, &str); 6] = [
        (ControlMsg::StatusRequest, "010000"),
        (ControlMsg::Status { next_lsn: 9, durable_lsn: 8, applied_lsn: 250 }, "0100010908fa"),
        (ControlMsg::Resume { from_lsn: 300 }, "010002fb2c01"),
        (ControlMsg::Watermark { all_acked_lsn: 70_000 }, "010003fc70110100"),
        (ControlMsg::HigherEpoch { epoch: 1 << 40 }, "010004fd0000000000010000"),
        (ControlMsg::Bye { reason: "ok".into() }, "010005026f6b"),
    ];
    for (msg, expected) in cases {
        let body = control::encode(&msg).unwrap();
        assert_eq!(hex(&body), expected, "{msg:?}");
        assert_eq!(control::decode(&body).unwrap(), msg);
    }
}

// ----- round trips -----

#[test]
fn hello_roundtrips_for_every_role() {
    for role in [Role::Primary, Role::Target, Role::Bunker, Role::FailoverTool, Role::CatchupPeer] {
        let hello = Hello { role, epoch: u64::MAX, flags: 0, ..golden_hello() };
        let bytes = hello.encode();
        assert_eq!(Hello::decode(&bytes).unwrap(), Some((hello, HELLO_LEN)));
        assert_eq!(Role::from_u8(role as u8), Some(role));
    }
}

#[test]
fn frames_roundtrip_in_one_push() {
    let frames = sample_frames();
    let stream = encode_all(&frames);
    assert_eq!(decode_pieces(&[&stream]), (frames, None));
}

#[test]
fn records_split_into_the_records_sent() {
    let records = [journal_record(1, b"a"), journal_record(2, &[7; 100]), journal_record(3, b"")];
    let body = records.concat();
    let split: Vec<&[u8]> = split_records(&body).map(Result::unwrap).collect();
    assert_eq!(split, records.iter().map(Vec::as_slice).collect::<Vec<_>>());
}

#[test]
fn gathered_records_header_equals_the_copied_frame() {
    let (a, b) = (journal_record(1, b"first"), [journal_record(2, b"second"), journal_record(3, b"x")].concat());
    let header = FrameEncoder::new().records_header(&[&a, &b]).unwrap();
    let mut copied = Vec::new();
    FrameEncoder::new().encode(&Frame::Records([a.clone(), b.clone()].concat()), &mut copied).unwrap();
    assert_eq!([&header[..], &a, &b].concat(), copied);
}

#[test]
fn encoder_refuses_bodies_that_are_not_whole_records() {
    let rec = journal_record(1, b"abc");
    let mut enc = FrameEncoder::new();
    assert!(matches!(enc.records_header(&[&rec[..rec.len() - 8]]), Err(WireError::RecordFraming(_))));
    assert!(matches!(enc.records_header(&[]), Err(WireError::RecordFraming(_))));
    assert!(matches!(enc.records_header(&[&rec[..10]]), Err(WireError::RecordFraming(_))));
    // A refused frame uses no sequence number.
    assert_eq!(le_u32(&enc.records_header(&[&rec]).unwrap(), 8), 0);
}

// ----- damage -----

/// Feeds a damaged frame; a length field that grew is given the zeros it waits for. The
/// frame must be refused, never decoded.
fn assert_refused(damaged: &[u8], what: &str) {
    let mut dec = FrameDecoder::new();
    dec.push(damaged);
    match dec.next_frame() {
        Err(_) => return,
        Ok(Some(f)) => panic!("{what}: decoded {f:?}"),
        Ok(None) => {}
    }
    let claimed = FRAME_HEADER_LEN + le_u32(damaged, 4) as usize;
    assert!(claimed > damaged.len(), "{what}: waits although the frame is complete");
    dec.push(&vec![0; claimed - damaged.len()]);
    match dec.next_frame() {
        Err(WireError::FrameCrc { .. }) => {}
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn every_byte_and_bit_flip_of_a_frame_is_refused() {
    for frame in sample_frames() {
        let bytes = encode_all(std::slice::from_ref(&frame));
        for i in 0..bytes.len() {
            for mask in [0xFF, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
                let mut damaged = bytes.clone();
                damaged[i] ^= mask;
                assert_refused(&damaged, &format!("{} frame, byte {i} ^ {mask:#04x}", frame.kind().name()));
            }
        }
    }
}

#[test]
fn truncated_frames_wait_for_the_rest() {
    let frames = sample_frames();
    let stream = encode_all(&frames);
    let mut ends = Vec::new();
    let mut enc = FrameEncoder::new();
    let mut len = 0;
    for f in &frames {
        let mut out = Vec::new();
        enc.encode(f, &mut out).unwrap();
        len += out.len();
        ends.push(len);
    }
    for cut in 0..=stream.len() {
        let (got, err) = decode_pieces(&[&stream[..cut]]);
        assert_eq!(err, None, "cut at {cut}");
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(got, frames[..whole], "cut at {cut}");
    }
}

#[test]
fn truncated_hello_waits_for_the_rest() {
    let bytes = golden_hello().encode();
    for cut in 0..HELLO_LEN {
        assert_eq!(Hello::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        let mut hs = Handshake::new(config(Role::Target, 9, 9, Some(key("0123456789abcdef"))));
        assert_eq!(hs.push(&bytes[..cut]), Ok(cut));
        assert!(hs.established().is_none());
    }
}

#[test]
fn oversize_length_is_refused_before_the_body_is_buffered() {
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[0..2].copy_from_slice(b"FW");
    header[2..4].copy_from_slice(&1u16.to_le_bytes());
    header[4..8].copy_from_slice(&(FRAME_BODY_MAX as u32 + 1).to_le_bytes());
    let mut dec = FrameDecoder::new();
    dec.push(&header);
    let err = dec.next_frame().unwrap_err();
    assert_eq!(err, WireError::FrameTooLong { seq: 0, len: FRAME_BODY_MAX as u64 + 1, max: FRAME_BODY_MAX });
    assert!(err.to_string().contains("over the limit"), "{err}");
    assert!(dec.buf.capacity() < 4096, "nothing allocated for the body");

    // At the limit it waits, still without reserving the body.
    header[4..8].copy_from_slice(&(FRAME_BODY_MAX as u32).to_le_bytes());
    let mut dec = FrameDecoder::new();
    dec.push(&header);
    assert_eq!(dec.next_frame(), Ok(None));
    assert!(dec.buf.capacity() < 4096);

    // A receiver's own lower limit.
    header[4..8].copy_from_slice(&1001u32.to_le_bytes());
    let mut dec = FrameDecoder::with_body_max(1000);
    dec.push(&header);
    assert!(matches!(dec.next_frame(), Err(WireError::FrameTooLong { len: 1001, max: 1000, .. })));
}

#[test]
fn encoder_refuses_an_oversize_body() {
    let mut big = vec![0u8; RECORD_HEADER_SIZE + FRAME_BODY_MAX];
    big[24..28].copy_from_slice(&(FRAME_BODY_MAX as u32).to_le_bytes());
    let err = FrameEncoder::new().records_header(&[&big]).unwrap_err();
    assert!(matches!(err, WireError::FrameTooLong { .. }), "{err}");
    let reason = "x".repeat(CONTROL_BODY_MAX);
    let err = FrameEncoder::new().encode(&Frame::Control(ControlMsg::Bye { reason }), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, WireError::Control(_)), "{err}");
}

/// A frame with a valid crc around whatever header fields and body the test wants.
fn raw_frame(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_HEADER_LEN];
    f[0..2].copy_from_slice(b"FW");
    f[2..4].copy_from_slice(&kind.to_le_bytes());
    f[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    f[8..12].copy_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(body);
    let crc = crc32c::crc32c(&f);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    f
}

fn decode_one_raw(bytes: &[u8]) -> Result<Option<Frame>, WireError> {
    let mut dec = FrameDecoder::new();
    dec.push(bytes);
    dec.next_frame()
}

#[test]
fn each_bad_frame_has_its_reason() {
    let bad_body = |r: Result<Option<Frame>, WireError>, needle: &str| match r {
        Err(e @ WireError::BadBody { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("{needle}: {other:?}"),
    };
    assert_eq!(decode_one_raw(&raw_frame(9, 0, b"")), Err(WireError::UnknownFrameKind { seq: 0, kind: 9 }));
    assert_eq!(decode_one_raw(&raw_frame(2, 5, &[0; 8])), Err(WireError::FrameSeq { expected: 0, got: 5 }));
    assert!(matches!(decode_one_raw(b"GET / HTTP/1.1\r\n"), Err(WireError::BadFrameMagic { .. })));
    bad_body(decode_one_raw(&raw_frame(2, 0, &[0; 7])), "an ack has 8");
    bad_body(decode_one_raw(&raw_frame(4, 0, &[0; 1])), "a heartbeat has none");
    bad_body(decode_one_raw(&raw_frame(1, 0, b"")), "no records");
    bad_body(decode_one_raw(&raw_frame(1, 0, &journal_record(1, b"abc")[..70])), "record at offset 0");
    bad_body(decode_one_raw(&raw_frame(3, 0, &[1, 0, 0xFF, 0xFF])), "bincode");
    bad_body(decode_one_raw(&raw_frame(3, 0, &[2, 0, 0])), "version 2");
    bad_body(decode_one_raw(&raw_frame(3, 0, &[1, 0, 0, 0])), "left over");
    bad_body(decode_one_raw(&raw_frame(3, 0, &[1])), "no version");
}

#[test]
fn a_frame_repeated_or_skipped_is_refused() {
    let one = encode_all(&[Frame::Heartbeat]);
    let (frames, err) = decode_pieces(&[&one, &one]);
    assert_eq!(frames, [Frame::Heartbeat]);
    assert_eq!(err, Some(WireError::FrameSeq { expected: 1, got: 0 }));
}

#[test]
fn an_error_is_final() {
    let mut dec = FrameDecoder::new();
    dec.push(b"XX");
    let first = dec.next_frame().unwrap_err();
    dec.push(&encode_all(&[Frame::Heartbeat]));
    assert_eq!(dec.next_frame(), Err(first));
    assert_eq!(dec.buffered(), 0);
}

// ----- handshake -----

#[test]
fn same_key_authenticates_both_sides() {
    let k = key("correct horse battery staple");
    let (a, b) = handshake(config(Role::Primary, 1, 1, Some(k.clone())), config(Role::Target, 2, 2, Some(k)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.authenticated && b.authenticated);
    assert_eq!(a.peer.role, Role::Target);
    assert_eq!(b.peer.role, Role::Primary);
    assert_eq!((a.version, b.version), (PROTOCOL_VERSION, PROTOCOL_VERSION));
    assert_eq!((a.peer.set_id, a.peer.epoch), ([0xAB; 16], 3));
}

#[test]
fn no_key_on_either_side_connects_unauthenticated() {
    let (a, b) = handshake(config(Role::Primary, 1, 1, None), config(Role::Bunker, 2, 2, None));
    assert!(!a.unwrap().authenticated);
    assert_eq!(b.unwrap().peer.role, Role::Primary);
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let (a, b) = handshake(
        config(Role::Primary, 1, 1, Some(key("the primary's key"))),
        config(Role::Target, 2, 2, Some(key("the target's key!!"))),
    );
    assert_eq!(a, Err(WireError::BadProof));
    assert_eq!(b, Err(WireError::BadProof));
    assert!(WireError::BadProof.to_string().contains("--key files differ"));
}

#[test]
fn key_on_one_side_only_is_refused_on_both_sides() {
    let (a, b) =
        handshake(config(Role::Primary, 1, 1, Some(key("0123456789abcdef"))), config(Role::Target, 2, 2, None));
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    assert_eq!(a, WireError::PeerSentNoProof);
    assert_eq!(b, WireError::PeerRequiresKey);
    assert!(a.to_string().starts_with("peer sent no proof"), "{a}");
    assert!(b.to_string().starts_with("peer requires a key"), "{b}");
}

/// An attacker without the key, who sees the victim's proof and sends it back as its own.
#[test]
fn reflected_proof_is_refused() {
    let mut victim = Side::new(config(Role::Target, 1, 1, Some(key("0123456789abcdef"))));
    let mallory_hello = Hello { role: Role::Primary, instance_id: [7; 16], nonce: [7; 32], ..golden_hello() }.encode();
    victim.receive(&mallory_hello);
    let out = victim.hs.take_outgoing();
    assert_eq!(out.len(), HELLO_LEN + PROOF_LEN, "hello, then the proof once the peer's hello is in");
    let victims_proof = &out[HELLO_LEN..];
    victim.receive(victims_proof);
    assert_eq!(victim.outcome(), Err(WireError::BadProof));
}

/// The victim's own hello sent back to it (a loop, or an attacker mirroring the stream).
#[test]
fn reflected_hello_is_refused() {
    let mut victim = Side::new(config(Role::Target, 1, 1, Some(key("0123456789abcdef"))));
    let own = victim.hs.take_outgoing();
    victim.receive(&own);
    assert_eq!(victim.outcome(), Err(WireError::Reflected));
}

/// The classic attack on symmetric challenge–response: the attacker connects to the victim
/// (conn 1) and gets the victim to connect to it (conn 2), then sends each connection the
/// victim's hello from the other, so the victim's proof on conn 2 is exactly the one conn 1
/// expects. The proof alone cannot catch this; the instance id does.
#[test]
fn proof_relayed_between_two_connections_of_one_process_is_refused() {
    let k = key("0123456789abcdef");
    let mut conn1 = Side::new(config(Role::Target, 1, 10, Some(k.clone())));
    let mut conn2 = Side::new(config(Role::Target, 1, 20, Some(k.clone())));
    let (h1, h2) = (conn1.hs.take_outgoing(), conn2.hs.take_outgoing());
    // Why the check is needed: the proof conn 2 would send (over h2 || h1) passes conn 1's
    // check of a peer whose hello is h2.
    let conn2_proof = encode_proof(&auth_proof(&k, &h2, &h1));
    assert_eq!(verify_proof(&k, &conn2_proof, &h2, &h1), Ok(()));
    conn1.receive(&h2);
    conn2.receive(&h1);
    assert_eq!(conn1.outcome(), Err(WireError::Reflected));
    assert_eq!(conn2.outcome(), Err(WireError::Reflected));
}

/// An eavesdropper replays a target's hello and proof from an earlier connection.
#[test]
fn replayed_proof_is_refused() {
    let k = key("0123456789abcdef");
    let mut primary = Side::new(config(Role::Primary, 1, 1, Some(k.clone())));
    let mut target = Side::new(config(Role::Target, 2, 2, Some(k.clone())));
    run_pair(&mut primary, &mut target);
    assert!(primary.outcome().is_ok());
    let recorded = {
        // What the target sent: its hello, then its proof. Re-run it to capture the bytes.
        let mut t = Handshake::new(config(Role::Target, 2, 2, Some(k.clone())));
        let mut bytes = t.take_outgoing();
        t.push(&Handshake::new(config(Role::Primary, 1, 1, Some(k.clone()))).take_outgoing()).unwrap();
        bytes.extend(t.take_outgoing());
        bytes
    };
    let mut primary_again = Side::new(config(Role::Primary, 1, 3, Some(k)));
    primary_again.receive(&recorded);
    assert_eq!(primary_again.outcome(), Err(WireError::BadProof));
}

/// A man in the middle raises the target's epoch (and fixes the crc): the proof no longer
/// verifies, because it covers every byte of both hellos.
#[test]
fn tampered_hello_is_refused() {
    let k = key("0123456789abcdef");
    let mut primary = Side::new(config(Role::Primary, 1, 1, Some(k.clone())));
    let mut target = Handshake::new(config(Role::Target, 2, 2, Some(k)));
    let mut to_primary = target.take_outgoing();
    target.push(&primary.hs.take_outgoing()).unwrap();
    to_primary.extend(target.take_outgoing());
    to_primary[32] ^= 1; // epoch
    let crc = crc32c::crc32c(&to_primary[..HELLO_LEN - 4]);
    to_primary[HELLO_LEN - 4..HELLO_LEN].copy_from_slice(&crc.to_le_bytes());
    primary.receive(&to_primary);
    assert_eq!(primary.outcome(), Err(WireError::BadProof));
}

#[test]
fn proof_message_magic_is_checked() {
    let k = key("0123456789abcdef");
    let mut a = Side::new(config(Role::Primary, 1, 1, Some(k)));
    let peer = Hello { instance_id: [7; 16], nonce: [7; 32], ..golden_hello() }.encode();
    a.receive(&peer);
    a.receive(&[0u8; PROOF_LEN]);
    assert_eq!(a.outcome(), Err(WireError::BadProofMagic { got: [0; 4] }));
}

#[test]
fn handshake_leaves_the_frames_after_it() {
    let mut a = Handshake::new(config(Role::Primary, 1, 1, None));
    let mut stream = Handshake::new(config(Role::Target, 2, 2, None)).take_outgoing();
    let frames = encode_all(&sample_frames());
    stream.extend_from_slice(&frames);
    let used = a.push(&stream).unwrap();
    assert_eq!(used, HELLO_LEN);
    assert!(a.established().is_some());
    assert_eq!(a.push(&stream[used..]), Ok(0));
    assert_eq!(decode_pieces(&[&stream[used..]]).0, sample_frames());
}

// ----- versions -----

fn hello_with_version(version: Version, extra: &[u8]) -> Vec<u8> {
    let mut bytes = Hello { version, instance_id: [7; 16], nonce: [7; 32], flags: 0, ..golden_hello() }.encode()
        [..HELLO_LEN - 4]
        .to_vec();
    bytes.extend_from_slice(extra);
    let len = bytes.len() + 4;
    bytes[12..14].copy_from_slice(&(len as u16).to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn newer_major_is_refused_naming_both_versions() {
    let peer = hello_with_version(Version { major: 2, minor: 3 }, &[]);
    let mut hs = Handshake::new(config(Role::Target, 1, 1, None));
    // Refused as soon as the version is in, whatever the rest holds.
    let err = hs.push(&peer[..HELLO_PREFIX_LEN]).unwrap_err();
    assert_eq!(err, WireError::PeerVersionNewer { peer: Version { major: 2, minor: 3 }, ours: PROTOCOL_VERSION });
    let text = err.to_string();
    assert!(text.contains("2.3") && text.contains(&PROTOCOL_VERSION.to_string()) && text.contains("upgrade"), "{text}");
}

#[test]
fn older_major_is_refused_naming_both_versions() {
    let peer = hello_with_version(Version { major: 0, minor: 9 }, &[]);
    let err = Hello::decode(&peer).unwrap_err();
    assert!(matches!(err, WireError::PeerVersionOlder { .. }));
    assert!(err.to_string().contains("0.9") && err.to_string().contains(&PROTOCOL_VERSION.to_string()), "{err}");
}

#[test]
fn newer_minor_with_a_longer_hello_is_spoken_at_our_minor() {
    let peer = hello_with_version(Version { major: 1, minor: 7 }, b"future fields");
    let mut hs = Handshake::new(config(Role::Target, 1, 1, None));
    assert_eq!(hs.push(&peer), Ok(peer.len()));
    let est = hs.established().unwrap();
    assert_eq!(est.peer.version, Version { major: 1, minor: 7 });
    assert_eq!(est.version, PROTOCOL_VERSION);
}

#[test]
fn the_lower_minor_is_spoken() {
    let v = |major, minor| Version { major, minor };
    assert_eq!(negotiate(v(1, 3), v(1, 5)), v(1, 3));
    assert_eq!(negotiate(v(1, 5), v(1, 3)), v(1, 3));
    assert_eq!(negotiate(v(1, 0), v(1, 0)), v(1, 0));
}

#[test]
fn bad_hellos_have_their_reasons() {
    assert_eq!(Hello::decode(b"G"), Err(WireError::BadHelloMagic { got: b"G".to_vec() }));
    let err = Hello::decode(b"GET / HTTP/1.1\r\n").unwrap_err();
    assert!(err.to_string().contains("not a ferryfs peer"), "{err}");
    let mut bytes = golden_hello().encode();
    bytes[20] ^= 1;
    assert!(matches!(Hello::decode(&bytes), Err(WireError::HelloCrc { .. })));
    let mut short = hello_with_version(PROTOCOL_VERSION, &[]);
    short[12..14].copy_from_slice(&95u16.to_le_bytes());
    assert_eq!(Hello::decode(&short), Err(WireError::BadHelloLength(95)));
    short[12..14].copy_from_slice(&(HELLO_LEN_MAX as u16 + 1).to_le_bytes());
    assert_eq!(Hello::decode(&short), Err(WireError::BadHelloLength(HELLO_LEN_MAX + 1)));
    let mut role = golden_hello().encode();
    role[14] = 9;
    let crc = crc32c::crc32c(&role[..HELLO_LEN - 4]);
    role[HELLO_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(Hello::decode(&role), Err(WireError::UnknownRole(9)));
}

// ----- keys -----

#[test]
fn key_file_trims_the_newline_and_refuses_short_keys() {
    assert_eq!(Key::from_file_bytes(b"0123456789abcdef\n").unwrap().0, b"0123456789abcdef");
    assert_eq!(Key::from_file_bytes(b"0123456789abcdef\r\n").unwrap().0, b"0123456789abcdef");
    assert_eq!(key(" 0123456789abcdef \n").0, b" 0123456789abcdef ", "only line ends are trimmed");
    let err = Key::from_file_bytes(b"0123456789abcde\n").unwrap_err();
    assert_eq!(err, WireError::KeyTooShort { len: 15 });
    assert!(err.to_string().contains("at least 16"), "{err}");
    assert_eq!(Key::from_file_bytes(b"\n\n").unwrap_err(), WireError::KeyTooShort { len: 0 });
    assert_eq!(
        Key::from_file_bytes(&[b'k'; KEY_LEN_MAX + 1]).unwrap_err(),
        WireError::KeyTooLong { len: KEY_LEN_MAX + 1 }
    );
    assert_eq!(Key::from_file_bytes(&[b'k'; KEY_LEN_MAX]).unwrap().0.len(), KEY_LEN_MAX);
    let shown = format!("{:?}", key("a secret that must not show"));
    assert!(!shown.contains("secret"), "{shown}");
}

// ----- seeded fuzzing -----

fn random_frame(rng: &mut ChaCha8Rng, lsn: &mut u64) -> Frame {
    match rng.gen_range(0..4) {
        0 => {
            let count = rng.gen_range(1..4);
            let mut body = Vec::new();
            for _ in 0..count {
                *lsn += 1;
                let payload: Vec<u8> = (0..rng.gen_range(0..300)).map(|_| rng.r#gen()).collect();
                body.extend(journal_record(*lsn, &payload));
            }
            Frame::Records(body)
        }
        1 => Frame::Ack(Lsn(rng.r#gen())),
        2 => Frame::Control(match rng.gen_range(0..6) {
            0 => ControlMsg::StatusRequest,
            1 => ControlMsg::Status { next_lsn: rng.r#gen(), durable_lsn: rng.r#gen(), applied_lsn: rng.r#gen() },
            2 => ControlMsg::Resume { from_lsn: rng.r#gen() },
            3 => ControlMsg::Watermark { all_acked_lsn: rng.r#gen() },
            4 => ControlMsg::HigherEpoch { epoch: rng.r#gen() },
            _ => ControlMsg::Bye { reason: "r".repeat(rng.gen_range(0..100)) },
        }),
        _ => Frame::Heartbeat,
    }
}

/// Splits `bytes` at random points, including empty pieces.
fn random_split<'a>(rng: &mut ChaCha8Rng, bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.gen_range(0..=(bytes.len() - at).min(64));
        pieces.push(&bytes[at..at + n]);
        at += n;
    }
    pieces
}

#[test]
fn valid_streams_decode_the_same_however_split() {
    for seed in 0..200 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut lsn = 0;
        let frames: Vec<Frame> = (0..rng.gen_range(1..20)).map(|_| random_frame(&mut rng, &mut lsn)).collect();
        let stream = encode_all(&frames);
        for _ in 0..5 {
            let pieces = random_split(&mut rng, &stream);
            assert_eq!(decode_pieces(&pieces), (frames.clone(), None), "seed {seed}");
        }
    }
}

#[test]
fn random_bytes_never_panic_and_never_decode() {
    for seed in 0..500 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes: Vec<u8> = (0..rng.gen_range(0..2048)).map(|_| rng.r#gen()).collect();
        if rng.gen_bool(0.5) && bytes.len() >= 8 {
            // Get past the magic check, so later checks are exercised too.
            bytes[0..2].copy_from_slice(b"FW");
            bytes[4..8].copy_from_slice(&rng.gen_range(0u32..512).to_le_bytes());
        }
        let pieces = random_split(&mut rng, &bytes);
        let (frames, _) = decode_pieces(&pieces);
        assert!(frames.is_empty(), "seed {seed}: random bytes decoded to {frames:?}");
        let mut hs = Handshake::new(config(Role::Target, 1, 1, Some(key("0123456789abcdef"))));
        for p in pieces {
            if hs.push(p).is_err() {
                break;
            }
        }
        assert!(hs.established().is_none(), "seed {seed}");
    }
}

/// A stream damaged at one random byte yields the frames before the damage and then an
/// error (or a wait), never a changed frame.
#[test]
fn damaged_streams_yield_only_the_frames_before_the_damage() {
    for seed in 0..300 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut lsn = 0;
        let frames: Vec<Frame> = (0..rng.gen_range(1..10)).map(|_| random_frame(&mut rng, &mut lsn)).collect();
        let mut stream = encode_all(&frames);
        let at = rng.gen_range(0..stream.len());
        stream[at] ^= rng.gen_range(1..=255u8);
        let pieces = random_split(&mut rng, &stream);
        let (got, _) = decode_pieces(&pieces);
        let mut end = 0;
        let intact = frames.iter().take_while(|f| {
            end += encode_all(std::slice::from_ref(f)).len();
            end <= at
        });
        assert_eq!(got, intact.cloned().collect::<Vec<_>>(), "seed {seed}, byte {at}");
    }
}
