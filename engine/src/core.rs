//! One core thread: its ring set in the region, its UDP socket, the UDT connections
//! of the peers the shard function gives it, and the loop that moves messages.
//!
//! # The loop
//!
//! 1. Take TX descriptors in batches, validate each private copy (a bad one is
//!    answered at once with an `InvalidDescriptor` completion), copy its 72-byte LNet
//!    header into a message-header slot of the engine's registered memory, and queue
//!    the message by reference on the peer's UDT connection (connecting if needed).
//!    On the wire a message is `[LNet header | payload]`.
//! 2. Take buffer returns (RX return ring) and give buffers whose last reference went
//!    back to the kernel.
//! 3. Send what the connections want to send: runs of equal-size data packets become
//!    one GSO send of [UDT header, payload pieces] from the registered TX memory.
//! 4. Wait for I/O (without blocking while there is work; after a spin of no work —
//!    `spin_us` to `spin_max_us`, adapted to the traffic by [`crate::spin`] —
//!    arm the doorbell through the ring-abi need-wakeup protocol and sleep in the I/O
//!    layer until a doorbell, a datagram, a completion or the next UDT timer).
//! 5. Feed received datagrams (parsed in place in the RX pool) to the connections,
//!    handshakes to the listener; publish RX descriptors whose extents point at the
//!    payload where it landed; write a TX completion when the peer acknowledged the
//!    whole message *and* the kernel released every zero-copy send that referenced it.
//!
//! Every message ends exactly one way: `Ok` on acknowledgement, or a failure status
//! (peer unreachable / timed out / reset, invalid descriptor, shutdown).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lu2k_ring_abi::{
    EngineCore, Extent, ExtentBuf, Pool, Region, RxDesc, TxCompletion, TxDesc, TxStatus,
};
use lu2k_udt::conn::{
    self as udt, CloseReason, Connection, DropReason, Listener, ListenerOutput, Transmit,
};

use crate::io::{DatagramIo, Event, Segment, SendError};
use crate::spin::{Pass, Spin};
use crate::stats::{CoreStats, PeerStats, Published};
use crate::sys::{self, CoreMem, MSG_HDR_SLOT};

/// LNet header bytes at the start of every message on the wire.
const LNET_HDR: u32 = 72;
/// UDT data header bytes.
const UDT_HDR: usize = 16;
/// Descriptors taken per batch.
const TX_BATCH: u32 = 64;
/// How often a core publishes its statistics.
const STATS_EVERY: Duration = Duration::from_millis(100);
/// A kernel receive stamp older than this (or a clock step) is not believed.
const MAX_RX_AGE_NS: u64 = 1_000_000_000;

/// What a core tells the daemon (forwarded to kshim as NOTICEs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The peer stopped answering for the peer-down timeout.
    PeerDown(u64),
    /// The peer answers again.
    PeerUp(u64),
}

/// Settings of one core.
#[derive(Debug, Clone)]
pub struct CoreParams {
    /// Core index.
    pub core: u32,
    /// Number of cores.
    pub cores: u32,
    /// The local network (`net` part of NIDs) used to name peers.
    pub net: u32,
    /// Common UDP port of lu2k nodes.
    pub port: u16,
    /// Peers at other addresses than `NID-address:port`.
    pub overrides: HashMap<Ipv4Addr, SocketAddrV4>,
    /// UDT settings.
    pub udt: udt::Config,
    /// Spin before sleeping, at least (see [`crate::spin`]).
    pub spin: Duration,
    /// Spin before sleeping, at most.
    pub spin_max: Duration,
    /// Message-header slots (= most messages in flight on this core).
    pub msg_slots: u32,
    /// How long shutdown waits for in-flight messages before failing them back.
    pub drain_timeout: Duration,
    /// Nothing heard from a peer with messages in flight for this long: it is down.
    pub peer_down_timeout_us: u64,
}

#[derive(Debug)]
struct TxMsg {
    cookie: u64,
    peer: Ipv4Addr,
    slot: u32,
    /// `(offset in the TX range, len)`: the LNet header slot, then the extents.
    pieces: Vec<(u64, u32)>,
    len: u32,
    acked: bool,
    failed: Option<TxStatus>,
    sends: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Debug)]
struct ConnEntry {
    conn: Connection,
    peer: Ipv4Addr,
    dir: Dir,
}

