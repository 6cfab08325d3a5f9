//! Prometheus metrics of a running engine, during a real transfer: kshim A →
//! engine A → UDT over UDP on loopback → engine B → kshim B carries verified
//! 1 MiB PUTs while the test scrapes engine A's `/metrics` twice: once the
//! first message arrived, and after the last.
//!
//! Each scrape is parsed by a real parser (Python `prometheus_client`'s
//! OpenMetrics parser, installed into `target/pyenv` by `scripts/setup.sh`):
//! the exposition is valid, the expected families are there with their labels,
//! every counter only grew between the scrapes, and every metric the shipped
//! Grafana dashboard and alert rules name exists in a scrape.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{kshim, nid, start_engine, tmpdir, wait_attached, Transfer};

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 71);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 72);
const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 74);
const COUNT: u64 = 256;
const LEN: usize = 1 << 20;

/// Parses OpenMetrics text files given as arguments; prints, per file, the
/// families (name → type) and samples (name, labels, value) as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for path in sys.argv[1:]:
    text = open(path).read()
    fams, samples = {}, []
    for f in text_string_to_metric_families(text):
        fams[f.name] = f.type
        for s in f.samples:
            samples.append([s.name, s.labels, s.value, f.type])
    out.append({"families": fams, "samples": samples})
print(json.dumps(out))
"#;

/// Reads the alert rules and prints every rule's name and expression as JSON.
const RULES: &str = r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
rules = []
for g in doc["groups"]:
    assert g["name"] and g["rules"], g
    for r in g["rules"]:
        assert set(r) >= {"alert", "expr", "labels", "annotations"}, r
        assert r["labels"].get("severity"), r
        assert r["annotations"].get("summary"), r
        rules.append({"alert": r["alert"], "expr": str(r["expr"])})
