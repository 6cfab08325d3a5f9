//! The timers of an established connection: the ACK timer (a full ACK every
//! SYN, light ACKs between), the periodic NAK, and EXP — retransmission on
//! silence, keep-alive and the idle close. (The handshake's retry timer is
//! in [`super::handshake`].)

use super::{CloseReason, Connection, State, KEEPALIVE_GRID_US, MAX_RTT_US, SYN_US};
use crate::estimate::Time;
use crate::wire::ControlRepr;

/// A light ACK every this many data packets (UDT4's rule)...
const LIGHT_ACK_PKTS: u32 = 64;
/// ...but not more often than this, microseconds. Below ~0.64 M packets/s
/// (64 packets take 0.7 ms at 1 Gbit/s) UDT4's rule stands. Above it — on
/// loopback and fast LANs — a light ACK every 64 packets would be tens of
/// thousands of sends a second on the receiver and as many receives on the
/// sender, for a window that a light ACK every 100 µs already keeps moving
/// (every 300 packets at 3 M packets/s).
const LIGHT_ACK_MIN_GAP_US: u64 = 100;
/// How long after its last full ACK an idle connection's ACK timer stops,
/// microseconds.
const ACK_IDLE_US: u64 = 1_000_000;
/// Least EXP interval while no RTT has been measured (RFC 6298's initial RTO).
const INITIAL_EXP_US: u64 = 1_000_000;

impl Connection {
    /// Any packet from the peer: it is alive (the idle timeout restarts).
    /// The EXP timer restarts too only if nothing of ours is unacknowledged
    /// (draft-gg-udt, data receiving step 3): data or stale ACKs from a busy
    /// peer say nothing about whether our packets arrived.
    pub(super) fn heard(&mut self, now: Time) {
        self.last_heard = now;
        if self.tx.next == self.tx.una {
            self.exp_count = 1;
            self.last_rsp = now;
        }
    }

    /// The peer reported on our packets (an ACK that advances, a NAK):
    /// restart the EXP timer and its backoff.
    pub(super) fn progress(&mut self, now: Time) {
        self.exp_count = 1;
        self.last_rsp = now;
    }

    /// When the established connection's next timer is due (or its next
    /// data packet, for pacing).
    pub(super) fn connected_deadline(&self) -> Time {
        // An idle connection (see `ack_idle`) stops its ACK timer a second after
        // its last full ACK (or its start): an idle peer wakes for nothing but its keep-alive
        // (EXP). The fires it skips would have found nothing to acknowledge;
        // `catch_up_ack_timer` replays them when work comes. Within the second
        // (a pause in a transfer) the timer runs on.
        let acked = self.ack_idle()
            && self.rx.next_ack_time > self.rx.last_ack_time.max(self.start) + ACK_IDLE_US;
        let mut t = if acked {
            Time::MAX
        } else {
            self.rx.next_ack_time
        };
        if !self.rx.lost.is_empty() {
            t = t.min(self.rx.next_nak_time);
        }
        t = t.min(self.next_exp());
        if let Some(probe) = self.tail_probe_deadline() {
            t = t.min(probe);
        }
        if let Some(probe) = self.outage_deadline() {
            t = t.min(probe);
        } else if self.has_data() {
            t = t.min(self.tx.next_send.ceil() as Time);
        }
        t
    }

    /// Runs the established connection's timers due at `now`.
    pub(super) fn connected_timers(&mut self, now: Time) {
        self.ack_timers(now);
        if !self.rx.lost.is_empty() && now >= self.rx.next_nak_time {
            self.periodic_nak(now);
        }
        if self.tail_probe_deadline().is_some_and(|t| now >= t) {
            self.tail_probe();
        }
        if now >= self.next_exp() {
            self.on_exp(now);
        }
    }

    /// The round trip the sender's timers wait on: at least what our own
    /// ACKed packets took. Until the peer's ACK2 samples arrive (the server,
    /// and a client whose handshake was retried, start from UDT4's 100 ms
    /// guess), a timer must not fire while the first window is still on its
    /// way back.
    fn timer_rtt(&self) -> u64 {
        let rtt = u64::from(self.rtt());
        if self.tx.own_min_rtt == u32::MAX {
            rtt
        } else {
            rtt.max(u64::from(self.tx.own_min_rtt))
        }
    }

