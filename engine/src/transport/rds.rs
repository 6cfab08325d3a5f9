//! The RDS transport: LNet messages over the kernel's RDS (`AF_RDS`,
//! `SOCK_SEQPACKET`, `rds_tcp` transport).
//!
//! One core owns one RDS socket ([`lu2k_rds::Socket`], non-blocking, bound to this
//! node's address and the common port) and one io_uring:
//!
//! - **TX**: a message is sent with a non-blocking `sendmsg(2)` whose iovecs are
//!   `[frame header, LNet header, payload extents]` pointing into the shared TX
//!   pool: lu2k copies no payload (RDS copies it into its own message pages inside
//!   sendmsg; it has no zero-copy send for this path). Not io_uring: io_uring adds
//!   `MSG_NOSIGNAL` to every send and `rds_sendmsg` refuses it with `EOPNOTSUPP`; a
//!   non-blocking RDS send never sleeps. RDS is reliable and in order per address
//!   pair and gives no delivery report, so a message is [`Event::Sent`] when the
//!   kernel accepted its last part (`Ok`), or with the status
//!   [`lu2k_rds::SendError::status`] gives: back-pressure (`ENOBUFS`, `EAGAIN`)
//!   retries after [`RETRY_EVERY`]; an unreachable peer ends it `PeerUnreachable`; a
//!   refused message `InvalidDescriptor`; anything else `Aborted` (`detail` = errno).
//! - **Framing** ([`lu2k_rds::frame`]): RDS caps a message at 1 MiB *including*
//!   what lu2k puts before the payload, so an LNet message is one or more RDS
//!   messages, each with a frame header, the first also with the LNet header. RDS
//!   keeps messages in order per address pair and lu2k sends one LNet message at a
//!   time per peer, so the receiver appends continuation frames to the message they
//!   continue.
//! - **RX**: one `IORING_OP_RECVMSG` at a time whose iovecs are free buffers of the
//!   core's share of the RX pool, enough for the largest RDS message; the buffers a
//!   message did not fill go back to the free list. A message is reported when its
//!   last frame arrived. Too few free buffers is back-pressure: no receive is armed
//!   until kshim returns some (RDS then holds the messages; its congestion map
//!   pushes back on the senders).
//! - **Sleep**: kshim's doorbell eventfd is watched with `IORING_OP_POLL_ADD`.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use lu2k_rds::frame;
use lu2k_ring_abi::{TxStatus, WaitMode};

use super::{Event, OutMsg, RxPiece, Transport, Woken};
use crate::daemon::stats::CoreStats;
use crate::io::sys::CoreMem;
use crate::io::{uring, IoStats};

/// Retry period for sends the kernel pushed back on.
pub const RETRY_EVERY: Duration = Duration::from_millis(2);
/// Concurrent send slots (each holds one RDS message's iovecs).
const SEND_SLOTS: usize = 64;

const K_RECV: u64 = 2;
const K_BELL: u64 = 3;
const KIND_SHIFT: u64 = 56;

struct TxSlot {
    msg: libc::msghdr,
    addr: libc::sockaddr_in,
    frame: [u8; frame::HEADER_LEN],
    iov: Vec<libc::iovec>,
    msg_id: u64,
    len: usize,
}

struct TxMsg {
    peer: Ipv4Addr,
    /// The LNet header: `(offset in the core's TX range, len)`.
    hdr: (u64, u32),
    /// Payload pieces: `(offset in the core's TX range, length)`.
    pieces: Vec<(u64, u32)>,
    parts: Vec<u32>,
    next_part: usize,
}

struct RecvSlot {
    msg: libc::msghdr,
    addr: libc::sockaddr_in,
    iov: Vec<libc::iovec>,
}

/// A message whose last frame has not arrived yet.
struct Partial {
    /// Payload bytes the first frame announced.
    total: u32,
    /// Payload bytes so far.
    got: u32,
    /// Where `[LNet header | payload]` landed so far.
    pieces: Vec<RxPiece>,
    bids: Vec<u16>,
}

