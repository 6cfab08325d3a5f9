//! Wrap-around sequence numbers: 31-bit packet sequence numbers ([`SeqNo`]),
//! 29-bit message numbers ([`MsgNo`]) and 31-bit ACK sub-sequence numbers
//! ([`AckNo`]).
//!
//! UDT4 (`common.h`, `CSeqNo`/`CMsgNo`/`CAckNo`) counts packets in a 31-bit
//! space (`0 ..= 0x7FFF_FFFF`) and messages in a 29-bit space
//! (`0 ..= 0x1FFF_FFFF`), both wrapping to 0. Two numbers are compared by
//! their distance: if it is below a threshold (`0x3FFF_FFFF` for sequence
//! numbers, `0x0FFF_FFFF` for message numbers, about a quarter of the space)
//! the plain difference decides, otherwise the numbers are taken to have
//! wrapped. The functions here reproduce `seqcmp`, `seqoff`, `seqlen`,
//! `incseq` and `decseq` exactly, so a connection that reasons about numbers
//! the way UDT4 does gets the same answers at every boundary.
//!
//! Wrap-around comparison is not a total order (it is not transitive over the
//! whole space), so these types deliberately do not implement [`Ord`]; use
//! [`SeqNo::cmp_wrapped`], [`SeqNo::offset_to`] and friends. All values in use
//! at one time (a send or receive window) must lie within the threshold of
//! each other for the comparisons to be meaningful — UDT4 has the same rule.
//!
//! Constructors mask the value into range, so no value of these types is ever
//! out of range and no function here can panic.

use core::cmp::Ordering;
use core::fmt;

