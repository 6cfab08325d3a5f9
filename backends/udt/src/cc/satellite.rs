//! A model-based controller for satellite paths.
//!
//! UDT's native algorithm reads every loss report as congestion. On a
//! satellite path most loss is physical (random, independent of load), and a
//! 600 ms round trip makes every unwarranted decrease expensive: the native
//! increase needs many seconds to win back a 1/9 cut. This controller instead
//! keeps a model of the path, in the spirit of BBR:
//!
//! - **Bottleneck bandwidth** `bw`: a windowed maximum (10 rounds of one
//!   minimum RTT each) over the receiver's arrival-rate reports, corrected for
//!   the measured random loss rate (`arrival / (1 − p)`: the packets lost on the
//!   link also used its capacity), and capped by the packet-pair capacity.
//! - **Minimum RTT** from the connection's RTT estimator.
//! - **Pacing** at `gain × bw` with a gain cycle of eight rounds
//!   `[1.1, 0.9, 1, 1, 1, 1, 1, 1]` (probe for more, drain what the probe
//!   queued, cruise).
//! - **Window** `2 × bw × min_rtt + 32` packets: enough to keep pacing when a
//!   hole at the head of the receive buffer holds the ACK point for a round trip.
//!
//! **Fast start.** The first loss-free packets go out back to back; their
//! packet pairs give the receiver a capacity estimate within the first round
//! trip, and the first full ACK that carries it makes the sender pace at that
//! capacity immediately (no doubling from 16 packets: at 600 ms a doubling
//! start needs ~9 RTT to fill 100 Mbit/s). Without a capacity report the
//! controller falls back to a doubling start paced at 2× the arrival rate,
//! leaving it when the arrival rate stops growing by 25 % per round.
//!
//! **Loss as congestion only with evidence.** A loss report reduces the model
//! (bw × 0.85, at most once per round trip) only if the smoothed RTT stands
//! above `1.25 × min_rtt + 5 ms` (a queue is building), or if the loss rate of
//! the last round is far above the long-run average (≥ 20 % and ≥ 3× the mean
//! plus 5 %: a clustered, load-driven burst). Random loss only updates the loss
//! rate estimate. A timeout (EXP) leaves the model alone: on satellite links a
//! silence is usually an outage, not a queue.

use super::{Ack, Controller, Path};
use crate::estimate::Time;

const GAINS: [f64; 8] = [1.1, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
const FILTER_ROUNDS: usize = 10;
const INITIAL_WINDOW: f64 = 64.0;
/// Window in bandwidth-delay products: the span from the oldest hole to the
/// newest packet reaches 2–3 BDP when a retransmission is itself lost.
const WINDOW_BDPS: f64 = 4.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Startup,
    ProbeBw,
}

/// The model-based satellite controller.
#[derive(Debug, Clone)]
pub struct Satellite {
    mode: Mode,
    period: f64,
    cwnd: f64,
    /// Packet-pair capacity, packets/s (0 = unknown).
    capacity: f64,
    /// Per-round maxima of corrected arrival-rate samples.
    filter: [f64; FILTER_ROUNDS],
    filter_pos: usize,
    bw: f64,
    round_start: Time,
    round_count: u64,
    phase: usize,
    sent_in_round: u64,
    lost_in_round: u64,
    loss_rate: f64,
    last_cut: Option<Time>,
    plateau_bw: f64,
    plateau_rounds: u32,
    started: bool,
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
            bw: 0.0,
            round_start: 0,
            round_count: 0,
            phase: 0,
            sent_in_round: 0,
            lost_in_round: 0,
            loss_rate: 0.0,
            last_cut: None,
            plateau_bw: 0.0,
            plateau_rounds: 0,
            started: false,
        }
    }

    /// The current bottleneck bandwidth estimate, packets/s.
    pub fn bandwidth(&self) -> f64 {
        self.bw
    }

    /// The smoothed random-loss rate estimate.
    pub fn loss_rate(&self) -> f64 {
        self.loss_rate
    }

    fn filter_max(&self) -> f64 {
        self.filter.iter().copied().fold(0.0, f64::max)
    }

    fn round_len(path: &Path) -> u64 {
        u64::from(path.min_rtt.max(10_000))
    }

    fn end_round(&mut self, now: Time) {
        let round_loss = if self.sent_in_round > 0 {
            self.lost_in_round as f64 / self.sent_in_round as f64
        } else {
            0.0
        };
        let clustered = round_loss >= 0.2 && round_loss >= 3.0 * self.loss_rate + 0.05;
        if clustered {
            self.cut(now);
        } else if self.sent_in_round >= 16 {
            self.loss_rate += (round_loss.min(0.5) - self.loss_rate) / 8.0;
        }
        self.sent_in_round = 0;
        self.lost_in_round = 0;
        self.round_start = now;
        self.round_count += 1;
        self.filter_pos = (self.filter_pos + 1) % FILTER_ROUNDS;
        self.filter[self.filter_pos] = 0.0;
        self.phase = (self.phase + 1) % GAINS.len();
        if self.mode == Mode::Startup {
            let max = self.filter_max();
            if max >= self.plateau_bw * 1.25 {
                self.plateau_bw = max;
                self.plateau_rounds = 0;
            } else {
                self.plateau_rounds += 1;
            }
            let near_capacity = self.capacity > 0.0 && max >= 0.8 * self.capacity;
            if near_capacity || self.plateau_rounds >= 3 {
                self.mode = Mode::ProbeBw;
                self.phase = 2;
            }
        }
    }

    fn cut(&mut self, now: Time) {
        self.bw *= 0.85;
        for f in &mut self.filter {
            *f = f.min(self.bw);
        }
        self.filter[self.filter_pos] = self.bw;
        self.last_cut = Some(now);
        if self.mode == Mode::Startup {
            self.mode = Mode::ProbeBw;
            self.phase = 2;
        }
    }

    fn update_outputs(&mut self, path: &Path) {
        let min_rtt = f64::from(path.min_rtt.max(1_000));
        match self.mode {
            Mode::Startup if self.capacity <= 0.0 && !self.started => {
                // Doubling start: window grows with ACKs, pace at twice what arrives.
                let rate = (2.0 * self.filter_max()).max(self.cwnd * 1e6 / min_rtt * 2.0);
                self.period = 1e6 / rate.max(1.0);
            }
            _ => {
                let gain = if self.mode == Mode::Startup {
                    1.0
                } else {
                    GAINS[self.phase]
                };
                let bw = self.bw.max(1.0);
                self.period = 1e6 / (bw * gain);
                self.cwnd = WINDOW_BDPS * bw * min_rtt / 1e6 + 32.0;
            }
        }
    }
}

