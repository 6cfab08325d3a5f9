//! The SRT contender: Debian's `srt-file-transmit` (srt-tools), SRT's own
//! file-transfer tool (`transtype=file`: SRT's file congestion control, no
//! TSBPD, no too-late drops). The sending node pipes the bulk stream into
//! `srt-file-transmit file:///dev/stdin srt://…?mode=caller`; the receiving
//! node runs `srt-file-transmit srt://…?mode=listener file://DIR`, which
//! writes what arrives to `DIR/stdin` (the file is named after the stream id,
//! which the sender sets to the base name of its source, `stdin`); that path
//! is a FIFO the node reads and counts. Install with `scripts/install-srt.sh`.
//! Bulk workload only; SRT does not tell its retransmissions here (the
//! link's counters still show the wire bytes).
//!
//! Why not `srt-live-transmit`: it always runs its SRT socket non-blocking
//! and drops what it cannot hand to SRT at once ("bytes lost"): everything it
//! reads from stdin before the handshake finishes (two round trips: 1.2 s at
//! 600 ms, time enough for the sending node to write the whole workload) and
//! every chunk that meets a full send buffer, so its rows would come out
//! empty. `srt-file-transmit` reads its input only once
//! connected and only when SRT can take more, and at the end of its input it
//! waits until SRT's send buffer is acknowledged before it closes.
//!
//! What SRT then does on a 600 ms path is SRT's own (libsrt 1.5.1, measured
//! with `srt-file-transmit -s 100 -f -pf csv -statsout FILE` through the
//! relay, no loss): it starts with its built-in RTT estimate of 100 ms, so
//! its retransmission timer fires before the first ACK can return; its stats
//! show all 16 packets of the first window counted lost (`pktSndLoss` 16 on
//! a lossless link), slow start abandoned and the sending period raised to
//! about 61 ms, from which the rate climbs back over tens of seconds. Short
//! runs at 600 ms are therefore slow and its wire bytes include spurious
//! retransmissions; at 200 ms, or at 500 Mbit/s where it climbs faster, it
//! completes. FileCC also caps each rate increase at twice the rate of its
//! last loss, so a random loss during that slow climb can hold it near
//! 1 Mbit/s for the rest of a run: by chance, with these options or SRT's
//! defaults alike (the harness README has the runs). No SRT option sets the
//! initial RTT. `LU2K_PERF_SRT_DEFAULT_BUFFERS=1` runs it with SRT's defaults
//! instead of the path-sized options.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::node::{NodeResult, NodeSpec, Role, Ticker};
use crate::scenario::WorkloadKind;

/// The program used.
pub const PROGRAM: &str = "srt-file-transmit";

/// The sender's source. `srt-file-transmit` has no stdin input of its own
/// (`file://con` works for its output only) and names the stream after the
/// base name of this path.
const SOURCE: &str = "/dev/stdin";

/// What the receiving `srt-file-transmit` names its output: the stream id.
const STREAM: &str = "stdin";

/// Whether `srt-file-transmit` (and `mkfifo`) can be run; the reason when not.
pub fn available() -> Result<(), String> {
    for (prog, arg) in [(PROGRAM, "-version"), ("mkfifo", "--version")] {
        if let Err(e) = Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            return Err(format!(
                "{prog} not runnable ({e}); install srt-tools with scripts/install-srt.sh (root, Debian)"
            ));
        }
    }
    Ok(())
}

