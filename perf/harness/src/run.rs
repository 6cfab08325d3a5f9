//! The drivers: how each contender is put on an emulated link for one cell.
//!
//! | contender | emulator | endpoints |
//! |---|---|---|
//! | lu2k | UDP relay (rootless) | kshim + engine node per side, engines' peer entries point at the relay |
//! | lu2k, several links | a UDP relay per link | each engine's `[[peer]]` has a `[[peer.link]]` per relay |
//! | lu2k, IPv6 | UDP relay in a network namespace (root) | the same on ULA addresses of its loopback device |
//! | udt4 | UDP relay | `udt` crate stream sockets, flow window and buffers sized to the path |
//! | srt | UDP relay | `srt-file-transmit` (SRT file mode) |
//! | quic-cubic, quic-bbr | UDP relay | quinn, one unidirectional stream |
//! | tcp-cubic, tcp-bbr | TUN between two network namespaces (root) | std sockets, `TCP_CONGESTION` |
//!
//! Relay and TUN emulators run the same linkem model with the same settings
//! and seed; the relay adds `overhead_bytes` (28, the IP and UDP headers it
//! does not see) so both count whole IP packets. Every run gets a fresh link;
//! the receiving node starts first, then the sender (time zero of the run).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lu2k_engine::transport::links::{LinkCfg, Policy};
use lu2k_linkem::{Netns, Relay, RelayConfig, TunConfig, TunLink};

use crate::collect::{
    cpu_spent, cpu_ticks, goodput_mbps, load_avg, steady_mbps, steal_share, CpuSnapshot, CpuSpent,
    OthersWatch, Percentiles, Series, STEADY_MIN_RTTS,
};
use crate::node::{self, Kind, Line, Lu2kSpec, Node, NodeResult, NodeSpec, Role};
use crate::quic::QuicSpec;
use crate::report::{LinkFigures, LinksFigures, LoadAvg, Row};
use crate::scenario::{Cell, Contender, LinkPolicy, WorkloadKind};
use crate::tuning::{PathInfo, QuicCc};

/// Settings of a harness run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Seed of the link model.
    pub seed: u64,
    /// Scratch directory (sockets).
    pub tmp: PathBuf,
    /// Engine cores for lu2k.
    pub lu2k_cores: u16,
    /// kshim RX buffers per lu2k node.
    pub lu2k_rx_bufs: u32,
    /// kshim's TX pool per lu2k node in a relayed cell (every one but
    /// `loopback`'s), bytes (`None`: sized for the cell's path, [`tx_pool_for`]).
    pub lu2k_tx_pool: Option<u64>,
    /// A pre-shared key file for lu2k: the sealed wire (`None`: plain).
    pub lu2k_psk: Option<PathBuf>,
    /// The lu2k engines' `max_rate_mbps` for their peer (`None`: uncapped).
    pub lu2k_max_rate_mbps: Option<f64>,
}

/// Whether this process may set up the TUN emulator.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Why `cc` cannot be used, if it cannot.
pub fn tcp_cc_missing(cc: &str) -> Option<String> {
    let avail =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").ok()?;
    if avail.split_whitespace().any(|a| a == cc) {
        return None;
    }
    // Root may load it as a module on first use; a plain user cannot.
    let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        .unwrap_or_default();
    if is_root() && std::path::Path::new("/proc/sys/kernel/modules_disabled").exists() {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/modules_disabled")
            .map(|s| s.trim() == "1")
            .unwrap_or(true);
        if !disabled && !allowed.is_empty() {
            return None;
        }
    }
    Some(format!(
        "TCP congestion control `{cc}` is not available (net.ipv4.tcp_available_congestion_control = {}); \
         build it into the kernel or load tcp_{cc}",
        avail.trim()
    ))
}

/// Why `contender` cannot run in `cell` here, if it cannot.
pub fn skip_reason_in(c: Contender, cell: &Cell) -> Option<String> {
    if cell.ipv6 && !is_root() {
        return Some(
            "the IPv6 cell puts the nodes on ULA addresses of a network namespace's \
             loopback device, which needs root; run as root"
                .into(),
        );
    }
    skip_reason(c, cell.workload.kind)
}

/// Why a contender cannot run here, if it cannot.
pub fn skip_reason(c: Contender, kind: WorkloadKind) -> Option<String> {
    match c {
        Contender::TcpCubic | Contender::TcpBbr => {
            if !is_root() {
                return Some(
                    "TCP crosses the emulated link through TUN devices in network namespaces, \
                     which needs root; run as root"
                        .into(),
                );
            }
            tcp_cc_missing(if c == Contender::TcpCubic {
                "cubic"
            } else {
                "bbr"
            })
        }
        Contender::Srt => {
            if kind == WorkloadKind::Rpc {
                return Some("the SRT driver runs the bulk and live workloads only".into());
            }
            crate::srt::available().err()
        }
        Contender::QuicCubic | Contender::QuicBbr => (kind == WorkloadKind::Rpc)
            .then(|| "the QUIC driver runs the bulk and live workloads only".into()),
        Contender::Lu2k
        | Contender::Lu2kSealed
        | Contender::Lu2kFec
        | Contender::Lu2kShare
        | Contender::Udt4 => None,
    }
}

/// The emulator a contender uses.
pub fn path_of(c: Contender) -> &'static str {
    match c {
        Contender::TcpCubic | Contender::TcpBbr => "tun",
        _ => "relay",
    }
}

/// A socket buffer that holds the path: 2 × (BDP + queue), at least 4 MiB.
fn buffer_for(cell: &Cell) -> usize {
    let bdp = cell.rate_mbps * 1e6 / 8.0 * cell.rtt_ms / 1e3;
    let queue = cell.link.forward.queue_bytes.unwrap_or(0) as f64;
    ((2.0 * (bdp + queue)) as usize).max(4 << 20)
}

