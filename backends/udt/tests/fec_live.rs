//! The live stream with forward error correction, on virtual time.
//!
//! The seed's scenario on a GEO path: 20 Mbit/s of 64 KiB chunks (LNet
//! header included: 65 608 bytes, 46 packets) on a 100 Mbit/s link with a
//! 600 ms round trip and 1 % random loss each way, behind one chunk-sized
//! warm-up message. Two lu2k-udt connections talk through the lu2k-linkem
//! link model; with FEC the sender's datagrams pass a [`fec::Encoder`] and
//! the receiver's a [`fec::Decoder`], exactly as the codec's docs lay out,
//! and payload bytes are real (each delivered chunk is checked byte for
//! byte, rebuilt packets included).
//!
//! Goal (issue 18 item 5): p99 chunk delivery within the one-way delay plus
//! a quarter round trip (450 ms), at no more than 10 % extra bytes (repairs
//! plus retransmissions over the first sends' bytes). Without FEC the same
//! seeds read a p99 beyond one round trip (a lost packet waits for its
//! retransmission), which the comparison test asserts, so the gain is
//! measured, not assumed.
//!
//! `FEC_SEEDS=n` runs seeds `0..n` of the sweep (default 12).

use std::collections::HashMap;
use std::net::SocketAddr;

use lu2k_linkem::{Config as LinkConfig, Direction, Duplex, DuplexConfig, Instant, Loss};
use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, Config, Connection, Event, Extent, Listener, ListenerOutput, Mode,
};
use lu2k_udt::fec;

const LNET_HDR: u32 = 72;
const CHUNK: u32 = 65_536 + LNET_HDR;
const RTT_US: u64 = 600_000;
const OWD_US: u64 = RTT_US / 2;
/// The goal: one-way delay + ¼ RTT.
const GOAL_US: u64 = OWD_US + RTT_US / 4;

fn pattern(msg: u64, off: u64) -> u8 {
    (msg.wrapping_mul(131) ^ off.wrapping_mul(7) ^ (off >> 8)) as u8
}

fn to_ns(us: u64) -> Instant {
    Instant::from_nanos(us * 1000)
}

#[derive(Debug, Default)]
struct Outcome {
    /// Per stream chunk: delivery minus due time, µs (`u64::MAX`: never).
    late: Vec<u64>,
    /// Data datagram bytes sent for the first time, retransmitted, and
    /// repair bytes.
    first_bytes: u64,
    retx_bytes: u64,
    repair_bytes: u64,
    recovered: u64,
    violations: Vec<String>,
}

impl Outcome {
    fn pct(&self, q: f64) -> u64 {
        let mut l = self.late.clone();
        l.sort_unstable();
        l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1]
    }

    fn extra(&self) -> f64 {
        (self.retx_bytes + self.repair_bytes) as f64 / self.first_bytes as f64
    }
}

