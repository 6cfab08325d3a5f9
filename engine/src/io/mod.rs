//! The datagram I/O layer one core thread drives: what it sends (scatter lists of
//! [header, payload slice] with optional UDP GSO), what it receives (datagrams that
//! landed in RX pool buffers, possibly GRO-coalesced), and the events that come back.
//!
//! Two implementations share this contract:
//! - [`crate::io::uring::UringIo`], the fast path: io_uring `SENDMSG_ZC` from a registered
//!   buffer, multishot `recvmsg` into a provided-buffer ring, timeouts and doorbell
//!   reads as io_uring operations;
//! - [`crate::io::epoll::EpollIo`], the slow path: epoll with `sendmmsg`/`recvmmsg`.
//!
//! Both put payload bytes on the wire straight from the TX memory and receive straight
//! into the RX pool: lu2k itself copies no payload on either path (only the small
//! per-packet headers are written into the engine's header arena).
//!
//! Memory is described by address ranges ([`TxMem`], [`RxPool`]) because it lives in a
//! mapping shared with the kernel half; the I/O layer checks every reference against
//! those ranges before it reaches the kernel.

pub mod epoll;
pub mod probe;
pub mod sim;
pub mod sys;
pub mod uring;

pub use sys::{RxPool, TxMem};

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest per-packet header the engine writes: a UDT data header is 16 bytes, a
/// whole control packet (sent as a "header" without payload) at most 128.
pub const MAX_HDR: usize = 128;
/// Most datagrams in one send (the kernel's UDP GSO segment limit is 64 or more).
pub const MAX_SEGS: usize = 64;
/// Most iovecs one send may use (header + payload pieces of all segments): the
/// kernel's `UIO_MAXIOV`. One datagram may need a header, the LNet header and up to
/// `MAX_TX_EXTENTS` (256) payload pieces when kshim hands over tiny fragments.
pub const MAX_IOV: usize = 1024;
/// Largest UDP payload of one GSO send (the IPv4 total length limit; IPv6 allows a
/// little more, so one bound serves both families).
pub const MAX_GSO_BYTES: usize = 65_507;

/// One datagram of a send: its header bytes (copied into the header arena, at most
/// [`MAX_HDR`]) and a payload slice of the TX pool, by offset.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Per-packet header (e.g. the UDT data header).
    pub hdr: &'a [u8],
    /// Payload offset in the TX pool.
    pub payload_off: u64,
    /// Payload length.
    pub payload_len: u32,
    /// Further payload pieces `(offset, len)` sent after the first (a packet that
    /// spans two extents, or the message header and the first extent).
    pub more: &'a [(u64, u32)],
}

impl Segment<'_> {
    /// Bytes this segment puts on the wire.
    pub fn wire_len(&self) -> usize {
        self.hdr.len()
            + self.payload_len as usize
            + self.more.iter().map(|m| m.1 as usize).sum::<usize>()
    }

    /// The payload pieces, first one included, empty ones skipped.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        std::iter::once((self.payload_off, self.payload_len))
            .chain(self.more.iter().copied())
            .filter(|p| p.1 > 0)
    }
}

/// Why a send was refused before reaching the kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// All send slots are in flight; retry after a `SendDone`.
    #[error("all send slots are in flight")]
    Busy,
    /// A payload slice lies outside the TX pool.
    #[error("payload slice outside the TX pool")]
    OutOfPool,
    /// A header is longer than MAX_HDR.
    #[error("header longer than {MAX_HDR} bytes")]
    HeaderTooLong,
    /// Segments do not form a valid GSO batch (count, equal sizes, total).
    #[error("segments do not form a valid GSO batch")]
    BadBatch,
}

