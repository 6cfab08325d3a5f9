//! The UDT transport: LNet messages as UDT4 messages over UDP, one connection per
//! peer and direction, through a [`DatagramIo`] provider (io_uring, epoll, or
//! virtual time in tests).
//!
//! - **TX**: a message is queued by reference on the peer's UDT connection
//!   (connecting if needed); on the wire it is `[LNet header | payload]`. Runs of
//!   equal-size data packets become one GSO send of `[UDT header, payload pieces]`
//!   from the registered TX memory. A message is [`Event::Sent`] `Ok` when the peer
//!   acknowledged all of it *and* the kernel released every zero-copy send that
//!   referenced it.
//! - **RX**: datagrams are parsed in place in the RX pool and fed to the
//!   connections, handshakes to the listener; a whole message is reported as
//!   [`Event::Received`] with the pieces of the buffers it landed in. A buffer is
//!   referenced once per datagram a connection holds in it (GRO packs several into
//!   one) and goes back to the I/O layer when the last reference is dropped.
//! - **Peers**: nothing heard from a peer with messages in flight for the
//!   peer-down timeout closes its connection (failing its messages back) and
//!   reports it down; a new connection to it reports it up. Only a datagram a
//!   connection (or the listener) took as valid counts as hearing from a peer.
//! - **Bounds**: what a stranger can make a core hold is capped. Connections per
//!   address ([`MAX_CONNS_PER_ADDR`]) and in all ([`MAX_CONNS`]), peers
//!   ([`MAX_PEERS`], and idle strangers are forgotten), control transmits waiting
//!   for the I/O layer ([`MAX_BACKLOG`]), and the RX buffers one receiving
//!   connection holds (see `relieve_rx`); a socket ID in use is never taken
//!   over. Each refusal is counted in the core's drops by reason.
//! - **Sealed wire** ([`Udt::with_security`], see [`super::seal`]): every datagram
//!   is sealed into a scratch slot of the core's TX range and sent from there, and
//!   opened in place in its RX buffer before a connection parses it; handshakes
//!   carry the PSK trailer, checked before the listener or a connection sees them.
//!   What is refused is counted as `rx_sec_*` drops and in the peer's `rejected`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lu2k_ring_abi::{Net, Nid, Pool, Region, TxStatus, WaitMode, LNET_HDR_LEN, MAX_PAYLOAD};
use lu2k_udt::conn::{
    self as udt, CloseReason, Connection, DropReason, Listener, ListenerOutput, Transmit,
};

use super::seal::{self, Keyring, Reject, Session, HS_EXT, HS_LEN, OVERHEAD, PLAIN_AT};

mod fec;
mod ml;
use super::{Event, OutMsg, RxPiece, Transport, Woken};
use crate::daemon::stats::{CoreStats, PeerStats};
use crate::io::sys::{SealScratch, SEAL_SLOT};

/// Bytes of each sealed datagram a send takes from its header slot; the rest
/// it takes from the seal scratch. 16 rather than the clear header's 11: a
/// full-size sealed datagram is a multiple of 16 bytes long and they lie back
/// to back in the scratch, so the rest of each starts 16-byte aligned, which the
/// kernel's copy into the socket buffer takes faster than an odd address.
/// Every sealed datagram is longer (at least `OVERHEAD` + a 16-byte header).
const SEG_HDR: usize = 16;
use crate::io::{DatagramIo, Event as IoEvent, Segment, SendError};
use crate::shard::ring::status_name;

/// `LNET_HDR_LEN` as the `u32` lengths of messages are.
const LNET_HDR: u32 = LNET_HDR_LEN as u32;
/// UDT data header bytes.
const UDT_HDR: usize = 16;
/// A kernel receive stamp older than this (or a clock step) is not believed.
const MAX_RX_AGE_NS: u64 = 1_000_000_000;
/// Receiving connections accepted from one peer address at a time (a gateway
/// needs one per core of the peer; the rest is a flood).
pub const MAX_CONNS_PER_ADDR: usize = 8;
/// Connections of one core in all. Our own (TX) connections are never refused:
/// kshim asked for them; accepts beyond this are.
pub const MAX_CONNS: usize = 4096;
/// Peers one core remembers. Accepts from a new address beyond this are refused.
pub const MAX_PEERS: usize = 4096;
/// Control transmits the backlog holds; one that does not fit is dropped and
/// counted (`tx_backlog_full`). Data transmits are always kept: they are bounded
/// by the connections' windows, and UDT would only send them again.
pub const MAX_BACKLOG: usize = 4096;
/// A peer with no connection, no message in flight and no message ever carried
/// is forgotten after this long without news (µs).
const PEER_FORGET_US: u64 = 60_000_000;
/// `last_heard` is refreshed at most this often (µs): checking that a datagram
/// was valid costs a look at the connection's counters.
const HEARD_GRAIN_US: u64 = 1_000;
/// A receiving connection that holds more than a largest message, delivered
/// nothing and filled no front hole for 8 RTTs, within these bounds (µs), and
/// whose ACK point lies more than a largest message past its last delivery,
/// gives back what it holds out of order, and is closed if what remains (in
/// order, unfinished) exceeds a largest message. Eight RTTs leave a head-of-line hole on a lossy GEO path time for a
/// few lost retransmissions before shedding costs the sender a window; the upper
/// bound keeps an RTT the peer inflated from postponing the check for ever.
const RX_STALL_US: (u64, u64) = (2_000_000, 30_000_000);
/// At most one log line per this long (µs) about refused plain datagrams.
const WARN_EVERY_US: u64 = 10_000_000;
/// A server connection answers its client's repeated handshake at most once
/// per this long (µs; the client repeats every 250 ms).
const HS_ANSWER_US: u64 = 200_000;

/// Settings of one core's UDT transport.
#[derive(Debug, Clone)]
pub struct Params {
    /// Core index.
    pub core: u32,
    /// The LNet network this engine serves (to name peers).
    pub net: Net,
    /// Common UDP port of lu2k nodes.
    pub port: u16,
    /// Peers at other addresses than `NID-address:port`.
    pub overrides: HashMap<IpAddr, SocketAddr>,
    /// UDT settings.
    pub udt: udt::Config,
    /// Nothing heard from a peer with messages in flight for this long: it is down.
    pub peer_down_timeout_us: u64,
    /// Seed of socket ids, sequence numbers and cookies.
    pub seed: u64,
}

#[derive(Debug)]
struct TxMsg {
    peer: IpAddr,
    /// `(offset in the TX range, len)`: the LNet header slot, then the extents.
    pieces: Vec<(u64, u32)>,
    len: u32,
    acked: bool,
    failed: Option<TxStatus>,
    sends: u32,
}

/// A transmit waiting for the I/O layer: its destination, the connection it
/// comes from (0: the listener), and the handshake trailer a listener reply
/// carries on the sealed wire.
#[derive(Debug, Clone, Copy)]
struct Queued {
    dst: SocketAddr,
    sock: u32,
    t: Transmit,
    ext: Option<[u8; HS_EXT]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Debug)]
struct ConnEntry {
    conn: Connection,
    peer: IpAddr,
    dir: Dir,
    /// Payload bytes the connection had delivered when [`ConnEntry::progress_at`]
    /// was last moved (receiving connections).
    delivered: u64,
    /// The receiver's ACK point when [`ConnEntry::progress_at`] was last moved.
    acked: u64,
    /// The receiver's ACK point when the connection last delivered something:
    /// a front message still unfinished once the ACK point is a largest
    /// message beyond it is too long, and its ACK progress no longer counts.
    acked_at_delivery: u64,
    /// When the connection last delivered something, filled a front hole
    /// (within a largest message of the last delivery) or held no more than
    /// a largest message (µs).
    progress_at: u64,
    /// The handshake's side (sealed wire only).
    hs: Hs,
    /// The connection's keys, once the handshake agreed them.
    session: Option<Box<Session>>,
    /// When a repeated client handshake was last answered (server side).
    hs_answered_at: Option<u64>,
    /// Its forward error correction codec (a FEC peer's connections).
    fec: Option<fec::ConnFec>,
}

/// A connection's part in the sealed handshake.
#[derive(Debug)]
enum Hs {
    /// The plain wire.
    None,
    /// We connect.
    Client(Box<seal::Client>),
    /// We accepted.
    Server(Box<seal::Server>),
}

impl ConnEntry {
    fn new(conn: Connection, peer: IpAddr, dir: Dir, now: u64) -> ConnEntry {
        ConnEntry {
            conn,
            peer,
            dir,
            delivered: 0,
            acked: 0,
            acked_at_delivery: 0,
            progress_at: now,
            hs: Hs::None,
            session: None,
            hs_answered_at: None,
            fec: None,
        }
    }
}

/// The sealed wire of one core: keys, the scratch sealed datagrams are written
/// to, and what was refused.
#[derive(Debug)]
struct Security {
    keys: Keyring,
    limits: seal::Limits,
    scratch: SealScratch,
    /// Scratch slots no send references.
    free: Vec<usize>,
    /// The slot of each send in flight, by token.
    slot_of: HashMap<u64, usize>,
    /// Datagrams refused since the last log line about them, and when that
    /// line was written (µs): `[0]` plain ones, `[1]` another sealed wire
    /// version's.
    plain_unlogged: [u64; 2],
    plain_logged_at: [Option<u64>; 2],
    /// Plaintext bytes the cipher sealed and opened (UDT headers and payload).
    sealed_bytes: u64,
    opened_bytes: u64,
    /// Payload bytes gathered into the scratch by a copy before sealing (a
    /// packet whose payload spans TX extents: all but its last piece; the LNet
    /// header a message's first packet gathers is not payload).
    gathered_bytes: u64,
    /// Key changes of connections that are gone, by peer.
    rekeys_gone: HashMap<IpAddr, u64>,
    /// Refusals counted for peers since forgotten, by peer and reason: a
    /// peer's counters never go backwards when it comes back.
    rejected_gone: HashMap<IpAddr, BTreeMap<String, u64>>,
    /// Where replaced keys come from (SIGHUP), and the generation `keys` is.
    shared: Option<(seal::SharedKeys, u64)>,
}

/// Datagrams a connection refused, all causes together: unchanged across
/// `handle_datagram` means the connection took the datagram as valid.
fn refused(st: &udt::Stats) -> u64 {
    st.dropped_malformed
        + st.dropped_wrong_socket
        + st.dropped_out_of_window
        + st.dropped_ack_beyond_sent
        + st.dropped_bad_loss_report
        + st.dropped_bad_handshake
        + st.dropped_wrong_state
}

