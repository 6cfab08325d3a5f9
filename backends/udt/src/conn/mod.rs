//! The UDT connection, sans-IO.
//!
//! A [`Connection`] is one end of a UDT4 connection. It takes datagrams and
//! the current time from its caller and hands back datagrams to send, the
//! time it next needs to be called, and events. It owns no socket, reads no
//! clock and draws no OS randomness (its randomness comes from a seed), so
//! the same code runs in the engine and in deterministic simulation.
//!
//! # Calling order
//!
//! After creating it ([`Connection::connect`], or [`Listener::handle`] on
//! the server side), and after every input — [`Connection::handle_datagram`],
//! [`Connection::handle_timeout`], [`Connection::send`],
//! [`Connection::close`] — the caller:
//! 1. sends what [`Connection::poll_transmit`] (or
//!    [`Connection::poll_transmit_batch`]) returns, until `None`;
//! 2. drains [`Connection::poll_event`] and [`Connection::poll_release`];
//! 3. arms a timer for [`Connection::poll_timeout`] and calls
//!    [`Connection::handle_timeout`] when it fires.
//!
//! # Payload by reference
//!
//! The connection never touches payload bytes. A message to send is
//! registered as `(engine id, length)`; a data [`Transmit`] names the slice
//! `(id, offset, len)` to put after its 16-byte header. A received datagram
//! is passed with the [`Extent`] it occupies in an engine buffer; if the
//! connection keeps a reference to its payload, `handle_datagram` returns
//! `true` and the engine must keep that buffer region until the connection
//! gives it back — inside a delivered message ([`Event::MessageReceived`],
//! [`Event::StreamData`]) or through [`Connection::poll_release`].
//! [`Connection::held`] counts the regions still referenced; it is zero when
//! a transfer has been delivered or the connection has closed.
//!
//! # Differences from UDT4 (on purpose)
//!
//! - The receiver re-reports each loss once its last report is one NAK
//!   interval old (`RTT + 4·RTTVar`, the variance term within [10 ms, RTT/2],
//!   plus the time to drain the loss list), checked every
//!   `min_nak_interval_us`; UDT 4.11 reports a loss once and relies on the
//!   sender's EXP timer, so a lost NAK or a lost retransmission costs it a
//!   long stall. The sender ignores a report naming a packet it retransmitted
//!   less than an RTT ago (the report crossed the retransmission).
//! - Window and buffer sizes come from the bandwidth-delay product
//!   ([`Config::rcv_buf`]), not a fixed 8192 packets.
//! - Hostile input (an ACK beyond what was sent, a loss report naming unsent
//!   packets) is dropped and counted instead of breaking the connection.
//! - Messages are always delivered in order.
//! - The EXP (retransmission) timer restarts when the peer reports on our
//!   packets — an ACK that advances, a NAK — or on any packet while nothing
//!   of ours is unacknowledged, as the draft says; UDT 4.11 restarts it on
//!   every packet, so while a peer sends its own data a lost window waits
//!   until that data stops. Any packet still restarts the idle timeout, and
//!   the timer's backoff (`exp_count`) is kept until the peer reports.
//! - TTL applies until a message has left completely (see
//!   [`Connection::send`]).
//! - Light ACKs go out every 64 packets as in UDT4, but at most one per
//!   100 µs: above ~0.6 M packets/s (loopback, fast LANs) they would be
//!   tens of thousands of sends a second for nothing; the window still
//!   advances every few hundred packets.
//! - The receiver counts a packet pair for the capacity estimate only if
//!   its two packets left the sender together (their header timestamps at
//!   most 10 µs or under half their arrival gap apart): a pair the sender's
//!   window or the application split measured the sender, not the link.

mod listener;
mod types;

pub use listener::{handshake_socket_id, Listener, ListenerOutput};
pub use types::*;

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::cc::{self, Controller, Path};
use crate::estimate::{ArrivalRate, Capacity, Rtt, Time, INITIAL_RTT_US};
use crate::loss::{RcvLossList, SndLossList};
use crate::seq::{AckNo, MsgNo, SeqNo};
use crate::wire::{
    encode_nak, AckRates, AckStats, ControlRepr, DataHeader, HandshakeRepr, NakList, Packet,
    Position, ReqType, SocketType, HEADER_LEN,
};

/// UDT's SYN interval: ACK timer and rate-control period, microseconds.
pub const SYN_US: u64 = 10_000;
/// A light ACK every this many data packets (UDT4's rule)...
const LIGHT_ACK_PKTS: u32 = 64;
/// ...but not more often than this, microseconds. At satellite rates 64 packets
/// take longer (0.7 ms at 1 Gbit/s): UDT4's rule stands. On loopback, 3 million
/// packets a second made 47 000 light ACKs a second, each a send on the receiver and
/// a receive on the sender; at most one per 100 µs moved the 2-core VM's bulk run
/// from 34–35 to 36–38 Gbit/s. The window still advances every 300 packets there.
const LIGHT_ACK_MIN_GAP_US: u64 = 100;
/// Handshake retransmission interval (UDT4: 250 ms).
const HS_RETRY_US: u64 = 250_000;
/// Least EXP interval while no RTT has been measured (RFC 6298's initial RTO).
const INITIAL_EXP_US: u64 = 1_000_000;
/// Largest loss range a NAK may name (a hostile-input bound).
const MAX_NAK_SPAN: u64 = 1 << 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// splitmix64: the connection's only source of randomness, from the seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
struct TxMsg {
    id: u64,
    msg_no: MsgNo,
    len: u32,
    npkts: u32,
    first_idx: u64,
    assigned: u32,
    deadline: Option<Time>,
    dropped: bool,
}

#[derive(Debug, Clone, Copy)]
struct TxPkt {
    msg: u64,
    off: u32,
    len: u32,
    pos: Position,
    sent_at: Time,
    retx: bool,
}

#[derive(Debug)]
struct Sender {
    msgs: VecDeque<TxMsg>,
    msg_base: u64,
    cursor: u64,
    pkts: VecDeque<TxPkt>,
    una: u64,
    /// The acknowledgement point of the last full ACK (UDT4
    /// `m_iSndLastDataAck`): light ACKs move `una` but not this.
    data_ack: u64,
    next: u64,
    /// Sequence numbers to retransmit; all within `una .. next`.
    lost: SndLossList,
    next_msg_no: MsgNo,
    flow_window: u32,
    next_send: f64,
    pacing_debt: f64,
    last_ack2_no: AckNo,
    last_ack2_time: Time,
    rtt: Rtt,
    own_min_rtt: u32,
    recv_rate: u32,
    bandwidth: u32,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Empty,
    Pkt {
        ext: Extent,
        msg_no: MsgNo,
        pos: Position,
    },
    Dropped,
}

#[derive(Debug)]
struct Receiver {
    base: u64,
    slots: VecDeque<Slot>,
    next: u64,
    /// Missing packets, each range with the time it was last reported
    /// (NAK); all within `base .. next`.
    lost: RcvLossList,
    buf_pkts: u32,
    /// Free receive memory beyond what the connection holds, in packets, as
    /// the owner last said ([`Connection::set_rcv_room`]); `None`: unlimited.
    room: Option<u32>,
    held: usize,
    scan: usize,
    last_ack: u64,
    last_ack_ack: u64,
    ack_no: AckNo,
    ack_window: VecDeque<(AckNo, u64, Time)>,
    last_ack_time: Time,
    next_ack_time: Time,
    pkt_count: u32,
    light_count: u32,
    /// When the last light ACK went out.
    last_light_ack: Time,
    next_nak_time: Time,
    arrival: ArrivalRate,
    capacity: Capacity,
    rtt: Rtt,
}

