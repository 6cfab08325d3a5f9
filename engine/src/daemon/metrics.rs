//! Prometheus metrics: `/metrics` over HTTP in the OpenMetrics text format
//! (`prometheus-client`), when `metrics_listen` is set.
//!
//! The server thread reads the same per-core snapshots as `lu2k-engine stats`
//! ([`Published`], written by each core every 100 ms): a scrape takes each
//! core's slot mutex for one clone, and the cores never wait on the server or
//! on a scraper. Nothing is counted here; every value is the cores' own.
//!
//! Names follow Prometheus conventions: prefix `lu2k_`, base units (`_bytes`,
//! `_seconds`), `_total` on counters. Labels: `core` (the reactor index),
//! `nid` (a peer), `reason` (drops and failures). The peer labels are capped
//! at [`MAX_PEER_LABELS`] NIDs: the first peers seen keep their own label for
//! the engine's life; counters of any further peer are summed under
//! `nid="_other"` (so a counter there still only grows), `lu2k_peers` counts
//! every peer by state, and `lu2k_peer_labels_folded` says how many are folded.
//! Drop and failure reasons come from a fixed set in the code.
//!
//! The sealed wire: `lu2k_peer_security` (the mode, per peer),
//! `lu2k_peer_security_rejected_total` (datagrams from the peer's address the
//! wire refused, by reason) and `lu2k_peer_rekeys_total`. A datagram refused
//! before any peer is known for its address (a stranger's `unknown_connection`,
//! `unvalidated_address`, `plain_refused`, ...) has no `nid` to go under: those
//! are counted per core, in `lu2k_core_security_rejected_total{core,reason}`
//! (every refusal, the peers' included), with the plaintext bytes sealed and
//! opened per core beside them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::{Registry, Unit};

use super::stats::{CoreStats, Published};

/// Peers that get a `nid` label of their own; the rest share `nid="_other"`.
pub const MAX_PEER_LABELS: usize = 64;
/// The `nid` label of the peers beyond [`MAX_PEER_LABELS`].
pub const OTHER_PEERS: &str = "_other";
/// Core drops with this prefix are the sealed wire's refusals.
const SEC_DROP_PREFIX: &str = "rx_sec_";

/// What `lu2k_info` says about the engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Engine version.
    pub version: String,
    /// Transport back-end (`udt` or `rds`).
    pub backend: String,
    /// I/O path (`io_uring` or `epoll`).
    pub io_path: String,
}

/// Reads the cores' slots at each scrape and encodes them.
#[derive(Debug)]
struct Lu2kCollector {
    slots: Vec<Published>,
    info: EngineInfo,
    started: Instant,
    draining: Arc<AtomicBool>,
    /// NIDs that have a label of their own, kept once given.
    labelled: Mutex<BTreeSet<String>>,
}

/// Per-peer sums over the cores (a peer lives on one core; a sum keeps the
/// exposition right should two cores ever report it).
#[derive(Debug, Default)]
struct PeerSum {
    up: bool,
    msgs_tx: u64,
    msgs_rx: u64,
    bytes_tx: u64,
    bytes_rx: u64,
    in_flight: u64,
    retransmissions: u64,
    rtt_us: u64,
    rate_bps: u64,
    errors: u64,
    failed: BTreeMap<String, u64>,
    /// The wire's security mode ("required" or "off"; empty: not reported).
    security: String,
    rejected: BTreeMap<String, u64>,
    rekeys: u64,
}

impl PeerSum {
    fn add(&mut self, p: &super::stats::PeerStats) {
        self.up |= p.up;
        self.msgs_tx += p.msgs_tx;
        self.msgs_rx += p.msgs_rx;
        self.bytes_tx += p.bytes_tx;
        self.bytes_rx += p.bytes_rx;
        self.in_flight += p.in_flight;
        self.retransmissions += p.retransmissions;
        self.rtt_us = self.rtt_us.max(p.rtt_us);
        self.rate_bps += p.rate_bps;
        self.errors += p.errors;
        for (k, v) in &p.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        if self.security.is_empty() {
            self.security.clone_from(&p.security);
        }
        for (k, v) in &p.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
        self.rekeys += p.rekeys;
    }
}

