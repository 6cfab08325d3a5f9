//! Small statistics helpers: medians and percentiles of measured samples.

use std::time::Duration;

/// The median of `values` (the mean of the middle two for an even count).
///
/// Returns `None` for an empty slice.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Latency percentiles of a set of round-trip samples.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`; `None` when there are none.
    pub fn from_samples(samples: &mut [Duration]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let idx = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[idx.clamp(1, samples.len()) - 1]
        };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Some(Latency {
            p50_us: us(rank(50.0)),
            p99_us: us(rank(99.0)),
            max_us: us(*samples.last().expect("non-empty")),
            samples: samples.len(),
        })
    }
}

/// Bits per second of `bytes` moved in `elapsed`, in Gbit/s.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latency::from_samples(&mut s).unwrap();
        assert_eq!(l.p50_us.round(), 50.0);
        assert_eq!(l.p99_us.round(), 99.0);
        assert_eq!(l.max_us.round(), 100.0);
        assert!(Latency::from_samples(&mut []).is_none());
    }

    #[test]
    fn gbps_counts_bits() {
        assert_eq!(gbps(125_000_000, Duration::from_secs(1)), 1.0);
    }
}