/// One end of a UDT connection. See the [module docs](self).
#[derive(Debug)]
pub struct Connection {
    cfg: Config,
    state: State,
    role: Role,
    socket_id: u32,
    peer_id: u32,
    peer: SocketAddr,
    isn: SeqNo,
    start: Time,
    payload_size: u32,
    mss: u32,
    ctrl: VecDeque<Header>,
    events: VecDeque<Event>,
    released: VecDeque<Extent>,
    stats: Stats,
    last_rsp: Time,
    last_heard: Time,
    exp_count: u32,
    hs: HandshakeRepr,
    last_req_time: Time,
    req_sent_at: Option<Time>,
    connect_deadline: Time,
    tx: Sender,
    rx: Receiver,
    cc: Box<dyn Controller>,
}

impl Connection {
    fn new(now: Time, cfg: Config, seed: u64, peer: SocketAddr, role: Role) -> Connection {
        let mut rng = seed;
        let socket_id = (splitmix(&mut rng) as u32 & 0x3FFF_FFFF).max(1);
        let isn = SeqNo::new(splitmix(&mut rng) as u32 & SeqNo::MAX);
        let cc_seed = splitmix(&mut rng);
        let socket_type = match cfg.mode {
            Mode::Message => SocketType::Dgram,
            Mode::Stream => SocketType::Stream,
        };
        let buf_pkts = cfg.rcv_buf();
        let hs = HandshakeRepr {
            version: HandshakeRepr::UDT4_VERSION,
            socket_type,
            isn,
            mss: cfg.mss,
            flight_flag_size: buf_pkts,
            req_type: ReqType::Request,
            socket_id,
            cookie: 0,
            peer_ip: HandshakeRepr::encode_peer_ip(peer.ip()),
        };
        Connection {
            state: State::Connecting,
            role,
            socket_id,
            peer_id: 0,
            peer,
            isn,
            start: now,
            payload_size: cfg.payload_size(),
            mss: cfg.mss,
            ctrl: VecDeque::new(),
            events: VecDeque::new(),
            released: VecDeque::new(),
            stats: Stats::default(),
            last_rsp: now,
            last_heard: now,
            exp_count: 1,
            hs,
            last_req_time: now,
            req_sent_at: None,
            connect_deadline: now + cfg.connect_timeout_us,
            tx: Sender {
                msgs: VecDeque::new(),
                msg_base: 0,
                cursor: 0,
                pkts: VecDeque::new(),
                una: 0,
                data_ack: 0,
                next: 0,
                lost: SndLossList::new(),
                next_msg_no: MsgNo::new(1),
                flow_window: 16,
                next_send: 0.0,
                pacing_debt: 0.0,
                last_ack2_no: AckNo::new(0),
                last_ack2_time: now,
                rtt: Rtt::new(),
                own_min_rtt: u32::MAX,
                recv_rate: 16,
                bandwidth: 1,
            },
            rx: Receiver {
                base: 0,
                slots: VecDeque::new(),
                next: 0,
                lost: RcvLossList::new(),
                buf_pkts,
                room: None,
                held: 0,
                scan: 0,
                last_ack: 0,
                last_ack_ack: 0,
                ack_no: AckNo::new(0),
                ack_window: VecDeque::new(),
                last_ack_time: 0,
                next_ack_time: now + SYN_US,
                pkt_count: 0,
                light_count: 1,
                last_light_ack: 0,
                next_nak_time: now,
                arrival: ArrivalRate::new(),
                capacity: Capacity::new(),
                rtt: Rtt::new(),
            },
            cc: cfg.cc.build(cc_seed),
            cfg,
        }
    }

    /// Starts a client connection to `peer`: the first handshake request is
    /// queued for [`Connection::poll_transmit`].
    pub fn connect(now: Time, cfg: Config, seed: u64, peer: SocketAddr) -> Connection {
        let mut c = Connection::new(now, cfg, seed, peer, Role::Client);
        c.queue_handshake(0);
        c.req_sent_at = Some(now);
        c
    }

    /// Server side: a connection for a client whose cookie checked out
    /// (called by [`Listener`]). Queues the handshake response.
    fn accept(now: Time, cfg: Config, seed: u64, peer: SocketAddr, req: &HandshakeRepr) -> Self {
        let mut c = Connection::new(now, cfg, seed, peer, Role::Server);
        c.mss = c.mss.min(req.mss).max(64);
        c.payload_size = c.mss.saturating_sub(IP_UDP_OVERHEAD + 16).max(1);
        c.isn = req.isn;
        c.peer_id = req.socket_id;
        c.tx.flow_window = req.flight_flag_size.max(2);
        c.hs = HandshakeRepr {
            isn: req.isn,
            mss: c.mss,
            req_type: ReqType::Response,
            cookie: req.cookie,
            ..c.hs
        };
        c.queue_handshake(c.peer_id);
        c.establish(now);
        c
    }

    fn establish(&mut self, now: Time) {
        self.state = State::Connected;
        self.last_rsp = now;
        self.last_heard = now;
        self.rx.next_ack_time = now + SYN_US;
        self.tx.next_send = now as f64;
        let path = self.path();
        self.cc.init(now, &path);
        self.events.push_back(Event::Connected);
    }

    // ---------------------------------------------------------------- accessors

    /// Our socket ID (the peer puts it in every packet's destination field).
    pub fn socket_id(&self) -> u32 {
        self.socket_id
    }

    /// The peer's socket ID (0 until connected, on the client).
    pub fn peer_socket_id(&self) -> u32 {
        self.peer_id
    }

    /// The peer's address, as given at creation.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// True once the handshake completed, until closed.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// True after the connection ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Payload bytes per data packet (`mss − 44`).
    pub fn payload_size(&self) -> u32 {
        self.payload_size
    }

