//! The report: one [`Row`] per contender × cell, as a table on stdout, JSON
//! (an array of rows), CSV, and SVG plots (goodput against loss per
//! contender; goodput over time per cell).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::collect::Percentiles;
use crate::scenario::WorkloadKind;

/// The result of one contender in one cell.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Cell label.
    pub cell: String,
    /// Contender name.
    pub contender: String,
    /// Emulator: "relay" (UDP, rootless) or "tun" (namespaces, root).
    pub path: String,
    /// Workload kind.
    pub workload: String,
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Random loss per direction.
    pub loss: f64,
    /// Bottleneck rate, Mbit/s.
    pub rate_mbps: f64,
    /// "ok", "incomplete" (ran out of time), "skipped: why" or "failed: why".
    pub status: String,
    /// Payload bytes the workload asks to move: bulk `bytes`, rpc requests
    /// and replies, the live stream's chunks.
    pub bytes_target: u64,
    /// Payload bytes delivered.
    pub bytes: u64,
    /// Payload goodput, Mbit/s: payload bytes delivered over the time from
    /// the sender's first payload byte to the last byte delivered (finished)
    /// or to the stop (unfinished); start-up, outages and the last data's
    /// time in the link count, so it cannot exceed the link's rate. None for
    /// rpc and for a run that delivered nothing.
    pub goodput_mbps: Option<f64>,
    /// goodput / (rate × (1 − loss)).
    pub utilization: Option<f64>,
    /// Steady-state goodput, Mbit/s, of a finished bulk run without an
    /// outage: the payload delivered after the first progress report one
    /// round trip past the first delivery, over the time from that report to
    /// the last delivery plus one round trip with a full bottleneck queue
    /// (`collect::steady_mbps`); None when that spans fewer than 8 round trips.
    pub steady_mbps: Option<f64>,
    /// Seconds from the sender's start until 1 s of goodput reached 90 % of the link.
    pub time_to_90_s: Option<f64>,
    /// Seconds from the end of the outage until 0.5 s of goodput reached 90 % again.
    pub recovery_s: Option<f64>,
    /// Retransmitted bytes as the transport counts them (lu2k: engine, TCP: kernel).
    pub retrans_bytes: Option<u64>,
    /// Bytes the sender put on the emulated link (forward direction, offered).
    pub wire_bytes: Option<u64>,
    /// Forward-direction datagrams the link dropped: at the bottleneck queue
    /// (the sender overran the buffer), and at random (the cell's loss).
    pub queue_drops: Option<u64>,
    /// See `queue_drops`.
    pub loss_drops: Option<u64>,
    /// CPU seconds the run cost, counted fairly: the machine's busy time
    /// (`/proc/stat`) less the harness process's user time and other user
    /// processes' time, so the kernel's work for the contender is in it
    /// wherever it ran (`collect::CpuSpent::fair_s`).
    pub cpu_s: Option<f64>,
    /// `cpu_s` per GB (10^9 bytes) of payload delivered.
    pub cpu_s_per_gb: Option<f64>,
    /// CPU seconds of the contender's processes alone (user + system,
    /// `RUSAGE_CHILDREN`): kernel work done while another task ran is not in it.
    pub proc_cpu_s: Option<f64>,
    /// `proc_cpu_s` per GB of payload delivered.
    pub proc_cpu_s_per_gb: Option<f64>,
    /// The harness process's system seconds over the run: the emulator's
    /// socket or TUN calls with the contender's network-stack work the
    /// kernel does inside them. Inside `cpu_s`; `cpu_s − harness_sys_s` is
    /// a lower bound of the contender's cost.
    pub harness_sys_s: Option<f64>,
    /// CPU seconds of other user processes over the run (left out of `cpu_s`).
    pub others_cpu_s: Option<f64>,
    /// rpc round trips or live delivery latency.
    pub latency: Option<Percentiles>,
    /// Payload bytes copied by lu2k (lu2k only).
    pub copied_bytes: Option<u64>,
    /// Peak resident memory of a lu2k node, MiB: its engine's plus its own
    /// process's (which holds kshim), the larger of the two nodes (lu2k only).
    pub max_rss_mib: Option<f64>,
    /// Notes from the nodes.
    pub note: Option<String>,
    /// Goodput over time: (seconds since the sender started, Mbit/s), 0.5 s bins.
    pub goodput_series: Vec<(f64, f64)>,
    /// The machine's load averages when the row started and ended.
    pub load_avg: Option<LoadAvg>,
    /// The contender's settings as its nodes applied them ([`crate::tuning`]).
    pub tuning: Option<String>,
    /// Runs made of this contender in this cell (`--runs`); the row's
    /// figures are the run with the median goodput's.
    pub runs: u32,
    /// Every run's goodput, Mbit/s, in run order (None: moved nothing).
    pub goodput_runs: Vec<Option<f64>>,
    /// The spread: the lowest and highest goodput of the runs.
    pub goodput_min: Option<f64>,
    /// See `goodput_min`.
    pub goodput_max: Option<f64>,
    /// The largest share of CPU time stolen by the hypervisor during a run
    /// (`/proc/stat`), 0 to 1.
    pub steal: Option<f64>,
    /// rpc and live: every run's p99 latency, ms, in run order.
    pub p99_runs_ms: Vec<Option<f64>>,
    /// live: the deadline a chunk is late beyond, ms after it was due: the
    /// one-way delay plus [`LIVE_LATE_RTTS`] round trips.
    pub late_after_ms: Option<f64>,
    /// live: chunks delivered later than `late_after_ms`, or never.
    pub late_chunks: Option<u64>,
    /// live: (seconds into the stream the chunk was due, its latency ms),
    /// per chunk in stream order (never-delivered chunks at their age when
    /// the receiver stopped).
    pub latency_series: Vec<(f64, f64)>,
    /// The address family of the nodes, the relay and the engines: "ipv4" or
    /// "ipv6".
    pub family: String,
    /// A cell with several links: the policy, each link, and the cell's goal.
    pub links: Option<LinksFigures>,
}