type Labels = Vec<(&'static str, String)>;
/// A counter family read from each core: name, help, unit, value.
type CoreCounter = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&CoreStats) -> u64,
);
/// A gauge family read from each core: name, help, value.
type CoreGauge = (&'static str, &'static str, fn(&CoreStats) -> u64);
/// A counter family read from each peer: name, help, unit, value.
type PeerCounter = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&PeerSum) -> u64,
);

/// One metric family: its samples, each with its labels. A family without
/// samples (no drops yet) is still described, so dashboards and alert rules find
/// every name from the first scrape on.
fn family<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let unit = unit.as_ref();
    let mut m = enc.encode_descriptor(name, help, unit, M::TYPE)?;
    if let [(labels, v)] = samples.as_slice() {
        if labels.is_empty() {
            return v.encode(m);
        }
    }
    for (labels, v) in &samples {
        v.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(labels: Labels, v: u64) -> (Labels, ConstCounter<u64>) {
    (labels, ConstCounter::new(v))
}

fn gauge<N>(labels: Labels, v: N) -> (Labels, ConstGauge<N>) {
    (labels, ConstGauge::new(v))
}

impl Lu2kCollector {
    fn snapshot(&self) -> Vec<CoreStats> {
        self.slots
            .iter()
            .map(|s| s.lock().map(|g| g.clone()).unwrap_or_default())
            .collect()
    }

    /// Peers by label: each labelled NID, and the rest under [`OTHER_PEERS`].
    /// Also returns (up, down, folded) counts over all peers.
    fn peers(&self, cores: &[CoreStats]) -> (BTreeMap<String, PeerSum>, [u64; 3]) {
        let mut all: BTreeMap<&str, PeerSum> = BTreeMap::new();
        for c in cores {
            for p in &c.peers {
                all.entry(p.nid.as_str()).or_default().add(p);
            }
        }
        let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        for nid in all.keys() {
            if labelled.len() >= MAX_PEER_LABELS {
                break;
            }
            labelled.insert((*nid).to_string());
        }
        let mut out: BTreeMap<String, PeerSum> = BTreeMap::new();
        let (mut up, mut down, mut folded) = (0, 0, 0);
        for c in cores {
            for p in &c.peers {
                let key = if labelled.contains(&p.nid) {
                    p.nid.clone()
                } else {
                    OTHER_PEERS.to_string()
                };
                out.entry(key).or_default().add(p);
            }
        }
        for (nid, s) in &all {
            if s.up {
                up += 1;
            } else {
                down += 1;
            }
            if !labelled.contains(*nid) {
                folded += 1;
            }
        }
        (out, [up, down, folded])
    }
}

impl Collector for Lu2kCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cores = self.snapshot();
        let info = Info::new(vec![
            ("version", self.info.version.clone()),
            ("backend", self.info.backend.clone()),
            ("io_path", self.info.io_path.clone()),
        ]);
        info.encode(enc.encode_descriptor(
            "lu2k",
            "The engine: version, transport back-end and I/O path.",
            None,
            info.metric_type(),
        )?)?;
        family(
            &mut enc,
            "lu2k_uptime",
            "Seconds since the engine started.",
            Some(Unit::Seconds),
            vec![gauge(vec![], self.started.elapsed().as_secs_f64())],
        )?;
        family(
            &mut enc,
            "lu2k_draining",
            "1 while the engine drains (SIGTERM or kshim gone).",
            None,
            vec![gauge(
                vec![],
                i64::from(self.draining.load(Ordering::Relaxed)),
            )],
        )?;
        self.encode_cores(&mut enc, &cores)?;
        self.encode_peers(&mut enc, &cores)
    }
}

