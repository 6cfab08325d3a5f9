//! The LND-shaped API: [`Kshim`] does on lu2k's side of the shared region what a
//! kernel LND module would do.
//!
//! # Life of a session
//!
//! [`Kshim::start`] creates the region (a memfd sealed against shrinking and growing)
//! and one pair of eventfds per core, and listens on the Unix socket named in the
//! [`Config`]. An engine connects; kshim sends it the region and the doorbells
//! ([`crate::attach`] documents the bytes) and waits for its ACK; from then on data
//! travels through the rings and the socket only carries peer notices. Sends may be
//! made before the engine attaches: they wait in the rings.
//!
//! # Sending
//!
//! [`Kshim::send`] copies the payload into the TX pool ([`Kshim::alloc_tx`] +
//! [`Kshim::write_tx`] + [`Kshim::send_buf`] is the variant where the caller fills a
//! pool buffer itself) and returns a [`Cookie`]. The route table picks the next hop
//! (the destination itself on a local network, else a gateway); [`ring_abi::shard`] of
//! the next hop picks the core whose TX ring gets the descriptor; credits
//! ([`crate::credit`]) decide whether it goes now or waits. Payload of up to two
//! extents travels inline in the descriptor; more extents go in an extent table kept in
//! a reserved area at the end of the TX pool (one table slot per credit).
//!
//! Every send ends with exactly one [`Event::TxDone`] carrying its cookie and a status.
//! The payload buffer and its table are reused only after that completion (or after
//! the engine is gone: then no one reads them any more).
//!
//! # Receiving
//!
//! Received messages come as [`Event::Rx`] with an [`RxMsg`]: the parsed LNet header,
//! the source NID and the payload as slices of the RX pool, read in place. The upper
//! layer may keep an `RxMsg` as long as it likes; [`Kshim::rx_done`] gives its buffers
//! back to the engine (through the RX return ring of the core it came from).
//! Descriptors are validated first ([`ring_abi::Region::validate_rx`]); a bad one is
//! counted in [`Stats::bad_rx`], its token given back, and nothing is delivered.
//!
//! # Liveness and the next engine
//!
//! When the engine's socket closes (it exited, crashed, or hung up) or it breaks the
//! ring protocol, kshim first takes every completion the engine did publish, then
//! fails every send still in flight or queued with [`TxStatus::EngineGone`] and reports
//! [`Event::EngineGone`]. This happens inside the next [`Kshim::poll`] or
//! [`Kshim::wait`], and `wait` sleeps on the socket as well as the doorbells, so it
//! takes no longer than the caller's own polling period.
//!
//! Then kshim listens again at the same socket path, with a **fresh region** (new
//! memfd, rings, doorbells and TX pool), and the next engine attaches to it like the
//! first; the upper layer keeps its `Kshim` and its state (routes, counters) and may
//! send again at once — sends wait in the new rings until an engine attaches. A fresh
//! region rather than the old one because the old one cannot be trusted or
//! reclaimed in place: a dead engine's RX buffers may still be held by the upper
//! layer ([`RxMsg`]s read in place), and a new engine would treat the whole RX pool
//! as its own; an engine that closed its socket but still runs could still write
//! the old rings. Nothing leaks: every message slot, credit and extent table is
//! freed when its send is failed back; the old TX pool goes with its region (a
//! [`TxBuf`] allocated in the old session is refused with
//! [`SendError::StaleBuffer`]); an `RxMsg` of the old session keeps the old
//! mapping alive until [`Kshim::rx_done`], which then gives nothing back to the new
//! engine. Peers the old engine reported down are marked up (the next engine
//! reports afresh). Memory: the regions are sparse; only pages written cost.
//!
//! [`TxStatus::EngineGone`] means: this message may or may not have reached the
//! peer (the engine may have sent it and died before its acknowledgement was
//! published), and nothing of it is left on this node. An LNet resends on it: see
//! [`crate::lnet`] for how every status maps to LNet's errno and health status,
//! and which ones LNet retries.
//!
//! # Waiting
//!
//! [`Kshim::wait`] arms the need-wakeup word of every core (the doorbell protocol of
//! [`ring_abi::protocol`]), re-checks every ring, and only then sleeps in `poll(2)` on
//! the to-kshim eventfds, the engine socket and the listener. No wakeup is lost.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::ring_abi::{
    self, doorbell::WAKE_EVENTFD, Eventfds, Extent, ExtentBuf, KshimCore, Pool, Region, RingError,
    RxDesc, RxReturn, TxCompletion, TxDesc, TxStatus, Waiter,
};
use rustix::event::{PollFd, PollFlags};

use crate::attach::{self, Hello, Notice};
use crate::credit::{Credits, Submit, DEFAULT_CREDITS, DEFAULT_PEER_CREDITS};
use crate::hdr;
use crate::nid::Nid;
use crate::pool::{self, TxBuf, TxPool};
use crate::route::{self, Route, Table};
use crate::MAX_PAYLOAD;

/// Everything [`Kshim::start`] needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's NIDs; their networks are the local networks.
    pub nids: Vec<Nid>,
    /// Where to listen for the engine (a Unix socket path; a stale socket is replaced).
    pub socket_path: PathBuf,
    /// Ring sets (engine cores), 1..=126.
    pub cores: u32,
    /// Cores each peer's messages are spread over, 1..=`cores` (socklnd's
    /// `conns_per_peer`): message by message, by [`ring_abi::stripe`] on its cookie.
    /// 1: a peer is one core ([`ring_abi::shard`]). More lets one peer use several
    /// engine cores (one UDT connection each); LNet needs no order between messages.
    pub conns_per_peer: u32,
    /// TX ring entries per core (power of two).
    pub tx_entries: u32,
    /// TX completion ring entries per core (power of two).
    pub tx_done_entries: u32,
    /// RX ring entries per core (power of two).
    pub rx_entries: u32,
    /// RX return ring entries per core (power of two).
    pub rx_return_entries: u32,
    /// Bytes of the TX pool for payload (the extent-table area is added to it).
    pub tx_pool_len: u64,
    /// TX pool chunk size; a message takes whole chunks. At least 4096 and at least
    /// 1 MiB / 256 so that a full message needs at most 256 extents.
    pub tx_chunk_size: u32,
    /// Size of one RX buffer (multiple of 64).
    pub rx_buf_size: u32,
    /// Number of RX buffers (the engine's receive pool).
    pub rx_buf_count: u32,
    /// RX indirect extent tables per core.
    pub rx_tables_per_core: u32,
    /// Messages in flight per peer (next hop); see [`crate::credit`] for the defaults.
    pub peer_credits: u32,
    /// Messages in flight in total.
    pub credits: u32,
    /// Most messages kshim holds at once (in flight plus queued for credits); a send
    /// beyond it fails with [`SendError::TooManyPending`] until completions arrive.
    pub max_pending: u32,
    /// How long an engine that connected has to ACK the HELLO.
    pub attach_timeout: Duration,
    /// LNet routes to remote networks.
    pub routes: Vec<Route>,
    /// Initial ring index (tests start near `u32::MAX` to cross the wrap).
    pub start_index: u32,
}

