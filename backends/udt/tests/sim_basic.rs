//! Simulation smoke tests: handshake, transfer, loss, TTL, on virtual time.

mod common;

use common::{run, Scenario};
use lu2k_linkem::{Config as LinkConfig, DuplexConfig, Loss};
use lu2k_udt::cc::Kind;

fn link(rate: f64, rtt_ms: f64, loss: f64) -> DuplexConfig {
    let fwd = LinkConfig {
        rate_mbps: Some(rate),
        queue_bytes: Some((rate * 1e6 / 8.0 * rtt_ms / 1000.0 * 0.5) as u64 + 64_000),
        overhead_bytes: 28,
        delay_ms: rtt_ms / 2.0,
        loss: if loss > 0.0 {
            Loss::Bernoulli { rate: loss }
        } else {
            Loss::None
        },
        ..LinkConfig::default()
    };
    let rev = LinkConfig {
        rate_mbps: None,
        queue_bytes: None,
        loss: Loss::None,
        ..fwd.clone()
    };
    DuplexConfig {
        forward: fwd,
        reverse: rev,
    }
}

fn scenario(cc: Kind, rtt_ms: f64, loss: f64, msgs: Vec<u32>) -> Scenario {
    Scenario {
        link: link(20.0, rtt_ms, loss),
        cc,
        seed: 7,
        duration_us: 60_000_000,
        messages: Some(msgs),
        bulk_size: 1 << 20,
        ttl_us: None,
        verify_bytes: true,
        bdp_bps: 20_000_000,
        bdp_rtt_us: (rtt_ms * 1000.0) as u64,
        rcv_buf_pkts: None,
        mode: lu2k_udt::conn::Mode::Message,
        bin_us: 100_000,
        paced: None,
    }
}

#[test]
fn transfer_without_loss_delivers_everything_intact() {
    for cc in [Kind::Native, Kind::Satellite] {
        let sizes: Vec<u32> = (0..50).map(|i| 1 + (i * 7919) % 300_000).collect();
        let out = run(&scenario(cc, 100.0, 0.0, sizes));
        assert!(out.violations.is_empty(), "{cc:?}: {:?}", out.violations);
        assert_eq!(out.delivered_msgs, 50);
    }
}

#[test]
fn transfer_with_loss_delivers_everything_intact() {
    for cc in [Kind::Native, Kind::Satellite] {
        let sizes: Vec<u32> = (0..20).map(|i| 1000 + (i * 104_729) % 500_000).collect();
        let out = run(&scenario(cc, 200.0, 0.01, sizes));
        assert!(out.violations.is_empty(), "{cc:?}: {:?}", out.violations);
        assert_eq!(out.delivered_msgs, 20);
        assert!(out.retransmitted > 0);
    }
}
