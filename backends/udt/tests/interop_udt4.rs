//! lu2k-udt against the reference UDT 4.11 (through the `udt` crate) over
//! loopback.
//!
//! The lu2k side is the sans-IO [`Connection`] driven by a plain UDP driver
//! in this file (one non-blocking `UdpSocket`, `ppoll` for timers); the
//! UDT4 side is the C++ library with its own threads. Each run moves
//! [`BYTES`] in each direction at once and checks every byte: content comes
//! from a seeded generator addressed by stream offset, the receiver compares
//! every message (or stream chunk) with it and the FNV-1a checksums of the
//! whole streams must match.
//!
//! * lu2k client → UDT4 server, message mode (`UDT_DGRAM`, `sendmsg` /
//!   `recvmsg`) and stream mode (`UDT_STREAM`, `send` / `recv`);
//! * UDT4 client → lu2k server ([`Listener`] with SYN cookies), both modes;
//!   in message mode the handshakes' peer-IP field UDT4 writes must decode,
//!   in lu2k's decoding ([`HandshakeRepr::decode_peer_ip`]), to lu2k's address;
//! * lu2k client → relay → UDT4 server in message mode, the relay dropping
//!   1 % of the datagrams in each direction (seeded);
//! * the reference for that run: UDT4 client → the same relay → UDT4
//!   server, so lu2k's native sender can be set beside UDT4's own sender
//!   facing the same (UDT4) receiver.
//!
//! * over IPv6 (`::1`), lu2k client → UDT4 server and UDT4 client → lu2k
//!   server in both modes. Besides the bytes, each side must read the other's
//!   handshake peer-IP field as its own address (lu2k through
//!   [`HandshakeRepr::decode_peer_ip`], UDT4 through `getsockname`, which
//!   UDT4 fills from that field), and the field bytes lu2k writes must be
//!   the bytes UDT4 writes: a UDT4 → UDT4 connection over `::1` through a
//!   recording relay gives the reference.
//!
//! The IPv4 runs also check that UDT4 read lu2k's peer-IP field as its own
//! address.
//!
//! UDT4 is driven through its C API ([`udt4`]): the `udt` crate's wrapper
//! is IPv4 only (it converts every address through a `sockaddr_in`).
//!
//! The runs are serialized (one mutex): they share two CPU cores with the
//! rest of the test suite and a UDT4 library instance.

use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, Config, Connection, Event, Extent, Listener, ListenerOutput, Mode,
};
use lu2k_udt::wire::{ControlRepr, HandshakeRepr};
use std::collections::{BTreeSet, HashMap};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use udt4::UdtSocket;

/// Bytes moved in each direction per run.
const BYTES: u64 = 64 << 20;
/// Largest message in message mode (an LNet message: 1 MiB + header).
const MAX_MSG: usize = (1 << 20) + 72;
/// Give up on a run after this long (a hang is a failure, not a timeout of
/// the whole suite).
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// Bytes registered with the connection and not yet acknowledged, at most.
const TX_OUTSTANDING: u64 = 16 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------ content

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The byte at every offset of a seeded stream.
fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let mut off = offset;
    let mut i = 0;
    while i < out.len() {
        let word = splitmix(seed ^ (off / 8)).to_le_bytes();
        let k = (off % 8) as usize;
        let n = (8 - k).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[k..k + n]);
        i += n;
        off += n as u64;
    }
}

/// Message (or send-chunk) sizes summing to `total`: a quarter small, the
/// rest 64 KiB ..= 1 MiB + 72, as LNet traffic.
fn plan(seed: u64, total: u64) -> Vec<usize> {
    let mut v = Vec::new();
    let mut left = total;
    let mut s = seed;
    while left > 0 {
        s = splitmix(s);
        let want = if s % 4 == 0 {
            1 + (s >> 8) as usize % 4096
        } else {
            (64 << 10) + (s >> 8) as usize % (MAX_MSG - (64 << 10))
        };
        let n = (want as u64).min(left) as usize;
        v.push(n);
        left -= n as u64;
    }
    v
}

