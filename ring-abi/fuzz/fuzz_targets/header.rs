//! Fuzz target: region header and core table validation (`Layout::from_parts`) on a
//! valid image patched at arbitrary positions. The checks live in `common/validate.rs`,
//! shared with the stable property test `tests/hostile.rs`.

#![no_main]

#[path = "../common/validate.rs"]
mod validate;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    validate::header(data);
});
