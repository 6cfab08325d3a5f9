#!/usr/bin/env bash
# Runs every cargo-fuzz target of lu2k (engine/fuzz, backends/*/fuzz,
# ring-abi/fuzz: each crate's fuzz/ directory marked `cargo-fuzz = true`) under
# libFuzzer with AddressSanitizer for a short fixed time each, as CI does;
# fails on any crash, leak, timeout or failed check (libFuzzer's exit status).
#
#   scripts/fuzz.sh                 # every target, LU2K_FUZZ_SECS (10) seconds each
#   scripts/fuzz.sh session         # only the targets named (a name that is no
#                                   # target's is an error)
#
# The targets are the [[bin]] names of each fuzz crate's Cargo.toml (listed
# before anything runs).
#
# Builds the targets with the nightly toolchain and the instrumentation
# cargo-fuzz uses (SanitizerCoverage for libFuzzer, ASan), without cargo-fuzz
# itself. Without a nightly toolchain it says SKIP and exits 0. Each target's
# corpus grows in <crate>/fuzz/corpus/<target> between runs (git-ignored); a
# crashing input is written to <crate>/fuzz/artifacts/<target>/ and printed.
# The fuzz crates share one target directory, target/fuzz (their common
# dependencies, libFuzzer itself among them, are built once). Reproduce a crash
# with the same binary: target/fuzz/<host>/release/<target> <file>.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

secs=${LU2K_FUZZ_SECS:-10}
only=("$@")

# The [[bin]] target names of a fuzz crate's manifest ($1), one a line: the
# first `name` of each [[bin]] table, whatever characters it has.
bin_names() {
    awk '/^\[\[bin\]\][[:space:]]*$/ { inbin = 1; next }
         /^\[/ { inbin = 0 }
         inbin && /^[[:space:]]*name[[:space:]]*=/ {
             sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*$/, ""); print; inbin = 0
         }' "$1"
}

manifests=()
for m in ./*/fuzz/Cargo.toml ./*/*/fuzz/Cargo.toml; do
    grep -q '^cargo-fuzz = true' "$m" && manifests+=("${m#./}")
done
if [ ${#manifests[@]} -eq 0 ]; then
    echo "fuzz: no fuzz crate found (no */fuzz/Cargo.toml with cargo-fuzz = true)" >&2
    exit 1
fi
crates=$(printf '%s\n' "${manifests[@]}" | sed 's|/Cargo.toml$||' | sort)
all=()
for crate in $crates; do
    names=$(bin_names "$crate/Cargo.toml")
    if [ -z "$names" ]; then
        echo "fuzz: $crate has no [[bin]] target; nothing to run there" >&2
        continue
    fi
    echo "==> fuzz targets in $crate: $(echo $names)"
    all+=($names)
done
unknown=()
for o in "${only[@]}"; do
    found=0
    for t in "${all[@]}"; do [ "$t" = "$o" ] && found=1; done
    [ $found -eq 1 ] || unknown+=("$o")
done
if [ ${#unknown[@]} -gt 0 ]; then
    echo "fuzz: no target named ${unknown[*]}; the targets are: ${all[*]}" >&2
    exit 2
fi

if ! nightly=$(rustup run nightly rustc --version 2>/dev/null); then
    echo "SKIP fuzz: no nightly Rust toolchain (libFuzzer's instrumentation needs -Zsanitizer;" \
         "install one with 'rustup toolchain install nightly')" >&2
    echo "SKIP fuzz: the stable property-test mirrors (security_proptest, wire_proptest) still run" >&2
    exit 0
fi
host=$(rustc -vV | sed -n 's/^host: //p')
echo "==> fuzz: $nightly, ${secs}s per target"

# What `cargo fuzz build --release` passes (libFuzzer coverage, compare
# tracing, ASan, and the checks a debug build has).
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 --cfg fuzzing -Zsanitizer=address -Cdebug-assertions -Coverflow-checks"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}

failed=()
ran=0
for crate in $crates; do
    targets=$(bin_names "$crate/Cargo.toml")
    [ -n "$targets" ] || continue
    if [ ${#only[@]} -gt 0 ]; then
        want=()
        for t in $targets; do
            for o in "${only[@]}"; do [ "$t" = "$o" ] && want+=("$t"); done
        done
        [ ${#want[@]} -eq 0 ] && continue
        targets="${want[*]}"
    fi
    echo "==> fuzz: building $crate ($(echo $targets))"
    # The build scripts and proc macros stay uninstrumented: --target keeps
    # RUSTFLAGS to the target's code.
    cargo +nightly build --release --quiet --manifest-path "$crate/Cargo.toml" \
        --target "$host" --target-dir target/fuzz --bins
    for t in $targets; do
        bin="target/fuzz/$host/release/$t"
        corpus="$crate/corpus/$t"
        artifacts="$crate/artifacts/$t/"
        mkdir -p "$corpus" "$artifacts"
        echo "==> fuzz: $t for ${secs}s (corpus $corpus: $(ls "$corpus" | wc -l) inputs)"
        log="target/fuzz/fuzz-$t.log"
        if "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" >"$log" 2>&1; then
            grep -E '^(Done|stat::number_of_executed_units)' "$log" | sed "s/^/    $t: /"
            ran=$((ran + 1))
        else
            echo "FAIL fuzz: $t (log $log):" >&2
            tail -n 60 "$log" >&2
            ls -l "$artifacts" >&2
            failed+=("$t")
        fi
    done
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
if [ "$ran" -eq 0 ]; then
    echo "==> fuzz: no target matched: ${only[*]}" >&2
    exit 1
fi
echo "==> fuzz: $ran targets ran ${secs}s each without a failure"
