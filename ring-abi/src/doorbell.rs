//! Doorbells: how a producer wakes a consumer that sleeps, without a syscall when it is
//! awake. See [`crate::protocol`] for the protocol and why no wakeup is lost.
//!
//! Per core there are two directions, *to engine* (TX and RX-return rings) and *to
//! kshim* (TX-completion and RX rings). Each direction has, in the core's control block,
//! a need-wakeup word (written by the consumer) and a futex word (bumped by the
//! producer), and outside the region an eventfd (created by kshim, passed to the engine
//! with the region over a Unix socket — kshim's job). The consumer says with the bits
//! it sets how it will sleep: [`WAKE_EVENTFD`] (a kernel producer can ring it) or
//! [`WAKE_FUTEX`] (userspace fast path; only if the region has
//! [`crate::layout::Features::FUTEX_WAKE`]).
//!
//! A producer calls [`Notifier::notify`] once after committing a batch to one or more
//! rings of the direction. A consumer whose rings are empty calls [`Waiter::wait`] with
//! a closure that re-checks its rings (e.g. [`crate::ring::Consumer::is_empty`]); it
//! sleeps only if the re-check after arming still finds nothing. Spinning for a while
//! before calling `wait` is the consumer's choice.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use core::sync::atomic::Ordering;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::thread::futex;

use crate::protocol;
use crate::shm::SharedWord;

/// Need-wakeup bit: the consumer sleeps in a read of its eventfd.
pub const WAKE_EVENTFD: u32 = 1 << 0;
/// Need-wakeup bit: the consumer sleeps in `FUTEX_WAIT` on the direction's futex word.
pub const WAKE_FUTEX: u32 = 1 << 1;

/// The eventfds of one core, one per direction.
#[derive(Debug)]
pub struct Eventfds {
    /// Rung by kshim, read by the engine.
    pub to_engine: Option<OwnedFd>,
    /// Rung by the engine, read by kshim.
    pub to_kshim: Option<OwnedFd>,
}

impl Eventfds {
    /// Two new eventfds (non-blocking, close-on-exec). Kshim creates them.
    pub fn new() -> Result<Eventfds, Errno> {
        let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
        Ok(Eventfds {
            to_engine: Some(eventfd(0, flags)?),
            to_kshim: Some(eventfd(0, flags)?),
        })
    }

    /// No eventfds: only futex waits are possible.
    pub fn none() -> Eventfds {
        Eventfds {
            to_engine: None,
            to_kshim: None,
        }
    }

    /// Duplicates both descriptors (for handing them to the other side).
    pub fn try_clone(&self) -> std::io::Result<Eventfds> {
        Ok(Eventfds {
            to_engine: self.to_engine.as_ref().map(|f| f.try_clone()).transpose()?,
            to_kshim: self.to_kshim.as_ref().map(|f| f.try_clone()).transpose()?,
        })
    }
}

/// How a consumer sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Read the direction's eventfd (works with a kernel producer).
    Eventfd,
    /// `FUTEX_WAIT` on the direction's futex word (userspace producers only).
    Futex,
}

/// How [`Waiter::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The re-check after arming found work; no sleep happened.
    Work,
    /// Slept and was woken (possibly for nothing: re-check the rings).
    Woken,
    /// Slept until the timeout.
    TimedOut,
}

/// Why a wait failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// `WaitMode::Eventfd` without an eventfd.
    #[error("no eventfd for this direction; pass one in Eventfds or wait with WaitMode::Futex")]
    NoEventfd,
    /// A syscall failed.
    #[error("doorbell syscall failed: {0}")]
    Io(#[from] Errno),
}

/// The producer's side of a direction's doorbell.
#[derive(Debug)]
pub struct Notifier {
    need_wakeup: SharedWord,
    futex: SharedWord,
    eventfd: Option<OwnedFd>,
}

impl Notifier {
    pub(crate) fn new(
        need_wakeup: SharedWord,
        futex: SharedWord,
        eventfd: Option<OwnedFd>,
    ) -> Self {
        Notifier {
            need_wakeup,
            futex,
            eventfd,
        }
    }

