//! One cell of the GEO scenario on virtual time: the simulation's side of
//! `scripts/sim-vs-engine.sh`.
//!
//! The same transfer `lu2k-perf run perf/scenarios/geo.toml` makes with lu2k,
//! through the same link model with the same settings, but between two bare
//! [`Connection`]s on virtual time (the sim grid's model, `tests/sim_grid.rs`),
//! so that its figure and the engine's differ only by what the engine adds:
//!
//! - the link: `geo.toml`'s base link and cell (rate both ways, a 7.5 MB queue
//!   each way, 28 bytes of IP and UDP overhead, half the RTT each way,
//!   Bernoulli loss both ways), seeded with the scenario's seed;
//! - the workload: `bytes / 1 MiB` LNet PUTs, each 1 MiB of payload behind the
//!   72-byte LNet header (one UDT message each), all handed to the sender at
//!   time 0, as the harness's bulk sender does (its TX pool holds them);
//! - the receiver's buffer: the engine's (`rcv_buf_pkts` 65 536, the engine's
//!   default `flow_window`; the engine's RX pool is not modelled);
//! - the measure: the harness's goodput, payload over the time from the
//!   transfer's start (the end of the handshake, or with `--warmup-bytes` the
//!   warm-up message's acknowledgement: the harness starts its clock once a
//!   contender is connected) to the last byte delivered
//!   (`connected_goodput_mbps`; from the first handshake packet,
//!   `goodput_mbps`);
//! - with `--batch`, the sender's packets taken as the engine takes them
//!   (`poll_transmit_batch`, runs of up to 64, data up to the batch horizon
//!   ahead of its pacing time); without, one at a time at their pacing time,
//!   as the sim grid takes them. `--late-us` and `--jitter-ms` add what a real
//!   clock and a relay on a busy host add: a sender that wakes late, and
//!   deliveries held back and then made together.
//!
//! ```text
//! cargo run --release -p lu2k-udt --example sim_cell -- --rtt-ms 600 --loss 0.01
//!     [--rate-mbps 100] [--bytes 536870912] [--seed 7] [--queue-bytes 7500000]
//!     [--jitter-ms 0] [--late-us 0] [--warmup-bytes 0] [--batch] [--trace out.csv]
//!     [--trace-ms 250]
//! ```
//!
//! Prints one line of `key=value` pairs (`goodput_mbps`, `connected_s`,
//! `last_delivery_s`, `retx_pct`, ...); `--trace` writes the sender's and
//! receiver's state every `--trace-ms` of virtual time as CSV, the columns
//! `scripts/sim-vs-engine.sh` compares with the engine's stats.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use lu2k_linkem::{
    Config as LinkConfig, Direction, Duplex, DuplexConfig, Instant, Loss, Stats as LinkStats,
};
use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, Config, Connection, Event, Extent, Header, Listener, ListenerOutput, Mode,
    PayloadRef,
};

/// The LNet header in front of every PUT's payload.
const LNET_HDR: u64 = 72;
/// A bulk PUT's payload.
const MSG: u64 = 1 << 20;
/// The engine's default flow window (`flow_window`), which sizes its
/// connections' receive buffers.
const ENGINE_RCV_BUF_PKTS: u32 = 65_536;

/// One cell and how to run it.
#[derive(Debug, Clone)]
pub struct Cell {
    pub rtt_ms: f64,
    pub loss: f64,
    pub rate_mbps: f64,
    pub queue_bytes: u64,
    /// Each one-way delay drawn from `rtt / 2 ± jitter_ms`, first in first
    /// out (linkem's jitter without reordering): datagrams held back and
    /// then delivered together, as a relay on a busy host delivers them.
    pub jitter_ms: f64,
    /// Each time the sender's own deadline (pacing, timers) wakes it, it
    /// runs this late, drawn uniformly from `[0, late_us]` µs: a loop on a
    /// real clock that wakes after its deadline (timer slack, other tasks
    /// on the CPU). 0: at the deadline exactly, as virtual time allows.
    pub late_us: u64,
    /// The sender takes its packets as the engine does, in runs of up to 64
    /// with `poll_transmit_batch` (data up to its batch horizon ahead of its
    /// pacing time), instead of one at a time at their pacing time.
    pub batch: bool,
    pub bytes: u64,
    /// Payload of one message sent and acknowledged before the transfer,
    /// which starts (and its clock with it) when that one is acknowledged,
    /// as the harness's lu2k bulk sender connects; 0: none, the transfer
    /// starts at connect.
    pub warmup_bytes: u64,
    pub seed: u64,
    /// Give up after this much virtual time, µs.
    pub limit_us: u64,
    /// Sample the state every this many µs (0: no trace).
    pub trace_us: u64,
}

