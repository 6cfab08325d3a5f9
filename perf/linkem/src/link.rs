//! The impairment model of one link direction, on virtual time.
//!
//! A [`Link`] is sans-IO: it never reads a clock or the OS random source, and
//! its randomness comes from the seed given to [`Link::new`]. The same
//! configuration, seed and sequence of calls give the same deliveries at the
//! same instants, every time.
//!
//! # The model
//!
//! A datagram offered at `now` with `len` bytes goes through these stages, all
//! decided when it is offered:
//!
//! 1. **Bottleneck** (only with a rate). The link is a FIFO serializer at
//!    `rate_mbps`: a datagram of `len + overhead_bytes` wire bytes takes
//!    `wire bytes × 8 / rate` to transmit, starting when the previous one has
//!    finished, or at `now` if the link is idle. Time is kept exactly (as a
//!    rational number of nanoseconds), so long runs transmit at exactly the
//!    configured rate. The buffer holds the bytes of every datagram whose
//!    transmission has not finished, the one on the wire included; an arriving
//!    datagram that would push it past `queue_bytes` is tail-dropped. (Put
//!    another way: a token bucket filling at `rate` with no burst allowance,
//!    the buffer holding what waits for tokens.)
//! 2. **Outage**. A datagram whose transmission starts inside a scheduled
//!    outage `[start, end)` is dropped. The bottleneck keeps draining during an
//!    outage (it transmits into nothing). Without a rate, transmission starts
//!    when the datagram is offered.
//! 3. **Random loss** on the wire, Bernoulli or Gilbert–Elliott (see
//!    [`Loss`]); the Gilbert–Elliott chain steps once per datagram
//!    that reaches this stage.
//! 4. **Propagation**. Delivery is at the end of transmission plus `delay_ms`
//!    plus a jitter drawn uniformly from `[-jitter_ms, +jitter_ms]`. Without
//!    reordering, delivery times are made monotonic: a datagram is never
//!    delivered before one that was offered earlier.
//! 5. **Duplication**. With probability `duplicate` a second copy is delivered:
//!    at the same instant as the first (just after it) without reordering, or
//!    with its own jitter with reordering.
//!
//! So without jitter, the one-way delay of a datagram is exactly propagation +
//! its own serialization + the time it waited behind earlier datagrams.
//!
//! Each random stage draws from its own ChaCha8 stream of the seed, so turning
//! jitter or duplication on does not change which datagrams are lost.
//!
//! # Use
//!
//! Offer datagrams with [`Link::handle_datagram`]. Then, at or after the time
//! [`Link::poll_deadline`] returns, call [`Link::poll_deliver`] until it returns
//! `None`. Instants passed in must not go backwards.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, ConfigError, Loss};
use crate::time::Instant;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Why a datagram did not make it across.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The bottleneck buffer was full (tail drop).
    Queue,
    /// Its transmission would have started during a scheduled outage.
    Outage,
    /// Random loss on the wire.
    Loss,
}

/// What the link decided about an offered datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fate {
    /// It will be delivered once, at the given instant.
    Deliver(Instant),
    /// It will be delivered twice: at the first instant and again at the second.
    Duplicate(Instant, Instant),
    /// It was dropped.
    Drop(DropReason),
}

/// A number of datagrams and their bytes (as offered, without `overhead_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Count {
    /// Datagrams.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// What a link has done so far. Once nothing is in flight,
/// `offered = delivered - duplicated + dropped_queue + dropped_outage + dropped_loss`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    /// Datagrams offered to the link.
    pub offered: Count,
    /// Tail-dropped at the bottleneck buffer.
    pub dropped_queue: Count,
    /// Dropped by a scheduled outage.
    pub dropped_outage: Count,
    /// Lost at random on the wire.
    pub dropped_loss: Count,
    /// Extra copies made (each is delivered too, and counted in `delivered`).
    pub duplicated: Count,
    /// Handed out by `poll_deliver`, copies included.
    pub delivered: Count,
}

impl Stats {
    /// The counter for one drop reason.
    pub fn dropped(&self, reason: DropReason) -> Count {
        match reason {
            DropReason::Queue => self.dropped_queue,
            DropReason::Outage => self.dropped_outage,
            DropReason::Loss => self.dropped_loss,
        }
    }
}

