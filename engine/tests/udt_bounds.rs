//! The UDT transport's bounds against a hostile sender, on virtual time: one
//! transport ([`Udt`] over [`SimIo`]) and UDT clients (`lu2k_udt`'s own
//! [`Connection`]) pumped by hand, so every run is the same.
//!
//! - Many handshakes from one address: at most `MAX_CONNS_PER_ADDR`
//!   connections, the rest refused and counted; once the clients are gone their
//!   connections are removed and their peer forgotten.
//! - A message that starts, continues in order and never ends (longer than any
//!   LNet message) cannot pin the RX pool: its connection is closed
//!   (`rx_message_too_long`) when memory runs short or when it stalls, every
//!   buffer comes back, another peer's message still arrives. One that does end
//!   but is longer than LNet allows is not delivered.
//! - Junk from a silent peer's address does not hide that it is silent: it is
//!   reported down.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use lu2k_engine::daemon::stats::CoreStats;
use lu2k_engine::io::sim::{Datagram, SimClock, SimIo, SimPort};
use lu2k_engine::io::sys::CoreMem;
use lu2k_engine::transport::udt::{self, Udt, MAX_CONNS_PER_ADDR};
use lu2k_engine::transport::{Event, OutMsg, Transport as _};
use lu2k_ring_abi::{Config as RegionConfig, Net, Nid, Region, TxStatus, LNET_HDR_LEN};
use lu2k_udt::conn::{self as conn, Connection, Extent};

const PORT: u16 = 7988;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// The transport under test and its side of the simulated network.
struct Server {
    udt: Udt,
    port: SimPort,
    clock: SimClock,
    addr: SocketAddrV4,
    rx_count: usize,
    /// Whole messages received, by sender address.
    received: HashMap<Ipv4Addr, u64>,
    events: Vec<Event>,
    _region: Region,
}

fn udt_config(timeout_us: u64) -> conn::Config {
    conn::Config {
        mss: 1500,
        idle_timeout_us: timeout_us,
        connect_timeout_us: timeout_us,
        rcv_buf_pkts: Some(4096),
        ..Default::default()
    }
}

fn net() -> Net {
    format!("{SERVER}@tcp").parse::<Nid>().expect("nid").net()
}

impl Server {
    fn new(rx_bufs: u32, idle_us: u64, peer_down_us: u64) -> Server {
        let region = Region::create(&RegionConfig {
            cores: 1,
            tx_entries: 64,
            tx_done_entries: 64,
            rx_entries: 64,
            rx_return_entries: 64,
            tx_pool_len: 1 << 20,
            rx_buf_size: 2048,
            rx_buf_count: rx_bufs,
            rx_tables_per_core: 16,
            ..RegionConfig::default()
        })
        .expect("region");
        let mem = Arc::new(CoreMem::new(&region, 0, 1, 64, 64).expect("core mem"));
        let clock = SimClock::new();
        let addr = SocketAddrV4::new(SERVER, PORT);
        let (io, port) = SimIo::new(addr, mem.clone(), clock.clone());
        let udt = Udt::new(
            udt::Params {
                core: 0,
                net: net(),
                port: PORT,
                overrides: HashMap::new(),
                udt: udt_config(idle_us),
                peer_down_timeout_us: peer_down_us,
                seed: 42,
            },
            Box::new(io),
            region.clone(),
            mem.rx_first,
        );
        Server {
            udt,
            port,
            clock,
            addr,
            rx_count: rx_bufs as usize,
            received: HashMap::new(),
            events: Vec::new(),
            _region: region,
        }
    }

    fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    /// One pass of the transport: take what arrived, run timers, send, report
    /// (a received message's buffers are given back at once, as kshim would).
    fn step(&mut self) -> Vec<Datagram> {
        self.udt.wait(None, false).expect("wait");
        self.udt.handle_timeout();
        while self.udt.poll_transmit() {}
        while let Some(ev) = self.udt.poll_event() {
            if let Event::Received { peer, bufs, .. } = &ev {
                if let std::net::IpAddr::V4(p) = peer {
                    *self.received.entry(*p).or_default() += 1;
                }
                self.udt.handle_return(bufs);
            }
            self.events.push(ev);
        }
        self.port.take_sent()
    }

    fn stats(&mut self) -> CoreStats {
        let mut s = CoreStats::default();
        self.udt.stats(&mut s);
        s
    }

    fn drops(&mut self, reason: &str) -> u64 {
        self.stats().drops.get(reason).copied().unwrap_or(0)
    }

    fn rx_free(&self) -> usize {
        self.udt.io().rx_free()
    }
}

/// A UDT client at `addr`.
struct Client {
    conn: Connection,
    addr: SocketAddrV4,
    /// Its data packets that end a message are lost on the way, every time: what
    /// the server sees is a message that starts, continues in order and never
    /// ends.
    endless: bool,
}

