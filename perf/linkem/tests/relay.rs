//! The UDP relay measured on loopback against its settings: delay, loss,
//! rate and outages, through real sockets on the real clock.
//!
//! The tests share the machine's cores with whatever else runs, so they run
//! one at a time (`SERIAL`), put the relay and the test's own sender and
//! receiver under real-time scheduling, and print what they measured. Where
//! real-time scheduling is not permitted (not root), the timing tests skip
//! loudly: on a busy machine an ordinary thread is late by milliseconds.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{percentile, realtime_or_skip, report, serial, transfer, within_attempts, Pacing};
use lu2k_linkem::{Config, DuplexConfig, Loss, Outage, Relay, RelayConfig};

/// A relay whose side B sends to `b`, and the socket side A's application uses.
fn setup(link: DuplexConfig, seed: u64) -> (Relay, UdpSocket, UdpSocket) {
    setup_spinning(link, seed, std::time::Duration::ZERO)
}

/// `setup` whose relay polls `spin` before each deadline instead of sleeping
/// to it: for the sparse round-trip test, where this host's wakeup latency
/// (200-250 µs per send on some days) would otherwise count twice.
fn setup_spinning(
    link: DuplexConfig,
    seed: u64,
    spin: std::time::Duration,
) -> (Relay, UdpSocket, UdpSocket) {
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&b, 8 << 20);
    let mut cfg = RelayConfig::loopback(link, seed);
    cfg.spin = spin;
    cfg.b_peer = Some(b.local_addr().unwrap());
    let relay = Relay::spawn(cfg).unwrap();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(relay.a_addr()).unwrap();
    (relay, a, b)
}

#[test]
fn delay_within_1ms_at_100mbps_below_capacity() {
    let _g = serial();
    within_attempts("delay_within_1ms_at_100mbps_below_capacity", delay_run);
}

/// One measurement of the delay test: `Err` when the tail is over the bound.
fn delay_run() -> Result<(), String> {
    let delay_ms = 50.0;
    let rate = 100e6;
    let link = DuplexConfig::symmetric(Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some(1_000_000),
        overhead_bytes: 28,
        delay_ms,
        ..Config::default()
    });
    let (relay, a, b) = setup(link, 1);
    if !realtime_or_skip(
        relay.is_realtime(),
        "delay_within_1ms_at_100mbps_below_capacity",
    ) {
        return Ok(());
    }
    // 1472-byte datagrams at least 125 µs apart: at most 94 Mbit/s, ~2 s.
    let len = 1472;
    let n = 13_000;
    let (_, got) = transfer(
        relay.epoch(),
        &a,
        b,
        n,
        len,
        20_000_000,
        Pacing::Smooth(Duration::from_micros(125)),
    );
    let stats = relay.stop().unwrap();
    report("delay", &stats);
    assert_eq!(got.len() as u64, n, "{stats:?}");
    let span = (got.last().unwrap().sent - got[0].sent) as f64 / 1e9;
    let offered = n as f64 * len as f64 * 8.0 / span;
    // Serialization of one datagram, the least the model adds to the delay.
    let ser_ms = (len + 28) as f64 * 8.0 / rate * 1e3;
    let mut err: Vec<f64> = got
        .iter()
        .map(|r| (r.recv - r.sent) as f64 / 1e6 - delay_ms)
        .collect();
    err.sort_by(f64::total_cmp);
    let (p50, p90, p99, max) = (
        percentile(&err, 0.5),
        percentile(&err, 0.9),
        percentile(&err, 0.99),
        err[err.len() - 1],
    );
    eprintln!(
        "delay: offered {:.1} Mbit/s; delay - setting: min {:.3} ms, median {p50:.3}, p90 {p90:.3}, p99 {p99:.3}, max {max:.3} (serialization {ser_ms:.3} ms)",
        offered / 1e6,
        err[0]
    );
    assert!(offered > 60e6 && offered < rate, "offered {offered}");
    // Never early: at least propagation plus serialization.
    assert!(err[0] >= ser_ms - 1e-6, "early by {} ms", ser_ms - err[0]);
    // The bound is on the 90th percentile: an error of the model (the delay,
    // serialization, the queue) moves the bulk of the datagrams, while the
    // host stalling the relay or this thread for a few milliseconds (this
    // VM's steal, seen as the relay's `late max`) moves only its tail, which
    // the 99th percentile follows from run to run while p90 and the median
    // stay put.
    if p90 > 1.0 {
        return Err(format!("p90 {p90:.3} ms over the setting"));
    }
    Ok(())
}

