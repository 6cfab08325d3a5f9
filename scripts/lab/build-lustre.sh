#!/usr/bin/env bash
# Builds the part of Lustre the kernel lab's lnet stage needs, once per input, cached:
# libcfs.ko, lnet.ko, ksocklnd.ko, lnet_selftest.ko and static lnetctl and lst, from the
# pristine Lustre source with lu2k's patches (patches/lustre/*.patch) applied, against
# the kernel headers the lab's modules are built with.
#
#   scripts/lab/build-lustre.sh TARBALL HEADERS_DIR CACHE_DIR
#
# TARBALL      lustre-release-2.17.0.tar.xz (../shared/vendor/ in this project's layout)
# HEADERS_DIR  the kbuild directory of the headers (.../usr/src/linux-headers-RELEASE)
# CACHE_DIR    where the build lives: CACHE_DIR/lustre/<key>/, key = hash of the tarball,
#              the headers' utsrelease and kernel config, the patches and this script;
#              a finished build has CACHE_DIR/lustre/<key>/.stamp and is reused as is.
#
# Prints the build directory (the configured Lustre tree: Module.symvers, the modules,
# lnet/utils/lnetctl, lnet/utils/lst) on its last line of stdout.
#
# Build tools and headers this needs and a CI machine lacks are installed with apt-get
# (root), as scripts/setup.sh installs the project's other build dependencies.
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 TARBALL HEADERS_DIR CACHE_DIR" >&2; exit 2; }
tarball=$1 kb=$2 cache=$3
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
patches=("$repo"/patches/lustre/*.patch)

[ -f "$tarball" ] || { echo "build-lustre: no Lustre source at $tarball (see the vendor README)" >&2; exit 1; }
[ -f "$kb/include/generated/utsrelease.h" ] || { echo "build-lustre: $kb is not a kbuild headers directory" >&2; exit 1; }

key=$( { sha256sum "$tarball" | cut -c1-64
         cat "$kb/include/generated/utsrelease.h" "$kb/.config"
         cat "${patches[@]}" "$0"; } | sha256sum | cut -c1-16)
out="$cache/lustre/$key"
if [ -e "$out/.stamp" ]; then
    echo "    lustre: cached build $out" >&2
    echo "$out/src"
    exit 0
fi

log() { echo "    lustre: $*" >&2; }

# --- build tools -------------------------------------------------------------------------
need=()
for p in autoconf automake libtool flex bison pkg-config libnl-genl-3-dev libyaml-dev \
         libssl-dev libreadline-dev libmount-dev libblkid-dev kmod file; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 \
        || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2; } \
        || { echo "build-lustre: cannot install Lustre's build tools (${need[*]})" >&2; exit 1; }
fi
# --- source, patches, configure, make ----------------------------------------------------
rm -rf "$out"; mkdir -p "$out"
t0=$(date +%s)
tar -xJf "$tarball" -C "$out"
mv "$out"/lustre-release-* "$out/src"
cd "$out/src"
for p in "${patches[@]}"; do
    log "patch $(basename "$p")"
    patch -p1 --quiet --forward < "$p" >&2 || { echo "build-lustre: $p does not apply" >&2; exit 1; }
done
# kbuild: libcfs and lnet (socklnd, selftest) only; the Lustre client is not needed
sed -i 's|^obj-m += lustre/$|# &|' Makefile.in
log "autogen"
sh autogen.sh > "$out/autogen.log" 2>&1 || { tail -n 20 "$out/autogen.log" >&2; exit 1; }
log "configure against $(sed -n 's/^#define UTS_RELEASE "\(.*\)"$/\1/p' "$kb/include/generated/utsrelease.h")"
./configure --with-linux="$kb" --with-linux-obj="$kb" --disable-server --disable-tests \
    --disable-gss --disable-iokit --disable-doc --with-o2ib=no \
    > "$out/configure.log" 2>&1 || { tail -n 30 "$out/configure.log" >&2; exit 1; }
log "make modules, lnetctl, lst"
{
    make -j"$(nproc)" modules
    make -j"$(nproc)" -C libcfs/libcfs libcfs.la
    make -j"$(nproc)" -C lnet/utils/lnetconfig liblnetconfig.la
    # static, so they run in the lab's busybox initramfs; readline needs -ltinfo then
    make -j"$(nproc)" -C lnet/utils lnetctl lst LDFLAGS=-all-static LIBS=-ltinfo
} > "$out/make.log" 2>&1 || { tail -n 30 "$out/make.log" >&2; exit 1; }
for f in libcfs/libcfs/libcfs.ko lnet/lnet/lnet.ko lnet/klnds/socklnd/ksocklnd.ko \
         lnet/selftest/lnet_selftest.ko lnet/utils/lnetctl lnet/utils/lst Module.symvers; do
    [ -s "$f" ] || { echo "build-lustre: $f was not built (log: $out/make.log)" >&2; exit 1; }
done
file lnet/utils/lnetctl | grep -q 'statically linked' \
    || { echo "build-lustre: lnetctl is not static (log: $out/make.log)" >&2; exit 1; }
strip --strip-debug lnet/utils/lnetctl lnet/utils/lst
touch "$out/.stamp"
log "built in $(( $(date +%s) - t0 )) s: $out"
echo "$out/src"
