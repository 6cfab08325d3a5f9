//! Many seeds: short transfers over randomly impaired links (rate, delay,
//! jitter with reordering, Bernoulli and Gilbert–Elliott loss, duplication,
//! short outages), both controllers, message mode (some messages with a TTL)
//! and stream mode. Every run
//! must keep the invariants checked in `common` (delivered once and intact,
//! or dropped with the sender told; every buffer returned). A failing seed
//! is printed and becomes a named test below.
//!
//! `LU2K_SEED=n` runs one seed (with `LU2K_SIM_DEBUG=1` / `LU2K_SIM_TRACE=1`
//! for connection state).

mod common;

use common::{run, Scenario};
use lu2k_linkem::{Config as LinkConfig, DuplexConfig, Loss, Outage};
use lu2k_udt::cc::Kind;

fn rng(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(state: &mut u64) -> f64 {
    (rng(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// The scenario of one seed.
fn scenario(seed: u64) -> Scenario {
    let mut s = seed;
    let rate = 2.0 + unit(&mut s) * 48.0;
    let rtt_ms = 2.0 + unit(&mut s) * 700.0;
    let jitter = if unit(&mut s) < 0.3 {
        unit(&mut s) * rtt_ms / 4.0
    } else {
        0.0
    };
    let reorder = unit(&mut s) < 0.5;
    let loss = match rng(&mut s) % 3 {
        0 => Loss::None,
        1 => Loss::Bernoulli {
            rate: unit(&mut s) * 0.1,
        },
        _ => Loss::GilbertElliott {
            rate: unit(&mut s) * 0.05,
            burst: 1.0 + unit(&mut s) * 4.0,
        },
    };
    let dup = if unit(&mut s) < 0.2 {
        unit(&mut s) * 0.05
    } else {
        0.0
    };
    let outages = if unit(&mut s) < 0.2 {
        let start = 1.0 + unit(&mut s) * 3.0;
        vec![Outage {
            start_s: start,
            end_s: start + unit(&mut s) * 3.0,
        }]
    } else {
        Vec::new()
    };
    let bdp = rate * 1e6 / 8.0 * rtt_ms / 1000.0;
    let fwd = LinkConfig {
        rate_mbps: Some(rate),
        queue_bytes: Some((bdp * (0.2 + unit(&mut s))) as u64 + 3000),
        overhead_bytes: 28,
        delay_ms: rtt_ms / 2.0,
        jitter_ms: jitter,
        reorder,
        loss,
        duplicate: dup,
        outages: outages.clone(),
    };
    let rev = LinkConfig {
        rate_mbps: None,
        queue_bytes: None,
        ..fwd.clone()
    };
    let n = 1 + rng(&mut s) % 12;
    let messages: Vec<u32> = (0..n).map(|_| 1 + (rng(&mut s) % 300_000) as u32).collect();
    // Stream mode for a fifth of the seeds, chosen apart from the random
    // sequence so that adding it did not change the scenarios of the named
    // regression seeds below.
    let stream = (seed / 2) % 5 == 1;
    let ttl_us = if unit(&mut s) < 0.25 {
        Some(200_000 + rng(&mut s) % 3_000_000)
    } else {
        None
    };
    Scenario {
        link: DuplexConfig {
            forward: fwd,
            reverse: rev,
        },
        cc: if seed % 2 == 0 {
            Kind::Satellite
        } else {
            Kind::Native
        },
        seed,
        duration_us: 600_000_000,
        messages: Some(messages),
        bulk_size: 0,
        ttl_us: if stream { None } else { ttl_us },
        verify_bytes: true,
        bdp_bps: (rate * 1e6) as u64,
        bdp_rtt_us: (rtt_ms * 1000.0) as u64,
        rcv_buf_pkts: None,
        mode: if stream {
            lu2k_udt::conn::Mode::Stream
        } else {
            lu2k_udt::conn::Mode::Message
        },
        bin_us: 1_000_000,
        paced: None,
    }
}

fn check(seed: u64) -> Result<(), String> {
    let sc = scenario(seed);
    let out = run(&sc);
    if out.violations.is_empty() {
        Ok(())
    } else {
        Err(format!("seed {seed}: {:?}\n{:?}", out.violations, sc))
    }
}

#[test]
fn thousand_seeds() {
    let seeds: Vec<u64> = match std::env::var("LU2K_SEED") {
        Ok(v) => vec![v.parse().unwrap()],
        Err(_) => (0..1000).collect(),
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                if let Err(e) = check(seed) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let f = failures.into_inner().unwrap();
    for e in &f {
        eprintln!("{e}");
    }
    assert!(f.is_empty(), "{} of {} seeds failed", f.len(), seeds.len());
}

/// Found by `thousand_seeds`: one 1-message transfer whose message was
/// larger than a BDP-sized receive buffer deadlocked (flow window 2, nothing
/// deliverable). The receive buffer now always holds two largest messages.
#[test]
fn seed_294_message_larger_than_bdp_buffer() {
    check(294).unwrap();
}

/// Found by `thousand_seeds`: a retransmission of a message was pending when
/// its TTL expired, the sender dropped it and reported it dropped, but the
/// receiver already had it all and delivered it. TTL now only applies before
/// a message has left completely.
#[test]
fn seed_58_ttl_drop_never_races_delivery() {
    let sc = scenario(58);
    assert!(sc.ttl_us.is_some());
    check(58).unwrap();
}
