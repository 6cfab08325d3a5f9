//! lu2k-kshim: the kernel half of lu2k's split Lustre network driver, run in userspace.
//!
//! It does what an LND kernel module would do on lu2k's side of the shared-ring ABI
//! (`lu2k-ring-abi`): it owns LNet's view — the 72-byte LNet header ([`hdr`]), routes
//! ([`route`]), per-peer and global send credits ([`credit`]) and the TX payload pool
//! ([`pool`]) — and it is the producer of TX descriptors and the consumer of
//! completions and received messages.
//! The transport (connections, the protocol, sockets) is the engine's business;
//! kshim does not know it. When an engine dies kshim fails its messages back and
//! takes the next engine's attach ([`lnd`], "Liveness and the next engine"); how
//! each completion status reads to LNet, and which ones LNet resends, is [`lnet`].
//!
//! What both halves must agree on — the region, the attach handshake ([`attach`]),
//! NIDs ([`nid`]) and [`MAX_PAYLOAD`] — is defined in `lu2k-ring-abi` and re-exported
//! here at the paths kshim's users already name.

#![deny(unsafe_code)]

pub mod credit;
pub mod hdr;
pub mod lnd;
pub mod lnet;
pub mod pool;
pub mod route;
pub mod selftest;

pub use lu2k_ring_abi as ring_abi;
pub use lu2k_ring_abi::{attach, nid};

pub use lnd::{Config, Cookie, Event, GoneReason, Kshim, RxMsg, SendError, StartError, Stats};
pub use lu2k_ring_abi::{LndType, Net, Nid, MAX_PAYLOAD};
pub use pool::TxBuf;
pub use ring_abi::TxStatus;
