//! A pair of lu2k-udt connections on virtual time through the lu2k-linkem
//! link model, with the invariants every run must keep.
//!
//! The client sends messages to the server. Datagrams cross a seeded
//! [`Duplex`] link; the clock jumps to the next deadline of either
//! connection or the link. Received datagrams land in simulated engine
//! buffers (one per datagram); the simulation checks that
//! - every message is delivered once and intact (content is a deterministic
//!   pattern of (message id, offset), verified byte for byte when
//!   `verify_bytes` is on, and by provenance otherwise), or dropped with the
//!   sender told (TTL);
//! - every buffer the connection retained comes back exactly once (in a
//!   delivery or a release) and none is left when the transfer ends.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;

use lu2k_linkem::{Direction, Duplex, DuplexConfig, Instant};
use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, CloseReason, Config, Connection, DropReason, Event, Extent, Header,
    Listener, ListenerOutput, Mode, PayloadRef,
};

#[derive(Clone)]
pub struct SimPkt {
    header: Header,
    payload: Option<PayloadRef>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub link: DuplexConfig,
    pub cc: Kind,
    pub seed: u64,
    /// Virtual time limit, µs.
    pub duration_us: u64,
    /// Messages to send: `None` = bulk (keep the sender busy until the end).
    pub messages: Option<Vec<u32>>,
    /// Bulk message size.
    pub bulk_size: u32,
    /// TTL per message, µs.
    pub ttl_us: Option<u64>,
    /// Materialize payload bytes and check them.
    pub verify_bytes: bool,
    /// Window sizing.
    pub bdp_bps: u64,
    /// Explicit receive buffer (packets), overriding the BDP sizing.
    pub rcv_buf_pkts: Option<u32>,
    /// Message or stream mode.
    pub mode: Mode,
    pub bdp_rtt_us: u64,
    /// Bin for the time-to-90 % measurement, µs.
    pub bin_us: u64,
    /// A paced schedule (finite transfers): message 0 is queued at connect,
    /// message `i ≥ 1` at `paced[i]` µs after message 0 was acknowledged (a
    /// warm-up message, then a live stream). `None`: all queued at connect.
    pub paced: Option<Vec<u64>>,
}

/// What happened.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub connected_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub delivered_msgs: u64,
    pub delivered_bytes: u64,
    /// Payload bytes of new (not duplicate) data packets the receiver took.
    pub unique_bytes: u64,
    pub dropped_msgs: u64,
    pub acked_msgs: u64,
    /// Payload bytes arriving at the receiver per bin (all data packets).
    pub arrivals: Vec<u64>,
    pub retransmitted: u64,
    pub sent: u64,
    pub violations: Vec<String>,
    pub end_us: u64,
    /// Per message: when it was queued, when it was delivered (µs).
    pub queued_at: Vec<u64>,
    pub delivered_at: Vec<Option<u64>>,
    /// How the client connection ended, if it did.
    pub client_closed: Option<CloseReason>,
    /// EXP expirations at the client.
    pub client_timeouts: u64,
    /// Data packets (first sends and retransmissions) the client put on the
    /// link, per bin.
    pub client_sent: Vec<u64>,
    /// Payload bytes of new (not duplicate) data packets the receiver took,
    /// per bin.
    pub unique: Vec<u64>,
    /// The client's counters at the end.
    pub client_stats: Option<lu2k_udt::conn::Stats>,
}

fn pattern(msg: u64, off: u64) -> u8 {
    (msg.wrapping_mul(131) ^ off.wrapping_mul(7) ^ (off >> 8)) as u8
}

struct Buf {
    origin: PayloadRef,
    bytes: Option<Vec<u8>>,
}

fn to_ns(us: u64) -> Instant {
    Instant::from_nanos(us * 1000)
}

