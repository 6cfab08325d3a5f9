//! lu2k-kshim: the kernel half of lu2k's split Lustre network driver, run in userspace.
//!
//! It does what an LND kernel module would do on lu2k's side of the shared-ring ABI
//! (`lu2k-ring-abi`): it owns LNet's view — NIDs ([`nid`]), the 72-byte LNet header
//! ([`hdr`]), routes ([`route`]), per-peer and global send credits ([`credit`]) and
//! the TX payload pool ([`pool`]) — and it is the producer of TX descriptors and
//! the consumer of completions and received messages.
//! The transport (connections, the protocol, sockets) is the engine's business;
//! kshim does not know it.

#![deny(unsafe_code)]

pub mod attach;
pub mod credit;
pub mod hdr;
pub mod lnd;
pub mod nid;
pub mod pool;
pub mod route;
pub mod selftest;

pub use lu2k_ring_abi as ring_abi;

pub use lnd::{
    Config, Cookie, Event, GoneReason, Kshim, RxMsg, SendError, StartError, Stats, MAX_PAYLOAD,
};
pub use nid::{LndType, Net, Nid};
pub use pool::TxBuf;
pub use ring_abi::TxStatus;
