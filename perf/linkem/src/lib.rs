//! lu2k-linkem: a seeded impairment model of a network link, and drivers for it.
//!
//! - [`Link`] is one direction of a link on virtual time: a rate-limited
//!   bottleneck with a finite buffer, propagation delay, jitter with or without
//!   reordering, Bernoulli or Gilbert–Elliott loss, duplication and scheduled
//!   outages. It is sans-IO and deterministic: no clock reads, no OS
//!   randomness; the same seed gives the same trace. The [`link`] module docs
//!   describe the model exactly.
//! - [`Duplex`] pairs two directions with their own settings (asymmetric links).
//! - [`Config`] / [`DuplexConfig`] are the settings as a scenario file (TOML)
//!   states them, validated with errors that name the field.
//! - [`Relay`] drives a `Duplex` on the real clock between two UDP sockets on
//!   loopback: the rootless link emulator.
//! - [`TunLink`] drives one between TUN devices in two network namespaces, so
//!   that any traffic of the real kernel stack (TCP included) crosses it; root
//!   only.
//!
//! Simulations drive the model on virtual time; the harness's link emulator
//! drives the very same model on a real clock.
//!
//! ```
//! use lu2k_linkem::{Config, Instant, Link, Loss};
//!
//! // A GEO-like forward path: 100 Mbit/s, 300 ms one way, 1 % random loss.
//! let cfg = Config {
//!     rate_mbps: Some(100.0),
//!     queue_bytes: Some(1_000_000),
//!     delay_ms: 300.0,
//!     loss: Loss::Bernoulli { rate: 0.01 },
//!     ..Config::default()
//! };
//! let mut link: Link<Vec<u8>> = Link::new(cfg, 42)?;
//! // Offer datagrams at the caller's virtual `now` ...
//! let now = Instant::ZERO;
//! let _fate = link.handle_datagram(now, 1250, vec![0; 1250]);
//! // ... then step virtual time to each deadline and take what has arrived.
//! while let Some(t) = link.poll_deadline() {
//!     while let Some(datagram) = link.poll_deliver(t) {
//!         // 300 ms propagation + 100 µs serialization of 1250 bytes.
//!         assert_eq!(t.as_nanos(), 300_100_000);
//!         assert_eq!(datagram.len(), 1250);
//!     }
//! }
//! # Ok::<(), lu2k_linkem::ConfigError>(())
//! ```

#![deny(unsafe_code)]

pub mod config;
pub mod duplex;
pub mod link;
pub mod relay;
#[allow(unsafe_code)]
mod sys;
pub mod time;
pub mod tun;

pub use config::{Config, ConfigError, DuplexConfig, Loss, Outage};
pub use duplex::{Direction, Duplex};
pub use link::{Count, DropReason, Fate, Link, Stats};
pub use relay::{Relay, RelayConfig, RelayError, RelayStats};
pub use sys::set_realtime;
pub use time::Instant;
pub use tun::{Netns, TunConfig, TunLink};
