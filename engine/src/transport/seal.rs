//! The sealed UDT wire: every datagram of a connection authenticated and
//! encrypted (AES-128-GCM), keys agreed per connection by an ephemeral X25519
//! exchange mixed with a pre-shared key (HKDF-SHA256), all from `aws-lc-rs`.
//! Sans-IO: nothing here touches a socket or a clock; the transport passes the
//! time in and the bytes through.
//!
//! **Why AES-128**: it is TLS 1.3's and QUIC's default AEAD, and a 128-bit key
//! is out of reach of exhaustive search; the connection's keys come from an
//! X25519 exchange, itself about 128 bits strong, so a 256-bit cipher key
//! added no strength against a classical attacker (and X25519 falls to a
//! quantum one whatever the cipher). Ten AES rounds instead of fourteen make
//! every packet cheaper to seal and open; ChaCha20-Poly1305, without AES-NI and
//! VAES to lean on, costs more than either (`cargo bench -p lu2k-engine --bench
//! seal` measures all three; the README has the figures).
//!
//! **Sealed datagram** (wire version 4; [`OVERHEAD`] = 24 bytes more than the
//! plain UDT packet):
//!
//! ```text
//! [FF FF][0b11 | key epoch, 6 bits][packet counter, low 40 bits, BE][destination socket ID, u32 BE]
//! [AES-128-GCM ciphertext of the UDT packet less its destination socket ID
//!  (UDT header bytes 0..12, then bytes 16.. : control body or payload)][16-byte tag]
//! ```
//!
//! The first [`SEAL_HDR`] (12) bytes are in clear and authenticated (the AAD).
//! `FF FF` reads as UDT control type 0x7FFF (user-defined): a plain UDT4 peer
//! ignores it, and a plain packet never starts with it. The transport finds
//! the connection by the clear destination socket ID; the UDT header's own
//! copy is not sent twice: the receiver writes the authenticated clear one back
//! into the opened header (a 16-byte shuffle in place, never a payload move).
//! On a 1500-byte path a full packet carries 1432 payload bytes against the
//! plain wire's 1456 (1.65 % less); the 16-byte tag is 16 of the 24 and is kept
//! whole (a truncated GCM tag weakens forgery resistance per tag bit).
//!
//! Why each field has its size:
//! - **Version and epoch in one byte**: the top two bits `11` mark this format
//!   (version 2 had `0x02` there, so neither reads the other's datagrams); the
//!   low six carry the key epoch modulo 64, enough for the receiver's
//!   window of the previous key, the current one and [`MAX_SKIP`] ahead.
//!   Version 3 (AES-256-GCM) has the same layout and bits: versions 3 and 4
//!   differ in the cipher and the key labels, and the handshake tells them
//!   apart (its magic names the version), so a version 3 peer never gets a
//!   connection, hence never a key, and its handshakes are refused by version
//!   ([`other_version`]). The datagram bits stay as they were so that the
//!   kernel's steering program (`steer.rs`) reads both alike.
//! - **A 40-bit counter on the wire, 64 bits in the nonce**: the nonce is the
//!   sender's full 64-bit packet counter of the direction (never a UDT sequence
//!   number: a retransmission is a new packet with a new counter), unique per
//!   key. The wire carries its low 40 bits; the receiver takes the full counter
//!   nearest to one past the highest it opened (as QUIC decodes packet
//!   numbers, RFC 9000 appendix A.3). Only a counter within 2^39 of that
//!   decodes to itself, and only the right full counter opens (the tag covers
//!   the nonce): a packet that far off, a replay included, is refused. The
//!   replay window is 2^16 counters, so nothing legitimate is that far off.
//! - **12 bytes in clear, not 11**: the fifth counter byte puts the payload 24
//!   bytes into the datagram, 8-byte aligned where the datagram is (GRO lays
//!   full-size datagrams back to back, 1472 bytes apart, in an RX buffer; the
//!   seal scratch the same way), so the cipher and the kernel's copies work on
//!   aligned payload rather than payload at an odd offset (README, "The
//!   sealed wire", has the A/B).
//!
//! **Handshake**: the UDT4 handshake (64 bytes) with a trailer of `HS_EXT`
//! (52) bytes, `["L2K4"][X25519 public key][HMAC-SHA256 over label, the two ends,
//! handshake and keys, first 16 bytes]`, keyed from the PSK. The two ends
//! ([`Ends`]) are the NID addresses of the initiator (the side that connects)
//! and of the responder, in that order, as each side knows them (its own, and
//! the peer it dialled or the source of the datagram): a handshake reflected
//! back to its sender, or relayed to another node that holds the key, does not
//! authenticate there. The labels:
//! - client → listener (request, and the response that carries the cookie):
//!   label `c`, the client's ephemeral key;
//! - listener → client (the cookie): label `l`, no key (zeros), the MAC binds the
//!   client's key, so nobody without the PSK can answer a client. Same size as
//!   the request: no amplification;
//! - server connection → client: label `s`, the server's ephemeral key, the MAC
//!   binds both keys.
//!
//! The listener checks the MAC before the cookie and creates nothing until the
//! cookie proves the address (the existing stateless cookie); the connection's
//! secrets come from `HKDF(salt = PSK, ikm = X25519(eph, eph'))` with the two ends
//! and both public keys in the info (one 32-byte secret per direction): forward
//! secrecy (the ephemeral keys are gone after the exchange), and only PSK holders
//! agree on keys. A secret's AES-128 key is `HKDF-Expand(secret, "lu2k v4 key", 16)`.
//!
//! **Rekey**: a direction's secret is replaced by `HKDF-Expand(secret, "lu2k rekey")`
//! (and its key derived from the new secret)
//! after [`Limits::rekey_packets`] packets or [`Limits::rekey_us`], never sooner
//! than twice the grace period after the last change. The key epoch (the count
//! of changes, modulo 64, in the authenticated header) says which key sealed a
//! packet; the receiver keeps the previous key for [`Limits::grace_us`]
//! (packets already in flight), and has the next key ready before the first
//! packet under it arrives: no stall, no round trip. The sender changes keys on
//! time even while nothing reaches the peer (its keep-alives are sealed too),
//! so after an outage the receiver may find the sender several keys ahead: it
//! derives forward, up to [`MAX_SKIP`] keys, and tries the one key the epoch
//! names (one AEAD attempt per datagram; the derived secrets are kept, so a
//! forged epoch costs the HKDF derivation once, then an AES-GCM key set-up
//! and one failed open per datagram).
//!
//! **Replay**: a window of [`REPLAY_WINDOW`] counters per direction (a GEO path at
//! 1 Gbit/s has ~50 000 packets in flight); a counter seen, or older than the
//! window, is refused. Only a datagram that opened marks the window.

use std::net::IpAddr;

use aws_lc_rs::{aead, agreement, constant_time, hkdf, hmac, rand};
use zeroize::Zeroizing;

