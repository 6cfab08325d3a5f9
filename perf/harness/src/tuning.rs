//! How each contender is tuned for the cell's path, as its expert users would
//! tune it: pure functions of the path (rate, round trip, bottleneck queue,
//! outage) so that the choices can be tested, and what each node reports it
//! applied (`NodeResult::tuning`, the row's `tuning`).
//!
//! The figures every tuning starts from: the bandwidth-delay product
//! (`rate × rtt`, 7.5 MB at 100 Mbit/s and 600 ms) and the *path window*,
//! BDP + the bottleneck queue: what the link holds in flight before its
//! queue overflows. The harness README's tuning table says why each choice.

use serde::{Deserialize, Serialize};

/// The path a node runs on, as the harness knows it from the cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PathInfo {
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Forward bottleneck rate, Mbit/s.
    pub rate_mbps: f64,
    /// Forward bottleneck queue, bytes (0: none given).
    pub queue_bytes: u64,
    /// The longest outage in the cell, seconds (0: none).
    pub outage_s: f64,
}

impl Default for PathInfo {
    /// A 100 Mbit/s, 600 ms path with a queue of one BDP: the GEO cell.
    fn default() -> Self {
        PathInfo {
            rtt_ms: 600.0,
            rate_mbps: 100.0,
            queue_bytes: 7_500_000,
            outage_s: 0.0,
        }
    }
}

impl PathInfo {
    /// Bandwidth-delay product, bytes.
    pub fn bdp_bytes(&self) -> f64 {
        self.rate_mbps * 1e6 / 8.0 * self.rtt_ms / 1e3
    }

    /// BDP + bottleneck queue, bytes: what the link holds before it drops.
    pub fn window_bytes(&self) -> f64 {
        self.bdp_bytes() + self.queue_bytes as f64
    }

    /// The link's rate in bytes per second.
    pub fn rate_bytes_per_s(&self) -> u64 {
        (self.rate_mbps * 1e6 / 8.0) as u64
    }
}

/// UDT4 socket options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdtTuning {
    /// `UDT_FC`, packets: the most UDT4 keeps in flight, and where its
    /// unpaced slow start ends.
    pub fc: i32,
    /// `UDT_SNDBUF` and `UDT_RCVBUF`, bytes (UDT4 caps the receive buffer at
    /// `UDT_FC` packets of 1472 bytes).
    pub buf: i32,
    /// `UDP_SNDBUF` and `UDP_RCVBUF`, bytes (the kernel caps them at
    /// `net.core.{w,r}mem_max`).
    pub udp_buf: i32,
}

/// UDT4's packet on this path: its default MSS of 1500 bytes.
const UDT_MSS: f64 = 1500.0;

/// UDT4 tuned for `p`: the flow window holds the path window and no more.
/// UDT4's slow start sends with a 1 µs period (no pacing) until a loss, an
/// expiry, or the congestion window passing `UDT_FC`; with the default
/// 25600 packets (37 MB) a lossless 600 ms path lets it put 2.5 times what the
/// link holds into the bottleneck at once. At the path window it cannot
/// overrun the queue, and the window still covers the BDP.
pub fn udt(p: &PathInfo) -> UdtTuning {
    let fc = (p.window_bytes() / UDT_MSS).ceil().max(32.0) as i32;
    // The receive buffer also holds what waits behind a hole; UDT4 caps it at
    // `fc` packets, so a larger figure is pointless.
    let buf = (fc as f64 * (UDT_MSS - 28.0)) as i32;
    UdtTuning {
        fc,
        buf,
        udp_buf: buf.min(64 << 20),
    }
}

/// The SRT URI parameters for file mode on `p`, in the order given.
pub fn srt(p: &PathInfo) -> Vec<(&'static str, String)> {
    // SRT's payload per packet in file mode (1500 − 28 − 16).
    const PAYLOAD: f64 = 1456.0;
    // Room for the path window twice over: what is in flight plus what the
    // receiver holds behind holes while retransmissions cross the path.
    let fc = (2.0 * p.window_bytes() / PAYLOAD).ceil().max(25_600.0) as u64;
    let buf = fc * PAYLOAD as u64;
    let rtt = p.rtt_ms.max(1.0);
    vec![
        ("transtype", "file".into()),
        ("fc", fc.to_string()),
        ("sndbuf", buf.to_string()),
        ("rcvbuf", buf.to_string()),
        // FileCC paces at most at maxbw: its slow start cannot burst past the
        // link's rate.
        ("maxbw", p.rate_bytes_per_s().to_string()),
        // The connection survives the cell's outage, and 10 round trips of
        // silence at least (default 5 s).
        (
            "peeridletimeo",
            ((p.outage_s * 1e3 + (10.0 * rtt).max(5000.0)).ceil() as u64).to_string(),
        ),
        // A handshake lost at 5 % loss is retried within it (default 3 s).
        (
            "conntimeo",
            ((10.0 * rtt).max(3000.0).ceil() as u64).to_string(),
        ),
    ]
}

/// TCP socket settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTuning {
    /// `TCP_CONGESTION`.
    pub cc: String,
    /// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE`, bytes.
    pub buf: usize,
    /// `TCP_NOTSENT_LOWAT`, bytes, where unsent data in the socket would only
    /// add delay (live and rpc workloads).
    pub notsent_lowat: Option<u32>,
    /// Whether the node asks for the `fq` qdisc on its side of the link
    /// (BBR: pacing by the qdisc rather than by TCP itself).
    pub fq: bool,
}

