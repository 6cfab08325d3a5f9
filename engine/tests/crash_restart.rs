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
            .args(["--nid", nid, "--progress", "0.1"])
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
    let idle = ["sink", "--idle", "8"];

    // 1. The sending side's engine killed mid-transfer.
    let n1 = 300u64;
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
    // Enough that the kill lands mid-transfer: progress is read every 0.1 s.
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
    put2.wait_ok(40, "put2");
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