impl Config {
    /// Defaults for a node with `nids`, listening at `socket_path`: one core, 1024-entry
    /// rings, a 256 MiB TX pool in 64 KiB chunks (256 messages of 1 MiB), 1024 RX buffers
    /// of 64 KiB, credits sized for satellite paths ([`crate::credit`]).
    pub fn new(nids: Vec<Nid>, socket_path: impl Into<PathBuf>) -> Config {
        Config {
            nids,
            socket_path: socket_path.into(),
            cores: 1,
            conns_per_peer: 1,
            tx_entries: 1024,
            tx_done_entries: 1024,
            rx_entries: 1024,
            rx_return_entries: 1024,
            tx_pool_len: 256 << 20,
            tx_chunk_size: 64 << 10,
            rx_buf_size: 64 << 10,
            rx_buf_count: 1024,
            rx_tables_per_core: 64,
            peer_credits: DEFAULT_PEER_CREDITS,
            credits: DEFAULT_CREDITS,
            max_pending: 16384,
            attach_timeout: Duration::from_secs(10),
            routes: Vec::new(),
            start_index: 0,
        }
    }
}

/// Why [`Kshim::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A config field is out of range.
    #[error("config: {field}: {why}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong and what would be right.
        why: String,
    },
    /// A route was refused.
    #[error("config: routes: {0}")]
    Route(#[from] route::Error),
    /// The region could not be created.
    #[error("creating the region: {0}")]
    Region(#[from] ring_abi::RegionError),
    /// Eventfds could not be created.
    #[error("creating eventfds: {0}")]
    Eventfd(rustix::io::Errno),
    /// The socket could not be set up.
    #[error("listening at the socket path: {0}")]
    Listen(#[from] attach::Error),
}

/// Why a send was refused at once (nothing was queued; no completion will follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The engine is gone and no region for the next one could be made (kshim
    /// retries every second; [`Kshim::renew_error`] says why; see
    /// [`Event::EngineGone`]).
    #[error(
        "the engine is gone and kshim could not make a region or listen for the next one \
         yet (it retries every second; Kshim::renew_error says why: check the memory \
         limit for the region and the socket path's directory); send again later"
    )]
    EngineGone,
    /// The buffer came from [`Kshim::alloc_tx`] in an engine session that has ended
    /// since: its region is gone. Allocate a new buffer and fill it again.
    #[error("the TX buffer belongs to an engine session that ended; allocate a new one")]
    StaleBuffer,
    /// Payload above [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the LNet maximum of 1 MiB")]
    TooLarge(usize),
    /// The header's payload_length is not the payload's length.
    #[error("header says payload_length {hdr} but the payload is {payload} bytes")]
    LengthMismatch {
        /// From the header.
        hdr: u32,
        /// Actual.
        payload: usize,
    },
    /// No next hop for the destination.
    #[error("{0}")]
    Route(#[from] route::Error),
    /// The TX pool is full now; retry after completions.
    #[error("{0}")]
    Pool(#[from] pool::Error),
    /// `max_pending` messages are held already; retry after completions.
    #[error("{max} messages pending already; wait for completions")]
    TooManyPending {
        /// The limit.
        max: u32,
    },
}

/// Why the session with the engine ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GoneReason {
    /// The engine closed the socket or exited.
    SocketClosed,
    /// The engine did not ACK within the attach timeout.
    AckTimeout,
    /// The engine refused the region with this status.
    Refused(u32),
    /// The engine sent something the protocol does not allow.
    Protocol(&'static str),
    /// The engine wrote an impossible ring index.
    RingCorrupt,
    /// A socket or doorbell syscall failed.
    Io(String),
}

/// Something for the upper layer.
// `Rx` is the event of the data path and the largest; boxing it would allocate once per
// received message to save bytes on the rare events.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    /// A send ended, exactly once per cookie.
    TxDone {
        /// The send's cookie.
        cookie: Cookie,
        /// How it ended.
        status: TxStatus,
        /// Detail from the engine ([`ring_abi::DescError::code`] for an invalid
        /// descriptor; the raw value when the engine wrote an unknown status, which is
        /// reported as `Aborted`).
        detail: u32,
    },
    /// A message arrived; give it back with [`Kshim::rx_done`].
    Rx(RxMsg),
    /// The engine reported a peer down (it stopped answering). Routes through it are
    /// not used until it is up again.
    PeerDown(Nid),
    /// A peer that was down answers again (engine notice, a message from it, or a send
    /// to it completed Ok).
    PeerUp(Nid),
    /// An engine attached (ACKed the region).
    EngineAttached,
    /// The engine is gone; every pending send has been failed back before this event
    /// (with [`TxStatus::EngineGone`]). kshim listens for the next engine at once,
    /// with a fresh region; sends made from now on wait for it.
    EngineGone(GoneReason),
}

/// A send's handle: slot index in the low 32 bits, generation in the high 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

