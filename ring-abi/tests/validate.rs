//! Validation: every `DescError` variant from a crafted descriptor, every `LayoutError`
//! variant from a config or a header corrupted through the memfd, the mapper's refusal of
//! unsealed and truncated fds, ring corruption by a peer, and the TOCTOU guarantee
//! (a table rewritten after validation does not change the validated copy).
#![cfg(not(loom))]

use core::mem::{offset_of, size_of};
use std::os::fd::{AsFd, OwnedFd};

use lu2k_ring_abi::layout::{
    ControlBlock, CoreEntry, Part, RegionHeader, RingInfo, RingKind, MAX_CORES, RX_TABLE_BYTES,
};
use lu2k_ring_abi::ring::RingError;
use lu2k_ring_abi::{
    Config, DescError, Eventfds, Extent, ExtentBuf, Layout, LayoutError, Nid, Pool, Region,
    RegionError, RxDesc, TxCompletion, TxDesc, TxStatus,
};
use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};

const TX_POOL: u64 = 1 << 16;

fn cfg() -> Config {
    Config {
        cores: 2,
        tx_entries: 8,
        tx_done_entries: 8,
        rx_entries: 8,
        rx_return_entries: 8,
        tx_pool_len: TX_POOL,
        rx_buf_size: 4096,
        rx_buf_count: 16,
        rx_tables_per_core: 2,
        ..Config::default()
    }
}

fn tx_err(region: &Region, d: &TxDesc) -> DescError {
    region
        .validate_tx(d, &mut ExtentBuf::new())
        .expect_err("descriptor must be refused")
}

fn rx_err(region: &Region, d: &RxDesc) -> DescError {
    region
        .validate_rx(d, &mut ExtentBuf::new())
        .expect_err("descriptor must be refused")
}

fn tx(ext: &[Extent]) -> TxDesc {
    TxDesc::inline(1, Nid::from_nid4(2), [0; 72], ext)
}