/// Checks a batch for UDP GSO: 1..=MAX_SEGS segments, every one but the last exactly
/// the size of the first, the last no longer, total within one IPv4 datagram.
/// Returns the segment size to pass as `UDP_SEGMENT` (`None` for a single segment).
pub fn gso_size(segs: &[Segment<'_>]) -> Result<Option<u16>, SendError> {
    if segs.is_empty() || segs.len() > MAX_SEGS {
        return Err(SendError::BadBatch);
    }
    if segs.iter().any(|s| s.hdr.len() > MAX_HDR) {
        return Err(SendError::HeaderTooLong);
    }
    let first = segs[0].wire_len();
    if segs.len() == 1 {
        return if first <= MAX_GSO_BYTES {
            Ok(None)
        } else {
            Err(SendError::BadBatch)
        };
    }
    let total: usize = segs.iter().map(Segment::wire_len).sum();
    let (last, body) = segs.split_last().expect("non-empty");
    if total > MAX_GSO_BYTES
        || body.iter().any(|s| s.wire_len() != first)
        || last.wire_len() > first
        || last.wire_len() == 0
    {
        return Err(SendError::BadBatch);
    }
    u16::try_from(first)
        .map(Some)
        .map_err(|_| SendError::BadBatch)
}

/// How many leading segments of `segs` form one valid GSO batch by size and count
/// alone (equal sizes, at most MAX_SEGS, within one IPv4 datagram, at most
/// MAX_IOV iovecs).
pub fn fit_gso(segs: &[Segment<'_>]) -> usize {
    let Some(first) = segs.first().map(Segment::wire_len) else {
        return 0;
    };
    let mut total = 0;
    let mut iovs = 0;
    let mut n = 0;
    for s in segs.iter().take(MAX_SEGS) {
        let l = s.wire_len();
        let v = 1 + s.pieces().count();
        if l > first || total + l > MAX_GSO_BYTES || (n > 0 && iovs + v > MAX_IOV) {
            break;
        }
        total += l;
        iovs += v;
        n += 1;
        if l < first {
            break; // a shorter segment can only be the last one
        }
    }
    n
}

/// What the I/O layer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A send finished; its payload memory may be reused now (for zero-copy sends,
    /// this is reported only after the kernel's notification).
    SendDone {
        /// The caller's token.
        token: u64,
        /// Bytes sent, or the errno.
        result: Result<usize, i32>,
        /// The kernel reported it copied the data anyway (`ZC_COPIED`: loopback does).
        kernel_copied: bool,
    },
    /// Datagram(s) landed in RX buffer `bid`: `len` bytes at byte `off` of the buffer.
    /// With GRO, they are consecutive datagrams of `seg` bytes (the last may be
    /// shorter). The buffer is the caller's until [`DatagramIo::return_rx`].
    Recv {
        /// Sender, canonical ([`sys::canonical`]: an IPv4 peer on a dual-stack
        /// socket is reported as IPv4).
        from: SocketAddr,
        /// Buffer id in the RX pool.
        bid: u16,
        /// Offset of the first datagram in the buffer.
        off: u32,
        /// Total length.
        len: u32,
        /// Segment size (equals `len` for a single datagram).
        seg: u32,
        /// The kernel's receive time (`CLOCK_REALTIME` ns), when it stamps.
        stamp_ns: Option<u64>,
    },
    /// A received datagram was longer than a buffer and was cut; it was dropped and
    /// its buffer returned.
    RecvTruncated,
    /// Receive is paused: no free RX buffer (backpressure, not failure). It resumes
    /// by itself when buffers are returned.
    RxStarved,
    /// The kernel reported an ICMP error for a destination (`IP_RECVERR`).
    SocketError {
        /// errno (e.g. ECONNREFUSED).
        errno: i32,
        /// Destination the error is about, when known (canonical).
        dst: Option<SocketAddr>,
    },
    /// The doorbell eventfd became readable (it has been drained).
    Doorbell,
    /// The deadline given to `wait` passed.
    Timer,
}

/// Counters of the I/O layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoStats {
    /// Send operations submitted.
    pub sends: u64,
    /// Datagrams sent (GSO segments counted one by one).
    pub datagrams_sent: u64,
    /// Bytes sent (headers + payload).
    pub bytes_sent: u64,
    /// Zero-copy sends whose notification said the kernel copied (loopback does).
    pub zc_copied: u64,
    /// Send errors.
    pub send_errors: u64,
    /// Receive completions (GRO batches count once).
    pub recvs: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Times receive stopped because no buffer was free: every free buffer of the
    /// pool was out (with kshim or not yet returned). A provided-buffer ring that
    /// ran dry while free buffers waited outside it is only a re-arm (`rearms`).
    pub rx_starved: u64,
    /// Datagrams dropped because they did not fit a buffer.
    pub rx_truncated: u64,
    /// Multishot receives re-armed after they ended (the io_uring path's small
    /// buffer ring runs dry on bursts; see `uring::RING_FILL`).
    pub rearms: u64,
    /// Sends made with plain (kernel-copying) sendmsg instead of SENDMSG_ZC.
    pub copy_sends: u64,
    /// Times zero-copy was turned off because the kernel kept copying anyway.
    pub zc_fallbacks: u64,
    /// Times UDP GSO was turned off because the kernel refused a GSO send with `EIO`
    /// (the route's device has no checksum offload, e.g. a virtio-net NIC without
    /// it): later sends go one datagram each.
    pub gso_fallbacks: u64,
    /// Payload bytes lu2k copied in the I/O layer (0 by construction on both paths).
    pub payload_copied: u64,
    /// Datagrams the kernel dropped because the socket's receive queue was full
    /// (`SO_RXQ_OVFL`, as of the last datagram received). The protocol sees these as
    /// path loss; here they are the host's, not the link's.
    #[serde(default)]
    pub socket_drops: u64,
    /// `io_uring_enter` calls (the io_uring path: each wait, and each submit of a
    /// full submission queue).
    #[serde(default)]
    pub enters: u64,
    /// `epoll_wait` calls (the epoll path).
    #[serde(default)]
    pub epoll_waits: u64,
    /// Timers handed to the kernel: io_uring timeouts armed or moved, blocking
    /// `epoll_wait`s with a finite timeout.
    #[serde(default)]
    pub timers_armed: u64,
    /// Waits that ended because their deadline passed (a `Timer` event).
    #[serde(default)]
    pub timers_fired: u64,
    /// What ended each blocking wait (see [`Wakes`]).
    #[serde(default)]
    pub wakes: Wakes,
    /// Free RX buffers whose pages went back to the system after staying unused
    /// while pool use was well below its recent peak (see `uring`, "RX memory").
    #[serde(default)]
    pub rx_bufs_released: u64,
    /// Times the io_uring path stopped cutting RX buffers into datagram-sized
    /// receives (a datagram or GRO batch larger than one arrived).
    #[serde(default)]
    pub rx_slice_fallbacks: u64,
    /// Blocking waits that let completions gather ([`Gather`]).
    #[serde(default)]
    pub gathered_waits: u64,
}

