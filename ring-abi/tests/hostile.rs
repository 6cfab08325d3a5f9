//! Hostile input as properties (these double as fuzz targets for descriptor and header
//! validation): arbitrary descriptors with arbitrary extent tables never make validation
//! panic, and whatever it accepts is inside the pools and adds up; arbitrary corruption
//! of a header or core table never makes `Layout::from_parts` panic, and whatever it
//! accepts keeps every part inside the region. The byte-driven checks of the cargo-fuzz
//! targets (`fuzz/common/validate.rs`, and `fuzz/common/attach.rs` for the attach
//! messages and NID text) run here too, on random bytes.
#![cfg(not(loom))]

#[path = "../fuzz/common/attach.rs"]
mod attach;
#[path = "../fuzz/common/validate.rs"]
mod validate;

use lu2k_ring_abi::desc::TableSource;
use lu2k_ring_abi::layout::RingKind;
use lu2k_ring_abi::{DescError, Extent, ExtentBuf, Layout, Nid, Pool, RxDesc, TxDesc};
use proptest::prelude::*;
use validate::{check_accepted, core_bytes, core_from, header_bytes, header_from, layout, Tables};

fn extent() -> impl Strategy<Value = Extent> {
    (
        prop_oneof![3 => 0u16..3, 1 => any::<u16>()],
        prop_oneof![5 => Just(0u16), 1 => any::<u16>()],
        prop_oneof![3 => 0u32..5000, 1 => any::<u32>()],
        prop_oneof![3 => 0u64..70_000, 1 => any::<u64>()],
    )
        .prop_map(|(pool, flags, len, offset)| Extent {
            pool,
            flags,
            len,
            offset,
        })
}

#[derive(Debug, Clone)]
struct Raw {
    flags: u16,
    nfrags: u16,
    total_len: u32,
    ext: [Extent; 2],
    table: Vec<Extent>,
}

impl Raw {
    /// The extents validation would look at.
    fn candidates(&self) -> Vec<Extent> {
        let n = usize::from(self.nfrags);
        if self.flags & 1 != 0 {
            let mut out = vec![Extent::default(); n.min(1100)];
            Tables(self.table.clone()).copy_table(Pool::Tx, self.ext[0].offset, &mut out);
            out
        } else {
            self.ext[..n.min(2)].to_vec()
        }
    }
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        prop_oneof![3 => 0u16..2, 1 => any::<u16>()],
        prop_oneof![3 => 0u16..4, 2 => 0u16..1100, 1 => any::<u16>()],
        prop_oneof![2 => 0u32..20_000, 1 => any::<u32>()],
        [extent(), extent()],
        proptest::collection::vec(extent(), 1..40),
        any::<bool>(),
    )
        .prop_map(|(flags, nfrags, total_len, ext, table, fix_total)| {
            let mut r = Raw {
                flags,
                nfrags,
                total_len,
                ext,
                table,
            };
            if fix_total {
                // Make the lengths add up, so that acceptance is common and the checks
                // on accepted descriptors run often.
                r.total_len = r
                    .candidates()
                    .iter()
                    .fold(0u32, |a, e| a.wrapping_add(e.len));
            }
            r
        })
}

/// Valid NIDs of both forms, and arbitrary bytes (almost never a valid NID).
fn nid_bytes() -> impl Strategy<Value = [u8; 24]> {
    prop_oneof![
        2 => any::<u64>().prop_map(|x| Nid::from_nid4(x).to_bytes()),
        2 => any::<u128>().prop_map(|a| {
            let net = lu2k_ring_abi::Net::new(lu2k_ring_abi::LndType::LU2K, 0);
            Nid::from_net_ipv6(net, std::net::Ipv6Addr::from(a)).to_bytes()
        }),
        1 => any::<[u8; 24]>(),
    ]
}

fn tx_case(r: Raw, cookie: u64, nid: [u8; 24]) -> bool {
    let l = layout();
    let peer_nid = Nid::from_bytes(&nid);
    let d = TxDesc {
        cookie,
        peer_nid,
        hdr: [0; 72],
        flags: r.flags,
        nfrags: r.nfrags,
        total_len: r.total_len,
        ext: r.ext,
        reserved: [0; 6],
    };
    let mut scratch = ExtentBuf::new();
    match d.validate(&l, &Tables(r.table), &mut scratch) {
        Ok(v) => {
            check_accepted(&l, Pool::Tx, 256, v.total_len, v.extents);
            assert_eq!(v.cookie, cookie);
            // An accepted descriptor carries a NID this build can use.
            assert_eq!(v.peer_nid.check(), Ok(()));
            assert_eq!(v.peer_nid, peer_nid);
            true
        }
        Err(DescError::BadNid(_)) => {
            assert!(peer_nid.check().is_err());
            false
        }
        Err(_) => false,
    }
}

