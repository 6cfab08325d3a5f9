//! `lu2k-perf soak`: lu2k for a long time on the GEO link (100 Mbit/s, 600 ms
//! round trip, 1 % loss each way: `geo.toml`'s cell), with peers coming and
//! going and the sending engine restarted in the middle, sampling the engines'
//! memory, pool use and message counts; it fails when memory grows, a buffer or
//! message slot is not given back, or a message is lost.
//!
//! The nodes: one receiver `recv` (kshim + engine) with a `[[peer]]` per sender;
//! the main sender `send`, which hands verified 1 MiB PUTs for 90 % of the run and
//! whose engine is stopped with SIGTERM at half time and started again with the
//! same configuration (kshim stays and the new engine attaches to it); and
//! `--churn-peers` further senders `churn1`, `churn2`, … that come for two
//! sessions each (a new kshim and engine per session, gone in between) and send
//! while there. Each sender crosses its own emulated link (linkem's relay is
//! point to point): the main one the GEO cell, the churn peers the same path at
//! `--churn-rate-mbps`. kshim runs in this process as a library (one thread per
//! node), each engine is its own process (`lu2k-perf __engine`, the engine
//! daemon's code), as in the harness's `run`.
//!
//! Every PUT carries a payload derived from (sender, sequence number), which the
//! receiver checks byte for byte. A send that fails back is sent again with the
//! same payload, as LNet resends (at most [`MAX_ATTEMPTS`] times).
//!
//! Pass/fail ([`judge`]):
//! - RSS: per engine process, from the warm-up after the process started on
//!   (warm-up: 10 % of the run, at most 5 min), the least sample of the last
//!   quarter of its samples more than 5 % above the least of the first quarter
//!   fails. RSS follows the data (RX pool pages come with a peer's burst and go
//!   back when it ends), so a peak is load, not growth; a leak raises the floor.
//! - Accounting, once every sender is idle: every engine's RX buffers held and
//!   TX messages in flight are 0, every kshim has no send pending and its TX pool
//!   whole, the receiving kshim gave back every message it was handed.
//! - Messages: each one completed Ok is received exactly once and verified; none
//!   is left without a completion or given up on; no payload differs. A failure
//!   back is allowed only inside the restart window (from the SIGTERM until the
//!   new engine attached) with status `Shutdown` or `EngineGone` (the engine
//!   README's crash and restart): those are counted by status, and a message
//!   failed back that its receiver had anyway (its `Ok` died with the engine)
//!   arrives a second time by the resend, counted as such. Any other failure
//!   back, duplicate, or loss fails the soak.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::{Config, Event, Kshim, Nid, TxStatus};
use lu2k_linkem::{DuplexConfig, Relay, RelayConfig};
use plotters::prelude::*;
use serde::Serialize;

use crate::lu2k::{EnginePeer, EngineSpec, MSG};
use crate::node::self_command;

/// Sends of one message at most (the first and the resends after failures back).
pub const MAX_ATTEMPTS: u32 = 4;
/// RSS growth allowed after warm-up, as a fraction of the baseline.
pub const RSS_GROWTH_LIMIT: f64 = 0.05;
/// Longest warm-up, seconds.
pub const WARMUP_MAX_S: f64 = 300.0;

/// `soak`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long traffic runs, minutes (the restart at half of it, the main sender
    /// stops handing new PUTs at 90 %; draining and the end checks come after).
    #[arg(long, default_value_t = 60.0)]
    pub minutes: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60.0)]
    pub sample_s: f64,
    /// Directory for soak.csv, soak.json and the plots.
    #[arg(long, default_value = "perf-out/soak")]
    pub out: PathBuf,
    /// 1 MiB PUTs the main sender keeps in flight at most.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub in_flight: u32,
    /// Senders that come and go (two sessions each), 0 to 4.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub churn_peers: u32,
    /// Rate of the churn peers' links, Mbit/s (600 ms and 1 % loss as the main link).
    #[arg(long, default_value_t = 10.0)]
    pub churn_rate_mbps: f64,
    /// kshim RX buffers (64 KiB each) per node.
    #[arg(long, default_value_t = 32768)]
    pub rx_bufs: u32,
    /// Seed of the link model.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl SoakArgs {
    fn check(&self) -> Result<()> {
        if !(self.minutes.is_finite() && self.minutes > 0.0 && self.minutes <= 24.0 * 60.0) {
            bail!(
                "--minutes {}: give a duration above 0 and at most 1440 (a day)",
                self.minutes
            );
        }
        if !(self.sample_s.is_finite() && self.sample_s >= 1.0) {
            bail!("--sample-s {}: give at least 1 second", self.sample_s);
        }
        if self.sample_s > self.minutes * 60.0 / 4.0 {
            bail!(
                "--sample-s {} leaves fewer than 4 samples in {} minutes: sample more often",
                self.sample_s,
                self.minutes
            );
        }
        if !(self.churn_rate_mbps.is_finite()
            && self.churn_rate_mbps >= 1.0
            && self.churn_rate_mbps <= 1000.0)
        {
            bail!("--churn-rate-mbps {}: give 1 to 1000", self.churn_rate_mbps);
        }
        if self.rx_bufs < 64 {
            bail!(
                "--rx-bufs {}: at least 64 (one 1 MiB message)",
                self.rx_bufs
            );
        }
        Ok(())
    }
}

/// The warm-up for a run of `run_s` seconds: 10 % of it, at most 5 minutes.
pub fn warmup_s(run_s: f64) -> f64 {
    (run_s * 0.1).min(WARMUP_MAX_S)
}

/// When things happen, in seconds from the start of traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub run_s: f64,
    pub warmup_s: f64,
    /// The main sender's engine gets SIGTERM.
    pub restart_s: f64,
    /// The main sender stops handing new PUTs.
    pub send_end_s: f64,
    /// Per churn peer, its sessions (start, end).
    pub churn: Vec<Vec<(f64, f64)>>,
}

impl Plan {
    pub fn new(run_s: f64, churn_peers: u32) -> Plan {
        let churn = (0..churn_peers)
            .map(|j| {
                let j = f64::from(j);
                vec![
                    ((0.10 + 0.08 * j) * run_s, (0.35 + 0.08 * j) * run_s),
                    ((0.58 + 0.05 * j) * run_s, (0.78 + 0.05 * j) * run_s),
                ]
            })
            .collect();
        Plan {
            run_s,
            warmup_s: warmup_s(run_s),
            restart_s: 0.5 * run_s,
            send_end_s: 0.9 * run_s,
            churn,
        }
    }
}

// ---------------------------------------------------------------- the ledger

/// A failure back of one send.
#[derive(Debug, Clone, Serialize)]
pub struct FailBack {
    pub status: String,
    /// Inside the restart window.
    pub in_restart: bool,
}

/// What happened to one message (sender, sequence number).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MsgState {
    /// Sends handed to kshim.
    pub attempts: u32,
    /// Sends without a completion yet.
    pub pending: u32,
    pub ok: bool,
    pub fails: Vec<FailBack>,
    /// Arrivals at the receiver, intact.
    pub received: u32,
    /// Arrivals whose payload differed.
    pub corrupt: u32,
}

/// Every message of the run.
#[derive(Debug, Default)]
pub struct Ledger {
    pub msgs: BTreeMap<(u32, u64), MsgState>,
}

/// Message counts, for the samples and the summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    /// Sends handed to kshim (resends included).
    pub handed: u64,
    /// Sends completed Ok.
    pub ok: u64,
    /// Sends failed back.
    pub failed: u64,
    /// Arrivals at the receiver (duplicates included).
    pub received: u64,
    /// Arrivals whose payload checked out.
    pub verified: u64,
}

impl Ledger {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for m in self.msgs.values() {
            c.handed += u64::from(m.attempts);
            c.ok += u64::from(m.ok);
            c.failed += m.fails.len() as u64;
            c.received += u64::from(m.received + m.corrupt);
            c.verified += u64::from(m.received);
        }
        c
    }
}

// ------------------------------------------------------------------ judging

/// One process's RSS over time: (seconds since traffic started, VmRSS KiB).
#[derive(Debug, Clone, Serialize)]
pub struct RssSeries {
    pub node: String,
    pub incarnation: u32,
    /// When the process started (seconds since traffic started; negative: before).
    pub started_s: f64,
    pub points: Vec<(f64, u64)>,
    /// RssAnon and RssShmem at the same times, where read: the engine's own
    /// memory, and kshim's pools as far as the engine touched them.
    #[serde(default)]
    pub anon: Vec<(f64, u64)>,
    #[serde(default)]
    pub shmem: Vec<(f64, u64)>,
}

