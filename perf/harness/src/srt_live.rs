//! SRT in live mode — its home ground — for the live workload: Debian's
//! `srt-live-transmit` (srt-tools) from the sending node's pipe to the
//! receiving node's pipe, through the relay.
//!
//! Live mode sends each input read as one SRT message and delivers it
//! `latency` after it was sent (TSBPD), dropping what is still missing then
//! (too-late packet drop); so a chunk either comes at the configured latency
//! or not at all. The latency is set as SRT's users set it, a multiple of
//! the round trip ([`LATENCY_RTTS`]); the rest is SRT's live defaults
//! (`transtype=live`, 1316-byte payloads, `oheadbw` 25 % over the input
//! rate, which is given: `inputbw` = the stream's rate, `maxbw=0`).
//!
//! The stream is cut into 1316-byte records (7 MPEG-TS packets, what live
//! sources send), each `[due ns | chunk | piece | pieces | filler]`, and
//! goes in and out of `srt-live-transmit` as UDP datagrams on loopback, one
//! record each, as live sources and players do (its `file://con` output is
//! block-buffered: records reached the reader in bunches of ~9, up to a
//! second late at this rate). A chunk is delivered when all its records are
//! in; its latency is then minus its due time, as for every contender.
//! Sending starts when the caller reports "SRT target connected" (before,
//! `srt-live-transmit` drops what it reads), so no warm-up chunk is needed:
//! the first chunk is due then.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::node::{live_note, mono_ns, LiveSchedule, NodeResult, NodeSpec, Role, Ticker};

/// The program used.
pub const PROGRAM: &str = "srt-live-transmit";
/// SRT's latency as a multiple of the round trip: users set 2.5–4 × RTT
/// (SRT's own guidance starts at 4 × for lossy links); the middle of that.
pub const LATENCY_RTTS: f64 = 3.0;
/// One record: one SRT live message.
const RECORD: usize = 1316;
/// Record header: due ns, chunk, piece, pieces.
const REC_HDR: usize = 8 + 8 + 2 + 2;

/// The URI parameters of both ends.
pub fn options(spec: &NodeSpec) -> String {
    options_for(spec.path.rtt_ms, spec.workload.stream_mbps)
}

fn options_for(rtt_ms: f64, stream_mbps: f64) -> String {
    let latency_ms = (LATENCY_RTTS * rtt_ms).round() as u64;
    let input_bps = (stream_mbps * 1e6 / 8.0) as u64;
    format!(
        "transtype=live&latency={latency_ms}&inputbw={input_bps}&maxbw=0&oheadbw=25\
         &payloadsize={RECORD}&conntimeo={}",
        conn_timeout_ms(rtt_ms)
    )
}

/// SRT's connect timeout, ms: its default 3 s is five round trips at
/// 600 ms, and at 5 % loss a lost handshake packet or two used it up
/// (the caller never connected); as for file mode, max(3 s, 10 RTT).
fn conn_timeout_ms(rtt_ms: f64) -> u64 {
    (10.0 * rtt_ms).max(3000.0).round() as u64
}

fn pieces(chunk_bytes: u32) -> u16 {
    (chunk_bytes as usize).div_ceil(RECORD - REC_HDR) as u16
}

/// Runs one SRT live node.
pub fn node(spec: &NodeSpec) -> Result<NodeResult> {
    match spec.role {
        Role::Recv => receive(spec),
        Role::Send => send(spec),
    }
}

