#!/usr/bin/env bash
# The simulation against the engine, per cell of the GEO scenario (issue 19).
#
#   scripts/sim-vs-engine.sh                      # 600 ms, 100 Mbit/s, 0/0.1/1/5 %: ~5 minutes
#   scripts/sim-vs-engine.sh --loss 0.01 --runs 3 # one cell, three engine runs
#   scripts/sim-vs-engine.sh --quick              # 48 MiB per cell (geo.toml --quick): ~1.5 minutes
#   scripts/sim-vs-engine.sh --sim-only           # the simulation alone: seconds
#   scripts/sim-vs-engine.sh --trace DIR          # also both sides' state every 250 ms, as CSV
#
# Per cell:
# - sim: `lu2k-udt`'s example `sim_cell`, the same transfer on virtual time
#   between two bare UDT connections through the same link model and settings
#   (geo.toml's link and seed 7, 1 MiB LNet PUTs, the engine's receive buffer),
#   after one 64-byte message acknowledged, as the harness's lu2k sender
#   connects (`--warmup-bytes 64`), twice: the sender taking packets one at
#   a time at their pacing time (as
#   the sim grid does: `sim grid`) and in runs as the engine takes them
#   (`poll_transmit_batch`, data up to 1 ms ahead: `sim`, the one compared);
# - engine: `lu2k-perf run perf/scenarios/geo.toml --cells CELL --only lu2k`,
#   two real engines (io_uring, UDP) through linkem's relay on this machine's
#   clock, full length (512 MiB) unless --quick;
# and prints both goodputs (the harness's figure: payload over the time from
# the first send of a connected sender to the last delivery; the simulation's
# `connected_goodput_mbps`, from the warm-up message's acknowledgement), their ratio, the datagrams each dropped at the
# bottleneck queue (the link model's counter: the engine's from the relay),
# and the load average around the engine runs.
# With --trace DIR, a sampler reads both engines' stats socket every 250 ms
# during each engine run (DIR/engine-CELL-{a,b}.csv; a = sender, b =
# receiver; with --runs, run n in DIR/engine-CELL-run<n>-{a,b}.csv), the
# simulation writes DIR/sim-CELL.csv, and a step-by-step comparison of the
# simulation with the first run is printed (DIR/compare-CELL.txt).
#
# Options: --rtt-ms MS (600), --rate-mbps M (100), --loss "L1 L2 ..." as
# fractions (default "0 0.001 0.01 0.05"; each must be a cell geo.toml has),
# --runs N (1; the engine's median run is compared), --quick, --sim-only,
# --trace DIR, --out DIR (perf-out/sim-vs-engine), --no-build.
# No root needed (lu2k runs over the UDP relay).
set -euo pipefail
cd "$(dirname "$0")/.."

rtt=600
rate=100
losses="0 0.001 0.01 0.05"
runs=1
quick=0
sim_only=0
trace=""
out="perf-out/sim-vs-engine"
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rtt-ms) rtt="$2"; shift 2 ;;
        --rate-mbps) rate="$2"; shift 2 ;;
        --loss) losses="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --sim-only) sim_only=1; shift ;;
        --trace) trace="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "sim-vs-engine: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -n "$trace" ]; then
    mkdir -p "$trace"
    trace="$(cd "$trace" && pwd)"
fi
if [ "$quick" = 1 ]; then
    bytes=50331648
else
    bytes=536870912
fi

if [ "$build" = 1 ]; then
    echo "==> building the simulation's example and the harness (cargo build --release)"
    cargo build --release -q -p lu2k-udt --example sim_cell
    [ "$sim_only" = 1 ] || cargo build --release -q -p lu2k-perf
fi
sim=target/release/examples/sim_cell
perf=target/release/lu2k-perf

# The harness's cell name: 600ms/0.1%/100M.
cell_name() {
    python3 -c "import sys; r,l,m=map(float,sys.argv[1:]); print(f'{r:g}ms/{l*100:g}%/{m:g}M')" "$rtt" "$1" "$rate"
}
# A file name for a cell: 600ms_0.1pct_100M.
cell_file() { echo "$1" | sed 's#/#_#g; s#%#pct#g'; }

