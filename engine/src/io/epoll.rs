//! The slow path: epoll readiness with `sendmmsg`/`recvmmsg`, for kernels without
//! io_uring (some distributions disable it) or without an operation the fast path
//! needs, and when forced (`--io-path epoll`, `LU2K_FORCE_SLOW=1`).
//!
//! It keeps the contract of [`DatagramIo`] exactly: sends are scatter lists of
//! [header, payload slice] straight from TX memory with `UDP_SEGMENT`, receives land
//! straight in RX pool buffers with `UDP_GRO`, so lu2k copies no payload here either
//! (the kernel copies inside `sendmsg`, which is why a send is done as soon as the
//! kernel took it). Sends the socket cannot take yet wait in FIFO order for `EPOLLOUT`.
//! ICMP errors are read from the error queue on `EPOLLERR`.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use rustix::event::epoll;

use crate::io::sys;
use crate::io::{gso_size, DatagramIo, Event, IoStats, RxPool, Segment, SendError, TxMem, MAX_HDR};

const D_SOCK: u64 = 1;
const D_BELL: u64 = 2;

struct Slot {
    dst: SocketAddr,
    gso: Option<u16>,
    iov: Vec<libc::iovec>,
    token: u64,
    datagrams: usize,
}

/// The epoll-driven I/O of one core. See the module doc.
pub struct EpollIo {
    ep: OwnedFd,
    sock: OwnedFd,
    /// How destinations are written for `sock`.
    family: sys::Family,
    tx: TxMem,
    rx: RxPool,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    /// UDP GSO refused by the kernel (see `IoStats::gso_fallbacks`).
    gso_off: bool,
    pending: VecDeque<usize>,
    done: Vec<Event>,
    rx_free: Vec<u16>,
    bell_fd: Option<RawFd>,
    bell_armed: bool,
    want_out: bool,
    want_in: bool,
    stats: IoStats,
    handed: sys::Lent,
    /// What `new_owned` keeps alive (declared last: it outlives every kernel
    /// reference the fields above hold).
    _kept: Option<sys::Kept>,
}

