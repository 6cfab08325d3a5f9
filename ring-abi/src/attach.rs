//! Attaching an engine: the Unix-socket handshake that hands it the region and the
//! doorbells — the userspace stand-in for opening a device and mmapping it.
//!
//! Both halves speak it: kshim calls [`listen`], [`accept`], [`send_hello`] and
//! [`recv_small`]; the engine calls [`connect`] and answers through [`Attachment`].
//! It lives in the ABI crate beside the region it hands over, so the engine needs
//! nothing from kshim.
//!
//! kshim listens on a `SOCK_SEQPACKET` Unix socket (message boundaries kept) at the
//! path in its config. One engine at a time connects; the socket stays open for the
//! whole session, and either side closing it (or dying) is how the other learns the
//! session is over.
//!
//! # The protocol (all integers little-endian)
//!
//! 1. kshim → engine, one message, **HELLO**, with `SCM_RIGHTS` carrying
//!    `1 + 2 × cores` descriptors in this order: the region memfd; the to-engine
//!    doorbell eventfd of core 0..cores (kshim rings it, the engine waits on it); the
//!    to-kshim doorbell eventfd of core 0..cores (the engine rings it, kshim waits).
//!
//!    ```text
//!    0  magic        u64  b"LU2KSHIM"
//!    8  version      u32  1
//!    12 cores        u32  ring sets in the region (1..=126)
//!    16 region_size  u64  bytes of the memfd (equals the region header's total_size)
//!    24 nfds         u32  1 + 2 × cores
//!    28 nid_count    u32  local NIDs that follow (0..=32)
//!    32 nids         u64 × nid_count
//!    ```
//!
//! 2. engine → kshim, one message, **ACK**, after it has mapped the region and
//!    validated its header (16 bytes): `magic u64 = b"LU2KENGN"`, `version u32 = 1`,
//!    `status u32` (0: attached; any other value: refused, kshim reports
//!    [`Error::Refused`] with it and closes the socket).
//!
//! 3. engine → kshim, any number of **NOTICE** messages (16 bytes):
//!    `kind u32` (1 = peer down, 2 = peer up), `reserved u32 = 0`, `nid u64`.
//!
//! Nothing else travels on the socket; data and completions go through the region.
//!
//! # The engine's side, in code
//!
//! ```no_run
//! use lu2k_ring_abi::attach;
//! use lu2k_ring_abi::{Eventfds, Region};
//!
//! let mut att = attach::connect("/tmp/lu2k-kshim.sock".as_ref())?;
//! let region = Region::from_fd(att.memfd.try_clone()?)?; // checks seals and the header
//! let to_engine = std::mem::take(&mut att.to_engine);
//! let to_kshim = std::mem::take(&mut att.to_kshim);
//! let mut cores = Vec::new();
//! for (c, (te, tk)) in to_engine.into_iter().zip(to_kshim).enumerate() {
//!     let fds = Eventfds { to_engine: Some(te), to_kshim: Some(tk) };
//!     cores.push(region.engine_core(c as u32, fds)?);
//! }
//! att.ack(0)?; // attached: kshim reports Event::EngineAttached
//! // … run; on a peer timeout: att.notice(attach::Notice::PeerDown(nid))?;
//! // keep `att.sock` open for the whole session: closing it ends the session.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::nid::Nid;

/// HELLO magic.
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"LU2KSHIM");
/// ACK magic.
pub const ACK_MAGIC: u64 = u64::from_le_bytes(*b"LU2KENGN");
/// Protocol version.
pub const VERSION: u32 = 1;
/// Most cores one HELLO can carry doorbells for: `126 = (253 - 1) / 2`, as Linux passes
/// at most 253 descriptors in one message.
pub const MAX_CORES: u32 = 126;
/// Most local NIDs in a HELLO.
pub const MAX_NIDS: usize = 32;
/// NOTICE kind: a peer is down.
pub const NOTICE_PEER_DOWN: u32 = 1;
/// NOTICE kind: a peer is up again.
pub const NOTICE_PEER_UP: u32 = 2;

const HELLO_FIXED: usize = 32;
/// Longest HELLO in bytes (32 fixed + 8 per NID, at most 32 NIDs).
pub const HELLO_MAX_LEN: usize = HELLO_FIXED + 8 * MAX_NIDS;