/// What a several-link cell measures. Utilization (the row's) is goodput over
/// what all the links can carry together, so it stays at or under 100 %
/// whatever the policy; the goal is measured against its own reference, over
/// a window (`goal_window_s`) that leaves out what no transport can avoid, and
/// `whole_*` is the same ratio without that allowance:
///
/// - **failover** with an outage: the receiver's goodput during the outage
///   after the switch, over the surviving link's capacity (goal ≥ 0.9). The
///   outage is shifted by the one-way delay, when its effect reaches the
///   receiver (datagrams already on the wire when it starts still arrive,
///   and those sent in its last one-way delay arrive after it); the window
///   runs from the outage's start plus `switch_s` (or, with no switch, from
///   when the receiver feels it plus 3 RTT) to that shifted end. At a long
///   round trip the silence takes ≥ 1.25 RTT to detect and the other link's
///   controller about one more to pace at its rate: that is the recovery,
///   measured by `switch_s`. `whole_*`: the whole shifted outage.
/// - **balance**: the receiver's goodput while every link carries — from the
///   end of the last link's first 0.5 s at half its rate or more on the wire
///   (start-up: connections, each controller's first round trip) to the start
///   of the first link's last such 0.5 s (the tail, when the links drain one
///   by one) — over the sum of the links' capacities (goal ≥ 0.9).
///   `whole_*`: the row's goodput over the same sum.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LinksFigures {
    /// "failover" or "balance".
    pub policy: String,
    /// Each link, in configuration order.
    pub links: Vec<LinkFigures>,
    /// What the goal is, in words.
    pub goal: String,
    /// What the goal is measured against, Mbit/s: the links' wire capacity,
    /// rate × (1 − loss) (the surviving link's, or the sum of the links'), so
    /// payload, behind its packet headers, stays a few per cent under it.
    pub goal_ref_mbps: f64,
    /// The measured figure, Mbit/s (goodput through the outage, or the row's goodput).
    pub goal_mbps: Option<f64>,
    /// `goal_mbps / goal_ref_mbps`; the goal is ≥ 0.9.
    pub goal_ratio: Option<f64>,
    /// The window `goal_mbps` was measured over, seconds on time zero's clock;
    /// none shorter than 8 RTT and 4 × the time the links carry the bytes in
    /// flight (`goal_mbps` is None then, and `goal` says why).
    pub goal_window_s: Option<(f64, f64)>,
    /// The same figure without the allowance: the whole shifted outage
    /// (failover), the whole transfer (balance), Mbit/s.
    pub whole_mbps: Option<f64>,
    /// `whole_mbps / goal_ref_mbps`.
    pub whole_ratio: Option<f64>,
    /// failover: seconds from the outage's start until 0.5 s of goodput
    /// reached 90 % of the surviving link's capacity.
    pub switch_s: Option<f64>,
    /// failover: seconds from the outage's end until the link that was out
    /// carried 90 % of its rate again on the wire (its forward direction's
    /// delivered bytes over 0.5 s), i.e. traffic moved back.
    pub back_s: Option<f64>,
    /// Every run's `goal_ratio`, `whole_ratio`, `switch_s` and `back_s`, in
    /// run order.
    #[serde(default)]
    pub goal_ratio_runs: Vec<Option<f64>>,
    /// See `goal_ratio_runs`.
    #[serde(default)]
    pub whole_ratio_runs: Vec<Option<f64>>,
    /// See `goal_ratio_runs`.
    #[serde(default)]
    pub switch_runs: Vec<Option<f64>>,
    /// See `goal_ratio_runs`.
    #[serde(default)]
    pub back_runs: Vec<Option<f64>>,
}

/// One link of a several-link cell in a row.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LinkFigures {
    /// Forward rate, Mbit/s.
    pub rate_mbps: f64,
    /// Share in balance.
    pub weight: u32,
    /// The link's outage `[start_s, start_s + duration_s)` on its emulator's
    /// clock, if it has one.
    pub outage: Option<(f64, f64)>,
    /// Bytes the link delivered forward: UDP payload, retransmissions
    /// included (the 28 header bytes a datagram costs count in its rate,
    /// not here).
    pub wire_bytes: Option<u64>,
    /// `wire_bytes` over the run (time zero to its end), Mbit/s.
    pub wire_mbps: Option<f64>,
    /// The link's forward delivered rate over time: (seconds since time
    /// zero, Mbit/s), 0.5 s bins.
    pub wire_series: Vec<(f64, f64)>,
}

/// A live chunk is late when it is delivered more than the one-way delay
/// plus this many round trips after it was due (issue 18's goal for lu2k's
/// p99 at 1 % loss).
pub const LIVE_LATE_RTTS: f64 = 1.5;

/// Load averages (1, 5 and 15 minutes, `/proc/loadavg`) around a row.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct LoadAvg {
    /// Before the (first) run.
    pub start: [f64; 3],
    /// After the (last) run.
    pub end: [f64; 3],
    /// The highest 1-minute figure read before or after any of the runs.
    pub peak_1m: f64,
}

