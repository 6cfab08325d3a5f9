//! lu2k's frame format on RDS: how one LNet message travels as one or more RDS
//! messages.
//!
//! RDS caps a message at [`RDS_MAX_MSG_SIZE`](crate::RDS_MAX_MSG_SIZE) = 1 MiB
//! *including* everything lu2k puts before the payload (`rds_sendmsg` answers
//! `EMSGSIZE` beyond it),
//! while an LNet payload may itself be 1 MiB. So an LNet message is cut into RDS
//! messages ([`split`]), each starting with an 8-byte frame header; the first also
//! carries the LNet header:
//!
//! ```text
//!  0        2       3          4                    8                80
//! +--------+-------+----------+--------------------+-----------------+----------
//! | magic  | flags | reserved | payload length     | LNet header     | payload
//! | u16 LE | u8    | u8 = 0   | u32 LE             | 72 bytes,       | bytes ...
//! | 0x4c52 |       |          |                    | FIRST only      |
//! +--------+-------+----------+--------------------+-----------------+----------
//! ```
//!
//! - `flags`: [`FIRST`] on the RDS message that starts an LNet message, [`LAST`] on
//!   the one that ends it; a message that fits one RDS message has both. No other
//!   bit is defined.
//! - `payload length`: in a FIRST frame, the payload length of the whole LNet
//!   message (all its frames together), so the receiver knows what to expect; in a
//!   continuation, the payload bytes this RDS message carries.
//! - Continuations carry payload right after the frame header.
//!
//! RDS delivers messages reliably and in order per (source, destination) address
//! pair, and a sender puts one LNet message's frames on the wire before the next
//! message's, so a receiver appends every continuation to the message from the same
//! source that is still open, and the message is whole at its LAST frame.
//!
//! The module splits view from meaning: [`Packet`] reads and writes the fields of a
//! byte buffer in place, [`Repr`] is what a valid header means.
//!
//! Guarantees:
//! - [`Packet::new_checked`] and [`Repr::parse`] never panic, whatever the bytes;
//!   after `new_checked` succeeds no accessor of [`Packet`] panics either (until a
//!   setter turns FIRST on in a buffer too short for the LNet header). On a
//!   [`Packet::new_unchecked`] view, accessors panic when the buffer is shorter
//!   than the fields they read.
//! - [`Repr::parse`] accepts exactly the headers [`Repr::emit`] writes: the magic,
//!   known flags only, a zero reserved byte, and (for a FIRST frame) room for the
//!   LNet header.
//! - The frame layer never reads payload bytes; a receiver whose RDS message is
//!   scattered over several buffers gives [`Packet`] only the first one.

use core::fmt;

use crate::LNET_HDR_LEN;

/// Bytes of the frame header in front of every RDS message.
pub const HEADER_LEN: usize = field::LENGTH.end;
/// The first two bytes of every frame, as a little-endian u16 (on the wire: 0x52 0x4c).
pub const MAGIC: u16 = 0x4c52;
/// Flag: this RDS message starts an LNet message and carries its LNet header.
pub const FIRST: u8 = 1;
/// Flag: this RDS message ends an LNet message.
pub const LAST: u8 = 2;
/// Every flag bit that has a meaning.
const KNOWN_FLAGS: u8 = FIRST | LAST;

/// Byte ranges of the frame header's fields.
pub mod field {
    use core::ops::Range;

    use super::LNET_HDR_LEN;

    /// A field spanning several bytes.
    pub type Field = Range<usize>;

    /// Magic, u16 little-endian.
    pub const MAGIC: Field = 0..2;
    /// Flags, one byte.
    pub const FLAGS: usize = 2;
    /// Reserved, one byte, always 0.
    pub const RESERVED: usize = 3;
    /// Payload length, u32 little-endian.
    pub const LENGTH: Field = 4..8;
    /// The LNet header, in a FIRST frame only.
    pub const LNET_HEADER: Field = LENGTH.end..LENGTH.end + LNET_HDR_LEN;
}

