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

#![deny(unsafe_code)]

pub mod loss;
pub mod seq;
pub mod wire;

pub mod cc;
pub mod conn;
pub mod estimate;
