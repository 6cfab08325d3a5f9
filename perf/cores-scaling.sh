#!/bin/bash
# --cores scaling: one sender (lu2k-kshim put + lu2k-engine --cores N) to N sink nodes
# (kshim sink + engine each), sink addresses chosen so the ABI's shard function puts one
# peer on each of the sender's cores. Aggregate goodput from kshim put's last line.
# `put --no-fill` / `sink --no-verify`: the engines are measured, not kshim's one-thread
# pattern generator. Wants at least 2N+2 CPUs to mean anything.
#
#   cargo build --release -p lu2k-kshim -p lu2k-engine
#   NS="1 2 4" COUNT=16384 OUT=/tmp/scale perf/cores-scaling.sh
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/out}; mkdir -p "$out"
K=${K:-$root/target/release/lu2k-kshim}; E=${E:-$root/target/release/lu2k-engine}
[ -x "$K" ] && [ -x "$E" ] || { echo "build first: cargo build --release -p lu2k-kshim -p lu2k-engine" >&2; exit 2; }
sysctl -qw net.core.rmem_max=67108864 net.core.wmem_max=67108864 2>/dev/null
COUNT=${COUNT:-4096}
shard() { echo $(( ((($1 * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % $2 )); }
for N in ${NS:-1 2 4}; do
  dir=$(mktemp -d); pids=(); tos=(); want=0; x=1
  while [ $want -lt $N ]; do
    ip="127.0.1.$x"; a=$(( (127 << 24) | (1 << 8) | x ))
    if [ "$(shard $a $N)" -eq $want ]; then
      $K --socket $dir/s$want.sock --nid $ip@lu2k sink --no-verify --progress 0 > $out/sink-$N-$want.txt 2>&1 &
      pids+=($!); sleep 0.2
      $E run --kshim-socket $dir/s$want.sock --bind $ip --stats-socket $dir/st$want.sock > $out/esink-$N-$want.txt 2>&1 &
      pids+=($!); tos+=(--to $ip@lu2k); want=$((want + 1))
    fi
    x=$((x + 1))
  done
  $K --socket $dir/put.sock --nid 127.0.0.1@lu2k --cores $N put "${tos[@]}" --count $COUNT --no-fill --progress 0 > $out/put-$N.txt 2>&1 &
  kpid=$!; sleep 0.3
  $E run --kshim-socket $dir/put.sock --bind 127.0.0.1 --cores $N --stats-socket $dir/stp.sock > $out/eput-$N.txt 2>&1 &
  epid=$!
  ( sleep ${T:-100}; kill $kpid 2>/dev/null ) & wpid=$!
  wait $kpid; kill $wpid 2>/dev/null
  echo "N=$N $(grep 'put: to' $out/put-$N.txt) | $(grep -h 'send worker' $out/eput-$N.txt | head -1 | sed 's/.*send worker/send worker/')" | tee -a $out/scale.txt
  kill $epid "${pids[@]}" 2>/dev/null; wait 2>/dev/null
  rm -rf $dir
done
