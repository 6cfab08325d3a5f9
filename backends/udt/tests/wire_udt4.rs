//! The wire layer against the real UDT 4.11 (through the `udt` crate), over
//! loopback, with a plain `UdpSocket` on our side and nothing but
//! `lu2k_udt::wire` to read and write packets:
//!
//! * a UDT4 client connects to us: we parse its real handshake request,
//!   answer with a SYN cookie, parse the repeated request, answer with our
//!   response, and UDT4's `connect` succeeds; it sends a message, we parse
//!   the data packet, acknowledge it and UDT4 answers our ACK with an ACK2;
//! * we connect to a UDT4 listener the same way, send data packets (one in
//!   order, one after a deliberate gap), and parse the ACK and the NAK that
//!   UDT4 sends back — the NAK names exactly the gap.
//!
//! If our encoding of any of these were off by a bit, UDT4 would not
//! connect, not deliver, or not answer.

use lu2k_udt::seq::{AckNo, MsgNo, SeqNo};
use lu2k_udt::wire::{
    AckStats, ControlRepr, DataHeader, HandshakeRepr, Packet, Position, ReqType, SocketType,
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use udt::{SocketFamily, UdtSocket};

const OUR_ID: u32 = 0x0bad_cafe;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn udp() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Receives until `want` accepts a datagram (returning Some), or 5 s pass.
fn recv_until<T>(
    sock: &UdpSocket,
    mut want: impl FnMut(&[u8], SocketAddr) -> Option<T>,
) -> (T, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(t) = want(&buf[..n], from) {
                return (t, from);
            }
        }
    }
    panic!("timed out waiting for the expected UDT4 packet");
}

fn handshake(bytes: &[u8]) -> Option<(HandshakeRepr, u32)> {
    let p = Packet::new_checked(bytes).ok()?;
    match ControlRepr::parse(&p) {
        Ok(ControlRepr::Handshake(hs)) => Some((hs, p.dst_socket_id())),
        _ => None,
    }
}

#[test]
fn udt4_client_connects_to_wire_level_server() {
    udt::init();
    let sock = udp();
    let server = sock.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let client = thread::spawn(move || {
        let s = UdtSocket::new(SocketFamily::AFInet, udt::SocketType::Datagram).unwrap();
        let r = s.connect(server);
        tx.send(r.is_ok()).unwrap();
        r.expect("UDT4 connect to the wire-level server");
        assert_eq!(s.sendmsg(b"hello from UDT4").unwrap(), 15);
        // Give the ACK/ACK2 exchange time before closing.
        thread::sleep(Duration::from_millis(500));
        let _ = s.close();
    });

    // 1. The real first request.
    let ((req, dst, raw), from) =
        recv_until(&sock, |b, _| handshake(b).map(|(h, d)| (h, d, b.to_vec())));
    assert_eq!(dst, 0, "a connection request goes to socket ID 0");
    assert_eq!(req.version, HandshakeRepr::UDT4_VERSION);
    assert_eq!(req.socket_type, SocketType::Dgram);
    assert_eq!(req.req_type, ReqType::Request);
    assert_eq!(req.cookie, 0);
    assert_eq!(req.mss, 1500);
    assert_eq!(req.flight_flag_size, 8192);
    assert_ne!(req.socket_id, 0);
    assert_eq!(
        HandshakeRepr::decode_peer_ip(req.peer_ip, false),
        LOCALHOST,
        "UDT4 tells the server its own address"
    );
    // It re-encodes to exactly the bytes UDT4 sent.
    let ts = Packet::new_checked(&raw[..]).unwrap().timestamp();
    assert_eq!(ControlRepr::Handshake(req).to_vec(ts, 0), raw);
    // 2. Answer with a cookie, as CUDT::listen does.
    let cookie = 0x5eed_c00c;
    let challenge = HandshakeRepr { cookie, ..req };
    sock.send_to(
        &ControlRepr::Handshake(challenge).to_vec(0, req.socket_id),
        from,
    )
    .unwrap();
    // 3. The repeated request carries the cookie and req type -1.
    let ((req2, _), _) = recv_until(&sock, |b, _| {
        handshake(b).filter(|(h, _)| h.req_type == ReqType::Response)
    });
    assert_eq!(req2.cookie, cookie);
    assert_eq!(req2.isn, req.isn);
    assert_eq!(req2.socket_id, req.socket_id);
    // 4. Our response: our socket ID, its ISN echoed, its address.
    let resp = HandshakeRepr {
        req_type: ReqType::Response,
        socket_id: OUR_ID,
        cookie: 0,
        peer_ip: HandshakeRepr::encode_peer_ip(from.ip()),
        ..req
    };
    sock.send_to(&ControlRepr::Handshake(resp).to_vec(0, req.socket_id), from)
        .unwrap();
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "UDT4 accepted our response"
    );

    // 5. Its first data packet.
    let ((h, payload), _) = recv_until(&sock, |b, _| {
        let p = Packet::new_checked(b).ok()?;
        let h = DataHeader::parse(&p).ok()?;
        Some((h, p.payload().to_vec()))
    });
    assert_eq!(h.dst_socket_id, OUR_ID);
    assert_eq!(h.seq_no, req.isn, "the first packet carries the ISN");
    assert_eq!(h.position, Position::Solo);
    assert!(h.in_order, "udt crate's sendmsg asks for in-order delivery");
    assert_eq!(h.msg_no, MsgNo::new(1), "UDT4 numbers messages from 1");
    assert_eq!(payload, b"hello from UDT4");

    // 6. A full ACK; UDT4 answers with an ACK2 carrying the same number.
    let ack = ControlRepr::Ack {
        ack_seq_no: AckNo::new(1),
        last: h.seq_no.next(),
        stats: Some(AckStats {
            rtt: 1000,
            rtt_var: 500,
            avail_buf: 8190,
            rates: None,
        }),
    };
    // UDT 4.11 drops a packet that arrives in the moment between its
    // connect() completing and its receive thread registering the socket
    // (CRcvQueue::worker inserts new sockets into its hash only at the top
    // of its loop), so, like any ACK sender, repeat until answered.
    let mut ack2 = None;
    for _ in 0..50 {
        sock.send_to(&ack.to_vec(10, req.socket_id), from).unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut buf = [0u8; 2048];
        while ack2.is_none() && Instant::now() < deadline {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if let Ok(ControlRepr::Ack2 { ack_seq_no }) = ControlRepr::parse_bytes(&buf[..n]) {
                    ack2 = Some(ack_seq_no);
                }
            }
        }
        if ack2.is_some() {
            break;
        }
    }
    let ack2 = ack2.expect("UDT4 answers a full ACK with an ACK2");
    assert_eq!(ack2, AckNo::new(1));
    client.join().unwrap();
}