/// TCP tuned for `p`: buffers of twice the path window (the kernel halves
/// what it is given for its own bookkeeping, and the receiver holds data
/// behind holes), `TCP_NOTSENT_LOWAT` of 128 KiB where latency counts,
/// and the fq qdisc for BBR.
pub fn tcp(p: &PathInfo, cc: &str, latency_matters: bool) -> TcpTuning {
    TcpTuning {
        cc: cc.into(),
        buf: ((2.0 * p.window_bytes()) as usize).max(4 << 20),
        notsent_lowat: latency_matters.then_some(128 << 10),
        fq: cc == "bbr",
    }
}

/// quinn's congestion controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicCc {
    /// quinn's CUBIC.
    Cubic,
    /// quinn's BBR (its own, experimental, implementation).
    Bbr,
}

/// quinn transport settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuicTuning {
    /// Congestion controller.
    pub cc: QuicCc,
    /// Stream and connection receive windows, and the send window, bytes.
    pub window: u64,
    /// The RTT quinn assumes before it measures one, ms.
    pub initial_rtt_ms: f64,
    /// Idle timeout, ms: longer than the cell's outage.
    pub idle_timeout_ms: u64,
    /// Initial congestion window, bytes (quinn's default: 10 packets / 14720 B).
    pub initial_window: u64,
    /// UDP socket buffers, bytes.
    pub udp_buf: usize,
}

/// quinn tuned for `p`: flow-control windows of the path window, BDP +
/// queue (quinn's defaults, 1.25 MB per stream, would hold a 600 ms path to
/// ~16 Mbit/s; a larger window lets slow start overrun the bottleneck queue
/// by thousands of packets, and quinn-proto 0.11 closes the connection when
/// a stream's reassembly buffer holds more than 1024 separate pieces, "too
/// many gaps in stream buffer"), the initial RTT set to the path's (quinn's
/// default 333 ms would fire its loss timers early on a 600 ms path), and an
/// idle timeout past the outage.
pub fn quic(p: &PathInfo, cc: QuicCc) -> QuicTuning {
    let window = (p.window_bytes() as u64).max(4 << 20);
    QuicTuning {
        cc,
        window,
        initial_rtt_ms: p.rtt_ms.max(1.0),
        idle_timeout_ms: ((p.outage_s * 1e3 + (10.0 * p.rtt_ms).max(10_000.0)).ceil()) as u64,
        initial_window: 14_720,
        udp_buf: (window as usize).min(64 << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> PathInfo {
        PathInfo::default()
    }

    #[test]
    fn udt4_window_holds_the_path_and_no_more() {
        let t = udt(&geo());
        // 7.5 MB BDP + 7.5 MB queue = 15 MB = 10000 packets of 1500 bytes.
        assert_eq!(t.fc, 10_000);
        assert!(
            t.fc < 25_600,
            "below UDT4's default, which overruns the queue"
        );
        assert_eq!(t.buf, 10_000 * 1472);
        // A tiny path still gets UDT4's minimum of 32 packets.
        let tiny = PathInfo {
            rtt_ms: 1.0,
            rate_mbps: 1.0,
            queue_bytes: 0,
            outage_s: 0.0,
        };
        assert_eq!(udt(&tiny).fc, 32);
    }

    #[test]
    fn srt_options_cover_window_rate_and_outage() {
        let o = srt(&PathInfo {
            outage_s: 10.0,
            ..geo()
        });
        let get = |k: &str| {
            o.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("transtype"), "file");
        // 2 × 15 MB / 1456 B is 20605 packets: SRT's default of 25600 stays.
        assert_eq!(get("fc"), "25600");
        assert_eq!(get("rcvbuf"), (25_600u64 * 1456).to_string());
        assert_eq!(get("maxbw"), "12500000");
        assert_eq!(get("peeridletimeo"), "16000");
        assert_eq!(get("conntimeo"), "6000");
        // 500 Mbit/s: 2 × (37.5 MB + 37.5 MB) / 1456 B.
        let fast = srt(&PathInfo {
            rate_mbps: 500.0,
            queue_bytes: 37_500_000,
            ..geo()
        });
        assert!(fast.contains(&("fc", "103022".into())), "{fast:?}");
    }

    #[test]
    fn tcp_buffers_and_latency_settings() {
        let t = tcp(&geo(), "bbr", false);
        assert_eq!(t.buf, 30_000_000);
        assert!(t.fq);
        assert_eq!(t.notsent_lowat, None);
        let live = tcp(&geo(), "cubic", true);
        assert_eq!(live.notsent_lowat, Some(131_072));
        assert!(!live.fq);
    }

    #[test]
    fn quic_windows_span_the_path() {
        let q = quic(&geo(), QuicCc::Bbr);
        assert_eq!(q.window, 15_000_000);
        assert_eq!(q.initial_rtt_ms, 600.0);
        assert_eq!(q.idle_timeout_ms, 10_000);
        let out = quic(
            &PathInfo {
                outage_s: 10.0,
                ..geo()
            },
            QuicCc::Cubic,
        );
        assert_eq!(out.idle_timeout_ms, 20_000);
    }
}
