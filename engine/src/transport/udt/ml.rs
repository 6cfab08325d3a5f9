//! Multi-link peers inside the UDT transport: the hooks [`Udt`] calls where a
//! message is sent, a datagram arrives, a connection reports, and the timers
//! run. The policy, the silence rule, the message numbers and the receiver's
//! duplicate check are [`crate::transport::links`]; this is where they meet
//! the connections.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use lu2k_ring_abi::TxStatus;
use lu2k_udt::conn::{CloseReason, Connection};

use super::{ConnEntry, Dir, Event, Udt, RX_STALL_US};
use crate::transport::links::{self, Dedup, LinkState, LinkStats, LinkTable, Links, EXT_LEN};

/// A UDT data header with the multi-link extension after it.
pub(super) type ExtHeader = [u8; 16 + EXT_LEN];

/// What the transport keeps for its multi-link peers.
#[derive(Debug)]
pub(super) struct MultiLink {
    table: LinkTable,
    /// This transport's sender session, in every extension it writes.
    session: u32,
    /// Per multi-link peer (by NID address) that was sent to.
    peers: BTreeMap<IpAddr, Links>,
    /// Delivered message numbers per multi-link peer.
    dedup: HashMap<IpAddr, Dedup>,
    /// TX connection → (peer, link).
    tx: HashMap<u32, (IpAddr, usize)>,
    /// Receiving connections of multi-link peers.
    rx: HashMap<u32, RxConn>,
    /// Messages to multi-link peers in flight.
    msgs: HashMap<u64, MlMsg>,
}

#[derive(Debug)]
struct RxConn {
    peer: IpAddr,
    /// `(session, number)` of the messages whose first packet arrived, by UDT
    /// message number.
    ids: HashMap<u32, (u32, u64)>,
    /// When a valid datagram last arrived (µs).
    heard: u64,
}

#[derive(Debug, Clone, Copy)]
struct MlMsg {
    peer: IpAddr,
    seq: u64,
    link: usize,
    /// The connection carrying it now (0: none yet).
    sock: u32,
    len: u64,
}

/// First packets remembered per receiving connection, at most: more is a
/// sender that never finishes its messages.
const MAX_IDS: usize = 8192;

impl Udt {
    /// Spreads the messages of the multi-link peers in `table` over their links
    /// (see [`crate::transport::links`]). A peer not in the table keeps one
    /// connection and UDT4's wire.
    pub fn with_links(mut self, table: LinkTable) -> Udt {
        if table.is_empty() {
            return self;
        }
        let s = self.p.seed ^ u64::from(self.p.core).rotate_left(40);
        let session = ((s >> 32) as u32 ^ s as u32) | 1;
        self.ml = Some(Box::new(MultiLink {
            table,
            session,
            peers: BTreeMap::new(),
            dedup: HashMap::new(),
            tx: HashMap::new(),
            rx: HashMap::new(),
            msgs: HashMap::new(),
        }));
        self
    }

    /// The peer an address belongs to (its NID address for a link's address).
    pub(super) fn ml_canonical(&self, ip: IpAddr) -> IpAddr {
        self.ml.as_ref().map_or(ip, |m| m.table.canonical(ip))
    }

    /// Sends message `id` of `len` bytes to `ip` over one of its links, if `ip`
    /// is a multi-link peer: `Some(queued)`, else `None`.
    pub(super) fn ml_send(&mut self, ip: IpAddr, id: u64, len: u32, now: u64) -> Option<bool> {
        let ml = self.ml.as_mut()?;
        let cfg = ml.table.peer(ip)?.clone();
        let links = ml.peers.entry(ip).or_insert_with(|| Links::new(cfg, now));
        let seq = links.next_seq();
        let link = links.pick(u64::from(len), None)?;
        ml.msgs.insert(
            id,
            MlMsg {
                peer: ip,
                seq,
                link,
                sock: 0,
                len: u64::from(len),
            },
        );
        let ok = self.ml_put(id, link, now);
        // The other links connect too: a standby link is ready when needed.
        self.ml_dial(ip, now);
        Some(ok)
    }

