//! Typed errors of the RDS back-end and what each means for a message.
//!
//! The kernel answers with an `errno`; the engine needs to know what to do with the
//! message it tried to send. [`SendError::from_errno`] is the single place that
//! decides from `sendmsg`'s errno, and [`SendError::status`] turns it into a
//! [`Status`]: keep the message and retry, or complete it with a reason.
//! [`RecvError::from_errno`] does the same for a receive, whether the errno came from
//! `recvmsg` here or from an io_uring completion (`-cqe.result()`).

use crate::sys::Errno;
use std::fmt;
use std::net::SocketAddrV4;

/// The errno's symbolic name, for messages people read.
pub fn errno_name(errno: Errno) -> &'static str {
    match errno {
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EINVAL => "EINVAL",
        libc::ENOBUFS => "ENOBUFS",
        libc::EAGAIN => "EAGAIN",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETDOWN => "ENETDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENOTCONN => "ENOTCONN",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EINTR => "EINTR",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBADF => "EBADF",
        _ => "errno",
    }
}

/// An errno shown as `NAME (n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Os(pub Errno);

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", errno_name(self.0), self.0)
    }
}

/// Why [`crate::Socket::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// `socket(AF_RDS)` failed with `EAFNOSUPPORT`: the kernel has no RDS.
    #[error(
        "RDS is missing from this kernel (socket(AF_RDS) failed with {}): \
         load the kernel modules rds and rds_tcp (`modprobe rds_tcp` loads both), \
         or use `--backend udt`, which works on this kernel",
        Os(*.errno)
    )]
    RdsMissing {
        /// The errno of `socket(AF_RDS)`.
        errno: Errno,
    },
    /// RDS is there but its TCP transport is not (`SO_RDS_TRANSPORT` failed).
    #[error(
        "RDS's TCP transport is missing from this kernel (SO_RDS_TRANSPORT failed with {}): \
         load the kernel module rds_tcp (`modprobe rds_tcp`), or use `--backend udt`",
        Os(*.errno)
    )]
    TcpTransportMissing {
        /// The errno of `setsockopt(SOL_RDS, SO_RDS_TRANSPORT)`.
        errno: Errno,
    },
    /// No local interface has the address to bind (`EADDRNOTAVAIL`).
    #[error("cannot bind RDS to {addr}: no local interface has that address ({})", Os(*.errno))]
    AddrNotAvailable {
        /// The address asked for.
        addr: SocketAddrV4,
        /// The errno of `bind`.
        errno: Errno,
    },
    /// Another RDS socket holds the address and port (`EADDRINUSE`).
    #[error("cannot bind RDS to {addr}: the port is in use ({})", Os(*.errno))]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddrV4,
        /// The errno of `bind`.
        errno: Errno,
    },
    /// Any other failure of a set-up call.
    #[error("RDS socket set-up failed in {op}: {}", Os(*.errno))]
    Os {
        /// The system call or option that failed.
        op: &'static str,
        /// Its errno.
        errno: Errno,
    },
}

/// What the engine does with a message whose send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not a failure of the message: the kernel pushes back (destination port
    /// congested, or the send buffer full). Keep the message queued by reference and
    /// send it again later: a writable socket only means the send buffer has room,
    /// not that the destination is no longer congested.
    Retry,
    /// The peer cannot be reached: complete the message with this status and report
    /// the peer down, as an LND does.
    PeerUnreachable,
    /// The message itself is unacceptable (too large, malformed request): complete it
    /// with this status; sending it again cannot succeed.
    Rejected,
    /// Anything else: complete the message as failed.
    Failed,
}

impl Status {
    /// The negative errno an LND completes a message with (`lnet_finalize`'s status),
    /// or `None` for [`Status::Retry`], which completes nothing.
    pub fn lnet_status(self) -> Option<i32> {
        match self {
            Status::Retry => None,
            Status::PeerUnreachable => Some(-libc::EHOSTUNREACH),
            Status::Rejected => Some(-libc::EMSGSIZE),
            Status::Failed => Some(-libc::EIO),
        }
    }
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Back-pressure: `ENOBUFS` (the destination port is congested) or `EAGAIN`
    /// (this socket's send buffer is full).
    #[error("RDS send pushed back ({}): retry later", Os(*.errno))]
    Backpressure {
        /// `ENOBUFS` or `EAGAIN`.
        errno: Errno,
    },
    /// The peer is unreachable: refused, reset, no route, down, timed out.
    #[error("RDS peer unreachable ({})", Os(*.errno))]
    PeerUnreachable {
        /// The errno.
        errno: Errno,
    },
    /// The message is larger than RDS or the socket's send buffer allows (`EMSGSIZE`).
    #[error("RDS message of {len} bytes is too large (the limit here is {max} bytes)")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The largest message this socket can send.
        max: usize,
    },
    /// The call was interrupted by a signal before anything was queued.
    #[error("RDS send interrupted (EINTR)")]
    Interrupted,
    /// The request was invalid (`EINVAL`, `EOPNOTSUPP`, `ENOTCONN`, `EDESTADDRREQ`,
    /// `EFAULT`): a bug on our side, never fixed by retrying.
    #[error("RDS send rejected as invalid ({})", Os(*.errno))]
    Invalid {
        /// The errno.
        errno: Errno,
    },
    /// Any other errno.
    #[error("RDS send failed ({})", Os(*.errno))]
    Os {
        /// The errno.
        errno: Errno,
    },
}

