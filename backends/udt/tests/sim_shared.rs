//! N connection pairs sharing one satellite bottleneck, on virtual time: a
//! gateway with N peers behind one 100 Mbit/s forward link.
//!
//! The forward path is one [`lu2k_linkem::Link`]: a single FIFO of 7.5 MB
//! (one bandwidth-delay product at 600 ms) drained at 100 Mbit/s, carrying
//! the datagrams of every flow (each counted with 28 bytes of IP/UDP
//! overhead, as the other simulations do), then 300 ms of propagation and
//! 0.1 % random loss. The reverse path (ACKs, NAKs) has the same delay and
//! loss and no rate limit. Every flow is a bulk transfer of 1 MiB messages
//! with the satellite controller; all start at once, or `stagger_us` apart.
//! Everything is seeded: a run is the same every time.
//!
//! Figures, over the steady-state window from [`WARMUP_US`] (10 s) after
//! the last flow started to the end, unless said otherwise (the start — fast
//! start and the first overflow — is left out, and reported separately):
//! - aggregate goodput: payload bytes of new (not duplicate) data packets
//!   the receivers took, all flows; utilization is that over the link's
//!   payload capacity `100 Mbit/s × 1456/1500 × (1 − loss)`;
//! - per-flow goodput and Jain's fairness index over them;
//! - datagrams the forward queue tail-dropped (overflow) and those lost at
//!   random on the wire, for the whole run, against datagrams offered;
//! - data packets retransmitted (whole run);
//! - the queue's occupancy, sampled every 10 ms: its maximum, and its mean
//!   after the warm-up.
//!
//! `eight_flows_deliver_every_message_once` checks what must hold whatever
//! the controller does, for eight flows at once and 5 s apart, and prints
//! which of a gateway operator's goals (≥ 90 % utilization, Jain ≥ 0.95,
//! queue drops < 1 % of datagrams) the uncapped controllers miss: they do
//! not share a bottleneck (README, "Gateway"), so those goals are asserted
//! only where each flow is capped at its share:
//! `eight_flows_capped_at_their_share_meet_gateway_goals` (`Config::max_rate_bps`,
//! an engine's `max_rate_mbps`), at once and 5 s apart.
//! `LU2K_SHARED_TRACE=1` prints a per-second trace (goodput, queue, drops,
//! each flow's pacing rate and smoothed RTT); `LU2K_SHARED_CC=1` prints
//! flow 0's controller state every second.
//!
//! Run: `cargo test -p lu2k-udt --release --test sim_shared -- --nocapture`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;

use lu2k_linkem::{Config as LinkConfig, DropReason, Fate, Instant, Link, Loss};
use lu2k_udt::cc::Kind;
use lu2k_udt::conn::{
    handshake_socket_id, Config, Connection, Event, Extent, Header, Listener, ListenerOutput, Mode,
    PayloadRef,
};

const RATE_MBPS: f64 = 100.0;
const RTT_MS: f64 = 600.0;
/// One bandwidth-delay product: 100 Mbit/s × 600 ms.
const QUEUE_BYTES: u64 = 7_500_000;
const LOSS: f64 = 0.001;
/// IP + UDP bytes the bottleneck carries with every datagram.
const OVERHEAD: u32 = 28;
const MSS: f64 = 1500.0;
const MSG_BYTES: u32 = 1 << 20;
/// Messages each sender keeps queued (bulk: never short of data).
const PENDING: usize = 64;
const DURATION_US: u64 = 60_000_000;
/// Left out of the steady-state figures: fast start and its aftermath.
const WARMUP_US: u64 = 10_000_000;
const BIN_US: u64 = 1_000_000;
/// Queue and pacing-rate sampling interval.
const SAMPLE_US: u64 = 10_000;

/// Payload bytes per second the link can carry: 1456 of every 1500 wire
/// bytes, less the random loss.
fn payload_capacity_bps(loss: f64) -> f64 {
    RATE_MBPS * 1e6 / 8.0 * 1456.0 / 1500.0 * (1.0 - loss)
}

/// What to run.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    flows: usize,
    /// Flow `i` connects at `i × stagger_us`.
    stagger_us: u64,
    duration_us: u64,
    loss: f64,
    seed: u64,
    /// Each flow's `max_rate_bps` (0: none).
    max_rate_bps: u64,
}

