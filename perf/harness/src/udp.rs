//! Raw UDP baselines on loopback: the GSO+GRO blast that bounds what any UDP
//! transport can reach here, and a plain request/response ping-pong.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{setsockopt, sockopt};

use crate::stats::{gbps, Latency};

/// Payload bytes per datagram: a 1500-byte MTU less IPv4 and UDP headers.
pub const DATAGRAM: usize = 1472;
/// Datagrams per GSO send (64 KiB less a little).
const SEGMENTS_PER_SEND: usize = 44;
const SOCKET_BUFFER: usize = 32 << 20;

/// Raises a socket's buffers as far as this process may: forced when root.
pub fn raise_buffers(sock: &UdpSocket, bytes: usize) {
    if setsockopt(sock, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(sock, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &bytes);
    }
}

/// Sends `bytes` as 1472-byte datagrams with UDP GSO to a receiver with UDP
/// GRO on, and returns the goodput the receiver saw, in Gbit/s.
///
/// UDP drops what the receiver cannot take; the figure counts only what
/// arrived, between the first and the last arrival.
pub fn gso_gro_blast(bytes: u64) -> Result<f64> {
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind receiver")?;
    raise_buffers(&rx, SOCKET_BUFFER);
    setsockopt(&rx, sockopt::UdpGroSegment, &true).context("enable UDP_GRO")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let to = rx.local_addr()?;

    let receiver = thread::spawn(move || -> (u64, Option<Duration>) {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        while got < bytes {
            match rx.recv(&mut buf) {
                Ok(n) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    got += n as u64;
                }
                Err(_) => break, // idle: the sender is done
            }
        }
        (got, first.map(|f| last - f))
    });

    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind sender")?;
    raise_buffers(&tx, SOCKET_BUFFER);
    tx.connect(to)?;
    setsockopt(&tx, sockopt::UdpGsoSegment, &(DATAGRAM as i32)).context("enable UDP_SEGMENT")?;
    let chunk = vec![0x5au8; DATAGRAM * SEGMENTS_PER_SEND];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        tx.send(&chunk[..n]).context("GSO send")?;
        sent += n as u64;
    }
    let (got, span) = receiver.join().expect("receiver thread");
    let span = span.context("no datagram arrived")?;
    Ok(gbps(got, span.max(Duration::from_micros(1))))
}

/// Request/response round trips of `size`-byte datagrams, `count` times after
/// a short warm-up.
pub fn ping_pong(size: usize, count: usize) -> Result<Latency> {
    let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = server.local_addr()?;
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    server.set_read_timeout(Some(Duration::from_millis(50)))?;
    let echo = thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while matches!(stop_rx.try_recv(), Err(mpsc::TryRecvError::Empty)) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    client.connect(addr)?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; 65536];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let start = Instant::now();
        client.send(&msg)?;
        client.recv(&mut buf).context("echo timed out")?;
        if i >= count / 10 {
            samples.push(start.elapsed());
        }
    }
    drop(stop_tx);
    echo.join().expect("echo thread");
    Latency::from_samples(&mut samples).context("no samples")
}

/// The address a loopback peer listens on.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
