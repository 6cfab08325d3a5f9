//! Engine configuration: a TOML file, overridden field by field by command-line flags,
//! then validated as a whole. Every error names the field and says how to fix it.
//!
//! ```toml
//! # /etc/lu2k/engine.toml
//! kshim_socket = "/run/lu2k/kshim.sock"   # where kshim serves the region
//! # kshim = "device:/dev/lu2k"           # or the kernel module (device:PATH[,instance=N]);
//! #                                      # socket:PATH is the same as kshim_socket
//! bind = "10.0.0.1"                       # local address = this node's NID address
//!                                         # (or "2001:db8::1", or "::" for every address,
//!                                         # dual-stack; "[::]:7988" also sets the port)
//! bind_v6only = false                     # true: an IPv6 bind refuses IPv4 peers
//! port = 7988                             # UDP port, the same on every lu2k node
//! cores = 2                               # reactor threads
//! io_path = "auto"                        # auto | uring | epoll
//! zero_copy = "auto"                     # auto | always | never (SENDMSG_ZC policy, io_uring path)
//! send_worker = "auto"                   # auto | on | off (sends on an io_uring worker thread)
//! doorbell = "auto"                      # auto | eventfd | futex (how an io_uring core sleeps on kshim)
//! backend = "udt"                         # udt (UDP, UDT4-compatible) | rds (AF_RDS over rds_tcp)
//! stats_socket = "/run/lu2k/engine-stats.sock"
//! metrics_listen = "127.0.0.1:9788"      # Prometheus /metrics; unset = off
//! metrics_allow_remote = false            # true to serve metrics on a non-loopback address
//! peer_down_timeout_s = 600               # satellite outages last minutes
//! drain_timeout_s = 5                     # SIGTERM: time to finish in-flight messages
//! mss = 1500                              # UDT MSS (IP packet size) on the path
//!
//! [[peer]]                                # optional: peers not at NID-address:port
//! nid = "10.0.0.2@lu2k"
//! addr = "10.0.0.2:7988"
//! [[peer]]                                # an IPv6 peer (needs an IPv6 or dual-stack bind)
//! nid = "2001:db8::2@lu2k"
//! addr = "[2001:db8::2]:7988"
//! fec = "live"                            # off | live: forward error correction to this
//!                                         # lu2k peer (set on both ends; see FecChoice)
//! max_rate_mbps = 100.0                   # optional: send to this peer at most this fast
//!                                         # (its share of a link others use too)
//!
//! security = "required"                   # required | off; required when a key is set
//! psk_file = "/etc/lu2k/psk"              # the network's pre-shared key (mode 0600)
//! psk_next_file = "/etc/lu2k/psk.next"    # optional: also accepted (key rotation)
//! [[peer_key]]                            # optional: a key of one peer instead
//! nid = "10.0.0.3@lu2k"
//! psk_file = "/etc/lu2k/psk.10.0.0.3"
//! ```
//!
//! Defaults suit satellite links: large socket buffers (64 MiB), a long peer-down
//! timeout (10 minutes, longer than a typical outage) and a large flow window.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The longest `gather_us` the config takes.
const MAX_GATHER_US: u32 = 10_000;

/// Completions that end a gathering core's sleep at once (`gather_us`).
pub const GATHER_EVENTS: u32 = 32;

/// Which I/O path to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoPathChoice {
    /// io_uring if the probe says every fast-path operation works, else epoll.
    #[default]
    Auto,
    /// io_uring; refuse to start if it does not work.
    Uring,
    /// epoll + sendmmsg/recvmmsg.
    Epoll,
}

/// Which transport back-end carries LNet messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// UDT4-compatible transport over UDP (works on any kernel).
    #[default]
    Udt,
    /// The kernel's RDS (`AF_RDS`, `SOCK_SEQPACKET`) over its TCP transport; needs the
    /// `rds` and `rds_tcp` modules.
    Rds,
}

/// A peer whose UDP address is not `NID-address:port`, or that has several
/// links (`transport::links`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerCfg {
    /// The peer's NID, e.g. `10.0.0.2@lu2k`.
    pub nid: String,
    /// Where its engine listens (a peer with one link; absent with `link`):
    /// `10.0.0.2:7988` or `[2001:db8::2]:7988`.
    #[serde(default = "no_addr")]
    pub addr: SocketAddr,
    /// Several links to the peer (`[[peer.link]]`: local, remote, weight).
    #[serde(default, rename = "link", skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::transport::links::LinkCfg>,
    /// How messages use the links: failover (default) or balance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::transport::links::Policy>,
    /// Forward error correction to and from this peer.
    #[serde(default, skip_serializing_if = "FecChoice::is_off")]
    pub fec: FecChoice,
    /// The most this engine sends to the peer, Mbit/s of whole IP packets
    /// (UDT4's `UDT_MAXBW`): its share of a link that other nodes use too,
    /// as an operator provisions a satellite transponder's peers. Pacing
    /// never runs faster, whatever the controller measures; spread over the
    /// cores that carry the peer. Unset: the controller takes what it finds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_mbps: Option<f64>,
}

/// Forward error correction on a peer's UDT connections (`fec` of a
/// `[[peer]]`; `transport::udt`'s FEC, the codec `lu2k_udt::fec`).
///
/// Only between two lu2k engines, each with `fec = "live"` for the other: a
/// receiver without it counts the repair packets malformed, and a UDT4 peer's
/// wire must stay UDT4's. What it costs: up to 8.5 % more bytes sent
/// (Reed–Solomon repairs, sized to the loss the peer reports), the MSS of the
/// peer's connections 11 bytes smaller, one pass over each data packet's
/// payload to code it (sender) and a copy of it kept for up to 2 s
/// (receiver, at most 24 MB per connection), and a repair group's wait of up
/// to 50 ms before its repairs go out. In exchange, a lost packet is rebuilt
/// about 50 ms after it was lost instead of a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FecChoice {
    /// No FEC: the UDT4 wire.
    #[default]
    Off,
    /// Tuned for a live stream on a GEO path: groups of up to 50 ms of the
    /// stream, repairs adapted to the measured loss, at most 8.5 % of the
    /// data bytes.
    Live,
}

