//! Endpoints: the processes a contender's run is made of.
//!
//! The harness starts every endpoint as a child process of its own binary
//! (`lu2k-perf __node SPEC`, inside a network namespace where the path needs
//! it), so that the CPU time of a contender's own processes is measured
//! exactly (the children's `getrusage`), the harness and the link emulator are
//! not counted, and a stuck transport can be killed. A node talks to the
//! harness in lines on its stdout:
//!
//! - `listen ADDR` — a receiving node is ready at `ADDR`;
//! - `progress BYTES` — payload bytes received so far (every 50 ms);
//! - `result JSON` — the [`NodeResult`], last.
//!
//! What the nodes move, per workload: **bulk** — a byte stream (TCP, UDT4,
//! SRT) or 1 MiB LNet PUTs (lu2k) until `bytes` arrived or `max_duration_s`
//! passed; **rpc** — `count` requests of `size` bytes, each echoed back (lu2k:
//! a PUT answered by a PUT), each round trip timed by the client from before
//! the request is handed to the transport to when the whole reply is in; the
//! first round trip (connection warm-up) is not counted; **live** — chunks
//! of `chunk_bytes` (a frame each) at `stream_mbps` on a fixed schedule
//! ([`LiveSchedule`]): chunk *i* is due at the stream's start + *i* × the
//! chunk interval on the monotonic clock, carries that due time and its
//! index, and its delivery latency is when the receiver has all of it minus
//! when it was due — the same clock, on the same host; every contender
//! first sends one chunk outside the stream and waits until it is delivered
//! (a warm connection, as for rpc's first round trip), so a sender held back
//! by its transport (full window or buffer) counts too. Chunks still missing
//! when the receiver stops count at their age then (lower bounds; the note
//! says how many).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{setsockopt, sockopt};
use serde::{Deserialize, Serialize};

use crate::scenario::{Workload, WorkloadKind};

/// How a node transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// TCP with the congestion control named in [`NodeSpec::cc`].
    Tcp,
    /// UDT4 stream sockets.
    Udt4,
    /// srt-file-transmit (SRT in file mode).
    Srt,
    /// quinn (QUIC), settings in [`NodeSpec::quic`].
    Quic,
    /// kshim + engine.
    Lu2k,
}

/// Sender or receiver side (rpc: client or server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sends (bulk, live) or asks (rpc).
    Send,
    /// Receives (bulk, live) or answers (rpc).
    Recv,
}

/// lu2k endpoint settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lu2kSpec {
    /// This node's NID address (IPv4 or IPv6).
    pub ip: std::net::IpAddr,
    /// The address the engine binds: `ip`, or the wildcard address where the
    /// peer has several links (the kernel's route picks each link's source).
    pub bind: std::net::IpAddr,
    /// The engine's UDP port.
    pub port: u16,
    /// The other node's NID address.
    pub peer_ip: std::net::IpAddr,
    /// Where this engine sends to reach the peer (the relay), if not `peer_ip:port`.
    pub peer_addr: Option<std::net::SocketAddr>,
    /// The peer's links (`[[peer.link]]`) where it has several; then
    /// `peer_addr` is None.
    #[serde(default)]
    pub links: Vec<lu2k_engine::transport::links::LinkCfg>,
    /// How the engine uses `links`.
    #[serde(default)]
    pub policy: Option<lu2k_engine::transport::links::Policy>,
    /// Directory for the kshim and stats sockets.
    pub dir: PathBuf,
    /// Engine cores.
    pub cores: u16,
    /// kshim RX buffers (64 KiB each). A received datagram pins a buffer
    /// until its message is complete, so this bounds the packets a receiver
    /// can hold out of order; kshim's default (1024) is too few for a lossy
    /// long path (see the harness README).
    pub rx_bufs: u32,
    /// kshim's TX pool, bytes (`None`: kshim's default, 256 MiB). Every cell
    /// but `loopback`'s sizes it for the path as `lu2k-kshim` does
    /// (`lu2k_ring_abi::tx_pool::bytes_for_path`).
    #[serde(default)]
    pub tx_pool: Option<u64>,
    /// A pre-shared key file: the engines run the sealed wire.
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Forward error correction between the engines (`fec = "live"`).
    #[serde(default)]
    pub fec: bool,
    /// The engines' `max_rate_mbps` for their peer.
    #[serde(default)]
    pub max_rate_mbps: Option<f64>,
}

