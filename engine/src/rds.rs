//! The RDS back-end's core: LNet messages over the kernel's RDS (`AF_RDS`,
//! `SOCK_SEQPACKET`, `rds_tcp` transport), driven from one reactor thread per core.
//!
//! # What it does
//!
//! One core owns the ring set, one RDS socket ([`lu2k_rds::Socket`], non-blocking,
//! bound to this node's address and the common port) and one io_uring:
//!
//! - **TX**: each TX descriptor is validated, its LNet header copied into a
//!   message-header slot, and it is sent with a non-blocking `sendmsg(2)` whose
//!   iovecs are `[frame header, LNet header, payload extents]` pointing into the
//!   shared TX pool: lu2k copies no payload (RDS copies it into its own message pages
//!   inside sendmsg; it has no zero-copy send for this path). Not io_uring: io_uring
//!   adds `MSG_NOSIGNAL` to every send and `rds_sendmsg` refuses it with
//!   `EOPNOTSUPP` (measured in the kernel lab); a non-blocking RDS send never sleeps. RDS is reliable and in order per
//!   address pair and gives no delivery report, so the TX completion is written when
//!   the kernel accepted the message (`Ok`), or with the status
//!   [`lu2k_rds::SendError::status`] gives: back-pressure (`ENOBUFS`, `EAGAIN`:
//!   congested destination, full send buffer) retries the send after
//!   [`RETRY_EVERY`]; an unreachable peer completes it `PeerUnreachable`; a refused
//!   message `InvalidDescriptor`; anything else `Aborted` (`detail` = errno).
//! - **Framing**: RDS caps a message at 1 MiB *including* what lu2k puts before the
//!   payload (measured in the kernel lab), so an LNet message is carried as one or
//!   more RDS messages, each starting with an 8-byte frame header
//!   `[magic u16 LE, flags u8 (FIRST=1, LAST=2), 0, payload length u32 LE]`; the
//!   first also carries the 72-byte LNet header. A 1 MiB payload is two RDS
//!   messages (1 MiB − 80 bytes, then 80 bytes). RDS keeps messages in order per
//!   (source, destination) address pair and lu2k sends one RDS message at a time per
//!   peer, so the receiver appends continuation frames to the message they continue.
//! - **RX**: one `IORING_OP_RECVMSG` at a time whose iovecs are free buffers of the
//!   core's share of the shared RX pool, enough for the largest RDS message; the
//!   buffers a message did not fill go back to the free list. An RX descriptor is
//!   published when the last frame of a message arrived; its extents point where the
//!   payload landed (after the frame and LNet headers). Buffers come home through
//!   the RX return ring. Too few free buffers is back-pressure: no receive is armed
//!   until kshim returns some (RDS then holds the messages; its congestion map
//!   pushes back on the senders).
//! - **Sleep**: after `spin` without work, the doorbell eventfd is watched with
//!   `IORING_OP_POLL_ADD` through ring-abi's need-wakeup protocol.
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use lu2k_ring_abi::{
    EngineCore, Extent, ExtentBuf, Pool, Region, RxDesc, TxCompletion, TxDesc, TxStatus,
};

use crate::stats::{CoreStats, Published};
use crate::sys::{CoreMem, MSG_HDR_SLOT};

/// LNet header bytes.
const LNET_HDR: usize = 72;
/// lu2k's frame header in front of every RDS message.
pub const FRAME_HDR: usize = 8;
const MAGIC: u16 = 0x4c52;
const F_FIRST: u8 = 1;
const F_LAST: u8 = 2;
/// Retry period for sends the kernel pushed back on.
pub const RETRY_EVERY: Duration = Duration::from_millis(2);
const TX_BATCH: u32 = 64;
const STATS_EVERY: Duration = Duration::from_millis(100);

const K_RECV: u64 = 2;
const K_BELL: u64 = 3;
const KIND_SHIFT: u64 = 56;

/// Encodes a frame header.
pub fn frame(flags: u8, payload_len: u32) -> [u8; FRAME_HDR] {
    let m = MAGIC.to_le_bytes();
    let l = payload_len.to_le_bytes();
    [m[0], m[1], flags, 0, l[0], l[1], l[2], l[3]]
}

