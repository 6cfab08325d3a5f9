//! The lu2k contender: a kshim + engine pair per side.
//!
//! Each side is one node process (see [`crate::node`]) that starts kshim (the
//! LND-shaped kernel half, as a library), then an engine as its own child
//! process (`lu2k-perf __engine SPEC`, which runs `lu2k_engine::daemon::run`,
//! the very code of the `lu2k-engine` binary), waits for the engine to
//! attach, and moves LNet messages: 1 MiB PUTs for bulk, PUTs echoed by PUTs
//! for rpc, scheduled PUTs for live (`hdr_data` = when the chunk was due on
//! the monotonic clock, `match_bits` = its index; see [`LiveSchedule`]),
//! after one chunk-sized warm-up PUT, delivered before the schedule starts
//! (the stream transports send and answer a warm-up chunk too). A bulk
//! sender first sends one 64-byte PUT, delivered before its clock starts,
//! as the stream transports connect before theirs. The engines
//! talk UDT over UDP; where the path is the relay, each engine's peer entry
//! points at the relay, and the relay's sockets sit on the other node's NID
//! address so that the engines see their peers at the addresses their NIDs
//! name.
//!
//! Bulk payloads are sent from TX pool buffers as they are (LNet hands lu2k
//! data that already sits there); content is not verified here — the
//! engine's end-to-end tests verify every byte.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lu2k_engine::transport::links::{LinkCfg, Policy};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::{Config, Event, Kshim, Nid, TxStatus};
use serde::{Deserialize, Serialize};

use crate::node::{
    live_note, mono_ns, mono_ns_at, self_command, LiveSchedule, NodeResult, NodeSpec, Role, Ticker,
};
use crate::scenario::{Workload, WorkloadKind};

/// An LNet message's bytes at most (and the bulk message size).
pub const MSG: usize = lu2k_kshim::MAX_PAYLOAD;
/// UDT payload bytes per 1500-byte packet (IP 20 + UDP 8 + UDT 16 headers).
const PAYLOAD_PER_PACKET: u64 = 1456;

/// What `__engine` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineSpec {
    /// kshim's socket.
    pub kshim_socket: PathBuf,
    /// Address to bind (the wildcard where a peer has several links).
    pub bind: IpAddr,
    /// The engine's UDP port.
    pub port: u16,
    /// Stats socket.
    pub stats_socket: PathBuf,
    /// Reactor threads.
    pub cores: u16,
    /// `[[peer]]` entries.
    pub peers: Vec<EnginePeer>,
    /// A pre-shared key file: the sealed wire.
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
}

/// One `[[peer]]` of an engine: at `addr`, or over several links.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnginePeer {
    /// The peer's NID address.
    pub nid_ip: IpAddr,
    /// Where its engine is reached (the relay), for a peer with one link.
    pub addr: Option<SocketAddr>,
    /// Its links (`[[peer.link]]`), for a peer with several.
    #[serde(default)]
    pub links: Vec<LinkCfg>,
    /// How they are used.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// `max_rate_mbps` of the `[[peer]]`.
    #[serde(default)]
    pub max_rate_mbps: Option<f64>,
}