impl SendError {
    /// The meaning of a send's errno. `len` is the message's length and `max` the
    /// socket's limit, used for [`SendError::TooLarge`].
    pub fn from_errno(errno: Errno, len: usize, max: usize) -> SendError {
        match errno {
            libc::ENOBUFS | libc::EAGAIN => SendError::Backpressure { errno },
            libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::ECONNABORTED
            | libc::EHOSTUNREACH
            | libc::EHOSTDOWN
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::ETIMEDOUT
            | libc::EPIPE => SendError::PeerUnreachable { errno },
            libc::EMSGSIZE => SendError::TooLarge { len, max },
            libc::EINTR => SendError::Interrupted,
            libc::EINVAL
            | libc::EOPNOTSUPP
            | libc::ENOTCONN
            | libc::EDESTADDRREQ
            | libc::EFAULT => SendError::Invalid { errno },
            _ => SendError::Os { errno },
        }
    }

    /// What the engine does with the message.
    pub fn status(&self) -> Status {
        match self {
            SendError::Backpressure { .. } | SendError::Interrupted => Status::Retry,
            SendError::PeerUnreachable { .. } => Status::PeerUnreachable,
            SendError::TooLarge { .. } | SendError::Invalid { .. } => Status::Rejected,
            SendError::Os { .. } => Status::Failed,
        }
    }
}

/// Why a receive failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// Nothing to receive on a non-blocking socket (`EAGAIN`).
    #[error("no RDS message ready (EAGAIN)")]
    WouldBlock,
    /// Interrupted by a signal (`EINTR`).
    #[error("RDS receive interrupted (EINTR)")]
    Interrupted,
    /// The message was larger than the buffers given; the kernel dropped the rest.
    #[error("RDS message of {len} bytes truncated to {capacity} bytes of buffers")]
    Truncated {
        /// The message's full length.
        len: usize,
        /// The buffers' total length.
        capacity: usize,
    },
    /// Any other errno.
    #[error("RDS receive failed ({})", Os(*.errno))]
    Os {
        /// The errno.
        errno: Errno,
    },
}

impl RecvError {
    /// The meaning of a receive's errno.
    pub fn from_errno(errno: Errno) -> RecvError {
        match errno {
            libc::EAGAIN => RecvError::WouldBlock,
            libc::EINTR => RecvError::Interrupted,
            _ => RecvError::Os { errno },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_and_full_buffers_are_backpressure_not_failures() {
        for errno in [libc::ENOBUFS, libc::EAGAIN, libc::EWOULDBLOCK] {
            let e = SendError::from_errno(errno, 10, 100);
            assert_eq!(e, SendError::Backpressure { errno });
            assert_eq!(e.status(), Status::Retry);
            assert_eq!(e.status().lnet_status(), None);
        }
        assert_eq!(
            SendError::from_errno(libc::EINTR, 1, 1).status(),
            Status::Retry
        );
    }

    #[test]
    fn unreachable_peers_complete_with_ehostunreach() {
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
        ] {
            let e = SendError::from_errno(errno, 10, 100);
            assert_eq!(e, SendError::PeerUnreachable { errno });
            assert_eq!(e.status().lnet_status(), Some(-libc::EHOSTUNREACH));
        }
    }

    #[test]
    fn oversize_and_invalid_are_rejected_for_good() {
        let e = SendError::from_errno(libc::EMSGSIZE, 2 << 20, 1 << 20);
        assert_eq!(
            e,
            SendError::TooLarge {
                len: 2 << 20,
                max: 1 << 20
            }
        );
        assert_eq!(e.status(), Status::Rejected);
        assert_eq!(e.status().lnet_status(), Some(-libc::EMSGSIZE));
        assert!(e.to_string().contains("2097152"), "{e}");
        assert_eq!(
            SendError::from_errno(libc::ENOTCONN, 1, 1).status(),
            Status::Rejected
        );
        let other = SendError::from_errno(libc::ENOMEM, 1, 1);
        assert_eq!(
            other,
            SendError::Os {
                errno: libc::ENOMEM
            }
        );
        assert_eq!(other.status().lnet_status(), Some(-libc::EIO));
    }

    #[test]
    fn recv_errnos() {
        assert_eq!(RecvError::from_errno(libc::EAGAIN), RecvError::WouldBlock);
        assert_eq!(RecvError::from_errno(libc::EINTR), RecvError::Interrupted);
        assert_eq!(
            RecvError::from_errno(libc::EBADF),
            RecvError::Os { errno: libc::EBADF }
        );
    }

    #[test]
    fn missing_rds_says_what_to_do() {
        let msg = OpenError::RdsMissing {
            errno: libc::EAFNOSUPPORT,
        }
        .to_string();
        for needle in [
            "RDS is missing",
            "EAFNOSUPPORT",
            "rds_tcp",
            "modprobe",
            "--backend udt",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        let msg = OpenError::TcpTransportMissing {
            errno: libc::ENOPROTOOPT,
        }
        .to_string();
        assert!(
            msg.contains("rds_tcp") && msg.contains("--backend udt"),
            "{msg}"
        );
    }
}
