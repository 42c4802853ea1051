//! The wire protocol between ferryfs nodes, byte by byte in docs/PROTOCOL.md: a handshake
//! (each side's hello, then an HMAC-SHA256 proof from each side when a key is configured),
//! then frames (records, acks, control messages, heartbeats).
//!
//! Pure codecs: no sockets, no clock, no randomness of its own. The caller (`net/`) supplies
//! the nonce and the instance id, moves bytes, bounds how long each step may take, and closes
//! the connection on any error returned here, logging the error's text: every error is final
//! for its connection, and the codecs keep returning it.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::format::record::HEADER_SIZE as RECORD_HEADER_SIZE;
use crate::limits::WRITE_RECORD_DATA_MAX;
use crate::types::Lsn;

pub use control::{CONTROL_VERSION, ControlMsg};

// ---------------------------------------------------------------------------------------------
// Limits and constants

/// The first 8 bytes each side sends.
pub const HELLO_MAGIC: [u8; 8] = *b"FRYWIRE\0";
/// The protocol this build speaks. Majors must be equal; the lower minor is used.
/// 1.1 added the bunker, failover and failback messages (`LogInfo` … `DirtyMap`) and a
/// target's `LogInfo` after its `Status`; 1.2 a resync's read end (`ResyncRead`) and a
/// target's `MixedUntil` to a failover tool; 1.3 the all-acked watermark to targets
/// (`Watermark`, answered by the target's `LogInfo`); 1.4 the block-level resync of one
/// target from another (`DigestRequest` … `BlockResync`).
pub const PROTOCOL_VERSION: Version = Version { major: 1, minor: 4 };
/// The first minor with the bunker, failover and failback messages.
pub const MINOR_FAILOVER: u16 = 1;
/// The first minor with `ResyncRead` and `MixedUntil`.
pub const MINOR_RESYNC_READ: u16 = 2;
/// The first minor in which a primary sends targets the all-acked `Watermark` (claim 002:1)
/// and a target answers each with its `LogInfo`.
pub const MINOR_WATERMARK: u16 = 3;
/// The first minor in which a target serves a catch-up tool its block digests and a
/// block-level resync of a peer (`DigestRequest`, `FileDigests`, `DigestEnd`, `BlockResync`).
pub const MINOR_BLOCKS: u16 = 4;
/// Length of the hello this build sends (protocol 1.0).
pub const HELLO_LEN: usize = 96;
/// Longest hello accepted: a later 1.x may append fields before the crc, up to this.
pub const HELLO_LEN_MAX: usize = 1024;
/// Hello flag bit: this side has a key; it sends a proof and requires one.
pub const HELLO_FLAG_KEY: u8 = 0x01;
/// The auth proof message: "FRYP", 4 reserved bytes, the 32-byte HMAC-SHA256.
pub const PROOF_MAGIC: [u8; 4] = *b"FRYP";
pub const PROOF_LEN: usize = 40;
/// Domain separation for the proof; a new proof construction gets a new label.
pub const AUTH_LABEL: &[u8] = b"ferryfs-auth-v1";
/// Shortest key accepted (after the trailing newline is trimmed).
pub const KEY_LEN_MIN: usize = 16;
/// Longest key accepted: a larger file is more likely the wrong file than a key.
pub const KEY_LEN_MAX: usize = 4096;

/// "FW" on the wire: the first two bytes of every frame.
pub const FRAME_MAGIC: u16 = u16::from_le_bytes(*b"FW");
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest frame body. Checked on the header, before the body is waited for or buffered.
pub const FRAME_BODY_MAX: usize = 64 << 20;
/// Largest control frame body (the version prefix and the bincode bytes).
pub const CONTROL_BODY_MAX: usize = 256 << 10;
/// A Data frame's body starts with the file id and the offset (two u64).
pub const DATA_HEAD_LEN: usize = 16;

/// Bytes of the hello that say how to read the rest: magic, version, length.
const HELLO_PREFIX_LEN: usize = 14;
const FRAME_CRC_OFFSET: usize = 12;

