#!/usr/bin/env bash
# Benchmark: write + hash a 1 GiB fp16 state dict shaped like the real expert shard, ours (Rust,
# release build of libs/miner-contract/examples/bench_checkpoint_write.rs) against the reference's
# way in Python (torch.save + os.fsync, then get_model_hash). Runs alternate, RUNS each (default 5);
# prints every run and the medians, the speed ratio, and peak memory above the tensors.
#
# Usage: scripts/bench-checkpoint-write.sh [bytes]   (env: RUNS, BENCH_DIR, MINER_PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES="${1:-$((1 << 30))}"
RUNS="${RUNS:-5}"
PY="${MINER_PYTHON:-$PWD/.deps/venv/bin/python}"
[ -x "$PY" ] || { echo "no Python at $PY: run scripts/setup-python.sh or set MINER_PYTHON" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/contract}"
cargo build --release -q -p miner-contract --example bench_checkpoint_write
BIN="$CARGO_TARGET_DIR/release/examples/bench_checkpoint_write"
WORK="$(mktemp -d -p "${BENCH_DIR:-/tmp}" bench-ckpt.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results.jsonl"
for i in $(seq 1 "$RUNS"); do
  "$BIN" "$WORK" "$BYTES" | tee -a "$RESULTS"
  OMP_NUM_THREADS=1 "$PY" libs/miner-contract/tests/py/bench_reference_write.py "$WORK" "$BYTES" | tee -a "$RESULTS"
done
"$PY" - "$RESULTS" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda impl, k: statistics.median(r[k] for r in rows if r["impl"] == impl)
r_wall, p_wall = med("rust", "wall_s"), med("python", "wall_s")
print(f"tensor bytes: {rows[0]['tensor_bytes']} ({rows[0]['tensors']} fp16 tensors), runs: {len(rows) // 2} each")
print(f"median wall (write+hash+fsync): rust {r_wall:.3f} s, python {p_wall:.3f} s "
      f"(python save {med('python', 'save_s'):.3f} s + hash {med('python', 'hash_s'):.3f} s)")
print(f"speedup: {p_wall / r_wall:.2f}x")
print(f"median peak above tensors: rust {med('rust', 'peak_above_tensors_mib'):.1f} MiB, "
      f"python {med('python', 'peak_above_tensors_mib'):.1f} MiB")
PYEOF
