//! Forward error correction for live streams, between two lu2k peers.
//!
//! A live stream cannot wait a round trip for a retransmission: on a GEO
//! path one lost packet of a 46-packet chunk makes the chunk 600 ms late,
//! and at 1 % loss a third of the chunks lose a packet. Here the sender
//! follows each group of consecutive data packets with a few Reed–Solomon
//! repair packets (the `reed-solomon-simd` crate, an O(n log n) Leopard-style
//! code over GF(2^16); no home-made code), from which the receiver rebuilds
//! up to that many lost packets of the group one group-time after they were
//! lost instead of one round trip.
//!
//! # Where it sits, and why
//!
//! FEC is a codec on whole datagrams between a [`Connection`](crate::conn::Connection) and the
//! socket, sans-IO like the connection:
//!
//! ```text
//!  sender:   Connection ─poll_transmit→ datagram ─┬→ socket
//!                                                 └→ Encoder::handle_sent
//!            Encoder::poll_transmit → repair datagram → socket
//!  receiver: socket → Decoder::handle_datagram ─(data, other)→ Connection
//!            Decoder::poll_recovered → rebuilt data datagram → Connection
//! ```
//!
//! One [`Encoder`] per sending connection and one [`Decoder`] per receiving
//! one (groups are runs of one connection's sequence numbers).
//!
//! - The connection never touches payload bytes (they stay in the engine's
//!   buffers, see [`crate::conn`]), and a code needs them; the codec sees
//!   the datagrams the engine assembles anyway.
//! - A rebuilt packet is the data packet that was lost (same sequence
//!   number, message field and payload), so the connection takes it as if
//!   it had arrived: ordering, acknowledgement, TTL and delivery stay the
//!   UDT core's, unchanged and with the same tests. The receiver still
//!   reports the loss when it sees the gap, so the sender sends the packet
//!   again (about the loss rate in extra bytes, counted in the overhead
//!   figures), and where the code cannot rebuild a group retransmission
//!   repairs it as before: FEC only makes the common case faster.
//! - Repair packets are UDT control packets of UDT4's user-defined type
//!   (`0x7FFF`) with the extended type [`EXT_TYPE`]; they go only to a
//!   peer configured for FEC, which is always an lu2k peer, so the wire to
//!   a UDT4 peer is unchanged (a UDT4 receiver ignores a user-defined
//!   control packet; this crate's connection counts it malformed).
//!
//! # Wire format of a repair packet
//!
//! ```text
//!  0: 1 | 0x7FFF (15 bits) | EXT_TYPE (16 bits)
//!  4: 0 | sequence number of the group's first data packet (31 bits)
//!  8: timestamp                12: destination socket ID
//! 16: k (u8) | r (u8) | index (u8) | version (u8) = 1
//! 20: shard (even length, the same for the whole group)
//! ```
//!
//! The group is the `k` data packets from the first sequence number on;
//! the shard is Reed–Solomon recovery shard `index` of `r`, over original
//! shards made of each data packet's `[payload length (u16) | message field
//! (u32) | payload | zeros]`. The timestamp is not coded (a retransmission
//! carries another); a rebuilt packet carries the repair packet's.
//! A repair packet is [`REPAIR_EXTRA`] bytes longer than the group's largest
//! data packet: a connection carrying FEC runs with its MSS that much
//! smaller, so repairs fit the path MTU.
//!
//! # Groups and overhead
//!
//! The encoder closes a group at [`Config::max_group`] packets, when no new
//! data left for [`Config::idle_us`] (the end of a chunk of a stream) or
//! when the group is [`Config::max_age_us`] old (bounding what a repair
//! waits for at low rates). Only first sends join a group (a packet's
//! sequence number beyond every one sent before). It sends the fewest
//! repairs `r` (at least [`Config::min_repair`]) for which the chance that
//! more than `r` of the `k + r` packets are lost, at the measured loss rate,
//! is at most [`Config::target_residual`]; the loss rate is the share of
//! first sends the receiver reported lost ([`Encoder::handle_counts`]),
//! smoothed. Repair bytes never exceed [`Config::max_overhead`] of the data
//! bytes sent (a running budget), so at high loss the overhead stays bounded
//! and retransmission does the rest.
//!
//! The defaults are for a live stream on a GEO path. A Reed–Solomon group
//! protects better per repair byte the larger it is: at 1 % loss a
//! 46-packet chunk needs six repairs (13 %) to leave fewer than 1e-5 of the
//! groups short, two chunks together seven (7.6 %). And one short group
//! costs a round trip for every chunk behind it (delivery is in order):
//! ~30 chunks at 20 Mbit/s and 600 ms, 4 % of a 20 s stream, so the target
//! must be far below 1 % per group. So a group spans up to 50 ms of the
//! stream (two 64 KiB chunks at 20 Mbit/s), which a chunk waits for its
//! repairs at most — well within a quarter round trip.