#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn expected_checksum(seed: u64, total: u64) -> u64 {
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < total {
        let n = (total - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.0
}

/// Checks received bytes against the generator, in order.
struct Verifier {
    seed: u64,
    offset: u64,
    hash: Fnv,
    scratch: Vec<u8>,
    messages: usize,
}

impl Verifier {
    fn new(seed: u64) -> Verifier {
        Verifier {
            seed,
            offset: 0,
            hash: Fnv::new(),
            scratch: Vec::new(),
            messages: 0,
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        self.scratch.resize(bytes.len(), 0);
        fill(self.seed, self.offset, &mut self.scratch);
        if self.scratch != bytes {
            let at = (0..bytes.len())
                .find(|&i| self.scratch[i] != bytes[i])
                .unwrap_or(0);
            panic!(
                "content mismatch at stream offset {} (chunk of {} bytes, message #{})",
                self.offset + at as u64,
                bytes.len(),
                self.messages
            );
        }
        self.hash.update(bytes);
        self.offset += bytes.len() as u64;
    }
}

// ------------------------------------------------------------------ UDT4 side

/// The reference UDT4 through its C API (`libudt4-sys`), in either address
/// family.
///
/// The `udt` crate's safe wrapper cannot reach UDT4's IPv6 path: its
/// `bind` and `connect` build a `sockaddr_in` and panic on an IPv6
/// `SocketAddr` ("ipv6 not implemented (yet) in this binding"), and its
/// `accept`, `getsockname` and `getpeername` hand UDT4 a 16-byte `sockaddr`
/// to fill, which UDT4 overruns with a 28-byte `sockaddr_in6` on an IPv6
/// socket before the wrapper panics on the family. Here every address
/// buffer is the socket family's own structure, and only the calls these
/// tests make are bound.
#[allow(unsafe_code)]
mod udt4 {
    use libudt4_sys as raw;
    use std::ffi::CStr;
    use std::fmt;
    use std::mem::size_of;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::raw::{c_int, c_void};
    use std::sync::Once;

    /// A UDT4 error: its code and UDT4's description.
    #[derive(Debug)]
    pub struct Error {
        code: i32,
        desc: String,
    }

    impl fmt::Display for Error {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "UDT4 error {}: {}", self.code, self.desc)
        }
    }

    fn last_error() -> Error {
        // SAFETY: no arguments; reads this thread's last UDT4 error.
        let code = unsafe { raw::udt_getlasterror_code() };
        // SAFETY: no arguments; returns a pointer into this thread's UDT4
        // error state, valid until the next UDT4 call on this thread.
        let p = unsafe { raw::udt_getlasterror_desc() };
        let desc = if p.is_null() {
            String::new()
        } else {
            // SAFETY: `p` is non-null, NUL-terminated (UDT4 builds it as a
            // std::string) and stays valid until this thread's next UDT4
            // call; it is copied out at once.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Error { code, desc }
    }

    fn startup() {
        static STARTED: Once = Once::new();
        // UDT4 counts startups and is never cleaned up here: its threads
        // end with the process.
        // SAFETY: no arguments; initializes UDT4's global state, once.
        STARTED.call_once(|| unsafe { raw::udt_startup() });
    }

    /// The `int`-valued options this test sets: the only ones [`UdtSocket`]
    /// passes to `udt_setsockopt` (UDT4 reads other options as other types).
    #[derive(Debug, Clone, Copy)]
    pub enum UdpBuf {
        Rcv,
        Snd,
    }

    /// A UDT4 socket (UDT4's handle: copies name the same socket, as the
    /// C API's integers do).
    #[derive(Debug, Clone, Copy)]
    pub struct UdtSocket {
        id: raw::UDTSOCKET,
        v6: bool,
    }

    /// An address in the layout of its family's `sockaddr_*`.
    enum RawAddr {
        V4(libc::sockaddr_in),
        V6(libc::sockaddr_in6),
    }

    impl RawAddr {
        fn empty(v6: bool) -> RawAddr {
            if v6 {
                RawAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
            } else {
                RawAddr::from(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            }
        }

        fn len(&self) -> c_int {
            match self {
                RawAddr::V4(_) => size_of::<libc::sockaddr_in>() as c_int,
                RawAddr::V6(_) => size_of::<libc::sockaddr_in6>() as c_int,
            }
        }

        fn as_ptr(&self) -> *const libc::sockaddr {
            match self {
                RawAddr::V4(a) => (a as *const libc::sockaddr_in).cast(),
                RawAddr::V6(a) => (a as *const libc::sockaddr_in6).cast(),
            }
        }

        fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
            match self {
                RawAddr::V4(a) => (a as *mut libc::sockaddr_in).cast(),
                RawAddr::V6(a) => (a as *mut libc::sockaddr_in6).cast(),
            }
        }

        fn to_socket_addr(&self) -> SocketAddr {
            match self {
                RawAddr::V4(a) => SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )),
                RawAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    u32::from_be(a.sin6_flowinfo),
                    a.sin6_scope_id,
                )),
            }
        }
    }

    impl From<SocketAddr> for RawAddr {
        fn from(a: SocketAddr) -> RawAddr {
            match a {
                SocketAddr::V4(a) => RawAddr::V4(libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                }),
                SocketAddr::V6(a) => RawAddr::V6(libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                }),
            }
        }
    }

    fn ok(ret: c_int) -> Result<(), Error> {
        if ret == raw::UDT_ERROR {
            Err(last_error())
        } else {
            Ok(())
        }
    }

    impl UdtSocket {
        /// A socket of `ip`'s family: message mode (`SOCK_DGRAM`) or
        /// stream mode (`SOCK_STREAM`).
        pub fn new(ip: std::net::IpAddr, message: bool) -> Result<UdtSocket, Error> {
            startup();
            let v6 = ip.is_ipv6();
            let af = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            let ty = if message {
                libc::SOCK_DGRAM
            } else {
                libc::SOCK_STREAM
            };
            // SAFETY: plain integers in; UDT4 returns a handle or
            // INVALID_SOCK.
            let id = unsafe { raw::udt_socket(af, ty, 0) };
            if id == raw::INVALID_SOCK {
                return Err(last_error());
            }
            Ok(UdtSocket { id, v6 })
        }

        /// Sets a UDP buffer size (`UDP_RCVBUF`, `UDP_SNDBUF`).
        pub fn set_udp_buf(&self, opt: UdpBuf, v: c_int) -> Result<(), Error> {
            let opt = match opt {
                UdpBuf::Rcv => raw::UDTOpt::UDP_RCVBUF,
                UdpBuf::Snd => raw::UDTOpt::UDP_SNDBUF,
            };
            let p: *const c_int = &v;
            // SAFETY: `p` points to a live c_int for the call; for these two
            // options UDT4's `setOpt` reads exactly one `int` through it
            // (`*(int*)optval`; it ignores the length) and copies the value.
            ok(unsafe {
                raw::udt_setsockopt(
                    self.id,
                    0,
                    opt,
                    p.cast::<c_void>(),
                    size_of::<c_int>() as c_int,
                )
            })
        }

        pub fn bind(&self, at: SocketAddr) -> Result<(), Error> {
            let a = RawAddr::from(at);
            // SAFETY: `a` is a sockaddr of `a.len()` bytes, live for the
            // call; UDT4 copies it.
            ok(unsafe { raw::udt_bind(self.id, a.as_ptr(), a.len()) })
        }

        pub fn listen(&self, backlog: c_int) -> Result<(), Error> {
            // SAFETY: plain integers in.
            ok(unsafe { raw::udt_listen(self.id, backlog) })
        }

        /// Blocks for the next connection; returns it and the peer.
        pub fn accept(&self) -> Result<(UdtSocket, SocketAddr), Error> {
            let mut a = RawAddr::empty(self.v6);
            let mut len = a.len();
            // SAFETY: `a` is a writable buffer of `len` bytes of the
            // listener's family, the size UDT4 writes for that family;
            // both live for the call.
            let id = unsafe { raw::udt_accept(self.id, a.as_mut_ptr(), &mut len) };
            if id == raw::INVALID_SOCK {
                return Err(last_error());
            }
            assert_eq!(len, a.len(), "UDT4 accept wrote an address of another size");
            Ok((UdtSocket { id, v6: self.v6 }, a.to_socket_addr()))
        }

        pub fn connect(&self, to: SocketAddr) -> Result<(), Error> {
            let a = RawAddr::from(to);
            // SAFETY: `a` is a sockaddr of `a.len()` bytes, live for the
            // (blocking) call.
            ok(unsafe { raw::udt_connect(self.id, a.as_ptr(), a.len()) })
        }

        /// The local address; on a connected socket, UDT4 takes its IP from
        /// the peer-IP field of the peer's handshake.
        pub fn getsockname(&self) -> Result<SocketAddr, Error> {
            let mut a = RawAddr::empty(self.v6);
            let mut len = a.len();
            // SAFETY: `a` is a writable buffer of `len` bytes of the
            // socket's family, the size UDT4 writes for that family; both
            // live for the call.
            ok(unsafe { raw::udt_getsockname(self.id, a.as_mut_ptr(), &mut len) })?;
            assert_eq!(
                len,
                a.len(),
                "UDT4 getsockname wrote an address of another size"
            );
            Ok(a.to_socket_addr())
        }

        pub fn close(self) -> Result<(), Error> {
            // SAFETY: plain integer in; UDT4 rejects a handle it does not
            // know.
            ok(unsafe { raw::udt_close(self.id) })
        }

        /// Sends one message (in order, no TTL); blocks for buffer space.
        pub fn sendmsg(&self, buf: &[u8]) -> Result<usize, Error> {
            // SAFETY: `buf` is readable for its length during the call;
            // UDT4 copies it into its send buffer before returning.
            let n = unsafe { raw::udt_sendmsg(self.id, buf.as_ptr(), buf.len() as c_int, -1, 1) };
            ok(n).map(|()| n as usize)
        }

        /// Receives one message into `buf`.
        pub fn recvmsg(&self, buf: &mut [u8]) -> Result<usize, Error> {
            // SAFETY: `buf` is writable for its length during the call, and
            // UDT4 writes at most that many bytes.
            let n = unsafe { raw::udt_recvmsg(self.id, buf.as_mut_ptr(), buf.len() as c_int) };
            ok(n).map(|()| n as usize)
        }

        /// Sends stream bytes; returns how many UDT4 took.
        pub fn send(&self, buf: &[u8]) -> Result<usize, Error> {
            // SAFETY: `buf` is readable for its length during the call;
            // UDT4 copies what it takes.
            let n = unsafe { raw::udt_send(self.id, buf.as_ptr(), buf.len() as c_int, 0) };
            ok(n).map(|()| n as usize)
        }

        /// Receives stream bytes into `buf`.
        pub fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
            // SAFETY: `buf` is writable for its length during the call, and
            // UDT4 writes at most that many bytes.
            let n = unsafe { raw::udt_recv(self.id, buf.as_mut_ptr(), buf.len() as c_int, 0) };
            ok(n).map(|()| n as usize)
        }
    }
}

