//! The connection fuzz target (`fuzz/fuzz_targets/connection.rs`) as a
//! stable property test: random scripts of hostile datagrams, lossy honest
//! traffic and time jumps against a connected pair. See
//! `fuzz/common/connection.rs` for what is checked.

#[path = "../fuzz/common/connection.rs"]
mod connection;

use proptest::prelude::*;

/// One script operation: op byte, length, argument.
fn op() -> impl Strategy<Value = Vec<u8>> {
    let raw = (0u8..2, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(to, b)| (to, b));
    // Datagrams that look like UDT control packets of every type, to get
    // past the first parse.
    let ctrl = (
        0u8..2,
        0u8..9,
        proptest::collection::vec(any::<u8>(), 12..60),
    )
        .prop_map(|(to, ty, mut b)| {
            b[0] = 0x80;
            b[1] = ty;
            (to | 2, b)
        });
    let data = (0u8..2, proptest::collection::vec(any::<u8>(), 16..80)).prop_map(|(to, mut b)| {
        b[0] &= 0x7F;
        (to | 2, b)
    });
    let exchange = (0u8..2, any::<u8>()).prop_map(|(to, k)| (to | 4, vec![k]));
    let tick = proptest::collection::vec(any::<u8>(), 1..3).prop_map(|b| (6u8, b));
    prop_oneof![1 => raw, 3 => ctrl, 2 => data, 4 => exchange, 3 => tick].prop_map(|(op, arg)| {
        let mut v = vec![op, arg.len() as u8];
        v.extend_from_slice(&arg);
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn connection_survives_hostile_scripts(
        mode in 0u8..2,
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let mut script = vec![mode];
        for o in ops {
            script.extend_from_slice(&o);
        }
        let _ = connection::run(&script);
    }

    #[test]
    fn connection_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = connection::run(&bytes);
    }
}

/// The interpreter itself works: an honest script (exchanges without loss,
/// 10 ms ticks) completes the transfer both ways, so the hostile scripts
/// above start from connections that really carry data.
#[test]
fn honest_script_completes_the_transfer() {
    for mode in 0..2u8 {
        let mut script = vec![mode];
        for i in 0..200u8 {
            script.extend_from_slice(&[4 | (i & 1), 1, 0]);
            script.extend_from_slice(&[6, 2, 0x27, 0x10]); // 10 ms
        }
        let out = connection::run(&script);
        // Messages 0..=2 have no TTL and must arrive; message 3 (50 ms TTL)
        // is acknowledged or dropped, and delivered only if not dropped.
        for i in 0..2 {
            assert!(out.acked[i] >= 3, "mode {mode}: {out:?}");
            assert_eq!(out.acked[i] + out.dropped[i], 4, "mode {mode}: {out:?}");
        }
        if mode == 0 {
            assert_eq!(out.delivered[0], out.acked[1], "message mode: {out:?}");
            assert_eq!(out.delivered[1], out.acked[0], "message mode: {out:?}");
        } else {
            assert!(out.delivered[0] >= 1 && out.delivered[1] >= 1, "{out:?}");
        }
    }
}

/// The same with one datagram in three lost: retransmission completes it.
#[test]
fn lossy_honest_script_completes_the_transfer() {
    let mut script = vec![0u8];
    for i in 0..255u8 {
        script.extend_from_slice(&[4 | (i & 1), 1, 3]);
        script.extend_from_slice(&[6, 2, 0x27, 0x10]);
    }
    let out = connection::run(&script);
    for i in 0..2 {
        assert!(out.acked[i] >= 3, "{out:?}");
        assert_eq!(out.acked[i] + out.dropped[i], 4, "{out:?}");
    }
}