impl Cookie {
    fn new(slot: u32, gen: u32) -> Cookie {
        Cookie((u64::from(gen) << 32) | u64::from(slot))
    }
    fn slot(self) -> u32 {
        self.0 as u32
    }
    fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// A received message. Its payload stays in the engine's RX pool until
/// [`Kshim::rx_done`]; dropping it without that leaks the buffers until the session ends.
#[derive(Debug)]
#[must_use = "give received messages back with Kshim::rx_done"]
pub struct RxMsg {
    region: Region,
    /// The session it arrived in; a message of an ended session holds its region's
    /// mapping and is not given back to a later engine.
    session: u32,
    token: u64,
    core: u32,
    /// The NID the engine received it from (the previous hop).
    pub from: Nid,
    /// The LNet header.
    pub hdr: hdr::Repr,
    /// The 72 header bytes as received.
    pub hdr_bytes: [u8; hdr::HEADER_LEN],
    len: u32,
    extents: Vec<Extent>,
}

impl RxMsg {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when there is no payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload's extents in the RX pool.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The payload, in place, one slice per extent.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        // Validated against the layout when the descriptor arrived.
        self.extents
            .iter()
            .filter_map(|e| self.region.pool_bytes(e).ok())
    }

    /// Copies the payload into `out` (at most `out.len()` bytes); returns bytes copied.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for s in self.slices() {
            let n = s.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&s[..n]);
            at += n;
            if at == out.len() {
                break;
            }
        }
        at
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sends accepted.
    pub sends: u64,
    /// Payload bytes accepted.
    pub send_bytes: u64,
    /// Completions delivered with status Ok.
    pub tx_ok: u64,
    /// Completions delivered with another status (including EngineGone).
    pub tx_failed: u64,
    /// Completions from the engine that named no pending send (ignored).
    pub bogus_completions: u64,
    /// Messages delivered upward.
    pub rx: u64,
    /// Payload bytes delivered upward.
    pub rx_bytes: u64,
    /// RX descriptors refused (invalid extents or LNet header); token given back.
    pub bad_rx: u64,
    /// Messages given back to the engine (those of an ended session are only
    /// dropped, and not counted).
    pub rx_returned: u64,
    /// Times a TX descriptor waited for ring space.
    pub tx_ring_full: u64,
    /// Doorbells rung toward the engine.
    pub doorbells: u64,
    /// Engines that attached (ACKed a region).
    pub attaches: u64,
    /// Sessions that ended ([`Event::EngineGone`]).
    pub engines_gone: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    Queued,
    Backlog,
    InFlight,
}

#[derive(Debug)]
struct Msg {
    gen: u32,
    st: St,
    peer: Nid,
    hdr: [u8; hdr::HEADER_LEN],
    buf: Option<TxBuf>,
    table: u32,
}

const NO_TABLE: u32 = u32::MAX;

#[derive(Debug)]
struct Core {
    rings: KshimCore,
    /// Slots holding credits, waiting for TX ring space.
    backlog: VecDeque<u32>,
    /// Tokens waiting for RX return ring space.
    returns: VecDeque<u64>,
    /// Something was committed toward the engine since the last notify.
    dirty: bool,
}

#[derive(Debug)]
enum Link {
    Listening,
    AwaitAck { sock: OwnedFd, deadline: Instant },
    Attached { sock: OwnedFd },
    Gone,
}

/// The kernel half of the LND; see the module doc.
#[derive(Debug)]
pub struct Kshim {
    cfg: Config,
    /// The region every session is created with.
    abi: ring_abi::Config,
    /// Engine sessions begun so far, less one: the epoch of the region, the TX pool
    /// and every [`RxMsg`] handed up in this session.
    session: u32,
    /// When the last session ended and no new region could be made: try again then.
    renew_at: Option<Instant>,
    /// Why the last try at a region for the next engine failed.
    renew_error: Option<String>,
    region: Region,
    cores: Vec<Core>,
    /// Dups of each core's to-engine and to-kshim eventfds, for the HELLO and for poll.
    to_engine_fds: Vec<OwnedFd>,
    to_kshim_fds: Vec<OwnedFd>,
    listener: Option<OwnedFd>,
    /// The socket file this kshim bound (device, inode): the only one it removes,
    /// since another kshim may have bound the path since.
    bound: Option<(u64, u64)>,
    link: Link,
    /// Look at the socket on the next progress (set after a sleep).
    link_due: bool,
    /// Look at the socket no later than this.
    link_next: Instant,
    routes: Table,
    credits: Credits<u32>,
    pool: TxPool,
    table_base: u64,
    table_bytes: u64,
    free_tables: Vec<u32>,
    msgs: Vec<Msg>,
    free_msgs: Vec<u32>,
    pending: u32,
    events: VecDeque<Event>,
    down: HashSet<Nid>,
    scratch: ExtentBuf,
    spare_extents: Vec<Vec<Extent>>,
    stats: Stats,
}

fn cfg_err(field: &'static str, why: impl Into<String>) -> StartError {
    StartError::Config {
        field,
        why: why.into(),
    }
}

/// A fresh region with one pair of eventfds per core: what one engine session uses.
#[allow(clippy::type_complexity)]
fn new_region(
    cfg: &Config,
    abi: &ring_abi::Config,
) -> Result<(Region, Vec<Core>, Vec<OwnedFd>, Vec<OwnedFd>), StartError> {
    let region = Region::create_striped(abi, cfg.conns_per_peer)?;
    let mut cores = Vec::with_capacity(cfg.cores as usize);
    let mut to_engine_fds = Vec::new();
    let mut to_kshim_fds = Vec::new();
    for c in 0..cfg.cores {
        let fds = Eventfds::new().map_err(StartError::Eventfd)?;
        let dup = |f: &Option<OwnedFd>| {
            f.as_ref().map(|f| f.try_clone()).transpose().map_err(|e| {
                StartError::Eventfd(
                    rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
                )
            })
        };
        let te = dup(&fds.to_engine)?.ok_or_else(|| cfg_err("cores", "no eventfd"))?;
        let tk = dup(&fds.to_kshim)?.ok_or_else(|| cfg_err("cores", "no eventfd"))?;
        to_engine_fds.push(te);
        to_kshim_fds.push(tk);
        let rings = region.kshim_core(c, fds)?;
        cores.push(Core {
            rings,
            backlog: VecDeque::with_capacity(cfg.tx_entries as usize),
            returns: VecDeque::with_capacity(cfg.rx_return_entries as usize),
            dirty: false,
        });
    }
    Ok((region, cores, to_engine_fds, to_kshim_fds))
}