/// One core's RDS transport. See the module doc.
pub struct Rds {
    port: u16,
    mem: Arc<CoreMem>,
    sock: lu2k_rds::Socket,
    ring: IoUring,
    /// kshim's doorbell to this core (a duplicate of the ring set's eventfd).
    bell: Option<OwnedFd>,
    slots: Box<[TxSlot]>,
    free_slots: Vec<u16>,
    msgs: HashMap<u64, TxMsg>,
    /// Per peer: messages waiting to be sent, in order (front = being sent).
    queues: HashMap<Ipv4Addr, VecDeque<u64>>,
    retry_at: Option<Instant>,
    recv: Box<RecvSlot>,
    recv_bids: Vec<u16>,
    recv_armed: bool,
    rx_free: Vec<u16>,
    bufs_per_recv: usize,
    partial: HashMap<SocketAddrV4, Partial>,
    bell_armed: bool,
    out: VecDeque<Event>,
    io: IoStats,
    drops: BTreeMap<String, u64>,
    core: u32,
}

impl std::fmt::Debug for Rds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rds")
            .field("core", &self.core)
            .field("local", &self.sock.local_addr())
            .field("msgs", &self.msgs.len())
            .field("rx_free", &self.rx_free.len())
            .finish_non_exhaustive()
    }
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data; zero is a valid empty value.
    unsafe { std::mem::zeroed() }
}

impl Rds {
    /// A transport for core `core` around `sock` (bound, non-blocking), receiving
    /// into `mem`'s RX buffers, woken by `bell`.
    pub fn new(
        core: u32,
        port: u16,
        mem: Arc<CoreMem>,
        sock: lu2k_rds::Socket,
        bell: Option<OwnedFd>,
    ) -> std::io::Result<Rds> {
        let (ring, _) = uring::build_ring(256, false)?;
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
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let slots: Box<[TxSlot]> = (0..SEND_SLOTS)
            .map(|_| TxSlot {
                msg: zeroed_msghdr(),
                addr: crate::io::sys::sockaddr_in(unspecified),
                frame: [0; frame::HEADER_LEN],
                iov: Vec::with_capacity(lu2k_ring_abi::layout::MAX_RX_EXTENTS as usize + 2),
                msg_id: 0,
                len: 0,
            })
            .collect();
        let recv = Box::new(RecvSlot {
            msg: zeroed_msghdr(),
            addr: crate::io::sys::sockaddr_in(unspecified),
            iov: Vec::with_capacity(bufs_per_recv),
        });
        Ok(Rds {
            port,
            rx_free: (0..mem.rx.count).rev().collect(),
            mem,
            sock,
            ring,
            bell,
            free_slots: (0..SEND_SLOTS as u16).rev().collect(),
            slots,
            msgs: HashMap::new(),
            queues: HashMap::new(),
            retry_at: None,
            recv,
            recv_bids: Vec::new(),
            recv_armed: false,
            bufs_per_recv,
            partial: HashMap::new(),
            bell_armed: false,
            out: VecDeque::new(),
            io: IoStats::default(),
            drops: BTreeMap::new(),
            core,
        })
    }

    fn drop_one(&mut self, reason: &str) {
        *self.drops.entry(reason.to_string()).or_default() += 1;
    }

    /// Ends message `id` with `status` (its remaining parts are not sent).
    fn finish(&mut self, id: u64, status: TxStatus, detail: u32) {
        if let Some(m) = self.msgs.remove(&id) {
            if let Some(q) = self.queues.get_mut(&m.peer) {
                q.retain(|&x| x != id);
            }
            self.out.push_back(Event::Sent { id, status, detail });
        }
    }
}

impl Transport for Rds {
    fn name(&self) -> &'static str {
        "rds"
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn handle_send(&mut self, msg: OutMsg) {
        // Linux RDS over TCP carries IPv4 only (the config refuses an IPv6 bind or
        // peer with backend = rds); an IPv6 peer here has no route.
        let std::net::IpAddr::V4(peer) = msg.peer else {
            self.drop_one("tx_ipv6_peer");
            self.out.push_back(Event::Sent {
                id: msg.id,
                status: TxStatus::PeerUnreachable,
                detail: libc::EAFNOSUPPORT as u32,
            });
            return;
        };
        let parts = frame::split(msg.payload_len, self.sock.max_message());
        self.msgs.insert(
            msg.id,
            TxMsg {
                peer,
                hdr: msg.hdr,
                pieces: msg.payload,
                parts,
                next_part: 0,
            },
        );
        self.queues.entry(peer).or_default().push_back(msg.id);
    }

    fn handle_return(&mut self, bufs: &[u16]) {
        self.rx_free.extend_from_slice(bufs);
    }

