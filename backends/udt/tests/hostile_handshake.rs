//! The listener against a hostile network, on virtual time: cookies bound to
//! address, port, client socket and a short time bucket under a secret key;
//! floods of requests, from one address or from spoofed ones, answered a
//! bounded number of times and never with more bytes than they sent;
//! connections per address capped; forged listener replies ignored by a
//! connecting client. The normal handshake still completes (interop with
//! the reference UDT4 is `interop_udt4.rs`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lu2k_udt::conn::{handshake_socket_id, Config, Connection, Extent, Listener, ListenerOutput};
use lu2k_udt::seq::SeqNo;
use lu2k_udt::wire::{ControlRepr, HandshakeRepr, Packet, ReqType, SocketType};

const KEY: [u8; 16] = *b"0123456789abcdef";
const BUCKET: u64 = 30_000_000;

fn client_addr() -> SocketAddr {
    "192.0.2.1:7000".parse().unwrap()
}

fn server_addr() -> SocketAddr {
    "192.0.2.2:9000".parse().unwrap()
}

fn listener() -> Listener {
    Listener::with_key(0, Config::default(), KEY, 1)
}

fn hs(req_type: ReqType, socket_id: u32, cookie: u32) -> HandshakeRepr {
    HandshakeRepr {
        version: HandshakeRepr::UDT4_VERSION,
        socket_type: SocketType::Dgram,
        isn: SeqNo::new(1000),
        mss: 1500,
        flight_flag_size: 8192,
        req_type,
        socket_id,
        cookie,
        peer_ip: HandshakeRepr::encode_peer_ip(server_addr().ip()),
    }
}

fn bytes(h: HandshakeRepr) -> Vec<u8> {
    ControlRepr::Handshake(h).to_vec(0, 0)
}

/// The cookie `l` answers a first request with.
fn cookie(l: &mut Listener, now: u64, peer: SocketAddr, socket_id: u32) -> u32 {
    let ListenerOutput::Reply(h) = l.handle(now, peer, &bytes(hs(ReqType::Request, socket_id, 0)))
    else {
        panic!("no cookie for {peer}")
    };
    let pkt = Packet::new_checked(h.as_bytes()).unwrap();
    let Ok(ControlRepr::Handshake(reply)) = ControlRepr::parse(&pkt) else {
        panic!("reply is not a handshake")
    };
    assert_eq!(reply.req_type, ReqType::Request);
    reply.cookie
}

fn respond(l: &mut Listener, now: u64, peer: SocketAddr, socket_id: u32, c: u32) -> bool {
    match l.handle(now, peer, &bytes(hs(ReqType::Response, socket_id, c))) {
        ListenerOutput::Accept(conn) => {
            assert!(conn.is_connected());
            true
        }
        ListenerOutput::Drop(_) => false,
        ListenerOutput::Reply(_) => panic!("unexpected reply"),
    }
}

#[test]
fn cookie_is_bound_to_address_port_socket_and_bucket() {
    let peer = client_addr();
    let c = cookie(&mut listener(), 10, peer, 77);

    let other_ip = SocketAddr::new("192.0.2.99".parse().unwrap(), peer.port());
    let other_port = SocketAddr::new(peer.ip(), peer.port() + 1);
    let mut l = listener();
    assert!(!respond(&mut l, 20, other_ip, 77, c), "another address");
    assert!(!respond(&mut l, 20, other_port, 77, c), "another port");
    assert!(!respond(&mut l, 20, peer, 78, c), "another client socket");
    assert!(!respond(&mut l, 2 * BUCKET + 20, peer, 77, c), "expired");
    assert_eq!(l.stats().refused_bad_cookie, 4);
    assert_eq!(l.stats().accepted, 0);

    // The issuing bucket and the next one, by the same key: accepted.
    assert!(respond(&mut listener(), 20, peer, 77, c));
    assert!(respond(&mut listener(), BUCKET + 20, peer, 77, c));
    // A cookie issued at the very end of a bucket lives at most one more.
    let late = cookie(&mut listener(), BUCKET - 1, peer, 77);
    assert!(respond(&mut listener(), 2 * BUCKET - 1, peer, 77, late));
    assert!(!respond(&mut listener(), 2 * BUCKET, peer, 77, late));
}

