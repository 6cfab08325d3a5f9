//! Property tests for the wire layer: encode/decode round trips, and
//! hostile input (arbitrary bytes, wrong lengths, absurd loss ranges) that
//! must be rejected or accepted without a panic. `decode_any` is also the
//! body of the `packet` fuzz target (`fuzz/fuzz_targets/packet.rs`), so on
//! stable Rust this file doubles as that fuzz target.

use lu2k_udt::seq::{AckNo, MsgNo, SeqNo};
use lu2k_udt::wire::{
    AckRates, AckStats, ControlRepr, DataHeader, HandshakeRepr, NakList, Packet, Position, ReqType,
    SocketType, HEADER_LEN,
};
use proptest::prelude::*;

fn seq() -> impl Strategy<Value = SeqNo> {
    prop_oneof![
        (0u32..=SeqNo::MAX).prop_map(SeqNo::new),
        ((SeqNo::MAX - 8)..=SeqNo::MAX).prop_map(SeqNo::new),
    ]
}

fn position() -> impl Strategy<Value = Position> {
    (0u32..4).prop_map(Position::from_bits)
}

fn data_header() -> impl Strategy<Value = DataHeader> {
    (
        seq(),
        position(),
        any::<bool>(),
        0u32..=MsgNo::MAX,
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(seq_no, position, in_order, m, timestamp, dst_socket_id)| DataHeader {
                seq_no,
                position,
                in_order,
                msg_no: MsgNo::new(m),
                timestamp,
                dst_socket_id,
            },
        )
}

fn handshake() -> impl Strategy<Value = HandshakeRepr> {
    (
        any::<u32>(),
        any::<u32>(),
        seq(),
        any::<u32>(),
        any::<u32>(),
        any::<i32>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u32; 4]>(),
    )
        .prop_map(
            |(version, st, isn, mss, ffs, rt, socket_id, cookie, peer_ip)| HandshakeRepr {
                version,
                socket_type: SocketType::from_u32(st),
                isn,
                mss,
                flight_flag_size: ffs,
                req_type: ReqType::from_i32(rt),
                socket_id,
                cookie,
                peer_ip,
            },
        )
}

fn ack_stats() -> impl Strategy<Value = Option<AckStats>> {
    proptest::option::of(
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((any::<u32>(), any::<u32>())),
        )
            .prop_map(|(rtt, rtt_var, avail_buf, rates)| AckStats {
                rtt,
                rtt_var,
                avail_buf,
                rates: rates.map(|(recv_rate, link_capacity)| AckRates {
                    recv_rate,
                    link_capacity,
                }),
            }),
    )
}

/// A control packet other than NAK (NAK borrows its list; tested apart).
fn control() -> impl Strategy<Value = ControlRepr<'static>> {
    let ack =
        (0u32..=AckNo::MAX, seq(), ack_stats()).prop_map(|(n, last, stats)| ControlRepr::Ack {
            ack_seq_no: AckNo::new(n),
            last,
            stats,
        });
    prop_oneof![
        handshake().prop_map(ControlRepr::Handshake),
        Just(ControlRepr::KeepAlive),
        ack,
        Just(ControlRepr::CongestionWarning),
        Just(ControlRepr::Shutdown),
        (0u32..=AckNo::MAX).prop_map(|n| ControlRepr::Ack2 {
            ack_seq_no: AckNo::new(n)
        }),
        (0u32..=MsgNo::MAX, seq(), seq()).prop_map(|(m, first, last)| ControlRepr::MsgDropReq {
            msg_no: MsgNo::new(m),
            first,
            last
        }),
        any::<u32>().prop_map(|code| ControlRepr::PeerError { code }),
    ]
}

#[path = "../fuzz/common/packet.rs"]
mod packet_target;
use packet_target::decode_any;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn data_header_round_trip(h in data_header(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        buf[HEADER_LEN..].copy_from_slice(&payload);
        h.emit(&mut Packet::new_unchecked(&mut buf[..]));
        let p = Packet::new_checked(&buf[..]).unwrap();
        prop_assert_eq!(DataHeader::parse(&p), Ok(h));
        prop_assert_eq!(p.payload(), &payload[..]);
        prop_assert_eq!(&h.to_bytes()[..], &buf[..HEADER_LEN]);
    }

    #[test]
    fn control_round_trip(c in control(), ts in any::<u32>(), id in any::<u32>()) {
        let v = c.to_vec(ts, id);
        prop_assert_eq!(v.len(), c.buffer_len());
        let p = Packet::new_checked(&v[..]).unwrap();
        prop_assert_eq!(p.timestamp(), ts);
        prop_assert_eq!(p.dst_socket_id(), id);
        prop_assert_eq!(ControlRepr::parse(&p), Ok(c));
        // Emitting into a larger buffer writes exactly buffer_len bytes.
        let mut big = vec![0x5Au8; c.buffer_len() + 8];
        prop_assert_eq!(c.emit(&mut Packet::new_unchecked(&mut big[..]), ts, id), c.buffer_len());
        prop_assert_eq!(&big[..c.buffer_len()], &v[..]);
        prop_assert!(big[c.buffer_len()..].iter().all(|&b| b == 0x5A));
    }

    #[test]
    fn nak_round_trip(start in seq(), gaps in proptest::collection::vec((1u32..50, 0u32..50), 1..40)) {
        // Sorted, disjoint ranges from a random start, possibly across the wrap.
        let mut ranges = Vec::new();
        let mut at = start;
        for (skip, len) in gaps {
            let first = at.add(skip);
            let last = first.add(len);
            ranges.push((first, last));
            at = last.add(1);
        }
        let mut buf = vec![0u8; 8 * ranges.len()];
        let loss = NakList::encode(ranges.iter().copied(), &mut buf);
        let c = ControlRepr::Nak { loss };
        let v = c.to_vec(1, 2);
        let back = ControlRepr::parse_bytes(&v).unwrap();
        prop_assert_eq!(back, c);
        let ControlRepr::Nak { loss } = back else { unreachable!() };
        prop_assert_eq!(loss.ranges().collect::<Vec<_>>(), ranges.clone());
        let expect: u64 = ranges.iter().map(|&(a, b)| u64::from(a.len_to(b))).sum();
        prop_assert_eq!(loss.loss_count(), expect);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        decode_any(&bytes);
    }

    #[test]
    fn arbitrary_control_bodies_never_panic(
        ty in 0u16..10,
        add in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        // Focus on the control types: a valid header with random content
        // and random length exercises every length check.
        let mut v = vec![0u8; HEADER_LEN];
        Packet::new_unchecked(&mut v[..]).set_control_type(ty, 0);
        Packet::new_unchecked(&mut v[..]).set_additional_info(add);
        v.extend_from_slice(&body);
        decode_any(&v);
    }

    #[test]
    fn absurd_nak_words(words in proptest::collection::vec(
        prop_oneof![any::<u32>(), Just(0x8000_0000u32), Just(0x7FFF_FFFF), Just(0xFFFF_FFFF)], 0..30)) {
        let mut v = vec![0u8; HEADER_LEN];
        Packet::new_unchecked(&mut v[..]).set_control_type(3, 0);
        for w in &words {
            v.extend_from_slice(&w.to_be_bytes());
        }
        decode_any(&v);
        // Also every truncation of it.
        for cut in HEADER_LEN..v.len() {
            decode_any(&v[..cut]);
        }
    }
}
