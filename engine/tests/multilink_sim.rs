//! Several links per peer between two UDT transports on virtual time. Each node
//! is a `Udt` over the virtual-time provider on its own ring region, with two
//! addresses (10.1.0.x and 10.2.0.x): link 0 joins the 10.1 addresses, link 1
//! the 10.2 ones. The test plays the kernel's routing (a datagram to the peer's
//! 10.2 address leaves from this node's 10.2 address) and two emulated links
//! (rate, one-way delay, a bottleneck queue, outages), and plays kshim on both
//! sides: it keeps a number of messages in flight (LNet's credits), checks
//! each received message byte for byte and counts how often each arrived.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use lu2k_engine::daemon::stats::{CoreStats, PeerStats};
use lu2k_engine::io::sim::{Datagram, SimClock, SimIo, SimPort};
use lu2k_engine::io::sys::CoreMem;
use lu2k_engine::transport::links::{LinkCfg, LinkStats, LinkTable, PeerLinksCfg, Policy};
use lu2k_engine::transport::udt::{Params, Udt};
use lu2k_engine::transport::{Event, OutMsg, Transport as _};
use lu2k_ring_abi::{Config as RegionConfig, Extent, Nid, Pool, Region, TxStatus, LNET_HDR_LEN};

const PORT: u16 = 7988;
const A: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 2, 0, 1)];
const B: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 2, 0, 2)];
const MSG: u32 = 256 * 1024;
/// Message slots (and TX pool areas) of the sender.
const SLOTS: u64 = 64;
/// Virtual time per driver pass.
const STEP: Duration = Duration::from_micros(100);

struct Node {
    udt: Udt,
    port: SimPort,
    mem: Arc<CoreMem>,
    region: Region,
    /// Deliveries per message number, and corrupt ones.
    got: HashMap<u64, u32>,
    corrupt: u64,
    /// Completions by status, and payload bytes completed `Ok`.
    done: BTreeMap<String, u64>,
    ok_bytes: u64,
    /// Messages in flight (sent, not completed).
    in_flight: u64,
    next_seq: u64,
    /// Free message slots, and the slot of each message in flight: messages
    /// over several links complete in any order.
    free: Vec<u32>,
    slot_of: HashMap<u64, u32>,
}

fn pattern(seq: u64, i: usize) -> u8 {
    (seq as usize * 131 + i * 7 + i / 251) as u8
}

fn node(me: [Ipv4Addr; 2], peer: [Ipv4Addr; 2], policy: Option<Policy>, clock: &SimClock) -> Node {
    let region = Region::create(&RegionConfig {
        cores: 1,
        tx_entries: 64,
        tx_done_entries: 64,
        rx_entries: 256,
        rx_return_entries: 256,
        tx_pool_len: SLOTS * u64::from(MSG),
        rx_buf_size: 2048,
        rx_buf_count: 16384,
        rx_tables_per_core: 64,
        ..RegionConfig::default()
    })
    .expect("region");
    let mem = Arc::new(CoreMem::new(&region, 0, 1, 64, 64).expect("core mem"));
    let (io, port) = SimIo::new(SocketAddrV4::new(me[0], PORT), mem.clone(), clock.clone());
    let net = format!("{}@tcp", me[0]).parse::<Nid>().expect("nid").net();
    let udt = Udt::new(
        Params {
            core: 0,
            net,
            port: PORT,
            overrides: HashMap::new(),
            udt: lu2k_udt::conn::Config {
                connect_timeout_us: 30_000_000,
                idle_timeout_us: 30_000_000,
                ..Default::default()
            },
            peer_down_timeout_us: 30_000_000,
            seed: u64::from(u32::from(me[0])) * 0x9E37,
        },
        Box::new(io),
        region.clone(),
        mem.rx_first,
    );
    let udt = match policy {
        Some(policy) => udt.with_links(
            LinkTable::new(vec![PeerLinksCfg {
                nid_ip: peer[0].into(),
                policy,
                links: (0..2)
                    .map(|i| LinkCfg {
                        local: me[i].into(),
                        remote: SocketAddrV4::new(peer[i], PORT).into(),
                        weight: 1,
                    })
                    .collect(),
            }])
            .expect("link table"),
        ),
        None => udt,
    };
    Node {
        udt,
        port,
        mem,
        region,
        got: HashMap::new(),
        corrupt: 0,
        done: BTreeMap::new(),
        ok_bytes: 0,
        in_flight: 0,
        next_seq: 1,
        free: (0..SLOTS as u32).rev().collect(),
        slot_of: HashMap::new(),
    }
}

