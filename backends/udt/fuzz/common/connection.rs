//! The connection fuzz check, shared by the cargo-fuzz target
//! `fuzz_targets/connection.rs` and the stable property test
//! `tests/wire_fuzz_conn.rs`.
//!
//! Two connections (a client and one accepted by a [`Listener`]) complete a
//! real handshake in memory and start sending to each other; then the input
//! drives a script of operations: hostile datagrams to either side (raw, or
//! with the destination socket ID patched so they get past the first
//! check), honest exchanges, and time jumps. Checked on every step: no
//! panic; every transmit is a well-formed UDT packet whose payload reference
//! lies inside a registered message; every received buffer region the
//! connection keeps is given back exactly once (in a delivery or through
//! `poll_release`) and never one it did not keep.

use lu2k_udt::conn::{Config, Connection, Event, Extent, Listener, ListenerOutput, Mode};
use lu2k_udt::wire::{ControlRepr, DataHeader, Packet};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

struct Side {
    conn: Connection,
    /// Messages this side registered: id -> length.
    sent: HashMap<u64, u64>,
    /// Buffer ids the connection kept and has not given back.
    kept: HashSet<u64>,
    /// Messages of this side the peer acknowledged.
    acked: usize,
    /// Messages of this side dropped (TTL or close).
    dropped: usize,
    /// Messages (or stream chunks) this side delivered.
    delivered: usize,
}

/// What a script achieved, for tests that run honest scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Per side: its messages the peer acknowledged before the close.
    pub acked: [usize; 2],
    /// Per side: its messages dropped (the one with a 50 ms TTL may be).
    pub dropped: [usize; 2],
    /// Per side: messages or stream chunks it delivered.
    pub delivered: [usize; 2],
}

struct World {
    now: u64,
    next_buf: u64,
    sides: [Side; 2],
}

fn check_transmit(bytes: &[u8], payload: Option<(u64, u32, u32)>, sent: &HashMap<u64, u64>) {
    let p = Packet::new_checked(bytes).expect("transmit shorter than a UDT header");
    if p.is_control() {
        ControlRepr::parse(&p).expect("connection emitted a malformed control packet");
        assert!(payload.is_none(), "control packet with a payload reference");
    } else {
        DataHeader::parse(&p).expect("data header");
        let (msg, off, len) = payload.expect("data packet without payload");
        let mlen = sent.get(&msg).copied().unwrap_or_else(|| {
            panic!("payload reference to unknown message {msg}");
        });
        assert!(len > 0, "empty payload reference");
        assert!(
            u64::from(off) + u64::from(len) <= mlen,
            "payload reference outside message"
        );
    }
}

impl World {
    /// Delivers `bytes` to side `to` as a datagram from the other side.
    fn deliver(&mut self, to: usize, bytes: &[u8]) {
        let id = self.next_buf;
        self.next_buf += 1;
        let at = Extent {
            buf: id,
            offset: 0,
            len: bytes.len() as u32,
        };
        let s = &mut self.sides[to];
        if s.conn.handle_datagram(self.now, bytes, at) {
            s.kept.insert(id);
        }
        self.drain(to);
    }

    fn give_back(s: &mut Side, e: &Extent) {
        assert!(
            s.kept.remove(&e.buf),
            "region of buffer {} given back twice or never kept",
            e.buf
        );
    }

    fn drain(&mut self, i: usize) {
        let s = &mut self.sides[i];
        while let Some(e) = s.conn.poll_release() {
            Self::give_back(s, &e);
        }
        while let Some(ev) = s.conn.poll_event() {
            match ev {
                Event::MessageReceived { extents, .. } => {
                    for e in &extents {
                        Self::give_back(s, e);
                    }
                    s.delivered += 1;
                }
                Event::StreamData(e) => {
                    Self::give_back(s, &e);
                    s.delivered += 1;
                }
                Event::MessageAcked { msg } => {
                    s.acked += 1;
                    assert!(
                        s.sent.remove(&msg).is_some(),
                        "completion for unknown message {msg}"
                    );
                }
                Event::MessageDropped { msg, .. } => {
                    s.dropped += 1;
                    assert!(
                        s.sent.remove(&msg).is_some(),
                        "completion for unknown message {msg}"
                    );
                }
                Event::Connected | Event::Closed { .. } => {}
            }
        }
        assert_eq!(
            s.conn.held(),
            s.kept.len(),
            "held() disagrees with the regions kept"
        );
    }

