//! The daemon: attaches to kshim, starts one core thread per ring set, serves
//! statistics, forwards peer notices, and shuts down cleanly on SIGTERM.
//!
//! Start-up: probe the kernel and pick the I/O path; connect to kshim's Unix socket
//! and receive the region memfd and the doorbells (HELLO); map and validate the region
//! and answer ACK (a refusal is answered with a non-zero status); bind one UDP socket
//! per core on the same address and port (a `SO_REUSEPORT` group steered by
//! [`crate::steer::program`]); build each core's memory (header arena + TX pool alias,
//! registered once) and I/O, and run it on its own thread.
//!
//! Shutdown (SIGTERM, SIGINT): cores stop taking new messages (new descriptors are
//! completed with `Shutdown`), give in-flight ones a few seconds to be acknowledged,
//! fail the rest back with `Shutdown`, close their connections and give every RX
//! buffer back; then the process exits 0.
//!
//! kshim closing the socket (it crashed or restarted) is no drain: nobody reads its
//! region any more, so the cores abandon it at once (every message failed back,
//! connections closed so that nothing more is acknowledged into it; see
//! [`Shard::with_kshim_gone`]), the session ends, and the engine waits for kshim to
//! listen again (backing off from 100 ms to 5 s) and attaches to its new region:
//! one [`session`] per attachment, the process carries on.
//!
//! Under systemd (`Type=notify`, `packaging/lu2k-engine.service`) the daemon tells
//! the service manager `READY=1` once kshim has its ACK and every socket is bound
//! (again after each re-attach), `STATUS=` every few seconds (peers up, Gbit/s;
//! while kshim is away, since when), `WATCHDOG=1` only while every core's loop is
//! seen making progress (while the engine waits to re-attach, from the waiting
//! thread, which is all that runs then), and `STOPPING=1` on SIGTERM (`Notifier`).
//! Without `NOTIFY_SOCKET` nothing is sent.

pub mod config;
pub mod device;
pub mod metrics;
pub mod stats;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lu2k_ring_abi::attach::{self, Attachment, Notice as KNotice};
use lu2k_ring_abi::{EngineCore, Eventfds, Net, Nid, Region};

use crate::io::epoll::EpollIo;
use crate::io::probe::{Features, IoPath};
use crate::io::sys::{self, CoreMem, SockOpts};
use crate::io::uring::{DoorbellMode, UringIo, UringOpts};
use crate::io::DatagramIo;
use crate::shard::ring::RingSide;
use crate::shard::{self, Links, Notice, Shard};
use crate::transport::rds::Rds;
use crate::transport::seal::SharedKeys;
use crate::transport::udt::{self, Udt};
use config::{BackendChoice, Config, IoPathChoice};
use stats::{CoreStats, Published, Server};

/// Send slots per core (concurrent sends in the I/O layer).
const SEND_SLOTS: usize = 64;
/// Messages in flight per core.
const MSG_SLOTS: u32 = 4096;

/// What every core is started with, decided once at start-up.
struct Plan {
    cfg: Config,
    path: IoPath,
    futex_bell: bool,
    cores: u32,
    net: Net,
    local: SocketAddr,
    rds: bool,
    overrides: HashMap<IpAddr, SocketAddr>,
    udt: lu2k_udt::conn::Config,
    /// Cores kshim spreads each peer over (the region header's); above 1 the cores
    /// steer by socket ID ([`crate::steer::program_by_socket_id`]).
    conns_per_peer: u32,
    send_worker: bool,
    /// The sealed wire's keys, replaced on SIGHUP; `None`: the plain wire.
    keys: Option<SharedKeys>,
    /// Peers with several links.
    link_table: crate::transport::links::LinkTable,
}

/// One core's share of the attachment: its rings, memory and doorbell.
struct CoreParts {
    c: u32,
    ec: EngineCore,
    mem: Arc<CoreMem>,
    bell: OwnedFd,
    sock: Option<OwnedFd>,
    links: Links,
    /// Set when kshim closed the attach socket.
    kshim_gone: Arc<AtomicBool>,
}

