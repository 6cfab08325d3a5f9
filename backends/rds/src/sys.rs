//! The syscall edge of the RDS back-end: `socket(AF_RDS)`, its options, `bind`,
//! `sendmsg` and `recvmsg`.
//!
//! Each function is a thin wrapper around one system call that returns the raw
//! `errno` on failure; the `from_errno`s of [`SendError`](crate::SendError) and
//! [`RecvError`](crate::RecvError) give those numbers their meaning. This is
//! the only module of the crate that opts back into `unsafe`.
//!
//! Guarantees:
//! - Every descriptor made here is owned by an [`OwnedFd`] and closed on drop.
//! - The kernel only ever sees pointers to memory borrowed for the duration of the
//!   call (iovecs, a `sockaddr_in`, an option value), with their true lengths.
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `AF_RDS` (linux/socket.h).
pub const AF_RDS: libc::c_int = 21;
/// `SOL_RDS` (linux/socket.h); libc does not export it for every target (musl).
pub const SOL_RDS: libc::c_int = 276;
/// `SO_RDS_TRANSPORT` (linux/rds.h): pin the socket to one transport, before `bind`.
pub const SO_RDS_TRANSPORT: libc::c_int = 8;
/// `RDS_TRANS_TCP` (linux/rds.h).
pub const RDS_TRANS_TCP: libc::c_int = 2;
/// `RDS_MAX_MSG_SIZE` (net/rds/rds.h): 1 MiB, the largest RDS message, all iovecs
/// together. `rds_sendmsg` refuses more with `EMSGSIZE` (the kernel lab checks the
/// exact boundary on Debian's 6.1).
pub const RDS_MAX_MSG_SIZE: usize = 1 << 20;

/// An errno value from a failed system call.
pub type Errno = i32;

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `socket(AF_RDS, SOCK_SEQPACKET | SOCK_CLOEXEC [| SOCK_NONBLOCK], 0)`.
pub fn rds_socket(nonblocking: bool) -> Result<OwnedFd, Errno> {
    let mut ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket() takes no pointers; a non-negative result is a fresh descriptor
    // that nothing else owns, so handing it to OwnedFd is sound.
    let fd = unsafe { libc::socket(AF_RDS, ty, 0) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> Result<(), Errno> {
    // SAFETY: the option value points at a live c_int on this stack frame and the
    // length passed is exactly its size; the kernel only reads it during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// `getsockopt(fd, level, name)` for an `int` option.
pub fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> Result<libc::c_int, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals; len holds value's exact size, and the
    // kernel writes at most len bytes into value and the new length into len.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(value)
    }
}

/// The kernel's `sockaddr_in` for `addr`.
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

fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

/// `bind(fd, addr)`.
pub fn bind(fd: BorrowedFd<'_>, addr: SocketAddrV4) -> Result<(), Errno> {
    let sa = sockaddr_in(addr);
    // SAFETY: `sa` is a live, fully initialised sockaddr_in and the length passed is
    // its exact size; the kernel copies it during the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// `getsockname(fd)` for an IPv4 socket.
pub fn local_addr(fd: BorrowedFd<'_>) -> Result<SocketAddrV4, Errno> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` is writable storage of `len` bytes, and the kernel writes at most
    // `len` bytes there and the address's true length into `len`.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), sa.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(last_errno());
    }
    if (len as usize) < size_of::<libc::sockaddr_in>() {
        return Err(libc::EAFNOSUPPORT);
    }
    // SAFETY: zeroed storage is a valid sockaddr_in, and the kernel filled it in.
    let sa = unsafe { sa.assume_init() };
    if libc::c_int::from(sa.sin_family) != libc::AF_INET {
        return Err(libc::EAFNOSUPPORT);
    }
    Ok(from_sockaddr_in(&sa))
}

/// `sendmsg(fd, {dest, iov}, flags)`: one RDS message made of the iovecs, in order.
pub fn sendmsg(
    fd: BorrowedFd<'_>,
    dest: SocketAddrV4,
    iov: &[IoSlice<'_>],
    flags: libc::c_int,
) -> Result<usize, Errno> {
    let mut sa = sockaddr_in(dest);
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut sa as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // IoSlice is guaranteed ABI-compatible with struct iovec on Unix.
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: msg points at `sa` and at `iov`, both borrowed for this call with their
    // true lengths; the kernel only reads them (no control buffer is passed).
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

/// What one `recvmsg` gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// The message's full length (with `MSG_TRUNC`, also when larger than the buffers).
    pub len: usize,
    /// The sender.
    pub from: SocketAddrV4,
    /// `MSG_TRUNC` was set: the buffers were smaller than the message.
    pub truncated: bool,
}

/// `recvmsg(fd, {iov}, flags | MSG_TRUNC)`: one RDS message scattered into the iovecs.
pub fn recvmsg(
    fd: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
    flags: libc::c_int,
) -> Result<RecvMeta, Errno> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = sa.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // IoSliceMut is guaranteed ABI-compatible with struct iovec on Unix.
    msg.msg_iov = iov.as_mut_ptr().cast::<libc::iovec>();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: msg points at `sa` and at the caller's iovecs, all exclusively borrowed
    // for this call with their true lengths; the kernel writes at most those lengths.
    // No control buffer is passed, so msg_controllen stays 0.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags | libc::MSG_TRUNC) };
    if n < 0 {
        return Err(last_errno());
    }
    // SAFETY: zeroed storage is a valid sockaddr_in; the kernel may have filled it.
    let sa = unsafe { sa.assume_init() };
    Ok(RecvMeta {
        len: n as usize,
        from: from_sockaddr_in(&sa),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}
