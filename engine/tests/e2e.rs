//! The engine as a process between two in-process kshims over real UDP loopback:
//! kshim A → engine A → UDT over UDP → engine B → kshim B. Every message's content is
//! verified, every send gets exactly one `Ok` completion, no payload byte is copied by
//! lu2k, the I/O path that ran is the one meant, every buffer is home at the end (TX pool
//! whole, every RX message and descriptor given back), and SIGTERM stops both engines
//! with exit status 0 having completed everything it was handed itself.
//!
//! The suite runs once over IPv4 (127.0.0.x on loopback) and once over IPv6:
//! IPv6 addresses on the loopback of a network namespace, and a veth pair between
//! two namespaces with ULA addresses; and a dual-stack engine serving an IPv4 and
//! an IPv6 peer at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::hdr::Msg;
use lu2k_kshim::{Config, Event, Kshim, TxStatus};

mod common;
use common::{
    kshim, kshim_of, missing_tools, nid, nid_of, no_ipv6, not_root, pattern, put, start_engine_in,
    stats, tmpdir, wait_attached, Engine, Netns, Transfer,
};

/// Where an engine runs: its address, and the network namespace (`None`: this one).
#[derive(Debug, Clone, Copy)]
struct At<'a> {
    ip: IpAddr,
    ns: Option<&'a str>,
}

/// On loopback in this namespace.
fn here(ip: Ipv4Addr) -> At<'static> {
    At {
        ip: ip.into(),
        ns: None,
    }
}