// The largest journal record (a full write chunk) must fit in one Records frame.
const _: () = assert!(FRAME_BODY_MAX >= (RECORD_HEADER_SIZE + 16 + WRITE_RECORD_DATA_MAX).next_multiple_of(8));
const _: () = assert!(FRAME_BODY_MAX <= u32::MAX as usize);
const _: () = assert!(CONTROL_BODY_MAX <= FRAME_BODY_MAX);
const _: () = assert!(HELLO_PREFIX_LEN <= HELLO_LEN && HELLO_LEN <= HELLO_LEN_MAX);

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a connection must close. The text is the log line: it names what was wrong and, where
/// an operator can act, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "not a ferryfs peer: its first bytes are {got:02x?}, expected \"FRYWIRE\\0\" \
         (is something else listening on that port?)"
    )]
    BadHelloMagic { got: Vec<u8> },
    #[error("peer speaks wire protocol {peer}, newer than this build's {ours}: upgrade ferryfs on this node")]
    PeerVersionNewer { peer: Version, ours: Version },
    #[error("peer speaks wire protocol {peer}, older than this build's {ours}: upgrade ferryfs on the peer")]
    PeerVersionOlder { peer: Version, ours: Version },
    #[error("peer's hello claims {0} bytes; a protocol 1 hello has {HELLO_LEN} to {HELLO_LEN_MAX}")]
    BadHelloLength(usize),
    #[error("peer's hello fails its crc: stored {stored:#010x}, computed {computed:#010x} (damaged in transit)")]
    HelloCrc { stored: u32, computed: u32 },
    #[error("peer's hello names unknown role {0}")]
    UnknownRole(u8),
    #[error(
        "connection reflected or looped back: the peer's hello carries this process's own \
         instance id or nonce; check the peer address"
    )]
    Reflected,
    #[error(
        "peer requires a key: it was started with --key and this node without; give both sides \
         the same --key FILE"
    )]
    PeerRequiresKey,
    #[error(
        "peer sent no proof: this node has a --key and the peer has none configured; give both \
         sides the same --key FILE"
    )]
    PeerSentNoProof,
    #[error("peer's auth proof starts with {got:02x?}, expected \"FRYP\"")]
    BadProofMagic { got: [u8; 4] },
    #[error(
        "peer's auth proof does not verify: the two sides' --key files differ (or the proof was \
         replayed or reflected); give both sides the same --key FILE"
    )]
    BadProof,
    #[error(
        "key file holds {len} bytes after trimming the newline; a key needs at least {KEY_LEN_MIN} \
         (make one with: head -c 32 /dev/urandom | base64 > FILE)"
    )]
    KeyTooShort { len: usize },
    #[error("key file holds {len} bytes, more than a key's {KEY_LEN_MAX}: is --key naming the right file?")]
    KeyTooLong { len: usize },
    #[error("frame {seq}: bad magic {got:#06x}, expected {FRAME_MAGIC:#06x}: the stream is out of step")]
    BadFrameMagic { seq: u32, got: u16 },
    #[error("frame {seq}: body of {len} bytes is over the limit of {max}")]
    FrameTooLong { seq: u32, len: u64, max: usize },
    #[error("frame {seq}: crc mismatch: stored {stored:#010x}, computed {computed:#010x} (damaged in transit)")]
    FrameCrc { seq: u32, stored: u32, computed: u32 },
    #[error("frame {expected}: carries sequence number {got}: a frame was lost, repeated or reordered")]
    FrameSeq { expected: u32, got: u32 },
    #[error("frame {seq}: unknown kind {kind} (sent by a newer peer?)")]
    UnknownFrameKind { seq: u32, kind: u16 },
    #[error("frame {seq} ({kind}): {reason}")]
    BadBody { seq: u32, kind: &'static str, reason: String },
    #[error("records body: {0}")]
    RecordFraming(String),
    #[error("control message: {0}")]
    Control(String),
}

// ---------------------------------------------------------------------------------------------
// Hello

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the sender of a hello is. Which pairs may talk is the caller's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    Primary = 1,
    Target = 2,
    Bunker = 3,
    FailoverTool = 4,
    CatchupPeer = 5,
}

impl Role {
    pub fn from_u8(v: u8) -> Option<Role> {
        Some(match v {
            1 => Role::Primary,
            2 => Role::Target,
            3 => Role::Bunker,
            4 => Role::FailoverTool,
            5 => Role::CatchupPeer,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Target => "target",
            Role::Bunker => "bunker",
            Role::FailoverTool => "failover tool",
            Role::CatchupPeer => "catch-up peer",
        }
    }
}

/// The first message of each side (docs/PROTOCOL.md, "Hello").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: Version,
    pub role: Role,
    /// `HELLO_FLAG_KEY`; other bits are reserved for later minors, sent as zero, ignored.
    pub flags: u8,
    pub set_id: [u8; 16],
    pub epoch: u64,
    /// Random per process (the same for all its connections): a hello carrying the receiver's
    /// own instance id was reflected or looped back, and is refused.
    pub instance_id: [u8; 16],
    /// Random per connection, from a cryptographic generator: makes every proof fresh.
    pub nonce: [u8; 32],
}

impl Hello {
    pub fn has_key(&self) -> bool {
        self.flags & HELLO_FLAG_KEY != 0
    }

