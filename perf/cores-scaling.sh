#!/bin/bash
# --cores scaling of one sending node (lu2k-kshim put + lu2k-engine --cores N), two runs:
#
#   peers     N sink nodes (kshim sink + engine each), sink addresses chosen so the ABI's
#             shard function puts one peer on each of the sender's cores;
#   one-peer  ONE sink node, both sides with --cores N and conns_per_peer = N: kshim
#             spreads the one peer's messages over the N cores (ring-abi `stripe`), each
#             core keeps its own UDT connection, datagrams steered by socket ID. This is
#             the gateway-to-gateway case; before conns_per_peer it could use one core.
#
# Aggregate goodput from kshim put's last line; per-core messages from the sender
# engine's stats. `put --no-fill` / `sink --no-verify`: the engines are measured, not
# kshim's one-thread pattern generator. Wants at least 2N+2 CPUs to mean anything (each
# engine runs N core threads, each kshim one): on a smaller machine the runs above its
# CPU count measure contention, and say so in their line.
#
#   cargo build --release -p lu2k-kshim -p lu2k-engine
#   perf/cores-scaling.sh --cores 1,2,4 [--mode peers|one-peer|both] [--count 4096]
#   (environment: NS="1 2 4", MODE, COUNT, SIZE, OUT=/tmp/scale, T = seconds per run)
root=$(cd "$(dirname "$0")/.." && pwd)
NS=${NS:-1 2 4}; MODE=${MODE:-both}; COUNT=${COUNT:-4096}; SIZE=${SIZE:-1M}
while [ $# -gt 0 ]; do
  case "$1" in
    --cores) NS=$(tr ',' ' ' <<<"$2"); shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    *) echo "usage: $0 [--cores 1,2,4] [--mode peers|one-peer|both] [--count N] [--size 1M]" >&2; exit 2 ;;
  esac
done
case "$MODE" in peers|one-peer|both) ;; *) echo "--mode: peers, one-peer or both, not '$MODE'" >&2; exit 2 ;; esac
out=${OUT:-/tmp/out}; mkdir -p "$out"
K=${K:-$root/target/release/lu2k-kshim}; E=${E:-$root/target/release/lu2k-engine}
[ -x "$K" ] && [ -x "$E" ] || { echo "build first: cargo build --release -p lu2k-kshim -p lu2k-engine" >&2; exit 2; }
sysctl -qw net.core.rmem_max=67108864 net.core.wmem_max=67108864 2>/dev/null
cpus=$(nproc)
shard() { echo $(( ((($1 * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % $2 )); }

# Per-core counts from an engine's stats (JSON on stdin): messages it completed to
# its peers (sender), or RX descriptors it published (receiver).
per_core() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
if sys.argv[1] == "tx":
    v = [sum(p.get("msgs_tx", 0) for p in c["peers"]) for c in r["cores"]]
else:
    v = [c["rx_descs"] for c in r["cores"]]
print("[" + ", ".join(map(str, v)) + "]")' "$1" 2>/dev/null || echo "[?]"
}

# run MODE N: starts the sinks, then the sender, waits for kshim put, prints a line.
run() {
  local mode=$1 N=$2 dir pids=() tos=() want=0 x=1 cpp=1 sinks=$2
  dir=$(mktemp -d)
  if [ "$mode" = one-peer ]; then cpp=$N; sinks=1; fi
  while [ $want -lt $sinks ]; do
    ip="127.0.1.$x"; a=$(( (127 << 24) | (1 << 8) | x ))
    if [ "$mode" = one-peer ] || [ "$(shard $a $N)" -eq $want ]; then
      local sc=1
      [ "$mode" = one-peer ] && sc=$N
      "$K" --socket $dir/s$want.sock --nid $ip@lu2k --cores $sc --conns-per-peer $sc \
        sink --no-verify --progress 0 > $out/sink-$mode-$N-$want.txt 2>&1 &
      pids+=($!); sleep 0.2
      "$E" run --kshim-socket $dir/s$want.sock --bind $ip --stats-socket $dir/st$want.sock \
        > $out/esink-$mode-$N-$want.txt 2>&1 &
      pids+=($!); tos+=(--to $ip@lu2k); want=$((want + 1))
    fi
    x=$((x + 1))
  done
  "$K" --socket $dir/put.sock --nid 127.0.0.1@lu2k --cores $N --conns-per-peer $cpp \
    put "${tos[@]}" --count $COUNT --size $SIZE --no-fill --progress 0 > $out/put-$mode-$N.txt 2>&1 &
  local kpid=$!; sleep 0.3
  "$E" run --kshim-socket $dir/put.sock --bind 127.0.0.1 --cores $N --stats-socket $dir/stp.sock \
    > $out/eput-$mode-$N.txt 2>&1 &
  local epid=$!
  ( sleep ${T:-100}; kill $kpid 2>/dev/null ) & local wpid=$!
  # The sender's engine loses its session when kshim put exits: keep its last snapshot.
  ( while kill -0 $kpid 2>/dev/null; do
      "$E" stats --json --socket $dir/stp.sock > $dir/stp.json.tmp 2>/dev/null &&
        mv $dir/stp.json.tmp $dir/stp.json
      sleep 0.2
    done ) & local spid=$!
  wait $kpid; kill $wpid 2>/dev/null; wait $spid 2>/dev/null
  local tx_line rx_line=""
  tx_line=$(per_core tx < $dir/stp.json)
  # The sinks stay up: their counters are final once a snapshot (every 100 ms of a
  # core's loop, 200 ms idle) was taken after the traffic.
  sleep 0.5
  for ((i = 0; i < sinks; i++)); do
    rx_line+=" $("$E" stats --json --socket $dir/st$i.sock 2>/dev/null | per_core rx)"
  done
  local note=""
  [ $(( 2 * N + 2 )) -gt $cpus ] && note=" (needs $(( 2 * N + 2 )) CPUs, machine has $cpus: contention)"
  echo "$mode N=$N conns_per_peer=$cpp $(grep 'put: to' $out/put-$mode-$N.txt | sed 's/^.*put: to [^,]*, //') | sender msgs per core $tx_line (last snapshot), receiver RX per core$rx_line$note" | tee -a $out/scale.txt
  kill $epid "${pids[@]}" 2>/dev/null; wait 2>/dev/null
  rm -rf $dir
}

for N in $NS; do
  [ "$MODE" != one-peer ] && run peers $N
  [ "$MODE" != peers ] && run one-peer $N
done
