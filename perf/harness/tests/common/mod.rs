//! What the harness's end-to-end tests share: the binary, a scratch folder, and one
//! `lu2k-perf run` with every output written.
// Each test crate compiles this module and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The `lu2k-perf` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lu2k-perf")
}

/// A fresh scratch folder for test `tag`.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lu2k-perf-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What one run wrote: the JSON rows, the table on stdout and the CSV text.
pub struct RunOutput {
    pub rows: Vec<Value>,
    pub stdout: String,
    pub csv: String,
}

/// `lu2k-perf run SCENARIO --runs 1 --json --csv --out DIR` (plots land in
/// `dir`); the run must succeed. Its output is echoed for the test log.
pub fn run_scenario(scenario: &Path, dir: &Path) -> RunOutput {
    run_scenario_with(scenario, dir, &["--runs", "1"])
}

/// [`run_scenario`] with other arguments.
pub fn run_scenario_with(scenario: &Path, dir: &Path, args: &[&str]) -> RunOutput {
    let json = dir.join("out.json");
    let csv = dir.join("out.csv");
    let out = Command::new(bin())
        .arg("run")
        .arg(scenario)
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lu2k-perf run failed");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    RunOutput {
        rows: v.as_array().unwrap().clone(),
        stdout,
        csv: std::fs::read_to_string(&csv).unwrap(),
    }
}

/// The row carries the machine's load averages before and after it and the
/// steal time, and says so in its note when a 1-minute figure exceeded the
/// CPUs or the steal 5 % (the harness README's rule).
pub fn load_avg_recorded(r: &Value) {
    let l = &r["load_avg"];
    let one = |k: &str| {
        l[k][0]
            .as_f64()
            .unwrap_or_else(|| panic!("load_avg.{k}: {r}"))
    };
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let loaded = r["note"]
        .as_str()
        .is_some_and(|n| n.contains("loaded machine"));
    let peak = l["peak_1m"].as_f64().unwrap();
    assert!(peak >= one("start").max(one("end")), "{r}");
    let steal = r["steal"].as_f64().unwrap_or_else(|| panic!("steal: {r}"));
    assert!((0.0..=1.0).contains(&steal), "{r}");
    assert_eq!(loaded, peak > cpus || steal > 0.05, "{r}");
}
