//! One core's loop, written once for every transport.
//!
//! A shard is one ring set of kshim's region, the core thread that serves it, and
//! the transport that carries its messages ([`crate::transport::Transport`]). Each
//! pass of [`Shard::step`]:
//!
//! 1. **take**: TX descriptors in batches, each validated and entered in the message
//!    ledger ([`ring::RingSide::accept`]) and handed to the transport; buffer returns
//!    handed back to it;
//! 2. **transmit**: the transport sends what is due;
//! 3. **wait**: without blocking while there is work; after a spin of no work
//!    ([`spin`]) arm kshim's doorbell through ring-abi's need-wakeup protocol and
//!    sleep in the transport's I/O until a doorbell, a datagram, a completion or the
//!    transport's next timer;
//! 4. **events**: the transport's timers run, and what it reports becomes TX
//!    completions, RX descriptors and peer notices;
//! 5. **drain** (SIGTERM): new messages are answered `Shutdown`, in-flight ones
//!    get the drain timeout and are then failed back `Shutdown`, RX buffers are
//!    awaited; then the transport closes and the loop ends.
//! 6. **abandon** (kshim gone, [`Shard::with_kshim_gone`]): nobody reads the
//!    region any more, so the core takes nothing from it, fails every message back
//!    at once, closes its connections (peers see the shutdown and resend what was
//!    not acknowledged) so that nothing more is received or acknowledged into the
//!    dead region, and ends as soon as no send references TX memory.
//!
//! Every message ends exactly one way: `Ok`, or a failure status.
//!
//! The loop reads time only from the transport ([`Transport::now`]), so a transport
//! over a virtual-time I/O provider runs the whole shard on virtual time.

pub mod ring;
pub mod spin;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lu2k_ring_abi::doorbell::{WAKE_EVENTFD, WAKE_FUTEX};
use lu2k_ring_abi::{Net, Nid, TxStatus, WaitMode};

use crate::daemon::stats::{CoreStats, Published};
use crate::log::{DropLog, DROP_LOG_EVERY};
use crate::transport::{Event, Transport, Woken};
use ring::{Refusal, RingSide};
use spin::{Pass, Spin};

/// Descriptors taken per batch.
const TX_BATCH: u32 = 64;
/// How often a core publishes its statistics.
const STATS_EVERY: Duration = Duration::from_millis(100);
/// The longest sleep without a transport timer. A fixed instant, kept until it
/// passes: re-arming a new one each pass would update the armed timer, and an
/// update completes at once, ending the sleep.
const IDLE_WAKE: Duration = Duration::from_millis(200);
/// How often a draining core looks at its rings.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// What a core tells the daemon (forwarded to kshim as NOTICEs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The peer stopped answering for the peer-down timeout.
    PeerDown(Nid),
    /// The peer answers again.
    PeerUp(Nid),
}

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct Params {
    /// Core index.
    pub core: u32,
    /// The LNet network (`net` part of NIDs) this engine serves.
    pub net: Net,
    /// Spin before sleeping, at least (see [`spin`]).
    pub spin: Duration,
    /// Spin before sleeping, at most.
    pub spin_max: Duration,
    /// Message-header slots (= most messages in flight on this core).
    pub msg_slots: u32,
    /// How long shutdown waits for in-flight messages before failing them back.
    pub drain_timeout: Duration,
    /// How a sleeping core lets completions gather where its peers are far away
    /// (see [`spin::Spin::may_gather`]); `None`: it wakes for each.
    pub gather: Option<crate::io::Gather>,
}

/// Where a shard reports to: the daemon's stats slot, notices and drain flag.
#[derive(Debug, Clone)]
pub struct Links {
    /// The core's stats slot.
    pub published: Published,
    /// Peer notices for kshim.
    pub notices: Sender<Notice>,
    /// Set on SIGTERM or when kshim goes away.
    pub draining: Arc<AtomicBool>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The loop goes on; the transport's next timer is due then (if any).
    Running(Option<Instant>),
    /// Shutdown completed.
    Done,
}

