//! Hostile input as properties (these double as fuzz targets for descriptor and header
//! validation): arbitrary descriptors with arbitrary extent tables never make validation
//! panic, and whatever it accepts is inside the pools and adds up; arbitrary corruption
//! of a header or core table never makes `Layout::from_parts` panic, and whatever it
//! accepts keeps every part inside the region.
#![cfg(not(loom))]

use lu2k_ring_abi::desc::TableSource;
use lu2k_ring_abi::layout::{CoreEntry, RegionHeader, RingKind, MAX_PAYLOAD};
use lu2k_ring_abi::{Config, Extent, ExtentBuf, Layout, Pool, RxDesc, TxDesc};
use proptest::prelude::*;

struct Tables(Vec<Extent>);

impl TableSource for Tables {
    fn copy_table(&self, _pool: Pool, offset: u64, out: &mut [Extent]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.0[(offset as usize / 8 + i) % self.0.len()];
        }
    }
}

fn layout() -> Layout {
    Layout::new(&Config {
        cores: 2,
        tx_entries: 8,
        tx_done_entries: 8,
        rx_entries: 8,
        rx_return_entries: 8,
        tx_pool_len: 1 << 16,
        rx_buf_size: 4096,
        rx_buf_count: 16,
        rx_tables_per_core: 2,
        ..Config::default()
    })
    .unwrap()
}

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

fn check_accepted(l: &Layout, pool: Pool, max: usize, total: u32, exts: &[Extent]) {
    let (_, pool_len) = l.pool(pool);
    assert!(exts.len() <= max);
    assert!(total <= MAX_PAYLOAD);
    let mut sum = 0u64;
    for e in exts {
        assert_eq!(e.pool, pool as u16);
        assert_eq!(e.flags, 0);
        assert!(e.len > 0);
        assert!(e.offset.checked_add(u64::from(e.len)).unwrap() <= pool_len);
        sum += u64::from(e.len);
    }
    assert_eq!(sum, u64::from(total));
}

fn tx_case(r: Raw, cookie: u64, nid: u64) -> bool {
    let l = layout();
    let d = TxDesc {
        cookie,
        peer_nid: nid,
        hdr: [0; 72],
        flags: r.flags,
        nfrags: r.nfrags,
        total_len: r.total_len,
        ext: r.ext,
    };
    let mut scratch = ExtentBuf::new();
    match d.validate(&l, &Tables(r.table), &mut scratch) {
        Ok(v) => {
            check_accepted(&l, Pool::Tx, 256, v.total_len, v.extents);
            assert_eq!(v.cookie, cookie);
            true
        }
        Err(_) => false,
    }
}

fn rx_case(r: Raw, token: u64) -> bool {
    let l = layout();
    let d = RxDesc {
        token,
        src_nid: 0,
        hdr: [0; 72],
        flags: r.flags,
        nfrags: r.nfrags,
        total_len: r.total_len,
        ext: r.ext,
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
        tx_ok += usize::from(tx_case(r.clone(), 1, 2));
        rx_ok += usize::from(rx_case(r, 3));
    }
    assert!((50..1950).contains(&tx_ok), "TX accepted {tx_ok} of 2000");
    assert!((50..1950).contains(&rx_ok), "RX accepted {rx_ok} of 2000");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_tx_descriptors_are_refused_or_sound(r in raw(), cookie: u64, nid: u64) {
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

// Field-wise (de)serialisation of the two tables, little-endian, in declaration order
// (the layout test proves there is no padding, so this is the in-memory image).
fn header_bytes(h: &RegionHeader) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    v.extend(h.magic.to_le_bytes());
    v.extend(h.version_major.to_le_bytes());
    v.extend(h.version_minor.to_le_bytes());
    v.extend(h.header_size.to_le_bytes());
    for x in [h.total_size, h.features] {
        v.extend(x.to_le_bytes());
    }
    v.extend(h.cores.to_le_bytes());
    v.extend(h.core_entry_size.to_le_bytes());
    for x in [
        h.core_table_off,
        h.tx_pool_off,
        h.tx_pool_len,
        h.rx_pool_off,
        h.rx_pool_len,
    ] {
        v.extend(x.to_le_bytes());
    }
    v.extend(h.rx_buf_size.to_le_bytes());
    v.extend(h.rx_buf_count.to_le_bytes());
    for x in [h.rx_tables_off, h.rx_tables_len]
        .into_iter()
        .chain(h.reserved)
    {
        v.extend(x.to_le_bytes());
    }
    assert_eq!(v.len(), 256);
    v
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn header_from(b: &[u8]) -> RegionHeader {
    let mut reserved = [0u64; 19];
    for (i, r) in reserved.iter_mut().enumerate() {
        *r = u64_at(b, 104 + i * 8);
    }
    RegionHeader {
        magic: u64_at(b, 0),
        version_major: u16_at(b, 8),
        version_minor: u16_at(b, 10),
        header_size: u32_at(b, 12),
        total_size: u64_at(b, 16),
        features: u64_at(b, 24),
        cores: u32_at(b, 32),
        core_entry_size: u32_at(b, 36),
        core_table_off: u64_at(b, 40),
        tx_pool_off: u64_at(b, 48),
        tx_pool_len: u64_at(b, 56),
        rx_pool_off: u64_at(b, 64),
        rx_pool_len: u64_at(b, 72),
        rx_buf_size: u32_at(b, 80),
        rx_buf_count: u32_at(b, 84),
        rx_tables_off: u64_at(b, 88),
        rx_tables_len: u64_at(b, 96),
        reserved,
    }
}

fn core_bytes(c: &CoreEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(96);
    v.extend(c.ctrl_off.to_le_bytes());
    v.extend(c.rx_tables_off.to_le_bytes());
    v.extend(c.rx_tables.to_le_bytes());
    v.extend(c.reserved0.to_le_bytes());
    v.extend(c.reserved1.to_le_bytes());
    for k in RingKind::ALL {
        let r = c.ring(k);
        v.extend(r.off.to_le_bytes());
        v.extend(r.entries.to_le_bytes());
        v.extend(r.slot_size.to_le_bytes());
    }
    assert_eq!(v.len(), 96);
    v
}

fn core_from(b: &[u8]) -> CoreEntry {
    let ring = |o: usize| lu2k_ring_abi::layout::RingInfo {
        off: u64_at(b, o),
        entries: u32_at(b, o + 8),
        slot_size: u32_at(b, o + 12),
    };
    CoreEntry {
        ctrl_off: u64_at(b, 0),
        rx_tables_off: u64_at(b, 8),
        rx_tables: u32_at(b, 16),
        reserved0: u32_at(b, 20),
        reserved1: u64_at(b, 24),
        tx: ring(32),
        tx_done: ring(48),
        rx: ring(64),
        rx_return: ring(80),
    }
}

#[test]
fn the_byte_images_round_trip() {
    let l = layout();
    assert_eq!(header_from(&header_bytes(l.header())), *l.header());
    let c = l.core_entries()[1];
    assert_eq!(core_from(&core_bytes(&c)), c);
}
