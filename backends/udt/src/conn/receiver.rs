//! The receiving half: data packets placed in a window of slots by
//! sequence number, losses reported (NAK), messages delivered whole and in
//! order, and the ACKs that tell the sender how far it got.
//!
//! Slot `i` holds packet `base + i` (a 64-bit index from the ISN, as on the
//! sending side). The ACK point is the first missing packet; slots before
//! it wait only for the rest of their message.

use std::collections::VecDeque;

use super::{Connection, DropCause, Event, Extent, Mode, State, CTRL_MAX, MAX_NAK_SPAN};
use crate::estimate::{ArrivalRate, Capacity, Rtt, Time};
use crate::loss::RcvLossList;
use crate::seq::{AckNo, MsgNo, SeqNo};
use crate::wire::{
    encode_nak, AckRates, AckStats, ControlRepr, DataHeader, NakList, Packet, Position, HEADER_LEN,
};

#[derive(Debug, Clone, Copy)]
pub(super) enum Slot {
    /// Not received (yet).
    Empty,
    /// Received; the payload lies at `ext` in the engine's buffer.
    Pkt {
        ext: Extent,
        msg_no: MsgNo,
        pos: Position,
    },
    /// Named by a message drop request for this message: nothing of it
    /// will come. A packet of another message may still fill the slot.
    Dropped(MsgNo),
}

/// The receiver's state.
#[derive(Debug)]
pub(super) struct Receiver {
    /// Index of the packet in `slots[0]`.
    pub(super) base: u64,
    pub(super) slots: VecDeque<Slot>,
    /// One past the highest index received (or dropped).
    pub(super) next: u64,
    /// Missing packets, each range with the time it was last reported
    /// (NAK); all within `base .. next`.
    pub(super) lost: RcvLossList,
    /// Receive buffer, packets: slots cover at most `base .. base + buf_pkts`.
    pub(super) buf_pkts: u32,
    /// Free receive memory beyond what the connection holds, in packets, as
    /// the owner last said ([`Connection::set_rcv_room`]); `None`: unlimited.
    pub(super) room: Option<u32>,
    /// Slots holding a packet.
    pub(super) held: usize,
    /// Where the search for the end of the front message resumes.
    pub(super) scan: usize,
    /// The highest ACK point a full ACK reached.
    pub(super) last_ack: u64,
    /// The highest ACK point the sender confirmed with an ACK2.
    pub(super) last_ack_ack: u64,
    /// One past the highest index the sender may have sent: the largest
    /// ACK point plus the flow window advertised with it (the handshake's
    /// window, `buf_pkts`, to begin with).
    pub(super) send_limit: u64,
    /// Number of the last full ACK.
    pub(super) ack_no: AckNo,
    /// Full ACKs awaiting their ACK2: (number, ACK point, time sent).
    pub(super) ack_window: VecDeque<(AckNo, u64, Time)>,
    pub(super) last_ack_time: Time,
    pub(super) next_ack_time: Time,
    /// Data packets since the ACK timer last fired.
    pub(super) pkt_count: u32,
    /// The next light ACK is due at `pkt_count == 64 × light_count`.
    pub(super) light_count: u32,
    /// When the last light ACK went out.
    pub(super) last_light_ack: Time,
    pub(super) next_nak_time: Time,
    pub(super) arrival: ArrivalRate,
    pub(super) capacity: Capacity,
    /// RTT: the handshake's round trip, then ACK → ACK2 round trips.
    pub(super) rtt: Rtt,
}

/// What the front of the receive buffer holds, in message mode.
enum Front {
    /// A whole message in slots `0 ..= end`.
    Complete(usize),
    /// The first `n` slots are remains of a message whose other packets
    /// were dropped.
    Broken(usize),
    /// The front message is not all here; the search stopped at this slot.
    Incomplete(usize),
}

impl Receiver {
    pub(super) fn new(now: Time, buf_pkts: u32) -> Receiver {
        Receiver {
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
            send_limit: u64::from(buf_pkts),
            ack_no: AckNo::new(0),
            ack_window: VecDeque::new(),
            last_ack_time: 0,
            next_ack_time: now + super::SYN_US,
            pkt_count: 0,
            light_count: 1,
            last_light_ack: 0,
            next_nak_time: now,
            arrival: ArrivalRate::new(),
            capacity: Capacity::new(),
            rtt: Rtt::new(),
        }
    }

    fn pop_front(&mut self) -> Slot {
        let s = self.slots.pop_front().unwrap_or(Slot::Empty);
        self.base += 1;
        if let Slot::Pkt { .. } = s {
            self.held -= 1;
        }
        s
    }

    /// Searches the front message's end from `scan` on.
    fn front_message(&self) -> Front {
        let mut i = self.scan;
        while i < self.slots.len() {
            match self.slots[i] {
                Slot::Empty => break,
                Slot::Dropped(_) => return Front::Broken(i),
                Slot::Pkt { pos, .. } => {
                    if i == 0 && !pos.is_first() {
                        return Front::Broken(1);
                    }
                    if i > 0 && pos.is_first() {
                        return Front::Broken(i);
                    }
                    if pos.is_last() {
                        return Front::Complete(i);
                    }
                }
            }
            i += 1;
        }
        Front::Incomplete(i)
    }

