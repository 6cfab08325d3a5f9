//! Attaching an engine to the kernel half, which is either userspace kshim (a Unix
//! socket hands over the region and the doorbells) or the kernel module
//! `lu2k_kshim.ko` (the device `/dev/lu2k`: ioctls and mmap; see [`device`]). An
//! [`Endpoint`] names either (`socket:PATH`, `device:PATH[,instance=N]`) and [`attach`]
//! returns the same [`Attachment`] for both.
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
//!    8  version      u32  2
//!    12 cores        u32  ring sets in the region (1..=126)
//!    16 region_size  u64  bytes of the memfd (equals the region header's total_size)
//!    24 nfds         u32  1 + 2 × cores
//!    28 nid_count    u32  local NIDs that follow (0..=32)
//!    32 nids         24 bytes × nid_count ([`Nid`], C `struct lu2k_nid`)
//!    ```
//!
//! 2. engine → kshim, one message, **ACK**, after it has mapped the region and
//!    validated its header (16 bytes): `magic u64 = b"LU2KENGN"`, `version u32 = 2`,
//!    `status u32` (0: attached; any other value: refused, kshim reports
//!    [`Error::Refused`] with it and closes the socket).
//!
//! 3. engine → kshim, any number of **NOTICE** messages (32 bytes):
//!    `kind u32` (1 = peer down, 2 = peer up), `reserved u32 = 0`, `nid` (24 bytes).
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
use std::path::{Path, PathBuf};

use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::nid::{Nid, NID_BYTES};

