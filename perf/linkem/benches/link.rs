//! Datagrams per second through the link model on virtual time: what a
//! simulation pays per datagram. Each iteration offers 65 536 datagrams of
//! 1250 bytes at 95 % of the link rate and takes every delivery out, for a
//! plain rate-limited link, one with Gilbert–Elliott loss, jitter and
//! reordering and duplication (every random stage on), and, as the baseline
//! beside them, a bare `VecDeque` FIFO doing the same pushes and pops.
//!
//! `cargo bench -p lu2k-linkem --bench link`

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lu2k_linkem::{Config, Instant, Link, Loss};

const PER_ITER: u64 = 1 << 16;
/// 1250 bytes at 95 Mbit/s.
const GAP_NS: u64 = 105_263;

fn run(cfg: &Config) -> u64 {
    let mut link = Link::new(cfg.clone(), 7).unwrap();
    let mut got = 0;
    for i in 0..PER_ITER {
        let now = Instant::from_nanos(i * GAP_NS);
        let _ = link.handle_datagram(now, 1250, i);
        while let Some(p) = link.poll_deliver(now) {
            got += black_box(p) & 1;
        }
    }
    while let Some(t) = link.poll_deadline() {
        while let Some(p) = link.poll_deliver(t) {
            got += black_box(p) & 1;
        }
    }
    got
}

fn fifo() -> u64 {
    let mut q = VecDeque::new();
    let mut got = 0;
    for i in 0..PER_ITER {
        q.push_back((i * GAP_NS + 300_000_000, i));
        while let Some(&(at, p)) = q.front() {
            if at > i * GAP_NS {
                break;
            }
            q.pop_front();
            got += black_box(p) & 1;
        }
    }
    got + q.drain(..).map(|(_, p)| black_box(p) & 1).sum::<u64>()
}

fn bench(c: &mut Criterion) {
    let plain = Config {
        rate_mbps: Some(100.0),
        queue_bytes: Some(1_000_000),
        delay_ms: 300.0,
        ..Config::default()
    };
    let impaired = Config {
        jitter_ms: 5.0,
        reorder: true,
        duplicate: 0.01,
        loss: Loss::GilbertElliott {
            rate: 0.01,
            burst: 4.0,
        },
        ..plain.clone()
    };
    let mut g = c.benchmark_group("link");
    g.throughput(Throughput::Elements(PER_ITER));
    g.bench_function(BenchmarkId::new("datagrams", "vecdeque-baseline"), |b| {
        b.iter(fifo)
    });
    g.bench_function(BenchmarkId::new("datagrams", "rate+delay"), |b| {
        b.iter(|| run(&plain))
    });
    g.bench_function(BenchmarkId::new("datagrams", "all-impairments"), |b| {
        b.iter(|| run(&impaired))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
