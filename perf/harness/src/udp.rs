//! Raw UDP baselines on loopback: the GSO+GRO blast that bounds what any UDP
//! transport can reach here, and a plain request/response ping-pong.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
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

/// Buffer footprint of the second blast: the sender reads and the receiver
/// writes 64 MiB in turn instead of one cache-resident 64 KiB chunk — what the
/// kernel's copies cost once the data no longer sits in the CPU's caches (lu2k's
/// loopback bulk run walks 8 MiB of TX pool and a few MiB of RX buffers).
pub const OUT_OF_CACHE_FOOTPRINT: usize = 64 << 20;

/// Sends `bytes` as 1472-byte datagrams with UDP GSO to a receiver with UDP
/// GRO on, and returns the goodput the receiver saw, in Gbit/s.
///
/// `footprint` is how much memory each side walks through: 0 sends one 64 KiB
/// chunk again and again and receives into one 64 KiB buffer (everything stays
/// in the CPU's caches: the ceiling); [`OUT_OF_CACHE_FOOTPRINT`] makes the
/// kernel's copies run out of the caches.
///
/// UDP drops what the receiver cannot take; the figure counts only what
/// arrived, between the first and the last arrival.
pub fn gso_gro_blast(bytes: u64, footprint: usize) -> Result<f64> {
    const SLOT: usize = 1 << 16;
    let slots = (footprint / SLOT).max(1);
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind receiver")?;
    raise_buffers(&rx, SOCKET_BUFFER);
    setsockopt(&rx, sockopt::UdpGroSegment, &true).context("enable UDP_GRO")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let to = rx.local_addr()?;

    let receiver = thread::spawn(move || -> (u64, Option<Duration>) {
        // Touched before the clock starts, as lu2k's pools are by then.
        let mut buf = vec![1u8; SLOT * slots];
        let mut got = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        let mut slot = 0;
        while got < bytes {
            let b = &mut buf[slot * SLOT..(slot + 1) * SLOT];
            slot = (slot + 1) % slots;
            match rx.recv(b) {
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
    let per_send = DATAGRAM * SEGMENTS_PER_SEND;
    let data = vec![0x5au8; per_send * slots];
    let mut sent = 0u64;
    let mut slot = 0;
    while sent < bytes {
        let n = per_send.min((bytes - sent) as usize);
        let chunk = &data[slot * per_send..slot * per_send + n];
        slot = (slot + 1) % slots;
        tx.send(chunk).context("GSO send")?;
        sent += n as u64;
    }
    let (got, span) = receiver.join().expect("receiver thread");
    let span = span.context("no datagram arrived")?;
    Ok(gbps(got, span.max(Duration::from_micros(1))))
}

/// Request/response round trips of `size`-byte datagrams through `hops` UDP
/// hops each way, `count` times after a short warm-up.
///
/// Every hop is its own process with a blocking socket (`lu2k-perf __udp-hop`):
/// the requester (this thread) sends to the first, which forwards to the next,
/// the last echoes, and the reply comes back the same way. `hops` 1 is the
/// plain ping-pong between two processes (what one engine-to-engine UDP hop
/// costs); `hops` 3 has lu2k's topology — requester, sending "engine",
/// receiving "engine", echoing node: four processes, three hops each way —
/// with every hop a plain UDP datagram and a blocking receive, no rings and no
/// spinning.
pub fn ping_pong(size: usize, count: usize, hops: usize) -> Result<Latency> {
    let mut chain = Vec::new();
    let mut next = 0u16;
    for _ in 0..hops {
        let mut child = crate::node::self_command()?
            .arg("__udp-hop")
            .arg(next.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a UDP hop process")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("hop stdout")?),
            &mut line,
        )?;
        chain.push(child);
        next = line.trim().parse().context("the UDP hop's port")?;
    }
    let result = (|| {
        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        client.connect(loopback(next))?;
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
        Latency::from_samples(&mut samples).context("no samples")
    })();
    for mut c in chain {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// `lu2k-perf __udp-hop NEXT`: one hop of [`ping_pong`]'s chain. Binds a
/// loopback port and prints it; forwards what comes from the previous hop to
/// port `NEXT` and what comes back from there to the previous hop; with `NEXT`
/// 0 it echoes. Runs until killed.
pub fn hop_main(next: u16) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    println!("{}", sock.local_addr()?.port());
    std::io::Write::flush(&mut std::io::stdout())?;
    let next = (next != 0).then(|| loopback(next));
    let mut prev = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let to = match next {
            None => from,
            Some(nx) if from == nx => match prev {
                Some(p) => p,
                None => continue,
            },
            Some(nx) => {
                prev = Some(from);
                nx
            }
        };
        sock.send_to(&buf[..n], to)?;
    }
}

/// The address a loopback peer listens on.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
