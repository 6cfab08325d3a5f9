//! How large a TX pool a path needs: the rule the kshim applies where it is told
//! the path, beside [`crate::rx_pool`]'s for the receiver.
//!
//! A message's TX memory comes back when its last byte is acknowledged, and
//! the ACK point waits at the oldest hole: at 5 % loss a hole whose
//! retransmissions are lost twice holds it three to four round trips, while the
//! window runs on. The satellite controller's window is [`WINDOW_BDPS`] × rate ×
//! minimum RTT counted from that hole; a pool smaller than the window caps it
//! (engine README, "RX memory"). More than the window buys nothing on the
//! wire and costs memory: every page of the pool that a message once used
//! stays resident in the engine that sent it.

/// The satellite controller's window in rates × RTT (`lu2k-udt`'s
/// `cc::WINDOW_BDPS`; the engine's tests check that the two agree).
pub const WINDOW_BDPS: f64 = 6.0;

/// The least pool: room for a few whole LNet messages (1 MiB each) on a short
/// or slow path.
pub const MIN_BYTES: u64 = 32 << 20;

/// TX pool bytes for a path of `rate_mbps` and `rtt_ms`, rounded up to a MiB and
/// at least [`MIN_BYTES`], with the reason in words for the start-up line.
pub fn bytes_for_path(rate_mbps: f64, rtt_ms: f64) -> (u64, String) {
    let bytes = rate_mbps * 1e6 / 8.0 * rtt_ms / 1e3 * WINDOW_BDPS;
    // 64 GiB: past any path this engine can fill, and no overflow below.
    let n = (bytes.ceil().min(f64::from(1u32 << 30) * 64.0) as u64)
        .next_multiple_of(1 << 20)
        .max(MIN_BYTES);
    (
        n,
        format!(
            "{} MiB TX pool for the path ({rate_mbps} Mbit/s x {rtt_ms} ms x \
             {WINDOW_BDPS}: the transport's window, counted from the oldest hole = {:.1} MB; \
             at least {} MiB)",
            n >> 20,
            bytes / 1e6,
            MIN_BYTES >> 20
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_the_path() {
        // 500 Mbit/s x 600 ms x 6 = 225 MB = 214.6 MiB, rounded up.
        let (n, why) = bytes_for_path(500.0, 600.0);
        assert_eq!(n, 215 << 20);
        assert!(why.contains("500 Mbit/s x 600 ms"), "{why}");
        // 100 Mbit/s: 45 MB.
        assert_eq!(bytes_for_path(100.0, 600.0).0, 43 << 20);
        // A short path: the floor.
        assert_eq!(bytes_for_path(100.0, 20.0).0, MIN_BYTES);
        // Absurd paths stay bounded.
        assert_eq!(bytes_for_path(1e12, 1e6).0, 64 << 30);
    }
}
