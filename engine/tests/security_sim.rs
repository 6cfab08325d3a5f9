//! The sealed wire between two UDT transports on virtual time: each node is a
//! `Udt` over the virtual-time provider (`SimIo`) on its own ring region, and
//! the test carries the datagrams between them, and can tamper with them,
//! replay them or drop them on the way. Messages carry a pattern that is
//! checked byte for byte where it lands in the receiver's RX pool.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use lu2k_engine::daemon::stats::CoreStats;
use lu2k_engine::io::sim::{Datagram, SimClock, SimIo, SimPort};
use lu2k_engine::io::sys::CoreMem;
use lu2k_engine::transport::seal::{self, Keyring, Limits, Psk};
use lu2k_engine::transport::udt::{Params, Udt};
use lu2k_engine::transport::{Event, OutMsg, Transport as _};
use lu2k_ring_abi::{Config as RegionConfig, Extent, Nid, Pool, Region, TxStatus, LNET_HDR_LEN};

const PORT: u16 = 7988;
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MSG: u32 = 256 * 1024;

struct Node {
    ip: Ipv4Addr,
    udt: Udt,
    port: SimPort,
    mem: Arc<CoreMem>,
    region: Region,
    /// Payload checks of received messages: (messages intact, corrupt).
    got: (u64, u64),
    /// Completions by status.
    done: BTreeMap<String, u64>,
}

fn pattern(seq: u64, i: usize) -> u8 {
    (seq as usize * 131 + i * 7 + i / 251) as u8
}

fn node(ip: Ipv4Addr, clock: &SimClock, psk: Option<&[u8]>, limits: Limits) -> Node {
    let region = Region::create(&RegionConfig {
        cores: 1,
        tx_entries: 64,
        tx_done_entries: 64,
        rx_entries: 256,
        rx_return_entries: 256,
        tx_pool_len: 16 << 20,
        rx_buf_size: 2048,
        rx_buf_count: 4096,
        rx_tables_per_core: 64,
        ..RegionConfig::default()
    })
    .expect("region");
    let mem = Arc::new(CoreMem::new(&region, 0, 1, 64, 64).expect("core mem"));
    let (io, port) = SimIo::new(SocketAddrV4::new(ip, PORT), mem.clone(), clock.clone());
    let net = format!("{ip}@tcp").parse::<Nid>().expect("nid").net();
    let udt = Udt::new(
        Params {
            core: 0,
            net,
            port: PORT,
            overrides: HashMap::new(),
            udt: lu2k_udt::conn::Config {
                connect_timeout_us: 2_000_000,
                ..Default::default()
            },
            peer_down_timeout_us: 30_000_000,
            seed: u64::from(u32::from(ip)) * 0x9E37,
        },
        Box::new(io),
        region.clone(),
        mem.rx_first,
    );
    let udt = match psk {
        Some(k) => {
            let keys = Keyring {
                local: Some(ip.into()),
                net: vec![Psk::from_bytes(k).expect("psk")],
                ..Keyring::default()
            };
            let scratch = mem.take_seal_scratch().expect("scratch");
            udt.with_security(keys, limits, scratch)
        }
        None => udt,
    };
    Node {
        ip,
        udt,
        port,
        mem,
        region,
        got: (0, 0),
        done: BTreeMap::new(),
    }
}

impl Node {
    /// Queues message `seq` of `len` payload bytes to `peer` (message-header
    /// slot and TX pool area `seq % 64`).
    fn send(&mut self, seq: u64, peer: Ipv4Addr, len: u32) {
        let slot = (seq % 64) as u32;
        let mut hdr = [0u8; LNET_HDR_LEN];
        hdr[..8].copy_from_slice(&seq.to_be_bytes());
        assert!(self.mem.write_msg_hdr(slot, &hdr));
        let off = u64::from(slot) * u64::from(MSG);
        let data: Vec<u8> = (0..len as usize).map(|i| pattern(seq, i)).collect();
        self.region
            .write_pool(Pool::Tx, off, &data)
            .expect("tx pool");
        self.udt.handle_send(OutMsg {
            id: seq,
            peer: peer.into(),
            hdr: (
                (self.mem.msg_hdr_off + slot as usize * 128) as u64,
                LNET_HDR_LEN as u32,
            ),
            payload: vec![(self.mem.pool_off as u64 + off, len)],
            payload_len: len,
        });
    }

