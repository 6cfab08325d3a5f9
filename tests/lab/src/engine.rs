//! The `engine` lab test: the engine's own test binaries (its unit tests and
//! engine/tests: io_uring and epoll paths, the end-to-end transfer between two engines
//! and two kshims), run on the lab's kernel. The lab script puts them in
//! `/lab/engine-tests`; each test runs alone (one process, a time limit), and all must pass. Tests that
//! skip themselves (they print `SKIP`) are counted and named in the summary.

use crate::Outcome;
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DIR: &str = "/lab/engine-tests";

pub fn run() -> anyhow::Result<Outcome> {
    let Ok(entries) = std::fs::read_dir(DIR) else {
        return Ok(Outcome::Skip(
            "the engine's tests are pending: they did not build for the lab (see the lab's engine-tests.log)".into(),
        ));
    };
    let mut bins: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    bins.sort();
    let (mut passed, mut failed, mut skips) = (0usize, Vec::new(), Vec::new());
    let limit = per_test_limit();
    for bin in &bins {
        let name = bin
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // One process per test: a test that hangs is killed and named, and the
        // binary's other tests still run.
        for test in list_tests(bin)? {
            let run = run_streaming(bin, &name, &test, limit)?;
            for line in run.lines.iter() {
                if line.contains("SKIP") {
                    let s = format!("{name}: {}", line.trim());
                    if !skips.contains(&s) {
                        skips.push(s);
                    }
                }
            }
            if run.timed_out {
                println!(
                    "engine/{name}: {test} did not finish within {} s; killed",
                    limit.as_secs()
                );
                failed.push(format!("{name}::{test} (timed out)"));
            } else if run.success {
                passed += 1;
            } else {
                failed.push(format!("{name}::{test}"));
            }
        }
    }
    for s in &skips {
        println!("engine: skipped inside a test: {s}");
    }
    if !failed.is_empty() {
        bail!(
            "engine tests failed on this kernel: {} ({passed} tests passed)",
            failed.join(", ")
        );
    }
    Ok(Outcome::Pass(format!(
        "{passed} engine tests ({} binaries) passed on this kernel; {} distinct skip line(s){}",
        bins.len(),
        skips.len(),
        if skips.is_empty() {
            String::new()
        } else {
            format!(": {}", skips.join(" | "))
        }
    )))
}

/// How long one test may run before it is killed and named as hung: the whole VM has
/// a wall-clock limit, and a hang must name its test rather than eat that limit.
/// `lu2k.engine_test_timeout=SECS` on the kernel command line overrides the default.
fn per_test_limit() -> Duration {
    let from_cmdline = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
        c.split_whitespace()
            .find_map(|w| w.strip_prefix("lu2k.engine_test_timeout="))
            .and_then(|v| v.parse::<u64>().ok())
    });
    Duration::from_secs(from_cmdline.unwrap_or(180))
}

/// The names of a libtest binary's tests (`--list --format terse`: `name: test`).
fn list_tests(bin: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(bin)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

struct TestRun {
    lines: Vec<String>,
    success: bool,
    timed_out: bool,
}

/// Runs one test of a test binary, printing its output as it comes (so the console
/// shows how far a slow or hanging test got) and killing it after `limit`.
fn run_streaming(
    bin: &std::path::Path,
    name: &str,
    test: &str,
    limit: Duration,
) -> anyhow::Result<TestRun> {
    let mut child = Command::new(bin)
        // --nocapture: a test that skips itself says so on stderr, which libtest
        // would otherwise swallow for a passing test.
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut timed_out = false;
    let mut exited = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                println!("engine/{name}: {line}");
                lines.push(line);
                continue;
            }
            // Both pipes closed: the binary has exited (or closed its output).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Processes a test started (engines, kshims) may hold the pipes open after the
        // binary itself has exited: its exit, not the pipes, ends the run.
        if let Some(status) = child.try_wait().context("waiting for a test binary")? {
            exited = Some(status);
            break;
        }
        if started.elapsed() >= limit {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let status = match exited {
        Some(s) => s,
        None => child.wait().context("waiting for a test binary")?,
    };
    // Whatever is still buffered (without waiting on orphans that hold the pipes).
    while let Ok(line) = rx.try_recv() {
        println!("engine/{name}: {line}");
        lines.push(line);
    }
    drop(readers);
    println!(
        "engine/{name}: {test}: exited ({status}) after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(TestRun {
        lines,
        success: status.success(),
        timed_out,
    })
}
