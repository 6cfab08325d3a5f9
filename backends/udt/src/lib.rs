//! lu2k-udt: a sans-IO UDT transport core, wire-compatible with UDT 4.11.
//!
//! Layers, bottom up:
//!
//! * [`wire`]: packet formats — zero-copy views ([`wire::Packet`]) and
//!   representations ([`wire::DataHeader`], [`wire::ControlRepr`]) whose
//!   parsers never panic on any input.
//! * [`seq`]: 31-bit sequence numbers and 29-bit message numbers with UDT4's
//!   wrap-around arithmetic.
//! * [`loss`]: the sender's and the receiver's loss lists as sorted ranges.
//! * [`estimate`]: RTT, arrival rate and link capacity estimators.
//! * [`cc`]: congestion control behind a trait (UDT4's native algorithm and
//!   a controller for satellite paths).
//! * [`conn`]: the sans-IO connection and the SYN-cookie listener.
//!
//! Proof against the reference: `tests/wire_udt4.rs` speaks to UDT 4.11
//! with nothing but [`wire`], `tests/interop_udt4.rs` runs a [`conn`]
//! connection against it; `fuzz/` holds the cargo-fuzz targets (packet
//! decoder, connection), whose checks also run on stable as property tests.

#![deny(unsafe_code)]

pub mod loss;
pub mod seq;
pub mod wire;

pub mod cc;
pub mod conn;
pub mod estimate;
pub mod fec;