    /// Queues message `id` (known to [`MultiLink::msgs`]) on link `link`.
    fn ml_put(&mut self, id: u64, link: usize, now: u64) -> bool {
        let Some(m) = self.ml.as_ref().and_then(|ml| ml.msgs.get(&id)).copied() else {
            return false;
        };
        let sock = self.ml_tx_conn(m.peer, link, now);
        let Some(e) = self.conns.get_mut(&sock) else {
            return false;
        };
        if e.conn.send(now, id, m.len, None).is_err() {
            return false;
        }
        let ml = self.ml.as_mut().expect("multi-link");
        if let Some(r) = ml.msgs.get_mut(&id) {
            r.link = link;
            r.sock = sock;
        }
        if let Some(l) = ml.peers.get_mut(&m.peer) {
            l.assign(link, m.len, now);
        }
        true
    }

    /// Link `link`'s TX connection to `ip`, dialled if it has none (or it
    /// closed).
    fn ml_tx_conn(&mut self, ip: IpAddr, link: usize, now: u64) -> u32 {
        let ml = self.ml.as_mut().expect("multi-link");
        let l = &ml.peers.get(&ip).expect("peer links").links[link];
        if let Some(s) = l.tx_sock {
            if self.conns.get(&s).is_some_and(|e| !e.conn.is_closed()) {
                return s;
            }
        }
        let remote = l.cfg.remote;
        let mut cfg = self.p.udt.clone();
        // Room for the extension in a message's first packet.
        cfg.mss = cfg.mss.saturating_sub(EXT_LEN as u32);
        let conn = loop {
            self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let c = Connection::connect(now, cfg.clone(), self.seed, remote);
            if !self.conns.contains_key(&c.socket_id()) {
                break c;
            }
            self.drop_one("tx_socket_id_collision");
        };
        let sock = conn.socket_id();
        self.conns
            .insert(sock, ConnEntry::new(conn, ip, Dir::Tx, now));
        let ml = self.ml.as_mut().expect("multi-link");
        ml.tx.insert(sock, (ip, link));
        let links = ml.peers.get_mut(&ip).expect("peer links");
        links.dialled(link, now);
        let l = &mut links.links[link];
        l.tx_sock = Some(sock);
        if l.state == LinkState::Up {
            l.state = LinkState::Connecting;
        }
        sock
    }

    /// Dials every link of `ip` that has no connection.
    fn ml_dial(&mut self, ip: IpAddr, now: u64) {
        let n = self
            .ml
            .as_ref()
            .and_then(|m| m.peers.get(&ip))
            .map_or(0, |l| l.links.len());
        for i in 0..n {
            self.ml_tx_conn(ip, i, now);
        }
    }

    /// The headers of `self.transmits[start..]` from connection `sock`: with
    /// the extension for a multi-link message's first packet; `None` if `sock`
    /// is no multi-link connection.
    pub(super) fn ml_headers(&self, sock: u32, start: usize) -> Option<Vec<Option<ExtHeader>>> {
        let ml = self.ml.as_ref()?;
        ml.tx.get(&sock)?;
        Some(
            self.transmits[start..]
                .iter()
                .map(|t| {
                    let p = t.payload?;
                    let h = t.header.as_bytes();
                    if p.offset != 0 || h.len() != 16 {
                        return None;
                    }
                    let m = ml.msgs.get(&p.msg)?;
                    let mut b = [0u8; 16 + EXT_LEN];
                    b[..16].copy_from_slice(h);
                    b[16..].copy_from_slice(&links::write_ext(ml.session, m.seq));
                    Some(b)
                })
                .collect(),
        )
    }

