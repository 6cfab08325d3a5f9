//! The fast path: one io_uring per core thread.
//!
//! - **Set-up**: `SINGLE_ISSUER` and `DEFER_TASKRUN` (+`TASKRUN_FLAG`) when the kernel
//!   has them (the ring is used by its core thread only), falling back to a plain ring.
//! - **TX**: the whole [`TxMem`] range (header arena + TX pool) is registered once as
//!   fixed buffer 0, at the first send that carries payload from the pool: a
//!   registration pins (and so makes resident) every page of the range, the whole
//!   TX pool, which a core that only receives (and sends ACKs from the header arena)
//!   never needs. Each send is one `SENDMSG_ZC` whose iovecs are [header, payload
//!   slice] pairs in that buffer, with a `UDP_SEGMENT` cmsg when it carries several
//!   datagrams. A zero-copy send completes twice: first its result (with
//!   `IORING_CQE_F_MORE`), then a notification (`IORING_CQE_F_NOTIF`) once the kernel
//!   no longer references the pages. [`Event::SendDone`] is reported only after both;
//!   the notification's `ZC_COPIED` bit is counted (loopback always copies).
//!   Usage reports (`IORING_SEND_ZC_REPORT_USAGE`) exist from Linux 6.2; older
//!   kernels reject the flag with `EINVAL`, so it is probed once
//!   ([`zc_report_usage_supported`]) and left off where refused: the sends stay
//!   zero-copy, but kernel copies cannot be counted and `ZcMode::Auto` then never
//!   switches to plain `SENDMSG` (it has no `ZC_COPIED` reports to go by).
//! - **RX**: a provided-buffer ring (`IORING_REGISTER_PBUF_RING`) whose entries are
//!   pieces of the [`RxPool`]'s buffers, and one multishot `recvmsg` armed on the
//!   socket. Each completion names the entry it filled; the entry starts with
//!   `io_uring_recvmsg_out`, then the source address, the control messages
//!   (`UDP_GRO` size) and the payload, which is parsed in place. When the multishot
//!   ends (no `IORING_CQE_F_MORE`) it is re-armed.
//!   *RX memory*: a datagram should cost about its own size, not a 64 KiB buffer.
//!   Where the kernel coalesces datagrams (GRO; a GSO send over loopback arrives
//!   whole too) a batch needs a whole buffer, so whole buffers go into the ring
//!   until [`SLICE_AFTER`] full-size datagrams in a row came one by one; from then
//!   on each buffer goes in cut into [`UringOpts::rx_slice`]-byte entries (header,
//!   address, control messages and one `mss`-sized datagram: 40 of them in a 64 KiB
//!   buffer), and a buffer is free again once every one of its entries has come back
//!   from the kernel and the transport has returned it (it calls `return_rx` once
//!   nothing it holds lies in the buffer). A coalesced batch or a datagram larger
//!   than an entry after that (it arrives truncated, counted in `rx_truncated`; the
//!   protocol sends it again) turns cutting off for good, counted in
//!   `rx_slice_fallbacks`. Incremental consumption (`IOU_PBUF_RING_INC`, 6.12+)
//!   is not used: with multishot `recvmsg` the kernel truncates a datagram that
//!   does not fit what is left of a buffer and fails the receive with `EFAULT`
//!   once less is left than the header needs, until the `min_left` setting (Linux
//!   7.1, not in 6.18) lets it skip to the next buffer; and with GRO that minimum
//!   is a whole batch, a whole 64 KiB buffer. The probe reports both.
//!   Free buffers whose pages stayed cold while pool use fell well below its
//!   recent peak give their pages back (`MADV_REMOVE` on the region's memfd, see
//!   [`sys::give_back_pages`]), so resident memory follows the data down; a
//!   region that refuses (the kernel module's) keeps its pages.
//!   The ring holds at most [`RING_FILL`] buffers' worth of entries; the other free
//!   buffers wait in a stack and go in most recently returned first, so the kernel
//!   keeps writing into the same warm working set. (The ring is FIFO: with the whole pool in it, every
//!   buffer of a large sparse pool would be touched once before any was reused, and
//!   first touches cost a page fault and a page clear per 4 KiB — on loopback that
//!   was most of the receiving core's time.) `ENOBUFS` means the ring ran dry. With
//!   buffers still in the stash that is only the ring's small size: the ring is
//!   refilled after the reap and the receive re-armed (counted in `rearms`; the
//!   datagrams wait in the socket queue). With the stash empty too it is
//!   backpressure ([`Event::RxStarved`]), re-armed when a buffer comes back.
//! - **Timers** are `IORING_OP_TIMEOUT` with an absolute `CLOCK_MONOTONIC` deadline.
//! - **Doorbells**, armed on demand: an `IORING_OP_FUTEX_WAIT` on the direction's
//!   futex word in the region where the kernel has it ([`DoorbellMode`]), else an
//!   `IORING_OP_POLL_ADD` of the doorbell eventfd.
//!
//! Every memory address handed to the kernel stays valid and unmoved until the
//! completion(s) that release it: send slots, the recvmsg template, the timer's
//! timespec and the doorbell's read buffer live in boxes owned by [`UringIo`], and the
//! registered range and RX pool outlive it (its constructor's contract).
#![allow(unsafe_code)]

mod probe;
pub use probe::{fixed_sendmsg_zc_supported, zc_report_usage_supported};
pub(crate) use probe::{try_register, try_register_pbuf, try_register_pbuf_inc};

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::io::sys::{self, GsoCmsg, Mapping};
use crate::io::{
    gso_size, DatagramIo, Event, Gather, IoStats, RxPool, Segment, SendError, TxMem, MAX_IOV,
};
use lu2k_ring_abi::WaitMode;

const KIND_SHIFT: u64 = 56;
const K_SEND: u64 = 1;
const K_RECV: u64 = 2;
const K_BELL: u64 = 3;
const K_TIMER: u64 = 4;
const K_TIMER_UPD: u64 = 5;

/// `IORING_SEND_ZC_REPORT_USAGE` (sqe->ioprio for SEND[MSG]_ZC).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `FUTEX2_SIZE_U32` (futex2 flags of `IORING_OP_FUTEX_WAIT`; no `FUTEX2_PRIVATE`:
/// the word is shared with kshim's process).
const FUTEX2_SIZE_U32: u32 = 0x02;
/// `FUTEX_BITSET_MATCH_ANY`: any waker (kshim's plain `FUTEX_WAKE`) matches.
const FUTEX_BITSET_MATCH_ANY: u32 = u32::MAX;
/// `IORING_NOTIF_USAGE_ZC_COPIED` (cqe->res of the notification).
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// Buffer group id of the RX ring.
const BGID: u16 = 0;
/// Free RX buffers kept in the provided-buffer ring (the rest wait, warm first, in
/// [`UringIo`]'s stash). Few, so that the buffers the kernel writes into stay in the
/// cache: with 64 KiB buffers, 16 are 1 MiB. The ring is refilled after every reap,
/// so a drain that empties it costs one re-arm, not a datagram. On the 2-core VM's
/// loopback bulk run (8 messages in flight) lu2k moved 31–33 Gbit/s with 16 or 8
/// here, 28 with 64, 25 with 256 and 22 with 1024 (64 MiB, the socket's receive
/// buffer, the fill before).
pub const RING_FILL: usize = 16;

/// `sizeof(struct io_uring_recvmsg_out)`: what a multishot `recvmsg` writes before
/// the source address.
const RECVMSG_OUT_LEN: u32 = 16;

