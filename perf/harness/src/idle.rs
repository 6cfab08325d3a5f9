//! `lu2k-perf idle-peers`: what an idle engine with N connected peers costs.
//!
//! One measured node (kshim + engine, as in production) and N peer nodes,
//! each a real lu2k node of its own: a kshim (a library instance in this
//! process; kshim's work is the kernel's in production and is not measured)
//! and an `__engine` process, on its own loopback address (127.1.x.y), so
//! that the measured engine holds N UDT connections to N engines exactly as
//! it would to N hosts. Every peer sends one small PUT to the measured node
//! and waits for its completion, so that each connection has carried a
//! message; then all are idle. After `--settle` seconds the measured engine
//! process's CPU (`/proc/PID/stat` utime + stime, every thread, in USER_HZ
//! ticks of 10 ms; and the sum of `/proc/PID/task/*/schedstat`, nanoseconds,
//! as a finer cross-check) and its stats counters are read at the start and
//! the end of `--seconds`. The same is measured with no peers first, as the
//! baseline, in the same invocation.
//!
//! A peer counts as connected when the measured engine's stats show it up
//! and its message received; fewer than N connected, at the start or the
//! end of the window, fails the run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::{Config, Event, Kshim, Nid, TxStatus};
use serde::Serialize;

use crate::lu2k::{EnginePeer, EngineSpec};
use crate::node::self_command;

/// The `idle-peers` subcommand's arguments.
#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    /// Peer nodes connected to the measured engine.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub peers: u32,
    /// Seconds measured, after the settle time.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
    /// Seconds between the last peer's message and the measurement.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// kshim RX buffers (64 KiB each) per node; idle nodes need few.
    #[arg(long, default_value_t = 64)]
    pub rx_bufs: u32,
    /// kshim TX pool per node, MiB (shared memory each engine maps).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub tx_pool_mib: u64,
}

/// One measurement: the measured engine with `peers` peers, idle.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRow {
    /// Peers configured (and sent one message each).
    pub peers: u32,
    /// Peers the measured engine's stats show up with their message received,
    /// the smaller of the counts at the window's start and end.
    pub connected: u32,
    /// Seconds measured.
    pub seconds: f64,
    /// The measured engine's CPU, % of one core (`/proc/PID/stat`).
    pub cpu_pct: f64,
    /// The same from the threads' schedstat (nanoseconds; threads that
    /// exited during the window are not in it).
    pub cpu_pct_schedstat: f64,
    /// Blocking waits that ended, per second (all reasons).
    pub wakes_per_s: f64,
    /// Event-loop passes per second.
    pub passes_per_s: f64,
    /// Timers fired per second.
    pub timers_per_s: f64,
    /// Datagrams sent per second.
    pub datagrams_tx_per_s: f64,
    /// Receive completions per second.
    pub recvs_per_s: f64,
    /// `io_uring_enter` calls per second.
    pub enters_per_s: f64,
    /// The measured engine's peak RSS, MiB.
    pub rss_mib: Option<f64>,
    /// The machine's 1-minute load average at the window's end.
    pub load1: f64,
}

fn nid(ip: Ipv4Addr) -> Nid {
    format!("{ip}@lu2k")
        .parse()
        .expect("a NID of an IP address")
}

/// The i-th peer's address: 127.1.x.y, y in 1..=250.
fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

const MEASURED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 1);

fn small_put(from: Nid, to: Nid, len: usize, seq: u64) -> Repr {
    Repr {
        dest_nid: to.nid4().unwrap_or(u64::MAX),
        src_nid: from.nid4().unwrap_or(u64::MAX),
        dest_pid: 12345,
        src_pid: 12345,
        payload_length: len as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: seq,
            hdr_data: seq,
            ptl_index: 42,
            offset: 0,
        },
    }
}

/// A kshim and its engine process.
struct LuNode {
    k: Kshim,
    engine: Child,
    stats: PathBuf,
}