impl Lu2kCollector {
    fn encode_cores(
        &self,
        enc: &mut DescriptorEncoder,
        cores: &[CoreStats],
    ) -> Result<(), std::fmt::Error> {
        let core = |c: &CoreStats| vec![("core", c.core.to_string())];
        let per_core = |f: fn(&CoreStats) -> u64| -> Vec<(Labels, ConstCounter<u64>)> {
            cores.iter().map(|c| counter(core(c), f(c))).collect()
        };
        let counters: [CoreCounter; 16] = [
            (
                "lu2k_core_tx_descriptors",
                "TX descriptors taken from kshim's ring.",
                None,
                |c| c.tx_descs,
            ),
            (
                "lu2k_core_tx_completions",
                "TX completions written back to kshim.",
                None,
                |c| c.tx_completions,
            ),
            (
                "lu2k_core_rx_descriptors",
                "RX descriptors (received messages) published to kshim.",
                None,
                |c| c.rx_descs,
            ),
            (
                "lu2k_core_rx_buffer_returns",
                "RX buffer returns from kshim.",
                None,
                |c| c.rx_returns,
            ),
            (
                "lu2k_core_sent",
                "Bytes sent on the wire (headers and payload).",
                Some(Unit::Bytes),
                |c| c.io.bytes_sent,
            ),
            (
                "lu2k_core_received",
                "Bytes received from the wire.",
                Some(Unit::Bytes),
                |c| c.io.bytes_received,
            ),
            (
                "lu2k_core_datagrams_sent",
                "Datagrams sent (GSO segments one by one).",
                None,
                |c| c.io.datagrams_sent,
            ),
            (
                "lu2k_core_payload_copied",
                "Payload bytes lu2k copied itself (0 on a healthy engine).",
                Some(Unit::Bytes),
                |c| c.payload_copied + c.io.payload_copied,
            ),
            (
                "lu2k_core_zero_copy_copied_sends",
                "Zero-copy sends the kernel reported it copied anyway.",
                None,
                |c| c.io.zc_copied,
            ),
            (
                "lu2k_core_rx_starved",
                "Times receiving stopped because every RX buffer was in use.",
                None,
                |c| c.io.rx_starved,
            ),
            (
                "lu2k_core_socket_drops",
                "Datagrams the kernel dropped on a full socket receive queue.",
                None,
                |c| c.io.socket_drops,
            ),
            (
                "lu2k_core_send_errors",
                "Send operations that failed.",
                None,
                |c| c.io.send_errors,
            ),
            (
                "lu2k_core_loop_passes",
                "Passes of the core's loop.",
                None,
                |c| c.passes,
            ),
            (
                "lu2k_core_sleeps",
                "Times the core slept on its doorbell.",
                None,
                |c| c.sleeps,
            ),
            (
                "lu2k_core_gathered_waits",
                "Sleeps that let completions gather before waking (the kernel's minimum wait).",
                None,
                |c| c.io.gathered_waits,
            ),
            (
                "lu2k_core_rx_table_waits",
                "Received messages that waited for a free RX extent table.",
                None,
                |c| c.rx_table_waits,
            ),
        ];
        for (name, help, unit, f) in counters {
            family(enc, name, help, unit, per_core(f))?;
        }
        family(
            enc,
            "lu2k_core_spin",
            "Seconds the core spun on its rings without work before sleeping.",
            Some(Unit::Seconds),
            cores
                .iter()
                .map(|c| (core(c), ConstCounter::new(c.spin_us as f64 / 1e6)))
                .collect(),
        )?;
        let mut drops = Vec::new();
        for c in cores {
            for (why, n) in &c.drops {
                let mut l = core(c);
                l.push(("reason", why.clone()));
                drops.push(counter(l, *n));
            }
        }
        family(
            enc,
            "lu2k_core_drops",
            "Packets or descriptors dropped, by reason.",
            None,
            drops,
        )?;
        // The sealed wire's refusals are core drops named `rx_sec_<reason>`;
        // a family of their own keeps the reason labels the peers' use.
        let mut rejected = Vec::new();
        for c in cores {
            for (why, n) in &c.drops {
                if let Some(r) = why.strip_prefix(SEC_DROP_PREFIX) {
                    let mut l = core(c);
                    l.push(("reason", r.to_string()));
                    rejected.push(counter(l, *n));
                }
            }
        }
        family(
            enc,
            "lu2k_core_security_rejected",
            "Datagrams the sealed wire refused on the core, by reason (from peers and strangers).",
            None,
            rejected,
        )?;
        family(
            enc,
            "lu2k_core_sealed",
            "Plaintext bytes (UDT headers and payload) sealed by the cipher.",
            Some(Unit::Bytes),
            per_core(|c| c.sealed_bytes),
        )?;
        family(
            enc,
            "lu2k_core_opened",
            "Plaintext bytes opened in place in RX buffers.",
            Some(Unit::Bytes),
            per_core(|c| c.opened_bytes),
        )?;
        let gauges: [CoreGauge; 4] = [
            (
                "lu2k_core_rx_pool_buffers",
                "RX buffers of the core's share of kshim's RX pool.",
                |c| c.rx_pool_buffers,
            ),
            (
                "lu2k_core_rx_pool_held_buffers",
                "RX buffers holding received messages (with kshim or awaiting a table).",
                |c| c.rx_pool_held,
            ),
            (
                "lu2k_core_tx_message_slots",
                "Messages the core takes in flight at most.",
                |c| c.tx_msg_slots,
            ),
            (
                "lu2k_core_tx_messages_in_flight",
                "Messages taken from kshim and not yet completed.",
                |c| c.tx_msgs_in_flight,
            ),
        ];
        for (name, help, f) in gauges {
            let v = cores.iter().map(|c| gauge(core(c), f(c))).collect();
            family(enc, name, help, None, v)?;
        }
        Ok(())
    }

