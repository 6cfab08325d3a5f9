//! Loss lists: the sequence numbers a sender must retransmit
//! ([`SndLossList`]) and the ones a receiver is still missing
//! ([`RcvLossList`]).
//!
//! UDT 4.11 (`list.cpp`) keeps both as linked lists of `[first, last]` nodes
//! inside a circular array sized to the flow window. Here both are a sorted
//! deque of disjoint, non-adjacent inclusive ranges: the receiver appends at
//! the back as gaps appear and removes as retransmissions fill them; the
//! sender inserts NAKed ranges anywhere, takes the lowest number first and
//! cuts everything an ACK covers. Memory is proportional to the number of
//! distinct gaps, not to the window, so windows sized from the
//! bandwidth-delay product of a satellite path cost nothing up front.
//!
//! The receiver's ranges also carry the time each was last reported, for
//! the periodic NAK that UDT 4.11 lacks ([`RcvLossList::take_due`]): a gap
//! is inserted when its NAK goes out, and the parts of a gap that a
//! retransmission splits keep its time. [`crate::conn`] keeps its loss
//! state in these two lists and nowhere else.
//!
//! # Guarantees
//!
//! * Ranges are kept sorted under wrap-around order, disjoint and merged
//!   (no two ranges touch), and [`len`](RcvLossList::len) is the exact count.
//! * All numbers in one list stay within [`SeqNo::THRESHOLD`] of each
//!   other, the condition under which wrap-around comparison is an order. An
//!   insert that would break it (a hostile NAK naming a number half the
//!   sequence space away) is refused with [`InsertError::OutOfWindow`] and
//!   changes nothing; a range whose end precedes its start is refused with
//!   [`InsertError::Reversed`]. Removals never fail.
//! * No operation panics, whatever the input.
//!
//! Operations cost `O(log n)` to find the place plus `O(n)` to shift the
//! deque when a range is inserted or split in the middle, where `n` is the
//! number of ranges (gaps), not of lost packets.

use crate::seq::SeqNo;
use crate::wire::encode_nak;
use core::fmt;
use std::collections::VecDeque;

/// Why a range was not inserted into a loss list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// `last` comes before `first`.
    Reversed,
    /// The list would span [`SeqNo::THRESHOLD`] numbers or more.
    OutOfWindow,
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InsertError::Reversed => f.write_str("loss range ends before it starts"),
            InsertError::OutOfWindow => {
                f.write_str("loss range lies outside the window of the loss list")
            }
        }
    }
}

impl std::error::Error for InsertError {}

/// The shared core: sorted, disjoint, merged inclusive ranges, each with a
/// tag (the receiver's last-report time; 0 and unused on the sender). A
/// merged range keeps the smallest tag of its parts, a split range's parts
/// keep its tag.
#[derive(Clone, Default, PartialEq, Eq)]
struct Ranges {
    q: VecDeque<(SeqNo, SeqNo, u64)>,
    len: u64,
}

impl fmt::Debug for Ranges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.q.iter().map(|(a, b, _)| a.get()..=b.get()))
            .finish()
    }
}

const TH: i64 = SeqNo::THRESHOLD as i64;

impl Ranges {
    #[inline]
    fn base(&self) -> Option<SeqNo> {
        self.q.front().map(|r| r.0)
    }

    #[inline]
    fn off(base: SeqNo, s: SeqNo) -> i64 {
        i64::from(base.offset_to(s))
    }