impl Kshim {
    /// Creates the region and the doorbells and listens for the engine.
    pub fn start(cfg: Config) -> Result<Kshim, StartError> {
        if cfg.nids.is_empty() {
            return Err(cfg_err(
                "nids",
                "give at least one local NID, like 10.0.0.1@lu2k",
            ));
        }
        if cfg.nids.len() > attach::MAX_NIDS {
            return Err(cfg_err(
                "nids",
                format!("at most {} local NIDs", attach::MAX_NIDS),
            ));
        }
        if cfg.cores == 0 || cfg.cores > attach::MAX_CORES {
            return Err(cfg_err(
                "cores",
                format!("must be 1..={}", attach::MAX_CORES),
            ));
        }
        if cfg.conns_per_peer == 0 || cfg.conns_per_peer > cfg.cores {
            return Err(cfg_err(
                "conns_per_peer",
                format!(
                    "{} with {} core(s): must be 1..=cores (one connection per core; \
                     set conns_per_peer = cores to spread each peer over every core)",
                    cfg.conns_per_peer, cfg.cores
                ),
            ));
        }
        let min_chunk = (MAX_PAYLOAD / ring_abi::layout::MAX_TX_EXTENTS as usize).max(4096);
        if (cfg.tx_chunk_size as usize) < min_chunk || cfg.tx_chunk_size % 64 != 0 {
            return Err(cfg_err(
                "tx_chunk_size",
                format!("must be a multiple of 64 and at least {min_chunk}"),
            ));
        }
        if cfg.tx_pool_len < u64::from(cfg.tx_chunk_size) {
            return Err(cfg_err("tx_pool_len", "must hold at least one chunk"));
        }
        if cfg.credits == 0 || cfg.peer_credits == 0 {
            return Err(cfg_err(
                "credits",
                "credits and peer_credits must be at least 1",
            ));
        }
        if cfg.max_pending == 0 {
            return Err(cfg_err("max_pending", "must be at least 1"));
        }
        let mut routes = Table::new(cfg.nids.iter().map(|n| n.net()));
        for r in &cfg.routes {
            routes.add(*r)?;
        }
        // Extent tables: one per credit (in-flight messages hold credits), each with
        // room for a whole message's chunks.
        let max_ext = MAX_PAYLOAD.div_ceil(cfg.tx_chunk_size as usize) as u64;
        let table_bytes = (max_ext * 16).next_multiple_of(64);
        let table_base = cfg.tx_pool_len.next_multiple_of(64);
        let tables_len = table_bytes * u64::from(cfg.credits);
        let abi = ring_abi::Config {
            cores: cfg.cores,
            tx_entries: cfg.tx_entries,
            tx_done_entries: cfg.tx_done_entries,
            rx_entries: cfg.rx_entries,
            rx_return_entries: cfg.rx_return_entries,
            tx_pool_len: table_base + tables_len,
            rx_buf_size: cfg.rx_buf_size,
            rx_buf_count: cfg.rx_buf_count,
            rx_tables_per_core: cfg.rx_tables_per_core,
            features: ring_abi::Features::all(),
            start_index: cfg.start_index,
        };
        let (region, cores, to_engine_fds, to_kshim_fds) = new_region(&cfg, &abi)?;
        let listener = attach::listen(&cfg.socket_path)?;
        let pool = TxPool::with_epoch(cfg.tx_pool_len as usize, cfg.tx_chunk_size, 0);
        let n = cfg.max_pending;
        let msgs = (0..n)
            .map(|_| Msg {
                gen: 0,
                st: St::Free,
                peer: Nid::default(),
                hdr: [0; hdr::HEADER_LEN],
                buf: None,
                table: NO_TABLE,
            })
            .collect();
        Ok(Kshim {
            abi,
            session: 0,
            renew_at: None,
            renew_error: None,
            credits: Credits::new(cfg.peer_credits, cfg.credits),
            free_tables: (0..cfg.credits).rev().collect(),
            free_msgs: (0..n).rev().collect(),
            msgs,
            pending: 0,
            pool,
            table_base,
            table_bytes,
            region,
            cores,
            to_engine_fds,
            to_kshim_fds,
            listener: Some(listener),
            bound: socket_id(&cfg.socket_path),
            link: Link::Listening,
            link_due: true,
            link_next: Instant::now(),
            routes,
            events: VecDeque::with_capacity(n as usize + 64),
            down: HashSet::new(),
            scratch: ExtentBuf::new(),
            spare_extents: Vec::new(),
            stats: Stats::default(),
            cfg,
        })
    }

    /// The config this instance runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The region (for inspection; the engine maps its own copy from the memfd).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether an engine has ACKed and is still there.
    pub fn is_attached(&self) -> bool {
        matches!(self.link, Link::Attached { .. })
    }

    /// Whether the last engine is gone and no region for the next one could be
    /// made yet (sends fail with [`SendError::EngineGone`] meanwhile). After an
    /// engine goes, kshim normally listens again at once and this stays false.
    pub fn is_gone(&self) -> bool {
        matches!(self.link, Link::Gone)
    }

    /// Why the region or the listener for the next engine could not be made, while
    /// [`Kshim::is_gone`]; `None` otherwise.
    pub fn renew_error(&self) -> Option<&str> {
        self.renew_error.as_deref()
    }

    /// Engine sessions ended so far (0 while the first engine has not gone).
    pub fn session(&self) -> u32 {
        self.session
    }

    /// Sends in flight or queued (not yet completed).
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Free TX pool chunks now, and the chunk size.
    pub fn tx_pool_free(&self) -> (u32, u32) {
        (self.pool.free_chunks(), self.pool.chunk_size())
    }

    /// The route table (add or remove routes at run time).
    pub fn routes_mut(&mut self) -> &mut Table {
        &mut self.routes
    }