/// Steal time above this share of the CPU time marks a run as loaded.
pub const STEAL_LOADED: f64 = 0.05;

impl LoadAvg {
    /// Load averages read before and after one run.
    pub fn new(start: [f64; 3], end: [f64; 3]) -> LoadAvg {
        LoadAvg {
            start,
            end,
            peak_1m: start[0].max(end[0]),
        }
    }

    /// A note if the row's runs shared the machine: the 1-minute load
    /// average read before or after a run exceeded the CPUs this process may
    /// use, or the hypervisor stole more than [`STEAL_LOADED`] of the CPU
    /// time during a run. Its figures may then read low.
    pub fn loaded(&self, steal: Option<f64>) -> Option<String> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = self.peak_1m > cpus as f64;
        let stolen = steal.filter(|&s| s > STEAL_LOADED);
        (busy || stolen.is_some()).then(|| {
            let mut n = format!(
                "loaded machine: 1-minute load average {:.2} → {:.2} (peak {:.2}) on {cpus} CPUs",
                self.start[0], self.end[0], self.peak_1m
            );
            if let Some(s) = stolen {
                n += &format!(", {:.0} % steal", s * 100.0);
            }
            n
        })
    }
}

/// One row from the `runs` of one contender in one cell (at least one, in
/// run order): the median run — bulk by goodput (runs that moved nothing
/// lowest), rpc and live by p99 latency (runs without samples highest); of an
/// even count the lower middle — with every run's goodput (and p99), the
/// spread, the load over all runs, the most steal, and a note when the
/// runs' outcomes differ.
pub fn combine(runs: Vec<Row>) -> Row {
    let n = runs.len();
    assert!(n > 0, "combine needs at least one run");
    let goodputs: Vec<Option<f64>> = runs.iter().map(|r| r.goodput_mbps).collect();
    let p99s: Vec<Option<f64>> = runs.iter().map(|r| r.latency.map(|l| l.p99_ms)).collect();
    let by_latency = runs[0].workload != "bulk";
    let key = |i: usize| {
        if by_latency {
            p99s[i].unwrap_or(f64::INFINITY)
        } else {
            goodputs[i].unwrap_or(-1.0)
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
    let pick = order[(n - 1) / 2];
    let ok = runs.iter().filter(|r| r.status == "ok").count();
    let load = runs
        .iter()
        .filter_map(|r| r.load_avg)
        .reduce(|a, b| LoadAvg {
            start: a.start,
            end: b.end,
            peak_1m: a.peak_1m.max(b.peak_1m),
        });
    let steal = runs.iter().filter_map(|r| r.steal).reduce(f64::max);
    let some: Vec<f64> = goodputs.iter().flatten().copied().collect();
    let per_run = |f: fn(&LinksFigures) -> Option<f64>| -> Vec<Option<f64>> {
        runs.iter().map(|r| r.links.as_ref().and_then(f)).collect()
    };
    let goal_runs = per_run(|l| l.goal_ratio);
    let whole_runs = per_run(|l| l.whole_ratio);
    let switch_runs = per_run(|l| l.switch_s);
    let back_runs = per_run(|l| l.back_s);
    let mut row = runs.into_iter().nth(pick).expect("pick < n");
    if let Some(l) = row.links.as_mut() {
        l.goal_ratio_runs = goal_runs;
        l.whole_ratio_runs = whole_runs;
        l.switch_runs = switch_runs;
        l.back_runs = back_runs;
    }
    // The run's own load note gives way to the one for all runs.
    row.note = row
        .note
        .take()
        .map(|n| {
            n.split("; ")
                .filter(|p| !p.starts_with("loaded machine"))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|n| !n.is_empty());
    let mut extra = Vec::new();
    if n > 1 && ok != n && ok != 0 {
        extra.push(format!("{ok} of {n} runs complete"));
    }
    if let Some(l) = load.as_ref().and_then(|l| l.loaded(steal)) {
        extra.push(l);
    }
    for e in extra {
        row.note = Some(match row.note.take() {
            Some(x) => format!("{x}; {e}"),
            None => e,
        });
    }
    row.runs = n as u32;
    row.goodput_min = some.iter().copied().reduce(f64::min);
    row.goodput_max = some.iter().copied().reduce(f64::max);
    row.goodput_runs = goodputs;
    if by_latency {
        row.p99_runs_ms = p99s;
    }
    row.load_avg = load;
    row.steal = steal;
    row
}

impl Row {
    /// A row for a contender that did not run (skipped or failed).
    pub fn not_run(
        scenario: &str,
        cell: &crate::scenario::Cell,
        contender: &str,
        path: &str,
        status: String,
    ) -> Row {
        Row {
            scenario: scenario.to_string(),
            cell: cell.name.clone(),
            contender: contender.to_string(),
            path: path.to_string(),
            workload: format!("{:?}", cell.workload.kind).to_lowercase(),
            rtt_ms: cell.rtt_ms,
            loss: cell.loss,
            // Several links: their rates together.
            rate_mbps: if cell.links.is_empty() {
                cell.rate_mbps
            } else {
                cell.links.iter().map(|l| l.rate_mbps).sum()
            },
            status,
            // What the workload asks to move: bulk bytes, rpc requests and
            // replies, the live stream's chunks.
            bytes_target: match cell.workload.kind {
                WorkloadKind::Bulk => cell.workload.bytes,
                WorkloadKind::Rpc => {
                    2 * u64::from(cell.workload.size) * u64::from(cell.workload.count)
                }
                WorkloadKind::Live => {
                    crate::node::LiveSchedule::of(&cell.workload).chunks
                        * u64::from(cell.workload.chunk_bytes)
                }
            },
            bytes: 0,
            goodput_mbps: None,
            utilization: None,
            steady_mbps: None,
            time_to_90_s: None,
            recovery_s: None,
            retrans_bytes: None,
            wire_bytes: None,
            queue_drops: None,
            loss_drops: None,
            cpu_s: None,
            cpu_s_per_gb: None,
            proc_cpu_s: None,
            proc_cpu_s_per_gb: None,
            harness_sys_s: None,
            others_cpu_s: None,
            latency: None,
            copied_bytes: None,
            max_rss_mib: None,
            note: None,
            goodput_series: Vec::new(),
            late_after_ms: None,
            late_chunks: None,
            latency_series: Vec::new(),
            load_avg: None,
            tuning: None,
            runs: 1,
            goodput_runs: Vec::new(),
            goodput_min: None,
            goodput_max: None,
            steal: None,
            p99_runs_ms: Vec::new(),
            family: if cell.ipv6 { "ipv6" } else { "ipv4" }.into(),
            links: None,
        }
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// The table printed on stdout.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<10} {:>9} {:>13} {:>6} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>5}  status",
        "cell",
        "contender",
        "Mbit/s",
        "min-max",
        "util",
        "steady",
        "t90 s",
        "rec s",
        "retx MB",
        "CPU s/GB",
        "proc s/GB",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "late",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<22} {:<10} {:>9} {:>13} {:>6} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>5}  {}",
            r.cell,
            r.contender,
            opt(r.goodput_mbps, 1),
            match (r.goodput_min, r.goodput_max) {
                (Some(a), Some(b)) if r.runs > 1 => format!("{a:.1}-{b:.1}"),
                _ => "-".into(),
            },
            r.utilization
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            opt(r.steady_mbps, 1),
            opt(r.time_to_90_s, 1),
            opt(r.recovery_s, 1),
            opt(r.retrans_bytes.map(|b| b as f64 / 1e6), 1),
            opt(r.cpu_s_per_gb, 1),
            opt(r.proc_cpu_s_per_gb, 1),
            opt(r.latency.map(|l| l.p50_ms), 1),
            opt(r.latency.map(|l| l.p90_ms), 1),
            opt(r.latency.map(|l| l.p99_ms), 1),
            r.late_chunks.map_or("-".into(), |n| n.to_string()),
            r.status
        );
    }
    s += &links_table(rows);
    s
}