/// Why bytes are not a valid frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// The buffer ends before the frame header does, or, with FIRST set, before the
    /// LNet header does.
    #[error(
        "RDS frame truncated: shorter than its {HEADER_LEN}-byte frame header \
         (plus the {LNET_HDR_LEN}-byte LNet header in a first frame)"
    )]
    Truncated,
    /// The first two bytes are not [`MAGIC`]: not an lu2k frame.
    #[error(
        "not an lu2k RDS frame: the magic is not 0x4c52 \
         (is something other than lu2k sending to this RDS port?)"
    )]
    BadMagic,
    /// The reserved byte is not zero.
    #[error("RDS frame's reserved byte is not zero (a newer or broken sender)")]
    Reserved,
    /// A flag bit other than [`FIRST`] and [`LAST`] is set.
    #[error("RDS frame has unknown flag bits (a newer or broken sender)")]
    UnknownFlags,
}

/// A view of a frame header (and what follows it) in a byte buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length; accessors panic on fields beyond
    /// its end.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the buffer holds the frame header and, when its FIRST flag is set,
    /// the LNet header, so that no accessor panics.
    pub fn check_len(&self) -> Result<(), Error> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || len < self.prefix_len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic field.
    pub fn magic(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::MAGIC];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether [`FIRST`] is set.
    pub fn first(&self) -> bool {
        self.flags() & FIRST != 0
    }

    /// Whether [`LAST`] is set.
    pub fn last(&self) -> bool {
        self.flags() & LAST != 0
    }

    /// The reserved byte.
    pub fn reserved(&self) -> u8 {
        self.buffer.as_ref()[field::RESERVED]
    }

    /// The payload length field (see the module doc for what it counts).
    pub fn payload_len(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::LENGTH];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Bytes before the payload: the frame header, plus the LNet header when FIRST is
    /// set.
    pub fn prefix_len(&self) -> usize {
        prefix_len(self.first())
    }

    /// The LNet header, in a FIRST frame.
    pub fn lnet_header(&self) -> Option<&[u8; LNET_HDR_LEN]> {
        if !self.first() {
            return None;
        }
        self.buffer.as_ref()[field::LNET_HEADER].try_into().ok()
    }

    /// The payload bytes this buffer holds after the prefix (all of the RDS
    /// message's payload only when the whole message is in this buffer).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.prefix_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the magic field.
    pub fn set_magic(&mut self, magic: u16) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&magic.to_le_bytes());
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Sets or clears [`FIRST`].
    pub fn set_first(&mut self, first: bool) {
        let flags = self.flags() & !FIRST;
        self.set_flags(flags | if first { FIRST } else { 0 });
    }

    /// Sets or clears [`LAST`].
    pub fn set_last(&mut self, last: bool) {
        let flags = self.flags() & !LAST;
        self.set_flags(flags | if last { LAST } else { 0 });
    }

    /// Sets the reserved byte.
    pub fn set_reserved(&mut self, reserved: u8) {
        self.buffer.as_mut()[field::RESERVED] = reserved;
    }

    /// Sets the payload length field.
    pub fn set_payload_len(&mut self, len: u32) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_le_bytes());
    }

    /// The LNet header, in a FIRST frame, for writing.
    pub fn lnet_header_mut(&mut self) -> Option<&mut [u8; LNET_HDR_LEN]> {
        if !self.first() {
            return None;
        }
        (&mut self.buffer.as_mut()[field::LNET_HEADER])
            .try_into()
            .ok()
    }

    /// The payload bytes this buffer holds after the prefix, for writing.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = self.prefix_len();
        &mut self.buffer.as_mut()[at..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// What a valid frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// This RDS message starts an LNet message and carries its LNet header.
    pub first: bool,
    /// This RDS message ends an LNet message.
    pub last: bool,
    /// With `first`, the whole LNet message's payload length; otherwise the payload
    /// bytes this RDS message carries.
    pub payload_len: u32,
}

