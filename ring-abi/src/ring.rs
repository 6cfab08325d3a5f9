//! Single-producer single-consumer ring cursors over the shared region.
//!
//! A ring is a power-of-two array of fixed-size slots and two free-running `u32` indices,
//! each alone on its cache line in the core's control block:
//!
//! ```text
//!   cache line A: prod   written only by the producer (Release), read by the consumer (Acquire)
//!   cache line B: cons   written only by the consumer (Release), read by the producer (Acquire)
//!
//!   slots:  [ .... | cons ............ prod | ......... ]   slot of index i = i & (entries-1)
//!                  └─ published, owned by consumer ─┘└─ free, owned by producer ─┘
//!   used = prod - cons (wrapping);   free = entries - used
//! ```
//!
//! Indices only ever grow (wrapping at 2^32, which is a multiple of every ring size), so
//! `prod - cons` is correct across the wrap. Each side keeps its own index in private
//! memory and only *stores* it to the shared word; it never reads its own word back, so a
//! peer that scribbles on it cannot confuse this side. Each side also caches the other's
//! index privately and reloads it only when the cache says the ring is full (producer,
//! fewer than the wanted free slots) or empty (consumer), like AF_XDP's `xsk.h` cursors.
//!
//! Batching: `reserve(n)` / `write(i, ..)` / `commit(k)` and `peek(n)` / `read(i)` /
//! `release(k)` move up to `n` slots with one shared-index store, so a batch of 32 costs
//! one cache-line transfer each way.
//!
//! Ordering: a producer writes slots, then stores `prod` with Release; a consumer loads
//! `prod` with Acquire, then reads the slots. A consumer copies slots out, then stores
//! `cons` with Release; a producer loads `cons` with Acquire before overwriting. A peer
//! index that is impossible (`prod - cons > entries`) is reported as
//! [`RingError::Corrupt`]; nothing is read or written because of it.

use core::sync::atomic::Ordering;

use crate::desc::{RxDesc, RxReturn, TxCompletion, TxDesc};
use crate::protocol;
use crate::shm::{Pod, SharedWord, SlotArray};

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::desc::TxDesc {}
    impl Sealed for crate::desc::RxDesc {}
    impl Sealed for crate::desc::TxCompletion {}
    impl Sealed for crate::desc::RxReturn {}
}

/// A record type that can sit in a ring slot: the four descriptor types.
#[allow(private_bounds)]
pub trait Slot: sealed::Sealed + Pod + Copy + Send + 'static {}
impl Slot for TxDesc {}
impl Slot for RxDesc {}
impl Slot for TxCompletion {}
impl Slot for RxReturn {}

/// The peer broke the ring protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The indices say more slots are in use than the ring has: the peer wrote an
    /// impossible index. The ring cannot be used any more; treat the peer as dead.
    #[error("ring corrupt: producer index {prod}, consumer index {cons}, {entries} entries")]
    Corrupt {
        /// Producer index seen.
        prod: u32,
        /// Consumer index seen.
        cons: u32,
        /// Ring size.
        entries: u32,
    },
}

/// The producing end of a ring. One per ring per process role; see
/// [`crate::region::Region::kshim_core`] and [`crate::region::Region::engine_core`].
#[derive(Debug)]
pub struct Producer<T: Slot> {
    prod: SharedWord,
    cons: SharedWord,
    slots: SlotArray<T>,
    /// Our producer index: next slot to publish.
    head: u32,
    /// Private copy of the consumer index.
    cached_cons: u32,
    /// Slots reserved by the last `reserve` and not yet committed.
    reserved: u32,
}

impl<T: Slot> Producer<T> {
    pub(crate) fn new(prod: SharedWord, cons: SharedWord, slots: SlotArray<T>) -> Self {
        // At attach time both indices are read once; afterwards only `cons` is loaded.
        let head = prod.get().load(Ordering::Acquire);
        let cached_cons = cons.get().load(Ordering::Acquire);
        Producer {
            prod,
            cons,
            slots,
            head,
            cached_cons,
            reserved: 0,
        }
    }

    /// Ring size.
    pub fn entries(&self) -> u32 {
        self.slots.entries()
    }

    /// Our producer index (the next slot to publish).
    pub fn index(&self) -> u32 {
        self.head
    }

    #[inline]
    fn free_cached(&self) -> u32 {
        self.entries()
            .wrapping_sub(self.head.wrapping_sub(self.cached_cons))
    }

