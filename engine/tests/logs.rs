//! The engine's logs as an operator sees them.
//!
//! - Under systemd (stderr is the stream `JOURNAL_STREAM` names; here a file whose
//!   device and inode the test puts in the variable): every line starts with an
//!   `sd-daemon` priority prefix and carries no timestamp; a peer that comes up
//!   and later stops answering gives one line each, with the reason.
//! - The same variable naming another file (a child whose stderr was
//!   redirected) gives the timestamped lines.
//! - A flood of bad datagrams is counted and summarised: a bounded number of
//!   lines, never one per packet.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::{Event, TxStatus};

mod common;
use common::{kshim, nid, pattern, put, stats, tmpdir, wait_attached, Engine};

/// Starts an engine for kshim `name`, its stderr into `log`, with `JOURNAL_STREAM`
/// naming `journal` (a file's device and inode) when given.
fn engine(
    dir: &Path,
    name: &str,
    ip: Ipv4Addr,
    port: u16,
    log: &Path,
    journal: Option<&Path>,
    extra: &[&str],
) -> Engine {
    let err = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"));
    cmd.args(["run", "--kshim-socket"])
        .arg(dir.join(format!("{name}.sock")))
        .args(["--bind", &ip.to_string(), "--port", &port.to_string()])
        .arg("--stats-socket")
        .arg(dir.join(format!("{name}-stats.sock")))
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(err);
    match journal {
        Some(j) => {
            let m = std::fs::metadata(j).unwrap();
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        }
        None => {
            cmd.env_remove("JOURNAL_STREAM");
        }
    }
    Engine(cmd.spawn().unwrap())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Whether `l` starts like an RFC 3339 timestamp (`2026-12-06T15:20:16`).
fn timestamped(l: &str) -> bool {
    let b = l.as_bytes();
    b.len() > 19
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
}

/// Sends one 64 KiB PUT from kshim `ka` to `to` and waits for its completion
/// and its arrival at `kb`.
fn one_message(
    ka: &mut lu2k_kshim::Kshim,
    kb: &mut lu2k_kshim::Kshim,
    from: Ipv4Addr,
    to: Ipv4Addr,
) {
    let len = 64 << 10;
    ka.send(&put(nid(to), nid(from), len, 1), &pattern(1, len))
        .unwrap();
    let (mut done, mut got) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(done && got) {
        assert!(Instant::now() < deadline, "the message did not make it");
        while let Some(ev) = ka.poll() {
            if let Event::TxDone { status, .. } = ev {
                assert_eq!(status, TxStatus::Ok);
                done = true;
            }
        }
        if let Some(Event::Rx(m)) = kb.wait(Some(Duration::from_millis(5))) {
            got = true;
            kb.rx_done(m);
        }
    }
}

#[test]
fn journal_lines_carry_priorities_and_no_timestamps() {
    let dir = tmpdir("logs-journal");
    let port = 20000 + (std::process::id() % 20000) as u16 + 301;
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 81), Ipv4Addr::new(127, 0, 0, 82));
    let mut ka = kshim(&dir, "a", a_ip, 1);
    let mut kb = kshim(&dir, "b", b_ip, 1);
    let (alog, blog) = (dir.join("a.log"), dir.join("b.log"));
    // A: stderr is the "journal"; B: JOURNAL_STREAM names another file, as for a
    // child of a service whose stderr went elsewhere.
    let ea = engine(
        &dir,
        "a",
        a_ip,
        port,
        &alog,
        Some(&alog),
        &["--peer-down-timeout-s", "5"],
    );
    let eb = engine(&dir, "b", b_ip, port, &blog, Some(&alog), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);
    one_message(&mut ka, &mut kb, a_ip, b_ip);

    // B dies without a word; a message waits for it, and A's peer goes down
    // after the 5 s timeout.
    drop(eb);
    let len = 4096;
    ka.send(&put(nid(b_ip), nid(a_ip), len, 2), &pattern(2, len))
        .unwrap();
    let peer = nid(b_ip).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read(&alog).contains(&format!("peer {peer} at ")) || !read(&alog).contains(" down: ") {
        assert!(
            Instant::now() < deadline,
            "no peer-down line:\n{}",
            read(&alog)
        );
        let _ = ka.wait(Some(Duration::from_millis(50)));
    }
    assert_eq!(ea.term_within(Duration::from_secs(20)).code(), Some(0));

    let text = read(&alog);
    eprintln!("engine A, journal format:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4, "{text}");
    for l in &lines {
        let prio = l
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .and_then(|(n, _)| n.parse::<u8>().ok());
        assert!(
            prio.is_some_and(|p| p <= 7),
            "no <N> priority prefix: {l:?}"
        );
        assert!(
            !timestamped(&l[3..]) && !l.contains("Z  INFO") && !l.contains("\x1b["),
            "a timestamp or colour in a journal line: {l:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("<6>attached to kshim")),
        "{text}"
    );
    let up: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(&format!("peer {peer}")) && l.contains(" up: "))
        .collect();
    let down: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(&format!("peer {peer}")) && l.contains(" down: "))
        .collect();
    assert_eq!(up.len(), 1, "one line for the peer coming up: {up:?}");
    assert!(up[0].starts_with("<6>"), "{}", up[0]);
    assert_eq!(down.len(), 1, "one line for the peer going down: {down:?}");
    assert!(
        down[0].starts_with("<4>") && down[0].contains("no answer within the peer-down timeout"),
        "warning priority and the reason: {}",
        down[0]
    );

    let b = read(&blog);
    let first = b.lines().next().expect("engine B logged");
    assert!(
        timestamped(first),
        "JOURNAL_STREAM naming another file: terminal-style lines, got {first:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An engine that fails to start says why at error priority.
#[test]
fn a_failed_start_is_an_error_line() {
    let dir = tmpdir("logs-fail");
    let log = dir.join("err.log");
    let err = std::fs::File::create(&log).unwrap();
    let m = std::fs::metadata(&log).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["run", "--kshim-socket"])
        .arg(dir.join("nothing.sock"))
        .arg("--stats-socket")
        .arg(dir.join("stats.sock"))
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .unwrap();
    assert!(!st.success());
    let text = read(&log);
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.starts_with("<3>error: attaching to kshim"),
        "the failure as an error line: {text}"
    );
    // A misspelt level is refused, naming the choices.
    let out = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["--log-level", "verbose", "probe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--log-level") && e.contains("debug"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flood_of_bad_datagrams_is_a_bounded_number_of_lines() {
    let dir = tmpdir("logs-flood");
    let port = 20000 + (std::process::id() % 20000) as u16 + 311;
    let ip = Ipv4Addr::new(127, 0, 0, 83);
    let mut k = kshim(&dir, "a", ip, 1);
    let log: PathBuf = dir.join("a.log");
    let e = engine(&dir, "a", ip, port, &log, None, &[]);
    wait_attached(&mut k, Instant::now() + Duration::from_secs(20));
    let before = read(&log).lines().count();

    // 3 s of datagrams too short for a UDT header, from a few addresses.
    let socks: Vec<UdpSocket> = (90..94)
        .map(|h| UdpSocket::bind((Ipv4Addr::new(127, 0, 0, h), 0)).unwrap())
        .collect();
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(3) {
        for s in &socks {
            for n in 0..32 {
                if s.send_to(&[n as u8; 7], (ip, port)).is_ok() {
                    sent += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
        let _ = k.poll();
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = stats(&dir, "a");
    let malformed: u64 = r
        .cores
        .iter()
        .map(|c| c.drops.get("rx_malformed").copied().unwrap_or(0))
        .sum();
    // `lu2k-engine stats | head -1`: a reader that goes early is no error.
    let mut c = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
        .args(["stats", "--socket"])
        .arg(dir.join("a-stats.sock"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "stats into a closed pipe: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(e.term_within(Duration::from_secs(20)).code(), Some(0));
    let text = read(&log);
    let flood: Vec<&str> = text.lines().skip(before).collect();
    let summaries: Vec<&&str> = flood.iter().filter(|l| l.contains("dropped")).collect();
    eprintln!(
        "{sent} bad datagrams sent, {malformed} counted as rx_malformed, {} lines logged \
         meanwhile ({} drop summaries):\n{}",
        flood.len(),
        summaries.len(),
        flood.join("\n")
    );
    assert!(
        malformed >= 1000,
        "the flood was counted: {malformed} of {sent}"
    );
    // One summary at once, the next only after the 10 s interval: the 3 s flood
    // gives one (two if the interval straddles the shutdown's last publication).
    assert!(
        (1..=2).contains(&summaries.len()),
        "drop summaries: {summaries:?}"
    );
    assert!(summaries[0].contains("rx_malformed"), "{}", summaries[0]);
    assert!(
        flood.len() <= 10,
        "{} lines for {malformed} bad datagrams",
        flood.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