    fn handle_abort_all(&mut self, status: TxStatus) {
        let mut ids: Vec<u64> = self.msgs.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.finish(id, status, 0);
        }
    }

    fn handle_timeout(&mut self) {}

    fn poll_transmit(&mut self) -> bool {
        if self.retry_at.is_some_and(|t| Instant::now() >= t) {
            self.retry_at = None;
        }
        let sent = self.retry_at.is_none() && self.submit_sends();
        self.arm_recv();
        sent
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at
    }

    fn has_backlog(&self) -> bool {
        false
    }

    fn doorbell_mode(&self) -> WaitMode {
        WaitMode::Eventfd
    }

    fn arm_doorbell(&mut self, _futex_seq: u32) {
        if self.bell_armed {
            return;
        }
        let Some(fd) = self.bell.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let e = uring::poll_in(fd, K_BELL << KIND_SHIFT);
        // SAFETY: POLL_ADD references no memory of ours; the eventfd lives in `self`.
        if unsafe { self.ring.submission().push(&e) }.is_ok() {
            self.bell_armed = true;
        }
    }

    fn wait(&mut self, deadline: Option<Instant>, block: bool) -> std::io::Result<Woken> {
        let timeout = match deadline {
            Some(d) if block => d.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        };
        Ok(self.reap(timeout))
    }

    fn sends_in_flight(&self) -> usize {
        0
    }

    fn close(&mut self) {
        // Nothing may reference our memory when we go: wait out what is in flight.
        while self.recv_armed || self.bell_armed {
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build();
            // SAFETY: a cancel references no memory of ours.
            let _ = unsafe { self.ring.submission().push(&e) };
            self.reap(Duration::from_millis(10));
        }
    }

    fn stats(&mut self, s: &mut CoreStats) {
        s.io_path = "io_uring RDS (rds_tcp)".into();
        s.doorbell = "eventfd".into();
        s.io = self.io;
        for (k, v) in &self.drops {
            *s.drops.entry(k.clone()).or_default() += v;
        }
    }
}