/// Decodes a frame header: `(flags, payload length)`.
pub fn parse_frame(b: &[u8]) -> Option<(u8, u32)> {
    if b.len() < FRAME_HDR || u16::from_le_bytes([b[0], b[1]]) != MAGIC || b[3] != 0 {
        return None;
    }
    Some((b[2], u32::from_le_bytes([b[4], b[5], b[6], b[7]])))
}

/// How a payload of `total` bytes is cut into RDS messages of at most `max` bytes:
/// the payload bytes each carries (the first also carries the LNet header).
pub fn split(total: u32, max: usize) -> Vec<u32> {
    let first = (max - FRAME_HDR - LNET_HDR) as u32;
    let next = (max - FRAME_HDR) as u32;
    let mut parts = vec![total.min(first)];
    let mut left = total - parts[0];
    while left > 0 {
        let n = left.min(next);
        parts.push(n);
        left -= n;
    }
    parts
}

/// Settings of one RDS core.
#[derive(Debug, Clone)]
pub struct RdsParams {
    /// Core index.
    pub core: u32,
    /// LNet network of this node's NIDs.
    pub net: u32,
    /// Common port of lu2k nodes (RDS port space).
    pub port: u16,
    /// Spin before sleeping.
    pub spin: Duration,
    /// How long shutdown waits before failing messages back.
    pub drain_timeout: Duration,
}

struct TxSlot {
    msg: libc::msghdr,
    addr: libc::sockaddr_in,
    frame: [u8; FRAME_HDR],
    iov: Vec<libc::iovec>,
    msg_id: u64,
    len: usize,
}

struct TxMsg {
    cookie: u64,
    peer: Ipv4Addr,
    hdr_slot: u32,
    /// Payload pieces: (offset in the core's TX range, length).
    pieces: Vec<(u64, u32)>,
    parts: Vec<u32>,
    next_part: usize,
}

struct RecvSlot {
    msg: libc::msghdr,
    addr: libc::sockaddr_in,
    iov: Vec<libc::iovec>,
}

struct Partial {
    hdr: [u8; LNET_HDR],
    total: u32,
    got: u32,
    /// Payload pieces: (local buffer id, offset in it, length).
    pieces: Vec<(u16, u32, u32)>,
    bids: Vec<u16>,
}

struct RxMsg {
    bids: Vec<u16>,
    table: Option<u32>,
}

/// One RDS core. See the module doc.
pub struct RdsCore {
    p: RdsParams,
    region: Region,
    ec: EngineCore,
    mem: Arc<CoreMem>,
    sock: lu2k_rds::Socket,
    ring: IoUring,
    scratch: ExtentBuf,
    slots: Box<[TxSlot]>,
    free_slots: Vec<u16>,
    hdr_free: Vec<u32>,
    msgs: HashMap<u64, TxMsg>,
    next_msg: u64,
    /// Per peer: messages waiting to be sent, in order (front = being sent).
    queues: HashMap<Ipv4Addr, VecDeque<u64>>,
    retry_at: Option<Instant>,
    recv: Box<RecvSlot>,
    recv_bids: Vec<u16>,
    recv_armed: bool,
    rx_free: Vec<u16>,
    bufs_per_recv: usize,
    partial: HashMap<SocketAddrV4, Partial>,
    rx_msgs: HashMap<u64, RxMsg>,
    next_token: u64,
    rx_pending: VecDeque<RxDesc>,
    rx_tables_free: Vec<u32>,
    rx_tables_base: u64,
    bell_armed: bool,
    stats: CoreStats,
    published: Published,
    draining: Arc<AtomicBool>,
    notify: bool,
}

impl std::fmt::Debug for RdsCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdsCore")
            .field("core", &self.p.core)
            .field("local", &self.sock.local_addr())
            .field("msgs", &self.msgs.len())
            .field("rx_free", &self.rx_free.len())
            .finish_non_exhaustive()
    }
}

