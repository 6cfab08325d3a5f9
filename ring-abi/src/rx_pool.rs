//! How many RX buffers a path needs: the one rule that the kernel half (kshim,
//! the module's `device create`) and the engine both apply and tell at start.
//!
//! A receiver on a lossy long path holds a window in flight plus what waits
//! behind a hole for its retransmission, about two round trips more:
//! [`HOLE_WAIT_FACTOR`] × rate × RTT of datagrams. The engine's io_uring path cuts
//! each buffer into datagram-sized receives ([`slice_for`]), so a buffer holds
//! `buf_size / slice` datagrams (a GRO batch fills a buffer about as well).

/// What a receiver holds of a lossy long path, in rates × RTT.
pub const HOLE_WAIT_FACTOR: f64 = 3.0;

/// Bytes a multishot `recvmsg` writes before each datagram in a provided buffer on
/// the engine's io_uring path: `io_uring_recvmsg_out` (16), the room for the larger
/// socket address (28) and for the control messages the engine asks for (80).
pub const RECV_OVERHEAD: u32 = 124;

/// The IPv4 and UDP headers: the largest datagram of an IP packet of `mss` bytes
/// is `mss - IP_UDP_HEADERS` (an IPv6 path's is 20 bytes smaller).
pub const IP_UDP_HEADERS: u32 = 28;

/// Bytes of one receive that holds a datagram of up to `datagram` bytes, with what
/// `recvmsg` puts before it, rounded up to a cache line.
pub const fn slice_for(datagram: u32) -> u32 {
    (RECV_OVERHEAD + datagram).div_ceil(64) * 64
}

/// RX buffers of `buf_size` bytes for a path of `rate_mbps` and `rtt_ms` whose IP
/// packets are at most `mss` bytes, at least 64 (and at most 16 × 65 535), with the
/// reason in words for the start-up line.
pub fn bufs_for_path(rate_mbps: f64, rtt_ms: f64, buf_size: u32, mss: u32) -> (u32, String) {
    let datagram = mss.saturating_sub(IP_UDP_HEADERS).max(1);
    let per_buf = (buf_size / slice_for(datagram)).max(1);
    let bytes = rate_mbps * 1e6 / 8.0 * rtt_ms / 1e3 * HOLE_WAIT_FACTOR;
    let n = (bytes / f64::from(per_buf * datagram))
        .ceil()
        .clamp(64.0, f64::from(u16::MAX) * 16.0) as u32;
    (
        n,
        format!(
            "{n} RX buffers of {} KiB for the path ({rate_mbps} Mbit/s x {rtt_ms} ms x \
             {HOLE_WAIT_FACTOR} for data waiting behind a hole = {:.1} MB; {per_buf} \
             datagrams of {datagram} bytes per buffer)",
            buf_size >> 10,
            bytes / 1e6
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_the_path() {
        // 500 Mbit/s x 600 ms x 3 = 112.5 MB; 40 datagrams of 1472 bytes per 64 KiB.
        let (n, why) = bufs_for_path(500.0, 600.0, 65536, 1500);
        assert_eq!(n, (112.5e6_f64 / (40.0 * 1472.0)).ceil() as u32);
        assert!(why.contains("500 Mbit/s x 600 ms"), "{why}");
        // Ten times the rate: ten times the buffers.
        let (n10, _) = bufs_for_path(5000.0, 600.0, 65536, 1500);
        assert!(
            (f64::from(n10) / f64::from(n) - 10.0).abs() < 0.01,
            "{n} {n10}"
        );
        // A short slow path still gets the floor.
        assert_eq!(bufs_for_path(1.0, 1.0, 65536, 1500).0, 64);
        // Jumbo packets: fewer, larger datagrams per buffer.
        assert_eq!(slice_for(9000 - IP_UDP_HEADERS), 9152);
    }
}