#[test]
fn every_tx_descriptor_error_is_reported() {
    let r = Region::create(&cfg()).unwrap();
    let ok = Extent::new(Pool::Tx, 0, 100);
    assert!(r.validate_tx(&tx(&[ok]), &mut ExtentBuf::new()).is_ok());
    assert!(
        r.validate_tx(&tx(&[]), &mut ExtentBuf::new()).is_ok(),
        "no payload is fine"
    );

    let mut d = tx(&[ok]);
    d.flags = 0x8002;
    assert_eq!(tx_err(&r, &d), DescError::UnknownFlags { flags: 0x8002 });

    // IPv6 NIDs pass; a NID of a size the ABI does not define, or with reserved bytes
    // set, does not.
    let mut d = tx(&[ok]);
    d.peer_nid = "2001:db8::7@lu2k".parse().unwrap();
    let mut scratch = ExtentBuf::new();
    let v = r.validate_tx(&d, &mut scratch).unwrap();
    assert_eq!(v.peer_nid.to_string(), "2001:db8::7@lu2k");
    d.peer_nid.size = 8;
    assert_eq!(
        tx_err(&r, &d),
        DescError::BadNid(lu2k_ring_abi::NidError::Size(8))
    );
    assert_eq!(tx_err(&r, &d).code(), 16);
    let mut d = tx(&[ok]);
    d.peer_nid.addr[15] = 1; // past the 4-byte address of a NID4
    assert_eq!(
        tx_err(&r, &d),
        DescError::BadNid(lu2k_ring_abi::NidError::Reserved)
    );
    let mut d = RxDesc::inline(1, Nid::from_nid4(2), [0; 72], &[]);
    d.src_nid.reserved1 = 1;
    assert_eq!(
        rx_err(&r, &d),
        DescError::BadNid(lu2k_ring_abi::NidError::Reserved)
    );

    let mut d = tx(&[ok]);
    d.total_len = (1 << 20) + 1;
    assert_eq!(
        tx_err(&r, &d),
        DescError::PayloadTooLarge {
            total: (1 << 20) + 1,
            max: 1 << 20
        }
    );

    let mut d = tx(&[ok]);
    d.nfrags = 3;
    assert_eq!(tx_err(&r, &d), DescError::InlineOverflow { count: 3 });

    let d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 0, 257, 257);
    assert_eq!(
        tx_err(&r, &d),
        DescError::TooManyFragments {
            count: 257,
            max: 256
        }
    );

    let d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 0, 0, 0);
    assert_eq!(tx_err(&r, &d), DescError::EmptyTable);

    let mut d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 0, 1, 100);
    d.ext[0].pool = Pool::Rx as u16;
    assert_eq!(tx_err(&r, &d), DescError::TableWrongPool { pool: 1 });

    let mut d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 0, 2, 100);
    d.ext[0].len = 16;
    assert_eq!(
        tx_err(&r, &d),
        DescError::TableLength {
            len: 16,
            flags: 0,
            count: 2
        }
    );
    let mut d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 0, 2, 100);
    d.ext[0].flags = 1;
    assert_eq!(
        tx_err(&r, &d),
        DescError::TableLength {
            len: 32,
            flags: 1,
            count: 2
        }
    );

    let d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], 4, 1, 100);
    assert_eq!(tx_err(&r, &d), DescError::TableMisaligned { offset: 4 });

    let d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], TX_POOL - 8, 1, 100);
    assert_eq!(
        tx_err(&r, &d),
        DescError::TableOutOfRange {
            offset: TX_POOL - 8,
            len: 16
        }
    );
    let d = TxDesc::indirect(1, Nid::from_nid4(2), [0; 72], u64::MAX - 7, 1, 100);
    assert_eq!(
        tx_err(&r, &d),
        DescError::TableOutOfRange {
            offset: u64::MAX - 7,
            len: 16
        }
    );

    let d = tx(&[ok, Extent::new(Pool::Rx, 0, 10)]);
    assert_eq!(tx_err(&r, &d), DescError::WrongPool { index: 1, pool: 1 });
    let mut bad = ok;
    bad.pool = 77;
    assert_eq!(
        tx_err(&r, &tx(&[bad])),
        DescError::WrongPool { index: 0, pool: 77 }
    );

    let mut bad = ok;
    bad.flags = 4;
    assert_eq!(
        tx_err(&r, &tx(&[ok, bad])),
        DescError::ExtentFlags { index: 1, flags: 4 }
    );

    let d = tx(&[Extent::new(Pool::Tx, 0, 0)]);
    assert_eq!(tx_err(&r, &d), DescError::ZeroLength { index: 0 });

    let d = tx(&[Extent::new(Pool::Tx, u64::MAX - 5, 10)]);
    assert_eq!(
        tx_err(&r, &d),
        DescError::ExtentOverflow {
            index: 0,
            offset: u64::MAX - 5,
            len: 10
        }
    );

    let d = tx(&[Extent::new(Pool::Tx, TX_POOL - 10, 11)]);
    assert_eq!(
        tx_err(&r, &d),
        DescError::ExtentOutOfRange {
            index: 0,
            offset: TX_POOL - 10,
            len: 11,
            pool_len: TX_POOL
        }
    );
    // Exactly up to the end of the pool is fine.
    let d = tx(&[Extent::new(Pool::Tx, TX_POOL - 10, 10)]);
    assert!(r.validate_tx(&d, &mut ExtentBuf::new()).is_ok());

    let mut d = tx(&[ok, ok]);
    d.total_len = 150;
    assert_eq!(
        tx_err(&r, &d),
        DescError::LengthMismatch {
            sum: 200,
            total: 150
        }
    );
}

#[test]
fn indirect_tables_are_read_and_checked_extent_by_extent() {
    let r = Region::create(&cfg()).unwrap();
    // 256 fragments of 16 bytes each, table at the end of the TX pool.
    let frags: Vec<Extent> = (0..256)
        .map(|i| Extent::new(Pool::Tx, i * 64, 16))
        .collect();
    let table_off = TX_POOL - 256 * 16;
    r.write_extents(Pool::Tx, table_off, &frags).unwrap();
    let nid6 = Nid::from_nid4(6);
    let d = TxDesc::indirect(5, nid6, [9; 72], table_off, 256, 256 * 16);
    let mut scratch = ExtentBuf::new();
    let v = r.validate_tx(&d, &mut scratch).unwrap();
    assert_eq!(v.extents, &frags[..]);
    assert_eq!((v.cookie, v.peer_nid, v.total_len), (5, nid6, 4096));

    // TOCTOU: the writer changes the table after validation; the validated copy stays.
    let evil = vec![Extent::new(Pool::Tx, u64::MAX, u32::MAX); 256];
    r.write_extents(Pool::Tx, table_off, &evil).unwrap();
    assert_eq!(v.extents, &frags[..]);
    // A fresh validation sees (and refuses) the new table.
    assert_eq!(
        r.validate_tx(&d, &mut ExtentBuf::new()).unwrap_err(),
        DescError::ExtentOverflow {
            index: 0,
            offset: u64::MAX,
            len: u32::MAX
        }
    );

    // A bad extent in the middle of a table is found with its index.
    let mut frags2 = frags.clone();
    frags2[200].len = 0;
    r.write_extents(Pool::Tx, table_off, &frags2).unwrap();
    assert_eq!(tx_err(&r, &d), DescError::ZeroLength { index: 200 });
}

