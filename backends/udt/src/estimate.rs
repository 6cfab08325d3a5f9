//! Path estimators: round-trip time, receiver arrival rate and link capacity.
//!
//! These are the three measurements UDT feeds its congestion control with
//! (draft-gg-udt §6.1–6.3, UDT4 `window.cpp` / `core.cpp`):
//!
//! - [`Rtt`]: smoothed RTT and its variance from ACK/ACK2 round trips, using
//!   UDT's EWMA `rttvar = (3·rttvar + |s − rtt|) / 4`, `rtt = (7·rtt + s) / 8`.
//!   Unlike UDT4 (which starts from a guess of 100 ms and converges slowly),
//!   the first real sample replaces the guess; this matters at 600 ms RTT where
//!   the EWMA would otherwise need a dozen samples before the EXP timer is sane.
//!   The minimum RTT seen is kept too (model-based controllers need it).
//! - [`ArrivalRate`]: the receiver's packet arrival speed. UDT4 takes the
//!   median-filtered mean of the last 16 inter-arrival intervals; on a real
//!   host those 16 intervals span under 2 ms at 100 Mbit/s, and any burst
//!   (a router, an emulator or an interrupt catching up) reads as a rate of
//!   many times the link. Here a sample is the new packets received over a
//!   span of at least 16 ms and 16 packets, so bursts average out;
//!   retransmissions do not count, and a silence of 50 ms (the sender
//!   paused) starts a new span. Packets lost on the way do not count either:
//!   a bottleneck that overflows drops what it cannot carry, and only what
//!   arrives measures it (the sequence numbers' advance would measure what
//!   was offered). The sender, which knows the path's random loss, scales
//!   the sample up by it.
//! - [`Capacity`]: link capacity from packet pairs (UDT's `getBandwidth`): the
//!   receiver records the gap between the two packets of a probe pair (sequence
//!   numbers ≡ 0 and ≡ 1 mod 16, sent back to back) in a window of 64 and
//!   reports the median-filtered mean; a pair whose second packet the sender
//!   held back (its send timestamp later by more than 10 µs and by half the
//!   arrival gap or more) is not counted. UDT4 pre-fills that window with
//!   1 ms gaps, so it needs more than 32 real pairs (500+ packets) before the
//!   estimate moves; here only real samples count, so the first pair already
//!   gives an estimate — this is what makes a fast start possible.
//!
//! All times are microseconds on the caller's clock; nothing here reads a clock.

/// Microseconds on the caller's (possibly virtual) clock.
pub type Time = u64;

/// UDT4's initial RTT guess before any sample (`10 × SYN` = 100 ms).
pub const INITIAL_RTT_US: u32 = 100_000;

/// Smoothed round-trip time and variance (UDT EWMA), plus the minimum seen.
#[derive(Debug, Clone)]
pub struct Rtt {
    rtt: u32,
    var: u32,
    min: u32,
    samples: u64,
}

impl Default for Rtt {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtt {
    /// Starts from UDT4's guess: 100 ms, variance 50 ms.
    pub fn new() -> Self {
        Rtt {
            rtt: INITIAL_RTT_US,
            var: INITIAL_RTT_US / 2,
            min: u32::MAX,
            samples: 0,
        }
    }

    /// Feeds one RTT sample in microseconds (ACK→ACK2 round trip, or the
    /// RTT the peer reports in a full ACK). Zero or negative samples are
    /// ignored, as UDT4 does.
    pub fn on_sample(&mut self, sample_us: u32) {
        if sample_us == 0 {
            return;
        }
        if self.samples == 0 {
            self.rtt = sample_us;
            self.var = sample_us / 2;
        } else {
            let diff = sample_us.abs_diff(self.rtt);
            self.var = ((u64::from(self.var) * 3 + u64::from(diff)) >> 2) as u32;
            self.rtt = ((u64::from(self.rtt) * 7 + u64::from(sample_us)) >> 3) as u32;
        }
        self.min = self.min.min(sample_us);
        self.samples += 1;
    }

    /// Smoothed RTT, microseconds.
    pub fn rtt(&self) -> u32 {
        self.rtt
    }

    /// RTT variance (mean deviation), microseconds.
    pub fn var(&self) -> u32 {
        self.var
    }

    /// Minimum RTT sample seen, or the smoothed RTT before any sample.
    pub fn min(&self) -> u32 {
        if self.samples == 0 {
            self.rtt
        } else {
            self.min
        }
    }