    fn step(&mut self) {
        self.udt.wait(None, false).expect("wait");
        self.udt.handle_timeout();
        while self.udt.poll_transmit() {}
        while let Some(ev) = self.udt.poll_event() {
            match ev {
                Event::Sent { status, .. } => {
                    let k = if status == TxStatus::Ok {
                        "ok"
                    } else {
                        "failed"
                    };
                    *self.done.entry(k.into()).or_default() += 1;
                }
                Event::Received { pieces, bufs, .. } => {
                    let mut bytes = Vec::new();
                    for p in &pieces {
                        let (b, _) = self
                            .region
                            .layout()
                            .rx_buffer(self.mem.rx_first + u32::from(p.bid))
                            .expect("rx buffer");
                        let e = Extent::new(Pool::Rx, b + u64::from(p.off), p.len);
                        bytes.extend_from_slice(self.region.pool_bytes(&e).expect("rx bytes"));
                    }
                    let seq = u64::from_be_bytes(bytes[..8].try_into().unwrap());
                    let ok = bytes[LNET_HDR_LEN..]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(seq, i));
                    if ok && bytes.len() == LNET_HDR_LEN + MSG as usize {
                        self.got.0 += 1;
                    } else {
                        self.got.1 += 1;
                    }
                    self.udt.handle_return(&bufs);
                }
                _ => {}
            }
        }
    }

    fn stats(&mut self) -> CoreStats {
        let mut s = CoreStats::default();
        self.udt.stats(&mut s);
        s
    }

    fn rejected(&mut self, peer: Ipv4Addr, why: &str) -> u64 {
        let s = self.stats();
        let p = s
            .peers
            .iter()
            .find(|p| p.addr.starts_with(&format!("{peer}:")))
            .cloned()
            .unwrap_or_default();
        p.rejected.get(why).copied().unwrap_or(0)
    }

    fn drops(&mut self, why: &str) -> u64 {
        self.stats().drops.get(why).copied().unwrap_or(0)
    }
}

/// What the carrier does to each datagram: the datagrams to deliver instead.
type Carrier<'a> = dyn FnMut(u64, Datagram) -> Vec<Datagram> + 'a;

/// Runs A → B until `n` messages are completed at A, or `limit` of virtual
/// time; returns the virtual time it took. What the carrier returns goes to
/// the node its destination names (B's address: B, anything else: A).
fn run(
    clock: &SimClock,
    a: &mut Node,
    b: &mut Node,
    n: u64,
    limit: Duration,
    carry: &mut Carrier<'_>,
) -> Duration {
    let start = clock.elapsed();
    let mut k = 0u64;
    // The link: 10 ms one way, no rate limit of its own.
    let mut link: std::collections::VecDeque<(Duration, bool, Datagram)> = Default::default();
    let mut finished = None;
    while clock.elapsed() - start < limit {
        a.step();
        b.step();
        let total: u64 = a.done.values().sum();
        if total >= n && b.got.0 + b.got.1 >= a.done.get("ok").copied().unwrap_or(0) {
            // Done: the datagrams still on the link arrive before the end.
            let end = *finished.get_or_insert(clock.elapsed());
            if link.is_empty() || clock.elapsed() > end + Duration::from_millis(50) {
                return end - start;
            }
        }
        let at = clock.elapsed() + Duration::from_millis(10);
        let b_ip = b.ip;
        for from in [&a.port, &b.port] {
            for d in from.take_sent() {
                k += 1;
                for x in carry(k, d) {
                    link.push_back((at, *x.to.ip() == b_ip, x));
                }
            }
        }
        while link.front().is_some_and(|l| l.0 <= clock.elapsed()) {
            let (_, to_b, d) = link.pop_front().expect("front");
            if to_b { &b.port } else { &a.port }.deliver(d);
        }
        clock.advance_to(clock.now() + Duration::from_micros(200));
    }
    clock.elapsed() - start
}

