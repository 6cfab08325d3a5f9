//! The sending half: messages the engine registered with
//! [`Connection::send`], their packets in flight and pacing. What the
//! peer's ACKs and NAKs do to them is in [`super::feedback`].
//!
//! Packets are counted by a 64-bit index from the ISN that never wraps;
//! [`Connection::seq_of`] maps an index to its 31-bit wire number. Messages
//! are counted the same way: `msgs[0]` is message `msg_base`.

use std::collections::VecDeque;

use super::min_rtt::MinRtt;
use super::{Connection, DropReason, Event, Header, Mode, PayloadRef, SendError, State, Transmit};
use crate::estimate::{Rtt, Time};
use crate::loss::SndLossList;
use crate::seq::{AckNo, MsgNo};
use crate::wire::{ControlRepr, DataHeader, Position, HEADER_LEN};

/// A registered message, from [`Connection::send`] until it is acknowledged
/// or dropped.
#[derive(Debug, Clone)]
pub(super) struct TxMsg {
    /// The engine's id for it.
    pub(super) id: u64,
    pub(super) msg_no: MsgNo,
    pub(super) len: u32,
    /// Packets it takes.
    pub(super) npkts: u32,
    /// Index of its first packet (valid once `assigned > 0`).
    pub(super) first_idx: u64,
    /// Packets given an index so far.
    pub(super) assigned: u32,
    /// When its TTL ends, if it has one.
    pub(super) deadline: Option<Time>,
    pub(super) dropped: bool,
}

/// A packet sent and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub(super) struct TxPkt {
    /// Absolute number of its message.
    pub(super) msg: u64,
    /// Byte offset into the message.
    pub(super) off: u32,
    pub(super) len: u32,
    pub(super) pos: Position,
    /// When it last left.
    pub(super) sent_at: Time,
    /// Whether it has been retransmitted.
    pub(super) retx: bool,
}

/// The sender's state.
#[derive(Debug)]
pub(super) struct Sender {
    /// Registered messages not yet retired; `msgs[0]` is message
    /// `msg_base`. A message leaves the front once the cursor has passed it
    /// and all its packets are acknowledged.
    pub(super) msgs: VecDeque<TxMsg>,
    pub(super) msg_base: u64,
    /// The message new packets are cut from.
    pub(super) cursor: u64,
    /// The packets `una .. next`.
    pub(super) pkts: VecDeque<TxPkt>,
    /// First packet not acknowledged.
    pub(super) una: u64,
    /// The acknowledgement point of the last full ACK (UDT4
    /// `m_iSndLastDataAck`): light ACKs move `una` but not this.
    pub(super) data_ack: u64,
    /// Index the next new packet gets.
    pub(super) next: u64,
    /// Sequence numbers to retransmit; all within `una .. next`.
    pub(super) lost: SndLossList,
    pub(super) next_msg_no: MsgNo,
    /// The peer's advertised free receive buffer, less what light ACKs
    /// acknowledged since, packets.
    pub(super) flow_window: u32,
    /// When the next data packet may leave (fractional µs).
    pub(super) next_send: f64,
    /// Pacing intervals the probe pair's lead and probe skipped (they leave
    /// back to back with the pair's second packet), added after the pair.
    pub(super) pacing_debt: f64,
    pub(super) last_ack2_no: AckNo,
    pub(super) last_ack2_time: Time,
    /// RTT: the handshake's round trip, then what the receiver reports in
    /// full ACKs.
    pub(super) rtt: Rtt,
    /// Least RTT seen from our own packets' ACKs.
    pub(super) own_min_rtt: u32,
    /// The path's minimum RTT for the controller: the least of our own
    /// samples and the receiver's reports, following a path that gets
    /// longer (see `min_rtt`).
    pub(super) min_rtt: MinRtt,
    /// Receiver's arrival rate, EWMA of its reports (packets/s).
    pub(super) recv_rate: u32,
    /// Link capacity, EWMA of the receiver's reports (packets/s).
    pub(super) bandwidth: u32,
    /// A retransmission to be sent once more right after it (see
    /// `repeat`).
    pub(super) again: Option<u64>,
}

