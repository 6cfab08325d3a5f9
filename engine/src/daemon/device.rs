//! `lu2k-engine device`: instances of the kernel module's `/dev/lu2k`.
//!
//! An instance is one shared region (its NIDs, ring sets and pools) that an engine
//! attaches to with `--kshim device:/dev/lu2k,instance=N` and that lu2klnd binds an
//! LNet NI to by NID. The module makes one per `LU2K_IOC_CREATE`; this is the
//! operator's way to issue it (and to look at or remove an instance) without writing
//! code. The module checks every field itself; the checks here only name a bad
//! value in the operator's terms before the ioctl refuses it with a bare errno.

use std::path::Path;

use anyhow::{bail, ensure, Context};
use lu2k_ring_abi::attach::device::{self, Create, MAX_NIDS};
use lu2k_ring_abi::Nid;

/// What an instance is made of; [`Spec::create`] turns it into the ioctl's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// This node's NIDs (the first is the source of the module's selftest traffic).
    pub nids: Vec<Nid>,
    /// Ring sets (one per engine core), 1..=16.
    pub cores: u32,
    /// Cores each peer's messages are spread over (1: one connection per peer).
    pub conns_per_peer: u32,
    /// TX pool slots of 1 MiB: messages in flight at once.
    pub tx_slots: u32,
    /// RX buffers of `rx_buf_size` bytes, for all cores together.
    pub rx_buffers: u32,
    /// RX buffer size, bytes (a multiple of 64).
    pub rx_buf_size: u32,
}

/// Ring sets the module serves at most (`LU2K_DEV_MAX_CORES`).
pub const MAX_CORES: u32 = 16;
/// TX slots asked for at least: the module keeps two for GET replies and
/// needs more than one beside them.
pub const MIN_TX_SLOTS: u32 = 4;
/// TX slots asked for at most: 64 GiB of pool, far above what a module's
/// vmalloc'd region holds, and far below where the ring size would overflow.
pub const MAX_TX_SLOTS: u32 = 1 << 16;

impl Spec {
    /// The ioctl's record, or an error that names the bad value and the fix.
    pub fn create(&self) -> anyhow::Result<Create> {
        ensure!(
            !self.nids.is_empty(),
            "an instance needs at least one NID (--nid 10.0.0.1@lu2k)"
        );
        ensure!(
            self.nids.len() <= MAX_NIDS,
            "{} NIDs given; an instance holds at most {MAX_NIDS}",
            self.nids.len()
        );
        ensure!(
            (1..=MAX_CORES).contains(&self.cores),
            "--cores {}: the module serves 1 to {MAX_CORES} ring sets",
            self.cores
        );
        ensure!(
            (1..=self.cores).contains(&self.conns_per_peer),
            "--conns-per-peer {}: must be 1 to --cores ({})",
            self.conns_per_peer,
            self.cores
        );
        ensure!(
            (MIN_TX_SLOTS..=MAX_TX_SLOTS).contains(&self.tx_slots),
            "--tx-slots {}: {MIN_TX_SLOTS} to {MAX_TX_SLOTS} slots of 1 MiB (the module keeps \
             some for replies)",
            self.tx_slots
        );
        ensure!(
            self.rx_buf_size >= 4096 && self.rx_buf_size % 64 == 0,
            "--rx-buf-size {}: a multiple of 64 bytes, at least 4096",
            self.rx_buf_size
        );
        ensure!(
            self.rx_buffers >= self.cores,
            "--rx-buffers {}: at least one per core ({})",
            self.rx_buffers,
            self.cores
        );
        let mut c = Create {
            cores: self.cores,
            conns_per_peer: self.conns_per_peer,
            nid_count: self.nids.len() as u32,
            // Every ring holds what the TX pool can put in flight, at least 1024.
            ring_entries: self.tx_slots.next_power_of_two().max(1024),
            tx_slots: self.tx_slots,
            rx_buf_size: self.rx_buf_size,
            rx_buf_count: self.rx_buffers,
            rx_tables_per_core: 64,
            ..Create::default()
        };
        c.nids[..self.nids.len()].copy_from_slice(&self.nids);
        Ok(c)
    }
}

/// Makes an instance on the device at `path`; returns its number and region size.
pub fn create(path: &Path, spec: &Spec) -> anyhow::Result<(u32, u64)> {
    let mut c = spec.create()?;
    let fd = open(path)?;
    device::create(std::os::fd::AsFd::as_fd(&fd), &mut c).with_context(|| {
        format!(
            "{}: creating the instance of {} (the kernel log says why the module refused it)",
            path.display(),
            spec.nids[0]
        )
    })?;
    Ok((c.instance, c.region_size))
}

