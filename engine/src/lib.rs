//! lu2k-engine: the daemon that moves LNet messages between the shared ring region
//! (served by kshim) and the network, one io_uring reactor per core.
//!
//! Layers, bottom up:
//! - [`sys`]: the syscall edge (sockets, socket options, BPF, mmsg calls, mappings);
//! - [`io`]: the datagram I/O contract a core drives, with two implementations,
//!   [`uring`] (fast: SENDMSG_ZC, multishot recvmsg, provided buffers) and [`epoll`]
//!   (slow: epoll + sendmmsg/recvmmsg), chosen by [`probe`];
//! - [`steer`]: which core owns a peer, and the classic-BPF program that makes the
//!   kernel deliver a peer's packets to that core's socket;
//! - [`config`], [`stats`]: operating the daemon.
//!
//! Only `sys`, `uring` and `epoll` contain `unsafe`; each block says why it is sound.

#![deny(unsafe_code)]

pub mod backend;
pub mod config;
pub mod core;
pub mod daemon;
pub mod epoll;
pub mod io;
pub mod probe;
pub mod rds;
pub mod spin;
pub mod stats;
pub mod steer;
pub mod sys;
pub mod uring;
