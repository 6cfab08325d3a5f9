#!/usr/bin/env bash
# The kernel lab: boots Debian's own kernel in qemu and runs lu2k's lab tests
# inside it, for what this machine's kernel lacks (RDS, netem, module loading)
# and for an older kernel (bookworm's 6.1: io_uring without the futex ops).
#
#   scripts/kernel-lab.sh                  # fetch (cached), build, boot, run all tests
#   scripts/kernel-lab.sh --tests rds      # only some tests (comma separated)
#   scripts/kernel-lab.sh --list           # the tests there are
#   scripts/kernel-lab.sh --help
#
# What it does, each step cached under $LU2K_LAB_CACHE
# (default ${XDG_CACHE_HOME:-~/.cache}/lu2k-lab):
#   1. resolves the kernel image package through the metapackage linux-image-amd64
#      (never a hard-coded version) and fetches it, busybox-static and
#      qemu-system-x86 with the dependencies this machine lacks, with
#      `apt-get download`; unpacks them with `dpkg-deb` (qemu is never installed:
#      bookworm's qemu breaks this machine's backported qemu-utils);
#   2. builds the lab binary static for x86_64-unknown-linux-musl (tests/lab/); for
#      the module test also lu2k-engine and lu2k_kshim.ko (kshim/module), the module
#      against Debian's linux-headers of exactly the kernel it boots (fetched and
#      unpacked like the kernel; the build stops on any version mismatch) with
#      gcc-12, the compiler Debian built that kernel with;
#   3. builds an initramfs: busybox, the kernel modules the tests need (rds,
#      rds_tcp, sch_netem, veth, with their dependencies, from the same package as
#      the kernel), iproute2's ip and tc with their libraries (busybox's tc cannot
#      add netem), the lab binary and scripts/lab/init;
#      for the lnet test also Lustre's LNet (scripts/lab/build-lustre.sh: the vendored
#      Lustre source with patches/lustre, cached by its inputs) and lu2klnd.ko;
#   4. boots it with `qemu -accel tcg` (the KVM here hangs on a stock kernel)
#      under a timeout and decides from the marker lines on the serial console
#      (qemu's exit status says nothing):
#         LU2K-LAB PASS name | LU2K-LAB FAIL name: reason | LU2K-LAB SKIP name: reason
#         LU2K-LAB DONE
#      The lnet and lnet-compare tests boot two such VMs at once (a pair per test),
#      joined by a virtual network (virtio-net over qemu's socket netdev), one LNet
#      node each. lnet-compare (socklnd against lu2klnd through netem, ~7 minutes
#      under TCG) is opt-in: --tests lnet-compare.
#
# Exit status: 0 every selected test passed (skips are listed, and fail the run
# with --strict); 1 a test failed or the VM did not finish; 2 usage;
# 77 the lab cannot run on this machine (not root, mirror unreachable, no apt):
# the message says why, callers skip loudly on 77.
set -euo pipefail

ALL_TESTS="rds,netem,probe,engine,module,lnet,lnet-compare"
# lnet-compare takes ~7 minutes of TCG: opt-in
DEFAULT_TESTS="rds,netem,probe,engine,module,lnet"
SKIP_RC=77

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
    cat <<EOF
Options:
  --tests LIST        comma-separated tests to run, of $ALL_TESTS (default: $DEFAULT_TESTS)
  --list              print the tests and exit
  --kernel-meta PKG   metapackage to resolve the kernel through (default: linux-image-amd64)
  --cache DIR         cache folder (default: \$LU2K_LAB_CACHE or \${XDG_CACHE_HOME:-~/.cache}/lu2k-lab)
  --timeout SECS      wall-clock limit for the VM (default: 300, 600 with the module or lnet
                      test, 1500 with lnet-compare)
  --module-mib N      MiB of PUTs each way in the module test (default: 1024)
  --lnet-loops N      1 MiB brw loops (x2 concurrent) of each lst test in the lnet test (default: 16)
  --compare-loops N   1 MiB brw loops of each lst test in lnet-compare (default: 1)
  --compare-concurrency N  RPCs in flight of each lst test in lnet-compare (default: 8)
  --compare-rate R    netem rate of lnet-compare's emulated link, tc syntax (default: 8mbit)
  --lustre-src FILE   Lustre source tarball for the lnet test (default: \$LU2K_LUSTRE_SRC or
                      ../shared/vendor/lustre-release-2.17.0.tar.xz beside the checkout,
                      beside the checkout it was cloned from, or under /work)
  --memory MB         VM memory (default: 2048)
  --cpus N            VM cpus (default: 2)
  --strict            a skipped test fails the run
  --fetch-only        fetch and unpack, then stop
  --static-only       never fall back to a glibc build of the lab binary
  --keep-log FILE     also copy the console log to FILE
EOF
}

tests="$DEFAULT_TESTS"
kernel_meta="linux-image-amd64"
cache="${LU2K_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lu2k-lab}"
vm_timeout=""
module_mib=1024
lnet_loops=16
compare_loops=1
compare_concurrency=8
compare_rate=8mbit
lustre_src="${LU2K_LUSTRE_SRC:-}"
memory=2048
cpus=2
strict=0
fetch_only=0
static_only=0
keep_log=""