impl Scenario {
    fn new(flows: usize) -> Scenario {
        Scenario {
            flows,
            stagger_us: 0,
            duration_us: DURATION_US,
            loss: LOSS,
            seed: 0x5A7E_0000 + flows as u64,
            max_rate_bps: 0,
        }
    }
}

/// A datagram on either link, tagged with the flow it belongs to.
#[derive(Clone)]
struct Pkt {
    flow: usize,
    header: Header,
    payload: Option<PayloadRef>,
}

/// One connection pair and what was seen of it.
struct Flow {
    start_us: u64,
    seed: u64,
    addr: SocketAddr,
    client: Option<Box<Connection>>,
    listener: Listener,
    server: Option<Box<Connection>>,
    connected_at: Option<u64>,
    queued: u64,
    pending: usize,
    acked: Vec<bool>,
    delivered: Vec<u8>,
    /// The message the receiver must deliver next (message mode: in order).
    next_msg: u64,
    /// Buffers the server retained, with what they hold.
    held: HashMap<u64, PayloadRef>,
    /// Payload bytes of new data the server took, per bin.
    unique: Vec<u64>,
    /// Pacing rate (Mbit/s of 1500-byte packets) at the last sample of
    /// each bin.
    rate: Vec<f64>,
    /// Smoothed RTT (ms), summed over the samples of each bin.
    rtt: Vec<f64>,
    queue_drops: u64,
    random_losses: u64,
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
struct Report {
    sc: Option<Scenario>,
    violations: Vec<String>,
    /// Per flow, per bin: unique payload bytes.
    unique: Vec<Vec<u64>>,
    /// Per flow, per bin: pacing rate at the bin's last sample, Mbit/s.
    rate: Vec<Vec<f64>>,
    /// Per flow, per bin: mean smoothed RTT, ms.
    rtt: Vec<Vec<f64>>,
    connected_at: Vec<u64>,
    delivered_msgs: Vec<u64>,
    sent: Vec<u64>,
    retransmitted: Vec<u64>,
    flow_queue_drops: Vec<u64>,
    flow_random_losses: Vec<u64>,
    /// Per bin: forward datagrams offered, tail-dropped, lost at random.
    offered: Vec<u64>,
    queue_drops: Vec<u64>,
    random_losses: Vec<u64>,
    /// Per bin: mean and largest sampled queue, bytes.
    queue_mean: Vec<f64>,
    queue_max: Vec<u64>,
    /// Largest queue seen at any offer, bytes.
    queue_peak: u64,
    samples_per_bin: Vec<u64>,
}

fn to_ns(us: u64) -> Instant {
    Instant::from_nanos(us * 1000)
}

fn bernoulli(rate: f64) -> Loss {
    if rate > 0.0 {
        Loss::Bernoulli { rate }
    } else {
        Loss::None
    }
}

fn run(sc: &Scenario) -> Report {
    let fwd_cfg = LinkConfig {
        rate_mbps: Some(RATE_MBPS),
        queue_bytes: Some(QUEUE_BYTES),
        overhead_bytes: OVERHEAD,
        delay_ms: RTT_MS / 2.0,
        loss: bernoulli(sc.loss),
        ..LinkConfig::default()
    };
    let rev_cfg = LinkConfig {
        rate_mbps: None,
        queue_bytes: None,
        ..fwd_cfg.clone()
    };
    let mut fwd: Link<Pkt> = Link::new(fwd_cfg, sc.seed).expect("forward link");
    let mut rev: Link<Pkt> = Link::new(rev_cfg, sc.seed ^ 0x00E5_E4E5).expect("reverse link");
    let cfg = Config {
        cc: Kind::Satellite,
        // Each peer sizes its buffers for the whole link, as a gateway's
        // peers would (none knows how many others share it).
        bdp_bandwidth_bps: (RATE_MBPS * 1e6) as u64,
        bdp_rtt_us: (RTT_MS * 1000.0) as u64,
        mode: Mode::Message,
        max_rate_bps: sc.max_rate_bps,
        ..Config::default()
    };
    let server_addr: SocketAddr = "10.0.0.254:9000".parse().unwrap();
    let bins = (sc.duration_us / BIN_US + 1) as usize;
    let mut flows: Vec<Flow> = (0..sc.flows)
        .map(|i| {
            let seed = sc.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
            Flow {
                start_us: i as u64 * sc.stagger_us,
                seed,
                addr: SocketAddr::from(([10, 0, 1, i as u8 + 1], 9000)),
                client: None,
                listener: Listener::new(0, cfg.clone(), seed ^ 0x5E4E),
                server: None,
                connected_at: None,
                queued: 0,
                pending: 0,
                acked: Vec::new(),
                delivered: Vec::new(),
                next_msg: 0,
                held: HashMap::new(),
                unique: vec![0; bins],
                rate: vec![0.0; bins],
                rtt: vec![0.0; bins],
                queue_drops: 0,
                random_losses: 0,
            }
        })
        .collect();
    let mut rep = Report {
        sc: Some(*sc),
        offered: vec![0; bins],
        queue_drops: vec![0; bins],
        random_losses: vec![0; bins],
        queue_mean: vec![0.0; bins],
        queue_max: vec![0; bins],
        samples_per_bin: vec![0; bins],
        ..Report::default()
    };
    let mut scratch = vec![0u8; 2048];
    let mut next_buf = 1u64;
    let mut now = 0u64;
    let mut next_sample = 0u64;
    let trace_cc = std::env::var_os("LU2K_SHARED_CC").is_some();
    loop {
        let bin = (now / BIN_US) as usize;
        for (i, f) in flows.iter_mut().enumerate() {
            if f.client.is_none() && now >= f.start_us {
                f.client = Some(Box::new(Connection::connect(
                    now,
                    cfg.clone(),
                    f.seed ^ 0xC11E,
                    server_addr,
                )));
            }
            let Some(c) = f.client.as_mut() else {
                continue;
            };
            if f.connected_at.is_some() && !c.is_closed() {
                while f.pending < PENDING {
                    c.send(now, f.queued, u64::from(MSG_BYTES), None).unwrap();
                    f.acked.push(false);
                    f.delivered.push(0);
                    f.queued += 1;
                    f.pending += 1;
                }
            }
            while let Some(t) = c.poll_transmit(now) {
                let pkt = Pkt {
                    flow: i,
                    header: t.header,
                    payload: t.payload,
                };
                rep.offered[bin] += 1;
                match fwd.handle_datagram(to_ns(now), t.len(), pkt) {
                    Fate::Drop(DropReason::Queue) => {
                        f.queue_drops += 1;
                        rep.queue_drops[bin] += 1;
                    }
                    Fate::Drop(_) => {
                        f.random_losses += 1;
                        rep.random_losses[bin] += 1;
                    }
                    Fate::Deliver(_) | Fate::Duplicate(..) => {
                        rep.queue_peak = rep.queue_peak.max(fwd.queued_bytes(to_ns(now)));
                    }
                }
            }
            if let Some(s) = f.server.as_mut() {
                while let Some(t) = s.poll_transmit(now) {
                    let pkt = Pkt {
                        flow: i,
                        header: t.header,
                        payload: t.payload,
                    };
                    let _ = rev.handle_datagram(to_ns(now), t.len(), pkt);
                }
            }
            while let Some(e) = c.poll_event() {
                match e {
                    Event::Connected => f.connected_at = Some(now),
                    Event::MessageAcked { msg } => {
                        let m = msg as usize;
                        if f.acked[m] {
                            rep.violations
                                .push(format!("flow {i}: msg {msg} acked twice"));
                        }
                        if f.delivered[m] != 1 {
                            rep.violations
                                .push(format!("flow {i}: msg {msg} acked, not delivered"));
                        }
                        f.acked[m] = true;
                        f.pending -= 1;
                    }
                    other => rep
                        .violations
                        .push(format!("flow {i}: client event {other:?} at {now} us")),
                }
            }
            if let Some(s) = f.server.as_mut() {
                while let Some(e) = s.poll_event() {
                    match e {
                        Event::Connected => {}
                        Event::MessageReceived { extents, .. } => {
                            let m = f.next_msg;
                            let mut off = 0u32;
                            for ext in &extents {
                                let Some(o) = f.held.remove(&ext.buf) else {
                                    rep.violations.push(format!(
                                        "flow {i}: extent {ext:?} of unknown buffer"
                                    ));
                                    continue;
                                };
                                if o.msg != m
                                    || o.offset != off
                                    || o.len != ext.len
                                    || ext.offset != 16
                                {
                                    rep.violations.push(format!(
                                        "flow {i}: msg {m} at {off}: extent {ext:?} holds {o:?}"
                                    ));
                                }
                                off += ext.len;
                            }
                            if off != MSG_BYTES {
                                rep.violations
                                    .push(format!("flow {i}: msg {m} delivered {off} bytes"));
                            }
                            match f.delivered.get_mut(m as usize) {
                                Some(d) => *d += 1,
                                None => rep
                                    .violations
                                    .push(format!("flow {i}: msg {m} delivered, never sent")),
                            }
                            f.next_msg += 1;
                        }
                        other => rep
                            .violations
                            .push(format!("flow {i}: server event {other:?} at {now} us")),
                    }
                }
                while let Some(ext) = s.poll_release() {
                    if f.held.remove(&ext.buf).is_none() {
                        rep.violations
                            .push(format!("flow {i}: released unknown {ext:?}"));
                    }
                }
            }
        }
        // The next instant: a connection's deadline, a delivery, a flow's
        // start or a sample.
        let mut next = next_sample;
        for f in &flows {
            match &f.client {
                None => next = next.min(f.start_us),
                Some(c) => next = next.min(c.poll_timeout().unwrap_or(u64::MAX)),
            }
            if let Some(s) = &f.server {
                next = next.min(s.poll_timeout().unwrap_or(u64::MAX));
            }
        }
        for d in [fwd.poll_deadline(), rev.poll_deadline()]
            .into_iter()
            .flatten()
        {
            next = next.min(d.as_nanos().div_ceil(1000));
        }
        if next > sc.duration_us {
            break;
        }
        now = now.max(next);
        let bin = (now / BIN_US) as usize;
        if now >= next_sample {
            let q = fwd.queued_bytes(to_ns(now));
            rep.queue_mean[bin] += q as f64;
            rep.queue_max[bin] = rep.queue_max[bin].max(q);
            rep.samples_per_bin[bin] += 1;
            for f in &mut flows {
                if let Some(c) = &f.client {
                    let st = c.stats();
                    f.rate[bin] = 1e6 / st.period_us.max(1e-3) * MSS * 8.0 / 1e6;
                    f.rtt[bin] += f64::from(st.rtt_us) / 1000.0;
                }
            }
            next_sample += SAMPLE_US;
            if trace_cc && now % BIN_US == 0 {
                if let Some(c) = &flows[0].client {
                    let d = c.debug_summary();
                    eprintln!("t={now} flow 0 {}", &d[d.find("| path").unwrap_or(0)..]);
                }
            }
        }
        while let Some(p) = rev.poll_deliver(to_ns(now)) {
            let hdr = p.header.as_bytes();
            scratch[..hdr.len()].copy_from_slice(hdr);
            let at = Extent {
                buf: 0,
                offset: 0,
                len: hdr.len() as u32,
            };
            if let Some(c) = flows[p.flow].client.as_mut() {
                let _ = c.handle_datagram(now, &scratch[..hdr.len()], at);
            }
        }
        while let Some(p) = fwd.poll_deliver(to_ns(now)) {
            let f = &mut flows[p.flow];
            let hdr = p.header.as_bytes();
            let total = hdr.len() + p.payload.map_or(0, |r| r.len as usize);
            scratch[..hdr.len()].copy_from_slice(hdr);
            let data = &scratch[..total];
            let to_server = f.server.as_ref().is_some_and(|s| {
                Some(s.socket_id()) == Some(u32::from_be_bytes(data[12..16].try_into().unwrap()))
                    || handshake_socket_id(data) == Some(s.peer_socket_id())
            });
            if to_server {
                let id = next_buf;
                next_buf += 1;
                let at = Extent {
                    buf: id,
                    offset: 0,
                    len: total as u32,
                };
                if f.server.as_mut().unwrap().handle_datagram(now, data, at) {
                    match p.payload {
                        Some(r) => {
                            f.unique[bin] += u64::from(r.len);
                            f.held.insert(id, r);
                        }
                        None => rep
                            .violations
                            .push(format!("flow {}: control packet retained", p.flow)),
                    }
                }
            } else {
                match f.listener.handle(now, f.addr, data) {
                    ListenerOutput::Reply(h) => {
                        let pkt = Pkt {
                            flow: p.flow,
                            header: h,
                            payload: None,
                        };
                        let _ = rev.handle_datagram(to_ns(now), h.as_bytes().len(), pkt);
                    }
                    ListenerOutput::Accept(c) => f.server = Some(c),
                    ListenerOutput::Drop(_) => {}
                }
            }
        }
        for f in &mut flows {
            for c in [f.client.as_mut(), f.server.as_mut()].into_iter().flatten() {
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
            }
        }
    }
    for (q, n) in rep.queue_mean.iter_mut().zip(&rep.samples_per_bin) {
        if *n > 0 {
            *q /= *n as f64;
        }
    }
    for (i, f) in flows.iter_mut().enumerate() {
        for b in 0..bins {
            let n = rep.samples_per_bin[b].max(1) as f64;
            f.rtt[b] /= n;
        }
        let Some(c) = f.client.as_ref() else {
            rep.violations.push(format!("flow {i}: never started"));
            continue;
        };
        if c.is_closed() {
            rep.violations.push(format!("flow {i}: client closed"));
        }
        let st = c.stats();
        rep.sent.push(st.pkts_sent);
        rep.retransmitted.push(st.pkts_retransmitted);
        rep.connected_at.push(f.connected_at.unwrap_or(u64::MAX));
        rep.delivered_msgs.push(f.next_msg);
        match f.server.as_mut() {
            None => rep.violations.push(format!("flow {i}: never accepted")),
            Some(s) => {
                // Closing gives every retained buffer back.
                s.close(now);
                while let Some(ext) = s.poll_release() {
                    if f.held.remove(&ext.buf).is_none() {
                        rep.violations
                            .push(format!("flow {i}: released unknown {ext:?}"));
                    }
                }
                if s.held() != 0 || !f.held.is_empty() {
                    rep.violations.push(format!(
                        "flow {i}: {} regions held, {} buffers not returned after close",
                        s.held(),
                        f.held.len()
                    ));
                }
            }
        }
        // Every message the sender saw acknowledged was delivered, once; none
        // delivered twice.
        for (m, (&a, &d)) in f.acked.iter().zip(&f.delivered).enumerate() {
            if d > 1 || (a && d != 1) {
                rep.violations
                    .push(format!("flow {i}: msg {m}: acked {a}, delivered {d} times"));
            }
        }
        rep.unique.push(std::mem::take(&mut f.unique));
        rep.rate.push(std::mem::take(&mut f.rate));
        rep.rtt.push(std::mem::take(&mut f.rtt));
        rep.flow_queue_drops.push(f.queue_drops);
        rep.flow_random_losses.push(f.random_losses);
    }
    rep
}

impl Report {
    fn sc(&self) -> Scenario {
        self.sc.unwrap()
    }

