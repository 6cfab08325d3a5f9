//! A hostile host against two engines on the sealed wire (a PSK in their
//! config), each engine in its own network namespace, the two joined by a veth
//! pair (as root; over loopback otherwise, with a `SKIP` line for the
//! namespaces): kshim A → engine A → sealed UDT → engine B → kshim B
//! carries verified 1 MiB PUTs, first on a quiet wire (the reference time), then
//! while a hostile host
//!
//! (a) blasts engine B with random and truncated datagrams, every UDT control
//!     type with random socket IDs, sealed-looking datagrams to random
//!     connections, and handshake floods (plain ones, and ones with a forged
//!     PSK trailer) from spoofed source addresses; this transfer may take at
//!     most 1.5× the quiet one;
//! (b) sniffs the live connection (an `AF_PACKET` socket in B's namespace, or
//!     on `lo`) and injects,
//!     from the engines' own addresses and ports (raw IP), ACKs, whole-space
//!     NAKs, message-drop requests and SHUTDOWNs to the sniffed socket IDs,
//!     sealed-looking data with garbage just ahead of the receiver's counter,
//!     and replays of the datagrams it saw, both ways.
//!
//! The hostile host's threads join B's namespace: a host on the receiver's
//! link. Every message arrives once and intact with one `Ok` completion, both
//! engines stay up and exit 0 on SIGTERM, and engine B counts the attacks by
//! reason.
//! Spoofing and sniffing need root (raw and packet sockets): without it the
//! spoofed floods come from the hostile host's own address, and (b) is skipped
//! with a `SKIP` line.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lu2k_kshim::hdr::Msg;
use lu2k_kshim::{Event, Kshim, TxStatus};
use rustix::net::{self as rnet, AddressFamily, RecvFlags, SendFlags, SocketType};

mod common;
use common::{kshim, nid, pattern, put, start_engine, stats, tmpdir, wait_attached, Engine, Netns};

/// The nodes and the hostile host over loopback.
const LO: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 81),
    Ipv4Addr::new(127, 0, 0, 82),
    Ipv4Addr::new(127, 0, 0, 83),
];
/// The same in the namespaces (the hostile host's address is B's namespace's).
const NS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 214, 0, 1),
    Ipv4Addr::new(10, 214, 0, 2),
    Ipv4Addr::new(10, 214, 0, 3),
];
const COUNT: u64 = 64;
const LEN: usize = 1 << 20;

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_bytes(rng: &mut u64, len: usize) -> Vec<u8> {
    (0..len).map(|_| splitmix(rng) as u8).collect()
}