fn run(seed: u64, loss: f64, fec_on: bool, secs: u64) -> Outcome {
    let link_cfg = LinkConfig {
        rate_mbps: Some(100.0),
        queue_bytes: Some(7_500_000),
        overhead_bytes: 28,
        delay_ms: OWD_US as f64 / 1000.0,
        loss: Loss::Bernoulli { rate: loss },
        ..LinkConfig::default()
    };
    let mut link: Duplex<Vec<u8>> = Duplex::new(
        DuplexConfig {
            forward: link_cfg.clone(),
            reverse: link_cfg,
        },
        seed,
    )
    .expect("link config");
    let base = Config::default();
    let cfg = Config {
        cc: Kind::Satellite,
        mode: Mode::Message,
        rcv_buf_pkts: Some(65_536),
        bdp_bandwidth_bps: 1_000_000_000,
        bdp_rtt_us: 700_000,
        // Repairs are longer than data packets by REPAIR_EXTRA; the FEC
        // connection's packets shrink so that repairs fit the same MTU.
        mss: if fec_on {
            base.mss - fec::REPAIR_EXTRA
        } else {
            base.mss
        },
        // As the engine configures a FEC peer: the repairs are its redundancy.
        tail_copies: !fec_on,
        ..base
    };
    let server_addr: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let client_addr: SocketAddr = "10.0.0.1:9000".parse().unwrap();
    let mut client = Connection::connect(0, cfg.clone(), seed ^ 0xC11E, server_addr);
    let mut listener = Listener::new(0, cfg, seed ^ 0x5E4E);
    let mut server: Option<Box<Connection>> = None;
    let mut enc = fec_on.then(|| fec::Encoder::new(fec::Config::default()).unwrap());
    let mut dec = fec_on.then(|| fec::Decoder::new(fec::Config::default()).unwrap());

    let interval = u64::from(CHUNK) * 8 * 1_000_000 / 20_000_000;
    let n = (secs * 1_000_000 / interval) as usize;
    let mut out = Outcome {
        late: vec![u64::MAX; n],
        ..Outcome::default()
    };
    // Message 0 is the warm-up; chunk i is message i + 1, due at
    // `start + i × interval` once the warm-up is acknowledged.
    let mut start: Option<u64> = None;
    let mut queued = 0usize;
    let mut connected = false;
    let mut bufs: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next_buf = 1u64;
    let mut done = 0usize;
    let mut delivered = 0usize;
    let mut now = 0u64;
    let end = 60_000_000 + secs * 1_000_000;

    // Feeds one datagram to the server side (listener before accept).
    let to_server = |now: u64,
                     d: &[u8],
                     server: &mut Option<Box<Connection>>,
                     listener: &mut Listener,
                     link: &mut Duplex<Vec<u8>>,
                     bufs: &mut HashMap<u64, Vec<u8>>,
                     next_buf: &mut u64| {
        let mine = server.as_ref().is_some_and(|s| {
            u32::from_be_bytes(d[12..16].try_into().unwrap()) == s.socket_id()
                || handshake_socket_id(d) == Some(s.peer_socket_id())
        });
        if mine {
            let id = *next_buf;
            *next_buf += 1;
            let at = Extent {
                buf: id,
                offset: 0,
                len: d.len() as u32,
            };
            if server.as_mut().unwrap().handle_datagram(now, d, at) {
                bufs.insert(id, d.to_vec());
            }
        } else {
            match listener.handle(now, client_addr, d) {
                ListenerOutput::Reply(h) => {
                    let b = h.as_bytes().to_vec();
                    let _ = link.handle_datagram(to_ns(now), Direction::Reverse, b.len(), b);
                }
                ListenerOutput::Accept(c) => *server = Some(c),
                ListenerOutput::Drop(_) => {}
            }
        }
    };

    loop {
        // The schedule.
        if connected {
            while queued == 0
                || start.is_some_and(|s| queued <= n && s + (queued as u64 - 1) * interval <= now)
            {
                client
                    .send(now, queued as u64, u64::from(CHUNK), None)
                    .unwrap();
                queued += 1;
            }
        }
        // Client out: data and control, then repairs.
        while let Some(t) = client.poll_transmit(now) {
            let mut d = t.header.as_bytes().to_vec();
            if let Some(p) = t.payload {
                let first = d.len();
                d.extend((0..p.len).map(|k| pattern(p.msg, u64::from(p.offset + k))));
                debug_assert_eq!(first, 16);
            }
            if let Some(e) = enc.as_mut() {
                e.handle_sent(now, &d);
            }
            let _ = link.handle_datagram(to_ns(now), Direction::Forward, d.len(), d);
        }
        if let Some(e) = enc.as_mut() {
            let st = client.stats();
            e.handle_counts(st.pkts_sent, st.pkts_nak_received);
            if e.poll_timeout().is_some_and(|t| t <= now) {
                e.handle_timeout(now);
            }
            while let Some(r) = e.poll_transmit() {
                let _ = link.handle_datagram(to_ns(now), Direction::Forward, r.len(), r);
            }
        }
        if let Some(s) = server.as_mut() {
            while let Some(t) = s.poll_transmit(now) {
                let b = t.header.as_bytes().to_vec();
                let _ = link.handle_datagram(to_ns(now), Direction::Reverse, b.len(), b);
            }
        }
        // Events.
        while let Some(e) = client.poll_event() {
            match e {
                Event::Connected => connected = true,
                Event::MessageAcked { msg: 0 } => start = Some(now),
                Event::MessageAcked { .. } => {}
                other => out.violations.push(format!("client event {other:?}")),
            }
        }
        if let Some(s) = server.as_mut() {
            while let Some(e) = s.poll_event() {
                match e {
                    Event::MessageReceived { extents, .. } => {
                        // Messages arrive in order: this is message `c`.
                        let c = delivered as u64;
                        delivered += 1;
                        let mut off = 0u64;
                        for x in &extents {
                            let b = bufs.remove(&x.buf).expect("held buffer");
                            let p = &b[x.offset as usize..(x.offset + x.len) as usize];
                            if p.iter()
                                .enumerate()
                                .any(|(k, &v)| v != pattern(c, off + k as u64))
                            {
                                out.violations.push(format!("corrupt bytes in msg {c}"));
                            }
                            off += u64::from(x.len);
                        }
                        if off != u64::from(CHUNK) {
                            out.violations.push(format!("msg {c}: {off} bytes"));
                        } else if c > 0 {
                            let due = start.unwrap_or(0) + (c - 1) * interval;
                            out.late[c as usize - 1] = now - due;
                            done += 1;
                        }
                    }
                    Event::Connected => {}
                    other => out.violations.push(format!("server event {other:?}")),
                }
            }
            while let Some(x) = s.poll_release() {
                bufs.remove(&x.buf);
            }
        }
        if done == n {
            break;
        }
        // Next instant.
        let mut next = client.poll_timeout().unwrap_or(u64::MAX);
        if let Some(s) = &server {
            next = next.min(s.poll_timeout().unwrap_or(u64::MAX));
        }
        if let Some(d) = link.poll_deadline() {
            next = next.min(d.as_nanos().div_ceil(1000));
        }
        if let Some(t) = enc.as_ref().and_then(|e| e.poll_timeout()) {
            next = next.min(t);
        }
        if let Some(s) = start {
            if queued <= n {
                next = next.min(s + (queued as u64 - 1) * interval);
            }
        }
        if next > end {
            break;
        }
        now = now.max(next);
        while let Some((dir, d)) = link.poll_deliver(to_ns(now)) {
            match dir {
                Direction::Reverse => {
                    let at = Extent {
                        buf: 0,
                        offset: 0,
                        len: d.len() as u32,
                    };
                    let _ = client.handle_datagram(now, &d, at);
                }
                Direction::Forward => {
                    let input = dec
                        .as_mut()
                        .map_or(fec::Input::Other, |x| x.handle_datagram(now, &d));
                    if !matches!(input, fec::Input::Repair | fec::Input::BadRepair) {
                        to_server(
                            now,
                            &d,
                            &mut server,
                            &mut listener,
                            &mut link,
                            &mut bufs,
                            &mut next_buf,
                        );
                    }
                    while let Some(r) = dec.as_mut().and_then(|x| x.poll_recovered()) {
                        to_server(
                            now,
                            &r,
                            &mut server,
                            &mut listener,
                            &mut link,
                            &mut bufs,
                            &mut next_buf,
                        );
                    }
                }
            }
        }
        if let Some(x) = dec.as_mut() {
            x.handle_timeout(now);
        }
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        if let Some(s) = server.as_mut() {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
    }
    let st = client.stats();
    let payload = u64::from(client.payload_size());
    out.first_bytes = st.pkts_sent * (payload + 16);
    out.retx_bytes = st.pkts_retransmitted * (payload + 16);
    if let Some(e) = &enc {
        out.repair_bytes = e.stats().repair_bytes;
    }
    if std::env::var_os("FEC_DEBUG").is_some() {
        eprintln!(
            "enc {:?}\ndec {:?}",
            enc.as_ref().map(|e| e.stats()),
            dec.as_ref().map(|x| x.stats())
        );
        let worst: Vec<(usize, u64)> = out
            .late
            .iter()
            .copied()
            .enumerate()
            .filter(|x| x.1 > GOAL_US)
            .collect();
        eprintln!("late chunks {worst:?}");
    }
    if let Some(x) = &dec {
        out.recovered = x.stats().pkts_recovered;
        if x.stats().bad_repairs > 0 {
            out.violations.push(format!("decoder: {:?}", x.stats()));
        }
    }
    if done < n {
        out.violations
            .push(format!("{done} of {n} chunks delivered"));
    }
    out
}

fn seeds() -> u64 {
    std::env::var("FEC_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// Checks one seed against the goal; returns the outcome.
fn check(seed: u64) -> Result<Outcome, String> {
    let o = run(seed, 0.01, true, 20);
    let (p99, extra) = (o.pct(0.99), o.extra());
    if !o.violations.is_empty() || p99 > GOAL_US || extra > 0.10 {
        return Err(format!(
            "seed {seed}: p50 {} p99 {p99} max {} us (goal {GOAL_US}), extra bytes {:.1} %, \
             recovered {}, violations {:?}",
            o.pct(0.5),
            o.pct(1.0),
            extra * 100.0,
            o.recovered,
            o.violations
        ));
    }
    Ok(o)
}

#[test]
fn fec_holds_p99_within_owd_plus_a_quarter_rtt_at_1_percent() {
    let mut failures = Vec::new();
    for seed in 0..seeds() {
        match check(seed) {
            Ok(o) => eprintln!(
                "seed {seed}: p50 {} p90 {} p99 {} max {} ms, extra {:.1} % \
                 (repairs {:.1} %), {} packets rebuilt",
                o.pct(0.5) / 1000,
                o.pct(0.9) / 1000,
                o.pct(0.99) / 1000,
                o.pct(1.0) / 1000,
                o.extra() * 100.0,
                o.repair_bytes as f64 * 100.0 / o.first_bytes as f64,
                o.recovered
            ),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same path without FEC: the p99 is a round trip later (the gain is
/// FEC's, not the scenario's).
#[test]
fn without_fec_the_p99_waits_for_a_retransmission() {
    for seed in 0..3 {
        let plain = run(seed, 0.01, false, 20);
        assert!(plain.violations.is_empty(), "{:?}", plain.violations);
        let p99 = plain.pct(0.99);
        eprintln!(
            "seed {seed} without FEC: p50 {} p99 {p99} us",
            plain.pct(0.5)
        );
        assert!(
            p99 > OWD_US + RTT_US,
            "seed {seed}: p99 {p99} us without FEC"
        );
    }
}

/// A seed whose early loss sample reads far below the true rate: the loss
/// estimate must not size a group too small on one short sample (the reason
/// for the sample size and smoothing in `lu2k_udt::fec`).
#[test]
fn seed_90_a_low_loss_sample_left_a_group_short() {
    check(90).unwrap();
}

/// Other loss rates and the 200 ms path: no goal asserted beyond
/// completeness and the byte budget at 0.1 %; at 5 % the overhead cap leaves
/// groups short and retransmission repairs them.
#[test]
fn other_cells_complete() {
    for loss in [0.001, 0.01, 0.05] {
        for fec_on in [false, true] {
            let o = run(1, loss, fec_on, 20);
            assert!(o.violations.is_empty(), "{:?}", o.violations);
            eprintln!(
                "loss {:.1} % fec {fec_on}: p50 {} p90 {} p99 {} max {} ms, extra {:.1} %, rebuilt {}",
                loss * 100.0,
                o.pct(0.5) / 1000,
                o.pct(0.9) / 1000,
                o.pct(0.99) / 1000,
                o.pct(1.0) / 1000,
                o.extra() * 100.0,
                o.recovered
            );
            let repairs = o.repair_bytes as f64 / o.first_bytes as f64;
            assert!(repairs <= fec::Config::default().max_overhead + 1e-3);
            if fec_on && loss <= 0.01 {
                assert!(o.extra() <= 0.10, "extra {}", o.extra());
            }
        }
    }
}

/// A repair packet reaching a connection without a decoder (a peer not
/// configured for FEC) is dropped and counted, nothing else.
#[test]
fn a_connection_without_a_decoder_drops_repairs() {
    let mut e = fec::Encoder::new(fec::Config::default()).unwrap();
    for i in 0..46u32 {
        let mut d = i.to_be_bytes().to_vec();
        d.extend_from_slice(&[0xC0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]);
        d.extend(std::iter::repeat_n(i as u8, 1400));
        e.handle_sent(0, &d);
    }
    e.handle_timeout(1_000_000);
    let r = e.poll_transmit().expect("a repair");
    assert!(fec::is_repair(&r));
    let addr: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let mut c = Connection::connect(0, Config::default(), 1, addr);
    let at = Extent {
        buf: 0,
        offset: 0,
        len: r.len() as u32,
    };
    assert!(!c.handle_datagram(1, &r, at));
    assert_eq!(c.stats().dropped_malformed, 1);
    assert!(!c.is_closed());
}