/// Clear header of a sealed datagram.
pub const SEAL_HDR: usize = 12;
/// AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// The UDT header's destination socket ID, sent once (in the clear header).
const DST_LEN: usize = 4;
/// Where the UDT packet lies in a datagram that [`Session::open`] opened:
/// `d[PLAIN_AT..d.len() - TAG_LEN]`.
pub const PLAIN_AT: usize = SEAL_HDR - DST_LEN;
/// Bytes a sealed datagram has beyond its plain UDT packet.
pub const OVERHEAD: usize = SEAL_HDR - DST_LEN + TAG_LEN;
/// The shortest UDT packet (its header).
const UDT_HDR: usize = 16;
/// A UDT4 handshake packet (16-byte header + 48-byte body).
pub const HS_LEN: usize = 64;
/// The handshake trailer.
pub const HS_EXT: usize = 4 + 32 + 16;
/// Counters the replay window covers.
pub const REPLAY_WINDOW: u64 = 1 << 16;
/// Shortest keying material [`Psk::from_bytes`] accepts (256 bits).
pub const MIN_PSK_LEN: usize = 32;
/// Key changes a receiver follows at once (an outage of this many key periods:
/// at the default [`Limits::rekey_us`], over two hours, longer than any idle
/// timeout keeps a connection). The epoch is 6 bits: 0 is the current key, 63
/// the previous one, 1..=62 ahead.
pub const MAX_SKIP: u8 = 62;

/// A sealed wire handshake trailer's first bytes: `L2K` and the wire version.
pub const HS_MAGIC: [u8; 4] = *b"L2K4";
const SEAL_MARK: [u8; 2] = [0xFF, 0xFF];
/// The top two bits of byte 2 (versions 3 and 4); the low six are the key epoch.
const SEAL_VERSION: u8 = 0xC0;
/// The sealed wire's version, as the log names it.
pub const WIRE_VERSION: u8 = 4;
/// The AEAD of every sealed datagram: AES-128-GCM, TLS 1.3's and QUIC's
/// default (the `seal` bench has it beside AES-256-GCM and ChaCha20-Poly1305).
const AEAD: &aead::Algorithm = &aead::AES_128_GCM;
const AEAD_KEY_LEN: usize = 16;
const VERSION_MASK: u8 = 0xC0;
const EPOCH_MASK: u8 = 0x3F;
/// Bits of the packet counter a sealed datagram carries (bytes 3..8).
const COUNTER_BITS: u32 = 40;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// When keys change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Packets sealed under one key before the sender moves to the next:
    /// AES-GCM's confidentiality limit for full-size packets (2^23, RFC 9001
    /// §6.6), which keeps an attacker's advantage below 2^-57.
    pub rekey_packets: u64,
    /// Age of a key (µs) after which the sender moves to the next.
    pub rekey_us: u64,
    /// How long (µs) a receiver keeps the previous key after the first packet
    /// under the next one arrived; the sender changes keys no more often than
    /// every two grace periods, so at most two keys are ever in play.
    pub grace_us: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rekey_packets: 1 << 23,
            rekey_us: 120_000_000,
            grace_us: 10_000_000,
        }
    }
}

/// A pre-shared key, prepared: the handshake MAC key and the KDF salt (wiped
/// from memory when dropped; `aws-lc` cleanses its own copy of the MAC key).
#[derive(Clone)]
pub struct Psk {
    mac: hmac::Key,
    salt: Zeroizing<[u8; 32]>,
}

/// The two ends of a handshake: the NID addresses of the side that connects
/// and of the side it connects to. Every handshake MAC and the KDF bind both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    /// The connecting side.
    pub initiator: IpAddr,
    /// The side connected to.
    pub responder: IpAddr,
}

impl Ends {
    /// What the MACs and the KDF bind: two IPv4 ends as their 8 bytes; ends of
    /// which either is IPv6 as 32 bytes, each end in its IPv6 form (an IPv4 end
    /// IPv4-mapped), so the two encodings never collide (different lengths).
    fn bytes(&self) -> ([u8; 32], usize) {
        let mut b = [0u8; 32];
        match (self.initiator, self.responder) {
            (IpAddr::V4(i), IpAddr::V4(r)) => {
                b[..4].copy_from_slice(&i.octets());
                b[4..8].copy_from_slice(&r.octets());
                (b, 8)
            }
            (i, r) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                b[..16].copy_from_slice(&v6(i));
                b[16..].copy_from_slice(&v6(r));
                (b, 32)
            }
        }
    }

    /// The same two addresses the other way round: what a handshake this side
    /// sent carries when it comes back to it.
    pub fn swapped(self) -> Ends {
        Ends {
            initiator: self.responder,
            responder: self.initiator,
        }
    }
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]], out: &mut [u8]) {
    prk.expand(info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 expands up to 8160 bytes");
}

impl Psk {
    /// A PSK from keying material (at least [`MIN_PSK_LEN`] bytes; the
    /// engine reads exactly 32 from a key file, see the config's `psk_file`).
    pub fn from_bytes(b: &[u8]) -> Result<Psk, &'static str> {
        if b.len() < MIN_PSK_LEN {
            return Err("shorter than 32 bytes");
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"lu2k psk v1").extract(b);
        let mut mac = Zeroizing::new([0u8; 32]);
        expand(&prk, &[b"lu2k handshake mac"], &mut mac[..]);
        let mut salt = Zeroizing::new([0u8; 32]);
        expand(&prk, &[b"lu2k kdf salt"], &mut salt[..]);
        Ok(Psk {
            mac: hmac::Key::new(hmac::HMAC_SHA256, &mac[..]),
            salt,
        })
    }

    /// Whether `other` is the same key (its KDF salt, derived from the key
    /// bytes, compared in constant time).
    pub fn same(&self, other: &Psk) -> bool {
        constant_time::verify_slices_are_equal(&self.salt[..], &other.salt[..]).is_ok()
    }

    fn tag(&self, label: &[u8], ends: Ends, parts: &[&[u8]]) -> [u8; 16] {
        let mut c = hmac::Context::with_key(&self.mac);
        // The version is bound too: a handshake of another version with its
        // magic rewritten to this one's does not authenticate (the two would
        // derive different keys and fail later, unexplained).
        c.update(&HS_MAGIC);
        c.update(label);
        let (e, n) = ends.bytes();
        c.update(&e[..n]);
        for p in parts {
            c.update(p);
        }
        let t = c.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&t.as_ref()[..16]);
        out
    }
}

/// Security of the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The plain UDT4 wire.
    #[default]
    Off,
    /// Every packet sealed; plain peers refused.
    Required,
}

impl Mode {
    /// As `lu2k-engine stats` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Required => "required",
        }
    }
}

/// The keys of an engine: one list per LNet network, and per peer address
/// (from a per-NID setting). The first key of a list is the one used to
/// connect; any key of the list is accepted from the peer (rotation).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    /// This node's NID address: its end of every handshake ([`Ends`]). Peers
    /// bind the address they dial, so it must be the address they know this
    /// node by; unset, no handshake authenticates. An IPv4-mapped address is
    /// written as the IPv4 one (the engine's canonical form).
    pub local: Option<IpAddr>,
    /// The network's keys.
    pub net: Vec<Psk>,
    /// Keys of single peers, which replace the network's for them.
    pub peers: std::collections::HashMap<IpAddr, Vec<Psk>>,
}

impl Keyring {
    /// The keys for a peer at `ip`.
    pub fn for_peer(&self, ip: IpAddr) -> &[Psk] {
        self.peers.get(&ip).map_or(&self.net[..], |k| &k[..])
    }
}

/// The engine's keys, replaceable while it runs (`SIGHUP` re-reads the key
/// files): the daemon stores a new [`Keyring`], and each core takes it at its
/// next handshake ([`SharedKeys::refresh`], one atomic load when nothing
/// changed). Keys already agreed are not touched: a connection's session keys
/// come from its own handshake, and its rekeys derive from those, so existing
/// connections carry on under them while new handshakes use the new set.
#[derive(Debug, Clone)]
pub struct SharedKeys(std::sync::Arc<SharedInner>);