    fn encode_peers(
        &self,
        enc: &mut DescriptorEncoder,
        cores: &[CoreStats],
    ) -> Result<(), std::fmt::Error> {
        let (peers, [up, down, folded]) = self.peers(cores);
        family(
            enc,
            "lu2k_peers",
            "Peers known to the engine, by state.",
            None,
            vec![
                gauge(vec![("state", "up".into())], up),
                gauge(vec![("state", "down".into())], down),
            ],
        )?;
        family(
            enc,
            "lu2k_peer_labels_folded",
            "Peers beyond the label cap, whose series are summed under the nid label _other.",
            None,
            vec![gauge(vec![], folded)],
        )?;
        let nid = |n: &str| vec![("nid", n.to_string())];
        let named = || peers.iter().filter(|(n, _)| n.as_str() != OTHER_PEERS);
        family(
            enc,
            "lu2k_peer_up",
            "1 while the peer answers, 0 once reported down.",
            None,
            named()
                .map(|(n, p)| gauge(nid(n), i64::from(p.up)))
                .collect(),
        )?;
        let counters: [PeerCounter; 6] = [
            (
                "lu2k_peer_sent_messages",
                "Messages sent to the peer and acknowledged.",
                None,
                |p| p.msgs_tx,
            ),
            (
                "lu2k_peer_received_messages",
                "Messages received from the peer.",
                None,
                |p| p.msgs_rx,
            ),
            (
                "lu2k_peer_sent_payload",
                "Payload bytes sent to the peer and acknowledged.",
                Some(Unit::Bytes),
                |p| p.bytes_tx,
            ),
            (
                "lu2k_peer_received_payload",
                "Payload bytes received from the peer.",
                Some(Unit::Bytes),
                |p| p.bytes_rx,
            ),
            (
                "lu2k_peer_retransmissions",
                "Packets retransmitted to the peer.",
                None,
                |p| p.retransmissions,
            ),
            (
                "lu2k_peer_send_errors",
                "Errors the kernel reported for sends to the peer.",
                None,
                |p| p.errors,
            ),
        ];
        for (name, help, unit, f) in counters {
            let v = peers.iter().map(|(n, p)| counter(nid(n), f(p))).collect();
            family(enc, name, help, unit, v)?;
        }
        let mut failed = Vec::new();
        for (n, p) in &peers {
            for (why, v) in &p.failed {
                let mut l = nid(n);
                l.push(("reason", why.clone()));
                failed.push(counter(l, *v));
            }
        }
        family(
            enc,
            "lu2k_peer_failed_messages",
            "Messages to the peer failed back to kshim, by reason.",
            None,
            failed,
        )?;
        family(
            enc,
            "lu2k_peer_security",
            "1 for the peer's wire security mode (required: sealed; off: plain UDT4).",
            None,
            named()
                .filter(|(_, p)| !p.security.is_empty())
                .map(|(n, p)| {
                    let mut l = nid(n);
                    l.push(("mode", p.security.clone()));
                    gauge(l, 1i64)
                })
                .collect(),
        )?;
        let mut rejected = Vec::new();
        for (n, p) in &peers {
            for (why, v) in &p.rejected {
                let mut l = nid(n);
                l.push(("reason", why.clone()));
                rejected.push(counter(l, *v));
            }
        }
        family(
            enc,
            "lu2k_peer_security_rejected",
            "Datagrams from the peer's address the sealed wire refused, by reason.",
            None,
            rejected,
        )?;
        family(
            enc,
            "lu2k_peer_rekeys",
            "Key changes of the peer's sealed connections, both directions.",
            None,
            peers
                .iter()
                .map(|(n, p)| counter(nid(n), p.rekeys))
                .collect(),
        )?;
        family(
            enc,
            "lu2k_peer_rtt",
            "Smoothed round-trip time to the peer.",
            Some(Unit::Seconds),
            named()
                .map(|(n, p)| gauge(nid(n), p.rtt_us as f64 / 1e6))
                .collect(),
        )?;
        family(
            enc,
            "lu2k_peer_send_rate",
            "The congestion control's current sending rate to the peer.",
            Some(Unit::Other("bytes_per_second".into())),
            peers
                .iter()
                .map(|(n, p)| gauge(nid(n), p.rate_bps as f64 / 8.0))
                .collect(),
        )?;
        family(
            enc,
            "lu2k_peer_messages_in_flight",
            "Messages to the peer sent and not yet acknowledged.",
            None,
            peers
                .iter()
                .map(|(n, p)| gauge(nid(n), p.in_flight))
                .collect(),
        )?;
        encode_links(enc, cores)
    }
}

