//! Kernel probes of the io_uring features the fast path uses: each builds a
//! throw-away ring (or uses the caller's), tries the one operation, and undoes it.
//! [`crate::io::probe`] asks these at start-up to choose the I/O path.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, types, IoUring};

use super::SEND_ZC_REPORT_USAGE;
use crate::io::sys::Mapping;

/// Whether `IORING_REGISTER_BUFFERS` accepts `iov` on `ring` (unregistered again).
pub(crate) fn try_register(ring: &IoUring, iov: &libc::iovec) -> bool {
    // SAFETY: the caller's memory stays mapped for the call; we unregister before
    // returning, so the kernel keeps no reference.
    let ok = unsafe { ring.submitter().register_buffers(std::slice::from_ref(iov)) }.is_ok();
    if ok {
        let _ = ring.submitter().unregister_buffers();
    }
    ok
}

/// Whether this kernel accepts `IORING_SEND_ZC_REPORT_USAGE` on zero-copy sends
/// (Linux 6.2+; 6.1 answers `EINVAL`). Tried once per process for real: a one-byte
/// `SENDMSG_ZC` with the flag between two loopback UDP sockets. Anything other than a
/// clean answer (no io_uring, no loopback) reads as "no": sending without the flag
/// is correct everywhere, only the `ZC_COPIED` count is lost.
pub fn zc_report_usage_supported() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| try_sendmsg_zc(true, false).unwrap_or(false))
}

/// Whether `SENDMSG_ZC` accepts a registered buffer (`IORING_RECVSEND_FIXED_BUF` with
/// `buf_index`, Linux 6.15+; older kernels answer `EINVAL`). Tried once per process
/// like [`zc_report_usage_supported`]; "no" means sends use plain iovecs.
pub fn fixed_sendmsg_zc_supported() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| try_sendmsg_zc(false, true).unwrap_or(false))
}

/// One real one-byte `SENDMSG_ZC` over loopback with the given options: `Ok(false)`
/// when the kernel refuses them with `EINVAL`.
fn try_sendmsg_zc(report_usage: bool, fixed: bool) -> io::Result<bool> {
    let rx = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let tx = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    tx.connect(rx.local_addr()?)?;
    // Declared before the ring: dropped after it, so the registration never outlives it.
    let page = Mapping::anon(4096)?;
    let mut ring = IoUring::new(4)?;
    let mut iov = libc::iovec {
        iov_base: page.as_ptr().cast(),
        iov_len: 1,
    };
    if fixed {
        let reg = libc::iovec {
            iov_base: page.as_ptr().cast(),
            iov_len: page.len(),
        };
        // SAFETY: `page` is mapped and writable and outlives the ring (declared
        // before it), which holds the only registration.
        if unsafe { ring.submitter().register_buffers(&[reg]) }.is_err() {
            return Ok(false);
        }
    }
    // SAFETY: msghdr is plain old data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let mut op = opcode::SendMsgZc::new(types::Fd(tx.as_raw_fd()), &msg);
    if report_usage {
        op = op.ioprio(SEND_ZC_REPORT_USAGE);
    }
    if fixed {
        op = op.buf_index(Some(0));
    }
    let e = op.build().user_data(1);
    // SAFETY: `msg`, `iov` and `page` live on this frame, which returns only after
    // every completion of the send (result and notification, or the error), so the
    // kernel never references them after; the sockets outlive that too.
    unsafe { ring.submission().push(&e) }.map_err(|_| io::Error::other("sq full"))?;
    let mut pending_notif = false;
    let mut answer = None;
    loop {
        ring.submit_and_wait(1)?;
        for c in ring.completion() {
            if cqueue::notif(c.flags()) {
                pending_notif = false;
            } else {
                answer = Some(c.result());
                pending_notif = cqueue::more(c.flags());
            }
        }
        if answer.is_some() && !pending_notif {
            break;
        }
    }
    match answer {
        Some(r) if r >= 0 => Ok(true),
        Some(r) if -r == libc::EINVAL => Ok(false),
        Some(r) => Err(io::Error::from_raw_os_error(-r)),
        None => Ok(false),
    }
}

/// Whether `IORING_REGISTER_PBUF_RING` accepts a one-page ring (unregistered again).
pub(crate) fn try_register_pbuf(ring: &IoUring, page: &Mapping) -> bool {
    // SAFETY: `page` is a page-aligned mapping alive for the call; unregistered before
    // returning.
    let ok = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(page.as_ptr() as u64, 8, 77, 0)
    }
    .is_ok();
    if ok {
        let _ = ring.submitter().unregister_buf_ring(77);
    }
    ok
}

/// `IOU_PBUF_RING_INC` (flags of `IORING_REGISTER_PBUF_RING`).
const IOU_PBUF_RING_INC: u16 = 2;
/// `IORING_REGISTER_PBUF_RING` / `IORING_UNREGISTER_PBUF_RING`.
const REGISTER_PBUF_RING: libc::c_uint = 22;
const UNREGISTER_PBUF_RING: libc::c_uint = 23;

/// `struct io_uring_buf_reg` with `min_left` (Linux 7.1; before it the same bytes
/// are reserved and must be zero, so an older kernel answers `EINVAL`).
#[repr(C)]
struct BufReg {
    ring_addr: u64,
    ring_entries: u32,
    bgid: u16,
    flags: u16,
    min_left: u32,
    resv: [u32; 5],
}

/// Whether the kernel takes an incremental provided-buffer ring
/// (`IOU_PBUF_RING_INC`, 6.12+), and one with `min_left` set (each unregistered
/// again).
pub(crate) fn try_register_pbuf_inc(ring: &IoUring, page: &Mapping) -> (bool, bool) {
    let try_one = |min_left: u32| {
        let reg = BufReg {
            ring_addr: page.as_ptr() as u64,
            ring_entries: 8,
            bgid: 78,
            flags: IOU_PBUF_RING_INC,
            min_left,
            resv: [0; 5],
        };
        // SAFETY: `reg` is a valid io_uring_buf_reg for the call; `page` is a
        // page-aligned mapping alive for the call, unregistered before returning.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring.as_raw_fd(),
                REGISTER_PBUF_RING,
                &reg as *const BufReg,
                1,
            )
        };
        if r == 0 {
            // SAFETY: as above; unregistering reads only `bgid`.
            unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    ring.as_raw_fd(),
                    UNREGISTER_PBUF_RING,
                    &reg as *const BufReg,
                    1,
                )
            };
        }
        r == 0
    };
    let inc = try_one(0);
    (inc, inc && try_one(2048))
}