/// Blocking waits by what ended them, each counted once under the first cause it
/// had in this order: kshim's doorbell, a datagram (or a socket error), a send
/// completion, the deadline; `none` when it brought nothing (a spurious wake-up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Wakes {
    /// kshim rang the doorbell.
    pub doorbell: u64,
    /// A datagram landed (or the kernel reported a socket error).
    pub datagram: u64,
    /// A send finished.
    pub send_done: u64,
    /// The deadline passed.
    pub timer: u64,
    /// Nothing came.
    pub none: u64,
}

impl Wakes {
    /// Counts one blocking wait that brought `events`.
    pub fn count(&mut self, events: &[Event]) {
        let has = |f: fn(&Event) -> bool| events.iter().any(f);
        let n = if has(|e| matches!(e, Event::Doorbell)) {
            &mut self.doorbell
        } else if has(|e| {
            matches!(
                e,
                Event::Recv { .. } | Event::RecvTruncated | Event::SocketError { .. }
            )
        }) {
            &mut self.datagram
        } else if has(|e| matches!(e, Event::SendDone { .. })) {
            &mut self.send_done
        } else if has(|e| matches!(e, Event::Timer)) {
            &mut self.timer
        } else {
            &mut self.none
        };
        *n += 1;
    }

    /// All blocking waits.
    pub fn total(&self) -> u64 {
        self.doorbell + self.datagram + self.send_done + self.timer + self.none
    }
}

/// How long a sleeping core may let completions gather before it wakes (the
/// kernel's minimum wait, `IORING_FEAT_MIN_TIMEOUT`, Linux 6.12): the wait
/// returns once `events` completions have come or `within` has passed since it
/// began, whichever is first (after `within`, at the first completion), and
/// never later than its deadline. A receiver that wakes for each datagram pays
/// a scheduler wake-up per datagram; one that gathers pays one per `within`.
///
/// With `DEFER_TASKRUN` the kernel counts the waiter's pending task work, not
/// completions, and a multishot receive's datagrams are one piece of it until
/// the core runs it: while datagrams flow, `within` is what ends the wait.
/// Before `within`, only an expired timeout ends it early (the core's timer,
/// which also bounds `within`); kshim's doorbell, eventfd or futex, waits up
/// to `within` like a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    /// Completions that end the wait at once.
    pub events: u32,
    /// How long after the wait began a single completion ends it.
    pub within: Duration,
}

