//! A model-based controller for satellite paths.
//!
//! UDT's native algorithm reads every loss report as congestion. On a
//! satellite path most loss is physical (random, independent of load), and a
//! 600 ms round trip makes every unwarranted decrease expensive: the native
//! increase needs many seconds to win back a 1/9 cut. This controller instead
//! keeps a model of the path and paces at it:
//!
//! - **Bottleneck bandwidth.** The packet-pair capacity reported by the
//!   receiver, and a windowed maximum (the last 10 rounds, each a minimum RTT
//!   of at least 10 ms, that had any) over its arrival-rate reports. The
//!   receiver counts what reached it ([`crate::estimate::ArrivalRate`]); the
//!   path carried the packets lost at random too, so a report is scaled up
//!   by the random loss rate: the loss of rounds without a standing queue
//!   (at a queue that overflows, the drops are the bottleneck's, and what
//!   arrives is all it carries). A report is also never taken above what
//!   the sender paced in the last two rounds: a burst (a router or an
//!   emulator catching up after a stall) can read as several times the
//!   link over a short span, and a ceiling lifted by one would flood the
//!   queue. A report below the
//!   pacing rate with no queue to explain it only shows that the sender was
//!   held back (window, a hole, no data) and is ignored. The larger of the
//!   two is the ceiling of the pacing rate (the arrival rate can show more
//!   than the pair estimate when other traffic leaves, the pair estimate more
//!   than the arrivals while this flow is still below it) — except while a
//!   queue stands (queueing delay above 5 % of the minimum RTT): then the
//!   flow is at the bottleneck, the arrivals measure it, and a higher pair
//!   estimate (pairs squeezed together after the bottleneck, by a router or a
//!   host catching up) is not believed. Without a queue the pair estimate may
//!   lift the ceiling at most 25 % above the arrivals: a real gain is
//!   reached in a few rounds as the arrivals follow, a false one cannot
//!   flood the bottleneck buffer.
//! - **Minimum RTT** from the connection's RTT estimator; the queueing delay
//!   is the smoothed RTT above it, as a fraction of the minimum RTT taken as
//!   at least 5 ms: on a shorter path, delays of a few hundred microseconds
//!   are the hosts' scheduling, not a queue.
//! - **Pacing rate** `R = ceiling × (1 − (q − 2 %)) × penalty`, where `q` is
//!   the queueing delay as a fraction of the minimum RTT; the middle factor
//!   is kept within [0.8, 1]. Below 2 % queueing the flow paces at the model;
//!   above, it backs off in proportion, so the bottleneck settles with a
//!   queue of a few percent of the BDP — always busy, never overflowing —
//!   and random loss does not move `R` at all.
//! - **Window** `6 × R × min_rtt + 32` packets. Pacing, not the window, sets
//!   the rate; the window only bounds what is in flight counted from the
//!   oldest hole, and at 5 % loss a hole whose retransmissions are lost twice
//!   holds the ACK point for three to four round trips.
//! - **Floor.** The flow never paces slower than 32 packets per minimum RTT
//!   (at least 1 ms): on a short path the queueing signal is mostly host
//!   scheduling noise, and a CPU-starved receiver's arrival reports could
//!   otherwise walk the model down to a trickle. Below the floor the window
//!   governs, as in TCP; on a 600 ms path the floor is 0.6 Mbit/s.
//!
//! **Fast start.** The first packets go out back to back; their packet
//! pairs give the receiver a capacity estimate within the first round trip,
//! and the first full ACK that carries it makes the sender pace at that
//! capacity at once (no doubling from 16 packets: at 600 ms a doubling start
//! needs ~9 RTT to fill 100 Mbit/s). Without a capacity report the controller
//! falls back to a doubling start, leaving it for the arrival-rate estimate
//! when that stops growing by 25 % per round. A capacity report that comes
//! only after the doubling start has paced for a while (a first message of
//! one packet carries no pair) still starts at the capacity: the arrival
//! rates measured until then are the start's own pace and are forgotten,
//! unless a queue stands. A pair capacity can read high (pairs squeezed
//! after the bottleneck), and the delay of the queue an overshooting start
//! builds reaches the sender half a round trip after its arrivals do (the
//! ACK2 that measures it crosses the queue); so the first arrival report made
//! a round trip after the fast start checks it: if the sender kept its pace
//! and under 90 % of it arrived, that report is believed at once.
//!
//! **Loss as congestion only with evidence.** A loss report cuts `R` by 15 %
//! (a penalty that wears off by 10 % a round; at most one cut per RTT) only
//! if the smoothed RTT stands above `1.25 × min_rtt + 5 ms` (a queue is
//! overflowing), or if the loss rate of a round is far above the long-run
//! average (≥ 20 % and ≥ 3× the mean plus 5 %: a clustered, load-driven
//! burst). A timeout (EXP) leaves the model alone: on satellite links a
//! silence is usually an outage, not a queue — and for two round trips after
//! one, loss reports (the outage's packets, reported once the path is back)
//! cut nothing either.