impl Repr {
    /// Bytes of the frame header.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// Reads a frame header. Never panics, whatever the buffer holds.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, Error> {
        packet.check_len()?;
        if packet.magic() != MAGIC {
            return Err(Error::BadMagic);
        }
        if packet.reserved() != 0 {
            return Err(Error::Reserved);
        }
        if packet.flags() & !KNOWN_FLAGS != 0 {
            return Err(Error::UnknownFlags);
        }
        Ok(Repr {
            first: packet.first(),
            last: packet.last(),
            payload_len: packet.payload_len(),
        })
    }

    /// Writes the frame header's [`HEADER_LEN`] bytes; the LNet header and payload
    /// are the caller's. Panics when the buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_magic(MAGIC);
        packet.set_flags(self.flags());
        packet.set_reserved(0);
        packet.set_payload_len(self.payload_len);
    }

    /// The frame header as bytes, for a sender that gathers it into an iovec.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0; HEADER_LEN];
        self.emit(&mut Packet::new_unchecked(&mut bytes));
        bytes
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        (if self.first { FIRST } else { 0 }) | (if self.last { LAST } else { 0 })
    }

    /// Bytes before the payload: the frame header, plus the LNet header in a FIRST
    /// frame.
    pub fn prefix_len(&self) -> usize {
        prefix_len(self.first)
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RDS frame{}{} payload_len={}",
            if self.first { " FIRST" } else { "" },
            if self.last { " LAST" } else { "" },
            self.payload_len
        )
    }
}

fn prefix_len(first: bool) -> usize {
    HEADER_LEN + if first { LNET_HDR_LEN } else { 0 }
}

