//! `lu2k-perf gateway`: a gateway full of peers (issue 15 item 3).
//!
//! N sending nodes and N receiving nodes, each its own kshim + engine (one
//! engine per NID, as in production), pair *i* carrying bulk PUTs from sender
//! *i* to receiver *i*, every pair at once over ONE emulated link: one linkem
//! model ([`lu2k_linkem::Duplex`]) whose bottleneck queue, rate, delay and
//! losses all pairs share. linkem's [`lu2k_linkem::Relay`] is point to point,
//! so [`SharedLink`] puts the shared model behind a socket pair per pair,
//! each socket on the address of the node it stands for (as the single-pair
//! relay does), so every engine sees its peer at the address its NID names.
//!
//! Every PUT is verified byte for byte by its receiver: its payload is the
//! pair's 1 MiB block ([`crate::soak::payload`]) with the first 8 bytes of
//! every 4 KiB page stamped with (pair, sequence number, page), so a message
//! delivered to the wrong pair, twice, out of another message's bytes or
//! corrupted is counted as such ([`GwResult`]).
//!
//! TCP (BBR, CUBIC) runs N flows the same way: N receiving node processes in
//! one network namespace, N senders in the other, all through one TUN link.
//!
//! The file is a scenario file (`perf/scenarios/gateway.toml`) whose
//! `[[cell]]` entries may carry `pairs` (default 1); see [`GatewayFile`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::{Config, Event, Kshim, Nid, TxStatus};
use lu2k_linkem::{Direction, Duplex, DuplexConfig, TunConfig, TunLink};
use serde::{Deserialize, Serialize};

use crate::collect::{cpu_spent, cpu_ticks, load_avg, steal_share, CpuSnapshot, OthersWatch};
use crate::lu2k::{vm_hwm_kib, EnginePeer, EngineSpec, MSG};
use crate::node::{self, mono_ns, say, Kind, Line, Node, NodeSpec, Role, Ticker};
use crate::report::LoadAvg;
use crate::scenario::{Cell, Contender, Scenario};

/// Pairs in one cell at most: 2 × 64 engines on one host is already far
/// beyond what a small VM runs.
pub const MAX_PAIRS: u32 = 64;
/// UDT payload bytes per 1500-byte packet (IP 20 + UDP 8 + UDT 16 headers).
const PAYLOAD_PER_PACKET: u64 = 1456;
/// The page whose first word carries the stamp.
const STAMP_EVERY: usize = 4096;

/// `lu2k-perf gateway` arguments.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// The gateway scenario file, e.g. perf/scenarios/gateway.toml.
    pub scenario: PathBuf,
    /// The scenario's [quick] settings (shorter runs).
    #[arg(long)]
    pub quick: bool,
    /// Runs of each contender in each cell; the row is the median goodput's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Write the rows as a JSON array here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Only these contenders (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these cells (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub cells: Vec<String>,
    /// kshim RX buffers (64 KiB each) per lu2k node.
    #[arg(long, default_value_t = 32768)]
    pub lu2k_rx_bufs: u32,
}

// ------------------------------------------------------------------ the file

/// A gateway scenario: a scenario file whose cells say how many pairs share
/// the link. No `[grid]` (every cell names its pairs).
#[derive(Debug, Clone)]
pub struct GatewayFile {
    /// The scenario, `pairs` taken out of its cells.
    pub scenario: Scenario,
    /// Pairs per explicit cell, in the file's order.
    pub pairs: Vec<u32>,
}

impl GatewayFile {
    /// Parses and validates; errors name the field.
    pub fn parse(text: &str, path: &str) -> Result<GatewayFile> {
        let mut t: toml::Table =
            toml::from_str(text).with_context(|| format!("{path}: not TOML"))?;
        if t.contains_key("grid") {
            bail!("{path}: grid: a gateway file lists its cells as [[cell]] entries with `pairs`; remove [grid]");
        }
        let mut pairs = Vec::new();
        if let Some(cells) = t.get_mut("cell").and_then(|c| c.as_array_mut()) {
            for (i, c) in cells.iter_mut().enumerate() {
                let Some(c) = c.as_table_mut() else { continue };
                let n = match c.remove("pairs") {
                    None => 1,
                    Some(toml::Value::Integer(n)) if (1..=i64::from(MAX_PAIRS)).contains(&n) => {
                        n as u32
                    }
                    Some(v) => bail!(
                        "{path}: cell[{i}].pairs = {v}: give a whole number of sender/receiver pairs from 1 to {MAX_PAIRS}"
                    ),
                };
                if c.contains_key("link") || c.get("ipv6").and_then(|v| v.as_bool()) == Some(true) {
                    bail!("{path}: cell[{i}]: a gateway cell is one IPv4 link; remove [[cell.link]] and ipv6");
                }
                if c.contains_key("outage") {
                    bail!("{path}: cell[{i}].outage: the gateway cell has no outage; remove it");
                }
                pairs.push(n);
            }
        }
        let text = toml::to_string(&t).context("re-serialising the scenario")?;
        let scenario = Scenario::parse(&text, path)?;
        if scenario.workload.kind != crate::scenario::WorkloadKind::Bulk {
            bail!("{path}: workload.kind: the gateway cell moves bulk PUTs; set kind = \"bulk\"");
        }
        Ok(GatewayFile { scenario, pairs })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<GatewayFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        GatewayFile::parse(&text, &path.display().to_string())
    }

    /// The cells with their pairs (`--quick` applied).
    pub fn cells(&self, quick: bool) -> Vec<(Cell, u32)> {
        self.scenario
            .cells(quick)
            .into_iter()
            .zip(self.pairs.iter().copied())
            .collect()
    }
}

/// Jain's fairness index of `xs`: (Σx)² / (n · Σx²), 1 when all are equal,
/// 1/n when one has everything. None for no values or all zero.
pub fn jain(xs: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    (n > 0.0 && sq > 0.0).then(|| sum * sum / (n * sq))
}

// ------------------------------------------------------------ the shared link

/// The model, its datagrams tagged with their pair.
type SharedModel = Arc<Mutex<Duplex<(usize, Vec<u8>)>>>;

