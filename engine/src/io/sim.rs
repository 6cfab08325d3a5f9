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
//! A provider at an IPv4 address ([`SimIo::new`]) is an IPv4 socket: a send to an
//! IPv6 destination completes with `EAFNOSUPPORT`, and its port speaks
//! [`Datagram`]s. One at an IPv6 address ([`SimIo::new_at`]) is a dual-stack socket:
//! it sends to either family, reports an IPv4-mapped sender as IPv4, and its port
//! speaks [`Packet`]s ([`SimPort::take_sent_any`], [`SimPort::deliver_any`]).

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

/// A datagram of either family in the simulated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Sender.
    pub from: SocketAddr,
    /// Destination.
    pub to: SocketAddr,
    /// UDP payload.
    pub bytes: Vec<u8>,
}

impl From<Datagram> for Packet {
    fn from(d: Datagram) -> Packet {
        Packet {
            from: d.from.into(),
            to: d.to.into(),
            bytes: d.bytes,
        }
    }
}

#[derive(Debug, Default)]
struct Queues {
    outbox: VecDeque<Packet>,
    inbox: VecDeque<Packet>,
    wake: Option<Instant>,
}

/// The test's side of a [`SimIo`]: what it sent, what arrives for it.
#[derive(Debug, Clone, Default)]
pub struct SimPort(Arc<Mutex<Queues>>);

impl SimPort {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the datagrams sent since the last call, by a provider at an IPv4
    /// address (whose sends are all IPv4).
    ///
    /// # Panics
    /// On an IPv6 datagram (a provider at an IPv6 address): take those with
    /// [`SimPort::take_sent_any`].
    pub fn take_sent(&self) -> Vec<Datagram> {
        let v4 = |a: SocketAddr| match super::sys::canonical(a) {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(v6) => panic!("{v6} is IPv6: use take_sent_any"),
        };
        self.lock()
            .outbox
            .drain(..)
            .map(|p| Datagram {
                from: v4(p.from),
                to: v4(p.to),
                bytes: p.bytes,
            })
            .collect()
    }

    /// Takes the datagrams sent since the last call, of either family.
    pub fn take_sent_any(&self) -> Vec<Packet> {
        self.lock().outbox.drain(..).collect()
    }

    /// Hands a datagram to the provider (it is received at the next wait).
    pub fn deliver(&self, d: Datagram) {
        self.lock().inbox.push_back(d.into());
    }

    /// Hands a datagram of either family to the provider.
    pub fn deliver_any(&self, p: Packet) {
        self.lock().inbox.push_back(p);
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
    local: SocketAddr,
    mem: Arc<CoreMem>,
    clock: SimClock,
    port: SimPort,
    free: Vec<u16>,
    /// Which buffers are handed out (a buffer given back twice is ignored).
    lent: Vec<bool>,
    /// The same, and writable access to them.
    handed: super::sys::Lent,
    /// Receives per buffer ([`SimIo::cut_buffers`]; 1: whole buffers).
    cut: u16,
    /// The buffer being filled piece by piece, and its next piece.
    filling: Option<(u16, u16)>,
    out: Vec<Event>,
    stats: IoStats,
}

impl SimIo {
    /// A provider for the core whose memory is `mem`, at IPv4 address `local`.
    pub fn new(local: SocketAddrV4, mem: Arc<CoreMem>, clock: SimClock) -> (SimIo, SimPort) {
        SimIo::new_at(local.into(), mem, clock)
    }

    /// A provider at `local` of either family (an IPv6 one is dual-stack).
    pub fn new_at(local: SocketAddr, mem: Arc<CoreMem>, clock: SimClock) -> (SimIo, SimPort) {
        let port = SimPort::default();
        let io = SimIo {
            local,
            free: (0..mem.rx.count).rev().collect(),
            lent: vec![false; usize::from(mem.rx.count)],
            handed: mem.lent(),
            cut: 1,
            filling: None,
            mem,
            clock,
            port: port.clone(),
            out: Vec::new(),
            stats: IoStats::default(),
        };
        (io, port)
    }