#[test]
fn different_keys_give_different_cookies() {
    let peer = client_addr();
    let mut a = Listener::with_key(0, Config::default(), KEY, 1);
    let mut b = Listener::with_key(0, Config::default(), *b"another 16B key!", 1);
    let mut differ = 0;
    for id in 1..=16 {
        let (ca, cb) = (cookie(&mut a, 10, peer, id), cookie(&mut b, 10, peer, id));
        differ += usize::from(ca != cb);
        // And one listener's cookie opens nothing at the other.
        assert!(!respond(&mut b, 20, peer, id, ca));
    }
    assert_eq!(differ, 16);
    // The seed-only constructor keys by its seed.
    let ca = cookie(&mut Listener::new(0, Config::default(), 1), 10, peer, 5);
    let cb = cookie(&mut Listener::new(0, Config::default(), 2), 10, peer, 5);
    assert_ne!(ca, cb);
}

#[test]
fn flood_from_one_address_gets_bounded_replies() {
    let mut l = listener();
    let lim = l.limits_mut().clone();
    let (mut replies, mut sent_bytes, mut reply_bytes) = (0u64, 0usize, 0usize);
    // 20 000 first requests in one second from one IP, every port and
    // socket ID different.
    for i in 0..20_000u32 {
        let now = u64::from(i) * 50;
        let peer = SocketAddr::new(client_addr().ip(), 1024 + (i % 60_000) as u16);
        let req = bytes(hs(ReqType::Request, i + 1, 0));
        sent_bytes += req.len();
        if let ListenerOutput::Reply(h) = l.handle(now, peer, &req) {
            assert!(h.as_bytes().len() <= req.len(), "amplification");
            replies += 1;
            reply_bytes += h.as_bytes().len();
        }
    }
    let bound =
        u64::from(lim.replies_per_addr_burst) + 1_000_000 / lim.replies_per_addr_interval_us;
    assert!(replies <= bound, "{replies} replies > {bound}");
    assert!(replies > 0);
    assert!(reply_bytes <= sent_bytes);
    assert_eq!(l.stats().refused_rate_addr, 20_000 - replies);
    assert_eq!(l.stats().cookies_sent, replies);
    // Another address is still served.
    let other = SocketAddr::new("192.0.2.50".parse().unwrap(), 7000);
    let c = cookie(&mut l, 1_000_000, other, 9);
    assert!(respond(&mut l, 1_000_100, other, 9, c));
}

#[test]
fn flood_from_spoofed_sources_is_bounded_in_total() {
    let mut l = listener();
    l.limits_mut().max_tracked_addrs = 1000;
    let lim = l.limits_mut().clone();
    let mut replies = 0u64;
    let n = 100_000u32;
    // One second of requests, each from a different address.
    for i in 0..n {
        let now = u64::from(i) * 10;
        let ip = Ipv4Addr::from(0x0A00_0000 | i);
        let peer = SocketAddr::new(IpAddr::V4(ip), 5000);
        if let ListenerOutput::Reply(_) =
            l.handle(now, peer, &bytes(hs(ReqType::Request, i + 1, 0)))
        {
            replies += 1;
        }
    }
    let bound = u64::from(lim.replies_total_burst) + 1_000_000 / lim.replies_total_interval_us;
    assert!(replies <= bound, "{replies} replies > {bound}");
    let s = l.stats();
    assert_eq!(
        s.refused_rate_total + s.refused_table_full + s.refused_rate_addr,
        u64::from(n) - replies,
        "{s:?}"
    );
    assert!(
        s.refused_rate_total > 0 && s.refused_table_full > 0,
        "{s:?}"
    );
}

