//! The ring side of a core: everything that reads or writes kshim's rings and pools.
//!
//! kshim is not trusted: a TX descriptor is copied and validated
//! ([`lu2k_ring_abi::Region::validate_tx`]) before anything uses it, and a bad one is
//! answered at once with an `InvalidDescriptor` completion. What the engine writes
//! for kshim (completions, RX descriptors, extent tables) goes through ring-abi's
//! checked writers.
//!
//! The message ledger lives here too: every accepted message holds one
//! message-header slot (the engine's private copy of its 72-byte LNet header, sent
//! from registered memory) until its completion is written, so the number of slots
//! bounds the messages in flight on a core.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use lu2k_ring_abi::layout::{INLINE_EXTENTS, MAX_RX_EXTENTS, RX_TABLE_BYTES};
use lu2k_ring_abi::{
    EngineCore, Extent, ExtentBuf, Net, Nid, Pool, Region, RxDesc, TxCompletion, TxDesc, TxStatus,
    LNET_HDR_LEN,
};

use crate::daemon::stats::CoreStats;
use crate::io::sys::{CoreMem, MSG_HDR_SLOT};
use crate::transport::{OutMsg, RxPiece};

/// `LNET_HDR_LEN` as the `u32` lengths of extents are.
const HDR: u32 = LNET_HDR_LEN as u32;

/// What the ledger keeps of a message until its completion.
#[derive(Debug)]
struct Entry {
    cookie: u64,
    slot: u32,
}

/// A received message's hold on RX memory until kshim returns it.
#[derive(Debug)]
struct RxHold {
    bufs: Vec<u16>,
    table: Option<u32>,
}

/// A received message waiting for a free RX extent table.
#[derive(Debug)]
struct Waiting {
    peer: IpAddr,
    pieces: Vec<RxPiece>,
    bufs: Vec<u16>,
}

/// Why a TX descriptor was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No message slot free: leave it in the ring (backpressure).
    Full,
    /// Answered at once with a completion.
    Answered,
}

/// A broken ring stays broken and is met again every pass: one line per this.
const RING_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A core's rings, pools and message ledger.
#[derive(Debug)]
pub struct RingSide {
    core: u32,
    net: Net,
    region: Region,
    ec: EngineCore,
    mem: Arc<CoreMem>,
    scratch: ExtentBuf,
    slots_free: Vec<u32>,
    ledger: HashMap<u64, Entry>,
    next_msg: u64,
    holds: HashMap<u64, RxHold>,
    next_token: u64,
    rx_pending: VecDeque<RxDesc>,
    rx_waiting: VecDeque<Waiting>,
    tables_free: Vec<u32>,
    tables_base: u64,
    notify: bool,
    /// The ring side's counters (descriptors, completions, ring drops).
    pub stats: CoreStats,
}

impl RingSide {
    /// The ring side of core `core`, serving LNet network `net`, with at most
    /// `msg_slots` messages in flight.
    pub fn new(
        core: u32,
        net: Net,
        region: Region,
        ec: EngineCore,
        mem: Arc<CoreMem>,
        msg_slots: u32,
    ) -> RingSide {
        let layout = region.layout();
        let (tables_pool_off, _) = layout.pool(Pool::RxTables);
        let entry = *layout.core(core).expect("core exists in the region");
        RingSide {
            core,
            net,
            slots_free: (0..mem.msg_hdr_slots.min(msg_slots)).rev().collect(),
            tables_free: (0..entry.rx_tables).rev().collect(),
            tables_base: entry.rx_tables_off - tables_pool_off,
            region,
            ec,
            mem,
            scratch: ExtentBuf::new(),
            ledger: HashMap::new(),
            next_msg: 1,
            holds: HashMap::new(),
            next_token: 1,
            rx_pending: VecDeque::new(),
            rx_waiting: VecDeque::new(),
            notify: false,
            stats: CoreStats {
                core: core as usize,
                ..Default::default()
            },
        }
    }

    /// The core's rings (for the need-wakeup wait).
    pub fn rings(&self) -> &EngineCore {
        &self.ec
    }

    /// Whether kshim left work in the TX or RX-return ring (a broken ring counts as
    /// work: the pass that takes it reports the breakage).
    pub fn has_work(&mut self) -> bool {
        !self.ec.tx.is_empty().unwrap_or(true) || !self.ec.rx_return.is_empty().unwrap_or(true)
    }