/// One link model shared by every pair: per pair a socket on the receiver's
/// address (where sender *i* sends; side A) and one on the sender's address
/// (where receiver *i* sends; side B). A thread per socket reads datagrams
/// into the model, stamped on arrival; one delivery thread sends each when
/// the model says, from the pair's other socket to the node's engine.
/// Reading threads block in `recv`; the delivery thread sleeps until the next
/// deadline (timer slack 1 ns) or at most 2 ms, which no deadline can fall
/// inside of: a datagram is delayed at least the one-way delay.
pub struct SharedLink {
    duplex: SharedModel,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Where sender *i* sends (on receiver *i*'s address).
    pub a: Vec<SocketAddr>,
    /// Where receiver *i* sends (on sender *i*'s address).
    pub b: Vec<SocketAddr>,
}

impl SharedLink {
    /// Binds the sockets and starts the threads. `pairs`: (sender, receiver)
    /// addresses; every engine listens on `port`.
    pub fn spawn(
        link: DuplexConfig,
        seed: u64,
        pairs: &[(Ipv4Addr, Ipv4Addr)],
        port: u16,
    ) -> Result<SharedLink> {
        let duplex: SharedModel = Arc::new(Mutex::new(
            Duplex::new(link, seed).context("the link's settings")?,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = std::time::Instant::now();
        let mut a_socks = Vec::new();
        let mut b_socks = Vec::new();
        for &(s, r) in pairs {
            let a = UdpSocket::bind((r, 0)).with_context(|| format!("binding the link on {r}"))?;
            let b = UdpSocket::bind((s, 0)).with_context(|| format!("binding the link on {s}"))?;
            for x in [&a, &b] {
                x.set_read_timeout(Some(Duration::from_millis(50)))?;
            }
            a_socks.push(Arc::new(a));
            b_socks.push(Arc::new(b));
        }
        let a: Vec<SocketAddr> = a_socks
            .iter()
            .map(|s| s.local_addr())
            .collect::<Result<_, _>>()?;
        let b: Vec<SocketAddr> = b_socks
            .iter()
            .map(|s| s.local_addr())
            .collect::<Result<_, _>>()?;
        let mut threads = Vec::new();
        let readers = a_socks
            .iter()
            .enumerate()
            .map(|(i, s)| (i, Direction::Forward, s.clone()))
            .chain(
                b_socks
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, Direction::Reverse, s.clone())),
            );
        for (i, dir, sock) in readers {
            let (duplex, stop) = (duplex.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gw-link-rd{i}"))
                    .spawn(move || {
                        // A reader held back by the nodes' load would date
                        // arrivals late; as the relay's thread, real-time where
                        // permitted (it sleeps in recv, so it never spins).
                        let _ = lu2k_linkem::set_realtime(40);
                        let mut buf = vec![0u8; 65_536];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(n) = sock.recv(&mut buf) {
                                let now = lu2k_linkem::Instant::from_duration(epoch.elapsed());
                                let mut d = duplex.lock().unwrap_or_else(|e| e.into_inner());
                                let _ = d.handle_datagram(now, dir, n, (i, buf[..n].to_vec()));
                            }
                        }
                    })?,
            );
        }
        let to: Vec<(SocketAddr, SocketAddr)> = pairs
            .iter()
            .map(|&(s, r)| (SocketAddr::from((r, port)), SocketAddr::from((s, port))))
            .collect();
        let (d2, stop2) = (duplex.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("gw-link-tx".into())
                .spawn(move || {
                    let _ = nix::sys::prctl::set_timerslack(1);
                    let _ = lu2k_linkem::set_realtime(40);
                    let mut due = Vec::new();
                    while !stop2.load(Ordering::Relaxed) {
                        let now = lu2k_linkem::Instant::from_duration(epoch.elapsed());
                        let next = {
                            let mut d = d2.lock().unwrap_or_else(|e| e.into_inner());
                            while let Some(p) = d.poll_deliver(now) {
                                due.push(p);
                            }
                            d.poll_deadline()
                        };
                        for (dir, (i, pkt)) in due.drain(..) {
                            // Forward traffic leaves from the socket on the
                            // sender's address, reverse from the receiver's.
                            let _ = match dir {
                                Direction::Forward => b_socks[i].send_to(&pkt, to[i].0),
                                Direction::Reverse => a_socks[i].send_to(&pkt, to[i].1),
                            };
                        }
                        let wait = next
                            .map(|t| t.saturating_duration_since(now))
                            .unwrap_or(Duration::MAX)
                            .min(Duration::from_millis(2));
                        if !wait.is_zero() {
                            std::thread::sleep(wait);
                        }
                    }
                })?,
        );
        Ok(SharedLink {
            duplex,
            stop,
            threads,
            a,
            b,
        })
    }

    /// Stops the threads; the forward direction's counters.
    pub fn stop(mut self) -> lu2k_linkem::Stats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let d = self.duplex.lock().unwrap_or_else(|e| e.into_inner());
        *d.link(Direction::Forward).stats()
    }
}

// ------------------------------------------------------------------ the nodes

/// What a gateway lu2k node (`lu2k-perf __gateway-node SPEC`) does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GwSpec {
    /// Sender or receiver.
    pub role: Role,
    /// Which pair.
    pub pair: u32,
    /// This node's NID address.
    pub ip: Ipv4Addr,
    /// The other node's.
    pub peer_ip: Ipv4Addr,
    /// The engines' UDP port.
    pub port: u16,
    /// Where this engine reaches its peer (the shared link's socket).
    pub peer_addr: SocketAddr,
    /// kshim and stats sockets.
    pub dir: PathBuf,
    /// kshim RX buffers.
    pub rx_bufs: u32,
    /// The engines' `max_rate_mbps` for their peer (lu2k-share).
    #[serde(default)]
    pub max_rate_mbps: Option<f64>,
    /// kshim's TX pool, bytes: sized for the pair's share of the link, as
    /// `lu2k-kshim --path-rate-mbps --path-rtt-ms` sizes it.
    pub tx_pool: u64,
    /// 1 MiB PUTs the pair moves.
    pub msgs: u64,
    /// The sender stops after this long; the receiver waits this plus 30 s.
    pub max_duration_s: f64,
    /// PUTs in flight at most (sender).
    pub in_flight: Option<u32>,
    /// The path's round trip, ms: the receiver stays this long (twice, plus
    /// a second) after its last PUT, so its engine's last ACKs reach the sender.
    pub rtt_ms: f64,
}

/// What a gateway lu2k node reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GwResult {
    /// Which pair.
    pub pair: u32,
    /// Receiver: payload bytes of verified PUTs; sender: of PUTs completed Ok.
    pub bytes: u64,
    /// Receiver: PUTs arrived whole and as sent, each once.
    pub verified: u64,
    /// Receiver: PUTs whose bytes or header were not the ones sent.
    pub corrupt: u64,
    /// Receiver: PUTs that arrived again.
    pub duplicate: u64,
    /// Sender: PUTs failed back.
    pub failed: u64,
    /// Sender: the monotonic clock just before the first PUT was handed over.
    pub first_send_ns: Option<u64>,
    /// Receiver: the monotonic clock when the last verified PUT was in.
    pub last_recv_ns: Option<u64>,
    /// Sender: retransmitted bytes (engine counter × 1456).
    pub retrans_bytes: Option<u64>,
    /// The engine's peak RSS (`VmHWM`), MiB.
    pub engine_rss_mib: Option<f64>,
    /// The node process's (kshim's region), MiB.
    pub node_rss_mib: Option<f64>,
    /// The engine's CPU (user + system), s.
    pub engine_cpu_s: Option<f64>,
    /// The node process's own (kshim, making or checking payloads), s.
    pub node_cpu_s: Option<f64>,
    /// The engine's counters: loop passes, sleeps on the doorbell, µs spun,
    /// io_uring_enter calls, GSO sends, datagrams sent, receives, timers fired.
    pub engine_counts: EngineCounts,
    /// Engine drops and failures, if any.
    pub note: Option<String>,
}