fn pass(_: u64, d: Datagram) -> Vec<Datagram> {
    vec![d]
}

fn transfer(a: &mut Node, b: &mut Node, first: u64, n: u64) {
    for seq in first..first + n {
        a.send(seq, b.ip, MSG);
    }
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-test-key";

#[test]
fn sealed_pair_delivers_everything_and_no_payload_crosses_in_clear() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 16);
    let mut clear = 0;
    let mut wire = 0;
    let needle: Vec<u8> = (100..132).map(|i| pattern(3, i)).collect();
    let took = run(
        &clock,
        &mut a,
        &mut b,
        16,
        Duration::from_secs(30),
        &mut |_, d| {
            wire += 1;
            if d.bytes.windows(needle.len()).any(|w| w == needle) {
                clear += 1;
            }
            // Every datagram is sealed or a handshake with its trailer.
            assert!(
                seal::is_sealed(&d.bytes) || seal::split_hs(&d.bytes).is_some(),
                "a plain datagram on the sealed wire"
            );
            vec![d]
        },
    );
    assert_eq!(a.done.get("ok"), Some(&16), "{:?} after {took:?}", a.done);
    assert_eq!(b.got, (16, 0));
    assert!(wire > 16 * (MSG as usize / 1500), "{wire} datagrams");
    assert_eq!(clear, 0, "payload seen in clear on the wire");
    let s = a.stats();
    assert_eq!(s.peers[0].security, "required");
    assert!(s.sealed_bytes >= 16 * u64::from(MSG), "{}", s.sealed_bytes);
    assert_eq!(s.payload_copied, 0, "payload gathered by a copy");
    assert!(b.stats().opened_bytes >= 16 * u64::from(MSG));
}

#[test]
fn tampered_datagrams_fail_their_tag_and_the_transfer_still_completes() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 8);
    let mut tampered = 0u64;
    run(
        &clock,
        &mut a,
        &mut b,
        8,
        Duration::from_secs(60),
        &mut |k, mut d| {
            if d.to.ip() == &B && seal::is_sealed(&d.bytes) && k % 20 == 0 {
                let i = 16 + (k as usize * 7) % (d.bytes.len() - 16);
                d.bytes[i] ^= 0x01;
                tampered += 1;
            }
            vec![d]
        },
    );
    assert_eq!(a.done.get("ok"), Some(&8), "{:?}", a.done);
    assert_eq!(b.got, (8, 0), "a tampered payload was delivered");
    assert!(tampered > 20);
    assert_eq!(b.rejected(A, "bad_tag"), tampered);
}

#[test]
fn replayed_datagrams_are_refused_and_nothing_is_delivered_twice() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 8);
    let mut saved = Vec::new();
    let mut replayed = 0u64;
    run(
        &clock,
        &mut a,
        &mut b,
        8,
        Duration::from_secs(60),
        &mut |k, d| {
            let mut out = vec![d.clone()];
            if d.to.ip() == &B && seal::is_sealed(&d.bytes) {
                // Each sealed datagram again at once, and some a while later.
                if k % 5 == 0 {
                    out.push(d.clone());
                    replayed += 1;
                }
                if k % 97 == 0 {
                    saved.push(d);
                }
                if k % 1000 == 0 {
                    replayed += saved.len() as u64;
                    out.append(&mut saved);
                }
            }
            out
        },
    );
    assert_eq!(a.done.get("ok"), Some(&8), "{:?}", a.done);
    assert_eq!(b.got, (8, 0));
    assert!(replayed > 100);
    assert_eq!(b.rejected(A, "replay"), replayed);
}