use std::collections::{BTreeMap, VecDeque};

use crate::estimate::Time;
use crate::seq::SeqNo;

/// The extended type of a repair packet ("LF": lu2k FEC).
pub const EXT_TYPE: u16 = 0x4C46;
/// UDT4's user-defined control type.
const USER_TYPE: u32 = 0x7FFF;
/// UDT header bytes.
const HDR: usize = 16;
/// The FEC fields after the control header.
const FEC_HDR: usize = 4;
/// Per-packet bytes of an original shard before the payload: length and
/// message field.
const SHARD_HDR: usize = 6;
/// Version of the repair format.
const VERSION: u8 = 1;
/// How much longer a repair datagram is than the longest data datagram of
/// its group (its FEC fields, the shard's packet header and one byte of
/// padding to an even shard).
pub const REPAIR_EXTRA: u32 = (FEC_HDR + SHARD_HDR + 1) as u32;

/// Encoder and decoder settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most data packets in a group (1..=255).
    pub max_group: u8,
    /// A group closes when no new data packet joined it for this long, µs.
    pub idle_us: u64,
    /// A group closes when its first packet is this old, µs.
    pub max_age_us: u64,
    /// Fewest repair packets per group.
    pub min_repair: u8,
    /// Most repair packets per group.
    pub max_repair: u8,
    /// Accepted chance that a group loses more packets than it has repairs.
    pub target_residual: f64,
    /// Repair bytes at most this share of the data bytes sent.
    pub max_overhead: f64,
    /// The loss rate assumed before any is measured.
    pub initial_loss: f64,
    /// Lowest loss rate the repair count is sized for (a path with no
    /// measured loss still gets [`Config::min_repair`]).
    pub floor_loss: f64,
    /// The decoder keeps data packets and repairs this long, µs.
    pub keep_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_group: 128,
            idle_us: 30_000,
            max_age_us: 50_000,
            min_repair: 1,
            max_repair: 32,
            target_residual: 1e-5,
            max_overhead: 0.085,
            initial_loss: 0.01,
            floor_loss: 0.001,
            keep_us: 2_000_000,
        }
    }
}

/// What was wrong with a [`Config`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub &'static str);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FEC setting out of range: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Checks the ranges; the error names the setting and its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_group == 0 {
            return Err(ConfigError("max_group must be 1..=255"));
        }
        if self.max_repair == 0 || self.min_repair > self.max_repair {
            return Err(ConfigError(
                "max_repair must be 1..=255 and at least min_repair",
            ));
        }
        if !(self.max_overhead > 0.0 && self.max_overhead <= 1.0) {
            return Err(ConfigError("max_overhead must be in (0, 1]"));
        }
        if !(self.target_residual > 0.0 && self.target_residual < 1.0) {
            return Err(ConfigError("target_residual must be in (0, 1)"));
        }
        for p in [self.initial_loss, self.floor_loss] {
            if !(0.0..0.5).contains(&p) {
                return Err(ConfigError(
                    "initial_loss and floor_loss must be in [0, 0.5)",
                ));
            }
        }
        if self.idle_us == 0 || self.max_age_us == 0 || self.keep_us == 0 {
            return Err(ConfigError(
                "idle_us, max_age_us and keep_us must be positive",
            ));
        }
        Ok(())
    }
}

/// Counters of an [`Encoder`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncoderStats {
    /// Groups closed.
    pub groups: u64,
    /// Data packets coded (first sends).
    pub data_pkts: u64,
    /// Data datagram bytes coded.
    pub data_bytes: u64,
    /// Repair packets produced.
    pub repair_pkts: u64,
    /// Repair datagram bytes produced.
    pub repair_bytes: u64,
    /// Repairs the overhead budget left out.
    pub repairs_over_budget: u64,
    /// The loss rate repairs are sized for now.
    pub loss: f64,
}

/// The sending half: sees every datagram sent, produces repair datagrams.
/// After each [`Encoder::handle_sent`] or [`Encoder::handle_timeout`], send
/// what [`Encoder::poll_transmit`] returns; arm a timer for
/// [`Encoder::poll_timeout`].
#[derive(Debug)]
pub struct Encoder {
    cfg: Config,
    /// The open group's original shards' contents: (message field, payload).
    group: Vec<(u32, Vec<u8>)>,
    /// Its first sequence number, destination socket ID, when it opened and
    /// when its last packet joined.
    base: SeqNo,
    dst: u32,
    opened: Time,
    last: Time,
    /// The next sequence number a first send carries.
    next: Option<SeqNo>,
    out: VecDeque<Vec<u8>>,
    /// Smoothed loss rate and the counters of its last sample.
    loss: f64,
    counted: Option<(u64, u64)>,
    /// Repair bytes the budget still allows.
    budget: f64,
    stats: EncoderStats,
}

