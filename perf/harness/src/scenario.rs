//! Scenarios: what to run, as a TOML file states it.
//!
//! A scenario names the contenders, the workload and a base link (linkem's own
//! [`DuplexConfig`], embedded as `[link.forward]` / `[link.reverse]`), and
//! expands into *cells*: one link setting each, from a `[grid]` (the cartesian
//! product of `rtt_ms` × `loss` × `rate_mbps`) and from explicit `[[cell]]`
//! entries (a path with an outage, another rate ...). Every contender runs in
//! every cell, one after the other, on a fresh emulated link.
//!
//! ```toml
//! name = "geo"
//! contenders = ["lu2k", "udt4", "tcp-cubic", "tcp-bbr", "srt"]
//! seed = 7
//!
//! [workload]
//! kind = "bulk"            # bulk | rpc | live
//! bytes = 268_435_456      # bulk: bytes to move (1 MiB PUTs for lu2k)
//! max_duration_s = 60.0    # any run stops here; goodput counts what arrived
//!
//! [quick]                  # what --quick changes
//! bytes = 33_554_432
//! max_duration_s = 12.0
//! time_scale = 0.3         # outage times are multiplied by this
//!
//! [link.forward]           # linkem's Config; the cells override rate, delay, loss
//! queue_bytes = 7_500_000
//! overhead_bytes = 28
//! [link.reverse]
//! queue_bytes = 7_500_000
//! overhead_bytes = 28
//!
//! [grid]
//! rtt_ms = [600.0]
//! loss = [0.0, 0.001, 0.01, 0.05]
//! rate_mbps = [100.0]
//!
//! [[cell]]
//! name = "outage"
//! rtt_ms = 600.0
//! loss = 0.0
//! rate_mbps = 100.0
//! outage = { start_s = 10.0, duration_s = 10.0 }
//! ```
//!
//! [`Scenario::parse`] and [`Scenario::validate`] return a [`ScenarioError`]
//! that names the field (`grid.loss[2]`, `cell[1].outage.duration_s`,
//! `link.forward.jitter_ms` ...).

use std::fmt;
use std::path::Path;

use lu2k_linkem::{DuplexConfig, Loss, Outage};
use serde::{Deserialize, Serialize};

/// A transport the harness can put on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Contender {
    /// lu2k: kshim + engine pairs, UDT over UDP, 1 MiB LNet PUTs.
    #[serde(rename = "lu2k")]
    Lu2k,
    /// lu2k on the sealed wire: the same with a pre-shared key (every
    /// datagram AES-128-GCM), a fresh key per run.
    #[serde(rename = "lu2k-sealed")]
    Lu2kSealed,
    /// lu2k with forward error correction (`fec = "live"` on both engines'
    /// `[[peer]]`: Reed–Solomon repairs adapted to the measured loss).
    #[serde(rename = "lu2k-fec")]
    Lu2kFec,
    /// lu2k with each peer capped at its share of the link (`max_rate_mbps`
    /// = the link's rate ÷ the pairs that share it; the whole link in a
    /// one-pair cell), as an operator provisions a transponder's peers.
    #[serde(rename = "lu2k-share")]
    Lu2kShare,
    /// The reference UDT4 (4.11) through the `udt` crate.
    #[serde(rename = "udt4")]
    Udt4,
    /// Linux TCP with CUBIC (through the TUN path; root).
    #[serde(rename = "tcp-cubic")]
    TcpCubic,
    /// Linux TCP with BBR (through the TUN path; root).
    #[serde(rename = "tcp-bbr")]
    TcpBbr,
    /// SRT (Debian's srt-tools, `srt-file-transmit`: SRT file mode).
    #[serde(rename = "srt")]
    Srt,
    /// QUIC: quinn with its CUBIC, one stream (through the UDP relay).
    #[serde(rename = "quic-cubic")]
    QuicCubic,
    /// QUIC: quinn with its BBR, one stream (through the UDP relay).
    #[serde(rename = "quic-bbr")]
    QuicBbr,
}

impl Contender {
    /// The name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Lu2k => "lu2k",
            Contender::Lu2kSealed => "lu2k-sealed",
            Contender::Lu2kFec => "lu2k-fec",
            Contender::Lu2kShare => "lu2k-share",
            Contender::Udt4 => "udt4",
            Contender::TcpCubic => "tcp-cubic",
            Contender::TcpBbr => "tcp-bbr",
            Contender::Srt => "srt",
            Contender::QuicCubic => "quic-cubic",
            Contender::QuicBbr => "quic-bbr",
        }
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What each run moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// bulk, rpc or live.
    pub kind: WorkloadKind,
    /// bulk: bytes to move.
    #[serde(default = "default_bytes")]
    pub bytes: u64,
    /// Every run stops after this long (from the start of the transfer).
    #[serde(default = "default_max_duration")]
    pub max_duration_s: f64,
    /// rpc: request and response size, bytes.
    #[serde(default = "default_rpc_size")]
    pub size: u32,
    /// rpc: round trips.
    #[serde(default = "default_rpc_count")]
    pub count: u32,
    /// live: stream rate, Mbit/s.
    #[serde(default = "default_live_rate")]
    pub stream_mbps: f64,
    /// live: bytes per chunk (one LNet PUT for lu2k).
    #[serde(default = "default_chunk")]
    pub chunk_bytes: u32,
    /// live: how long the stream runs, seconds.
    #[serde(default = "default_live_duration")]
    pub duration_s: f64,
    /// bulk, lu2k: 1 MiB PUTs in flight at most, as a Lustre client's
    /// `max_rpcs_in_flight` bounds its bulk RPCs; unset, as many as the TX pool
    /// holds (256: enough for a satellite path's bandwidth-delay product).
    #[serde(default)]
    pub in_flight: Option<u32>,
    /// live: bytes of the warm-up message every contender sends and waits
    /// for before the stream (default: one chunk). 64 reproduces the small
    /// first message behind which lu2k's stream used to fall behind.
    #[serde(default)]
    pub warmup_bytes: Option<u32>,
}

