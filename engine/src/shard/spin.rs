//! How long a core polls before it sleeps: a bounded spin, only where an answer is
//! due soon.
//!
//! Waking a thread that sleeps costs a scheduler wakeup — on the 2-core VM where lu2k
//! is developed ~38 µs across cores, more than everything else a small message costs
//! on one hop. A core that just did work may therefore keep polling its rings and its
//! socket for a while (the budget, between `min` and `max`) before it arms the
//! doorbell and sleeps. A spin pays only where something it catches is due within
//! it; everywhere else it burns a CPU for nothing (a satellite receiver's datagrams
//! come farther apart than any useful spin, so a spin after each one is pure loss). So
//! the core spins only while it *awaits* something due soon:
//!
//! - **an answer from kshim**: the core handed kshim something (RX descriptors, TX
//!   completions) — kshim answers within microseconds;
//! - **an answer from a peer**: the core sent datagrams and the shortest round trip to
//!   its peers ([`Spin::set_net_rtt`]) fits in `max` (a LAN, loopback). On a
//!   satellite path (600 ms) no answer can come within any spin: the core sleeps at
//!   once after its sends, and the timer or the datagram that is next wakes it;
//! - **the next datagram of a dense stream**: arrivals nobody asked for, but so close
//!   together (their average gap within `min`) that the next one is due within the
//!   floor spin — a bulk transfer over loopback. A stream whose datagrams are further
//!   apart (one every 116 µs at 100 Mbit/s) is slept through.
//!
//! With nothing awaited the budget is zero: the core sleeps as soon as a pass finds no
//! work, until the next datagram, doorbell or timer — an idle peer costs no spin.
//!
//! The budget for answers adapts. Each quiet stretch `gap` (from the core's last work
//! to its next) is judged by what ended it:
//!
//! - an *answer* — an arrival (a datagram, kshim's rings) while the core awaited one —
//!   within `max`: if the spin missed it (`gap` > budget), the budget doubles, at least
//!   to `gap`, at most `max`; if the spin caught it, the budget stays;
//! - anything else after a quiet longer than `min` — an arrival nobody asked for, the
//!   core's own timer work (a paced send, an ACK timer), an answer later than `max` —
//!   halves the budget, down to `min`;
//! - a quiet of `min` or less changes nothing.
//!
//! A request/response exchange (an LNet ping over a LAN) so keeps both engines awake
//! between request and reply, while a core that streams data in or out falls back to
//! sleeping between datagrams. Send completions are neither: they are the kernel
//! releasing the core's own sends, so they end no answer's wait.
//!
//! While spinning the core gives the CPU away each pass (`sched_yield`, see
//! [`Spin::relax`]): kshim's threads, or the other engine on a shared machine, get
//! the CPU at once when they need it instead of waiting for the spinner's time slice
//! to end.
//!
//! The sleep itself can be cheaper too. A satellite receiver that sleeps between
//! datagrams would wake for each one, though nothing it does for a datagram is
//! due within a millisecond when its peers are hundreds of milliseconds away.
//! Where nothing is awaited and every peer is far ([`Spin::may_gather`]), the
//! core's sleep lets completions gather (config `gather_us`, see
//! [`crate::io::Gather`]): one wake-up per millisecond of datagrams, never
//! past the core's next timer.

use std::time::{Duration, Instant};

/// What one pass of a core's loop did, as far as the spin cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Something came from outside: a datagram, or work on kshim's rings (TX
    /// descriptors, returned buffers, the doorbell).
    pub arrived: bool,
    /// The core had work of its own: sends, send completions, received-data
    /// hand-offs, timer work.
    pub busy: bool,
    /// The core sent datagrams: a peer's answer may follow, one round trip later.
    pub sent: bool,
    /// The core handed something to kshim (RX descriptors, TX completions): kshim's
    /// answer may follow at once.
    pub handed: bool,
}

/// A core lets completions gather only where its nearest peer is this many
/// gathering times away (a round trip of 50 ms or more for 1 ms).
pub const GATHER_RTT_FACTOR: u32 = 50;

