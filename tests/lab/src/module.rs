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
//! 5. userspace kshim (the lu2k-kshim library) as the other node's kernel half: the
//!    module's PUTs verified and its pings answered by it, through two engines;
//! 6. rmmod refused while an engine is attached, clean once none is.
//!
//! Before the engines attach, hostile CREATE and LOAD arguments (sizes whose layout
//! would wrap u64, past the caps or the 1 GiB region, a load timeout past 60 s) must be
//! refused with the errno the module documents and leave no instance behind.
//!
//! The consumer's sleeps must never end by timeout with work waiting (a lost wakeup),
//! and the kernel log must hold no `BUG:`, `WARNING:`, `Oops` or `general protection`.
//!
//! ABI conformance, one suite for both producers: the hostile-engine checks
//! ([`hostile_checks`]) run against userspace kshim first, then against the module.
//!
//! `lu2k.module_mib=N` on the kernel command line sets the MiB sent each way
//! (default 1024).

use crate::netns::{veth_pair, End};
use crate::Outcome;
use anyhow::{bail, ensure, Context};
use lu2k_kshim::hdr::{Msg, Repr};
use lu2k_kshim::{selftest, Event, Kshim};
use lu2k_ring_abi::attach::device::{self, Create, Load, LOAD_PING, LOAD_PUT};
use lu2k_ring_abi::attach::{self, Attachment};
use lu2k_ring_abi::{Eventfds, Extent, Nid, RxDesc, TxCompletion, LNET_HDR_LEN};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
    let user = user_kshim_hostile().context("the hostile-engine checks against userspace kshim")?;
    println!("module: userspace kshim: {user}");
    sh("insmod", &[KO]).context("insmod lu2k_kshim.ko")?;
    // A hang (a task stuck in the kernel) must be named, not eat the VM's time limit.
    let limit = Duration::from_secs(180 + u64::from(mib) / 4);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(scenario(mib));
    });
    let r = match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            hang_report();
            bail!(
                "the module test did not finish within {} s: blocked tasks dumped above",
                limit.as_secs()
            );
        }
    };
    let log = kernel_log();
    for l in log.lines().filter(|l| l.contains("lu2k_kshim")) {
        println!("dmesg: {l}");
    }
    if r.is_err() {
        engine_logs();
    }
    let summary = format!(
        "{}; the same hostile-engine checks against userspace kshim: {user}",
        r?
    );
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
    let refused = refusals(fd, &[ia, ib])?;
    println!("module: {refused}");
    let mut ea = Engine::device(&a, ia)?;
    let mut eb = Engine::device(&b, ib)?;
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
        peer_nid: nid_b,
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
        ea = Engine::device(&a, ia)?;
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
    ea = Engine::device(&a, ia)?;
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

    // 5. Userspace kshim as B's kernel half: module PUTs and pings across. Both
    // engines start afresh: a sender keeps its connection to a receiver's engine
    // that is gone until the peer-down timeout.
    eb.kill();
    ea.kill();
    wait_serving(fd, ib, false, &mut ea)?;
    wait_serving(fd, ia, false, &mut ea)?;
    let uk = UserKshim::start(nid_b, "/tmp/kshim-b.sock")?;
    let mut eb = Engine::start(&b, "socket:/tmp/kshim-b.sock", "user")?;
    ea = Engine::device(&a, ia)?;
    wait_serving(fd, ia, true, &mut ea)?;
    let t = Instant::now();
    while uk.counters().stats.attaches == 0 {
        eb.check_alive()?;
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "the engine did not attach to userspace kshim within 90 s{}",
            eb.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let l = put(ia, nid_b, 32, MIB, 2, 6 << 40)?;
    let mut p = Load {
        instance: ia,
        kind: LOAD_PING,
        peer_nid: nid_b,
        salt: 8 << 40,
        count: 20,
        size: 4096,
        threads: 1,
        timeout_ms: 10_000,
        ..Load::default()
    };
    device::load(fd, &mut p)?;
    let k = uk.stop()?;
    ensure!(
        l.ok == 32 && k.puts_verified == 32 && k.puts_corrupt == 0,
        "module → userspace kshim: {} of 32 PUTs OK, {} verified and {} corrupt at kshim",
        l.ok,
        k.puts_verified,
        k.puts_corrupt
    );
    ensure!(
        p.ok == 20 && p.corrupt == 0 && k.gets_answered == 20,
        "module pings to userspace kshim: {} of 20 answered ({} GETs answered by kshim), {} corrupt",
        p.ok,
        k.gets_answered,
        p.corrupt
    );
    let interop = "userspace kshim as the peer's kernel half: 32 module PUTs verified by it, 20 pings answered";
    println!("module: {interop}");
    eb.kill();

    // The doorbells, both ways, under the need-wakeup rules: a consumer sleep that
    // ended by its 1 s timeout with work waiting would be a lost wakeup.
    let (sa, sb) = (device::stats(fd, ia)?, device::stats(fd, ib)?);
    ensure!(
        sa.idle_timeouts_with_work == 0 && sb.idle_timeouts_with_work == 0,
        "lost wakeups: the module's consumer found work after sleeping its full timeout {} + {} times",
        sa.idle_timeouts_with_work,
        sb.idle_timeouts_with_work
    );
    let bells = format!(
        "doorbells to the engines {}, from them {}, no lost wakeup",
        sa.doorbells + sb.doorbells,
        sa.wakeups + sb.wakeups
    );
    println!("module: {bells}");

    // 6. One peer over two cores: instances of two ring sets that spread each peer
    // over both (conns_per_peer = 2, lu2k_stripe); the engines keep a connection per
    // core and steer by socket ID. They stay attached for the rmmod check below.
    ea.kill();
    wait_serving(fd, ia, false, &mut ea)?;
    let ia2 = create_striped(fd, nid_a)?;
    let ib2 = create_striped(fd, nid_b)?;
    ea = Engine::device(&a, ia2)?;
    eb = Engine::device(&b, ib2)?;
    wait_serving(fd, ia2, true, &mut ea)?;
    wait_serving(fd, ib2, true, &mut eb)?;
    let n = 64u32;
    let l = put(ia2, nid_b, n, MIB, 2, 9 << 40)?;
    let s2 = device::stats(fd, ib2)?;
    ensure!(
        l.ok == u64::from(n) && l.failed == 0 && s2.puts_verified == u64::from(n),
        "striped PUTs: {} of {n} OK, {} failed, {} verified at the sink",
        l.ok,
        l.failed,
        s2.puts_verified
    );
    // Snapshots are published every 100 ms of a core's loop: wait for the counts.
    let t = Instant::now();
    let (tx, rx) = loop {
        let tx: Vec<u64> = core_counts(&a.ns)?.iter().map(|c| c.0).collect();
        let rx: Vec<u64> = core_counts(&b.ns)?.iter().map(|c| c.1).collect();
        if tx.iter().sum::<u64>() >= u64::from(n) && rx.iter().sum::<u64>() >= u64::from(n) {
            break (tx, rx);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "striped PUTs: engine stats never counted {n}: TX descriptors per core {tx:?}, RX {rx:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        tx.len() == 2 && rx.len() == 2 && tx.iter().chain(&rx).all(|&c| c >= u64::from(n / 8)),
        "striped PUTs of one peer did not use both cores: sender TX descriptors per core {tx:?}, receiver RX descriptors per core {rx:?}"
    );
    let striped = format!(
        "one peer over two cores (conns_per_peer 2): {n} PUTs verified, sender TX descriptors per core {tx:?}, receiver RX descriptors per core {rx:?}"
    );
    println!("module: {striped}");

    // 7. rmmod: refused with an engine attached, clean without.
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
        "lu2k_kshim.ko: {puts}; {ping}; {crash_line}; {hostile}; {interop}; {bells}; {striped}; rmmod refused while attached, then clean"
    ))
}