    /// A datagram `dlen` bytes at `at` of RX buffer `bid` from `from`: if it
    /// begins a message on a multi-link peer's connection, takes the
    /// extension off (the UDT header moves over it, in place) and notes the
    /// message's number. Returns where the datagram UDT sees lies; `None`:
    /// drop it (a first packet without the extension).
    pub(super) fn ml_strip(
        &mut self,
        from: SocketAddr,
        bid: u16,
        at: u32,
        dlen: u32,
    ) -> Option<(u32, u32)> {
        let Some(ml) = self.ml.as_mut() else {
            return Some((at, dlen));
        };
        let b = self.io.rx_bytes(bid, at, dlen)?;
        if !links::begins_message(b) {
            return Some((at, dlen));
        }
        let dst = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        let Some(rc) = ml.rx.get_mut(&dst) else {
            return Some((at, dlen));
        };
        if ml.table.canonical(from.ip()) != rc.peer {
            // Not the connection's peer: the connection refuses it.
            return Some((at, dlen));
        }
        let Some((session, seq)) = links::read_ext(&b[16..]) else {
            *self.drops.entry("rx_ml_unframed".into()).or_default() += 1;
            return None;
        };
        let no = links::msg_no(b);
        let b = self.io.rx_bytes_mut(bid, at, dlen)?;
        b.copy_within(0..16, EXT_LEN);
        if rc.ids.len() >= MAX_IDS {
            rc.ids.clear();
        }
        rc.ids.insert(no, (session, seq));
        Some((at + EXT_LEN as u32, dlen - EXT_LEN as u32))
    }

    /// Whether connection `sock` of a multi-link peer was last heard longer
    /// than `grain` µs ago (its link's clock needs a valid datagram).
    pub(super) fn ml_stale(&self, sock: u32, now: u64, grain: u64) -> bool {
        let Some(ml) = self.ml.as_ref() else {
            return false;
        };
        if let Some(rc) = ml.rx.get(&sock) {
            return now.saturating_sub(rc.heard) >= grain;
        }
        if let Some((ip, i)) = ml.tx.get(&sock) {
            return ml
                .peers
                .get(ip)
                .is_some_and(|l| now.saturating_sub(l.links[*i].last_heard) >= grain);
        }
        false
    }

    /// Data packets went out on connection `sock`.
    pub(super) fn ml_sent(&mut self, sock: u32, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        if let Some(&(ip, i)) = ml.tx.get(&sock) {
            if let Some(l) = ml.peers.get_mut(&ip) {
                l.sent(i, now);
            }
        }
    }

    /// A valid datagram on connection `sock`.
    pub(super) fn ml_heard(&mut self, sock: u32, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        if let Some(rc) = ml.rx.get_mut(&sock) {
            rc.heard = rc.heard.max(now);
        } else if let Some(&(ip, i)) = ml.tx.get(&sock) {
            if let Some(l) = ml.peers.get_mut(&ip) {
                l.heard(i, now);
            }
        }
    }

    /// A connection accepted from peer `ip`.
    pub(super) fn ml_accepted(&mut self, sock: u32, ip: IpAddr, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        if ml.table.peer(ip).is_some() {
            ml.rx.insert(
                sock,
                RxConn {
                    peer: ip,
                    ids: HashMap::new(),
                    heard: now,
                },
            );
        }
    }

    /// Connection `sock` connected.
    pub(super) fn ml_connected(&mut self, sock: u32, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        if let Some(&(ip, i)) = ml.tx.get(&sock) {
            if let Some(l) = ml.peers.get_mut(&ip) {
                if l.links[i].tx_sock == Some(sock) {
                    if l.links[i].state != LinkState::Up {
                        tracing::info!(
                            peer = %ip,
                            link = i,
                            remote = %l.links[i].cfg.remote,
                            "link up"
                        );
                    }
                    l.connected(i, now);
                }
            }
        }
    }

