//! Fuzz target: TX and RX descriptor validation (`TxDesc::validate`, `RxDesc::validate`)
//! with an arbitrary extent table. The checks live in `common/validate.rs`, shared with
//! the stable property test `tests/hostile.rs`.

#![no_main]

#[path = "../common/validate.rs"]
mod validate;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    validate::descriptor(data);
});
