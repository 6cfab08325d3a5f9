//! Two engine processes with a pre-shared key over loopback: kshim A → engine
//! A → sealed UDT over UDP → engine B → kshim B carries verified 1 MiB PUTs,
//! while a plain UDT4 client (a `lu2k_udt` connection on a plain `UdpSocket`)
//! tries to connect to engine B and is refused and counted.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use lu2k_udt::conn::{self as conn, Connection, Extent};

mod common;
use common::{kshim, nid, start_engine, stats, tmpdir, wait_attached, Transfer};

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 71);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 72);
const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 73);
const COUNT: u64 = 16;
const LEN: usize = 1 << 20;

fn drop_count(r: &lu2k_engine::daemon::stats::Report, reason: &str) -> u64 {
    r.cores
        .iter()
        .map(|c| c.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

/// A key file (mode 0600) and a config naming it.
fn keyed_config(dir: &Path) -> String {
    let key = dir.join("psk");
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(151) ^ 0x5A).collect();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("engine.toml");
    std::fs::write(&cfg, format!("psk_file = {:?}\n", key.display())).unwrap();
    cfg.display().to_string()
}

/// A plain UDT4 client tries to connect to `b` for `how_long`; whether it got
/// connected.
fn plain_client(b: SocketAddrV4, how_long: Duration) -> bool {
    let sock = UdpSocket::bind((PLAIN_IP, 0)).unwrap();
    sock.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut c = Connection::connect(0, conn::Config::default(), 77, SocketAddr::V4(b));
    let mut buf = vec![0u8; 2048];
    while t0.elapsed() < how_long && !c.is_connected() {
        let now = t0.elapsed().as_micros() as u64;
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        while let Some(t) = c.poll_transmit(now) {
            let _ = sock.send_to(t.header.as_bytes(), b);
        }
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            let at = Extent {
                buf: 0,
                offset: 0,
                len: n as u32,
            };
            let _ = c.handle_datagram(now, &buf[..n], at);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    c.is_connected()
}

#[test]
fn sealed_engines_carry_verified_puts_and_refuse_a_plain_peer() {
    let dir = tmpdir("security-engines");
    let cfg = keyed_config(&dir);
    let port = 20000 + (std::process::id() % 20000) as u16 + 203;
    let mut ka = kshim(&dir, "a", A_IP, 1);
    let mut kb = kshim(&dir, "b", B_IP, 1);
    let ea = start_engine(&dir, "a", A_IP, port, &["--config", &cfg]);
    let eb = start_engine(&dir, "b", B_IP, port, &["--config", &cfg]);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let plain = std::thread::spawn(move || {
        plain_client(SocketAddrV4::new(B_IP, port), Duration::from_secs(2))
    });

    let mut t = Transfer::new("", nid(A_IP), nid(B_IP), COUNT, |_| LEN);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.finished() {
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(2));
    }
    assert!(!plain.join().unwrap(), "a plain UDT4 client got connected");

    let until = Instant::now() + Duration::from_secs(5);
    let (ra, rb) = loop {
        let (ra, rb) = (stats(&dir, "a"), stats(&dir, "b"));
        let sealed: u64 = ra.cores.iter().map(|c| c.sealed_bytes).sum();
        if (drop_count(&rb, "rx_sec_plain_refused") > 0 && sealed >= COUNT * LEN as u64)
            || Instant::now() > until
        {
            break (ra, rb);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let sealed: u64 = ra.cores.iter().map(|c| c.sealed_bytes).sum();
    let opened: u64 = rb.cores.iter().map(|c| c.opened_bytes).sum();
    eprintln!(
        "sealed {sealed} opened {opened}; B drops {:?}",
        rb.cores[0].drops
    );
    assert!(sealed >= COUNT * LEN as u64, "sealed {sealed}");
    assert!(opened >= COUNT * LEN as u64, "opened {opened}");
    assert!(drop_count(&rb, "rx_sec_plain_refused") > 0);
    assert_eq!(ra.payload_copied(), 0, "payload copied besides the cipher");
    let peer = rb.cores[0]
        .peers
        .iter()
        .find(|p| p.addr.starts_with(&format!("{A_IP}:")))
        .expect("peer A at B");
    assert_eq!(peer.security, "required");
    assert!(peer.rejected.is_empty(), "A's datagrams refused: {peer:?}");

    for (name, e) in [("a", ea), ("b", eb)] {
        assert_eq!(
            e.term_within(Duration::from_secs(20)).code(),
            Some(0),
            "engine {name} exit status"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