    fn insert(&mut self, first: SeqNo, last: SeqNo, tag: u64) -> Result<u32, InsertError> {
        if first.is_after(last) {
            return Err(InsertError::Reversed);
        }
        let Some(base) = self.base() else {
            if i64::from(first.offset_to(last)) >= TH {
                return Err(InsertError::OutOfWindow);
            }
            self.q.push_back((first, last, tag));
            let n = first.len_to(last);
            self.len += u64::from(n);
            return Ok(n);
        };
        let a = Self::off(base, first);
        let b = Self::off(base, last);
        // Every existing range lies in [0, end] relative to base.
        let end = self.q.back().map_or(0, |r| Self::off(base, r.1));
        let lo = a.min(0);
        let hi = b.max(end);
        if a > b || a <= -TH || b >= TH || hi - lo >= TH {
            return Err(InsertError::OutOfWindow);
        }
        // Fast path: a new gap beyond everything (the receiver's case).
        if a > end + 1 {
            self.q.push_back((first, last, tag));
            let n = (b - a + 1) as u64;
            self.len += n;
            return Ok(n as u32);
        }
        // Ranges [i, j) overlap or touch [a, b].
        let i = self.q.partition_point(|r| Self::off(base, r.1) < a - 1);
        let j = self.q.partition_point(|r| Self::off(base, r.0) <= b + 1);
        let mut covered = 0i64;
        let (mut ns, mut ne, mut nt) = (a, b, tag);
        for r in self.q.range(i..j) {
            let (rs, re) = (Self::off(base, r.0), Self::off(base, r.1));
            covered += (re.min(b) - rs.max(a) + 1).max(0);
            ns = ns.min(rs);
            ne = ne.max(re);
            nt = nt.min(r.2);
        }
        let added = (b - a + 1) - covered;
        let merged = (base.add_signed(ns as i32), base.add_signed(ne as i32), nt);
        if i < j {
            self.q[i] = merged;
            self.q.drain(i + 1..j);
        } else {
            self.q.insert(i, merged);
        }
        self.len += added as u64;
        Ok(added as u32)
    }

    fn remove_range(&mut self, first: SeqNo, last: SeqNo) -> u32 {
        let Some(base) = self.base() else {
            return 0;
        };
        let a = Self::off(base, first);
        let b = Self::off(base, last);
        if a > b {
            return 0;
        }
        let i = self.q.partition_point(|r| Self::off(base, r.1) < a);
        let mut removed = 0i64;
        let mut k = i;
        while k < self.q.len() {
            let (s, e, t) = self.q[k];
            let (rs, re) = (Self::off(base, s), Self::off(base, e));
            if rs > b {
                break;
            }
            let cut_s = rs.max(a);
            let cut_e = re.min(b);
            removed += cut_e - cut_s + 1;
            match (rs < a, re > b) {
                (false, false) => {
                    self.q.remove(k);
                    continue;
                }
                (true, false) => self.q[k].1 = base.add_signed((a - 1) as i32),
                (false, true) => self.q[k].0 = base.add_signed((b + 1) as i32),
                (true, true) => {
                    self.q[k].1 = base.add_signed((a - 1) as i32);
                    self.q
                        .insert(k + 1, (base.add_signed((b + 1) as i32), e, t));
                    k += 1;
                }
            }
            k += 1;
        }
        self.len -= removed as u64;
        removed as u32
    }

    fn remove_through(&mut self, seq: SeqNo) -> u32 {
        let mut removed = 0u64;
        while let Some(&(s, e, _)) = self.q.front() {
            if !e.is_after(seq) {
                removed += u64::from(s.len_to(e));
                self.q.pop_front();
            } else if !s.is_after(seq) {
                removed += u64::from(s.len_to(seq));
                if let Some(front) = self.q.front_mut() {
                    front.0 = seq.next();
                }
                break;
            } else {
                break;
            }
        }
        self.len -= removed;
        removed as u32
    }

    fn pop_first(&mut self) -> Option<SeqNo> {
        let (s, e, _) = *self.q.front()?;
        if s == e {
            self.q.pop_front();
        } else if let Some(front) = self.q.front_mut() {
            front.0 = s.next();
        }
        self.len -= 1;
        Some(s)
    }

    fn intersects(&self, first: SeqNo, last: SeqNo) -> bool {
        let Some(base) = self.base() else {
            return false;
        };
        let a = Self::off(base, first);
        let b = Self::off(base, last);
        if a > b {
            return false;
        }
        let i = self.q.partition_point(|r| Self::off(base, r.1) < a);
        self.q.get(i).is_some_and(|r| Self::off(base, r.0) <= b)
    }
}