/// A UDP port free on every one of `ips`, held (bound) until the holder is
/// dropped. The engines bind it only after the relay has bound its own
/// sockets on the same addresses with ports the kernel picks; a port
/// merely found free on one address could be taken on another, or be the
/// one the kernel gives the relay.
fn hold_udp_port(ips: &[Ipv4Addr]) -> Result<(u16, Vec<UdpSocket>)> {
    let (first, rest) = ips.split_first().context("no address to hold a port on")?;
    for _ in 0..32 {
        let a = UdpSocket::bind((*first, 0))?;
        let port = a.local_addr()?.port();
        let mut held = vec![a];
        for ip in rest {
            match UdpSocket::bind((*ip, port)) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        if held.len() == ips.len() {
            return Ok((port, held));
        }
    }
    bail!("no UDP port free on all of {ips:?} in 32 tries")
}

enum Emu {
    Relay(Relay),
    Tun(TunLink),
    /// One relay per link of a several-link cell, in the cell's order.
    Links(Vec<Relay>),
    /// A relay inside a network namespace (the IPv6 cell), which goes when
    /// the relay has stopped.
    InNetns(Relay, Netns),
}

impl Emu {
    fn epoch(&self) -> Instant {
        match self {
            Emu::Relay(r) | Emu::InNetns(r, _) => r.epoch(),
            Emu::Tun(t) => t.epoch(),
            Emu::Links(rs) => rs[0].epoch(),
        }
    }

    /// Forward bytes each link has delivered so far (several links only).
    fn links_delivered(&self) -> Vec<u64> {
        match self {
            Emu::Links(rs) => rs
                .iter()
                .map(|r| r.stats().forward.delivered.bytes)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Stops the emulator; each link's forward direction's counters.
    fn stop(self) -> Vec<Option<lu2k_linkem::Stats>> {
        let fwd = |s: Result<lu2k_linkem::RelayStats, _>| s.ok().map(|s| s.forward);
        match self {
            Emu::Relay(r) => vec![fwd(r.stop())],
            Emu::InNetns(r, ns) => {
                let st = fwd(r.stop());
                drop(ns);
                vec![st]
            }
            Emu::Tun(t) => vec![fwd(t.stop())],
            Emu::Links(rs) => rs.into_iter().map(|r| fwd(r.stop())).collect(),
        }
    }
}

/// The links' forward counters added up (None if any is missing).
fn sum_stats(each: &[Option<lu2k_linkem::Stats>]) -> Option<lu2k_linkem::Stats> {
    let add = |a: lu2k_linkem::Count, b: lu2k_linkem::Count| lu2k_linkem::Count {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    };
    each.iter().try_fold(lu2k_linkem::Stats::default(), |t, s| {
        let s = (*s)?;
        Some(lu2k_linkem::Stats {
            offered: add(t.offered, s.offered),
            dropped_queue: add(t.dropped_queue, s.dropped_queue),
            dropped_outage: add(t.dropped_outage, s.dropped_outage),
            dropped_loss: add(t.dropped_loss, s.dropped_loss),
            duplicated: add(t.duplicated, s.duplicated),
            delivered: add(t.delivered, s.delivered),
        })
    })
}

/// kshim's TX pool for a cell: as given, or sized for the path as
/// `lu2k-kshim --path-rate-mbps --path-rtt-ms` sizes it. A message holds its
/// TX memory until its last byte is acknowledged, and the sending engine keeps
/// every page of the pool it once sent from resident, so the pool is the
/// sending node's memory: sized for the path, not kshim's fixed default.
pub fn tx_pool_for(cell: &Cell, opts: &Opts) -> u64 {
    opts.lu2k_tx_pool.unwrap_or_else(|| {
        lu2k_kshim::ring_abi::tx_pool::bytes_for_path(cell.rate_mbps, cell.rtt_ms).0
    })
}

/// The path as the tuned contenders see it ([`crate::tuning`]).
pub fn path_info(cell: &Cell) -> PathInfo {
    PathInfo {
        rtt_ms: cell.rtt_ms,
        rate_mbps: cell.rate_mbps,
        queue_bytes: cell.link.forward.queue_bytes.unwrap_or(0),
        outage_s: cell.outage.map_or(0.0, |o| o.duration_s),
    }
}

fn spec(kind: Kind, role: Role, cell: &Cell, addr: SocketAddr) -> NodeSpec {
    NodeSpec {
        kind,
        role,
        workload: cell.workload.clone(),
        addr,
        cc: None,
        buffer: buffer_for(cell),
        lu2k: None,
        path: path_info(cell),
        quic: None,
    }
}

/// Runs `contender` in `cell` and returns its row (skipped or failed rows too),
/// with the machine's load average before and after.
pub fn run(
    scenario: &str,
    cell: &Cell,
    contender: Contender,
    opts: &Opts,
    mp: &MultiProgress,
) -> Row {
    let before = load_avg();
    let ticks = cpu_ticks();
    let mut row = run_row(scenario, cell, contender, opts, mp);
    row.load_avg = before
        .zip(load_avg())
        .map(|(start, end)| LoadAvg::new(start, end));
    row.steal = ticks.zip(cpu_ticks()).and_then(|(a, b)| steal_share(a, b));
    row.goodput_runs = vec![row.goodput_mbps];
    row.goodput_min = row.goodput_mbps;
    row.goodput_max = row.goodput_mbps;
    if let Some(loaded) = row.load_avg.as_ref().and_then(|l| l.loaded(row.steal)) {
        row.note = Some(match row.note.take() {
            Some(n) => format!("{n}; {loaded}"),
            None => loaded,
        });
    }
    row
}

fn run_row(
    scenario: &str,
    cell: &Cell,
    contender: Contender,
    opts: &Opts,
    mp: &MultiProgress,
) -> Row {
    let path = path_of(contender);
    if let Some(why) = skip_reason_in(contender, cell) {
        eprintln!("SKIPPED {contender} in {}: {why}", cell.name);
        return Row::not_run(
            scenario,
            cell,
            contender.name(),
            path,
            format!("skipped: {why}"),
        );
    }
    match run_inner(scenario, cell, contender, opts, mp) {
        Ok(r) => {
            // One line per run, also where the progress bars are hidden (no terminal).
            eprintln!(
                "{} {contender}: {} Mbit/s, {} bytes, CPU {:.2} s (processes {:.2} s), link drops {} queue / {} loss, {}",
                cell.name,
                r.goodput_mbps.map_or("-".into(), |g| format!("{g:.1}")),
                r.bytes,
                r.cpu_s.unwrap_or(0.0),
                r.proc_cpu_s.unwrap_or(0.0),
                r.queue_drops.unwrap_or(0),
                r.loss_drops.unwrap_or(0),
                r.status
            );
            r
        }
        Err(e) => {
            eprintln!("FAILED {contender} in {}: {e:#}", cell.name);
            Row::not_run(
                scenario,
                cell,
                contender.name(),
                path,
                format!("failed: {e:#}"),
            )
        }
    }
}

fn run_inner(
    scenario: &str,
    cell: &Cell,
    contender: Contender,
    opts: &Opts,
    mp: &MultiProgress,
) -> Result<Row> {
    let w = &cell.workload;
    // Before anything of the run exists, and after it is all gone (nodes
    // reaped, emulator stopped): the same window for both CPU figures.
    let cpu0 = CpuSnapshot::take();
    let others = OthersWatch::start();
    // Before the sender exists: no byte can be sent earlier.
    let pre_ns = node::mono_ns();
    let Started { emu, rx, tx, setup } = start(cell, contender, opts)?;
    let t0 = Instant::now();
    let t0_ns = node::mono_ns();
    let outage_offset = t0.saturating_duration_since(emu.epoch()).as_secs_f64();
    let target = target_bytes(w);
    let bar = progress_bar(mp, target, cell, contender);
    let (measuring, waiting) = measuring_first(w.kind, rx, tx);
    let limit = Duration::from_secs_f64(w.max_duration_s + w.duration_s + 60.0);
    let mut seen = watch(&measuring, &waiting, &emu, t0, limit, target, &bar);
    // The other side reports when it is done; give it a moment, then end it.
    if seen.other.is_none() {
        seen.other = await_result(&waiting, Duration::from_secs(3));
    }
    measuring.join(Duration::from_secs(15));
    waiting.stop(Duration::from_secs(3));
    let wires = emu.stop();
    let wire = sum_stats(&wires);
    let watched = others.finish();
    let cpu = cpu0
        .zip(CpuSnapshot::take())
        .map(|(a, b)| cpu_spent(&a, &b.with_watch(watched)));
    bar.finish();

    let Some(res) = seen.result else {
        bail!("the measuring node ended without a result (see its messages above)");
    };
    let outcome = Outcome {
        res,
        other: seen.other,
        series: seen.series,
        t_end: seen.t_end,
        t0_ns,
        pre_s: since(t0_ns, pre_ns),
        outage_offset,
        wire,
        wires,
        link_series: seen.links,
        cpu,
        target,
    };
    let mut row = row(scenario, cell, contender, &outcome);
    row.tuning = [row.tuning.take(), setup]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a}; {b}"));
    Ok(row)
}

/// A contender's emulated link with its two nodes running on it.
struct Started {
    emu: Emu,
    rx: Node,
    tx: Node,
    /// What the harness set up for the contender outside its nodes (TCP: the
    /// qdisc), for the row's `tuning`.
    setup: Option<String>,
}

/// Starts the emulator and the nodes: the receiver first, then the sender
/// (time zero of the run).
fn start(cell: &Cell, contender: Contender, opts: &Opts) -> Result<Started> {
    match contender {
        Contender::Udt4 => start_on_relay(Kind::Udt4, cell, opts, None),
        Contender::Srt => start_on_relay(Kind::Srt, cell, opts, None),
        Contender::QuicCubic => {
            start_on_relay(Kind::Quic, cell, opts, Some(QuicSpec::new(QuicCc::Cubic)?))
        }
        Contender::QuicBbr => {
            start_on_relay(Kind::Quic, cell, opts, Some(QuicSpec::new(QuicCc::Bbr)?))
        }
        Contender::TcpCubic => start_tcp(cell, opts, "cubic"),
        Contender::TcpBbr => start_tcp(cell, opts, "bbr"),
        Contender::Lu2k => start_lu2k(cell, opts),
        Contender::Lu2kFec => start_lu2k_with(cell, opts, true),
        Contender::Lu2kShare => start_lu2k(
            cell,
            &Opts {
                lu2k_max_rate_mbps: Some(cell.rate_mbps),
                ..opts.clone()
            },
        ),
        Contender::Lu2kSealed => {
            let key = opts
                .tmp
                .join(format!("lu2k-perf-sealed-psk-{}", std::process::id()));
            write_psk(&key)?;
            let sealed = Opts {
                lu2k_psk: Some(key),
                ..opts.clone()
            };
            start_lu2k(cell, &sealed)
        }
    }
}

/// Writes a fresh 32-byte pre-shared key to `path`, readable by its owner only
/// (the engine refuses a key file others can read).
pub fn write_psk(path: &std::path::Path) -> Result<()> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut key))
        .context("reading /dev/urandom for the key")?;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing the key file {}", path.display()))?;
    f.write_all(&key)?;
    Ok(())
}

