//! Loom models of the ring publication and the doorbell protocol, using the crate's own
//! `protocol` functions (built on loom atomics under `--cfg loom`).
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p lu2k-ring-abi --release --test loom
//! ```
//!
//! (A separate target dir avoids rebuilding everything else with the loom cfg.) Without
//! `--cfg loom` this file compiles to nothing; the cross-process stress test covers the
//! same protocol on real hardware.
//!
//! The eventfd is modelled by a counter under a loom `Mutex` with a `Condvar`: a ring
//! adds one, a sleep waits for non-zero and takes it. A lost wakeup leaves the consumer
//! blocked forever, which loom reports as a deadlock.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU32;
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use lu2k_ring_abi::protocol::{consumer_arm, consumer_disarm, observe, producer_check, publish};

const ENTRIES: u32 = 2;

struct Shared {
    prod: AtomicU32,
    cons: AtomicU32,
    slots: [UnsafeCell<u64>; ENTRIES as usize],
    need_wakeup: AtomicU32,
    eventfd: Mutex<u64>,
    cv: Condvar,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            prod: AtomicU32::new(u32::MAX), // wraps during the model
            cons: AtomicU32::new(u32::MAX),
            slots: [UnsafeCell::new(0), UnsafeCell::new(0)],
            need_wakeup: AtomicU32::new(0),
            eventfd: Mutex::new(0),
            cv: Condvar::new(),
        })
    }

    fn ring(&self) {
        *self.eventfd.lock().unwrap() += 1;
        self.cv.notify_one();
    }

    fn sleep(&self) {
        let mut n = self.eventfd.lock().unwrap();
        while *n == 0 {
            n = self.cv.wait(n).unwrap();
        }
        *n = 0;
    }
}

/// Which producer to run: the real protocol, or one of two broken ones (negative
/// controls that loom must catch).
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Real,
    /// No full fence between publishing and reading the need-wakeup bits.
    NoFence,
    /// The index is published Relaxed instead of Release.
    RelaxedPublish,
}

/// Producer of `count` values 1..=count.
fn produce(s: &Shared, count: u64, variant: Variant) {
    let mut head = u32::MAX;
    for v in 1..=count {
        // Wait for space (the consumer frees slots by publishing `cons`).
        while head.wrapping_sub(observe(&s.cons)) >= ENTRIES {
            thread::yield_now();
        }
        s.slots[(head % ENTRIES) as usize].with_mut(|p| unsafe_free_write(p, v));
        head = head.wrapping_add(1);
        if variant == Variant::RelaxedPublish {
            s.prod.store(head, loom::sync::atomic::Ordering::Relaxed);
        } else {
            publish(&s.prod, head);
        }
        let bits = if variant == Variant::NoFence {
            s.need_wakeup.load(loom::sync::atomic::Ordering::Relaxed)
        } else {
            producer_check(&s.need_wakeup)
        };
        if bits != 0 {
            s.ring();
        }
    }
}

// loom's UnsafeCell hands out raw pointers; these two helpers are the only accesses, and
// loom checks them for data races (a missing Release/Acquire pair would be reported).
#[allow(unsafe_code)]
fn unsafe_free_write(p: *mut u64, v: u64) {
    // SAFETY: loom's UnsafeCell::with_mut gives exclusive access for the closure's
    // duration, and loom checks that no read of this cell races with it.
    unsafe { p.write(v) }
}

#[allow(unsafe_code)]
fn read_cell(p: *const u64) -> u64 {
    // SAFETY: as above, for shared access.
    unsafe { p.read() }
}

/// Consumer of `count` values: spins never, sleeps whenever the ring looks empty.
fn consume(s: &Shared, count: u64) {
    let mut tail = u32::MAX;
    let mut got = 0;
    while got < count {
        if observe(&s.prod) == tail {
            consumer_arm(&s.need_wakeup, 1);
            if observe(&s.prod) == tail {
                s.sleep();
            }
            consumer_disarm(&s.need_wakeup);
            continue;
        }
        let v = s.slots[(tail % ENTRIES) as usize].with(read_cell);
        got += 1;
        assert_eq!(v, got, "values arrive once and in order");
        tail = tail.wrapping_add(1);
        publish(&s.cons, tail);
    }
}

fn model(count: u64, variant: Variant) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let s = Shared::new();
        let s2 = s.clone();
        let producer = thread::spawn(move || produce(&s2, count, variant));
        consume(&s, count);
        producer.join().unwrap();
    });
}

#[test]
fn loom_publication_and_wakeup_one_item() {
    model(1, Variant::Real);
}

#[test]
fn loom_publication_and_wakeup_through_a_full_ring() {
    // Three values through two slots: slot reuse, wraparound of u32::MAX, two wakeups.
    model(3, Variant::Real);
}

#[test]
#[should_panic(expected = "deadlock")]
fn loom_finds_the_lost_wakeup_without_the_producer_fence() {
    // Negative control: without the fence, the producer's flag load can miss the
    // consumer's arm while the consumer's re-check misses the publication. Loom must
    // find that interleaving (a deadlock); if it did not, the model above proves nothing.
    model(1, Variant::NoFence);
}

#[test]
#[should_panic(expected = "Causality violation")]
fn loom_finds_the_data_race_without_release_publication() {
    // Negative control: with a Relaxed index store, the consumer's read of the slot is
    // not ordered after the producer's write; loom reports the race on the cell.
    model(1, Variant::RelaxedPublish);
}