/// The largest UDP payload of an IP packet of `mss` bytes (1500 by default: the
/// IPv4 and UDP headers, 28 bytes, left out; IPv6's 20 more make it smaller).
pub const fn max_datagram(mss: u32) -> u32 {
    mss.saturating_sub(28)
}

// The RX pool is sized (by the kernel half and `device create`) at what these
// receives take: the two must count the same bytes before each datagram.
const _: () = assert!(
    RECVMSG_OUT_LEN + sys::RAW_ADDR_LEN as u32 + sys::RECV_CMSG_SPACE as u32
        == lu2k_ring_abi::rx_pool::RECV_OVERHEAD
);

/// Bytes of one RX ring entry that holds a datagram of up to `datagram` bytes with
/// what a multishot `recvmsg` puts before it (header, the larger address, the
/// control messages), rounded up to a cache line.
pub const fn rx_slice_for(datagram: u32) -> u32 {
    (RECVMSG_OUT_LEN + sys::RAW_ADDR_LEN as u32 + sys::RECV_CMSG_SPACE as u32 + datagram)
        .div_ceil(64)
        * 64
}

/// Full-size datagrams (see [`FULL_SIZE`]) that must arrive one by one in a row,
/// none coalesced, before RX buffers are cut into datagram-sized entries.
pub const SLICE_AFTER: u32 = 256;
/// A datagram at least this long counts as full-size: GRO would have coalesced it
/// with its neighbours had the kernel done GRO on this path.
const FULL_SIZE: u32 = 1024;

/// Entries of cut buffers kept in the ring (a buffer goes in whole when this many
/// less its entries are left): enough for a burst between two reaps, few, because
/// a cut entry still in the ring when cutting stops receives a batch truncated.
const SLICED_FILL: usize = 4 * RING_FILL;

/// How far past its deadline a gathering wait's own timeout lies: the armed
/// timeout SQE ends the wait at the deadline, this only bounds it should that
/// completion be late.
const GATHER_SLACK: Duration = Duration::from_millis(10);

/// How often free RX buffers are looked at for pages to give back, and how many
/// at most each time (each is an `madvise`; the core's thread does it between
/// its waits).
const TRIM_EVERY: Duration = Duration::from_secs(1);
const TRIM_BATCH: usize = 512;
/// Free buffers kept warm whatever the use: four ring fills.
const TRIM_KEEP_MIN: usize = 4 * RING_FILL;

/// Ring set-up that was obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingSetup {
    /// `IORING_SETUP_SINGLE_ISSUER` is on.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` is on.
    pub defer_taskrun: bool,
    /// The TX range is a registered buffer and sends use it (`buf_index` on SENDMSG_ZC).
    pub fixed_tx: bool,
    /// The TX range is to be registered at the first send with pool payload.
    pub fixed_tx_pending: bool,
    /// Zero-copy sends ask for usage reports (`IORING_SEND_ZC_REPORT_USAGE`, 6.2+), so
    /// `ZC_COPIED` is counted; off where the kernel refuses the flag.
    pub zc_report_usage: bool,
    /// Sends run on one io_uring worker thread (`IOSQE_ASYNC`), see [`SendWorker`].
    pub send_worker: bool,
    /// The doorbell is an `IORING_OP_FUTEX_WAIT`, see [`DoorbellMode`].
    pub futex_doorbell: bool,
    /// The kernel has the minimum wait (`IORING_FEAT_MIN_TIMEOUT`, 6.12+), so a
    /// sleeping core can let completions gather ([`Gather`]).
    pub min_wait: bool,
}

impl std::fmt::Display for RingSetup {
    /// What the ring got, for the start-up log: every fast-path feature the kernel
    /// refused shows as "no" rather than going unnoticed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "SINGLE_ISSUER {}, DEFER_TASKRUN {}, registered TX buffer {}, zero-copy usage reports {}, send worker {}, doorbell {}, minimum wait {}",
            yn(self.single_issuer),
            yn(self.defer_taskrun),
            if self.fixed_tx_pending {
                "at the first payload send"
            } else {
                yn(self.fixed_tx)
            },
            yn(self.zc_report_usage),
            yn(self.send_worker),
            if self.futex_doorbell { "futex" } else { "eventfd" },
            if self.min_wait {
                "yes"
            } else {
                "no (Linux 6.12+): a sleeping core wakes for each completion"
            }
        )
    }
}

/// When to send with `SENDMSG_ZC` (config `zero_copy`, flag `--zero-copy`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ZcMode {
    /// Zero-copy until the kernel keeps reporting that it copied anyway
    /// (`ZC_COPIED` on 64 notifications in a row: loopback, veth, NICs without
    /// scatter-gather); then plain `SENDMSG` (the kernel copies; lu2k still does not),
    /// which allows full 64-segment GSO batches instead of the zero-copy fragment
    /// budget.
    #[default]
    Auto,
    /// Always `SENDMSG_ZC`.
    Always,
    /// Always plain `SENDMSG`.
    Never,
}

/// Where the kernel's work of a send runs (config `send_worker`, flag
/// `--send-worker`). Wherever the kernel copies payload into its buffers (loopback,
/// veth, NICs without zero-copy) that copy is most of a send, and by default it runs
/// on the core's own thread inside `io_uring_enter`. With the worker, every send is
/// queued to one io_uring worker thread (`IOSQE_ASYNC`; the ring's io-wq limited to
/// one unbounded worker, so sends leave in the order they were queued) and the core
/// goes on with the protocol. Worth it only where that thread has a CPU of its own.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SendWorker {
    /// On when the machine has at least 4 CPUs per engine core.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: sends run on the core's thread.
    Off,
}

impl SendWorker {
    /// Whether `cores` engine cores on a machine with `cpus` CPUs use the worker.
    pub fn enabled(self, cores: usize, cpus: usize) -> bool {
        match self {
            SendWorker::On => true,
            SendWorker::Off => false,
            SendWorker::Auto => cpus >= 4 * cores.max(1),
        }
    }
}

/// How an io_uring core sleeps on kshim's doorbell (config `doorbell`, flag
/// `--doorbell`). Either way the core first spins, then arms the ring-abi
/// need-wakeup protocol and sleeps in `io_uring_enter` alongside its sockets and
/// timers; only what kshim rings differs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DoorbellMode {
    /// A futex wait where the kernel has `IORING_OP_FUTEX_WAIT` (6.7+) and kshim
    /// honours futex wakes (region feature `FUTEX_WAKE`); else the eventfd.
    #[default]
    Auto,
    /// A poll of the direction's eventfd (what a kernel-module kshim rings).
    Eventfd,
    /// An `IORING_OP_FUTEX_WAIT` on the direction's futex word in the region: kshim
    /// bumps it and wakes it, no eventfd counter to drain.
    Futex,
}

impl DoorbellMode {
    /// Whether to wait on the futex: `kernel` = `IORING_OP_FUTEX_WAIT` is there,
    /// `kshim` = the region says its producers honour futex wakes.
    pub fn futex(self, kernel: bool, kshim: bool) -> Result<bool, String> {
        match self {
            DoorbellMode::Eventfd => Ok(false),
            DoorbellMode::Auto => Ok(kernel && kshim),
            DoorbellMode::Futex if !kernel => Err(
                "doorbell = futex needs IORING_OP_FUTEX_WAIT (Linux 6.7 or later): use doorbell = auto or eventfd"
                    .into(),
            ),
            DoorbellMode::Futex if !kshim => Err(
                "doorbell = futex but kshim's region does not offer futex wakes (feature FUTEX_WAKE; a kernel-module kshim rings eventfds): use doorbell = auto or eventfd"
                    .into(),
            ),
            DoorbellMode::Futex => Ok(true),
        }
    }
}