# The engines' stats sockets appear under the run's TMPDIR as
# lu2k-PID/stats-{a,b}.sock; this samples both every 250 ms into CSV until
# told to stop (the file $1/stop appears).
sampler() {
    python3 - "$1" "$2" <<'EOF'
import glob, json, os, socket, sys, time
tmp, prefix = sys.argv[1], sys.argv[2]
cols = ["wall_s", "uptime_s", "tx_descs", "tx_completions", "rx_descs", "rx_returns",
        "rx_pool_buffers", "rx_pool_held", "tx_msgs_in_flight", "passes", "sleeps",
        "spin_us", "datagrams_sent", "bytes_received", "rx_starved", "socket_drops",
        "rearms", "drops", "peer_bytes_tx", "peer_bytes_rx", "peer_in_flight",
        "retransmissions", "rtt_ms", "rate_mbps", "outages"]
files = {}
inodes = {}
runs = {}
t0 = time.monotonic()
tick = 0
while not os.path.exists(os.path.join(tmp, "stop")):
    for path in glob.glob(os.path.join(tmp, "lu2k-*", "stats-*.sock")):
        side = path[-6]
        try:
            ino = os.stat(path).st_ino
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1.0)
            s.connect(path)
            buf = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                buf += b
            s.close()
            r = json.loads(buf)
        except (OSError, ValueError):
            continue
        c = r["cores"][0]
        io = c["io"]
        p = c["peers"][0] if c["peers"] else {}
        row = [time.monotonic() - t0, r["uptime_s"], c["tx_descs"], c["tx_completions"],
               c["rx_descs"], c["rx_returns"], c.get("rx_pool_buffers", 0),
               c.get("rx_pool_held", 0), c.get("tx_msgs_in_flight", 0), c.get("passes", 0),
               c["sleeps"], c.get("spin_us", 0), io["datagrams_sent"], io["bytes_received"],
               io["rx_starved"], io.get("socket_drops", 0), io["rearms"],
               ";".join(f"{k}={v}" for k, v in sorted(c["drops"].items())),
               p.get("bytes_tx", 0), p.get("bytes_rx", 0), p.get("in_flight", 0),
               p.get("retransmissions", 0), p.get("rtt_us", 0) / 1000, p.get("rate_bps", 0) / 1e6,
               p.get("outages", 0)]
        if inodes.get(side) != ino:
            # A new socket: the next run of --runs. Run 1 goes to PREFIX-a.csv,
            # run n to PREFIX-run<n>-a.csv.
            inodes[side] = ino
            runs[side] = runs.get(side, 0) + 1
            if side in files:
                files[side].close()
            tag = "" if runs[side] == 1 else f"-run{runs[side]}"
            files[side] = open(f"{prefix}{tag}-{side}.csv", "w")
            files[side].write(",".join(cols) + "\n")
        files[side].write(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + "\n")
        files[side].flush()
    tick += 1
    time.sleep(max(0.0, t0 + 0.25 * tick - time.monotonic()))
EOF
}

