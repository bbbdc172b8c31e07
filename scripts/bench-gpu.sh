#!/usr/bin/env bash
# One command for a CUDA machine with PyTorch installed: trainer-svc's training step on the real
# DeepSeek-V2-Lite partial model (group exp_math, seq 4096, GA 4, activation checkpointing) against the
# PyTorch reference loop (tests/py/bench_step.py: transformers + Connito's partial router, autocast,
# GradScaler, gradient checkpointing), in fp16 and bf16, run one after the other on the same GPU; then a
# CUDA smoke of the trainer-svc binary (fp16-mixed, GradScaler, checkpoint publish), whose shard is loaded
# back (safetensors.torch.load_file, or torch.load for .pt) and checked (dtype fp16, finite, expert keys).
# BENCH_SMOKE_ONLY=1 skips the step benchmark.
#
#   scripts/bench-gpu.sh            # binaries from target/release (cargo build --release -p trainer-svc
#                                   #   --bins --example bench_step), results in $OUT or /tmp/bench-gpu
#
# On a GPU bench_step runs the reference first, in a process that exits before trainer-svc's model is
# built, so the GPU memory sampled in each side's timed window is that side's alone.
# Environment: BENCH_BIN, TRAINER_BIN (binaries), PYTHON (the interpreter holding torch + transformers;
# default python3), BENCH_STEPS (timed steps, default 10), OUT (where logs and the summary go).
# The binaries are linked against libtorch 2.11; LD_LIBRARY_PATH is pointed at the interpreter's torch/lib
# (its libtorch.so loads libtorch_cuda.so).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-/tmp/bench-gpu}"
mkdir -p "$out"
bench="${BENCH_BIN:-$root/target/release/examples/bench_step}"
trainer="${TRAINER_BIN:-$root/target/release/trainer-svc}"
py="${PYTHON:-python3}"
steps="${BENCH_STEPS:-10}"
torchlib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || {
    echo "bench-gpu: $py has no torch" >&2
    exit 1
}
export LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# tch's build links libtorch with --as-needed against the CPU folder's stub, so nothing pulls in the
# CUDA kernels: preload them (without this, any CUDA tensor fails with "Could not run ... 'CUDA' backend").
if [ -f "$torchlib/libtorch_cuda.so" ]; then
    export LD_PRELOAD="$torchlib/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export MINER_PYTHON="$(command -v "$py")"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"

# GPU memory in use, sampled every ~0.2 s with wall-clock stamps; each side prints the bounds of its
# timed steps, and the summary takes the peak inside them (the same measure for both sides).
(while :; do
    echo "$(date +%s.%N) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
    sleep 0.2
done) >"$out/mem.txt" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT

for prec in $([ -n "${BENCH_SMOKE_ONLY:-}" ] || echo fp16 bf16); do
    echo "== bench_step lite $prec: trainer-svc model vs PyTorch reference"
    timeout 300 "$bench" --preset lite --seq 4096 --batch 1 --ga 4 --warmup 2 --steps "$steps" \
        --threads 4 --device cuda --precision "$prec" --checkpointing --python 2>&1 | tee "$out/bench-$prec.txt"
    echo "exit ${PIPESTATUS[0]}"
done

echo "== trainer-svc on CUDA (embedded tiny model, fp16-mixed, 40 steps, final checkpoint)"
smoke="$(mktemp -d)"
(cd "$smoke" && timeout 180 "$trainer" --device cuda --max-steps 40 --listen 127.0.0.1:50951 \
    --metrics-listen 127.0.0.1:8951) >"$out/trainer-cuda.log" 2>&1
echo "exit $?"
tail -n 15 "$out/trainer-cuda.log"
shards="$(find "$smoke" -name 'model_expgroup_*.safetensors' -o -name 'model_expgroup_*.pt' | sort | head -3)"
[ -n "$shards" ] || echo "no shard was published (see trainer-cuda.log)"
for f in $shards; do
    "$py" - "$f" <<'EOF'
import sys, torch
path = sys.argv[1]
if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    sd = load_file(path)
else:
    sd = torch.load(path, weights_only=True, map_location="cpu")
    sd = sd.get("model_state_dict", sd)
kinds = sorted({str(t.dtype) for t in sd.values()})
finite = all(bool(torch.isfinite(t.float()).all()) for t in sd.values())
experts = all(".mlp.experts." in k for k in sd)
print(f"shard {path}: {len(sd)} tensors, dtypes {kinds}, all finite {finite}, all expert keys {experts}")
EOF
done
rm -rf "$smoke"

kill $sampler 2>/dev/null
"$py" - "$out" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
mem = []
for line in (out / "mem.txt").read_text().splitlines():
    try:
        t, m = line.split()
        mem.append((float(t), float(m)))
    except ValueError:
        pass
def peak(a, b):
    vals = [m for t, m in mem if a <= t <= b]
    return max(vals) if vals else float("nan")
lines = []
for prec in ("fp16", "bf16"):
    p = out / f"bench-{prec}.txt"
    if not p.exists():
        continue
    txt = p.read_text()
    rust = re.search(r"rust:\s+best ([\d.]+) ms/step, median ([\d.]+) ms/step.*?([\d.]+) tokens/s median", txt)
    win = re.search(r"rust timed window \(unix s\): ([\d.]+) ([\d.]+)", txt)
    pyj = re.search(r"pytorch json: (\{.*\})", txt)
    if not (rust and win and pyj):
        lines.append(f"{prec}: incomplete, see bench-{prec}.txt")
        continue
    pj = json.loads(pyj.group(1))
    r_med, p_med = float(rust.group(2)) / 1e3, pj["median_s"]
    tok = 4 * 4096
    lines.append(
        f"{prec}: trainer-svc {tok / r_med:.0f} tokens/s (median {r_med * 1e3:.0f} ms/step), "
        f"reference {tok / p_med:.0f} tokens/s (median {p_med * 1e3:.0f} ms/step), speedup {p_med / r_med:.2f}x; "
        f"GPU memory in use during timed steps: trainer-svc {peak(float(win.group(1)), float(win.group(2))):.0f} MiB, "
        f"reference {peak(pj['timed_from_unix'], pj['timed_to_unix']):.0f} MiB "
        f"(reference allocator peak {pj.get('peak_reserved_bytes', 0) / 2**20:.0f} MiB reserved)"
    )
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