/// The several-link rows' goals, under the main table (empty without such
/// rows): the goal's reference and figure, the median run's and every run's
/// ratio, the same ratio without the goal's allowance (`whole`), the switch
/// and move-back times, and each link's wire rate.
pub fn links_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let runs = |v: &[Option<f64>], prec: usize| {
        v.iter()
            .map(|x| opt(*x, prec))
            .collect::<Vec<_>>()
            .join("/")
    };
    for r in rows {
        let Some(l) = &r.links else { continue };
        if s.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<30} {:<10} {:<9} {:>8} {:>8} {:>6} {:>17} {:>6} {:>17} {:>8} {:>8}  links' wire Mbit/s",
                "cell",
                "contender",
                "policy",
                "ref",
                "measured",
                "ratio",
                "runs' ratio",
                "whole",
                "runs' whole",
                "switch s",
                "back s"
            );
        }
        let wire = l
            .links
            .iter()
            .map(|k| opt(k.wire_mbps, 1))
            .collect::<Vec<_>>()
            .join(" + ");
        let _ = writeln!(
            s,
            "{:<30} {:<10} {:<9} {:>8} {:>8} {:>6} {:>17} {:>6} {:>17} {:>8} {:>8}  {wire}  ({})",
            r.cell,
            r.contender,
            l.policy,
            format!("{:.1}", l.goal_ref_mbps),
            opt(l.goal_mbps, 1),
            opt(l.goal_ratio, 2),
            runs(&l.goal_ratio_runs, 2),
            opt(l.whole_ratio, 2),
            runs(&l.whole_ratio_runs, 2),
            opt(l.switch_s, 2),
            opt(l.back_s, 2),
            l.goal
        );
    }
    s
}

