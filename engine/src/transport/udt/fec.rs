//! Forward error correction inside the UDT transport: the hooks [`Udt`] calls
//! where a datagram is sent, a datagram arrives, a send completes and the
//! timers run. The code itself is the sans-IO codec [`lu2k_udt::fec`]
//! (Reed–Solomon); this is where it meets the engine's memory.
//!
//! - **Sender**: each data datagram a FEC peer's connection sends goes to
//!   its [`Encoder`], read from where it lies (the UDT header and the
//!   payload in TX memory: the codec's pass, counted as `coded_bytes`; the
//!   datagram on the wire is still sent from TX memory). Repair datagrams
//!   are written into a scratch slot of the core's TX range and sent from
//!   there: on the sealed wire sealed into the seal scratch like every
//!   datagram, on the plain wire into a scratch of their own.
//! - **Receiver**: each datagram a FEC peer's receiving connection is fed
//!   passes its [`Decoder`] first; a repair is kept by the decoder and its RX
//!   buffer space is held (a reference on the buffer). A rebuilt data packet
//!   is written into the space of a held repair (a repair is longer than any
//!   data packet of its group) and handed to the connection from there, so
//!   the delivery path hands it to kshim zero-copy like any received packet;
//!   the connection's reference replaces the repair's.
//! - The connections of a FEC peer run with the MSS [`fec::REPAIR_EXTRA`]
//!   bytes smaller, so that repairs fit the path MTU; the receiver takes the
//!   smaller MSS from the handshake.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use lu2k_udt::conn as udt;
use lu2k_udt::fec::{self, Decoder, DecoderStats, Encoder, Input};

use super::{ConnEntry, Dir, Udt, SEG_HDR};
use crate::daemon::stats::FecStats;
use crate::io::sys::SealScratch;
use crate::io::{Segment, SendError};

/// Repair buffers one receiving connection holds at most: a group's repairs
/// (at most `max_repair`) and the next group's first ones.
const MAX_SLOTS: usize = 48;
/// A held repair buffer is given back after this long (µs): a group's
/// repairs arrive within a group-time of its data, so a rebuild that needs
/// the space comes well before.
const SLOT_HOLD_US: u64 = 500_000;
/// Repairs waiting for a scratch slot or the I/O layer, at most (the rest
/// are dropped and counted: a repair late by more than a group-time is of
/// little use).
const MAX_PENDING: usize = 256;

/// The transport's FEC state: which peers, the codec settings, where plain
/// repairs are written, what waits to be sent, and the counters.
#[derive(Debug)]
pub(super) struct Fec {
    peers: HashSet<IpAddr>,
    cfg: fec::Config,
    /// The plain wire's repair scratch (the sealed wire seals repairs into
    /// the seal scratch).
    scratch: Option<Scratch>,
    pending: VecDeque<Pending>,
    stats: FecStats,
}

#[derive(Debug)]
struct Scratch {
    mem: SealScratch,
    free: Vec<usize>,
    slot_of: HashMap<u64, usize>,
}

#[derive(Debug)]
struct Pending {
    dst: SocketAddr,
    sock: u32,
    bytes: Vec<u8>,
}

/// A connection's codec.
#[derive(Debug)]
pub(super) enum ConnFec {
    Tx(Box<TxFec>),
    Rx(Box<RxFec>),
}

#[derive(Debug)]
pub(super) struct TxFec {
    enc: Encoder,
    /// `repairs_over_budget` already counted.
    over_budget: u64,
}

#[derive(Debug)]
pub(super) struct RxFec {
    dec: Decoder,
    /// Held repair datagrams' RX space, oldest first.
    slots: VecDeque<Slot>,
    /// The decoder's counters already counted.
    seen: DecoderStats,
    /// Something to deliver or give back (see [`Udt::fec_deliver`]).
    ready: bool,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    ext: udt::Extent,
    at: u64,
}

