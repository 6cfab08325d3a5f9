//! The collector: turns what a run's nodes reported into measures.
//!
//! - goodput over time: the receiver's `progress` lines, stamped when the
//!   harness read them, binned;
//! - time to 90 %: the first instant (since the sender started) at which the
//!   goodput over the last second reached 90 % of capacity × (1 − loss);
//! - recovery after an outage: from the end of the outage to the first
//!   half-second window wholly after it at 90 % of the link;
//! - CPU: user + system seconds of the run's child processes and their
//!   children (`getrusage(RUSAGE_CHILDREN)` around the run: the harness and
//!   the link emulator are not counted);
//! - latency percentiles (nearest rank) of rpc round trips or live delivery.

use std::time::Instant;

use nix::sys::resource::{getrusage, UsageWho};
use serde::Serialize;

/// CPU seconds (user + system) of all reaped children so far.
pub fn children_cpu_s() -> f64 {
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

/// Cumulative received bytes over time.
#[derive(Debug, Clone)]
pub struct Series {
    t0: Instant,
    /// (seconds since t0, cumulative bytes).
    pub points: Vec<(f64, u64)>,
}

impl Series {
    /// An empty series whose time zero is `t0` (the sender's start).
    pub fn new(t0: Instant) -> Series {
        Series {
            t0,
            points: vec![(0.0, 0)],
        }
    }

    /// Adds a progress report.
    pub fn push(&mut self, at: Instant, bytes: u64) {
        let t = at.saturating_duration_since(self.t0).as_secs_f64();
        self.points.push((t, bytes));
    }

    /// Cumulative bytes at `t` (linear between reports).
    pub fn bytes_at(&self, t: f64) -> f64 {
        let p = &self.points;
        match p.iter().position(|&(pt, _)| pt >= t) {
            None => p.last().map_or(0.0, |&(_, b)| b as f64),
            Some(0) => p[0].1 as f64,
            Some(i) => {
                let (t1, b1) = p[i - 1];
                let (t2, b2) = p[i];
                if t2 <= t1 {
                    return b2 as f64;
                }
                b1 as f64 + (b2 as f64 - b1 as f64) * (t - t1) / (t2 - t1)
            }
        }
    }

    /// The last report's time.
    pub fn end(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.0)
    }

    /// Goodput in Mbit/s per bin of `bin_s`: (bin end, Mbit/s).
    pub fn binned(&self, bin_s: f64) -> Vec<(f64, f64)> {
        let n = (self.end() / bin_s).ceil() as usize;
        (1..=n)
            .map(|i| {
                let (a, b) = ((i - 1) as f64 * bin_s, i as f64 * bin_s);
                (b, (self.bytes_at(b) - self.bytes_at(a)) * 8.0 / bin_s / 1e6)
            })
            .collect()
    }

    /// First `t ≥ from + window` at which the goodput over `[t − window, t]`
    /// reached `mbps`, on a 10 ms grid.
    pub fn first_reaching(&self, mbps: f64, window: f64, from: f64) -> Option<f64> {
        let mut t = from + window;
        while t <= self.end() + 1e-9 {
            let rate = (self.bytes_at(t) - self.bytes_at(t - window)) * 8.0 / window / 1e6;
            if rate >= mbps {
                return Some(t);
            }
            t += 0.01;
        }
        None
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th.
    pub p90_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Samples.
    pub samples: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of samples in microseconds; `None` if empty.
    pub fn of_us(samples: &[f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1] / 1e3
        };
        Some(Percentiles {
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: v[v.len() - 1] / 1e3,
            samples: v.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn series_bins_and_threshold() {
        let t0 = Instant::now();
        let mut s = Series::new(t0);
        // 1 s at 0, then 12.5 MB/s (100 Mbit/s) for 3 s.
        for i in 1..=40 {
            let t = i as f64 * 0.1;
            let bytes = if t <= 1.0 {
                0
            } else {
                ((t - 1.0) * 12.5e6) as u64
            };
            s.push(t0 + Duration::from_secs_f64(t), bytes);
        }
        let b = s.binned(1.0);
        assert_eq!(b.len(), 4);
        assert!(b[0].1.abs() < 1e-6);
        assert!((b[2].1 - 100.0).abs() < 0.5, "{b:?}");
        let t90 = s.first_reaching(90.0, 1.0, 0.0).unwrap();
        assert!((t90 - 1.9).abs() < 0.02, "{t90}");
        assert!(s.first_reaching(200.0, 1.0, 0.0).is_none());
        assert!((s.bytes_at(2.05) - 1.05 * 12.5e6).abs() < 1.0);
    }

    #[test]
    fn percentiles_nearest_rank_in_ms() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64 * 1000.0).collect();
        let p = Percentiles::of_us(&v).unwrap();
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!(Percentiles::of_us(&[]).is_none());
    }

    #[test]
    fn children_cpu_grows_with_a_busy_child() {
        let before = children_cpu_s();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(children_cpu_s() > before);
    }
}