/// `lu2k-perf __engine SPEC`: runs the engine daemon in this process.
pub fn engine_main(spec: &str) -> Result<()> {
    let s: EngineSpec = serde_json::from_str(spec).context("engine spec")?;
    // FEC to the peer (the lu2k-fec contender): set by the node that starts
    // the engine, as `LU2K_PERF_FEC=live`.
    let fec = match std::env::var("LU2K_PERF_FEC").as_deref() {
        Ok("live") => Some(lu2k_engine::daemon::config::FecChoice::Live),
        Ok(other) => anyhow::bail!("LU2K_PERF_FEC={other}: use live, or leave it unset"),
        Err(_) => None,
    };
    // The engine's log on stderr when asked for (e.g. `LU2K_PERF_ENGINE_LOG=info`):
    // quiet by default, as the harness prints its own summary.
    if let Ok(level) = std::env::var("LU2K_PERF_ENGINE_LOG") {
        lu2k_engine::log::init(Some(&level)).map_err(|e| anyhow::anyhow!("engine log: {e}"))?;
    }
    let mut c = lu2k_engine::daemon::config::Config {
        kshim_socket: Some(s.kshim_socket),
        bind: s.bind,
        port: s.port,
        cores: Some(s.cores),
        stats_socket: s.stats_socket,
        ..Default::default()
    };
    // The engine's config reads an absent `addr` (a peer with links) as 0.0.0.0:0.
    let no_addr = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    c.peers = s
        .peers
        .iter()
        .map(|p| lu2k_engine::daemon::config::PeerCfg {
            nid: format!("{}@lu2k", p.nid_ip),
            addr: p.addr.unwrap_or(no_addr),
            links: p.links.clone(),
            policy: p.policy,
            fec: fec.unwrap_or_default(),
            max_rate_mbps: p.max_rate_mbps,
        })
        .collect();
    c.psk_file = s.psk_file;
    // The engines' `gather_us` (see the engine's config), for A/B runs of
    // its effect (`LU2K_PERF_GATHER_US=0`: cores never gather).
    if let Ok(v) = std::env::var("LU2K_PERF_GATHER_US") {
        c.gather_us = v
            .parse()
            .with_context(|| format!("LU2K_PERF_GATHER_US={v}: microseconds, e.g. 0 or 1000"))?;
    }
    c.validate()?;
    lu2k_engine::daemon::run(c)
}

fn nid(ip: IpAddr) -> Nid {
    format!("{ip}@lu2k")
        .parse()
        .expect("a NID of an IP address")
}

const PID: u32 = 12345;

/// `match_bits` of the sender's warm-up message (not part of the transfer).
const WARM_UP: u64 = u64::MAX;

/// Payload of the bulk sender's connecting PUT (see [`send_puts`]).
const CONNECT_LEN: usize = 64;

/// Sends one PUT outside the transfer and waits until it is delivered, so
/// that the engines' connection is up before the clock starts — as the other
/// contenders connect before theirs: chunk-sized before a live stream (below),
/// 64 bytes before a bulk transfer ([`CONNECT_LEN`]).
///
/// Chunk-sized unless the workload's `warmup_bytes` says otherwise, as every
/// contender's warm-up (TCP's and UDT4's are the same message answered by a
/// byte): every stream is measured as one already flowing, and no contender
/// starts it from a connection warmed differently.
fn warm_up(side: &mut Side, len: usize, limit: Duration) -> Result<()> {
    let buf = side.k.alloc_tx(len).context("TX pool")?;
    side.k
        .send_buf_to(
            side.peer,
            &tagged_put(side.me, side.peer, len, WARM_UP, 0),
            buf,
        )
        .context("warm-up send")?;
    let start = Instant::now();
    while start.elapsed() < limit {
        match side.k.wait(Some(Duration::from_millis(20))) {
            Some(Event::TxDone { status, .. }) => {
                if status == TxStatus::Ok {
                    return Ok(());
                }
                bail!("the warm-up message failed: {status:?}");
            }
            Some(Event::EngineGone(g)) => bail!("the engine went away: {g:?}"),
            Some(Event::Rx(m)) => side.k.rx_done(m),
            _ => {}
        }
    }
    bail!("the warm-up message was not delivered within {limit:?}")
}

fn put(from: Nid, to: Nid, len: usize, data: u64) -> Repr {
    tagged_put(from, to, len, data, data)
}

fn tagged_put(from: Nid, to: Nid, len: usize, match_bits: u64, hdr_data: u64) -> Repr {
    Repr {
        // LNet's header holds 64-bit NIDs; an IPv6 NID travels beside it
        // (Kshim::send_buf_to) and the header says LNET_NID_ANY.
        dest_nid: to.nid4().unwrap_or(u64::MAX),
        src_nid: from.nid4().unwrap_or(u64::MAX),
        dest_pid: PID,
        src_pid: PID,
        payload_length: len as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits,
            hdr_data,
            ptl_index: 42,
            offset: 0,
        },
    }
}

/// A kshim with its engine process.
struct Side {
    k: Kshim,
    engine: std::process::Child,
    stats: PathBuf,
    me: Nid,
    peer: Nid,
}