/// An instance of `nid` on `cores` ring sets spreading each peer over
/// `conns_per_peer` of them, `tx_slots` TX slots and 1024 RX buffers per core.
/// The lnet stage uses it too.
pub(crate) fn create_instance(
    fd: BorrowedFd<'_>,
    nid: Nid,
    cores: u32,
    conns_per_peer: u32,
    tx_slots: u32,
) -> anyhow::Result<u32> {
    let mut c = Create {
        cores,
        conns_per_peer,
        nid_count: 1,
        ring_entries: 1024,
        tx_slots,
        rx_buf_size: 64 << 10,
        rx_buf_count: 1024 * cores,
        rx_tables_per_core: 64,
        ..Create::default()
    };
    c.nids[0] = nid;
    device::create(fd, &mut c).with_context(|| {
        format!("creating the instance of {nid} ({cores} cores, {conns_per_peer} per peer)")
    })?;
    Ok(c.instance)
}

fn create(fd: BorrowedFd<'_>, nid: Nid) -> anyhow::Result<u32> {
    create_instance(fd, nid, 1, 0, 32)
}

/// An instance of two ring sets that spreads each peer over both (`conns_per_peer`).
fn create_striped(fd: BorrowedFd<'_>, nid: Nid) -> anyhow::Result<u32> {
    create_instance(fd, nid, 2, 2, 32)
}

