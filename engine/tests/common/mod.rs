//! What the engine's multi-process tests share: NIDs, LNet PUT headers, a
//! checkable payload pattern, waiting for an engine to attach, and an engine
//! child process that is stopped with SIGTERM or killed when dropped.

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::{Config, Kshim, Nid};

/// A fresh scratch directory for one test, named after the test binary's `tag`.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lu2k-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The counters of engine `name`'s stats socket in `dir`.
pub fn stats(dir: &Path, name: &str) -> lu2k_engine::daemon::stats::Report {
    lu2k_engine::daemon::stats::fetch(&dir.join(format!("{name}-stats.sock"))).unwrap()
}

/// `ip@lu2k`.
pub fn nid(ip: Ipv4Addr) -> Nid {
    format!("{ip}@lu2k").parse().unwrap()
}

/// An LNet PUT of `len` bytes, message number `n` in its match bits. LNet's header
/// holds 64-bit NIDs: for an IPv6 NID it says `LNET_NID_ANY` and the sender names the
/// destination beside it (`Kshim::send_to`).
pub fn put(dst: Nid, src: Nid, len: usize, n: u64) -> Repr {
    Repr {
        dest_nid: dst.nid4().unwrap_or(u64::MAX),
        src_nid: src.nid4().unwrap_or(u64::MAX),
        dest_pid: 12345,
        src_pid: 12345,
        payload_length: len as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: n,
            hdr_data: n,
            ptl_index: 4,
            offset: 0,
        },
    }
}

/// The payload of message `n`: differs per message and per byte.
pub fn pattern(n: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(n * 7) % 251) as u8)
        .collect()
}

/// Drives `k` until an engine has attached, failing at `deadline`.
pub fn wait_attached(k: &mut Kshim, deadline: Instant) {
    while !k.is_attached() {
        assert!(Instant::now() < deadline, "engine never attached");
        let _ = k.wait(Some(Duration::from_millis(20)));
    }
}

/// A running `lu2k-engine`, killed if the test ends without stopping it.
pub struct Engine(pub Child);

impl Engine {
    /// Spawns `cmd` (an engine, or something that execs one, like
    /// `ip netns exec`) with its output shown in the test's.
    pub fn spawn(mut cmd: Command) -> Engine {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        Engine(cmd.spawn().unwrap())
    }