#[test]
fn wire_level_client_connects_to_udt4_server() {
    udt::init();
    let listener = UdtSocket::new(SocketFamily::AFInet, udt::SocketType::Stream).unwrap();
    listener
        .bind("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .unwrap();
    listener.listen(1).unwrap();
    let server = listener.getsockname().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let srv = thread::spawn(move || {
        let (conn, _) = listener.accept().expect("UDT4 accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 30 {
            let n = conn.recv(&mut buf, 4096).expect("UDT4 recv");
            got.extend_from_slice(&buf[..n as usize]);
        }
        tx.send(got).unwrap();
        thread::sleep(Duration::from_millis(300));
        let _ = conn.close();
        let _ = listener.close();
    });

    let sock = udp();
    let isn = SeqNo::new(SeqNo::MAX - 1); // the sequence wraps during the test
    let req = HandshakeRepr {
        version: HandshakeRepr::UDT4_VERSION,
        socket_type: SocketType::Stream,
        isn,
        mss: 1500,
        flight_flag_size: 8192,
        req_type: ReqType::Request,
        socket_id: OUR_ID,
        cookie: 0,
        peer_ip: HandshakeRepr::encode_peer_ip(LOCALHOST),
    };
    sock.send_to(&ControlRepr::Handshake(req).to_vec(0, 0), server)
        .unwrap();
    let ((challenge, dst), _) = recv_until(&sock, |b, _| handshake(b));
    assert_eq!(dst, OUR_ID);
    assert_ne!(challenge.cookie, 0, "the listener sets a SYN cookie");
    let req2 = HandshakeRepr {
        req_type: ReqType::Response,
        cookie: challenge.cookie,
        ..req
    };
    sock.send_to(&ControlRepr::Handshake(req2).to_vec(0, 0), server)
        .unwrap();
    let ((resp, dst), from) = recv_until(&sock, |b, _| {
        handshake(b).filter(|(h, _)| h.req_type == ReqType::Response)
    });
    assert_eq!(dst, OUR_ID);
    assert_eq!(resp.isn, isn, "UDT4 echoes our ISN");
    assert_eq!(resp.socket_type, SocketType::Stream);
    assert_ne!(resp.socket_id, 0);
    assert_eq!(
        HandshakeRepr::decode_peer_ip(resp.peer_ip, false),
        LOCALHOST
    );
    let peer = resp.socket_id;

    let data = |seq: SeqNo, body: &[u8]| {
        let h = DataHeader {
            seq_no: seq,
            position: Position::Solo,
            in_order: false,
            msg_no: MsgNo::new(1),
            timestamp: 100,
            dst_socket_id: peer,
        };
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    // Packet isn (10 bytes) in order, then isn + 2 (wrapping to 0): a gap at
    // isn + 1 = MAX.
    sock.send_to(&data(isn, b"0123456789"), from).unwrap();
    sock.send_to(&data(isn.add(2), b"abcdefghij"), from)
        .unwrap();
    let (lost, _) = recv_until(&sock, |b, _| match ControlRepr::parse_bytes(b) {
        Ok(ControlRepr::Nak { loss }) => Some(loss.ranges().collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(lost, vec![(isn.add(1), isn.add(1))]);
    assert_eq!(isn.add(2), SeqNo::ZERO);
    // Fill the gap; UDT4 then acknowledges everything up to isn + 3.
    sock.send_to(&data(isn.add(1), b"ABCDEFGHIJ"), from)
        .unwrap();
    let (ack, _) = recv_until(&sock, |b, _| match ControlRepr::parse_bytes(b) {
        Ok(ControlRepr::Ack {
            ack_seq_no,
            last,
            stats: Some(stats),
        }) if last == isn.add(3) => Some((ack_seq_no, stats)),
        _ => None,
    });
    assert!(ack.1.avail_buf >= 2);
    // ACK2 for it (UDT4 uses it for its RTT sample).
    sock.send_to(
        &ControlRepr::Ack2 { ack_seq_no: ack.0 }.to_vec(200, peer),
        from,
    )
    .unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(&got[..], b"0123456789ABCDEFGHIJabcdefghij");
    sock.send_to(&ControlRepr::Shutdown.to_vec(300, peer), from)
        .unwrap();
    srv.join().unwrap();
}

/// The handshake of a wire-level client with a UDT4 listener; returns the
/// server socket's ID and address.
fn wire_connect(
    sock: &UdpSocket,
    server: SocketAddr,
    ty: SocketType,
    isn: SeqNo,
) -> (u32, SocketAddr) {
    let req = HandshakeRepr {
        version: HandshakeRepr::UDT4_VERSION,
        socket_type: ty,
        isn,
        mss: 1500,
        flight_flag_size: 8192,
        req_type: ReqType::Request,
        socket_id: OUR_ID,
        cookie: 0,
        peer_ip: HandshakeRepr::encode_peer_ip(LOCALHOST),
    };
    sock.send_to(&ControlRepr::Handshake(req).to_vec(0, 0), server)
        .unwrap();
    let ((challenge, _), _) = recv_until(sock, |b, _| handshake(b));
    let req2 = HandshakeRepr {
        req_type: ReqType::Response,
        cookie: challenge.cookie,
        ..req
    };
    sock.send_to(&ControlRepr::Handshake(req2).to_vec(0, 0), server)
        .unwrap();
    let ((resp, _), from) = recv_until(sock, |b, _| {
        handshake(b).filter(|(h, _)| h.req_type == ReqType::Response)
    });
    (resp.socket_id, from)
}

/// A message drop request as UDT4 understands it: message 2 (two packets)
/// loses its first packet; after our drop request UDT4 stops waiting for
/// it — its next ACK covers everything — and `recvmsg` yields messages 1
/// and 3 only.
#[test]
fn udt4_honours_message_drop_request() {
    udt::init();
    let listener = UdtSocket::new(SocketFamily::AFInet, udt::SocketType::Datagram).unwrap();
    listener
        .bind("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .unwrap();
    listener.listen(1).unwrap();
    let server = listener.getsockname().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<Vec<u8>>>();
    let srv = thread::spawn(move || {
        let (conn, _) = listener.accept().expect("UDT4 accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 2 {
            let n = conn.recvmsg(&mut buf).expect("UDT4 recvmsg");
            got.push(buf[..n].to_vec());
        }
        tx.send(got).unwrap();
        thread::sleep(Duration::from_millis(300));
        let _ = conn.close();
        let _ = listener.close();
    });

    let sock = udp();
    let isn = SeqNo::new(1000);
    let (peer, from) = wire_connect(&sock, server, SocketType::Dgram, isn);
    let data = |seq: SeqNo, position: Position, msg: u32, body: &[u8]| {
        let h = DataHeader {
            seq_no: seq,
            position,
            in_order: false,
            msg_no: MsgNo::new(msg),
            timestamp: 100,
            dst_socket_id: peer,
        };
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    sock.send_to(&data(isn, Position::Solo, 1, b"one"), from)
        .unwrap();
    // Message 2 = isn+1 (first, lost) and isn+2 (last).
    sock.send_to(&data(isn.add(2), Position::Last, 2, b"two-b"), from)
        .unwrap();
    sock.send_to(&data(isn.add(3), Position::Solo, 3, b"three"), from)
        .unwrap();
    let (lost, _) = recv_until(&sock, |b, _| match ControlRepr::parse_bytes(b) {
        Ok(ControlRepr::Nak { loss }) => Some(loss.ranges().collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(lost, vec![(isn.add(1), isn.add(1))]);
    let drop = ControlRepr::MsgDropReq {
        msg_no: MsgNo::new(2),
        first: isn.add(1),
        last: isn.add(2),
    };
    sock.send_to(&drop.to_vec(200, peer), from).unwrap();
    // Without the drop request UDT4 would keep acknowledging isn + 1.
    recv_until(&sock, |b, _| match ControlRepr::parse_bytes(b) {
        Ok(ControlRepr::Ack { last, .. }) if last == isn.add(4) => Some(()),
        _ => None,
    });
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, vec![b"one".to_vec(), b"three".to_vec()]);
    sock.send_to(&ControlRepr::Shutdown.to_vec(300, peer), from)
        .unwrap();
    srv.join().unwrap();
}