use super::{Ack, Controller, Path};
use crate::estimate::{Time, ARRIVAL_MIN_PACKETS, ARRIVAL_SPAN_US};

const FILTER_ROUNDS: usize = 10;
const INITIAL_WINDOW: f64 = 64.0;
/// Packets the window holds above the model, and the least the flow paces per
/// minimum RTT (floored at 1 ms).
const MIN_WINDOW: f64 = 32.0;
/// Window in bandwidth-delay products (a sender's TX memory is sized to hold
/// it: `lu2k_ring_abi::tx_pool`).
pub const WINDOW_BDPS: f64 = 6.0;
/// Queueing delay (fraction of the minimum RTT) the rate is steered to.
const Q_TARGET: f64 = 0.02;
/// Largest back-off from the ceiling due to queueing delay.
const MAX_BACKOFF: f64 = 0.2;
/// Queueing delay above which an arrival-rate sample below the pacing rate
/// is believed (the path, not the sender, limited it).
const Q_HIGH: f64 = 0.05;
/// The least minimum RTT (µs) the queueing delay is measured against. Below a
/// few milliseconds the RTT's excess over its minimum is mostly the hosts' own
/// scheduling (a preempted receiver, an ACK behind a batch), not a router's
/// queue; the loss rule allows the same 5 ms. Measured against a loopback
/// path's ~1 ms, that scheduling would read as a standing queue and hold the
/// flow below what the receiver takes.
const QUEUE_REF_MIN_RTT: u32 = 5_000;
/// How far above the delivered rate the pair estimate may take the ceiling.
const PROBE_GAIN: f64 = 1.25;
/// The loss-with-evidence cut.
const CUT: f64 = 0.85;
/// Per-round recovery of a cut (the queue feedback still holds the rate).
const PENALTY_RECOVERY: f64 = 1.1;
/// The receiver's full-ACK interval (UDT's SYN), which carries its arrival
/// reports.
const ACK_INTERVAL_US: u64 = 10_000;
/// The most random loss an arrival report is scaled up by.
const MAX_RANDOM_LOSS: f64 = 0.5;
/// Packets counted as sent without loss before the first round: the first
/// rounds' few packets (an initial window) do not make a loss rate, and a
/// rate read too high would lift the arrivals above what the path carries;
/// reading it too low for a round or two only holds the ceiling a little
/// below the path.
const RANDOM_LOSS_PRIOR: f64 = 1000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Startup,
    Cruise,
}

/// The model-based satellite controller.
#[derive(Debug, Clone)]
pub struct Satellite {
    mode: Mode,
    period: f64,
    cwnd: f64,
    /// Packet-pair capacity, packets/s (0 = unknown).
    capacity: f64,
    /// Per-round maxima of arrival-rate samples.
    filter: [f64; FILTER_ROUNDS],
    filter_pos: usize,
    /// Pacing rate, packets/s.
    rate: f64,
    round_start: Time,
    round_count: u64,
    sent_in_round: u64,
    sent_prev_round: u64,
    lost_in_round: u64,
    ewma_lost: f64,
    ewma_sent: f64,
    loss_rate: f64,
    last_cut: Option<Time>,
    /// The last EXP timeout: a silence, usually an outage.
    last_timeout: Option<Time>,
    plateau_bw: f64,
    plateau_rounds: u32,
    queue: f64,
    penalty: f64,
    /// Packets lost and sent in rounds without a standing queue, each
    /// round's counts added to 7/8 of what came before.
    random_counts: (f64, f64),
    /// Highest pace (packets/s) of this round and of the one before.
    pace_max: [f64; 2],
    /// Packets sent (retransmissions included).
    sent_total: u64,
    /// A fast start not yet checked against the arrivals: (when, packets
    /// sent until then).
    fast_start: Option<(Time, u64)>,
}