/// Engine counters summed over cores (and, in a row, over engines).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct EngineCounts {
    pub passes: u64,
    pub sleeps: u64,
    pub spin_us: u64,
    pub enters: u64,
    pub sends: u64,
    pub datagrams_sent: u64,
    pub recvs: u64,
    pub timers_fired: u64,
}

impl EngineCounts {
    fn add(&mut self, o: &EngineCounts) {
        self.passes += o.passes;
        self.sleeps += o.sleeps;
        self.spin_us += o.spin_us;
        self.enters += o.enters;
        self.sends += o.sends;
        self.datagrams_sent += o.datagrams_sent;
        self.recvs += o.recvs;
        self.timers_fired += o.timers_fired;
    }
}

fn nid(ip: Ipv4Addr) -> Nid {
    format!("{ip}@lu2k")
        .parse()
        .expect("a NID of an IP address")
}

fn put(from: Nid, to: Nid, pair: u32, seq: u64) -> Repr {
    Repr {
        dest_nid: to.nid4().unwrap_or(u64::MAX),
        src_nid: from.nid4().unwrap_or(u64::MAX),
        dest_pid: 12345,
        src_pid: 12345,
        payload_length: MSG as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: seq,
            hdr_data: u64::from(pair),
            ptl_index: 42,
            offset: 0,
        },
    }
}

/// Stamps message (pair, seq) into the pair's block: the first word of
/// every 4 KiB page says (pair, seq, page).
pub fn stamp(block: &mut [u8], pair: u32, seq: u64) {
    for (page, chunk) in block.chunks_mut(STAMP_EVERY).enumerate() {
        let w = (u64::from(pair) << 48) ^ (seq << 12) ^ page as u64;
        let n = chunk.len().min(8);
        chunk[..n].copy_from_slice(&w.to_le_bytes()[..n]);
    }
}

/// Entry point of `lu2k-perf __gateway-node SPEC`.
pub fn node_main(spec: &str) -> Result<()> {
    let s: GwSpec = serde_json::from_str(spec).context("gateway node spec")?;
    std::fs::create_dir_all(&s.dir)?;
    let tag = format!("{}{}", if s.role == Role::Send { "s" } else { "r" }, s.pair);
    let ksock = s.dir.join(format!("kshim-{tag}.sock"));
    let stats = s.dir.join(format!("stats-{tag}.sock"));
    let mut cfg = Config::new(vec![nid(s.ip)], &ksock);
    cfg.cores = 1;
    cfg.rx_buf_count = s.rx_bufs;
    cfg.tx_pool_len = s.tx_pool;
    let mut k = Kshim::start(cfg).context("starting kshim")?;
    let espec = EngineSpec {
        kshim_socket: ksock,
        bind: s.ip.into(),
        port: s.port,
        stats_socket: stats.clone(),
        cores: 1,
        peers: vec![EnginePeer {
            nid_ip: s.peer_ip.into(),
            addr: Some(s.peer_addr),
            links: Vec::new(),
            policy: None,
            max_rate_mbps: s.max_rate_mbps,
        }],
        psk_file: None,
    };
    let mut engine = node::self_command()?
        .arg("__engine")
        .arg(serde_json::to_string(&espec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the engine")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !k.is_attached() {
        if Instant::now() > deadline {
            bail!("the engine did not attach to kshim within 30 s");
        }
        if let Some(Event::EngineGone(r)) = k.wait(Some(Duration::from_millis(20))) {
            bail!("the engine went away while attaching: {r:?}");
        }
    }
    say("ready");
    let mut r = if s.role == Role::Send {
        send(&mut k, &s)?
    } else {
        receive(&mut k, &s)?
    };
    r.pair = s.pair;
    if let Ok(st) = lu2k_engine::daemon::stats::fetch(&stats) {
        let mut notes = Vec::new();
        let mut retrans = 0;
        for c in &st.cores {
            r.engine_counts.add(&EngineCounts {
                passes: c.passes,
                sleeps: c.sleeps,
                spin_us: c.spin_us,
                enters: c.io.enters,
                sends: c.io.sends,
                datagrams_sent: c.io.datagrams_sent,
                recvs: c.io.recvs,
                timers_fired: c.io.timers_fired,
            });
            for (why, n) in &c.drops {
                notes.push(format!("{why} {n}"));
            }
            for p in &c.peers {
                retrans += p.retransmissions;
                for (why, n) in &p.failed {
                    notes.push(format!("failed {why} {n}"));
                }
            }
        }
        r.retrans_bytes = Some(retrans * PAYLOAD_PER_PACKET);
        if !notes.is_empty() {
            r.note = Some(format!("{tag} engine: {}", notes.join(", ")));
        }
    }
    r.engine_rss_mib =
        vm_hwm_kib(&format!("/proc/{}/status", engine.id())).map(|k| k as f64 / 1024.0);
    r.node_rss_mib = vm_hwm_kib("/proc/self/status").map(|k| k as f64 / 1024.0);
    drop(k);
    // The engine waits for its next kshim without end: SIGTERM stops it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = engine.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if engine.try_wait()?.is_none() {
        let _ = engine.kill();
        let _ = engine.wait();
    }
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |u: nix::sys::resource::Usage| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    };
    // The engine is this process's only child, reaped above.
    r.engine_cpu_s = getrusage(UsageWho::RUSAGE_CHILDREN).ok().map(secs);
    r.node_cpu_s = getrusage(UsageWho::RUSAGE_SELF).ok().map(secs);
    say(&format!("gwresult {}", serde_json::to_string(&r)?));
    Ok(())
}

/// Sender: the pair's PUTs, at most `in_flight` outstanding.
fn send(k: &mut Kshim, s: &GwSpec) -> Result<GwResult> {
    let (me, to) = (nid(s.ip), nid(s.peer_ip));
    let mut block = Vec::new();
    crate::soak::payload(s.pair, 0, MSG, &mut block);
    let mut r = GwResult::default();
    let cap = Duration::from_secs_f64(s.max_duration_s);
    let in_flight = s.in_flight.map_or(u64::MAX, u64::from);
    let start = Instant::now();
    r.first_send_ns = Some(mono_ns());
    let (mut sent, mut done) = (0u64, 0u64);
    while done < s.msgs && start.elapsed() < cap {
        while sent < s.msgs && sent - done < in_flight {
            let Ok(buf) = k.alloc_tx(MSG) else { break };
            stamp(&mut block, s.pair, sent);
            k.write_tx(&buf, 0, &block);
            if k.send_buf_to(to, &put(me, to, s.pair, sent), buf).is_err() {
                break;
            }
            sent += 1;
        }
        match k.wait(Some(Duration::from_millis(20))) {
            Some(Event::TxDone { status, .. }) => {
                done += 1;
                if status == TxStatus::Ok {
                    r.bytes += MSG as u64;
                } else {
                    r.failed += 1;
                }
            }
            Some(Event::EngineGone(g)) => bail!("pair {}: the engine went away: {g:?}", s.pair),
            Some(Event::Rx(m)) => k.rx_done(m),
            _ => {}
        }
    }
    Ok(r)
}

