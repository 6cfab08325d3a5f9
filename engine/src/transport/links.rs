//! Several links per peer: a peer reachable over more than one address pair (two
//! modems, or a satellite and a terrestrial backup), the policy that picks a link
//! for each message, and what makes a message resent on another link arrive once.
//!
//! Sans-IO, on the transport's microsecond clock: [`super::udt::Udt`] owns one
//! [`Links`] per multi-link peer and asks it where a message goes
//! ([`Links::pick`]) and whether a link went silent ([`Links::silent`]); a
//! receiving core keeps one [`Dedup`] per multi-link peer.
//!
//! - **A link** is one UDT connection from this node to one of the peer's
//!   addresses. The source address is the kernel's choice for that destination
//!   (the engine binds the wildcard address when a peer has several links, see
//!   `daemon::config`), so each link's traffic leaves and returns through its own
//!   interface; the configured local address names the link at the peer and is
//!   checked against the kernel's route at start.
//! - **failover**: every message goes to the first link, in configuration order,
//!   that is up. A link carrying messages whose data sent over it went
//!   unanswered for [`silence_limit_us`] (1.25 RTT + 20 ms, at least 100 ms;
//!   see [`Links::silent`]; the RTT is the connection's measured one, or before
//!   its first ACK the link's handshake time, [`Links::silence_rtt_us`]) is down: its
//!   connection is closed and each of its unfinished messages goes again on the
//!   next link at once, so traffic moves within 2 RTT of the link going silent
//!   (RTT ≥ 50 ms; below that the 100 ms floor rules). A down link is dialled again
//!   (UDT's handshake every 250 ms is the probe); once its handshake is answered it
//!   is up and new messages go back to it.
//! - **balance**: each message goes to the link that would finish it first: the
//!   link's unacknowledged bytes plus the message, over its rate (acknowledged
//!   bytes per second while it had work, measured every 100 ms, a moving
//!   average), times its weight. Until a link has a measured rate its weight
//!   alone decides; messages handed while no link is up yet spread over the
//!   connecting links the same way. A silent link is handled as in failover,
//!   and so is a link still connecting with messages on it once another link
//!   has been up for the silence limit of its own handshake time
//!   ([`Links::stuck_connecting`]: a path dead from the start sends nothing
//!   that could go unanswered).
//! - **Exactly once**: a message's first packet carries [`EXT_LEN`] more bytes
//!   after the UDT header, `[magic "LuML", sender session (u32), message number
//!   (u64)]`, big-endian; the sender numbers its messages per peer and keeps the
//!   number when it resends a message on another link. The receiver strips the
//!   extension before UDT sees the packet and, when the message is whole, checks
//!   the number in the peer's [`Dedup`] across all its links: a number seen
//!   before is dropped (counted `rx_dup_message`) — UDT still acknowledges it, so
//!   the sender completes the message `Ok` once. A single-link peer's wire is
//!   UDT4's, unchanged: only peers configured with links on both sides carry the
//!   extension. The connections of a multi-link peer use an MSS smaller by
//!   [`EXT_LEN`] so a first packet is no larger than any other.
//! - **Order**: LNet needs none between messages (each LNet message is
//!   independent; LNet itself spreads a peer's messages over NIs and routes).
//!   Messages on one link arrive in order; messages on different links, or one
//!   resent on another link, arrive and complete in any order.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Extension bytes after the UDT header of a multi-link message's first packet.
pub const EXT_LEN: usize = 16;
/// The extension's first bytes.
pub const EXT_MAGIC: [u8; 4] = *b"LuML";
/// Floor of the silence limit (µs): below it, ACK spacing (10 ms), a
/// bottleneck queue's delay and a loaded CPU's scheduling gaps look like
/// silence, and a busy link's messages would move for nothing.
pub const SILENCE_FLOOR_US: u64 = 100_000;
/// Rate sampling period of a link (µs).
const RATE_PERIOD_US: u64 = 100_000;
/// Message numbers one [`Dedup`] window remembers above its floor.
pub const DEDUP_WINDOW: usize = 16_384;
/// Sender sessions one [`Dedup`] remembers (a sender core restarted, or several
/// sender cores).
pub const DEDUP_SESSIONS: usize = 16;

/// How a peer's messages are spread over its links (config `policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// All on the first live link, in configuration order.
    #[default]
    Failover,
    /// Spread by weight and measured rate.
    Balance,
}

impl Policy {
    /// The configuration's word for it.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Failover => "failover",
            Policy::Balance => "balance",
        }
    }
}

/// One configured link (config `[[peer.link]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkCfg {
    /// This node's address on the link: the source the kernel's route to
    /// `remote` must pick (checked at start), and the address the peer knows
    /// this node by on that link.
    pub local: IpAddr,
    /// The peer's address and port on the link.
    pub remote: SocketAddr,
    /// Share in `balance` (1..=1000, default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Most links per peer.
pub const MAX_LINKS: usize = 8;

/// A problem with a peer's links in the configuration: the field, its value,
/// what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfgProblem {
    /// The field (`peer.link`, `peer.policy`, `bind`, `security`).
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub problem: &'static str,
    /// How to fix it.
    pub fix: &'static str,
}