    /// Counters, with the current RTT, pacing period, windows and delivery
    /// rate filled in.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.rtt_us = self.rtt();
        s.period_us = self.cc.period();
        s.cwnd = self.cc.window();
        s.flow_window = self.tx.flow_window;
        s
    }

    /// Received payload regions the connection still references.
    pub fn held(&self) -> usize {
        self.rx.held
    }

    /// Messages (or stream chunks) registered and not yet acknowledged or dropped.
    pub fn pending_messages(&self) -> usize {
        self.tx.msgs.iter().filter(|m| !m.dropped).count()
    }

    /// Smoothed RTT as this side knows it, microseconds.
    pub fn rtt(&self) -> u32 {
        if self.tx.rtt.samples() > 0 {
            self.tx.rtt.rtt()
        } else {
            self.rx.rtt.rtt()
        }
    }

    fn rtt_var(&self) -> u32 {
        if self.tx.rtt.samples() > 0 {
            self.tx.rtt.var()
        } else {
            self.rx.rtt.var()
        }
    }

    fn path(&self) -> Path {
        let own = self.tx.own_min_rtt;
        let reported = if self.tx.rtt.samples() > 0 {
            self.tx.rtt.min()
        } else {
            u32::MAX
        };
        let mut min_rtt = own.min(reported);
        if min_rtt == u32::MAX {
            min_rtt = self.rtt();
        }
        Path {
            rtt: self.rtt(),
            rtt_var: self.rtt_var(),
            min_rtt,
            recv_rate: self.tx.recv_rate,
            bandwidth: self.tx.bandwidth,
            mss: self.mss,
            max_window: self.tx.flow_window.max(self.hs.flight_flag_size),
            snd_curr_seq: self.seq_of(self.tx.next.wrapping_sub(1)).get(),
            inflight: (self.tx.next - self.tx.una) as u32,
        }
    }

    fn seq_of(&self, idx: u64) -> SeqNo {
        self.isn.add((idx & u64::from(SeqNo::MAX)) as u32)
    }

    /// Unwraps `seq` to an index near `reference`; `None` if it would be negative.
    fn idx_of(&self, reference: u64, seq: SeqNo) -> Option<u64> {
        let off = self.seq_of(reference).offset_to(seq);
        reference.checked_add_signed(i64::from(off))
    }

    fn timestamp(&self, now: Time) -> u32 {
        now.saturating_sub(self.start) as u32
    }

    // ------------------------------------------------------------------ sending

    /// Registers a message of `len` bytes that the engine keeps at id `msg`
    /// until [`Event::MessageAcked`] or [`Event::MessageDropped`] names it.
    /// `ttl_us`: drop it if it has not left completely this long after now
    /// (the peer is then told with a message drop request). Once every
    /// packet of a message has been sent, it is delivered or the connection
    /// closes: a TTL drop never races a delivery, so the engine's completion
    /// is always right. (UDT4 may also drop on a later retransmission, and
    /// then can report a delivered message as dropped.) In stream mode
    /// `ttl_us` is ignored: dropping part of a stream would corrupt it.
    /// In stream mode each call is the next chunk of the stream.
    pub fn send(
        &mut self,
        now: Time,
        msg: u64,
        len: u64,
        ttl_us: Option<u64>,
    ) -> Result<(), SendError> {
        if self.state == State::Closed {
            return Err(SendError::Closed);
        }
        if len == 0 {
            return Err(SendError::Empty);
        }
        let max = match self.cfg.mode {
            Mode::Message => u64::from(self.cfg.max_message_bytes),
            Mode::Stream => u64::from(i32::MAX as u32),
        };
        if len > max {
            return Err(SendError::TooLong);
        }
        let len = len as u32;
        let npkts = len.div_ceil(self.payload_size);
        let msg_no = self.tx.next_msg_no;
        self.tx.next_msg_no = if msg_no.get() == MsgNo::MAX {
            MsgNo::new(1)
        } else {
            msg_no.next()
        };
        self.tx.msgs.push_back(TxMsg {
            id: msg,
            msg_no,
            len,
            npkts,
            first_idx: 0,
            assigned: 0,
            deadline: match self.cfg.mode {
                Mode::Message => ttl_us.map(|t| now.saturating_add(t)),
                Mode::Stream => None,
            },
            dropped: false,
        });
        Ok(())
    }

    /// The next datagram to send now, if any. Control packets come first,
    /// then retransmissions, then new data as pacing and windows allow.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit> {
        self.transmit(now, 0)
    }

    /// `poll_transmit`, releasing data scheduled up to `early` µs ahead.
    fn transmit(&mut self, now: Time, early: u64) -> Option<Transmit> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some(Transmit {
                header: h,
                payload: None,
            });
        }
        if self.state != State::Connected || ((now + early) as f64) < self.tx.next_send {
            return None;
        }
        let t = self.next_data(now)?;
        // Pacing. The packet after a probe (seq ≡ 0 mod 16) leaves at once, so
        // the pair crosses the bottleneck back to back; the interval it skips
        // is added after the pair, so the average rate is the CC's.
        let period = self.cc.period().max(0.0);
        let probe = t.1 & 0xF == 0 && !t.2;
        let floor = now as f64 - period;
        if self.tx.next_send < floor {
            self.tx.next_send = floor;
        }
        if probe {
            self.tx.pacing_debt += period;
        } else {
            self.tx.next_send += period + self.tx.pacing_debt;
            self.tx.pacing_debt = 0.0;
        }
        Some(t.0)
    }

    /// Appends to `out` a run of up to `max` data transmits of equal length
    /// (for one UDP GSO send), or a single control transmit. Returns how many
    /// were appended. Data the pacer schedules within the next
    /// [`Config::batch_horizon_us`] leaves now, so a batch is a short burst
    /// at line rate: the horizon bounds it.
    pub fn poll_transmit_batch(&mut self, now: Time, out: &mut Vec<Transmit>, max: usize) -> usize {
        let early = self.cfg.batch_horizon_us;
        // Where a whole batch is scheduled within the horizon (a high rate),
        // data leaves only once the last packet of a whole batch is within
        // it: released as soon as the first one is, a caller polling every
        // few microseconds would get a batch of the few packets due since its
        // last poll, and pay a send for each. No packet leaves earlier than the
        // horizon allows, none later than its own pacing time.
        if self.ctrl.is_empty() && self.state == State::Connected && self.tx.lost.is_empty() {
            let need = max.saturating_sub(1) as f64 * self.cc.period().max(0.0);
            if need <= early as f64 && ((now + early) as f64) < self.tx.next_send + need {
                return 0;
            }
        }
        let Some(first) = self.transmit(now, early) else {
            return 0;
        };
        out.push(first);
        let Some(p) = first.payload else {
            return 1;
        };
        let mut n = 1;
        while n < max && self.ctrl.is_empty() {
            // Only extend with a packet of the same size.
            if !self.next_data_len_is(p.len) {
                break;
            }
            match self.transmit(now, early) {
                Some(t) => {
                    out.push(t);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn next_data_len_is(&self, len: u32) -> bool {
        if let Some(idx) = self
            .tx
            .lost
            .first()
            .and_then(|s| self.idx_of(self.tx.una, s))
        {
            if let Some(p) = idx
                .checked_sub(self.tx.una)
                .and_then(|i| self.tx.pkts.get(i as usize))
            {
                return p.len == len;
            }
        }
        let Some(m) = self
            .tx
            .msgs
            .get((self.tx.cursor - self.tx.msg_base) as usize)
        else {
            return false;
        };
        let off = m.assigned * self.payload_size;
        m.len.saturating_sub(off).min(self.payload_size) == len
    }

    fn window(&self) -> u64 {
        let cwnd = self.cc.window().max(2.0) as u64;
        cwnd.min(u64::from(self.tx.flow_window.max(2)))
    }

    fn has_data(&self) -> bool {
        if !self.tx.lost.is_empty() {
            return true;
        }
        (self.tx.cursor - self.tx.msg_base) < self.tx.msgs.len() as u64
            && self.tx.next - self.tx.una < self.window()
    }

    /// (transmit, raw seq, retransmission)
    fn next_data(&mut self, now: Time) -> Option<(Transmit, u32, bool)> {
        // Retransmissions first.
        while let Some(seq) = self.tx.lost.pop_first() {
            let Some(idx) = self.idx_of(self.tx.una, seq) else {
                continue;
            };
            if idx < self.tx.una || idx >= self.tx.next {
                continue;
            }
            let pi = (idx - self.tx.una) as usize;
            let pkt = self.tx.pkts[pi];
            let mi = (pkt.msg - self.tx.msg_base) as usize;
            let m = &self.tx.msgs[mi];
            if m.dropped {
                self.queue_drop_req(mi);
                continue;
            }
            let p = &mut self.tx.pkts[pi];
            p.sent_at = now;
            p.retx = true;
            let msg_no = self.tx.msgs[mi].msg_no;
            let id = self.tx.msgs[mi].id;
            self.stats.pkts_retransmitted += 1;
            let t = self.data_transmit(now, idx, pkt, msg_no, id);
            let path = self.path();
            let seq = self.seq_of(idx).get();
            self.cc.on_pkt_sent(now, &path, seq, true);
            return Some((t, seq, true));
        }
        // New data, within the windows.
        if self.tx.next - self.tx.una >= self.window() {
            return None;
        }
        loop {
            let mi = (self.tx.cursor - self.tx.msg_base) as usize;
            let m = self.tx.msgs.get(mi)?;
            if m.dropped {
                self.tx.cursor += 1;
                continue;
            }
            if m.deadline.is_some_and(|d| now >= d) {
                self.drop_msg(mi, DropReason::Ttl);
                continue;
            }
            break;
        }
        let mi = (self.tx.cursor - self.tx.msg_base) as usize;
        let idx = self.tx.next;
        let payload_size = self.payload_size;
        let m = &mut self.tx.msgs[mi];
        if m.assigned == 0 {
            m.first_idx = idx;
        }
        let off = m.assigned * payload_size;
        let len = (m.len - off).min(payload_size);
        let pos = Position::of(m.assigned as usize, m.npkts as usize);
        m.assigned += 1;
        let (msg_no, id) = (m.msg_no, m.id);
        if m.assigned == m.npkts {
            self.tx.cursor += 1;
        }
        let pkt = TxPkt {
            msg: self.tx.msg_base + mi as u64,
            off,
            len,
            pos,
            sent_at: now,
            retx: false,
        };
        self.tx.pkts.push_back(pkt);
        self.tx.next += 1;
        self.stats.pkts_sent += 1;
        let t = self.data_transmit(now, idx, pkt, msg_no, id);
        let path = self.path();
        let seq = self.seq_of(idx).get();
        self.cc.on_pkt_sent(now, &path, seq, false);
        Some((t, seq, false))
    }

    fn data_transmit(&self, now: Time, idx: u64, pkt: TxPkt, msg_no: MsgNo, id: u64) -> Transmit {
        let dh = DataHeader {
            seq_no: self.seq_of(idx),
            position: pkt.pos,
            in_order: self.cfg.mode == Mode::Message,
            msg_no,
            timestamp: self.timestamp(now),
            dst_socket_id: self.peer_id,
        };
        let mut header = Header::new();
        header.buf_mut()[..HEADER_LEN].copy_from_slice(&dh.to_bytes());
        header.set_len(HEADER_LEN);
        Transmit {
            header,
            payload: Some(PayloadRef {
                msg: id,
                offset: pkt.off,
                len: pkt.len,
            }),
        }
    }

    /// Drops message `mi` (index into `msgs`): tells the engine and the peer.
    fn drop_msg(&mut self, mi: usize, reason: DropReason) {
        let m = &mut self.tx.msgs[mi];
        if m.dropped {
            return;
        }
        m.dropped = true;
        let (id, first, assigned, npkts) = (m.id, m.first_idx, m.assigned, m.npkts);
        self.events
            .push_back(Event::MessageDropped { msg: id, reason });
        if assigned > 0 {
            let last = first + u64::from(assigned) - 1;
            if last >= self.tx.una {
                let first = first.max(self.tx.una);
                let (a, b) = (self.seq_of(first), self.seq_of(last));
                self.tx.lost.remove_range(a, b);
            }
            if reason == DropReason::Ttl {
                self.queue_drop_req(mi);
            }
        }
        if self.tx.msg_base + mi as u64 == self.tx.cursor && assigned < npkts {
            self.tx.cursor += 1;
        }
    }

    fn queue_drop_req(&mut self, mi: usize) {
        let m = &self.tx.msgs[mi];
        if m.assigned == 0 {
            return;
        }
        let first = self.seq_of(m.first_idx);
        let last = self.seq_of(m.first_idx + u64::from(m.assigned) - 1);
        let repr = ControlRepr::MsgDropReq {
            msg_no: m.msg_no,
            first,
            last,
        };
        self.stats.drop_reqs_sent += 1;
        self.queue_ctrl(&repr, self.peer_id, 0);
    }

    // ---------------------------------------------------------------- control out

    fn queue_ctrl(&mut self, repr: &ControlRepr<'_>, dst: u32, now: Time) {
        let mut h = Header::new();
        let len = repr.buffer_len();
        if len > CTRL_MAX {
            return;
        }
        let ts = self.timestamp(now);
        repr.emit(&mut Packet::new_unchecked(&mut h.buf_mut()[..]), ts, dst);
        h.set_len(len);
        self.ctrl.push_back(h);
    }

    fn queue_handshake(&mut self, dst: u32) {
        let hs = self.hs;
        self.queue_ctrl(&ControlRepr::Handshake(hs), dst, 0);
    }

    fn queue_nak(&mut self, ranges: &[(SeqNo, SeqNo)], now: Time) {
        let mut at = 0;
        while at < ranges.len() {
            let mut buf = [0u8; CTRL_MAX - HEADER_LEN];
            let chunk = &ranges[at..];
            let n = encode_nak(chunk.iter().copied(), &mut buf);
            if n == 0 {
                break;
            }
            // Count the entries that fit.
            let mut used = 0;
            let mut bytes = 0;
            for &(a, b) in chunk {
                let w = if a == b { 4 } else { 8 };
                if bytes + w > n {
                    break;
                }
                bytes += w;
                used += 1;
            }
            at += used.max(1);
            if let Ok(loss) = NakList::new_checked(&buf[..n]) {
                self.queue_ctrl(&ControlRepr::Nak { loss }, self.peer_id, now);
                self.stats.naks_sent += 1;
            }
        }
    }

    // ------------------------------------------------------------------ input

    /// Handles one datagram from the peer. `at` is where the whole datagram
    /// lies in the engine's buffer (its payload is at `at.offset + 16`).
    /// Returns `true` if the connection now references the payload (the
    /// engine must keep that region until it is given back).
    pub fn handle_datagram(&mut self, now: Time, datagram: &[u8], at: Extent) -> bool {
        let Ok(pkt) = Packet::new_checked(datagram) else {
            self.stats.count_drop(DropCause::Malformed);
            return false;
        };
        if self.state == State::Closed {
            self.stats.count_drop(DropCause::WrongState);
            return false;
        }
        let dst = pkt.dst_socket_id();
        if pkt.is_control() {
            let Ok(repr) = ControlRepr::parse(&pkt) else {
                self.stats.count_drop(DropCause::Malformed);
                return false;
            };
            let hs_to_listener = matches!(repr, ControlRepr::Handshake(_)) && dst == 0;
            if dst != self.socket_id && !hs_to_listener {
                self.stats.count_drop(DropCause::WrongSocket);
                return false;
            }
            self.handle_control(now, repr);
            false
        } else {
            if dst != self.socket_id {
                self.stats.count_drop(DropCause::WrongSocket);
                return false;
            }
            if self.state != State::Connected {
                self.stats.count_drop(DropCause::WrongState);
                return false;
            }
            let Ok(h) = DataHeader::parse(&pkt) else {
                self.stats.count_drop(DropCause::Malformed);
                return false;
            };
            let payload_len = datagram.len() - HEADER_LEN;
            if payload_len == 0 || payload_len > self.payload_size as usize {
                self.stats.count_drop(DropCause::Malformed);
                return false;
            }
            let ext = Extent {
                buf: at.buf,
                offset: at.offset + HEADER_LEN as u32,
                len: payload_len as u32,
            };
            self.handle_data(now, &h, ext)
        }
    }

    /// Any packet from the peer: it is alive (the idle timeout restarts).
    /// The EXP timer restarts too only if nothing of ours is unacknowledged
    /// (draft-gg-udt, data receiving step 3): data or stale ACKs from a busy
    /// peer say nothing about whether our packets arrived.
    fn heard(&mut self, now: Time) {
        self.last_heard = now;
        if self.tx.next == self.tx.una {
            self.exp_count = 1;
            self.last_rsp = now;
        }
    }

    /// The peer reported on our packets (an ACK that advances, a NAK):
    /// restart the EXP timer and its backoff.
    fn progress(&mut self, now: Time) {
        self.exp_count = 1;
        self.last_rsp = now;
    }

    fn handle_control(&mut self, now: Time, repr: ControlRepr<'_>) {
        if let ControlRepr::Handshake(hs) = repr {
            self.handle_handshake(now, &hs);
            return;
        }
        if self.state != State::Connected {
            self.stats.count_drop(DropCause::WrongState);
            return;
        }
        self.heard(now);
        match repr {
            ControlRepr::Ack {
                ack_seq_no,
                last,
                stats,
            } => self.handle_ack(now, ack_seq_no, last, stats),
            ControlRepr::Ack2 { ack_seq_no } => self.handle_ack2(now, ack_seq_no),
            ControlRepr::Nak { loss } => self.handle_nak(now, loss),
            ControlRepr::MsgDropReq {
                msg_no,
                first,
                last,
            } => self.handle_drop_req(now, msg_no, first, last),
            ControlRepr::Shutdown => self.shut(CloseReason::Peer),
            ControlRepr::KeepAlive
            | ControlRepr::CongestionWarning
            | ControlRepr::PeerError { .. }
            | ControlRepr::Handshake(_) => {}
        }
    }

    fn handle_handshake(&mut self, now: Time, res: &HandshakeRepr) {
        match (self.role, self.state) {
            (Role::Client, State::Connecting) => match res.req_type {
                ReqType::Request if self.hs.req_type == ReqType::Response => {
                    // A cookie answering one of our retries: already using it.
                }
                ReqType::Request => {
                    // The listener's cookie: repeat the request with it.
                    self.hs.req_type = ReqType::Response;
                    self.hs.cookie = res.cookie;
                    self.queue_handshake(0);
                    self.last_req_time = now;
                    self.req_sent_at = Some(now);
                }
                ReqType::Rejected => self.shut(CloseReason::Rejected),
                ReqType::Response if res.isn == self.isn && res.socket_id != 0 => {
                    self.mss = res.mss.clamp(64, self.mss);
                    self.payload_size = self.mss.saturating_sub(IP_UDP_OVERHEAD + 16).max(1);
                    self.peer_id = res.socket_id;
                    self.tx.flow_window = res.flight_flag_size.max(2);
                    if let Some(t) = self.req_sent_at {
                        let sample = now.saturating_sub(t).clamp(1, u64::from(u32::MAX)) as u32;
                        self.tx.rtt.on_sample(sample);
                        self.tx.own_min_rtt = sample;
                        self.rx.rtt.on_sample(sample);
                    }
                    self.establish(now);
                }
                _ => self.stats.count_drop(DropCause::BadHandshake),
            },
            (Role::Server, State::Connected)
                if res.socket_id == self.peer_id
                    && matches!(res.req_type, ReqType::Request | ReqType::Response) =>
            {
                // Our response was lost: the client keeps asking.
                self.heard(now);
                self.queue_handshake(self.peer_id);
            }
            _ => self.stats.count_drop(DropCause::BadHandshake),
        }
    }

    fn handle_ack(&mut self, now: Time, ack_no: AckNo, last: SeqNo, stats: Option<AckStats>) {
        self.stats.acks_received += 1;
        let Some(a) = self.idx_of(self.tx.una, last) else {
            self.stats.count_drop(DropCause::AckBeyondSent);
            return;
        };
        if a > self.tx.next {
            self.stats.count_drop(DropCause::AckBeyondSent);
            return;
        }
        let Some(st) = stats else {
            // Light ACK: only moves the window.
            if a > self.tx.una {
                let adv = (a - self.tx.una) as u32;
                self.tx.flow_window = self.tx.flow_window.saturating_sub(adv).max(2);
                self.advance_una(now, a);
            }
            return;
        };
        if now.saturating_sub(self.tx.last_ack2_time) > SYN_US || ack_no == self.tx.last_ack2_no {
            self.queue_ctrl(&ControlRepr::Ack2 { ack_seq_no: ack_no }, self.peer_id, now);
            self.tx.last_ack2_no = ack_no;
            self.tx.last_ack2_time = now;
        }
        if a >= self.tx.una {
            self.tx.flow_window = st.avail_buf.max(2);
        }
        // The path estimates are taken from every full ACK, also one that
        // does not advance past the last full ACK (UDT4 drops those).
        // Whether it advanced is judged, as UDT4 does, against the last
        // full ACK, not against `una`: light ACKs (every 64 packets) move
        // `una` in between, and judged against `una` most full ACKs at
        // high rates would not count, and the controller's rate increase
        // (UDT4's onACK) would be skipped.
        let advanced = a > self.tx.una;
        let data_advanced = a > self.tx.data_ack;
        if advanced {
            // Sender-side RTT sample from the newest packet this ACK covers
            // (Karn: never from a retransmission); only its minimum is trusted.
            let newest = self.tx.pkts[(a - 1 - self.tx.una) as usize];
            if !newest.retx {
                let s = now
                    .saturating_sub(newest.sent_at)
                    .clamp(1, u64::from(u32::MAX)) as u32;
                self.tx.own_min_rtt = self.tx.own_min_rtt.min(s);
            }
        }
        let newly = a.saturating_sub(self.tx.data_ack) as u32;
        if data_advanced {
            self.tx.data_ack = a;
        }
        if advanced {
            self.advance_una(now, a);
        }
        // The receiver's RTT (from ACK/ACK2), unless it is still UDT4's guess.
        if !(st.rtt == INITIAL_RTT_US && st.rtt_var == INITIAL_RTT_US / 2) && st.rtt > 0 {
            self.tx.rtt.on_sample(st.rtt);
        }
        let mut ack = cc::Ack {
            seq: last.get(),
            newly_acked: newly,
            ..cc::Ack::default()
        };
        if let Some(r) = st.rates {
            if r.recv_rate > 0 {
                self.tx.recv_rate =
                    ((u64::from(self.tx.recv_rate) * 7 + u64::from(r.recv_rate)) >> 3) as u32;
                ack.recv_rate_sample = r.recv_rate;
            }
            if r.link_capacity > 0 {
                self.tx.bandwidth =
                    ((u64::from(self.tx.bandwidth) * 7 + u64::from(r.link_capacity)) >> 3) as u32;
                ack.bandwidth_sample = r.link_capacity;
            }
        }
        let path = self.path();
        self.cc.on_report(now, &path, &ack);
        if data_advanced {
            self.cc.on_ack(now, &path, &ack);
        }
    }

    fn advance_una(&mut self, now: Time, a: u64) {
        self.progress(now);
        let n = (a - self.tx.una) as usize;
        for p in self.tx.pkts.drain(..n) {
            self.stats.bytes_acked += u64::from(p.len);
        }
        self.tx.una = a;
        self.tx.lost.remove_through(self.seq_of(a.wrapping_sub(1)));
        // Complete messages whose packets are all acknowledged.
        while let Some(m) = self.tx.msgs.front() {
            let mi_abs = self.tx.msg_base;
            if mi_abs >= self.tx.cursor {
                break;
            }
            let done = m.first_idx + u64::from(m.assigned) <= a || m.assigned == 0;
            if !done {
                break;
            }
            if !m.dropped {
                self.events.push_back(Event::MessageAcked { msg: m.id });
            }
            self.tx.msgs.pop_front();
            self.tx.msg_base += 1;
        }
    }

    fn handle_nak(&mut self, now: Time, loss: NakList<'_>) {
        self.stats.naks_received += 1;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (a, b) in loss.ranges() {
            let (Some(ia), Some(ib)) = (self.idx_of(self.tx.una, a), self.idx_of(self.tx.una, b))
            else {
                self.stats.count_drop(DropCause::BadLossReport);
                return;
            };
            if ib >= self.tx.next || ia > ib || ib - ia > MAX_NAK_SPAN {
                self.stats.count_drop(DropCause::BadLossReport);
                return;
            }
            if ib < self.tx.una {
                continue;
            }
            ranges.push((ia.max(self.tx.una), ib));
        }
        // A report naming a packet retransmitted less than an RTT ago is
        // stale (sent before the retransmission could arrive): skip it.
        let fresh = now.saturating_sub(u64::from(self.rtt()));
        let mut new = 0u32;
        for &(a, b) in &ranges {
            // Insert the runs between packets whose report is stale.
            let mut run: Option<u64> = None;
            for i in a..=b + 1 {
                let stale = i > b || {
                    let p = &self.tx.pkts[(i - self.tx.una) as usize];
                    p.retx && p.sent_at > fresh
                };
                match (stale, run) {
                    (true, Some(start)) => {
                        let (x, y) = (self.seq_of(start), self.seq_of(i - 1));
                        new += self.tx.lost.insert(x, y).unwrap_or(0);
                        run = None;
                    }
                    (false, None) => run = Some(i),
                    _ => {}
                }
            }
        }
        self.stats.pkts_nak_received += u64::from(new);
        self.progress(now);
        let raw: Vec<(u32, u32)> = loss.ranges().map(|(a, b)| (a.get(), b.get())).collect();
        let path = self.path();
        self.cc.on_loss(now, &path, &raw, new);
    }

    // ---------------------------------------------------------------- receiving

    fn handle_data(&mut self, now: Time, h: &DataHeader, ext: Extent) -> bool {
        self.heard(now);
        self.stats.pkts_received += 1;
        self.rx.pkt_count += 1;
        self.rx.arrival.on_arrival(now, h.seq_no.get());
        self.rx
            .capacity
            .on_arrival(now, h.seq_no.get(), h.timestamp);
        self.cc.on_pkt_received(now, h.seq_no.get());
        let retained = self.place(now, h, ext);
        if ext.len != self.payload_size {
            // An irregular packet usually ends a message: ACK at once.
            self.rx.next_ack_time = now;
        }
        if retained {
            self.deliver();
        }
        self.ack_timers(now);
        retained
    }

    fn place(&mut self, now: Time, h: &DataHeader, ext: Extent) -> bool {
        let Some(idx) = self.idx_of(self.rx.next, h.seq_no) else {
            self.stats.count_drop(DropCause::OutOfWindow);
            return false;
        };
        if idx < self.rx.base || idx >= self.rx.base + u64::from(self.rx.buf_pkts) {
            self.stats.count_drop(DropCause::OutOfWindow);
            return false;
        }
        if idx >= self.rx.next {
            if idx > self.rx.next {
                let (a, b) = (self.rx.next, idx - 1);
                if self.rx.lost.is_empty() {
                    self.rx.next_nak_time = now + self.cfg.min_nak_interval_us;
                }
                // Cannot fail: the gap lies within the receive buffer.
                let _ = self
                    .rx
                    .lost
                    .insert_reported(self.seq_of(a), self.seq_of(b), now);
                self.stats.pkts_lost_detected += b - a + 1;
                self.queue_nak(&[(self.seq_of(a), self.seq_of(b))], now);
            }
            while self.rx.base + (self.rx.slots.len() as u64) <= idx {
                self.rx.slots.push_back(Slot::Empty);
            }
            self.rx.next = idx + 1;
        }
        let si = (idx - self.rx.base) as usize;
        match self.rx.slots[si] {
            Slot::Empty => {
                self.rx.lost.remove(h.seq_no);
                self.rx.slots[si] = Slot::Pkt {
                    ext,
                    msg_no: h.msg_no,
                    pos: h.position,
                };
                self.rx.held += 1;
                true
            }
            Slot::Pkt { .. } | Slot::Dropped => {
                self.stats.count_drop(DropCause::OutOfWindow);
                false
            }
        }
    }

    /// Tells the receiver how many more packets its owner's memory can take
    /// now (`None`: no limit beyond the receive buffer). The flow window
    /// advertised in the next full ACK is at most this plus the packets the
    /// connection holds beyond the ACK point, so a sender never has more in
    /// flight than there is memory for. Nothing else changes: packets that
    /// arrive anyway are still placed.
    pub fn set_rcv_room(&mut self, room: Option<u32>) {
        self.rx.room = room;
    }

    /// Gives back every received packet that lies beyond the first hole of the
    /// receive buffer and returns how many.
    ///
    /// For a receiver short of buffer memory: packets behind a hole hold their
    /// buffers until the hole is filled, and if they hold all of them the
    /// retransmission that fills the hole has nowhere to land (a deadlock).
    /// Nothing past the hole has been acknowledged (UDT's ACK is cumulative), so
    /// the packets may be forgotten: they go back on the receive loss list, as
    /// reported now, and the periodic NAK asks for them again later, by which
    /// time the head's retransmission has had its chance to arrive. Their regions
    /// come back through [`Connection::poll_release`]. In-order packets (before
    /// the first hole, acknowledged) are never touched.
    pub fn shed_out_of_order(&mut self, now: Time) -> u64 {
        let Some(hole) = self.rx.slots.iter().position(|s| matches!(s, Slot::Empty)) else {
            return 0;
        };
        let mut shed = 0u64;
        for i in hole + 1..self.rx.slots.len() {
            if let Slot::Pkt { ext, .. } = self.rx.slots[i] {
                self.rx.slots[i] = Slot::Empty;
                self.rx.held -= 1;
                self.released.push_back(ext);
                let seq = self.seq_of(self.rx.base + i as u64);
                // Cannot fail: the slot lies within the receive buffer.
                let _ = self.rx.lost.insert_reported(seq, seq, now);
                shed += 1;
            }
        }
        self.rx.scan = 0;
        self.stats.pkts_shed += shed;
        shed
    }

    fn pop_front_slot(&mut self) -> Slot {
        let s = self.rx.slots.pop_front().unwrap_or(Slot::Empty);
        self.rx.base += 1;
        if let Slot::Pkt { .. } = s {
            self.rx.held -= 1;
        }
        s
    }

    fn release_front(&mut self, n: usize) {
        for _ in 0..n {
            if let Slot::Pkt { ext, .. } = self.pop_front_slot() {
                self.released.push_back(ext);
            }
        }
        self.rx.scan = 0;
    }

    fn deliver(&mut self) {
        loop {
            match self.rx.slots.front() {
                None | Some(Slot::Empty) => return,
                Some(Slot::Dropped) => {
                    self.pop_front_slot();
                    self.rx.scan = 0;
                    continue;
                }
                Some(Slot::Pkt { .. }) => {}
            }
            if self.cfg.mode == Mode::Stream {
                if let Slot::Pkt { ext, .. } = self.pop_front_slot() {
                    self.stats.bytes_delivered += u64::from(ext.len);
                    self.events.push_back(Event::StreamData(ext));
                }
                continue;
            }
            // Message mode: find the end of the front message.
            let mut end = None;
            let mut broken = None;
            let mut i = self.rx.scan;
            while i < self.rx.slots.len() {
                match self.rx.slots[i] {
                    Slot::Empty => break,
                    Slot::Dropped => {
                        broken = Some(i);
                        break;
                    }
                    Slot::Pkt { pos, .. } => {
                        if i == 0 && !pos.is_first() {
                            broken = Some(1);
                            break;
                        }
                        if i > 0 && pos.is_first() {
                            broken = Some(i);
                            break;
                        }
                        if pos.is_last() {
                            end = Some(i);
                            break;
                        }
                    }
                }
                i += 1;
            }
            if let Some(n) = broken {
                // Remains of a message whose other packets were dropped.
                self.release_front(n);
                continue;
            }
            let Some(end) = end else {
                self.rx.scan = i;
                return;
            };
            let mut extents = Vec::with_capacity(end + 1);
            let mut msg_no = 0;
            for _ in 0..=end {
                if let Slot::Pkt { ext, msg_no: m, .. } = self.pop_front_slot() {
                    self.stats.bytes_delivered += u64::from(ext.len);
                    extents.push(ext);
                    msg_no = m.get();
                }
            }
            self.rx.scan = 0;
            self.events
                .push_back(Event::MessageReceived { msg_no, extents });
        }
    }

    fn handle_drop_req(&mut self, _now: Time, msg_no: MsgNo, first: SeqNo, last: SeqNo) {
        let (Some(a), Some(b)) = (
            self.idx_of(self.rx.next, first),
            self.idx_of(self.rx.next, last),
        ) else {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        };
        if a > b || b >= self.rx.base + u64::from(self.rx.buf_pkts) || b - a > MAX_NAK_SPAN {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        }
        let a = a.max(self.rx.base);
        if b < a {
            return;
        }
        while self.rx.base + (self.rx.slots.len() as u64) <= b {
            self.rx.slots.push_back(Slot::Empty);
        }
        if b >= self.rx.next {
            self.rx.next = b + 1;
        }
        self.rx.lost.remove_range(self.seq_of(a), self.seq_of(b));
        for i in a..=b {
            let si = (i - self.rx.base) as usize;
            match self.rx.slots[si] {
                Slot::Empty => {
                    self.rx.slots[si] = Slot::Dropped;
                }
                Slot::Pkt { ext, msg_no: m, .. } if m == msg_no => {
                    self.rx.slots[si] = Slot::Dropped;
                    self.rx.held -= 1;
                    self.released.push_back(ext);
                }
                _ => {}
            }
        }
        self.rx.scan = 0;
        self.deliver();
    }

    fn handle_ack2(&mut self, now: Time, ack_no: AckNo) {
        let Some(pos) = self.rx.ack_window.iter().position(|&(n, _, _)| n == ack_no) else {
            return;
        };
        let (_, idx, t) = self.rx.ack_window[pos];
        self.rx.ack_window.drain(..=pos);
        let rtt = now.saturating_sub(t).clamp(1, u64::from(u32::MAX)) as u32;
        self.rx.rtt.on_sample(rtt);
        if idx > self.rx.last_ack_ack {
            self.rx.last_ack_ack = idx;
        }
    }

    fn ack_point(&self) -> u64 {
        self.rx
            .lost
            .first()
            .and_then(|s| self.idx_of(self.rx.next, s))
            .map_or(self.rx.next, |i| i.min(self.rx.next))
    }

    fn nak_interval(&self) -> u64 {
        // UDT4's RTT + 4·RTTVar, with the variance term kept within
        // [10 ms, RTT/2]: an early, wide variance must not hold a hole for
        // seconds, and a retransmission needs some slack to arrive.
        let r = u64::from(self.rx.rtt.rtt());
        let rtt = r + (4 * u64::from(self.rx.rtt.var())).min(r / 2).max(10_000);
        let rate = u64::from(self.rx.arrival.rate());
        let drain = (self.rx.lost.len() * 1_000_000)
            .checked_div(rate)
            .unwrap_or(0);
        (rtt + drain).max(self.cfg.min_nak_interval_us)
    }

    /// Re-reports every loss whose last report is one NAK interval old (the
    /// retransmission should have arrived by then), at most 64 ranges per
    /// tick; the check runs every `min_nak_interval_us`.
    fn periodic_nak(&mut self, now: Time) {
        let interval = self.nak_interval();
        if let Some(due) = now.checked_sub(interval) {
            let mut ranges = Vec::new();
            self.rx.lost.take_due(due, now, 64, &mut ranges);
            if !ranges.is_empty() {
                self.queue_nak(&ranges, now);
            }
        }
        self.rx.next_nak_time = now + self.cfg.min_nak_interval_us;
    }

    fn ack_timers(&mut self, now: Time) {
        if self.state != State::Connected {
            return;
        }
        if now >= self.rx.next_ack_time {
            self.send_ack(now, false);
            self.rx.next_ack_time = now + SYN_US;
            self.rx.pkt_count = 0;
            self.rx.light_count = 1;
        } else if self.rx.pkt_count >= LIGHT_ACK_PKTS * self.rx.light_count
            && now >= self.rx.last_light_ack + LIGHT_ACK_MIN_GAP_US
        {
            self.send_ack(now, true);
            self.rx.last_light_ack = now;
            // The next one 64 packets on from here, not from where the count
            // stood: a rate-limited light ACK does not leave a debt behind it.
            self.rx.light_count = self.rx.pkt_count / LIGHT_ACK_PKTS + 1;
        }
    }

    fn send_ack(&mut self, now: Time, light: bool) {
        let ack = self.ack_point();
        if ack == self.rx.last_ack_ack {
            return;
        }
        let seq = self.seq_of(ack);
        if light {
            let repr = ControlRepr::Ack {
                ack_seq_no: AckNo::new(0),
                last: seq,
                stats: None,
            };
            self.queue_ctrl(&repr, self.peer_id, now);
            self.stats.acks_sent += 1;
            return;
        }
        if ack > self.rx.last_ack {
            self.rx.last_ack = ack;
        } else if ack == self.rx.last_ack {
            let wait = u64::from(self.rx.rtt.rtt()) + 4 * u64::from(self.rx.rtt.var());
            if now.saturating_sub(self.rx.last_ack_time) < wait {
                return;
            }
        } else {
            return;
        }
        if self.rx.last_ack <= self.rx.last_ack_ack {
            return;
        }
        self.rx.ack_no = self.rx.ack_no.next();
        // As UDT4's getAvailBufSize: the buffer less what is acknowledged but
        // not yet handed out (the sender counts what it has in flight beyond
        // the ACK point itself); at least 2, UDT4's deadlock breaker.
        let mut avail = self.rx.buf_pkts.saturating_sub((ack - self.rx.base) as u32);
        if let Some(room) = self.rx.room {
            // What the owner's memory can still take, plus what this
            // connection holds beyond the ACK point already (the sender
            // counts those as in flight).
            let beyond = self.rx.held.saturating_sub((ack - self.rx.base) as usize);
            avail = avail.min(room.saturating_add(u32::try_from(beyond).unwrap_or(u32::MAX)));
        }
        let avail = avail.max(2);
        // Every full ACK carries the rate estimates (UDT4 only adds them once
        // per SYN interval; its first ACK, sent on the first packet, then
        // carries none, and the sender learns the capacity a round trip
        // late). UDT4 reads either length.
        self.rx.last_ack_time = now;
        let rates = Some(AckRates {
            recv_rate: self.rx.arrival.rate(),
            link_capacity: self.rx.capacity.rate(),
        });
        let repr = ControlRepr::Ack {
            ack_seq_no: self.rx.ack_no,
            last: seq,
            stats: Some(AckStats {
                rtt: self.rx.rtt.rtt(),
                rtt_var: self.rx.rtt.var(),
                avail_buf: avail,
                rates,
            }),
        };
        self.queue_ctrl(&repr, self.peer_id, now);
        self.stats.acks_sent += 1;
        if self.rx.ack_window.len() >= 1024 {
            self.rx.ack_window.pop_front();
        }
        self.rx.ack_window.push_back((self.rx.ack_no, ack, now));
    }

    // ------------------------------------------------------------------ timers

    /// When [`Connection::handle_timeout`] should next be called (or
    /// `poll_transmit`, for pacing); `None` when nothing is pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.state {
            State::Closed => None,
            State::Connecting => {
                Some((self.last_req_time + HS_RETRY_US).min(self.connect_deadline))
            }
            State::Connected => {
                let mut t = self.rx.next_ack_time;
                if !self.rx.lost.is_empty() {
                    t = t.min(self.rx.next_nak_time);
                }
                t = t.min(self.next_exp());
                if self.has_data() {
                    t = t.min(self.tx.next_send.ceil() as Time);
                }
                Some(t)
            }
        }
    }

    fn next_exp(&self) -> Time {
        // The RTT is at least what our own ACKed packets took: until the
        // peer's ACK2 samples arrive (the server, and a client whose
        // handshake was retried, start from UDT4's 100 ms guess), the timer
        // must not fire while the first window is still on its way back.
        let mut rtt = u64::from(self.rtt());
        if self.tx.own_min_rtt != u32::MAX {
            rtt = rtt.max(u64::from(self.tx.own_min_rtt));
        }
        let base = u64::from(self.exp_count) * (rtt + 4 * u64::from(self.rtt_var()) + SYN_US);
        let mut min = self.cfg.min_exp_interval_us;
        if self.tx.next > self.tx.una
            && self.tx.own_min_rtt == u32::MAX
            && self.tx.rtt.samples() == 0
            && self.rx.rtt.samples() == 0
        {
            // Data in flight and no RTT measured at all yet: resend after
            // 1 s, as TCP's initial RTO (RFC 6298), not after UDT4's 100 ms
            // guess (keep-alives keep the short interval).
            min = min.max(INITIAL_EXP_US);
        }
        let exp = base.max(u64::from(self.exp_count) * min);
        self.last_rsp + exp
    }

    /// Runs the timers due at `now`: ACK, periodic NAK, EXP (retransmission
    /// on silence, keep-alive, idle close), handshake retransmission.
    pub fn handle_timeout(&mut self, now: Time) {
        match self.state {
            State::Closed => {}
            State::Connecting => {
                if now >= self.connect_deadline {
                    self.shut(CloseReason::ConnectTimeout);
                } else if now >= self.last_req_time + HS_RETRY_US {
                    // A response may now answer either request: no RTT
                    // sample from it (Karn).
                    self.queue_handshake(0);
                    self.last_req_time = now;
                    self.req_sent_at = None;
                }
            }
            State::Connected => {
                self.ack_timers(now);
                if !self.rx.lost.is_empty() && now >= self.rx.next_nak_time {
                    self.periodic_nak(now);
                }
                if now >= self.next_exp() {
                    self.on_exp(now);
                }
            }
        }
    }

    fn on_exp(&mut self, now: Time) {
        if self.exp_count > 16 && now.saturating_sub(self.last_heard) > self.cfg.idle_timeout_us {
            self.shut(CloseReason::Timeout);
            return;
        }
        self.stats.timeouts += 1;
        let unacked = self.tx.next > self.tx.una;
        if unacked || (self.tx.cursor - self.tx.msg_base) < self.tx.msgs.len() as u64 {
            if unacked && self.tx.lost.is_empty() {
                let (a, b) = (self.seq_of(self.tx.una), self.seq_of(self.tx.next - 1));
                let _ = self.tx.lost.insert(a, b);
            }
            let path = self.path();
            self.cc.on_timeout(now, &path);
        } else {
            self.queue_ctrl(&ControlRepr::KeepAlive, self.peer_id, now);
        }
        self.exp_count += 1;
        self.last_rsp = now;
    }

    // ------------------------------------------------------------------ closing

    /// Closes the connection now: tells the peer (shutdown), fails the
    /// messages not yet acknowledged and gives back every held buffer region.
    pub fn close(&mut self, now: Time) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Connected {
            self.queue_ctrl(&ControlRepr::Shutdown, self.peer_id, now);
        }
        self.shut(CloseReason::Local);
    }

    fn shut(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        for m in std::mem::take(&mut self.tx.msgs) {
            if !m.dropped {
                self.events.push_back(Event::MessageDropped {
                    msg: m.id,
                    reason: DropReason::Closed,
                });
            }
        }
        self.tx.pkts.clear();
        self.tx.lost.clear();
        while !self.rx.slots.is_empty() {
            if let Slot::Pkt { ext, .. } = self.pop_front_slot() {
                self.released.push_back(ext);
            }
        }
        self.rx.lost.clear();
        self.events.push_back(Event::Closed { reason });
    }

    // ------------------------------------------------------------------ output

    /// The next event, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A received payload region the connection no longer references and
    /// did not deliver (duplicate-free: each retained region comes back
    /// exactly once, here or inside a delivery event).
    #[must_use]
    pub fn poll_release(&mut self) -> Option<Extent> {
        self.released.pop_front()
    }

    /// One line of internal state, for logs and failing tests.
    #[doc(hidden)]
    pub fn debug_summary(&self) -> String {
        format!(
            "state {:?} una {} next {} lost {:?} cursor {} msg_base {} msgs {} flow {} \
             cwnd {} period {} next_send {} | rx base {} next {} lost {:?} slots {} held {} \
             last_ack {} last_ack_ack {} next_nak {} | own_min {} rep_min {} | path {:?} | cc {:?}",
            self.state,
            self.tx.una,
            self.tx.next,
            self.tx.lost.ranges().take(3).collect::<Vec<_>>(),
            self.tx.cursor,
            self.tx.msg_base,
            self.tx.msgs.len(),
            self.tx.flow_window,
            self.cc.window(),
            self.cc.period(),
            self.tx.next_send,
            self.rx.base,
            self.rx.next,
            self.rx.lost.ranges().take(3).collect::<Vec<_>>(),
            self.rx.slots.len(),
            self.rx.held,
            self.rx.last_ack,
            self.rx.last_ack_ack,
            self.rx.next_nak_time,
            self.tx.own_min_rtt,
            self.tx.rtt.min(),
            self.path(),
            self.cc
        )
    }
}
