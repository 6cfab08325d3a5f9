//! The RDS back-end end to end: two engines with `--backend rds`, each in its own
//! network namespace, the namespaces joined by a veth pair; kshim A → engine A →
//! RDS/rds_tcp over the veth → engine B → kshim B. Content of every message verified
//! (1 MiB messages take two RDS messages each), one `Ok` completion per send, no
//! payload byte copied by lu2k, SIGTERM → exit 0 (the engine exits only once kshim
//! gave every RX buffer back).
//!
//! Needs root, RDS with rds_tcp, veth and iproute2's `ip`: it runs in the kernel lab
//! (`scripts/kernel-lab.sh`, test `engine`, on Debian's kernel) and skips loudly
//! elsewhere (this build machine's kernel has no RDS).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lu2k_kshim::{Config, Kshim};

mod common;
use common::{missing_tools, nid, not_root, wait_attached, Engine, Netns, Transfer};

/// Why this test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    not_root()
        .or_else(|| {
            lu2k_rds::probe()
                .err()
                .map(|e| format!("no RDS on this kernel: {e}"))
        })
        .or_else(|| missing_tools(&["ip"]))
}

/// Starts an RDS engine inside network namespace `ns` (`ip netns exec` execs
/// the engine, so the child's pid is the engine's).
fn start_engine(ns: &str, dir: &Path, name: &str, ip: Ipv4Addr) -> Engine {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_lu2k-engine")])
        .args(["run", "--backend", "rds", "--kshim-socket"])
        .arg(dir.join(format!("{name}.sock")))
        .args([
            "--bind",
            &ip.to_string(),
            "--port",
            "7988",
            "--stats-socket",
        ])
        .arg(dir.join(format!("{name}-stats.sock")));
    Engine::spawn(cmd)
}

fn kshim(dir: &Path, name: &str, ip: Ipv4Addr) -> Kshim {
    let mut cfg = Config::new(vec![nid(ip)], dir.join(format!("{name}.sock")));
    cfg.cores = 1;
    cfg.tx_pool_len = 32 << 20;
    cfg.rx_buf_count = 256;
    Kshim::start(cfg).unwrap()
}

/// Message sizes: full 1 MiB (two RDS messages), the largest single-message one,
/// small ones and an empty one, interleaved.
fn size_of_msg(n: u64) -> usize {
    match n % 5 {
        0 => 1 << 20,
        1 => lu2k_rds::RDS_MAX_MSG_SIZE - 80,
        2 => 4096,
        3 => 0,
        _ => 100_000,
    }
}

#[test]
fn rds_backend_between_two_namespaces() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIP rds_backend_between_two_namespaces: {why}; it runs in the kernel lab (scripts/kernel-lab.sh --tests engine)");
        return;
    }
    let tag = format!("l2r{}", std::process::id() % 10000);
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    let _ns = Netns::pair(&tag, &[a_ip], &[b_ip]).expect("namespaces and veth");
    let dir: PathBuf = std::env::temp_dir().join(format!("lu2k-rds-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ka = kshim(&dir, "a", a_ip);
    let mut kb = kshim(&dir, "b", b_ip);
    let ea = start_engine(&format!("{tag}a"), &dir, "a", a_ip);
    let eb = start_engine(&format!("{tag}b"), &dir, "b", b_ip);
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let count = 40u64;
    let (na, nb) = (nid(a_ip), nid(b_ip));
    let mut t = Transfer::new("", na, nb, count, size_of_msg);
    let deadline = Instant::now() + Duration::from_secs(150);
    let started = Instant::now();
    while !t.finished() {
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(5));
    }
    let bytes: usize = (0..count).map(size_of_msg).sum();
    eprintln!(
        "rds: {count} messages, {bytes} bytes over RDS/rds_tcp across namespaces in {:.2} s (informational)",
        started.elapsed().as_secs_f64()
    );
    for name in ["a", "b"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
            .args(["stats", "--json", "--socket"])
            .arg(dir.join(format!("{name}-stats.sock")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: lu2k_engine::daemon::stats::Report = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r.payload_copied(), 0, "engine {name} copied payload");
    }
    assert_eq!(
        ea.term_within(Duration::from_secs(30)).code(),
        Some(0),
        "engine A exit status"
    );
    assert_eq!(
        eb.term_within(Duration::from_secs(30)).code(),
        Some(0),
        "engine B exit status"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