impl Node {
    /// Sends the next message to `peer` in a free slot (at most SLOTS in
    /// flight).
    fn send(&mut self, peer: Ipv4Addr) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = self.free.pop().expect("a free slot");
        self.slot_of.insert(seq, slot);
        let mut hdr = [0u8; LNET_HDR_LEN];
        hdr[..8].copy_from_slice(&seq.to_be_bytes());
        assert!(self.mem.write_msg_hdr(slot, &hdr));
        let off = u64::from(slot) * u64::from(MSG);
        let data: Vec<u8> = (0..MSG as usize).map(|i| pattern(seq, i)).collect();
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
            payload: vec![(self.mem.pool_off as u64 + off, MSG)],
            payload_len: MSG,
        });
        self.in_flight += 1;
    }

    fn step(&mut self) {
        self.udt.wait(None, false).expect("wait");
        self.udt.handle_timeout();
        while self.udt.poll_transmit() {}
        while let Some(ev) = self.udt.poll_event() {
            match ev {
                Event::Sent { id, status, .. } => {
                    self.in_flight -= 1;
                    let slot = self.slot_of.remove(&id).expect("a message in flight, once");
                    self.free.push(slot);
                    let k = if status == TxStatus::Ok {
                        self.ok_bytes += u64::from(MSG);
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
                    let ok = bytes.len() == LNET_HDR_LEN + MSG as usize
                        && bytes[LNET_HDR_LEN..]
                            .iter()
                            .enumerate()
                            .all(|(i, &b)| b == pattern(seq, i));
                    if ok {
                        *self.got.entry(seq).or_default() += 1;
                    } else {
                        let bad = bytes[LNET_HDR_LEN..]
                            .iter()
                            .enumerate()
                            .position(|(i, &b)| b != pattern(seq, i));
                        let i0 = bad.unwrap_or(0);
                        let who = (0..4000u64).find(|&s| {
                            (i0..(i0 + 64).min(MSG as usize))
                                .all(|i| bytes[LNET_HDR_LEN + i] == pattern(s, i))
                        });
                        let good_after = bytes[LNET_HDR_LEN..]
                            .iter()
                            .enumerate()
                            .skip(i0)
                            .position(|(i, &b)| b == pattern(seq, i) && i > i0 + 64);
                        eprintln!(
                            "corrupt: seq {seq} len {} first bad byte {bad:?} pieces {} bytes of {who:?}, good again after {good_after:?}; pieces {:?}",
                            bytes.len(),
                            pieces.len(),
                            pieces.iter().map(|p| (p.bid, p.off, p.len)).take(4).collect::<Vec<_>>()
                        );
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

    fn peer(&mut self, nid_ip: Ipv4Addr) -> PeerStats {
        self.stats()
            .peers
            .into_iter()
            .find(|p| p.nid.starts_with(&format!("{nid_ip}@")))
            .expect("peer in stats")
    }

    fn links(&mut self, nid_ip: Ipv4Addr) -> Vec<LinkStats> {
        self.peer(nid_ip).links
    }

    fn drops(&mut self, why: &str) -> u64 {
        self.stats().drops.get(why).copied().unwrap_or(0)
    }
}

/// One direction of an emulated link: a rate, a one-way delay, a bottleneck
/// queue (tail drop), and whether it carries anything now.
struct Pipe {
    rate_bps: f64,
    delay: Duration,
    queue: Duration,
    busy_until: Duration,
    q: VecDeque<(Duration, Datagram)>,
    up: bool,
    lost: u64,
}

impl Pipe {
    fn new(rate_mbps: f64, delay_ms: u64) -> Pipe {
        Pipe {
            rate_bps: rate_mbps * 1e6,
            delay: Duration::from_millis(delay_ms),
            // About a bandwidth-delay product of the round trip.
            queue: Duration::from_millis(2 * delay_ms).max(Duration::from_millis(20)),
            busy_until: Duration::ZERO,
            q: VecDeque::new(),
            up: true,
            lost: 0,
        }
    }

    fn push(&mut self, now: Duration, d: Datagram) {
        if !self.up {
            self.lost += 1;
            return;
        }
        let start = self.busy_until.max(now);
        if start - now > self.queue {
            self.lost += 1;
            return;
        }
        let wire = (d.bytes.len() + 28) as f64 * 8.0 / self.rate_bps;
        self.busy_until = start + Duration::from_secs_f64(wire);
        self.q.push_back((self.busy_until + self.delay, d));
    }

    fn pop(&mut self, now: Duration) -> Option<Datagram> {
        if self.q.front().is_some_and(|(t, _)| *t <= now) {
            self.q.pop_front().map(|(_, d)| d)
        } else {
            None
        }
    }
}

/// Two links, each a pipe per direction: `pipes[link][0]` A → B, `[1]` B → A.
struct Net {
    pipes: [[Pipe; 2]; 2],
}

impl Net {
    fn new(links: [(f64, u64); 2]) -> Net {
        let p = |(r, d): (f64, u64)| [Pipe::new(r, d), Pipe::new(r, d)];
        Net {
            pipes: [p(links[0]), p(links[1])],
        }
    }

    /// The kernel's routing: the link is the destination's subnet, the source
    /// this node's address on it.
    fn carry(&mut self, now: Duration, a: &Node, b: &Node) {
        for (dir, from) in [(0usize, &a.port), (1, &b.port)] {
            let me = if dir == 0 { A } else { B };
            for mut d in from.take_sent() {
                let link = usize::from(d.to.ip().octets()[1] == 2);
                d.from = SocketAddrV4::new(me[link], PORT);
                self.pipes[link][dir].push(now, d);
            }
        }
        for link in &mut self.pipes {
            while let Some(d) = link[0].pop(now) {
                b.port.deliver(d);
            }
            while let Some(d) = link[1].pop(now) {
                a.port.deliver(d);
            }
        }
    }
}

/// Runs until `until` of virtual time, A keeping `credits` messages in flight
/// to B while `feed(now)` says so; `at(now, net, a)` may change the links.
#[allow(clippy::too_many_arguments)]
fn run(
    clock: &SimClock,
    net: &mut Net,
    a: &mut Node,
    b: &mut Node,
    credits: u64,
    until: Duration,
    feed: &dyn Fn(Duration) -> bool,
    at: &mut dyn FnMut(Duration, &mut Net, &mut Node),
) {
    run_paused(clock, net, a, b, credits, until, feed, at, &|_| [false; 2]);
}

/// [`run`], with A and B each not running while `paused(now)` says so (a
/// process the scheduler does not run: its datagrams wait in its socket).
#[allow(clippy::too_many_arguments)]
fn run_paused(
    clock: &SimClock,
    net: &mut Net,
    a: &mut Node,
    b: &mut Node,
    credits: u64,
    until: Duration,
    feed: &dyn Fn(Duration) -> bool,
    at: &mut dyn FnMut(Duration, &mut Net, &mut Node),
    paused: &dyn Fn(Duration) -> [bool; 2],
) {
    while clock.elapsed() < until {
        let now = clock.elapsed();
        let [a_paused, b_paused] = paused(now);
        at(now, net, a);
        if !a_paused {
            if feed(now) {
                while a.in_flight < credits.min(SLOTS) {
                    a.send(B[0]);
                }
            }
            a.step();
        }
        if !b_paused {
            b.step();
        }
        net.carry(now, a, b);
        clock.advance_to(clock.now() + STEP);
    }
}

fn assert_once(a: &Node, b: &Node) {
    assert_eq!(b.corrupt, 0, "corrupt messages delivered");
    let sent = a.next_seq - 1;
    assert_eq!(a.done.get("ok").copied().unwrap_or(0), sent, "{:?}", a.done);
    assert_eq!(a.in_flight, 0);
    let twice: Vec<_> = b.got.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(b.got.len() as u64, sent, "every message delivered");
}

/// Failover: link 0 dies in both directions mid-transfer and returns 4 s
/// later. Traffic moves to link 1 within 2 RTT of the silence, goodput
/// through the outage stays near link 1's rate, and new messages go back to
/// link 0 once it answers again. Every message completes `Ok` once and is
/// delivered once, intact.
#[test]
fn failover_moves_within_two_rtt_and_back_and_delivers_each_message_once() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Failover), &clock);
    let mut b = node(B, A, Some(Policy::Failover), &clock);
    // 100 Mbit/s, 100 ms one way (RTT 200 ms) each.
    let mut net = Net::new([(100.0, 100), (100.0, 100)]);
    let (down, back) = (Duration::from_secs(3), Duration::from_secs(7));
    let mut marks: BTreeMap<&str, (u64, Vec<LinkStats>)> = BTreeMap::new();
    let mut t_switch = None;
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        32,
        Duration::from_secs(14),
        &|now| now < Duration::from_secs(11),
        &mut |now, net, a| {
            let mark = |name, a: &mut Node, m: &mut BTreeMap<&str, _>| {
                if !m.contains_key(name) {
                    let l = a.links(B[0]);
                    m.insert(name, (a.ok_bytes, l));
                }
            };
            if now >= down && net.pipes[0][0].up && now < back {
                net.pipes[0][0].up = false;
                net.pipes[0][1].up = false;
                mark("down", a, &mut marks);
            }
            if now >= down
                && t_switch.is_none()
                && now.as_micros() % 1000 == 0
                && a.links(B[0])[0].state == "down"
            {
                t_switch = Some(now - down);
            }
            if now >= down + Duration::from_millis(1000) {
                mark("outage+1s", a, &mut marks);
            }
            if now >= back - Duration::from_millis(1) {
                mark("outage end", a, &mut marks);
            }
            if now >= back && !net.pipes[0][0].up {
                net.pipes[0][0].up = true;
                net.pipes[0][1].up = true;
            }
            if now >= back + Duration::from_secs(2) {
                mark("back+2s", a, &mut marks);
            }
        },
    );
    assert_once(&a, &b);
    let links = a.links(B[0]);
    eprintln!("links at the end: {links:#?}");
    let rtt = 200_000u64;
    // The move: detected by the silence rule and done at once.
    let sw = links[0].max_switch_us;
    assert!(links[0].downs >= 1, "link 0 never went down");
    assert!(
        sw > 0 && sw <= 2 * rtt,
        "switch after {sw} µs of silence (RTT {rtt} µs)"
    );
    // From the cut: A still hears for one one-way delay (the answers already
    // on the way back), then the silence of at most 2 RTT.
    let seen = t_switch.expect("link 0 seen down");
    assert!(
        seen <= Duration::from_micros(2 * rtt + rtt / 2),
        "link 0 down {seen:?} after the outage began"
    );
    assert!(links[0].msgs_moved_off > 0, "nothing moved off link 0");
    // Goodput from 1 s into the outage to its end, against link 1's rate.
    let (b1, _) = &marks["outage+1s"];
    let (b2, l2) = &marks["outage end"];
    let secs = (back - down - Duration::from_secs(1)).as_secs_f64();
    let goodput = (b2 - b1) as f64 * 8.0 / secs / 1e6;
    let payload_rate = 100.0 * 1456.0 / 1500.0;
    eprintln!(
        "failover: switch {sw} µs after the last datagram (seen {seen:?} after the cut), \
         goodput through the outage {goodput:.1} Mbit/s of {payload_rate:.1}"
    );
    assert!(
        goodput >= 0.9 * payload_rate,
        "{goodput:.1} Mbit/s through the outage"
    );
    // Back: link 0 up again and carrying new messages.
    let (_, l3) = &marks["back+2s"];
    assert_eq!(l3[0].state, "up", "{l3:#?}");
    assert!(
        links[0].msgs_acked > l2[0].msgs_acked,
        "no message on link 0 after it returned"
    );
    assert!(l3[0].ups >= 2);
}

/// The reverse path of link 0 dies: B receives everything A sends on it, A
/// hears nothing and sends the same messages again on link 1. B delivers each
/// message once and drops the second copies; A completes each once.
#[test]
fn a_message_resent_on_another_link_is_delivered_once() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Failover), &clock);
    let mut b = node(B, A, Some(Policy::Failover), &clock);
    let mut net = Net::new([(100.0, 20), (100.0, 20)]);
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        16,
        Duration::from_secs(6),
        &|now| now < Duration::from_secs(3),
        &mut |now, net, _| {
            net.pipes[0][1].up = !(Duration::from_secs(1)..Duration::from_secs(2)).contains(&now);
        },
    );
    assert_once(&a, &b);
    let dups = b.drops("rx_dup_message");
    eprintln!("reverse-path outage: {dups} second copies dropped by B");
    assert!(dups > 0, "no message went twice: the test tested nothing");
    assert_eq!(b.drops("rx_ml_unframed"), 0);
}