#[derive(Debug)]
struct Peer {
    ip: IpAddr,
    addr: SocketAddr,
    tx_sock: Option<u32>,
    down: bool,
    /// Last time anything arrived from the peer, or work for it started (µs).
    last_heard: u64,
    /// The last error the kernel reported for sends to the peer (an errno: a failed
    /// send, or an ICMP error through `IP_RECVERR`), carried as the `detail` of the
    /// peer's failed completions.
    last_errno: Option<i32>,
    stats: PeerStats,
}

/// One core's UDT transport. See the module doc.
pub struct Udt {
    p: Params,
    io: Box<dyn DatagramIo>,
    /// Where the RX pool lies, to parse datagrams in place and to name pieces.
    region: Region,
    rx_first: u32,
    epoch: Instant,
    msgs: HashMap<u64, TxMsg>,
    sends: HashMap<u64, Vec<u64>>,
    next_send: u64,
    backlog: VecDeque<Queued>,
    rx_refs: Vec<u32>,
    /// Datagrams per RX buffer, a moving average over receive completions (1
    /// without GRO coalescing, more with it): converts free buffers to packets.
    rx_pkts_per_buf: f64,
    /// Ordered maps: the loop walks peers and connections, and a walk in the same
    /// order every run keeps a seeded simulation repeatable.
    peers: BTreeMap<IpAddr, Peer>,
    conns: BTreeMap<u32, ConnEntry>,
    /// Receiving connections by (peer address, peer socket ID): a repeated
    /// handshake finds its connection, and the per-address cap is counted,
    /// without a walk over every connection.
    rx_by_peer: BTreeMap<(IpAddr, u32), u32>,
    listener: Listener,
    seed: u64,
    /// When [`Udt::forget_peers`] looks next (µs).
    next_forget: u64,
    out: VecDeque<Event>,
    drops: BTreeMap<String, u64>,
    io_events: Vec<IoEvent>,
    /// Buffers whose references reached zero while a batch of I/O events was
    /// being handled: given back once the batch is done, if still unreferenced.
    /// A cut buffer can have more receives of it later in the same batch, which
    /// the I/O layer has lent already; given back before those are handled, it
    /// would go into the ring again while they are then held.
    rx_deferred: Option<Vec<u16>>,
    transmits: Vec<Transmit>,
    /// The TX slices of the transmits being sent, all of them in a row ...
    pieces: Vec<(u64, u32)>,
    /// ... and each transmit's span of them.
    spans: Vec<(usize, usize)>,
    /// The sealed wire; `None`: the plain UDT4 wire.
    sec: Option<Box<Security>>,
    /// The listener's cookie key, when given (the listener is rebuilt when
    /// sealing changes the MSS).
    cookie_key: Option<[u8; 16]>,
    /// Multi-link peers ([`Udt::with_links`]); `None`: every peer one link.
    ml: Option<Box<ml::MultiLink>>,
    /// Forward error correction ([`Udt::with_fec`]); `None`: no FEC peer.
    fec: Option<Box<fec::Fec>>,
    /// Peers this core sends to at most so fast, bits/s ([`Udt::with_rate_caps`]).
    rate_caps: HashMap<IpAddr, u64>,
}

impl std::fmt::Debug for Udt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Udt")
            .field("core", &self.p.core)
            .field("msgs", &self.msgs.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Udt {
    /// A transport over `io`, whose RX buffers are buffers `rx_first..` of
    /// `region`'s RX pool.
    pub fn new(p: Params, io: Box<dyn DatagramIo>, region: Region, rx_first: u32) -> Udt {
        let epoch = io.now();
        let rx_count = io.rx_count();
        Udt {
            listener: Listener::new(0, p.udt.clone(), p.seed ^ 0xA5A5),
            seed: p.seed,
            next_forget: 0,
            rx_refs: vec![0; rx_count],
            rx_pkts_per_buf: 1.0,
            p,
            io,
            region,
            rx_first,
            epoch,
            msgs: HashMap::new(),
            sends: HashMap::new(),
            next_send: 1,
            backlog: VecDeque::new(),
            peers: BTreeMap::new(),
            conns: BTreeMap::new(),
            rx_by_peer: BTreeMap::new(),
            out: VecDeque::new(),
            drops: BTreeMap::new(),
            io_events: Vec::new(),
            rx_deferred: None,
            transmits: Vec::new(),
            pieces: Vec::new(),
            spans: Vec::new(),
            sec: None,
            cookie_key: None,
            ml: None,
            fec: None,
            rate_caps: HashMap::new(),
        }
    }

    /// Caps what this core sends to each of `caps`' peers, bits/s of whole IP
    /// packets (`max_rate_mbps` of a `[[peer]]`, this core's part of it): the
    /// peer's TX connections pace no faster (`lu2k_udt::conn::Config::max_rate_bps`).
    pub fn with_rate_caps(mut self, caps: HashMap<IpAddr, u64>) -> Udt {
        self.rate_caps = caps;
        self
    }

    /// The cap of a connection to `ip` whose UDT MSS is `mss`, bits/s of UDT
    /// packets (0: none): the peer's cap less what this core adds on the wire,
    /// the seal on each packet and a FEC peer's repairs at their most, so that
    /// the datagrams that leave stay within it.
    fn rate_cap(&self, ip: IpAddr, mss: u32) -> u64 {
        let Some(&cap) = self.rate_caps.get(&ip) else {
            return 0;
        };
        let mut scale = 1.0;
        if self.sec.is_some() {
            scale *= f64::from(mss) / f64::from(mss + seal::OVERHEAD as u32);
        }
        if self.fec_peer(ip) {
            scale /= 1.0 + self.fec_max_overhead();
        }
        ((cap as f64 * scale) as u64).max(1)
    }

    /// Keys the listener's SYN cookies with `key` (from the OS random source) rather
    /// than with a key derived from the seed, which tests keep deterministic.
    pub fn with_cookie_key(mut self, key: [u8; 16]) -> Udt {
        self.cookie_key = Some(key);
        self.rebuild_listener();
        self
    }

    fn rebuild_listener(&mut self) {
        let seed = self.p.seed ^ 0xA5A5;
        self.listener = match self.cookie_key {
            Some(k) => Listener::with_key(0, self.p.udt.clone(), k, seed),
            None => Listener::new(0, self.p.udt.clone(), seed),
        };
    }

    /// Seals the wire (`security = "required"`): every datagram authenticated
    /// and encrypted with keys agreed from `keys`, written to `scratch` (the
    /// core's, from [`crate::io::sys::CoreMem::take_seal_scratch`]); plain
    /// datagrams are refused. The UDT MSS shrinks by the seal's overhead so a
    /// sealed packet is no larger than a plain one was.
    pub fn with_security(
        mut self,
        keys: Keyring,
        limits: seal::Limits,
        scratch: SealScratch,
    ) -> Udt {
        self.p.udt.mss = self.p.udt.mss.saturating_sub(OVERHEAD as u32);
        self.rebuild_listener();
        seal::seed_random();
        if keys.local.is_none() {
            tracing::warn!(
                core = self.p.core,
                "the sealed wire has no local NID address: no handshake will authenticate \
                 (set bind = this node's NID address)"
            );
        }
        let free = (0..scratch.slots()).rev().collect();
        self.sec = Some(Box::new(Security {
            keys,
            limits,
            scratch,
            free,
            slot_of: HashMap::new(),
            plain_unlogged: [0; 2],
            plain_logged_at: [None; 2],
            sealed_bytes: 0,
            opened_bytes: 0,
            gathered_bytes: 0,
            rekeys_gone: HashMap::new(),
            rejected_gone: HashMap::new(),
            shared: None,
        }));
        self
    }

    /// Takes the sealed wire's keys from `shared` from now on: a replaced set
    /// is used from the next handshake (connections keep the keys they
    /// agreed). Needs [`Udt::with_security`] first.
    pub fn with_shared_keys(mut self, shared: seal::SharedKeys) -> Udt {
        if let Some(sec) = self.sec.as_mut() {
            let (keys, generation) = shared.get();
            let local = sec.keys.local;
            sec.keys = keys;
            sec.keys.local = sec.keys.local.or(local);
            sec.shared = Some((shared, generation));
        }
        self
    }

    /// Takes a replaced key set, if there is one (before any handshake and
    /// on every timer pass). A connecting client whose key the new set no
    /// longer holds for its peer starts over with the peer's first current
    /// key: its retries would otherwise go on with a removed key (refused by
    /// peers that rotated) until the peer-down timeout, and it would still
    /// accept a reply made with that key.
    fn refresh_keys(&mut self) {
        let now = self.now_us();
        let Some(sec) = self.sec.as_mut() else {
            return;
        };
        let Some((shared, seen)) = sec.shared.as_mut() else {
            return;
        };
        let local = sec.keys.local;
        if !shared.refresh(seen, &mut sec.keys) {
            return;
        }
        sec.keys.local = sec.keys.local.or(local);
        let mut closed = 0;
        for e in self.conns.values_mut() {
            if e.session.is_some() {
                continue;
            }
            let Hs::Client(c) = &e.hs else {
                continue;
            };
            let keys = sec.keys.for_peer(e.peer);
            if c.keyed_with(keys) {
                continue;
            }
            match keys.first() {
                Some(psk) => e.hs = Hs::Client(Box::new(seal::Client::new(psk.clone(), c.ends()))),
                None => {
                    // No key left for the peer: it cannot be sealed.
                    e.conn.close(now);
                    closed += 1;
                }
            }
        }
        for _ in 0..closed {
            self.drop_one("tx_no_key");
        }
    }

    /// The wire's security mode.
    pub fn security(&self) -> seal::Mode {
        if self.sec.is_some() {
            seal::Mode::Required
        } else {
            seal::Mode::Off
        }
    }

    /// Microseconds since the transport started, on its I/O provider's clock.
    fn now_us(&self) -> u64 {
        self.io
            .now()
            .saturating_duration_since(self.epoch)
            .as_micros() as u64
    }

    fn at(&self, t: u64) -> Instant {
        self.epoch + Duration::from_micros(t)
    }

    fn drop_one(&mut self, reason: &str) {
        *self.drops.entry(reason.to_string()).or_default() += 1;
    }

    /// The I/O provider (for tests).
    pub fn io(&self) -> &dyn DatagramIo {
        self.io.as_ref()
    }
}

impl Transport for Udt {
    fn name(&self) -> &'static str {
        "udt"
    }

    fn now(&self) -> Instant {
        self.io.now()
    }

    fn handle_send(&mut self, msg: OutMsg) {
        let now = self.now_us();
        let ip = msg.peer;
        let mut pieces = Vec::with_capacity(msg.payload.len() + 1);
        pieces.push(msg.hdr);
        pieces.extend_from_slice(&msg.payload);
        let len = LNET_HDR + msg.payload_len;
        self.msgs.insert(
            msg.id,
            TxMsg {
                peer: ip,
                pieces,
                len,
                acked: false,
                failed: None,
                sends: 0,
            },
        );
        {
            let p = self.peer_for(ip);
            if p.stats.in_flight == 0 {
                // Work starts now: the peer-down clock counts from here.
                p.last_heard = p.last_heard.max(now);
            }
        }
        if let Some(queued) = self.ml_send(ip, msg.id, len, now) {
            if queued {
                self.peer_for(ip).stats.in_flight += 1;
            } else {
                self.fail_msg(msg.id, TxStatus::PeerReset);
            }
            return;
        }
        let sock = self.tx_conn(ip, now);
        let entry = self.conns.get_mut(&sock).expect("tx connection exists");
        if entry.conn.send(now, msg.id, u64::from(len), None).is_err() {
            self.fail_msg(msg.id, TxStatus::PeerReset);
        } else {
            self.peer_for(ip).stats.in_flight += 1;
        }
    }

    fn handle_return(&mut self, bufs: &[u16]) {
        for &b in bufs {
            self.unref(b);
        }
    }

    fn handle_abort_all(&mut self, status: TxStatus) {
        let mut ids: Vec<u64> = self.msgs.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.fail_msg(id, status);
        }
    }

    fn handle_timeout(&mut self) {
        self.timers();
        self.relieve_rx();
        self.conn_events();
    }

    fn poll_transmit(&mut self) -> bool {
        self.transmit()
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|e| e.conn.poll_timeout())
            .chain(self.fec_poll_timeout())
            .min()
            .map(|t| self.at(t))
    }

    fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    fn doorbell_mode(&self) -> WaitMode {
        self.io.doorbell_mode()
    }

    fn arm_doorbell(&mut self, futex_seq: u32) {
        self.io.arm_doorbell(futex_seq);
    }

    fn set_gather(&mut self, gather: Option<crate::io::Gather>) {
        self.io.set_gather(gather);
    }

    fn wait(&mut self, deadline: Option<Instant>, block: bool) -> std::io::Result<Woken> {
        let mut events = std::mem::take(&mut self.io_events);
        events.clear();
        let r = self.io.wait(deadline, block, &mut events);
        let woken = Woken {
            arrived: events.iter().any(|e| {
                matches!(
                    e,
                    IoEvent::Recv { .. } | IoEvent::RecvTruncated | IoEvent::Doorbell
                )
            }),
            // A timer alone is no work (the work it makes shows in the next pass).
            useful: events.iter().any(|e| !matches!(e, IoEvent::Timer)),
        };
        // The time after the wait: events happened during it. A datagram the
        // kernel stamped is dated by its own arrival (its age against the same
        // clock read now), so a batch reaped together keeps its spacing.
        let now = self.now_us();
        let real = if events.is_empty() {
            0
        } else {
            self.io.realtime_ns()
        };
        self.rx_deferred = Some(Vec::new());
        for ev in events.drain(..) {
            self.on_event(now, real, ev);
        }
        self.io_events = events;
        if let Some(mut back) = self.rx_deferred.take() {
            back.sort_unstable();
            back.dedup();
            for bid in back {
                if self.rx_refs.get(usize::from(bid)) == Some(&0) {
                    self.io.return_rx(bid);
                }
            }
        }
        r.map(|()| woken)
    }

    fn sends_in_flight(&self) -> usize {
        self.io.sends_in_flight()
    }

    fn close(&mut self) {
        let now = self.now_us();
        for e in self.conns.values_mut() {
            e.conn.close(now);
        }
        let _ = self.transmit();
    }

    fn stats(&mut self, s: &mut CoreStats) {
        s.io_path = self.io.path_name().to_string();
        s.io = self.io.stats();
        // Read each time: a futex doorbell can fall back to the eventfd.
        s.doorbell = match self.io.doorbell_mode() {
            WaitMode::Eventfd => "eventfd",
            WaitMode::Futex => "futex",
        }
        .into();
        for (k, v) in &self.drops {
            *s.drops.entry(k.clone()).or_default() += v;
        }
        listener_drops(self.listener.stats(), &mut s.drops);
        if let Some(sec) = &self.sec {
            s.sealed_bytes += sec.sealed_bytes;
            s.opened_bytes += sec.opened_bytes;
            // The cipher's own pass is not a copy; payload gathered before it is.
            s.payload_copied += sec.gathered_bytes;
        }
        self.fec_stats(&mut s.fec);
        self.peer_stats(&mut s.peers);
    }
}

