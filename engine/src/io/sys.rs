//! The syscall edge: UDP sockets and their options, classic-BPF attachment,
//! `sendmmsg`/`recvmmsg`, memory mappings and signal masks.
//!
//! Everything here is a thin, checked wrapper around one system call, or an
//! accessor of the core's memory ([`TxMem`], [`RxPool`], [`Lent`], [`CoreMem`]):
//! every raw address the engine forms is formed here. The rest of the engine is
//! safe code but for the io_uring and epoll providers and the RDS transport, which
//! hand these addresses to the kernel; every block states why it is sound.
//!
//! Guarantees:
//! - Every file descriptor made here is owned by an [`OwnedFd`] and closed on drop.
//! - A [`Mapping`] owns its address range and unmaps it on drop; pointers into it are
//!   only handed out as raw addresses for the kernel (iovecs, registered buffers),
//!   never as Rust references that outlive it.
//! - Control messages are parsed from bytes with bounds checks; a malformed control
//!   buffer yields nothing, never a read outside it.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h), not exported by libc for glibc x86.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `UDP_SEGMENT` (linux/udp.h): GSO segment size, per socket or per `sendmsg` cmsg.
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): coalesce received datagrams; cmsg carries the segment size.
pub const UDP_GRO: libc::c_int = 104;

/// Options for [`udp_socket`].
#[derive(Debug, Clone, Copy)]
pub struct SockOpts {
    /// Join a `SO_REUSEPORT` group (one socket per core on the same port).
    pub reuseport: bool,
    /// Requested send buffer, bytes.
    pub sndbuf: usize,
    /// Requested receive buffer, bytes.
    pub rcvbuf: usize,
    /// Turn on `UDP_GRO`.
    pub gro: bool,
}

/// What [`udp_socket`] actually got from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    /// The bound address (port filled in when 0 was asked for).
    pub local: SocketAddr,
    /// Effective `SO_SNDBUF` as reported by the kernel (doubled by Linux).
    pub sndbuf: usize,
    /// Effective `SO_RCVBUF`.
    pub rcvbuf: usize,
    /// Whether `UDP_GRO` is on.
    pub gro: bool,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `val` is a live c_int on the stack and its exact size is passed; the
    // kernel copies it before returning.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&val as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are live locals; the kernel writes at most `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(ret).map(|_| val)
}

/// Converts to the kernel's `sockaddr_in`.
pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Converts to the kernel's `sockaddr_in6`.
pub fn sockaddr_in6(addr: SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: addr.flowinfo(),
        sin6_addr: libc::in6_addr {
            s6_addr: addr.ip().octets(),
        },
        sin6_scope_id: addr.scope_id(),
    }
}

/// Converts from a `sockaddr_in`; `None` when the family is not `AF_INET`.
pub fn from_sockaddr_in(sa: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    (sa.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )
    })
}

/// One address as the engine keeps it: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// how a dual-stack socket reports an IPv4 peer) becomes the IPv4 address, so that a
/// peer is one peer whichever socket family its datagrams arrive on.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// The address family of a UDP socket, which decides how a destination is written
/// into a message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `AF_INET`: IPv4 destinations only.
    V4,
    /// `AF_INET6`: IPv6 destinations, and IPv4 ones as IPv4-mapped addresses when
    /// the socket is dual-stack.
    V6,
}

/// A socket address in the kernel's layout, large enough for either family: what a
/// message header's `msg_name` points at (sends write it, receives have it filled).
#[derive(Clone, Copy)]
#[repr(C)]
pub union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl Default for RawAddr {
    fn default() -> Self {
        RawAddr {
            v6: sockaddr_in6(SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0)),
        }
    }
}

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawAddr({:?})", self.get())
    }
}

/// Room a receive gives the kernel for the source address: a `sockaddr_in6`, the
/// larger of the two (a dual-stack socket reports either).
pub const RAW_ADDR_LEN: usize = size_of::<RawAddr>();

impl RawAddr {
    /// `addr` written for a socket of `family`, with the length to pass: an IPv4
    /// address on an IPv6 socket is written IPv4-mapped; an IPv4-mapped address on
    /// an IPv4 socket as plain IPv4 (an IPv6 address there stays IPv6, and the
    /// kernel refuses the send).
    pub fn new(addr: SocketAddr, family: Family) -> (RawAddr, libc::socklen_t) {
        // Every byte written first (the IPv6 variant is the larger), so that `get`
        // reads initialised memory whichever variant goes in.
        let mut r = RawAddr::default();
        let len = match (canonical(addr), family) {
            (SocketAddr::V4(v4), Family::V4) => {
                r.v4 = sockaddr_in(v4);
                size_of::<libc::sockaddr_in>()
            }
            (SocketAddr::V4(v4), Family::V6) => {
                r.v6 = sockaddr_in6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0));
                size_of::<libc::sockaddr_in6>()
            }
            (SocketAddr::V6(v6), _) => {
                r.v6 = sockaddr_in6(v6);
                size_of::<libc::sockaddr_in6>()
            }
        };
        (r, len as libc::socklen_t)
    }

    /// The address the kernel wrote (or [`RawAddr::new`] did), canonical
    /// ([`canonical`]); `None` for another family.
    pub fn get(&self) -> Option<SocketAddr> {
        // SAFETY: both variants are plain old data with no invalid bit patterns, and
        // the union is always fully initialised (Default and new write a whole
        // variant; sockaddr_in is the shorter, so its bytes lie within sockaddr_in6's).
        let bytes = unsafe {
            std::slice::from_raw_parts((self as *const RawAddr).cast::<u8>(), RAW_ADDR_LEN)
        };
        sockaddr_from_bytes(bytes)
    }

    /// Pointer for `msg_name`.
    pub fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        (self as *mut RawAddr).cast()
    }
}

/// Parses a socket address (`sockaddr_in` or `sockaddr_in6`) from the raw bytes the
/// kernel wrote (as in a multishot recvmsg buffer), canonical ([`canonical`]).
/// `None` if too short or of another family.
pub fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 8 {
        return None;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]);
    let port = u16::from_be_bytes([b[2], b[3]]);
    if family == libc::AF_INET as u16 {
        let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
        return Some(SocketAddr::V4(SocketAddrV4::new(ip, port)));
    }
    if family != libc::AF_INET6 as u16 || b.len() < size_of::<libc::sockaddr_in6>() {
        return None;
    }
    let flow = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    let ip: [u8; 16] = b[8..24].try_into().ok()?;
    let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
    Some(canonical(SocketAddr::V6(SocketAddrV6::new(
        ip.into(),
        port,
        flow,
        scope,
    ))))
}