/// Receiver: checks every PUT against what its sender made of it.
fn receive(k: &mut Kshim, s: &GwSpec) -> Result<GwResult> {
    let mut want = Vec::new();
    crate::soak::payload(s.pair, 0, MSG, &mut want);
    let mut seen = vec![false; s.msgs as usize];
    let mut r = GwResult::default();
    let cap = Duration::from_secs_f64(s.max_duration_s + 30.0);
    let start = Instant::now();
    let mut last = None;
    let mut tick = Ticker::new();
    let mut corrupt_notes = Vec::new();
    while r.verified < s.msgs && start.elapsed() < cap {
        match k.wait(Some(Duration::from_millis(20))) {
            Some(Event::Rx(m)) => {
                let (pair, seq) = match m.hdr.msg {
                    Msg::Put {
                        hdr_data,
                        match_bits,
                        ..
                    } => (hdr_data, match_bits),
                    _ => (u64::MAX, u64::MAX),
                };
                let mut intact = pair == u64::from(s.pair) && seq < s.msgs && m.len() == MSG;
                if intact {
                    stamp(&mut want, s.pair, seq);
                    let mut off = 0;
                    for sl in m.slices() {
                        intact &= want.get(off..off + sl.len()) == Some(sl);
                        off += sl.len();
                    }
                    intact &= off == MSG;
                }
                if !intact && r.corrupt < 4 {
                    corrupt_notes.push(what_differs(&m, &mut want, s.pair, pair, seq));
                }
                k.rx_done(m);
                if !intact {
                    r.corrupt += 1;
                } else if std::mem::replace(&mut seen[seq as usize], true) {
                    r.duplicate += 1;
                } else {
                    r.verified += 1;
                    r.bytes += MSG as u64;
                    last = Some(mono_ns());
                }
            }
            Some(Event::EngineGone(g)) => bail!("pair {}: the engine went away: {g:?}", s.pair),
            _ => {}
        }
        tick.tick(r.bytes);
    }
    r.last_recv_ns = last;
    if !corrupt_notes.is_empty() {
        r.note = Some(format!(
            "pair {} corrupt: {}",
            s.pair,
            corrupt_notes.join(" | ")
        ));
    }
    // The engine's last ACKs: the sender's completions need them.
    let linger = Duration::from_secs_f64(2.0 * s.rtt_ms / 1e3 + 1.0);
    let t = Instant::now();
    while t.elapsed() < linger {
        if let Some(Event::Rx(m)) = k.wait(Some(Duration::from_millis(50))) {
            k.rx_done(m);
            r.duplicate += 1;
        }
    }
    Ok(r)
}

/// What differs in a PUT that failed its check: the header's pair and
/// sequence, its length and extents, and for the payload the byte ranges
/// that differ, whether they read zero, and whose stamp their pages carry.
fn what_differs(m: &lu2k_kshim::RxMsg, want: &mut [u8], me: u32, pair: u64, seq: u64) -> String {
    let mut got = vec![0u8; m.len()];
    m.copy_to(&mut got);
    let mut d = format!(
        "hdr pair {pair} seq {seq}, len {}, {} extents",
        m.len(),
        m.extents().len()
    );
    if pair != u64::from(me) || got.len() != want.len() {
        return d;
    }
    stamp(want, me, seq);
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    let (Some(&first), Some(&last)) = (bad.first(), bad.last()) else {
        return d;
    };
    let zeros = bad.iter().filter(|&&i| got[i] == 0).count();
    let pages: std::collections::BTreeSet<usize> = bad.iter().map(|i| i / STAMP_EVERY).collect();
    let p0 = first / STAMP_EVERY * STAMP_EVERY;
    let word = u64::from_le_bytes(got[p0..p0 + 8].try_into().expect("8 bytes"));
    d += &format!(
        ", {} bytes differ in [{first}, {last}] over {} pages ({} of them zero), first bad page's stamp: pair {} seq {} page {}",
        bad.len(),
        pages.len(),
        zeros,
        word >> 48,
        (word >> 12) & 0xf_ffff_ffff,
        word & 0xfff
    );
    d
}

/// A line of a gateway lu2k node.
enum GwLine {
    Ready,
    Result(Box<GwResult>),
    Closed,
}

/// A running gateway lu2k node (its own process group: stopping it stops
/// its engine too).
struct GwProc {
    child: Child,
    lines: mpsc::Receiver<GwLine>,
}

impl GwProc {
    fn spawn(spec: &GwSpec) -> Result<GwProc> {
        let mut child = node::self_command()?
            .arg("__gateway-node")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .context("starting a gateway node")?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let m = if line == "ready" {
                    Some(GwLine::Ready)
                } else if let Some(j) = line.strip_prefix("gwresult ") {
                    serde_json::from_str(j)
                        .ok()
                        .map(|r| GwLine::Result(Box::new(r)))
                } else {
                    // Progress lines: the harness reads the results only.
                    None
                };
                if let Some(m) = m {
                    if tx.send(m).is_err() {
                        break;
                    }
                }
            }
            let _ = tx.send(GwLine::Closed);
        });
        Ok(GwProc { child, lines: rx })
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        match self.lines.recv_timeout(limit) {
            Ok(GwLine::Ready) => Ok(()),
            _ => bail!("a gateway node did not get its engine attached within {limit:?}"),
        }
    }

    /// Its result, if it gives one before `deadline`.
    fn result(&self, deadline: Instant) -> Option<GwResult> {
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(GwLine::Result(r)) => return Some(*r),
                Ok(GwLine::Ready) => {}
                _ => return None,
            }
        }
    }

    /// Waits for it to exit (up to `grace`), then kills its group; reaps it.
    fn finish(mut self, grace: Duration) {
        let t = Instant::now();
        while t.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the rows

/// One contender in one gateway cell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GwRow {
    pub scenario: String,
    pub cell: String,
    pub contender: String,
    /// `relay` (lu2k's shared model) or `tun`.
    pub path: String,
    pub pairs: u32,
    pub rtt_ms: f64,
    pub loss: f64,
    pub rate_mbps: f64,
    /// ok, incomplete, failed: …, not in this cell: …
    pub status: String,
    /// Payload bytes of all pairs together.
    pub bytes_target: u64,
    /// Payload bytes delivered (lu2k: verified) of all pairs.
    pub bytes: u64,
    /// All pairs' bytes over the time from the first sender's first PUT to
    /// the last receiver's last one, Mbit/s.
    pub goodput_mbps: Option<f64>,
    /// goodput / (rate × (1 − loss)).
    pub utilization: Option<f64>,
    /// Each pair's bytes over its own time (its first send to its last
    /// delivery), Mbit/s, in pair order.
    pub pair_goodput_mbps: Vec<f64>,
    /// Jain's index of `pair_goodput_mbps`.
    pub jain: Option<f64>,
    /// lu2k: PUTs verified of all pairs, and of how many.
    pub puts_verified: Option<u64>,
    pub puts_expected: Option<u64>,
    /// lu2k: PUTs corrupt, delivered twice, failed back.
    pub puts_corrupt: Option<u64>,
    pub puts_duplicate: Option<u64>,
    pub puts_failed: Option<u64>,
    /// The fair CPU figure (collect::cpu_spent), s, and per GB delivered.
    pub cpu_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    /// The contender's processes alone, s, and per GB.
    pub proc_cpu_s: Option<f64>,
    pub proc_cpu_s_per_gb: Option<f64>,
    pub harness_sys_s: Option<f64>,
    pub others_cpu_s: Option<f64>,
    /// lu2k: the engines' peak RSS summed over every node, and the largest;
    /// TCP: the node processes'.
    pub rss_sum_mib: Option<f64>,
    pub rss_max_mib: Option<f64>,
    /// lu2k: the node processes' (kshim's pools) summed.
    pub node_rss_sum_mib: Option<f64>,
    /// lu2k: where the processes' CPU went: the engines', s, and the node
    /// processes' (kshim, making and checking the payloads), s.
    pub engines_cpu_s: Option<f64>,
    pub nodes_cpu_s: Option<f64>,
    /// lu2k: every engine's counters summed.
    pub engine_counts: Option<EngineCounts>,
    /// Senders' retransmitted bytes (lu2k: summed; TCP: the sending
    /// namespace's, read by every sender, the largest).
    pub retrans_bytes: Option<u64>,
    pub wire_bytes: Option<u64>,
    pub queue_drops: Option<u64>,
    pub loss_drops: Option<u64>,
    pub load_avg: Option<LoadAvg>,
    pub steal: Option<f64>,
    pub note: Option<String>,
    pub runs: u32,
    pub goodput_runs: Vec<Option<f64>>,
    /// Every run's status, and its note where it was not ok.
    pub status_runs: Vec<String>,
}

