//! `lu2k-perf`: lu2k beside the transports people would otherwise pick, on the
//! same path in the same run.
//!
//! Subcommands:
//! - `run SCENARIO.toml [--quick] [--json PATH] [--csv PATH] [--out DIR]`: every
//!   contender in every cell of a scenario, each on a fresh emulated link; a
//!   table, JSON, CSV and SVG plots.
//! - `demo`: a GEO-like link (UDP relay, no root needed), lu2k beside UDT4
//!   (and TCP when root), in about a minute and a half.
//! - `loopback`: bulk goodput and small-message round trips over loopback for
//!   lu2k, the reference UDT4 and raw UDP (the ceiling), medians of several runs.
//!
//! The pieces: [`scenario`] (the file), [`run`] (one driver per contender on
//! its emulator), [`node`] / [`lu2k`] / [`srt`] (the endpoint processes),
//! [`collect`] (measures), [`report`] (table, JSON, CSV, plots).

mod collect;
mod gateway;
mod idle;
mod lu2k;
mod node;
mod quic;
mod quic_live;
mod report;
mod run;
mod scenario;
mod soak;
mod srt;
mod srt_live;
mod stats;
mod tuning;
mod udp;
mod udt4;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use stats::{median, Latency};

#[derive(Parser, Debug)]
#[command(
    name = "lu2k-perf",
    version,
    about = "lu2k's side-by-side benchmark harness"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario file: every contender in every cell, on the emulated link.
    Run(RunArgs),
    /// A GEO-like emulated link without root: lu2k beside UDT4 (and TCP as root).
    Demo(DemoArgs),
    /// Bulk goodput and round trips over loopback: lu2k, UDT4, raw UDP.
    Loopback(LoopbackArgs),
    /// What the fair CPU figure reads with nothing run: the machine's
    /// background that it cannot take out, per window.
    CpuBaseline(CpuBaselineArgs),
    /// Two `run --json` result files side by side: is every row's goodput
    /// within the tolerance? Exits 1 if not.
    Compare(CompareArgs),
    /// Rows of several `run --json` files as one report: the table, the merged
    /// JSON and the plots, as if one run had made them (a later file's row
    /// replaces an earlier one of the same cell and contender).
    Report(ReportArgs),
    /// lu2k for a long time on the GEO link with peers coming and going and an
    /// engine restart; fails on memory growth, unreturned buffers or lost messages.
    Soak(soak::SoakArgs),
    /// A gateway full of peers: N sender and N receiver nodes (kshim + engine
    /// each) over one emulated link; aggregate goodput, fairness, CPU, RSS.
    Gateway(gateway::GatewayArgs),
    /// An idle engine with N connected peers (and with none): its CPU,
    /// wake-ups, timers and datagrams per second.
    IdlePeers(idle::IdleArgs),
    /// Internal: one endpoint process of a contender (JSON spec).
    #[command(name = "__node", hide = true)]
    Node { spec: String },
    /// Internal: an lu2k engine process (JSON spec).
    #[command(name = "__engine", hide = true)]
    Engine { spec: String },
    /// Internal: one node of a gateway cell (JSON spec).
    #[command(name = "__gateway-node", hide = true)]
    GatewayNode { spec: String },
    /// Internal: one hop of the raw UDP round-trip chain (next port, 0: echo).
    #[command(name = "__udp-hop", hide = true)]
    UdpHop { next: u16 },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The scenario file (TOML), e.g. perf/scenarios/geo.toml.
    scenario: PathBuf,
    /// Shorten every run (CI): the scenario's [quick] settings.
    #[arg(long)]
    quick: bool,
    /// Write the rows (one per contender x cell) as a JSON array here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the rows as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Directory for the SVG plots.
    #[arg(long, default_value = "perf-out")]
    out: PathBuf,
    /// Only these contenders (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these cells (comma-separated names as the table prints them,
    /// e.g. `600ms/0.1%/100M`).
    #[arg(long, value_delimiter = ',')]
    cells: Vec<String>,
    /// Engine cores for lu2k.
    #[arg(long, default_value_t = 1)]
    lu2k_cores: u16,
    /// kshim RX buffers (64 KiB each) per lu2k node.
    #[arg(long, default_value_t = LU2K_RX_BUFS)]
    lu2k_rx_bufs: u32,
    /// kshim's TX pool per lu2k node, MiB [default: sized for each cell's path
    /// as `lu2k-kshim --path-rate-mbps --path-rtt-ms` sizes it: 6 x rate x RTT,
    /// at least 32 MiB]. 256 is kshim's own default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65536))]
    lu2k_tx_pool_mib: Option<u64>,
    /// Runs of each contender in each cell; a row gives the run with the
    /// median goodput, every run's goodput and the spread (min-max).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// The first result file (`run --json`).
    a: PathBuf,
    /// The second.
    b: PathBuf,
    /// Largest change allowed, as a fraction of the first file's goodput.
    #[arg(long, default_value_t = 0.10)]
    tolerance: f64,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Result files (`run --json`), in order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Write the merged rows here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory for the plots.
    #[arg(long, default_value = "perf-out")]
    out: PathBuf,
    /// The plots' name (default: the rows' scenario).
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Directory for the plot and the JSON.
    #[arg(long, default_value = "lu2k-demo")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct CpuBaselineArgs {
    /// Seconds per window.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Windows, one after the other.
    #[arg(long, default_value_t = 3)]
    windows: u32,
}

