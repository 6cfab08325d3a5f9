//! Types at the connection's boundary: configuration, transmits, events,
//! extents, statistics.

use crate::cc;
use crate::estimate::Time;

/// Largest control packet the connection emits (header included). NAK lists
/// longer than fit are split over several packets.
pub const CTRL_MAX: usize = 128;

/// UDP/IP overhead UDT subtracts from the MSS (IPv4 20 + UDP 8).
pub const IP_UDP_OVERHEAD: u32 = 28;

/// Whether the connection carries messages or a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `UDT_DGRAM`: one `send` is one message, delivered whole and in order.
    #[default]
    Message,
    /// `UDT_STREAM`: bytes in order, no boundaries.
    Stream,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Maximum segment size in bytes, IP and UDP headers included (UDT's MSS);
    /// the payload per packet is `mss − 28 − 16`. Both sides use the smaller.
    pub mss: u32,
    /// Message or stream.
    pub mode: Mode,
    /// Which congestion controller to run.
    pub cc: cc::Kind,
    /// Path bandwidth the windows are sized for, bits/s.
    pub bdp_bandwidth_bps: u64,
    /// Path RTT the windows are sized for, microseconds.
    pub bdp_rtt_us: u64,
    /// Receive buffer (and advertised flow window) as a multiple of the
    /// bandwidth-delay product. Messages are delivered whole and in order, so
    /// a hole at the head holds everything behind it until its retransmission
    /// arrives: at 5 % loss that can take 3–4 round trips. Default 8.
    pub bdp_factor: f64,
    /// Explicit receive buffer in packets; overrides the BDP sizing.
    pub rcv_buf_pkts: Option<u32>,
    /// Largest message `send` accepts (message mode). The receive buffer
    /// always holds two of them: a message is only delivered whole, so a
    /// smaller buffer could deadlock.
    pub max_message_bytes: u32,
    /// Close the connection after this long without hearing from the peer
    /// (and at least 16 EXP expirations, as UDT4), microseconds.
    pub idle_timeout_us: u64,
    /// Give up connecting after this long, microseconds.
    pub connect_timeout_us: u64,
    /// Lower bound of the periodic NAK interval, microseconds (UDT4 uses
    /// 300 ms and, in 4.11, no periodic NAK at all).
    pub min_nak_interval_us: u64,
    /// Lower bound of the EXP interval, microseconds (UDT4: 300 ms).
    pub min_exp_interval_us: u64,
    /// Least interval between the keep-alives of an idle connection (nothing
    /// unsent or unacknowledged), microseconds; their EXP deadlines are also
    /// rounded up to a multiple of [`super::KEEPALIVE_GRID_US`], so an engine's idle
    /// connections send theirs in the same wake-up. A keep-alive heard
    /// restarts the EXP timer; unanswered, it backs off as UDT4's does. A
    /// peer closes only after 16 EXP expirations without hearing anything
    /// (UDT4: and an interval over 5 s, about 46 s of silence; lu2k: and
    /// `idle_timeout_us`), so keep-alives a second or so apart keep UDT4 and
    /// lu2k peers alike. Default 1 s.
    pub keepalive_us: u64,
    /// How far ahead of its pacing time a data packet may leave inside a
    /// [`super::Connection::poll_transmit_batch`] run, microseconds.
    pub batch_horizon_us: u64,
    /// The socket IDs this side draws: `(m, r)` takes only IDs with `id % m == r`
    /// (still drawn at random within that class). The engine gives each core its own
    /// class, so the destination socket ID of an arriving packet names the core that
    /// owns the connection. `(1, 0)` (default): any ID, as UDT4.
    pub socket_id_class: (u32, u32),
    /// The most this connection sends, in bits/s of whole IP packets (UDT4's
    /// `UDT_MAXBW`, there in bytes/s): pacing never runs faster than a packet
    /// of the agreed MSS per `MSS × 8 / max_rate_bps` seconds, whatever the
    /// controller's model says (a caller that adds bytes to every packet, or
    /// packets of its own, lowers the cap by as much). For a peer given its share of a link that
    /// others use too (a gateway's peers on one satellite transponder): the
    /// controller alone takes the whole link it measures. 0: no cap (default).
    pub max_rate_bps: u64,
    /// Send a second copy of each retransmission in a transfer's tail (see
    /// `Connection::repeat`). Default on; off where other redundancy
    /// already covers the tail's losses (the engine's FEC peers: their
    /// repairs are sized to the measured loss, and copies would add bytes
    /// for packets the repairs mostly rebuild).
    pub tail_copies: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mss: 1500,
            mode: Mode::Message,
            cc: cc::Kind::Satellite,
            bdp_bandwidth_bps: 1_000_000_000,
            bdp_rtt_us: 700_000,
            bdp_factor: 8.0,
            rcv_buf_pkts: None,
            max_message_bytes: (1 << 20) + 4096,
            idle_timeout_us: 10_000_000,
            connect_timeout_us: 10_000_000,
            min_nak_interval_us: 20_000,
            min_exp_interval_us: 300_000,
            keepalive_us: 1_000_000,
            batch_horizon_us: 1_000,
            socket_id_class: (1, 0),
            max_rate_bps: 0,
            tail_copies: true,
        }
    }
}