fn udt4_socket(mode: Mode, ip: IpAddr) -> UdtSocket {
    let s = UdtSocket::new(ip, mode == Mode::Message).expect("UDT4 socket");
    // The kernel caps these at rmem_max / wmem_max.
    s.set_udp_buf(udt4::UdpBuf::Rcv, 4 << 20).unwrap();
    s.set_udp_buf(udt4::UdpBuf::Snd, 4 << 20).unwrap();
    s
}

/// Sends the seeded stream through UDT4: messages of `plan` sizes, or
/// stream chunks of those sizes.
fn udt4_send(s: UdtSocket, mode: Mode, seed: u64, total: u64) {
    let mut buf = vec![0u8; MAX_MSG];
    let mut off = 0u64;
    for len in plan(seed ^ 0x51, total) {
        fill(seed, off, &mut buf[..len]);
        match mode {
            Mode::Message => {
                let n = s.sendmsg(&buf[..len]).expect("UDT4 sendmsg");
                assert_eq!(n, len, "UDT4 sendmsg took the whole message");
            }
            Mode::Stream => {
                let mut at = 0;
                while at < len {
                    let n = s.send(&buf[at..len]).expect("UDT4 send");
                    at += n;
                }
            }
        }
        off += len as u64;
    }
}

/// Receives and verifies the seeded stream through UDT4; returns the
/// checksum and the number of messages.
fn udt4_recv(s: UdtSocket, mode: Mode, seed: u64, total: u64) -> (u64, usize) {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; MAX_MSG + 4096];
    let sizes = plan(seed ^ 0x51, total);
    while v.offset < total {
        match mode {
            Mode::Message => {
                let n = s.recvmsg(&mut buf).expect("UDT4 recvmsg");
                assert_eq!(
                    n, sizes[v.messages],
                    "UDT4 received message #{} with the wrong length",
                    v.messages
                );
                v.take(&buf[..n]);
            }
            Mode::Stream => {
                let n = s.recv(&mut buf[..MAX_MSG]).expect("UDT4 recv");
                v.take(&buf[..n]);
            }
        }
        v.messages += 1;
    }
    assert_eq!(v.offset, total, "UDT4 received more than was sent");
    (v.hash.0, v.messages)
}

// ------------------------------------------------------------------ lu2k side

fn set_bufs(sock: &UdpSocket) {
    use rustix::net::sockopt;
    let fd = sock.as_fd();
    if sockopt::set_socket_recv_buffer_size_force(fd, 8 << 20).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(fd, 8 << 20);
    }
    if sockopt::set_socket_send_buffer_size_force(fd, 8 << 20).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(fd, 8 << 20);
    }
}

fn lu2k_config(mode: Mode, cc: Kind) -> Config {
    Config {
        mode,
        cc,
        // Loopback: size the windows for 1 Gbit/s at 10 ms.
        bdp_bandwidth_bps: 1_000_000_000,
        bdp_rtt_us: 10_000,
        ..Config::default()
    }
}

/// The peer-IP field of a handshake datagram (control bit set, type 0),
/// as on the wire: words 8..=11 of the control information.
fn handshake_peer_ip_field(datagram: &[u8]) -> Option<[u8; 16]> {
    const AT: usize = 16 + 4 * 8;
    if datagram.len() < 16 + HandshakeRepr::LEN || datagram[0] != 0x80 || datagram[1] != 0 {
        return None;
    }
    datagram[AT..AT + 16].try_into().ok()
}

/// A blocking-style UDP driver around one [`Connection`] (or, on the server
/// side, a [`Listener`] until it accepts).
struct Driver {
    sock: UdpSocket,
    start: Instant,
    peer: SocketAddr,
    conn: Option<Connection>,
    listener: Option<Listener>,
    mode: Mode,
    // sending
    tx_seed: u64,
    tx_total: u64,
    tx_plan: Vec<usize>,
    tx_next: usize,
    tx_registered: u64,
    tx_acked: u64,
    tx_msgs: HashMap<u64, (u64, u64)>, // id -> (stream offset, len)
    // receiving
    rx: Verifier,
    rx_total: u64,
    rx_sizes: Vec<usize>,
    bufs: HashMap<u64, Vec<u8>>,
    next_buf: u64,
    dgram: Vec<u8>,
    closed: Option<String>,
    tx_done_at: Option<Duration>,
    rx_done_at: Option<Duration>,
    /// What lu2k's full ACKs told UDT4: count, min available buffer, max
    /// receive rate and max link capacity (packets/s).
    acks_out: (u64, u32, u32, u32),
    /// The peer-IP field of every handshake received, decoded in the
    /// family of the socket.
    hs_peer_ips: Vec<IpAddr>,
    /// The peer-IP field of every handshake sent, as on the wire.
    hs_sent: Vec<[u8; 16]>,
}