impl Default for Satellite {
    fn default() -> Self {
        Self::new()
    }
}

impl Satellite {
    /// A controller in its pre-`init` state.
    pub fn new() -> Self {
        Satellite {
            mode: Mode::Startup,
            period: 1.0,
            cwnd: INITIAL_WINDOW,
            capacity: 0.0,
            filter: [0.0; FILTER_ROUNDS],
            filter_pos: 0,
            rate: 0.0,
            round_start: 0,
            round_count: 0,
            sent_in_round: 0,
            sent_prev_round: 0,
            lost_in_round: 0,
            ewma_lost: 0.0,
            ewma_sent: 0.0,
            loss_rate: 0.0,
            last_cut: None,
            last_timeout: None,
            plateau_bw: 0.0,
            plateau_rounds: 0,
            queue: 0.0,
            penalty: 1.0,
            random_counts: (0.0, RANDOM_LOSS_PRIOR),
            pace_max: [0.0; 2],
            sent_total: 0,
            fast_start: None,
        }
    }

    /// The current pacing rate, packets/s (0 before an estimate).
    pub fn bandwidth(&self) -> f64 {
        self.rate
    }

    /// The long-run loss rate seen (losses reported per packet sent).
    pub fn loss_rate(&self) -> f64 {
        self.loss_rate
    }

    /// The loss rate of rounds without a standing queue.
    fn random_loss(&self) -> f64 {
        let (lost, sent) = self.random_counts;
        (lost / sent).min(MAX_RANDOM_LOSS)
    }

    fn filter_max(&self) -> f64 {
        self.filter.iter().copied().fold(0.0, f64::max)
    }

    /// What the path can carry. A standing queue proves the flow is at the
    /// bottleneck, where the arrival rate *is* the bottleneck rate; a
    /// packet-pair estimate above it is then wrong (pairs squeezed together
    /// after the bottleneck, by a router or a host catching up) and is not
    /// believed until the queue is gone.
    fn ceiling(&self) -> f64 {
        let arrivals = self.filter_max();
        if arrivals <= 0.0 {
            self.capacity
        } else if self.queue > Q_HIGH {
            arrivals
        } else {
            // Above what was delivered, the pair estimate is only a probe:
            // at most 25 % more, so a wrong one cannot flood the queue and a
            // right one is reached in a few rounds as the arrivals follow.
            self.capacity.min(arrivals * PROBE_GAIN).max(arrivals)
        }
    }

    /// The pacing rate: the model's ceiling, scaled down in proportion to
    /// the queueing delay above the target, and by any loss penalty.
    fn steer(&mut self) {
        if self.mode != Mode::Cruise {
            return;
        }
        let scale = (1.0 - (self.queue - Q_TARGET)).clamp(1.0 - MAX_BACKOFF, 1.0);
        self.rate = self.ceiling() * scale * self.penalty;
    }

    fn round_len(path: &Path) -> u64 {
        u64::from(path.min_rtt.max(10_000))
    }