#[test]
fn rx_descriptors_use_the_rx_pool_and_rx_tables() {
    let r = Region::create(&cfg()).unwrap();
    let ok = Extent::new(Pool::Rx, 4096, 1000);
    assert!(r
        .validate_rx(
            &RxDesc::inline(1, Nid::from_nid4(2), [0; 72], &[ok]),
            &mut ExtentBuf::new()
        )
        .is_ok());
    // RX payload must be in the RX pool.
    let d = RxDesc::inline(
        1,
        Nid::from_nid4(2),
        [0; 72],
        &[Extent::new(Pool::Tx, 0, 10)],
    );
    assert_eq!(rx_err(&r, &d), DescError::WrongPool { index: 0, pool: 0 });
    // Up to 1024 extents through an RX table.
    let frags: Vec<Extent> = (0..1024)
        .map(|i| Extent::new(Pool::Rx, i * 64, 64))
        .collect();
    r.write_extents(Pool::RxTables, RX_TABLE_BYTES, &frags)
        .unwrap();
    let d = RxDesc::indirect(
        3,
        Nid::from_nid4(4),
        [0; 72],
        RX_TABLE_BYTES,
        1024,
        1024 * 64,
    );
    let mut scratch = ExtentBuf::new();
    assert_eq!(r.validate_rx(&d, &mut scratch).unwrap().extents.len(), 1024);
    let d = RxDesc::indirect(3, Nid::from_nid4(4), [0; 72], 0, 1025, 1025);
    assert_eq!(
        rx_err(&r, &d),
        DescError::TooManyFragments {
            count: 1025,
            max: 1024
        }
    );
    // An RX table must be in the RX table area, not the TX pool.
    let mut d = RxDesc::indirect(3, Nid::from_nid4(4), [0; 72], 0, 1, 64);
    d.ext[0].pool = Pool::Tx as u16;
    assert_eq!(rx_err(&r, &d), DescError::TableWrongPool { pool: 0 });
}

#[test]
fn error_codes_are_distinct_and_ride_in_completions() {
    let errs = [
        DescError::UnknownFlags { flags: 2 },
        DescError::PayloadTooLarge { total: 0, max: 0 },
        DescError::TooManyFragments { count: 0, max: 0 },
        DescError::InlineOverflow { count: 0 },
        DescError::EmptyTable,
        DescError::TableWrongPool { pool: 0 },
        DescError::TableLength {
            len: 0,
            flags: 0,
            count: 0,
        },
        DescError::TableMisaligned { offset: 0 },
        DescError::TableOutOfRange { offset: 0, len: 0 },
        DescError::WrongPool { index: 0, pool: 0 },
        DescError::ExtentFlags { index: 0, flags: 0 },
        DescError::ZeroLength { index: 0 },
        DescError::ExtentOverflow {
            index: 0,
            offset: 0,
            len: 0,
        },
        DescError::ExtentOutOfRange {
            index: 0,
            offset: 0,
            len: 0,
            pool_len: 0,
        },
        DescError::LengthMismatch { sum: 0, total: 0 },
    ];
    let mut codes: Vec<u32> = errs.iter().map(DescError::code).collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), errs.len());
    let c = TxCompletion::invalid(77, &DescError::EmptyTable);
    assert_eq!(
        (c.cookie, c.status(), c.detail),
        (77, Ok(TxStatus::InvalidDescriptor), 5)
    );
    for s in 0..=8 {
        assert_eq!(TxStatus::try_from(s).unwrap() as u32, s);
    }
    let bad = TxCompletion {
        cookie: 1,
        status: 9,
        detail: 0,
    };
    assert_eq!(bad.status().unwrap_err().0, 9);
}

