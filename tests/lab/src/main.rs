//! `lu2k-lab <test>`: the kernel lab's tests, run as root inside the VM that
//! `scripts/kernel-lab.sh` boots on Debian's kernel (see `scripts/lab/init`).
//!
//! Each test prints what it does and ends with one line saying why it passed, failed
//! or skipped; the exit status is 0 (pass), 1 (fail) or 77 (skip). The init script
//! turns that into the `LU2K-LAB PASS|FAIL|SKIP name` markers the host reads.
//!
//! - `rds`: lu2k-rds between two network namespaces joined by a veth pair, over
//!   rds_tcp: LNet-shaped messages (72-byte header + payload in many fragments) of
//!   sizes up to 1 MiB of payload, every byte verified, every message received in
//!   order; the size limit and back-pressure mapped as the engine expects.
//! - `netem`: netem's delay and loss on a veth pair measured with UDP, and compared
//!   with the link emulator's model given the same settings.
//! - `probe`: io_uring on this kernel, probed independently, against the engine's own
//!   probe and the path it chooses.
//! - `engine`: the engine's own test binaries (unit, I/O paths, end to end) on this
//!   kernel.
//! - `module`: lu2k_kshim.ko, the kernel half as a kernel module, with engines attached
//!   through /dev/lu2k: verified PUTs each way, pings, an engine killed mid-transfer,
//!   a hostile engine, rmmod.
//! - `lnet`: lu2klnd.ko inside real LNet (Lustre 2.17), two VMs: `lnetctl ping` and
//!   `lst` brw write and read of 1 MiB with check=full across lu2k.
//! - `lnet-compare`: the same `lst` brw load over socklnd (tcp0) and lu2klnd (lu2k0)
//!   between the two VMs, through netem (600 ms round trip, 0 / 0.1 / 1 % loss): the
//!   MiB/s table and the ratios.

mod engine;
mod lnet;
mod lnet_compare;
mod module;
mod netem;
mod netns;
mod probe;
mod rds;

use std::process::ExitCode;

/// How a test ended when it did not fail.
pub enum Outcome {
    /// Passed, with a one-line summary.
    Pass(String),
    /// Could not run here, with the reason.
    Skip(String),
}

/// A lab test: runs to an outcome, or fails with the reason.
type Test = fn() -> anyhow::Result<Outcome>;

const TESTS: &[(&str, Test)] = &[
    ("rds", rds::run),
    ("netem", netem::run),
    ("probe", probe::run),
    ("engine", engine::run),
    ("module", module::run),
    ("lnet", lnet::run),
    ("lnet-compare", lnet_compare::run),
];

fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some((_, test)) = TESTS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<_> = TESTS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: lu2k-lab <{}>", names.join("|"));
        return ExitCode::from(2);
    };
    match test() {
        Ok(Outcome::Pass(summary)) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Skip(reason)) => {
            println!("{reason}");
            ExitCode::from(77)
        }
        Err(e) => {
            // One line: the init script takes the last line as the reason.
            println!("{}", format!("{e:#}").replace('\n', " / "));
            ExitCode::FAILURE
        }
    }
}