impl Workload {
    /// live: the warm-up message's size.
    pub fn warmup_len(&self) -> usize {
        self.warmup_bytes.unwrap_or(self.chunk_bytes) as usize
    }
}

fn default_bytes() -> u64 {
    256 << 20
}
fn default_max_duration() -> f64 {
    60.0
}
fn default_rpc_size() -> u32 {
    72
}
fn default_rpc_count() -> u32 {
    50
}
fn default_live_rate() -> f64 {
    20.0
}
fn default_chunk() -> u32 {
    64 << 10
}
fn default_live_duration() -> f64 {
    20.0
}

/// Workload kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Move `bytes` as fast as possible.
    Bulk,
    /// Request/response round trips of `size` bytes.
    Rpc,
    /// A constant-rate stream; delivery latency per chunk.
    Live,
}

/// What `--quick` changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quick {
    /// bulk bytes under --quick.
    pub bytes: Option<u64>,
    /// Run cap under --quick.
    pub max_duration_s: Option<f64>,
    /// rpc round trips under --quick.
    pub count: Option<u32>,
    /// live stream duration under --quick.
    pub duration_s: Option<f64>,
    /// Outage start and length are multiplied by this under --quick.
    pub time_scale: f64,
}

impl Default for Quick {
    fn default() -> Self {
        Quick {
            bytes: None,
            max_duration_s: None,
            count: None,
            duration_s: None,
            time_scale: 1.0,
        }
    }
}

/// A cartesian grid of cells.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grid {
    /// Round-trip propagation delays, ms (half each way).
    pub rtt_ms: Vec<f64>,
    /// Random (Bernoulli) loss per direction.
    pub loss: Vec<f64>,
    /// Bottleneck rate (forward), Mbit/s.
    pub rate_mbps: Vec<f64>,
}

/// An outage in a cell: the link drops everything in `[start_s, start_s + duration_s)`,
/// counted from the start of the run's link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellOutage {
    /// Seconds after the link starts.
    pub start_s: f64,
    /// Seconds it lasts.
    pub duration_s: f64,
}

/// One explicit cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSpec {
    /// Label in tables.
    pub name: Option<String>,
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Random loss per direction.
    #[serde(default)]
    pub loss: f64,
    /// Forward bottleneck rate, Mbit/s.
    pub rate_mbps: f64,
    /// Bottleneck buffer override, bytes (both directions).
    pub queue_bytes: Option<u64>,
    /// An outage during the run.
    pub outage: Option<CellOutage>,
    /// Only these contenders (default: the scenario's).
    pub contenders: Option<Vec<Contender>>,
    /// Bulk bytes override for this cell.
    pub bytes: Option<u64>,
    /// Bursty loss: the mean length of a run of consecutive losses (≥ 1).
    /// With it, `loss` (and `reverse_loss`) is the long-run rate of linkem's
    /// Gilbert–Elliott model instead of independent (Bernoulli) losses.
    #[serde(default)]
    pub burst: Option<f64>,
    /// The reverse (return) direction's rate, Mbit/s; default the base
    /// link's `[link.reverse] rate_mbps`, else `rate_mbps`.
    #[serde(default)]
    pub reverse_rate_mbps: Option<f64>,
    /// The reverse direction's loss; default `loss`.
    #[serde(default)]
    pub reverse_loss: Option<f64>,
    /// Delay variation each way, ms: each datagram's one-way delay is drawn
    /// from `rtt_ms / 2 ± jitter_ms`; at most `rtt_ms / 2`.
    #[serde(default)]
    pub jitter_ms: Option<f64>,
    /// Whether jitter may reorder datagrams (default: the base link's, false).
    #[serde(default)]
    pub reorder: Option<bool>,
    /// Several links between the two nodes (`[[cell.link]]`, 2 to 8): each an
    /// emulated link of its own (a relay each) with the cell's settings unless
    /// it names its own; lu2k only, each engine's `[[peer]]` given every link.
    #[serde(default, rename = "link")]
    pub links: Vec<CellLinkSpec>,
    /// How lu2k spreads messages over `links`: `failover` or `balance`
    /// (required with links).
    #[serde(default)]
    pub policy: Option<LinkPolicy>,
    /// The nodes' addresses, the relay's sockets and the engines' `bind` and
    /// `[[peer]]` in IPv6 (ULA addresses on the loopback device of a network
    /// namespace; root); lu2k only.
    #[serde(default)]
    pub ipv6: bool,
}

/// How lu2k's engines use a cell's links (the engine's `policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkPolicy {
    /// Every message on the first link that is up.
    Failover,
    /// Messages spread by weight and measured rate.
    Balance,
}

impl LinkPolicy {
    /// The configuration's word for it.
    pub fn name(self) -> &'static str {
        match self {
            LinkPolicy::Failover => "failover",
            LinkPolicy::Balance => "balance",
        }
    }
}