#[test]
fn bad_cookie_guessing_is_rate_limited() {
    let mut l = listener();
    let lim = l.limits_mut().clone();
    let peer = client_addr();
    // A blind guesser from one address: one second of tries.
    for i in 0..100_000u32 {
        assert!(!respond(&mut l, u64::from(i) * 10, peer, 77, i));
    }
    let s = l.stats();
    let bound =
        u64::from(lim.replies_per_addr_burst) + 1_000_000 / lim.replies_per_addr_interval_us;
    assert!(s.refused_bad_cookie <= bound, "{s:?}");
    assert_eq!(s.refused_bad_cookie + s.refused_rate_addr, 100_000);
}

#[test]
fn connections_per_address_are_capped() {
    let mut l = listener();
    l.limits_mut().max_conns_per_addr = 2;
    let interval = l.limits_mut().conn_interval_us;
    let ip = client_addr().ip();
    let open = |l: &mut Listener, now: u64, id: u32| {
        let peer = SocketAddr::new(ip, 7000 + id as u16);
        let c = cookie(l, now, peer, id);
        respond(l, now + 1, peer, id, c)
    };
    assert!(open(&mut l, 10, 1));
    assert!(open(&mut l, 20, 2));
    assert!(!open(&mut l, 30, 3), "third connection in a burst");
    assert_eq!(l.stats().refused_conn_cap, 1);
    // Another address has its own allowance.
    let other = SocketAddr::new("192.0.2.7".parse().unwrap(), 7000);
    let c = cookie(&mut l, 40, other, 4);
    assert!(respond(&mut l, 41, other, 4, c));
    // The allowance comes back with time.
    assert!(open(&mut l, 30 + interval, 5));
    assert_eq!(l.stats().accepted, 4);
}

#[test]
fn truncated_request_gets_no_reply() {
    let mut l = listener();
    let req = bytes(hs(ReqType::Request, 5, 0));
    for len in 0..req.len() {
        assert!(
            matches!(
                l.handle(10, client_addr(), &req[..len]),
                ListenerOutput::Drop(_)
            ),
            "len {len}"
        );
    }
    assert_eq!(l.stats().cookies_sent, 0);
}

