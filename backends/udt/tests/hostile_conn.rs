//! A connection under forged control packets (issue 14, item 3), on
//! virtual time: two endpoints over a lossless link with a fixed delay, and
//! an attacker who has sniffed the connection (its socket IDs and sequence
//! numbers) and injects packets built with `lu2k_udt::wire`. Each test
//! checks that the forged packet's effect is bounded and that the transfer
//! still completes, every message delivered once and intact.

use std::collections::{BTreeMap, HashMap};

use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, Config, Connection, Event, Extent, Listener, ListenerOutput,
};
use lu2k_udt::seq::{AckNo, MsgNo, SeqNo};
use lu2k_udt::wire::{AckRates, AckStats, ControlRepr, DataHeader, NakList, Packet, Position};

const CLIENT: &str = "192.0.2.1:7000";
const SERVER: &str = "192.0.2.2:9000";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    ToServer,
    ToClient,
}

fn pattern(msg: u64, off: u64) -> u8 {
    (msg.wrapping_mul(29) ^ off.wrapping_mul(11) ^ (off >> 10)) as u8
}

/// A data packet the attacker saw on its way to the server.
#[derive(Clone, Copy, Debug)]
struct Seen {
    seq: SeqNo,
    msg_no: MsgNo,
    pos: Position,
}

/// Decides per datagram whether the link loses it.
type LossFn = Box<dyn FnMut(u64, Dir, &[u8]) -> bool>;

/// Two endpoints and a link with a fixed one-way delay; the client sends,
/// the server receives.
struct Pair {
    now: u64,
    delay: u64,
    client: Connection,
    listener: Listener,
    server: Option<Box<Connection>>,
    wire: BTreeMap<(u64, u64), (Dir, Vec<u8>)>,
    seq: u64,
    bufs: HashMap<u64, Vec<u8>>,
    next_buf: u64,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    msg_lens: HashMap<u64, u64>,
    drop: LossFn,
    /// Every data packet sent to the server, in order of sending.
    seen: Vec<Seen>,
}

impl Pair {
    fn new(cfg: Config, delay: u64, seed: u64) -> Pair {
        let client = Connection::connect(0, cfg.clone(), seed, SERVER.parse().unwrap());
        let listener = Listener::new(0, cfg, seed ^ 0x5A5A);
        Pair {
            now: 0,
            delay,
            client,
            listener,
            server: None,
            wire: BTreeMap::new(),
            seq: 0,
            bufs: HashMap::new(),
            next_buf: 1,
            client_events: Vec::new(),
            server_events: Vec::new(),
            msg_lens: HashMap::new(),
            drop: Box::new(|_, _, _| false),
            seen: Vec::new(),
        }
    }

    fn push(&mut self, dir: Dir, bytes: Vec<u8>) {
        if dir == Dir::ToServer {
            if let Ok(h) = DataHeader::parse(&Packet::new_unchecked(&bytes[..])) {
                self.seen.push(Seen {
                    seq: h.seq_no,
                    msg_no: h.msg_no,
                    pos: h.position,
                });
            }
        }
        if (self.drop)(self.now, dir, &bytes) {
            return;
        }
        self.seq += 1;
        self.wire
            .insert((self.now + self.delay, self.seq), (dir, bytes));
    }