/// HELLO magic.
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"LU2KSHIM");
/// ACK magic.
pub const ACK_MAGIC: u64 = u64::from_le_bytes(*b"LU2KENGN");
/// Protocol version (2: 24-byte NIDs).
pub const VERSION: u32 = 2;
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
/// Longest HELLO in bytes (32 fixed + 24 per NID, at most 32 NIDs).
pub const HELLO_MAX_LEN: usize = HELLO_FIXED + NID_BYTES * MAX_NIDS;
/// Bytes of a NOTICE.
pub const NOTICE_LEN: usize = 8 + NID_BYTES;
/// Longest message after the HELLO (a NOTICE; an ACK is 16 bytes).
pub const SMALL_MAX_LEN: usize = NOTICE_LEN;

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
    /// A device ioctl, open or mmap failed.
    #[error("{op} on the lu2k device: {err}")]
    Device {
        /// What was done.
        op: &'static str,
        /// The error.
        err: rustix::io::Errno,
    },
    /// The region could not be mapped or is invalid.
    #[error("{0}")]
    Region(#[from] crate::region::RegionError),
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
            let at = HELLO_FIXED + NID_BYTES * i;
            out[at..at + NID_BYTES].copy_from_slice(&n.to_bytes());
        }
        Ok(HELLO_FIXED + NID_BYTES * self.nids.len())
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
            return Err(Error::Protocol(
                "HELLO version is not 2 (kshim and engine from different releases: upgrade both)",
            ));
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
        if n > MAX_NIDS || b.len() != HELLO_FIXED + NID_BYTES * n {
            return Err(Error::Protocol("HELLO NID count does not match its length"));
        }
        let mut nids = Vec::with_capacity(n);
        for i in 0..n {
            let at = HELLO_FIXED + NID_BYTES * i;
            let mut raw = [0u8; NID_BYTES];
            raw.copy_from_slice(&b[at..at + NID_BYTES]);
            let nid = Nid::from_bytes(&raw);
            if nid.check().is_err() {
                return Err(Error::Protocol("HELLO carries a malformed NID"));
            }
            nids.push(nid);
        }
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
    /// The wire bytes.
    pub fn encode(&self) -> [u8; NOTICE_LEN] {
        let (kind, nid) = match *self {
            Notice::PeerDown(n) => (NOTICE_PEER_DOWN, n),
            Notice::PeerUp(n) => (NOTICE_PEER_UP, n),
        };
        let mut b = [0u8; NOTICE_LEN];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[8..].copy_from_slice(&nid.to_bytes());
        b
    }

    /// Parses the wire bytes.
    pub fn decode(b: &[u8]) -> Result<Notice, Error> {
        if b.len() != NOTICE_LEN {
            return Err(Error::Protocol("NOTICE is not 32 bytes"));
        }
        let kind = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut n = [0u8; NID_BYTES];
        n.copy_from_slice(&b[8..]);
        let nid = Nid::from_bytes(&n);
        if nid.check().is_err() {
            return Err(Error::Protocol("NOTICE carries a malformed NID"));
        }
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
        return Err(Error::Protocol(
            "ACK version is not 2 (kshim and engine from different releases: upgrade both)",
        ));
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

/// Receives one message of at most [`SMALL_MAX_LEN`] bytes without blocking: `Ok(None)`
/// when none is waiting, [`Error::Closed`] at end of stream.
pub fn recv_small(sock: BorrowedFd<'_>) -> Result<Option<([u8; SMALL_MAX_LEN], usize)>, Error> {
    let mut b = [0u8; SMALL_MAX_LEN];
    loop {
        match net::recv(sock, &mut b[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
            Ok((_, 0)) => return Err(Error::Closed),
            Ok((_, n)) if n > SMALL_MAX_LEN => {
                return Err(Error::Protocol("message longer than 32 bytes"))
            }
            Ok((_, n)) => return Ok(Some((b, n))),
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CONNRESET) => return Err(Error::Closed),
            Err(e) => return Err(Error::Io { op: "recv", err: e }),
        }
    }
}

/// What the engine gets from [`connect`] or [`device::attach`].
#[derive(Debug)]
pub struct Attachment {
    /// The session: the connected socket (ACK and NOTICEs travel on it) or the device
    /// file (ACK and NOTICEs are ioctls). Keep it open: closing it ends the session.
    pub sock: OwnedFd,
    /// Whether `sock` is the lu2k device rather than kshim's socket.
    pub device: bool,
    /// HELLO's contents.
    pub hello: Hello,
    /// The region memfd (map `hello.region_size` bytes shared); for the device, a
    /// duplicate of the device file, whose mapping is the region.
    pub memfd: OwnedFd,
    /// Per core: kshim rings these when the engine asked for a wakeup.
    pub to_engine: Vec<OwnedFd>,
    /// Per core: the engine rings these when kshim asked for a wakeup.
    pub to_kshim: Vec<OwnedFd>,
}

impl Attachment {
    /// Sends ACK with `status` (0 = attached).
    pub fn ack(&self, status: u32) -> Result<(), Error> {
        if self.device {
            return device::sys::ack(self.sock.as_fd(), status);
        }
        send_small(self.sock.as_fd(), &encode_ack(status))
    }

    /// Sends a NOTICE.
    pub fn notice(&self, n: Notice) -> Result<(), Error> {
        if self.device {
            let (kind, nid) = match n {
                Notice::PeerDown(nid) => (NOTICE_PEER_DOWN, nid),
                Notice::PeerUp(nid) => (NOTICE_PEER_UP, nid),
            };
            return device::sys::notice(self.sock.as_fd(), kind, nid);
        }
        send_small(self.sock.as_fd(), &n.encode())
    }

    /// Maps the region and validates it: a memfd must carry the shrink seal; the
    /// device's mapping has the size the device fixed (HELLO's `region_size`), which
    /// the header must state.
    pub fn region(&self) -> Result<crate::Region, Error> {
        let fd = self.memfd.try_clone().map_err(|e| Error::Device {
            op: "dup",
            err: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::BADF),
        })?;
        Ok(if self.device {
            crate::Region::from_device(fd, self.hello.region_size)?
        } else {
            crate::Region::from_fd(fd)?
        })
    }
}