/// Checks one `[[peer]]`'s links: `addr_given` whether it has `addr` too,
/// `bind` the engine's `bind`, `sealed` whether the wire is sealed.
pub fn check_peer(
    nid_ip: IpAddr,
    links: &[LinkCfg],
    policy: Option<Policy>,
    addr_given: bool,
    bind: IpAddr,
    sealed: bool,
) -> Result<(), CfgProblem> {
    let bad = |field, value: String, problem, fix| {
        Err(CfgProblem {
            field,
            value,
            problem,
            fix,
        })
    };
    if links.is_empty() {
        if let Some(p) = policy {
            return bad(
                "peer.policy",
                p.name().into(),
                "a policy without [[peer.link]] entries",
                "give the peer two or more [[peer.link]] entries, or remove policy",
            );
        }
        return Ok(());
    }
    if addr_given {
        return bad(
            "peer.addr",
            nid_ip.to_string(),
            "both addr and [[peer.link]] entries",
            "remove addr: a peer with links is reached at each link's remote address",
        );
    }
    if links.len() > MAX_LINKS {
        return bad(
            "peer.link",
            links.len().to_string(),
            "more than 8 links",
            "keep at most 8 [[peer.link]] entries per peer",
        );
    }
    if !bind.is_unspecified() {
        return bad(
            "bind",
            bind.to_string(),
            "a peer has several links, and one bound address cannot send from each",
            "remove bind: with [[peer.link]] the engine binds the wildcard address and the \
             kernel's route to each link's remote address picks its local address",
        );
    }
    if sealed {
        return bad(
            "security",
            "required".into(),
            "the sealed wire binds each handshake to this node's one address; peers with \
             several links are not sealed yet",
            "set security = \"off\" (and remove the key files), or give the peer one addr",
        );
    }
    for (i, l) in links.iter().enumerate() {
        if l.remote.port() == 0 || l.remote.ip().is_unspecified() {
            return bad(
                "peer.link.remote",
                l.remote.to_string(),
                "no address or port 0",
                "give the peer engine's address and UDP port on this link, \
                 e.g. remote = \"198.51.100.20:7988\"",
            );
        }
        if l.local.is_ipv4() != l.remote.is_ipv4() {
            return bad(
                "peer.link.local",
                l.local.to_string(),
                "not of the remote address's family (IPv4 and IPv6 mixed in one link)",
                "give this node's address on the link in the family of remote: an IPv4 \
                 local for an IPv4 remote, an IPv6 local for an IPv6 remote",
            );
        }
        if l.local.is_unspecified() {
            return bad(
                "peer.link.local",
                l.local.to_string(),
                "the wildcard address",
                "give this node's address on the link, e.g. local = \"192.0.2.10\"",
            );
        }
        if !(1..=1000).contains(&l.weight) {
            return bad(
                "peer.link.weight",
                l.weight.to_string(),
                "not between 1 and 1000",
                "give a weight between 1 and 1000 (balance: the link's share)",
            );
        }
        if links[..i].iter().any(|o| o.remote.ip() == l.remote.ip()) {
            return bad(
                "peer.link.remote",
                l.remote.ip().to_string(),
                "two links to the same remote address (the peer tells links apart by address)",
                "give each link its own remote address",
            );
        }
    }
    Ok(())
}

/// A multi-link peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLinksCfg {
    /// The peer's NID address: the name the engine knows it by.
    pub nid_ip: IpAddr,
    /// The policy.
    pub policy: Policy,
    /// The links, in priority order.
    pub links: Vec<LinkCfg>,
}

/// Every multi-link peer of an engine, and which address is whose.
#[derive(Debug, Clone, Default)]
pub struct LinkTable {
    peers: HashMap<IpAddr, Arc<PeerLinksCfg>>,
    /// A link's remote address → the peer's NID address.
    alias: HashMap<IpAddr, IpAddr>,
}

impl LinkTable {
    /// The table of `peers`; an address claimed by two peers is refused.
    pub fn new(peers: Vec<PeerLinksCfg>) -> Result<LinkTable, String> {
        let mut t = LinkTable::default();
        for p in peers {
            if p.links.is_empty() {
                return Err(format!("peer {} has no link", p.nid_ip));
            }
            let p = Arc::new(p);
            for a in std::iter::once(p.nid_ip).chain(p.links.iter().map(|l| l.remote.ip())) {
                if let Some(other) = t.alias.insert(a, p.nid_ip) {
                    if other != p.nid_ip {
                        return Err(format!(
                            "address {a} is a link of both {other} and {}",
                            p.nid_ip
                        ));
                    }
                }
            }
            t.peers.insert(p.nid_ip, p);
        }
        Ok(t)
    }

    /// Whether no peer has links.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peer an address belongs to: the NID address of the multi-link peer
    /// that has it as a link, else the address itself.
    pub fn canonical(&self, ip: IpAddr) -> IpAddr {
        self.alias.get(&ip).copied().unwrap_or(ip)
    }

    /// The links of the peer named by its NID address.
    pub fn peer(&self, nid_ip: IpAddr) -> Option<&Arc<PeerLinksCfg>> {
        self.peers.get(&nid_ip)
    }
}

