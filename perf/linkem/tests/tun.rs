//! The TUN/network-namespace emulator measured against its settings, with
//! the kernel's own UDP and TCP crossing it. Needs root, `/dev/net/tun` and
//! iproute2's `ip`; skips loudly without them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{realtime_or_skip, report, serial, transfer, Pacing};
use lu2k_linkem::{Config, DuplexConfig, TunConfig, TunLink};

/// A TUN link, or `None` after saying loudly why not.
fn tun_link(link: DuplexConfig, seed: u64, tag: &str) -> Option<TunLink> {
    tun_link_spinning(link, seed, tag, std::time::Duration::ZERO)
}

/// `tun_link` whose emulator polls `spin` before each deadline instead of
/// sleeping to it: for the sparse round-trip test, where this host's wakeup
/// latency (200-250 µs per send on some days) would otherwise count twice.
fn tun_link_spinning(
    link: DuplexConfig,
    seed: u64,
    tag: &str,
    spin: std::time::Duration,
) -> Option<TunLink> {
    let test = format!("tun::{tag}");
    if !rustix::process::geteuid().is_root() {
        common::skip(
            &test,
            "the TUN link emulator needs root (network namespaces, /dev/net/tun)",
        );
        return None;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        common::skip(&test, "no /dev/net/tun on this machine");
        return None;
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        common::skip(&test, "iproute2's `ip` is not installed");
        return None;
    }
    let name = format!("lk{}{tag}", std::process::id());
    let mut cfg = TunConfig::new(link, seed, &name);
    cfg.spin = spin;
    let tun = TunLink::spawn(cfg).unwrap();
    if !realtime_or_skip(tun.is_realtime(), &test) {
        return None;
    }
    Some(tun)
}

#[test]
fn udp_round_trip_crosses_both_directions_on_time() {
    let _g = serial();
    common::within_attempts(
        "udp_round_trip_crosses_both_directions_on_time",
        round_trip_run,
    );
}

/// One round-trip measurement: `Err` when more than one of 30 is over the bound.
fn round_trip_run() -> Result<(), String> {
    let rate = 100e6;
    let link = DuplexConfig {
        forward: Config {
            rate_mbps: Some(rate / 1e6),
            delay_ms: 20.0,
            ..Config::default()
        },
        reverse: Config {
            rate_mbps: Some(rate / 1e6),
            delay_ms: 5.0,
            ..Config::default()
        },
    };
    let spin = std::time::Duration::from_micros(500);
    let Some(tun) = tun_link_spinning(link, 1, "rtt", spin) else {
        return Ok(());
    };
    let b_addr = SocketAddr::from((tun.b_ip(), 7001));
    let b = tun.b().run(|| UdpSocket::bind(b_addr)).unwrap().unwrap();
    let a = tun
        .a()
        .run(|| UdpSocket::bind((tun.a_ip(), 0)))
        .unwrap()
        .unwrap();
    a.connect(b_addr).unwrap();
    let (stop, echo) = common::echo(b);
    // 1000 bytes of payload are 1028-byte IP packets: 82 µs each way.
    let want = 25.0 + 2.0 * 1028.0 * 8.0 / rate * 1e3;
    let rtts = common::ping(&a, 30, 1000);
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let stats = tun.stop().unwrap();
    report("tun round trip", &stats);
    eprintln!("tun round trip: want {want:.3} ms, measured {rtts:.2?}");
    assert!(rtts.iter().all(|&r| r >= want), "a reply came early");
    assert_eq!(stats.forward.delivered.bytes, 30 * 1028);
    let ok = rtts.iter().filter(|&&r| r <= want + 1.0).count();
    if ok < 29 {
        return Err(format!("only {ok} of 30 round trips within 1 ms"));
    }
    Ok(())
}

