#!/usr/bin/env bash
# Hub transfer benchmark on loopback: our client (miner-hub, release) vs huggingface_hub 1.10.1
# (no hf_xet) against the same HubStandIn process.
#   upload:   a SIZE_MIB shard (default 1024) with upload_file vs HfApi.upload_folder
#   download: the same shard at its 7-character revision with download_to vs hf_hub_download
# RUNS (default 3) runs each, fresh content per run; prints medians, the ratios (python/ours) and
# our peak RSS. Usage: scripts/bench-hub.sh [RUNS] ; env SIZE_MIB, MINER_PYTHON, CARGO_TARGET_DIR.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-3}"
size_mib="${SIZE_MIB:-1024}"
py="${MINER_PYTHON:-$root/.deps/venv/bin/python}"
[[ -x "$py" ]] || { echo "bench-hub: no Python at $py (run scripts/setup-python.sh)" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p miner-hub --example hub_bench && cargo build --release -q -p miner-standins --bin miner-standins)
bench="$target/release/examples/hub_bench"
standin="$target/release/miner-standins"

work="$(mktemp -d)"
cleanup() { [[ -n "${hub_pid:-}" ]] && kill "$hub_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$standin" hub --data "$work/hub-data" --token tok:bench:write > "$work/hub.out" &
hub_pid=$!
for _ in $(seq 1 100); do [[ -s "$work/hub.out" ]] && break; sleep 0.1; done
endpoint="$(head -1 "$work/hub.out")"
[[ "$endpoint" == http://* ]] || { echo "bench-hub: the stand-in did not start" >&2; exit 1; }
echo "stand-in at $endpoint; shard ${size_mib} MiB; $runs runs"

mkdir -p "$work/ours" "$work/py"
head -c "$((size_mib << 20))" /dev/urandom > "$work/base.bin"
export HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
results="$work/results.txt"
for i in $(seq 1 "$runs"); do
  # Fresh content per run (so LFS never says "already stored").
  for who in ours py; do
    cp --reflink=auto "$work/base.bin" "$work/$who/shard.safetensors"
    printf 'run-%s-%s-%08d' "$who" "$i" "$RANDOM" | dd of="$work/$who/shard.safetensors" conv=notrunc status=none
  done
  sync
  out="$("$bench" --endpoint "$endpoint" --token tok upload "bench/ours-$i" "$work/ours/shard.safetensors" shard.safetensors)"
  oid="$(echo "$out" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.readlines()[-1])["oid"])')"
  echo "ours_up $(echo "$out" | "$py" -c 'import json,sys; d=json.loads(sys.stdin.readlines()[-1]); print(d["secs"], d["peak_rss_mib"])')" >> "$results"
  rm -f "$work/ours/back.bin"
  out="$("$bench" --endpoint "$endpoint" download "bench/ours-$i" "${oid:0:7}" shard.safetensors "$work/ours/back.bin")"
  echo "ours_down $(echo "$out" | "$py" -c 'import json,sys; d=json.loads(sys.stdin.readlines()[-1]); print(d["secs"], d["peak_rss_mib"])')" >> "$results"
  cmp -s "$work/ours/back.bin" "$work/ours/shard.safetensors" || { echo "bench-hub: our download differs" >&2; exit 1; }
  rm -f "$work/ours/back.bin"
  "$py" - "$endpoint" "$i" "$work/py" >> "$results" <<'PY'
import os, sys, time, shutil
from huggingface_hub import HfApi, hf_hub_download
endpoint, i, folder = sys.argv[1], sys.argv[2], sys.argv[3]
api = HfApi(endpoint=endpoint, token="tok")
repo = f"bench/py-{i}"
api.create_repo(repo, exist_ok=True)
t = time.perf_counter()
info = api.upload_folder(repo_id=repo, folder_path=folder, allow_patterns=["shard.safetensors"])
up = time.perf_counter() - t
cache = os.path.join(folder, "cache")
t = time.perf_counter()
path = hf_hub_download(repo_id=repo, filename="shard.safetensors", revision=info.oid[:7], cache_dir=cache, endpoint=endpoint)
down = time.perf_counter() - t
assert os.path.getsize(path) == os.path.getsize(os.path.join(folder, "shard.safetensors"))
shutil.rmtree(cache)
print(f"py_up {up} 0")
print(f"py_down {down} 0")
PY
done
"$py" - "$results" "$size_mib" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
mib = float(sys.argv[2])
def med(k): return statistics.median(float(r[1]) for r in rows if r[0] == k)
def peak(k): return max(float(r[2]) for r in rows if r[0] == k)
for op in ("up", "down"):
    o, p = med(f"ours_{op}"), med(f"py_{op}")
    print(f"{op:>5}: ours {o:.2f} s ({mib / o:.0f} MiB/s, peak RSS {peak(f'ours_{op}'):.1f} MiB) | "
          f"huggingface_hub {p:.2f} s ({mib / p:.0f} MiB/s) | ratio {p / o:.2f}x")
PY
