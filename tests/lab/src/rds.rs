//! The `rds` lab test: lu2k-rds over rds_tcp between two network namespaces.

use crate::netns::{in_netns, veth_pair};
use crate::Outcome;
use anyhow::{bail, ensure, Context};
use lu2k_rds::{sys, Config, OpenError, RecvError, SendError, Socket, Status, LNET_HDR_LEN};
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// RDS caps a message at 1 MiB all told, so an LNet-shaped message carries at most
/// 1 MiB - 72 bytes of payload.
const MAX_PAYLOAD: usize = lu2k_rds::RDS_MAX_MSG_SIZE - LNET_HDR_LEN;

/// The byte at `i` of message `seq`'s payload: differs between messages and offsets.
fn pattern(seq: u64, i: usize) -> u8 {
    let x = (i as u64)
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add(seq.wrapping_mul(131));
    (x ^ (x >> 13)) as u8
}

/// A 72-byte LNet-shaped header carrying the sequence number and payload length.
fn header(seq: u64, len: usize) -> [u8; LNET_HDR_LEN] {
    let mut h = [0u8; LNET_HDR_LEN];
    h[0..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    for (i, b) in h.iter_mut().enumerate().skip(16) {
        *b = pattern(!seq, i);
    }
    h
}

/// Splits `len` bytes into at most 256 fragments of uneven lengths (LNet's limit).
fn fragments(seq: u64, len: usize) -> Vec<(usize, usize)> {
    let n = (1 + len / 4096).min(256);
    let mut out = Vec::with_capacity(n);
    let mut off = 0;
    for k in 0..n {
        let left = len - off;
        let remaining = n - k;
        let take = if remaining == 1 {
            left
        } else {
            let even = left / remaining;
            // between half and one and a half of an even share
            (even / 2 + (pattern(seq, k) as usize * even) / 255).min(left)
        };
        out.push((off, take));
        off += take;
    }
    out
}

/// Tiny deterministic generator for the random sizes.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn sizes() -> Vec<usize> {
    let mut v = Vec::new();
    for s in [
        0,
        1,
        100,
        4095,
        4096,
        4097,
        65535,
        65536,
        100_000,
        262_144,
        1_000_000,
        MAX_PAYLOAD - 1,
        MAX_PAYLOAD,
    ] {
        v.extend([s, s]);
    }
    let mut rng = Lcg(42);
    for _ in 0..60 {
        let r = rng.next();
        // mostly small, some large: log-uniform-ish
        let shift = (r % 21) as u32;
        v.push(((r >> 8) as usize % (1usize << shift).max(1)).min(MAX_PAYLOAD));
    }
    v
}

struct RxReport {
    messages: usize,
    bytes: usize,
    socket: Socket,
}

/// Receives `expect` messages on `rx` and checks each (order, length, every byte).
fn receiver(
    rx: Socket,
    from: SocketAddrV4,
    expect: Vec<usize>,
    progress: Arc<AtomicUsize>,
) -> anyhow::Result<RxReport> {
    let mut hdr = [0u8; LNET_HDR_LEN];
    let mut payload = vec![0u8; MAX_PAYLOAD];
    let mut bytes = 0;
    for (seq, &len) in expect.iter().enumerate() {
        let seq = seq as u64;
        // Scatter into a header buffer and a payload buffer, as the engine does.
        let got = rx
            .recv(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(&mut payload)])
            .with_context(|| format!("recv of message {seq}"))?;
        ensure!(
            got.from == from,
            "message {seq} from {} not {from}",
            got.from
        );
        let hseq = u64::from_le_bytes(hdr[0..8].try_into().unwrap());
        let hlen = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as usize;
        ensure!(
            hseq == seq,
            "message {hseq} arrived where {seq} was due (order)"
        );
        ensure!(
            hlen == len,
            "message {seq}: header says {hlen} bytes, sent {len}"
        );
        ensure!(
            got.len == LNET_HDR_LEN + len,
            "message {seq}: received {} bytes, sent {}",
            got.len,
            LNET_HDR_LEN + len
        );
        ensure!(hdr == header(seq, len), "message {seq}: header corrupted");
        if let Some(i) = (0..len).find(|&i| payload[i] != pattern(seq, i)) {
            bail!("message {seq} ({len} bytes): payload differs at byte {i}");
        }
        bytes += got.len;
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok(RxReport {
        messages: expect.len(),
        bytes,
        socket: rx,
    })
}

