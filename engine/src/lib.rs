//! lu2k-engine: the daemon that moves LNet messages between the shared ring region
//! (served by the kernel half) and the network, one reactor per core.
//!
//! The pieces, top down:
//! - [`daemon`]: attach to the kernel half, spawn one shard per ring set, signals,
//!   configuration ([`daemon::config`]) and statistics ([`daemon::stats`]);
//! - [`shard`]: one core's loop, written once: the ring side
//!   ([`shard::ring`]: descriptors, validation, the message ledger, completions, RX
//!   publication) and the spin-then-sleep policy ([`shard::spin`]), generic over
//! - [`transport`]: what carries messages, behind [`transport::Transport`] (sans-IO
//!   verbs: `handle_*` in, `poll_*` out): [`transport::udt`] (UDT4 over UDP) and
//!   [`transport::rds`] (`AF_RDS`);
//! - [`io`]: datagram I/O providers for the UDT transport behind
//!   [`io::DatagramIo`]: [`io::uring`] (io_uring: SENDMSG_ZC, multishot recvmsg,
//!   provided buffers), [`io::epoll`] (epoll + sendmmsg/recvmmsg) and [`io::sim`]
//!   (virtual time, for tests), chosen by [`io::probe`]; [`io::sys`] is the syscall
//!   edge and holds every raw-pointer accessor of the core's memory;
//! - [`steer`]: which core owns a peer, and the classic-BPF program that makes the
//!   kernel deliver a peer's packets to that core's socket.
//!
//! Only `io::sys`, `io::uring`, `io::epoll` and `transport::rds` (its `sendmsg`
//! iovecs and io_uring `RECVMSG`) contain `unsafe`; each block says why it is sound.

#![deny(unsafe_code)]

pub mod daemon;
pub mod io;
pub mod log;
pub mod shard;
pub mod steer;
pub mod transport;