/// Everything a node needs, passed as JSON on its command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Transport.
    pub kind: Kind,
    /// Side.
    pub role: Role,
    /// The workload.
    pub workload: Workload,
    /// Receiver: where to listen; sender: where to connect.
    pub addr: SocketAddr,
    /// TCP congestion control (tcp only).
    pub cc: Option<String>,
    /// Socket / transport buffer to ask for, bytes (about 2 × BDP).
    pub buffer: usize,
    /// lu2k settings.
    pub lu2k: Option<Lu2kSpec>,
    /// The path, for contenders tuned to it ([`crate::tuning`]).
    #[serde(default)]
    pub path: crate::tuning::PathInfo,
    /// QUIC settings (quic only).
    #[serde(default)]
    pub quic: Option<crate::quic::QuicSpec>,
}

/// What a node reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeResult {
    /// Payload bytes received (receiver) or sent (sender).
    pub bytes: u64,
    /// Receiver: seconds from the first payload byte to the last.
    pub span_s: f64,
    /// Receiver: bytes of the first read (the `loopback` goodput leaves them
    /// out: it runs from the first read to the last).
    pub first_bytes: u64,
    /// Sender: the monotonic clock ([`mono_ns`]) just before the first
    /// payload byte was handed to the transport (live: the first chunk of the
    /// stream; the warm-up is not payload). No byte can be on the link
    /// earlier, so goodput measured from here cannot exceed the link's rate.
    #[serde(default)]
    pub first_send_ns: Option<u64>,
    /// Receiver: the monotonic clock when the last payload byte was read.
    #[serde(default)]
    pub last_recv_ns: Option<u64>,
    /// rpc round trips or live delivery latencies, microseconds.
    pub samples_us: Vec<f64>,
    /// Retransmitted bytes, where the transport tells.
    pub retrans_bytes: Option<u64>,
    /// Payload bytes lu2k copied (engine counters; lu2k only).
    pub copied_bytes: Option<u64>,
    /// Peak resident memory of the node, MiB: lu2k, the engine's (`VmHWM`)
    /// plus the node process's, which holds kshim; others, the node
    /// process's plus the largest program it ran (SRT's).
    #[serde(default)]
    pub max_rss_mib: Option<f64>,
    /// Extra facts for the report.
    pub note: Option<String>,
    /// The transport's settings as the node applied them (read back from
    /// the socket where the transport allows).
    #[serde(default)]
    pub tuning: Option<String>,
}

/// Monotonic clock in nanoseconds, the same in every process of this host.
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// `at` on the monotonic clock of [`mono_ns`] (std's `Instant` runs on the
/// same clock, but does not show its value).
pub fn mono_ns_at(at: Instant) -> u64 {
    mono_ns().saturating_sub(at.elapsed().as_nanos() as u64)
}

/// The live stream's schedule: chunk `i` is due at `start_ns + i × every_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSchedule {
    /// Nanoseconds between chunks (`chunk_bytes` at `stream_mbps`).
    pub every_ns: u64,
    /// Chunks in the stream (`duration_s` of it, rounded up).
    pub chunks: u64,
}

impl LiveSchedule {
    /// The schedule of a live workload.
    pub fn of(w: &Workload) -> LiveSchedule {
        let every_s = f64::from(w.chunk_bytes) * 8.0 / (w.stream_mbps * 1e6);
        LiveSchedule {
            every_ns: ((every_s * 1e9).round() as u64).max(1),
            chunks: ((w.duration_s / every_s).ceil() as u64).max(1),
        }
    }

    /// When chunk `i` is due, given the stream's start.
    pub fn due_ns(&self, start_ns: u64, i: u64) -> u64 {
        start_ns + i * self.every_ns
    }

    /// The stream's start, from a chunk's index and due time.
    pub fn start_ns(&self, i: u64, due_ns: u64) -> u64 {
        due_ns.saturating_sub(i * self.every_ns)
    }