impl Client {
    fn new(s: &Server, addr: SocketAddrV4, seed: u64, max_message: u32) -> Client {
        let mut cfg = udt_config(5_000_000);
        cfg.max_message_bytes = max_message;
        Client {
            conn: Connection::connect(s.now_us(), cfg, seed, SocketAddr::V4(s.addr)),
            addr,
            endless: false,
        }
    }
}

/// Runs server and clients for `d` of virtual time in steps of `tick`.
fn pump(s: &mut Server, clients: &mut [Client], d: Duration, tick: Duration) {
    let end = s.clock.elapsed() + d;
    while s.clock.elapsed() < end {
        let now = s.now_us();
        for c in clients.iter_mut() {
            if c.conn.poll_timeout().is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
            while let Some(t) = c.conn.poll_transmit(now) {
                let mut bytes = t.header.as_bytes().to_vec();
                if let Some(p) = t.payload {
                    bytes.resize(bytes.len() + p.len as usize, 0x5A);
                    // Word 1 of a data header: the position's "last" bit.
                    if c.endless && bytes[4] & 0x40 != 0 {
                        continue;
                    }
                }
                s.port.deliver(Datagram {
                    from: c.addr,
                    to: s.addr,
                    bytes,
                });
            }
            while c.conn.poll_event().is_some() {}
        }
        for d in s.step() {
            if let Some(c) = clients.iter_mut().find(|c| c.addr == d.to) {
                let at = Extent {
                    buf: 0,
                    offset: 0,
                    len: d.bytes.len() as u32,
                };
                let _ = c.conn.handle_datagram(now, &d.bytes, at);
                while c.conn.poll_release().is_some() {}
            }
        }
        s.clock.advance_to(s.clock.now() + tick);
    }
}

#[test]
fn handshakes_from_one_address_are_capped_and_forgotten() {
    let mut s = Server::new(1024, 5_000_000, 5_000_000);
    let ip = Ipv4Addr::new(10, 0, 0, 66);
    let n = MAX_CONNS_PER_ADDR + 6;
    let mut clients: Vec<Client> = (0..n)
        .map(|i| {
            Client::new(
                &s,
                SocketAddrV4::new(ip, 40000 + i as u16),
                1000 + i as u64,
                1 << 20,
            )
        })
        .collect();
    pump(
        &mut s,
        &mut clients,
        Duration::from_secs(1),
        Duration::from_millis(1),
    );
    let connected = clients.iter().filter(|c| c.conn.is_connected()).count();
    assert!(
        connected <= MAX_CONNS_PER_ADDR,
        "{connected} connections from one address"
    );
    assert!(connected > 0, "no client connected at all");
    // Whoever refuses (the listener's own caps, or the transport's), it is counted.
    let refused = s.drops("rx_conn_limit_addr") + s.drops("rx_bad_handshake");
    assert!(refused > 0, "refusals not counted: {:?}", s.stats().drops);
    assert_eq!(s.stats().peers.len(), 1);
    // The clients vanish: their connections idle out, are removed, and the
    // stranger that never carried a message is forgotten.
    clients.clear();
    pump(
        &mut s,
        &mut clients,
        Duration::from_secs(70),
        Duration::from_millis(50),
    );
    let dbg = format!("{:?}", s.udt);
    assert!(dbg.contains("conns: 0"), "connections left: {dbg}");
    assert!(
        s.stats().peers.is_empty(),
        "peer kept: {:?}",
        s.stats().peers
    );
    assert_eq!(s.rx_free(), s.rx_count, "RX buffers leaked");
}

#[test]
fn a_message_that_never_ends_is_cut_off_and_others_still_arrive() {
    // 3000 buffers: the 3 MiB message's 2160 packets fit, and are more than a
    // largest message; an honest 1 MiB message (721 packets) still fits beside
    // what the reserve leaves only once the hostile one is gone.
    let mut s = Server::new(3000, 30_000_000, 30_000_000);
    let bad = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 66), PORT);
    let good = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), PORT);
    let mut clients = vec![
        Client::new(&s, bad, 7, 4 << 20),
        Client::new(&s, good, 8, 2 << 20),
    ];
    clients[0].endless = true;
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(200),
        Duration::from_millis(1),
    );
    assert!(clients.iter().all(|c| c.conn.is_connected()));
    let now = s.now_us();
    clients[0].conn.send(now, 1, 3 << 20, None).expect("send");
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(500),
        Duration::from_micros(100),
    );
    let hdr = LNET_HDR_LEN as u64;
    let now = s.now_us();
    clients[1]
        .conn
        .send(now, 1, lu2k_ring_abi::MAX_PAYLOAD as u64 + hdr, None)
        .expect("send");
    pump(
        &mut s,
        &mut clients,
        Duration::from_secs(5),
        Duration::from_micros(100),
    );
    assert_eq!(s.drops("rx_message_too_long"), 1, "{:?}", s.stats().drops);
    assert_eq!(
        s.received.get(bad.ip()),
        None,
        "the endless message delivered"
    );
    assert_eq!(
        s.received.get(good.ip()).copied(),
        Some(1),
        "the honest message did not arrive: {:?}",
        s.stats().drops
    );
    assert_eq!(s.rx_free(), s.rx_count, "RX buffers still held");
}