#[derive(clap::Args, Debug)]
struct LoopbackArgs {
    /// Write the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runs per contender; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Bytes moved per bulk run, in MiB. Long enough for the steady state: at lu2k's
    /// rates a 512 MiB run is a quarter of a second, and connection set-up and the first
    /// round trips weigh in.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    mib: u64,
    /// Engine cores for lu2k.
    #[arg(long, default_value_t = 1)]
    lu2k_cores: u16,
    /// kshim RX buffers (64 KiB each) per lu2k node.
    #[arg(long, default_value_t = LU2K_RX_BUFS)]
    lu2k_rx_bufs: u32,
    /// lu2k bulk: 1 MiB PUTs in flight at most, as a Lustre client's OSC keeps at
    /// most `max_rpcs_in_flight` (default 8) bulk RPCs outstanding per target. The
    /// data walks this many MiB of the TX pool; 256 (the whole pool) is what the
    /// satellite scenarios use.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    lu2k_in_flight: u32,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    round_trips: u64,
    /// Round trips per UDT4 latency run at most (each takes ~200 ms).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(10..))]
    udt4_round_trips: u64,
    /// Only these contenders (comma-separated: udp, udt4, lu2k, lu2k-sealed).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Round trips only, no bulk runs.
    #[arg(long)]
    no_bulk: bool,
}

/// The `loopback --json` object.
#[derive(Debug, Serialize)]
struct LoopbackReport {
    runs: u32,
    bytes_per_run: u64,
    lu2k_gbps: Option<f64>,
    /// lu2k on the sealed wire (a PSK configured: AES-128-GCM on every packet).
    lu2k_sealed_gbps: Option<f64>,
    udt4_gbps: Option<f64>,
    udp_ceiling_gbps: Option<f64>,
    /// The same blast walking 64 MiB of buffers on each side (out of the caches).
    udp_64mib_gbps: Option<f64>,
    lu2k_copied_bytes: Option<u64>,
    /// The same for sealed lu2k (the cipher's own pass is not a copy).
    lu2k_sealed_copied_bytes: Option<u64>,
    rtt: Vec<RttRow>,
}

#[derive(Debug, Serialize)]
struct RttRow {
    contender: &'static str,
    size: usize,
    #[serde(flatten)]
    latency: Latency,
}

/// LNet ping-sized and 4 KiB messages.
const RTT_SIZES: [usize; 2] = [72, 4096];

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_scenario(args),
        Command::Demo(args) => demo(args),
        Command::Loopback(args) => loopback(args),
        Command::CpuBaseline(args) => cpu_baseline(args),
        Command::Compare(args) => compare(args),
        Command::Report(args) => merge_report(args),
        Command::Soak(args) => soak::soak(args),
        Command::Gateway(args) => gateway::main(args),
        Command::IdlePeers(args) => idle::main(args),
        Command::GatewayNode { spec } => gateway::node_main(&spec),
        Command::Node { spec } => node::main(&spec),
        Command::Engine { spec } => lu2k::engine_main(&spec),
        Command::UdpHop { next } => udp::hop_main(next),
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

