//! Both directions of a link, each with its own settings and random streams.

use crate::config::{ConfigError, DuplexConfig};
use crate::link::{Fate, Link};
use crate::time::Instant;

/// A direction across a duplex link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From side A to side B ([`DuplexConfig::forward`]).
    Forward,
    /// From side B to side A ([`DuplexConfig::reverse`]).
    Reverse,
}

impl Direction {
    /// The other direction.
    pub fn opposite(self) -> Direction {
        match self {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        }
    }
}

/// ChaCha stream blocks of the two directions (see `link.rs`).
const FORWARD_STREAMS: u64 = 0;
const REVERSE_STREAMS: u64 = 16;

/// Two independent [`Link`]s under one seed. Same calling order as `Link`:
/// `handle_datagram`, then `poll_deliver` until `None` at or after
/// `poll_deadline`.
#[derive(Debug)]
pub struct Duplex<T> {
    forward: Link<T>,
    reverse: Link<T>,
}

impl<T> Duplex<T> {
    /// A duplex link; the error's field starts with `forward.` or `reverse.`.
    /// The forward direction draws the same random numbers as `Link::new` with
    /// the same seed; the reverse direction uses separate streams.
    pub fn new(config: DuplexConfig, seed: u64) -> Result<Self, ConfigError> {
        let DuplexConfig { forward, reverse } = config;
        Ok(Duplex {
            forward: Link::with_streams(forward, seed, FORWARD_STREAMS)
                .map_err(|e| e.prefixed("forward"))?,
            reverse: Link::with_streams(reverse, seed, REVERSE_STREAMS)
                .map_err(|e| e.prefixed("reverse"))?,
        })
    }

    /// One direction.
    pub fn link(&self, dir: Direction) -> &Link<T> {
        match dir {
            Direction::Forward => &self.forward,
            Direction::Reverse => &self.reverse,
        }
    }

    /// One direction, mutable (to drive it on its own).
    pub fn link_mut(&mut self, dir: Direction) -> &mut Link<T> {
        match dir {
            Direction::Forward => &mut self.forward,
            Direction::Reverse => &mut self.reverse,
        }
    }

    /// Offers a datagram to one direction; see [`Link::handle_datagram`].
    pub fn handle_datagram(&mut self, now: Instant, dir: Direction, len: usize, packet: T) -> Fate
    where
        T: Clone,
    {
        self.link_mut(dir).handle_datagram(now, len, packet)
    }

    /// The earliest delivery instant over both directions.
    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        match (self.forward.poll_deadline(), self.reverse.poll_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next due datagram of either direction, earliest first (forward
    /// first on a tie), with the direction it crossed in.
    #[must_use]
    pub fn poll_deliver(&mut self, now: Instant) -> Option<(Direction, T)> {
        let f = self.forward.poll_deadline().filter(|&t| t <= now);
        let r = self.reverse.poll_deadline().filter(|&t| t <= now);
        let dir = match (f, r) {
            (Some(a), Some(b)) if b < a => Direction::Reverse,
            (Some(_), _) => Direction::Forward,
            (None, Some(_)) => Direction::Reverse,
            (None, None) => return None,
        };
        self.link_mut(dir).poll_deliver(now).map(|p| (dir, p))
    }
}
