//! The link model measured against its settings, on virtual time.

use std::time::Duration;

use lu2k_linkem::{
    Config, Direction, DropReason, Duplex, DuplexConfig, Fate, Instant, Link, Loss, Outage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn ns(n: u64) -> Instant {
    Instant::from_nanos(n)
}
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// Delivers everything due up to `until`, with the instant it was due.
fn drain<T>(link: &mut Link<T>, until: Instant) -> Vec<(Instant, T)> {
    let mut out = Vec::new();
    while let Some(t) = link.poll_deadline() {
        if t > until {
            break;
        }
        while let Some(p) = link.poll_deliver(t) {
            out.push((t, p));
        }
    }
    out
}

/// Half-width of the normal-approximation binomial interval at z.
fn binomial_halfwidth(n: u64, p: f64, z: f64) -> f64 {
    z * (n as f64 * p * (1.0 - p)).sqrt()
}
const Z99: f64 = 2.576;

#[test]
fn delay_is_propagation_plus_serialization_plus_queueing() {
    // 1250 bytes at 100 Mbit/s take exactly 100 µs.
    let cfg = Config {
        rate_mbps: Some(100.0),
        delay_ms: 300.0,
        ..Config::default()
    };
    let mut link = Link::new(cfg, 1).unwrap();
    // Spaced out: the link is idle for each, no queueing.
    for i in 0..100u64 {
        let t = ns(i * MS);
        assert_eq!(
            link.handle_datagram(t, 1250, i),
            Fate::Deliver(ns(i * MS + 100_000 + 300 * MS))
        );
    }
    let got = drain(&mut link, ns(10 * S));
    assert_eq!(got.len(), 100);
    for (i, (t, id)) in got.into_iter().enumerate() {
        assert_eq!(id, i as u64);
        assert_eq!(t, ns(i as u64 * MS + 100_000 + 300 * MS));
    }
    // A burst at one instant: the i-th waits behind i datagrams.
    let t0 = 20 * S;
    for i in 0..50u64 {
        let _ = link.handle_datagram(ns(t0), 1250, i);
    }
    let got = drain(&mut link, ns(30 * S));
    assert_eq!(got.len(), 50);
    for (i, (t, id)) in got.into_iter().enumerate() {
        assert_eq!(id, i as u64);
        assert_eq!(t, ns(t0 + (i as u64 + 1) * 100_000 + 300 * MS));
    }
}

#[test]
fn serialization_is_exact_at_awkward_rates_and_counts_overhead() {
    // 1000 wire bytes (972 + 28 overhead) at 7 Mbit/s: 8/7 ms each, so seven
    // back to back end at exactly 8 ms; the others end at the rounded-up ns.
    let cfg = Config {
        rate_mbps: Some(7.0),
        overhead_bytes: 28,
        ..Config::default()
    };
    let mut link = Link::new(cfg, 1).unwrap();
    for i in 0..7u64 {
        let want = (i + 1) * 8 * MS / 7 + u64::from((i + 1) * 8 * MS % 7 != 0);
        assert_eq!(
            link.handle_datagram(ns(0), 972, ()),
            Fate::Deliver(ns(want))
        );
    }
    assert_eq!(
        link.handle_datagram(ns(0), 972, ()),
        Fate::Deliver(ns(8 * MS + 8 * MS / 7 + 1))
    );
}

#[test]
fn throughput_under_saturation_equals_rate() {
    let rate = 100e6;
    let limit = 150_000u64;
    let cfg = Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some(limit),
        delay_ms: 20.0,
        ..Config::default()
    };
    let mut link = Link::new(cfg, 7).unwrap();
    // Offer 150 Mbit/s of 1500-byte datagrams (one every 80 µs) for 10 s.
    let mut delivered: Vec<(Instant, usize)> = Vec::new();
    let mut t = 0;
    while t < 10 * S {
        let _ = link.handle_datagram(ns(t), 1500, 1500usize);
        assert!(link.queued_bytes(ns(t)) <= limit);
        delivered.extend(drain(&mut link, ns(t)));
        t += 80_000;
    }
    delivered.extend(drain(&mut link, ns(20 * S)));
    // Delivered bytes in a 6 s window well inside the run: exactly the rate,
    // up to one datagram at each edge.
    let (a, b) = (ns(2 * S), ns(8 * S));
    let bytes: usize = delivered
        .iter()
        .filter(|(t, _)| *t >= a && *t < b)
        .map(|(_, l)| l)
        .sum();
    let got = bytes as f64 * 8.0 / 6.0;
    assert!(
        (got - rate).abs() <= 2.0 * 1500.0 * 8.0 / 6.0,
        "throughput {got} bit/s, rate {rate}"
    );
    // A third of the offered load was tail-dropped, and the buffer filled:
    // the delay includes a full queue.
    let s = *link.stats();
    let offered = s.offered.packets as f64;
    let dropped = s.dropped_queue.packets as f64;
    assert!((dropped / offered - 1.0 / 3.0).abs() < 0.01, "{s:?}");
    assert_eq!(
        s.offered.packets,
        s.delivered.packets + s.dropped_queue.packets
    );
}