    /// Start of the steady-state window: [`WARMUP_US`] after the last flow
    /// started.
    fn steady(&self) -> u64 {
        let sc = self.sc();
        (sc.flows as u64 - 1) * sc.stagger_us + WARMUP_US
    }

    /// Bins `[from_us, end)`.
    fn window(&self, from_us: u64) -> std::ops::Range<usize> {
        (from_us / BIN_US) as usize..(self.sc().duration_us / BIN_US) as usize
    }

    /// Per-flow goodput from `from_us` to the end, bytes/s.
    fn flow_goodput(&self, from_us: u64) -> Vec<f64> {
        let w = self.window(from_us);
        let secs = (w.end - w.start) as f64 * BIN_US as f64 / 1e6;
        self.unique
            .iter()
            .map(|u| u[w.clone()].iter().sum::<u64>() as f64 / secs)
            .collect()
    }

    fn aggregate(&self, from_us: u64) -> f64 {
        self.flow_goodput(from_us).iter().sum()
    }

    /// Aggregate goodput from `from_us` over the link's payload capacity.
    fn utilization(&self, from_us: u64) -> f64 {
        self.aggregate(from_us) / payload_capacity_bps(self.sc().loss)
    }

    /// Utilization from the first flow's `Connected` to the end (the grid's
    /// measure; the handshake is left out, the start is not).
    fn utilization_from_connect(&self) -> f64 {
        let start = self.connected_at.iter().copied().min().unwrap_or(0);
        let bytes: u64 = self.unique.iter().flat_map(|u| u.iter()).sum();
        let secs = (self.sc().duration_us - start) as f64 / 1e6;
        bytes as f64 / secs / payload_capacity_bps(self.sc().loss)
    }

