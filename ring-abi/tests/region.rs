//! Region creation, mapping from the fd, attaching both sides, and moving descriptors
//! through all four rings of a core.
#![cfg(not(loom))]

use lu2k_ring_abi::{
    Config, Eventfds, Extent, ExtentBuf, Pool, Region, RegionError, RxDesc, RxReturn, Side,
    TxCompletion, TxDesc, TxStatus,
};

fn small() -> Config {
    Config {
        cores: 2,
        tx_entries: 8,
        tx_done_entries: 8,
        rx_entries: 8,
        rx_return_entries: 8,
        tx_pool_len: 1 << 16,
        rx_buf_size: 4096,
        rx_buf_count: 8,
        rx_tables_per_core: 2,
        ..Config::default()
    }
}

#[test]
fn both_sides_move_descriptors_through_all_four_rings() {
    let kshim_region = Region::create(&small()).unwrap();
    let fd = kshim_region.fd().try_clone_to_owned().unwrap();
    let engine_region = Region::from_fd(fd).unwrap();
    assert_eq!(kshim_region.layout(), engine_region.layout());

    let mut k = kshim_region.kshim_core(1, Eventfds::none()).unwrap();
    let mut e = engine_region.engine_core(1, Eventfds::none()).unwrap();

    // kshim writes a payload into its TX pool and sends it.
    kshim_region
        .write_pool(Pool::Tx, 4096, b"hello lnet")
        .unwrap();
    let d = TxDesc::inline(
        42,
        lu2k_ring_abi::Nid::from_nid4(0xC0A8_0105),
        [7; 72],
        &[Extent::new(Pool::Tx, 4096, 10)],
    );
    assert!(k.tx.push(d).unwrap());
    let got = e.tx.pop().unwrap().expect("engine sees the descriptor");
    let mut scratch = ExtentBuf::new();
    let v = engine_region.validate_tx(&got, &mut scratch).unwrap();
    assert_eq!(v.cookie, 42);
    assert_eq!(
        engine_region.pool_bytes(&v.extents[0]).unwrap(),
        b"hello lnet"
    );

    // The engine completes it.
    assert!(e
        .tx_done
        .push(TxCompletion::new(42, TxStatus::Ok, 0))
        .unwrap());
    let c = k.tx_done.pop().unwrap().unwrap();
    assert_eq!((c.cookie, c.status()), (42, Ok(TxStatus::Ok)));

    // The engine delivers a received message; kshim returns its buffers.
    engine_region
        .write_pool(Pool::Rx, 8192, b"incoming")
        .unwrap();
    let r = RxDesc::inline(
        9,
        "fd00::a@lu2k".parse().unwrap(),
        [1; 72],
        &[Extent::new(Pool::Rx, 8192, 8)],
    );
    assert!(e.rx.push(r).unwrap());
    let got = k.rx.pop().unwrap().unwrap();
    let v = kshim_region.validate_rx(&got, &mut scratch).unwrap();
    assert_eq!(kshim_region.pool_bytes(&v.extents[0]).unwrap(), b"incoming");
    assert!(k.rx_return.push(RxReturn { token: v.token }).unwrap());
    assert_eq!(e.rx_return.pop().unwrap(), Some(RxReturn { token: 9 }));
    assert_eq!(e.rx_return.pop().unwrap(), None);

    // RX tables: pool-relative offsets of each core's share, usable in RxDesc::indirect.
    let l = engine_region.layout();
    assert_eq!(l.rx_table(0, 0), Some(0));
    assert_eq!(
        l.rx_table(1, 1),
        Some(3 * lu2k_ring_abi::layout::RX_TABLE_BYTES)
    );
    assert_eq!(l.rx_table(1, 2), None);
    let frags = [
        Extent::new(Pool::Rx, 0, 100),
        Extent::new(Pool::Rx, 4096, 50),
        Extent::new(Pool::Rx, 9000, 7),
    ];
    engine_region
        .write_extents(Pool::RxTables, l.rx_table(1, 1).unwrap(), &frags)
        .unwrap();
    let d = RxDesc::indirect(
        11,
        lu2k_ring_abi::Nid::from_nid4(12),
        [0; 72],
        l.rx_table(1, 1).unwrap(),
        3,
        157,
    );
    assert!(e.rx.push(d).unwrap());
    let got = k.rx.pop().unwrap().unwrap();
    assert_eq!(
        kshim_region
            .validate_rx(&got, &mut scratch)
            .unwrap()
            .extents,
        &frags
    );

    // Each side of each core attaches once per Region.
    assert_eq!(
        kshim_region.kshim_core(1, Eventfds::none()).unwrap_err(),
        RegionError::AlreadyAttached {
            core: 1,
            side: Side::Kshim
        }
    );
    assert_eq!(
        engine_region.engine_core(2, Eventfds::none()).unwrap_err(),
        RegionError::NoSuchCore { core: 2, cores: 2 }
    );
}
