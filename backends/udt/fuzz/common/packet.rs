//! The packet-decoder fuzz check, shared by the cargo-fuzz target
//! `fuzz_targets/packet.rs` and the stable property test
//! `tests/wire_proptest.rs`.

use lu2k_udt::wire::{ControlRepr, DataHeader, Error, Packet, HEADER_LEN};

/// Decode a datagram every way a receiver would; must never panic. Anything
/// that decodes must re-encode to something that decodes to the same value.
pub fn decode_any(bytes: &[u8]) {
    let Ok(p) = Packet::new_checked(bytes) else {
        assert!(bytes.len() < HEADER_LEN);
        return;
    };
    if p.is_control() {
        assert_eq!(DataHeader::parse(&p), Err(Error::WrongKind));
        if let Ok(repr) = ControlRepr::parse(&p) {
            let v = repr.to_vec(p.timestamp(), p.dst_socket_id());
            assert!(v.len() <= bytes.len() + 4, "emit grew a packet");
            assert_eq!(ControlRepr::parse_bytes(&v), Ok(repr));
            if let ControlRepr::Nak { loss } = repr {
                let n = loss.ranges().count();
                assert!(n >= 1 && n <= loss.as_bytes().len() / 4);
                for (a, b) in loss.ranges() {
                    assert!(!a.is_after(b));
                }
            }
        }
    } else {
        let h = DataHeader::parse(&p).expect("a data packet of >= 16 bytes always parses");
        assert_eq!(ControlRepr::parse(&p), Err(Error::WrongKind));
        let mut again = bytes.to_vec();
        h.emit(&mut Packet::new_unchecked(&mut again[..]));
        assert_eq!(again, bytes, "data header round trip is exact");
    }
}