fn drop_count(r: &lu2k_engine::daemon::stats::Report, reason: &str) -> u64 {
    r.cores
        .iter()
        .map(|c| c.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

/// A key file (mode 0600) and a config naming it.
fn keyed_config(dir: &Path) -> String {
    let key = dir.join("psk");
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(97) ^ 0xC3).collect();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("engine.toml");
    std::fs::write(&cfg, format!("psk_file = {:?}\n", key.display())).unwrap();
    cfg.display().to_string()
}

/// Sends UDP datagrams with any source address and port (raw IPv4, root only).
struct Spoofer(OwnedFd);

impl Spoofer {
    fn new() -> Option<Spoofer> {
        rnet::socket(
            AddressFamily::INET,
            SocketType::RAW,
            Some(rnet::ipproto::RAW),
        )
        .ok()
        .map(Spoofer)
    }

    fn send(&self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let total = 28 + payload.len();
        let mut p = Vec::with_capacity(total);
        // IPv4 header: the kernel fills in the checksum and the ID.
        p.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ]);
        p.extend_from_slice(&from.ip().octets());
        p.extend_from_slice(&to.ip().octets());
        let ulen = 8 + payload.len();
        p.extend_from_slice(&from.port().to_be_bytes());
        p.extend_from_slice(&to.port().to_be_bytes());
        p.extend_from_slice(&(ulen as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
        p.extend_from_slice(payload);
        let _ = rnet::sendto(
            &self.0,
            &p,
            SendFlags::empty(),
            &SocketAddrV4::new(*to.ip(), 0),
        );
    }
}

/// A UDT control packet of `ty` to socket `dst`, with `body` after the header.
fn control(ty: u16, info: u32, dst: u32, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(16 + body.len());
    d.extend_from_slice(&(0x8000 | ty).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0, 1]);
    d.extend_from_slice(&dst.to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// Attack (a): noise from anywhere. Runs until `stop`; returns datagrams sent.
fn blast(b: SocketAddrV4, hostile: Ipv4Addr, stop: Arc<AtomicBool>, root: bool) -> u64 {
    let sock = UdpSocket::bind((hostile, 0)).unwrap();
    let spoof = if root { Spoofer::new() } else { None };
    let mut rng = 0xA77AC_u64;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..8 {
            let r = splitmix(&mut rng);
            let d = match r % 6 {
                // Random bytes, any length up to a packet.
                0 => {
                    let n = (splitmix(&mut rng) % 1500) as usize;
                    random_bytes(&mut rng, n)
                }
                // Truncated: a sealed header and too little after it (less
                // than a sealed UDT header: 12 + 12 + 16 bytes).
                1 => {
                    let mut d = vec![0xFF, 0xFF, 0xC0, 0];
                    let n = (splitmix(&mut rng) % 36) as usize;
                    d.extend(random_bytes(&mut rng, n));
                    d
                }
                // Every UDT control type, random socket IDs and bodies.
                2 => {
                    let ty = [0u16, 1, 2, 3, 4, 5, 6, 7, 0x7FFF][(r >> 8) as usize % 9];
                    let n = (splitmix(&mut rng) % 64) as usize;
                    control(
                        ty,
                        splitmix(&mut rng) as u32,
                        splitmix(&mut rng) as u32,
                        &random_bytes(&mut rng, n),
                    )
                }
                // Sealed-looking, to random connections.
                3 => {
                    let mut d = vec![0xFF, 0xFF, 0xC0 | ((r >> 8) as u8 & 3)];
                    d.extend(random_bytes(&mut rng, 5));
                    d.extend((splitmix(&mut rng) as u32).to_be_bytes());
                    let n = 32 + (splitmix(&mut rng) % 1400) as usize;
                    d.extend(random_bytes(&mut rng, n));
                    d
                }
                // Handshakes: plain, with a forged trailer (random key and MAC),
                // and with a forged trailer of sealed wire version 2.
                _ => {
                    let mut d = control(0, 0, 0, &random_bytes(&mut rng, 48));
                    d[16..20].copy_from_slice(&4u32.to_be_bytes());
                    if r % 2 == 0 {
                        d.extend_from_slice(if r % 4 == 0 {
                            &lu2k_engine::transport::seal::HS_MAGIC
                        } else {
                            b"L2K2"
                        });
                        d.extend(random_bytes(&mut rng, 48));
                    }
                    d
                }
            };
            let spoofed = r % 6 >= 4;
            match (&spoof, spoofed) {
                (Some(s), true) => {
                    // A different source address every time.
                    let ip = Ipv4Addr::new(
                        b.ip().octets()[0],
                        1 + (r >> 16) as u8 % 200,
                        (r >> 24) as u8,
                        1 + (r >> 32) as u8 % 250,
                    );
                    s.send(
                        SocketAddrV4::new(ip, 1024 + (r >> 40) as u16 % 60000),
                        b,
                        &d,
                    );
                }
                _ => {
                    let _ = sock.send_to(&d, b);
                }
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    sent
}

/// What the sniffer learnt of one direction: the last sealed datagram and
/// its counter.
#[derive(Default, Clone)]
struct Seen {
    from: Option<SocketAddrV4>,
    to: Option<SocketAddrV4>,
    last: Vec<u8>,
}

/// Attack (b): sniffs every interface it sees and injects into the connection
/// between `a` and `b`, both ways, until `stop`. Returns injections by kind.
fn on_path(a: SocketAddrV4, b: SocketAddrV4, stop: Arc<AtomicBool>) -> [u64; 3] {
    let spoof = Spoofer::new().expect("a raw socket (root)");
    let sniff = rnet::socket(
        AddressFamily::PACKET,
        SocketType::DGRAM,
        Some(rnet::eth::ALL),
    )
    .expect("AF_PACKET socket");
    rnet::sockopt::set_socket_timeout(
        &sniff,
        rnet::sockopt::Timeout::Recv,
        Some(Duration::from_millis(5)),
    )
    .unwrap();
    let seen = Arc::new(Mutex::new([Seen::default(), Seen::default()]));
    let mut counts = [0u64; 3]; // plain control, garbage ahead, replays
    let mut rng = 0x0B5E55_u64;
    let mut buf = vec![0u8; 65536];
    let mut last_inject = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, _)) = rnet::recv(&sniff, &mut buf[..], RecvFlags::empty()) {
            let p = &buf[..n];
            if n >= 28 && p[0] >> 4 == 4 && p[9] == 17 {
                let ihl = usize::from(p[0] & 15) * 4;
                let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
                let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
                let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
                let from = SocketAddrV4::new(src, sport);
                let to = SocketAddrV4::new(dst, dport);
                let udp = &p[(ihl + 8).min(n)..];
                let dir = if from == a && to == b {
                    Some(0)
                } else if from == b && to == a {
                    Some(1)
                } else {
                    None
                };
                if let Some(i) = dir {
                    if udp.len() >= 44 && udp[..2] == [0xFF, 0xFF] {
                        let mut s = seen.lock().unwrap();
                        s[i] = Seen {
                            from: Some(from),
                            to: Some(to),
                            last: udp.to_vec(),
                        };
                    }
                }
            }
        }
        if last_inject.elapsed() < Duration::from_millis(2) {
            continue;
        }
        last_inject = Instant::now();
        let s = seen.lock().unwrap().clone();
        for dir in s.iter() {
            let (Some(from), Some(to)) = (dir.from, dir.to) else {
                continue;
            };
            let d = &dir.last;
            // The clear header: mark, version and epoch, the counter's low
            // 40 bits, the destination socket ID.
            let dst = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            let counter = u64::from_be_bytes([0, 0, 0, d[3], d[4], d[5], d[6], d[7]]);
            // Plain control packets to the live socket ID: an ACK of
            // everything, a NAK of the whole sequence space, a drop request
            // of every message, a SHUTDOWN.
            let r = splitmix(&mut rng) as u32 & 0x7FFF_FFFF;
            for pkt in [
                control(2, 1, dst, &[&r.to_be_bytes()[..], &[0; 20]].concat()),
                control(3, 0, dst, &[0x80, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF]),
                control(7, 0x1FFF_FFFF, dst, &[0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF]),
                control(5, 0, dst, &[]),
            ] {
                spoof.send(from, to, &pkt);
                counts[0] += 1;
            }
            // Garbage ahead of the receiver's counter, same size. Ahead by more
            // than the sender sends between two sniffs: the sniffed datagram
            // can be stale by hundreds of packets on a fast transfer, and a
            // counter the receiver has already seen is a replay, refused
            // before any AEAD work, so it would never test the tag.
            for k in 1..=4 {
                let mut g = d.clone();
                g[3..8].copy_from_slice(&(counter + 20_000 + k).to_be_bytes()[3..]);
                let body = random_bytes(&mut rng, g.len() - 12);
                g[12..].copy_from_slice(&body);
                spoof.send(from, to, &g);
                counts[1] += 1;
            }
            // The datagram itself again.
            spoof.send(from, to, d);
            counts[2] += 1;
        }
    }
    counts
}

/// Two network namespaces joined by a veth pair (`common::Netns`), A's address
/// on A's end and B's and the hostile host's on B's.
fn netns_pair(tag: &str) -> Result<Netns, String> {
    Netns::pair(tag, &NS[..1], &NS[1..])
}

impl Netns {
    /// Moves the calling thread into namespace `i` (0: A's, 1: B's).
    fn enter(&self, i: usize) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.ns[i])).expect("netns file");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
    }
}