    /// The protocol 1.0 layout: 96 bytes, crc32c in the last 4.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..8].copy_from_slice(&HELLO_MAGIC);
        out[8..10].copy_from_slice(&self.version.major.to_le_bytes());
        out[10..12].copy_from_slice(&self.version.minor.to_le_bytes());
        out[12..14].copy_from_slice(&(HELLO_LEN as u16).to_le_bytes());
        out[14] = self.role as u8;
        out[15] = self.flags;
        out[16..32].copy_from_slice(&self.set_id);
        out[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        out[40..56].copy_from_slice(&self.instance_id);
        out[56..88].copy_from_slice(&self.nonce);
        // 88..92 reserved, zero.
        let crc = crc32c::crc32c(&out[..HELLO_LEN - 4]);
        out[HELLO_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a hello from the start of `buf`: `Ok(None)` while incomplete, else the hello and
    /// its length. Refuses as early as it can: a wrong magic on the first byte, a different
    /// major version as soon as it has arrived (the layout of another major is unknown, so
    /// the version is believed before the crc).
    pub fn decode(buf: &[u8]) -> Result<Option<(Hello, usize)>, WireError> {
        let seen = buf.len().min(HELLO_MAGIC.len());
        if buf[..seen] != HELLO_MAGIC[..seen] {
            return Err(WireError::BadHelloMagic { got: buf[..seen].to_vec() });
        }
        if buf.len() < HELLO_PREFIX_LEN {
            return Ok(None);
        }
        let version = Version { major: le_u16(buf, 8), minor: le_u16(buf, 10) };
        check_major(version)?;
        let len = le_u16(buf, 12) as usize;
        if !(HELLO_LEN..=HELLO_LEN_MAX).contains(&len) {
            return Err(WireError::BadHelloLength(len));
        }
        if buf.len() < len {
            return Ok(None);
        }
        let stored = le_u32(buf, len - 4);
        let computed = crc32c::crc32c(&buf[..len - 4]);
        if stored != computed {
            return Err(WireError::HelloCrc { stored, computed });
        }
        let role = Role::from_u8(buf[14]).ok_or(WireError::UnknownRole(buf[14]))?;
        let hello = Hello {
            version,
            role,
            flags: buf[15],
            set_id: buf[16..32].try_into().unwrap(),
            epoch: le_u64(buf, 32),
            instance_id: buf[40..56].try_into().unwrap(),
            nonce: buf[56..88].try_into().unwrap(),
        };
        Ok(Some((hello, len)))
    }
}

fn check_major(peer: Version) -> Result<(), WireError> {
    let ours = PROTOCOL_VERSION;
    match peer.major.cmp(&ours.major) {
        std::cmp::Ordering::Greater => Err(WireError::PeerVersionNewer { peer, ours }),
        std::cmp::Ordering::Less => Err(WireError::PeerVersionOlder { peer, ours }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// The version both sides then speak, once the majors are known to be equal: the lower minor.
fn negotiate(ours: Version, peer: Version) -> Version {
    debug_assert_eq!(ours.major, peer.major);
    Version { major: ours.major, minor: peer.minor.min(ours.minor) }
}

// ---------------------------------------------------------------------------------------------
// Key and proof

/// A shared secret for the handshake. Its bytes never appear in `Debug` output, and it has no
/// `PartialEq`: a key is only ever compared through the HMAC, in constant time.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    /// The contents of a `--key FILE`, used as they are except for trailing line ends (`\n`,
    /// `\r\n`), so `echo secret > FILE` and an editor's final newline give the same key.
    pub fn from_file_bytes(contents: &[u8]) -> Result<Key, WireError> {
        let mut end = contents.len();
        while end > 0 && matches!(contents[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        if end < KEY_LEN_MIN {
            return Err(WireError::KeyTooShort { len: end });
        }
        if end > KEY_LEN_MAX {
            return Err(WireError::KeyTooLong { len: end });
        }
        Ok(Key(contents[..end].to_vec()))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} bytes, redacted>)", self.0.len())
    }
}

type HmacSha256 = Hmac<Sha256>;

fn proof_mac(key: &Key, prover_hello: &[u8], verifier_hello: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&key.0).expect("HMAC takes a key of any length");
    mac.update(AUTH_LABEL);
    mac.update(prover_hello);
    mac.update(verifier_hello);
    mac
}

/// HMAC-SHA256(key, AUTH_LABEL || prover's hello || verifier's hello), the hellos exactly as
/// sent. Each hello carries its sender's role, nonce, set id, epoch and instance id, so the
/// proof is bound to both nonces (no replay), to its direction (a reflected proof has the
/// hellos the other way round) and to every field of both hellos (no tampering).
pub fn auth_proof(key: &Key, prover_hello: &[u8], verifier_hello: &[u8]) -> [u8; 32] {
    proof_mac(key, prover_hello, verifier_hello).finalize().into_bytes().into()
}

/// The 40-byte proof message: magic, 4 reserved zero bytes, the HMAC.
pub fn encode_proof(proof: &[u8; 32]) -> [u8; PROOF_LEN] {
    let mut out = [0u8; PROOF_LEN];
    out[0..4].copy_from_slice(&PROOF_MAGIC);
    out[8..40].copy_from_slice(proof);
    out
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// What this side says about itself, and its key if it has one.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    pub role: Role,
    pub set_id: [u8; 16],
    pub epoch: u64,
    /// Random per process, the same for all its connections.
    pub instance_id: [u8; 16],
    /// Random per connection, from a cryptographic generator (`rand::rngs::OsRng`).
    pub nonce: [u8; 32],
    pub key: Option<Key>,
}

/// The outcome of a completed handshake. The set id and epoch checks (design §3) are the
/// caller's: it has the peer's hello here, authenticated when `authenticated` is true.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Established {
    pub peer: Hello,
    /// The version both sides speak from now on.
    pub version: Version,
    /// Both sides proved knowledge of the shared key.
    pub authenticated: bool,
}

#[derive(Debug)]
enum HandshakeState {
    AwaitHello,
    AwaitProof { peer_hello: Vec<u8>, established: Established },
    Done(Established),
    Failed(WireError),
}

/// The handshake of one connection, the same on both sides: send the hello, read the peer's;
/// with keys on both sides, send the proof, read and verify the peer's. Neither side waits for
/// the other before sending, so there is no ordering to get wrong.
///
/// Drive it with `take_outgoing` (send those bytes) and `push` (bytes read from the peer)
/// until `established` returns `Some`. `push` consumes no byte past the handshake: what it
/// leaves belongs to the frame stream.
#[derive(Debug)]
pub struct Handshake {
    key: Option<Key>,
    own: Hello,
    own_bytes: [u8; HELLO_LEN],
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    state: HandshakeState,
}

impl Handshake {
    pub fn new(config: HandshakeConfig) -> Handshake {
        let own = Hello {
            version: PROTOCOL_VERSION,
            role: config.role,
            flags: if config.key.is_some() { HELLO_FLAG_KEY } else { 0 },
            set_id: config.set_id,
            epoch: config.epoch,
            instance_id: config.instance_id,
            nonce: config.nonce,
        };
        let own_bytes = own.encode();
        Handshake {
            key: config.key,
            own,
            own_bytes,
            inbox: Vec::with_capacity(HELLO_LEN),
            outbox: own_bytes.to_vec(),
            state: HandshakeState::AwaitHello,
        }
    }

    /// This side's hello.
    pub fn hello(&self) -> &Hello {
        &self.own
    }

    /// Bytes to send to the peer now (the hello at first, the proof once the peer's hello is in).
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outbox)
    }

