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
//! Shutdown (SIGTERM, SIGINT, or kshim closing the socket): cores stop taking new
//! messages (new descriptors are completed with `Shutdown`), give in-flight ones a
//! few seconds to be acknowledged, fail the rest back with `Shutdown`, close their
//! connections and give every RX buffer back; then the process exits 0.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use lu2k_kshim::attach::{self, Notice as KNotice};
use lu2k_kshim::Nid;
use lu2k_ring_abi::{Eventfds, Region};

use crate::backend::CoreBackend;
use crate::config::{BackendChoice, Config, IoPathChoice};
use crate::core::{CoreLoop, CoreParams, Notice};
use crate::epoll::EpollIo;
use crate::io::DatagramIo;
use crate::probe::{Features, IoPath};
use crate::stats::{CoreStats, Published, Server};
use crate::sys::{self, CoreMem, SockOpts};
use crate::uring::{UringIo, UringOpts};

/// Send slots per core (concurrent sends in the I/O layer).
const SEND_SLOTS: usize = 64;
/// Messages in flight per core.
const MSG_SLOTS: u32 = 4096;

/// Runs the engine until SIGTERM/SIGINT or until kshim goes away.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    if cfg.backend == BackendChoice::Rds {
        // Before anything else: on a kernel without RDS this is the error to see.
        if let Err(e) = lu2k_rds::probe() {
            bail!("backend = rds: {e}");
        }
    }
    let Some(kpath) = cfg.kshim_socket.clone() else {
        bail!("no kshim socket: set kshim_socket in the config file or pass --kshim-socket PATH");
    };
    sys::block_term_signals().context("blocking termination signals")?;
    let draining = Arc::new(AtomicBool::new(false));
    {
        let d = draining.clone();
        std::thread::Builder::new()
            .name("lu2k-signals".into())
            .spawn(move || {
                if let Ok(sig) = sys::wait_signal() {
                    eprintln!("lu2k-engine: signal {sig}: draining");
                    d.store(true, Ordering::SeqCst);
                }
            })?;
    }

    let features = Features::probe();
    let forced = cfg.io_path == IoPathChoice::Epoll;
    let (path, why) = features.choose(forced);
    if cfg.io_path == IoPathChoice::Uring && path != IoPath::Uring {
        bail!("io_path = uring but the fast path is not available: {why}");
    }
    eprintln!("lu2k-engine: I/O path {path}: {why}");

    let att = attach::connect(&kpath)
        .with_context(|| format!("attaching to kshim at {}", kpath.display()))?;
    let region = match Region::from_fd(att.memfd.try_clone()?) {
        Ok(r) => r,
        Err(e) => {
            let _ = att.ack(1);
            bail!("kshim's region is not usable: {e}");
        }
    };
    let cores = att.hello.cores;
    let kshim_futex = region
        .layout()
        .features()
        .contains(lu2k_ring_abi::Features::FUTEX_WAKE);
    let futex_bell = match path {
        IoPath::Uring => cfg.doorbell.futex(features.futex, kshim_futex),
        IoPath::Epoll if cfg.doorbell == crate::uring::DoorbellMode::Futex => {
            Err("doorbell = futex needs the io_uring path; use doorbell = auto or eventfd".into())
        }
        IoPath::Epoll => Ok(false),
    };
    let futex_bell = match futex_bell {
        Ok(f) => f,
        Err(e) => {
            let _ = att.ack(1);
            bail!("{e}");
        }
    };
    if let Some(want) = cfg.cores.filter(|&n| u32::from(n) != cores) {
        let _ = att.ack(1);
        bail!(
            "--cores {want} does not match kshim's region, which has {cores} ring sets \
             (one per core): start kshim with {want} cores, or run the engine with \
             --cores {cores} (or without --cores, to follow kshim)"
        );
    }
    let local_nid: Option<Nid> = att.hello.nids.first().copied();
    if let [first, rest @ ..] = att.hello.nids.as_slice() {
        if !rest.is_empty() {
            // One engine binds one address and speaks for one LNet network.
            eprintln!(
                "lu2k-engine: warning: kshim announces {} NIDs; this engine serves {first} only \
                 (start one kshim + engine pair per NID for the others: {})",
                att.hello.nids.len(),
                rest.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let net = local_nid.map_or(0, |n| (n.0 >> 32) as u32);
    let bind_ip = if cfg.bind.is_unspecified() {
        local_nid
            .and_then(|n| n.ipv4())
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    } else {
        cfg.bind
    };
    let local = SocketAddrV4::new(bind_ip, cfg.port);

    // One socket per core, one port: a reuseport group steered by the shard function.
    let sock_opts = SockOpts {
        reuseport: cores > 1,
        sndbuf: cfg.sndbuf,
        rcvbuf: cfg.rcvbuf,
        gro: features.udp_gro,
    };
    let rds = cfg.backend == BackendChoice::Rds;
    if rds && cores != 1 {
        let _ = att.ack(2);
        bail!(
            "backend = rds runs one core, and kshim's region has {cores} ring sets: \
             start kshim with one core for the RDS back-end, or use --backend udt"
        );
    }
    let mut socks = Vec::new();
    for _ in 0..if rds { 0 } else { cores } {
        let (fd, _) =
            sys::udp_socket(local, &sock_opts).with_context(|| format!("binding UDP {local}"))?;
        socks.push(fd);
    }
    if cores > 1 {
        sys::attach_reuseport_cbpf(&socks[0], &crate::steer::program(cores))
            .context("attaching the SO_REUSEPORT steering program")?;
    }

    let overrides: HashMap<Ipv4Addr, SocketAddrV4> = cfg
        .peers
        .iter()
        .filter_map(|p| {
            p.nid
                .parse::<Nid>()
                .ok()
                .and_then(|n| n.ipv4())
                .map(|ip| (ip, p.addr))
        })
        .collect();
    let rx_per_core = region.layout().header().rx_buf_count / cores.max(1);
    warn_if_rx_pool_small(rx_per_core, cfg.mss);
    let udt_cfg = lu2k_udt::conn::Config {
        mss: u32::from(cfg.mss),
        idle_timeout_us: cfg.peer_down_timeout_s * 1_000_000,
        connect_timeout_us: cfg.peer_down_timeout_s * 1_000_000,
        rcv_buf_pkts: Some(cfg.flow_window.min(rx_per_core.saturating_mul(4)).max(32)),
        ..Default::default()
    };

    let (ntx, nrx) = mpsc::channel::<Notice>();
    let mut slots: Vec<Published> = Vec::new();
    let mut threads = Vec::new();
    let mut to_engine = att.to_engine.iter();
    let mut to_kshim = att.to_kshim.iter();
    let mut socks = socks.into_iter().map(Some).collect::<Vec<_>>();
    if rds {
        socks.push(None);
    }
    for (c, sock) in socks.into_iter().enumerate() {
        let c = c as u32;
        let bell = to_engine
            .next()
            .context("HELLO lacks a to-engine eventfd")?;
        let fds = Eventfds {
            to_engine: Some(bell.try_clone()?),
            to_kshim: Some(
                to_kshim
                    .next()
                    .context("HELLO lacks a to-kshim eventfd")?
                    .try_clone()?,
            ),
        };
        let ec = region.engine_core(c, fds).context("attaching core rings")?;
        let mem = Arc::new(
            CoreMem::new(&region, c, cores, SEND_SLOTS, MSG_SLOTS)
                .context("mapping core memory")?,
        );
        let bell_io = bell.try_clone()?;
        let published: Published = Arc::new(Mutex::new(CoreStats::default()));
        slots.push(published.clone());
        let params = CoreParams {
            core: c,
            cores,
            net,
            port: cfg.port,
            overrides: overrides.clone(),
            udt: udt_cfg.clone(),
            spin: Duration::from_micros(u64::from(cfg.spin_us)),
            spin_max: Duration::from_micros(u64::from(cfg.spin_max_us)),
            msg_slots: MSG_SLOTS,
            drain_timeout: Duration::from_secs(cfg.drain_timeout_s),
            peer_down_timeout_us: cfg.peer_down_timeout_s * 1_000_000,
        };
        let pin = cfg.pin_cpus;
        let rds_params = crate::rds::RdsParams {
            core: c,
            net,
            port: cfg.port,
            spin: Duration::from_micros(u64::from(cfg.spin_us)),
            drain_timeout: Duration::from_secs(cfg.drain_timeout_s),
        };
        let zc = cfg.zero_copy;
        let send_worker = cfg.send_worker.enabled(
            cores as usize,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let (region2, ntx2, draining2) = (region.clone(), ntx.clone(), draining.clone());
        // The ring is built on the thread that uses it: SINGLE_ISSUER and
        // DEFER_TASKRUN tie it to its creator.
        threads.push(
            std::thread::Builder::new()
                .name(format!("lu2k-core{c}"))
                .spawn(move || {
                    if pin {
                        let _ = sys::pin_to_cpu(c as usize);
                    }
                    let Some(sock) = sock else {
                        let r = lu2k_rds::Socket::open(
                            local,
                            &lu2k_rds::Config {
                                nonblocking: true,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| e.to_string())
                        .and_then(|s| {
                            crate::rds::RdsCore::new(
                                rds_params, region2, ec, mem, s, published, draining2,
                            )
                            .map_err(|e| e.to_string())
                        });
                        match r {
                            Ok(core) => {
                                let _ = ready_tx.send(Ok(()));
                                let core: Box<dyn CoreBackend> = Box::new(core);
                                eprintln!("lu2k-engine: core {c}: back-end {}", core.name());
                                core.run();
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                        return;
                    };
                    let io: std::io::Result<Box<dyn DatagramIo>> = match path {
                        IoPath::Uring => UringIo::new_owned(
                            sock,
                            mem.clone(),
                            Some(bell_io),
                            UringOpts {
                                send_slots: SEND_SLOTS,
                                zc,
                                send_worker,
                                ..UringOpts::default()
                            },
                        )
                        .and_then(|mut x| {
                            if futex_bell {
                                x.use_futex_doorbell(ec.wait.futex_word())?;
                            }
                            Ok(x)
                        })
                        .map(|x| {
                            eprintln!("lu2k-engine: core {c}: io_uring {}", x.setup());
                            Box::new(x) as Box<dyn DatagramIo>
                        }),
                        IoPath::Epoll => {
                            EpollIo::new_owned(sock, mem.clone(), Some(bell_io), SEND_SLOTS)
                                .map(|x| Box::new(x) as Box<dyn DatagramIo>)
                        }
                    };
                    let io = match io {
                        Ok(io) => {
                            let _ = ready_tx.send(Ok(()));
                            io
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let core: Box<dyn CoreBackend> = Box::new(CoreLoop::new(
                        params, region2, ec, io, mem, published, ntx2, draining2,
                    ));
                    eprintln!("lu2k-engine: core {c}: back-end {}", core.name());
                    core.run();
                })?,
        );
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = att.ack(2);
                bail!("core {c}: I/O set-up failed: {e}");
            }
            Err(_) => {
                let _ = att.ack(2);
                bail!("core {c}: thread died during set-up");
            }
        }
    }
    drop(ntx);
    att.ack(0).context("sending ACK to kshim")?;
    eprintln!(
        "lu2k-engine: attached to kshim at {} ({cores} cores, {} {local}, path {path})",
        kpath.display(),
        if rds { "RDS/rds_tcp" } else { "UDP" }
    );
    let _stats = match Server::start(&cfg.stats_socket, slots, path.to_string(), draining.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!(
                "lu2k-engine: stats socket {} unavailable: {e}",
                cfg.stats_socket.display()
            );
            None
        }
    };

    // Forward notices; notice kshim going away.
    loop {
        match nrx.recv_timeout(Duration::from_millis(50)) {
            Ok(n) => {
                let k = match n {
                    Notice::PeerDown(nid) => KNotice::PeerDown(Nid(nid)),
                    Notice::PeerUp(nid) => KNotice::PeerUp(Nid(nid)),
                };
                let _ = att.notice(k);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !draining.load(Ordering::Relaxed) && kshim_gone(&att.sock) {
            eprintln!("lu2k-engine: kshim closed the attach socket: draining");
            draining.store(true, Ordering::SeqCst);
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    for t in threads {
        let _ = t.join();
    }
    eprintln!("lu2k-engine: stopped");
    Ok(())
}

fn kshim_gone(sock: &impl AsFd) -> bool {
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
    let per_message = (lu2k_kshim::MAX_PAYLOAD as u32).div_ceil(payload);
    let need = per_message + per_message / 7 + 1;
    if rx_per_core < need {
        eprintln!(
            "lu2k-engine: warning: {rx_per_core} RX buffers per core cannot hold a 1 MiB \
             message ({per_message} datagrams at MSS {mss}) plus the reserve; a lossy path \
             may stall. Give kshim at least {need} RX buffers per core."
        );
    }
}