    /// Jain's fairness index of the flows' goodput from `from_us`.
    fn jain(&self, from_us: u64) -> f64 {
        let x = self.flow_goodput(from_us);
        let s: f64 = x.iter().sum();
        let s2: f64 = x.iter().map(|v| v * v).sum();
        if s2 == 0.0 {
            return 0.0;
        }
        s * s / (x.len() as f64 * s2)
    }

    fn total(v: &[u64]) -> u64 {
        v.iter().sum()
    }

    /// Tail drops over datagrams offered to the forward link, whole run.
    fn queue_drop_fraction(&self) -> f64 {
        Self::total(&self.queue_drops) as f64 / Self::total(&self.offered).max(1) as f64
    }

    /// Mean sampled queue from `from_us`, bytes.
    fn queue_mean_from(&self, from_us: u64) -> f64 {
        let w = self.window(from_us);
        let n = (w.end - w.start) as f64;
        self.queue_mean[w].iter().sum::<f64>() / n
    }

    fn summary(&self) -> String {
        let sc = self.sc();
        let from = self.steady();
        let mbps = |b: f64| b * 8.0 / 1e6;
        let per_flow: Vec<String> = self
            .flow_goodput(from)
            .iter()
            .map(|&g| format!("{:.1}", mbps(g)))
            .collect();
        let sent: u64 = Self::total(&self.sent);
        let retx: u64 = Self::total(&self.retransmitted);
        let offered = Self::total(&self.offered);
        let early = (0..sc.flows)
            .map(|i| {
                self.unique[i][..(from / BIN_US) as usize]
                    .iter()
                    .sum::<u64>()
            })
            .sum::<u64>();
        let drops_after: u64 = self.queue_drops[self.window(from)].iter().sum();
        format!(
            "N={} stagger {} s, cap {} Mbit/s each, {} s virtual, steady state from {} s:\n\
             \x20 aggregate {:.2} Mbit/s = {:.1} % of payload capacity {:.2} Mbit/s \
             ({:.1} % from first Connected; first {} s: {:.1} Mbit/s)\n\
             \x20 per flow (Mbit/s) [{}], Jain {:.4}\n\
             \x20 forward datagrams offered {}: queue overflow {} ({:.2} %; {} after {} s), \
             random loss {} ({:.3} %)\n\
             \x20 per flow overflow {:?}\n\
             \x20 data sent {} + retransmitted {} ({:.2} %)\n\
             \x20 queue: max {:.2} MB of {:.2} (sampled {:.2}), mean after {} s {:.2} MB\n\
             \x20 delivered msgs per flow {:?}; violations {}",
            sc.flows,
            sc.stagger_us as f64 / 1e6,
            sc.max_rate_bps as f64 / 1e6,
            sc.duration_us / 1_000_000,
            from / 1_000_000,
            mbps(self.aggregate(from)),
            100.0 * self.utilization(from),
            mbps(payload_capacity_bps(sc.loss)),
            100.0 * self.utilization_from_connect(),
            from / 1_000_000,
            mbps(early as f64 / (from as f64 / 1e6)),
            per_flow.join(", "),
            self.jain(from),
            offered,
            Self::total(&self.queue_drops),
            100.0 * self.queue_drop_fraction(),
            drops_after,
            from / 1_000_000,
            Self::total(&self.random_losses),
            100.0 * Self::total(&self.random_losses) as f64 / offered.max(1) as f64,
            self.flow_queue_drops,
            sent,
            retx,
            100.0 * retx as f64 / sent.max(1) as f64,
            self.queue_peak as f64 / 1e6,
            QUEUE_BYTES as f64 / 1e6,
            self.queue_max.iter().copied().max().unwrap_or(0) as f64 / 1e6,
            from / 1_000_000,
            self.queue_mean_from(from) / 1e6,
            self.delivered_msgs,
            self.violations.len(),
        )
    }

