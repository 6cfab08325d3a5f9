//! The link model on a real clock: a rootless UDP relay.
//!
//! A [`Relay`] owns two UDP sockets, side A and side B, and one [`Duplex`]
//! model. A datagram that arrives on A crosses the forward link and leaves
//! from B towards B's peer; one that arrives on B crosses the reverse link and
//! leaves from A towards A's peer. A peer is either configured or learned: the
//! source address of the latest datagram received on that side. A UDP
//! application on side A sends to [`Relay::a_addr`] instead of to its real
//! peer, and the peer on side B sees the relay's [`Relay::b_addr`] as its
//! correspondent.
//!
//! Virtual time is the time since [`Relay::epoch`], read from the monotonic
//! clock; outages in the configuration count from it. A datagram is stamped
//! when the relay reads it from its socket, and sent when its model delivery
//! time has come.
//!
//! # Timing
//!
//! One thread runs a poll loop over both sides. It sleeps in `poll(2)` until
//! the next delivery or the next arriving datagram, whichever comes first;
//! the thread's timer slack is set to 1 ns, so the kernel wakes it on the
//! deadline rather than up to 50 µs later. Where permitted it runs under
//! `SCHED_FIFO` ([`RelayConfig::realtime_priority`]): on a loaded machine an
//! ordinary thread is routinely late by milliseconds. It can also stop
//! sleeping [`RelayConfig::spin`] before a deadline and poll without sleeping
//! until it; by default it does not, because a real-time thread that spins
//! most of the time is throttled by the kernel (for 50 ms of every second)
//! and wakeups are already precise to tens of microseconds. Whatever is due
//! is sent at once, so a late wakeup is caught up in one batch. How late each
//! send was is measured ([`RelayStats::late_max`], [`RelayStats::late_total`]);
//! datagrams are never sent early. Loopback transit and the reading lag add a
//! few microseconds to what the model says; the self-tests in `tests/relay.rs`
//! measure the whole path (on this 2-core machine under a parallel build:
//! mean lateness 30–140 µs, max under 1 ms; p99 of delay − setting about
//! 0.45 ms at 76 Mbit/s offered into 100 Mbit/s; rate exact to 0.01 % at 100
//! and at 500 Mbit/s).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::config::{ConfigError, DuplexConfig};
use crate::duplex::{Direction, Duplex};
use crate::link::Stats;
use crate::time::Instant;

/// Where a relay listens and sends, and the link it emulates.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The link: `forward` is A → B, `reverse` is B → A.
    pub link: DuplexConfig,
    /// Seed of the model's random streams.
    pub seed: u64,
    /// Address side A's socket binds to (port 0 picks a free port); IPv4 or
    /// IPv6 (each side's socket is of its bind address's family).
    pub a_bind: SocketAddr,
    /// Address side B's socket binds to.
    pub b_bind: SocketAddr,
    /// Where reverse traffic goes; `None` learns it from datagrams arriving on A.
    pub a_peer: Option<SocketAddr>,
    /// Where forward traffic goes; `None` learns it from datagrams arriving on B.
    pub b_peer: Option<SocketAddr>,
    /// How long before a deadline the loop stops sleeping and spins (polls
    /// without sleeping); zero by default, see the [module docs](self).
    pub spin: Duration,
    /// Run the relay thread under `SCHED_FIFO` at this priority, if the
    /// process may (see [`set_realtime`](crate::set_realtime)); where it may
    /// not, the relay runs anyway and [`Relay::is_realtime`] says so.
    pub realtime_priority: Option<u8>,
}

impl RelayConfig {
    /// Both sides on free loopback ports, both peers learned, no spin,
    /// real-time priority 40 where permitted.
    pub fn loopback(link: DuplexConfig, seed: u64) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        RelayConfig {
            link,
            seed,
            a_bind: any,
            b_bind: any,
            a_peer: None,
            b_peer: None,
            spin: Duration::ZERO,
            realtime_priority: Some(40),
        }
    }

    /// [`RelayConfig::loopback`] on the IPv6 loopback address (`::1`): the
    /// relay's sockets are `AF_INET6`, as for any IPv6 bind address.
    pub fn loopback_v6(link: DuplexConfig, seed: u64) -> Self {
        let any = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
        RelayConfig {
            a_bind: any,
            b_bind: any,
            ..RelayConfig::loopback(link, seed)
        }
    }
}