/// The link table of the configuration's `[[peer]]` entries with links, for an
/// engine of `cores` cores spreading each peer over `conns_per_peer` of them.
/// Refused: a link whose address would land on another core than its peer's
/// (the cores steer datagrams by source address, and one core must hear all
/// of a peer's links), and links with a peer spread over several cores.
/// Logged: a link whose route leaves from another address than its `local`, or
/// that has no route now (it is dialled anyway; the route may come later).
pub fn plan(
    peers: &[crate::daemon::config::PeerCfg],
    cores: u32,
    conns_per_peer: u32,
) -> Result<LinkTable, String> {
    let mut out = Vec::new();
    for p in peers.iter().filter(|p| !p.links.is_empty()) {
        let Some(nid_ip) = p
            .nid
            .parse::<lu2k_ring_abi::Nid>()
            .ok()
            .and_then(|n| n.ip_addr())
        else {
            return Err(format!(
                "peer {}: links need a NID with an IP address (write nid = \"10.0.0.2@lu2k\" \
                 or nid = \"2001:db8::2@lu2k\")",
                p.nid
            ));
        };
        if conns_per_peer > 1 && !p.links.is_empty() {
            return Err(format!(
                "peer {}: several links and a peer spread over {conns_per_peer} cores \
                 (conns_per_peer) do not combine yet: each core would see only some of the \
                 peer's messages and could not tell a resent one; start kshim with \
                 conns_per_peer = 1, or give the peer one addr",
                p.nid
            ));
        }
        let core = crate::steer::shard_ip(nid_ip, cores);
        for l in &p.links {
            let c = crate::steer::shard_ip(l.remote.ip(), cores);
            if c != core {
                return Err(format!(
                    "peer {}: link to {} lands on core {c} of {cores} and the peer on core \
                     {core}: the cores steer datagrams by source address, so one core must \
                     hear every link of a peer; run the engine with one core (kshim with one \
                     ring set), or give the link an address that lands on core {core}",
                    p.nid, l.remote
                ));
            }
            match route_source(l.remote) {
                Ok(src) if src == l.local => {}
                Ok(src) => tracing::warn!(
                    peer = %p.nid,
                    remote = %l.remote,
                    local = %l.local,
                    route_source = %src,
                    "the kernel's route to this link's remote address leaves from another \
                     address than its local one: the peer will not know the link's datagrams \
                     (add a route: {})",
                    if l.remote.is_ipv4() {
                        "ip route add REMOTE/32 dev IFACE src LOCAL"
                    } else {
                        "ip -6 route add REMOTE/128 dev IFACE src LOCAL"
                    }
                ),
                Err(e) => tracing::warn!(
                    peer = %p.nid,
                    remote = %l.remote,
                    error = %e,
                    "no route to this link's remote address now; the link is dialled anyway"
                ),
            }
        }
        out.push(PeerLinksCfg {
            nid_ip,
            policy: p.policy.unwrap_or_default(),
            links: p.links.clone(),
        });
    }
    LinkTable::new(out)
}

/// The source address the kernel's route to `remote` picks.
pub fn route_source(remote: SocketAddr) -> std::io::Result<IpAddr> {
    let any = match remote {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let s = std::net::UdpSocket::bind((any, 0))?;
    s.connect(remote)?;
    Ok(s.local_addr()?.ip())
}

/// What a link is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not yet connected, or dialling again after [`LinkState::Down`].
    Connecting,
    /// Its connection is established and answers.
    Up,
    /// Went silent with messages on it; dialled again.
    Down,
}

impl LinkState {
    /// For stats.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// A link's counters, as stats show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkCounters {
    /// Messages acknowledged over the link.
    pub msgs_acked: u64,
    /// Payload bytes acknowledged over the link (LNet header included).
    pub bytes_acked: u64,
    /// Messages moved off the link when it went silent or closed.
    pub msgs_moved_off: u64,
    /// Times the link went down.
    pub downs: u64,
    /// Times the link came (back) up.
    pub ups: u64,
    /// Longest time from the last datagram heard to the move, µs.
    pub max_switch_us: u64,
}

/// One link's live state.
#[derive(Debug, Clone)]
pub struct Link {
    /// Its configuration.
    pub cfg: LinkCfg,
    /// Up, down, connecting.
    pub state: LinkState,
    /// Its TX connection.
    pub tx_sock: Option<u32>,
    /// When a valid datagram last came over it, or work on it started (µs).
    pub last_heard: u64,
    /// When the first data packet sent over it since it was last heard left
    /// (µs): silence counts only against packets that could have been answered.
    pub unanswered_since: Option<u64>,
    /// When its connection was last dialled and not yet established (µs).
    pub dialled_at: Option<u64>,
    /// When it last came up (µs).
    pub up_at: Option<u64>,
    /// The round trip its connections last measured (µs; 0: none yet).
    pub rtt_seen_us: u64,
    /// The last dial's handshake time (µs; 0: none yet): the round trip the
    /// silence limit falls back on before the connection has measured one,
    /// rather than UDT's assumed 100 ms, which on a 600 ms path would call
    /// every fresh link silent before its first ACK could arrive.
    pub handshake_us: u64,
    /// Messages on it not yet acknowledged, and their bytes.
    pub in_flight: u32,
    /// Bytes of [`Link::in_flight`].
    pub queued: u64,
    /// Measured rate, bytes/s (0: none yet).
    pub rate: f64,
    /// Acknowledged bytes in the current sample, its start, and whether the
    /// link had work throughout.
    sample_bytes: u64,
    sample_at: u64,
    sample_busy: bool,
    /// Counters.
    pub counters: LinkCounters,
}

/// One link as `lu2k-engine stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// This node's address on the link.
    pub local: String,
    /// The peer's address on the link.
    pub remote: String,
    /// The peer's policy (`failover`, `balance`).
    pub policy: String,
    /// The link's weight.
    pub weight: u32,
    /// `up`, `down`, `connecting`.
    pub state: String,
    /// Smoothed RTT of its connection, µs (0: none).
    pub rtt_us: u64,
    /// Measured rate (acknowledged bytes while busy), bits/s.
    pub rate_bps: u64,
    /// Messages on it now.
    pub in_flight: u64,
    /// Messages acknowledged over it.
    pub msgs_acked: u64,
    /// Their bytes (LNet header included).
    pub bytes_acked: u64,
    /// Messages moved off it to another link.
    pub msgs_moved_off: u64,
    /// Times it went down.
    pub downs: u64,
    /// Times it came up.
    pub ups: u64,
    /// Longest silence before its messages moved, µs.
    pub max_switch_us: u64,
}