macro_rules! common_methods {
    () => {
        /// An empty list.
        pub fn new() -> Self {
            Self::default()
        }

        /// Number of lost sequence numbers in the list.
        pub fn len(&self) -> u64 {
            self.r.len
        }

        /// True if nothing is lost.
        pub fn is_empty(&self) -> bool {
            self.r.q.is_empty()
        }

        /// Number of disjoint ranges (gaps).
        pub fn range_count(&self) -> usize {
            self.r.q.len()
        }

        /// The lowest lost sequence number.
        pub fn first(&self) -> Option<SeqNo> {
            self.r.q.front().map(|r| r.0)
        }

        /// The highest lost sequence number.
        pub fn last(&self) -> Option<SeqNo> {
            self.r.q.back().map(|r| r.1)
        }

        /// The inclusive ranges, lowest first.
        pub fn ranges(&self) -> impl ExactSizeIterator<Item = (SeqNo, SeqNo)> + '_ {
            self.r.q.iter().map(|&(a, b, _)| (a, b))
        }

        /// True if `seq` is in the list.
        pub fn contains(&self, seq: SeqNo) -> bool {
            self.r.intersects(seq, seq)
        }

        /// True if any number of `first ..= last` is in the list (UDT4
        /// `CRcvLossList::find`).
        pub fn intersects(&self, first: SeqNo, last: SeqNo) -> bool {
            self.r.intersects(first, last)
        }

        /// Adds `first ..= last`, merging with what is there; returns how
        /// many numbers were new. Refused, leaving the list unchanged, if
        /// the range is reversed or would stretch the list across
        /// [`SeqNo::THRESHOLD`] numbers or more.
        pub fn insert(&mut self, first: SeqNo, last: SeqNo) -> Result<u32, InsertError> {
            self.r.insert(first, last, 0)
        }

        /// Removes every number of `first ..= last`; returns how many were
        /// in the list. A reversed range removes nothing.
        pub fn remove_range(&mut self, first: SeqNo, last: SeqNo) -> u32 {
            self.r.remove_range(first, last)
        }

        /// Removes one number; returns whether it was in the list.
        pub fn remove(&mut self, seq: SeqNo) -> bool {
            self.r.remove_range(seq, seq) == 1
        }

        /// Removes every number up to and including `seq`; returns how many.
        pub fn remove_through(&mut self, seq: SeqNo) -> u32 {
            self.r.remove_through(seq)
        }

        /// Empties the list.
        pub fn clear(&mut self) {
            self.r.q.clear();
            self.r.len = 0;
        }
    };
}

/// The sender's loss list (UDT4 `CSndLossList`): sequence numbers the peer
/// reported lost (NAK) or that timed out, waiting to be retransmitted lowest
/// first.
///
/// Mapping from UDT4: `insert` = `insert`, `remove(seqno)` (everything
/// acknowledged) = [`SndLossList::remove_through`], `getLostSeq` =
/// [`SndLossList::pop_first`], `getLossLength` = [`SndLossList::len`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SndLossList {
    r: Ranges,
}

impl SndLossList {
    common_methods!();

    /// Takes the lowest number for retransmission.
    pub fn pop_first(&mut self) -> Option<SeqNo> {
        self.r.pop_first()
    }
}

/// The receiver's loss list (UDT4 `CRcvLossList`): gaps in the received
/// sequence, reported by NAK until the retransmissions fill them.
///
/// Mapping from UDT4: `insert` = `insert`, `remove(seqno)` =
/// [`RcvLossList::remove`], `remove(seqno1, seqno2)` (message drop) =
/// [`RcvLossList::remove_range`], `find` = [`RcvLossList::intersects`],
/// `getFirstLostSeq` = [`RcvLossList::first`], `getLossArray` =
/// [`RcvLossList::encode_nak`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcvLossList {
    r: Ranges,
}

impl RcvLossList {
    common_methods!();

