//! The UDP relay measured on loopback against its settings: delay, loss,
//! rate and outages, through real sockets on the real clock.
//!
//! The tests share the machine's cores with whatever else runs, so they run
//! one at a time (`SERIAL`), put the relay and the test's own sender and
//! receiver under real-time scheduling, and print what they measured. Where
//! real-time scheduling is not permitted (not root), the timing tests skip
//! loudly: on a busy machine an ordinary thread is late by milliseconds.

use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lu2k_linkem::{
    set_realtime, Config, DuplexConfig, Loss, Outage, Relay, RelayConfig, RelayStats,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A relay whose side B sends to `b`, and the socket side A's application uses.
fn setup(link: DuplexConfig, seed: u64) -> (Relay, UdpSocket, UdpSocket) {
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&b, 8 << 20);
    let mut cfg = RelayConfig::loopback(link, seed);
    cfg.b_peer = Some(b.local_addr().unwrap());
    let relay = Relay::spawn(cfg).unwrap();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(relay.a_addr()).unwrap();
    (relay, a, b)
}

/// One received datagram: sequence number, send and receive instants in ns
/// since the relay's epoch, length.
#[derive(Debug, Clone, Copy)]
struct Rx {
    seq: u64,
    sent: u64,
    recv: u64,
    len: usize,
}

enum Pacing {
    /// One datagram, then at least `gap` until the next (never catching up,
    /// so the sender itself never bursts).
    Smooth(Duration),
    /// Bursts every millisecond, averaging `per_ms` datagrams per millisecond.
    Batched(f64),
}

fn now_ns(relay: &Relay) -> u64 {
    relay.epoch().elapsed().as_nanos() as u64
}

/// True, or false after saying loudly why the test skips.
fn realtime_or_skip(relay: &Relay, test: &str) -> bool {
    if !relay.is_realtime() {
        eprintln!(
            "SKIP {test}: real-time scheduling (SCHED_FIFO) not permitted here (needs root or \
             CAP_SYS_NICE); without it timing on a loaded machine is off by milliseconds"
        );
    }
    relay.is_realtime()
}