/// The listener's refusals, as the core's drop reasons (`rx_hs_*`).
fn listener_drops(l: &udt::ListenerStats, drops: &mut BTreeMap<String, u64>) {
    for (why, n) in [
        ("rx_hs_malformed", l.refused_malformed),
        ("rx_hs_bad_cookie", l.refused_bad_cookie),
        ("rx_hs_rate_addr", l.refused_rate_addr),
        ("rx_hs_rate_total", l.refused_rate_total),
        ("rx_hs_conn_cap", l.refused_conn_cap),
        ("rx_hs_table_full", l.refused_table_full),
        ("rx_hs_amplification", l.refused_amplification),
    ] {
        if n > 0 {
            *drops.entry(why.into()).or_default() += n;
        }
    }
}

impl Udt {
    fn peer_for(&mut self, ip: IpAddr) -> &mut Peer {
        let nid = Nid::from_net_addr(self.p.net, ip);
        let port = self.p.port;
        let addr = self
            .p
            .overrides
            .get(&ip)
            .copied()
            .unwrap_or(SocketAddr::new(ip, port));
        self.peers.entry(ip).or_insert_with(|| Peer {
            ip,
            addr,
            tx_sock: None,
            down: false,
            last_heard: 0,
            last_errno: None,
            stats: PeerStats {
                nid: nid.to_string(),
                addr: addr.to_string(),
                up: true,
                ..Default::default()
            },
        })
    }

    /// The peer's TX connection, opened if there is none (or it closed).
    fn tx_conn(&mut self, ip: IpAddr, now: u64) -> u32 {
        let existing = self.peer_for(ip).tx_sock;
        if let Some(s) = existing {
            if self.conns.get(&s).is_some_and(|e| !e.conn.is_closed()) {
                return s;
            }
        }
        let addr = self.peer_for(ip).addr;
        // A socket ID in use is never replaced (that would orphan the live
        // connection and its buffers): draw another.
        let conn = loop {
            self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut cfg = self.fec_conn_config(ip);
            cfg.max_rate_bps = self.rate_cap(ip, cfg.mss);
            let c = Connection::connect(now, cfg, self.seed, addr);
            if !self.conns.contains_key(&c.socket_id()) {
                break c;
            }
            self.drop_one("tx_socket_id_collision");
        };
        let sock = conn.socket_id();
        let mut entry = ConnEntry::new(conn, ip, Dir::Tx, now);
        self.fec_attach(&mut entry);
        self.refresh_keys();
        if let Some(sec) = &self.sec {
            // The peer's first key connects (any of its keys is accepted from it).
            let ends = seal::Ends {
                initiator: sec.keys.local.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                responder: ip,
            };
            match sec.keys.for_peer(ip).first() {
                Some(psk) => {
                    entry.hs = Hs::Client(Box::new(seal::Client::new(psk.clone(), ends)));
                }
                None => {
                    // No key for this peer: the connection cannot be sealed;
                    // closed at once, it fails its messages back.
                    entry.conn.close(now);
                    self.drop_one("tx_no_key");
                }
            }
        }
        self.conns.insert(sock, entry);
        self.peer_for(ip).tx_sock = Some(sock);
        sock
    }

    fn fail_msg(&mut self, id: u64, status: TxStatus) {
        if let Some(m) = self.msgs.get_mut(&id) {
            if m.failed.is_none() && !m.acked {
                m.failed = Some(status);
            }
        }
        self.try_finish(id);
    }

    /// Writes the completion of `id` once its outcome is known and no send still
    /// references its memory.
    fn try_finish(&mut self, id: u64) {
        let Some(m) = self.msgs.get(&id) else { return };
        if m.sends > 0 || (!m.acked && m.failed.is_none()) {
            return;
        }
        let m = self.msgs.remove(&id).expect("present");
        let now = self.now_us();
        self.ml_finished(id, m.acked, now);
        let status = if m.acked {
            TxStatus::Ok
        } else {
            m.failed.unwrap_or(TxStatus::Aborted)
        };
        let mut detail = 0;
        if let Some(p) = self.peers.get_mut(&m.peer) {
            if matches!(status, TxStatus::PeerUnreachable | TxStatus::TimedOut) {
                // Why the peer could not be reached, when the kernel said.
                detail = p.last_errno.map_or(0, |e| e.unsigned_abs());
            }
            p.stats.in_flight = p.stats.in_flight.saturating_sub(1);
            if status == TxStatus::Ok {
                p.stats.msgs_tx += 1;
                p.stats.bytes_tx += u64::from(m.len - LNET_HDR);
            } else {
                *p.stats
                    .failed
                    .entry(status_name(status).into())
                    .or_default() += 1;
            }
        }
        self.out.push_back(Event::Sent { id, status, detail });
    }