#[test]
fn loss_within_99_percent_binomial_interval() {
    let _g = serial();
    let p = 0.01;
    let link = DuplexConfig::symmetric(Config {
        delay_ms: 5.0,
        loss: Loss::Bernoulli { rate: p },
        ..Config::default()
    });
    let (relay, a, b) = setup(link, 2);
    let n = 20_000u64;
    let (_, got) = transfer(
        relay.epoch(),
        &a,
        b,
        n,
        200,
        10_000_000,
        Pacing::Smooth(Duration::from_micros(100)),
    );
    let stats = relay.stop().unwrap();
    report("loss", &stats);
    let lost = n - got.len() as u64;
    let hw = 2.576 * (n as f64 * p * (1.0 - p)).sqrt();
    eprintln!(
        "loss: {lost} of {n} lost ({:.3} %), expected {} ± {hw:.1}",
        lost as f64 * 100.0 / n as f64,
        n as f64 * p
    );
    assert!((lost as f64 - n as f64 * p).abs() <= hw);
    // Nothing lost that the model did not drop: the relay itself is lossless.
    assert_eq!(lost, stats.forward.dropped_loss.packets);
    assert_eq!(stats.forward.offered.packets, n);
    let mut seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), got.len(), "duplicates without duplication");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "reordered without jitter"
    );
}

#[test]
fn rate_within_2_percent_under_saturation() {
    let _g = serial();
    let rate = 100e6;
    let link = DuplexConfig::symmetric(Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some(250_000),
        overhead_bytes: 28,
        delay_ms: 10.0,
        ..Config::default()
    });
    let (relay, a, b) = setup(link, 3);
    if !realtime_or_skip(
        relay.is_realtime(),
        "rate_within_2_percent_under_saturation",
    ) {
        return;
    }
    // 1250-byte datagrams at 125 Mbit/s (12.5 per ms) for 2.5 s.
    let len = 1250;
    let n = 31_250;
    let (_, got) = transfer(
        relay.epoch(),
        &a,
        b,
        n,
        len,
        10_000_000,
        Pacing::Batched(12.5),
    );
    let stats = relay.stop().unwrap();
    report("rate", &stats);
    // Payload rate the model allows: the link carries 28 bytes more per datagram.
    let expect = rate * len as f64 / (len + 28) as f64;
    let t0 = got[0].recv + 300_000_000;
    let t1 = t0 + 1_800_000_000;
    let bytes: usize = got
        .iter()
        .filter(|r| r.recv >= t0 && r.recv < t1)
        .map(|r| r.len)
        .sum();
    let measured = bytes as f64 * 8.0 / 1.8;
    eprintln!(
        "rate: received {:.2} Mbit/s of payload, model {:.2} Mbit/s ({:+.2} %), queue drops {}",
        measured / 1e6,
        expect / 1e6,
        (measured / expect - 1.0) * 100.0,
        stats.forward.dropped_queue.packets
    );
    assert!(stats.forward.dropped_queue.packets > 0, "not saturated");
    assert!((measured / expect - 1.0).abs() <= 0.02);
}