/// One core: its ring side and its transport. See the module doc.
#[derive(Debug)]
pub struct Shard<T: Transport> {
    p: Params,
    ring: RingSide,
    t: T,
    links: Links,
    spin: Spin,
    idle_wake: Instant,
    /// When the last sleep ended: a spin starts there if it came later than the
    /// last work (a wake-up that brought nothing starts no new spin).
    woke_at: Instant,
    drain_deadline: Option<Instant>,
    last_stats: Instant,
    /// TX completions and RX descriptors as of the last publication.
    published_msgs: (u64, u64),
    /// Drops become one log line per interval, never one per packet.
    drop_log: DropLog,
    /// Peers whose first connection was logged.
    peers_seen: HashSet<String>,
    /// Set by the daemon when kshim closed the attach socket.
    kshim_gone: Option<Arc<AtomicBool>>,
    /// When an abandoning core stops waiting for its sends (set on abandon).
    abandon_deadline: Option<Instant>,
}

impl<T: Transport> Shard<T> {
    /// Assembles a shard.
    pub fn new(p: Params, ring: RingSide, t: T, links: Links) -> Shard<T> {
        let now = t.now();
        Shard {
            spin: Spin::new(p.spin, p.spin_max, now),
            p,
            ring,
            t,
            links,
            idle_wake: now,
            woke_at: now,
            drain_deadline: None,
            last_stats: now,
            published_msgs: (0, 0),
            drop_log: DropLog::new(DROP_LOG_EVERY),
            peers_seen: HashSet::new(),
            kshim_gone: None,
            abandon_deadline: None,
        }
    }

    /// The flag the daemon sets when kshim went away: the core then abandons the
    /// region at once instead of draining (see the module doc).
    pub fn with_kshim_gone(mut self, flag: Arc<AtomicBool>) -> Shard<T> {
        self.kshim_gone = Some(flag);
        self
    }

    /// The transport (for tests and stats).
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Runs until shutdown completes (or kshim's rings break).
    pub fn run(mut self) {
        tracing::info!("core {}: back-end {}", self.p.core, self.t.name());
        // What the core runs with is readable at once, before any traffic.
        self.publish_stats();
        while self.step() != Step::Done {}
    }

    /// One pass of the loop (see the module doc).
    pub fn step(&mut self) -> Step {
        self.ring.stats.passes += 1;
        if self
            .kshim_gone
            .as_ref()
            .is_some_and(|g| g.load(Ordering::Relaxed))
        {
            return self.abandon();
        }
        let draining = self.links.draining.load(Ordering::Relaxed);
        if draining && self.drain_deadline.is_none() {
            self.drain_deadline = Some(self.t.now() + self.p.drain_timeout);
        }
        let ring = self.take_tx(draining) | self.take_returns();
        let rx = self.flush_rx();
        let sent = self.t.poll_transmit();
        let work = ring | rx | sent;
        if self.drained() {
            self.t.close();
            self.ring.flush_notify();
            self.publish_stats();
            return Step::Done;
        }
        let idle = !work && self.spin.spun_out(self.t.now()) && !self.t.has_backlog();
        let woken = match self.wait(idle, work) {
            Ok(w) => w,
            Err(e) => {
                crate::log_every!(
                    error,
                    DROP_LOG_EVERY,
                    "core {}: I/O wait failed: {e}",
                    self.p.core
                );
                self.ring.stats.drop_one("io_error");
                Woken::default()
            }
        };
        if !woken.useful && !work && !idle {
            self.spin.relax();
        }
        self.t.handle_timeout();
        self.events();
        let now = self.t.now();
        if idle {
            self.woke_at = now;
        }
        self.spin.pass(
            now,
            Pass {
                arrived: ring || woken.arrived,
                busy: work || woken.useful,
                sent,
                handed: self.ring.owes_notify(),
            },
        );
        self.ring.flush_notify();
        let next = self.t.poll_timeout();
        if self.t.now() >= self.last_stats + STATS_EVERY || self.sleeps_on_news(next) {
            self.publish_stats();
        }
        Step::Running(next)
    }

    /// Whether messages completed or arrived since the last publication and the
    /// core may sleep past the next one (`next`: its next deadline): an idle
    /// core sleeps until its connections' keep-alives, a second or more, and
    /// what a transfer's last messages did would show that much later. Idle
    /// wakes that move no message publish nothing early.
    fn sleeps_on_news(&self, next: Option<Instant>) -> bool {
        let s = &self.ring.stats;
        (s.tx_completions, s.rx_descs) != self.published_msgs
            && next.is_none_or(|d| d >= self.last_stats + STATS_EVERY)
    }

    fn take_tx(&mut self, draining: bool) -> bool {
        let t = &mut self.t;
        let taken = self
            .ring
            .take_tx(TX_BATCH, |ring, d| match ring.accept(d, draining) {
                Ok(msg) => {
                    t.handle_send(msg);
                    true
                }
                Err(Refusal::Answered) => true,
                Err(Refusal::Full) => false,
            });
        taken > 0
    }

    fn take_returns(&mut self) -> bool {
        let t = &mut self.t;
        self.ring.take_returns(|bufs| t.handle_return(bufs))
    }

    fn flush_rx(&mut self) -> bool {
        let (back, any) = self.ring.flush_rx();
        if !back.is_empty() {
            self.t.handle_return(&back);
        }
        any
    }

    /// Whether a drain is complete: every message has its completion, no send
    /// references TX memory, and kshim gave back the RX buffers it holds (or the
    /// drain timeout passed, failing the rest back).
    fn drained(&mut self) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        let past = self.t.now() >= deadline;
        if past {
            self.t.handle_abort_all(TxStatus::Shutdown);
            self.events();
        }
        self.ring.in_flight() == 0 && self.t.sends_in_flight() == 0 && (self.ring.rx_home() || past)
    }