impl Fec {
    /// FEC to and from `peers`, with `cfg`; `scratch` for the plain wire's
    /// repairs (`None` on the sealed wire).
    pub(super) fn new(
        peers: HashSet<IpAddr>,
        cfg: fec::Config,
        scratch: Option<SealScratch>,
    ) -> Result<Fec, fec::ConfigError> {
        cfg.validate()?;
        Ok(Fec {
            peers,
            cfg,
            scratch: scratch.map(|mem| Scratch {
                free: (0..mem.slots()).rev().collect(),
                mem,
                slot_of: HashMap::new(),
            }),
            pending: VecDeque::new(),
            stats: FecStats::default(),
        })
    }
}

impl Udt {
    /// Forward error correction to and from `peers` (see the module doc):
    /// `cfg` the codec's settings, which the caller checked with
    /// [`fec::Config::validate`] (settings it refuses are logged and leave
    /// FEC off), `scratch` the core's seal scratch when the wire is plain (on
    /// the sealed wire repairs use the seal's scratch, and `scratch` is
    /// `None`). Before any connection is opened.
    pub fn with_fec(
        mut self,
        peers: HashSet<IpAddr>,
        cfg: fec::Config,
        scratch: Option<SealScratch>,
    ) -> Udt {
        if peers.is_empty() {
            return self;
        }
        match Fec::new(peers, cfg, scratch) {
            Ok(f) => self.fec = Some(Box::new(f)),
            Err(e) => tracing::error!(core = self.p.core, "{e}: FEC stays off"),
        }
        self
    }

    /// Whether `ip` is a FEC peer.
    pub(super) fn fec_peer(&self, ip: IpAddr) -> bool {
        self.fec.as_ref().is_some_and(|f| f.peers.contains(&ip))
    }

    /// The most repair bytes a FEC peer's connection sends, per data byte.
    pub(super) fn fec_max_overhead(&self) -> f64 {
        self.fec.as_ref().map_or(0.0, |f| f.cfg.max_overhead)
    }

    /// The UDT settings of a new connection to `ip`: a FEC peer's MSS leaves
    /// room for the repairs' extra bytes.
    pub(super) fn fec_conn_config(&self, ip: IpAddr) -> udt::Config {
        let mut c = self.p.udt.clone();
        if self.fec_peer(ip) {
            c.mss = c.mss.saturating_sub(fec::REPAIR_EXTRA);
            // The repairs are this peer's redundancy.
            c.tail_copies = false;
        }
        c
    }

    /// Gives a new connection to `ip` its codec.
    pub(super) fn fec_attach(&self, e: &mut ConnEntry) {
        let Some(f) = self.fec.as_ref().filter(|f| f.peers.contains(&e.peer)) else {
            return;
        };
        // Settings were validated in `Fec::new`.
        e.fec = match e.dir {
            Dir::Tx => Encoder::new(f.cfg.clone()).ok().map(|enc| {
                ConnFec::Tx(Box::new(TxFec {
                    enc,
                    over_budget: 0,
                }))
            }),
            Dir::Rx => Decoder::new(f.cfg.clone()).ok().map(|dec| {
                ConnFec::Rx(Box::new(RxFec {
                    dec,
                    slots: VecDeque::new(),
                    seen: DecoderStats::default(),
                    ready: false,
                }))
            }),
        };
    }

