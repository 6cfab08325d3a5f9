//! The sealed wire's fuzz checks (`engine/fuzz/common/seal.rs` and
//! `session.rs`) as property tests, on stable: random datagrams, random
//! handshake trailers, genuine sealed packets with random bytes changed, and
//! programs that drive a session's keys through rekeys, reordering and
//! replays. CI runs these, and the cargo-fuzz targets `seal` and `session` of
//! `engine/fuzz` briefly under libFuzzer on nightly (scripts/fuzz.sh).

#[path = "../fuzz/common/seal.rs"]
mod seal;
#[path = "../fuzz/common/session.rs"]
mod session;

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

    #[test]
    fn session_programs_keep_their_invariants(
        program in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        session::session_program(&program);
    }

    /// Mostly in order: seal, wait, deliver the newest, with a repeat or a
    /// changed packet now and then; the keys change every few steps.
    #[test]
    fn in_order_sessions_follow_every_rekey(
        steps in proptest::collection::vec((0u8..8, any::<u8>()), 0..300),
    ) {
        let mut program = Vec::new();
        for (kind, arg) in steps {
            let dir = arg & 1;
            let (op, a) = match kind {
                0..=2 => (0, arg),
                3 => (1, arg),
                4..=6 => (2, 0),
                _ => (3 + (arg % 2), arg),
            };
            program.extend_from_slice(&[op << 1 | dir, a]);
        }
        session::session_program(&program);
    }
}