impl Controller for Satellite {
    fn init(&mut self, now: Time, _path: &Path) {
        *self = Satellite::new();
        self.round_start = now;
        // The initial window leaves back to back: packet pairs for the receiver.
        self.period = 1.0;
    }

    fn on_ack(&mut self, now: Time, path: &Path, ack: &Ack) {
        if ack.bandwidth_sample > 0 {
            self.capacity = f64::from(ack.bandwidth_sample);
        }
        if ack.recv_rate_sample > 0 {
            let mut sample = f64::from(ack.recv_rate_sample) / (1.0 - self.loss_rate.min(0.5));
            if self.capacity > 0.0 {
                sample = sample.min(self.capacity * 1.02);
            }
            let slot = &mut self.filter[self.filter_pos];
            *slot = slot.max(sample);
        }
        if now.saturating_sub(self.round_start) >= Self::round_len(path) {
            self.end_round(now);
        }
        match self.mode {
            Mode::Startup => {
                if self.capacity > 0.0 {
                    // Fast start: jump to the packet-pair capacity.
                    self.started = true;
                    self.bw = self.capacity.max(self.filter_max());
                } else {
                    self.cwnd += f64::from(ack.newly_acked);
                    self.bw = self.filter_max();
                }
            }
            Mode::ProbeBw => {
                let max = self.filter_max();
                if max > 0.0 {
                    self.bw = max;
                }
            }
        }
        self.update_outputs(path);
    }

    fn on_loss(&mut self, now: Time, path: &Path, _ranges: &[(u32, u32)], new_losses: u32) {
        self.lost_in_round += u64::from(new_losses);
        if new_losses == 0 || self.bw <= 0.0 {
            return;
        }
        let queueing = f64::from(path.rtt) > 1.25 * f64::from(path.min_rtt) + 5_000.0;
        let recently_cut = self
            .last_cut
            .is_some_and(|t| now.saturating_sub(t) < u64::from(path.rtt.max(path.min_rtt)));
        if queueing && !recently_cut {
            self.cut(now);
            self.update_outputs(path);
        }
    }

    fn on_timeout(&mut self, _now: Time, _path: &Path) {}

    fn on_pkt_sent(&mut self, _now: Time, _path: &Path, _seq: u32, _retransmit: bool) {
        self.sent_in_round += 1;
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
        cc.on_ack(610_000, &p, &ack);
        assert!((cc.period() - 1e6 / 8500.0).abs() < 1e-6);
        // 4 x BDP + 32.
        assert!((cc.window() - (4.0 * 8500.0 * 0.6 + 32.0)).abs() < 1e-6);
    }

    #[test]
    fn random_loss_does_not_cut_but_queueing_loss_does() {
        let mut cc = Satellite::new();
        let mut p = path(200_000);
        cc.init(0, &p);
        let mut now = 0;
        for i in 0..1000u32 {
            now += 10_000;
            for _ in 0..85 {
                cc.on_pkt_sent(now, &p, i, false);
            }
            let ack = Ack {
                seq: i,
                newly_acked: 85,
                recv_rate_sample: 8075, // 5 % lost on a 8500 pkt/s link
                bandwidth_sample: 8500,
            };
            cc.on_ack(now, &p, &ack);
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