impl LinkStats {
    /// The stats of link `l` of a peer with `policy`, its connection's RTT `rtt_us`.
    pub fn of(policy: Policy, l: &Link, rtt_us: u64) -> LinkStats {
        LinkStats {
            local: l.cfg.local.to_string(),
            remote: l.cfg.remote.to_string(),
            policy: policy.name().into(),
            weight: l.cfg.weight,
            state: l.state.name().into(),
            rtt_us,
            rate_bps: (l.rate * 8.0) as u64,
            in_flight: u64::from(l.in_flight),
            msgs_acked: l.counters.msgs_acked,
            bytes_acked: l.counters.bytes_acked,
            msgs_moved_off: l.counters.msgs_moved_off,
            downs: l.counters.downs,
            ups: l.counters.ups,
            max_switch_us: l.counters.max_switch_us,
        }
    }
}

/// The silence after which a link carrying messages is down, µs: 1.25 RTT +
/// 20 ms (ACKs come every 10 ms while data flows, and at least once per RTT
/// while the sender waits), at least [`SILENCE_FLOOR_US`].
pub fn silence_limit_us(rtt_us: u64) -> u64 {
    (rtt_us + rtt_us / 4 + 20_000).max(SILENCE_FLOOR_US)
}

/// The links of one peer.
#[derive(Debug, Clone)]
pub struct Links {
    /// The peer's configuration.
    pub cfg: Arc<PeerLinksCfg>,
    /// Per link, in configuration order.
    pub links: Vec<Link>,
    /// The next message number (starts at 1).
    next_seq: u64,
}

impl Links {
    /// Fresh state for `cfg`, every link connecting.
    pub fn new(cfg: Arc<PeerLinksCfg>, now: u64) -> Links {
        let links = cfg
            .links
            .iter()
            .map(|l| Link {
                cfg: l.clone(),
                state: LinkState::Connecting,
                tx_sock: None,
                last_heard: now,
                unanswered_since: None,
                dialled_at: None,
                up_at: None,
                rtt_seen_us: 0,
                handshake_us: 0,
                in_flight: 0,
                queued: 0,
                rate: 0.0,
                sample_bytes: 0,
                sample_at: now,
                sample_busy: false,
                counters: LinkCounters::default(),
            })
            .collect();
        Links {
            cfg,
            links,
            next_seq: 1,
        }
    }

    /// The next message number of this peer.
    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// The link a message of `len` bytes goes to, other than `not`: by the
    /// policy among the links that are up; if none is, by the policy among
    /// the connecting ones (failover: the first; balance: by weight); if
    /// every link is down, the one heard from last (its connection
    /// keeps trying; the peer-down timeout ends it).
    pub fn pick(&self, len: u64, not: Option<usize>) -> Option<usize> {
        let cand = |st: LinkState| {
            self.links
                .iter()
                .enumerate()
                .filter(move |(i, l)| Some(*i) != not && l.state == st)
        };
        let up: Vec<usize> = cand(LinkState::Up).map(|(i, _)| i).collect();
        if !up.is_empty() {
            return Some(match self.cfg.policy {
                Policy::Failover => up[0],
                Policy::Balance => self.fastest(&up, len),
            });
        }
        let connecting: Vec<usize> = cand(LinkState::Connecting).map(|(i, _)| i).collect();
        if !connecting.is_empty() {
            return Some(match self.cfg.policy {
                Policy::Failover => connecting[0],
                // Messages handed before any link answered spread by weight:
                // all on the first link would leave the others idle until
                // that link completes one, a round trip and more after it
                // connects (the handshake's round trip, then the message's).
                Policy::Balance => self.fastest(&connecting, len),
            });
        }
        cand(LinkState::Down)
            .max_by_key(|(i, l)| (l.last_heard, usize::MAX - i))
            .map(|(i, _)| i)
    }

    /// Of `up`, the link that would finish `len` more bytes first.
    fn fastest(&self, up: &[usize], len: u64) -> usize {
        let measured = up.iter().all(|&i| self.links[i].rate > 0.0);
        let mut best = up[0];
        let mut best_t = f64::INFINITY;
        for &i in up {
            let l = &self.links[i];
            let w = f64::from(l.cfg.weight.max(1));
            // Without a measured rate on every link, weights alone decide:
            // a rate measured on one link would not compare with a guess.
            let rate = if measured { l.rate * w } else { w };
            let t = (l.queued + len) as f64 / rate;
            if t < best_t {
                best_t = t;
                best = i;
            }
        }
        best
    }

    /// A message of `len` bytes was put on link `i`.
    pub fn assign(&mut self, i: usize, len: u64, now: u64) {
        let l = &mut self.links[i];
        if l.in_flight == 0 {
            // Work starts now: the silence clock counts from here.
            l.last_heard = l.last_heard.max(now);
            l.sample_busy = false;
        }
        l.in_flight += 1;
        l.queued += len;
    }

    /// A message of `len` bytes left link `i`, acknowledged or moved.
    pub fn unassign(&mut self, i: usize, len: u64, acked: bool, now: u64) {
        self.roll(i, now);
        let l = &mut self.links[i];
        l.in_flight = l.in_flight.saturating_sub(1);
        l.queued = l.queued.saturating_sub(len);
        if l.in_flight == 0 {
            l.sample_busy = false;
        }
        if acked {
            l.counters.msgs_acked += 1;
            l.counters.bytes_acked += len;
            l.sample_bytes += len;
        } else {
            l.counters.msgs_moved_off += 1;
        }
    }

    /// Closes the rate sample of link `i` if its period is over.
    fn roll(&mut self, i: usize, now: u64) {
        let l = &mut self.links[i];
        let dt = now.saturating_sub(l.sample_at);
        if dt < RATE_PERIOD_US {
            return;
        }
        // Only a period with work throughout says what the link can carry; one
        // that acknowledged nothing counts too (a large message spans several
        // periods), once the link has a first rate.
        if l.sample_busy && (l.sample_bytes > 0 || l.rate > 0.0) {
            let r = l.sample_bytes as f64 * 1e6 / dt as f64;
            l.rate = if l.rate > 0.0 {
                l.rate + (r - l.rate) / 8.0
            } else {
                r
            };
        }
        l.sample_bytes = 0;
        l.sample_at = now;
        l.sample_busy = l.in_flight > 0;
    }