    /// Writes the list, lowest first, as a NAK loss list into `buf` — as
    /// many whole entries as fit — and returns the number of bytes written
    /// (0 if the list is empty or `buf` holds less than one entry).
    pub fn encode_nak(&self, buf: &mut [u8]) -> usize {
        encode_nak(self.ranges(), buf)
    }

    /// As [`insert`](RcvLossList::insert), recording `now` as the time the
    /// range was last reported (a NAK is sent when a gap appears). Ranges
    /// inserted with [`insert`](RcvLossList::insert) count as reported at
    /// time 0. Where ranges merge, the merged range keeps the earliest time.
    pub fn insert_reported(
        &mut self,
        first: SeqNo,
        last: SeqNo,
        now: u64,
    ) -> Result<u32, InsertError> {
        self.r.insert(first, last, now)
    }

    /// The time `seq`'s range was last reported, if `seq` is in the list.
    pub fn reported_at(&self, seq: SeqNo) -> Option<u64> {
        let base = self.r.base()?;
        let a = Ranges::off(base, seq);
        let i = self.r.q.partition_point(|r| Ranges::off(base, r.1) < a);
        self.r
            .q
            .get(i)
            .filter(|r| Ranges::off(base, r.0) <= a)
            .map(|r| r.2)
    }

    /// The periodic NAK: appends to `out`, lowest first, up to `max` ranges
    /// whose retransmission is overdue, and marks them reported at `now`.
    /// Returns how many ranges were appended.
    ///
    /// A range is overdue once it was last reported at or before `due`, less
    /// `per_pkt_ns` for every lost packet below it: the sender resends its
    /// loss list lowest first, one packet every `per_pkt_ns`, so a range's
    /// retransmission leaves after those of every range below it. The oldest
    /// holes (a retransmission lost again) are resent first, so they must not
    /// wait for the whole list's drain: the sender's window stalls behind
    /// the oldest hole.
    pub fn take_due(
        &mut self,
        due: u64,
        per_pkt_ns: u64,
        now: u64,
        max: usize,
        out: &mut Vec<(SeqNo, SeqNo)>,
    ) -> usize {
        let mut n = 0;
        let mut below = 0u64;
        for r in self.r.q.iter_mut() {
            if n >= max {
                break;
            }
            let wait = below.saturating_mul(per_pkt_ns) / 1000;
            if r.2.saturating_add(wait) <= due {
                out.push((r.0, r.1));
                r.2 = now;
                n += 1;
            }
            below += u64::from(r.0.len_to(r.1));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::NakList;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn s(v: u32) -> SeqNo {
        SeqNo::new(v)
    }

    #[test]
    fn merge_split_and_wrap() {
        let mut l = RcvLossList::new();
        let m = SeqNo::MAX;
        assert_eq!(l.insert(s(m - 2), s(m)), Ok(3));
        assert_eq!(l.insert(s(0), s(3)), Ok(4)); // adjacent across the wrap
        assert_eq!(l.range_count(), 1);
        assert_eq!(l.len(), 7);
        assert_eq!(l.first(), Some(s(m - 2)));
        assert!(l.remove(s(0)));
        assert_eq!(l.range_count(), 2);
        assert_eq!(
            l.ranges().collect::<Vec<_>>(),
            vec![(s(m - 2), s(m)), (s(1), s(3))]
        );
        let mut buf = [0u8; 64];
        let n = l.encode_nak(&mut buf);
        let nak = NakList::new_checked(&buf[..n]).unwrap();
        assert_eq!(
            nak.ranges().collect::<Vec<_>>(),
            l.ranges().collect::<Vec<_>>()
        );
        assert_eq!(l.remove_through(s(2)), 5);
        assert_eq!(l.ranges().collect::<Vec<_>>(), vec![(s(3), s(3))]);
    }

    #[test]
    fn refuses_hostile_ranges() {
        let mut l = SndLossList::new();
        assert_eq!(l.insert(s(10), s(5)), Err(InsertError::Reversed));
        assert_eq!(l.insert(s(10), s(20)), Ok(11));
        assert_eq!(
            l.insert(s(10 + SeqNo::THRESHOLD), s(10 + SeqNo::THRESHOLD)),
            Err(InsertError::OutOfWindow)
        );
        assert_eq!(
            l.insert(s(0), s(SeqNo::THRESHOLD)),
            Err(InsertError::Reversed)
        );
        assert_eq!(
            l.insert(s(20), s(10 + SeqNo::THRESHOLD)),
            Err(InsertError::OutOfWindow)
        );
        // A span just inside the threshold is fine.
        let mut w = SndLossList::new();
        assert_eq!(w.insert(s(10), s(10)), Ok(1));
        assert_eq!(
            w.insert(s(9 + SeqNo::THRESHOLD), s(9 + SeqNo::THRESHOLD)),
            Ok(1)
        );
        assert_eq!(l.len(), 11);
        assert_eq!(l.remove_range(s(30), s(25)), 0);
        assert_eq!(l.remove_range(s(0), s(SeqNo::MAX)), 0); // reversed under wrap order
        assert_eq!(l.pop_first(), Some(s(10)));
        assert_eq!(l.first(), Some(s(11)));
    }

    #[test]
    fn report_times_follow_splits_and_merges() {
        let mut l = RcvLossList::new();
        assert_eq!(l.insert_reported(s(10), s(19), 100), Ok(10));
        assert_eq!(l.insert_reported(s(30), s(39), 200), Ok(10));
        // A retransmission splits the first gap: both parts keep its time.
        assert!(l.remove(s(15)));
        assert_eq!(l.reported_at(s(12)), Some(100));
        assert_eq!(l.reported_at(s(17)), Some(100));
        assert_eq!(l.reported_at(s(15)), None);
        assert_eq!(l.reported_at(s(35)), Some(200));
        let mut out = Vec::new();
        // Due at 150: the two parts of the first gap, not the second.
        assert_eq!(l.take_due(150, 0, 400, 64, &mut out), 2);
        assert_eq!(out, vec![(s(10), s(14)), (s(16), s(19))]);
        assert_eq!(l.reported_at(s(10)), Some(400));
        out.clear();
        // At most `max` ranges per call, lowest first.
        assert_eq!(l.take_due(1000, 0, 1100, 2, &mut out), 2);
        assert_eq!(out, vec![(s(10), s(14)), (s(16), s(19))]);
        assert_eq!(l.reported_at(s(30)), Some(200));
        // The losses below a range delay it by their retransmissions: at
        // 10 µs a packet, (30..39) waits for the 10 of (10..19) too.
        let mut l2 = RcvLossList::new();
        assert_eq!(l2.insert_reported(s(10), s(19), 100), Ok(10));
        assert_eq!(l2.insert_reported(s(30), s(39), 100), Ok(10));
        let mut out2 = Vec::new();
        assert_eq!(l2.take_due(150, 10_000, 400, 64, &mut out2), 1);
        assert_eq!(out2, vec![(s(10), s(19))]);
        out2.clear();
        // Reported again at 400; (30..39) is due once 100 + 100 µs passed.
        assert_eq!(l2.take_due(199, 10_000, 450, 64, &mut out2), 0);
        assert_eq!(l2.take_due(200, 10_000, 460, 64, &mut out2), 1);
        assert_eq!(out2, vec![(s(30), s(39))]);
        // A merge keeps the earliest time.
        assert_eq!(l.insert_reported(s(20), s(29), 5000), Ok(10));
        assert_eq!(l.range_count(), 2);
        assert_eq!(l.reported_at(s(25)), Some(200));
        // Plain insert counts as reported at time 0.
        assert_eq!(l.insert(s(50), s(50)), Ok(1));
        assert_eq!(l.reported_at(s(50)), Some(0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u32),
        RemoveRange(u32, u32),
        Remove(u32),
        RemoveThrough(u32),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..600, 0u32..40).prop_map(|(a, l)| Op::Insert(a, l)),
            2 => (0u32..600, 0u32..60).prop_map(|(a, l)| Op::RemoveRange(a, l)),
            2 => (0u32..600).prop_map(Op::Remove),
            1 => (0u32..600).prop_map(Op::RemoveThrough),
            1 => Just(Op::Pop),
        ]
    }

    fn base() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..=SeqNo::MAX, (SeqNo::MAX - 700)..=SeqNo::MAX]
    }

    fn check(r: &Ranges, base: SeqNo, oracle: &BTreeSet<u32>) -> Result<(), TestCaseError> {
        let mut got = BTreeSet::new();
        let mut prev_end: Option<i64> = None;
        let mut total = 0u64;
        for &(a, b, _) in &r.q {
            let (oa, ob) = (base.offset_to(a) as i64, base.offset_to(b) as i64);
            prop_assert!(oa <= ob, "reversed range");
            if let Some(pe) = prev_end {
                prop_assert!(oa > pe + 1, "ranges overlap or touch");
            }
            prev_end = Some(ob);
            for o in oa..=ob {
                got.insert(o as u32);
            }
            total += (ob - oa + 1) as u64;
        }
        prop_assert_eq!(&got, oracle);
        prop_assert_eq!(r.len, total);
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_btreeset(b in base(), ops in proptest::collection::vec(op(), 1..120)) {
            let base = SeqNo::new(b);
            let mut snd = SndLossList::new();
            let mut rcv = RcvLossList::new();
            let mut oracle = BTreeSet::<u32>::new();
            for op in ops {
                match op {
                    Op::Insert(a, l) => {
                        let new = (a..=a + l).filter(|x| !oracle.contains(x)).count() as u32;
                        prop_assert_eq!(snd.insert(base.add(a), base.add(a + l)), Ok(new));
                        prop_assert_eq!(rcv.insert(base.add(a), base.add(a + l)), Ok(new));
                        oracle.extend(a..=a + l);
                    }
                    Op::RemoveRange(a, l) => {
                        let gone = (a..=a + l).filter(|x| oracle.remove(x)).count() as u32;
                        prop_assert_eq!(snd.remove_range(base.add(a), base.add(a + l)), gone);
                        prop_assert_eq!(rcv.remove_range(base.add(a), base.add(a + l)), gone);
                    }
                    Op::Remove(a) => {
                        let was = oracle.remove(&a);
                        prop_assert_eq!(rcv.contains(base.add(a)), was);
                        prop_assert_eq!(snd.remove(base.add(a)), was);
                        prop_assert_eq!(rcv.remove(base.add(a)), was);
                    }
                    Op::RemoveThrough(a) => {
                        let gone: Vec<u32> = oracle.range(..=a).copied().collect();
                        for g in &gone { oracle.remove(g); }
                        prop_assert_eq!(snd.remove_through(base.add(a)), gone.len() as u32);
                        prop_assert_eq!(rcv.remove_through(base.add(a)), gone.len() as u32);
                    }
                    Op::Pop => {
                        let want = oracle.pop_first().map(|o| base.add(o));
                        prop_assert_eq!(snd.pop_first(), want);
                        if let Some(w) = want { prop_assert!(rcv.remove(w)); }
                    }
                }
                check(&snd.r, base, &oracle)?;
                check(&rcv.r, base, &oracle)?;
                prop_assert_eq!(snd.first(), oracle.first().map(|&o| base.add(o)));
                prop_assert_eq!(rcv.last(), oracle.last().map(|&o| base.add(o)));
                prop_assert_eq!(
                    rcv.intersects(base.add(100), base.add(200)),
                    oracle.range(100..=200).next().is_some()
                );
            }
            // NAK encoding round trip of the final state.
            let mut buf = vec![0u8; 8 * rcv.range_count()];
            let n = rcv.encode_nak(&mut buf);
            if rcv.is_empty() {
                prop_assert_eq!(n, 0);
            } else {
                let nak = NakList::new_checked(&buf[..n]).unwrap();
                prop_assert_eq!(nak.ranges().collect::<Vec<_>>(), rcv.ranges().collect::<Vec<_>>());
                prop_assert_eq!(nak.loss_count(), rcv.len());
            }
        }
    }
}