    /// One pass while kshim is gone. Acknowledging data into a region nobody reads
    /// would tell peers it was delivered, so the first pass fails every message
    /// back and closes every connection (a closed connection drops what arrives,
    /// unacknowledged); later passes only wait, a millisecond at a time, for the
    /// sends that still reference TX memory, at most the drain timeout.
    fn abandon(&mut self) -> Step {
        let now = self.t.now();
        if self.abandon_deadline.is_none() {
            self.abandon_deadline = Some(now + self.p.drain_timeout);
            self.t.handle_abort_all(TxStatus::Shutdown);
            self.t.close();
        }
        self.events();
        let past = self.abandon_deadline.is_some_and(|d| now >= d);
        if self.t.sends_in_flight() == 0 || past {
            self.publish_stats();
            return Step::Done;
        }
        if let Err(e) = self.t.wait(Some(now + DRAIN_POLL), true) {
            tracing::debug!("core {}: I/O wait while abandoning: {e}", self.p.core);
        }
        Step::Running(None)
    }

    fn wait(&mut self, idle: bool, work: bool) -> std::io::Result<Woken> {
        let deadline = self.t.poll_timeout();
        if self.drain_deadline.is_some() {
            let d = self.t.now() + DRAIN_POLL;
            return self.t.wait(Some(d), !work);
        }
        if !idle {
            return self.t.wait(deadline, false);
        }
        self.ring.flush_notify();
        self.ring.stats.sleeps += 1;
        let gather = self.p.gather.filter(|g| self.spin.may_gather(g.within));
        self.t.set_gather(gather);
        let now = self.t.now();
        let spun = now.saturating_duration_since(self.spin.last_work().max(self.woke_at));
        self.ring.stats.spin_us += spun.as_micros() as u64;
        if self.idle_wake <= now {
            self.idle_wake = now + IDLE_WAKE;
        }
        self.sleep(deadline.unwrap_or(self.idle_wake))
    }

