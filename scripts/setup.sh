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