    /// Per second: goodput, queue, drops, and each flow's pacing rate and RTT.
    fn trace(&self) -> String {
        let sc = self.sc();
        let mut s = String::from(
            "   t  good Mb/s  q mean/max MB  ovfl  loss \
             | pacing Mbit/s per flow (sum) | srtt ms per flow\n",
        );
        for b in 0..(sc.duration_us / BIN_US) as usize {
            let good: u64 = self.unique.iter().map(|u| u[b]).sum();
            let rates: Vec<String> = self.rate.iter().map(|r| format!("{:.0}", r[b])).collect();
            let sum: f64 = self.rate.iter().map(|r| r[b]).sum();
            let rtts: Vec<String> = self.rtt.iter().map(|r| format!("{:.0}", r[b])).collect();
            s.push_str(&format!(
                "{:>4}  {:>9.1}  {:>5.2}/{:>5.2}  {:>5}  {:>4} | {} ({:.0}) | {}\n",
                b,
                good as f64 * 8.0 / 1e6 / (BIN_US as f64 / 1e6),
                self.queue_mean[b] / 1e6,
                self.queue_max[b] as f64 / 1e6,
                self.queue_drops[b],
                self.random_losses[b],
                rates.join(" "),
                sum,
                rtts.join(" "),
            ));
        }
        s
    }