/// Pair `i`'s addresses: (sender, receiver).
fn pair_ips(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(127, 0, 90, 10 + i as u8),
        Ipv4Addr::new(127, 0, 91, 10 + i as u8),
    )
}

/// Per-run measures from each pair's (first send, last delivery, bytes).
struct PairTimes {
    first_send_ns: Option<u64>,
    last_recv_ns: Option<u64>,
    bytes: u64,
}

fn rates(row: &mut GwRow, cell: &Cell, p: &[PairTimes]) {
    row.bytes = p.iter().map(|x| x.bytes).sum();
    let first = p.iter().filter_map(|x| x.first_send_ns).min();
    let last = p.iter().filter_map(|x| x.last_recv_ns).max();
    if let (Some(a), Some(b)) = (first, last) {
        if b > a && row.bytes > 0 {
            let g = row.bytes as f64 * 8.0 / ((b - a) as f64 / 1e9) / 1e6;
            row.goodput_mbps = Some(g);
            row.utilization = Some(g / (cell.rate_mbps * (1.0 - cell.loss)));
        }
    }
    row.pair_goodput_mbps = p
        .iter()
        .map(|x| match (x.first_send_ns, x.last_recv_ns) {
            (Some(a), Some(b)) if b > a => x.bytes as f64 * 8.0 / ((b - a) as f64 / 1e9) / 1e6,
            _ => 0.0,
        })
        .collect();
    row.jain = jain(&row.pair_goodput_mbps);
}

fn base_row(scenario: &str, cell: &Cell, c: Contender, pairs: u32) -> GwRow {
    GwRow {
        scenario: scenario.into(),
        cell: cell.name.clone(),
        contender: c.name().into(),
        path: crate::run::path_of(c).into(),
        pairs,
        rtt_ms: cell.rtt_ms,
        loss: cell.loss,
        rate_mbps: cell.rate_mbps,
        bytes_target: cell.workload.bytes.div_ceil(MSG as u64) * MSG as u64 * u64::from(pairs),
        runs: 1,
        ..GwRow::default()
    }
}