/// Balance over a 100 and a 50 Mbit/s link: the aggregate is at least 90 % of
/// the sum, each link carries about its share, every message once.
#[test]
fn balance_carries_the_sum_of_two_links() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Balance), &clock);
    let mut b = node(B, A, Some(Policy::Balance), &clock);
    let mut net = Net::new([(100.0, 20), (50.0, 20)]);
    let (from, to) = (Duration::from_secs(2), Duration::from_secs(10));
    let mut marks = [None, None];
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        48,
        Duration::from_secs(12),
        &|now| now < to,
        &mut |now, _, a| {
            for (k, t) in [from, to].into_iter().enumerate() {
                if now >= t && marks[k].is_none() {
                    marks[k] = Some(a.ok_bytes);
                }
            }
        },
    );
    let links = a.links(B[0]);
    eprintln!("links: {links:#?}");
    assert_once(&a, &b);
    let total = links[0].bytes_acked + links[1].bytes_acked;
    let share0 = links[0].bytes_acked as f64 / total as f64;
    assert!((0.55..0.78).contains(&share0), "link 0 carried {share0:.2}");
    let sum = 150.0 * 1456.0 / 1500.0;
    let (b0, b1) = (marks[0].unwrap(), marks[1].unwrap());
    let goodput = (b1 - b0) as f64 * 8.0 / (to - from).as_secs_f64() / 1e6;
    eprintln!(
        "balance: {goodput:.1} Mbit/s from 2 s to 10 s, of {sum:.1} (the links' payload rate); \
         link 0 carried {share0:.2} of the bytes"
    );
    assert!(goodput >= 0.9 * sum, "{goodput:.1} Mbit/s of {sum:.1}");
}