#[test]
fn rekeys_mid_transfer_do_not_stall_it() {
    let n = 24;
    let plain_keys = |fast: bool| -> (Duration, u64, u64) {
        let clock = SimClock::new();
        let limits = if fast {
            Limits {
                rekey_packets: 200,
                rekey_us: u64::MAX,
                grace_us: 1_000,
            }
        } else {
            Limits::default()
        };
        let mut a = node(A, &clock, Some(KEY), limits);
        let mut b = node(B, &clock, Some(KEY), limits);
        transfer(&mut a, &mut b, 1, n);
        let took = run(
            &clock,
            &mut a,
            &mut b,
            n,
            Duration::from_secs(60),
            &mut pass,
        );
        assert_eq!(a.done.get("ok"), Some(&n), "{:?}", a.done);
        assert_eq!(b.got, (n, 0));
        let rekeys = a.stats().peers[0].rekeys;
        let bad = b.rejected(A, "bad_tag") + a.rejected(B, "bad_tag");
        (took, rekeys, bad)
    };
    let (base, r0, _) = plain_keys(false);
    let (took, rekeys, bad) = plain_keys(true);
    eprintln!("without key changes {base:?}, with {rekeys}: {took:?}");
    assert_eq!(r0, 0);
    assert!(rekeys >= 3, "only {rekeys} key changes");
    assert_eq!(bad, 0, "a packet under a changed key failed");
    assert!(
        took.as_secs_f64() <= base.as_secs_f64() * 1.05 + 0.01,
        "rekeying took {took:?}, without {base:?}"
    );
}

#[test]
fn a_peer_with_another_psk_is_refused() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(
        B,
        &clock,
        Some(b"another key, also long enough to be accepted"),
        Limits::default(),
    );
    transfer(&mut a, &mut b, 1, 2);
    run(
        &clock,
        &mut a,
        &mut b,
        2,
        Duration::from_secs(20),
        &mut pass,
    );
    assert_eq!(a.done.get("failed"), Some(&2), "{:?}", a.done);
    assert_eq!(b.got, (0, 0));
    assert!(b.drops("rx_sec_bad_handshake") >= 2);
    assert_eq!(b.drops("rx_hs_bad_cookie"), 0, "the listener saw it");
}

#[test]
fn a_plain_peer_is_refused_and_counted() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, None, Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 2);
    run(
        &clock,
        &mut a,
        &mut b,
        2,
        Duration::from_secs(20),
        &mut pass,
    );
    assert_eq!(a.done.get("failed"), Some(&2), "{:?}", a.done);
    assert_eq!(b.got, (0, 0));
    assert!(b.drops("rx_sec_plain_refused") >= 2);
    assert_eq!(a.stats().peers[0].security, "off");
    // And the other way: the sealed side's handshakes mean nothing to a plain
    // listener (it refuses them as malformed), so nothing connects.
    let mut c = node(
        Ipv4Addr::new(10, 0, 0, 3),
        &clock,
        Some(KEY),
        Limits::default(),
    );
    let mut d = node(Ipv4Addr::new(10, 0, 0, 4), &clock, None, Limits::default());
    transfer(&mut c, &mut d, 1, 1);
    run(
        &clock,
        &mut c,
        &mut d,
        1,
        Duration::from_secs(20),
        &mut pass,
    );
    assert_eq!(c.done.get("failed"), Some(&1), "{:?}", c.done);
    assert_eq!(d.got, (0, 0));
}

#[test]
fn handshakes_reflected_to_their_sender_are_refused() {
    // An on-path attacker sends every datagram of A to B back to A, as from
    // B: A's own handshake must not connect A to itself (its messages would
    // be "delivered" into A and reported Ok while B got nothing).
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 2);
    let mut reflected = 0u64;
    run(
        &clock,
        &mut a,
        &mut b,
        2,
        Duration::from_secs(20),
        &mut |_, d| {
            if *d.from.ip() == A && *d.to.ip() == B {
                reflected += 1;
                return vec![Datagram {
                    from: d.to,
                    to: d.from,
                    bytes: d.bytes,
                }];
            }
            vec![d]
        },
    );
    assert!(reflected >= 2, "{reflected}");
    assert_eq!(a.done.get("ok"), None, "{:?}", a.done);
    assert_eq!(a.done.get("failed"), Some(&2), "{:?}", a.done);
    assert_eq!((a.got, b.got), ((0, 0), (0, 0)));
    assert!(a.rejected(B, "reflected_handshake") >= 2);
    assert_eq!(a.drops("rx_hs_bad_cookie"), 0, "the listener saw it");
}