/// lu2k: N pairs of nodes over one [`SharedLink`].
fn run_lu2k(
    s: &str,
    cell: &Cell,
    c: Contender,
    pairs: u32,
    seed: u64,
    rx_bufs: u32,
) -> Result<(GwRow, lu2k_linkem::Stats)> {
    let n = pairs as usize;
    let ips: Vec<_> = (0..n).map(pair_ips).collect();
    let port = UdpSocket::bind((ips[0].0, 0))?.local_addr()?.port();
    let link = SharedLink::spawn(cell.link.clone(), seed, &ips, port)?;
    let dir = std::env::temp_dir().join(format!("lu2k-gw-{}", std::process::id()));
    let w = &cell.workload;
    let msgs = w.bytes.div_ceil(MSG as u64);
    // Each pair's node is sized for its share of the link, as an operator
    // sizes a node for the rate it is given.
    let tx_pool = lu2k_kshim::ring_abi::tx_pool::bytes_for_path(
        cell.rate_mbps / f64::from(pairs),
        cell.rtt_ms,
    )
    .0;
    let spec = |i: usize, role: Role| {
        let (sip, rip) = ips[i];
        let (ip, peer_ip, peer_addr) = if role == Role::Send {
            (sip, rip, link.a[i])
        } else {
            (rip, sip, link.b[i])
        };
        GwSpec {
            role,
            pair: i as u32,
            ip,
            peer_ip,
            port,
            peer_addr,
            dir: dir.clone(),
            rx_bufs,
            tx_pool,
            max_rate_mbps: (c == Contender::Lu2kShare).then(|| cell.rate_mbps / f64::from(pairs)),
            msgs,
            max_duration_s: w.max_duration_s,
            in_flight: w.in_flight,
            rtt_ms: cell.rtt_ms,
        }
    };
    let started = (|| -> Result<(Vec<GwProc>, Vec<GwProc>)> {
        let mut rx = Vec::new();
        for i in 0..n {
            rx.push(GwProc::spawn(&spec(i, Role::Recv))?);
        }
        for p in &rx {
            p.wait_ready(Duration::from_secs(60))?;
        }
        let mut tx = Vec::new();
        for i in 0..n {
            tx.push(GwProc::spawn(&spec(i, Role::Send))?);
        }
        Ok((rx, tx))
    })();
    let (rx, tx) = match started {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            link.stop();
            return Err(e);
        }
    };
    // Senders attach, then send; receivers end on their last PUT (or 30 s
    // past the cap), and linger for the last ACKs.
    let deadline =
        Instant::now() + Duration::from_secs_f64(w.max_duration_s + 90.0 + 2.0 * cell.rtt_ms / 1e3);
    let rres: Vec<Option<GwResult>> = rx.iter().map(|p| p.result(deadline)).collect();
    let sdeadline = Instant::now().max(deadline.min(Instant::now() + Duration::from_secs(30)));
    let sres: Vec<Option<GwResult>> = tx.iter().map(|p| p.result(sdeadline)).collect();
    for p in rx.into_iter().chain(tx) {
        p.finish(Duration::from_secs(15));
    }
    let wire = link.stop();
    let _ = std::fs::remove_dir_all(&dir);

    let mut row = base_row(s, cell, c, pairs);
    row.path = "relay (one model, all pairs)".into();
    let times: Vec<PairTimes> = (0..n)
        .map(|i| PairTimes {
            first_send_ns: sres[i].as_ref().and_then(|r| r.first_send_ns),
            last_recv_ns: rres[i].as_ref().and_then(|r| r.last_recv_ns),
            bytes: rres[i].as_ref().map_or(0, |r| r.bytes),
        })
        .collect();
    rates(&mut row, cell, &times);
    let sum = |f: &dyn Fn(&GwResult) -> u64, v: &[Option<GwResult>]| {
        v.iter().flatten().map(f).sum::<u64>()
    };
    row.puts_expected = Some(msgs * u64::from(pairs));
    row.puts_verified = Some(sum(&|r| r.verified, &rres));
    row.puts_corrupt = Some(sum(&|r| r.corrupt, &rres));
    row.puts_duplicate = Some(sum(&|r| r.duplicate, &rres));
    row.puts_failed = Some(sum(&|r| r.failed, &sres));
    row.retrans_bytes = Some(sum(&|r| r.retrans_bytes.unwrap_or(0), &sres));
    let all: Vec<&GwResult> = rres.iter().chain(&sres).flatten().collect();
    let eng: Vec<f64> = all.iter().filter_map(|r| r.engine_rss_mib).collect();
    row.rss_sum_mib = (!eng.is_empty()).then(|| eng.iter().sum());
    row.rss_max_mib = eng.iter().copied().reduce(f64::max);
    let nodes: Vec<f64> = all.iter().filter_map(|r| r.node_rss_mib).collect();
    row.node_rss_sum_mib = (!nodes.is_empty()).then(|| nodes.iter().sum());
    row.engines_cpu_s = Some(all.iter().filter_map(|r| r.engine_cpu_s).sum());
    row.nodes_cpu_s = Some(all.iter().filter_map(|r| r.node_cpu_s).sum());
    let mut counts = EngineCounts::default();
    for r in &all {
        counts.add(&r.engine_counts);
    }
    row.engine_counts = Some(counts);
    let mut notes: Vec<String> = all.iter().filter_map(|r| r.note.clone()).collect();
    let missing = rres.iter().chain(&sres).filter(|r| r.is_none()).count();
    if missing > 0 {
        notes.insert(0, format!("{missing} of {} nodes gave no result", 2 * n));
    }
    let clean = row.puts_verified == row.puts_expected
        && row.puts_corrupt == Some(0)
        && row.puts_duplicate == Some(0)
        && row.puts_failed == Some(0)
        && missing == 0;
    row.status = if clean { "ok" } else { "incomplete" }.into();
    if !clean {
        notes.insert(
            0,
            format!(
                "{} of {} PUTs verified, {} corrupt, {} duplicate, {} failed back",
                row.puts_verified.unwrap_or(0),
                row.puts_expected.unwrap_or(0),
                row.puts_corrupt.unwrap_or(0),
                row.puts_duplicate.unwrap_or(0),
                row.puts_failed.unwrap_or(0)
            ),
        );
    }
    row.note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok((row, wire))
}

/// TCP: N flows between two network namespaces through one TUN link.
fn run_tcp(
    s: &str,
    cell: &Cell,
    c: Contender,
    pairs: u32,
    seed: u64,
) -> Result<(GwRow, lu2k_linkem::Stats)> {
    let cc = if c == Contender::TcpBbr {
        "bbr"
    } else {
        "cubic"
    };
    let name = format!("lu2kg{}", std::process::id() % 100_000);
    let mut link = cell.link.clone();
    link.forward.overhead_bytes = 0;
    link.reverse.overhead_bytes = 0;
    let tun = TunLink::spawn(TunConfig::new(link, seed, &name))
        .context("starting the link emulator (TUN; needs root and iproute2)")?;
    if cc == "bbr" {
        for ns in [tun.a(), tun.b()] {
            let _ = std::process::Command::new("tc")
                .args(["-n", ns.name(), "qdisc", "replace", "dev"])
                .arg(lu2k_linkem::tun::DEVICE)
                .args(["root", "fq"])
                .output();
        }
    }
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let bdp = cell.rate_mbps * 1e6 / 8.0 * cell.rtt_ms / 1e3;
    let queue = cell.link.forward.queue_bytes.unwrap_or(0) as f64;
    let spec = |role, port: u16| NodeSpec {
        kind: Kind::Tcp,
        role,
        workload: cell.workload.clone(),
        addr: SocketAddr::from((tun.b_ip(), port)),
        cc: Some(cc.into()),
        buffer: ((2.0 * (bdp + queue)) as usize).max(4 << 20),
        lu2k: None,
        path: crate::run::path_info(cell),
        quic: None,
    };
    let n = pairs as usize;
    let mut rx = Vec::new();
    for i in 0..n {
        let mut node = Node::spawn(Node::command(
            tun.b().command(&exe),
            &spec(Role::Recv, 5201 + i as u16),
        )?)?;
        node.wait_listen(Duration::from_secs(20))?;
        rx.push(node);
    }
    let mut tx = Vec::new();
    for i in 0..n {
        tx.push(Node::spawn(Node::command(
            tun.a().command(&exe),
            &spec(Role::Send, 5201 + i as u16),
        )?)?);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(cell.workload.max_duration_s + 60.0);
    let result = |node: &Node, until: Instant| loop {
        match node
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            Ok(Line::Result(r)) => return Some(*r),
            Ok(Line::Closed) | Err(_) => return None,
            Ok(_) => {}
        }
    };
    let rres: Vec<_> = rx.iter().map(|x| result(x, deadline)).collect();
    let until = Instant::now() + Duration::from_secs(5);
    let sres: Vec<_> = tx.iter().map(|x| result(x, until)).collect();
    for x in rx.into_iter().chain(tx) {
        x.join(Duration::from_secs(5));
    }
    let wire = tun.stop().map(|s| s.forward).unwrap_or_default();
    let mut row = base_row(s, cell, c, pairs);
    let times: Vec<PairTimes> = (0..n)
        .map(|i| PairTimes {
            first_send_ns: sres[i].as_ref().and_then(|r| r.first_send_ns),
            last_recv_ns: rres[i].as_ref().and_then(|r| r.last_recv_ns),
            bytes: rres[i].as_ref().map_or(0, |r| r.bytes),
        })
        .collect();
    rates(&mut row, cell, &times);
    row.retrans_bytes = sres.iter().flatten().filter_map(|r| r.retrans_bytes).max();
    let rss: Vec<f64> = rres
        .iter()
        .chain(&sres)
        .flatten()
        .filter_map(|r| r.max_rss_mib)
        .collect();
    row.rss_sum_mib = (!rss.is_empty()).then(|| rss.iter().sum());
    row.rss_max_mib = rss.iter().copied().reduce(f64::max);
    let done = rres
        .iter()
        .flatten()
        .filter(|r| r.bytes >= cell.workload.bytes)
        .count();
    row.status = if done == n { "ok" } else { "incomplete" }.into();
    if done < n {
        row.note = Some(format!("{done} of {n} flows delivered everything"));
    }
    Ok((row, wire))
}