    /// Valid news over link `i`.
    pub fn heard(&mut self, i: usize, now: u64) {
        if let Some(l) = self.links.get_mut(i) {
            l.last_heard = l.last_heard.max(now);
            l.unanswered_since = None;
        }
    }

    /// Data went out over link `i`.
    pub fn sent(&mut self, i: usize, now: u64) {
        if let Some(l) = self.links.get_mut(i) {
            l.unanswered_since.get_or_insert(now);
        }
    }

    /// Link `i`'s connection was dialled.
    pub fn dialled(&mut self, i: usize, now: u64) {
        if let Some(l) = self.links.get_mut(i) {
            l.dialled_at = Some(now);
        }
    }

    /// The round trip that link `i`'s silence limit uses: its connection's
    /// once measured (`measured`); before that, the larger of the connection's
    /// figure and what an earlier connection of the link measured (a link
    /// dialled again after an outage: its handshake time would span the
    /// outage), or, on a link never measured, its handshake time (a handshake
    /// with a cookie takes two round trips, so this errs long for the one round
    /// trip before the first ACK).
    pub fn silence_rtt_us(&self, i: usize, conn_rtt_us: u64, measured: bool) -> u64 {
        match self.links.get(i) {
            Some(l) if !measured && l.rtt_seen_us > 0 => conn_rtt_us.max(l.rtt_seen_us),
            Some(l) if !measured => conn_rtt_us.max(l.handshake_us),
            _ => conn_rtt_us,
        }
    }

    /// Link `i`'s connection is established: the link is up.
    pub fn connected(&mut self, i: usize, now: u64) {
        if let Some(l) = self.links.get_mut(i) {
            if let Some(t) = l.dialled_at.take() {
                l.handshake_us = now.saturating_sub(t);
            }
            if l.state != LinkState::Up {
                l.state = LinkState::Up;
                l.counters.ups += 1;
                l.up_at = Some(now);
            }
            l.last_heard = l.last_heard.max(now);
        }
    }

    /// Whether link `i` still has not connected, holds messages, and another
    /// link came up longer ago than [`silence_limit_us`] of that link's own
    /// handshake time (counted from `i`'s dial if that was later): a link whose
    /// path is dead from the start sends no data, so [`Links::silent`] cannot
    /// see it, and its messages would wait for its connect timeout.
    pub fn stuck_connecting(&self, i: usize, now: u64) -> bool {
        let l = &self.links[i];
        l.state == LinkState::Connecting
            && l.in_flight > 0
            && self.links.iter().enumerate().any(|(j, o)| {
                j != i
                    && o.state == LinkState::Up
                    && o.up_at.is_some_and(|t| {
                        let from = t.max(l.dialled_at.unwrap_or(0));
                        now.saturating_sub(from) > silence_limit_us(o.handshake_us)
                    })
            })
    }

    /// Whether link `i` carries messages and nothing answered the data sent
    /// over it for longer than [`silence_limit_us`] of `rtt_us`. A sender
    /// that sends nothing (its flow window closed by a slow receiver) expects
    /// no answer: that is no silence.
    pub fn silent(&self, i: usize, now: u64, rtt_us: u64) -> bool {
        let l = &self.links[i];
        l.in_flight > 0
            && l.state != LinkState::Down
            && l.unanswered_since
                .is_some_and(|t| now.saturating_sub(t.max(l.last_heard)) > silence_limit_us(rtt_us))
    }

    /// Whether another link than `i` can take `i`'s messages now that `i` is
    /// silent: one that is not down and shows no silence of its own as old
    /// as half of `i`'s: it answered since, or has nothing unanswered. When
    /// every link carrying data went quiet together, what stopped is the peer
    /// or this gateway (a process the scheduler did not run, a host under
    /// load), not a link: moving messages would only restart them on a link
    /// no better off, and the peer-down timeout ends a peer that is gone.
    pub fn another_answers(&self, i: usize, now: u64) -> bool {
        let Some(l) = self.links.get(i) else {
            return false;
        };
        let quiet = now.saturating_sub(l.unanswered_since.unwrap_or(now).max(l.last_heard));
        self.links.iter().enumerate().any(|(j, o)| {
            j != i
                && o.state != LinkState::Down
                && o.unanswered_since
                    .is_none_or(|t| now.saturating_sub(t.max(o.last_heard)) < quiet / 2)
        })
    }

    /// Link `i` is down (silent, or its connection ended); `now` for the
    /// switch time.
    pub fn down(&mut self, i: usize, now: u64) {
        let l = &mut self.links[i];
        if l.state != LinkState::Down {
            l.state = LinkState::Down;
            l.counters.downs += 1;
            let since = now.saturating_sub(l.last_heard);
            l.counters.max_switch_us = l.counters.max_switch_us.max(since);
        }
        l.tx_sock = None;
        l.unanswered_since = None;
        l.sample_busy = false;
    }

    /// Rolls every link's rate sample (call now and then).
    pub fn tick(&mut self, now: u64) {
        for i in 0..self.links.len() {
            self.roll(i, now);
        }
    }

    /// Which link has TX connection `sock`.
    pub fn link_of(&self, sock: u32) -> Option<usize> {
        self.links.iter().position(|l| l.tx_sock == Some(sock))
    }
}

/// The extension of a multi-link message's first packet.
pub fn write_ext(session: u32, seq: u64) -> [u8; EXT_LEN] {
    let mut b = [0u8; EXT_LEN];
    b[..4].copy_from_slice(&EXT_MAGIC);
    b[4..8].copy_from_slice(&session.to_be_bytes());
    b[8..].copy_from_slice(&seq.to_be_bytes());
    b
}