/// A transport over UDP (UDT4, SRT, QUIC) through the relay: the receiver
/// listens on loopback, the relay forwards to it, the sender connects to the
/// relay.
fn start_on_relay(kind: Kind, cell: &Cell, opts: &Opts, quic: Option<QuicSpec>) -> Result<Started> {
    let exe = node::self_command;
    let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut rs = spec(kind, Role::Recv, cell, lo);
    rs.quic.clone_from(&quic);
    let mut rx = Node::spawn(Node::command(exe()?, &rs)?)?;
    let at = rx.wait_listen(Duration::from_secs(20))?;
    let mut rc = RelayConfig::loopback(cell.link.clone(), opts.seed);
    rc.b_peer = Some(at);
    let relay = Relay::spawn(rc).context("starting the link emulator (relay)")?;
    let mut tx_spec = spec(kind, Role::Send, cell, relay.a_addr());
    tx_spec.quic = quic;
    let tx = Node::spawn(Node::command(exe()?, &tx_spec)?)?;
    Ok(Started {
        emu: Emu::Relay(relay),
        rx,
        tx,
        setup: None,
    })
}

/// TCP with congestion control `cc` between two network namespaces joined by
/// the TUN emulator; each node runs inside its namespace.
fn start_tcp(cell: &Cell, opts: &Opts, cc: &str) -> Result<Started> {
    let name = format!("lu2kp{}", std::process::id() % 100_000);
    // The TUN emulator sees whole IP packets: no header overhead to add.
    let mut link = cell.link.clone();
    link.forward.overhead_bytes = 0;
    link.reverse.overhead_bytes = 0;
    let tun = TunLink::spawn(TunConfig::new(link, opts.seed, &name))
        .context("starting the link emulator (TUN; needs root and iproute2)")?;
    let at = SocketAddr::from((tun.b_ip(), 5201));
    let setup = Some(fq_qdisc(&tun, cc));
    let mut rs = spec(Kind::Tcp, Role::Recv, cell, at);
    rs.cc = Some(cc.into());
    let exe_path = std::env::current_exe()?;
    let mut rx = Node::spawn(Node::command(
        tun.b().command(&exe_path.to_string_lossy()),
        &rs,
    )?)?;
    rx.wait_listen(Duration::from_secs(20))?;
    let mut ts = spec(Kind::Tcp, Role::Send, cell, at);
    ts.cc = Some(cc.into());
    let tx = Node::spawn(Node::command(
        tun.a().command(&exe_path.to_string_lossy()),
        &ts,
    )?)?;
    Ok(Started {
        emu: Emu::Tun(tun),
        rx,
        tx,
        setup,
    })
}

/// BBR's pacing: the fq qdisc on both namespaces' TUN devices where the
/// kernel has it (`tc qdisc replace … root fq`); without it BBR paces
/// itself (TCP internal pacing, Linux 4.20+). CUBIC keeps the default qdisc.
/// Returns what the row's `tuning` says about it.
fn fq_qdisc(tun: &TunLink, cc: &str) -> String {
    if !crate::tuning::tcp(&PathInfo::default(), cc, false).fq {
        return "qdisc: default".into();
    }
    let mut why = None;
    for ns in [tun.a(), tun.b()] {
        let out = std::process::Command::new("tc")
            .args(["-n", ns.name(), "qdisc", "replace", "dev"])
            .arg(lu2k_linkem::tun::DEVICE)
            .args(["root", "fq"])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => why = Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => why = Some(format!("tc: {e}")),
        }
    }
    match why {
        None => "qdisc: fq (pacing)".into(),
        Some(w) => format!("qdisc: fq unavailable ({w}); BBR paces itself (TCP internal pacing)"),
    }
}

/// lu2k through the relay: each node's engine has the relay as its peer's
/// address, and the relay's sockets sit on the NID addresses. A cell with
/// several links has a relay per link; an IPv6 cell runs in a network
/// namespace with IPv6 addresses.
fn start_lu2k(cell: &Cell, opts: &Opts) -> Result<Started> {
    start_lu2k_with(cell, opts, false)
}

/// [`start_lu2k`], with forward error correction between the engines if
/// `fec` (single-link IPv4 cells).
fn start_lu2k_with(cell: &Cell, opts: &Opts, fec: bool) -> Result<Started> {
    if fec && (!cell.links.is_empty() || cell.ipv6) {
        bail!("lu2k-fec runs single-link IPv4 cells only");
    }
    if !cell.links.is_empty() {
        return start_lu2k_links(cell, opts);
    }
    if cell.ipv6 {
        return start_lu2k_v6(cell, opts);
    }
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 77, 1), Ipv4Addr::new(127, 0, 77, 2));
    let (port, held) = hold_udp_port(&[a_ip, b_ip])?;
    let relay = Relay::spawn(lu2k_relay(cell, opts, a_ip.into(), b_ip.into(), port))
        .context("starting the link emulator (relay)")?;
    drop(held);
    let ips = (a_ip.into(), b_ip.into());
    let (rx, tx) = lu2k_nodes(cell, opts, ips, port, &relay, None, fec)?;
    Ok(Started {
        emu: Emu::Relay(relay),
        rx,
        tx,
        setup: None,
    })
}

/// The relay between lu2k nodes at `a_ip` and `b_ip` whose engines use
/// `port`: each of its sockets sits on the address of the node it stands for.
fn lu2k_relay(cell: &Cell, opts: &Opts, a_ip: IpAddr, b_ip: IpAddr, port: u16) -> RelayConfig {
    let mut rc = RelayConfig::loopback(cell.link.clone(), opts.seed);
    rc.a_bind = SocketAddr::new(b_ip, 0);
    rc.b_bind = SocketAddr::new(a_ip, 0);
    rc.a_peer = Some(SocketAddr::new(a_ip, port));
    rc.b_peer = Some(SocketAddr::new(b_ip, port));
    rc
}

/// The two lu2k nodes of a single-link cell at `(a_ip, b_ip)` (sender,
/// receiver) through `relay`, started inside `netns` if given.
fn lu2k_nodes(
    cell: &Cell,
    opts: &Opts,
    (a_ip, b_ip): (IpAddr, IpAddr),
    port: u16,
    relay: &Relay,
    netns: Option<&Netns>,
    fec: bool,
) -> Result<(Node, Node)> {
    let dir = opts.tmp.join(format!("lu2k-{}", std::process::id()));
    let l = |ip, peer_ip, peer| Lu2kSpec {
        ip,
        bind: ip,
        port,
        peer_ip,
        peer_addr: Some(peer),
        links: Vec::new(),
        policy: None,
        dir: dir.clone(),
        cores: opts.lu2k_cores,
        rx_bufs: opts.lu2k_rx_bufs,
        tx_pool: Some(tx_pool_for(cell, opts)),
        psk_file: opts.lu2k_psk.clone(),
        fec,
        max_rate_mbps: opts.lu2k_max_rate_mbps,
    };
    let command = || -> Result<std::process::Command> {
        match netns {
            Some(ns) => Ok(ns.command(&std::env::current_exe()?.to_string_lossy())),
            None => node::self_command(),
        }
    };
    let mut rs = spec(Kind::Lu2k, Role::Recv, cell, relay.b_addr());
    rs.lu2k = Some(l(b_ip, a_ip, relay.b_addr()));
    let rx = Node::spawn(Node::command(command()?, &rs)?)?;
    let mut ts = spec(Kind::Lu2k, Role::Send, cell, relay.a_addr());
    ts.lu2k = Some(l(a_ip, b_ip, relay.a_addr()));
    let tx = Node::spawn(Node::command(command()?, &ts)?)?;
    Ok((rx, tx))
}