/// A datagram on its way, ordered by delivery time, then by the order it was
/// scheduled in (so equal times deliver first-in first-out).
#[derive(Debug)]
struct Pending<T> {
    at: u64,
    seq: u64,
    len: usize,
    packet: T,
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Pending<T> {}
impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Pending<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The validated configuration in integer units.
#[derive(Debug, Clone)]
struct Params {
    rate_bps: Option<u64>,
    queue_bytes: Option<u64>,
    overhead: u64,
    delay_ns: u64,
    jitter_ns: u64,
    reorder: bool,
    loss: LossParams,
    duplicate: f64,
    /// `[start, end)` in nanoseconds, sorted by start.
    outages: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
enum LossParams {
    None,
    Bernoulli(f64),
    /// Probabilities of entering and of leaving the bad state.
    Gilbert {
        enter: f64,
        leave: f64,
    },
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

impl Params {
    fn new(c: &Config) -> Result<Self, ConfigError> {
        c.validate()?;
        let loss = match c.loss {
            Loss::None => LossParams::None,
            Loss::Bernoulli { rate } => LossParams::Bernoulli(rate),
            Loss::GilbertElliott { rate, burst } => {
                let leave = 1.0 / burst;
                LossParams::Gilbert {
                    enter: (leave * rate / (1.0 - rate)).min(1.0),
                    leave,
                }
            }
        };
        let mut outages: Vec<(u64, u64)> = c
            .outages
            .iter()
            .map(|o| (ms_to_ns(o.start_s * 1e3), ms_to_ns(o.end_s * 1e3)))
            .collect();
        outages.sort_unstable();
        Ok(Params {
            rate_bps: c.rate_mbps.map(|r| ((r * 1e6).round() as u64).max(1)),
            queue_bytes: c.queue_bytes,
            overhead: u64::from(c.overhead_bytes),
            delay_ns: ms_to_ns(c.delay_ms),
            jitter_ns: ms_to_ns(c.jitter_ms),
            reorder: c.reorder,
            loss,
            duplicate: c.duplicate,
            outages,
        })
    }

    fn in_outage(&self, t: u64) -> bool {
        // Few outages; a linear scan over the sorted list is enough.
        self.outages
            .iter()
            .take_while(|&&(start, _)| start <= t)
            .any(|&(_, end)| t < end)
    }
}

/// ChaCha stream numbers within one link; a duplex link gives each direction
/// its own block of streams.
const STREAM_LOSS: u64 = 1;
const STREAM_JITTER: u64 = 2;
const STREAM_DUP: u64 = 3;
const STREAM_GE_INIT: u64 = 4;

/// One direction of an impaired link, carrying datagrams of type `T` (the
/// payload itself, a buffer handle, or `()` to count only). See the
/// [module docs](self) for the model and the calling order.
#[derive(Debug)]
pub struct Link<T> {
    config: Config,
    params: Params,
    rng_loss: ChaCha8Rng,
    rng_jitter: ChaCha8Rng,
    rng_dup: ChaCha8Rng,
    /// Gilbert–Elliott state: in the bad (losing) state.
    ge_bad: bool,
    /// When the bottleneck finishes its last transmission, in units of
    /// nanoseconds × rate_bps (exact).
    busy_until: u128,
    /// Datagrams in the bottleneck: (transmission end in ns, wire bytes).
    queue: VecDeque<(u64, u64)>,
    queued_bytes: u64,
    /// Latest delivery time scheduled (for monotonic delivery without reordering).
    last_at: u64,
    seq: u64,
    in_flight: BinaryHeap<Reverse<Pending<T>>>,
    stats: Stats,
}

fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

impl<T> Link<T> {
    /// A link with these settings and this seed; fails when a setting is out
    /// of range (see [`Config::validate`]).
    pub fn new(config: Config, seed: u64) -> Result<Self, ConfigError> {
        Self::with_streams(config, seed, 0)
    }

    pub(crate) fn with_streams(
        config: Config,
        seed: u64,
        stream_base: u64,
    ) -> Result<Self, ConfigError> {
        let params = Params::new(&config)?;
        let ge_bad = match params.loss {
            // Start in the stationary distribution, so the loss fraction has
            // no start-up bias.
            LossParams::Gilbert { enter, leave } => {
                rng(seed, stream_base + STREAM_GE_INIT).random_bool(enter / (enter + leave))
            }
            _ => false,
        };
        Ok(Link {
            config,
            params,
            rng_loss: rng(seed, stream_base + STREAM_LOSS),
            rng_jitter: rng(seed, stream_base + STREAM_JITTER),
            rng_dup: rng(seed, stream_base + STREAM_DUP),
            ge_bad,
            busy_until: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            last_at: 0,
            seq: 0,
            in_flight: BinaryHeap::new(),
            stats: Stats::default(),
        })
    }

    /// The settings this link was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters of what the link has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Datagrams scheduled for delivery and not yet handed out.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes (wire bytes, with overhead) in the bottleneck buffer at `now`,
    /// the datagram being transmitted included.
    pub fn queued_bytes(&mut self, now: Instant) -> u64 {
        self.retire(now.as_nanos());
        self.queued_bytes
    }

    /// The earliest instant at which [`Link::poll_deliver`] has something to
    /// hand out, or `None` when nothing is in flight.
    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        self.in_flight
            .peek()
            .map(|Reverse(p)| Instant::from_nanos(p.at))
    }

