//! Which core owns a peer, and how its packets reach that core.
//!
//! **Choice: one UDP port, an `SO_REUSEPORT` group of one socket per core, and a
//! classic-BPF steering program.** Every core binds the same address and port; the
//! program the kernel runs for each arriving datagram loads the IP *source* address
//! and computes the ABI's shard function on it, returning the index of the socket
//! (= core) in the group. Peers therefore need to know one port only (no per-core
//! ports announced in handshakes), UDT4 peers interoperate unchanged, and the core that
//! receives a peer's data and ACKs is the one kshim sends that peer's descriptors to.
//!
//! The program reads the IP version from the network header and computes the key of
//! the ABI's shard function ([`lu2k_ring_abi::Nid::shard_key`]) from the source
//! address: an IPv4 source is the key itself (`ld [net+12]`), an IPv6 source is folded
//! to the XOR of its four words (`ld [net+8]`, `[net+12]`, `[net+16]`, `[net+20]`).
//! Then `mul #M; rsh #S; mod #cores; ret a` — 32-bit arithmetic, which is why the ABI's
//! shard function is defined with 32-bit wrapping multiply, shift and modulo. One
//! program serves IPv4 sockets, IPv6 sockets and dual-stack IPv6 sockets (where IPv4
//! datagrams arrive with an IPv4 header, so an IPv4 peer lands where its IPv4 NID
//! shards). [`program`] builds it; the tests check it on real sockets against
//! [`shard_ip`] for many source addresses of both families.
//!
//! Caveat, stated where it matters: a peer's packets must come *from* its NID address.
//! Behind NAT they would come from another address and land on another core; such
//! packets are still handled correctly by the owning core's connection lookup only if
//! it is the same core, so NAT between lu2k nodes is not supported (as in LNet).
//!
//! # One peer over several cores (`conns_per_peer`)
//!
//! By source address a peer is one core, so `--cores N` cannot speed up one
//! gateway-to-gateway transfer. When kshim spreads each peer over `conns_per_peer > 1`
//! cores ([`lu2k_ring_abi::stripe`], announced in the region header), every core that
//! is handed a peer's messages opens its own UDT connection to it, and the cores steer
//! by *socket ID* instead ([`program_by_socket_id`]):
//!
//! - each core draws its socket IDs from its own class, `id % cores == core`
//!   (`lu2k_udt::conn::Config::socket_id_class`), for the connections it opens and the
//!   ones it accepts;
//! - every UDT packet but a handshake to the listener carries the receiver's socket ID
//!   at bytes 12..16 (data and control alike), so `id % cores` names the owning core; a
//!   sealed datagram ([`crate::transport::seal`]) carries it in its clear header instead
//!   (after the `FF FF` mark, the version byte and the counter, at
//!   [`crate::transport::seal::PLAIN_AT`]), where the program reads it when the mark
//!   is there;
//! - a handshake to the listener carries 0 there; it is steered by the *requester's*
//!   socket ID at bytes 40..44 (the handshake body's `socket ID`, also in clear on the
//!   sealed wire): a client's request, its repeat with the cookie and any later repeat
//!   land on the same core, which accepts it and answers with an ID of its own class.
//!   Two lu2k engines with the same core count therefore pair core i with core i.
//!
//! No state is shared between cores and nothing is looked up across them: the kernel
//! puts each datagram on the core whose connection it belongs to. Reading IDs instead of
//! addresses works for either address family and for a plain UDT4 peer too (its IDs are
//! random: its connections land on whichever core its ID names, and ours answer it from
//! their own class). A datagram shorter than the field it would be steered by cannot be
//! a valid UDT packet; the kernel's load fails and it goes to core 0, which drops it.

use std::net::{IpAddr, Ipv4Addr};

use lu2k_ring_abi::{Net, Nid};

use crate::io::sys::BpfInsn;

/// Multiplier of the shard hash: the ABI's ([`lu2k_ring_abi::SHARD_MULTIPLIER`]).
pub const SHARD_MUL: u32 = lu2k_ring_abi::SHARD_MULTIPLIER;
/// Right shift applied after the multiply.
pub const SHARD_SHIFT: u32 = 16;

/// The ABI's shard function ([`lu2k_ring_abi::shard`]) on an IPv4 address: core
/// index in `0..cores`.
pub fn shard_v4(ip: Ipv4Addr, cores: u32) -> u32 {
    lu2k_ring_abi::shard_key(u32::from(ip), cores)
}