#[test]
fn handshakes_relayed_to_another_keyholder_are_refused() {
    // A dials B; the attacker relays A's datagrams to C (same network key),
    // and C's to A as from B. C must not take a handshake meant for B.
    let c_ip = Ipv4Addr::new(10, 0, 0, 3);
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut c = node(c_ip, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut c, 1, 0);
    for seq in 1..=2 {
        a.send(seq, B, MSG);
    }
    run(
        &clock,
        &mut a,
        &mut c,
        2,
        Duration::from_secs(20),
        &mut |_, mut d| {
            if *d.to.ip() == B {
                d.to = SocketAddrV4::new(c_ip, PORT);
            } else if *d.from.ip() == c_ip {
                d.from = SocketAddrV4::new(B, PORT);
            }
            vec![d]
        },
    );
    assert_eq!(a.done.get("ok"), None, "{:?}", a.done);
    assert_eq!(c.got, (0, 0));
    // C has no state for A (a stranger): counted in C's drops.
    assert!(c.drops("rx_sec_bad_handshake") >= 2);
    assert_eq!(c.drops("rx_hs_bad_cookie"), 0, "the listener saw it");
}

#[test]
fn a_handshake_with_the_engines_own_client_key_is_refused() {
    // A dials B. A holder of the network's key at X takes A's handshake
    // request and sends it to A as X's own, correctly MACed for X → A but
    // carrying A's ephemeral key: A must refuse it (it would agree keys with
    // itself). The same handshake with a key of X's own is answered: the MAC
    // is good, only the key is refused.
    let x = Ipv4Addr::new(10, 0, 0, 9);
    let from_x = SocketAddrV4::new(x, PORT);
    let psk = Psk::from_bytes(KEY).expect("a long key");
    let ends = seal::Ends {
        initiator: x.into(),
        responder: A.into(),
    };
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    a.send(1, B, MSG);
    let (mut stolen, mut fresh_sent, mut to_x) = (0u64, false, 0u64);
    let x_client = seal::Client::new(psk.clone(), ends);
    run(
        &clock,
        &mut a,
        &mut b,
        1,
        Duration::from_secs(5),
        &mut |_, d| {
            if *d.to.ip() == x {
                to_x += 1;
                return vec![];
            }
            if *d.from.ip() != A || *d.to.ip() != B {
                return vec![];
            }
            // A's handshake to B, never delivered.
            let Some((hs, key, _)) = seal::split_hs(&d.bytes) else {
                return vec![];
            };
            let mut out = Vec::new();
            if stolen < 3 {
                stolen += 1;
                let mut forged = hs.to_vec();
                forged.extend_from_slice(&seal::client_trailer(&psk, ends, hs, &key));
                out.push(Datagram {
                    from: from_x,
                    to: d.from,
                    bytes: forged,
                });
            } else if !fresh_sent {
                fresh_sent = true;
                let mut own = hs.to_vec();
                own.extend_from_slice(&x_client.trailer(hs));
                out.push(Datagram {
                    from: from_x,
                    to: d.from,
                    bytes: own,
                });
            }
            out
        },
    );
    assert_eq!(stolen, 3, "A's handshake was not seen");
    assert!(fresh_sent);
    assert_eq!(a.drops("rx_sec_reflected_handshake"), 3);
    assert_eq!(a.drops("rx_sec_bad_handshake"), 0, "the MAC is good");
    // Only the handshake with X's own key got an answer (the cookie).
    assert_eq!(to_x, 1, "A answered a handshake with its own key");
    assert_eq!((a.got, b.got), ((0, 0), (0, 0)));
}