    /// Remembers the kernel's last error for sends to `ip` (see [`Peer::last_errno`]).
    fn note_error(&mut self, ip: IpAddr, errno: i32) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.last_errno = Some(errno);
            p.stats.last_error = Some(std::io::Error::from_raw_os_error(errno).to_string());
            p.stats.errors += 1;
        }
    }

    /// Matches what the receiving connections take to the RX buffers free, and
    /// keeps a reserve so the packet that fills a receive hole can always land.
    ///
    /// Each received datagram holds (a share of) an RX buffer until its message is
    /// delivered whole and kshim gives it back. Under loss, packets behind a hole
    /// wait for its retransmission; if they took every buffer, the provided-buffer
    /// ring would run empty and the retransmission could never be received: a
    /// deadlock. Two measures, in this order:
    ///
    /// 1. Backpressure: each receiving connection is told the free buffers beyond
    ///    the reserve (in packets, at the measured datagrams per buffer, shared
    ///    evenly), and advertises no larger a flow window in its next full ACK.
    /// 2. Reserve: when free buffers fall below an eighth of the pool anyway (the
    ///    window is only as fresh as the last ACK, GRO packing varies, kshim holds
    ///    delivered messages), every receiving connection gives back what it holds
    ///    beyond its first hole. Nothing there is acknowledged, so the sender sends
    ///    it again; counted as `rx_shed_out_of_order`.
    ///
    /// And a quota, so that no connection can starve the others: a receiving
    /// connection may hold a fair share of the pool (at least two largest
    /// messages). Its window is capped at what its quota leaves, and one that
    /// holds more anyway (a sender may ignore the window), or holds more than a
    /// largest message without delivering anything or filling a front hole for
    /// 8 RTTs ([`RX_STALL_US`]) while its front message is already longer than a
    /// largest message, gives back what it holds out of order. What it still
    /// holds then lies before its first hole: one message begun and not ended. Longer than
    /// `MAX_PAYLOAD + LNET_HDR_LEN`, no LNet message can be that: the
    /// connection is closed (`rx_message_too_long`) and its buffers come back.
    fn relieve_rx(&mut self) {
        let reserve = (self.rx_refs.len() / 8).max(4);
        let free = self.io.rx_free();
        let receivers = self.conns.values().filter(|e| e.dir == Dir::Rx).count();
        if receivers == 0 {
            return;
        }
        let per_buf = self
            .io
            .rx_per_buf()
            .unwrap_or(self.rx_pkts_per_buf)
            .max(1.0);
        let spare = free.saturating_sub(reserve) as f64 * per_buf;
        let room = (spare / receivers as f64).min(f64::from(u32::MAX)) as u32;
        let share = (self.rx_refs.len() as f64 * per_buf / receivers as f64) as usize;
        let short = free < reserve;
        let now = self.now_us();
        let mut shed = 0u64;
        let mut too_long = 0u64;
        let mut freed = Vec::new();
        for e in self.conns.values_mut() {
            if e.dir != Dir::Rx || e.conn.is_closed() {
                continue;
            }
            let max_msg = (MAX_PAYLOAD as u64 + u64::from(LNET_HDR))
                .div_ceil(u64::from(e.conn.payload_size().max(1)))
                as usize;
            let quota = share.max(2 * max_msg);
            let held = e.conn.held();
            let left = u32::try_from(quota.saturating_sub(held)).unwrap_or(u32::MAX);
            e.conn.set_rcv_room(Some(room.min(left)));
            let mut check = short || held > quota;
            let acked = e.conn.rcv_ack_point();
            if held <= max_msg {
                e.progress_at = now;
            } else {
                // Filling the front hole is progress too: under heavy loss a
                // message's last holes can take many RTTs, and shedding what
                // lies beyond them then throws away the rest of the message,
                // so it never completes (a livelock at 15 % loss).
                let delivered = e.conn.stats().bytes_delivered;
                if delivered != e.delivered {
                    e.delivered = delivered;
                    e.acked_at_delivery = acked;
                    e.acked = acked;
                    e.progress_at = now;
                } else if acked > e.acked
                    && acked.saturating_sub(e.acked_at_delivery) <= max_msg as u64
                {
                    e.acked = acked;
                    e.progress_at = now;
                } else if now.saturating_sub(e.progress_at)
                    > (8 * u64::from(e.conn.rtt())).clamp(RX_STALL_US.0, RX_STALL_US.1)
                {
                    // Within its quota and with memory to spare, shedding only
                    // makes the sender send a window again while the hole
                    // stays: a stall alone sheds only once the front message
                    // is provably longer than any LNet message can be.
                    check = acked.saturating_sub(e.acked_at_delivery) > max_msg as u64;
                    if !check {
                        e.progress_at = now;
                    }
                }
            }
            if !check {
                continue;
            }
            shed += e.conn.shed_out_of_order(now);
            if e.conn.held() > max_msg {
                e.conn.close(now);
                too_long += 1;
            }
            e.progress_at = now;
            while let Some(ext) = e.conn.poll_release() {
                freed.push(ext.buf as u16);
            }
        }
        if shed > 0 {
            *self
                .drops
                .entry("rx_shed_out_of_order".to_string())
                .or_default() += shed;
        }
        if too_long > 0 {
            *self
                .drops
                .entry("rx_message_too_long".to_string())
                .or_default() += too_long;
        }
        for b in freed {
            self.unref(b);
        }
    }

    fn unref(&mut self, bid: u16) {
        if let Some(r) = self.rx_refs.get_mut(bid as usize) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.return_rx(bid);
            }
        }
    }

    /// Sends queued transmits and whatever the connections want to send now.
    fn transmit(&mut self) -> bool {
        let now = self.now_us();
        // Repairs first: they are due a group-time after their data.
        let mut any = self.fec.is_some() && self.fec_flush();
        // Backlog first (transmits taken from connections that the I/O could not
        // take): a run of consecutive ones to one destination goes out as one send
        // (the rest of a batch the I/O layer refused is one such run).
        while let Some(&Queued { dst, sock, ext, .. }) = self.backlog.front() {
            self.transmits.clear();
            while self.transmits.len() < crate::io::MAX_SEGS {
                match self.backlog.front() {
                    // A transmit with a trailer of its own goes alone.
                    Some(q)
                        if q.dst == dst
                            && q.sock == sock
                            && (self.transmits.is_empty() || q.ext.is_none()) =>
                    {
                        self.transmits.push(q.t);
                        self.backlog.pop_front();
                        if ext.is_some() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let mut start = 0;
            while start < self.transmits.len() {
                let k = self.send_run(dst, sock, start, ext);
                if k == 0 {
                    // Back in front, in order.
                    for t in self.transmits[start..].iter().rev() {
                        self.backlog.push_front(Queued {
                            dst,
                            sock,
                            t: *t,
                            ext,
                        });
                    }
                    return any;
                }
                start += k;
                any = true;
            }
        }
        let socks: Vec<u32> = self.conns.keys().copied().collect();
        let sealed = self.sec.is_some();
        for s in socks {
            loop {
                self.transmits.clear();
                let (dst, n) = {
                    let Some(e) = self.conns.get_mut(&s) else {
                        break;
                    };
                    let dst = e.conn.peer_addr();
                    // No more than one GSO send takes (44 full 1500-byte packets,
                    // not 64 that would go out as 44 + 20; sealed, as they will be).
                    let seal = if sealed { OVERHEAD } else { 0 };
                    let wire = seal + lu2k_udt::wire::HEADER_LEN + e.conn.payload_size() as usize;
                    let max =
                        (crate::io::MAX_GSO_BYTES / wire.max(1)).clamp(1, crate::io::MAX_SEGS);
                    (
                        dst,
                        e.conn.poll_transmit_batch(now, &mut self.transmits, max),
                    )
                };
                if n == 0 {
                    break;
                }
                any = true;
                let mut start = 0;
                while start < self.transmits.len() {
                    let k = self.send_run(dst, s, start, None);
                    if k == 0 {
                        for i in start..self.transmits.len() {
                            let t = self.transmits[i];
                            self.push_backlog_from(dst, s, t, None);
                        }
                        return any;
                    }
                    start += k;
                }
            }
        }
        if self.fec.is_some() {
            any |= self.fec_flush();
        }
        any
    }

    /// Maps the payload of every transmit in `self.transmits[start..]` onto TX
    /// memory: `self.pieces[a..b]` for the transmit's span `(a, b)` in
    /// `self.spans`.
    fn map_run(&mut self, start: usize) {
        self.pieces.clear();
        self.spans.clear();
        let mut unmapped = 0u64;
        // A run is mostly one message's packets: look it up once.
        let mut cached: Option<(u64, &TxMsg)> = None;
        for t in &self.transmits[start..] {
            let a = self.pieces.len();
            if let Some(p) = t.payload {
                let m = match cached {
                    Some((id, m)) if id == p.msg => Some(m),
                    _ => {
                        let m = self.msgs.get(&p.msg);
                        cached = m.map(|m| (p.msg, m));
                        m
                    }
                };
                // A message already failed back: its memory is kshim's again; the
                // packet goes out as a bare header and the peer drops it as malformed.
                if let Some(m) = m {
                    if !map_pieces(&m.pieces, p.offset, p.len, &mut self.pieces) {
                        unmapped += 1;
                    }
                }
            }
            self.spans.push((a, self.pieces.len()));
        }
        if unmapped > 0 {
            *self.drops.entry("tx_payload_unmapped".into()).or_default() += unmapped;
        }
    }

    /// Sends a prefix of `self.transmits[start..]` (all to `dst`, from
    /// connection `sock`, 0 for the listener, whose one reply may carry a
    /// handshake trailer `ext`) as one send; returns how many it took (0: the
    /// I/O layer is busy).
    fn send_run(
        &mut self,
        dst: SocketAddr,
        sock: u32,
        start: usize,
        ext: Option<[u8; HS_EXT]>,
    ) -> usize {
        if self.sec.is_some() {
            return self.send_sealed(dst, sock, start, ext);
        }
        self.map_run(start);
        let ext = self.ml_headers(sock, start).unwrap_or_default();
        let segs: Vec<Segment<'_>> = self.transmits[start..]
            .iter()
            .zip(self.spans.iter())
            .enumerate()
            .map(|(i, (t, &(a, b)))| {
                let (first, more) = match self.pieces[a..b].split_first() {
                    Some((f, more)) => (*f, more),
                    None => ((0, 0), &[][..]),
                };
                Segment {
                    hdr: match ext.get(i) {
                        Some(Some(h)) => &h[..],
                        _ => t.header.as_bytes(),
                    },
                    payload_off: first.0,
                    payload_len: first.1,
                    more,
                }
            })
            .collect();
        let k = self.io.fit(&segs).clamp(1, segs.len());
        let token = self.next_send;
        match self.io.send(dst, &segs[..k], token) {
            Ok(()) => {
                self.sent(token, start, k);
                self.fec_sent(sock, start, k);
                if self.ml.is_some()
                    && self.transmits[start..start + k]
                        .iter()
                        .any(|t| t.payload.is_some())
                {
                    let now = self.now_us();
                    self.ml_sent(sock, now);
                }
                k
            }
            Err(SendError::Busy) => 0,
            Err(e) => {
                self.send_refused(&e);
                // Drop these transmits: UDT retransmits what is lost.
                k
            }
        }
    }

    /// Notes send `token` of `self.transmits[start..start + k]`: the messages
    /// whose memory it references.
    fn sent(&mut self, token: u64, start: usize, k: usize) {
        self.next_send += 1;
        let mut ids: Vec<u64> = self.transmits[start..start + k]
            .iter()
            .filter_map(|t| t.payload.map(|p| p.msg))
            .collect();
        ids.dedup();
        for id in &ids {
            if let Some(m) = self.msgs.get_mut(id) {
                m.sends += 1;
            }
        }
        self.sends.insert(token, ids);
    }

    fn send_refused(&mut self, e: &SendError) {
        self.drop_one(match e {
            SendError::OutOfPool => "tx_out_of_pool",
            SendError::HeaderTooLong => "tx_header_too_long",
            _ => "tx_bad_batch",
        });
    }

    /// [`Udt::send_run`] on the sealed wire: each datagram sealed into a scratch
    /// slot (the cipher reads the payload where it lies in TX memory and
    /// writes the ciphertext there: its pass is the only one over the payload,
    /// except for a packet whose payload spans pieces, whose pieces before the
    /// last are gathered by a copy, counted), then sent from the slot. A
    /// transmit that cannot be sealed (its connection has no keys yet) is
    /// dropped and counted; UDT sends again what matters.
    fn send_sealed(
        &mut self,
        dst: SocketAddr,
        sock: u32,
        start: usize,
        ext: Option<[u8; HS_EXT]>,
    ) -> usize {
        let now = self.now_us();
        self.map_run(start);
        // What each datagram will be, by size, before anything is sealed: a
        // counter is spent only on a datagram that is sent.
        let mut lens = Vec::with_capacity(self.transmits.len() - start);
        let mut total = 0;
        {
            let e = self.conns.get(&sock);
            for (i, t) in self.transmits[start..].iter().enumerate() {
                let h = t.header.as_bytes();
                let len = if is_handshake(h) {
                    let has_ext = match e.map(|e| &e.hs) {
                        Some(Hs::Client(_) | Hs::Server(_)) => true,
                        _ => ext.is_some() && sock == 0,
                    };
                    (has_ext && h.len() == HS_LEN).then_some(HS_LEN + HS_EXT)
                } else {
                    let (a, b) = self.spans[i];
                    let pay: usize = self.pieces[a..b].iter().map(|p| p.1 as usize).sum();
                    e.and_then(|e| e.session.as_ref())
                        .map(|_| OVERHEAD + h.len() + pay)
                };
                match len {
                    Some(l) if total + l <= SEAL_SLOT => {
                        total += l;
                        lens.push(l);
                    }
                    Some(_) => break,
                    None if lens.is_empty() => {
                        self.drop_one("tx_unsealed");
                        return 1;
                    }
                    None => break,
                }
            }
        }
        let Some(slot) = self.sec.as_mut().and_then(|s| s.free.pop()) else {
            return 0;
        };
        let base = self
            .sec
            .as_ref()
            .expect("sealed wire")
            .scratch
            .slot_off(slot);
        // Each datagram's first 16 bytes go as its header (a send's iovecs start
        // with a header, which must not be empty), the rest from the slot.
        fn segs_for<'a>(lens: &[usize], base: u64, hdrs: &'a [[u8; SEG_HDR]]) -> Vec<Segment<'a>> {
            let mut at = 0u64;
            lens.iter()
                .zip(hdrs)
                .map(|(&l, h)| {
                    let s = Segment {
                        hdr: &h[..],
                        payload_off: base + at + SEG_HDR as u64,
                        payload_len: (l - SEG_HDR) as u32,
                        more: &[],
                    };
                    at += l as u64;
                    s
                })
                .collect()
        }
        let blank = vec![[0u8; SEG_HDR]; lens.len()];
        let k = self
            .io
            .fit(&segs_for(&lens, base, &blank))
            .clamp(1, lens.len());
        let mut hdrs = blank;
        let ok = self.seal_into(now, sock, start, k, slot, ext, &mut hdrs[..k]);
        let token = self.next_send;
        let r = if ok {
            self.io.send(dst, &segs_for(&lens, base, &hdrs[..k]), token)
        } else {
            Err(SendError::OutOfPool)
        };
        let sec = self.sec.as_mut().expect("sealed wire");
        match r {
            Ok(()) => {
                sec.slot_of.insert(token, slot);
                self.sent(token, start, k);
                self.fec_sent(sock, start, k);
                k
            }
            Err(SendError::Busy) => {
                // Sealed for nothing: the counters are spent, the packets
                // count as lost and are sent again.
                sec.free.push(slot);
                0
            }
            Err(e) => {
                sec.free.push(slot);
                self.send_refused(&e);
                k
            }
        }
    }

    /// Seals `self.transmits[start..start + k]` (from `sock`) into scratch slot
    /// `slot`, one after the other, as [`Udt::send_sealed`] sized them; the
    /// first [`SEG_HDR`] bytes of each also into `hdrs`.
    #[allow(clippy::too_many_arguments)]
    fn seal_into(
        &mut self,
        now: u64,
        sock: u32,
        start: usize,
        k: usize,
        slot: usize,
        ext: Option<[u8; HS_EXT]>,
        hdrs: &mut [[u8; SEG_HDR]],
    ) -> bool {
        let Some(sec) = self.sec.as_mut() else {
            return false;
        };
        let Some((out, tx)) = sec.scratch.slot(slot) else {
            return false;
        };
        let mut e = self.conns.get_mut(&sock);
        let mut at = 0;
        let mut head: Vec<&[u8]> = Vec::with_capacity(4);
        for (i, t) in self.transmits[start..start + k].iter().enumerate() {
            let h = t.header.as_bytes();
            if is_handshake(h) {
                let tr = match e.as_ref().map(|e| &e.hs) {
                    Some(Hs::Client(c)) => c.trailer(h),
                    Some(Hs::Server(s)) => s.trailer(h),
                    _ => match ext {
                        Some(x) => x,
                        None => return false,
                    },
                };
                out[at..at + HS_LEN].copy_from_slice(h);
                out[at + HS_LEN..at + HS_LEN + HS_EXT].copy_from_slice(&tr);
                hdrs[i].copy_from_slice(&out[at..at + SEG_HDR]);
                at += HS_LEN + HS_EXT;
                continue;
            }
            let Some(session) = e.as_mut().and_then(|e| e.session.as_mut()) else {
                return false;
            };
            let (a, b) = self.spans[i];
            let pieces = &self.pieces[a..b];
            head.clear();
            head.push(h);
            let mut tail: &[u8] = &[];
            let mut gathered = 0u32;
            for (j, &(off, len)) in pieces.iter().enumerate() {
                let Some(bytes) = tx.bytes(off, len) else {
                    return false;
                };
                if j + 1 == pieces.len() {
                    tail = bytes;
                } else {
                    gathered += len;
                    head.push(bytes);
                }
            }
            // The LNet header (the message's first bytes, which the engine
            // wrote) is not payload: a message's first packet gathers it.
            let lnet_hdr = t
                .payload
                .map_or(0, |p| LNET_HDR.saturating_sub(p.offset).min(p.len));
            sec.gathered_bytes += u64::from(gathered.saturating_sub(lnet_hdr));
            let Some(n) = session.seal(now, &head, tail, &mut out[at..]) else {
                return false;
            };
            sec.sealed_bytes += (n - OVERHEAD) as u64;
            hdrs[i].copy_from_slice(&out[at..at + SEG_HDR]);
            at += n;
        }
        true
    }

    fn on_event(&mut self, now: u64, real_ns: u64, ev: IoEvent) {
        match ev {
            IoEvent::SendDone { token, result, .. } => {
                if result.is_err() {
                    self.drop_one("send_error");
                }
                if let Some(sec) = self.sec.as_mut() {
                    if let Some(slot) = sec.slot_of.remove(&token) {
                        sec.free.push(slot);
                    }
                }
                self.fec_send_done(token);
                if let Some(ids) = self.sends.remove(&token) {
                    for id in ids {
                        if let Some(m) = self.msgs.get_mut(&id) {
                            m.sends = m.sends.saturating_sub(1);
                            if let Err(errno) = result {
                                let peer = m.peer;
                                self.note_error(peer, errno);
                            }
                        }
                        self.try_finish(id);
                    }
                }
            }
            IoEvent::Recv {
                from,
                bid,
                off,
                len,
                seg,
                stamp_ns,
            } => {
                let age_us =
                    stamp_ns.map_or(0, |t| real_ns.saturating_sub(t).min(MAX_RX_AGE_NS) / 1000);
                self.on_recv(now.saturating_sub(age_us), from, bid, off, len, seg);
                if self.fec.is_some() {
                    self.fec_deliver(now);
                }
            }
            IoEvent::RecvTruncated => self.drop_one("rx_truncated"),
            IoEvent::RxStarved => self.drop_one("rx_no_buffer"),
            IoEvent::SocketError { errno, dst } => {
                self.drop_one("icmp_error");
                if let Some(dst) = dst {
                    self.note_error(dst.ip(), errno);
                }
            }
            IoEvent::Doorbell | IoEvent::Timer => {}
        }
    }

    fn on_recv(&mut self, now: u64, from: SocketAddr, bid: u16, off: u32, len: u32, seg: u32) {
        let Some(buf_off) = self
            .region
            .layout()
            .rx_buffer(self.rx_first + u32::from(bid))
            .map(|b| b.0)
        else {
            return;
        };
        let seg = seg.max(1);
        let n = f64::from(len.div_ceil(seg).max(1));
        self.rx_pkts_per_buf += (n - self.rx_pkts_per_buf) / 64.0;
        let mut pos = off;
        while pos < off + len {
            let dlen = seg.min(off + len - pos);
            let next = pos + dlen;
            // A multi-link peer's first packet sheds its extension here.
            let Some((at, dlen)) = self.ml_strip(from, bid, pos, dlen) else {
                pos = next;
                continue;
            };
            let ext = lu2k_ring_abi::Extent::new(Pool::Rx, buf_off + u64::from(at), dlen);
            // The connection parses the datagram in place in the RX pool.
            let region = self.region.clone();
            let held = if self.sec.is_some() {
                self.on_sealed(now, from, bid, buf_off, at, dlen)
            } else {
                match region.pool_bytes(&ext) {
                    Ok(bytes) => self.on_datagram(now, from, bid, at, dlen, bytes),
                    Err(_) => false,
                }
            };
            if held {
                self.rx_refs[bid as usize] += 1;
            }
            pos = next;
        }
        if self.rx_refs[bid as usize] == 0 {
            self.return_rx(bid);
        }
    }

    /// Gives buffer `bid` back to the I/O layer: now, or at the end of the batch
    /// of I/O events being handled (see `rx_deferred`).
    fn return_rx(&mut self, bid: u16) {
        match &mut self.rx_deferred {
            Some(back) => back.push(bid),
            None => self.io.return_rx(bid),
        }
    }

    fn on_datagram(
        &mut self,
        now: u64,
        from: SocketAddr,
        bid: u16,
        at: u32,
        dlen: u32,
        bytes: &[u8],
    ) -> bool {
        if bytes.len() < UDT_HDR {
            self.drop_one("rx_malformed");
            return false;
        }
        // A multi-link peer's addresses are all the peer.
        let ip = self.ml_canonical(from.ip());
        // `last_heard` moves only for what a connection or the listener took as
        // valid (see `feed`, and the accept below): junk from a dead peer's
        // address must not hide its death.
        let dst = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let ext = udt::Extent {
            buf: u64::from(bid),
            offset: at,
            len: dlen,
        };
        if dst == 0 {
            // A handshake to the listener, or a client repeating its request.
            let hs_id = udt::handshake_socket_id(bytes);
            if let Some(id) = hs_id {
                if let Some(&sock) = self.rx_by_peer.get(&(ip, id)) {
                    if self.conns.get(&sock).is_some_and(|e| !e.conn.is_closed()) {
                        return self.feed(now, sock, bytes, ext);
                    }
                }
            }
            match self.listener.handle(now, from, bytes) {
                ListenerOutput::Reply(h) => self.push_backlog(
                    from,
                    Transmit {
                        header: h,
                        payload: None,
                    },
                ),
                ListenerOutput::Accept(conn) => self.accept(now, ip, *conn),
                ListenerOutput::Drop(_) => self.drop_one("rx_bad_handshake"),
            }
            return false;
        }
        match self.conns.get(&dst) {
            Some(e) if e.peer == ip => self.feed(now, dst, bytes, ext),
            Some(_) => {
                self.drop_one("rx_spoofed_source");
                false
            }
            None => {
                self.drop_one("rx_unknown_socket");
                false
            }
        }
    }

    /// A datagram on the sealed wire (`dlen` bytes at `at` of RX buffer `bid`,
    /// which lies at `buf_off` of the RX pool): a sealed packet is opened in
    /// place and its plaintext handed to its connection; a handshake is
    /// checked against the PSK before the listener or a connection sees it;
    /// anything else is refused. Returns whether a connection holds the
    /// datagram's payload.
    fn on_sealed(
        &mut self,
        now: u64,
        from: SocketAddr,
        bid: u16,
        buf_off: u64,
        at: u32,
        dlen: u32,
    ) -> bool {
        let ip = from.ip();
        let (sealed, hs, dst) = match self.io.rx_bytes(bid, at, dlen) {
            Some(b) => (
                seal::is_sealed(b),
                seal::split_hs(b).map(|(_, k, _)| k),
                if seal::is_sealed(b) {
                    seal::sealed_dst(b)
                } else {
                    seal::dst_socket(b)
                },
            ),
            None => return false,
        };
        let region = self.region.clone();
        let inner = |off: u32, len: u32| {
            let ext = lu2k_ring_abi::Extent::new(Pool::Rx, buf_off + u64::from(off), len);
            region.pool_bytes(&ext).ok()
        };
        if sealed {
            let dst = dst.unwrap_or(0);
            let reason = match self.conns.get(&dst) {
                None => Some("unknown_connection"),
                Some(e) if e.peer != ip => Some("unknown_connection"),
                Some(e) if e.session.is_none() => Some("unvalidated_address"),
                Some(_) => None,
            };
            if let Some(r) = reason {
                self.reject(ip, r);
                return false;
            }
            let opened = {
                let e = self.conns.get_mut(&dst).expect("checked above");
                let session = e.session.as_mut().expect("checked above");
                match self.io.rx_bytes_mut(bid, at, dlen) {
                    Some(b) => session.open(now, b),
                    None => Err(Reject::Malformed),
                }
            };
            match opened {
                Ok(()) => {
                    let (off, len) = (at + PLAIN_AT as u32, dlen - OVERHEAD as u32);
                    if let Some(sec) = self.sec.as_mut() {
                        sec.opened_bytes += u64::from(len);
                    }
                    let Some(bytes) = inner(off, len) else {
                        return false;
                    };
                    let ext = udt::Extent {
                        buf: u64::from(bid),
                        offset: off,
                        len,
                    };
                    return self.feed(now, dst, bytes, ext);
                }
                Err(Reject::BadTag) => self.reject(ip, "bad_tag"),
                Err(Reject::Replay) => self.reject(ip, "replay"),
                Err(Reject::Malformed) => self.reject(ip, "malformed"),
            }
            return false;
        }
        let Some(client_key) = hs else {
            let other = self
                .io
                .rx_bytes(bid, at, dlen)
                .and_then(seal::other_version);
            if other.is_some() {
                self.reject(ip, "wire_version");
            } else {
                self.reject(ip, "plain_refused");
            }
            self.log_plain(now, from, other);
            return false;
        };
        let Some(d) = inner(at, dlen) else {
            return false;
        };
        let hs_ext = udt::Extent {
            buf: u64::from(bid),
            offset: at,
            len: HS_LEN as u32,
        };
        let limits = self.sec.as_ref().expect("sealed wire").limits;
        if dst != Some(0) {
            // A reply to one of our connections: the listener's cookie or the
            // server's keys.
            let dst = dst.unwrap_or(0);
            let got = match self.conns.get_mut(&dst) {
                Some(e) if e.peer == ip => match &mut e.hs {
                    Hs::Client(c) => c.on_reply(d, now, limits),
                    _ => None,
                },
                _ => None,
            };
            match got {
                None => {
                    self.reject(ip, "bad_handshake");
                    return false;
                }
                Some(seal::ClientGot::Server(Some(session))) => {
                    if let Some(e) = self.conns.get_mut(&dst) {
                        e.session = Some(session);
                    }
                }
                Some(_) => {}
            }
            return self.feed(now, dst, &d[..HS_LEN], hs_ext);
        }
        // To the listener, or a client repeating its handshake: authentic
        // only as one from its source to this node.
        self.refresh_keys();
        let sec = self.sec.as_ref().expect("sealed wire");
        let local = sec.keys.local.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let ends = seal::Ends {
            initiator: ip,
            responder: local,
        };
        let hs_bytes = &d[..HS_LEN];
        // A repeat is checked against the key its connection was accepted
        // with, which a key reload since may have removed from the set.
        let repeat = match udt::handshake_socket_id(hs_bytes) {
            Some(id) if ip != local => self.rx_by_peer.get(&(ip, id)).copied(),
            _ => None,
        };
        if let Some(sock) = repeat {
            let keys = sec.keys.for_peer(ip);
            if let Some(e) = self.conns.get_mut(&sock).filter(|e| !e.conn.is_closed()) {
                if !matches!(&e.hs, Hs::Server(s) if s.same_client(d)) {
                    // The client started over under another key (a key
                    // reload at its end) before our reply reached it: while
                    // nothing sealed of it opened here, the new handshake
                    // replaces the connection; otherwise it is refused.
                    let opened = e.session.as_ref().is_some_and(|s| s.has_opened());
                    if opened || seal::check_client_hs(keys, ends, d).is_none() {
                        self.reject(ip, "bad_handshake");
                        return false;
                    }
                    e.conn.close(now);
                    self.rx_by_peer
                        .remove(&(ip, udt::handshake_socket_id(hs_bytes).unwrap_or(0)));
                    self.drop_one("rx_hs_restarted");
                } else {
                    // The client repeats its request while our reply is lost.
                    // Once a sealed datagram of the client opened, it has the
                    // keys: a repetition is a replay. Before, one answer per
                    // retry interval; never news of the peer (anyone can
                    // replay a handshake it saw, only the peer can seal).
                    let opened = e.session.as_ref().is_some_and(|s| s.has_opened());
                    let recent = e
                        .hs_answered_at
                        .is_some_and(|t| now.saturating_sub(t) < HS_ANSWER_US);
                    if opened || recent {
                        self.reject(ip, "replayed_handshake");
                        return false;
                    }
                    e.hs_answered_at = Some(now);
                    return e.conn.handle_datagram(now, hs_bytes, hs_ext);
                }
            }
        }
        let sec = self.sec.as_ref().expect("sealed wire");
        let keys = sec.keys.for_peer(ip);
        let checked = if ip == local {
            None
        } else {
            seal::check_client_hs(keys, ends, d)
        };
        let Some((k, _)) = checked else {
            // One of this node's own handshakes coming back (it authenticates
            // the other way round), or a forgery.
            let own = ip == local || seal::check_client_hs(keys, ends.swapped(), d).is_some();
            let why = if own {
                "reflected_handshake"
            } else {
                "bad_handshake"
            };
            self.reject(ip, why);
            return false;
        };
        let psk = keys[k].clone();
        // The key of one of this node's own connecting clients: its own
        // handshake, whoever relayed it.
        if self
            .conns
            .values()
            .any(|e| matches!(&e.hs, Hs::Client(c) if c.public() == client_key))
        {
            self.reject(ip, "reflected_handshake");
            return false;
        }
        let bad_cookies = self.listener.stats().refused_bad_cookie;
        match self.listener.handle(now, from, hs_bytes) {
            ListenerOutput::Reply(h) => {
                let ext = seal::listener_trailer(&psk, ends, h.as_bytes(), &client_key);
                self.push_backlog_from(
                    from,
                    0,
                    Transmit {
                        header: h,
                        payload: None,
                    },
                    Some(ext),
                );
            }
            ListenerOutput::Accept(conn) => {
                let sock = conn.socket_id();
                let fresh = !self.conns.contains_key(&sock);
                self.accept(now, ip, *conn);
                let ok = fresh && self.conns.contains_key(&sock);
                if ok {
                    match seal::Server::accept(psk, ends, client_key, now, limits) {
                        Some((srv, session)) => {
                            let e = self.conns.get_mut(&sock).expect("accepted");
                            e.hs = Hs::Server(Box::new(srv));
                            e.session = Some(session);
                        }
                        None => {
                            // Not a valid X25519 key: no keys, no connection.
                            if let Some(e) = self.conns.get_mut(&sock) {
                                e.conn.close(now);
                            }
                            self.reject(ip, "bad_handshake");
                        }
                    }
                }
            }
            ListenerOutput::Drop(_) => {
                self.drop_one("rx_bad_handshake");
                // A cookie that does not match: the address is not proven. The
                // rest is the listener's rate limits and caps.
                let why = if self.listener.stats().refused_bad_cookie > bad_cookies {
                    "unvalidated_address"
                } else {
                    "handshake_refused"
                };
                self.reject(ip, why);
            }
        }
        false
    }

    /// Counts a datagram the sealed wire refused: in the core's drops
    /// (`rx_sec_<why>`), and in its peer's counters when the address is a
    /// peer's (a stranger gets no state for it).
    fn reject(&mut self, ip: IpAddr, why: &'static str) {
        *self.drops.entry(format!("rx_sec_{why}")).or_default() += 1;
        if let Some(p) = self.peers.get_mut(&ip) {
            *p.stats.rejected.entry(why.to_string()).or_default() += 1;
        }
    }

    /// One log line per [`WARN_EVERY_US`] at most about plain datagrams
    /// refused, and one about another sealed wire version's (each its own
    /// limit, so a flood of one does not hide the other).
    fn log_plain(&mut self, now: u64, from: SocketAddr, other_version: Option<u8>) {
        let core = self.p.core;
        let Some(sec) = self.sec.as_mut() else {
            return;
        };
        let k = usize::from(other_version.is_some());
        sec.plain_unlogged[k] += 1;
        if sec.plain_logged_at[k].is_some_and(|t| now.saturating_sub(t) < WARN_EVERY_US) {
            return;
        }
        match other_version {
            Some(v) => tracing::warn!(
                core,
                from = %from,
                refused = sec.plain_unlogged[k],
                "refusing datagrams of sealed wire version {v}: this engine speaks version {} \
                 (the two share no keys; run the same lu2k release on both gateways)",
                seal::WIRE_VERSION
            ),
            None => tracing::warn!(
                core,
                from = %from,
                refused = sec.plain_unlogged[k],
                "refusing plain UDT datagrams: security = \"required\" accepts only the sealed wire \
                 (give the peer the PSK and security = \"required\", or set security = \"off\" on both)"
            ),
        }
        sec.plain_unlogged[k] = 0;
        sec.plain_logged_at[k] = Some(now);
    }

    /// Takes a connection the listener accepted, unless it would replace a live
    /// one or exceed the caps (each refusal counted; the client may try again
    /// and gets a fresh socket ID).
    fn accept(&mut self, now: u64, ip: IpAddr, conn: Connection) {
        let sock = conn.socket_id();
        let refusal = if self.conns.contains_key(&sock) {
            Some("rx_socket_id_collision")
        } else if self.conns.len() >= MAX_CONNS {
            Some("rx_conn_limit")
        } else if self
            .rx_by_peer
            .range((ip, 0)..=(ip, u32::MAX))
            .filter(|(_, s)| self.conns.get(s).is_some_and(|e| !e.conn.is_closed()))
            .count()
            >= MAX_CONNS_PER_ADDR
        {
            Some("rx_conn_limit_addr")
        } else if !self.peers.contains_key(&ip) && self.peers.len() >= MAX_PEERS {
            Some("rx_peer_limit")
        } else {
            None
        };
        if let Some(r) = refusal {
            self.drop_one(r);
            return;
        }
        // A response with a valid cookie: the address answered us. On the
        // sealed wire only a datagram that opens is news of the peer (a
        // handshake can be a replay).
        let sealed = self.sec.is_some();
        let p = self.peer_for(ip);
        if !sealed {
            p.last_heard = p.last_heard.max(now);
        }
        self.rx_by_peer.insert((ip, conn.peer_socket_id()), sock);
        let mut entry = ConnEntry::new(conn, ip, Dir::Rx, now);
        self.fec_attach(&mut entry);
        self.conns.insert(sock, entry);
        self.ml_accepted(sock, ip, now);
    }

    /// Hands a datagram to connection `sock` (which exists); refreshes its peer's
    /// `last_heard` if the connection took the datagram as valid (no refusal
    /// counted). Returns whether the connection holds the datagram's payload.
    fn feed(&mut self, now: u64, sock: u32, bytes: &[u8], ext: udt::Extent) -> bool {
        if self.fec.is_some() {
            if let Some(held) = self.fec_recv(now, sock, bytes, ext) {
                return held;
            }
        }
        let Some(e) = self.conns.get_mut(&sock) else {
            return false;
        };
        let ip = e.peer;
        let stale = self
            .peers
            .get(&ip)
            .is_some_and(|p| now.saturating_sub(p.last_heard) >= HEARD_GRAIN_US)
            || self.ml_stale(sock, now, HEARD_GRAIN_US);
        let Some(e) = self.conns.get_mut(&sock) else {
            return false;
        };
        if !stale {
            return e.conn.handle_datagram(now, bytes, ext);
        }
        let before = (!e.conn.is_closed()).then(|| refused(&e.conn.stats()));
        let held = e.conn.handle_datagram(now, bytes, ext);
        if before.is_some_and(|b| refused(&e.conn.stats()) == b) {
            if let Some(p) = self.peers.get_mut(&ip) {
                p.last_heard = p.last_heard.max(now);
            }
            self.ml_heard(sock, now);
        }
        held
    }

    /// Queues a transmit the I/O layer could not take. A control transmit that
    /// does not fit is dropped and counted; data is always kept (see
    /// [`MAX_BACKLOG`]).
    fn push_backlog(&mut self, dst: SocketAddr, t: Transmit) {
        self.push_backlog_from(dst, 0, t, None);
    }

    /// [`Udt::push_backlog`] of a transmit from connection `sock` (0: the
    /// listener), with the trailer of a sealed listener reply.
    fn push_backlog_from(
        &mut self,
        dst: SocketAddr,
        sock: u32,
        t: Transmit,
        ext: Option<[u8; HS_EXT]>,
    ) {
        if t.payload.is_none() && self.backlog.len() >= MAX_BACKLOG {
            self.drop_one("tx_backlog_full");
            return;
        }
        self.backlog.push_back(Queued { dst, sock, t, ext });
    }

    fn timers(&mut self) {
        self.refresh_keys();
        let now = self.now_us();
        self.ml_timers(now);
        // Peer-down: nothing heard for the configured timeout while messages wait.
        let limit = self.p.peer_down_timeout_us;
        let mut down = Vec::new();
        for p in self.peers.values_mut() {
            if p.stats.in_flight > 0 && now.saturating_sub(p.last_heard) > limit {
                if let Some(s) = p.tx_sock {
                    down.push((p.ip, s));
                }
                p.last_heard = now;
            }
        }
        for (ip, s) in down {
            if let Some(e) = self.conns.get_mut(&s) {
                // Closing fails every queued message back (MessageDropped).
                e.conn.close(now);
            }
            let p = self.peer_for(ip);
            if !p.down {
                p.down = true;
                p.stats.up = false;
                self.out.push_back(Event::PeerDown(ip));
            }
        }
        for e in self.conns.values_mut() {
            if e.conn.poll_timeout().is_some_and(|t| t <= now) {
                e.conn.handle_timeout(now);
            }
        }
        if self.fec.is_some() {
            self.fec_timers(now);
        }
    }

    fn conn_events(&mut self) {
        let socks: Vec<u32> = self.conns.keys().copied().collect();
        for s in socks {
            loop {
                let (ev, peer, dir) = {
                    let Some(e) = self.conns.get_mut(&s) else {
                        break;
                    };
                    if let Some(ext) = e.conn.poll_release() {
                        let b = ext.buf as u16;
                        self.unref(b);
                        continue;
                    }
                    match e.conn.poll_event() {
                        Some(ev) => (ev, e.peer, e.dir),
                        None => break,
                    }
                };
                match ev {
                    udt::Event::Connected => {
                        self.ml_connected(s, self.now_us());
                        let p = self.peer_for(peer);
                        if p.down {
                            p.down = false;
                            p.stats.up = true;
                            self.out.push_back(Event::PeerUp(peer));
                        }
                    }
                    udt::Event::MessageAcked { msg } if self.ml_moved(s, msg) => {}
                    udt::Event::MessageAcked { msg } => {
                        if let Some(m) = self.msgs.get_mut(&msg) {
                            m.acked = true;
                        }
                        self.try_finish(msg);
                    }
                    udt::Event::MessageDropped { msg, .. }
                        if self.ml_dropped(s, msg, self.now_us()) => {}
                    udt::Event::MessageDropped { msg, reason } => {
                        let status = match reason {
                            DropReason::Ttl => TxStatus::TimedOut,
                            DropReason::Closed => TxStatus::PeerUnreachable,
                        };
                        self.fail_msg(msg, status);
                    }
                    udt::Event::MessageReceived { msg_no, extents }
                        if self.ml_duplicate(s, msg_no) =>
                    {
                        // Delivered before over another link: UDT acknowledged
                        // it, the sender completes it once.
                        self.drop_one("rx_dup_message");
                        for e in &extents {
                            self.unref(e.buf as u16);
                        }
                    }
                    udt::Event::MessageReceived { extents, .. } => self.received(peer, &extents),
                    udt::Event::StreamData(ext) => {
                        self.drop_one("rx_stream_data");
                        self.unref(ext.buf as u16);
                    }
                    udt::Event::Closed { reason } if self.ml_closed(s, reason, self.now_us()) => {}
                    udt::Event::Closed { reason } => {
                        if dir == Dir::Tx
                            && matches!(reason, CloseReason::Timeout | CloseReason::ConnectTimeout)
                        {
                            let p = self.peer_for(peer);
                            if !p.down {
                                p.down = true;
                                p.stats.up = false;
                                self.out.push_back(Event::PeerDown(peer));
                            }
                        }
                    }
                }
            }
        }
        // A closed connection goes once its events are taken (above) and its
        // buffers are back: a closed connection's are given back at closing,
        // but the sweep does not rely on its `Closed` event being seen here.
        let closed: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.is_closed() && e.conn.held() == 0)
            .map(|(&s, _)| s)
            .collect();
        for s in closed {
            self.ml_forget(s);
            if let Some(mut e) = self.conns.remove(&s) {
                self.fec_release(&mut e);
                let key = (e.peer, e.conn.peer_socket_id());
                if e.dir == Dir::Rx && self.rx_by_peer.get(&key) == Some(&s) {
                    self.rx_by_peer.remove(&key);
                }
                if let Some(p) = self.peers.get_mut(&e.peer) {
                    if p.tx_sock == Some(s) {
                        p.tx_sock = None;
                    }
                    let st = e.conn.stats();
                    p.stats.retransmissions += st.pkts_retransmitted;
                    p.stats.outages += st.outages;
                    p.stats.outage_probes += st.outage_probes;
                    p.stats.outage_us += st.outage_us;
                    p.stats.tail_probes += st.tail_probes;
                }
                if let (Some(sec), Some(session)) = (self.sec.as_mut(), &e.session) {
                    *sec.rekeys_gone.entry(e.peer).or_default() += session.rekeys;
                }
            }
        }
        self.forget_peers();
    }

    /// Forgets, at most once a second, the peers that have no connection, no
    /// message in flight, nothing carried or failed, and were not heard from
    /// for [`PEER_FORGET_US`]: what a stranger's handshakes leave behind.
    fn forget_peers(&mut self) {
        let now = self.now_us();
        if now < self.next_forget {
            return;
        }
        self.next_forget = now + 1_000_000;
        let live: std::collections::BTreeSet<IpAddr> =
            self.conns.values().map(|e| e.peer).collect();
        let mut gone = self.sec.as_mut().map(|s| &mut s.rejected_gone);
        self.peers.retain(|ip, p| {
            let s = &p.stats;
            let keep = live.contains(ip)
                || p.tx_sock.is_some()
                || p.down
                || s.in_flight > 0
                || s.msgs_tx > 0
                || s.msgs_rx > 0
                || s.errors > 0
                || !s.failed.is_empty()
                || now.saturating_sub(p.last_heard) < PEER_FORGET_US;
            if let Some(g) = gone.as_mut().filter(|_| !keep && !s.rejected.is_empty()) {
                let m = g.entry(*ip).or_default();
                for (why, n) in &s.rejected {
                    *m.entry(why.clone()).or_default() += n;
                }
            }
            keep
        });
    }

    /// Reports a whole received message: the buffer pieces it landed in, one
    /// buffer reference per piece. One longer than any LNet message can be is
    /// garbage: its buffers go back at once (`rx_message_too_long`).
    fn received(&mut self, peer: IpAddr, extents: &[udt::Extent]) {
        let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
        if total > MAX_PAYLOAD as u64 + u64::from(LNET_HDR) {
            self.drop_one("rx_message_too_long");
            for e in extents {
                self.unref(e.buf as u16);
            }
            return;
        }
        if total >= u64::from(LNET_HDR) {
            let p = self.peer_for(peer);
            p.stats.msgs_rx += 1;
            p.stats.bytes_rx += total - u64::from(LNET_HDR);
        }
        let pieces = extents
            .iter()
            .map(|e| RxPiece {
                bid: e.buf as u16,
                off: e.offset,
                len: e.len,
            })
            .collect();
        let bufs = extents.iter().map(|e| e.buf as u16).collect();
        self.out.push_back(Event::Received { peer, pieces, bufs });
    }

    /// Per-peer counters, with what the connections measure now.
    fn peer_stats(&mut self, out: &mut Vec<PeerStats>) {
        let mode = self.security().name();
        for p in self.peers.values_mut() {
            let mut rtt = 0;
            let mut rate = 0;
            let mut retx = 0;
            let mut outages = (0, 0, 0, 0);
            let mut rekeys = self
                .sec
                .as_ref()
                .and_then(|s| s.rekeys_gone.get(&p.ip).copied())
                .unwrap_or(0);
            for e in self.conns.values() {
                if e.peer == p.ip {
                    rekeys += e.session.as_ref().map_or(0, |s| s.rekeys);
                    let st = e.conn.stats();
                    // Measured round trips only (unmeasured, a connection
                    // answers UDT's default guess): the sending connection's,
                    // else, where the node only receives from the peer, the
                    // receiving one's, from its ACKs' ACK2s. The core's spin and
                    // gathering read it (0: not measured).
                    if e.conn.rtt_measured() && (e.dir == Dir::Tx || rtt == 0) {
                        rtt = e.conn.rtt();
                    }
                    if e.dir == Dir::Tx {
                        rate = if st.period_us > 0.0 {
                            (f64::from(e.conn.payload_size()) * 8.0 * 1e6 / st.period_us) as u64
                        } else {
                            0
                        };
                    }
                    retx += st.pkts_retransmitted;
                    outages.0 += st.outages;
                    outages.1 += st.outage_probes;
                    outages.2 += st.outage_us;
                    outages.3 += st.tail_probes;
                }
            }
            p.stats.rtt_us = u64::from(rtt);
            p.stats.rate_bps = rate;
            p.stats.security = mode.to_string();
            p.stats.rekeys = rekeys;
            let mut ps = p.stats.clone();
            if let Some(g) = self.sec.as_ref().and_then(|s| s.rejected_gone.get(&p.ip)) {
                for (why, n) in g {
                    *ps.rejected.entry(why.clone()).or_default() += n;
                }
            }
            ps.links = ml::link_stats(self.ml.as_deref(), &self.conns, p.ip);
            ps.retransmissions += retx;
            ps.outages += outages.0;
            ps.outage_probes += outages.1;
            ps.outage_us += outages.2;
            ps.tail_probes += outages.3;
            out.push(ps);
        }
    }
}

