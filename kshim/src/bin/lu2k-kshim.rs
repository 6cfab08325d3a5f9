//! `lu2k-kshim`: the LNet side of lu2k for people without a kernel module — a load
//! generator and sink in the manner of LNet selftest, talking to an engine through
//! kshim's shared region.
//!
//! Every mode starts a [`Kshim`], listens on `--socket`, waits for an engine to attach,
//! then:
//! - `put`: bulk PUTs of `--size` bytes, `--count` times, to `--to`; the payload of
//!   message `i` is the selftest pattern of seed `hdr_data = salt + i`, so the sink can
//!   check every byte; with `--retries N`, a message that fails with a status LNet
//!   resends on (`lu2k_kshim::lnet`) goes again, same content and seed, up to N
//!   times, across engine restarts;
//! - `ping`: GETs asking for `--size` bytes; the sink answers each with a REPLY
//!   carrying the pattern; prints round-trip percentiles;
//! - `sink`: receives, verifies PUT payloads (duplicates too), counts duplicates
//!   (same source NID and seed), answers GETs, prints counts; with
//!   `--wait-next-engine` it keeps counting across engine restarts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::route::Route;
use lu2k_kshim::{lnet, selftest, Config, Cookie, Event, Kshim, Net, Nid, SendError, TxStatus};

/// Portal the selftest traffic uses (any value; LNet selftest uses its own).
const PORTAL: u32 = 42;
/// LNet pid of the selftest endpoints (12345 is LNet's well-known kernel pid).
const PID: u32 = 12345;