    /// Set once the handshake completed; from then on the connection carries frames.
    pub fn established(&self) -> Option<&Established> {
        match &self.state {
            HandshakeState::Done(e) => Some(e),
            _ => None,
        }
    }

    /// Feeds bytes read from the peer; returns how many belong to the handshake. After an error
    /// every call returns the same error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, WireError> {
        let mut used = 0;
        loop {
            let want = match &self.state {
                HandshakeState::Done(_) => return Ok(used),
                HandshakeState::Failed(e) => return Err(e.clone()),
                HandshakeState::AwaitHello => self.hello_bytes_wanted(),
                HandshakeState::AwaitProof { .. } => PROOF_LEN - self.inbox.len(),
            };
            if used == bytes.len() {
                return Ok(used);
            }
            let take = want.min(bytes.len() - used);
            self.inbox.extend_from_slice(&bytes[used..used + take]);
            used += take;
            if let Err(e) = self.step() {
                self.state = HandshakeState::Failed(e.clone());
                self.inbox = Vec::new();
                return Err(e);
            }
        }
    }

    /// How many more bytes could complete the peer's hello: the fixed prefix first, then the
    /// length it states. Never 0 while waiting (`step` has refused or accepted by then).
    fn hello_bytes_wanted(&self) -> usize {
        let have = self.inbox.len();
        if have < HELLO_PREFIX_LEN {
            return HELLO_PREFIX_LEN - have;
        }
        let len = le_u16(&self.inbox, 12) as usize;
        len.saturating_sub(have).max(1)
    }

    fn step(&mut self) -> Result<(), WireError> {
        match &self.state {
            HandshakeState::AwaitHello => {
                if let Some((peer, len)) = Hello::decode(&self.inbox)? {
                    debug_assert_eq!(len, self.inbox.len(), "push takes no byte past the hello");
                    let peer_hello = std::mem::take(&mut self.inbox);
                    self.on_peer_hello(peer, peer_hello)?;
                }
            }
            HandshakeState::AwaitProof { peer_hello, established } => {
                if self.inbox.len() == PROOF_LEN {
                    let key = self.key.as_ref().expect("a proof is awaited only with a key");
                    verify_proof(key, &self.inbox, peer_hello, &self.own_bytes)?;
                    self.state = HandshakeState::Done(*established);
                    self.inbox = Vec::new();
                }
            }
            HandshakeState::Done(_) | HandshakeState::Failed(_) => unreachable!("push returns first"),
        }
        Ok(())
    }

    fn on_peer_hello(&mut self, peer: Hello, peer_hello: Vec<u8>) -> Result<(), WireError> {
        if peer.instance_id == self.own.instance_id || peer.nonce == self.own.nonce {
            return Err(WireError::Reflected);
        }
        let version = negotiate(PROTOCOL_VERSION, peer.version);
        match (&self.key, peer.has_key()) {
            (Some(_), false) => Err(WireError::PeerSentNoProof),
            (None, true) => Err(WireError::PeerRequiresKey),
            (None, false) => {
                self.state = HandshakeState::Done(Established { peer, version, authenticated: false });
                Ok(())
            }
            (Some(key), true) => {
                let proof = auth_proof(key, &self.own_bytes, &peer_hello);
                self.outbox.extend_from_slice(&encode_proof(&proof));
                let established = Established { peer, version, authenticated: true };
                self.state = HandshakeState::AwaitProof { peer_hello, established };
                Ok(())
            }
        }
    }
}

