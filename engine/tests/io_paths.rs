//! Both I/O paths on real UDP loopback sockets: GSO sends of [header, payload slice]
//! scatter lists, received with GRO into RX pool buffers, every byte checked; receive
//! backpressure when the buffer ring runs dry; the slow path gives the same result.
//! Over IPv6 (`[::1]`) too, and a dual-stack socket: an IPv4 sender is reported as
//! IPv4, and a send to an IPv4 address goes out IPv4-mapped.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use lu2k_engine::io::epoll::EpollIo;
use lu2k_engine::io::probe::Features;
use lu2k_engine::io::sys::{self, OwnedMem, SockOpts};
use lu2k_engine::io::uring::{UringIo, UringOpts};
use lu2k_engine::io::{DatagramIo, Event, Segment};

const HDR: usize = 16;
const PAYLOAD: u32 = 1456;
const SEGS: usize = 40;
const RXBUF: u32 = 65536 + 4096;

fn sock() -> (std::os::fd::OwnedFd, SocketAddr) {
    sock_with(8 << 20, true)
}

/// A loopback UDP socket with a `rcvbuf`-byte receive buffer, GRO on or off.
fn sock_with(rcvbuf: usize, gro: bool) -> (std::os::fd::OwnedFd, SocketAddr) {
    sock_at(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into(),
        rcvbuf,
        gro,
    )
}

/// A UDP socket bound to `addr` (either family; `[::]` is dual-stack).
fn sock_at(addr: SocketAddr, rcvbuf: usize, gro: bool) -> (std::os::fd::OwnedFd, SocketAddr) {
    let (fd, info) = sys::udp_socket(
        addr,
        &SockOpts {
            reuseport: false,
            sndbuf: 8 << 20,
            rcvbuf,
            gro,
        },
    )
    .unwrap();
    (fd, info.local)
}

fn fill(mem: &mut OwnedMem) {
    for (i, b) in mem.pool_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
}

/// Header: 8-byte datagram number + 8-byte pool offset of its payload.
fn header(n: u64, off: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..8].copy_from_slice(&n.to_be_bytes());
    h[8..].copy_from_slice(&off.to_be_bytes());
    h
}

#[derive(Debug, Default)]
struct Outcome {
    datagrams: u64,
    batches_coalesced: u64,
    kernel_copied: u64,
    sends_done: u64,
    starved: u64,
}

/// Sends `batches` GSO batches of SEGS datagrams from `tx` to `rx`'s socket and
/// checks every received datagram against the pool pattern. `hold` RX buffers are
/// kept back (not returned) until the end, to exercise backpressure.
fn blast(
    tx: &mut dyn DatagramIo,
    rx: &mut dyn DatagramIo,
    dst: SocketAddr,
    batches: u64,
    hold: usize,
) -> Outcome {
    blast_from(tx, rx, dst, batches, hold, None)
}

