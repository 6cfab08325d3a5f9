//! The utilization grid: RTT {0.2 s, 0.6 s} × loss {0, 0.1 %, 1 %, 5 %} at
//! 100 Mbit/s, 60 s of virtual time, both controllers.
//!
//! The table is checked in (`tests/grid.txt`); `grid` recomputes it and fails
//! on any difference (the simulation is deterministic), so a behaviour change
//! shows as a diff. Run with `LU2K_BLESS=1` to rewrite the file after an
//! intended change. `satellite_goals` asserts the satellite controller's
//! goals: utilization ≥ 97 % at ≤ 1 % loss and ≥ 90 % at 5 %, and 90 % of
//! the link within 4 RTT.
//!
//! Columns, all from the sender's `Connected` (the handshake — two round trips
//! with the SYN cookie — is not counted) to 60 s, with payload capacity =
//! 100 Mbit/s × 1456 / 1500 (each 1500-byte wire packet — IP and UDP 28,
//! UDT 16 — carries 1456 payload bytes):
//! - `util`: link utilization = unique payload bytes the receiver took in /
//!   (payload capacity × (1 − loss) × time). Startup counts against it.
//! - `deliv`: the same for bytes of messages delivered whole and in order by
//!   60 s; lower than `util` by what is still held behind a hole or in flight
//!   at the end (about one and a half RTT of data).
//! - `t90`: the end of the first 50 ms bin in which payload arriving at the
//!   receiver reaches 90 % of payload capacity × (1 − loss), in RTTs.
//! - `retx`: retransmissions / first transmissions.

mod common;

use common::{run, Scenario};
use lu2k_linkem::{Config as LinkConfig, DuplexConfig, Loss};
use lu2k_udt::cc::Kind;

const RATE_MBPS: f64 = 100.0;
const DURATION_US: u64 = 60_000_000;
const BIN_US: u64 = 50_000;

fn link(rtt_ms: f64, loss: f64) -> DuplexConfig {
    let bdp = RATE_MBPS * 1e6 / 8.0 * rtt_ms / 1000.0;
    let fwd = LinkConfig {
        rate_mbps: Some(RATE_MBPS),
        // A modem buffer of half a BDP.
        queue_bytes: Some((bdp * 0.5) as u64),
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
        loss: fwd.loss,
        ..fwd.clone()
    };
    DuplexConfig {
        forward: fwd,
        reverse: rev,
    }
}

struct Cell {
    cc: Kind,
    rtt_ms: f64,
    loss: f64,
    util: f64,
    delivered: f64,
    t90_rtt: Option<f64>,
    retx_pct: f64,
}

fn cell(cc: Kind, rtt_ms: f64, loss: f64) -> Cell {
    let sc = Scenario {
        link: link(rtt_ms, loss),
        cc,
        seed: 0x6121D + (rtt_ms as u64) * 1000 + (loss * 1e4) as u64,
        duration_us: DURATION_US,
        messages: None,
        bulk_size: 1 << 20,
        ttl_us: None,
        verify_bytes: false,
        bdp_bps: (RATE_MBPS * 1e6) as u64,
        bdp_rtt_us: (rtt_ms * 1000.0) as u64,
        // Native runs with UDT4's default buffers (8192 packets, 1.6 BDP at
        // 600 ms), the reference configuration; the satellite controller
        // with the BDP-sized default (8 BDP).
        rcv_buf_pkts: (cc == Kind::Native).then_some(8192),
        mode: lu2k_udt::conn::Mode::Message,
        bin_us: BIN_US,
        paced: None,
    };
    let out = run(&sc);
    assert!(
        out.violations.is_empty(),
        "{cc:?} {rtt_ms} ms {loss}: {:?}",
        out.violations
    );
    let payload_cap = RATE_MBPS * 1e6 / 8.0 * 1456.0 / 1500.0; // bytes/s
    let start = out.connected_at.unwrap_or(0);
    let expect = payload_cap * (1.0 - loss) * ((DURATION_US - start) as f64 / 1e6);
    let util = out.unique_bytes as f64 / expect;
    let delivered = out.delivered_bytes as f64 / expect;
    let target = payload_cap * (1.0 - loss) * 0.9 * BIN_US as f64 / 1e6;
    let t90 = out
        .arrivals
        .iter()
        .enumerate()
        .find(|&(i, &b)| (i as u64) * BIN_US >= start && b as f64 >= target)
        .map(|(i, _)| ((i as u64 + 1) * BIN_US - start) as f64 / (rtt_ms * 1000.0));
    Cell {
        cc,
        rtt_ms,
        loss,
        util,
        delivered,
        t90_rtt: t90,
        retx_pct: 100.0 * out.retransmitted as f64 / out.sent.max(1) as f64,
    }
}