impl RdsCore {
    /// Assembles an RDS core around its socket (bound, non-blocking).
    pub fn new(
        p: RdsParams,
        region: Region,
        ec: EngineCore,
        mem: Arc<CoreMem>,
        sock: lu2k_rds::Socket,
        published: Published,
        draining: Arc<AtomicBool>,
    ) -> std::io::Result<RdsCore> {
        let ring = IoUring::new(256)?;
        let layout = region.layout();
        let (tables_pool_off, _) = layout.pool(Pool::RxTables);
        let entry = *layout
            .core(p.core)
            .ok_or_else(|| std::io::Error::other("core not in the region"))?;
        let buf = mem.rx.buf_size as usize;
        if buf < 256 {
            return Err(std::io::Error::other("RX buffers below 256 bytes"));
        }
        let bufs_per_recv = sock.max_message().div_ceil(buf);
        if (mem.rx.count as usize) < bufs_per_recv {
            return Err(std::io::Error::other(format!(
                "the core has {} RX buffers of {buf} bytes; an RDS message needs {bufs_per_recv}",
                mem.rx.count
            )));
        }
        let nslots = 64usize;
        let slots: Box<[TxSlot]> = (0..nslots)
            .map(|_| TxSlot {
                // SAFETY: msghdr is plain old data; zero is a valid empty value.
                msg: unsafe { std::mem::zeroed() },
                addr: crate::sys::sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
                frame: [0; FRAME_HDR],
                iov: Vec::with_capacity(lu2k_ring_abi::layout::MAX_RX_EXTENTS as usize + 2),
                msg_id: 0,
                len: 0,
            })
            .collect();
        let recv = Box::new(RecvSlot {
            // SAFETY: msghdr is plain old data; zero is a valid empty value.
            msg: unsafe { std::mem::zeroed() },
            addr: crate::sys::sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            iov: Vec::with_capacity(bufs_per_recv),
        });
        let stats = CoreStats {
            core: p.core as usize,
            io_path: "io_uring RDS (rds_tcp)".into(),
            ..Default::default()
        };
        Ok(RdsCore {
            hdr_free: (0..mem.msg_hdr_slots).rev().collect(),
            rx_free: (0..mem.rx.count).rev().collect(),
            rx_tables_free: (0..entry.rx_tables).rev().collect(),
            rx_tables_base: entry.rx_tables_off - tables_pool_off,
            p,
            region,
            ec,
            mem,
            sock,
            ring,
            scratch: ExtentBuf::new(),
            free_slots: (0..nslots as u16).rev().collect(),
            slots,
            msgs: HashMap::new(),
            next_msg: 1,
            queues: HashMap::new(),
            retry_at: None,
            recv,
            recv_bids: Vec::new(),
            recv_armed: false,
            bufs_per_recv,
            partial: HashMap::new(),
            rx_msgs: HashMap::new(),
            next_token: 1,
            rx_pending: VecDeque::new(),
            bell_armed: false,
            stats,
            published,
            draining,
            notify: false,
        })
    }

