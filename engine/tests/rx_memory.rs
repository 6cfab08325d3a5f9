//! RX memory on the io_uring path, over real loopback UDP sockets and a real
//! io_uring: datagrams that arrive one by one share RX buffers (cut into
//! datagram-sized receives) and every payload byte reads back right; a datagram
//! larger than a receive turns cutting off (whole buffers again); free buffers
//! that stay cold give their pages back to the pool's memfd.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::fast_path_or_skip;

use lu2k_engine::io::sys::{self, OwnedMem, SockOpts};
use lu2k_engine::io::uring::{UringIo, UringOpts, SLICE_AFTER};
use lu2k_engine::io::{DatagramIo, Event};

const BUF: u32 = 65536;

/// A loopback UDP socket with GRO off (datagrams arrive one by one).
fn sock() -> (OwnedFd, SocketAddr) {
    let (fd, info) = sys::udp_socket(
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
        &SockOpts {
            reuseport: false,
            sndbuf: 8 << 20,
            rcvbuf: 8 << 20,
            gro: false,
        },
    )
    .unwrap();
    (fd, info.local)
}

/// Datagram `n` of `len` bytes: its number, then a pattern from it.
fn datagram(n: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|k| (n as usize * 31 + k) as u8).collect();
    d[..4].copy_from_slice(&n.to_be_bytes());
    d
}

/// One received datagram, checked and kept.
#[derive(Debug, Clone, Copy)]
struct Got {
    bid: u16,
    off: u32,
    len: u32,
    /// The datagram's number.
    n: u32,
}

/// Sends `count` datagrams of `len` bytes numbered from `first`, one send each, at
/// most 256 ahead of what arrived, and receives them all; every payload byte is
/// checked against [`datagram`]. Buffers are returned at once unless `hold`, as
/// the transport returns them: once nothing held lies in them (`held`).
/// Returns what arrived (in order) and how many arrived truncated.
fn exchange(
    rx: &mut UringIo,
    tx: &UdpSocket,
    dst: SocketAddr,
    (first, count, len): (u32, u32, usize),
    hold: bool,
) -> (Vec<Got>, u32) {
    exchange_beside(rx, tx, dst, (first, count, len), hold, &[])
}

/// [`exchange`] beside datagrams held from before (`held`).
fn exchange_beside(
    rx: &mut UringIo,
    tx: &UdpSocket,
    dst: SocketAddr,
    (first, count, len): (u32, u32, usize),
    hold: bool,
    held: &[Got],
) -> (Vec<Got>, u32) {
    let mut got = Vec::new();
    let mut truncated = 0;
    let mut sent = 0u32;
    let mut ev = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (got.len() as u32) + truncated < count {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {count} arrived, {truncated} truncated",
            got.len()
        );
        while sent < count && sent < got.len() as u32 + truncated + 256 {
            tx.send_to(&datagram(first + sent, len), dst).unwrap();
            sent += 1;
        }
        ev.clear();
        rx.wait(
            Some(Instant::now() + Duration::from_millis(20)),
            true,
            &mut ev,
        )
        .unwrap();
        for e in &ev {
            match *e {
                Event::Recv {
                    bid, off, len: l, ..
                } => {
                    let b = rx.rx_bytes(bid, off, l).expect("handed buffer readable");
                    let n = u32::from_be_bytes(b[..4].try_into().unwrap());
                    assert_eq!(l as usize, len, "datagram {n}: length");
                    assert!(
                        b == datagram(n, len).as_slice(),
                        "datagram {n}: payload bytes differ"
                    );
                    got.push(Got {
                        bid,
                        off,
                        len: l,
                        n,
                    });
                    if !hold && held.iter().all(|h| h.bid != bid) {
                        rx.return_rx(bid);
                    }
                }
                Event::RecvTruncated => truncated += 1,
                Event::RxStarved => panic!("RX starved"),
                _ => {}
            }
        }
    }
    (got, truncated)
}

/// The receiver's buffers all come back: every one free again.
fn all_returned(rx: &mut UringIo, got: &[Got]) {
    for g in got {
        rx.return_rx(g.bid);
    }
    let mut ev = Vec::new();
    rx.wait(Some(Instant::now()), false, &mut ev).unwrap();
    assert_eq!(rx.rx_free(), rx.rx_count(), "buffers not all free again");
}

/// Warms `rx` up to cutting: SLICE_AFTER full-size datagrams, one by one.
fn warm_up(rx: &mut UringIo, tx: &UdpSocket, dst: SocketAddr) -> u32 {
    assert_eq!(rx.rx_per_buf(), None, "cut before any datagram came");
    let (got, truncated) = exchange(rx, tx, dst, (0, SLICE_AFTER, 1400), false);
    assert_eq!((got.len() as u32, truncated), (SLICE_AFTER, 0));
    SLICE_AFTER
}

