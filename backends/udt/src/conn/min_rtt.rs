//! The path's minimum RTT, over a window of time, so that it follows a path
//! that gets longer (a reroute, a satellite handover, a terrestrial link
//! replaced by a GEO hop) instead of keeping the shortest RTT ever seen.
//!
//! The controller sizes its window from the minimum (`6 × R × min_rtt + 32`)
//! and reads queueing delay against it: a minimum stuck at 1 ms under a
//! 600 ms path holds the window near its 32-packet floor for good.
//!
//! The rule: the least sample (ours, and the receiver's reports), until
//! every sample of the last [`WINDOW_US`] (10 s, as BBR's `min_rtt` filter;
//! kept in two buckets of half that, so it spans 5 to 10 s), less the most
//! of it that could be our own queue, stands above `1.25 × min + 5 ms` —
//! the controller's own test for "a queue stands" (`cc::satellite`). Our own
//! queue is at most the packets in flight at the link's capacity (packet
//! pairs): on a short, slow path the controller's 32-packet window floor
//! keeps a standing queue of its own (48 ms at 8 Mbit/s), and that must not
//! become the minimum, or the next window grows by it and the queue with it.
//! After a step to a long path the window is still sized for the short one,
//! so the samples stand far above what it can queue. Then the least sample
//! of the newer bucket replaces the minimum (the older may hold samples
//! taken while the path changed, half old and half new). While the path
//! stays as it is, the minimum is the least sample ever: a windowed minimum
//! alone drifts up with the jitter and losses of each 10 s, and the window
//! the controller sizes from it would grow with every such drift.
//!
//! Why time and not rounds: on a lossy GEO path the sender's samples stop
//! while the receiver waits for holes (only an ACK that advances gives one,
//! and none that advances over a retransmission: its sample holds the wait),
//! and ten rounds of a 2 ms path would be 20 ms, short enough for a brief
//! standing queue to become the minimum. Why no low-inflight probe, as BBR
//! has: the queue bound does its work while the window is still sized for
//! the short path, which is when a step up must be seen; once the window
//! fits the long path, our own queue and a longer path look the same without
//! draining the flight, and the minimum stays (any shorter sample lowers it
//! at once). That is also its limit: after a step back to a short path the
//! minimum is the first short sample, which may still hold some of the queue
//! built on the long path. A bucket with no sample (an outage, a quiet
//! connection) does not expire the minimum: only newer samples replace it.

use crate::estimate::Time;

/// The window of samples that must all stand above the minimum for it to
/// be replaced, µs (two buckets of half of it: 5 to 10 s of samples).
pub(super) const WINDOW_US: Time = 10_000_000;

/// The window's samples, less their queue bounds, must all stand above
/// `STEP_FACTOR × min + STEP_MARGIN_US` (the satellite controller's
/// threshold for a standing queue) for the minimum to be replaced.
const STEP_FACTOR: f64 = 1.25;
const STEP_MARGIN_US: f64 = 5_000.0;

/// The minimum RTT (µs): the least sample or report, replaced by the least
/// sample of the last 5 to 10 s once no sample of that window can be
/// explained by the old minimum and our own queue; `u32::MAX` before any.
#[derive(Debug, Clone)]
pub(super) struct MinRtt {
    /// The minimum in use.
    min: u32,
    cur_start: Time,
    /// Least sample since `cur_start`, and the least of those samples less
    /// their queue bounds (`u32::MAX`: none yet).
    cur: (u32, u32),
    /// The same for the bucket before.
    prev: (u32, u32),
}

impl MinRtt {
    pub(super) fn new() -> MinRtt {
        MinRtt {
            min: u32::MAX,
            cur_start: 0,
            cur: (u32::MAX, u32::MAX),
            prev: (u32::MAX, u32::MAX),
        }
    }

    /// The minimum RTT, `u32::MAX` if nothing came yet.
    pub(super) fn get(&self) -> u32 {
        self.min
    }

    /// A smoothed RTT the receiver reported: it may lower the minimum, and
    /// is no evidence that the path got longer.
    pub(super) fn on_report(&mut self, rtt: u32) {
        self.min = self.min.min(rtt);
    }