    /// Runs until shutdown (SIGTERM: no new messages; in-flight ones get the drain
    /// timeout, then are failed back `Shutdown`; RX buffers are awaited).
    pub fn run(mut self) {
        let mut last_work = Instant::now();
        let mut last_stats = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let draining = self.draining.load(Ordering::Relaxed);
            if draining && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + self.p.drain_timeout);
            }
            let mut work = self.take_tx(draining);
            work |= self.take_returns();
            work |= self.flush_rx_pending();
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.retry_at = None;
            }
            if self.retry_at.is_none() {
                work |= self.submit_sends();
            }
            self.arm_recv();
            if let Some(d) = drain_deadline {
                let past = Instant::now() >= d;
                if past {
                    self.fail_queued(TxStatus::Shutdown);
                }
                let rx_home = self.rx_msgs.is_empty() && self.rx_pending.is_empty();
                if self.msgs.is_empty() && (rx_home || past) {
                    self.flush_notify();
                    break;
                }
            }
            let idle = !work && last_work.elapsed() >= self.p.spin;
            let timeout = if idle && drain_deadline.is_none() {
                self.flush_notify();
                self.stats.sleeps += 1;
                // Need-wakeup protocol: announce, re-check, then sleep in the ring.
                self.ec.wait.arm(lu2k_ring_abi::doorbell::WAKE_EVENTFD);
                let ring_work = !self.ec.tx.is_empty().unwrap_or(true)
                    || !self.ec.rx_return.is_empty().unwrap_or(true);
                if ring_work {
                    self.ec.wait.disarm();
                    Some(Duration::ZERO)
                } else {
                    self.arm_bell();
                    Some(
                        self.retry_at
                            .map(|t| t.saturating_duration_since(Instant::now()))
                            .unwrap_or(Duration::from_millis(200)),
                    )
                }
            } else if drain_deadline.is_some() || self.retry_at.is_some() {
                Some(Duration::from_millis(1))
            } else {
                Some(Duration::ZERO)
            };
            let got = self.reap(timeout);
            if idle {
                self.ec.wait.disarm();
            }
            if got || work {
                last_work = Instant::now();
            }
            self.flush_notify();
            if last_stats.elapsed() >= STATS_EVERY {
                self.publish_stats();
                last_stats = Instant::now();
            }
        }
        // Nothing may reference our memory when we go: wait out what is in flight.
        while self.recv_armed || self.bell_armed {
            if self.recv_armed || self.bell_armed {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build();
                // SAFETY: a cancel references no memory of ours.
                let _ = unsafe { self.ring.submission().push(&e) };
            }
            self.reap(Some(Duration::from_millis(10)));
        }
        self.publish_stats();
    }

    fn flush_notify(&mut self) {
        if self.notify {
            self.notify = false;
            let _ = self.ec.to_kshim.notify();
        }
    }

    fn nid(&self, ip: Ipv4Addr) -> u64 {
        (u64::from(self.p.net) << 32) | u64::from(u32::from(ip))
    }

    fn complete(&mut self, cookie: u64, status: TxStatus, detail: u32) {
        if !crate::core::push_completion(&mut self.ec, self.p.core, cookie, status, detail) {
            return;
        }
        self.stats.tx_completions += 1;
        if status != TxStatus::Ok {
            self.stats.drop_one(&format!("tx_{status:?}"));
        }
        self.notify = true;
    }

    fn take_tx(&mut self, draining: bool) -> bool {
        let n = match self.ec.tx.peek(TX_BATCH) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("lu2k-engine rds core {}: TX ring broken: {e}", self.p.core);
                return false;
            }
        };
        let mut taken = 0;
        for i in 0..n {
            if !draining && self.hdr_free.is_empty() {
                break; // no header slot: leave the rest in the ring (backpressure)
            }
            let d: TxDesc = self.ec.tx.read(i);
            taken += 1;
            self.stats.tx_descs += 1;
            self.on_tx_desc(&d, draining);
        }
        self.ec.tx.release(taken);
        taken > 0
    }

    fn on_tx_desc(&mut self, d: &TxDesc, draining: bool) {
        let (cookie, peer_nid, hdr, extents): (u64, u64, [u8; 72], Vec<Extent>) =
            match self.region.validate_tx(d, &mut self.scratch) {
                Ok(v) => (v.cookie, v.peer_nid, v.hdr, v.extents.to_vec()),
                Err(e) => {
                    self.stats.drop_one("tx_invalid_descriptor");
                    let c = TxCompletion::invalid(d.cookie, &e);
                    self.complete(c.cookie, TxStatus::InvalidDescriptor, c.detail);
                    return;
                }
            };
        if draining {
            self.complete(cookie, TxStatus::Shutdown, 0);
            return;
        }
        let ip = Ipv4Addr::from(peer_nid as u32);
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            self.complete(cookie, TxStatus::PeerUnreachable, 0);
            return;
        }
        let Some(hdr_slot) = self.hdr_free.pop() else {
            self.complete(cookie, TxStatus::NoResources, 0);
            return;
        };
        self.mem.write_msg_hdr(hdr_slot, &hdr);
        // Offsets in the core's TX range, where the shared TX pool starts at `pool_off`.
        let base = self.mem.pool_off as u64;
        let mut pieces: Vec<(u64, u32)> = Vec::with_capacity(extents.len());
        for e in &extents {
            let off = base + e.offset;
            match pieces.last_mut() {
                Some(last) if last.0 + u64::from(last.1) == off => last.1 += e.len,
                _ => pieces.push((off, e.len)),
            }
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let parts = split(d.total_len, self.sock.max_message());
        self.msgs.insert(
            id,
            TxMsg {
                cookie,
                peer: ip,
                hdr_slot,
                pieces,
                parts,
                next_part: 0,
            },
        );
        self.queues.entry(ip).or_default().push_back(id);
    }

    /// Ends message `id` with `status` (its remaining parts are not sent).
    fn finish(&mut self, id: u64, status: TxStatus, detail: u32) {
        if let Some(m) = self.msgs.remove(&id) {
            self.hdr_free.push(m.hdr_slot);
            if let Some(q) = self.queues.get_mut(&m.peer) {
                q.retain(|&x| x != id);
            }
            self.complete(m.cookie, status, detail);
        }
    }

    fn fail_queued(&mut self, status: TxStatus) {
        let ids: Vec<u64> = self.msgs.keys().copied().collect();
        for id in ids {
            self.finish(id, status, 0);
        }
    }

    /// Sends the next RDS message of every peer with work, until the kernel pushes
    /// back.
    ///
    /// Sends are `sendmsg(2)` calls on the non-blocking socket from this thread, not
    /// io_uring operations: io_uring adds `MSG_NOSIGNAL` to every send, and
    /// `rds_sendmsg` refuses any flag but `MSG_DONTWAIT`/`MSG_ZEROCOPY` with
    /// `EOPNOTSUPP` (measured in the kernel lab on 6.1; the check is unchanged in
    /// current kernels). A non-blocking RDS send never sleeps: it queues the whole
    /// message or answers at once.
    fn submit_sends(&mut self) -> bool {
        let mut peers: Vec<Ipv4Addr> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(&ip, _)| ip)
            .collect();
        peers.sort_unstable();
        let mut any = false;
        'peers: for ip in peers {
            while let Some(&id) = self.queues.get(&ip).and_then(|q| q.front()) {
                let Some(si) = self.free_slots.pop() else {
                    break 'peers;
                };
                self.build_send(si, id);
                let res = {
                    let s = &self.slots[si as usize];
                    let slices: Vec<std::io::IoSlice<'_>> = s
                        .iov
                        .iter()
                        .map(|v| {
                            // SAFETY: each iovec points at `iov_len` initialised bytes
                            // that stay mapped and unchanged for the call: the slot's
                            // frame header, the message's header slot, or validated
                            // extents of the TX pool (kshim does not reuse them before
                            // the completion we have not written yet).
                            std::io::IoSlice::new(unsafe {
                                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                            })
                        })
                        .collect();
                    self.sock.send(SocketAddrV4::new(ip, self.p.port), &slices)
                };
                any = true;
                let pushed_back = self.on_send(si, res);
                if pushed_back {
                    break 'peers;
                }
            }
        }
        any
    }

    fn build_send(&mut self, si: u16, id: u64) {
        let m = &self.msgs[&id];
        let part = m.next_part;
        let len = m.parts[part];
        let first = part == 0;
        let last = part + 1 == m.parts.len();
        let flags = if first { F_FIRST } else { 0 } | if last { F_LAST } else { 0 };
        // Payload bytes before this part.
        let skip: u64 = m.parts[..part].iter().map(|&x| u64::from(x)).sum();
        let total = m.parts.iter().sum::<u32>();
        let tx = self.mem.tx;
        let hdr_ptr = tx.base + self.mem.msg_hdr_off + m.hdr_slot as usize * MSG_HDR_SLOT;
        let mut iov = std::mem::take(&mut self.slots[si as usize].iov);
        iov.clear();
        let s = &mut self.slots[si as usize];
        s.frame = frame(flags, if first { total } else { len });
        iov.push(libc::iovec {
            iov_base: s.frame.as_mut_ptr().cast(),
            iov_len: FRAME_HDR,
        });
        if first {
            iov.push(libc::iovec {
                iov_base: hdr_ptr as *mut libc::c_void,
                iov_len: LNET_HDR,
            });
        }
        // Walk the pieces, taking [skip, skip + len).
        let (mut pos, end) = (0u64, skip + u64::from(len));
        for &(off, plen) in &m.pieces {
            let (a, b) = (pos, pos + u64::from(plen));
            pos = b;
            let lo = a.max(skip);
            let hi = b.min(end);
            if lo >= hi {
                continue;
            }
            let p = tx
                .payload(off + (lo - a), (hi - lo) as u32)
                .expect("validated extent lies in the TX pool");
            iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: (hi - lo) as usize,
            });
        }
        s.len = iov.iter().map(|v| v.iov_len).sum();
        s.iov = iov;
        s.msg_id = id;
        s.addr = crate::sys::sockaddr_in(SocketAddrV4::new(m.peer, self.p.port));
        s.msg.msg_name = (&mut s.addr as *mut libc::sockaddr_in).cast();
        s.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as _;
        s.msg.msg_iov = s.iov.as_mut_ptr();
        s.msg.msg_iovlen = s.iov.len() as _;
        s.msg.msg_control = std::ptr::null_mut();
        s.msg.msg_controllen = 0;
    }

    /// Handles a send's result; whether the kernel pushed back (retry later).
    fn on_send(&mut self, si: u16, res: Result<usize, lu2k_rds::SendError>) -> bool {
        let id = self.slots[si as usize].msg_id;
        self.free_slots.push(si);
        let Some(m) = self.msgs.get_mut(&id) else {
            return false;
        };
        let e = match res {
            Ok(n) => {
                self.stats.io.sends += 1;
                self.stats.io.bytes_sent += n as u64;
                m.next_part += 1;
                if m.next_part == m.parts.len() {
                    self.finish(id, TxStatus::Ok, 0);
                }
                return false;
            }
            Err(e) => e,
        };
        self.stats.io.send_errors += 1;
        let errno = match e {
            lu2k_rds::SendError::Backpressure { errno }
            | lu2k_rds::SendError::PeerUnreachable { errno }
            | lu2k_rds::SendError::Invalid { errno }
            | lu2k_rds::SendError::Os { errno } => errno as u32,
            lu2k_rds::SendError::TooLarge { .. } => libc::EMSGSIZE as u32,
            _ => 0,
        };
        match e.status() {
            lu2k_rds::Status::Retry => {
                self.stats.drop_one("rds_send_backpressure");
                self.retry_at = Some(Instant::now() + RETRY_EVERY);
                return true;
            }
            // A message cut after a part cannot be resumed with another message in
            // between (the peer would attach the wrong continuation): it fails whole.
            lu2k_rds::Status::PeerUnreachable => self.finish(id, TxStatus::PeerUnreachable, errno),
            lu2k_rds::Status::Rejected => self.finish(id, TxStatus::InvalidDescriptor, errno),
            lu2k_rds::Status::Failed => self.finish(id, TxStatus::Aborted, errno),
        }
        false
    }

    fn arm_recv(&mut self) {
        if self.recv_armed || self.rx_free.len() < self.bufs_per_recv {
            return;
        }
        let buf = self.mem.rx.buf_size as usize;
        let r = &mut *self.recv;
        r.iov.clear();
        self.recv_bids.clear();
        for _ in 0..self.bufs_per_recv {
            let bid = self.rx_free.pop().expect("counted");
            let p = self.mem.rx.buf(bid).expect("own buffer");
            r.iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: buf,
            });
            self.recv_bids.push(bid);
        }
        r.msg.msg_name = (&mut r.addr as *mut libc::sockaddr_in).cast();
        r.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as _;
        r.msg.msg_iov = r.iov.as_mut_ptr();
        r.msg.msg_iovlen = r.iov.len() as _;
        r.msg.msg_control = std::ptr::null_mut();
        r.msg.msg_controllen = 0;
        r.msg.msg_flags = 0;
        let e = opcode::RecvMsg::new(types::Fd(self.sock.as_raw_fd()), &mut r.msg)
            .build()
            .user_data(K_RECV << KIND_SHIFT);
        // SAFETY: the msghdr, address and iovec array are boxed in `self.recv` and not
        // touched until the completion; the buffers are ours (off the free list) and
        // stay mapped (`mem`); `run` waits for the completion before returning.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.rx_free.append(&mut self.recv_bids);
            return;
        }
        let _ = self.ring.submit();
        self.recv_armed = true;
    }

    fn arm_bell(&mut self) {
        if self.bell_armed {
            return;
        }
        let Some(fd) = self
            .ec
            .wait
            .eventfd()
            .map(|f: BorrowedFd<'_>| f.as_raw_fd())
        else {
            return;
        };
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as _)
            .build()
            .user_data(K_BELL << KIND_SHIFT);
        // SAFETY: POLL_ADD references no memory of ours; the eventfd lives in `ec`.
        if unsafe { self.ring.submission().push(&e) }.is_ok() {
            self.bell_armed = true;
        }
    }

    /// Waits up to `timeout` for completions and handles them; whether any came.
    fn reap(&mut self, timeout: Option<Duration>) -> bool {
        let t = timeout.unwrap_or(Duration::ZERO);
        let res = if t.is_zero() {
            self.ring.submit()
        } else {
            let ts = types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        if let Err(e) = res {
            if e.raw_os_error() != Some(libc::ETIME) && e.raw_os_error() != Some(libc::EINTR) {
                eprintln!("lu2k-engine rds core {}: io_uring wait: {e}", self.p.core);
            }
        }
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        let any = !cqes.is_empty();
        for (ud, res, flags) in cqes {
            match ud >> KIND_SHIFT {
                K_RECV => self.on_recv(res, flags),
                K_BELL => {
                    self.bell_armed = false;
                    let _ = self.ec.wait.drain();
                }
                _ => {}
            }
        }
        any
    }

    fn on_recv(&mut self, res: i32, _flags: u32) {
        self.recv_armed = false;
        let bids = std::mem::take(&mut self.recv_bids);
        if res < 0 {
            self.rx_free.extend(bids);
            match -res {
                libc::EAGAIN | libc::EINTR | libc::ECANCELED => {}
                e => {
                    self.stats.drop_one("rds_recv_error");
                    eprintln!(
                        "lu2k-engine rds core {}: recvmsg: {}",
                        self.p.core,
                        lu2k_rds::errno_name(e)
                    );
                }
            }
            return;
        }
        let len = res as usize;
        self.stats.io.recvs += 1;
        self.stats.io.bytes_received += len as u64;
        let buf = self.mem.rx.buf_size as usize;
        let used = len.div_ceil(buf).max(1);
        let (mine, spare) = bids.split_at(used.min(bids.len()));
        self.rx_free.extend_from_slice(spare);
        let mine = mine.to_vec();
        if self.recv.msg.msg_flags & libc::MSG_TRUNC != 0 {
            self.stats.io.rx_truncated += 1;
            self.rx_free.extend(mine);
            return;
        }
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.recv.addr.sin_addr.s_addr)),
            u16::from_be(self.recv.addr.sin_port),
        );
        let b0 = self.mem.rx.buf(mine[0]).expect("own buffer");
        // SAFETY: buffer `mine[0]` is ours (handed out by the completion) and holds at
        // least min(len, buf) received bytes; nobody else writes it.
        let head = unsafe { std::slice::from_raw_parts(b0, len.min(buf)) };
        let Some((flags, plen)) = parse_frame(head) else {
            self.stats.drop_one("rds_bad_frame");
            self.rx_free.extend(mine);
            return;
        };
        let first = flags & F_FIRST != 0;
        let last = flags & F_LAST != 0;
        let skip = FRAME_HDR + if first { LNET_HDR } else { 0 };
        if len < skip {
            self.stats.drop_one("rds_short_frame");
            self.rx_free.extend(mine);
            return;
        }
        if first {
            if self.partial.remove(&from).is_some() {
                self.stats.drop_one("rds_unfinished_message");
            }
            let mut hdr = [0u8; LNET_HDR];
            hdr.copy_from_slice(&head[FRAME_HDR..FRAME_HDR + LNET_HDR]);
            self.partial.insert(
                from,
                Partial {
                    hdr,
                    total: plen,
                    got: 0,
                    pieces: Vec::new(),
                    bids: Vec::new(),
                },
            );
        } else if !self.partial.contains_key(&from) {
            self.stats.drop_one("rds_orphan_continuation");
            self.rx_free.extend(mine);
            return;
        }
        let part = self.partial.get_mut(&from).expect("present");
        let mut at = skip;
        while at < len {
            let bi = at / buf;
            let off = at % buf;
            let n = (buf - off).min(len - at);
            part.pieces.push((mine[bi], off as u32, n as u32));
            at += n;
        }
        part.got += (len - skip) as u32;
        part.bids.extend(mine);
        if part.got > part.total || (last && part.got != part.total) {
            self.stats.drop_one("rds_length_mismatch");
            let p = self.partial.remove(&from).expect("present");
            self.rx_free.extend(p.bids);
            return;
        }
        if last {
            let p = self.partial.remove(&from).expect("present");
            self.publish(*from.ip(), p);
        }
    }

    fn publish(&mut self, peer: Ipv4Addr, p: Partial) {
        let mut payload: Vec<Extent> = Vec::with_capacity(p.pieces.len());
        for &(bid, off, len) in &p.pieces {
            let Some((buf_off, _)) = self
                .region
                .layout()
                .rx_buffer(self.mem.rx_first + u32::from(bid))
            else {
                continue;
            };
            let o = buf_off + u64::from(off);
            match payload.last_mut() {
                Some(l) if l.offset + u64::from(l.len) == o => l.len += len,
                _ => payload.push(Extent::new(Pool::Rx, o, len)),
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        let src = self.nid(peer);
        let (desc, table) = if payload.len() <= lu2k_ring_abi::layout::INLINE_EXTENTS {
            (RxDesc::inline(token, src, p.hdr, &payload), None)
        } else if payload.len() <= lu2k_ring_abi::layout::MAX_RX_EXTENTS as usize {
            let Some(t) = self.rx_tables_free.pop() else {
                self.stats.drop_one("rx_no_extent_table");
                self.rx_free.extend(p.bids);
                return;
            };
            let off = self.rx_tables_base + u64::from(t) * lu2k_ring_abi::layout::RX_TABLE_BYTES;
            if self
                .region
                .write_extents(Pool::RxTables, off, &payload)
                .is_err()
            {
                self.rx_tables_free.push(t);
                self.stats.drop_one("rx_table_write");
                self.rx_free.extend(p.bids);
                return;
            }
            (
                RxDesc::indirect(token, src, p.hdr, off, payload.len() as u16, p.total),
                Some(t),
            )
        } else {
            self.stats.drop_one("rx_too_many_extents");
            self.rx_free.extend(p.bids);
            return;
        };
        self.rx_msgs.insert(
            token,
            RxMsg {
                bids: p.bids,
                table,
            },
        );
        self.rx_pending.push_back(desc);
        self.flush_rx_pending();
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
                    eprintln!("lu2k-engine rds core {}: RX ring broken: {e}", self.p.core);
                    break;
                }
            }
        }
        any
    }

    fn take_returns(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.ec.rx_return.pop() {
                Ok(Some(r)) => {
                    any = true;
                    self.stats.rx_returns += 1;
                    match self.rx_msgs.remove(&r.token) {
                        Some(m) => {
                            if let Some(t) = m.table {
                                self.rx_tables_free.push(t);
                            }
                            self.rx_free.extend(m.bids);
                        }
                        None => self.stats.drop_one("rx_return_unknown_token"),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!(
                        "lu2k-engine rds core {}: RX return ring broken: {e}",
                        self.p.core
                    );
                    break;
                }
            }
        }
        any
    }

    fn publish_stats(&mut self) {
        if let Ok(mut g) = self.published.lock() {
            *g = self.stats.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_mib_is_two_rds_messages_and_small_ones_one() {
        let max = lu2k_rds::RDS_MAX_MSG_SIZE;
        assert_eq!(split(1 << 20, max), vec![(1 << 20) - 80, 80]);
        assert_eq!(split(4096, max), vec![4096]);
        assert_eq!(split(0, max), vec![0]);
        let exact = (max - FRAME_HDR - LNET_HDR) as u32;
        assert_eq!(split(exact, max), vec![exact]);
        assert_eq!(split(exact + 1, max), vec![exact, 1]);
        for total in [0u32, 1, 4096, 1 << 20, 3 << 20] {
            let parts = split(total, 4096);
            assert_eq!(parts.iter().sum::<u32>(), total);
            assert!(parts[0] as usize + FRAME_HDR + LNET_HDR <= 4096);
            assert!(parts[1..]
                .iter()
                .all(|&p| p as usize + FRAME_HDR <= 4096 && p > 0));
        }
    }

    #[test]
    fn frame_headers_round_trip_and_reject_garbage() {
        let f = frame(F_FIRST | F_LAST, 123_456);
        assert_eq!(parse_frame(&f), Some((F_FIRST | F_LAST, 123_456)));
        assert_eq!(parse_frame(&f[..7]), None);
        let mut bad = f;
        bad[0] ^= 1;
        assert_eq!(parse_frame(&bad), None);
    }
}