impl Driver {
    fn new(sock: UdpSocket, peer: SocketAddr, mode: Mode, tx_seed: u64, rx_seed: u64) -> Driver {
        sock.set_nonblocking(true).unwrap();
        set_bufs(&sock);
        Driver {
            sock,
            start: Instant::now(),
            peer,
            conn: None,
            listener: None,
            mode,
            tx_seed,
            tx_total: BYTES,
            tx_plan: plan(tx_seed ^ 0x51, BYTES),
            tx_next: 0,
            tx_registered: 0,
            tx_acked: 0,
            tx_msgs: HashMap::new(),
            rx: Verifier::new(rx_seed),
            rx_total: BYTES,
            rx_sizes: plan(rx_seed ^ 0x51, BYTES),
            bufs: HashMap::new(),
            next_buf: 0,
            dgram: vec![0u8; 65536],
            closed: None,
            tx_done_at: None,
            rx_done_at: None,
            acks_out: (0, u32::MAX, 0, 0),
            hs_peer_ips: Vec::new(),
            hs_sent: Vec::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn tx_done(&self) -> bool {
        self.tx_acked == self.tx_total
    }

    fn rx_done(&self) -> bool {
        self.rx.offset == self.rx_total
    }

    fn send_datagram(&self, bytes: &[u8]) {
        loop {
            match self.sock.send_to(bytes, self.peer) {
                Ok(_) => return,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut fds = [rustix::event::PollFd::new(
                        &self.sock,
                        rustix::event::PollFlags::OUT,
                    )];
                    let t = rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 1_000_000,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&t));
                }
                // Loopback ICMP errors (peer gone) and the like: the
                // protocol sees it as loss.
                Err(_) => return,
            }
        }
    }

    /// One round: timers, new messages, transmits, events, received
    /// datagrams, then wait for the socket or the next deadline.
    fn step(&mut self) {
        let now = self.now();
        if let Some(conn) = self.conn.as_mut() {
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
            // Register more of the stream while little is outstanding.
            while conn.is_connected()
                && self.tx_next < self.tx_plan.len()
                && self.tx_registered - self.tx_acked < TX_OUTSTANDING
            {
                let len = self.tx_plan[self.tx_next] as u64;
                let id = self.tx_next as u64;
                conn.send(now, id, len, None).expect("lu2k send");
                self.tx_msgs.insert(id, (self.tx_registered, len));
                self.tx_registered += len;
                self.tx_next += 1;
            }
        }
        self.flush(now);
        self.drain_events();
        let got = self.receive(now);
        if got == 0 {
            self.flush(self.now());
            self.wait();
        }
    }

    fn flush(&mut self, now: u64) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut out = Vec::with_capacity(2048);
        while let Some(t) = conn.poll_transmit(now) {
            out.clear();
            out.extend_from_slice(t.header.as_bytes());
            if let Ok(ControlRepr::Ack {
                stats: Some(st), ..
            }) = ControlRepr::parse_bytes(t.header.as_bytes())
            {
                let a = &mut self.acks_out;
                a.0 += 1;
                a.1 = a.1.min(st.avail_buf);
                if let Some(r) = st.rates {
                    a.2 = a.2.max(r.recv_rate);
                    a.3 = a.3.max(r.link_capacity);
                }
            }
            if let Some(f) = handshake_peer_ip_field(&out) {
                self.hs_sent.push(f);
            }
            if let Some(p) = t.payload {
                let (base, len) = self.tx_msgs[&p.msg];
                assert!(
                    u64::from(p.offset) + u64::from(p.len) <= len,
                    "payload reference outside message {}",
                    p.msg
                );
                let at = out.len();
                out.resize(at + p.len as usize, 0);
                fill(self.tx_seed, base + u64::from(p.offset), &mut out[at..]);
            }
            // Inline send (borrowck: `self.conn` is borrowed).
            loop {
                match self.sock.send_to(&out, self.peer) {
                    Ok(_) => break,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_micros(50));
                    }
                    Err(_) => break,
                }
            }
        }
    }

    fn drain_events(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while let Some(ext) = conn.poll_release() {
            self.bufs.remove(&ext.buf);
        }
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Connected => {}
                Event::MessageReceived { extents, .. } => {
                    assert_eq!(self.mode, Mode::Message, "message event in stream mode");
                    let mut msg = Vec::new();
                    for e in &extents {
                        let b = &self.bufs[&e.buf];
                        msg.extend_from_slice(&b[e.offset as usize..(e.offset + e.len) as usize]);
                    }
                    for e in &extents {
                        self.bufs.remove(&e.buf);
                    }
                    let k = self.rx.messages;
                    assert!(k < self.rx_sizes.len(), "more messages than UDT4 sent");
                    assert_eq!(
                        msg.len(),
                        self.rx_sizes[k],
                        "lu2k received message #{k} with the wrong length"
                    );
                    self.rx.take(&msg);
                    self.rx.messages += 1;
                }
                Event::StreamData(e) => {
                    assert_eq!(self.mode, Mode::Stream, "stream event in message mode");
                    let b = self.bufs.remove(&e.buf).expect("stream extent buffer");
                    self.rx
                        .take(&b[e.offset as usize..(e.offset + e.len) as usize]);
                }
                Event::MessageAcked { msg } => {
                    let (_, len) = self.tx_msgs.remove(&msg).expect("ack of a known message");
                    self.tx_acked += len;
                }
                Event::MessageDropped { msg, reason } => {
                    panic!("lu2k dropped message {msg}: {reason:?}")
                }
                Event::Closed { reason } => self.closed = Some(format!("{reason:?}")),
            }
        }
    }

    /// Receives what is waiting (up to a batch); returns how many.
    fn receive(&mut self, now: u64) -> usize {
        let mut n = 0;
        while n < 64 {
            let (len, from) = match self.sock.recv_from(&mut self.dgram) {
                Ok(x) => x,
                Err(_) => break,
            };
            n += 1;
            let data = &self.dgram[..len];
            if handshake_peer_ip_field(data).is_some() {
                if let Ok(ControlRepr::Handshake(h)) = ControlRepr::parse_bytes(data) {
                    let v6 = from.is_ipv6();
                    self.hs_peer_ips
                        .push(HandshakeRepr::decode_peer_ip(h.peer_ip, v6));
                }
            }
            if self.conn.is_none() {
                let Some(l) = self.listener.as_mut() else {
                    continue;
                };
                match l.handle(now, from, data) {
                    ListenerOutput::Reply(h) => {
                        self.peer = from;
                        let bytes = h.as_bytes().to_vec();
                        self.hs_sent.extend(handshake_peer_ip_field(&bytes));
                        self.send_datagram(&bytes);
                    }
                    ListenerOutput::Accept(c) => {
                        self.peer = from;
                        self.conn = Some(*c);
                    }
                    ListenerOutput::Drop(_) => {}
                }
                continue;
            }
            let conn = self.conn.as_mut().unwrap();
            if from != self.peer {
                continue;
            }
            // A repeated handshake to socket 0 from our client goes to the
            // connection, which repeats its response.
            if self.listener.is_some()
                && handshake_socket_id(data).is_some_and(|id| id != conn.peer_socket_id())
            {
                continue;
            }
            let id = self.next_buf;
            let at = Extent {
                buf: id,
                offset: 0,
                len: len as u32,
            };
            if conn.handle_datagram(now, data, at) {
                self.bufs.insert(id, data.to_vec());
                self.next_buf += 1;
            }
        }
        n
    }

    fn wait(&self) {
        let now = self.now();
        let deadline = self
            .conn
            .as_ref()
            .and_then(|c| c.poll_timeout())
            .unwrap_or(now + 5_000);
        let wait_us = deadline.saturating_sub(now).min(5_000);
        if wait_us == 0 {
            return;
        }
        let mut fds = [rustix::event::PollFd::new(
            &self.sock,
            rustix::event::PollFlags::IN,
        )];
        let t = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: (wait_us * 1000) as i64,
        };
        let _ = rustix::event::poll(&mut fds, Some(&t));
    }

    fn summary(&self) -> String {
        format!(
            "tx acked {}/{} registered {} | rx {}/{} ({} msgs) | closed {:?} | {}",
            self.tx_acked,
            self.tx_total,
            self.tx_registered,
            self.rx.offset,
            self.rx_total,
            self.rx.messages,
            self.closed,
            self.conn
                .as_ref()
                .map_or("no connection".into(), |c| format!(
                    "{:?} {}",
                    c.stats(),
                    c.debug_summary()
                ))
        )
    }

    /// Drives until both directions are complete and `peer_done` is set,
    /// then closes.
    fn run(&mut self, peer_done: &AtomicBool) {
        let limit = Instant::now() + RUN_LIMIT;
        while !(self.tx_done() && self.rx_done() && peer_done.load(Ordering::Acquire)) {
            assert!(
                self.closed.is_none(),
                "lu2k connection closed early: {}",
                self.summary()
            );
            assert!(Instant::now() < limit, "run timed out: {}", self.summary());
            self.step();
            if self.tx_done_at.is_none() && self.tx_done() {
                self.tx_done_at = Some(self.start.elapsed());
            }
            if self.rx_done_at.is_none() && self.rx_done() {
                self.rx_done_at = Some(self.start.elapsed());
            }
        }
        let now = self.now();
        let conn = self.conn.as_mut().unwrap();
        assert_eq!(
            conn.held(),
            0,
            "buffers still referenced after the transfer"
        );
        eprintln!(
            "  lu2k->UDT4 acked after {:.2?}, UDT4->lu2k received after {:.2?}; \
             lu2k full ACKs {} (min avail_buf {}, max recv_rate {} max link_capacity {} pkt/s); \
             lu2k stats: {:?}",
            self.tx_done_at.unwrap_or_default(),
            self.rx_done_at.unwrap_or_default(),
            self.acks_out.0,
            self.acks_out.1,
            self.acks_out.2,
            self.acks_out.3,
            conn.stats()
        );
        conn.close(now);
        self.flush(now);
        self.drain_events();
        assert!(
            self.bufs.is_empty(),
            "buffers not given back: {}",
            self.bufs.len()
        );
    }
}

