//! The sealed wire's fuzz check (`engine/fuzz/common/seal.rs`) as a property
//! test, on stable: random datagrams, random handshake trailers, and genuine
//! sealed packets with random bytes changed. CI runs this; the cargo-fuzz
//! target `engine/fuzz` runs the same check under libFuzzer on nightly.

#[path = "../fuzz/common/seal.rs"]
mod seal;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_datagrams_never_open(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
        seal::hostile_input(&data);
    }

    #[test]
    fn sealed_looking_datagrams_never_open(
        head in proptest::collection::vec(any::<u8>(), 14),
        body in proptest::collection::vec(any::<u8>(), 16..1500),
    ) {
        let mut d = vec![0xFF, 0xFF];
        d.extend(head);
        d[2] = 1;
        d.extend(body);
        seal::hostile_input(&d);
    }

    #[test]
    fn handshake_shaped_datagrams_never_authenticate(
        hs in proptest::collection::vec(any::<u8>(), 64),
        tail in proptest::collection::vec(any::<u8>(), 48),
    ) {
        let mut d = hs;
        d.extend_from_slice(b"L2K2");
        d.extend(tail);
        seal::hostile_input(&d);
    }

    #[test]
    fn one_changed_bit_fails_the_tag(at in 0usize..264, bit in 0u8..8) {
        let mut d = vec![0u8; at + 1];
        d[at] = 1 << bit;
        seal::hostile_input(&d);
    }
}
