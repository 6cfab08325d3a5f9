//! The `lnet` lab test: lu2klnd.ko, lu2k's network driver inside real LNet (Lustre
//! 2.17 built by scripts/lab/build-lustre.sh), between two VMs.
//!
//! `scripts/kernel-lab.sh` boots two VMs joined by a virtual network (virtio-net over
//! qemu's socket netdev), one LNet per kernel, and runs this test in both with
//! `lu2k.lnet=ROLE,MY_IP,PEER_IP` on the kernel command line (ROLE `a` or `b`). In each:
//! eth0 gets MY_IP (why it matters: `scenario`); insmod libcfs, lnet, ksocklnd, lnet_selftest (Lustre's), then
//! lu2k_kshim and lu2klnd; a lu2k_kshim instance for `MY_IP@lu2k` served by
//! `lu2k-engine --kshim device:/dev/lu2k,instance=N`; `lnetctl lnet configure` and
//! `lnetctl net add --net lu2k0 --if eth0`. Then `a` drives:
//! 1. `lnetctl ping PEER_IP@lu2k` (retried while `b` comes up);
//! 2. an `lst` session: a brw write and a brw read of 1 MiB with `check=full` from `a`
//!    to `b` (`--loop` times each, `lu2k.lnet_loops=N`, default 16): every byte is
//!    checked by LNet's selftest, and `lst show_error` must count no error on either
//!    node;
//! 3. tells `b` it is done (a TCP connection to PEER_IP:7990); `b` waits for that.
//!
//! Both then shut LNet down (rmmod lnet_selftest, `lnetctl lnet unconfigure`), rmmod lu2klnd, stop the
//! engine, and fail on any `BUG:`, `WARNING:`, `Oops` or `general protection` line in
//! the kernel log.

use crate::module::Engine;
use crate::Outcome;
use anyhow::{bail, ensure, Context};
use lu2k_ring_abi::attach::device;
use lu2k_ring_abi::{LndType, Net, Nid};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub(crate) const EXTRA: &str = "/lib/lab-extra";
pub(crate) const ENGINE: &str = "/bin/lu2k-engine";
pub(crate) const DEV: &str = "/dev/lu2k";
pub(crate) const DONE_PORT: u16 = 7990;
/// The interface with the VM's address (see `scenario`).
pub(crate) const IFACE: &str = "eth0";
/// One lnetctl or lst command, TCG-slow.
const CMD_LIMIT: Duration = Duration::from_secs(90);
/// How long b serves a at most.
const WAIT_LIMIT: Duration = Duration::from_secs(400);
/// Load order: Lustre's modules (sunrpc is loaded by the init), then lu2k's.
/// lnet_selftest comes once LNet is configured: its init brings LNet up itself.
const MODULES: &[&str] = &["libcfs", "lnet", "lu2k_kshim", "lu2klnd"];
pub(crate) const SELFTEST: &str = "lnet_selftest";

pub fn run() -> anyhow::Result<Outcome> {
    let Some(spec) = cmdline("lu2k.lnet") else {
        return Ok(Outcome::Skip(
            "no lu2k.lnet=ROLE,MY_IP,PEER_IP on the kernel command line: the lnet test runs in the lab's two-VM boot only".into(),
        ));
    };
    let (role, me, peer) = parse_spec(&spec)?;
    if let Some(skip) = missing(MODULES.iter().chain(&[SELFTEST]))? {
        return Ok(skip);
    }
    let loops = cmdline("lu2k.lnet_loops")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16u32);
    let r = scenario(role, me, peer, loops);
    let log = kernel_log();
    for l in log.lines().filter(|l| {
        ["lu2k", "LNet", "Lustre", "lnet"]
            .iter()
            .any(|m| l.contains(m))
    }) {
        println!("dmesg: {l}");
    }
    let summary = r?;
    if let Some(bad) = log.lines().find(|l| {
        ["BUG:", "WARNING:", "Oops", "general protection"]
            .iter()
            .any(|m| l.contains(m))
    }) {
        bail!("the kernel log has a bad line: {bad}");
    }
    Ok(Outcome::Pass(summary))
}

pub(crate) fn parse_spec(spec: &str) -> anyhow::Result<(char, Ipv4Addr, Ipv4Addr)> {
    let parts: Vec<_> = spec.split(',').collect();
    ensure!(
        parts.len() == 3 && (parts[0] == "a" || parts[0] == "b"),
        "lu2k.lnet='{spec}': want ROLE,MY_IP,PEER_IP with ROLE a or b"
    );
    let me = parts[1]
        .parse()
        .with_context(|| format!("lu2k.lnet='{spec}': MY_IP"))?;
    let peer = parts[2]
        .parse()
        .with_context(|| format!("lu2k.lnet='{spec}': PEER_IP"))?;
    Ok((parts[0].chars().next().unwrap_or('a'), me, peer))
}

