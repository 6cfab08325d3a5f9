//! `lu2k-perf`: lu2k beside the transports people would otherwise pick, on the
//! same path in the same run.
//!
//! Subcommands:
//! - `loopback`: bulk goodput and small-message round trips over loopback for
//!   lu2k, the reference UDT4 and raw UDP (the ceiling), medians of several runs.

mod stats;
mod udp;
mod udt4;

use std::path::PathBuf;

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
    /// Bulk goodput and round trips over loopback: lu2k, UDT4, raw UDP.
    Loopback(LoopbackArgs),
}

#[derive(clap::Args, Debug)]
struct LoopbackArgs {
    /// Write the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runs per contender; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Bytes moved per bulk run, in MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    mib: u64,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    round_trips: u64,
}

/// The `loopback --json` object.
#[derive(Debug, Serialize)]
struct LoopbackReport {
    runs: u32,
    bytes_per_run: u64,
    lu2k_gbps: Option<f64>,
    udt4_gbps: f64,
    udp_ceiling_gbps: f64,
    lu2k_copied_bytes: Option<u64>,
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
        Command::Loopback(args) => loopback(args),
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
    bar.finish();
    Ok(median(&values).expect("at least one run"))
}

fn loopback(args: LoopbackArgs) -> Result<()> {
    let bytes = args.mib << 20;
    let udp_ceiling = median_of(args.runs, "raw UDP GSO+GRO", || udp::gso_gro_blast(bytes))?;
    let udt4 = median_of(args.runs, "UDT4 bulk", || udt4::bulk(bytes))?;
    eprintln!(
        "lu2k bulk: not measured yet — the engine's ring-to-wire path is not wired into this tool"
    );

    let n = args.round_trips as usize;
    let mut rtt = Vec::new();
    let bar = progress(2 * RTT_SIZES.len() as u64, "round trips");
    for size in RTT_SIZES {
        bar.set_message(format!("raw UDP, {size} B"));
        let latency = udp::ping_pong(size, n).context("raw UDP ping-pong")?;
        rtt.push(RttRow {
            contender: "udp",
            size,
            latency,
        });
        bar.inc(1);
        bar.set_message(format!("UDT4, {size} B"));
        match udt4::ping_pong(size, n) {
            Ok(latency) => rtt.push(RttRow {
                contender: "udt4",
                size,
                latency,
            }),
            Err(e) => eprintln!("UDT4 round trips, {size} B: {e:#}"),
        }
        bar.inc(1);
    }
    bar.finish();

    println!();
    println!(
        "bulk over loopback, {} MiB per run, median of {} runs",
        args.mib, args.runs
    );
    println!("  {:<18} {:>10}", "contender", "Gbit/s");
    println!("  {:<18} {:>10}", "lu2k", "n/a");
    println!("  {:<18} {:>10.2}", "UDT4", udt4);
    println!("  {:<18} {:>10.2}", "raw UDP GSO+GRO", udp_ceiling);
    println!();
    println!("round trips over loopback, {n} each");
    println!(
        "  {:<10} {:>6} {:>10} {:>10} {:>10}",
        "contender", "bytes", "p50 µs", "p99 µs", "max µs"
    );
    for row in &rtt {
        println!(
            "  {:<10} {:>6} {:>10.1} {:>10.1} {:>10.1}",
            row.contender, row.size, row.latency.p50_us, row.latency.p99_us, row.latency.max_us
        );
    }

    if let Some(path) = args.json {
        let report = LoopbackReport {
            runs: args.runs,
            bytes_per_run: bytes,
            lu2k_gbps: None,
            udt4_gbps: udt4,
            udp_ceiling_gbps: udp_ceiling,
            lu2k_copied_bytes: None,
            rtt,
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
