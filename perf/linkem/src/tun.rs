//! The link emulator between two network namespaces, through TUN devices.
//!
//! ```text
//!   netns {name}-a                  this process                 netns {name}-b
//!  ┌───────────────┐        ┌──────────────────────────┐        ┌───────────────┐
//!  │ 10.77.0.1     │  IP    │  forward Link (A → B)    │  IP    │     10.77.0.2 │
//!  │ dev lu2k0 ────┼───────►│──────────────────────────│───────►┼──── dev lu2k0 │
//!  │ (TUN)         │◄───────│  reverse Link (B → A)    │◄───────┤         (TUN) │
//!  └───────────────┘        └──────────────────────────┘        └───────────────┘
//! ```
//!
//! [`TunLink::spawn`] creates two named network namespaces (with iproute2's
//! `ip netns add`, so `ip netns exec {name}-a …` runs any program on side A),
//! a layer-3 TUN device `lu2k0` in each, with a point-to-point address to the
//! other side, and runs the same real-time loop as the UDP
//! [`Relay`](crate::Relay) between the two devices: every IP packet one side
//! routes to the other crosses the [`Duplex`] model. The kernel's own stacks
//! are at both ends, so TCP (any congestion control), UDP and ICMP all see the
//! same emulated link. The model counts whole IP packets; set `overhead_bytes`
//! for link-layer framing if wanted.
//!
//! Needs root (namespaces, `/dev/net/tun`) and the `ip` program. Dropping the
//! [`TunLink`] closes the devices and deletes the namespaces (and so ends
//! every socket still in them).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;

use crate::config::DuplexConfig;
use crate::duplex::Duplex;
use crate::relay::{Driver, Port, RelayError, RelayStats};