/// The ABI's shard function on the NID of address `ip` (either family; an
/// IPv4-mapped IPv6 address shards as its IPv4 address, as a dual-stack socket's
/// IPv4 peer does). The network does not enter the key.
pub fn shard_ip(ip: IpAddr, cores: u32) -> u32 {
    lu2k_ring_abi::shard(Nid::from_net_addr(Net(0), ip), cores)
}

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_ALU: u16 = 0x04;
const BPF_MISC: u16 = 0x07;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
const BPF_MUL: u16 = 0x20;
const BPF_RSH: u16 = 0x70;
const BPF_MOD: u16 = 0x90;
const BPF_XOR: u16 = 0xa0;
const BPF_JA: u16 = 0x00;
const BPF_TAX: u16 = 0x00;
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

fn net(off: i32) -> u32 {
    (SKF_NET_OFF + off) as u32
}

/// The classic-BPF `SO_ATTACH_REUSEPORT_CBPF` program computing [`shard_ip`] on the
/// source address of an IPv4 or IPv6 datagram for `cores` sockets.
pub fn program(cores: u32) -> Vec<BpfInsn> {
    let ld_w = BPF_LD | BPF_W | BPF_ABS;
    let xor_x = BPF_ALU | BPF_XOR | BPF_X;
    let tax = BPF_MISC | BPF_TAX;
    vec![
        // 0: A = IP version (the high nibble of the first header byte).
        insn(BPF_LD | BPF_B | BPF_ABS, net(0)),
        insn(BPF_ALU | BPF_RSH | BPF_K, 4),
        // 2: IPv6 goes to 5, anything else to the IPv4 load.
        BpfInsn {
            code: BPF_JMP | BPF_JEQ | BPF_K,
            jt: 2,
            jf: 0,
            k: 6,
        },
        // 3: A = IPv4 source address (bytes 12..16 of the IP header), big-endian load.
        insn(ld_w, net(12)),
        // 4: to the hash at 15.
        insn(BPF_JMP | BPF_JA, 10),
        // 5..14: A = XOR of the IPv6 source address's words (bytes 8..24).
        insn(ld_w, net(8)),
        insn(tax, 0),
        insn(ld_w, net(12)),
        insn(xor_x, 0),
        insn(tax, 0),
        insn(ld_w, net(16)),
        insn(xor_x, 0),
        insn(tax, 0),
        insn(ld_w, net(20)),
        insn(xor_x, 0),
        // 15: the shard function on A.
        insn(BPF_ALU | BPF_MUL | BPF_K, SHARD_MUL),
        insn(BPF_ALU | BPF_RSH | BPF_K, SHARD_SHIFT),
        insn(BPF_ALU | BPF_MOD | BPF_K, cores.max(1)),
        insn(BPF_RET | BPF_A, 0),
    ]
}

/// The network header of a datagram from `src`, as far as [`program`] reads it.
fn header(src: IpAddr) -> Vec<u8> {
    match src {
        IpAddr::V4(v4) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[12..16].copy_from_slice(&v4.octets());
            h
        }
        IpAddr::V6(v6) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[8..24].copy_from_slice(&v6.octets());
            h
        }
    }
}

/// Runs `prog` on a datagram from `src` the way the kernel would (the instructions
/// [`program`] emits, loads relative to the network header), for tests and for
/// `probe` output. `None` for an instruction it does not know, a load past the
/// header, a jump out of the program or a modulo by 0.
pub fn eval(prog: &[BpfInsn], src: IpAddr) -> Option<u32> {
    let h = header(src);
    let at = |k: u32, n: usize| -> Option<&[u8]> {
        let off = usize::try_from((k as i32).checked_sub(SKF_NET_OFF)?).ok()?;
        h.get(off..off.checked_add(n)?)
    };
    let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
    loop {
        let i = prog.get(pc)?;
        pc += 1;
        match i.code {
            c if c == BPF_LD | BPF_W | BPF_ABS => {
                a = u32::from_be_bytes(at(i.k, 4)?.try_into().ok()?);
            }
            c if c == BPF_LD | BPF_B | BPF_ABS => a = u32::from(at(i.k, 1)?[0]),
            c if c == BPF_MISC | BPF_TAX => x = a,
            c if c == BPF_ALU | BPF_XOR | BPF_X => a ^= x,
            c if c == BPF_ALU | BPF_MUL | BPF_K => a = a.wrapping_mul(i.k),
            c if c == BPF_ALU | BPF_RSH | BPF_K => a = a.checked_shr(i.k).unwrap_or(0),
            c if c == BPF_ALU | BPF_MOD | BPF_K => a = a.checked_rem(i.k)?,
            c if c == BPF_JMP | BPF_JA => pc = pc.checked_add(i.k as usize)?,
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += usize::from(if a == i.k { i.jt } else { i.jf });
            }
            c if c == BPF_RET | BPF_A => return Some(a),
            _ => return None,
        }
    }
}

