//! Control packets: handshake, keep-alive, ACK, NAK, congestion warning,
//! shutdown, ACK2, message drop request, peer error.

use super::packet::{Packet, HEADER_LEN};
use super::{Error, Result};
use crate::seq::{AckNo, MsgNo, SeqNo};
use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Control packet types (bits 30..16 of word 0; UDT4 `packet.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ControlType {
    /// Connection handshake.
    Handshake = 0,
    /// Keep-alive.
    KeepAlive = 1,
    /// Acknowledgement (full or light).
    Ack = 2,
    /// Negative acknowledgement (loss report).
    Nak = 3,
    /// Congestion / delay warning.
    CongestionWarning = 4,
    /// Shutdown.
    Shutdown = 5,
    /// Acknowledgement of an acknowledgement.
    Ack2 = 6,
    /// Message drop request.
    MsgDropReq = 7,
    /// Error signal from the peer.
    PeerError = 8,
}

impl ControlType {
    /// The type for a 15-bit wire value, `None` if unknown.
    pub const fn from_u16(v: u16) -> Option<ControlType> {
        Some(match v {
            0 => ControlType::Handshake,
            1 => ControlType::KeepAlive,
            2 => ControlType::Ack,
            3 => ControlType::Nak,
            4 => ControlType::CongestionWarning,
            5 => ControlType::Shutdown,
            6 => ControlType::Ack2,
            7 => ControlType::MsgDropReq,
            8 => ControlType::PeerError,
            _ => return None,
        })
    }
}

/// The socket type of a handshake (UDT4 `UDT_STREAM` / `UDT_DGRAM`).
/// A UDT4 listener rejects a handshake whose type differs from its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketType {
    /// `UDT_STREAM` = 1: a byte stream.
    Stream,
    /// `UDT_DGRAM` = 2: messages (`sendmsg`/`recvmsg`).
    Dgram,
    /// Any other value, kept so it can be echoed.
    Other(u32),
}

impl SocketType {
    /// From the wire value.
    pub const fn from_u32(v: u32) -> SocketType {
        match v {
            1 => SocketType::Stream,
            2 => SocketType::Dgram,
            v => SocketType::Other(v),
        }
    }

    /// The wire value.
    pub const fn to_u32(self) -> u32 {
        match self {
            SocketType::Stream => 1,
            SocketType::Dgram => 2,
            SocketType::Other(v) => v,
        }
    }
}

/// The request type of a handshake (UDT4 `m_iReqType`).
///
/// The client/server exchange in UDT 4.11 (`core.cpp`): the client sends
/// `Request` (1) with cookie 0; the listener answers with the same handshake
/// carrying its SYN cookie, destination ID = the client's socket ID; the
/// client repeats it as `Response` (-1) with that cookie; the listener
/// answers `Response` (-1) with its own socket ID, the negotiated MSS and
/// flight flag size and the client's ISN — or `Rejected` (1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReqType {
    /// 0: rendezvous request.
    Rendezvous,
    /// 1: a client's first (cookie-less) request.
    Request,
    /// -1: a client's request with cookie, or the server's response.
    Response,
    /// -2: rendezvous response.
    RendezvousResponse,
    /// 1002: the listener rejected the connection.
    Rejected,
    /// Any other value.
    Other(i32),
}

impl ReqType {
    /// From the wire value.
    pub const fn from_i32(v: i32) -> ReqType {
        match v {
            0 => ReqType::Rendezvous,
            1 => ReqType::Request,
            -1 => ReqType::Response,
            -2 => ReqType::RendezvousResponse,
            1002 => ReqType::Rejected,
            v => ReqType::Other(v),
        }
    }

    /// The wire value.
    pub const fn to_i32(self) -> i32 {
        match self {
            ReqType::Rendezvous => 0,
            ReqType::Request => 1,
            ReqType::Response => -1,
            ReqType::RendezvousResponse => -2,
            ReqType::Rejected => 1002,
            ReqType::Other(v) => v,
        }
    }
}

/// The 48-byte handshake (UDT4 `CHandShake`, serialized as 12 words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandshakeRepr {
    /// UDT version; UDT 4.11 sends 4 and rejects anything else.
    pub version: u32,
    /// Stream or message (datagram) socket.
    pub socket_type: SocketType,
    /// Initial sequence number. In the server's response it is the client's
    /// ISN echoed back (UDT4 checks it), and both sides then start from it.
    pub isn: SeqNo,
    /// Maximum segment size in bytes, including IP and UDP headers (UDT4
    /// derives its payload size as `mss - 28 - 16`). Both sides use the
    /// smaller.
    pub mss: u32,
    /// Maximum flow window in packets.
    pub flight_flag_size: u32,
    /// Request type.
    pub req_type: ReqType,
    /// The sender's own socket ID.
    pub socket_id: u32,
    /// SYN cookie (0 in a first request).
    pub cookie: u32,
    /// The receiver's IP address as the sender sees it, in UDT4's word
    /// encoding (see [`HandshakeRepr::encode_peer_ip`]).
    pub peer_ip: [u32; 4],
}

impl HandshakeRepr {
    /// Size of the handshake control information.
    pub const LEN: usize = 48;
    /// The version UDT 4.11 speaks.
    pub const UDT4_VERSION: u32 = 4;

    fn parse_info(b: &[u8]) -> Result<HandshakeRepr> {
        if b.len() < Self::LEN {
            return Err(Error::Truncated);
        }
        let w = |i: usize| word(b, i);
        let isn = SeqNo::new_checked(w(2)).ok_or(Error::Malformed)?;
        Ok(HandshakeRepr {
            version: w(0),
            socket_type: SocketType::from_u32(w(1)),
            isn,
            mss: w(3),
            flight_flag_size: w(4),
            req_type: ReqType::from_i32(w(5) as i32),
            socket_id: w(6),
            cookie: w(7),
            peer_ip: [w(8), w(9), w(10), w(11)],
        })
    }

    fn emit_info(&self, b: &mut [u8]) {
        let words = [
            self.version,
            self.socket_type.to_u32(),
            self.isn.get(),
            self.mss,
            self.flight_flag_size,
            self.req_type.to_i32() as u32,
            self.socket_id,
            self.cookie,
            self.peer_ip[0],
            self.peer_ip[1],
            self.peer_ip[2],
            self.peer_ip[3],
        ];
        for (i, v) in words.iter().enumerate() {
            put_word(b, i, *v);
        }
    }

    /// Encodes an address the way UDT 4.11 on a little-endian host does
    /// (`CIPAddress::ntop`, then `htonl` per word in `channel.cpp`): IPv4
    /// goes into word 0 as the in-memory `s_addr` read as a host integer,
    /// so 127.0.0.1 is the word 0x0100_007F; IPv6 fills four words, each
    /// from four address bytes in little-endian order.
    pub fn encode_peer_ip(addr: IpAddr) -> [u32; 4] {
        match addr {
            IpAddr::V4(a) => [u32::from_le_bytes(a.octets()), 0, 0, 0],
            IpAddr::V6(a) => {
                let o = a.octets();
                let mut w = [0u32; 4];
                for (i, slot) in w.iter_mut().enumerate() {
                    *slot =
                        u32::from_le_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                w
            }
        }
    }

    /// The inverse of [`HandshakeRepr::encode_peer_ip`]; `v6` selects the
    /// family (the handshake does not say).
    pub fn decode_peer_ip(peer_ip: [u32; 4], v6: bool) -> IpAddr {
        if v6 {
            let mut o = [0u8; 16];
            for (i, w) in peer_ip.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(peer_ip[0].to_le_bytes()))
        }
    }
}

/// Receive and link-capacity estimates in a full ACK (words 4 and 5), sent
/// by UDT4 at most once per SYN interval (10 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckRates {
    /// Packet arrival rate at the receiver, packets per second.
    pub recv_rate: u32,
    /// Estimated link capacity, packets per second.
    pub link_capacity: u32,
}

/// The part of a full ACK beyond the acknowledged sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckStats {
    /// RTT estimate in microseconds.
    pub rtt: u32,
    /// RTT variance in microseconds.
    pub rtt_var: u32,
    /// Available receive buffer, in packets (UDT4 `getAvailBufSize`; the
    /// draft says bytes, the code sends packets; UDT4 never sends less than
    /// 2). The sender uses it as its flow window.
    pub avail_buf: u32,
    /// Rate estimates, present in a 24-byte ACK, absent in a 16-byte one.
    pub rates: Option<AckRates>,
}

/// A control packet's meaning (type, additional info and control
/// information). The time stamp and destination socket ID are header fields
/// read with [`Packet::timestamp`] / [`Packet::dst_socket_id`] and passed to
/// [`ControlRepr::emit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRepr<'a> {
    /// Type 0: handshake, 48 bytes of control information.
    Handshake(HandshakeRepr),
    /// Type 1: keep-alive.
    KeepAlive,
    /// Type 2: acknowledgement. A light ACK (`stats == None`) carries only
    /// `last`, in 4 bytes; UDT4 leaves its additional info 0 and does not
    /// answer it with an ACK2.
    Ack {
        /// ACK sub-sequence number (additional info), echoed by the ACK2.
        ack_seq_no: AckNo,
        /// Every packet before this one has been received.
        last: SeqNo,
        /// Present in a full ACK.
        stats: Option<AckStats>,
    },
    /// Type 3: loss report.
    Nak {
        /// The lost sequence numbers, range-encoded.
        loss: NakList<'a>,
    },
    /// Type 4: congestion / delay warning.
    CongestionWarning,
    /// Type 5: shutdown.
    Shutdown,
    /// Type 6: acknowledgement of the ACK numbered `ack_seq_no`.
    Ack2 {
        /// The ACK being acknowledged.
        ack_seq_no: AckNo,
    },
    /// Type 7: the sender dropped a message (its TTL expired); the receiver
    /// stops waiting for `first ..= last`.
    ///
    /// UDT4 puts the whole message-number word (with position bits) into
    /// the additional info; only its low 29 bits are kept here. UDT 4.11
    /// computes `last` as `first + msglen`, one past the message; that is
    /// the sender's business, the field is carried as sent.
    MsgDropReq {
        /// The dropped message.
        msg_no: MsgNo,
        /// Its first packet.
        first: SeqNo,
        /// Its last packet.
        last: SeqNo,
    },
    /// Type 8: the peer reports an error (UDT4 only sends it when
    /// `recvfile` fails).
    PeerError {
        /// Error code (additional info).
        code: u32,
    },
}