    /// SIGTERM, then the exit status, failing after `patience`.
    pub fn term_within(mut self, patience: Duration) -> ExitStatus {
        // SIGTERM via the kill command (no unsafe in tests).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + patience;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "engine did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A kshim serving `ip@lu2k` on `cores` ring sets at `dir/name.sock`.
pub fn kshim(dir: &Path, name: &str, ip: Ipv4Addr, cores: u32) -> Kshim {
    let mut cfg = Config::new(vec![nid(ip)], dir.join(format!("{name}.sock")));
    cfg.cores = cores;
    cfg.tx_pool_len = 64 << 20;
    // A core must be able to hold at least one whole 1 MiB message even when the
    // kernel coalesces nothing (≈ 720 datagrams, one RX buffer each), plus room
    // for what is in flight behind it: 1024 buffers per core.
    cfg.rx_buf_count = 1024 * cores;
    Kshim::start(cfg).unwrap()
}

/// Starts an engine for kshim `name` in `dir`, bound to `ip:port`.
pub fn start_engine(dir: &Path, name: &str, ip: Ipv4Addr, port: u16, extra: &[&str]) -> Engine {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lu2k-engine"));
    cmd.args(["run", "--kshim-socket"])
        .arg(dir.join(format!("{name}.sock")))
        .args([
            "--bind",
            &ip.to_string(),
            "--port",
            &port.to_string(),
            "--stats-socket",
        ])
        .arg(dir.join(format!("{name}-stats.sock")))
        .args(extra);
    Engine::spawn(cmd)
}

/// The `lu2k-kshim` binary (the LNet-selftest-like load generator and sink),
/// built here in the engine binary's profile: `cargo test -p lu2k-engine` does
/// not build other packages' binaries, and a stale one must not be tested.
pub fn kshim_bin() -> PathBuf {
    let engine = PathBuf::from(env!("CARGO_BIN_EXE_lu2k-engine"));
    let dir = engine.parent().expect("the engine binary's directory");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "-p", "lu2k-kshim", "--bin", "lu2k-kshim"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("running cargo to build lu2k-kshim");
    assert!(st.success(), "building lu2k-kshim failed: {st}");
    let bin = dir.join("lu2k-kshim");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// Runs `prog args`, its stderr in the error when it fails.
pub fn sh(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{prog} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the io_uring fast path runs here; where not, says so for `test`
/// (a loud skip) and returns false.
pub fn fast_path_or_skip(test: &str) -> bool {
    let f = lu2k_engine::io::probe::Features::probe();
    if f.selftest.is_none() {
        eprintln!(
            "SKIP {test}: the io_uring fast path is not available here: {:?}",
            f.selftest_error
        );
        return false;
    }
    true
}

/// Why a namespace test cannot run when not root, else `None`.
pub fn not_root() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    (uid != "0").then(|| "not root (network namespaces need it)".into())
}

/// The first of iproute2's `tools` (`ip`, `tc`) that does not run, as a reason.
pub fn missing_tools(tools: &[&str]) -> Option<String> {
    tools
        .iter()
        .find(|t| sh(t, &["-V"]).is_err())
        .map(|t| format!("iproute2's `{t}` is missing"))
}

/// Network namespaces joined by veth pairs; the namespaces (and with them the
/// veths) are deleted when dropped.
pub struct Netns {
    pub ns: Vec<String>,
}

impl Netns {
    /// Namespaces `names`, each with its loopback up; a leftover namespace of the
    /// same name (from a killed run) is deleted first.
    pub fn new(names: &[String]) -> Result<Netns, String> {
        let _ = std::fs::create_dir_all("/run/netns");
        for n in names {
            let _ = sh("ip", &["netns", "del", n]);
        }
        let me = Netns { ns: names.to_vec() };
        for n in names {
            sh("ip", &["netns", "add", n])?;
            sh("ip", &["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(me)
    }

    /// Two namespaces `{tag}a` and `{tag}b` joined by the veth pair
    /// `{tag}va`/`{tag}vb` holding `a_ips` and `b_ips`.
    pub fn pair(tag: &str, a_ips: &[Ipv4Addr], b_ips: &[Ipv4Addr]) -> Result<Netns, String> {
        let me = Netns::new(&[format!("{tag}a"), format!("{tag}b")])?;
        me.veth(
            (0, &format!("{tag}va"), a_ips),
            (1, &format!("{tag}vb"), b_ips),
        )?;
        Ok(me)
    }

    /// A veth pair between namespaces: each end `(namespace index, device name,
    /// /24 addresses)`, both ends up.
    pub fn veth(
        &self,
        a: (usize, &str, &[Ipv4Addr]),
        b: (usize, &str, &[Ipv4Addr]),
    ) -> Result<(), String> {
        sh(
            "ip",
            &["link", "add", a.1, "type", "veth", "peer", "name", b.1],
        )?;
        for (i, dev, ips) in [a, b] {
            let n = &self.ns[i];
            sh("ip", &["link", "set", dev, "netns", n])?;
            for ip in ips {
                sh(
                    "ip",
                    &["-n", n, "addr", "add", &format!("{ip}/24"), "dev", dev],
                )?;
            }
            sh("ip", &["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = sh("ip", &["netns", "del", n]);
        }
    }
}

/// A reuseport group of `cores` UDP sockets on one loopback port, steered by
/// `program` (see [`steered`]).
pub fn reuseport_group(
    cores: u32,
    program: &[lu2k_engine::io::sys::BpfInsn],
) -> (Vec<std::net::UdpSocket>, u16) {
    use lu2k_engine::io::sys::{self, SockOpts};
    use std::net::SocketAddrV4;
    let opts = SockOpts {
        reuseport: true,
        sndbuf: 1 << 20,
        rcvbuf: 1 << 20,
        gro: false,
    };
    let (first, info) = sys::udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), &opts).unwrap();
    let port = info.local.port();
    let mut fds = vec![first];
    for _ in 1..cores {
        let (fd, _) = sys::udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), &opts).unwrap();
        fds.push(fd);
    }
    (steered(fds, program), port)
}

/// `count` LNet PUTs from kshim A to kshim B, message `n` of `len_of(n)` bytes
/// holding [`pattern`]: every completion at A must be `Ok` and come once per
/// message, every message must arrive at B once, from A, whole and unchanged.
/// The caller's loop calls [`Transfer::step`] until [`Transfer::finished`] and
/// keeps its own deadline and progress report.
pub struct Transfer {
    /// Prefixes every failure, naming the test case.
    tag: String,
    src: Nid,
    dst: Nid,
    len_of: Box<dyn Fn(u64) -> usize>,
    pub count: u64,
    /// Messages sent and not yet completed, at most.
    max_in_flight: u64,
    pub sent: u64,
    pub completed: u64,
    pub got: u64,
    cookies: std::collections::HashMap<lu2k_kshim::Cookie, u64>,
    done: Vec<bool>,
    received: Vec<bool>,
}

impl Transfer {
    /// `tag` ("" for none) prefixes the failures as `tag: …`.
    pub fn new(
        tag: &str,
        src: Nid,
        dst: Nid,
        count: u64,
        len_of: impl Fn(u64) -> usize + 'static,
    ) -> Transfer {
        Transfer {
            tag: if tag.is_empty() {
                String::new()
            } else {
                format!("{tag}: ")
            },
            src,
            dst,
            len_of: Box::new(len_of),
            count,
            max_in_flight: u64::MAX,
            sent: 0,
            completed: 0,
            got: 0,
            cookies: std::collections::HashMap::new(),
            done: vec![false; count as usize],
            received: vec![false; count as usize],
        }
    }

    /// At most `n` messages sent and not yet completed (by default as many as
    /// A's kshim takes).
    pub fn in_flight(mut self, n: u64) -> Transfer {
        self.max_in_flight = n;
        self
    }

    /// Every message sent, completed and received.
    pub fn finished(&self) -> bool {
        self.got == self.count && self.completed == self.count
    }

    /// `sent N received N completed N`, for progress and failure lines.
    pub fn progress(&self) -> String {
        format!(
            "sent {} received {} completed {}",
            self.sent, self.got, self.completed
        )
    }

    /// Fails, saying how far the transfer got, once `deadline` has passed.
    pub fn assert_before(&self, deadline: Instant) {
        assert!(
            Instant::now() < deadline,
            "{}timed out: {}",
            self.tag,
            self.progress()
        );
    }

    /// Sends what `ka` takes, takes in its completions, then waits up to `wait`
    /// for one message at `kb` and checks it.
    pub fn step(&mut self, ka: &mut Kshim, kb: &mut Kshim, wait: Duration) {
        let tag = &self.tag;
        while self.sent < self.count && self.sent - self.completed < self.max_in_flight {
            let (n, len) = (self.sent, (self.len_of)(self.sent));
            // `send_to`: an IPv6 destination does not fit LNet's header (see `put`).
            match ka.send_to(self.dst, &put(self.dst, self.src, len, n), &pattern(n, len)) {
                Ok(c) => {
                    self.cookies.insert(c, n);
                    self.sent += 1;
                }
                Err(_) => break, // pool or credits exhausted: wait for completions
            }
        }
        while let Some(ev) = ka.poll() {
            match ev {
                lu2k_kshim::Event::TxDone {
                    cookie,
                    status,
                    detail,
                } => {
                    assert_eq!(
                        status,
                        lu2k_kshim::TxStatus::Ok,
                        "{tag}send failed (detail {detail})"
                    );
                    let n = self
                        .cookies
                        .remove(&cookie)
                        .unwrap_or_else(|| panic!("{tag}completion for an unknown cookie"));
                    assert!(!self.done[n as usize], "{tag}two completions for {n}");
                    self.done[n as usize] = true;
                    self.completed += 1;
                }
                lu2k_kshim::Event::EngineGone(r) => panic!("{tag}engine A gone: {r:?}"),
                _ => {}
            }
        }
        match kb.wait(Some(wait)) {
            Some(lu2k_kshim::Event::Rx(m)) => {
                let n = match m.hdr.msg {
                    Msg::Put { match_bits, .. } => match_bits,
                    other => panic!("{tag}unexpected message {other:?}"),
                };
                let len = (self.len_of)(n);
                assert_eq!(m.from, self.src, "{tag}a message from someone else than A");
                assert_eq!(m.len(), len, "{tag}message {n} length");
                let mut buf = vec![0u8; len];
                m.copy_to(&mut buf);
                let want = pattern(n, len);
                if buf != want {
                    let first = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    let last = buf.iter().zip(&want).rposition(|(a, b)| a != b).unwrap();
                    panic!(
                        "{tag}message {n} ({len} bytes) content differs at bytes {first}..={last} (extents {:?})",
                        m.extents().iter().take(4).collect::<Vec<_>>()
                    );
                }
                assert!(
                    !self.received[n as usize],
                    "{tag}message {n} delivered twice"
                );
                self.received[n as usize] = true;
                self.got += 1;
                kb.rx_done(m);
            }
            Some(lu2k_kshim::Event::EngineGone(r)) => panic!("{tag}engine B gone: {r:?}"),
            _ => {}
        }
    }
}

/// The sockets `fds` of one reuseport group as blocking sockets with a 500 ms
/// read timeout, the group steered by `program`.
pub fn steered(
    fds: Vec<std::os::fd::OwnedFd>,
    program: &[lu2k_engine::io::sys::BpfInsn],
) -> Vec<std::net::UdpSocket> {
    lu2k_engine::io::sys::attach_reuseport_cbpf(&fds[0], program).unwrap();
    fds.into_iter()
        .map(|fd| {
            let s = std::net::UdpSocket::from(fd);
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .collect()
}

/// `ip@lu2k` for either family (`fd00::2@lu2k` for an IPv6 address).
pub fn nid_of(ip: std::net::IpAddr) -> Nid {
    format!("{ip}@lu2k").parse().unwrap()
}

/// A kshim serving `ip@lu2k` (either family) on `cores` ring sets at
/// `dir/name.sock`, sized as [`kshim`].
pub fn kshim_of(dir: &Path, name: &str, ip: std::net::IpAddr, cores: u32) -> Kshim {
    let mut cfg = Config::new(vec![nid_of(ip)], dir.join(format!("{name}.sock")));
    cfg.cores = cores;
    cfg.tx_pool_len = 64 << 20;
    cfg.rx_buf_count = 1024 * cores;
    Kshim::start(cfg).unwrap()
}

/// Starts an engine for kshim `name` in `dir` inside network namespace `netns`
/// (`None`: this one), with `--bind bind` (an address of either family, `::`) on
/// `port`. The kshim socket and the stats socket are paths, which reach across
/// namespaces.
pub fn start_engine_in(
    netns: Option<&str>,
    dir: &Path,
    name: &str,
    bind: &str,
    port: u16,
    extra: &[&str],
) -> Engine {
    let engine = env!("CARGO_BIN_EXE_lu2k-engine");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, engine]);
            c
        }
        None => Command::new(engine),
    };
    cmd.args(["run", "--kshim-socket"])
        .arg(dir.join(format!("{name}.sock")))
        .args([
            "--bind",
            bind,
            "--port",
            &port.to_string(),
            "--stats-socket",
        ])
        .arg(dir.join(format!("{name}-stats.sock")))
        .args(extra);
    Engine::spawn(cmd)
}

impl Netns {
    /// Adds IPv6 address `cidr` (e.g. `fd00:6::1/64`) to `dev` in namespace
    /// `self.ns[i]`, usable at once (`nodad`: no duplicate address detection delay).
    pub fn addr6(&self, i: usize, dev: &str, cidr: &str) -> Result<(), String> {
        sh(
            "ip",
            &[
                "-n",
                &self.ns[i],
                "-6",
                "addr",
                "add",
                cidr,
                "dev",
                dev,
                "nodad",
            ],
        )
    }
}

/// Why an IPv6 test cannot run: no IPv6 in this kernel (or it is disabled), else
/// `None`.
pub fn no_ipv6() -> Option<String> {
    match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => None,
        Err(e) => Some(format!("no IPv6 on this host ([::1] does not bind: {e})")),
    }
}