/// Parses a `sockaddr_in` from the raw bytes the kernel wrote. `None` if too short
/// or not IPv4 (an IPv4-mapped IPv6 address counts as IPv4).
pub fn sockaddr_in_from_bytes(b: &[u8]) -> Option<SocketAddrV4> {
    match sockaddr_from_bytes(b)? {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(_) => None,
    }
}

/// Creates a non-blocking UDP socket bound to `bind` with the engine's options (an
/// IPv6 address makes a dual-stack socket; see [`udp_socket_in`]).
pub fn udp_socket(bind: impl Into<SocketAddr>, opts: &SockOpts) -> io::Result<(OwnedFd, SockInfo)> {
    udp_socket_in(bind.into(), false, opts)
}

/// Creates a non-blocking UDP socket bound to `bind` with the engine's options:
/// `SO_REUSEPORT` (if asked), large buffers (`SO_*BUFFORCE` when permitted, else the
/// plain option, which the kernel caps at `net.core.*mem_max`), `IP_RECVERR` /
/// `IPV6_RECVERR` (ICMP errors reach the error queue instead of being lost),
/// path-MTU discovery on (GSO segments must never be fragmented), and `UDP_GRO` (if
/// asked and offered). An IPv6 `bind` makes an `AF_INET6` socket, dual-stack unless
/// `v6only`: IPv4 peers reach it as IPv4-mapped addresses, which the receive paths
/// report as IPv4 ([`canonical`]); `v6only` means nothing for an IPv4 `bind`.
pub fn udp_socket_in(
    bind: SocketAddr,
    v6only: bool,
    opts: &SockOpts,
) -> io::Result<(OwnedFd, SockInfo)> {
    let v6 = bind.is_ipv6();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call with constant arguments.
    let raw = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor returned by socket(2) and owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let r = fd.as_raw_fd();
    if v6 {
        setsockopt_int(r, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, i32::from(v6only))?;
    }
    if opts.reuseport {
        setsockopt_int(r, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let clamp = |v: usize| v.min(i32::MAX as usize / 2) as libc::c_int;
    if setsockopt_int(
        r,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        clamp(opts.sndbuf),
    )
    .is_err()
    {
        setsockopt_int(r, libc::SOL_SOCKET, libc::SO_SNDBUF, clamp(opts.sndbuf))?;
    }
    if setsockopt_int(
        r,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        clamp(opts.rcvbuf),
    )
    .is_err()
    {
        setsockopt_int(r, libc::SOL_SOCKET, libc::SO_RCVBUF, clamp(opts.rcvbuf))?;
    }
    if v6 {
        setsockopt_int(r, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
        setsockopt_int(
            r,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )?;
    }
    if !v6 {
        setsockopt_int(r, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
        setsockopt_int(
            r,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )?;
    } else if !v6only {
        // A dual-stack socket's IPv4 datagrams take the IPv4 options (Linux passes
        // the IP level of a UDPv6 socket to IPv4); best effort: IPv6 works without.
        let _ = setsockopt_int(r, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        let _ = setsockopt_int(
            r,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        );
    }
    let gro = opts.gro && setsockopt_int(r, libc::IPPROTO_UDP, UDP_GRO, 1).is_ok();
    // Arrival times from the kernel: the receiver's packet-pair and arrival-rate
    // estimates need each datagram's own time, not the time its batch was reaped.
    // Best effort: without it, datagrams are stamped when they are processed.
    let _ = setsockopt_int(r, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    // The socket's drop count (receive queue full) on every datagram: UDP drops
    // silently otherwise, and a drop here looks like path loss to the protocol.
    let _ = setsockopt_int(r, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1);
    let family = if v6 { Family::V6 } else { Family::V4 };
    let (sa, len) = RawAddr::new(bind, family);
    // SAFETY: `sa` is a valid sockaddr of `len` bytes on the stack.
    cvt(unsafe { libc::bind(r, (&sa as *const RawAddr).cast(), len) })?;
    let local = local_addr(&fd)?;
    let info = SockInfo {
        local,
        sndbuf: getsockopt_int(r, libc::SOL_SOCKET, libc::SO_SNDBUF)? as usize,
        rcvbuf: getsockopt_int(r, libc::SOL_SOCKET, libc::SO_RCVBUF)? as usize,
        gro,
    };
    Ok((fd, info))
}

/// A non-blocking IPv6 UDP socket bound to `bind`, with the engine's options
/// ([`udp_socket_in`]). `v6only == false` makes it dual-stack: IPv4 peers reach it
/// as IPv4-mapped addresses (`::ffff:a.b.c.d`), and the steering program
/// ([`crate::steer::program`]) reads either IP header. Returns the socket and its
/// bound address (port filled in).
pub fn udp_socket6(
    bind: SocketAddrV6,
    v6only: bool,
    opts: &SockOpts,
) -> io::Result<(OwnedFd, SocketAddrV6)> {
    let (fd, info) = udp_socket_in(SocketAddr::V6(bind), v6only, opts)?;
    let local = match info.local {
        SocketAddr::V6(a) => a,
        // `::` (or a mapped address) bound: the port is what counts.
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
    };
    Ok((fd, local))
}

/// The socket's bound address, canonical ([`canonical`]: a socket bound to an
/// IPv4-mapped address reports the IPv4 one).
pub fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let mut sa = RawAddr::default();
    let mut len = RAW_ADDR_LEN as libc::socklen_t;
    // SAFETY: `sa` has room for `len` bytes; the kernel writes at most that.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), sa.as_mut_ptr().cast(), &mut len) })?;
    sa.get()
        .ok_or_else(|| io::Error::other("socket is neither IPv4 nor IPv6"))
}

/// The family of the socket `fd` (how [`RawAddr::new`] writes destinations for it).
pub fn socket_family(fd: RawFd) -> io::Result<Family> {
    let d = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    Ok(if d == libc::AF_INET6 {
        Family::V6
    } else {
        Family::V4
    })
}

/// Whether the kernel accepts `UDP_SEGMENT` (GSO) and `UDP_GRO` on a UDP socket.
pub fn probe_udp_offloads() -> (bool, bool) {
    let Ok((fd, _)) = udp_socket(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        &SockOpts {
            reuseport: false,
            sndbuf: 1 << 16,
            rcvbuf: 1 << 16,
            gro: false,
        },
    ) else {
        return (false, false);
    };
    let gso = setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_UDP, UDP_SEGMENT, 1400).is_ok()
        && setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_UDP, UDP_SEGMENT, 0).is_ok();
    let gro = setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_UDP, UDP_GRO, 1).is_ok();
    (gso, gro)
}

/// One classic-BPF instruction (`struct sock_filter`).
pub type BpfInsn = libc::sock_filter;

/// Attaches a classic-BPF program that picks the socket of a `SO_REUSEPORT` group:
/// its return value is the index of the socket in the group (the order of `bind`).
pub fn attach_reuseport_cbpf(fd: &OwnedFd, prog: &[BpfInsn]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::other("BPF program too long"))?,
        filter: prog.as_ptr() as *mut BpfInsn,
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies and
    // verifies the program before returning.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A control buffer carrying exactly one `UDP_SEGMENT` cmsg, laid out as the
/// kernel's `CMSG_*` macros would (header, then a `u16`, padded to 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GsoCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

impl GsoCmsg {
    /// A `UDP_SEGMENT` cmsg asking the kernel to cut the datagram into `size`-byte segments.
    pub fn new(size: u16) -> Self {
        // SAFETY: CMSG_LEN is pure arithmetic on its argument.
        let len = unsafe { libc::CMSG_LEN(size_of::<u16>() as u32) } as usize;
        // SAFETY: cmsghdr is plain old data; all-zero is a valid value. Built field by
        // field because its padding and field types differ between libcs (musl).
        let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
        hdr.cmsg_len = len as _;
        hdr.cmsg_level = libc::SOL_UDP;
        hdr.cmsg_type = UDP_SEGMENT;
        GsoCmsg {
            hdr,
            size,
            _pad: [0; 6],
        }
    }
}

/// What the receive path learns from control messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvCmsgs {
    /// `UDP_GRO`: the datagram is several coalesced segments of this size
    /// (the last one may be shorter).
    pub gro_size: Option<u16>,
    /// `SCM_TIMESTAMPNS`: when the kernel received the datagram, nanoseconds of
    /// `CLOCK_REALTIME` (only differences to a fresh reading of that clock are used).
    pub stamp_ns: Option<u64>,
    /// `SO_RXQ_OVFL`: datagrams the socket has dropped since it was opened because
    /// its receive queue was full (a wrapping 32-bit counter).
    pub socket_drops: Option<u32>,
}

/// The control messages in `ctrl` as (level, type, data). Malformed entries end the
/// walk; it never reads outside `ctrl`.
fn cmsgs(ctrl: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> + '_ {
    const HDR: usize = size_of::<libc::cmsghdr>();
    let align = |n: usize| (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1);
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let head = ctrl.get(off..off + HDR)?;
        let len = usize::from_ne_bytes(head[0..8].try_into().ok()?);
        let level = i32::from_ne_bytes(head[8..12].try_into().ok()?);
        let ty = i32::from_ne_bytes(head[12..16].try_into().ok()?);
        if len < HDR || off + len > ctrl.len() {
            return None;
        }
        let data = &ctrl[off + HDR..off + len];
        off += align(len);
        Some((level, ty, data))
    })
}