/// `(session, message number)` of an extension; `None` without the magic.
pub fn read_ext(b: &[u8]) -> Option<(u32, u64)> {
    if b.len() < EXT_LEN || b[..4] != EXT_MAGIC {
        return None;
    }
    let s = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let q = u64::from_be_bytes(b[8..16].try_into().ok()?);
    Some((s, q))
}

/// Whether a datagram is a UDT data packet that begins a message (position
/// bits `10` first or `11` solo): the packet that carries the extension.
pub fn begins_message(d: &[u8]) -> bool {
    d.len() >= 16 && d[0] & 0x80 == 0 && d[4] & 0x80 != 0
}

/// The UDT message number of a data packet (29 bits of word 1).
pub fn msg_no(d: &[u8]) -> u32 {
    u32::from_be_bytes([d[4], d[5], d[6], d[7]]) & 0x1FFF_FFFF
}

/// The message numbers a receiver has delivered, per sender session: a
/// number below `floor` or in `seen` was delivered. `seen` keeps at most
/// [`DEDUP_WINDOW`] numbers: past that the lowest is taken as the floor (a
/// message that many numbers behind was long failed back by its sender, whose
/// credits bound what is in flight).
#[derive(Debug, Clone, Default)]
struct Window {
    floor: u64,
    seen: BTreeSet<u64>,
    used: u64,
}

/// Delivered message numbers of one multi-link peer, across its links.
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    sessions: HashMap<u32, Window>,
    uses: u64,
}