    /// Messages accepted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ledger.len()
    }

    /// Writes how much of the core's pools is in use into `s`.
    pub fn pool_use(&self, s: &mut CoreStats) {
        s.rx_pool_buffers = u64::from(self.mem.rx.count);
        let held: usize = self.holds.values().map(|h| h.bufs.len()).sum::<usize>()
            + self.rx_waiting.iter().map(|w| w.bufs.len()).sum::<usize>();
        s.rx_pool_held = held as u64;
        // A message holds its slot until completed, so free + held is the total.
        s.tx_msg_slots = (self.slots_free.len() + self.ledger.len()) as u64;
        s.tx_msgs_in_flight = self.ledger.len() as u64;
    }

    /// Whether every RX buffer kshim was given came back.
    pub fn rx_home(&self) -> bool {
        self.holds.is_empty() && self.rx_waiting.is_empty() && self.rx_pending.is_empty()
    }

    /// Peeks at up to `max` TX descriptors and hands each to `take`, which returns
    /// `false` to stop (and leave it in the ring). Returns how many were taken.
    pub fn take_tx(&mut self, max: u32, mut take: impl FnMut(&mut Self, &TxDesc) -> bool) -> u32 {
        let n = match self.ec.tx.peek(max) {
            Ok(n) => n,
            Err(e) => {
                crate::log_every!(
                    error,
                    RING_LOG_EVERY,
                    "core {}: TX ring broken: {e}",
                    self.core
                );
                return 0;
            }
        };
        let mut taken = 0;
        for i in 0..n {
            let d: TxDesc = self.ec.tx.read(i);
            if !take(self, &d) {
                break;
            }
            taken += 1;
        }
        self.ec.tx.release(taken);
        taken
    }

    /// Validates descriptor `d` and, unless `draining`, enters it in the ledger and
    /// returns it as a message for the transport. Refused descriptors are answered
    /// with their completion, except for want of a slot ([`Refusal::Full`]).
    pub fn accept(&mut self, d: &TxDesc, draining: bool) -> Result<OutMsg, Refusal> {
        if !draining && self.slots_free.is_empty() {
            return Err(Refusal::Full);
        }
        self.stats.tx_descs += 1;
        let pool_off = self.mem.pool_off as u64;
        let v = match self.region.validate_tx(d, &mut self.scratch) {
            Ok(v) => (
                v.cookie,
                v.peer_nid,
                v.hdr,
                payload_pieces(pool_off, v.extents),
            ),
            Err(e) => {
                self.stats.drop_one("tx_invalid_descriptor");
                let c = TxCompletion::invalid(d.cookie, &e);
                self.complete(c.cookie, TxStatus::InvalidDescriptor, c.detail);
                return Err(Refusal::Answered);
            }
        };
        let (cookie, nid, hdr, payload) = v;
        let refuse = |s: &mut Self, status, why: Option<&str>| {
            if let Some(why) = why {
                s.stats.drop_one(why);
            }
            s.complete(cookie, status, 0);
            Err(Refusal::Answered)
        };
        if draining {
            return refuse(self, TxStatus::Shutdown, None);
        }
        let ip = if nid.is_nid4() {
            IpAddr::V4(nid.ip())
        } else {
            match nid.ip_addr() {
                // An IPv4-mapped IPv6 NID names the IPv4 peer (the transport's
                // canonical form).
                Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                _ => return refuse(self, TxStatus::PeerUnreachable, Some("tx_bad_peer_address")),
            }
        };
        let unroutable = match ip {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if unroutable {
            return refuse(self, TxStatus::PeerUnreachable, None);
        }
        if nid.net() != self.net {
            // A NID on another LNet network than the one this engine serves: its
            // address means nothing here (see the warning at start-up).
            return refuse(self, TxStatus::PeerUnreachable, Some("tx_other_network"));
        }
        let slot = self.slots_free.pop().expect("checked above");
        self.mem.write_msg_hdr(slot, &hdr);
        let id = self.next_msg;
        self.next_msg += 1;
        self.ledger.insert(id, Entry { cookie, slot });
        Ok(OutMsg {
            id,
            peer: ip,
            hdr: (
                (self.mem.msg_hdr_off + slot as usize * MSG_HDR_SLOT) as u64,
                HDR,
            ),
            payload,
            payload_len: d.total_len,
        })
    }

    /// Message `id` ended: frees its slot and writes its completion.
    pub fn finish(&mut self, id: u64, status: TxStatus, detail: u32) {
        match self.ledger.remove(&id) {
            Some(e) => {
                self.slots_free.push(e.slot);
                self.complete(e.cookie, status, detail);
            }
            None => self.stats.drop_one("tx_unknown_message"),
        }
    }

    fn complete(&mut self, cookie: u64, status: TxStatus, detail: u32) {
        if !push_completion(&mut self.ec, self.core, cookie, status, detail) {
            return;
        }
        self.stats.tx_completions += 1;
        if status != TxStatus::Ok {
            self.stats.drop_one(&format!("tx_{}", status_name(status)));
        }
        self.notify = true;
    }

    /// Takes buffer returns; `give_back` receives the buffer references of each
    /// returned message. Returns whether any came.
    pub fn take_returns(&mut self, mut give_back: impl FnMut(&[u16])) -> bool {
        let mut any = false;
        loop {
            match self.ec.rx_return.pop() {
                Ok(Some(r)) => {
                    any = true;
                    self.stats.rx_returns += 1;
                    match self.holds.remove(&r.token) {
                        Some(h) => {
                            if let Some(t) = h.table {
                                self.tables_free.push(t);
                            }
                            give_back(&h.bufs);
                        }
                        None => self.stats.drop_one("rx_return_unknown_token"),
                    }
                }
                Ok(None) => return any,
                Err(e) => {
                    crate::log_every!(
                        error,
                        RING_LOG_EVERY,
                        "core {}: RX return ring broken: {e}",
                        self.core
                    );
                    return any;
                }
            }
        }
    }

    /// Publishes a received message (or queues it behind messages waiting for an
    /// extent table, keeping delivery order). Returns the buffer references to give
    /// back at once when the message cannot be published.
    #[must_use]
    pub fn publish(&mut self, peer: IpAddr, pieces: Vec<RxPiece>, bufs: Vec<u16>) -> Vec<u16> {
        if !self.rx_waiting.is_empty() {
            self.rx_waiting.push_back(Waiting { peer, pieces, bufs });
            return Vec::new();
        }
        self.publish_now(Waiting { peer, pieces, bufs })
    }

    fn publish_now(&mut self, w: Waiting) -> Vec<u16> {
        let Some((hdr, payload)) = self.split_header(&w.pieces) else {
            self.stats.drop_one("rx_short_message");
            return w.bufs;
        };
        let total_len: u32 = payload.iter().map(|e| e.len).sum();
        let token = self.next_token;
        let src = Nid::from_net_addr(self.net, w.peer);
        let (desc, table) = if payload.len() <= INLINE_EXTENTS {
            (RxDesc::inline(token, src, hdr, &payload), None)
        } else if payload.len() <= MAX_RX_EXTENTS as usize {
            let Some(t) = self.tables_free.pop() else {
                // No free extent table: wait for kshim to return one (backpressure;
                // the message is acknowledged already, so it must not be dropped).
                self.stats.rx_table_waits += 1;
                self.rx_waiting.push_back(w);
                return Vec::new();
            };
            let off = self.tables_base + u64::from(t) * RX_TABLE_BYTES;
            if self
                .region
                .write_extents(Pool::RxTables, off, &payload)
                .is_err()
            {
                self.tables_free.push(t);
                self.stats.drop_one("rx_table_write");
                return w.bufs;
            }
            let n = payload.len() as u16;
            (
                RxDesc::indirect(token, src, hdr, off, n, total_len),
                Some(t),
            )
        } else {
            self.stats.drop_one("rx_too_many_extents");
            return w.bufs;
        };
        self.next_token += 1;
        self.holds.insert(
            token,
            RxHold {
                bufs: w.bufs,
                table,
            },
        );
        self.rx_pending.push_back(desc);
        self.flush_rx_pending();
        Vec::new()
    }

    /// Copies the LNet header out of the first bytes of `pieces` (it is a header,
    /// not payload) and returns it with the payload's extents in the RX pool, or
    /// `None` when the message is shorter than a header.
    fn split_header(&self, pieces: &[RxPiece]) -> Option<([u8; LNET_HDR_LEN], Vec<Extent>)> {
        let total: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
        if total < u64::from(HDR) {
            return None;
        }
        let mut hdr = [0u8; LNET_HDR_LEN];
        let mut got = 0usize;
        let mut payload: Vec<Extent> = Vec::with_capacity(pieces.len());
        let layout = self.region.layout();
        for p in pieces {
            let Some((buf_off, _)) = layout.rx_buffer(self.mem.rx_first + u32::from(p.bid)) else {
                continue;
            };
            let mut off = buf_off + u64::from(p.off);
            let mut len = p.len;
            if got < LNET_HDR_LEN {
                let take = (LNET_HDR_LEN - got).min(len as usize);
                if let Ok(b) = self
                    .region
                    .pool_bytes(&Extent::new(Pool::Rx, off, take as u32))
                {
                    hdr[got..got + take].copy_from_slice(b);
                }
                got += take;
                off += take as u64;
                len -= take as u32;
            }
            if len == 0 {
                continue;
            }
            match payload.last_mut() {
                Some(l) if l.offset + u64::from(l.len) == off => l.len += len,
                _ => payload.push(Extent::new(Pool::Rx, off, len)),
            }
        }
        Some((hdr, payload))
    }

    /// Publishes what waits: messages behind a free extent table, then descriptors
    /// behind a full RX ring. Returns the buffer references to give back (messages
    /// that could not be published) and whether anything moved.
    pub fn flush_rx(&mut self) -> (Vec<u16>, bool) {
        let mut back = Vec::new();
        let mut any = false;
        while !self.tables_free.is_empty() {
            let Some(w) = self.rx_waiting.pop_front() else {
                break;
            };
            back.extend(self.publish_now(w));
            any = true;
        }
        any |= self.flush_rx_pending();
        (back, any)
    }

    fn flush_rx_pending(&mut self) -> bool {
        let mut any = false;
        while let Some(d) = self.rx_pending.front() {
            match self.ec.rx.push(*d) {
                Ok(true) => {
                    self.rx_pending.pop_front();
                    self.stats.rx_descs += 1;
                    self.notify = true;
                    any = true;
                }
                Ok(false) => break,
                Err(e) => {
                    crate::log_every!(
                        error,
                        RING_LOG_EVERY,
                        "core {}: RX ring broken: {e}",
                        self.core
                    );
                    break;
                }
            }
        }
        any
    }

    /// Rings kshim's doorbell if anything was written for it since the last ring.
    pub fn flush_notify(&mut self) {
        if self.notify {
            self.notify = false;
            let _ = self.ec.to_kshim.notify();
        }
    }

    /// Whether a ring of kshim's doorbell is owed.
    pub fn owes_notify(&self) -> bool {
        self.notify
    }
}

