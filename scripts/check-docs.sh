#!/usr/bin/env bash
# Runs the commands of the operator guide (docs/gateway.md), so the guide cannot
# rot: every ```sh block, in order, on two gateways built from this checkout.
#
#   scripts/check-docs.sh            # needs root (namespaces); else SKIP
#
# The two gateways are two mount and network namespaces (their own /etc,
# /usr/local and /run, as overlays that vanish afterwards; their own loopback)
# joined by a veth pair, the "satellite link": gateway A is 10.0.0.1, gateway B
# 10.0.0.2. All of it lives in a PID namespace that ends with the script.
# Nothing on the host changes.
#
# A block's fence says where it runs:
#   ```sh gateway-a | gateway-b | both     run there (both: A, then B)
#   ```sh gateway-a systemd                systemctl/journalctl lines: this machine
#                                          has no systemd as PID 1, so they are not
#                                          run (said loudly); `systemctl enable
#                                          --now|start|restart|stop lu2k-engine` is
#                                          done the way the unit does it: its
#                                          ExecStart=, as root, with its
#                                          RuntimeDirectory
#   ```sh lustre                           lnetctl lines: no Lustre here; not run,
#                                          said loudly
# Any other ```sh block is an error, as is a systemd/lustre block with another
# command in it.
set -euo pipefail
cd "$(dirname "$0")/.."
doc=docs/gateway.md

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP check-docs: needs root for the network and mount namespaces the guide's gateways run in"
    exit 0
fi
for t in unshare nsenter ip curl python3; do
    command -v "$t" >/dev/null || { echo "check-docs: $t not found (scripts/setup.sh installs what is needed)" >&2; exit 1; }
done

if [ -z "${LU2K_DOCS_WORK:-}" ]; then
    work=$(mktemp -d /tmp/lu2k-check-docs.XXXXXX)
    rc=0
    env LU2K_DOCS_WORK="$work" unshare --net --pid --mount --fork --mount-proc "$0" "$@" || rc=$?
    rmdir "$work"
    exit $rc
fi

work=$LU2K_DOCS_WORK
mount -t tmpfs lu2k-docs "$work"

declare -A site_pid
declare -A site_ip=([gateway-a]=10.0.0.1 [gateway-b]=10.0.0.2)
ip link add lu2k-sat-a type veth peer name lu2k-sat-b
for s in gateway-a gateway-b; do
    unshare --mount --net sleep infinity </dev/null &
    site_pid[$s]=$!
    sleep 0.2
    ip link set "lu2k-sat-${s#gateway-}" netns "${site_pid[$s]}"
    nsenter -t "${site_pid[$s]}" -m -n bash -euo pipefail -c "
        ip link set lo up
        ip addr add ${site_ip[$s]}/24 dev lu2k-sat-${s#gateway-}
        ip link set lu2k-sat-${s#gateway-} up
        for d in /etc /usr/local /run; do
            n=\$(echo \$d | tr / _)
            mkdir -p $work/$s/\$n/u $work/$s/\$n/w
            mount -t overlay overlay -o lowerdir=\$d,upperdir=$work/$s/\$n/u,workdir=$work/$s/\$n/w \$d
        done"
done

in_site() { # site, command...
    local s=$1
    shift
    nsenter -t "${site_pid[$s]}" -m -n --wd="$PWD" "$@" </dev/null
}

# The engine as systemd runs it: the unit's ExecStart= with its RuntimeDirectory.
declare -A engine_pid
engine_start() {
    local s=$1 exec
    exec=$(in_site "$s" sed -n 's/^ExecStart=//p' /etc/systemd/system/lu2k-engine.service)
    [ -n "$exec" ] || { echo "check-docs: $s has no installed unit with ExecStart=" >&2; exit 1; }
    in_site "$s" mkdir -p /run/lu2k
    echo "    [$s] starting as the unit does: $exec"
    # nsenter execs the engine: $! is the engine. ExecStart= is split on spaces,
    # as systemd does.
    # shellcheck disable=SC2086
    nsenter -t "${site_pid[$s]}" -m -n --wd=/ $exec </dev/null >>"$work/$s-engine.log" 2>&1 &
    engine_pid[$s]=$!
    for _ in $(seq 200); do
        if in_site "$s" /usr/local/bin/lu2k-engine stats >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "${engine_pid[$s]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "check-docs: the engine of $s did not come up; its log:" >&2
    cat "$work/$s-engine.log" >&2
    exit 1
}
engine_stop() {
    local s=$1 p=${engine_pid[$1]:-}
    [ -n "$p" ] || return 0
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" || { echo "check-docs: the engine of $s exited $? on SIGTERM" >&2; exit 1; }
    engine_pid[$s]=""
}

systemd_line() { # site, line
    local s=$1 l=$2
    case "$l" in
        "systemctl enable --now lu2k-engine" | "systemctl start lu2k-engine")
            engine_start "$s"; as_unit=$((as_unit + 1)) ;;
        "systemctl restart lu2k-engine")
            engine_stop "$s"; engine_start "$s"; as_unit=$((as_unit + 1)) ;;
        "systemctl stop lu2k-engine")
            engine_stop "$s"; as_unit=$((as_unit + 1)) ;;
        "systemctl daemon-reload" | "systemctl status lu2k-engine" | "journalctl -u lu2k-engine"*)
            echo "    [$s] NOT RUN (needs systemd as PID 1): $l"; notrun=$((notrun + 1)) ;;
        *)
            echo "check-docs: $doc: a systemd block may hold only systemctl/journalctl lines for lu2k-engine: $l" >&2
            exit 1 ;;
    esac
}