print(json.dumps(rules))
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python that has the parser: `LU2K_TEST_PYTHON` (set by scripts/test.sh,
/// then required), else the venv scripts/setup.sh makes.
fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LU2K_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = workspace().join("target/pyenv/bin/python");
    let ok = Command::new(&p)
        .args(["-c", "import prometheus_client, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(p)
}

fn run_py(py: &Path, script: &str, args: &[&Path]) -> serde_json::Value {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET path` over HTTP/1.1; the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// A sample's identity: name and sorted labels.
type Key = (String, BTreeMap<String, String>);

fn samples(scrape: &serde_json::Value) -> BTreeMap<Key, (f64, String)> {
    scrape["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (
                (s[0].as_str().unwrap().to_string(), labels),
                (s[2].as_f64().unwrap(), s[3].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

fn value(s: &BTreeMap<Key, (f64, String)>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), want))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .0
}

/// Every `lu2k_*` name in `text` (a PromQL expression or the dashboard JSON).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("lu2k_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Runs the transfer, scraping engine A when the first message has arrived and
/// again after the last; returns the two expositions.
/// `config`: a config file both engines read (the sealed run's key); `after`
/// runs once the last message is in, before the second scrape, with engine A's
/// UDP address.
fn transfer_and_scrape(
    dir: &Path,
    metrics: SocketAddr,
    config: Option<&str>,
    count: u64,
    after: impl FnOnce(SocketAddr),
) -> (String, String) {
    let port = metrics.port() + 1;
    let mut ka = kshim(dir, "a", A_IP, 1);
    let mut kb = kshim(dir, "b", B_IP, 1);
    let metrics_arg = metrics.to_string();
    let mut a_args = vec!["--metrics-listen", metrics_arg.as_str()];
    let mut b_args = vec![];
    if let Some(c) = config {
        a_args.extend(["--config", c]);
        b_args.extend(["--config", c]);
    }
    let ea = start_engine(dir, "a", A_IP, port, &a_args);
    let eb = start_engine(dir, "b", B_IP, port, &b_args);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_attached(&mut ka, deadline);
    wait_attached(&mut kb, deadline);

    let mut t = Transfer::new("", nid(A_IP), nid(B_IP), count, |_| LEN);
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.finished() {
        t.assert_before(deadline);
        t.step(&mut ka, &mut kb, Duration::from_millis(2));
        if first.is_none() && t.got >= 1 {
            let (status, body) = get(metrics, "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            first = Some(body);
        }
    }
    after(SocketAddr::from((A_IP, port)));
    // A core publishes every 100 ms while busy, and what its last messages did
    // before it sleeps: let the last counters land.
    std::thread::sleep(Duration::from_millis(400));
    let (status, second) = get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (status, _) = get(metrics, "/nothing");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    for (name, e) in [("a", ea), ("b", eb)] {
        assert_eq!(
            e.term_within(Duration::from_secs(20)).code(),
            Some(0),
            "engine {name} exit status"
        );
    }
    (first.expect("a scrape during the transfer"), second)
}

#[test]
fn scrape_during_a_transfer() {
    let Some(py) = python() else {
        eprintln!(
            "SKIP scrape_during_a_transfer: no Python with prometheus_client and yaml; \
             run scripts/setup.sh (it makes target/pyenv)"
        );
        return;
    };
    let dir = tmpdir("metrics");
    let port = 20000 + (std::process::id() % 20000) as u16 + 201;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (first, second) = transfer_and_scrape(&dir, addr, None, COUNT, |_| {});
    let (f1, f2) = (dir.join("scrape1.txt"), dir.join("scrape2.txt"));
    std::fs::write(&f1, &first).unwrap();
    std::fs::write(&f2, &second).unwrap();
    let parsed = run_py(&py, PARSER, &[&f1, &f2]);
    let (s1, s2) = (samples(&parsed[0]), samples(&parsed[1]));

    // What an operator looks at, with the labels the dashboard uses.
    let core = [("core", "0")];
    let peer = nid(B_IP).to_string();
    let peer = [("nid", peer.as_str())];
    let info = s2
        .iter()
        .find(|((n, _), _)| n == "lu2k_info")
        .expect("lu2k_info");
    assert_eq!(info.0 .1["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info.0 .1["backend"], "udt");
    assert!(["io_uring", "epoll"].contains(&info.0 .1["io_path"].as_str()));
    assert_eq!(value(&s2, "lu2k_peer_up", &peer), 1.0);
    assert_eq!(value(&s2, "lu2k_peers", &[("state", "up")]), 1.0);
    assert_eq!(
        value(&s2, "lu2k_peer_sent_messages_total", &peer),
        COUNT as f64
    );
    assert_eq!(
        value(&s2, "lu2k_peer_sent_payload_bytes_total", &peer),
        (COUNT as usize * LEN) as f64
    );
    assert!(value(&s2, "lu2k_core_sent_bytes_total", &core) > (COUNT as usize * LEN) as f64);
    assert!(value(&s2, "lu2k_peer_rtt_seconds", &peer) > 0.0);
    assert!(value(&s2, "lu2k_peer_send_rate_bytes_per_second", &peer) > 0.0);
    assert_eq!(
        value(&s2, "lu2k_core_payload_copied_bytes_total", &core),
        0.0
    );
    assert_eq!(
        value(&s2, "lu2k_core_tx_completions_total", &core),
        COUNT as f64
    );
    assert!(value(&s2, "lu2k_core_rx_pool_buffers", &core) >= 1024.0);
    assert!(value(&s2, "lu2k_core_tx_message_slots", &core) > 0.0);
    // The first scrape may predate the cores' first publication of the peer.
    let mid = s1
        .get(&(
            "lu2k_peer_sent_messages_total".to_string(),
            [("nid".to_string(), peer[0].1.to_string())].into(),
        ))
        .map_or(0.0, |v| v.0);
    assert!(
        mid < COUNT as f64,
        "the first scrape is mid-transfer: {mid} of {COUNT} sent"
    );

    // Counters only grow; every series of the first scrape is in the second.
    let mut grew = 0;
    for (k, (v1, kind)) in &s1 {
        let Some((v2, _)) = s2.get(k) else {
            panic!("series {k:?} vanished between scrapes");
        };
        if kind == "counter" {
            assert!(v2 >= v1, "counter {k:?} went from {v1} to {v2}");
            grew += usize::from(v2 > v1);
        }
    }
    assert!(grew >= 5, "only {grew} counters grew during the transfer");

    // The dashboard and the alert rules name only metrics that exist.
    let mut exposed: BTreeSet<String> = BTreeSet::new();
    for scrape in [&parsed[0], &parsed[1]] {
        // A family without samples yet (no drops) is named by its sample names.
        for (name, kind) in scrape["families"].as_object().unwrap() {
            match kind.as_str().unwrap() {
                "counter" => exposed.insert(format!("{name}_total")),
                "info" => exposed.insert(format!("{name}_info")),
                _ => exposed.insert(name.clone()),
            };
        }
    }
    exposed.extend(s1.keys().chain(s2.keys()).map(|(n, _)| n.clone()));
    let rules_path = workspace().join("packaging/prometheus-alerts.yml");
    let rules = run_py(&py, RULES, &[&rules_path]);
    let alerts: BTreeSet<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for want in [
        "Lu2kPeerDown",
        "Lu2kLinkUtilizationCollapse",
        "Lu2kRxPoolExhausted",
        "Lu2kRetransmissionRatioHigh",
    ] {
        assert!(alerts.contains(want), "alert {want} missing: {alerts:?}");
    }
    let exprs: String = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_string() + "\n")
        .collect();
    let dash = std::fs::read_to_string(workspace().join("packaging/grafana-dashboard.json"))
        .expect("packaging/grafana-dashboard.json");
    let dash_json: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(dash_json["panels"].as_array().is_some_and(|p| p.len() >= 6));
    // Every expression parses as PromQL (the parser Greptime uses, a port of
    // Prometheus's own grammar).
    let mut queries: Vec<(String, String)> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = format!("alert {}", r["alert"].as_str().unwrap());
            (name, r["expr"].as_str().unwrap().to_string())
        })
        .collect();
    for p in dash_json["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let name = format!("panel {:?}", p["title"]);
            queries.push((name, t["expr"].as_str().unwrap().to_string()));
        }
    }
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (what, q) in &queries {
        if let Err(e) = promql_parser::parser::parse(q) {
            panic!("{what}: not PromQL ({e}): {q}");
        }
    }
    for (what, text) in [("alert rules", &exprs), ("dashboard", &dash)] {
        let names = metric_names(text);
        assert!(names.len() >= 4, "{what} names too few metrics: {names:?}");
        for n in names {
            assert!(exposed.contains(&n), "{what} names {n}, not in a scrape");
        }
    }
    if Command::new("promtool").arg("--version").output().is_ok() {
        let st = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules_path)
            .status()
            .unwrap();
        assert!(st.success(), "promtool check rules failed");
    } else {
        eprintln!(
            "promtool not installed: the rules were checked by a YAML parse and a PromQL \
             parser, not by promtool"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A forged sealed datagram: the sealed wire's mark and version, a counter and
/// a destination socket ID no connection has, and bytes that stand for the
/// ciphertext and tag.
fn forged_sealed(n: u64) -> Vec<u8> {
    use lu2k_engine::transport::seal;
    // Wire versions 3 and 4 (one layout): the mark, version bits with key epoch
    // 0, the counter's low 40 bits, the destination socket ID; the rest is no
    // ciphertext of anything.
    let mut d = vec![0xFF, 0xFF, 0xC0];
    d.extend_from_slice(&n.to_be_bytes()[3..]);
    assert_eq!(d.len(), seal::PLAIN_AT);
    d.extend_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
    assert_eq!(seal::sealed_dst(&d), Some(0xDEAD_BEEF));
    d.extend_from_slice(&[0x5A; 64]);
    d
}

/// The sealed wire's counters on `/metrics`: two engines with a pre-shared key
/// carry verified PUTs; then datagrams that the wire refuses arrive at engine A
/// from the peer's address (forged sealed packets to no connection, a plain
/// UDT4 handshake) and from a stranger's (forged sealed packets). The peer's
/// refusals are under its `nid`; the stranger's only in the core's counters.
#[test]
fn sealed_scrape_shows_the_security_counters() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(py) = python() else {
        eprintln!(
            "SKIP sealed_scrape_shows_the_security_counters: no Python with prometheus_client \
             and yaml; run scripts/setup.sh (it makes target/pyenv)"
        );
        return;
    };
    let dir = tmpdir("metrics-sealed");
    let key = dir.join("psk");
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(97) ^ 0xC3).collect();
    std::fs::write(&key, bytes).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("engine.toml");
    std::fs::write(&cfg, format!("psk_file = {:?}\n", key.display())).unwrap();
    let cfg = cfg.display().to_string();
    let port = 20000 + (std::process::id() % 20000) as u16 + 205;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    const FROM_PEER: u64 = 3;
    const FROM_STRANGER: u64 = 5;
    let (first, second) = transfer_and_scrape(&dir, addr, Some(&cfg), 32, |a| {
        let peer = std::net::UdpSocket::bind((B_IP, 0)).unwrap();
        let stranger = std::net::UdpSocket::bind((STRANGER_IP, 0)).unwrap();
        for n in 0..FROM_PEER {
            peer.send_to(&forged_sealed(n), a).unwrap();
        }
        for n in 0..FROM_STRANGER {
            stranger.send_to(&forged_sealed(n), a).unwrap();
        }
        // A plain UDT4 handshake request (control type 0, version 4).
        let mut hs = vec![0u8; 64];
        hs[0] = 0x80;
        hs[19] = 4;
        peer.send_to(&hs, a).unwrap();
    });
    let (f1, f2) = (dir.join("scrape1.txt"), dir.join("scrape2.txt"));
    std::fs::write(&f1, &first).unwrap();
    std::fs::write(&f2, &second).unwrap();
    let parsed = run_py(&py, PARSER, &[&f1, &f2]);
    let s2 = samples(&parsed[1]);
    let b = nid(B_IP).to_string();
    let b = b.as_str();
    assert_eq!(
        value(
            &s2,
            "lu2k_peer_security",
            &[("nid", b), ("mode", "required")]
        ),
        1.0
    );
    assert_eq!(
        value(&s2, "lu2k_peer_sent_messages_total", &[("nid", b)]),
        32.0
    );
    let peer_unknown = value(
        &s2,
        "lu2k_peer_security_rejected_total",
        &[("nid", b), ("reason", "unknown_connection")],
    );
    assert_eq!(peer_unknown, FROM_PEER as f64, "{second}");
    assert_eq!(
        value(
            &s2,
            "lu2k_peer_security_rejected_total",
            &[("nid", b), ("reason", "plain_refused")]
        ),
        1.0
    );
    // The stranger has no peer: counted on the core only, beside the peer's.
    assert_eq!(
        value(
            &s2,
            "lu2k_core_security_rejected_total",
            &[("core", "0"), ("reason", "unknown_connection")]
        ),
        (FROM_PEER + FROM_STRANGER) as f64
    );
    assert!(
        !s2.keys()
            .any(|(n, l)| n == "lu2k_peer_security_rejected_total"
                && l.get("nid")
                    .is_some_and(|n| n.starts_with(&STRANGER_IP.to_string()))),
        "a stranger got a peer label:\n{second}"
    );
    // Keys change every two minutes: none in this run, but the series is there.
    assert_eq!(value(&s2, "lu2k_peer_rekeys_total", &[("nid", b)]), 0.0);
    assert!(
        value(&s2, "lu2k_core_sealed_bytes_total", &[("core", "0")]) > (32 * LEN) as f64,
        "{second}"
    );
    assert!(value(&s2, "lu2k_core_opened_bytes_total", &[("core", "0")]) > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A non-loopback metrics address is refused unless allowed, and the error
/// says how to allow it.
#[test]
fn remote_metrics_need_an_explicit_allow() {
    let bin = env!("CARGO_BIN_EXE_lu2k-engine");
    let out = Command::new(bin)
        .args(["check-config", "--metrics-listen", "0.0.0.0:9788"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen") && err.contains("--metrics-allow-remote"),
        "{err}"
    );
    let out = Command::new(bin)
        .args([
            "check-config",
            "--metrics-listen",
            "0.0.0.0:9788",
            "--metrics-allow-remote",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
