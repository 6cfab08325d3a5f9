//! Forward error correction in the engine, on virtual time: two UDT
//! transports (`Udt` over `SimIo`, each on its own ring region) carry the
//! seed's live stream — 64 KiB chunks at 20 Mbit/s — over a 100 Mbit/s link
//! with a 600 ms round trip and 1 % random loss each way, with and without
//! `fec` between them. Every chunk's payload is checked byte for byte where
//! it lands in the receiver's RX pool; its latency is the time it was
//! delivered minus the time it was due (handed to the sender).
//!
//! `cargo test --release -p lu2k-engine --test fec_sim -- --nocapture`

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use lu2k_engine::daemon::stats::CoreStats;
use lu2k_engine::io::sim::{Datagram, SimClock, SimIo, SimPort};
use lu2k_engine::io::sys::CoreMem;
use lu2k_engine::transport::seal::{Keyring, Psk};
use lu2k_engine::transport::udt::{Params, Udt};
use lu2k_engine::transport::{Event, OutMsg, Transport as _};
use lu2k_ring_abi::{Config as RegionConfig, Extent, Nid, Pool, Region, TxStatus, LNET_HDR_LEN};

const PORT: u16 = 7988;
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// A chunk of the stream (one LNet PUT).
const CHUNK: u32 = 65_536;
/// TX pool room per message slot.
const SLOT_BYTES: u64 = 128 * 1024;
const SLOTS: u64 = 120;
/// 64 KiB at 20 Mbit/s.
const CHUNK_EVERY_US: u64 = 26_214;
const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-fec-test-key";

struct Node {
    udt: Udt,
    port: SimPort,
    mem: Arc<CoreMem>,
    region: Region,
    /// Delivered chunks: seq → delivery time (µs of virtual time).
    got: HashMap<u64, u64>,
    corrupt: u64,
    done_ok: u64,
    done_failed: u64,
}

fn pattern(seq: u64, i: usize) -> u8 {
    (seq as usize * 131 + i * 7 + i / 251) as u8
}

fn node(ip: Ipv4Addr, peer: Ipv4Addr, clock: &SimClock, fec: bool, sealed: bool) -> Node {
    let region = Region::create(&RegionConfig {
        cores: 1,
        tx_entries: 256,
        tx_done_entries: 256,
        rx_entries: 1024,
        rx_return_entries: 1024,
        tx_pool_len: SLOTS * SLOT_BYTES,
        rx_buf_size: 2048,
        rx_buf_count: 8192,
        rx_tables_per_core: 256,
        ..RegionConfig::default()
    })
    .expect("region");
    let mem = Arc::new(CoreMem::new(&region, 0, 1, 64, SLOTS as u32).expect("core mem"));
    let (io, port) = SimIo::new(SocketAddrV4::new(ip, PORT), mem.clone(), clock.clone());
    let net = format!("{ip}@tcp").parse::<Nid>().expect("nid").net();
    let mut udt = Udt::new(
        Params {
            core: 0,
            net,
            port: PORT,
            overrides: HashMap::new(),
            udt: lu2k_udt::conn::Config {
                connect_timeout_us: 5_000_000,
                ..Default::default()
            },
            peer_down_timeout_us: 60_000_000,
            seed: u64::from(u32::from(ip)) * 0x9E37,
        },
        Box::new(io),
        region.clone(),
        mem.rx_first,
    );
    if sealed {
        let keys = Keyring {
            local: Some(ip.into()),
            net: vec![Psk::from_bytes(KEY).expect("psk")],
            ..Keyring::default()
        };
        let scratch = mem.take_seal_scratch().expect("scratch");
        udt = udt.with_security(keys, Default::default(), scratch);
    }
    if fec {
        let scratch = (!sealed).then(|| mem.take_seal_scratch().expect("scratch"));
        udt = udt.with_fec(
            HashSet::from([peer.into()]),
            lu2k_udt::fec::Config::default(),
            scratch,
        );
    }
    Node {
        udt,
        port,
        mem,
        region,
        got: HashMap::new(),
        corrupt: 0,
        done_ok: 0,
        done_failed: 0,
    }
}