#[test]
fn outages_on_time() {
    let _g = serial();
    let (start, end) = (0.6, 1.2);
    let link = DuplexConfig::symmetric(Config {
        delay_ms: 20.0,
        outages: vec![Outage {
            start_s: start,
            end_s: end,
        }],
        ..Config::default()
    });
    let (relay, a, b) = setup(link, 4);
    if !realtime_or_skip(relay.is_realtime(), "outages_on_time") {
        return;
    }
    // One datagram every ≥ 0.5 ms from 0.1 s to ~1.7 s.
    let n = 3_000;
    let (sent, got) = transfer(
        relay.epoch(),
        &a,
        b,
        n,
        100,
        100_000_000,
        Pacing::Smooth(Duration::from_micros(500)),
    );
    let stats = relay.stop().unwrap();
    report("outage", &stats);
    let mut through = vec![false; n as usize];
    for r in &got {
        through[r.seq as usize] = true;
    }
    let (start_ns, end_ns) = ((start * 1e9) as u64, (end * 1e9) as u64);
    // 1 ms: the sender's stamp precedes the relay's arrival stamp by the
    // loopback transit and the relay's reading lag.
    let tol = 1_000_000;
    let mut lost = 0;
    let (mut last_before, mut first_after) = (0, u64::MAX);
    for (seq, (&sent, &ok)) in sent.iter().zip(&through).enumerate() {
        if ok {
            assert!(
                !(start_ns..end_ns - tol).contains(&sent),
                "seq {seq} sent at {sent} ns crossed during the outage"
            );
            if sent < start_ns {
                last_before = sent;
            } else if sent >= end_ns - tol {
                first_after = first_after.min(sent);
            }
        } else {
            lost += 1;
            assert!(
                (start_ns - tol..end_ns).contains(&sent),
                "seq {seq} sent at {sent} ns lost outside the outage"
            );
        }
    }
    eprintln!(
        "outage: {lost} lost; last through before at {:.4} s, first through after at {:.4} s (window [{start}, {end}) s)",
        last_before as f64 / 1e9,
        first_after as f64 / 1e9
    );
    // About one datagram per 0.5 ms of outage went missing.
    assert!(lost as f64 >= (end - start) * 1e3 / 0.5 * 0.8, "{lost}");
    assert_eq!(stats.forward.dropped_outage.packets, lost);
    assert_eq!(got.len() as u64, n - stats.forward.dropped_outage.packets);
}

#[test]
fn asymmetric_round_trip_through_both_directions() {
    let _g = serial();
    within_attempts(
        "asymmetric_round_trip_through_both_directions",
        asymmetric_run,
    );
}

/// One measurement of the asymmetric round trip: `Err` when more than one of
/// 20 round trips is over the bound.
fn asymmetric_run() -> Result<(), String> {
    let link = DuplexConfig {
        forward: Config {
            delay_ms: 30.0,
            ..Config::default()
        },
        reverse: Config {
            rate_mbps: Some(1.0),
            delay_ms: 10.0,
            ..Config::default()
        },
    };
    let (relay, a, b) = setup_spinning(link, 5, std::time::Duration::from_micros(500));
    if !realtime_or_skip(
        relay.is_realtime(),
        "asymmetric_round_trip_through_both_directions",
    ) {
        return Ok(());
    }
    let (echo_stop, echo) = common::echo(b);
    // 1000 bytes back at 1 Mbit/s take 8 ms: round trip 30 + 10 + 8 ms.
    let want = 48.0;
    let rtts = common::ping(&a, 20, 1000);
    echo_stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let stats = relay.stop().unwrap();
    report("round trip", &stats);
    let ok = rtts
        .iter()
        .filter(|&&r| r >= want && r <= want + 1.0)
        .count();
    eprintln!("round trip: want {want} ms, measured {rtts:.2?}");
    assert!(rtts.iter().all(|&r| r >= want), "a reply came early");
    assert_eq!(stats.reverse.delivered.packets, 20);
    if ok < 19 {
        return Err(format!("only {ok} of 20 round trips within 1 ms"));
    }
    Ok(())
}

