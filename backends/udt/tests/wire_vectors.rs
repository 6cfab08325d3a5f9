//! Byte-vector tests for the UDT wire format, built from what UDT 4.11
//! sends (`packet.cpp` `CPacket::pack`, `CHandShake::serialize`,
//! `core.cpp` `sendCtrl`/`connect`, `channel.cpp` converting every header
//! and control word with `htonl`).

use lu2k_udt::seq::{AckNo, MsgNo, SeqNo};
use lu2k_udt::wire::{
    AckRates, AckStats, ControlRepr, ControlType, DataHeader, Error, HandshakeRepr, NakList,
    Packet, Position, ReqType, SocketType, HEADER_LEN,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn parse(bytes: &[u8]) -> Result<ControlRepr<'_>, Error> {
    ControlRepr::parse_bytes(bytes)
}

/// Round trip: parse gives `repr`, and emitting `repr` gives the bytes back.
fn check_control(bytes: &[u8], repr: ControlRepr<'_>, ts: u32, id: u32) {
    let p = Packet::new_checked(bytes).unwrap();
    assert!(p.is_control());
    assert_eq!(p.timestamp(), ts);
    assert_eq!(p.dst_socket_id(), id);
    assert_eq!(ControlRepr::parse(&p).unwrap(), repr);
    assert_eq!(repr.buffer_len(), bytes.len());
    assert_eq!(repr.to_vec(ts, id), bytes);
}

#[test]
fn data_header_solo_in_order() {
    // seq 0x12345678, ff = 11 (solo), o = 1, msgno 7, ts 1000 us, dst 0x2a
    let b = hex("12345678 e0000007 000003e8 0000002a 68656c6c6f");
    let p = Packet::new_checked(&b[..]).unwrap();
    assert!(!p.is_control());
    let h = DataHeader::parse(&p).unwrap();
    assert_eq!(
        h,
        DataHeader {
            seq_no: SeqNo::new(0x1234_5678),
            position: Position::Solo,
            in_order: true,
            msg_no: MsgNo::new(7),
            timestamp: 1000,
            dst_socket_id: 42,
        }
    );
    assert_eq!(p.payload(), b"hello");
    assert_eq!(&h.to_bytes()[..], &b[..HEADER_LEN]);
}

#[test]
fn data_header_positions_and_max_numbers() {
    // ff = 10 first, o = 0, msgno = 2^29 - 1, seq = 2^31 - 1
    let b = hex("7fffffff 9fffffff 00000000 ffffffff");
    let h = DataHeader::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap();
    assert_eq!(h.seq_no, SeqNo::new(SeqNo::MAX));
    assert_eq!(h.position, Position::First);
    assert!(!h.in_order);
    assert_eq!(h.msg_no, MsgNo::new(MsgNo::MAX));
    assert_eq!(h.dst_socket_id, u32::MAX);
    assert_eq!(&h.to_bytes()[..], &b[..]);
    // ff = 01 last, ff = 00 middle
    let last = hex("00000001 40000001 00000000 00000001");
    let mid = hex("00000001 20000001 00000000 00000001");
    let pl = DataHeader::parse(&Packet::new_checked(&last[..]).unwrap()).unwrap();
    let pm = DataHeader::parse(&Packet::new_checked(&mid[..]).unwrap()).unwrap();
    assert_eq!((pl.position, pl.in_order), (Position::Last, false));
    assert_eq!((pm.position, pm.in_order), (Position::Middle, true));
    assert_eq!(Position::of(0, 1), Position::Solo);
    assert_eq!(Position::of(0, 3), Position::First);
    assert_eq!(Position::of(1, 3), Position::Middle);
    assert_eq!(Position::of(2, 3), Position::Last);
}

#[test]
fn data_emit_leaves_payload_alone() {
    let mut buf = [0xAAu8; 40];
    let h = DataHeader {
        seq_no: SeqNo::new(5),
        position: Position::Middle,
        in_order: false,
        msg_no: MsgNo::new(9),
        timestamp: 77,
        dst_socket_id: 3,
    };
    h.emit(&mut Packet::new_unchecked(&mut buf[..]));
    assert_eq!(&buf[..16], &hex("00000005 00000009 0000004d 00000003")[..]);
    assert!(buf[16..].iter().all(|&b| b == 0xAA));
}

