//! Fuzz target: the UDT packet decoder (`lu2k_udt::wire`). Any datagram
//! must decode or be rejected without a panic, and whatever decodes must
//! re-encode to the same meaning. The checks live in `common/packet.rs`,
//! shared with the stable property test `tests/wire_proptest.rs`.

#![no_main]

#[path = "../common/packet.rs"]
mod packet;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    packet::decode_any(data);
});
