//! The virtual-time provider: a [`DatagramIo`] without sockets, for tests that drive
//! whole shards through a simulated network in milliseconds of CPU.
//!
//! Time is a [`SimClock`] shared by everything in one simulation; nothing here
//! advances it. A send is assembled into bytes (header and payload pieces read from
//! the core's TX memory) and left in the port's outbox for the test to carry, for
//! example through `lu2k-linkem`'s seeded link model; the test puts arriving
//! datagrams in the port's inbox, and the next [`DatagramIo::wait`] writes each
//! into a free RX buffer and reports it, as the kernel would. A wait never blocks:
//! it reports what is ready and the deadline it was given, so the test can step
//! the clock to the earliest deadline of all parties.
//!
//! Sends complete at once (the simulated kernel copies, as loopback does); the
//! payload still travels from the shared TX pool and lands in the shared RX pool,
//! so the ring side sees exactly what it sees over a real socket.
//!
//! The simulated network is an IPv4 one ([`Datagram`] carries IPv4 addresses): a
//! send to an IPv6 destination completes with `EAFNOSUPPORT`, as on an IPv4 socket.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sys::CoreMem;
use super::{gso_size, DatagramIo, Event, IoStats, Segment, SendError};

/// Virtual time: a fixed origin plus an offset that only the test moves.
#[derive(Debug, Clone)]
pub struct SimClock {
    origin: Instant,
    nanos: Arc<AtomicU64>,
}

impl Default for SimClock {
    fn default() -> Self {
        SimClock::new()
    }
}