/// One run of `c` in `cell`, with the CPU window around it.
fn run_once(s: &str, cell: &Cell, c: Contender, pairs: u32, seed: u64, rx_bufs: u32) -> GwRow {
    let before = load_avg();
    let ticks = cpu_ticks();
    let cpu0 = CpuSnapshot::take();
    let others = OthersWatch::start();
    let res = match c {
        Contender::Lu2k | Contender::Lu2kShare => run_lu2k(s, cell, c, pairs, seed, rx_bufs),
        Contender::TcpBbr | Contender::TcpCubic => {
            match crate::run::skip_reason(c, cell.workload.kind) {
                Some(why) => {
                    let mut r = base_row(s, cell, c, pairs);
                    r.status = format!("skipped: {why}");
                    eprintln!("SKIP {c} in {}: {why}", cell.name);
                    return r;
                }
                None => run_tcp(s, cell, c, pairs, seed),
            }
        }
        _ => {
            let mut r = base_row(s, cell, c, pairs);
            r.status = "not in this cell (the gateway cell runs lu2k and TCP)".into();
            return r;
        }
    };
    let watched = others.finish();
    let cpu = cpu0
        .zip(CpuSnapshot::take())
        .map(|(a, b)| cpu_spent(&a, &b.with_watch(watched)));
    let mut row = match res {
        Ok((mut row, wire)) => {
            row.wire_bytes = Some(wire.offered.bytes);
            row.queue_drops = Some(wire.dropped_queue.packets);
            row.loss_drops = Some(wire.dropped_loss.packets);
            row
        }
        Err(e) => {
            let mut r = base_row(s, cell, c, pairs);
            r.status = format!("failed: {e:#}");
            eprintln!("FAILED {c} in {}: {e:#}", cell.name);
            return r;
        }
    };
    if let Some(c) = cpu {
        let gb = row.bytes as f64 / 1e9;
        row.cpu_s = Some(c.fair_s);
        row.proc_cpu_s = Some(c.proc_s);
        row.harness_sys_s = Some(c.harness_sys_s);
        row.others_cpu_s = Some(c.others_s);
        if gb > 0.0 {
            row.cpu_s_per_gb = Some(c.fair_s / gb);
            row.proc_cpu_s_per_gb = Some(c.proc_s / gb);
        }
    }
    row.load_avg = before.zip(load_avg()).map(|(a, b)| LoadAvg::new(a, b));
    row.steal = ticks.zip(cpu_ticks()).and_then(|(a, b)| steal_share(a, b));
    if let Some(l) = row.load_avg.as_ref().and_then(|l| l.loaded(row.steal)) {
        row.note = Some(match row.note.take() {
            Some(n) => format!("{n}; {l}"),
            None => l,
        });
    }
    if let (Some(e), Some(n), Some(k)) = (row.engines_cpu_s, row.nodes_cpu_s, row.engine_counts) {
        eprintln!(
            "{} {c} x{pairs}: processes' CPU: engines {e:.1} s, nodes (kshim, payloads) {n:.1} s; engines: {k:?}",
            cell.name
        );
    }
    eprintln!(
        "{} {c} x{pairs}: {} Mbit/s ({}), Jain {}, CPU {:.1} s fair / {:.1} s processes, {} bytes, {}",
        cell.name,
        opt(row.goodput_mbps, 1),
        opt(row.utilization.map(|u| u * 100.0), 0) + " %",
        opt(row.jain, 3),
        row.cpu_s.unwrap_or(0.0),
        row.proc_cpu_s.unwrap_or(0.0),
        row.bytes,
        row.status
    );
    if row.status != "ok" {
        eprintln!("  {}", row.note.as_deref().unwrap_or("no note"));
    }
    row
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The run with the median goodput (of an even count the lower middle; a run
/// without goodput counts lowest), with every run's goodput.
fn median_run(mut each: Vec<GwRow>) -> GwRow {
    let goodputs: Vec<Option<f64>> = each.iter().map(|r| r.goodput_mbps).collect();
    let statuses = each
        .iter()
        .map(|r| match (&r.note, r.status.as_str()) {
            (Some(n), s) if s != "ok" => format!("{s}: {n}"),
            (_, s) => s.to_string(),
        })
        .collect();
    let n = each.len() as u32;
    each.sort_by(|a, b| {
        a.goodput_mbps
            .unwrap_or(-1.0)
            .total_cmp(&b.goodput_mbps.unwrap_or(-1.0))
    });
    let mut row = each.swap_remove((each.len() - 1) / 2);
    row.runs = n;
    row.goodput_runs = goodputs;
    row.status_runs = statuses;
    row
}

/// `lu2k-perf gateway`.
pub fn main(a: GatewayArgs) -> Result<()> {
    let f = GatewayFile::load(&a.scenario)?;
    let s = &f.scenario;
    let mut cells = f.cells(a.quick);
    if let Some(bad) = a
        .cells
        .iter()
        .find(|n| !cells.iter().any(|(c, _)| &c.name == *n))
    {
        let known: Vec<&str> = cells.iter().map(|(c, _)| c.name.as_str()).collect();
        bail!(
            "--cells: no cell named {bad:?} in {}; its cells: {}",
            s.name,
            known.join(", ")
        );
    }
    if !a.cells.is_empty() {
        cells.retain(|(c, _)| a.cells.contains(&c.name));
    }
    let mut rows = Vec::new();
    for (cell, pairs) in &cells {
        for &c in &cell.contenders {
            if !a.only.is_empty() && !a.only.iter().any(|n| n == c.name()) {
                continue;
            }
            let each = (0..a.runs)
                .map(|i| {
                    run_once(
                        &s.name,
                        cell,
                        c,
                        *pairs,
                        s.seed.wrapping_add(u64::from(i)),
                        a.lu2k_rx_bufs,
                    )
                })
                .collect();
            rows.push(median_run(each));
        }
    }
    print!("{}", table(&rows));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("json: {}", p.display());
    }
    Ok(())
}

/// Rows as a table, and for every several-pair row the ratio of its CPU per
/// GB to the one-pair row of the same contender on the same path.
pub fn table(rows: &[GwRow]) -> String {
    let mut t = format!(
        "{:<24} {:<10} {:>5} {:>9} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}  {}\n",
        "cell",
        "contender",
        "pairs",
        "Mbit/s",
        "util",
        "Jain",
        "s/GB",
        "proc/GB",
        "RSS sum",
        "RSS max",
        "min pair",
        "status"
    );
    for r in rows {
        let min_pair = r.pair_goodput_mbps.iter().copied().reduce(f64::min);
        t += &format!(
            "{:<24} {:<10} {:>5} {:>9} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}  {}\n",
            r.cell,
            r.contender,
            r.pairs,
            opt(r.goodput_mbps, 1),
            opt(r.utilization.map(|u| u * 100.0), 0),
            opt(r.jain, 3),
            opt(r.cpu_s_per_gb, 1),
            opt(r.proc_cpu_s_per_gb, 1),
            opt(r.rss_sum_mib, 0),
            opt(r.rss_max_mib, 0),
            opt(min_pair, 1),
            r.status
        );
    }
    let mut by_path: BTreeMap<(String, String), &GwRow> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.pairs == 1) {
        by_path.insert((r.contender.clone(), path_key(r)), r);
    }
    for r in rows.iter().filter(|r| r.pairs > 1) {
        if let Some(one) = by_path.get(&(r.contender.clone(), path_key(r))) {
            if let (Some(m), Some(o)) = (r.cpu_s_per_gb, one.cpu_s_per_gb) {
                t += &format!(
                    "{} {} x{}: CPU per GB {:.2}x the one-pair cell's {} (goal 1.2x); processes {}\n",
                    r.cell,
                    r.contender,
                    r.pairs,
                    m / o,
                    one.cell,
                    match (r.proc_cpu_s_per_gb, one.proc_cpu_s_per_gb) {
                        (Some(a), Some(b)) => format!("{:.2}x", a / b),
                        _ => "-".into(),
                    }
                );
            }
        }
    }
    t
}