    /// The sender's hook: `self.transmits[start..start + k]` of connection
    /// `sock` went out (their payload mapped in `self.spans`/`self.pieces`).
    pub(super) fn fec_sent(&mut self, sock: u32, start: usize, k: usize) {
        let Some(f) = self.fec.as_deref_mut() else {
            return;
        };
        let Some(e) = self.conns.get_mut(&sock) else {
            return;
        };
        let Some(ConnFec::Tx(tx)) = e.fec.as_mut() else {
            return;
        };
        let now = self
            .io
            .now()
            .saturating_duration_since(self.epoch)
            .as_micros() as u64;
        let Fec {
            scratch,
            stats,
            pending,
            ..
        } = f;
        // The reader of the TX range (message headers and payload) comes
        // with a scratch slot; nothing is written to the slot here.
        let tx_read = match self.sec.as_mut() {
            Some(sec) => sec.scratch.slot(0).map(|(_, r)| r),
            None => scratch.as_mut().and_then(|s| s.mem.slot(0)).map(|(_, r)| r),
        };
        let Some(tx_read) = tx_read else {
            return;
        };
        let mut d = Vec::with_capacity(2048);
        for (i, t) in self.transmits[start..start + k].iter().enumerate() {
            if t.payload.is_none() {
                continue;
            }
            let Some(&(a, b)) = self.spans.get(i) else {
                continue;
            };
            d.clear();
            d.extend_from_slice(t.header.as_bytes());
            let mut whole = true;
            for &(off, len) in &self.pieces[a..b] {
                match tx_read.bytes(off, len) {
                    Some(bytes) => d.extend_from_slice(bytes),
                    None => whole = false,
                }
            }
            if !whole {
                continue;
            }
            stats.coded_bytes += d.len() as u64;
            tx.enc.handle_sent(now, &d);
        }
        let dst = e.conn.peer_addr();
        take_repairs(pending, stats, tx, dst, sock);
    }

    /// The timers' hook: closes due groups, takes the loss the receivers
    /// report, forgets what the decoders keep too long, and gives back held
    /// repair buffers no rebuild needs.
    pub(super) fn fec_timers(&mut self, now: u64) {
        let Some(f) = self.fec.as_mut() else {
            return;
        };
        let mut loss: f64 = 0.0;
        for (&sock, e) in self.conns.iter_mut() {
            match e.fec.as_mut() {
                Some(ConnFec::Tx(tx)) => {
                    let st = e.conn.stats();
                    tx.enc.handle_counts(st.pkts_sent, st.pkts_nak_received);
                    tx.enc.handle_timeout(now);
                    loss = loss.max(tx.enc.stats().loss);
                    let dst = e.conn.peer_addr();
                    take_repairs(&mut f.pending, &mut f.stats, tx, dst, sock);
                }
                Some(ConnFec::Rx(rx)) => {
                    if rx.dec.poll_timeout().is_some_and(|t| t <= now) {
                        rx.dec.handle_timeout(now);
                        count_decoder(&mut f.stats, rx);
                    }
                    if rx
                        .slots
                        .front()
                        .is_some_and(|s| now.saturating_sub(s.at) > SLOT_HOLD_US)
                    {
                        rx.ready = true;
                    }
                }
                None => {}
            }
        }
        f.stats.loss_permille = 1000.0 * loss;
        self.fec_deliver(now);
    }

    /// When the next repair group closes.
    pub(super) fn fec_poll_timeout(&self) -> Option<u64> {
        self.fec.as_ref()?;
        self.conns
            .values()
            .filter_map(|e| match e.fec.as_ref() {
                Some(ConnFec::Tx(tx)) => tx.enc.poll_timeout(),
                _ => None,
            })
            .min()
    }

    /// The receiver's hook, before connection `sock` sees `bytes` (at `ext`):
    /// `Some(held)` when the codec took the datagram (a repair: `held` says
    /// its RX space is now held), `None` when it is for the connection.
    pub(super) fn fec_recv(
        &mut self,
        now: u64,
        sock: u32,
        bytes: &[u8],
        ext: udt::Extent,
    ) -> Option<bool> {
        let f = self.fec.as_mut()?;
        let Some(ConnFec::Rx(rx)) = self.conns.get_mut(&sock)?.fec.as_mut() else {
            return None;
        };
        let r = match rx.dec.handle_datagram(now, bytes) {
            Input::Repair => {
                // Given back (or used) in `fec_deliver`, after the caller
                // counted its reference.
                rx.slots.push_back(Slot { ext, at: now });
                rx.ready = true;
                Some(true)
            }
            Input::BadRepair => Some(false),
            Input::Data => {
                f.stats.kept_bytes += bytes.len() as u64;
                None
            }
            Input::Other => None,
        };
        if rx.dec.stats() != rx.seen {
            rx.ready = true;
            count_decoder(&mut f.stats, rx);
        }
        r
    }

