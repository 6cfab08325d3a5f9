//! One peer over several cores (`conns_per_peer`): kshim spreads one peer's messages
//! over two ring sets, each engine core keeps its own UDT connection to the peer, and
//! the SO_REUSEPORT program steers arriving datagrams by destination socket ID.
//!
//! - the steering program on real sockets: one source address, many socket IDs, each
//!   datagram lands on the socket `id % cores` names (handshakes: the requester's ID);
//! - two engines with `--cores 2` and kshims with `conns_per_peer = 2` carry verified
//!   PUTs of one peer, exactly once, and both cores of both engines carry some of them
//!   (per-core stats), on the plain wire and on the sealed wire;
//! - kshim refuses `conns_per_peer` above its cores, saying what to set.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use lu2k_engine::steer;
use lu2k_kshim::{Config, Kshim};

mod common;
use common::{nid, reuseport_group, start_engine, stats, tmpdir, wait_attached, Transfer};

/// A 64-byte UDT-shaped datagram: destination socket ID `dst`, requester ID `req` at
/// the handshake's place, and `tag` in the first byte.
fn datagram(tag: u8, dst: u32, req: u32) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[0] = tag;
    d[12..16].copy_from_slice(&dst.to_be_bytes());
    d[40..44].copy_from_slice(&req.to_be_bytes());
    d
}

#[test]
fn one_source_spreads_over_the_cores_by_socket_id() {
    for cores in [2u32, 3, 4] {
        let (socks, port) = reuseport_group(cores, &steer::program_by_socket_id(cores));
        // Every datagram from one address: one peer.
        let src = UdpSocket::bind((Ipv4Addr::new(127, 0, 3, 1), 0)).unwrap();
        let mut want = vec![Vec::new(); cores as usize];
        for i in 0..60u8 {
            let id = (u32::from(i) + 1).wrapping_mul(2_654_435_761);
            // Every third one a handshake to the listener: destination 0.
            let (dst, req) = if i % 3 == 0 { (0, id) } else { (id, 7) };
            let d = datagram(i, dst, req);
            let core = steer::socket_id_core(&d, cores);
            assert_eq!(core, id % cores);
            want[core as usize].push(i);
            src.send_to(&d, (Ipv4Addr::LOCALHOST, port)).unwrap();
        }
        for (core, expect) in want.iter().enumerate() {
            let mut got = Vec::new();
            let mut buf = [0u8; 128];
            while got.len() < expect.len() {
                let (n, _) = socks[core].recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!("core {core} of {cores}: {e}; got {got:?} want {expect:?}")
                });
                assert_eq!(n, 64);
                got.push(buf[0]);
            }
            got.sort();
            assert_eq!(&got, expect, "core {core} of {cores}");
            assert!(!expect.is_empty(), "core {core} of {cores} got nothing");
        }
        // Nothing landed anywhere else.
        for s in &socks {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 128];
            assert!(s.recv_from(&mut buf).is_err());
        }
    }
}

/// A kshim serving `ip@lu2k` on `cores` ring sets spreading each peer over
/// `conns_per_peer` of them.
fn kshim(dir: &Path, name: &str, ip: Ipv4Addr, cores: u32, conns_per_peer: u32) -> Kshim {
    let mut cfg = Config::new(vec![nid(ip)], dir.join(format!("{name}.sock")));
    cfg.cores = cores;
    cfg.conns_per_peer = conns_per_peer;
    cfg.tx_pool_len = 64 << 20;
    cfg.rx_buf_count = 1024 * cores;
    Kshim::start(cfg).unwrap()
}

/// A key file (mode 0600) and a config naming it.
fn keyed_config(dir: &Path) -> String {
    let key = dir.join("psk");
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(97) ^ 0x3C).collect();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("engine.toml");
    std::fs::write(&cfg, format!("psk_file = {:?}\n", key.display())).unwrap();
    cfg.display().to_string()
}

