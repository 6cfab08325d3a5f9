#!/usr/bin/env bash
# Runs the quick grid twice with the same build and says whether every row's
# goodput (the median of --runs, default 3) stayed within ±10 % (issue 18
# item 6). Exit 0: stable; 1: not; 2: a run failed.
#
#   perf/quick-stability.sh                      # geo.toml --quick, every contender
#   perf/quick-stability.sh --only lu2k,udt4     # extra arguments go to both runs
#   SCENARIO=perf/scenarios/tiny.toml TOLERANCE=0.2 perf/quick-stability.sh
#
# The two grids' JSON and the comparison land in $OUT (default
# perf-out/stability). A row marked "loaded machine" in either run was
# measured beside other work (see the harness README); compare such rows
# with care, or rerun on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${SCENARIO:-perf/scenarios/geo.toml}
TOLERANCE=${TOLERANCE:-0.10}
OUT=${OUT:-perf-out/stability}
mkdir -p "$OUT"
cargo build --release -q -p lu2k-perf
# A copy: a rebuild meanwhile (another checkout user) must not swap the
# binary between or under the two runs (nodes run the harness's own file).
BIN="$OUT/lu2k-perf"
cp target/release/lu2k-perf "$BIN"
for i in 1 2; do
    echo "quick-stability: run $i of 2: $SCENARIO --quick $*" >&2
    if ! "$BIN" run "$SCENARIO" --quick --json "$OUT/run$i.json" --out "$OUT/plots$i" "$@" >"$OUT/run$i.txt"; then
        echo "quick-stability: run $i failed (see $OUT/run$i.txt)" >&2
        exit 2
    fi
done
set +e
"$BIN" compare "$OUT/run1.json" "$OUT/run2.json" --tolerance "$TOLERANCE" | tee "$OUT/compare.txt"
rc=${PIPESTATUS[0]}
if grep -q "loaded machine" "$OUT/run1.json" "$OUT/run2.json"; then
    echo "quick-stability: some rows ran on a loaded machine (their notes say so)" >&2
fi
exit "$rc"