/// Parses the control bytes of a received message. Unknown or malformed entries are
/// skipped; parsing never reads outside `ctrl`.
pub fn parse_recv_cmsgs(ctrl: &[u8]) -> RecvCmsgs {
    let mut out = RecvCmsgs::default();
    for (level, ty, data) in cmsgs(ctrl) {
        if level == libc::SOL_UDP && ty == UDP_GRO {
            // The kernel writes an int here (put_cmsg of an int in udp_cmsg_recv).
            if data.len() >= 4 {
                let v = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                out.gro_size = u16::try_from(v).ok().filter(|v| *v > 0);
            } else if data.len() >= 2 {
                out.gro_size = Some(u16::from_ne_bytes([data[0], data[1]])).filter(|v| *v > 0);
            }
        }
        if level == libc::SOL_SOCKET && ty == libc::SCM_TIMESTAMPNS && data.len() >= 16 {
            let sec = i64::from_ne_bytes(data[0..8].try_into().unwrap_or_default());
            let nsec = i64::from_ne_bytes(data[8..16].try_into().unwrap_or_default());
            out.stamp_ns = u64::try_from(sec)
                .ok()
                .zip(u64::try_from(nsec).ok())
                .map(|(s, n)| s.saturating_mul(1_000_000_000).saturating_add(n));
        }
        if level == libc::SOL_SOCKET && ty == libc::SO_RXQ_OVFL && data.len() >= 4 {
            out.socket_drops = Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]));
        }
    }
    out
}

/// `CLOCK_REALTIME` now, in nanoseconds: the clock `SCM_TIMESTAMPNS` uses.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Control-buffer space the receive path asks for: `UDP_GRO` (an int),
/// `SCM_TIMESTAMPNS` (a timespec) and `SO_RXQ_OVFL` (a u32), each behind a 16-byte
/// header and padded to 8 bytes: 24 + 32 + 24.
pub const RECV_CMSG_SPACE: usize = 80;

/// One message for [`sendmmsg`]: destination, scatter list and optional GSO size.
#[derive(Debug)]
pub struct SendMsg<'a> {
    /// Destination (either family; see [`RawAddr::new`]).
    pub dst: SocketAddr,
    /// Scatter list; the kernel reads these bytes during the call.
    pub iov: &'a [libc::iovec],
    /// `UDP_SEGMENT` size, when more than one datagram is in `iov`.
    pub gso: Option<u16>,
}

/// `sendmmsg(2)` on a socket of `family`: returns how many messages the kernel took
/// (may be fewer than given; `WouldBlock` when the socket buffer is full).
pub fn sendmmsg(fd: RawFd, family: Family, msgs: &[SendMsg<'_>]) -> io::Result<usize> {
    const MAX: usize = 64;
    let n = msgs.len().min(MAX);
    let mut addrs = [RawAddr::default(); MAX];
    let mut ctrls = [GsoCmsg::new(0); MAX];
    // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for (i, m) in msgs[..n].iter().enumerate() {
        let (a, len) = RawAddr::new(m.dst, family);
        addrs[i] = a;
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = addrs[i].as_mut_ptr();
        h.msg_namelen = len;
        h.msg_iov = m.iov.as_ptr() as *mut libc::iovec;
        h.msg_iovlen = m.iov.len() as _;
        if let Some(g) = m.gso {
            ctrls[i] = GsoCmsg::new(g);
            h.msg_control = (&mut ctrls[i] as *mut GsoCmsg).cast();
            h.msg_controllen = size_of::<GsoCmsg>() as _;
        }
    }
    // SAFETY: `hdrs[..n]` point at `addrs`, `ctrls` and the callers' iovecs, all alive
    // across the call; the kernel only reads them (and writes msg_len).
    let ret = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as u32, 0) };
    cvt(ret).map(|v| v as usize)
}

/// One received datagram from [`recvmmsg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Source address, canonical ([`canonical`]); `None` if the kernel gave one of
    /// another family.
    pub from: Option<SocketAddr>,
    /// Bytes written into the buffer.
    pub len: usize,
    /// Datagram was longer than the buffer.
    pub truncated: bool,
    /// Control data.
    pub cmsgs: RecvCmsgs,
}