/// `count` PUTs of `len` bytes A → B with two cores and two connections per peer;
/// checks content, exactly-once delivery, every completion `Ok`, and that both cores
/// of both engines carried messages of the one peer.
fn striped(tag: &str, a_ip: Ipv4Addr, b_ip: Ipv4Addr, count: u64, len: usize, sealed: bool) {
    let dir = tmpdir(&format!("stripe-{tag}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 307 + u16::from(sealed) * 5;
    let mut ka = kshim(&dir, "a", a_ip, 2, 2);
    let mut kb = kshim(&dir, "b", b_ip, 2, 2);
    let cfg = keyed_config(&dir);
    let mut extra = vec!["--cores", "2"];
    if sealed {
        extra.extend(["--config", cfg.as_str()]);
    }
    let ea = start_engine(&dir, "a", a_ip, port, &extra);
    let eb = start_engine(&dir, "b", b_ip, port, &extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let (na, nb) = (nid(a_ip), nid(b_ip));
    let mut t = Transfer::new(tag, na, nb, count, move |_| len);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while !t.finished() {
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(2));
    }
    let secs = started.elapsed().as_secs_f64();
    // Per-core stats: the sender's cores each completed messages to the one peer,
    // the receiver's cores each published some of them. Snapshots are published
    // every 100 ms of a core's loop: wait for one taken after the traffic.
    let until = Instant::now() + Duration::from_secs(5);
    let (per_a, per_b) = loop {
        let (a, b) = (stats(&dir, "a"), stats(&dir, "b"));
        let per_a: Vec<u64> = a
            .cores
            .iter()
            .map(|c| {
                c.peers
                    .iter()
                    .filter(|p| p.nid == nb.to_string())
                    .map(|p| p.msgs_tx)
                    .sum()
            })
            .collect();
        let per_b: Vec<u64> = b.cores.iter().map(|c| c.rx_descs).collect();
        if per_a.iter().sum::<u64>() == count && per_b.iter().sum::<u64>() == count {
            for r in [&a, &b] {
                assert_eq!(r.payload_copied(), 0, "{tag}: payload copied");
                let sealed_bytes: u64 = r.cores.iter().map(|c| c.sealed_bytes).sum();
                assert_eq!(
                    sealed_bytes > 0,
                    sealed,
                    "{tag}: sealed bytes {sealed_bytes}"
                );
                // Every datagram reached the core that owns its connection: a
                // mis-steered one is refused there as an unknown connection.
                let misrouted: u64 = r
                    .cores
                    .iter()
                    .map(|c| {
                        c.drops
                            .get("rx_sec_unknown_connection")
                            .copied()
                            .unwrap_or(0)
                            + c.peers
                                .iter()
                                .filter_map(|p| p.rejected.get("unknown_connection"))
                                .sum::<u64>()
                    })
                    .sum();
                assert_eq!(misrouted, 0, "{tag}: datagrams steered to the wrong core");
            }
            break (per_a, per_b);
        }
        assert!(
            Instant::now() < until,
            "{tag}: stats never counted {count}: A {per_a:?} B {per_b:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "{tag}: {count} x {len} B in {secs:.2} s ({:.2} Gbit/s, informational); \
         engine A messages per core {per_a:?}, engine B RX descriptors per core {per_b:?}",
        count as f64 * len as f64 * 8.0 / secs / 1e9
    );
    // One peer, both cores busy on both sides.
    for (who, per) in [("A", &per_a), ("B", &per_b)] {
        assert_eq!(per.len(), 2);
        for (core, n) in per.iter().enumerate() {
            assert!(
                *n >= count / 8,
                "{tag}: engine {who} core {core} carried {n} of {count}: {per:?}"
            );
        }
    }
    assert_eq!(ea.term_within(Duration::from_secs(20)).code(), Some(0));
    assert_eq!(eb.term_within(Duration::from_secs(20)).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_peer_on_two_cores_plain() {
    striped(
        "plain",
        Ipv4Addr::new(127, 0, 3, 11),
        Ipv4Addr::new(127, 0, 3, 12),
        256,
        256 << 10,
        false,
    );
}

#[test]
fn one_peer_on_two_cores_sealed() {
    striped(
        "sealed",
        Ipv4Addr::new(127, 0, 3, 21),
        Ipv4Addr::new(127, 0, 3, 22),
        128,
        256 << 10,
        true,
    );
}

#[test]
fn kshim_refuses_more_conns_per_peer_than_cores() {
    let dir = tmpdir("stripe-refuse");
    let mut cfg = Config::new(vec![nid(Ipv4Addr::new(127, 0, 3, 31))], dir.join("k.sock"));
    cfg.cores = 2;
    for bad in [0u32, 3] {
        cfg.conns_per_peer = bad;
        let e = match Kshim::start(cfg.clone()) {
            Ok(_) => panic!("conns_per_peer = {bad} with 2 cores was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("conns_per_peer") && e.contains("1..=cores"),
            "{bad}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