/// What can go wrong on the attach socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("attach socket {op}: {err}")]
    Io {
        /// The call.
        op: &'static str,
        /// The error.
        err: rustix::io::Errno,
    },
    /// The other side closed the socket.
    #[error("the other side closed the attach socket")]
    Closed,
    /// A message that is not what the protocol says at this point.
    #[error("bad attach message: {0}")]
    Protocol(&'static str),
    /// The engine refused the region.
    #[error("the engine refused the region (status {0})")]
    Refused(u32),
    /// Too many cores or NIDs for one HELLO.
    #[error("HELLO cannot carry {cores} cores (max {MAX_CORES}) and {nids} NIDs (max {MAX_NIDS})")]
    TooLarge {
        /// Cores.
        cores: u32,
        /// NIDs.
        nids: usize,
    },
}

fn io(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |err| Error::Io { op, err }
}

/// The fixed part of HELLO, as the engine receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Ring sets.
    pub cores: u32,
    /// Bytes of the region.
    pub region_size: u64,
    /// kshim's local NIDs.
    pub nids: Vec<Nid>,
}

impl Hello {
    /// Encodes into `out`, returning the length.
    pub fn encode(&self, out: &mut [u8; HELLO_MAX_LEN]) -> Result<usize, Error> {
        if self.cores == 0 || self.cores > MAX_CORES || self.nids.len() > MAX_NIDS {
            return Err(Error::TooLarge {
                cores: self.cores,
                nids: self.nids.len(),
            });
        }
        out[0..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.cores.to_le_bytes());
        out[16..24].copy_from_slice(&self.region_size.to_le_bytes());
        out[24..28].copy_from_slice(&(1 + 2 * self.cores).to_le_bytes());
        out[28..32].copy_from_slice(&(self.nids.len() as u32).to_le_bytes());
        for (i, n) in self.nids.iter().enumerate() {
            out[32 + 8 * i..40 + 8 * i].copy_from_slice(&n.0.to_le_bytes());
        }
        Ok(HELLO_FIXED + 8 * self.nids.len())
    }

    /// Decodes a HELLO message; returns it and the descriptor count it announces.
    pub fn decode(b: &[u8]) -> Result<(Hello, u32), Error> {
        if b.len() < HELLO_FIXED {
            return Err(Error::Protocol("HELLO shorter than 32 bytes"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        if u64_at(0) != HELLO_MAGIC {
            return Err(Error::Protocol("HELLO magic is not LU2KSHIM"));
        }
        if u32_at(8) != VERSION {
            return Err(Error::Protocol("HELLO version is not 1"));
        }
        let cores = u32_at(12);
        if cores == 0 || cores > MAX_CORES {
            return Err(Error::Protocol("HELLO core count out of range"));
        }
        let nfds = u32_at(24);
        if nfds != 1 + 2 * cores {
            return Err(Error::Protocol("HELLO nfds is not 1 + 2 × cores"));
        }
        let n = u32_at(28) as usize;
        if n > MAX_NIDS || b.len() != HELLO_FIXED + 8 * n {
            return Err(Error::Protocol("HELLO NID count does not match its length"));
        }
        let nids = (0..n).map(|i| Nid(u64_at(32 + 8 * i))).collect();
        Ok((
            Hello {
                cores,
                region_size: u64_at(16),
                nids,
            },
            nfds,
        ))
    }
}

/// Engine → kshim notices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The engine gave up on a peer.
    PeerDown(Nid),
    /// The peer answers again.
    PeerUp(Nid),
}

impl Notice {
    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; 16] {
        let (kind, nid) = match *self {
            Notice::PeerDown(n) => (NOTICE_PEER_DOWN, n),
            Notice::PeerUp(n) => (NOTICE_PEER_UP, n),
        };
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&nid.0.to_le_bytes());
        b
    }

    /// Parses 16 wire bytes.
    pub fn decode(b: &[u8]) -> Result<Notice, Error> {
        if b.len() != 16 {
            return Err(Error::Protocol("NOTICE is not 16 bytes"));
        }
        let kind = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[8..16]);
        let nid = Nid(u64::from_le_bytes(n));
        match kind {
            NOTICE_PEER_DOWN => Ok(Notice::PeerDown(nid)),
            NOTICE_PEER_UP => Ok(Notice::PeerUp(nid)),
            _ => Err(Error::Protocol("unknown NOTICE kind")),
        }
    }
}

/// The 16-byte ACK.
pub fn encode_ack(status: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&ACK_MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&status.to_le_bytes());
    b
}

