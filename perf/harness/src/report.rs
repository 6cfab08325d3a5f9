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
#[derive(Debug, Clone, Serialize, PartialEq)]
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
    /// CPU seconds of the contender's processes.
    pub cpu_s: Option<f64>,
    /// CPU seconds per GB (10^9 bytes) of payload delivered.
    pub cpu_s_per_gb: Option<f64>,
    /// rpc round trips or live delivery latency.
    pub latency: Option<Percentiles>,
    /// Payload bytes copied by lu2k (lu2k only).
    pub copied_bytes: Option<u64>,
    /// Notes from the nodes.
    pub note: Option<String>,
    /// Goodput over time: (seconds since the sender started, Mbit/s), 0.5 s bins.
    pub goodput_series: Vec<(f64, f64)>,
    /// The machine's load averages when the row started and ended.
    pub load_avg: Option<LoadAvg>,
    /// The contender's settings as its nodes applied them ([`crate::tuning`]).
    pub tuning: Option<String>,
}

/// Load averages (1, 5 and 15 minutes, `/proc/loadavg`) around a row.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LoadAvg {
    /// Before the run.
    pub start: [f64; 3],
    /// After it.
    pub end: [f64; 3],
}

impl LoadAvg {
    /// A note if the 1-minute load average exceeded the CPUs this process
    /// may use, at the start or the end: the contenders then shared the CPUs
    /// with other work, and their figures may read low.
    pub fn loaded(&self) -> Option<String> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let peak = self.start[0].max(self.end[0]);
        (peak > cpus as f64).then(|| {
            format!(
                "loaded machine: 1-minute load average {:.2} → {:.2} on {cpus} CPUs",
                self.start[0], self.end[0]
            )
        })
    }
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
            rate_mbps: cell.rate_mbps,
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
            latency: None,
            copied_bytes: None,
            note: None,
            goodput_series: Vec::new(),
            load_avg: None,
            tuning: None,
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
        "{:<22} {:<10} {:>9} {:>6} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9}  status",
        "cell",
        "contender",
        "Mbit/s",
        "util",
        "steady",
        "t90 s",
        "rec s",
        "retx MB",
        "CPU s/GB",
        "p50 ms",
        "p90 ms",
        "p99 ms",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<22} {:<10} {:>9} {:>6} {:>7} {:>7} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9}  {}",
            r.cell,
            r.contender,
            opt(r.goodput_mbps, 1),
            r.utilization
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            opt(r.steady_mbps, 1),
            opt(r.time_to_90_s, 1),
            opt(r.recovery_s, 1),
            opt(r.retrans_bytes.map(|b| b as f64 / 1e6), 1),
            opt(r.cpu_s_per_gb, 1),
            opt(r.latency.map(|l| l.p50_ms), 1),
            opt(r.latency.map(|l| l.p90_ms), 1),
            opt(r.latency.map(|l| l.p99_ms), 1),
            r.status
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
         loss_drops,cpu_s,cpu_s_per_gb,p50_ms,p90_ms,p99_ms,max_ms,copied_bytes,load_avg\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    let u = |v: Option<u64>| v.map_or(String::new(), |x| x.to_string());
    for r in rows {
        let l = r.latency;
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
            f(l.map(|l| l.p50_ms)),
            f(l.map(|l| l.p90_ms)),
            f(l.map(|l| l.p99_ms)),
            f(l.map(|l| l.max_ms)),
            u(r.copied_bytes),
            // 1-minute load average at the start and the end.
            r.load_avg
                .map_or(String::new(), |l| format!("{}/{}", l.start[0], l.end[0])),
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
                r.load_avg = Some(LoadAvg {
                    start: [0.5, 0.4, 0.3],
                    end: [64.0 + i as f64, 2.0, 1.0],
                });
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn a_load_above_the_cpus_is_noted() {
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let l = |start, end| LoadAvg {
            start: [start, 0.0, 0.0],
            end: [end, 0.0, 0.0],
        };
        assert_eq!(l(cpus, cpus).loaded(), None);
        assert!(l(cpus + 0.5, 0.1)
            .loaded()
            .unwrap()
            .contains("loaded machine"));
        assert!(l(0.1, cpus + 0.5).loaded().is_some());
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
                "cpu_s_per_gb",
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
        assert!(lines[0].ends_with(",load_avg") && lines[1].ends_with(",0.5/64"));

        let t = table(&rows);
        assert!(t.contains("lu2k") && t.contains("90.0"), "{t}");

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
