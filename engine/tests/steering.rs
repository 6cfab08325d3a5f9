//! The SO_REUSEPORT steering program on real sockets: a group of N sockets on one
//! port, datagrams from many loopback source addresses, each must arrive on the
//! socket the ABI's shard function names for its source.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use lu2k_engine::io::sys::{self, SockOpts};
use lu2k_engine::steer;

fn group(cores: u32) -> (Vec<UdpSocket>, u16) {
    let opts = SockOpts {
        reuseport: true,
        sndbuf: 1 << 20,
        rcvbuf: 1 << 20,
        gro: false,
    };
    let (first, info) = sys::udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), &opts).unwrap();
    let port = info.local.port();
    let mut fds = vec![first];
    for _ in 1..cores {
        let (fd, _) = sys::udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), &opts).unwrap();
        fds.push(fd);
    }
    sys::attach_reuseport_cbpf(&fds[0], &steer::program(cores)).unwrap();
    let socks = fds
        .into_iter()
        .map(|fd| {
            let s = UdpSocket::from(fd);
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .collect();
    (socks, port)
}

#[test]
fn packets_land_on_the_core_the_shard_function_names() {
    for cores in [2u32, 3, 4] {
        let (socks, port) = group(cores);
        let mut per_core = vec![Vec::new(); cores as usize];
        for i in 1..=40u8 {
            let src = Ipv4Addr::new(127, 0, i / 7 + 1, i);
            let s = UdpSocket::bind((src, 0)).unwrap();
            s.send_to(&[i], (Ipv4Addr::LOCALHOST, port)).unwrap();
            let want = lu2k_ring_abi::shard(
                lu2k_ring_abi::Nid::from_net_ip(lu2k_ring_abi::Net(0), src),
                cores,
            );
            assert_eq!(want, steer::shard_v4(src, cores));
            per_core[want as usize].push(i);
        }
        for (core, expect) in per_core.iter().enumerate() {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            while got.len() < expect.len() {
                let (n, from) = socks[core].recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!("core {core} of {cores}: {e}; got {got:?} want {expect:?}")
                });
                assert_eq!(n, 1);
                let std::net::SocketAddr::V4(from) = from else {
                    panic!()
                };
                assert_eq!(steer::shard_v4(*from.ip(), cores) as usize, core);
                got.push(buf[0]);
            }
            got.sort();
            assert_eq!(&got, expect, "core {core} of {cores}");
        }
        // Nothing landed anywhere else.
        for s in &socks {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 8];
            assert!(s.recv_from(&mut buf).is_err());
        }
    }
}
