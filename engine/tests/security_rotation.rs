//! Key rotation with no downtime: two engine processes with a pre-shared key
//! over loopback carry verified 1 MiB PUTs (kshim A → engine A → sealed UDT →
//! engine B → kshim B) while both rotate to a new key by SIGHUP in the three
//! steps of docs/gateway.md (accept the next key too; connect with it, still
//! accept the old; drop the old), with a broken key file between the steps.
//!
//! What must hold: every PUT delivered once and intact and acknowledged Ok,
//! over the one connection A opened before the rotation (its session keys are
//! its own; rekeys derive from those); the broken file refused with a log line
//! naming the field, the keys in use kept, also across a kshim restart while
//! the file is still broken; after the rotation a new handshake uses the kept
//! new key (engine C, which has only the new key, gets PUTs from A)
//! and the old key no longer authenticates at A (engine D, which has only the
//! old key, is refused).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::{Event, Kshim};

mod common;
use common::{kshim, nid, pattern, put, stats, tmpdir, wait_attached, Engine, Transfer};

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 81);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 82);
const C_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 83);
const D_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 84);
const COUNT: u64 = 96;
const LEN: usize = 1 << 20;

/// Writes a 32-byte key `seed` (mode 0600) to `dir/name`.
fn key(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(113).wrapping_add(seed))
        .collect();
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Writes engine `name`'s config file: `psk_file` and maybe `psk_next_file`.
fn config(dir: &Path, name: &str, psk: &Path, next: Option<&Path>) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let mut text = format!("psk_file = {:?}\n", psk.display());
    if let Some(n) = next {
        text += &format!("psk_next_file = {:?}\n", n.display());
    }
    // Written whole and renamed, as an operator's editor or installer would.
    let tmp = dir.join(format!("{name}.toml.new"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

/// Starts engine `name` with its config file, its output into `dir/name.log`.
fn engine(dir: &Path, name: &str, ip: Ipv4Addr, port: u16, cfg: &Path) -> Engine {
    let log = File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"));
    cmd.args(["run", "--config"])
        .arg(cfg)
        .arg("--kshim-socket")
        .arg(dir.join(format!("{name}.sock")))
        .args([
            "--bind",
            &ip.to_string(),
            "--port",
            &port.to_string(),
            "--stats-socket",
        ])
        .arg(dir.join(format!("{name}-stats.sock")))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null());
    Engine(cmd.spawn().unwrap())
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

fn hup(e: &Engine) {
    let st = Command::new("kill")
        .args(["-HUP", &e.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until `name`'s log has `n` lines containing `what`.
fn wait_log(dir: &Path, name: &str, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = log(dir, name);
        if text.lines().filter(|l| l.contains(what)).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "engine {name}: no {n} lines with {what:?} in its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drop_count(r: &lu2k_engine::daemon::stats::Report, reason: &str) -> u64 {
    r.cores
        .iter()
        .map(|c| c.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

/// Sends `count` PUTs from `from` to `to`'s NID, eight in flight at a time
/// (the rotation happens mid-transfer), and takes them at `to_k`, with
/// `between(got)` called as each arrives; every one must arrive once and
/// intact, and complete Ok.
fn transfer(
    (from, from_ip): (&mut Kshim, Ipv4Addr),
    (to_k, to_ip): (&mut Kshim, Ipv4Addr),
    count: u64,
    mut between: impl FnMut(u64),
) {
    let mut t = Transfer::new("", nid(from_ip), nid(to_ip), count, |_| LEN).in_flight(8);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.finished() {
        t.assert_before(deadline);
        let got = t.got;
        t.step(from, to_k, Duration::from_millis(2));
        if t.got > got {
            between(t.got);
        }
    }
}

#[test]
fn keys_rotate_by_sighup_mid_transfer() {
    let dir = tmpdir("security-rotation");
    let port = 20000 + (std::process::id() % 20000) as u16 + 221;
    let old = key(&dir, "psk.old", 1);
    let new = key(&dir, "psk.new", 2);
    let bad = dir.join("psk.bad");
    std::fs::write(&bad, [7u8; 32]).unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (ca, cb) = (config(&dir, "a", &old, None), config(&dir, "b", &old, None));
    let mut ka = kshim(&dir, "a", A_IP, 1);
    let mut kb = kshim(&dir, "b", B_IP, 1);
    let ea = engine(&dir, "a", A_IP, port, &ca);
    let eb = engine(&dir, "b", B_IP, port, &cb);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let reloaded = "keys reloaded";
    let mut step = 0;
    transfer((&mut ka, A_IP), (&mut kb, B_IP), COUNT, |got| {
        let both = |psk: &Path, next: Option<&Path>, n: usize| {
            for (name, e) in [("a", &ea), ("b", &eb)] {
                config(&dir, name, psk, next);
                hup(e);
                wait_log(&dir, name, reloaded, n);
            }
        };
        match (step, got) {
            // 1: every node accepts the next key too, and still connects with
            // the old one.
            (0, 16..) => both(&old, Some(&new), 1),
            // 2: every node connects with the new key, and still accepts the
            // old one.
            (1, 32..) => both(&new, Some(&old), 2),
            // A broken key file (open to others) is refused, naming the field;
            // the keys in use stay.
            (2, 48..) => {
                config(&dir, "a", &bad, Some(&old));
                hup(&ea);
                wait_log(&dir, "a", "key reload refused", 1);
                let text = log(&dir, "a");
                let line = text
                    .lines()
                    .find(|l| l.contains("key reload refused"))
                    .unwrap();
                assert!(
                    line.contains("psk_file") && line.contains("keys in use stay"),
                    "{line}"
                );
            }
            // 3: the old key goes.
            (3, 64..) => both(&new, None, 3),
            _ => return,
        }
        step += 1;
    });
    assert_eq!(step, 4, "the rotation did not finish during the transfer");
    for name in ["a", "b"] {
        let text = log(&dir, name);
        assert_eq!(
            text.lines().filter(|l| l.contains(reloaded)).count(),
            3,
            "engine {name}:\n{text}"
        );
        // Only key fields were edited (the flags are not the file's).
        assert!(
            !text.contains("applies only the key fields"),
            "engine {name}:\n{text}"
        );
    }
    // One connection from A to B carried it all: it came up once.
    let text = log(&dir, "a");
    let up = format!("peer {} at", nid(B_IP));
    let ups = text
        .lines()
        .filter(|l| l.contains(&up) && l.contains(" up"))
        .count();
    assert_eq!(ups, 1, "A's connection to B came up {ups} times:\n{text}");
    assert!(
        !text.lines().any(|l| l.contains(&up) && l.contains(" down")),
        "B was reported down:\n{text}"
    );

    // A broken key file refused by SIGHUP, then a kshim restart: the engine
    // attaches again with the keys it kept (key files are read at start-up
    // and on SIGHUP only), and a new handshake with them succeeds.
    config(&dir, "a", &bad, None);
    hup(&ea);
    wait_log(&dir, "a", "key reload refused", 2);
    // The key file in use turns unreadable to the engine's checks too (open
    // to others): without a SIGHUP nothing reads it.
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(ka);
    let mut ka = kshim(&dir, "a", A_IP, 1);
    wait_attached(&mut ka, Instant::now() + Duration::from_secs(20));
    wait_log(&dir, "a", "attached to kshim", 2);
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A new handshake uses the new key: C has only that one.
    let cc = config(&dir, "c", &new, None);
    let mut kc = kshim(&dir, "c", C_IP, 1);
    let ec = engine(&dir, "c", C_IP, port, &cc);
    wait_attached(&mut kc, Instant::now() + Duration::from_secs(20));
    transfer((&mut ka, A_IP), (&mut kc, C_IP), 4, |_| {});

    // The old key no longer authenticates at A: D, which has only the old
    // one, is refused, and nothing of it arrives.
    let cd = config(&dir, "d", &old, None);
    let mut kd = kshim(&dir, "d", D_IP, 1);
    let ed = engine(&dir, "d", D_IP, port, &cd);
    wait_attached(&mut kd, Instant::now() + Duration::from_secs(20));
    let before = drop_count(&stats(&dir, "a"), "rx_sec_bad_handshake");
    kd.send(&put(nid(A_IP), nid(D_IP), 4096, 0), &pattern(0, 4096))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    let mut refused = 0;
    while Instant::now() < until {
        if let Some(Event::Rx(m)) = ka.wait(Some(Duration::from_millis(20))) {
            panic!("a message from D (old key only) arrived: {:?}", m.hdr.msg);
        }
        refused = drop_count(&stats(&dir, "a"), "rx_sec_bad_handshake") - before;
    }
    assert!(
        refused > 0,
        "A did not refuse D's handshakes:\n{}",
        log(&dir, "a")
    );
    eprintln!("A refused {refused} handshakes under the old key");

    for (name, e) in [("a", ea), ("b", eb), ("c", ec), ("d", ed)] {
        assert_eq!(
            e.term_within(Duration::from_secs(20)).code(),
            Some(0),
            "engine {name} exit status:\n{}",
            log(&dir, name)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
