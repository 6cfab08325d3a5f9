//! Congestion control behind a trait: UDT's "configurable congestion control".
//!
//! As in UDT4's `CCC`, a controller is driven by events — ACK, loss report
//! (NAK), timeout (EXP), packet sent, packet received — and exposes two
//! outputs the sender obeys: the *pacing period* (microseconds between
//! two data packets) and the *congestion window* (packets in flight). The
//! connection additionally caps the window by the peer's advertised free
//! receive buffer (the flow window).
//!
//! Two controllers ship:
//! - [`Native`]: UDT4's `CUDTCC`, kept faithful to `ccc.cpp` (slow start by
//!   window, then rate-based AIMD every SYN interval with the
//!   bandwidth-estimate-driven increase, the 1/9 decrease per congestion epoch
//!   and the randomised extra decreases).
//! - [`Satellite`]: model-based (bottleneck bandwidth × minimum RTT), made to
//!   hold a long-delay link under random, non-congestive loss.
//!
//! Sequence numbers handed to controllers are raw 31-bit values.

mod native;
mod satellite;

pub use native::Native;
pub use satellite::{Satellite, WINDOW_BDPS};

use crate::estimate::Time;

/// What the connection knows about the path, handed to every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path {
    /// Smoothed RTT, microseconds.
    pub rtt: u32,
    /// RTT variance, microseconds.
    pub rtt_var: u32,
    /// Minimum RTT seen, microseconds.
    pub min_rtt: u32,
    /// Receiver's packet arrival rate (packets/s, sender-side EWMA of its
    /// reports, starting at UDT4's 16).
    pub recv_rate: u32,
    /// Estimated link capacity (packets/s, sender-side EWMA of packet-pair
    /// reports, starting at UDT4's 1).
    pub bandwidth: u32,
    /// Maximum segment size in bytes (the whole IP packet, as in UDT).
    pub mss: u32,
    /// Maximum flow window (packets): the peer's receive buffer size.
    pub max_window: u32,
    /// Last data sequence number sent.
    pub snd_curr_seq: u32,
    /// Packets in flight (sent, not acknowledged).
    pub inflight: u32,
}

/// One acknowledgement, as the controller sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ack {
    /// The ACK number: first sequence number not yet received.
    pub seq: u32,
    /// Packets newly acknowledged by this ACK.
    pub newly_acked: u32,
    /// Raw arrival-rate sample carried by this ACK (packets/s), 0 if none.
    pub recv_rate_sample: u32,
    /// Raw packet-pair capacity sample carried by this ACK (packets/s), 0 if none.
    pub bandwidth_sample: u32,
}

/// A congestion controller. See the module doc for the contract.
pub trait Controller: std::fmt::Debug + Send {
    /// Called once when the connection is established.
    fn init(&mut self, now: Time, path: &Path);
    /// A full ACK arrived (advancing or not): its RTT and rate reports are
    /// in `path` and `ack`. Called before [`Controller::on_ack`].
    fn on_report(&mut self, _now: Time, _path: &Path, _ack: &Ack) {}
    /// A full ACK advanced the acknowledgement point (UDT4's `onACK`).
    fn on_ack(&mut self, now: Time, path: &Path, ack: &Ack);
    /// A loss report arrived. `ranges` are inclusive `(first, last)` pairs as
    /// decoded from the NAK; `new_losses` counts the sequence numbers that were
    /// not already known lost.
    fn on_loss(&mut self, now: Time, path: &Path, ranges: &[(u32, u32)], new_losses: u32);
    /// The EXP timer fired with data outstanding.
    fn on_timeout(&mut self, now: Time, path: &Path);
    /// A data packet left (`retransmit` true for a retransmission).
    fn on_pkt_sent(&mut self, _now: Time, _path: &Path, _seq: u32, _retransmit: bool) {}
    /// A data packet arrived (receiver side).
    fn on_pkt_received(&mut self, _now: Time, _seq: u32) {}
    /// Microseconds between two data packets.
    fn period(&self) -> f64;
    /// Congestion window, packets.
    fn window(&self) -> f64;
}

/// Which controller a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// UDT4's native algorithm.
    Native,
    /// The model-based satellite controller.
    #[default]
    Satellite,
}

impl Kind {
    /// A fresh controller of this kind; `seed` feeds its randomness.
    pub fn build(self, seed: u64) -> Box<dyn Controller> {
        match self {
            Kind::Native => Box::new(Native::new(seed)),
            Kind::Satellite => Box::new(Satellite::new()),
        }
    }
}

/// Signed distance from `a` to `b` in 31-bit sequence space.
pub(crate) fn seq_off(a: u32, b: u32) -> i32 {
    let d = b.wrapping_sub(a) & 0x7FFF_FFFF;
    if d >= 0x4000_0000 {
        (i64::from(d) - 0x8000_0000) as i32
    } else {
        d as i32
    }
}