impl std::fmt::Debug for EpollIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollIo")
            .field("pending", &self.pending.len())
            .field("rx_free", &self.rx_free.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl EpollIo {
    /// Builds the slow-path I/O over memory it owns (tests, self-checks).
    pub fn new_owned(
        sock: OwnedFd,
        mem: impl sys::IoMem + 'static,
        bell: Option<OwnedFd>,
        send_slots: usize,
    ) -> io::Result<EpollIo> {
        sys::build_owned(sock, mem, bell, send_slots)
    }

    /// The socket.
    pub fn socket(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn update_interest(&mut self) -> io::Result<()> {
        let want_in = !self.rx_free.is_empty();
        let want_out = !self.pending.is_empty();
        if want_in != self.want_in || want_out != self.want_out {
            let mut f = epoll::EventFlags::empty();
            if want_in {
                f |= epoll::EventFlags::IN;
            }
            if want_out {
                f |= epoll::EventFlags::OUT;
            }
            epoll::modify(&self.ep, &self.sock, epoll::EventData::new_u64(D_SOCK), f)?;
            self.want_in = want_in;
            self.want_out = want_out;
        }
        Ok(())
    }

    fn flush_sends(&mut self) {
        while let Some(&i) = self.pending.front() {
            let s = &self.slots[i];
            let msg = sys::SendMsg {
                dst: s.dst,
                iov: &s.iov,
                gso: s.gso,
            };
            let res = sys::sendmmsg(
                self.sock.as_raw_fd(),
                self.family,
                std::slice::from_ref(&msg),
            );
            let result = match res {
                Ok(0) => return,
                Ok(_) => Ok(s.iov.iter().map(|v| v.iov_len).sum()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
            };
            if result.is_err() {
                self.stats.send_errors += 1;
            }
            // See `IoStats::gso_fallbacks`: EIO on a GSO send means the device
            // cannot offload the checksum; nothing went out, later sends go unsegmented.
            if result == Err(libc::EIO) && s.gso.is_some() && !self.gso_off {
                self.gso_off = true;
                self.stats.gso_fallbacks += 1;
                tracing::warn!(
                    "UDP GSO send refused (EIO: the outgoing device has no checksum \
                     offload); sending one datagram per send from now on"
                );
            }
            self.pending.pop_front();
            self.done.push(Event::SendDone {
                token: s.token,
                result,
                kernel_copied: true,
            });
            self.free_slots.push(i as u16);
        }
    }

    fn read_socket(&mut self, out: &mut Vec<Event>) {
        loop {
            if self.rx_free.is_empty() {
                self.stats.rx_starved += 1;
                out.push(Event::RxStarved);
                return;
            }
            let take = self.rx_free.len().min(32);
            let bids: Vec<u16> = self.rx_free[self.rx_free.len() - take..].to_vec();
            let bufs: Vec<(*mut u8, usize)> = bids
                .iter()
                .filter_map(|b| self.rx.buf(*b).map(|p| (p, self.rx.buf_size as usize)))
                .collect();
            let mut got = Vec::with_capacity(take);
            // SAFETY: the buffers are free RX buffers (in `rx_free`), which nobody
            // touches until we hand them out; the constructor's contract keeps them mapped.
            match unsafe { sys::recvmmsg(self.sock.as_raw_fd(), &bufs, &mut got) } {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => {
                    self.drain_errqueue(out);
                    return;
                }
            }
            // recvmmsg fills the given buffers in order: buffer k holds datagram k.
            let used = got.len();
            self.rx_free.truncate(self.rx_free.len() - take);
            self.rx_free.extend_from_slice(&bids[used..]);
            for (k, r) in got.into_iter().enumerate() {
                let bid = bids[k];
                self.handed.lend(bid);
                match (r.from, r.truncated) {
                    (_, true) => {
                        self.stats.rx_truncated += 1;
                        out.push(Event::RecvTruncated);
                        self.return_rx(bid);
                    }
                    (None, _) => self.return_rx(bid),
                    (Some(from), false) => {
                        let len = r.len as u32;
                        if let Some(d) = r.cmsgs.socket_drops {
                            self.stats.socket_drops = u64::from(d);
                        }
                        self.stats.recvs += 1;
                        self.stats.bytes_received += u64::from(len);
                        out.push(Event::Recv {
                            from,
                            bid,
                            off: 0,
                            len,
                            seg: r.cmsgs.gro_size.map_or(len, u32::from).min(len.max(1)),
                            stamp_ns: r.cmsgs.stamp_ns,
                        });
                    }
                }
            }
            if used < take {
                return;
            }
        }
    }

    fn drain_errqueue(&mut self, out: &mut Vec<Event>) {
        while let Ok(Some(e)) = sys::recv_error(self.sock.as_raw_fd()) {
            out.push(Event::SocketError {
                errno: e.errno,
                dst: e.dst,
            });
        }
    }

    fn bell(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the constructor's caller keeps the doorbell fd open for our lifetime.
        self.bell_fd.map(|b| unsafe { BorrowedFd::borrow_raw(b) })
    }
}

impl DatagramIo for EpollIo {
    fn fit(&self, segs: &[Segment<'_>]) -> usize {
        let n = crate::io::fit_gso(segs);
        if self.gso_off {
            n.min(1)
        } else {
            n
        }
    }

    fn send(&mut self, dst: SocketAddr, segs: &[Segment<'_>], token: u64) -> Result<(), SendError> {
        let gso = gso_size(segs)?;
        let i = *self.free_slots.last().ok_or(SendError::Busy)? as usize;
        let hdr_base = self.tx.header_slot(i).ok_or(SendError::Busy)?;
        let mut iov = std::mem::take(&mut self.slots[i].iov);
        iov.clear();
        let mut bytes = 0;
        for (k, s) in segs.iter().enumerate() {
            let h = hdr_base.wrapping_add(k * MAX_HDR);
            // SAFETY: `h` lies in this free slot's part of the header arena (checked
            // by `header_slot`; at most MAX_SEGS headers of MAX_HDR bytes, checked by
            // `gso_size`), which no pending send references.
            unsafe { std::ptr::copy_nonoverlapping(s.hdr.as_ptr(), h, s.hdr.len()) };
            iov.push(libc::iovec {
                iov_base: h.cast(),
                iov_len: s.hdr.len(),
            });
            for (off, len) in s.pieces() {
                let Some(p) = self.tx.payload(off, len) else {
                    self.slots[i].iov = iov;
                    return Err(SendError::OutOfPool);
                };
                iov.push(libc::iovec {
                    iov_base: p.cast(),
                    iov_len: len as usize,
                });
            }
            bytes += s.wire_len();
        }
        self.free_slots.pop();
        let slot = &mut self.slots[i];
        slot.iov = iov;
        slot.dst = dst;
        slot.gso = gso;
        slot.token = token;
        slot.datagrams = segs.len();
        self.stats.sends += 1;
        self.stats.datagrams_sent += segs.len() as u64;
        self.stats.bytes_sent += bytes as u64;
        self.pending.push_back(i);
        self.flush_sends();
        Ok(())
    }

    fn return_rx(&mut self, bid: u16) {
        if self.handed.take_back(bid) {
            self.rx_free.push(bid);
        }
    }

    fn rx_bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        self.handed.bytes(bid, off, len)
    }

    fn rx_bytes_mut(&mut self, bid: u16, off: u32, len: u32) -> Option<&mut [u8]> {
        self.handed.bytes_mut(bid, off, len)
    }

    fn arm_doorbell(&mut self, _futex_seq: u32) {
        if self.bell_armed {
            return;
        }
        if let Some(b) = self.bell() {
            let ok = epoll::modify(
                &self.ep,
                b,
                epoll::EventData::new_u64(D_BELL),
                epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
            )
            .is_ok();
            self.bell_armed = ok;
        }
    }

    fn wait(
        &mut self,
        deadline: Option<Instant>,
        block: bool,
        out: &mut Vec<Event>,
    ) -> io::Result<()> {
        let start = out.len();
        self.flush_sends();
        out.append(&mut self.done);
        self.update_interest()?;
        let now = Instant::now();
        let timeout = if !block || !out.is_empty() {
            Some(rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            })
        } else {
            deadline.map(|d| {
                let dur = d.saturating_duration_since(now);
                rustix::time::Timespec {
                    tv_sec: dur.as_secs() as i64,
                    tv_nsec: i64::from(dur.subsec_nanos()),
                }
            })
        };
        let mut evs = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }; 8];
        if timeout.is_some_and(|t| t.tv_sec > 0 || t.tv_nsec > 0) {
            self.stats.timers_armed += 1;
        }
        self.stats.epoll_waits += 1;
        let n = match epoll::wait(&self.ep, &mut evs, timeout.as_ref()) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &evs[..n] {
            let flags = ev.flags;
            match ev.data.u64() {
                D_SOCK => {
                    if flags.contains(epoll::EventFlags::ERR) {
                        self.drain_errqueue(out);
                    }
                    if flags.contains(epoll::EventFlags::IN) {
                        self.read_socket(out);
                    }
                    if flags.contains(epoll::EventFlags::OUT) {
                        self.flush_sends();
                    }
                }
                D_BELL => {
                    self.bell_armed = false;
                    if let Some(b) = self.bell() {
                        let mut v = [0u8; 8];
                        let _ = rustix::io::read(b, &mut v);
                    }
                    out.push(Event::Doorbell);
                }
                _ => {}
            }
        }
        out.append(&mut self.done);
        if deadline.is_some_and(|d| d <= Instant::now()) {
            self.stats.timers_fired += 1;
            out.push(Event::Timer);
        }
        if block {
            self.stats.wakes.count(&out[start..]);
        }
        self.update_interest()?;
        Ok(())
    }

    fn stats(&self) -> IoStats {
        self.stats
    }

    fn sends_in_flight(&self) -> usize {
        self.pending.len()
    }

    fn rx_free(&self) -> usize {
        self.rx_free.len()
    }

    fn rx_count(&self) -> usize {
        usize::from(self.rx.count)
    }

    fn path_name(&self) -> &'static str {
        "epoll"
    }
}

