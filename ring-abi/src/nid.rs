//! LNet network identifiers (NIDs): the 24-byte form the descriptors, the attach
//! handshake and the device ioctls carry ([`Nid`], C `struct lu2k_nid`), and the text
//! form operators type (`192.168.1.5@tcp`, `0@lo`, `10.0.0.1@lu2k3`, `2001:db8::1@lu2k`).
//!
//! # Layout
//!
//! [`Nid`] mirrors Lustre's large NID (`struct lnet_nid`, Lustre 2.16+: `nid_size`,
//! `nid_type`, `nid_num`, `nid_addr[4]`), widened so lu2k's own LND type fits:
//!
//! ```text
//!   0  size       u8        address bytes - 4: 0 (IPv4 address or number), 12 (IPv6)
//!   1  reserved0  u8        0
//!   2  lnd        u16       LND type (little-endian, like every ABI integer)
//!   4  num        u16       network number
//!   6  reserved1  u16       0
//!   8  addr       u8 × 16   the address in network byte order; a 4-byte address
//!                           (IPv4, or a number such as 0@lo) in addr[0..4], the rest 0
//! ```
//!
//! The address bytes are exactly `lnet_nid.nid_addr` (four big-endian 32-bit words), so
//! a kernel LND copies them as they are. A NID whose address has 4 bytes is a *NID4*:
//! it converts losslessly to and from LNet's classic 64-bit NID
//! (`net << 32 | addr`, `net = lnd_type << 16 | net_num`; [`Nid::from_nid4`],
//! [`Nid::nid4`]), which is what LNet's 72-byte wire header carries.
//!
//! # Text form
//!
//! `ADDR@NAME[NUM]`: the network number is omitted when it is 0, as `libcfs_nid2str`
//! does, and `tcp0` parses to the same network as `tcp`. On IP networks the address is
//! an IPv4 address or, as in Lustre 2.16+ (`2001:db8::1@tcp`), an IPv6 address in its
//! usual text form (printed compressed, RFC 5952).
//!
//! # lu2k's network type
//!
//! lu2k is its own LND, so its NIDs carry their own LND type. Lustre's types are
//! small numbers (QSWLND 1 … KFILND 16, "only add to these values"), so lu2k takes
//! [`LndType::LU2K`] = `0x4C32` (ASCII `L2`, 19506): far above anything Lustre
//! has assigned, readable in a hex dump, and stable — NIDs on the wire depend on it.
//! Its addresses are IP addresses, like socklnd's, written `10.0.0.1@lu2k`,
//! `10.0.0.1@lu2k3` (network number 3) or `fd00::2@lu2k`.
//!
//! Types this module has no name for print as `ADDR@lndT.N` (decimal address, LND
//! type `T`, network number `N`) and parse back.
//!
//! # Guarantees
//!
//! `Nid::from_str(&nid.to_string()) == Ok(nid)` for every NID4 (every `u64` through
//! [`Nid::from_nid4`]) and every valid IPv6 NID ([`Nid::check`]); parsing never panics
//! and returns only valid NIDs; errors say which part of the string is wrong. Every
//! bit pattern is a `Nid` value (plain integers and bytes, so reading one out of shared
//! memory is sound); consumers of untrusted NIDs call [`Nid::check`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An LND (network driver) type, the top 16 bits of a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LndType(pub u16);

impl LndType {
    /// Socket LND (`tcp`).
    pub const SOCKLND: LndType = LndType(2);
    /// InfiniBand LND (`o2ib`).
    pub const O2IBLND: LndType = LndType(5);
    /// Loopback LND (`lo`).
    pub const LOLND: LndType = LndType(9);
    /// Cray Gemini/Aries LND (`gni`).
    pub const GNILND: LndType = LndType(13);
    /// Cray Gemini/Aries over IP (`gip`).
    pub const GNIIPLND: LndType = LndType(14);
    /// Portals 4 LND (`ptlf`).
    pub const PTL4LND: LndType = LndType(15);
    /// Kernel fabric interface LND (`kfi`).
    pub const KFILND: LndType = LndType(16);
    /// lu2k's own LND: `0x4C32` (`L2`), unused by Lustre. See the module doc.
    pub const LU2K: LndType = LndType(0x4C32);