impl Config {
    /// `raw` (a random ID in `1..2^30`) moved into [`Config::socket_id_class`]: the
    /// ID of that class at or just below it, never 0 (the listener's).
    pub fn socket_id_in_class(&self, raw: u32) -> u32 {
        let (m, r) = self.socket_id_class;
        let m = m.max(1);
        let id = raw - raw % m + r % m;
        if id == 0 {
            m
        } else {
            id
        }
    }

    /// Least interval between packets of `mss` bytes, microseconds, under
    /// [`Config::max_rate_bps`] (0 without a cap).
    pub fn min_period_us(&self, mss: u32) -> f64 {
        if self.max_rate_bps == 0 {
            0.0
        } else {
            f64::from(mss) * 8.0 * 1e6 / self.max_rate_bps as f64
        }
    }

    /// Payload bytes per data packet for this MSS.
    pub fn payload_size(&self) -> u32 {
        self.mss.saturating_sub(IP_UDP_OVERHEAD + 16).max(1)
    }

    /// Receive buffer in packets: explicit, or `bdp_factor × BDP`, within
    /// `[32, 2^20]`, and never less than two largest messages plus 32.
    pub fn rcv_buf(&self) -> u32 {
        let floor = if self.mode == Mode::Message {
            2 * self.max_message_bytes.div_ceil(self.payload_size()) + 32
        } else {
            32
        };
        if let Some(n) = self.rcv_buf_pkts {
            return n.clamp(floor, 1 << 20);
        }
        let bdp_bytes = self.bdp_bandwidth_bps as f64 / 8.0 * self.bdp_rtt_us as f64 / 1e6;
        let pkts = bdp_bytes * self.bdp_factor / f64::from(self.mss.max(64));
        (pkts.ceil() as u64).clamp(u64::from(floor), 1 << 20) as u32
    }
}

/// A byte range in memory the engine owns: buffer id, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// The engine's buffer id.
    pub buf: u64,
    /// Offset of the first byte in that buffer.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// A slice of a message the engine registered with [`super::Connection::send`]:
/// `len` bytes at `offset` into message `msg`. The engine maps it onto the
/// message's extents; the connection never sees the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadRef {
    /// The engine's message id.
    pub msg: u64,
    /// Byte offset into the message.
    pub offset: u32,
    /// Bytes.
    pub len: u32,
}

/// Header bytes of one datagram: the 16-byte data header, or a whole control
/// packet (at most [`CTRL_MAX`] bytes).
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; CTRL_MAX],
    len: u8,
}

impl Header {
    pub(crate) fn new() -> Self {
        Header {
            buf: [0; CTRL_MAX],
            len: 0,
        }
    }