/// Sleeps (timer slack 1 ns) until shortly before `t`, then spins.
fn wait_until(relay: &Relay, t: u64) {
    loop {
        let now = now_ns(relay);
        if now >= t {
            return;
        }
        let left = t - now;
        if left > 60_000 {
            std::thread::sleep(Duration::from_nanos(left - 40_000));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends `n` datagrams of `len` bytes from side A, starting at `start` ns
/// after the epoch; returns the send instant of each and what side B received.
fn transfer(
    relay: &Relay,
    a: &UdpSocket,
    b: UdpSocket,
    n: u64,
    len: usize,
    start: u64,
    pacing: Pacing,
) -> (Vec<u64>, Vec<Rx>) {
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    // Below the receiver and the relay (40), so its spinning never holds them up.
    let _ = set_realtime(20);
    let done = Arc::new(AtomicBool::new(false));
    let epoch = relay.epoch();
    let rx = {
        let done = done.clone();
        std::thread::spawn(move || {
            let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
            let _ = set_realtime(30);
            b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = vec![0u8; 65_536];
            let mut got = Vec::new();
            let mut quiet = 0;
            loop {
                match b.recv(&mut buf) {
                    Ok(l) => {
                        let recv = epoch.elapsed().as_nanos() as u64;
                        let seq = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                        let sent = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                        got.push(Rx {
                            seq,
                            sent,
                            recv,
                            len: l,
                        });
                        quiet = 0;
                    }
                    Err(_) => {
                        if done.load(Ordering::Relaxed) {
                            quiet += 1;
                            // Silence for 0.5 s after the sender finished.
                            if quiet >= 10 {
                                return got;
                            }
                        }
                    }
                }
            }
        })
    };
    let mut payload = vec![0u8; len];
    let mut stamps = Vec::with_capacity(n as usize);
    let mut send = |seq: u64, payload: &mut [u8]| {
        let sent = now_ns(relay);
        payload[0..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&sent.to_le_bytes());
        a.send(payload).unwrap();
        stamps.push(sent);
    };
    wait_until(relay, start);
    match pacing {
        Pacing::Smooth(gap) => {
            let gap = gap.as_nanos() as u64;
            for seq in 0..n {
                send(seq, &mut payload);
                wait_until(relay, now_ns(relay) + gap);
            }
        }
        Pacing::Batched(per_ms) => {
            let mut seq = 0;
            let mut ms = 0u64;
            while seq < n {
                ms += 1;
                let due = ((ms as f64 * per_ms) as u64).min(n);
                while seq < due {
                    send(seq, &mut payload);
                    seq += 1;
                }
                wait_until(relay, start + ms * 1_000_000);
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let got = rx.join().unwrap();
    // Back to normal scheduling for whatever runs next on this thread.
    let _ = rustix::thread::set_current_timer_slack(None);
    (stamps, got)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, s: &RelayStats) {
    eprintln!(
        "{name}: relay sent {} late mean {:?} max {:?}, unroutable {}, send errors {}",
        s.sent,
        s.late_total / (s.sent.max(1) as u32),
        s.late_max,
        s.unroutable,
        s.send_errors
    );
}

#[test]
fn delay_within_1ms_at_100mbps_below_capacity() {
    let _g = serial();
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
    if !realtime_or_skip(&relay, "delay_within_1ms_at_100mbps_below_capacity") {
        return;
    }
    // 1472-byte datagrams at least 125 µs apart: at most 94 Mbit/s, ~2 s.
    let len = 1472;
    let n = 13_000;
    let (_, got) = transfer(
        &relay,
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
    let (p50, p99, max) = (
        percentile(&err, 0.5),
        percentile(&err, 0.99),
        err[err.len() - 1],
    );
    eprintln!(
        "delay: offered {:.1} Mbit/s; delay - setting: min {:.3} ms, median {p50:.3}, p99 {p99:.3}, max {max:.3} (serialization {ser_ms:.3} ms)",
        offered / 1e6,
        err[0]
    );
    assert!(offered > 60e6 && offered < rate, "offered {offered}");
    // Never early: at least propagation plus serialization.
    assert!(err[0] >= ser_ms - 1e-6, "early by {} ms", ser_ms - err[0]);
    assert!(p99 <= 1.0, "p99 {p99} ms over the setting");
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
        &relay,
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
    if !realtime_or_skip(&relay, "rate_within_2_percent_under_saturation") {
        return;
    }
    // 1250-byte datagrams at 125 Mbit/s (12.5 per ms) for 2.5 s.
    let len = 1250;
    let n = 31_250;
    let (_, got) = transfer(&relay, &a, b, n, len, 10_000_000, Pacing::Batched(12.5));
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
    if !realtime_or_skip(&relay, "outages_on_time") {
        return;
    }
    // One datagram every ≥ 0.5 ms from 0.1 s to ~1.7 s.
    let n = 3_000;
    let (sent, got) = transfer(
        &relay,
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
    let (relay, a, b) = setup(link, 5);
    if !realtime_or_skip(&relay, "asymmetric_round_trip_through_both_directions") {
        return;
    }
    let echo_stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = echo_stop.clone();
        std::thread::spawn(move || {
            let _ = set_realtime(30);
            b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = b.recv_from(&mut buf) {
                    b.send_to(&buf[..n], from).unwrap();
                }
            }
        })
    };
    let _ = set_realtime(20);
    a.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    // 1000 bytes back at 1 Mbit/s take 8 ms: round trip 30 + 10 + 8 ms.
    let want = 48.0;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let t = std::time::Instant::now();
        a.send(&[i; 1000]).unwrap();
        let n = a.recv(&mut buf).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(&buf[..n], &[i; 1000]);
    }
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
    assert!(ok >= 19, "only {ok} of 20 round trips within 1 ms");
    assert_eq!(stats.reverse.delivered.packets, 20);
    let _: SocketAddr = relay_addr_is_loopback();
}

fn relay_addr_is_loopback() -> SocketAddr {
    let relay = Relay::spawn(RelayConfig::loopback(DuplexConfig::default(), 0)).unwrap();
    let (a, b) = (relay.a_addr(), relay.b_addr());
    assert!(a.ip().is_loopback() && b.ip().is_loopback() && a.port() != b.port());
    a
}