#[derive(Parser, Debug)]
#[command(
    name = "lu2k-kshim",
    version,
    about = "LNet-selftest-like load generator and sink on lu2k's kernel half (kshim)",
    long_about = "Runs kshim — lu2k's kernel half, in userspace — and attaches an lu2k engine \
                  to it through a Unix socket. Start this first, then the engine with the same \
                  socket path. Modes: `put` (bulk PUTs with verifiable content), `ping` \
                  (round-trip latency), `sink` (receives, verifies, answers pings)."
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Common {
    /// Unix socket where kshim waits for the engine.
    #[arg(long, global = true, default_value = "/tmp/lu2k-kshim.sock")]
    socket: PathBuf,
    /// This node's NID(s), e.g. 10.0.0.1@lu2k (repeat for several networks).
    #[arg(long = "nid", global = true, default_value = "127.0.0.1@lu2k")]
    nids: Vec<Nid>,
    /// Engine cores (ring sets in the region).
    #[arg(long, global = true, default_value_t = 1)]
    cores: u32,
    /// Cores each peer's messages are spread over (1..=cores; socklnd's
    /// conns_per_peer): one peer then uses several engine cores.
    #[arg(long, global = true, default_value_t = 1)]
    conns_per_peer: u32,
    /// Messages in flight per peer (satellite paths need many; socklnd uses 8).
    #[arg(long, global = true)]
    peer_credits: Option<u32>,
    /// Messages in flight in total.
    #[arg(long, global = true)]
    credits: Option<u32>,
    /// TX pool size, e.g. 256M [default: sized for --path-rate-mbps and
    /// --path-rtt-ms where given (6 x rate x RTT, the transport's window; at
    /// least 32M), else 256M]. A message holds its share until its last byte
    /// is acknowledged; every page a message once used stays resident in the
    /// engine that sent it.
    #[arg(long, global = true, value_parser = parse_size)]
    tx_pool: Option<u64>,
    /// RX buffers the engine receives into (count of 64 KiB buffers, split
    /// between the cores) [default: sized for --path-rate-mbps and
    /// --path-rtt-ms where given, else 32768]. A received datagram holds a
    /// share of one (the engine cuts buffers into datagram-sized receives where
    /// the kernel does not coalesce: 40 of 1472 bytes) until its message
    /// completes; on a lossy satellite path data waits about two round trips
    /// behind a hole. The pool is sparse shared memory: only pages that
    /// received data cost memory, and free ones that stay cold are given back.
    #[arg(long, global = true)]
    rx_bufs: Option<u32>,
    /// The path's rate in Mbit/s, to size the RX and TX pools (with
    /// --path-rtt-ms): 3 x rate x RTT of datagrams, and 6 x of bytes.
    #[arg(long, global = true)]
    path_rate_mbps: Option<f64>,
    /// The path's round-trip time in ms, to size the RX and TX pools (with
    /// --path-rate-mbps).
    #[arg(long, global = true)]
    path_rtt_ms: Option<f64>,
    /// The path's largest IP packet (the engine's mss), to size the RX pool.
    #[arg(long, global = true, default_value_t = 1500)]
    path_mss: u32,
    /// Route to a remote network: NET@GATEWAY_NID[:HOPS[:PRIORITY]], e.g.
    /// o2ib1@10.0.0.254@lu2k:1:0 (repeatable).
    #[arg(long = "route", global = true, value_parser = parse_route)]
    routes: Vec<Route>,
    /// How long to wait for an engine to attach, in seconds.
    #[arg(long, global = true, default_value_t = 60.0)]
    attach_wait: f64,
    /// Seconds between progress lines (0: none).
    #[arg(long, global = true, default_value_t = 1.0)]
    progress: f64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bulk PUTs with content the sink verifies.
    Put {
        /// Destination NID; repeat it to spread the messages round-robin over several
        /// peers (with `--cores N`, peers on different cores measure the engine's
        /// multi-core scaling).
        #[arg(long, required = true)]
        to: Vec<Nid>,
        /// Payload per message, e.g. 1M, 4K, 1000 (at most 1M).
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        size: u64,
        /// Number of messages.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Most messages outstanding at once (0: as many as credits and the pool allow).
        #[arg(long, default_value_t = 0)]
        window: u64,
        /// Seed salt; message i carries seed salt + i (the sink needs no configuration).
        #[arg(long, default_value_t = 0x1u64 << 40)]
        salt: u64,
        /// Send the TX buffers as they are, without writing the verifiable content
        /// (measures the engines, not this thread's pattern generator, which tops out
        /// at a few Gbit/s); the sink must run with --no-verify.
        #[arg(long)]
        no_fill: bool,
        /// Resend a message up to N times when it fails with a status LNet resends
        /// on (the engine went away or shut down, the peer was unreachable or reset:
        /// see lu2k_kshim::lnet), with the same content and message id (seed), so
        /// the sink can count duplicates. With N > 0 an engine going away does not
        /// end the run: kshim takes the next engine's attach (waiting up to
        /// --attach-wait for it) and the failed messages go again.
        #[arg(long, default_value_t = 0)]
        retries: u32,
    },
    /// Round trips: GET of --size bytes answered by the sink's REPLY.
    Ping {
        /// Destination NID (a node running `sink`).
        #[arg(long)]
        to: Nid,
        /// Number of pings.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Bytes the REPLY carries.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        size: u64,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Receives PUTs (verifying content, counting duplicates: a PUT whose source
    /// NID and message id it has seen already) and answers pings.
    Sink {
        /// Stop after this many distinct PUTs (0: run until the engine goes or
        /// --idle passes).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// When the engine goes away, wait for the next one (kshim listens again at
        /// once) and keep counting, instead of stopping: duplicates and losses
        /// across an engine restart are then counted against one set of seeds.
        #[arg(long)]
        wait_next_engine: bool,
        /// Stop after this many seconds without traffic once something arrived (0: never).
        #[arg(long, default_value_t = 0.0)]
        idle: f64,
        /// Count PUTs without checking their content (for `put --no-fill`).
        #[arg(long)]
        no_verify: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use a number with an optional K, M or G"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use K, M or G (powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_route(s: &str) -> Result<Route, String> {
    let (net, rest) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: expected NET@GATEWAY_NID[:HOPS[:PRIORITY]]"))?;
    let net: Net = net.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mut parts = rest.split(':');
    let gw: Nid = parts
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("{s:?}: gateway: {e}"))?;
    let num = |p: Option<&str>, d: u32, what: &str| -> Result<u32, String> {
        p.map_or(Ok(d), |x| {
            x.parse()
                .map_err(|_| format!("{s:?}: {what} {x:?} is not a number"))
        })
    };
    let hops = num(parts.next(), 1, "hops")?;
    let priority = num(parts.next(), 0, "priority")?;
    Ok(Route {
        net,
        gateway: gw,
        hops,
        priority,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lu2k-kshim: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let c = &cli.common;
    let mut cfg = Config::new(c.nids.clone(), c.socket.clone());
    cfg.cores = c.cores;
    cfg.conns_per_peer = c.conns_per_peer;
    if let Some(v) = c.peer_credits {
        cfg.peer_credits = v;
    }
    if let Some(v) = c.credits {
        cfg.credits = v;
    }
    let tx_why = match (c.tx_pool, c.path_rate_mbps, c.path_rtt_ms) {
        (Some(v), _, _) => {
            cfg.tx_pool_len = v;
            format!("{} MiB TX pool (--tx-pool)", v >> 20)
        }
        (None, Some(rate), Some(rtt)) if rate > 0.0 && rtt > 0.0 => {
            let (v, why) = lu2k_ring_abi::tx_pool::bytes_for_path(rate, rtt);
            cfg.tx_pool_len = v;
            why
        }
        _ => format!(
            "{} MiB TX pool (default: the path is not known; give --path-rate-mbps and \
             --path-rtt-ms to size the pool for it)",
            cfg.tx_pool_len >> 20
        ),
    };
    let (rx_bufs, why) = match (c.rx_bufs, c.path_rate_mbps, c.path_rtt_ms) {
        (Some(n), _, _) => (n, format!("{n} RX buffers (--rx-bufs)")),
        (None, Some(rate), Some(rtt)) if rate > 0.0 && rtt > 0.0 => {
            lu2k_ring_abi::rx_pool::bufs_for_path(rate, rtt, cfg.rx_buf_size, c.path_mss)
        }
        (None, None, None) => (
            32768,
            "32768 RX buffers (default: the path is not known; give --path-rate-mbps \
             and --path-rtt-ms to size the pool for it)"
                .to_string(),
        ),
        _ => anyhow::bail!(
            "--path-rate-mbps and --path-rtt-ms size the RX pool together, both above 0; \
             give both (e.g. --path-rate-mbps 500 --path-rtt-ms 600) or --rx-bufs"
        ),
    };
    eprintln!("lu2k-kshim: RX pool: {why}");
    eprintln!("lu2k-kshim: TX pool: {tx_why}");
    cfg.rx_buf_count = rx_bufs;
    cfg.routes = c.routes.clone();
    let mut k = Kshim::start(cfg).context("starting kshim")?;
    eprintln!(
        "lu2k-kshim: {} waiting for an engine at {} (region {} MiB, {} core(s))",
        c.nids
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(","),
        c.socket.display(),
        k.region().len() >> 20,
        c.cores
    );
    wait_attached(&mut k, Duration::from_secs_f64(c.attach_wait), &c.socket)?;
    eprintln!("lu2k-kshim: engine attached");
    let progress = (c.progress > 0.0).then(|| Duration::from_secs_f64(c.progress));
    let src = c.nids[0];
    match cli.cmd {
        Cmd::Put {
            to,
            size,
            count,
            window,
            salt,
            no_fill,
            retries,
        } => put(
            &mut k,
            Load {
                src,
                to,
                size,
                count,
                window,
                salt,
                no_fill,
                retries,
                attach_wait: Duration::from_secs_f64(c.attach_wait),
            },
            progress,
        ),
        Cmd::Ping {
            to,
            count,
            size,
            timeout,
        } => ping(
            &mut k,
            src,
            to,
            count,
            size,
            Duration::from_secs_f64(timeout),
        ),
        Cmd::Sink {
            count,
            wait_next_engine,
            idle,
            no_verify,
        } => sink(
            &mut k,
            SinkOpts {
                count,
                wait_next_engine,
                idle,
                no_verify,
            },
            progress,
        ),
    }
}

fn wait_attached(k: &mut Kshim, limit: Duration, path: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "no engine attached at {} within {:.0} s; start lu2k-engine with this socket path, \
                 or raise --attach-wait",
                path.display(),
                limit.as_secs_f64()
            );
        }
        match k.wait(Some(left)) {
            Some(Event::EngineAttached) => return Ok(()),
            Some(Event::EngineGone(r)) => bail!("the engine went away while attaching: {r:?}"),
            _ => {}
        }
    }
}