#[test]
fn queue_limit_tail_drops_exactly() {
    // 1 Mbit/s: a 1000-byte datagram takes 8 ms. The buffer holds ten.
    let cfg = Config {
        rate_mbps: Some(1.0),
        queue_bytes: Some(10_000),
        ..Config::default()
    };
    let mut link = Link::new(cfg, 3).unwrap();
    for i in 0..20 {
        let fate = link.handle_datagram(ns(0), 1000, ());
        if i < 10 {
            assert!(matches!(fate, Fate::Deliver(_)), "{i}: {fate:?}");
        } else {
            assert_eq!(fate, Fate::Drop(DropReason::Queue), "{i}");
        }
    }
    // Just before the first finishes, still full; at 8 ms one slot frees.
    assert_eq!(
        link.handle_datagram(ns(8 * MS - 1), 1000, ()),
        Fate::Drop(DropReason::Queue)
    );
    assert_eq!(link.queued_bytes(ns(8 * MS)), 9_000);
    assert_eq!(
        link.handle_datagram(ns(8 * MS), 1000, ()),
        Fate::Deliver(ns(88 * MS))
    );
    assert_eq!(
        link.handle_datagram(ns(8 * MS), 1000, ()),
        Fate::Drop(DropReason::Queue)
    );
    assert_eq!(link.stats().dropped_queue.packets, 12);
    assert_eq!(link.stats().dropped_queue.bytes, 12_000);
}

#[test]
fn bernoulli_loss_within_99_percent_binomial_interval() {
    let n = 200_000u64;
    for (seed, p) in [(11, 0.001), (12, 0.01), (13, 0.05), (14, 0.3)] {
        let cfg = Config {
            loss: Loss::Bernoulli { rate: p },
            ..Config::default()
        };
        let mut link = Link::new(cfg, seed).unwrap();
        for i in 0..n {
            let _ = link.handle_datagram(ns(i * 1000), 100, ());
        }
        let lost = link.stats().dropped_loss.packets;
        let expect = n as f64 * p;
        let hw = binomial_halfwidth(n, p, Z99);
        assert!(
            (lost as f64 - expect).abs() <= hw,
            "p={p}: lost {lost} of {n}, expected {expect} ± {hw}"
        );
        assert_eq!(drain(&mut link, ns(u64::MAX)).len() as u64, n - lost);
    }
}

/// Runs of losses in a loss pattern: (losses, number of runs).
fn runs(pattern: &[bool]) -> (u64, u64) {
    let mut losses = 0;
    let mut bursts = 0;
    let mut prev = false;
    for &l in pattern {
        losses += u64::from(l);
        bursts += u64::from(l && !prev);
        prev = l;
    }
    (losses, bursts)
}