/// `recvmmsg(2)` into caller buffers (given as raw address + length, as they live in a
/// shared mapping). Returns how many datagrams arrived; `WouldBlock` when none.
///
/// # Safety
/// Every `(ptr, len)` in `bufs` must be writable memory not accessed by anyone else
/// during the call.
pub unsafe fn recvmmsg(
    fd: RawFd,
    bufs: &[(*mut u8, usize)],
    out: &mut Vec<Received>,
) -> io::Result<usize> {
    const MAX: usize = 64;
    let n = bufs.len().min(MAX);
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX];
    let mut addrs = [RawAddr::default(); MAX];
    let mut ctrls = [[0u64; RECV_CMSG_SPACE / 8]; MAX];
    // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].0.cast(),
            iov_len: bufs[i].1,
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = addrs[i].as_mut_ptr();
        h.msg_namelen = RAW_ADDR_LEN as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = ctrls[i].as_mut_ptr().cast();
        h.msg_controllen = RECV_CMSG_SPACE as _;
    }
    // SAFETY: the headers point at locals alive for the call and at the caller's
    // buffers, which the caller guarantees writable and unshared.
    let ret = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            n as u32,
            libc::MSG_DONTWAIT as _,
            std::ptr::null_mut(),
        )
    };
    let got = cvt(ret)? as usize;
    for i in 0..got {
        let h = &hdrs[i].msg_hdr;
        let ctrl_len = (h.msg_controllen as usize).min(RECV_CMSG_SPACE);
        // SAFETY: `ctrls[i]` is RECV_CMSG_SPACE initialised bytes (u64 array).
        let ctrl = unsafe { std::slice::from_raw_parts(ctrls[i].as_ptr().cast::<u8>(), ctrl_len) };
        out.push(Received {
            from: addrs[i].get(),
            len: hdrs[i].msg_len as usize,
            truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            cmsgs: parse_recv_cmsgs(ctrl),
        });
    }
    Ok(got)
}

/// One ICMP-derived error read from the socket's error queue (`IP_RECVERR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockError {
    /// The errno the kernel assigned (e.g. `ECONNREFUSED`, `EHOSTUNREACH`).
    pub errno: i32,
    /// Destination of the datagram that provoked the error (canonical).
    pub dst: Option<SocketAddr>,
}

/// Reads one entry from the error queue; `Ok(None)` when it is empty.
pub fn recv_error(fd: RawFd) -> io::Result<Option<SockError>> {
    let mut buf = [0u8; 64];
    let mut addr = RawAddr::default();
    let mut ctrl = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; zero is a valid empty value.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = addr.as_mut_ptr();
    h.msg_namelen = RAW_ADDR_LEN as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = size_of::<[u64; 16]>() as _;
    // SAFETY: all pointers in `h` refer to locals alive for the call.
    let ret = unsafe { libc::recvmsg(fd, &mut h, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: `ctrl` is 128 initialised bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            ctrl.as_ptr().cast::<u8>(),
            (h.msg_controllen as usize).min(128),
        )
    };
    // The IP_RECVERR (IPV6_RECVERR on an IPv6 socket) entry's data is a
    // sock_extended_err, ee_errno its first u32. It is not necessarily the first
    // entry: the error queue carries the socket's receive time stamp too
    // (SO_TIMESTAMPNS).
    let errno = cmsgs(bytes)
        .find(|&(level, ty, data)| {
            ((level == libc::IPPROTO_IP && ty == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && ty == libc::IPV6_RECVERR))
                && data.len() >= 4
        })
        .map(|(_, _, d)| u32::from_ne_bytes([d[0], d[1], d[2], d[3]]) as i32)
        .unwrap_or(0);
    Ok(Some(SockError {
        errno,
        dst: addr.get(),
    }))
}

/// The memory sends come from: the engine's header arena followed by the payload pool
/// (for the engine: the region's TX pool), one contiguous range so that a single
/// registered io_uring buffer covers both.
#[derive(Debug, Clone, Copy)]
pub struct TxMem {
    /// Start address of the whole range (header arena first).
    pub base: usize,
    /// Header arena length in bytes (at `base`).
    pub hdr_len: usize,
    /// Offset from `base` of the payload pool.
    pub pool_off: usize,
    /// Payload pool length in bytes.
    pub pool_len: usize,
    /// Total length of the range (what gets registered).
    pub total_len: usize,
}

impl TxMem {
    /// Address of pool bytes `[off, off + len)`, or `None` if outside the pool.
    pub fn payload(&self, off: u64, len: u32) -> Option<*mut u8> {
        let end = off.checked_add(u64::from(len))?;
        if end > self.pool_len as u64 {
            return None;
        }
        Some((self.base + self.pool_off + off as usize) as *mut u8)
    }

    /// Address of header slot `i` of `n` equal slots in the arena (each
    /// `MAX_SEGS * MAX_HDR` bytes), or `None` if the arena is too small.
    pub fn header_slot(&self, i: usize) -> Option<*mut u8> {
        let stride = crate::io::MAX_SEGS * crate::io::MAX_HDR;
        ((i + 1) * stride <= self.hdr_len).then(|| (self.base + i * stride) as *mut u8)
    }

    /// Checks that the header arena holds `slots` send slots (1 to 65535: slot
    /// numbers are `u16`).
    pub fn check_send_slots(&self, slots: usize) -> io::Result<()> {
        if slots == 0 || slots > usize::from(u16::MAX) || self.header_slot(slots - 1).is_none() {
            return Err(io::Error::other(format!(
                "header arena too small for {slots} send slots (1 to 65535, {} bytes each)",
                crate::io::MAX_SEGS * crate::io::MAX_HDR
            )));
        }
        Ok(())
    }

    /// Header arena bytes needed for `slots` in-flight sends, rounded to pages.
    pub fn arena_len(slots: usize) -> usize {
        (slots * crate::io::MAX_SEGS * crate::io::MAX_HDR).div_ceil(4096) * 4096
    }
}

/// The receive pool: `count` buffers of `buf_size` bytes, buffer `i` at
/// `base + i * stride`. Buffer ids are `u16` (the provided-buffer ring's limit).
#[derive(Debug, Clone, Copy)]
pub struct RxPool {
    /// Address of buffer 0.
    pub base: usize,
    /// Distance between buffers.
    pub stride: usize,
    /// Usable bytes per buffer.
    pub buf_size: u32,
    /// Number of buffers (at most 32768).
    pub count: u16,
}

impl RxPool {
    /// Address of buffer `bid`, or `None` if out of range.
    pub fn buf(&self, bid: u16) -> Option<*mut u8> {
        (bid < self.count).then(|| (self.base + bid as usize * self.stride) as *mut u8)
    }

