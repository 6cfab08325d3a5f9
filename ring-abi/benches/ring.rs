//! Descriptors per second from a producer thread to a consumer thread through one TX ring
//! (1024 × 128-byte `TxDesc` in a memfd region), batch 1 and batch 32, beside
//! `crossbeam_queue::ArrayQueue<TxDesc>` of the same capacity in the same run.
//!
//! `cargo bench -p lu2k-ring-abi --bench ring`
//!
//! Each iteration moves 65 536 descriptors; the consumer reads every one out (one copy
//! of 128 bytes, as the engine does before validating) and checks the order.

#[cfg(not(loom))]
mod bench {
    use std::hint::{black_box, spin_loop};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, Throughput};
    use crossbeam_queue::ArrayQueue;
    use lu2k_ring_abi::{Config, EngineCore, Eventfds, KshimCore, Region, TxDesc};

    const PER_ITER: u64 = 1 << 16;
    const ENTRIES: u32 = 1024;

    /// Pins the calling thread to `cpu` (producer on 0, consumer on 1, for every
    /// contender), if the machine has it; spinning threads sharing a core measure the
    /// scheduler, not the queue. `LU2K_BENCH_NO_PIN=1` leaves placement to the scheduler
    /// (better on a machine busy with other work).
    fn pin(cpu: usize) {
        if std::env::var_os("LU2K_BENCH_NO_PIN").is_some() {
            return;
        }
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }

    /// Waiting on an empty or full queue: spin a little, then yield, so that on an
    /// oversubscribed machine the other side gets the core. Same policy for both.
    #[inline]
    fn backoff(spins: &mut u32) {
        *spins += 1;
        if *spins < 64 {
            spin_loop();
        } else {
            *spins = 0;
            thread::yield_now();
        }
    }

    fn desc(i: u64) -> TxDesc {
        let mut d = TxDesc::inline(i, lu2k_ring_abi::Nid::from_nid4(0xC0A8_0105), [0; 72], &[]);
        d.total_len = i as u32;
        d
    }

    fn lu2k(
        k: &mut KshimCore,
        e: &mut Option<EngineCore>,
        iters: u64,
        batch: u32,
        notify: bool,
    ) -> Duration {
        let total = iters * PER_ITER;
        let mut engine = e.take().unwrap();
        let consumer = thread::spawn(move || {
            pin(1);
            let mut next = 0u64;
            let mut sum = 0u64;
            let mut spins = 0u32;
            while next < total {
                let n = engine.tx.peek(batch).unwrap();
                if n == 0 {
                    backoff(&mut spins);
                    continue;
                }
                for j in 0..n {
                    let d = engine.tx.read(j);
                    assert_eq!(d.cookie, next);
                    sum = sum.wrapping_add(u64::from(d.total_len));
                    next += 1;
                }
                engine.tx.release(n);
            }
            black_box(sum);
            engine
        });
        let start = Instant::now();
        let mut spins = 0u32;
        let mut i = 0u64;
        while i < total {
            let want = (total - i).min(u64::from(batch)) as u32;
            let n = k.tx.reserve(want).unwrap();
            if n == 0 {
                backoff(&mut spins);
                continue;
            }
            for j in 0..n {
                k.tx.write(j, desc(i + u64::from(j)));
            }
            k.tx.commit(n);
            if notify {
                k.to_engine.notify().unwrap();
            }
            i += u64::from(n);
        }
        *e = Some(consumer.join().unwrap());
        start.elapsed()
    }

    fn crossbeam(iters: u64) -> Duration {
        let total = iters * PER_ITER;
        let q = Arc::new(ArrayQueue::<TxDesc>::new(ENTRIES as usize));
        let q2 = Arc::clone(&q);
        let consumer = thread::spawn(move || {
            pin(1);
            let mut next = 0u64;
            let mut sum = 0u64;
            let mut spins = 0u32;
            while next < total {
                match q2.pop() {
                    Some(d) => {
                        assert_eq!(d.cookie, next);
                        sum = sum.wrapping_add(u64::from(d.total_len));
                        next += 1;
                    }
                    None => backoff(&mut spins),
                }
            }
            black_box(sum);
        });
        let start = Instant::now();
        let mut spins = 0u32;
        for i in 0..total {
            let mut d = desc(i);
            while let Err(back) = q.push(d) {
                d = back;
                backoff(&mut spins);
            }
        }
        consumer.join().unwrap();
        start.elapsed()
    }

    /// One thread produces a batch and consumes it again: the CPU cost per descriptor
    /// without any cross-core traffic or dependence on the scheduler.
    fn lu2k_same_thread(k: &mut KshimCore, e: &mut EngineCore, iters: u64) -> Duration {
        let total = iters * PER_ITER;
        let start = Instant::now();
        let mut i = 0u64;
        while i < total {
            let n = k.tx.reserve(32).unwrap();
            for j in 0..n {
                k.tx.write(j, desc(i + u64::from(j)));
            }
            k.tx.commit(n);
            let m = e.tx.peek(32).unwrap();
            for j in 0..m {
                let d = e.tx.read(j);
                assert_eq!(d.cookie, i + u64::from(j));
                black_box(d.total_len);
            }
            e.tx.release(m);
            i += u64::from(n);
        }
        start.elapsed()
    }

    fn crossbeam_same_thread(iters: u64) -> Duration {
        let total = iters * PER_ITER;
        let q = ArrayQueue::<TxDesc>::new(ENTRIES as usize);
        let start = Instant::now();
        let mut i = 0u64;
        while i < total {
            for j in 0..32 {
                assert!(q.push(desc(i + j)).is_ok());
            }
            for j in 0..32 {
                let d = q.pop().unwrap();
                assert_eq!(d.cookie, i + j);
                black_box(d.total_len);
            }
            i += 32;
        }
        start.elapsed()
    }

    pub fn benches(c: &mut Criterion) {
        pin(0);
        let region = Region::create(&Config {
            tx_entries: ENTRIES,
            tx_pool_len: 4096,
            rx_buf_size: 64,
            rx_buf_count: 1,
            rx_tables_per_core: 0,
            ..Config::default()
        })
        .unwrap();
        let mut k = region.kshim_core(0, Eventfds::none()).unwrap();
        let mut e = Some(region.engine_core(0, Eventfds::none()).unwrap());

        let mut g = c.benchmark_group("spsc_tx_desc");
        g.throughput(Throughput::Elements(PER_ITER));
        g.sample_size(20);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(4));
        g.bench_function(BenchmarkId::new("lu2k", "batch1"), |b| {
            b.iter_custom(|iters| lu2k(&mut k, &mut e, iters, 1, false))
        });
        g.bench_function(BenchmarkId::new("lu2k", "batch32"), |b| {
            b.iter_custom(|iters| lu2k(&mut k, &mut e, iters, 32, false))
        });
        g.bench_function(BenchmarkId::new("lu2k", "batch32+notify"), |b| {
            b.iter_custom(|iters| lu2k(&mut k, &mut e, iters, 32, true))
        });
        g.bench_function(BenchmarkId::new("crossbeam_ArrayQueue", "batch1"), |b| {
            b.iter_custom(crossbeam)
        });
        g.bench_function(BenchmarkId::new("lu2k", "same_thread_batch32"), |b| {
            let eng = e.as_mut().unwrap();
            b.iter_custom(|iters| lu2k_same_thread(&mut k, eng, iters))
        });
        g.bench_function(
            BenchmarkId::new("crossbeam_ArrayQueue", "same_thread_batch32"),
            |b| b.iter_custom(crossbeam_same_thread),
        );
        g.finish();
    }
}

#[cfg(not(loom))]
criterion::criterion_group!(benches, bench::benches);
#[cfg(not(loom))]
criterion::criterion_main!(benches);

#[cfg(loom)]
fn main() {}