#[test]
fn small_datagrams_share_rx_buffers() {
    if !fast_path_or_skip("small_datagrams_share_rx_buffers") {
        return;
    }
    let (fd, dst) = sock();
    let mem = OwnedMem::with_memfd_rx(64, 4096, 64, BUF).unwrap();
    let mut rx = UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap();
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let first = warm_up(&mut rx, &tx, dst);
    let per = rx.rx_per_buf().expect("buffers cut after the warm-up");
    // 1472-byte datagrams (mss 1500) with recvmsg's header, address and control
    // messages: 40 in a 64 KiB buffer.
    assert_eq!(per, 40.0);

    // 1200 datagrams held at once (as datagrams behind a hole are).
    let n = 1200u32;
    let (got, truncated) = exchange(&mut rx, &tx, dst, (first, n, 1472), true);
    assert_eq!((got.len() as u32, truncated), (n, 0));
    let mut bids: Vec<u16> = got.iter().map(|g| g.bid).collect();
    bids.sort_unstable();
    bids.dedup();
    let need = n.div_ceil(per as u32) as usize;
    eprintln!(
        "{n} datagrams held in {} buffers ({need} at least); free {} of {}",
        bids.len(),
        rx.rx_free(),
        rx.rx_count()
    );
    assert!(
        bids.len() <= need + 2,
        "{n} datagrams took {} buffers; {per} fit one",
        bids.len()
    );
    assert_eq!(
        got.iter().map(|g| u64::from(g.len)).sum::<u64>(),
        1472 * u64::from(n)
    );
    assert!(rx.rx_free() <= rx.rx_count() - need);
    let st = rx.stats();
    assert_eq!((st.rx_truncated, st.rx_slice_fallbacks), (0, 0));
    all_returned(&mut rx, &got);
}

#[test]
fn oversize_datagram_turns_cutting_off() {
    if !fast_path_or_skip("oversize_datagram_turns_cutting_off") {
        return;
    }
    let (fd, dst) = sock();
    let mem = OwnedMem::with_memfd_rx(64, 4096, 64, BUF).unwrap();
    let mut rx = UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap();
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let first = warm_up(&mut rx, &tx, dst);
    assert!(rx.rx_per_buf().is_some());
    // A 4000-byte datagram does not fit a receive: it arrives truncated (the
    // protocol sends it again) and buffers go in whole from then on.
    let (got, truncated) = exchange(&mut rx, &tx, dst, (first, 1, 4000), false);
    assert_eq!((got.len(), truncated), (0, 1));
    assert_eq!(rx.rx_per_buf(), None);
    assert_eq!(rx.stats().rx_slice_fallbacks, 1);
    // Entries cut before that still in the ring truncate at most what they hold
    // (a few ring fills); then every datagram arrives whole.
    let n = 400;
    let (got, truncated) = exchange(&mut rx, &tx, dst, (first + 1, n, 4000), false);
    eprintln!(
        "after the fall-back: {} whole, {truncated} truncated",
        got.len()
    );
    assert!(
        truncated <= 128,
        "{truncated} truncated after the fall-back"
    );
    assert!(got.len() as u32 >= n - 128);
    // The last 100 all whole (the test pattern checked by `exchange`).
    let (got2, truncated) = exchange(&mut rx, &tx, dst, (first + 1 + n, 100, 4000), false);
    assert_eq!((got2.len(), truncated), (100, 0));
    assert_eq!(rx.stats().rx_slice_fallbacks, 1);
    all_returned(&mut rx, &[]);
}

#[test]
fn truncated_entries_never_free_a_buffer_the_transport_holds() {
    if !fast_path_or_skip("truncated_entries_never_free_a_buffer_the_transport_holds") {
        return;
    }
    let (fd, dst) = sock();
    let mem = OwnedMem::with_memfd_rx(64, 4096, 64, BUF).unwrap();
    let mut rx = UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap();
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let first = warm_up(&mut rx, &tx, dst);
    // Datagrams held in the first pieces of cut buffers (behind a hole, say)...
    let (held, truncated) = exchange(&mut rx, &tx, dst, (first, 50, 1472), true);
    assert_eq!((held.len(), truncated), (50, 0));
    // ...then oversize ones truncated into the other pieces of the same buffers
    // (a GRO batch does the same): those pieces are discarded, and the buffers
    // must stay out while the held datagrams lie in them.
    let (_, truncated) = exchange_beside(&mut rx, &tx, dst, (first + 50, 40, 4000), false, &held);
    assert!(truncated >= 1, "no datagram arrived truncated");
    // Enough traffic to reuse every free buffer several times over.
    let (got, _) = exchange_beside(&mut rx, &tx, dst, (first + 90, 2000, 1400), false, &held);
    assert!(got.len() >= 1800);
    for h in &held {
        let b = rx
            .rx_bytes(h.bid, h.off, h.len)
            .expect("a held buffer stays readable");
        assert!(
            b == datagram(h.n, 1472).as_slice(),
            "held datagram {} in buffer {} was overwritten while held",
            h.n,
            h.bid
        );
    }
    all_returned(&mut rx, &held);
}

/// 512-byte blocks the memfd holds.
fn memfd_blocks(mem_fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    rustix::fs::fstat(mem_fd).unwrap().st_blocks as u64
}