/// The IPv6 cell's node addresses (ULA, `fd00::/8`), on the loopback device
/// of the run's network namespace.
pub const V6_NODES: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd6c, 0x7532, 0x6b00, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd6c, 0x7532, 0x6b00, 0, 0, 0, 0, 2),
];

/// lu2k over IPv6: a network namespace whose loopback device holds the two
/// nodes' ULA addresses ([`V6_NODES`]); the relay's sockets (created inside
/// it), both engines' `bind` and `[[peer]]` addresses and both NIDs are
/// IPv6. Root.
fn start_lu2k_v6(cell: &Cell, opts: &Opts) -> Result<Started> {
    let name = format!("lu2kp6-{}", std::process::id() % 100_000);
    let ns = Netns::create(&name).context("creating the IPv6 cell's network namespace")?;
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(["-n", &name])
            .args(args)
            .output()
            .context("running ip (iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip -n {name} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    ip(&["link", "set", "lo", "up"])?;
    for a in V6_NODES {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
    }
    let (a_ip, b_ip) = (IpAddr::V6(V6_NODES[0]), IpAddr::V6(V6_NODES[1]));
    // A fresh namespace: every port is free.
    let port = 7988;
    let rc = lu2k_relay(cell, opts, a_ip, b_ip, port);
    let relay = ns
        .run(|| Relay::spawn(rc))
        .context("entering the IPv6 cell's network namespace")?
        .context("starting the link emulator (relay, IPv6)")?;
    let (rx, tx) = lu2k_nodes(cell, opts, (a_ip, b_ip), port, &relay, Some(&ns), false)?;
    Ok(Started {
        emu: Emu::InNetns(relay, ns),
        rx,
        tx,
        setup: None,
    })
}

/// Node A's and node B's address on link `i` of a several-link cell.
fn link_ips(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    let net = 71 + i as u8;
    (Ipv4Addr::new(127, 0, net, 1), Ipv4Addr::new(127, 0, net, 2))
}

/// lu2k over a cell's several links: one relay per link, each with its own
/// link model (rate, delay, loss, outage); each node has an address per link
/// (`link_ips`, its NID the first), and each engine a `[[peer]]` with a
/// `[[peer.link]]` per link whose remote is that link's relay socket, which
/// sits on the other node's address on the link, so the engines tell the
/// links apart by address as they would two modems. The engines bind the
/// wildcard address, each on its own port; the kernel's route to a loopback
/// address leaves from 127.0.0.1, not the link's `local` (the engine warns
/// about that at start), so the relays send to 127.0.0.1 and each engine's port.
fn start_lu2k_links(cell: &Cell, opts: &Opts) -> Result<Started> {
    let any = Ipv4Addr::UNSPECIFIED;
    // Held (two distinct ports) until the relays have bound theirs.
    let (a_port, a_held) = hold_udp_port(&[any])?;
    let (b_port, b_held) = hold_udp_port(&[any])?;
    let mut relays = Vec::new();
    for (i, l) in cell.links.iter().enumerate() {
        let (a_ip, b_ip) = link_ips(i);
        let mut rc = RelayConfig::loopback(l.link.clone(), opts.seed.wrapping_add(i as u64));
        rc.a_bind = SocketAddr::from((b_ip, 0));
        rc.b_bind = SocketAddr::from((a_ip, 0));
        // Where the kernel's route to a loopback address sends from.
        rc.a_peer = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, a_port)));
        rc.b_peer = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, b_port)));
        relays.push(
            Relay::spawn(rc).with_context(|| format!("starting the link emulator of link {i}"))?,
        );
    }
    drop((a_held, b_held));
    let policy = match cell.policy {
        Some(LinkPolicy::Balance) => Policy::Balance,
        _ => Policy::Failover,
    };
    let dir = opts.tmp.join(format!("lu2k-{}", std::process::id()));
    let node_spec = |side: usize| {
        let (me, peer) = (link_ips(0), link_ips(0));
        let (ip, peer_ip, port) = if side == 0 {
            (me.0, peer.1, a_port)
        } else {
            (me.1, peer.0, b_port)
        };
        let links = cell
            .links
            .iter()
            .zip(&relays)
            .enumerate()
            .map(|(i, (l, r))| {
                let (a, b) = link_ips(i);
                LinkCfg {
                    local: if side == 0 { a } else { b }.into(),
                    remote: if side == 0 { r.a_addr() } else { r.b_addr() },
                    weight: l.weight,
                }
            })
            .collect();
        Lu2kSpec {
            ip: ip.into(),
            bind: any.into(),
            port,
            peer_ip: peer_ip.into(),
            peer_addr: None,
            links,
            policy: Some(policy),
            dir: dir.clone(),
            cores: opts.lu2k_cores,
            rx_bufs: opts.lu2k_rx_bufs,
            tx_pool: Some(tx_pool_for(cell, opts)),
            psk_file: None,
            fec: false,
            max_rate_mbps: None,
        }
    };
    let exe = node::self_command;
    let mut rs = spec(Kind::Lu2k, Role::Recv, cell, relays[0].b_addr());
    rs.lu2k = Some(node_spec(1));
    let rx = Node::spawn(Node::command(exe()?, &rs)?)?;
    let mut ts = spec(Kind::Lu2k, Role::Send, cell, relays[0].a_addr());
    ts.lu2k = Some(node_spec(0));
    let tx = Node::spawn(Node::command(exe()?, &ts)?)?;
    Ok(Started {
        emu: Emu::Links(relays),
        rx,
        tx,
        setup: None,
    })
}

/// The nodes as (measuring, waiting): the node that measures is the
/// receiver, or the rpc client (the sender).
fn measuring_first(kind: WorkloadKind, rx: Node, tx: Node) -> (Node, Node) {
    if kind == WorkloadKind::Rpc {
        (tx, rx)
    } else {
        (rx, tx)
    }
}

/// The progress bar's length: payload bytes of the whole workload (live: the
/// stream's duration at its rate, which a complete live run reaches).
fn target_bytes(w: &crate::scenario::Workload) -> u64 {
    match w.kind {
        WorkloadKind::Bulk => w.bytes,
        WorkloadKind::Live => (w.duration_s * w.stream_mbps * 1e6 / 8.0) as u64,
        WorkloadKind::Rpc => 2 * u64::from(w.size) * u64::from(w.count),
    }
}

fn progress_bar(mp: &MultiProgress, target: u64, cell: &Cell, contender: Contender) -> ProgressBar {
    let bar = mp.add(ProgressBar::new(target));
    bar.set_style(
        ProgressStyle::with_template("{prefix:<34} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {}", cell.name, contender));
    bar
}

/// Seconds from `t0_ns` to `ns` on the monotonic clock (negative before).
fn since(t0_ns: u64, ns: u64) -> f64 {
    (ns as f64 - t0_ns as f64) / 1e9
}

/// What [`watch`] saw of a run.
struct Seen {
    /// The measuring node's progress.
    series: Series,
    /// The measuring node's result, if it gave one in time.
    result: Option<NodeResult>,
    /// The waiting node's result, if it came meanwhile.
    other: Option<NodeResult>,
    /// Seconds from time zero until the watch ended.
    t_end: f64,
    /// Several links: each link's forward delivered bytes over time.
    links: Vec<Series>,
}