# The blocks, as: INDEX<TAB>INFO<TAB>FILE (the block's text in FILE).
blocks=$(python3 - "$doc" "$work" <<'EOF'
import re, sys
doc, work = sys.argv[1], sys.argv[2]
text = open(doc).read()
for i, m in enumerate(re.finditer(r"^```sh([^\n]*)\n(.*?)^```\s*$", text, re.S | re.M)):
    path = f"{work}/block{i}.sh"
    open(path, "w").write(m.group(2))
    print(f"{i}\t{m.group(1).strip()}\t{path}")
EOF
)
[ -n "$blocks" ] || { echo "check-docs: no \`\`\`sh blocks in $doc" >&2; exit 1; }

ran=0
notrun=0
as_unit=0
while IFS=$'\t' read -r i info file; do
    read -r -a words <<<"$info"
    where=${words[0]:-}
    kind=${words[1]:-}
    echo "==> $doc block $i ($info)"
    case "$where $kind" in
        "lustre ")
            while IFS= read -r l; do
                [[ -z "$l" || "$l" == \#* ]] && continue
                [[ "$l" == lnetctl\ * ]] || { echo "check-docs: a lustre block may hold only lnetctl lines: $l" >&2; exit 1; }
                echo "    NOT RUN (no Lustre on this machine): $l"
                notrun=$((notrun + 1))
            done <"$file"
            ;;
        "gateway-a systemd" | "gateway-b systemd")
            while IFS= read -r l; do
                [[ -z "$l" || "$l" == \#* ]] && continue
                systemd_line "$where" "$l"
            done <"$file"
            ;;
        "gateway-a " | "gateway-b " | "both ")
            sites=("$where")
            [ "$where" = both ] && sites=(gateway-a gateway-b)
            for s in "${sites[@]}"; do
                echo "    [$s]"
                if ! in_site "$s" bash -euo pipefail "$file"; then
                    echo "check-docs: $doc block $i failed on $s:" >&2
                    cat "$file" >&2
                    for e in gateway-a gateway-b; do
                        [ -e "$work/$e-engine.log" ] && { echo "--- $e engine log" >&2; cat "$work/$e-engine.log" >&2; }
                    done
                    exit 1
                fi
                ran=$((ran + 1))
            done
            ;;
        *)
            echo "check-docs: $doc block $i: unknown fence \`\`\`sh $info (see scripts/check-docs.sh)" >&2
            exit 1 ;;
    esac
done <<<"$blocks"

for s in gateway-a gateway-b; do engine_stop "$s"; done
echo "==> $doc: $ran block runs passed, $as_unit systemctl start/stop lines done as the unit does; $notrun lines not run here (systemd as PID 1, Lustre), named above"
