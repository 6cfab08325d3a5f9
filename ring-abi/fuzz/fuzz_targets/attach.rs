//! Fuzz target: the attach decoders (`Hello::decode`, `Notice::decode`, `decode_ack`)
//! and the NID text parser. The checks live in `common/attach.rs`, shared with the
//! stable property test `tests/hostile.rs`.

#![no_main]

#[path = "../common/attach.rs"]
mod attach;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    attach::decoders(data);
});