#[test]
fn peers_are_learned_and_unknown_ones_counted() {
    // No timing here: runs with or without real-time scheduling.
    let relay = Relay::spawn(RelayConfig::loopback(DuplexConfig::default(), 0)).unwrap();
    let (ra, rb) = (relay.a_addr(), relay.b_addr());
    assert!(ra.ip().is_loopback() && rb.ip().is_loopback() && ra.port() != rb.port());
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    // B has not spoken: A's datagrams have nowhere to go.
    for _ in 0..3 {
        a.send_to(b"lost", ra).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while relay.stats().unroutable < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.stats().unroutable, 3);
    // B speaks first: A (already learned) hears it, and B is learned.
    b.send_to(b"hello a", rb).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = a.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"hello a"[..], ra));
    a.send_to(b"hello b", ra).unwrap();
    let (n, from) = b.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"hello b"[..], rb));
    let stats = relay.stop().unwrap();
    assert_eq!(stats.sent, 2);
    assert_eq!(stats.forward.offered.packets, 4);
    assert_eq!(stats.reverse.delivered.packets, 1);
}

#[test]
fn relays_ipv6_datagrams_both_ways_with_the_model() {
    // No timing: a link with a 5 ms delay and no loss, over `::1`.
    let link = DuplexConfig::symmetric(Config {
        delay_ms: 5.0,
        ..Config::default()
    });
    let (a, b) = match (UdpSocket::bind("[::1]:0"), UdpSocket::bind("[::1]:0")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!(
                "SKIP relays_ipv6_datagrams_both_ways_with_the_model: no IPv6 loopback ({e})"
            );
            return;
        }
    };
    // A is configured, B learned from its first datagram.
    let mut cfg = RelayConfig::loopback_v6(link, 0);
    cfg.a_peer = Some(a.local_addr().unwrap());
    let relay = Relay::spawn(cfg).unwrap();
    let (ra, rb) = (relay.a_addr(), relay.b_addr());
    assert!(ra.is_ipv6() && rb.is_ipv6(), "{ra} {rb}");
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    b.send_to(b"hello a", rb).unwrap();
    let mut buf = [0u8; 256];
    let t = std::time::Instant::now();
    let (n, from) = a.recv_from(&mut buf).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(5), "{:?}", t.elapsed());
    assert_eq!((&buf[..n], from), (&b"hello a"[..], ra));
    for i in 0..10u8 {
        a.send_to(&[i; 100], ra).unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&[i; 100][..], rb));
    }
    let stats = relay.stop().unwrap();
    assert_eq!(stats.sent, 11);
    assert_eq!(stats.forward.delivered.packets, 10);
    assert_eq!(stats.forward.delivered.bytes, 10 * 100);
    assert_eq!(stats.reverse.delivered.packets, 1);
}

#[test]
fn rate_within_2_percent_at_500mbps() {
    let _g = serial();
    let rate = 500e6;
    let link = DuplexConfig::symmetric(Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some(1_000_000),
        overhead_bytes: 28,
        delay_ms: 10.0,
        ..Config::default()
    });
    let (relay, a, b) = setup(link, 6);
    if !realtime_or_skip(relay.is_realtime(), "rate_within_2_percent_at_500mbps") {
        return;
    }
    // 1472-byte datagrams at 600 Mbit/s (51 per ms) for 2 s.
    let len = 1472;
    let n = 102_000;
    let (_, got) = transfer(
        relay.epoch(),
        &a,
        b,
        n,
        len,
        10_000_000,
        Pacing::Batched(51.0),
    );
    let stats = relay.stop().unwrap();
    report("rate 500", &stats);
    let expect = rate * len as f64 / (len + 28) as f64;
    let t0 = got[0].recv + 300_000_000;
    let t1 = t0 + 1_500_000_000;
    let bytes: usize = got
        .iter()
        .filter(|r| r.recv >= t0 && r.recv < t1)
        .map(|r| r.len)
        .sum();
    let measured = bytes as f64 * 8.0 / 1.5;
    eprintln!(
        "rate 500: received {:.2} Mbit/s of payload, model {:.2} Mbit/s ({:+.2} %), queue drops {}",
        measured / 1e6,
        expect / 1e6,
        (measured / expect - 1.0) * 100.0,
        stats.forward.dropped_queue.packets
    );
    assert!(stats.forward.dropped_queue.packets > 0, "not saturated");
    assert!((measured / expect - 1.0).abs() <= 0.02);
}