    pub(crate) fn buf_mut(&mut self) -> &mut [u8; CTRL_MAX] {
        &mut self.buf
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= CTRL_MAX);
        self.len = len as u8;
    }

    /// The bytes to put on the wire before the payload (if any).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({} bytes)", self.len)
    }
}

/// One datagram to send to the peer: `header` followed by the payload slice,
/// ready for one scatter-gather `sendmsg`.
#[derive(Debug, Clone, Copy)]
pub struct Transmit {
    /// Header bytes (for a control packet: the whole packet).
    pub header: Header,
    /// Payload by reference, for data packets.
    pub payload: Option<PayloadRef>,
}

impl Transmit {
    /// Datagram length in bytes.
    pub fn len(&self) -> usize {
        self.header.as_bytes().len() + self.payload.map_or(0, |p| p.len as usize)
    }

    /// Never true (a datagram has at least a header); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Its time to live expired before the peer had all of it.
    Ttl,
    /// The connection closed first.
    Closed,
}

/// Why the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// [`super::Connection::close`] was called.
    Local,
    /// The peer sent a shutdown.
    Peer,
    /// Nothing heard from the peer for the idle timeout.
    Timeout,
    /// The handshake did not complete in time.
    ConnectTimeout,
    /// The listener rejected the connection.
    Rejected,
}

/// Something the engine must learn about. See [`super::Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed.
    Connected,
    /// Message mode: a whole message arrived, in order. Its payload lies in
    /// `extents`, in order, in buffers the engine owns; the connection no
    /// longer references them.
    MessageReceived {
        /// The UDT message number.
        msg_no: u32,
        /// Where the bytes are, in order.
        extents: Vec<Extent>,
    },
    /// Stream mode: the next bytes of the stream.
    StreamData(Extent),
    /// The peer acknowledged every byte of message `msg` (a TX completion).
    MessageAcked {
        /// The engine's message id.
        msg: u64,
    },
    /// Message `msg` will not be delivered; the peer was told (TTL) or the
    /// connection closed.
    MessageDropped {
        /// The engine's message id.
        msg: u64,
        /// Why.
        reason: DropReason,
    },
    /// The connection is over; no more transmits except what is queued.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Why an incoming datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// Not a UDT packet (too short, bad fields).
    Malformed,
    /// Destination socket ID is not ours.
    WrongSocket,
    /// A data packet outside the receive window, or a duplicate.
    OutOfWindow,
    /// An ACK for packets never sent.
    AckBeyondSent,
    /// A loss report naming packets never sent, or an absurd range.
    BadLossReport,
    /// A handshake that does not fit the state (or a bad cookie, at the listener).
    BadHandshake,
    /// Anything arriving before the connection is set up or after it closed.
    WrongState,
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Data packets sent for the first time.
    pub pkts_sent: u64,
    /// Data packets retransmitted.
    pub pkts_retransmitted: u64,
    /// Second copies of retransmissions (each sent right after its
    /// retransmission: of a packet whose retransmission was lost, and of any
    /// retransmission in a transfer's tail; counted in
    /// `pkts_retransmitted` too).
    pub pkts_repeated: u64,
    /// Data packets received (all, duplicates included).
    pub pkts_received: u64,
    /// Data packets the receiver found missing (gap detections).
    pub pkts_lost_detected: u64,
    /// Sequence numbers reported lost to this sender by NAKs (new ones).
    pub pkts_nak_received: u64,
    /// ACKs (full and light) sent.
    pub acks_sent: u64,
    /// ACKs received.
    pub acks_received: u64,
    /// NAK packets sent.
    pub naks_sent: u64,
    /// NAK packets received.
    pub naks_received: u64,
    /// Message drop requests sent.
    pub drop_reqs_sent: u64,
    /// Payload bytes delivered to the engine.
    pub bytes_delivered: u64,
    /// Payload bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// EXP expirations.
    pub timeouts: u64,
    /// Incoming datagrams dropped, by cause: not a UDT packet.
    pub dropped_malformed: u64,
    /// Wrong destination socket ID.
    pub dropped_wrong_socket: u64,
    /// Data outside the window or duplicate.
    pub dropped_out_of_window: u64,
    /// ACK beyond what was sent.
    pub dropped_ack_beyond_sent: u64,
    /// NAK or message drop request naming unsent packets or an absurd range.
    pub dropped_bad_loss_report: u64,
    /// Handshake not fitting the state.
    pub dropped_bad_handshake: u64,
    /// Wrong state.
    pub dropped_wrong_state: u64,
    /// Smoothed RTT (µs).
    pub rtt_us: u32,
    /// The minimum RTT the controller is told (µs).
    pub min_rtt_us: u32,
    /// Current pacing period (µs): the sending rate is `1e6 / period_us`
    /// packets per second.
    pub period_us: f64,
    /// Current congestion window (packets).
    pub cwnd: f64,
    /// Last flow window advertised by the peer (packets).
    pub flow_window: u32,
    /// Received packets beyond the first hole given back unacknowledged by
    /// [`super::Connection::shed_out_of_order`] (the sender sends them again).
    pub pkts_shed: u64,
    /// Loss ranges beyond the first 1024 of one NAK datagram, ignored (a
    /// bound on the work a NAK may cost).
    pub nak_ranges_ignored: u64,
    /// Message drop requests received (honoured or not).
    pub drop_reqs_received: u64,
    /// Packets that arrived in a slot a drop request had marked for another
    /// message, and were kept (the request was forged or stale).
    pub pkts_undropped: u64,
    /// Work spent on received NAKs: ranges read plus packets in flight
    /// examined. Bounded per datagram by the range cap plus the flight.
    pub nak_work: u64,
    /// Outages: times the path was held dead (an EXP timeout with data in
    /// flight), new data then stopping until the peer answered a probe.
    pub outages: u64,
    /// Probe packets sent into a dead path (each a retransmission).
    pub outage_probes: u64,
    /// Tail probes: the newest packet resent because nothing acknowledged
    /// it two round trips after it left, with nothing behind it to reveal a
    /// loss (counted in `pkts_retransmitted` too).
    pub tail_probes: u64,
    /// Time spent in outages, µs (an ongoing one counted up to its last
    /// probe).
    pub outage_us: u64,
}

