//! lu2k-rds: the RDS back-end's sockets and frame format.
//!
//! RDS (Reliable Datagram Sockets, `AF_RDS`) is a kernel transport that delivers whole
//! messages reliably and in order between two addresses, over a transport below it;
//! lu2k uses the TCP one (`rds_tcp`), so any IP network carries it. The layers here
//! are the socket itself (open, pin the transport, bind, send one message from a
//! scatter list, receive one message into a scatter list, and give every failure a
//! meaning the engine can act on) and the [`frame`] format that carries an LNet
//! message in RDS messages.
//!
//! Guarantees:
//! - An LNet message is one or more RDS messages: RDS caps a message at
//!   `RDS_MAX_MSG_SIZE` = 1 MiB *including* everything before the payload (measured
//!   in the kernel lab on Debian's 6.1), and an LNet payload may be 1 MiB, so
//!   [`frame::split`] cuts the payload and each piece travels behind an 8-byte frame
//!   header, the first also behind the 72-byte LNet header. RDS keeps messages in
//!   order per (source, destination) pair, so a receiver appends each continuation
//!   to the message it continues.
//! - [`Socket::send`] hands the kernel the iovecs as they are (frame header, LNet
//!   header, payload slices in the shared pool), so lu2k copies no payload; the kernel
//!   either queues the whole RDS message or nothing.
//! - Sends are `sendmsg(2)` ([`Socket::send`]; the engine's socket is non-blocking, so
//!   a send never sleeps), not io_uring: io_uring adds `MSG_NOSIGNAL` to every send
//!   and `rds_sendmsg` refuses any flag but `MSG_DONTWAIT`/`MSG_ZEROCOPY` with
//!   `EOPNOTSUPP`. Receives can go through io_uring (`IORING_OP_RECVMSG` on
//!   [`Socket::as_fd`]), as the engine's do; [`RecvError::from_errno`] maps a
//!   completion's `-res` exactly as the call's errno.
//! - A socket is pinned to `rds_tcp` before it is bound (`SO_RDS_TRANSPORT`), so a
//!   message never silently takes another transport.
//! - Every failure is typed: [`OpenError`] at start (with a clear message when the
//!   kernel lacks RDS: which modules to load, and that `--backend udt` works),
//!   [`SendError`] and [`RecvError`] per message, and [`SendError::status`] says
//!   whether to retry (back-pressure) or to complete the message with a reason;
//!   [`frame::Error`] says why received bytes are not a frame.
//!
//! The only `unsafe` code is the syscall edge, [`sys`].
#![deny(unsafe_code)]

mod error;
pub mod frame;
pub mod sys;

pub use error::{errno_name, OpenError, Os, RecvError, SendError, Status};
pub use lu2k_ring_abi::desc::LNET_HDR_LEN;
pub use sys::RDS_MAX_MSG_SIZE;

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// How to open a [`Socket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// `O_NONBLOCK`: sends push back with [`SendError::Backpressure`] and receives
    /// return [`RecvError::WouldBlock`] instead of waiting (what a reactor wants).
    pub nonblocking: bool,
    /// Send buffer to ask for, in bytes. RDS refuses a message larger than the send
    /// buffer's (halved) size, which is what is asked for here: Linux doubles the
    /// value set, and rds_sendmsg refuses `payload_len > sk_sndbuf / 2`.
    pub sndbuf: usize,
    /// Receive buffer to ask for, in bytes. A receiver holding more than half of it
    /// in queued messages marks its port congested and senders get back-pressure.
    pub rcvbuf: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nonblocking: false,
            sndbuf: 2 * RDS_MAX_MSG_SIZE + (64 << 10),
            rcvbuf: 8 * RDS_MAX_MSG_SIZE,
        }
    }
}

/// One received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Its length in bytes, all of it in the buffers given.
    pub len: usize,
    /// Who sent it.
    pub from: SocketAddrV4,
}

/// An `AF_RDS`, `SOCK_SEQPACKET` socket over `rds_tcp`, bound to one address.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    local: SocketAddrV4,
    max_message: usize,
}

/// Whether this kernel has RDS at all: `Ok(())`, or the [`OpenError::RdsMissing`] an
/// open would give. Opens (and closes) one socket, binds nothing.
pub fn probe() -> Result<(), OpenError> {
    match sys::rds_socket(false) {
        Ok(_) => Ok(()),
        Err(errno) => Err(open_socket_error(errno)),
    }
}

fn open_socket_error(errno: sys::Errno) -> OpenError {
    match errno {
        libc::EAFNOSUPPORT => OpenError::RdsMissing { errno },
        errno => OpenError::Os {
            op: "socket(AF_RDS)",
            errno,
        },
    }
}

