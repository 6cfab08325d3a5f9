#!/usr/bin/env bash
# Runs every test of lu2k. Does its own set-up: whatever the tests need is
# installed by scripts/setup.sh, never by hand.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p CRATE   # extra arguments go to the main `cargo test`
#
# As root this includes the TUN/network-namespace tests and the kernel lab
# (Debian's kernel in qemu: RDS, netem, the engine on 6.1); without root those
# tests say SKIP with the reason. LU2K_SKIP_LAB=1 skips the lab, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# Made by setup.sh; the metrics test fails rather than skips when told where it is.
export LU2K_TEST_PYTHON="$PWD/target/pyenv/bin/python"

echo "==> cargo test --workspace --release (release: the stress, simulation and interop tests are long in debug)"
cargo test --workspace --release --no-fail-fast "$@"

if [ $# -eq 0 ]; then
    echo "==> the operator guide's commands (docs/gateway.md) on two namespaced gateways"
    scripts/check-docs.sh
    echo "==> fuzz: every cargo-fuzz target ${LU2K_FUZZ_SECS:-10} s under libFuzzer (scripts/fuzz.sh; SKIP without nightly)"
    scripts/fuzz.sh
    echo "==> loom: the ring's publication and need-wakeup protocol, every interleaving"
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
        cargo test -p lu2k-ring-abi --release --test loom
fi
echo "==> all tests passed"
