//! The SO_REUSEPORT steering program on real sockets: a group of N sockets on one
//! port, datagrams from many loopback source addresses, each must arrive on the
//! socket the ABI's shard function names for its source. IPv4 sockets with IPv4
//! sources; and (as root, in a network namespace whose loopback carries 40 IPv6
//! addresses) dual-stack IPv6 sockets with IPv6 and IPv4 sources mixed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::process::Command;

use lu2k_engine::io::sys::{self, SockOpts};
use lu2k_engine::steer;

mod common;
use common::{reuseport_group, sh, steered};

#[test]
fn packets_land_on_the_core_the_shard_function_names() {
    for cores in [2u32, 3, 4] {
        let (socks, port) = reuseport_group(cores, &steer::program(cores));
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

/// A dual-stack IPv6 group (`[::]:port`, `IPV6_V6ONLY` off) of `cores` sockets.
fn group6(cores: u32) -> (Vec<UdpSocket>, u16) {
    let opts = SockOpts {
        reuseport: true,
        sndbuf: 1 << 20,
        rcvbuf: 1 << 20,
        gro: false,
    };
    let any = |port| SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    let (first, local) = sys::udp_socket6(any(0), false, &opts).unwrap();
    let port = local.port();
    let mut fds = vec![first];
    for _ in 1..cores {
        fds.push(sys::udp_socket6(any(port), false, &opts).unwrap().0);
    }
    (steered(fds, &steer::program(cores)), port)
}

const V6_HOSTS: u16 = 40;
const INNER: &str = "LU2K_STEERING_IPV6_INNER";

fn v6_host(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, i, i.wrapping_mul(0x9e37))
}

/// The body, run inside the namespace: every source lands where [`steer::shard_ip`]
/// says, IPv6 and IPv4 (as IPv4-mapped) alike.
fn ipv6_inner() {
    for cores in [2u32, 3, 4] {
        let (socks, port) = group6(cores);
        let mut per_core = vec![Vec::new(); cores as usize];
        for i in 1..=V6_HOSTS {
            let src = IpAddr::V6(v6_host(i));
            let s = UdpSocket::bind((src, 0)).unwrap();
            s.send_to(&i.to_be_bytes(), (Ipv6Addr::LOCALHOST, port))
                .unwrap();
            per_core[steer::shard_ip(src, cores) as usize].push(i);
        }
        for i in 1..=V6_HOSTS {
            let v4 = Ipv4Addr::new(127, 0, (i / 7 + 1) as u8, i as u8);
            let s = UdpSocket::bind((v4, 0)).unwrap();
            s.send_to(&(1000 + i).to_be_bytes(), (Ipv4Addr::LOCALHOST, port))
                .unwrap();
            per_core[steer::shard_v4(v4, cores) as usize].push(1000 + i);
        }
        let mut cores_used = 0;
        for (core, expect) in per_core.iter_mut().enumerate() {
            expect.sort();
            cores_used += usize::from(!expect.is_empty());
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            while got.len() < expect.len() {
                let (n, from) = socks[core].recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!("core {core} of {cores}: {e}; got {got:?} want {expect:?}")
                });
                assert_eq!(n, 2);
                let SocketAddr::V6(from) = from else {
                    panic!("a dual-stack socket reports IPv6 addresses")
                };
                assert_eq!(
                    steer::shard_ip(IpAddr::V6(*from.ip()), cores) as usize,
                    core,
                    "{from} on core {core}"
                );
                got.push(u16::from_be_bytes([buf[0], buf[1]]));
            }
            got.sort();
            assert_eq!(&got, expect, "core {core} of {cores}");
        }
        assert_eq!(cores_used, cores as usize, "80 sources leave no core empty");
        for s in &socks {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 8];
            assert!(s.recv_from(&mut buf).is_err());
        }
    }
}

/// `ip -n ns args`.
fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    sh("ip", &[&["-n", ns], args].concat())
}

#[test]
fn ipv6_and_dual_stack_sources_land_on_the_core_the_shard_function_names() {
    if std::env::var_os(INNER).is_some() {
        return ipv6_inner();
    }
    let ns = format!("lu2k-steer6-{}", std::process::id());
    let made = Command::new("ip").args(["netns", "add", &ns]).output();
    match made {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIP ipv6_and_dual_stack_sources_land_on_the_core_the_shard_function_names: \
                 a network namespace is needed for 40 IPv6 source addresses (root): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!(
                "SKIP ipv6_and_dual_stack_sources_land_on_the_core_the_shard_function_names: \
                 no ip(8): {e}"
            );
            return;
        }
    }
    let setup = || -> Result<(), String> {
        ip(&ns, &["link", "set", "lo", "up"])?;
        for i in 1..=V6_HOSTS {
            let a = format!("{}/128", v6_host(i));
            ip(&ns, &["addr", "add", &a, "dev", "lo", "nodad"])?;
        }
        Ok(())
    };
    let result = setup().and_then(|()| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let st = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .args([
                "--exact",
                "ipv6_and_dual_stack_sources_land_on_the_core_the_shard_function_names",
                "--nocapture",
            ])
            .env(INNER, "1")
            .status()
            .map_err(|e| e.to_string())?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("the test inside {ns} failed: {st}"))
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    result.unwrap();
}