fn receive(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    let sched = LiveSchedule::of(w);
    let n = pieces(w.chunk_bytes);
    let port = UdpSocket::bind(spec.addr)?.local_addr()?.port();
    let addr = SocketAddr::new(spec.addr.ip(), port);
    let out = UdpSocket::bind("127.0.0.1:0").context("binding the record socket")?;
    let _ = nix::sys::socket::setsockopt(&out, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20));
    out.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut child = Command::new(PROGRAM)
        .args(["-a:no", "-chunk:1316", "-q"])
        .arg(format!("srt://{addr}?mode=listener&{}", options(spec)))
        .arg(format!("udp://{}", out.local_addr()?))
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
    let mut rec = [0u8; 2048];
    let mut r = NodeResult::default();
    let mut got = vec![0u16; sched.chunks as usize];
    let mut lat: Vec<Option<f64>> = vec![None; sched.chunks as usize];
    let mut tick = Ticker::new();
    // From the first record: the stream's length plus the wait for stragglers.
    let limit = Duration::from_secs_f64(w.duration_s + w.max_duration_s);
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut stream_start = None;
    let mut delivered = 0u64;
    let cap = Instant::now() + Duration::from_secs_f64(w.duration_s + 2.0 * w.max_duration_s);
    while delivered < sched.chunks
        && Instant::now() < cap
        && first.is_none_or(|f| f.elapsed() < limit)
    {
        let Ok(len) = out.recv(&mut rec) else {
            if child.try_wait()?.is_some() && first.is_some() {
                break;
            }
            continue;
        };
        let now = mono_ns();
        if len < REC_HDR {
            continue;
        }
        let h = &rec[..REC_HDR];
        let due = u64::from_le_bytes(h[..8].try_into().expect("8"));
        let i = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        if i >= sched.chunks {
            continue;
        }
        stream_start.get_or_insert(sched.start_ns(i, due));
        first.get_or_insert_with(Instant::now);
        let k = i as usize;
        got[k] += 1;
        if got[k] == n && lat[k].is_none() {
            lat[k] = Some(now.saturating_sub(due) as f64 / 1e3);
            delivered += 1;
            r.bytes += u64::from(w.chunk_bytes);
            last = Instant::now();
        }
        tick.tick(r.bytes);
    }
    let stop = mono_ns();
    let _ = child.kill();
    let _ = child.wait();
    // In stream order; a chunk SRT dropped (too late) or never delivered
    // counts at its age now (a lower bound).
    let missing: Vec<u64> = (0..sched.chunks)
        .filter(|&i| lat[i as usize].is_none())
        .collect();
    // Nothing arrived: no start to age the chunks from, no samples.
    if let Some(s0) = stream_start {
        for (i, l) in lat.iter().enumerate() {
            r.samples_us.push(match l {
                Some(us) => *us,
                None => stop.saturating_sub(sched.due_ns(s0, i as u64)) as f64 / 1e3,
            });
        }
    }
    r.first_bytes = u64::from(w.chunk_bytes).min(r.bytes);
    r.note = Some(live_note(&sched, delivered, missing.len()));
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| crate::node::mono_ns_at(last));
    r.tuning = Some(options(spec));
    Ok(r)
}

fn send(spec: &NodeSpec) -> Result<NodeResult> {
    let w = &spec.workload;
    let sched = LiveSchedule::of(w);
    let n = pieces(w.chunk_bytes);
    let mut r = NodeResult::default();
    // A free loopback port for srt-live-transmit's UDP input.
    let input = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let mut child = Command::new(PROGRAM)
        .args(["-a:no", "-chunk:1316", "-v"])
        .arg(format!("udp://{input}"))
        .arg(format!("srt://{}?mode=caller&{}", spec.addr, options(spec)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {PROGRAM}"))?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    // Wait for the connection (its verbose log says so on stderr).
    let err = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("SRT target connected") {
                let _ = tx.send(());
            }
        }
    });
    let wait = Duration::from_millis(conn_timeout_ms(spec.path.rtt_ms) + 5000);
    if rx.recv_timeout(wait).is_err() {
        let _ = child.kill();
        bail!("{PROGRAM} (caller) did not connect within {wait:?}");
    }
    let start_ns = mono_ns();
    r.first_send_ns = Some(start_ns);
    let mut rec = vec![0x5au8; RECORD];
    'stream: for i in 0..sched.chunks {
        let due = sched.due_ns(start_ns, i);
        let now = mono_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        rec[..8].copy_from_slice(&due.to_le_bytes());
        rec[8..16].copy_from_slice(&i.to_le_bytes());
        rec[18..20].copy_from_slice(&n.to_le_bytes());
        for p in 0..n {
            rec[16..18].copy_from_slice(&p.to_le_bytes());
            if sock.send_to(&rec, input).is_err() {
                break 'stream;
            }
        }
        r.bytes += u64::from(w.chunk_bytes);
    }
    // Live mode holds nothing back beyond the latency: let the last chunk
    // be delivered, then end the caller.
    std::thread::sleep(Duration::from_secs_f64(
        (LATENCY_RTTS + 2.0) * spec.path.rtt_ms / 1e3,
    ));
    let _ = child.kill();
    let _ = child.wait();
    r.tuning = Some(options(spec));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cover_a_chunk_and_latency_follows_the_rtt() {
        assert_eq!(pieces(65_536), 51);
        assert!(usize::from(pieces(65_536)) * (RECORD - REC_HDR) >= 65_536);
        let o = options_for(600.0, 20.0);
        assert_eq!(
            o,
            "transtype=live&latency=1800&inputbw=2500000&maxbw=0&oheadbw=25&payloadsize=1316\
             &conntimeo=6000"
        );
    }
}