struct Pair {
    dir: std::path::PathBuf,
    ka: Kshim,
    kb: Kshim,
    ea: Engine,
    eb: Engine,
    port: u16,
    /// A, B and the hostile host.
    ips: [Ipv4Addr; 3],
    netns: Option<Arc<Netns>>,
}

impl Pair {
    /// Runs `f` on a thread of the hostile host (in B's namespace, if any).
    fn hostile<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let ns = self.netns.clone();
        std::thread::spawn(move || {
            if let Some(ns) = ns {
                ns.enter(1);
            }
            f()
        })
    }
}

fn pair(tag: &str, port_off: u16, netns: Option<Netns>) -> Pair {
    let dir = tmpdir(tag);
    let cfg = keyed_config(&dir);
    let ips = if netns.is_some() { NS } else { LO };
    let port = 20000 + (std::process::id() % 20000) as u16 + port_off;
    let mut ka = kshim(&dir, "a", ips[0], 1);
    let mut kb = kshim(&dir, "b", ips[1], 1);
    let (ea, eb) = match &netns {
        Some(ns) => {
            let start = |i: usize, name: &str| {
                let mut cmd = Command::new("ip");
                cmd.args([
                    "netns",
                    "exec",
                    &ns.ns[i],
                    env!("CARGO_BIN_EXE_lu2k-engine"),
                ])
                .args(["run", "--config", &cfg, "--kshim-socket"])
                .arg(dir.join(format!("{name}.sock")))
                .args(["--bind", &ips[i].to_string(), "--port", &port.to_string()])
                .arg("--stats-socket")
                .arg(dir.join(format!("{name}-stats.sock")));
                Engine::spawn(cmd)
            };
            (start(0, "a"), start(1, "b"))
        }
        None => (
            start_engine(&dir, "a", ips[0], port, &["--config", &cfg]),
            start_engine(&dir, "b", ips[1], port, &["--config", &cfg]),
        ),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);
    Pair {
        dir,
        ka,
        kb,
        ea,
        eb,
        port,
        ips,
        netns: netns.map(Arc::new),
    }
}

