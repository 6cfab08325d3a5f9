//! Nothing from the region is trusted: TX descriptors that fail validation are
//! answered with an `InvalidDescriptor` completion carrying the error code, a next hop
//! on another LNet network with `PeerUnreachable`, and the engine keeps running. The test plays kshim by hand (region, doorbells, HELLO) so
//! it can write descriptors no well-behaved kshim would.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::attach::{self, Hello};
use lu2k_kshim::Nid;
use lu2k_ring_abi::{Config, Eventfds, Extent, Pool, Region, TxDesc, TxStatus};

#[test]
fn invalid_tx_descriptors_get_error_completions() {
    let dir = std::env::temp_dir().join(format!("lu2k-engine-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("k.sock");
    let region = Region::create(&Config::default()).unwrap();
    let fds = Eventfds::new().unwrap();
    let engine_fds = fds.try_clone().unwrap();
    let listener = attach::listen(&sock_path).unwrap();
    let mut engine = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["run", "--kshim-socket"])
        .arg(&sock_path)
        .args(["--bind", "127.0.0.51", "--port", "7399", "--stats-socket"])
        .arg(dir.join("stats.sock"))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let conn = loop {
        if let Some(c) = attach::accept(listener.as_fd()).unwrap() {
            break c;
        }
        assert!(Instant::now() < deadline, "engine never connected");
        std::thread::sleep(Duration::from_millis(10));
    };
    let nid: Nid = "127.0.0.50@lu2k".parse().unwrap();
    let hello = Hello {
        cores: 1,
        region_size: region.len() as u64,
        nids: vec![nid],
    };
    attach::send_hello(
        conn.as_fd(),
        &hello,
        region.fd(),
        &[engine_fds.to_engine.as_ref().unwrap().as_fd()],
        &[engine_fds.to_kshim.as_ref().unwrap().as_fd()],
    )
    .unwrap();
    let ack = loop {
        if let Some((b, n)) = attach::recv_small(conn.as_fd()).unwrap() {
            break (b, n);
        }
        assert!(Instant::now() < deadline, "no ACK");
        std::thread::sleep(Duration::from_millis(10));
    };
    attach::decode_ack(&ack.0[..ack.1]).expect("engine accepted the region");

    let mut k = region.kshim_core(0, fds).unwrap();
    let (_, tx_len) = region.layout().pool(Pool::Tx);
    let peer = lu2k_ring_abi::Nid::new(
        lu2k_ring_abi::Net(0),
        u32::from(std::net::Ipv4Addr::new(127, 0, 0, 52)),
    );
    let hdr = [0u8; 72];
    let mut bad = Vec::new();
    bad.push(TxDesc::inline(
        1,
        peer,
        hdr,
        &[Extent::new(Pool::Tx, tx_len - 10, 100)],
    ));
    bad.push(TxDesc::inline(
        2,
        peer,
        hdr,
        &[Extent::new(Pool::Rx, 0, 10)],
    ));
    let mut d = TxDesc::inline(3, peer, hdr, &[Extent::new(Pool::Tx, 0, 10)]);
    d.flags = 0x80;
    bad.push(d);
    let mut d = TxDesc::inline(4, peer, hdr, &[Extent::new(Pool::Tx, 0, 10)]);
    d.total_len = 5;
    bad.push(d);
    let mut d = TxDesc::inline(5, peer, hdr, &[Extent::new(Pool::Tx, 0, 10)]);
    d.nfrags = 3; // more than the inline slots
    bad.push(d);
    let mut d = TxDesc::indirect(6, peer, hdr, 3, 4, 100); // misaligned table
    d.total_len = 100;
    bad.push(d);
    // A valid descriptor whose next hop is on another LNet network than the engine
    // serves (127.0.0.52 with network 0, the engine's is lu2k's): unreachable.
    bad.push(TxDesc::inline(
        7,
        peer,
        hdr,
        &[Extent::new(Pool::Tx, 0, 100)],
    ));
    for d in &bad {
        assert!(k.tx.push(*d).unwrap());
    }
    let _ = k.to_engine.notify();
    let mut seen = Vec::new();
    while seen.len() < bad.len() {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "completions missing: {seen:?}"
        );
        match k.tx_done.pop().unwrap() {
            Some(c) if c.cookie == 7 => {
                assert_eq!(c.status().unwrap(), TxStatus::PeerUnreachable, "{c:?}");
                seen.push(c.cookie);
            }
            Some(c) => {
                assert_eq!(c.status().unwrap(), TxStatus::InvalidDescriptor, "{c:?}");
                assert_ne!(c.detail, 0, "completion carries the error code");
                seen.push(c.cookie);
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 6, 7]);
    // Still alive and answering.
    assert!(
        engine.try_wait().unwrap().is_none(),
        "engine died on bad descriptors"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &engine.id().to_string()])
        .status();
    let st = loop {
        if let Some(st) = engine.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
