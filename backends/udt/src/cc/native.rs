//! UDT4's native congestion control (`CUDTCC` in `ccc.cpp`), kept faithful.
//!
//! - Slow start: the window grows by the number of newly acknowledged
//!   packets once per rate-control interval (SYN = 10 ms) until it exceeds the
//!   maximum flow window; then the sender switches to rate control with the
//!   period set from the receiver's arrival rate.
//! - Rate increase (every SYN without loss):
//!   `inc = max(10^ceil(log10(B·MSS·8)) · 1.5e-6 / MSS, 0.01)` packets per SYN,
//!   where `B` is the estimated spare bandwidth (capacity − current rate,
//!   limited to capacity/9 right after a decrease), and
//!   `period = period·SYN / (period·inc + SYN)`.
//! - Window after slow start: `recv_rate · (RTT + SYN) + 16`.
//! - Decrease: on a loss report that starts a new congestion epoch (its first
//!   loss is beyond the sequence number sent at the last decrease) the period
//!   grows by 1/8 (the rate drops by 1/9); within an epoch further decreases
//!   happen on every `DecRandom`-th NAK, at most 5 per epoch, where `DecRandom`
//!   is drawn uniformly from `1..=AvgNAKNum` (UDT4 draws it with `srand(seq)`;
//!   here a deterministic hash of the same sequence number).
//! - Timeout: only ends slow start (UDT4 comments out the decrease).
//!
//! Two UDT4 quirks are kept on purpose: leaving slow start without a receive
//! rate sets the period to `cwnd / (RTT + SYN)` (inverted units, effectively
//! "as fast as possible"), and the rate controller acts at most once per SYN
//! however many ACKs arrive.

use super::{seq_off, Ack, Controller, Path};
use crate::estimate::Time;

/// UDT's SYN interval and rate-control interval, microseconds.
pub const SYN_US: u64 = 10_000;

/// UDT4's `CUDTCC`.
#[derive(Debug, Clone)]
pub struct Native {
    period: f64,
    cwnd: f64,
    last_rc_time: Time,
    slow_start: bool,
    last_ack: u32,
    loss: bool,
    last_dec_seq: u32,
    last_dec_period: f64,
    nak_count: i64,
    dec_random: i64,
    avg_nak_num: i64,
    dec_count: i64,
    seed: u64,
}

impl Native {
    /// A controller in its pre-`init` state; `seed` perturbs the random decrease.
    pub fn new(seed: u64) -> Self {
        Native {
            period: 1.0,
            cwnd: 16.0,
            last_rc_time: 0,
            slow_start: true,
            last_ack: 0,
            loss: false,
            last_dec_seq: 0,
            last_dec_period: 1.0,
            nak_count: 0,
            dec_random: 1,
            avg_nak_num: 0,
            dec_count: 0,
            seed,
        }
    }

