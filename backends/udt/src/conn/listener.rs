//! The server side of the handshake: a stateless listener with SYN cookies,
//! as UDT 4.11's `CUDT::listen(sockaddr*, CPacket&)`, hardened for a link
//! anyone can transmit on.
//!
//! A first request (`req_type` 1, destination socket 0) is answered with the
//! same handshake carrying a cookie; nothing is stored for it. A request
//! repeated with a valid cookie and a matching version and socket type
//! creates a [`Connection`], which queues the handshake response. A mismatch
//! is answered with `Rejected` (1002).
//!
//! The cookie is the UDT4 wire's 32-bit field, so it is kept short-lived and
//! narrow rather than long:
//!
//! * it is SipHash-2-4 under a 128-bit key (from the OS random source in the
//!   engine, see [`Listener::with_key`]) over the client's IP address, UDP
//!   port, client socket ID and a 30-second time bucket. A cookie therefore
//!   opens one connection (one client socket ID) from one address and port,
//!   and is accepted in its own bucket and the next one only: at most one
//!   minute.
//! * guessing it blind costs 2³² tries per minute per address, and every
//!   handshake datagram the listener looks at is charged to a token bucket
//!   of its source address and to one shared by all sources (virtual time,
//!   GCRA), so a guesser gets a few hundred tries per second at most.
//!
//! Replies are never larger than the request they answer (the UDT4
//! handshake is echoed in place), so the listener amplifies nothing; with the
//! rate limits a flood of spoofed requests gets a bounded number of replies.
//! Each address may open at most [`Limits::max_conns_per_addr`] connections
//! in a burst, then one per [`Limits::conn_interval_us`]. Every refusal is
//! counted by reason in [`ListenerStats`]; the caller sees
//! [`ListenerOutput::Drop`] with [`DropCause::BadHandshake`].
//!
//! The listener creates no per-connection state, so it cannot count the
//! connections an address still has open: the per-address cap bounds the
//! rate at which connections are created, and the owner of the connections
//! bounds how many live ones it keeps.
//!
//! The engine routes datagrams with destination socket 0 here — except
//! handshakes from a client it already has a connection for (same address
//! and [`handshake_socket_id`]): those go to that connection, which repeats
//! its response.

use std::collections::HashMap;
use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher24;

use super::{Config, Connection, DropCause, Header, Mode, CTRL_MAX};
use crate::estimate::Time;
use crate::wire::{ControlRepr, HandshakeRepr, Packet, ReqType, SocketType};

/// Length of a cookie's time bucket; a cookie is valid in its bucket and the
/// next, so for 30 to 60 seconds.
pub const COOKIE_BUCKET_US: u64 = 30_000_000;

/// What the listener made of a datagram.
#[derive(Debug)]
pub enum ListenerOutput {
    /// Send this datagram back to the peer (cookie, or rejection).
    Reply(Header),
    /// A new connection; its handshake response is queued in it.
    Accept(Box<Connection>),
    /// Dropped (counted by the caller; the listener's reason is in
    /// [`Listener::stats`]).
    Drop(DropCause),
}

/// The client socket ID a handshake datagram carries, if it is one.
pub fn handshake_socket_id(datagram: &[u8]) -> Option<u32> {
    let pkt = Packet::new_checked(datagram).ok()?;
    match ControlRepr::parse(&pkt).ok()? {
        ControlRepr::Handshake(hs) => Some(hs.socket_id),
        _ => None,
    }
}

/// The listener's rate limits and caps. Rates are token buckets: `*_burst`
/// datagrams at once, then one per `*_interval_us` of virtual time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Handshake datagrams handled (and so replies sent) per source IP
    /// address, in a burst.
    pub replies_per_addr_burst: u32,
    /// Then one per this many microseconds.
    pub replies_per_addr_interval_us: u64,
    /// Handshake datagrams handled from all sources together, in a burst.
    pub replies_total_burst: u32,
    /// Then one per this many microseconds.
    pub replies_total_interval_us: u64,
    /// Connections one IP address may open in a burst.
    pub max_conns_per_addr: u32,
    /// Then one per this many microseconds.
    pub conn_interval_us: u64,
    /// Source addresses whose buckets are remembered; beyond this (a flood
    /// from spoofed sources) new addresses are refused until old buckets
    /// have refilled and are forgotten.
    pub max_tracked_addrs: usize,
}

impl Default for Limits {
    /// Room for a peer engine whose every core connects at once and retries
    /// every 250 ms, nothing like room for a flood.
    fn default() -> Limits {
        Limits {
            replies_per_addr_burst: 64,
            replies_per_addr_interval_us: 50_000,
            replies_total_burst: 1024,
            replies_total_interval_us: 1_000,
            max_conns_per_addr: 16,
            conn_interval_us: 1_000_000,
            max_tracked_addrs: 4096,
        }
    }
}