    /// Latencies (µs) to count for the chunks in `missing`, never delivered
    /// when the receiver stopped at `stop_ns`: their age then, a lower bound
    /// of their delivery latency. Chunks not yet due are left out.
    pub fn censored_us(
        &self,
        start_ns: u64,
        stop_ns: u64,
        missing: impl Iterator<Item = u64>,
    ) -> Vec<f64> {
        missing
            .map(|i| self.due_ns(start_ns, i))
            .filter(|&due| due < stop_ns)
            .map(|due| (stop_ns - due) as f64 / 1e3)
            .collect()
    }
}

/// The note of a live receiver: how much arrived, and what the percentiles are.
pub fn live_note(s: &LiveSchedule, delivered: u64, censored: usize) -> String {
    let mut n = format!("{delivered} of {} chunks delivered", s.chunks);
    if censored > 0 {
        n += &format!(
            "; latency counts the {censored} missing chunks at their age when the receiver \
             stopped (lower bounds)"
        );
    }
    n
}

/// Prints one line to the harness.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn finish(r: &NodeResult) -> Result<()> {
    say(&format!("result {}", serde_json::to_string(r)?));
    Ok(())
}

/// Entry point of `lu2k-perf __node SPEC`.
pub fn main(spec: &str) -> Result<()> {
    let spec: NodeSpec = serde_json::from_str(spec).context("node spec")?;
    let mut r = match spec.kind {
        Kind::Tcp | Kind::Udt4 => stream_node(&spec)?,
        Kind::Srt => crate::srt::node(&spec)?,
        Kind::Quic => crate::quic::node(&spec)?,
        Kind::Lu2k => crate::lu2k::node(&spec)?,
    };
    if r.max_rss_mib.is_none() {
        r.max_rss_mib = own_peak_rss_mib();
    }
    finish(&r)
}

/// Peak resident memory of this node process (`VmHWM`) plus the largest of
/// the programs it ran and reaped (`srt-file-transmit`), MiB.
fn own_peak_rss_mib() -> Option<f64> {
    let own = crate::lu2k::vm_hwm_kib("/proc/self/status")?;
    let children = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_or(0, |u| u.max_rss().max(0) as u64);
    Some((own + children) as f64 / 1024.0)
}

/// A reliable byte stream: TCP or UDT4.
pub trait Stream {
    /// Writes all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> Result<()>;
    /// Reads some bytes; `Ok(0)` at the end or on the receive timeout.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize>;
    /// Retransmitted bytes so far, if the transport tells.
    fn retrans_bytes(&mut self) -> Option<u64> {
        None
    }
    /// The settings in force, as the socket reports them.
    fn tuning(&self) -> Option<String> {
        None
    }
    /// After the last write: waits (up to `limit`) until the peer has
    /// everything, where the transport can tell, so that the retransmission
    /// count is final. UDT4 cannot tell; it returns at once.
    fn await_delivered(&mut self, _limit: Duration) {}
}

struct Tcp {
    s: TcpStream,
    retrans0: Option<u64>,
    /// What `tcp_tune` could not read back from the socket.
    extra: String,
}

/// `RetransSegs` of this network namespace (`/proc/net/snmp`).
fn tcp_retrans_segs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

impl Stream for Tcp {
    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        Ok(Write::write_all(&mut self.s, buf)?)
    }
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        match self.s.read(buf) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }
    fn retrans_bytes(&mut self) -> Option<u64> {
        let mss = nix::sys::socket::getsockopt(&self.s, sockopt::TcpMaxSeg).ok()? as u64;
        Some((tcp_retrans_segs()? - self.retrans0?) * mss)
    }
    /// Shuts down sending and waits for the receiver's close, which comes
    /// once it has read everything (bulk) or stopped.
    fn await_delivered(&mut self, limit: Duration) {
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        let start = Instant::now();
        let mut buf = [0u8; 64];
        while start.elapsed() < limit {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }
    fn tuning(&self) -> Option<String> {
        use nix::sys::socket::getsockopt;
        let cc = getsockopt(&self.s, sockopt::TcpCongestion)
            .map_or("?".into(), |c| c.to_string_lossy().into_owned());
        let snd = getsockopt(&self.s, sockopt::SndBuf).unwrap_or(0);
        let rcv = getsockopt(&self.s, sockopt::RcvBuf).unwrap_or(0);
        Some(format!(
            "TCP_CONGESTION={cc} SO_SNDBUF={snd} SO_RCVBUF={rcv}{}",
            self.extra
        ))
    }
}