#[test]
fn cold_free_buffers_give_their_pages_back() {
    if !fast_path_or_skip("cold_free_buffers_give_their_pages_back") {
        return;
    }
    let (fd, dst) = sock();
    let mem = OwnedMem::with_memfd_rx(64, 4096, 256, BUF).unwrap();
    // A second handle on the pool's memfd, to watch its allocated blocks.
    let watch = mem.rx_memfd().unwrap().try_clone_to_owned().unwrap();
    // Whole buffers: each datagram touches a buffer of its own.
    let opts = UringOpts {
        rx_slice: 0,
        ..UringOpts::default()
    };
    let mut rx = UringIo::new_owned(fd, mem, None, opts).unwrap();
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let before = memfd_blocks(std::os::fd::AsFd::as_fd(&watch));
    // 200 datagrams held at once: 200 buffers touched, the pool's high water.
    let (got, _) = exchange(&mut rx, &tx, dst, (0, 200, 1400), true);
    let peak = memfd_blocks(std::os::fd::AsFd::as_fd(&watch));
    assert!(
        peak >= before + 200 * 8,
        "200 buffers touched but the memfd grew only from {before} to {peak} blocks"
    );
    all_returned(&mut rx, &got);
    // Use falls to nothing: within two trim periods the cold free buffers beyond a
    // small warm reserve give their pages back.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ev = Vec::new();
    let mut now_blocks = peak;
    while Instant::now() < deadline {
        rx.wait(
            Some(Instant::now() + Duration::from_millis(50)),
            true,
            &mut ev,
        )
        .unwrap();
        now_blocks = memfd_blocks(std::os::fd::AsFd::as_fd(&watch));
        if now_blocks <= before + 100 * 8 {
            break;
        }
    }
    let released = rx.stats().rx_bufs_released;
    eprintln!(
        "memfd blocks: {before} before, {peak} at the peak, {now_blocks} after; {released} buffers released"
    );
    assert!(
        now_blocks <= before + 100 * 8,
        "pages not given back: {now_blocks} blocks after, {peak} at the peak"
    );
    assert!(released >= 100, "{released} buffers released");
    // Given-back buffers receive again, and read right.
    let (got, truncated) = exchange(&mut rx, &tx, dst, (1000, 300, 1400), false);
    assert_eq!((got.len(), truncated), (300, 0));
}

/// This process's resident anonymous memory, KiB.
fn rss_anon_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A core that only receives (and sends header-only datagrams, as ACKs are) does
/// not register its TX range: a registration pins, and so makes resident, the
/// whole TX pool. The first send with pool payload registers it.
#[test]
fn tx_pool_is_registered_only_for_payload_sends() {
    if !fast_path_or_skip("tx_pool_is_registered_only_for_payload_sends") {
        return;
    }
    let (a, _) = sock();
    let (b, dst) = sock();
    const POOL: usize = 256 << 20;
    let before = rss_anon_kib();
    let mem = OwnedMem::new(64, POOL, 8, BUF).unwrap();
    let mut tx = UringIo::new_owned(a, mem, None, UringOpts::default()).unwrap();
    let mem = OwnedMem::new(64, 4096, 64, BUF).unwrap();
    let mut rx = UringIo::new_owned(b, mem, None, UringOpts::default()).unwrap();
    assert!(!tx.setup().fixed_tx && tx.setup().fixed_tx_pending);
    let hdr = [7u8; 32];
    let seg = |len| lu2k_engine::io::Segment {
        hdr: &hdr,
        payload_off: 0,
        payload_len: len,
        more: &[],
    };
    let sent_and_got = |tx: &mut UringIo, rx: &mut UringIo, len: u32| {
        tx.send(dst, &[seg(len)], 1).unwrap();
        let mut ev = Vec::new();
        let (mut done, mut got) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(done && got) {
            assert!(Instant::now() < deadline, "send {done} receive {got}");
            ev.clear();
            let soon = Some(Instant::now() + Duration::from_millis(10));
            tx.wait(soon, true, &mut ev).unwrap();
            done |= ev
                .iter()
                .any(|e| matches!(e, Event::SendDone { result: Ok(_), .. }));
            ev.clear();
            rx.wait(soon, true, &mut ev).unwrap();
            for e in &ev {
                if let Event::Recv { bid, len: l, .. } = *e {
                    assert_eq!(l, 32 + len);
                    got = true;
                    rx.return_rx(bid);
                }
            }
        }
    };
    // Header only: nothing registered, the pool not resident.
    sent_and_got(&mut tx, &mut rx, 0);
    assert!(!tx.setup().fixed_tx && tx.setup().fixed_tx_pending);
    let grown = rss_anon_kib().saturating_sub(before);
    assert!(
        grown < (POOL as u64 / 1024) / 4,
        "{grown} KiB resident after a header-only send over a {} MiB pool",
        POOL >> 20
    );
    // A payload send registers the range where the kernel sends from it.
    sent_and_got(&mut tx, &mut rx, 1000);
    assert!(!tx.setup().fixed_tx_pending);
    assert_eq!(
        tx.setup().fixed_tx,
        lu2k_engine::io::uring::fixed_sendmsg_zc_supported()
    );
}