/// SRT socket options (URI parameters): file mode tuned for the path
/// ([`crate::tuning::srt`]: flow window, buffers, `maxbw`, peer-idle and
/// connection timeouts). `LU2K_PERF_SRT_DEFAULT_BUFFERS=1` leaves all but
/// `transtype=file` at SRT's defaults; `LU2K_PERF_SRT_OPTIONS=a=1&b=2` runs
/// with exactly those parameters after `transtype=file` (to try others).
pub fn options(spec: &NodeSpec) -> String {
    match std::env::var("LU2K_PERF_SRT_DEFAULT_BUFFERS") {
        Ok(v) if v == "1" => return "transtype=file".into(),
        _ => {}
    }
    if let Ok(o) = std::env::var("LU2K_PERF_SRT_OPTIONS") {
        return format!("transtype=file&{o}");
    }
    crate::tuning::srt(&spec.path)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A private directory holding the FIFO the receiver's `srt-file-transmit`
/// writes to; removed on drop.
struct FifoDir(PathBuf);

impl FifoDir {
    fn new() -> Result<FifoDir> {
        let dir = std::env::temp_dir().join(format!("lu2k-perf-srt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = FifoDir(dir);
        let st = Command::new("mkfifo")
            .arg(d.fifo())
            .status()
            .context("running mkfifo")?;
        if !st.success() {
            bail!("mkfifo {} failed ({st})", d.fifo().display());
        }
        Ok(d)
    }
    fn fifo(&self) -> PathBuf {
        self.0.join(STREAM)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one SRT node.
pub fn node(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    if w.kind == WorkloadKind::Live {
        return crate::srt_live::node(spec);
    }
    if w.kind != WorkloadKind::Bulk {
        bail!("the SRT driver runs the bulk and live workloads only");
    }
    match spec.role {
        Role::Recv => receive(spec),
        Role::Send => send(spec),
    }
}

/// The listener: `srt-file-transmit` writes what arrives into a FIFO, which
/// this node reads and counts.
fn receive(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let dir = FifoDir::new()?;
    let port = UdpSocket::bind(spec.addr)?.local_addr()?.port();
    let addr = SocketAddr::new(spec.addr.ip(), port);
    let mut child = Command::new(PROGRAM)
        .arg(format!("srt://{addr}?mode=listener&{}", options(spec)))
        .arg(format!("file://{}", dir.path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {PROGRAM}"))?;
    std::thread::sleep(Duration::from_millis(300));
    if let Some(st) = child.try_wait()? {
        bail!("{PROGRAM} (listener) exited at once ({st})");
    }
    println!("listen {addr}");
    let _ = std::io::stdout().flush();
    let rx = count_fifo(dir.fifo());
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
            // The writer closed: srt-file-transmit is done.
            Err(_) => break,
        }
        tick.tick(r.bytes);
    }
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| crate::node::mono_ns_at(last));
    if r.bytes < w.bytes {
        r.note = Some(match child.try_wait()? {
            Some(st) => format!("{PROGRAM} (listener) ended early ({st})"),
            None => format!(
                "{PROGRAM} (listener) still receiving after {:.0} s",
                start.elapsed().as_secs_f64()
            ),
        });
    }
    let _ = child.kill();
    let _ = child.wait();
    r.tuning = Some(options(spec));
    Ok(r)
}

/// Reads the FIFO on a thread of its own; the channel carries (when, bytes
/// so far) and closes when the writer does.
fn count_fifo(fifo: PathBuf) -> std::sync::mpsc::Receiver<(Instant, u64)> {
    // Opening the FIFO waits for the writer: srt-file-transmit opens
    // its output once a sender has connected.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(f) = std::fs::File::open(&fifo) else {
            return;
        };
        let _ = crate::node::drain(f, |n| {
            let _ = tx.send((Instant::now(), n));
        });
    });
    rx
}

/// The caller: pipes the workload into `srt-file-transmit`'s stdin.
fn send(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    let mut r = NodeResult::default();
    let mut child = Command::new(PROGRAM)
        .arg(format!("file://{SOURCE}"))
        .arg(format!("srt://{}?mode=caller&{}", spec.addr, options(spec)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {PROGRAM}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let chunk = vec![0x5au8; 1 << 16];
    r.first_send_ns = Some(crate::node::mono_ns());
    while r.bytes < w.bytes {
        let n = chunk.len().min((w.bytes - r.bytes) as usize);
        if stdin.write_all(&chunk[..n]).is_err() {
            break;
        }
        r.bytes += n as u64;
    }
    // The end of its input: srt-file-transmit sends the rest, waits
    // until SRT's send buffer is acknowledged, and exits.
    drop(stdin);
    let st = child.wait()?;
    if !st.success() {
        r.note = Some(format!("{PROGRAM} (caller) exited with {st}"));
    }
    r.tuning = Some(options(spec));
    Ok(r)
}