impl FecChoice {
    /// `fec = "off"`.
    pub fn is_off(&self) -> bool {
        *self == FecChoice::Off
    }
}

/// `addr` not given (a peer with links).
fn no_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

/// The IP address of a NID as the transport names the peer: IPv4 or IPv6, an
/// IPv4-mapped IPv6 address as the IPv4 one; `None` for text that is not a NID
/// or a NID without an IP address.
pub fn nid_ip(nid: &str) -> Option<IpAddr> {
    let ip = nid.parse::<lu2k_ring_abi::Nid>().ok()?.ip_addr()?;
    Some(crate::io::sys::canonical(SocketAddr::new(ip, 0)).ip())
}

/// `bind` as written: an address (`10.0.0.1`, `2001:db8::1`, `::`) or an address
/// with the port (`10.0.0.1:7988`, `[::]:7988`).
pub fn parse_bind(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok((a.ip(), Some(a.port())));
    }
    Err(format!(
        "bind = {text:?} is not an address: write bind = \"10.0.0.1\", \"2001:db8::1\", \
         \"::\" (every address, IPv4 and IPv6), or with the port, \"[::]:7988\""
    ))
}

/// The wire's security (see `transport::seal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityChoice {
    /// Every datagram authenticated and encrypted; plain peers refused.
    Required,
    /// The plain UDT4 wire.
    Off,
}