macro_rules! wrapping_number {
    ($(#[$meta:meta])* $name:ident, bits = $bits:expr, threshold = $th:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u32);

        impl $name {
            /// Number of bits of the number space.
            pub const BITS: u32 = $bits;
            /// Largest value; the successor of `MAX` is 0.
            pub const MAX: u32 = (1u32 << $bits) - 1;
            /// Distance below which two numbers compare by plain difference
            /// (UDT4's `m_i*TH`).
            pub const THRESHOLD: u32 = $th;
            /// Zero.
            pub const ZERO: Self = Self(0);

            /// Builds a number from the low bits of `value` (higher bits are
            /// dropped, as the wire format does).
            #[inline]
            pub const fn new(value: u32) -> Self {
                Self(value & Self::MAX)
            }

            /// Builds a number if `value` fits, `None` otherwise.
            #[inline]
            pub const fn new_checked(value: u32) -> Option<Self> {
                if value <= Self::MAX {
                    Some(Self(value))
                } else {
                    None
                }
            }

            /// The raw value, `0 ..= MAX`.
            #[inline]
            pub const fn get(self) -> u32 {
                self.0
            }

            /// The next number (`incseq`): `MAX` is followed by 0.
            #[inline]
            #[must_use]
            pub const fn next(self) -> Self {
                Self::new(self.0.wrapping_add(1))
            }

            /// The previous number (`decseq`): 0 is preceded by `MAX`.
            #[inline]
            #[must_use]
            pub const fn prev(self) -> Self {
                Self::new(self.0.wrapping_sub(1))
            }

            /// `self + n`, wrapping (`incseq(seq, inc)`).
            #[inline]
            #[must_use]
            pub const fn add(self, n: u32) -> Self {
                Self::new(self.0.wrapping_add(n))
            }

            /// `self - n`, wrapping.
            #[inline]
            #[must_use]
            pub const fn sub(self, n: u32) -> Self {
                Self::new(self.0.wrapping_sub(n))
            }

            /// `self + n` for a signed `n`, wrapping.
            #[inline]
            #[must_use]
            pub const fn add_signed(self, n: i32) -> Self {
                Self::new(self.0.wrapping_add(n as u32))
            }

            /// Signed distance from `self` to `other` (UDT4 `seqoff(self,
            /// other)`): positive when `other` comes after `self`.
            /// `a.add(n).offset_to(a) == -n` and `a.offset_to(a.add(n)) == n`
            /// for `n < THRESHOLD`.
            #[inline]
            pub const fn offset_to(self, other: Self) -> i32 {
                let a = self.0 as i64;
                let b = other.0 as i64;
                let diff = b - a;
                let span = Self::MAX as i64 + 1;
                let r = if diff.abs() < Self::THRESHOLD as i64 {
                    diff
                } else if a < b {
                    diff - span
                } else {
                    diff + span
                };
                r as i32
            }

            /// Wrap-around comparison (the sign of UDT4 `seqcmp(self, other)`).
            #[inline]
            pub const fn cmp_wrapped(self, other: Self) -> Ordering {
                let off = self.offset_to(other);
                if off > 0 {
                    Ordering::Less
                } else if off < 0 {
                    Ordering::Greater
                } else {
                    Ordering::Equal
                }
            }

            /// `self` comes strictly before `other`.
            #[inline]
            pub const fn is_before(self, other: Self) -> bool {
                self.offset_to(other) > 0
            }

            /// `self` comes strictly after `other`.
            #[inline]
            pub const fn is_after(self, other: Self) -> bool {
                self.offset_to(other) < 0
            }

            /// Number of values in the inclusive range `self ..= last`
            /// counted forward with wrap (UDT4 `seqlen`): `a.len_to(a) == 1`.
            /// Always in `1 ..= MAX + 1`.
            #[inline]
            pub const fn len_to(self, last: Self) -> u32 {
                let n = last.0.wrapping_sub(self.0) & Self::MAX;
                // n <= MAX, so n + 1 <= 2^BITS <= 2^31 cannot overflow a u32.
                n + 1
            }

            /// The larger of two numbers under wrap-around comparison.
            #[inline]
            #[must_use]
            pub const fn max_wrapped(self, other: Self) -> Self {
                if self.is_before(other) {
                    other
                } else {
                    self
                }
            }

            /// The smaller of two numbers under wrap-around comparison.
            #[inline]
            #[must_use]
            pub const fn min_wrapped(self, other: Self) -> Self {
                if self.is_after(other) {
                    other
                } else {
                    self
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

wrapping_number!(
    /// A 31-bit packet sequence number (UDT4 `CSeqNo`).
    SeqNo,
    bits = 31,
    threshold = 0x3FFF_FFFF
);

wrapping_number!(
    /// A 29-bit message number (UDT4 `CMsgNo`), as carried in the low 29
    /// bits of a data packet's second header word.
    MsgNo,
    bits = 29,
    threshold = 0x0FFF_FFFF
);

wrapping_number!(
    /// A 31-bit ACK sub-sequence number (UDT4 `CAckNo`), carried in the
    /// "additional info" word of ACK and ACK2 packets to pair them for RTT
    /// sampling.
    AckNo,
    bits = 31,
    threshold = 0x3FFF_FFFF
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Literal transcription of UDT4 `CSeqNo` (common.h) on i32, the oracle.
    mod udt4 {
        pub const TH: i32 = 0x3FFF_FFFF;
        pub const MAX: i32 = 0x7FFF_FFFF;
        pub fn seqcmp(a: i32, b: i32) -> i32 {
            if (a.wrapping_sub(b)).wrapping_abs() < TH {
                a.wrapping_sub(b)
            } else {
                b.wrapping_sub(a)
            }
        }
        pub fn seqoff(a: i32, b: i32) -> i32 {
            if (a.wrapping_sub(b)).wrapping_abs() < TH {
                return b.wrapping_sub(a);
            }
            if a < b {
                return b.wrapping_sub(a).wrapping_sub(MAX).wrapping_sub(1);
            }
            b.wrapping_sub(a).wrapping_add(MAX).wrapping_add(1)
        }
        // UDT4 returns `int` here and overflows for the one length that fills
        // the whole space (2^31); the model widens first so that it states
        // the length UDT4 means rather than its overflow.
        pub fn seqlen(a: i32, b: i32) -> i64 {
            if a <= b {
                b as i64 - a as i64 + 1
            } else {
                b as i64 - a as i64 + MAX as i64 + 2
            }
        }
        pub fn incseq(a: i32, inc: i32) -> i32 {
            if MAX - a >= inc {
                a + inc
            } else {
                a - MAX + inc - 1
            }
        }
    }

    #[test]
    fn boundaries() {
        let max = SeqNo::new(SeqNo::MAX);
        assert_eq!(max.next(), SeqNo::ZERO);
        assert_eq!(SeqNo::ZERO.prev(), max);
        assert!(max.is_before(SeqNo::ZERO));
        assert_eq!(max.offset_to(SeqNo::new(1)), 2);
        assert_eq!(SeqNo::new(1).offset_to(max), -2);
        assert_eq!(max.len_to(SeqNo::new(1)), 3);
        assert_eq!(SeqNo::new(5).len_to(SeqNo::new(5)), 1);
        assert_eq!(SeqNo::new(5).len_to(SeqNo::new(4)), 1 << 31);
        assert_eq!(SeqNo::new(0x8000_0005), SeqNo::new(5));
        assert_eq!(SeqNo::new_checked(0x8000_0000), None);
        let mmax = MsgNo::new(MsgNo::MAX);
        assert_eq!(mmax.next(), MsgNo::ZERO);
        assert_eq!(mmax.offset_to(MsgNo::new(0)), 1);
        assert_eq!(MsgNo::new(0x2000_0001), MsgNo::new(1));
    }

    fn seq() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..=SeqNo::MAX,
            (SeqNo::MAX - 64)..=SeqNo::MAX,
            0u32..64,
            (SeqNo::THRESHOLD - 64)..(SeqNo::THRESHOLD + 64),
        ]
    }

    proptest! {
        #[test]
        fn matches_udt4(a in seq(), b in seq(), inc in 0u32..=SeqNo::MAX) {
            let (sa, sb) = (SeqNo::new(a), SeqNo::new(b));
            let (ia, ib) = (a as i32, b as i32);
            prop_assert_eq!(sa.offset_to(sb), udt4::seqoff(ia, ib));
            prop_assert_eq!(sa.cmp_wrapped(sb), udt4::seqcmp(ia, ib).cmp(&0));
            prop_assert_eq!(sa.len_to(sb) as i64, udt4::seqlen(ia, ib));
            prop_assert_eq!(sa.add(inc).get() as i32, udt4::incseq(ia, inc as i32));
        }

        #[test]
        fn offset_inverts_add(a in seq(), n in 0u32..SeqNo::THRESHOLD) {
            let s = SeqNo::new(a);
            prop_assert_eq!(s.offset_to(s.add(n)), n as i32);
            prop_assert_eq!(s.add(n).offset_to(s), -(n as i32));
            prop_assert_eq!(s.add(n).sub(n), s);
            prop_assert_eq!(s.add_signed(-(n as i32)), s.sub(n));
            let m = MsgNo::new(a);
            let k = n % MsgNo::THRESHOLD;
            prop_assert_eq!(m.offset_to(m.add(k)), k as i32);
        }
    }
}