    fn end_round(&mut self, now: Time, path: &Path) {
        // Losses reported in this round belong to packets sent about one
        // round earlier.
        let round_loss = self.lost_in_round as f64 / self.sent_prev_round.max(1) as f64;
        let clustered = self.sent_prev_round >= 200
            && round_loss >= 0.2
            && round_loss >= 3.0 * self.loss_rate + 0.05
            && !self.after_silence(now, path);
        if self.sent_prev_round >= 16
            && self.queue <= Q_HIGH
            && !self.after_silence(now, path)
            && !clustered
        {
            // No queue stands, no outage was just felt and the round's loss is
            // not a load-driven burst: what was lost, was lost at random.
            // Counted in packets, so a round of few weighs little.
            let (lost, sent) = self.random_counts;
            self.random_counts = (
                lost * 7.0 / 8.0 + self.lost_in_round as f64,
                sent * 7.0 / 8.0 + self.sent_prev_round as f64,
            );
        }
        self.pace_max = [1e6 / self.period, self.pace_max[0]];
        if self.sent_prev_round >= 16 {
            self.ewma_lost += (self.lost_in_round as f64 - self.ewma_lost) / 8.0;
            self.ewma_sent += (self.sent_prev_round as f64 - self.ewma_sent) / 8.0;
            if self.ewma_sent > 0.0 {
                self.loss_rate = (self.ewma_lost / self.ewma_sent).min(1.0);
            }
        }
        self.sent_prev_round = self.sent_in_round;
        self.sent_in_round = 0;
        self.lost_in_round = 0;
        self.round_start = now;
        self.round_count += 1;
        // The filter spans the last rounds that measured something: a silent
        // round (an outage, an idle sender) does not age out what the path
        // carried before it, so the flow comes back to the rate it knew.
        if self.filter[self.filter_pos] > 0.0 {
            self.filter_pos = (self.filter_pos + 1) % FILTER_ROUNDS;
            self.filter[self.filter_pos] = 0.0;
        }
        if clustered {
            self.cut(now);
            return;
        }
        match self.mode {
            Mode::Startup => {
                let max = self.filter_max();
                if max >= self.plateau_bw * 1.25 {
                    self.plateau_bw = max;
                    self.plateau_rounds = 0;
                } else {
                    self.plateau_rounds += 1;
                }
                if self.plateau_rounds >= 3 {
                    self.mode = Mode::Cruise;
                    self.rate = max;
                }
            }
            Mode::Cruise => {
                // A cut's penalty wears off by 10 % a round.
                self.penalty = (self.penalty * PENALTY_RECOVERY).min(1.0);
            }
        }
    }

    /// Ends the round when a minimum RTT (at least 10 ms) has passed (called
    /// on every event, so rounds keep time while the ACK point stalls behind
    /// a hole).
    fn tick(&mut self, now: Time, path: &Path) {
        if now.saturating_sub(self.round_start) >= Self::round_len(path) {
            self.end_round(now, path);
            self.update_outputs(path);
        }
    }

    /// Whether an EXP timeout fired within the last two round trips: what
    /// was lost then was lost to the silence (an outage), not to a queue, and
    /// the reports of it arrive for a round trip after the path is back.
    fn after_silence(&self, now: Time, path: &Path) -> bool {
        self.last_timeout
            .is_some_and(|t| now.saturating_sub(t) < 2 * u64::from(path.rtt.max(path.min_rtt)))
    }

    /// Whether this arrival report shows that the fast start overshot: the
    /// first report made a round trip, two arrival spans and an ACK interval
    /// after it, of packets paced at its rate (or at the capacity as its
    /// estimate settles). The receiver repeats its last complete span, and a
    /// span is 16 ms and 16 packets, longer at low rates: an earlier report
    /// could cover the slower pace before the start. If the sender kept the
    /// pace and under 90 % of it arrived, the pair capacity over-read the
    /// path (pairs squeezed on the way, by a router or a host catching up),
    /// and the report is believed though no queue shows yet: the queue's
    /// delay reaches the sender half a round trip after the arrivals do, and
    /// all that while the start keeps sending more than the bottleneck
    /// carries. Kept pace or not, one report settles it.
    fn fast_start_overshot(&mut self, now: Time, path: &Path, sample: f64) -> bool {
        let Some((t0, sent0)) = self.fast_start else {
            return false;
        };
        let span =
            ARRIVAL_SPAN_US.max((f64::from(ARRIVAL_MIN_PACKETS) * 1e6 / self.rate.max(1.0)) as u64);
        let rtt = Self::round_len(path).max(u64::from(path.rtt));
        let due = t0 + rtt + 2 * span + ACK_INTERVAL_US;
        if now < due {
            return false;
        }
        self.fast_start = None;
        let paced = (self.sent_total - sent0) as f64 * 1e6 / (now - t0) as f64;
        paced >= 0.9 * self.rate && sample < 0.9 * self.rate
    }

    fn cut(&mut self, now: Time) {
        self.penalty *= CUT;
        self.rate *= CUT;
        self.last_cut = Some(now);
        self.mode = Mode::Cruise;
    }

    /// Paces at one packet per `period` µs, and keeps the round's highest
    /// pace: the cap on arrival reports.
    fn set_period(&mut self, period: f64) {
        self.period = period;
        self.pace_max[0] = self.pace_max[0].max(1e6 / period);
    }