/// Balance on a GEO path (600 ms round trip on both links): before a link's
/// connection has measured its round trip, the silence limit follows the
/// handshake's time, not UDT's assumed 100 ms, so no link is called silent
/// while its first ACK is still on the way, and both links carry their share.
#[test]
fn no_link_goes_down_before_its_first_round_trip_on_a_geo_path() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Balance), &clock);
    let mut b = node(B, A, Some(Policy::Balance), &clock);
    let mut net = Net::new([(100.0, 300), (50.0, 300)]);
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        48,
        Duration::from_secs(16),
        &|now| now < Duration::from_secs(12),
        &mut |_, _, _| {},
    );
    let links = a.links(B[0]);
    eprintln!("links: {links:#?}");
    assert_once(&a, &b);
    for (i, l) in links.iter().enumerate() {
        assert_eq!(
            l.downs, 0,
            "link {i} called silent on a path that never failed"
        );
    }
    let total = links[0].bytes_acked + links[1].bytes_acked;
    let share0 = links[0].bytes_acked as f64 / total as f64;
    assert!((0.5..0.85).contains(&share0), "link 0 carried {share0:.2}");
}

/// Balance on a GEO path with messages handed before any link answered: they
/// spread over the connecting links by weight (equal here), so the second link
/// has work from its first round trip rather than from the first link's first
/// completion (a round trip and more later).
#[test]
fn balance_spreads_messages_handed_before_the_links_connect() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Balance), &clock);
    let mut b = node(B, A, Some(Policy::Balance), &clock);
    let mut net = Net::new([(100.0, 300), (50.0, 300)]);
    let mut early: Option<Vec<LinkStats>> = None;
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        30,
        Duration::from_secs(10),
        &|now| now < Duration::from_secs(4),
        &mut |now, _, a| {
            // Half the handshake's round trip: no link is up yet.
            if now >= Duration::from_millis(300) && early.is_none() {
                early = Some(a.links(B[0]));
            }
        },
    );
    let early = early.unwrap();
    eprintln!("links at 0.3 s: {early:#?}");
    assert!(early.iter().all(|l| l.state == "connecting"), "{early:#?}");
    let (q0, q1) = (early[0].in_flight, early[1].in_flight);
    assert_eq!(q0 + q1, 30, "every message placed");
    assert!(
        (14..=16).contains(&q0) && (14..=16).contains(&q1),
        "placed {q0} + {q1} by equal weights"
    );
    let links = a.links(B[0]);
    assert_once(&a, &b);
    for (i, l) in links.iter().enumerate() {
        assert_eq!(l.downs, 0, "link {i} called silent: {links:#?}");
        assert!(l.bytes_acked > 0, "link {i} carried nothing: {links:#?}");
    }
}