    fn next_exp(&self) -> Time {
        let rtt = self.timer_rtt();
        // Before its backoff multiple, the interval is at most MAX_RTT_US and
        // half the idle timeout: a smoothed RTT and variance that forged
        // reports pushed up must not hold a retransmission back for longer,
        // nor long enough that the peer, hearing nothing, closes.
        let max_rto = u64::from(MAX_RTT_US).min(self.cfg.idle_timeout_us / 2);
        let rto = (rtt + 4 * u64::from(self.rtt_var()) + SYN_US).min(max_rto);
        let base = u64::from(self.exp_count) * rto;
        let mut min = self.cfg.min_exp_interval_us;
        if self.tx.next > self.tx.una
            && self.tx.own_min_rtt == u32::MAX
            && self.tx.rtt.samples() == 0
            && self.rx.rtt.samples() == 0
        {
            // Data in flight and no RTT measured at all yet: resend after
            // 1 s, as TCP's initial RTO (RFC 6298), not after UDT4's 100 ms
            // guess (keep-alives keep the short interval).
            min = min.max(INITIAL_EXP_US);
        }
        let exp = base.max(u64::from(self.exp_count) * min);
        if self.tx.next == self.tx.una && !self.tx.has_unsent() {
            // Nothing of ours to resend: this fire is a keep-alive.
            let at = self.last_rsp + exp.max(self.cfg.keepalive_us);
            return at.div_ceil(KEEPALIVE_GRID_US) * KEEPALIVE_GRID_US;
        }
        self.last_rsp + exp
    }

    /// When the last packet sent is overdue: it is the only one not
    /// acknowledged, nothing is unsent or awaiting retransmission behind
    /// it, and it left two round trips and two SYNs (the receiver's ACK
    /// timer) ago. A lost packet is reported by the receiver when a later
    /// one arrives; the last of a burst has no later one, and without a
    /// probe it would wait for the EXP timer (an RTO after the last ACK's
    /// progress) and then the outage's probes. A probe costs a packet per
    /// lost tail (two, with the tail's copies or where the tail was resent
    /// before: see `repeat`), and
    /// one more every two round trips while it stays unanswered. Where an
    /// earlier packet is missing and the receiver holds later ones, it knows
    /// of that hole and reports it again (its periodic NAK); a probe would
    /// only race that report. A tail of two or more lost packets is left to
    /// EXP. Only with a measured round trip (an unmeasured path's 100 ms
    /// guess would probe a long path's first window), and never while the
    /// path is held dead (the outage probes then).
    pub(super) fn tail_probe_deadline(&self) -> Option<Time> {
        if self.outage.is_some()
            || self.tx.next != self.tx.una + 1
            || self.tx.has_unsent()
            || !self.tx.lost.is_empty()
            || self.tx.again.is_some()
            || (self.tx.rtt.samples() == 0 && self.tx.own_min_rtt == u32::MAX)
        {
            return None;
        }
        let newest = self.tx.pkts.back()?;
        // A dropped message's packets are not resent (the sender asks the
        // receiver to skip them): a probe of one would leave nothing and
        // come due again at once.
        if self
            .tx
            .msgs
            .get((newest.msg - self.tx.msg_base) as usize)
            .is_none_or(|m| m.dropped)
        {
            return None;
        }
        Some(newest.sent_at + 2 * self.timer_rtt() + 2 * SYN_US)
    }

    /// Puts the newest packet in flight on the loss list (see
    /// `tail_probe_deadline`); it leaves as the next retransmission.
    fn tail_probe(&mut self) {
        let seq = self.seq_of(self.tx.next - 1);
        if self.tx.lost.insert(seq, seq).is_ok() {
            self.stats.tail_probes += 1;
        }
    }

    /// EXP fired: close if the peer has been silent too long, else hold the
    /// path dead while data is in flight (or send a keep-alive), and back off.
    fn on_exp(&mut self, now: Time) {
        if self.exp_count > 16 && now.saturating_sub(self.last_heard) > self.cfg.idle_timeout_us {
            self.shut(CloseReason::Timeout);
            return;
        }
        self.stats.timeouts += 1;
        let unacked = self.tx.next > self.tx.una;
        if unacked {
            // Not resending the flight into what is likely a dead path:
            // probes find out when it carries packets again.
            self.enter_outage(now);
        } else if self.tx.has_unsent() {
            let path = self.path();
            self.cc.on_timeout(now, &path);
        } else {
            self.queue_ctrl(&ControlRepr::KeepAlive, self.peer_id, now);
        }
        self.exp_count += 1;
        self.last_rsp = now;
    }