    /// Bytes `[off, off + len)` of buffer `bid`, or `None` if outside it.
    ///
    /// # Safety
    /// The pool must be mapped for the returned lifetime, and nobody (the kernel
    /// included) may write the buffer meanwhile: the caller holds it (a receive
    /// completion handed it out and it was not given back).
    pub unsafe fn bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        if u64::from(off) + u64::from(len) > u64::from(self.buf_size) {
            return None;
        }
        let p = self.buf(bid)?.wrapping_add(off as usize);
        // SAFETY: in bounds of buffer `bid` (checked above); mapped and unwritten
        // for the lifetime, by the caller's contract.
        Some(unsafe { std::slice::from_raw_parts(p.cast_const(), len as usize) })
    }
}

/// Which RX buffers an I/O provider has handed out (between a `Recv` event and
/// `return_rx`), and reads of those: the only buffers nobody else writes.
#[derive(Debug)]
pub struct Lent {
    rx: RxPool,
    out: Vec<bool>,
}

impl Lent {
    /// None of `rx`'s buffers handed out.
    ///
    /// # Safety
    /// `rx` must stay mapped while the value lives, and its owner must write a
    /// buffer (or let the kernel write it) only while it is not lent.
    pub unsafe fn new(rx: RxPool) -> Lent {
        Lent {
            out: vec![false; usize::from(rx.count)],
            rx,
        }
    }

    /// Buffer `bid` is handed out.
    pub fn lend(&mut self, bid: u16) {
        if let Some(o) = self.out.get_mut(usize::from(bid)) {
            *o = true;
        }
    }

    /// Whether buffer `bid` is handed out.
    pub fn is_out(&self, bid: u16) -> bool {
        self.out.get(usize::from(bid)).is_some_and(|o| *o)
    }

    /// Buffer `bid` comes back; `false` if it was not out.
    pub fn take_back(&mut self, bid: u16) -> bool {
        self.out
            .get_mut(usize::from(bid))
            .is_some_and(|o| std::mem::replace(o, false))
    }

    /// Bytes `[off, off + len)` of lent buffer `bid`; `None` if it is not lent or
    /// the range is outside it.
    pub fn bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        if !*self.out.get(usize::from(bid))? {
            return None;
        }
        // SAFETY: the pool is mapped while `self` lives and a lent buffer is
        // written by nobody (the contract of `Lent::new`); bounds are checked by
        // `RxPool::bytes`.
        unsafe { self.rx.bytes(bid, off, len) }
    }

    /// Bytes `[off, off + len)` of lent buffer `bid`, writable (to open a sealed
    /// datagram in place); `None` if it is not lent or the range is outside it.
    pub fn bytes_mut(&mut self, bid: u16, off: u32, len: u32) -> Option<&mut [u8]> {
        if !*self.out.get(usize::from(bid))?
            || u64::from(off) + u64::from(len) > u64::from(self.rx.buf_size)
        {
            return None;
        }
        let p = self.rx.buf(bid)?.wrapping_add(off as usize);
        // SAFETY: in bounds of buffer `bid` (checked above); the pool is mapped
        // while `self` lives and a lent buffer is written by nobody else (the
        // contract of `Lent::new`); `&mut self` keeps any other slice of this
        // value's buffers from living meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(p, len as usize) })
    }
}

/// What an I/O provider built by [`build_owned`] keeps alive: the memory its
/// kernel operations reference and the doorbell fd they watch.
pub struct Kept {
    _mem: Box<dyn IoMem>,
    _bell: Option<OwnedFd>,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept").finish_non_exhaustive()
    }
}

/// An I/O provider that can be built over raw memory ranges.
pub trait Build: Sized {
    /// The provider's options.
    type Opts;
    /// Builds the provider over `tx` and `rx`, watching doorbell `bell`.
    ///
    /// # Safety
    /// As the provider's `new`: both ranges stay mapped, and `bell` open, while it
    /// lives; nobody touches RX buffers the kernel owns.
    unsafe fn build(
        sock: OwnedFd,
        tx: TxMem,
        rx: RxPool,
        bell: Option<RawFd>,
        opts: Self::Opts,
    ) -> io::Result<Self>;
    /// Takes ownership of what must outlive its kernel references.
    fn keep(&mut self, kept: Kept);
}

/// Builds provider `I` over memory it then owns (the engine's `CoreMem`, or the
/// `OwnedMem` of tests and the probe's self-test), with the doorbell fd it owns.
pub fn build_owned<I: Build>(
    sock: OwnedFd,
    mem: impl IoMem + 'static,
    bell: Option<OwnedFd>,
    opts: I::Opts,
) -> io::Result<I> {
    let fd = bell.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: `mem` (an IoMem, see its contract) owns both ranges exclusively and
    // `bell` owns the fd; both are handed to the provider to keep (`Build::keep`),
    // which drops them after everything that references them.
    let mut me = unsafe { I::build(sock, mem.tx(), mem.rx(), fd, opts)? };
    me.keep(Kept {
        _mem: Box::new(mem),
        _bell: bell,
    });
    Ok(me)
}

/// An owned memory mapping.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is a plain address range; the engine moves it between threads
// only before use (set-up), and access to its bytes is coordinated by the ring
// protocols, not by Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the address and length.
unsafe impl Sync for Mapping {}

/// Gives the whole pages inside `[addr, addr + len)` (a range of a mapping of ours)
/// back to the system with `MADV_REMOVE`, which frees them from a shared memfd or
/// tmpfs mapping (userspace kshim's region: kshim's mapping of the same pages loses
/// them too); the range reads as zeros afterwards. Whether pages were given back.
///
/// Anything else is refused and left alone. In particular not `MADV_DONTNEED`: on
/// the kernel module's region (`remap_vmalloc_range`, no fault handler) it zaps the
/// engine's page table entries for good, and the next receive into the range fails
/// with `EFAULT`, so the core stops receiving.
///
/// The caller must own the range: nobody (kernel included) may be reading or
/// writing it, and nothing it held is needed any more.
pub fn give_back_pages(addr: usize, len: usize) -> bool {
    let start = addr.div_ceil(4096) * 4096;
    let end = (addr + len) / 4096 * 4096;
    if end <= start {
        return false;
    }
    let (addr, len) = (start, end - start);
    // SAFETY: madvise on a range of our own mappings that the caller owns (contract
    // above); MADV_REMOVE unmaps nothing, the pages only read as zero afterwards, and
    // where the mapping cannot do that it fails and changes nothing.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_REMOVE) == 0 }
}