struct Udt(udt::UdtSocket);

/// UDT4's options as the socket reports them.
fn udt_tuning_of(s: &udt::UdtSocket) -> String {
    use udt::UdtOpts as O;
    fn g<T: udt::UdtOption<i32>>(s: &udt::UdtSocket, o: T) -> String {
        s.getsockopt(o).map_or("?".into(), |v: i32| v.to_string())
    }
    format!(
        "UDT_FC={} UDT_SNDBUF={} UDT_RCVBUF={} UDP_SNDBUF={} UDP_RCVBUF={}",
        g(s, O::UDT_FC),
        g(s, O::UDT_SNDBUF),
        g(s, O::UDT_RCVBUF),
        g(s, O::UDP_SNDBUF),
        g(s, O::UDP_RCVBUF)
    )
}

fn udt_err(what: &'static str) -> impl Fn(udt::UdtError) -> anyhow::Error {
    move |e| anyhow!("UDT4 {what}: {} ({})", e.err_msg, e.err_code)
}

impl Stream for Udt {
    fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.0.send(buf).map_err(udt_err("send"))?;
            buf = &buf[n as usize..];
        }
        Ok(())
    }
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        let cap = buf.len();
        match self.0.recv(buf, cap) {
            Ok(n) if n > 0 => Ok(n as usize),
            Ok(_) => Ok(0),
            // 6003: receive timeout (ETIMEOUT); report as nothing read.
            Err(e) if e.err_code == 6003 => Ok(0),
            Err(e) => Err(udt_err("recv")(e)),
        }
    }
    fn tuning(&self) -> Option<String> {
        Some(udt_tuning_of(&self.0))
    }
}

/// Sets up a UDT4 socket tuned for the path ([`crate::tuning::udt`]): the
/// flow window holds the path window, the buffers that window. `UDT_FC` goes
/// first: UDT4 caps the receive buffer at it.
pub fn udt_socket(path: &crate::tuning::PathInfo) -> Result<udt::UdtSocket> {
    udt::init();
    let t = crate::tuning::udt(path);
    let s = udt::UdtSocket::new(udt::SocketFamily::AFInet, udt::SocketType::Stream)
        .map_err(udt_err("socket"))?;
    s.setsockopt(udt::UdtOpts::UDT_FC, t.fc)
        .map_err(udt_err("UDT_FC"))?;
    s.setsockopt(udt::UdtOpts::UDT_SNDBUF, t.buf)
        .map_err(udt_err("UDT_SNDBUF"))?;
    s.setsockopt(udt::UdtOpts::UDT_RCVBUF, t.buf)
        .map_err(udt_err("UDT_RCVBUF"))?;
    s.setsockopt(udt::UdtOpts::UDP_SNDBUF, t.udp_buf)
        .map_err(udt_err("UDP_SNDBUF"))?;
    s.setsockopt(udt::UdtOpts::UDP_RCVBUF, t.udp_buf)
        .map_err(udt_err("UDP_RCVBUF"))?;
    Ok(s)
}

/// TCP's settings for the spec's path ([`crate::tuning::tcp`]).
fn tcp_tuning(spec: &NodeSpec) -> crate::tuning::TcpTuning {
    crate::tuning::tcp(
        &spec.path,
        spec.cc.as_deref().unwrap_or("cubic"),
        spec.workload.kind != WorkloadKind::Bulk,
    )
}

/// Where this node's network namespace keeps `tcp_notsent_lowat` (the node
/// runs in a namespace of its own, so the setting is this run's alone).
const NOTSENT_LOWAT: &str = "/proc/sys/net/ipv4/tcp_notsent_lowat";