    /// Hands the rebuilt packets to their connections, each written into a
    /// held repair's RX space, and gives back repair space held too long or
    /// beyond [`MAX_SLOTS`]. Called when no datagram of the current receive
    /// is borrowed any more (after [`Udt::on_recv`], and from the timers).
    pub(super) fn fec_deliver(&mut self, now: u64) {
        let Some(f) = self.fec.as_mut() else {
            return;
        };
        let mut unref = Vec::new();
        for e in self.conns.values_mut() {
            let Some(ConnFec::Rx(rx)) = e.fec.as_mut() else {
                continue;
            };
            if !rx.ready {
                continue;
            }
            rx.ready = false;
            while let Some(d) = rx.dec.poll_recovered() {
                // The newest held space that is long enough.
                let Some(i) = rx.slots.iter().rposition(|s| s.ext.len as usize >= d.len()) else {
                    f.stats.rebuilt_no_room += 1;
                    continue;
                };
                let slot = rx.slots.remove(i).expect("found above");
                let buf = slot.ext.buf as u16;
                let Some(space) = self.io.rx_bytes_mut(buf, slot.ext.offset, d.len() as u32) else {
                    unref.push(buf);
                    f.stats.rebuilt_no_room += 1;
                    continue;
                };
                space.copy_from_slice(&d);
                let ext = udt::Extent {
                    len: d.len() as u32,
                    ..slot.ext
                };
                if e.conn.handle_datagram(now, &d, ext) {
                    f.stats.rebuilt += 1;
                } else {
                    f.stats.rebuilt_unneeded += 1;
                    unref.push(buf);
                }
            }
            while rx.slots.len() > MAX_SLOTS
                || rx
                    .slots
                    .front()
                    .is_some_and(|s| now.saturating_sub(s.at) > SLOT_HOLD_US)
            {
                if let Some(s) = rx.slots.pop_front() {
                    unref.push(s.ext.buf as u16);
                }
            }
            count_decoder(&mut f.stats, rx);
        }
        for b in unref {
            self.unref(b);
        }
    }

    /// The repair space a connection that goes away still holds.
    pub(super) fn fec_release(&mut self, e: &mut ConnEntry) {
        let Some(ConnFec::Rx(rx)) = e.fec.as_mut() else {
            return;
        };
        let bufs: Vec<u16> = rx.slots.drain(..).map(|s| s.ext.buf as u16).collect();
        for b in bufs {
            self.unref(b);
        }
    }

    /// Sends the repairs waiting; false when none went out.
    pub(super) fn fec_flush(&mut self) -> bool {
        let mut any = false;
        while let Some(p) = self.fec.as_mut().and_then(|f| f.pending.pop_front()) {
            match self.send_repair(&p) {
                Ok(true) => any = true,
                Ok(false) => {
                    if let Some(f) = self.fec.as_mut() {
                        f.pending.push_front(p);
                    }
                    return any;
                }
                Err(e) => self.send_refused(&e),
            }
        }
        any
    }