impl Mapping {
    /// Anonymous, private, zeroed read-write memory.
    pub fn anon(len: usize) -> io::Result<Mapping> {
        Self::map(
            std::ptr::null_mut(),
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// A shared read-write mapping of `fd` (e.g. the region's memfd).
    pub fn shared(fd: RawFd, offset: u64, len: usize) -> io::Result<Mapping> {
        Self::map(std::ptr::null_mut(), len, libc::MAP_SHARED, fd, offset)
    }

    fn map(
        addr: *mut u8,
        len: usize,
        flags: libc::c_int,
        fd: RawFd,
        offset: u64,
    ) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::other("zero-length mapping"));
        }
        // SAFETY: mmap with a null or caller-reserved address; the result is checked.
        let p = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    /// A contiguous range: `anon_len` bytes of anonymous memory followed directly by a
    /// shared mapping of `fd` (`fd_len` bytes from `fd_off`). One registered io_uring
    /// buffer can then cover both: the engine's header arena and the region's TX pool.
    pub fn anon_then_shared(
        anon_len: usize,
        fd: RawFd,
        fd_off: u64,
        fd_len: usize,
    ) -> io::Result<Mapping> {
        let page = 4096;
        if anon_len % page != 0 || fd_off % page as u64 != 0 {
            return Err(io::Error::other(
                "anon_then_shared: lengths must be page multiples",
            ));
        }
        let total = anon_len + fd_len;
        // Reserve the whole range first, then replace both parts in place.
        // SAFETY: fresh PROT_NONE reservation; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let whole = Mapping {
            ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len: total,
        };
        let base = whole.ptr.as_ptr();
        let anon = Self::map(
            base,
            anon_len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )?;
        // SAFETY: `base + anon_len` stays inside the reservation of `total` bytes.
        let tail = unsafe { base.add(anon_len) };
        let shared = Self::map(tail, fd_len, libc::MAP_SHARED | libc::MAP_FIXED, fd, fd_off)?;
        // The parts now belong to `whole`; forget them so they are unmapped once.
        std::mem::forget(anon);
        std::mem::forget(shared);
        Ok(whole)
    }

    /// Copies `data` to byte `off` of the mapping; `false` if it does not fit.
    /// Used for engine-owned parts of mappings (the message-header area) that no Rust
    /// reference points into.
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        if off.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        let dst = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: bounds checked above; the mapping is live while `self` is; the
        // engine never forms Rust references into this memory (only the kernel reads
        // it during sends), so a plain copy cannot alias one.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        true
    }

    /// Copies `out.len()` bytes at `off` out of the mapping; `false` (and nothing
    /// read) when the range is outside it.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        if off.checked_add(out.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        let src = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: bounds checked above; the mapping is live while `self` is; a plain
        // copy out forms no reference into it.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        true
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are never empty); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this range, mapped by `map`/`anon_then_shared`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Memory an I/O layer may be built over safely: its TX range and RX pool stay mapped
/// as long as the value lives, and its RX buffers belong to it alone. Sealed: only the
/// types of this module ([`OwnedMem`], [`CoreMem`]) implement it.
pub trait IoMem: sealed::Sealed + Send + std::fmt::Debug {
    /// The TX range.
    fn tx(&self) -> TxMem;
    /// The RX pool.
    fn rx(&self) -> RxPool;
}

impl sealed::Sealed for OwnedMem {}
impl IoMem for OwnedMem {
    fn tx(&self) -> TxMem {
        self.tx
    }
    fn rx(&self) -> RxPool {
        self.rx
    }
}

/// One engine core's memory: a private mapping of [header arena | message-header area
/// | the region's TX pool] (the TX pool mapped a second time from the memfd, right
/// after the engine's own pages, so one registered buffer covers all), and this core's
/// share of the region's RX pool. Keeps the region mapped.
#[derive(Debug)]
pub struct CoreMem {
    /// The TX range: offsets are from the start of the private mapping.
    pub tx: TxMem,
    /// This core's RX buffers.
    pub rx: RxPool,
    /// First global RX buffer index of this core's share.
    pub rx_first: u32,
    /// Offset of the message-header area in the TX range.
    pub msg_hdr_off: usize,
    /// Message-header slots (128 bytes each).
    pub msg_hdr_slots: u32,
    /// Offset of the TX pool in the TX range.
    pub pool_off: usize,
    /// Offset of the seal scratch (see [`SealScratch`]) in the TX range, and its
    /// slot count (one per send slot).
    seal_off: usize,
    seal_slots: usize,
    seal_taken: std::sync::atomic::AtomicBool,
    map: Mapping,
    region: lu2k_ring_abi::Region,
}

impl sealed::Sealed for CoreMem {}
impl IoMem for CoreMem {
    fn tx(&self) -> TxMem {
        self.tx
    }
    fn rx(&self) -> RxPool {
        self.rx
    }
}

impl sealed::Sealed for std::sync::Arc<CoreMem> {}
impl IoMem for std::sync::Arc<CoreMem> {
    fn tx(&self) -> TxMem {
        self.tx
    }
    fn rx(&self) -> RxPool {
        self.rx
    }
}

/// Bytes per message-header slot in [`CoreMem`].
pub const MSG_HDR_SLOT: usize = 128;

impl CoreMem {
    /// Maps core `core`'s memory (of `cores`) for `send_slots` sends and
    /// `msg_hdr_slots` messages in flight.
    pub fn new(
        region: &lu2k_ring_abi::Region,
        core: u32,
        cores: u32,
        send_slots: usize,
        msg_hdr_slots: u32,
    ) -> io::Result<CoreMem> {
        use lu2k_ring_abi::Pool;
        use std::os::fd::AsRawFd as _;
        let layout = region.layout();
        let (tx_off, tx_len) = layout.pool(Pool::Tx);
        let arena = TxMem::arena_len(send_slots);
        let msg_area = (msg_hdr_slots as usize * MSG_HDR_SLOT).div_ceil(4096) * 4096;
        // Untouched anonymous pages cost nothing: a core that never seals never
        // faults its scratch in.
        let seal_area = send_slots * SEAL_SLOT;
        let own = arena + msg_area + seal_area;
        if tx_off % 4096 != 0 {
            return Err(io::Error::other("region TX pool is not page aligned"));
        }
        let map_len = (tx_len as usize).div_ceil(4096) * 4096;
        let map = Mapping::anon_then_shared(own, region.fd().as_raw_fd(), tx_off, map_len)?;
        let (rx_base, _) = region.pool_base(Pool::Rx);
        let h = layout.header();
        let per = h.rx_buf_count / cores.max(1);
        let first = per * core;
        if per == 0 {
            return Err(io::Error::other(
                "fewer RX buffers in the region than cores",
            ));
        }
        let count = per.min(1 << 15) as u16;
        let (first_off, size) = layout
            .rx_buffer(first)
            .ok_or_else(|| io::Error::other("RX buffer share out of range"))?;
        Ok(CoreMem {
            tx: TxMem {
                base: map.as_ptr() as usize,
                hdr_len: arena,
                pool_off: 0,
                pool_len: own + tx_len as usize,
                total_len: own + tx_len as usize,
            },
            rx: RxPool {
                base: rx_base.as_ptr() as usize + first_off as usize,
                stride: size as usize,
                buf_size: size,
                count,
            },
            rx_first: first,
            msg_hdr_off: arena,
            msg_hdr_slots,
            pool_off: own,
            seal_off: arena + msg_area,
            seal_slots: send_slots,
            seal_taken: std::sync::atomic::AtomicBool::new(false),
            map,
            region: region.clone(),
        })
    }