#[inline]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

#[inline]
fn put_word(b: &mut [u8], i: usize, v: u32) {
    b[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn seq_word(b: &[u8], i: usize) -> Result<SeqNo> {
    SeqNo::new_checked(word(b, i)).ok_or(Error::Malformed)
}

/// Length of the zero padding UDT4 sends as the control information of
/// packets that have none ("writev does not allow" an empty vector).
const PAD_LEN: usize = 4;
const LIGHT_ACK_LEN: usize = 4;
const ACK_LEN: usize = 16;
const FULL_ACK_LEN: usize = 24;
const MSG_DROP_LEN: usize = 8;

impl<'a> ControlRepr<'a> {
    /// Reads a control packet. Never panics.
    ///
    /// Control information longer than a type needs is ignored (UDT4 does
    /// the same), except for the NAK, whose length must be a multiple of 4.
    /// The extended-type field is ignored for all known types.
    pub fn parse<T: AsRef<[u8]>>(packet: &'a Packet<T>) -> Result<ControlRepr<'a>> {
        Self::parse_bytes(packet.as_bytes())
    }

    /// [`ControlRepr::parse`] on a whole datagram without building a view
    /// first. Never panics.
    pub fn parse_bytes(datagram: &'a [u8]) -> Result<ControlRepr<'a>> {
        let packet = Packet::new_checked(datagram)?;
        if !packet.is_control() {
            return Err(Error::WrongKind);
        }
        let ty = packet.control_type();
        let ctype = ControlType::from_u16(ty).ok_or(Error::UnknownType(ty))?;
        let add = packet.additional_info();
        let info = &datagram[HEADER_LEN..];
        Ok(match ctype {
            ControlType::Handshake => ControlRepr::Handshake(HandshakeRepr::parse_info(info)?),
            ControlType::KeepAlive => ControlRepr::KeepAlive,
            ControlType::Ack => {
                let ack_seq_no = AckNo::new_checked(add).ok_or(Error::Malformed)?;
                match info.len() {
                    0..LIGHT_ACK_LEN => return Err(Error::Truncated),
                    LIGHT_ACK_LEN => ControlRepr::Ack {
                        ack_seq_no,
                        last: seq_word(info, 0)?,
                        stats: None,
                    },
                    n if n < ACK_LEN => return Err(Error::BadLength),
                    n => {
                        let rates = if n >= FULL_ACK_LEN {
                            Some(AckRates {
                                recv_rate: word(info, 4),
                                link_capacity: word(info, 5),
                            })
                        } else if n == ACK_LEN {
                            None
                        } else {
                            return Err(Error::BadLength);
                        };
                        ControlRepr::Ack {
                            ack_seq_no,
                            last: seq_word(info, 0)?,
                            stats: Some(AckStats {
                                rtt: word(info, 1),
                                rtt_var: word(info, 2),
                                avail_buf: word(info, 3),
                                rates,
                            }),
                        }
                    }
                }
            }
            ControlType::Nak => ControlRepr::Nak {
                loss: NakList::new_checked(info)?,
            },
            ControlType::CongestionWarning => ControlRepr::CongestionWarning,
            ControlType::Shutdown => ControlRepr::Shutdown,
            ControlType::Ack2 => ControlRepr::Ack2 {
                ack_seq_no: AckNo::new_checked(add).ok_or(Error::Malformed)?,
            },
            ControlType::MsgDropReq => {
                if info.len() < MSG_DROP_LEN {
                    return Err(Error::Truncated);
                }
                ControlRepr::MsgDropReq {
                    msg_no: MsgNo::new(add),
                    first: seq_word(info, 0)?,
                    last: seq_word(info, 1)?,
                }
            }
            ControlType::PeerError => ControlRepr::PeerError { code: add },
        })
    }

    /// The type of this packet.
    pub const fn control_type(&self) -> ControlType {
        match self {
            ControlRepr::Handshake(_) => ControlType::Handshake,
            ControlRepr::KeepAlive => ControlType::KeepAlive,
            ControlRepr::Ack { .. } => ControlType::Ack,
            ControlRepr::Nak { .. } => ControlType::Nak,
            ControlRepr::CongestionWarning => ControlType::CongestionWarning,
            ControlRepr::Shutdown => ControlType::Shutdown,
            ControlRepr::Ack2 { .. } => ControlType::Ack2,
            ControlRepr::MsgDropReq { .. } => ControlType::MsgDropReq,
            ControlRepr::PeerError { .. } => ControlType::PeerError,
        }
    }

    /// Length of the control information [`ControlRepr::emit`] writes.
    pub const fn info_len(&self) -> usize {
        match self {
            ControlRepr::Handshake(_) => HandshakeRepr::LEN,
            ControlRepr::Ack { stats: None, .. } => LIGHT_ACK_LEN,
            ControlRepr::Ack {
                stats: Some(AckStats { rates: None, .. }),
                ..
            } => ACK_LEN,
            ControlRepr::Ack { stats: Some(_), .. } => FULL_ACK_LEN,
            ControlRepr::Nak { loss } => loss.bytes.len(),
            ControlRepr::MsgDropReq { .. } => MSG_DROP_LEN,
            ControlRepr::KeepAlive
            | ControlRepr::CongestionWarning
            | ControlRepr::Shutdown
            | ControlRepr::Ack2 { .. }
            | ControlRepr::PeerError { .. } => PAD_LEN,
        }
    }

    /// Length of the whole datagram [`ControlRepr::emit`] writes: header
    /// plus control information.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.info_len()
    }

    fn additional_info(&self) -> u32 {
        match self {
            ControlRepr::Ack { ack_seq_no, .. } | ControlRepr::Ack2 { ack_seq_no } => {
                ack_seq_no.get()
            }
            ControlRepr::MsgDropReq { msg_no, .. } => msg_no.get(),
            ControlRepr::PeerError { code } => *code,
            _ => 0,
        }
    }

    /// Writes the packet — header and control information, exactly
    /// [`ControlRepr::buffer_len`] bytes, the same bytes UDT 4.11 sends —
    /// at the start of `packet`. Returns the number of bytes written.
    ///
    /// # Panics
    /// If the buffer is shorter than [`ControlRepr::buffer_len`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
        timestamp: u32,
        dst_socket_id: u32,
    ) -> usize {
        let len = self.buffer_len();
        assert!(
            packet.as_bytes().len() >= len,
            "ControlRepr::emit: buffer of {} bytes, need {len}",
            packet.as_bytes().len()
        );
        packet.set_control_type(self.control_type() as u16, 0);
        packet.set_additional_info(self.additional_info());
        packet.set_timestamp(timestamp);
        packet.set_dst_socket_id(dst_socket_id);
        let info = &mut packet.payload_mut()[..self.info_len()];
        match self {
            ControlRepr::Handshake(hs) => hs.emit_info(info),
            ControlRepr::Ack { last, stats, .. } => {
                put_word(info, 0, last.get());
                if let Some(s) = stats {
                    put_word(info, 1, s.rtt);
                    put_word(info, 2, s.rtt_var);
                    put_word(info, 3, s.avail_buf);
                    if let Some(r) = s.rates {
                        put_word(info, 4, r.recv_rate);
                        put_word(info, 5, r.link_capacity);
                    }
                }
            }
            ControlRepr::Nak { loss } => info.copy_from_slice(loss.bytes),
            ControlRepr::MsgDropReq { first, last, .. } => {
                put_word(info, 0, first.get());
                put_word(info, 1, last.get());
            }
            ControlRepr::KeepAlive
            | ControlRepr::CongestionWarning
            | ControlRepr::Shutdown
            | ControlRepr::Ack2 { .. }
            | ControlRepr::PeerError { .. } => info.fill(0),
        }
        len
    }

    /// Emits into a new vector (for tests and cold paths).
    pub fn to_vec(&self, timestamp: u32, dst_socket_id: u32) -> Vec<u8> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(
            &mut Packet::new_unchecked(&mut v[..]),
            timestamp,
            dst_socket_id,
        );
        v
    }
}

const RANGE_FLAG: u32 = 0x8000_0000;

/// A validated NAK loss list: big-endian words, where a word with the top
/// bit set starts a range `first ..= last` and the next word (top bit clear)
/// ends it, and any other word is a single lost sequence number
/// (UDT4 `packet.cpp`, "Loss List Field Coding").
///
/// Validation ([`NakList::new_checked`]) guarantees: the length is a
/// non-zero multiple of 4, every range start is followed by an end whose top
/// bit is clear, and no range ends before it starts (under wrap-around
/// comparison). It does not know the sender's window; whether the numbers
/// were ever sent is for the connection to check.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NakList<'a> {
    bytes: &'a [u8],
}