/// Messages `first..first + COUNT` from A to B, each checked; the time taken.
fn transfer(p: &mut Pair, first: u64) -> Duration {
    let (na, nb) = (nid(p.ips[0]), nid(p.ips[1]));
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut completed = 0u64;
    let mut received = vec![false; COUNT as usize];
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < COUNT || completed < COUNT {
        assert!(
            Instant::now() < deadline,
            "timed out: sent {sent} received {got} completed {completed}"
        );
        while sent < COUNT {
            let n = first + sent;
            if p.ka.send(&put(nb, na, LEN, n), &pattern(n, LEN)).is_err() {
                break;
            }
            sent += 1;
        }
        while let Some(ev) = p.ka.poll() {
            match ev {
                Event::TxDone { status, detail, .. } => {
                    assert_eq!(status, TxStatus::Ok, "send failed (detail {detail})");
                    completed += 1;
                }
                Event::EngineGone(r) => panic!("engine A gone: {r:?}"),
                _ => {}
            }
        }
        match p.kb.wait(Some(Duration::from_millis(2))) {
            Some(Event::Rx(m)) => {
                let n = match m.hdr.msg {
                    Msg::Put { match_bits, .. } => match_bits,
                    other => panic!("unexpected message {other:?}"),
                };
                assert!(
                    (first..first + COUNT).contains(&n),
                    "message {n} out of this run"
                );
                assert_eq!(m.from, na, "a message from someone else than A");
                let mut b = vec![0u8; LEN];
                m.copy_to(&mut b);
                assert!(
                    m.len() == LEN && b == pattern(n, LEN),
                    "message {n} differs"
                );
                let i = (n - first) as usize;
                assert!(!received[i], "message {n} delivered twice");
                received[i] = true;
                got += 1;
                p.kb.rx_done(m);
            }
            Some(Event::EngineGone(r)) => panic!("engine B gone: {r:?}"),
            _ => {}
        }
    }
    t0.elapsed()
}