/// Starts engines "a" and "b" for kshims `ka` and `kb`, bound to their addresses on
/// `port`, and waits until both have attached.
fn start_engines(
    dir: &Path,
    (ka, a): (&mut Kshim, At<'_>),
    (kb, b): (&mut Kshim, At<'_>),
    port: u16,
    extra: &[&str],
) -> (Engine, Engine) {
    let ea = start_engine_in(a.ns, dir, "a", &a.ip.to_string(), port, extra);
    let eb = start_engine_in(b.ns, dir, "b", &b.ip.to_string(), port, extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(ka, deadline);
    wait_attached(kb, deadline);
    (ea, eb)
}

/// The I/O path an engine started with `extra` must report: the slow one when forced,
/// otherwise what this kernel's probe chooses (io_uring wherever it works).
fn expected_io_path(extra: &[&str]) -> String {
    let forced = extra.windows(2).any(|w| w == ["--io-path", "epoll"]);
    lu2k_engine::io::probe::Features::probe()
        .choose(forced)
        .0
        .to_string()
}

/// The doorbell an engine started with `extra` must use: the eventfd on the slow path
/// or when asked, else a futex wait wherever the kernel has `IORING_OP_FUTEX_WAIT`
/// (kshim offers futex wakes).
fn expected_doorbell(extra: &[&str]) -> &'static str {
    let f = lu2k_engine::io::probe::Features::probe();
    let forced = extra.windows(2).any(|w| w == ["--io-path", "epoll"]);
    let uring = f.choose(forced).0 == lu2k_engine::io::probe::IoPath::Uring;
    let eventfd = extra.windows(2).any(|w| w == ["--doorbell", "eventfd"]);
    if eventfd || !uring || !f.futex {
        "eventfd"
    } else {
        "futex"
    }
}

/// One line of engine `name`'s per-peer counters: RTT, pacing rate, retransmissions,
/// and its drops by reason.
fn peer_summary(dir: &Path, name: &str) -> String {
    let Ok(r) = lu2k_engine::daemon::stats::fetch(&dir.join(format!("{name}-stats.sock"))) else {
        return format!("engine {name}: no stats");
    };
    let mut parts = Vec::new();
    for c in &r.cores {
        for p in &c.peers {
            parts.push(format!(
                "peer {} rtt {} us rate {:.1} Mbit/s retx {} bytes tx/rx {}/{}",
                p.nid,
                p.rtt_us,
                p.rate_bps as f64 / 1e6,
                p.retransmissions,
                p.bytes_tx,
                p.bytes_rx
            ));
        }
        if !c.drops.is_empty() {
            parts.push(format!("core {} drops {:?}", c.core, c.drops));
        }
    }
    format!("engine {name}: {}", parts.join(", "))
}

fn stop(e: Engine) -> std::process::ExitStatus {
    e.term_within(Duration::from_secs(20))
}

/// Sends `count` messages of `len` bytes A → B over IPv4 loopback and checks
/// everything.
fn transfer(
    tag: &str,
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
    cores: u32,
    count: u64,
    len: usize,
    extra: &[&str],
) {
    transfer_at(tag, here(a_ip), here(b_ip), cores, count, len, extra);
}

/// Sends `count` messages of `len` bytes from A at `a` to B at `b` (either family)
/// and checks everything.
fn transfer_at(
    tag: &str,
    a: At<'_>,
    b: At<'_>,
    cores: u32,
    count: u64,
    len: usize,
    extra: &[&str],
) {
    let dir = tmpdir(&format!("e2e-{tag}"));
    let port =
        20000 + (std::process::id() % 20000) as u16 + cores as u16 * 7 + extra.len() as u16 * 3;
    let mut ka = kshim_of(&dir, "a", a.ip, cores);
    let mut kb = kshim_of(&dir, "b", b.ip, cores);
    let (ea, eb) = start_engines(&dir, (&mut ka, a), (&mut kb, b), port, extra);

    let (na, nb) = (nid_of(a.ip), nid_of(b.ip));
    let tx_pool_at_start = ka.tx_pool_free();
    let mut t = Transfer::new(tag, na, nb, count, move |_| len);
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = Instant::now();
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    while !t.finished() {
        if Instant::now() >= next_progress || Instant::now() >= deadline {
            // How the connection is doing, so a slow or stuck run says why.
            eprintln!(
                "{tag}: {:.0} s: {}; {}; {}",
                started.elapsed().as_secs_f64(),
                t.progress(),
                peer_summary(&dir, "a"),
                peer_summary(&dir, "b")
            );
            next_progress += Duration::from_secs(10);
        }
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(2));
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{tag}: {count} messages of {len} bytes in {secs:.2} s = {:.2} Gbit/s goodput (informational); {}",
        (count as f64 * len as f64 * 8.0) / secs / 1e9,
        peer_summary(&dir, "a")
    );
    // Statistics: no payload byte copied by lu2k on either side.
    for name in ["a", "b"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
            .args(["stats", "--json", "--socket"])
            .arg(dir.join(format!("{name}-stats.sock")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: lu2k_engine::daemon::stats::Report = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r.payload_copied(), 0, "{tag}: engine {name} copied payload");
        assert_eq!(r.cores.len(), cores as usize);
        // The path the test meant to exercise is the one that ran.
        assert_eq!(r.io_path, expected_io_path(extra), "{tag}: engine {name}");
        for c in &r.cores {
            assert_eq!(c.doorbell, expected_doorbell(extra), "{tag}: engine {name}");
        }
        // Snapshots are published every 100 ms of a core's loop, and an idle core
        // sleeps up to 200 ms: wait for one taken after the traffic.
        let until = Instant::now() + Duration::from_secs(5);
        let mut r = r;
        while !check_waiting(&format!("{tag}: engine {name}"), &r) {
            assert!(Instant::now() < until, "{tag}: engine {name}: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
            r = stats(&dir, name);
        }
    }
    // Every buffer home: kshim A's TX pool is whole again, kshim B gave back every
    // message it took, and engine B saw every RX descriptor it published come back.
    assert_eq!(
        ka.tx_pool_free(),
        tx_pool_at_start,
        "{tag}: TX pool chunks still held after every completion"
    );
    let kbs = kb.stats();
    assert_eq!(kbs.rx, count, "{tag}: kshim B message count");
    assert_eq!(kbs.rx_returned, kbs.rx, "{tag}: kshim B kept messages");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = stats(&dir, "b");
        let (descs, returns) = r
            .cores
            .iter()
            .fold((0, 0), |(d, t), c| (d + c.rx_descs, t + c.rx_returns));
        if descs == returns {
            break;
        }
        assert!(
            Instant::now() < until,
            "{tag}: engine B published {descs} RX descriptors, {returns} came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stop(ea).code(), Some(0), "{tag}: engine A exit status");
    assert_eq!(stop(eb).code(), Some(0), "{tag}: engine B exit status");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The counters of where a core's time goes while waiting: they agree with each
/// other (asserted), and the engine has looped, sent, slept, spun, woken and armed
/// timers (returned: a snapshot taken before the traffic has not yet).
fn check_waiting(who: &str, r: &lu2k_engine::daemon::stats::Report) -> bool {
    let (mut sends, mut sleeps, mut woke, mut spin_us, mut armed) = (0, 0, 0, 0, 0);
    for c in &r.cores {
        let (io, w) = (&c.io, &c.io.wakes);
        let who = format!("{who} core {}", c.core);
        assert!(c.passes >= c.sleeps, "{who}: {c:?}");
        // A sleep that finds kshim's rings busy at its re-check does not block.
        assert!(w.total() <= c.sleeps, "{who}: {w:?} vs {c:?}");
        assert!(io.timers_fired >= w.timer, "{who}: {io:?}");
        assert!(io.datagrams_sent >= io.sends, "{who}: {io:?}");
        // Every blocking wait is one wait syscall, and the other path's is unused.
        let (calls, other) = match c.io_path.as_str() {
            "epoll" => (io.epoll_waits, io.enters),
            _ => (io.enters, io.epoll_waits),
        };
        assert!(calls >= w.total() && other == 0, "{who}: {io:?}");
        sends += io.sends;
        sleeps += c.sleeps;
        woke += w.total();
        spin_us += c.spin_us;
        armed += io.timers_armed;
    }
    // The default spin is not zero, and an idle core always has a deadline.
    sends > 0 && sleeps > 0 && woke > 0 && spin_us > 0 && armed > 0
}

#[test]
fn bulk_transfer_fast_path() {
    transfer(
        "fast",
        Ipv4Addr::new(127, 0, 0, 11),
        Ipv4Addr::new(127, 0, 0, 12),
        1,
        GIB_OF_MIB,
        1 << 20,
        &[],
    );
}

/// 1 GiB in 1 MiB messages: what the end-to-end proof moves.
const GIB_OF_MIB: u64 = 1024;

#[test]
fn bulk_transfer_slow_path_forced() {
    transfer(
        "slow",
        Ipv4Addr::new(127, 0, 0, 21),
        Ipv4Addr::new(127, 0, 0, 22),
        1,
        GIB_OF_MIB,
        1 << 20,
        &["--io-path", "epoll"],
    );
}

#[test]
fn bulk_transfer_two_cores() {
    transfer(
        "cores2",
        Ipv4Addr::new(127, 0, 0, 31),
        Ipv4Addr::new(127, 0, 0, 32),
        2,
        GIB_OF_MIB,
        1 << 20,
        // And the eventfd doorbell (what a kernel-module kshim rings): the others
        // take the futex where the kernel has IORING_OP_FUTEX_WAIT.
        &["--cores", "2", "--doorbell", "eventfd"],
    );
}

#[test]
fn bulk_transfer_send_worker() {
    transfer(
        "worker",
        Ipv4Addr::new(127, 0, 0, 25),
        Ipv4Addr::new(127, 0, 0, 26),
        1,
        GIB_OF_MIB,
        1 << 20,
        &["--send-worker", "on"],
    );
}

#[test]
fn small_messages_two_cores() {
    transfer(
        "small2",
        Ipv4Addr::new(127, 0, 0, 33),
        Ipv4Addr::new(127, 0, 0, 34),
        2,
        2000,
        4096,
        &[],
    );
}

#[test]
fn killed_peer_engine_fails_sends_back() {
    killed_peer(
        "kill",
        here(Ipv4Addr::new(127, 0, 0, 41)),
        here(Ipv4Addr::new(127, 0, 0, 42)),
    );
}

/// The same over IPv6: the ICMPv6 port unreachable reaches the engine through
/// `IPV6_RECVERR` as ECONNREFUSED.
#[test]
fn killed_ipv6_peer_engine_fails_sends_back() {
    let test = "killed_ipv6_peer_engine_fails_sends_back";
    let (a, b) = (ula(0x41), ula(0x42));
    let Some(ns) = v6_loopback(test, "kill6", &[a, b]) else {
        return;
    };
    let at = |ip: Ipv6Addr| At {
        ip: ip.into(),
        ns: Some(ns.ns[0].as_str()),
    };
    killed_peer("kill6", at(a), at(b));
}

/// Engine B is killed mid-transfer from A: A's sends fail back, some with the
/// kernel's ECONNREFUSED, and kshim A is told B is down.
fn killed_peer(tag: &str, a: At<'_>, b: At<'_>) {
    let dir = tmpdir(&format!("e2e-{tag}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 101;
    let mut ka = kshim_of(&dir, "a", a.ip, 1);
    let mut kb = kshim_of(&dir, "b", b.ip, 1);
    let extra = ["--peer-down-timeout-s", "5"];
    let ea = start_engine_in(a.ns, &dir, "a", &a.ip.to_string(), port, &extra);
    let mut eb = start_engine_in(b.ns, &dir, "b", &b.ip.to_string(), port, &extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);
    let (na, nb) = (nid_of(a.ip), nid_of(b.ip));
    let len = 256 << 10;
    let mut outstanding = std::collections::HashSet::new();
    let mut ok = 0;
    let mut failed = Vec::new();
    let mut peer_down = false;
    let mut killed = false;
    let mut killed_at = 0u64;
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(
            Instant::now() < deadline,
            "{tag}: hung: {} sends outstanding, {ok} ok, {} failed",
            outstanding.len(),
            failed.len()
        );
        // Keep sending until the peer is killed (and a while after).
        // Before the kill and for 10 messages after it (those cannot be delivered).
        if sent < 400 && (!killed || sent < killed_at + 10) {
            if let Ok(c) = ka.send_to(nb, &put(nb, na, len, sent), &pattern(sent, len)) {
                outstanding.insert(c);
                sent += 1;
            }
        }
        if !killed && ok >= 20 {
            eb.0.kill().unwrap();
            eb.0.wait().unwrap();
            killed = true;
            killed_at = sent;
        }
        while let Some(ev) = ka.poll() {
            match ev {
                Event::TxDone {
                    cookie,
                    status,
                    detail,
                } => {
                    assert!(
                        outstanding.remove(&cookie),
                        "{tag}: unknown or repeated completion"
                    );
                    if status == TxStatus::Ok {
                        ok += 1;
                    } else {
                        failed.push((status, detail));
                    }
                }
                Event::PeerDown(n) => {
                    assert_eq!(n, nb);
                    peer_down = true;
                }
                Event::EngineGone(r) => panic!("{tag}: engine A gone: {r:?}"),
                _ => {}
            }
        }
        if !killed {
            while let Some(ev) = kb.poll() {
                if let Event::Rx(m) = ev {
                    kb.rx_done(m);
                }
            }
        } else {
            let _ = kb.poll();
        }
        if killed && outstanding.is_empty() && peer_down {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(
        !failed.is_empty(),
        "{tag}: nothing failed although the peer died"
    );
    for (s, _) in &failed {
        assert!(
            matches!(
                s,
                TxStatus::PeerUnreachable | TxStatus::TimedOut | TxStatus::PeerReset
            ),
            "{tag}: unexpected failure status {s:?}"
        );
    }
    // Nothing listens on the dead engine's port: the kernel answers with ICMP port
    // unreachable, which IP_RECVERR turns into ECONNREFUSED for the sender; the failed
    // completions say so in their detail, and the peer's stats name it.
    assert!(
        failed.iter().any(|&(_, d)| d == libc::ECONNREFUSED as u32),
        "{tag}: no failed completion carries ECONNREFUSED: {failed:?}"
    );
    let a = stats(&dir, "a");
    let peer = a.cores[0]
        .peers
        .iter()
        .find(|p| p.nid == nb.to_string())
        .expect("engine A's stats list the dead peer");
    assert!(peer.errors > 0, "{tag}: {peer:?}");
    assert!(
        peer.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "{tag}: {peer:?}"
    );
    assert!(peer_down, "{tag}: kshim A was never told the peer is down");
    eprintln!(
        "{tag}: {ok} ok, {} failed back ({:?})",
        failed.len(),
        failed.first()
    );
    assert_eq!(stop(ea).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_cores_two_peers_use_both_cores() {
    let cands = (60..90).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)));
    fanout("fanout", cands.collect(), None);
}

/// The same over IPv6: the engine's reuseport group of IPv6 sockets steered by
/// the IPv6 source address (on a namespace's loopback).
#[test]
fn two_cores_two_ipv6_peers_use_both_cores() {
    let test = "two_cores_two_ipv6_peers_use_both_cores";
    let cands: Vec<IpAddr> = (0x60..0x90).map(|i| ula(i).into()).collect();
    let v6: Vec<Ipv6Addr> = cands
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
        .collect();
    let Some(ns) = v6_loopback(test, "fanout6", &v6) else {
        return;
    };
    fanout("fanout6", cands, Some(ns.ns[0].as_str()));
}

/// Engine A on two cores sends to two peers (picked from `cands`, after A) that
/// the shard function puts on different cores: each of A's cores owns one.
fn fanout(tag: &str, cands: Vec<IpAddr>, ns: Option<&str>) {
    let cores = 2;
    // Two destinations that the shard function puts on different cores.
    let b_ip = cands[1..]
        .iter()
        .copied()
        .find(|ip| lu2k_engine::steer::shard_ip(*ip, cores) == 0)
        .unwrap();
    let c_ip = cands[1..]
        .iter()
        .copied()
        .find(|ip| lu2k_engine::steer::shard_ip(*ip, cores) == 1)
        .unwrap();
    let a_ip = cands[0];
    let dir = tmpdir(&format!("e2e-{tag}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 211;
    let mut ka = kshim_of(&dir, "a", a_ip, cores);
    let mut kb = kshim_of(&dir, "b", b_ip, cores);
    let mut kc = kshim_of(&dir, "c", c_ip, cores);
    let ea = start_engine_in(ns, &dir, "a", &a_ip.to_string(), port, &[]);
    let eb = start_engine_in(ns, &dir, "b", &b_ip.to_string(), port, &[]);
    let ec = start_engine_in(ns, &dir, "c", &c_ip.to_string(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in [&mut ka, &mut kb, &mut kc] {
        wait_attached(k, deadline);
    }
    let (na, nb, nc) = (nid_of(a_ip), nid_of(b_ip), nid_of(c_ip));
    let count = 400u64;
    let len = 64 << 10;
    let mut sent = 0u64;
    let mut ok = 0u64;
    let mut got = [0u64; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok < count || got[0] + got[1] < count {
        assert!(
            Instant::now() < deadline,
            "{tag}: timed out: sent {sent} ok {ok} got {got:?}"
        );
        while sent < count {
            let dst = if sent % 2 == 0 { nb } else { nc };
            if ka
                .send_to(dst, &put(dst, na, len, sent), &pattern(sent, len))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        while let Some(ev) = ka.poll() {
            if let Event::TxDone { status, .. } = ev {
                assert_eq!(status, TxStatus::Ok, "{tag}");
                ok += 1;
            }
        }
        for (i, k) in [&mut kb, &mut kc].into_iter().enumerate() {
            while let Some(ev) = k.poll() {
                if let Event::Rx(m) = ev {
                    let Msg::Put { match_bits: n, .. } = m.hdr.msg else {
                        panic!()
                    };
                    assert_eq!(n % 2, i as u64, "{tag}: message {n} reached the wrong node");
                    let mut buf = vec![0u8; len];
                    m.copy_to(&mut buf);
                    assert!(buf == pattern(n, len), "{tag}: message {n} content differs");
                    got[i] += 1;
                    k.rx_done(m);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(got, [count / 2, count / 2]);
    // Statistics are published every 100 ms: wait for a snapshot after the transfer.
    std::thread::sleep(Duration::from_millis(250));
    let r = stats(&dir, "a");
    assert_eq!(r.cores.len(), 2);
    for c in &r.cores {
        assert!(
            c.tx_descs > 0,
            "{tag}: core {} of A took no descriptors: {r:?}",
            c.core
        );
        assert_eq!(
            c.peers.len(),
            1,
            "{tag}: core {} should own exactly one peer",
            c.core
        );
    }
    assert_eq!(r.payload_copied(), 0);
    for e in [ea, eb, ec] {
        assert_eq!(stop(e).code(), Some(0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_mid_transfer_completes_every_send_and_exits_zero() {
    let tag = "term";
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 91), Ipv4Addr::new(127, 0, 0, 92));
    let dir = tmpdir(&format!("e2e-{tag}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 307;
    let mut ka = kshim(&dir, "a", a_ip, 1);
    let mut kb = kshim(&dir, "b", b_ip, 1);
    let (ea, eb) = start_engines(
        &dir,
        (&mut ka, here(a_ip)),
        (&mut kb, here(b_ip)),
        port,
        &[],
    );
    let (na, nb) = (nid(a_ip), nid(b_ip));
    let len = 256 << 10;
    let mut outstanding = std::collections::HashMap::new();
    let mut statuses = std::collections::HashMap::new();
    let mut sent = 0u64;
    let mut ok = 0;
    let mut ea = Some(ea);
    let mut exit = None;
    let mut termed_at = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "{tag}: hung with {} sends outstanding",
            outstanding.len()
        );
        // Fill the pipe before the SIGTERM; 10 more after it (new messages while
        // draining must be failed back, not lost).
        while sent < 300 && (ea.is_some() || sent < termed_at.saturating_add(10)) {
            match ka.send(&put(nb, na, len, sent), &pattern(sent, len)) {
                Ok(c) => {
                    outstanding.insert(c, sent);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        if ok >= 20 {
            if let Some(e) = ea.take() {
                // SIGTERM with sends in flight; wait for the exit in a thread while
                // kshim A keeps consuming completions.
                let _ = Command::new("kill")
                    .args(["-TERM", &e.0.id().to_string()])
                    .status();
                termed_at = sent;
                eprintln!(
                    "{tag}: SIGTERM with {} sends outstanding",
                    outstanding.len()
                );
                exit = Some(std::thread::spawn(move || stop(e)));
            }
        }
        while let Some(ev) = ka.poll() {
            if let Event::TxDone { cookie, status, .. } = ev {
                let n = outstanding
                    .remove(&cookie)
                    .unwrap_or_else(|| panic!("{tag}: unknown or repeated completion"));
                // Everything posted before the SIGTERM was in the ring (1024 entries,
                // 300 sends) while the engine drained: the engine itself must complete
                // it, Ok or Shutdown. Only a send posted after its last pass may be
                // failed by kshim as EngineGone.
                assert!(
                    status != TxStatus::EngineGone || n >= termed_at,
                    "{tag}: send {n} (before the SIGTERM at {termed_at}) left to kshim as EngineGone"
                );
                *statuses.entry(format!("{status:?}")).or_insert(0) += 1;
                if status == TxStatus::Ok {
                    ok += 1;
                }
            }
        }
        while let Some(ev) = kb.poll() {
            if let Event::Rx(m) = ev {
                kb.rx_done(m);
            }
        }
        if exit.as_ref().is_some_and(|t| t.is_finished()) && outstanding.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let st = exit.unwrap().join().unwrap();
    assert_eq!(st.code(), Some(0), "{tag}: exit status after SIGTERM");
    eprintln!("{tag}: completions by status: {statuses:?}");
    for s in statuses.keys() {
        assert!(
            ["Ok", "Shutdown", "EngineGone"].contains(&s.as_str()),
            "{tag}: unexpected status {s}"
        );
    }
    assert_eq!(stop(eb).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cores_flag_that_disagrees_with_kshim_is_refused() {
    let dir = tmpdir("e2e-coresmismatch");
    let ip = Ipv4Addr::new(127, 0, 0, 51);
    let mut k = kshim(&dir, "a", ip, 2);
    let port = (20000 + (std::process::id() % 20000) + 301).to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["run", "--kshim-socket"])
        .arg(dir.join("a.sock"))
        .args(["--bind", &ip.to_string(), "--port", &port, "--cores", "3"])
        .arg("--stats-socket")
        .arg(dir.join("a-stats.sock"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // kshim hands the region over only while it is driven.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let _ = k.poll();
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "engine neither attached nor refused"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "engine accepted --cores 3 against 2 ring sets"
    );
    assert!(
        err.contains("--cores 3") && err.contains("2 ring sets"),
        "error should name both counts: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LNet routes through real engines: kshim A reaches a remote network (`o2ib7`) through
/// a gateway, engine B's node. Every message goes to the gateway's engine (A's only
/// peer), arrives at kshim B — the router, which would forward it — addressed to the
/// remote NID, with its content intact, and completes `Ok` at A.
#[test]
fn routed_sends_go_through_the_gateway() {
    let dir = tmpdir("e2e-routed");
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 61), Ipv4Addr::new(127, 0, 0, 62));
    let port = 20000 + (std::process::id() % 20000) as u16 + 101;
    let (na, nb) = (nid(a_ip), nid(b_ip));
    let remote: lu2k_kshim::Nid = "10.7.0.5@o2ib7".parse().unwrap();
    let mut cfg = Config::new(vec![na], dir.join("a.sock"));
    cfg.routes.push(lu2k_kshim::route::Route {
        net: "o2ib7".parse().unwrap(),
        gateway: nb,
        hops: 2,
        priority: 0,
    });
    let mut ka = Kshim::start(cfg).unwrap();
    let mut kb = kshim(&dir, "b", b_ip, 1);
    let (ea, eb) = start_engines(
        &dir,
        (&mut ka, here(a_ip)),
        (&mut kb, here(b_ip)),
        port,
        &[],
    );

    const COUNT: u64 = 64;
    const LEN: usize = 64 << 10;
    let (mut sent, mut ok, mut got) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < COUNT || ok < COUNT {
        assert!(
            Instant::now() < deadline,
            "timed out: sent {sent} received {got} completed {ok}"
        );
        while sent < COUNT
            && ka
                .send(&put(remote, na, LEN, sent), &pattern(sent, LEN))
                .is_ok()
        {
            sent += 1;
        }
        while let Some(ev) = ka.poll() {
            if let Event::TxDone { status, detail, .. } = ev {
                assert_eq!(status, TxStatus::Ok, "routed send failed (detail {detail})");
                ok += 1;
            }
        }
        if let Some(Event::Rx(m)) = kb.wait(Some(Duration::from_millis(2))) {
            let Msg::Put { match_bits: n, .. } = m.hdr.msg else {
                panic!("unexpected message {:?}", m.hdr.msg);
            };
            assert_eq!(
                m.hdr.dest_nid,
                remote.nid4().unwrap(),
                "addressed to the remote NID"
            );
            assert_eq!(m.from, na);
            let mut buf = vec![0u8; LEN];
            m.copy_to(&mut buf);
            assert!(buf == pattern(n, LEN), "message {n} content differs");
            got += 1;
            kb.rx_done(m);
        }
    }
    // The stats are published every 100 ms: wait for a set that has the peer.
    let peers = |dir: &Path| -> Vec<String> {
        stats(dir, "a")
            .cores
            .iter()
            .flat_map(|c| c.peers.iter().map(|p| p.nid.clone()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while peers(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        peers(&dir),
        vec![nb.to_string()],
        "engine A talked to the gateway only"
    );
    assert!(stop(ea).success());
    assert!(stop(eb).success());
}

/// Why the IPv6 namespace tests cannot run here, else `None`.
fn ipv6_netns_missing() -> Option<String> {
    not_root()
        .or_else(|| missing_tools(&["ip"]))
        .or_else(no_ipv6)
}

/// A network namespace (named after `tag`, unique to this run) whose loopback
/// holds the IPv6 addresses `ips` besides `::1` (and IPv4's 127.0.0.0/8): engines
/// in it talk IPv6 over loopback. `None` (after a loud SKIP) where it cannot be.
fn v6_loopback(test: &str, tag: &str, ips: &[Ipv6Addr]) -> Option<Netns> {
    if let Some(why) = ipv6_netns_missing() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    let ns = Netns::new(&[format!("lu2k-e2e6-{tag}-{}", std::process::id())]).unwrap();
    for ip in ips {
        ns.addr6(0, "lo", &format!("{ip}/128")).unwrap();
    }
    Some(ns)
}

/// `fd00:6::{last}`: the IPv6 test addresses (unique local, fd00::/8).
fn ula(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 6, 0, 0, 0, 0, 0, last)
}

/// The IPv6 counterpart of the IPv4 transfers above: two engines on the loopback of
/// a namespace, bound to fd00:6::a and fd00:6::b.
fn transfer_v6(test: &str, tag: &str, cores: u32, count: u64, len: usize, extra: &[&str]) {
    let (a, b) = (ula(0xa), ula(0xb));
    let Some(ns) = v6_loopback(test, tag, &[a, b]) else {
        return;
    };
    let at = |ip: Ipv6Addr| At {
        ip: ip.into(),
        ns: Some(ns.ns[0].as_str()),
    };
    transfer_at(tag, at(a), at(b), cores, count, len, extra);
}

#[test]
fn bulk_transfer_fast_path_ipv6() {
    transfer_v6(
        "bulk_transfer_fast_path_ipv6",
        "fast6",
        1,
        GIB_OF_MIB,
        1 << 20,
        &[],
    );
}

#[test]
fn bulk_transfer_slow_path_forced_ipv6() {
    transfer_v6(
        "bulk_transfer_slow_path_forced_ipv6",
        "slow6",
        1,
        GIB_OF_MIB,
        1 << 20,
        &["--io-path", "epoll"],
    );
}

#[test]
fn bulk_transfer_two_cores_ipv6() {
    transfer_v6(
        "bulk_transfer_two_cores_ipv6",
        "cores2v6",
        2,
        GIB_OF_MIB,
        1 << 20,
        &["--cores", "2", "--doorbell", "eventfd"],
    );
}

#[test]
fn small_messages_two_cores_ipv6() {
    transfer_v6(
        "small_messages_two_cores_ipv6",
        "small2v6",
        2,
        2000,
        4096,
        &[],
    );
}

/// IPv6 between two namespaces over a veth pair (a real device path: checksums,
/// GSO segmentation at the device's 1500-byte MTU, where each IPv6 packet carries
/// 20 header bytes more than IPv4's).
#[test]
fn bulk_transfer_over_veth_ipv6() {
    let test = "bulk_transfer_over_veth_ipv6";
    if let Some(why) = ipv6_netns_missing() {
        eprintln!("SKIP {test}: {why}");
        return;
    }
    // Device names are at most 15 bytes: `{tag}va`.
    let tag = format!("e6v{}", std::process::id() % 1_000_000);
    let ns = Netns::pair(&tag, &[], &[]).unwrap();
    let (a, b) = (
        Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, 2),
    );
    ns.addr6(0, &format!("{tag}va"), &format!("{a}/64"))
        .unwrap();
    ns.addr6(1, &format!("{tag}vb"), &format!("{b}/64"))
        .unwrap();
    transfer_at(
        "veth6",
        At {
            ip: a.into(),
            ns: Some(ns.ns[0].as_str()),
        },
        At {
            ip: b.into(),
            ns: Some(ns.ns[1].as_str()),
        },
        1,
        GIB_OF_MIB / 4,
        1 << 20,
        &[],
    );
}

/// One message of the dual-stack exchange: from `from` to `to`, number `n`.
fn send_one(k: &mut Kshim, to: lu2k_kshim::Nid, from: lu2k_kshim::Nid, n: u64, len: usize) -> bool {
    k.send_to(to, &put(to, from, len, n), &pattern(n, len))
        .is_ok()
}

/// A dual-stack engine (`bind = "::"`) serves an IPv4 peer and an IPv6 peer at
/// once, on one socket: hub H in one namespace, peers B (IPv4, 10.77.0.2) and C
/// (IPv6, fd00:6::4) in another, joined by a veth pair holding both families. H's
/// NID is its IPv4 address (10.77.0.1@lu2k); C knows H by its IPv6 address
/// (fd00:6::1@lu2k), the source H's IPv6 datagrams leave from. B's datagrams reach
/// H's socket as `::ffff:10.77.0.2` and must be B's, named `10.77.0.2@lu2k`, not a
/// second peer. Messages go B → H and C → H at the same time, then H → B and
/// H → C at the same time; every one arrives once, whole, from the right NID, and
/// completes Ok. H's stats name its two peers with their addresses in their own
/// family's form, each on the core the shard function names for it.
#[test]
fn dual_stack_engine_serves_an_ipv4_and_an_ipv6_peer() {
    dual_stack(
        "dual_stack_engine_serves_an_ipv4_and_an_ipv6_peer",
        "e6d",
        1,
    );
}

/// The same with a hub of two cores: a reuseport group of dual-stack sockets,
/// steered by the IPv4 or IPv6 source address.
#[test]
fn dual_stack_engine_on_two_cores_steers_both_families() {
    dual_stack(
        "dual_stack_engine_on_two_cores_steers_both_families",
        "e6e",
        2,
    );
}

fn dual_stack(test: &str, prefix: &str, cores: u32) {
    if let Some(why) = ipv6_netns_missing() {
        eprintln!("SKIP {test}: {why}");
        return;
    }
    let (h4, b4) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    // C's address lands on another core than B's on two cores.
    let (h6, c6) = (ula(1), ula(4));
    // Device names are at most 15 bytes: `{tag}va`.
    let tag = format!("{prefix}{}", std::process::id() % 1_000_000);
    let ns = Netns::pair(&tag, &[h4], &[b4]).unwrap();
    ns.addr6(0, &format!("{tag}va"), &format!("{h6}/64"))
        .unwrap();
    ns.addr6(1, &format!("{tag}vb"), &format!("{c6}/64"))
        .unwrap();
    let (ns0, ns1) = (Some(ns.ns[0].as_str()), Some(ns.ns[1].as_str()));
    let dir = tmpdir(&format!("e2e-{prefix}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 401;
    let mut kh = kshim(&dir, "h", h4, cores);
    let mut kb = kshim(&dir, "b", b4, 1);
    let mut kc = kshim_of(&dir, "c", c6.into(), 1);
    let eh = start_engine_in(ns0, &dir, "h", "::", port, &[]);
    let eb = start_engine_in(ns1, &dir, "b", &b4.to_string(), port, &[]);
    let ec = start_engine_in(ns1, &dir, "c", &c6.to_string(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in [&mut kh, &mut kb, &mut kc] {
        wait_attached(k, deadline);
    }
    let (nh4, nh6) = (nid(h4), nid_of(h6.into()));
    let (nb, nc) = (nid(b4), nid_of(c6.into()));
    const N: u64 = 200;
    const LEN: usize = 64 << 10;

    // B → H and C → H at once: numbers 0..N from B, N..2N from C.
    let (mut next_b, mut next_c) = (0u64, N);
    let mut done = [0u64; 2];
    let mut got = vec![false; 2 * N as usize];
    let deadline = Instant::now() + Duration::from_secs(60);
    while done != [N, N] || got.iter().any(|g| !g) {
        assert!(
            Instant::now() < deadline,
            "to the hub: timed out, completions {done:?}, received {}",
            got.iter().filter(|g| **g).count()
        );
        while next_b < N && send_one(&mut kb, nh4, nb, next_b, LEN) {
            next_b += 1;
        }
        while next_c < 2 * N && send_one(&mut kc, nh6, nc, next_c, LEN) {
            next_c += 1;
        }
        for (i, k) in [&mut kb, &mut kc].into_iter().enumerate() {
            while let Some(ev) = k.poll() {
                if let Event::TxDone { status, detail, .. } = ev {
                    assert_eq!(status, TxStatus::Ok, "sender {i}: detail {detail}");
                    done[i] += 1;
                }
            }
        }
        while let Some(ev) = kh.poll() {
            if let Event::Rx(m) = ev {
                let Msg::Put { match_bits: n, .. } = m.hdr.msg else {
                    panic!("unexpected message {:?}", m.hdr.msg);
                };
                let want = if n < N { nb } else { nc };
                assert_eq!(m.from, want, "message {n} names its sender");
                let mut buf = vec![0u8; LEN];
                m.copy_to(&mut buf);
                assert!(buf == pattern(n, LEN), "message {n} content differs");
                assert!(!got[n as usize], "message {n} delivered twice");
                got[n as usize] = true;
                kh.rx_done(m);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }

    // H → B and H → C at once.
    let mut cookies = std::collections::HashMap::new();
    let (mut sent, mut ok) = (0u64, 0u64);
    let mut got = [0u64; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok < 2 * N || got != [N, N] {
        assert!(
            Instant::now() < deadline,
            "from the hub: timed out, sent {sent} ok {ok} received {got:?}"
        );
        while sent < 2 * N {
            let to = if sent % 2 == 0 { nb } else { nc };
            match kh.send_to(to, &put(to, nh4, LEN, sent), &pattern(sent, LEN)) {
                Ok(c) => {
                    cookies.insert(c, sent);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        while let Some(ev) = kh.poll() {
            if let Event::TxDone {
                cookie,
                status,
                detail,
            } = ev
            {
                let n = cookies.remove(&cookie).expect("a completion per send");
                assert_eq!(status, TxStatus::Ok, "hub's message {n}: detail {detail}");
                ok += 1;
            }
        }
        // B knows the hub by its IPv4 address, C by its IPv6 one.
        for (i, (k, from)) in [(&mut kb, nh4), (&mut kc, nh6)].into_iter().enumerate() {
            while let Some(ev) = k.poll() {
                if let Event::Rx(m) = ev {
                    let Msg::Put { match_bits: n, .. } = m.hdr.msg else {
                        panic!("unexpected message {:?}", m.hdr.msg);
                    };
                    assert_eq!(n % 2, i as u64, "message {n} reached the wrong peer");
                    assert_eq!(m.from, from, "message {n} names the hub");
                    let mut buf = vec![0u8; LEN];
                    m.copy_to(&mut buf);
                    assert!(buf == pattern(n, LEN), "message {n} content differs");
                    got[i] += 1;
                    k.rx_done(m);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }

    // The hub's peer table: exactly B and C, each once, at its own family's address
    // (the IPv4 one not in its IPv4-mapped form), on its shard's core (a datagram
    // steered to another core would make the peer there too).
    let shard = |ip: IpAddr| lu2k_engine::steer::shard_ip(ip, cores) as usize;
    assert!(
        cores == 1 || shard(b4.into()) != shard(c6.into()),
        "B and C share a core"
    );
    let want = |port: u16| {
        let mut v = vec![
            (shard(b4.into()), nb.to_string(), format!("{b4}:{port}")),
            (shard(c6.into()), nc.to_string(), format!("[{c6}]:{port}")),
        ];
        v.sort();
        v
    };
    let peers = || {
        let mut v: Vec<(usize, String, String)> = stats(&dir, "h")
            .cores
            .iter()
            .flat_map(|c| {
                c.peers
                    .iter()
                    .map(|p| (c.core, p.nid.clone(), p.addr.clone()))
            })
            .collect();
        v.sort();
        v
    };
    let until = Instant::now() + Duration::from_secs(5);
    while peers() != want(port) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(peers(), want(port), "the hub's peers");
    for e in [eh, eb, ec] {
        assert_eq!(stop(e).code(), Some(0));
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