impl Node {
    /// Queues chunk `seq` to `peer` (message-header slot and TX pool area
    /// `seq % SLOTS`).
    fn send(&mut self, seq: u64, peer: Ipv4Addr) {
        let slot = (seq % SLOTS) as u32;
        let mut hdr = [0u8; LNET_HDR_LEN];
        hdr[..8].copy_from_slice(&seq.to_be_bytes());
        assert!(self.mem.write_msg_hdr(slot, &hdr));
        let off = u64::from(slot) * SLOT_BYTES;
        let data: Vec<u8> = (0..CHUNK as usize).map(|i| pattern(seq, i)).collect();
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
            payload: vec![(self.mem.pool_off as u64 + off, CHUNK)],
            payload_len: CHUNK,
        });
    }

    fn step(&mut self, now_us: u64) {
        self.udt.wait(None, false).expect("wait");
        self.udt.handle_timeout();
        while self.udt.poll_transmit() {}
        while let Some(ev) = self.udt.poll_event() {
            match ev {
                Event::Sent { status, .. } => {
                    if status == TxStatus::Ok {
                        self.done_ok += 1;
                    } else {
                        self.done_failed += 1;
                    }
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
                    let ok = bytes.len() == LNET_HDR_LEN + CHUNK as usize
                        && bytes[LNET_HDR_LEN..]
                            .iter()
                            .enumerate()
                            .all(|(i, &b)| b == pattern(seq, i));
                    if ok && !self.got.contains_key(&seq) {
                        self.got.insert(seq, now_us);
                    } else {
                        self.corrupt += 1;
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
}

/// One direction of the link: a 100 Mbit/s serializer with a queue of
/// `QUEUE` bytes, then 300 ms of delay; Bernoulli loss.
struct Dir {
    busy_until: u64,
    line: VecDeque<(u64, Datagram)>,
    rng: u64,
    loss: f64,
}

const RATE_BPS: f64 = 100e6;
const ONE_WAY_US: u64 = 300_000;
const QUEUE_US: u64 = 600_000;
/// IP + UDP header bytes on the wire.
const WIRE_EXTRA: usize = 28;

impl Dir {
    fn new(seed: u64, loss: f64) -> Dir {
        Dir {
            busy_until: 0,
            line: VecDeque::new(),
            rng: seed | 1,
            loss,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn push(&mut self, now: u64, d: Datagram) {
        let start = self.busy_until.max(now);
        if start - now > QUEUE_US {
            return; // tail drop
        }
        let tx_us = ((d.bytes.len() + WIRE_EXTRA) as f64 * 8.0 / RATE_BPS * 1e6) as u64;
        self.busy_until = start + tx_us;
        if self.uniform() < self.loss {
            return;
        }
        self.line.push_back((self.busy_until + ONE_WAY_US, d));
    }

    fn due(&mut self, now: u64) -> Vec<Datagram> {
        let mut out = Vec::new();
        while self.line.front().is_some_and(|x| x.0 <= now) {
            out.push(self.line.pop_front().expect("front").1);
        }
        out
    }
}

/// What a run measured.
#[derive(Debug)]
struct Outcome {
    chunks: u64,
    /// Delivery latency from the due time, ms: p50, p99, max.
    p50: f64,
    p99: f64,
    max: f64,
    corrupt: u64,
    /// A → B bytes beyond the data packets' first sends, of those: repairs
    /// and retransmissions (UDT payload bytes; plain wire only).
    extra: Option<f64>,
    sender: CoreStats,
    receiver: CoreStats,
}

/// Streams `secs` of chunks A → B at `loss` each way; FEC between them if
/// `fec`, the sealed wire if `sealed`.
fn stream(secs: u64, loss: f64, fec: bool, sealed: bool, seed: u64) -> Outcome {
    stream_with(secs, loss, (fec, fec), sealed, seed)
}

/// [`stream`] with FEC set at A and at B on their own.
fn stream_with(secs: u64, loss: f64, fec: (bool, bool), sealed: bool, seed: u64) -> Outcome {
    let clock = SimClock::new();
    let mut a = node(A, B, &clock, fec.0, sealed);
    let mut b = node(B, A, &clock, fec.1, sealed);
    let mut fwd = Dir::new(seed, loss);
    let mut rev = Dir::new(seed.wrapping_mul(0x9E37_79B9), loss);
    let chunks = secs * 1_000_000 / CHUNK_EVERY_US;
    let step = 100u64;
    let mut now = 0u64;
    // Warm-up: one chunk outside the stream, until the sender has it
    // acknowledged (the connection is up and out of its first round trip,
    // as in the harness's live runs and the codec's fec_live test).
    let warm = u64::MAX >> 1;
    a.send(warm, B);
    let mut first_sent = 0u64;
    let mut resent = 0u64;
    let mut repairs = 0u64;
    let mut seen: HashSet<u32> = HashSet::new();
    let mut start = None;
    let mut next = 0u64;
    let end_limit = (secs + 30) * 1_000_000;
    while now < end_limit {
        if start.is_none() && a.done_ok > 0 {
            start = Some(now);
        }
        if let Some(s) = start {
            while next < chunks && s + next * CHUNK_EVERY_US <= now {
                a.send(next, B);
                next += 1;
            }
            if b.got.len() as u64 > chunks {
                break;
            }
        }
        a.step(now);
        b.step(now);
        for d in a.port.take_sent() {
            if start.is_some() && !sealed && d.bytes.len() >= 16 {
                let w0 = u32::from_be_bytes(d.bytes[..4].try_into().unwrap());
                let pay = d.bytes.len() as u64 - 16;
                if w0 & 0x8000_0000 == 0 {
                    if seen.insert(w0) {
                        first_sent += pay;
                    } else {
                        resent += pay;
                    }
                } else if lu2k_udt::fec::is_repair(&d.bytes) {
                    repairs += pay;
                }
            }
            fwd.push(now, d);
        }
        for d in b.port.take_sent() {
            rev.push(now, d);
        }
        for d in fwd.due(now) {
            b.port.deliver(d);
        }
        for d in rev.due(now) {
            a.port.deliver(d);
        }
        now += step;
        clock.advance_to(clock.now() + Duration::from_micros(step));
    }
    let s = start.expect("the warm-up chunk was acknowledged");
    let mut lat: Vec<f64> = (0..chunks)
        .map(|i| match b.got.get(&i) {
            Some(&t) => (t - (s + i * CHUNK_EVERY_US)) as f64 / 1000.0,
            None => f64::INFINITY,
        })
        .collect();
    if std::env::var("FEC_SIM_SHOW").is_ok() {
        let late: Vec<(usize, u64)> = lat
            .iter()
            .enumerate()
            .filter(|x| *x.1 > 400.0)
            .map(|(i, l)| (i, *l as u64))
            .collect();
        println!("chunks over 400 ms (index, ms): {late:?}");
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let q = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    Outcome {
        chunks,
        p50: q(0.5),
        p99: q(0.99),
        max: lat[lat.len() - 1],
        corrupt: b.corrupt,
        extra: (!sealed).then(|| (resent + repairs) as f64 / first_sent.max(1) as f64),
        sender: a.stats(),
        receiver: b.stats(),
    }
}

fn report(name: &str, o: &Outcome) {
    println!(
        "{name}: {} chunks, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, corrupt {}, extra {}; \
         sender fec {:?}; receiver fec {:?}; receiver drops {:?}",
        o.chunks,
        o.p50,
        o.p99,
        o.max,
        o.corrupt,
        o.extra
            .map_or("-".to_string(), |e| format!("{:.1} %", 100.0 * e)),
        o.sender.fec,
        o.receiver.fec,
        o.receiver.drops,
    );
}

/// The goal of issue 18 item 5: at 1 % loss and 600 ms, p99 within the
/// one-way delay + ¼ RTT (450 ms) at ≤ 10 % extra bytes; without FEC the
/// same stream's p99 is a round trip later.
#[test]
fn fec_holds_a_live_stream_within_a_quarter_round_trip_at_one_percent_loss() {
    let with = stream(20, 0.01, true, false, 7);
    report("FEC", &with);
    let without = stream(20, 0.01, false, false, 7);
    report("no FEC", &without);
    for o in [&with, &without] {
        assert_eq!(o.corrupt, 0, "a chunk delivered wrong or twice");
        assert!(o.max.is_finite(), "a chunk never arrived: {o:?}");
    }
    assert!(with.p99 <= 450.0, "p99 {} ms with FEC", with.p99);
    assert!(without.p99 > 800.0, "p99 {} ms without FEC", without.p99);
    let extra = with.extra.expect("plain wire");
    assert!(extra <= 0.10, "{:.1} % extra bytes", 100.0 * extra);
    let f = &with.sender.fec;
    assert!(f.repairs_sent > 0 && f.coded_bytes > 700 * u64::from(CHUNK));
    assert!(f.repair_bytes as f64 <= 0.09 * f.coded_bytes as f64);
    let r = &with.receiver.fec;
    assert!(r.rebuilt > 50, "{r:?}");
    assert_eq!(r.bad_repairs, 0);
    assert_eq!(without.sender.fec.repairs_sent, 0);
    // The payload path stays zero-copy: rebuilt packets are written into
    // RX buffers, the coded reads are the codec's own.
    assert_eq!(with.sender.payload_copied, 0);
    assert_eq!(with.receiver.payload_copied, 0);
}

/// FEC on the sealed wire: repairs sealed like every datagram, opened in
/// place, rebuilt packets delivered from the repairs' RX space.
#[test]
fn fec_works_on_the_sealed_wire() {
    let o = stream(8, 0.01, true, true, 11);
    report("FEC sealed", &o);
    assert_eq!(o.corrupt, 0);
    assert!(o.max.is_finite(), "a chunk never arrived: {o:?}");
    assert!(o.p99 <= 450.0, "p99 {} ms", o.p99);
    assert!(o.receiver.fec.rebuilt > 10, "{:?}", o.receiver.fec);
    assert!(o.receiver.opened_bytes > 0 && o.sender.sealed_bytes > 0);
}

/// FEC set on one end only (a configuration mistake): the stream still
/// arrives whole, by retransmission. A receiver without FEC refuses the
/// repairs as malformed control packets; a sender without FEC sends none.
#[test]
fn fec_on_one_end_only_still_delivers_everything() {
    let o = stream_with(4, 0.01, (true, false), false, 3);
    report("FEC at the sender only", &o);
    assert_eq!(o.corrupt, 0);
    assert!(o.max.is_finite(), "a chunk never arrived: {o:?}");
    assert!(o.sender.fec.repairs_sent > 0);
    assert_eq!(o.receiver.fec.rebuilt, 0);
    let o = stream_with(4, 0.01, (false, true), false, 3);
    report("FEC at the receiver only", &o);
    assert_eq!(o.corrupt, 0);
    assert!(o.max.is_finite(), "a chunk never arrived: {o:?}");
    assert_eq!(o.sender.fec.repairs_sent, 0);
    assert_eq!(o.receiver.fec.repairs_received, 0);
}
