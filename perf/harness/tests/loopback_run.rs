//! `lu2k-perf loopback --json` end to end, for real and small: every contender runs
//! (lu2k's kshim + engine processes, the reference UDT4, the raw UDP blasts and
//! ping-pongs) and the JSON carries what the issue names. No speed is asserted, only
//! what any run must respect: every figure present and positive, lu2k copied nothing,
//! percentiles ordered.

mod common;
use common::{bin, tmp};

#[test]
fn loopback_json_has_every_contender() {
    let dir = tmp("loopback");
    let json = dir.join("loopback.json");
    let out = std::process::Command::new(bin())
        .args([
            "loopback",
            "--runs",
            "1",
            "--mib",
            "16",
            "--round-trips",
            "20",
        ])
        .args(["--udt4-round-trips", "10", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lu2k-perf loopback failed");
    assert!(stdout.contains("bulk over loopback") && stdout.contains("round trips"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "lu2k_gbps",
        "lu2k_sealed_gbps",
        "udt4_gbps",
        "udp_ceiling_gbps",
        "udp_64mib_gbps",
    ] {
        let g = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(g > 0.0, "{key} = {g}");
    }
    assert_eq!(v["lu2k_copied_bytes"], 0, "lu2k copied payload");
    assert_eq!(
        v["lu2k_sealed_copied_bytes"], 0,
        "sealed lu2k copied payload"
    );
    let rtt = v["rtt"].as_array().unwrap();
    for contender in ["udp", "udp-3hop", "udt4", "lu2k"] {
        for size in [72, 4096] {
            let row = rtt
                .iter()
                .find(|r| r["contender"] == contender && r["size"] == size)
                .unwrap_or_else(|| panic!("no {contender} {size} B row: {v}"));
            let p = |k: &str| row[k].as_f64().unwrap();
            assert!(
                0.0 < p("p50_us") && p("p50_us") <= p("p99_us") && p("p99_us") <= p("max_us"),
                "{contender} {size} B: {row}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