/// The RSS check of one process.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RssGrowth {
    pub node: String,
    pub incarnation: u32,
    /// The least sample of the first quarter after warm-up (the baseline floor).
    pub baseline_s: f64,
    pub baseline_kib: u64,
    /// The least sample of the last quarter (the late floor).
    pub late_s: f64,
    pub late_kib: u64,
    /// The highest sample after warm-up (load, reported, not judged).
    pub peak_s: f64,
    pub peak_kib: u64,
    /// late floor / baseline floor - 1.
    pub growth: f64,
    /// RssAnon and RssShmem at the baseline and at the late floor.
    pub anon_kib: (Option<u64>, Option<u64>),
    pub shmem_kib: (Option<u64>, Option<u64>),
}

/// The floors of the first and the last quarter of the samples from `warmup_s`
/// after the process started on, and the peak between; None with fewer than
/// two samples from then on.
pub fn rss_growth(s: &RssSeries, warmup_s: f64) -> Option<RssGrowth> {
    let from = s.started_s + warmup_s;
    let after: Vec<(f64, u64)> = s.points.iter().copied().filter(|p| p.0 >= from).collect();
    if after.len() < 2 {
        return None;
    }
    let q = (after.len() / 4).max(1);
    let least = |w: &[(f64, u64)]| *w.iter().min_by_key(|p| p.1).expect("a sample");
    let (baseline_s, baseline_kib) = least(&after[..q]);
    let (late_s, late_kib) = least(&after[after.len() - q..]);
    let &(peak_s, peak_kib) = after.iter().max_by_key(|p| p.1)?;
    let at = |v: &[(f64, u64)], t: f64| v.iter().find(|p| p.0 == t).map(|p| p.1);
    Some(RssGrowth {
        anon_kib: (at(&s.anon, baseline_s), at(&s.anon, late_s)),
        shmem_kib: (at(&s.shmem, baseline_s), at(&s.shmem, late_s)),
        node: s.node.clone(),
        incarnation: s.incarnation,
        baseline_s,
        baseline_kib,
        late_s,
        late_kib,
        peak_s,
        peak_kib,
        growth: late_kib as f64 / baseline_kib.max(1) as f64 - 1.0,
    })
}

/// A node's pools once idle, and (senders) its kshim's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolCheck {
    pub node: String,
    pub session: u32,
    /// Engine: RX buffers held, TX messages in flight (None: stats unreadable).
    pub engine_rx_held: Option<u64>,
    pub engine_tx_in_flight: Option<u64>,
    /// Seconds until the engine's figures read empty at the end check (None: they
    /// did not within 5 s).
    pub engine_settle_s: Option<f64>,
    /// kshim: sends without a completion.
    pub kshim_pending: u32,
    /// kshim TX pool chunks free now, and free when the engine attached.
    pub tx_free: u32,
    pub tx_free_at_attach: u32,
    /// kshim: messages handed up and given back (receiver).
    pub rx_delivered: u64,
    pub rx_returned: u64,
}

/// What the restart did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Restart {
    /// SIGTERM sent, new engine attached (seconds since traffic started).
    pub sigterm_s: f64,
    pub attached_s: Option<f64>,
    /// The old engine's exit status.
    pub exit: Option<String>,
    /// Sends completed Ok by the new engine.
    pub ok_after: u64,
}

/// The verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub counts: Counts,
    /// Distinct messages, their outcomes.
    pub messages: u64,
    pub lost: u64,
    pub unfinished: u64,
    pub given_up: u64,
    pub corrupt: u64,
    /// Failures back by status, inside the restart window.
    pub failed_in_restart: BTreeMap<String, u64>,
    /// Failures back by status, outside it.
    pub failed_elsewhere: BTreeMap<String, u64>,
    /// Messages failed back during the restart that the receiver had anyway
    /// (their resend arrived a second time).
    pub delivered_twice_after_restart_failure: u64,
    /// Duplicates of messages that never failed back.
    pub duplicates: u64,
    pub rss: Vec<RssGrowth>,
}