/// Offset in the UDP payload of the destination socket ID (UDT header word 3).
pub const DST_ID_OFF: u32 = 12;
/// Offset of the destination socket ID in a sealed datagram's clear header.
pub const SEALED_DST_ID_OFF: u32 = crate::transport::seal::PLAIN_AT as u32;
/// A sealed datagram's first two bytes, and its version bits in the third (the
/// format in [`crate::transport::seal`]; `sealed_layout_matches_the_seal_module`
/// checks these against that module's own parsing).
const SEALED_MARK: u32 = 0xFFFF;
const SEALED_VERSION: u32 = 0xC0;
const SEALED_VERSION_MASK: u32 = 0xC0;
/// Offset in the UDP payload of a handshake's requester socket ID (16-byte header, then
/// version, type, ISN, MSS, flight flag size, request type: the 7th body word).
pub const HS_ID_OFF: u32 = 16 + 24;

const BPF_H: u16 = 0x08;
const BPF_AND: u16 = 0x50;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;

fn jeq(k: u32, jt: u8, jf: u8) -> BpfInsn {
    BpfInsn {
        code: BPF_JMP | BPF_JEQ | BPF_K,
        jt,
        jf,
        k,
    }
}

/// The classic-BPF `SO_ATTACH_REUSEPORT_CBPF` program that steers by socket ID (see
/// the module doc): `id = sealed ? sealed_dst_id : dst_id != 0 ? dst_id :
/// requester_id; return id % cores`. Loads are from the UDP payload (the kernel runs
/// a reuseport program with the UDP header pulled).
pub fn program_by_socket_id(cores: u32) -> Vec<BpfInsn> {
    let cores = cores.max(1);
    vec![
        // 0: a sealed datagram starts FF FF, then the version bits: on at 5, else 8.
        insn(BPF_LD | BPF_H | BPF_ABS, 0),
        jeq(SEALED_MARK, 0, 6),
        insn(BPF_LD | BPF_B | BPF_ABS, 2),
        insn(BPF_ALU | BPF_AND | BPF_K, SEALED_VERSION_MASK),
        jeq(SEALED_VERSION, 0, 3),
        // 5: A = the sealed header's destination socket ID.
        insn(BPF_LD | BPF_W | BPF_ABS, SEALED_DST_ID_OFF),
        insn(BPF_ALU | BPF_MOD | BPF_K, cores),
        insn(BPF_RET | BPF_A, 0),
        // 8: A = destination socket ID; a handshake to the listener (0) goes on at
        // 12, anything else at 10.
        insn(BPF_LD | BPF_W | BPF_ABS, DST_ID_OFF),
        jeq(0, 2, 0),
        insn(BPF_ALU | BPF_MOD | BPF_K, cores),
        insn(BPF_RET | BPF_A, 0),
        // 12: A = the requester's socket ID.
        insn(BPF_LD | BPF_W | BPF_ABS, HS_ID_OFF),
        insn(BPF_ALU | BPF_MOD | BPF_K, cores),
        insn(BPF_RET | BPF_A, 0),
    ]
}

/// Runs `prog` ([`program_by_socket_id`]'s instructions only) on a UDP payload the way
/// the kernel would: a load past the end ends the program with 0.
pub fn eval_payload(prog: &[BpfInsn], payload: &[u8]) -> Option<u32> {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let load = |n: usize| {
            let off = i.k as usize;
            payload
                .get(off..off + n)
                .map(|b| b.iter().fold(0u32, |a, &x| a << 8 | u32::from(x)))
        };
        match i.code {
            c if c == BPF_LD | BPF_W | BPF_ABS => match load(4) {
                Some(w) => a = w,
                None => return Some(0),
            },
            c if c == BPF_LD | BPF_H | BPF_ABS => match load(2) {
                Some(w) => a = w,
                None => return Some(0),
            },
            c if c == BPF_LD | BPF_B | BPF_ABS => match load(1) {
                Some(w) => a = w,
                None => return Some(0),
            },
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += usize::from(if a == i.k { i.jt } else { i.jf });
            }
            c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
            c if c == BPF_ALU | BPF_MOD | BPF_K => a = a.checked_rem(i.k)?,
            c if c == BPF_RET | BPF_A => return Some(a),
            _ => return None,
        }
    }
    None
}