impl SimClock {
    /// A clock at its origin.
    pub fn new() -> SimClock {
        SimClock {
            origin: Instant::now(),
            nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Now, in virtual time.
    pub fn now(&self) -> Instant {
        self.origin + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    /// Time since the origin.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    /// Moves the clock forward to `t` (never back).
    pub fn advance_to(&self, t: Instant) {
        let n = t.saturating_duration_since(self.origin).as_nanos() as u64;
        self.nanos.fetch_max(n, Ordering::Relaxed);
    }
}

/// A datagram in the simulated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender.
    pub from: SocketAddrV4,
    /// Destination.
    pub to: SocketAddrV4,
    /// UDP payload.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Queues {
    outbox: VecDeque<Datagram>,
    inbox: VecDeque<Datagram>,
    wake: Option<Instant>,
}

/// The test's side of a [`SimIo`]: what it sent, what arrives for it.
#[derive(Debug, Clone, Default)]
pub struct SimPort(Arc<Mutex<Queues>>);

impl SimPort {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the datagrams sent since the last call.
    pub fn take_sent(&self) -> Vec<Datagram> {
        self.lock().outbox.drain(..).collect()
    }

    /// Hands a datagram to the provider (it is received at the next wait).
    pub fn deliver(&self, d: Datagram) {
        self.lock().inbox.push_back(d);
    }

    /// Datagrams waiting for a free RX buffer.
    pub fn waiting(&self) -> usize {
        self.lock().inbox.len()
    }

    /// The deadline the last wait was given.
    pub fn wake(&self) -> Option<Instant> {
        self.lock().wake
    }
}

/// A [`DatagramIo`] on virtual time. See the module doc.
#[derive(Debug)]
pub struct SimIo {
    local: SocketAddrV4,
    mem: Arc<CoreMem>,
    clock: SimClock,
    port: SimPort,
    free: Vec<u16>,
    /// Which buffers are handed out (a buffer given back twice is ignored).
    lent: Vec<bool>,
    /// The same, and writable access to them.
    handed: super::sys::Lent,
    out: Vec<Event>,
    stats: IoStats,
}

impl SimIo {
    /// A provider for the core whose memory is `mem`, at address `local`.
    pub fn new(local: SocketAddrV4, mem: Arc<CoreMem>, clock: SimClock) -> (SimIo, SimPort) {
        let port = SimPort::default();
        let io = SimIo {
            local,
            free: (0..mem.rx.count).rev().collect(),
            lent: vec![false; usize::from(mem.rx.count)],
            handed: mem.lent(),
            mem,
            clock,
            port: port.clone(),
            out: Vec::new(),
            stats: IoStats::default(),
        };
        (io, port)
    }

    fn receive(&mut self, out: &mut Vec<Event>) {
        let mut q = self.port.lock();
        while !q.inbox.is_empty() {
            let Some(&bid) = self.free.last() else {
                self.stats.rx_starved += 1;
                out.push(Event::RxStarved);
                return;
            };
            let d = q.inbox.pop_front().expect("front exists");
            if !self.mem.write_rx(bid, 0, &d.bytes) {
                self.stats.rx_truncated += 1;
                out.push(Event::RecvTruncated);
                continue;
            }
            self.free.pop();
            self.lent[usize::from(bid)] = true;
            self.handed.lend(bid);
            self.stats.recvs += 1;
            self.stats.bytes_received += d.bytes.len() as u64;
            let len = d.bytes.len() as u32;
            out.push(Event::Recv {
                from: SocketAddr::V4(d.from),
                bid,
                off: 0,
                len,
                seg: len,
                stamp_ns: None,
            });
        }
    }
}

impl DatagramIo for SimIo {
    fn send(&mut self, dst: SocketAddr, segs: &[Segment<'_>], token: u64) -> Result<(), SendError> {
        gso_size(segs)?;
        let SocketAddr::V4(dst) = super::sys::canonical(dst) else {
            self.out.push(Event::SendDone {
                token,
                result: Err(libc::EAFNOSUPPORT),
                kernel_copied: false,
            });
            return Ok(());
        };
        let mut datagrams = Vec::with_capacity(segs.len());
        for s in segs {
            let mut bytes = Vec::with_capacity(s.wire_len());
            bytes.extend_from_slice(s.hdr);
            for (off, len) in s.pieces() {
                if !self.mem.copy_tx(off, len, &mut bytes) {
                    return Err(SendError::OutOfPool);
                }
            }
            datagrams.push(Datagram {
                from: self.local,
                to: dst,
                bytes,
            });
        }
        let total: usize = datagrams.iter().map(|d| d.bytes.len()).sum();
        self.stats.sends += 1;
        self.stats.datagrams_sent += datagrams.len() as u64;
        self.stats.bytes_sent += total as u64;
        self.port.lock().outbox.extend(datagrams);
        self.out.push(Event::SendDone {
            token,
            result: Ok(total),
            kernel_copied: true,
        });
        Ok(())
    }

    fn return_rx(&mut self, bid: u16) {
        if let Some(l) = self.lent.get_mut(usize::from(bid)).filter(|l| **l) {
            *l = false;
            self.handed.take_back(bid);
            self.free.push(bid);
        }
    }

    fn rx_bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        self.mem.rx_bytes(bid, off, len)
    }

    fn rx_bytes_mut(&mut self, bid: u16, off: u32, len: u32) -> Option<&mut [u8]> {
        self.handed.bytes_mut(bid, off, len)
    }

    fn arm_doorbell(&mut self, _futex_seq: u32) {}

    fn wait(
        &mut self,
        deadline: Option<Instant>,
        block: bool,
        out: &mut Vec<Event>,
    ) -> io::Result<()> {
        let start = out.len();
        out.append(&mut self.out);
        self.receive(out);
        let mut port = self.port.lock();
        // A new deadline is a timer armed; the test's driver fires it.
        if deadline.is_some() && port.wake != deadline {
            self.stats.timers_armed += 1;
        }
        port.wake = deadline;
        drop(port);
        if deadline.is_some_and(|d| d <= self.clock.now()) {
            self.stats.timers_fired += 1;
            out.push(Event::Timer);
        }
        if block {
            self.stats.wakes.count(&out[start..]);
        }
        Ok(())
    }

    fn stats(&self) -> IoStats {
        self.stats
    }

    fn sends_in_flight(&self) -> usize {
        self.out.len()
    }

    fn rx_free(&self) -> usize {
        self.free.len()
    }

    fn rx_count(&self) -> usize {
        usize::from(self.mem.rx.count)
    }

    fn path_name(&self) -> &'static str {
        "sim"
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    fn realtime_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }
}