#[derive(Debug)]
struct Peer {
    ip: Ipv4Addr,
    nid: u64,
    addr: SocketAddrV4,
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

#[derive(Debug)]
struct RxMsg {
    bids: Vec<u16>,
    table: Option<u32>,
}

/// One core. Built by the daemon, run on its own thread by [`CoreLoop::run`].
pub struct CoreLoop {
    p: CoreParams,
    region: Region,
    ec: EngineCore,
    io: Box<dyn DatagramIo>,
    mem: Arc<CoreMem>,
    epoch: Instant,
    scratch: ExtentBuf,
    msg_free: Vec<u32>,
    msgs: HashMap<u64, TxMsg>,
    next_msg: u64,
    sends: HashMap<u64, Vec<u64>>,
    next_send: u64,
    backlog: VecDeque<(SocketAddrV4, Transmit)>,
    rx_refs: Vec<u32>,
    /// Datagrams per RX buffer, a moving average over receive completions (1
    /// without GRO coalescing, more with it): converts free buffers to packets.
    rx_pkts_per_buf: f64,
    rx_msgs: HashMap<u64, RxMsg>,
    next_token: u64,
    rx_pending: VecDeque<RxDesc>,
    rx_waiting: VecDeque<(Ipv4Addr, Vec<udt::Extent>)>,
    rx_tables_free: Vec<u32>,
    rx_tables_base: u64,
    peers: HashMap<Ipv4Addr, Peer>,
    conns: HashMap<u32, ConnEntry>,
    listener: Listener,
    seed: u64,
    stats: CoreStats,
    published: Published,
    notices: Sender<Notice>,
    draining: Arc<AtomicBool>,
    events: Vec<Event>,
    transmits: Vec<Transmit>,
    pieces: Vec<[(u64, u32); 3]>,
    notify: bool,
}

impl std::fmt::Debug for CoreLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreLoop")
            .field("core", &self.p.core)
            .field("msgs", &self.msgs.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// How `io` sleeps on kshim's doorbell, for the stats.
fn doorbell_name(io: &dyn DatagramIo) -> &'static str {
    match io.doorbell_mode() {
        lu2k_ring_abi::WaitMode::Eventfd => "eventfd",
        lu2k_ring_abi::WaitMode::Futex => "futex",
    }
}

fn status_name(s: TxStatus) -> &'static str {
    match s {
        TxStatus::Ok => "ok",
        TxStatus::PeerUnreachable => "peer_unreachable",
        TxStatus::TimedOut => "timed_out",
        TxStatus::Aborted => "aborted",
        TxStatus::InvalidDescriptor => "invalid_descriptor",
        TxStatus::NoResources => "no_resources",
        TxStatus::EngineGone => "engine_gone",
        TxStatus::PeerReset => "peer_reset",
        TxStatus::Shutdown => "shutdown",
    }
}

