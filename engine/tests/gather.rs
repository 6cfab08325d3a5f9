//! A sleeping core that lets completions gather (`Gather`, the kernel's minimum
//! wait), over a real io_uring and real loopback UDP: a burst of datagrams spread
//! over tens of milliseconds ends one wait instead of one wait each; a single
//! datagram ends the wait once the gathering time has passed; and no gathering
//! ever holds a wait past its deadline (the core's next timer).

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use lu2k_engine::io::sys::{self, OwnedMem, SockOpts};
use lu2k_engine::io::uring::{UringIo, UringOpts};
use lu2k_engine::io::{DatagramIo, Event, Gather};

/// A receiving io_uring over a fresh loopback socket, its receive armed, or
/// `None` (with the reason on stderr) where this kernel has no io_uring fast
/// path or no minimum wait.
fn receiver(test: &str) -> Option<(UringIo, SocketAddr)> {
    if !common::fast_path_or_skip(test) {
        return None;
    }
    let (fd, info): (OwnedFd, _) = sys::udp_socket(
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
        &SockOpts {
            reuseport: false,
            sndbuf: 1 << 20,
            rcvbuf: 1 << 20,
            gro: false,
        },
    )
    .unwrap();
    let mem = OwnedMem::with_memfd_rx(64, 4096, 64, 65536).unwrap();
    let mut rx = UringIo::new_owned(fd, mem, None, UringOpts::default()).unwrap();
    if !rx.can_gather() {
        eprintln!(
            "SKIP {test}: this kernel has no io_uring minimum wait \
             (IORING_FEAT_MIN_TIMEOUT, Linux 6.12+); cores wake for each completion"
        );
        return None;
    }
    // The receive is armed (and the ring warm) before any measured wait.
    rx.wait(None, false, &mut Vec::new()).unwrap();
    Some((rx, info.local))
}

/// [`receiver`], its blocking waits gathering up to 32 completions `within`.
fn gathering(test: &str, within: Duration) -> Option<(UringIo, SocketAddr)> {
    let (mut rx, dst) = receiver(test)?;
    rx.set_gather(Some(Gather { events: 32, within }));
    Some((rx, dst))
}

/// Sends `n` datagrams to `dst`, `gap` apart, from another thread.
fn send_spaced(dst: SocketAddr, n: u32, gap: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for i in 0..n {
            std::thread::sleep(gap);
            tx.send_to(&i.to_be_bytes(), dst).unwrap();
        }
    })
}

/// Blocking waits until `n` datagrams came; returns the blocking waits it took.
/// The deadline stays put, as a core's next timer does (moving the armed timer
/// ends a wait). Every buffer goes straight back.
fn receive(rx: &mut UringIo, n: usize) -> u64 {
    let before = rx.stats().wakes.total();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while got < n {
        assert!(
            Instant::now() < deadline,
            "only {got} of {n} datagrams came"
        );
        out.clear();
        rx.wait(Some(deadline), true, &mut out).unwrap();
        for e in &out {
            if let Event::Recv { bid, .. } = *e {
                got += 1;
                rx.return_rx(bid);
            }
        }
    }
    rx.stats().wakes.total() - before
}

#[test]
fn a_burst_ends_one_gathering_wait_not_one_wait_per_datagram() {
    let Some((mut rx, dst)) = receiver("a_burst_ends_one_gathering_wait") else {
        return;
    };
    // Without gathering: each datagram, 5 ms after the last, ends a wait.
    let t = send_spaced(dst, 8, Duration::from_millis(5));
    let plain = receive(&mut rx, 8);
    t.join().unwrap();
    assert_eq!(rx.stats().gathered_waits, 0);

    // Gathering for 100 ms: the burst (~40 ms) ends one wait, or two where the
    // first datagram beat the wait into the ring. (With DEFER_TASKRUN a
    // multishot receive's datagrams wake the kernel's waiter as one piece of
    // task work, so the count of 32 is not what ends it: the 100 ms are.)
    rx.set_gather(Some(Gather {
        events: 32,
        within: Duration::from_millis(100),
    }));
    let t = send_spaced(dst, 8, Duration::from_millis(5));
    let start = Instant::now();
    let gathered = receive(&mut rx, 8);
    let took = start.elapsed();
    t.join().unwrap();
    eprintln!("8 datagrams 5 ms apart: {plain} waits plain, {gathered} gathering ({took:?})");
    assert!(
        plain >= 4,
        "plain waits took bunched datagrams: {plain} waits"
    );
    assert!(
        gathered <= 2,
        "gathering took {gathered} waits for 8 datagrams"
    );
    assert!(rx.stats().gathered_waits >= 1);
    // Ended by what it gathered, not by the 5 s deadline.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn a_lone_datagram_ends_a_gathering_wait_once_the_gathering_time_passed() {
    let Some((mut rx, dst)) = gathering(
        "a_lone_datagram_ends_a_gathering_wait",
        Duration::from_millis(150),
    ) else {
        return;
    };
    let t = send_spaced(dst, 1, Duration::from_millis(10));
    let start = Instant::now();
    let waits = receive(&mut rx, 1);
    let took = start.elapsed();
    t.join().unwrap();
    assert_eq!(waits, 1);
    // Held for the gathering time, then woken by what came (not by the
    // 5 s deadline, not at the datagram's arrival).
    assert!(took >= Duration::from_millis(140), "woke after {took:?}");
    assert!(took < Duration::from_secs(2), "woke after {took:?}");
}

#[test]
fn a_gathering_wait_never_passes_its_deadline() {
    let Some((mut rx, _dst)) = gathering(
        "a_gathering_wait_never_passes_its_deadline",
        Duration::from_secs(2),
    ) else {
        return;
    };
    let start = Instant::now();
    let mut out = Vec::new();
    rx.wait(Some(start + Duration::from_millis(30)), true, &mut out)
        .unwrap();
    let took = start.elapsed();
    assert!(
        out.iter().any(|e| matches!(e, Event::Timer)),
        "the deadline's timer did not fire: {out:?}"
    );
    assert!(took >= Duration::from_millis(29), "woke after {took:?}");
    // Far below the 2 s gathering time.
    assert!(took < Duration::from_millis(1000), "woke after {took:?}");
}