    /// Sleeps until `wake` or until kshim rings, through the need-wakeup protocol:
    /// announce, re-check the rings, then sleep in the transport's I/O.
    fn sleep(&mut self, wake: Instant) -> std::io::Result<Woken> {
        let mode = self.t.doorbell_mode();
        let waiter = &self.ring.rings().wait;
        // Before the need-wakeup bits go up: a ring after this read moves the word,
        // and a futex wait on this value then ends at once.
        let futex_seq = waiter.futex_seq();
        waiter.arm(match mode {
            WaitMode::Eventfd => WAKE_EVENTFD,
            WaitMode::Futex => WAKE_FUTEX,
        });
        let r = if self.ring.has_work() {
            Ok(Woken {
                arrived: true,
                useful: true,
            })
        } else {
            self.t.arm_doorbell(futex_seq);
            self.t.wait(Some(wake), true)
        };
        self.ring.rings().wait.disarm();
        r
    }

    /// Turns what the transport reports into completions, RX descriptors and
    /// notices.
    fn events(&mut self) {
        while let Some(ev) = self.t.poll_event() {
            match ev {
                Event::Sent { id, status, detail } => self.ring.finish(id, status, detail),
                Event::Received { peer, pieces, bufs } => {
                    let back = self.ring.publish(peer, pieces, bufs);
                    if !back.is_empty() {
                        self.t.handle_return(&back);
                    }
                }
                Event::PeerDown(ip) => {
                    self.log_peer(ip, false);
                    self.notice(Notice::PeerDown(self.nid(ip)));
                }
                Event::PeerUp(ip) => {
                    self.log_peer(ip, true);
                    self.notice(Notice::PeerUp(self.nid(ip)));
                }
            }
        }
    }

    /// One line per peer state change, with the reason and what the transport
    /// knows of the peer. Peer events are rare (minutes apart at worst), so the
    /// transport's full counters are read here.
    fn log_peer(&mut self, ip: IpAddr, up: bool) {
        let nid = self.nid(ip).to_string();
        let mut s = CoreStats::default();
        self.t.stats(&mut s);
        let p = s.peers.iter().find(|p| p.nid == nid);
        let addr = p.map_or(String::new(), |p| format!(" at {}", p.addr));
        if up {
            self.peers_seen.insert(nid.clone());
            tracing::info!(
                core = self.p.core,
                "peer {nid}{addr} up: it answers again (handshake completed); kshim is told"
            );
            return;
        }
        let last = p
            .and_then(|p| p.last_error.as_deref())
            .map_or(String::new(), |e| format!("; last kernel error: {e}"));
        tracing::warn!(
            core = self.p.core,
            "peer {nid}{addr} down: no answer within the peer-down timeout while \
             messages waited, or its connection timed out{last}; its messages fail back \
             PeerUnreachable and kshim is told"
        );
    }

    /// Logs what the counters show that happens too often for a line each:
    /// peers connecting for the first time, and drops (summarised per interval).
    fn log_counters(&mut self, s: &CoreStats) {
        for p in &s.peers {
            if p.up && !self.peers_seen.contains(&p.nid) {
                self.peers_seen.insert(p.nid.clone());
                tracing::info!(
                    core = self.p.core,
                    "peer {} at {} up: connected (RTT {} µs)",
                    p.nid,
                    p.addr,
                    p.rtt_us
                );
            }
        }
        if let Some(line) = self.drop_log.line(self.t.now(), &s.drops) {
            tracing::warn!("core {}: {line}", self.p.core);
        }
    }

    fn nid(&self, ip: IpAddr) -> Nid {
        Nid::from_net_addr(self.p.net, ip)
    }

    fn notice(&self, n: Notice) {
        let _ = self.links.notices.send(n);
    }

    fn publish_stats(&mut self) {
        self.last_stats = self.t.now();
        self.published_msgs = (self.ring.stats.tx_completions, self.ring.stats.rx_descs);
        let mut s = self.ring.stats.clone();
        self.ring.pool_use(&mut s);
        self.t.stats(&mut s);
        // Whether a peer's answer can come within a spin (see `spin`).
        let rtt = s
            .peers
            .iter()
            .filter(|p| p.up && p.rtt_us > 0)
            .map(|p| p.rtt_us)
            .min();
        self.spin.set_net_rtt(rtt.map(Duration::from_micros));
        self.log_counters(&s);
        if let Ok(mut g) = self.links.published.lock() {
            *g = s;
        }
    }
}