impl AsFd for EpollIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl sys::Build for EpollIo {
    type Opts = usize;

    /// Builds the slow-path I/O for one core around `sock`.
    ///
    /// # Safety
    /// As for the io_uring provider's `build`: `tx` and `rx` describe mapped, writable
    /// memory that outlives the returned value, and RX buffers are not touched by
    /// anyone between being given to this value and being handed out by `Recv`.
    unsafe fn build(
        sock: OwnedFd,
        tx: TxMem,
        rx: RxPool,
        bell_fd: Option<RawFd>,
        send_slots: usize,
    ) -> io::Result<Self> {
        tx.check_send_slots(send_slots)?;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &ep,
            &sock,
            epoll::EventData::new_u64(D_SOCK),
            epoll::EventFlags::IN,
        )?;
        if let Some(b) = bell_fd {
            // SAFETY: the caller keeps the doorbell fd open for our lifetime.
            let bfd = unsafe { BorrowedFd::borrow_raw(b) };
            epoll::add(
                &ep,
                bfd,
                epoll::EventData::new_u64(D_BELL),
                epoll::EventFlags::empty(),
            )?;
        }
        let slots = (0..send_slots)
            .map(|_| Slot {
                dst: SocketAddr::from(([0, 0, 0, 0], 0)),
                gso: None,
                iov: Vec::with_capacity(crate::io::MAX_IOV),
                token: 0,
                datagrams: 0,
            })
            .collect();
        let family = sys::socket_family(sock.as_raw_fd())?;
        Ok(EpollIo {
            ep,
            family,
            sock,
            tx,
            rx,
            slots,
            free_slots: (0..send_slots as u16).rev().collect(),
            gso_off: false,
            pending: VecDeque::new(),
            done: Vec::new(),
            rx_free: (0..rx.count).rev().collect(),
            bell_fd,
            bell_armed: false,
            want_out: false,
            want_in: true,
            stats: IoStats::default(),
            // SAFETY: `rx` stays mapped while we live (our constructor's contract).
            handed: unsafe { sys::Lent::new(rx) },
            _kept: None,
        })
    }

    fn keep(&mut self, kept: sys::Kept) {
        self._kept = Some(kept);
    }
}