/// The links of multi-link peers (`transport::links`), labels `nid` and
/// `link` (its index in the configuration, at most 8 per peer; only peers
/// configured with links have any).
fn encode_links(enc: &mut DescriptorEncoder, cores: &[CoreStats]) -> Result<(), std::fmt::Error> {
    let links: Vec<(Labels, &crate::transport::links::LinkStats)> = cores
        .iter()
        .flat_map(|c| c.peers.iter())
        .flat_map(|p| {
            p.links.iter().enumerate().map(move |(i, l)| {
                let labels: Labels = vec![("nid", p.nid.clone()), ("link", i.to_string())];
                (labels, l)
            })
        })
        .collect();
    family(
        enc,
        "lu2k_link_up",
        "1 while the link is up, 0 while it is down or connecting.",
        None,
        links
            .iter()
            .map(|(k, l)| gauge(k.clone(), i64::from(l.state == "up")))
            .collect(),
    )?;
    family(
        enc,
        "lu2k_link_sent_messages",
        "Messages acknowledged over the link.",
        None,
        links
            .iter()
            .map(|(k, l)| counter(k.clone(), l.msgs_acked))
            .collect(),
    )?;
    family(
        enc,
        "lu2k_link_moved_messages",
        "Messages moved off the link to another when it went silent or closed.",
        None,
        links
            .iter()
            .map(|(k, l)| counter(k.clone(), l.msgs_moved_off))
            .collect(),
    )?;
    family(
        enc,
        "lu2k_link_downs",
        "Times the link went down.",
        None,
        links
            .iter()
            .map(|(k, l)| counter(k.clone(), l.downs))
            .collect(),
    )?;
    family(
        enc,
        "lu2k_link_rate",
        "The link's measured rate (acknowledged bytes while it had work).",
        Some(Unit::Other("bytes_per_second".into())),
        links
            .iter()
            .map(|(k, l)| gauge(k.clone(), l.rate_bps as f64 / 8.0))
            .collect(),
    )
}