/// Runs the engine until SIGTERM/SIGINT; kshim going away ends a session, after
/// which the engine re-attaches.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    if cfg.backend == BackendChoice::Rds {
        // Before anything else: on a kernel without RDS this is the error to see.
        if let Err(e) = lu2k_rds::probe() {
            bail!("backend = rds: {e}");
        }
    }
    let kpath: attach::Endpoint = match (&cfg.kshim, &cfg.kshim_socket) {
        (Some(k), _) => k.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        (None, Some(p)) => attach::Endpoint::Socket(p.clone()),
        (None, None) => bail!(
            "no kshim: set kshim (socket:PATH or device:/dev/lu2k) or kshim_socket in the \
             config file, or pass --kshim or --kshim-socket"
        ),
    };
    let (term, hup) = watch_signals()?;
    let mut cfg = cfg;
    let features = Features::probe();
    let forced = cfg.io_path == IoPathChoice::Epoll;
    let (path, why) = features.choose(forced);
    if cfg.io_path == IoPathChoice::Uring && path != IoPath::Uring {
        bail!("io_path = uring but the fast path is not available: {why}");
    }
    tracing::info!("I/O path {path}: {why}");

    let mut att =
        attach::attach(&kpath).with_context(|| format!("attaching to kshim at {kpath}"))?;
    // The sealed wire's keys, read from their files by the first session and
    // kept for the later ones: only SIGHUP re-reads the files, so a kshim
    // restart neither picks up changed key files nor stops on broken ones.
    let mut keys: Option<Option<SharedKeys>> = None;
    // The config file as read at start (flags apart): a key reload names the
    // other fields edited since, which it does not apply.
    let started = cfg.source.as_deref().and_then(|p| Config::load(p).ok());
    // One session per kshim attachment. When kshim goes away (it restarted), the
    // session drains and ends; the engine then waits for kshim to listen again and
    // attaches anew: the process, its configuration and its systemd state carry on.
    loop {
        let mut notifier = session(
            (&mut cfg, &mut keys, started.as_ref()),
            &kpath,
            att,
            &features,
            path,
            (&term, &hup),
        )?;
        if term.load(Ordering::SeqCst) {
            // SIGTERM may come after the serve loop ended, while the cores were joined.
            notifier.stopping();
            break;
        }
        match reattach(&kpath, &term, &mut notifier) {
            Some(a) => att = a,
            None => break,
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// One attachment to kshim: maps its region, runs the cores until SIGTERM or
/// until kshim goes away, and waits for them to drain. Returns the notifier for
/// the wait that follows a kshim restart.
/// SIGHUP (`hup`) re-reads the key files into `cfg` and the shared key set
/// ([`reload_keys`]); a later attachment starts with the keys last taken
/// (`keys`, `None` before the first attachment read them).
fn session(
    (cfg, keys, started): (
        &mut Config,
        &mut Option<Option<SharedKeys>>,
        Option<&Config>,
    ),
    kpath: &attach::Endpoint,
    att: Attachment,
    features: &Features,
    path: IoPath,
    (term, hup): (&AtomicBool, &AtomicBool),
) -> anyhow::Result<Notifier> {
    // The cores' stop flag: set by SIGTERM (through `serve`) or by kshim leaving;
    // `kshim_gone` tells the second from the first.
    let draining = Arc::new(AtomicBool::new(term.load(Ordering::SeqCst)));
    let kshim_gone = Arc::new(AtomicBool::new(false));
    let (region, plan) = match plan(cfg.clone(), keys.as_ref(), &att, features, path) {
        Ok(x) => x,
        Err((status, e)) => {
            let _ = att.ack(status);
            return Err(e);
        }
    };
    *keys = Some(plan.keys.clone());
    let (ntx, nrx) = mpsc::channel::<Notice>();
    let mut slots: Vec<Published> = Vec::new();
    let mut threads = Vec::new();
    let parts = match core_parts(&plan, &att, &region, &ntx, &draining, &kshim_gone) {
        Ok(p) => p,
        Err(e) => {
            let _ = att.ack(2);
            return Err(e);
        }
    };
    drop(ntx);
    for p in parts {
        let c = p.c;
        slots.push(p.links.published.clone());
        match spawn_core(&plan, region.clone(), p) {
            Ok(t) => threads.push(t),
            Err(e) => {
                let _ = att.ack(2);
                return Err(e.context(format!("core {c}")));
            }
        }
    }
    let _metrics = match start_metrics(&plan, slots.clone(), &draining) {
        Ok(m) => m,
        Err(e) => {
            let _ = att.ack(2);
            return Err(e);
        }
    };
    att.ack(0).context("sending ACK to kshim")?;
    tracing::info!(
        "attached to kshim at {} ({} cores, {} per peer, {} {}, path {})",
        kpath,
        plan.cores,
        plan.conns_per_peer,
        if plan.rds { "RDS/rds_tcp" } else { "UDP" },
        plan.local,
        plan.path
    );
    for p in &plan.cfg.peers {
        if let Some(r) = p.max_rate_mbps {
            tracing::info!("peer {}: sent to at most {r} Mbit/s (max_rate_mbps)", p.nid);
        }
    }
    let _stats = start_stats(&plan.cfg.stats_socket, slots.clone(), path, &draining);
    let mut notifier = Notifier::new(slots);
    notifier.ready();
    let mut reload = || reload_keys(cfg, started, plan.keys.as_ref());
    serve(
        &att,
        &nrx,
        (&draining, &kshim_gone),
        (term, hup, &mut reload),
        &threads,
        &mut notifier,
    );
    for t in threads {
        let _ = t.join();
    }
    Ok(notifier)
}

/// After kshim went away: waits for it to listen again and attaches, backing off
/// from 100 ms to 5 s between tries, while SIGTERM still stops the engine (`None`).
/// A kshim that restarts makes a fresh region, so nothing of the last session is
/// carried over but the configuration.
fn reattach(
    kpath: &attach::Endpoint,
    term: &AtomicBool,
    notifier: &mut Notifier,
) -> Option<Attachment> {
    const FIRST: Duration = Duration::from_millis(100);
    const MOST: Duration = Duration::from_secs(5);
    let since = notifier.gone_at.unwrap_or_else(Instant::now);
    let mut delay = FIRST;
    let mut tries = 0u64;
    tracing::warn!(
        "kshim at {kpath} went away; waiting for it to listen again to re-attach \
         (start or check kshim if it does not come back)"
    );
    loop {
        let next = Instant::now() + delay;
        while Instant::now() < next {
            if term.load(Ordering::SeqCst) {
                notifier.stopping();
                return None;
            }
            notifier.waiting(Instant::now());
            std::thread::sleep(Duration::from_millis(20));
        }
        tries += 1;
        match attach::attach(kpath) {
            Ok(a) => {
                tracing::info!(
                    "kshim at {} is back after {:.1} s ({tries} tries): re-attaching",
                    kpath,
                    since.elapsed().as_secs_f64()
                );
                return Some(a);
            }
            Err(e) => {
                delay = (delay * 2).min(MOST);
                // One line per try while the waits grow, then one every 5 s.
                tracing::info!(
                    "kshim at {} not back yet ({e}); next try in {:.1} s",
                    kpath,
                    delay.as_secs_f64()
                );
            }
        }
    }
}

/// Blocks the termination signals and SIGHUP in every thread and turns them
/// into flags, on a thread of their own: `term` (SIGTERM, SIGINT; read by
/// `serve`, which drains the cores, and by the re-attach wait) and `hup`
/// (SIGHUP: `serve` re-reads the keys).
fn watch_signals() -> anyhow::Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    sys::block_term_signals().context("blocking termination signals")?;
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    let (d, h) = (term.clone(), hup.clone());
    std::thread::Builder::new()
        .name("lu2k-signals".into())
        .spawn(move || {
            while let Ok(sig) = sys::wait_signal() {
                if sig == libc::SIGHUP {
                    tracing::info!("signal {sig} (SIGHUP): re-reading the keys");
                    h.store(true, Ordering::SeqCst);
                    continue;
                }
                tracing::info!("signal {sig}: draining");
                d.store(true, Ordering::SeqCst);
                break;
            }
        })?;
    Ok((term, hup))
}

/// SIGHUP: re-reads the key fields (`security`, `psk_file`, `psk_next_file`,
/// `[[peer_key]]`) of the config file the engine started with, checks them as
/// at start-up, and hands the new set to the cores. Connections keep the keys
/// they agreed (rekeys derive from those); new handshakes use the new set. A
/// file that does not read or check (the whole file is validated, as at
/// start-up) is refused with the error (it names the field) and the keys in
/// use stay; other fields edited since start-up (`started`) are named in a
/// warning and not applied, nor is the security mode (those take a restart).
fn reload_keys(cfg: &mut Config, started: Option<&Config>, shared: Option<&SharedKeys>) {
    let Some(shared) = shared else {
        tracing::warn!(
            "SIGHUP: the plain wire (security = \"off\") has no keys to reload; \
             sealing the wire takes a restart"
        );
        return;
    };
    let Some(path) = cfg.source.clone() else {
        tracing::error!(
            "SIGHUP: no config file to re-read the keys from (start the engine with \
             --config FILE); the keys in use stay"
        );
        return;
    };
    let file = match Config::load(&path).and_then(|f| f.validate().map(|()| f)) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("SIGHUP: key reload refused: {e}; the keys in use stay");
            return;
        }
    };
    // Against the file as the engine started with it: what else was edited.
    let ignored = started.map_or_else(Vec::new, |b| b.changed_non_key_fields(&file));
    if !ignored.is_empty() {
        tracing::warn!(
            "SIGHUP: {} changed {} too; a reload applies only the key fields (security, \
             psk_file, psk_next_file, [[peer_key]]): restart the engine to apply the rest",
            path.display(),
            ignored.join(", ")
        );
    }
    let mut next = cfg.clone();
    next.security = file.security;
    next.psk_file = file.psk_file;
    next.psk_next_file = file.psk_next_file;
    next.peer_keys = file.peer_keys;
    match next.keyring() {
        Ok(Some(mut keys)) => {
            let (old, _) = shared.get();
            keys.local = old.local;
            let (net, peers) = (keys.net.len(), keys.peers.len());
            shared.replace(keys);
            *cfg = next;
            tracing::info!(
                network_keys = net,
                peer_keys = peers,
                "SIGHUP: keys reloaded from {}; new handshakes use them, connections \
                 keep theirs",
                path.display()
            );
        }
        Ok(None) => tracing::error!(
            "SIGHUP: key reload refused: {} has no key now (no psk_file or [[peer_key]]), \
             and the wire is sealed; the keys in use stay (turning sealing off takes a \
             restart)",
            path.display()
        ),
        Err(e) => tracing::error!("SIGHUP: key reload refused: {e}; the keys in use stay"),
    }
}