/// What a relay has done: the model's counters per direction, and the I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// The forward (A → B) model's counters.
    pub forward: Stats,
    /// The reverse (B → A) model's counters.
    pub reverse: Stats,
    /// Datagrams written out (to a socket or a TUN device).
    pub sent: u64,
    /// Datagrams due for delivery while the destination peer was still
    /// unknown (nothing had arrived on that side yet); not sent.
    pub unroutable: u64,
    /// Datagrams whose send failed (buffer full, ICMP error); not sent.
    pub send_errors: u64,
    /// The latest any send was after its model deadline.
    pub late_max: Duration,
    /// Sum of all sends' lateness (divide by `sent` for the mean).
    pub late_total: Duration,
}

/// Why a relay could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A link setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket or device could not be set up, or polling failed.
    #[error("link emulator I/O: {0}")]
    Io(#[from] io::Error),
    /// Setting up a TUN device or network namespace failed.
    #[error("link emulator setup: {0}")]
    Setup(String),
    /// The relay thread panicked.
    #[error("relay thread panicked")]
    Panicked,
}

/// A running relay. Dropping it stops the thread; [`Relay::stop`] also
/// returns the final counters.
#[derive(Debug)]
pub struct Relay {
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    driver: Driver,
}

/// Longest sleep between checks of the stop flag.
const MAX_IDLE: Duration = Duration::from_millis(20);
/// Datagrams read from one side before deliveries are looked at again.
const RECV_BATCH: usize = 64;
/// Socket buffers asked for (the kernel may cap them at rmem_max/wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

impl Relay {
    /// Binds both sockets and starts the relay thread. Virtual time zero
    /// ([`Relay::epoch`]) is taken here.
    pub fn spawn(config: RelayConfig) -> Result<Relay, RelayError> {
        let duplex = Duplex::new(config.link.clone(), config.seed)?;
        let a = UdpSocket::bind(config.a_bind)?;
        let b = UdpSocket::bind(config.b_bind)?;
        for s in [&a, &b] {
            s.set_nonblocking(true)?;
            // Best effort: a small buffer only costs drops under bursts, which
            // the counters show.
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size(s, SOCKET_BUFFER);
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, SOCKET_BUFFER);
        }
        let (a_addr, b_addr) = (a.local_addr()?, b.local_addr()?);
        let a = UdpPort {
            socket: a,
            peer: config.a_peer,
            learn: config.a_peer.is_none(),
        };
        let b = UdpPort {
            socket: b,
            peer: config.b_peer,
            learn: config.b_peer.is_none(),
        };
        let driver = Driver::spawn(duplex, a, b, config.spin, config.realtime_priority)?;
        Ok(Relay {
            a_addr,
            b_addr,
            driver,
        })
    }

    /// Side A's socket address: side A's application sends here.
    pub fn a_addr(&self) -> SocketAddr {
        self.a_addr
    }

    /// Side B's socket address: side B's application sends here.
    pub fn b_addr(&self) -> SocketAddr {
        self.b_addr
    }

    /// Whether the relay thread runs under real-time scheduling (see
    /// [`RelayConfig::realtime_priority`]). Without it, other load on the
    /// machine can make sends late by milliseconds.
    pub fn is_realtime(&self) -> bool {
        self.driver.realtime
    }

    /// The instant virtual time zero corresponds to.
    pub fn epoch(&self) -> std::time::Instant {
        self.driver.epoch
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        self.driver.stats()
    }

    /// Stops the thread (datagrams still in flight are discarded) and returns
    /// the final counters.
    pub fn stop(mut self) -> Result<RelayStats, RelayError> {
        self.driver.shutdown()?;
        Ok(self.driver.stats())
    }
}

/// One side of an emulator: where datagrams come in and go out.
pub(crate) trait Port: AsFd + Send + 'static {
    /// Reads one datagram into `buf`; `None` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one datagram; `false` when there is nowhere to send it yet.
    fn send(&mut self, packet: &[u8]) -> io::Result<bool>;
}

/// A UDP socket whose peer is configured or learned.
struct UdpPort {
    socket: UdpSocket,
    peer: Option<SocketAddr>,
    learn: bool,
}