#[test]
fn config_errors() {
    let e = |c: Config| Layout::new(&c).unwrap_err();
    assert_eq!(
        e(Config { cores: 0, ..cfg() }),
        LayoutError::BadCores { cores: 0 }
    );
    assert_eq!(
        e(Config {
            cores: MAX_CORES + 1,
            ..cfg()
        }),
        LayoutError::BadCores {
            cores: MAX_CORES + 1
        }
    );
    assert_eq!(
        e(Config {
            rx_entries: 12,
            ..cfg()
        }),
        LayoutError::BadEntries {
            core: 0,
            ring: RingKind::Rx,
            entries: 12
        }
    );
    assert_eq!(
        e(Config {
            tx_entries: 0,
            ..cfg()
        }),
        LayoutError::BadEntries {
            core: 0,
            ring: RingKind::Tx,
            entries: 0
        }
    );
    assert_eq!(
        e(Config {
            rx_buf_size: 100,
            ..cfg()
        }),
        LayoutError::BadRxBuffers {
            size: 100,
            count: 16,
            pool_len: 1600
        }
    );
    assert_eq!(
        e(Config {
            tx_pool_len: u64::MAX - 4096,
            ..cfg()
        }),
        LayoutError::TooLarge
    );
}

/// Writes `bytes` at `off` of the region's memfd: what a hostile creator could do.
fn poke(fd: impl AsFd, off: u64, bytes: &[u8]) {
    assert_eq!(rustix::io::pwrite(fd, bytes, off).unwrap(), bytes.len());
}

/// Creates a region, applies `corrupt` to its memfd, maps it again, returns the error.
fn map_err_after(corrupt: impl FnOnce(&OwnedFd, &Layout)) -> RegionError {
    let r = Region::create(&cfg()).unwrap();
    let fd = r.fd().try_clone_to_owned().unwrap();
    corrupt(&fd, r.layout());
    Region::from_fd(fd).expect_err("corrupted region must be refused")
}

fn hdr_field(f: usize, bytes: &[u8]) -> impl FnOnce(&OwnedFd, &Layout) + '_ {
    move |fd, _| poke(fd, f as u64, bytes)
}

fn core_field(core: usize, f: usize, bytes: &[u8]) -> impl FnOnce(&OwnedFd, &Layout) + '_ {
    move |fd, l| {
        let off = l.header().core_table_off + (core * size_of::<CoreEntry>() + f) as u64;
        poke(fd, off, bytes)
    }
}

#[test]
fn every_header_error_is_reported_on_map() {
    type H = RegionHeader;
    let l = Layout::new(&cfg()).unwrap();
    let h = *l.header();
    let le = |e: LayoutError| RegionError::Layout(e);

    assert!(Region::from_fd(
        Region::create(&cfg())
            .unwrap()
            .fd()
            .try_clone_to_owned()
            .unwrap()
    )
    .is_ok());

    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, magic), b"NOTLU2K!")),
        le(LayoutError::BadMagic {
            found: u64::from_le_bytes(*b"NOTLU2K!")
        })
    );
    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, version_major), &1u16.to_le_bytes())),
        le(LayoutError::VersionMismatch {
            found_major: 1,
            found_minor: lu2k_ring_abi::layout::VERSION_MINOR
        })
    );
    // A newer minor version is accepted.
    let r = Region::create(&cfg()).unwrap();
    let fd = r.fd().try_clone_to_owned().unwrap();
    poke(
        &fd,
        offset_of!(H, version_minor) as u64,
        &7u16.to_le_bytes(),
    );
    assert!(Region::from_fd(fd).is_ok());

    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, header_size), &100u32.to_le_bytes())),
        le(LayoutError::HeaderSize { found: 100 })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, features),
            &(1u64 << 40 | 1).to_le_bytes()
        )),
        le(LayoutError::UnknownFeatures { bits: 1 << 40 })
    );
    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, total_size), &4096u64.to_le_bytes())),
        le(LayoutError::SizeMismatch {
            header: 4096,
            actual: h.total_size
        })
    );
    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, cores), &0u32.to_le_bytes())),
        le(LayoutError::BadCores { cores: 0 })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, core_entry_size),
            &64u32.to_le_bytes()
        )),
        le(LayoutError::CoreEntrySize { found: 64 })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, core_table_off),
            &h.total_size.to_le_bytes()
        )),
        le(LayoutError::OutOfBounds {
            part: Part::CoreTable,
            off: h.total_size,
            len: 2 * size_of::<CoreEntry>() as u64
        })
    );
    assert_eq!(
        map_err_after(hdr_field(offset_of!(H, rx_buf_count), &17u32.to_le_bytes())),
        le(LayoutError::BadRxBuffers {
            size: 4096,
            count: 17,
            pool_len: 16 * 4096
        })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, rx_tables_len),
            &100u64.to_le_bytes()
        )),
        le(LayoutError::BadRxTables {
            part: Part::RxTables,
            len: 100
        })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, tx_pool_off),
            &(h.tx_pool_off + 8).to_le_bytes()
        )),
        le(LayoutError::Misaligned {
            part: Part::TxPool,
            off: h.tx_pool_off + 8,
            align: 64
        })
    );
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, tx_pool_len),
            &h.total_size.to_le_bytes()
        )),
        le(LayoutError::OutOfBounds {
            part: Part::TxPool,
            off: h.tx_pool_off,
            len: h.total_size
        })
    );
    // The TX pool moved onto the RX pool.
    assert_eq!(
        map_err_after(hdr_field(
            offset_of!(H, tx_pool_off),
            &h.rx_pool_off.to_le_bytes()
        )),
        le(LayoutError::Overlap {
            a: Part::TxPool,
            b: Part::RxPool
        })
    );

    // Core table entries.
    let c1 = *l.core(1).unwrap();
    let tx = offset_of!(CoreEntry, tx);
    assert_eq!(
        map_err_after(core_field(
            1,
            tx + offset_of!(RingInfo, entries),
            &6u32.to_le_bytes()
        )),
        le(LayoutError::BadEntries {
            core: 1,
            ring: RingKind::Tx,
            entries: 6
        })
    );
    let rx = offset_of!(CoreEntry, rx);
    assert_eq!(
        map_err_after(core_field(
            1,
            rx + offset_of!(RingInfo, slot_size),
            &64u32.to_le_bytes()
        )),
        le(LayoutError::SlotSize {
            core: 1,
            ring: RingKind::Rx,
            found: 64
        })
    );
    // Core 1's control block moved onto core 0's: two cores would share indices.
    let c0 = *l.core(0).unwrap();
    assert_eq!(
        map_err_after(core_field(
            1,
            offset_of!(CoreEntry, ctrl_off),
            &c0.ctrl_off.to_le_bytes()
        )),
        le(LayoutError::Overlap {
            a: Part::Control(0),
            b: Part::Control(1)
        })
    );
    // Core 1's TX ring pointed into the TX pool.
    assert_eq!(
        map_err_after(core_field(1, tx, &h.tx_pool_off.to_le_bytes())),
        le(LayoutError::Overlap {
            a: Part::Ring(1, RingKind::Tx),
            b: Part::TxPool
        })
    );
    assert_eq!(
        map_err_after(core_field(
            1,
            offset_of!(CoreEntry, rx_tables),
            &100u32.to_le_bytes()
        )),
        le(LayoutError::OutOfBounds {
            part: Part::CoreRxTables(1),
            off: c1.rx_tables_off,
            len: 100 * RX_TABLE_BYTES
        })
    );
    let _ = ControlBlock::default();
}