#[derive(Debug)]
struct SharedInner {
    /// Bumped by every [`SharedKeys::replace`].
    generation: std::sync::atomic::AtomicU64,
    keys: std::sync::Mutex<Keyring>,
}

impl SharedKeys {
    /// Shares `keys`.
    pub fn new(keys: Keyring) -> SharedKeys {
        SharedKeys(std::sync::Arc::new(SharedInner {
            generation: std::sync::atomic::AtomicU64::new(0),
            keys: std::sync::Mutex::new(keys),
        }))
    }

    /// Puts `keys` in place of the shared set.
    pub fn replace(&self, keys: Keyring) {
        *self.0.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys;
        self.0
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The shared set, and its generation.
    pub fn get(&self) -> (Keyring, u64) {
        let k = self.0.keys.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: `replace` bumps it after storing, so a set is
        // never paired with a generation newer than itself.
        let g = self.0.generation.load(std::sync::atomic::Ordering::Acquire);
        (k.clone(), g)
    }

    /// Replaces `keys` by the shared set if that changed since generation
    /// `seen` (updated); whether it did.
    pub fn refresh(&self, seen: &mut u64, keys: &mut Keyring) -> bool {
        if self.0.generation.load(std::sync::atomic::Ordering::Acquire) == *seen {
            return false;
        }
        (*keys, *seen) = self.get();
        true
    }
}

/// Seeds aws-lc's random generator: its first use in a process gathers
/// entropy for tens of milliseconds (its CPU-jitter source), which would
/// otherwise fall on the first handshake of each side, in the transfer's time.
/// Called when the engine starts on the sealed wire.
pub fn seed_random() {
    let mut b = Zeroizing::new([0u8; 32]);
    if rand::fill(&mut b[..]).is_err() {
        tracing::warn!("the random generator failed to seed; handshakes will retry it");
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Did not authenticate (tampered, forged, or sealed under another key).
    BadTag,
    /// Its counter was seen already, or is older than the replay window.
    Replay,
    /// Not a sealed datagram (too short, or not our format).
    Malformed,
}

fn nonce(counter: u64) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// A direction's secret for one key epoch: the 32-byte chain value the next
/// epoch's secret derives from, and the AES-128 key derived from it (kept, so
/// that a key set-up, a receiver's skip ahead above all, costs no HKDF call).
struct Secret {
    chain: Zeroizing<[u8; 32]>,
    key: Zeroizing<[u8; AEAD_KEY_LEN]>,
}

impl Secret {
    /// The epoch secret `chain` and its cipher key: `HKDF-Expand(chain,
    /// "lu2k v4 key", 16)`, as TLS 1.3 derives a record key from a traffic
    /// secret (the chain stays 32 bytes, full strength for HKDF).
    fn new(chain: Zeroizing<[u8; 32]>) -> Secret {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &chain[..]);
        let mut key = Zeroizing::new([0u8; AEAD_KEY_LEN]);
        expand(&prk, &[b"lu2k v4 key"], &mut key[..]);
        Secret { chain, key }
    }
}

fn aead_key(secret: &Secret) -> aead::LessSafeKey {
    aead::LessSafeKey::new(
        aead::UnboundKey::new(AEAD, &secret.key[..]).expect("a 16-byte AES-128 key"),
    )
}

fn next_secret(secret: &Secret) -> Secret {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret.chain[..]);
    let mut out = Zeroizing::new([0u8; 32]);
    expand(&prk, &[b"lu2k rekey"], &mut out[..]);
    Secret::new(out)
}

/// Whether `d` is a sealed datagram (by its mark and size: it holds at least
/// a UDT header; it may still be forged).
pub fn is_sealed(d: &[u8]) -> bool {
    d.len() >= OVERHEAD + UDT_HDR && d[..2] == SEAL_MARK && d[2] & VERSION_MASK == SEAL_VERSION
}