/// Parses an ACK: `Ok(())` for status 0.
pub fn decode_ack(b: &[u8]) -> Result<(), Error> {
    if b.len() != 16 {
        return Err(Error::Protocol("ACK is not 16 bytes"));
    }
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[0..8]);
    if u64::from_le_bytes(m) != ACK_MAGIC {
        return Err(Error::Protocol("ACK magic is not LU2KENGN"));
    }
    if u32::from_le_bytes([b[8], b[9], b[10], b[11]]) != VERSION {
        return Err(Error::Protocol("ACK version is not 1"));
    }
    match u32::from_le_bytes([b[12], b[13], b[14], b[15]]) {
        0 => Ok(()),
        s => Err(Error::Refused(s)),
    }
}

/// A non-blocking listening `SOCK_SEQPACKET` socket at `path` (a stale socket file is
/// replaced).
pub fn listen(path: &Path) -> Result<OwnedFd, Error> {
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(io("socket"))?;
    let addr = SocketAddrUnix::new(path).map_err(io("socket path"))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            let _ = std::fs::remove_file(path);
        }
        _ => {}
    }
    net::bind(&fd, &addr).map_err(io("bind"))?;
    net::listen(&fd, 1).map_err(io("listen"))?;
    Ok(fd)
}

/// Accepts one connection if one is waiting (non-blocking), as a non-blocking socket.
pub fn accept(listener: BorrowedFd<'_>) -> Result<Option<OwnedFd>, Error> {
    match net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(None),
        Err(e) => Err(Error::Io {
            op: "accept",
            err: e,
        }),
    }
}

/// kshim side: sends HELLO with the memfd and the doorbells.
pub fn send_hello(
    sock: BorrowedFd<'_>,
    hello: &Hello,
    memfd: BorrowedFd<'_>,
    to_engine: &[BorrowedFd<'_>],
    to_kshim: &[BorrowedFd<'_>],
) -> Result<(), Error> {
    let mut msg = [0u8; HELLO_MAX_LEN];
    let len = hello.encode(&mut msg)?;
    if to_engine.len() != hello.cores as usize || to_kshim.len() != hello.cores as usize {
        return Err(Error::Protocol("doorbell count differs from core count"));
    }
    let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(1 + 2 * to_engine.len());
    fds.push(memfd);
    fds.extend_from_slice(to_engine);
    fds.extend_from_slice(to_kshim);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !anc.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Error::Protocol("descriptors do not fit the control buffer"));
    }
    let sent = loop {
        match net::sendmsg(
            sock,
            &[IoSlice::new(&msg[..len])],
            &mut anc,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::PIPE) | Err(rustix::io::Errno::CONNRESET) => {
                return Err(Error::Closed)
            }
            r => break r.map_err(io("sendmsg HELLO"))?,
        }
    };
    if sent != len {
        return Err(Error::Protocol("HELLO sent partially"));
    }
    Ok(())
}

/// Receives one message of at most 16 bytes without blocking: `Ok(None)` when none is
/// waiting, [`Error::Closed`] at end of stream.
pub fn recv_small(sock: BorrowedFd<'_>) -> Result<Option<([u8; 16], usize)>, Error> {
    let mut b = [0u8; 16];
    loop {
        match net::recv(sock, &mut b[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
            Ok((_, 0)) => return Err(Error::Closed),
            Ok((_, n)) if n > 16 => return Err(Error::Protocol("message longer than 16 bytes")),
            Ok((_, n)) => return Ok(Some((b, n))),
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CONNRESET) => return Err(Error::Closed),
            Err(e) => return Err(Error::Io { op: "recv", err: e }),
        }
    }
}

/// What the engine gets from [`connect`].
#[derive(Debug)]
pub struct Attachment {
    /// The connected socket; keep it open for the session, send ACK and NOTICEs on it.
    pub sock: OwnedFd,
    /// HELLO's contents.
    pub hello: Hello,
    /// The region memfd (map `hello.region_size` bytes shared).
    pub memfd: OwnedFd,
    /// Per core: kshim rings these when the engine asked for a wakeup.
    pub to_engine: Vec<OwnedFd>,
    /// Per core: the engine rings these when kshim asked for a wakeup.
    pub to_kshim: Vec<OwnedFd>,
}

impl Attachment {
    /// Sends ACK with `status` (0 = attached).
    pub fn ack(&self, status: u32) -> Result<(), Error> {
        send_small(self.sock.as_fd(), &encode_ack(status))
    }