/// Balance with link 1 dead from the start (no handshake ever answered): the
/// messages placed on it before any link was up move to link 0 once link 0 has
/// been up a little longer than its own handshake took, not at link 1's
/// connect timeout; every message completes once.
#[test]
fn messages_on_a_link_that_never_connects_move_to_the_link_that_did() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Balance), &clock);
    let mut b = node(B, A, Some(Policy::Balance), &clock);
    let mut net = Net::new([(100.0, 20), (100.0, 20)]);
    for dir in 0..2 {
        net.pipes[1][dir].up = false;
    }
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        16,
        Duration::from_secs(6),
        &|now| now < Duration::from_secs(2),
        &mut |_, _, _| {},
    );
    let links = a.links(B[0]);
    eprintln!("links: {links:#?}");
    assert_once(&a, &b);
    assert!(
        links[1].msgs_moved_off > 0,
        "nothing was placed on link 1: {links:#?}"
    );
    assert_eq!(links[1].msgs_acked, 0);
}

/// A peer without links keeps UDT4's wire: no extension, one connection.
#[test]
fn a_single_link_peer_keeps_the_udt4_wire() {
    let clock = SimClock::new();
    // A knows B as multi-link only under another NID: B itself is plain.
    let mut a = node(A, B, None, &clock);
    let mut b = node(B, A, None, &clock);
    let mut net = Net::new([(100.0, 5), (100.0, 5)]);
    let mut ext_seen = 0;
    for _ in 0..4 {
        a.send(B[0]);
    }
    for _ in 0..20_000 {
        a.step();
        b.step();
        for d in a.port.take_sent() {
            if d.bytes.windows(4).any(|w| w == b"LuML") {
                ext_seen += 1;
            }
            net.pipes[0][0].push(clock.elapsed(), d);
        }
        for d in b.port.take_sent() {
            net.pipes[0][1].push(clock.elapsed(), d);
        }
        while let Some(d) = net.pipes[0][0].pop(clock.elapsed()) {
            b.port.deliver(d);
        }
        while let Some(d) = net.pipes[0][1].pop(clock.elapsed()) {
            a.port.deliver(d);
        }
        clock.advance_to(clock.now() + STEP);
    }
    assert_once(&a, &b);
    assert_eq!(ext_seen, 0);
    assert!(a.links(B[0]).is_empty());
}

