//! The server side of the handshake: a stateless listener with SYN cookies,
//! as UDT 4.11's `CUDT::listen(sockaddr*, CPacket&)`.
//!
//! A first request (`req_type` 1, destination socket 0) is answered with the
//! same handshake carrying a cookie derived from a secret, the client's
//! address and the current minute; nothing is stored. A request repeated
//! with a valid cookie (this minute's or the previous one's) and a matching
//! version and socket type creates a [`Connection`], which queues the
//! handshake response. A mismatch is answered with `Rejected` (1002).
//!
//! The engine routes datagrams with destination socket 0 here — except
//! handshakes from a client it already has a connection for (same address
//! and [`handshake_socket_id`]): those go to that connection, which repeats
//! its response.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;

use super::{Config, Connection, DropCause, Header, Mode, CTRL_MAX};
use crate::estimate::Time;
use crate::wire::{ControlRepr, HandshakeRepr, Packet, ReqType, SocketType};

/// What the listener made of a datagram.
#[derive(Debug)]
pub enum ListenerOutput {
    /// Send this datagram back to the peer (cookie, or rejection).
    Reply(Header),
    /// A new connection; its handshake response is queued in it.
    Accept(Box<Connection>),
    /// Dropped (counted by the caller).
    Drop(DropCause),
}

/// The client socket ID a handshake datagram carries, if it is one.
pub fn handshake_socket_id(datagram: &[u8]) -> Option<u32> {
    let pkt = Packet::new_checked(datagram).ok()?;
    match ControlRepr::parse(&pkt).ok()? {
        ControlRepr::Handshake(hs) => Some(hs.socket_id),
        _ => None,
    }
}

/// A UDT listener. See the module docs.
#[derive(Debug)]
pub struct Listener {
    cfg: Config,
    secret: u64,
    seeds: u64,
    start: Time,
    accepted: u64,
}

impl Listener {
    /// A listener whose connections use `cfg`; `seed` gives the cookie secret
    /// and the seeds of the connections it creates.
    pub fn new(now: Time, cfg: Config, seed: u64) -> Listener {
        Listener {
            cfg,
            secret: seed ^ 0x5DEE_CE66_D1CE_4E5B,
            seeds: seed,
            start: now,
            accepted: 0,
        }
    }

    /// Number of connections accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    fn cookie(&self, peer: SocketAddr, minute: u64) -> u32 {
        let mut h = DefaultHasher::new();
        self.secret.hash(&mut h);
        peer.hash(&mut h);
        minute.hash(&mut h);
        h.finish() as u32
    }

    /// Handles one datagram addressed to socket 0 from `peer`.
    pub fn handle(&mut self, now: Time, peer: SocketAddr, datagram: &[u8]) -> ListenerOutput {
        let Ok(pkt) = Packet::new_checked(datagram) else {
            return ListenerOutput::Drop(DropCause::Malformed);
        };
        if pkt.dst_socket_id() != 0 {
            return ListenerOutput::Drop(DropCause::WrongSocket);
        }
        let Ok(ControlRepr::Handshake(hs)) = ControlRepr::parse(&pkt) else {
            return ListenerOutput::Drop(DropCause::BadHandshake);
        };
        let minute = now.saturating_sub(self.start) / 60_000_000;
        let cookie = self.cookie(peer, minute);
        match hs.req_type {
            ReqType::Request => {
                let reply = HandshakeRepr { cookie, ..hs };
                ListenerOutput::Reply(emit(&reply, hs.socket_id))
            }
            ReqType::Response => {
                let ok = hs.cookie == cookie
                    || (minute > 0 && hs.cookie == self.cookie(peer, minute - 1));
                if !ok {
                    return ListenerOutput::Drop(DropCause::BadHandshake);
                }
                let want = match self.cfg.mode {
                    Mode::Message => SocketType::Dgram,
                    Mode::Stream => SocketType::Stream,
                };
                if hs.version != HandshakeRepr::UDT4_VERSION || hs.socket_type != want {
                    let reply = HandshakeRepr {
                        req_type: ReqType::Rejected,
                        ..hs
                    };
                    return ListenerOutput::Reply(emit(&reply, hs.socket_id));
                }
                self.accepted += 1;
                let seed = self
                    .seeds
                    .wrapping_add(self.accepted.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let conn = Connection::accept(now, self.cfg.clone(), seed, peer, &hs);
                ListenerOutput::Accept(Box::new(conn))
            }
            _ => ListenerOutput::Drop(DropCause::BadHandshake),
        }
    }
}

fn emit(hs: &HandshakeRepr, dst: u32) -> Header {
    let mut h = Header::new();
    let repr = ControlRepr::Handshake(*hs);
    let len = repr.buffer_len();
    debug_assert!(len <= CTRL_MAX);
    repr.emit(&mut Packet::new_unchecked(&mut h.buf_mut()[..]), 0, dst);
    h.set_len(len);
    h
}
