#!/usr/bin/env bash
# Installs Debian's srt-tools (srt-file-transmit, srt-live-transmit), the SRT
# contender of the lu2k-perf harness (it runs srt-file-transmit). Needs root
# and a reachable Debian mirror; says why and exits 0 when it cannot, so
# callers (CI) can go on and the harness reports SRT as skipped.
set -u
if command -v srt-file-transmit >/dev/null 2>&1; then
    echo "install-srt: srt-tools already installed ($(command -v srt-file-transmit))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-srt: not root; cannot install srt-tools (run: sudo apt-get install srt-tools). SRT rows will be skipped." >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-srt: no apt-get on this system; install SRT's srt-file-transmit by hand. SRT rows will be skipped." >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends srt-tools >/tmp/install-srt.log 2>&1; then
    apt-get update >>/tmp/install-srt.log 2>&1 || true
    if ! apt-get install -y --no-install-recommends srt-tools >>/tmp/install-srt.log 2>&1; then
        echo "install-srt: apt-get install srt-tools failed (see /tmp/install-srt.log). SRT rows will be skipped." >&2
        tail -5 /tmp/install-srt.log >&2
        exit 0
    fi
fi
echo "install-srt: installed srt-tools: $(command -v srt-file-transmit)"