/// A NID as LNet's 72-byte header carries it: an IPv6 NID does not fit and travels
/// beside the header ([`Kshim::send_to`]); the header says `LNET_NID_ANY`.
fn hdr_nid(n: Nid) -> u64 {
    n.nid4().unwrap_or(u64::MAX)
}

fn put_hdr(src: Nid, to: Nid, seed: u64, len: u64) -> Repr {
    Repr {
        dest_nid: hdr_nid(to),
        src_nid: hdr_nid(src),
        dest_pid: PID,
        src_pid: PID,
        payload_length: len as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: seed,
            hdr_data: seed,
            ptl_index: PORTAL,
            offset: 0,
        },
    }
}

struct Progress {
    every: Option<Duration>,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new(every: Option<Duration>) -> Progress {
        let now = Instant::now();
        Progress {
            every,
            start: now,
            last: now,
        }
    }
    fn tick(&mut self, what: impl FnOnce(f64) -> String) {
        if let Some(e) = self.every {
            if self.last.elapsed() >= e {
                self.last = Instant::now();
                eprintln!("{}", what(self.start.elapsed().as_secs_f64()));
            }
        }
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs.max(1e-9) / 1e9
}

/// What `put` sends.
struct Load {
    src: Nid,
    to: Vec<Nid>,
    size: u64,
    count: u64,
    window: u64,
    salt: u64,
    no_fill: bool,
    retries: u32,
    attach_wait: Duration,
}

/// Allocates, fills and sends message `seed` to `dst`; `Ok(None)` when the pool,
/// the pending limit or a stale buffer says "later".
fn send_one(
    k: &mut Kshim,
    l: &Load,
    chunk: &mut [u8],
    seed: u64,
    dst: Nid,
) -> Result<Option<Cookie>> {
    let size = l.size as usize;
    let buf = match k.alloc_tx(size) {
        Ok(b) => b,
        Err(SendError::Pool(_)) => return Ok(None),
        Err(e) => bail!(
            "send of seed {seed:#x}: {e}{}",
            k.renew_error()
                .map_or(String::new(), |r| format!(" (last try: {r})"))
        ),
    };
    let mut at = if l.no_fill { size } else { 0 };
    while at < size {
        let n = chunk.len().min(size - at);
        selftest::fill(seed, at, &mut chunk[..n]);
        k.write_tx(&buf, at, &chunk[..n]);
        at += n;
    }
    match k.send_buf_to(dst, &put_hdr(l.src, dst, seed, l.size), buf) {
        Ok(c) => Ok(Some(c)),
        Err(SendError::TooManyPending { .. })
        | Err(SendError::Pool(_))
        | Err(SendError::StaleBuffer) => Ok(None),
        Err(e) => bail!("send of seed {seed:#x}: {e}"),
    }
}

fn put(k: &mut Kshim, l: Load, progress: Option<Duration>) -> Result<ExitCode> {
    let (size, count, salt) = (l.size, l.count, l.salt);
    if size > lu2k_kshim::MAX_PAYLOAD as u64 {
        bail!("--size {size} exceeds the LNet maximum of 1M");
    }
    let window = if l.window == 0 { u64::MAX } else { l.window };
    let mut chunk = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut ok = 0u64;
    let mut failed: HashMap<String, u64> = HashMap::new();
    // In flight: cookie -> (message index, destination).
    let mut outstanding: HashMap<Cookie, (u64, Nid)> = HashMap::new();
    // Failed messages waiting to go again, and how often each went again.
    let mut resend: VecDeque<(u64, Nid)> = VecDeque::new();
    let mut tries: HashMap<u64, u32> = HashMap::new();
    let mut resent: HashMap<String, u64> = HashMap::new();
    let mut gone_since: Option<Instant> = None;
    let mut engines_gone = 0u64;
    let mut prog = Progress::new(progress);
    let t0 = Instant::now();
    while done < count {
        // Resends first (LNet resends from its own queue before new traffic), then
        // new messages, while there is room.
        while (outstanding.len() as u64) < window {
            let (i, dst, again) = match resend.front() {
                Some(&(i, dst)) => (i, dst, true),
                None if sent < count => (sent, l.to[(sent % l.to.len() as u64) as usize], false),
                None => break,
            };
            let Some(c) = send_one(k, &l, &mut chunk, salt.wrapping_add(i), dst)? else {
                break;
            };
            outstanding.insert(c, (i, dst));
            if again {
                resend.pop_front();
            } else {
                sent += 1;
            }
        }
        if let Some(t) = gone_since {
            if t.elapsed() > l.attach_wait {
                bail!(
                    "the engine went away and no new engine attached within {:.0} s \
                     ({done}/{count} done, {} waiting to be resent); restart lu2k-engine or \
                     raise --attach-wait",
                    l.attach_wait.as_secs_f64(),
                    resend.len() + outstanding.len()
                );
            }
        }
        let room = (outstanding.len() as u64) < window && (sent < count || !resend.is_empty());
        let ev = if room {
            k.poll().or_else(|| k.wait(Some(Duration::from_millis(1))))
        } else {
            k.wait(Some(Duration::from_millis(200)))
        };
        match ev {
            Some(Event::TxDone {
                cookie,
                status,
                detail,
            }) => {
                let Some((i, dst)) = outstanding.remove(&cookie) else {
                    bail!("completion of a cookie this run did not send: {cookie:?}");
                };
                let n = tries.entry(i).or_default();
                if status == TxStatus::Ok {
                    done += 1;
                    ok += 1;
                } else if lnet::retried(status) && *n < l.retries {
                    *n += 1;
                    *resent.entry(format!("{status:?}")).or_default() += 1;
                    resend.push_back((i, dst));
                } else {
                    done += 1;
                    *failed.entry(format!("{status:?}/{detail}")).or_default() += 1;
                }
            }
            Some(Event::EngineGone(r)) => {
                // Every pending send was failed back before this event.
                engines_gone += 1;
                eprintln!("lu2k-kshim: the engine went away: {r:?}");
                if l.retries == 0 {
                    break;
                }
                eprintln!(
                    "lu2k-kshim: waiting for the next engine at {} ({} messages queued for it)",
                    k.config().socket_path.display(),
                    k.pending()
                );
                gone_since = Some(Instant::now());
            }
            Some(Event::EngineAttached) if gone_since.is_some() => {
                gone_since = None;
                eprintln!("lu2k-kshim: engine attached again");
            }
            Some(Event::Rx(m)) => k.rx_done(m),
            Some(Event::PeerDown(n)) => eprintln!("lu2k-kshim: peer {n} is down"),
            _ => {}
        }
        prog.tick(|s| {
            format!(
                "put: {done}/{count} done ({ok} ok), {} in flight, {} to resend, {:.1} MiB, {:.2} Gbit/s",
                outstanding.len(),
                resend.len(),
                (ok * size) as f64 / (1 << 20) as f64,
                gbps(ok * size, s)
            )
        });
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "put: to {}, {count} x {size} B: {ok} ok, {} failed, {:.2} s, {:.3} Gbit/s, {:.0} msg/s",
        l.to.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        done - ok,
        secs,
        gbps(ok * size, secs),
        ok as f64 / secs.max(1e-9)
    );
    for (why, n) in &failed {
        println!("put: failed {why}: {n}");
    }
    if l.retries > 0 {
        let total: u64 = resent.values().sum();
        let mut by: Vec<_> = resent.iter().map(|(s, n)| format!("{s} {n}")).collect();
        by.sort();
        println!(
            "put: resent {total} (retries {}; {}); engines gone {engines_gone}",
            l.retries,
            if by.is_empty() {
                "none".to_string()
            } else {
                by.join(", ")
            }
        );
    }
    if sent < count {
        println!("put: {} never sent", count - sent);
    }
    Ok(if ok == count {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn ping(
    k: &mut Kshim,
    src: Nid,
    to: Nid,
    count: u64,
    size: u64,
    timeout: Duration,
) -> Result<ExitCode> {
    if size > lu2k_kshim::MAX_PAYLOAD as u64 {
        bail!("--size {size} exceeds the LNet maximum of 1M");
    }
    let mut rtts: Vec<Duration> = Vec::with_capacity(count as usize);
    let mut lost = 0u64;
    let mut corrupt = 0u64;
    // The round trip is request sent -> reply delivered. The request's own TX
    // completion needs the peer engine's acknowledgement, which UDT sends on its
    // own schedule (every 10 ms): waiting for it before the next ping would pace
    // the pings by the ACK timer and let both sides fall asleep between them.
    // Completions are collected as they come; a failed one ends its ping's wait.
    let mut outstanding: HashMap<Cookie, u64> = HashMap::new();
    let mut send_failures = 0u64;
    let mut on_done = |outstanding: &mut HashMap<Cookie, u64>, c: Cookie, status: TxStatus| {
        let seq = outstanding.remove(&c)?;
        (status != TxStatus::Ok).then(|| {
            send_failures += 1;
            (seq, status)
        })
    };
    for seq in 0..count {
        let h = Repr {
            dest_nid: hdr_nid(to),
            src_nid: hdr_nid(src),
            dest_pid: PID,
            src_pid: PID,
            payload_length: 0,
            msg: Msg::Get {
                return_wmd: WireHandle {
                    interface_cookie: 0x1u64 << 32,
                    object_cookie: seq,
                },
                match_bits: seq,
                ptl_index: PORTAL,
                src_offset: 0,
                sink_length: size as u32,
            },
        };
        let t = Instant::now();
        let cookie: Cookie = k
            .send_to(to, &h, &[])
            .map_err(|e| anyhow!("ping {seq}: {e}"))?;
        outstanding.insert(cookie, seq);
        let mut got = false;
        let mut failed = None;
        while t.elapsed() < timeout && !got && failed.is_none() {
            match k.wait(Some(timeout.saturating_sub(t.elapsed()))) {
                Some(Event::Rx(m)) => {
                    if let Msg::Reply { dst_wmd } = m.hdr.msg {
                        if dst_wmd.object_cookie == seq {
                            got = true;
                            rtts.push(t.elapsed());
                            let mut data = vec![0u8; m.len()];
                            m.copy_to(&mut data);
                            if m.len() as u64 != size || selftest::check(seq, 0, &data).is_some() {
                                corrupt += 1;
                            }
                        }
                    }
                    k.rx_done(m);
                }
                Some(Event::TxDone {
                    cookie: c, status, ..
                }) => {
                    if let Some((s, st)) = on_done(&mut outstanding, c, status) {
                        if s == seq {
                            failed = Some(st);
                        }
                    }
                }
                Some(Event::EngineGone(r)) => bail!("the engine went away: {r:?}"),
                _ => {}
            }
        }
        if !got {
            lost += 1;
            eprintln!("ping {seq}: no reply (send status {failed:?})");
        }
    }
    // The last requests' completions (every send ends exactly one way).
    let t = Instant::now();
    while !outstanding.is_empty() && t.elapsed() < timeout {
        match k.wait(Some(timeout.saturating_sub(t.elapsed()))) {
            Some(Event::TxDone {
                cookie: c, status, ..
            }) => {
                on_done(&mut outstanding, c, status);
            }
            Some(Event::Rx(m)) => k.rx_done(m),
            Some(Event::EngineGone(r)) => bail!("the engine went away: {r:?}"),
            _ => {}
        }
    }
    if !outstanding.is_empty() {
        eprintln!("ping: {} sends not completed", outstanding.len());
    }
    rtts.sort();
    let pct = |p: f64| -> f64 {
        if rtts.is_empty() {
            return f64::NAN;
        }
        let i = ((rtts.len() as f64 - 1.0) * p).round() as usize;
        rtts[i].as_secs_f64() * 1e6
    };
    println!(
        "ping: to {to}, {count} x GET {size} B: {} replies, {lost} lost, {corrupt} corrupt, \
         {send_failures} sends failed; rtt us: min {:.1} p50 {:.1} p99 {:.1} max {:.1}",
        rtts.len(),
        pct(0.0),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(
        if lost == 0 && corrupt == 0 && send_failures == 0 && outstanding.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// What `sink` was asked for (see `Cmd::Sink`).
struct SinkOpts {
    count: u64,
    wait_next_engine: bool,
    idle: f64,
    no_verify: bool,
}

fn sink(k: &mut Kshim, o: SinkOpts, progress: Option<Duration>) -> Result<ExitCode> {
    let SinkOpts {
        count,
        wait_next_engine,
        idle,
        no_verify,
    } = o;
    let mut puts = 0u64;
    // (source NID, message id) of every PUT seen: a resend carries the same id.
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut dups = 0u64;
    let mut bytes = 0u64;
    let mut bad = 0u64;
    let mut gets = 0u64;
    let mut other = 0u64;
    let mut reply_fail = 0u64;
    let mut scratch = vec![0u8; lu2k_kshim::MAX_PAYLOAD];
    let mut last = Instant::now();
    let mut any = false;
    let mut prog = Progress::new(progress);
    loop {
        if count > 0 && seen.len() as u64 >= count {
            break;
        }
        if idle > 0.0 && any && last.elapsed().as_secs_f64() > idle {
            eprintln!("sink: idle for {idle} s, stopping");
            break;
        }
        match k.wait(Some(Duration::from_millis(200))) {
            Some(Event::Rx(m)) => {
                any = true;
                last = Instant::now();
                match m.hdr.msg {
                    Msg::Put { hdr_data, .. } => {
                        puts += 1;
                        if !seen.insert((m.hdr.src_nid, hdr_data)) {
                            dups += 1;
                        }
                        bytes += m.len() as u64;
                        let mut at = 0;
                        let mut ok = m.len() == m.hdr.payload_length as usize;
                        for s in m.slices().filter(|_| !no_verify) {
                            if selftest::check(hdr_data, at, s).is_some() {
                                ok = false;
                            }
                            at += s.len();
                        }
                        if !ok {
                            bad += 1;
                            eprintln!("sink: PUT seed {hdr_data:#x} from {} is corrupt", m.from);
                        }
                    }
                    Msg::Get {
                        return_wmd,
                        match_bits,
                        sink_length,
                        ..
                    } => {
                        gets += 1;
                        let len = (sink_length as usize).min(lu2k_kshim::MAX_PAYLOAD);
                        selftest::fill(match_bits, 0, &mut scratch[..len]);
                        let h = Repr {
                            dest_nid: m.hdr.src_nid,
                            src_nid: m.hdr.dest_nid,
                            dest_pid: m.hdr.src_pid,
                            src_pid: m.hdr.dest_pid,
                            payload_length: len as u32,
                            msg: Msg::Reply {
                                dst_wmd: return_wmd,
                            },
                        };
                        if let Err(e) = k.send_to(m.from, &h, &scratch[..len]) {
                            reply_fail += 1;
                            eprintln!("sink: cannot reply to {}: {e}", m.from);
                        }
                    }
                    _ => other += 1,
                }
                k.rx_done(m);
            }
            Some(Event::TxDone { status, .. }) if status != TxStatus::Ok => reply_fail += 1,
            Some(Event::EngineGone(r)) if wait_next_engine => {
                // What the dead engine had published was handed up before this
                // event; the resends of what it lost come through the next one.
                eprintln!(
                    "sink: the engine went away: {r:?}; waiting for the next engine at {}",
                    k.config().socket_path.display()
                );
            }
            Some(Event::EngineGone(r)) => {
                eprintln!("sink: the engine went away: {r:?}");
                break;
            }
            Some(Event::EngineAttached) => eprintln!("sink: engine attached"),
            Some(Event::PeerDown(n)) => eprintln!("sink: peer {n} is down"),
            _ => {}
        }
        prog.tick(|s| {
            format!(
                "sink: {puts} PUTs ({bad} corrupt, {dups} duplicates), {:.1} MiB, {:.2} Gbit/s, \
                 {gets} GETs",
                bytes as f64 / (1 << 20) as f64,
                gbps(bytes, s)
            )
        });
    }
    println!(
        "sink: {puts} PUTs ({} verified, {bad} corrupt), {bytes} bytes; {} distinct, {dups} \
         duplicates; {gets} GETs answered ({reply_fail} replies failed); {other} other",
        if no_verify { 0 } else { puts - bad },
        seen.len()
    );
    Ok(if bad == 0 && reply_fail == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_routes_parse_with_clear_errors() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("M").unwrap_err().contains("not a size"));
        let r = parse_route("o2ib1@10.0.0.254@lu2k:2:5").unwrap();
        assert_eq!(r.net, "o2ib1".parse().unwrap());
        assert_eq!(r.gateway, "10.0.0.254@lu2k".parse().unwrap());
        assert_eq!((r.hops, r.priority), (2, 5));
        assert_eq!(parse_route("tcp@1.2.3.4@lu2k").unwrap().hops, 1);
        assert!(parse_route("tcp").is_err());
        assert!(parse_route("tcp@1.2.3.4@lu2k:x")
            .unwrap_err()
            .contains("hops"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