/// Per core `(tx_descs, rx_descs)` of the engine in namespace `ns`, from the first
/// table of `lu2k-engine stats`.
fn core_counts(ns: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let out = Command::new(ENGINE)
        .args(["stats", "--socket"])
        .arg(format!("/tmp/engine-{ns}-stats.sock"))
        .output()
        .context("running lu2k-engine stats")?;
    ensure!(
        out.status.success(),
        "lu2k-engine stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for l in text
        .lines()
        .skip_while(|l| !(l.trim_start().starts_with("core") && l.contains("tx_descs")))
        .skip(1)
    {
        let f: Vec<&str> = l.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        match (num(0), num(1), num(3)) {
            (Some(_), Some(tx), Some(rx)) => rows.push((tx, rx)),
            _ => break,
        }
    }
    ensure!(
        !rows.is_empty(),
        "no per-core rows in lu2k-engine stats:\n{text}"
    );
    Ok(rows)
}

/// A hostile caller's CREATE and LOAD arguments: sizes whose layout sums would wrap
/// u64 or pass the caps are refused with EINVAL, a region past 1 GiB with EFBIG, a
/// load timeout past 60 s with EINVAL; no refused CREATE leaves an instance behind
/// (`live` are the instances that exist).
fn refusals(fd: BorrowedFd<'_>, live: &[u32]) -> anyhow::Result<String> {
    let base = Create {
        cores: 1,
        nid_count: 1,
        ring_entries: 4,
        tx_slots: 4,
        rx_buf_size: 4096,
        rx_buf_count: 4,
        rx_tables_per_core: 1,
        ..Create::default()
    };
    let cases: [(&str, Create, i32); 6] = [
        (
            "layout sums past 2^64",
            Create {
                rx_buf_size: 0xFFFF_FFC0,
                rx_buf_count: 0xFFFF_FFFC,
                rx_tables_per_core: 17_825_792,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "rx_buf_size over 1 MiB",
            Create {
                rx_buf_size: 2 << 20,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "rx_buf_count over 2^20",
            Create {
                rx_buf_count: (1 << 20) + 1,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "rx_tables_per_core over ring_entries",
            Create {
                rx_tables_per_core: 5,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "conns_per_peer over cores",
            Create {
                conns_per_peer: 2,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "a 2 GiB RX pool",
            Create {
                rx_buf_size: 1 << 20,
                rx_buf_count: 2048,
                ..base
            },
            libc::EFBIG,
        ),
    ];
    for (what, mut c, want) in cases {
        match device::create(fd, &mut c) {
            Ok(()) => bail!(
                "CREATE with {what} was accepted (instance {}, region {} bytes)",
                c.instance,
                c.region_size
            ),
            Err(attach::Error::Device { err, .. }) if err.raw_os_error() == want => {}
            Err(e) => bail!("CREATE with {what}: {e}, expected errno {want}"),
        }
    }
    for id in 0..16u32 {
        if !live.contains(&id) {
            ensure!(
                device::info(fd, id).is_err(),
                "instance {id} exists after refused CREATEs (live: {live:?})"
            );
        }
    }
    let mut l = Load {
        instance: live[0],
        kind: LOAD_PUT,
        peer_nid: Nid::from_nid4(1),
        count: 1,
        size: 1,
        threads: 1,
        timeout_ms: 60_001,
        ..Load::default()
    };
    match device::load(fd, &mut l) {
        Ok(()) => bail!("a load with timeout_ms 60001 was accepted"),
        Err(attach::Error::Device { err, .. }) if err.raw_os_error() == libc::EINVAL => {}
        Err(e) => bail!("a load with timeout_ms 60001: {e}, expected EINVAL"),
    }
    Ok(format!(
        "hostile CREATE/LOAD arguments: {} bad sizes refused (wrapping layout EINVAL, caps EINVAL, conns_per_peer over cores EINVAL, 2 GiB EFBIG), no instance left behind, timeout_ms 60001 EINVAL",
        cases.len()
    ))
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
        peer_nid: peer,
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
    let summary = hostile_checks(&att, &mut || {
        let s = device::stats(fd, instance)?;
        Ok(Counters {
            bad_completions: s.bad_completions,
            bad_rx: s.bad_rx,
            rx_msgs: s.rx_msgs,
            tx_ok: s.tx_ok,
            index_refusals: s.bad_index,
        })
    })?;
    drop(att);
    let t = Instant::now();
    while device::stats(fd, instance)?.detaches == before.detaches {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the hostile engine never detached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(summary)
}

/// What the conformance checks read from a kernel half.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    bad_completions: u64,
    bad_rx: u64,
    rx_msgs: u64,
    tx_ok: u64,
    /// Impossible ring indices refused: the module counts them and follows none;
    /// userspace kshim ends the session (`engines_gone`).
    index_refusals: u64,
}

/// The hostile-engine suite, for any producer of the ABI: attached as `att`, writes
/// garbage completions and RX descriptors; every one must be refused and counted
/// (`counters`), nothing taken as a message or a completion, every RX token given back.
fn hostile_checks(
    att: &Attachment,
    counters: &mut dyn FnMut() -> anyhow::Result<Counters>,
) -> anyhow::Result<String> {
    let before = counters()?;
    let region = att.region()?;
    let kick: OwnedFd = att.to_kshim[0].try_clone()?;
    let fds = Eventfds {
        to_engine: Some(att.to_engine[0].try_clone()?),
        to_kshim: Some(att.to_kshim[0].try_clone()?),
    };
    let mut core = region.engine_core(0, fds)?;
    // A second mapping with its own handles on core 0, made before anything is pushed:
    // its producer indices go stale, and a push through them later moves the shared
    // producer indices backwards (an impossible index).
    let region2 = att.region()?;
    let mut stale = region2.engine_core(0, Eventfds::none())?;
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
                src_nid: {
                    // Random NID bytes: the module must refuse what is malformed.
                    let mut b = [0u8; 24];
                    b.iter_mut().for_each(|x| *x = rnd() as u8);
                    Nid::from_bytes(&b)
                },
                hdr,
                flags: rnd() as u16,
                nfrags: rnd() as u16,
                total_len: rnd() as u32,
                ext: [e(&mut rnd), e(&mut rnd)],
                reserved: [0; 6],
            },
            // an extent past the end of the RX pool
            1 => RxDesc::inline(
                i,
                Nid::from_nid4(1),
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
                src_nid: Nid::from_nid4(1),
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
                reserved: [0; 6],
            },
            // a total that is not the sum of the extents
            3 => {
                let mut d = RxDesc::inline(
                    i,
                    Nid::from_nid4(1),
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
                    Nid::from_nid4(1),
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
        let s = counters()?;
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
    let stale_done = TxCompletion {
        cookie: 1,
        status: 0,
        detail: 0,
    };
    ensure!(
        stale.tx_done.push(stale_done)?,
        "stale completion ring full"
    );
    ensure!(
        stale.rx.push(RxDesc::inline(
            u64::MAX,
            Nid::from_nid4(1),
            [0; LNET_HDR_LEN],
            &[],
        ))?,
        "stale RX ring full"
    );
    rustix::io::write(&kick, &1u64.to_ne_bytes())?;
    let t = Instant::now();
    let after = loop {
        let a = counters()?;
        if a.index_refusals > s.index_refusals || t.elapsed() > Duration::from_secs(10) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(
        after.index_refusals > s.index_refusals
            && after.rx_msgs == before.rx_msgs
            && after.tx_ok == before.tx_ok,
        "hostile engine: producer indices moved backwards were not refused within 10 s"
    );
    Ok(format!(
        "hostile engine: {bc} garbage completions and {br} garbage RX descriptors refused and counted, {tokens} tokens returned, indices moved backwards refused"
    ))
}

/// A running `lu2k-engine` whose output goes to a log file: its last lines name
/// what went wrong when it exits early; killed when dropped. The lnet stage uses
/// it too.
pub(crate) struct Engine {
    child: Option<Child>,
    log: String,
    /// How many of the log's last lines an error quotes.
    tail_lines: usize,
}

impl Engine {
    /// Spawns `cmd` (the engine, or `ip netns exec` of it) with its output in `log`.
    pub(crate) fn spawn(
        mut cmd: Command,
        log: String,
        tail_lines: usize,
    ) -> anyhow::Result<Engine> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting lu2k-engine")?;
        Ok(Engine {
            child: Some(child),
            log,
            tail_lines,
        })
    }

    /// `lu2k-engine` in namespace `end.ns`, attached to the module's instance.
    fn device(end: &End, instance: u32) -> anyhow::Result<Engine> {
        Engine::start(
            end,
            &format!("device:{DEV},instance={instance}"),
            &instance.to_string(),
        )
    }

    fn start(end: &End, kshim: &str, tag: &str) -> anyhow::Result<Engine> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &end.ns, ENGINE, "run", "--kshim", kshim])
            .args([
                "--bind",
                &end.addr.to_string(),
                "--port",
                "7988",
                "--stats-socket",
            ])
            .arg(format!("/tmp/engine-{}-stats.sock", end.ns));
        Engine::spawn(cmd, format!("/tmp/engine-{}-{tag}.log", end.ns), 5)
    }

    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("lu2k-engine exited ({st}){}", self.tail());
            }
        }
        Ok(())
    }

    pub(crate) fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().rev().take(self.tail_lines).collect();
        format!(
            "; its last lines: {}",
            lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )
    }

    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
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

/// The hostile-engine suite against userspace kshim, attached through its socket.
fn user_kshim_hostile() -> anyhow::Result<String> {
    let nid: Nid = "10.13.0.9@lu2k".parse().map_err(anyhow::Error::msg)?;
    let sock = "/tmp/kshim-hostile.sock";
    let uk = UserKshim::start(nid, sock)?;
    let t = Instant::now();
    let att = loop {
        match attach::connect(Path::new(sock)) {
            Ok(a) => break a,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                return Err(anyhow::Error::new(e).context("connecting to userspace kshim"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let summary = hostile_checks(&att, &mut || {
        let s = uk.counters().stats;
        Ok(Counters {
            bad_completions: s.bogus_completions,
            bad_rx: s.bad_rx,
            rx_msgs: s.rx,
            tx_ok: s.tx_ok,
            index_refusals: s.engines_gone,
        })
    });
    drop(att);
    uk.stop()?;
    summary
}

#[derive(Clone, Copy, Debug, Default)]
struct KshimCounters {
    stats: lu2k_kshim::Stats,
    puts_verified: u64,
    puts_corrupt: u64,
    gets_answered: u64,
}

/// Userspace kshim (the lu2k-kshim library) on a thread of its own, as the selftest's
/// sink: PUTs verified against the pattern, GETs answered with REPLYs carrying it (as
/// `lu2k-kshim sink` does).
struct UserKshim {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<KshimCounters>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl UserKshim {
    fn start(nid: Nid, sock: &str) -> anyhow::Result<UserKshim> {
        let cfg = lu2k_kshim::Config::new(vec![nid], sock);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(KshimCounters::default()));
        let (st, sh) = (stop.clone(), shared.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut k = Kshim::start(cfg).map_err(|e| anyhow::anyhow!("starting kshim: {e}"))?;
            let mut scratch = vec![0u8; lu2k_kshim::MAX_PAYLOAD];
            let mut c = KshimCounters::default();
            while !st.load(Ordering::Relaxed) {
                if let Some(Event::Rx(m)) = k.wait(Some(Duration::from_millis(50))) {
                    match m.hdr.msg {
                        Msg::Put { hdr_data, .. } => {
                            let mut at = 0;
                            let mut ok = m.len() == m.hdr.payload_length as usize;
                            for s in m.slices() {
                                ok &= selftest::check(hdr_data, at, s).is_none();
                                at += s.len();
                            }
                            if ok {
                                c.puts_verified += 1;
                            } else {
                                c.puts_corrupt += 1;
                            }
                        }
                        Msg::Get {
                            return_wmd,
                            match_bits,
                            sink_length,
                            ..
                        } => {
                            let len = (sink_length as usize).min(scratch.len());
                            selftest::fill(match_bits, 0, &mut scratch[..len]);
                            let h = Repr {
                                dest_nid: m.hdr.src_nid,
                                src_nid: m.hdr.dest_nid,
                                dest_pid: m.hdr.src_pid,
                                src_pid: m.hdr.dest_pid,
                                payload_length: len as u32,
                                msg: Msg::Reply {
                                    dst_wmd: return_wmd,
                                },
                            };
                            if k.send(&h, &scratch[..len]).is_ok() {
                                c.gets_answered += 1;
                            }
                        }
                        _ => {}
                    }
                    k.rx_done(m);
                }
                c.stats = k.stats();
                if let Ok(mut g) = sh.lock() {
                    *g = c;
                }
            }
            Ok(())
        });
        Ok(UserKshim {
            stop,
            shared,
            thread: Some(thread),
        })
    }

    fn counters(&self) -> KshimCounters {
        self.shared.lock().map(|g| *g).unwrap_or_default()
    }

    fn stop(mut self) -> anyhow::Result<KshimCounters> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the kshim thread panicked"))??;
        }
        Ok(self.counters())
    }
}

/// Prints the kernel stacks of the lu2k threads and engines and the kernel's list of
/// blocked tasks (sysrq w), for a test that hung.
fn hang_report() {
    let _ = std::fs::write("/proc/sysrq-trigger", "w");
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if comm.starts_with("lu2k") || comm.starts_with("ip") {
                let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
                let state = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
                println!(
                    "hang: {} {}: {}",
                    p.display(),
                    comm.trim(),
                    state.split_whitespace().nth(2).unwrap_or("?")
                );
                for l in stack.lines() {
                    println!("hang:     {l}");
                }
                if let Ok(tasks) = std::fs::read_dir(p.join("task")) {
                    for t in tasks.flatten() {
                        let st =
                            std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                        if st.lines().count() > 1 {
                            println!("hang:   task {}:", t.path().display());
                            for l in st.lines() {
                                println!("hang:       {l}");
                            }
                        }
                    }
                }
            }
        }
    }
    let log = kernel_log();
    let lines: Vec<_> = log.lines().collect();
    for l in &lines[lines.len().saturating_sub(60)..] {
        println!("hang: dmesg: {l}");
    }
    engine_logs();
}

/// The last lines of every engine's log.
fn engine_logs() {
    let Ok(dir) = std::fs::read_dir("/tmp") else {
        return;
    };
    let mut logs: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.to_string_lossy().contains("/engine-") && p.extension().is_some_and(|x| x == "log")
        })
        .collect();
    logs.sort();
    for p in logs {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(12)..] {
            println!("{}: {l}", p.display());
        }
    }
}