/// Validated extents as `(offset, len)` in the core's TX range (whose TX pool
/// starts at `pool_off`), adjacent ones merged.
fn payload_pieces(pool_off: u64, extents: &[Extent]) -> Vec<(u64, u32)> {
    let mut pieces: Vec<(u64, u32)> = Vec::with_capacity(extents.len());
    for e in extents {
        let off = pool_off + e.offset;
        match pieces.last_mut() {
            Some(last) if last.0 + u64::from(last.1) == off => last.1 += e.len,
            _ => pieces.push((off, e.len)),
        }
    }
    pieces
}

/// The name of a status in counters and stats (`tx_<name>`).
pub fn status_name(s: TxStatus) -> &'static str {
    match s {
        TxStatus::Ok => "ok",
        TxStatus::PeerUnreachable => "peer_unreachable",
        TxStatus::TimedOut => "timed_out",
        TxStatus::Aborted => "aborted",
        TxStatus::InvalidDescriptor => "invalid_descriptor",
        TxStatus::NoResources => "no_resources",
        TxStatus::EngineGone => "engine_gone",
        TxStatus::PeerReset => "peer_reset",
        TxStatus::Shutdown => "shutdown",
    }
}

/// Writes one TX completion into `ec`'s completion ring, waking kshim and
/// retrying while the ring is full. Returns `false`, after saying so, when the
/// ring is broken (kshim wrote an impossible index): nothing more can be
/// reported through it.
fn push_completion(
    ec: &mut EngineCore,
    core: u32,
    cookie: u64,
    status: TxStatus,
    detail: u32,
) -> bool {
    let c = if status == TxStatus::InvalidDescriptor {
        TxCompletion {
            cookie,
            status: status as u32,
            detail,
        }
    } else {
        TxCompletion::new(cookie, status, detail)
    };
    loop {
        match ec.tx_done.push(c) {
            Ok(true) => return true,
            Ok(false) => {
                // Completion ring full: kshim must consume; wake it and retry.
                let _ = ec.to_kshim.notify();
                std::thread::yield_now();
            }
            Err(e) => {
                crate::log_every!(
                    error,
                    RING_LOG_EVERY,
                    "core {core}: completion ring broken: {e}"
                );
                return false;
            }
        }
    }
}