impl fmt::Debug for NakList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.ranges().map(|(a, b)| a.get()..=b.get()))
            .finish()
    }
}

impl<'a> NakList<'a> {
    /// Validates an encoded loss list. Never panics.
    pub fn new_checked(bytes: &'a [u8]) -> Result<NakList<'a>> {
        if bytes.len() % 4 != 0 {
            return Err(Error::BadLength);
        }
        if bytes.is_empty() {
            return Err(Error::Malformed);
        }
        let n = bytes.len() / 4;
        let mut i = 0;
        while i < n {
            let w = word(bytes, i);
            if w & RANGE_FLAG != 0 {
                if i + 1 >= n {
                    return Err(Error::Malformed);
                }
                let last = word(bytes, i + 1);
                if last & RANGE_FLAG != 0 {
                    return Err(Error::Malformed);
                }
                if SeqNo::new(w).is_after(SeqNo::new(last)) {
                    return Err(Error::Malformed);
                }
                i += 2;
            } else {
                i += 1;
            }
        }
        Ok(NakList { bytes })
    }

    /// Encodes `ranges` (inclusive, each `first` not after `last`) into
    /// `buf`, as many whole entries as fit, and returns the list over the
    /// bytes written. A single number takes 4 bytes, a range 8. Ranges whose
    /// end precedes their start are skipped. The result may be empty if
    /// nothing fits or `ranges` is empty; an empty list must not be sent
    /// (parsers, this one included, reject an empty NAK).
    pub fn encode<I>(ranges: I, buf: &'a mut [u8]) -> NakList<'a>
    where
        I: IntoIterator<Item = (SeqNo, SeqNo)>,
    {
        let n = encode_nak(ranges, buf);
        let buf: &'a [u8] = buf;
        NakList { bytes: &buf[..n] }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// True if the list holds no entry (only possible from
    /// [`NakList::encode`]).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The inclusive ranges, in wire order.
    pub fn ranges(&self) -> NakRanges<'a> {
        NakRanges { bytes: self.bytes }
    }

    /// Total number of sequence numbers the list names (ranges may overlap
    /// on a hostile list; they are counted as given).
    pub fn loss_count(&self) -> u64 {
        self.ranges().map(|(a, b)| u64::from(a.len_to(b))).sum()
    }
}

/// Iterator over the ranges of a [`NakList`].
#[derive(Debug, Clone)]
pub struct NakRanges<'a> {
    bytes: &'a [u8],
}

impl Iterator for NakRanges<'_> {
    type Item = (SeqNo, SeqNo);