/// Link 0 fails and returns ten times: every return it is dialled again and
/// carries again, B closes the connections each failover left behind (the
/// per-address cap never refuses the link's next one), and every message
/// still arrives once.
#[test]
fn a_flapping_link_reconnects_every_time() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Failover), &clock);
    let mut b = node(B, A, Some(Policy::Failover), &clock);
    let mut net = Net::new([(100.0, 20), (100.0, 20)]);
    run(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        16,
        Duration::from_secs(33),
        &|now| now < Duration::from_secs(31),
        &mut |now, net, _| {
            // Down for 1 s of every 3 s from 1 s on, ten times.
            let t = now.as_millis();
            let up = !(1000..31_000).contains(&t) || (t - 1000) % 3000 >= 1000;
            net.pipes[0][0].up = up;
            net.pipes[0][1].up = up;
        },
    );
    assert_once(&a, &b);
    let links = a.links(B[0]);
    eprintln!(
        "flapping: link 0 downs {} ups {}; B closed {} abandoned connections",
        links[0].downs,
        links[0].ups,
        b.drops("rx_ml_abandoned")
    );
    assert!(links[0].downs >= 10, "{links:#?}");
    assert!(links[0].ups >= 11, "{links:#?}");
    assert_eq!(b.drops("rx_conn_limit_addr"), 0);
    assert!(b.drops("rx_ml_abandoned") >= 4);
}