#[test]
fn udp_rate_within_2_percent_under_saturation() {
    let _g = serial();
    let rate = 100e6;
    let link = DuplexConfig::symmetric(Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some(250_000),
        delay_ms: 10.0,
        ..Config::default()
    });
    let Some(tun) = tun_link(link, 2, "rate") else {
        return;
    };
    let b_addr = SocketAddr::from((tun.b_ip(), 7002));
    let b = tun.b().run(|| UdpSocket::bind(b_addr)).unwrap().unwrap();
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&b, 8 << 20);
    let a = tun
        .a()
        .run(|| UdpSocket::bind((tun.a_ip(), 0)))
        .unwrap()
        .unwrap();
    a.connect(b_addr).unwrap();
    // 1250-byte payloads (1278-byte IP packets) at 125 Mbit/s for 2.5 s.
    let len = 1250;
    let n = 31_250;
    let start = (tun.epoch().elapsed() + Duration::from_millis(10)).as_nanos() as u64;
    let (_, got) = transfer(tun.epoch(), &a, b, n, len, start, Pacing::Batched(12.5));
    let stats = tun.stop().unwrap();
    report("tun rate", &stats);
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
        "tun rate: received {:.2} Mbit/s of payload, model {:.2} Mbit/s ({:+.2} %), queue drops {}",
        measured / 1e6,
        expect / 1e6,
        (measured / expect - 1.0) * 100.0,
        stats.forward.dropped_queue.packets
    );
    assert!(stats.forward.dropped_queue.packets > 0, "not saturated");
    assert!((measured / expect - 1.0).abs() <= 0.02);
}

#[test]
fn tcp_cubic_fills_the_emulated_link() {
    tcp_fill(100e6, "cubic", "tcpc");
}

#[test]
fn tcp_bbr_fills_the_emulated_link() {
    tcp_fill(100e6, "bbr", "tcpb");
}

#[test]
fn tcp_cubic_fills_the_emulated_link_at_500mbps() {
    tcp_fill(500e6, "cubic", "tcpc500");
}

/// One TCP stream with congestion control `cc` from side A to side B for
/// 4 s over `rate` with a 20 ms round trip and a buffer of twice the
/// bandwidth-delay product; its goodput must reach 85 % of what the link can
/// carry. Skips loudly if the kernel lacks `cc`.
fn tcp_fill(rate: f64, cc: &str, tag: &str) {
    let _g = serial();
    let link = DuplexConfig::symmetric(Config {
        rate_mbps: Some(rate / 1e6),
        queue_bytes: Some((rate / 8.0 * 0.020 * 2.0) as u64),
        delay_ms: 10.0,
        ..Config::default()
    });
    let Some(tun) = tun_link(link, 3, tag) else {
        return;
    };
    let b_addr = SocketAddr::from((tun.b_ip(), 7003));
    let listener = tun.b().run(|| TcpListener::bind(b_addr)).unwrap().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut marks = Vec::new();
        let mut total = 0u64;
        let t = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return marks,
                Ok(n) => {
                    total += n as u64;
                    marks.push((t.elapsed(), total));
                }
            }
        }
    });
    let mut s = tun.a().run(|| TcpStream::connect(b_addr)).unwrap().unwrap();
    let chunk = vec![7u8; 1 << 16];
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        s.write_all(&chunk).unwrap();
    }
    drop(s);
    let marks = receiver.join().unwrap();
    let stats = tun.stop().unwrap();
    report(&format!("tun {tag}"), &stats);
    // Goodput from 1 s to 3.5 s after the first byte (slow start is over).
    let at = |d: Duration| {
        marks
            .iter()
            .take_while(|(t, _)| *t <= d)
            .last()
            .map_or(0, |&(_, b)| b)
    };
    let (a, b) = (Duration::from_secs(1), Duration::from_millis(3500));
    let goodput = (at(b) - at(a)) as f64 * 8.0 / (b - a).as_secs_f64();
    // Most a 1500-byte packet carries with TCP timestamps: 1448 bytes.
    let ceiling = rate * 1448.0 / 1500.0;
    eprintln!(
        "tun {tag}: TCP {cc} goodput {:.2} Mbit/s, {:.1} % of the {:.2} Mbit/s a {} Mbit/s link carries; queue drops {}",
        goodput / 1e6,
        goodput / ceiling * 100.0,
        ceiling / 1e6,
        rate / 1e6,
        stats.forward.dropped_queue.packets
    );
    assert!(goodput <= ceiling * 1.01, "faster than the link");
    assert!(goodput >= ceiling * 0.85, "TCP far below the link rate");
}
