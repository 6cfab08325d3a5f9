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
//!   the timer's backoff (`exp_count`) is kept until the peer reports. The
//!   first packet sent while nothing was in flight restarts it too (RFC
//!   6298's rule): counted from an answer or keep-alive a second old, it
//!   would fire before that packet could be acknowledged.
//! - TTL applies until a message has left completely (see
//!   [`Connection::send`]).
//! - Light ACKs go out every 64 packets as in UDT4, but at most one per
//!   100 µs: above ~0.6 M packets/s (loopback, fast LANs) they would be
//!   tens of thousands of sends a second for nothing; the window still
//!   advances every few hundred packets.
//! - Keep-alives. An idle connection's EXP timer (it sends the keep-alive)
//!   fires at least [`Config::keepalive_us`] (1 s) after the peer was last
//!   heard, not UDT4's 300 ms, on a quarter-second grid: an engine with
//!   many idle peers wakes a few times a second for all of them, instead
//!   of several times a second for each. UDT4 peers stay up (they close
//!   after 16 silent EXPs, tens of seconds).
//! - Outages. When the EXP timer fires with data in flight (a whole RTO —
//!   `RTT + 4·RTTVar + 10 ms`, at least `min_exp_interval_us` — without an
//!   advancing ACK or a NAK), the path is held dead: no new data and no
//!   retransmissions go out, only a probe every half RTT (the first eight,
//!   then the interval doubles up to two RTTs). A probe is the newest packet
//!   sent and the oldest unacknowledged one, retransmitted: the receiver
//!   answers the newest with a NAK naming exactly what the outage lost, the
//!   oldest with an advancing ACK where its own reports were what was lost.
//!   The first advancing ACK or NAK ends the outage and sending resumes at the
//!   controller's rate, which the outage left alone; if an ACK ended it and
//!   no NAK names the outage's last packets within an RTO of the last probe,
//!   the flight the outage left unacknowledged is resent. UDT4 instead
//!   resends the whole flight on every EXP, into the dead path. Only the
//!   idle timeout (the peer-down rule, unchanged) closes the connection.
//! - The receiver counts a packet pair for the capacity estimate only if
//!   its two packets left the sender together (their header timestamps at
//!   most 10 µs or under half their arrival gap apart): a pair the sender's
//!   window or the application split measured the sender, not the link.
//! - A probe pair leaves behind a lead packet (sequence numbers ≡ 15, 0 and
//!   1 mod 16 back to back; UDT4 sends the pair alone). Whatever handles the first
//!   packet of a burst after an idle spell late (a host or router waking, a
//!   cold send path) then delays the lead, not the pair. A lone pair
//!   crossing an idle path arrives squeezed, its capacity reads above the
//!   link, and a fast start paced at it floods the bottleneck queue. (A
//!   UDT4 receiver's arrival speed, a median-filtered mean of its last 16
//!   arrival intervals, drops the triple's two near-zero intervals and keeps
//!   the three-interval gap after it: it reads below the pace, twice as
//!   far as with a lone pair's two-interval gap.)
//! - Second copies of retransmissions: a packet whose retransmission was
//!   lost goes out twice on its next one, and so does every retransmission
//!   in a transfer's tail (no new data waiting, room in the window, the
//!   other repairs leaving within a quarter RTT; [`Config::tail_copies`]).
//!
//! # Layout
//!
//! This module holds [`Connection`], its inputs and outputs, and what both
//! halves share (sequence mapping, path estimates, the control queue). The
//! rest is split by concern, each file an `impl Connection` block: `sender`
//! (the `Sender` state: messages out, pacing), `feedback` (what the peer's
//! ACKs and NAKs do to the sender), `receiver` (the `Receiver` state: data
//! in, delivery, ACKs and NAKs out), `handshake` (connect, accept) and
//! `timers` (ACK, NAK and EXP timers). [`Listener`] is the stateless server
//! side of the handshake.

mod feedback;
mod handshake;
mod listener;
mod min_rtt;
mod receiver;
mod sender;
mod timers;
mod types;

pub use listener::{
    handshake_socket_id, Limits, Listener, ListenerOutput, ListenerStats, COOKIE_BUCKET_US,
};
pub use types::*;

use std::collections::VecDeque;
use std::net::SocketAddr;

use receiver::Receiver;
use sender::Sender;