/// Name of the TUN device in each namespace.
pub const DEVICE: &str = "lu2k0";

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), RelayError> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        RelayError::Setup(format!(
            "cannot run `ip` (iproute2): {e}; install iproute2 for the TUN link emulator"
        ))
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RelayError::Setup(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    /// Creates the namespace `name` (`ip netns add`); fails if it exists.
    pub fn create(name: &str) -> Result<Netns, RelayError> {
        ip(&["netns", "add", name])?;
        Ok(Netns {
            name: name.to_owned(),
        })
    }

    /// The namespace's name, for `ip netns exec NAME …` and `ip -n NAME …`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result.
    /// Sockets and devices `f` creates belong to the namespace for good, and
    /// may be used from any thread afterwards.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        let path = format!("/run/netns/{}", self.name);
        let ns = rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        std::thread::scope(|s| {
            s.spawn(|| {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(LinkNameSpaceType::Network),
                )?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `ip netns exec NAME program`: a command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Settings of a [`TunLink`].
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// The link: `forward` is A → B, `reverse` is B → A.
    pub link: DuplexConfig,
    /// Seed of the model's random streams.
    pub seed: u64,
    /// Namespace names are `{name}-a` and `{name}-b`.
    pub name: String,
    /// Side A's address on its device.
    pub a_ip: Ipv4Addr,
    /// Side B's address on its device.
    pub b_ip: Ipv4Addr,
    /// MTU of both devices.
    pub mtu: u32,
    /// See [`RelayConfig::spin`](crate::RelayConfig::spin).
    pub spin: Duration,
    /// See [`RelayConfig::realtime_priority`](crate::RelayConfig::realtime_priority).
    pub realtime_priority: Option<u8>,
}

impl TunConfig {
    /// Sides 10.77.0.1 (A) and 10.77.0.2 (B), MTU 1500, no spin, real-time
    /// priority 40 where permitted.
    pub fn new(link: DuplexConfig, seed: u64, name: &str) -> Self {
        TunConfig {
            link,
            seed,
            name: name.to_owned(),
            a_ip: Ipv4Addr::new(10, 77, 0, 1),
            b_ip: Ipv4Addr::new(10, 77, 0, 2),
            mtu: 1500,
            spin: Duration::ZERO,
            realtime_priority: Some(40),
        }
    }
}

/// A TUN device: one IP packet per read or write.
#[derive(Debug)]
struct TunPort {
    fd: OwnedFd,
}

impl AsFd for TunPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Port for TunPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(n) => return Ok(Some(n)),
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&mut self, packet: &[u8]) -> io::Result<bool> {
        rustix::io::write(&self.fd, packet)?;
        Ok(true)
    }
}

/// Opens a TUN device in `ns` and gives it its addresses.
fn device(ns: &Netns, local: Ipv4Addr, peer: Ipv4Addr, mtu: u32) -> Result<TunPort, RelayError> {
    let fd = ns
        .run(|| -> io::Result<OwnedFd> {
            let fd = rustix::fs::open(
                "/dev/net/tun",
                OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            crate::sys::tun_set_iff(fd.as_fd(), DEVICE)?;
            // No IPv6 chatter (router solicitations, MLD) across the link.
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"),
                "1",
            );
            Ok(fd)
        })?
        .map_err(|e| RelayError::Setup(format!("TUN device in {}: {e}", ns.name())))?;
    let n = ns.name();
    let (local, peer, mtu) = (local.to_string(), format!("{peer}/32"), mtu.to_string());
    ip(&["-n", n, "link", "set", "lo", "up"])?;
    ip(&["-n", n, "addr", "add", &local, "peer", &peer, "dev", DEVICE])?;
    ip(&["-n", n, "link", "set", DEVICE, "mtu", &mtu, "up"])?;
    Ok(TunPort { fd })
}

/// A running TUN link emulator between two network namespaces. Dropping it
/// stops the thread and deletes the namespaces.
#[derive(Debug)]
pub struct TunLink {
    // Dropped in this order: the thread (closing the devices), then the namespaces.
    driver: Driver,
    a: Netns,
    b: Netns,
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
}

impl TunLink {
    /// Creates the namespaces and devices and starts the emulator thread.
    /// Virtual time zero ([`TunLink::epoch`]) is taken when the devices are up.
    pub fn spawn(config: TunConfig) -> Result<TunLink, RelayError> {
        let duplex = Duplex::new(config.link.clone(), config.seed)?;
        let a = Netns::create(&format!("{}-a", config.name))?;
        let b = Netns::create(&format!("{}-b", config.name))?;
        let a_port = device(&a, config.a_ip, config.b_ip, config.mtu)?;
        let b_port = device(&b, config.b_ip, config.a_ip, config.mtu)?;
        let driver = Driver::spawn(
            duplex,
            a_port,
            b_port,
            config.spin,
            config.realtime_priority,
        )?;
        Ok(TunLink {
            driver,
            a,
            b,
            a_ip: config.a_ip,
            b_ip: config.b_ip,
        })
    }

    /// Side A's namespace.
    pub fn a(&self) -> &Netns {
        &self.a
    }

    /// Side B's namespace.
    pub fn b(&self) -> &Netns {
        &self.b
    }

    /// Side A's address.
    pub fn a_ip(&self) -> Ipv4Addr {
        self.a_ip
    }

    /// Side B's address.
    pub fn b_ip(&self) -> Ipv4Addr {
        self.b_ip
    }

    /// Whether the emulator thread runs under real-time scheduling.
    pub fn is_realtime(&self) -> bool {
        self.driver.realtime
    }

    /// The instant virtual time zero corresponds to.
    pub fn epoch(&self) -> std::time::Instant {
        self.driver.epoch
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        self.driver.stats()
    }

    /// Stops the thread and returns the final counters; the namespaces are
    /// deleted when `self` goes.
    pub fn stop(mut self) -> Result<RelayStats, RelayError> {
        self.driver.shutdown()?;
        Ok(self.driver.stats())
    }
}