    /// The connection is idle: everything received is acknowledged and the
    /// peer confirmed it (ACK2), and nothing is unsent or unacknowledged on our
    /// side. The ACK timer has nothing to do. (A sender keeps it: its fires are
    /// also the polls its pacing is released on.)
    fn ack_idle(&self) -> bool {
        self.rx.lost.is_empty()
            && self.rx.next == self.rx.last_ack_ack
            && self.tx.next == self.tx.una
            && !self.tx.has_unsent()
    }

    /// Replays the ACK timer's fires skipped while the connection was idle
    /// (see `connected_deadline`), before anything changes that: each would
    /// have found nothing to acknowledge and only moved the timer on by a SYN
    /// and restarted the light-ACK count. The timer so keeps its SYN grid, and
    /// a packet after a quiet is acknowledged when it would have been had the
    /// timer woken the connection all along.
    pub(super) fn catch_up_ack_timer(&mut self, now: Time) {
        if self.state != State::Connected || !self.ack_idle() || now <= self.rx.next_ack_time {
            return;
        }
        let fires = (now - self.rx.next_ack_time).div_ceil(SYN_US);
        self.rx.next_ack_time += fires * SYN_US;
        self.rx.pkt_count = 0;
        self.rx.light_count = 1;
    }

    /// The ACK timer: a full ACK every SYN, a light ACK every
    /// [`LIGHT_ACK_PKTS`] packets between (at most one per
    /// [`LIGHT_ACK_MIN_GAP_US`]).
    pub(super) fn ack_timers(&mut self, now: Time) {
        if self.state != State::Connected {
            return;
        }
        self.catch_up_ack_timer(now);
        if now >= self.rx.next_ack_time {
            self.send_ack(now, false);
            self.rx.next_ack_time = now + SYN_US;
            self.rx.pkt_count = 0;
            self.rx.light_count = 1;
        } else if self.rx.pkt_count >= LIGHT_ACK_PKTS * self.rx.light_count
            && now >= self.rx.last_light_ack + LIGHT_ACK_MIN_GAP_US
        {
            self.send_ack(now, true);
            self.rx.last_light_ack = now;
            // The next one at the next multiple of 64 packets beyond the
            // count, not at the step after the one that came due: a
            // rate-limited light ACK leaves no debt behind it.
            self.rx.light_count = self.rx.pkt_count / LIGHT_ACK_PKTS + 1;
        }
    }

    fn nak_interval(&self) -> u64 {
        // UDT4's RTT + 4·RTTVar, with the variance term kept within
        // [10 ms, RTT/2] (10 ms where RTT/2 is less): an early, wide
        // variance must not hold a hole for seconds, and a retransmission
        // needs some slack to arrive.
        let r = u64::from(self.rx.rtt.rtt());
        let rtt = r + (4 * u64::from(self.rx.rtt.var())).min(r / 2).max(10_000);
        rtt.max(self.cfg.min_nak_interval_us)
    }

    /// Re-reports every loss whose retransmission should have arrived by now:
    /// last reported one NAK interval ago, plus the time the sender takes to
    /// resend the losses below it at the rate packets arrive (see
    /// `RcvLossList::take_due`). At most 64 ranges per tick; the check runs
    /// every `min_nak_interval_us`.
    fn periodic_nak(&mut self, now: Time) {
        let interval = self.nak_interval();
        if let Some(due) = now.checked_sub(interval) {
            let per_pkt_ns = 1_000_000_000u64
                .checked_div(u64::from(self.rx.arrival.rate()))
                .unwrap_or(0);
            let mut ranges = Vec::new();
            self.rx.lost.take_due(due, per_pkt_ns, now, 64, &mut ranges);
            if !ranges.is_empty() {
                self.queue_nak(&ranges, now);
            }
        }
        self.rx.next_nak_time = now + self.cfg.min_nak_interval_us;
    }
}