fn median_of(runs: u32, what: &str, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let bar = progress(runs as u64, what);
    let mut values = Vec::new();
    for _ in 0..runs {
        let v = f().with_context(|| format!("{what} run failed"))?;
        bar.set_message(format!("{v:.2} Gbit/s"));
        values.push(v);
        bar.inc(1);
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    bar.finish_with_message(format!("runs {lo:.2}..{hi:.2} Gbit/s"));
    // Also where the bar is hidden (output not a terminal): the spread belongs
    // beside the median in any record of the run.
    let each: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    eprintln!("{what}: runs {} Gbit/s", each.join(" / "));
    Ok(median(&values).expect("at least one run"))
}

impl LoopbackArgs {
    /// Whether `--only` keeps contender `name`.
    fn on(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == name)
    }

    /// Round trips per run: (all but UDT4, UDT4).
    fn round_trip_counts(&self) -> (usize, usize) {
        let n = self.round_trips as usize;
        (n, n.min(self.udt4_round_trips as usize))
    }
}

fn loopback(args: LoopbackArgs) -> Result<()> {
    for name in &args.only {
        if !["udp", "udt4", "lu2k", "lu2k-sealed"].contains(&name.as_str()) {
            anyhow::bail!("--only {name}: unknown contender; use udp, udt4, lu2k, lu2k-sealed");
        }
    }
    let lo = opts(1, args.lu2k_cores, args.lu2k_rx_bufs);
    let bulk = bulk_figures(&args, &lo)?;
    let rtt = round_trips(&args, &lo)?;
    print_loopback(&args, &bulk, &rtt);
    if let Some(path) = &args.json {
        let report = LoopbackReport {
            runs: args.runs,
            bytes_per_run: args.mib << 20,
            lu2k_gbps: bulk.lu2k,
            lu2k_sealed_gbps: bulk.lu2k_sealed,
            udt4_gbps: bulk.udt4,
            udp_ceiling_gbps: bulk.udp_ceiling,
            udp_64mib_gbps: bulk.udp_64mib,
            lu2k_copied_bytes: bulk.lu2k_copied,
            lu2k_sealed_copied_bytes: bulk.lu2k_sealed_copied,
            rtt,
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `loopback`'s bulk medians in Gbit/s; `None` where not run.
#[derive(Debug, Default)]
struct BulkFigures {
    lu2k: Option<f64>,
    lu2k_sealed: Option<f64>,
    udt4: Option<f64>,
    udp_ceiling: Option<f64>,
    udp_64mib: Option<f64>,
    /// Payload bytes lu2k copied, both sides, in its run that copied most.
    lu2k_copied: Option<u64>,
    /// The same, sealed.
    lu2k_sealed_copied: Option<u64>,
}

/// The bulk runs of `loopback` (none with `--no-bulk`).
fn bulk_figures(args: &LoopbackArgs, lo: &run::Opts) -> Result<BulkFigures> {
    let bulk = !args.no_bulk;
    let bytes = args.mib << 20;
    let udp_ceiling = (bulk && args.on("udp"))
        .then(|| {
            median_of(args.runs, "raw UDP GSO+GRO", || {
                udp::gso_gro_blast(bytes, 0)
            })
        })
        .transpose()?;
    let udp_64mib = (bulk && args.on("udp"))
        .then(|| {
            median_of(args.runs, "raw UDP GSO+GRO, 64 MiB buffers", || {
                udp::gso_gro_blast(bytes, udp::OUT_OF_CACHE_FOOTPRINT)
            })
        })
        .transpose()?;
    let udt4 = (bulk && args.on("udt4"))
        .then(|| median_of(args.runs, "UDT4 bulk", || udt4::bulk(bytes)))
        .transpose()?;
    let mut copied = None;
    let lu2k_run = |lo: &run::Opts, copied: &mut Option<u64>| -> Result<f64> {
        let w = scenario::Workload {
            kind: scenario::WorkloadKind::Bulk,
            bytes,
            max_duration_s: 120.0,
            in_flight: Some(args.lu2k_in_flight),
            ..loopback_workload()
        };
        let (r, tx) = run::lu2k_direct(w, lo)?;
        if r.bytes < bytes {
            anyhow::bail!("lu2k delivered {} of {bytes} bytes", r.bytes);
        }
        let c = r.copied_bytes.unwrap_or(0) + tx.and_then(|t| t.copied_bytes).unwrap_or(0);
        *copied = Some(copied.unwrap_or(0).max(c));
        Ok((r.bytes - r.first_bytes) as f64 * 8.0 / r.span_s.max(1e-9) / 1e9)
    };
    // The same runs on the sealed wire: a key file both engines read.
    let mut sealed_copied = None;
    let lu2k_sealed = (bulk && args.on("lu2k-sealed"))
        .then(|| {
            let key = lo.tmp.join(format!("lu2k-perf-psk-{}", std::process::id()));
            run::write_psk(&key)?;
            let sealed = run::Opts {
                lu2k_psk: Some(key.clone()),
                ..lo.clone()
            };
            let v = median_of(args.runs, "lu2k sealed bulk", || {
                lu2k_run(&sealed, &mut sealed_copied)
            });
            let _ = std::fs::remove_file(&key);
            v
        })
        .transpose()?;
    let lu2k = (bulk && args.on("lu2k"))
        .then(|| {
            median_of(args.runs, "lu2k bulk", || {
                let w = scenario::Workload {
                    kind: scenario::WorkloadKind::Bulk,
                    bytes,
                    max_duration_s: 120.0,
                    in_flight: Some(args.lu2k_in_flight),
                    ..loopback_workload()
                };
                let (r, tx) = run::lu2k_direct(w, lo)?;
                if r.bytes < bytes {
                    anyhow::bail!("lu2k delivered {} of {bytes} bytes", r.bytes);
                }
                let c = r.copied_bytes.unwrap_or(0) + tx.and_then(|t| t.copied_bytes).unwrap_or(0);
                copied = Some(copied.unwrap_or(0).max(c));
                Ok((r.bytes - r.first_bytes) as f64 * 8.0 / r.span_s.max(1e-9) / 1e9)
            })
        })
        .transpose()?;
    Ok(BulkFigures {
        lu2k,
        lu2k_sealed,
        udt4,
        udp_ceiling,
        udp_64mib,
        lu2k_copied: copied,
        lu2k_sealed_copied: sealed_copied,
    })
}

/// The round-trip runs of `loopback`, each size in turn: raw UDP (1 and 3
/// hops), UDT4 (blocking and spinning receive), lu2k.
fn round_trips(args: &LoopbackArgs, lo: &run::Opts) -> Result<Vec<RttRow>> {
    let (n, n_udt4) = args.round_trip_counts();
    let mut rtt = Vec::new();
    let bar = progress(4 * RTT_SIZES.len() as u64, "round trips");
    for size in RTT_SIZES {
        if args.on("udp") {
            for (contender, hops) in [("udp", 1), ("udp-3hop", 3)] {
                bar.set_message(format!("raw UDP, {hops} hops, {size} B"));
                let latency = udp::ping_pong(size, n, hops).context("raw UDP round trips")?;
                rtt.push(RttRow {
                    contender,
                    size,
                    latency,
                });
            }
        }
        bar.inc(1);
        if args.on("udt4") {
            bar.set_message(format!("UDT4, {size} B"));
            match udt4::ping_pong(size, n_udt4) {
                Ok(latency) => rtt.push(RttRow {
                    contender: "udt4",
                    size,
                    latency,
                }),
                Err(e) => eprintln!("UDT4 round trips, {size} B: {e:#}"),
            }
            bar.inc(1);
            bar.set_message(format!("UDT4 non-blocking, {size} B"));
            match udt4::ping_pong_with(size, n_udt4, true) {
                Ok(latency) => rtt.push(RttRow {
                    contender: "udt4-poll",
                    size,
                    latency,
                }),
                Err(e) => eprintln!("UDT4 (non-blocking receive) round trips, {size} B: {e:#}"),
            }
            bar.inc(1);
        } else {
            bar.inc(2);
        }
        if args.on("lu2k") {
            bar.set_message(format!("lu2k, {size} B"));
            if let Some(latency) = lu2k_round_trips(size, n, lo) {
                rtt.push(RttRow {
                    contender: "lu2k",
                    size,
                    latency,
                });
            }
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(rtt)
}

/// lu2k's round trips of `size` bytes, `n` of them; says why on stderr when
/// there are none.
fn lu2k_round_trips(size: usize, n: usize, lo: &run::Opts) -> Option<Latency> {
    let w = scenario::Workload {
        kind: scenario::WorkloadKind::Rpc,
        size: size as u32,
        count: n as u32,
        max_duration_s: 120.0,
        ..loopback_workload()
    };
    match run::lu2k_direct(w, lo) {
        Ok((r, _)) => {
            let mut d: Vec<std::time::Duration> = r
                .samples_us
                .iter()
                .map(|us| std::time::Duration::from_secs_f64(us / 1e6))
                .collect();
            let latency = Latency::from_samples(&mut d);
            if latency.is_none() {
                eprintln!("lu2k round trips, {size} B: no samples");
            }
            latency
        }
        Err(e) => {
            eprintln!("lu2k round trips, {size} B: {e:#}");
            None
        }
    }
}

/// `loopback`'s tables on stdout.
fn print_loopback(args: &LoopbackArgs, bulk: &BulkFigures, rtt: &[RttRow]) {
    println!();
    if !args.no_bulk {
        println!(
            "bulk over loopback, {} MiB per run, median of {} runs",
            args.mib, args.runs
        );
        println!("  {:<18} {:>10}", "contender", "Gbit/s");
        for (name, v) in [
            ("lu2k", bulk.lu2k),
            ("lu2k sealed", bulk.lu2k_sealed),
            ("UDT4", bulk.udt4),
            ("raw UDP GSO+GRO", bulk.udp_ceiling),
            ("  64 MiB buffers", bulk.udp_64mib),
        ] {
            if let Some(v) = v {
                println!("  {name:<18} {v:>10.2}");
            }
        }
        // The goals, read off this run: >= 8x UDT4, >= 40 % of the ceiling.
        if let (Some(l), Some(u)) = (bulk.lu2k, bulk.udt4) {
            println!("  lu2k / UDT4: {:.1}x (goal 8x)", l / u);
        }
        if let (Some(l), Some(c)) = (bulk.lu2k, bulk.udp_ceiling) {
            println!("  lu2k / ceiling: {:.0} % (goal 40 %)", 100.0 * l / c);
        }
        // Issue 14's goals for the sealed wire: >= 4x UDT4, >= 60 % of plain lu2k.
        if let (Some(s), Some(u)) = (bulk.lu2k_sealed, bulk.udt4) {
            println!("  lu2k sealed / UDT4: {:.1}x (goal 4x)", s / u);
        }
        if let (Some(s), Some(l)) = (bulk.lu2k_sealed, bulk.lu2k) {
            println!("  lu2k sealed / lu2k: {:.0} % (goal 60 %)", 100.0 * s / l);
        }
        println!();
    }
    let (n, n_udt4) = args.round_trip_counts();
    println!("round trips over loopback, {n} each (UDT4 {n_udt4})");
    println!(
        "  {:<10} {:>6} {:>10} {:>10} {:>10}",
        "contender", "bytes", "p50 µs", "p99 µs", "max µs"
    );
    for row in rtt {
        println!(
            "  {:<10} {:>6} {:>10.1} {:>10.1} {:>10.1}",
            row.contender, row.size, row.latency.p50_us, row.latency.p99_us, row.latency.max_us
        );
    }
}

fn opts(seed: u64, lu2k_cores: u16, lu2k_rx_bufs: u32) -> run::Opts {
    run::Opts {
        seed,
        tmp: std::env::temp_dir(),
        lu2k_cores,
        lu2k_rx_bufs,
        lu2k_tx_pool: None,
        lu2k_psk: None,
        lu2k_max_rate_mbps: None,
    }
}

/// kshim RX buffers per lu2k node unless told otherwise. A datagram holds a
/// share of a 64 KiB buffer until its message completes (the engine's
/// io_uring path cuts buffers into 40 datagram-sized receives where the
/// relay delivers datagrams one by one; the epoll path, one datagram per
/// buffer), and on a lossy long path everything behind a hole waits about
/// two round trips. 32768 buffers: the epoll path's ~47 MB of datagrams, 6
/// BDPs of 100 Mbit/s x 600 ms; far more than 3 x rate x RTT of any cell on
/// the io_uring path. The pool is a sparse memfd: only pages that received
/// data are resident, and cold free ones are given back.
const LU2K_RX_BUFS: u32 = 32768;

/// Runs every contender of every cell; prints and writes the report.
fn run_cells(
    s: &scenario::Scenario,
    quick: bool,
    (only, named): (&[String], &[String]),
    o: &run::Opts,
    out: &std::path::Path,
    runs: u32,
) -> Result<Vec<report::Row>> {
    let mut cells = s.cells(quick);
    if let Some(bad) = named.iter().find(|n| !cells.iter().any(|c| &c.name == *n)) {
        let known: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "--cells: no cell named {bad:?} in {}; its cells: {}",
            s.name,
            known.join(", ")
        );
    }
    if !named.is_empty() {
        cells.retain(|c| named.contains(&c.name));
    }
    let mp = indicatif::MultiProgress::new();
    let mut rows = Vec::new();
    for cell in &cells {
        for &c in &cell.contenders {
            if !only.is_empty() && !only.iter().any(|n| n == c.name()) {
                continue;
            }
            // Runs of one contender back to back: the spread is that of
            // the same machine state, as far as the machine allows. Run i
            // draws its losses from seed + i: the runs sample different
            // loss patterns, and a rerun of the grid the same ones.
            let each = (0..runs)
                .map(|i| {
                    let oi = run::Opts {
                        seed: o.seed.wrapping_add(u64::from(i)),
                        ..o.clone()
                    };
                    run::run(&s.name, cell, c, &oi, &mp)
                })
                .collect();
            rows.push(report::combine(each));
        }
    }
    println!();
    println!(
        "{} ({}), workload {:?}{}",
        s.name,
        if quick { "--quick" } else { "full" },
        s.workload.kind,
        if run::is_root() {
            ""
        } else {
            ", not root: TCP skipped"
        }
    );
    print!("{}", report::table(&rows));
    let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
    write_plots(&rows, &names, out, &s.name)?;
    Ok(rows)
}

/// The plots of `rows`: goodput against loss, and per cell goodput (and a live
/// stream's latency) over time; each one's path on stdout.
fn write_plots(rows: &[report::Row], cells: &[&str], out: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if let Some(p) = report::plot_vs_loss(rows, out, name)? {
        println!("plot: {}", p.display());
    }
    for cell in cells {
        if let Some(p) = report::plot_over_time(rows, cell, out, name)? {
            println!("plot: {}", p.display());
        }
        if let Some(p) = report::plot_latency_over_time(rows, cell, out, name)? {
            println!("plot: {}", p.display());
        }
    }
    Ok(())
}

fn run_scenario(args: RunArgs) -> Result<()> {
    let s = scenario::Scenario::load(&args.scenario)?;
    let o = run::Opts {
        lu2k_tx_pool: args.lu2k_tx_pool_mib.map(|m| m << 20),
        ..opts(s.seed, args.lu2k_cores, args.lu2k_rx_bufs)
    };
    let rows = run_cells(
        &s,
        args.quick,
        (&args.only, &args.cells),
        &o,
        &args.out,
        args.runs,
    )?;
    if let Some(p) = &args.json {
        report::write_json(&rows, p)?;
        println!("json: {}", p.display());
    }
    if let Some(p) = &args.csv {
        std::fs::write(p, report::csv(&rows))
            .with_context(|| format!("writing {}", p.display()))?;
        println!("csv: {}", p.display());
    }
    Ok(())
}

fn merge_report(args: ReportArgs) -> Result<()> {
    let mut rows: Vec<report::Row> = Vec::new();
    for p in &args.files {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let file: Vec<report::Row> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not an array of rows as `run --json` writes",
                p.display()
            )
        })?;
        let mut noted = false;
        for r in file {
            if r.cell.is_empty() || r.contender.is_empty() {
                anyhow::bail!(
                    "{}: a row without a cell or contender (not a `run --json` file?)",
                    p.display()
                );
            }
            if let Some(o) = rows.iter().find(|o| !noted && o.scenario != r.scenario) {
                noted = true;
                eprintln!(
                    "note: {} has rows of scenario {:?} beside {:?}; rows are matched by cell and contender",
                    p.display(),
                    r.scenario,
                    o.scenario
                );
            }
            match rows
                .iter_mut()
                .find(|o| o.cell == r.cell && o.contender == r.contender)
            {
                Some(o) => *o = r,
                None => rows.push(r),
            }
        }
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => rows
            .first()
            .map(|r| r.scenario.clone())
            .context("no rows in the files")?,
    };
    print!("{}", report::table(&rows));
    let mut cells: Vec<&str> = Vec::new();
    for r in &rows {
        if !cells.contains(&r.cell.as_str()) {
            cells.push(&r.cell);
        }
    }
    write_plots(&rows, &cells, &args.out, &name)?;
    if let Some(p) = &args.json {
        report::write_json(&rows, p)?;
        println!("json: {}", p.display());
    }
    Ok(())
}

fn compare(args: CompareArgs) -> Result<()> {
    let read = |p: &PathBuf| -> Result<Vec<serde_json::Value>> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON (a `run --json` file?)", p.display()))?;
        v.as_array().cloned().with_context(|| {
            format!(
                "{}: expected an array of rows, as `run --json` writes",
                p.display()
            )
        })
    };
    let (rows, stable) = report::compare(&read(&args.a)?, &read(&args.b)?, args.tolerance);
    print!("{}", report::compare_table(&rows, args.tolerance));
    if rows.is_empty() {
        anyhow::bail!("no row (cell and contender) with goodput in both files");
    }
    if !stable {
        println!("NOT stable within ±{:.0} %", args.tolerance * 100.0);
        std::process::exit(1);
    }
    println!("stable within ±{:.0} %", args.tolerance * 100.0);
    Ok(())
}