#[test]
fn sealed_transfer_survives_noise_and_an_on_path_attacker() {
    let root = Spoofer::new().is_some();
    if !root {
        println!(
            "SKIP hostile_sealed namespaces, spoofed sources and (b) on-path: \
             network namespaces, raw and packet sockets need root; over loopback"
        );
    }
    let netns = if root {
        match netns_pair("l2ks") {
            Ok(ns) => Some(ns),
            Err(e) => {
                println!("SKIP hostile_sealed namespaces: {e}; over loopback");
                None
            }
        }
    } else {
        None
    };
    let mut p = pair("hostile-sealed", 307, netns);
    let [a_ip, b_ip, hostile_ip] = p.ips;
    let b = SocketAddrV4::new(b_ip, p.port);
    let a = SocketAddrV4::new(a_ip, p.port);
    eprintln!(
        "engines at {a} and {b}{}",
        if p.netns.is_some() {
            " (namespaces over veth)"
        } else {
            " (loopback)"
        }
    );
    // Warm-up: connections up, then the quiet reference.
    transfer(&mut p, 0);
    // Medians of three: one transfer is a few hundred milliseconds, and a
    // shared machine's noise is of that order.
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[1]
    };
    let quiet = median((1..4).map(|i| transfer(&mut p, 1000 * i)).collect());

    // (a) noise from anywhere.
    let stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let stop = stop.clone();
        p.hostile(move || blast(b, hostile_ip, stop, root))
    };
    std::thread::sleep(Duration::from_millis(100));
    let noisy = median((4..7).map(|i| transfer(&mut p, 1000 * i)).collect());
    stop.store(true, Ordering::Relaxed);
    let blasted = noise.join().unwrap();
    eprintln!("quiet {quiet:?}, under noise {noisy:?} ({blasted} hostile datagrams)");
    assert!(
        blasted > 1000,
        "the noise was too thin to test anything: {blasted}"
    );
    assert!(
        noisy.as_secs_f64() <= 1.5 * quiet.as_secs_f64(),
        "under noise {noisy:?}, quiet {quiet:?}: more than 1.5x"
    );

    // (b) on path.
    let injected = if root {
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            p.hostile(move || on_path(a, b, stop))
        };
        std::thread::sleep(Duration::from_millis(50));
        let took = transfer(&mut p, 7000);
        stop.store(true, Ordering::Relaxed);
        let c = t.join().unwrap();
        eprintln!("on-path attacker: {took:?}, injected plain/garbage/replays {c:?}");
        assert!(
            c.iter().all(|&n| n > 10),
            "the attacker saw too little: {c:?}"
        );
        Some(c)
    } else {
        None
    };

    let want: &[&str] = if injected.is_some() {
        &[
            "rx_sec_plain_refused",
            "rx_sec_unknown_connection",
            "rx_sec_bad_handshake",
            "rx_sec_wire_version",
            "rx_sec_bad_tag",
            "rx_sec_replay",
        ]
    } else {
        &[
            "rx_sec_plain_refused",
            "rx_sec_unknown_connection",
            "rx_sec_bad_handshake",
            "rx_sec_wire_version",
        ]
    };
    let until = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = stats(&p.dir, "b");
        if want.iter().all(|w| drop_count(&r, w) > 0) || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let drops = &r.cores[0].drops;
    eprintln!("engine B drops: {drops:?}");
    for w in want {
        assert!(drop_count(&r, w) > 0, "{w} not counted: {drops:?}");
    }
    if injected.is_some() {
        // What came from A's own address and port is in A's peer counters.
        let peer = r.cores[0]
            .peers
            .iter()
            .find(|q| q.addr.starts_with(&format!("{a_ip}:")))
            .expect("peer A at B");
        eprintln!(
            "peer A at B: rejected {:?}, rekeys {}",
            peer.rejected, peer.rekeys
        );
        for w in ["plain_refused", "bad_tag", "replay"] {
            assert!(
                peer.rejected.get(w).copied().unwrap_or(0) > 0,
                "{w}: {:?}",
                peer.rejected
            );
        }
        let ra = stats(&p.dir, "a");
        let back = ra.cores[0]
            .peers
            .iter()
            .find(|q| q.addr.starts_with(&format!("{b_ip}:")))
            .expect("peer B at A");
        assert!(
            back.rejected.get("bad_tag").copied().unwrap_or(0) > 0,
            "{:?}",
            back.rejected
        );
    }
    assert_eq!(r.payload_copied(), 0);
    for (name, e) in [("a", p.ea), ("b", p.eb)] {
        assert_eq!(
            e.term_within(Duration::from_secs(20)).code(),
            Some(0),
            "engine {name} exit status"
        );
    }
    let _ = std::fs::remove_dir_all(&p.dir);
}
