//! Which core owns a peer, and how its packets reach that core.
//!
//! **Choice: one UDP port, an `SO_REUSEPORT` group of one socket per core, and a
//! classic-BPF steering program.** Every core binds the same address and port; the
//! program the kernel runs for each arriving datagram loads the IPv4 *source* address
//! and computes the ABI's shard function on it, returning the index of the socket
//! (= core) in the group. Peers therefore need to know one port only (no per-core
//! ports announced in handshakes), UDT4 peers interoperate unchanged, and the core that
//! receives a peer's data and ACKs is the one kshim sends that peer's descriptors to.
//!
//! The program is `ld [net+12]; mul #M; rsh #S; mod #cores; ret a` — 32-bit
//! arithmetic, which is why the ABI's shard function is defined with 32-bit wrapping
//! multiply, shift and modulo. [`program`] builds it; the tests check it on real
//! sockets against [`shard_v4`] for many source addresses.
//!
//! Caveat, stated where it matters: a peer's packets must come *from* its NID address.
//! Behind NAT they would come from another address and land on another core; such
//! packets are still handled correctly by the owning core's connection lookup only if
//! it is the same core, so NAT between lu2k nodes is not supported (as in LNet).

use std::net::Ipv4Addr;

use crate::io::sys::BpfInsn;

/// Multiplier of the shard hash: the ABI's ([`lu2k_ring_abi::SHARD_MULTIPLIER`]).
pub const SHARD_MUL: u32 = lu2k_ring_abi::SHARD_MULTIPLIER;
/// Right shift applied after the multiply.
pub const SHARD_SHIFT: u32 = 16;

/// The ABI's shard function ([`lu2k_ring_abi::shard`]) on an IPv4 address: core
/// index in `0..cores`.
pub fn shard_v4(ip: Ipv4Addr, cores: u32) -> u32 {
    lu2k_ring_abi::shard(u64::from(u32::from(ip)), cores)
}

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_ALU: u16 = 0x04;
const BPF_K: u16 = 0x00;
const BPF_MUL: u16 = 0x20;
const BPF_RSH: u16 = 0x70;
const BPF_MOD: u16 = 0x90;
const BPF_RET: u16 = 0x06;
const BPF_A: u16 = 0x10;
/// `SKF_NET_OFF`: loads relative to the network (IP) header.
const SKF_NET_OFF: i32 = -0x100000;

fn insn(code: u16, k: u32) -> BpfInsn {
    BpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The classic-BPF `SO_ATTACH_REUSEPORT_CBPF` program computing [`shard_v4`] on the
/// source address for `cores` sockets.
pub fn program(cores: u32) -> Vec<BpfInsn> {
    vec![
        // A = IPv4 source address (bytes 12..16 of the IP header), big-endian load.
        insn(BPF_LD | BPF_W | BPF_ABS, (SKF_NET_OFF + 12) as u32),
        insn(BPF_ALU | BPF_MUL | BPF_K, SHARD_MUL),
        insn(BPF_ALU | BPF_RSH | BPF_K, SHARD_SHIFT),
        insn(BPF_ALU | BPF_MOD | BPF_K, cores.max(1)),
        insn(BPF_RET | BPF_A, 0),
    ]
}

/// Runs `prog` on an IPv4 source address the way the kernel would (only the
/// instructions [`program`] emits), for tests and for `probe` output.
pub fn eval(prog: &[BpfInsn], src: Ipv4Addr) -> Option<u32> {
    let mut a: u32 = 0;
    for i in prog {
        match i.code {
            c if c == BPF_LD | BPF_W | BPF_ABS && i.k == (SKF_NET_OFF + 12) as u32 => {
                a = u32::from(src)
            }
            c if c == BPF_ALU | BPF_MUL | BPF_K => a = a.wrapping_mul(i.k),
            c if c == BPF_ALU | BPF_RSH | BPF_K => a = a.checked_shr(i.k).unwrap_or(0),
            c if c == BPF_ALU | BPF_MOD | BPF_K => a = a.checked_rem(i.k)?,
            c if c == BPF_RET | BPF_A => return Some(a),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_reproduce_the_abi_function() {
        for a in [0u32, 1, 0x7F00_0001, 0xC0A8_0105, u32::MAX] {
            let ip = Ipv4Addr::from(a);
            assert_eq!(
                (a.wrapping_mul(SHARD_MUL) >> SHARD_SHIFT) % 5,
                shard_v4(ip, 5)
            );
        }
    }

    #[test]
    fn program_matches_shard_function() {
        for cores in 1..=8 {
            let p = program(cores);
            for i in 0..2000u32 {
                let ip = Ipv4Addr::from(i.wrapping_mul(2_654_435_761));
                assert_eq!(eval(&p, ip), Some(shard_v4(ip, cores)));
            }
        }
    }

    #[test]
    fn shard_spreads_neighbouring_addresses() {
        let mut hits = [0u32; 4];
        for i in 1..=200u8 {
            hits[shard_v4(Ipv4Addr::new(10, 0, 0, i), 4) as usize] += 1;
        }
        assert!(hits.iter().all(|h| *h > 20), "{hits:?}");
    }
}