    /// Whether the controller is still in slow start.
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    fn uniform(&self, seq: u32) -> f64 {
        // splitmix64 of (seed, seq): UDT4's srand(seq); rand()/RAND_MAX.
        let mut z = self.seed ^ u64::from(seq).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Controller for Native {
    fn init(&mut self, now: Time, path: &Path) {
        self.last_rc_time = now;
        self.slow_start = true;
        self.last_ack = path.snd_curr_seq;
        self.loss = false;
        self.last_dec_seq = path.snd_curr_seq.wrapping_sub(1) & 0x7FFF_FFFF;
        self.last_dec_period = 1.0;
        self.avg_nak_num = 0;
        self.nak_count = 0;
        self.dec_random = 1;
        self.cwnd = 16.0;
        self.period = 1.0;
    }

    fn on_ack(&mut self, now: Time, path: &Path, ack: &Ack) {
        const MIN_INC: f64 = 0.01;
        if now.saturating_sub(self.last_rc_time) < SYN_US {
            return;
        }
        self.last_rc_time = now;
        let rtt = f64::from(path.rtt);
        let rc = SYN_US as f64;

        if self.slow_start {
            // CSeqNo::seqlen: inclusive length.
            self.cwnd += f64::from(seq_off(self.last_ack, ack.seq) + 1);
            self.last_ack = ack.seq;
            if self.cwnd > f64::from(path.max_window) {
                self.slow_start = false;
                if path.recv_rate > 0 {
                    self.period = 1_000_000.0 / f64::from(path.recv_rate);
                } else {
                    self.period = (rtt + rc) / self.cwnd;
                }
            }
        } else {
            self.cwnd = f64::from(path.recv_rate) / 1_000_000.0 * (rtt + rc) + 16.0;
        }

        if self.slow_start {
            return;
        }
        if self.loss {
            self.loss = false;
            return;
        }

        let bw = f64::from(path.bandwidth);
        let mut b = (bw - 1_000_000.0 / self.period) as i64;
        // Right after a decrease, the spare bandwidth is capped at capacity/9.
        if self.period > self.last_dec_period && ((path.bandwidth / 9) as i64) < b {
            b = (path.bandwidth / 9) as i64;
        }
        let inc = if b <= 0 {
            MIN_INC
        } else {
            let mss = f64::from(path.mss.max(1));
            let inc = 10f64.powf((b as f64 * mss * 8.0).log10().ceil()) * 0.000_001_5 / mss;
            inc.max(MIN_INC)
        };
        self.period = (self.period * rc) / (self.period * inc + rc);
    }

    fn on_loss(&mut self, _now: Time, path: &Path, ranges: &[(u32, u32)], _new: u32) {
        let rtt = f64::from(path.rtt);
        let rc = SYN_US as f64;
        if self.slow_start {
            self.slow_start = false;
            if path.recv_rate > 0 {
                self.period = 1_000_000.0 / f64::from(path.recv_rate);
                return;
            }
            self.period = self.cwnd / (rtt + rc);
        }
        self.loss = true;
        let Some(&(first, _)) = ranges.first() else {
            return;
        };
        if seq_off(self.last_dec_seq, first) > 0 {
            self.last_dec_period = self.period;
            self.period = (self.period * 1.125).ceil();
            self.avg_nak_num =
                (self.avg_nak_num as f64 * 0.875 + self.nak_count as f64 * 0.125).ceil() as i64;
            self.nak_count = 1;
            self.dec_count = 1;
            self.last_dec_seq = path.snd_curr_seq;
            let r = self.uniform(self.last_dec_seq);
            self.dec_random = ((self.avg_nak_num as f64 * r).ceil() as i64).max(1);
        } else {
            let dc = self.dec_count;
            self.dec_count += 1;
            if dc < 5 {
                self.nak_count += 1;
                if self.nak_count % self.dec_random == 0 {
                    self.period = (self.period * 1.125).ceil();
                    self.last_dec_seq = path.snd_curr_seq;
                }
            }
        }
    }

    fn on_timeout(&mut self, _now: Time, path: &Path) {
        if self.slow_start {
            self.slow_start = false;
            if path.recv_rate > 0 {
                self.period = 1_000_000.0 / f64::from(path.recv_rate);
            } else {
                self.period = self.cwnd / (f64::from(path.rtt) + SYN_US as f64);
            }
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

    fn path() -> Path {
        Path {
            rtt: 100_000,
            rtt_var: 0,
            min_rtt: 100_000,
            recv_rate: 8000,
            bandwidth: 8333,
            mss: 1500,
            max_window: 1000,
            snd_curr_seq: 99,
            inflight: 0,
        }
    }

    #[test]
    fn slow_start_grows_by_acked_then_switches_to_recv_rate() {
        let mut cc = Native::new(1);
        let p = path();
        cc.init(0, &p);
        assert_eq!((cc.window(), cc.period()), (16.0, 1.0));
        // Within one SYN nothing happens.
        cc.on_ack(
            5_000,
            &p,
            &Ack {
                seq: 200,
                ..Ack::default()
            },
        );
        assert_eq!(cc.window(), 16.0);
        // seqlen(99, 199) = 101.
        cc.on_ack(
            10_000,
            &p,
            &Ack {
                seq: 199,
                ..Ack::default()
            },
        );
        assert_eq!(cc.window(), 117.0);
        cc.on_ack(
            20_000,
            &p,
            &Ack {
                seq: 1100,
                ..Ack::default()
            },
        );
        assert!(!cc.in_slow_start());
        // Period from the receive rate (125 us), then the same call's increase
        // step (UDT4 falls through to the rate increase).
        let expect = 125.0 * 10_000.0 / (125.0 * 0.01 + 10_000.0);
        assert!((cc.period() - expect).abs() < 1e-9, "{}", cc.period());
    }

    #[test]
    fn increase_formula_matches_reference() {
        let mut cc = Native::new(1);
        let p = path();
        cc.init(0, &p);
        // Leaving slow start on a loss report sets period = 1e6/recv_rate and
        // returns before the loss flag is set (as UDT4 does).
        cc.on_loss(1, &p, &[(50, 50)], 1);
        assert_eq!(cc.period(), 125.0);
        cc.on_ack(
            10_001,
            &p,
            &Ack {
                seq: 60,
                ..Ack::default()
            },
        );
        // B = 8333 - 8000 = 333 pkts/s; B*MSS*8 = 3_996_000 -> 10^7 * 1.5e-6 / 1500 = 0.01
        let inc = 0.01f64;
        let expect = 125.0 * 10_000.0 / (125.0 * inc + 10_000.0);
        assert!((cc.period() - expect).abs() < 1e-9);
        assert_eq!(cc.window(), 8000.0 / 1e6 * 110_000.0 + 16.0);
    }

    #[test]
    fn decrease_once_per_epoch_plus_bounded_random() {
        let mut cc = Native::new(7);
        let mut p = path();
        cc.init(0, &p);
        cc.on_loss(0, &p, &[(100, 100)], 1); // ends slow start only
        assert_eq!(cc.period(), 125.0);
        cc.on_loss(0, &p, &[(100, 110)], 11);
        let base = cc.period();
        // New epoch: loss beyond last_dec_seq (98) -> period * 1.125 rounded up.
        assert_eq!(base, (125.0f64 * 1.125).ceil());
        // A NAK re-reporting old losses in the same epoch: counted, not an epoch.
        p.snd_curr_seq = 500;
        // Losses inside the epoch (first <= last_dec_seq=99): at most 4 more decreases.
        for _ in 0..50 {
            cc.on_loss(0, &p, &[(70, 70)], 1);
        }
        let mut expect = base;
        let mut n = 0;
        while expect < cc.period() {
            expect = (expect * 1.125).ceil();
            n += 1;
        }
        assert_eq!(expect, cc.period());
        assert!(n <= 4, "{n} extra decreases");
    }
}