while [ $# -gt 0 ]; do
    case "$1" in
        --tests) tests="$2"; shift 2 ;;
        --tests=*) tests="${1#*=}"; shift ;;
        --list) tr ',' '\n' <<<"$ALL_TESTS"; exit 0 ;;
        --kernel-meta) kernel_meta="$2"; shift 2 ;;
        --cache) cache="$2"; shift 2 ;;
        --timeout) vm_timeout="$2"; shift 2 ;;
        --module-mib) module_mib="$2"; shift 2 ;;
        --lnet-loops) lnet_loops="$2"; shift 2 ;;
        --compare-loops) compare_loops="$2"; shift 2 ;;
        --compare-rate) compare_rate="$2"; shift 2 ;;
        --compare-concurrency) compare_concurrency="$2"; shift 2 ;;
        --lustre-src) lustre_src="$2"; shift 2 ;;
        --memory) memory="$2"; shift 2 ;;
        --cpus) cpus="$2"; shift 2 ;;
        --strict) strict=1; shift ;;
        --fetch-only) fetch_only=1; shift ;;
        --static-only) static_only=1; shift ;;
        --keep-log) keep_log="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "kernel-lab: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

for t in ${tests//,/ }; do
    case ",$ALL_TESTS," in
        *",$t,"*) ;;
        *) echo "kernel-lab: unknown test '$t' (tests: $ALL_TESTS)" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$vm_timeout" ]; then
    vm_timeout=300
    [[ ",$tests," == *",module,"* ]] && vm_timeout=600
    [[ ",$tests," == *",lnet,"* ]] && vm_timeout=600
    [[ ",$tests," == *",lnet-compare,"* ]] && vm_timeout=1500
fi
# The Lustre source lives in shared/vendor beside the project's checkout. A clone made
# elsewhere (CI clones main into a scratch directory) finds it beside the checkout it
# was cloned from, or at the workplace's shared directory.
if [ -z "$lustre_src" ]; then
    lustre_tar=shared/vendor/lustre-release-2.17.0.tar.xz
    lustre_src="$(cd "$repo/.." && pwd)/$lustre_tar"
    origin="$(git -C "$repo" remote get-url origin 2>/dev/null || true)"
    for cand in "$origin/../$lustre_tar" "/work/$lustre_tar"; do
        if [ ! -f "$lustre_src" ] && [ -f "$cand" ]; then
            lustre_src="$(cd "$(dirname "$cand")" && pwd)/$(basename "$cand")"
        fi
    done
fi
has_test() { [[ ",$tests," == *",$1,"* ]]; }
# the tests that boot their own pair of VMs
two_vm_tests=$(tr ',' '\n' <<<"$tests" | grep -Ex 'lnet|lnet-compare' | paste -sd, || true)
t_start=$(date +%s.%N)
phase_start=$t_start
since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
phase() { # phase NAME: prints the time spent in the phase and since the start
    printf '==> kernel-lab: %-36s %5s s (%s s since start)\n' "$1" "$(since "$phase_start")" "$(since "$t_start")"
    phase_start=$(date +%s.%N)
}
skip() { echo "kernel-lab: SKIP: $*" >&2; exit $SKIP_RC; }
die() { echo "kernel-lab: error: $*" >&2; exit 1; }

[ "$(uname -m)" = x86_64 ] || skip "the lab boots an amd64 kernel and builds x86_64 binaries; this is $(uname -m)"
[ "$(id -u)" -eq 0 ] || skip "needs root (apt-get download into a root-owned apt cache and qemu's initramfs built with root ownership); run as root"
command -v apt-get >/dev/null && command -v apt-cache >/dev/null && command -v dpkg-deb >/dev/null \
    || skip "needs Debian's apt-get, apt-cache and dpkg-deb to fetch the kernel and qemu"

mkdir -p "$cache"/{debs,qemu,kernel,busybox,initramfs,logs}

# --- 1. resolve and fetch -------------------------------------------------------------

# Each apt-cache call costs ~0.5 s here (no binary cache), so they are batched.
declare -A CANDIDATE=()
# versions PKG...: fills CANDIDATE[pkg] with the version apt would pick
versions() {
    local pkg="" line
    while IFS= read -r line; do
        case "$line" in
            [!\ ]*:) pkg=${line%:} ;;
            "  Candidate: "*) CANDIDATE[$pkg]=${line#  Candidate: } ;;
        esac
    done < <(apt-cache policy "$@" 2>/dev/null)
}
candidate_version() { [ -n "${CANDIDATE[$1]:-}" ] || versions "$1"; echo "${CANDIDATE[$1]:-}"; }

ensure_lists() {
    local v
    v=$(candidate_version "$kernel_meta")
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        echo "==> kernel-lab: apt has no candidate for $kernel_meta; running apt-get update"
        apt-get update -qq || skip "apt-get update failed: Debian's mirror is unreachable from here"
        unset "CANDIDATE[$kernel_meta]"
        v=$(candidate_version "$kernel_meta")
        [ -n "$v" ] && [ "$v" != "(none)" ] || skip "no package $kernel_meta in apt's sources (is this Debian with main enabled?)"
    fi
}

# deb_path PKG: the cached .deb of PKG's candidate version (empty when not fetched)
deb_path() {
    local v f
    v=$(candidate_version "$1")
    for f in "$cache/debs/${1}_${v//:/%3a}_"*.deb; do [ -s "$f" ] && { echo "$f"; return; }; done
}