impl AsFd for UdpPort {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Port for UdpPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.socket.recv_from(buf) {
                Ok((n, from)) => {
                    if self.learn {
                        self.peer = Some(from);
                    }
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                // An ICMP error from an earlier send to this side's peer, or a signal.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, packet: &[u8]) -> io::Result<bool> {
        match self.peer {
            Some(peer) => self.socket.send_to(packet, peer).map(|_| true),
            None => Ok(false),
        }
    }
}

/// The thread that runs a [`Duplex`] between two ports on the real clock,
/// and its controls.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) epoch: std::time::Instant,
    pub(crate) realtime: bool,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<RelayStats>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Driver {
    /// Starts the thread; virtual time zero is now.
    pub(crate) fn spawn<P: Port>(
        duplex: Duplex<Vec<u8>>,
        a: P,
        b: P,
        spin: Duration,
        priority: Option<u8>,
    ) -> io::Result<Driver> {
        let epoch = std::time::Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let mut worker = Worker {
            duplex,
            a,
            b,
            spin,
            epoch,
            stop: stop.clone(),
            shared: stats.clone(),
            stats: RelayStats::default(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("linkem".into())
            .spawn(move || {
                let realtime = priority.is_some_and(|p| crate::set_realtime(p).is_ok());
                let _ = tx.send(realtime);
                worker.run()
            })?;
        let realtime = rx.recv().unwrap_or(false);
        Ok(Driver {
            epoch,
            realtime,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    pub(crate) fn stats(&self) -> RelayStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn shutdown(&mut self) -> Result<(), RelayError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| RelayError::Panicked)?
                .map_err(Into::into),
            None => Ok(()),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Worker<P> {
    duplex: Duplex<Vec<u8>>,
    a: P,
    b: P,
    spin: Duration,
    epoch: std::time::Instant,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<RelayStats>>,
    stats: RelayStats,
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

impl<P: Port> Worker<P> {
    fn now(&self) -> Instant {
        Instant::from_duration(self.epoch.elapsed())
    }

    fn run(&mut self) -> io::Result<()> {
        // Wake from poll(2) on the nanosecond asked for, not 50 µs later.
        let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
        let mut buf = vec![0u8; 65_536];
        // Which sides poll(2) last found readable; read both at first.
        let mut readable = [true, true];
        while !self.stop.load(Ordering::Relaxed) {
            let mut busy = self.deliver();
            if readable[0] {
                busy |= self.receive(Direction::Forward, &mut buf)?;
            }
            if readable[1] {
                busy |= self.receive(Direction::Reverse, &mut buf)?;
            }
            if busy {
                self.publish();
            }
            // Sleep until shortly before the next deadline or until a
            // datagram arrives; spin (poll without sleeping) in between.
            let now = self.now();
            let wait = match self.duplex.poll_deadline() {
                Some(due) if due <= now => Duration::ZERO,
                Some(due) => (due - now).saturating_sub(self.spin).min(MAX_IDLE),
                None => MAX_IDLE,
            };
            let mut fds = [
                PollFd::new(&self.a, PollFlags::IN),
                PollFd::new(&self.b, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, Some(&timespec(wait))) {
                Ok(_) => {
                    for (r, fd) in readable.iter_mut().zip(&fds) {
                        *r = !fd.revents().is_empty();
                    }
                }
                Err(rustix::io::Errno::INTR) => readable = [true, true],
                Err(e) => return Err(e.into()),
            }
        }
        self.publish();
        Ok(())
    }

    fn publish(&mut self) {
        self.stats.forward = *self.duplex.link(Direction::Forward).stats();
        self.stats.reverse = *self.duplex.link(Direction::Reverse).stats();
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = self.stats;
    }

    /// Sends every datagram that is due; true if any was.
    fn deliver(&mut self) -> bool {
        let mut any = false;
        loop {
            let now = self.now();
            let due = match self.duplex.poll_deadline() {
                Some(due) if due <= now => due,
                _ => return any,
            };
            let Some((dir, packet)) = self.duplex.poll_deliver(now) else {
                return any;
            };
            any = true;
            // Forward traffic leaves from side B, reverse from side A.
            let port = match dir {
                Direction::Forward => &mut self.b,
                Direction::Reverse => &mut self.a,
            };
            match port.send(&packet) {
                Ok(true) => {
                    let late = self.now() - due;
                    self.stats.sent += 1;
                    self.stats.late_total += late;
                    self.stats.late_max = self.stats.late_max.max(late);
                }
                Ok(false) => self.stats.unroutable += 1,
                Err(_) => self.stats.send_errors += 1,
            }
        }
    }

    /// Reads up to a batch of datagrams arriving for direction `dir` into the
    /// model; true if any arrived.
    fn receive(&mut self, dir: Direction, buf: &mut [u8]) -> io::Result<bool> {
        let mut any = false;
        for _ in 0..RECV_BATCH {
            let port = match dir {
                Direction::Forward => &mut self.a,
                Direction::Reverse => &mut self.b,
            };
            let Some(n) = port.recv(buf)? else { break };
            any = true;
            let now = self.now();
            let _ = self.duplex.handle_datagram(now, dir, n, buf[..n].to_vec());
        }
        Ok(any)
    }
}