/// [`blast`], every datagram's sender checked to be `from` when given.
fn blast_from(
    tx: &mut dyn DatagramIo,
    rx: &mut dyn DatagramIo,
    dst: SocketAddr,
    batches: u64,
    hold: usize,
    want_from: Option<SocketAddr>,
) -> Outcome {
    let pool_pattern = |off: u64, k: usize| ((off as usize + k) % 251) as u8;
    let mut out = Outcome::default();
    let mut next = 0u64;
    let mut sends = 0u64;
    let mut seen = vec![false; (batches as usize) * SEGS];
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ev = Vec::new();
    let total = batches * SEGS as u64;
    while out.datagrams < total {
        assert!(Instant::now() < deadline, "timed out: {out:?}");
        // Flow window: at most 8 batches sent but not yet received (UDP drops what
        // overflows the receive buffer; the engine's transport has such a window too).
        while next < batches && next * (SEGS as u64) < out.datagrams + 8 * SEGS as u64 {
            let hdrs: Vec<[u8; HDR]> = (0..SEGS)
                .map(|k| {
                    let n = next * SEGS as u64 + k as u64;
                    header(n, (n * 7) % 4096)
                })
                .collect();
            // Every other datagram's payload goes as two pieces (as a packet that
            // spans two pool extents does).
            let split: Vec<[(u64, u32); 1]> = (0..SEGS)
                .map(|k| {
                    let n = next * SEGS as u64 + k as u64;
                    [((n * 7) % 4096 + 1000, PAYLOAD - 1000)]
                })
                .collect();
            let segs: Vec<Segment<'_>> = hdrs
                .iter()
                .enumerate()
                .map(|(k, h)| {
                    let n = next * SEGS as u64 + k as u64;
                    if k % 2 == 0 {
                        Segment {
                            hdr: h,
                            payload_off: (n * 7) % 4096,
                            payload_len: PAYLOAD,
                            more: &[],
                        }
                    } else {
                        Segment {
                            hdr: h,
                            payload_off: (n * 7) % 4096,
                            payload_len: 1000,
                            more: &split[k],
                        }
                    }
                })
                .collect();
            // One GSO batch may need several sends (zero-copy fragment budget).
            let mut at = 0;
            while at < segs.len() {
                let n = tx.fit(&segs[at..]);
                assert!(n > 0);
                match tx.send(dst, &segs[at..at + n], next << 8 | at as u64) {
                    Ok(()) => {
                        sends += 1;
                        at += n;
                    }
                    Err(lu2k_engine::io::SendError::Busy) => {
                        // Wait for completions, then continue this batch.
                        tx.wait(
                            Some(Instant::now() + Duration::from_millis(1)),
                            true,
                            &mut ev,
                        )
                        .unwrap();
                    }
                    Err(e) => panic!("send: {e}"),
                }
            }
            next += 1;
        }
        tx.wait(None, false, &mut ev).unwrap();
        rx.wait(
            Some(Instant::now() + Duration::from_millis(5)),
            true,
            &mut ev,
        )
        .unwrap();
        for e in ev.drain(..) {
            match e {
                Event::SendDone {
                    result,
                    kernel_copied,
                    ..
                } => {
                    assert_eq!(result.unwrap() % (HDR + PAYLOAD as usize), 0);
                    out.sends_done += 1;
                    out.kernel_copied += u64::from(kernel_copied);
                }
                Event::Recv {
                    from,
                    bid,
                    off,
                    len,
                    seg,
                    stamp_ns,
                } => {
                    if let Some(want) = want_from {
                        assert_eq!(from, want, "the datagram's sender");
                    }
                    // The kernel dates each datagram (SO_TIMESTAMPNS): the receiver's
                    // rate estimates depend on it. Received within this test's run.
                    let stamp = stamp_ns.expect("the kernel stamps received datagrams");
                    let age = lu2k_engine::io::sys::realtime_ns().saturating_sub(stamp);
                    assert!(age < 60_000_000_000, "receive stamp {age} ns old");
                    assert_eq!(seg as usize, HDR + PAYLOAD as usize);
                    assert_eq!(len % seg, 0);
                    if len > seg {
                        out.batches_coalesced += 1;
                    }
                    let bytes = rx
                        .rx_bytes(bid, off, len)
                        .expect("handed-out buffer readable")
                        .to_vec();
                    for d in bytes.chunks(seg as usize) {
                        let n = u64::from_be_bytes(d[..8].try_into().unwrap());
                        let poff = u64::from_be_bytes(d[8..16].try_into().unwrap());
                        assert!(!seen[n as usize], "datagram {n} twice");
                        seen[n as usize] = true;
                        for (k, b) in d[HDR..].iter().enumerate() {
                            assert_eq!(*b, pool_pattern(poff, k), "datagram {n} byte {k}");
                        }
                        out.datagrams += 1;
                    }
                    if held.len() < hold {
                        held.push(bid);
                    } else {
                        rx.return_rx(bid);
                    }
                }
                Event::RxStarved => {
                    out.starved += 1;
                    // Backpressure: give the held buffers back now.
                    for b in held.drain(..) {
                        rx.return_rx(b);
                    }
                }
                Event::Timer => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    // Drain remaining send completions.
    while out.sends_done < sends {
        assert!(Instant::now() < deadline, "sends never completed: {out:?}");
        tx.wait(
            Some(Instant::now() + Duration::from_millis(5)),
            true,
            &mut ev,
        )
        .unwrap();
        for e in ev.drain(..) {
            if let Event::SendDone { kernel_copied, .. } = e {
                out.sends_done += 1;
                out.kernel_copied += u64::from(kernel_copied);
            }
        }
    }
    out
}

/// A sending and a receiving io_uring path over two loopback sockets: the sender's
/// pool filled with the test pattern, 64 receive buffers.
fn uring_pair(tx_opts: UringOpts) -> (UringIo, UringIo, SocketAddr) {
    let (a, _) = sock();
    let (b, dst) = sock();
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    let rxm = OwnedMem::new(64, 4096, 64, RXBUF).unwrap();
    let tx = UringIo::new_owned(a, m, None, tx_opts).unwrap();
    let rx = UringIo::new_owned(b, rxm, None, UringOpts::default()).unwrap();
    (tx, rx, dst)
}

#[test]
fn uring_zc_gso_into_provided_buffers_with_gro() {
    if !common::fast_path_or_skip("uring_zc_gso_into_provided_buffers_with_gro") {
        return;
    }
    let (a, _) = sock();
    let (b, dst) = sock();
    let mut m = OwnedMem::new(64, 1 << 20, 64, RXBUF).unwrap();
    fill(&mut m);
    let rxm = OwnedMem::new(64, 4096, 64, RXBUF).unwrap();
    let mut tx = UringIo::new_owned(a, m, None, UringOpts::default()).unwrap();
    let mut rx = UringIo::new_owned(b, rxm, None, UringOpts::default()).unwrap();
    let o = blast(&mut tx, &mut rx, dst, 500, 0);
    eprintln!("uring: {o:?} setup {:?}", tx.setup());
    assert_eq!(o.datagrams, 500 * SEGS as u64);
    assert!(o.batches_coalesced > 0, "GRO never coalesced: {o:?}");
    // SENDMSG_ZC from a registered buffer needs Linux 6.15; older kernels (6.1 in the
    // kernel lab) refuse it, and the engine must then send from plain iovecs.
    let fixed_ok = lu2k_engine::io::uring::fixed_sendmsg_zc_supported();
    assert_eq!(
        tx.setup().fixed_tx,
        fixed_ok,
        "SENDMSG_ZC from the registered buffer: used {}, kernel supports it {fixed_ok}",
        tx.setup().fixed_tx
    );
    assert_eq!(tx.stats().payload_copied, 0);
    assert_eq!(rx.stats().rx_truncated, 0);
    assert_eq!(o.kernel_copied, tx.stats().zc_copied);
    // Auto mode: once the kernel reported 64 copies in a row (loopback copies every
    // zero-copy send), sends continue as plain SENDMSG.
    let st = tx.stats();
    if st.zc_copied >= 64 {
        assert_eq!(st.zc_fallbacks, 1, "{st:?}");
        assert!(st.copy_sends > 0 && !tx.zero_copy_active());
    }
}

#[test]
fn uring_zero_copy_always_completes_after_notification() {
    if !common::fast_path_or_skip("uring_zero_copy_always_completes_after_notification") {
        return;
    }
    let (mut tx, mut rx, dst) = uring_pair(UringOpts {
        zc: lu2k_engine::io::uring::ZcMode::Always,
        ..UringOpts::default()
    });
    let o = blast(&mut tx, &mut rx, dst, 200, 0);
    let st = tx.stats();
    assert_eq!(o.datagrams, 200 * SEGS as u64);
    assert_eq!(st.copy_sends, 0, "{st:?}");
    assert!(tx.zero_copy_active());
    // Every send completed through its notification; loopback reports the copy.
    assert_eq!(o.sends_done, st.sends);
    if tx.setup().zc_report_usage {
        // Only the notification knows whether the kernel copied, and loopback always
        // does: a send completed at its first CQE would say "not copied".
        assert_eq!(
            o.kernel_copied, o.sends_done,
            "a completion came before its notification: {o:?}"
        );
    }
    eprintln!("ZC always: {o:?}, {st:?}");
}

#[test]
fn uring_send_worker_gives_the_same_result() {
    if !common::fast_path_or_skip("uring_send_worker_gives_the_same_result") {
        return;
    }
    let (mut tx, mut rx, dst) = uring_pair(UringOpts {
        send_worker: true,
        ..UringOpts::default()
    });
    assert!(
        tx.setup().send_worker,
        "the kernel refused IOWQ_MAX_WORKERS"
    );
    // Every datagram, every byte, each once (blast checks), with sends on the worker.
    let o = blast(&mut tx, &mut rx, dst, 300, 0);
    assert_eq!(o.datagrams, 300 * SEGS as u64);
    assert_eq!(o.sends_done, tx.stats().sends);
}

#[test]
fn uring_empty_buffer_ring_is_backpressure() {
    if !common::fast_path_or_skip("uring_empty_buffer_ring_is_backpressure") {
        return;
    }
    let (a, _) = sock();
    let (b, dst) = sock();
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    // Only 4 RX buffers, and the receiver holds 4 back: the ring runs dry.
    let rxm = OwnedMem::new(64, 4096, 4, RXBUF).unwrap();
    let mut tx = UringIo::new_owned(a, m, None, UringOpts::default()).unwrap();
    let mut rx = UringIo::new_owned(b, rxm, None, UringOpts::default()).unwrap();
    let o = blast(&mut tx, &mut rx, dst, 30, 4);
    assert_eq!(o.datagrams, 30 * SEGS as u64);
    assert!(o.starved > 0, "ring never ran dry: {o:?}");
    assert!(rx.stats().rearms > 0);
}

/// A burst larger than the provided-buffer ring, into a pool with plenty of free
/// buffers: the ring runs dry and is refilled from the stash, the receive re-armed;
/// every datagram arrives and none of it reads as backpressure.
#[test]
fn uring_small_ring_refills_without_backpressure() {
    if !common::fast_path_or_skip("uring_small_ring_refills_without_backpressure") {
        return;
    }
    // GRO off: one datagram per buffer.
    let (fd, dst) = sock_with(8 << 20, false);
    let burst = 4 * lu2k_engine::io::uring::RING_FILL as u64;
    let rxm = OwnedMem::new(64, 4096, 2 * burst as u16, RXBUF).unwrap();
    let mut rx = UringIo::new_owned(fd, rxm, None, UringOpts::default()).unwrap();
    let tx = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    // Queued before the receiver first looks: one drain meets the whole burst.
    for n in 0..burst {
        tx.send_to(&[n as u8; 1000], dst).unwrap();
    }
    let d = drain_quiet(&mut rx);
    assert_eq!(d.datagrams, burst, "{d:?}");
    assert_eq!(d.bytes, burst * 1000, "{d:?}");
    let st = rx.stats();
    assert_eq!(
        d.starved, 0,
        "a dry ring with free buffers is not backpressure"
    );
    assert_eq!(st.rx_starved, 0);
    assert_eq!(st.socket_drops, 0);
    assert!(
        st.rearms > 0,
        "{burst} datagrams through a {}-buffer ring without it running dry?",
        lu2k_engine::io::uring::RING_FILL
    );
}

/// The io_uring futex doorbell: a core armed with `WAKE_FUTEX` sleeps in an
/// `IORING_OP_FUTEX_WAIT` on the region's futex word and wakes when kshim's notifier
/// rings (bump + `FUTEX_WAKE`, from another thread); a wait armed on a value the word
/// has already left ends at once (a ring between the read and the arming is not lost).
#[test]
fn uring_futex_doorbell_wakes_on_a_kshim_ring() {
    use lu2k_ring_abi::doorbell::WAKE_FUTEX;
    use lu2k_ring_abi::{Config, Eventfds, Region, WaitMode};
    if !common::fast_path_or_skip("uring_futex_doorbell_wakes_on_a_kshim_ring") {
        return;
    }
    if !Features::probe().futex {
        eprintln!("SKIPPED: this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7+)");
        return;
    }
    let region = Region::create(&Config {
        tx_entries: 16,
        tx_done_entries: 16,
        rx_entries: 16,
        rx_return_entries: 16,
        tx_pool_len: 4096,
        rx_buf_size: 64,
        rx_buf_count: 1,
        rx_tables_per_core: 0,
        ..Config::default()
    })
    .unwrap();
    let kc = region.kshim_core(0, Eventfds::none()).unwrap();
    let ec = region.engine_core(0, Eventfds::none()).unwrap();
    let (fd, _) = sock();
    let mem = OwnedMem::new(64, 4096, 4, RXBUF).unwrap();
    let mut io = UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap();
    io.use_futex_doorbell(ec.wait.futex_word()).unwrap();
    assert_eq!(io.doorbell_mode(), WaitMode::Futex);
    assert!(io.setup().futex_doorbell);

    let doorbell_within = |io: &mut UringIo, limit: Duration| {
        let deadline = Instant::now() + limit;
        let mut ev = Vec::new();
        while Instant::now() < deadline {
            io.wait(Some(deadline), true, &mut ev).unwrap();
            if ev.iter().any(|e| matches!(e, Event::Doorbell)) {
                return true;
            }
            ev.clear();
        }
        false
    };

    // Nobody rings: the wait sleeps through.
    let seq = ec.wait.futex_seq();
    ec.wait.arm(WAKE_FUTEX);
    io.arm_doorbell(seq);
    assert!(!doorbell_within(&mut io, Duration::from_millis(50)));
    // kshim rings from another thread while the core sleeps.
    let ringer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kc.to_engine.notify().unwrap()
    });
    assert!(doorbell_within(&mut io, Duration::from_secs(10)));
    assert!(
        ringer.join().unwrap(),
        "the notifier saw the need-wakeup bits"
    );
    ec.wait.disarm();
    assert_ne!(ec.wait.futex_seq(), seq, "the ring moved the word");

    // A wait armed on a stale value ends at once.
    ec.wait.arm(WAKE_FUTEX);
    io.arm_doorbell(seq);
    assert!(doorbell_within(&mut io, Duration::from_secs(10)));
    ec.wait.disarm();
}

#[test]
fn epoll_path_gives_the_same_result() {
    let (a, _) = sock();
    let (b, dst) = sock();
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    let rxm = OwnedMem::new(64, 4096, 64, RXBUF).unwrap();
    let mut tx = EpollIo::new_owned(a, m, None, 16).unwrap();
    let mut rx = EpollIo::new_owned(b, rxm, None, 16).unwrap();
    let o = blast(&mut tx, &mut rx, dst, 500, 0);
    eprintln!("epoll: {o:?}");
    assert_eq!(o.datagrams, 500 * SEGS as u64);
    assert!(o.batches_coalesced > 0, "GRO never coalesced: {o:?}");
    assert_eq!(tx.stats().payload_copied, 0);
}

#[test]
fn epoll_backpressure_and_mixed_paths() {
    // Fast sender, slow receiver with a dry pool: still every byte, in the end.
    let (a, _) = sock();
    let (b, dst) = sock();
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    let rxm = OwnedMem::new(64, 4096, 4, RXBUF).unwrap();
    let mut tx: Box<dyn DatagramIo> = if Features::probe().selftest.is_some() {
        Box::new(UringIo::new_owned(a, m, None, UringOpts::default()).unwrap())
    } else {
        eprintln!("NOTE: io_uring unavailable, sender uses epoll too");
        Box::new(EpollIo::new_owned(a, m, None, 16).unwrap())
    };
    let mut rx = EpollIo::new_owned(b, rxm, None, 16).unwrap();
    let o = blast(tx.as_mut(), &mut rx, dst, 30, 4);
    assert_eq!(o.datagrams, 30 * SEGS as u64);
    assert!(o.starved > 0, "{o:?}");
}

/// What [`drain_quiet`] saw.
#[derive(Debug, Default)]
struct Drained {
    datagrams: u64,
    bytes: u64,
    /// `RxStarved` events (backpressure).
    starved: u64,
}

/// Receives until `rx` has been quiet for 50 ms, giving every buffer back at once.
fn drain_quiet(rx: &mut dyn DatagramIo) -> Drained {
    let mut ev = Vec::new();
    let mut out = Drained::default();
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while quiet_since.elapsed() < Duration::from_millis(50) {
        assert!(
            Instant::now() < deadline,
            "receiver never went quiet: {out:?}"
        );
        rx.wait(
            Some(Instant::now() + Duration::from_millis(5)),
            true,
            &mut ev,
        )
        .unwrap();
        for e in ev.drain(..) {
            match e {
                Event::Recv { bid, len, .. } => {
                    out.datagrams += 1;
                    out.bytes += u64::from(len);
                    quiet_since = Instant::now();
                    rx.return_rx(bid);
                }
                Event::RxStarved => out.starved += 1,
                Event::Timer => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    out
}

/// A receive queue that overflows: the kernel's drop count reaches the I/O layer's
/// counters (`SO_RXQ_OVFL`), and sent = received + dropped exactly. The count rides on
/// datagrams queued after the drops, so one more datagram follows the burst.
fn socket_drops_counted(make_rx: impl FnOnce(std::os::fd::OwnedFd) -> Box<dyn DatagramIo>) {
    // As small a receive buffer as the kernel allows: a few datagrams.
    let (fd, dst) = sock_with(4096, false);
    let mut rx = make_rx(fd);
    let tx = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    const BURST: u64 = 300;
    for n in 0..BURST {
        tx.send_to(&[n as u8; 1000], dst).unwrap();
    }
    let mut got = drain_quiet(rx.as_mut()).datagrams;
    tx.send_to(&[0u8; 1000], dst).unwrap();
    got += drain_quiet(rx.as_mut()).datagrams;
    let drops = rx.stats().socket_drops;
    eprintln!("sent {} received {got} socket drops {drops}", BURST + 1);
    assert!(
        drops > 0,
        "a {BURST}-datagram burst into a tiny queue dropped nothing?"
    );
    assert_eq!(
        got + drops,
        BURST + 1,
        "every datagram received or counted as dropped"
    );
}

#[test]
fn uring_counts_socket_drops() {
    if !common::fast_path_or_skip("uring_counts_socket_drops") {
        return;
    }
    socket_drops_counted(|fd| {
        let rxm = OwnedMem::new(64, 4096, 16, RXBUF).unwrap();
        Box::new(UringIo::new_owned(fd, rxm, None, UringOpts::default()).unwrap())
    });
}

#[test]
fn epoll_counts_socket_drops() {
    socket_drops_counted(|fd| {
        let rxm = OwnedMem::new(64, 4096, 16, RXBUF).unwrap();
        Box::new(EpollIo::new_owned(fd, rxm, None, 16).unwrap())
    });
}

/// Which provider a family test builds: the fast path (when this kernel has it)
/// or the slow one.
#[derive(Debug, Clone, Copy)]
enum Path {
    Uring,
    Epoll,
}

fn provider(path: Path, fd: std::os::fd::OwnedFd, mem: OwnedMem) -> Box<dyn DatagramIo> {
    match path {
        Path::Uring => Box::new(UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap()),
        Path::Epoll => Box::new(EpollIo::new_owned(fd, mem, None, 16).unwrap()),
    }
}

/// Whether `path` runs here; prints why not (and the test returns).
fn path_or_skip(path: Path, test: &str) -> bool {
    if let Path::Uring = path {
        if Features::probe().selftest.is_none() {
            eprintln!("SKIP {test}: the io_uring fast path does not work on this kernel");
            return false;
        }
    }
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIP {test}: no IPv6 on this host ([::1] does not bind)");
        return false;
    }
    true
}

/// `batches` GSO batches from a socket at `from_bind` to one at `to_bind` on
/// `path`, every datagram checked (bytes, and the sender's address as the
/// receiver reports it: `want_from` of the sender's bound address).
fn family_blast(
    path: Path,
    from_bind: SocketAddr,
    to_bind: SocketAddr,
    dst: impl Fn(SocketAddr) -> SocketAddr,
    want_from: impl Fn(SocketAddr) -> SocketAddr,
) -> Outcome {
    let (a, a_addr) = sock_at(from_bind, 8 << 20, true);
    let (b, b_addr) = sock_at(to_bind, 8 << 20, true);
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    let rxm = OwnedMem::new(64, 4096, 64, RXBUF).unwrap();
    let mut tx = provider(path, a, m);
    let mut rx = provider(path, b, rxm);
    let o = blast_from(
        tx.as_mut(),
        rx.as_mut(),
        dst(b_addr),
        200,
        0,
        Some(want_from(a_addr)),
    );
    assert_eq!(o.datagrams, 200 * SEGS as u64, "{path:?}: {o:?}");
    assert_eq!(tx.stats().payload_copied, 0);
    assert_eq!(rx.stats().rx_truncated, 0);
    o
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// GSO sends and GRO receives over `[::1]`, the sender named by its IPv6 address.
fn ipv6_loopback(path: Path) {
    let o = family_blast(
        path,
        v6(Ipv6Addr::LOCALHOST, 0),
        v6(Ipv6Addr::LOCALHOST, 0),
        |b| b,
        |a| a,
    );
    assert!(o.batches_coalesced > 0, "GRO never coalesced: {o:?}");
}

#[test]
fn uring_ipv6_loopback() {
    if path_or_skip(Path::Uring, "uring_ipv6_loopback") {
        ipv6_loopback(Path::Uring);
    }
}

#[test]
fn epoll_ipv6_loopback() {
    if path_or_skip(Path::Epoll, "epoll_ipv6_loopback") {
        ipv6_loopback(Path::Epoll);
    }
}

/// A dual-stack socket (bound to `[::]`): an IPv4 sender arrives as
/// `::ffff:127.0.0.1` and is reported as `127.0.0.1` (one peer whatever the
/// socket's family); and the dual-stack socket sends to an IPv4 address given as
/// such (the I/O layer writes it IPv4-mapped), which the IPv4 receiver sees come
/// from 127.0.0.1.
fn dual_stack(path: Path) {
    let any6 = v6(Ipv6Addr::UNSPECIFIED, 0);
    let lo4 = v4(Ipv4Addr::LOCALHOST, 0);
    // IPv4 socket → dual-stack socket, addressed at 127.0.0.1:port.
    family_blast(
        path,
        lo4,
        any6,
        |b| v4(Ipv4Addr::LOCALHOST, b.port()),
        |a| a,
    );
    // Dual-stack socket → IPv4 socket, the destination an IPv4 address.
    family_blast(
        path,
        any6,
        lo4,
        |b| b,
        |a| v4(Ipv4Addr::LOCALHOST, a.port()),
    );
    // An IPv4-mapped destination is the same destination.
    family_blast(
        path,
        any6,
        lo4,
        |b| v6(Ipv4Addr::LOCALHOST.to_ipv6_mapped(), b.port()),
        |a| v4(Ipv4Addr::LOCALHOST, a.port()),
    );
    // IPv6 on the same dual-stack socket.
    family_blast(
        path,
        v6(Ipv6Addr::LOCALHOST, 0),
        any6,
        |b| v6(Ipv6Addr::LOCALHOST, b.port()),
        |a| a,
    );
}

#[test]
fn uring_dual_stack_names_ipv4_senders_as_ipv4() {
    if path_or_skip(Path::Uring, "uring_dual_stack_names_ipv4_senders_as_ipv4") {
        dual_stack(Path::Uring);
    }
}

#[test]
fn epoll_dual_stack_names_ipv4_senders_as_ipv4() {
    if path_or_skip(Path::Epoll, "epoll_dual_stack_names_ipv4_senders_as_ipv4") {
        dual_stack(Path::Epoll);
    }
}

/// A send to a closed IPv6 port: the kernel's ICMPv6 port-unreachable reaches the
/// provider through the error queue (`IPV6_RECVERR`) as ECONNREFUSED naming the
/// destination.
fn ipv6_icmp_error(path: Path) {
    let (a, _) = sock_at(v6(Ipv6Addr::LOCALHOST, 0), 1 << 20, false);
    // A port nobody listens on: bound, then closed.
    let closed = std::net::UdpSocket::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut m = OwnedMem::new(64, 1 << 20, 8, RXBUF).unwrap();
    fill(&mut m);
    let mut tx = provider(path, a, m);
    let hdr = header(0, 0);
    let seg = Segment {
        hdr: &hdr,
        payload_off: 0,
        payload_len: 100,
        more: &[],
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ev = Vec::new();
    let mut sent = 0u64;
    loop {
        assert!(Instant::now() < deadline, "no SocketError for {closed}");
        if sent < 5 && tx.send(closed, &[seg], sent).is_ok() {
            sent += 1;
        }
        tx.wait(
            Some(Instant::now() + Duration::from_millis(20)),
            true,
            &mut ev,
        )
        .unwrap();
        let hit = ev.drain(..).find_map(|e| match e {
            Event::SocketError { errno, dst } => Some((errno, dst)),
            _ => None,
        });
        if let Some((errno, dst)) = hit {
            assert_eq!(errno, libc::ECONNREFUSED, "{path:?}");
            assert_eq!(
                dst,
                Some(closed),
                "{path:?}: the error names the destination"
            );
            break;
        }
    }
}

#[test]
fn uring_ipv6_icmp_error_names_the_destination() {
    if path_or_skip(Path::Uring, "uring_ipv6_icmp_error_names_the_destination") {
        ipv6_icmp_error(Path::Uring);
    }
}

#[test]
fn epoll_ipv6_icmp_error_names_the_destination() {
    if path_or_skip(Path::Epoll, "epoll_ipv6_icmp_error_names_the_destination") {
        ipv6_icmp_error(Path::Epoll);
    }
}