    /// The flow window a full ACK at `ack` advertises. As UDT4's
    /// getAvailBufSize: the buffer less what is acknowledged but not yet
    /// handed out (the sender counts what it has in flight beyond the ACK
    /// point itself); at least 2, UDT4's deadlock breaker.
    fn avail_buf(&self, ack: u64) -> u32 {
        let mut avail = self.buf_pkts.saturating_sub((ack - self.base) as u32);
        if let Some(room) = self.room {
            // What the owner's memory can still take, plus what this
            // connection holds beyond the ACK point already (the sender
            // counts those as in flight).
            let beyond = self.held.saturating_sub((ack - self.base) as usize);
            avail = avail.min(room.saturating_add(u32::try_from(beyond).unwrap_or(u32::MAX)));
        }
        avail.max(2)
    }
}

impl Connection {
    /// A data datagram addressed to socket `dst`, lying at `at`.
    pub(super) fn handle_data_datagram(
        &mut self,
        now: Time,
        pkt: &Packet<&[u8]>,
        dst: u32,
        at: Extent,
    ) -> bool {
        if dst != self.socket_id {
            self.stats.count_drop(DropCause::WrongSocket);
            return false;
        }
        if self.state != State::Connected {
            self.stats.count_drop(DropCause::WrongState);
            return false;
        }
        let Ok(h) = DataHeader::parse(pkt) else {
            self.stats.count_drop(DropCause::Malformed);
            return false;
        };
        let payload_len = pkt.as_bytes().len() - HEADER_LEN;
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

    fn handle_data(&mut self, now: Time, h: &DataHeader, ext: Extent) -> bool {
        self.catch_up_ack_timer(now);
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

    /// Puts the packet in its slot; returns whether it is kept.
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
            self.extend_to(now, idx);
        }
        let si = (idx - self.rx.base) as usize;
        match self.rx.slots[si] {
            Slot::Dropped(m) if m != h.msg_no => {
                // A drop request named this slot for another message: it
                // was forged (or stale). The data is real; keep it.
                self.stats.pkts_undropped += 1;
                self.rx.slots[si] = Slot::Pkt {
                    ext,
                    msg_no: h.msg_no,
                    pos: h.position,
                };
                self.rx.held += 1;
                true
            }
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
            Slot::Pkt { .. } | Slot::Dropped(_) => {
                self.stats.count_drop(DropCause::OutOfWindow);
                false
            }
        }
    }