#[test]
fn an_outage_longer_than_two_key_periods_does_not_wedge_the_connection() {
    // Keys change every second; the link is down for 3.5 s in the middle of a
    // transfer, while both sides' keep-alives and retransmissions keep
    // sealing under new keys that never arrive.
    let limits = Limits {
        rekey_packets: u64::MAX,
        rekey_us: 1_000_000,
        grace_us: 100_000,
    };
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), limits);
    let mut b = node(B, &clock, Some(KEY), limits);
    let n = 12;
    transfer(&mut a, &mut b, 1, n);
    let t = clock.clone();
    let mut sealed = 0u64;
    let mut down_at = None;
    let mut lost = 0u64;
    // Key changes A's datagrams show while the link is down.
    let mut epoch = None;
    let mut rekeys_in_outage = 0;
    let took = run(
        &clock,
        &mut a,
        &mut b,
        n,
        Duration::from_secs(60),
        &mut |_, d| {
            // Down from A's 50th sealed datagram on, for 3.5 s.
            if seal::is_sealed(&d.bytes) && *d.from.ip() == A {
                sealed += 1;
            }
            if sealed == 50 && down_at.is_none() {
                down_at = Some(t.elapsed());
            }
            if down_at.is_some_and(|at| t.elapsed() < at + Duration::from_millis(3_500)) {
                lost += 1;
                if seal::is_sealed(&d.bytes) && *d.from.ip() == A {
                    // Byte 2: the version bits and the key epoch.
                    if epoch.is_some_and(|e| e != d.bytes[2]) {
                        rekeys_in_outage += 1;
                    }
                    epoch = Some(d.bytes[2]);
                }
                return vec![];
            }
            vec![d]
        },
    );
    assert!(lost > 0);
    assert!(
        rekeys_in_outage >= 3,
        "keys changed {rekeys_in_outage} times"
    );
    assert_eq!(a.done.get("ok"), Some(&n), "{:?} after {took:?}", a.done);
    assert_eq!(b.got, (n, 0));
    assert_eq!(b.rejected(A, "bad_tag") + a.rejected(B, "bad_tag"), 0);
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn a_replayed_handshake_is_no_news_of_the_peer_and_gets_no_answer() {
    let clock = SimClock::new();
    let mut a = node(A, &clock, Some(KEY), Limits::default());
    let mut b = node(B, &clock, Some(KEY), Limits::default());
    transfer(&mut a, &mut b, 1, 2);
    let mut captured: Option<Datagram> = None;
    run(
        &clock,
        &mut a,
        &mut b,
        2,
        Duration::from_secs(20),
        &mut |_, d| {
            if *d.to.ip() == B && seal::split_hs(&d.bytes).is_some() {
                // The last handshake A sends: its request with the cookie.
                captured = Some(d.clone());
            }
            vec![d]
        },
    );
    assert_eq!(a.done.get("ok"), Some(&2), "{:?}", a.done);
    let hs = captured.expect("A's handshake");
    // A is gone; an attacker replays A's handshake to B every 100 ms.
    let mut answers = 0;
    let end = clock.elapsed() + Duration::from_secs(3);
    let mut next = clock.elapsed();
    while clock.elapsed() < end {
        if clock.elapsed() >= next {
            b.port.deliver(hs.clone());
            next += Duration::from_millis(100);
        }
        b.step();
        answers += b
            .port
            .take_sent()
            .iter()
            .filter(|d| seal::split_hs(&d.bytes).is_some())
            .count();
        clock.advance_to(clock.now() + Duration::from_micros(500));
    }
    assert_eq!(answers, 0, "B answered a replayed handshake");
    assert!(b.rejected(A, "replayed_handshake") >= 29);
}

/// `n` with its keys taken from `shared` (a key reload replaces them).
fn with_shared(n: Node, shared: &seal::SharedKeys) -> Node {
    let Node {
        ip,
        udt,
        port,
        mem,
        region,
        got,
        done,
    } = n;
    Node {
        ip,
        udt: udt.with_shared_keys(shared.clone()),
        port,
        mem,
        region,
        got,
        done,
    }
}