impl Cell {
    /// `geo.toml`'s cell at this RTT, loss and rate, full length.
    pub fn geo(rtt_ms: f64, loss: f64, rate_mbps: f64) -> Cell {
        Cell {
            rtt_ms,
            loss,
            rate_mbps,
            queue_bytes: 7_500_000,
            jitter_ms: 0.0,
            late_us: 0,
            batch: false,
            bytes: 536_870_912,
            warmup_bytes: 0,
            seed: 7,
            limit_us: 120_000_000,
            trace_us: 0,
        }
    }

    /// The link both ways, as the harness builds it from `geo.toml`.
    pub fn link(&self) -> DuplexConfig {
        let one = LinkConfig {
            rate_mbps: Some(self.rate_mbps),
            queue_bytes: Some(self.queue_bytes),
            overhead_bytes: 28,
            delay_ms: self.rtt_ms / 2.0,
            jitter_ms: self.jitter_ms,
            reorder: false,
            loss: if self.loss > 0.0 {
                Loss::Bernoulli { rate: self.loss }
            } else {
                Loss::None
            },
            ..LinkConfig::default()
        };
        DuplexConfig::symmetric(one)
    }
}

/// One row of the trace: the state at `t_us`, rates over the interval before.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t_us: u64,
    /// Payload of messages delivered whole, cumulative.
    pub delivered: u64,
    /// Payload of new data packets the receiver took, cumulative.
    pub unique: u64,
    /// The sender's pacing rate, payload bits/s.
    pub rate_bps: f64,
    pub cwnd: f64,
    pub flow_window: u32,
    pub rtt_us: u32,
    pub sent: u64,
    pub retransmitted: u64,
    /// Packets the receiver holds (out of order or of undelivered messages).
    pub held: usize,
    /// Wire bytes in the forward bottleneck queue.
    pub queue_bytes: u64,
    pub naks_sent: u64,
    /// Datagrams the sender put on the link (data and control), cumulative.
    pub client_dgrams: u64,
    /// Duplicate or out-of-window data packets the receiver dropped.
    pub dup_received: u64,
}

/// What a run gives.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub connected_us: Option<u64>,
    /// When the transfer started: at connect, or when the warm-up message
    /// was acknowledged.
    pub started_us: Option<u64>,
    pub last_delivery_us: Option<u64>,
    pub delivered_msgs: u64,
    /// Payload bytes (LNet headers excluded) of messages delivered whole.
    pub delivered_bytes: u64,
    pub sent: u64,
    pub retransmitted: u64,
    pub dup_received: u64,
    pub forward: LinkStats,
    pub reverse: LinkStats,
    pub trace: Vec<Sample>,
}

impl Outcome {
    /// Payload over the time from the first send (the handshake's) to the
    /// last delivery.
    pub fn goodput_mbps(&self) -> Option<f64> {
        let end = self.last_delivery_us?;
        Some(self.delivered_bytes as f64 * 8.0 / end.max(1) as f64)
    }

    /// Goodput from the transfer's start (the end of the handshake, or the
    /// warm-up's acknowledgement) to the last delivery: the harness's figure,
    /// whose clock starts once a contender is connected.
    pub fn connected_goodput_mbps(&self) -> Option<f64> {
        let end = self.last_delivery_us?;
        let start = self.started_us.or(self.connected_us)?;
        Some(self.delivered_bytes as f64 * 8.0 / end.saturating_sub(start).max(1) as f64)
    }
}

