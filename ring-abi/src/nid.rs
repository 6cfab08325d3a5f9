//! LNet network identifiers (NIDs): the 64-bit form LNet puts on the wire and in the
//! descriptors' `peer_nid` / `src_nid`, and the text form operators type
//! (`192.168.1.5@tcp`, `0@lo`, `10.0.0.1@lu2k3`).
//!
//! A NID is `net << 32 | addr`, and a network is `lnd_type << 16 | net_num`
//! (Lustre's `LNET_MKNID` / `LNET_MKNET`). The text form is `ADDR@NAME[NUM]`: the
//! network number is omitted when it is 0, as `libcfs_nid2str` does, and `tcp0`
//! parses to the same network as `tcp`.
//!
//! Both halves build and take NIDs apart through [`Nid`]'s methods only
//! ([`Nid::new`], [`Nid::from_net_ip`], [`Nid::net`], [`Nid::addr`], [`Nid::ip`]), so
//! the bit layout is written down once, here. [`crate::shard`] reads the same low 32
//! bits as [`Nid::addr`].
//!
//! # lu2k's network type
//!
//! lu2k is its own LND, so its NIDs carry their own LND type. Lustre's types are
//! small numbers (QSWLND 1 … KFILND 16, "only add to these values"), so lu2k takes
//! [`LndType::LU2K`] = `0x4C32` (ASCII `L2`, 19506): far above anything Lustre
//! has assigned, readable in a hex dump, and stable — NIDs on the wire depend on it.
//! Its addresses are IPv4 addresses, like socklnd's, written `10.0.0.1@lu2k` or,
//! for network number 3, `10.0.0.1@lu2k3`.
//!
//! Types this module has no name for print as `ADDR@lndT.N` (decimal address, LND
//! type `T`, network number `N`) and parse back, so every `u64` round-trips.
//!
//! # Guarantees
//!
//! `Nid::from_str(&nid.to_string()) == Ok(nid)` for every `u64`, and parsing never
//! panics; errors say which part of the string is wrong.

use std::fmt;
use std::net::Ipv4Addr;
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
    Ipv4,
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
        addr: AddrKind::Ipv4,
    },
    Known {
        name: "o2ib",
        lnd: LndType::O2IBLND,
        addr: AddrKind::Ipv4,
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
        addr: AddrKind::Ipv4,
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
        addr: AddrKind::Ipv4,
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

/// An LNet NID: `net << 32 | addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nid(pub u64);

impl Nid {
    /// The NID of address `addr` on network `net`.
    pub const fn new(net: Net, addr: u32) -> Nid {
        Nid(((net.0 as u64) << 32) | addr as u64)
    }

    /// `ip@net`: the NID of IPv4 address `ip` on network `net`, for networks whose
    /// addresses are IPv4 (`lu2k`, `tcp`, `o2ib`, `gip`).
    pub const fn from_net_ip(net: Net, ip: Ipv4Addr) -> Nid {
        Nid::new(net, ip.to_bits())
    }

    /// `ip@net`; the same as [`Nid::from_net_ip`] with the arguments the other way round.
    pub const fn from_ipv4(ip: Ipv4Addr, net: Net) -> Nid {
        Nid::from_net_ip(net, ip)
    }

    /// LNet's `LNET_NID_ANY` (all ones).
    pub const ANY: Nid = Nid(u64::MAX);

    /// The network part (the high 32 bits).
    pub const fn net(self) -> Net {
        Net((self.0 >> 32) as u32)
    }

    /// The address part (the low 32 bits).
    pub const fn addr(self) -> u32 {
        self.0 as u32
    }

    /// The address part read as an IPv4 address, whatever the network type: for a
    /// caller that already knows the network is an IPv4 one (the engine, which only
    /// serves its own `lu2k` network). [`Nid::ipv4`] is the checked form.
    pub const fn ip(self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr())
    }

    /// The address as IPv4 when the network's addresses are IPv4 (`tcp`, `o2ib`,
    /// `gip`, `lu2k`), `None` for the others (`0@lo`).
    pub fn ipv4(self) -> Option<Ipv4Addr> {
        match self.net().lnd().addr_kind() {
            AddrKind::Ipv4 => Some(self.ip()),
            AddrKind::Number => None,
        }
    }
}