/// Follows the measuring node's progress lines until its result, its end or
/// `limit` after `t0`, moving the bar and its rate (over at least 1 s); keeps
/// the waiting node's result if it comes meanwhile.
fn watch(
    measuring: &Node,
    waiting: &Node,
    emu: &Emu,
    t0: Instant,
    limit: Duration,
    target: u64,
    bar: &ProgressBar,
) -> Seen {
    let mut series = Series::new(t0);
    let mut links: Vec<Series> = emu
        .links_delivered()
        .iter()
        .map(|_| Series::new(t0))
        .collect();
    let mut sampled = t0;
    let mut result: Option<NodeResult> = None;
    let mut other: Option<NodeResult> = None;
    let mut last_rate = (t0, 0u64);
    while result.is_none() {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        match measuring
            .lines
            .recv_timeout(left.min(Duration::from_millis(50)))
        {
            Ok(Line::Progress(at, b)) => {
                series.push(at, b);
                bar.set_position(b.min(target));
                if at.duration_since(last_rate.0) >= Duration::from_secs(1) {
                    let mbps = (b - last_rate.1) as f64 * 8.0
                        / at.duration_since(last_rate.0).as_secs_f64()
                        / 1e6;
                    bar.set_message(format!("{mbps:.1} Mbit/s"));
                    last_rate = (at, b);
                }
            }
            Ok(Line::Result(r)) => result = Some(*r),
            Ok(Line::Closed) => break,
            Ok(Line::Listen(_)) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
        while let Ok(l) = waiting.lines.try_recv() {
            if let Line::Result(r) = l {
                other = Some(*r);
            }
        }
        // Each link's delivered bytes, every 50 ms (as often as progress).
        if !links.is_empty() && sampled.elapsed() >= Duration::from_millis(50) {
            sampled = Instant::now();
            for (s, b) in links.iter_mut().zip(emu.links_delivered()) {
                s.push(sampled, b);
            }
        }
    }
    Seen {
        series,
        result,
        other,
        t_end: t0.elapsed().as_secs_f64(),
        links,
    }
}

/// The node's result if it reports one within `grace` (or until its output
/// closes).
fn await_result(node: &Node, grace: Duration) -> Option<NodeResult> {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match node.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(Line::Result(r)) => return Some(*r),
            Ok(Line::Closed) => break,
            _ => {}
        }
    }
    None
}

/// What a finished run left for its row.
struct Outcome {
    /// The measuring node's result.
    res: NodeResult,
    /// The other node's result, if it reported.
    other: Option<NodeResult>,
    /// The measuring node's progress.
    series: Series,
    /// Seconds from time zero until the run was stopped.
    t_end: f64,
    /// Time zero on the monotonic clock.
    t0_ns: u64,
    /// Seconds from time zero back to before the sender was started (≤ 0).
    pre_s: f64,
    /// Seconds from the emulator's epoch (outage times count from it) to time zero.
    outage_offset: f64,
    /// The link's forward counters (several links: added up).
    wire: Option<lu2k_linkem::Stats>,
    /// Each link's forward counters.
    wires: Vec<Option<lu2k_linkem::Stats>>,
    /// Several links: each link's forward delivered bytes over time.
    link_series: Vec<Series>,
    /// CPU seconds of the run ([`CpuSpent`]; None where `/proc` could not
    /// be read).
    cpu: Option<CpuSpent>,
    /// Payload bytes of the complete workload (see [`target_bytes`]).
    target: u64,
}

/// The row of a run that produced a result.
fn row(scenario: &str, cell: &Cell, contender: Contender, o: &Outcome) -> Row {
    let w = &cell.workload;
    let res = &o.res;
    // The rpc client sends as well as measures; elsewhere the sender is the other node.
    let sender = if w.kind == WorkloadKind::Rpc {
        None
    } else {
        o.other.as_ref()
    };
    let mut row = Row::not_run(
        scenario,
        cell,
        contender.name(),
        path_of(contender),
        String::new(),
    );
    row.bytes = res.bytes;
    row.wire_bytes = o.wire.map(|w| w.offered.bytes);
    row.queue_drops = o.wire.map(|w| w.dropped_queue.packets);
    row.loss_drops = o
        .wire
        .map(|w| w.dropped_loss.packets + w.dropped_outage.packets);
    row.cpu_s = o.cpu.map(|c| c.fair_s);
    row.proc_cpu_s = o.cpu.map(|c| c.proc_s);
    row.harness_sys_s = o.cpu.map(|c| c.harness_sys_s);
    row.others_cpu_s = o.cpu.map(|c| c.others_s);
    row.latency = Percentiles::of_us(&res.samples_us);
    if w.kind == WorkloadKind::Live {
        // Chunks are sampled in stream order (the receivers deliver in
        // order and put the missing tail last).
        let every_s = crate::node::LiveSchedule::of(w).every_ns as f64 / 1e9;
        let after_ms = cell.rtt_ms / 2.0 + crate::report::LIVE_LATE_RTTS * cell.rtt_ms;
        let chunks = crate::node::LiveSchedule::of(w).chunks;
        let on_time = res
            .samples_us
            .iter()
            .filter(|&&us| us / 1e3 <= after_ms)
            .count() as u64;
        row.late_after_ms = Some(after_ms);
        row.late_chunks = Some(chunks.saturating_sub(on_time));
        row.latency_series = res
            .samples_us
            .iter()
            .enumerate()
            .map(|(i, &us)| (i as f64 * every_s, us / 1e3))
            .collect();
    }
    row.note = [res.note.clone(), sender.and_then(|s| s.note.clone())]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a}; {b}"));
    // The sender's settings, and the receiver's where they differ.
    row.tuning = match (sender.and_then(|s| s.tuning.clone()), res.tuning.clone()) {
        (Some(s), Some(r)) if s != r => Some(format!("send: {s} | recv: {r}")),
        (s, r) => s.or(r),
    };
    // Retransmissions are counted on the sending side.
    row.retrans_bytes = match w.kind {
        WorkloadKind::Rpc => res.retrans_bytes,
        _ => sender.and_then(|s| s.retrans_bytes),
    };
    row.max_rss_mib = [
        res.max_rss_mib,
        o.other.as_ref().and_then(|s| s.max_rss_mib),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::max);
    row.copied_bytes = match (res.copied_bytes, sender.and_then(|s| s.copied_bytes)) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    let complete = match w.kind {
        WorkloadKind::Bulk => res.bytes >= w.bytes,
        WorkloadKind::Live => res.bytes >= o.target,
        WorkloadKind::Rpc => res.samples_us.len() as u32 >= w.count,
    };
    row.status = if complete {
        "ok".into()
    } else {
        "incomplete".into()
    };
    if !complete && res.note.is_none() {
        // What stopped it, where the nodes did not say: the cap.
        let why = format!(
            "not finished within the {} s cap ({:.0} % delivered)",
            w.max_duration_s
                + if w.kind == WorkloadKind::Live {
                    w.duration_s
                } else {
                    0.0
                },
            100.0 * res.bytes as f64 / o.target.max(1) as f64
        );
        row.note = Some(match row.note.take() {
            Some(n) => format!("{why}; {n}"),
            None => why,
        });
    }
    if w.kind != WorkloadKind::Rpc && res.bytes > 0 {
        add_rates(&mut row, cell, o, sender, complete);
    }
    row
}

