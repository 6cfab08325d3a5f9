//! Fuzz target: what the sealed wire parses from the network — sealed
//! datagrams and handshake trailers (`lu2k_engine::transport::seal`). Nothing
//! forged may open or authenticate, and nothing may panic. The checks live in
//! `common/seal.rs`, shared with the stable property test
//! `tests/security_proptest.rs`.

#![no_main]

#[path = "../common/seal.rs"]
mod seal;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    seal::hostile_input(data);
});