    /// Appends TX-range bytes `[off, off + len)` to `out` (a copy: for the
    /// virtual-time provider, whose "network" carries bytes). `false` when the range
    /// is outside the TX range.
    pub fn copy_tx(&self, off: u64, len: u32, out: &mut Vec<u8>) -> bool {
        let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
            return false;
        };
        let at = out.len();
        out.resize(at + len, 0);
        if self.map.read(off, &mut out[at..]) {
            return true;
        }
        out.truncate(at);
        false
    }

    /// Where RX buffer `bid` of this core lies in the region's RX pool.
    fn rx_buf_off(&self, bid: u16) -> Option<u64> {
        if bid >= self.rx.count {
            return None;
        }
        let layout = self.region.layout();
        layout
            .rx_buffer(self.rx_first + u32::from(bid))
            .map(|b| b.0)
    }

    /// Writes `data` at `off` of this core's RX buffer `bid` (what the kernel does
    /// on a receive; for the virtual-time provider).
    pub fn write_rx(&self, bid: u16, off: u32, data: &[u8]) -> bool {
        if (off as usize).saturating_add(data.len()) > self.rx.buf_size as usize {
            return false;
        }
        self.rx_buf_off(bid).is_some_and(|b| {
            self.region
                .write_pool(lu2k_ring_abi::Pool::Rx, b + u64::from(off), data)
                .is_ok()
        })
    }

    /// Bytes `[off, off + len)` of this core's RX buffer `bid`.
    pub fn rx_bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        if u64::from(off) + u64::from(len) > u64::from(self.rx.buf_size) {
            return None;
        }
        let b = self.rx_buf_off(bid)?;
        let ext = lu2k_ring_abi::Extent::new(lu2k_ring_abi::Pool::Rx, b + u64::from(off), len);
        self.region.pool_bytes(&ext).ok()
    }

    /// A record of lent RX buffers of this core, for the virtual-time provider,
    /// which writes a buffer (as the kernel would) only while it is not lent.
    pub fn lent(&self) -> Lent {
        // SAFETY: the pool lies in the region this value keeps mapped, and the
        // provider that asks for this record holds the `Arc<CoreMem>` as long as
        // the record (`SimIo`); it writes only buffers it has not lent.
        unsafe { Lent::new(self.rx) }
    }

    /// The core's seal scratch, once: the transport that seals owns it alone.
    pub fn take_seal_scratch(self: &std::sync::Arc<CoreMem>) -> Option<SealScratch> {
        use std::sync::atomic::Ordering;
        if self.seal_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(SealScratch {
            tx: self.tx,
            off: self.seal_off,
            slots: self.seal_slots,
            _mem: self.clone(),
        })
    }

    /// Writes a message header into slot `i` of the message-header area.
    pub fn write_msg_hdr(&self, i: u32, hdr: &[u8]) -> bool {
        i < self.msg_hdr_slots
            && hdr.len() <= MSG_HDR_SLOT
            && self
                .map
                .write(self.msg_hdr_off + i as usize * MSG_HDR_SLOT, hdr)
    }
}

/// Bytes per seal-scratch slot: one GSO send's datagrams, sealed.
pub const SEAL_SLOT: usize = 64 * 1024;

/// Where sealed datagrams are written before they are sent: one [`SEAL_SLOT`]
/// per send slot, in the core's private part of the TX range (so one registered
/// buffer covers them, and a send references them like any TX bytes). The
/// transport writes a slot only while no send references it (it frees a slot at
/// the send's `SendDone`), and reads the plaintext from the TX range through
/// [`TxRead`].
pub struct SealScratch {
    tx: TxMem,
    off: usize,
    slots: usize,
    _mem: std::sync::Arc<CoreMem>,
}

impl std::fmt::Debug for SealScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealScratch")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl SealScratch {
    /// Slots (one per send slot).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Offset of slot `i` in the TX range (a segment's payload offset).
    pub fn slot_off(&self, i: usize) -> u64 {
        (self.off + i * SEAL_SLOT) as u64
    }

    /// Slot `i`, writable, and a reader of the rest of the TX range. The caller
    /// writes a slot only while no send in flight references it.
    pub fn slot(&mut self, i: usize) -> Option<(&mut [u8], TxRead<'_>)> {
        if i >= self.slots {
            return None;
        }
        let p = (self.tx.base + self.off + i * SEAL_SLOT) as *mut u8;
        let read = TxRead {
            tx: self.tx,
            skip: (self.off, self.off + self.slots * SEAL_SLOT),
            _keep: std::marker::PhantomData,
        };
        // SAFETY: slot `i` lies inside the core's private mapping (`own` in
        // `CoreMem::new` reserves `slots * SEAL_SLOT` bytes at `off`), which the
        // `Arc<CoreMem>` held here keeps mapped; only this value hands out the
        // scratch (taken once from its `CoreMem`), `&mut self` keeps two slots
        // of it from being lent at once, and the kernel reads a slot only during
        // a send the caller started after writing it.
        let slot = unsafe { std::slice::from_raw_parts_mut(p, SEAL_SLOT) };
        Some((slot, read))
    }
}

/// Reads of the TX range outside the seal scratch (the plaintext of a sealed
/// datagram: message headers and TX pool extents).
#[derive(Debug, Clone, Copy)]
pub struct TxRead<'a> {
    tx: TxMem,
    skip: (usize, usize),
    _keep: std::marker::PhantomData<&'a SealScratch>,
}

impl TxRead<'_> {
    /// TX-range bytes `[off, off + len)`, or `None` outside the range or over the
    /// seal scratch.
    pub fn bytes(&self, off: u64, len: u32) -> Option<&[u8]> {
        let off = usize::try_from(off).ok()?;
        let end = off.checked_add(len as usize)?;
        if end > self.tx.pool_off + self.tx.pool_len || (off < self.skip.1 && end > self.skip.0) {
            return None;
        }
        let p = (self.tx.base + self.tx.pool_off + off) as *const u8;
        // SAFETY: in bounds of the TX range (checked above), which the
        // `SealScratch` this reader came from keeps mapped while the slot it was
        // lent with is borrowed; the scratch is excluded, so this never aliases
        // the slot being written. Message headers and TX pool extents are not
        // written while a descriptor that references them is in flight (the
        // ring ABI's contract with kshim), which is when they are sealed.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }
}

