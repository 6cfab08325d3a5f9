//! The `probe` lab test: io_uring on the lab's kernel, probed here independently of
//! the engine, then the engine's own probe and the I/O path it picks.
//!
//! What a kernel should offer, by release (the io_uring opcodes' merge windows):
//! SEND_ZC / SENDMSG_ZC from 6.1, FUTEX_WAIT / FUTEX_WAKE from 6.7. On 6.1 (Debian
//! bookworm) the engine must therefore run its io_uring fast path without the futex
//! operations (eventfd doorbells instead).

use crate::Outcome;
use anyhow::{ensure, Context};
use io_uring::{opcode, IoUring, Probe};

/// (major, minor) of `uname -r`.
fn release() -> anyhow::Result<(String, (u32, u32))> {
    let uts = rustix::system::uname();
    let r = uts.release().to_string_lossy().into_owned();
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    let major = it
        .next()
        .and_then(|s| s.parse().ok())
        .context("kernel major")?;
    let minor = it
        .next()
        .and_then(|s| s.parse().ok())
        .context("kernel minor")?;
    Ok((r, (major, minor)))
}

/// What this kernel's io_uring says, read directly.
struct Ops {
    sendmsg_zc: bool,
    send_zc: bool,
    recvmsg: bool,
    futex: bool,
    msg_ring: bool,
}

fn own_probe() -> anyhow::Result<Ops> {
    let ring = IoUring::new(8).context("io_uring_setup")?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .context("IORING_REGISTER_PROBE")?;
    Ok(Ops {
        sendmsg_zc: p.is_supported(opcode::SendMsgZc::CODE),
        send_zc: p.is_supported(opcode::SendZc::CODE),
        recvmsg: p.is_supported(opcode::RecvMsg::CODE),
        futex: p.is_supported(opcode::FutexWait::CODE) && p.is_supported(opcode::FutexWake::CODE),
        msg_ring: p.is_supported(opcode::MsgRingData::CODE),
    })
}

pub fn run() -> anyhow::Result<Outcome> {
    let (rel, ver) = release()?;
    let ops = own_probe()?;
    println!(
        "probe: kernel {rel}: SENDMSG_ZC {} SEND_ZC {} RECVMSG {} FUTEX_WAIT/WAKE {} MSG_RING {}",
        ops.sendmsg_zc, ops.send_zc, ops.recvmsg, ops.futex, ops.msg_ring
    );
    ensure!(
        ops.recvmsg && ops.msg_ring,
        "io_uring lacks RECVMSG or MSG_RING on {rel}"
    );
    ensure!(
        ops.futex == (ver >= (6, 7)),
        "io_uring futex ops {} on {rel}: expected {}",
        ops.futex,
        ver >= (6, 7)
    );
    ensure!(
        ops.sendmsg_zc == (ver >= (6, 1)) && ops.send_zc == (ver >= (6, 0)),
        "zero-copy send ops on {rel}: SENDMSG_ZC {} SEND_ZC {}",
        ops.sendmsg_zc,
        ops.send_zc
    );
    engine_check(&rel, ver, &ops)
}

#[cfg(feature = "engine")]
fn engine_check(rel: &str, ver: (u32, u32), ops: &Ops) -> anyhow::Result<Outcome> {
    use lu2k_engine::io::probe::{Features, IoPath};
    let f = Features::probe();
    println!("probe: the engine's probe:\n{f}");
    ensure!(f.kernel == rel, "engine saw kernel {} not {rel}", f.kernel);
    ensure!(
        f.futex == ops.futex && f.sendmsg_zc == ops.sendmsg_zc && f.send_zc == ops.send_zc,
        "the engine's probe disagrees with io_uring's: futex {} sendmsg_zc {} send_zc {}",
        f.futex,
        f.sendmsg_zc,
        f.send_zc
    );
    if ver >= (6, 2) {
        ensure!(
            f.zc_report_usage,
            "kernel {rel} (6.2+) should accept IORING_SEND_ZC_REPORT_USAGE; the engine's probe says no"
        );
    }
    println!(
        "probe: SEND_ZC_REPORT_USAGE {} (ZC_COPIED counting {})",
        f.zc_report_usage,
        if f.zc_report_usage {
            "on"
        } else {
            "unavailable"
        }
    );
    let (path, why) = f.choose(false);
    println!("probe: the engine picks {path}: {why}");
    let expect = if ver >= (6, 1) {
        IoPath::Uring
    } else {
        IoPath::Epoll
    };
    ensure!(
        path == expect,
        "engine picked {path} ({why}) on {rel}; expected {expect:?}"
    );
    Ok(Outcome::Pass(format!(
        "kernel {rel}: engine picks {path} with futex ops {} (as io_uring's own probe says)",
        if f.futex { "present" } else { "absent" }
    )))
}

#[cfg(not(feature = "engine"))]
fn engine_check(rel: &str, _: (u32, u32), ops: &Ops) -> anyhow::Result<Outcome> {
    Ok(Outcome::Skip(format!(
        "kernel {rel}: io_uring probed (futex ops {}); the engine's probe is pending: \
         lu2k-engine did not build for the lab (see the lab's engine build log)",
        if ops.futex { "present" } else { "absent" }
    )))
}