impl Dedup {
    /// Whether message `seq` of sender session `session` is new; records it.
    pub fn first_time(&mut self, session: u32, seq: u64) -> bool {
        self.uses += 1;
        if !self.sessions.contains_key(&session) && self.sessions.len() >= DEDUP_SESSIONS {
            // The session unused longest goes (a sender core that restarted).
            if let Some(old) = self
                .sessions
                .iter()
                .min_by_key(|(_, w)| w.used)
                .map(|(s, _)| *s)
            {
                self.sessions.remove(&old);
            }
        }
        let w = self.sessions.entry(session).or_insert_with(|| Window {
            floor: 1,
            ..Window::default()
        });
        w.used = self.uses;
        if seq < w.floor || !w.seen.insert(seq) {
            return false;
        }
        while w.seen.first() == Some(&w.floor) {
            w.seen.pop_first();
            w.floor += 1;
        }
        while w.seen.len() > DEDUP_WINDOW {
            if let Some(low) = w.seen.pop_first() {
                w.floor = low + 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn cfg(policy: Policy, weights: &[u32]) -> Arc<PeerLinksCfg> {
        Arc::new(PeerLinksCfg {
            nid_ip: Ipv4Addr::new(10, 1, 0, 2).into(),
            policy,
            links: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| LinkCfg {
                    local: Ipv4Addr::new(10, i as u8 + 1, 0, 1).into(),
                    remote: SocketAddrV4::new(Ipv4Addr::new(10, i as u8 + 1, 0, 2), 7988).into(),
                    weight: w,
                })
                .collect(),
        })
    }

    #[test]
    fn failover_takes_the_first_up_link_and_goes_back() {
        let mut l = Links::new(cfg(Policy::Failover, &[1, 1]), 0);
        // Nothing up: the first connecting link.
        assert_eq!(l.pick(1000, None), Some(0));
        l.connected(1, 10);
        assert_eq!(l.pick(1000, None), Some(1), "the only link up");
        l.connected(0, 20);
        assert_eq!(
            l.pick(1000, None),
            Some(0),
            "back to the first once it is up"
        );
        l.assign(0, 1000, 30);
        assert!(!l.silent(0, 1_000_000, 10_000), "nothing sent: no silence");
        l.sent(0, 30);
        // RTT 10 ms: the floor rules.
        assert!(!l.silent(0, 30 + SILENCE_FLOOR_US, 10_000));
        assert!(l.silent(0, 31 + SILENCE_FLOOR_US, 10_000));
    }

    #[test]
    fn before_the_first_ack_the_silence_limit_follows_the_handshake() {
        let mut l = Links::new(cfg(Policy::Failover, &[1, 1]), 0);
        l.dialled(0, 1_000);
        l.connected(0, 1_201_000);
        assert_eq!(l.links[0].handshake_us, 1_200_000);
        assert_eq!(l.silence_rtt_us(0, 100_000, false), 1_200_000);
        assert_eq!(l.silence_rtt_us(0, 600_000, true), 600_000);
        // Never dialled by this side: the connection's own figure.
        assert_eq!(l.silence_rtt_us(1, 100_000, false), 100_000);
        // Dialled again after a 10 s outage: the link's last measured round
        // trip, not a handshake time that spans the outage.
        l.links[0].rtt_seen_us = 600_000;
        l.dialled(0, 2_000_000);
        l.connected(0, 12_000_000);
        assert_eq!(l.silence_rtt_us(0, 100_000, false), 600_000);
    }

    #[test]
    fn silence_limit_is_within_two_rtt() {
        for rtt in [50_000u64, 80_000, 250_000, 600_000, 700_000] {
            let s = silence_limit_us(rtt);
            assert!(s > rtt && s <= 2 * rtt, "rtt {rtt}: limit {s}");
        }
        assert_eq!(silence_limit_us(100), SILENCE_FLOOR_US);
    }

    #[test]
    fn a_silent_link_goes_down_and_the_next_takes_over() {
        let mut l = Links::new(cfg(Policy::Failover, &[1, 1]), 0);
        l.connected(0, 0);
        l.connected(1, 0);
        l.assign(0, 1000, 1_000);
        l.sent(0, 1_000);
        let rtt = 600_000;
        let lim = silence_limit_us(rtt);
        assert!(!l.silent(0, 1_000 + lim, rtt));
        assert!(l.silent(0, 1_001 + lim, rtt));
        l.down(0, 1_001 + lim);
        assert_eq!(l.links[0].counters.max_switch_us, lim + 1);
        assert_eq!(l.pick(1000, None), Some(1));
        // Idle links are never silent.
        assert!(!l.silent(1, 10_000_000, rtt));
        // Every link down: the one heard last.
        l.heard(1, 5_000);
        l.down(1, 5_000_000);
        assert_eq!(l.pick(1000, None), Some(1));
        l.connected(0, 6_000_000);
        assert_eq!(l.pick(1000, None), Some(0));
        assert_eq!(l.links[0].counters.ups, 2);
    }

    #[test]
    fn a_link_is_silent_alone_only_while_another_answers() {
        let mut l = Links::new(cfg(Policy::Balance, &[1, 1]), 0);
        for i in 0..2 {
            l.connected(i, 1_000);
            l.assign(i, 1000, 1_000);
            l.sent(i, 2_000);
        }
        // Both quiet since 2 ms: the peer (or this host) stopped, not a link.
        let t = 2_000 + SILENCE_FLOOR_US + 1;
        assert!(l.silent(0, t, 1_000) && l.silent(1, t, 1_000));
        assert!(!l.another_answers(0, t) && !l.another_answers(1, t));
        // Link 1 answers: link 0's silence is its own.
        l.heard(1, t - 10_000);
        assert!(l.another_answers(0, t));
        // Data that left link 1 just now could not be answered yet: no
        // evidence against it. A down link takes nothing.
        l.sent(1, t - 5_000);
        assert!(l.another_answers(0, t));
        l.down(1, t);
        assert!(!l.another_answers(0, t));
    }

    /// Balance on virtual time: two links of 100 and 50 Mbit/s drain what
    /// they are given; messages go where they finish first, and the split
    /// follows the rates once they are measured.
    #[test]
    fn balance_follows_weights_then_measured_rates() {
        let mut l = Links::new(cfg(Policy::Balance, &[1, 1]), 0);
        l.connected(0, 0);
        l.connected(1, 0);
        let rates = [100e6 / 8.0, 50e6 / 8.0];
        let msg = 1u64 << 20;
        // Per link, the messages on it, oldest first, and the bytes of the
        // oldest still to go.
        let mut q: [std::collections::VecDeque<u64>; 2] = Default::default();
        let mut left = [0f64; 2];
        let mut sent = [0u64; 2];
        let step = 1_000u64;
        let mut now = 0;
        while now < 20_000_000 {
            // The sender keeps 8 messages in flight (LNet credits).
            while q[0].len() + q[1].len() < 8 {
                let i = l.pick(msg, None).expect("a link");
                l.assign(i, msg, now);
                q[i].push_back(msg);
                sent[i] += 1;
            }
            now += step;
            for i in 0..2 {
                let mut budget = rates[i] * step as f64 / 1e6;
                while budget > 0.0 {
                    let Some(&m) = q[i].front() else { break };
                    let need = m as f64 - left[i];
                    if budget >= need {
                        budget -= need;
                        left[i] = 0.0;
                        q[i].pop_front();
                        l.unassign(i, m, true, now);
                    } else {
                        left[i] += budget;
                        budget = 0.0;
                    }
                }
            }
            l.tick(now);
        }
        let r0 = l.links[0].rate * 8.0 / 1e6;
        let r1 = l.links[1].rate * 8.0 / 1e6;
        assert!((90.0..110.0).contains(&r0), "link 0 measured {r0} Mbit/s");
        assert!((45.0..55.0).contains(&r1), "link 1 measured {r1} Mbit/s");
        let share = sent[0] as f64 / (sent[0] + sent[1]) as f64;
        assert!(
            (0.6..0.73).contains(&share),
            "link 0 carried {share} of the messages"
        );
        let total = (l.links[0].counters.bytes_acked + l.links[1].counters.bytes_acked) as f64
            * 8.0
            / 20.0
            / 1e6;
        assert!(total > 0.9 * 150.0, "aggregate {total} Mbit/s of 150");
    }

    #[test]
    fn weights_decide_before_rates_are_measured() {
        let mut l = Links::new(cfg(Policy::Balance, &[3, 1]), 0);
        l.connected(0, 0);
        l.connected(1, 0);
        let mut n = [0; 2];
        for _ in 0..8 {
            let i = l.pick(1000, None).unwrap();
            l.assign(i, 1000, 0);
            n[i] += 1;
        }
        assert_eq!(n, [6, 2]);
        assert_eq!(l.pick(1000, Some(0)), Some(1), "`not` is honoured");
    }

    #[test]
    fn dedup_delivers_each_number_once_per_session() {
        let mut d = Dedup::default();
        assert!(d.first_time(7, 1));
        assert!(d.first_time(7, 3));
        assert!(!d.first_time(7, 1));
        assert!(!d.first_time(7, 3));
        assert!(d.first_time(7, 2));
        assert!(!d.first_time(7, 2));
        // Another session (a restarted sender) starts again at 1.
        assert!(d.first_time(8, 1));
        // A gap never filled: the window stays bounded.
        for s in 5..5 + DEDUP_WINDOW as u64 + 10 {
            assert!(d.first_time(7, s));
        }
        assert!(d.sessions[&7].seen.len() <= DEDUP_WINDOW);
        assert!(!d.first_time(7, 4), "below the floor: taken as delivered");
        assert!(!d.first_time(7, 6));
    }

    #[test]
    fn extension_round_trip_and_packet_position() {
        let e = write_ext(0xDEAD_BEEF, 42);
        assert_eq!(read_ext(&e), Some((0xDEAD_BEEF, 42)));
        let mut bad = e;
        bad[0] = b'X';
        assert_eq!(read_ext(&bad), None);
        let mut h = [0u8; 16];
        h[4] = 0b1000_0000; // first
        h[7] = 5;
        assert!(begins_message(&h));
        assert_eq!(msg_no(&h), 5);
        h[4] = 0b1100_0000; // solo
        assert!(begins_message(&h));
        h[4] = 0b0100_0000; // last
        assert!(!begins_message(&h));
        h[0] = 0x80; // control
        h[4] = 0b1000_0000;
        assert!(!begins_message(&h));
    }

    const TWO_MODEMS: &str = r#"
        kshim_socket = "/run/lu2k/kshim.sock"
        [[peer]]
        nid = "10.0.0.2@lu2k"
        policy = "balance"
        [[peer.link]]
        local = "192.0.2.10"
        remote = "198.51.100.20:7988"
        weight = 2
        [[peer.link]]
        local = "203.0.113.10"
        remote = "203.0.113.20:7988"
    "#;

    #[test]
    fn config_with_links_parses_and_checks() {
        use crate::daemon::config::Config;
        let c = Config::from_toml(TWO_MODEMS, "t.toml").unwrap();
        c.validate().unwrap();
        let p = &c.peers[0];
        assert_eq!(p.policy, Some(Policy::Balance));
        assert_eq!(p.links.len(), 2);
        assert_eq!(p.links[0].weight, 2);
        assert_eq!(p.links[1].weight, 1, "default weight");
        let t = plan(&c.peers, 1, 1).unwrap();
        assert_eq!(
            t.canonical(Ipv4Addr::new(203, 0, 113, 20).into()),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        let err = |extra: &str, text: &str| {
            let c = Config::from_toml(&format!("{extra}\n{text}"), "t.toml").unwrap();
            c.validate().unwrap_err().to_string()
        };
        let e = err("bind = \"10.0.0.1\"", TWO_MODEMS);
        assert!(
            e.contains("`bind`") && e.contains("fix: remove bind"),
            "{e}"
        );
        let e = err("security = \"required\"", TWO_MODEMS);
        assert!(e.contains("`security`") && e.contains("fix:"), "{e}");
        let e = err(
            "",
            &TWO_MODEMS.replace("policy = \"balance\"", "addr = \"1.2.3.4:7988\""),
        );
        assert!(
            e.contains("`peer.addr`") && e.contains("remove addr"),
            "{e}"
        );
        let e = err("", &TWO_MODEMS.replace("weight = 2", "weight = 0"));
        assert!(e.contains("`peer.link.weight`"), "{e}");
        let e = err(
            "",
            &TWO_MODEMS.replace("203.0.113.20:7988", "198.51.100.20:7988"),
        );
        assert!(e.contains("same remote address"), "{e}");
        let one =
            "[[peer]]\nnid = \"10.0.0.3@lu2k\"\naddr = \"10.0.0.3:7988\"\npolicy = \"failover\"";
        let e = err("", one);
        assert!(e.contains("`peer.policy`"), "{e}");
        let e = Config::from_toml(&TWO_MODEMS.replace("weight = 2", "wieght = 2"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wieght"), "{e}");
        // Two cores: a link landing on another core than its peer is refused.
        let mut c = Config::from_toml(TWO_MODEMS, "t.toml").unwrap();
        let other = (1..255u8)
            .map(|k| Ipv4Addr::new(203, 0, 113, k))
            .find(|&ip| {
                crate::steer::shard_v4(ip, 2)
                    != crate::steer::shard_v4(Ipv4Addr::new(10, 0, 0, 2), 2)
            })
            .unwrap();
        c.peers[0].links[1].remote = SocketAddrV4::new(other, 7988).into();
        let e = plan(&c.peers, 2, 1).unwrap_err();
        assert!(e.contains("lands on core"), "{e}");
        let e = plan(&c.peers, 1, 2).unwrap_err();
        assert!(e.contains("conns_per_peer"), "{e}");
    }

    #[test]
    fn ipv6_links_parse_check_and_name_their_peer() {
        use crate::daemon::config::Config;
        let text = TWO_MODEMS
            .replace("10.0.0.2@lu2k", "fd00::2@lu2k")
            .replace("\"192.0.2.10\"", "\"fd00:1::10\"")
            .replace("\"198.51.100.20:7988\"", "\"[fd00:1::20]:7988\"");
        let c = Config::from_toml(&text, "t.toml").unwrap();
        c.validate().unwrap();
        let t = plan(&c.peers, 1, 1).unwrap();
        let peer: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(t.canonical("fd00:1::20".parse().unwrap()), peer);
        assert_eq!(t.canonical(Ipv4Addr::new(203, 0, 113, 20).into()), peer);
        assert_eq!(t.peer(peer).map(|p| p.links.len()), Some(2));
        // One link's ends in two families.
        let e = Config::from_toml(&text.replace("\"fd00:1::10\"", "\"192.0.2.10\""), "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`peer.link.local`") && e.contains("family"),
            "{e}"
        );
    }

    #[test]
    fn an_address_of_two_peers_is_refused() {
        let a = cfg(Policy::Failover, &[1, 1]);
        let mut b = (*a).clone();
        b.nid_ip = Ipv4Addr::new(10, 9, 0, 2).into();
        let e = LinkTable::new(vec![(*a).clone(), b]).unwrap_err();
        assert!(e.contains("10.1.0.2"), "{e}");
        let t = LinkTable::new(vec![(*a).clone()]).unwrap();
        assert_eq!(t.canonical(Ipv4Addr::new(10, 2, 0, 2).into()), a.nid_ip);
        assert_eq!(
            t.canonical(Ipv4Addr::new(10, 7, 0, 2).into()),
            Ipv4Addr::new(10, 7, 0, 2)
        );
    }
}
