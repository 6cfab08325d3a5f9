//! The live stream behind a 64-byte first message, end to end: lu2k's real
//! engines (kshim + engine processes per side) through the relay on the
//! seed's path (200 ms, 100 Mbit/s, 1 % loss each way), 20 Mbit/s of 64 KiB
//! chunks for 6 s after a 64-byte warm-up message, three runs.
//!
//! Behind such a message the stream used to fall seconds behind (the issue
//! saw it in 5 of 7 harness runs; the harness README's measurements, 2 of 16
//! with p90 ≈ 800 ms and p99 ≈ 1 s): the satellite controller's start took
//! the lone packet's missing packet pair and a sender-limited arrival rate
//! for the path (`backends/udt/tests/sim_live.rs` has the cause, on virtual
//! time). Here every run must deliver every chunk, each within 4.5 round
//! trips (900 ms) at p99 — the bound sim_live holds on virtual time; the
//! runs after the fix measured p99 ≤ 703 ms.

use serde_json::Value;

mod common;
use common::{run_scenario_with, tmp};

const SCENARIO: &str = r#"
name = "live-first-message"
contenders = ["lu2k"]
seed = 9

[workload]
kind = "live"
stream_mbps = 20.0
chunk_bytes = 65_536
duration_s = 6.0
max_duration_s = 5.0
warmup_bytes = 64

[link.forward]
queue_bytes = 2_500_000
overhead_bytes = 28
[link.reverse]
queue_bytes = 2_500_000
overhead_bytes = 28

[[cell]]
name = "200ms/1%/100M"
rtt_ms = 200.0
loss = 0.01
rate_mbps = 100.0
"#;

#[test]
fn a_small_first_message_does_not_hold_the_stream_back() {
    let dir = tmp("live-first");
    let toml = dir.join("live-first.toml");
    std::fs::write(&toml, SCENARIO).unwrap();
    let out = run_scenario_with(&toml, &dir, &["--runs", "3"]);
    assert_eq!(out.rows.len(), 1);
    let r: &Value = &out.rows[0];
    assert_eq!(r["runs"], 3);
    let p99s: Vec<Option<f64>> = r["p99_runs_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect();
    assert_eq!(p99s.len(), 3, "{r}");
    // Chunks still missing at the end count at their age, so a stream that
    // fell behind shows in its p99 even where it did not finish.
    for (i, p) in p99s.iter().enumerate() {
        let p = p.unwrap_or_else(|| panic!("run {i}: no latency samples: {r}"));
        assert!(p >= 100.0, "run {i}: p99 {p} ms below the one-way delay");
        assert!(p <= 900.0, "run {i}: p99 {p} ms, over 4.5 round trips: {r}");
    }
    assert_eq!(r["status"], "ok", "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}