/// Maps kshim's region and decides how every core runs, with the keys `kept`
/// from an earlier attachment (read from their files when `None`). An error
/// carries the status to refuse the attachment with.
fn plan(
    cfg: Config,
    kept: Option<&Option<SharedKeys>>,
    att: &Attachment,
    features: &Features,
    path: IoPath,
) -> Result<(Region, Plan), (u32, anyhow::Error)> {
    let refuse = |status, e: anyhow::Error| Err((status, e));
    let region = match att.region() {
        Ok(r) => r,
        Err(e) => return refuse(1, anyhow::anyhow!("kshim's region is not usable: {e}")),
    };
    let cores = att.hello.cores;
    let futex_bell = match doorbell(&cfg, features, &region, path) {
        Ok(f) => f,
        Err(e) => return refuse(1, anyhow::anyhow!("{e}")),
    };
    if let Some(want) = cfg.cores.filter(|&n| u32::from(n) != cores) {
        return refuse(
            1,
            anyhow::anyhow!(
                "--cores {want} does not match kshim's region, which has {cores} ring sets \
                 (one per core): start kshim with {want} cores, or run the engine with \
                 --cores {cores} (or without --cores, to follow kshim)"
            ),
        );
    }
    let local_nid = served_nid(&att.hello.nids);
    let rds = cfg.backend == BackendChoice::Rds;
    if rds && cores != 1 {
        return refuse(
            2,
            anyhow::anyhow!(
                "backend = rds runs one core, and kshim's region has {cores} ring sets: \
                 start kshim with one core for the RDS back-end, or use --backend udt"
            ),
        );
    }
    // A peer with several links: the wildcard address, each link's source
    // picked by the kernel's route (see `transport::links`).
    let multi_link = cfg.peers.iter().any(|p| !p.links.is_empty());
    let bind_ip = if multi_link {
        // IPv6 links: the IPv6 wildcard, dual-stack (IPv4 links reach it too).
        let v6 = cfg
            .peers
            .iter()
            .flat_map(|p| {
                p.links
                    .iter()
                    .map(|l| sys::canonical(l.remote).ip())
                    .chain(config::nid_ip(&p.nid))
            })
            .any(|ip| ip.is_ipv6());
        if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    } else if cfg.bind == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        local_nid
            .and_then(|n| n.ip_addr())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    } else {
        cfg.bind
    };
    let bind_ip = sys::canonical(SocketAddr::new(bind_ip, 0)).ip();
    if !rds {
        if let Err(e) = check_reach(&cfg, bind_ip, local_nid) {
            return refuse(1, e);
        }
    } else if bind_ip.is_ipv6() {
        return refuse(
            1,
            anyhow::anyhow!(
                "backend = rds binds {bind_ip}, an IPv6 address, and Linux RDS over TCP is \
                 IPv4 only: serve an IPv4 NID with the RDS back-end, or use --backend udt"
            ),
        );
    }
    let rx_per_core = region.layout().header().rx_buf_count / cores.max(1);
    warn_if_rx_pool_small(rx_per_core, cfg.mss);
    // This node's end of every handshake: the address peers dial.
    let local = (!bind_ip.is_unspecified()).then_some(bind_ip);
    let keys = match kept {
        Some(shared) => shared.clone().inspect(|shared| {
            let (mut k, _) = shared.get();
            k.local = local;
            shared.replace(k);
        }),
        None => match cfg.keyring() {
            Ok(k) => k.map(|mut k| {
                k.local = local;
                SharedKeys::new(k)
            }),
            Err(e) => return refuse(1, e.into()),
        },
    };
    tracing::info!(
        security = if keys.is_some() { "required" } else { "off" },
        "wire security"
    );
    let link_table =
        match crate::transport::links::plan(&cfg.peers, cores, region.layout().conns_per_peer()) {
            Ok(t) => t,
            Err(e) => return refuse(1, anyhow::anyhow!("{e}")),
        };
    let plan = Plan {
        link_table,
        path,
        futex_bell,
        cores,
        net: local_nid.map_or(Net(0), Nid::net),
        local: SocketAddr::new(bind_ip, cfg.port),
        rds,
        overrides: overrides(&cfg),
        udt: lu2k_udt::conn::Config {
            // `mss` is the IP packet size; an IPv6 header is 20 bytes longer than
            // the IPv4 one UDT's payload arithmetic assumes.
            mss: u32::from(cfg.mss) - if bind_ip.is_ipv6() { IPV6_EXTRA } else { 0 },
            idle_timeout_us: cfg.peer_down_timeout_s * 1_000_000,
            connect_timeout_us: cfg.peer_down_timeout_s * 1_000_000,
            rcv_buf_pkts: Some(cfg.flow_window.min(rx_per_core.saturating_mul(4)).max(32)),
            ..Default::default()
        },
        conns_per_peer: region.layout().conns_per_peer(),
        send_worker: cfg.send_worker.enabled(
            cores as usize,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
        keys,
        cfg,
    };
    Ok((region, plan))
}

