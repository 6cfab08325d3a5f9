//! The common 16-byte header view and the data packet header.

use super::{Error, Result};
use crate::seq::{MsgNo, SeqNo};

/// Byte ranges of the header fields (UDT4 `CPacket::m_nHeader[0..4]`).
pub mod field {
    /// A byte range within a packet.
    pub type Field = core::ops::Range<usize>;
    /// A byte range that runs to the end of the packet.
    pub type Rest = core::ops::RangeFrom<usize>;

    /// Word 0. Data: bit 31 = 0, bits 30..0 = sequence number.
    /// Control: bit 31 = 1, bits 30..16 = type, bits 15..0 = extended type.
    pub const WORD0: Field = 0..4;
    /// Word 1. Data: 2 position bits, in-order bit, 29-bit message number.
    /// Control: "additional info" (ACK number, message number, error code).
    pub const WORD1: Field = 4..8;
    /// Time stamp, microseconds since the sender's connection start.
    pub const TIMESTAMP: Field = 8..12;
    /// Destination socket ID (0 in a connection request).
    pub const DST_SOCKET_ID: Field = 12..16;
    /// Data payload or control information.
    pub const PAYLOAD: Rest = 16..;

    /// Alias of [`WORD0`] for data packets.
    pub const SEQ_NO: Field = WORD0;
    /// Alias of [`WORD1`] for data packets.
    pub const MSG_NO: Field = WORD1;
    /// Alias of [`WORD0`] for control packets.
    pub const CONTROL_TYPE: Field = WORD0;
    /// Alias of [`WORD1`] for control packets.
    pub const ADDITIONAL_INFO: Field = WORD1;
}

/// Length of the UDT header, data and control alike.
pub const HEADER_LEN: usize = field::PAYLOAD.start;

const CONTROL_FLAG: u32 = 0x8000_0000;
const IN_ORDER_FLAG: u32 = 0x2000_0000;

#[inline]
fn get_u32(b: &[u8], f: field::Field) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[f]);
    u32::from_be_bytes(w)
}

#[inline]
fn put_u32(b: &mut [u8], f: field::Field, v: u32) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

/// A read/write view over a UDT datagram (header plus payload or control
/// information).
///
/// Build it with [`Packet::new_checked`] for untrusted bytes: afterwards
/// every header accessor is in bounds and cannot panic.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length; accessors panic if it is
    /// shorter than [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// `Err(Error::Truncated)` if the buffer cannot hold the 16-byte header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The wrapped buffer, by reference.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Bit 0 of the header: a control packet.
    #[inline]
    pub fn is_control(&self) -> bool {
        self.word0() & CONTROL_FLAG != 0
    }

    /// Raw word 0.
    #[inline]
    pub fn word0(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::WORD0)
    }

    /// Raw word 1.
    #[inline]
    pub fn word1(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::WORD1)
    }

    /// Data packet: the sequence number (bits 30..0 of word 0).
    #[inline]
    pub fn seq_no(&self) -> SeqNo {
        SeqNo::new(self.word0())
    }

    /// Data packet: the message position (bits 31..30 of word 1).
    #[inline]
    pub fn position(&self) -> Position {
        Position::from_bits(self.word1() >> 30)
    }

    /// Data packet: the in-order delivery flag (bit 29 of word 1).
    #[inline]
    pub fn in_order(&self) -> bool {
        self.word1() & IN_ORDER_FLAG != 0
    }

    /// Data packet: the message number (bits 28..0 of word 1); also the
    /// "additional info" of a message drop request.
    #[inline]
    pub fn msg_no(&self) -> MsgNo {
        MsgNo::new(self.word1())
    }

    /// Control packet: the 15-bit type (bits 30..16 of word 0).
    #[inline]
    pub fn control_type(&self) -> u16 {
        ((self.word0() >> 16) & 0x7FFF) as u16
    }

    /// Control packet: the 16-bit extended type / reserved field.
    #[inline]
    pub fn ext_type(&self) -> u16 {
        (self.word0() & 0xFFFF) as u16
    }

    /// Control packet: the "additional info" word.
    #[inline]
    pub fn additional_info(&self) -> u32 {
        self.word1()
    }

    /// The time stamp in microseconds.
    #[inline]
    pub fn timestamp(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::TIMESTAMP)
    }

    /// The destination socket ID.
    #[inline]
    pub fn dst_socket_id(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::DST_SOCKET_ID)
    }

    /// Bytes after the header: data payload or control information.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets raw word 0.
    #[inline]
    pub fn set_word0(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::WORD0, v)
    }

    /// Sets raw word 1.
    #[inline]
    pub fn set_word1(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::WORD1, v)
    }

    /// Makes this a data packet with sequence number `seq`.
    #[inline]
    pub fn set_seq_no(&mut self, seq: SeqNo) {
        self.set_word0(seq.get())
    }

    /// Sets word 1 of a data packet.
    #[inline]
    pub fn set_msg_fields(&mut self, position: Position, in_order: bool, msg_no: MsgNo) {
        let w = (position.bits() << 30) | if in_order { IN_ORDER_FLAG } else { 0 } | msg_no.get();
        self.set_word1(w)
    }

    /// Makes this a control packet of `ty` (15 bits; higher bits dropped)
    /// with extended type `ext`.
    #[inline]
    pub fn set_control_type(&mut self, ty: u16, ext: u16) {
        self.set_word0(CONTROL_FLAG | (u32::from(ty & 0x7FFF) << 16) | u32::from(ext))
    }

    /// Sets the "additional info" word of a control packet.
    #[inline]
    pub fn set_additional_info(&mut self, v: u32) {
        self.set_word1(v)
    }

    /// Sets the time stamp.
    #[inline]
    pub fn set_timestamp(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::TIMESTAMP, v)
    }

    /// Sets the destination socket ID.
    #[inline]
    pub fn set_dst_socket_id(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::DST_SOCKET_ID, v)
    }

    /// Bytes after the header, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