    /// The text name, if this module knows the type.
    pub fn name(self) -> Option<&'static str> {
        KNOWN.iter().find(|k| k.lnd == self).map(|k| k.name)
    }

    fn addr_kind(self) -> AddrKind {
        KNOWN
            .iter()
            .find(|k| k.lnd == self)
            .map_or(AddrKind::Number, |k| k.addr)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrKind {
    Ip,
    Number,
}

struct Known {
    name: &'static str,
    lnd: LndType,
    addr: AddrKind,
}

const KNOWN: &[Known] = &[
    Known {
        name: "tcp",
        lnd: LndType::SOCKLND,
        addr: AddrKind::Ip,
    },
    Known {
        name: "o2ib",
        lnd: LndType::O2IBLND,
        addr: AddrKind::Ip,
    },
    Known {
        name: "lo",
        lnd: LndType::LOLND,
        addr: AddrKind::Number,
    },
    Known {
        name: "gni",
        lnd: LndType::GNILND,
        addr: AddrKind::Number,
    },
    Known {
        name: "gip",
        lnd: LndType::GNIIPLND,
        addr: AddrKind::Ip,
    },
    Known {
        name: "ptlf",
        lnd: LndType::PTL4LND,
        addr: AddrKind::Number,
    },
    Known {
        name: "kfi",
        lnd: LndType::KFILND,
        addr: AddrKind::Number,
    },
    Known {
        name: "lu2k",
        lnd: LndType::LU2K,
        addr: AddrKind::Ip,
    },
];

/// An LNet network: `lnd_type << 16 | net_num`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net(pub u32);

impl Net {
    /// The network of type `lnd` with number `num` (`tcp1` is `Net::new(SOCKLND, 1)`).
    pub const fn new(lnd: LndType, num: u16) -> Net {
        Net(((lnd.0 as u32) << 16) | num as u32)
    }

    /// The LND type.
    pub const fn lnd(self) -> LndType {
        LndType((self.0 >> 16) as u16)
    }

    /// The network number.
    pub const fn num(self) -> u16 {
        self.0 as u16
    }
}

/// An LNet NID, 24 bytes (C `struct lu2k_nid`); see the module doc for the layout.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Nid {
    /// Address bytes - 4: 0 or 12. Build NIDs with the constructors; the fields are
    /// public for the layout tests and for kernel-facing code that copies them.
    pub size: u8,
    /// Zero.
    pub reserved0: u8,
    /// LND type.
    pub lnd: u16,
    /// Network number.
    pub num: u16,
    /// Zero.
    pub reserved1: u16,
    /// The address, network byte order.
    pub addr: [u8; 16],
}

/// Bytes of a [`Nid`] in the ABI.
pub const NID_BYTES: usize = 24;

/// `size` of a NID whose address has 4 bytes (IPv4, numbers).
const SIZE4: u8 = 0;
/// `size` of a NID whose address has 16 bytes (IPv6).
const SIZE16: u8 = 12;

/// Why a NID read from the ABI (a descriptor, a HELLO, an ioctl) is not one this
/// build can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NidError {
    /// `size` is neither 0 (4 address bytes) nor 12 (16 address bytes).
    #[error("NID size {0} is not 0 (4-byte address) or 12 (IPv6 address)")]
    Size(u8),
    /// A reserved field or an address byte past the address's size is not 0.
    #[error("NID reserved bytes (or address bytes past a 4-byte address) are not 0")]
    Reserved,
    /// A 16-byte address on a network whose addresses are not IP addresses.
    #[error("NID with an IPv6 address on network type {0}, whose addresses are not IP")]
    NotIp(u16),
}