fn path_key(r: &GwRow) -> String {
    format!("{}/{}/{}", r.rtt_ms, r.loss, r.rate_mbps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_on_known_vectors() {
        assert_eq!(jain(&[]), None);
        assert_eq!(jain(&[0.0, 0.0]), None);
        assert!((jain(&[5.0, 5.0, 5.0, 5.0]).unwrap() - 1.0).abs() < 1e-12);
        // One of n has everything: 1/n.
        assert!((jain(&[10.0, 0.0, 0.0, 0.0]).unwrap() - 0.25).abs() < 1e-12);
        // (1+2+3)^2 / (3 * (1+4+9)) = 36/42.
        assert!((jain(&[1.0, 2.0, 3.0]).unwrap() - 36.0 / 42.0).abs() < 1e-12);
        // Half the pairs at x, half at 0: 1/2.
        assert!((jain(&[7.0, 7.0, 0.0, 0.0]).unwrap() - 0.5).abs() < 1e-12);
        // Scale does not matter.
        assert_eq!(jain(&[1.0, 3.0]), jain(&[100.0, 300.0]));
    }

    const FILE: &str = r#"
name = "gw"
contenders = ["lu2k", "tcp-bbr"]
[workload]
kind = "bulk"
bytes = 8_388_608
[quick]
bytes = 4_194_304
[[cell]]
name = "a"
rtt_ms = 40.0
rate_mbps = 100.0
pairs = 3
[[cell]]
name = "b"
rtt_ms = 40.0
rate_mbps = 100.0
"#;

    #[test]
    fn a_gateway_file_gives_each_cell_its_pairs() {
        let f = GatewayFile::parse(FILE, "gw.toml").unwrap();
        let cells = f.cells(true);
        assert_eq!(cells.len(), 2);
        assert_eq!((cells[0].0.name.as_str(), cells[0].1), ("a", 3));
        assert_eq!((cells[1].0.name.as_str(), cells[1].1), ("b", 1));
        assert_eq!(cells[0].0.workload.bytes, 4_194_304);
        assert_eq!(f.cells(false)[0].0.workload.bytes, 8_388_608);
    }

    #[test]
    fn bad_gateway_files_are_refused_naming_the_field() {
        let e = |t: &str| format!("{:#}", GatewayFile::parse(t, "gw.toml").unwrap_err());
        assert!(e(&FILE.replace("pairs = 3", "pairs = 0")).contains("cell[0].pairs"));
        assert!(e(&FILE.replace("pairs = 3", "pairs = 65")).contains("cell[0].pairs"));
        assert!(e(&FILE.replace("pairs = 3", "pairs = \"x\"")).contains("cell[0].pairs"));
        assert!(e(&format!("{FILE}[grid]\nloss = [0.0]\n")).contains("grid"));
        assert!(e(&FILE.replace("pairs = 3", "pairs = 3\nipv6 = true")).contains("cell[0]"));
        assert!(e(&FILE.replace(
            "pairs = 3",
            "pairs = 3\noutage = { start_s = 1.0, duration_s = 1.0 }"
        ))
        .contains("cell[0].outage"));
        assert!(e(&FILE.replace("kind = \"bulk\"", "kind = \"rpc\"")).contains("workload.kind"));
        // The scenario's own checks still name their field.
        assert!(
            e(&FILE.replace("rate_mbps = 100.0\npairs", "rate_mbps = -1.0\npairs"))
                .contains("cell[0].rate_mbps")
        );
    }

    #[test]
    fn stamps_tell_pair_sequence_and_page_apart() {
        let mut a = Vec::new();
        crate::soak::payload(1, 0, MSG, &mut a);
        let mut b = a.clone();
        stamp(&mut a, 1, 7);
        stamp(&mut b, 1, 8);
        assert_ne!(a, b);
        let mut c = a.clone();
        stamp(&mut c, 2, 7);
        assert_ne!(a, c);
        // Only the stamped words differ.
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differ > 0 && differ <= 8 * (MSG / STAMP_EVERY));
        // Page words differ within one message.
        assert_ne!(a[..8], a[STAMP_EVERY..STAMP_EVERY + 8]);
    }

    #[test]
    fn rates_bound_the_aggregate_by_the_whole_window() {
        let cell = GatewayFile::parse(FILE, "gw.toml").unwrap().cells(false)[0]
            .0
            .clone();
        let mut row = GwRow::default();
        let s = 1_000_000_000;
        // Two pairs of 12.5 MB: one over 1 s, one over 2 s, starting together.
        let p = [
            PairTimes {
                first_send_ns: Some(s),
                last_recv_ns: Some(2 * s),
                bytes: 12_500_000,
            },
            PairTimes {
                first_send_ns: Some(s),
                last_recv_ns: Some(3 * s),
                bytes: 12_500_000,
            },
        ];
        rates(&mut row, &cell, &p);
        assert_eq!(row.pair_goodput_mbps, vec![100.0, 50.0]);
        // 25 MB over 2 s.
        assert!((row.goodput_mbps.unwrap() - 100.0).abs() < 1e-9);
        assert!((row.utilization.unwrap() - 1.0).abs() < 1e-9);
        assert!((row.jain.unwrap() - 22500.0 / (2.0 * 12500.0)).abs() < 1e-12);
    }
}