/// The destination socket ID of a sealed datagram (from its clear header).
pub fn sealed_dst(d: &[u8]) -> Option<u32> {
    d.get(PLAIN_AT..SEAL_HDR)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The destination socket ID of a UDT packet (a handshake, for one).
pub fn dst_socket(d: &[u8]) -> Option<u32> {
    d.get(12..16)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The full counter that `low` (a counter's low [`COUNTER_BITS`] bits) stands
/// for: the one nearest to `expected` (RFC 9000 appendix A.3's packet number
/// decoding).
fn full_counter(expected: u64, low: u64) -> u64 {
    const WIN: u64 = 1 << COUNTER_BITS;
    const HALF: u64 = WIN / 2;
    let cand = (expected & !(WIN - 1)) | (low & (WIN - 1));
    if cand.saturating_add(HALF) <= expected && cand <= u64::MAX - WIN {
        cand + WIN
    } else if cand > expected.saturating_add(HALF) && cand >= WIN {
        cand - WIN
    } else {
        cand
    }
}

/// The sending half of a connection's keys.
struct TxKey {
    key: aead::LessSafeKey,
    secret: Secret,
    epoch: u8,
    counter: u64,
    used: u64,
    since_us: u64,
}

/// The receiving half: the current key, the previous one during its grace
/// period, the next one ready, and the secrets of the keys after it derived so
/// far (`ahead[i]`: epoch `epoch + 1 + i`; never empty).
struct RxKey {
    cur: aead::LessSafeKey,
    cur_secret: Secret,
    epoch: u8,
    /// Lowest counter opened under `cur` (older packets of the previous epoch
    /// are the previous key's).
    cur_from: u64,
    prev: Option<(aead::LessSafeKey, u64)>,
    next: aead::LessSafeKey,
    ahead: Vec<Secret>,
    window: Replay,
}

/// A connection's keys, both directions.
pub struct Session {
    tx: TxKey,
    rx: RxKey,
    limits: Limits,
    /// Key changes, both directions.
    pub rekeys: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tx_counter", &self.tx.counter)
            .field("rekeys", &self.rekeys)
            .finish_non_exhaustive()
    }
}

impl Session {
    fn new(tx_secret: Secret, rx_secret: Secret, now: u64, limits: Limits) -> Session {
        let next = next_secret(&rx_secret);
        Session {
            tx: TxKey {
                key: aead_key(&tx_secret),
                secret: tx_secret,
                epoch: 0,
                counter: 0,
                used: 0,
                since_us: now,
            },
            rx: RxKey {
                cur: aead_key(&rx_secret),
                cur_secret: rx_secret,
                epoch: 0,
                cur_from: 0,
                prev: None,
                next: aead_key(&next),
                ahead: vec![next],
                window: Replay::new(),
            },
            limits,
            rekeys: 0,
        }
    }

    /// Packets sealed so far (the next counter).
    pub fn sealed(&self) -> u64 {
        self.tx.counter
    }

    /// Whether a datagram from the peer has opened (the peer holds the keys:
    /// a repeated handshake after that is nothing the connection needs).
    pub fn has_opened(&self) -> bool {
        self.rx.window.any
    }

    fn maybe_rekey(&mut self, now: u64) {
        let l = self.limits;
        let age = now.saturating_sub(self.tx.since_us);
        if (self.tx.used >= l.rekey_packets || age >= l.rekey_us) && age >= 2 * l.grace_us {
            self.tx.secret = next_secret(&self.tx.secret);
            self.tx.key = aead_key(&self.tx.secret);
            self.tx.epoch = self.tx.epoch.wrapping_add(1);
            self.tx.used = 0;
            self.tx.since_us = now;
            self.rekeys += 1;
        }
    }

    /// Seals one UDT packet into `out`: the packet is `head` (pieces gathered
    /// in order: the UDT header, at least its 16 bytes in `head[0]`, and any
    /// payload pieces before the last) then `tail` (the last payload piece,
    /// encrypted straight from where it lies). Writes the clear header (with
    /// the header's destination socket ID), the ciphertext of the packet less
    /// that ID, and the tag. Returns the datagram's length, or `None` if `out`
    /// is too short, `head[0]` is no UDT header, or the counter ran out (which
    /// 2^64 packets never do).
    pub fn seal(&mut self, now: u64, head: &[&[u8]], tail: &[u8], out: &mut [u8]) -> Option<usize> {
        let (udt, more) = head.split_first()?;
        if udt.len() < UDT_HDR {
            return None;
        }
        let head_len: usize = udt.len() - DST_LEN + more.iter().map(|h| h.len()).sum::<usize>();
        let len = SEAL_HDR + head_len + tail.len() + TAG_LEN;
        if out.len() < len || self.tx.counter == u64::MAX {
            return None;
        }
        self.maybe_rekey(now);
        let counter = self.tx.counter;
        let out = &mut out[..len];
        out[..2].copy_from_slice(&SEAL_MARK);
        out[2] = SEAL_VERSION | (self.tx.epoch & EPOCH_MASK);
        // The low 40 bits: the receiver restores the rest (`full_counter`).
        out[3..PLAIN_AT].copy_from_slice(&counter.to_be_bytes()[3..]);
        out[PLAIN_AT..SEAL_HDR].copy_from_slice(&udt[12..UDT_HDR]);
        let (hdr, rest) = out.split_at_mut(SEAL_HDR);
        let (in_out, extra_out) = rest.split_at_mut(head_len);
        in_out[..12].copy_from_slice(&udt[..12]);
        let mut at = 12;
        for h in std::iter::once(&&udt[UDT_HDR..]).chain(more) {
            in_out[at..at + h.len()].copy_from_slice(h);
            at += h.len();
        }
        self.tx
            .key
            .seal_in_place_scatter(
                nonce(counter),
                aead::Aad::from(&hdr[..]),
                in_out,
                tail,
                extra_out,
            )
            .ok()?;
        self.tx.counter += 1;
        self.tx.used += 1;
        Some(len)
    }

    /// Opens sealed datagram `d` in place; the UDT packet (its destination
    /// socket ID restored from the clear header) is then
    /// `d[PLAIN_AT..d.len() - TAG_LEN]`.
    pub fn open(&mut self, now: u64, d: &mut [u8]) -> Result<(), Reject> {
        if !is_sealed(d) {
            return Err(Reject::Malformed);
        }
        let mut hdr = [0u8; SEAL_HDR];
        hdr.copy_from_slice(&d[..SEAL_HDR]);
        let ahead = hdr[2].wrapping_sub(self.rx.epoch) & EPOCH_MASK;
        let mut low = [0u8; 8];
        low[3..].copy_from_slice(&hdr[3..PLAIN_AT]);
        let low = u64::from_be_bytes(low);
        let w = &self.rx.window;
        let counter = full_counter(if w.any { w.top.saturating_add(1) } else { 0 }, low);
        w.check(counter)?;
        if self.rx.prev.as_ref().is_some_and(|p| p.1 <= now) {
            self.rx.prev = None;
        }
        // One key per datagram, the one its epoch names: the current one, the
        // previous one (its grace period, older counters only), or one of the
        // next [`MAX_SKIP`].
        let skipped;
        let key = match ahead {
            0 => &self.rx.cur,
            EPOCH_MASK => match &self.rx.prev {
                Some((k, _)) if counter < self.rx.cur_from => k,
                _ => return Err(Reject::BadTag),
            },
            1 => &self.rx.next,
            n if n <= MAX_SKIP => {
                while self.rx.ahead.len() < usize::from(n) {
                    let last = self.rx.ahead.last().expect("never empty");
                    let s = next_secret(last);
                    self.rx.ahead.push(s);
                }
                skipped = aead_key(&self.rx.ahead[usize::from(n) - 1]);
                &skipped
            }
            _ => return Err(Reject::BadTag),
        };
        let body = &mut d[SEAL_HDR..];
        key.open_in_place(nonce(counter), aead::Aad::from(&hdr[..]), body)
            .map_err(|_| Reject::BadTag)?;
        // The UDT header back in one piece: its first 12 bytes 4 bytes back,
        // the destination socket ID after them (the payload stays put).
        d.copy_within(SEAL_HDR..SEAL_HDR + 12, PLAIN_AT);
        d[PLAIN_AT + 12..PLAIN_AT + UDT_HDR].copy_from_slice(&hdr[PLAIN_AT..SEAL_HDR]);
        self.rx.window.mark(counter);
        match ahead {
            0 => self.rx.cur_from = self.rx.cur_from.min(counter),
            EPOCH_MASK => {}
            n => self.move_rx(now, n, counter),
        }
        Ok(())
    }

    /// The receiver follows the sender `n` keys forward (a datagram under that
    /// key opened at `counter`); the key just before becomes the previous one.
    fn move_rx(&mut self, now: u64, n: u8, counter: u64) {
        let n = usize::from(n);
        if self.rx.ahead.len() == n {
            let s = next_secret(&self.rx.ahead[n - 1]);
            self.rx.ahead.push(s);
        }
        let passed: Vec<Secret> = self.rx.ahead.drain(..n).collect();
        let cur = aead_key(&passed[n - 1]);
        let prev = if n == 1 {
            std::mem::replace(&mut self.rx.cur, cur)
        } else {
            self.rx.cur = cur;
            aead_key(&passed[n - 2])
        };
        self.rx.next = aead_key(&self.rx.ahead[0]);
        self.rx.cur_secret = passed.into_iter().next_back().expect("n >= 1");
        self.rx.prev = Some((prev, now.saturating_add(self.limits.grace_us)));
        self.rx.epoch = self.rx.epoch.wrapping_add(n as u8);
        self.rx.cur_from = counter;
        self.rekeys += n as u64;
    }
}

/// Which counters a direction has opened, over the last [`REPLAY_WINDOW`].
struct Replay {
    top: u64,
    any: bool,
    bits: Box<[u64; WORDS]>,
}

impl Replay {
    fn new() -> Replay {
        Replay {
            top: 0,
            any: false,
            bits: Box::new([0; WORDS]),
        }
    }

    fn bit(c: u64) -> (usize, u64) {
        let i = c % REPLAY_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn check(&self, c: u64) -> Result<(), Reject> {
        if !self.any || c > self.top {
            return Ok(());
        }
        if self.top - c >= REPLAY_WINDOW {
            return Err(Reject::Replay);
        }
        let (w, b) = Self::bit(c);
        if self.bits[w] & b != 0 {
            Err(Reject::Replay)
        } else {
            Ok(())
        }
    }

    fn mark(&mut self, c: u64) {
        if !self.any {
            self.any = true;
            self.top = c;
        } else if c > self.top {
            if c - self.top >= REPLAY_WINDOW {
                self.bits.fill(0);
            } else {
                // Forget the counters the window slides past.
                let mut i = self.top + 1;
                while i <= c {
                    let (w, b) = Self::bit(i);
                    if i % 64 == 0 && c - i >= 63 {
                        self.bits[w] = 0;
                        i += 64;
                    } else {
                        self.bits[w] &= !b;
                        i += 1;
                    }
                }
            }
            self.top = c;
        }
        let (w, b) = Self::bit(c);
        self.bits[w] |= b;
    }
}

/// The sealed wire version of a datagram from another lu2k release: a sealed
/// datagram of version 2 (`FF FF 02`, where versions 3 and 4 have the top bits
/// `11`) or a handshake whose trailer names another version (`L2K` and a digit:
/// `L2K3` for version 3, AES-256-GCM). The versions share no keys (the
/// trailer's magic and the key labels name the version), so such a peer is told
/// apart from a plain UDT4 peer in the counters and the log rather than refused
/// as plain. A version 3 datagram is not told apart (same layout): without a
/// handshake of this version no connection has its keys, so it is refused as
/// one for an unknown connection.
pub fn other_version(d: &[u8]) -> Option<u8> {
    if d.len() >= 3 && d[..2] == SEAL_MARK && d[2] == 2 {
        return Some(2);
    }
    match d.get(HS_LEN..HS_LEN + 4) {
        Some([b'L', b'2', b'K', v])
            if d.len() == HS_LEN + HS_EXT && [b'L', b'2', b'K', *v] != HS_MAGIC =>
        {
            v.is_ascii_digit().then(|| v - b'0')
        }
        _ => None,
    }
}

/// A handshake trailer, split: `(handshake, public key, tag)`.
pub fn split_hs(d: &[u8]) -> Option<(&[u8], [u8; 32], [u8; 16])> {
    if d.len() != HS_LEN + HS_EXT || d[HS_LEN..HS_LEN + 4] != HS_MAGIC {
        return None;
    }
    let k = d[HS_LEN + 4..HS_LEN + 36].try_into().ok()?;
    let t = d[HS_LEN + 36..].try_into().ok()?;
    Some((&d[..HS_LEN], k, t))
}

fn trailer(key: &[u8; 32], tag: [u8; 16]) -> [u8; HS_EXT] {
    let mut t = [0u8; HS_EXT];
    t[..4].copy_from_slice(&HS_MAGIC);
    t[4..36].copy_from_slice(key);
    t[36..].copy_from_slice(&tag);
    t
}

fn tag_ok(a: &[u8; 16], b: &[u8; 16]) -> bool {
    constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// The handshake state of the connecting side.
pub struct Client {
    psk: Psk,
    ends: Ends,
    eph: Option<agreement::EphemeralPrivateKey>,
    public: [u8; 32],
    server: Option<[u8; 32]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("done", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

/// What a client made of a handshake reply.
#[derive(Debug)]
pub enum ClientGot {
    /// The listener's cookie (authentic): hand the handshake to the connection.
    Cookie,
    /// The server's reply: the session, the first time.
    Server(Option<Box<Session>>),
}

impl Client {
    /// A fresh ephemeral key for a connection that connects with `psk`, from
    /// `ends.initiator` (this node) to `ends.responder` (the peer dialled).
    pub fn new(psk: Psk, ends: Ends) -> Client {
        let rng = rand::SystemRandom::new();
        let eph = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .expect("X25519 key generation");
        let mut public = [0u8; 32];
        public.copy_from_slice(eph.compute_public_key().expect("X25519").as_ref());
        Client {
            psk,
            ends,
            eph: Some(eph),
            public,
            server: None,
        }
    }

    /// Whether the client's key is one of `keys` (after a key reload, a
    /// client whose key was removed starts over with a current one).
    pub fn keyed_with(&self, keys: &[Psk]) -> bool {
        keys.iter().any(|k| k.same(&self.psk))
    }

    /// The ends the client binds.
    pub fn ends(&self) -> Ends {
        self.ends
    }

    /// The trailer of one of the client's handshakes (`hs`, 64 bytes).
    pub fn trailer(&self, hs: &[u8]) -> [u8; HS_EXT] {
        client_trailer(&self.psk, self.ends, hs, &self.public)
    }

    /// The client's ephemeral public key (a listener refuses a handshake that
    /// carries one of its own clients' keys).
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Checks a handshake reply (`d`, with trailer) and, from the server's
    /// first, derives the session. `None`: not authentic.
    pub fn on_reply(&mut self, d: &[u8], now: u64, limits: Limits) -> Option<ClientGot> {
        let (hs, key, tag) = split_hs(d)?;
        if key == [0; 32] {
            let want = self.psk.tag(b"l", self.ends, &[hs, &self.public]);
            return tag_ok(&want, &tag).then_some(ClientGot::Cookie);
        }
        let want = self.psk.tag(b"s", self.ends, &[hs, &self.public, &key]);
        if !tag_ok(&want, &tag) {
            return None;
        }
        if let Some(s) = self.server {
            // A repeated reply: the same server key or nothing.
            return (s == key).then_some(ClientGot::Server(None));
        }
        let eph = self.eph.take()?;
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, key);
        let (c2s, s2c) = agreement::agree_ephemeral(eph, peer, (), |dh| {
            Ok(derive(&self.psk, self.ends, dh, &self.public, &key))
        })
        .ok()?;
        self.server = Some(key);
        Some(ClientGot::Server(Some(Box::new(Session::new(
            c2s, s2c, now, limits,
        )))))
    }
}

fn derive(
    psk: &Psk,
    ends: Ends,
    dh: &[u8],
    client: &[u8; 32],
    server: &[u8; 32],
) -> (Secret, Secret) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &psk.salt[..]).extract(dh);
    let mut c2s = Zeroizing::new([0u8; 32]);
    let mut s2c = Zeroizing::new([0u8; 32]);
    let (e, n) = ends.bytes();
    let e = &e[..n];
    expand(&prk, &[b"lu2k v4 c2s", e, client, server], &mut c2s[..]);
    expand(&prk, &[b"lu2k v4 s2c", e, client, server], &mut s2c[..]);
    (Secret::new(c2s), Secret::new(s2c))
}

/// The trailer a client with ephemeral key `public` puts on handshake `hs`
/// between `ends`, keyed from `psk` (what [`Client::trailer`] writes; also for
/// checks that the listener's own refusals hold against a holder of the PSK).
pub fn client_trailer(psk: &Psk, ends: Ends, hs: &[u8], public: &[u8; 32]) -> [u8; HS_EXT] {
    trailer(public, psk.tag(b"c", ends, &[hs, public]))
}

/// A client handshake (`d`, with trailer) checked against `keys` as one
/// between `ends` (the listener passes the datagram's source and itself): the
/// index of the key that authenticates it, and the client's public key.
pub fn check_client_hs(keys: &[Psk], ends: Ends, d: &[u8]) -> Option<(usize, [u8; 32])> {
    let (hs, key, tag) = split_hs(d)?;
    keys.iter()
        .position(|p| tag_ok(&p.tag(b"c", ends, &[hs, &key]), &tag))
        .map(|i| (i, key))
}

/// The listener's trailer for its cookie reply `hs` to a client whose public
/// key is `client`, the handshake being between `ends`.
pub fn listener_trailer(psk: &Psk, ends: Ends, hs: &[u8], client: &[u8; 32]) -> [u8; HS_EXT] {
    trailer(&[0; 32], psk.tag(b"l", ends, &[hs, client]))
}

/// The handshake state of the accepting side.
#[derive(Debug)]
pub struct Server {
    psk: Psk,
    ends: Ends,
    client: [u8; 32],
    public: [u8; 32],
}

impl Server {
    /// Answers client key `client` (authenticated with `psk` as a handshake
    /// between `ends`): the server's state and the session.
    pub fn accept(
        psk: Psk,
        ends: Ends,
        client: [u8; 32],
        now: u64,
        limits: Limits,
    ) -> Option<(Server, Box<Session>)> {
        let rng = rand::SystemRandom::new();
        let eph = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).ok()?;
        let mut public = [0u8; 32];
        public.copy_from_slice(eph.compute_public_key().ok()?.as_ref());
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, client);
        let (c2s, s2c) = agreement::agree_ephemeral(eph, peer, (), |dh| {
            Ok(derive(&psk, ends, dh, &client, &public))
        })
        .ok()?;
        Some((
            Server {
                psk,
                ends,
                client,
                public,
            },
            Box::new(Session::new(s2c, c2s, now, limits)),
        ))
    }

    /// The trailer of the server connection's handshake `hs`.
    pub fn trailer(&self, hs: &[u8]) -> [u8; HS_EXT] {
        trailer(
            &self.public,
            self.psk
                .tag(b"s", self.ends, &[hs, &self.client, &self.public]),
        )
    }

    /// Whether a repeated client handshake carries this connection's client key
    /// and authenticates.
    pub fn same_client(&self, d: &[u8]) -> bool {
        split_hs(d).is_some_and(|(hs, key, tag)| {
            key == self.client && tag_ok(&self.psk.tag(b"c", self.ends, &[hs, &key]), &tag)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn psk(b: u8) -> Psk {
        Psk::from_bytes(&[b; 32]).unwrap()
    }

    const ENDS: Ends = Ends {
        initiator: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        responder: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
    };

    /// The counter's low bits on the wire decode right only within half their
    /// range of the newest counter; a receiver follows the sender at most
    /// [`MAX_SKIP`] keys forward, each of at most `rekey_packets` packets, so a
    /// legitimate counter is always far inside that range.
    #[test]
    fn the_epoch_limit_comes_long_before_the_counter_decoding_limit() {
        let l = Limits::default();
        let followed = (u64::from(MAX_SKIP) + 1) * l.rekey_packets;
        assert!(followed < 1 << (COUNTER_BITS - 1), "{followed} counters");
        assert!(followed.saturating_add(REPLAY_WINDOW) < 1 << (COUNTER_BITS - 2));
    }

    #[test]
    fn another_versions_datagrams_are_told_apart() {
        let mut v2 = vec![0xFF, 0xFF, 2, 0];
        v2.extend_from_slice(&[0x5A; 60]);
        assert_eq!(other_version(&v2), Some(2));
        assert!(!is_sealed(&v2));
        let mut hs = vec![0u8; HS_LEN + HS_EXT];
        hs[HS_LEN..HS_LEN + 4].copy_from_slice(b"L2K2");
        assert_eq!(other_version(&hs), Some(2));
        assert!(split_hs(&hs).is_none(), "a version 2 handshake is not ours");
        hs[HS_LEN..HS_LEN + 4].copy_from_slice(b"L2K3");
        assert_eq!(other_version(&hs), Some(3), "version 3: AES-256-GCM");
        assert!(split_hs(&hs).is_none(), "a version 3 handshake is not ours");
        hs[HS_LEN..HS_LEN + 4].copy_from_slice(&HS_MAGIC);
        assert_eq!(other_version(&hs), None);
        assert!(split_hs(&hs).is_some());
        // A plain UDT4 packet is no version at all.
        assert_eq!(other_version(&[0x80, 0x02, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(other_version(&[0xFF]), None);
    }

    fn pair(limits: Limits) -> (Box<Session>, Box<Session>) {
        let mut c = Client::new(psk(7), ENDS);
        let hs = [1u8; HS_LEN];
        let mut d = hs.to_vec();
        d.extend_from_slice(&c.trailer(&hs));
        let (i, ck) = check_client_hs(&[psk(1), psk(7)], ENDS, &d).expect("authentic");
        assert_eq!(i, 1);
        let (srv, ss) = Server::accept(psk(7), ENDS, ck, 0, limits).unwrap();
        let mut r = [2u8; HS_LEN].to_vec();
        r.extend_from_slice(&srv.trailer(&[2u8; HS_LEN]));
        let Some(ClientGot::Server(Some(cs))) = c.on_reply(&r, 0, limits) else {
            panic!("server reply refused")
        };
        assert!(matches!(
            c.on_reply(&r, 0, limits),
            Some(ClientGot::Server(None))
        ));
        (cs, ss)
    }

    /// A UDT header for socket 42.
    const HDR: [u8; 16] = [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 42];

    fn seal(s: &mut Session, now: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; payload.len() + OVERHEAD + 16];
        let n = s.seal(now, &[&HDR], payload, &mut out).expect("fits");
        assert_eq!(n, payload.len() + 16 + OVERHEAD);
        out.truncate(n);
        out
    }

    #[test]
    fn a_sealed_packet_opens_once_and_only_untouched() {
        let (mut c, mut s) = pair(Limits::default());
        let d = seal(&mut c, 0, b"lustre payload");
        assert!(is_sealed(&d) && sealed_dst(&d) == Some(42));
        assert_eq!(d.len(), OVERHEAD + 16 + 14);
        assert_eq!((SEAL_HDR, OVERHEAD, PLAIN_AT), (12, 24, 8));
        assert!(!d.windows(7).any(|w| w == b"payload"), "payload in clear");
        let mut x = d.clone();
        s.open(0, &mut x).unwrap();
        // The whole UDT packet, its destination socket ID restored.
        assert_eq!(&x[PLAIN_AT..PLAIN_AT + 16], &HDR);
        assert_eq!(&x[PLAIN_AT + 16..x.len() - TAG_LEN], b"lustre payload");
        // The same packet again: a replay.
        let mut y = d.clone();
        assert_eq!(s.open(0, &mut y), Err(Reject::Replay));
        // Any flipped bit, clear header included: a bad tag.
        for i in [2, 3, 7, 8, 11, SEAL_HDR, d.len() - 1] {
            let mut t = seal(&mut c, 0, b"lustre payload");
            t[i] ^= 0x10;
            assert_eq!(s.open(0, &mut t), Err(Reject::BadTag), "byte {i}");
        }
        // The other direction has its own key: a packet reflected back fails.
        let mut z = seal(&mut c, 0, b"x");
        assert_eq!(c.open(0, &mut z), Err(Reject::BadTag));
    }

    /// The wire is AES-128-GCM under `HKDF-Expand(secret, "lu2k v4 key", 16)`,
    /// nonce the 64-bit counter after four zero bytes, AAD the clear header:
    /// a datagram opens with a key built that way from the receiver's secret,
    /// and not with AES-256-GCM under the secret itself (version 3's key).
    #[test]
    fn the_wire_is_aes_128_gcm_under_the_documented_key() {
        let (mut c, s) = pair(Limits::default());
        let _first = seal(&mut c, 0, b"first");
        let d = seal(&mut c, 0, b"lustre payload");
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &s.rx.cur_secret.chain[..]);
        let mut k = [0u8; 16];
        expand(&prk, &[b"lu2k v4 key"], &mut k);
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &k).unwrap());
        let mut n = [0u8; 12];
        n[11] = 1;
        let mut body = d[SEAL_HDR..].to_vec();
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(n),
                aead::Aad::from(&d[..SEAL_HDR]),
                &mut body,
            )
            .expect("opens under the documented key");
        assert_eq!(&plain[..12], &HDR[..12]);
        assert_eq!(&plain[12..], b"lustre payload");
        let old = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &s.rx.cur_secret.chain[..]).unwrap(),
        );
        let mut body = d[SEAL_HDR..].to_vec();
        assert!(old
            .open_in_place(
                aead::Nonce::assume_unique_for_key(n),
                aead::Aad::from(&d[..SEAL_HDR]),
                &mut body,
            )
            .is_err());
    }

    /// A version 3 handshake (its MAC without the version) with the magic
    /// rewritten to this version's does not authenticate.
    #[test]
    fn a_version_3_handshake_relabelled_does_not_authenticate() {
        let p = psk(7);
        let c = Client::new(p.clone(), ENDS);
        let hs = [1u8; HS_LEN];
        let mut m = hmac::Context::with_key(&p.mac);
        m.update(b"c");
        let (e, n) = ENDS.bytes();
        m.update(&e[..n]);
        m.update(&hs);
        m.update(&c.public);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&m.sign().as_ref()[..16]);
        let mut d = hs.to_vec();
        d.extend_from_slice(&trailer(&c.public, tag));
        assert!(check_client_hs(std::slice::from_ref(&p), ENDS, &d).is_none());
        // The same handshake as this version makes it authenticates.
        let mut d = hs.to_vec();
        d.extend_from_slice(&c.trailer(&hs));
        assert!(check_client_hs(&[p], ENDS, &d).is_some());
    }

    #[test]
    fn a_handshake_authenticates_only_between_its_two_ends() {
        let third = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let mut c = Client::new(psk(7), ENDS);
        let hs = [1u8; HS_LEN];
        let mut d = hs.to_vec();
        d.extend_from_slice(&c.trailer(&hs));
        assert!(check_client_hs(&[psk(7)], ENDS, &d).is_some());
        // Reflected back to the client's node as if from the responder.
        assert!(check_client_hs(&[psk(7)], ENDS.swapped(), &d).is_none());
        // Relayed to a third node that holds the same key.
        let relayed = Ends {
            responder: third,
            ..ENDS
        };
        assert!(check_client_hs(&[psk(7)], relayed, &d).is_none());
        // A server that took the handshake as from another initiator: the
        // client refuses its reply, and the cookie of such a listener.
        let other = Ends {
            initiator: third,
            ..ENDS
        };
        let (srv, _) = Server::accept(psk(7), other, c.public, 0, Limits::default()).unwrap();
        let mut r = [2u8; HS_LEN].to_vec();
        r.extend_from_slice(&srv.trailer(&[2u8; HS_LEN]));
        assert!(c.on_reply(&r, 0, Limits::default()).is_none());
        let mut l = [3u8; HS_LEN].to_vec();
        l.extend_from_slice(&listener_trailer(&psk(7), other, &[3u8; HS_LEN], &c.public));
        assert!(c.on_reply(&l, 0, Limits::default()).is_none());
        // The client's own role reversed: its key is not a server's reply.
        let mut own = [2u8; HS_LEN].to_vec();
        own.extend_from_slice(&c.trailer(&[2u8; HS_LEN]));
        assert!(c.on_reply(&own, 0, Limits::default()).is_none());
    }

    /// IPv6 ends are bound as tightly: a handshake between two IPv6 addresses
    /// authenticates only between them (one address bit, the order, or the IPv4
    /// form of a mapped address each make it fail), and it keys a session.
    #[test]
    fn ipv6_ends_are_bound_into_the_macs() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        let ends = Ends {
            initiator: a,
            responder: b,
        };
        let c = Client::new(psk(7), ends);
        let hs = [1u8; HS_LEN];
        let mut d = hs.to_vec();
        d.extend_from_slice(&c.trailer(&hs));
        assert!(check_client_hs(&[psk(7)], ends, &d).is_some());
        assert!(check_client_hs(&[psk(7)], ends.swapped(), &d).is_none());
        let near = Ends {
            responder: "2001:db8::3".parse().unwrap(),
            ..ends
        };
        assert!(check_client_hs(&[psk(7)], near, &d).is_none());
        // An IPv4 end and its IPv4-mapped IPv6 form are different ends.
        let v4 = Ends {
            initiator: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            responder: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        };
        let mapped = Ends {
            initiator: IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()),
            responder: IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped()),
        };
        let c4 = Client::new(psk(7), v4);
        let mut d4 = hs.to_vec();
        d4.extend_from_slice(&c4.trailer(&hs));
        assert!(check_client_hs(&[psk(7)], v4, &d4).is_some());
        assert!(check_client_hs(&[psk(7)], mapped, &d4).is_none());
        // The listener's cookie reply between IPv6 ends: the client takes it only
        // from the ends it dialled.
        let mut c = Client::new(psk(7), ends);
        let mut l = [3u8; HS_LEN].to_vec();
        l.extend_from_slice(&listener_trailer(&psk(7), near, &[3u8; HS_LEN], &c.public));
        assert!(c.on_reply(&l, 0, Limits::default()).is_none());
        let (srv, _) = Server::accept(psk(7), ends, c.public, 0, Limits::default()).unwrap();
        let mut r = [2u8; HS_LEN].to_vec();
        r.extend_from_slice(&srv.trailer(&[2u8; HS_LEN]));
        assert!(matches!(
            c.on_reply(&r, 0, Limits::default()),
            Some(ClientGot::Server(Some(_)))
        ));
    }

    #[test]
    fn wrong_psk_is_refused_both_ways() {
        let c = Client::new(psk(7), ENDS);
        let hs = [1u8; HS_LEN];
        let mut d = hs.to_vec();
        d.extend_from_slice(&c.trailer(&hs));
        assert!(check_client_hs(&[psk(8)], ENDS, &d).is_none());
        // A server with another PSK: the client refuses its reply.
        let mut c = Client::new(psk(7), ENDS);
        let (srv, _) = Server::accept(psk(8), ENDS, c.public, 0, Limits::default()).unwrap();
        let mut r = [2u8; HS_LEN].to_vec();
        r.extend_from_slice(&srv.trailer(&[2u8; HS_LEN]));
        assert!(c.on_reply(&r, 0, Limits::default()).is_none());
        // A listener cookie for another client's key is refused too.
        let mut l = [3u8; HS_LEN].to_vec();
        l.extend_from_slice(&listener_trailer(&psk(7), ENDS, &[3u8; HS_LEN], &[5; 32]));
        assert!(c.on_reply(&l, 0, Limits::default()).is_none());
        let mut l = [3u8; HS_LEN].to_vec();
        l.extend_from_slice(&listener_trailer(&psk(7), ENDS, &[3u8; HS_LEN], &c.public));
        assert!(matches!(
            c.on_reply(&l, 0, Limits::default()),
            Some(ClientGot::Cookie)
        ));
        assert_eq!(
            Psk::from_bytes(&[1; 31]).unwrap_err(),
            "shorter than 32 bytes"
        );
    }

    #[test]
    fn the_replay_window_spans_a_geo_flight_out_of_order() {
        let (mut c, mut s) = pair(Limits::default());
        let pkts: Vec<Vec<u8>> = (0..60_000).map(|_| seal(&mut c, 0, b"p")).collect();
        // The newest first, then the whole flight backwards: all open.
        for d in pkts.iter().rev() {
            s.open(0, &mut d.clone()).expect("within the window");
        }
        for d in pkts.iter().step_by(997) {
            assert_eq!(s.open(0, &mut d.clone()), Err(Reject::Replay));
        }
        // Beyond the window: refused as too old even though never seen.
        let old = seal(&mut c, 0, b"p");
        for _ in 0..REPLAY_WINDOW {
            c.tx.counter += 1;
        }
        let newer = seal(&mut c, 0, b"p");
        s.open(0, &mut newer.clone()).unwrap();
        assert_eq!(s.open(0, &mut old.clone()), Err(Reject::Replay));
    }

    #[test]
    fn rekey_keeps_every_packet_in_flight_open() {
        let limits = Limits {
            rekey_packets: 100,
            rekey_us: u64::MAX,
            grace_us: 1_000,
        };
        let (mut c, mut s) = pair(limits);
        let mut now = 0;
        let mut flight = Vec::new();
        let mut opened = 0;
        for i in 0..5_000u64 {
            now += 10; // 100 packets per ms: a key change every 2 ms
            flight.push(seal(&mut c, now, &i.to_be_bytes()));
            // Delivered 30 packets late and two by two reordered.
            if flight.len() > 30 {
                let mut d = flight.remove(if i % 2 == 0 { 1 } else { 0 });
                s.open(now, &mut d).expect("opens under its key");
                opened += 1;
            }
        }
        for mut d in flight.drain(..) {
            s.open(now, &mut d).unwrap();
            opened += 1;
        }
        assert_eq!(opened, 5_000);
        // 50 ms at one change per 2 ms (twice the grace): 24 changes each way.
        assert!(c.rekeys >= 20, "{}", c.rekeys);
        assert_eq!(s.rekeys, c.rekeys);
        // After the grace period the previous key is gone: an old packet fails.
        let (mut c2, mut s2) = pair(limits);
        let old = seal(&mut c2, 0, b"old");
        for _ in 0..200 {
            let mut d = seal(&mut c2, 3_000, b"new");
            s2.open(3_000, &mut d).unwrap();
        }
        assert_eq!(c2.rekeys, 1);
        assert_eq!(s2.open(9_000, &mut old.clone()), Err(Reject::BadTag));
    }

    #[test]
    fn after_an_outage_of_several_key_periods_the_receiver_follows() {
        let limits = Limits {
            rekey_packets: u64::MAX,
            rekey_us: 1_000,
            grace_us: 100,
        };
        let (mut c, mut s) = pair(limits);
        s.open(0, &mut seal(&mut c, 0, b"before")).unwrap();
        // Five key periods with nothing delivered: the sender changed keys
        // five times (keep-alives), the receiver saw none of it.
        for t in 1..=5u64 {
            let _lost = seal(&mut c, t * 1_000, b"lost");
        }
        assert_eq!(c.rekeys, 5);
        let late = seal(&mut c, 5_050, b"after");
        s.open(5_100, &mut late.clone())
            .expect("five keys ahead opens");
        assert_eq!(s.rekeys, 5);
        // And the connection goes on: the next key change is followed too.
        s.open(6_000, &mut seal(&mut c, 6_000, b"next")).unwrap();
        assert_eq!((c.rekeys, s.rekeys), (6, 6));
        // Further ahead than a receiver follows: refused, nothing changes.
        let (mut c2, mut s2) = pair(limits);
        for t in 1..=u64::from(MAX_SKIP) + 1 {
            let _lost = seal(&mut c2, t * 1_000, b"lost");
        }
        let far = seal(&mut c2, 100_000, b"far");
        assert_eq!(s2.open(100_000, &mut far.clone()), Err(Reject::BadTag));
        assert_eq!(s2.rekeys, 0);
    }

    #[test]
    fn the_default_key_changes_after_two_to_the_23_packets() {
        // RFC 9001 §6.6: AES-GCM's confidentiality limit for a key is 2^23
        // full-size packets.
        let (mut c, mut s) = pair(Limits::default());
        // Past the time floor (twice the grace period), short of the age limit.
        let now = 2 * Limits::default().grace_us;
        c.tx.used = (1 << 23) - 1;
        s.open(now, &mut seal(&mut c, now, b"last")).unwrap();
        assert_eq!(c.rekeys, 0);
        s.open(now, &mut seal(&mut c, now, b"next key")).unwrap();
        assert_eq!((c.rekeys, s.rekeys), (1, 1));
    }

    #[test]
    fn a_forged_epoch_changes_nothing() {
        let (mut c, mut s) = pair(Limits::default());
        let good = seal(&mut c, 0, b"x");
        for e in [1u8, 2, 17, MAX_SKIP, EPOCH_MASK] {
            let mut f = seal(&mut c, 0, b"x");
            f[2] = SEAL_VERSION | e;
            assert_eq!(s.open(0, &mut f), Err(Reject::BadTag), "epoch {e}");
        }
        assert_eq!(s.rekeys, 0);
        s.open(0, &mut good.clone()).unwrap();
    }
    #[test]
    fn the_wire_counter_decodes_to_the_full_counter_across_2_to_the_40() {
        let (mut c, mut s) = pair(Limits::default());
        // The receiver follows the counter up in steps of less than 2^39, to
        // just short of a 2^40 boundary: the low 40 bits wrap on the wire.
        s.open(0, &mut seal(&mut c, 0, b"p")).unwrap();
        c.tx.counter = (1 << 39) + 100;
        s.open(0, &mut seal(&mut c, 0, b"p")).unwrap();
        c.tx.counter = (1 << 40) - 3;
        let pkts: Vec<Vec<u8>> = (0..6).map(|_| seal(&mut c, 0, b"p")).collect();
        // Newest first, then the older ones: each decodes to its own counter.
        for i in [5, 0, 4, 1, 3, 2] {
            s.open(0, &mut pkts[i].clone())
                .expect("opens under its counter");
        }
        assert_eq!(s.rx.window.top, (1 << 40) + 2);
        for d in &pkts {
            assert_eq!(s.open(0, &mut d.clone()), Err(Reject::Replay));
        }
        // A packet 2^40 counters after one already opened carries the same
        // low 40 bits: it decodes to the old counter and does not open (only
        // counters within 2^39 of the newest decode to themselves).
        c.tx.counter = (1 << 41) - 1;
        let far = seal(&mut c, 0, b"q");
        assert_eq!(far[3..8], pkts[2][3..8]);
        assert!(s.open(0, &mut far.clone()).is_err());
        // 2^39 - 1 ahead of the newest: opens.
        c.tx.counter = (1 << 40) + 2 + (1 << 39) - 1;
        s.open(0, &mut seal(&mut c, 0, b"r")).expect("within 2^39");
    }

    #[test]
    fn full_counter_takes_the_nearest() {
        const MAX: u64 = (1 << 40) - 1;
        assert_eq!(full_counter(0, 0), 0);
        assert_eq!(full_counter(0, 5), 5);
        assert_eq!(full_counter(0, MAX), MAX);
        assert_eq!(full_counter((1 << 40) + 10, 5), (1 << 40) + 5);
        assert_eq!(full_counter((1 << 40) + 10, MAX), (1 << 40) - 1);
        assert_eq!(full_counter((1 << 40) - 2, 3), (1 << 40) + 3);
        assert_eq!(full_counter(u64::MAX, 0), u64::MAX - MAX);
    }
}