/// The text of one scrape.
fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// Serves `/metrics` until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl MetricsServer {
    /// Binds `addr` and serves the cores' `slots` on a thread of its own.
    pub fn start(
        addr: SocketAddr,
        slots: Vec<Published>,
        info: EngineInfo,
        draining: Arc<AtomicBool>,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Lu2kCollector {
            slots,
            info,
            started: Instant::now(),
            draining,
            labelled: Mutex::new(BTreeSet::new()),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lu2k-metrics".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if let Err(e) = answer(s, &registry) {
                                tracing::debug!("metrics: a scrape failed: {e}");
                            }
                        }
                        // Sleep until a client connects, looking at the stop flag
                        // every 200 ms: a scrape is answered at once.
                        Err(_) => wait_readable(&listener, 200),
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it serves (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to `ms` milliseconds for `fd` to become readable.
pub(crate) fn wait_readable(fd: &impl std::os::fd::AsFd, ms: i64) {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let t = rustix::time::Timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    let _ = poll(&mut fds, Some(&t));
}

/// Answers one HTTP/1.x request and closes: `GET /metrics` gets the
/// exposition, anything else a short error. A slow or silent client is cut off
/// after two seconds, so it cannot hold the server.
fn answer(s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.by_ref().take(8192).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    // The headers are read and ignored (bounded), so the client sees its
    // request consumed before the answer.
    let mut h = String::new();
    for _ in 0..100 {
        h.clear();
        if r.by_ref().take(8192).read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, exposition(registry)),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "lu2k-engine serves /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "use GET /metrics\n".to_string(),
        ),
    };
    let mut w = s;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    w.write_all(body.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::stats::PeerStats;

    fn collector(cores: Vec<CoreStats>) -> Registry {
        let slots = cores.into_iter().map(|c| Arc::new(Mutex::new(c))).collect();
        let mut r = Registry::default();
        r.register_collector(Box::new(Lu2kCollector {
            slots,
            info: EngineInfo {
                version: "0.1.0".into(),
                backend: "udt".into(),
                io_path: "io_uring".into(),
            },
            started: Instant::now(),
            draining: Arc::new(AtomicBool::new(false)),
            labelled: Mutex::new(BTreeSet::new()),
        }));
        r
    }

    #[test]
    fn names_units_and_labels() {
        let mut c = CoreStats {
            core: 1,
            ..CoreStats::default()
        };
        c.io.bytes_sent = 1500;
        c.drop_one("rx_malformed");
        c.drop_one("rx_sec_unknown_connection");
        c.drop_one("rx_sec_bad_tag");
        c.sealed_bytes = 4096;
        c.peers.push(PeerStats {
            nid: "10.0.0.2@lu2k".into(),
            up: true,
            rtt_us: 600_000,
            rate_bps: 8_000_000,
            security: "required".into(),
            rejected: [("bad_tag".to_string(), 1)].into(),
            rekeys: 3,
            ..PeerStats::default()
        });
        let text = exposition(&collector(vec![c]));
        for want in [
            "lu2k_info{version=\"0.1.0\",backend=\"udt\",io_path=\"io_uring\"} 1",
            "# TYPE lu2k_core_sent_bytes counter",
            "lu2k_core_sent_bytes_total{core=\"1\"} 1500",
            "lu2k_core_drops_total{core=\"1\",reason=\"rx_malformed\"} 1",
            "lu2k_peer_up{nid=\"10.0.0.2@lu2k\"} 1",
            "lu2k_peer_rtt_seconds{nid=\"10.0.0.2@lu2k\"} 0.6",
            "lu2k_peer_send_rate_bytes_per_second{nid=\"10.0.0.2@lu2k\"} 1000000.0",
            "lu2k_peers{state=\"up\"} 1",
            "lu2k_peer_security{nid=\"10.0.0.2@lu2k\",mode=\"required\"} 1",
            "lu2k_peer_security_rejected_total{nid=\"10.0.0.2@lu2k\",reason=\"bad_tag\"} 1",
            "lu2k_peer_rekeys_total{nid=\"10.0.0.2@lu2k\"} 3",
            "lu2k_core_security_rejected_total{core=\"1\",reason=\"unknown_connection\"} 1",
            "lu2k_core_security_rejected_total{core=\"1\",reason=\"bad_tag\"} 1",
            "lu2k_core_sealed_bytes_total{core=\"1\"} 4096",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn links_of_a_multi_link_peer() {
        use crate::transport::links::LinkStats;
        let mut c = CoreStats::default();
        let link = |state: &str, acked, moved, downs| LinkStats {
            state: state.into(),
            msgs_acked: acked,
            msgs_moved_off: moved,
            downs,
            rate_bps: 80_000_000,
            ..LinkStats::default()
        };
        c.peers.push(PeerStats {
            nid: "10.0.0.2@lu2k".into(),
            links: vec![link("down", 5, 3, 1), link("up", 9, 0, 0)],
            ..PeerStats::default()
        });
        let text = exposition(&collector(vec![c]));
        for want in [
            "lu2k_link_up{nid=\"10.0.0.2@lu2k\",link=\"0\"} 0",
            "lu2k_link_up{nid=\"10.0.0.2@lu2k\",link=\"1\"} 1",
            "lu2k_link_sent_messages_total{nid=\"10.0.0.2@lu2k\",link=\"1\"} 9",
            "lu2k_link_moved_messages_total{nid=\"10.0.0.2@lu2k\",link=\"0\"} 3",
            "lu2k_link_downs_total{nid=\"10.0.0.2@lu2k\",link=\"0\"} 1",
            "lu2k_link_rate_bytes_per_second{nid=\"10.0.0.2@lu2k\",link=\"1\"} 10000000.0",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    /// Peers beyond the cap share one label; a peer that had a label keeps it
    /// even when peers sorting before it appear later.
    #[test]
    fn peer_labels_are_capped_and_sticky() {
        let peers = |range: std::ops::Range<usize>| -> Vec<PeerStats> {
            range
                .map(|i| PeerStats {
                    nid: format!("10.1.{}.{}@lu2k", i / 250, 1 + i % 250),
                    msgs_tx: 1,
                    ..PeerStats::default()
                })
                .collect()
        };
        let core = Arc::new(Mutex::new(CoreStats {
            peers: peers(10..10 + MAX_PEER_LABELS),
            ..CoreStats::default()
        }));
        let mut r = Registry::default();
        r.register_collector(Box::new(Lu2kCollector {
            slots: vec![core.clone()],
            info: EngineInfo {
                version: "0".into(),
                backend: "udt".into(),
                io_path: "epoll".into(),
            },
            started: Instant::now(),
            draining: Arc::new(AtomicBool::new(false)),
            labelled: Mutex::new(BTreeSet::new()),
        }));
        let first = exposition(&r);
        assert!(!first.contains("nid=\"_other\""), "{first}");
        core.lock().unwrap().peers.extend(peers(0..10));
        let text = exposition(&r);
        let series = text
            .lines()
            .filter(|l| l.starts_with("lu2k_peer_sent_messages_total{"))
            .count();
        assert_eq!(series, MAX_PEER_LABELS + 1, "{text}");
        assert!(text.contains("lu2k_peer_sent_messages_total{nid=\"_other\"} 10"));
        assert!(text.contains("lu2k_peer_labels_folded 10"), "{text}");
        // The first peers seen keep theirs.
        assert!(text.contains("nid=\"10.1.0.11@lu2k\""));
        assert!(!text.contains("nid=\"10.1.0.1@lu2k\""));
    }
}