use crate::cc::{Controller, Path};
use crate::estimate::Time;
use crate::seq::SeqNo;
use crate::wire::{ControlRepr, HandshakeRepr, NakList, Packet};

/// UDT's SYN interval: ACK timer and rate-control period, microseconds.
pub const SYN_US: u64 = 10_000;
/// The grid an idle connection's keep-alives fall on, microseconds (see
/// [`Config::keepalive_us`]): idle connections whose keep-alives come due
/// within the same quarter second send them in one wake-up, not one each.
pub const KEEPALIVE_GRID_US: u64 = 250_000;
/// Largest loss range a NAK (or message drop request) may name (a
/// hostile-input bound).
const MAX_NAK_SPAN: u64 = 1 << 22;

// Bounds on what the peer reports. Its reports steer our timers and our
// sending rate, and without authentication anyone who has seen the
// connection can forge them; kept within what a real path can be, a forged
// one costs a bounded stall, not hours.

/// Largest RTT taken from the peer's ACKs, and the largest EXP interval
/// before its backoff multiple, µs (RFC 6298 2.5: an RTO may be capped at
/// no less than 60 s). A GEO hop is 0.6 s; an outage's ACK→ACK2 round trip
/// may be tens of seconds.
const MAX_RTT_US: u32 = 60_000_000;
/// Largest flow window taken from the peer (handshake or ACK), packets: the
/// largest receive buffer [`Config::rcv_buf`] gives, 2^20 packets.
const MAX_FLOW_WINDOW: u32 = 1 << 20;
/// Fastest link a reported receive rate or capacity may describe, bits/s.
const MAX_LINK_BPS: u64 = 400_000_000_000;

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

/// Probes into a dead path that leave every half RTT before the interval
/// starts doubling: four RTTs of quick probing, so that a path back within
/// that (a GEO outage of a few seconds is 5 RTT) is found within half an RTT
/// and the data flows again within two.
const OUTAGE_FAST_PROBES: u32 = 8;

/// A dead path (see the module docs, "Outages").
#[derive(Debug, Clone, Copy)]
struct Outage {
    /// Up to when its time is counted in [`Stats::outage_us`].
    counted: Time,
    /// When the next probe leaves.
    next_probe: Time,
    /// The second packet of the probe just sent is still to go.
    oldest_due: bool,
    /// Probes sent so far.
    probes: u32,
}

/// splitmix64: the connection's only source of randomness, from the seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    /// The initial sequence number: packet index 0.
    isn: SeqNo,
    /// Time zero of the header timestamps we send.
    start: Time,
    payload_size: u32,
    mss: u32,
    /// Control packets waiting to go out, ahead of any data.
    ctrl: VecDeque<Header>,
    events: VecDeque<Event>,
    released: VecDeque<Extent>,
    stats: Stats,
    /// When the EXP timer last restarted.
    last_rsp: Time,
    /// When anything last arrived from the peer (for the idle close).
    last_heard: Time,
    /// EXP backoff: the interval's multiple.
    exp_count: u32,
    /// The handshake this side sends.
    hs: HandshakeRepr,
    /// When the last handshake request went out.
    last_req_time: Time,
    /// When the request a response would answer went out; `None` once more
    /// than one could be answered (no RTT sample then).
    req_sent_at: Option<Time>,
    connect_deadline: Time,
    tx: Sender,
    rx: Receiver,
    cc: Box<dyn Controller>,
    /// Set while the path is held dead.
    outage: Option<Outage>,
    /// After an outage an ACK ended: when to resend the flight the outage
    /// left unacknowledged if no NAK has named its end by then, and that
    /// flight's end (see [`Connection::await_outage_nak`]).
    outage_resend: Option<(Time, u64)>,
}

