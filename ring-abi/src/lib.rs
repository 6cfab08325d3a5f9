//! # lu2k-ring-abi — the contract between kshim and the engine
//!
//! kshim (the kernel half of the LND, here in userspace) and the engine (the io_uring
//! data-plane daemon) depend on this crate and on nothing of each other. It owns
//! everything both halves must agree on: the region layout, the rings, the
//! descriptors, the attach handshake that hands the region over ([`attach`]), the NIDs
//! the descriptors carry ([`nid`]) and the shared constants ([`MAX_PAYLOAD`],
//! [`LNET_HDR_LEN`]).
//!
//! The two halves share one memory region: a sealed memfd both map. It holds, per
//! core, four single-producer single-consumer rings of fixed-size descriptors, plus the
//! payload pools the descriptors point into. Offsets only, no pointers; every record is
//! `#[repr(C)]` with fixed-width fields, so a kernel module can implement the same ABI
//! (`include/lu2k_ring.h`, checked against these types by a test).
//!
//! ```text
//!  offset 0
//!  ┌────────────────────────────────────────────┐
//!  │ RegionHeader (256 B)                        │ magic "LU2KRING", ABI 2.0, total size,
//!  │                                             │ features, cores, pool table
//!  ├────────────────────────────────────────────┤ core_table_off
//!  │ CoreEntry[cores] (96 B each)                │ per core: control block offset, 4 × RingInfo
//!  ├────────────────────────────────────────────┤   (offset, entries, slot size), RX table share
//!  │ ControlBlock[core 0] (12 × 64 B lines)      │ tx_prod | tx_cons | tx_done_prod | tx_done_cons
//!  │ ControlBlock[core 1] ...                    │ rx_prod | rx_cons | rx_ret_prod | rx_ret_cons
//!  │                                             │ to_engine need_wakeup | futex
//!  │                                             │ to_kshim  need_wakeup | futex
//!  ├────────────────────────────────────────────┤
//!  │ core 0: TX ring      TxDesc[n]      (192 B) │ kshim  → engine  send descriptors
//!  │         TX done ring TxCompletion[n] (16 B) │ engine → kshim   completions
//!  │         RX ring      RxDesc[n]      (192 B) │ engine → kshim   receive descriptors
//!  │         RX ret ring  RxReturn[n]      (8 B) │ kshim  → engine  buffers given back
//!  │ core 1: ...                                 │
//!  ├────────────────────────────────────────────┤ tx_pool_off (page aligned)
//!  │ TX pool (kshim writes: payload, ext tables) │
//!  ├────────────────────────────────────────────┤ rx_tables_off
//!  │ RX extent tables (engine writes), 16 KiB    │ per core a share of 1024-extent tables
//!  │ each                                        │
//!  ├────────────────────────────────────────────┤ rx_pool_off
//!  │ RX pool: rx_buf_count × rx_buf_size         │ engine's receive buffers (io_uring
//!  │                                             │ provided buffers), payload in place
//!  └────────────────────────────────────────────┘ total_size
//! ```
//!
//! ## Layers and guarantees
//!
//! - [`layout`]: the header, the core table, the layout algorithm and header validation
//!   ([`layout::LayoutError`]). A mapper validates a private copy once.
//! - [`desc`]: the descriptors and their validation ([`desc::DescError`]). Nothing in the
//!   region is trusted; consumers validate private copies (TOCTOU-safe).
//! - [`ring`]: SPSC cursors ([`ring::Producer`], [`ring::Consumer`]) with batching,
//!   cached opposite indices and Acquire/Release publication.
//! - [`doorbell`] and [`protocol`]: need-wakeup flags, eventfds and futex words; no lost
//!   wakeups, no syscalls while the consumer is awake.
//! - [`region`]: the memfd, the mapping, per-core typed handles, pool access.
//! - [`shard`]: which core owns a peer; [`stripe`]: which of its `conns_per_peer`
//!   cores carries one message.
//! - [`attach`]: the Unix-socket handshake (HELLO with the memfd and the eventfds,
//!   ACK, NOTICE) by which an engine attaches to kshim; its decoders never panic.
//! - [`rx_pool`]: how many RX buffers a path needs (the rule both halves apply);
//!   [`tx_pool`]: how large a TX pool a path needs (the kshim's rule).
//! - [`nid`]: LNet NIDs ([`Nid`], [`Net`], [`LndType`]): 24 bytes mirroring Lustre's
//!   large NID (IPv4 and IPv6 addresses), their text form (`10.0.0.1@lu2k`,
//!   `fd00::1@lu2k`); every NID4 and every valid IPv6 NID round-trips through the text.
//!
//! `unsafe` lives only in the private `shm` module (the mapping and raw slot/word
//! access); every block there says why it is sound against a hostile peer. The attach
//! handshake passes descriptors with rustix's safe `SCM_RIGHTS` API.

