//! The crate's syscall edge: the two calls rustix has no safe wrapper for,
//! real-time scheduling (for threads that must keep time: the relay, and the
//! drivers that measure it) and `TUNSETIFF` (to create a TUN device). The
//! only module with `unsafe` allowed.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Puts the calling thread under `SCHED_FIFO` at `priority` (1–99), so that
/// ordinary load on the machine cannot delay it. Needs root or
/// `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` allowance); fails with `EPERM`
/// otherwise. The kernel's RT throttling (by default 95 % of each second)
/// still leaves the rest of the machine some time if the thread spins.
pub fn set_realtime(priority: u8) -> io::Result<()> {
    // SAFETY: sched_param is plain old data; all-zero is a valid value. Built field
    // by field because musl's has extra (deprecated sporadic-server) fields.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = i32::from(priority);
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; pid 0 names the calling thread; the call writes no memory of ours.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the TUN file `fd` (an open `/dev/net/tun`) to a new layer-3 TUN
/// device called `name` in the calling thread's network namespace, without
/// the packet-information prefix: each read or write is one IP packet.
pub(crate) fn tun_set_iff(fd: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1 to 15 bytes without NUL"),
        ));
    }
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, &b) in ifr_name.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: `ifreq` is plain old data (integers, byte arrays, a raw
    // pointer in a union), for which all-zero bytes are a valid value; zeroing
    // it also means no byte the kernel copies in is uninitialised.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = ifr_name;
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `fd` is an open descriptor for the duration of the call;
    // TUNSETIFF reads (and may write back the name into) a `struct ifreq`,
    // and `req` is one, fully initialised, exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