    /// Packet `idx`, at or beyond `next`, arrived: the packets it skipped
    /// are lost (reported at once), and the slots reach up to it.
    fn extend_to(&mut self, now: Time, idx: u64) {
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

    fn release_front(&mut self, n: usize) {
        for _ in 0..n {
            if let Slot::Pkt { ext, .. } = self.rx.pop_front() {
                self.released.push_back(ext);
            }
        }
        self.rx.scan = 0;
    }

    /// On close: gives back every held region and forgets every loss.
    pub(super) fn release_all(&mut self) {
        while !self.rx.slots.is_empty() {
            if let Slot::Pkt { ext, .. } = self.rx.pop_front() {
                self.released.push_back(ext);
            }
        }
        self.rx.lost.clear();
    }

    /// Delivers what the front of the buffer completes: every packet in
    /// stream mode, whole messages in message mode.
    fn deliver(&mut self) {
        loop {
            match self.rx.slots.front() {
                None | Some(Slot::Empty) => return,
                Some(Slot::Dropped(_)) => {
                    self.rx.pop_front();
                    self.rx.scan = 0;
                    continue;
                }
                Some(Slot::Pkt { .. }) => {}
            }
            if self.cfg.mode == Mode::Stream {
                if let Slot::Pkt { ext, .. } = self.rx.pop_front() {
                    self.stats.bytes_delivered += u64::from(ext.len);
                    self.events.push_back(Event::StreamData(ext));
                }
                continue;
            }
            match self.rx.front_message() {
                Front::Complete(end) => self.deliver_message(end),
                Front::Broken(n) => self.release_front(n),
                Front::Incomplete(i) => {
                    self.rx.scan = i;
                    return;
                }
            }
        }
    }

    /// Hands out the message in slots `0 ..= end`.
    fn deliver_message(&mut self, end: usize) {
        let mut extents = Vec::with_capacity(end + 1);
        let mut msg_no = 0;
        for _ in 0..=end {
            if let Slot::Pkt { ext, msg_no: m, .. } = self.rx.pop_front() {
                self.stats.bytes_delivered += u64::from(ext.len);
                extents.push(ext);
                msg_no = m.get();
            }
        }
        self.rx.scan = 0;
        self.events
            .push_back(Event::MessageReceived { msg_no, extents });
    }

    /// The sender dropped message `msg_no` (`first ..= last`): stop waiting
    /// for the packets of it that have not arrived.
    ///
    /// Nothing on the plain UDT4 wire says who sent the request, so it is
    /// honoured only as far as it is consistent with what this receiver
    /// knows, and it never throws data away:
    /// - a range reaching beyond what the sender may have sent (the largest
    ///   ACK point plus the window advertised with it) is refused and
    ///   counted, as is one naming a received packet of another message
    ///   (a message's packets are consecutive; UDT 4.11's request may name
    ///   one packet past its message, so its last slot is not checked);
    /// - it is cut at the highest packet received: the receiver never moves
    ///   past packets it has not seen. Had the sender dropped those, the
    ///   packets after them open a gap, the NAK for it names packets of a
    ///   dropped message, and the sender repeats the request (lu2k and
    ///   UDT4 both do);
    /// - only empty slots are marked dropped. Received packets stay; a
    ///   message left incomplete is given back whole when it reaches the
    ///   front, and a message that arrived whole is still delivered;
    /// - a packet of another message that arrives in a slot marked dropped
    ///   fills it (the request was forged or stale).
    ///
    /// What remains until the wire is authenticated (issue 14, item 1): a
    /// forged request naming holes below the highest packet received, with
    /// the right message number, still marks them dropped, and once
    /// delivery passes them the packets that fill them later are discarded
    /// while the ACK told the sender they arrived.
    pub(super) fn handle_drop_req(&mut self, msg_no: MsgNo, first: SeqNo, last: SeqNo) {
        self.stats.drop_reqs_received += 1;
        let (Some(a), Some(b)) = (
            self.idx_of(self.rx.next, first),
            self.idx_of(self.rx.next, last),
        ) else {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        };
        if a > b
            || b >= self.rx.base + u64::from(self.rx.buf_pkts)
            || b >= self.rx.send_limit
            || b - a > MAX_NAK_SPAN
        {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        }
        if self.rx.next == 0 {
            return;
        }
        let (a, b) = (a.max(self.rx.base), b.min(self.rx.next - 1));
        if b < a {
            return;
        }
        // The packet before the range, if here, must end its message unless
        // it is of this one (UDT4 may name the rest of a message).
        let split = a > self.rx.base
            && matches!(self.rx.slots[(a - 1 - self.rx.base) as usize],
                Slot::Pkt { msg_no: m, pos, .. } if m != msg_no && !pos.is_last());
        let other = split
            || (a..b).any(|i| {
                matches!(self.rx.slots[(i - self.rx.base) as usize],
                Slot::Pkt { msg_no: m, .. } if m != msg_no)
            });
        if other {
            self.stats.count_drop(DropCause::BadLossReport);
            return;
        }
        self.rx.lost.remove_range(self.seq_of(a), self.seq_of(b));
        for i in a..=b {
            let si = (i - self.rx.base) as usize;
            if let Slot::Empty = self.rx.slots[si] {
                self.rx.slots[si] = Slot::Dropped(msg_no);
            }
        }
        self.rx.scan = 0;
        self.deliver();
    }

    // ------------------------------------------------------------ ACK, NAK

    pub(super) fn handle_ack2(&mut self, now: Time, ack_no: AckNo) {
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

    /// The first packet not received.
    fn ack_point(&self) -> u64 {
        self.rx
            .lost
            .first()
            .and_then(|s| self.idx_of(self.rx.next, s))
            .map_or(self.rx.next, |i| i.min(self.rx.next))
    }

    /// Queues an ACK (light or full) if there is news for the sender.
    pub(super) fn send_ack(&mut self, now: Time, light: bool) {
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
        if !self.full_ack_due(now, ack) {
            return;
        }
        self.rx.ack_no = self.rx.ack_no.next();
        let avail = self.rx.avail_buf(ack);
        self.rx.send_limit = self.rx.send_limit.max(ack + u64::from(avail));
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

    /// Whether a full ACK at `ack` is worth sending: it advances (it then
    /// becomes `last_ack`) or repeats `last_ack` at least `RTT + 4·RTTVar`
    /// after the last full ACK, and the sender has not confirmed it yet.
    fn full_ack_due(&mut self, now: Time, ack: u64) -> bool {
        if ack > self.rx.last_ack {
            self.rx.last_ack = ack;
        } else if ack == self.rx.last_ack {
            let wait = u64::from(self.rx.rtt.rtt()) + 4 * u64::from(self.rx.rtt.var());
            if now.saturating_sub(self.rx.last_ack_time) < wait {
                return false;
            }
        } else {
            return false;
        }
        self.rx.last_ack > self.rx.last_ack_ack
    }

    /// Queues loss reports for `ranges`, split over as many NAKs as needed.
    pub(super) fn queue_nak(&mut self, ranges: &[(SeqNo, SeqNo)], now: Time) {
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
}