    /// Whether a report of connection `sock` about message `msg` is stale: the
    /// message moved to another connection since.
    pub(super) fn ml_moved(&self, sock: u32, msg: u64) -> bool {
        self.ml
            .as_ref()
            .and_then(|m| m.msgs.get(&msg))
            .is_some_and(|m| m.sock != sock)
    }

    /// Message `msg` was dropped by its connection `sock` (it closed): goes
    /// again on another link if the peer has one; `true` if it did.
    pub(super) fn ml_dropped(&mut self, sock: u32, msg: u64, now: u64) -> bool {
        let Some(ml) = self.ml.as_mut() else {
            return false;
        };
        let Some(m) = ml.msgs.get(&msg).copied() else {
            return false;
        };
        if m.sock != sock {
            return true;
        }
        if self
            .msgs
            .get(&msg)
            .is_none_or(|t| t.acked || t.failed.is_some())
        {
            return false;
        }
        let Some(l) = ml.peers.get_mut(&m.peer) else {
            return false;
        };
        let Some(j) = l.pick(m.len, Some(m.link)) else {
            return false;
        };
        l.unassign(m.link, m.len, false, now);
        if let Some(r) = ml.msgs.get_mut(&msg) {
            r.sock = 0;
        }
        self.ml_put(msg, j, now)
    }

    /// Whether a message connection `sock` delivered whole (UDT message number
    /// `msg_no`) was delivered before, over this or another link of its peer.
    pub(super) fn ml_duplicate(&mut self, sock: u32, msg_no: u32) -> bool {
        let Some(ml) = self.ml.as_mut() else {
            return false;
        };
        let Some(rc) = ml.rx.get_mut(&sock) else {
            return false;
        };
        let id = rc.ids.remove(&msg_no);
        // First packets of messages before this one are stale (retransmitted
        // after their message was delivered): UDT delivers in order.
        rc.ids
            .retain(|&k, _| k.wrapping_sub(msg_no) & 0x1FFF_FFFF < 0x1000_0000);
        let peer = rc.peer;
        match id {
            Some((session, seq)) => !ml.dedup.entry(peer).or_default().first_time(session, seq),
            None => {
                *self.drops.entry("rx_ml_unnumbered".into()).or_default() += 1;
                false
            }
        }
    }

    /// TX connection `sock` closed for `reason`; `true` if it was a link's.
    pub(super) fn ml_closed(&mut self, sock: u32, reason: CloseReason, now: u64) -> bool {
        let Some(ml) = self.ml.as_mut() else {
            return false;
        };
        let Some(&(ip, i)) = ml.tx.get(&sock) else {
            return false;
        };
        if let Some(l) = ml.peers.get_mut(&ip) {
            if l.links[i].tx_sock == Some(sock) {
                if matches!(reason, CloseReason::Timeout | CloseReason::ConnectTimeout) {
                    l.down(i, now);
                }
                l.links[i].tx_sock = None;
            }
        }
        true
    }

    /// Connection `sock` is gone.
    pub(super) fn ml_forget(&mut self, sock: u32) {
        if let Some(ml) = self.ml.as_mut() {
            ml.tx.remove(&sock);
            ml.rx.remove(&sock);
        }
    }

    /// Message `id` ended (acknowledged, or failed back).
    pub(super) fn ml_finished(&mut self, id: u64, acked: bool, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        if let Some(m) = ml.msgs.remove(&id) {
            if let Some(l) = ml.peers.get_mut(&m.peer) {
                if m.sock != 0 {
                    l.unassign(m.link, m.len, acked, now);
                }
            }
        }
    }