# download PKG...: fetches each package's candidate .deb into $cache/debs unless there
download() {
    local need=() p v
    versions "$@"
    for p in "$@"; do
        v=$(candidate_version "$p")
        [ -n "$v" ] && [ "$v" != "(none)" ] || die "apt has no candidate version of $p"
        [ -n "$(deb_path "$p")" ] || need+=("$p")
    done
    [ ${#need[@]} -eq 0 ] && return 0
    echo "==> kernel-lab: apt-get download ${need[*]}"
    (cd "$cache/debs" && apt-get download -q "${need[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' ) \
        || true
    for p in "${need[@]}"; do
        [ -n "$(deb_path "$p")" ] \
            || skip "could not fetch $p $(candidate_version "$p") with apt-get download (Debian's mirror unreachable?)"
    done
}

declare -A INSTALLED=()
load_installed() {
    local pkg st
    while read -r pkg st; do [ "$st" = installed ] && INSTALLED[${pkg%%:*}]=1; done \
        < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' 2>/dev/null)
}
installed() { [ -n "${INSTALLED[$1]:-}" ]; }

# resolve_deps ROOT: prints ROOT and every package of its Depends/Pre-Depends closure that
# is not installed here. A group of alternatives (a | b) is satisfied by any installed
# member, else the first is taken; a virtual package stands for its first provider.
resolve_deps() {
    local -A seen=([$1]=1)
    local level=("$1") out=("$1") next group m ok first
    while [ ${#level[@]} -gt 0 ]; do
        next=()
        while read -r group; do
            ok=0
            for m in $group; do installed "$m" && ok=1; done
            [ $ok -eq 1 ] && continue
            first=${group%% *}
            [ -n "$first" ] && [ -z "${seen[$first]:-}" ] || continue
            seen[$first]=1; next+=("$first"); out+=("$first")
        done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                    --no-replaces --no-enhances "${level[@]}" 2>/dev/null | awk '
            function flush() { if (grp != "") print substr(grp, 2); grp = "" }
            /^  \|?(Pre)?Depends: / {
                if (pendingclose) { flush(); pendingclose = 0 }
                alt = ($1 ~ /^\|/); name = $2
                invirt = (name ~ /^</); firstprov = 1
                if (!invirt) grp = grp " " name
                if (!alt) { if (invirt) pendingclose = 1; else flush() }
                next
            }
            /^    / { if (invirt && firstprov) { grp = grp " " $1; firstprov = 0 }; next }
            { if (pendingclose) { flush(); pendingclose = 0 }; invirt = 0 }
            END { flush() }')
        level=("${next[@]}")
    done
    printf '%s\n' "${out[@]}"
}

unpack() { # unpack DEB DIR
    dpkg-deb -x "$1" "$2"
}

versions "$kernel_meta" qemu-system-x86 busybox-static
ensure_lists
kernel_pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null | awk '/^ *Depends: linux-image-/ {print $2; exit}')
[ -n "$kernel_pkg" ] || die "cannot resolve the kernel image package through $kernel_meta (apt-cache depends $kernel_meta)"
kernel_ver=$(candidate_version "$kernel_pkg")
kernel_release=${kernel_pkg#linux-image-}
echo "==> kernel-lab: kernel package $kernel_pkg $kernel_ver (through $kernel_meta)"

# qemu and busybox
qemu_stamp="$cache/qemu/.stamp-$(candidate_version qemu-system-x86)"
if [ ! -e "$qemu_stamp" ]; then
    echo "==> kernel-lab: resolving qemu-system-x86's dependencies not installed here"
    load_installed
    mapfile -t qemu_pkgs < <(resolve_deps qemu-system-x86)
    echo "    ${#qemu_pkgs[@]} packages: ${qemu_pkgs[*]}"
    download "${qemu_pkgs[@]}"
    rm -rf "$cache/qemu/root"; mkdir -p "$cache/qemu/root"
    for p in "${qemu_pkgs[@]}"; do
        unpack "$(deb_path "$p")" "$cache/qemu/root"
    done
    rm -f "$cache"/qemu/.stamp-*; touch "$qemu_stamp"
fi
bb_stamp="$cache/busybox/.stamp-$(candidate_version busybox-static)"
if [ ! -e "$bb_stamp" ]; then
    download busybox-static
    rm -rf "$cache/busybox/root"; mkdir -p "$cache/busybox/root"
    unpack "$(deb_path busybox-static)" "$cache/busybox/root"
    rm -f "$cache"/busybox/.stamp-*; touch "$bb_stamp"
fi
busybox="$cache/busybox/root/bin/busybox"

# the kernel: only the image and the modules the tests need are taken out of the package
kdir="$cache/kernel/$kernel_pkg-$kernel_ver"
# sunrpc for Lustre's lnet.ko, virtio-net and bridge for the lnet test's two-VM network
want_modules="rds rds_tcp sch_netem veth sunrpc virtio_pci virtio_net bridge"
kstamp="$kdir/.stamp-$(sha256sum <<<"$want_modules" | cut -c1-12)"
if [ ! -e "$kstamp" ]; then
    download "$kernel_pkg"
    kdeb=$(deb_path "$kernel_pkg")
    rm -rf "$kdir"; mkdir -p "$kdir/root"
    echo "==> kernel-lab: unpacking $kernel_pkg (image and modules)"
    dpkg-deb -c "$kdeb" | awk '{print $NF}' | grep -E '\.ko(\.xz|\.zst|\.gz)?$' > "$kdir/modules.list"
    # module name -> path; names use _ where file names may use -
    modpath() { grep -E "/$(sed 's/[_-]/[_-]/g' <<<"$1")\.ko(\.xz|\.zst|\.gz)?$" "$kdir/modules.list" | head -1; }
    extract() { dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$kdir/root" "$@"; }
    # closure over modinfo's depends=, read straight from each module's .modinfo
    # section; one pass over the package (a 70 MB xz stream) per level of dependencies
    declare -A have=()
    level=($want_modules)
    order=()
    first=1
    while [ ${#level[@]} -gt 0 ]; do
        paths=()
        for m in "${level[@]}"; do
            p=$(modpath "$m")
            [ -n "$p" ] || die "module $m is not in $kernel_pkg (built in? then drop it from the list)"
            paths+=("$p")
        done
        if [ $first -eq 1 ]; then
            extract --wildcards './boot/vmlinuz-*' "${paths[@]}"; first=0
        else
            extract "${paths[@]}"
        fi
        next=()
        for i in "${!level[@]}"; do
            m=${level[$i]}; f="$kdir/root/${paths[$i]#./}"
            case "$f" in
                *.ko.xz) xz -dc "$f" > "$kdir/$m.ko" ;;
                *.ko.zst) zstd -qdc "$f" > "$kdir/$m.ko" ;;
                *.ko.gz) gzip -dc "$f" > "$kdir/$m.ko" ;;
                *) cp "$f" "$kdir/$m.ko" ;;
            esac
            have[$m]=1
            deps=$(tr '\0' '\n' < "$kdir/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
            order+=("$m:$deps")
            for d in $deps; do
                d=${d//-/_}
                [ -n "${have[$d]:-}" ] || [[ " ${next[*]} " == *" $d "* ]] || next+=("$d")
            done
        done
        level=("${next[@]}")
    done
    # load order: dependencies first
    : > "$kdir/load-order"
    declare -A loaded=()
    while [ ${#loaded[@]} -lt ${#order[@]} ]; do
        progress=0
        for e in "${order[@]}"; do
            m=${e%%:*}; deps=${e#*:}
            [ -n "${loaded[$m]:-}" ] && continue
            ok=1
            for d in $deps; do [ -n "${loaded[${d//-/_}]:-}" ] || ok=0; done
            if [ $ok -eq 1 ]; then echo "$m" >> "$kdir/load-order"; loaded[$m]=1; progress=1; fi
        done
        [ $progress -eq 1 ] || die "module dependency cycle among: ${order[*]}"
    done
    cp "$kdir"/root/boot/vmlinuz-* "$kdir/vmlinuz"
    rm -rf "$kdir/root"
    rm -f "$kdir"/.stamp*
    touch "$kstamp"
fi
echo "    modules (load order): $(tr '\n' ' ' < "$kdir/load-order")"

# the kernel's headers, for the module test: the package of exactly this kernel
# release and version, and what it depends on (its -common half and linux-kbuild)
hdir=""
if has_test module || [ -n "$two_vm_tests" ]; then
    hpkg="linux-headers-$kernel_release"
    hdir="$cache/headers/$hpkg-$kernel_ver"
    if [ ! -e "$hdir/.stamp" ]; then
        mapfile -t hpkgs < <(apt-cache depends "$hpkg" 2>/dev/null \
            | awk '/^ *Depends: linux-(headers|kbuild)-/ {print $2}')
        [ ${#hpkgs[@]} -ge 1 ] || die "cannot resolve $hpkg's dependencies (apt-cache depends $hpkg)"
        hpkgs=("$hpkg" "${hpkgs[@]}")
        download "${hpkgs[@]}"
        for p in "${hpkgs[@]}"; do
            v=$(candidate_version "$p")
            [ "$v" = "$kernel_ver" ] \
                || die "version mismatch: $p is $v but the lab boots $kernel_pkg $kernel_ver; the module must be built against the headers of exactly that kernel (apt-get update, or delete $cache/kernel to refetch both)"
        done
        rm -rf "$hdir"; mkdir -p "$hdir/root"
        for p in "${hpkgs[@]}"; do unpack "$(deb_path "$p")" "$hdir/root"; done
        # Debian's per-flavour Makefile includes the -common half by absolute path
        kb="$hdir/root/usr/src/$hpkg"
        sed -i "s|^include /usr/src/|include $hdir/root/usr/src/|" "$kb/Makefile"
        touch "$hdir/.stamp"
    fi
    kb="$hdir/root/usr/src/$hpkg"
    uts=$(sed -n 's/^#define UTS_RELEASE "\(.*\)"$/\1/p' "$kb/include/generated/utsrelease.h" 2>/dev/null)
    [ "$uts" = "$kernel_release" ] \
        || die "version mismatch: $hpkg's headers are for release '${uts:-?}', the lab boots $kernel_release"
    echo "    headers: $hpkg $kernel_ver (release $uts)"
fi
phase "fetched and unpacked"
[ $fetch_only -eq 1 ] && exit 0

# --- 2. the lab binaries ---------------------------------------------------------------

musl=x86_64-unknown-linux-musl
command -v cargo >/dev/null || die "cargo not found; install Rust with rustup"
if ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
    echo "==> kernel-lab: rustup target add $musl"
    rustup target add "$musl" || skip "cannot add the rust target $musl (rustup offline?)"
fi
lab_target="${LU2K_LAB_TARGET_DIR:-$cache/target}"
lab_manifest="$repo/tests/lab/Cargo.toml"
# The nested cargo must not inherit a parent cargo's target dir, target or flags.
lab_cargo() { # lab_cargo TARGET ARGS...
    local target=$1; shift
    env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        cargo build --quiet --release --target "$target" --manifest-path "$lab_manifest" \
            --target-dir "$lab_target" "$@"
}
# The probe test reads the engine's probe and the netem test cross-checks the link
# emulator: both are optional features. Preferred: one static musl binary with both.
# Where a crate does not build for musl, the binary is built for the host's glibc
# target instead and carried with its shared libraries (the initramfs has glibc for
# iproute2 anyway); with --static-only, or when that fails too, the features that
# do not build are left out and their checks report pending.
echo "==> kernel-lab: building the lab binary (target dir $lab_target)"
all_features="engine,linkem"
lab_dynamic=0
# A musl build that failed is not retried until the sources it builds change.
src_stamp=$(cd "$repo" && find engine perf/linkem backends tests/lab ring-abi kshim \
                -path '*/target' -prune -o \( -name '*.rs' -o -name Cargo.toml \) -type f -print 2>/dev/null \
            | LC_ALL=C sort | xargs cat 2>/dev/null | sha256sum | cut -c1-16)
musl_failed="$cache/logs/musl-failed-$src_stamp"
if [ ! -e "$musl_failed" ] && lab_cargo "$musl" --features "$all_features" 2> "$cache/logs/build-musl.log"; then
    lab_bin="$lab_target/$musl/release/lu2k-lab"; features=$all_features
    echo "    lu2k-lab: static $musl, features $features"
else
    echo "    note: lu2k-lab with features $all_features does not build for $musl:"
    grep -E '^error(\[|:)' -A2 "$cache/logs/build-musl.log" | grep -E '^error|-->' | sort -u | head -n 8 | sed 's/^/      /'
    echo "      (full log: $cache/logs/build-musl.log)"
    rm -f "$cache"/logs/musl-failed-*; touch "$musl_failed"
    gnu=x86_64-unknown-linux-gnu
    if [ $static_only -eq 0 ] && lab_cargo "$gnu" --features "$all_features" 2> "$cache/logs/build-gnu.log"; then
        lab_bin="$lab_target/$gnu/release/lu2k-lab"; features=$all_features; lab_dynamic=1
        echo "    lu2k-lab: dynamic $gnu (with its libraries), features $features"
    else
        features=""
        for f in ${all_features//,/ }; do
            if lab_cargo "$musl" --features "$f" 2> "$cache/logs/build-musl-$f.log"; then
                features="$features,$f"
            else
                echo "    note: feature '$f' does not build for $musl; its check will say pending"
            fi
        done
        features=${features#,}
        lab_cargo "$musl" ${features:+--features "$features"} 2> "$cache/logs/build-lab.log" \
            || { cat "$cache/logs/build-lab.log" >&2; die "building the lab binary (tests/lab) failed"; }
        lab_bin="$lab_target/$musl/release/lu2k-lab"
        echo "    lu2k-lab: static $musl, features: ${features:-none}"
    fi
fi
# The engine's own integration tests (engine/tests: the io_uring and epoll paths, the
# end-to-end transfer between two engines and two kshims), built static for musl (the
# host's glibc target as a fallback) and run inside the VM on the lab's kernel by `lu2k-lab engine`. Tests that
# start the engine binary find it through CARGO_BIN_EXE_lu2k-engine, a path fixed at
# build time, so the binary is put at that very path in the initramfs.
# Engine tests that touch no kernel interface which differs on 6.1 (virtual time,
# crypto, process supervision, the docs and metrics surface): they run on the host in
# `cargo test` and would cost the VM minutes under TCG, so they are not carried.
# multilink_netns measures goodput through tbf-limited veth links in real time, which
# TCG's emulated CPU cannot carry; its kernel surface (veth, UDP, routes) is the e2e's.
HOST_ONLY_ENGINE_TESTS="crash_restart|guide|hostile_sealed|logs|metrics|multilink_netns|security_engines|security_proptest|security_sim|shard_sim"
engine_tests=()
engine_exe=""
if [[ ",$tests," == *",engine,"* ]]; then
    gnu=x86_64-unknown-linux-gnu
    # static musl first (what the VM wants); the host's glibc build as the fallback
    # (carried with its libraries), unless --static-only
    engine_targets="$musl"; [ $static_only -eq 0 ] && engine_targets="$musl $gnu"
    engine_target=""
    for et in $engine_targets; do
        if env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
            cargo test --release --no-run --target "$et" -p lu2k-engine --tests \
                --manifest-path "$repo/Cargo.toml" --target-dir "$cache/target-engine" \
                --message-format=json > "$cache/logs/engine-tests.json" 2> "$cache/logs/engine-tests.log"; then
            engine_target=$et; break
        fi
        echo "    note: the engine's tests do not build for $et (log: $cache/logs/engine-tests-$et.json):"
        cp "$cache/logs/engine-tests.json" "$cache/logs/engine-tests-$et.json"
        sed -n 's/.*"rendered":"\(error[^\\]*\).*/      \1/p' "$cache/logs/engine-tests.json" | sort -u | head -n 5
    done
    if [ -n "$engine_target" ]; then
        mapfile -t engine_tests < <(grep '"reason":"compiler-artifact"' "$cache/logs/engine-tests.json" \
            | grep -E '"profile":\{[^}]*"test":true' \
            | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' \
            | grep -Ev "/($HOST_ONLY_ENGINE_TESTS)-[0-9a-f]+\$")
        engine_exe=$(grep '"reason":"compiler-artifact"' "$cache/logs/engine-tests.json" \
            | grep '"kind":\["bin"\]' | grep '"name":"lu2k-engine"' | grep -E '"profile":\{[^}]*"test":false' \
            | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n 1)
        echo "    engine tests for the VM ($engine_target): ${#engine_tests[@]} binaries ($(for t in "${engine_tests[@]}"; do basename "$t"; done | tr '\n' ' '))"
    else
        echo "    note: the engine's tests did not build; the engine test will say pending"
    fi
fi
# The module test: lu2k_kshim.ko against the headers fetched above, and the engine
# binary it attaches to the module (static musl, the glibc build as a fallback).
module_ko=""
lustre=""
lnet_skip=""
module_engine=""
if [ -n "$hdir" ]; then
    kcc=$(sed -n 's/^CC = .*)\(gcc-[0-9]*\)$/\1/p' "$kb/.kernelvariables" 2>/dev/null)
    kcc=${kcc:-gcc-12}
    command -v "$kcc" >/dev/null \
        || skip "the module is built with $kcc, the compiler Debian built $kernel_pkg with; apt-get install $kcc"
    # the lnet tests: Lustre's LNet first (cached by its inputs), lu2klnd.ko against it
    lustre=""
    if [ -n "$two_vm_tests" ]; then
        if [ -f "$lustre_src" ]; then
            echo "==> kernel-lab: Lustre for the lnet test ($lustre_src)"
            lustre=$("$repo/scripts/lab/build-lustre.sh" "$lustre_src" "$kb" "$cache" | tail -n 1) \
                || die "building Lustre for the lnet test failed (logs under $cache/lustre/)"
        else
            lnet_skip="no Lustre source at $lustre_src (--lustre-src, LU2K_LUSTRE_SRC)"
            echo "    note: $lnet_skip; $two_vm_tests will skip"
        fi
    fi
    mb="$cache/module-build"
    rm -rf "$mb"; cp -r "$repo/kshim/module" "$mb"
    echo "==> kernel-lab: building lu2k_kshim.ko${lustre:+ and lu2klnd.ko} against $kernel_release's headers ($kcc)"
    make -s -C "$kb" M="$mb" LU2K_ABI_INCLUDE="$repo/ring-abi/include" \
        ${lustre:+LUSTRE="$lustre" KBUILD_EXTRA_SYMBOLS="$lustre/Module.symvers"} modules \
        > "$cache/logs/module-build.log" 2>&1 \
        || { tail -n 30 "$cache/logs/module-build.log" >&2; die "building kshim/module failed (log: $cache/logs/module-build.log)"; }
    if grep -E ' (warning|error):' "$cache/logs/module-build.log" >&2; then
        die "kshim/module builds with warnings against $kernel_release (log: $cache/logs/module-build.log)"
    fi
    module_ko="$mb/lu2k_kshim.ko"
    vm_mod=$(tr '\0' '\n' < "$module_ko" | sed -n 's/^vermagic=//p' | head -1)
    ref_mod=$(tr '\0' '\n' < "$kdir/veth.ko" | sed -n 's/^vermagic=//p' | head -1)
    [ -n "$vm_mod" ] && [ "$vm_mod" = "$ref_mod" ] \
        || die "version mismatch: lu2k_kshim.ko's vermagic '$vm_mod' differs from the kernel's own modules' '$ref_mod'"
    echo "    lu2k_kshim.ko: vermagic $vm_mod"
    if [ -n "$lustre" ]; then
        for ko in "$mb/lu2klnd.ko" "$lustre"/libcfs/libcfs/libcfs.ko "$lustre"/lnet/lnet/lnet.ko; do
            v=$(tr '\0' '\n' < "$ko" | sed -n 's/^vermagic=//p' | head -1)
            [ "$v" = "$ref_mod" ] || die "version mismatch: $(basename "$ko")'s vermagic '$v' differs from the kernel's '$ref_mod'"
        done
        echo "    lu2klnd.ko and Lustre's LNet: vermagic $ref_mod"
    fi
    # the engine stage's build carries the same binary: no second build then
    [ -n "$engine_exe" ] && [ -x "$engine_exe" ] && module_engine=$engine_exe
    for et in "$musl" x86_64-unknown-linux-gnu; do
        [ -n "$module_engine" ] && break
        if env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
            cargo build --quiet --release --target "$et" -p lu2k-engine --bin lu2k-engine \
                --manifest-path "$repo/Cargo.toml" --target-dir "$cache/target-engine" \
                2> "$cache/logs/module-engine-$et.log"; then
            module_engine="$cache/target-engine/$et/release/lu2k-engine"
            break
        fi
        [ $static_only -eq 1 ] && break
    done
    [ -n "$module_engine" ] && echo "    lu2k-engine for the module test: $module_engine"
    [ -n "$module_engine" ] || echo "    note: lu2k-engine did not build (logs: $cache/logs/module-engine-*.log); the module test will say so"
fi
phase "built lab binaries"

# --- 3. the initramfs ------------------------------------------------------------------

ird="$cache/initramfs/root"
rm -rf "$ird"; mkdir -p "$ird"/{bin,sbin,etc/lab,proc,sys,dev,tmp,run,lib/lab-modules,usr/sbin}
cp "$busybox" "$ird/bin/busybox"
cp "$repo/scripts/lab/init" "$ird/init"; chmod 755 "$ird/init"
while read -r m; do cp "$kdir/$m.ko" "$ird/lib/lab-modules/"; done < "$kdir/load-order"
cp "$kdir/load-order" "$ird/etc/lab/modules"
# iproute2's ip and tc with the libraries they link
copy_with_libs() {
    local bin=$1 dest=$2 lib
    cp "$bin" "$ird/$dest"
    for lib in $(ldd "$bin" | awk '/=>/ {print $3} /^\t\/[^ ]+ \(/ {print $1}'); do
        [ -e "$ird$lib" ] && continue
        mkdir -p "$ird$(dirname "$lib")"
        cp -L "$lib" "$ird$lib"
    done
}
for tool in ip tc; do
    path=$(command -v "$tool" || true)
    [ -n "$path" ] || die "iproute2's $tool is needed in the VM (busybox's cannot add netem); apt-get install iproute2"
    copy_with_libs "$path" "usr/sbin/$tool"
done
if [ $lab_dynamic -eq 1 ]; then copy_with_libs "$lab_bin" bin/lu2k-lab; else cp "$lab_bin" "$ird/bin/lu2k-lab"; fi
if [ ${#engine_tests[@]} -gt 0 ]; then
    mkdir -p "$ird/lab/engine-tests"
    for t in "${engine_tests[@]}"; do
        copy_with_libs "$t" "lab/engine-tests/$(basename "$t")"
    done
    if [ -n "$engine_exe" ]; then
        mkdir -p "$ird$(dirname "$engine_exe")"
        copy_with_libs "$engine_exe" "${engine_exe#/}"
    fi
    # debug info is not needed in the VM and costs initramfs memory
    find "$ird/lab" "$ird$(dirname "${engine_exe:-/nonexistent}")" -type f 2>/dev/null \
        | while read -r f; do strip --strip-debug "$f" 2>/dev/null || true; done
fi
if [ -n "$module_ko" ]; then
    mkdir -p "$ird/lib/lab-extra"
    cp "$module_ko" "$ird/lib/lab-extra/"
    if [ -n "$lustre" ]; then
        cp "$mb/lu2klnd.ko" "$lustre"/libcfs/libcfs/libcfs.ko "$lustre"/lnet/lnet/lnet.ko \
            "$lustre"/lnet/klnds/socklnd/ksocklnd.ko "$lustre"/lnet/selftest/lnet_selftest.ko \
            "$ird/lib/lab-extra/"
        strip --strip-debug "$ird"/lib/lab-extra/*.ko
        cp "$lustre"/lnet/utils/lnetctl "$lustre"/lnet/utils/lst "$ird/bin/"
    fi
    if [ -n "$module_engine" ] && [ "$module_engine" = "$engine_exe" ]; then
        ln -s "$engine_exe" "$ird/bin/lu2k-engine"   # carried for the engine stage already
    elif [ -n "$module_engine" ]; then
        copy_with_libs "$module_engine" bin/lu2k-engine
        strip --strip-debug "$ird/bin/lu2k-engine" 2>/dev/null || true
    fi
fi
# the ld.so cache is absent: tell the loader where the libraries are
for d in $(cd "$ird" && find lib* usr/lib* -name '*.so*' -printf '/%h\n' 2>/dev/null | sort -u); do echo "$d"; done > "$ird/etc/lab/ld-library-path"
[ -d /usr/lib/x86_64-linux-gnu/tc ] && mkdir -p "$ird/usr/lib/x86_64-linux-gnu" && cp -r /usr/lib/x86_64-linux-gnu/tc "$ird/usr/lib/x86_64-linux-gnu/"
echo "$kernel_pkg $kernel_ver" > "$ird/etc/lab/kernel-package"
initrd="$cache/initramfs/initrd.cpio.gz"
(cd "$ird" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 > "$initrd")
phase "built initramfs ($(du -h "$initrd" | cut -f1))"

# --- 4. boot ---------------------------------------------------------------------------

qroot="$cache/qemu/root"
qemu="$qroot/usr/bin/qemu-system-x86_64"
[ -x "$qemu" ] || die "qemu-system-x86_64 missing under $qroot (delete $cache/qemu to refetch)"
qlibs="$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu"
[ -d "$qroot/usr/lib/x86_64-linux-gnu/pulseaudio" ] && qlibs="$qlibs:$qroot/usr/lib/x86_64-linux-gnu/pulseaudio"
stamp=$(date +%Y%m%d-%H%M%S)
# boot_vm LOG TESTS [CMDLINE-EXTRA [QEMU-ARGS...]]: one VM under the time limit, console to LOG
boot_vm() {
    local log=$1 vtests=$2 extra=${3:-}
    shift 3 || shift $#
    LD_LIBRARY_PATH="$qlibs" timeout --kill-after=10 "$vm_timeout" "$qemu" \
        -L "$qroot/usr/share/qemu" -L "$qroot/usr/share/seabios" \
        -accel tcg -machine q35 -cpu max -smp "$cpus" -m "$memory" \
        -nographic -no-reboot -nodefaults -serial stdio -monitor none \
        -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 lu2k.tests=$vtests lu2k.module_mib=$module_mib $extra" \
        "$@" < /dev/null > "$log" 2>&1
}
# drop carriage returns and the firmware's terminal escapes
clean_log() { tr -d '\r' < "$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' > "$1.clean"; }
vm_tests=$(tr ',' '\n' <<<"$tests" | grep -Evx 'lnet|lnet-compare' | paste -sd, || true)
logs=()
if [ -n "$vm_tests" ]; then
    log="$cache/logs/console-$stamp.log"
    echo "==> kernel-lab: booting $kernel_pkg under qemu (tcg), tests: $vm_tests (console: $log)"
    set +e
    boot_vm "$log" "$vm_tests" ""
    qrc=$?
    set -e
    phase "VM finished (qemu rc $qrc)"
    [ -n "$keep_log" ] && cp "$log" "$keep_log"
    clean_log "$log"
    grep -v '^LU2K-LAB' "$log.clean" | sed 's/^/    | /' | tail -n 200
    logs+=("$log.clean")
fi
# The lnet tests: two VMs per test, one LNet node each, joined by virtio-net over qemu's
# socket netdev (a listens on a loopback port of this machine, b connects to it).
declare -A pair_logs=()
if [ -n "$two_vm_tests" ] && [ -z "$lnet_skip" ] && [ -z "$lustre" ]; then
    lnet_skip="lu2klnd.ko was not built"
fi
if [ -n "$two_vm_tests" ] && [ -z "$lnet_skip" ]; then
    for t in ${two_vm_tests//,/ }; do
        port=$((20000 + ($$ + ${#pair_logs[@]}) % 20000))
        la="$cache/logs/console-$stamp-$t-a.log" lb="$cache/logs/console-$stamp-$t-b.log"
        pair_logs[$t]="$la.clean $lb.clean"
        params="lu2k.lnet_loops=$lnet_loops lu2k.compare_loops=$compare_loops lu2k.compare_concurrency=$compare_concurrency lu2k.compare_rate=$compare_rate loglevel=6"
        echo "==> kernel-lab: booting two VMs for the $t test (consoles: $la $lb)"
        set +e
        boot_vm "$la" "$t" "lu2k.lnet=a,10.77.0.1,10.77.0.2 $params" \
            -netdev "socket,id=n0,listen=127.0.0.1:$port" \
            -device virtio-net-pci,netdev=n0,mac=52:54:00:4c:32:01,romfile= &
        pa=$!
        sleep 2   # a's listening socket first
        boot_vm "$lb" "$t" "lu2k.lnet=b,10.77.0.2,10.77.0.1 $params" \
            -netdev "socket,id=n0,connect=127.0.0.1:$port" \
            -device virtio-net-pci,netdev=n0,mac=52:54:00:4c:32:02,romfile= &
        pb=$!
        wait $pa; qa=$?
        wait $pb; qb=$?
        set -e
        phase "$t VMs finished (qemu rc $qa, $qb)"
        for l in "$la" "$lb"; do
            clean_log "$l"
            echo "    --- $(basename "$l")"
            grep -v '^LU2K-LAB' "$l.clean" | sed 's/^/    | /' | tail -n 120
        done
    done
fi
lnet_logs=()
for t in "${!pair_logs[@]}"; do lnet_logs+=(${pair_logs[$t]}); done

# --- 5. the verdict from the markers -----------------------------------------------------

echo "==> kernel-lab: markers"
for l in "${logs[@]}" "${lnet_logs[@]}"; do
    vm=$(basename "${l%.log.clean}" | sed 's/^console-[0-9]*-[0-9]*-\{0,1\}//')
    grep '^LU2K-LAB' "$l" | sed "s/^/    ${vm:-vm}: /" || true
done
booted=$(sed -n 's/.*LU2K-LAB KERNEL //p' "${logs[@]}" "${lnet_logs[@]}" 2>/dev/null | head -1)
fails=0; skips=0
# verdict TEST LOG...: the test passed in every VM it ran in
verdict() {
    local t=$1 l pass=0 skip=0 fail=0; shift
    for l in "$@"; do
        if grep -q "^LU2K-LAB PASS $t\$" "$l"; then pass=$((pass+1))
        elif grep -q "^LU2K-LAB SKIP $t:" "$l"; then skip=$((skip+1))
        elif grep -q "^LU2K-LAB FAIL $t:" "$l"; then fail=$((fail+1))
        else echo "    no marker for test $t in $(basename "$l" .clean)"; fail=$((fail+1)); fi
        grep -q '^LU2K-LAB DONE$' "$l" || { echo "    no DONE marker in $(basename "$l" .clean): the VM did not finish (timeout ${vm_timeout}s)"; fail=$((fail+1)); }
    done
    if [ $fail -gt 0 ]; then fails=$((fails+1)); elif [ $skip -gt 0 ]; then skips=$((skips+1)); fi
}
for t in ${tests//,/ }; do
    if [[ ",$two_vm_tests," == *",$t,"* ]] && [ -n "$lnet_skip" ]; then
        echo "    SKIP $t: $lnet_skip"; skips=$((skips+1))
    elif [[ ",$two_vm_tests," == *",$t,"* ]]; then
        # shellcheck disable=SC2086 # two log paths, no spaces in them
        verdict "$t" ${pair_logs[$t]}
    else
        verdict "$t" "${logs[@]}"
    fi
done
printf '==> kernel-lab: kernel %s (%s %s), %d failed, %d skipped, total %s s\n' \
    "${booted:-?}" "$kernel_pkg" "$kernel_ver" "$fails" "$skips" "$(since "$t_start")"
if [ $fails -gt 0 ]; then exit 1; fi
if [ $skips -gt 0 ] && [ $strict -eq 1 ]; then echo "kernel-lab: --strict and $skips skipped"; exit 1; fi
exit 0