    /// Cuts each RX buffer into `n` receives, as the io_uring path does once
    /// datagrams arrive one by one: consecutive datagrams fill one buffer's
    /// pieces, each handed out with its own `Recv`, and the buffer is free again
    /// once its last piece was handed out and the transport gave it back.
    pub fn cut_buffers(&mut self, n: u16) {
        self.cut = n.max(1);
    }

    fn receive(&mut self, out: &mut Vec<Event>) {
        let mut q = self.port.lock();
        while !q.inbox.is_empty() {
            let (bid, piece) = match self.filling {
                Some(f) => f,
                None => {
                    let Some(bid) = self.free.pop() else {
                        self.stats.rx_starved += 1;
                        out.push(Event::RxStarved);
                        return;
                    };
                    (bid, 0)
                }
            };
            let next = piece + 1;
            self.filling = (next < self.cut).then_some((bid, next));
            let room = self.mem.rx.buf_size / u32::from(self.cut);
            let off = u32::from(piece) * room;
            let d = q.inbox.pop_front().expect("front exists");
            if d.bytes.len() > room as usize || !self.mem.write_rx(bid, off, &d.bytes) {
                self.stats.rx_truncated += 1;
                out.push(Event::RecvTruncated);
                if self.filling.is_none() && !self.lent[usize::from(bid)] {
                    self.free.push(bid);
                }
                continue;
            }
            self.lent[usize::from(bid)] = true;
            self.handed.lend(bid);
            self.stats.recvs += 1;
            self.stats.bytes_received += d.bytes.len() as u64;
            let len = d.bytes.len() as u32;
            out.push(Event::Recv {
                from: super::sys::canonical(d.from),
                bid,
                off,
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
        let dst = super::sys::canonical(dst);
        if self.local.is_ipv4() && dst.is_ipv6() {
            self.out.push(Event::SendDone {
                token,
                result: Err(libc::EAFNOSUPPORT),
                kernel_copied: false,
            });
            return Ok(());
        }
        let mut datagrams = Vec::with_capacity(segs.len());
        for s in segs {
            let mut bytes = Vec::with_capacity(s.wire_len());
            bytes.extend_from_slice(s.hdr);
            for (off, len) in s.pieces() {
                if !self.mem.copy_tx(off, len, &mut bytes) {
                    return Err(SendError::OutOfPool);
                }
            }
            datagrams.push(Packet {
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
            // A buffer still being filled is free once its last piece is back.
            if self.filling.is_none_or(|(b, _)| b != bid) {
                self.free.push(bid);
            }
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

    fn rx_per_buf(&self) -> Option<f64> {
        (self.cut > 1).then_some(f64::from(self.cut))
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

/// A one-core region with small rings and pools, and that core's memory: what
/// the crate's simulation unit tests run a transport on.
#[cfg(test)]
pub(crate) fn small_core() -> (lu2k_ring_abi::Region, Arc<CoreMem>) {
    let region = lu2k_ring_abi::Region::create(&lu2k_ring_abi::Config {
        cores: 1,
        tx_entries: 64,
        tx_done_entries: 64,
        rx_entries: 64,
        rx_return_entries: 64,
        tx_pool_len: 1 << 20,
        rx_buf_size: 2048,
        rx_buf_count: 256,
        rx_tables_per_core: 16,
        ..lu2k_ring_abi::Config::default()
    })
    .expect("region");
    let mem = Arc::new(CoreMem::new(&region, 0, 1, 64, 64).expect("core mem"));
    (region, mem)
}

#[cfg(test)]
mod tests {
    //! The UDT transport between IPv6 peers on virtual time: what the sim
    //! provider's IPv6 side is for.

    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    use lu2k_ring_abi::{Nid, TxStatus, LNET_HDR_LEN};
    use lu2k_udt::wire::{ControlRepr, HandshakeRepr};

    use super::*;
    use crate::transport::seal::{Keyring, Psk};
    use crate::transport::udt::{Params, Udt};
    use crate::transport::{Event as TEvent, OutMsg, Transport as _};

    const PORT: u16 = 7988;
    const KEY: &[u8] = b"the IPv6 test network's key, 32 bytes or more";

    struct Node {
        udt: Udt,
        port: SimPort,
        addr: SocketAddr,
    }

    fn node(ip: IpAddr, clock: &SimClock, sealed: bool) -> Node {
        let (region, mem) = small_core();
        let addr = SocketAddr::new(ip, PORT);
        let (io, port) = SimIo::new_at(addr, mem.clone(), clock.clone());
        let net = "fd00::1@lu2k".parse::<Nid>().expect("nid").net();
        let udt = Udt::new(
            Params {
                core: 0,
                net,
                port: PORT,
                overrides: HashMap::new(),
                udt: lu2k_udt::conn::Config {
                    rcv_buf_pkts: Some(1024),
                    ..Default::default()
                },
                peer_down_timeout_us: 10_000_000,
                seed: u64::from(ip.is_ipv6()) + 7,
            },
            Box::new(io),
            region,
            mem.rx_first,
        );
        let udt = if sealed {
            let keys = Keyring {
                local: Some(ip),
                net: vec![Psk::from_bytes(KEY).expect("psk")],
                ..Keyring::default()
            };
            let scratch = mem.take_seal_scratch().expect("scratch");
            udt.with_security(keys, Default::default(), scratch)
        } else {
            udt
        };
        Node { udt, port, addr }
    }

    /// A → B: `count` messages to `to` (B's address as A knows it) until A has
    /// every completion and B every message (20 s of virtual time at most),
    /// datagrams carried by `net` (`true`: from A to B). Returns A's first
    /// datagram (its handshake) and whom B's messages came from.
    fn exchange(
        a: &mut Node,
        b: &mut Node,
        to: IpAddr,
        clock: &SimClock,
        count: u64,
        net: &dyn Fn(Packet, bool) -> Packet,
    ) -> (Packet, Vec<IpAddr>) {
        let len = 3000u32;
        for id in 0..count {
            a.udt.handle_send(OutMsg {
                id,
                peer: to,
                hdr: (0, LNET_HDR_LEN as u32),
                payload: vec![(4096 + id * 8192, len)],
                payload_len: len,
            });
        }
        let (mut ok, mut from, mut first) = (0, Vec::new(), None);
        let end = clock.elapsed() + Duration::from_secs(20);
        while (ok < count || (from.len() as u64) < count) && clock.elapsed() < end {
            for n in [&mut *a, &mut *b] {
                n.udt.wait(None, false).expect("wait");
                n.udt.handle_timeout();
                while n.udt.poll_transmit() {}
                while let Some(ev) = n.udt.poll_event() {
                    match ev {
                        TEvent::Sent { status, .. } => {
                            assert_eq!(status, TxStatus::Ok);
                            ok += 1;
                        }
                        TEvent::Received { peer, bufs, pieces } => {
                            let got: u32 = pieces.iter().map(|p| p.len).sum();
                            assert_eq!(got, LNET_HDR_LEN as u32 + len);
                            from.push(peer);
                            n.udt.handle_return(&bufs);
                        }
                        _ => {}
                    }
                }
            }
            for p in a.port.take_sent_any() {
                first.get_or_insert_with(|| p.clone());
                b.port.deliver_any(net(p, true));
            }
            for p in b.port.take_sent_any() {
                a.port.deliver_any(net(p, false));
            }
            clock.advance_to(clock.now() + Duration::from_millis(1));
        }
        assert_eq!(ok, count, "A's completions");
        (first.expect("A sent"), from)
    }

    /// `max_rate_mbps` of a `[[peer]]`: what a core sends to that peer is paced
    /// no faster than its cap, from the first packet on (the controller's fast
    /// start would take the whole link it measures).
    #[test]
    fn a_rate_cap_paces_what_a_core_sends_to_its_peer() {
        let run = |cap_bps: Option<u64>| {
            let clock = SimClock::new();
            let ia: IpAddr = "fd00::1".parse().unwrap();
            let ib: IpAddr = "fd00::2".parse().unwrap();
            let mut a = node(ia, &clock, false);
            if let Some(c) = cap_bps {
                a.udt = a.udt.with_rate_caps(HashMap::from([(ib, c)]));
            }
            let mut b = node(ib, &clock, false);
            let start = clock.elapsed();
            exchange(&mut a, &mut b, ib, &clock, 100, &|p, _| p);
            (clock.elapsed() - start).as_secs_f64()
        };
        // 100 messages of 3000 + 72 bytes: 300 packets of at most 1500 bytes.
        let cap = 2_000_000;
        let least = 300.0 * 1500.0 * 8.0 / cap as f64 * (299.0 / 300.0);
        let capped = run(Some(cap));
        let free = run(None);
        assert!(
            capped >= least * 0.98 && capped < least * 1.5,
            "capped at 2 Mbit/s: {capped:.3} s, pacing needs {least:.3} s"
        );
        assert!(free < least / 4.0, "uncapped: {free:.3} s");
    }

    /// B's peers as its stats name them.
    fn peer_addrs(n: &mut Node) -> Vec<String> {
        let mut s = crate::daemon::stats::CoreStats::default();
        n.udt.stats(&mut s);
        s.peers.iter().map(|p| p.addr.clone()).collect()
    }

    #[test]
    fn udt_between_ipv6_peers_on_virtual_time() {
        for sealed in [false, true] {
            let clock = SimClock::new();
            let ia: IpAddr = "fd00::1".parse().unwrap();
            let ib: IpAddr = "fd00::2".parse().unwrap();
            let mut a = node(ia, &clock, sealed);
            let mut b = node(ib, &clock, sealed);
            let (aa, ba) = (a.addr, b.addr);
            let net = |p: Packet, a_to_b: bool| {
                let (from, to) = if a_to_b { (aa, ba) } else { (ba, aa) };
                assert_eq!((p.from, p.to), (from, to), "misaddressed");
                p
            };
            let (first, from) = exchange(&mut a, &mut b, ib, &clock, 20, &net);
            assert_eq!(from, vec![ia; 20], "sealed {sealed}");
            if !sealed {
                // UDT4's handshake names the peer's IPv6 address in its four
                // peer-IP words.
                let hs = match ControlRepr::parse_bytes(&first.bytes) {
                    Ok(ControlRepr::Handshake(h)) => h,
                    other => panic!("the first datagram is no handshake: {other:?}"),
                };
                assert_eq!(HandshakeRepr::decode_peer_ip(hs.peer_ip, true), ib);
            }
            assert_eq!(peer_addrs(&mut b), ["[fd00::1]:7988"], "sealed {sealed}");
        }
    }

    #[test]
    fn an_ipv4_peer_of_a_dual_stack_node_is_one_ipv4_peer() {
        // B is dual-stack (an IPv6 provider) with IPv4 address 10.0.0.2 too; A
        // is IPv4 at 10.0.0.1. A's datagrams reach B as ::ffff:10.0.0.1, as a
        // dual-stack socket sees them; B's replies leave from 10.0.0.2.
        let clock = SimClock::new();
        let ia = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let ib4 = Ipv4Addr::new(10, 0, 0, 2);
        let mut a = node(ia, &clock, false);
        let mut b = node("fd00::2".parse().unwrap(), &clock, false);
        let net = |mut p: Packet, a_to_b: bool| {
            if a_to_b {
                assert_eq!(p.to, SocketAddr::new(ib4.into(), PORT));
                let SocketAddr::V4(f) = p.from else {
                    panic!("A is IPv4")
                };
                p.from = SocketAddr::new(f.ip().to_ipv6_mapped().into(), f.port());
            } else {
                // B writes A's address as it names A: the IPv4 one.
                assert_eq!(p.to, SocketAddr::new(ia, PORT));
                p.from = SocketAddr::new(ib4.into(), PORT);
            }
            p
        };
        let (_, from) = exchange(&mut a, &mut b, ib4.into(), &clock, 10, &net);
        assert_eq!(from, vec![ia; 10], "B names A by its IPv4 address");
        assert_eq!(peer_addrs(&mut b), ["10.0.0.1:7988"], "one peer, IPv4");
    }
}
