//! Two network namespaces joined by a veth pair, made with iproute2's `ip`, and a way
//! to create sockets inside one of them from this process.
//!
//! A socket belongs to the namespace it was created in for its whole life, so a
//! thread enters the namespace (setns), creates the socket and hands it back; the
//! main thread then uses it from the initial namespace.

use anyhow::{bail, Context};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

/// Runs `ip ARGS...`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

/// Runs `tc ARGS...`, failing with its stderr.
pub fn tc(args: &[&str]) -> anyhow::Result<()> {
    run("tc", args)
}

fn run(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One end of the pair.
#[derive(Debug, Clone)]
pub struct End {
    /// Namespace name (`/run/netns/NAME`).
    pub ns: String,
    /// Interface name inside it.
    pub dev: String,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// Namespaces `a` and `b` with `dev_a` (addr `a`) and `dev_b` (addr `b`) on one /24.
pub fn veth_pair(prefix: &str, a: Ipv4Addr, b: Ipv4Addr) -> anyhow::Result<(End, End)> {
    let ea = End {
        ns: format!("{prefix}a"),
        dev: format!("{prefix}va"),
        addr: a,
    };
    let eb = End {
        ns: format!("{prefix}b"),
        dev: format!("{prefix}vb"),
        addr: b,
    };
    for e in [&ea, &eb] {
        ip(&["netns", "add", &e.ns])?;
    }
    ip(&[
        "link", "add", &ea.dev, "netns", &ea.ns, "type", "veth", "peer", "name", &eb.dev, "netns",
        &eb.ns,
    ])?;
    for e in [&ea, &eb] {
        let cidr = format!("{}/24", e.addr);
        ip(&["-n", &e.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &e.ns, "addr", "add", &cidr, "dev", &e.dev])?;
        ip(&["-n", &e.ns, "link", "set", &e.dev, "up"])?;
    }
    Ok((ea, eb))
}

/// Runs `f` on a thread that has entered namespace `ns`; what it returns (sockets
/// included, which stay in `ns`) comes back to the caller.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("setns({path})"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}
