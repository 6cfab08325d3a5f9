//! Send credits: how many messages may be in flight to one peer and in total.
//!
//! An LND bounds what it has outstanding per peer (`peer_credits`) and overall
//! (`credits`). A send that finds no credit is queued, never dropped; when a
//! completion gives a credit back, queued sends proceed in order — FIFO per peer,
//! and round robin between peers waiting on the global credits so one busy peer
//! cannot starve the others.
//!
//! # Defaults: sized from the bandwidth-delay product
//!
//! socklnd's defaults (8 per peer, 256 in total) assume a LAN. A peer can only move
//! `peer_credits × message size` per round trip. On a geostationary satellite path
//! the round trip is about 600 ms; to fill 1 Gbit/s one needs
//! `1e9 b/s × 0.6 s / 8 = 75 MB` in flight — 72 messages of 1 MiB, and far more
//! messages when they are smaller. With 8 credits a peer gets
//! `8 × 8 Mibit / 0.6 s ≈ 110 Mbit/s`. The defaults here are
//! [`DEFAULT_PEER_CREDITS`] = 256 (1 MiB messages: ~3.6 Gbit/s per peer at 600 ms;
//! 64 KiB messages: ~220 Mbit/s) and [`DEFAULT_CREDITS`] = 4096 (16 peers at full
//! window, ~57 Gbit/s of 1 MiB messages at 600 ms). Credits bound counts of messages;
//! the bytes in flight are bounded separately by the TX pool.
//!
//! # Guarantees
//!
//! At any time, per peer `in_flight ≤ peer_credits` and in total `in_flight ≤ credits`;
//! every submitted item comes out of [`Credits::submit`] or [`Credits::poll_ready`]
//! exactly once, per-peer order preserved, as long as completions keep arriving.

use std::collections::{HashMap, VecDeque};

use crate::nid::Nid;

/// Default credits per peer (see module doc).
pub const DEFAULT_PEER_CREDITS: u32 = 256;
/// Default global credits (see module doc).
pub const DEFAULT_CREDITS: u32 = 4096;

#[derive(Debug)]
struct Peer<T> {
    avail: u32,
    queue: VecDeque<T>,
    /// In the global wait list.
    waiting: bool,
}

/// Outcome of [`Credits::submit`].
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Submit<T> {
    /// Credits were taken; send it now.
    Go(T),
    /// No credit; it is queued and will come out of [`Credits::poll_ready`].
    Queued,
}

/// Per-peer and global credit accounting with queues for what must wait.
#[derive(Debug)]
pub struct Credits<T> {
    peer_credits: u32,
    credits: u32,
    global_avail: u32,
    peers: HashMap<Nid, Peer<T>>,
    /// Peers with queued items and a peer credit, waiting for a global credit.
    global_wait: VecDeque<Nid>,
    ready: VecDeque<(Nid, T)>,
    queued: usize,
}

impl<T> Credits<T> {
    /// `peer_credits` per peer, `credits` in total; both at least 1.
    pub fn new(peer_credits: u32, credits: u32) -> Credits<T> {
        let peer_credits = peer_credits.max(1);
        let credits = credits.max(1);
        Credits {
            peer_credits,
            credits,
            global_avail: credits,
            peers: HashMap::new(),
            global_wait: VecDeque::new(),
            ready: VecDeque::new(),
            queued: 0,
        }
    }

    /// Credits per peer.
    pub fn peer_credits(&self) -> u32 {
        self.peer_credits
    }

    /// Global credits.
    pub fn credits(&self) -> u32 {
        self.credits
    }

    /// Messages holding credits now (sent, not completed).
    pub fn in_flight(&self) -> u32 {
        self.credits - self.global_avail
    }

    /// Messages holding credits now to `peer`.
    pub fn in_flight_to(&self, peer: Nid) -> u32 {
        self.peers
            .get(&peer)
            .map_or(0, |p| self.peer_credits - p.avail)
    }

    /// Messages waiting for credits (queued, or granted but not yet polled).
    pub fn queued(&self) -> usize {
        self.queued + self.ready.len()
    }

    fn peer(&mut self, nid: Nid) -> &mut Peer<T> {
        let pc = self.peer_credits;
        self.peers.entry(nid).or_insert_with(|| Peer {
            avail: pc,
            queue: VecDeque::new(),
            waiting: false,
        })
    }

    /// Asks to send `item` to `peer`.
    pub fn submit(&mut self, peer: Nid, item: T) -> Submit<T> {
        let global_free = self.global_avail > 0 && self.global_wait.is_empty();
        let p = self.peer(peer);
        if p.queue.is_empty() && p.avail > 0 && global_free {
            p.avail -= 1;
            self.global_avail -= 1;
            return Submit::Go(item);
        }
        p.queue.push_back(item);
        let enlist = p.avail > 0 && !p.waiting;
        if enlist {
            p.waiting = true;
            self.global_wait.push_back(peer);
        }
        self.queued += 1;
        self.dispatch();
        Submit::Queued
    }

    /// A message to `peer` completed (either way): its credits come back, and queued
    /// messages that can now go move to the ready list.
    ///
    /// Panics in debug builds if `peer` had nothing in flight (a caller bug).
    pub fn complete(&mut self, peer: Nid) {
        let pc = self.peer_credits;
        let p = self.peer(peer);
        debug_assert!(p.avail < pc, "completion for {peer} with nothing in flight");
        if p.avail >= pc {
            return;
        }
        p.avail += 1;
        let enlist = !p.queue.is_empty() && !p.waiting;
        if enlist {
            p.waiting = true;
            self.global_wait.push_back(peer);
        }
        self.global_avail += 1;
        self.dispatch();
    }