/// TX memory (header arena + payload pool) and an RX pool in private anonymous
/// mappings owned by this value: what tests and the probe's self-test drive the I/O
/// layers with when there is no shared region.
#[derive(Debug)]
pub struct OwnedMem {
    /// The TX range description (points into `_tx_map`).
    pub tx: TxMem,
    /// The RX pool description (points into `_rx_map`).
    pub rx: RxPool,
    tx_map: Mapping,
    _rx_map: Mapping,
    rx_memfd: Option<OwnedFd>,
}

impl OwnedMem {
    /// Header arena for `send_slots` sends, a `pool_len`-byte TX pool, and `rx_count`
    /// RX buffers of `rx_buf` bytes.
    pub fn new(
        send_slots: usize,
        pool_len: usize,
        rx_count: u16,
        rx_buf: u32,
    ) -> io::Result<OwnedMem> {
        let arena = TxMem::arena_len(send_slots);
        let pool_len = pool_len.max(1).div_ceil(4096) * 4096;
        let tx_map = Mapping::anon(arena + pool_len)?;
        let stride = (rx_buf as usize).div_ceil(64) * 64;
        let rx_map = Mapping::anon(stride * rx_count.max(1) as usize)?;
        Ok(OwnedMem {
            tx: TxMem {
                base: tx_map.as_ptr() as usize,
                hdr_len: arena,
                pool_off: arena,
                pool_len,
                total_len: arena + pool_len,
            },
            rx: RxPool {
                base: rx_map.as_ptr() as usize,
                stride,
                buf_size: rx_buf,
                count: rx_count,
            },
            tx_map,
            _rx_map: rx_map,
            rx_memfd: None,
        })
    }

    /// As [`OwnedMem::new`], but the RX pool is a shared mapping of a sparse memfd,
    /// as kshim's region is: pages the pool gives back leave the memfd
    /// ([`OwnedMem::rx_memfd`] shows its allocated blocks).
    pub fn with_memfd_rx(
        send_slots: usize,
        pool_len: usize,
        rx_count: u16,
        rx_buf: u32,
    ) -> io::Result<OwnedMem> {
        let mut m = OwnedMem::new(send_slots, pool_len, 1, 4096)?;
        let stride = (rx_buf as usize).div_ceil(4096) * 4096;
        let len = stride * rx_count.max(1) as usize;
        let fd = rustix::fs::memfd_create("lu2k-rx-pool", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(io::Error::from)?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(io::Error::from)?;
        let map = Mapping::shared(fd.as_raw_fd(), 0, len)?;
        m.rx = RxPool {
            base: map.as_ptr() as usize,
            stride,
            buf_size: rx_buf,
            count: rx_count,
        };
        m._rx_map = map;
        m.rx_memfd = Some(fd);
        Ok(m)
    }

    /// The memfd behind the RX pool, where [`OwnedMem::with_memfd_rx`] made one.
    pub fn rx_memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.rx_memfd.as_ref().map(|f| f.as_fd())
    }

    /// The TX payload pool, writable (fill it before sending).
    pub fn pool_mut(&mut self) -> &mut [u8] {
        let p = self.tx_map.as_ptr().wrapping_add(self.tx.pool_off);
        // SAFETY: the pool lies inside `tx_map`, which we own exclusively; `&mut self`
        // guarantees no other Rust reference to it. (The kernel reads it only during
        // sends, which callers start after filling, through an I/O value that then owns
        // this OwnedMem, so `pool_mut` cannot be called any more.)
        unsafe { std::slice::from_raw_parts_mut(p, self.tx.pool_len) }
    }
}

/// Blocks `SIGTERM`, `SIGINT` and `SIGHUP` in the calling thread (threads spawned
/// afterwards inherit the mask), so that [`wait_signal`] can take them synchronously.
pub fn block_term_signals() -> io::Result<()> {
    let set = term_sigset();
    // SAFETY: `set` is an initialised sigset; the old mask is not needed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

fn term_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset initialises the set we own.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the set was initialised above; `sig` is a valid signal.
        unsafe { libc::sigaddset(set.as_mut_ptr(), sig) };
    }
    // SAFETY: initialised by sigemptyset above.
    unsafe { set.assume_init() }
}

/// Waits for one of the signals blocked by [`block_term_signals`]; returns its number.
pub fn wait_signal() -> io::Result<i32> {
    let set = term_sigset();
    let mut sig = 0;
    // SAFETY: `set` and `sig` are live locals.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

/// Sends `sig` to this process (used to wake the signal thread at shutdown).
pub fn raise_self(sig: i32) {
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: kill(2) on our own pid with a valid signal number.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Pins the calling thread to `cpu` (best effort: errors are returned, callers may ignore).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set` (cpu is bounded by CPU_SETSIZE below).
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: `set` is a live, initialised cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    cvt(ret).map(drop)
}

/// The kernel release string (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_layout_in_canonical_form() {
        let v4: SocketAddr = "10.1.2.3:7988".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:7988".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:7988".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v6), v6);
        for (addr, family, len) in [
            (v4, Family::V4, size_of::<libc::sockaddr_in>()),
            (v4, Family::V6, size_of::<libc::sockaddr_in6>()),
            (mapped, Family::V4, size_of::<libc::sockaddr_in>()),
            (v6, Family::V6, size_of::<libc::sockaddr_in6>()),
        ] {
            let (raw, l) = RawAddr::new(addr, family);
            assert_eq!(l as usize, len, "{addr} on {family:?}");
            // Read back as the kernel's bytes: the IPv4-mapped form is unmapped.
            assert_eq!(raw.get(), Some(canonical(addr)), "{addr} on {family:?}");
        }
        // An IPv4 destination on an IPv6 socket is written IPv4-mapped.
        let (raw, _) = RawAddr::new(v4, Family::V6);
        // SAFETY: `new` wrote the union whole, and sockaddr_in6 is plain old data.
        let sa6 = unsafe { raw.v6 };
        assert_eq!(sa6.sin6_family, libc::AF_INET6 as libc::sa_family_t);
        assert_eq!(
            std::net::Ipv6Addr::from(sa6.sin6_addr.s6_addr),
            "::ffff:10.1.2.3".parse::<std::net::Ipv6Addr>().unwrap()
        );
        // Too short, or another family: nothing.
        assert_eq!(sockaddr_from_bytes(&[0u8; 4]), None);
        let mut unix = [0u8; 28];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(sockaddr_from_bytes(&unix), None);
        let mut short6 = [0u8; 20];
        short6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        assert_eq!(sockaddr_from_bytes(&short6), None);
    }
}