/// Writes the rows as a JSON array.
pub fn write_json(rows: &[Row], path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The rows as CSV (no time series).
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "scenario,cell,contender,path,workload,rtt_ms,loss,rate_mbps,status,bytes_target,bytes,\
         goodput_mbps,utilization,steady_mbps,time_to_90_s,recovery_s,retrans_bytes,wire_bytes,queue_drops,\
         loss_drops,cpu_s,cpu_s_per_gb,proc_cpu_s,proc_cpu_s_per_gb,harness_sys_s,others_cpu_s,\
         max_rss_mib,p50_ms,p90_ms,p99_ms,max_ms,copied_bytes,runs,goodput_min,\
         goodput_max,steal,load_avg,family,policy,goal_ref_mbps,goal_mbps,goal_ratio,switch_s,back_s,whole_ratio\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    let u = |v: Option<u64>| v.map_or(String::new(), |x| x.to_string());
    for r in rows {
        let l = r.latency;
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&r.scenario),
            csv_field(&r.cell),
            r.contender,
            r.path,
            r.workload,
            r.rtt_ms,
            r.loss,
            r.rate_mbps,
            csv_field(&r.status),
            r.bytes_target,
            r.bytes,
            f(r.goodput_mbps),
            f(r.utilization),
            f(r.steady_mbps),
            f(r.time_to_90_s),
            f(r.recovery_s),
            u(r.retrans_bytes),
            u(r.wire_bytes),
            u(r.queue_drops),
            u(r.loss_drops),
            f(r.cpu_s),
            f(r.cpu_s_per_gb),
            f(r.proc_cpu_s),
            f(r.proc_cpu_s_per_gb),
            f(r.harness_sys_s),
            f(r.others_cpu_s),
            f(r.max_rss_mib),
            f(l.map(|l| l.p50_ms)),
            f(l.map(|l| l.p90_ms)),
            f(l.map(|l| l.p99_ms)),
            f(l.map(|l| l.max_ms)),
            u(r.copied_bytes),
            r.runs,
            f(r.goodput_min),
            f(r.goodput_max),
            f(r.steal),
            // 1-minute load average at the start and the end.
            r.load_avg
                .map_or(String::new(), |l| format!("{}/{}", l.start[0], l.end[0])),
            r.family,
            r.links.as_ref().map_or("", |l| l.policy.as_str()),
            f(r.links.as_ref().map(|l| l.goal_ref_mbps)),
            f(r.links.as_ref().and_then(|l| l.goal_mbps)),
            f(r.links.as_ref().and_then(|l| l.goal_ratio)),
            f(r.links.as_ref().and_then(|l| l.switch_s)),
            f(r.links.as_ref().and_then(|l| l.back_s)),
            f(r.links.as_ref().and_then(|l| l.whole_ratio)),
        );
    }
    s
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
    ];
    C[i % C.len()]
}

