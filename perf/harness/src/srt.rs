//! The SRT contender: Debian's `srt-live-transmit` (srt-tools) in file mode
//! (`transtype=file`: SRT's file congestion control, no TSBPD), stdin to SRT
//! on the sending node and SRT to stdout on the receiving node, which counts
//! the bytes. Install with `scripts/install-srt.sh`. Bulk workload only; SRT
//! does not tell its retransmissions here (the link's counters still show
//! the wire bytes).
//!
//! Known problem: through the UDP relay SRT connects and then moves almost
//! nothing (0–3 Mbit/s even on a 1000 Mbit/s, 2 ms link), with the buffers
//! sized to the path or with SRT's defaults (`LU2K_PERF_SRT_DEFAULT_BUFFERS=1`);
//! the same commands directly on loopback move 10 MB in under a second. Not
//! understood yet.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::node::{NodeResult, NodeSpec, Role, Ticker};
use crate::scenario::WorkloadKind;

/// The program used.
pub const PROGRAM: &str = "srt-live-transmit";

/// Whether `srt-live-transmit` can be run; the reason when not.
pub fn available() -> Result<(), String> {
    match Command::new(PROGRAM)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "{PROGRAM} not runnable ({e}); install srt-tools with scripts/install-srt.sh (root, Debian)"
        )),
    }
}

fn options(spec: &NodeSpec) -> String {
    match std::env::var("LU2K_PERF_SRT_DEFAULT_BUFFERS") {
        Ok(v) if v == "1" => return "transtype=file".into(),
        _ => {}
    }
    let buf = spec.buffer.clamp(8 << 20, 256 << 20);
    format!(
        "transtype=file&sndbuf={buf}&rcvbuf={buf}&fc={}",
        (buf / 1456).max(25600)
    )
}

/// Runs one SRT node.
pub fn node(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    if w.kind != WorkloadKind::Bulk {
        bail!("the SRT driver runs the bulk workload only");
    }
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    match spec.role {
        Role::Recv => {
            let port = UdpSocket::bind(spec.addr)?.local_addr()?.port();
            let addr = SocketAddr::new(spec.addr.ip(), port);
            let mut child = Command::new(PROGRAM)
                .arg(format!("srt://{addr}?mode=listener&{}", options(spec)))
                .arg("file://con")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {PROGRAM}"))?;
            std::thread::sleep(Duration::from_millis(300));
            println!("listen {addr}");
            let out = child.stdout.take().expect("piped");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = crate::node::drain(out, |n| {
                    let _ = tx.send((Instant::now(), n));
                });
            });
            let mut tick = Ticker::new();
            let start = Instant::now();
            let mut first = None;
            let mut last = start;
            while r.bytes < w.bytes && start.elapsed() < cap {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok((t, n)) => {
                        if first.is_none() {
                            first = Some(t);
                            r.first_bytes = n;
                        }
                        last = t;
                        r.bytes = n;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => break,
                }
                tick.tick(r.bytes);
            }
            r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
            let _ = child.kill();
            let _ = child.wait();
        }
        Role::Send => {
            let mut child = Command::new(PROGRAM)
                .arg("file://con")
                .arg(format!("srt://{}?mode=caller&{}", spec.addr, options(spec)))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {PROGRAM}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            // srt-live-transmit reads stdin in 1456-byte chunks and holds a
            // partial one back: pad the stream so the receiver sees all `bytes`.
            let chunk = vec![0x5au8; 1 << 16];
            let total = w.bytes + 1456;
            while r.bytes < total {
                let n = chunk.len().min((total - r.bytes) as usize);
                if stdin.write_all(&chunk[..n]).is_err() {
                    break;
                }
                r.bytes += n as u64;
            }
            // Keep stdin open: at its end srt-live-transmit would quit with
            // data still unsent. The harness ends this node.
            println!("result {}", serde_json::to_string(&r)?);
            let _ = std::io::stdout().flush();
            let _ = child.wait();
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(r)
}
