//! Every contender runs with the settings the tuning table gives for its
//! path: a real run of `tuning.toml` (200 ms, 50 Mbit/s, a 1.25 MB queue;
//! path window 2.5 MB), each row's `tuning` (what the nodes applied, read
//! back from the sockets where the transport allows) checked against the
//! figures the rules give. TCP needs root, SRT srt-tools: a row skipped for
//! that prints SKIP and is not checked.

use std::path::Path;

mod common;
use common::{run_scenario, tmp};

/// (contender, what its `tuning` must contain).
const EXPECTED: &[(&str, &[&str])] = &[
    // UDT_FC = 2.5 MB / 1500 B; the buffers hold that many 1472-byte packets.
    (
        "udt4",
        &["UDT_FC=1667 ", "UDT_SNDBUF=2453824 ", "UDT_RCVBUF=2453824 "],
    ),
    // 2 × 2.5 MB / 1456 B is under SRT's default flow window (25600), which
    // stays; maxbw is the link's 50 Mbit/s in bytes per second.
    (
        "srt",
        &[
            "transtype=file",
            "fc=25600",
            "sndbuf=37273600",
            "rcvbuf=37273600",
            "maxbw=6250000",
            "peeridletimeo=5000",
            "conntimeo=3000",
        ],
    ),
    // Forced buffers of 2 × 2.5 MB; the kernel reports them doubled.
    (
        "tcp-cubic",
        &[
            "TCP_CONGESTION=cubic",
            "SO_SNDBUF=10000000",
            "SO_RCVBUF=10000000",
        ],
    ),
    (
        "tcp-bbr",
        &["TCP_CONGESTION=bbr", "SO_SNDBUF=10000000", "qdisc: "],
    ),
    // Windows of the path window, at least 4 MiB; the initial RTT the path's.
    (
        "quic-cubic",
        &["quinn CUBIC", "window 4194304 B", "initial_rtt 200 ms"],
    ),
    (
        "quic-bbr",
        &["quinn BBR", "window 4194304 B", "initial_rtt 200 ms"],
    ),
];

#[test]
fn every_contender_runs_with_the_tuning_for_its_path() {
    let dir = tmp("tuning");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/tuning.toml");
    let out = run_scenario(&scenario, &dir);
    assert_eq!(out.rows.len(), EXPECTED.len());
    let mut checked = 0;
    for (name, wants) in EXPECTED {
        let r = out
            .rows
            .iter()
            .find(|r| r["contender"] == *name)
            .unwrap_or_else(|| panic!("no row for {name}"));
        let status = r["status"].as_str().unwrap();
        if let Some(why) = status.strip_prefix("skipped: ") {
            eprintln!("SKIP tuning of {name}: {why}");
            continue;
        }
        assert_eq!(status, "ok", "{name} did not finish: {r}");
        let tuning = r["tuning"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no tuning in the row: {r}"));
        for w in *wants {
            assert!(tuning.contains(w), "{name}: `{w}` not in `{tuning}`");
        }
        checked += 1;
    }
    // UDT4 and QUIC need nothing this machine may lack.
    assert!(checked >= 3, "only {checked} contenders checked");
    let _ = std::fs::remove_dir_all(&dir);
}