impl Side {
    fn start(spec: &NodeSpec) -> Result<Side> {
        let l = spec.lu2k.as_ref().context("lu2k settings missing")?;
        std::fs::create_dir_all(&l.dir)?;
        let tag = match spec.role {
            Role::Send => "a",
            Role::Recv => "b",
        };
        let ksock = l.dir.join(format!("kshim-{tag}.sock"));
        let stats = l.dir.join(format!("stats-{tag}.sock"));
        let mut cfg = Config::new(vec![nid(l.ip)], &ksock);
        cfg.cores = u32::from(l.cores);
        cfg.rx_buf_count = l.rx_bufs;
        if let Some(v) = l.tx_pool {
            cfg.tx_pool_len = v;
        }
        let mut k = Kshim::start(cfg).context("starting kshim")?;
        let espec = EngineSpec {
            kshim_socket: ksock.clone(),
            bind: l.bind,
            port: l.port,
            stats_socket: stats.clone(),
            cores: l.cores,
            peers: (l.peer_addr.is_some() || !l.links.is_empty())
                .then(|| EnginePeer {
                    nid_ip: l.peer_ip,
                    addr: l.peer_addr,
                    links: l.links.clone(),
                    policy: l.policy,
                    max_rate_mbps: l.max_rate_mbps,
                })
                .into_iter()
                .collect(),
            psk_file: l.psk_file.clone(),
        };
        let mut cmd = self_command()?;
        if l.fec {
            cmd.env("LU2K_PERF_FEC", "live");
        }
        cmd.arg("__engine")
            .arg(serde_json::to_string(&espec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let engine = cmd.spawn().context("starting the engine")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !k.is_attached() {
            if Instant::now() > deadline {
                bail!("the engine did not attach to kshim within 20 s");
            }
            if let Some(Event::EngineGone(r)) = k.wait(Some(Duration::from_millis(20))) {
                bail!("the engine went away while attaching: {r:?}");
            }
        }
        Ok(Side {
            k,
            engine,
            stats,
            me: nid(l.ip),
            peer: nid(l.peer_ip),
        })
    }

    /// Engine counters: (retransmitted bytes, payload bytes copied, a summary
    /// of drops and failures for the report's note).
    fn counters(&self) -> (Option<u64>, Option<u64>, Option<String>) {
        match lu2k_engine::daemon::stats::fetch(&self.stats) {
            Ok(r) => {
                let mut notes = Vec::new();
                for c in &r.cores {
                    for (why, n) in &c.drops {
                        notes.push(format!("{why} {n}"));
                    }
                    if c.io.socket_drops > 0 {
                        // The host's, not the link's: the receive queue overflowed.
                        notes.push(format!("socket receive-queue drops {}", c.io.socket_drops));
                    }
                    let f = &c.fec;
                    if f.coded_bytes > 0 {
                        notes.push(format!(
                            "fec: coded {} B, {} repairs ({} B), {} over budget, sized for {:.1} \u{2030} loss",
                            f.coded_bytes, f.repairs_sent, f.repair_bytes, f.repairs_over_budget, f.loss_permille
                        ));
                    }
                    if f.repairs_received > 0 {
                        notes.push(format!(
                            "fec: {} repairs received ({} bad), {} packets rebuilt ({} unneeded, {} no room), {} groups short",
                            f.repairs_received, f.bad_repairs, f.rebuilt, f.rebuilt_unneeded, f.rebuilt_no_room, f.groups_unrecoverable
                        ));
                    }
                    for p in &c.peers {
                        notes.push(format!(
                            "peer {}: msgs tx {} rx {}, in flight {}, rtt {} ms, rate {:.1} Mbit/s",
                            p.nid,
                            p.msgs_tx,
                            p.msgs_rx,
                            p.in_flight,
                            p.rtt_us / 1000,
                            p.rate_bps as f64 / 1e6
                        ));
                        for (why, n) in &p.failed {
                            notes.push(format!("failed {why} {n}"));
                        }
                    }
                }
                let note = (!notes.is_empty()).then(|| notes.join(", "));
                let retrans: u64 = r
                    .cores
                    .iter()
                    .flat_map(|c| c.peers.iter())
                    .map(|p| p.retransmissions)
                    .sum();
                (
                    Some(retrans * PAYLOAD_PER_PACKET),
                    Some(r.payload_copied()),
                    note,
                )
            }
            Err(e) => {
                eprintln!("lu2k: engine stats unavailable: {e}");
                (None, None, None)
            }
        }
    }

    /// Peak resident memory of this node, MiB: the engine's (read while it
    /// runs) plus this process's (kshim's region and threads).
    fn peak_rss_mib(&self) -> Option<f64> {
        let engine = vm_hwm_kib(&format!("/proc/{}/status", self.engine.id()))?;
        let own = vm_hwm_kib("/proc/self/status")?;
        Some((engine + own) as f64 / 1024.0)
    }

    fn close(mut self) {
        drop(self.k);
        // The engine outlives its kshim (it waits to attach to the next
        // one); SIGTERM is how it is told to stop.
        let pid = nix::unistd::Pid::from_raw(self.engine.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.engine.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lu2k: engine did not exit 10 s after SIGTERM; killing it");
        let _ = self.engine.kill();
        let _ = self.engine.wait();
    }
}

/// Runs one lu2k node (see the module docs).
pub fn node(spec: &NodeSpec) -> Result<NodeResult> {
    let mut side = Side::start(spec)?;
    let w = &spec.workload;
    let mut r = match (w.kind, spec.role) {
        (WorkloadKind::Bulk, Role::Send) | (WorkloadKind::Live, Role::Send) => {
            send_puts(&mut side, w)?
        }
        (WorkloadKind::Bulk, Role::Recv) | (WorkloadKind::Live, Role::Recv) => {
            receive_puts(&mut side, w)?
        }
        (WorkloadKind::Rpc, Role::Send) => ask(&mut side, w)?,
        (WorkloadKind::Rpc, Role::Recv) => answer(&mut side, w)?,
    };
    add_engine_counters(&side, spec.role, &mut r);
    r.max_rss_mib = side.peak_rss_mib();
    side.close();
    Ok(r)
}

/// Bulk or live sender: 1 MiB PUTs as fast as the in-flight limit and the
/// TX pool let, or (live) each chunk when it is due, after the warm-up.
fn send_puts(side: &mut Side, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let mut failed = 0u64;
    let (count, len, sched) = if w.kind == WorkloadKind::Bulk {
        (w.bytes.div_ceil(MSG as u64), MSG, None)
    } else {
        let sched = LiveSchedule::of(w);
        (sched.chunks, w.chunk_bytes as usize, Some(sched))
    };
    if sched.is_some() {
        warm_up(side, w.warmup_len(), cap)?;
    } else {
        // lu2k has no connect call: the engine dials a peer on its first
        // message. Every other contender connects before its clock starts
        // (TCP's, UDT4's and QUIC's connect, SRT's caller), so a bulk run
        // first sends one small PUT and waits until it is delivered: the
        // connection is up, with one round-trip sample, as a TCP handshake
        // leaves one. Too small to carry a packet pair, it tells the
        // controller nothing of the path's capacity.
        warm_up(side, CONNECT_LEN, cap)?;
    }
    let start = Instant::now();
    let start_ns = mono_ns();
    r.first_send_ns = Some(start_ns);
    let limit = cap + Duration::from_secs_f64(w.duration_s);
    let (mut sent, mut done) = (0u64, 0u64);
    let in_flight = w.in_flight.map_or(u64::MAX, u64::from);
    while done < count && start.elapsed() < limit {
        while sent < count && sent - done < in_flight {
            let h = if let Some(sc) = sched {
                // Stamped with when it was due, not when kshim took it.
                let due = sc.due_ns(start_ns, sent);
                if mono_ns() < due {
                    break;
                }
                tagged_put(side.me, side.peer, len, sent, due)
            } else {
                put(side.me, side.peer, len, sent)
            };
            let Ok(buf) = side.k.alloc_tx(len) else { break };
            if side.k.send_buf_to(side.peer, &h, buf).is_err() {
                break;
            }
            sent += 1;
        }
        // A live sender wakes often enough to send each chunk near its due time.
        let wait = if sched.is_some() { 1 } else { 20 };
        if let Some(ev) = side.k.wait(Some(Duration::from_millis(wait))) {
            match ev {
                Event::TxDone { status, .. } => {
                    done += 1;
                    if status == TxStatus::Ok {
                        r.bytes += len as u64;
                    } else {
                        failed += 1;
                    }
                }
                Event::EngineGone(g) => bail!("the engine went away: {g:?}"),
                Event::Rx(m) => side.k.rx_done(m),
                _ => {}
            }
        }
    }
    if failed > 0 {
        r.note = Some(format!("{failed} sends failed back"));
    }
    Ok(r)
}

/// Bulk or live receiver: counts what arrives until the whole workload is in
/// or the time is up; live, it also times each chunk's delivery.
fn receive_puts(side: &mut Side, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let sched = (w.kind == WorkloadKind::Live).then(|| LiveSchedule::of(w));
    let target = match sched {
        None => w.bytes,
        Some(sc) => sc.chunks * u64::from(w.chunk_bytes),
    };
    let mut live = sched.map(LiveTally::new);
    let limit = if w.kind == WorkloadKind::Bulk {
        cap
    } else {
        cap + Duration::from_secs_f64(w.duration_s)
    };
    let mut tick = Ticker::new();
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    while r.bytes < target && start.elapsed() < limit {
        match side.k.wait(Some(Duration::from_millis(20))) {
            Some(Event::Rx(m)) if matches!(m.hdr.msg, Msg::Put { match_bits, .. } if match_bits == WARM_UP) =>
            {
                // The sender's warm-up (live) or connecting PUT (bulk),
                // before the transfer.
                side.k.rx_done(m);
            }
            Some(Event::Rx(m)) => {
                let now = Instant::now();
                if first.is_none() {
                    first = Some(now);
                    r.first_bytes = m.len() as u64;
                }
                last = now;
                r.bytes += m.len() as u64;
                if let (
                    Some(l),
                    Msg::Put {
                        hdr_data,
                        match_bits,
                        ..
                    },
                ) = (&mut live, m.hdr.msg)
                {
                    l.arrived(match_bits, hdr_data, &mut r);
                }
                side.k.rx_done(m);
            }
            Some(Event::EngineGone(g)) => bail!("the engine went away: {g:?}"),
            _ => {}
        }
        tick.tick(r.bytes);
    }
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| mono_ns_at(last));
    if let Some(l) = live {
        l.finish(&mut r);
    }
    Ok(r)
}

/// A live receiver's record of the stream's chunks.
struct LiveTally {
    sched: LiveSchedule,
    /// Which chunks arrived, by index.
    arrived: Vec<bool>,
    /// The stream's start on the monotonic clock, from the first chunk in.
    stream_start: Option<u64>,
}

impl LiveTally {
    fn new(sched: LiveSchedule) -> LiveTally {
        LiveTally {
            sched,
            arrived: vec![false; sched.chunks as usize],
            stream_start: None,
        }
    }

    /// Chunk `index`, due at `due_ns`, is in: its latency is a sample unless
    /// it arrived before.
    fn arrived(&mut self, index: u64, due_ns: u64, r: &mut NodeResult) {
        let fresh = self
            .arrived
            .get_mut(index as usize)
            .is_some_and(|a| !std::mem::replace(a, true));
        if fresh {
            r.samples_us
                .push(mono_ns().saturating_sub(due_ns) as f64 / 1e3);
            self.stream_start
                .get_or_insert(self.sched.start_ns(index, due_ns));
        }
    }

    /// The receiver stopped: the missing chunks count at their age, and the
    /// note says how many arrived.
    fn finish(self, r: &mut NodeResult) {
        let sc = self.sched;
        // Messages may complete out of order: the missing ones are any.
        let missing = (0..sc.chunks).filter(|&i| !self.arrived[i as usize]);
        let censored = self
            .stream_start
            .map_or(Vec::new(), |s0| sc.censored_us(s0, mono_ns(), missing));
        let delivered = self.arrived.iter().filter(|&&a| a).count() as u64;
        r.note = Some(live_note(&sc, delivered, censored.len()));
        r.samples_us.extend(censored);
    }
}

/// rpc client: `count` PUTs, each answered by a PUT, one at a time; every
/// round trip but the first is a sample.
fn ask(side: &mut Side, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let size = w.size as usize;
    let start = Instant::now();
    let mut tick = Ticker::new();
    for i in 0..=w.count {
        if start.elapsed() > cap {
            r.note = Some(format!(
                "stopped after {} of {} round trips (max_duration_s)",
                r.samples_us.len(),
                w.count
            ));
            break;
        }
        let t = Instant::now();
        let buf = side.k.alloc_tx(size).context("TX pool")?;
        side.k
            .send_buf_to(side.peer, &put(side.me, side.peer, size, u64::from(i)), buf)
            .context("send")?;
        let mut got = false;
        while !got && start.elapsed() <= cap {
            match side.k.wait(Some(Duration::from_millis(20))) {
                Some(Event::Rx(m)) => {
                    got =
                        matches!(m.hdr.msg, Msg::Put { hdr_data, .. } if hdr_data == u64::from(i));
                    side.k.rx_done(m);
                }
                Some(Event::EngineGone(g)) => bail!("the engine went away: {g:?}"),
                _ => {}
            }
        }
        if got && i > 0 {
            // The first round trip includes connection set-up.
            r.samples_us.push(t.elapsed().as_secs_f64() * 1e6);
            r.bytes += 2 * size as u64;
        }
        tick.tick(r.bytes);
    }
    Ok(r)
}

/// rpc server: answers each PUT with a PUT of the same size and `hdr_data`.
fn answer(side: &mut Side, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let start = Instant::now();
    let mut tick = Ticker::new();
    let mut answered = 0u32;
    while answered <= w.count && start.elapsed() < cap + Duration::from_secs(20) {
        match side.k.wait(Some(Duration::from_millis(20))) {
            Some(Event::Rx(m)) => {
                if let Msg::Put { hdr_data, .. } = m.hdr.msg {
                    let len = m.len();
                    side.k.rx_done(m);
                    let buf = side.k.alloc_tx(len).context("TX pool")?;
                    side.k
                        .send_buf_to(side.peer, &put(side.me, side.peer, len, hdr_data), buf)
                        .context("reply")?;
                    answered += 1;
                    r.bytes += len as u64;
                    tick.tick(r.bytes);
                } else {
                    side.k.rx_done(m);
                }
            }
            Some(Event::EngineGone(g)) => bail!("the engine went away: {g:?}"),
            _ => {}
        }
    }
    // Let the last replies be acknowledged.
    let t = Instant::now();
    while side.k.pending() > 0 && t.elapsed() < Duration::from_secs(5) {
        let _ = side.k.wait(Some(Duration::from_millis(20)));
    }
    Ok(r)
}

/// Adds the engine's counters to `r`: retransmissions, copies, and its
/// drops and failures to the note.
fn add_engine_counters(side: &Side, role: Role, r: &mut NodeResult) {
    let (retrans, copied, engine) = side.counters();
    r.retrans_bytes = retrans;
    r.copied_bytes = copied;
    if let Some(e) = engine {
        let side = if role == Role::Send {
            "sending"
        } else {
            "receiving"
        };
        let e = format!("{side} engine: {e}");
        r.note = Some(match r.note.take() {
            Some(n) => format!("{n}; {e}"),
            None => e,
        });
    }
}

/// `VmHWM` (peak resident set, KiB) from a `/proc/PID/status` file.
pub fn vm_hwm_kib(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::vm_hwm_kib;

    #[test]
    fn peak_rss_follows_memory_touched() {
        let before = vm_hwm_kib("/proc/self/status").expect("VmHWM of this process");
        assert!(before > 0);
        // 96 MiB written page by page: the peak rises by about that much.
        let mut v = vec![0u8; 96 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        let after = vm_hwm_kib("/proc/self/status").unwrap();
        assert!(
            after >= before + (90 << 10),
            "VmHWM {before} -> {after} KiB"
        );
        assert_eq!(vm_hwm_kib("/proc/self/no-such-file"), None);
    }
}