/// Where the engine finds the kernel half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Userspace kshim's Unix socket.
    Socket(PathBuf),
    /// The kernel module's device and the instance (region) to attach to.
    Device {
        /// Usually `/dev/lu2k`.
        path: PathBuf,
        /// Instance number (`LU2K_IOC_CREATE` returned it).
        instance: u32,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `socket:PATH`, `device:PATH`, `device:PATH,instance=N`, or a bare path (a
    /// socket).
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("device:") {
            let (path, instance) = match rest.split_once(",instance=") {
                Some((p, n)) => (
                    p,
                    n.parse::<u32>().map_err(|_| {
                        format!("kshim endpoint '{s}': instance '{n}' is not a number (device:/dev/lu2k,instance=0)")
                    })?,
                ),
                None => (rest, 0),
            };
            if path.is_empty() {
                return Err(format!(
                    "kshim endpoint '{s}': no device path (device:/dev/lu2k)"
                ));
            }
            return Ok(Endpoint::Device {
                path: path.into(),
                instance,
            });
        }
        let path = s.strip_prefix("socket:").unwrap_or(s);
        if path.is_empty() {
            return Err("kshim endpoint is empty: give socket:PATH or device:/dev/lu2k".into());
        }
        Ok(Endpoint::Socket(path.into()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "socket:{}", p.display()),
            Endpoint::Device { path, instance } => {
                write!(f, "device:{},instance={instance}", path.display())
            }
        }
    }
}

/// Attaches to the kernel half at `ep`: [`connect`] for a socket, [`device::attach`]
/// for the device.
pub fn attach(ep: &Endpoint) -> Result<Attachment, Error> {
    match ep {
        Endpoint::Socket(p) => connect(p),
        Endpoint::Device { path, instance } => device::attach(path, *instance),
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

/// How long [`connect`] waits for HELLO once kshim accepted.
const HELLO_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
    // kshim sends HELLO from its poll loop as soon as it accepts; a kshim that
    // accepted and stays silent must not hold the engine (and its SIGTERM) forever.
    net::sockopt::set_socket_timeout(&sock, net::sockopt::Timeout::Recv, Some(HELLO_WAIT))
        .map_err(io("setsockopt SO_RCVTIMEO"))?;
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
            Err(rustix::io::Errno::AGAIN) => {
                return Err(Error::Protocol(
                    "kshim accepted the connection but sent no HELLO within 5 s: is it stuck?",
                ))
            }
            r => break r.map_err(io("recvmsg HELLO"))?,
        }
    };
    net::sockopt::set_socket_timeout(&sock, net::sockopt::Timeout::Recv, None)
        .map_err(io("setsockopt SO_RCVTIMEO"))?;
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
        device: false,
        hello,
        memfd,
        to_engine,
        to_kshim,
    })
}

/// The kernel module's device, `/dev/lu2k` (`kshim/module`): the records and ioctls of
/// `include/lu2k_ring.h` (`struct lu2k_dev_*`, `LU2K_IOC_*`), with safe wrappers.
///
/// The engine's protocol ([`attach`]): open the device; `LU2K_IOC_INFO` for the
/// instance's cores, region size and NIDs (HELLO's contents); two eventfds per core;
/// `LU2K_IOC_ATTACH` with them; mmap `region_size` bytes at offset 0
/// ([`Attachment::region`]); `LU2K_IOC_ACK`. The module signals `to_engine` and hooks
/// the wait queue of `to_kshim`, so the engine rings it with a plain eventfd write,
/// exactly as it rings userspace kshim. Closing the device file (and unmapping) ends
/// the session: the module fails the messages in flight back and resets the rings.
///
/// [`create`], [`destroy`], [`load`] and [`stats`] are the module's administration
/// and selftest (the kernel lab drives them).
pub mod device {
    use super::{Attachment, Error, Hello};
    use crate::nid::Nid;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::path::Path;

