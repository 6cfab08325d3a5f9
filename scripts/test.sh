#!/usr/bin/env bash
# Runs every test of lu2k. Does its own set-up: whatever the tests need is
# installed here, never by hand.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p CRATE   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "==> cargo test (release: the stress and simulation tests are long in debug)"
cargo test --workspace --release "$@"