/// The core [`program_by_socket_id`] picks for a UDP payload, computed directly.
pub fn socket_id_core(payload: &[u8], cores: u32) -> u32 {
    let word = |off: u32| {
        payload
            .get(off as usize..off as usize + 4)
            .map(|w| u32::from_be_bytes(w.try_into().expect("4 bytes")))
    };
    let sealed = payload.len() >= 3
        && u32::from(u16::from_be_bytes([payload[0], payload[1]])) == SEALED_MARK
        && u32::from(payload[2]) & SEALED_VERSION_MASK == SEALED_VERSION;
    if sealed {
        return word(SEALED_DST_ID_OFF).map_or(0, |id| id % cores.max(1));
    }
    match word(DST_ID_OFF) {
        Some(0) => word(HS_ID_OFF).map_or(0, |id| id % cores.max(1)),
        Some(id) => id % cores.max(1),
        None => 0,
    }
}

#[cfg(test)]
mod socket_id_tests {
    use super::*;

    #[test]
    fn program_matches_the_direct_computation() {
        for cores in 1..=8u32 {
            let p = program_by_socket_id(cores);
            for i in 0..3000u32 {
                let id = i.wrapping_mul(2_654_435_761);
                let mut d = vec![0u8; 64];
                d[12..16].copy_from_slice(&id.to_be_bytes());
                d[40..44].copy_from_slice(&i.to_be_bytes());
                assert_eq!(eval_payload(&p, &d), Some(socket_id_core(&d, cores)));
                // A handshake (destination 0): the requester's ID decides.
                d[12..16].copy_from_slice(&0u32.to_be_bytes());
                assert_eq!(eval_payload(&p, &d), Some(i % cores));
                assert_eq!(socket_id_core(&d, cores), i % cores);
            }
            // Too short for the field it is steered by: core 0.
            assert_eq!(eval_payload(&p, &[1u8; 15]), Some(0));
            assert_eq!(eval_payload(&p, &[0u8; 43]), Some(0));
            assert_eq!(socket_id_core(&[0u8; 43], cores), 0);
            assert_eq!(eval_payload(&p, &[0xFF, 0xFF, 0xC0, 1, 2]), Some(0));
            assert_eq!(eval_payload(&p, &[0xFF]), Some(0));
        }
    }

    /// Sealed datagrams as the seal module reads them: marked, the destination in the
    /// clear header, the bytes where a plain header has it ciphertext (random).
    #[test]
    fn sealed_layout_matches_the_seal_module() {
        use crate::transport::seal;
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for cores in 1..=8u32 {
            let p = program_by_socket_id(cores);
            for epoch in 0..64u8 {
                let mut d: Vec<u8> = (0..seal::OVERHEAD + 16 + 64)
                    .map(|_| next() as u8)
                    .collect();
                d[..3].copy_from_slice(&[0xFF, 0xFF, 0xC0 | epoch]);
                assert!(seal::is_sealed(&d), "epoch {epoch}");
                let dst = seal::sealed_dst(&d).expect("a sealed header");
                assert_eq!(socket_id_core(&d, cores), dst % cores);
                assert_eq!(eval_payload(&p, &d), Some(dst % cores));
                // Another version byte is not the sealed format: plain steering.
                d[2] = 0x02;
                assert!(!seal::is_sealed(&d));
                assert_eq!(eval_payload(&p, &d), Some(socket_id_core(&d, cores)));
            }
        }
    }
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
                assert_eq!(eval(&p, IpAddr::V4(ip)), Some(shard_v4(ip, cores)));
                let v6 = std::net::Ipv6Addr::from(
                    u128::from(i.wrapping_mul(2_654_435_761)) * 0x1_0000_0001_0000_0003,
                );
                let want = lu2k_ring_abi::shard(Nid::from_net_ipv6(Net(0), v6), cores);
                assert_eq!(eval(&p, IpAddr::V6(v6)), Some(want));
                assert_eq!(shard_ip(IpAddr::V6(v6), cores), want);
            }
        }
        // A dual-stack socket's IPv4 peer (IPv4 header) shards as its mapped form says.
        let v4 = Ipv4Addr::new(10, 1, 2, 3);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert_eq!(shard_ip(mapped, 7), shard_v4(v4, 7));
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
