//! Statistics: per-core and per-peer counters, served as JSON over a local Unix
//! socket and printed by `lu2k-engine stats`.
//!
//! Each core thread owns its counters and publishes a snapshot into its own slot
//! ([`Published`]) every few milliseconds and at exit; the server thread reads the
//! slots when a client connects. The slot's mutex is taken by one core and the server
//! only, never on the per-message path. A client connects, the server writes one JSON
//! document ([`Report`]) and closes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::io::IoStats;

/// Counters of one peer, as seen by the core that owns it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peer's NID, printed.
    pub nid: String,
    /// Its UDP address.
    pub addr: String,
    /// Up, or reported down.
    pub up: bool,
    /// Messages sent and acknowledged.
    pub msgs_tx: u64,
    /// Messages received and published.
    pub msgs_rx: u64,
    /// Payload bytes sent (acknowledged).
    pub bytes_tx: u64,
    /// Payload bytes received.
    pub bytes_rx: u64,
    /// Messages in flight now.
    pub in_flight: u64,
    /// Packets retransmitted.
    pub retransmissions: u64,
    /// Smoothed RTT, microseconds.
    pub rtt_us: u64,
    /// Current send rate estimate, bits per second.
    pub rate_bps: u64,
    /// Messages failed back, by reason.
    pub failed: BTreeMap<String, u64>,
    /// Errors the kernel reported for sends to the peer (failed sends, ICMP errors).
    #[serde(default)]
    pub errors: u64,
    /// The last of them, in words (e.g. "Connection refused (os error 111)").
    #[serde(default)]
    pub last_error: Option<String>,
    /// The wire's security: "required" (sealed) or "off" (plain UDT4).
    #[serde(default)]
    pub security: String,
    /// Datagrams from the peer's address the sealed wire refused, by reason
    /// (`bad_tag`, `replay`, `unknown_connection`, `unvalidated_address`,
    /// `plain_refused`, `wire_version` (another sealed wire version), `bad_handshake`,
    /// `reflected_handshake` (this node's own
    /// handshake sent back to it), `replayed_handshake` (a client handshake
    /// repeated once its connection's keys are in use, or within 200 ms),
    /// `handshake_refused`: the listener's rate limits and caps).
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
    /// Key changes of the peer's connections, both directions.
    #[serde(default)]
    pub rekeys: u64,
    /// Times the path to the peer was held dead (no ACK or NAK for an RTO
    /// with data in flight): sending stopped but for probes.
    #[serde(default)]
    pub outages: u64,
    /// Probe packets sent into a dead path.
    #[serde(default)]
    pub outage_probes: u64,
    /// Time the path was held dead, microseconds.
    #[serde(default)]
    pub outage_us: u64,
    /// Tail probes: a burst's last packet resent because nothing had
    /// acknowledged it two round trips after it left (counted in
    /// `retransmissions` too).
    #[serde(default)]
    pub tail_probes: u64,
    /// A multi-link peer's links, in configuration order (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::transport::links::LinkStats>,
}

/// Forward error correction counters of one core (see the engine README,
/// "Forward error correction").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FecStats {
    /// Data datagram bytes the encoder read from TX memory and coded (the
    /// codec's pass over the payload, not a copy on the delivery path).
    pub coded_bytes: u64,
    /// Repair datagrams sent, and their bytes.
    pub repairs_sent: u64,
    pub repair_bytes: u64,
    /// Repairs the overhead budget left out.
    pub repairs_over_budget: u64,
    /// Repairs dropped while waiting for a scratch slot or the I/O layer.
    pub repairs_dropped: u64,
    /// Data datagram bytes the decoder kept a copy of (to rebuild from).
    pub kept_bytes: u64,
    /// Repair datagrams received, and refused (malformed, or contradicting
    /// their group).
    pub repairs_received: u64,
    pub bad_repairs: u64,
    /// Data packets rebuilt and handed to their connection.
    pub rebuilt: u64,
    /// Rebuilt packets the connection did not need (the packet or its
    /// retransmission had arrived).
    pub rebuilt_unneeded: u64,
    /// Rebuilt packets dropped for want of a held repair buffer to put them
    /// in (retransmission repairs them).
    pub rebuilt_no_room: u64,
    /// Groups that had losses and too few repairs.
    pub groups_unrecoverable: u64,
    /// The loss rate repairs are sized for, per mille (the highest of the
    /// core's sending connections).
    pub loss_permille: f64,
}