/// Whether a UDT header is a handshake's (control type 0).
fn is_handshake(h: &[u8]) -> bool {
    h.len() >= 2 && h[0] == 0x80 && h[1] == 0x00
}

/// Appends to `out` the slices of TX memory that hold `[offset, offset + len)` of
/// a message whose bytes lie in `pieces`, in order; `false` if part of the range
/// lies beyond them.
fn map_pieces(pieces: &[(u64, u32)], offset: u32, len: u32, out: &mut Vec<(u64, u32)>) -> bool {
    let mut want_off = offset;
    let mut want = len;
    let mut acc = 0u32;
    for &(off, plen) in pieces {
        if want == 0 {
            break;
        }
        if want_off >= acc + plen {
            acc += plen;
            continue;
        }
        let inner = want_off - acc;
        let take = (plen - inner).min(want);
        out.push((off + u64::from(inner), take));
        want -= take;
        want_off += take;
        acc += plen;
    }
    want == 0
}

#[cfg(test)]
mod tests {
    //! What only the inside shows: socket-ID collisions (two transports with the
    //! same seed draw the same IDs, so one can be made to collide) and the
    //! backlog's bound; and that kshim's TX pool rule holds the controller's
    //! window (this crate sees both). The rest is in `tests/udt_bounds.rs`.