/// Client and listener over a link with a fixed one-way delay; `lose`
/// decides for the nth datagram each way (client→server, server→client)
/// whether it is lost. Returns the server connection once both are
/// connected.
fn handshake(
    client: &mut Connection,
    l: &mut Listener,
    mut lose: impl FnMut(bool, u32) -> bool,
) -> Box<Connection> {
    let delay = 20_000;
    let mut now = 0u64;
    let mut server: Option<Box<Connection>> = None;
    let mut wire: Vec<(u64, bool, Vec<u8>)> = Vec::new();
    let mut count = [0u32; 2];
    let at = |len: usize| Extent {
        buf: 0,
        offset: 0,
        len: len as u32,
    };
    while now < 5_000_000 {
        while let Some(t) = client.poll_transmit(now) {
            count[0] += 1;
            if !lose(true, count[0]) {
                wire.push((now + delay, true, t.header.as_bytes().to_vec()));
            }
        }
        if let Some(s) = server.as_mut() {
            while let Some(t) = s.poll_transmit(now) {
                count[1] += 1;
                if !lose(false, count[1]) {
                    wire.push((now + delay, false, t.header.as_bytes().to_vec()));
                }
            }
        }
        if client.is_connected() && server.as_ref().is_some_and(|s| s.is_connected()) {
            return server.unwrap();
        }
        let due: Vec<_> = wire.iter().filter(|w| w.0 <= now).cloned().collect();
        wire.retain(|w| w.0 > now);
        for (_, to_server, d) in due {
            if !to_server {
                client.handle_datagram(now, &d, at(d.len()));
                continue;
            }
            let known = server
                .as_ref()
                .is_some_and(|s| handshake_socket_id(&d) == Some(s.peer_socket_id()));
            if known {
                server
                    .as_mut()
                    .unwrap()
                    .handle_datagram(now, &d, at(d.len()));
                continue;
            }
            match l.handle(now, client_addr(), &d) {
                ListenerOutput::Reply(h) => {
                    count[1] += 1;
                    if !lose(false, count[1]) {
                        wire.push((now + delay, false, h.as_bytes().to_vec()));
                    }
                }
                ListenerOutput::Accept(c) => server = Some(c),
                ListenerOutput::Drop(cause) => panic!("listener dropped: {cause:?}"),
            }
        }
        now += 1_000;
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        if let Some(s) = server.as_mut() {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
    }
    panic!("no connection after 5 s");
}

#[test]
fn normal_handshake_still_connects() {
    let mut client = Connection::connect(0, Config::default(), 3, server_addr());
    let mut l = listener();
    let server = handshake(&mut client, &mut l, |_, _| false);
    assert_eq!(server.peer_socket_id(), client.socket_id());
    assert_eq!(client.peer_socket_id(), server.socket_id());
    assert_eq!(l.stats().accepted, 1);
    assert_eq!(l.stats().cookies_sent, 1);
}

#[test]
fn lost_response_is_repeated_to_the_cookie_holder() {
    // The server's first response is lost (the cookie is the listener's
    // first datagram, the response the server's second): the client's
    // retry, which carries the cookie, gets it again.
    let mut client = Connection::connect(0, Config::default(), 4, server_addr());
    let mut l = listener();
    let server = handshake(&mut client, &mut l, |to_server, n| !to_server && n == 2);
    assert_eq!(server.peer_socket_id(), client.socket_id());
    assert_eq!(l.stats().accepted, 1);
}

#[test]
fn established_server_answers_only_handshakes_with_its_cookie() {
    let mut client = Connection::connect(0, Config::default(), 5, server_addr());
    let mut l = listener();
    let mut server = handshake(&mut client, &mut l, |_, _| false);
    while server.poll_transmit(1_000_000).is_some() {}
    let id = client.socket_id();
    let at = Extent {
        buf: 0,
        offset: 0,
        len: 64,
    };
    // A request or a response without the cookie, with the client's socket
    // ID: no reply.
    for (req_type, cookie) in [(ReqType::Request, 0), (ReqType::Response, 0x1234)] {
        let d = ControlRepr::Handshake(hs(req_type, id, cookie)).to_vec(0, 0);
        server.handle_datagram(1_000_000, &d, at);
        assert!(
            server.poll_transmit(1_000_000).is_none(),
            "{req_type:?} answered"
        );
    }
}

#[test]
fn forged_listener_replies_do_not_close_a_connecting_client() {
    let mut client = Connection::connect(0, Config::default(), 6, server_addr());
    let sent = client.poll_transmit(0).expect("first request");
    let pkt = Packet::new_checked(sent.header.as_bytes()).unwrap();
    let Ok(ControlRepr::Handshake(req)) = ControlRepr::parse(&pkt) else {
        panic!()
    };
    let at = Extent {
        buf: 0,
        offset: 0,
        len: 64,
    };
    // An off-path attacker who guessed the socket ID but not the ISN.
    for req_type in [ReqType::Rejected, ReqType::Request] {
        let forged = HandshakeRepr {
            req_type,
            isn: req.isn.next(),
            cookie: 0xBAD,
            ..req
        };
        let d = ControlRepr::Handshake(forged).to_vec(0, client.socket_id());
        client.handle_datagram(0, &d, at);
    }
    // Still connecting with no cookie: the real handshake completes.
    let mut l = listener();
    let server = handshake(&mut client, &mut l, |_, _| false);
    assert_eq!(server.peer_socket_id(), client.socket_id());
}
