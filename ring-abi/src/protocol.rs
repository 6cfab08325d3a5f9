//! The memory-ordering steps of the doorbell protocol, in one place so the loom model
//! (`tests/loom.rs`, built with `--cfg loom`) checks the very code the rings run.
//!
//! The protocol (a Dekker-style handshake; both sides need a full fence between their
//! store and their load, the same `smp_mb()` pair io_uring uses for `SQ_NEED_WAKEUP`):
//!
//! ```text
//!   producer                                   consumer (found its rings empty)
//!   write slots                                seq = futex word (futex mode only)
//!   store prod (Release)      ─┐         ┌─    store need_wakeup = bits
//!   fence(SeqCst)              │  Dekker │     fence(SeqCst)
//!   bits = load need_wakeup   ─┘         └─    re-check rings (load prod, Acquire)
//!   if bits: ring the doorbell(s)              if non-empty: clear need_wakeup, go on
//!                                              else sleep (eventfd / futex(seq)), then clear
//! ```
//!
//! Either the producer's load sees the consumer's `bits` (and rings), or the consumer's
//! re-check sees the producer's new `prod` (and does not sleep): the two fences forbid
//! both loads from missing both stores. A ring that arrives while the consumer is not
//! asleep is harmless: an eventfd keeps its count, a futex wait on a stale `seq` returns
//! at once. So no wakeup is lost; at worst a consumer wakes once for nothing.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU32, Ordering};

#[cfg(not(loom))]
use core::sync::atomic::{fence, AtomicU32, Ordering};

/// Producer, after its Release store of the ring index: full fence, then the consumer's
/// need-wakeup bits (0 = it is awake, do not ring).
#[inline]
pub fn producer_check(need_wakeup: &AtomicU32) -> u32 {
    fence(Ordering::SeqCst);
    need_wakeup.load(Ordering::Relaxed)
}

/// Consumer, before its re-check: announce the intent to sleep with `bits`, full fence.
#[inline]
pub fn consumer_arm(need_wakeup: &AtomicU32, bits: u32) {
    need_wakeup.store(bits, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// Consumer, on waking or when the re-check found work.
#[inline]
pub fn consumer_disarm(need_wakeup: &AtomicU32) {
    need_wakeup.store(0, Ordering::Relaxed);
}

/// Publishes a ring index: everything written before (slots, or reads of slots for a
/// consumer index) happens-before a peer's [`observe`] that sees `value`.
#[inline(always)]
pub fn publish(index: &AtomicU32, value: u32) {
    index.store(value, Ordering::Release);
}

/// Observes the peer's ring index; pairs with its [`publish`].
#[inline(always)]
pub fn observe(index: &AtomicU32) -> u32 {
    index.load(Ordering::Acquire)
}