/// An instance's configuration and counters, as text.
pub fn show(path: &Path, instance: u32) -> anyhow::Result<String> {
    let fd = open(path)?;
    let fd = std::os::fd::AsFd::as_fd(&fd);
    let info = device::info(fd, instance)
        .with_context(|| format!("{}: no instance {instance}", path.display()))?;
    let s = device::stats(fd, instance)
        .with_context(|| format!("{}: stats of instance {instance}", path.display()))?;
    let nids: Vec<String> = info.nids[..(info.nid_count as usize).min(MAX_NIDS)]
        .iter()
        .map(|n| n.to_string())
        .collect();
    Ok(format!(
        "instance {instance}: {} ({} cores, region {} MiB), engine {}\n\
         tx sent {}  ok {}  failed {}  failed back (engine gone) {}\n\
         rx messages {}  bytes {}\n\
         refused from the engine: completions {}  rx descriptors {}  ring indices {}\n",
        nids.join(" "),
        info.cores,
        info.region_size >> 20,
        if s.attached == 1 {
            "attached"
        } else {
            "not attached"
        },
        s.tx_sent,
        s.tx_ok,
        s.tx_failed,
        s.tx_engine_gone,
        s.rx_msgs,
        s.rx_bytes,
        s.bad_completions,
        s.bad_rx,
        s.bad_index,
    ))
}

/// Removes an instance (the module refuses while an engine is attached).
pub fn destroy(path: &Path, instance: u32) -> anyhow::Result<()> {
    let fd = open(path)?;
    device::destroy(std::os::fd::AsFd::as_fd(&fd), instance).with_context(|| {
        format!(
            "{}: removing instance {instance} (EBUSY: an engine is attached; stop it first)",
            path.display()
        )
    })
}

fn open(path: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    if !path.exists() {
        bail!(
            "{} does not exist: load the module first (insmod lu2k_kshim.ko; see the README's \
             \"The kernel module\")",
            path.display()
        );
    }
    device::open(path).with_context(|| format!("opening {} (root only)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            nids: vec!["10.0.0.1@lu2k".parse().unwrap()],
            cores: 2,
            conns_per_peer: 1,
            tx_slots: 64,
            rx_buffers: 2048,
            rx_buf_size: 64 << 10,
        }
    }

    #[test]
    fn the_record_carries_the_spec() {
        let mut s = spec();
        s.nids.push("2001:db8::1@lu2k".parse().unwrap());
        let c = s.create().unwrap();
        assert_eq!((c.cores, c.conns_per_peer, c.nid_count), (2, 1, 2));
        assert_eq!(c.nids[0], s.nids[0]);
        assert_eq!(c.nids[1], s.nids[1]);
        assert_eq!(
            (c.tx_slots, c.rx_buf_count, c.rx_buf_size),
            (64, 2048, 64 << 10)
        );
        assert!(c.ring_entries.is_power_of_two() && c.ring_entries >= 1024);
        let big = Spec {
            tx_slots: 3000,
            ..spec()
        };
        assert_eq!(big.create().unwrap().ring_entries, 4096);
    }

    #[test]
    fn bad_values_are_named() {
        let cases: [(Spec, &str); 7] = [
            (
                Spec {
                    nids: vec![],
                    ..spec()
                },
                "at least one NID",
            ),
            (
                Spec {
                    cores: 17,
                    ..spec()
                },
                "--cores 17",
            ),
            (
                Spec {
                    conns_per_peer: 3,
                    ..spec()
                },
                "--conns-per-peer 3",
            ),
            (
                Spec {
                    tx_slots: 0,
                    ..spec()
                },
                "--tx-slots 0",
            ),
            (
                Spec {
                    tx_slots: u32::MAX,
                    ..spec()
                },
                "--tx-slots 4294967295",
            ),
            (
                Spec {
                    rx_buf_size: 1000,
                    ..spec()
                },
                "--rx-buf-size 1000",
            ),
            (
                Spec {
                    rx_buffers: 1,
                    ..spec()
                },
                "--rx-buffers 1",
            ),
        ];
        for (s, want) in cases {
            let e = s.create().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} does not name {want:?}");
        }
        let many = Spec {
            nids: vec![spec().nids[0]; MAX_NIDS + 1],
            ..spec()
        };
        assert!(many.create().unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn a_missing_device_says_to_load_the_module() {
        let e = create(Path::new("/nonexistent/lu2k"), &spec()).unwrap_err();
        assert!(format!("{e:#}").contains("load the module"), "{e:#}");
    }
}