fn contenders(rows: &[Row]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in rows {
        if !v.contains(&r.contender) {
            v.push(r.contender.clone());
        }
    }
    v
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Goodput against loss, one line per contender, for the cells that share
/// the most common (rtt, rate) and have no outage. Returns the file, if any
/// plot was possible.
pub fn plot_vs_loss(rows: &[Row], dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let mut keys: Vec<((u64, u64), usize)> = Vec::new();
    for r in rows.iter().filter(|r| r.goodput_mbps.is_some()) {
        let k = (r.rtt_ms.to_bits(), r.rate_mbps.to_bits());
        match keys.iter_mut().find(|(x, _)| *x == k) {
            Some((_, n)) => *n += 1,
            None => keys.push((k, 1)),
        }
    }
    let Some(&((rtt, rate), _)) = keys.iter().max_by_key(|(_, n)| *n) else {
        return Ok(None);
    };
    let (rtt, rate) = (f64::from_bits(rtt), f64::from_bits(rate));
    let pick: Vec<&Row> = rows
        .iter()
        .filter(|r| r.rtt_ms == rtt && r.rate_mbps == rate && r.goodput_mbps.is_some())
        .filter(|r| !r.cell.contains("outage"))
        .collect();
    let losses: Vec<f64> = {
        let mut l: Vec<f64> = pick.iter().map(|r| r.loss * 100.0).collect();
        l.sort_by(|a, b| a.total_cmp(b));
        l.dedup();
        l
    };
    if losses.len() < 2 {
        return Ok(None);
    }
    let path = dir.join(format!("{}-goodput-vs-loss.svg", slug(name)));
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = losses.last().copied().unwrap_or(1.0).max(0.1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: goodput vs loss ({rate} Mbit/s, {rtt} ms RTT)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..xmax * 1.05, 0.0..rate * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("loss per direction (%)")
        .y_desc("goodput (Mbit/s)")
        .draw()?;
    for (i, c) in contenders(&pick.iter().map(|r| (*r).clone()).collect::<Vec<_>>())
        .iter()
        .enumerate()
    {
        let mut pts: Vec<(f64, f64)> = pick
            .iter()
            .filter(|r| &r.contender == c)
            .map(|r| (r.loss * 100.0, r.goodput_mbps.unwrap_or(0.0)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let col = color(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
            .label(c.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(Some(path.clone()))
}

/// Goodput over time in one cell, one line per contender.
pub fn plot_over_time(rows: &[Row], cell: &str, dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let pick: Vec<&Row> = rows
        .iter()
        .filter(|r| r.cell == cell && !r.goodput_series.is_empty())
        .collect();
    if pick.is_empty() {
        return Ok(None);
    }
    let tmax = pick
        .iter()
        .flat_map(|r| r.goodput_series.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ymax = pick
        .iter()
        .flat_map(|r| r.goodput_series.iter().map(|p| p.1))
        .fold(pick[0].rate_mbps, f64::max);
    let path = dir.join(format!("{}-{}-over-time.svg", slug(name), slug(cell)));
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: goodput over time, {cell}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the sender started")
        .y_desc("goodput (Mbit/s, 0.5 s bins)")
        .draw()?;
    for (i, r) in pick.iter().enumerate() {
        let col = color(i);
        chart
            .draw_series(LineSeries::new(
                r.goodput_series.clone(),
                col.stroke_width(2),
            ))?
            .label(r.contender.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(Some(path.clone()))
}

/// Live delivery latency over the stream in one cell, one line per
/// contender (log scale: a retransmission's round trip and a stall of
/// seconds on one chart), with the late deadline drawn.
pub fn plot_latency_over_time(
    rows: &[Row],
    cell: &str,
    dir: &Path,
    name: &str,
) -> Result<Option<PathBuf>> {
    let pick: Vec<&Row> = rows
        .iter()
        .filter(|r| r.cell == cell && !r.latency_series.is_empty())
        .collect();
    if pick.is_empty() {
        return Ok(None);
    }
    let all = || pick.iter().flat_map(|r| r.latency_series.iter());
    let tmax = all().map(|p| p.0).fold(1.0f64, f64::max);
    let ymax = all().map(|p| p.1).fold(10.0f64, f64::max);
    let ymin = all().map(|p| p.1).fold(f64::MAX, f64::min).max(1.0);
    let path = dir.join(format!("{}-{}-latency.svg", slug(name), slug(cell)));
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: delivery latency per chunk, {cell}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..tmax, (ymin * 0.9..ymax * 1.1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the stream (when the chunk was due)")
        .y_desc("delivery latency (ms, log)")
        .draw()?;
    if let Some(d) = pick[0].late_after_ms {
        chart
            .draw_series(LineSeries::new(vec![(0.0, d), (tmax, d)], BLACK.mix(0.5)))?
            .label(format!("late beyond {d:.0} ms"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for (i, r) in pick.iter().enumerate() {
        let col = color(i);
        chart
            .draw_series(LineSeries::new(
                r.latency_series.clone(),
                col.stroke_width(2),
            ))?
            .label(r.contender.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(Some(path.clone()))
}

/// One row's goodput in two result files, for [`compare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    /// Cell label.
    pub cell: String,
    /// Contender name.
    pub contender: String,
    /// Goodput in the first file, Mbit/s.
    pub a: Option<f64>,
    /// Goodput in the second file, Mbit/s.
    pub b: Option<f64>,
    /// (b − a) / a; None where either is missing or a is 0.
    pub change: Option<f64>,
}

/// The rows of two `--json` result files side by side, by (cell,
/// contender), and whether every row present in both moved by at most
/// `tolerance` (0.1 = ±10 %). A row with goodput in one file and none in the
/// other is unstable; a row with none in either is left out.
pub fn compare(
    a: &[serde_json::Value],
    b: &[serde_json::Value],
    tolerance: f64,
) -> (Vec<Compared>, bool) {
    let key = |r: &serde_json::Value| {
        (
            r["cell"].as_str().unwrap_or("").to_string(),
            r["contender"].as_str().unwrap_or("").to_string(),
        )
    };
    let mut out = Vec::new();
    let mut stable = true;
    for ra in a {
        let (cell, contender) = key(ra);
        let Some(rb) = b
            .iter()
            .find(|r| key(r) == (cell.clone(), contender.clone()))
        else {
            continue;
        };
        let (ga, gb) = (ra["goodput_mbps"].as_f64(), rb["goodput_mbps"].as_f64());
        if ga.is_none() && gb.is_none() {
            continue;
        }
        let change = match (ga, gb) {
            (Some(x), Some(y)) if x > 0.0 => Some((y - x) / x),
            _ => None,
        };
        if !change.is_some_and(|c| c.abs() <= tolerance) {
            stable = false;
        }
        out.push(Compared {
            cell,
            contender,
            a: ga,
            b: gb,
            change,
        });
    }
    (out, stable)
}

/// [`compare`]'s rows as a table.
pub fn compare_table(rows: &[Compared], tolerance: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<10} {:>9} {:>9} {:>8}  within ±{:.0} %",
        "cell",
        "contender",
        "A Mbit/s",
        "B Mbit/s",
        "change",
        tolerance * 100.0
    );
    for r in rows {
        let ok = r.change.is_some_and(|c| c.abs() <= tolerance);
        let _ = writeln!(
            s,
            "{:<22} {:<10} {:>9} {:>9} {:>8}  {}",
            r.cell,
            r.contender,
            opt(r.a, 1),
            opt(r.b, 1),
            r.change
                .map_or("-".into(), |c| format!("{:+.1}%", c * 100.0)),
            if ok { "yes" } else { "NO" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn rows() -> Vec<Row> {
        let s = Scenario::parse(
            r#"
name = "t"
contenders = ["lu2k", "udt4"]
[workload]
kind = "bulk"
bytes = 1000
[grid]
rtt_ms = [600.0]
loss = [0.0, 0.01]
rate_mbps = [100.0]
"#,
            "t.toml",
        )
        .unwrap();
        let mut out = Vec::new();
        for cell in s.cells(false) {
            for (i, c) in ["lu2k", "udt4"].iter().enumerate() {
                let mut r = Row::not_run("t", &cell, c, "relay", "ok".into());
                r.goodput_mbps = Some(90.0 - 30.0 * i as f64 - cell.loss * 100.0);
                r.utilization = Some(0.9);
                r.goodput_series = vec![(0.5, 10.0), (1.0, 80.0)];
                r.load_avg = Some(LoadAvg::new([0.5, 0.4, 0.3], [64.0 + i as f64, 2.0, 1.0]));
                r.cpu_s = Some(30.0);
                r.cpu_s_per_gb = Some(60.0);
                r.proc_cpu_s = Some(24.5);
                r.proc_cpu_s_per_gb = Some(49.0);
                r.harness_sys_s = Some(0.25);
                r.others_cpu_s = Some(0.125);
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn rows_read_back_as_written() {
        let rows = rows();
        let text = serde_json::to_string(&rows).unwrap();
        let back: Vec<Row> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rows);
    }

    /// `lu2k-perf report` reads the result files the repository ships (the
    /// README's tables come from them), older ones without today's fields too.
    #[test]
    fn shipped_result_files_read_as_rows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        let mut read = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            // Rows of `run`, `demo` and `loopback`'s own shape aside.
            let is_rows = name.starts_with("geo-")
                || name.starts_with("links-")
                || name.starts_with("live-")
                || name.starts_with("rpc-")
                || name.starts_with("demo-");
            if p.extension().is_none_or(|x| x != "json") || !is_rows {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let rows: Vec<Row> =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!rows.is_empty(), "{}", p.display());
            assert!(rows
                .iter()
                .all(|r| !r.cell.is_empty() && !r.contender.is_empty()));
            read += 1;
        }
        assert!(read >= 5, "only {read} result files read");
    }

    #[test]
    fn a_load_above_the_cpus_is_noted() {
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let l = |start, end| LoadAvg::new([start, 0.0, 0.0], [end, 0.0, 0.0]);
        assert_eq!(l(cpus, cpus).loaded(None), None);
        assert!(l(cpus + 0.5, 0.1)
            .loaded(None)
            .unwrap()
            .contains("loaded machine"));
        assert!(l(0.1, cpus + 0.5).loaded(Some(0.0)).is_some());
        // Steal above 5 % marks it too, and says how much.
        assert_eq!(l(0.1, 0.1).loaded(Some(0.05)), None);
        let n = l(0.1, 0.1).loaded(Some(0.2)).unwrap();
        assert!(n.contains("20 % steal"), "{n}");
    }

    #[test]
    fn two_result_files_compare_within_a_tolerance() {
        let row = |cell: &str, c: &str, g: Option<f64>| serde_json::json!({"cell": cell, "contender": c, "goodput_mbps": g});
        let a = vec![
            row("x", "lu2k", Some(100.0)),
            row("x", "udt4", Some(10.0)),
            row("y", "srt", None),
        ];
        let b = vec![
            row("x", "udt4", Some(10.9)),
            row("x", "lu2k", Some(91.0)),
            row("y", "srt", None),
        ];
        let (rows, stable) = compare(&a, &b, 0.10);
        assert!(stable);
        assert_eq!(rows.len(), 2, "a row without goodput in either is left out");
        assert!((rows[0].change.unwrap() + 0.09).abs() < 1e-9);
        let (_, stable) = compare(&a, &b, 0.08);
        assert!(!stable, "-9 % is outside ±8 %");
        // Goodput in one file and not the other is unstable.
        let c = vec![row("x", "lu2k", None), row("x", "udt4", Some(10.0))];
        let (rows, stable) = compare(&a, &c, 0.10);
        assert!(!stable);
        assert!(compare_table(&rows, 0.10).contains("NO"));
    }

    #[test]
    fn live_runs_combine_by_their_p99() {
        let mut base = rows()[0].clone();
        base.workload = "live".into();
        let run = |p99: Option<f64>| {
            let mut r = base.clone();
            r.goodput_mbps = Some(20.0);
            r.latency = p99.map(|p| Percentiles {
                p50_ms: 100.0,
                p90_ms: p.min(200.0),
                p99_ms: p,
                max_ms: p,
                samples: 10,
            });
            r
        };
        let r = combine(vec![run(Some(900.0)), run(None), run(Some(300.0))]);
        assert_eq!(r.latency.unwrap().p99_ms, 900.0, "the median p99");
        assert_eq!(r.p99_runs_ms, vec![Some(900.0), None, Some(300.0)]);
    }

    #[test]
    fn runs_combine_into_the_median_with_the_spread() {
        let base = &rows()[0];
        let run = |g: Option<f64>, status: &str, load: f64| {
            let mut r = base.clone();
            r.goodput_mbps = g;
            r.status = status.into();
            r.steal = Some(0.01);
            r.load_avg = Some(LoadAvg::new([load, 0.0, 0.0], [load, 0.0, 0.0]));
            r.note = LoadAvg::new([load, 0.0, 0.0], [load, 0.0, 0.0]).loaded(None);
            r.time_to_90_s = g.map(|g| g / 10.0);
            r
        };
        let r = combine(vec![
            run(Some(50.0), "ok", 0.1),
            run(Some(20.0), "incomplete", 0.2),
            run(Some(80.0), "ok", 0.3),
        ]);
        assert_eq!(r.runs, 3);
        assert_eq!(r.goodput_mbps, Some(50.0));
        // The median run's other figures come with it.
        assert_eq!(r.time_to_90_s, Some(5.0));
        assert_eq!((r.goodput_min, r.goodput_max), (Some(20.0), Some(80.0)));
        assert_eq!(r.goodput_runs, vec![Some(50.0), Some(20.0), Some(80.0)]);
        assert_eq!(r.status, "ok");
        assert_eq!(r.note.as_deref(), Some("2 of 3 runs complete"));
        let l = r.load_avg.unwrap();
        assert_eq!((l.start[0], l.end[0], l.peak_1m), (0.1, 0.3, 0.3));
        // A run that moved nothing counts lowest; one loaded run marks the row.
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let r = combine(vec![
            run(None, "incomplete", cpus + 1.0),
            run(Some(10.0), "ok", 0.1),
        ]);
        assert_eq!(r.goodput_mbps, None, "the lower middle of two");
        assert_eq!(r.goodput_min, Some(10.0));
        let note = r.note.unwrap();
        assert!(note.contains("loaded machine"), "{note}");
        assert!(note.contains("1 of 2 runs complete"), "{note}");
        assert_eq!(note.matches("loaded machine").count(), 1, "{note}");
    }

    #[test]
    fn link_runs_combine_with_every_runs_goal() {
        let base = &rows()[0];
        let run = |g: f64, ratio: Option<f64>, switch: Option<f64>| {
            let mut r = base.clone();
            r.goodput_mbps = Some(g);
            r.links = Some(LinksFigures {
                policy: "failover".into(),
                links: vec![
                    LinkFigures {
                        rate_mbps: 100.0,
                        weight: 1,
                        outage: Some((5.0, 5.0)),
                        wire_bytes: Some(1000),
                        wire_mbps: Some(80.0),
                        wire_series: Vec::new(),
                    },
                    LinkFigures {
                        rate_mbps: 100.0,
                        weight: 1,
                        outage: None,
                        wire_bytes: Some(500),
                        wire_mbps: Some(40.0),
                        wire_series: Vec::new(),
                    },
                ],
                goal: "goodput during link 0's outage / link 1's capacity".into(),
                goal_ref_mbps: 100.0,
                goal_mbps: ratio.map(|x| x * 100.0),
                goal_ratio: ratio,
                goal_window_s: None,
                whole_mbps: ratio.map(|x| x * 90.0),
                whole_ratio: ratio.map(|x| x * 0.9),
                switch_s: switch,
                back_s: Some(1.0),
                goal_ratio_runs: Vec::new(),
                whole_ratio_runs: Vec::new(),
                switch_runs: Vec::new(),
                back_runs: Vec::new(),
            });
            r
        };
        let row = combine(vec![
            run(80.0, Some(0.8), Some(1.5)),
            run(70.0, None, None),
            run(90.0, Some(0.85), Some(1.2)),
        ]);
        // The median run by goodput is the first; every run's figures kept.
        assert_eq!(row.goodput_mbps, Some(80.0));
        let l = row.links.as_ref().unwrap();
        assert_eq!(l.goal_ratio, Some(0.8));
        assert_eq!(l.goal_ratio_runs, vec![Some(0.8), None, Some(0.85)]);
        let whole: Vec<Option<f64>> = l
            .whole_ratio_runs
            .iter()
            .map(|x| x.map(|v| (v * 1e3).round() / 1e3))
            .collect();
        assert_eq!(whole, vec![Some(0.72), None, Some(0.765)]);
        assert_eq!(l.switch_runs, vec![Some(1.5), None, Some(1.2)]);
        assert_eq!(l.back_runs, vec![Some(1.0); 3]);
        let t = table(std::slice::from_ref(&row));
        assert!(t.contains("switch s"), "{t}");
        assert!(
            t.contains("0.80/-/0.85") && t.contains("0.72/-/0.77") && t.contains("80.0 + 40.0"),
            "{t}"
        );
        let c = csv(std::slice::from_ref(&row));
        assert!(
            c.lines()
                .nth(1)
                .unwrap()
                .contains(",failover,100,80,0.8,1.5,1,0.72"),
            "{c}"
        );
        // Rows without links print no links table.
        assert!(!table(&rows()).contains("switch s"));
    }

    #[test]
    fn json_has_the_required_keys_per_row() {
        let rows = rows();
        let dir = std::env::temp_dir().join(format!("lu2k-perf-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.json");
        write_json(&rows, &p).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 4);
        for o in arr {
            for k in [
                "scenario",
                "contender",
                "rtt_ms",
                "loss",
                "rate_mbps",
                "goodput_mbps",
                "utilization",
                "steady_mbps",
                "time_to_90_s",
                "cpu_s",
                "cpu_s_per_gb",
                "proc_cpu_s",
                "proc_cpu_s_per_gb",
                "harness_sys_s",
                "others_cpu_s",
                "max_rss_mib",
                "load_avg",
            ] {
                assert!(o.get(k).is_some(), "missing {k} in {o}");
            }
        }
        assert_eq!(arr[1]["contender"], "udt4");
        assert_eq!(arr[2]["loss"], 0.01);
        assert_eq!(arr[1]["load_avg"]["end"][0], 65.0);

        let text = csv(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        let cols = lines[0].split(',').count();
        assert!(lines.iter().all(|l| l.split(',').count() == cols));
        assert!(lines[0].ends_with(
            ",runs,goodput_min,goodput_max,steal,load_avg,family,policy,goal_ref_mbps,\
             goal_mbps,goal_ratio,switch_s,back_s,whole_ratio"
        ));
        assert!(lines[0].contains(
            ",loss_drops,cpu_s,cpu_s_per_gb,proc_cpu_s,proc_cpu_s_per_gb,harness_sys_s,\
             others_cpu_s,max_rss_mib,p50_ms,"
        ));
        assert!(
            lines[1].ends_with(",1,,,,0.5/64,ipv4,,,,,,,"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].contains(",30,60,24.5,49,0.25,0.125,,"),
            "{}",
            lines[1]
        );

        let t = table(&rows);
        assert!(t.contains("lu2k") && t.contains("90.0"), "{t}");
        // Both CPU figures, under their own headers.
        assert!(t.contains("CPU s/GB") && t.contains("proc s/GB"), "{t}");
        assert!(t.contains("60.0") && t.contains("49.0"), "{t}");

        let svg = plot_vs_loss(&rows, &dir, "t").unwrap().unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.contains("<svg") && s.contains("udt4"));
        let svg = plot_over_time(&rows, &rows[0].cell, &dir, "t")
            .unwrap()
            .unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("polyline"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
