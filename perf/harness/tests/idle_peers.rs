//! `lu2k-perf idle-peers` end to end, for real: the measured kshim + engine
//! and 5 peer nodes (a kshim and an engine process each) on loopback
//! addresses, each peer's one message delivered, then a few idle seconds
//! measured, beside the no-peer baseline.

use std::process::Command;

use serde_json::Value;

mod common;
use common::bin;

#[test]
fn idle_engine_with_five_peers_reports_every_peer_connected_and_sane_figures() {
    let out = Command::new(bin())
        .args([
            "idle-peers",
            "--peers",
            "5",
            "--seconds",
            "3",
            "--settle",
            "1",
        ])
        .output()
        .expect("running lu2k-perf idle-peers");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "idle-peers failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let rows: Vec<Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("result "))
        .map(|j| serde_json::from_str(j).expect("a result line is JSON"))
        .collect();
    assert_eq!(rows.len(), 2, "the baseline and the 5-peer row:\n{stdout}");
    for (r, peers) in rows.iter().zip([0, 5]) {
        assert_eq!(r["peers"], peers, "{r}");
        assert_eq!(r["connected"], peers, "every peer connected: {r}");
        let secs = r["seconds"].as_f64().unwrap();
        assert!((2.9..10.0).contains(&secs), "measured about 3 s: {r}");
        for k in ["cpu_pct", "cpu_pct_schedstat"] {
            let v = r[k].as_f64().unwrap();
            // An idle engine: far under a core, and at least nothing.
            assert!(v.is_finite() && (0.0..50.0).contains(&v), "{k}: {r}");
        }
        for k in [
            "wakes_per_s",
            "passes_per_s",
            "timers_per_s",
            "datagrams_tx_per_s",
            "recvs_per_s",
            "enters_per_s",
        ] {
            let v = r[k].as_f64().unwrap();
            assert!(v.is_finite() && v >= 0.0, "{k}: {r}");
        }
        assert!(r["rss_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Idle connections still answer keep-alives: with peers connected the
    // engine sends and receives datagrams; with none it sends nothing.
    assert_eq!(rows[0]["datagrams_tx_per_s"], 0.0, "{}", rows[0]);
    assert!(
        rows[1]["datagrams_tx_per_s"].as_f64().unwrap() > 0.0
            && rows[1]["recvs_per_s"].as_f64().unwrap() > 0.0,
        "keep-alives with 5 peers: {}",
        rows[1]
    );
}