    /// `LU2K_IOC_TYPE`.
    pub const IOC_TYPE: u8 = 0xB2;
    /// `LU2K_DEV_MAX_NIDS`.
    pub const MAX_NIDS: usize = 8;
    /// `LU2K_DEV_MAX_CORES`.
    pub const MAX_CORES: usize = 16;
    /// `LU2K_LOAD_PUT`: PUTs with the selftest pattern seeded `salt + i`.
    pub const LOAD_PUT: u32 = 1;
    /// `LU2K_LOAD_PING`: GETs answered by REPLYs, one at a time.
    pub const LOAD_PING: u32 = 2;

    /// `struct lu2k_dev_create`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Create {
        /// Ring sets, 1..=16.
        pub cores: u32,
        /// NIDs used, 1..=8.
        pub nid_count: u32,
        /// The instance's NIDs (the first is the source of its selftest traffic).
        pub nids: [Nid; MAX_NIDS],
        /// Entries of every ring (power of two, at least `tx_slots`).
        pub ring_entries: u32,
        /// TX pool slots of 1 MiB.
        pub tx_slots: u32,
        /// RX buffer size (multiple of 64).
        pub rx_buf_size: u32,
        /// RX buffers.
        pub rx_buf_count: u32,
        /// RX indirect tables per core.
        pub rx_tables_per_core: u32,
        /// Out: the instance number.
        pub instance: u32,
        /// Out: the region size.
        pub region_size: u64,
        /// Cores each peer's messages are spread over ([`crate::stripe`]), 0..=`cores`
        /// (0 means 1).
        pub conns_per_peer: u32,
        /// Zero.
        pub reserved: u32,
    }

    /// `struct lu2k_dev_info`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Info {
        /// In: the instance.
        pub instance: u32,
        /// Ring sets.
        pub cores: u32,
        /// Region size.
        pub region_size: u64,
        /// NIDs used.
        pub nid_count: u32,
        /// 1 while an engine is attached.
        pub attached: u32,
        /// NIDs.
        pub nids: [Nid; MAX_NIDS],
    }

    /// `struct lu2k_dev_attach`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Attach {
        /// Instance.
        pub instance: u32,
        /// Cores (must equal the instance's).
        pub cores: u32,
        /// Per core: the eventfd the module signals.
        pub to_engine: [i32; MAX_CORES],
        /// Per core: the eventfd the engine signals.
        pub to_kshim: [i32; MAX_CORES],
    }

    /// `struct lu2k_dev_notice`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DevNotice {
        /// 1 = peer down, 2 = peer up.
        pub kind: u32,
        /// Zero.
        pub reserved: u32,
        /// The peer.
        pub nid: Nid,
    }

    /// `struct lu2k_dev_load`: a selftest run (in) and its result (out).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Load {
        /// Instance that sends.
        pub instance: u32,
        /// [`LOAD_PUT`] or [`LOAD_PING`].
        pub kind: u32,
        /// Destination.
        pub peer_nid: Nid,
        /// Seed of message 0 (PUT) or the first ping's sequence number.
        pub salt: u64,
        /// Messages.
        pub count: u32,
        /// Payload bytes (PUT) or REPLY bytes asked for (PING).
        pub size: u32,
        /// Producer kthreads (PUT).
        pub threads: u32,
        /// Per message: how long to wait for an engine, a TX slot or a REPLY.
        pub timeout_ms: u32,
        /// Out: completed OK (PUT) or answered (PING).
        pub ok: u64,
        /// Out: failed (any status other than OK, no engine, no reply).
        pub failed: u64,
        /// Out: failed back because the engine detached.
        pub engine_gone: u64,
        /// Out: payload bytes completed OK.
        pub bytes: u64,
        /// Out: wall time.
        pub elapsed_ns: u64,
        /// Out (PING): min, p50, p90, p99, max round trip.
        pub rtt_ns: [u64; 5],
        /// Out (PING): REPLYs whose payload failed the pattern check.
        pub corrupt: u64,
    }

    /// `struct lu2k_dev_stats`: an instance's counters.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Stats {
        /// In: the instance.
        pub instance: u32,
        /// 1 while an engine serves the rings.
        pub attached: u32,
        /// TX descriptors published.
        pub tx_sent: u64,
        /// Completed OK.
        pub tx_ok: u64,
        /// Completed with another status.
        pub tx_failed: u64,
        /// Failed back because the engine detached.
        pub tx_engine_gone: u64,
        /// Completions refused (unknown cookie, bad status).
        pub bad_completions: u64,
        /// RX descriptors refused.
        pub bad_rx: u64,
        /// Ring indices out of range.
        pub bad_index: u64,
        /// RX messages delivered.
        pub rx_msgs: u64,
        /// RX payload bytes.
        pub rx_bytes: u64,
        /// PUTs whose payload matched the pattern.
        pub puts_verified: u64,
        /// PUTs whose payload did not.
        pub puts_corrupt: u64,
        /// GETs answered with a REPLY.
        pub gets_answered: u64,
        /// REPLYs that could not be sent or failed.
        pub replies_failed: u64,
        /// REPLYs no ping waited for.
        pub replies_unmatched: u64,
        /// Notices from the engine.
        pub notices: u64,
        /// Engines attached.
        pub attaches: u64,
        /// Engines detached.
        pub detaches: u64,
        /// To-engine eventfd signals.
        pub doorbells: u64,
        /// To-kshim doorbells seen.
        pub wakeups: u64,
        /// Idle sleeps that ended by time with work waiting (a lost wakeup).
        pub idle_timeouts_with_work: u64,
    }

    #[allow(unsafe_code)]
    pub(super) mod sys {
        use super::{Attach, Create, DevNotice, Info, Load, Stats, IOC_TYPE};
        use crate::attach::Error;
        use rustix::ioctl::{ioctl, opcode, Opcode, Setter, Updater};
        use std::os::fd::BorrowedFd;

        pub(super) const CREATE: Opcode = opcode::read_write::<Create>(IOC_TYPE, 1);
        pub(super) const INFO: Opcode = opcode::read_write::<Info>(IOC_TYPE, 2);
        pub(super) const ATTACH: Opcode = opcode::write::<Attach>(IOC_TYPE, 3);
        pub(super) const ACK: Opcode = opcode::write::<u32>(IOC_TYPE, 4);
        pub(super) const NOTICE: Opcode = opcode::write::<DevNotice>(IOC_TYPE, 5);
        pub(super) const LOAD: Opcode = opcode::read_write::<Load>(IOC_TYPE, 6);
        pub(super) const STATS: Opcode = opcode::read_write::<Stats>(IOC_TYPE, 7);
        pub(super) const DESTROY: Opcode = opcode::write::<u32>(IOC_TYPE, 8);

        fn dev(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
            move |err| Error::Device { op, err }
        }

        /// An in/out ioctl on a `#[repr(C)]` record of integers.
        macro_rules! update {
            ($name:ident, $op:expr, $ty:ty, $what:literal) => {
                pub fn $name(fd: BorrowedFd<'_>, v: &mut $ty) -> Result<(), Error> {
                    // SAFETY: the opcode encodes size_of::<$ty>() and the module reads
                    // and writes exactly that record (include/lu2k_ring.h, checked by
                    // the size test below); $ty is integers only, so whatever the
                    // module writes is a valid value.
                    unsafe { ioctl(fd, Updater::<{ $op }, $ty>::new(v)) }.map_err(dev($what))
                }
            };
        }
        update!(create, CREATE, Create, "LU2K_IOC_CREATE");
        update!(info, INFO, Info, "LU2K_IOC_INFO");
        update!(load, LOAD, Load, "LU2K_IOC_LOAD");
        update!(stats, STATS, Stats, "LU2K_IOC_STATS");

        /// An input-only ioctl.
        macro_rules! set {
            ($name:ident, $op:expr, $ty:ty, $what:literal) => {
                pub fn $name(fd: BorrowedFd<'_>, v: $ty) -> Result<(), Error> {
                    // SAFETY: the opcode encodes size_of::<$ty>() and the module only
                    // reads that record (include/lu2k_ring.h, checked by the size test
                    // below); it writes nothing back.
                    unsafe { ioctl(fd, Setter::<{ $op }, $ty>::new(v)) }.map_err(dev($what))
                }
            };
        }
        set!(attach, ATTACH, Attach, "LU2K_IOC_ATTACH");
        set!(ack_raw, ACK, u32, "LU2K_IOC_ACK");
        set!(destroy, DESTROY, u32, "LU2K_IOC_DESTROY");
        set!(notice_raw, NOTICE, DevNotice, "LU2K_IOC_NOTICE");

        pub fn ack(fd: BorrowedFd<'_>, status: u32) -> Result<(), Error> {
            ack_raw(fd, status)
        }

        pub fn notice(fd: BorrowedFd<'_>, kind: u32, nid: crate::nid::Nid) -> Result<(), Error> {
            notice_raw(
                fd,
                DevNotice {
                    kind,
                    reserved: 0,
                    nid,
                },
            )
        }
    }

    /// Opens the device (read-write, close-on-exec).
    pub fn open(path: &Path) -> Result<OwnedFd, Error> {
        use rustix::fs::{open, Mode, OFlags};
        open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|err| Error::Device { op: "open", err })
    }

    /// `LU2K_IOC_CREATE`: a new instance; `c.instance` and `c.region_size` are filled.
    pub fn create(fd: BorrowedFd<'_>, c: &mut Create) -> Result<(), Error> {
        sys::create(fd, c)
    }

    /// `LU2K_IOC_DESTROY` (refused with EBUSY while an engine is attached).
    pub fn destroy(fd: BorrowedFd<'_>, instance: u32) -> Result<(), Error> {
        sys::destroy(fd, instance)
    }

    /// `LU2K_IOC_INFO`.
    pub fn info(fd: BorrowedFd<'_>, instance: u32) -> Result<Info, Error> {
        let mut i = Info {
            instance,
            ..Info::default()
        };
        sys::info(fd, &mut i)?;
        Ok(i)
    }

    /// `LU2K_IOC_LOAD`: runs a selftest load to its end and returns the result.
    pub fn load(fd: BorrowedFd<'_>, l: &mut Load) -> Result<(), Error> {
        sys::load(fd, l)
    }

    /// `LU2K_IOC_STATS`.
    pub fn stats(fd: BorrowedFd<'_>, instance: u32) -> Result<Stats, Error> {
        let mut s = Stats {
            instance,
            ..Stats::default()
        };
        sys::stats(fd, &mut s)?;
        Ok(s)
    }

    /// The engine's side: opens `path`, attaches to `instance` with fresh eventfds and
    /// returns the session. Map the region with [`Attachment::region`], then ACK.
    pub fn attach(path: &Path, instance: u32) -> Result<Attachment, Error> {
        let fd = open(path)?;
        let info = info(fd.as_fd(), instance)?;
        let cores = info.cores as usize;
        if cores == 0 || cores > MAX_CORES || info.nid_count as usize > MAX_NIDS {
            return Err(Error::Protocol(
                "device instance reports an impossible core or NID count",
            ));
        }
        if info.nids[..info.nid_count as usize]
            .iter()
            .any(|n| n.check().is_err())
        {
            return Err(Error::Protocol("device instance reports a malformed NID"));
        }
        let mut a = Attach {
            instance,
            cores: info.cores,
            ..Attach::default()
        };
        let (mut to_engine, mut to_kshim) = (Vec::new(), Vec::new());
        for c in 0..cores {
            let fds = crate::Eventfds::new().map_err(|err| Error::Device { op: "eventfd", err })?;
            let (Some(te), Some(tk)) = (fds.to_engine, fds.to_kshim) else {
                return Err(Error::Protocol("eventfd pair incomplete"));
            };
            a.to_engine[c] = std::os::fd::AsRawFd::as_raw_fd(&te);
            a.to_kshim[c] = std::os::fd::AsRawFd::as_raw_fd(&tk);
            to_engine.push(te);
            to_kshim.push(tk);
        }
        sys::attach(fd.as_fd(), a)?;
        let memfd = fd
            .try_clone()
            .map_err(|_| Error::Protocol("cannot duplicate the device descriptor"))?;
        Ok(Attachment {
            sock: fd,
            device: true,
            hello: Hello {
                cores: info.cores,
                region_size: info.region_size,
                nids: info.nids[..info.nid_count as usize].to_vec(),
            },
            memfd,
            to_engine,
            to_kshim,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn records_and_ioctl_numbers_agree_with_the_c_header() {
            use core::mem::offset_of;
            // A C program prints what include/lu2k_ring.h says; needs `cc`.
            let prog = r#"
#include <stdio.h>
#include <stddef.h>
#include "lu2k_ring.h"
#define S(t) printf("%zu\n", sizeof(struct t))
#define O(t, f) printf("%zu\n", offsetof(struct t, f))
int main(void) {
    S(lu2k_dev_create); O(lu2k_dev_create, rx_tables_per_core); O(lu2k_dev_create, region_size);
    O(lu2k_dev_create, conns_per_peer);
    S(lu2k_dev_info); O(lu2k_dev_info, nids);
    S(lu2k_dev_attach); O(lu2k_dev_attach, to_kshim);
    S(lu2k_dev_notice);
    S(lu2k_dev_load); O(lu2k_dev_load, rtt_ns); O(lu2k_dev_load, corrupt);
    S(lu2k_dev_stats); O(lu2k_dev_stats, idle_timeouts_with_work);
    printf("%lu\n%lu\n%lu\n%lu\n", (unsigned long)LU2K_IOC_CREATE, (unsigned long)LU2K_IOC_INFO,
           (unsigned long)LU2K_IOC_ATTACH, (unsigned long)LU2K_IOC_ACK);
    printf("%lu\n%lu\n%lu\n%lu\n", (unsigned long)LU2K_IOC_NOTICE, (unsigned long)LU2K_IOC_LOAD,
           (unsigned long)LU2K_IOC_STATS, (unsigned long)LU2K_IOC_DESTROY);
    printf("%d\n%d\n%d\n%d\n", LU2K_IOC_TYPE, LU2K_DEV_MAX_NIDS, LU2K_DEV_MAX_CORES, LU2K_LOAD_PING);
    return 0;
}
"#;
            let dir = std::env::temp_dir().join(format!("lu2k-dev-abi-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("t.c"), prog).unwrap();
            let inc = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
            let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
            let st = std::process::Command::new(&cc)
                .args(["-std=c11", "-Wall", "-Werror", "-I", inc, "-o"])
                .arg(dir.join("t"))
                .arg(dir.join("t.c"))
                .status()
                .unwrap_or_else(|e| {
                    panic!("cannot run C compiler `{cc}` ({e}); run scripts/setup.sh")
                });
            assert!(
                st.success(),
                "the C program did not compile against lu2k_ring.h"
            );
            let out = std::process::Command::new(dir.join("t")).output().unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let c: Vec<u64> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            let rust: Vec<u64> = [
                size_of::<Create>(),
                offset_of!(Create, rx_tables_per_core),
                offset_of!(Create, region_size),
                offset_of!(Create, conns_per_peer),
                size_of::<Info>(),
                offset_of!(Info, nids),
                size_of::<Attach>(),
                offset_of!(Attach, to_kshim),
                size_of::<DevNotice>(),
                size_of::<Load>(),
                offset_of!(Load, rtt_ns),
                offset_of!(Load, corrupt),
                size_of::<Stats>(),
                offset_of!(Stats, idle_timeouts_with_work),
            ]
            .iter()
            .map(|&v| v as u64)
            .chain(
                [
                    sys::CREATE,
                    sys::INFO,
                    sys::ATTACH,
                    sys::ACK,
                    sys::NOTICE,
                    sys::LOAD,
                    sys::STATS,
                    sys::DESTROY,
                ]
                .iter()
                .map(|&o| o as u64),
            )
            .chain([
                u64::from(IOC_TYPE),
                MAX_NIDS as u64,
                MAX_CORES as u64,
                u64::from(LOAD_PING),
            ])
            .collect();
            assert_eq!(c, rust, "C header (left) and Rust (right) disagree");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_errors() {
        let h = Hello {
            cores: 3,
            region_size: 1 << 30,
            nids: vec![Nid::from_nid4(7), "fd00::7@lu2k".parse().unwrap()],
        };
        let mut b = [0u8; HELLO_MAX_LEN];
        let n = h.encode(&mut b).unwrap();
        assert_eq!(n, 80);
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
    fn endpoints_parse_and_print() {
        let d: Endpoint = "device:/dev/lu2k".parse().unwrap();
        assert_eq!(
            d,
            Endpoint::Device {
                path: "/dev/lu2k".into(),
                instance: 0
            }
        );
        let d1: Endpoint = "device:/dev/lu2k,instance=3".parse().unwrap();
        assert_eq!(d1.to_string(), "device:/dev/lu2k,instance=3");
        assert_eq!(d1.to_string().parse::<Endpoint>().unwrap(), d1);
        let s: Endpoint = "socket:/run/k.sock".parse().unwrap();
        assert_eq!(s, Endpoint::Socket("/run/k.sock".into()));
        assert_eq!("/run/k.sock".parse::<Endpoint>().unwrap(), s);
        let e = "device:/dev/lu2k,instance=x"
            .parse::<Endpoint>()
            .unwrap_err();
        assert!(
            e.contains("instance") && e.contains("device:/dev/lu2k,instance=0"),
            "{e}"
        );
        assert!("device:".parse::<Endpoint>().is_err());
        assert!("".parse::<Endpoint>().is_err());
    }

    /// A kshim that takes the connection and says nothing holds the engine for
    /// the HELLO wait only, and the error says what happened.
    #[test]
    fn silent_kshim_times_out() {
        let path =
            std::env::temp_dir().join(format!("lu2k-silent-kshim-{}.sock", std::process::id()));
        let _listener = listen(&path).unwrap();
        let t0 = std::time::Instant::now();
        let Err(e) = connect(&path) else {
            panic!("an attachment without a HELLO");
        };
        let waited = t0.elapsed();
        let _ = std::fs::remove_file(&path);
        assert!(e.to_string().contains("sent no HELLO"), "{e}");
        assert!(
            waited >= HELLO_WAIT && waited < HELLO_WAIT * 2,
            "waited {waited:?}"
        );
    }

    #[test]
    fn ack_and_notice() {
        assert!(decode_ack(&encode_ack(0)).is_ok());
        assert!(matches!(decode_ack(&encode_ack(5)), Err(Error::Refused(5))));
        let v6: Nid = "2001:db8::5@lu2k".parse().unwrap();
        for n in [
            Notice::PeerDown(Nid::from_nid4(1)),
            Notice::PeerUp(Nid::from_nid4(u64::MAX)),
            Notice::PeerDown(v6),
        ] {
            assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
        }
        let mut b = Notice::PeerDown(Nid::from_nid4(1)).encode();
        b[0] = 9;
        assert!(Notice::decode(&b).is_err());
        let mut b = Notice::PeerDown(v6).encode();
        b[8] = 5; // NID size 5
        assert!(Notice::decode(&b).is_err());
    }
}