#[test]
fn gilbert_elliott_mean_loss_and_burst_length() {
    let n = 2_000_000usize;
    for (seed, rate, burst) in [
        (21, 0.01, 4.0),
        (22, 0.05, 2.0),
        (23, 0.2, 10.0),
        (24, 0.01, 1.0),
    ] {
        let cfg = Config {
            loss: Loss::GilbertElliott { rate, burst },
            ..Config::default()
        };
        let mut link = Link::new(cfg, seed).unwrap();
        let pattern: Vec<bool> = (0..n)
            .map(|i| {
                matches!(
                    link.handle_datagram(ns(i as u64), 1, ()),
                    Fate::Drop(DropReason::Loss)
                )
            })
            .collect();
        let (losses, bursts) = runs(&pattern);
        let mean_loss = losses as f64 / n as f64;
        let mean_burst = losses as f64 / bursts as f64;
        // Tolerances: 99.9 % normal intervals. The loss fraction of a
        // two-state chain has variance π(1-π)/n · (1+λ)/(1-λ), λ = 1-p-r;
        // a burst length is geometric with variance (1-r)/r².
        let leave = 1.0 / burst;
        let enter = leave * rate / (1.0 - rate);
        let lambda = 1.0 - enter - leave;
        let z = 3.29;
        let sd_loss = (rate * (1.0 - rate) / n as f64 * (1.0 + lambda) / (1.0 - lambda)).sqrt();
        let sd_burst = ((1.0 - leave) / (leave * leave) / bursts as f64).sqrt();
        assert!(
            (mean_loss - rate).abs() <= z * sd_loss,
            "rate {rate} burst {burst}: mean loss {mean_loss} ± {}",
            z * sd_loss
        );
        assert!(
            (mean_burst - burst).abs() <= z * sd_burst.max(1e-9),
            "rate {rate} burst {burst}: mean burst {mean_burst} ± {}",
            z * sd_burst
        );
    }
}

#[test]
fn gilbert_elliott_is_bursty_and_bernoulli_is_not() {
    // Same mean loss; the conditional loss probability after a loss tells them apart.
    let n = 1_000_000usize;
    let after_loss = |loss: Loss| {
        let mut link = Link::new(
            Config {
                loss,
                ..Config::default()
            },
            5,
        )
        .unwrap();
        let p: Vec<bool> = (0..n)
            .map(|i| link.handle_datagram(ns(i as u64), 1, ()) == Fate::Drop(DropReason::Loss))
            .collect();
        let pairs = p.windows(2).filter(|w| w[0]).count() as f64;
        let both = p.windows(2).filter(|w| w[0] && w[1]).count() as f64;
        both / pairs
    };
    let ge = after_loss(Loss::GilbertElliott {
        rate: 0.02,
        burst: 5.0,
    });
    let be = after_loss(Loss::Bernoulli { rate: 0.02 });
    assert!(
        (ge - 0.8).abs() < 0.02,
        "P(loss | loss) = {ge}, want 1 - 1/5"
    );
    assert!((be - 0.02).abs() < 0.01, "P(loss | loss) = {be}, want 0.02");
}

#[test]
fn outages_drop_exactly_their_window() {
    let cfg = Config {
        delay_ms: 10.0,
        outages: vec![
            Outage {
                start_s: 2.0,
                end_s: 2.000_001,
            },
            Outage {
                start_s: 1.0,
                end_s: 1.5,
            },
        ],
        ..Config::default()
    };
    let mut link = Link::new(cfg, 9).unwrap();
    let step = 100_000; // 100 µs
    let mut t = 0;
    let mut dropped = 0;
    while t < 3 * S {
        let down = (S..S + S / 2).contains(&t) || (2 * S..2 * S + 1000).contains(&t);
        let fate = link.handle_datagram(ns(t), 100, ());
        if down {
            dropped += 1;
            assert_eq!(fate, Fate::Drop(DropReason::Outage), "t={t}");
        } else {
            assert_eq!(fate, Fate::Deliver(ns(t + 10 * MS)), "t={t}");
        }
        t += step;
    }
    assert_eq!(dropped, 5000 + 1);
    // The edges to the nanosecond: start inclusive, end exclusive.
    assert!(matches!(
        link.handle_datagram(ns(S - 1 + 3 * S), 1, ()),
        Fate::Deliver(_)
    ));
    let mut link = Link::new(link.config().clone(), 9).unwrap();
    assert!(matches!(
        link.handle_datagram(ns(S - 1), 1, ()),
        Fate::Deliver(_)
    ));
    assert_eq!(
        link.handle_datagram(ns(S), 1, ()),
        Fate::Drop(DropReason::Outage)
    );
    assert_eq!(
        link.handle_datagram(ns(S + S / 2 - 1), 1, ()),
        Fate::Drop(DropReason::Outage)
    );
    assert!(matches!(
        link.handle_datagram(ns(S + S / 2), 1, ()),
        Fate::Deliver(_)
    ));
    assert_eq!(link.stats().dropped_outage.packets, 2);
}