/// One of a cell's links (`[[cell.link]]`); what it leaves out is the cell's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellLinkSpec {
    /// Forward bottleneck rate, Mbit/s (default the cell's `rate_mbps`).
    pub rate_mbps: Option<f64>,
    /// Round-trip propagation delay, ms (default the cell's).
    pub rtt_ms: Option<f64>,
    /// Random loss per direction (default the cell's).
    pub loss: Option<f64>,
    /// Share of this link in `balance` (1 to 1000, default 1).
    pub weight: Option<u32>,
    /// An outage of this link alone.
    pub outage: Option<CellOutage>,
}

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, copied into every result row.
    pub name: String,
    /// Contenders, in this order.
    pub contenders: Vec<Contender>,
    /// Seed of the link model.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The workload.
    pub workload: Workload,
    /// --quick settings.
    #[serde(default)]
    pub quick: Quick,
    /// Base link (linkem's settings); cells override rate, delay, loss, outages.
    #[serde(default)]
    pub link: DuplexConfig,
    /// Grid of cells.
    #[serde(default)]
    pub grid: Grid,
    /// Explicit cells.
    #[serde(default, rename = "cell")]
    pub cells: Vec<CellSpec>,
}

fn default_seed() -> u64 {
    1
}

/// A scenario that cannot be used: the field (a path like `grid.loss[2]`) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        reason: String,
    },
    /// TOML syntax, an unknown field or a wrong type (the message names it).
    #[error("scenario {path}: {reason}")]
    Parse {
        /// File.
        path: String,
        /// Parser message.
        reason: String,
    },
    /// A value out of range.
    #[error("scenario field `{field}`: {problem}")]
    Invalid {
        /// Field path.
        field: String,
        /// What is wrong and what is accepted.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One cell: a link setting, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Label.
    pub name: String,
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Random loss per direction.
    pub loss: f64,
    /// Forward bottleneck rate, Mbit/s.
    pub rate_mbps: f64,
    /// The outage, already scaled for --quick.
    pub outage: Option<CellOutage>,
    /// Contenders of this cell.
    pub contenders: Vec<Contender>,
    /// The complete link for linkem.
    pub link: DuplexConfig,
    /// The workload of this cell (with --quick and the cell's overrides applied).
    pub workload: Workload,
    /// The cell's links when it has several (empty: one link, `link`).
    pub links: Vec<CellLink>,
    /// How lu2k uses `links`.
    pub policy: Option<LinkPolicy>,
    /// IPv6 addresses for the nodes, the relay and the engines.
    pub ipv6: bool,
}

/// One of a multi-link cell's links, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct CellLink {
    /// Forward bottleneck rate, Mbit/s.
    pub rate_mbps: f64,
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Random loss per direction.
    pub loss: f64,
    /// Share in `balance`.
    pub weight: u32,
    /// This link's outage, already scaled for --quick.
    pub outage: Option<CellOutage>,
    /// The complete link for linkem.
    pub link: DuplexConfig,
}

impl CellLink {
    /// What it carries of payload at most, Mbit/s: rate × (1 − loss).
    pub fn capacity_mbps(&self) -> f64 {
        self.rate_mbps * (1.0 - self.loss)
    }
}

impl Cell {
    /// What the cell's links can carry together, Mbit/s: the sum of each
    /// link's rate × (1 − loss) (one link: the cell's). Goodput cannot exceed
    /// it, whatever the policy; utilization is measured against it.
    pub fn capacity_mbps(&self) -> f64 {
        if self.links.is_empty() {
            self.rate_mbps * (1.0 - self.loss)
        } else {
            self.links.iter().map(CellLink::capacity_mbps).sum()
        }
    }

    /// The link a failover cell's traffic must survive on: the first link
    /// without an outage, and the outage (of the first link that has one) it
    /// covers for; None unless the cell is failover with an outage.
    pub fn failover_outage(&self) -> Option<(usize, usize, CellOutage)> {
        if self.policy != Some(LinkPolicy::Failover) {
            return None;
        }
        let (down, out) = self
            .links
            .iter()
            .enumerate()
            .find_map(|(i, l)| l.outage.map(|o| (i, o)))?;
        let up = self.links.iter().position(|l| l.outage.is_none())?;
        Some((down, up, out))
    }
}

impl Scenario {
    /// Parses TOML text; `path` only appears in messages. Validates too.
    pub fn parse(text: &str, path: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.into(),
            reason: e.to_string().trim().to_string(),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        self.check_contenders()?;
        check_workload(&self.workload, "workload")?;
        check_quick(&self.quick)?;
        self.link
            .validate()
            .map_err(|e| invalid(format!("link.{}", e.field), e.problem))?;
        self.check_grid()?;
        for (i, c) in self.cells.iter().enumerate() {
            self.check_cell(i, c)?;
        }
        if self.cells.is_empty() && self.grid.loss.is_empty() {
            return Err(invalid(
                "grid",
                "no cells: give a [grid] or [[cell]] entries",
            ));
        }
        Ok(())
    }

    fn check_contenders(&self) -> Result<(), ScenarioError> {
        if self.contenders.is_empty() {
            return Err(invalid(
                "contenders",
                "name at least one of lu2k, udt4, tcp-cubic, tcp-bbr, srt, quic-cubic, quic-bbr",
            ));
        }
        for (i, c) in self.contenders.iter().enumerate() {
            if self.contenders[..i].contains(c) {
                return Err(invalid(format!("contenders[{i}]"), format!("{c} twice")));
            }
        }
        Ok(())
    }