    /// Allocates a TX pool buffer of `len` bytes for [`Kshim::write_tx`] and
    /// [`Kshim::send_buf`]; give it back with [`Kshim::free_tx`] if it is not sent.
    pub fn alloc_tx(&mut self, len: usize) -> Result<TxBuf, SendError> {
        if self.is_gone() {
            return Err(SendError::EngineGone);
        }
        if len > MAX_PAYLOAD {
            return Err(SendError::TooLarge(len));
        }
        Ok(self.pool.alloc(len)?)
    }

    /// Writes `data` at byte `offset` of a buffer from [`Kshim::alloc_tx`].
    ///
    /// # Panics
    /// If `offset + data.len()` exceeds the buffer.
    /// A buffer of an ended session is not written (its region is gone; sending it
    /// fails with [`SendError::StaleBuffer`]).
    pub fn write_tx(&self, buf: &TxBuf, offset: usize, mut data: &[u8]) {
        assert!(
            offset + data.len() <= buf.len(),
            "write beyond the TX buffer"
        );
        if !self.pool.owns(buf) {
            return;
        }
        let mut skip = offset as u64;
        for (off, len) in self.pool.extents(buf) {
            if data.is_empty() {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(data.len());
            // In bounds: the pool's chunks lie inside the TX pool.
            let _ = self.region.write_pool(Pool::Tx, off + skip, &data[..n]);
            data = &data[n..];
            skip = 0;
        }
    }

    /// Returns an unsent buffer.
    pub fn free_tx(&mut self, buf: TxBuf) {
        self.pool.free(buf);
    }

    /// Sends `payload` (copied into the TX pool) with header `hdr` toward `hdr.dest_nid`.
    pub fn send(&mut self, hdr: &hdr::Repr, payload: &[u8]) -> Result<Cookie, SendError> {
        self.send_to(Nid::from_nid4(hdr.dest_nid), hdr, payload)
    }

    /// Sends `payload` with header `hdr` toward `dest`, which may be an IPv6 NID: LNet's
    /// 72-byte header holds 64-bit NIDs only, so for a large NID the destination travels
    /// beside the header, as LNet hands an LND its message's target NID.
    pub fn send_to(
        &mut self,
        dest: Nid,
        hdr: &hdr::Repr,
        payload: &[u8],
    ) -> Result<Cookie, SendError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge(payload.len()));
        }
        self.check_send(hdr, payload.len())?;
        let buf = self.alloc_tx(payload.len())?;
        self.write_tx(&buf, 0, payload);
        self.send_buf_to(dest, hdr, buf)
    }

    fn check_send(&self, hdr: &hdr::Repr, len: usize) -> Result<(), SendError> {
        if self.is_gone() {
            return Err(SendError::EngineGone);
        }
        if hdr.payload_length as usize != len {
            return Err(SendError::LengthMismatch {
                hdr: hdr.payload_length,
                payload: len,
            });
        }
        if self.free_msgs.is_empty() {
            return Err(SendError::TooManyPending {
                max: self.cfg.max_pending,
            });
        }
        Ok(())
    }

    /// Sends a buffer the caller filled. On error the buffer goes back to the pool.
    pub fn send_buf(&mut self, hdr: &hdr::Repr, buf: TxBuf) -> Result<Cookie, SendError> {
        self.send_buf_to(Nid::from_nid4(hdr.dest_nid), hdr, buf)
    }

    /// [`Kshim::send_buf`] toward `dest` (see [`Kshim::send_to`]).
    pub fn send_buf_to(
        &mut self,
        dest: Nid,
        hdr: &hdr::Repr,
        buf: TxBuf,
    ) -> Result<Cookie, SendError> {
        if !self.pool.owns(&buf) {
            return Err(SendError::StaleBuffer);
        }
        let checked = self
            .check_send(hdr, buf.len())
            .and_then(|()| Ok(self.routes.next_hop(dest)?));
        let peer = match checked {
            Ok(p) => p,
            Err(e) => {
                self.pool.free(buf);
                return Err(e);
            }
        };
        let Some(slot) = self.free_msgs.pop() else {
            self.pool.free(buf);
            return Err(SendError::TooManyPending {
                max: self.cfg.max_pending,
            });
        };
        let m = &mut self.msgs[slot as usize];
        m.st = St::Queued;
        m.peer = peer;
        m.hdr = hdr.to_bytes();
        self.stats.sends += 1;
        self.stats.send_bytes += buf.len() as u64;
        m.buf = Some(buf);
        let cookie = Cookie::new(slot, m.gen);
        self.pending += 1;
        if let Submit::Go(slot) = self.credits.submit(peer, slot) {
            self.dispatch(slot);
        }
        self.flush();
        Ok(cookie)
    }

    /// Gives a received message's buffers back to the engine.
    pub fn rx_done(&mut self, msg: RxMsg) {
        let mut ext = msg.extents;
        ext.clear();
        self.spare_extents.push(ext);
        if self.is_gone() || msg.session != self.session {
            // Its region went with its engine; dropping `msg.region` here unmaps it
            // once the last message of that session is back.
            return;
        }
        if let Some(core) = self.cores.get_mut(msg.core as usize) {
            core.returns.push_back(msg.token);
            self.stats.rx_returned += 1;
        }
        self.flush();
    }

    /// Makes progress without blocking and returns the next event, if any.
    pub fn poll(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        self.progress();
        self.events.pop_front()
    }

    /// Returns the next event, sleeping up to `timeout` (`None`: without limit) for one.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<Event> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = self.poll() {
                return Some(e);
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d <= now => return None,
                Some(d) => Some(d - now),
                None => None,
            };
            self.sleep(left);
        }
    }

    fn sleep(&mut self, mut left: Option<Duration>) {
        if let Link::AwaitAck { deadline, .. } = &self.link {
            let until = deadline.saturating_duration_since(Instant::now());
            left = Some(left.map_or(until, |l| l.min(until)));
        }
        // Descriptors or returns waiting for ring space: the engine frees space without
        // ringing kshim, so look again soon.
        if self
            .cores
            .iter()
            .any(|c| !c.backlog.is_empty() || !c.returns.is_empty())
        {
            let soon = Duration::from_millis(1);
            left = Some(left.map_or(soon, |l| l.min(soon)));
        }
        if matches!(self.link, Link::Gone) {
            // No engine and no listener: nothing arrives until the next try at a
            // region (returns of the ended session are no-ops), so sleep until then.
            let retry = self.renew_at.map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(Instant::now())
            });
            std::thread::sleep(left.map_or(retry, |l| l.min(retry)));
            return;
        }
        let Kshim {
            cores,
            to_kshim_fds,
            listener,
            link,
            link_due,
            ..
        } = self;
        let mut waiters: Vec<&Waiter> = Vec::with_capacity(cores.len());
        let mut rings = Vec::with_capacity(cores.len());
        for c in cores.iter_mut() {
            let KshimCore {
                tx_done, rx, wait, ..
            } = &mut c.rings;
            waiters.push(wait);
            rings.push((tx_done, rx));
        }
        let sock = match &*link {
            Link::AwaitAck { sock, .. } | Link::Attached { sock } => Some(sock.as_fd()),
            _ => None,
        };
        let listen = match &*link {
            Link::Listening => listener.as_ref().map(|l| l.as_fd()),
            _ => None,
        };
        let mut sleep = || {
            // All cores armed: re-check every ring, then sleep on every fd.
            for (tx_done, rx) in rings.iter_mut() {
                if !tx_done.is_empty().unwrap_or(false) || !rx.is_empty().unwrap_or(false) {
                    return;
                }
            }
            let mut fds: Vec<PollFd<'_>> = to_kshim_fds
                .iter()
                .map(|f| PollFd::new(f, PollFlags::IN))
                .collect();
            if let Some(s) = sock {
                fds.push(PollFd::from_borrowed_fd(s, PollFlags::IN));
            }
            if let Some(l) = listen {
                fds.push(PollFd::from_borrowed_fd(l, PollFlags::IN));
            }
            let ts = left.map(|d| rustix::time::Timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            let _ = rustix::event::poll(&mut fds, ts.as_ref());
        };
        // The doorbell protocol (ring_abi::protocol) over all cores at once: arm every
        // core's need-wakeup word (each with its full fence), re-check every ring, and
        // only then sleep on every eventfd; disarm all on the way out.
        for w in &waiters {
            w.arm(WAKE_EVENTFD);
        }
        sleep();
        *link_due = true;
        for w in &waiters {
            w.disarm();
            let _ = w.drain();
        }
    }

    fn progress(&mut self) {
        // The socket is looked at after every sleep and otherwise at most every
        // millisecond, so busy polling costs no syscall per call.
        let now = Instant::now();
        if self.link_due || now >= self.link_next {
            self.link_due = false;
            self.link_next = now + Duration::from_millis(1);
            self.drive_link();
        }
        if matches!(self.link, Link::Gone) {
            if self.renew_at.is_some_and(|t| now >= t) {
                self.renew();
            }
            return;
        }
        if let Err(RingError::Corrupt { .. }) = self.reap() {
            self.gone(GoneReason::RingCorrupt);
            return;
        }
        while let Some((_, slot)) = self.credits.poll_ready() {
            self.dispatch(slot);
        }
        self.flush();
    }

    fn drive_link(&mut self) {
        loop {
            match &self.link {
                Link::Listening => {
                    let Some(l) = &self.listener else { return };
                    match attach::accept(l.as_fd()) {
                        Ok(Some(sock)) => {
                            let hello = Hello {
                                cores: self.cfg.cores,
                                region_size: self.region.len() as u64,
                                nids: self.cfg.nids.clone(),
                            };
                            let te: Vec<_> = self.to_engine_fds.iter().map(|f| f.as_fd()).collect();
                            let tk: Vec<_> = self.to_kshim_fds.iter().map(|f| f.as_fd()).collect();
                            match attach::send_hello(
                                sock.as_fd(),
                                &hello,
                                self.region.fd(),
                                &te,
                                &tk,
                            ) {
                                Ok(()) => {
                                    // The region is handed over: this engine is the session.
                                    self.listener = None;
                                    self.unlink_own();
                                    self.link = Link::AwaitAck {
                                        sock,
                                        deadline: Instant::now() + self.cfg.attach_timeout,
                                    };
                                }
                                // It went away before taking the region: keep listening.
                                Err(_) => continue,
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            self.gone(GoneReason::Io(e.to_string()));
                            return;
                        }
                    }
                }
                Link::AwaitAck { sock, deadline } => {
                    let deadline = *deadline;
                    match attach::recv_small(sock.as_fd()) {
                        Ok(Some((b, n))) => match attach::decode_ack(&b[..n]) {
                            Ok(()) => {
                                let Link::AwaitAck { sock, .. } =
                                    std::mem::replace(&mut self.link, Link::Gone)
                                else {
                                    return;
                                };
                                self.link = Link::Attached { sock };
                                self.stats.attaches += 1;
                                self.events.push_back(Event::EngineAttached);
                            }
                            Err(attach::Error::Refused(s)) => {
                                self.gone(GoneReason::Refused(s));
                                return;
                            }
                            Err(attach::Error::Protocol(p)) => {
                                self.gone(GoneReason::Protocol(p));
                                return;
                            }
                            Err(e) => {
                                self.gone(GoneReason::Io(e.to_string()));
                                return;
                            }
                        },
                        Ok(None) => {
                            if Instant::now() >= deadline {
                                self.gone(GoneReason::AckTimeout);
                            }
                            return;
                        }
                        Err(e) => {
                            self.gone(link_err(e));
                            return;
                        }
                    }
                }
                Link::Attached { sock } => match attach::recv_small(sock.as_fd()) {
                    Ok(Some((b, n))) => match Notice::decode(&b[..n]) {
                        Ok(Notice::PeerDown(nid)) => self.peer_down(nid),
                        Ok(Notice::PeerUp(nid)) => self.peer_up(nid),
                        Err(attach::Error::Protocol(p)) => {
                            self.gone(GoneReason::Protocol(p));
                            return;
                        }
                        Err(e) => {
                            self.gone(GoneReason::Io(e.to_string()));
                            return;
                        }
                    },
                    Ok(None) => return,
                    Err(e) => {
                        self.gone(link_err(e));
                        return;
                    }
                },
                Link::Gone => return,
            }
        }
    }

    fn peer_down(&mut self, nid: Nid) {
        if self.down.insert(nid) {
            self.routes.set_gateway_up(nid, false);
            self.events.push_back(Event::PeerDown(nid));
        }
    }

    fn peer_up(&mut self, nid: Nid) {
        if self.down.remove(&nid) {
            self.routes.set_gateway_up(nid, true);
            self.events.push_back(Event::PeerUp(nid));
        }
    }

    /// Takes completions and received messages from every core.
    fn reap(&mut self) -> Result<(), RingError> {
        let mut done = [TxCompletion::default(); 64];
        for c in 0..self.cores.len() {
            loop {
                let n = self.cores[c].rings.tx_done.pop_slice(&mut done)?;
                for d in &done[..n] {
                    self.complete(*d);
                }
                if n < done.len() {
                    break;
                }
            }
            while let Some(d) = self.cores[c].rings.rx.pop()? {
                self.receive(c as u32, d);
            }
        }
        Ok(())
    }

    fn complete(&mut self, d: TxCompletion) {
        let cookie = Cookie(d.cookie);
        let ok = self
            .msgs
            .get(cookie.slot() as usize)
            .is_some_and(|m| m.gen == cookie.gen() && m.st == St::InFlight);
        if !ok {
            self.stats.bogus_completions += 1;
            return;
        }
        let (status, detail) = match d.status() {
            Ok(s) => (s, d.detail),
            Err(_) => (TxStatus::Aborted, d.status),
        };
        let peer = self.msgs[cookie.slot() as usize].peer;
        self.credits.complete(peer);
        if status == TxStatus::Ok {
            self.peer_up(peer);
        }
        self.finish(cookie.slot(), status, detail);
    }

    fn finish(&mut self, slot: u32, status: TxStatus, detail: u32) {
        let m = &mut self.msgs[slot as usize];
        let cookie = Cookie::new(slot, m.gen);
        if let Some(b) = m.buf.take() {
            self.pool.free(b);
        }
        if m.table != NO_TABLE {
            self.free_tables.push(m.table);
            m.table = NO_TABLE;
        }
        m.st = St::Free;
        m.gen = m.gen.wrapping_add(1);
        self.free_msgs.push(slot);
        self.pending -= 1;
        if status == TxStatus::Ok {
            self.stats.tx_ok += 1;
        } else {
            self.stats.tx_failed += 1;
        }
        self.events.push_back(Event::TxDone {
            cookie,
            status,
            detail,
        });
    }

    fn receive(&mut self, core: u32, d: RxDesc) {
        let parsed = match self.region.validate_rx(&d, &mut self.scratch) {
            Ok(v) => hdr::Repr::from_bytes(&v.hdr)
                .ok()
                .map(|h| (h, v.total_len, v.extents)),
            Err(_) => None,
        };
        let Some((h, len, extents)) = parsed else {
            self.stats.bad_rx += 1;
            self.cores[core as usize].returns.push_back(d.token);
            return;
        };
        let mut ext = self.spare_extents.pop().unwrap_or_default();
        ext.extend_from_slice(extents);
        let from = d.src_nid;
        self.stats.rx += 1;
        self.stats.rx_bytes += u64::from(len);
        self.peer_up(from);
        self.events.push_back(Event::Rx(RxMsg {
            region: self.region.clone(),
            session: self.session,
            token: d.token,
            core,
            from,
            hdr: h,
            hdr_bytes: d.hdr,
            len,
            extents: ext,
        }));
    }

    /// Queues a slot that holds its credits on the core that carries it: the peer's
    /// core, or with `conns_per_peer` > 1 one of its cores by the cookie's hash
    /// ([`ring_abi::stripe`]; the kernel module distributes the same way).
    fn dispatch(&mut self, slot: u32) {
        let m = &self.msgs[slot as usize];
        let cookie = Cookie::new(slot, m.gen).0;
        let home = ring_abi::shard(m.peer, self.cfg.cores);
        let core = ring_abi::stripe(home, self.cfg.cores, self.cfg.conns_per_peer, cookie) as usize;
        self.msgs[slot as usize].st = St::Backlog;
        self.cores[core].backlog.push_back(slot);
    }

    fn build_desc(&mut self, slot: u32) -> TxDesc {
        let cookie = Cookie::new(slot, self.msgs[slot as usize].gen).0;
        let m = &self.msgs[slot as usize];
        let mut inline = [Extent::default(); 2];
        let mut n = 0usize;
        let mut total = 0u32;
        if let Some(b) = &m.buf {
            for (off, len) in self.pool.extents(b) {
                if n < 2 {
                    inline[n] = Extent::new(Pool::Tx, off, len);
                }
                n += 1;
                total += len;
            }
        }
        if n <= 2 {
            return TxDesc::inline(cookie, m.peer, m.hdr, &inline[..n]);
        }
        // Indirect: write the table into this message's table slot. A slot holding
        // credits always finds a table (one table per credit).
        let table = self.free_tables.pop().expect("one table per credit");
        let base = self.table_base + u64::from(table) * self.table_bytes;
        let m = &mut self.msgs[slot as usize];
        m.table = table;
        let mut ext = [Extent::default(); 256];
        let mut k = 0;
        if let Some(b) = &m.buf {
            for (off, len) in self.pool.extents(b) {
                ext[k] = Extent::new(Pool::Tx, off, len);
                k += 1;
            }
        }
        let _ = self.region.write_extents(Pool::Tx, base, &ext[..k]);
        TxDesc::indirect(cookie, m.peer, m.hdr, base, k as u16, total)
    }

    /// Pushes backlogged descriptors and returns into the rings, then rings doorbells.
    fn flush(&mut self) {
        if matches!(self.link, Link::Gone) {
            return;
        }
        let mut corrupt = false;
        for c in 0..self.cores.len() {
            // One reservation and one index store for the whole backlog that fits.
            let want = self.cores[c].backlog.len().min(u32::MAX as usize) as u32;
            if want > 0 {
                match self.cores[c].rings.tx.reserve(want) {
                    Ok(got) => {
                        for i in 0..got {
                            let Some(slot) = self.cores[c].backlog.pop_front() else {
                                break;
                            };
                            let desc = self.build_desc(slot);
                            self.cores[c].rings.tx.write(i, desc);
                            self.msgs[slot as usize].st = St::InFlight;
                        }
                        if got > 0 {
                            self.cores[c].rings.tx.commit(got);
                            self.cores[c].dirty = true;
                        }
                        if got < want {
                            self.stats.tx_ring_full += 1;
                        }
                    }
                    Err(_) => corrupt = true,
                }
            }
            let core = &mut self.cores[c];
            while let Some(&tok) = core.returns.front() {
                match core.rings.rx_return.push(RxReturn { token: tok }) {
                    Ok(true) => {
                        core.returns.pop_front();
                        core.dirty = true;
                    }
                    Ok(false) => break,
                    Err(_) => {
                        corrupt = true;
                        break;
                    }
                }
            }
            if core.dirty {
                core.dirty = false;
                if let Ok(true) = core.rings.to_engine.notify() {
                    self.stats.doorbells += 1;
                }
            }
        }
        if corrupt {
            self.gone(GoneReason::RingCorrupt);
        }
    }

    /// Ends the session: takes what the engine published, fails everything else,
    /// then listens for the next engine with a fresh region ([`Kshim::renew`]).
    fn gone(&mut self, reason: GoneReason) {
        if matches!(self.link, Link::Gone) {
            return;
        }
        // Completions the engine did write still count.
        if reason != GoneReason::RingCorrupt {
            let _ = self.reap();
        }
        self.link = Link::Gone;
        self.listener = None;
        self.unlink_own();
        let queued: Vec<u32> = self.credits.drain_queued().map(|(_, s)| s).collect();
        for slot in queued {
            self.finish(slot, TxStatus::EngineGone, 0);
        }
        for c in 0..self.cores.len() {
            self.cores[c].backlog.clear();
            self.cores[c].returns.clear();
        }
        for slot in 0..self.msgs.len() as u32 {
            if self.msgs[slot as usize].st != St::Free {
                self.finish(slot, TxStatus::EngineGone, 0);
            }
        }
        self.credits.reset();
        self.stats.engines_gone += 1;
        self.events.push_back(Event::EngineGone(reason));
        self.renew();
    }

    /// Begins the next session: a fresh region, doorbells and TX pool, and the
    /// listener. Called once every send of the ended session has its completion, so
    /// nothing of the old region is referenced any more except by received messages
    /// the upper layer still holds (each keeps the old mapping alive until
    /// [`Kshim::rx_done`]). If the region cannot be made, kshim stays gone and
    /// tries again a second later.
    fn renew(&mut self) {
        let made = new_region(&self.cfg, &self.abi).and_then(|parts| {
            let listener = attach::listen(&self.cfg.socket_path)?;
            Ok((parts, listener))
        });
        let ((region, cores, te, tk), listener) = match made {
            Ok(x) => x,
            Err(e) => {
                self.renew_error = Some(e.to_string());
                self.renew_at = Some(Instant::now() + Duration::from_secs(1));
                return;
            }
        };
        self.renew_at = None;
        self.renew_error = None;
        self.session = self.session.wrapping_add(1);
        self.region = region;
        self.cores = cores;
        self.to_engine_fds = te;
        self.to_kshim_fds = tk;
        self.pool = TxPool::with_epoch(
            self.cfg.tx_pool_len as usize,
            self.cfg.tx_chunk_size,
            self.session,
        );
        self.free_tables = (0..self.cfg.credits).rev().collect();
        self.listener = Some(listener);
        self.bound = socket_id(&self.cfg.socket_path);
        self.link = Link::Listening;
        self.link_due = true;
        // Peers the gone engine reported down: the next one reports afresh.
        let down: Vec<Nid> = self.down.iter().copied().collect();
        for nid in down {
            self.peer_up(nid);
        }
    }
}

