//! `lu2k-engine`: the lu2k daemon. Run `lu2k-engine --help`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use lu2k_engine::daemon::config::{BackendChoice, Config, IoPathChoice};
use lu2k_engine::io::probe::Features;

/// The lu2k engine: carries LNet messages between kshim's shared ring region and UDP
/// (UDT4-compatible transport), one io_uring reactor per core.
///
/// Typical start, attached to a kshim serving /run/lu2k/kshim.sock, this node being
/// 10.0.0.1 and all lu2k nodes using UDP port 7988:
///
///     lu2k-engine run --kshim-socket /run/lu2k/kshim.sock --bind 10.0.0.1 --port 7988 --cores 2
///
/// Peers need no configuration: a peer's address is its NID's IPv4 address and the
/// common port (use [[peer]] entries in the config file for exceptions). Check what
/// the kernel offers with `lu2k-engine probe`, read counters of a running engine with
/// `lu2k-engine stats`. SIGTERM stops it cleanly: no new messages, in-flight ones
/// drained or failed back, all buffers returned, exit 0.
#[derive(Debug, Parser)]
#[command(name = "lu2k-engine", version, verbatim_doc_comment)]
struct Cli {
    /// Log level: error, warn, info, debug or trace, or tracing directives such as
    /// "lu2k_engine::shard=debug,info" [default: RUST_LOG, else info]. Under systemd
    /// lines carry journal priorities and no timestamps.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the engine (attach to kshim, serve until SIGTERM).
    Run(RunArgs),
    /// Print the kernel features the engine probes and the I/O path it will run.
    Probe {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show the choice as if the slow path were forced.
        #[arg(long, value_enum)]
        io_path: Option<IoPathChoice>,
    },
    /// Print the counters of a running engine.
    Stats {
        /// The engine's stats socket.
        #[arg(long, default_value = "/run/lu2k/engine-stats.sock")]
        socket: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file (and flags) without starting.
    CheckConfig(RunArgs),
    /// Make, show or remove an instance of the kernel module's /dev/lu2k (the region
    /// an engine attaches to with --kshim device:/dev/lu2k,instance=N).
    #[command(subcommand)]
    Device(DeviceCmd),
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Make an instance and print its number, e.g.
    /// `lu2k-engine device create --nid 10.0.0.1@lu2k --cores 2`.
    Create {
        /// This node's NID on the instance (repeat for several; the first is the
        /// source of the module's selftest traffic).
        #[arg(long = "nid", required = true, value_name = "NID")]
        nids: Vec<lu2k_ring_abi::Nid>,
        /// Ring sets: the engine's --cores.
        #[arg(long, default_value_t = 1)]
        cores: u32,
        /// Cores each peer's messages are spread over (socklnd's conns_per_peer).
        #[arg(long, default_value_t = 1)]
        conns_per_peer: u32,
        /// 1 MiB TX slots: messages in flight at once (lu2klnd's credits follow them).
        #[arg(long, default_value_t = 64)]
        tx_slots: u32,
        /// RX buffers, all cores together [default: sized for --path-rate-mbps and
        /// --path-rtt-ms where given (3 x rate x RTT of datagrams), else 1024 per core].
        #[arg(long)]
        rx_buffers: Option<u32>,
        /// The path's rate in Mbit/s, to size the RX pool (with --path-rtt-ms).
        #[arg(long)]
        path_rate_mbps: Option<f64>,
        /// The path's round-trip time in ms, to size the RX pool (with --path-rate-mbps).
        #[arg(long)]
        path_rtt_ms: Option<f64>,
        /// The path's largest IP packet (the engine's mss), to size the RX pool.
        #[arg(long, default_value_t = 1500)]
        path_mss: u32,
        /// RX buffer size, bytes.
        #[arg(long, default_value_t = 65536)]
        rx_buf_size: u32,
        /// The device.
        #[arg(long, default_value = "/dev/lu2k")]
        device: PathBuf,
    },
    /// Print an instance's NIDs, cores, region and counters.
    Show {
        /// The instance number `create` printed.
        #[arg(long, default_value_t = 0)]
        instance: u32,
        /// The device.
        #[arg(long, default_value = "/dev/lu2k")]
        device: PathBuf,
    },
    /// Remove an instance (refused while an engine is attached).
    Destroy {
        /// The instance number.
        #[arg(long)]
        instance: u32,
        /// The device.
        #[arg(long, default_value = "/dev/lu2k")]
        device: PathBuf,
    },
}

/// Settings; each flag overrides the same field of the config file.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file (fields: see the engine README or `config.rs`).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// kshim's Unix socket, where the region and doorbells are received.
    #[arg(long)]
    kshim_socket: Option<PathBuf>,
    /// The kernel half: socket:PATH (userspace kshim) or device:/dev/lu2k[,instance=N]
    /// (the kernel module lu2k_kshim.ko); wins over --kshim-socket.
    #[arg(long)]
    kshim: Option<String>,
    /// Local address to bind, IPv4 or IPv6: this node's NID address; "::" binds
    /// every address, dual-stack (IPv4 peers too; the config field bind_v6only turns
    /// IPv4 off); "[::]:7988" also sets the port.
    #[arg(long)]
    bind: Option<String>,
    /// UDP port used by all lu2k nodes [default: 7988].
    #[arg(long)]
    port: Option<u16>,
    /// Reactor threads; peers are sharded across them. Each core serves one of the
    /// ring sets kshim created, so N must equal kshim's core count; left out, the
    /// engine runs as many cores as kshim's region has.
    #[arg(long)]
    cores: Option<u16>,
    /// I/O path: auto (probe), uring, or epoll (slow path; also LU2K_FORCE_SLOW=1).
    #[arg(long, value_enum)]
    io_path: Option<IoPathChoice>,
    /// Transport back-end: udt (UDT4-compatible, over UDP) or rds (the kernel's RDS
    /// over rds_tcp; needs the rds and rds_tcp modules) [default: udt].
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
    /// Zero-copy send policy (io_uring path): auto = SENDMSG_ZC until the kernel keeps
    /// reporting it copied anyway (loopback, veth), then plain SENDMSG; always; never
    /// [default: auto].
    #[arg(long, value_enum)]
    zero_copy: Option<lu2k_engine::io::uring::ZcMode>,
    /// Where the kernel's work of a send runs (io_uring path): auto = on one io_uring
    /// worker thread when the machine has at least 4 CPUs per engine core, else on
    /// the core's thread; on; off [default: auto].
    #[arg(long, value_enum)]
    send_worker: Option<lu2k_engine::io::uring::SendWorker>,
    /// How an io_uring core sleeps on kshim's doorbell: auto = an io_uring futex wait
    /// where the kernel has IORING_OP_FUTEX_WAIT (6.7+) and kshim offers futex wakes,
    /// else the eventfd; eventfd; futex [default: auto].
    #[arg(long, value_enum)]
    doorbell: Option<lu2k_engine::io::uring::DoorbellMode>,
    /// Unix socket serving statistics [default: /run/lu2k/engine-stats.sock].
    #[arg(long)]
    stats_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9788 [default:
    /// off]. Loopback addresses only, unless --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Allow --metrics-listen on a non-loopback address (the endpoint has no
    /// authentication: firewall it).
    #[arg(long)]
    metrics_allow_remote: bool,
    /// Seconds without an answer before a peer is declared down [default: 600].
    #[arg(long)]
    peer_down_timeout_s: Option<u64>,
    /// On SIGTERM, seconds to finish in-flight messages before failing the rest back
    /// [default: 5].
    #[arg(long)]
    drain_timeout_s: Option<u64>,
    /// Path MSS (largest IP packet), bytes [default: 1500].
    #[arg(long)]
    mss: Option<u16>,
    /// Pin core thread i to CPU i.
    #[arg(long)]
    pin_cpus: bool,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(v) = &self.kshim_socket {
            c.kshim_socket = Some(v.clone());
        }
        if let Some(v) = &self.kshim {
            c.kshim = Some(v.clone());
        }
        if let Some(v) = &self.bind {
            let (ip, port) = lu2k_engine::daemon::config::parse_bind(v).map_err(|_| {
                anyhow::anyhow!(
                    "--bind {v:?} is not an address: --bind 10.0.0.1, --bind 2001:db8::1, \
                     --bind :: (every address, IPv4 and IPv6) or --bind '[::]:7988'"
                )
            })?;
            c.bind = ip;
            if let Some(p) = port {
                if self.port.is_some_and(|q| q != p) {
                    anyhow::bail!(
                        "--bind {v} names port {p} and --port another: give the port once"
                    );
                }
                c.port = p;
            }
        }
        if let Some(v) = self.port {
            c.port = v;
        }
        if let Some(v) = self.cores {
            c.cores = Some(v);
        }
        if let Some(v) = self.io_path {
            c.io_path = v;
        }
        if let Some(v) = self.send_worker {
            c.send_worker = v;
        }
        if let Some(v) = self.doorbell {
            c.doorbell = v;
        }
        if let Some(v) = self.zero_copy {
            c.zero_copy = v;
        }
        if let Some(v) = self.backend {
            c.backend = v;
        }
        if std::env::var("LU2K_FORCE_SLOW").is_ok_and(|v| v == "1") {
            c.io_path = IoPathChoice::Epoll;
        }
        if let Some(v) = &self.stats_socket {
            c.stats_socket = v.clone();
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = Some(v);
        }
        c.metrics_allow_remote |= self.metrics_allow_remote;
        if let Some(v) = self.peer_down_timeout_s {
            c.peer_down_timeout_s = v;
        }
        if let Some(v) = self.drain_timeout_s {
            c.drain_timeout_s = v;
        }
        if let Some(v) = self.mss {
            c.mss = v;
        }
        c.pin_cpus |= self.pin_cpus;
        c.validate()?;
        Ok(c)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let out = match lu2k_engine::log::init(cli.log_level.as_deref()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match command(cli.cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The journal takes the priority from the prefix; elsewhere the
            // error and its causes, as anyhow prints them.
            if out == lu2k_engine::log::Output::Journal {
                eprintln!("<3>error: {e:#}");
            } else {
                eprintln!("Error: {e:?}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn command(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Probe { json, io_path } => {
            let f = Features::probe();
            let forced = io_path == Some(IoPathChoice::Epoll)
                || std::env::var("LU2K_FORCE_SLOW").is_ok_and(|v| v == "1");
            let (path, why) = f.choose(forced);
            if json {
                let v = serde_json::json!({ "features": f, "path": path, "reason": why });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{f}");
                println!("path that will run            {path}: {why}");
            }
            if io_path == Some(IoPathChoice::Uring) && path != lu2k_engine::io::probe::IoPath::Uring
            {
                bail!("--io-path uring requested but the fast path is not available");
            }
            Ok(())
        }
        Cmd::Stats { socket, json } => {
            let r = lu2k_engine::daemon::stats::fetch(&socket).with_context(|| {
                format!(
                    "cannot read stats from {} (is the engine running?)",
                    socket.display()
                )
            })?;
            let text = if json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                lu2k_engine::daemon::stats::render(&r)
            };
            // A reader that stops early (`| head`, `| grep -q`) is not an error.
            use std::io::Write as _;
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("writing the stats to stdout"),
            }
        }
        Cmd::CheckConfig(args) => {
            let c = args.config()?;
            println!("config ok:\n{}", toml::to_string_pretty(&c)?);
            Ok(())
        }
        Cmd::Run(args) => {
            let c = args.config()?;
            lu2k_engine::daemon::run(c)
        }
        Cmd::Device(cmd) => device(cmd),
    }
}

fn device(cmd: DeviceCmd) -> anyhow::Result<()> {
    use lu2k_engine::daemon::device as dev;
    match cmd {
        DeviceCmd::Create {
            nids,
            cores,
            conns_per_peer,
            tx_slots,
            rx_buffers,
            path_rate_mbps,
            path_rtt_ms,
            path_mss,
            rx_buf_size,
            device,
        } => {
            let (rx_buffers, why) = match (rx_buffers, path_rate_mbps, path_rtt_ms) {
                (Some(n), _, _) => (n, format!("{n} RX buffers (--rx-buffers)")),
                (None, Some(rate), Some(rtt)) if rate > 0.0 && rtt > 0.0 => {
                    lu2k_ring_abi::rx_pool::bufs_for_path(rate, rtt, rx_buf_size, path_mss)
                }
                (None, None, None) => {
                    let n = 1024u32.saturating_mul(cores);
                    (
                        n,
                        format!(
                            "{n} RX buffers (default, 1024 per core: the path is not known; \
                             give --path-rate-mbps and --path-rtt-ms to size the pool for it)"
                        ),
                    )
                }
                _ => anyhow::bail!(
                    "--path-rate-mbps and --path-rtt-ms size the RX pool together, both above \
                     0; give both (e.g. --path-rate-mbps 500 --path-rtt-ms 600) or --rx-buffers"
                ),
            };
            println!("RX pool: {why}");
            let spec = dev::Spec {
                nids,
                cores,
                conns_per_peer,
                tx_slots,
                rx_buffers,
                rx_buf_size,
            };
            let (n, size) = dev::create(&device, &spec)?;
            println!(
                "instance {n}: {} cores, region {} MiB; attach with: lu2k-engine run --kshim device:{},instance={n} ...",
                spec.cores,
                size >> 20,
                device.display()
            );
            Ok(())
        }
        DeviceCmd::Show { instance, device } => {
            print!("{}", dev::show(&device, instance)?);
            Ok(())
        }
        DeviceCmd::Destroy { instance, device } => {
            dev::destroy(&device, instance)?;
            println!("instance {instance} removed");
            Ok(())
        }
    }
}