/// The contract both paths implement. One instance per core thread; not shared.
pub trait DatagramIo {
    /// Queues a send of `segs` to `dst` (either family: an IPv4 destination goes
    /// IPv4-mapped on a dual-stack socket). Their payload must not be changed until
    /// `SendDone { token }` is reported.
    fn send(&mut self, dst: SocketAddr, segs: &[Segment<'_>], token: u64) -> Result<(), SendError>;

    /// How many leading segments of `segs` one `send` can take (the caller sends
    /// that many and continues with the rest). Never more than [`fit_gso`] allows.
    fn fit(&self, segs: &[Segment<'_>]) -> usize {
        fit_gso(segs)
    }

    /// Gives RX buffer `bid` back (after a `Recv` event handed it out).
    fn return_rx(&mut self, bid: u16);

    /// The bytes `[off, off + len)` of RX buffer `bid`, while it is handed out (between
    /// its `Recv` event and `return_rx`); `None` otherwise or out of range.
    fn rx_bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]>;

    /// The same bytes, writable: a sealed datagram is opened in place in the RX
    /// buffer it landed in.
    fn rx_bytes_mut(&mut self, bid: u16, off: u32, len: u32) -> Option<&mut [u8]>;

    /// How the core must arm kshim's doorbell before [`DatagramIo::arm_doorbell`]: the
    /// need-wakeup bits it sets say what kshim rings.
    fn doorbell_mode(&self) -> lu2k_ring_abi::WaitMode {
        lu2k_ring_abi::WaitMode::Eventfd
    }

    /// Asks for a `Doorbell` event when kshim rings (one-shot): its eventfd is
    /// written, or, in [`lu2k_ring_abi::WaitMode::Futex`], the futex word moves
    /// away from `futex_seq` (the word as read before the need-wakeup bits were
    /// armed; see `lu2k_ring_abi::doorbell`).
    fn arm_doorbell(&mut self, futex_seq: u32);

    /// Submits pending work and collects events. Blocks until at least one event
    /// arrived or `deadline` passed (`Timer`) when `block` is true; otherwise returns
    /// what is ready now.
    fn wait(
        &mut self,
        deadline: Option<Instant>,
        block: bool,
        out: &mut Vec<Event>,
    ) -> io::Result<()>;

    /// Counters so far.
    fn stats(&self) -> IoStats;

    /// Sends still waiting for their `SendDone`.
    fn sends_in_flight(&self) -> usize;

    /// RX buffers free to receive into now (provided to the kernel, or on the
    /// slow path's free list).
    fn rx_free(&self) -> usize;

    /// RX buffers the provider receives into (free or handed out).
    fn rx_count(&self) -> usize;

    /// Datagrams one RX buffer holds, where the provider fixes it (the io_uring
    /// path cuts each buffer into that many datagram-sized receives); `None`
    /// where it depends on what the kernel coalesces (GRO), which the caller
    /// then measures.
    fn rx_per_buf(&self) -> Option<f64> {
        None
    }

    /// Short name of the path ("io_uring" or "epoll").
    fn path_name(&self) -> &'static str;

    /// Whether blocking waits can gather completions ([`Gather`]); where not,
    /// [`DatagramIo::set_gather`] changes nothing.
    fn can_gather(&self) -> bool {
        false
    }

    /// How the blocking waits that follow may gather completions (`None`: each
    /// completion ends a wait).
    fn set_gather(&mut self, _gather: Option<Gather>) {}

    /// The provider's clock: the monotonic clock, or virtual time in tests.
    fn now(&self) -> Instant {
        Instant::now()
    }

    /// The wall clock (`CLOCK_REALTIME` ns), against which the kernel stamps
    /// received datagrams.
    fn realtime_ns(&self) -> u64 {
        sys::realtime_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_cut_where_its_iovecs_would_pass_the_kernel_limit() {
        // Datagrams of 1 + 256 one-byte pieces each (kshim's tiny-fragment worst
        // case): 257 iovecs with the header, so three fit in MAX_IOV, not four.
        let hdr = [0u8; 16];
        let more: Vec<(u64, u32)> = (1..256).map(|i| (i, 1)).collect();
        let seg = Segment {
            hdr: &hdr,
            payload_off: 0,
            payload_len: 1,
            more: &more,
        };
        let segs = vec![seg; 8];
        assert_eq!(1 + seg.pieces().count(), 257);
        assert_eq!(fit_gso(&segs), MAX_IOV / 257);
        // One datagram always fits, however many pieces it has.
        assert_eq!(fit_gso(&segs[..1]), 1);
    }

    #[test]
    fn a_wake_counts_once_under_its_first_cause() {
        let mut w = Wakes::default();
        let done = Event::SendDone {
            token: 1,
            result: Ok(10),
            kernel_copied: false,
        };
        w.count(&[Event::Timer, done, Event::Doorbell]);
        w.count(&[done, Event::RecvTruncated]);
        w.count(&[Event::Timer, done]);
        w.count(&[Event::Timer]);
        w.count(&[Event::RxStarved]);
        w.count(&[]);
        let want = Wakes {
            doorbell: 1,
            datagram: 1,
            send_done: 1,
            timer: 1,
            none: 2,
        };
        assert_eq!(w, want);
        assert_eq!(w.total(), 6);
        // Counters an older engine did not write read as zero.
        let old: IoStats = serde_json::from_str(
            r#"{"sends":3,"datagrams_sent":5,"bytes_sent":0,
            "zc_copied":0,"send_errors":0,"recvs":0,"bytes_received":0,"rx_starved":0,
            "rx_truncated":0,"rearms":0,"copy_sends":0,"zc_fallbacks":0,"gso_fallbacks":0,"payload_copied":0}"#,
        )
        .unwrap();
        assert_eq!((old.sends, old.enters, old.wakes), (3, 0, Wakes::default()));
    }
}