/// The listener's counters, refusals by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Cookies sent (answers to first requests).
    pub cookies_sent: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Rejections sent (version or socket type mismatch).
    pub rejected: u64,
    /// Not a handshake to socket 0, or not a request or response.
    pub refused_malformed: u64,
    /// A response whose cookie does not match its address, port, socket ID
    /// and the current or previous bucket.
    pub refused_bad_cookie: u64,
    /// Over the source address's rate.
    pub refused_rate_addr: u64,
    /// Over the rate of all sources together.
    pub refused_rate_total: u64,
    /// Over the address's connection cap.
    pub refused_conn_cap: u64,
    /// Too many source addresses tracked at once.
    pub refused_table_full: u64,
    /// The reply would be larger than the request.
    pub refused_amplification: u64,
}

/// A token bucket as GCRA: `tat` is the theoretical arrival time of the next
/// conforming datagram.
#[derive(Debug, Clone, Copy, Default)]
struct Gcra {
    tat: Time,
}

impl Gcra {
    fn allows(&self, now: Time, burst: u32, interval: u64) -> bool {
        let tolerance = interval.saturating_mul(u64::from(burst.saturating_sub(1)));
        self.tat <= now.saturating_add(tolerance)
    }

    fn take(&mut self, now: Time, interval: u64) {
        self.tat = self.tat.max(now).saturating_add(interval);
    }

    /// Full again: nothing to remember.
    fn idle(&self, now: Time) -> bool {
        self.tat <= now
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Source {
    replies: Gcra,
    conns: Gcra,
}

/// A UDT listener. See the module docs.
#[derive(Debug)]
pub struct Listener {
    cfg: Config,
    limits: Limits,
    key: (u64, u64),
    seed: u64,
    total: Gcra,
    sources: HashMap<IpAddr, Source>,
    last_prune: Time,
    stats: ListenerStats,
}

impl Listener {
    /// A listener whose connections use `cfg`, with its cookie key and the
    /// seeds of its connections derived from `seed`. The key then has at
    /// most the 64 bits of entropy `seed` has; give a random 128-bit key
    /// with [`Listener::with_key`].
    pub fn new(now: Time, cfg: Config, seed: u64) -> Listener {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&derive(seed, b"lu2k cookie key 0").to_le_bytes());
        key[8..].copy_from_slice(&derive(seed, b"lu2k cookie key 1").to_le_bytes());
        Listener::with_key(now, cfg, key, seed)
    }

    /// A listener whose cookies are keyed by `key` (128 bits from a CSPRNG)
    /// and whose connections' seeds come from `key` and `seed`, so they are
    /// unpredictable even where `seed` is not.
    pub fn with_key(now: Time, cfg: Config, key: [u8; 16], seed: u64) -> Listener {
        let (k0, k1) = key.split_at(8);
        Listener {
            cfg,
            limits: Limits::default(),
            key: (
                u64::from_le_bytes(k0.try_into().expect("8 bytes")),
                u64::from_le_bytes(k1.try_into().expect("8 bytes")),
            ),
            seed,
            total: Gcra::default(),
            sources: HashMap::new(),
            last_prune: now,
            stats: ListenerStats::default(),
        }
    }

    /// The same listener with other limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Listener {
        self.limits = limits;
        self
    }