    use lu2k_udt::conn::PayloadRef;

    use super::*;
    use std::net::SocketAddrV4;

    use crate::io::sim::{Datagram, SimClock, SimIo, SimPort};

    const PORT: u16 = 7988;
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn udt(seed: u64) -> (Udt, SimPort, SimClock) {
        let (region, mem) = crate::io::sim::small_core();
        let clock = SimClock::new();
        let (io, port) = SimIo::new(SocketAddrV4::new(SERVER, PORT), mem.clone(), clock.clone());
        let net = format!("{SERVER}@tcp").parse::<Nid>().expect("nid").net();
        let t = Udt::new(
            Params {
                core: 0,
                net,
                port: PORT,
                overrides: HashMap::new(),
                udt: udt::Config {
                    rcv_buf_pkts: Some(2048),
                    ..Default::default()
                },
                peer_down_timeout_us: 10_000_000,
                seed,
            },
            Box::new(io),
            region,
            mem.rx_first,
        );
        (t, port, clock)
    }

    /// Runs a handshake of a client (seeded `seed`, at `from`) against `t`
    /// for a second of virtual time (its handshake is repeated every 250 ms);
    /// whether the client got connected.
    fn handshake(
        t: &mut Udt,
        port: &SimPort,
        clock: &SimClock,
        from: SocketAddrV4,
        seed: u64,
    ) -> bool {
        let to = SocketAddrV4::new(SERVER, PORT);
        let mut c = Connection::connect(0, udt::Config::default(), seed, SocketAddr::V4(to));
        for _ in 0..1000 {
            let now = clock.elapsed().as_micros() as u64;
            if c.poll_timeout().is_some_and(|d| d <= now) {
                c.handle_timeout(now);
            }
            while let Some(x) = c.poll_transmit(now) {
                port.deliver(Datagram {
                    from,
                    to,
                    bytes: x.header.as_bytes().to_vec(),
                });
            }
            t.wait(None, false).expect("wait");
            t.handle_timeout();
            while t.poll_transmit() {}
            for d in port.take_sent() {
                let at = udt::Extent {
                    buf: 0,
                    offset: 0,
                    len: d.bytes.len() as u32,
                };
                let _ = c.handle_datagram(now, &d.bytes, at);
            }
            clock.advance_to(clock.now() + Duration::from_millis(1));
        }
        c.is_connected()
    }