fn table(cells: &[Cell]) -> String {
    let mut s = String::new();
    s.push_str("# lu2k-udt simulation grid: 100 Mbit/s bottleneck, queue 0.5 BDP, 60 s virtual,\n");
    s.push_str("# Bernoulli loss on the wire in both directions; 1 MiB messages, message mode.\n");
    s.push_str(
        "# Native: UDT4's CUDTCC with UDT4's default 8192-packet buffers; Satellite: 8 BDP.\n",
    );
    s.push_str("# From Connected to 60 s, against 100 Mbit/s x 1456/1500 x (1 - loss):\n");
    s.push_str(
        "# util = unique payload received, deliv = payload of messages delivered in order;\n",
    );
    s.push_str(
        "# t90 = RTTs to the first 50 ms bin at >= 90 %; retx = retransmitted / first sent.\n",
    );
    s.push_str("# Columns are explained in tests/sim_grid.rs.\n");
    s.push_str("# Regenerate: LU2K_BLESS=1 cargo test -p lu2k-udt --release --test sim_grid\n");
    s.push_str("controller  rtt_ms  loss_%   util_%  deliv_%  t90_rtt  retx_%\n");
    for c in cells {
        let t90 = c.t90_rtt.map_or("never".to_string(), |t| format!("{t:.1}"));
        s.push_str(&format!(
            "{:<10}  {:>6}  {:>6.1}  {:>7.1}  {:>7.1}  {:>7}  {:>6.2}\n",
            format!("{:?}", c.cc),
            c.rtt_ms,
            c.loss * 100.0,
            c.util * 100.0,
            c.delivered * 100.0,
            t90,
            c.retx_pct
        ));
    }
    s
}

/// `LU2K_GRID_ONE=cc,rtt_ms,loss` (cc 0 = Native, 1 = Satellite) prints one cell.
#[test]
fn one_cell() {
    let Ok(one) = std::env::var("LU2K_GRID_ONE") else {
        eprintln!("LU2K_GRID_ONE not set: nothing to do");
        return;
    };
    let v: Vec<f64> = one.split(',').map(|x| x.parse().unwrap()).collect();
    let cc = if v[0] == 0.0 {
        Kind::Native
    } else {
        Kind::Satellite
    };
    let c = cell(cc, v[1], v[2]);
    eprintln!(
        "util {:.4} delivered {:.4} t90 {:?} retx {:.2} %",
        c.util, c.delivered, c.t90_rtt, c.retx_pct
    );
}

fn compute(ccs: &[Kind]) -> Vec<Cell> {
    let mut jobs = Vec::new();
    for &cc in ccs {
        for rtt in [200.0, 600.0] {
            for loss in [0.0, 0.001, 0.01, 0.05] {
                jobs.push((cc, rtt, loss));
            }
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let jobs = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let job = jobs.lock().unwrap().pop();
                let Some((i, (cc, rtt, loss))) = job else {
                    break;
                };
                let c = cell(cc, rtt, loss);
                results.lock().unwrap().push((i, c));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, c)| c).collect()
}

/// The table must match the checked-in one exactly (the simulation is
/// deterministic): a change in behaviour shows as a diff.
#[test]
fn grid() {
    let cells = compute(&[Kind::Native, Kind::Satellite]);
    let text = table(&cells);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grid.txt");
    if std::env::var_os("LU2K_BLESS").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    eprintln!("{text}");
    let stored = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        stored, text,
        "grid changed; rerun with LU2K_BLESS=1 if intended"
    );
}

/// The satellite controller's goals, on every satellite cell of the grid.
#[test]
fn satellite_goals() {
    let cells = compute(&[Kind::Satellite]);
    let mut failures = Vec::new();
    for c in cells.iter().filter(|c| c.cc == Kind::Satellite) {
        let goal = if c.loss <= 0.01 { 0.97 } else { 0.90 };
        if c.util < goal {
            failures.push(format!(
                "{} ms {} %: util {:.3} < {goal}",
                c.rtt_ms,
                c.loss * 100.0,
                c.util
            ));
        }
        if c.t90_rtt.is_none_or(|t| t > 4.0) {
            failures.push(format!(
                "{} ms {} %: t90 {:?} RTT",
                c.rtt_ms,
                c.loss * 100.0,
                c.t90_rtt
            ));
        }
    }
    assert!(failures.is_empty(), "satellite goals missed: {failures:?}");
}