    /// One repair datagram, written into a scratch slot (sealed on the
    /// sealed wire) and sent from there: `Ok(false)` when no slot is free or
    /// the I/O layer is busy (it waits), an error when it cannot go at all.
    fn send_repair(&mut self, p: &Pending) -> Result<bool, SendError> {
        let now = self.now_us();
        let token = self.next_send;
        let mut hdr = [0u8; SEG_HDR];
        let len;
        let slot;
        let off;
        if let Some(sec) = self.sec.as_mut() {
            let Some(session) = self.conns.get_mut(&p.sock).and_then(|e| e.session.as_mut()) else {
                return Err(SendError::OutOfPool);
            };
            let Some(s) = sec.free.pop() else {
                return Ok(false);
            };
            let Some((out, _)) = sec.scratch.slot(s) else {
                sec.free.push(s);
                return Err(SendError::OutOfPool);
            };
            let Some(n) = session.seal(now, &[&p.bytes], &[], out) else {
                sec.free.push(s);
                return Err(SendError::OutOfPool);
            };
            sec.sealed_bytes += (n - super::OVERHEAD) as u64;
            hdr.copy_from_slice(&out[..SEG_HDR]);
            (len, slot, off) = (n, s, sec.scratch.slot_off(s));
        } else {
            let Some(sc) = self.fec.as_mut().and_then(|f| f.scratch.as_mut()) else {
                return Err(SendError::OutOfPool);
            };
            let Some(s) = sc.free.pop() else {
                return Ok(false);
            };
            let Some((out, _)) = sc.mem.slot(s) else {
                sc.free.push(s);
                return Err(SendError::OutOfPool);
            };
            out[..p.bytes.len()].copy_from_slice(&p.bytes);
            hdr.copy_from_slice(&p.bytes[..SEG_HDR]);
            (len, slot, off) = (p.bytes.len(), s, sc.mem.slot_off(s));
        }
        let seg = Segment {
            hdr: &hdr,
            payload_off: off + SEG_HDR as u64,
            payload_len: (len - SEG_HDR) as u32,
            more: &[],
        };
        let r = self.io.send(p.dst, &[seg], token);
        let sealed = self.sec.is_some();
        let free = match (&r, sealed) {
            (Ok(()), true) => {
                if let Some(sec) = self.sec.as_mut() {
                    sec.slot_of.insert(token, slot);
                }
                None
            }
            (Ok(()), false) => {
                if let Some(sc) = self.fec.as_mut().and_then(|f| f.scratch.as_mut()) {
                    sc.slot_of.insert(token, slot);
                }
                None
            }
            (Err(_), _) => Some(slot),
        };
        if let Some(s) = free {
            if sealed {
                if let Some(sec) = self.sec.as_mut() {
                    sec.free.push(s);
                }
            } else if let Some(sc) = self.fec.as_mut().and_then(|f| f.scratch.as_mut()) {
                sc.free.push(s);
            }
        }
        match r {
            Ok(()) => {
                self.next_send += 1;
                if let Some(f) = self.fec.as_mut() {
                    f.stats.repairs_sent += 1;
                    f.stats.repair_bytes += p.bytes.len() as u64;
                }
                Ok(true)
            }
            Err(SendError::Busy) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A send completed: the plain wire's repair slot it used is free.
    pub(super) fn fec_send_done(&mut self, token: u64) {
        if let Some(sc) = self.fec.as_mut().and_then(|f| f.scratch.as_mut()) {
            if let Some(s) = sc.slot_of.remove(&token) {
                sc.free.push(s);
            }
        }
    }

    /// The counters, into the core's.
    pub(super) fn fec_stats(&self, out: &mut FecStats) {
        if let Some(f) = self.fec.as_ref() {
            *out = f.stats.clone();
        }
    }
}

/// Queues the encoder's repairs for `dst` (from connection `sock`).
fn take_repairs(
    pending: &mut VecDeque<Pending>,
    stats: &mut FecStats,
    tx: &mut TxFec,
    dst: SocketAddr,
    sock: u32,
) {
    while let Some(bytes) = tx.enc.poll_transmit() {
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
            stats.repairs_dropped += 1;
        }
        pending.push_back(Pending { dst, sock, bytes });
    }
    let over = tx.enc.stats().repairs_over_budget;
    stats.repairs_over_budget += over - tx.over_budget;
    tx.over_budget = over;
}

/// Adds what the decoder counted since last time.
fn count_decoder(s: &mut FecStats, rx: &mut RxFec) {
    let now = rx.dec.stats();
    s.repairs_received += now.repairs - rx.seen.repairs;
    s.bad_repairs += now.bad_repairs - rx.seen.bad_repairs;
    s.groups_unrecoverable += now.groups_unrecoverable - rx.seen.groups_unrecoverable;
    rx.seen = now;
}