impl Nid {
    /// The NID4 of 32-bit address `addr` (an IPv4 address as a host-order integer, or
    /// a number such as the 0 of `0@lo`) on network `net`.
    pub const fn new(net: Net, addr: u32) -> Nid {
        let b = addr.to_be_bytes();
        Nid {
            size: SIZE4,
            reserved0: 0,
            lnd: net.lnd().0,
            num: net.num(),
            reserved1: 0,
            addr: [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// `ip@net`: the NID of IPv4 address `ip` on network `net`, for networks whose
    /// addresses are IP addresses (`lu2k`, `tcp`, `o2ib`, `gip`).
    pub const fn from_net_ip(net: Net, ip: Ipv4Addr) -> Nid {
        Nid::new(net, ip.to_bits())
    }

    /// `ip@net`; the same as [`Nid::from_net_ip`] with the arguments the other way round.
    pub const fn from_ipv4(ip: Ipv4Addr, net: Net) -> Nid {
        Nid::from_net_ip(net, ip)
    }

    /// `ip@net` for an IPv6 address (a large NID, `size` 12). The address is kept as
    /// given: an IPv4-mapped address (`::ffff:a.b.c.d`) stays an IPv6 NID; callers that
    /// got it from a dual-stack socket use [`Nid::from_net_addr`], which unmaps it.
    pub const fn from_net_ipv6(net: Net, ip: Ipv6Addr) -> Nid {
        Nid {
            size: SIZE16,
            reserved0: 0,
            lnd: net.lnd().0,
            num: net.num(),
            reserved1: 0,
            addr: ip.octets(),
        }
    }

    /// `ip@net` for either family; an IPv4-mapped IPv6 address (what a dual-stack
    /// socket reports for an IPv4 peer) gives the IPv4 NID, so a peer has one NID
    /// whichever socket it reached.
    pub fn from_net_addr(net: Net, ip: IpAddr) -> Nid {
        match ip {
            IpAddr::V4(v4) => Nid::from_net_ip(net, v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Nid::from_net_ip(net, v4),
                None => Nid::from_net_ipv6(net, v6),
            },
        }
    }

    /// The NID of LNet's 64-bit form `net << 32 | addr`.
    pub const fn from_nid4(raw: u64) -> Nid {
        Nid::new(Net((raw >> 32) as u32), raw as u32)
    }

    /// LNet's 64-bit form, for a NID4; `None` for an IPv6 NID (LNet's 72-byte header
    /// cannot carry it).
    pub const fn nid4(self) -> Option<u64> {
        if self.size == SIZE4 {
            Some(((self.net().0 as u64) << 32) | self.addr() as u64)
        } else {
            None
        }
    }

    /// LNet's `LNET_NID_ANY` (all ones, as a NID4).
    pub const ANY: Nid = Nid::from_nid4(u64::MAX);

    /// The network.
    pub const fn net(self) -> Net {
        Net::new(LndType(self.lnd), self.num)
    }

    /// Whether the address has 4 bytes (the NID has a 64-bit form, [`Nid::nid4`]).
    pub const fn is_nid4(self) -> bool {
        self.size == SIZE4
    }

    /// The first 4 address bytes as a host-order integer: the whole address of a NID4
    /// (`192.168.1.5` = `0xC0A8_0105`, `0@lo` = 0).
    pub const fn addr(self) -> u32 {
        u32::from_be_bytes([self.addr[0], self.addr[1], self.addr[2], self.addr[3]])
    }

    /// The address bytes in network order: 4 for a NID4, 16 for an IPv6 NID.
    pub fn addr_bytes(&self) -> &[u8] {
        if self.size == SIZE16 {
            &self.addr
        } else {
            &self.addr[..4]
        }
    }

    /// The address of a NID4 read as an IPv4 address, whatever the network type: for a
    /// caller that already knows the network is an IPv4 one. [`Nid::ip_addr`] is the
    /// checked form for both families.
    pub const fn ip(self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr())
    }

    /// The address as IPv4 when the network's addresses are IP addresses and this one
    /// has 4 bytes, `None` for the others (`0@lo`, IPv6 NIDs).
    pub fn ipv4(self) -> Option<Ipv4Addr> {
        match (self.net().lnd().addr_kind(), self.size) {
            (AddrKind::Ip, SIZE4) => Some(self.ip()),
            _ => None,
        }
    }

    /// The IP address (either family) when the network's addresses are IP addresses;
    /// `None` for the others (`0@lo`) and for NIDs that fail [`Nid::check`].
    pub fn ip_addr(self) -> Option<IpAddr> {
        if self.net().lnd().addr_kind() != AddrKind::Ip || self.check().is_err() {
            return None;
        }
        Some(match self.size {
            SIZE16 => IpAddr::V6(Ipv6Addr::from(self.addr)),
            _ => IpAddr::V4(self.ip()),
        })
    }

    /// The 32-bit key the shard function hashes ([`crate::shard`]): a NID4's address,
    /// or the XOR of an IPv6 address's four big-endian 32-bit words (so a BPF program
    /// computes it with four loads and three XORs).
    pub const fn shard_key(self) -> u32 {
        if self.size == SIZE16 {
            let a = &self.addr;
            u32::from_be_bytes([a[0], a[1], a[2], a[3]])
                ^ u32::from_be_bytes([a[4], a[5], a[6], a[7]])
                ^ u32::from_be_bytes([a[8], a[9], a[10], a[11]])
                ^ u32::from_be_bytes([a[12], a[13], a[14], a[15]])
        } else {
            self.addr()
        }
    }

    /// Whether this NID is one this build can use: `size` 0 or 12, reserved bytes and
    /// the bytes past a 4-byte address 0, 16-byte addresses only on IP networks.
    pub fn check(&self) -> Result<(), NidError> {
        if self.reserved0 != 0 || self.reserved1 != 0 {
            return Err(NidError::Reserved);
        }
        match self.size {
            SIZE4 if self.addr[4..].iter().any(|&b| b != 0) => Err(NidError::Reserved),
            SIZE4 => Ok(()),
            SIZE16 if self.net().lnd().addr_kind() != AddrKind::Ip => {
                Err(NidError::NotIp(self.lnd))
            }
            SIZE16 => Ok(()),
            s => Err(NidError::Size(s)),
        }
    }

    /// The 24 ABI bytes (little-endian integers, address in network order).
    pub fn to_bytes(self) -> [u8; NID_BYTES] {
        let mut b = [0u8; NID_BYTES];
        b[0] = self.size;
        b[1] = self.reserved0;
        b[2..4].copy_from_slice(&self.lnd.to_le_bytes());
        b[4..6].copy_from_slice(&self.num.to_le_bytes());
        b[6..8].copy_from_slice(&self.reserved1.to_le_bytes());
        b[8..].copy_from_slice(&self.addr);
        b
    }

    /// The NID in 24 ABI bytes, unchecked (every pattern is a value; see [`Nid::check`]).
    pub fn from_bytes(b: &[u8; NID_BYTES]) -> Nid {
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&b[8..]);
        Nid {
            size: b[0],
            reserved0: b[1],
            lnd: u16::from_le_bytes([b[2], b[3]]),
            num: u16::from_le_bytes([b[4], b[5]]),
            reserved1: u16::from_le_bytes([b[6], b[7]]),
            addr,
        }
    }
}

impl fmt::Debug for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nid({self})")
    }
}

