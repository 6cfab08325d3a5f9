//! The link emulator as a command: a UDP relay on loopback (rootless) or a
//! TUN link between two network namespaces (root), both driving the seeded
//! link model on the real clock.
//!
//! ```text
//! cargo run --release -p lu2k-linkem --features cli -- relay link.toml --b-peer 127.0.0.1:9000
//! cargo run --release -p lu2k-linkem --features cli -- tun link.toml --name geo
//! ```
//!
//! The link file is TOML: either one direction's settings (used both ways) or
//! `[forward]` and `[reverse]` tables (see `lu2k_linkem::Config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lu2k_linkem::{Config, DuplexConfig, Relay, RelayConfig, RelayStats, TunConfig, TunLink};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "lu2k link emulator: a seeded satellite-link model on the real clock"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Link settings (TOML): one direction's settings for both, or [forward] and [reverse].
    link: PathBuf,
    /// Seed of the model's random streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds; without it, stop on Enter or end of input.
    #[arg(long)]
    duration: Option<f64>,
    /// Print the counters every this many seconds (0: only at the end).
    #[arg(long, default_value_t = 1.0)]
    every: f64,
    /// Do not ask for real-time scheduling.
    #[arg(long)]
    no_realtime: bool,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// UDP relay: side A's application sends to --a-bind, side B's to --b-bind.
    Relay {
        #[command(flatten)]
        common: Common,
        /// Side A's listening address.
        #[arg(long, default_value = "127.0.0.1:47001")]
        a_bind: SocketAddr,
        /// Side B's listening address.
        #[arg(long, default_value = "127.0.0.1:47002")]
        b_bind: SocketAddr,
        /// Where reverse traffic goes (default: learned from what arrives on A).
        #[arg(long)]
        a_peer: Option<SocketAddr>,
        /// Where forward traffic goes (default: learned from what arrives on B).
        #[arg(long)]
        b_peer: Option<SocketAddr>,
    },
    /// TUN devices in network namespaces NAME-a (10.77.0.1) and NAME-b
    /// (10.77.0.2); run programs there with `ip netns exec NAME-a …`. Root only.
    Tun {
        #[command(flatten)]
        common: Common,
        /// Namespace name prefix.
        #[arg(long, default_value = "lu2k")]
        name: String,
        /// MTU of both devices.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
    },
}

/// Reads a link file: `[forward]`/`[reverse]` tables, or one direction for both.
fn read_link(path: &Path) -> Result<DuplexConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let duplex = if table.contains_key("forward") || table.contains_key("reverse") {
        toml::from_str::<DuplexConfig>(&text)
    } else {
        toml::from_str::<Config>(&text).map(DuplexConfig::symmetric)
    }
    .with_context(|| format!("link settings in {}", path.display()))?;
    duplex
        .validate()
        .with_context(|| format!("link settings in {}", path.display()))?;
    Ok(duplex)
}

fn print(t: Duration, s: &RelayStats) {
    let mean = s
        .late_total
        .checked_div(s.sent.max(1) as u32)
        .unwrap_or_default();
    for (dir, d) in [("A->B", &s.forward), ("B->A", &s.reverse)] {
        println!(
            "{:8.1}s {dir}: offered {} ({} B), delivered {}, dropped queue {} outage {} loss {}, duplicated {}",
            t.as_secs_f64(),
            d.offered.packets,
            d.offered.bytes,
            d.delivered.packets,
            d.dropped_queue.packets,
            d.dropped_outage.packets,
            d.dropped_loss.packets,
            d.duplicated.packets
        );
    }
    println!(
        "{:8.1}s sent {}, unroutable {}, send errors {}, lateness mean {mean:?} max {:?}",
        t.as_secs_f64(),
        s.sent,
        s.unroutable,
        s.send_errors,
        s.late_max
    );
}

/// Prints counters until the duration passes or stdin ends.
fn wait(common: &Common, stats: impl Fn() -> RelayStats) -> Result<()> {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    if common.duration.is_none() {
        println!("running; press Enter (or end input) to stop");
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let _ = tx.send(());
        });
    }
    let end = common.duration.map(|d| start + Duration::from_secs_f64(d));
    let every = (common.every > 0.0).then(|| Duration::from_secs_f64(common.every));
    let mut next = every.map(|e| start + e);
    loop {
        let now = Instant::now();
        let until = [end, next].into_iter().flatten().min();
        let timeout = until.map_or(Duration::from_secs(3600), |u| {
            u.saturating_duration_since(now)
        });
        match rx.recv_timeout(timeout) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return Ok(());
        }
        if let (Some(n), Some(e)) = (next, every) {
            if now >= n {
                print(now - start, &stats());
                next = Some(n + e);
            }
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Relay {
            common,
            a_bind,
            b_bind,
            a_peer,
            b_peer,
        } => {
            let link = read_link(&common.link)?;
            let mut cfg = RelayConfig::loopback(link, common.seed);
            cfg.a_bind = a_bind;
            cfg.b_bind = b_bind;
            cfg.a_peer = a_peer;
            cfg.b_peer = b_peer;
            if common.no_realtime {
                cfg.realtime_priority = None;
            }
            let relay = Relay::spawn(cfg).context("starting the relay")?;
            println!(
                "relay: side A at {}, side B at {}; real-time scheduling: {}",
                relay.a_addr(),
                relay.b_addr(),
                if relay.is_realtime() {
                    "yes"
                } else {
                    "no (timing may slip under load)"
                }
            );
            let start = relay.epoch();
            wait(&common, || relay.stats())?;
            let stats = relay.stop()?;
            print(start.elapsed(), &stats);
        }
        Mode::Tun { common, name, mtu } => {
            if !rustix::process::geteuid().is_root() {
                bail!("tun mode needs root (network namespaces, /dev/net/tun); use `relay` without root");
            }
            let link = read_link(&common.link)?;
            let mut cfg = TunConfig::new(link, common.seed, &name);
            cfg.mtu = mtu;
            if common.no_realtime {
                cfg.realtime_priority = None;
            }
            let tun = TunLink::spawn(cfg).context("starting the TUN link")?;
            println!(
                "tun: {} ({}) <-> {} ({}); try `ip netns exec {} ping {}`; real-time scheduling: {}",
                tun.a().name(),
                tun.a_ip(),
                tun.b().name(),
                tun.b_ip(),
                tun.a().name(),
                tun.b_ip(),
                if tun.is_realtime() { "yes" } else { "no" }
            );
            let start = tun.epoch();
            wait(&common, || tun.stats())?;
            let stats = tun.stop()?;
            print(start.elapsed(), &stats);
        }
    }
    Ok(())
}
