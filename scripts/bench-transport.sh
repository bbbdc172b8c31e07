#!/usr/bin/env bash
# Benchmark of chainsync-svc's validator HTTP transport on loopback (submit vs `curl -F`,
# download+verify vs `curl -o` / stream-only), medians of alternating runs.
#
#   scripts/bench-transport.sh [--size-mib 1024] [--runs 5] [--download-only]
#
# Environment:
#   BENCH_DIR        where the benchmark makes its temporary working directory (needs ~4x the
#                    size free; default /dev/shm when it has 5 GiB free, else ${TMPDIR:-/tmp});
#                    the working directory is removed at the end
#   BENCH_MAX_LOAD   wait until the 1-minute load average is below this (default 2.5)
#   BENCH_WAIT_S     give up waiting for a quiet machine after this many seconds (default 1800)
#   CARGO_TARGET_DIR where the release example is built (cargo's default otherwise)
#   RUST_LOG         e.g. chainsync_svc=debug: per download, whether it was verified while
#                    streaming and how many bytes were left to hash after the last one arrived
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command -v curl >/dev/null || { echo "bench-transport: curl is not installed" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench-transport: /usr/bin/time is not installed (apt-get install time)" >&2; exit 1; }

echo "building the release example (cargo build --release -p chainsync-svc --example bench_transport) ..."
cargo build --release -p chainsync-svc --example bench_transport
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release/examples/bench_transport"
[ -x "$bin" ] || { echo "bench-transport: $bin was not built" >&2; exit 1; }

if [ -z "${BENCH_DIR:-}" ]; then
    shm_free_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
    if [ -n "$shm_free_kib" ] && [ "$shm_free_kib" -gt $((5 * 1024 * 1024)) ]; then
        BENCH_DIR=/dev/shm
    else
        BENCH_DIR="${TMPDIR:-/tmp}"
    fi
fi
data="$(mktemp -d "$BENCH_DIR/bench-transport.XXXXXX")"
trap 'rm -rf "$data"' EXIT

max_load="${BENCH_MAX_LOAD:-2.5}"
wait_s="${BENCH_WAIT_S:-1800}"
waited=0
while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$max_load" 'BEGIN { exit !(l < m) }'; then
        break
    fi
    if [ "$waited" -ge "$wait_s" ]; then
        echo "bench-transport: load average $load still >= $max_load after ${wait_s}s; giving up" >&2
        exit 1
    fi
    echo "waiting for load average < $max_load (now $load) ..."
    sleep 15
    waited=$((waited + 15))
done

echo "data dir $data (filesystem $(df -P "$data" | awk 'NR==2 {print $1}')), $(getconf _NPROCESSORS_ONLN) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" --dir "$data" "$@"