# Step by step: the simulation's trace beside the engine's, per second, each
# from its first delivered message (the engine's within one 250 ms sample; the
# goodputs above say whether the starts differ), and the counters at the end.
compare() {
    python3 - "$1" "$2" "$3" "$4" <<'EOF'
import csv, sys
simf, af, bf, rtt_ms = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
sim = list(csv.DictReader(open(simf)))
a = list(csv.DictReader(open(af)))
b = list(csv.DictReader(open(bf)))
f = lambda r, k: float(r[k])
start = next((f(r, "wall_s") for r in b if f(r, "peer_bytes_rx") > 0), f(b[0], "wall_s"))
sim0 = next((f(r, "t_s") for r in sim if f(r, "delivered_bytes") > 0), 0.0)
for r in sim:
    r["t_s"] = str(f(r, "t_s") - sim0)
def at(rows, t, tk="wall_s", off=0.0):
    best = None
    for r in rows:
        if f(r, tk) - off <= t:
            best = r
    return best
end = max(f(sim[-1], "t_s"), f(b[-1], "wall_s") - start)
print(f"{'t_s':>5} | {'sim Mb/s':>8} {'eng Mb/s':>8} | {'sim rate':>8} {'eng rate':>8} | "
      f"{'sim rtt':>7} {'eng rtt':>7} | {'sim retx':>8} {'eng retx':>8} | {'sim held':>8} "
      f"{'eng held':>8} {'starved':>7}")
prev = (0.0, 0.0)
t = 0.0
while t <= end + 1.0:
    s, ra, rb = at(sim, t, "t_s"), at(a, t, off=start), at(b, t, off=start)
    if s and ra and rb:
        sd, ed = f(s, "delivered_bytes"), f(rb, "peer_bytes_rx")
        print(f"{t:5.0f} | {(sd - prev[0]) * 8 / 1e6:8.1f} {(ed - prev[1]) * 8 / 1e6:8.1f} | "
              f"{f(s, 'rate_mbps'):8.1f} {f(ra, 'rate_mbps'):8.1f} | {f(s, 'rtt_ms'):7.1f} "
              f"{f(ra, 'rtt_ms'):7.1f} | {f(s, 'retx_pkts'):8.0f} {f(ra, 'retransmissions'):8.0f} | "
              f"{f(s, 'held_pkts'):8.0f} {f(rb, 'rx_pool_held'):8.0f} {f(rb, 'rx_starved'):7.0f}")
        prev = (sd, ed)
    t += 1.0
print("(t_s from each side's first delivery; Mb/s: payload delivered in the second before; "
      "held: sim packets held by the receiving connection, engine RX buffers held by kshim)")
# Over the steady part (from 5 s after the first delivery to 5 s before the end; a
# --quick run: 1 s after to 1 s before): the datagrams (data and control) each sender
# put on the wire per second against the pacing rate it held.
lo, hi = (5.0, end - 5.0) if end > 20 else (1.0, max(2.0, end - 1.0))
def span(rows, tk, off, vk):
    x = [r for r in rows if lo <= f(r, tk) - off <= hi]
    if len(x) < 2:
        return None, []
    return (f(x[-1], vk) - f(x[0], vk)) / (f(x[-1], tk) - f(x[0], tk)), x
ss, sx = span(sim, "t_s", 0.0, "client_dgrams")
es, ex = span(a, "wall_s", start, "datagrams_sent")
if ss and es:
    cap = 97.07
    mean = lambda x, k: sum(f(r, k) for r in x) / len(x)
    print(f"{lo:.0f}-{hi:.0f} s: datagrams sent per second sim {ss:.0f}, engine {es:.0f} ({es / ss - 1:+.1%}); "
          f"pacing rate mean sim {mean(sx, 'rate_mbps'):.2f} engine {mean(ex, 'rate_mbps'):.2f} Mbit/s, "
          f"above the link's payload rate ({cap}) in {sum(f(r, 'rate_mbps') > cap + 0.5 for r in sx)}/{len(sx)} "
          f"and {sum(f(r, 'rate_mbps') > cap + 0.5 for r in ex)}/{len(ex)} samples, highest "
          f"{max(f(r, 'rate_mbps') for r in sx):.1f} and {max(f(r, 'rate_mbps') for r in ex):.1f}; "
          f"RTT mean {mean(sx, 'rtt_ms'):.0f} and {mean(ex, 'rtt_ms'):.0f} ms, highest "
          f"{max(f(r, 'rtt_ms') for r in sx):.0f} and {max(f(r, 'rtt_ms') for r in ex):.0f}")
la, lb = a[-1], b[-1]
print(f"end: sim retx {sim[-1]['retx_pkts']} pkts, engine retx {la['retransmissions']}; "
      f"receiver drops [{lb['drops']}], rx_starved {lb['rx_starved']}, socket drops "
      f"{lb['socket_drops']}, RX pool held at most {max(int(r['rx_pool_held']) for r in b)} of "
      f"{lb['rx_pool_buffers']} buffers; sender passes {la['passes']} sleeps {la['sleeps']}")
EOF
}

cells=()
for l in $losses; do cells+=("$(cell_name "$l")"); done
echo "==> sim-vs-engine: ${cells[*]}; $((bytes >> 20)) MiB per transfer; engine runs $runs each$([ "$sim_only" = 1 ] && echo ' (skipped: --sim-only)')"