    /// Feeds one raw sample taken at `now`, of which at most `queue_bound`
    /// µs may be queueing behind our own packets.
    pub(super) fn on_sample(&mut self, now: Time, sample: u32, queue_bound: u32) {
        self.min = self.min.min(sample);
        let s = (sample, sample.saturating_sub(queue_bound));
        if self.cur.0 == u32::MAX {
            self.cur = s;
            self.cur_start = now;
            return;
        }
        if now.saturating_sub(self.cur_start) >= WINDOW_US / 2 {
            self.prev = self.cur;
            self.cur = s;
            self.cur_start = now;
        } else {
            self.cur = (self.cur.0.min(s.0), self.cur.1.min(s.1));
        }
        // Only once a whole bucket lies behind does the window span 5 s.
        if self.prev.0 != u32::MAX {
            let floor = self.cur.1.min(self.prev.1);
            if f64::from(floor) > STEP_FACTOR * f64::from(self.min) + STEP_MARGIN_US {
                // The newer bucket only: the older may hold the samples
                // of the change itself (packets that crossed the old path
                // one way and the new one back). A newer sample below this
                // lowers it at once.
                self.min = self.cur.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MinRtt {
        /// A sample with no queue of ours behind it.
        fn on_sample_(&mut self, now: Time, sample: u32) {
            self.on_sample(now, sample, 0);
        }
    }

    #[test]
    fn a_queue_of_our_own_does_not_become_the_minimum() {
        let mut m = MinRtt::new();
        m.on_sample(0, 2_000, 0);
        let mut t = 0;
        // 46 ms for 20 s, 50 ms of it possibly our own queue.
        while t < 20_000_000 {
            m.on_sample(t, 46_000, 50_000);
            t += 10_000;
        }
        assert_eq!(m.get(), 2_000);
        // The same RTT with a window far too small to queue that long.
        while t < 40_000_000 {
            m.on_sample(t, 46_000, 1_000);
            t += 10_000;
        }
        assert_eq!(m.get(), 46_000);
        // Reports lower it, never raise it.
        m.on_report(40_000);
        m.on_report(90_000);
        assert_eq!(m.get(), 40_000);
    }

    #[test]
    fn keeps_the_least_sample_within_the_window() {
        let mut m = MinRtt::new();
        assert_eq!(m.get(), u32::MAX);
        m.on_sample_(0, 2_000);
        m.on_sample_(1_000_000, 5_000);
        m.on_sample_(4_000_000, 1_500);
        assert_eq!(m.get(), 1_500);
        // Into the next bucket: the old minimum still counts.
        m.on_sample_(6_000_000, 600_000);
        assert_eq!(m.get(), 1_500);
        // Jitter above the minimum in a later window leaves it alone.
        m.on_sample_(12_000_000, 1_800);
        m.on_sample_(18_000_000, 1_900);
        m.on_sample_(24_000_000, 2_000);
        assert_eq!(m.get(), 1_500);
    }

    #[test]
    fn follows_a_path_that_gets_longer_within_ten_seconds() {
        let mut m = MinRtt::new();
        let mut t = 0;
        while t < 20_000_000 {
            m.on_sample_(t, 2_000);
            t += 100_000;
        }
        assert_eq!(m.get(), 2_000);
        let step = t;
        while m.get() != 600_000 {
            m.on_sample_(t, 600_000);
            t += 100_000;
            assert!(
                t - step <= WINDOW_US + 200_000,
                "minimum stuck at {}",
                m.get()
            );
        }
        // And back: a shorter sample counts at once.
        m.on_sample_(t, 2_000);
        assert_eq!(m.get(), 2_000);
    }

    #[test]
    fn no_samples_do_not_expire_the_minimum() {
        let mut m = MinRtt::new();
        m.on_sample_(0, 600_000);
        m.on_sample_(60_000_000, 900_000);
        assert_eq!(m.get(), 600_000);
        // 60 s without samples: a minimum that expired by time alone would
        // take this second sample, taken before a bucket could close.
        m.on_sample_(63_000_000, 900_000);
        assert_eq!(m.get(), 600_000);
    }
}
