//! The gateway cell end to end, for real: `lu2k-perf gateway` on
//! gateway.toml's test cell (3 pairs, each a sending and a receiving node of
//! kshim + engine processes, over one 50 Mbit/s, 40 ms, 0.1 % loss link
//! emulated by one linkem model). Nothing is mocked. TCP BBR runs its 3 flows
//! through the TUN link as root; otherwise its row says it was skipped.

use std::path::Path;
use std::process::Command;

mod common;
use common::{bin, tmp};

const CELL: &str = "40ms/0.1%/50M/3pairs";

fn jain(xs: &[f64]) -> f64 {
    let s: f64 = xs.iter().sum();
    s * s / (xs.len() as f64 * xs.iter().map(|x| x * x).sum::<f64>())
}

#[test]
fn three_pairs_share_one_link_and_every_put_is_verified() {
    let dir = tmp("gateway");
    let json = dir.join("gw.json");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/gateway.toml");
    let out = Command::new(bin())
        .arg("gateway")
        .arg(&scenario)
        .args(["--quick", "--cells", CELL, "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lu2k-perf gateway failed");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 3, "lu2k, lu2k-share and tcp-bbr rows");
    for name in ["lu2k", "lu2k-share"] {
        let l = rows.iter().find(|r| r["contender"] == name).unwrap();
        assert_eq!(l["status"], "ok", "{l}");
        assert_eq!(l["pairs"], 3);
        // 4 MiB per pair under --quick: 4 PUTs of 1 MiB each, all verified once.
        assert_eq!(l["puts_expected"], 12, "{l}");
        assert_eq!(l["puts_verified"], 12, "{l}");
        for k in ["puts_corrupt", "puts_duplicate", "puts_failed"] {
            assert_eq!(l[k], 0, "{k}: {l}");
        }
        assert_eq!(l["bytes"], 12 << 20);
    }
    let lu2k = rows.iter().find(|r| r["contender"] == "lu2k").unwrap();
    // lu2k-share: each pair's engines capped at a third of the link
    // (max_rate_mbps, in IP packets), so no pair's payload beats that.
    let share = rows
        .iter()
        .find(|r| r["contender"] == "lu2k-share")
        .unwrap();
    for g in share["pair_goodput_mbps"].as_array().unwrap() {
        let g = g.as_f64().unwrap();
        assert!(
            g <= 50.0 / 3.0 * 1456.0 / 1500.0 * 1.02,
            "lu2k-share pair at {g} Mbit/s"
        );
    }
    for r in &rows {
        let name = r["contender"].as_str().unwrap();
        if r["status"].as_str().unwrap().starts_with("skipped") {
            eprintln!("SKIP gateway {name}: {}", r["status"]);
            continue;
        }
        let pair: Vec<f64> = r["pair_goodput_mbps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(pair.len(), 3, "{name}: one figure per pair");
        assert!(
            pair.iter().all(|&g| g > 0.0 && g < 50.0),
            "{name}: {pair:?}"
        );
        // The row's index is Jain's on its own per-pair figures.
        let j = r["jain"].as_f64().unwrap();
        assert!((j - jain(&pair)).abs() < 1e-9, "{name}: jain {j}");
        assert!(j > 1.0 / 3.0 && j <= 1.0, "{name}: jain {j}");
        // The aggregate: all pairs' bytes over the whole window can never
        // exceed what the link carries.
        let g = r["goodput_mbps"].as_f64().unwrap();
        let u = r["utilization"].as_f64().unwrap();
        assert!(g > 0.0 && g < 50.0, "{name}: goodput {g}");
        assert!(u > 0.0 && u <= 1.0, "{name}: utilization {u}");
        assert!((u - g / (50.0 * 0.999)).abs() < 1e-9, "{name}");
        // Each pair alone is no faster than the link, and the aggregate at
        // least the slowest pair.
        let min = pair.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(
            g >= min * 0.99,
            "{name}: aggregate {g} below the slowest pair {min}"
        );
        let wire = r["wire_bytes"].as_u64().unwrap();
        assert!(
            wire >= r["bytes"].as_u64().unwrap(),
            "{name}: link saw {wire}"
        );
        let (fair, own) = (
            r["cpu_s"].as_f64().unwrap(),
            r["proc_cpu_s"].as_f64().unwrap(),
        );
        assert!(
            own > 0.0 && fair >= 0.5 * own - 0.5,
            "{name}: fair {fair}, processes {own}"
        );
        let gb = r["bytes"].as_f64().unwrap() / 1e9;
        assert!((r["cpu_s_per_gb"].as_f64().unwrap() - fair / gb).abs() < 1e-6 * fair / gb);
        let (sum, max) = (
            r["rss_sum_mib"].as_f64().unwrap(),
            r["rss_max_mib"].as_f64().unwrap(),
        );
        assert!(
            max > 1.0 && sum >= max && sum <= 6.0 * max + 1e-9,
            "{name}: RSS {sum} {max}"
        );
        common::load_avg_recorded(r);
    }
    // Six engines (3 senders, 3 receivers), each its own process.
    assert!(lu2k["node_rss_sum_mib"].as_f64().unwrap() > 0.0);
    // Where the processes' CPU went: the engines and the node processes,
    // within the processes' total; the engines slept and sent.
    let (e, n) = (
        lu2k["engines_cpu_s"].as_f64().unwrap(),
        lu2k["nodes_cpu_s"].as_f64().unwrap(),
    );
    let own = lu2k["proc_cpu_s"].as_f64().unwrap();
    assert!(
        e > 0.0 && n > 0.0 && e + n <= own * 1.05 + 0.1,
        "{e} + {n} vs {own}"
    );
    let k = &lu2k["engine_counts"];
    assert!(k["datagrams_sent"].as_u64().unwrap() > 12 * 700, "{k}");
    assert!(k["passes"].as_u64().unwrap() > 0, "{k}");
    assert!(stdout.contains("Jain"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_gateway_file_is_refused_naming_the_field() {
    let dir = tmp("gateway-bad");
    let p = dir.join("bad.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/gateway.toml"),
    )
    .unwrap()
    .replace("pairs = 3", "pairs = 0");
    std::fs::write(&p, text).unwrap();
    let out = Command::new(bin()).arg("gateway").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cell[4].pairs"), "{err}");
    let out = Command::new(bin())
        .arg("gateway")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/gateway.toml"))
        .args(["--cells", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cell named"));
    let _ = std::fs::remove_dir_all(&dir);
}
