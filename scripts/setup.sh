#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine.
# Idempotent and quiet when everything is already there.
set -euo pipefail

need_pkgs=()
command -v cc  >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v c++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
command -v ip  >/dev/null 2>&1 || need_pkgs+=(iproute2)   # network namespaces for the TUN tests
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)   # verifies packaging/lu2k-engine.service
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)     # the metrics test's exposition parser
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)           # scripts/check-docs.sh scrapes the metrics as the guide does

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "==> installing ${need_pkgs[*]} (Debian packages the build needs)"
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: need root to install ${need_pkgs[*]}; run: sudo apt-get install -y ${need_pkgs[*]}" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust with rustup (https://rustup.rs) and retry" >&2
    exit 1
fi

# The metrics test parses the engine's /metrics with Python's prometheus_client
# (a real OpenMetrics parser) and reads the alert rules with PyYAML, from a
# virtual environment under target/ (engine/tests/metrics.rs looks there).
pyenv="$(cd "$(dirname "$0")/.." && pwd)/target/pyenv"
if ! "$pyenv/bin/python" -c 'import prometheus_client, yaml' >/dev/null 2>&1; then
    echo "==> python venv $pyenv: prometheus_client, PyYAML (the metrics test's parsers)"
    python3 -m venv "$pyenv"
    "$pyenv/bin/pip" install -q --disable-pip-version-check 'prometheus_client>=0.20,<1' 'PyYAML>=6,<7'
fi