/// Options for [`UringIo::new`].
#[derive(Debug, Clone, Copy)]
pub struct UringOpts {
    /// Submission queue entries.
    pub entries: u32,
    /// Concurrent sends (send slots; the header arena must hold this many).
    pub send_slots: usize,
    /// Try to register the TX range and send from the fixed buffer.
    pub fixed_tx: bool,
    /// Try SINGLE_ISSUER + DEFER_TASKRUN.
    pub defer_taskrun: bool,
    /// Zero-copy policy.
    pub zc: ZcMode,
    /// Queue sends to one io_uring worker thread (see [`SendWorker`]).
    pub send_worker: bool,
    /// Bytes of one RX receive: each RX buffer goes into the kernel's ring cut into
    /// entries of this size ([`rx_slice_for`] the largest datagram), so a datagram
    /// costs about its own size of RX memory; 0, or more than half a buffer, gives
    /// the kernel whole buffers (one datagram or GRO batch each).
    pub rx_slice: u32,
}

impl Default for UringOpts {
    fn default() -> Self {
        UringOpts {
            entries: 512,
            send_slots: 64,
            fixed_tx: true,
            defer_taskrun: true,
            zc: ZcMode::Auto,
            send_worker: false,
            rx_slice: rx_slice_for(max_datagram(1500)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Submitted: waiting for the result and/or the notification.
    InFlight {
        result: bool,
        notif: bool,
    },
}

/// One send's kernel-visible state; boxed so that its address is stable.
#[repr(C)]
struct SendSlot {
    msg: libc::msghdr,
    addr: sys::RawAddr,
    ctrl: GsoCmsg,
    iov: [libc::iovec; MAX_IOV],
    token: u64,
    state: SlotState,
    res: Result<usize, i32>,
    copied: bool,
}

/// The io_uring reactor's I/O of one core. See the module doc.
pub struct UringIo {
    ring: IoUring,
    sock: OwnedFd,
    /// How destinations are written for `sock`.
    family: sys::Family,
    setup: RingSetup,
    tx: TxMem,
    slots: Box<[SendSlot]>,
    free_slots: Vec<u16>,
    in_flight: usize,
    rx: RxPool,
    bufring: Mapping,
    bufring_mask: u16,
    bufring_tail: u16,
    /// Entries (whole buffers or their slices) in the provided-buffer ring.
    rx_free: usize,
    /// Buffers with entries in the ring.
    ring_bufs: usize,
    /// Free buffers not in the ring, most recently returned last (taken first).
    rx_stash: Vec<u16>,
    /// Bytes of one entry while buffers are cut (see the module doc, RX memory).
    rx_slice: u32,
    /// Entries per buffer while they are cut.
    slices: u16,
    /// Whole buffers go into the ring: cutting is off, not yet on, or turned off.
    whole: bool,
    /// Cutting is allowed and has not been turned off.
    may_slice: bool,
    /// Full-size datagrams received one by one in a row while whole buffers go in.
    singles: u32,
    /// Per ring entry (its index is the buffer id the kernel reports): the buffer,
    /// offset and length it was provided with.
    kslot: Vec<(u16, u32, u32)>,
    /// Per buffer: its entries still in the ring.
    left: Vec<u16>,
    /// The bottom of the stash whose pages were given back (or never touched).
    stash_cold: usize,
    /// Most buffers in use since the last trim.
    use_peak: usize,
    /// When free buffers are next looked at for pages to give back; `None` once
    /// the region refused to give pages back (the kernel module's region).
    trim_at: Option<Instant>,
    recv_hdr: Box<libc::msghdr>,
    recv_armed: bool,
    starved: bool,
    bell_fd: Option<RawFd>,
    /// The futex word the doorbell waits on instead of the eventfd (see
    /// [`UringIo::use_futex_doorbell`]); holds its mapping.
    bell_futex: Option<lu2k_ring_abi::FutexWord>,
    bell_buf: Box<u64>,
    bell_armed: bool,
    timer_ts: Box<types::Timespec>,
    timer_armed: Option<Instant>,
    timer_fired: bool,
    /// How blocking waits may gather completions (only where `setup.min_wait`).
    gather: Option<Gather>,
    epoch: Instant,
    epoch_mono: std::time::Duration,
    stats: IoStats,
    max_frags: usize,
    handed: sys::Lent,
    zc_mode: ZcMode,
    zc_active: bool,
    /// UDP GSO refused by the kernel (see `IoStats::gso_fallbacks`): one datagram per
    /// send from then on.
    gso_off: bool,
    zc_copied_streak: u32,
    /// The TX range is registered at the first send with pool payload (see the
    /// module doc); cleared once tried.
    tx_reg_pending: bool,
    // Last: memory the kernel may reference, dropped after the ring.
    /// What `new_owned` keeps alive (declared last: it outlives every kernel
    /// reference the fields above hold).
    _kept: Option<sys::Kept>,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("setup", &self.setup)
            .field("in_flight", &self.in_flight)
            .field("rx_free", &self.rx_free)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn monotonic_now() -> std::time::Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `MAX_SKB_FRAGS` as the kernel reports it (`net.core.max_skb_frags`, default 17).
fn max_skb_frags() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/max_skb_frags")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(17)
}

/// A one-shot `POLL_ADD` for `fd` becoming readable.
pub(crate) fn poll_in(fd: RawFd, user_data: u64) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .build()
        .user_data(user_data)
}

/// Submits what is queued and waits up to `timeout` for one completion (not at all
/// for a zero timeout). A timeout or a signal is not an error.
pub(crate) fn submit_and_wait(ring: &mut IoUring, timeout: Duration) -> io::Result<()> {
    let res = if timeout.is_zero() {
        ring.submit()
    } else {
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        ring.submitter().submit_with_args(1, &args)
    };
    match res {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A ring of `entries` entries; with `defer`, single-issuer and deferred task
/// work where the kernel has them (the ring must then be used from the thread that
/// built it).
pub(crate) fn build_ring(entries: u32, defer: bool) -> io::Result<(IoUring, RingSetup)> {
    if defer {
        let r = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(entries * 4)
            .build(entries);
        if let Ok(r) = r {
            return Ok((
                r,
                RingSetup {
                    single_issuer: true,
                    defer_taskrun: true,
                    ..RingSetup::default()
                },
            ));
        }
        if let Ok(r) = IoUring::builder()
            .setup_single_issuer()
            .setup_cqsize(entries * 4)
            .build(entries)
        {
            return Ok((
                r,
                RingSetup {
                    single_issuer: true,
                    ..RingSetup::default()
                },
            ));
        }
    }
    let r = IoUring::builder()
        .setup_cqsize(entries * 4)
        .build(entries)?;
    Ok((r, RingSetup::default()))
}

/// Registers the TX range as io_uring's fixed buffer 0, where fixed
/// `SENDMSG_ZC` works and the range fits one registration; whether it did.
///
/// # Safety
/// `tx` must stay mapped while the registration lives (until `ring` is dropped).
unsafe fn register_tx(ring: &IoUring, tx: &TxMem) -> bool {
    if tx.total_len > 1 << 30 || !fixed_sendmsg_zc_supported() {
        return false;
    }
    let iov = libc::iovec {
        iov_base: tx.base as *mut libc::c_void,
        iov_len: tx.total_len,
    };
    // SAFETY: the range stays mapped for the registration's life (our contract).
    unsafe { ring.submitter().register_buffers(&[iov]) }.is_ok()
}

/// `n` free send slots.
fn send_slots(n: usize) -> Box<[SendSlot]> {
    (0..n)
        .map(|_| SendSlot {
            // SAFETY: msghdr is plain old data; zero is a valid empty value.
            msg: unsafe { std::mem::zeroed() },
            addr: sys::RawAddr::default(),
            ctrl: GsoCmsg::new(0),
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV],
            token: 0,
            state: SlotState::Free,
            res: Ok(0),
            copied: false,
        })
        .collect()
}

/// A provided-buffer ring for `count` entries (a power of two of 16-byte entries,
/// page aligned), registered with `ring` as group `BGID`; with its entry count.
/// The mapping must outlive the ring (`UringIo` drops `ring` first).
fn provided_buffer_ring(ring: &IoUring, count: usize) -> io::Result<(Mapping, u16)> {
    let entries = count.next_power_of_two().clamp(16, 1 << 15) as u16;
    let bufring = Mapping::anon((entries as usize * size_of::<types::BufRingEntry>()).max(4096))?;
    // SAFETY: `bufring` is page-aligned memory of `entries` entries that the caller
    // keeps until after the ring is dropped.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufring.as_ptr() as u64, entries, BGID, 0)?;
    }
    Ok((bufring, entries))
}

impl UringIo {
    /// Builds the reactor I/O over memory it owns (tests, the probe's self-test).
    pub fn new_owned(
        sock: OwnedFd,
        mem: impl sys::IoMem + 'static,
        bell: Option<OwnedFd>,
        opts: UringOpts,
    ) -> io::Result<UringIo> {
        sys::build_owned(sock, mem, bell, opts)
    }

    /// Waits for the doorbell with `IORING_OP_FUTEX_WAIT` on `word` (the direction's
    /// futex word in the region, a shared futex) instead of polling the eventfd; the
    /// core then arms `WAKE_FUTEX`. Refused where the kernel lacks the operation.
    pub fn use_futex_doorbell(&mut self, word: lu2k_ring_abi::FutexWord) -> io::Result<()> {
        // This ring's own probe: the daemon's start-up probe decided already, this
        // only guards a direct caller (cheap, no self-test).
        let mut probe = io_uring::Probe::new();
        if self.ring.submitter().register_probe(&mut probe).is_err()
            || !probe.is_supported(opcode::FutexWait::CODE)
        {
            return Err(io::Error::other(
                "this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7 or later)",
            ));
        }
        self.bell_futex = Some(word);
        Ok(())
    }

    /// Whether sends currently use `SENDMSG_ZC`.
    pub fn zero_copy_active(&self) -> bool {
        self.zc_active
    }

    /// The ring set-up obtained.
    pub fn setup(&self) -> RingSetup {
        RingSetup {
            futex_doorbell: self.bell_futex.is_some(),
            fixed_tx_pending: self.tx_reg_pending,
            ..self.setup
        }
    }

    /// The socket.
    pub fn socket(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Entries in the ring per buffer now.
    fn per_buf(&self) -> usize {
        if self.whole {
            1
        } else {
            usize::from(self.slices)
        }
    }

    /// Puts buffer `bid` into the ring: whole, or cut into `rx_slice`-byte entries.
    fn carve(&mut self, bid: u16) {
        let (n, len) = if self.whole {
            (1, self.rx.buf_size)
        } else {
            (self.slices, self.rx_slice)
        };
        for i in 0..n {
            self.provide(bid, u32::from(i) * len, len);
        }
        if let Some(l) = self.left.get_mut(usize::from(bid)) {
            *l = n;
        }
        self.ring_bufs += 1;
    }

    /// Stops cutting buffers (a datagram or GRO batch larger than an entry came):
    /// whole buffers from the next one put into the ring.
    fn stop_slicing(&mut self, why: &str) {
        if self.whole {
            return;
        }
        self.whole = true;
        self.may_slice = false;
        self.stats.rx_slice_fallbacks += 1;
        tracing::warn!(
            "RX: {why}; receiving into whole {}-byte buffers from now on instead of \
             {}-byte pieces (GRO batches need them; RX memory then costs a buffer \
             per batch)",
            self.rx.buf_size,
            self.rx_slice
        );
    }

    /// An entry of buffer `bid` that the transport never sees (truncated, or not
    /// a datagram): the buffer is free again only if the transport holds nothing
    /// in it and no entry of it is left in the ring. A cut buffer's other entries
    /// may hold datagrams the transport keeps (it returns the buffer once, when
    /// the last of them is done), so this entry alone must not free it.
    fn discard_entry(&mut self, bid: u16) {
        if !self.handed.is_out(bid) && self.left.get(usize::from(bid)) == Some(&0) {
            self.rx_stash.push(bid);
            self.refill();
        }
    }

    /// Takes the most recently returned free buffer from the stash.
    fn pop_stash(&mut self) -> Option<u16> {
        let bid = self.rx_stash.pop()?;
        self.stash_cold = self.stash_cold.min(self.rx_stash.len());
        Some(bid)
    }

    /// Free buffers (in the ring, partly filled ones included, or in the stash).
    fn free_bufs(&self) -> usize {
        self.rx_stash.len() + self.ring_bufs
    }

    /// Gives back the pages of free buffers that stayed cold: those at the bottom
    /// of the stash beyond twice the most buffers in use since the last look (and
    /// beyond [`TRIM_KEEP_MIN`]), so that resident memory follows the data down
    /// after a peak. At most [`TRIM_BATCH`] per call; the rest on the next wait.
    fn trim(&mut self) {
        let in_use = usize::from(self.rx.count).saturating_sub(self.free_bufs());
        self.use_peak = self.use_peak.max(in_use);
        let now = Instant::now();
        if self.trim_at.is_none_or(|t| now < t) {
            return;
        }
        let keep = (2 * self.use_peak).max(TRIM_KEEP_MIN);
        let cold_end = self.rx_stash.len().saturating_sub(keep);
        let end = cold_end.min(self.stash_cold + TRIM_BATCH);
        for i in self.stash_cold..end {
            let bid = self.rx_stash[i];
            if let Some(a) = self.rx.buf(bid) {
                // The buffer is free and outside the ring: nobody, kernel included,
                // reads or writes it until it is provided again.
                if !sys::give_back_pages(a as usize, self.rx.buf_size as usize) {
                    tracing::info!(
                        "RX: this region cannot give pages of free buffers back \
                         (a kernel module's region): RX memory stays at its high water"
                    );
                    self.trim_at = None;
                    return;
                }
                self.stats.rx_bufs_released += 1;
            }
        }
        self.stash_cold = self.stash_cold.max(end);
        if end < cold_end {
            return;
        }
        self.trim_at = Some(now + TRIM_EVERY);
        self.use_peak = in_use;
    }

    fn provide(&mut self, bid: u16, off: u32, len: u32) {
        let Some(addr) = self.rx.buf(bid) else { return };
        let idx = (self.bufring_tail & self.bufring_mask) as usize;
        if let Some(k) = self.kslot.get_mut(idx) {
            *k = (bid, off, len);
        }
        let base = self.bufring.as_ptr().cast::<types::BufRingEntry>();
        // `idx` < entries; the entry at `tail` is not visible to the kernel until
        // `publish_tail` stores the new tail (we are the only writer of entries past
        // the tail and of the tail itself).
        let p = base.wrapping_add(idx);
        // SAFETY: see above; `p` is entry `idx` of the ring mapping.
        let e = unsafe { &mut *p };
        e.set_addr(addr as u64 + u64::from(off));
        e.set_len(len);
        e.set_bid(idx as u16);
        self.bufring_tail = self.bufring_tail.wrapping_add(1);
        self.rx_free += 1;
    }

    /// Tops the ring up from the stash, warmest first: to [`RING_FILL`] whole
    /// buffers, or to [`SLICED_FILL`] entries of cut ones.
    fn refill(&mut self) {
        let mut any = false;
        let per = self.per_buf();
        let fill = if self.whole { RING_FILL } else { SLICED_FILL };
        while self.rx_free + per <= fill.max(per) {
            let Some(bid) = self.pop_stash() else {
                break;
            };
            self.carve(bid);
            any = true;
        }
        if any {
            self.publish_tail();
        }
    }

    fn publish_tail(&mut self) {
        let base = self.bufring.as_ptr().cast::<types::BufRingEntry>();
        // SAFETY: the tail is a u16 inside entry 0 (the `resv` field), 2-byte aligned;
        // we are its only writer and the kernel reads it with an acquire load, so the
        // Release store publishes the entries written before it.
        let p = unsafe { types::BufRingEntry::tail(base) } as *const AtomicU16;
        // SAFETY: as above: `p` points at the ring's tail field inside our mapping.
        let tail = unsafe { &*p };
        tail.store(self.bufring_tail, Ordering::Release);
    }

    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry built in this module points only at memory owned by
        // `self` in boxes (slots, recv header, timespec, bell buffer), at the futex
        // word whose mapping `self.bell_futex` holds, or at the TX/RX ranges the
        // constructor's contract keeps mapped; none is freed or moved before its
        // completion is reaped (or the ring, the first field, is dropped).
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.stats.enters += 1;
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        Ok(())
    }

    fn arm_recv(&mut self) -> io::Result<()> {
        if self.recv_armed || self.rx_free == 0 {
            return Ok(());
        }
        let e = opcode::RecvMsgMulti::new(types::Fd(self.sock.as_raw_fd()), &*self.recv_hdr, BGID)
            .build()
            .user_data(K_RECV << KIND_SHIFT);
        self.push(e)?;
        self.recv_armed = true;
        Ok(())
    }

    fn arm_timer(&mut self, deadline: Instant) -> io::Result<()> {
        if self.timer_armed == Some(deadline) {
            return Ok(());
        }
        let when = self.epoch_mono + deadline.saturating_duration_since(self.epoch);
        *self.timer_ts = types::Timespec::new()
            .sec(when.as_secs())
            .nsec(when.subsec_nanos());
        let e = if self.timer_armed.is_some() {
            opcode::TimeoutUpdate::new(K_TIMER << KIND_SHIFT, &*self.timer_ts)
                .flags(types::TimeoutFlags::ABS)
                .build()
                .user_data(K_TIMER_UPD << KIND_SHIFT)
        } else {
            opcode::Timeout::new(&*self.timer_ts)
                .flags(types::TimeoutFlags::ABS)
                .build()
                .user_data(K_TIMER << KIND_SHIFT)
        };
        self.push(e)?;
        self.stats.timers_armed += 1;
        self.timer_armed = Some(deadline);
        Ok(())
    }

    fn bell_buf_bytes(&mut self) -> &mut [u8; 8] {
        // A u64 and [u8; 8] have the same size; go through bytes safely.
        let v: &mut u64 = &mut self.bell_buf;
        *v = 0;
        bytemuck_u64(v)
    }

    fn complete_slot(&mut self, i: usize, out: &mut Vec<Event>) {
        let s = &mut self.slots[i];
        out.push(Event::SendDone {
            token: s.token,
            result: s.res,
            kernel_copied: s.copied,
        });
        s.state = SlotState::Free;
        self.free_slots.push(i as u16);
        self.in_flight -= 1;
    }

    fn on_send_cqe(&mut self, i: usize, res: i32, flags: u32, out: &mut Vec<Event>) {
        let Some(SlotState::InFlight { result, notif }) = self.slots.get(i).map(|s| s.state) else {
            return;
        };
        if cqueue::notif(flags) {
            if res as u32 & NOTIF_USAGE_ZC_COPIED != 0 {
                self.slots[i].copied = true;
                self.stats.zc_copied += 1;
                self.zc_copied_streak += 1;
                if self.zc_mode == ZcMode::Auto && self.zc_copied_streak >= 64 && self.zc_active {
                    self.zc_active = false;
                    self.stats.zc_fallbacks += 1;
                }
            } else {
                self.zc_copied_streak = 0;
            }
            self.slots[i].state = SlotState::InFlight {
                result,
                notif: true,
            };
        } else {
            let more = cqueue::more(flags);
            let s = &mut self.slots[i];
            s.res = if res >= 0 {
                Ok(res as usize)
            } else {
                Err(-res)
            };
            if res < 0 {
                self.stats.send_errors += 1;
                // The kernel refuses a GSO send with EIO when the route's device
                // cannot offload the checksum; nothing of it went out. Later sends
                // go unsegmented; these datagrams are retransmitted as lost ones.
                if res == -libc::EIO && s.msg.msg_controllen != 0 && !self.gso_off {
                    self.gso_off = true;
                    self.stats.gso_fallbacks += 1;
                    tracing::warn!(
                        "UDP GSO send refused (EIO: the outgoing device has no checksum \
                         offload); sending one datagram per send from now on"
                    );
                }
            }
            // No F_MORE: no notification will follow.
            s.state = SlotState::InFlight {
                result: true,
                notif: notif || !more,
            };
        }
        if self.slots[i].state
            == (SlotState::InFlight {
                result: true,
                notif: true,
            })
        {
            self.complete_slot(i, out);
        }
    }

    fn on_recv_cqe(&mut self, res: i32, flags: u32, out: &mut Vec<Event>) {
        if !cqueue::more(flags) {
            self.recv_armed = false;
            self.stats.rearms += 1;
        }
        if res < 0 {
            match -res {
                // The ring ran dry but buffers wait in the stash: `reap` refills it
                // and the next `wait` re-arms. Not backpressure.
                libc::ENOBUFS if !self.rx_stash.is_empty() => {}
                libc::ENOBUFS => {
                    self.starved = true;
                    self.stats.rx_starved += 1;
                    out.push(Event::RxStarved);
                }
                _ => self.drain_errqueue(out),
            }
            return;
        }
        let Some(idx) = cqueue::buffer_select(flags) else {
            return;
        };
        let Some(&(bid, boff, blen)) = self.kslot.get(usize::from(idx)) else {
            return;
        };
        self.rx_free = self.rx_free.saturating_sub(1);
        if let Some(l) = self.left.get_mut(usize::from(bid)) {
            *l = l.saturating_sub(1);
            if *l == 0 {
                self.ring_bufs = self.ring_bufs.saturating_sub(1);
            }
        }
        let used = (res as u32).min(blen);
        // SAFETY: the kernel filled `used` bytes of the entry at `boff` in buffer
        // `bid` and handed it to us with this completion; nobody else touches it
        // until we provide it again.
        let Some(bytes) = (unsafe { self.rx.bytes(bid, boff, used) }) else {
            self.discard_entry(bid);
            return;
        };
        let Ok(m) = types::RecvMsgOut::parse(bytes, &self.recv_hdr) else {
            self.discard_entry(bid);
            return;
        };
        if m.is_payload_truncated() {
            self.stats.rx_truncated += 1;
            out.push(Event::RecvTruncated);
            if blen < self.rx.buf_size {
                self.stop_slicing("a datagram larger than a receive entry arrived truncated");
            }
            self.discard_entry(bid);
            return;
        }
        let Some(from) = sys::sockaddr_from_bytes(m.name_data()) else {
            self.discard_entry(bid);
            return;
        };
        let cm = sys::parse_recv_cmsgs(m.control_data());
        if let Some(d) = cm.socket_drops {
            self.stats.socket_drops = u64::from(d);
        }
        let payload = m.payload_data();
        let off = boff as usize + (payload.as_ptr() as usize - bytes.as_ptr() as usize);
        let len = payload.len() as u32;
        if self.may_slice {
            if cm.gro_size.is_some_and(|g| u32::from(g) < len) {
                // The kernel coalesces here: a batch of full-size datagrams does not
                // fit an entry.
                self.singles = 0;
                self.stop_slicing("the kernel coalesced received datagrams (GRO)");
            } else if self.whole && len >= FULL_SIZE {
                self.singles += 1;
                if self.singles >= SLICE_AFTER {
                    self.whole = false;
                    tracing::info!(
                        "RX: {SLICE_AFTER} full-size datagrams came one by one (no GRO \
                         on this path): receiving into {}-byte pieces, {} per {}-byte \
                         buffer",
                        self.rx_slice,
                        self.slices,
                        self.rx.buf_size
                    );
                }
            }
        }
        self.stats.recvs += 1;
        self.stats.bytes_received += u64::from(len);
        self.handed.lend(bid);
        out.push(Event::Recv {
            from,
            bid,
            off: off as u32,
            len,
            seg: cm.gro_size.map_or(len, u32::from).min(len.max(1)),
            stamp_ns: cm.stamp_ns,
        });
    }

    fn drain_errqueue(&mut self, out: &mut Vec<Event>) {
        while let Ok(Some(e)) = sys::recv_error(self.sock.as_raw_fd()) {
            out.push(Event::SocketError {
                errno: e.errno,
                dst: e.dst,
            });
        }
    }

    fn reap(&mut self, out: &mut Vec<Event>) {
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            let kind = ud >> KIND_SHIFT;
            let idx = (ud & ((1 << KIND_SHIFT) - 1)) as usize;
            match kind {
                K_SEND => self.on_send_cqe(idx, res, flags, out),
                K_RECV => self.on_recv_cqe(res, flags, out),
                K_BELL => {
                    self.bell_armed = false;
                    if self.bell_futex.is_some() {
                        // 0: woken; -EAGAIN: the word had moved on before the wait
                        // began (rung in between). Either way a ring to look at.
                        // -ECANCELED: cancelled at shutdown.
                        if res < 0 && res != -libc::EAGAIN && res != -libc::ECANCELED {
                            // Not expected once the probe passed; don't spin on it.
                            tracing::warn!(
                                "futex doorbell wait failed ({}); using the eventfd",
                                io::Error::from_raw_os_error(-res)
                            );
                            self.bell_futex = None;
                        }
                    } else if let Some(fd) = self.bell_fd {
                        // Drain the counter so the next poll waits for a new ring.
                        // SAFETY: the constructor's caller keeps the doorbell fd open.
                        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                        let _ = rustix::io::read(bfd, &mut *self.bell_buf_bytes());
                    }
                    out.push(Event::Doorbell);
                }
                K_TIMER => {
                    self.timer_armed = None;
                    // -ETIME is expiry; -ECANCELED/-ENOENT are removals.
                    if res == -libc::ETIME {
                        self.timer_fired = true;
                    }
                }
                _ => {}
            }
        }
        self.refill();
    }

    /// The end of a wait: the timer's event, counts, a multishot receive re-armed.
    fn after_wait(&mut self, start: usize, block: bool, out: &mut Vec<Event>) -> io::Result<()> {
        if self.timer_fired {
            self.timer_fired = false;
            out.push(Event::Timer);
        }
        let woke = &out[start..];
        if woke.iter().any(|e| matches!(e, Event::Timer)) {
            self.stats.timers_fired += 1;
        }
        if block {
            self.stats.wakes.count(woke);
        }
        // Re-arm a multishot that ended, if buffers are available.
        self.arm_recv()?;
        Ok(())
    }
}

impl SendSlot {
    /// Points the slot's msghdr at its address, its first `n` iovecs and, for a
    /// GSO batch, its `UDP_SEGMENT` cmsg; marks it in flight for `token`.
    fn prepare(
        &mut self,
        dst: SocketAddr,
        family: sys::Family,
        n: usize,
        gso: Option<u16>,
        token: u64,
    ) {
        let (addr, len) = sys::RawAddr::new(dst, family);
        self.addr = addr;
        self.msg.msg_name = self.addr.as_mut_ptr();
        self.msg.msg_namelen = len;
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n as _;
        if let Some(g) = gso {
            self.ctrl = GsoCmsg::new(g);
            self.msg.msg_control = (&mut self.ctrl as *mut GsoCmsg).cast();
            self.msg.msg_controllen = size_of::<GsoCmsg>() as _;
        } else {
            self.msg.msg_control = std::ptr::null_mut();
            self.msg.msg_controllen = 0;
        }
        self.token = token;
        self.copied = false;
        self.res = Ok(0);
        self.state = SlotState::InFlight {
            result: false,
            notif: false,
        };
    }
}

impl UringIo {
    /// Copies the segments' headers into free slot `i`'s part of the header arena
    /// and fills its iovecs with [header, payload pieces] per segment. Returns the
    /// iovecs used and the bytes they carry.
    fn gather(&mut self, i: usize, segs: &[Segment<'_>]) -> Result<(usize, usize), SendError> {
        let hdr_base = self.tx.header_slot(i).ok_or(SendError::Busy)?;
        let mut n = 0;
        let mut bytes = 0usize;
        for (k, s) in segs.iter().enumerate() {
            let h = hdr_base.wrapping_add(k * crate::io::MAX_HDR);
            // SAFETY: `h` is inside this slot's part of the header arena (MAX_SEGS
            // headers of MAX_HDR bytes, checked by `header_slot` and `gso_size`); the
            // slot is free so the kernel no longer reads it.
            unsafe { std::ptr::copy_nonoverlapping(s.hdr.as_ptr(), h, s.hdr.len()) };
            if n + 1 + s.pieces().count() > MAX_IOV {
                return Err(SendError::BadBatch);
            }
            self.slots[i].iov[n] = libc::iovec {
                iov_base: h.cast(),
                iov_len: s.hdr.len(),
            };
            n += 1;
            for (off, len) in s.pieces() {
                let p = self.tx.payload(off, len).ok_or(SendError::OutOfPool)?;
                self.slots[i].iov[n] = libc::iovec {
                    iov_base: p.cast(),
                    iov_len: len as usize,
                };
                n += 1;
            }
            bytes += s.wire_len();
        }
        Ok((n, bytes))
    }

    /// The submission for prepared slot `i`: `SENDMSG_ZC` (from the fixed buffer
    /// where registered) with `zc`, else a plain `SENDMSG`; on the send worker when
    /// it runs.
    fn send_entry(&mut self, i: usize, zc: bool) -> squeue::Entry {
        let fd = types::Fd(self.sock.as_raw_fd());
        let msg = &self.slots[i].msg;
        let e = if zc {
            let mut op = opcode::SendMsgZc::new(fd, msg);
            if self.setup.zc_report_usage {
                op = op.ioprio(SEND_ZC_REPORT_USAGE);
            }
            if self.setup.fixed_tx {
                op = op.buf_index(Some(0));
            }
            op.build()
        } else {
            // The kernel copies inside sendmsg: one completion, memory free after it.
            self.stats.copy_sends += 1;
            opcode::SendMsg::new(fd, msg).build()
        }
        .user_data((K_SEND << KIND_SHIFT) | i as u64);
        if self.setup.send_worker {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        }
    }
}

impl UringIo {
    /// skb fragments a zero-copy send of `segs` takes: one per header, one per page
    /// each payload piece touches.
    fn frags(&self, segs: &[Segment<'_>]) -> usize {
        let mut frags = 0;
        for s in segs {
            frags += 1;
            for (off, len) in s.pieces() {
                let addr = self.tx.base + self.tx.pool_off + off as usize;
                frags += (addr + len as usize - 1) / 4096 - addr / 4096 + 1;
            }
        }
        frags
    }
}

impl DatagramIo for UringIo {
    fn send(&mut self, dst: SocketAddr, segs: &[Segment<'_>], token: u64) -> Result<(), SendError> {
        let gso = gso_size(segs)?;
        if self.tx_reg_pending && segs.iter().any(|s| s.pieces().next().is_some()) {
            self.tx_reg_pending = false;
            // SAFETY: the constructor's caller guarantees the TX range stays mapped
            // for our lifetime; the ring (and with it the registration) is dropped
            // with us. Sends already in flight keep their plain iovecs.
            self.setup.fixed_tx = unsafe { register_tx(&self.ring, &self.tx) };
        }
        let i = *self.free_slots.last().ok_or(SendError::Busy)? as usize;
        let (n, bytes) = self.gather(i, segs)?;
        self.free_slots.pop();
        self.slots[i].prepare(dst, self.family, n, gso, token);
        // A datagram with more fragments than the kernel takes zero-copy (a packet
        // over many tiny extents) goes as a copying send rather than not at all.
        // `fit` keeps every batch of two or more within the budget, so only a
        // lone datagram needs counting here.
        let zc = self.zc_active && (segs.len() > 1 || self.frags(segs) <= self.max_frags);
        let e = self.send_entry(i, zc);
        self.in_flight += 1;
        self.stats.sends += 1;
        self.stats.datagrams_sent += segs.len() as u64;
        self.stats.bytes_sent += bytes as u64;
        if self.push(e).is_err() {
            // Could not even queue it: report a failed send right away.
            let s = &mut self.slots[i];
            s.res = Err(libc::EAGAIN);
            s.state = SlotState::InFlight {
                result: true,
                notif: true,
            };
            let mut tmp = Vec::new();
            self.complete_slot(i, &mut tmp);
            return Err(SendError::Busy);
        }
        Ok(())
    }

    /// A zero-copy send turns every iovec into at least one skb fragment (payloads
    /// one per page they touch, headers one each), and the kernel refuses a datagram
    /// with more than `MAX_SKB_FRAGS` (`EMSGSIZE`): batches are cut to that budget.
    fn fit(&self, segs: &[Segment<'_>]) -> usize {
        let n = crate::io::fit_gso(segs);
        if self.gso_off {
            return n.min(1);
        }
        if !self.zc_active {
            return n;
        }
        let mut frags = 0;
        for (k, s) in segs[..n].iter().enumerate() {
            frags += self.frags(std::slice::from_ref(s));
            if frags > self.max_frags {
                return k.max(1);
            }
        }
        n
    }

    fn return_rx(&mut self, bid: u16) {
        // Only a buffer that is out (handed over by a completion) can come back; a
        // double return would put one buffer in the ring twice. A cut buffer with
        // entries still in the ring comes out again with them (and is returned
        // again after): free only once none is left there.
        if self.handed.take_back(bid) && self.left.get(usize::from(bid)) == Some(&0) {
            self.rx_stash.push(bid);
            self.refill();
        }
    }

    fn rx_bytes(&self, bid: u16, off: u32, len: u32) -> Option<&[u8]> {
        self.handed.bytes(bid, off, len)
    }

    fn rx_bytes_mut(&mut self, bid: u16, off: u32, len: u32) -> Option<&mut [u8]> {
        self.handed.bytes_mut(bid, off, len)
    }

    fn doorbell_mode(&self) -> WaitMode {
        if self.bell_futex.is_some() {
            WaitMode::Futex
        } else {
            WaitMode::Eventfd
        }
    }

    fn arm_doorbell(&mut self, futex_seq: u32) {
        if self.bell_armed {
            return;
        }
        if let Some(word) = &self.bell_futex {
            // Sleeps while the word still reads `futex_seq` (read before the core
            // armed the need-wakeup bits, so a ring after that read moves it and
            // the wait ends at once). A shared futex: kshim is another process. The
            // kernel reads the word when the wait is armed; `bell_futex` holds its
            // mapping for the life of `self`, and the ring with the wait goes first.
            let e = opcode::FutexWait::new(
                word.get().as_ptr().cast_const(),
                u64::from(futex_seq),
                u64::from(FUTEX_BITSET_MATCH_ANY),
                FUTEX2_SIZE_U32,
            )
            .build()
            .user_data(K_BELL << KIND_SHIFT);
            if self.push(e).is_ok() {
                self.bell_armed = true;
            }
            return;
        }
        let Some(fd) = self.bell_fd else { return };
        // A poll, not a read: kshim's eventfds are non-blocking, and io_uring answers
        // a read of an empty non-blocking eventfd with EAGAIN instead of waiting.
        let e = poll_in(fd, K_BELL << KIND_SHIFT);
        if self.push(e).is_ok() {
            self.bell_armed = true;
        }
    }

    fn wait(
        &mut self,
        deadline: Option<Instant>,
        block: bool,
        out: &mut Vec<Event>,
    ) -> io::Result<()> {
        let start = out.len();
        if self.starved && self.rx_free > 0 {
            self.starved = false;
        }
        self.trim();
        self.arm_recv()?;
        if let Some(d) = deadline {
            if d <= Instant::now() {
                out.push(Event::Timer);
            } else {
                self.arm_timer(d)?;
            }
        }
        // A non-blocking pass still runs deferred task work (GETEVENTS with min 0).
        let want = usize::from(block && out.len() == start && self.ring.completion().is_empty());
        let sq_len = self.ring.submission().len() as u32;
        // With deferred task work the kernel flags pending work in the SQ ring
        // (TASKRUN_FLAG): a pass with nothing to submit, nothing to wait for and
        // nothing flagged would enter for nothing — a spinning core polls the flag
        // and the CQ ring instead of making a system call per pass.
        if want == 0 && sq_len == 0 && self.setup.defer_taskrun && !self.ring.submission().taskrun()
        {
            self.reap(out);
            return self.after_wait(start, block, out);
        }
        let flags = io_uring::EnterFlags::GETEVENTS.bits();
        self.stats.enters += 1;
        let gathered = match (want, self.gather, deadline) {
            (1, Some(g), Some(d)) => {
                // Never past the deadline: a timer due sooner cuts the gathering
                // short. The wait's own timeout only bounds it after that (without
                // one the kernel ends the wait when the minimum wait runs out,
                // whatever came); the armed timeout SQE is what ends it at the
                // deadline.
                let left = d.saturating_duration_since(Instant::now());
                let within = u32::try_from(g.within.min(left).as_micros()).unwrap_or(u32::MAX);
                (within > 0).then(|| {
                    let bound = left + GATHER_SLACK;
                    (g.events, within, bound)
                })
            }
            _ => None,
        };
        let res = match gathered {
            Some((events, within, bound)) => {
                self.stats.gathered_waits += 1;
                let ts = types::Timespec::from(bound);
                let args = types::SubmitArgs::new().min_wait_usec(within).timespec(&ts);
                self.ring
                    .submitter()
                    .submit_with_args(events as usize, &args)
            }
            // SAFETY: plain io_uring_enter on our ring with no extra argument.
            None => unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(sq_len, want as u32, flags, None)
            },
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::ETIME)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        self.after_wait(start, block, out)
    }

    fn stats(&self) -> IoStats {
        self.stats
    }

    fn sends_in_flight(&self) -> usize {
        self.in_flight
    }

    fn rx_free(&self) -> usize {
        self.free_bufs()
    }

    fn rx_count(&self) -> usize {
        usize::from(self.rx.count)
    }

    fn rx_per_buf(&self) -> Option<f64> {
        (!self.whole).then_some(f64::from(self.slices))
    }

    fn path_name(&self) -> &'static str {
        "io_uring"
    }