impl Sender {
    pub(super) fn new(now: Time) -> Sender {
        Sender {
            msgs: VecDeque::new(),
            msg_base: 0,
            cursor: 0,
            pkts: VecDeque::new(),
            una: 0,
            data_ack: 0,
            next: 0,
            lost: SndLossList::new(),
            next_msg_no: MsgNo::new(1),
            flow_window: 16,
            next_send: 0.0,
            pacing_debt: 0.0,
            last_ack2_no: AckNo::new(0),
            last_ack2_time: now,
            rtt: Rtt::new(),
            own_min_rtt: u32::MAX,
            min_rtt: MinRtt::new(),
            recv_rate: 16,
            bandwidth: 1,
            again: None,
        }
    }

    /// Index of the message the cursor is on, into `msgs`.
    fn cursor_pos(&self) -> usize {
        (self.cursor - self.msg_base) as usize
    }

    /// Whether a registered message still has packets to cut.
    pub(super) fn has_unsent(&self) -> bool {
        (self.cursor - self.msg_base) < self.msgs.len() as u64
    }
}

/// A data packet leaving: its transmit, raw sequence number, and whether it
/// is a retransmission.
type DataOut = (Transmit, u32, bool);

impl Connection {
    /// Registers a message of `len` bytes that the engine keeps at id `msg`
    /// until [`Event::MessageAcked`] or [`Event::MessageDropped`] names it.
    /// `ttl_us`: drop it if it has not left completely this long after now
    /// (the peer is then told with a message drop request). Once every
    /// packet of a message has been sent, it is delivered or the connection
    /// closes: a TTL drop never races a delivery, so the engine's completion
    /// is always right. (UDT4 may also drop on a later retransmission, and
    /// then can report a delivered message as dropped.) In stream mode
    /// `ttl_us` is ignored: dropping part of a stream would corrupt it.
    /// In stream mode each call is the next chunk of the stream.
    pub fn send(
        &mut self,
        now: Time,
        msg: u64,
        len: u64,
        ttl_us: Option<u64>,
    ) -> Result<(), SendError> {
        if self.state == State::Closed {
            return Err(SendError::Closed);
        }
        if len == 0 {
            return Err(SendError::Empty);
        }
        let max = match self.cfg.mode {
            Mode::Message => u64::from(self.cfg.max_message_bytes),
            Mode::Stream => u64::from(i32::MAX as u32),
        };
        if len > max {
            return Err(SendError::TooLong);
        }
        let len = len as u32;
        let npkts = len.div_ceil(self.payload_size);
        // The connection may leave its idle state here: first replay the ACK
        // timer's fires skipped while it was idle (see `timers`).
        self.catch_up_ack_timer(now);
        let msg_no = self.tx.next_msg_no;
        self.tx.next_msg_no = if msg_no.get() == MsgNo::MAX {
            MsgNo::new(1)
        } else {
            msg_no.next()
        };
        self.tx.msgs.push_back(TxMsg {
            id: msg,
            msg_no,
            len,
            npkts,
            first_idx: 0,
            assigned: 0,
            deadline: match self.cfg.mode {
                Mode::Message => ttl_us.map(|t| now.saturating_add(t)),
                Mode::Stream => None,
            },
            dropped: false,
        });
        Ok(())
    }