fn scenario(role: char, me: Ipv4Addr, peer: Ipv4Addr, loops: u32) -> anyhow::Result<String> {
    // The address sits on eth0 itself, a virtio-net NIC without TX checksum offload
    // (qemu's socket netdev offers none): Debian 12's kernel refuses a UDP GSO send
    // (UDP_SEGMENT, what the engine batches with) out of such a device with EIO. The
    // engine then turns GSO off and sends one datagram per send (`gso_fallbacks` in
    // its stats), which this stage's multi-packet brw traffic depends on.
    sh("ip", &["addr", "add", &format!("{me}/24"), "dev", IFACE])?;
    sh("ip", &["link", "set", IFACE, "up"])?;
    for m in MODULES {
        sh("insmod", &[&format!("{EXTRA}/{m}.ko")]).with_context(|| format!("insmod {m}.ko"))?;
    }
    let net = Net::new(LndType::LU2K, 0);
    let nid = Nid::from_net_ip(net, me);
    let dev = device::open(Path::new(DEV)).context("open /dev/lu2k after insmod")?;
    let instance = create(nid)?;
    let mut engine = start_engine(me, instance)?;
    wait_serving(dev.as_fd(), instance, &mut engine)?;
    println!("lnet: {role}: instance {instance} ({nid}) served by lu2k-engine");

    println!("lnet: {role}: lnetctl lnet configure");
    lnetctl(&["lnet", "configure"])?;
    println!("lnet: {role}: lnetctl net add --net lu2k0 --if {IFACE}");
    lnetctl(&["net", "add", "--net", "lu2k0", "--if", IFACE])?;
    sh("insmod", &[&format!("{EXTRA}/{SELFTEST}.ko")]).context("insmod lnet_selftest.ko")?;
    let show = lnetctl(&["net", "show"])?;
    let my_nid = format!("{me}@lu2k");
    ensure!(
        show.contains(&my_nid),
        "`lnetctl net show` does not list {my_nid}: {show}"
    );
    println!("lnet: {role}: LNet up with {my_nid}");

    let r = if role == 'a' {
        let counters = || kshim_counters(dev.as_fd(), instance);
        let r = drive(me, peer, loops, &counters);
        // b waits for this whatever happened here, so it ends too.
        let told = tell_done(peer);
        r.and_then(|s| told.map(|_| s))
    } else {
        wait_done(me).map(|_| format!("b: served {my_nid} until a was done"))
    };
    let counters = kshim_counters(dev.as_fd(), instance);
    println!("lnet: {role}: lu2k_kshim instance {instance}: {counters}");
    if r.is_err() {
        println!("lnet: {role}: lu2k-engine's log ends{}", engine.tail());
        if let Ok(st) = lnetctl(&["stats", "show"]) {
            println!(
                "lnet: {role}: lnetctl stats show: {}",
                st.replace('\n', " ")
            );
        }
        if let Ok(p) = lnetctl(&["peer", "show", "-v"]) {
            println!(
                "lnet: {role}: lnetctl peer show -v: {}",
                p.replace('\n', " ")
            );
        }
    }
    let summary = format!("{}; {counters}", r?);

    // lnet_selftest holds LNet up (its init calls LNetNIInit): out first.
    sh("rmmod", &[SELFTEST]).context("rmmod lnet_selftest")?;
    lnetctl(&["lnet", "unconfigure"])?;
    sh("rmmod", &["lu2klnd"]).context("rmmod lu2klnd after lnet unconfigure")?;
    engine.check_alive()?;
    engine.kill();
    Ok(format!("lnet ({role}): {summary}"))
}

