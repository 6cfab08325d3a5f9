//! Real-time scheduling for threads that must keep time (the relay, and the
//! drivers that measure it). This is the crate's one syscall edge without a
//! safe wrapper in rustix, hence its own module with `unsafe` allowed.

use std::io;

/// Puts the calling thread under `SCHED_FIFO` at `priority` (1–99), so that
/// ordinary load on the machine cannot delay it. Needs root or
/// `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` allowance); fails with `EPERM`
/// otherwise. The kernel's RT throttling (by default 95 % of each second)
/// still leaves the rest of the machine some time if the thread spins.
pub fn set_realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; pid 0 names the calling thread; the call writes no memory of ours.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