#[test]
fn outages_apply_at_transmission_start_behind_a_queue() {
    // 1 Mbit/s, 1000 bytes = 8 ms each; ten queued at t=0 start at 0, 8, .. 72 ms.
    // An outage over [20 ms, 40 ms) takes those starting at 24 and 32 ms.
    let cfg = Config {
        rate_mbps: Some(1.0),
        outages: vec![Outage {
            start_s: 0.020,
            end_s: 0.040,
        }],
        ..Config::default()
    };
    let mut link = Link::new(cfg, 1).unwrap();
    let fates: Vec<Fate> = (0..10)
        .map(|_| link.handle_datagram(ns(0), 1000, ()))
        .collect();
    for (i, f) in fates.iter().enumerate() {
        if i == 3 || i == 4 {
            assert_eq!(*f, Fate::Drop(DropReason::Outage), "{i}");
        } else {
            assert_eq!(*f, Fate::Deliver(ns((i as u64 + 1) * 8 * MS)), "{i}");
        }
    }
}

/// Offers `n` datagrams one every `gap` ns with delay 50 ms ± 10 ms; returns
/// (send time, delivery time) in delivery order.
fn jitter_trace(reorder: bool, n: u64, gap: u64) -> Vec<(u64, u64)> {
    let cfg = Config {
        delay_ms: 50.0,
        jitter_ms: 10.0,
        reorder,
        ..Config::default()
    };
    let mut link = Link::new(cfg, 77).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let _ = link.handle_datagram(ns(i * gap), 10, i * gap);
        out.extend(drain(&mut link, ns(i * gap)));
    }
    out.extend(drain(&mut link, ns(u64::MAX)));
    out.into_iter()
        .map(|(t, sent)| (sent, t.as_nanos()))
        .collect()
}

#[test]
fn jitter_without_reordering_keeps_order() {
    let trace = jitter_trace(false, 20_000, MS);
    assert_eq!(trace.len(), 20_000);
    for w in trace.windows(2) {
        assert!(w[0].0 < w[1].0, "reordered: {w:?}");
        assert!(w[0].1 <= w[1].1);
    }
    let delays: Vec<u64> = trace.iter().map(|(s, d)| d - s).collect();
    assert!(delays.iter().all(|&d| (40 * MS..=60 * MS).contains(&d)));
    // Jitter is really there.
    let distinct: std::collections::BTreeSet<u64> = delays.iter().copied().collect();
    assert!(distinct.len() > 10_000);
}