/// a's part: ping, then the lst brw write and read with check=full.
fn drive(
    me: Ipv4Addr,
    peer: Ipv4Addr,
    loops: u32,
    counters: &dyn Fn() -> String,
) -> anyhow::Result<String> {
    let peer_nid = format!("{peer}@lu2k");
    let t = Instant::now();
    let ping = loop {
        match lnetctl(&["ping", &peer_nid]) {
            Ok(out) => break out,
            Err(e) if t.elapsed() > Duration::from_secs(240) => {
                return Err(e.context(format!("lnetctl ping {peer_nid} for 240 s")))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    ensure!(
        ping.contains(&peer_nid),
        "lnetctl ping {peer_nid} answered without the peer's NID: {ping}"
    );
    let ping_s = t.elapsed().as_secs_f64();
    println!("lnet: a: lnetctl ping {peer_nid} answered ({ping_s:.1} s after the first try)");
    let t0 = Instant::now();
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        lnetctl(&["ping", &peer_nid])?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "lnet: a: 5 more pings in {:.0} ms ({:?} ms each, lnetctl's own start included)",
        t0.elapsed().as_secs_f64() * 1e3,
        rtts.iter().map(|r| r.round() as u64).collect::<Vec<_>>()
    );

    println!("lnet: a: lu2k_kshim: {}", counters());
    let write = brw(me, peer, "write", loops, counters)?;
    let read = brw(me, peer, "read", loops, counters)?;
    Ok(format!(
        "lnetctl ping {peer_nid} ok; lst brw write {write}; lst brw read {read}"
    ))
}

/// One lst session with a brw test of `loops` × 1 MiB, check=full, from a to b: the
/// batch must run to its end and neither node may count an error.
fn brw(
    me: Ipv4Addr,
    peer: Ipv4Addr,
    op: &str,
    loops: u32,
    counters: &dyn Fn() -> String,
) -> anyhow::Result<String> {
    let name = format!("lu2k-{op}");
    lst(&["new_session", "--timeout", "300", &name])?;
    let r = (|| -> anyhow::Result<String> {
        lst(&["add_group", "a", &format!("{me}@lu2k")])?;
        lst(&["add_group", "b", &format!("{peer}@lu2k")])?;
        lst(&["add_batch", "bw"])?;
        lst(&[
            "add_test",
            "--batch",
            "bw",
            "--loop",
            &loops.to_string(),
            "--concurrency",
            "2",
            "--from",
            "a",
            "--to",
            "b",
            "brw",
            op,
            "check=full",
            "size=1M",
        ])?;
        let t = Instant::now();
        lst(&["run", "bw"])?;
        let mut shown = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if shown.elapsed() > Duration::from_secs(10) {
                println!(
                    "lnet: a: brw {op} running {:.0} s; lu2k_kshim: {}",
                    t.elapsed().as_secs_f64(),
                    counters()
                );
                shown = Instant::now();
            }
            let q = lst(&["query", "bw"])?;
            if q.contains("is stopped") || q.contains("running: 0") {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(200),
                "lst brw {op}: the batch still runs after 200 s: {}; lu2k_kshim: {}",
                q.trim(),
                counters()
            );
        }
        let secs = t.elapsed().as_secs_f64();
        let errors = lst_out(&["show_error", "a", "b"])?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&errors.stdout),
            String::from_utf8_lossy(&errors.stderr)
        );
        print!(
            "{}",
            text.lines()
                .map(|l| format!("lst: {l}\n"))
                .collect::<String>()
        );
        ensure!(
            text.contains("Total 0 error nodes in a") && text.contains("Total 0 error nodes in b"),
            "lst brw {op} check=full: errors counted: {}",
            text.replace('\n', " / ")
        );
        let mib = f64::from(loops) * 2.0;
        Ok(format!(
            "{mib:.0} MiB check=full in {secs:.1} s ({:.1} MiB/s), no errors",
            mib / secs
        ))
    })();
    if r.is_ok() {
        lst(&["stop", "bw"])?;
        lst(&["end_session"])?;
    } else {
        println!("lnet: a: brw {op} failed; lu2k_kshim: {}", counters());
    }
    r
}

pub(crate) fn kshim_counters(fd: BorrowedFd<'_>, instance: u32) -> String {
    match device::stats(fd, instance) {
        Ok(s) => format!(
            "tx sent {} ok {} failed {}, rx {} msgs {} bytes, refused: {} completions {} rx {} indices",
            s.tx_sent, s.tx_ok, s.tx_failed, s.rx_msgs, s.rx_bytes, s.bad_completions, s.bad_rx, s.bad_index
        ),
        Err(e) => format!("no counters ({e})"),
    }
}

