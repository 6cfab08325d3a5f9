//! `--backend`: the RDS back-end refuses to start, with the lu2k-rds error that says
//! what is missing, on a kernel without RDS (this build machine; on a kernel with RDS,
//! the kernel lab, it gets past that check); `udt` is the default.

use std::process::Command;

fn engine() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lu2k-engine"))
}

#[test]
fn rds_backend_without_rds_fails_at_start_with_the_clear_error() {
    let out = engine()
        .args([
            "run",
            "--backend",
            "rds",
            "--kshim-socket",
            "/nonexistent/lu2k-test-kshim.sock",
            "--bind",
            "127.0.0.1",
        ])
        .output()
        .expect("run lu2k-engine");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("lu2k-engine --backend rds: {:?}\n{err}", out.status);
    assert!(!out.status.success(), "--backend rds must not start here");
    match lu2k_rds::probe() {
        Err(e) => {
            eprintln!("this kernel has no RDS ({e}): checking the missing-RDS error");
            assert!(
                !err.contains("attaching to kshim"),
                "the back-end must be checked before kshim is contacted: {err}"
            );
            for needle in ["RDS is missing", "rds_tcp", "modprobe", "--backend udt"] {
                assert!(err.contains(needle), "{needle:?} not in {err:?}");
            }
        }
        Ok(()) => {
            eprintln!("this kernel has RDS: the engine must get past the back-end check");
            assert!(!err.contains("RDS is missing"), "{err}");
            assert!(err.contains("attaching to kshim"), "{err}");
        }
    }
}

#[test]
fn backend_flag_is_validated_and_udt_is_the_default() {
    let out = engine()
        .args([
            "check-config",
            "--kshim-socket",
            "/tmp/x.sock",
            "--bind",
            "127.0.0.1",
        ])
        .output()
        .expect("run lu2k-engine");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("backend = \"udt\""), "{text}");
    assert!(text.contains("zero_copy = \"auto\""), "{text}");
    let out = engine()
        .args([
            "check-config",
            "--kshim-socket",
            "/tmp/x.sock",
            "--bind",
            "127.0.0.1",
            "--zero-copy",
            "never",
        ])
        .output()
        .expect("run lu2k-engine");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("zero_copy = \"never\""), "{text}");
    let out = engine()
        .args(["run", "--backend", "sctp"])
        .output()
        .expect("run lu2k-engine");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("udt") && err.contains("rds"), "{err}");
}