    /// Number of samples fed so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// Median filter shared by both rate windows: the mean of the values within
/// (median/8, median·8). Returns `(sum, count)` of the kept values.
fn median_filtered(values: &[u32], scratch: &mut [u32]) -> (u64, usize, u32) {
    let scratch = &mut scratch[..values.len()];
    scratch.copy_from_slice(values);
    let mid = values.len() / 2;
    let (_, median, _) = scratch.select_nth_unstable(mid);
    let median = *median;
    let upper = median.saturating_mul(8);
    let lower = median / 8;
    let mut sum = 0u64;
    let mut count = 0usize;
    for &v in values {
        if v < upper && v > lower {
            sum += u64::from(v);
            count += 1;
        }
    }
    (sum, count, median)
}

/// Shortest span an arrival-rate sample covers.
pub const ARRIVAL_SPAN_US: Time = 16_000;
/// Fewest packets an arrival-rate sample covers.
pub const ARRIVAL_MIN_PACKETS: u32 = 16;
/// A silence this long ends a span without a sample (the sender paused).
const ARRIVAL_IDLE_US: Time = 50_000;

/// Receiver-side packet arrival rate: new packets received per second over
/// spans of at least 16 ms and 16 packets.
#[derive(Debug, Clone)]
pub struct ArrivalRate {
    /// Start of the current span: (time, packets received until then).
    start: Option<(Time, u32)>,
    /// The latest new packet: (arrival, sequence number).
    last: (Time, u32),
    /// New packets received (wrapping).
    received: u32,
    rate: u32,
}

impl Default for ArrivalRate {
    fn default() -> Self {
        Self::new()
    }
}

impl ArrivalRate {
    /// No sample yet.
    pub fn new() -> Self {
        ArrivalRate {
            start: None,
            last: (0, 0),
            received: 0,
            rate: 0,
        }
    }

    /// Records the arrival of data packet `seq` (31-bit) at `now`. Only a
    /// packet beyond the highest seen counts: retransmissions, reordered and
    /// duplicate packets are left out, and so are packets lost on the way.
    pub fn on_arrival(&mut self, now: Time, seq: u32) {
        let Some((t0, n0)) = self.start else {
            self.start = Some((now, self.received));
            self.last = (now, seq);
            return;
        };
        let (t_last, s_last) = self.last;
        let d = seq.wrapping_sub(s_last) & 0x7FFF_FFFF;
        if d == 0 || d >= 0x4000_0000 {
            return;
        }
        self.last = (now, seq);
        self.received = self.received.wrapping_add(1);
        if now.saturating_sub(t_last) >= ARRIVAL_IDLE_US {
            // A pause is the sender's, not the path's: start over.
            self.start = Some((now, self.received));
            return;
        }
        let span = now.saturating_sub(t0);
        let received = self.received.wrapping_sub(n0);
        if span >= ARRIVAL_SPAN_US && received >= ARRIVAL_MIN_PACKETS {
            self.rate = (u64::from(received) * 1_000_000 / span).min(u64::from(u32::MAX)) as u32;
            self.start = Some((now, self.received));
        }
    }

    /// Packets per second over the latest complete span, 0 before one.
    pub fn rate(&self) -> u32 {
        self.rate
    }
}

const PROBE_WINDOW: usize = 64;
/// Send-time gap within which two packets count as sent back to back
/// whatever their arrival gap (a sender stamping each packet with its own
/// clock read puts a few microseconds between them).
pub const PAIR_SEND_SLACK_US: u32 = 10;
/// Pair gaps are kept in ticks of 1/8 µs. Times are whole microseconds, so a
/// pair that arrives within one microsecond (on loopback, or in one GRO
/// batch, whose datagrams share one receive time) has a measured gap of 0;
/// it counts as one tick, so the estimate tops out at 8 million packets/s
/// (~93 Gbit/s of 1456-byte payloads). Counted as a whole microsecond, it
/// would cap the estimate, and so the pacing rate, at 1 million packets/s
/// (11.6 Gbit/s). The value stays well inside UDT4's `int` arithmetic.
const PAIR_TICKS: u64 = 8;

/// Link capacity from packet pairs, median-filtered over the last 64 pairs.
#[derive(Debug, Clone)]
pub struct Capacity {
    gaps: [u32; PROBE_WINDOW],
    next: usize,
    filled: usize,
    /// The first packet of the current pair: (arrival, seq, sender's timestamp).
    probe1: Option<(Time, u32, u32)>,
}

impl Default for Capacity {
    fn default() -> Self {
        Self::new()
    }
}

impl Capacity {
    /// An empty window.
    pub fn new() -> Self {
        Capacity {
            gaps: [0; PROBE_WINDOW],
            next: 0,
            filled: 0,
            probe1: None,
        }
    }