#![deny(unsafe_code)]

pub mod desc;
pub mod layout;
pub mod nid;
pub mod protocol;
pub mod rx_pool;
pub mod tx_pool;

#[cfg(not(loom))]
pub mod attach;
#[cfg(not(loom))]
pub mod doorbell;
#[cfg(not(loom))]
pub mod region;
#[cfg(not(loom))]
pub mod ring;
#[cfg(not(loom))]
mod shm;

pub use desc::{
    DescError, Extent, ExtentBuf, Pool, RxDesc, RxFlags, RxReturn, TxCompletion, TxDesc, TxFlags,
    TxStatus, ValidRx, ValidTx, LNET_HDR_LEN,
};
pub use layout::{Config, Features, Layout, LayoutError};
pub use nid::{LndType, Net, Nid, NidError, NID_BYTES};

#[cfg(not(loom))]
pub use doorbell::{Eventfds, FutexWord, Notifier, WaitMode, Waiter, Wake};
#[cfg(not(loom))]
pub use region::{EngineCore, KshimCore, Region, RegionError, Side};
#[cfg(not(loom))]
pub use ring::{Consumer, Producer, RingError};

/// Largest payload of one message in bytes (LNet: 1 MiB), as a `usize` for sizing
/// buffers; [`layout::MAX_PAYLOAD`] is the same bound as the `u32` the descriptors
/// carry.
pub const MAX_PAYLOAD: usize = layout::MAX_PAYLOAD as usize;

/// The multiplier of [`shard`]: 2^32 / φ, rounded to odd (Knuth's multiplicative hash).
pub const SHARD_MULTIPLIER: u32 = 0x9E37_79B1;

/// Which core owns peer `nid`, in `0..cores`. Both sides call this; the engine also
/// reproduces it in a classic-BPF `SO_REUSEPORT` program so a peer's datagrams land on
/// the core that owns it.
///
/// Exactly: let `key` = [`Nid::shard_key`]: for a NID4 its 32-bit address (the peer's
/// IPv4 address as a host-order integer, e.g. `192.168.1.5` = `0xC0A8_0105`; BPF's
/// `ld [off]` loads the source address in this order), for an IPv6 NID the XOR of the
/// address's four big-endian 32-bit words. Then
///
/// ```text
///   shard = ((key * 0x9E3779B1 mod 2^32) >> 16) mod cores
/// ```
///
/// using only 32-bit multiply, shift and modulo (BPF `ALU|MUL|K`, `ALU|RSH|K`,
/// `ALU|MOD|K`; the IPv6 fold is `ALU|XOR|X`). `cores == 0` is treated as 1.
pub fn shard(nid: Nid, cores: u32) -> u32 {
    shard_key(nid.shard_key(), cores)
}

/// The shard function on a key already folded to 32 bits ([`Nid::shard_key`]).
pub fn shard_key(key: u32, cores: u32) -> u32 {
    (key.wrapping_mul(SHARD_MULTIPLIER) >> 16) % cores.max(1)
}