/// Goodput, steady-state goodput, utilization, CPU per GB, the goodput series
/// and (bulk) time to 90 % and recovery of a run that moved bytes.
fn add_rates(row: &mut Row, cell: &Cell, o: &Outcome, sender: Option<&NodeResult>, complete: bool) {
    let w = &cell.workload;
    let (res, series) = (&o.res, &o.series);
    // What the links can carry together: goodput cannot exceed it.
    let capacity = cell.capacity_mbps();
    let rel = |ns: u64| since(o.t0_ns, ns);
    // From the sender's first payload byte (before the sender was started
    // where it did not say) to the last byte read; an incomplete run counts
    // until it was stopped. An outage counts too.
    let first_send = sender.and_then(|s| s.first_send_ns).map_or(o.pre_s, rel);
    let last = match res.last_recv_ns {
        Some(ns) if complete => rel(ns),
        _ => o.t_end,
    };
    let g = goodput_mbps(res.bytes, first_send, last);
    row.goodput_mbps = Some(g);
    row.utilization = Some(g / capacity);
    let any_outage = cell.outage.is_some() || cell.links.iter().any(|l| l.outage.is_some());
    if complete && w.kind == WorkloadKind::Bulk && !any_outage {
        // The round trip with a full bottleneck queue: how long a
        // retransmission can take (see `collect::steady_mbps`).
        let queue = cell.link.forward.queue_bytes.unwrap_or(0) as f64;
        let rtt_full = cell.rtt_ms / 1e3 + queue * 8.0 / (cell.rate_mbps * 1e6);
        row.steady_mbps = steady_mbps(series, res.bytes, last, cell.rtt_ms / 1e3, rtt_full);
    }
    let gb = res.bytes as f64 / 1e9;
    row.cpu_s_per_gb = o.cpu.map(|c| c.fair_s / gb);
    row.proc_cpu_s_per_gb = o.cpu.map(|c| c.proc_s / gb);
    row.goodput_series = series.binned(0.5);
    if !cell.links.is_empty() {
        row.links = Some(links_figures(cell, o, g, first_send, last));
    }
    if w.kind == WorkloadKind::Bulk {
        // Failover carries one link's worth at a time: 90 % of the first link's.
        let reach = match cell.policy {
            Some(LinkPolicy::Failover) => cell.links[0].capacity_mbps(),
            _ => capacity,
        };
        row.time_to_90_s = series.first_reaching(0.9 * reach, 1.0, 0.0);
        if let Some(out) = cell.outage {
            let end = out.start_s + out.duration_s - o.outage_offset;
            row.recovery_s = series
                .first_reaching(0.9 * capacity, 0.5, end)
                .map(|t| t - end);
        }
    }
}

/// Window of a rate over time that counts as traffic flowing, seconds.
const FLOWING_WINDOW_S: f64 = 0.5;

/// How many times the links' time to carry the bytes in flight a goal window
/// must span (see [`goal_min_window_s`]). The receiver counts a message when it
/// is whole, so the bytes counted inside a window can include bytes that
/// crossed the links before it began: at most the bytes in flight, since a
/// message is whole at the receiver before the sender's in-flight limit lets
/// the next one go. A window of 4 such times bounds that overcount at a
/// quarter of the capacity in the worst case (every in-flight byte held at
/// the window's start); the links deliver their messages in order, so what
/// the receiver holds is in practice a part of one message per link, a few
/// per cent of the window's bytes, inside the 3 % that packet headers take
/// from the payload. 4, not more, keeps the 600 ms cells' windows measured
/// (32 MiB in flight: 7.2 s at 150 Mbit/s, 10.7 s at 100).
const GOAL_INFLIGHT_TIMES: f64 = 4.0;

/// The shortest window a links goal figure is measured over, seconds:
/// [`GOAL_INFLIGHT_TIMES`] × the time `capacity_mbps` needs to carry the
/// workload's bytes in flight (its `in_flight` messages, or the whole transfer
/// when it sets no limit), and at least `floor_s` (balance: 8 round trips, a
/// steady rate's; failover: 0.5 s, its window being the time after the switch).
fn goal_min_window_s(cell: &Cell, capacity_mbps: f64, floor_s: f64) -> f64 {
    let w = &cell.workload;
    let in_flight = w
        .in_flight
        .map_or(w.bytes, |n| u64::from(n) * crate::lu2k::MSG as u64)
        .min(w.bytes);
    let carry_s = in_flight as f64 * 8.0 / (capacity_mbps * 1e6);
    floor_s.max(GOAL_INFLIGHT_TIMES * carry_s)
}

/// The words a goal says when its window is shorter than
/// [`goal_min_window_s`].
fn too_short(window_s: f64, min_s: f64) -> String {
    format!(
        "not measured: the window ({window_s:.2} s) is shorter than {min_s:.2} s (the \
         larger of 8 RTT (balance) or 0.5 s (failover) and {GOAL_INFLIGHT_TIMES} x the time the links carry the bytes in flight: whole \
         messages counted over a shorter one can read above the links' capacity); give \
         the cell more bytes or fewer in flight"
    )
}

/// A several-link run's figures (see [`LinksFigures`]): each link's wire
/// rate, and the cell's goal — failover: goodput through the outage against
/// the surviving link, the switch and the move back; balance: goodput
/// against the sum of the links.
fn links_figures(
    cell: &Cell,
    o: &Outcome,
    goodput: f64,
    first_send: f64,
    last: f64,
) -> LinksFigures {
    let span = (last - first_send).max(1e-6);
    let links = cell
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let wire_bytes = o.wires.get(i).copied().flatten().map(|s| s.delivered.bytes);
            LinkFigures {
                rate_mbps: l.rate_mbps,
                weight: l.weight,
                outage: l.outage.map(|x| (x.start_s, x.duration_s)),
                wire_bytes,
                wire_mbps: wire_bytes.map(|b| b as f64 * 8.0 / span / 1e6),
                wire_series: o
                    .link_series
                    .get(i)
                    .map_or(Vec::new(), |s| s.binned(FLOWING_WINDOW_S)),
            }
        })
        .collect();
    let policy = cell.policy.unwrap_or(LinkPolicy::Failover);
    let mut f = LinksFigures {
        policy: policy.name().into(),
        links,
        goal: String::new(),
        goal_ref_mbps: cell.capacity_mbps(),
        goal_mbps: None,
        goal_ratio: None,
        goal_window_s: None,
        whole_mbps: None,
        whole_ratio: None,
        switch_s: None,
        back_s: None,
        goal_ratio_runs: Vec::new(),
        whole_ratio_runs: Vec::new(),
        switch_runs: Vec::new(),
        back_runs: Vec::new(),
    };
    let rtt = cell.rtt_ms / 1e3;
    // Receiver's goodput over [a, b), Mbit/s.
    let rate = |a: f64, b: f64| (o.series.bytes_at(b) - o.series.bytes_at(a)) * 8.0 / (b - a) / 1e6;
    match (policy, cell.failover_outage()) {
        (LinkPolicy::Balance, _) => {
            f.whole_mbps = Some(goodput);
            let mut short = None;
            // While every link carries: from the end of the last link's first
            // 0.5 s at half its rate or more (start-up: connections, each
            // controller's first round trip) to the start of the first link's
            // last such 0.5 s (the tail, when the links drain one by one). Handshakes and
            // keep-alives on a link's wire do not count as carrying.
            let spans: Option<Vec<(f64, f64)>> = cell
                .links
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    o.link_series
                        .get(i)
                        .and_then(|s| carrying_span(s, 0.5 * l.rate_mbps, FLOWING_WINDOW_S))
                })
                .collect();
            if let Some(e) = spans.filter(|e| !e.is_empty()) {
                let a = e.iter().map(|x| x.0).fold(f64::MIN, f64::max);
                let b = e.iter().map(|x| x.1).fold(f64::MAX, f64::min).min(last);
                let min_s = goal_min_window_s(cell, f.goal_ref_mbps, STEADY_MIN_RTTS * rtt);
                if b - a >= min_s {
                    f.goal_window_s = Some((a, b));
                    f.goal_mbps = Some(rate(a, b));
                } else {
                    short = Some(too_short((b - a).max(0.0), min_s));
                }
            }
            f.goal = "goodput while every link carries (0.5 s at >= half its rate on the wire: \
                      from the last link's first such to the first link's last) / the links' \
                      capacities added up, goal >= 0.9; whole: the transfer's goodput / the same"
                .into();
            if f.goal_mbps.is_none() {
                let why = short
                    .unwrap_or_else(|| "not measured: no window with every link carrying".into());
                f.goal = format!("{}; {why}", f.goal);
            }
        }
        (LinkPolicy::Failover, None) => {
            f.goal = "no outage: goodput / the links' capacities added up".into();
            f.goal_mbps = Some(goodput);
        }
        (LinkPolicy::Failover, Some((down, up, out))) => {
            let surviving = cell.links[up].capacity_mbps();
            f.goal_ref_mbps = surviving;
            // The outage on time zero's clock, and when the receiver feels it.
            let start = out.start_s - o.outage_offset;
            let end = start + out.duration_s;
            let owd = cell.links[down].rtt_ms / 2e3;
            let (a, b) = (start + owd, end + owd);
            f.switch_s = o
                .series
                .first_reaching(0.9 * surviving, FLOWING_WINDOW_S, a)
                .filter(|&t| t <= last + 1e-9)
                .map(|t| t - start);
            f.back_s = o.link_series.get(down).and_then(|s| {
                s.first_reaching(0.9 * cell.links[down].rate_mbps, FLOWING_WINDOW_S, end)
                    .map(|t| t - end)
            });
            // After the switch: from the outage's start plus the switch time
            // (the end of the first 0.5 s at 90 %); without one, from when
            // the receiver feels the outage plus 3 RTT, the allowance for
            // detecting the silence and ramping the other link up.
            let after = match f.switch_s {
                Some(s) => (start + s).min(b),
                None => (a + 3.0 * rtt).min(b),
            };
            f.goal = format!(
                "goodput during link {down}'s outage (shifted by its one-way delay) after the \
                 switch (from the outage's start + switch s, or + owd + 3 RTT without one) / \
                 link {up}'s capacity, goal >= 0.9; whole: the whole outage / the same"
            );
            if last >= b && a >= first_send {
                f.whole_mbps = Some(rate(a, b));
                let min_s = goal_min_window_s(cell, surviving, FLOWING_WINDOW_S);
                if b - after >= min_s {
                    f.goal_window_s = Some((after, b));
                    f.goal_mbps = Some(rate(after, b));
                } else {
                    f.goal = format!("{}; {}", f.goal, too_short(b - after, min_s));
                }
            } else {
                f.goal = format!(
                    "{}; not measured: the transfer did not span the outage (give the cell \
                     more bytes)",
                    f.goal
                );
            }
        }
    }
    f.whole_ratio = f.whole_mbps.map(|g| g / f.goal_ref_mbps);
    f.goal_ratio = f.goal_mbps.map(|g| g / f.goal_ref_mbps);
    f
}