    /// The multi-link timers, before the transport's own: a peer none of
    /// whose links answered for the peer-down timeout is down (its messages
    /// fail back); a link carrying messages that went silent is down and its
    /// messages go again on another link; links without a connection are
    /// dialled; receiving connections a link abandoned are closed.
    pub(super) fn ml_timers(&mut self, now: u64) {
        let Some(ml) = self.ml.as_mut() else { return };
        let limit = self.p.peer_down_timeout_us;
        let peers: Vec<IpAddr> = ml.peers.keys().copied().collect();
        for ip in peers {
            let dead = self
                .peers
                .get(&ip)
                .is_some_and(|p| p.stats.in_flight > 0 && now.saturating_sub(p.last_heard) > limit);
            if dead {
                self.ml_peer_down(ip, now);
                continue;
            }
            self.ml_check_silence(ip, now);
            self.ml_dial(ip, now);
            if let Some(l) = self.ml.as_mut().and_then(|m| m.peers.get_mut(&ip)) {
                l.tick(now);
            }
        }
        self.ml_close_abandoned(now);
    }

    /// Every link of `ip` silent for the peer-down timeout.
    fn ml_peer_down(&mut self, ip: IpAddr, now: u64) {
        let ml = self.ml.as_mut().expect("multi-link");
        let mut ids: Vec<u64> = ml
            .msgs
            .iter()
            .filter(|(_, m)| m.peer == ip)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        let socks: Vec<u32> = ml
            .peers
            .get(&ip)
            .map(|l| l.links.iter().filter_map(|k| k.tx_sock).collect())
            .unwrap_or_default();
        for id in ids {
            self.fail_msg(id, TxStatus::PeerUnreachable);
            // Failed, maybe still referenced by a send: no longer on a link.
            self.ml_finished(id, false, now);
        }
        for s in socks {
            if let Some(e) = self.conns.get_mut(&s) {
                e.conn.close(now);
            }
        }
        if let Some(l) = self.ml.as_mut().and_then(|m| m.peers.get_mut(&ip)) {
            for i in 0..l.links.len() {
                l.down(i, now);
            }
        }
        let p = self.peer_for(ip);
        p.last_heard = now;
        if !p.down {
            p.down = true;
            p.stats.up = false;
            self.out.push_back(Event::PeerDown(ip));
        }
    }

    /// Moves the messages of `ip`'s silent links to other links.
    fn ml_check_silence(&mut self, ip: IpAddr, now: u64) {
        let ml = self.ml.as_ref().expect("multi-link");
        let Some(l) = ml.peers.get(&ip) else { return };
        let mut silent = Vec::new();
        let mut measured = Vec::new();
        for (i, k) in l.links.iter().enumerate() {
            let rtt = k.tx_sock.and_then(|s| self.conns.get(&s)).map_or(0, |e| {
                if e.conn.rtt_measured() {
                    measured.push((i, u64::from(e.conn.rtt())));
                }
                l.silence_rtt_us(i, u64::from(e.conn.rtt()), e.conn.rtt_measured())
            });
            if (l.silent(i, now, rtt) && l.another_answers(i, now)) || l.stuck_connecting(i, now) {
                silent.push(i);
            }
        }
        if let Some(l) = self.ml.as_mut().and_then(|ml| ml.peers.get_mut(&ip)) {
            for (i, rtt) in measured {
                l.links[i].rtt_seen_us = rtt;
            }
        }
        for i in silent {
            let ml = self.ml.as_mut().expect("multi-link");
            // An acknowledged message waiting only for the kernel to release its
            // memory is done: going again would send from memory kshim gets
            // back at its completion.
            let open = |id: &u64| {
                self.msgs
                    .get(id)
                    .is_some_and(|t| !t.acked && t.failed.is_none())
            };
            let mut ids: Vec<u64> = ml
                .msgs
                .iter()
                .filter(|(id, m)| m.peer == ip && m.link == i && m.sock != 0 && open(id))
                .map(|(&id, _)| id)
                .collect();
            ids.sort_unstable();
            let l = ml.peers.get_mut(&ip).expect("peer links");
            let sock = l.links[i].tx_sock;
            let quiet = now.saturating_sub(l.links[i].last_heard);
            l.down(i, now);
            let mut moved = 0;
            for id in ids {
                let ml = self.ml.as_mut().expect("multi-link");
                let m = ml.msgs[&id];
                let l = ml.peers.get_mut(&ip).expect("peer links");
                let Some(j) = l.pick(m.len, Some(i)) else {
                    break;
                };
                l.unassign(i, m.len, false, now);
                if let Some(r) = ml.msgs.get_mut(&id) {
                    r.sock = 0;
                }
                if self.ml_put(id, j, now) {
                    moved += 1;
                } else {
                    self.fail_msg(id, TxStatus::PeerReset);
                }
            }
            if let Some(e) = sock.and_then(|s| self.conns.get_mut(&s)) {
                // Its messages are elsewhere now: nothing more may be sent from
                // their memory on this connection.
                e.conn.close(now);
            }
            tracing::warn!(
                peer = %ip,
                link = i,
                silent_ms = quiet / 1000,
                moved,
                "link silent: its messages go again on another link"
            );
        }
    }