/// Whether the cores sleep on the futex doorbell (see [`DoorbellMode`]).
fn doorbell(
    cfg: &Config,
    features: &Features,
    region: &Region,
    path: IoPath,
) -> Result<bool, String> {
    let kshim_futex = region
        .layout()
        .features()
        .contains(lu2k_ring_abi::Features::FUTEX_WAKE);
    match path {
        IoPath::Uring => cfg.doorbell.futex(features.futex, kshim_futex),
        IoPath::Epoll if cfg.doorbell == DoorbellMode::Futex => {
            Err("doorbell = futex needs the io_uring path; use doorbell = auto or eventfd".into())
        }
        IoPath::Epoll => Ok(false),
    }
}

/// The NID this engine serves: the first kshim announces.
fn served_nid(nids: &[Nid]) -> Option<Nid> {
    if let [first, rest @ ..] = nids {
        if !rest.is_empty() {
            // One engine binds one address and speaks for one LNet network.
            tracing::warn!(
                "kshim announces {} NIDs; this engine serves {first} only \
                 (start one kshim + engine pair per NID for the others: {})",
                nids.len(),
                rest.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    nids.first().copied()
}

/// `[[peer]]` entries: peers at other addresses than `NID-address:port`.
fn overrides(cfg: &Config) -> HashMap<IpAddr, SocketAddr> {
    cfg.peers
        .iter()
        // A peer with links is reached at each link's address instead.
        .filter(|p| p.links.is_empty())
        .filter_map(|p| config::nid_ip(&p.nid).map(|ip| (ip, sys::canonical(p.addr))))
        .collect()
}

/// Bytes an IPv6 header has beyond an IPv4 one (40 against 20).
const IPV6_EXTRA: u32 = 20;

/// Whether a socket bound to `bind` (with `cfg.bind_v6only`) reaches the served
/// NID's family and every `[[peer]]` address: an IPv4 socket cannot send to an
/// IPv6 peer, nor an IPv6-only one to an IPv4 peer. The error says what to bind.
fn check_reach(cfg: &Config, bind: IpAddr, local_nid: Option<Nid>) -> anyhow::Result<()> {
    let dual = bind == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && !cfg.bind_v6only;
    let reaches = |ip: IpAddr| dual || ip.is_ipv6() == bind.is_ipv6();
    let peers = cfg.peers.iter().filter(|p| p.links.is_empty()).map(|p| {
        let addr = sys::canonical(p.addr);
        let given = !addr.ip().is_unspecified();
        (
            p.nid.clone(),
            given
                .then_some(addr.ip())
                .or_else(|| config::nid_ip(&p.nid)),
        )
    });
    let nid = local_nid.map(|n| (n.to_string(), n.ip_addr()));
    for (name, ip) in nid.into_iter().chain(peers) {
        if let Some(ip) = ip.filter(|ip| !reaches(*ip)) {
            bail!(
                "bind {bind}{} cannot reach {name} at {ip} (IPv4 and IPv6 differ): bind \
                 \"::\" (dual-stack, without bind_v6only) to serve IPv4 and IPv6 peers at \
                 once, or an address of {ip}'s family",
                if cfg.bind_v6only {
                    " (bind_v6only)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// One socket per core, one port: a reuseport group steered by the shard function.
fn udp_sockets(plan: &Plan) -> anyhow::Result<Vec<OwnedFd>> {
    let opts = SockOpts {
        reuseport: plan.cores > 1,
        sndbuf: plan.cfg.sndbuf,
        rcvbuf: plan.cfg.rcvbuf,
        gro: Features::probe().udp_gro,
    };
    let mut socks = Vec::new();
    for _ in 0..plan.cores {
        let (fd, _) = bind_udp(plan, &opts)?;
        socks.push(fd);
    }
    if plan.cores > 1 {
        let prog = if plan.conns_per_peer > 1 {
            crate::steer::program_by_socket_id(plan.cores)
        } else {
            crate::steer::program(plan.cores)
        };
        sys::attach_reuseport_cbpf(&socks[0], &prog)
            .context("attaching the SO_REUSEPORT steering program")?;
    }
    Ok(socks)
}

/// How long a start waits for its port while another process still holds it.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Binds one socket of the group, waiting up to [`PORT_WAIT`] while the port is
/// in use: an engine restarted right after its predecessor was killed finds the
/// port still held, because the dead process's io_uring is torn down by a kernel
/// worker after the process is gone (the sockets it holds close only then).
/// A port held by a live process is still refused, naming the port, once the
/// wait is over.
fn bind_udp(plan: &Plan, opts: &SockOpts) -> anyhow::Result<(OwnedFd, sys::SockInfo)> {
    let start = Instant::now();
    let mut told = false;
    loop {
        match sys::udp_socket_in(plan.local, plan.cfg.bind_v6only, opts) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < PORT_WAIT => {
                if !told {
                    tracing::info!(
                        "UDP {} is in use; waiting up to {} s for it (a stopped engine's \
                         sockets close a moment after it exits)",
                        plan.local,
                        PORT_WAIT.as_secs()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            r => {
                return r.with_context(|| {
                    format!(
                        "binding UDP {} (if another engine or program holds the port, stop \
                         it or set another `port`)",
                        plan.local
                    )
                })
            }
        }
    }
}

/// Every core's rings, memory, doorbell and socket.
fn core_parts(
    plan: &Plan,
    att: &Attachment,
    region: &Region,
    notices: &mpsc::Sender<Notice>,
    draining: &Arc<AtomicBool>,
    kshim_gone: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<CoreParts>> {
    let mut socks: Vec<Option<OwnedFd>> = if plan.rds {
        vec![None]
    } else {
        udp_sockets(plan)?.into_iter().map(Some).collect()
    };
    let mut parts = Vec::new();
    for (c, sock) in socks.drain(..).enumerate() {
        let c = c as u32;
        let bell = att
            .to_engine
            .get(c as usize)
            .context("HELLO lacks a to-engine eventfd")?;
        let fds = Eventfds {
            to_engine: Some(bell.try_clone()?),
            to_kshim: Some(
                att.to_kshim
                    .get(c as usize)
                    .context("HELLO lacks a to-kshim eventfd")?
                    .try_clone()?,
            ),
        };
        let ec = region.engine_core(c, fds).context("attaching core rings")?;
        let mem = CoreMem::new(region, c, plan.cores, SEND_SLOTS, MSG_SLOTS)
            .context("mapping core memory")?;
        parts.push(CoreParts {
            c,
            ec,
            mem: Arc::new(mem),
            bell: bell.try_clone()?,
            sock,
            links: Links {
                published: Arc::new(Mutex::new(CoreStats::default())),
                notices: notices.clone(),
                draining: draining.clone(),
            },
            kshim_gone: kshim_gone.clone(),
        });
    }
    Ok(parts)
}

/// Starts core `p.c` on its own thread and waits until its I/O is set up.
fn spawn_core(plan: &Plan, region: Region, p: CoreParts) -> anyhow::Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let params = shard::Params {
        core: p.c,
        net: plan.net,
        spin: Duration::from_micros(u64::from(plan.cfg.spin_us)),
        spin_max: Duration::from_micros(u64::from(plan.cfg.spin_max_us)),
        msg_slots: MSG_SLOTS,
        drain_timeout: Duration::from_secs(plan.cfg.drain_timeout_s),
        gather: (plan.cfg.gather_us > 0).then(|| crate::io::Gather {
            events: config::GATHER_EVENTS,
            within: Duration::from_micros(u64::from(plan.cfg.gather_us)),
        }),
    };
    let (seed, cookie_key) = secrets(p.c)?;
    let sealing = match &plan.keys {
        Some(k) => Some((
            k.clone(),
            p.mem
                .take_seal_scratch()
                .context("the core's seal scratch is taken")?,
        )),
        None => None,
    };
    // FEC peers; on the plain wire their repairs take the seal scratch.
    let fec_peers: std::collections::HashSet<IpAddr> = plan
        .cfg
        .peers
        .iter()
        .filter(|p| !p.fec.is_off())
        .filter_map(|p| config::nid_ip(&p.nid))
        .collect();
    // Rate caps, each core's part of the peer's: a striped peer's messages
    // spread over `conns_per_peer` cores, each with its own connection.
    let rate_caps: std::collections::HashMap<IpAddr, u64> = plan
        .cfg
        .peers
        .iter()
        .filter_map(|p| {
            let ip = config::nid_ip(&p.nid)?;
            let bps = p.max_rate_mbps? * 1e6 / f64::from(plan.conns_per_peer.max(1));
            Some((ip, bps as u64))
        })
        .collect();
    let fec_cfg = lu2k_udt::fec::Config::default();
    fec_cfg
        .validate()
        .context("the FEC settings (fec = \"live\")")?;
    let fec_scratch = if sealing.is_none() && !fec_peers.is_empty() {
        Some(
            p.mem
                .take_seal_scratch()
                .context("the core's seal scratch (FEC repairs) is taken")?,
        )
    } else {
        None
    };
    let udt_params = udt::Params {
        core: p.c,
        net: plan.net,
        port: plan.cfg.port,
        overrides: plan.overrides.clone(),
        udt: lu2k_udt::conn::Config {
            // Striped peers: this core's socket IDs name it (see crate::steer).
            socket_id_class: if plan.conns_per_peer > 1 {
                (plan.cores, p.c)
            } else {
                (1, 0)
            },
            ..plan.udt.clone()
        },
        peer_down_timeout_us: plan.cfg.peer_down_timeout_s * 1_000_000,
        seed,
    };
    let pin = plan.cfg.pin_cpus;
    let link_table = plan.link_table.clone();
    let (rds, local, port) = (plan.rds, plan.local, plan.cfg.port);
    let opts = UringOpts {
        send_slots: SEND_SLOTS,
        zc: plan.cfg.zero_copy,
        send_worker: plan.send_worker,
        // Receives cut to the configured packet size: a peer's datagrams are at
        // most `mss` bytes of IP packet (IPv4's headers, the smaller, assumed).
        rx_slice: crate::io::uring::rx_slice_for(crate::io::uring::max_datagram(u32::from(
            plan.cfg.mss,
        ))),
        ..UringOpts::default()
    };
    let (path, futex_bell) = (plan.path, plan.futex_bell);
    let c = p.c;
    let gone = p.kshim_gone.clone();
    // The ring is built on the thread that uses it: SINGLE_ISSUER and
    // DEFER_TASKRUN tie it to its creator.
    let t = std::thread::Builder::new()
        .name(format!("lu2k-core{c}"))
        .spawn(move || {
            if pin {
                let _ = sys::pin_to_cpu(c as usize);
            }
            let ring = RingSide::new(
                c,
                params.net,
                region.clone(),
                p.ec,
                p.mem.clone(),
                MSG_SLOTS,
            );
            if rds {
                let t = match local {
                    SocketAddr::V4(local) => lu2k_rds::Socket::open(
                        local,
                        &lu2k_rds::Config {
                            nonblocking: true,
                            ..Default::default()
                        },
                    )
                    .map_err(|e| e.to_string()),
                    // Refused at start-up already (RDS over TCP is IPv4 only).
                    SocketAddr::V6(a) => Err(format!("RDS cannot bind {a}: IPv4 only")),
                }
                .and_then(|s| {
                    Rds::new(c, port, p.mem.clone(), s, Some(p.bell)).map_err(|e| e.to_string())
                });
                if let Some(t) = ready(&ready_tx, t) {
                    Shard::new(params, ring, t, p.links)
                        .with_kshim_gone(gone)
                        .run();
                }
                return;
            }
            let sock = p.sock.expect("a UDP core has its socket");
            let futex = futex_bell.then(|| ring.rings().wait.futex_word());
            let io = datagram_io(path, sock, p.mem.clone(), p.bell, opts, futex, c);
            if let Some(io) = ready(&ready_tx, io) {
                let mut t = Udt::new(udt_params, io, region, p.mem.rx_first)
                    .with_cookie_key(cookie_key)
                    .with_links(link_table)
                    .with_rate_caps(rate_caps);
                if let Some((keys, scratch)) = sealing {
                    t = t
                        .with_security(keys.get().0, Default::default(), scratch)
                        .with_shared_keys(keys);
                }
                // Settings checked before the thread started.
                t = t.with_fec(fec_peers, fec_cfg, fec_scratch);
                Shard::new(params, ring, t, p.links)
                    .with_kshim_gone(gone)
                    .run();
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(t),
        Ok(Err(e)) => bail!("I/O set-up failed: {e}"),
        Err(_) => bail!("thread died during set-up"),
    }
}

/// Tells the daemon how a core's set-up went; the value on success.
fn ready<T>(tx: &mpsc::SyncSender<Result<(), String>>, r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => {
            let _ = tx.send(Ok(()));
            Some(v)
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            None
        }
    }
}

/// The datagram I/O of one UDT core on the chosen path.
fn datagram_io(
    path: IoPath,
    sock: OwnedFd,
    mem: Arc<CoreMem>,
    bell: OwnedFd,
    opts: UringOpts,
    futex: Option<lu2k_ring_abi::FutexWord>,
    c: u32,
) -> Result<Box<dyn DatagramIo>, String> {
    let io: std::io::Result<Box<dyn DatagramIo>> = match path {
        IoPath::Uring => UringIo::new_owned(sock, mem, Some(bell), opts)
            .and_then(|mut x| {
                if let Some(word) = futex {
                    x.use_futex_doorbell(word)?;
                }
                Ok(x)
            })
            .map(|x| {
                tracing::info!("core {c}: io_uring {}", x.setup());
                Box::new(x) as Box<dyn DatagramIo>
            }),
        IoPath::Epoll => EpollIo::new_owned(sock, mem, Some(bell), SEND_SLOTS)
            .map(|x| Box::new(x) as Box<dyn DatagramIo>),
    };
    io.map_err(|e| e.to_string())
}

/// A core's secrets, from the OS random source: the seed of its socket IDs and
/// sequence numbers, and the key of its listener's SYN cookies.
fn secrets(core: u32) -> anyhow::Result<(u64, [u8; 16])> {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).map_err(|e| {
        anyhow::anyhow!(
            "core {core}: cannot read the OS random source for socket IDs, sequence numbers \
             and SYN-cookie keys ({e}); refusing to start with predictable secrets. Check \
             that getrandom(2) or /dev/urandom is available to the engine (seccomp profile, \
             container, chroot)."
        )
    })?;
    let (seed, key) = b.split_at(8);
    let seed = u64::from_le_bytes(seed.try_into().expect("8 bytes"));
    Ok((seed, key.try_into().expect("16 bytes")))
}

fn start_stats(
    socket: &Path,
    slots: Vec<Published>,
    path: IoPath,
    draining: &Arc<AtomicBool>,
) -> Option<Server> {
    match Server::start(socket, slots, path.to_string(), draining.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("stats socket {} unavailable: {e}", socket.display());
            None
        }
    }
}

/// The Prometheus endpoint, where `metrics_listen` asks for one. Failing to bind
/// it stops the start: an operator who configured metrics expects them.
fn start_metrics(
    plan: &Plan,
    slots: Vec<Published>,
    draining: &Arc<AtomicBool>,
) -> anyhow::Result<Option<metrics::MetricsServer>> {
    let Some(addr) = plan.cfg.metrics_listen else {
        return Ok(None);
    };
    let info = metrics::EngineInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        backend: if plan.rds { "rds" } else { "udt" }.into(),
        // The names the cores' stats use (`DatagramIo::path_name`).
        io_path: match plan.path {
            IoPath::Uring => "io_uring",
            IoPath::Epoll => "epoll",
        }
        .into(),
    };
    let m =
        metrics::MetricsServer::start(addr, slots, info, draining.clone()).with_context(|| {
            format!("serving metrics on {addr} (metrics_listen): is the port in use?")
        })?;
    tracing::info!("metrics at http://{}/metrics", m.local_addr());
    Ok(Some(m))
}

/// Forwards peer notices to kshim and notices kshim going away, until every core
/// stopped. SIGTERM (`term`) drains the cores and tells systemd `STOPPING=1`;
/// kshim leaving makes them abandon the region at once (`kshim_gone`, then
/// `draining`) and is no stop: the engine re-attaches after.
fn serve(
    att: &Attachment,
    notices: &mpsc::Receiver<Notice>,
    (draining, kshim_gone): (&AtomicBool, &AtomicBool),
    (term, hup, reload): (&AtomicBool, &AtomicBool, &mut dyn FnMut()),
    threads: &[JoinHandle<()>],
    notifier: &mut Notifier,
) {
    loop {
        match notices.recv_timeout(Duration::from_millis(50)) {
            Ok(n) => {
                let k = match n {
                    Notice::PeerDown(nid) => KNotice::PeerDown(nid),
                    Notice::PeerUp(nid) => KNotice::PeerUp(nid),
                };
                let _ = att.notice(k);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if term.load(Ordering::Relaxed) && !draining.load(Ordering::Relaxed) {
            draining.store(true, Ordering::SeqCst);
        }
        if !draining.load(Ordering::Relaxed) && hup.swap(false, Ordering::SeqCst) {
            reload();
        }
        if !kshim_gone.load(Ordering::Relaxed) && kshim_closed(&att.sock) {
            tracing::warn!(
                "kshim closed the attach socket: abandoning its region (messages failed \
                 back, connections closed), then re-attaching"
            );
            notifier.gone_at = Some(Instant::now());
            // Before `draining`: a core that sees both must abandon, not drain.
            kshim_gone.store(true, Ordering::SeqCst);
            draining.store(true, Ordering::SeqCst);
        }
        if term.load(Ordering::Relaxed) {
            notifier.stopping();
            notifier.tick(Instant::now());
        } else if draining.load(Ordering::Relaxed) {
            notifier.waiting_for_cores(Instant::now());
        } else {
            notifier.tick(Instant::now());
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
    }
}

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// The engine's side of the systemd notification protocol (`sd_notify(3)`).
///
/// The watchdog is fed from the cores' own progress: each core publishes its
/// loop's pass counter with its stats (every 100 ms while busy, at least every
/// idle wake-up of 200 ms while idle), and `WATCHDOG=1` goes out only when every
/// core's counter moved since the last check. A core stuck in a syscall or a
/// loop stops the pings, and systemd restarts the engine (`WatchdogSec=`).
/// Sending errors are ignored: the engine never stops because systemd is gone.
struct Notifier {
    slots: Vec<Published>,
    /// Half of `WATCHDOG_USEC`, when systemd asked for pings.
    watchdog: Option<Duration>,
    next_ping: Instant,
    /// Each core's pass counter at the last watchdog check.
    passes: Vec<u64>,
    next_status: Instant,
    /// Bytes sent and received by all cores at the last status, and when.
    last_bytes: (u64, u64, Instant),
    stopping: bool,
    /// When kshim was seen gone (the start of the wait to re-attach).
    gone_at: Option<Instant>,
}

impl Notifier {
    fn new(slots: Vec<Published>) -> Notifier {
        let now = Instant::now();
        let watchdog = sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| d / 2);
        let passes = vec![u64::MAX; slots.len()];
        Notifier {
            slots,
            watchdog,
            next_ping: now,
            passes,
            next_status: now + STATUS_EVERY,
            last_bytes: (0, 0, now),
            stopping: false,
            gone_at: None,
        }
    }

    /// `READY=1` and a first status: attached, sockets bound, cores running.
    fn ready(&mut self) {
        let status = self.status(Instant::now());
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }

    /// Once per pass of the serve loop: the periodic status and watchdog ping.
    fn tick(&mut self, now: Instant) {
        if now >= self.next_status && !self.stopping {
            self.next_status = now + STATUS_EVERY;
            let status = self.status(now);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        }
        self.ping_if_cores_progressed(now);
    }

    /// `WATCHDOG=1` when due and every core's loop moved since the last ping.
    fn ping_if_cores_progressed(&mut self, now: Instant) {
        if let Some(period) = self.watchdog {
            if now >= self.next_ping {
                self.next_ping = now + period;
                if self.cores_progressed() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }

    /// While kshim is away: a status saying since when.
    fn status_gone(&mut self, now: Instant) {
        if now >= self.next_status {
            self.next_status = now + STATUS_EVERY;
            let since = self.gone_at.unwrap_or(now);
            let status = format!(
                "kshim went away {:.0} s ago: waiting to re-attach",
                now.saturating_duration_since(since).as_secs_f64()
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        }
    }

    /// While kshim is away and the cores still end their session: the status,
    /// and pings only while every core makes progress (a core stuck there stops
    /// them, as in [`Notifier::tick`]).
    fn waiting_for_cores(&mut self, now: Instant) {
        self.status_gone(now);
        self.ping_if_cores_progressed(now);
    }

    /// While the engine waits to re-attach (no core runs): the status, and
    /// watchdog pings from this thread, which is all that runs then (a re-attach
    /// that hangs stops them).
    fn waiting(&mut self, now: Instant) {
        self.status_gone(now);
        if let Some(period) = self.watchdog {
            if now >= self.next_ping {
                self.next_ping = now + period;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }

    /// `STOPPING=1`, once.
    fn stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("draining: finishing in-flight messages"),
            ]);
        }
    }

    /// Whether every core's pass counter moved since the last call. The first
    /// call after start counts as progress for a core that published anything.
    fn cores_progressed(&mut self) -> bool {
        let mut all = true;
        for (slot, seen) in self.slots.iter().zip(self.passes.iter_mut()) {
            let now = slot.lock().map_or(*seen, |g| g.passes);
            all &= now != *seen;
            *seen = now;
        }
        all
    }

    /// One line for `systemctl status`: peers up and throughput since the last line.
    fn status(&mut self, now: Instant) -> String {
        let mut up = std::collections::BTreeSet::new();
        let mut known = std::collections::BTreeSet::new();
        let (mut tx, mut rx) = (0u64, 0u64);
        for slot in &self.slots {
            if let Ok(g) = slot.lock() {
                for p in &g.peers {
                    known.insert(p.nid.clone());
                    if p.up {
                        up.insert(p.nid.clone());
                    }
                    tx += p.bytes_tx;
                    rx += p.bytes_rx;
                }
            }
        }
        let (tx0, rx0, t0) = self.last_bytes;
        self.last_bytes = (tx, rx, now);
        let secs = now.saturating_duration_since(t0).as_secs_f64().max(1e-3);
        let gbps = |b: u64, b0: u64| b.saturating_sub(b0) as f64 * 8.0 / secs / 1e9;
        format!(
            "{} of {} peers up, {} cores, TX {:.2} Gbit/s, RX {:.2} Gbit/s",
            up.len(),
            known.len(),
            self.slots.len(),
            gbps(tx, tx0),
            gbps(rx, rx0)
        )
    }
}

/// Whether kshim closed the attach socket (it sends nothing after HELLO).
fn kshim_closed(sock: &impl AsFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(sock, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(0) => false,
        Ok(_) => {
            let r = fds[0].revents();
            if r.intersects(PollFlags::HUP | PollFlags::ERR) {
                return true;
            }
            // Readable: kshim sends nothing after HELLO, so this is EOF.
            let mut b = [0u8; 16];
            matches!(
                rustix::net::recv(sock, &mut b, rustix::net::RecvFlags::DONTWAIT),
                Ok((0, _))
            )
        }
        Err(_) => false,
    }
}

/// Warns when a core's share of the RX pool cannot hold one largest message.
///
/// Without GRO coalescing every datagram occupies its own RX buffer until its
/// message is complete, and data before a loss hole is acknowledged so it
/// cannot be shed: a core whose buffers are fewer than one 1 MiB message's
/// datagrams (plus the 1/8 reserve the core keeps for retransmissions) can
/// stall on a lossy path. Smaller pools still work for smaller messages,
/// so this warns rather than refuses.
fn warn_if_rx_pool_small(rx_per_core: u32, mss: u16) {
    let payload = u32::from(mss).saturating_sub(44).max(1);
    let per_message = (lu2k_ring_abi::MAX_PAYLOAD as u32).div_ceil(payload);
    let need = per_message + per_message / 7 + 1;
    if rx_per_core < need {
        tracing::warn!(
            "{rx_per_core} RX buffers per core cannot hold a 1 MiB \
             message ({per_message} datagrams at MSS {mss}) plus the reserve; a lossy path \
             may stall. Give kshim at least {need} RX buffers per core."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds (socket IDs, sequence numbers) and cookie keys come from the OS
    /// random source: every core and every start draws different ones.
    #[test]
    fn secrets_differ_per_draw() {
        let draws: Vec<(u64, [u8; 16])> = (0..8).map(|c| secrets(c).unwrap()).collect();
        for (i, a) in draws.iter().enumerate() {
            assert_ne!(a.1, [0; 16]);
            for b in &draws[i + 1..] {
                assert_ne!(a.0, b.0, "two seeds alike");
                assert_ne!(a.1, b.1, "two cookie keys alike");
            }
        }
    }

    /// A core whose pass counter stands still withholds the watchdog ping.
    #[test]
    fn stuck_core_stops_the_pings() {
        let slots: Vec<Published> = (0..2)
            .map(|_| Arc::new(Mutex::new(CoreStats::default())))
            .collect();
        let mut n = Notifier::new(slots.clone());
        assert!(
            n.cores_progressed(),
            "the first check counts what was published"
        );
        slots[0].lock().unwrap().passes += 1;
        assert!(!n.cores_progressed(), "core 1 made no pass");
        slots[0].lock().unwrap().passes += 1;
        slots[1].lock().unwrap().passes += 1;
        assert!(n.cores_progressed(), "both cores moved");
    }

    #[test]
    fn status_reads_peers_and_rate() {
        let slot: Published = Arc::new(Mutex::new(CoreStats::default()));
        slot.lock().unwrap().peers.push(stats::PeerStats {
            nid: "10.0.0.2@lu2k".into(),
            up: true,
            ..Default::default()
        });
        let mut n = Notifier::new(vec![slot]);
        let s = n.status(Instant::now());
        assert!(s.starts_with("1 of 1 peers up, 1 cores, TX "), "{s}");
    }
}