/// Applies [`tcp_tuning`]; returns what the socket cannot report itself
/// (`tcp_notsent_lowat`, set for the namespace: nix has no socket option for it).
fn tcp_tune(s: &TcpStream, spec: &NodeSpec) -> Result<String> {
    let t = tcp_tuning(spec);
    setsockopt(s, sockopt::TcpCongestion, &std::ffi::OsString::from(&t.cc)).with_context(|| {
        format!(
            "TCP_CONGESTION {} (see sysctl net.ipv4.tcp_available_congestion_control)",
            t.cc
        )
    })?;
    // Forced buffers (root) above net.core.{r,w}mem_max; else what the kernel allows.
    if setsockopt(s, sockopt::SndBufForce, &t.buf).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &t.buf);
    }
    if setsockopt(s, sockopt::RcvBufForce, &t.buf).is_err() {
        let _ = setsockopt(s, sockopt::RcvBuf, &t.buf);
    }
    s.set_nodelay(spec.workload.kind != WorkloadKind::Bulk)?;
    let mut extra = String::new();
    if let Some(v) = t.notsent_lowat {
        std::fs::write(NOTSENT_LOWAT, v.to_string())
            .with_context(|| format!("setting {NOTSENT_LOWAT} in the node's namespace"))?;
        let now = std::fs::read_to_string(NOTSENT_LOWAT).unwrap_or_default();
        extra = format!(" tcp_notsent_lowat={}", now.trim());
    }
    Ok(extra)
}

fn open_stream(spec: &NodeSpec) -> Result<Box<dyn Stream>> {
    match (spec.kind, spec.role) {
        (Kind::Tcp, Role::Recv) => {
            let l = TcpListener::bind(spec.addr).context("TCP bind")?;
            // Buffers set on the listener are inherited by the accepted socket
            // and size its window scale in the SYN-ACK.
            let buf = tcp_tuning(spec).buf;
            if setsockopt(&l, sockopt::RcvBufForce, &buf).is_err() {
                let _ = setsockopt(&l, sockopt::RcvBuf, &buf);
            }
            say(&format!("listen {}", l.local_addr()?));
            let (s, _) = l.accept().context("TCP accept")?;
            let extra = tcp_tune(&s, spec)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(Box::new(Tcp {
                s,
                retrans0: None,
                extra,
            }))
        }
        (Kind::Tcp, Role::Send) => {
            let sock = std::net::TcpStream::connect_timeout(&spec.addr, Duration::from_secs(20))
                .context("TCP connect")?;
            let extra = tcp_tune(&sock, spec)?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(Box::new(Tcp {
                s: sock,
                retrans0: tcp_retrans_segs(),
                extra,
            }))
        }
        (Kind::Udt4, Role::Recv) => {
            let l = udt_socket(&spec.path)?;
            l.bind(spec.addr).map_err(udt_err("bind"))?;
            l.listen(1).map_err(udt_err("listen"))?;
            say(&format!(
                "listen {}",
                l.getsockname().map_err(udt_err("getsockname"))?
            ));
            let (s, _) = l.accept().map_err(udt_err("accept"))?;
            s.setsockopt(udt::UdtOpts::UDT_RCVTIMEO, 200)
                .map_err(udt_err("UDT_RCVTIMEO"))?;
            Ok(Box::new(Udt(s)))
        }
        (Kind::Udt4, Role::Send) => {
            let s = udt_socket(&spec.path)?;
            s.connect(spec.addr).map_err(udt_err("connect"))?;
            s.setsockopt(udt::UdtOpts::UDT_RCVTIMEO, 200)
                .map_err(udt_err("UDT_RCVTIMEO"))?;
            Ok(Box::new(Udt(s)))
        }
        _ => bail!("not a stream transport"),
    }
}

/// Progress lines every 50 ms.
pub struct Ticker {
    last: Instant,
}

impl Ticker {
    /// A ticker that speaks on its first call.
    pub fn new() -> Ticker {
        Ticker {
            last: Instant::now() - Duration::from_secs(1),
        }
    }
    /// Prints `progress BYTES` if 50 ms passed.
    pub fn tick(&mut self, bytes: u64) {
        if self.last.elapsed() >= Duration::from_millis(50) {
            self.last = Instant::now();
            say(&format!("progress {bytes}"));
        }
    }
}