    /// Closes receiving connections of multi-link peers that hold part of a
    /// message and were not heard for the RX stall time while another
    /// connection of the same peer was: their sender moved the message to
    /// another link and closed its end, so nothing will finish it.
    fn ml_close_abandoned(&mut self, now: u64) {
        let Some(ml) = self.ml.as_ref() else { return };
        let mut newest: HashMap<IpAddr, u64> = HashMap::new();
        for rc in ml.rx.values() {
            let n = newest.entry(rc.peer).or_default();
            *n = (*n).max(rc.heard);
        }
        let mut close = Vec::new();
        for (&s, rc) in &ml.rx {
            let Some(e) = self.conns.get(&s) else {
                continue;
            };
            if e.dir != Dir::Rx || e.conn.is_closed() || e.conn.held() == 0 {
                continue;
            }
            let stall = (8 * u64::from(e.conn.rtt())).clamp(RX_STALL_US.0, RX_STALL_US.1);
            if now.saturating_sub(rc.heard) > stall && newest[&rc.peer] > rc.heard + stall {
                close.push(s);
            }
        }
        // Idle ones too, beyond two per link: each failover leaves the old
        // link's receiving connection behind, and the per-address cap
        // (MAX_CONNS_PER_ADDR) would refuse the link's next connection long
        // before the idle timeout ends them. The ones heard from last stay.
        let mut open: HashMap<IpAddr, Vec<(u64, u32)>> = HashMap::new();
        for (&s, rc) in &ml.rx {
            if self
                .conns
                .get(&s)
                .is_some_and(|e| !e.conn.is_closed() && !close.contains(&s))
            {
                open.entry(rc.peer).or_default().push((rc.heard, s));
            }
        }
        for (ip, mut v) in open {
            let keep = 2 * ml.table.peer(ip).map_or(1, |c| c.links.len());
            if v.len() > keep {
                v.sort_unstable();
                let extra = v.len() - keep;
                close.extend(
                    v.into_iter()
                        .take(extra)
                        .filter(|(_, s)| self.conns.get(s).is_some_and(|e| e.conn.held() == 0))
                        .map(|(_, s)| s),
                );
            }
        }
        for s in close {
            if let Some(e) = self.conns.get_mut(&s) {
                e.conn.close(now);
                *self.drops.entry("rx_ml_abandoned".into()).or_default() += 1;
            }
        }
    }
}

/// The links of multi-link peer `ip` for its stats (empty for another peer).
pub(super) fn link_stats(
    ml: Option<&MultiLink>,
    conns: &BTreeMap<u32, ConnEntry>,
    ip: IpAddr,
) -> Vec<LinkStats> {
    let Some(l) = ml.and_then(|m| m.peers.get(&ip)) else {
        return Vec::new();
    };
    l.links
        .iter()
        .map(|k| {
            let rtt = k
                .tx_sock
                .and_then(|s| conns.get(&s))
                .map_or(0, |e| u64::from(e.conn.rtt()));
            LinkStats::of(l.cfg.policy, k, rtt)
        })
        .collect()
}