#[test]
fn a_client_connecting_across_a_key_rotation_comes_up_promptly_afterwards() {
    // A starts connecting to B with the old key while the link is down; the
    // three rotation steps (add the new key, connect with it, drop the old)
    // happen on both nodes during the outage. Once the link is back, A's
    // handshake uses the new key: B, which no longer holds the old one,
    // accepts it at once.
    const NEW: &[u8] = b"the next key of the network, 32 bytes or more";
    let (old, new) = (Psk::from_bytes(KEY).unwrap(), Psk::from_bytes(NEW).unwrap());
    let ring = |ip: Ipv4Addr, keys: Vec<Psk>| Keyring {
        local: Some(ip.into()),
        net: keys,
        ..Keyring::default()
    };
    let ka = seal::SharedKeys::new(ring(A, vec![old.clone()]));
    let kb = seal::SharedKeys::new(ring(B, vec![old.clone()]));
    let clock = SimClock::new();
    let mut a = with_shared(node(A, &clock, Some(KEY), Limits::default()), &ka);
    let mut b = with_shared(node(B, &clock, Some(KEY), Limits::default()), &kb);
    let n = 4;
    transfer(&mut a, &mut b, 1, n);
    let t = clock.clone();
    let steps = [
        vec![old.clone(), new.clone()],
        vec![new.clone(), old.clone()],
        vec![new.clone()],
    ];
    let mut done_steps = 0;
    let up_at = Duration::from_millis(1_000);
    let mut lost = 0u64;
    let took = run(
        &clock,
        &mut a,
        &mut b,
        n,
        Duration::from_secs(20),
        &mut |_, d| {
            let now = t.elapsed();
            while done_steps < steps.len()
                && now >= Duration::from_millis(250 * (done_steps as u64 + 1))
            {
                ka.replace(ring(A, steps[done_steps].clone()));
                kb.replace(ring(B, steps[done_steps].clone()));
                done_steps += 1;
            }
            if now < up_at {
                lost += 1;
                return vec![];
            }
            vec![d]
        },
    );
    assert_eq!(done_steps, 3);
    assert!(lost > 0, "A tried to connect during the outage");
    assert_eq!(a.done.get("ok"), Some(&n), "{:?} after {took:?}", a.done);
    assert_eq!(b.got, (n, 0));
    assert_eq!(b.rejected(A, "bad_handshake"), 0, "A's old key reached B");
    assert!(
        took < up_at + Duration::from_millis(700),
        "up {:?} after the link came back",
        took.saturating_sub(up_at)
    );
}

#[test]
fn a_client_whose_reply_was_lost_across_a_key_swap_still_connects() {
    // B accepts A's handshake under the old key, but its reply is lost; then
    // both nodes drop the old key for the new one. A's client starts over
    // under the new key with the same socket ID: B, whose accepted connection
    // never opened a datagram of A, takes the new handshake.
    const NEW: &[u8] = b"the next key of the network, 32 bytes or more";
    let (old, new) = (Psk::from_bytes(KEY).unwrap(), Psk::from_bytes(NEW).unwrap());
    let ring = |ip: Ipv4Addr, keys: Vec<Psk>| Keyring {
        local: Some(ip.into()),
        net: keys,
        ..Keyring::default()
    };
    let ka = seal::SharedKeys::new(ring(A, vec![old.clone()]));
    let kb = seal::SharedKeys::new(ring(B, vec![old.clone()]));
    let clock = SimClock::new();
    let mut a = with_shared(node(A, &clock, Some(KEY), Limits::default()), &ka);
    let mut b = with_shared(node(B, &clock, Some(KEY), Limits::default()), &kb);
    let n = 4;
    transfer(&mut a, &mut b, 1, n);
    let t = clock.clone();
    let mut from_b = 0u64;
    let mut swapped = false;
    let up_at = Duration::from_millis(1_000);
    let took = run(
        &clock,
        &mut a,
        &mut b,
        n,
        Duration::from_secs(20),
        &mut |_, d| {
            let now = t.elapsed();
            if now >= Duration::from_millis(500) && !swapped {
                ka.replace(ring(A, vec![new.clone()]));
                kb.replace(ring(B, vec![new.clone()]));
                swapped = true;
            }
            if *d.from.ip() == B && now < up_at {
                // B's cookie passes, its reply to the accepted handshake not.
                from_b += 1;
                if from_b > 1 {
                    return vec![];
                }
            }
            vec![d]
        },
    );
    assert!(swapped && from_b > 1, "B answered {from_b} times");
    assert_eq!(a.done.get("ok"), Some(&n), "{:?} after {took:?}", a.done);
    assert_eq!(b.got, (n, 0));
    assert!(
        took < up_at + Duration::from_millis(1_500),
        "up {:?} after the link came back",
        took.saturating_sub(up_at)
    );
}