/// Counters of one core.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreStats {
    /// Core index.
    pub core: usize,
    /// I/O path ("io_uring" or "epoll").
    pub io_path: String,
    /// How the core sleeps on kshim's doorbell ("eventfd" or "futex").
    #[serde(default)]
    pub doorbell: String,
    /// TX descriptors taken from the ring.
    pub tx_descs: u64,
    /// TX completions written.
    pub tx_completions: u64,
    /// RX descriptors published.
    pub rx_descs: u64,
    /// RX buffers returned by kshim.
    pub rx_returns: u64,
    /// Drops (packets or descriptors), by reason.
    pub drops: BTreeMap<String, u64>,
    /// Payload bytes lu2k copied (must be 0 on the fast path).
    pub payload_copied: u64,
    /// Received messages that waited for a free RX extent table.
    pub rx_table_waits: u64,
    /// Times this core went to sleep on its doorbell.
    pub sleeps: u64,
    /// Passes of the core's loop.
    #[serde(default)]
    pub passes: u64,
    /// Microseconds the core spun (polled without work) before its sleeps.
    #[serde(default)]
    pub spin_us: u64,
    /// RX buffers of this core's share of kshim's RX pool.
    #[serde(default)]
    pub rx_pool_buffers: u64,
    /// Of those, buffers holding received messages: published to kshim and not yet
    /// returned, or waiting for an RX extent table. When this nears
    /// `rx_pool_buffers` receiving stalls (`io.rx_starved`).
    #[serde(default)]
    pub rx_pool_held: u64,
    /// Message slots of the core (the most messages it takes in flight).
    #[serde(default)]
    pub tx_msg_slots: u64,
    /// Messages accepted from kshim's TX ring and not yet completed.
    #[serde(default)]
    pub tx_msgs_in_flight: u64,
    /// Plaintext bytes (UDT headers and payload) sealed by the cipher on the
    /// sealed wire; the cipher writes them into the core's seal scratch as it
    /// encrypts, which is not counted as a copy (`payload_copied` counts only
    /// payload gathered into the scratch before the cipher's pass).
    #[serde(default)]
    pub sealed_bytes: u64,
    /// Plaintext bytes opened in place in RX buffers on the sealed wire.
    #[serde(default)]
    pub opened_bytes: u64,
    /// Forward error correction (peers with `fec` set).
    #[serde(default)]
    pub fec: FecStats,
    /// Datagram I/O counters.
    pub io: IoStats,
    /// Per-peer counters.
    pub peers: Vec<PeerStats>,
}

impl CoreStats {
    /// Adds one drop of `reason`.
    pub fn drop_one(&mut self, reason: &str) {
        *self.drops.entry(reason.to_string()).or_default() += 1;
    }
}

/// What `stats` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Engine version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Path in use.
    pub io_path: String,
    /// Shutting down.
    pub draining: bool,
    /// Per core.
    pub cores: Vec<CoreStats>,
}

impl Report {
    /// Sum of payload bytes copied by lu2k over all cores.
    pub fn payload_copied(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.payload_copied + c.io.payload_copied)
            .sum()
    }
}

/// A core's published snapshot slot.
pub type Published = Arc<Mutex<CoreStats>>;

/// Serves [`Report`]s on a Unix socket until dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (replacing a stale socket file) and serves the given slots.
    pub fn start(
        path: &Path,
        slots: Vec<Published>,
        io_path: String,
        draining: Arc<AtomicBool>,
    ) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() && UnixStream::connect(path).is_err() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let started = std::time::Instant::now();
        let thread = std::thread::Builder::new()
            .name("lu2k-stats".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let r = Report {
                                version: env!("CARGO_PKG_VERSION").into(),
                                uptime_s: started.elapsed().as_secs_f64(),
                                io_path: io_path.clone(),
                                draining: draining.load(Ordering::Relaxed),
                                cores: slots
                                    .iter()
                                    .map(|s| s.lock().map(|g| g.clone()).unwrap_or_default())
                                    .collect(),
                            };
                            let _ = s.set_nonblocking(false);
                            let _ = serde_json::to_writer(&mut s, &r);
                            let _ = s.flush();
                        }
                        // Sleep until a client connects, looking at the stop flag
                        // every 200 ms: a request is answered at once, and an idle
                        // engine's stats thread wakes 5 times a second, not 50.
                        Err(_) => super::metrics::wait_readable(&listener, 200),
                    }
                }
            })?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one report from a running engine.
