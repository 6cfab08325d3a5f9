//! Crash and restart without lost messages (issue 16 item 4), with real processes
//! over loopback: `lu2k-kshim sink` and `lu2k-kshim put --retries` (the LNet-like
//! resend) on either side of two `lu2k-engine`s.
//!
//! 1. A verified transfer of 1 MiB PUTs; the sending side's engine is killed with
//!    SIGKILL mid-transfer and a new one started: kshim fails the dead engine's
//!    messages back, the new engine attaches, the resends go through. Every message
//!    reaches the sink intact; duplicates are counted (at most one per resend).
//! 2. The kernel half restarted under running engines: both load generators exit
//!    (cleanly, then SIGKILL mid-transfer), new ones start at the same sockets; the
//!    same engine processes re-attach and the traffic flows again. The sink counts
//!    the messages both senders delivered as duplicates.
//! 3. Under systemd's notification protocol (a real `NOTIFY_SOCKET`): kshim leaving
//!    is no stop (no `STOPPING=1`, a waiting `STATUS=`, watchdog pings go on), the
//!    re-attach sends `READY=1` again, SIGTERM while waiting exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A `lu2k-kshim` process; its stderr is echoed with a prefix and its progress
/// lines (`put: D/N done (K ok)`) parsed; its stdout kept for the summary.
struct Load {
    child: Child,
    ok: Arc<AtomicU64>,
    echo: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(bin: &Path, sock: &Path, nid: &str, tag: &'static str, args: &[&str]) -> Load {
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(sock)
            // Progress every 10 ms from `put` (to kill it mid-transfer at a
            // known point), none from `sink`.
            .args(["--nid", nid, "--progress"])
            .arg(if args[0] == "put" { "0.01" } else { "0" })
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ok = Arc::new(AtomicU64::new(0));
        let ok2 = ok.clone();
        let err = child.stderr.take().unwrap();
        let echo = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(k) = line
                    .split_once(" done (")
                    .and_then(|(_, r)| r.split_once(" ok)"))
                    .and_then(|(k, _)| k.parse().ok())
                {
                    ok2.store(k, Ordering::SeqCst);
                } else {
                    eprintln!("[{tag}] {line}");
                }
            }
        });
        // kshim listens before the engine is started (an engine's first attach
        // is not retried).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "{tag}: no socket at {sock:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Load {
            child,
            ok,
            echo: Some(echo),
        }
    }

    /// Waits until `n` messages completed Ok (as of the last progress line).
    fn wait_ok(&mut self, n: u64, tag: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.ok.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{tag}: never reached {n} ok");
            let st = self.child.try_wait().unwrap();
            assert!(st.is_none(), "{tag} ended ({st:?}) before {n} ok");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The exit and the stdout, failing after `patience`.
    fn finish(mut self, patience: Duration, tag: &str) -> Output {
        let deadline = Instant::now() + patience;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{tag} did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        if let Some(t) = self.echo.take() {
            let _ = t.join();
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            eprintln!("[{tag}] {l}");
        }
        out
    }

    /// SIGKILL: the kernel half crashes.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number just before `suffix` in `text` (`"12 ok,"` → 12 for `" ok,"`).
fn num(text: &str, suffix: &str) -> u64 {
    let at = text
        .find(suffix)
        .unwrap_or_else(|| panic!("no {suffix:?} in {text:?}"));
    let digits: String = text[..at]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before {suffix:?} in {text:?}"))
}

/// What a sink reported: (PUTs, verified, corrupt, distinct, duplicates).
fn sink_counts(out: &Output) -> (u64, u64, u64, u64, u64) {
    let s = String::from_utf8_lossy(&out.stdout);
    let l = s
        .lines()
        .find(|l| l.starts_with("sink: "))
        .unwrap_or_else(|| panic!("no sink summary in {s:?}"));
    (
        num(l, " PUTs ("),
        num(l, " verified,"),
        num(l, " corrupt)"),
        num(l, " distinct,"),
        num(l, " duplicates;"),
    )
}

/// What a put reported: (ok, failed, resent).
fn put_counts(out: &Output) -> (u64, u64, u64) {
    let s = String::from_utf8_lossy(&out.stdout);
    (num(&s, " ok,"), num(&s, " failed,"), num(&s, " (retries"))
}

#[test]
fn engine_crash_and_kshim_restart_lose_no_message() {
    let tag = "crash";
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 131), Ipv4Addr::new(127, 0, 0, 132));
    let (a, b) = (format!("{a_ip}@lu2k"), format!("{b_ip}@lu2k"));
    let dir = tmpdir(&format!("crash-{tag}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 413;
    let bin = kshim_bin();
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let idle = ["sink", "--idle", "10"];

    // 1. The sending side's engine killed mid-transfer.
    // Enough that the kill lands mid-transfer at any speed this machine runs at
    // (0.5-6 Gbit/s): the kill comes at a quarter, read from progress every 10 ms.
    let n1 = 600u64;
    let count1 = n1.to_string();
    let put1_args = [
        "put",
        "--to",
        &b,
        "--size",
        "1M",
        "--count",
        &count1,
        "--retries",
        "8",
        "--salt",
        "4096",
    ];
    let sink1 = Load::start(&bin, &sb, &b, "sink1", &idle);
    let eb = start_engine(&dir, "b", b_ip, port, &[]);
    let mut put1 = Load::start(&bin, &sa, &a, "put1", &put1_args);
    let ea1 = start_engine(&dir, "a", a_ip, port, &[]);
    put1.wait_ok(n1 / 4, "put1");
    drop(ea1); // SIGKILL, then reaped
    eprintln!(
        "{tag}: engine A killed (SIGKILL) after {} ok",
        put1.ok.load(Ordering::SeqCst)
    );
    // An engine's first attach is not retried: start the new one once kshim
    // noticed the death and listens again (systemd's RestartSec=2s does the same).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sa.exists() {
        assert!(Instant::now() < deadline, "kshim A never listened again");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ea2 = start_engine(&dir, "a", a_ip, port, &[]);
    let out = put1.finish(Duration::from_secs(180), "put1");
    assert!(
        out.status.success(),
        "put1 did not deliver everything: {out:?}"
    );
    let (ok, failed, resent) = put_counts(&out);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!((ok, failed), (n1, 0));
    assert!(
        resent > 0,
        "the killed engine had messages in flight: {text}"
    );
    assert!(text.contains("engines gone 1"), "{text}");
    let out = sink1.finish(Duration::from_secs(60), "sink1");
    assert!(out.status.success(), "{out:?}");
    let (puts, verified, corrupt, distinct, dups) = sink_counts(&out);
    assert_eq!(distinct, n1, "every message arrives");
    assert_eq!((verified, corrupt), (puts, 0), "every copy intact");
    assert_eq!(puts, distinct + dups);
    assert!(
        dups <= resent,
        "a duplicate needs a resend: {dups} > {resent}"
    );
    eprintln!("{tag}: phase 1: {n1} messages, {resent} resent, {dups} duplicates at the sink");

    // 2. Both kshims went away under running engines (clean exits above); new
    // ones at the same sockets, then the sender's kshim is killed mid-transfer.
    let n2 = 600u64;
    let count2 = n2.to_string();
    let put2_args = [
        "put",
        "--to",
        &b,
        "--size",
        "1M",
        "--count",
        &count2,
        "--retries",
        "8",
        "--salt",
        "999999",
    ];
    let sink2 = Load::start(&bin, &sb, &b, "sink2", &idle);
    let mut put2 = Load::start(&bin, &sa, &a, "put2", &put2_args);
    put2.wait_ok(n2 / 4, "put2");
    let delivered = put2.ok.load(Ordering::SeqCst);
    put2.kill();
    eprintln!("{tag}: kshim A killed (SIGKILL) after {delivered} ok");
    let put3 = Load::start(&bin, &sa, &a, "put3", &put2_args);
    let out = put3.finish(Duration::from_secs(180), "put3");
    assert!(out.status.success(), "put3: {out:?}");
    assert_eq!(put_counts(&out).0, n2);
    let out = sink2.finish(Duration::from_secs(60), "sink2");
    assert!(out.status.success(), "{out:?}");
    let (puts, verified, corrupt, distinct, dups) = sink_counts(&out);
    assert_eq!(distinct, n2);
    assert_eq!((verified, corrupt), (puts, 0));
    assert_eq!(puts, distinct + dups);
    assert!(
        dups >= delivered,
        "put3 sent again what put2 had delivered: {dups} duplicates < {delivered}"
    );
    eprintln!("{tag}: phase 2: {n2} messages, {dups} duplicates at the sink");

    // The same engine processes ran throughout and still stop cleanly.
    for (mut e, name) in [(ea2, "A"), (eb, "B")] {
        assert!(
            e.0.try_wait().unwrap().is_none(),
            "engine {name} exited when its kshim went away"
        );
        let st = e.term_within(Duration::from_secs(30));
        assert_eq!(st.code(), Some(0), "engine {name} after SIGTERM");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every notification waiting on `sock`, one `Vec` of lines per datagram.
fn drain_notify(sock: &std::os::unix::net::UnixDatagram, into: &mut Vec<Vec<String>>) {
    let mut b = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut b) {
        let msg = String::from_utf8_lossy(&b[..n]);
        into.push(msg.lines().map(str::to_string).collect());
    }
}

fn count(msgs: &[Vec<String>], prefix: &str) -> usize {
    msgs.iter()
        .filter(|m| m.iter().any(|l| l.starts_with(prefix)))
        .count()
}

/// kshim going away under an engine run by systemd is no stop: no `STOPPING=1`, a
/// `STATUS=` saying it waits, watchdog pings on; a new kshim gets a second
/// `READY=1`; SIGTERM while waiting for kshim stops it with `STOPPING=1`, exit 0.
#[test]
fn kshim_restart_under_systemd_is_no_stop() {
    let dir = tmpdir("crash-notify");
    let ip = Ipv4Addr::new(127, 0, 0, 133);
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16 + 417;
    let mut k = kshim(&dir, "k", ip, 1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"));
    cmd.args(["run", "--kshim-socket"])
        .arg(dir.join("k.sock"))
        .args(["--bind", &ip.to_string(), "--port", &port.to_string()])
        .arg("--stats-socket")
        .arg(dir.join("k-stats.sock"))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID");
    let mut engine = Engine::spawn(cmd);
    wait_attached(&mut k, Instant::now() + Duration::from_secs(20));
    let mut msgs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&msgs, "READY=1") == 0 {
        assert!(Instant::now() < deadline, "no READY=1: {msgs:?}");
        let _ = k.wait(Some(Duration::from_millis(20)));
        drain_notify(&sock, &mut msgs);
    }

    // kshim goes away (its socket closes as in a crash) for 4 s.
    drop(k);
    let gone_at = msgs.len();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        drain_notify(&sock, &mut msgs);
    }
    let waiting = &msgs[gone_at..];
    assert!(
        engine.0.try_wait().unwrap().is_none(),
        "the engine exited when kshim went away"
    );
    assert_eq!(count(waiting, "STOPPING=1"), 0, "no stop: {waiting:?}");
    assert!(
        waiting
            .iter()
            .flatten()
            .any(|l| l.starts_with("STATUS=kshim went away") && l.contains("re-attach")),
        "a status saying it waits: {waiting:?}"
    );
    assert!(
        count(waiting, "WATCHDOG=1") >= 4,
        "watchdog pings go on while it waits: {waiting:?}"
    );

    // A new kshim at the same socket: the same engine attaches again, READY=1 again.
    let mut k = kshim(&dir, "k", ip, 1);
    wait_attached(&mut k, Instant::now() + Duration::from_secs(20));
    let back_at = msgs.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&msgs[back_at..], "READY=1") == 0 {
        assert!(Instant::now() < deadline, "no second READY=1: {msgs:?}");
        let _ = k.wait(Some(Duration::from_millis(20)));
        drain_notify(&sock, &mut msgs);
    }

    // Gone again, and SIGTERM while the engine waits for it: a clean stop.
    drop(k);
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        drain_notify(&sock, &mut msgs);
    }
    assert!(engine.0.try_wait().unwrap().is_none());
    let term_at = msgs.len();
    let st = engine.term_within(Duration::from_secs(20));
    drain_notify(&sock, &mut msgs);
    assert_eq!(st.code(), Some(0), "SIGTERM while waiting for kshim");
    assert_eq!(
        count(&msgs[term_at..], "STOPPING=1"),
        1,
        "STOPPING=1 once on SIGTERM: {msgs:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