    /// Records the arrival of data packet `seq` (31-bit) at `now`, `sent`
    /// being the sender's timestamp in its header (µs, wrapping); the pairs
    /// are `seq ≡ 0 (mod 16)` followed directly by `seq + 1`.
    ///
    /// A pair whose second packet left the sender late is not a pair: the
    /// sender's window, its pacing or the application (a message ending on
    /// the probe) held it back, and the gap at the receiver measures that,
    /// not the link — a first pair split by a full window of 64 packets at
    /// 200 ms would read 5 packets/s, and a fast start would pace at it. The
    /// pair counts only if the gap between the packets' send times is at most
    /// [`PAIR_SEND_SLACK_US`] or under half the gap they arrived with.
    pub fn on_arrival(&mut self, now: Time, seq: u32, sent: u32) {
        match seq & 0xF {
            0 => self.probe1 = Some((now, seq, sent)),
            1 => {
                if let Some((t1, s1, sent1)) = self.probe1.take() {
                    if s1.wrapping_add(1) & 0x7FFF_FFFF == seq {
                        // In ticks of 1/PAIR_TICKS µs; a pair that arrived within
                        // the same microsecond counts as one tick.
                        let gap = now
                            .saturating_sub(t1)
                            .saturating_mul(PAIR_TICKS)
                            .clamp(1, u64::from(u32::MAX)) as u32;
                        let sent_gap = sent.wrapping_sub(sent1);
                        // A negative send gap (a retransmitted probe) is no pair either.
                        let together = sent_gap <= PAIR_SEND_SLACK_US
                            || (sent_gap < 1 << 31
                                && u64::from(sent_gap) * 2 * PAIR_TICKS < u64::from(gap));
                        if together {
                            self.gaps[self.next] = gap;
                            self.next = (self.next + 1) % PROBE_WINDOW;
                            self.filled = (self.filled + 1).min(PROBE_WINDOW);
                        }
                    }
                }
            }
            _ => self.probe1 = None,
        }
    }

    /// Estimated capacity in packets per second, 0 before the first pair.
    pub fn rate(&self) -> u32 {
        if self.filled == 0 {
            return 0;
        }
        let values = &self.gaps[..self.filled];
        let mut scratch = [0u32; PROBE_WINDOW];
        let (sum, count, median) = median_filtered(values, &mut scratch);
        // UDT counts the median once more, so the mean never lacks a value.
        let sum = sum + u64::from(median);
        let count = count + 1;
        (PAIR_TICKS as f64 * 1_000_000.0 / (sum as f64 / count as f64)).ceil() as u32
    }