declare -A simg simgrid simq enggood engq engload
for l in $losses; do
    name="$(cell_name "$l")"
    file="$(cell_file "$name")"
    targs=()
    [ -n "$trace" ] && targs=(--trace "$trace/sim-$file.csv")
    echo "==> sim $name: $sim --rtt-ms $rtt --loss $l --rate-mbps $rate --bytes $bytes --warmup-bytes 64 [--batch] ${targs[*]}"
    line="$("$sim" --rtt-ms "$rtt" --loss "$l" --rate-mbps "$rate" --bytes "$bytes" --warmup-bytes 64)"
    echo "    $line"
    simgrid[$name]="$(echo "$line" | sed -n 's/.* connected_goodput_mbps=\([^ ]*\).*/\1/p')"
    line="$("$sim" --rtt-ms "$rtt" --loss "$l" --rate-mbps "$rate" --bytes "$bytes" --warmup-bytes 64 --batch "${targs[@]}")"
    echo "    $line"
    simg[$name]="$(echo "$line" | sed -n 's/.* connected_goodput_mbps=\([^ ]*\).*/\1/p')"
    simq[$name]="$(echo "$line" | sed -n 's/.* queue_drops=\([^ ]*\).*/\1/p')"
done

if [ "$sim_only" = 0 ]; then
    for l in $losses; do
        name="$(cell_name "$l")"
        file="$(cell_file "$name")"
        json="$out/engine-$file.json"
        qargs=()
        [ "$quick" = 1 ] && qargs=(--quick)
        echo "==> engine $name: $perf run perf/scenarios/geo.toml --cells $name --only lu2k --runs $runs ${qargs[*]} --json $json  (load before: $(cut -d' ' -f1-3 /proc/loadavg))"
        tmp="$(mktemp -d)"
        spid=""
        if [ -n "$trace" ]; then
            sampler "$tmp" "$trace/engine-$file" &
            spid=$!
        fi
        status=0
        TMPDIR="$tmp" "$perf" run perf/scenarios/geo.toml --cells "$name" --only lu2k \
            --runs "$runs" "${qargs[@]}" --json "$json" --out "$out" >"$out/engine-$file.log" 2>&1 || status=$?
        if [ -n "$spid" ]; then
            touch "$tmp/stop"
            wait "$spid" || true
        fi
        rm -rf "$tmp"
        if [ "$status" != 0 ]; then
            echo "    lu2k-perf failed (exit $status); its output: $out/engine-$file.log" >&2
            tail -5 "$out/engine-$file.log" >&2
            exit 1
        fi
        enggood[$name]="$(jq -r '.[0].goodput_mbps * 100 | round / 100' "$json")"
        engq[$name]="$(jq -r '.[0].queue_drops // "-"' "$json")"
        engload[$name]="$(jq -r '"\(.[0].load_avg.start[0])-\(.[0].load_avg.peak_1m // .[0].load_avg.end[0])"' "$json")"
        echo "    goodput $(jq -r '.[0] | "\(.goodput_mbps) Mbit/s (runs \(.goodput_runs)), steady \(.steady_mbps), retransmitted \(.retrans_bytes) B, status \(.status)"' "$json")"
        if [ -n "$trace" ] && [ -f "$trace/engine-$file-a.csv" ] && [ -f "$trace/engine-$file-b.csv" ]; then
            compare "$trace/sim-$file.csv" "$trace/engine-$file-a.csv" "$trace/engine-$file-b.csv" "$rtt" \
                | tee "$trace/compare-$file.txt"
        fi
    done
fi

echo
echo "sim-vs-engine: goodput in Mbit/s, payload over a connected sender's first send to the last delivery, $((bytes >> 20)) MiB per transfer"
printf '%-16s %9s %9s %9s %8s %11s %11s  %s\n' cell "sim grid" sim engine eng/sim "sim qdrops" "eng qdrops" "load (1 min, start-peak)"
for l in $losses; do
    name="$(cell_name "$l")"
    s="${simg[$name]}"
    e="${enggood[$name]:-}"
    if [ -n "$e" ]; then
        r="$(python3 -c "import sys; print(f'{float(sys.argv[2])/float(sys.argv[1]):.3f}')" "$s" "$e")"
        printf '%-16s %9s %9s %9s %8s %11s %11s  %s\n' "$name" "${simgrid[$name]}" "$s" "$e" "$r" "${simq[$name]}" "${engq[$name]}" "${engload[$name]}"
    else
        printf '%-16s %9s %9s %9s %8s %11s\n' "$name" "${simgrid[$name]}" "$s" - - "${simq[$name]}"
    fi
done