impl Stats {
    pub(crate) fn count_drop(&mut self, cause: DropCause) {
        let c = match cause {
            DropCause::Malformed => &mut self.dropped_malformed,
            DropCause::WrongSocket => &mut self.dropped_wrong_socket,
            DropCause::OutOfWindow => &mut self.dropped_out_of_window,
            DropCause::AckBeyondSent => &mut self.dropped_ack_beyond_sent,
            DropCause::BadLossReport => &mut self.dropped_bad_loss_report,
            DropCause::BadHandshake => &mut self.dropped_bad_handshake,
            DropCause::WrongState => &mut self.dropped_wrong_state,
        };
        *c += 1;
    }

    /// All dropped incoming datagrams.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_malformed
            + self.dropped_wrong_socket
            + self.dropped_out_of_window
            + self.dropped_ack_beyond_sent
            + self.dropped_bad_loss_report
            + self.dropped_bad_handshake
            + self.dropped_wrong_state
    }
}

/// Why [`super::Connection::send`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closed (or closing).
    Closed,
    /// An empty message.
    Empty,
    /// Larger than [`Config::max_message_bytes`] (message mode) or 2^31 bytes.
    TooLong,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::Closed => "connection closed: open a new one",
            SendError::Empty => "empty message: UDT messages carry at least one byte",
            SendError::TooLong => {
                "message longer than the configured maximum: split it or raise max_message_bytes"
            }
        })
    }
}

impl std::error::Error for SendError {}

/// Microseconds; re-exported for convenience.
pub type Instant = Time;