fn rx_case(r: Raw, token: u64) -> bool {
    let l = layout();
    let d = RxDesc {
        token,
        src_nid: Nid::default(),
        hdr: [0; 72],
        flags: r.flags,
        nfrags: r.nfrags,
        total_len: r.total_len,
        ext: r.ext,
        reserved: [0; 6],
    };
    let mut scratch = ExtentBuf::new();
    match d.validate(&l, &Tables(r.table), &mut scratch) {
        Ok(v) => {
            check_accepted(&l, Pool::Rx, 1024, v.total_len, v.extents);
            true
        }
        Err(_) => false,
    }
}

#[test]
fn the_descriptor_properties_see_both_outcomes() {
    // The generators are not vacuous: both accepted and refused descriptors are common.
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut tx_ok, mut rx_ok) = (0, 0);
    for _ in 0..2000 {
        let r = raw().new_tree(&mut runner).unwrap().current();
        tx_ok += usize::from(tx_case(r.clone(), 1, Nid::from_nid4(2).to_bytes()));
        rx_ok += usize::from(rx_case(r, 3));
    }
    assert!((50..1950).contains(&tx_ok), "TX accepted {tx_ok} of 2000");
    assert!((50..1950).contains(&rx_ok), "RX accepted {rx_ok} of 2000");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_descriptor_check_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        validate::descriptor(&data);
    }

    #[test]
    fn fuzz_header_check_on_random_patches(data in proptest::collection::vec(any::<u8>(), 0..60)) {
        validate::header(&data);
    }

    #[test]
    fn fuzz_attach_check_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        attach::decoders(&data);
    }

    #[test]
    fn fuzz_attach_check_on_nid_like_text(text in "[0-9.]{0,16}@?[a-z0-9.]{0,8}") {
        attach::decoders(text.as_bytes());
    }

    #[test]
    fn arbitrary_tx_descriptors_are_refused_or_sound(r in raw(), cookie: u64, nid in nid_bytes()) {
        tx_case(r, cookie, nid);
    }

    #[test]
    fn arbitrary_rx_descriptors_are_refused_or_sound(r in raw(), token: u64) {
        rx_case(r, token);
    }

    #[test]
    fn corrupted_headers_are_refused_or_in_bounds(
        hdr_words in proptest::collection::vec((0usize..32, any::<u64>()), 0..4),
        core_words in proptest::collection::vec((0usize..2, 0usize..12, any::<u64>()), 0..4),
        small in any::<bool>(),
    ) {
        let l = layout();
        // Overwrite random 8-byte words of the header and core entries with random (or
        // small) values, through their byte representation.
        let mut h = *l.header();
        let mut cores = l.core_entries().to_vec();
        let shrink = |v: u64| if small { v % 200_000 } else { v };
        let mut hb = header_bytes(&h);
        for (w, v) in hdr_words {
            hb[w * 8..w * 8 + 8].copy_from_slice(&shrink(v).to_le_bytes());
        }
        h = header_from(&hb);
        for (c, w, v) in core_words {
            let mut cb = core_bytes(&cores[c]);
            cb[w * 8..w * 8 + 8].copy_from_slice(&shrink(v).to_le_bytes());
            cores[c] = core_from(&cb);
        }
        let size = l.total_size();
        if let Ok(ok) = Layout::from_parts(h, cores, size) {
            let h = ok.header();
            for (off, len) in [(h.tx_pool_off, h.tx_pool_len), (h.rx_pool_off, h.rx_pool_len),
                               (h.rx_tables_off, h.rx_tables_len)] {
                prop_assert!(off.checked_add(len).unwrap() <= size);
            }
            for c in ok.core_entries() {
                prop_assert!(c.ctrl_off + 768 <= size);
                for k in RingKind::ALL {
                    let r = c.ring(k);
                    prop_assert!(r.entries.is_power_of_two());
                    prop_assert!(r.off + u64::from(r.entries) * u64::from(r.slot_size) <= size);
                }
            }
        }
    }
}

#[test]
fn the_byte_images_round_trip() {
    let l = layout();
    assert_eq!(header_from(&header_bytes(l.header())), *l.header());
    let c = l.core_entries()[1];
    assert_eq!(core_from(&core_bytes(&c)), c);
}