impl Drop for Kshim {
    fn drop(&mut self) {
        self.unlink_own();
    }
}

/// A socket file's identity (device, inode), if the path exists.
fn socket_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Kshim {
    /// Removes the attach socket's file if it is still the one this kshim bound:
    /// a kshim ending (or handing its region to an engine) must not remove the
    /// socket a newer kshim is listening on at the same path.
    fn unlink_own(&mut self) {
        if let Some(id) = self.bound.take() {
            if socket_id(&self.cfg.socket_path) == Some(id) {
                let _ = std::fs::remove_file(&self.cfg.socket_path);
            }
        }
    }
}

fn link_err(e: attach::Error) -> GoneReason {
    match e {
        attach::Error::Closed => GoneReason::SocketClosed,
        attach::Error::Protocol(p) => GoneReason::Protocol(p),
        e => GoneReason::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Kshim>();
        send::<RxMsg>();
        send::<Event>();
    }

    #[test]
    fn config_errors_name_the_field() {
        let dir = std::env::temp_dir();
        let mut c = Config::new(vec![], dir.join("x.sock"));
        assert!(matches!(
            Kshim::start(c.clone()),
            Err(StartError::Config { field: "nids", .. })
        ));
        c.nids = vec!["10.0.0.1@lu2k".parse().unwrap()];
        c.tx_chunk_size = 1000;
        let e = Kshim::start(c.clone()).unwrap_err();
        assert!(e.to_string().contains("tx_chunk_size"), "{e}");
        c.tx_chunk_size = 4096;
        c.cores = 0;
        assert!(Kshim::start(c.clone())
            .unwrap_err()
            .to_string()
            .contains("cores"));
        c.cores = 1;
        c.routes.push(Route {
            net: "tcp".parse().unwrap(),
            gateway: "1.1.1.1@tcp".parse().unwrap(),
            hops: 1,
            priority: 0,
        });
        assert!(matches!(Kshim::start(c), Err(StartError::Route(_))));
    }
}
