//! A blocking connection: the handshake and frames of `proto::wire` over a std `TcpStream`.
//! The primary's shipper threads use it (a thread per target, plus one reading its acks).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::proto::wire::{Established, Frame, FrameDecoder, FrameEncoder, Handshake, HandshakeConfig, WireError};

/// How long a handshake may take before the connection is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the peer closed the connection")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Refused(String),
}

/// A random id for this process, the same on all its connections (`Hello::instance_id`).
pub fn instance_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        b
    })
}

/// A fresh nonce from the operating system's generator.
pub fn nonce() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// Connects and runs the handshake; returns the two halves and the peer's hello.
pub fn connect(
    addr: SocketAddr,
    config: HandshakeConfig,
    timeout: Duration,
) -> Result<(Reader, Writer, Established), NetError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    handshake(stream, config)
}

/// Runs the handshake on a connected stream.
pub fn handshake(mut stream: TcpStream, config: HandshakeConfig) -> Result<(Reader, Writer, Established), NetError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hs = Handshake::new(config);
    let mut buf = vec![0u8; 4096];
    let mut leftover = Vec::new();
    let est = loop {
        let out = hs.take_outgoing();
        if !out.is_empty() {
            stream.write_all(&out)?;
        }
        if let Some(e) = hs.established() {
            break *e;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NetError::Timeout(HANDSHAKE_TIMEOUT));
        }
        stream.set_read_timeout(Some(left))?;
        let n = read_some(&mut stream, &mut buf, HANDSHAKE_TIMEOUT)?;
        let used = match hs.push(&buf[..n]) {
            Ok(u) => u,
            Err(e) => {
                // Our proof may be queued: the peer learns its own reason from it.
                let _ = stream.write_all(&hs.take_outgoing());
                return Err(e.into());
            }
        };
        leftover.extend_from_slice(&buf[used..n]);
    };
    // The proof may still be in the outbox once the peer's proof made us established.
    let out = hs.take_outgoing();
    if !out.is_empty() {
        stream.write_all(&out)?;
    }
    let mut dec = FrameDecoder::new();
    dec.push(&leftover);
    let reader = Reader { stream: stream.try_clone()?, dec, buf };
    Ok((reader, Writer { stream, enc: FrameEncoder::new(), out: Vec::new() }, est))
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> Result<usize, NetError> {
    match stream.read(buf) {
        Ok(0) => Err(NetError::Closed),
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(NetError::Timeout(timeout))
        }
        Err(e) => Err(e.into()),
    }
}

/// The receiving half.
pub struct Reader {
    stream: TcpStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Reader {
    /// The next frame; `Timeout` when none completes within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Frame, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetError::Timeout(timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            let n = read_some(&mut self.stream, &mut self.buf, timeout)?;
            self.dec.push(&self.buf[..n]);
        }
    }
}

/// The sending half.
pub struct Writer {
    stream: TcpStream,
    enc: FrameEncoder,
    out: Vec<u8>,
}

impl Writer {
    pub fn send(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.out.clear();
        self.enc.encode(frame, &mut self.out)?;
        self.stream.write_all(&self.out)?;
        Ok(())
    }

    /// Sends a Records frame whose body is `records` (whole journal records).
    pub fn send_records(&mut self, records: &[u8]) -> Result<(), NetError> {
        let header = self.enc.records_header(&[records])?;
        self.stream.write_all(&header)?;
        self.stream.write_all(records)?;
        Ok(())
    }

    /// Bounds how long a send may block on a peer that stopped reading.
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.stream.set_write_timeout(Some(t))
    }

    /// Closes both directions (the reader half sees the end too).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