/// Weight of the newest gap in the average gap between arrivals (1/4).
const GAP_WEIGHT_SHIFT: u32 = 2;

/// Spin state of one core.
#[derive(Debug, Clone)]
pub struct Spin {
    min: Duration,
    max: Duration,
    cur: Duration,
    /// When the core last did work.
    last_work: Instant,
    /// The core handed kshim something since the last arrival.
    await_kshim: bool,
    /// The core sent datagrams since the last arrival.
    await_peer: bool,
    /// The shortest round trip to the core's peers; `None` while unknown (a peer's
    /// answer then counts as due soon).
    net_rtt: Option<Duration>,
    /// When the last arrival came.
    last_arrival: Option<Instant>,
    /// Average gap between arrivals (each gap counted at most `4 × max`, so that a
    /// stream after a long quiet is recognised within a few datagrams).
    arrival_gap: Duration,
}

impl Spin {
    /// Spins between `min` and `max` (`max` below `min` is raised to `min`); `now`
    /// counts as the core's last work.
    pub fn new(min: Duration, max: Duration, now: Instant) -> Spin {
        let max = max.max(min);
        Spin {
            min,
            max,
            cur: min,
            last_work: now,
            await_kshim: false,
            await_peer: false,
            net_rtt: None,
            last_arrival: None,
            arrival_gap: 4 * max,
        }
    }

    /// The budget for answers: how long to poll after the last work while one is
    /// awaited.
    pub fn budget(&self) -> Duration {
        self.cur
    }

    /// How long to poll after the last work now: the budget while an answer is
    /// awaited, `min` while a dense stream's next datagram is due within it, else
    /// nothing.
    pub fn target(&self) -> Duration {
        if self.awaiting() {
            self.cur
        } else if self.arrival_gap <= self.min && self.last_arrival.is_some() {
            self.min
        } else {
            Duration::ZERO
        }
    }

    /// Whether the core awaits an answer that can come within `max`.
    pub fn awaiting(&self) -> bool {
        self.await_kshim || (self.await_peer && self.net_rtt.is_none_or(|r| r <= self.max))
    }

    /// Whether a sleep may let completions gather for `within` before it wakes
    /// (see [`crate::io::Gather`]): only while nothing is awaited and the
    /// nearest measured peer is at least [`GATHER_RTT_FACTOR`] × `within` away,
    /// so the gathering delays what the core handles by a fiftieth of a round
    /// trip at most. With no peer measured yet they may be near: no gathering
    /// then. (A peer still measuring beside a measured far one does not count;
    /// its connection has measured within a round trip or two of traffic.)
    pub fn may_gather(&self, within: Duration) -> bool {
        !self.awaiting()
            && self
                .net_rtt
                .is_some_and(|r| r >= within * GATHER_RTT_FACTOR)
    }

    /// The shortest round trip to the core's peers (`None`: no peer measured).
    pub fn set_net_rtt(&mut self, rtt: Option<Duration>) {
        self.net_rtt = rtt;
    }

    /// When the core last did work (where the spin before a sleep starts).
    pub fn last_work(&self) -> Instant {
        self.last_work
    }