struct Report {
    secs: f64,
    lu2k_rx_hash: u64,
    udt4_rx_hash: u64,
    /// Peer-IP fields of the handshakes lu2k received from UDT4.
    hs_peer_ips: Vec<IpAddr>,
    /// lu2k's own address (what UDT4 should have written there).
    lu2k_addr: SocketAddr,
    /// Peer-IP fields of the handshakes lu2k sent, as on the wire.
    hs_sent: Vec<[u8; 16]>,
    /// UDT4's `getsockname` on the connected socket: UDT4 takes the IP from
    /// the peer-IP field of lu2k's handshake.
    udt4_self: SocketAddr,
    /// UDT4's own address (what lu2k should have written there).
    udt4_addr: SocketAddr,
}

fn check(r: &Report, lu2k_to_udt4_seed: u64, udt4_to_lu2k_seed: u64, what: &str) {
    assert_eq!(
        r.udt4_rx_hash,
        expected_checksum(lu2k_to_udt4_seed, BYTES),
        "{what}: checksum of what UDT4 received"
    );
    assert_eq!(
        r.lu2k_rx_hash,
        expected_checksum(udt4_to_lu2k_seed, BYTES),
        "{what}: checksum of what lu2k received"
    );
    let mbit = (2 * BYTES * 8) as f64 / r.secs / 1e6;
    eprintln!(
        "{what}: 2 x {} MiB in {:.2} s ({mbit:.0} Mbit/s both ways together)",
        BYTES >> 20,
        r.secs
    );
}

/// UDT4's two application threads on one socket: a sender and a verifying
/// receiver. `done` is set once the receiver has everything.
fn spawn_udt4_io(
    s: UdtSocket,
    mode: Mode,
    tx_seed: u64,
    rx_seed: u64,
    done: Arc<AtomicBool>,
) -> (thread::JoinHandle<()>, thread::JoinHandle<u64>) {
    let tx = thread::spawn(move || udt4_send(s, mode, tx_seed, BYTES));
    let rx = thread::spawn(move || {
        let (h, _) = udt4_recv(s, mode, rx_seed, BYTES);
        done.store(true, Ordering::Release);
        h
    });
    (tx, rx)
}