#[test]
fn jitter_with_reordering_is_uniform_around_the_delay() {
    let n = 20_000;
    let trace = jitter_trace(true, n, MS);
    assert_eq!(trace.len() as u64, n);
    let inversions = trace.windows(2).filter(|w| w[0].0 > w[1].0).count();
    assert!(inversions > 1000, "only {inversions} reorderings");
    let delays: Vec<f64> = trace.iter().map(|(s, d)| (d - s) as f64 / 1e6).collect();
    assert!(delays.iter().all(|&d| (40.0..=60.0).contains(&d)));
    // Uniform on [40, 60] ms: mean 50, sd 20/√12.
    let mean = delays.iter().sum::<f64>() / n as f64;
    let sd_mean = 20.0 / 12f64.sqrt() / (n as f64).sqrt();
    assert!((mean - 50.0).abs() < 3.29 * sd_mean, "mean delay {mean} ms");
    for (lo, hi) in [(40.0, 45.0), (45.0, 50.0), (50.0, 55.0), (55.0, 60.0)] {
        let frac = delays.iter().filter(|&&d| d >= lo && d < hi).count() as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.02, "[{lo}, {hi}) ms: {frac}");
    }
}

#[test]
fn duplication_rate_and_copies() {
    let n = 100_000u64;
    let p = 0.02;
    let cfg = Config {
        duplicate: p,
        delay_ms: 1.0,
        ..Config::default()
    };
    let mut link = Link::new(cfg, 31).unwrap();
    for i in 0..n {
        let _ = link.handle_datagram(ns(i * 10_000), 64, i);
    }
    let got: Vec<u64> = drain(&mut link, ns(u64::MAX))
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    let dups = link.stats().duplicated.packets;
    assert!((dups as f64 - n as f64 * p).abs() <= binomial_halfwidth(n, p, Z99));
    assert_eq!(got.len() as u64, n + dups);
    // Without reordering, a copy follows its original directly.
    let adjacent = got.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    assert_eq!(adjacent, dups);
    assert!(got.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(link.stats().delivered.packets, n + dups);
}

fn busy_config() -> Config {
    Config {
        rate_mbps: Some(50.0),
        queue_bytes: Some(64_000),
        overhead_bytes: 28,
        delay_ms: 120.0,
        jitter_ms: 3.0,
        reorder: true,
        loss: Loss::GilbertElliott {
            rate: 0.03,
            burst: 3.0,
        },
        duplicate: 0.01,
        outages: vec![Outage {
            start_s: 0.5,
            end_s: 0.7,
        }],
    }
}

/// A trace of a busy link: offered at random instants and sizes, every delivery.
fn trace(seed: u64) -> (Vec<(Instant, u32)>, lu2k_linkem::Stats) {
    let mut link = Link::new(busy_config(), seed).unwrap();
    let mut traffic = ChaCha8Rng::seed_from_u64(1000);
    let mut t = 0u64;
    let mut out = Vec::new();
    for id in 0..50_000u32 {
        t += traffic.random_range(0..200_000);
        let len = traffic.random_range(40..1500);
        let _ = link.handle_datagram(ns(t), len, id);
        out.extend(drain(&mut link, ns(t)));
    }
    out.extend(drain(&mut link, ns(u64::MAX)));
    (out, *link.stats())
}

#[test]
fn same_seed_same_trace() {
    let (a, sa) = trace(42);
    let (b, sb) = trace(42);
    assert_eq!(a, b);
    assert_eq!(sa, sb);
    let (c, _) = trace(43);
    assert_ne!(a, c);
    // Every way out is exercised, and the books balance.
    let s = sa;
    assert!(s.dropped_queue.packets > 0, "{s:?}");
    assert!(s.dropped_loss.packets > 0);
    assert!(s.dropped_outage.packets > 0);
    assert!(s.duplicated.packets > 0);
    let out = s.delivered.packets - s.duplicated.packets
        + s.dropped_queue.packets
        + s.dropped_outage.packets
        + s.dropped_loss.packets;
    assert_eq!(s.offered.packets, out);
    let out_bytes = s.delivered.bytes - s.duplicated.bytes
        + s.dropped_queue.bytes
        + s.dropped_outage.bytes
        + s.dropped_loss.bytes;
    assert_eq!(s.offered.bytes, out_bytes);
    assert_eq!(a.len() as u64, s.delivered.packets);
}

#[test]
fn loss_pattern_does_not_depend_on_jitter_or_duplication() {
    let lost = |jitter_ms: f64, duplicate: f64| {
        let cfg = Config {
            delay_ms: 10.0,
            jitter_ms,
            duplicate,
            loss: Loss::Bernoulli { rate: 0.1 },
            ..Config::default()
        };
        let mut link = Link::new(cfg, 8).unwrap();
        (0..10_000u64)
            .map(|i| link.handle_datagram(ns(i * MS), 1, ()) == Fate::Drop(DropReason::Loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(lost(0.0, 0.0), lost(5.0, 0.3));
}

#[test]
fn config_from_toml_and_validation_names_the_field() {
    let text = r#"
        [forward]
        rate_mbps = 100
        queue_bytes = 1_500_000
        overhead_bytes = 28
        delay_ms = 300
        jitter_ms = 2.5
        reorder = true
        duplicate = 0.001
        loss = { model = "gilbert_elliott", rate = 0.01, burst = 4.0 }
        outages = [ { start_s = 30, end_s = 40 } ]

        [reverse]
        rate_mbps = 2
        delay_ms = 300
        loss = { model = "bernoulli", rate = 0.001 }
    "#;
    let cfg: DuplexConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.forward.rate_mbps, Some(100.0));
    assert_eq!(cfg.forward.queue_bytes, Some(1_500_000));
    assert_eq!(cfg.forward.delay_ms, 300.0);
    assert_eq!(
        cfg.forward.loss,
        Loss::GilbertElliott {
            rate: 0.01,
            burst: 4.0
        }
    );
    assert_eq!(
        cfg.forward.outages,
        vec![Outage {
            start_s: 30.0,
            end_s: 40.0
        }]
    );
    assert_eq!(cfg.reverse.loss, Loss::Bernoulli { rate: 0.001 });
    assert_eq!(cfg.reverse.jitter_ms, 0.0);
    cfg.validate().unwrap();
    // Omitted entirely: a perfect link.
    let empty: Config = toml::from_str("").unwrap();
    assert_eq!(empty, Config::default());
    // Unknown fields are refused, not ignored.
    assert!(toml::from_str::<Config>("delay = 3").is_err());
    assert!(toml::from_str::<Config>("loss = { model = \"bernoulli\", p = 0.1 }").is_err());

    let field = |c: Config| c.validate().unwrap_err().field;
    let base = Config::default;
    assert_eq!(
        field(Config {
            rate_mbps: Some(0.0),
            ..base()
        }),
        "rate_mbps"
    );
    assert_eq!(
        field(Config {
            queue_bytes: Some(0),
            ..base()
        }),
        "queue_bytes"
    );
    assert_eq!(
        field(Config {
            delay_ms: -1.0,
            ..base()
        }),
        "delay_ms"
    );
    assert_eq!(
        field(Config {
            delay_ms: 1.0,
            jitter_ms: 2.0,
            ..base()
        }),
        "jitter_ms"
    );
    assert_eq!(
        field(Config {
            loss: Loss::Bernoulli { rate: 1.5 },
            ..base()
        }),
        "loss.rate"
    );
    assert_eq!(
        field(Config {
            loss: Loss::GilbertElliott {
                rate: 0.5,
                burst: 0.5
            },
            ..base()
        }),
        "loss.burst"
    );
    // rate 0.9 needs bursts of at least 9.
    assert_eq!(
        field(Config {
            loss: Loss::GilbertElliott {
                rate: 0.9,
                burst: 5.0
            },
            ..base()
        }),
        "loss.burst"
    );
    assert_eq!(
        field(Config {
            duplicate: f64::NAN,
            ..base()
        }),
        "duplicate"
    );
    assert_eq!(
        field(Config {
            outages: vec![
                Outage {
                    start_s: 1.0,
                    end_s: 2.0
                },
                Outage {
                    start_s: 3.0,
                    end_s: 3.0
                }
            ],
            ..base()
        }),
        "outages[1].end_s"
    );
    let bad = DuplexConfig {
        reverse: Config {
            loss: Loss::Bernoulli { rate: -0.1 },
            ..base()
        },
        ..DuplexConfig::default()
    };
    let err = Duplex::<()>::new(bad, 1).unwrap_err();
    assert_eq!(err.field, "reverse.loss.rate");
    assert!(err.to_string().contains("reverse.loss.rate"), "{err}");
}

#[test]
fn duplex_directions_are_independent_and_asymmetric() {
    let cfg = DuplexConfig {
        forward: Config {
            rate_mbps: Some(100.0),
            delay_ms: 300.0,
            ..Config::default()
        },
        reverse: Config {
            rate_mbps: Some(1.0),
            delay_ms: 250.0,
            ..Config::default()
        },
    };
    let mut d = Duplex::new(cfg, 5).unwrap();
    assert_eq!(
        d.handle_datagram(ns(0), Direction::Forward, 1250, 'f'),
        Fate::Deliver(ns(300 * MS + 100_000))
    );
    assert_eq!(
        d.handle_datagram(ns(0), Direction::Reverse, 1250, 'r'),
        Fate::Deliver(ns(250 * MS + 10 * MS))
    );
    assert_eq!(d.poll_deadline(), Some(ns(260 * MS)));
    assert_eq!(d.poll_deliver(ns(259 * MS)), None);
    assert_eq!(d.poll_deliver(ns(S)), Some((Direction::Reverse, 'r')));
    assert_eq!(d.poll_deliver(ns(S)), Some((Direction::Forward, 'f')));
    assert_eq!(d.poll_deliver(ns(S)), None);
    assert_eq!(d.poll_deadline(), None);
    assert_eq!(d.link(Direction::Forward).stats().delivered.packets, 1);
    assert_eq!(Direction::Forward.opposite(), Direction::Reverse);

    // Same loss settings both ways, different random streams.
    let lossy = Config {
        loss: Loss::Bernoulli { rate: 0.5 },
        ..Config::default()
    };
    let mut d = Duplex::new(DuplexConfig::symmetric(lossy.clone()), 5).unwrap();
    let mut single = Link::new(lossy, 5).unwrap();
    let mut fwd = Vec::new();
    let mut rev = Vec::new();
    let mut one = Vec::new();
    for i in 0..256 {
        fwd.push(d.handle_datagram(ns(i), Direction::Forward, 1, ()));
        rev.push(d.handle_datagram(ns(i), Direction::Reverse, 1, ()));
        one.push(single.handle_datagram(ns(i), 1, ()));
    }
    assert_ne!(fwd, rev);
    // The forward direction matches a lone link with the same seed.
    assert_eq!(fwd, one);
}

#[test]
fn delivery_polls_respect_time() {
    let mut link = Link::new(
        Config {
            delay_ms: 5.0,
            ..Config::default()
        },
        0,
    )
    .unwrap();
    assert_eq!(link.poll_deadline(), None);
    let _ = link.handle_datagram(Instant::from_duration(Duration::from_millis(1)), 3, "x");
    assert_eq!(link.in_flight(), 1);
    assert_eq!(link.poll_deadline(), Some(ns(6 * MS)));
    assert_eq!(link.poll_deliver(ns(6 * MS - 1)), None);
    assert_eq!(link.poll_deliver(ns(6 * MS)), Some("x"));
    assert_eq!(link.in_flight(), 0);
    assert_eq!(link.stats().delivered.bytes, 3);
}

/// A random, valid configuration.
fn random_config(r: &mut ChaCha8Rng) -> Config {
    let delay_ms = if r.random_bool(0.2) {
        0.0
    } else {
        r.random_range(0.0..400.0)
    };
    let loss = match r.random_range(0..3) {
        0 => Loss::None,
        1 => Loss::Bernoulli {
            rate: r.random_range(0.0..0.3),
        },
        _ => Loss::GilbertElliott {
            rate: r.random_range(0.0..0.3),
            burst: r.random_range(1.0..20.0),
        },
    };
    let outages = (0..r.random_range(0..3))
        .map(|_| {
            let start_s = r.random_range(0.0..2.0);
            Outage {
                start_s,
                end_s: start_s + r.random_range(0.001..0.5),
            }
        })
        .collect();
    Config {
        rate_mbps: r.random_bool(0.7).then(|| r.random_range(0.5..1000.0)),
        queue_bytes: r.random_bool(0.7).then(|| r.random_range(1..500_000)),
        overhead_bytes: r.random_range(0..64),
        delay_ms,
        jitter_ms: if r.random_bool(0.5) {
            r.random_range(0.0..=delay_ms)
        } else {
            0.0
        },
        reorder: r.random_bool(0.5),
        loss,
        duplicate: if r.random_bool(0.3) {
            r.random_range(0.0..0.2)
        } else {
            0.0
        },
        outages,
    }
}

/// Runs random traffic through `link`; checks the invariants that hold for
/// every configuration and returns the trace (delivery instant, id).
fn check_invariants(cfg: &Config, seed: u64) -> Vec<(Instant, u32)> {
    let mut link = Link::new(cfg.clone(), seed).unwrap();
    let mut traffic = ChaCha8Rng::seed_from_u64(seed ^ 0xabcdef);
    let lo_delay = ((cfg.delay_ms - cfg.jitter_ms) * 1e6).round() as u64;
    let mut offered_at = Vec::new();
    let mut trace = Vec::new();
    let mut t = 0u64;
    let deliver = |link: &mut Link<u32>, now: Instant, trace: &mut Vec<(Instant, u32)>| {
        while let Some(due) = link.poll_deadline() {
            if due > now {
                break;
            }
            // Nothing is handed out before its time.
            if due.as_nanos() > 0 {
                assert_eq!(link.poll_deliver(ns(due.as_nanos() - 1)), None);
            }
            while let Some(id) = link.poll_deliver(due) {
                trace.push((due, id));
            }
        }
    };
    for id in 0..1000u32 {
        t += traffic.random_range(0..3_000_000);
        let len = traffic.random_range(1..9000);
        offered_at.push(t);
        let _ = link.handle_datagram(ns(t), len, id);
        if let Some(limit) = cfg.queue_bytes {
            if cfg.rate_mbps.is_some() {
                assert!(link.queued_bytes(ns(t)) <= limit);
            }
        }
        deliver(&mut link, ns(t), &mut trace);
    }
    deliver(&mut link, ns(u64::MAX), &mut trace);
    assert_eq!(link.in_flight(), 0);
    let s = *link.stats();
    assert_eq!(
        s.offered.packets,
        s.delivered.packets - s.duplicated.packets
            + s.dropped_queue.packets
            + s.dropped_outage.packets
            + s.dropped_loss.packets,
        "{cfg:?}"
    );
    assert_eq!(trace.len() as u64, s.delivered.packets);
    for w in trace.windows(2) {
        assert!(w[0].0 <= w[1].0, "delivered out of time order");
        if !cfg.reorder {
            assert!(w[0].1 <= w[1].1, "reordered without reordering: {cfg:?}");
        }
    }
    for &(at, id) in &trace {
        assert!(
            at.as_nanos() >= offered_at[id as usize] + lo_delay,
            "early: {cfg:?}"
        );
    }
    if cfg.rate_mbps.is_none() {
        for &(_, id) in &trace {
            let t = offered_at[id as usize] as f64 / 1e9;
            assert!(
                !cfg.outages.iter().any(|o| t >= o.start_s && t < o.end_s),
                "crossed during an outage: {cfg:?}"
            );
        }
    }
    trace
}

#[test]
fn invariants_hold_for_1000_random_configurations() {
    let mut r = ChaCha8Rng::seed_from_u64(2026);
    for run in 0..1000u64 {
        let cfg = random_config(&mut r);
        cfg.validate().unwrap();
        let trace = check_invariants(&cfg, run);
        if run % 10 == 0 {
            assert_eq!(
                trace,
                check_invariants(&cfg, run),
                "not deterministic: {cfg:?}"
            );
        }
    }
}
