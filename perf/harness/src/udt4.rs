//! The reference UDT4 (4.11, through the `udt` crate) as a contender on loopback.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use udt::{SocketFamily, SocketType, UdtSocket};

use crate::stats::{gbps, Latency};
use crate::udp::loopback;

fn err(what: &str) -> impl Fn(udt::UdtError) -> anyhow::Error + '_ {
    move |e| anyhow!("UDT4 {what}: {} ({})", e.err_msg, e.err_code)
}

fn listener(ty: SocketType) -> Result<(UdtSocket, SocketAddr)> {
    udt::init();
    let sock = UdtSocket::new(SocketFamily::AFInet, ty).map_err(err("socket"))?;
    sock.bind(loopback(0)).map_err(err("bind"))?;
    sock.listen(1).map_err(err("listen"))?;
    let addr = sock.getsockname().map_err(err("getsockname"))?;
    Ok((sock, addr))
}

/// Moves `bytes` in stream mode from one UDT4 socket to another over loopback;
/// returns the receiver's goodput in Gbit/s, first byte to last.
pub fn bulk(bytes: u64) -> Result<f64> {
    let (server, addr) = listener(SocketType::Stream)?;
    let receiver = thread::spawn(move || -> Result<Duration> {
        let (conn, _) = server.accept().map_err(err("accept"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut start = None;
        while got < bytes {
            let cap = buf.len();
            let n = conn.recv(&mut buf, cap).map_err(err("recv"))?;
            if n <= 0 {
                bail!("UDT4 connection closed after {got} of {bytes} bytes");
            }
            start.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        Ok(start.expect("received something").elapsed())
    });

    let client = UdtSocket::new(SocketFamily::AFInet, SocketType::Stream).map_err(err("socket"))?;
    client.connect(addr).map_err(err("connect"))?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        send_all(&client, &chunk[..n])?;
        sent += n as u64;
    }
    let elapsed = receiver.join().expect("receiver thread")?;
    let _ = client.close();
    Ok(gbps(bytes, elapsed))
}

/// Request/response round trips of `size`-byte messages.
///
/// Stream mode, reading exactly `size` bytes per reply: UDT4 4.11's message
/// mode stalls after a handful of small round trips on this machine (both
/// sides blocked in `recvmsg`), so the figure would measure that bug.
pub fn ping_pong(size: usize, count: usize) -> Result<Latency> {
    ping_pong_with(size, count, false)
}

/// As [`ping_pong`]; with `poll`, both sides receive non-blocking
/// (`UDT_RCVSYN` false) and spin, which takes UDT4's blocking-receive wakeup
/// out of the round trip.
pub fn ping_pong_with(size: usize, count: usize, poll: bool) -> Result<Latency> {
    let (server, addr) = listener(SocketType::Stream)?;
    let total = count + count / 10;
    let echo = thread::spawn(move || -> Result<()> {
        let (conn, _) = server.accept().map_err(err("accept"))?;
        if poll {
            conn.setsockopt(udt::UdtOpts::UDT_RCVSYN, false)
                .map_err(err("setsockopt UDT_RCVSYN"))?;
        }
        let mut buf = vec![0u8; size];
        for _ in 0..total {
            recv_exact(&conn, &mut buf)?;
            send_all(&conn, &buf)?;
        }
        Ok(())
    });
    let client = UdtSocket::new(SocketFamily::AFInet, SocketType::Stream).map_err(err("socket"))?;
    client.connect(addr).map_err(err("connect"))?;
    if poll {
        client
            .setsockopt(udt::UdtOpts::UDT_RCVSYN, false)
            .map_err(err("setsockopt UDT_RCVSYN"))?;
    }
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..total {
        let start = Instant::now();
        send_all(&client, &msg)?;
        recv_exact(&client, &mut buf)?;
        if i >= count / 10 {
            samples.push(start.elapsed());
        }
    }
    echo.join().expect("echo thread")?;
    let _ = client.close();
    Latency::from_samples(&mut samples).context("no samples")
}

fn send_all(sock: &UdtSocket, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        let n = sock.send(buf).map_err(err("send"))?;
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// How long a UDT4 receive may wait before the run is declared stalled.
const STALL_MS: i32 = 5_000;

fn recv_exact(sock: &UdtSocket, buf: &mut [u8]) -> Result<()> {
    sock.setsockopt(udt::UdtOpts::UDT_RCVTIMEO, STALL_MS)
        .map_err(err("setsockopt UDT_RCVTIMEO"))?;
    let start = Instant::now();
    let mut off = 0;
    while off < buf.len() {
        let want = buf.len() - off;
        let n = match sock.recv(&mut buf[off..], want) {
            Ok(n) => n,
            // 6002: non-blocking receive, nothing yet.
            Err(e) if e.err_code == 6002 => {
                if start.elapsed() > Duration::from_millis(STALL_MS as u64) {
                    bail!("UDT4 stalled: nothing received for {STALL_MS} ms");
                }
                std::hint::spin_loop();
                continue;
            }
            Err(e) => return Err(err("recv")(e)),
        };
        if n <= 0 {
            bail!("UDT4 stalled: nothing received for {STALL_MS} ms");
        }
        off += n as usize;
    }
    Ok(())
}