/// lu2k client → UDT4 server on loopback address `lo`, optionally through
/// a lossy relay.
fn lu2k_client_to_udt4_server(
    mode: Mode,
    cc: Kind,
    loss: Option<(f64, u64)>,
    lo: IpAddr,
) -> Report {
    let listener = udt4_socket(mode, lo);
    listener.bind(SocketAddr::new(lo, 0)).unwrap();
    listener.listen(4).unwrap();
    let server = listener.getsockname().unwrap();
    let (seed_a, seed_b) = (0xA11CE, 0xB0B);

    let relay = loss.map(|(p, seed)| Relay::start(server, p, seed));
    let target = relay.as_ref().map_or(server, |r| r.front);

    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let acceptor = thread::spawn(move || {
        let (s, _) = listener.accept().expect("UDT4 accept");
        let udt4_self = s.getsockname().expect("UDT4 getsockname");
        let io = spawn_udt4_io(s, mode, seed_b, seed_a, d2);
        (listener, s, udt4_self, io)
    });

    let sock = UdpSocket::bind(SocketAddr::new(lo, 0)).unwrap();
    let lu2k_addr = sock.local_addr().unwrap();
    let mut d = Driver::new(sock, target, mode, seed_a, seed_b);
    let started = Instant::now();
    d.conn = Some(Connection::connect(
        d.now(),
        lu2k_config(mode, cc),
        7,
        target,
    ));
    d.run(&done);
    let secs = started.elapsed().as_secs_f64();
    let (listener, s, udt4_self, (tx, rx)) = acceptor.join().unwrap();
    tx.join().unwrap();
    let udt4_rx_hash = rx.join().unwrap();
    let _ = s.close();
    let _ = listener.close();
    if let Some(r) = relay {
        let (dropped, total) = r.stop();
        eprintln!("relay dropped {dropped} of {total} datagrams");
        assert!(dropped > 0, "the relay dropped nothing");
    }
    Report {
        secs,
        lu2k_rx_hash: d.rx.hash.0,
        udt4_rx_hash,
        hs_peer_ips: d.hs_peer_ips,
        lu2k_addr,
        hs_sent: d.hs_sent,
        udt4_self,
        udt4_addr: server,
    }
}

/// UDT4 client → lu2k server on loopback address `lo`.
fn udt4_client_to_lu2k_server(mode: Mode, cc: Kind, lo: IpAddr) -> Report {
    let sock = UdpSocket::bind(SocketAddr::new(lo, 0)).unwrap();
    let server = sock.local_addr().unwrap();
    let (seed_a, seed_b) = (0xC0FFEE, 0xD00D);
    let mut d = Driver::new(sock, server, mode, seed_a, seed_b);
    d.listener = Some(Listener::new(d.now(), lu2k_config(mode, cc), 11));

    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let client = thread::spawn(move || {
        let s = udt4_socket(mode, lo);
        s.connect(server).expect("UDT4 connect to lu2k");
        let udt4_self = s.getsockname().expect("UDT4 getsockname");
        let io = spawn_udt4_io(s, mode, seed_b, seed_a, d2);
        (s, udt4_self, io)
    });
    let started = Instant::now();
    let limit = started + Duration::from_secs(20);
    while d.conn.is_none() {
        assert!(Instant::now() < limit, "UDT4 never completed the handshake");
        d.step();
    }
    d.run(&done);
    let secs = started.elapsed().as_secs_f64();
    let (s, udt4_self, (tx, rx)) = client.join().unwrap();
    tx.join().unwrap();
    let udt4_rx_hash = rx.join().unwrap();
    let _ = s.close();
    Report {
        secs,
        lu2k_rx_hash: d.rx.hash.0,
        udt4_rx_hash,
        hs_peer_ips: d.hs_peer_ips,
        lu2k_addr: server,
        hs_sent: d.hs_sent,
        udt4_self,
        udt4_addr: d.peer,
    }
}

// ------------------------------------------------------------------ relay

/// Peer-IP fields of the handshakes a relay passed, as on the wire, each
/// with its direction (`true`: client → server).
type Recorded = Arc<Mutex<Vec<(bool, [u8; 16])>>>;

/// A UDP relay between a client (which sends to `front`) and `server`, on
/// `server`'s loopback address, dropping each datagram with probability
/// `p` (seeded, per direction) and recording the handshakes it sees.
struct Relay {
    front: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(u64, u64)>>,
    handshakes: Recorded,
}

impl Relay {
    fn start(server: SocketAddr, p: f64, seed: u64) -> Relay {
        let front = UdpSocket::bind(SocketAddr::new(server.ip(), 0)).unwrap();
        let back = UdpSocket::bind(SocketAddr::new(server.ip(), 0)).unwrap();
        for s in [&front, &back] {
            set_bufs(s);
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let front_addr = front.local_addr().unwrap();
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let handshakes: Recorded = Arc::default();
        let threshold = (p * u64::MAX as f64) as u64;
        let mut threads = Vec::new();
        // client -> server
        {
            let (rx, tx) = (front.try_clone().unwrap(), back.try_clone().unwrap());
            let (client, stop, hs) = (client.clone(), stop.clone(), handshakes.clone());
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let (mut rng, mut dropped, mut total) = (seed, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = rx.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    if let Some(f) = handshake_peer_ip_field(&buf[..n]) {
                        hs.lock().unwrap().push((true, f));
                    }
                    total += 1;
                    rng = splitmix(rng);
                    if rng < threshold {
                        dropped += 1;
                        continue;
                    }
                    let _ = tx.send_to(&buf[..n], server);
                }
                (dropped, total)
            }));
        }
        // server -> client
        {
            let (rx, tx) = (back, front);
            let (client, stop, hs) = (client.clone(), stop.clone(), handshakes.clone());
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let (mut rng, mut dropped, mut total) = (splitmix(seed ^ 0xFF), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = rx.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(to) = *client.lock().unwrap() else {
                        continue;
                    };
                    if let Some(f) = handshake_peer_ip_field(&buf[..n]) {
                        hs.lock().unwrap().push((false, f));
                    }
                    total += 1;
                    rng = splitmix(rng);
                    if rng < threshold {
                        dropped += 1;
                        continue;
                    }
                    let _ = tx.send_to(&buf[..n], to);
                }
                (dropped, total)
            }));
        }
        Relay {
            front: front_addr,
            stop,
            threads,
            handshakes,
        }
    }

    /// The handshakes' peer-IP fields seen so far, with their directions.
    fn handshakes(&self) -> Vec<(bool, [u8; 16])> {
        self.handshakes.lock().unwrap().clone()
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn generator_and_plan_are_consistent() {
    let p = plan(3, BYTES);
    assert_eq!(p.iter().map(|&n| n as u64).sum::<u64>(), BYTES);
    assert!(p.iter().all(|&n| (1..=MAX_MSG).contains(&n)));
    // Filling in pieces equals filling at once (offset addressing works).
    let mut whole = vec![0u8; 100];
    fill(9, 5, &mut whole);
    let mut parts = vec![0u8; 100];
    fill(9, 5, &mut parts[..13]);
    fill(9, 18, &mut parts[13..]);
    assert_eq!(whole, parts);
    let mut v = Verifier::new(9);
    v.offset = 5;
    v.take(&whole);
}

#[test]
fn lu2k_client_udt4_server_message_mode() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = lu2k_client_to_udt4_server(Mode::Message, Kind::Native, None, V4_LO);
    check(
        &r,
        0xA11CE,
        0xB0B,
        "lu2k client -> UDT4 server, message mode",
    );
    check_peer_ip(&r, "lu2k client -> UDT4 server, message mode");
}