/// The raw 64-bit NID, as descriptors carry it.
impl From<Nid> for u64 {
    fn from(nid: Nid) -> u64 {
        nid.0
    }
}

/// A raw 64-bit NID from a descriptor or the wire; every `u64` is a NID.
impl From<u64> for Nid {
    fn from(raw: u64) -> Nid {
        Nid(raw)
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
        let a = match kind {
            AddrKind::Ipv4 => {
                // std's parser accepts exactly four decimal octets without leading zeros.
                let ip: Ipv4Addr = addr
                    .parse()
                    .map_err(|_| bad("an IPv4 address like 192.168.1.5"))?;
                u32::from(ip)
            }
            AddrKind::Number => {
                let what = "a decimal number from 0 to 4294967295, without leading zeros";
                if !is_dec(addr) || (addr.len() > 1 && addr.starts_with('0')) {
                    return Err(bad(what));
                }
                addr.parse().map_err(|_| bad(what))?
            }
        };
        Ok(Nid::new(net, a))
    }
}

impl fmt::Display for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net().lnd().addr_kind() {
            AddrKind::Ipv4 => write!(f, "{}@{}", self.ip(), self.net()),
            AddrKind::Number => write!(f, "{}@{}", self.addr(), self.net()),
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
        assert_eq!(n.0, 0x0002_0000_C0A8_0105);
        assert_eq!(n.to_string(), "192.168.1.5@tcp");

        let n: Nid = "10.0.0.1@tcp1".parse().unwrap();
        assert_eq!(n.0, 0x0002_0001_0A00_0001);
        assert_eq!(n.to_string(), "10.0.0.1@tcp1");

        let n: Nid = "0@lo".parse().unwrap();
        assert_eq!(n.0, 0x0009_0000_0000_0000);
        assert_eq!(n.to_string(), "0@lo");

        let n: Nid = "172.16.0.9@o2ib".parse().unwrap();
        assert_eq!(n.net().lnd(), LndType::O2IBLND);
        assert_eq!(n.ipv4(), Some(Ipv4Addr::new(172, 16, 0, 9)));

        let n: Nid = "10.1.2.3@lu2k3".parse().unwrap();
        assert_eq!(n.0, 0x4C32_0003_0A01_0203);
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
    fn helpers_match_the_bit_layout() {
        // 10.1.2.3@lu2k3: LND type 0x4C32, network number 3, address 0x0A01_0203.
        let net = Net::new(LndType::LU2K, 3);
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let nid = Nid::from_net_ip(net, ip);
        assert_eq!(nid.0, 0x4C32_0003_0A01_0203);
        assert_eq!(nid, Nid::from_ipv4(ip, net));
        assert_eq!(nid, Nid::new(net, 0x0A01_0203));
        assert_eq!(nid.net(), net);
        assert_eq!(nid.net().0, 0x4C32_0003);
        assert_eq!(nid.addr(), 0x0A01_0203);
        assert_eq!(nid.ip(), ip);
        assert_eq!(nid.ipv4(), Some(ip));
        assert_eq!(u64::from(nid), nid.0);
        assert_eq!(Nid::from(nid.0), nid);
        // `ip` reads the address of any network; `ipv4` only of IPv4 ones.
        let lo = Nid::new(Net::new(LndType::LOLND, 0), 7);
        assert_eq!(lo.ip(), Ipv4Addr::new(0, 0, 0, 7));
        assert_eq!(lo.ipv4(), None);
        // The shard function reads the same low 32 bits.
        for cores in 1..=8 {
            assert_eq!(
                crate::shard(nid.0, cores),
                crate::shard(u64::from(nid.ip().to_bits()), cores)
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

    proptest! {
        #[test]
        fn every_u64_round_trips(raw in any::<u64>()) {
            let nid = Nid(raw);
            let s = nid.to_string();
            prop_assert_eq!(s.parse::<Nid>(), Ok(nid), "{}", s);
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
                // Whatever parsed must print to something that parses to it again.
                prop_assert_eq!(nid.to_string().parse::<Nid>(), Ok(nid));
            }
        }
    }
}