    fn dispatch(&mut self) {
        while self.global_avail > 0 {
            let Some(nid) = self.global_wait.pop_front() else {
                break;
            };
            let Some(p) = self.peers.get_mut(&nid) else {
                continue;
            };
            p.waiting = false;
            if p.avail == 0 {
                continue;
            }
            let Some(item) = p.queue.pop_front() else {
                continue;
            };
            p.avail -= 1;
            self.global_avail -= 1;
            self.queued -= 1;
            if p.avail > 0 && !p.queue.is_empty() {
                p.waiting = true;
                self.global_wait.push_back(nid);
            }
            self.ready.push_back((nid, item));
        }
    }

    /// The next queued message that now holds its credits, to be sent.
    #[must_use]
    pub fn poll_ready(&mut self) -> Option<(Nid, T)> {
        self.ready.pop_front()
    }

    /// Takes every queued (not yet granted) item, for failing them back when the
    /// transport is gone. Credits held by in-flight messages are unchanged.
    pub fn drain_queued(&mut self) -> impl Iterator<Item = (Nid, T)> + '_ {
        self.global_wait.clear();
        self.queued = 0;
        let mut out: Vec<(Nid, T)> = self.ready.drain(..).collect();
        for (nid, p) in self.peers.iter_mut() {
            p.waiting = false;
            out.extend(p.queue.drain(..).map(|t| (*nid, t)));
        }
        out.into_iter()
    }

    /// Resets all accounting to "nothing in flight" (after the transport is gone and
    /// every in-flight message has been failed back).
    pub fn reset(&mut self) {
        self.global_avail = self.credits;
        for p in self.peers.values_mut() {
            p.avail = self.peer_credits;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(i: u64) -> Nid {
        Nid::from_nid4(i)
    }

    #[test]
    fn queues_beyond_credits_and_resumes() {
        let mut c = Credits::new(2, 3);
        assert_eq!(c.submit(n(1), 10), Submit::Go(10));
        assert_eq!(c.submit(n(1), 11), Submit::Go(11));
        assert_eq!(c.submit(n(1), 12), Submit::Queued); // peer credits gone
        assert_eq!(c.submit(n(2), 20), Submit::Go(20));
        assert_eq!(c.submit(n(2), 21), Submit::Queued); // global credits gone
        assert_eq!(c.in_flight(), 3);
        assert_eq!(c.queued(), 2);
        assert_eq!(c.poll_ready(), None);
        // Peer 2's credit frees the global one; peer 1 still has no peer credit,
        // so peer 2's queued item goes.
        c.complete(n(2));
        assert_eq!(c.poll_ready(), Some((n(2), 21)));
        assert_eq!(c.poll_ready(), None);
        c.complete(n(1));
        assert_eq!(c.poll_ready(), Some((n(1), 12)));
        assert_eq!(c.queued(), 0);
        assert_eq!(c.in_flight_to(n(1)), 2);
    }

    #[test]
    fn drain_and_reset() {
        let mut c = Credits::new(1, 10);
        assert_eq!(c.submit(n(1), 1), Submit::Go(1));
        assert_eq!(c.submit(n(1), 2), Submit::Queued);
        assert_eq!(c.submit(n(1), 3), Submit::Queued);
        let mut d: Vec<_> = c.drain_queued().collect();
        d.sort();
        assert_eq!(d, [(n(1), 2), (n(1), 3)]);
        c.reset();
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.submit(n(1), 4), Submit::Go(4));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u64),
        Complete(usize),
    }

    proptest! {
        /// Against a model: limits hold, no item lost or duplicated, per-peer FIFO.
        #[test]
        fn model(
            pc in 1u32..5,
            gc in 1u32..9,
            ops in prop::collection::vec(
                prop_oneof![(0u64..4).prop_map(Op::Submit), any::<usize>().prop_map(Op::Complete)],
                0..300,
            ),
        ) {
            let mut c = Credits::new(pc, gc);
            let mut next_id = 0u64;
            let mut sent: Vec<(Nid, u64)> = Vec::new(); // in flight
            let mut out_order: HashMap<Nid, Vec<u64>> = HashMap::new();
            let mut submitted: HashMap<Nid, Vec<u64>> = HashMap::new();
            let go = |nid: Nid, id: u64, sent: &mut Vec<(Nid, u64)>,
                          out_order: &mut HashMap<Nid, Vec<u64>>| {
                sent.push((nid, id));
                out_order.entry(nid).or_default().push(id);
            };
            for op in ops.into_iter().chain((0..2000).map(|_| Op::Complete(0))) {
                match op {
                    Op::Submit(p) => {
                        let id = next_id;
                        next_id += 1;
                        submitted.entry(n(p)).or_default().push(id);
                        if let Submit::Go(x) = c.submit(n(p), id) {
                            go(n(p), x, &mut sent, &mut out_order);
                        }
                    }
                    Op::Complete(i) => {
                        if sent.is_empty() { continue; }
                        let (nid, _) = sent.swap_remove(i % sent.len());
                        c.complete(nid);
                    }
                }
                while let Some((nid, x)) = c.poll_ready() {
                    go(nid, x, &mut sent, &mut out_order);
                }
                prop_assert!(sent.len() as u32 <= gc);
                prop_assert_eq!(c.in_flight() as usize, sent.len());
                for p in 0..4 {
                    let k = sent.iter().filter(|(x, _)| *x == n(p)).count() as u32;
                    prop_assert!(k <= pc);
                    prop_assert_eq!(c.in_flight_to(n(p)), k);
                }
            }
            // Everything drained: all submitted went out exactly once, in per-peer order.
            prop_assert_eq!(c.queued(), 0);
            prop_assert_eq!(out_order, submitted);
        }
    }
}