    /// Moves what side `from` wants to send to the other side (up to `max`).
    fn exchange(&mut self, from: usize, max: usize, drop_every: usize) {
        let mut out = Vec::new();
        for k in 0..max {
            let Some(t) = self.sides[from].conn.poll_transmit(self.now) else {
                break;
            };
            let payload = t.payload.map(|p| (p.msg, p.offset, p.len));
            check_transmit(t.header.as_bytes(), payload, &self.sides[from].sent);
            if drop_every > 0 && k % drop_every == drop_every - 1 {
                continue;
            }
            out.clear();
            out.extend_from_slice(t.header.as_bytes());
            if let Some(p) = t.payload {
                out.resize(out.len() + p.len as usize, 0xAB);
            }
            let bytes = out.clone();
            self.deliver(1 - from, &bytes);
        }
        self.drain(from);
    }

    fn tick(&mut self, dt: u64) {
        self.now += dt;
        for i in 0..2 {
            let s = &mut self.sides[i];
            if s.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                s.conn.handle_timeout(self.now);
            }
            self.drain(i);
        }
    }
}

fn setup(mode: Mode) -> World {
    let cfg = Config {
        mode,
        bdp_bandwidth_bps: 100_000_000,
        bdp_rtt_us: 10_000,
        ..Config::default()
    };
    let a: SocketAddr = "10.0.0.1:9000".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let mut client = Connection::connect(0, cfg.clone(), 1, b);
    let mut listener = Listener::new(0, cfg, 2);
    let mut server = None;
    for _ in 0..4 {
        while let Some(t) = client.poll_transmit(0) {
            let bytes = t.header.as_bytes().to_vec();
            match listener.handle(0, a, &bytes) {
                ListenerOutput::Reply(h) => {
                    let _ = client.handle_datagram(
                        0,
                        h.as_bytes(),
                        Extent {
                            buf: u64::MAX,
                            offset: 0,
                            len: 0,
                        },
                    );
                }
                ListenerOutput::Accept(c) => server = Some(*c),
                ListenerOutput::Drop(c) => panic!("listener dropped the handshake: {c:?}"),
            }
        }
        if server.is_some() {
            break;
        }
    }
    let server = server.expect("handshake completed");
    let mut w = World {
        now: 0,
        next_buf: 0,
        sides: [
            Side {
                conn: client,
                sent: HashMap::new(),
                kept: HashSet::new(),
                acked: 0,
                dropped: 0,
                delivered: 0,
            },
            Side {
                conn: server,
                sent: HashMap::new(),
                kept: HashSet::new(),
                acked: 0,
                dropped: 0,
                delivered: 0,
            },
        ],
    };
    w.exchange(1, 8, 0); // the server's response
    for i in 0..2 {
        assert!(w.sides[i].conn.is_connected(), "side {i} not connected");
        for m in 0..4u64 {
            let len = 1 + m * 7000;
            w.sides[i]
                .conn
                .send(w.now, m, len, if m == 3 { Some(50_000) } else { None })
                .unwrap();
            w.sides[i].sent.insert(m, len);
        }
    }
    w
}

/// Runs the script in `data`. Never panics unless the connection misbehaves.
pub fn run(data: &[u8]) -> Outcome {
    let mode = if data.first().is_some_and(|b| b & 1 == 1) {
        Mode::Stream
    } else {
        Mode::Message
    };
    let mut w = setup(mode);
    let mut rest = data.get(1..).unwrap_or(&[]);
    while let [op, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (arg, next) = tail.split_at(len);
        rest = next;
        let to = usize::from(op & 1);
        match (op >> 1) & 3 {
            0 => {
                // A hostile datagram, raw.
                w.deliver(to, arg);
            }
            1 => {
                // A hostile datagram addressed correctly: it passes the
                // socket-ID check and reaches the state machine.
                let mut v = arg.to_vec();
                if v.len() >= 16 {
                    let id = w.sides[to].conn.socket_id();
                    v[12..16].copy_from_slice(&id.to_be_bytes());
                }
                w.deliver(to, &v);
            }
            2 => {
                // Honest traffic, with every k-th datagram lost.
                let drop_every = usize::from(arg.first().copied().unwrap_or(0) % 5);
                w.exchange(to, 64, drop_every);
            }
            _ => {
                let dt = arg.iter().take(3).fold(0u64, |a, &b| a << 8 | u64::from(b));
                w.tick(dt);
            }
        }
    }
    let outcome = Outcome {
        acked: [w.sides[0].acked, w.sides[1].acked],
        dropped: [w.sides[0].dropped, w.sides[1].dropped],
        delivered: [w.sides[0].delivered, w.sides[1].delivered],
    };
    // Closing gives everything back.
    for i in 0..2 {
        w.sides[i].conn.close(w.now);
        w.drain(i);
        assert!(
            w.sides[i].kept.is_empty(),
            "side {i}: regions not given back after close"
        );
        assert!(
            w.sides[i].sent.is_empty(),
            "side {i}: messages neither acked nor dropped after close"
        );
    }
    outcome
}
