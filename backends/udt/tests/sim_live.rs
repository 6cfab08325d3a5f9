//! A live stream after a tiny first message, on virtual time.

mod common;

use common::{run, Outcome, Scenario};
use lu2k_linkem::{Config as LinkConfig, DuplexConfig, Loss};
use lu2k_udt::cc::Kind;

/// LNet header the engine puts before every payload.
const LNET_HDR: u32 = 72;

fn live(seed: u64, first: u32, loss: f64, secs: f64) -> (Scenario, u64) {
    let fwd = LinkConfig {
        rate_mbps: Some(100.0),
        queue_bytes: Some(2_500_000),
        overhead_bytes: 28,
        delay_ms: 100.0,
        loss: if loss > 0.0 {
            Loss::Bernoulli { rate: loss }
        } else {
            Loss::None
        },
        ..LinkConfig::default()
    };
    let link = DuplexConfig {
        forward: fwd.clone(),
        reverse: fwd,
    };
    // 20 Mbit/s of 64 KiB chunks.
    let interval = (65_536.0 * 8.0 / 20e6 * 1e6) as u64;
    let n = (secs * 1e6 / interval as f64) as u64;
    let mut messages = vec![first + LNET_HDR];
    let mut paced = vec![0];
    for i in 0..n {
        messages.push(65_536 + LNET_HDR);
        paced.push(i * interval);
    }
    let sc = Scenario {
        link,
        cc: Kind::Satellite,
        seed,
        duration_us: ((secs + 30.0) * 1e6) as u64,
        messages: Some(messages),
        bulk_size: 0,
        ttl_us: None,
        verify_bytes: false,
        bdp_bps: 1_000_000_000,
        bdp_rtt_us: 700_000,
        rcv_buf_pkts: Some(65_536),
        mode: lu2k_udt::conn::Mode::Message,
        bin_us: 100_000,
        paced: Some(paced),
    };
    (sc, interval)
}

fn lateness(sc: &Scenario, out: &Outcome) -> Vec<u64> {
    let n = sc.messages.as_ref().unwrap().len();
    (1..n)
        .map(|i| match (out.delivered_at.get(i).copied().flatten(), out.queued_at.get(i)) {
            (Some(d), Some(q)) => d - q,
            _ => u64::MAX,
        })
        .collect()
}

#[test]
fn one() {
    let Ok(seed) = std::env::var("SEED") else { return };
    let seed: u64 = seed.parse().unwrap();
    let first: u32 = std::env::var("FIRST").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let (sc, _) = live(seed, first, 0.01, 6.0);
    let out = run(&sc);
    let l = lateness(&sc, &out);
    for (i, x) in l.iter().enumerate() {
        eprintln!("chunk {} queued {} late {}", i + 1, out.queued_at[i + 1], x);
    }
}

#[test]
fn explore() {
    let seeds: u64 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for first in [64u32, 65_536] {
        for seed in 0..seeds {
            let (sc, _) = live(seed, first, 0.01, 6.0);
            let out = run(&sc);
            let mut l = lateness(&sc, &out);
            l.sort_unstable();
            let q = |p: f64| l[((l.len() - 1) as f64 * p) as usize];
            eprintln!(
                "first {first} seed {seed}: p50 {} p90 {} p99 {} max {} closed {:?} timeouts {} retx {} viol {:?}",
                q(0.5), q(0.9), q(0.99), q(1.0), out.client_closed, out.client_timeouts, out.retransmitted,
                out.violations.iter().take(2).collect::<Vec<_>>()
            );
        }
    }
}
