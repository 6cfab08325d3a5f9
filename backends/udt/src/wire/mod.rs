//! UDT4 packet formats: views over raw bytes and their meaning.
//!
//! Every UDT datagram starts with a 16-byte header of four 32-bit big-endian
//! words (UDT4 `packet.cpp`; all words, including the control information of
//! control packets, are converted with `htonl` in `channel.cpp`):
//!
//! ```text
//!  data packet                           control packet
//!  0                   1                 0                   1
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 ...   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 ...
//! +-+-----------------------------+     +-+---------------------+----------+
//! |0|   Sequence Number (31)      |     |1| Type (15)           | Ext (16) |
//! +---+-+-------------------------+     +-+---------------------+----------+
//! |ff |o|  Message Number (29)    |     |       Additional Info (32)       |
//! +---+-+-------------------------+     +----------------------------------+
//! |        Time Stamp (32)        |     |         Time Stamp (32)          |
//! +-------------------------------+     +----------------------------------+
//! |  Destination Socket ID (32)   |     |   Destination Socket ID (32)     |
//! +-------------------------------+     +----------------------------------+
//! |  payload ...                  |     |  control information ...         |
//! ```
//!
//! The layer follows smoltcp's split of view from meaning:
//!
//! * [`Packet`] is a zero-copy view over any `T: AsRef<[u8]>` with
//!   accessors and (for `T: AsMut<[u8]>`) setters for every header field;
//!   [`field`] names the byte ranges.
//! * [`DataHeader`] is the meaning of a data packet's header. The payload is
//!   never part of it: [`DataHeader::parse`] leaves the payload in the
//!   caller's buffer ([`Packet::payload`]) and [`DataHeader::emit`] writes
//!   only the 16 header bytes, so a sender can hand the kernel
//!   `[header, payload slice]` for one scatter-gather `sendmsg`.
//! * [`ControlRepr`] is the meaning of a control packet: handshake,
//!   keep-alive, ACK (full and light), NAK with its range-encoded loss list
//!   ([`NakList`]), congestion warning, shutdown, ACK2, message drop request
//!   and peer error.
//!
//! # Robustness
//!
//! Nothing read from the network is trusted. [`Packet::new_checked`],
//! [`DataHeader::parse`], [`ControlRepr::parse`] and [`NakList::new_checked`]
//! never panic, whatever the input bytes: every length is checked before a
//! field is read, and anything malformed is reported as an [`Error`] so the
//! caller can drop and count it. Accessors on a view built with
//! [`Packet::new_unchecked`] may panic if the buffer is shorter than the
//! header; the `emit` functions panic if the caller's buffer is shorter than
//! the `buffer_len` they report, as documented on each.
//!
//! Where the IETF draft and the UDT 4.11 code differ, the code wins, because
//! UDT4 is the interop peer: the handshake is 48 bytes (no connection-type
//! word beyond the request type), control packets without control
//! information carry 4 zero bytes, a light ACK is an ACK with exactly 4 bytes
//! of control information, and the "available buffer" field of an ACK counts
//! packets.

mod control;
mod packet;

pub use control::{
    encode_nak, AckRates, AckStats, ControlRepr, ControlType, HandshakeRepr, NakList, NakRanges,
    ReqType, SocketType,
};
pub use packet::{field, DataHeader, Packet, Position, HEADER_LEN};

use core::fmt;

/// Why a datagram could not be read as a UDT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Shorter than the 16-byte header, or than the control information its
    /// type requires.
    Truncated,
    /// A data packet where a control packet was expected, or the reverse.
    WrongKind,
    /// A control packet of a type this implementation does not know.
    UnknownType(u16),
    /// Control information of a length that this packet type never has
    /// (for example an ACK that is neither 4, 16 nor at least 24 bytes, or a
    /// NAK whose length is not a multiple of 4).
    BadLength,
    /// A field holds a value the format forbids: a sequence number with the
    /// top bit set, a NAK range start without its end, a NAK range whose end
    /// precedes its start, or an empty NAK.
    Malformed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("UDT packet truncated"),
            Error::WrongKind => {
                f.write_str("UDT packet is not of the expected kind (data/control)")
            }
            Error::UnknownType(t) => write!(f, "unknown UDT control packet type {t:#x}"),
            Error::BadLength => f.write_str("UDT control information has an invalid length"),
            Error::Malformed => f.write_str("UDT packet field holds a forbidden value"),
        }
    }
}

impl std::error::Error for Error {}

/// Result of wire parsing.
pub type Result<T> = core::result::Result<T, Error>;