#[test]
fn a_message_that_never_ends_is_cut_off_when_it_stalls_with_memory_to_spare() {
    // A pool far larger than the message: no shortage, no quota excess; only the
    // stall (nothing delivered for 2 s while holding more than a largest
    // message) brings the check.
    let mut s = Server::new(8192, 30_000_000, 30_000_000);
    let bad = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 66), PORT);
    let mut clients = vec![Client::new(&s, bad, 7, 4 << 20)];
    clients[0].endless = true;
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(200),
        Duration::from_millis(1),
    );
    let now = s.now_us();
    clients[0].conn.send(now, 1, 3 << 20, None).expect("send");
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(1500),
        Duration::from_micros(100),
    );
    assert_eq!(s.drops("rx_message_too_long"), 0, "cut off before stalling");
    assert!(s.rx_free() < s.rx_count, "the message is not held at all");
    pump(
        &mut s,
        &mut clients,
        Duration::from_secs(2),
        Duration::from_micros(100),
    );
    assert_eq!(s.drops("rx_message_too_long"), 1, "{:?}", s.stats().drops);
    assert_eq!(s.rx_free(), s.rx_count, "RX buffers still held");
}

#[test]
fn a_message_longer_than_lnet_allows_is_not_delivered() {
    let mut s = Server::new(8192, 30_000_000, 30_000_000);
    let bad = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 66), PORT);
    let mut clients = vec![Client::new(&s, bad, 7, 4 << 20)];
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(200),
        Duration::from_millis(1),
    );
    let now = s.now_us();
    clients[0].conn.send(now, 1, 3 << 20, None).expect("send");
    pump(
        &mut s,
        &mut clients,
        Duration::from_millis(1500),
        Duration::from_micros(100),
    );
    assert_eq!(s.drops("rx_message_too_long"), 1, "{:?}", s.stats().drops);
    assert_eq!(
        s.received.get(bad.ip()),
        None,
        "the over-long message delivered"
    );
    assert_eq!(s.rx_free(), s.rx_count, "RX buffers still held");
}

#[test]
fn junk_from_a_silent_peers_address_does_not_keep_it_up() {
    let down_us = 1_000_000;
    let mut s = Server::new(256, 60_000_000, down_us);
    let peer = Ipv4Addr::new(10, 0, 0, 2);
    // A message for a peer that never answers; the TX memory's content does not
    // matter here.
    s.udt.handle_send(OutMsg {
        id: 1,
        peer: peer.into(),
        hdr: (0, LNET_HDR_LEN as u32),
        payload: vec![(4096, 1000)],
        payload_len: 1000,
    });
    let mut tx_sock = None;
    let end = s.clock.elapsed() + Duration::from_secs(4);
    while s.clock.elapsed() < end {
        for d in s.step() {
            // The handshake request names our connection's socket ID.
            if tx_sock.is_none() && d.bytes.len() >= 48 {
                tx_sock = Some(u32::from_be_bytes(d.bytes[40..44].try_into().unwrap()));
            }
        }
        // From the peer's address: junk to an unknown socket, and a malformed
        // control packet to the connection itself.
        let from = SocketAddrV4::new(peer, PORT);
        let mut junk = vec![0xEEu8; 40];
        junk[12..16].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        s.port.deliver(Datagram {
            from,
            to: s.addr,
            bytes: junk,
        });
        if let Some(id) = tx_sock {
            let mut bad = vec![0u8; 16];
            bad[0] = 0xFF; // control, type 0x7FFF: no such type
            bad[1] = 0xFF;
            bad[12..16].copy_from_slice(&id.to_be_bytes());
            s.port.deliver(Datagram {
                from,
                to: s.addr,
                bytes: bad,
            });
        }
        s.clock
            .advance_to(s.clock.now() + Duration::from_millis(10));
    }
    assert!(tx_sock.is_some(), "no handshake request seen");
    assert!(
        s.events.contains(&Event::PeerDown(peer.into())),
        "the peer was never reported down: {:?}",
        s.events
    );
    assert!(
        s.events.iter().any(|e| matches!(
            e,
            Event::Sent { id: 1, status, .. } if *status != TxStatus::Ok
        )),
        "the message was not failed back: {:?}",
        s.events
    );
}