    fn drops(t: &Udt, reason: &str) -> u64 {
        t.drops.get(reason).copied().unwrap_or(0)
    }

    fn dummy(peer: Ipv4Addr) -> ConnEntry {
        let to = SocketAddr::V4(SocketAddrV4::new(peer, PORT));
        let c = Connection::connect(0, udt::Config::default(), 99, to);
        ConnEntry::new(c, peer.into(), Dir::Rx, 0)
    }

    /// kshim sizes a sender's TX pool to the satellite controller's window
    /// (`lu2k_ring_abi::tx_pool`): a smaller pool would cap the window.
    #[test]
    fn the_tx_pool_rule_holds_the_controllers_window() {
        assert_eq!(
            lu2k_ring_abi::tx_pool::WINDOW_BDPS,
            lu2k_udt::cc::WINDOW_BDPS
        );
    }

    #[test]
    fn an_accepted_connection_never_replaces_a_live_one() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 5000);
        // Which socket ID the listener gives first ...
        let (mut a, pa, ca) = udt(42);
        assert!(handshake(&mut a, &pa, &ca, from, 7));
        let sock = *a.conns.keys().next().expect("accepted");
        // ... is taken in a twin by a live connection of another peer.
        let (mut b, pb, cb) = udt(42);
        let other = Ipv4Addr::new(10, 0, 0, 3);
        b.conns.insert(sock, dummy(other));
        let connected = handshake(&mut b, &pb, &cb, from, 7);
        assert!(drops(&b, "rx_socket_id_collision") >= 1);
        assert!(connected, "the client's repeated response got another ID");
        assert_eq!(
            b.conns[&sock].peer, other,
            "the live connection was replaced"
        );
        assert_eq!(b.conns.len(), 2);
    }

    #[test]
    fn our_own_connection_draws_another_socket_id() {
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let msg = |id| OutMsg {
            id,
            peer,
            hdr: (0, LNET_HDR),
            payload: vec![(4096, 100)],
            payload_len: 100,
        };
        let (mut a, _pa, _ca) = udt(42);
        a.handle_send(msg(1));
        let sock = a.peers[&peer].tx_sock.expect("tx connection");
        let (mut b, _pb, _cb) = udt(42);
        let other = Ipv4Addr::new(10, 0, 0, 3);
        b.conns.insert(sock, dummy(other));
        b.handle_send(msg(1));
        let mine = b.peers[&peer].tx_sock.expect("tx connection");
        assert_ne!(mine, sock);
        assert_eq!(
            b.conns[&sock].peer, other,
            "the live connection was replaced"
        );
        assert_eq!(drops(&b, "tx_socket_id_collision"), 1);
    }

    #[test]
    fn the_backlog_drops_control_beyond_its_bound_and_keeps_data() {
        let (mut a, _pa, _ca) = udt(42);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), PORT);
        let mut c = Connection::connect(0, udt::Config::default(), 1, SocketAddr::V4(dst));
        let ctrl = c.poll_transmit(0).expect("handshake request");
        for _ in 0..MAX_BACKLOG + 5 {
            a.push_backlog(dst.into(), ctrl);
        }
        assert_eq!(a.backlog.len(), MAX_BACKLOG);
        assert_eq!(drops(&a, "tx_backlog_full"), 5);
        let data = Transmit {
            payload: Some(PayloadRef {
                msg: 1,
                offset: 0,
                len: 100,
            }),
            ..ctrl
        };
        a.push_backlog(dst.into(), data);
        assert_eq!(a.backlog.len(), MAX_BACKLOG + 1, "data dropped");
    }
}