/// First sends between loss samples: a sample at 1 % loss holds ~10 losses.
const LOSS_SAMPLE_PKTS: u64 = 1_000;

impl Encoder {
    /// A new encoder; `cfg` must pass [`Config::validate`].
    pub fn new(cfg: Config) -> Result<Encoder, ConfigError> {
        cfg.validate()?;
        Ok(Encoder {
            loss: cfg.initial_loss,
            group: Vec::new(),
            base: SeqNo::ZERO,
            dst: 0,
            opened: 0,
            last: 0,
            next: None,
            out: VecDeque::new(),
            counted: None,
            budget: 0.0,
            stats: EncoderStats::default(),
            cfg,
        })
    }

    /// Counters, with the loss rate in use.
    pub fn stats(&self) -> EncoderStats {
        EncoderStats {
            loss: self.loss,
            ..self.stats.clone()
        }
    }

    /// The sender's cumulative first sends and the sequence numbers the
    /// receiver reported lost (the connection's `pkts_sent` and
    /// `pkts_nak_received`): the loss rate repairs are sized for. Samples
    /// are taken every thousand packets; the estimate rises at once to a
    /// higher sample, so that a worse path is covered from the next group
    /// on, and falls slowly (weight ⅛): one sample at 1 % loss reads
    /// 0.7 % or less one time in six, and repairs sized for that leave a
    /// 92-packet group short ten times as often.
    pub fn handle_counts(&mut self, sent: u64, lost: u64) {
        let Some((s0, l0)) = self.counted else {
            self.counted = Some((sent, lost));
            return;
        };
        let ds = sent.saturating_sub(s0);
        if ds < LOSS_SAMPLE_PKTS {
            return;
        }
        let sample = (lost.saturating_sub(l0) as f64 / ds as f64).min(0.5);
        self.loss = if sample > self.loss {
            sample
        } else {
            0.875 * self.loss + 0.125 * sample
        };
        self.counted = Some((sent, lost));
    }

    /// Every datagram the connection sent, as it went out. First sends of
    /// data join the open group; anything else is ignored.
    pub fn handle_sent(&mut self, now: Time, datagram: &[u8]) {
        if datagram.len() < HDR || datagram[0] & 0x80 != 0 {
            return;
        }
        let seq = SeqNo::new(be32(datagram, 0) & SeqNo::MAX);
        if let Some(n) = self.next {
            if seq.is_before(n) {
                return; // a retransmission
            }
            if seq != n {
                // A first send beyond a gap (cannot happen with one
                // connection): the group must be consecutive.
                self.close_group(now);
            }
        }
        self.next = Some(seq.next());
        let dst = be32(datagram, 12);
        if !self.group.is_empty() && dst != self.dst {
            self.close_group(now);
        }
        if self.group.is_empty() {
            self.base = seq;
            self.dst = dst;
            self.opened = now;
        }
        self.last = now;
        self.group
            .push((be32(datagram, 4), datagram[HDR..].to_vec()));
        self.stats.data_pkts += 1;
        self.stats.data_bytes += datagram.len() as u64;
        self.budget += datagram.len() as f64 * self.cfg.max_overhead;
        if self.group.len() >= usize::from(self.cfg.max_group) {
            self.close_group(now);
        }
    }

