//! The `engine` lab test: the engine's own test binaries (its unit tests and
//! engine/tests: io_uring and epoll paths, the end-to-end transfer between two engines
//! and two kshims), run on the lab's kernel. The lab script puts them in
//! `/lab/engine-tests`; each runs with one test thread, and all must pass. Tests that
//! skip themselves (they print `SKIP`) are counted and named in the summary.

use crate::Outcome;
use anyhow::{bail, Context};
use std::process::Command;

const DIR: &str = "/lab/engine-tests";

pub fn run() -> anyhow::Result<Outcome> {
    let Ok(entries) = std::fs::read_dir(DIR) else {
        return Ok(Outcome::Skip(
            "the engine's tests are pending: they did not build for the lab (see the lab's engine-tests.log)".into(),
        ));
    };
    let mut bins: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    bins.sort();
    let (mut passed, mut failed_bins, mut skips) = (0usize, Vec::new(), Vec::new());
    for bin in &bins {
        let name = bin
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let out = Command::new(bin)
            // --nocapture: a test that skips itself says so on stderr, which libtest
            // would otherwise swallow for a passing test.
            .args(["--test-threads=1", "--nocapture"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines() {
            println!("engine/{name}: {line}");
            if line.contains("SKIP") {
                let s = format!("{name}: {}", line.trim());
                if !skips.contains(&s) {
                    skips.push(s);
                }
            }
            if let Some(rest) = line.strip_prefix("test result: ") {
                if let Some(n) = rest
                    .split(';')
                    .find_map(|p| p.trim().strip_suffix(" passed"))
                {
                    passed += n
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .parse::<usize>()
                        .unwrap_or(0);
                }
            }
        }
        if !out.status.success() {
            failed_bins.push(name);
        }
    }
    for s in &skips {
        println!("engine: skipped inside a test: {s}");
    }
    if !failed_bins.is_empty() {
        bail!(
            "engine tests failed on this kernel in: {} ({passed} tests passed elsewhere)",
            failed_bins.join(", ")
        );
    }
    Ok(Outcome::Pass(format!(
        "{} engine test binaries, {passed} tests passed on this kernel; {} distinct skip line(s){}",
        bins.len(),
        skips.len(),
        if skips.is_empty() {
            String::new()
        } else {
            format!(": {}", skips.join(" | "))
        }
    )))
}
