//! A live stream behind a tiny first message, on virtual time.
//!
//! The perf harness's live workload (perf/scenarios/live.toml): 20 Mbit/s of
//! 64 KiB chunks (LNet header included: 65 608 bytes, 46 packets) on a
//! 100 Mbit/s, 200 ms path with 1 % random loss each way, behind one warm-up
//! message sent and acknowledged first. With a 64-byte warm-up the engines
//! fell seconds behind in most harness runs (and once the receiver closed on
//! a backlog of 70 chunks, failed back as peer unreachable); with a chunk-sized
//! one they did not. Two causes, both in the satellite controller's start:
//!
//! - The one-packet message carries no packet pair, so the controller is still
//!   in its doubling start when the stream begins, pacing a 64-packet window
//!   per round trip (650 packets/s, below the stream's 1750). The arrival
//!   rate the receiver measured at that pace went into the controller's
//!   filter, and when the pair capacity arrived (late, when the first ACKs
//!   were held by a loss) the fast start kept its ceiling at 1.25 × that
//!   sender-limited sample: 25 % more a round, seconds of backlog (seed 13).
//! - The window filled right after a probe packet (seq ≡ 0 mod 16); its
//!   partner left 200 ms later and the receiver read that gap as a capacity
//!   of 5 packets/s; the fast start paced at it (seed 93). The receiver now
//!   counts a pair only if its packets left the sender together (their
//!   header timestamps).
//!
//! `LIVE_SEEDS=n` runs seeds `0..n` of the sweep (default 100).

mod common;

use common::{run, Outcome, Scenario};
use lu2k_linkem::{Config as LinkConfig, DuplexConfig, Loss};
use lu2k_udt::cc::Kind;

/// LNet header the engine puts before every payload.
const LNET_HDR: u32 = 72;
const RTT_US: u64 = 200_000;
/// Lateness no chunk may exceed: 4.5 round trips. A chunk whose packet and
/// then its retransmission are lost waits for the loss report, a
/// retransmission, the periodic re-report and another; behind a chunk-sized
/// warm-up no chunk of the sweep comes later than 810 ms, behind a 64-byte
/// one 12 seeds of 100 did (up to 1.23 s) before the fixes.
const BOUND_US: u64 = 4 * RTT_US + RTT_US / 2;

fn live(seed: u64, first: u32) -> Scenario {
    let fwd = LinkConfig {
        rate_mbps: Some(100.0),
        queue_bytes: Some(2_500_000),
        overhead_bytes: 28,
        delay_ms: RTT_US as f64 / 2000.0,
        loss: Loss::Bernoulli { rate: 0.01 },
        ..LinkConfig::default()
    };
    // 20 Mbit/s of 64 KiB chunks for 6 s (the harness's --quick run).
    let interval = 65_536 * 8 * 1_000_000 / 20_000_000;
    let n = 6_000_000 / interval;
    let mut messages = vec![first + LNET_HDR];
    let mut paced = vec![0];
    for i in 0..n {
        messages.push(65_536 + LNET_HDR);
        paced.push(i * interval);
    }
    Scenario {
        link: DuplexConfig {
            forward: fwd.clone(),
            reverse: fwd,
        },
        cc: Kind::Satellite,
        seed,
        duration_us: 40_000_000,
        messages: Some(messages),
        bulk_size: 0,
        ttl_us: None,
        verify_bytes: false,
        // The engine's defaults: 65 536-packet receive buffer.
        bdp_bps: 1_000_000_000,
        bdp_rtt_us: 700_000,
        rcv_buf_pkts: Some(65_536),
        mode: lu2k_udt::conn::Mode::Message,
        bin_us: 100_000,
        paced: Some(paced),
    }
}

/// Per chunk (the warm-up left out): delivery time minus the time it was
/// queued, `u64::MAX` if never delivered.
fn lateness(sc: &Scenario, out: &Outcome) -> Vec<u64> {
    let n = sc.messages.as_ref().map_or(0, Vec::len);
    (1..n)
        .map(|i| {
            match (
                out.delivered_at.get(i).copied().flatten(),
                out.queued_at.get(i),
            ) {
                (Some(d), Some(&q)) => d - q,
                _ => u64::MAX,
            }
        })
        .collect()
}

/// Runs one seed and checks it; returns the chunks' lateness, sorted.
fn check(seed: u64, first: u32) -> Result<Vec<u64>, String> {
    let sc = live(seed, first);
    let out = run(&sc);
    let mut l = lateness(&sc, &out);
    l.sort_unstable();
    let worst = l.last().copied().unwrap_or(0);
    if !out.violations.is_empty() || out.client_closed.is_some() || worst > BOUND_US {
        return Err(format!(
            "seed {seed}, first message {first} B: worst chunk {worst} us (bound {BOUND_US}), \
             p90 {} us, closed {:?}, EXP {}, violations {:?}",
            l[l.len() * 9 / 10],
            out.client_closed,
            out.client_timeouts,
            out.violations
        ));
    }
    Ok(l)
}

fn p90(l: &[u64]) -> u64 {
    l[(l.len() - 1) * 9 / 10]
}

#[test]
fn tiny_first_message_then_live_stream_keeps_up() {
    let seeds: u64 = std::env::var("LIVE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut failures = Vec::new();
    let (mut tiny_p90, mut chunk_p90) = (0u64, 0u64);
    for seed in 0..seeds {
        for (first, sum) in [(64, &mut tiny_p90), (65_536, &mut chunk_p90)] {
            match check(seed, first) {
                Ok(l) => *sum += p90(&l),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Behind a tiny warm-up the stream's first round trip is slower (the
    // controller starts with it); over the run the p90 stays within 15 % of
    // the chunk-sized warm-up's (before the fixes: 31 % above).
    assert!(
        tiny_p90 * 100 <= chunk_p90 * 115,
        "mean p90 {} us behind a 64-byte warm-up, {} us behind a chunk",
        tiny_p90 / seeds,
        chunk_p90 / seeds
    );
}

/// The fast start kept the arrival rate its doubling start measured (the
/// sender's own pace) as the ceiling: 1.19 s behind at worst.
#[test]
fn seed_13_fast_start_ignores_the_starts_own_pace() {
    check(13, 64).unwrap();
}

/// The first packet pair was split by the full initial window (capacity read
/// as 5 packets/s, the fast start paced at it): 1.16 s behind at worst; with
/// the pair ignored, the start's own pace capped the ceiling as in seed 13
/// (1.23 s). Needs both fixes.
#[test]
fn seed_93_a_pair_split_by_the_window_is_no_capacity_sample() {
    check(93, 64).unwrap();
}

/// The stream's last packet is lost (nothing after it shows the gap).
/// Without a tail probe the sender waits for its EXP timer, holds the path
/// dead and probes, and the last chunk misses the bound; the probe resends
/// it two round trips after it left.
#[test]
fn seed_10_a_lost_last_packet_is_probed() {
    check(10, 64).unwrap();
    let out = run(&live(10, 64));
    assert_eq!(out.client_timeouts, 0, "the lost tail waited for EXP");
}
