//! The engine under systemd's notification protocol (`sd_notify(3)`), with a real
//! `NOTIFY_SOCKET` datagram socket: `READY=1` (with a `STATUS=`) once attached to an
//! in-process kshim, `WATCHDOG=1` pings at half of `WATCHDOG_USEC`, periodic
//! `STATUS=` lines, `STOPPING=1` on SIGTERM; and no `READY=1` when attaching fails.
//! Also `systemd-analyze verify` on the shipped unit, `packaging/lu2k-engine.service`.

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::{Config, Kshim};

mod common;
use common::{nid, tmpdir, wait_attached, Engine};

/// The notification socket the engine sends to, bound like systemd's.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    (sock, path)
}

/// Every notification waiting on `sock`, one `Vec` of lines per datagram.
fn drain(sock: &UnixDatagram, into: &mut Vec<Vec<String>>) {
    let mut b = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut b) {
        let msg = String::from_utf8_lossy(&b[..n]);
        into.push(msg.lines().map(str::to_string).collect());
    }
}

/// Index of the first datagram with a line starting `prefix`.
fn first(msgs: &[Vec<String>], prefix: &str) -> Option<usize> {
    msgs.iter()
        .position(|m| m.iter().any(|l| l.starts_with(prefix)))
}

fn count(msgs: &[Vec<String>], prefix: &str) -> usize {
    msgs.iter()
        .filter(|m| m.iter().any(|l| l.starts_with(prefix)))
        .count()
}

#[test]
fn ready_status_watchdog_then_stopping() {
    let dir = tmpdir("notify");
    let ip = Ipv4Addr::new(127, 0, 0, 1);
    let mut cfg = Config::new(vec![nid(ip)], dir.join("k.sock"));
    cfg.cores = 2;
    cfg.rx_buf_count = 1024 * 2;
    let mut k = Kshim::start(cfg).unwrap();
    let (sock, npath) = notify_socket(&dir);
    let port = 20000 + (std::process::id() % 20000) as u16 + 409;

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"));
    cmd.args(["run", "--kshim-socket"])
        .arg(dir.join("k.sock"))
        .args(["--bind", &ip.to_string(), "--port", &port.to_string()])
        .arg("--stats-socket")
        .arg(dir.join("stats.sock"))
        .env("NOTIFY_SOCKET", &npath)
        // 1 s: the engine pings every 0.5 s.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID");
    let mut engine = Engine::spawn(cmd);
    wait_attached(&mut k, Instant::now() + Duration::from_secs(20));

    let mut msgs = Vec::new();
    // Long enough for a periodic STATUS= (every 2 s) and several pings.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !(count(&msgs, "STATUS=") >= 2 && count(&msgs, "WATCHDOG=1") >= 3)
    {
        let _ = k.wait(Some(Duration::from_millis(20)));
        drain(&sock, &mut msgs);
    }
    let ready = first(&msgs, "READY=1").expect("READY=1 after attaching");
    assert_eq!(ready, 0, "READY=1 comes first: {msgs:?}");
    assert!(
        msgs[0].iter().any(|l| l.starts_with("STATUS=")),
        "READY=1 carries a first STATUS=: {msgs:?}"
    );
    let status = msgs[0].iter().find(|l| l.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("peers up") && status.contains("Gbit/s"),
        "a status a person can read: {status}"
    );
    let ping = first(&msgs, "WATCHDOG=1").expect("WATCHDOG=1 pings");
    assert!(ping > ready, "pings only after READY=1: {msgs:?}");
    assert!(
        count(&msgs, "WATCHDOG=1") >= 3,
        "pings every half WATCHDOG_USEC while the cores run: {msgs:?}"
    );
    assert!(
        count(&msgs, "STATUS=") >= 2,
        "periodic STATUS= lines: {msgs:?}"
    );
    assert_eq!(first(&msgs, "STOPPING=1"), None, "not stopping yet");
    assert_eq!(count(&msgs, "READY=1"), 1, "READY=1 once");

    let before = msgs.len();
    let _ = Command::new("kill")
        .args(["-TERM", &engine.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let _ = k.wait(Some(Duration::from_millis(20)));
        drain(&sock, &mut msgs);
        if let Some(st) = engine.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "engine did not exit after SIGTERM"
        );
    };
    drain(&sock, &mut msgs);
    assert!(st.success(), "engine exits 0 after draining: {st}");
    let stopping = first(&msgs[before..], "STOPPING=1").expect("STOPPING=1 on SIGTERM");
    assert_eq!(
        count(&msgs[before + stopping..], "STOPPING=1"),
        1,
        "STOPPING=1 once: {msgs:?}"
    );
    assert_eq!(count(&msgs, "READY=1"), 1, "READY=1 once: {msgs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_ready_when_attaching_fails() {
    let dir = tmpdir("notify-fail");
    let (sock, npath) = notify_socket(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["run", "--kshim-socket"])
        .arg(dir.join("no-such-kshim.sock"))
        .arg("--stats-socket")
        .arg(dir.join("stats.sock"))
        .env("NOTIFY_SOCKET", &npath)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "attaching to nothing fails the start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attaching to kshim"), "says why: {err}");
    let mut msgs = Vec::new();
    drain(&sock, &mut msgs);
    assert_eq!(first(&msgs, "READY=1"), None, "no READY=1: {msgs:?}");
    assert_eq!(first(&msgs, "WATCHDOG=1"), None, "no pings: {msgs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `systemd-analyze verify` on the shipped unit, its `ExecStart=` pointed at the
/// binary under test (verify requires the executable to exist).
#[test]
fn unit_verifies() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        // scripts/setup.sh installs it; a bare `cargo test` may not have it.
        eprintln!("SKIP unit_verifies: systemd-analyze not found (run scripts/setup.sh)");
        return;
    };
    assert!(v.status.success());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("packaging/lu2k-engine.service")).unwrap();
    const SHIPPED: &str = "ExecStart=/usr/local/bin/lu2k-engine ";
    assert!(unit.contains(SHIPPED), "the unit runs the installed binary");
    let dir = tmpdir("unit");
    let copy = dir.join("lu2k-engine.service");
    let here = format!("ExecStart={} ", env!("CARGO_BIN_EXE_lu2k-engine"));
    std::fs::write(&copy, unit.replace(SHIPPED, &here)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("lu2k-engine.service"),
        "no warnings about the unit: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
