//! The `module` lab test: lu2k_kshim.ko (kshim/module), the kernel half in the kernel,
//! with real engines attached through `/dev/lu2k`.
//!
//! insmod; two network namespaces over a veth pair, one module instance per NID and
//! one `lu2k-engine --kshim device:/dev/lu2k,instance=N` in each; then, with the
//! module's own selftest (ioctls, see ring-abi's `attach::device`):
//! 1. PUTs of 1 MiB each way at once, every payload verified by the receiving module;
//! 2. GET/REPLY pings, percentiles of the round trip;
//! 3. an engine killed (SIGKILL) mid-transfer: its messages fail back with
//!    ENGINE_GONE, a new engine attaches and traffic resumes;
//! 4. a hostile engine (this process) writing garbage completions and RX descriptors:
//!    all refused and counted, every RX token returned, the module still serves;
//! 5. rmmod refused while an engine is attached, clean once none is;
//! and the kernel log must hold no `BUG:`, `WARNING:`, `Oops` or `general protection`.
//!
//! `lu2k.module_mib=N` on the kernel command line sets the MiB sent each way
//! (default 1024).

use crate::netns::{veth_pair, End};
use crate::Outcome;
use anyhow::{bail, ensure, Context};
use lu2k_ring_abi::attach::device::{self, Create, Load, LOAD_PING, LOAD_PUT};
use lu2k_ring_abi::{Eventfds, Extent, Nid, RxDesc, TxCompletion, LNET_HDR_LEN};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KO: &str = "/lib/lab-extra/lu2k_kshim.ko";
const ENGINE: &str = "/bin/lu2k-engine";
const DEV: &str = "/dev/lu2k";
const MIB: u32 = 1 << 20;