/// Checks the peer's proof message in constant time (`verify_slice`).
fn verify_proof(key: &Key, message: &[u8], peer_hello: &[u8], own_hello: &[u8]) -> Result<(), WireError> {
    let magic: [u8; 4] = message[0..4].try_into().unwrap();
    if magic != PROOF_MAGIC {
        return Err(WireError::BadProofMagic { got: magic });
    }
    proof_mac(key, peer_hello, own_hello).verify_slice(&message[8..PROOF_LEN]).map_err(|_| WireError::BadProof)
}

// ---------------------------------------------------------------------------------------------
// Frames

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    Records = 1,
    Ack = 2,
    Control = 3,
    Heartbeat = 4,
    Data = 5,
}

impl FrameKind {
    pub fn from_u16(v: u16) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Records,
            2 => FrameKind::Ack,
            3 => FrameKind::Control,
            4 => FrameKind::Heartbeat,
            5 => FrameKind::Data,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Records => "records",
            FrameKind::Ack => "ack",
            FrameKind::Control => "control",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::Data => "data",
        }
    }
}

/// One frame after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// One or more whole journal records, exactly as in the journal (padding included).
    Records(Vec<u8>),
    /// The receiver holds every record up to and including this LSN durably.
    Ack(Lsn),
    Control(ControlMsg),
    /// "Still here"; no body.
    Heartbeat,
    /// A resync's contents: `data` is the current content of `file` at `offset` (raw bytes).
    Data {
        file: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Records(_) => FrameKind::Records,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Control(_) => FrameKind::Control,
            Frame::Heartbeat => FrameKind::Heartbeat,
            Frame::Data { .. } => FrameKind::Data,
        }
    }
}

/// Splits a Records body into its records by their headers' `payload_len` (offset 24) and the
/// journal's alignment, and nothing else: magic, crc, LSN and set id are the receiving
/// journal's to check.
pub fn split_records(body: &[u8]) -> RecordSplit<'_> {
    RecordSplit { body, at: 0 }
}

pub struct RecordSplit<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Iterator for RecordSplit<'a> {
    type Item = Result<&'a [u8], WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.body[self.at..];
        if rest.is_empty() {
            return None;
        }
        let at = self.at;
        let fail = |reason: String| Some(Err(WireError::RecordFraming(format!("record at offset {at}: {reason}"))));
        if rest.len() < RECORD_HEADER_SIZE {
            self.at = self.body.len();
            return fail(format!("{} bytes left, a record header needs {RECORD_HEADER_SIZE}", rest.len()));
        }
        let payload_len = le_u32(rest, 24) as u64;
        let len = (RECORD_HEADER_SIZE as u64 + payload_len).next_multiple_of(8);
        if len > rest.len() as u64 {
            self.at = self.body.len();
            return fail(format!("claims {len} bytes, {} left in the frame", rest.len()));
        }
        self.at += len as usize;
        Some(Ok(&rest[..len as usize]))
    }
}

/// Encodes frames for one direction of one connection; numbers them from 0.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    next_seq: u32,
}

impl FrameEncoder {
    pub fn new() -> FrameEncoder {
        FrameEncoder::default()
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
        match frame {
            Frame::Records(body) => {
                let header = self.records_header(&[body])?;
                out.extend_from_slice(&header);
                out.extend_from_slice(body);
            }
            Frame::Ack(lsn) => self.encode_plain(FrameKind::Ack, &lsn.0.to_le_bytes(), out)?,
            Frame::Control(msg) => self.encode_plain(FrameKind::Control, &control::encode(msg)?, out)?,
            Frame::Heartbeat => self.encode_plain(FrameKind::Heartbeat, &[], out)?,
            Frame::Data { file, offset, data } => {
                let mut head = [0u8; DATA_HEAD_LEN];
                head[..8].copy_from_slice(&file.to_le_bytes());
                head[8..].copy_from_slice(&offset.to_le_bytes());
                let header = self.header(FrameKind::Data, &[&head, data])?;
                out.extend_from_slice(&header);
                out.extend_from_slice(&head);
                out.extend_from_slice(data);
            }
        }
        Ok(())
    }

    /// The header of a Records frame whose body is `pieces` one after another, so the caller
    /// can send the header and then the records straight from the journal mapping (a gathered
    /// write, no copy). Each piece must hold whole records.
    pub fn records_header(&mut self, pieces: &[&[u8]]) -> Result<[u8; FRAME_HEADER_LEN], WireError> {
        for piece in pieces {
            for record in split_records(piece) {
                record?;
            }
        }
        if pieces.iter().all(|p| p.is_empty()) {
            return Err(WireError::RecordFraming("a records frame needs at least one record".into()));
        }
        self.header(FrameKind::Records, pieces)
    }

    fn encode_plain(&mut self, kind: FrameKind, body: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let header = self.header(kind, &[body])?;
        out.extend_from_slice(&header);
        out.extend_from_slice(body);
        Ok(())
    }