    /// When the open group closes, if one is open.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.group.is_empty() {
            return None;
        }
        Some((self.last + self.cfg.idle_us).min(self.opened + self.cfg.max_age_us))
    }

    /// Closes the open group if it is due.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.close_group(now);
        }
    }

    /// The next repair datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Repairs for a group of `k` at the measured loss rate.
    fn repairs_for(&self, k: usize) -> usize {
        let p = self.loss.max(self.cfg.floor_loss);
        let (lo, hi) = (
            usize::from(self.cfg.min_repair),
            usize::from(self.cfg.max_repair),
        );
        (lo..=hi)
            .find(|&r| tail_above(k + r, r, p) <= self.cfg.target_residual)
            .unwrap_or(hi)
    }

    fn close_group(&mut self, now: Time) {
        if self.group.is_empty() {
            return;
        }
        let group = std::mem::take(&mut self.group);
        self.stats.groups += 1;
        let k = group.len();
        let longest = group.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
        let shard_len = (SHARD_HDR + longest).next_multiple_of(2);
        let repair_len = HDR + FEC_HDR + shard_len;
        let wanted = self.repairs_for(k);
        let affordable = (self.budget / repair_len as f64).floor().max(0.0) as usize;
        let r = wanted.min(affordable);
        self.stats.repairs_over_budget += (wanted - r) as u64;
        if r == 0 {
            return;
        }
        let shards = group
            .iter()
            .map(|(msg, p)| original_shard(*msg, p, shard_len));
        let Ok(recovery) = reed_solomon_simd::encode(k, r, shards) else {
            // Counts of 1..=255 and even, equal shard sizes are always
            // supported; nothing to send if the crate disagrees.
            return;
        };
        let ts = (now & 0xFFFF_FFFF) as u32;
        for (index, shard) in recovery.into_iter().enumerate() {
            let mut d = Vec::with_capacity(repair_len);
            d.extend_from_slice(
                &(0x8000_0000 | (USER_TYPE << 16) | u32::from(EXT_TYPE)).to_be_bytes(),
            );
            d.extend_from_slice(&self.base.get().to_be_bytes());
            d.extend_from_slice(&ts.to_be_bytes());
            d.extend_from_slice(&self.dst.to_be_bytes());
            d.extend_from_slice(&[k as u8, r as u8, index as u8, VERSION]);
            d.extend_from_slice(&shard);
            self.budget -= d.len() as f64;
            self.stats.repair_pkts += 1;
            self.stats.repair_bytes += d.len() as u64;
            self.out.push_back(d);
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn original_shard(msg: u32, payload: &[u8], shard_len: usize) -> Vec<u8> {
    let mut s = vec![0u8; shard_len];
    s[..2].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    s[2..6].copy_from_slice(&msg.to_be_bytes());
    s[SHARD_HDR..SHARD_HDR + payload.len()].copy_from_slice(payload);
    s
}

/// P[X > r] for X ~ Binomial(n, p).
fn tail_above(n: usize, r: usize, p: f64) -> f64 {
    let q = 1.0 - p;
    // P[X = i] iteratively from P[X = 0] = q^n.
    let mut term = q.powi(n as i32);
    let mut cdf = term;
    for i in 0..r.min(n) {
        term *= (n - i) as f64 / (i + 1) as f64 * p / q;
        cdf += term;
    }
    (1.0 - cdf).max(0.0)
}

/// Is `datagram` a repair packet?
pub fn is_repair(datagram: &[u8]) -> bool {
    datagram.len() >= HDR
        && be32(datagram, 0) == 0x8000_0000 | (USER_TYPE << 16) | u32::from(EXT_TYPE)
}

/// What [`Decoder::handle_datagram`] made of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A repair packet: taken by the decoder, not for the connection.
    Repair,
    /// A repair packet that does not parse or contradicts its group:
    /// dropped and counted.
    BadRepair,
    /// A data packet: kept (copied) for rebuilding, and for the connection.
    Data,
    /// Anything else: for the connection.
    Other,
}

/// Counters of a [`Decoder`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Repair packets taken.
    pub repairs: u64,
    /// Repair packets refused (malformed, or not matching their group).
    pub bad_repairs: u64,
    /// Groups whose lost packets were rebuilt.
    pub groups_recovered: u64,
    /// Data packets rebuilt.
    pub pkts_recovered: u64,
    /// Groups that had losses and too few repairs while kept.
    pub groups_unrecoverable: u64,
}

#[derive(Debug)]
struct Group {
    k: u8,
    r: u8,
    shard_len: usize,
    dst: u32,
    ts: u32,
    repairs: BTreeMap<u8, Vec<u8>>,
    first_at: Time,
    done: bool,
}

/// The receiving half: takes repair packets out of the incoming datagrams,
/// keeps a copy of each data packet for a while, and rebuilds the lost data
/// packets of a group once enough of it arrived. After each
/// [`Decoder::handle_datagram`], hand what [`Decoder::poll_recovered`]
/// returns to the connection as received datagrams; call
/// [`Decoder::handle_timeout`] now and then (at [`Decoder::poll_timeout`])
/// to forget what is too old to help.
#[derive(Debug)]
pub struct Decoder {
    cfg: Config,
    /// Data packets by sequence number: (message field, payload, arrival).
    data: BTreeMap<u32, (u32, Vec<u8>, Time)>,
    /// `data`'s keys in the order they were kept, with the time.
    data_order: VecDeque<(Time, u32)>,
    /// Groups by first sequence number.
    groups: BTreeMap<u32, Group>,
    /// `groups`' keys in the order they were made, with the time.
    group_order: VecDeque<(Time, u32)>,
    out: VecDeque<Vec<u8>>,
    stats: DecoderStats,
}