impl Rds {
    /// Sends the next RDS message of every peer with work, until the kernel pushes
    /// back.
    ///
    /// Sends are `sendmsg(2)` calls on the non-blocking socket from this thread, not
    /// io_uring operations: io_uring adds `MSG_NOSIGNAL` to every send, and
    /// `rds_sendmsg` refuses any flag but `MSG_DONTWAIT`/`MSG_ZEROCOPY` with
    /// `EOPNOTSUPP` (`rds_sendmsg`'s flag check, on 6.1 as in current kernels). A
    /// non-blocking RDS send never sleeps: it queues the whole
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
                            let bytes = unsafe {
                                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                            };
                            std::io::IoSlice::new(bytes)
                        })
                        .collect();
                    self.sock.send(SocketAddrV4::new(ip, self.port), &slices)
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
        let repr = frame::Repr {
            first,
            last,
            payload_len: if first {
                m.parts.iter().sum::<u32>()
            } else {
                len
            },
        };
        // Payload bytes before this part.
        let skip: u64 = m.parts[..part].iter().map(|&x| u64::from(x)).sum();
        let tx = self.mem.tx;
        let hdr_ptr = tx
            .payload(m.hdr.0, m.hdr.1)
            .expect("the header slot lies in the TX range");
        let mut iov = std::mem::take(&mut self.slots[si as usize].iov);
        iov.clear();
        let s = &mut self.slots[si as usize];
        s.frame = repr.to_bytes();
        iov.push(libc::iovec {
            iov_base: s.frame.as_mut_ptr().cast(),
            iov_len: frame::HEADER_LEN,
        });
        if first {
            iov.push(libc::iovec {
                iov_base: hdr_ptr.cast(),
                iov_len: m.hdr.1 as usize,
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
        s.addr = crate::io::sys::sockaddr_in(SocketAddrV4::new(m.peer, self.port));
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
                self.io.sends += 1;
                self.io.bytes_sent += n as u64;
                m.next_part += 1;
                if m.next_part == m.parts.len() {
                    self.finish(id, TxStatus::Ok, 0);
                }
                return false;
            }
            Err(e) => e,
        };
        self.io.send_errors += 1;
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
                self.drop_one("rds_send_backpressure");
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

    /// Waits up to `timeout` for completions and handles them.
    fn reap(&mut self, timeout: Duration) -> Woken {
        if let Err(e) = uring::submit_and_wait(&mut self.ring, timeout) {
            crate::log_every!(
                error,
                Duration::from_secs(10),
                "rds core {}: io_uring wait: {e}",
                self.core
            );
        }
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut woken = Woken {
            arrived: false,
            useful: !cqes.is_empty(),
        };
        for (ud, res) in cqes {
            match ud >> KIND_SHIFT {
                K_RECV => {
                    woken.arrived = true;
                    self.on_recv(res);
                }
                K_BELL => {
                    woken.arrived = true;
                    self.bell_armed = false;
                    self.drain_bell();
                }
                _ => {}
            }
        }
        woken
    }

    fn drain_bell(&mut self) {
        if let Some(fd) = &self.bell {
            let mut buf = [0u8; 8];
            // A non-blocking read: EAGAIN means another reader drained it already.
            let _ = rustix::io::read(fd, &mut buf);
        }
    }

    fn on_recv(&mut self, res: i32) {
        self.recv_armed = false;
        let bids = std::mem::take(&mut self.recv_bids);
        if res < 0 {
            self.rx_free.extend(bids);
            match -res {
                libc::EAGAIN | libc::EINTR | libc::ECANCELED => {}
                e => {
                    self.drop_one("rds_recv_error");
                    crate::log_every!(
                        warn,
                        Duration::from_secs(10),
                        "rds core {}: recvmsg: {}",
                        self.core,
                        lu2k_rds::errno_name(e)
                    );
                }
            }
            return;
        }
        let len = res as usize;
        self.io.recvs += 1;
        self.io.bytes_received += len as u64;
        let buf = self.mem.rx.buf_size as usize;
        let used = len.div_ceil(buf).max(1);
        let (mine, spare) = bids.split_at(used.min(bids.len()));
        self.rx_free.extend_from_slice(spare);
        let mine = mine.to_vec();
        if self.recv.msg.msg_flags & libc::MSG_TRUNC != 0 {
            self.io.rx_truncated += 1;
            self.rx_free.extend(mine);
            return;
        }
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.recv.addr.sin_addr.s_addr)),
            u16::from_be(self.recv.addr.sin_port),
        );
        if let Err(why) = self.on_frame(from, len, &mine) {
            self.drop_one(why);
            self.rx_free.extend(mine);
        }
    }

    /// Adds a received RDS message of `len` bytes in buffers `bids` to the LNet
    /// message it starts or continues; the reason to drop it otherwise.
    fn on_frame(
        &mut self,
        from: SocketAddrV4,
        len: usize,
        bids: &[u16],
    ) -> Result<(), &'static str> {
        let buf = self.mem.rx.buf_size as usize;
        let head_len = len.min(buf) as u32;
        // SAFETY: buffer `bids[0]` is ours (handed out by the completion) and holds
        // at least min(len, buf) received bytes; nobody else writes it; `mem` keeps
        // the pool mapped.
        let head = unsafe { self.mem.rx.bytes(bids[0], 0, head_len) }.ok_or("rds_bad_frame")?;
        let packet = frame::Packet::new_checked(head).map_err(|_| "rds_bad_frame")?;
        let repr = frame::Repr::parse(&packet).map_err(|_| "rds_bad_frame")?;
        let skip = repr.prefix_len();
        if len < skip {
            return Err("rds_short_frame");
        }
        if repr.first {
            if self.partial.remove(&from).is_some() {
                self.drop_one("rds_unfinished_message");
            }
            let total = repr.payload_len;
            self.partial.insert(
                from,
                Partial {
                    total,
                    got: 0,
                    pieces: Vec::new(),
                    bids: Vec::new(),
                },
            );
        } else if !self.partial.contains_key(&from) {
            return Err("rds_orphan_continuation");
        }
        let part = self.partial.get_mut(&from).expect("present");
        // The pieces start after the frame header: the LNet header is the first
        // frame's leading bytes, as the skeleton expects.
        let mut at = frame::HEADER_LEN;
        while at < len {
            let (bi, off) = (at / buf, at % buf);
            let n = (buf - off).min(len - at);
            part.pieces.push(RxPiece {
                bid: bids[bi],
                off: off as u32,
                len: n as u32,
            });
            at += n;
        }
        part.got += (len - skip) as u32;
        part.bids.extend_from_slice(bids);
        if part.got > part.total || (repr.last && part.got != part.total) {
            let p = self.partial.remove(&from).expect("present");
            self.rx_free.extend(p.bids);
            self.drop_one("rds_length_mismatch");
            return Ok(());
        }
        if repr.last {
            let p = self.partial.remove(&from).expect("present");
            self.out.push_back(Event::Received {
                peer: std::net::IpAddr::V4(*from.ip()),
                pieces: p.pieces,
                bufs: p.bids,
            });
        }
        Ok(())
    }
}