/// Where a cumulative series carried `mbps` or more over `window` seconds:
/// (the end of the first such window, the start of the last), on a 10 ms
/// grid: inside the time it carried. None if it never did.
fn carrying_span(s: &Series, mbps: f64, window: f64) -> Option<(f64, f64)> {
    let first = s.first_reaching(mbps, window, 0.0)?;
    let mut t = s.end();
    while t >= first {
        if (s.bytes_at(t) - s.bytes_at(t - window)) * 8.0 / window / 1e6 >= mbps {
            return Some((first, (t - window).max(first)));
        }
        t -= 0.01;
    }
    Some((first, first))
}

/// lu2k without an emulator: two kshim + engine nodes on loopback, engines
/// talking directly (the `loopback` subcommand). Returns the measuring node's
/// result (receiver, or rpc client) and the other node's.
pub fn lu2k_direct(
    workload: crate::scenario::Workload,
    opts: &Opts,
) -> Result<(NodeResult, Option<NodeResult>)> {
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 78, 1), Ipv4Addr::new(127, 0, 78, 2));
    // Free on both engines' addresses (nothing else binds there meanwhile).
    let (port, _) = hold_udp_port(&[a_ip, b_ip])?;
    let dir = opts.tmp.join(format!("lu2k-lo-{}", std::process::id()));
    let l = |ip: Ipv4Addr, peer_ip: Ipv4Addr| Lu2kSpec {
        ip: ip.into(),
        bind: ip.into(),
        port,
        peer_ip: peer_ip.into(),
        peer_addr: None,
        links: Vec::new(),
        policy: None,
        dir: dir.clone(),
        cores: opts.lu2k_cores,
        rx_bufs: opts.lu2k_rx_bufs,
        tx_pool: None,
        psk_file: opts.lu2k_psk.clone(),
        fec: false,
        max_rate_mbps: None,
    };
    let mk = |role, ip, peer| NodeSpec {
        kind: Kind::Lu2k,
        role,
        workload: workload.clone(),
        addr: SocketAddr::from((ip, port)),
        cc: None,
        buffer: 64 << 20,
        lu2k: Some(l(ip, peer)),
        path: PathInfo::default(),
        quic: None,
    };
    let rx = Node::spawn(Node::command(
        node::self_command()?,
        &mk(Role::Recv, b_ip, a_ip),
    )?)?;
    let tx = Node::spawn(Node::command(
        node::self_command()?,
        &mk(Role::Send, a_ip, b_ip),
    )?)?;
    let (measuring, waiting) = measuring_first(workload.kind, rx, tx);
    let limit = Duration::from_secs_f64(workload.max_duration_s + 60.0);
    let t0 = Instant::now();
    let mut result = None;
    while result.is_none() && t0.elapsed() < limit {
        match measuring.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(Line::Result(r)) => result = Some(*r),
            Ok(Line::Closed) => break,
            _ => {}
        }
    }
    let other = await_result(&waiting, Duration::from_secs(10));
    measuring.join(Duration::from_secs(15));
    waiting.stop(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
    Ok((
        result.context("the lu2k node ended without a result")?,
        other,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    /// A cumulative series at 10 ms steps of a rate (Mbit/s) over time.
    fn series(t0: Instant, end: f64, rate: impl Fn(f64) -> f64) -> Series {
        let mut s = Series::new(t0);
        let (mut t, mut bytes) = (0.0, 0.0);
        s.points.clear();
        while t <= end + 1e-9 {
            s.points.push((t, bytes as u64));
            bytes += rate(t) * 1e6 / 8.0 * 0.01;
            t += 0.01;
        }
        s
    }

    const FAILOVER: &str = r#"
name = "f"
contenders = ["lu2k"]
[workload]
kind = "bulk"
in_flight = 2
[[cell]]
rtt_ms = 600.0
rate_mbps = 100.0
policy = "failover"
[[cell.link]]
outage = { start_s = 5.0, duration_s = 5.0 }
[[cell.link]]
"#;

    fn outcome(cell_series: Series, links: Vec<Series>) -> Outcome {
        Outcome {
            res: NodeResult::default(),
            other: None,
            series: cell_series,
            t_end: 12.0,
            t0_ns: 0,
            pre_s: 0.0,
            // Time zero came 1 s after the links started: the outage is
            // [4, 9) s on the run's clock.
            outage_offset: 1.0,
            wire: None,
            wires: vec![None, None],
            link_series: links,
            cpu: None,
            target: 0,
        }
    }

    #[test]
    fn failover_goal_switch_and_move_back() {
        let cell = &Scenario::parse(FAILOVER, "t").unwrap().cells(false)[0];
        let t0 = Instant::now();
        // The receiver: 96 Mbit/s, nothing for the first second the outage
        // reaches it (4.3 s: its start plus the one-way delay), then 96 again.
        let rx = series(t0, 12.0, |t| {
            if (1.0..4.3).contains(&t) || t >= 5.3 {
                96.0
            } else {
                0.0
            }
        });
        // Link 0 carries until the outage, and again from 9.5 s.
        let l0 = series(t0, 12.0, |t| {
            if (1.0..4.0).contains(&t) || t >= 9.5 {
                98.0
            } else {
                0.0
            }
        });
        let l1 = series(
            t0,
            12.0,
            |t| if (4.5..9.8).contains(&t) { 98.0 } else { 0.0 },
        );
        let o = outcome(rx, vec![l0, l1]);
        let f = links_figures(cell, &o, 80.0, 0.0, 12.0);
        assert_eq!(f.policy, "failover");
        assert_eq!(f.goal_ref_mbps, 100.0, "link 1's capacity");
        // 90 Mbit/s over 0.5 s once 90/96 of the window is past 5.3 s:
        // 1.3 s + 0.47 s after the start.
        let sw = f.switch_s.unwrap();
        assert!((sw - (1.3 + 0.5 * 90.0 / 96.0)).abs() < 0.02, "{sw}");
        // The goal: after the switch, [4 + 1.77, 9.3): 96 Mbit/s throughout.
        let (a, b) = f.goal_window_s.unwrap();
        assert!(
            (a - (4.0 + sw)).abs() < 1e-9 && (b - 9.3).abs() < 1e-9,
            "{a} {b}"
        );
        let g = f.goal_mbps.unwrap();
        assert!((g - 96.0).abs() < 0.5, "{g}");
        assert!((f.goal_ratio.unwrap() - 0.96).abs() < 0.005);
        // The whole outage [4.3, 9.3): 4 s of 96 Mbit/s in 5 s.
        let w = f.whole_mbps.unwrap();
        assert!((w - 76.8).abs() < 0.5, "{w}");
        assert!((f.whole_ratio.unwrap() - 0.768).abs() < 0.005);
        // Link 0 at 90 % of its 100 Mbit/s over 0.5 s, carrying 98 from 9.5 s:
        // 0.5 s + 0.46 s after the end.
        let back = f.back_s.unwrap();
        assert!((back - (0.5 + 0.5 * 90.0 / 98.0)).abs() < 0.02, "{back}");
        assert_eq!(f.links.len(), 2);
        assert_eq!(f.links[0].outage, Some((5.0, 5.0)));
        assert!(!f.links[1].wire_series.is_empty());
    }

    #[test]
    fn a_goal_window_shorter_than_the_in_flight_minimum_is_not_measured() {
        // 32 MiB in flight: 4 x 2.68 s at link 1's 100 Mbit/s, longer than
        // the 3.5 s after the switch; at the sum, 150 Mbit/s, 7.2 s.
        let text = FAILOVER.replace("in_flight = 2", "in_flight = 32");
        let cell = &Scenario::parse(&text, "t").unwrap().cells(false)[0];
        let min = goal_min_window_s(cell, 100.0, 0.5);
        assert!((min - 4.0 * 32.0 * 8.388_608 / 100.0).abs() < 1e-9, "{min}");
        let t0 = Instant::now();
        let rx = series(
            t0,
            12.0,
            |t| if (4.3..5.3).contains(&t) { 0.0 } else { 96.0 },
        );
        let l = || series(t0, 12.0, |_| 98.0);
        let f = links_figures(cell, &outcome(rx, vec![l(), l()]), 80.0, 0.0, 12.0);
        assert_eq!(
            (f.goal_mbps, f.goal_ratio, f.goal_window_s),
            (None, None, None)
        );
        assert!(f.goal.contains("shorter than 10.74 s"), "{}", f.goal);
        assert!(f.goal.contains("fewer in flight"), "{}", f.goal);
        // The whole outage is still measured: it has no minimum.
        assert!(f.whole_ratio.is_some());
        // Without a limit, the whole transfer is in flight.
        let text = FAILOVER.replace("in_flight = 2\n", "");
        let cell = &Scenario::parse(&text, "t").unwrap().cells(false)[0];
        let bytes = cell.workload.bytes as f64;
        assert!((goal_min_window_s(cell, 100.0, 0.5) - 4.0 * bytes * 8.0 / 100e6).abs() < 1e-9);
        // The floor rules when few bytes are in flight.
        let text = FAILOVER.replace("in_flight = 2", "in_flight = 1");
        let cell = &Scenario::parse(&text, "t").unwrap().cells(false)[0];
        assert!((goal_min_window_s(cell, 1000.0, 4.8) - 4.8).abs() < 1e-9);
    }

    #[test]
    fn the_tx_pool_follows_the_cell_unless_given() {
        let geo = Scenario::parse(include_str!("../../scenarios/geo.toml"), "geo.toml").unwrap();
        let cells = geo.cells(false);
        let cell = |name: &str| cells.iter().find(|c| c.name == name).unwrap();
        let opts = Opts {
            seed: 1,
            tmp: std::env::temp_dir(),
            lu2k_cores: 1,
            lu2k_rx_bufs: 64,
            lu2k_tx_pool: None,
            lu2k_psk: None,
            lu2k_max_rate_mbps: None,
        };
        // 6 x 500 Mbit/s x 600 ms = 225 MB, to the MiB above.
        assert_eq!(tx_pool_for(cell("600ms/0%/500M"), &opts), 215 << 20);
        // 6 x 100 Mbit/s x 600 ms = 45 MB.
        assert_eq!(tx_pool_for(cell("600ms/1%/100M"), &opts), 43 << 20);
        let given = Opts {
            lu2k_tx_pool: Some(256 << 20),
            ..opts
        };
        assert_eq!(tx_pool_for(cell("600ms/0%/500M"), &given), 256 << 20);
    }

    #[test]
    fn failover_without_the_whole_outage_is_not_measured() {
        let cell = &Scenario::parse(FAILOVER, "t").unwrap().cells(false)[0];
        let t0 = Instant::now();
        let rx = series(t0, 6.0, |_| 96.0);
        let o = outcome(rx, vec![series(t0, 6.0, |_| 0.0), series(t0, 6.0, |_| 0.0)]);
        // The transfer ended at 6 s, inside the outage's window.
        let f = links_figures(cell, &o, 96.0, 0.0, 6.0);
        assert_eq!(f.goal_mbps, None);
        assert_eq!(f.goal_ratio, None);
        assert_eq!(f.whole_ratio, None);
        assert!(f.goal.contains("more bytes"), "{}", f.goal);
        assert_eq!(f.back_s, None);
    }

    #[test]
    fn balance_goal_is_goodput_over_the_sum() {
        let text = FAILOVER.replace("failover", "balance").replace(
            "outage = { start_s = 5.0, duration_s = 5.0 }",
            "rate_mbps = 50.0",
        );
        let cell = &Scenario::parse(&text, "t").unwrap().cells(false)[0];
        let t0 = Instant::now();
        let o = outcome(
            series(t0, 12.0, |_| 135.0),
            // Link 0 is the 50 Mbit/s one.
            vec![series(t0, 12.0, |_| 45.0), series(t0, 12.0, |_| 90.0)],
        );
        let f = links_figures(cell, &o, 135.0, 0.0, 12.0);
        assert_eq!(f.goal_ref_mbps, 150.0);
        assert!((f.goal_ratio.unwrap() - 0.9).abs() < 1e-6);
        assert!((f.whole_ratio.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!((f.switch_s, f.back_s), (None, None));
    }

    #[test]
    fn balance_goal_is_the_window_with_every_link_carrying() {
        let text = FAILOVER.replace("failover", "balance").replace(
            "outage = { start_s = 5.0, duration_s = 5.0 }",
            "rate_mbps = 50.0",
        );
        let cell = &Scenario::parse(&text, "t").unwrap().cells(false)[0];
        let t0 = Instant::now();
        // Link 0 (50 Mbit/s) carries 45 from 2 s to 11 s; link 1 (100) 90
        // from 1 s to 12 s. The receiver: 90 alone, 135 while both carry.
        let l0 = |t: f64| if (2.0..11.0).contains(&t) { 45.0 } else { 0.0 };
        let l1 = |t: f64| if (1.0..12.0).contains(&t) { 90.0 } else { 0.0 };
        let o = outcome(
            series(t0, 12.0, move |t| l0(t) + l1(t)),
            vec![series(t0, 12.0, l0), series(t0, 12.0, l1)],
        );
        let f = links_figures(cell, &o, 100.0, 1.0, 12.0);
        // Link 0 at 25 Mbit/s (half its rate) over 0.5 s: from 2.28 s (the
        // 0.5 s ending there, 0.28 s of it at 45) to 10.72 s (the 0.5 s
        // starting there).
        let (a, b) = f.goal_window_s.unwrap();
        assert!(
            (a - 2.28).abs() < 0.02 && (b - 10.72).abs() < 0.02,
            "{a} {b}"
        );
        assert!(
            (f.goal_ratio.unwrap() - 0.9).abs() < 0.005,
            "{:?}",
            f.goal_ratio
        );
        assert!((f.whole_ratio.unwrap() - 100.0 / 150.0).abs() < 1e-9);
        // A link that never carried: no window, not measured.
        let o = outcome(
            series(t0, 12.0, l1),
            vec![series(t0, 12.0, |_| 0.0), series(t0, 12.0, l1)],
        );
        let f = links_figures(cell, &o, 90.0, 1.0, 12.0);
        assert_eq!(f.goal_ratio, None);
        assert!(f.goal.contains("not measured"), "{}", f.goal);
    }
}