    /// The next datagram whose delivery time is at or before `now`, earliest
    /// first; `None` when none is due yet.
    #[must_use]
    pub fn poll_deliver(&mut self, now: Instant) -> Option<T> {
        if self.in_flight.peek()?.0.at > now.as_nanos() {
            return None;
        }
        let Reverse(p) = self.in_flight.pop()?;
        self.stats.delivered.add(p.len);
        Some(p.packet)
    }

    /// Removes datagrams whose transmission ended by `now` from the bottleneck.
    fn retire(&mut self, now: u64) {
        while let Some(&(end, bytes)) = self.queue.front() {
            if end > now {
                break;
            }
            self.queue.pop_front();
            self.queued_bytes -= bytes;
        }
    }

    /// Puts a datagram through the bottleneck: `Err` on tail drop, else its
    /// transmission `(start, end)` in nanoseconds.
    fn transmit(&mut self, now: u64, len: usize) -> Result<(u64, u64), DropReason> {
        let Some(rate) = self.params.rate_bps else {
            return Ok((now, now));
        };
        self.retire(now);
        let wire = len as u64 + self.params.overhead;
        if let Some(limit) = self.params.queue_bytes {
            if self.queued_bytes + wire > limit {
                return Err(DropReason::Queue);
            }
        }
        let rate = u128::from(rate);
        let start = self.busy_until.max(u128::from(now) * rate);
        let end = start + u128::from(wire) * 8 * NANOS_PER_SEC;
        self.busy_until = end;
        let to_ns = |x: u128| u64::try_from(x.div_ceil(rate)).unwrap_or(u64::MAX);
        let (start, end) = (to_ns(start), to_ns(end));
        self.queue.push_back((end, wire));
        self.queued_bytes += wire;
        Ok((start, end))
    }

    /// Random loss on the wire for one datagram.
    fn lost(&mut self) -> bool {
        match self.params.loss {
            LossParams::None => false,
            LossParams::Bernoulli(p) => self.rng_loss.random_bool(p),
            LossParams::Gilbert { enter, leave } => {
                let lost = self.ge_bad;
                let flip = if self.ge_bad { leave } else { enter };
                if self.rng_loss.random_bool(flip) {
                    self.ge_bad = !self.ge_bad;
                }
                lost
            }
        }
    }

    /// Delivery time for a datagram whose transmission ended at `end`.
    fn delivery_time(&mut self, end: u64) -> u64 {
        let base = end.saturating_add(self.params.delay_ns);
        let j = self.params.jitter_ns;
        let mut at = if j == 0 {
            base
        } else {
            // delay >= jitter (validated), so this stays at or after `end`.
            let offset = self.rng_jitter.random_range(0..=2 * j);
            (base + offset).saturating_sub(j)
        };
        if !self.params.reorder {
            at = at.max(self.last_at);
        }
        self.last_at = self.last_at.max(at);
        at
    }

    fn schedule(&mut self, at: u64, len: usize, packet: T) {
        let seq = self.seq;
        self.seq += 1;
        self.in_flight.push(Reverse(Pending {
            at,
            seq,
            len,
            packet,
        }));
    }

    /// Offers a datagram of `len` bytes to the link at `now`. The link keeps
    /// `packet` until it is due (see [`Link::poll_deliver`]) or drops it at
    /// once; the returned [`Fate`] says which (callers may ignore it).
    pub fn handle_datagram(&mut self, now: Instant, len: usize, packet: T) -> Fate
    where
        T: Clone,
    {
        let now = now.as_nanos();
        self.stats.offered.add(len);
        let drop = |s: &mut Stats, reason: DropReason| {
            match reason {
                DropReason::Queue => s.dropped_queue.add(len),
                DropReason::Outage => s.dropped_outage.add(len),
                DropReason::Loss => s.dropped_loss.add(len),
            }
            Fate::Drop(reason)
        };
        let (start, end) = match self.transmit(now, len) {
            Ok(t) => t,
            Err(reason) => return drop(&mut self.stats, reason),
        };
        if self.params.in_outage(start) {
            return drop(&mut self.stats, DropReason::Outage);
        }
        if self.lost() {
            return drop(&mut self.stats, DropReason::Loss);
        }
        let at = self.delivery_time(end);
        let copy = self.params.duplicate > 0.0 && self.rng_dup.random_bool(self.params.duplicate);
        if copy {
            self.stats.duplicated.add(len);
            let at2 = if self.params.reorder {
                self.delivery_time(end)
            } else {
                at
            };
            self.schedule(at, len, packet.clone());
            self.schedule(at2, len, packet);
            Fate::Duplicate(Instant::from_nanos(at), Instant::from_nanos(at2))
        } else {
            self.schedule(at, len, packet);
            Fate::Deliver(Instant::from_nanos(at))
        }
    }
}