    /// Number of pairs recorded (at most 64).
    pub fn samples(&self) -> usize {
        self.filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_first_sample_replaces_guess_then_ewma() {
        let mut r = Rtt::new();
        assert_eq!(r.rtt(), 100_000);
        r.on_sample(600_000);
        assert_eq!((r.rtt(), r.var()), (600_000, 300_000));
        r.on_sample(680_000);
        // var = (3*300000 + 80000)/4 = 245000; rtt = (7*600000 + 680000)/8 = 610000
        assert_eq!((r.rtt(), r.var()), (610_000, 245_000));
        assert_eq!(r.min(), 600_000);
        r.on_sample(0);
        assert_eq!(r.samples(), 2);
    }

    #[test]
    fn arrival_rate_over_spans_counts_what_arrived_not_bursts() {
        let mut a = ArrivalRate::new();
        let (mut t, mut seq) = (0, 0);
        // 100 us per packet: no sample until 16 ms have passed.
        for _ in 0..160 {
            a.on_arrival(t, seq);
            t += 100;
            seq += 1;
        }
        assert_eq!(a.rate(), 0, "15.9 ms is not a span yet");
        a.on_arrival(t, seq);
        assert_eq!(a.rate(), 10_000);
        // Bursts: 10 packets back to back every millisecond. Per-interval
        // medians would read ~1 M packets/s; the span reads the mean.
        for _ in 0..20 {
            t += 1000;
            for _ in 0..10 {
                seq += 1;
                a.on_arrival(t, seq);
            }
        }
        // A span ends inside a burst: within a burst's worth of the mean.
        assert!((9_000..=11_000).contains(&a.rate()), "{}", a.rate());
        // A retransmission (old seq) does not count, nor do lost packets:
        // seq advancing by 2 every 200 us is 5 000 packets/s received (the
        // bottleneck may have dropped the others; the sender scales up by
        // the random loss it knows).
        a.on_arrival(t + 1, 3);
        for _ in 0..200 {
            t += 200;
            seq += 2;
            a.on_arrival(t, seq);
        }
        assert!((4_500..=5_500).contains(&a.rate()), "{}", a.rate());
        // A pause is not a sample: after a 1 s silence the next span starts
        // afresh, and 1 ms per packet reads 1000 packets/s.
        t += 1_000_000;
        for _ in 0..40 {
            seq += 1;
            a.on_arrival(t, seq);
            t += 1000;
        }
        assert_eq!(a.rate(), 1000);
    }

    #[test]
    fn capacity_from_pairs_median_filtered() {
        let mut c = Capacity::new();
        assert_eq!(c.rate(), 0);
        // seq 16/17 arrive 120 us apart: ~8334 packets/s.
        c.on_arrival(1000, 16, 0);
        c.on_arrival(1120, 17, 0);
        assert_eq!(c.rate(), 8334);
        // A pair broken by a loss (16 then 18) is not a sample.
        c.on_arrival(5000, 32, 0);
        c.on_arrival(9000, 34, 0);
        c.on_arrival(9100, 33, 0);
        assert_eq!(c.samples(), 1);
        // A wild outlier is filtered.
        c.on_arrival(10_000, 48, 0);
        c.on_arrival(10_120, 49, 0);
        c.on_arrival(20_000, 64, 0);
        c.on_arrival(30_000, 65, 0);
        assert_eq!(c.samples(), 3);
        assert_eq!(c.rate(), 8334);
    }

    #[test]
    fn capacity_pair_within_one_microsecond() {
        // Both packets of every pair carry one receive time (one GRO batch):
        // one tick of 1/8 µs each, 8 M packets/s, not the 1 M a whole
        // microsecond would cap it at.
        let mut c = Capacity::new();
        for k in 0..4u32 {
            c.on_arrival(1000 + u64::from(k), 16 * (k + 1), 0);
            c.on_arrival(1000 + u64::from(k), 16 * (k + 1) + 1, 0);
        }
        assert_eq!(c.rate(), 8_000_000);
        // Gaps of whole microseconds read as they are: 2 µs is 500 000
        // packets/s.
        let mut c = Capacity::new();
        c.on_arrival(0, 16, 0);
        c.on_arrival(2, 17, 0);
        assert_eq!(c.rate(), 500_000);
    }

    #[test]
    fn capacity_pair_across_wrap() {
        let mut c = Capacity::new();
        c.on_arrival(0, 0x7FFF_FFF0, u32::MAX - 2);
        c.on_arrival(50, 0x7FFF_FFF1, 2);
        assert_eq!(c.rate(), 20_000);
    }

    #[test]
    fn capacity_ignores_a_pair_the_sender_split() {
        let mut c = Capacity::new();
        // The window was full after the probe: its partner left 200 ms later
        // and arrived 200 ms later. Not a sample (it would read 5 packets/s).
        c.on_arrival(100_000, 16, 0);
        c.on_arrival(300_000, 17, 200_000);
        assert_eq!(c.samples(), 0);
        assert_eq!(c.rate(), 0);
        // The application paused after the probe (a message ended on it).
        c.on_arrival(400_000, 32, 300_000);
        c.on_arrival(426_000, 33, 326_000);
        assert_eq!(c.samples(), 0);
        // Sent 20 us apart but spread to 120 us by the link: a sample.
        c.on_arrival(500_000, 48, 400_000);
        c.on_arrival(500_120, 49, 400_020);
        assert_eq!(c.rate(), 8334);
        // Stamped by separate clock reads a few microseconds apart, arriving
        // squeezed together: still a pair (within PAIR_SEND_SLACK_US).
        c.on_arrival(600_000, 64, 500_000);
        c.on_arrival(600_004, 65, 500_006);
        assert_eq!(c.samples(), 2);
        // A retransmitted probe (stamped after its partner) is no pair.
        c.on_arrival(700_000, 80, 600_500);
        c.on_arrival(700_120, 81, 600_000);
        assert_eq!(c.samples(), 2);
    }
}