/// `SO_SNDBUF`/`SO_RCVBUF`, falling back to the `*FORCE` variants (root) when the
/// system cap (`net.core.[wr]mem_max`) leaves less than asked. Returns what the kernel
/// reports; Linux doubles the value set and reports that.
fn set_buffer(
    fd: BorrowedFd<'_>,
    name: libc::c_int,
    force: libc::c_int,
    want: usize,
) -> Result<usize, OpenError> {
    let want_int = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX / 2);
    let op = if name == libc::SO_SNDBUF {
        "SO_SNDBUF"
    } else {
        "SO_RCVBUF"
    };
    sys::setsockopt_int(fd, libc::SOL_SOCKET, name, want_int)
        .map_err(|errno| OpenError::Os { op, errno })?;
    let mut got = sys::getsockopt_int(fd, libc::SOL_SOCKET, name)
        .map_err(|errno| OpenError::Os { op, errno })?;
    if (got as usize) < want {
        // Without CAP_NET_ADMIN this fails with EPERM; keep what we have then.
        if sys::setsockopt_int(fd, libc::SOL_SOCKET, force, want_int).is_ok() {
            got = sys::getsockopt_int(fd, libc::SOL_SOCKET, name)
                .map_err(|errno| OpenError::Os { op, errno })?;
        }
    }
    Ok(got.max(0) as usize)
}

impl Socket {
    /// Opens an RDS socket over `rds_tcp`, bound to `local` (an address of a local
    /// interface; port 0 picks a free port).
    ///
    /// On a kernel without RDS this fails with [`OpenError::RdsMissing`], whose message
    /// says which modules to load and that `--backend udt` works there.
    pub fn open(local: SocketAddrV4, config: &Config) -> Result<Socket, OpenError> {
        let fd = sys::rds_socket(config.nonblocking).map_err(open_socket_error)?;
        // The transport must be chosen before bind (rds_setsockopt refuses it after).
        sys::setsockopt_int(
            fd.as_fd(),
            sys::SOL_RDS,
            sys::SO_RDS_TRANSPORT,
            sys::RDS_TRANS_TCP,
        )
        .map_err(|errno| match errno {
            libc::ENOPROTOOPT | libc::EINVAL => OpenError::TcpTransportMissing { errno },
            errno => OpenError::Os {
                op: "SO_RDS_TRANSPORT",
                errno,
            },
        })?;
        let sndbuf = set_buffer(
            fd.as_fd(),
            libc::SO_SNDBUF,
            libc::SO_SNDBUFFORCE,
            config.sndbuf,
        )?;
        set_buffer(
            fd.as_fd(),
            libc::SO_RCVBUF,
            libc::SO_RCVBUFFORCE,
            config.rcvbuf,
        )?;
        sys::bind(fd.as_fd(), local).map_err(|errno| match errno {
            // With the transport pinned, rds_bind asks rds_tcp whether the address is
            // local (laddr_check) and answers ENOPROTOOPT when it is not; unpinned,
            // RDS answers EADDRNOTAVAIL.
            libc::EADDRNOTAVAIL | libc::ENOPROTOOPT => {
                OpenError::AddrNotAvailable { addr: local, errno }
            }
            libc::EADDRINUSE => OpenError::AddrInUse { addr: local, errno },
            errno => OpenError::Os { op: "bind", errno },
        })?;
        let local = sys::local_addr(fd.as_fd()).map_err(|errno| OpenError::Os {
            op: "getsockname",
            errno,
        })?;
        Ok(Socket {
            fd,
            local,
            // rds_sendmsg: payload_len > sk_sndbuf / 2 is EMSGSIZE, and so is
            // payload_len > RDS_MAX_MSG_SIZE.
            max_message: (sndbuf / 2).min(RDS_MAX_MSG_SIZE),
        })
    }

    /// The bound address (with the port the kernel picked, when 0 was asked).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The largest message this socket can send: `RDS_MAX_MSG_SIZE` (1 MiB), or half
    /// the send buffer the kernel granted when that is less; the kernel refuses larger
    /// ones with `EMSGSIZE`.
    ///
    /// An LNet message whose headers and payload exceed this travels as several RDS
    /// messages; see [`frame::split`].
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Sends one message made of `iov`, in order, to `dest`. Returns its length.
    /// RDS queues the whole message or nothing; delivery is reliable and in order per
    /// destination, and the kernel reconnects the TCP transport by itself.
    pub fn send(&self, dest: SocketAddrV4, iov: &[IoSlice<'_>]) -> Result<usize, SendError> {
        let len: usize = iov.iter().map(|s| s.len()).sum();
        if len > self.max_message {
            return Err(SendError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        sys::sendmsg(self.fd.as_fd(), dest, iov, 0)
            .map_err(|errno| SendError::from_errno(errno, len, self.max_message))
    }

    /// Receives one message into `iov`. A message larger than the buffers is an error
    /// ([`RecvError::Truncated`]): the kernel has dropped its tail.
    pub fn recv(&self, iov: &mut [IoSliceMut<'_>]) -> Result<Received, RecvError> {
        let capacity: usize = iov.iter().map(|s| s.len()).sum();
        let meta = sys::recvmsg(self.fd.as_fd(), iov, 0).map_err(RecvError::from_errno)?;
        if meta.truncated || meta.len > capacity {
            return Err(RecvError::Truncated {
                len: meta.len,
                capacity,
            });
        }
        Ok(Received {
            len: meta.len,
            from: meta.from,
        })
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