    /// The limits in force, to read or change in place.
    pub fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    /// Number of connections accepted.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted
    }

    /// Counters, refusals by reason.
    pub fn stats(&self) -> &ListenerStats {
        &self.stats
    }

    /// The cookie for a client socket `socket_id` at `peer` in time bucket
    /// `bucket`: a keyed MAC truncated to the wire's 32 bits.
    fn cookie(&self, peer: SocketAddr, socket_id: u32, bucket: u64) -> u32 {
        let mut h = SipHasher24::new_with_keys(self.key.0, self.key.1);
        h.write(b"lu2k cookie");
        h.write(&peer_ip_bytes(peer.ip()));
        h.write(&peer.port().to_be_bytes());
        h.write(&socket_id.to_be_bytes());
        h.write(&bucket.to_be_bytes());
        h.finish() as u32
    }

    /// The seed of the `n`th accepted connection.
    fn conn_seed(&self, n: u64) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.key.0, self.key.1);
        h.write(b"lu2k connection seed");
        h.write(&self.seed.to_be_bytes());
        h.write(&n.to_be_bytes());
        h.finish()
    }

    /// Charges one handshake datagram from `ip` to its source's bucket and
    /// to the shared one; false (and counted) if either is empty.
    fn admit(&mut self, now: Time, ip: IpAddr) -> bool {
        let l = &self.limits;
        if !self.sources.contains_key(&ip) && self.sources.len() >= l.max_tracked_addrs {
            self.prune(now);
            if self.sources.len() >= self.limits.max_tracked_addrs {
                self.stats.refused_table_full += 1;
                return false;
            }
        }
        let l = &self.limits;
        let src = self.sources.entry(ip).or_default();
        if !src.replies.allows(
            now,
            l.replies_per_addr_burst,
            l.replies_per_addr_interval_us,
        ) {
            self.stats.refused_rate_addr += 1;
            return false;
        }
        if !self
            .total
            .allows(now, l.replies_total_burst, l.replies_total_interval_us)
        {
            self.stats.refused_rate_total += 1;
            return false;
        }
        src.replies.take(now, l.replies_per_addr_interval_us);
        self.total.take(now, l.replies_total_interval_us);
        true
    }

    /// Forgets sources whose buckets are full again, at most once per
    /// per-address interval so a spoofed flood cannot make every datagram
    /// pay for a scan of the table.
    fn prune(&mut self, now: Time) {
        if now
            < self
                .last_prune
                .saturating_add(self.limits.replies_per_addr_interval_us)
        {
            return;
        }
        self.last_prune = now;
        self.sources
            .retain(|_, s| !(s.replies.idle(now) && s.conns.idle(now)));
    }

    /// Handles one datagram addressed to socket 0 from `peer`.
    pub fn handle(&mut self, now: Time, peer: SocketAddr, datagram: &[u8]) -> ListenerOutput {
        let drop = ListenerOutput::Drop(DropCause::BadHandshake);
        let Ok(pkt) = Packet::new_checked(datagram) else {
            self.stats.refused_malformed += 1;
            return ListenerOutput::Drop(DropCause::Malformed);
        };
        if pkt.dst_socket_id() != 0 {
            self.stats.refused_malformed += 1;
            return ListenerOutput::Drop(DropCause::WrongSocket);
        }
        let Ok(ControlRepr::Handshake(hs)) = ControlRepr::parse(&pkt) else {
            self.stats.refused_malformed += 1;
            return drop;
        };
        if !matches!(hs.req_type, ReqType::Request | ReqType::Response) {
            self.stats.refused_malformed += 1;
            return drop;
        }
        // Every reply echoes the handshake: never more bytes back than came
        // in, before the address is validated.
        if ControlRepr::Handshake(hs).buffer_len() > datagram.len() {
            self.stats.refused_amplification += 1;
            return drop;
        }
        if !self.admit(now, peer.ip()) {
            return drop;
        }
        let bucket = now / COOKIE_BUCKET_US;
        match hs.req_type {
            ReqType::Request => {
                let cookie = self.cookie(peer, hs.socket_id, bucket);
                self.stats.cookies_sent += 1;
                let reply = HandshakeRepr { cookie, ..hs };
                ListenerOutput::Reply(emit(&reply, hs.socket_id))
            }
            _ => {
                let ok = hs.cookie == self.cookie(peer, hs.socket_id, bucket)
                    || (bucket > 0 && hs.cookie == self.cookie(peer, hs.socket_id, bucket - 1));
                if !ok {
                    self.stats.refused_bad_cookie += 1;
                    return drop;
                }
                let want = match self.cfg.mode {
                    Mode::Message => SocketType::Dgram,
                    Mode::Stream => SocketType::Stream,
                };
                if hs.version != HandshakeRepr::UDT4_VERSION || hs.socket_type != want {
                    self.stats.rejected += 1;
                    let reply = HandshakeRepr {
                        req_type: ReqType::Rejected,
                        ..hs
                    };
                    return ListenerOutput::Reply(emit(&reply, hs.socket_id));
                }
                let (burst, interval) =
                    (self.limits.max_conns_per_addr, self.limits.conn_interval_us);
                let src = self.sources.entry(peer.ip()).or_default();
                if !src.conns.allows(now, burst, interval) {
                    self.stats.refused_conn_cap += 1;
                    return drop;
                }
                src.conns.take(now, interval);
                self.stats.accepted += 1;
                let seed = self.conn_seed(self.stats.accepted);
                let conn = Connection::accept(now, self.cfg.clone(), seed, peer, &hs);
                ListenerOutput::Accept(Box::new(conn))
            }
        }
    }
}

/// One 64-bit value from `seed` for `label` (keyed PRF, distinct labels give
/// independent values).
fn derive(seed: u64, label: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_keys(seed, !seed);
    h.write(label);
    h.finish()
}

/// An address as 16 bytes, IPv4 mapped into IPv6, so both families hash
/// alike and unambiguously.
fn peer_ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn emit(hs: &HandshakeRepr, dst: u32) -> Header {
    let mut h = Header::new();
    let repr = ControlRepr::Handshake(*hs);
    let len = repr.buffer_len();
    debug_assert!(len <= CTRL_MAX);
    repr.emit(&mut Packet::new_unchecked(&mut h.buf_mut()[..]), 0, dst);
    h.set_len(len);
    h
}