    fn flush(&mut self) {
        while let Some(t) = self.client.poll_transmit(self.now) {
            let mut v = t.header.as_bytes().to_vec();
            if let Some(p) = t.payload {
                v.extend((0..u64::from(p.len)).map(|k| pattern(p.msg, u64::from(p.offset) + k)));
            }
            self.push(Dir::ToServer, v);
        }
        if let Some(s) = self.server.as_mut() {
            let mut out = Vec::new();
            while let Some(t) = s.poll_transmit(self.now) {
                assert!(t.payload.is_none(), "the server sends no data");
                out.push(t.header.as_bytes().to_vec());
            }
            for v in out {
                self.push(Dir::ToClient, v);
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push(e);
        }
        if let Some(s) = self.server.as_mut() {
            while let Some(e) = s.poll_event() {
                self.server_events.push(e);
            }
            while let Some(ext) = s.poll_release() {
                assert!(
                    self.bufs.remove(&ext.buf).is_some(),
                    "release of unknown {ext:?}"
                );
            }
        }
    }

    fn deliver(&mut self, dir: Dir, bytes: Vec<u8>) {
        match dir {
            Dir::ToClient => self.inject_client(&bytes),
            Dir::ToServer => {
                let known = self.server.as_ref().is_some_and(|s| {
                    u32::from_be_bytes(bytes[12..16].try_into().unwrap()) == s.socket_id()
                        || handshake_socket_id(&bytes) == Some(s.peer_socket_id())
                });
                if known {
                    self.inject_server(bytes);
                } else {
                    match self
                        .listener
                        .handle(self.now, CLIENT.parse().unwrap(), &bytes)
                    {
                        ListenerOutput::Reply(h) => self.push(Dir::ToClient, h.as_bytes().to_vec()),
                        ListenerOutput::Accept(c) => self.server = Some(c),
                        ListenerOutput::Drop(_) => {}
                    }
                }
            }
        }
    }

    /// Hands a datagram to the client now (a forged one, or from the link).
    fn inject_client(&mut self, bytes: &[u8]) {
        let at = Extent {
            buf: 0,
            offset: 0,
            len: bytes.len() as u32,
        };
        assert!(
            !self.client.handle_datagram(self.now, bytes, at),
            "client kept a payload"
        );
    }

    /// Hands a datagram to the server now (a forged one, or from the link).
    fn inject_server(&mut self, bytes: Vec<u8>) {
        let id = self.next_buf;
        self.next_buf += 1;
        let at = Extent {
            buf: id,
            offset: 0,
            len: bytes.len() as u32,
        };
        if self
            .server
            .as_mut()
            .unwrap()
            .handle_datagram(self.now, &bytes, at)
        {
            self.bufs.insert(id, bytes);
        }
    }

    fn run(&mut self, until: u64, mut stop: impl FnMut(&Pair) -> bool) {
        loop {
            self.flush();
            if stop(self) {
                return;
            }
            let mut next = self.client.poll_timeout().unwrap_or(u64::MAX);
            if let Some(s) = &self.server {
                next = next.min(s.poll_timeout().unwrap_or(u64::MAX));
            }
            if let Some((&(t, _), _)) = self.wire.iter().next() {
                next = next.min(t);
            }
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            while let Some(entry) = self.wire.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (dir, bytes) = entry.remove();
                self.deliver(dir, bytes);
            }
            if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
                self.client.handle_timeout(self.now);
            }
            if let Some(s) = self.server.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= self.now) {
                    s.handle_timeout(self.now);
                }
            }
        }
    }

    fn connect(&mut self) {
        self.run(5_000_000, |p| p.client.is_connected() && p.server.is_some());
        assert!(self.client.is_connected(), "client did not connect");
        assert!(self.server.as_ref().unwrap().is_connected());
    }

    fn send(&mut self, msg: u64, len: u64) {
        self.client.send(self.now, msg, len, None).unwrap();
        self.msg_lens.insert(msg, len);
    }

    fn acked(&self) -> usize {
        self.client_events
            .iter()
            .filter(|e| matches!(e, Event::MessageAcked { .. }))
            .count()
    }

    fn server_id(&self) -> u32 {
        self.server.as_ref().unwrap().socket_id()
    }

    /// Checks every delivered message byte for byte; returns how many, and
    /// fails on a duplicate.
    fn check_received(&mut self) -> usize {
        let mut got = Vec::new();
        for e in std::mem::take(&mut self.server_events) {
            if let Event::MessageReceived { extents, .. } = e {
                let mut bytes = Vec::new();
                for ext in &extents {
                    let b = self.bufs.remove(&ext.buf).expect("extent of a held buffer");
                    bytes.extend_from_slice(
                        &b[ext.offset as usize..(ext.offset + ext.len) as usize],
                    );
                }
                let msg = self
                    .msg_lens
                    .iter()
                    .find(|(&m, &l)| {
                        l == bytes.len() as u64 && bytes.first() == Some(&pattern(m, 0))
                    })
                    .map(|(&m, _)| m)
                    .expect("a message of a registered length");
                for (k, &b) in bytes.iter().enumerate() {
                    assert_eq!(b, pattern(msg, k as u64), "msg {msg} byte {k}");
                }
                assert!(!got.contains(&msg), "msg {msg} delivered twice");
                got.push(msg);
            }
        }
        got.len()
    }
}