/// The fair CPU formula of a run (`collect::cpu_spent`, other processes
/// followed as in a run) over windows in which this process only sleeps: what
/// a row's `cpu_s` holds that no contender ran.
fn cpu_baseline(args: CpuBaselineArgs) -> Result<()> {
    if !(args.secs > 0.0 && args.secs <= 3600.0) {
        anyhow::bail!(
            "--secs {}: give seconds per window, above 0 and at most 3600",
            args.secs
        );
    }
    println!("window s  fair CPU s  fair CPU share  others s  busy s");
    for _ in 0..args.windows {
        let a = collect::CpuSnapshot::take().context("reading /proc/stat and getrusage")?;
        let watch = collect::OthersWatch::start();
        std::thread::sleep(std::time::Duration::from_secs_f64(args.secs));
        let seen = watch.finish();
        let b = collect::CpuSnapshot::take().context("reading /proc/stat and getrusage")?;
        let c = collect::cpu_spent(&a, &b.with_watch(seen));
        println!(
            "{:>8.1}  {:>10.2}  {:>14.3}  {:>8.2}  {:>6.2}",
            args.secs,
            c.fair_s,
            c.fair_s / args.secs,
            c.others_s,
            c.host_busy_s
        );
    }
    Ok(())
}

/// The demo's scenario: one GEO-like cell.
const DEMO: &str = include_str!("../../scenarios/demo.toml");