    fn check_grid(&self) -> Result<(), ScenarioError> {
        let g = &self.grid;
        let grid_given = [g.rtt_ms.len(), g.loss.len(), g.rate_mbps.len()];
        if grid_given.iter().any(|&n| n > 0) && grid_given.contains(&0) {
            return Err(invalid(
                "grid",
                "give all of rtt_ms, loss and rate_mbps (arrays), or none",
            ));
        }
        for (i, v) in g.rtt_ms.iter().enumerate() {
            check_rtt(&format!("grid.rtt_ms[{i}]"), *v)?;
        }
        for (i, v) in g.loss.iter().enumerate() {
            check_loss(&format!("grid.loss[{i}]"), *v)?;
        }
        for (i, v) in g.rate_mbps.iter().enumerate() {
            check_rate(&format!("grid.rate_mbps[{i}]"), *v)?;
        }
        Ok(())
    }

    /// Checks `cell[i]`.
    fn check_cell(&self, i: usize, c: &CellSpec) -> Result<(), ScenarioError> {
        let f = |name: &str| format!("cell[{i}].{name}");
        check_rtt(&f("rtt_ms"), c.rtt_ms)?;
        check_loss(&f("loss"), c.loss)?;
        check_rate(&f("rate_mbps"), c.rate_mbps)?;
        if c.queue_bytes == Some(0) {
            return Err(invalid(f("queue_bytes"), "must be at least 1 byte"));
        }
        if c.bytes == Some(0) {
            return Err(invalid(f("bytes"), "must be at least 1"));
        }
        if let Some(o) = c.outage {
            if !(o.start_s.is_finite() && o.start_s >= 0.0 && o.start_s < 3600.0) {
                return Err(invalid(
                    f("outage.start_s"),
                    format!("must be seconds in [0, 3600), got {}", o.start_s),
                ));
            }
            check_pos(&f("outage.duration_s"), o.duration_s, 3600.0)?;
        }
        if let Some(b) = c.burst {
            if !(b.is_finite() && (1.0..=10_000.0).contains(&b)) {
                return Err(invalid(
                    f("burst"),
                    format!("must be a mean burst length in [1, 10000] packets, got {b}"),
                ));
            }
        }
        if let Some(r) = c.reverse_rate_mbps {
            check_rate(&f("reverse_rate_mbps"), r)?;
        }
        if let Some(l) = c.reverse_loss {
            check_loss(&f("reverse_loss"), l)?;
        }
        if let Some(j) = c.jitter_ms {
            if !(j.is_finite() && j >= 0.0 && j <= c.rtt_ms / 2.0) {
                return Err(invalid(
                    f("jitter_ms"),
                    format!(
                        "must be ms in [0, rtt_ms / 2 = {}] (the one-way delay), got {j}",
                        c.rtt_ms / 2.0
                    ),
                ));
            }
        }
        self.check_links(i, c)?;
        // What only the whole link can judge (a burst too long for its
        // loss rate ...), named under the cell.
        let cell = self.resolve(c.clone(), false);
        let mut links = vec![("link".to_string(), &cell.link)];
        for (j, l) in cell.links.iter().enumerate() {
            links.push((format!("link[{j}]"), &l.link));
        }
        for (at, link) in links {
            for (dir, cfg) in [("forward", &link.forward), ("reverse", &link.reverse)] {
                cfg.validate().map_err(|e| {
                    invalid(
                        f(&format!("{at}.{dir}.{}", e.field)),
                        format!("{} (from the cell's loss, burst, rates, jitter)", e.problem),
                    )
                })?;
            }
        }
        if let Some(cs) = &c.contenders {
            for (j, x) in cs.iter().enumerate() {
                if !self.contenders.contains(x) {
                    return Err(invalid(
                        format!("cell[{i}].contenders[{j}]"),
                        format!("{x} is not among the scenario's contenders"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks `cell[i]`'s links, policy and address family: several links
    /// and IPv6 are lu2k's (the others have one path, over IPv4 here).
    fn check_links(&self, i: usize, c: &CellSpec) -> Result<(), ScenarioError> {
        let f = |name: &str| format!("cell[{i}].{name}");
        let contenders = c.contenders.as_ref().unwrap_or(&self.contenders);
        let only_lu2k = |what: &str| -> Result<(), ScenarioError> {
            match contenders.iter().find(|&&x| x != Contender::Lu2k) {
                Some(x) => Err(invalid(
                    f("contenders"),
                    format!(
                        "{x} in a cell with {what}: only lu2k runs there (give the cell \
                         contenders = [\"lu2k\"])"
                    ),
                )),
                None => Ok(()),
            }
        };
        if c.ipv6 {
            only_lu2k("ipv6 = true")?;
        }
        if c.links.is_empty() {
            if let Some(p) = c.policy {
                return Err(invalid(
                    f("policy"),
                    format!(
                        "{} without [[cell.link]] entries: give two or more, or remove policy",
                        p.name()
                    ),
                ));
            }
            return Ok(());
        }
        if !(2..=8).contains(&c.links.len()) {
            return Err(invalid(
                f("link"),
                format!("{} links: give 2 to 8 [[cell.link]] entries", c.links.len()),
            ));
        }
        if c.policy.is_none() {
            return Err(invalid(
                f("policy"),
                "missing: a cell with links says policy = \"failover\" or \"balance\"",
            ));
        }
        if c.outage.is_some() {
            return Err(invalid(
                f("outage"),
                "an outage of the whole cell in a cell with links: give it to one link \
                 ([[cell.link]] outage = { start_s, duration_s })",
            ));
        }
        if c.ipv6 {
            return Err(invalid(
                f("ipv6"),
                "with [[cell.link]] entries: the multi-link cells run over IPv4 loopback \
                 addresses; give IPv6 its own single-link cell",
            ));
        }
        only_lu2k("several links (TCP, UDT4, SRT and QUIC have one path)")?;
        for (j, l) in c.links.iter().enumerate() {
            let g = |name: &str| format!("cell[{i}].link[{j}].{name}");
            if let Some(r) = l.rate_mbps {
                check_rate(&g("rate_mbps"), r)?;
            }
            if let Some(r) = l.rtt_ms {
                check_rtt(&g("rtt_ms"), r)?;
            }
            if let Some(x) = l.loss {
                check_loss(&g("loss"), x)?;
            }
            if let Some(w) = l.weight {
                if !(1..=1000).contains(&w) {
                    return Err(invalid(
                        g("weight"),
                        format!("must be between 1 and 1000 (the link's share), got {w}"),
                    ));
                }
            }
            if let Some(o) = l.outage {
                if !(o.start_s.is_finite() && o.start_s >= 0.0 && o.start_s < 3600.0) {
                    return Err(invalid(
                        g("outage.start_s"),
                        format!("must be seconds in [0, 3600), got {}", o.start_s),
                    ));
                }
                check_pos(&g("outage.duration_s"), o.duration_s, 3600.0)?;
            }
        }
        if c.links.iter().all(|l| l.outage.is_some()) {
            return Err(invalid(
                f("link"),
                "every link has an outage: leave one without, the link traffic survives on",
            ));
        }
        Ok(())
    }

    /// The cells, grid first, with --quick applied when `quick`.
    pub fn cells(&self, quick: bool) -> Vec<Cell> {
        let mut specs = Vec::new();
        for &rate in &self.grid.rate_mbps {
            for &rtt in &self.grid.rtt_ms {
                for &loss in &self.grid.loss {
                    specs.push(CellSpec {
                        name: None,
                        rtt_ms: rtt,
                        loss,
                        rate_mbps: rate,
                        queue_bytes: None,
                        outage: None,
                        contenders: None,
                        bytes: None,
                        burst: None,
                        reverse_rate_mbps: None,
                        reverse_loss: None,
                        jitter_ms: None,
                        reorder: None,
                        links: Vec::new(),
                        policy: None,
                        ipv6: false,
                    });
                }
            }
        }
        specs.extend(self.cells.iter().cloned());
        specs.into_iter().map(|c| self.resolve(c, quick)).collect()
    }

    fn resolve(&self, c: CellSpec, quick: bool) -> Cell {
        let mut w = self.workload.clone();
        if let Some(b) = c.bytes {
            w.bytes = b;
        }
        let mut outage = c.outage;
        if quick {
            let q = &self.quick;
            if let Some(b) = q.bytes {
                // A cell that asked for more than the default keeps its ratio.
                let ratio = c
                    .bytes
                    .map_or(1.0, |cb| cb as f64 / self.workload.bytes as f64);
                w.bytes = ((b as f64 * ratio) as u64).max(1);
            }
            if let Some(d) = q.max_duration_s {
                w.max_duration_s = d;
            }
            if let Some(n) = q.count {
                w.count = n;
            }
            if let Some(d) = q.duration_s {
                w.duration_s = d;
            }
            if let Some(o) = &mut outage {
                o.start_s *= q.time_scale;
                o.duration_s *= q.time_scale;
            }
        }
        let link = self.duplex(&c, c.rtt_ms, c.loss, c.rate_mbps, outage);
        let scale = if quick { self.quick.time_scale } else { 1.0 };
        let links = c
            .links
            .iter()
            .map(|l| {
                let outage = l.outage.map(|o| CellOutage {
                    start_s: o.start_s * scale,
                    duration_s: o.duration_s * scale,
                });
                let (rtt_ms, loss) = (l.rtt_ms.unwrap_or(c.rtt_ms), l.loss.unwrap_or(c.loss));
                let rate_mbps = l.rate_mbps.unwrap_or(c.rate_mbps);
                CellLink {
                    rate_mbps,
                    rtt_ms,
                    loss,
                    weight: l.weight.unwrap_or(1),
                    outage,
                    link: self.duplex(&c, rtt_ms, loss, rate_mbps, outage),
                }
            })
            .collect();
        let name = c.name.clone().unwrap_or_else(|| {
            let mut n = format!(
                "{}ms/{}%/{}M",
                c.rtt_ms,
                (c.loss * 1000.0).round() / 10.0,
                c.rate_mbps
            );
            if let Some(b) = c.burst {
                n += &format!("/burst{b}");
            }
            if let Some(r) = c.reverse_rate_mbps {
                n += &format!("/rev{r}M");
            }
            if let Some(l) = c.reverse_loss {
                n += &format!("/rev{}%", (l * 1000.0).round() / 10.0);
            }
            if let Some(j) = c.jitter_ms {
                n += &format!("/jitter{j}ms");
            }
            if c.reorder == Some(true) {
                n += "/reorder";
            }
            if let Some(p) = c.policy {
                n += &format!("/{}links-{}", c.links.len(), p.name());
            }
            if c.ipv6 {
                n += "/ipv6";
            }
            n
        });
        Cell {
            name,
            rtt_ms: c.rtt_ms,
            loss: c.loss,
            rate_mbps: c.rate_mbps,
            outage,
            contenders: c.contenders.unwrap_or_else(|| self.contenders.clone()),
            link,
            workload: w,
            links,
            policy: c.policy,
            ipv6: c.ipv6,
        }
    }

    /// linkem's settings for one link of cell `c`: the base link with this
    /// delay, loss, forward rate and outage, and the cell's other settings.
    fn duplex(
        &self,
        c: &CellSpec,
        rtt_ms: f64,
        loss: f64,
        rate_mbps: f64,
        outage: Option<CellOutage>,
    ) -> DuplexConfig {
        let mut link = self.link.clone();
        for (dir, cfg) in [("f", &mut link.forward), ("r", &mut link.reverse)] {
            cfg.delay_ms = rtt_ms / 2.0;
            if let Some(j) = c.jitter_ms {
                cfg.jitter_ms = j;
            }
            if cfg.jitter_ms > cfg.delay_ms {
                cfg.jitter_ms = cfg.delay_ms;
            }
            if let Some(r) = c.reorder {
                cfg.reorder = r;
            }
            let loss = match dir {
                "r" => c.reverse_loss.unwrap_or(loss),
                _ => loss,
            };
            cfg.loss = match (loss > 0.0, c.burst) {
                (false, _) => Loss::None,
                (true, None) => Loss::Bernoulli { rate: loss },
                (true, Some(burst)) => Loss::GilbertElliott { rate: loss, burst },
            };
            if dir == "f" {
                cfg.rate_mbps = Some(rate_mbps);
            } else if let Some(r) = c.reverse_rate_mbps {
                cfg.rate_mbps = Some(r);
            } else if cfg.rate_mbps.is_none() {
                cfg.rate_mbps = Some(rate_mbps);
            }
            if let Some(q) = c.queue_bytes {
                cfg.queue_bytes = Some(q);
            }
            if let Some(o) = outage {
                cfg.outages = vec![Outage {
                    start_s: o.start_s,
                    end_s: o.start_s + o.duration_s,
                }];
            }
        }
        link
    }
}

fn check_quick(q: &Quick) -> Result<(), ScenarioError> {
    if !(q.time_scale.is_finite() && q.time_scale > 0.0 && q.time_scale <= 1.0) {
        return Err(invalid(
            "quick.time_scale",
            format!("must be in (0, 1], got {}", q.time_scale),
        ));
    }
    if q.bytes == Some(0) {
        return Err(invalid("quick.bytes", "must be at least 1"));
    }
    if let Some(d) = q.max_duration_s {
        check_pos("quick.max_duration_s", d, 3600.0)?;
    }
    if let Some(d) = q.duration_s {
        check_pos("quick.duration_s", d, 3600.0)?;
    }
    Ok(())
}

fn check_pos(field: &str, v: f64, max: f64) -> Result<(), ScenarioError> {
    if v.is_finite() && v > 0.0 && v <= max {
        Ok(())
    } else {
        Err(invalid(field, format!("must be in (0, {max}], got {v}")))
    }
}

fn check_rtt(field: &str, v: f64) -> Result<(), ScenarioError> {
    if v.is_finite() && (0.0..=10_000.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(field, format!("must be ms in [0, 10000], got {v}")))
    }
}

fn check_loss(field: &str, v: f64) -> Result<(), ScenarioError> {
    if v.is_finite() && (0.0..0.5).contains(&v) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a loss fraction in [0, 0.5) (0.01 = 1 %), got {v}"),
        ))
    }
}

fn check_rate(field: &str, v: f64) -> Result<(), ScenarioError> {
    if v.is_finite() && (0.1..=10_000.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be Mbit/s in [0.1, 10000], got {v}"),
        ))
    }
}

fn check_workload(w: &Workload, at: &str) -> Result<(), ScenarioError> {
    let f = |n: &str| format!("{at}.{n}");
    if w.bytes == 0 {
        return Err(invalid(f("bytes"), "must be at least 1"));
    }
    check_pos(&f("max_duration_s"), w.max_duration_s, 3600.0)?;
    if w.size == 0 || w.size as usize > lu2k_kshim::MAX_PAYLOAD {
        return Err(invalid(
            f("size"),
            format!("must be 1..=1048576 bytes, got {}", w.size),
        ));
    }
    if w.count == 0 {
        return Err(invalid(f("count"), "must be at least 1"));
    }
    check_pos(&f("stream_mbps"), w.stream_mbps, 10_000.0)?;
    if w.chunk_bytes < 16 || w.chunk_bytes as usize > lu2k_kshim::MAX_PAYLOAD {
        return Err(invalid(
            f("chunk_bytes"),
            format!("must be 16..=1048576 bytes, got {}", w.chunk_bytes),
        ));
    }
    if let Some(b) = w.warmup_bytes {
        if b < 16 || b as usize > lu2k_kshim::MAX_PAYLOAD {
            return Err(invalid(
                f("warmup_bytes"),
                format!("must be 16..=1048576 bytes, got {b}"),
            ));
        }
    }
    check_pos(&f("duration_s"), w.duration_s, 3600.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
contenders = ["lu2k", "udt4"]
[workload]
kind = "bulk"
bytes = 1000
[quick]
bytes = 100
time_scale = 0.5
[link.forward]
queue_bytes = 100000
overhead_bytes = 28
[grid]
rtt_ms = [600.0]
loss = [0.0, 0.01]
rate_mbps = [100.0]
[[cell]]
name = "outage"
rtt_ms = 200.0
rate_mbps = 50.0
outage = { start_s = 10.0, duration_s = 4.0 }
bytes = 2000
"#;

    fn err_field(text: &str) -> String {
        match Scenario::parse(text, "t.toml").unwrap_err() {
            ScenarioError::Invalid { field, .. } => field,
            other => other.to_string(),
        }
    }

    #[test]
    fn parses_and_expands_cells() {
        let s = Scenario::parse(BASE, "t.toml").unwrap();
        let cells = s.cells(false);
        assert_eq!(cells.len(), 3);
        assert_eq!(cells[1].loss, 0.01);
        assert_eq!(cells[1].link.forward.loss, Loss::Bernoulli { rate: 0.01 });
        assert_eq!(cells[1].link.reverse.loss, Loss::Bernoulli { rate: 0.01 });
        assert_eq!(cells[0].link.forward.delay_ms, 300.0);
        assert_eq!(cells[0].link.forward.queue_bytes, Some(100000));
        assert_eq!(cells[0].link.forward.overhead_bytes, 28);
        assert_eq!(cells[2].name, "outage");
        assert_eq!(cells[2].workload.bytes, 2000);
        assert_eq!(cells[2].link.forward.outages[0].end_s, 14.0);
        assert_eq!(cells[2].contenders, vec![Contender::Lu2k, Contender::Udt4]);
        for c in &cells {
            c.link.validate().unwrap();
        }
    }

    #[test]
    fn cells_say_burst_loss_per_direction_jitter_and_reordering() {
        let text = format!(
            "{BASE}\n[[cell]]\nrtt_ms = 600.0\nloss = 0.01\nburst = 8.0\nrate_mbps = 100.0\n\
             reverse_rate_mbps = 2.0\nreverse_loss = 0.001\njitter_ms = 5.0\nreorder = true\n"
        );
        let s = Scenario::parse(&text, "t.toml").unwrap();
        let c = s.cells(false).pop().unwrap();
        assert_eq!(
            c.link.forward.loss,
            Loss::GilbertElliott {
                rate: 0.01,
                burst: 8.0
            }
        );
        assert_eq!(
            c.link.reverse.loss,
            Loss::GilbertElliott {
                rate: 0.001,
                burst: 8.0
            }
        );
        assert_eq!(c.link.forward.rate_mbps, Some(100.0));
        assert_eq!(c.link.reverse.rate_mbps, Some(2.0));
        assert_eq!(
            (c.link.forward.jitter_ms, c.link.reverse.jitter_ms),
            (5.0, 5.0)
        );
        assert!(c.link.forward.reorder && c.link.reverse.reorder);
        assert_eq!(
            c.name,
            "600ms/1%/100M/burst8/rev2M/rev0.1%/jitter5ms/reorder"
        );
        c.link.validate().unwrap();
        // Without them a cell stays Bernoulli, symmetric, without jitter.
        let plain = &s.cells(false)[1];
        assert_eq!(plain.link.reverse.loss, Loss::Bernoulli { rate: 0.01 });
        assert_eq!(plain.link.forward.jitter_ms, 0.0);
        assert!(!plain.link.forward.reorder);
        // Errors name the cell's field.
        let bad = |extra: &str| {
            err_field(&format!(
                "{BASE}\n[[cell]]\nrtt_ms = 600.0\nloss = 0.01\nrate_mbps = 100.0\n{extra}\n"
            ))
        };
        assert_eq!(bad("burst = 0.5"), "cell[1].burst");
        assert_eq!(bad("jitter_ms = 400.0"), "cell[1].jitter_ms");
        assert_eq!(bad("reverse_loss = 0.9"), "cell[1].reverse_loss");
        assert_eq!(bad("reverse_rate_mbps = 0.0"), "cell[1].reverse_rate_mbps");
    }

    #[test]
    fn quick_shortens_runs_and_outages() {
        let s = Scenario::parse(BASE, "t.toml").unwrap();
        let cells = s.cells(true);
        assert_eq!(cells[0].workload.bytes, 100);
        assert_eq!(cells[2].workload.bytes, 200, "the cell's ratio is kept");
        let o = cells[2].outage.unwrap();
        assert_eq!((o.start_s, o.duration_s), (5.0, 2.0));
        assert_eq!(cells[2].link.reverse.outages[0].start_s, 5.0);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err_field(&BASE.replace("0.01]", "0.7]")), "grid.loss[1]");
        assert_eq!(
            err_field(&BASE.replace("duration_s = 4.0", "duration_s = -1.0")),
            "cell[0].outage.duration_s"
        );
        assert_eq!(
            err_field(&BASE.replace("overhead_bytes = 28", "jitter_ms = 5.0")),
            "link.forward.jitter_ms"
        );
        assert_eq!(
            err_field(&BASE.replace("time_scale = 0.5", "time_scale = 2.0")),
            "quick.time_scale"
        );
        assert_eq!(
            err_field(&BASE.replace(r#"["lu2k", "udt4"]"#, r#"["lu2k", "lu2k"]"#)),
            "contenders[1]"
        );
        assert_eq!(err_field(&BASE.replace("rate_mbps = [100.0]", "")), "grid");
        assert_eq!(
            err_field(&BASE.replace("bytes = 2000", "contenders = [\"srt\"]")),
            "cell[0].contenders[0]"
        );
        // Unknown names are the parser's business: it names them.
        let e = Scenario::parse(&BASE.replace("\"udt4\"]", "\"quic\"]"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("quic"), "{e}");
        let e = Scenario::parse(
            &BASE.replace("kind = \"bulk\"", "kind = \"bulk\"\nbyts = 3"),
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("byts"), "{e}");
    }

    const LINKS: &str = r#"
name = "l"
contenders = ["lu2k"]
[workload]
kind = "bulk"
bytes = 1000
[quick]
time_scale = 0.5
[link.forward]
queue_bytes = 1000
[[cell]]
rtt_ms = 600.0
loss = 0.01
rate_mbps = 100.0
policy = "failover"
[[cell.link]]
outage = { start_s = 10.0, duration_s = 4.0 }
[[cell.link]]
rate_mbps = 50.0
weight = 3
loss = 0.0
"#;

    #[test]
    fn links_take_the_cells_settings_and_their_own() {
        let s = Scenario::parse(LINKS, "t.toml").unwrap();
        let cells = s.cells(true);
        let c = &cells[0];
        assert_eq!(c.name, "600ms/1%/100M/2links-failover");
        assert_eq!(c.policy, Some(LinkPolicy::Failover));
        assert_eq!(c.links.len(), 2);
        let (l0, l1) = (&c.links[0], &c.links[1]);
        assert_eq!((l0.rate_mbps, l0.weight, l0.loss), (100.0, 1, 0.01));
        assert_eq!((l1.rate_mbps, l1.weight, l1.loss), (50.0, 3, 0.0));
        // --quick scales each link's outage, which only that link has.
        assert_eq!(
            l0.outage,
            Some(CellOutage {
                start_s: 5.0,
                duration_s: 2.0
            })
        );
        assert_eq!(l0.link.forward.outages.len(), 1);
        assert!(l1.link.forward.outages.is_empty() && l1.outage.is_none());
        assert_eq!(l1.link.forward.rate_mbps, Some(50.0));
        assert_eq!(l0.link.forward.delay_ms, 300.0);
        assert_eq!(l1.link.forward.queue_bytes, Some(1000));
        // What they can carry together, and what failover survives on.
        assert!((c.capacity_mbps() - (99.0 + 50.0)).abs() < 1e-9);
        let (down, up, out) = c.failover_outage().unwrap();
        assert_eq!((down, up, out.start_s), (0, 1, 5.0));
        // A single-link cell carries its own link's capacity.
        let one = Scenario::parse(BASE, "t.toml").unwrap().cells(false);
        assert!(one[0].links.is_empty() && !one[0].ipv6);
        assert!((one[0].capacity_mbps() - one[0].rate_mbps * (1.0 - one[0].loss)).abs() < 1e-9);
        // The IPv6 flag names the cell.
        let v6 = Scenario::parse(
            &LINKS
                .replace("policy = \"failover\"", "ipv6 = true")
                .replace("[[cell.link]]\noutage = { start_s = 10.0, duration_s = 4.0 }\n[[cell.link]]\nrate_mbps = 50.0\nweight = 3\nloss = 0.0\n", ""),
            "t.toml",
        )
        .unwrap();
        let v6 = v6.cells(false);
        assert!(v6[0].ipv6 && v6[0].links.is_empty());
        assert_eq!(v6[0].name, "600ms/1%/100M/ipv6");
    }

    #[test]
    fn link_errors_name_the_field() {
        assert_eq!(
            err_field(&LINKS.replace("weight = 3", "weight = 0")),
            "cell[0].link[1].weight"
        );
        assert_eq!(
            err_field(&LINKS.replace("rate_mbps = 50.0", "rate_mbps = -5.0")),
            "cell[0].link[1].rate_mbps"
        );
        assert_eq!(
            err_field(&LINKS.replace("duration_s = 4.0", "duration_s = 0.0")),
            "cell[0].link[0].outage.duration_s"
        );
        assert_eq!(
            err_field(&LINKS.replace("policy = \"failover\"\n", "")),
            "cell[0].policy"
        );
        // One path for the others: a cell with links is lu2k's.
        assert_eq!(
            err_field(&LINKS.replace(
                r#"contenders = ["lu2k"]"#,
                r#"contenders = ["lu2k", "tcp-bbr"]"#
            )),
            "cell[0].contenders"
        );
        // Both links out: nothing to fail over to.
        assert_eq!(
            err_field(&LINKS.replace(
                "loss = 0.0\n",
                "outage = { start_s = 1.0, duration_s = 1.0 }\n"
            )),
            "cell[0].link"
        );
        // An outage of the whole cell, or a policy without links.
        assert_eq!(
            err_field(&LINKS.replace(
                "policy = \"failover\"",
                "policy = \"failover\"\noutage = { start_s = 1.0, duration_s = 1.0 }"
            )),
            "cell[0].outage"
        );
        assert_eq!(
            err_field(&BASE.replace("bytes = 2000", "policy = \"balance\"")),
            "cell[0].policy"
        );
        assert_eq!(
            err_field(&BASE.replace("bytes = 2000", "ipv6 = true")),
            "cell[0].contenders"
        );
        let e = Scenario::parse(&LINKS.replace("\"failover\"", "\"roundrobin\""), "t.toml")
            .unwrap_err();
        assert!(e.to_string().contains("roundrobin"), "{e}");
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                // A gateway file's cells carry `pairs`, which `lu2k-perf gateway`
                // takes out before the rest is read as a scenario.
                let gateway = p
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("gateway"));
                let s = if gateway {
                    crate::gateway::GatewayFile::load(&p).map(|g| g.scenario)
                } else {
                    Scenario::load(&p).map_err(anyhow::Error::from)
                }
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!s.cells(true).is_empty());
                n += 1;
            }
        }
        assert!(
            n >= 2,
            "expected geo.toml and the tiny scenario in {}",
            dir.display()
        );
    }
}
