//! Transports: what carries a core's messages to its peers, behind one interface.
//!
//! The per-core skeleton ([`crate::shard::Shard`]) owns the ring side: it takes and
//! validates TX descriptors, keeps the message ledger, writes completions, publishes
//! RX descriptors and takes buffer returns. A transport owns the network side: its
//! sockets, its protocol state and its I/O provider. They meet in this trait, in the
//! sans-IO style of quinn-proto: the skeleton hands a transport inputs (`handle_*`),
//! then polls it for what happened (`poll_*`). A transport never calls back into the
//! ring side; everything it has to say to kshim is a [`Event`].
//!
//! Two transports implement it: [`udt::Udt`] (UDT4 over UDP, through a
//! [`crate::io::DatagramIo`] provider: io_uring, epoll, or virtual time in tests) and
//! [`rds::Rds`] (`AF_RDS` over `rds_tcp`).
//!
//! # The contract
//!
//! - Every message handed in by [`Transport::handle_send`] comes back exactly once
//!   as [`Event::Sent`], `Ok` or with a failure status, and only once no send
//!   references its memory any more.
//! - A received message is reported as [`Event::Received`]: the pieces of RX pool
//!   buffers that hold `[LNet header | payload]`, in order, and the buffer
//!   references they hold. Those come back through [`Transport::handle_return`]
//!   when kshim is done with them (or at once, when the skeleton cannot publish).
//! - Order of calls in one pass of the loop: `handle_send`/`handle_return` as the
//!   rings give work, [`Transport::poll_transmit`], the wait
//!   ([`Transport::arm_doorbell`], [`Transport::wait`]), [`Transport::handle_timeout`],
//!   then [`Transport::poll_event`] until `None`.

use std::net::IpAddr;
use std::time::Instant;

use lu2k_ring_abi::{TxStatus, WaitMode};

use crate::daemon::stats::CoreStats;

pub mod links;
pub mod rds;
pub mod seal;
pub mod udt;

/// A validated message the skeleton hands to a transport.
#[derive(Debug, Clone)]
pub struct OutMsg {
    /// The skeleton's message id (returned in [`Event::Sent`]).
    pub id: u64,
    /// Destination peer (the address of its NID, canonical: an IPv4-mapped address is the IPv4 one).
    pub peer: IpAddr,
    /// Where the message's 72-byte LNet header was copied: `(offset, len)` in the
    /// core's TX range (see [`crate::io::TxMem`]).
    pub hdr: (u64, u32),
    /// The payload: `(offset, len)` pieces in the core's TX range, adjacent extents
    /// already merged.
    pub payload: Vec<(u64, u32)>,
    /// Payload bytes (the LNet header not counted).
    pub payload_len: u32,
}

/// A piece of a received message: `len` bytes at `off` of RX buffer `bid` (the
/// core's own buffer numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPiece {
    /// Buffer id.
    pub bid: u16,
    /// Offset in the buffer.
    pub off: u32,
    /// Length.
    pub len: u32,
}

/// What a transport reports to the skeleton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Message `id` ended: its TX memory is kshim's again.
    Sent {
        /// The id from [`OutMsg::id`].
        id: u64,
        /// How it ended.
        status: TxStatus,
        /// The completion's detail (an errno for failures the kernel explained).
        detail: u32,
    },
    /// A whole message arrived.
    Received {
        /// The sender.
        peer: IpAddr,
        /// Where `[LNet header | payload]` landed, in order.
        pieces: Vec<RxPiece>,
        /// Buffer references the message holds, handed back through
        /// [`Transport::handle_return`].
        bufs: Vec<u16>,
    },
    /// The peer stopped answering.
    PeerDown(IpAddr),
    /// The peer answers again.
    PeerUp(IpAddr),
}

/// What one wait brought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Woken {
    /// Something arrived from outside: a datagram or message, or kshim's doorbell.
    pub arrived: bool,
    /// Anything but the timer fired (sends finished, errors reported, ...).
    pub useful: bool,
}

/// One core's transport. See the module doc for the contract and the call order.
pub trait Transport {
    /// Short name (`"udt"`, `"rds"`).
    fn name(&self) -> &'static str;

    /// The transport's clock: the real one, or virtual time under test.
    fn now(&self) -> Instant;

    /// Takes a message to send.
    fn handle_send(&mut self, msg: OutMsg);

    /// kshim gave back buffer references of a received message.
    fn handle_return(&mut self, bufs: &[u16]);

    /// Fails every message not yet ended with `status` (each still ends with one
    /// [`Event::Sent`], once no send references its memory).
    fn handle_abort_all(&mut self, status: TxStatus);

    /// Runs timers and turns protocol events into [`Event`]s.
    fn handle_timeout(&mut self);

    /// Sends what is due; whether anything went out.
    #[must_use]
    fn poll_transmit(&mut self) -> bool;

    /// The next event for the skeleton.
    #[must_use]
    fn poll_event(&mut self) -> Option<Event>;

    /// When [`Transport::handle_timeout`] must run next.
    #[must_use]
    fn poll_timeout(&self) -> Option<Instant>;

    /// Whether transmits wait for the I/O layer to take them (no sleep then).
    fn has_backlog(&self) -> bool;

    /// How the core must arm kshim's doorbell before [`Transport::arm_doorbell`].
    fn doorbell_mode(&self) -> WaitMode;

    /// Asks the next wait to end when kshim rings (see
    /// [`crate::io::DatagramIo::arm_doorbell`]).
    fn arm_doorbell(&mut self, futex_seq: u32);

    /// Waits for I/O until `deadline` (when `block`; otherwise takes what is ready)
    /// and handles what came.
    fn wait(&mut self, deadline: Option<Instant>, block: bool) -> std::io::Result<Woken>;

    /// How the blocking waits that follow may gather completions (see
    /// [`crate::io::Gather`]); a transport whose I/O cannot ignores it.
    fn set_gather(&mut self, _gather: Option<crate::io::Gather>) {}

    /// Sends still referencing TX memory.
    fn sends_in_flight(&self) -> usize;

    /// Ends the transport at shutdown: connections closed, nothing in flight in the
    /// kernel that references the core's memory.
    fn close(&mut self);

    /// Writes the transport's counters into `out` (I/O, peers, its own drops).
    fn stats(&mut self, out: &mut CoreStats);
}