/// How a payload of `total` bytes is cut into RDS messages of at most `max` bytes
/// (the socket's [`max_message`](crate::Socket::max_message)): the payload bytes
/// each carries, in order. The first carries as much as fits beside the frame and
/// LNet headers, every following one as much as fits beside its frame header, so
/// only the last may be short; a payload that fits one message, empty included,
/// is one part.
///
/// # Panics
///
/// When `max` cannot hold the first message's two headers
/// (`max < HEADER_LEN + LNET_HDR_LEN`).
pub fn split(total: u32, max: usize) -> Vec<u32> {
    assert!(
        max >= HEADER_LEN + LNET_HDR_LEN,
        "an RDS message of {max} bytes cannot hold the frame and LNet headers"
    );
    // A cap above u32::MAX is no cap on a u32 payload.
    let first = u32::try_from(max - HEADER_LEN - LNET_HDR_LEN).unwrap_or(u32::MAX);
    let next = u32::try_from(max - HEADER_LEN).unwrap_or(u32::MAX);
    let mut parts = vec![total.min(first)];
    let mut left = total - parts[0];
    while left > 0 {
        let n = left.min(next);
        parts.push(n);
        left -= n;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RDS_MAX_MSG_SIZE;
    use proptest::prelude::*;

    /// A message that fits one RDS message: FIRST|LAST, 123456 payload bytes.
    const FIRST_LAST_123456: [u8; 8] = [0x52, 0x4c, 0x03, 0x00, 0x40, 0xe2, 0x01, 0x00];
    /// The tail of a 1 MiB payload: a LAST continuation of 80 bytes.
    const LAST_80: [u8; 8] = [0x52, 0x4c, 0x02, 0x00, 0x50, 0x00, 0x00, 0x00];

    fn first_frame(header: [u8; 8]) -> Vec<u8> {
        let mut b = header.to_vec();
        b.extend((0..LNET_HDR_LEN).map(|i| i as u8));
        b.extend_from_slice(b"payload");
        b
    }

    #[test]
    fn a_first_and_last_frame_parses_from_its_bytes() {
        let bytes = first_frame(FIRST_LAST_123456);
        let p = Packet::new_checked(&bytes[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(
            r,
            Repr {
                first: true,
                last: true,
                payload_len: 123_456
            }
        );
        assert_eq!((p.magic(), p.flags(), p.reserved()), (MAGIC, 3, 0));
        assert_eq!(p.prefix_len(), 80);
        assert_eq!(p.lnet_header().unwrap()[71], 71);
        assert_eq!(p.payload(), b"payload");
        assert_eq!(r.to_bytes(), FIRST_LAST_123456);
        assert_eq!(r.to_string(), "RDS frame FIRST LAST payload_len=123456");
    }

    #[test]
    fn a_continuation_has_no_lnet_header() {
        let mut bytes = LAST_80.to_vec();
        bytes.extend([0xEE; 80]);
        let p = Packet::new_checked(&bytes[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(
            r,
            Repr {
                first: false,
                last: true,
                payload_len: 80
            }
        );
        assert_eq!(p.lnet_header(), None);
        assert_eq!(p.payload(), &[0xEE; 80][..]);
        assert_eq!(r.prefix_len(), HEADER_LEN);
        // A bare 8-byte continuation header is complete.
        assert_eq!(Repr::parse(&Packet::new_unchecked(&LAST_80)), Ok(r));
    }

    #[test]
    fn emit_writes_the_spec_bytes_and_leaves_the_rest_alone() {
        let mut bytes = [0xAA; 80 + 4];
        let mut p = Packet::new_unchecked(&mut bytes[..]);
        Repr {
            first: true,
            last: true,
            payload_len: 123_456,
        }
        .emit(&mut p);
        p.lnet_header_mut().unwrap()[0] = 0x11;
        p.payload_mut().copy_from_slice(b"abcd");
        assert_eq!(bytes[..8], FIRST_LAST_123456);
        assert_eq!(bytes[8], 0x11);
        assert!(bytes[9..80].iter().all(|&b| b == 0xAA));
        assert_eq!(&bytes[80..], b"abcd");

        let mut p = Packet::new_unchecked([0u8; 8]);
        Repr {
            first: false,
            last: true,
            payload_len: 80,
        }
        .emit(&mut p);
        assert_eq!(p.into_inner(), LAST_80);
    }

    #[test]
    fn short_buffers_are_truncated() {
        for n in 0..HEADER_LEN {
            let p = Packet::new_unchecked(&LAST_80[..n]);
            assert_eq!(p.check_len(), Err(Error::Truncated), "{n} bytes");
            assert_eq!(Repr::parse(&p), Err(Error::Truncated), "{n} bytes");
        }
        // FIRST promises the LNet header: 8 + 71 bytes is one short.
        let bytes = first_frame(FIRST_LAST_123456);
        assert_eq!(
            Packet::new_checked(&bytes[..HEADER_LEN + LNET_HDR_LEN - 1]),
            Err(Error::Truncated)
        );
        assert!(Packet::new_checked(&bytes[..HEADER_LEN + LNET_HDR_LEN]).is_ok());
    }

    #[test]
    fn bad_magic_reserved_and_unknown_flags_are_refused() {
        let mut bad = LAST_80;
        bad[0] = 0x53;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad)),
            Err(Error::BadMagic)
        );
        let mut bad = LAST_80;
        bad[1] = 0x52; // big-endian-looking magic
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad)),
            Err(Error::BadMagic)
        );
        let mut bad = LAST_80;
        bad[3] = 1;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad)),
            Err(Error::Reserved)
        );
        let mut bad = LAST_80;
        bad[2] |= 4;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad)),
            Err(Error::UnknownFlags)
        );
    }

    #[test]
    fn flag_setters_touch_one_bit() {
        let mut p = Packet::new_unchecked(LAST_80);
        p.set_first(true);
        assert_eq!(p.flags(), FIRST | LAST);
        p.set_last(false);
        assert_eq!(p.flags(), FIRST);
        p.set_first(false);
        assert_eq!(p.flags(), 0);
    }

    #[test]
    fn a_full_mib_is_two_rds_messages_and_small_ones_one() {
        let max = RDS_MAX_MSG_SIZE;
        assert_eq!(split(1 << 20, max), vec![(1 << 20) - 80, 80]);
        assert_eq!(split(4096, max), vec![4096]);
        assert_eq!(split(0, max), vec![0]);
        let exact = (max - HEADER_LEN - LNET_HDR_LEN) as u32;
        assert_eq!(split(exact, max), vec![exact]);
        assert_eq!(split(exact + 1, max), vec![exact, 1]);
        for total in [0u32, 1, 4096, 1 << 20, 3 << 20] {
            let parts = split(total, 4096);
            assert_eq!(parts.iter().sum::<u32>(), total);
            assert!(parts[0] as usize + HEADER_LEN + LNET_HDR_LEN <= 4096);
            assert!(parts[1..]
                .iter()
                .all(|&p| p as usize + HEADER_LEN <= 4096 && p > 0));
        }
    }

    #[test]
    fn frame_headers_round_trip_and_reject_garbage() {
        let r = Repr {
            first: true,
            last: true,
            payload_len: 123_456,
        };
        let mut f = first_frame(r.to_bytes());
        assert_eq!(Repr::parse(&Packet::new_unchecked(&f)), Ok(r));
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&f[..7])),
            Err(Error::Truncated)
        );
        f[0] ^= 1;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&f)),
            Err(Error::BadMagic)
        );
    }

    #[test]
    #[should_panic(expected = "cannot hold the frame and LNet headers")]
    fn split_refuses_a_cap_below_the_headers() {
        split(1, HEADER_LEN + LNET_HDR_LEN - 1);
    }

    fn repr() -> impl Strategy<Value = Repr> {
        (any::<bool>(), any::<bool>(), any::<u32>()).prop_map(|(first, last, payload_len)| Repr {
            first,
            last,
            payload_len,
        })
    }

    /// Arbitrary bytes, half of them behind a valid magic so parsing gets past it.
    fn frame_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128),
            proptest::collection::vec(any::<u8>(), 0..128).prop_map(|mut b| {
                let magic = MAGIC.to_le_bytes();
                b.splice(0..b.len().min(2), magic);
                b
            }),
        ]
    }

    proptest! {
        #[test]
        fn parse_inverts_emit(r in repr(), extra in 0usize..16) {
            let mut bytes = vec![0x5A; r.prefix_len() + extra];
            r.emit(&mut Packet::new_unchecked(&mut bytes[..]));
            let p = Packet::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!(Repr::parse(&p), Ok(r));
            prop_assert_eq!(p.payload().len(), extra);
            prop_assert_eq!(&bytes[..HEADER_LEN], &r.to_bytes()[..]);
        }

        #[test]
        fn parsing_never_panics(bytes in frame_bytes()) {
            let unchecked = Packet::new_unchecked(&bytes[..]);
            let parsed = Repr::parse(&unchecked);
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                // Past new_checked no accessor panics.
                let _ = (p.magic(), p.flags(), p.reserved(), p.payload_len());
                let _ = (p.lnet_header(), p.payload());
                if let Ok(r) = parsed {
                    prop_assert_eq!(&r.to_bytes()[..], &bytes[..HEADER_LEN]);
                    prop_assert_eq!(r.prefix_len() + p.payload().len(), bytes.len());
                }
            } else {
                prop_assert_eq!(parsed, Err(Error::Truncated));
            }
        }

        #[test]
        fn split_fills_every_part_but_the_last(max in 80usize..=(2 << 20), factor in 0u64..40, rest in any::<u32>()) {
            let next = (max - HEADER_LEN) as u64;
            let total = (factor * next + u64::from(rest) % next).min(u64::from(u32::MAX)) as u32;
            let parts = split(total, max);
            prop_assert_eq!(parts.iter().map(|&p| u64::from(p)).sum::<u64>(), u64::from(total));
            prop_assert_eq!(parts[0], total.min((max - HEADER_LEN - LNET_HDR_LEN) as u32));
            let (tail, middle) = parts[1..].split_last().map_or((None, &[][..]), |(t, m)| (Some(*t), m));
            prop_assert!(middle.iter().all(|&p| u64::from(p) == next));
            if let Some(t) = tail {
                prop_assert!(t > 0 && u64::from(t) <= next);
            }
        }
    }
}