fn wait_for<T>(
    done: &mpsc::Receiver<anyhow::Result<T>>,
    progress: &AtomicUsize,
    total: usize,
    limit: Duration,
) -> anyhow::Result<T> {
    match done.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => bail!(
            "receiver got {} of {total} messages within {limit:?}",
            progress.load(Ordering::Relaxed)
        ),
    }
}

pub fn run() -> anyhow::Result<Outcome> {
    if let Err(e) = lu2k_rds::probe() {
        bail!("RDS unavailable in the lab kernel (init loads rds, rds_tcp): {e}");
    }
    let (a, b) = veth_pair(
        "rds",
        Ipv4Addr::new(10, 99, 1, 1),
        Ipv4Addr::new(10, 99, 1, 2),
    )?;
    let tx_addr = SocketAddrV4::new(a.addr, 18000);
    let rx_addr = SocketAddrV4::new(b.addr, 18001);
    let tx = in_netns(&a.ns, move || {
        Ok(Socket::open(tx_addr, &Config::default())?)
    })?;
    let rx = in_netns(&b.ns, move || {
        Ok(Socket::open(
            rx_addr,
            &Config {
                rcvbuf: 16 << 20,
                ..Config::default()
            },
        )?)
    })?;
    println!(
        "rds: {tx_addr} ({}) -> {rx_addr} ({}) over rds_tcp; max message {} bytes",
        a.ns,
        b.ns,
        tx.max_message()
    );

    // Binding an address the namespace does not have is a typed error.
    let other = SocketAddrV4::new(b.addr, 18009);
    match in_netns(&a.ns, move || Ok(Socket::open(other, &Config::default())))? {
        Err(OpenError::AddrNotAvailable { .. }) => {}
        r => bail!(
            "bind to {other} in {}: expected AddrNotAvailable, got {r:?}",
            a.ns
        ),
    }

    // 1. LNet-shaped messages of many sizes, scatter-gather, all verified.
    let sizes = sizes();
    let total = sizes.len();
    let progress = Arc::new(AtomicUsize::new(0));
    let (done_tx, done) = mpsc::channel();
    {
        let (sizes, progress) = (sizes.clone(), progress.clone());
        std::thread::spawn(move || {
            let _ = done_tx.send(receiver(rx, tx_addr, sizes, progress));
        });
    }
    let pool: Vec<u8> = vec![0; MAX_PAYLOAD];
    let mut pool = pool;
    let t0 = Instant::now();
    let mut sent_bytes = 0;
    for (seq, &len) in sizes.iter().enumerate() {
        let seq = seq as u64;
        for (i, b) in pool[..len].iter_mut().enumerate() {
            *b = pattern(seq, i);
        }
        let hdr = header(seq, len);
        let mut iov = vec![IoSlice::new(&hdr)];
        iov.extend(
            fragments(seq, len)
                .into_iter()
                .map(|(off, n)| IoSlice::new(&pool[off..off + n])),
        );
        ensure!(iov.len() <= 257, "fragments: {}", iov.len());
        let n = tx
            .send(rx_addr, &iov)
            .with_context(|| format!("send of message {seq} ({len} bytes)"))?;
        ensure!(n == LNET_HDR_LEN + len, "send of {seq} returned {n}");
        sent_bytes += n;
    }
    let report = wait_for(&done, &progress, total, Duration::from_secs(60))?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(
        report.bytes == sent_bytes,
        "bytes {} != {sent_bytes}",
        report.bytes
    );
    let rx_check = report.socket;
    println!(
        "rds: {} messages, {} bytes (payloads 0..=1 MiB - 72, up to 256 fragments), all verified, in order, {:.1} MB/s in the VM",
        report.messages,
        report.bytes,
        report.bytes as f64 / secs / 1e6
    );

    // 2. The size limit: exactly RDS_MAX_MSG_SIZE (1 MiB, all iovecs) passes, one
    //    byte more is EMSGSIZE from the kernel and TooLarge here without a syscall;
    //    so a full 1 MiB LNet payload with its header does not fit one RDS message.
    let max = tx.max_message();
    ensure!(
        max == lu2k_rds::RDS_MAX_MSG_SIZE,
        "max message {max}, expected 1 MiB"
    );
    let big = vec![0u8; max + 1];
    let n = sys::sendmsg(tx.as_fd(), rx_addr, &[IoSlice::new(&big[..max])], 0).map_err(|e| {
        anyhow::anyhow!("kernel refused a message of exactly {max} bytes: errno {e}")
    })?;
    ensure!(n == max);
    let mut sink = vec![0u8; max];
    let got = rx_check
        .recv(&mut [IoSliceMut::new(&mut sink)])
        .context("receiving the 1 MiB message")?;
    ensure!(got.len == max, "1 MiB message arrived as {} bytes", got.len);
    match sys::sendmsg(tx.as_fd(), rx_addr, &[IoSlice::new(&big)], 0) {
        Err(libc::EMSGSIZE) => {}
        r => bail!(
            "kernel answer to a {}-byte message: expected EMSGSIZE, got {r:?}",
            max + 1
        ),
    }
    let hdr = [0u8; LNET_HDR_LEN];
    match tx.send(
        rx_addr,
        &[IoSlice::new(&hdr), IoSlice::new(&big[..1 << 20])],
    ) {
        Err(e @ SendError::TooLarge { .. }) => ensure!(e.status() == Status::Rejected),
        r => bail!("send of 1 MiB payload + header: expected TooLarge, got {r:?}"),
    }
    println!(
        "rds: {max} bytes pass; {} bytes are EMSGSIZE from the kernel; a 1 MiB payload + 72-byte header is TooLarge",
        max + 1
    );

    // 3. Back-pressure: a receiver that does not read congests its port; a
    //    non-blocking sender gets Backpressure (Status::Retry), every message it
    //    queued before is delivered, and once drained a send goes through again.
    let ptx_addr = SocketAddrV4::new(a.addr, 18002);
    let prx_addr = SocketAddrV4::new(b.addr, 18003);
    let ptx = in_netns(&a.ns, move || {
        Ok(Socket::open(
            ptx_addr,
            &Config {
                nonblocking: true,
                ..Config::default()
            },
        )?)
    })?;
    let prx = in_netns(&b.ns, move || {
        Ok(Socket::open(
            prx_addr,
            &Config {
                rcvbuf: 256 << 10,
                ..Config::default()
            },
        )?)
    })?;
    let msg = vec![0x5Au8; 64 << 10];
    let mut queued = 0usize;
    let pushed_back = loop {
        match ptx.send(prx_addr, &[IoSlice::new(&msg)]) {
            Ok(_) => queued += 1,
            Err(e) if e.status() == Status::Retry => break e,
            Err(e) => bail!("back-pressure probe: send {queued} failed: {e}"),
        }
        ensure!(
            queued < 4096,
            "4096 messages of 64 KiB queued to a receiver that reads nothing, and no back-pressure"
        );
    };
    println!("rds: back-pressure after {queued} queued messages: {pushed_back}");
    let mut buf = vec![0u8; 128 << 10];
    let mut drained = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The receiver is blocking; the sender keeps retrying the refused message.
    let mut retried = false;
    while drained < queued || !retried {
        if drained < queued {
            let got = match prx.recv(&mut [IoSliceMut::new(&mut buf)]) {
                Ok(g) => g,
                Err(RecvError::Interrupted) => continue,
                Err(e) => bail!("draining: {e}"),
            };
            ensure!(
                got.len == msg.len() && buf[..got.len] == msg[..],
                "drained message differs"
            );
            drained += 1;
        }
        if !retried {
            match ptx.send(prx_addr, &[IoSlice::new(&msg)]) {
                Ok(_) => {
                    retried = true;
                    queued += 1;
                }
                Err(e) if e.status() == Status::Retry => {}
                Err(e) => bail!("retry after back-pressure failed: {e}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "drained {drained} of {queued}, retry through: {retried}"
        );
    }
    println!("rds: all {queued} messages delivered, including the one retried after back-pressure");

    Ok(Outcome::Pass(format!(
        "{} messages ({} bytes) over rds_tcp between namespaces verified; EMSGSIZE and back-pressure mapped",
        report.messages, report.bytes
    )))
}