    fn print(&self) {
        eprintln!("{}", self.summary());
        if std::env::var_os("LU2K_SHARED_TRACE").is_some() {
            eprintln!("{}", self.trace());
        }
    }
}

/// The eight-flow run, shared by the tests that read it.
fn eight() -> &'static Report {
    static EIGHT: OnceLock<Report> = OnceLock::new();
    EIGHT.get_or_init(|| {
        let r = run(&Scenario::new(8));
        r.print();
        r
    })
}

/// Eight flows joining 5 s apart: each newcomer's fast start lands on a
/// link the others already fill. Measured from 10 s after the last joins.
fn staggered() -> &'static Report {
    static STAGGERED: OnceLock<Report> = OnceLock::new();
    STAGGERED.get_or_init(|| {
        let sc = Scenario {
            stagger_us: 5_000_000,
            duration_us: 80_000_000,
            ..Scenario::new(8)
        };
        let r = run(&sc);
        r.print();
        r
    })
}

/// What a gateway operator needs, as a list of what was missed.
fn goals_missed(r: &Report) -> Vec<String> {
    let mut missed = Vec::new();
    let util = r.utilization(r.steady());
    if util < 0.90 {
        missed.push(format!("utilization {:.1} % < 90 %", 100.0 * util));
    }
    let jain = r.jain(r.steady());
    if jain < 0.95 {
        missed.push(format!("Jain {jain:.3} < 0.95"));
    }
    let drops = r.queue_drop_fraction();
    if drops >= 0.01 {
        missed.push(format!(
            "queue overflow {:.2} % of datagrams >= 1 %",
            100.0 * drops
        ));
    }
    missed
}