    fn next(&mut self) -> Option<(SeqNo, SeqNo)> {
        // The list was validated; still, never index past the end.
        if self.bytes.len() < 4 {
            return None;
        }
        let w = word(self.bytes, 0);
        if w & RANGE_FLAG != 0 && self.bytes.len() >= 8 {
            let last = word(self.bytes, 1);
            self.bytes = &self.bytes[8..];
            Some((SeqNo::new(w), SeqNo::new(last)))
        } else {
            self.bytes = &self.bytes[4..];
            Some((SeqNo::new(w), SeqNo::new(w)))
        }
    }
}

/// Encodes inclusive ranges as a NAK loss list into `buf`, as many whole
/// entries as fit; returns the number of bytes written. See
/// [`NakList::encode`].
pub fn encode_nak<I>(ranges: I, buf: &mut [u8]) -> usize
where
    I: IntoIterator<Item = (SeqNo, SeqNo)>,
{
    let mut at = 0;
    for (first, last) in ranges {
        if first.is_after(last) {
            continue;
        }
        if first == last {
            if at + 4 > buf.len() {
                break;
            }
            buf[at..at + 4].copy_from_slice(&first.get().to_be_bytes());
            at += 4;
        } else {
            if at + 8 > buf.len() {
                break;
            }
            buf[at..at + 4].copy_from_slice(&(first.get() | RANGE_FLAG).to_be_bytes());
            buf[at + 4..at + 8].copy_from_slice(&last.get().to_be_bytes());
            at += 8;
        }
    }
    at
}
