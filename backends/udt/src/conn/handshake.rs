//! The connection's side of the handshake, as UDT 4.11's `CUDT::connect`:
//! the client's request, its repetition with the listener's cookie, and the
//! response that establishes the connection. The listener's stateless side
//! is in [`super::listener`].
//!
//! A client retransmits its request every 250 ms until a response comes or
//! [`super::Config::connect_timeout_us`] passes. The server answers a client
//! that keeps asking (its response was lost) with the response again.

use std::net::SocketAddr;

use super::{
    CloseReason, Config, Connection, DropCause, Event, Mode, Role, State, IP_UDP_OVERHEAD, SYN_US,
};
use crate::estimate::Time;
use crate::seq::SeqNo;
use crate::wire::{ControlRepr, HandshakeRepr, ReqType, SocketType};

/// Handshake retransmission interval (UDT4: 250 ms).
const HS_RETRY_US: u64 = 250_000;

/// The first request a connection would send to `peer`: no cookie yet.
pub(super) fn request(
    cfg: &Config,
    socket_id: u32,
    isn: SeqNo,
    buf_pkts: u32,
    peer: SocketAddr,
) -> HandshakeRepr {
    let socket_type = match cfg.mode {
        Mode::Message => SocketType::Dgram,
        Mode::Stream => SocketType::Stream,
    };
    HandshakeRepr {
        version: HandshakeRepr::UDT4_VERSION,
        socket_type,
        isn,
        mss: cfg.mss,
        flight_flag_size: buf_pkts,
        req_type: ReqType::Request,
        socket_id,
        cookie: 0,
        peer_ip: HandshakeRepr::encode_peer_ip(peer.ip()),
    }
}

impl Connection {
    /// Starts a client connection to `peer`: the first handshake request is
    /// queued for [`Connection::poll_transmit`].
    pub fn connect(now: Time, cfg: Config, seed: u64, peer: SocketAddr) -> Connection {
        let mut c = Connection::new(now, cfg, seed, peer, Role::Client);
        c.queue_handshake(0);
        c.req_sent_at = Some(now);
        c
    }

    /// Server side: a connection for a client whose cookie checked out
    /// (called by [`super::Listener`]). Queues the handshake response.
    pub(super) fn accept(
        now: Time,
        cfg: Config,
        seed: u64,
        peer: SocketAddr,
        req: &HandshakeRepr,
    ) -> Self {
        let mut c = Connection::new(now, cfg, seed, peer, Role::Server);
        c.mss = c.mss.min(req.mss).max(64);
        c.payload_size = c.mss.saturating_sub(IP_UDP_OVERHEAD + 16).max(1);
        c.isn = req.isn;
        c.peer_id = req.socket_id;
        c.tx.flow_window = req.flight_flag_size.max(2);
        c.hs = HandshakeRepr {
            isn: req.isn,
            mss: c.mss,
            req_type: ReqType::Response,
            cookie: req.cookie,
            ..c.hs
        };
        c.queue_handshake(c.peer_id);
        c.establish(now);
        c
    }

    fn establish(&mut self, now: Time) {
        self.state = State::Connected;
        self.last_rsp = now;
        self.last_heard = now;
        self.rx.next_ack_time = now + SYN_US;
        self.tx.next_send = now as f64;
        let path = self.path();
        self.cc.init(now, &path);
        self.events.push_back(Event::Connected);
    }

    fn queue_handshake(&mut self, dst: u32) {
        let hs = self.hs;
        self.queue_ctrl(&ControlRepr::Handshake(hs), dst, 0);
    }

    pub(super) fn handle_handshake(&mut self, now: Time, res: &HandshakeRepr) {
        match (self.role, self.state) {
            (Role::Client, State::Connecting) => self.handle_listener_reply(now, res),
            (Role::Server, State::Connected)
                if res.socket_id == self.peer_id
                    && res.req_type == ReqType::Response
                    && res.cookie == self.hs.cookie =>
            {
                // Our response was lost: the client keeps asking, with the
                // cookie that validated its address (UDT4's client repeats
                // its request with the cookie once it has one). Anything
                // else is not answered: a reply only to what proved it. Not
                // news of the peer (last_heard stays): anyone who saw the
                // request can repeat it. The EXP timer restarts as it does for
                // any packet in UDT4, so an idle server neither backs off its
                // keep-alives nor probes earlier than a UDT4 server would (on the
                // sealed wire the engine stops passing repeats on once the
                // client's first sealed datagram opened).
                if self.tx.next == self.tx.una {
                    self.exp_count = 1;
                    self.last_rsp = now;
                }
                self.queue_handshake(self.peer_id);
            }
            _ => self.stats.count_drop(DropCause::BadHandshake),
        }
    }

    /// A connecting client hears from the listener: a cookie, a rejection or
    /// the response.
    fn handle_listener_reply(&mut self, now: Time, res: &HandshakeRepr) {
        // The listener echoes our handshake (UDT4 `CUDT::listen`): a cookie
        // or a rejection that does not carry our socket ID and ISN was not
        // an answer to us, and must not change or close the attempt.
        if matches!(res.req_type, ReqType::Request | ReqType::Rejected)
            && (res.socket_id != self.hs.socket_id || res.isn != self.isn)
        {
            self.stats.count_drop(DropCause::BadHandshake);
            return;
        }
        match res.req_type {
            ReqType::Request if self.hs.req_type == ReqType::Response => {
                // A cookie answering one of our retries: already using it.
            }
            ReqType::Request => {
                // The listener's cookie: repeat the request with it.
                self.hs.req_type = ReqType::Response;
                self.hs.cookie = res.cookie;
                self.queue_handshake(0);
                self.last_req_time = now;
                self.req_sent_at = Some(now);
            }
            ReqType::Rejected => self.shut(CloseReason::Rejected),
            ReqType::Response if res.isn == self.isn && res.socket_id != 0 => {
                self.complete_connect(now, res);
            }
            _ => self.stats.count_drop(DropCause::BadHandshake),
        }
    }

    /// The server's response: take its MSS, socket ID and flow window, and
    /// the handshake's round trip as the first RTT sample if only one
    /// request was out (Karn).
    fn complete_connect(&mut self, now: Time, res: &HandshakeRepr) {
        self.mss = res.mss.clamp(64, self.mss);
        self.payload_size = self.mss.saturating_sub(IP_UDP_OVERHEAD + 16).max(1);
        self.peer_id = res.socket_id;
        self.tx.flow_window = res.flight_flag_size.max(2);
        if let Some(t) = self.req_sent_at {
            let sample = now.saturating_sub(t).clamp(1, u64::from(u32::MAX)) as u32;
            self.tx.rtt.on_sample(sample);
            self.tx.own_min_rtt = sample;
            self.tx.min_rtt.on_sample(now, sample, 0);
            self.rx.rtt.on_sample(sample);
        }
        self.establish(now);
    }

    /// While connecting: when the request is next repeated, or the attempt
    /// ends.
    pub(super) fn handshake_deadline(&self) -> Time {
        (self.last_req_time + HS_RETRY_US).min(self.connect_deadline)
    }

    /// While connecting: gives up at the connect deadline, or repeats the
    /// request.
    pub(super) fn handshake_timer(&mut self, now: Time) {
        if now >= self.connect_deadline {
            self.shut(CloseReason::ConnectTimeout);
        } else if now >= self.last_req_time + HS_RETRY_US {
            // A response may now answer either request: no RTT
            // sample from it (Karn).
            self.queue_handshake(0);
            self.last_req_time = now;
            self.req_sent_at = None;
        }
    }
}