impl Default for Ticker {
    fn default() -> Self {
        Ticker::new()
    }
}

fn stream_node(spec: &NodeSpec) -> Result<NodeResult> {
    let mut stream = open_stream(spec)?;
    let s = stream.as_mut();
    let w = &spec.workload;
    let mut r = match (w.kind, spec.role) {
        (WorkloadKind::Bulk, Role::Send) => bulk_send(s, w)?,
        (WorkloadKind::Bulk, Role::Recv) => bulk_receive(s, w)?,
        (WorkloadKind::Rpc, Role::Send) => ask(s, w),
        (WorkloadKind::Rpc, Role::Recv) => answer(s, w)?,
        (WorkloadKind::Live, Role::Send) => live_send(s, w)?,
        (WorkloadKind::Live, Role::Recv) => live_receive(s, w)?,
    };
    r.retrans_bytes = s.retrans_bytes();
    r.tuning = s.tuning();
    Ok(r)
}

/// Reports `r`, then keeps the connection open until the harness ends this
/// node: UDT4 drops what it has not sent yet when its process exits, and the
/// last bytes may still sit in its send buffer.
fn finish_and_linger(s: &mut dyn Stream, r: &mut NodeResult) -> Result<()> {
    r.retrans_bytes = s.retrans_bytes();
    r.tuning = s.tuning();
    finish(r)?;
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}

fn bulk_send(s: &mut dyn Stream, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    r.first_send_ns = Some(mono_ns());
    while r.bytes < w.bytes && start.elapsed() < cap + Duration::from_secs(5) {
        let n = chunk.len().min((w.bytes - r.bytes) as usize);
        if s.write_all(&chunk[..n]).is_err() {
            break; // the receiver closed (done or out of time)
        }
        r.bytes += n as u64;
    }
    s.await_delivered(cap + Duration::from_secs(5));
    finish_and_linger(s, &mut r)?;
    Ok(r)
}

fn bulk_receive(s: &mut dyn Stream, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut tick = Ticker::new();
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    while r.bytes < w.bytes && start.elapsed() < cap {
        let n = s.read_some(&mut buf)?;
        if n > 0 {
            last = Instant::now();
            if first.is_none() {
                first = Some(last);
                r.first_bytes = n as u64;
            }
            r.bytes += n as u64;
        }
        tick.tick(r.bytes);
    }
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| mono_ns_at(last));
    Ok(r)
}

/// rpc client: `count` requests, each answered in full before the next;
/// every round trip but the first is a sample.
fn ask(s: &mut dyn Stream, w: &Workload) -> NodeResult {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let size = w.size as usize;
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let mut tick = Ticker::new();
    let deadline = Instant::now() + cap;
    for i in 0..w.count + 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            r.note = Some(format!(
                "stopped after {} of {} round trips (max_duration_s)",
                r.samples_us.len(),
                w.count
            ));
            break;
        }
        let t = Instant::now();
        let done = s
            .write_all(&msg)
            .and_then(|()| read_exact(s, &mut buf, left));
        if let Err(e) = done {
            r.note = Some(format!(
                "stopped after {} of {} round trips: {e:#}",
                r.samples_us.len(),
                w.count
            ));
            break;
        }
        if i > 0 {
            // The first round trip includes connection warm-up.
            r.samples_us.push(t.elapsed().as_secs_f64() * 1e6);
            r.bytes += 2 * size as u64;
        }
        tick.tick(r.bytes);
    }
    r
}

/// rpc server: echoes each request.
fn answer(s: &mut dyn Stream, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let size = w.size as usize;
    let mut buf = vec![0u8; size];
    for _ in 0..w.count + 1 {
        if read_exact(s, &mut buf, cap).is_err() {
            break;
        }
        s.write_all(&buf)?;
        r.bytes += size as u64;
        say(&format!("progress {}", r.bytes));
    }
    // The last reply may still sit in the send buffer.
    finish_and_linger(s, &mut r)?;
    Ok(r)
}