/// Which core carries message `cookie` to a peer whose [`shard`] is `home`, when the
/// producer spreads each peer over `conns_per_peer` cores (socklnd's `conns_per_peer`;
/// the region header announces it, [`layout::Layout::conns_per_peer`]). Both producers
/// (userspace kshim and the kernel module) call this; the engine needs no copy of it:
/// a core keeps its own connection to each peer it is handed messages for.
///
/// Exactly, with `n = min(max(conns_per_peer, 1), max(cores, 1))` and the cookie folded
/// to 32 bits, `k = (cookie ^ (cookie >> 32)) mod 2^32`:
///
/// ```text
///   stripe = (home + ((k * 0x9E3779B1 mod 2^32) >> 16) mod n) mod cores
/// ```
///
/// so a peer's `n` cores are consecutive from its home core, and its messages spread
/// over them by a hash of the cookie (unique per message in flight; both producers
/// already make one): no per-peer state and no lock on the send path, the same answer
/// in C (`lu2k_stripe`) and Rust. `conns_per_peer == 1` is `home`. LNet requires no
/// order between messages, so messages of one peer on different cores may complete in
/// any order.
pub fn stripe(home: u32, cores: u32, conns_per_peer: u32, cookie: u64) -> u32 {
    let cores = cores.max(1);
    let n = conns_per_peer.clamp(1, cores);
    let k = (cookie ^ (cookie >> 32)) as u32;
    let idx = (k.wrapping_mul(SHARD_MULTIPLIER) >> 16) % n;
    (home % cores + idx) % cores
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_is_home_for_one_conn_and_spreads_a_peer_over_n_cores() {
        for cookie in 0..1000u64 {
            assert_eq!(stripe(3, 4, 1, cookie), 3);
            assert_eq!(stripe(3, 4, 0, cookie), 3);
        }
        for (cores, n, home) in [(2u32, 2u32, 1u32), (4, 2, 3), (4, 4, 0), (3, 8, 2)] {
            let n_eff = n.min(cores);
            let mut hits = vec![0u32; cores as usize];
            // Cookies as both producers make them: a generation above a slot index.
            for gen in 1..=64u64 {
                for slot in 0..16u64 {
                    hits[stripe(home, cores, n, (gen << 32) | slot) as usize] += 1;
                }
            }
            for (core, h) in hits.iter().enumerate() {
                let off = (core as u32 + cores - home) % cores;
                if off < n_eff {
                    // 1024 messages over n_eff cores: each within a third of its share.
                    let share = 1024 / n_eff;
                    assert!(
                        *h > share * 2 / 3 && *h < share * 4 / 3,
                        "{cores} {n} {hits:?}"
                    );
                } else {
                    assert_eq!(*h, 0, "{cores} {n} {hits:?}");
                }
            }
        }
        // Recomputed from the formula with 64-bit arithmetic.
        let cookie = (7u64 << 32) | 3;
        let k = (cookie ^ (cookie >> 32)) & 0xFFFF_FFFF;
        let idx = ((k * 0x9E37_79B1) & 0xFFFF_FFFF) >> 16;
        assert_eq!(u64::from(stripe(3, 4, 2, cookie)), (3 + idx % 2) % 4);
    }

    #[test]
    fn shard_depends_only_on_the_address_and_stays_in_range() {
        for cores in 1..=16u32 {
            for addr in [0u32, 1, 0xC0A8_0105, 0x0A00_0001, u32::MAX] {
                let a = shard_key(addr, cores);
                let b = shard(
                    Nid::from_nid4((0x0002_0005u64 << 32) | u64::from(addr)),
                    cores,
                );
                let c = shard(Nid::new(Net::new(LndType::LU2K, 9), addr), cores);
                assert_eq!(a, b);
                assert_eq!(a, c);
                assert!(a < cores);
            }
        }
        assert_eq!(shard_key(7, 0), 0);
    }

    #[test]
    fn shard_matches_the_documented_formula_and_spreads_a_subnet() {
        // 192.168.1.5, recomputed independently with 64-bit arithmetic.
        let addr: u32 = 0xC0A8_0105;
        let prod = (u64::from(addr) * 0x9E37_79B1) & 0xFFFF_FFFF;
        assert_eq!(shard_key(addr, 4), ((prod >> 16) % 4) as u32);
        // A /24 of peers spreads over 4 cores without leaving any core empty.
        let mut count = [0u32; 4];
        for host in 1..=254u32 {
            count[shard_key(0xC0A8_0100 | host, 4) as usize] += 1;
        }
        assert!(count.iter().all(|&c| c > 30), "{count:?}");
        // So does a run of IPv6 hosts in one /64.
        let net = Net::new(LndType::LU2K, 0);
        let mut count = [0u32; 4];
        for host in 1..=254u16 {
            let ip = std::net::Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, host);
            count[shard(Nid::from_net_ipv6(net, ip), 4) as usize] += 1;
        }
        assert!(count.iter().all(|&c| c > 30), "{count:?}");
    }
}
