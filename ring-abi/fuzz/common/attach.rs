//! Byte-driven checks of the attach decoders and the NID text parser, shared by the
//! cargo-fuzz target `fuzz_targets/attach.rs` and the stable property test
//! `tests/hostile.rs`.
//!
//! Whatever the bytes: `Hello::decode`, `Notice::decode` and `decode_ack` return without
//! panicking, and whatever they accept encodes back to the same bytes; if the bytes are
//! UTF-8, `Nid::from_str` returns without panicking and whatever it accepts prints to
//! text that parses to the same NID.

#![allow(dead_code)]

use lu2k_ring_abi::attach::{decode_ack, encode_ack, Hello, Notice, HELLO_MAX_LEN};
use lu2k_ring_abi::Nid;

/// Runs every decoder on `data`.
pub fn decoders(data: &[u8]) {
    if let Ok((hello, nfds)) = Hello::decode(data) {
        assert_eq!(nfds, 1 + 2 * hello.cores);
        let mut out = [0u8; HELLO_MAX_LEN];
        let n = hello.encode(&mut out).expect("a decoded HELLO encodes");
        assert_eq!(&out[..n], data);
    }
    if let Ok(notice) = Notice::decode(data) {
        // The reserved word is not checked, so compare the meaning, not the bytes.
        assert_eq!(Notice::decode(&notice.encode()).ok(), Some(notice));
    }
    if decode_ack(data).is_ok() {
        assert_eq!(&encode_ack(0)[..], data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(nid) = text.parse::<Nid>() {
            assert_eq!(nid.to_string().parse::<Nid>(), Ok(nid));
        }
    }
}