#[test]
fn unsealed_and_truncated_fds_are_refused() {
    let fd = memfd_create(
        "not-sealed",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    ftruncate(&fd, 1 << 20).unwrap();
    assert_eq!(Region::from_fd(fd).unwrap_err(), RegionError::NotSealed);

    let fd = memfd_create("tiny", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    ftruncate(&fd, 100).unwrap();
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    assert_eq!(
        Region::from_fd(fd).unwrap_err(),
        RegionError::TooSmall { size: 100 }
    );

    // The creator's seals hold: the peer cannot shrink the region under the mapper.
    let r = Region::create(&cfg()).unwrap();
    assert!(ftruncate(r.fd(), 4096).is_err());
}

#[test]
fn a_peer_writing_impossible_indices_is_detected_not_trusted() {
    let r = Region::create(&cfg()).unwrap();
    let ctrl = r.layout().core(0).unwrap().ctrl_off;
    let mut k = r.kshim_core(0, Eventfds::none()).unwrap();
    let mut e = r.engine_core(0, Eventfds::none()).unwrap();
    assert!(k
        .tx
        .push(TxDesc::inline(1, Nid::from_nid4(1), [0; 72], &[]))
        .unwrap());

    // A hostile kshim claims to have produced 1000 descriptors into an 8-entry ring.
    poke(
        r.fd(),
        ctrl + offset_of!(ControlBlock, tx_prod) as u64,
        &1000u32.to_le_bytes(),
    );
    assert!(matches!(
        e.tx.refresh(),
        Err(RingError::Corrupt {
            prod: 1000,
            cons: 0,
            entries: 8
        })
    ));

    // A hostile engine claims to have consumed more than was produced.
    poke(
        r.fd(),
        ctrl + offset_of!(ControlBlock, tx_cons) as u64,
        &5u32.to_le_bytes(),
    );
    assert!(matches!(
        k.tx.refresh(),
        Err(RingError::Corrupt {
            prod: 1,
            cons: 5,
            entries: 8
        })
    ));
    // The producer's own index is private: the scribble on tx_prod did not move it.
    assert_eq!(k.tx.index(), 1);
}
