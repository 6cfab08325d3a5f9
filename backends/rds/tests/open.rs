//! `Socket::open` against this machine's real kernel.
//!
//! Where the kernel has no RDS (this build machine: Linux 6.18 without the rds
//! modules and without module loading), open must fail with `OpenError::RdsMissing`
//! and a message that says what to do. Where it has RDS (the kernel lab's VM, or a
//! machine with `rds_tcp` loaded), the missing-RDS assertions are skipped loudly and a
//! real message goes through instead.

use lu2k_rds::{Config, OpenError, Socket};
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4};

/// An independent oracle: the kernel lists every registered socket protocol in
/// /proc/net/protocols; RDS registers as "RDS".
fn kernel_lists_rds() -> bool {
    std::fs::read_to_string("/proc/net/protocols")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().next() == Some("RDS"))
        })
        .unwrap_or(false)
}

#[test]
fn open_on_a_kernel_without_rds_says_rds_is_missing_and_what_to_do() {
    let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    match Socket::open(local, &Config::default()) {
        Err(OpenError::RdsMissing { errno }) => {
            assert!(
                !kernel_lists_rds(),
                "open said RDS is missing but /proc/net/protocols lists RDS"
            );
            assert_eq!(errno, libc::EAFNOSUPPORT, "socket(AF_RDS) errno");
            let msg = OpenError::RdsMissing { errno }.to_string();
            assert_eq!(
                msg,
                "RDS is missing from this kernel (socket(AF_RDS) failed with \
                 EAFNOSUPPORT (97)): load the kernel modules rds and rds_tcp \
                 (`modprobe rds_tcp` loads both), or use `--backend udt`, which works \
                 on this kernel"
            );
            assert_eq!(lu2k_rds::probe(), Err(OpenError::RdsMissing { errno }));
        }
        Err(OpenError::TcpTransportMissing { errno }) => {
            eprintln!(
                "SKIP (missing-RDS assertions): this kernel has RDS but not rds_tcp \
                 (SO_RDS_TRANSPORT: errno {errno}); load rds_tcp to test a real send here"
            );
            assert!(kernel_lists_rds());
        }
        Err(other) => panic!("unexpected open error: {other}"),
        Ok(sock) => {
            eprintln!(
                "SKIP (missing-RDS assertions): this kernel has RDS with rds_tcp; \
                 checking a loopback message instead"
            );
            assert!(kernel_lists_rds());
            let rx = Socket::open(local, &Config::default()).expect("second RDS socket");
            let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
            let hdr = [0xA5u8; 72];
            let n = sock
                .send(
                    rx.local_addr(),
                    &[IoSlice::new(&hdr), IoSlice::new(&payload)],
                )
                .expect("send");
            assert_eq!(n, hdr.len() + payload.len());
            let mut h = [0u8; 72];
            let mut p = vec![0u8; payload.len()];
            let got = rx
                .recv(&mut [IoSliceMut::new(&mut h), IoSliceMut::new(&mut p)])
                .expect("recv");
            assert_eq!(got.len, n);
            assert_eq!(got.from, sock.local_addr());
            assert_eq!((h, p), (hdr, payload));
        }
    }
}