fn cfg() -> Config {
    Config {
        cc: Kind::Satellite,
        bdp_bandwidth_bps: 100_000_000,
        bdp_rtt_us: 100_000,
        ..Config::default()
    }
}

/// A NAK of ~8000 ranges, each naming the whole flight, costs work bounded
/// by the per-datagram range cap plus the flight, not ranges × flight.
#[test]
fn nak_of_overlapping_whole_flight_ranges_costs_bounded_work() {
    let mut p = Pair::new(cfg(), 20_000, 11);
    p.connect();
    for m in 0..4 {
        p.send(m, 1 << 20);
    }
    // Until a few hundred packets are in flight.
    p.run(p.now + 60_000, |_| false);
    let first = p.seen.first().unwrap().seq;
    let last = p.seen.last().unwrap().seq;
    let flight = u64::from(first.len_to(last));
    assert!(flight > 200, "only {flight} packets sent");
    let ranges = vec![(first, last); 8000];
    let mut buf = vec![0u8; 8000 * 8];
    let nak = NakList::encode(ranges, &mut buf);
    assert_eq!(nak.ranges().count(), 8000);
    let forged = ControlRepr::Nak { loss: nak }.to_vec(0, p.client.socket_id());
    assert!(forged.len() <= 65_507, "one UDP datagram");
    let before = p.client.stats();
    p.inject_client(&forged);
    let after = p.client.stats();
    let work = after.nak_work - before.nak_work;
    assert!(
        work <= 1024 + flight + 1,
        "a NAK of 8000 ranges over {flight} packets cost {work} steps"
    );
    assert_eq!(
        after.nak_ranges_ignored - before.nak_ranges_ignored,
        8000 - 1024
    );
    assert_eq!(
        after.dropped_bad_loss_report,
        before.dropped_bad_loss_report
    );
    p.run(p.now + 30_000_000, |p| p.acked() == 4);
    assert_eq!(p.acked(), 4, "{}", p.client.debug_summary());
    assert_eq!(p.check_received(), 4);
    assert!(p.bufs.is_empty());
}

/// An ACK with absurd RTT, window and rates (RTT u32::MAX would push the
/// retransmission timer out by about 80 minutes) is clamped: after a lost
/// flight, the retransmission still comes within the EXP bound (half the
/// idle timeout), and the transfer completes.
#[test]
fn ack_with_absurd_values_is_clamped() {
    let mut p = Pair::new(cfg(), 20_000, 12);
    p.connect();
    p.send(0, 200_000);
    p.run(p.now + 10_000_000, |p| p.acked() == 1);
    assert_eq!(p.acked(), 1);
    // Everything is acknowledged: the forged ACK names the next packet.
    let next = p.seen.last().unwrap().seq.add(1);
    let forged = ControlRepr::Ack {
        ack_seq_no: AckNo::new(77),
        last: next,
        stats: Some(AckStats {
            rtt: u32::MAX,
            rtt_var: u32::MAX,
            avail_buf: u32::MAX,
            rates: Some(AckRates {
                recv_rate: u32::MAX,
                link_capacity: u32::MAX,
            }),
        }),
    }
    .to_vec(0, p.client.socket_id());
    for _ in 0..3 {
        p.inject_client(&forged);
    }
    let st = p.client.stats();
    assert!(st.rtt_us <= 60_000_000, "RTT {} us", st.rtt_us);
    assert!(st.flow_window <= 1 << 20, "flow window {}", st.flow_window);
    // The next message's first flight is lost whole: only the EXP timer
    // can resend it.
    let t0 = p.now;
    p.drop = Box::new(move |now, dir, _| dir == Dir::ToServer && now < t0 + 500_000);
    p.send(1, 200_000);
    // The EXP interval is capped at half the idle timeout (5 s here), so
    // the peer never idles out meanwhile.
    p.run(t0 + 65_000_000, |p| p.client.stats().timeouts > 0);
    let exp_at = p.now - t0;
    assert!(
        exp_at <= 5_000_000 + 100_000,
        "retransmission timer fired after {exp_at} us"
    );
    p.run(t0 + 65_000_000, |p| p.acked() == 2);
    assert_eq!(
        p.acked(),
        2,
        "at {} us: {}\n{:?}\nserver {}\n{:?}",
        p.now - t0,
        p.client.debug_summary(),
        p.client.stats(),
        p.server.as_ref().unwrap().debug_summary(),
        p.server.as_ref().unwrap().stats()
    );
    assert!(p.client.stats().timeouts > 0);
    assert_eq!(p.check_received(), 2);
    assert!(p.bufs.is_empty());
}