    /// Sends a NOTICE.
    pub fn notice(&self, n: Notice) -> Result<(), Error> {
        send_small(self.sock.as_fd(), &n.encode())
    }
}

/// Sends one small message (blocking).
pub fn send_small(sock: BorrowedFd<'_>, b: &[u8]) -> Result<(), Error> {
    loop {
        match net::send(sock, b, SendFlags::NOSIGNAL) {
            Ok(n) if n == b.len() => return Ok(()),
            Ok(_) => return Err(Error::Protocol("message sent partially")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                // Seqpacket buffer full: wait until writable.
                let mut pfd = [rustix::event::PollFd::new(
                    &sock,
                    rustix::event::PollFlags::OUT,
                )];
                let _ = rustix::event::poll(&mut pfd, None);
            }
            Err(rustix::io::Errno::PIPE) | Err(rustix::io::Errno::CONNRESET) => {
                return Err(Error::Closed)
            }
            Err(e) => return Err(Error::Io { op: "send", err: e }),
        }
    }
}

/// Engine side: connects to kshim at `path` and receives HELLO with its descriptors.
/// The returned socket is blocking; the caller sends ACK once the region is mapped.
pub fn connect(path: &Path) -> Result<Attachment, Error> {
    let sock = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socket"))?;
    let addr = SocketAddrUnix::new(path).map_err(io("socket path"))?;
    net::connect(&sock, &addr).map_err(io("connect"))?;
    let mut msg = [0u8; HELLO_MAX_LEN];
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1 + 2 * MAX_CORES as usize))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = loop {
        match net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut msg)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.map_err(io("recvmsg HELLO"))?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if r.bytes == 0 {
        return Err(Error::Closed);
    }
    if r.flags.contains(net::ReturnFlags::CTRUNC) || r.flags.contains(net::ReturnFlags::TRUNC) {
        return Err(Error::Protocol("HELLO or its descriptors were truncated"));
    }
    let (hello, nfds) = Hello::decode(&msg[..r.bytes])?;
    if fds.len() != nfds as usize {
        return Err(Error::Protocol(
            "HELLO carried a different number of descriptors",
        ));
    }
    let mut it = fds.into_iter();
    let memfd = it.next().ok_or(Error::Protocol("no memfd"))?;
    let to_engine: Vec<OwnedFd> = it.by_ref().take(hello.cores as usize).collect();
    let to_kshim: Vec<OwnedFd> = it.collect();
    Ok(Attachment {
        sock,
        hello,
        memfd,
        to_engine,
        to_kshim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_errors() {
        let h = Hello {
            cores: 3,
            region_size: 1 << 30,
            nids: vec![Nid(7), Nid(u64::MAX)],
        };
        let mut b = [0u8; HELLO_MAX_LEN];
        let n = h.encode(&mut b).unwrap();
        assert_eq!(n, 48);
        assert_eq!(&b[0..8], b"LU2KSHIM");
        assert_eq!(&b[24..28], &7u32.to_le_bytes());
        assert_eq!(Hello::decode(&b[..n]).unwrap(), (h.clone(), 7));
        assert!(Hello::decode(&b[..n - 1]).is_err());
        let mut bad = b;
        bad[24] = 6;
        assert!(Hello::decode(&bad[..n]).is_err());
        let big = Hello {
            cores: 127,
            region_size: 0,
            nids: vec![],
        };
        assert!(matches!(big.encode(&mut b), Err(Error::TooLarge { .. })));
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Ok((h, nfds)) = Hello::decode(&b) {
                proptest::prop_assert_eq!(nfds, 1 + 2 * h.cores);
                let mut out = [0u8; HELLO_MAX_LEN];
                let n = h.encode(&mut out).unwrap();
                proptest::prop_assert_eq!(&out[..n], &b[..]);
            }
            let _ = Notice::decode(&b);
            let _ = decode_ack(&b);
        }
    }

    #[test]
    fn ack_and_notice() {
        assert!(decode_ack(&encode_ack(0)).is_ok());
        assert!(matches!(decode_ack(&encode_ack(5)), Err(Error::Refused(5))));
        for n in [Notice::PeerDown(Nid(1)), Notice::PeerUp(Nid(u64::MAX))] {
            assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
        }
        let mut b = Notice::PeerDown(Nid(1)).encode();
        b[0] = 9;
        assert!(Notice::decode(&b).is_err());
    }
}