impl Connection {
    fn new(now: Time, cfg: Config, seed: u64, peer: SocketAddr, role: Role) -> Connection {
        let mut rng = seed;
        let socket_id = cfg.socket_id_in_class((splitmix(&mut rng) as u32 & 0x3FFF_FFFF).max(1));
        let isn = SeqNo::new(splitmix(&mut rng) as u32 & SeqNo::MAX);
        let cc_seed = splitmix(&mut rng);
        let buf_pkts = cfg.rcv_buf();
        let hs = handshake::request(&cfg, socket_id, isn, buf_pkts, peer);
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
            tx: Sender::new(now),
            rx: Receiver::new(now, buf_pkts),
            cc: cfg.cc.build(cc_seed),
            outage: None,
            outage_resend: None,
            cfg,
        }
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
        s.min_rtt_us = self.path().min_rtt;
        s.period_us = self.period();
        s.cwnd = self.cc.window();
        s.flow_window = self.flow_window();
        s
    }

    /// The peer's flow window, within what any receive buffer can be.
    fn flow_window(&self) -> u32 {
        self.tx.flow_window.clamp(2, MAX_FLOW_WINDOW)
    }

    /// Interval between data packets, microseconds: the controller's, no
    /// shorter than [`Config::max_rate_bps`] allows for packets of the agreed MSS.
    fn period(&self) -> f64 {
        self.cc
            .period()
            .max(self.cfg.min_period_us(self.mss))
            .max(0.0)
    }

    /// The most packets a second a reported rate may claim: a
    /// [`MAX_LINK_BPS`] link full of packets of our MSS.
    fn max_rate_pps(&self) -> u32 {
        u32::try_from(MAX_LINK_BPS / 8 / u64::from(self.mss.max(1))).unwrap_or(u32::MAX)
    }

    /// Received payload regions the connection still references.
    pub fn held(&self) -> usize {
        self.rx.held
    }

    /// The receiver's cumulative ACK point (packets received in order since
    /// the connection began, as of the last full ACK): it moves whenever a
    /// receive hole at the front is filled, even while no whole message is
    /// complete yet.
    pub fn rcv_ack_point(&self) -> u64 {
        self.rx.last_ack
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

    /// Whether [`Connection::rtt`] is measured (an ACK/ACK2 round trip either
    /// way) rather than UDT's assumed 100 ms.
    pub fn rtt_measured(&self) -> bool {
        self.tx.rtt.samples() > 0 || self.rx.rtt.samples() > 0
    }

    fn rtt_var(&self) -> u32 {
        if self.tx.rtt.samples() > 0 {
            self.tx.rtt.var()
        } else {
            self.rx.rtt.var()
        }
    }

    /// What the controller is told about the path.
    fn path(&self) -> Path {
        let mut min_rtt = self.tx.min_rtt.get();
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
            max_window: self.flow_window().max(self.hs.flight_flag_size),
            snd_curr_seq: self.seq_of(self.tx.next.wrapping_sub(1)).get(),
            inflight: (self.tx.next - self.tx.una) as u32,
        }
    }

    /// The wire sequence number of packet index `idx`.
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

    // ------------------------------------------------------------------ output

    /// The next datagram to send now, if any. Control packets come first,
    /// then retransmissions, then new data as pacing and windows allow.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit> {
        if self.outage.is_some() {
            return self.outage_transmit(now);
        }
        self.transmit(now, 0)
    }

    /// Appends to `out` a run of up to `max` data transmits of equal length
    /// (for one UDP GSO send), or a single control transmit. Returns how many
    /// were appended. Data the pacer schedules within the next
    /// [`Config::batch_horizon_us`] leaves now, so a batch is a short burst
    /// at line rate: the horizon bounds it.
    pub fn poll_transmit_batch(&mut self, now: Time, out: &mut Vec<Transmit>, max: usize) -> usize {
        if self.outage.is_some() {
            return match self.outage_transmit(now) {
                Some(t) if max > 0 => {
                    out.push(t);
                    1
                }
                _ => 0,
            };
        }
        let early = self.cfg.batch_horizon_us;
        if self.batch_held_back(now, early, max) {
            return 0;
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

    /// When [`Connection::handle_timeout`] should next be called (or
    /// `poll_transmit`, for pacing); `None` when nothing is pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.state {
            State::Closed => None,
            State::Connecting => Some(self.handshake_deadline()),
            State::Connected => Some(
                self.outage_resend
                    .map_or(u64::MAX, |(t, _)| t)
                    .min(self.connected_deadline()),
            ),
        }
    }

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
            self.handle_control_datagram(now, &pkt, dst);
            false
        } else {
            self.handle_data_datagram(now, &pkt, dst, at)
        }
    }

    fn handle_control_datagram(&mut self, now: Time, pkt: &Packet<&[u8]>, dst: u32) {
        let Ok(repr) = ControlRepr::parse(pkt) else {
            self.stats.count_drop(DropCause::Malformed);
            return;
        };
        let hs_to_listener = matches!(repr, ControlRepr::Handshake(_)) && dst == 0;
        if dst != self.socket_id && !hs_to_listener {
            self.stats.count_drop(DropCause::WrongSocket);
            return;
        }
        self.handle_control(now, repr);
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
        let resumed_by_ack = match &repr {
            // An ACK that moves nothing is the receiver repeating itself
            // (the forward path may still be dead); it answers no probe.
            ControlRepr::Ack { last, .. } if self.acks_new(*last) => self.path_answered(now),
            ControlRepr::Nak { loss } => {
                self.path_answered(now);
                self.nak_after_outage(loss);
                None
            }
            _ => None,
        };
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
            } => self.handle_drop_req(msg_no, first, last),
            ControlRepr::Shutdown => self.shut(CloseReason::Peer),
            ControlRepr::KeepAlive
            | ControlRepr::CongestionWarning
            | ControlRepr::PeerError { .. }
            | ControlRepr::Handshake(_) => {}
        }
        if let Some(last_probe) = resumed_by_ack {
            self.await_outage_nak(now, last_probe);
        }
    }

    /// Runs the timers due at `now`: ACK, periodic NAK, EXP (retransmission
    /// on silence, keep-alive, idle close), handshake retransmission.
    pub fn handle_timeout(&mut self, now: Time) {
        match self.state {
            State::Closed => {}
            State::Connecting => self.handshake_timer(now),
            State::Connected => {
                self.connected_timers(now);
                self.outage_resend_timer(now);
            }
        }
    }

    // ------------------------------------------------------------------ outages

    /// True while the path is held dead (no data but probes goes out).
    pub fn in_outage(&self) -> bool {
        self.outage.is_some()
    }

    /// The EXP timer fired with data in flight: a whole RTO passed without an
    /// advancing ACK or a NAK. At any loss rate a live path reports within
    /// an RTT plus a SYN (ACKs every SYN, a NAK on every gap), so a silence
    /// of an RTO is the path, not the loss; acting sooner could not tell a
    /// dead path from an ACK still on its way. Stops new data; the first
    /// probe leaves at once.
    pub(super) fn enter_outage(&mut self, now: Time) {
        let path = self.path();
        self.cc.on_timeout(now, &path);
        if self.outage.is_some() {
            return;
        }
        // A second copy due before the silence would leave once the path is
        // back, ahead of the repairs the receiver then asks for.
        self.tx.again = None;
        self.stats.outages += 1;
        self.outage = Some(Outage {
            counted: now,
            next_probe: now,
            oldest_due: false,
            probes: 0,
        });
    }

    /// Whether an ACK of `last` acknowledges packets not yet acknowledged.
    fn acks_new(&self, last: SeqNo) -> bool {
        self.idx_of(self.tx.una, last)
            .is_some_and(|a| a > self.tx.una && a <= self.tx.next)
    }

    /// An advancing ACK or a NAK arrived: the path carries our packets'
    /// reports again.
    /// Sending resumes at the controller's rate (pacing restarts from now,
    /// no burst). Returns, if an outage ended, when its last probe left.
    fn path_answered(&mut self, now: Time) -> Option<Time> {
        let o = self.outage.take()?;
        self.stats.outage_us += now.saturating_sub(o.counted);
        let floor = now as f64 - self.period();
        if self.tx.next_send < floor {
            self.tx.next_send = floor;
        }
        Some(o.counted)
    }

    /// An ACK, not a NAK, ended the outage. Usually the receiver repeated
    /// its last ACK on its own and the NAK answering the newest probe (or
    /// the first new data) is still on its way: it will name exactly what
    /// the outage lost. But a receiver that holds the newest packet has no
    /// gap to report, and what it misses lies among packets it reported
    /// lost once — which a UDT4 receiver never reports again. So unless a
    /// NAK names the end of the outage's flight within an RTO of the last
    /// probe, that flight is resent, as UDT4 does on every EXP. (Resent at
    /// once, a flight at 0.1 % loss is mostly packets the receiver holds
    /// beyond a hole: half a second of the link at 600 ms.)
    fn await_outage_nak(&mut self, now: Time, last_probe: Time) {
        let end = self.tx.next;
        if end == self.tx.una {
            return;
        }
        let rto = u64::from(self.rtt()) + 4 * u64::from(self.rtt_var()) + 2 * SYN_US;
        self.outage_resend = Some((last_probe.max(now.saturating_sub(rto)) + rto, end));
    }

    /// A NAK after an outage an ACK ended: one naming the last packets
    /// sent before or in the outage is the receiver's report of what the
    /// outage lost, and no resend is needed.
    fn nak_after_outage(&mut self, loss: &NakList<'_>) {
        let Some((_, end)) = self.outage_resend else {
            return;
        };
        let tail = end.saturating_sub(2);
        let names_tail = loss.ranges().take(64).any(|(a, b)| {
            match (self.idx_of(self.tx.una, a), self.idx_of(self.tx.una, b)) {
                (Some(a), Some(b)) => a < end && b >= tail,
                _ => false,
            }
        });
        if names_tail {
            self.outage_resend = None;
        }
    }

    fn outage_resend_timer(&mut self, now: Time) {
        let Some((due, end)) = self.outage_resend else {
            return;
        };
        if now < due {
            return;
        }
        self.outage_resend = None;
        let end = end.min(self.tx.next);
        if end > self.tx.una {
            let (a, b) = (self.seq_of(self.tx.una), self.seq_of(end - 1));
            let _ = self.tx.lost.insert(a, b);
        }
    }

    /// Interval after probe number `n` (1 = the first): half an RTT (at
    /// least a SYN) for the first [`OUTAGE_FAST_PROBES`], then doubling up
    /// to two RTTs. Probing costs a packet or two per interval; backing off
    /// bounds it on a path that stays dead until the idle timeout.
    fn probe_interval(&self, n: u32) -> u64 {
        let rtt = u64::from(self.rtt()).max(2 * SYN_US);
        let extra = n.saturating_sub(OUTAGE_FAST_PROBES).min(2);
        (rtt / 2) << extra
    }

    /// When the next probe leaves, while the path is held dead.
    pub(super) fn outage_deadline(&self) -> Option<Time> {
        self.outage.map(|o| {
            if o.oldest_due {
                o.counted
            } else {
                o.next_probe
            }
        })
    }

    /// What leaves while the path is held dead: control packets, and a probe
    /// when due — the newest packet sent, then at once the oldest
    /// unacknowledged one (a single packet where they are the same).
    fn outage_transmit(&mut self, now: Time) -> Option<Transmit> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some(Transmit {
                header: h,
                payload: None,
            });
        }
        let mut o = self.outage?;
        if self.state != State::Connected || self.tx.next == self.tx.una {
            return None;
        }
        let (oldest, newest) = (self.tx.una, self.tx.next - 1);
        let idx = if o.oldest_due {
            o.oldest_due = false;
            oldest
        } else {
            if now < o.next_probe {
                return None;
            }
            o.probes += 1;
            o.next_probe = now + self.probe_interval(o.probes);
            o.oldest_due = oldest != newest;
            newest
        };
        self.stats.outage_us += now.saturating_sub(o.counted);
        o.counted = now;
        self.outage = Some(o);
        self.stats.outage_probes += 1;
        let pi = (idx - self.tx.una) as usize;
        let pkt = self.tx.pkts[pi];
        let m = &self.tx.msgs[(pkt.msg - self.tx.msg_base) as usize];
        let (msg_no, id) = (m.msg_no, m.id);
        let p = &mut self.tx.pkts[pi];
        p.sent_at = now;
        p.retx = true;
        self.stats.pkts_retransmitted += 1;
        let (t, _, _) = self.data_out(now, idx, pkt, msg_no, id, true);
        Some(t)
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
        self.drop_all_msgs();
        self.release_all();
        self.events.push_back(Event::Closed { reason });
    }

    /// One line of internal state, for logs and failing tests.
    #[doc(hidden)]
    pub fn debug_summary(&self) -> String {
        format!(
            "state {:?} una {} next {} lost {:?} cursor {} msg_base {} msgs {} flow {} \
             cwnd {} period {} next_send {} | rx base {} next {} lost {:?} slots {} held {} \
             last_ack {} last_ack_ack {} next_nak {} | own_min {} min_rtt {} | path {:?} | cc {:?}",
            self.state,
            self.tx.una,
            self.tx.next,
            self.tx.lost.ranges().take(3).collect::<Vec<_>>(),
            self.tx.cursor,
            self.tx.msg_base,
            self.tx.msgs.len(),
            self.tx.flow_window,
            self.cc.window(),
            self.period(),
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
            self.tx.min_rtt.get(),
            self.path(),
            self.cc
        )
    }
}