    fn can_gather(&self) -> bool {
        self.setup.min_wait
    }

    fn set_gather(&mut self, gather: Option<Gather>) {
        self.gather = gather.filter(|_| self.setup.min_wait);
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // Cancel what is armed and wait for in-flight sends (their memory must stay
        // put until the kernel lets go), then the ring is dropped with the rest.
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(0);
        let _ = self.push(e);
        let mut sink = Vec::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while (self.in_flight > 0
            || self.recv_armed
            || self.bell_armed
            || self.timer_armed.is_some())
            && Instant::now() < deadline
        {
            self.recv_armed = false;
            let _ = self.ring.submit_and_wait(0);
            let sq_len = self.ring.submission().len() as u32;
            // SAFETY: plain io_uring_enter on our ring.
            let _ = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    sq_len,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            self.reap(&mut sink);
            if self.in_flight > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.bell_armed = false;
            self.timer_armed = None;
        }
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
    }
}

fn bytemuck_u64(v: &mut u64) -> &mut [u8; 8] {
    // SAFETY: u64 and [u8; 8] have the same size, and every bit pattern is valid for
    // both; alignment of [u8; 8] (1) is weaker than u64's.
    unsafe { &mut *(v as *mut u64).cast::<[u8; 8]>() }
}

impl sys::Build for UringIo {
    type Opts = UringOpts;