    /// `poll_transmit`, releasing data scheduled up to `early` µs ahead.
    pub(super) fn transmit(&mut self, now: Time, early: u64) -> Option<Transmit> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some(Transmit {
                header: h,
                payload: None,
            });
        }
        if self.state != State::Connected || ((now + early) as f64) < self.tx.next_send {
            return None;
        }
        let (t, seq, retx) = self.next_data(now)?;
        // Pacing. The probe pair (seq ≡ 0 and 1 mod 16) and the packet
        // before it (≡ 15, the lead: see the module docs) leave back to
        // back, so the pair crosses the bottleneck behind the lead; the
        // intervals skipped are added after the pair, so the average rate is
        // the CC's.
        let period = self.period();
        let probe = (seq & 0xF == 0 || seq & 0xF == 0xF) && !retx;
        let floor = now as f64 - period;
        if self.tx.next_send < floor {
            self.tx.next_send = floor;
        }
        if probe {
            self.tx.pacing_debt += period;
        } else {
            self.tx.next_send += period + self.tx.pacing_debt;
            self.tx.pacing_debt = 0.0;
        }
        Some(t)
    }

    /// Whether `poll_transmit_batch` holds data back so that it leaves as a
    /// whole batch of `max`: where a whole batch is scheduled within the
    /// horizon `early` (a high rate), data leaves only once the last packet
    /// of a batch is within it. Released as soon as the first one is, a
    /// caller polling every few microseconds would get a batch of the few
    /// packets due since its last poll, and pay a send for each. No packet
    /// leaves earlier than the horizon allows, none later than its own
    /// pacing time. Control packets and retransmissions are never held.
    pub(super) fn batch_held_back(&self, now: Time, early: u64, max: usize) -> bool {
        if self.ctrl.is_empty()
            && self.state == State::Connected
            && self.tx.lost.is_empty()
            && self.tx.again.is_none()
        {
            let need = max.saturating_sub(1) as f64 * self.period();
            if need <= early as f64 && ((now + early) as f64) < self.tx.next_send + need {
                return true;
            }
        }
        false
    }

    /// Whether the next data packet (a retransmission first) carries `len`
    /// payload bytes.
    pub(super) fn next_data_len_is(&self, len: u32) -> bool {
        if let Some(idx) = self
            .tx
            .lost
            .first()
            .and_then(|s| self.idx_of(self.tx.una, s))
        {
            if let Some(p) = idx
                .checked_sub(self.tx.una)
                .and_then(|i| self.tx.pkts.get(i as usize))
            {
                return p.len == len;
            }
        }
        let Some(m) = self.tx.msgs.get(self.tx.cursor_pos()) else {
            return false;
        };
        let off = m.assigned * self.payload_size;
        m.len.saturating_sub(off).min(self.payload_size) == len
    }

    /// Packets allowed in flight: the congestion window within the flow
    /// window, at least 2 each.
    fn window(&self) -> u64 {
        let cwnd = self.cc.window().max(2.0) as u64;
        cwnd.min(u64::from(self.flow_window()))
    }

    /// Whether a data packet is waiting for its pacing time.
    pub(super) fn has_data(&self) -> bool {
        if !self.tx.lost.is_empty() || self.tx.again.is_some() {
            return true;
        }
        self.tx.has_unsent() && self.tx.next - self.tx.una < self.window()
    }

    /// The next data packet: a retransmission first, then new data.
    fn next_data(&mut self, now: Time) -> Option<DataOut> {
        if let Some(out) = self.repeat(now) {
            return Some(out);
        }
        if let Some(out) = self.next_retransmission(now) {
            return Some(out);
        }
        self.next_new_data(now)
    }

    /// Takes the lowest number off the loss list that still names a packet
    /// in flight of a message not dropped.
    fn next_retransmission(&mut self, now: Time) -> Option<DataOut> {
        while let Some(seq) = self.tx.lost.pop_first() {
            let Some(idx) = self.idx_of(self.tx.una, seq) else {
                continue;
            };
            if idx < self.tx.una || idx >= self.tx.next {
                continue;
            }
            let pi = (idx - self.tx.una) as usize;
            let pkt = self.tx.pkts[pi];
            let mi = (pkt.msg - self.tx.msg_base) as usize;
            let m = &self.tx.msgs[mi];
            if m.dropped {
                self.queue_drop_req(mi);
                continue;
            }
            // No new data waits, the window has room (a full one is a stall
            // behind holes, not a tail), and the repairs that do wait drain
            // within a quarter of a round trip: the copy delays each by one
            // interval.
            let idle = self.cfg.tail_copies
                && !self.tx.has_unsent()
                && self.tx.next - self.tx.una < self.window()
                && self.tx.lost.len() as f64 * self.period() < f64::from(self.rtt()) / 4.0;
            let p = &mut self.tx.pkts[pi];
            p.sent_at = now;
            p.retx = true;
            if pkt.retx || idle {
                self.tx.again = Some(idx);
            }
            let msg_no = self.tx.msgs[mi].msg_no;
            let id = self.tx.msgs[mi].id;
            self.stats.pkts_retransmitted += 1;
            return Some(self.data_out(now, idx, pkt, msg_no, id, true));
        }
        None
    }

    /// The second copy of a retransmission, right after it: of a packet whose
    /// retransmission was lost, and of any retransmission that leaves in a
    /// transfer's tail ([`super::Config::tail_copies`]): no new data waiting,
    /// room in the window, and the other repairs waiting take under a
    /// quarter of a round trip to leave. A retransmission lost again holds
    /// the receiver's window one more round trip behind the hole (more: the
    /// receiver reports it again only once it is overdue); on a lossy long
    /// path the oldest such holes fill the window and stall the sender, and
    /// at a transfer's end the last holes' repairs are what its last
    /// message waits for. Sent twice, a retransmission is lost again with
    /// the loss rate squared. The first rule costs about `loss²` more
    /// packets on the wire; the second, one more packet per loss in the
    /// tail, where the link has room. Each copy delays the repairs behind it
    /// by a pacing interval: microseconds at speed; where a timeout resends
    /// a whole flight at a collapsed pace, only the last few repairs (those
    /// within a quarter of a round trip of the list's end) get copies.
    fn repeat(&mut self, now: Time) -> Option<DataOut> {
        let idx = self.tx.again.take()?;
        if idx < self.tx.una || idx >= self.tx.next {
            return None;
        }
        let pkt = self.tx.pkts[(idx - self.tx.una) as usize];
        let m = &self.tx.msgs[(pkt.msg - self.tx.msg_base) as usize];
        if m.dropped {
            return None;
        }
        let (msg_no, id) = (m.msg_no, m.id);
        self.stats.pkts_retransmitted += 1;
        self.stats.pkts_repeated += 1;
        Some(self.data_out(now, idx, pkt, msg_no, id, true))
    }

    /// Cuts the next packet of the message at the cursor, within the windows.
    fn next_new_data(&mut self, now: Time) -> Option<DataOut> {
        if self.tx.next - self.tx.una >= self.window() {
            return None;
        }
        let mi = self.skip_to_sendable(now)?;
        let idx = self.tx.next;
        let payload_size = self.payload_size;
        let m = &mut self.tx.msgs[mi];
        if m.assigned == 0 {
            m.first_idx = idx;
        }
        let off = m.assigned * payload_size;
        let len = (m.len - off).min(payload_size);
        let pos = Position::of(m.assigned as usize, m.npkts as usize);
        m.assigned += 1;
        let (msg_no, id) = (m.msg_no, m.id);
        if m.assigned == m.npkts {
            self.tx.cursor += 1;
        }
        let pkt = TxPkt {
            msg: self.tx.msg_base + mi as u64,
            off,
            len,
            pos,
            sent_at: now,
            retx: false,
        };
        if self.tx.next == self.tx.una {
            // The first packet in flight starts the retransmission timer (RFC
            // 6298, 5.1): EXP counted from the last answer or keep-alive would
            // fire before an idle connection's first packet could be answered.
            self.exp_count = 1;
            self.last_rsp = now;
        }
        self.tx.pkts.push_back(pkt);
        self.tx.next += 1;
        self.stats.pkts_sent += 1;
        Some(self.data_out(now, idx, pkt, msg_no, id, false))
    }

    /// Moves the cursor past dropped messages, dropping those whose TTL has
    /// ended; the position in `msgs` of the message it stops on, if any.
    fn skip_to_sendable(&mut self, now: Time) -> Option<usize> {
        loop {
            let mi = self.tx.cursor_pos();
            let m = self.tx.msgs.get(mi)?;
            if m.dropped {
                self.tx.cursor += 1;
                continue;
            }
            if m.deadline.is_some_and(|d| now >= d) {
                self.drop_msg(mi, DropReason::Ttl);
                continue;
            }
            return Some(mi);
        }
    }

    /// Builds the transmit of packet `idx` and tells the controller it left.
    pub(super) fn data_out(
        &mut self,
        now: Time,
        idx: u64,
        pkt: TxPkt,
        msg_no: MsgNo,
        id: u64,
        retx: bool,
    ) -> DataOut {
        let t = self.data_transmit(now, idx, pkt, msg_no, id);
        let path = self.path();
        let seq = self.seq_of(idx).get();
        self.cc.on_pkt_sent(now, &path, seq, retx);
        (t, seq, retx)
    }

    fn data_transmit(&self, now: Time, idx: u64, pkt: TxPkt, msg_no: MsgNo, id: u64) -> Transmit {
        let dh = DataHeader {
            seq_no: self.seq_of(idx),
            position: pkt.pos,
            in_order: self.cfg.mode == Mode::Message,
            msg_no,
            timestamp: self.timestamp(now),
            dst_socket_id: self.peer_id,
        };
        let mut header = Header::new();
        header.buf_mut()[..HEADER_LEN].copy_from_slice(&dh.to_bytes());
        header.set_len(HEADER_LEN);
        Transmit {
            header,
            payload: Some(PayloadRef {
                msg: id,
                offset: pkt.off,
                len: pkt.len,
            }),
        }
    }

    /// Drops message `mi` (index into `msgs`): tells the engine and the peer.
    fn drop_msg(&mut self, mi: usize, reason: DropReason) {
        let m = &mut self.tx.msgs[mi];
        if m.dropped {
            return;
        }
        m.dropped = true;
        let (id, first, assigned, npkts) = (m.id, m.first_idx, m.assigned, m.npkts);
        self.events
            .push_back(Event::MessageDropped { msg: id, reason });
        if assigned > 0 {
            let last = first + u64::from(assigned) - 1;
            if last >= self.tx.una {
                let first = first.max(self.tx.una);
                let (a, b) = (self.seq_of(first), self.seq_of(last));
                self.tx.lost.remove_range(a, b);
            }
            if reason == DropReason::Ttl {
                self.queue_drop_req(mi);
            }
        }
        if self.tx.msg_base + mi as u64 == self.tx.cursor && assigned < npkts {
            self.tx.cursor += 1;
        }
    }

    fn queue_drop_req(&mut self, mi: usize) {
        let m = &self.tx.msgs[mi];
        if m.assigned == 0 {
            return;
        }
        let first = self.seq_of(m.first_idx);
        let last = self.seq_of(m.first_idx + u64::from(m.assigned) - 1);
        let repr = ControlRepr::MsgDropReq {
            msg_no: m.msg_no,
            first,
            last,
        };
        self.stats.drop_reqs_sent += 1;
        self.queue_ctrl(&repr, self.peer_id, 0);
    }

    /// On close: fails every message not yet acknowledged and forgets what
    /// is in flight.
    pub(super) fn drop_all_msgs(&mut self) {
        for m in std::mem::take(&mut self.tx.msgs) {
            if !m.dropped {
                self.events.push_back(Event::MessageDropped {
                    msg: m.id,
                    reason: DropReason::Closed,
                });
            }
        }
        self.tx.pkts.clear();
        self.tx.lost.clear();
    }
}