    fn update_outputs(&mut self, path: &Path) {
        let min_rtt = f64::from(path.min_rtt.max(1_000));
        if self.mode == Mode::Startup && self.rate <= 0.0 {
            // Doubling start: the window grows with ACKs; pace at twice the
            // window per RTT (the window is the real limit).
            let rate = self.cwnd * 1e6 / min_rtt * 2.0;
            self.set_period(1e6 / rate.max(1.0));
            return;
        }
        // Never slower than the minimum window per round trip: where the round
        // trip is short (a LAN, loopback) the "queue" is mostly host scheduling
        // noise and the arrival reports of a CPU-starved receiver can drive the
        // model towards zero; the window then sets the rate, as in TCP. On a
        // satellite path the floor is negligible (32 packets per 600 ms).
        let rate = self.rate.max(MIN_WINDOW * 1e6 / min_rtt);
        self.set_period(1e6 / rate);
        self.cwnd = WINDOW_BDPS * self.rate.max(1.0) * min_rtt / 1e6 + MIN_WINDOW;
    }
}

impl Controller for Satellite {
    fn init(&mut self, now: Time, _path: &Path) {
        *self = Satellite::new();
        self.round_start = now;
        // The initial window leaves back to back: packet pairs for the receiver.
        self.set_period(1.0);
    }

    fn on_report(&mut self, now: Time, path: &Path, ack: &Ack) {
        let min_rtt = f64::from(path.min_rtt.max(QUEUE_REF_MIN_RTT));
        self.queue = (f64::from(path.rtt) - min_rtt).max(0.0) / min_rtt;
        let queueing = self.queue > Q_HIGH;
        if ack.bandwidth_sample > 0 {
            let c = f64::from(ack.bandwidth_sample);
            // Smoothed: single reports jitter by the pair timing resolution.
            self.capacity = if self.capacity > 0.0 {
                self.capacity + (c - self.capacity) / 8.0
            } else {
                c
            };
        }
        if ack.recv_rate_sample > 0 {
            let p = self.random_loss();
            let paced = self.pace_max[0].max(self.pace_max[1]);
            let sample = (f64::from(ack.recv_rate_sample) / (1.0 - p)).min(paced);
            let overshot = self.fast_start_overshot(now, path, sample);
            let limited =
                self.mode == Mode::Cruise && sample < 0.9 * self.rate && !queueing && !overshot;
            if !limited {
                let slot = &mut self.filter[self.filter_pos];
                *slot = slot.max(sample);
            }
        }
        if self.mode == Mode::Startup && self.capacity > 0.0 {
            // Fast start: pace at the packet-pair capacity.
            self.rate = self.capacity;
            self.mode = Mode::Cruise;
            self.fast_start = Some((now, self.sent_total));
            if !queueing {
                // What the arrival filter took during the start measured the
                // start's own pace (a window of 64 packets per RTT), not the
                // path: judged by the cruise rule, a sample below the new
                // rate without a queue to explain it is the sender's limit.
                // Kept, it would hold the ceiling at 1.25 x that pace and the
                // rate would climb 25 % a round (seconds at 200 ms), as after a
                // first message too small for a start of its own (one packet,
                // no packet pair) with a stream behind it.
                let floor = 0.9 * self.rate;
                for f in &mut self.filter {
                    if *f < floor {
                        *f = 0.0;
                    }
                }
            }
        }
        self.tick(now, path);
        self.steer();
        self.update_outputs(path);
    }

    fn on_ack(&mut self, now: Time, path: &Path, ack: &Ack) {
        if self.mode == Mode::Startup {
            self.cwnd += f64::from(ack.newly_acked);
            self.tick(now, path);
            self.update_outputs(path);
        }
    }

    fn on_loss(&mut self, now: Time, path: &Path, _ranges: &[(u32, u32)], new_losses: u32) {
        self.tick(now, path);
        self.lost_in_round += u64::from(new_losses);
        if new_losses == 0 || self.rate <= 0.0 {
            return;
        }
        let overflowing = f64::from(path.rtt) > 1.25 * f64::from(path.min_rtt) + 5_000.0;
        let recently_cut = self
            .last_cut
            .is_some_and(|t| now.saturating_sub(t) < u64::from(path.rtt.max(path.min_rtt)));
        if overflowing && !recently_cut && !self.after_silence(now, path) {
            self.cut(now);
            self.update_outputs(path);
        }
    }

