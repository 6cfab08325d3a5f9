//! The transport back-ends behind one interface.
//!
//! A back-end is what one core thread runs once the daemon has attached to kshim and
//! handed the core its ring set ([`lu2k_ring_abi::EngineCore`]) and memory
//! ([`crate::sys::CoreMem`]): the UDT back-end ([`crate::core::CoreLoop`], UDT4 over
//! UDP through the io_uring or epoll [`crate::io::DatagramIo`]) and the RDS back-end
//! ([`crate::rds::RdsCore`], `AF_RDS` over `rds_tcp`). The daemon picks one per
//! `--backend` and drives every core through this trait.
//!
//! The contract every back-end keeps, whatever its transport:
//! - every TX descriptor taken ends in exactly one TX completion (`Ok` or a failure
//!   status), and TX pool memory is not referenced after its completion;
//! - received messages are published as RX descriptors whose extents point where
//!   the payload landed in the RX pool (lu2k copies no payload), and every buffer
//!   kshim returns goes back into service;
//! - statistics are published to the daemon's stats server;
//! - when the shared draining flag is set (SIGTERM, kshim gone): no new messages,
//!   in-flight ones drained or failed back `Shutdown` within the drain timeout, RX
//!   buffers awaited, then `run` returns.

/// One core's back-end loop. See the module doc for the contract.
pub trait CoreBackend {
    /// The back-end's name (`"udt"`, `"rds"`).
    fn name(&self) -> &'static str;
    /// Runs the core until shutdown.
    fn run(self: Box<Self>);
}

impl CoreBackend for crate::core::CoreLoop {
    fn name(&self) -> &'static str {
        "udt"
    }
    fn run(self: Box<Self>) {
        crate::core::CoreLoop::run(*self)
    }
}

impl CoreBackend for crate::rds::RdsCore {
    fn name(&self) -> &'static str {
        "rds"
    }
    fn run(self: Box<Self>) {
        crate::rds::RdsCore::run(*self)
    }
}
