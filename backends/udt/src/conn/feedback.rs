//! The sender's handling of the receiver's feedback: ACKs (full and light)
//! move the acknowledgement point, complete messages and feed the path
//! estimates and the controller; NAKs put packets on the loss list for
//! [`super::sender`] to retransmit. Reports naming packets never sent are
//! dropped and counted.

use super::{Connection, DropCause, Event, MAX_FLOW_WINDOW, MAX_NAK_SPAN, MAX_RTT_US, SYN_US};
use crate::cc;
use crate::estimate::{Time, INITIAL_RTT_US};
use crate::seq::{AckNo, SeqNo};
use crate::wire::{AckStats, ControlRepr, NakList};

/// Most loss ranges read from one NAK datagram. Our receiver sends at most
/// 28 entries per NAK (a NAK fits [`super::CTRL_MAX`] bytes) and UDT4 at
/// most a payload of 32-bit words (364 at the usual MSS); the rest of a
/// longer list is ignored and counted: what it names is reported again by
/// the next NAK or resent on EXP.
const MAX_NAK_RANGES: usize = 1024;

impl Connection {
    pub(super) fn handle_ack(
        &mut self,
        now: Time,
        ack_no: AckNo,
        last: SeqNo,
        stats: Option<AckStats>,
    ) {
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
            self.handle_light_ack(now, a);
            return;
        };
        self.answer_ack(now, ack_no);
        if a >= self.tx.una {
            self.tx.flow_window = st.avail_buf.clamp(2, MAX_FLOW_WINDOW);
        }
        let (newly, data_advanced) = self.acknowledge(now, a);
        self.report_ack(now, last, newly, data_advanced, &st);
    }

    /// A light ACK only moves the window.
    fn handle_light_ack(&mut self, now: Time, a: u64) {
        if a > self.tx.una {
            let adv = (a - self.tx.una) as u32;
            self.tx.flow_window = self.tx.flow_window.saturating_sub(adv).max(2);
            self.advance_una(now, a);
        }
    }

    /// Answers a full ACK with an ACK2, at most once per SYN unless the ACK
    /// repeats the number last answered.
    fn answer_ack(&mut self, now: Time, ack_no: AckNo) {
        if now.saturating_sub(self.tx.last_ack2_time) > SYN_US || ack_no == self.tx.last_ack2_no {
            self.queue_ctrl(&ControlRepr::Ack2 { ack_seq_no: ack_no }, self.peer_id, now);
            self.tx.last_ack2_no = ack_no;
            self.tx.last_ack2_time = now;
        }
    }

    /// Moves the acknowledgement point to `a` (a full ACK); returns how many
    /// packets it acknowledged beyond the last full ACK, and whether it
    /// advanced past that.
    ///
    /// The path estimates are taken from every full ACK, also one that
    /// does not advance past the last full ACK (UDT4 drops those).
    /// Whether it advanced is judged, as UDT4 does, against the last
    /// full ACK, not against `una`: light ACKs (every 64 packets) move
    /// `una` in between, and judged against `una` most full ACKs at
    /// high rates would not count, and the controller's rate increase
    /// (UDT4's onACK) would be skipped.
    fn acknowledge(&mut self, now: Time, a: u64) -> (u32, bool) {
        let advanced = a > self.tx.una;
        let data_advanced = a > self.tx.data_ack;
        if advanced {
            // Sender-side RTT sample from the newest packet this ACK covers
            // (Karn: never from a retransmission); only its minimum is trusted.
            let newest = self.tx.pkts[(a - 1 - self.tx.una) as usize];
            let s = now
                .saturating_sub(newest.sent_at)
                .clamp(1, u64::from(u32::MAX)) as u32;
            if !newest.retx {
                self.tx.own_min_rtt = self.tx.own_min_rtt.min(s);
            }
            // Karn's rule for holes: an ACK that advances over a packet sent
            // again was held back by the hole it filled, and its sample runs
            // from a packet sent up to a round before the hole's
            // retransmission arrived (two rounds less the gap to the next
            // hole). Its excess is no queue of ours, so the queue bound cannot
            // explain it, and enough such samples in a row (a lossy path, a
            // sender far below capacity) would replace the minimum.
            let filled_hole = self
                .tx
                .pkts
                .range(..(a - self.tx.una) as usize)
                .any(|p| p.retx);
            if !filled_hole {
                // At most the packets in flight can queue ahead of it at the
                // bottleneck: what the sample may hold of our own queue
                // (counted as the ACK comes, near what was out when it left).
                let inflight = self.tx.next - self.tx.una;
                let queue_bound = if self.tx.bandwidth > 1 {
                    (inflight * 1_000_000 / u64::from(self.tx.bandwidth)).min(u64::from(u32::MAX))
                        as u32
                } else {
                    u32::MAX
                };
                self.tx.min_rtt.on_sample(now, s, queue_bound);
            }
        }
        let newly = a.saturating_sub(self.tx.data_ack) as u32;
        if data_advanced {
            self.tx.data_ack = a;
        }
        if advanced {
            self.advance_una(now, a);
        }
        (newly, data_advanced)
    }

    /// Feeds a full ACK's RTT and rate reports to the estimates and the
    /// controller.
    fn report_ack(
        &mut self,
        now: Time,
        last: SeqNo,
        newly: u32,
        data_advanced: bool,
        st: &AckStats,
    ) {
        // The receiver's RTT (from ACK/ACK2), unless it is still UDT4's guess.
        if !(st.rtt == INITIAL_RTT_US && st.rtt_var == INITIAL_RTT_US / 2) && st.rtt > 0 {
            self.tx.rtt.on_sample(st.rtt.min(MAX_RTT_US));
            self.tx.min_rtt.on_report(st.rtt.min(MAX_RTT_US));
        }
        // Rates beyond any link are clamped, not dropped: the report is
        // still a report (a zero still means "no estimate").
        let max_rate = self.max_rate_pps();
        let mut ack = cc::Ack {
            seq: last.get(),
            newly_acked: newly,
            ..cc::Ack::default()
        };
        if let Some(r) = st.rates {
            let (recv_rate, capacity) = (r.recv_rate.min(max_rate), r.link_capacity.min(max_rate));
            if recv_rate > 0 {
                self.tx.recv_rate =
                    ((u64::from(self.tx.recv_rate) * 7 + u64::from(recv_rate)) >> 3) as u32;
                ack.recv_rate_sample = recv_rate;
            }
            if capacity > 0 {
                self.tx.bandwidth =
                    ((u64::from(self.tx.bandwidth) * 7 + u64::from(capacity)) >> 3) as u32;
                ack.bandwidth_sample = capacity;
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

    pub(super) fn handle_nak(&mut self, now: Time, loss: NakList<'_>) {
        self.stats.naks_received += 1;
        let Some(ranges) = self.nak_ranges(&loss) else {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        };
        let new = self.insert_fresh_losses(now, &ranges);
        self.stats.pkts_nak_received += u64::from(new);
        self.progress(now);
        let raw: Vec<(u32, u32)> = loss
            .ranges()
            .take(MAX_NAK_RANGES)
            .map(|(a, b)| (a.get(), b.get()))
            .collect();
        let path = self.path();
        self.cc.on_loss(now, &path, &raw, new);
    }

    /// The loss report's ranges as indices, cut to what is still in flight,
    /// sorted and merged; `None` if it names a packet never sent or an
    /// absurd range.
    ///
    /// The work a report costs is bounded whatever it says: only its first
    /// [`MAX_NAK_RANGES`] ranges are read (the rest are counted in
    /// [`super::Stats::nak_ranges_ignored`]), and merged ranges no longer
    /// overlap, so [`Connection::insert_fresh_losses`] visits each packet in
    /// flight at most once: a datagram of ~8000 ranges that each name the
    /// whole flight costs one pass over it, not 8000.
    fn nak_ranges(&mut self, loss: &NakList<'_>) -> Option<Vec<(u64, u64)>> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut all = loss.ranges();
        for (a, b) in all.by_ref().take(MAX_NAK_RANGES) {
            self.stats.nak_work += 1;
            let (Some(ia), Some(ib)) = (self.idx_of(self.tx.una, a), self.idx_of(self.tx.una, b))
            else {
                return None;
            };
            if ib >= self.tx.next || ia > ib || ib - ia > MAX_NAK_SPAN {
                return None;
            }
            if ib < self.tx.una {
                continue;
            }
            ranges.push((ia.max(self.tx.una), ib));
        }
        let excess = all.count() as u64;
        self.stats.nak_ranges_ignored += excess;
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Some(merged)
    }

    /// Puts the reported packets on the loss list, returning how many were
    /// new there. A report naming a packet retransmitted less than an RTT
    /// ago is stale (sent before the retransmission could arrive): it is
    /// skipped.
    fn insert_fresh_losses(&mut self, now: Time, ranges: &[(u64, u64)]) -> u32 {
        let fresh = now.saturating_sub(u64::from(self.rtt()));
        let mut new = 0u32;
        for &(a, b) in ranges {
            // Insert the runs between packets whose report is stale.
            let mut run: Option<u64> = None;
            for i in a..=b + 1 {
                let stale = i > b || {
                    self.stats.nak_work += 1;
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
        new
    }
}