fn tell_done(peer: Ipv4Addr) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        match TcpStream::connect_timeout(
            &SocketAddrV4::new(peer, DONE_PORT).into(),
            Duration::from_secs(5),
        ) {
            Ok(mut s) => {
                s.write_all(b"done\n")?;
                return Ok(());
            }
            Err(e) if t.elapsed() > Duration::from_secs(60) => {
                return Err(anyhow::Error::new(e).context("telling b it may end"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn wait_done(me: Ipv4Addr) -> anyhow::Result<()> {
    let l = TcpListener::bind(SocketAddrV4::new(me, DONE_PORT))?;
    l.set_nonblocking(true)?;
    let t = Instant::now();
    let (mut s, from) = loop {
        match l.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    t.elapsed() < WAIT_LIMIT,
                    "a did not say it was done within {} s",
                    WAIT_LIMIT.as_secs()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("waiting for a to be done")),
        }
    };
    s.set_nonblocking(false)?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    ensure!(
        &buf[..n] == b"done\n",
        "unexpected message from {from} on the done port"
    );
    Ok(())
}

/// A skip naming the first of `modules` the initramfs lacks (the lab built no
/// Lustre or lu2klnd), or an error if the engine is missing; `None` when all are
/// there.
pub(crate) fn missing<'a>(
    modules: impl IntoIterator<Item = &'a &'a str>,
) -> anyhow::Result<Option<Outcome>> {
    for m in modules {
        if !Path::new(&format!("{EXTRA}/{m}.ko")).exists() {
            return Ok(Some(Outcome::Skip(format!(
                "{m}.ko is not in the initramfs: the lab did not build Lustre or lu2klnd"
            ))));
        }
    }
    ensure!(
        Path::new(ENGINE).exists(),
        "lu2k-engine is not in the initramfs"
    );
    Ok(None)
}

/// The instance of `nid`, made the operator's way (`lu2k-engine device create`, as
/// the README shows): one ring set, 64 TX slots. Returns the number it printed.
pub(crate) fn create(nid: Nid) -> anyhow::Result<u32> {
    let out = Command::new(ENGINE)
        .args([
            "device",
            "create",
            "--nid",
            &nid.to_string(),
            "--tx-slots",
            "64",
        ])
        .output()
        .context("running lu2k-engine device create")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "lu2k-engine device create --nid {nid}: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    // "instance N: ...", after what it says about the RX pool.
    text.lines()
        .find_map(|l| l.strip_prefix("instance "))
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("lu2k-engine device create printed {text:?}"))
}

pub(crate) fn wait_serving(
    fd: BorrowedFd<'_>,
    instance: u32,
    engine: &mut Engine,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while device::stats(fd, instance)?.attached != 1 {
        engine.check_alive()?;
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "instance {instance}: not served after 90 s{}",
            engine.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The lab's engine on the lnet stage's device instance, its log in
/// /tmp/engine-lnet.log.
pub(crate) fn start_engine(me: Ipv4Addr, instance: u32) -> anyhow::Result<Engine> {
    let mut cmd = Command::new(ENGINE);
    cmd.args(["run", "--kshim"])
        .arg(format!("device:{DEV},instance={instance}"))
        .args(["--bind", &me.to_string(), "--port", "7988"]);
    Engine::spawn(cmd, "/tmp/engine-lnet.log".to_string(), 12)
}

/// Runs prog under busybox's `timeout`: a command stuck in the kernel is named, with
/// the blocked tasks' stacks (sysrq w) and the kernel log's tail, instead of eating the
/// VM's time limit.
pub(crate) fn run_out(prog: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new("timeout")
        .args(["-s", "KILL", &CMD_LIMIT.as_secs().to_string(), prog])
        .args(args)
        // lst finds its session by this key; one per test run is enough
        .env("LST_SESSION", "4242")
        .output()
        .with_context(|| format!("running {prog}"))?;
    if out.status.code().is_none() || out.status.code() == Some(137) {
        let _ = std::fs::write("/proc/sysrq-trigger", "w");
        std::thread::sleep(Duration::from_millis(500));
        let log = kernel_log();
        let tail: Vec<_> = log.lines().rev().take(80).collect();
        for l in tail.into_iter().rev() {
            println!("hang: {l}");
        }
        bail!(
            "`{prog} {}` did not end within {} s: blocked tasks and the kernel log above",
            args.join(" "),
            CMD_LIMIT.as_secs()
        );
    }
    Ok(out)
}

fn checked(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = run_out(prog, args)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "`{prog} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        text.trim().replace('\n', " / ")
    );
    Ok(text)
}

pub(crate) fn lnetctl(args: &[&str]) -> anyhow::Result<String> {
    checked("/bin/lnetctl", args)
}

pub(crate) fn lst(args: &[&str]) -> anyhow::Result<String> {
    checked("/bin/lst", args)
}

pub(crate) fn lst_out(args: &[&str]) -> anyhow::Result<Output> {
    run_out("/bin/lst", args)
}

pub(crate) fn sh(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    checked(prog, args).map(|_| ())
}

pub(crate) fn kernel_log() -> String {
    Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub(crate) fn cmdline(key: &str) -> Option<String> {
    let c = std::fs::read_to_string("/proc/cmdline").ok()?;
    c.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}