    /// Builds the reactor I/O for one core around `sock`.
    ///
    /// # Safety
    /// `tx` and `rx` must describe mapped, writable memory that stays mapped for the
    /// whole life of the returned value; the kernel reads TX memory during sends and
    /// writes RX buffers while they are in the provided-buffer ring. RX buffers must
    /// not be touched by anyone while the kernel owns them (from `build`/`return_rx`
    /// until a `Recv` event hands them out).
    unsafe fn build(
        sock: OwnedFd,
        tx: TxMem,
        rx: RxPool,
        bell_fd: Option<RawFd>,
        opts: UringOpts,
    ) -> io::Result<Self> {
        let (ring, mut setup) = build_ring(opts.entries, opts.defer_taskrun)?;
        setup.zc_report_usage = opts.zc != ZcMode::Never && zc_report_usage_supported();
        setup.min_wait = ring.params().is_feature_min_timeout();
        tx.check_send_slots(opts.send_slots)?;
        setup.fixed_tx = false;
        let slots = send_slots(opts.send_slots);
        let count = rx.count;
        if count == 0 {
            return Err(io::Error::other("RX pool has no buffers"));
        }
        // Cut only where at least two entries fit a buffer.
        let slices = match opts.rx_slice {
            0 => 1,
            s => (rx.buf_size / s).min(u32::from(u16::MAX)) as u16,
        };
        let whole = slices < 2;
        let (bufring, entries) =
            provided_buffer_ring(&ring, RING_FILL * usize::from(slices.max(1)))?;
        // SAFETY: msghdr is plain old data; zero is a valid empty value.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        // The name length is fixed for the whole multishot receive: room for the
        // larger (IPv6) address, whichever family the socket is.
        recv_hdr.msg_namelen = sys::RAW_ADDR_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = sys::RECV_CMSG_SPACE as _;

        let family = sys::socket_family(sock.as_raw_fd())?;
        let mut me = UringIo {
            ring,
            family,
            sock,
            setup,
            tx,
            slots,
            free_slots: (0..opts.send_slots as u16).rev().collect(),
            in_flight: 0,
            rx,
            bufring,
            bufring_mask: entries - 1,
            bufring_tail: 0,
            rx_free: 0,
            ring_bufs: 0,
            // Taken from the top: buffer 0 first. None touched yet, so all cold.
            rx_stash: (0..count).rev().collect(),
            rx_slice: opts.rx_slice,
            slices: slices.max(1),
            whole: true,
            may_slice: !whole,
            singles: 0,
            kslot: vec![(0, 0, 0); usize::from(entries)],
            left: vec![0; usize::from(count)],
            stash_cold: usize::from(count),
            use_peak: 0,
            trim_at: Some(Instant::now() + TRIM_EVERY),
            recv_hdr,
            recv_armed: false,
            starved: false,
            bell_fd,
            bell_futex: None,
            bell_buf: Box::new(0),
            bell_armed: false,
            timer_ts: Box::new(types::Timespec::new()),
            timer_armed: None,
            timer_fired: false,
            gather: None,
            epoch: Instant::now(),
            epoch_mono: monotonic_now(),
            stats: IoStats::default(),
            max_frags: max_skb_frags(),
            // SAFETY: `rx` stays mapped while we live (our constructor's contract).
            handed: unsafe { sys::Lent::new(rx) },
            zc_mode: opts.zc,
            zc_active: opts.zc != ZcMode::Never,
            gso_off: false,
            zc_copied_streak: 0,
            tx_reg_pending: opts.fixed_tx,
            _kept: None,
        };
        me.refill();
        if me.may_slice {
            let per = usize::from(me.slices);
            let dgram = me.rx_slice.saturating_sub(
                RECVMSG_OUT_LEN + sys::RAW_ADDR_LEN as u32 + sys::RECV_CMSG_SPACE as u32,
            ) as usize;
            tracing::info!(
                "RX: {count} buffers of {} KiB from kshim: whole buffers until {SLICE_AFTER} \
                 full-size datagrams came one by one (no GRO on the path), then {per} receives \
                 of {} bytes per buffer: room for {} datagrams ({} MB) waiting behind holes. \
                 The engine's config has no path rate or RTT: kshim sizes the pool for the \
                 path (lu2k-kshim --path-rate-mbps/--path-rtt-ms, 3 x rate x RTT)",
                me.rx.buf_size >> 10,
                me.rx_slice,
                usize::from(count) * per,
                usize::from(count) * per * dgram / 1_000_000
            );
        }
        // Sends on the worker only where the ring's io-wq can be held to one unbounded
        // worker: then they leave in submission order.
        me.setup.send_worker = opts.send_worker
            && me
                .ring
                .submitter()
                .register_iowq_max_workers(&mut [1u32, 1u32])
                .is_ok();
        Ok(me)
    }

    fn keep(&mut self, kept: sys::Kept) {
        self._kept = Some(kept);
    }
}