pub fn fetch(path: &Path) -> std::io::Result<Report> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    serde_json::from_str(&buf).map_err(std::io::Error::other)
}

/// Human-readable rendering of a report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "lu2k-engine {}  up {:.1} s  path {}{}",
        r.version,
        r.uptime_s,
        r.io_path,
        if r.draining { "  (draining)" } else { "" }
    );
    let _ = writeln!(o, "payload bytes copied by lu2k: {}", r.payload_copied());
    let _ = writeln!(
        o,
        "{:>4} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9}  drops",
        "core",
        "tx_descs",
        "tx_done",
        "rx_descs",
        "rx_ret",
        "bytes_sent",
        "bytes_recv",
        "zc_copied",
        "starved",
        "sock_drop"
    );
    for c in &r.cores {
        let _ = writeln!(
            o,
            "{:>4} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9}  {:?}",
            c.core,
            c.tx_descs,
            c.tx_completions,
            c.rx_descs,
            c.rx_returns,
            c.io.bytes_sent,
            c.io.bytes_received,
            c.io.zc_copied,
            c.io.rx_starved,
            c.io.socket_drops,
            c.drops
        );
    }
    // RX memory: receives cut into datagram-sized pieces fall back to whole
    // buffers on a GRO batch or oversize datagram; cold free buffers' pages go back.
    for c in &r.cores {
        let io = &c.io;
        if io.rx_truncated + io.rx_slice_fallbacks + io.rx_bufs_released > 0 {
            let _ = writeln!(
                o,
                "core {} rx memory: {} truncated, {} fallbacks to whole buffers, {} buffers' \
                 pages given back",
                c.core, io.rx_truncated, io.rx_slice_fallbacks, io.rx_bufs_released
            );
        }
    }
    // Where a core's time goes while it waits. Blocking waits by cause (`io.wakes`)
    // sum to at most `sleeps` while the engine runs (a sleep that finds kshim's
    // rings busy at its re-check does not block); a draining core adds its own.
    let _ = writeln!(
        o,
        "{:>4} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "core",
        "passes",
        "sleeps",
        "spin_ms",
        "wk_bell",
        "wk_dgram",
        "wk_sent",
        "wk_timer",
        "wk_none",
        "enters",
        "tmr_arm",
        "tmr_fire",
        "dgram/snd",
        "gathered"
    );
    for c in &r.cores {
        let w = &c.io.wakes;
        let per_send = if c.io.sends == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", c.io.datagrams_sent as f64 / c.io.sends as f64)
        };
        let _ = writeln!(
            o,
            "{:>4} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
            c.core,
            c.passes,
            c.sleeps,
            c.spin_us / 1000,
            w.doorbell,
            w.datagram,
            w.send_done,
            w.timer,
            w.none,
            // One path runs: io_uring_enter or epoll_wait calls.
            c.io.enters + c.io.epoll_waits,
            c.io.timers_armed,
            c.io.timers_fired,
            per_send,
            c.io.gathered_waits
        );
    }
    // The sealed wire per core: what the cipher passed, and every datagram it
    // refused (a stranger's too, which no peer row can show).
    for c in &r.cores {
        let rejected: BTreeMap<&str, u64> = c
            .drops
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("rx_sec_").map(|r| (r, *v)))
            .collect();
        if c.sealed_bytes > 0 || c.opened_bytes > 0 || !rejected.is_empty() {
            let _ = writeln!(
                o,
                "core {} sealed wire: sealed {} B  opened {} B  rejected {:?}",
                c.core, c.sealed_bytes, c.opened_bytes, rejected
            );
        }
    }
    for c in &r.cores {
        let f = &c.fec;
        if f.coded_bytes > 0 || f.repairs_received > 0 || f.bad_repairs > 0 {
            let extra = if f.coded_bytes > 0 {
                100.0 * f.repair_bytes as f64 / f.coded_bytes as f64
            } else {
                0.0
            };
            let _ = writeln!(
                o,
                "core {} fec: coded {} B  repairs sent {} ({} B, {:.1} % of coded; {} over budget; \
                 sized for {:.1} \u{2030} loss)  repairs received {} (bad {})  kept {} B  \
                 rebuilt {} (unneeded {}, no room {})  groups short {}",
                c.core,
                f.coded_bytes,
                f.repairs_sent,
                f.repair_bytes,
                extra,
                f.repairs_over_budget,
                f.loss_permille,
                f.repairs_received,
                f.bad_repairs,
                f.kept_bytes,
                f.rebuilt,
                f.rebuilt_unneeded,
                f.rebuilt_no_room,
                f.groups_unrecoverable
            );
        }
    }
    let peers: Vec<_> = r
        .cores
        .iter()
        .flat_map(|c| c.peers.iter().map(move |p| (c.core, p)))
        .collect();
    if !peers.is_empty() {
        let _ = writeln!(
            o,
            "{:<22} {:>4} {:>4} {:>9} {:>9} {:>12} {:>12} {:>7} {:>8} {:>9} {:>12}  failed",
            "peer",
            "core",
            "up",
            "msgs_tx",
            "msgs_rx",
            "bytes_tx",
            "bytes_rx",
            "inflt",
            "retrans",
            "rtt_us",
            "rate_bps"
        );
        for (core, p) in peers {
            let _ = writeln!(
                o,
                "{:<22} {:>4} {:>4} {:>9} {:>9} {:>12} {:>12} {:>7} {:>8} {:>9} {:>12}  {:?}",
                p.nid,
                core,
                if p.up { "yes" } else { "DOWN" },
                p.msgs_tx,
                p.msgs_rx,
                p.bytes_tx,
                p.bytes_rx,
                p.in_flight,
                p.retransmissions,
                p.rtt_us,
                p.rate_bps,
                p.failed
            );
            if let Some(e) = &p.last_error {
                let _ = writeln!(o, "{:<22} kernel errors {}, last: {e}", "", p.errors);
            }
            if p.outages > 0 || p.tail_probes > 0 {
                let _ = writeln!(
                    o,
                    "{:<22} outages {}  probes {}  dead {} ms  tail probes {}",
                    "",
                    p.outages,
                    p.outage_probes,
                    p.outage_us / 1000,
                    p.tail_probes
                );
            }
            if !p.security.is_empty() {
                let _ = writeln!(
                    o,
                    "{:<22} security {}  rekeys {}  rejected {:?}",
                    "", p.security, p.rekeys, p.rejected
                );
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Wakes;

    #[test]
    fn render_shows_rx_memory_only_where_it_moved() {
        let moved = CoreStats {
            core: 1,
            io: IoStats {
                rx_truncated: 3,
                rx_slice_fallbacks: 1,
                rx_bufs_released: 40,
                ..IoStats::default()
            },
            ..CoreStats::default()
        };
        let r = Report {
            cores: vec![CoreStats::default(), moved],
            ..Report::default()
        };
        let text = render(&r);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("rx memory")).collect();
        assert_eq!(
            lines,
            ["core 1 rx memory: 3 truncated, 1 fallbacks to whole buffers, 40 buffers' pages given back"]
        );
    }

    #[test]
    fn render_shows_where_waiting_goes() {
        let core = CoreStats {
            core: 0,
            io_path: "io_uring".into(),
            passes: 123_456,
            sleeps: 4_000,
            spin_us: 250_000,
            io: IoStats {
                sends: 400,
                datagrams_sent: 1_000,
                enters: 9_876,
                timers_armed: 3_000,
                timers_fired: 2_500,
                gathered_waits: 77,
                wakes: Wakes {
                    doorbell: 11,
                    datagram: 22,
                    send_done: 33,
                    timer: 2_400,
                    none: 5,
                },
                ..IoStats::default()
            },
            ..CoreStats::default()
        };
        let idle = CoreStats {
            core: 1,
            ..CoreStats::default()
        };
        let r = Report {
            version: "0".into(),
            io_path: "io_uring".into(),
            cores: vec![core, idle],
            ..Report::default()
        };
        let text = render(&r);
        let head = text
            .lines()
            .find(|l| l.contains("passes"))
            .expect("waiting table");
        let cols: Vec<&str> = head.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "core",
                "passes",
                "sleeps",
                "spin_ms",
                "wk_bell",
                "wk_dgram",
                "wk_sent",
                "wk_timer",
                "wk_none",
                "enters",
                "tmr_arm",
                "tmr_fire",
                "dgram/snd",
                "gathered"
            ]
        );
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.contains("passes"))
            .skip(1)
            .take(2)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "0", "123456", "4000", "250", "11", "22", "33", "2400", "5", "9876", "3000",
                "2500", "2.50", "77"
            ]
        );
        // No sends: no ratio to show.
        assert_eq!(rows[1][0], "1");
        assert_eq!(rows[1][12], "-");
    }

    /// The sealed wire's counters: per core (strangers' datagrams included)
    /// and per peer (mode, refusals, key changes).
    #[test]
    fn render_shows_the_sealed_wire() {
        let mut core = CoreStats {
            core: 0,
            sealed_bytes: 1000,
            opened_bytes: 2000,
            ..CoreStats::default()
        };
        core.drop_one("rx_sec_unvalidated_address");
        core.drop_one("rx_sec_unknown_connection");
        core.drop_one("rx_sec_unknown_connection");
        core.drop_one("rx_malformed");
        core.peers.push(PeerStats {
            nid: "10.0.0.2@lu2k".into(),
            up: true,
            security: "required".into(),
            rekeys: 4,
            rejected: [("bad_tag".to_string(), 7), ("replay".to_string(), 1)].into(),
            ..PeerStats::default()
        });
        let plain = CoreStats {
            core: 1,
            ..CoreStats::default()
        };
        let text = render(&Report {
            cores: vec![core, plain],
            ..Report::default()
        });
        assert!(
            text.contains(
                "core 0 sealed wire: sealed 1000 B  opened 2000 B  rejected \
                 {\"unknown_connection\": 2, \"unvalidated_address\": 1}"
            ),
            "{text}"
        );
        assert!(!text.contains("core 1 sealed wire"), "{text}");
        assert!(
            text.contains("security required  rekeys 4  rejected {\"bad_tag\": 7, \"replay\": 1}"),
            "{text}"
        );
    }

    #[test]
    fn render_shows_fec() {
        let core = CoreStats {
            core: 2,
            fec: FecStats {
                coded_bytes: 1_000_000,
                repairs_sent: 60,
                repair_bytes: 88_000,
                rebuilt: 9,
                loss_permille: 10.0,
                ..FecStats::default()
            },
            ..CoreStats::default()
        };
        let text = render(&Report {
            cores: vec![core, CoreStats::default()],
            ..Report::default()
        });
        assert!(
            text.contains("core 2 fec: coded 1000000 B  repairs sent 60 (88000 B, 8.8 % of coded"),
            "{text}"
        );
        assert!(text.contains("rebuilt 9 (unneeded 0, no room 0)"), "{text}");
        assert!(!text.contains("core 0 fec"), "{text}");
    }

    #[test]
    fn a_report_without_the_waiting_counters_still_parses() {
        let mut v = serde_json::to_value(Report {
            cores: vec![CoreStats::default()],
            ..Report::default()
        })
        .unwrap();
        let core = v["cores"][0].as_object_mut().unwrap();
        core.remove("passes");
        core.remove("spin_us");
        let io = core["io"].as_object_mut().unwrap();
        for k in [
            "enters",
            "epoll_waits",
            "timers_armed",
            "timers_fired",
            "wakes",
        ] {
            io.remove(k);
        }
        let r: Report = serde_json::from_value(v).unwrap();
        assert_eq!(r.cores[0].passes, 0);
        assert_eq!(r.cores[0].io.wakes, Wakes::default());
    }
}