/// The pre-shared key of one peer (instead of the network's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerKeyCfg {
    /// The peer's NID, e.g. `10.0.0.3@lu2k`.
    pub nid: String,
    /// Its key file.
    pub psk_file: PathBuf,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// kshim's Unix socket (the region and doorbells are received there).
    pub kshim_socket: Option<PathBuf>,
    /// Where the kernel half is: `socket:PATH` (userspace kshim) or
    /// `device:/dev/lu2k[,instance=N]` (the kernel module); set, it wins over
    /// `kshim_socket`.
    pub kshim: Option<String>,
    /// Local address to bind, IPv4 or IPv6 (this node's NID address). `0.0.0.0`
    /// (the default) binds the address of the NID kshim serves; `::` binds every
    /// address, IPv4 and IPv6 (dual-stack: IPv4 peers arrive as IPv4-mapped
    /// addresses and are the same peers as over IPv4). In the file it may carry
    /// the port (`"[::]:7988"`), which then sets `port`.
    pub bind: IpAddr,
    /// An IPv6 `bind` takes IPv6 only (`IPV6_V6ONLY`): no IPv4 peers.
    pub bind_v6only: bool,
    /// UDP port, the same for all lu2k nodes.
    pub port: u16,
    /// Reactor threads (cores). kshim creates one ring set per core, so this must
    /// match kshim's region when set; unset, the engine runs one core per ring set.
    pub cores: Option<u16>,
    /// I/O path.
    pub io_path: IoPathChoice,
    /// Transport back-end.
    pub backend: BackendChoice,
    /// Zero-copy send policy of the io_uring path: `auto` (SENDMSG_ZC until the
    /// kernel keeps reporting it copied anyway, then plain SENDMSG), `always`, `never`.
    pub zero_copy: crate::io::uring::ZcMode,
    /// Where sends run: on the core's thread, or on one io_uring worker thread.
    pub send_worker: crate::io::uring::SendWorker,
    /// How an io_uring core waits for kshim's doorbell: `auto` (a futex wait where the
    /// kernel and kshim offer it, else the eventfd), `eventfd`, `futex`.
    pub doorbell: crate::io::uring::DoorbellMode,
    /// Unix socket that serves statistics (`lu2k-engine stats`).
    pub stats_socket: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`); unset, there is no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve metrics on a non-loopback address (the endpoint has no authentication).
    pub metrics_allow_remote: bool,
    /// Seconds without any answer before a peer is reported down and its messages
    /// are failed back.
    pub peer_down_timeout_s: u64,
    /// On SIGTERM (or kshim closing), seconds to finish the messages in flight before
    /// the rest are failed back with `Shutdown`.
    pub drain_timeout_s: u64,
    /// Largest IP packet on the path (UDT's MSS), bytes.
    pub mss: u16,
    /// Socket send buffer, bytes.
    pub sndbuf: usize,
    /// Socket receive buffer, bytes.
    pub rcvbuf: usize,
    /// UDT flow window, packets.
    pub flow_window: u32,
    /// Microseconds a core spins on its rings before sleeping on the doorbell, at
    /// least; the spin adapts to the traffic up to `spin_max_us` (see `spin`).
    pub spin_us: u32,
    /// Microseconds a core spins before sleeping, at most.
    pub spin_max_us: u32,
    /// Microseconds a sleeping core lets completions gather before it wakes for
    /// the first, where its peers are at least 50 times that away (round trip)
    /// and nothing is awaited (see `spin`); never past its next timer. (It would
    /// wake at 32 completions, but with `DEFER_TASKRUN` a multishot receive's
    /// datagrams count as one until the core runs them, so while they flow it
    /// is this time that ends the sleep.) 0: a core wakes for each completion.
    /// Needs Linux 6.12 (the start-up log says `minimum wait no` where the
    /// kernel lacks it).
    pub gather_us: u32,
    /// Pin core thread i to CPU i.
    pub pin_cpus: bool,
    /// Peers at non-default addresses.
    #[serde(rename = "peer")]
    pub peers: Vec<PeerCfg>,
    /// `required` (the default when a key file is set) or `off` (the default
    /// without one).
    pub security: Option<SecurityChoice>,
    /// The LNet network's pre-shared key file: at least 32 bytes, readable by
    /// the engine's user only. Never given on the command line.
    pub psk_file: Option<PathBuf>,
    /// A second key file whose key is accepted from peers too (rotation).
    pub psk_next_file: Option<PathBuf>,
    /// Keys of single peers, used instead of the network's for them.
    #[serde(rename = "peer_key")]
    pub peer_keys: Vec<PeerKeyCfg>,
    /// The file this was read from ([`Config::load`]): SIGHUP re-reads its
    /// key fields.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kshim_socket: None,
            kshim: None,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            bind_v6only: false,
            port: 7988,
            cores: None,
            io_path: IoPathChoice::Auto,
            backend: BackendChoice::Udt,
            zero_copy: crate::io::uring::ZcMode::Auto,
            send_worker: crate::io::uring::SendWorker::Auto,
            doorbell: crate::io::uring::DoorbellMode::Auto,
            stats_socket: PathBuf::from("/run/lu2k/engine-stats.sock"),
            metrics_listen: None,
            metrics_allow_remote: false,
            peer_down_timeout_s: 600,
            drain_timeout_s: 5,
            mss: 1500,
            sndbuf: 64 << 20,
            rcvbuf: 64 << 20,
            flow_window: 65536,
            spin_us: 50,
            spin_max_us: 400,
            gather_us: 1000,
            pin_cpus: false,
            peers: Vec::new(),
            security: None,
            psk_file: None,
            psk_next_file: None,
            peer_keys: Vec::new(),
            source: None,
        }
    }
}

/// A configuration error: which field, what is wrong, how to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        reason: String,
    },
    /// The TOML did not parse or has an unknown field / wrong type.
    #[error("config file {path}: {reason}")]
    Parse {
        /// File.
        path: String,
        /// Parser message (names the key and line).
        reason: String,
    },
    /// A field has an unusable value.
    #[error("config field `{field}` = {value}: {problem}; fix: {fix}")]
    Invalid {
        /// Field name as written in the TOML file.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        problem: &'static str,
        /// What to do.
        fix: &'static str,
    },
}

impl Config {
    /// Parses TOML text (`path` is only used in messages).
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let parse = |reason: String| ConfigError::Parse {
            path: path.into(),
            reason,
        };
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| parse(e.to_string().trim().to_string()))?;
        // `bind = "[::]:7988"`: the address goes to `bind`, the port to `port`.
        // Otherwise the text is read as it is, so that errors keep their line.
        let Some(toml::Value::String(b)) = table.get("bind") else {
            return toml::from_str(text).map_err(|e| parse(e.to_string().trim().to_string()));
        };
        let (ip, port) = parse_bind(b).map_err(parse)?;
        let Some(port) = port else {
            return toml::from_str(text).map_err(|e| parse(e.to_string().trim().to_string()));
        };
        if let Some(toml::Value::Integer(p)) = table.get("port") {
            if *p != i64::from(port) {
                return Err(parse(format!(
                    "bind = {b:?} names port {port} and port = {p}: give the port once"
                )));
            }
        }
        table.insert("port".into(), toml::Value::Integer(i64::from(port)));
        table.insert("bind".into(), toml::Value::String(ip.to_string()));
        table
            .try_into()
            .map_err(|e: toml::de::Error| parse(e.to_string().trim().to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut c = Self::from_toml(&text, &path.display().to_string())?;
        c.source = Some(path.to_path_buf());
        Ok(c)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, problem, fix| {
            Err(ConfigError::Invalid {
                field,
                value,
                problem,
                fix,
            })
        };
        if let Some(k) = &self.kshim {
            if k.parse::<lu2k_ring_abi::attach::Endpoint>().is_err() {
                return Err(ConfigError::Invalid {
                    field: "kshim",
                    value: k.clone(),
                    problem: "is not socket:PATH, device:PATH or device:PATH,instance=N",
                    fix: "write kshim = \"device:/dev/lu2k\" (the kernel module) or \
                          kshim = \"socket:/run/lu2k/kshim.sock\" (userspace kshim)",
                });
            }
        }
        if let Some(cores @ (0 | 65..)) = self.cores {
            return bad(
                "cores",
                cores.to_string(),
                "must be between 1 and 64",
                "set cores to the number of reactor threads, e.g. cores = 2",
            );
        }
        if self.port == 0 {
            return bad(
                "port",
                "0".into(),
                "peers find this engine at a fixed port; 0 would pick a random one",
                "set port to the UDP port all lu2k nodes use, e.g. port = 7988",
            );
        }
        if !(576..=65535).contains(&self.mss) {
            return bad(
                "mss",
                self.mss.to_string(),
                "must be between 576 and 65535 bytes",
                "set mss to the path MTU, e.g. mss = 1500",
            );
        }
        if self.peer_down_timeout_s < 5 {
            return bad(
                "peer_down_timeout_s",
                self.peer_down_timeout_s.to_string(),
                "shorter than a few RTTs of a satellite link; peers would flap",
                "use at least 5 s; the default 600 s rides out satellite outages",
            );
        }
        if self.drain_timeout_s > 3600 {
            return bad(
                "drain_timeout_s",
                self.drain_timeout_s.to_string(),
                "longer than an hour; a stopping engine would hold its node that long",
                "use 0 (fail everything in flight at once) to a few minutes; the default is 5 s",
            );
        }
        if self.sndbuf < 1 << 16 || self.rcvbuf < 1 << 16 {
            return bad(
                "sndbuf/rcvbuf",
                format!("{}/{}", self.sndbuf, self.rcvbuf),
                "below 64 KiB; one GSO batch would not fit",
                "leave the default (64 MiB) or raise it",
            );
        }
        if self.flow_window < 32 {
            return bad(
                "flow_window",
                self.flow_window.to_string(),
                "too small for any useful throughput",
                "use at least 32 packets; the default 65536 fills long fat links",
            );
        }
        if self.spin_us > 1_000_000 {
            return bad(
                "spin_us",
                self.spin_us.to_string(),
                "more than a second of spinning wastes a core",
                "use 0..=1000 µs; 50 is a good start",
            );
        }
        if self.spin_max_us > 1_000_000 || self.spin_max_us < self.spin_us {
            return bad(
                "spin_max_us",
                self.spin_max_us.to_string(),
                "below spin_us, or more than a second of spinning",
                "use spin_us..=1000 µs; 400 covers a small-message round trip",
            );
        }
        if self.gather_us > MAX_GATHER_US {
            return bad(
                "gather_us",
                self.gather_us.to_string(),
                "a core that gathers that long answers its peers late",
                "use 0..=10000 µs; 1000 (a millisecond, the pacing quantum) is the default",
            );
        }
        if let Some(a) = self.metrics_listen {
            if !a.ip().is_loopback() && !self.metrics_allow_remote {
                return bad(
                    "metrics_listen",
                    a.to_string(),
                    "not a loopback address, and the metrics endpoint has no authentication",
                    "listen on 127.0.0.1:9788 and scrape through a local Prometheus or a \
                     reverse proxy, or allow it with metrics_allow_remote = true \
                     (flag --metrics-allow-remote) behind a firewall",
                );
            }
        }
        for p in &self.peers {
            if p.nid.parse::<lu2k_ring_abi::Nid>().is_err() {
                return bad(
                    "peer.nid",
                    format!("{:?}", p.nid),
                    "not a NID",
                    "write it as ADDRESS@NET, e.g. nid = \"10.0.0.2@lu2k\"",
                );
            }
            let ip = nid_ip(&p.nid).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let given = p.addr != no_addr();
            let sealed = self.sealed();
            let links = &p.links;
            if let Err(e) =
                crate::transport::links::check_peer(ip, links, p.policy, given, self.bind, sealed)
            {
                return Err(ConfigError::Invalid {
                    field: e.field,
                    value: e.value,
                    problem: e.problem,
                    fix: e.fix,
                });
            }
            if links.is_empty() && p.addr.port() == 0 {
                return bad(
                    "peer.addr",
                    p.addr.to_string(),
                    "port 0",
                    "give the peer engine's UDP port, e.g. addr = \"10.0.0.2:7988\"",
                );
            }
            if let Some(r) = p.max_rate_mbps {
                if !(r.is_finite() && (0.1..=100_000.0).contains(&r)) {
                    return bad(
                        "peer.max_rate_mbps",
                        format!("{r} for {}", p.nid),
                        "not a rate from 0.1 to 100000 Mbit/s",
                        "give the peer's share of the link in Mbit/s, e.g. max_rate_mbps = 12.5, \
                         or remove it",
                    );
                }
                if !links.is_empty() || self.backend == BackendChoice::Rds {
                    return bad(
                        "peer.max_rate_mbps",
                        format!("{r} for {}", p.nid),
                        "a rate cap paces a peer with one link over the UDT back-end only",
                        "remove max_rate_mbps from this peer, or give it one addr and \
                         backend = \"udt\"",
                    );
                }
            }
            if !p.fec.is_off() && (!links.is_empty() || self.backend == BackendChoice::Rds) {
                return bad(
                    "peer.fec",
                    format!("{:?} for {}", p.fec, p.nid),
                    "FEC runs on a peer with one link over the UDT back-end only",
                    "remove fec from this peer, or give it one addr and backend = \"udt\"",
                );
            }
        }
        self.check_families()?;
        self.keyring().map(|_| ())
    }

    /// The address families of `bind`, `bind_v6only`, the back-end and the
    /// `[[peer]]` addresses fit together: an IPv4 socket cannot reach an IPv6
    /// peer, an IPv6-only one an IPv4 peer, and RDS is IPv4 only.
    fn check_families(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, problem, fix| {
            Err(ConfigError::Invalid {
                field,
                value,
                problem,
                fix,
            })
        };
        if self.bind_v6only && self.bind.is_ipv4() {
            return bad(
                "bind_v6only",
                "true".into(),
                "bind is an IPv4 address; IPV6_V6ONLY applies to an IPv6 bind",
                "remove bind_v6only, or bind an IPv6 address (bind = \"::\")",
            );
        }
        if let IpAddr::V6(b) = self.bind {
            if b.to_ipv4_mapped().is_some() {
                return bad(
                    "bind",
                    self.bind.to_string(),
                    "an IPv4-mapped IPv6 address",
                    "write the IPv4 address itself (bind = \"10.0.0.1\")",
                );
            }
        }
        if self.bind.is_ipv6() && self.bind.is_unspecified() && self.sealed() {
            // The sealed handshake binds both ends' addresses into its MAC, and a
            // socket bound to every address neither knows which of them a peer
            // sees nor fixes the source the kernel's route picks.
            return bad(
                "bind",
                self.bind.to_string(),
                "a dual-stack wildcard, and the sealed wire binds this node's address \
                 into every handshake",
                "bind this node's NID address (bind = \"2001:db8::1\" or \"10.0.0.1\"); \
                 a wildcard bind runs only the plain wire",
            );
        }
        let rds = self.backend == BackendChoice::Rds;
        if rds && self.bind.is_ipv6() {
            return bad(
                "bind",
                self.bind.to_string(),
                "an IPv6 address, and the RDS back-end (Linux RDS over TCP) is IPv4 only",
                "bind an IPv4 address with backend = \"rds\", or use backend = \"udt\" for IPv6",
            );
        }
        // The families a socket bound to `bind` reaches; an unspecified IPv4 bind
        // takes the served NID's family, known only at start-up.
        let reaches = |ip: IpAddr| match self.bind {
            IpAddr::V4(b) if b.is_unspecified() => true,
            IpAddr::V4(_) => ip.is_ipv4(),
            IpAddr::V6(b) if b.is_unspecified() => ip.is_ipv6() || !self.bind_v6only,
            IpAddr::V6(_) => ip.is_ipv6(),
        };
        for p in &self.peers {
            let written = [nid_ip(&p.nid), (p.addr != no_addr()).then(|| p.addr.ip())];
            let linked = p
                .links
                .iter()
                .flat_map(|l| [Some(l.local), Some(l.remote.ip())]);
            for ip in written.into_iter().chain(linked).flatten() {
                if let IpAddr::V6(v6) = ip {
                    if v6.to_ipv4_mapped().is_some() {
                        return bad(
                            "peer",
                            format!("{:?} at {ip}", p.nid),
                            "an IPv4-mapped IPv6 address (the engine knows an IPv4 peer \
                             by its IPv4 address)",
                            "write the IPv4 address itself",
                        );
                    }
                    if v6.is_unicast_link_local() {
                        return bad(
                            "peer",
                            format!("{:?} at {ip}", p.nid),
                            "a link-local IPv6 address, which needs an interface scope \
                             that peers and NIDs do not carry",
                            "use a ULA (fd00::/8) or global address",
                        );
                    }
                }
            }
            for l in &p.links {
                if !reaches(l.remote.ip()) {
                    return bad(
                        "peer.link.remote",
                        l.remote.to_string(),
                        "not reachable from the bound socket's family (bind_v6only refuses \
                         IPv4)",
                        "remove bind_v6only, or give the link IPv6 addresses",
                    );
                }
            }
            // Where the engine sends: `addr` when given, else the NID's address.
            let given = (p.addr != no_addr()).then(|| crate::io::sys::canonical(p.addr).ip());
            let dialled = given.or_else(|| nid_ip(&p.nid));
            for (ip, dialled) in [(nid_ip(&p.nid), false), (dialled, true)] {
                let Some(ip) = ip else { continue };
                if rds && ip.is_ipv6() {
                    return bad(
                        "peer",
                        format!("{:?}", p.nid),
                        "an IPv6 peer, and the RDS back-end (Linux RDS over TCP) is IPv4 only",
                        "give the peer an IPv4 NID and addr, or use backend = \"udt\" for IPv6",
                    );
                }
                if dialled && p.links.is_empty() && !reaches(ip) {
                    return bad(
                        "peer.addr",
                        format!("{:?} at {ip}", p.nid),
                        "not reachable from the bound socket's family (IPv4 and IPv6 differ, \
                         or bind_v6only refuses IPv4)",
                        "bind = \"::\" (dual-stack) serves IPv4 and IPv6 peers at once; or \
                         bind an address of the peer's family",
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether the wire is sealed (a key, or `security = "required"`).
    fn sealed(&self) -> bool {
        self.security == Some(SecurityChoice::Required)
            || self.psk_file.is_some()
            || !self.peer_keys.is_empty()
    }

    /// The fields other than the key fields (`security`, `psk_file`,
    /// `psk_next_file`, `peer_key`) whose values differ between `self` and
    /// `other`, by their names in the file: what a key reload does not apply.
    pub fn changed_non_key_fields(&self, other: &Config) -> Vec<String> {
        const KEYS: [&str; 5] = [
            "security",
            "psk_file",
            "psk_next_file",
            "peer_key",
            "source",
        ];
        let table = |c: &Config| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::map::Map::new(),
        };
        let (a, b) = (table(self), table(other));
        let mut names: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| !KEYS.contains(&k.as_str()) && a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The wire's security and its keys, read and checked: `None` for the
    /// plain wire. Errors name the field: a key file missing or unreadable, a
    /// symbolic link or not a regular file, owned by another user than the
    /// engine's or root, open to group or others, not 32 raw bytes or 64 hex
    /// digits; a mode that contradicts the keys.
    pub fn keyring(&self) -> Result<Option<crate::transport::seal::Keyring>, ConfigError> {
        use crate::transport::seal::{Keyring, Psk};
        let has_key = self.psk_file.is_some() || !self.peer_keys.is_empty();
        let bad = |field, value: String, problem, fix| ConfigError::Invalid {
            field,
            value,
            problem,
            fix,
        };
        match (self.security, has_key) {
            (Some(SecurityChoice::Off), true) => return Err(bad(
                "security",
                "\"off\"".into(),
                "a key file is set, and security = \"off\" would ignore it",
                "remove psk_file/peer_key to run the plain wire, or set security = \"required\"",
            )),
            (Some(SecurityChoice::Required), false) => {
                return Err(bad(
                    "security",
                    "\"required\"".into(),
                    "no key: psk_file is not set",
                    "generate one (umask 077; head -c 32 /dev/urandom > /etc/lu2k/psk), \
                     copy it to every node, and set psk_file = \"/etc/lu2k/psk\"",
                ))
            }
            (_, false) => return Ok(None),
            (_, true) => {}
        }
        if self.backend == BackendChoice::Rds {
            return Err(bad(
                "security",
                "\"required\"".into(),
                "the RDS back-end has no sealed wire",
                "use backend = \"udt\" with a key, or security = \"off\" without one",
            ));
        }
        let load = |field: &'static str, path: &std::path::Path| -> Result<Psk, ConfigError> {
            let value = path.display().to_string();
            let key =
                read_key_file(path).map_err(|(problem, fix)| bad(field, value, problem, fix))?;
            Psk::from_bytes(&key[..]).map_err(|_| {
                bad(
                    field,
                    path.display().to_string(),
                    "the key is shorter than 32 bytes",
                    "write 32 random bytes: head -c 32 /dev/urandom > FILE",
                )
            })
        };
        let mut keys = Keyring::default();
        if let Some(p) = &self.psk_file {
            keys.net.push(load("psk_file", p)?);
            if let Some(n) = &self.psk_next_file {
                keys.net.push(load("psk_next_file", n)?);
            }
        } else if self.psk_next_file.is_some() {
            return Err(bad(
                "psk_next_file",
                "set".into(),
                "a next key without a current one",
                "set psk_file too (the key in use), or move the key to psk_file",
            ));
        }
        for k in &self.peer_keys {
            let Some(ip) = nid_ip(&k.nid) else {
                return Err(bad(
                    "peer_key.nid",
                    format!("{:?}", k.nid),
                    "not a NID with an IP address",
                    "write it as ADDRESS@NET, e.g. nid = \"10.0.0.3@lu2k\" or \
                     nid = \"2001:db8::3@lu2k\"",
                ));
            };
            let psk = load("peer_key.psk_file", &k.psk_file)?;
            keys.peers.entry(ip).or_default().push(psk);
        }
        Ok(Some(keys))
    }

    /// The UDP address of this engine.
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }
}

/// Reads a PSK file: opened once, without following a symbolic link and
/// without blocking on a FIFO; checked on the open file (a regular file, owned
/// by the engine's user or root, no access for group or others); its contents
/// exactly 32 raw bytes, or 64 hex digits (trailing whitespace ignored). The
/// error is `(problem, fix)`.
fn read_key_file(
    path: &std::path::Path,
) -> Result<zeroize::Zeroizing<Vec<u8>>, (&'static str, &'static str)> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    use zeroize::Zeroizing;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => (
                "the key file is a symbolic link (a link can be swapped under the engine)",
                "name the file itself in the config, not a link to it",
            ),
            _ => (
                "the key file is missing or cannot be read",
                "create it (umask 077; head -c 32 /dev/urandom > FILE) with the same \
                 contents on every node, or fix the path",
            ),
        })?;
    let meta = file.metadata().map_err(|_| {
        (
            "the key file cannot be read",
            "make it readable by the engine's user (chmod 600, chown)",
        )
    })?;
    if !meta.file_type().is_file() {
        return Err((
            "the key file is not a regular file",
            "write the key into a regular file: head -c 32 /dev/urandom > FILE",
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err((
            "the key file is owned by another user than the engine's (or root)",
            "chown the file to the user the engine runs as, and chmod 600 it",
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err((
            "the key file is readable or writable by group or others",
            "chmod 600 the file (owned by the engine's user)",
        ));
    }
    // One byte more than the longest accepted form, to see a longer file.
    let mut raw = Zeroizing::new(Vec::with_capacity(129));
    file.take(129).read_to_end(&mut raw).map_err(|_| {
        (
            "the key file cannot be read",
            "make it readable by the engine's user (chmod 600, chown)",
        )
    })?;
    if raw.len() == 32 {
        return Ok(raw);
    }
    let text = raw.trim_ascii_end();
    let hex = |c: u8| (c as char).to_digit(16);
    if text.len() == 64 && text.iter().all(|&c| hex(c).is_some()) {
        let key: Vec<u8> = text
            .chunks(2)
            .map(|p| (hex(p[0]).expect("hex") * 16 + hex(p[1]).expect("hex")) as u8)
            .collect();
        return Ok(Zeroizing::new(key));
    }
    Err((
        "the key file holds neither 32 raw bytes nor 64 hex digits",
        "write 32 random bytes (head -c 32 /dev/urandom > FILE) or their hex \
         (od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > FILE)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reload_names_the_other_fields_that_changed() {
        let a = Config::default();
        let mut b = a.clone();
        b.psk_file = Some("/etc/lu2k/psk.next".into());
        b.peer_keys = vec![];
        assert!(a.changed_non_key_fields(&b).is_empty());
        b.port = 7999;
        b.mss = 1400;
        assert_eq!(a.changed_non_key_fields(&b), ["mss", "port"]);
    }

    #[test]
    fn defaults_are_valid_and_satellite_friendly() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.peer_down_timeout_s >= 300);
    }

    #[test]
    fn parses_a_full_file() {
        let c = Config::from_toml(
            r#"
            kshim_socket = "/tmp/k.sock"
            bind = "10.0.0.1"
            port = 9000
            cores = 2
            io_path = "epoll"
            drain_timeout_s = 90
            [[peer]]
            nid = "10.0.0.2@lu2k"
            addr = "10.0.0.2:9001"
            "#,
            "t.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.cores, Some(2));
        assert_eq!(c.io_path, IoPathChoice::Epoll);
        assert_eq!(c.drain_timeout_s, 90);
        assert_eq!(c.peers[0].addr, "10.0.0.2:9001".parse().unwrap());
    }

    #[test]
    fn bind_takes_either_family_and_an_optional_port() {
        let parse = |text: &str| Config::from_toml(text, "t.toml");
        let c = parse("bind = \"[::]:7999\"").unwrap();
        assert_eq!(c.bind, "::".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 7999);
        assert!(!c.bind_v6only);
        c.validate().unwrap();
        let c = parse("bind = \"2001:db8::1\"\nport = 7000").unwrap();
        assert_eq!(c.local_addr(), "[2001:db8::1]:7000".parse().unwrap());
        let c = parse("bind = \"10.0.0.1:7000\"\nport = 7000").unwrap();
        assert_eq!(c.local_addr(), "10.0.0.1:7000".parse().unwrap());
        // The port given twice, differently; an address that is none.
        let e = parse("bind = \"[::]:7000\"\nport = 7001")
            .unwrap_err()
            .to_string();
        assert!(e.contains("give the port once"), "{e}");
        let e = parse("bind = \"gateway\"").unwrap_err().to_string();
        assert!(
            e.contains("not an address") && e.contains("[::]:7988"),
            "{e}"
        );
        assert_eq!(parse_bind("::1"), Ok(("::1".parse().unwrap(), None)));
        // A wrong field still names its line.
        let e = parse("bind = \"::\"\nbogus = 1").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        // The file shown by check-config reads back the same.
        let c = parse("bind = \"[fd00::1]:7999\"\nbind_v6only = true").unwrap();
        let shown = toml::to_string(&c).unwrap();
        assert_eq!(parse(&shown).unwrap(), c);
    }

    #[test]
    fn families_that_cannot_meet_are_refused_with_the_fix() {
        let with = |bind: &str, v6only: bool, nid: &str, addr: &str| {
            let text = format!(
                "bind = \"{bind}\"\nbind_v6only = {v6only}\n[[peer]]\nnid = \"{nid}\"\naddr = \"{addr}\""
            );
            Config::from_toml(&text, "t.toml").unwrap().validate()
        };
        // Dual-stack serves both; one family serves its own.
        with("::", false, "10.0.0.2@lu2k", "10.0.0.2:7988").unwrap();
        with("::", false, "fd00::2@lu2k", "[fd00::2]:7988").unwrap();
        with("fd00::1", false, "fd00::2@lu2k", "[fd00::2]:7988").unwrap();
        with("::", true, "fd00::2@lu2k", "[fd00::2]:7988").unwrap();
        // The unspecified IPv4 default follows kshim's NID: checked at start.
        with("0.0.0.0", false, "fd00::2@lu2k", "[fd00::2]:7988").unwrap();
        for (bind, v6only, nid, addr) in [
            ("10.0.0.1", false, "fd00::2@lu2k", "[fd00::2]:7988"),
            ("fd00::1", false, "10.0.0.2@lu2k", "10.0.0.2:7988"),
            ("::", true, "10.0.0.2@lu2k", "10.0.0.2:7988"),
        ] {
            let e = with(bind, v6only, nid, addr).unwrap_err().to_string();
            assert!(
                e.contains("`peer.addr`") && e.contains("bind = \"::\""),
                "{bind} {v6only} {nid}: {e}"
            );
        }
        let e = with("10.0.0.1", true, "10.0.0.2@lu2k", "10.0.0.2:7988")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bind_v6only`"), "{e}");
        // RDS is IPv4 only.
        let rds = |text: &str| {
            Config::from_toml(&format!("backend = \"rds\"\n{text}"), "t.toml")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let e = rds("bind = \"fd00::1\"");
        assert!(e.contains("`bind`") && e.contains("IPv4 only"), "{e}");
        let e = rds("[[peer]]\nnid = \"fd00::2@lu2k\"\naddr = \"[fd00::2]:7988\"");
        assert!(e.contains("`peer`") && e.contains("IPv4 only"), "{e}");
        // Forms that cannot work are refused by name.
        let e = with("::ffff:10.0.0.1", false, "10.0.0.2@lu2k", "10.0.0.2:7988")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bind`") && e.contains("IPv4-mapped"), "{e}");
        let e = with("::", false, "10.0.0.2@lu2k", "[::ffff:10.0.0.2]:7988")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`peer`") && e.contains("IPv4-mapped"), "{e}");
        let e = with("::", false, "fe80::2@lu2k", "[fe80::2]:7988")
            .unwrap_err()
            .to_string();
        assert!(e.contains("link-local") && e.contains("ULA"), "{e}");
        // An IPv6-only socket cannot carry an IPv4 link.
        let links = "bind = \"::\"\nbind_v6only = true\n[[peer]]\nnid = \"fd00::2@lu2k\"\n\
                     [[peer.link]]\nlocal = \"fd00::1\"\nremote = \"[fd00::2]:7988\"\n\
                     [[peer.link]]\nlocal = \"10.0.0.1\"\nremote = \"10.0.0.2:7988\"\n";
        let e = Config::from_toml(links, "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`peer.link.remote`") && e.contains("bind_v6only"),
            "{e}"
        );
        // A sealed wire needs the node's own address bound, not a wildcard.
        let sealed = "bind = \"::\"\nsecurity = \"required\"\n";
        let e = Config::from_toml(sealed, "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bind`") && e.contains("NID address"), "{e}");
        // A peer's key by its IPv6 NID.
        assert_eq!(nid_ip("fd00::3@lu2k"), Some("fd00::3".parse().unwrap()));
        assert_eq!(nid_ip("0@lo"), None);
    }

    #[test]
    fn send_worker_auto_wants_four_cpus_per_core() {
        use crate::io::uring::SendWorker;
        assert!(!SendWorker::Auto.enabled(1, 2));
        assert!(SendWorker::Auto.enabled(1, 4));
        assert!(!SendWorker::Auto.enabled(4, 15));
        assert!(SendWorker::Auto.enabled(4, 16));
        assert!(SendWorker::On.enabled(1, 1));
        assert!(!SendWorker::Off.enabled(1, 64));
        let c = Config::from_toml("send_worker = \"on\"\n", "t.toml").unwrap();
        assert_eq!(c.send_worker, SendWorker::On);
    }

    #[test]
    fn doorbell_auto_takes_the_futex_only_where_kernel_and_kshim_offer_it() {
        use crate::io::uring::DoorbellMode;
        assert_eq!(DoorbellMode::Auto.futex(true, true), Ok(true));
        assert_eq!(DoorbellMode::Auto.futex(false, true), Ok(false));
        assert_eq!(DoorbellMode::Auto.futex(true, false), Ok(false));
        assert_eq!(DoorbellMode::Eventfd.futex(true, true), Ok(false));
        let e = DoorbellMode::Futex.futex(false, true).unwrap_err();
        assert!(e.contains("IORING_OP_FUTEX_WAIT"), "{e}");
        let e = DoorbellMode::Futex.futex(true, false).unwrap_err();
        assert!(e.contains("FUTEX_WAKE"), "{e}");
        let c = Config::from_toml("doorbell = \"eventfd\"\n", "t.toml").unwrap();
        assert_eq!(c.doorbell, DoorbellMode::Eventfd);
    }

    #[test]
    fn metrics_listen_is_loopback_unless_allowed() {
        let c = Config::from_toml("metrics_listen = \"127.0.0.1:9788\"\n", "t.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9788".parse().unwrap()));
        assert_eq!(Config::default().metrics_listen, None, "off by default");
        let c = Config::from_toml("metrics_listen = \"0.0.0.0:9788\"\n", "t.toml").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("metrics_allow_remote = true"),
            "{e}"
        );
        let c = Config {
            metrics_allow_remote: true,
            ..c
        };
        c.validate().unwrap();
    }

    #[test]
    fn fec_is_set_per_peer_and_refused_where_it_cannot_run() {
        let peer = "[[peer]]\nnid = \"10.0.0.2@lu2k\"\naddr = \"10.0.0.2:7988\"\n";
        let c = Config::from_toml(&format!("{peer}fec = \"live\"\n"), "t.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.peers[0].fec, FecChoice::Live);
        let c = Config::from_toml(peer, "t.toml").unwrap();
        assert!(c.peers[0].fec.is_off(), "off unless set");
        let e = Config::from_toml(&format!("{peer}fec = \"always\"\n"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("fec"), "{e}");
        let rds = format!("backend = \"rds\"\n{peer}fec = \"live\"\n");
        let e = Config::from_toml(&rds, "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`peer.fec`") && e.contains("fix:"), "{e}");
    }

    #[test]
    fn a_peer_rate_cap_is_a_rate_on_one_udt_link() {
        let peer = "[[peer]]\nnid = \"10.0.0.2@lu2k\"\naddr = \"10.0.0.2:7988\"\n";
        let c = Config::from_toml(&format!("{peer}max_rate_mbps = 12.5\n"), "t.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.peers[0].max_rate_mbps, Some(12.5));
        let c = Config::from_toml(peer, "t.toml").unwrap();
        assert_eq!(c.peers[0].max_rate_mbps, None, "uncapped unless set");
        for bad in ["0", "-5", "nan", "1e9"] {
            let e = Config::from_toml(&format!("{peer}max_rate_mbps = {bad}\n"), "t.toml")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("`peer.max_rate_mbps`") && e.contains("fix:"),
                "{bad}: {e}"
            );
        }
        let rds = format!("backend = \"rds\"\n{peer}max_rate_mbps = 10\n");
        let e = Config::from_toml(&rds, "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("UDT back-end only"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Config::from_toml("corse = 2\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("corse"), "{e}");
    }

    #[test]
    fn invalid_values_name_field_and_fix() {
        let c = Config {
            cores: Some(0),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`cores`") && e.contains("fix:"), "{e}");
        let c = Config {
            peers: vec![PeerCfg {
                nid: "nonsense".into(),
                addr: "1.2.3.4:5".parse().unwrap(),
                links: Vec::new(),
                policy: None,
                fec: FecChoice::Off,
                max_rate_mbps: None,
            }],
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("peer.nid"), "{e}");
        let c = Config {
            peers: vec![PeerCfg {
                nid: "fd00::2@lu2k".into(),
                addr: "1.2.3.4:5".parse().unwrap(),
                links: Vec::new(),
                policy: None,
                fec: FecChoice::Off,
                max_rate_mbps: None,
            }],
            ..Config::default()
        };
        // An IPv6 NID is a peer like any other (reached at its addr here).
        c.validate().unwrap();
        let c = Config {
            peer_down_timeout_s: 1,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("peer_down_timeout_s"));
        let c = Config {
            drain_timeout_s: 7200,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("drain_timeout_s") && e.contains("fix:"), "{e}");
    }

    #[test]
    fn key_files_are_checked_and_errors_say_how_to_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("lu2k-cfg-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("psk");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |extra: &str| {
            Config::from_toml(&format!("psk_file = {:?}\n{extra}", key.display()), "t").unwrap()
        };
        // A key alone means required.
        assert_eq!(with("").keyring().unwrap().unwrap().net.len(), 1);
        assert!(Config::default().keyring().unwrap().is_none());
        let e = with("security = \"off\"")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`security`") && e.contains("fix:"), "{e}");
        let e = Config::from_toml("security = \"required\"", "t")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("psk_file") && e.contains("/dev/urandom"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = with("").validate().unwrap_err().to_string();
        assert!(e.contains("`psk_file`") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Only 32 raw bytes or 64 hex digits: a passphrase, a short key, a
        // raw key with a newline, 63 hex digits are refused.
        for bad in [
            &b"short"[..],
            &[7u8; 31],
            &[7u8; 33],
            &[7u8; 48],
            &[b'a'; 63],
        ] {
            std::fs::write(&key, bad).unwrap();
            let e = with("").validate().unwrap_err().to_string();
            assert!(e.contains("neither 32 raw bytes nor 64 hex"), "{e}");
        }
        let mut raw_nl = [7u8; 33];
        raw_nl[32] = b'\n';
        std::fs::write(&key, raw_nl).unwrap();
        assert!(with("").keyring().is_err(), "32 raw bytes and a newline");
        // The hex of a key is the same key as its bytes.
        let hex: String = (0..32).map(|i| format!("{:02x}", i * 7)).collect();
        std::fs::write(&key, format!("{hex}\n")).unwrap();
        let from_hex = with("").keyring().unwrap().unwrap();
        std::fs::write(&key, (0..32).map(|i| i * 7).collect::<Vec<u8>>()).unwrap();
        let from_raw = with("").keyring().unwrap().unwrap();
        let c = crate::transport::seal::Client::new(
            from_hex.net[0].clone(),
            crate::transport::seal::Ends {
                initiator: std::net::Ipv4Addr::new(10, 0, 0, 1).into(),
                responder: std::net::Ipv4Addr::new(10, 0, 0, 2).into(),
            },
        );
        let ends = crate::transport::seal::Ends {
            initiator: std::net::Ipv4Addr::new(10, 0, 0, 1).into(),
            responder: std::net::Ipv4Addr::new(10, 0, 0, 2).into(),
        };
        let mut d = [1u8; crate::transport::seal::HS_LEN].to_vec();
        d.extend_from_slice(&c.trailer(&[1u8; crate::transport::seal::HS_LEN]));
        assert!(crate::transport::seal::check_client_hs(&from_raw.net, ends, &d).is_some());
        // A symbolic link to a good key file is refused, and so is a FIFO
        // (without blocking on it).
        let link = dir.join("psk.link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let via_link =
            Config::from_toml(&format!("psk_file = {:?}\n", link.display()), "t").unwrap();
        let e = via_link.validate().unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let fifo = dir.join("psk.fifo");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
        let via_fifo =
            Config::from_toml(&format!("psk_file = {:?}\n", fifo.display()), "t").unwrap();
        let e = via_fifo.validate().unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Owned by another user (not root, not the engine's): refused. Needs
        // root to give the file away.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
            let e = with("").validate().unwrap_err().to_string();
            assert!(
                e.contains("owned by another user") && e.contains("chown"),
                "{e}"
            );
            std::os::unix::fs::chown(&key, Some(0), None).unwrap();
        } else {
            eprintln!("SKIP key file owner check: needs root to chown the file");
        }
        std::fs::remove_file(&key).unwrap();
        let e = with("").validate().unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
