//! A hostile host on loopback beside a real transfer: kshim A → engine A → UDT over
//! UDP → engine B → kshim B carries verified 1 MiB PUTs while a plain `UdpSocket`
//! sends engine B crafted UDT packets:
//!
//! - many handshakes from one address (UDT clients of `lu2k_udt` that finish the
//!   cookie exchange), two of them with the same client socket ID as a third;
//! - junk from the peer's own address: too short, random destination sockets,
//!   random handshake-looking bytes.
//!
//! Every message arrives once and intact with one `Ok` completion, both engines
//! stay up (and exit 0 on SIGTERM), no more connections than the per-address cap
//! come up, and engine B's `lu2k-engine stats --json` counts the attacks by reason.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lu2k_engine::transport::udt::MAX_CONNS_PER_ADDR;
use lu2k_udt::conn::{self as conn, Connection, Extent};

mod common;
use common::{kshim, nid, start_engine, stats, tmpdir, wait_attached, Transfer};

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 61);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 62);
/// Where the handshake flood comes from.
const HOSTILE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 63);
const COUNT: u64 = 48;
const LEN: usize = 1 << 20;

fn drop_count(r: &lu2k_engine::daemon::stats::Report, reason: &str) -> u64 {
    r.cores
        .iter()
        .map(|c| c.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hostile host: runs until `stop`, returns how many of its connections
/// came up.
fn hostile(b: SocketAddrV4, stop: Arc<AtomicBool>) -> usize {
    let flood = UdpSocket::bind((HOSTILE_IP, 0)).unwrap();
    flood.set_nonblocking(true).unwrap();
    // The peer's address, another port: what anyone can forge off-path.
    let junk = UdpSocket::bind((A_IP, 0)).unwrap();
    let t0 = Instant::now();
    let cfg = conn::Config::default();
    let target = SocketAddr::V4(b);
    // Seeds 3 and 3 again: socket IDs that collide with another client's.
    let seeds = (0..MAX_CONNS_PER_ADDR as u64 + 6).chain([3, 3]);
    let mut clients: Vec<Connection> = seeds
        .map(|s| Connection::connect(0, cfg.clone(), 1000 + s, target))
        .collect();
    let mut rng = 0x5EED_u64;
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let now = t0.elapsed().as_micros() as u64;
        for c in &mut clients {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            while let Some(t) = c.poll_transmit(now) {
                let _ = flood.send_to(t.header.as_bytes(), b);
            }
            while c.poll_event().is_some() {}
        }
        while let Ok((n, _)) = flood.recv_from(&mut buf) {
            if n < 16 {
                continue;
            }
            let dst = u32::from_be_bytes(buf[12..16].try_into().unwrap());
            if let Some(c) = clients.iter_mut().find(|c| c.socket_id() == dst) {
                let at = Extent {
                    buf: 0,
                    offset: 0,
                    len: n as u32,
                };
                let _ = c.handle_datagram(now, &buf[..n], at);
                while c.poll_release().is_some() {}
            }
        }
        // Junk: too short, to random sockets, and random bytes to the listener.
        for kind in 0..3 {
            let len = match kind {
                0 => (splitmix(&mut rng) % 16) as usize,
                _ => 16 + (splitmix(&mut rng) % 100) as usize,
            };
            let mut d: Vec<u8> = (0..len).map(|_| splitmix(&mut rng) as u8).collect();
            if kind == 1 {
                let id = (splitmix(&mut rng) as u32) | 1;
                d[12..16].copy_from_slice(&id.to_be_bytes());
            } else if kind == 2 {
                d[0] = 0x80; // control, handshake
                d[1] = 0;
                d[12..16].fill(0);
            }
            let _ = junk.send_to(&d, b);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    clients.iter().filter(|c| c.is_connected()).count()
}

#[test]
fn transfer_survives_a_hostile_sender() {
    let dir = tmpdir("hostile-udp");
    let port = 20000 + (std::process::id() % 20000) as u16 + 101;
    let mut ka = kshim(&dir, "a", A_IP, 1);
    let mut kb = kshim(&dir, "b", B_IP, 1);
    let ea = start_engine(&dir, "a", A_IP, port, &[]);
    let eb = start_engine(&dir, "b", B_IP, port, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || hostile(SocketAddrV4::new(B_IP, port), stop))
    };
    // Let the flood get going before the transfer starts.
    std::thread::sleep(Duration::from_millis(300));

    let (na, nb) = (nid(A_IP), nid(B_IP));
    let mut t = Transfer::new("", na, nb, COUNT, |_| LEN);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.finished() {
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    let connected = attacker.join().expect("hostile thread");
    assert!(
        connected <= MAX_CONNS_PER_ADDR,
        "{connected} hostile connections from one address"
    );

    // The attacks, counted by reason (published every 100 ms).
    let want = ["rx_malformed", "rx_unknown_socket", "rx_bad_handshake"];
    let until = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = stats(&dir, "b");
        if want.iter().all(|w| drop_count(&r, w) > 0) || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let drops = r.cores.iter().map(|c| &c.drops).collect::<Vec<_>>();
    eprintln!("engine B drops: {drops:?}; hostile connections up: {connected}");
    for w in want {
        assert!(drop_count(&r, w) > 0, "{w} not counted: {drops:?}");
    }
    // Refused beyond the per-address cap: by the transport, or already by the
    // listener's own limits.
    assert!(
        drop_count(&r, "rx_conn_limit_addr") + drop_count(&r, "rx_bad_handshake") > 0,
        "handshake flood not counted: {drops:?}"
    );
    assert_eq!(r.payload_copied(), 0);

    for (name, e) in [("a", ea), ("b", eb)] {
        assert_eq!(
            e.term_within(Duration::from_secs(20)).code(),
            Some(0),
            "engine {name} exit status"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