    /// Whether the core has been without work for all it should poll at `now`
    /// ([`Spin::target`]): time to sleep.
    pub fn spun_out(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_work) >= self.target()
    }

    /// Records one pass of the loop that ended at `now` (a pass that slept included).
    pub fn pass(&mut self, now: Instant, p: Pass) {
        if !(p.arrived || p.busy || p.sent || p.handed) {
            return;
        }
        let gap = now.saturating_duration_since(self.last_work);
        let answer = p.arrived && self.awaiting();
        if answer && gap <= self.max {
            // Caught (gap within the budget): as it should be. Missed: cover it.
            if gap > self.cur {
                self.cur = (self.cur * 2).max(gap).min(self.max);
            }
        } else if gap > self.min {
            self.cur = (self.cur / 2).max(self.min);
        }
        if p.arrived {
            if let Some(last) = self.last_arrival {
                let g = now.saturating_duration_since(last).min(4 * self.max);
                let keep = self.arrival_gap - self.arrival_gap / (1 << GAP_WEIGHT_SHIFT);
                self.arrival_gap = keep + g / (1 << GAP_WEIGHT_SHIFT);
            }
            self.last_arrival = Some(now);
            self.await_kshim = false;
            self.await_peer = false;
        }
        self.await_kshim |= p.handed;
        self.await_peer |= p.sent;
        self.last_work = now;
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

    const ARRIVAL: Pass = Pass {
        arrived: true,
        busy: false,
        sent: false,
        handed: false,
    };
    const SEND: Pass = Pass {
        arrived: false,
        busy: true,
        sent: true,
        handed: false,
    };
    const OWN: Pass = Pass {
        arrived: false,
        busy: true,
        sent: false,
        handed: false,
    };
    const ARRIVAL_ANSWERED: Pass = Pass {
        arrived: true,
        busy: true,
        sent: true,
        handed: false,
    };
    const HAND_OFF: Pass = Pass {
        arrived: false,
        busy: true,
        sent: false,
        handed: true,
    };

    /// A pass `after` the previous one.
    fn at(s: &mut Spin, t: &mut Instant, after: Duration, p: Pass) -> Duration {
        *t += after;
        s.pass(*t, p);
        s.budget()
    }

    fn spin() -> (Spin, Instant) {
        let t = Instant::now();
        (Spin::new(50 * US, 400 * US, t), t)
    }

    #[test]
    fn a_round_trip_grows_the_spin_to_cover_it_and_keeps_it() {
        let (mut s, mut t) = spin();
        assert_eq!(s.budget(), 50 * US);
        // Request out; its reply 120 µs later, missed by the spin: grow to cover.
        at(&mut s, &mut t, 5 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 120 * US, ARRIVAL), 120 * US);
        // Deliver it to kshim; kshim's next request 30 µs later is an answer the
        // spin caught (and within min): no change.
        at(&mut s, &mut t, 2 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 30 * US, ARRIVAL), 120 * US);
        // Request out, send completion 10 µs later (no answer, short: nothing), the
        // reply 110 µs after: caught by the 120 µs spin, which stays.
        at(&mut s, &mut t, 1 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 10 * US, OWN), 120 * US);
        assert_eq!(at(&mut s, &mut t, 110 * US, ARRIVAL), 120 * US);
        // A slower round trip: 200 µs missed, doubles to 240, then 350 µs to 480 →
        // capped at max.
        at(&mut s, &mut t, 1 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 200 * US, ARRIVAL), 240 * US);
        at(&mut s, &mut t, 1 * US, SEND);
        assert_eq!(
            at(&mut s, &mut t, 350 * US, ARRIVAL),
            400 * US,
            "never above max"
        );
        for _ in 0..100 {
            at(&mut s, &mut t, 1 * US, SEND);
            at(&mut s, &mut t, 300 * US, ARRIVAL);
        }
        assert_eq!(s.budget(), 400 * US);
    }

    #[test]
    fn a_steady_inbound_stream_falls_back_to_min() {
        let (mut s, mut t) = spin();
        // Grown by round trips first.
        for gap in [200, 400] {
            at(&mut s, &mut t, 1 * US, SEND);
            at(&mut s, &mut t, gap * US, ARRIVAL);
        }
        assert_eq!(s.budget(), 400 * US);
        // 100 Mbit/s of data in: a datagram every 116 µs, caught by the spin but
        // unasked: halves each time, down to min.
        let seen: Vec<u64> = (0..4)
            .map(|_| at(&mut s, &mut t, 116 * US, ARRIVAL).as_micros() as u64)
            .collect();
        assert_eq!(seen, [200, 100, 50, 50]);
        // A light ACK every 64 datagrams: the datagram after it counts as an answer
        // (one step up), the next unasked one takes it back down.
        for _ in 0..10 {
            for _ in 0..63 {
                at(&mut s, &mut t, 116 * US, ARRIVAL);
            }
            let b = at(&mut s, &mut t, 116 * US, ARRIVAL_ANSWERED);
            assert_eq!(b, 50 * US);
            assert_eq!(at(&mut s, &mut t, 116 * US, ARRIVAL), 116 * US);
        }
        assert_eq!(at(&mut s, &mut t, 116 * US, ARRIVAL), 58 * US);
        assert_eq!(
            at(&mut s, &mut t, 116 * US, ARRIVAL),
            50 * US,
            "never below min"
        );
    }

    #[test]
    fn a_paced_sender_falls_back_to_min_and_acks_do_not_hold_it_up() {
        let (mut s, mut t) = spin();
        for gap in [200, 400] {
            at(&mut s, &mut t, 1 * US, SEND);
            at(&mut s, &mut t, gap * US, ARRIVAL);
        }
        assert_eq!(s.budget(), 400 * US);
        // Paced sends every 116 µs, each with its send completion 5 µs later.
        let mut budgets = Vec::new();
        for i in 0..200 {
            at(&mut s, &mut t, 111 * US, SEND);
            at(&mut s, &mut t, 5 * US, OWN);
            if i % 64 == 63 {
                // An ACK from the receiver: an answer (the core sent data).
                at(&mut s, &mut t, 60 * US, ARRIVAL);
            }
            budgets.push(s.budget());
        }
        assert_eq!(budgets[2], 50 * US);
        assert!(budgets[3..].iter().all(|b| *b <= 120 * US), "{budgets:?}");
        assert_eq!(*budgets.last().unwrap(), 50 * US);
    }

    #[test]
    fn quiet_up_to_min_changes_nothing_and_late_answers_shrink() {
        let (mut s, mut t) = spin();
        at(&mut s, &mut t, 1 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 300 * US, ARRIVAL), 300 * US);
        // Unasked, own and timer work within min: no change, however often.
        for _ in 0..10 {
            at(&mut s, &mut t, 50 * US, ARRIVAL);
            at(&mut s, &mut t, 20 * US, OWN);
        }
        assert_eq!(s.budget(), 300 * US);
        // An answer after more than max: spinning would not have caught it.
        at(&mut s, &mut t, 1 * US, SEND);
        assert_eq!(at(&mut s, &mut t, 5 * ms(), ARRIVAL), 150 * US);
        // The core's own timer work after a long quiet (an ACK timer): halves.
        assert_eq!(at(&mut s, &mut t, 10 * ms(), SEND), 75 * US);
        assert_eq!(at(&mut s, &mut t, 10 * ms(), OWN), 50 * US);
        assert_eq!(at(&mut s, &mut t, 10 * ms(), OWN), 50 * US);
    }

    #[test]
    fn spun_out_counts_from_the_last_work() {
        let (mut s, mut t) = spin();
        // Nothing awaited: no spin at all.
        assert!(s.spun_out(t));
        // A request out (round trip unknown): the budget, from the last work.
        at(&mut s, &mut t, 1 * US, SEND);
        assert!(!s.spun_out(t + 49 * US));
        assert!(s.spun_out(t + 50 * US));
        // A pass without work does not restart the spin.
        at(&mut s, &mut t, 30 * US, Pass::default());
        assert!(s.spun_out(t + 20 * US));
        at(&mut s, &mut t, 1 * US, OWN);
        assert!(!s.spun_out(t + 20 * US));
    }

    #[test]
    fn no_spin_for_answers_a_long_path_cannot_bring() {
        let (mut s, mut t) = spin();
        s.set_net_rtt(Some(600 * ms()));
        // A GEO sender: a burst per millisecond, ACKs now and then. It sleeps as
        // soon as its burst is out; an ACK is no answer the spin could have caught.
        for i in 0..100 {
            at(&mut s, &mut t, 1000 * US, SEND);
            assert_eq!(s.target(), Duration::ZERO, "burst {i}");
            assert!(s.spun_out(t));
            if i % 10 == 9 {
                at(&mut s, &mut t, 300 * US, ARRIVAL);
                assert_eq!(s.target(), Duration::ZERO);
            }
        }
        assert_eq!(s.budget(), 50 * US);
        // The same core on a LAN peer: a send is followed by a spin.
        s.set_net_rtt(Some(80 * US));
        at(&mut s, &mut t, 1000 * US, SEND);
        assert_eq!(s.target(), 50 * US);
        assert!(!s.spun_out(t + 10 * US));
    }

    #[test]
    fn a_sparse_stream_is_slept_through_and_a_dense_one_spun_for() {
        let (mut s, mut t) = spin();
        s.set_net_rtt(Some(600 * ms()));
        // 100 Mbit/s in: a datagram every 116 µs, a light ACK out every 64.
        for i in 0..640 {
            at(&mut s, &mut t, 116 * US, ARRIVAL);
            if i % 64 == 63 {
                at(&mut s, &mut t, 2 * US, SEND);
            }
            assert_eq!(s.target(), Duration::ZERO, "datagram {i}");
        }
        // Loopback bulk: batches every 10 µs. Within a few the floor spin is on.
        let mut on = None;
        for i in 0..20 {
            at(&mut s, &mut t, 10 * US, ARRIVAL);
            if on.is_none() && s.target() == 50 * US {
                on = Some(i);
            }
        }
        assert!(on.is_some_and(|i| i < 12), "{on:?}");
        assert_eq!(s.target(), 50 * US);
        // The stream stops: after a long quiet, sparse again.
        at(&mut s, &mut t, 10 * ms(), ARRIVAL);
        at(&mut s, &mut t, 10 * ms(), ARRIVAL);
        assert_eq!(s.target(), Duration::ZERO);
    }

    #[test]
    fn a_hand_off_to_kshim_is_spun_for_on_any_path() {
        let (mut s, mut t) = spin();
        s.set_net_rtt(Some(600 * ms()));
        at(&mut s, &mut t, 5 * US, HAND_OFF);
        assert_eq!(s.target(), 50 * US);
        // kshim's next request 120 µs later: missed, the budget grows to cover it.
        assert_eq!(at(&mut s, &mut t, 120 * US, ARRIVAL), 120 * US);
        // That request goes out to the far peer: nothing to spin for.
        at(&mut s, &mut t, 2 * US, SEND);
        assert_eq!(s.target(), Duration::ZERO);
    }

    #[test]
    fn zero_min_and_max_below_min() {
        let t = Instant::now();
        let mut s = Spin::new(Duration::ZERO, 100 * US, t);
        let mut t2 = t;
        assert_eq!(s.budget(), Duration::ZERO);
        assert!(s.spun_out(t));
        at(&mut s, &mut t2, 1 * US, SEND);
        assert_eq!(at(&mut s, &mut t2, 30 * US, ARRIVAL), 30 * US);
        assert_eq!(at(&mut s, &mut t2, 40 * US, ARRIVAL), 15 * US);
        // max below min is raised to min.
        assert_eq!(Spin::new(100 * US, 10 * US, t).budget(), 100 * US);
    }

    #[test]
    fn only_a_core_whose_peers_are_all_far_gathers() {
        let (mut s, mut t) = spin();
        let within = ms();
        // No peer measured yet: it may be near.
        assert!(!s.may_gather(within));
        // A satellite receiver between datagrams: gathers.
        s.set_net_rtt(Some(600 * ms()));
        at(&mut s, &mut t, 116 * US, ARRIVAL);
        assert!(s.may_gather(within));
        // Not with kshim's answer awaited (the spin's, then the doorbell's).
        at(&mut s, &mut t, 5 * US, HAND_OFF);
        assert!(!s.may_gather(within));
        at(&mut s, &mut t, 5 * US, ARRIVAL);
        assert!(s.may_gather(within));
        // 50 ms away is the nearest a millisecond's gathering allows.
        s.set_net_rtt(Some(50 * ms()));
        assert!(s.may_gather(within));
        s.set_net_rtt(Some(49 * ms()));
        assert!(!s.may_gather(within));
        // A LAN peer beside the satellite ones: no gathering, and the send spins.
        s.set_net_rtt(Some(200 * US));
        at(&mut s, &mut t, 5 * US, SEND);
        assert!(!s.may_gather(within));
    }

    fn ms() -> Duration {
        Duration::from_millis(1)
    }
}
