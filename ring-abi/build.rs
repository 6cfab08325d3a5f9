//! Declares the `loom` cfg so `--cfg loom` builds (the loom model tests) pass check-cfg.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rerun-if-changed=build.rs");
}