impl LuNode {
    fn start(
        dir: &Path,
        tag: &str,
        ip: Ipv4Addr,
        port: u16,
        peers: Vec<EnginePeer>,
        rx_bufs: u32,
        tx_pool: u64,
    ) -> Result<LuNode> {
        let ksock = dir.join(format!("kshim-{tag}.sock"));
        let stats = dir.join(format!("stats-{tag}.sock"));
        let mut cfg = Config::new(vec![nid(ip)], &ksock);
        cfg.cores = 1;
        cfg.rx_buf_count = rx_bufs;
        // Each node's region is shared memory that its engine maps whole; at
        // kshim's default TX pool (256 MiB) a hundred nodes exhaust this
        // machine's memory, and an idle node sends one small message.
        cfg.tx_pool_len = tx_pool;
        let k = Kshim::start(cfg).with_context(|| format!("starting kshim {tag}"))?;
        let espec = EngineSpec {
            kshim_socket: ksock,
            bind: IpAddr::V4(ip),
            port,
            stats_socket: stats.clone(),
            cores: 1,
            peers,
            psk_file: None,
        };
        let engine = self_command()?
            .arg("__engine")
            .arg(serde_json::to_string(&espec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting engine {tag}"))?;
        Ok(LuNode { k, engine, stats })
    }

    fn close(mut self) {
        drop(self.k);
        // The engine waits for its next kshim without end: SIGTERM stops it.
        let pid = nix::unistd::Pid::from_raw(self.engine.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.engine.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.engine.kill();
        let _ = self.engine.wait();
    }
}

/// Waits until every node's engine attached to its kshim.
fn wait_attached(nodes: &mut [&mut LuNode], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    for (i, n) in nodes.iter_mut().enumerate() {
        while !n.k.is_attached() {
            if Instant::now() > deadline {
                bail!("engine {i} did not attach to its kshim within {limit:?}");
            }
            if let Some(Event::EngineGone(r)) = n.k.wait(Some(Duration::from_millis(20))) {
                bail!("engine {i} went away while attaching: {r:?}");
            }
        }
    }
    Ok(())
}

/// /proc/PID/stat utime + stime, seconds (USER_HZ is 100 in the /proc ABI).
fn proc_cpu_s(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("/proc stat without ')'")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Sum over the process's threads of schedstat's time on CPU, seconds.
fn schedstat_cpu_s(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let p = t?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    passes: u64,
    wakes: u64,
    timers: u64,
    dgrams_tx: u64,
    recvs: u64,
    enters: u64,
    connected: u32,
}

fn counts(stats: &Path) -> Result<Counts> {
    let r = lu2k_engine::daemon::stats::fetch(stats)
        .with_context(|| format!("the measured engine's stats at {}", stats.display()))?;
    let mut c = Counts::default();
    for core in &r.cores {
        let w = &core.io.wakes;
        c.passes += core.passes;
        c.wakes += w.doorbell + w.datagram + w.send_done + w.timer + w.none;
        c.timers += core.io.timers_fired;
        c.dgrams_tx += core.io.datagrams_sent;
        c.recvs += core.io.recvs;
        c.enters += core.io.enters;
        c.connected += core.peers.iter().filter(|p| p.up && p.msgs_rx >= 1).count() as u32;
    }
    Ok(c)
}

/// Keeps the measured kshim's receive side drained for `d`.
fn drain_for(k: &mut Kshim, d: Duration) -> u32 {
    let mut got = 0;
    let t = Instant::now();
    loop {
        let left = d.saturating_sub(t.elapsed()).min(Duration::from_millis(50));
        if let Some(Event::Rx(m)) = k.wait(Some(left)) {
            k.rx_done(m);
            got += 1;
        }
        if t.elapsed() >= d {
            return got;
        }
    }
}

/// Measures the idle engine with `n` peers.
pub fn measure(n: u32, args: &IdleArgs) -> Result<IdleRow> {
    let dir = std::env::temp_dir().join(format!("lu2k-idle-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // A free port on the measured address; every peer uses the same port on its own.
    let port = UdpSocket::bind((MEASURED_IP, 0))
        .context("binding 127.0.9.1 (loopback holds 127.0.0.0/8)")?
        .local_addr()?
        .port();
    let measured_addr = SocketAddr::from((MEASURED_IP, port));
    let peer_entries = (0..n)
        .map(|i| EnginePeer {
            nid_ip: IpAddr::V4(peer_ip(i)),
            addr: Some(SocketAddr::from((peer_ip(i), port))),
            links: Vec::new(),
            policy: None,
            max_rate_mbps: None,
        })
        .collect();
    let pool = args.tx_pool_mib << 20;
    let mut m = LuNode::start(
        &dir,
        "m",
        MEASURED_IP,
        port,
        peer_entries,
        args.rx_bufs,
        pool,
    )?;
    let mut peers = Vec::new();
    let result = (|| -> Result<IdleRow> {
        for i in 0..n {
            let me = EnginePeer {
                nid_ip: IpAddr::V4(MEASURED_IP),
                addr: Some(measured_addr),
                links: Vec::new(),
                policy: None,
                max_rate_mbps: None,
            };
            peers.push(LuNode::start(
                &dir,
                &format!("p{i}"),
                peer_ip(i),
                port,
                vec![me],
                args.rx_bufs,
                pool,
            )?);
        }
        let limit = Duration::from_secs(30 + u64::from(n) / 2);
        {
            let mut all: Vec<&mut LuNode> =
                std::iter::once(&mut m).chain(peers.iter_mut()).collect();
            wait_attached(&mut all, limit)?;
        }
        // One small PUT from every peer, all at once; then each completion.
        let to = nid(MEASURED_IP);
        for (i, p) in peers.iter_mut().enumerate() {
            let buf = p.k.alloc_tx(64).context("peer TX pool")?;
            p.k.send_buf_to(
                to,
                &small_put(nid(peer_ip(i as u32)), to, 64, i as u64),
                buf,
            )
            .with_context(|| format!("peer {i}: send"))?;
        }
        let deadline = Instant::now() + limit;
        for (i, p) in peers.iter_mut().enumerate() {
            loop {
                drain_for(&mut m.k, Duration::ZERO);
                if Instant::now() > deadline {
                    bail!("peer {i}'s message was not delivered within {limit:?}");
                }
                match p.k.wait(Some(Duration::from_millis(20))) {
                    Some(Event::TxDone { status, .. }) => {
                        if status != TxStatus::Ok {
                            bail!("peer {i}'s message failed: {status:?}");
                        }
                        break;
                    }
                    Some(Event::EngineGone(g)) => bail!("peer {i}'s engine went away: {g:?}"),
                    Some(Event::Rx(r)) => p.k.rx_done(r),
                    _ => {}
                }
            }
        }
        drain_for(&mut m.k, Duration::from_secs_f64(args.settle));
        let pid = m.engine.id();
        let c0 = counts(&m.stats)?;
        let (cpu0, sched0, t0) = (proc_cpu_s(pid)?, schedstat_cpu_s(pid)?, Instant::now());
        drain_for(&mut m.k, Duration::from_secs_f64(args.seconds));
        let (cpu1, sched1, secs) = (
            proc_cpu_s(pid)?,
            schedstat_cpu_s(pid)?,
            t0.elapsed().as_secs_f64(),
        );
        let c1 = counts(&m.stats)?;
        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        Ok(IdleRow {
            peers: n,
            connected: c0.connected.min(c1.connected),
            seconds: secs,
            cpu_pct: 100.0 * (cpu1 - cpu0) / secs,
            cpu_pct_schedstat: 100.0 * (sched1 - sched0) / secs,
            wakes_per_s: per_s(c0.wakes, c1.wakes),
            passes_per_s: per_s(c0.passes, c1.passes),
            timers_per_s: per_s(c0.timers, c1.timers),
            datagrams_tx_per_s: per_s(c0.dgrams_tx, c1.dgrams_tx),
            recvs_per_s: per_s(c0.recvs, c1.recvs),
            enters_per_s: per_s(c0.enters, c1.enters),
            rss_mib: crate::lu2k::vm_hwm_kib(&format!("/proc/{pid}/status"))
                .map(|k| k as f64 / 1024.0),
            load1: load1(),
        })
    })();
    for p in peers {
        p.close();
    }
    m.close();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `lu2k-perf idle-peers`: the baseline (no peers), then N peers.
pub fn main(args: IdleArgs) -> Result<()> {
    let mut failed = false;
    for n in [0, args.peers] {
        let r = measure(n, &args).with_context(|| format!("idle engine with {n} peers"))?;
        println!(
            "idle engine, {} peers ({} connected), {:.1} s, load {:.2}: CPU {:.3} % of a core \
             (schedstat {:.3} %), wakes {:.1}/s, passes {:.1}/s, timers {:.1}/s, \
             datagrams sent {:.1}/s, receives {:.1}/s, io_uring_enter {:.1}/s, RSS {} MiB",
            r.peers,
            r.connected,
            r.seconds,
            r.load1,
            r.cpu_pct,
            r.cpu_pct_schedstat,
            r.wakes_per_s,
            r.passes_per_s,
            r.timers_per_s,
            r.datagrams_tx_per_s,
            r.recvs_per_s,
            r.enters_per_s,
            r.rss_mib.map_or("?".into(), |m| format!("{m:.1}")),
        );
        println!("result {}", serde_json::to_string(&r)?);
        if r.connected < r.peers {
            eprintln!(
                "idle-peers: only {} of {} peers connected to the measured engine",
                r.connected, r.peers
            );
            failed = true;
        }
    }
    if failed {
        bail!("not every peer was connected; see the lines above");
    }
    Ok(())
}