#[derive(Clone)]
struct SimPkt {
    header: Header,
    payload: Option<PayloadRef>,
}

fn to_ns(us: u64) -> Instant {
    Instant::from_nanos(us * 1000)
}

#[allow(clippy::too_many_arguments)]
fn sample(
    t_us: u64,
    out: &Outcome,
    unique: u64,
    client_dgrams: u64,
    client: &Connection,
    server: Option<&Connection>,
    queue_bytes: u64,
) -> Sample {
    let c = client.stats();
    let s = server.map(Connection::stats);
    Sample {
        t_us,
        delivered: out.delivered_bytes,
        unique,
        rate_bps: if c.period_us > 0.0 {
            f64::from(client.payload_size()) * 8.0 * 1e6 / c.period_us
        } else {
            0.0
        },
        cwnd: c.cwnd,
        flow_window: c.flow_window,
        rtt_us: c.rtt_us,
        sent: c.pkts_sent,
        retransmitted: c.pkts_retransmitted,
        held: server.map_or(0, Connection::held),
        queue_bytes,
        naks_sent: s.as_ref().map_or(0, |s| s.naks_sent),
        client_dgrams,
        dup_received: s.as_ref().map_or(0, |s| s.dropped_out_of_window),
    }
}

/// Runs one cell: the client sends every message at connect, the server
/// takes them; the clock jumps to the next deadline of either side or the
/// link, in the sim grid's order of steps.
pub fn run(cell: &Cell) -> Outcome {
    let mut out = Outcome::default();
    let mut link: Duplex<SimPkt> = Duplex::new(cell.link(), cell.seed).expect("link config");
    let cfg = Config {
        cc: Kind::Satellite,
        rcv_buf_pkts: Some(ENGINE_RCV_BUF_PKTS),
        mode: Mode::Message,
        ..Config::default()
    };
    // The sim grid's addresses, so that a run here and the grid's driver on
    // the same scenario are the same run (see the tests).
    let client_addr: SocketAddr = "10.0.0.1:9000".parse().expect("address");
    let server_addr: SocketAddr = "10.0.0.2:9000".parse().expect("address");
    let mut client = Connection::connect(0, cfg.clone(), cell.seed ^ 0xC11E, server_addr);
    let mut listener = Listener::new(0, cfg, cell.seed ^ 0x5E4E);
    let mut server: Option<Box<Connection>> = None;
    let count = cell.bytes.div_ceil(MSG);
    let mut bufs: HashMap<u64, ()> = HashMap::new();
    let mut next_buf = 1u64;
    let mut queued = 0u64;
    let mut acked = 0u64;
    let mut unique = 0u64;
    let mut connected = false;
    let mut scratch = vec![0u8; 2048];
    let mut now = 0u64;
    // The sender's wake-up lateness: a seeded xorshift, drawn per wake-up.
    let mut rng = cell.seed | 1;
    let mut late = 0u64;
    let mut client_due: Option<u64> = None;
    let mut client_dgrams = 0u64;
    let mut batch = Vec::new();
    // The warm-up message's id (after the transfer's), and whether it is
    // still to be sent, or acknowledged.
    let warm_id = count;
    let mut warm_sent = cell.warmup_bytes == 0;
    let mut warm_done = cell.warmup_bytes == 0;
    let mut warm_delivered = cell.warmup_bytes == 0;
    loop {
        if connected && !client.is_closed() && !warm_sent {
            client
                .send(now, warm_id, cell.warmup_bytes + LNET_HDR, None)
                .expect("a message the connection takes");
            warm_sent = true;
        }
        if connected && !client.is_closed() && warm_done {
            while queued < count {
                client
                    .send(now, queued, MSG + LNET_HDR, None)
                    .expect("a message the connection takes");
                queued += 1;
            }
        }
        loop {
            if cell.batch {
                if client.poll_transmit_batch(now, &mut batch, 64) == 0 {
                    break;
                }
            } else {
                match client.poll_transmit(now) {
                    Some(t) => batch.push(t),
                    None => break,
                }
            }
            for t in batch.drain(..) {
                client_dgrams += 1;
                let len = t.len();
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
        while let Some(e) = client.poll_event() {
            match e {
                Event::Connected => {
                    connected = true;
                    out.connected_us = Some(now);
                    if warm_done {
                        out.started_us = Some(now);
                    }
                }
                Event::MessageAcked { msg } if msg == warm_id => {
                    warm_done = true;
                    out.started_us = Some(now);
                }
                Event::MessageAcked { .. } => acked += 1,
                Event::Closed { reason } => panic!("the client closed: {reason:?}"),
                _ => {}
            }
        }
        if let Some(s) = server.as_mut() {
            while let Some(e) = s.poll_event() {
                if let Event::MessageReceived { extents, .. } = e {
                    let mut len = 0u64;
                    for ext in &extents {
                        bufs.remove(&ext.buf);
                        len += u64::from(ext.len);
                    }
                    if !warm_delivered {
                        // The warm-up is delivered before any of the
                        // transfer is sent.
                        warm_delivered = true;
                        continue;
                    }
                    out.delivered_msgs += 1;
                    out.delivered_bytes += len.saturating_sub(LNET_HDR);
                    out.last_delivery_us = Some(now);
                }
            }
            while let Some(ext) = s.poll_release() {
                bufs.remove(&ext.buf);
            }
        }
        if connected && acked == count {
            break;
        }
        let due = client.poll_timeout();
        if cell.late_us > 0 && due != client_due {
            client_due = due;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            late = rng % (cell.late_us + 1);
        }
        let mut next = due.map_or(u64::MAX, |t| t + late);
        if let Some(s) = &server {
            next = next.min(s.poll_timeout().unwrap_or(u64::MAX));
        }
        if let Some(d) = link.poll_deadline() {
            next = next.min(d.as_nanos().div_ceil(1000));
        }
        if next == u64::MAX || next > cell.limit_us {
            break;
        }
        if let Some(k) = now.checked_div(cell.trace_us) {
            // One row per trace boundary crossed, with the state as it is
            // until the clock moves.
            let mut b = (k + 1) * cell.trace_us;
            while b <= next {
                let q = link.link_mut(Direction::Forward).queued_bytes(to_ns(now));
                out.trace.push(sample(
                    b,
                    &out,
                    unique,
                    client_dgrams,
                    &client,
                    server.as_deref(),
                    q,
                ));
                b += cell.trace_us;
            }
        }
        now = now.max(next);
        while let Some((dir, p)) = link.poll_deliver(to_ns(now)) {
            let hdr = p.header.as_bytes();
            let total = hdr.len() + p.payload.map_or(0, |r| r.len as usize);
            scratch[..hdr.len()].copy_from_slice(hdr);
            match dir {
                Direction::Reverse => {
                    let at = Extent {
                        buf: 0,
                        offset: 0,
                        len: total as u32,
                    };
                    let _ = client.handle_datagram(now, &scratch[..total], at);
                }
                Direction::Forward => {
                    let id = next_buf;
                    next_buf += 1;
                    let data = &scratch[..total];
                    let to_server = server.as_ref().is_some_and(|s| {
                        Some(s.socket_id())
                            == data
                                .get(12..16)
                                .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")))
                            || handshake_socket_id(data) == Some(s.peer_socket_id())
                    });
                    if to_server {
                        let s = server.as_mut().expect("checked above");
                        let at = Extent {
                            buf: id,
                            offset: 0,
                            len: total as u32,
                        };
                        if s.handle_datagram(now, data, at) {
                            unique += p.payload.map_or(0, |r| u64::from(r.len));
                            bufs.insert(id, ());
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
        if client.poll_timeout().is_some_and(|t| t + late <= now) {
            client.handle_timeout(now);
        }
        if let Some(s) = server.as_mut() {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
    }
    let c = client.stats();
    out.sent = c.pkts_sent;
    out.retransmitted = c.pkts_retransmitted;
    out.dup_received = server
        .as_ref()
        .map_or(0, |s| s.stats().dropped_out_of_window);
    out.forward = *link.link(Direction::Forward).stats();
    out.reverse = *link.link(Direction::Reverse).stats();
    out
}

/// The trace as CSV, rates over each interval in Mbit/s.
pub fn trace_csv(trace: &[Sample]) -> String {
    let mut s = String::from(
        "t_s,delivered_mbps,unique_mbps,delivered_bytes,rate_mbps,cwnd_pkts,flow_window_pkts,\
         rtt_ms,sent_pkts,retx_pkts,held_pkts,queue_bytes,naks_sent,dup_received,client_dgrams\n",
    );
    let mut prev = Sample::default();
    for x in trace {
        let dt = (x.t_us - prev.t_us).max(1) as f64;
        let _ = writeln!(
            s,
            "{:.3},{:.2},{:.2},{},{:.2},{:.0},{},{:.1},{},{},{},{},{},{},{}",
            x.t_us as f64 / 1e6,
            (x.delivered - prev.delivered) as f64 * 8.0 / dt,
            (x.unique - prev.unique) as f64 * 8.0 / dt,
            x.delivered,
            x.rate_bps / 1e6,
            x.cwnd,
            x.flow_window,
            f64::from(x.rtt_us) / 1000.0,
            x.sent,
            x.retransmitted,
            x.held,
            x.queue_bytes,
            x.naks_sent,
            x.dup_received,
            x.client_dgrams
        );
        prev = x.clone();
    }
    s
}

fn usage() -> ! {
    eprintln!(
        "usage: sim_cell --rtt-ms MS --loss FRACTION [--rate-mbps M] [--bytes B] [--seed S] \
         [--queue-bytes B] [--jitter-ms MS] [--late-us US] [--warmup-bytes B] [--batch] \
         [--trace FILE.csv] [--trace-ms MS]\n\
         (loss is a fraction: 0.01 is 1 %)"
    );
    std::process::exit(2)
}

fn main() {
    let mut cell = Cell::geo(600.0, 0.0, 100.0);
    let mut trace_path = None;
    let mut trace_ms = 250.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| -> String {
            args.next().unwrap_or_else(|| {
                eprintln!("sim_cell: {a} needs a value ({what})");
                usage()
            })
        };
        let num = |v: String, what: &str| -> f64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("sim_cell: {a} wants {what}, got {v:?}");
                usage()
            })
        };
        match a.as_str() {
            "--rtt-ms" => cell.rtt_ms = num(val("milliseconds"), "milliseconds"),
            "--loss" => cell.loss = num(val("a fraction"), "a fraction in [0, 1)"),
            "--rate-mbps" => cell.rate_mbps = num(val("Mbit/s"), "Mbit/s"),
            "--bytes" => cell.bytes = num(val("bytes"), "bytes") as u64,
            "--seed" => cell.seed = num(val("a number"), "a number") as u64,
            "--queue-bytes" => cell.queue_bytes = num(val("bytes"), "bytes") as u64,
            "--jitter-ms" => cell.jitter_ms = num(val("milliseconds"), "milliseconds"),
            "--late-us" => cell.late_us = num(val("microseconds"), "microseconds") as u64,
            "--warmup-bytes" => cell.warmup_bytes = num(val("bytes"), "bytes") as u64,
            "--batch" => cell.batch = true,
            "--trace" => trace_path = Some(val("a CSV file")),
            "--trace-ms" => trace_ms = num(val("milliseconds"), "milliseconds"),
            "-h" | "--help" => usage(),
            _ => {
                eprintln!("sim_cell: unknown argument {a:?}");
                usage()
            }
        }
    }
    if !(0.0..1.0).contains(&cell.loss) || cell.rtt_ms <= 0.0 || cell.rate_mbps <= 0.0 {
        eprintln!(
            "sim_cell: --loss must be a fraction in [0, 1), --rtt-ms and --rate-mbps above 0"
        );
        usage()
    }
    if cell.bytes == 0 {
        eprintln!("sim_cell: --bytes must be at least 1");
        usage()
    }
    if trace_path.is_some() {
        cell.trace_us = (trace_ms * 1000.0).max(1.0) as u64;
    }
    let o = run(&cell);
    let f = |x: Option<f64>| x.map_or("none".to_string(), |v| format!("{v:.2}"));
    println!(
        "sim rtt_ms={} loss={} rate_mbps={} jitter_ms={} late_us={} warmup_bytes={} batch={} bytes={} seed={} goodput_mbps={} \
         connected_goodput_mbps={} connected_s={} last_delivery_s={} delivered_msgs={} \
         sent_pkts={} retx_pkts={} retx_pct={:.2} dup_received={} queue_drops={} link_losses={}",
        cell.rtt_ms,
        cell.loss,
        cell.rate_mbps,
        cell.jitter_ms,
        cell.late_us,
        cell.warmup_bytes,
        cell.batch,
        cell.bytes,
        cell.seed,
        f(o.goodput_mbps()),
        f(o.connected_goodput_mbps()),
        f(o.connected_us.map(|t| t as f64 / 1e6)),
        f(o.last_delivery_us.map(|t| t as f64 / 1e6)),
        o.delivered_msgs,
        o.sent,
        o.retransmitted,
        100.0 * o.retransmitted as f64 / o.sent.max(1) as f64,
        o.dup_received,
        o.forward.dropped_queue.packets,
        o.forward.dropped_loss.packets,
    );
    if let Some(p) = trace_path {
        if let Err(e) = std::fs::write(&p, trace_csv(&o.trace)) {
            eprintln!("sim_cell: cannot write the trace to {p}: {e}");
            std::process::exit(1);
        }
    }
    if o.delivered_msgs < cell.bytes.div_ceil(MSG) {
        eprintln!(
            "sim_cell: only {} of {} messages delivered within {} s of virtual time",
            o.delivered_msgs,
            cell.bytes.div_ceil(MSG),
            cell.limit_us / 1_000_000
        );
        std::process::exit(1);
    }
}

#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(test)]
mod tests {
    use super::*;

    /// A short cell: 16 MiB at 600 ms and 1 % loss each way.
    fn short() -> Cell {
        Cell {
            bytes: 16 << 20,
            trace_us: 250_000,
            ..Cell::geo(600.0, 0.01, 100.0)
        }
    }

    /// This driver is the sim grid's (`tests/common`, which checks every
    /// message is delivered once and intact and every buffer comes back) on
    /// the same scenario: the same packets sent and retransmitted, the last
    /// message delivered at the same instant.
    #[test]
    fn the_cell_is_the_sim_grids_run() {
        let cell = short();
        let mine = run(&cell);
        let count = cell.bytes.div_ceil(MSG) as usize;
        let grid = common::run(&common::Scenario {
            link: cell.link(),
            cc: Kind::Satellite,
            seed: cell.seed,
            duration_us: cell.limit_us,
            messages: Some(vec![(MSG + LNET_HDR) as u32; count]),
            bulk_size: (MSG + LNET_HDR) as u32,
            ttl_us: None,
            verify_bytes: false,
            bdp_bps: Config::default().bdp_bandwidth_bps,
            bdp_rtt_us: Config::default().bdp_rtt_us,
            rcv_buf_pkts: Some(ENGINE_RCV_BUF_PKTS),
            mode: Mode::Message,
            bin_us: 50_000,
            paced: None,
        });
        assert!(grid.violations.is_empty(), "{:?}", grid.violations);
        assert_eq!(grid.delivered_msgs, count as u64);
        assert_eq!(mine.delivered_msgs, grid.delivered_msgs);
        assert_eq!(
            mine.delivered_bytes,
            grid.delivered_bytes - count as u64 * LNET_HDR
        );
        assert_eq!(mine.sent, grid.sent);
        assert_eq!(mine.retransmitted, grid.retransmitted);
        assert_eq!(mine.connected_us, grid.connected_at);
        let last = grid.delivered_at.iter().flatten().max().copied();
        assert_eq!(mine.last_delivery_us, last);
    }

    /// The figure and the trace of a short cell are the harness's measures of
    /// a plausible run: under the payload capacity, the handshake (two round
    /// trips) counted, about the link's losses retransmitted, the trace one
    /// row per 250 ms ending with everything delivered.
    #[test]
    fn a_short_cell_gives_a_figure_and_a_trace() {
        let cell = short();
        let o = run(&cell);
        let g = o.goodput_mbps().expect("delivered");
        let cap = 100.0 * 1456.0 / 1500.0 * (1.0 - cell.loss);
        // At most: the handshake (two round trips), the fast start's first
        // round trip, the bytes at the payload capacity, the one-way delay
        // and three round trips of repairs at the end.
        let rtt = cell.rtt_ms / 1e3;
        let slowest = 3.0 * rtt + cell.bytes as f64 * 8.0 / (cap * 1e6) + rtt / 2.0 + 3.0 * rtt;
        let floor = cell.bytes as f64 * 8.0 / slowest / 1e6;
        assert!(
            g > floor && g < cap,
            "goodput {g}: not within ({floor}, {cap})"
        );
        assert!(o.connected_goodput_mbps().expect("connected") > g);
        // The handshake: two round trips (the SYN cookie's), plus the small
        // packets' time on the wire.
        let c = o.connected_us.expect("connected");
        assert!((1_200_000..1_201_000).contains(&c), "connected at {c} us");
        let lost = o.forward.dropped_loss.packets;
        assert!(
            lost > 0 && o.retransmitted >= lost,
            "{lost} lost, {} retx",
            o.retransmitted
        );
        let csv = trace_csv(&o.trace);
        let rows: Vec<&str> = csv.lines().collect();
        // A row per 250 ms up to the last acknowledgement, which comes after
        // the last delivery.
        let end = o.last_delivery_us.expect("delivered");
        assert!(
            rows.len() - 1 > (end / 250_000) as usize,
            "{} rows",
            rows.len() - 1
        );
        for (i, r) in rows[1..].iter().enumerate() {
            let t: f64 = r.split(',').next().unwrap().parse().unwrap();
            assert_eq!((t * 1e3).round() as usize, 250 * (i + 1), "row {i}: {r}");
        }
        let last: Vec<&str> = rows[rows.len() - 1].split(',').collect();
        assert_eq!(last[3], o.delivered_bytes.to_string());
    }

    /// A sender that wakes late sends less than its pacing rate: the late
    /// loop's lost pacing credit, which virtual time alone never shows.
    #[test]
    fn a_late_sender_loses_rate() {
        let on_time = run(&Cell {
            loss: 0.05,
            ..short()
        });
        let late = run(&Cell {
            loss: 0.05,
            late_us: 1000,
            ..short()
        });
        let (a, b) = (
            on_time.goodput_mbps().unwrap(),
            late.goodput_mbps().unwrap(),
        );
        assert!(b < 0.99 * a, "late {b} against on time {a}");
        assert_eq!(late.delivered_msgs, on_time.delivered_msgs);
    }

    /// A warm-up message, as the harness's lu2k bulk sender connects: the
    /// transfer starts (and its figure's clock) once it is acknowledged, at
    /// least a round trip after the handshake; it is not counted.
    #[test]
    fn a_warm_up_message_starts_the_transfer_after_it() {
        let plain = run(&short());
        let warm = run(&Cell {
            warmup_bytes: 64,
            ..short()
        });
        let (c, s) = (warm.connected_us.unwrap(), warm.started_us.unwrap());
        assert!(s >= c + 600_000, "started {s} us, connected {c} us");
        assert_eq!(plain.started_us, plain.connected_us);
        assert_eq!(warm.delivered_msgs, plain.delivered_msgs);
        assert_eq!(warm.delivered_bytes, plain.delivered_bytes);
        let bytes = warm.delivered_bytes as f64 * 8.0;
        let g = warm.connected_goodput_mbps().unwrap();
        let expect = bytes / (warm.last_delivery_us.unwrap() - s) as f64;
        assert!((g - expect).abs() < 1e-9, "{g} against {expect}");
    }
}
