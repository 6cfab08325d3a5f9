//! Fuzz target: a sealed connection's keys through time — rekeys, skipped
//! keys, grace periods and the replay window, under reordered, repeated, late
//! and changed packets (`lu2k_engine::transport::seal::Session`). The checks
//! live in `common/session.rs`, shared with the stable property test
//! `tests/security_proptest.rs`.

#![no_main]

#[path = "../common/session.rs"]
mod session;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    session::session_program(data);
});