    fn header(&mut self, kind: FrameKind, pieces: &[&[u8]]) -> Result<[u8; FRAME_HEADER_LEN], WireError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        if len > FRAME_BODY_MAX {
            return Err(WireError::FrameTooLong { seq: self.next_seq, len: len as u64, max: FRAME_BODY_MAX });
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        header[2..4].copy_from_slice(&(kind as u16).to_le_bytes());
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        header[8..12].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = pieces.iter().fold(crc32c::crc32c(&header), |crc, p| crc32c::crc32c_append(crc, p));
        header[FRAME_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(header)
    }
}

/// Decodes the frames of one direction of one connection from bytes pushed in any pieces.
/// Never panics on any input. An error is final: the stream is out of step after it, so every
/// later call returns the same error and the caller closes the connection, logging it.
///
/// Memory: the decoder holds what was pushed and not yet decoded. A header's length is checked
/// against the limit as soon as the header is in, and nothing is reserved for a body before
/// its bytes arrive; so a caller that calls `next_frame` until `Ok(None)` after each push of at
/// most `n` bytes holds at most `FRAME_HEADER_LEN + body_max + n` bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    next_seq: u32,
    body_max: usize,
    failed: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_body_max(FRAME_BODY_MAX)
    }

    /// A decoder that refuses bodies over `body_max` (at most `FRAME_BODY_MAX`), for a receiver
    /// with less memory to spare.
    pub fn with_body_max(body_max: usize) -> FrameDecoder {
        FrameDecoder { buf: Vec::new(), start: 0, next_seq: 0, body_max: body_max.min(FRAME_BODY_MAX), failed: None }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode_one() {
            Ok(Some((frame, len))) => {
                self.start += len;
                self.next_seq = self.next_seq.wrapping_add(1);
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }

    /// Checks in this order: magic, length (before the body is waited for), crc, sequence
    /// number, kind, body. So damage anywhere in a whole frame reads as a crc mismatch, and an
    /// unknown kind or a bad body with a good crc is a peer's mistake, not the network's.
    fn decode_one(&self) -> Result<Option<(Frame, usize)>, WireError> {
        let seq = self.next_seq;
        let avail = &self.buf[self.start..];
        let magic = FRAME_MAGIC.to_le_bytes();
        let seen = avail.len().min(2);
        if avail[..seen] != magic[..seen] {
            let got = if seen == 2 { le_u16(avail, 0) } else { avail[0] as u16 };
            return Err(WireError::BadFrameMagic { seq, got });
        }
        if avail.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = le_u32(avail, 4) as usize;
        if len > self.body_max {
            return Err(WireError::FrameTooLong { seq, len: len as u64, max: self.body_max });
        }
        let total = FRAME_HEADER_LEN + len;
        if avail.len() < total {
            return Ok(None);
        }
        let stored = le_u32(avail, FRAME_CRC_OFFSET);
        let mut header: [u8; FRAME_HEADER_LEN] = avail[..FRAME_HEADER_LEN].try_into().unwrap();
        header[FRAME_CRC_OFFSET..].fill(0);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), &avail[FRAME_HEADER_LEN..total]);
        if stored != computed {
            return Err(WireError::FrameCrc { seq, stored, computed });
        }
        let got = le_u32(avail, 8);
        if got != seq {
            return Err(WireError::FrameSeq { expected: seq, got });
        }
        let kind_raw = le_u16(avail, 2);
        let kind = FrameKind::from_u16(kind_raw).ok_or(WireError::UnknownFrameKind { seq, kind: kind_raw })?;
        let frame = decode_body(kind, &avail[FRAME_HEADER_LEN..total]).map_err(|reason| WireError::BadBody {
            seq,
            kind: kind.name(),
            reason,
        })?;
        Ok(Some((frame, total)))
    }
}

