//! The rpc and live workloads end to end, for real: `lu2k-perf run` on tiny
//! rpc and live scenarios over a 40 ms, 50 Mbit/s link emulated by linkem's
//! UDP relay, lu2k (kshim + engine processes) beside UDT4. Nothing is mocked.
//!
//! No speed is asserted, only what the measurement must respect whatever the
//! machine's load: every round trip or delivery takes at least the link's
//! propagation delay, percentiles are ordered, every request or chunk is
//! counted once.

mod common;
use common::{run_scenario, tmp};
use serde_json::Value;

const LINK: &str = r#"
[link.forward]
queue_bytes = 500_000
overhead_bytes = 28
[link.reverse]
queue_bytes = 500_000
overhead_bytes = 28

[[cell]]
name = "40ms/0%/50M"
rtt_ms = 40.0
rate_mbps = 50.0
"#;

/// Runs `scenario` (TOML text) and returns the JSON rows, the table and the CSV.
fn run(tag: &str, scenario: &str) -> (Vec<Value>, String, String) {
    let dir = tmp(tag);
    let toml = dir.join(format!("{tag}.toml"));
    std::fs::write(&toml, format!("{scenario}{LINK}")).unwrap();
    let out = run_scenario(&toml, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    (out.rows, out.stdout, out.csv)
}

/// The row's latency percentiles, checked for order and the propagation floor.
fn latency(r: &Value, floor_ms: f64, samples: u64) {
    let name = r["contender"].as_str().unwrap();
    let l = &r["latency"];
    assert_eq!(l["samples"], samples, "{name}: {r}");
    let p = |k: &str| l[k].as_f64().unwrap();
    let (p50, p90, p99, max) = (p("p50_ms"), p("p90_ms"), p("p99_ms"), p("max_ms"));
    assert!(
        floor_ms <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{name}: percentiles {p50} {p90} {p99} {max} ms against a {floor_ms} ms floor"
    );
}

#[test]
fn rpc_round_trips_through_the_relay() {
    let (rows, table, csv) = run(
        "rpc",
        r#"
name = "tiny-rpc"
contenders = ["lu2k", "udt4"]
seed = 4
[workload]
kind = "rpc"
size = 72
count = 6
max_duration_s = 20.0
"#,
    );
    assert_eq!(rows.len(), 2, "one row per contender x cell");
    assert!(table.contains("p50 ms") && table.contains("lu2k") && table.contains("udt4"));
    assert_eq!(csv.lines().count(), 3);
    for r in &rows {
        let name = r["contender"].as_str().unwrap();
        assert_eq!(r["workload"], "rpc");
        assert_eq!(r["status"], "ok", "{name}: {r}");
        // Each counted round trip carried a 72-byte request and its reply.
        assert_eq!(r["bytes"], 6 * 2 * 72, "{name}");
        // A round trip crosses the 40 ms path both ways.
        latency(r, 40.0, 6);
        let wire = r["wire_bytes"].as_u64().unwrap();
        assert!(wire >= 7 * 72, "{name}: the link saw only {wire} bytes");
    }
}

#[test]
fn live_stream_through_the_relay() {
    // 8 KiB chunks at 4 Mbit/s (one every 16.384 ms) for 1 s: 62 chunks.
    let (rows, table, csv) = run(
        "live",
        r#"
name = "tiny-live"
contenders = ["lu2k", "udt4"]
seed = 6
[workload]
kind = "live"
stream_mbps = 4.0
chunk_bytes = 8192
duration_s = 1.0
max_duration_s = 20.0
"#,
    );
    assert_eq!(rows.len(), 2, "one row per contender x cell");
    assert!(table.contains("p99 ms") && table.contains("lu2k") && table.contains("udt4"));
    assert_eq!(csv.lines().count(), 3);
    for r in &rows {
        let name = r["contender"].as_str().unwrap();
        assert_eq!(r["workload"], "live");
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert_eq!(r["bytes"], 62 * 8192, "{name}");
        let note = r["note"].as_str().unwrap();
        assert!(note.contains("62 of 62 chunks delivered"), "{name}: {note}");
        // A chunk crosses the 40 ms path one way.
        latency(r, 20.0, 62);
        assert!(r["goodput_mbps"].as_f64().unwrap() > 0.0);
        // No goodput above what the link carries (50 Mbit/s, 1.02 for the
        // loss drawn at random falling short of the cell's).
        let u = r["utilization"].as_f64().unwrap();
        assert!(u > 0.0 && u <= 1.02, "{name}: utilization {u}");
        common::load_avg_recorded(r);
    }
}