/// Most data packets a decoder keeps (a bound on what a peer can make it
/// hold: about 24 MB of 1.5 KB packets).
const MAX_KEPT: usize = 16_384;
/// Most groups a decoder keeps.
const MAX_GROUPS: usize = 1_024;

impl Decoder {
    /// A new decoder; `cfg` must pass [`Config::validate`] (only
    /// [`Config::keep_us`] matters here).
    pub fn new(cfg: Config) -> Result<Decoder, ConfigError> {
        cfg.validate()?;
        Ok(Decoder {
            cfg,
            data: BTreeMap::new(),
            data_order: VecDeque::new(),
            groups: BTreeMap::new(),
            group_order: VecDeque::new(),
            out: VecDeque::new(),
            stats: DecoderStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> DecoderStats {
        self.stats.clone()
    }

    /// One incoming datagram (before the connection sees it).
    pub fn handle_datagram(&mut self, now: Time, datagram: &[u8]) -> Input {
        if datagram.len() < HDR {
            return Input::Other;
        }
        if datagram[0] & 0x80 == 0 {
            self.handle_data(now, datagram);
            return Input::Data;
        }
        if !is_repair(datagram) {
            return Input::Other;
        }
        if self.handle_repair(now, datagram) {
            self.stats.repairs += 1;
            Input::Repair
        } else {
            self.stats.bad_repairs += 1;
            Input::BadRepair
        }
    }

    /// The next rebuilt data datagram, for the connection.
    #[must_use]
    pub fn poll_recovered(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// When the oldest kept packet or group expires.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        let d = self.data_order.front().map(|x| x.0);
        let g = self.group_order.front().map(|x| x.0);
        let t = d.unwrap_or(u64::MAX).min(g.unwrap_or(u64::MAX));
        (t != u64::MAX).then(|| t.saturating_add(self.cfg.keep_us))
    }

    /// Forgets what is older than [`Config::keep_us`].
    pub fn handle_timeout(&mut self, now: Time) {
        let cut = now.saturating_sub(self.cfg.keep_us);
        while self.data_order.front().is_some_and(|x| x.0 <= cut) {
            self.forget_oldest_data();
        }
        while self.group_order.front().is_some_and(|x| x.0 <= cut) {
            self.forget_oldest_group();
        }
    }

    fn forget_oldest_data(&mut self) {
        if let Some((t, seq)) = self.data_order.pop_front() {
            if self.data.get(&seq).is_some_and(|v| v.2 == t) {
                self.data.remove(&seq);
            }
        }
    }

    fn forget_oldest_group(&mut self) {
        let Some((t, base)) = self.group_order.pop_front() else {
            return;
        };
        if let Some(g) = self.groups.get(&base).filter(|g| g.first_at == t) {
            if !g.done && missing(&self.data, base, g.k).next().is_some() {
                self.stats.groups_unrecoverable += 1;
            }
            self.groups.remove(&base);
        }
    }

    fn keep(&mut self, now: Time, seq: u32, msg: u32, payload: Vec<u8>) {
        if self.data.len() >= MAX_KEPT {
            self.forget_oldest_data();
        }
        self.data.insert(seq, (msg, payload, now));
        self.data_order.push_back((now, seq));
    }

    fn handle_data(&mut self, now: Time, d: &[u8]) {
        let seq = be32(d, 0) & SeqNo::MAX;
        if self.data.contains_key(&seq) {
            return;
        }
        self.keep(now, seq, be32(d, 4), d[HDR..].to_vec());
        // The group this packet belongs to, if its repairs came first.
        let hit = self
            .groups
            .range(..=seq)
            .next_back()
            .filter(|(&b, g)| seq.wrapping_sub(b) < u32::from(g.k))
            .map(|(&b, _)| b)
            .or_else(|| {
                // A group that wraps around the sequence space.
                self.groups
                    .range(seq + 1..)
                    .next_back()
                    .filter(|(&b, g)| seq + (SeqNo::MAX - b) + 1 < u32::from(g.k))
                    .map(|(&b, _)| b)
            });
        if let Some(b) = hit {
            self.try_rebuild(now, b);
        }
    }

    /// Takes a repair packet; false if it is malformed or contradicts its
    /// group.
    fn handle_repair(&mut self, now: Time, d: &[u8]) -> bool {
        if d.len() < HDR + FEC_HDR + SHARD_HDR {
            return false;
        }
        let base = be32(d, 4);
        if base > SeqNo::MAX {
            return false;
        }
        let (k, r, index, version) = (d[16], d[17], d[18], d[19]);
        let shard = &d[HDR + FEC_HDR..];
        if version != VERSION
            || k == 0
            || r == 0
            || index >= r
            || shard.len() % 2 != 0
            || !reed_solomon_simd::ReedSolomonDecoder::supports(usize::from(k), usize::from(r))
        {
            return false;
        }
        if !self.groups.contains_key(&base) {
            while self.groups.len() >= MAX_GROUPS && !self.group_order.is_empty() {
                self.forget_oldest_group();
            }
            self.group_order.push_back((now, base));
        }
        let g = self.groups.entry(base).or_insert_with(|| Group {
            k,
            r,
            shard_len: shard.len(),
            dst: be32(d, 12),
            ts: be32(d, 8),
            repairs: BTreeMap::new(),
            first_at: now,
            done: false,
        });
        if g.k != k || g.r != r || g.shard_len != shard.len() {
            return false;
        }
        if g.done || g.repairs.contains_key(&index) {
            return true;
        }
        g.repairs.insert(index, shard.to_vec());
        self.try_rebuild(now, base);
        true
    }

    /// Rebuilds the group's lost packets if enough of it is here.
    fn try_rebuild(&mut self, now: Time, base: u32) {
        let Some(g) = self.groups.get_mut(&base) else {
            return;
        };
        if g.done || g.repairs.is_empty() {
            return;
        }
        let lost = missing(&self.data, base, g.k).count();
        if lost == 0 {
            g.done = true;
            return;
        }
        let have = usize::from(g.k) - lost;
        if have + g.repairs.len() < usize::from(g.k) {
            return;
        }
        g.done = true;
        let room = g.shard_len - SHARD_HDR;
        let mut originals = Vec::with_capacity(have);
        for i in 0..usize::from(g.k) {
            if let Some((msg, p, _)) = self.data.get(&seq_at(base, i)) {
                if p.len() > room {
                    // Not the packet the sender coded (or a forged repair):
                    // no rebuild from it.
                    self.stats.bad_repairs += 1;
                    return;
                }
                originals.push((i, original_shard(*msg, p, g.shard_len)));
            }
        }
        let rec = g
            .repairs
            .iter()
            .map(|(&i, s)| (usize::from(i), s.as_slice()));
        let Ok(restored) =
            reed_solomon_simd::decode(usize::from(g.k), usize::from(g.r), originals, rec)
        else {
            self.stats.bad_repairs += 1;
            return;
        };
        let (dst, ts) = (g.dst, g.ts);
        let mut rebuilt = 0;
        for (i, shard) in restored {
            let len = usize::from(u16::from_be_bytes([shard[0], shard[1]]));
            if len > room {
                self.stats.bad_repairs += 1;
                continue;
            }
            let seq = seq_at(base, i);
            let mut d = Vec::with_capacity(HDR + len);
            d.extend_from_slice(&seq.to_be_bytes());
            d.extend_from_slice(&shard[2..6]);
            d.extend_from_slice(&ts.to_be_bytes());
            d.extend_from_slice(&dst.to_be_bytes());
            d.extend_from_slice(&shard[SHARD_HDR..SHARD_HDR + len]);
            self.keep(now, seq, be32(&d, 4), d[HDR..].to_vec());
            self.out.push_back(d);
            rebuilt += 1;
        }
        if rebuilt > 0 {
            self.stats.groups_recovered += 1;
            self.stats.pkts_recovered += rebuilt;
        }
    }
}

fn seq_at(base: u32, i: usize) -> u32 {
    SeqNo::new(base).add(i as u32).get()
}

/// Indexes of the group's packets not kept.
fn missing<'a>(
    data: &'a BTreeMap<u32, (u32, Vec<u8>, Time)>,
    base: u32,
    k: u8,
) -> impl Iterator<Item = usize> + 'a {
    (0..usize::from(k)).filter(move |&i| !data.contains_key(&seq_at(base, i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data datagram: sequence number, message field, timestamp, socket
    /// 7, payload of `len` bytes from `seed`.
    fn data(seq: u32, len: usize, seed: u8) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&seq.to_be_bytes());
        d.extend_from_slice(&(0xC000_0000u32 | (seq / 10)).to_be_bytes());
        d.extend_from_slice(&1234u32.to_be_bytes());
        d.extend_from_slice(&7u32.to_be_bytes());
        d.extend((0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ seq as u8));
        d
    }

    fn encoder() -> Encoder {
        Encoder::new(Config::default()).unwrap()
    }

    #[test]
    fn repair_count_follows_the_loss_rate_and_the_budget() {
        let mut e = encoder();
        // 1 % loss, a 46-packet chunk: five repairs leave 1.9e-5 of groups
        // short, six 1.6e-6; two chunks need seven.
        assert_eq!(e.repairs_for(46), 6);
        assert_eq!(e.repairs_for(92), 7);
        e.loss = 0.001;
        assert_eq!(e.repairs_for(46), 3);
        e.loss = 0.0;
        assert_eq!(e.repairs_for(46), 3, "sized for the floor loss rate");
        e.loss = 0.2;
        assert_eq!(e.repairs_for(46), 32, "capped by max_repair");
        // tail_above against a direct sum.
        let direct: f64 = (3..=20)
            .map(|i| {
                let c = (0..i).fold(1.0, |c, j| c * (20 - j) as f64 / (j + 1) as f64);
                c * 0.1f64.powi(i) * 0.9f64.powi(20 - i)
            })
            .sum();
        assert!((tail_above(20, 2, 0.1) - direct).abs() < 1e-12);
    }

    #[test]
    fn loss_estimate_rises_at_once_and_falls_smoothly() {
        let mut e = encoder();
        e.handle_counts(0, 0);
        e.handle_counts(1000, 50);
        assert!((e.stats().loss - 0.05).abs() < 1e-9);
        e.handle_counts(2000, 50);
        assert!((e.stats().loss - 0.04375).abs() < 1e-9);
        e.handle_counts(2900, 90); // too few packets for a sample
        assert!((e.stats().loss - 0.04375).abs() < 1e-9);
    }

    /// Encodes a group, loses `lost` of it, and checks the rebuilt
    /// datagrams equal the originals but for the timestamp.
    fn round_trip(n: u32, base: u32, lost: &[u32]) -> (Vec<Vec<u8>>, DecoderStats) {
        let mut e = encoder();
        let sent: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let seq = SeqNo::new(base).add(i).get();
                data(seq, if i == n - 1 { 100 } else { 1456 }, 3)
            })
            .collect();
        for d in &sent {
            e.handle_sent(10, d);
        }
        assert_eq!(e.poll_timeout(), Some(10 + 30_000));
        e.handle_timeout(30_010);
        let repairs: Vec<Vec<u8>> = std::iter::from_fn(|| e.poll_transmit()).collect();
        assert!(!repairs.is_empty());
        for r in &repairs {
            assert_eq!(r.len(), 1456 + 16 + REPAIR_EXTRA as usize - 1);
        }
        let mut dec = Decoder::new(Config::default()).unwrap();
        for (i, d) in sent.iter().enumerate() {
            if !lost.contains(&(i as u32)) {
                assert_eq!(dec.handle_datagram(20, d), Input::Data);
            }
        }
        for r in &repairs {
            assert_eq!(dec.handle_datagram(30, r), Input::Repair);
        }
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| dec.poll_recovered()).collect();
        for g in &got {
            let seq = be32(g, 0);
            let i = SeqNo::new(base).offset_to(SeqNo::new(seq)) as usize;
            let orig = &sent[i];
            assert_eq!(g[..8], orig[..8], "sequence and message field");
            assert_eq!(g[12..], orig[12..], "socket and payload");
            assert_eq!(be32(g, 8), 30_010, "the repair's timestamp");
        }
        (got, dec.stats())
    }

    #[test]
    fn lost_packets_of_a_group_are_rebuilt() {
        let (got, st) = round_trip(46, 1000, &[0, 17, 45]);
        assert_eq!(got.len(), 3);
        assert_eq!((st.groups_recovered, st.pkts_recovered), (1, 3));
    }

    #[test]
    fn a_group_across_the_sequence_wrap_is_rebuilt() {
        let (got, _) = round_trip(46, SeqNo::MAX - 10, &[5, 11, 12]);
        let mut seqs: Vec<u32> = got.iter().map(|g| be32(g, 0)).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![0, 1, SeqNo::MAX - 5]);
    }

    #[test]
    fn too_many_losses_rebuild_nothing() {
        let (got, st) = round_trip(46, 5, &[1, 2, 3, 4, 5]);
        assert!(got.is_empty());
        assert_eq!(st.pkts_recovered, 0);
    }

    #[test]
    fn data_arriving_after_the_repairs_completes_the_group() {
        // Small packets (one repair is more than the default budget), one
        // repair: the group is whole with the last data packet.
        let mut e = Encoder::new(Config {
            max_overhead: 1.0,
            max_repair: 1,
            ..Config::default()
        })
        .unwrap();
        let sent: Vec<Vec<u8>> = (0..10).map(|i| data(i, 500, 1)).collect();
        for d in &sent {
            e.handle_sent(0, d);
        }
        e.handle_timeout(1_000_000);
        let mut dec = Decoder::new(Config::default()).unwrap();
        for r in std::iter::from_fn(|| e.poll_transmit()) {
            dec.handle_datagram(1, &r);
        }
        for d in &sent[1..] {
            assert!(dec.poll_recovered().is_none());
            dec.handle_datagram(2, d);
        }
        let g = dec.poll_recovered().expect("packet 0 rebuilt");
        assert_eq!(g[16..], sent[0][16..]);
    }

    #[test]
    fn retransmissions_and_control_stay_out_of_groups() {
        let mut e = Encoder::new(Config {
            idle_us: 2_000,
            max_age_us: 20_000,
            ..Config::default()
        })
        .unwrap();
        let mut ack = data(0, 8, 0);
        ack[0] = 0x80;
        // A packet every 1.5 ms: the group closes at max_age (20 ms), not
        // for idleness.
        for i in 0..15u32 {
            let t = 1_500 * u64::from(i);
            e.handle_timeout(t);
            e.handle_sent(t, &data(i, 100, 0));
            if i == 4 {
                e.handle_sent(t, &data(2, 100, 0)); // a retransmission
                e.handle_sent(t, &ack);
                assert_eq!(e.group.len(), 5);
            }
        }
        assert_eq!(e.stats().groups, 1);
        assert_eq!(e.stats().data_pkts, 15);
        assert_eq!(e.group.len(), 1);
    }

    #[test]
    fn overhead_stays_within_budget() {
        let cfg = Config {
            max_overhead: 0.05,
            ..Config::default()
        };
        let mut e = Encoder::new(cfg).unwrap();
        e.loss = 0.2;
        for i in 0..10_000 {
            e.handle_sent(u64::from(i) * 100, &data(i, 1456, 0));
            e.handle_timeout(u64::from(i) * 100);
        }
        e.handle_timeout(u64::MAX / 2);
        let s = e.stats();
        assert!(s.repair_bytes as f64 <= 0.05 * s.data_bytes as f64);
        assert!(s.repair_bytes as f64 > 0.04 * s.data_bytes as f64);
        assert!(s.repairs_over_budget > 0);
    }

    #[test]
    fn hostile_repairs_are_refused_without_panic() {
        let mut dec = Decoder::new(Config::default()).unwrap();
        let mut r = vec![0u8; 40];
        r[..4].copy_from_slice(
            &(0x8000_0000u32 | (USER_TYPE << 16) | u32::from(EXT_TYPE)).to_be_bytes(),
        );
        for (k, rr, idx, ver) in [(0, 1, 0, 1), (1, 0, 0, 1), (4, 2, 2, 1), (4, 2, 0, 9)] {
            r[16..20].copy_from_slice(&[k, rr, idx, ver]);
            assert_eq!(dec.handle_datagram(0, &r), Input::BadRepair);
        }
        r.push(0); // odd shard
        r[16..20].copy_from_slice(&[4, 2, 0, 1]);
        assert_eq!(dec.handle_datagram(0, &r), Input::BadRepair);
        // A repair whose shard is too short for the data packets it claims:
        // no rebuild, no panic.
        r.pop();
        for i in 1..4 {
            dec.handle_datagram(0, &data(i, 1000, 0));
        }
        assert_eq!(dec.handle_datagram(0, &r), Input::Repair);
        assert!(dec.poll_recovered().is_none());
        // Random bytes.
        let mut x = 0x1234_5678u64;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if b.len() >= 4 && x % 2 == 0 {
                b[..4].copy_from_slice(&r[..4]);
            }
            let _ = dec.handle_datagram(1, &b);
            while dec.poll_recovered().is_some() {}
        }
    }

    #[test]
    fn the_decoder_forgets_old_packets_and_counts_lost_groups() {
        let mut e = Encoder::new(Config {
            max_overhead: 1.0,
            ..Config::default()
        })
        .unwrap();
        for i in 0..10 {
            e.handle_sent(0, &data(i, 100, 0));
        }
        e.handle_timeout(100_000);
        let mut dec = Decoder::new(Config::default()).unwrap();
        dec.handle_datagram(0, &data(0, 100, 0));
        let r = e.poll_transmit().unwrap();
        dec.handle_datagram(0, &r);
        assert_eq!(dec.poll_timeout(), Some(2_000_000));
        dec.handle_timeout(2_000_001);
        assert_eq!(dec.poll_timeout(), None);
        assert_eq!(dec.stats().groups_unrecoverable, 1);
    }

    #[test]
    fn bad_settings_are_named() {
        let c = Config {
            max_overhead: 0.0,
            ..Config::default()
        };
        assert!(Encoder::new(c)
            .unwrap_err()
            .to_string()
            .contains("max_overhead"));
    }
}