/// Balance over two short links (1 ms one way, 100 and 50 Mbit/s: the netns
/// test's) while the scheduler stops each side now and then for longer than a
/// link's silence floor (B 200 ms of every 700, A 150 ms of every 1100), as on
/// a loaded gateway: no answer arrives while a side is stopped, yet no link
/// failed. The transfer goes on, each message delivered once.
#[test]
fn scheduler_stalls_do_not_stop_a_balanced_transfer() {
    let clock = SimClock::new();
    let mut a = node(A, B, Some(Policy::Balance), &clock);
    let mut b = node(B, A, Some(Policy::Balance), &clock);
    let mut net = Net::new([(100.0, 1), (50.0, 1)]);
    let ms = |t: Duration| t.as_millis() as u64;
    run_paused(
        &clock,
        &mut net,
        &mut a,
        &mut b,
        64,
        Duration::from_secs(20),
        &|now| now < Duration::from_secs(15),
        &mut |_, _, _| {},
        &|now| [ms(now) % 1100 >= 950, ms(now) % 700 >= 500],
    );
    let links = a.links(B[0]);
    eprintln!("links: {links:#?}");
    assert_once(&a, &b);
    for (i, l) in links.iter().enumerate() {
        // A link called silent here restarts its messages on the other one,
        // which went quiet in the same stall.
        assert_eq!(l.downs, 0, "link {i} called silent: {links:#?}");
        assert_eq!(l.msgs_moved_off, 0, "link {i}: {links:#?}");
        assert!(l.msgs_acked > 0, "link {i} carried nothing: {links:#?}");
    }
}