#[test]
fn lu2k_client_udt4_server_stream_mode() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = lu2k_client_to_udt4_server(Mode::Stream, Kind::Native, None, V4_LO);
    check(
        &r,
        0xA11CE,
        0xB0B,
        "lu2k client -> UDT4 server, stream mode",
    );
    check_udt4_read_lu2k(&r, "lu2k client -> UDT4 server, stream mode");
}

/// The handshakes UDT4 sent lu2k name lu2k's address in the peer-IP field,
/// as lu2k decodes it: UDT4 and lu2k encode the field the same way.
fn check_peer_ip(r: &Report, what: &str) {
    assert!(
        !r.hs_peer_ips.is_empty(),
        "{what}: no handshake from UDT4 seen"
    );
    for ip in &r.hs_peer_ips {
        assert_eq!(
            *ip,
            r.lu2k_addr.ip(),
            "{what}: UDT4's handshake peer-IP field decodes to {ip}, not lu2k's address"
        );
    }
    check_udt4_read_lu2k(r, what);
}

/// UDT4 read the peer-IP field of lu2k's handshake as its own address.
fn check_udt4_read_lu2k(r: &Report, what: &str) {
    assert!(!r.hs_sent.is_empty(), "{what}: lu2k sent no handshake");
    assert_eq!(
        r.udt4_self.ip(),
        r.udt4_addr.ip(),
        "{what}: UDT4 read lu2k's handshake peer-IP field as {}, not as its own address",
        r.udt4_self.ip()
    );
}

#[test]
fn udt4_client_lu2k_server_message_mode() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = udt4_client_to_lu2k_server(Mode::Message, Kind::Native, V4_LO);
    check(
        &r,
        0xC0FFEE,
        0xD00D,
        "UDT4 client -> lu2k server, message mode",
    );
    check_peer_ip(&r, "UDT4 client -> lu2k server, message mode");
}

#[test]
fn udt4_client_lu2k_server_stream_mode() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = udt4_client_to_lu2k_server(Mode::Stream, Kind::Native, V4_LO);
    check(
        &r,
        0xC0FFEE,
        0xD00D,
        "UDT4 client -> lu2k server, stream mode",
    );
    check_udt4_read_lu2k(&r, "UDT4 client -> lu2k server, stream mode");
}

#[test]
fn lu2k_client_udt4_server_one_percent_loss() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = lu2k_client_to_udt4_server(Mode::Message, Kind::Native, Some((0.01, 0x1055)), V4_LO);
    check(
        &r,
        0xA11CE,
        0xB0B,
        "lu2k client -> 1% loss relay -> UDT4 server, message mode",
    );
}

#[test]
fn lu2k_client_udt4_server_message_mode_satellite_cc() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = lu2k_client_to_udt4_server(Mode::Message, Kind::Satellite, None, V4_LO);
    check(
        &r,
        0xA11CE,
        0xB0B,
        "lu2k client (satellite controller) -> UDT4 server, message mode",
    );
}

/// The reference for the loss run: UDT4 against itself through the same
/// 1 % relay (same seeds), so lu2k's native sender can be compared with
/// UDT4's own sender facing a UDT4 receiver (which, unlike lu2k's, never
/// re-sends a NAK: each lost retransmission waits for the sender's EXP).
#[test]
fn udt4_client_udt4_server_one_percent_loss_reference() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mode = Mode::Message;
    let listener = udt4_socket(mode, V4_LO);
    listener.bind(SocketAddr::new(V4_LO, 0)).unwrap();
    listener.listen(4).unwrap();
    let server = listener.getsockname().unwrap();
    let (seed_a, seed_b) = (0xA11CE, 0xB0B);
    let relay = Relay::start(server, 0.01, 0x1055);
    let front = relay.front;
    let started = Instant::now();
    let timed = move |s: UdtSocket, tx_seed: u64, rx_seed: u64| {
        let tx = thread::spawn(move || udt4_send(s, mode, tx_seed, BYTES));
        let rx = thread::spawn(move || {
            let (h, _) = udt4_recv(s, mode, rx_seed, BYTES);
            (h, started.elapsed().as_secs_f64())
        });
        (tx, rx)
    };
    let acceptor = thread::spawn(move || {
        let (s, _) = listener.accept().expect("UDT4 accept");
        (listener, s, timed(s, seed_b, seed_a))
    });
    let c = udt4_socket(mode, V4_LO);
    c.connect(front).expect("UDT4 connect through the relay");
    let (ctx, crx) = timed(c, seed_a, seed_b);
    let (listener, s, (stx, srx)) = acceptor.join().unwrap();
    ctx.join().unwrap();
    stx.join().unwrap();
    let (server_hash, server_secs) = srx.join().unwrap();
    let (client_hash, client_secs) = crx.join().unwrap();
    let _ = c.close();
    let _ = s.close();
    let _ = listener.close();
    let (dropped, total) = relay.stop();
    eprintln!("relay dropped {dropped} of {total} datagrams");
    assert!(dropped > 0, "the relay dropped nothing");
    assert_eq!(server_hash, expected_checksum(seed_a, BYTES));
    assert_eq!(client_hash, expected_checksum(seed_b, BYTES));
    eprintln!(
        "UDT4 client -> 1% loss relay -> UDT4 server, message mode: client->server \
         received after {server_secs:.2} s, server->client after {client_secs:.2} s"
    );
}