impl CoreLoop {
    /// Assembles a core from its parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: CoreParams,
        region: Region,
        ec: EngineCore,
        io: Box<dyn DatagramIo>,
        mem: Arc<CoreMem>,
        published: Published,
        notices: Sender<Notice>,
        draining: Arc<AtomicBool>,
    ) -> CoreLoop {
        let layout = region.layout();
        let (tables_pool_off, _) = layout.pool(Pool::RxTables);
        let entry = *layout.core(p.core).expect("core exists in the region");
        let seed = 0x5EED_0000_0000_0000
            ^ (u64::from(p.core) << 32)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let epoch = Instant::now();
        let stats = CoreStats {
            core: p.core as usize,
            io_path: io.path_name().to_string(),
            ..Default::default()
        };
        CoreLoop {
            listener: Listener::new(0, p.udt.clone(), seed ^ 0xA5A5),
            msg_free: (0..mem.msg_hdr_slots.min(p.msg_slots)).rev().collect(),
            rx_refs: vec![0; mem.rx.count as usize],
            rx_pkts_per_buf: 1.0,
            rx_tables_free: (0..entry.rx_tables).rev().collect(),
            rx_tables_base: entry.rx_tables_off - tables_pool_off,
            p,
            region,
            ec,
            io,
            mem,
            epoch,
            scratch: ExtentBuf::new(),
            msgs: HashMap::new(),
            next_msg: 1,
            sends: HashMap::new(),
            next_send: 1,
            backlog: VecDeque::new(),
            rx_msgs: HashMap::new(),
            next_token: 1,
            rx_pending: VecDeque::new(),
            rx_waiting: VecDeque::new(),
            peers: HashMap::new(),
            conns: HashMap::new(),
            seed,
            stats,
            published,
            notices,
            draining,
            events: Vec::new(),
            transmits: Vec::new(),
            pieces: Vec::new(),
            notify: false,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn at(&self, t: u64) -> Instant {
        self.epoch + Duration::from_micros(t)
    }

    /// Runs until shutdown completes (or kshim's rings break).
    pub fn run(mut self) {
        let mut last_stats = Instant::now();
        let mut spin = Spin::new(self.p.spin, self.p.spin_max, Instant::now());
        // Without a connection timer a sleep still ends within 200 ms, at an instant
        // kept until it passes: a new one each pass would update the armed timer,
        // whose update completes at once and ends the sleep (a core with no
        // connection then looped through empty sleeps, ~2 million a second).
        let mut fallback_wake = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        // What the core runs with is readable at once, before any traffic.
        self.publish_stats();
        loop {
            let draining = self.draining.load(Ordering::Relaxed);
            if draining && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + self.p.drain_timeout);
            }
            // kshim's rings, then the core's own work (`|`: all of them run).
            let ring = self.take_tx(draining) | self.take_returns();
            let rx = self.flush_rx_pending();
            let sent = self.transmit();
            let work = ring | rx | sent;
            if let Some(d) = drain_deadline {
                let past = Instant::now() >= d;
                if past {
                    self.fail_all(TxStatus::Shutdown);
                }
                // Done when every message has its completion, no send references TX
                // memory, and kshim gave back the RX buffers it holds (or time is up).
                let rx_home = self.rx_msgs.is_empty()
                    && self.rx_waiting.is_empty()
                    && self.rx_pending.is_empty();
                if self.msgs.is_empty() && self.io.sends_in_flight() == 0 && (rx_home || past) {
                    self.close_all();
                    self.flush_notify();
                    break;
                }
            }
            let deadline = self.next_deadline().map(|t| self.at(t));
            self.events.clear();
            let mut events = std::mem::take(&mut self.events);
            let idle = !work && spin.spun_out(Instant::now()) && self.backlog.is_empty();
            let asleep = idle && drain_deadline.is_none();
            let mut rang = false;
            let res = if asleep {
                self.flush_notify();
                self.stats.sleeps += 1;
                let now = Instant::now();
                if fallback_wake <= now {
                    fallback_wake = now + Duration::from_millis(200);
                }
                let wake = deadline.unwrap_or(fallback_wake);
                let CoreLoop { ec, io, .. } = &mut self;
                let EngineCore {
                    tx,
                    rx_return,
                    wait,
                    ..
                } = ec;
                let mut r = Ok(());
                let mode = io.doorbell_mode();
                // Before the need-wakeup bits go up: a ring after this read moves the
                // word, and a futex wait on this value then ends at once.
                let futex_seq = wait.futex_seq();
                let _ = wait.wait(mode, Some(Duration::ZERO), || {
                    let ring_work =
                        !tx.is_empty().unwrap_or(true) || !rx_return.is_empty().unwrap_or(true);
                    rang = ring_work;
                    if !ring_work {
                        io.arm_doorbell(futex_seq);
                        r = io.wait(Some(wake), true, &mut events);
                    }
                    true
                });
                r
            } else {
                let d = if drain_deadline.is_some() {
                    Some(Instant::now() + Duration::from_millis(1))
                } else {
                    deadline
                };
                self.io
                    .wait(d, drain_deadline.is_some() && !work, &mut events)
            };
            if let Err(e) = res {
                eprintln!("lu2k-engine core {}: I/O wait failed: {e}", self.p.core);
                self.stats.drop_one("io_error");
            }
            // A timer alone is no work (the work it makes shows in the next pass).
            let useful = events.iter().any(|e| !matches!(e, Event::Timer));
            let arrived = ring
                || rang
                || events.iter().any(|e| {
                    matches!(
                        e,
                        Event::Recv { .. } | Event::RecvTruncated | Event::Doorbell
                    )
                });
            if !useful && !work && !idle {
                spin.relax();
            }
            // The time after the wait: events happened during it. A datagram the
            // kernel stamped is dated by its own arrival (its age against the same
            // clock read now), so a batch reaped together keeps its spacing.
            let now = self.now();
            let real = if events.is_empty() {
                0
            } else {
                sys::realtime_ns()
            };
            for ev in events.drain(..) {
                self.on_event(now, real, ev);
            }
            self.events = events;
            self.timers();
            self.relieve_rx();
            self.conn_events();
            spin.pass(
                Instant::now(),
                Pass {
                    arrived,
                    busy: work || useful,
                    spoke: sent || self.notify,
                },
            );
            self.flush_notify();
            if last_stats.elapsed() >= STATS_EVERY {
                self.publish_stats();
                last_stats = Instant::now();
            }
        }
        self.publish_stats();
    }

    fn flush_notify(&mut self) {
        if self.notify {
            self.notify = false;
            let _ = self.ec.to_kshim.notify();
        }
    }

    fn complete(&mut self, cookie: u64, status: TxStatus, detail: u32) {
        if !push_completion(&mut self.ec, self.p.core, cookie, status, detail) {
            return;
        }
        self.stats.tx_completions += 1;
        if status != TxStatus::Ok {
            *self
                .stats
                .drops
                .entry(format!("tx_{}", status_name(status)))
                .or_default() += 1;
        }
        self.notify = true;
    }

    fn peer_for(&mut self, ip: Ipv4Addr) -> &mut Peer {
        let net = self.p.net;
        let port = self.p.port;
        let addr = self
            .p
            .overrides
            .get(&ip)
            .copied()
            .unwrap_or(SocketAddrV4::new(ip, port));
        self.peers.entry(ip).or_insert_with(|| Peer {
            ip,
            nid: (u64::from(net) << 32) | u64::from(u32::from(ip)),
            addr,
            tx_sock: None,
            down: false,
            last_heard: 0,
            last_errno: None,
            stats: PeerStats {
                nid: lu2k_kshim::Nid((u64::from(net) << 32) | u64::from(u32::from(ip))).to_string(),
                addr: addr.to_string(),
                up: true,
                ..Default::default()
            },
        })
    }

    fn take_tx(&mut self, draining: bool) -> bool {
        let n = match self.ec.tx.peek(TX_BATCH) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("lu2k-engine core {}: TX ring broken: {e}", self.p.core);
                return false;
            }
        };
        let mut taken = 0;
        for i in 0..n {
            if !draining && self.msg_free.is_empty() {
                break; // no message slot: leave the rest in the ring (backpressure)
            }
            let d: TxDesc = self.ec.tx.read(i);
            taken += 1;
            self.stats.tx_descs += 1;
            self.on_tx_desc(&d, draining);
        }
        self.ec.tx.release(taken);
        taken > 0
    }

    fn on_tx_desc(&mut self, d: &TxDesc, draining: bool) {
        let now = self.now();
        let (cookie, peer_nid, hdr, extents): (u64, u64, [u8; 72], Vec<Extent>) =
            match self.region.validate_tx(d, &mut self.scratch) {
                Ok(v) => (v.cookie, v.peer_nid, v.hdr, v.extents.to_vec()),
                Err(e) => {
                    self.stats.drop_one("tx_invalid_descriptor");
                    let c = TxCompletion::invalid(d.cookie, &e);
                    self.complete(c.cookie, TxStatus::InvalidDescriptor, c.detail);
                    return;
                }
            };
        if draining {
            self.complete(cookie, TxStatus::Shutdown, 0);
            return;
        }
        let ip = Ipv4Addr::from(peer_nid as u32);
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            self.complete(cookie, TxStatus::PeerUnreachable, 0);
            return;
        }
        if (peer_nid >> 32) as u32 != self.p.net {
            // A NID on another LNet network than the one this engine serves: its
            // address means nothing here (see the warning at start-up).
            self.stats.drop_one("tx_other_network");
            self.complete(cookie, TxStatus::PeerUnreachable, 0);
            return;
        }
        let Some(slot) = self.msg_free.pop() else {
            self.complete(cookie, TxStatus::NoResources, 0);
            return;
        };
        self.mem.write_msg_hdr(slot, &hdr);
        let mut pieces = Vec::with_capacity(extents.len() + 1);
        pieces.push((
            (self.mem.msg_hdr_off + slot as usize * MSG_HDR_SLOT) as u64,
            LNET_HDR,
        ));
        let base = self.mem.pool_off as u64;
        for e in &extents {
            let off = base + e.offset;
            // Coalesce extents that are adjacent in the pool.
            let n = pieces.len();
            match pieces.last_mut() {
                Some(last) if n > 1 && last.0 + u64::from(last.1) == off => last.1 += e.len,
                _ => pieces.push((off, e.len)),
            }
        }
        let len = LNET_HDR + d.total_len;
        let id = self.next_msg;
        self.next_msg += 1;
        self.msgs.insert(
            id,
            TxMsg {
                cookie,
                peer: ip,
                slot,
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
        let sock = self.tx_conn(ip, now);
        let entry = self.conns.get_mut(&sock).expect("tx connection exists");
        if entry.conn.send(now, id, u64::from(len), None).is_err() {
            self.fail_msg(id, TxStatus::PeerReset);
        } else {
            self.peer_for(ip).stats.in_flight += 1;
        }
    }

    /// The peer's TX connection, opened if there is none (or it closed).
    fn tx_conn(&mut self, ip: Ipv4Addr, now: u64) -> u32 {
        let existing = self.peer_for(ip).tx_sock;
        if let Some(s) = existing {
            if self.conns.get(&s).is_some_and(|e| !e.conn.is_closed()) {
                return s;
            }
        }
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let addr = self.peer_for(ip).addr;
        let conn = Connection::connect(now, self.p.udt.clone(), self.seed, SocketAddr::V4(addr));
        let sock = conn.socket_id();
        self.conns.insert(
            sock,
            ConnEntry {
                conn,
                peer: ip,
                dir: Dir::Tx,
            },
        );
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
        self.msg_free.push(m.slot);
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
        self.complete(m.cookie, status, detail);
    }

    /// Remembers the kernel's last error for sends to `ip` (see [`Peer::last_errno`]).
    fn note_error(&mut self, ip: Ipv4Addr, errno: i32) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.last_errno = Some(errno);
            p.stats.last_error = Some(std::io::Error::from_raw_os_error(errno).to_string());
            p.stats.errors += 1;
        }
    }

    fn fail_all(&mut self, status: TxStatus) {
        let ids: Vec<u64> = self.msgs.keys().copied().collect();
        for id in ids {
            self.fail_msg(id, status);
        }
    }

    fn close_all(&mut self) {
        let now = self.now();
        for e in self.conns.values_mut() {
            e.conn.close(now);
        }
        let _ = self.transmit();
    }

    fn take_returns(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.ec.rx_return.pop() {
                Ok(Some(r)) => {
                    any = true;
                    self.stats.rx_returns += 1;
                    match self.rx_msgs.remove(&r.token) {
                        Some(m) => {
                            if let Some(t) = m.table {
                                self.rx_tables_free.push(t);
                            }
                            for b in m.bids {
                                self.unref(b);
                            }
                        }
                        None => self.stats.drop_one("rx_return_unknown_token"),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!(
                        "lu2k-engine core {}: RX return ring broken: {e}",
                        self.p.core
                    );
                    break;
                }
            }
        }
        any
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
    fn relieve_rx(&mut self) {
        let reserve = (self.rx_refs.len() / 8).max(4);
        let free = self.io.rx_free();
        let receivers = self.conns.values().filter(|e| e.dir == Dir::Rx).count();
        if receivers == 0 {
            return;
        }
        let spare = free.saturating_sub(reserve) as f64 * self.rx_pkts_per_buf.max(1.0);
        let room = (spare / receivers as f64).min(f64::from(u32::MAX)) as u32;
        for e in self.conns.values_mut() {
            if e.dir == Dir::Rx {
                e.conn.set_rcv_room(Some(room));
            }
        }
        if free >= reserve {
            return;
        }
        let now = self.now();
        let mut shed = 0u64;
        let mut freed = Vec::new();
        for e in self.conns.values_mut() {
            if e.dir != Dir::Rx {
                continue;
            }
            shed += e.conn.shed_out_of_order(now);
            while let Some(ext) = e.conn.poll_release() {
                freed.push(ext.buf as u16);
            }
        }
        if shed > 0 {
            *self
                .stats
                .drops
                .entry("rx_shed_out_of_order".to_string())
                .or_default() += shed;
        }
        for b in freed {
            self.unref(b);
        }
    }

    fn unref(&mut self, bid: u16) {
        if let Some(r) = self.rx_refs.get_mut(bid as usize) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.io.return_rx(bid);
            }
        }
    }

    /// Sends queued transmits and whatever the connections want to send now.
    fn transmit(&mut self) -> bool {
        let now = self.now();
        let mut any = false;
        // Backlog first (transmits taken from connections that the I/O could not
        // take): a run of consecutive ones to one destination goes out as one send
        // (the rest of a batch the I/O layer refused is one such run).
        while let Some(&(dst, _)) = self.backlog.front() {
            self.transmits.clear();
            while self.transmits.len() < crate::io::MAX_SEGS {
                match self.backlog.front() {
                    Some(&(d, t)) if d == dst => {
                        self.transmits.push(t);
                        self.backlog.pop_front();
                    }
                    _ => break,
                }
            }
            let mut start = 0;
            while start < self.transmits.len() {
                let k = self.send_run(dst, start);
                if k == 0 {
                    // Back in front, in order.
                    for t in self.transmits[start..].iter().rev() {
                        self.backlog.push_front((dst, *t));
                    }
                    return any;
                }
                start += k;
                any = true;
            }
        }
        let socks: Vec<u32> = self.conns.keys().copied().collect();
        for s in socks {
            loop {
                self.transmits.clear();
                let (dst, n) = {
                    let Some(e) = self.conns.get_mut(&s) else {
                        break;
                    };
                    let SocketAddr::V4(dst) = e.conn.peer_addr() else {
                        break;
                    };
                    // No more than one GSO send takes (44 full 1500-byte packets,
                    // not 64 that would go out as 44 + 20).
                    let wire = lu2k_udt::wire::HEADER_LEN + e.conn.payload_size() as usize;
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
                    let k = self.send_run(dst, start);
                    if k == 0 {
                        for t in &self.transmits[start..] {
                            self.backlog.push_back((dst, *t));
                        }
                        return any;
                    }
                    start += k;
                }
            }
        }
        any
    }

    /// Sends a prefix of `self.transmits[start..]` (all to `dst`) as one send;
    /// returns how many it took (0: the I/O layer is busy).
    fn send_run(&mut self, dst: SocketAddrV4, start: usize) -> usize {
        self.pieces.clear();
        // A run is mostly one message's packets: look it up once.
        let mut cached: Option<(u64, &TxMsg)> = None;
        for t in &self.transmits[start..] {
            let mut pcs = [(0u64, 0u32); 3];
            if let Some(p) = t.payload {
                let m = match cached {
                    Some((id, m)) if id == p.msg => Some(m),
                    _ => {
                        let m = self.msgs.get(&p.msg);
                        cached = m.map(|m| (p.msg, m));
                        m
                    }
                };
                if let Some(m) = m {
                    // Map (offset, len) of the message onto its pieces.
                    let mut want_off = p.offset;
                    let mut want = p.len;
                    let mut k = 0;
                    let mut acc = 0u32;
                    for &(off, len) in &m.pieces {
                        if want == 0 || k == pcs.len() {
                            break;
                        }
                        if want_off >= acc + len {
                            acc += len;
                            continue;
                        }
                        let inner = want_off - acc;
                        let take = (len - inner).min(want);
                        pcs[k] = (off + u64::from(inner), take);
                        k += 1;
                        want -= take;
                        want_off += take;
                        acc += len;
                    }
                    if want > 0 {
                        self.stats.drop_one("tx_payload_unmapped");
                    }
                }
                // A message already failed back: its memory is kshim's again; the
                // packet goes out as a bare header and the peer drops it as malformed.
            }
            self.pieces.push(pcs);
        }
        let segs: Vec<Segment<'_>> = self.transmits[start..]
            .iter()
            .zip(self.pieces.iter())
            .map(|(t, pcs)| Segment {
                hdr: t.header.as_bytes(),
                payload_off: pcs[0].0,
                payload_len: pcs[0].1,
                more: &pcs[1..],
            })
            .collect();
        let k = self.io.fit(&segs).clamp(1, segs.len());
        let token = self.next_send;
        match self.io.send(dst, &segs[..k], token) {
            Ok(()) => {
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
                k
            }
            Err(SendError::Busy) => 0,
            Err(e) => {
                self.stats.drop_one(match e {
                    SendError::OutOfPool => "tx_out_of_pool",
                    SendError::HeaderTooLong => "tx_header_too_long",
                    _ => "tx_bad_batch",
                });
                // Drop these transmits: UDT retransmits what is lost.
                k
            }
        }
    }

    fn on_event(&mut self, now: u64, real_ns: u64, ev: Event) {
        match ev {
            Event::SendDone { token, result, .. } => {
                if result.is_err() {
                    self.stats.drop_one("send_error");
                }
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
            Event::Recv {
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
            }
            Event::RecvTruncated => self.stats.drop_one("rx_truncated"),
            Event::RxStarved => self.stats.drop_one("rx_no_buffer"),
            Event::SocketError { errno, dst } => {
                self.stats.drop_one("icmp_error");
                if let Some(dst) = dst {
                    self.note_error(*dst.ip(), errno);
                }
            }
            Event::Doorbell | Event::Timer => {}
        }
    }

    fn on_recv(&mut self, now: u64, from: SocketAddrV4, bid: u16, off: u32, len: u32, seg: u32) {
        let Some(buf_off) = self
            .region
            .layout()
            .rx_buffer(self.mem.rx_first + u32::from(bid))
            .map(|b| b.0)
        else {
            return;
        };
        let seg = seg.max(1);
        let n = f64::from(len.div_ceil(seg).max(1));
        self.rx_pkts_per_buf += (n - self.rx_pkts_per_buf) / 64.0;
        let mut at = off;
        while at < off + len {
            let dlen = seg.min(off + len - at);
            let ext = lu2k_ring_abi::Extent::new(Pool::Rx, buf_off + u64::from(at), dlen);
            // The connection parses the datagram in place in the RX pool.
            let region = self.region.clone();
            let held = match region.pool_bytes(&ext) {
                Ok(bytes) => self.on_datagram(now, from, bid, at, dlen, bytes),
                Err(_) => false,
            };
            if held {
                self.rx_refs[bid as usize] += 1;
            }
            at += dlen;
        }
        if self.rx_refs[bid as usize] == 0 {
            self.io.return_rx(bid);
        }
    }

    fn on_datagram(
        &mut self,
        now: u64,
        from: SocketAddrV4,
        bid: u16,
        at: u32,
        dlen: u32,
        bytes: &[u8],
    ) -> bool {
        if bytes.len() < UDT_HDR {
            self.stats.drop_one("rx_malformed");
            return false;
        }
        let ip = *from.ip();
        if let Some(p) = self.peers.get_mut(&ip) {
            p.last_heard = now;
        }
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
                let existing = self.conns.iter_mut().find(|(_, e)| {
                    e.dir == Dir::Rx
                        && e.peer == ip
                        && e.conn.peer_socket_id() == id
                        && !e.conn.is_closed()
                });
                if let Some((_, e)) = existing {
                    return e.conn.handle_datagram(now, bytes, ext);
                }
            }
            match self.listener.handle(now, SocketAddr::V4(from), bytes) {
                ListenerOutput::Reply(h) => {
                    self.backlog.push_back((
                        from,
                        Transmit {
                            header: h,
                            payload: None,
                        },
                    ));
                }
                ListenerOutput::Accept(conn) => {
                    let sock = conn.socket_id();
                    self.peer_for(ip);
                    self.conns.insert(
                        sock,
                        ConnEntry {
                            conn: *conn,
                            peer: ip,
                            dir: Dir::Rx,
                        },
                    );
                }
                ListenerOutput::Drop(_) => self.stats.drop_one("rx_bad_handshake"),
            }
            return false;
        }
        match self.conns.get_mut(&dst) {
            Some(e) if e.peer == ip => e.conn.handle_datagram(now, bytes, ext),
            Some(_) => {
                self.stats.drop_one("rx_spoofed_source");
                false
            }
            None => {
                self.stats.drop_one("rx_unknown_socket");
                false
            }
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.conns
            .values()
            .filter_map(|e| e.conn.poll_timeout())
            .min()
    }

    fn timers(&mut self) {
        let now = self.now();
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
                let nid = p.nid;
                let _ = self.notices.send(Notice::PeerDown(nid));
            }
        }
        for e in self.conns.values_mut() {
            if e.conn.poll_timeout().is_some_and(|t| t <= now) {
                e.conn.handle_timeout(now);
            }
        }
    }

    fn conn_events(&mut self) {
        let socks: Vec<u32> = self.conns.keys().copied().collect();
        let mut closed = Vec::new();
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
                        let p = self.peer_for(peer);
                        if p.down {
                            p.down = false;
                            p.stats.up = true;
                            let nid = p.nid;
                            let _ = self.notices.send(Notice::PeerUp(nid));
                        }
                    }
                    udt::Event::MessageAcked { msg } => {
                        if let Some(m) = self.msgs.get_mut(&msg) {
                            m.acked = true;
                        }
                        self.try_finish(msg);
                    }
                    udt::Event::MessageDropped { msg, reason } => {
                        let status = match reason {
                            DropReason::Ttl => TxStatus::TimedOut,
                            DropReason::Closed => TxStatus::PeerUnreachable,
                        };
                        self.fail_msg(msg, status);
                    }
                    udt::Event::MessageReceived { extents, .. } => self.publish_rx(peer, extents),
                    udt::Event::StreamData(ext) => {
                        self.stats.drop_one("rx_stream_data");
                        self.unref(ext.buf as u16);
                    }
                    udt::Event::Closed { reason } => {
                        closed.push(s);
                        if dir == Dir::Tx
                            && matches!(reason, CloseReason::Timeout | CloseReason::ConnectTimeout)
                        {
                            let p = self.peer_for(peer);
                            if !p.down {
                                p.down = true;
                                p.stats.up = false;
                                let nid = p.nid;
                                let _ = self.notices.send(Notice::PeerDown(nid));
                            }
                        }
                    }
                }
            }
        }
        for s in closed {
            let releasable = self.conns.get(&s).is_some_and(|e| e.conn.held() == 0);
            if releasable {
                if let Some(e) = self.conns.remove(&s) {
                    if let Some(p) = self.peers.get_mut(&e.peer) {
                        if p.tx_sock == Some(s) {
                            p.tx_sock = None;
                        }
                        let st = e.conn.stats();
                        p.stats.retransmissions += st.pkts_retransmitted;
                    }
                }
            }
        }
    }

    fn publish_rx(&mut self, peer: Ipv4Addr, extents: Vec<udt::Extent>) {
        if !self.rx_waiting.is_empty() {
            // Keep delivery order: queue behind messages already waiting.
            self.rx_waiting.push_back((peer, extents));
            return;
        }
        self.publish_rx_now(peer, extents);
    }

    fn publish_rx_now(&mut self, peer: Ipv4Addr, extents: Vec<udt::Extent>) {
        let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
        let bids: Vec<u16> = extents.iter().map(|e| e.buf as u16).collect();
        if total < u64::from(LNET_HDR) {
            self.stats.drop_one("rx_short_message");
            for b in bids {
                self.unref(b);
            }
            return;
        }
        // Header: the first 72 bytes (copied: it is the LNet header, not payload).
        let mut hdr = [0u8; 72];
        let mut got = 0usize;
        let mut payload: Vec<Extent> = Vec::with_capacity(extents.len());
        for e in &extents {
            let Some((buf_off, _)) = self
                .region
                .layout()
                .rx_buffer(self.mem.rx_first + e.buf as u32)
            else {
                continue;
            };
            let mut off = buf_off + u64::from(e.offset);
            let mut len = e.len;
            if got < 72 {
                let take = (72 - got).min(len as usize);
                if let Ok(b) = self
                    .region
                    .pool_bytes(&Extent::new(Pool::Rx, off, take as u32))
                {
                    hdr[got..got + take].copy_from_slice(b);
                }
                got += take;
                off += take as u64;
                len -= take as u32;
            }
            if len == 0 {
                continue;
            }
            match payload.last_mut() {
                Some(l) if l.offset + u64::from(l.len) == off => l.len += len,
                _ => payload.push(Extent::new(Pool::Rx, off, len)),
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        let src_nid = self.peer_for(peer).nid;
        let total_len = (total - u64::from(LNET_HDR)) as u32;
        let (desc, table) = if payload.len() <= lu2k_ring_abi::layout::INLINE_EXTENTS {
            (RxDesc::inline(token, src_nid, hdr, &payload), None)
        } else if payload.len() <= lu2k_ring_abi::layout::MAX_RX_EXTENTS as usize {
            let Some(t) = self.rx_tables_free.pop() else {
                // No free extent table: wait for kshim to return one (backpressure;
                // the message is acknowledged already, so it must not be dropped).
                self.stats.rx_table_waits += 1;
                self.rx_waiting.push_back((peer, extents));
                return;
            };
            let off = self.rx_tables_base + u64::from(t) * lu2k_ring_abi::layout::RX_TABLE_BYTES;
            if self
                .region
                .write_extents(Pool::RxTables, off, &payload)
                .is_err()
            {
                self.rx_tables_free.push(t);
                self.stats.drop_one("rx_table_write");
                for b in bids {
                    self.unref(b);
                }
                return;
            }
            (
                RxDesc::indirect(token, src_nid, hdr, off, payload.len() as u16, total_len),
                Some(t),
            )
        } else {
            self.stats.drop_one("rx_too_many_extents");
            for b in bids {
                self.unref(b);
            }
            return;
        };
        self.rx_msgs.insert(token, RxMsg { bids, table });
        let p = self.peer_for(peer);
        p.stats.msgs_rx += 1;
        p.stats.bytes_rx += u64::from(total_len);
        self.rx_pending.push_back(desc);
        self.flush_rx_pending();
    }

    fn flush_rx_pending(&mut self) -> bool {
        let mut any = false;
        while !self.rx_tables_free.is_empty() {
            let Some((peer, extents)) = self.rx_waiting.pop_front() else {
                break;
            };
            self.publish_rx_now(peer, extents);
            any = true;
        }
        while let Some(d) = self.rx_pending.front() {
            match self.ec.rx.push(*d) {
                Ok(true) => {
                    self.rx_pending.pop_front();
                    self.stats.rx_descs += 1;
                    self.notify = true;
                    any = true;
                }
                Ok(false) => break,
                Err(e) => {
                    eprintln!("lu2k-engine core {}: RX ring broken: {e}", self.p.core);
                    break;
                }
            }
        }
        any
    }

    fn publish_stats(&mut self) {
        let mut s = self.stats.clone();
        s.io = self.io.stats();
        // Read each time: a futex doorbell can fall back to the eventfd.
        s.doorbell = doorbell_name(self.io.as_ref()).into();
        s.payload_copied = 0;
        for p in self.peers.values_mut() {
            let mut rtt = 0;
            let mut rate = 0;
            let mut retx = 0;
            for e in self.conns.values() {
                if e.peer == p.ip {
                    let st = e.conn.stats();
                    if e.dir == Dir::Tx {
                        rtt = e.conn.rtt();
                        rate = if st.period_us > 0.0 {
                            (f64::from(e.conn.payload_size()) * 8.0 * 1e6 / st.period_us) as u64
                        } else {
                            0
                        };
                    }
                    retx += st.pkts_retransmitted;
                }
            }
            p.stats.rtt_us = u64::from(rtt);
            p.stats.rate_bps = rate;
            let mut ps = p.stats.clone();
            ps.retransmissions += retx;
            s.peers.push(ps);
        }
        if let Ok(mut g) = self.published.lock() {
            *g = s;
        }
    }
}

/// Writes one TX completion into `ec`'s completion ring, waking kshim and
/// retrying while the ring is full. Returns `false`, after saying so, when the
/// ring is broken (kshim wrote an impossible index): nothing more can be
/// reported through it.
pub(crate) fn push_completion(
    ec: &mut EngineCore,
    core: u32,
    cookie: u64,
    status: TxStatus,
    detail: u32,
) -> bool {
    let c = if status == TxStatus::InvalidDescriptor {
        TxCompletion {
            cookie,
            status: status as u32,
            detail,
        }
    } else {
        TxCompletion::new(cookie, status, detail)
    };
    loop {
        match ec.tx_done.push(c) {
            Ok(true) => return true,
            Ok(false) => {
                // Completion ring full: kshim must consume; wake it and retry.
                let _ = ec.to_kshim.notify();
                std::thread::yield_now();
            }
            Err(e) => {
                eprintln!("lu2k-engine core {core}: completion ring broken: {e}");
                return false;
            }
        }
    }
}