#[test]
fn handshake_connection_request() {
    // UDT4 client connect(): type 0, additional info 0, dst ID 0; then
    // version 4, UDT_DGRAM, ISN, MSS 1500, flight flag min(8192, 25600),
    // req type 1, socket ID, cookie 0, peer IP 127.0.0.1 as ntop stores it.
    let b = hex("80000000 00000000 00000000 00000000
         00000004 00000002 1a2b3c4d 000005dc
         00002000 00000001 3ade68b1 00000000
         0100007f 00000000 00000000 00000000");
    let hs = HandshakeRepr {
        version: 4,
        socket_type: SocketType::Dgram,
        isn: SeqNo::new(0x1a2b_3c4d),
        mss: 1500,
        flight_flag_size: 8192,
        req_type: ReqType::Request,
        socket_id: 0x3ade_68b1,
        cookie: 0,
        peer_ip: HandshakeRepr::encode_peer_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    assert_eq!(hs.peer_ip, [0x0100_007f, 0, 0, 0]);
    check_control(&b, ControlRepr::Handshake(hs), 0, 0);
    assert_eq!(b.len(), HEADER_LEN + HandshakeRepr::LEN);
}

#[test]
fn handshake_response_and_rejection() {
    // Server response: req type -1 (0xffffffff), cookie set, stream.
    let b = hex("80000000 00000000 00000010 3ade68b1
         00000004 00000001 00000000 000005b4
         00006400 ffffffff 11111111 deadbeef
         0100007f 00000000 00000000 00000000");
    let ControlRepr::Handshake(hs) = parse(&b).unwrap() else {
        panic!("not a handshake")
    };
    assert_eq!(hs.socket_type, SocketType::Stream);
    assert_eq!(hs.req_type, ReqType::Response);
    assert_eq!(hs.mss, 1460);
    assert_eq!(hs.flight_flag_size, 25600);
    assert_eq!(hs.cookie, 0xdead_beef);
    check_control(&b, ControlRepr::Handshake(hs), 16, 0x3ade_68b1);
    // Rejection: 1002 = 0x3ea
    let mut r = b.clone();
    r[16 + 20..16 + 24].copy_from_slice(&hex("000003ea"));
    let ControlRepr::Handshake(hs) = parse(&r).unwrap() else {
        panic!()
    };
    assert_eq!(hs.req_type, ReqType::Rejected);
    assert_eq!(ReqType::from_i32(-2), ReqType::RendezvousResponse);
    assert_eq!(ReqType::from_i32(7), ReqType::Other(7));
    assert_eq!(SocketType::from_u32(9), SocketType::Other(9));
}

#[test]
fn handshake_peer_ip_v6() {
    let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let w = HandshakeRepr::encode_peer_ip(IpAddr::V6(a));
    // ntop: ip[0] = s6[3]<<24 | s6[2]<<16 | s6[1]<<8 | s6[0]
    assert_eq!(w, [0xb80d_0120, 0, 0, 0x0100_0000]);
    assert_eq!(HandshakeRepr::decode_peer_ip(w, true), IpAddr::V6(a));
    assert_eq!(
        HandshakeRepr::decode_peer_ip([0x0100_007f, 0, 0, 0], false),
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    );
}

#[test]
fn handshake_too_short_or_bad_isn() {
    let mut b = hex("80000000 00000000 00000000 00000000
         00000004 00000002 1a2b3c4d 000005dc
         00002000 00000001 3ade68b1 00000000
         0100007f 00000000 00000000 00000000");
    assert_eq!(parse(&b[..b.len() - 1]), Err(Error::Truncated));
    b[24] = 0x80; // ISN with the top bit set
    assert_eq!(parse(&b), Err(Error::Malformed));
}

#[test]
fn keepalive_shutdown_warning_carry_four_pad_bytes() {
    check_control(
        &hex("80010000 00000000 00000005 00000009 00000000"),
        ControlRepr::KeepAlive,
        5,
        9,
    );
    check_control(
        &hex("80050000 00000000 00000005 00000009 00000000"),
        ControlRepr::Shutdown,
        5,
        9,
    );
    check_control(
        &hex("80040000 00000000 00000005 00000009 00000000"),
        ControlRepr::CongestionWarning,
        5,
        9,
    );
    check_control(
        &hex("80080000 000007d1 00000005 00000009 00000000"),
        ControlRepr::PeerError { code: 2001 },
        5,
        9,
    );
    // Without the pad (a 16-byte datagram) they still parse.
    assert_eq!(
        parse(&hex("80010000 00000000 00000005 00000009")),
        Ok(ControlRepr::KeepAlive)
    );
}

#[test]
fn ack_light_full_and_with_rates() {
    // Light ACK: sendCtrl(2, .., size 4): additional info left 0.
    check_control(
        &hex("80020000 00000000 00000064 00000001 00000010"),
        ControlRepr::Ack {
            ack_seq_no: AckNo::new(0),
            last: SeqNo::new(16),
            stats: None,
        },
        100,
        1,
    );
    // 16-byte ACK: last, RTT 100 ms, var 50 ms, avail 8190 packets.
    check_control(
        &hex("80020000 00000007 00000064 00000001 00000010 000186a0 0000c350 00001ffe"),
        ControlRepr::Ack {
            ack_seq_no: AckNo::new(7),
            last: SeqNo::new(16),
            stats: Some(AckStats {
                rtt: 100_000,
                rtt_var: 50_000,
                avail_buf: 8190,
                rates: None,
            }),
        },
        100,
        1,
    );
    // 24-byte ACK with receive rate and link capacity.
    check_control(
        &hex(
            "80020000 00000008 00000064 00000001 00000010 000186a0 0000c350 00001ffe
             00002710 000186a0",
        ),
        ControlRepr::Ack {
            ack_seq_no: AckNo::new(8),
            last: SeqNo::new(16),
            stats: Some(AckStats {
                rtt: 100_000,
                rtt_var: 50_000,
                avail_buf: 8190,
                rates: Some(AckRates {
                    recv_rate: 10_000,
                    link_capacity: 100_000,
                }),
            }),
        },
        100,
        1,
    );
}

#[test]
fn ack_bad_lengths() {
    let head = "80020000 00000001 00000000 00000000";
    assert_eq!(parse(&hex(head)), Err(Error::Truncated));
    assert_eq!(parse(&hex(&format!("{head} 0001"))), Err(Error::Truncated));
    assert_eq!(
        parse(&hex(&format!("{head} 00000001 00000002"))),
        Err(Error::BadLength)
    );
    assert_eq!(
        parse(&hex(&format!(
            "{head} 00000001 00000002 00000003 00000004 00000005"
        ))),
        Err(Error::BadLength)
    );
    // acknowledged seq with top bit set
    assert_eq!(
        parse(&hex(&format!("{head} 80000001"))),
        Err(Error::Malformed)
    );
    // ACK number beyond 31 bits
    assert_eq!(
        parse(&hex("80020000 80000001 00000000 00000000 00000001")),
        Err(Error::Malformed)
    );
}

#[test]
fn ack2() {
    // pack(6): additional info = ACK number, 4 pad bytes.
    check_control(
        &hex("80060000 00000007 00000002 00000003 00000000"),
        ControlRepr::Ack2 {
            ack_seq_no: AckNo::new(7),
        },
        2,
        3,
    );
}

#[test]
fn nak_encoding() {
    // processData's immediate NAK for a gap 5..=9: [5 | 0x80000000, 9];
    // for a single loss only [seq].
    let b = hex("80030000 00000000 00000000 00000004 80000005 00000009 0000000c");
    let ControlRepr::Nak { loss } = parse(&b).unwrap() else {
        panic!()
    };
    let r: Vec<_> = loss.ranges().collect();
    assert_eq!(
        r,
        vec![
            (SeqNo::new(5), SeqNo::new(9)),
            (SeqNo::new(12), SeqNo::new(12))
        ]
    );
    assert_eq!(loss.loss_count(), 6);
    check_control(&b, ControlRepr::Nak { loss }, 0, 4);

    let mut buf = [0u8; 12];
    let l = NakList::encode(r.iter().copied(), &mut buf);
    assert_eq!(l.as_bytes(), &b[16..]);
    // Only whole entries are written: 8 bytes of room hold the range only.
    let mut small = [0u8; 11];
    let l = NakList::encode(r.iter().copied(), &mut small);
    assert_eq!(l.as_bytes(), &hex("80000005 00000009")[..]);
    // A range across the wrap point.
    let mut w = [0u8; 8];
    let l = NakList::encode([(SeqNo::new(SeqNo::MAX - 1), SeqNo::new(2))], &mut w);
    assert_eq!(l.as_bytes(), &hex("fffffffe 00000002")[..]);
    assert_eq!(NakList::new_checked(l.as_bytes()).unwrap().loss_count(), 5);
}

#[test]
fn nak_hostile() {
    let h = "80030000 00000000 00000000 00000004";
    // empty
    assert_eq!(parse(&hex(h)), Err(Error::Malformed));
    // not a multiple of 4
    assert_eq!(parse(&hex(&format!("{h} 000001"))), Err(Error::BadLength));
    // range start at the end (UDT4 reads past its buffer here)
    assert_eq!(
        parse(&hex(&format!("{h} 00000001 80000005"))),
        Err(Error::Malformed)
    );
    // range start followed by another range start
    assert_eq!(
        parse(&hex(&format!("{h} 80000005 80000009"))),
        Err(Error::Malformed)
    );
    // range whose end precedes its start
    assert_eq!(
        parse(&hex(&format!("{h} 80000009 00000005"))),
        Err(Error::Malformed)
    );
    // range spanning more than the comparison threshold: end "before" start
    assert_eq!(
        parse(&hex(&format!("{h} 80000000 40000001"))),
        Err(Error::Malformed)
    );
}

#[test]
fn msg_drop_request() {
    // UDT4 passes the whole message word incl. position bits (here "first",
    // 0x80000000) as additional info; the low 29 bits are the number.
    let b = hex("80070000 80000003 00000000 00000004 00000064 00000068");
    let r = parse(&b).unwrap();
    assert_eq!(
        r,
        ControlRepr::MsgDropReq {
            msg_no: MsgNo::new(3),
            first: SeqNo::new(100),
            last: SeqNo::new(104),
        }
    );
    // Emitted clean.
    assert_eq!(
        r.to_vec(0, 4),
        hex("80070000 00000003 00000000 00000004 00000064 00000068")
    );
    assert_eq!(
        parse(&hex("80070000 80000003 00000000 00000004 00000064")),
        Err(Error::Truncated)
    );
}

#[test]
fn kinds_types_and_short() {
    assert_eq!(
        Packet::new_checked(&[0u8; 15][..]).err(),
        Some(Error::Truncated)
    );
    let data = hex("00000001 00000000 00000000 00000000");
    assert_eq!(parse(&data), Err(Error::WrongKind));
    let ctl = hex("80020000 00000000 00000000 00000000 00000001");
    assert_eq!(
        DataHeader::parse(&Packet::new_checked(&ctl[..]).unwrap()),
        Err(Error::WrongKind)
    );
    assert_eq!(
        parse(&hex("80090000 00000000 00000000 00000000")),
        Err(Error::UnknownType(9))
    );
    assert_eq!(
        parse(&hex("ffff0000 00000000 00000000 00000000")),
        Err(Error::UnknownType(0x7fff))
    );
    // The extended-type field is ignored for known types.
    assert_eq!(
        parse(&hex("8001abcd 00000000 00000000 00000000")),
        Ok(ControlRepr::KeepAlive)
    );
    assert_eq!(ControlType::from_u16(6), Some(ControlType::Ack2));
    let p = Packet::new_checked(&ctl[..]).unwrap();
    assert_eq!(p.control_type(), 2);
    assert_eq!(p.ext_type(), 0);
}
