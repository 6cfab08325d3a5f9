//! Raw UDP blast over loopback through the engine's I/O layers, side by side in one
//! run: the io_uring fast path (SENDMSG_ZC/SENDMSG + GSO from a registered buffer,
//! multishot recvmsg + GRO into provided buffers), the epoll slow path (sendmmsg with
//! GSO, recvmmsg with GRO), and plain sendmmsg/recvmmsg without offloads. A sender
//! thread sends 1472-byte datagrams (16-byte header + 1456 payload) for `SECS`
//! seconds; the receiver counts what arrives. Prints the median of `RUNS` runs, in
//! Gbit/s received.
//!
//!     cargo run --release -p lu2k-engine --example blast [-- RUNS SECS]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lu2k_engine::io::epoll::EpollIo;
use lu2k_engine::io::sys::{self, OwnedMem, SockOpts};
use lu2k_engine::io::uring::{UringIo, UringOpts};
use lu2k_engine::io::{DatagramIo, Event, Segment};

const PAYLOAD: u32 = 1456;
const SEGS: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Uring,
    EpollGso,
    PlainMmsg,
    /// io_uring sender, epoll receiver (which side costs what).
    UringTxEpollRx,
    /// epoll sender, io_uring receiver.
    EpollTxUringRx,
}

fn sock(gro: bool) -> (std::os::fd::OwnedFd, SocketAddr) {
    let (fd, info) = sys::udp_socket(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        &SockOpts {
            reuseport: false,
            sndbuf: 32 << 20,
            rcvbuf: 32 << 20,
            gro,
        },
    )
    .expect("socket");
    (fd, info.local)
}

fn run(kind: Kind, secs: f64) -> f64 {
    let gro = kind != Kind::PlainMmsg;
    let (rs, dst) = sock(gro);
    let (ss, _) = sock(false);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let rx_thread = std::thread::spawn(move || {
        let mem = OwnedMem::new(64, 4096, 256, 65536 + 4096).unwrap();
        let mut io: Box<dyn DatagramIo> = match kind {
            Kind::Uring | Kind::EpollTxUringRx => {
                Box::new(UringIo::new_owned(rs, mem, None, UringOpts::default()).unwrap())
            }
            _ => Box::new(EpollIo::new_owned(rs, mem, None, 64).unwrap()),
        };
        let mut bytes = 0u64;
        let mut ev = Vec::new();
        let mut start: Option<Instant> = None;
        while !stop_rx.load(Ordering::Relaxed) {
            io.wait(
                Some(Instant::now() + Duration::from_millis(5)),
                true,
                &mut ev,
            )
            .unwrap();
            for e in ev.drain(..) {
                if let Event::Recv { bid, len, .. } = e {
                    start.get_or_insert_with(Instant::now);
                    bytes += u64::from(len);
                    io.return_rx(bid);
                }
            }
        }
        let el = start.map_or(1.0, |s| s.elapsed().as_secs_f64());
        bytes as f64 * 8.0 / el / 1e9
    });
    let mut mem = OwnedMem::new(64, 4 << 20, 8, 4096).unwrap();
    for (i, b) in mem.pool_mut().iter_mut().enumerate() {
        *b = i as u8;
    }
    let hdr = [0x80u8; 16];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    match kind {
        Kind::Uring | Kind::EpollGso | Kind::UringTxEpollRx | Kind::EpollTxUringRx => {
            let mut io: Box<dyn DatagramIo> = if matches!(kind, Kind::Uring | Kind::UringTxEpollRx)
            {
                Box::new(UringIo::new_owned(ss, mem, None, UringOpts::default()).unwrap())
            } else {
                Box::new(EpollIo::new_owned(ss, mem, None, 64).unwrap())
            };
            let mut ev = Vec::new();
            let mut off = 0u64;
            while Instant::now() < end {
                let segs: Vec<Segment<'_>> = (0..SEGS)
                    .map(|k| Segment {
                        hdr: &hdr,
                        payload_off: (off + k as u64 * u64::from(PAYLOAD)) % (3 << 20),
                        payload_len: PAYLOAD,
                        more: &[],
                    })
                    .collect();
                off = (off + 64 * 1024) % (3 << 20);
                let mut at = 0;
                while at < segs.len() {
                    let n = io.fit(&segs[at..]);
                    match io.send(dst, &segs[at..at + n], 0) {
                        Ok(()) => at += n,
                        Err(_) => {
                            io.wait(
                                Some(Instant::now() + Duration::from_millis(1)),
                                true,
                                &mut ev,
                            )
                            .unwrap();
                            ev.clear();
                        }
                    }
                }
                io.wait(None, false, &mut ev).unwrap();
                ev.clear();
            }
        }
        Kind::PlainMmsg => {
            use std::os::fd::AsRawFd;
            let base = mem.tx.base + mem.tx.pool_off;
            let iovs: Vec<[libc::iovec; 2]> = (0..64)
                .map(|k| {
                    [
                        libc::iovec {
                            iov_base: hdr.as_ptr() as *mut libc::c_void,
                            iov_len: 16,
                        },
                        libc::iovec {
                            iov_base: (base + k * PAYLOAD as usize) as *mut libc::c_void,
                            iov_len: PAYLOAD as usize,
                        },
                    ]
                })
                .collect();
            let msgs: Vec<sys::SendMsg<'_>> = iovs
                .iter()
                .map(|v| sys::SendMsg {
                    dst,
                    iov: v,
                    gso: None,
                })
                .collect();
            while Instant::now() < end {
                let _ = sys::sendmmsg(ss.as_raw_fd(), sys::Family::V4, &msgs);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    rx_thread.join().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let f = lu2k_engine::io::probe::Features::probe();
    let mut kinds = vec![Kind::EpollGso, Kind::PlainMmsg];
    if f.selftest.is_some() {
        kinds.insert(0, Kind::Uring);
        kinds.push(Kind::UringTxEpollRx);
        kinds.push(Kind::EpollTxUringRx);
    } else {
        eprintln!("io_uring fast path unavailable: {:?}", f.selftest_error);
    }
    println!("raw UDP loopback blast, 1472-byte datagrams, median of {runs} runs of {secs} s (Gbit/s received)");
    for k in kinds {
        // Interleave would be fairer on a noisy machine; runs are short and repeated.
        let v: Vec<f64> = (0..runs).map(|_| run(k, secs)).collect();
        let name = match k {
            Kind::Uring => "io_uring SENDMSG(_ZC auto)+GSO / multishot recvmsg+GRO",
            Kind::UringTxEpollRx => "io_uring send / epoll recvmmsg+GRO",
            Kind::EpollTxUringRx => "epoll sendmmsg / io_uring multishot recv",
            Kind::EpollGso => "epoll sendmmsg+GSO / recvmmsg+GRO",
            Kind::PlainMmsg => "plain sendmmsg / recvmmsg (no GSO, no GRO)",
        };
        println!(
            "{name:<52} median {:>7.2}  runs {:?}",
            median(v.clone()),
            v.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
}