/// A forged message drop request for packets not yet received (ahead of
/// the receiver, within its window) changes nothing: the receiver must not
/// move past slots whose real packets are still to come, or it would discard
/// them and the transfer would hang.
#[test]
fn drop_request_ahead_of_the_receiver_is_cut_to_what_arrived() {
    let mut p = Pair::new(cfg(), 20_000, 13);
    p.connect();
    p.send(0, 1_000);
    p.run(p.now + 10_000_000, |p| p.acked() == 1);
    assert_eq!(p.acked(), 1);
    let last = *p.seen.last().unwrap();
    let (next, msg_no) = (last.seq.add(1), MsgNo::new(last.msg_no.get() + 1));
    let forged = ControlRepr::MsgDropReq {
        msg_no,
        first: next,
        last: next.add(100),
    }
    .to_vec(0, p.server_id());
    p.inject_server(forged);
    let s = p.server.as_ref().unwrap().stats();
    assert_eq!(s.drop_reqs_received, 1);
    // Far beyond what the sender may have sent: refused and counted.
    let forged = ControlRepr::MsgDropReq {
        msg_no,
        first: next,
        last: next.add(1 << 21),
    }
    .to_vec(0, p.server_id());
    p.inject_server(forged);
    let s = p.server.as_ref().unwrap().stats();
    assert_eq!(s.dropped_bad_loss_report, 1);
    p.send(1, 100_000);
    p.send(2, 50_000);
    p.run(p.now + 10_000_000, |p| p.acked() == 3);
    assert_eq!(
        p.acked(),
        3,
        "{}",
        p.server.as_ref().unwrap().debug_summary()
    );
    assert_eq!(p.check_received(), 3);
    assert!(p.bufs.is_empty());
}

/// A forged drop request naming a hole and the received packets of another
/// message behind it is refused: honouring it would skip the hole, hand the
/// rest of the message back as broken and acknowledge it, telling the sender
/// that a message arrived that never did.
#[test]
fn drop_request_naming_another_messages_data_is_refused() {
    let mut p = Pair::new(cfg(), 20_000, 14);
    p.connect();
    p.send(0, 1_000);
    p.run(p.now + 10_000_000, |p| p.acked() == 1);
    // The first packet of the next message is lost (once).
    let first = p.seen.last().unwrap().seq.add(1);
    let mut lost = false;
    p.drop = Box::new(move |_, dir, b| {
        let hit = dir == Dir::ToServer
            && !lost
            && DataHeader::parse(&Packet::new_unchecked(b)).is_ok_and(|h| h.seq_no == first);
        lost |= hit;
        hit
    });
    p.send(1, 20_000);
    // Until the rest of it has arrived, before the retransmission.
    p.run(p.now + 25_000, |_| false);
    let n = p
        .seen
        .iter()
        .filter(|s| s.msg_no == p.seen.last().unwrap().msg_no)
        .count();
    assert!(n > 5, "{n} packets of the message sent");
    let real = p.seen.last().unwrap();
    assert!(real.pos.is_last(), "the whole message was sent");
    let forged = ControlRepr::MsgDropReq {
        msg_no: MsgNo::new(real.msg_no.get() + 7),
        first,
        last: first.add(3),
    }
    .to_vec(0, p.server_id());
    p.inject_server(forged);
    let s = p.server.as_ref().unwrap().stats();
    assert_eq!(s.drop_reqs_received, 1);
    assert_eq!(s.dropped_bad_loss_report, 1);
    p.run(p.now + 10_000_000, |p| p.acked() == 2);
    assert_eq!(p.acked(), 2);
    assert_eq!(
        p.check_received(),
        2,
        "the message the sender was told of arrived"
    );
    assert!(p.bufs.is_empty());
}