    fn on_timeout(&mut self, now: Time, _path: &Path) {
        self.last_timeout = Some(now);
    }

    fn on_pkt_sent(&mut self, now: Time, path: &Path, _seq: u32, _retransmit: bool) {
        self.sent_in_round += 1;
        self.sent_total += 1;
        if self.sent_in_round % 64 == 0 {
            self.tick(now, path);
        }
    }

    fn period(&self) -> f64 {
        self.period
    }

    fn window(&self) -> f64 {
        self.cwnd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(rtt: u32) -> Path {
        Path {
            rtt,
            rtt_var: 0,
            min_rtt: rtt,
            recv_rate: 0,
            bandwidth: 0,
            mss: 1500,
            max_window: 100_000,
            snd_curr_seq: 0,
            inflight: 0,
        }
    }

    #[test]
    fn fast_start_jumps_to_pair_capacity() {
        let mut cc = Satellite::new();
        let p = path(600_000);
        cc.init(0, &p);
        assert_eq!(cc.window(), 64.0);
        let ack = Ack {
            seq: 10,
            newly_acked: 10,
            recv_rate_sample: 0,
            bandwidth_sample: 8500,
        };
        cc.on_report(610_000, &p, &ack);
        cc.on_ack(610_000, &p, &ack);
        assert!((cc.period() - 1e6 / 8500.0).abs() < 1e-6);
        // WINDOW_BDPS x BDP + 32.
        assert!((cc.window() - (WINDOW_BDPS * 8500.0 * 0.6 + 32.0)).abs() < 1e-6);
    }

    /// 10 ms at 8500 packets/s: 85 packets out, `lost` of them reported
    /// lost, one ACK reporting `received` packets/s and the pair capacity.
    fn round(cc: &mut Satellite, p: &Path, now: Time, i: u32, received: u32, lost: u32) {
        for _ in 0..85 {
            cc.on_pkt_sent(now, p, i, false);
        }
        if lost > 0 {
            cc.on_loss(now, p, &[(i, i)], lost);
        }
        let ack = Ack {
            seq: i,
            newly_acked: 85,
            recv_rate_sample: received,
            bandwidth_sample: 8500,
        };
        cc.on_report(now, p, &ack);
        cc.on_ack(now, p, &ack);
    }

    /// A round at the link's rate with nothing lost.
    fn steady_round(cc: &mut Satellite, p: &Path, now: Time, i: u32) {
        round(cc, p, now, i, 8500, 0);
    }

    /// A controller on `p` after 2 s of steady rounds, and the time then.
    fn steady(p: &Path) -> (Satellite, Time) {
        let mut cc = Satellite::new();
        cc.init(0, p);
        let mut now = 0;
        for i in 0..200u32 {
            now += 10_000;
            steady_round(&mut cc, p, now, i);
        }
        (cc, now)
    }

    #[test]
    fn losses_reported_after_a_silence_do_not_cut() {
        let mut p = path(600_000);
        let (mut cc, mut now) = steady(&p);
        let before = cc.bandwidth();
        // An outage: EXP fires; when the path is back, the NAK reports a
        // second of packets lost at once, with the RTT still inflated.
        cc.on_timeout(now, &p);
        now += 500_000;
        p.rtt = 900_000;
        cc.on_loss(now, &p, &[(0, 8499)], 8500);
        for _ in 0..3 {
            now += 600_000;
            cc.on_pkt_sent(now, &p, 0, true);
        }
        assert_eq!(cc.bandwidth(), before, "an outage is not congestion");
        // Long after the silence, queueing loss cuts again.
        now += 5_000_000;
        cc.on_loss(now, &p, &[(9000, 9000)], 1);
        assert!((cc.bandwidth() - before * 0.85).abs() < 1.0);
    }

    /// A burst (a router or an emulator catching up after a stall) reads as
    /// five times the link over one span: the ceiling stays at what was
    /// paced, it does not jump to the burst and flood the queue.
    #[test]
    fn an_arrival_burst_does_not_lift_the_rate_above_the_pace() {
        let p = path(600_000);
        let (mut cc, mut now) = steady(&p);
        let before = cc.bandwidth();
        assert!((before - 8500.0).abs() < 1.0, "rate {before}");
        let burst = Ack {
            seq: 200,
            newly_acked: 85,
            recv_rate_sample: 42_500,
            bandwidth_sample: 8500,
        };
        cc.on_report(now + 1, &p, &burst);
        for i in 201..260u32 {
            now += 10_000;
            steady_round(&mut cc, &p, now, i);
        }
        assert!(cc.bandwidth() <= before * 1.001, "rate {}", cc.bandwidth());
    }

    /// Random loss: the receiver reports what reached it, 90 % of the link;
    /// scaled up by the random loss the pacing holds the link. A queue that
    /// overflows: the receiver gets what the bottleneck carries, the drops do
    /// not count as random, and the rate comes down to the bottleneck.
    #[test]
    fn arrivals_are_scaled_by_random_loss_but_not_by_a_queues_drops() {
        let mut cc = Satellite::new();
        let mut p = path(600_000);
        cc.init(0, &p);
        let mut now = 0;
        // 10 % lost at random: 7650 of 8500 packets/s arrive.
        for i in 0..400u32 {
            now += 10_000;
            round(&mut cc, &p, now, i, 7650, 8 + i % 2);
        }
        assert!(cc.bandwidth() > 8500.0 * 0.97, "rate {}", cc.bandwidth());
        // The arrivals themselves read the link: 7650 / 0.9.
        assert!(
            (cc.random_loss() - 0.1).abs() < 0.01,
            "p {}",
            cc.random_loss()
        );
        assert!(
            (cc.filter_max() - 8500.0).abs() < 100.0,
            "arrivals {}",
            cc.filter_max()
        );
        // The bottleneck is now 5000 packets/s and its queue overflows: a
        // standing queue, a third of what is sent dropped there.
        // Twelve rounds of 600 ms: the arrival filter's ten turn over.
        p.rtt = 900_000;
        for i in 400..1120u32 {
            now += 10_000;
            round(&mut cc, &p, now, i, 4500, 28);
        }
        // 4500 / 0.9 is what the bottleneck carries, less the queue's
        // back-off: not the offered load. The queue's drops did not count as
        // random loss.
        assert!(
            (cc.random_loss() - 0.1).abs() < 0.01,
            "p {}",
            cc.random_loss()
        );
        assert!(cc.ceiling() <= 5000.0 * 1.01, "ceiling {}", cc.ceiling());
        assert!(cc.bandwidth() <= 5000.0 * 1.01, "rate {}", cc.bandwidth());
    }

    #[test]
    fn random_loss_does_not_cut_but_queueing_loss_does() {
        let mut cc = Satellite::new();
        let mut p = path(200_000);
        cc.init(0, &p);
        let mut now = 0;
        for i in 0..1000u32 {
            now += 10_000;
            steady_round(&mut cc, &p, now, i);
            cc.on_loss(now, &p, &[(i, i + 3)], 4);
        }
        // Model holds the link: within 3 % of capacity, not cut.
        assert!(cc.bandwidth() > 8500.0 * 0.97, "bw {}", cc.bandwidth());
        assert!(
            (cc.loss_rate() - 0.047).abs() < 0.01,
            "p {}",
            cc.loss_rate()
        );
        let before = cc.bandwidth();
        p.rtt = 300_000; // a queue: RTT 1.5 x min
        cc.on_loss(now + 1, &p, &[(1, 1)], 1);
        assert!((cc.bandwidth() - before * 0.85).abs() < 1.0);
        // Not twice within a round trip.
        cc.on_loss(now + 2, &p, &[(2, 2)], 1);
        assert!((cc.bandwidth() - before * 0.85).abs() < 1.0);
    }

    /// A short path with a CPU-starved receiver: its queue stands (8 ms) and
    /// the arrival reports are a trickle. The model follows them down, the
    /// pacing stops at the minimum window per round trip.
    #[test]
    fn short_path_paces_at_least_the_minimum_window_per_rtt() {
        let mut cc = Satellite::new();
        let mut p = path(100);
        p.rtt = 8_000;
        cc.init(0, &p);
        for i in 0..200u32 {
            let now = u64::from(i) * 10_000;
            let ack = Ack {
                seq: i,
                newly_acked: 4,
                recv_rate_sample: 30,
                bandwidth_sample: if i == 0 { 80_000 } else { 0 },
            };
            cc.on_report(now, &p, &ack);
            cc.on_ack(now, &p, &ack);
        }
        assert!(
            cc.bandwidth() < 1_000.0,
            "the model follows the arrivals down"
        );
        // 32 packets per (min RTT floored at 1 ms) = 32 000 packets/s.
        assert!(
            (cc.period() - 1e6 / 32_000.0).abs() < 1e-6,
            "period {}",
            cc.period()
        );
        // On a 600 ms path the same floor is 32 packets per 600 ms.
        let mut sat = Satellite::new();
        let p = path(600_000);
        sat.init(0, &p);
        let ack = Ack {
            seq: 1,
            newly_acked: 1,
            recv_rate_sample: 0,
            bandwidth_sample: 10,
        };
        sat.on_report(610_000, &p, &ack);
        assert!(
            (sat.period() - 0.6e6 / 32.0).abs() < 1e-6,
            "period {}",
            sat.period()
        );
    }

    /// Loopback: a 30 µs path whose smoothed RTT reads 1.5 ms, the hosts'
    /// scheduling. That is no queue: the flow probes up to the pair capacity as
    /// its arrivals follow. (Measured against a 1 ms floor it would read as a
    /// 50 % queue, and the flow would pace at 0.8 × its own arrivals, round
    /// after round.)
    #[test]
    fn host_scheduling_delay_on_a_short_path_is_not_a_queue() {
        let mut cc = Satellite::new();
        let mut p = path(30);
        p.rtt = 1_500;
        cc.init(0, &p);
        let capacity = 3_000_000.0;
        let mut arrivals = 1_000_000.0;
        for i in 0..30u32 {
            let now = u64::from(i + 1) * 10_000;
            let ack = Ack {
                seq: i,
                newly_acked: 100,
                recv_rate_sample: arrivals as u32,
                bandwidth_sample: capacity as u32,
            };
            cc.on_report(now, &p, &ack);
            cc.on_ack(now, &p, &ack);
            // The receiver keeps up: next round, what was paced arrives.
            arrivals = cc.bandwidth();
        }
        assert!(
            cc.bandwidth() > 0.95 * capacity,
            "rate {} of capacity {capacity}",
            cc.bandwidth()
        );
    }

    #[test]
    fn fast_start_forgets_the_doubling_starts_own_pace() {
        let mut cc = Satellite::new();
        let p = path(200_000);
        cc.init(0, &p);
        // A one-packet message: no pair, no rates; the doubling start paces
        // a 64-packet window per round trip.
        let ack = Ack {
            seq: 1,
            newly_acked: 1,
            ..Ack::default()
        };
        cc.on_report(200_000, &p, &ack);
        cc.on_ack(200_000, &p, &ack);
        assert!(cc.period() > 1000.0, "period {}", cc.period());
        // The first report with a pair capacity also carries the arrival
        // rate measured at that pace (649 packets/s): the sender's limit,
        // not the path's. The rate is the capacity, not 1.25 x 649.
        let ack = Ack {
            seq: 60,
            newly_acked: 59,
            recv_rate_sample: 649,
            bandwidth_sample: 8334,
        };
        cc.on_report(600_000, &p, &ack);
        cc.on_ack(600_000, &p, &ack);
        assert_eq!(cc.bandwidth(), 8334.0);
        assert!((cc.period() - 1e6 / 8334.0).abs() < 1e-6);
        // With a queue standing the low sample is the path's: it holds.
        let mut cc = Satellite::new();
        cc.init(0, &p);
        let mut q = p;
        q.rtt = 260_000;
        cc.on_report(600_000, &q, &ack);
        assert!(cc.bandwidth() < 1000.0, "rate {}", cc.bandwidth());
    }

    #[test]
    fn doubling_start_without_capacity_reports() {
        let mut cc = Satellite::new();
        let p = path(100_000);
        cc.init(0, &p);
        let ack = Ack {
            seq: 64,
            newly_acked: 64,
            ..Ack::default()
        };
        cc.on_ack(100_000, &p, &ack);
        assert_eq!(cc.window(), 128.0);
    }
}