/// Whatever the controller does: every message is delivered whole, in
/// order and once; every acknowledged message was delivered; no connection
/// closes; every buffer comes back; and every flow gets some of the link.
#[test]
fn eight_flows_deliver_every_message_once() {
    for r in [eight(), staggered()] {
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        let missed = goals_missed(r);
        if !missed.is_empty() {
            eprintln!("uncapped: gateway goals missed: {missed:?}");
        }
        for (i, &m) in r.delivered_msgs.iter().enumerate() {
            assert!(m > 0, "flow {i} delivered nothing");
        }
    }
}

/// Eight peers keep the link busy: ≥ 90 % of its payload capacity.
#[test]
fn eight_flows_keep_the_link_busy() {
    let r = eight();
    let util = r.utilization(r.steady());
    assert!(util >= 0.90, "utilization {:.1} %", 100.0 * util);
}

/// One and two flows on the same link, for comparison with eight.
#[test]
fn one_and_two_flows_for_comparison() {
    for n in [1, 2] {
        let r = run(&Scenario::new(n));
        r.print();
        assert!(r.violations.is_empty(), "N={n}: {:?}", r.violations);
        if !goals_missed(&r).is_empty() {
            eprintln!("N={n}: gateway goals missed: {:?}", goals_missed(&r));
        }
    }
}

/// Eight peers each capped at their share of the link (`max_rate_bps`, as a
/// gateway operator provisions a transponder's peers), at once and 5 s apart:
/// the gateway goals hold.
#[test]
fn eight_flows_capped_at_their_share_meet_gateway_goals() {
    let flows = 8;
    let share = (RATE_MBPS * 1e6 / f64::from(flows)) as u64;
    for stagger_us in [0, 5_000_000] {
        let r = run(&Scenario {
            stagger_us,
            duration_us: DURATION_US + 8 * stagger_us,
            max_rate_bps: share,
            ..Scenario::new(flows as usize)
        });
        r.print();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        let missed = goals_missed(&r);
        assert!(missed.is_empty(), "gateway goals missed: {missed:?}");
        // No flow beyond its cap: payload of 1456 per 1500-byte packet.
        for (i, g) in r.flow_goodput(r.steady()).iter().enumerate() {
            let cap = share as f64 / 8.0 * 1456.0 / 1500.0;
            assert!(*g <= cap * 1.005, "flow {i}: {g} B/s above its cap {cap}");
        }
    }
}
