//! How long a core polls before it sleeps: an adaptive, bounded spin.
//!
//! Waking a thread that sleeps costs a scheduler wakeup — on the 2-core VM where lu2k
//! is developed ~38 µs across cores, more than everything else a small message costs
//! on one hop. A core that just did work therefore keeps polling its rings and its
//! socket for a while before it arms the doorbell and sleeps. How long adapts to the
//! traffic, like the kernel's haltpoll governor:
//!
//! - woken by work within `max` of falling asleep: a longer spin would have caught
//!   it awake, so the spin doubles (at least to cover that sleep), up to `max`;
//! - woken by work later than `max`, or by a timer only (nothing to do): the spin
//!   halves, down to `min`.
//!
//! A request/response exchange (an LNet ping: request out, reply back a round trip
//! later) grows the spin to cover the round trip, so neither the TX nor the RX side
//! of a core sleeps between them; an idle core wakes only for timers, each of which
//! halves the spin, so idle it spins `min` after a timer at most.
//!
//! While spinning the core gives the CPU away each pass (`sched_yield`, see
//! [`Spin::relax`]): kshim's threads, or the other engine on a shared machine, get
//! the CPU at once when they need it instead of waiting for the spinner's time slice
//! to end.

use std::time::{Duration, Instant};

/// Spin state of one core.
#[derive(Debug, Clone)]
pub struct Spin {
    min: Duration,
    max: Duration,
    cur: Duration,
    asleep_since: Option<Instant>,
}

impl Spin {
    /// Spins between `min` and `max` (`max` below `min` is raised to `min`).
    pub fn new(min: Duration, max: Duration) -> Spin {
        Spin {
            min,
            max: max.max(min),
            cur: min,
            asleep_since: None,
        }
    }

    /// How long to poll after the last work before sleeping.
    pub fn budget(&self) -> Duration {
        self.cur
    }

    /// The core goes to sleep now.
    pub fn sleep(&mut self, now: Instant) {
        self.asleep_since = Some(now);
    }

    /// The core woke at `now` (after [`Spin::sleep`]); `work` says whether it found
    /// something to do (a datagram, a doorbell, a completion — not only a timer).
    pub fn woke(&mut self, now: Instant, work: bool) {
        let Some(since) = self.asleep_since.take() else {
            return;
        };
        let slept = now.saturating_duration_since(since);
        if work && slept <= self.max {
            self.cur = (self.cur * 2).max(self.cur + slept).min(self.max);
        } else {
            self.cur = (self.cur / 2).max(self.min);
        }
    }

    /// One spinning pass found nothing: let any other runnable thread have the CPU.
    pub fn relax(&self) {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn cycle(s: &mut Spin, t: &mut Instant, slept: Duration, work: bool) {
        s.sleep(*t);
        *t += slept;
        s.woke(*t, work);
    }

    #[test]
    fn grows_to_cover_a_round_trip_and_stays_bounded() {
        let mut s = Spin::new(50 * US, 400 * US);
        let mut t = Instant::now();
        assert_eq!(s.budget(), 50 * US);
        // Work 120 µs after sleeping: the spin covers the sleep plus what it was.
        cycle(&mut s, &mut t, 120 * US, true);
        assert_eq!(s.budget(), 170 * US);
        cycle(&mut s, &mut t, 120 * US, true);
        assert_eq!(s.budget(), 340 * US);
        for _ in 0..10 {
            cycle(&mut s, &mut t, 300 * US, true);
        }
        assert_eq!(s.budget(), 400 * US, "never above max");
    }

    #[test]
    fn shrinks_on_timers_and_long_sleeps_down_to_min() {
        let mut s = Spin::new(50 * US, 400 * US);
        let mut t = Instant::now();
        for _ in 0..4 {
            cycle(&mut s, &mut t, 10 * US, true);
        }
        assert_eq!(s.budget(), 400 * US);
        // A timer with nothing to do, however soon, halves it.
        cycle(&mut s, &mut t, 10 * US, false);
        assert_eq!(s.budget(), 200 * US);
        // Work after a long sleep: spinning would not have caught it.
        cycle(&mut s, &mut t, Duration::from_millis(5), true);
        assert_eq!(s.budget(), 100 * US);
        for _ in 0..10 {
            cycle(&mut s, &mut t, Duration::from_millis(200), false);
        }
        assert_eq!(s.budget(), 50 * US, "never below min");
    }

    #[test]
    fn zero_min_and_a_wake_without_sleep() {
        let mut s = Spin::new(Duration::ZERO, 100 * US);
        let mut t = Instant::now();
        assert_eq!(s.budget(), Duration::ZERO);
        // No sleep recorded: nothing changes.
        s.woke(t, true);
        assert_eq!(s.budget(), Duration::ZERO);
        cycle(&mut s, &mut t, 30 * US, true);
        assert_eq!(s.budget(), 30 * US);
        // max below min is raised to min.
        assert_eq!(Spin::new(100 * US, 10 * US).budget(), 100 * US);
    }
}