fn ids(v: &[(u32, u64)]) -> String {
    let shown: Vec<String> = v.iter().take(5).map(|(s, q)| format!("{s}:{q}")).collect();
    let more = if v.len() > 5 {
        format!(" and {} more", v.len() - 5)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// Judges the run; see the module docs.
pub fn judge(
    ledger: &Ledger,
    pools: &[PoolCheck],
    rss: &[RssSeries],
    warmup_s: f64,
    restart: Option<&Restart>,
) -> Verdict {
    let mut v = Verdict {
        counts: ledger.counts(),
        messages: ledger.msgs.len() as u64,
        ..Default::default()
    };
    let (mut lost, mut unfinished, mut given_up, mut corrupt, mut dup) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (&id, m) in &ledger.msgs {
        for f in &m.fails {
            let to = if f.in_restart && (f.status == "Shutdown" || f.status == "EngineGone") {
                &mut v.failed_in_restart
            } else {
                &mut v.failed_elsewhere
            };
            *to.entry(f.status.clone()).or_default() += 1;
        }
        if m.corrupt > 0 {
            corrupt.push(id);
        }
        if m.pending > 0 {
            unfinished.push(id);
        } else if !m.ok {
            given_up.push(id);
        }
        if m.ok && m.received == 0 {
            lost.push(id);
        }
        if m.received > 1 {
            let restart_failure = m.fails.iter().any(|f| f.in_restart);
            if restart_failure && m.received == 2 {
                v.delivered_twice_after_restart_failure += 1;
            } else {
                dup.push(id);
            }
        }
    }
    v.lost = lost.len() as u64;
    v.unfinished = unfinished.len() as u64;
    v.given_up = given_up.len() as u64;
    v.corrupt = corrupt.len() as u64;
    v.duplicates = dup.len() as u64;
    if !lost.is_empty() {
        v.failures.push(format!(
            "{} messages lost: completed Ok but never received (sender:seq {})",
            lost.len(),
            ids(&lost)
        ));
    }
    if !unfinished.is_empty() {
        v.failures.push(format!(
            "{} message slots not accounted for: sent without a completion (sender:seq {})",
            unfinished.len(),
            ids(&unfinished)
        ));
    }
    if !given_up.is_empty() {
        v.failures.push(format!(
            "{} messages never completed Ok in {MAX_ATTEMPTS} sends (sender:seq {})",
            given_up.len(),
            ids(&given_up)
        ));
    }
    if !corrupt.is_empty() {
        v.failures.push(format!(
            "{} messages arrived with a payload other than the one sent (sender:seq {})",
            corrupt.len(),
            ids(&corrupt)
        ));
    }
    if !dup.is_empty() {
        v.failures.push(format!(
            "{} messages received more than once without a failure back during the restart to explain it (sender:seq {})",
            dup.len(),
            ids(&dup)
        ));
    }
    if !v.failed_elsewhere.is_empty() {
        v.failures.push(format!(
            "sends failed back outside the restart window or with a status a restart does not give: {:?}",
            v.failed_elsewhere
        ));
    }
    for p in pools {
        let who = format!("{} (session {})", p.node, p.session);
        match (p.engine_rx_held, p.engine_tx_in_flight) {
            (Some(rx), Some(tx)) => {
                if rx > 0 {
                    v.failures
                        .push(format!("{who}: engine holds {rx} RX buffers when idle"));
                }
                if tx > 0 {
                    v.failures.push(format!(
                        "{who}: engine has {tx} TX messages in flight when idle"
                    ));
                }
            }
            _ => v
                .failures
                .push(format!("{who}: engine stats unreadable at the end check")),
        }
        if p.kshim_pending > 0 {
            v.failures.push(format!(
                "{who}: kshim has {} sends pending when idle",
                p.kshim_pending
            ));
        }
        if p.tx_free != p.tx_free_at_attach {
            v.failures.push(format!(
                "{who}: kshim TX pool has {} chunks free when idle, {} when the engine attached",
                p.tx_free, p.tx_free_at_attach
            ));
        }
        if p.rx_delivered != p.rx_returned {
            v.failures.push(format!(
                "{who}: kshim handed up {} messages and gave back {}",
                p.rx_delivered, p.rx_returned
            ));
        }
    }
    for s in rss {
        match rss_growth(s, warmup_s) {
            Some(g) => {
                if g.growth > RSS_GROWTH_LIMIT {
                    v.failures.push(format!(
                        "{} (engine process {}): RSS floor grew {:.1} % after warm-up, least {} KiB at {:.0} s in the first quarter to least {} KiB at {:.0} s in the last (limit {:.0} %; peak {} KiB at {:.0} s); of it RssAnon {} -> {} KiB, RssShmem (kshim's pools mapped) {} -> {} KiB",
                        g.node,
                        g.incarnation,
                        g.growth * 100.0,
                        g.baseline_kib,
                        g.baseline_s,
                        g.late_kib,
                        g.late_s,
                        RSS_GROWTH_LIMIT * 100.0,
                        g.peak_kib,
                        g.peak_s,
                        kib(g.anon_kib.0),
                        kib(g.anon_kib.1),
                        kib(g.shmem_kib.0),
                        kib(g.shmem_kib.1),
                    ));
                }
                v.rss.push(g);
            }
            None => v.notes.push(format!(
                "{} (engine process {}): RSS growth not measured, fewer than 2 samples after its {:.0} s warm-up",
                s.node, s.incarnation, warmup_s
            )),
        }
    }
    match restart {
        None => {}
        Some(r) => match r.attached_s {
            None => v
                .failures
                .push("the restarted engine never attached to kshim".to_string()),
            Some(_) if r.ok_after == 0 => v.failures.push(
                "no send completed Ok after the restart: the transfer did not continue".to_string(),
            ),
            Some(_) => {}
        },
    }
    v.pass = v.failures.is_empty();
    v
}

// --------------------------------------------------------------- the nodes

/// A payload word: distinct for each (sender, sequence number, word).
fn word(sender: u32, seq: u64, i: u64) -> u64 {
    let mut z = (u64::from(sender) << 56 ^ seq << 20 ^ i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The payload of message (sender, seq), `len` bytes, into `out`.
pub fn payload(sender: u32, seq: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    let mut i = 0u64;
    while out.len() < len {
        let w = word(sender, seq, i).to_le_bytes();
        let n = (len - out.len()).min(8);
        out.extend_from_slice(&w[..n]);
        i += 1;
    }
}

fn nid(ip: Ipv4Addr) -> Nid {
    format!("{ip}@lu2k")
        .parse()
        .expect("a NID of an IP address")
}

const PID: u32 = 12345;

fn put(from: Nid, to: Nid, sender: u32, seq: u64) -> Repr {
    Repr {
        dest_nid: to.nid4().unwrap_or(u64::MAX),
        src_nid: from.nid4().unwrap_or(u64::MAX),
        dest_pid: PID,
        src_pid: PID,
        payload_length: MSG as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: seq,
            hdr_data: u64::from(sender),
            ptl_index: 42,
            offset: 0,
        },
    }
}

/// An engine process as the sampler sees it.
#[derive(Debug, Clone)]
struct EngineSlot {
    node: String,
    incarnation: u32,
    /// 0 while none runs.
    pid: u32,
    started: Instant,
    stats: PathBuf,
}

struct Shared {
    ledger: Mutex<Ledger>,
    engines: Mutex<Vec<EngineSlot>>,
    /// Timeline: (seconds since traffic started, what).
    events: Mutex<Vec<(f64, String)>>,
    t0: Mutex<Option<Instant>>,
    /// Main sender: stop handing new PUTs.
    stop_sending: AtomicBool,
    /// Main sender: restart the engine now.
    restart: AtomicBool,
    restart_report: Mutex<Option<Restart>>,
    /// Everyone: close down.
    close: AtomicBool,
    /// Every node's end check.
    pools: Mutex<Vec<PoolCheck>>,
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn t(&self) -> f64 {
        self.t0
            .lock()
            .unwrap()
            .map_or(0.0, |t0| t0.elapsed().as_secs_f64())
    }
    fn event(&self, what: String) {
        let t = self.t();
        eprintln!("soak {t:8.1} s  {what}");
        self.events.lock().unwrap().push((t, what));
    }
    fn set_engine(&self, node: &str, incarnation: u32, pid: u32, stats: &Path) {
        let mut e = self.engines.lock().unwrap();
        match e
            .iter_mut()
            .find(|s| s.node == node && s.incarnation == incarnation)
        {
            Some(s) => s.pid = pid,
            None => e.push(EngineSlot {
                node: node.to_string(),
                incarnation,
                pid,
                started: Instant::now(),
                stats: stats.to_path_buf(),
            }),
        }
    }
    fn fail(&self, what: String) {
        self.event(format!("FAILED: {what}"));
        self.failure.lock().unwrap().get_or_insert(what);
    }
}

/// A kshim and its engine process.
struct Node {
    name: String,
    k: Kshim,
    engine: Option<Child>,
    spec: EngineSpec,
    incarnation: u32,
    session: u32,
    tx_free_at_attach: u32,
}

impl Node {
    fn start(
        name: &str,
        session: u32,
        spec: EngineSpec,
        ip: Ipv4Addr,
        rx_bufs: u32,
        sh: &Shared,
    ) -> Result<Node> {
        let _ = std::fs::remove_file(&spec.kshim_socket);
        let mut cfg = Config::new(vec![nid(ip)], &spec.kshim_socket);
        cfg.cores = u32::from(spec.cores);
        cfg.rx_buf_count = rx_bufs;
        // Sized for the soak's path (geo.toml's 100 Mbit/s, 600 ms cell) as
        // `lu2k-kshim --path-rate-mbps --path-rtt-ms` sizes it; the churn
        // peers' slower links get the same.
        cfg.tx_pool_len = lu2k_kshim::ring_abi::tx_pool::bytes_for_path(100.0, 600.0).0;
        let k = Kshim::start(cfg).with_context(|| format!("{name}: starting kshim"))?;
        let mut n = Node {
            name: name.to_string(),
            k,
            engine: None,
            spec,
            // A churn peer's session n runs its engine process n.
            incarnation: session - 1,
            session,
            tx_free_at_attach: 0,
        };
        n.spawn_engine(sh)?;
        n.await_attach()?;
        Ok(n)
    }

    fn spawn_engine(&mut self, sh: &Shared) -> Result<()> {
        let mut cmd = self_command()?;
        cmd.arg("__engine")
            .arg(serde_json::to_string(&self.spec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("{}: starting the engine", self.name))?;
        self.incarnation += 1;
        sh.set_engine(
            &self.name,
            self.incarnation,
            child.id(),
            &self.spec.stats_socket,
        );
        self.engine = Some(child);
        Ok(())
    }

    fn await_attach(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.k.is_attached() {
            if Instant::now() > deadline {
                bail!(
                    "{}: the engine did not attach to kshim within 20 s",
                    self.name
                );
            }
            match self.k.wait(Some(Duration::from_millis(20))) {
                Some(Event::EngineGone(r)) => {
                    bail!("{}: the engine went away while attaching: {r:?}", self.name)
                }
                Some(Event::Rx(m)) => self.k.rx_done(m),
                _ => {}
            }
        }
        self.tx_free_at_attach = self.k.tx_pool_free().0;
        Ok(())
    }

    fn engine_pools(&self) -> (Option<u64>, Option<u64>) {
        match lu2k_engine::daemon::stats::fetch(&self.spec.stats_socket) {
            Ok(r) => (
                Some(r.cores.iter().map(|c| c.rx_pool_held).sum()),
                Some(r.cores.iter().map(|c| c.tx_msgs_in_flight).sum()),
            ),
            Err(_) => (None, None),
        }
    }

    /// The end check. An idle engine core republishes its counters only when it
    /// next wakes, so the engine's figures are read again for up to 5 s until they
    /// read empty; how long that took is kept (`engine_settle_s`).
    fn pool_check(&mut self) -> PoolCheck {
        let start = Instant::now();
        let (rx, tx) = loop {
            let (rx, tx) = self.engine_pools();
            if (rx == Some(0) && tx == Some(0)) || start.elapsed() > Duration::from_secs(5) {
                break (rx, tx);
            }
            if let Some(Event::Rx(m)) = self.k.wait(Some(Duration::from_millis(250))) {
                self.k.rx_done(m);
            }
        };
        let settled = rx == Some(0) && tx == Some(0);
        let st = self.k.stats();
        PoolCheck {
            node: self.name.clone(),
            session: self.session,
            engine_rx_held: rx,
            engine_tx_in_flight: tx,
            engine_settle_s: settled.then(|| start.elapsed().as_secs_f64()),
            kshim_pending: self.k.pending(),
            tx_free: self.k.tx_pool_free().0,
            tx_free_at_attach: self.tx_free_at_attach,
            rx_delivered: st.rx,
            rx_returned: st.rx_returned,
        }
    }

    /// SIGTERM to the engine; the exit status once it ended (kshim polled meanwhile,
    /// its events given to `on`).
    fn stop_engine(&mut self, sh: &Shared, mut on: impl FnMut(&mut Kshim, Event)) -> String {
        let Some(mut child) = self.engine.take() else {
            return "not running".into();
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break format!("{st}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break format!("killed 30 s after SIGTERM ({st})");
            }
            if let Some(ev) = self.k.wait(Some(Duration::from_millis(10))) {
                on(&mut self.k, ev);
            }
        };
        sh.set_engine(&self.name, self.incarnation, 0, &self.spec.stats_socket);
        status
    }

    /// Engine first (it drains), then kshim.
    fn close(mut self, sh: &Shared) {
        let st = self.stop_engine(sh, |k, ev| {
            if let Event::Rx(m) = ev {
                k.rx_done(m)
            }
        });
        sh.event(format!(
            "{}: engine stopped ({st}), kshim closed",
            self.name
        ));
    }
}

/// A sender's state across its sessions.
struct Sending {
    sender: u32,
    me: Nid,
    to: Nid,
    next_seq: u64,
    resend: std::collections::VecDeque<u64>,
    in_flight: BTreeMap<u64, u64>,
    buf: Vec<u8>,
    restart_window: bool,
    /// Sends completed Ok.
    ok: u64,
}

impl Sending {
    /// Hands PUTs while fewer than `limit` are in flight and kshim takes them.
    fn fill(&mut self, k: &mut Kshim, limit: usize, sh: &Shared, new_ones: bool) {
        while self.in_flight.len() < limit {
            let (seq, again) = match self.resend.front() {
                Some(&s) => (s, true),
                None if new_ones => (self.next_seq, false),
                None => return,
            };
            let Ok(tx) = k.alloc_tx(MSG) else { return };
            payload(self.sender, seq, MSG, &mut self.buf);
            k.write_tx(&tx, 0, &self.buf);
            match k.send_buf_to(self.to, &put(self.me, self.to, self.sender, seq), tx) {
                Ok(cookie) => {
                    if again {
                        self.resend.pop_front();
                    } else {
                        self.next_seq += 1;
                    }
                    self.in_flight.insert(cookie.0, seq);
                    let mut l = sh.ledger.lock().unwrap();
                    let m = l.msgs.entry((self.sender, seq)).or_default();
                    m.attempts += 1;
                    m.pending += 1;
                }
                Err(_) => return,
            }
        }
    }

    /// One kshim event. Returns whether it was an Ok completion.
    fn on_event(&mut self, k: &mut Kshim, ev: Event, sh: &Shared, name: &str) -> bool {
        match ev {
            Event::TxDone { cookie, status, .. } => {
                let Some(seq) = self.in_flight.remove(&cookie.0) else {
                    sh.fail(format!(
                        "{name}: a completion for a cookie never sent ({cookie:?})"
                    ));
                    return false;
                };
                let mut l = sh.ledger.lock().unwrap();
                let m = l.msgs.entry((self.sender, seq)).or_default();
                m.pending = m.pending.saturating_sub(1);
                if status == TxStatus::Ok {
                    m.ok = true;
                    self.ok += 1;
                    return true;
                }
                m.fails.push(FailBack {
                    status: format!("{status:?}"),
                    in_restart: self.restart_window,
                });
                if m.attempts < MAX_ATTEMPTS && !m.ok {
                    self.resend.push_back(seq);
                }
            }
            Event::Rx(m) => k.rx_done(m),
            Event::EngineGone(r) => sh.event(format!("{name}: kshim: engine gone ({r:?})")),
            _ => {}
        }
        false
    }

    /// Waits until nothing is in flight or queued for resending (at most `limit`).
    fn drain(&mut self, k: &mut Kshim, limit: Duration, sh: &Shared, name: &str) {
        let deadline = Instant::now() + limit;
        while (!self.in_flight.is_empty() || !self.resend.is_empty()) && Instant::now() < deadline {
            self.fill(k, usize::MAX, sh, false);
            if let Some(ev) = k.wait(Some(Duration::from_millis(20))) {
                self.on_event(k, ev, sh, name);
            }
        }
        if !self.in_flight.is_empty() || !self.resend.is_empty() {
            sh.fail(format!(
                "{name}: {} sends still in flight and {} resends queued {limit:?} after it stopped sending",
                self.in_flight.len(),
                self.resend.len()
            ));
        }
    }
}

/// How long a sender waits for its last completions (a few round trips through
/// 1 % loss, and a peer-down timeout's worth of slack).
const DRAIN: Duration = Duration::from_secs(120);

struct Topology {
    port: u16,
    dir: PathBuf,
    recv_ip: Ipv4Addr,
    /// Per sender: its address, and the relay's sockets (towards it, towards the receiver).
    senders: Vec<(Ipv4Addr, SocketAddr, SocketAddr)>,
}

impl Topology {
    fn sender_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 81, 10 + i as u8)
    }
    fn spec(&self, name: &str, ip: Ipv4Addr, peers: Vec<EnginePeer>) -> EngineSpec {
        EngineSpec {
            kshim_socket: self.dir.join(format!("kshim-{name}.sock")),
            bind: ip.into(),
            port: self.port,
            stats_socket: self.dir.join(format!("stats-{name}.sock")),
            cores: 1,
            peers,
            psk_file: None,
        }
    }
    fn recv_spec(&self) -> EngineSpec {
        let peers = self
            .senders
            .iter()
            .map(|&(ip, _, to_recv)| EnginePeer {
                nid_ip: ip.into(),
                addr: Some(to_recv),
                links: Vec::new(),
                policy: None,
                max_rate_mbps: None,
            })
            .collect();
        self.spec("recv", self.recv_ip, peers)
    }
    fn sender_spec(&self, i: u32, name: &str) -> EngineSpec {
        let (ip, to_sender, _) = self.senders[i as usize];
        self.spec(
            name,
            ip,
            vec![EnginePeer {
                nid_ip: self.recv_ip.into(),
                addr: Some(to_sender),
                links: Vec::new(),
                policy: None,
                max_rate_mbps: None,
            }],
        )
    }
}

fn receiver(
    sh: Arc<Shared>,
    topo: Arc<Topology>,
    rx_bufs: u32,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let mut n = match Node::start("recv", 1, topo.recv_spec(), topo.recv_ip, rx_bufs, &sh) {
        Ok(n) => {
            let _ = ready.send(Ok(()));
            n
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut want = Vec::new();
    let mut have = vec![0u8; MSG];
    while !sh.close.load(Ordering::SeqCst) {
        match n.k.wait(Some(Duration::from_millis(50))) {
            Some(Event::Rx(m)) => {
                let (sender, seq) = match m.hdr.msg {
                    Msg::Put {
                        match_bits,
                        hdr_data,
                        ..
                    } => (hdr_data as u32, match_bits),
                    _ => (u32::MAX, u64::MAX),
                };
                payload(sender, seq, MSG, &mut want);
                let got = m.copy_to(&mut have);
                let intact = m.len() == MSG && got == MSG && have == want;
                n.k.rx_done(m);
                let mut l = sh.ledger.lock().unwrap();
                let st = l.msgs.entry((sender, seq)).or_default();
                if intact {
                    st.received += 1;
                } else {
                    st.corrupt += 1;
                }
            }
            Some(Event::EngineGone(r)) => sh.fail(format!("recv: its engine went away: {r:?}")),
            Some(Event::PeerDown(p)) => sh.event(format!("recv: peer {p} reported down")),
            Some(Event::PeerUp(p)) => sh.event(format!("recv: peer {p} up")),
            _ => {}
        }
    }
    // The receiver is checked last, once the senders have closed.
    let p = n.pool_check();
    sh.pools.lock().unwrap().push(p);
    n.close(&sh);
}

fn main_sender(
    sh: Arc<Shared>,
    topo: Arc<Topology>,
    rx_bufs: u32,
    in_flight: u32,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let ip = topo.senders[0].0;
    let mut n = match Node::start("send", 1, topo.sender_spec(0, "send"), ip, rx_bufs, &sh) {
        Ok(n) => {
            let _ = ready.send(Ok(()));
            n
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut s = Sending {
        sender: 0,
        me: nid(ip),
        to: nid(topo.recv_ip),
        next_seq: 0,
        resend: Default::default(),
        in_flight: BTreeMap::new(),
        buf: Vec::with_capacity(MSG),
        restart_window: false,
        ok: 0,
    };
    let limit = in_flight as usize;
    let mut restarted = false;
    let mut ok_before_restart = 0;
    while !sh.stop_sending.load(Ordering::SeqCst) {
        if !restarted && sh.restart.load(Ordering::SeqCst) {
            restarted = true;
            s.restart_window = true;
            let mut r = Restart {
                sigterm_s: sh.t(),
                ..Default::default()
            };
            sh.event(format!(
                "send: SIGTERM to its engine ({} PUTs in flight)",
                s.in_flight.len()
            ));
            let mut gone = false;
            let exit = {
                let s = &mut s;
                let sh2 = &sh;
                let gone = &mut gone;
                n.stop_engine(&sh, |k, ev| {
                    if matches!(ev, Event::EngineGone(_)) {
                        *gone = true;
                    }
                    s.on_event(k, ev, sh2, "send");
                })
            };
            sh.event(format!("send: old engine exited ({exit})"));
            r.exit = Some(exit);
            // kshim listens again once it has seen the engine go: a new engine
            // started before that would fail its first attach.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !gone && Instant::now() < deadline {
                if let Some(ev) = n.k.wait(Some(Duration::from_millis(10))) {
                    if matches!(ev, Event::EngineGone(_)) {
                        gone = true;
                    }
                    s.on_event(&mut n.k, ev, &sh, "send");
                }
            }
            let attached = n.spawn_engine(&sh).and_then(|()| n.await_attach());
            match attached {
                Ok(()) => {
                    r.attached_s = Some(sh.t());
                    sh.event(format!(
                        "send: new engine attached; {} failed-back PUTs to send again",
                        s.resend.len()
                    ));
                }
                Err(e) => sh.fail(format!("send: restart: {e:#}")),
            }
            s.restart_window = false;
            ok_before_restart = s.ok;
            *sh.restart_report.lock().unwrap() = Some(r);
            continue;
        }
        s.fill(&mut n.k, limit, &sh, true);
        if let Some(ev) = n.k.wait(Some(Duration::from_millis(20))) {
            s.on_event(&mut n.k, ev, &sh, "send");
        }
    }
    sh.event(format!(
        "send: stopped handing PUTs ({} in flight)",
        s.in_flight.len()
    ));
    s.drain(&mut n.k, DRAIN, &sh, "send");
    if let Some(r) = sh.restart_report.lock().unwrap().as_mut() {
        r.ok_after = s.ok - ok_before_restart;
    }
    sh.event("send: idle".into());
    while !sh.close.load(Ordering::SeqCst) {
        if let Some(ev) = n.k.wait(Some(Duration::from_millis(50))) {
            s.on_event(&mut n.k, ev, &sh, "send");
        }
    }
    let p = n.pool_check();
    sh.pools.lock().unwrap().push(p);
    n.close(&sh);
}

fn churn_peer(
    sh: Arc<Shared>,
    topo: Arc<Topology>,
    i: u32,
    sessions: Vec<(Instant, Instant)>,
    rx_bufs: u32,
) {
    let name = format!("churn{i}");
    let ip = topo.senders[i as usize].0;
    let mut s = Sending {
        sender: i,
        me: nid(ip),
        to: nid(topo.recv_ip),
        next_seq: 0,
        resend: Default::default(),
        in_flight: BTreeMap::new(),
        buf: Vec::with_capacity(MSG),
        restart_window: false,
        ok: 0,
    };
    for (j, (start, end)) in sessions.into_iter().enumerate() {
        while Instant::now() < start {
            if sh.close.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut n = match Node::start(
            &name,
            j as u32 + 1,
            topo.sender_spec(i, &name),
            ip,
            rx_bufs,
            &sh,
        ) {
            Ok(n) => n,
            Err(e) => {
                sh.fail(format!("{name}: session {}: {e:#}", j + 1));
                return;
            }
        };
        sh.event(format!("{name}: came (session {})", j + 1));
        while Instant::now() < end && !sh.close.load(Ordering::SeqCst) {
            s.fill(&mut n.k, 8, &sh, true);
            if let Some(ev) = n.k.wait(Some(Duration::from_millis(20))) {
                s.on_event(&mut n.k, ev, &sh, &name);
            }
        }
        s.drain(&mut n.k, DRAIN, &sh, &name);
        let p = n.pool_check();
        sh.pools.lock().unwrap().push(p);
        n.close(&sh);
        sh.event(format!(
            "{name}: gone (session {}, {} PUTs so far)",
            j + 1,
            s.next_seq
        ));
    }
}

// ----------------------------------------------------------------- sampling

/// One row of soak.csv: one engine process at one time.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub node: String,
    pub incarnation: u32,
    pub pid: u32,
    pub vm_rss_kib: Option<u64>,
    pub vm_hwm_kib: Option<u64>,
    /// VmRSS's parts: anonymous memory, and shared memory (kshim's pools,
    /// mapped from its memfd, as far as the engine touched them).
    pub rss_anon_kib: Option<u64>,
    pub rss_shmem_kib: Option<u64>,
    pub rx_pool_held: Option<u64>,
    pub rx_pool_buffers: Option<u64>,
    pub tx_msgs_in_flight: Option<u64>,
    pub tx_msg_slots: Option<u64>,
    pub engine_msgs_tx: Option<u64>,
    pub engine_msgs_rx: Option<u64>,
    #[serde(flatten)]
    pub counts: Counts,
}

const CSV_HEADER: &str = "t_s,node,incarnation,pid,vm_rss_kib,vm_hwm_kib,rss_anon_kib,rss_shmem_kib,rx_pool_held,rx_pool_buffers,tx_msgs_in_flight,tx_msg_slots,engine_msgs_tx,engine_msgs_rx,handed,ok,failed,received,verified";

fn opt(v: Option<u64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

impl Sample {
    fn csv(&self) -> String {
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.t_s,
            self.node,
            self.incarnation,
            self.pid,
            opt(self.vm_rss_kib),
            opt(self.vm_hwm_kib),
            opt(self.rss_anon_kib),
            opt(self.rss_shmem_kib),
            opt(self.rx_pool_held),
            opt(self.rx_pool_buffers),
            opt(self.tx_msgs_in_flight),
            opt(self.tx_msg_slots),
            opt(self.engine_msgs_tx),
            opt(self.engine_msgs_rx),
            self.counts.handed,
            self.counts.ok,
            self.counts.failed,
            self.counts.received,
            self.counts.verified
        )
    }
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn sample(sh: &Shared) -> Vec<Sample> {
    let t = sh.t();
    let counts = sh.ledger.lock().unwrap().counts();
    let engines = sh.engines.lock().unwrap().clone();
    engines
        .iter()
        .filter(|e| e.pid != 0)
        .map(|e| {
            let st = lu2k_engine::daemon::stats::fetch(&e.stats).ok();
            let sum = |f: fn(&lu2k_engine::daemon::stats::CoreStats) -> u64| {
                st.as_ref().map(|r| r.cores.iter().map(f).sum())
            };
            Sample {
                t_s: t,
                node: e.node.clone(),
                incarnation: e.incarnation,
                pid: e.pid,
                vm_rss_kib: status_kib(e.pid, "VmRSS:"),
                vm_hwm_kib: status_kib(e.pid, "VmHWM:"),
                rss_anon_kib: status_kib(e.pid, "RssAnon:"),
                rss_shmem_kib: status_kib(e.pid, "RssShmem:"),
                rx_pool_held: sum(|c| c.rx_pool_held),
                rx_pool_buffers: sum(|c| c.rx_pool_buffers),
                tx_msgs_in_flight: sum(|c| c.tx_msgs_in_flight),
                tx_msg_slots: sum(|c| c.tx_msg_slots),
                engine_msgs_tx: sum(|c| c.peers.iter().map(|p| p.msgs_tx).sum()),
                engine_msgs_rx: sum(|c| c.peers.iter().map(|p| p.msgs_rx).sum()),
                counts: counts.clone(),
            }
        })
        .collect()
}

/// Per engine process, its RSS samples.
fn rss_series(samples: &[Sample], engines: &[EngineSlot], t0: Instant) -> Vec<RssSeries> {
    engines
        .iter()
        .map(|e| RssSeries {
            node: e.node.clone(),
            incarnation: e.incarnation,
            started_s: e.started.saturating_duration_since(t0).as_secs_f64()
                - t0.saturating_duration_since(e.started).as_secs_f64(),
            points: samples
                .iter()
                .filter(|s| s.node == e.node && s.incarnation == e.incarnation)
                .filter_map(|s| Some((s.t_s, s.vm_rss_kib?)))
                .collect(),
            anon: samples
                .iter()
                .filter(|s| s.node == e.node && s.incarnation == e.incarnation)
                .filter_map(|s| Some((s.t_s, s.rss_anon_kib?)))
                .collect(),
            shmem: samples
                .iter()
                .filter(|s| s.node == e.node && s.incarnation == e.incarnation)
                .filter_map(|s| Some((s.t_s, s.rss_shmem_kib?)))
                .collect(),
        })
        .collect()
}

/// Two plots: RSS of every engine process; pool use and message counts.
fn plot(samples: &[Sample], series: &[RssSeries], dir: &Path, plan: &Plan) -> Result<Vec<PathBuf>> {
    let tmax = samples.iter().map(|s| s.t_s).fold(1.0, f64::max);
    let rss_path = dir.join("soak-rss.svg");
    {
        let ymax = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1 as f64 / 1024.0))
            .fold(1.0, f64::max);
        let root = SVGBackend::new(&rss_path, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "soak: engines' RSS (restart at {:.0} s, warm-up {:.0} s)",
                    plan.restart_s, plan.warmup_s
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("seconds since traffic started")
            .y_desc("VmRSS (MiB)")
            .draw()?;
        for (i, s) in series.iter().filter(|s| !s.points.is_empty()).enumerate() {
            let col = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.0, p.1 as f64 / 1024.0))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(2)))?
                .label(format!("{} #{}", s.node, s.incarnation))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    let pool_path = dir.join("soak-pools.svg");
    {
        let root = SVGBackend::new(&pool_path, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let lines: Vec<(String, Vec<(f64, f64)>)> = {
            let mut v: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            let mut add = |name: String, p: (f64, f64)| match v.iter_mut().find(|l| l.0 == name) {
                Some(l) => l.1.push(p),
                None => v.push((name, vec![p])),
            };
            let mut last_t = f64::NAN;
            let mut last_verified = 0;
            for s in samples {
                if let Some(h) = s.rx_pool_held {
                    add(format!("{}: RX buffers held", s.node), (s.t_s, h as f64));
                }
                if let Some(h) = s.tx_msgs_in_flight {
                    add(
                        format!("{}: TX messages in flight", s.node),
                        (s.t_s, h as f64),
                    );
                }
                if s.t_s != last_t {
                    // Goodput of verified PUTs since the previous sample.
                    if last_t.is_finite() && s.t_s > last_t {
                        let mbit = (s.counts.verified - last_verified) as f64 * MSG as f64 * 8e-6;
                        add(
                            "verified PUTs, Mbit/s since the last sample".into(),
                            (s.t_s, mbit / (s.t_s - last_t)),
                        );
                    }
                    last_t = s.t_s;
                    last_verified = s.counts.verified;
                }
            }
            v
        };
        let ymax = lines
            .iter()
            .flat_map(|l| l.1.iter().map(|p| p.1))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption("soak: pool use and verified goodput", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("seconds since traffic started")
            .y_desc("buffers, messages; Mbit/s")
            .draw()?;
        for (i, (name, pts)) in lines.into_iter().enumerate() {
            let col = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    Ok(vec![rss_path, pool_path])
}

// --------------------------------------------------------------- the run

/// The GEO cell of `geo.toml`: 100 Mbit/s, 600 ms, 1 % loss, Bernoulli.
fn geo_link() -> Result<DuplexConfig> {
    let s = crate::scenario::Scenario::parse(
        include_str!("../../scenarios/geo.toml"),
        "geo.toml (built in)",
    )?;
    s.cells(false)
        .into_iter()
        .find(|c| {
            c.rtt_ms == 600.0
                && c.loss == 0.01
                && c.rate_mbps == 100.0
                && c.links.is_empty()
                && !c.ipv6
                && c.outage.is_none()
                && c.name == "600ms/1%/100M"
        })
        .map(|c| c.link)
        .context("geo.toml has no 600ms/1%/100M cell")
}

fn free_port(ip: Ipv4Addr) -> Result<u16> {
    Ok(UdpSocket::bind((ip, 0))
        .with_context(|| format!("binding {ip}: no free UDP port"))?
        .local_addr()?
        .port())
}

/// Closes the nodes of its threads when dropped: at the end of the run, and when
/// the run ends early on an error (an engine whose kshim went away waits for the
/// next one without end, so the nodes must stop theirs).
struct Stopper {
    sh: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.sh.stop_sending.store(true, Ordering::SeqCst);
        self.sh.close.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Serialize)]
struct SoakReport<'a> {
    minutes: f64,
    sample_s: f64,
    in_flight: u32,
    churn_peers: u32,
    churn_rate_mbps: f64,
    rx_bufs: u32,
    plan: &'a Plan,
    restart: Option<Restart>,
    events: Vec<(f64, String)>,
    pools: Vec<PoolCheck>,
    relays: Vec<serde_json::Value>,
    verdict: &'a Verdict,
    samples: &'a [Sample],
}

pub fn soak(a: SoakArgs) -> Result<()> {
    a.check()?;
    let plan = Plan::new(a.minutes * 60.0, a.churn_peers);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let link = geo_link()?;
    let recv_ip = Ipv4Addr::new(127, 0, 81, 2);
    let port = free_port(recv_ip)?;
    let dir = std::env::temp_dir().join(format!("lu2k-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut relays = Vec::new();
    let mut senders = Vec::new();
    for i in 0..=a.churn_peers {
        let ip = Topology::sender_ip(i);
        let mut l = link.clone();
        if i > 0 {
            for d in [&mut l.forward, &mut l.reverse] {
                d.rate_mbps = Some(a.churn_rate_mbps);
                // One bandwidth-delay product, as the GEO cell's queue.
                d.queue_bytes = Some((a.churn_rate_mbps * 1e6 / 8.0 * 0.6) as u64);
            }
        }
        let mut rc = RelayConfig::loopback(l, a.seed.wrapping_add(u64::from(i)));
        rc.a_bind = SocketAddr::new(IpAddr::V4(recv_ip), 0);
        rc.b_bind = SocketAddr::new(IpAddr::V4(ip), 0);
        rc.a_peer = Some(SocketAddr::new(ip.into(), port));
        rc.b_peer = Some(SocketAddr::new(recv_ip.into(), port));
        let r = Relay::spawn(rc)
            .with_context(|| format!("starting the link emulator of sender {i}"))?;
        senders.push((ip, r.a_addr(), r.b_addr()));
        relays.push(r);
    }
    let topo = Arc::new(Topology {
        port,
        dir: dir.clone(),
        recv_ip,
        senders,
    });
    let sh = Arc::new(Shared {
        ledger: Mutex::default(),
        engines: Mutex::default(),
        events: Mutex::default(),
        t0: Mutex::new(None),
        stop_sending: AtomicBool::new(false),
        restart: AtomicBool::new(false),
        restart_report: Mutex::new(None),
        close: AtomicBool::new(false),
        pools: Mutex::default(),
        failure: Mutex::new(None),
    });
    eprintln!(
        "soak: {} min at 100 Mbit/s, 600 ms, 1 % loss; main sender restarted at {:.0} s; {} churn peers at {} Mbit/s; samples every {} s; warm-up {:.0} s; files in {}",
        a.minutes,
        plan.restart_s,
        a.churn_peers,
        a.churn_rate_mbps,
        a.sample_s,
        plan.warmup_s,
        a.out.display()
    );
    let mut nodes = Stopper {
        sh: sh.clone(),
        threads: Vec::new(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (sh, topo) = (sh.clone(), topo.clone());
        let rb = a.rx_bufs;
        nodes
            .threads
            .push(std::thread::spawn(move || receiver(sh, topo, rb, tx)));
    }
    rx.recv().context("the receiver thread ended")??;
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (sh, topo) = (sh.clone(), topo.clone());
        let (rb, inf) = (a.rx_bufs, a.in_flight);
        nodes.threads.push(std::thread::spawn(move || {
            main_sender(sh, topo, rb, inf, tx)
        }));
    }
    rx.recv().context("the main sender thread ended")??;
    let t0 = Instant::now();
    *sh.t0.lock().unwrap() = Some(t0);
    sh.event("traffic starts".into());
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let mut churn = Stopper {
        sh: sh.clone(),
        threads: Vec::new(),
    };
    for (j, sessions) in plan.churn.iter().enumerate() {
        let (sh, topo) = (sh.clone(), topo.clone());
        let ss: Vec<(Instant, Instant)> = sessions.iter().map(|&(s, e)| (at(s), at(e))).collect();
        let rb = a.rx_bufs;
        churn.threads.push(std::thread::spawn(move || {
            churn_peer(sh, topo, j as u32 + 1, ss, rb)
        }));
    }
    let csv_path = a.out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    writeln!(csv, "{CSV_HEADER}")?;
    let mut samples: Vec<Sample> = Vec::new();
    let take = |samples: &mut Vec<Sample>, csv: &mut std::fs::File| -> Result<()> {
        let s = sample(&sh);
        for r in &s {
            writeln!(csv, "{}", r.csv())?;
        }
        csv.flush()?;
        if let Some(r) = s.iter().find(|r| r.node == "recv") {
            eprintln!(
                "soak {:8.1} s  sample: {} engines, recv RSS {} KiB, RX held {}; PUTs handed {} ok {} failed {} verified {}",
                r.t_s,
                s.len(),
                opt(r.vm_rss_kib),
                opt(r.rx_pool_held),
                r.counts.handed,
                r.counts.ok,
                r.counts.failed,
                r.counts.verified
            );
        }
        samples.extend(s);
        Ok(())
    };
    take(&mut samples, &mut csv)?;
    let mut next_sample = a.sample_s;
    let mut restarted = false;
    loop {
        let t = t0.elapsed().as_secs_f64();
        if t >= plan.send_end_s {
            break;
        }
        if !restarted && t >= plan.restart_s {
            restarted = true;
            sh.restart.store(true, Ordering::SeqCst);
        }
        if t >= next_sample {
            take(&mut samples, &mut csv)?;
            next_sample += a.sample_s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sh.stop_sending.store(true, Ordering::SeqCst);
    // Draining: the churn peers end their sessions, the main sender its last PUTs.
    while let Some(c) = churn.threads.first() {
        if c.is_finished() {
            let _ = churn.threads.remove(0).join();
            continue;
        }
        if t0.elapsed().as_secs_f64() >= next_sample {
            take(&mut samples, &mut csv)?;
            next_sample += a.sample_s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let settle = Instant::now() + DRAIN + Duration::from_secs(10);
    loop {
        let idle = sh
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.1 == "send: idle");
        if idle || Instant::now() > settle {
            break;
        }
        if t0.elapsed().as_secs_f64() >= next_sample {
            take(&mut samples, &mut csv)?;
            next_sample += a.sample_s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Idle: completions and arrivals are in, the engines publish their counters
    // every few milliseconds.
    std::thread::sleep(Duration::from_secs(3));
    take(&mut samples, &mut csv)?;
    sh.event("all senders idle: end checks".into());
    // The receiver and the main sender take their end checks and close.
    drop(nodes);
    let relay_stats: Vec<serde_json::Value> = relays
        .into_iter()
        .map(|r| match r.stop() {
            Ok(s) => serde_json::json!({
                "forward_offered": s.forward.offered.packets,
                "forward_delivered": s.forward.delivered.packets,
                "forward_lost": s.forward.dropped_loss.packets,
                "forward_queue_drops": s.forward.dropped_queue.packets,
                "reverse_delivered": s.reverse.delivered.packets,
                "reverse_lost": s.reverse.dropped_loss.packets,
            }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let engines = sh.engines.lock().unwrap().clone();
    let series = rss_series(&samples, &engines, t0);
    let pools = sh.pools.lock().unwrap().clone();
    let restart = sh.restart_report.lock().unwrap().clone();
    let mut verdict = judge(
        &sh.ledger.lock().unwrap(),
        &pools,
        &series,
        plan.warmup_s,
        restart.as_ref(),
    );
    if restart.is_none() {
        verdict
            .failures
            .push("the engine restart did not happen".into());
    }
    if let Some(f) = sh.failure.lock().unwrap().clone() {
        verdict.failures.push(f);
    }
    verdict.pass = verdict.failures.is_empty();
    let plots = plot(&samples, &series, &a.out, &plan)?;
    let report = SoakReport {
        minutes: a.minutes,
        sample_s: a.sample_s,
        in_flight: a.in_flight,
        churn_peers: a.churn_peers,
        churn_rate_mbps: a.churn_rate_mbps,
        rx_bufs: a.rx_bufs,
        plan: &plan,
        restart,
        events: sh.events.lock().unwrap().clone(),
        pools,
        relays: relay_stats,
        verdict: &verdict,
        samples: &samples,
    };
    let json_path = a.out.join("soak.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    print_summary(&verdict, &report);
    println!(
        "files: {}, {}, {}",
        csv_path.display(),
        json_path.display(),
        plots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !verdict.pass {
        eprintln!("soak FAILED:");
        for f in &verdict.failures {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
    println!("soak passed");
    Ok(())
}

fn kib(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

fn print_summary(v: &Verdict, r: &SoakReport<'_>) {
    let c = &v.counts;
    println!(
        "PUTs: {} messages, {} sends handed, {} Ok, {} failed back, {} arrivals, {} verified",
        v.messages, c.handed, c.ok, c.failed, c.received, c.verified
    );
    println!(
        "  lost {}, without completion {}, given up {}, corrupt {}, duplicates {}",
        v.lost, v.unfinished, v.given_up, v.corrupt, v.duplicates
    );
    println!(
        "  failed back during the restart (by design): {:?}; of those delivered anyway and again by the resend: {}",
        v.failed_in_restart, v.delivered_twice_after_restart_failure
    );
    if let Some(rs) = &r.restart {
        println!(
            "restart: SIGTERM at {:.1} s, old engine {}, new engine attached at {}, {} Ok after",
            rs.sigterm_s,
            rs.exit.as_deref().unwrap_or("?"),
            rs.attached_s
                .map_or("never".into(), |t| format!("{t:.1} s")),
            rs.ok_after
        );
    }
    for g in &v.rss {
        println!(
            "RSS {} #{}: floor {} KiB at {:.0} s, late floor {} KiB at {:.0} s ({:+.1} %), peak {} KiB at {:.0} s (RssAnon {} -> {}, RssShmem {} -> {} KiB)",
            g.node,
            g.incarnation,
            g.baseline_kib,
            g.baseline_s,
            g.late_kib,
            g.late_s,
            g.growth * 100.0,
            g.peak_kib,
            g.peak_s,
            kib(g.anon_kib.0),
            kib(g.anon_kib.1),
            kib(g.shmem_kib.0),
            kib(g.shmem_kib.1),
        );
    }
    for n in &v.notes {
        println!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(started_s: f64, pts: &[(f64, u64)]) -> RssSeries {
        RssSeries {
            node: "recv".into(),
            incarnation: 1,
            started_s,
            points: pts.to_vec(),
            anon: Vec::new(),
            shmem: Vec::new(),
        }
    }

    #[test]
    fn warmup_is_a_tenth_of_the_run_at_most_five_minutes() {
        assert_eq!(warmup_s(180.0), 18.0);
        assert_eq!(warmup_s(3600.0), 300.0);
        let p = Plan::new(3600.0, 2);
        assert_eq!(p.restart_s, 1800.0);
        assert_eq!(p.send_end_s, 3240.0);
        assert_eq!(p.churn.len(), 2);
        // Every churn session ends before the main sender stops.
        assert!(p
            .churn
            .iter()
            .flatten()
            .all(|&(s, e)| s < e && e < p.send_end_s));
    }

    #[test]
    fn rss_growth_counts_from_the_first_sample_after_warm_up() {
        // Growth during warm-up (100 -> 200) is not counted; 200 -> 209 is 4.5 %.
        let s = series(0.0, &[(0.0, 100), (10.0, 200), (20.0, 205), (30.0, 209)]);
        let g = rss_growth(&s, 10.0).unwrap();
        assert_eq!((g.baseline_kib, g.late_kib, g.peak_kib), (200, 209, 209));
        assert!((g.growth - 0.045).abs() < 1e-9);
        let v = judge(&Ledger::default(), &[], &[s], 10.0, None);
        assert!(v.pass, "{:?}", v.failures);
        // A peak that comes back down (a peer's burst) is load, not growth.
        let s = series(
            0.0,
            &[
                (0.0, 100),
                (10.0, 200),
                (20.0, 400),
                (30.0, 380),
                (40.0, 203),
            ],
        );
        let g = rss_growth(&s, 10.0).unwrap();
        assert_eq!((g.late_kib, g.peak_kib), (203, 400));
        assert!(judge(&Ledger::default(), &[], &[s], 10.0, None).pass);
        // A floor that rises, 200 -> 211 (5.5 %), fails, naming the node.
        let s = series(0.0, &[(0.0, 100), (10.0, 200), (20.0, 230), (30.0, 211)]);
        let v = judge(&Ledger::default(), &[], &[s], 10.0, None);
        assert!(!v.pass);
        assert!(
            v.failures[0].contains("recv") && v.failures[0].contains("5.5 %"),
            "{:?}",
            v.failures
        );
        // A restarted process's warm-up starts at its own start.
        let s = series(100.0, &[(100.0, 50), (105.0, 100), (110.0, 120)]);
        assert!(rss_growth(&s, 10.0).is_none());
        let v = judge(&Ledger::default(), &[], &[s], 10.0, None);
        assert!(v.pass && v.notes[0].contains("not measured"));
    }

    fn msg(ok: bool, received: u32, fails: &[(&str, bool)]) -> MsgState {
        MsgState {
            attempts: 1 + fails.len() as u32,
            pending: 0,
            ok,
            fails: fails
                .iter()
                .map(|&(s, r)| FailBack {
                    status: s.into(),
                    in_restart: r,
                })
                .collect(),
            received,
            corrupt: 0,
        }
    }

    #[test]
    fn accounting_passes_a_clean_run_with_restart_failures_named() {
        let mut l = Ledger::default();
        l.msgs.insert((0, 0), msg(true, 1, &[]));
        // Failed back by the SIGTERM's drain, resent, delivered once.
        l.msgs.insert((0, 1), msg(true, 1, &[("Shutdown", true)]));
        // The receiver had it already: the resend arrives a second time.
        l.msgs.insert((0, 2), msg(true, 2, &[("EngineGone", true)]));
        let v = judge(&l, &[], &[], 10.0, None);
        assert!(v.pass, "{:?}", v.failures);
        assert_eq!(v.failed_in_restart.get("Shutdown"), Some(&1));
        assert_eq!(v.failed_in_restart.get("EngineGone"), Some(&1));
        assert_eq!(v.delivered_twice_after_restart_failure, 1);
        assert_eq!(v.counts.handed, 5);
        assert_eq!(v.counts.verified, 4);
    }

    #[test]
    fn accounting_fails_on_loss_duplicates_stray_failures_and_open_slots() {
        let cases: Vec<(MsgState, &str)> = vec![
            (msg(true, 0, &[]), "lost"),
            (msg(true, 2, &[]), "more than once"),
            (
                msg(true, 1, &[("TimedOut", false)]),
                "outside the restart window",
            ),
            // A restart window is no excuse for a status a restart does not give.
            (
                msg(true, 1, &[("PeerUnreachable", true)]),
                "outside the restart window",
            ),
            (
                msg(false, 0, &[("Shutdown", true); 4]),
                "never completed Ok",
            ),
            (
                MsgState {
                    attempts: 1,
                    pending: 1,
                    ..Default::default()
                },
                "without a completion",
            ),
            (
                MsgState {
                    attempts: 1,
                    ok: true,
                    received: 0,
                    corrupt: 1,
                    ..Default::default()
                },
                "payload other than",
            ),
        ];
        for (m, want) in cases {
            let mut l = Ledger::default();
            l.msgs.insert((1, 7), m.clone());
            let v = judge(&l, &[], &[], 10.0, None);
            assert!(!v.pass, "{m:?} passed");
            assert!(
                v.failures
                    .iter()
                    .any(|f| f.contains(want) && (f.contains("1:7") || !f.contains("sender:seq"))),
                "{m:?}: {:?}",
                v.failures
            );
        }
    }

    #[test]
    fn pools_must_be_whole_when_idle() {
        let clean = PoolCheck {
            node: "recv".into(),
            session: 1,
            engine_rx_held: Some(0),
            engine_tx_in_flight: Some(0),
            engine_settle_s: Some(0.0),
            kshim_pending: 0,
            tx_free: 4096,
            tx_free_at_attach: 4096,
            rx_delivered: 10,
            rx_returned: 10,
        };
        assert!(
            judge(
                &Ledger::default(),
                std::slice::from_ref(&clean),
                &[],
                10.0,
                None
            )
            .pass
        );
        let bad = [
            (
                PoolCheck {
                    engine_rx_held: Some(3),
                    ..clean.clone()
                },
                "3 RX buffers",
            ),
            (
                PoolCheck {
                    engine_tx_in_flight: Some(1),
                    ..clean.clone()
                },
                "1 TX messages",
            ),
            (
                PoolCheck {
                    engine_rx_held: None,
                    ..clean.clone()
                },
                "unreadable",
            ),
            (
                PoolCheck {
                    kshim_pending: 2,
                    ..clean.clone()
                },
                "2 sends pending",
            ),
            (
                PoolCheck {
                    tx_free: 4080,
                    ..clean.clone()
                },
                "4080 chunks free",
            ),
            (
                PoolCheck {
                    rx_returned: 9,
                    ..clean.clone()
                },
                "gave back 9",
            ),
        ];
        for (p, want) in bad {
            let v = judge(&Ledger::default(), &[p], &[], 10.0, None);
            assert!(
                !v.pass
                    && v.failures
                        .iter()
                        .any(|f| f.contains(want) && f.contains("recv")),
                "{want}: {:?}",
                v.failures
            );
        }
    }

    #[test]
    fn restart_must_reattach_and_carry_on() {
        let none = Restart::default();
        let v = judge(&Ledger::default(), &[], &[], 10.0, Some(&none));
        assert!(v.failures.iter().any(|f| f.contains("never attached")));
        let stalled = Restart {
            attached_s: Some(91.0),
            ..Default::default()
        };
        let v = judge(&Ledger::default(), &[], &[], 10.0, Some(&stalled));
        assert!(v.failures.iter().any(|f| f.contains("did not continue")));
        let fine = Restart {
            attached_s: Some(91.0),
            ok_after: 5,
            ..Default::default()
        };
        assert!(judge(&Ledger::default(), &[], &[], 10.0, Some(&fine)).pass);
    }

    #[test]
    fn payloads_differ_by_sender_sequence_and_position() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        payload(0, 1, 4096, &mut a);
        payload(1, 1, 4096, &mut b);
        payload(0, 2, 4096, &mut c);
        assert_eq!(a.len(), 4096);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[..8], a[8..16]);
        let mut d = Vec::new();
        payload(0, 1, 4096, &mut d);
        assert_eq!(a, d);
    }

    #[test]
    fn arguments_are_checked() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: SoakArgs,
        }
        let p = |args: &[&str]| {
            T::try_parse_from(std::iter::once("soak").chain(args.iter().copied())).map(|t| t.a)
        };
        let d = p(&[]).unwrap();
        assert_eq!((d.minutes, d.sample_s, d.churn_peers), (60.0, 60.0, 2));
        assert!(d.check().is_ok());
        let short = p(&["--minutes", "3", "--sample-s", "10"]).unwrap();
        assert!(short.check().is_ok());
        let e = p(&["--minutes", "3"])
            .unwrap()
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--sample-s 60") && e.contains("sample more often"),
            "{e}"
        );
        let e = p(&["--minutes", "0"])
            .unwrap()
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--minutes 0"), "{e}");
        assert!(p(&["--churn-peers", "5"]).is_err());
    }
}
