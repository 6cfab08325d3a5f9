//! Byte-driven checks of descriptor and header validation, shared by the cargo-fuzz
//! targets (`fuzz_targets/`) and the stable property test `tests/hostile.rs`.
//!
//! - [`descriptor`]: the first 128 bytes are a TX (and, again, an RX) descriptor, the rest
//!   an extent table; validation must not panic, and what it accepts must be sound.
//! - [`header`]: the input patches a valid header and core table (pairs of position and
//!   byte); `Layout::from_parts` must not panic, and what it accepts must keep every part
//!   inside the region.

#![allow(dead_code)]

use lu2k_ring_abi::desc::TableSource;
use lu2k_ring_abi::layout::{CoreEntry, RegionHeader, RingInfo, RingKind, MAX_PAYLOAD};
use lu2k_ring_abi::{Config, Extent, ExtentBuf, Layout, Nid, Pool, RxDesc, TxDesc};

/// An extent table in plain memory: extent `offset / 8 + i` (cyclically).
pub struct Tables(pub Vec<Extent>);

impl TableSource for Tables {
    fn copy_table(&self, _pool: Pool, offset: u64, out: &mut [Extent]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = if self.0.is_empty() {
                Extent::default()
            } else {
                self.0[(offset as usize / 8 + i) % self.0.len()]
            };
        }
    }
}

/// The layout every check runs against: 2 cores, 64 KiB TX pool, 16 × 4 KiB RX buffers.
pub fn layout() -> Layout {
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

/// Asserts what validation promises about an accepted extent list.
pub fn check_accepted(l: &Layout, pool: Pool, max: usize, total: u32, exts: &[Extent]) {
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

fn padded<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

pub fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

pub fn extent_from(b: &[u8]) -> Extent {
    Extent {
        pool: u16_at(b, 0),
        flags: u16_at(b, 2),
        len: u32_at(b, 4),
        offset: u64_at(b, 8),
    }
}

/// Fuzz entry: descriptors and tables from bytes.
pub fn descriptor(data: &[u8]) {
    let d: [u8; 192] = padded(data);
    let table: Vec<Extent> = data
        .get(192..)
        .unwrap_or(&[])
        .chunks_exact(16)
        .map(extent_from)
        .collect();
    let l = layout();
    let ext = [extent_from(&d[112..128]), extent_from(&d[128..144])];
    let tx = TxDesc {
        cookie: u64_at(&d, 0),
        peer_nid: Nid::from_bytes(d[8..32].try_into().unwrap()),
        hdr: d[32..104].try_into().unwrap(),
        flags: u16_at(&d, 104),
        nfrags: u16_at(&d, 106),
        total_len: u32_at(&d, 108),
        ext,
        reserved: [0; 6],
    };
    let tables = Tables(table);
    let mut scratch = ExtentBuf::new();
    if let Ok(v) = tx.validate(&l, &tables, &mut scratch) {
        check_accepted(&l, Pool::Tx, 256, v.total_len, v.extents);
    }
    let rx = RxDesc {
        token: tx.cookie,
        src_nid: tx.peer_nid,
        hdr: tx.hdr,
        flags: tx.flags,
        nfrags: tx.nfrags,
        total_len: tx.total_len,
        ext,
        reserved: [0; 6],
    };
    if let Ok(v) = rx.validate(&l, &tables, &mut scratch) {
        check_accepted(&l, Pool::Rx, 1024, v.total_len, v.extents);
    }
}

/// Fuzz entry: a valid header and core table patched at (position, byte) pairs.
pub fn header(data: &[u8]) {
    let l = layout();
    let mut img = header_bytes(l.header());
    for c in l.core_entries() {
        img.extend(core_bytes(c));
    }
    for p in data.chunks_exact(3) {
        let pos = usize::from(u16::from_le_bytes([p[0], p[1]])) % img.len();
        img[pos] = p[2];
    }
    let h = header_from(&img[..256]);
    let cores: Vec<CoreEntry> = img[256..].chunks_exact(96).map(core_from).collect();
    let size = l.total_size();
    if let Ok(ok) = Layout::from_parts(h, cores, size) {
        let h = ok.header();
        for (off, len) in [
            (h.tx_pool_off, h.tx_pool_len),
            (h.rx_pool_off, h.rx_pool_len),
            (h.rx_tables_off, h.rx_tables_len),
        ] {
            assert!(off.checked_add(len).unwrap() <= size);
        }
        for c in ok.core_entries() {
            assert!(c.ctrl_off + 768 <= size);
            for k in RingKind::ALL {
                let r = c.ring(k);
                assert!(r.entries.is_power_of_two());
                assert_eq!(r.slot_size, k.slot_size());
                assert!(r.off + u64::from(r.entries) * u64::from(r.slot_size) <= size);
            }
        }
    }
}

// Field-wise (de)serialisation of the two tables, little-endian, in declaration order
// (the layout test proves there is no padding, so this is the in-memory image).
pub fn header_bytes(h: &RegionHeader) -> Vec<u8> {
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
    v.extend(h.rx_tables_off.to_le_bytes());
    v.extend(h.rx_tables_len.to_le_bytes());
    v.extend(h.conns_per_peer.to_le_bytes());
    v.extend(h.reserved0.to_le_bytes());
    for x in h.reserved {
        v.extend(x.to_le_bytes());
    }
    assert_eq!(v.len(), 256);
    v
}

pub fn header_from(b: &[u8]) -> RegionHeader {
    let mut reserved = [0u64; 18];
    for (i, r) in reserved.iter_mut().enumerate() {
        *r = u64_at(b, 112 + i * 8);
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
        conns_per_peer: u32_at(b, 104),
        reserved0: u32_at(b, 108),
        reserved,
    }
}

pub fn core_bytes(c: &CoreEntry) -> Vec<u8> {
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

pub fn core_from(b: &[u8]) -> CoreEntry {
    let ring = |o: usize| RingInfo {
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