    /// Call after committing to the direction's rings. Rings the doorbell(s) the
    /// consumer asked for, if it asked; returns whether it rang. Costs a fence and a
    /// load when the consumer is awake.
    #[inline]
    pub fn notify(&self) -> Result<bool, Errno> {
        let bits = protocol::producer_check(self.need_wakeup.get());
        if bits == 0 {
            return Ok(false);
        }
        if bits & WAKE_FUTEX != 0 {
            self.futex.get().fetch_add(1, Ordering::Release);
            futex::wake(self.futex.get(), futex::Flags::empty(), u32::MAX >> 1)?;
        }
        if bits & WAKE_EVENTFD != 0 {
            if let Some(fd) = &self.eventfd {
                match rustix::io::write(fd, &1u64.to_ne_bytes()) {
                    // EAGAIN: the counter is saturated, the consumer will wake anyway.
                    Ok(_) | Err(Errno::AGAIN) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }
}

/// A direction's futex word, holding the region's mapping for as long as it lives: an
/// address that can be handed to the kernel for a wait elsewhere (an io_uring
/// `FUTEX_WAIT`). It is in memory shared with the other process, so a futex wait on it
/// must be a shared one, not `FUTEX_PRIVATE`.
#[derive(Debug, Clone)]
pub struct FutexWord(SharedWord);

impl FutexWord {
    /// The word.
    pub fn get(&self) -> &core::sync::atomic::AtomicU32 {
        self.0.get()
    }
}

/// The consumer's side of a direction's doorbell.
#[derive(Debug)]
pub struct Waiter {
    need_wakeup: SharedWord,
    futex: SharedWord,
    eventfd: Option<OwnedFd>,
}

impl Waiter {
    pub(crate) fn new(
        need_wakeup: SharedWord,
        futex: SharedWord,
        eventfd: Option<OwnedFd>,
    ) -> Self {
        Waiter {
            need_wakeup,
            futex,
            eventfd,
        }
    }

    /// Sleeps until woken, unless `has_work` (called after arming, see
    /// [`crate::protocol`]) finds work. `timeout` `None` sleeps without limit. The
    /// need-wakeup word is cleared before returning.
    pub fn wait(
        &self,
        mode: WaitMode,
        timeout: Option<Duration>,
        mut has_work: impl FnMut() -> bool,
    ) -> Result<Wake, WaitError> {
        let (bits, fd) = match mode {
            WaitMode::Eventfd => (
                WAKE_EVENTFD,
                Some(self.eventfd.as_ref().ok_or(WaitError::NoEventfd)?),
            ),
            WaitMode::Futex => (WAKE_FUTEX, None),
        };
        let seq = self.futex.get().load(Ordering::Acquire);
        protocol::consumer_arm(self.need_wakeup.get(), bits);
        if has_work() {
            protocol::consumer_disarm(self.need_wakeup.get());
            return Ok(Wake::Work);
        }
        let ts = timeout.map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let r = match fd {
            Some(fd) => wait_eventfd(fd, ts.as_ref()),
            None => match futex::wait(self.futex.get(), futex::Flags::empty(), seq, ts.as_ref()) {
                Ok(()) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(Wake::Woken),
                Err(Errno::TIMEDOUT) => Ok(Wake::TimedOut),
                Err(e) => Err(WaitError::Io(e)),
            },
        };
        protocol::consumer_disarm(self.need_wakeup.get());
        r
    }

    /// For a consumer that sleeps elsewhere (e.g. an io_uring read of [`Waiter::eventfd`]):
    /// announce the intent to sleep with `bits` ([`WAKE_EVENTFD`]), with the full fence of
    /// the protocol. Then re-check the rings; if they are still empty, sleep; on waking
    /// (or if the re-check found work) call [`Waiter::disarm`]. A futex sleeper must read
    /// [`Waiter::futex_seq`] *before* arming and wait on that value.
    pub fn arm(&self, bits: u32) {
        protocol::consumer_arm(self.need_wakeup.get(), bits);
    }

    /// Clears the need-wakeup bits (after waking, or when the re-check found work).
    pub fn disarm(&self) {
        protocol::consumer_disarm(self.need_wakeup.get());
    }

    /// The current futex sequence word (read before [`Waiter::arm`] for a futex sleep).
    pub fn futex_seq(&self) -> u32 {
        self.futex.get().load(Ordering::Acquire)
    }

    /// The direction's futex word itself, for a consumer that waits on it elsewhere
    /// (an io_uring `FUTEX_WAIT`).
    pub fn futex_word(&self) -> FutexWord {
        FutexWord(self.futex.clone())
    }

    /// This direction's eventfd, to read from an event loop.
    pub fn eventfd(&self) -> Option<BorrowedFd<'_>> {
        self.eventfd.as_ref().map(|f| f.as_fd())
    }

    /// Clears a pending eventfd count without sleeping (e.g. after a busy period).
    pub fn drain(&self) -> Result<(), Errno> {
        if let Some(fd) = &self.eventfd {
            let mut buf = [0u8; 8];
            match rustix::io::read(fd, &mut buf) {
                Ok(_) | Err(Errno::AGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn wait_eventfd(fd: &OwnedFd, ts: Option<&rustix::time::Timespec>) -> Result<Wake, WaitError> {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let n = match poll(&mut fds, ts) {
        Ok(n) => n,
        Err(Errno::INTR) => return Ok(Wake::Woken),
        Err(e) => return Err(WaitError::Io(e)),
    };
    if n == 0 {
        return Ok(Wake::TimedOut);
    }
    let mut buf = [0u8; 8];
    match rustix::io::read(fd.as_fd(), &mut buf) {
        Ok(_) | Err(Errno::AGAIN) => Ok(Wake::Woken),
        Err(e) => Err(WaitError::Io(e)),
    }
}