pub fn run() -> anyhow::Result<Outcome> {
    if !Path::new(KO).exists() {
        return Ok(Outcome::Skip(
            "lu2k_kshim.ko is not in the initramfs: the lab did not build it".into(),
        ));
    }
    ensure!(
        Path::new(ENGINE).exists(),
        "lu2k-engine is not in the initramfs: it did not build for the lab (see the lab's logs/module-engine-*.log)"
    );
    let mib = cmdline_u32("lu2k.module_mib").unwrap_or(1024);
    sh("insmod", &[KO]).context("insmod lu2k_kshim.ko")?;
    let r = scenario(mib);
    let log = kernel_log();
    for l in log.lines().filter(|l| l.contains("lu2k_kshim")) {
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

fn scenario(mib: u32) -> anyhow::Result<String> {
    let (a, b) = veth_pair(
        "k",
        Ipv4Addr::new(10, 13, 0, 1),
        Ipv4Addr::new(10, 13, 0, 2),
    )?;
    let nid_a: Nid = format!("{}@lu2k", a.addr)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let nid_b: Nid = format!("{}@lu2k", b.addr)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let dev = device::open(Path::new(DEV)).context("open /dev/lu2k after insmod")?;
    let fd = dev.as_fd();
    let ia = create(fd, nid_a)?;
    let ib = create(fd, nid_b)?;
    ensure!(ia != ib, "two instances got the same number {ia}");
    let mut ea = Engine::start(&a, ia)?;
    let mut eb = Engine::start(&b, ib)?;
    wait_serving(fd, ia, true, &mut ea)?;
    wait_serving(fd, ib, true, &mut eb)?;
    println!("module: instances {ia} ({nid_a}) and {ib} ({nid_b}) served by two engines");

    // 1. PUTs both ways at once, two producer kthreads each.
    let t = Instant::now();
    let (la, lb) = std::thread::scope(|s| {
        let x = s.spawn(|| put(ia, nid_b, mib, MIB, 2, 1 << 40));
        let y = s.spawn(|| put(ib, nid_a, mib, MIB, 2, 2 << 40));
        (x.join(), y.join())
    });
    let (la, lb) = (
        la.map_err(|_| anyhow::anyhow!("load thread panicked"))??,
        lb.map_err(|_| anyhow::anyhow!("load thread panicked"))??,
    );
    let secs = t.elapsed().as_secs_f64();
    for (l, dir) in [(&la, "A→B"), (&lb, "B→A")] {
        ensure!(
            l.ok == u64::from(mib) && l.failed == 0,
            "PUTs {dir}: {} of {mib} completed OK, {} failed ({} engine gone)",
            l.ok,
            l.failed,
            l.engine_gone
        );
    }
    let (sa, sb) = (device::stats(fd, ia)?, device::stats(fd, ib)?);
    for (s, who) in [(&sa, "A"), (&sb, "B")] {
        ensure!(
            s.puts_verified == u64::from(mib) && s.puts_corrupt == 0,
            "sink {who}: {} PUTs verified, {} corrupt, expected {mib} verified",
            s.puts_verified,
            s.puts_corrupt
        );
    }
    let gbps = 2.0 * f64::from(mib) * f64::from(MIB) * 8.0 / secs / 1e9;
    let puts = format!(
        "{mib} MiB each way in {secs:.1} s ({gbps:.2} Gbit/s both ways), every byte verified"
    );
    println!("module: PUTs: {puts}");

    // 2. GET/REPLY pings of 4 KiB.
    let mut p = Load {
        instance: ia,
        kind: LOAD_PING,
        peer_nid: nid_b.0,
        salt: 7 << 40,
        count: 200,
        size: 4096,
        threads: 1,
        timeout_ms: 10_000,
        ..Load::default()
    };
    device::load(fd, &mut p)?;
    ensure!(
        p.ok == 200 && p.corrupt == 0,
        "pings: {} of 200 answered, {} corrupt REPLYs",
        p.ok,
        p.corrupt
    );
    let us = |ns: u64| ns as f64 / 1e3;
    let ping = format!(
        "ping 4 KiB RTT min {:.0} / p50 {:.0} / p90 {:.0} / p99 {:.0} / max {:.0} µs",
        us(p.rtt_ns[0]),
        us(p.rtt_ns[1]),
        us(p.rtt_ns[2]),
        us(p.rtt_ns[3]),
        us(p.rtt_ns[4])
    );
    println!("module: {ping}");

    // 3. Engine A killed mid-transfer.
    let before = device::stats(fd, ia)?;
    let n = 96u32;
    let crash = std::thread::scope(|s| -> anyhow::Result<(Load, f64)> {
        let load = s.spawn(|| put(ia, nid_b, n, MIB, 2, 3 << 40));
        let t = Instant::now();
        while device::stats(fd, ia)?.tx_ok < before.tx_ok + 8 {
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "no PUT completed within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ea.kill();
        wait_serving(fd, ia, false, &mut eb)?;
        let down = Instant::now();
        ea = Engine::start(&a, ia)?;
        wait_serving(fd, ia, true, &mut ea)?;
        let back = down.elapsed().as_secs_f64();
        let l = load
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        Ok((l, back))
    })?;
    let (l, back) = crash;
    let after = device::stats(fd, ia)?;
    ensure!(
        l.engine_gone >= 1 && l.ok + l.failed == u64::from(n) && l.ok >= 8,
        "engine kill: {} OK + {} failed of {n}, {} failed back as ENGINE_GONE (expected ≥ 1)",
        l.ok,
        l.failed,
        l.engine_gone
    );
    ensure!(
        after.detaches == before.detaches + 1 && after.attaches == before.attaches + 1,
        "engine kill: {} detaches, {} attaches (expected one more of each)",
        after.detaches - before.detaches,
        after.attaches - before.attaches
    );
    let resumed = put(ia, nid_b, 16, MIB, 1, 4 << 40)?;
    ensure!(
        resumed.ok == 16,
        "after the new engine attached: {} of 16 PUTs OK",
        resumed.ok
    );
    let crash_line = format!(
        "engine killed mid-transfer: {} of {n} failed back ({} ENGINE_GONE), new engine serving after {back:.1} s, 16 PUTs then OK",
        l.failed, l.engine_gone
    );
    println!("module: {crash_line}");

    // 4. A hostile engine on instance A.
    ea.kill();
    wait_serving(fd, ia, false, &mut eb)?;
    let hostile = hostile(fd, ia)?;
    println!("module: {hostile}");
    ea = Engine::start(&a, ia)?;
    wait_serving(fd, ia, true, &mut ea)?;
    let again = put(ia, nid_b, 8, MIB, 1, 5 << 40)?;
    ensure!(
        again.ok == 8,
        "after the hostile engine: {} of 8 PUTs OK",
        again.ok
    );
    let sb = device::stats(fd, ib)?;
    ensure!(
        sb.puts_corrupt == 0,
        "sink B saw {} corrupt PUTs",
        sb.puts_corrupt
    );

    // 5. rmmod: refused with engines attached, clean without.
    drop(dev);
    ensure!(
        sh("rmmod", &["lu2k_kshim"]).is_err(),
        "rmmod succeeded while engines were attached"
    );
    ea.kill();
    eb.kill();
    let t = Instant::now();
    loop {
        match sh("rmmod", &["lu2k_kshim"]) {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                return Err(e.context("rmmod with no engine attached"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    ensure!(!Path::new(DEV).exists(), "{DEV} still exists after rmmod");
    Ok(format!(
        "lu2k_kshim.ko: {puts}; {ping}; {crash_line}; {hostile}; rmmod refused while attached, then clean"
    ))
}

fn create(fd: BorrowedFd<'_>, nid: Nid) -> anyhow::Result<u32> {
    let mut c = Create {
        cores: 1,
        nid_count: 1,
        ring_entries: 1024,
        tx_slots: 32,
        rx_buf_size: 64 << 10,
        rx_buf_count: 1024,
        rx_tables_per_core: 64,
        ..Create::default()
    };
    c.nids[0] = nid.0;
    device::create(fd, &mut c).with_context(|| format!("creating the instance of {nid}"))?;
    Ok(c.instance)
}

/// A PUT load from `instance` to `peer`, on its own descriptor (loads block).
fn put(
    instance: u32,
    peer: Nid,
    count: u32,
    size: u32,
    threads: u32,
    salt: u64,
) -> anyhow::Result<Load> {
    let dev = device::open(Path::new(DEV))?;
    let mut l = Load {
        instance,
        kind: LOAD_PUT,
        peer_nid: peer.0,
        salt,
        count,
        size,
        threads,
        timeout_ms: 30_000,
        ..Load::default()
    };
    device::load(dev.as_fd(), &mut l).with_context(|| format!("PUT load to {peer}"))?;
    Ok(l)
}

/// Waits until the instance is served (`true`) or not (`false`), watching `engine`.
fn wait_serving(
    fd: BorrowedFd<'_>,
    instance: u32,
    want: bool,
    engine: &mut Engine,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if (device::stats(fd, instance)?.attached == 1) == want {
            return Ok(());
        }
        if want {
            engine.check_alive()?;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "instance {instance}: still {} after 90 s{}",
            if want { "not served" } else { "served" },
            if want { engine.tail() } else { String::new() }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The hostile engine: attaches to `instance` like an engine, then writes garbage
/// completions and RX descriptors. Every one must be refused and counted, every RX
/// token must come back, and the module must serve the next engine.
fn hostile(fd: BorrowedFd<'_>, instance: u32) -> anyhow::Result<String> {
    let before = device::stats(fd, instance)?;
    let att = device::attach(Path::new(DEV), instance)?;
    let region = att.region()?;
    let kick: OwnedFd = att.to_kshim[0].try_clone()?;
    let fds = Eventfds {
        to_engine: Some(att.to_engine[0].try_clone()?),
        to_kshim: Some(att.to_kshim[0].try_clone()?),
    };
    let mut core = region.engine_core(0, fds)?;
    att.ack(0)?;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const N: u32 = 200;
    for _ in 0..N {
        let c = TxCompletion {
            cookie: rnd(),
            status: rnd() as u32 % 16,
            detail: rnd() as u32,
        };
        ensure!(core.tx_done.push(c)?, "completion ring full");
    }
    let (rx_pool, rx_tables) = (
        region.layout().header().rx_pool_len,
        region.layout().header().rx_tables_len,
    );
    let mut rx = Vec::new();
    for i in 0..u64::from(N) {
        let mut hdr = [0u8; LNET_HDR_LEN];
        hdr.iter_mut().for_each(|b| *b = rnd() as u8);
        let e = |rnd: &mut dyn FnMut() -> u64| Extent {
            pool: rnd() as u16 % 4,
            flags: 0,
            len: rnd() as u32,
            offset: rnd() % (2 * rx_pool),
        };
        let d = match i % 5 {
            // random throughout
            0 => RxDesc {
                token: i,
                src_nid: rnd(),
                hdr,
                flags: rnd() as u16,
                nfrags: rnd() as u16,
                total_len: rnd() as u32,
                ext: [e(&mut rnd), e(&mut rnd)],
            },
            // an extent past the end of the RX pool
            1 => RxDesc::inline(
                i,
                1,
                hdr,
                &[Extent {
                    pool: 1,
                    flags: 0,
                    len: 4096,
                    offset: rx_pool - 100,
                }],
            ),
            // an indirect table past the end of the table area
            2 => RxDesc {
                token: i,
                src_nid: 1,
                hdr,
                flags: 1,
                nfrags: 4,
                total_len: 4096,
                ext: [
                    Extent {
                        pool: 2,
                        flags: 0,
                        len: 64,
                        offset: rx_tables - 32,
                    },
                    Extent::default(),
                ],
            },
            // a total that is not the sum of the extents
            3 => {
                let mut d = RxDesc::inline(
                    i,
                    1,
                    hdr,
                    &[Extent {
                        pool: 1,
                        flags: 0,
                        len: 4096,
                        offset: 0,
                    }],
                );
                d.total_len = 8192;
                d
            }
            // more inline extents than a descriptor holds
            _ => {
                let mut d = RxDesc::inline(
                    i,
                    1,
                    hdr,
                    &[Extent {
                        pool: 1,
                        flags: 0,
                        len: 64,
                        offset: 0,
                    }],
                );
                d.nfrags = 3;
                d
            }
        };
        rx.push(d);
    }
    ensure!(core.rx.push_slice(&rx)? == rx.len(), "RX ring full");
    // Rung whatever the module's need-wakeup word says.
    rustix::io::write(&kick, &1u64.to_ne_bytes())?;
    let t = Instant::now();
    let mut tokens = 0u64;
    let s = loop {
        while core.rx_return.pop()?.is_some() {
            tokens += 1;
        }
        let s = device::stats(fd, instance)?;
        let done = s.bad_completions - before.bad_completions >= u64::from(N)
            && s.bad_rx - before.bad_rx >= u64::from(N)
            && tokens == u64::from(N);
        if done || t.elapsed() > Duration::from_secs(20) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (bc, br) = (
        s.bad_completions - before.bad_completions,
        s.bad_rx - before.bad_rx,
    );
    ensure!(
        bc == u64::from(N) && br == u64::from(N) && tokens == u64::from(N),
        "hostile engine: {bc} of {N} garbage completions refused, {br} of {N} garbage RX descriptors refused, {tokens} of {N} tokens returned"
    );
    ensure!(
        s.rx_msgs == before.rx_msgs && s.tx_ok == before.tx_ok,
        "hostile engine: garbage was taken as messages or completions"
    );
    drop(core);
    drop(region);
    drop(att);
    let t = Instant::now();
    while device::stats(fd, instance)?.detaches == before.detaches {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the hostile engine never detached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!(
        "hostile engine: {bc} garbage completions and {br} garbage RX descriptors refused and counted, {tokens} tokens returned"
    ))
}

/// `lu2k-engine` in namespace `end.ns`, attached to the module's instance.
struct Engine {
    child: Option<Child>,
    log: String,
}

impl Engine {
    fn start(end: &End, instance: u32) -> anyhow::Result<Engine> {
        let log = format!("/tmp/engine-{}-{instance}.log", end.ns);
        let out = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &end.ns, ENGINE, "run", "--kshim"])
            .arg(format!("device:{DEV},instance={instance}"))
            .args([
                "--bind",
                &end.addr.to_string(),
                "--port",
                "7988",
                "--stats-socket",
            ])
            .arg(format!("/tmp/engine-{}-stats.sock", end.ns))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting lu2k-engine")?;
        Ok(Engine {
            child: Some(child),
            log,
        })
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("lu2k-engine exited ({st}){}", self.tail());
            }
        }
        Ok(())
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().rev().take(5).collect();
        format!(
            "; its last lines: {}",
            lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sh(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(prog).args(args).output()?;
    ensure!(
        out.status.success(),
        "`{prog} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn kernel_log() -> String {
    Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn cmdline_u32(key: &str) -> Option<u32> {
    let c = std::fs::read_to_string("/proc/cmdline").ok()?;
    c.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}