fn decode_body(kind: FrameKind, body: &[u8]) -> Result<Frame, String> {
    match kind {
        FrameKind::Records => {
            if body.is_empty() {
                return Err("no records".into());
            }
            for record in split_records(body) {
                record.map_err(|e| e.to_string())?;
            }
            Ok(Frame::Records(body.to_vec()))
        }
        FrameKind::Ack => {
            let lsn: [u8; 8] = body.try_into().map_err(|_| format!("body of {} bytes, an ack has 8", body.len()))?;
            Ok(Frame::Ack(Lsn(u64::from_le_bytes(lsn))))
        }
        FrameKind::Control => control::decode(body).map(Frame::Control).map_err(|e| e.to_string()),
        FrameKind::Data => {
            if body.len() < DATA_HEAD_LEN {
                return Err(format!(
                    "body of {} bytes, a data frame needs {DATA_HEAD_LEN} before its bytes",
                    body.len()
                ));
            }
            let (file, offset) = (le_u64(body, 0), le_u64(body, 8));
            offset
                .checked_add((body.len() - DATA_HEAD_LEN) as u64)
                .ok_or_else(|| format!("data at offset {offset} runs past the largest file offset"))?;
            Ok(Frame::Data { file, offset, data: body[DATA_HEAD_LEN..].to_vec() })
        }
        FrameKind::Heartbeat => {
            if !body.is_empty() {
                return Err(format!("body of {} bytes, a heartbeat has none", body.len()));
            }
            Ok(Frame::Heartbeat)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Control messages

/// Control messages, the only bincode on the wire. All bincode use is in this module, so
/// replacing bincode (2.0.1 is unmaintained; 3.0 does not build) changes only this module.
///
/// A control body is a `u16` little-endian `CONTROL_VERSION`, outside bincode so it stays
/// readable whatever the encoding becomes, then the `ControlMsg` in bincode 2's standard
/// configuration (little endian, variable-length integers) with a decode limit of
/// `CONTROL_BODY_MAX` bytes.
pub mod control {
    use bincode::config::{Configuration, LittleEndian, Varint};
    use serde::{Deserialize, Serialize};

    use super::{CONTROL_BODY_MAX, WireError};

    /// The layout of `ControlMsg`. Variants are only ever appended (a later minor version may
    /// send them once negotiated); changing one needs a new control version.
    pub const CONTROL_VERSION: u16 = 1;

    /// The variant order is the wire encoding (bincode writes the variant index): append only.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ControlMsg {
        /// "Send me your Status."
        StatusRequest,
        /// Where the sender stands: the next LSN it expects, the last it holds durably, the last
        /// it has applied to its directory.
        Status { next_lsn: u64, durable_lsn: u64, applied_lsn: u64 },
        /// Receiver to sender after the handshake: send records from this LSN on.
        Resume { from_lsn: u64 },
        /// Primary to targets: every target holds every record up to this LSN (claim 002:1),
        /// so a target may free its log up to it.
        Watermark { all_acked_lsn: u64 },
        /// "I am at a higher epoch than you": the receiver stops shipping and says why (§3).
        HigherEpoch { epoch: u64 },
        /// The sender closes the connection on purpose; the receiver logs the reason.
        Bye { reason: String },
        /// Primary to target: every transaction with an id below `settled_below` has ended,
        /// and all their records lie below `records_below`; once the target holds those, it
        /// may apply them (docs/PROTOCOL.md, "Replication").
        Settled { settled_below: u64, records_below: u64 },
        /// Primary to target: a resync (000:13) follows; the target stages it and, when it is
        /// complete, applies it and continues its log at `resume_lsn`.
        ResyncBegin { plan: u64, resume_lsn: u64, full: bool },
        /// The names of directory `dir`, each with the object it names. A long directory comes
        /// in several messages; the last has `last` set. Then the target's directory holds
        /// exactly these names.
        ResyncEntries { dir: u64, entries: Vec<(Vec<u8>, NodeDesc)>, last: bool },
        /// An object's attributes (size, mode, owner, times, xattrs) as they are now.
        ResyncNode { node: NodeDesc },
        /// The resync `plan` is complete (its Data frames and messages all sent).
        ResyncEnd { plan: u64 },
        /// Target to primary: resync `plan` is applied and durable, the log continues at its
        /// `resume_lsn`.
        ResyncDone { plan: u64 },
        /// A node's log as it stands (docs/PROTOCOL.md, "Bunker and failover"): its replication
        /// epoch, the oldest LSN it still holds, the next it expects, the next it would apply
        /// (a bunker applies nothing: equal to `next_lsn`), whether a primary is connected to
        /// it now, whether it was promoted by a failover, and whether it is an old primary
        /// waiting to fail back (`ferryfs failback`). A target sends it after `Status`; a
        /// bunker and a target send it first to a failover tool, and after each `Fence` and
        /// `Promote`.
        LogInfo {
            epoch: u64,
            start_lsn: u64,
            next_lsn: u64,
            applied_next: u64,
            primary_connected: bool,
            promoted: bool,
            failback: bool,
        },
        /// Failover tool to bunker: send your records from `from_lsn` to your end, then
        /// `ReadEnd`.
        ReadLog { from_lsn: u64 },
        /// Bunker to failover tool: every record it holds below `next_lsn` has been sent.
        ReadEnd { next_lsn: u64 },
        /// Failover tool to bunker or target: from now on refuse every primary of a lower
        /// epoch than `epoch` (persisted before the reply, a `LogInfo`).
        Fence { epoch: u64 },
        /// Failover tool to target: the log now holds every record below `end_lsn`; apply them
        /// all (transactions without an outcome by the failover rule), become the primary of
        /// `epoch`, reply `LogInfo` once durable.
        Promote { epoch: u64, end_lsn: u64 },
        /// A node of a higher epoch to a primary of a lower one, before it closes: a failover
        /// promoted a target at `epoch`; histories agree below `fork_lsn` (0: unknown).
        Fenced { epoch: u64, fork_lsn: u64 },
        /// Primary to bunker: your log cannot continue from where it ends (it is new, or it
        /// fell behind what the primary's journal holds): restart it at `lsn`.
        RestartAt { lsn: u64 },
        /// New primary to an old primary waiting to fail back: our histories agree below
        /// `fork_lsn`; send the locations you changed from there on (`DirtyMap`).
        ForkPoint { fork_lsn: u64 },
        /// Failback target to new primary: a piece of the encoded sync map of the locations it
        /// changed past the fork (`syncmap::encode`); the last piece has `last` set.
        DirtyMap { chunk: Vec<u8>, last: bool },
        /// Primary to target, just before `ResyncEnd` (1.2): resync `plan` read the primary's
        /// tree while records up to `read_end_lsn` were being applied to it, so once staged
        /// the target's directory shows a mix of states from the resync's `resume_lsn` to
        /// here; it is the primary's tree at one LSN again only once its log is applied up
        /// to `read_end_lsn` (docs/PROTOCOL.md, "A resync's read end").
        ResyncRead { plan: u64, read_end_lsn: u64 },
        /// Target to failover tool, right after its first `LogInfo` (1.2): its directory shows
        /// a mix of states until its log is applied below `lsn` (a resync's read end); 0 when
        /// it shows the primary's tree at one LSN.
        MixedUntil { lsn: u64 },
        /// Catch-up tool to target (1.3): your log holds every record below `end_lsn`; apply
        /// them all (transactions without an outcome by the failover rule), checkpoint, reply
        /// `LogInfo`. A target also serves `ReadLog` (answered as a bunker does) to the tool.
        ApplyLog { end_lsn: u64 },
        /// Catch-up tool to a target behind every log (1.4): send the digest of every block
        /// of every regular file of your directory (`FileDigests`…, then `DigestEnd`).
        DigestRequest,
        /// A target's digests of file `file` (the primary's id), `DIGEST_LEN` bytes per
        /// `DIGEST_BLOCK` bytes of its contents from block `first_block` on, in order
        /// (`replica::blocks`). A long file comes in several messages.
        FileDigests { file: u64, first_block: u64, digests: Vec<u8> },
        /// The last of a digest stream: how many files and blocks it described.
        DigestEnd { files: u64, blocks: u64 },
        /// Catch-up tool to the most advanced target (1.4): the digests of a peer follow
        /// (`FileDigests`…, `DigestEnd`); answer with a resync of that peer, `plan`, to be
        /// resumed at `resume_lsn` (`ResyncBegin` … `ResyncEnd`, as a primary sends one),
        /// whose `Data` holds only the blocks whose digests differ from the peer's.
        BlockResync { plan: u64, resume_lsn: u64 },
        /// Failover or catch-up tool to a target, before it sends the records below
        /// `below_lsn` (1.4): every transaction among them that aborts (in parts, the last
        /// with `last` set). The target may then apply them as they land, by the failover
        /// rule, instead of only at the end.
        Aborts { below_lsn: u64, txids: Vec<u64>, last: bool },
    }

    /// An object as a resync describes it (the primary's file id; the rest as `stat` says).
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct NodeDesc {
        pub id: u64,
        /// `NodeKind` as u8.
        pub kind: u8,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub rdev: u64,
        pub size: u64,
        pub atime: (i64, u32),
        pub mtime: (i64, u32),
        /// A symlink's target.
        pub target: Vec<u8>,
        /// Every extended attribute but ferryfs's own (`trusted.ferryfs.*`).
        pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    type Config = Configuration<LittleEndian, Varint, bincode::config::Limit<CONTROL_BODY_MAX>>;

    /// `bincode::config::standard()` is little endian with variable-length integers already;
    /// spelled out so a change of bincode's defaults cannot change the wire.
    const CONFIG: Config =
        bincode::config::standard().with_little_endian().with_variable_int_encoding().with_limit::<CONTROL_BODY_MAX>();

    /// The body of a control frame.
    pub fn encode(msg: &ControlMsg) -> Result<Vec<u8>, WireError> {
        let mut body = CONTROL_VERSION.to_le_bytes().to_vec();
        let encoded = bincode::serde::encode_to_vec(msg, CONFIG).map_err(|e| WireError::Control(e.to_string()))?;
        body.extend_from_slice(&encoded);
        if body.len() > CONTROL_BODY_MAX {
            return Err(WireError::Control(format!("{} bytes, over the limit of {CONTROL_BODY_MAX}", body.len())));
        }
        Ok(body)
    }

    pub fn decode(body: &[u8]) -> Result<ControlMsg, WireError> {
        if body.len() > CONTROL_BODY_MAX {
            return Err(WireError::Control(format!("{} bytes, over the limit of {CONTROL_BODY_MAX}", body.len())));
        }
        let Some((version, rest)) = body.split_first_chunk::<2>() else {
            return Err(WireError::Control(format!("body of {} bytes has no version", body.len())));
        };
        let version = u16::from_le_bytes(*version);
        if version != CONTROL_VERSION {
            return Err(WireError::Control(format!("version {version}, this build reads {CONTROL_VERSION}")));
        }
        let (msg, used) = bincode::serde::decode_from_slice::<ControlMsg, _>(rest, CONFIG)
            .map_err(|e| WireError::Control(format!("bincode: {e}")))?;
        if used != rest.len() {
            return Err(WireError::Control(format!("{} bytes left over after the message", rest.len() - used)));
        }
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------------------------
// Little-endian reads at offsets the caller has checked.

fn le_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().unwrap())
}

fn le_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
}

fn le_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests;