/// Live sender: a warm-up chunk, then each chunk of the schedule when it is
/// due, stamped with its due time (bytes 0..8) and index (8..16).
fn live_send(s: &mut dyn Stream, w: &Workload) -> Result<NodeResult> {
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let mut r = NodeResult::default();
    let chunk = w.chunk_bytes as usize;
    let mut buf = vec![0u8; chunk];
    let sched = LiveSchedule::of(w);
    // One chunk outside the stream, answered by a byte, before the
    // schedule starts (lu2k's engines do the same).
    buf[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    s.write_all(&buf[..w.warmup_len().min(chunk)])?;
    read_exact(s, &mut [0u8; 1], cap).context("the warm-up's answer")?;
    let start_ns = mono_ns();
    r.first_send_ns = Some(start_ns);
    for i in 0..sched.chunks {
        let due = sched.due_ns(start_ns, i);
        let now = mono_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        // Stamped with when it was due, not when the transport took it:
        // a sender held back by its transport is late, and that counts.
        buf[..8].copy_from_slice(&due.to_le_bytes());
        buf[8..16].copy_from_slice(&i.to_le_bytes());
        if s.write_all(&buf).is_err() {
            break;
        }
        r.bytes += chunk as u64;
    }
    finish_and_linger(s, &mut r)?;
    Ok(r)
}

/// Live receiver: answers the warm-up chunk, then times each chunk's
/// delivery against its due time.
fn live_receive(s: &mut dyn Stream, w: &Workload) -> Result<NodeResult> {
    let mut r = NodeResult::default();
    let chunk = w.chunk_bytes as usize;
    let mut buf = vec![0u8; chunk];
    let sched = LiveSchedule::of(w);
    let mut tick = Ticker::new();
    let limit = Duration::from_secs_f64(w.duration_s + w.max_duration_s);
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    let mut stream_start = None;
    let mut delivered = 0u64;
    // The sender's warm-up chunk, answered so that it knows the
    // connection carries data before its schedule starts.
    let warm = w.warmup_len().min(chunk);
    read_exact(s, &mut buf[..warm], limit).context("the warm-up chunk")?;
    s.write_all(&[1])?;
    while delivered < sched.chunks && start.elapsed() < limit {
        if read_exact(s, &mut buf, limit.saturating_sub(start.elapsed())).is_err() {
            break;
        }
        let now = mono_ns();
        last = Instant::now();
        if first.is_none() {
            first = Some(last);
            r.first_bytes = chunk as u64;
        }
        let due = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let i = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        stream_start.get_or_insert(sched.start_ns(i, due));
        r.samples_us.push(now.saturating_sub(due) as f64 / 1e3);
        r.bytes += chunk as u64;
        delivered += 1;
        tick.tick(r.bytes);
    }
    // A byte stream delivers in order: what is missing is the tail.
    let censored = stream_start.map_or(Vec::new(), |s0| {
        sched.censored_us(s0, mono_ns(), delivered..sched.chunks)
    });
    r.note = Some(live_note(&sched, delivered, censored.len()));
    r.samples_us.extend(censored);
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| mono_ns_at(last));
    Ok(r)
}

fn read_exact(s: &mut dyn Stream, buf: &mut [u8], limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut off = 0;
    while off < buf.len() {
        if start.elapsed() > limit {
            bail!("not all of it arrived within {:.1} s", limit.as_secs_f64());
        }
        off += s.read_some(&mut buf[off..])?;
    }
    Ok(())
}

/// A line a node printed, and when the harness read it.
#[derive(Debug)]
pub enum Line {
    /// `listen ADDR`.
    Listen(SocketAddr),
    /// `progress BYTES`.
    Progress(Instant, u64),
    /// `result JSON`.
    Result(Box<NodeResult>),
    /// The node's stdout closed.
    Closed,
}

/// A running node process.
#[derive(Debug)]
pub struct Node {
    child: Child,
    /// Its lines, as they come.
    pub lines: mpsc::Receiver<Line>,
}