    /// Reloads the consumer index and returns the number of free slots.
    #[inline]
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        let cons = protocol::observe(self.cons.get());
        let used = self.head.wrapping_sub(cons);
        if used > self.entries() {
            return Err(RingError::Corrupt {
                prod: self.head,
                cons,
                entries: self.entries(),
            });
        }
        self.cached_cons = cons;
        Ok(self.entries() - used)
    }

    /// Reserves up to `want` free slots and returns how many (0 when full). Reloads the
    /// consumer index only when the cached one shows fewer than `want` free. Replaces any
    /// earlier uncommitted reservation.
    #[inline]
    pub fn reserve(&mut self, want: u32) -> Result<u32, RingError> {
        let mut free = self.free_cached();
        if free < want {
            free = self.refresh()?;
        }
        self.reserved = free.min(want);
        Ok(self.reserved)
    }

    /// Writes reserved slot `i` (0-based within the reservation).
    ///
    /// # Panics
    /// If `i` is not inside the current reservation.
    #[inline]
    pub fn write(&mut self, i: u32, value: T) {
        assert!(i < self.reserved, "write outside the reservation");
        self.slots.write(self.head.wrapping_add(i), value);
    }

    /// Publishes the first `n` reserved slots with one Release store and ends the
    /// reservation.
    ///
    /// # Panics
    /// If `n` is larger than the reservation.
    #[inline]
    pub fn commit(&mut self, n: u32) {
        assert!(n <= self.reserved, "commit beyond the reservation");
        self.head = self.head.wrapping_add(n);
        self.reserved = 0;
        protocol::publish(self.prod.get(), self.head);
    }

    /// Publishes one value; `Ok(false)` when the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<bool, RingError> {
        if self.reserve(1)? == 0 {
            return Ok(false);
        }
        self.write(0, value);
        self.commit(1);
        Ok(true)
    }

    /// Publishes as many of `values` as fit with one index store; returns how many.
    #[inline]
    pub fn push_slice(&mut self, values: &[T]) -> Result<usize, RingError> {
        let want = u32::try_from(values.len()).unwrap_or(u32::MAX);
        let n = self.reserve(want)?;
        for (i, v) in values[..n as usize].iter().enumerate() {
            self.slots.write(self.head.wrapping_add(i as u32), *v);
        }
        self.commit(n);
        Ok(n as usize)
    }
}

/// The consuming end of a ring.
#[derive(Debug)]
pub struct Consumer<T: Slot> {
    prod: SharedWord,
    cons: SharedWord,
    slots: SlotArray<T>,
    /// Our consumer index: next slot to read.
    tail: u32,
    /// Private copy of the producer index.
    cached_prod: u32,
    /// Slots made visible by the last `peek` and not yet released.
    peeked: u32,
}

impl<T: Slot> Consumer<T> {
    pub(crate) fn new(prod: SharedWord, cons: SharedWord, slots: SlotArray<T>) -> Self {
        let tail = cons.get().load(Ordering::Acquire);
        Consumer {
            prod,
            cons,
            slots,
            tail,
            cached_prod: tail,
            peeked: 0,
        }
    }

    /// Ring size.
    pub fn entries(&self) -> u32 {
        self.slots.entries()
    }

    /// Our consumer index (the next slot to read).
    pub fn index(&self) -> u32 {
        self.tail
    }

    /// Reloads the producer index (Acquire) and returns the number of published slots.
    #[inline]
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        let prod = protocol::observe(self.prod.get());
        let avail = prod.wrapping_sub(self.tail);
        if avail > self.entries() {
            return Err(RingError::Corrupt {
                prod,
                cons: self.tail,
                entries: self.entries(),
            });
        }
        self.cached_prod = prod;
        Ok(avail)
    }

    /// Makes up to `want` published slots readable and returns how many (0 when empty).
    /// Reloads the producer index only when the cached one shows the ring empty.
    #[inline]
    pub fn peek(&mut self, want: u32) -> Result<u32, RingError> {
        let mut avail = self.cached_prod.wrapping_sub(self.tail);
        if avail == 0 {
            avail = self.refresh()?;
        }
        self.peeked = avail.min(want);
        Ok(self.peeked)
    }

    /// Copies peeked slot `i` out of shared memory (one volatile read). Validate the copy,
    /// never the slot: see the `desc` module on TOCTOU.
    ///
    /// # Panics
    /// If `i` is not inside the current peek.
    #[inline]
    pub fn read(&self, i: u32) -> T {
        assert!(i < self.peeked, "read outside the peeked range");
        self.slots.read(self.tail.wrapping_add(i))
    }

    /// Gives the first `n` peeked slots back to the producer with one Release store.
    ///
    /// # Panics
    /// If `n` is larger than the current peek.
    #[inline]
    pub fn release(&mut self, n: u32) {
        assert!(n <= self.peeked, "release beyond the peeked range");
        self.tail = self.tail.wrapping_add(n);
        self.peeked = 0;
        protocol::publish(self.cons.get(), self.tail);
    }

    /// Takes one value, if any.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<T>, RingError> {
        if self.peek(1)? == 0 {
            return Ok(None);
        }
        let v = self.read(0);
        self.release(1);
        Ok(Some(v))
    }

    /// Takes up to `out.len()` values with one index store; returns how many.
    #[inline]
    pub fn pop_slice(&mut self, out: &mut [T]) -> Result<usize, RingError> {
        let want = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let n = self.peek(want)?;
        for (i, o) in out[..n as usize].iter_mut().enumerate() {
            *o = self.slots.read(self.tail.wrapping_add(i as u32));
        }
        self.release(n);
        Ok(n as usize)
    }

    /// True when nothing is published beyond what was already seen; reloads the producer
    /// index when the cached view is empty (use this as the re-check in the doorbell
    /// protocol).
    #[inline]
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        if self.cached_prod != self.tail {
            return Ok(false);
        }
        Ok(self.refresh()? == 0)
    }
}