/// Where a data packet sits in its message (the two "ff" bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// `00`: neither first nor last.
    Middle,
    /// `01`: the last packet of a message.
    Last,
    /// `10`: the first packet of a message.
    First,
    /// `11`: a message of one packet.
    Solo,
}

impl Position {
    /// From the two bits (only the low two bits of `bits` are used).
    #[inline]
    pub const fn from_bits(bits: u32) -> Position {
        match bits & 0b11 {
            0b00 => Position::Middle,
            0b01 => Position::Last,
            0b10 => Position::First,
            _ => Position::Solo,
        }
    }

    /// The two bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        match self {
            Position::Middle => 0b00,
            Position::Last => 0b01,
            Position::First => 0b10,
            Position::Solo => 0b11,
        }
    }

    /// The position of packet `index` of a message of `count` packets
    /// (`count >= 1`, `index < count`).
    #[inline]
    pub const fn of(index: usize, count: usize) -> Position {
        let first = index == 0;
        let last = index + 1 >= count;
        match (first, last) {
            (true, true) => Position::Solo,
            (true, false) => Position::First,
            (false, true) => Position::Last,
            (false, false) => Position::Middle,
        }
    }

    /// This packet begins a message.
    #[inline]
    pub const fn is_first(self) -> bool {
        matches!(self, Position::First | Position::Solo)
    }

    /// This packet ends a message.
    #[inline]
    pub const fn is_last(self) -> bool {
        matches!(self, Position::Last | Position::Solo)
    }
}

/// The header of a data packet. The payload is not part of it: it stays in
/// the buffer it arrived in ([`Packet::payload`]) or in the sender's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataHeader {
    /// Packet sequence number.
    pub seq_no: SeqNo,
    /// Position of this packet in its message.
    pub position: Position,
    /// The receiver must deliver this message in order.
    pub in_order: bool,
    /// Message number.
    pub msg_no: MsgNo,
    /// Microseconds since the sender's connection start.
    pub timestamp: u32,
    /// The receiver's socket ID.
    pub dst_socket_id: u32,
}

impl DataHeader {
    /// Reads the header of a data packet. Never panics.
    ///
    /// `Err(Truncated)` if shorter than 16 bytes, `Err(WrongKind)` for a
    /// control packet. An empty payload is allowed (the caller decides
    /// whether a zero-length data packet is acceptable).
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<DataHeader> {
        packet.check_len()?;
        if packet.is_control() {
            return Err(Error::WrongKind);
        }
        Ok(DataHeader {
            seq_no: packet.seq_no(),
            position: packet.position(),
            in_order: packet.in_order(),
            msg_no: packet.msg_no(),
            timestamp: packet.timestamp(),
            dst_socket_id: packet.dst_socket_id(),
        })
    }

    /// Bytes [`DataHeader::emit`] writes: always [`HEADER_LEN`].
    #[inline]
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the 16 header bytes at the start of `packet`; the rest of the
    /// buffer is left alone.
    ///
    /// # Panics
    /// If the buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_seq_no(self.seq_no);
        packet.set_msg_fields(self.position, self.in_order, self.msg_no);
        packet.set_timestamp(self.timestamp);
        packet.set_dst_socket_id(self.dst_socket_id);
    }

    /// The 16 header bytes, for a `[header, payload]` scatter list.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.emit(&mut Packet::new_unchecked(&mut b[..]));
        b
    }
}