impl Node {
    /// Starts `cmd` (a `__node` command, maybe behind `ip netns exec`).
    pub fn spawn(mut cmd: Command) -> Result<Node> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            // Its own process group: stopping the node stops what it started
            // (engines, srt-file-transmit) too.
            .process_group(0);
        // The program only: a node's spec (a certificate, for QUIC) is long.
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let msg = if let Some(a) = line.strip_prefix("listen ") {
                    a.trim().parse().ok().map(Line::Listen)
                } else if let Some(b) = line.strip_prefix("progress ") {
                    b.trim().parse().ok().map(|b| Line::Progress(now, b))
                } else if let Some(j) = line.strip_prefix("result ") {
                    serde_json::from_str(j)
                        .ok()
                        .map(|r| Line::Result(Box::new(r)))
                } else {
                    eprintln!("{line}");
                    None
                };
                if let Some(m) = msg {
                    if tx.send(m).is_err() {
                        break;
                    }
                }
            }
            let _ = tx.send(Line::Closed);
        });
        Ok(Node { child, lines: rx })
    }

    /// The command that runs a node of `spec` (this binary, `__node`).
    pub fn command(program: Command, spec: &NodeSpec) -> Result<Command> {
        let mut cmd = program;
        cmd.arg("__node").arg(serde_json::to_string(spec)?);
        Ok(cmd)
    }

    /// Waits for the `listen` line.
    pub fn wait_listen(&mut self, limit: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Line::Listen(a)) => return Ok(a),
                Ok(Line::Closed) | Err(_) => {
                    let st = self.child.try_wait()?;
                    bail!("the receiving node did not start listening (exit: {st:?})")
                }
                Ok(_) => {}
            }
        }
    }

    /// Asks the node to stop (SIGTERM), then kills it after `grace`; reaps it.
    pub fn stop(mut self, grace: Duration) {
        use nix::sys::signal::{kill, killpg, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left in the node's group (the node, its children) goes now.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the node to exit by itself, up to `limit`, then stops it.
    pub fn join(mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Anything it left behind in its group.
                let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop(Duration::from_secs(2));
    }
}

/// The command that runs this binary.
pub fn self_command() -> Result<Command> {
    Ok(Command::new(
        std::env::current_exe().context("locating lu2k-perf")?,
    ))
}

/// Reads all of a reader, counting (for piped external programs).
pub fn drain(mut r: impl Read, mut on: impl FnMut(u64)) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        on(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(stream_mbps: f64, chunk_bytes: u32, duration_s: f64) -> Workload {
        Workload {
            kind: WorkloadKind::Live,
            bytes: 0,
            max_duration_s: 10.0,
            size: 72,
            count: 1,
            stream_mbps,
            chunk_bytes,
            duration_s,
            in_flight: None,
            warmup_bytes: None,
        }
    }

    #[test]
    fn live_schedule_spaces_chunks_at_the_stream_rate() {
        // 64 KiB at 20 Mbit/s: one chunk every 26.2144 ms; 6 s is 229 chunks.
        let s = LiveSchedule::of(&live(20.0, 65_536, 6.0));
        assert_eq!(s.every_ns, 26_214_400);
        assert_eq!(s.chunks, 229);
        let start = 1_000_000_000;
        assert_eq!(s.due_ns(start, 0), start);
        assert_eq!(s.due_ns(start, 10), start + 262_144_000);
        // The receiver recovers the start from any chunk's index and due time.
        assert_eq!(s.start_ns(10, s.due_ns(start, 10)), start);
    }

    #[test]
    fn missing_chunks_count_at_their_age_when_the_receiver_stopped() {
        let s = LiveSchedule {
            every_ns: 1_000_000,
            chunks: 10,
        };
        // Stopped 8.5 ms after the start: chunks 7 and 8 missing (ages 1.5
        // and 0.5 ms), chunk 9 not due yet and left out.
        let c = s.censored_us(0, 8_500_000, [7u64, 8, 9].into_iter());
        assert_eq!(c, vec![1500.0, 500.0]);
        assert_eq!(live_note(&s, 10, 0), "10 of 10 chunks delivered");
        assert!(live_note(&s, 7, 2).contains("2 missing chunks"));
    }
}