fn demo(args: DemoArgs) -> Result<()> {
    let s = scenario::Scenario::parse(DEMO, "demo.toml (built in)")?;
    eprintln!(
        "lu2k demo: a GEO-like link emulated in this process (UDP relay on loopback, no root needed): \
         100 Mbit/s, 600 ms round trip, 0.1 % random loss each way; lu2k, UDT4 and QUIC (quinn, CUBIC \
         and BBR).{}",
        if run::is_root() {
            " Running as root: TCP CUBIC and BBR cross the same link through TUN devices."
        } else {
            " Not root: TCP (which needs the TUN emulator) is skipped."
        }
    );
    let o = opts(s.seed, 1, LU2K_RX_BUFS);
    let only: Vec<String> = if run::is_root() {
        Vec::new()
    } else {
        ["lu2k", "udt4", "quic-cubic", "quic-bbr"]
            .map(String::from)
            .to_vec()
    };
    let rows = run_cells(&s, false, (&only, &[]), &o, &args.out, 1)?;
    let json = args.out.join("demo.json");
    report::write_json(&rows, &json)?;
    println!("json: {}", json.display());
    Ok(())
}

/// Defaults for the loopback workloads (overridden field by field).
fn loopback_workload() -> scenario::Workload {
    scenario::Workload {
        kind: scenario::WorkloadKind::Bulk,
        bytes: 1 << 20,
        max_duration_s: 60.0,
        size: 72,
        count: 100,
        stream_mbps: 1.0,
        chunk_bytes: 4096,
        duration_s: 1.0,
        in_flight: None,
        warmup_bytes: None,
    }
}