/// Why a NID or network string did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No `@` separating address and network.
    #[error("{0:?} is not a NID: expected ADDRESS@NETWORK, like 192.168.1.5@tcp or 0@lo")]
    MissingAt(String),
    /// Network name is not one this module knows.
    #[error(
        "unknown network type {0:?}: expected tcp, o2ib, lo, gni, gip, ptlf, kfi, lu2k \
         (each optionally followed by a number, like tcp1) or lndT.N"
    )]
    UnknownNetwork(String),
    /// The network number is not a decimal number up to 65535.
    #[error("network number {0:?} is not a decimal number from 0 to 65535")]
    BadNetNumber(String),
    /// The address is not valid for this network type.
    #[error("address {addr:?} is not valid for network {net}: expected {expected}")]
    BadAddress {
        /// The address text.
        addr: String,
        /// The network text.
        net: String,
        /// What the network's addresses look like.
        expected: &'static str,
    },
}

fn is_dec(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl FromStr for Net {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Net, ParseError> {
        let bad_num = || ParseError::BadNetNumber(s.to_string());
        if let Some(rest) = s.strip_prefix("lnd") {
            // Generic form lndT.N for types without a name.
            if let Some((t, n)) = rest.split_once('.') {
                if !is_dec(t) {
                    return Err(ParseError::UnknownNetwork(s.to_string()));
                }
                let t: u16 = t
                    .parse()
                    .map_err(|_| ParseError::UnknownNetwork(s.to_string()))?;
                if !is_dec(n) {
                    return Err(bad_num());
                }
                let n: u16 = n.parse().map_err(|_| bad_num())?;
                return Ok(Net::new(LndType(t), n));
            }
        }
        // Names may contain digits (`lu2k`), so match the name as a prefix and
        // take the rest as the network number.
        let (known, num) = KNOWN
            .iter()
            .filter_map(|k| s.strip_prefix(k.name).map(|rest| (k, rest)))
            .max_by_key(|(k, _)| k.name.len())
            .ok_or_else(|| ParseError::UnknownNetwork(s.to_string()))?;
        let num = if num.is_empty() {
            0
        } else if is_dec(num) {
            num.parse().map_err(|_| bad_num())?
        } else if num.as_bytes()[0].is_ascii_digit() {
            return Err(bad_num());
        } else {
            return Err(ParseError::UnknownNetwork(s.to_string()));
        };
        Ok(Net::new(known.lnd, num))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lnd().name() {
            Some(name) if self.num() == 0 => f.write_str(name),
            Some(name) => write!(f, "{name}{}", self.num()),
            None => write!(f, "lnd{}.{}", self.lnd().0, self.num()),
        }
    }
}

impl FromStr for Nid {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Nid, ParseError> {
        let (addr, net_s) = s
            .rsplit_once('@')
            .ok_or_else(|| ParseError::MissingAt(s.to_string()))?;
        let net: Net = net_s.parse()?;
        let kind = net.lnd().addr_kind();
        let bad = |expected| ParseError::BadAddress {
            addr: addr.to_string(),
            net: net_s.to_string(),
            expected,
        };
        match kind {
            AddrKind::Ip if addr.contains(':') => {
                let ip: Ipv6Addr = addr
                    .parse()
                    .map_err(|_| bad("an IPv6 address like 2001:db8::1"))?;
                if ip.to_ipv4_mapped().is_some() {
                    // A dual-stack socket reports an IPv4 peer this way and the engine
                    // names it by its IPv4 NID, so the mapped form would never match.
                    return Err(bad(
                        "an IPv6 address that is not IPv4-mapped: write an IPv4 peer as a.b.c.d",
                    ));
                }
                Ok(Nid::from_net_ipv6(net, ip))
            }
            AddrKind::Ip => {
                // std's parser accepts exactly four decimal octets without leading zeros.
                let ip: Ipv4Addr = addr.parse().map_err(|_| {
                    bad("an IPv4 address like 192.168.1.5 or an IPv6 one like 2001:db8::1")
                })?;
                Ok(Nid::from_net_ip(net, ip))
            }
            AddrKind::Number => {
                let what = "a decimal number from 0 to 4294967295, without leading zeros";
                if !is_dec(addr) || (addr.len() > 1 && addr.starts_with('0')) {
                    return Err(bad(what));
                }
                Ok(Nid::new(net, addr.parse().map_err(|_| bad(what))?))
            }
        }
    }
}

impl fmt::Display for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Err(e) = self.check() {
            return write!(f, "<invalid NID: {e}>");
        }
        match (self.net().lnd().addr_kind(), self.size) {
            (AddrKind::Ip, SIZE16) => write!(f, "{}@{}", Ipv6Addr::from(self.addr), self.net()),
            (AddrKind::Ip, _) => write!(f, "{}@{}", self.ip(), self.net()),
            (AddrKind::Number, _) => write!(f, "{}@{}", self.addr(), self.net()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_forms() {
        let n: Nid = "192.168.1.5@tcp".parse().unwrap();
        assert_eq!(n.net(), Net::new(LndType::SOCKLND, 0));
        assert_eq!(n.addr(), 0xC0A8_0105);
        assert_eq!(n.nid4(), Some(0x0002_0000_C0A8_0105));
        assert_eq!(n.to_string(), "192.168.1.5@tcp");

        let n: Nid = "10.0.0.1@tcp1".parse().unwrap();
        assert_eq!(n.nid4(), Some(0x0002_0001_0A00_0001));
        assert_eq!(n.to_string(), "10.0.0.1@tcp1");

        let n: Nid = "0@lo".parse().unwrap();
        assert_eq!(n.nid4(), Some(0x0009_0000_0000_0000));
        assert_eq!(n.to_string(), "0@lo");

        let n: Nid = "172.16.0.9@o2ib".parse().unwrap();
        assert_eq!(n.net().lnd(), LndType::O2IBLND);
        assert_eq!(n.ipv4(), Some(Ipv4Addr::new(172, 16, 0, 9)));

        let n: Nid = "10.1.2.3@lu2k3".parse().unwrap();
        assert_eq!(n.nid4(), Some(0x4C32_0003_0A01_0203));
        assert_eq!(n.to_string(), "10.1.2.3@lu2k3");
        assert_eq!("10.1.2.3@lu2k".parse::<Nid>().unwrap().net().num(), 0);

        // tcp0 is tcp, printed without the 0.
        assert_eq!(
            "1.2.3.4@tcp0".parse::<Nid>().unwrap().to_string(),
            "1.2.3.4@tcp"
        );

        // Generic form for unnamed types.
        let n = Nid::new(Net::new(LndType(77), 4), 12);
        assert_eq!(n.to_string(), "12@lnd77.4");
        assert_eq!("12@lnd77.4".parse::<Nid>().unwrap(), n);
    }

    #[test]
    fn ipv6_forms() {
        // Lustre 2.16+ writes large NIDs as ADDR@NET with the IPv6 text form.
        let n: Nid = "2001:db8::1@tcp".parse().unwrap();
        assert!(!n.is_nid4());
        assert_eq!(n.nid4(), None);
        assert_eq!(n.net(), Net::new(LndType::SOCKLND, 0));
        assert_eq!(n.ip_addr(), Some("2001:db8::1".parse::<IpAddr>().unwrap()));
        assert_eq!(n.ipv4(), None);
        assert_eq!(n.to_string(), "2001:db8::1@tcp");
        assert_eq!(n.addr_bytes().len(), 16);

        // Printed compressed (RFC 5952) whatever was typed.
        let n: Nid = "fd00:0:0:0:0:0:0:2@lu2k7".parse().unwrap();
        assert_eq!(n.to_string(), "fd00::2@lu2k7");
        assert_eq!(n.net(), Net::new(LndType::LU2K, 7));
        assert_eq!(
            Nid::from_net_ipv6(Net::new(LndType::LU2K, 7), "fd00::2".parse().unwrap()),
            n
        );

        // A dual-stack socket's IPv4-mapped address names the IPv4 peer.
        let net = Net::new(LndType::LU2K, 0);
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(
            Nid::from_net_addr(net, mapped),
            "10.0.0.2@lu2k".parse().unwrap()
        );
        let e = "::ffff:10.0.0.2@lu2k".parse::<Nid>().unwrap_err();
        assert!(e.to_string().contains("IPv4-mapped"), "{e}");

        // IPv6 addresses only on IP networks.
        assert!("::1@lo".parse::<Nid>().is_err());
        assert!("fe80::1%eth0@lu2k".parse::<Nid>().is_err());
    }

    #[test]
    fn abi_bytes_mirror_lnet_nid() {
        let n: Nid = "2001:db8::1@lu2k3".parse().unwrap();
        let b = n.to_bytes();
        assert_eq!(b[0], 12); // nid_size: 16 address bytes - 4
        assert_eq!(b[1], 0);
        assert_eq!(&b[2..4], &0x4C32u16.to_le_bytes());
        assert_eq!(&b[4..6], &3u16.to_le_bytes());
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(
            &b[8..],
            &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(Nid::from_bytes(&b), n);

        let n: Nid = "192.168.1.5@tcp".parse().unwrap();
        let b = n.to_bytes();
        assert_eq!(b[0], 0);
        // nid_addr[0] is the address, big-endian, as lnet_nid4_to_nid writes it.
        assert_eq!(&b[8..12], &[192, 168, 1, 5]);
        assert!(b[12..].iter().all(|&x| x == 0));
        assert_eq!(Nid::from_bytes(&b), n);
        assert_eq!(std::mem::size_of::<Nid>(), NID_BYTES);
    }

    #[test]
    fn check_refuses_what_the_abi_forbids() {
        let good: Nid = "10.0.0.1@lu2k".parse().unwrap();
        assert_eq!(good.check(), Ok(()));
        let mut b = good.to_bytes();
        b[0] = 4;
        assert_eq!(Nid::from_bytes(&b).check(), Err(NidError::Size(4)));
        let mut b = good.to_bytes();
        b[1] = 1;
        assert_eq!(Nid::from_bytes(&b).check(), Err(NidError::Reserved));
        let mut b = good.to_bytes();
        b[20] = 1; // past a 4-byte address
        assert_eq!(Nid::from_bytes(&b).check(), Err(NidError::Reserved));
        assert_eq!(Nid::from_bytes(&b).ip_addr(), None);
        assert!(Nid::from_bytes(&b).to_string().contains("invalid"));
        let mut b = "0@lo".parse::<Nid>().unwrap().to_bytes();
        b[0] = 12;
        assert_eq!(Nid::from_bytes(&b).check(), Err(NidError::NotIp(9)));
    }

    #[test]
    fn helpers_match_the_bit_layout() {
        // 10.1.2.3@lu2k3: LND type 0x4C32, network number 3, address 0x0A01_0203.
        let net = Net::new(LndType::LU2K, 3);
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let nid = Nid::from_net_ip(net, ip);
        assert_eq!(nid.nid4(), Some(0x4C32_0003_0A01_0203));
        assert_eq!(nid, Nid::from_nid4(0x4C32_0003_0A01_0203));
        assert_eq!(nid, Nid::from_ipv4(ip, net));
        assert_eq!(nid, Nid::new(net, 0x0A01_0203));
        assert_eq!(nid, Nid::from_net_addr(net, IpAddr::V4(ip)));
        assert_eq!(nid.net(), net);
        assert_eq!(nid.net().0, 0x4C32_0003);
        assert_eq!(nid.addr(), 0x0A01_0203);
        assert_eq!(nid.ip(), ip);
        assert_eq!(nid.ipv4(), Some(ip));
        assert_eq!(nid.ip_addr(), Some(IpAddr::V4(ip)));
        // `ip` reads the address of any network; `ipv4` only of IP ones.
        let lo = Nid::new(Net::new(LndType::LOLND, 0), 7);
        assert_eq!(lo.ip(), Ipv4Addr::new(0, 0, 0, 7));
        assert_eq!(lo.ipv4(), None);
        assert_eq!(lo.ip_addr(), None);
        // The shard key of a NID4 is its address; of an IPv6 NID the XOR of its words.
        assert_eq!(nid.shard_key(), 0x0A01_0203);
        let v6 = Nid::from_net_ipv6(net, "2001:db8:0:1::5".parse().unwrap()); // words 2001:0db8, 0000:0001, 0, 0000:0005
        assert_eq!(v6.shard_key(), 0x2001_0db8 ^ 0x0000_0001 ^ 5);
        for cores in 1..=8 {
            assert_eq!(
                crate::shard(nid, cores),
                crate::shard_key(nid.ip().to_bits(), cores)
            );
            assert_eq!(
                crate::shard(v6, cores),
                crate::shard_key(v6.shard_key(), cores)
            );
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = "192.168.1.5".parse::<Nid>().unwrap_err();
        assert_eq!(e, ParseError::MissingAt("192.168.1.5".into()));
        assert!(e.to_string().contains("ADDRESS@NETWORK"));

        let e = "1.2.3.4@tpc".parse::<Nid>().unwrap_err();
        assert_eq!(e, ParseError::UnknownNetwork("tpc".into()));
        assert!(e.to_string().contains("tcp, o2ib"));

        let e = "1.2.3.4@tcp99999".parse::<Nid>().unwrap_err();
        assert_eq!(e, ParseError::BadNetNumber("tcp99999".into()));

        let e = "1.2.3.4@tcp1x".parse::<Nid>().unwrap_err();
        assert_eq!(e, ParseError::BadNetNumber("tcp1x".into()));

        let e = "1.2.3@tcp".parse::<Nid>().unwrap_err();
        assert!(matches!(e, ParseError::BadAddress { ref addr, .. } if addr == "1.2.3"));
        assert!(e.to_string().contains("IPv4"));

        let e = "2001:db8::g@tcp".parse::<Nid>().unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");

        let e = "256.1.1.1@lu2k".parse::<Nid>().unwrap_err();
        assert!(matches!(e, ParseError::BadAddress { .. }));

        let e = "x@lo".parse::<Nid>().unwrap_err();
        assert!(e.to_string().contains("decimal number"));
        assert!("01@lo".parse::<Nid>().is_err());
        assert!("@tcp".parse::<Nid>().is_err());
        assert!("1.2.3.4@".parse::<Nid>().is_err());
    }

    fn known_net() -> impl Strategy<Value = Net> {
        (0..KNOWN.len(), any::<u16>()).prop_map(|(i, n)| Net::new(KNOWN[i].lnd, n))
    }

    fn ip_net() -> impl Strategy<Value = Net> {
        (
            prop::sample::select(vec![
                LndType::SOCKLND,
                LndType::O2IBLND,
                LndType::GNIIPLND,
                LndType::LU2K,
            ]),
            any::<u16>(),
        )
            .prop_map(|(l, n)| Net::new(l, n))
    }

    proptest! {
        #[test]
        fn every_nid4_round_trips(raw in any::<u64>()) {
            let nid = Nid::from_nid4(raw);
            prop_assert_eq!(nid.nid4(), Some(raw));
            prop_assert_eq!(nid.check(), Ok(()));
            let s = nid.to_string();
            prop_assert_eq!(s.parse::<Nid>(), Ok(nid), "{}", s);
        }

        #[test]
        fn ipv6_nids_round_trip(net in ip_net(), a in any::<u128>()) {
            let ip = Ipv6Addr::from(a);
            prop_assume!(ip.to_ipv4_mapped().is_none());
            let nid = Nid::from_net_ipv6(net, ip);
            prop_assert_eq!(nid.check(), Ok(()));
            prop_assert_eq!(Nid::from_bytes(&nid.to_bytes()), nid);
            let s = nid.to_string();
            prop_assert_eq!(s.parse::<Nid>(), Ok(nid), "{}", s);
            prop_assert_eq!(nid.ip_addr(), Some(IpAddr::V6(ip)));
        }

        #[test]
        fn every_byte_pattern_is_checked_and_never_panics(b in prop::array::uniform24(any::<u8>())) {
            let nid = Nid::from_bytes(&b);
            prop_assert_eq!(nid.to_bytes(), b);
            let s = nid.to_string();
            if nid.check().is_ok() {
                prop_assert_eq!(s.parse::<Nid>(), Ok(nid), "{}", s);
            } else {
                prop_assert!(s.contains("invalid"));
            }
        }

        #[test]
        fn known_nets_round_trip(net in known_net(), addr in any::<u32>()) {
            let nid = Nid::new(net, addr);
            let s = nid.to_string();
            prop_assert!(!s.contains("lnd"));
            prop_assert_eq!(s.parse::<Nid>(), Ok(nid));
        }

        #[test]
        fn canonical_text_round_trips(
            ip in any::<u32>(),
            name in prop::sample::select(vec!["tcp", "o2ib", "lu2k", "gip"]),
            num in prop::option::of(1u16..),
        ) {
            let s = format!(
                "{}@{}{}",
                Ipv4Addr::from(ip),
                name,
                num.map(|n| n.to_string()).unwrap_or_default()
            );
            let nid: Nid = s.parse().unwrap();
            prop_assert_eq!(nid.to_string(), s);
        }

        #[test]
        fn garbage_never_panics(s in ".{0,40}") {
            if let Ok(nid) = s.parse::<Nid>() {
                // Whatever parsed is valid and prints to something that parses to it again.
                prop_assert_eq!(nid.check(), Ok(()));
                prop_assert_eq!(nid.to_string().parse::<Nid>(), Ok(nid));
            }
        }
    }
}