pub fn run(sc: &Scenario) -> Outcome {
    let mut out = Outcome::default();
    let mut link: Duplex<SimPkt> = Duplex::new(sc.link.clone(), sc.seed).expect("link config");
    let cfg = Config {
        cc: sc.cc,
        bdp_bandwidth_bps: sc.bdp_bps,
        rcv_buf_pkts: sc.rcv_buf_pkts,
        mode: sc.mode,
        bdp_rtt_us: sc.bdp_rtt_us,
        ..Config::default()
    };
    let client_addr: SocketAddr = "10.0.0.1:9000".parse().unwrap();
    let server_addr: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let mut client = Connection::connect(0, cfg.clone(), sc.seed ^ 0xC11E, server_addr);
    let mut listener = Listener::new(0, cfg, sc.seed ^ 0x5E4E);
    let mut server: Option<Box<Connection>> = None;

    let mut now: u64 = 0;
    let mut bufs: HashMap<u64, Buf> = HashMap::new();
    let mut next_buf: u64 = 1;
    // Sender-side bookkeeping: message id -> length, state.
    let mut lens: Vec<u32> = Vec::new();
    let mut delivered: Vec<u8> = Vec::new(); // count per id
    let mut dropped: Vec<bool> = Vec::new();
    let mut acked: Vec<bool> = Vec::new();
    let mut queued = 0usize;
    let mut pending = 0usize;
    let finite = sc.messages.clone();
    let mut scratch = vec![0u8; 2048];
    let mut connected = false;
    let bins = (sc.duration_us / sc.bin_us + 1) as usize;
    out.arrivals = vec![0; bins];
    out.client_sent = vec![0; bins];
    out.unique = vec![0; bins];
    // Stream mode: the (message, offset) the next bytes must come from.
    let mut stream_at: (u64, u64) = (0, 0);
    // Paced schedule: when message 0 was acknowledged, the next due time.
    let mut first_acked_at: Option<u64> = None;

    loop {
        // Sender top-up.
        if connected && !client.is_closed() {
            match &finite {
                Some(list) => {
                    while queued < list.len() {
                        if let Some(p) = &sc.paced {
                            let due = match (queued, first_acked_at) {
                                (0, _) => 0,
                                (_, Some(t)) => t + p[queued],
                                (_, None) => u64::MAX,
                            };
                            if due > now {
                                break;
                            }
                        }
                        out.queued_at.push(now);
                        out.delivered_at.push(None);
                        let len = list[queued];
                        client
                            .send(now, queued as u64, u64::from(len), sc.ttl_us)
                            .unwrap();
                        lens.push(len);
                        delivered.push(0);
                        dropped.push(false);
                        acked.push(false);
                        queued += 1;
                        pending += 1;
                    }
                }
                None => {
                    while pending < 64 {
                        client
                            .send(now, queued as u64, u64::from(sc.bulk_size), sc.ttl_us)
                            .unwrap();
                        lens.push(sc.bulk_size);
                        delivered.push(0);
                        dropped.push(false);
                        acked.push(false);
                        queued += 1;
                        pending += 1;
                    }
                }
            }
        }
        // Transmits into the link.
        while let Some(t) = client.poll_transmit(now) {
            let len = t.len();
            if t.payload.is_some() {
                if let Some(n) = out.client_sent.get_mut((now / sc.bin_us) as usize) {
                    *n += 1;
                }
            }
            let _ = link.handle_datagram(
                to_ns(now),
                Direction::Forward,
                len,
                SimPkt {
                    header: t.header,
                    payload: t.payload,
                },
            );
        }
        if let Some(s) = server.as_mut() {
            while let Some(t) = s.poll_transmit(now) {
                let len = t.len();
                let _ = link.handle_datagram(
                    to_ns(now),
                    Direction::Reverse,
                    len,
                    SimPkt {
                        header: t.header,
                        payload: t.payload,
                    },
                );
            }
        }
        // Events.
        while let Some(e) = client.poll_event() {
            match e {
                Event::Connected => {
                    connected = true;
                    out.connected_at = Some(now);
                }
                Event::MessageAcked { msg } => {
                    let i = msg as usize;
                    if acked[i] || dropped[i] {
                        out.violations
                            .push(format!("msg {msg} acked twice or after drop"));
                    }
                    acked[i] = true;
                    if i == 0 {
                        first_acked_at = Some(now);
                    }
                    pending -= 1;
                    out.acked_msgs += 1;
                }
                Event::MessageDropped { msg, reason } => {
                    let i = msg as usize;
                    if reason == DropReason::Ttl {
                        if acked[i] || dropped[i] {
                            out.violations
                                .push(format!("msg {msg} dropped after ack/drop"));
                        }
                        dropped[i] = true;
                        out.dropped_msgs += 1;
                        pending -= 1;
                    }
                }
                Event::Closed { reason } => out.client_closed = Some(reason),
                other => out.violations.push(format!("client event {other:?}")),
            }
        }
        if let Some(s) = server.as_mut() {
            while let Some(e) = s.poll_event() {
                match e {
                    Event::Connected | Event::Closed { .. } => {}
                    Event::MessageReceived { extents, .. } => {
                        let mut msg = None;
                        let mut off = 0u64;
                        for ext in &extents {
                            let Some(b) = bufs.remove(&ext.buf) else {
                                out.violations
                                    .push(format!("extent {ext:?} of unknown buffer"));
                                continue;
                            };
                            let o = b.origin;
                            if *msg.get_or_insert(o.msg) != o.msg
                                || u64::from(o.offset) != off
                                || o.len != ext.len
                                || ext.offset != 16
                            {
                                out.violations
                                    .push(format!("bad extent {ext:?} from {o:?}"));
                            }
                            if let Some(bytes) = &b.bytes {
                                let p = &bytes[16..16 + ext.len as usize];
                                for (k, &v) in p.iter().enumerate() {
                                    if v != pattern(o.msg, u64::from(o.offset) + k as u64) {
                                        out.violations
                                            .push(format!("corrupt byte in msg {}", o.msg));
                                        break;
                                    }
                                }
                            }
                            off += u64::from(ext.len);
                        }
                        if let Some(m) = msg {
                            let i = m as usize;
                            if off != u64::from(lens[i]) {
                                out.violations
                                    .push(format!("msg {m}: {off} of {} bytes", lens[i]));
                            }
                            delivered[i] += 1;
                            if let Some(d) = out.delivered_at.get_mut(i) {
                                d.get_or_insert(now);
                            }
                            if delivered[i] > 1 {
                                out.violations.push(format!("msg {m} delivered twice"));
                            }
                            out.delivered_msgs += 1;
                            out.delivered_bytes += off;
                        }
                    }
                    Event::StreamData(ext) => {
                        // The stream must continue exactly where it left off.
                        let Some(b) = bufs.remove(&ext.buf) else {
                            out.violations
                                .push(format!("stream extent {ext:?} of unknown buffer"));
                            continue;
                        };
                        let o = b.origin;
                        let (m, off) = stream_at;
                        if o.msg != m || u64::from(o.offset) != off || o.len != ext.len {
                            out.violations
                                .push(format!("stream at {stream_at:?} got {o:?}"));
                        }
                        if let Some(bytes) = &b.bytes {
                            let p = &bytes[16..16 + ext.len as usize];
                            if p.iter()
                                .enumerate()
                                .any(|(k, &v)| v != pattern(o.msg, u64::from(o.offset) + k as u64))
                            {
                                out.violations
                                    .push(format!("corrupt stream bytes in {}", o.msg));
                            }
                        }
                        stream_at = (o.msg, u64::from(o.offset) + u64::from(ext.len));
                        if stream_at.1 == u64::from(lens[o.msg as usize]) {
                            delivered[o.msg as usize] += 1;
                            out.delivered_msgs += 1;
                            out.delivered_bytes += stream_at.1;
                            stream_at = (o.msg + 1, 0);
                        }
                    }
                    other => out.violations.push(format!("server event {other:?}")),
                }
            }
            while let Some(ext) = s.poll_release() {
                if bufs.remove(&ext.buf).is_none() {
                    out.violations.push(format!("released unknown {ext:?}"));
                }
            }
        }
        // Finite transfer done?
        if let Some(list) = &finite {
            if connected && out.acked_msgs + out.dropped_msgs == list.len() as u64 {
                out.finished_at = Some(now);
                break;
            }
        }
        // Next instant.
        let mut next = client.poll_timeout().unwrap_or(u64::MAX);
        if let Some(s) = &server {
            next = next.min(s.poll_timeout().unwrap_or(u64::MAX));
        }
        if let Some(d) = link.poll_deadline() {
            next = next.min(d.as_nanos().div_ceil(1000));
        }
        if let (Some(p), Some(t), Some(list)) = (&sc.paced, first_acked_at, &finite) {
            if queued < list.len() && !client.is_closed() {
                next = next.min(t + p[queued]);
            }
        }
        if next == u64::MAX || next > sc.duration_us {
            break;
        }
        let trace_us: u64 = std::env::var("LU2K_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000_000);
        if std::env::var_os("LU2K_SIM_TRACE").is_some() && next / trace_us != now / trace_us {
            eprintln!(
                "t={} delivered {} | {}",
                next,
                out.delivered_bytes,
                client.debug_summary()
            );
        }
        now = now.max(next);
        // Deliveries.
        while let Some((dir, p)) = link.poll_deliver(to_ns(now)) {
            let hdr = p.header.as_bytes();
            let plen = p.payload.map_or(0, |r| r.len as usize);
            let total = hdr.len() + plen;
            scratch[..hdr.len()].copy_from_slice(hdr);
            match dir {
                Direction::Reverse => {
                    let _ = client.handle_datagram(
                        now,
                        &scratch[..total],
                        Extent {
                            buf: 0,
                            offset: 0,
                            len: total as u32,
                        },
                    );
                }
                Direction::Forward => {
                    let id = next_buf;
                    next_buf += 1;
                    let mut bytes = None;
                    if let Some(r) = p.payload {
                        let bin = (now / sc.bin_us) as usize;
                        if bin < out.arrivals.len() {
                            out.arrivals[bin] += u64::from(r.len);
                        }
                        if sc.verify_bytes {
                            let mut v = vec![0u8; total];
                            v[..hdr.len()].copy_from_slice(hdr);
                            for k in 0..plen {
                                v[16 + k] = pattern(r.msg, u64::from(r.offset) + k as u64);
                            }
                            bytes = Some(v);
                        }
                    }
                    let data: &[u8] = match &bytes {
                        Some(v) => v,
                        None => &scratch[..total],
                    };
                    let at = Extent {
                        buf: id,
                        offset: 0,
                        len: total as u32,
                    };
                    let to_server = match &server {
                        Some(s) => {
                            Some(s.socket_id())
                                == Some(u32::from_be_bytes(data[12..16].try_into().unwrap()))
                                || handshake_socket_id(data) == Some(s.peer_socket_id())
                        }
                        None => false,
                    };
                    if to_server {
                        let s = server.as_mut().unwrap();
                        if s.handle_datagram(now, data, at) {
                            let origin = p.payload.unwrap();
                            out.unique_bytes += u64::from(origin.len);
                            if let Some(n) = out.unique.get_mut((now / sc.bin_us) as usize) {
                                *n += u64::from(origin.len);
                            }
                            bufs.insert(id, Buf { origin, bytes });
                        }
                    } else {
                        match listener.handle(now, client_addr, data) {
                            ListenerOutput::Reply(h) => {
                                let len = h.as_bytes().len();
                                let _ = link.handle_datagram(
                                    to_ns(now),
                                    Direction::Reverse,
                                    len,
                                    SimPkt {
                                        header: h,
                                        payload: None,
                                    },
                                );
                            }
                            ListenerOutput::Accept(c) => server = Some(c),
                            ListenerOutput::Drop(_) => {}
                        }
                    }
                }
            }
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
    out.end_us = now;
    if std::env::var_os("LU2K_SIM_DEBUG").is_some() {
        eprintln!("client {:?}", client.stats());
        eprintln!("client {}", client.debug_summary());
        if let Some(s) = &server {
            eprintln!("server {}", s.debug_summary());
        }
        if let Some(s) = &server {
            eprintln!("server {:?}", s.stats());
        }
    }
    out.sent = client.stats().pkts_sent;
    out.retransmitted = client.stats().pkts_retransmitted;
    out.client_timeouts = client.stats().timeouts;
    out.client_stats = Some(client.stats());

    // Every message ended exactly one way (finite transfers).
    if let Some(list) = &finite {
        if out.finished_at.is_none() {
            out.violations.push(format!(
                "transfer unfinished at {} us: {} acked, {} dropped of {}",
                now,
                out.acked_msgs,
                out.dropped_msgs,
                list.len()
            ));
        }
        for i in 0..queued {
            let ok = (acked[i] && delivered[i] == 1) || (dropped[i] && delivered[i] == 0);
            if out.finished_at.is_some() && !ok {
                out.violations.push(format!(
                    "msg {i}: acked {} dropped {} delivered {}",
                    acked[i], dropped[i], delivered[i]
                ));
            }
        }
    }
    // Closing gives every buffer back.
    if let Some(s) = server.as_mut() {
        s.close(now);
        while let Some(ext) = s.poll_release() {
            if bufs.remove(&ext.buf).is_none() {
                out.violations.push(format!("released unknown {ext:?}"));
            }
        }
        if s.held() != 0 {
            out.violations
                .push(format!("{} regions still held after close", s.held()));
        }
    }
    if !bufs.is_empty() {
        out.violations
            .push(format!("{} buffers never returned", bufs.len()));
    }
    out
}
