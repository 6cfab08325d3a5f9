//! Fuzz target: a connected pair of `lu2k_udt::conn::Connection`s fed
//! hostile datagrams, honest traffic with loss, and time jumps, as scripted
//! by the input. The checks live in `common/connection.rs`, shared with the
//! stable property test `tests/wire_fuzz_conn.rs`.

#![no_main]

#[path = "../common/connection.rs"]
mod connection;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = connection::run(data);
});