// ------------------------------------------------------------------ IPv6

/// IPv4 loopback.
const V4_LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// IPv6 loopback. In UDT4's encoding of the peer-IP field its one set byte
/// lands in the last byte of word 11 and goes out as the first byte of
/// that word, so a field with the words or the bytes within a word in
/// another order differs from UDT4's.
const V6_LO: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Whether this machine has the IPv6 loopback address; says SKIP where it
/// has not.
fn have_ipv6_loopback(test: &str) -> bool {
    match UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: no IPv6 loopback here (binding [::1]:0: {e})");
            false
        }
    }
}

/// The peer-IP fields UDT4 writes on loopback `lo`, in its requests and in
/// its responses: UDT4 against itself through a loss-free recording relay,
/// one message each way.
fn udt4_reference_fields(lo: IpAddr) -> (BTreeSet<[u8; 16]>, BTreeSet<[u8; 16]>) {
    let listener = udt4_socket(Mode::Message, lo);
    listener.bind(SocketAddr::new(lo, 0)).unwrap();
    listener.listen(4).unwrap();
    let server = listener.getsockname().unwrap();
    let relay = Relay::start(server, 0.0, 1);
    let acceptor = thread::spawn(move || {
        let (s, _) = listener.accept().expect("UDT4 accept");
        let mut buf = [0u8; 64];
        let n = s.recvmsg(&mut buf).expect("UDT4 recvmsg");
        s.sendmsg(&buf[..n]).expect("UDT4 sendmsg");
        (listener, s)
    });
    let c = udt4_socket(Mode::Message, lo);
    c.connect(relay.front)
        .expect("UDT4 connect through the recording relay");
    c.sendmsg(b"ping").expect("UDT4 sendmsg");
    let mut buf = [0u8; 64];
    let n = c.recvmsg(&mut buf).expect("UDT4 recvmsg");
    assert_eq!(&buf[..n], b"ping", "UDT4 -> UDT4 echo");
    let (listener, s) = acceptor.join().unwrap();
    let recorded = relay.handshakes();
    let _ = c.close();
    let _ = s.close();
    let _ = listener.close();
    relay.stop();
    let pick = |to_server: bool| -> BTreeSet<[u8; 16]> {
        recorded
            .iter()
            .filter(|(d, _)| *d == to_server)
            .map(|(_, f)| *f)
            .collect()
    };
    let (requests, responses) = (pick(true), pick(false));
    assert!(
        !requests.is_empty() && !responses.is_empty(),
        "UDT4 -> UDT4 on {lo}: the relay saw {} handshakes, not both requests and responses",
        recorded.len()
    );
    (requests, responses)
}

/// The handshake checks over IPv6: each side read the other's peer-IP
/// field as its own address, and lu2k wrote the bytes UDT4 writes in the
/// same role (`udt4_fields`, from [`udt4_reference_fields`]).
fn check_handshakes_v6(r: &Report, udt4_fields: &BTreeSet<[u8; 16]>, what: &str) {
    assert!(
        r.lu2k_addr.is_ipv6() && r.udt4_addr.is_ipv6(),
        "{what}: not over IPv6"
    );
    check_peer_ip(r, what);
    let lu2k_fields: BTreeSet<[u8; 16]> = r.hs_sent.iter().copied().collect();
    assert_eq!(
        lu2k_fields, *udt4_fields,
        "{what}: the peer-IP field bytes lu2k wrote differ from UDT4's own over ::1"
    );
    eprintln!(
        "{what}: peer-IP field {:02x?} (as UDT4 writes it), read as {} by both sides",
        udt4_fields.first().unwrap(),
        r.lu2k_addr.ip()
    );
}

/// UDT4 writes the IPv6 loopback in its requests and responses in one
/// encoding, and it is the one lu2k decodes as `::1` (and encodes so).
#[test]
fn udt4_udt4_handshake_peer_ip_ipv6() {
    let what = "UDT4 client -> relay -> UDT4 server over ::1";
    if !have_ipv6_loopback(what) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (requests, responses) = udt4_reference_fields(V6_LO);
    for f in requests.iter().chain(&responses) {
        let words: [u32; 4] =
            std::array::from_fn(|i| u32::from_be_bytes(f[4 * i..4 * i + 4].try_into().unwrap()));
        assert_eq!(
            HandshakeRepr::decode_peer_ip(words, true),
            V6_LO,
            "{what}: {f:02x?}"
        );
        assert_eq!(
            words,
            HandshakeRepr::encode_peer_ip(V6_LO),
            "{what}: {f:02x?}"
        );
    }
}

#[test]
fn lu2k_client_udt4_server_message_mode_ipv6() {
    let what = "lu2k client -> UDT4 server over ::1, message mode";
    if !have_ipv6_loopback(what) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (requests, _) = udt4_reference_fields(V6_LO);
    let r = lu2k_client_to_udt4_server(Mode::Message, Kind::Native, None, V6_LO);
    check(&r, 0xA11CE, 0xB0B, what);
    check_handshakes_v6(&r, &requests, what);
}

#[test]
fn udt4_client_lu2k_server_message_mode_ipv6() {
    let what = "UDT4 client -> lu2k server over ::1, message mode";
    if !have_ipv6_loopback(what) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_, responses) = udt4_reference_fields(V6_LO);
    let r = udt4_client_to_lu2k_server(Mode::Message, Kind::Native, V6_LO);
    check(&r, 0xC0FFEE, 0xD00D, what);
    check_handshakes_v6(&r, &responses, what);
}

#[test]
fn lu2k_client_udt4_server_stream_mode_ipv6() {
    let what = "lu2k client -> UDT4 server over ::1, stream mode";
    if !have_ipv6_loopback(what) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (requests, _) = udt4_reference_fields(V6_LO);
    let r = lu2k_client_to_udt4_server(Mode::Stream, Kind::Native, None, V6_LO);
    check(&r, 0xA11CE, 0xB0B, what);
    check_handshakes_v6(&r, &requests, what);
}

#[test]
fn udt4_client_lu2k_server_stream_mode_ipv6() {
    let what = "UDT4 client -> lu2k server over ::1, stream mode";
    if !have_ipv6_loopback(what) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_, responses) = udt4_reference_fields(V6_LO);
    let r = udt4_client_to_lu2k_server(Mode::Stream, Kind::Native, V6_LO);
    check(&r, 0xC0FFEE, 0xD00D, what);
    check_handshakes_v6(&r, &responses, what);
}
