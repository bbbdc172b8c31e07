#!/usr/bin/env bash
# Round-trip latency of `minerctl status --path RUN` (process start, connect, GetStatus +
# ListCheckpoints, print) over N calls while trainer-svc trains the embedded tiny model on the CPU.
#
#   scripts/bench-status.sh [N=1000]
# Uses the binaries in ${CARGO_TARGET_DIR:-target}/${PROFILE:-release} (built here with
# `cargo build --profile $PROFILE -p trainer-svc -p minerctl` unless NO_BUILD=1), or
# TRAINER_BIN / MINERCTL_BIN.
set -euo pipefail
N="${1:-1000}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE="${PROFILE:-release}"
DIR="$TARGET/$PROFILE"
[ "$PROFILE" = dev ] && DIR="$TARGET/debug"
if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --profile "$PROFILE" -p trainer-svc -p minerctl >&2)
fi
TRAINER="${TRAINER_BIN:-$DIR/trainer-svc}"; MINERCTL="${MINERCTL_BIN:-$DIR/minerctl}"
for b in "$TRAINER" "$MINERCTL"; do [ -x "$b" ] || { echo "bench-status: missing $b" >&2; exit 66; }; done

WORK="$(mktemp -d)"; RUN="$WORK/run"; mkdir -p "$RUN"
cat > "$RUN/config.yaml" <<'YAML'
task:
  expert_group_name: embedded
  exp:
    data:
      sequence_length: 32
      per_device_train_batch_size: 2
local_par:
  gradient_accumulation_steps: 2
log:
  metric_interval: 1000
  eval_batches: 2
ckpt:
  checkpoint_interval: 1000
  validator_poll_secs: 0.0
YAML
OMP_NUM_THREADS=1 RUST_LOG=warn "$TRAINER" --device cpu --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --path "$RUN" 2>"$WORK/trainer.log" &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 300); do [ -f "$RUN/control/trainer.json" ] && break; sleep 0.1; done
[ -f "$RUN/control/trainer.json" ] || { echo "bench-status: trainer-svc did not start" >&2; cat "$WORK/trainer.log" >&2; exit 1; }

before=$("$MINERCTL" status --json --path "$RUN" 2>/dev/null | grep -o '"inner_opt_step": [0-9]*' | head -1 || true)
: > "$WORK/ns"
for _ in $(seq "$N"); do
  t0=$(date +%s%N)
  # Exit 69 is expected: no chainsync-svc runs here; the trainer must answer every time.
  "$MINERCTL" status --path "$RUN" > "$WORK/out" 2>/dev/null || true
  t1=$(date +%s%N)
  grep -q "trainer-svc    up at" "$WORK/out" || { echo "bench-status: a call did not reach trainer-svc" >&2; cat "$WORK/out" >&2; exit 1; }
  echo $(( (t1 - t0) / 1000 )) >> "$WORK/ns"
done
after=$("$MINERCTL" status --json --path "$RUN" 2>/dev/null | grep -o '"inner_opt_step": [0-9]*' | head -1 || true)
sort -n "$WORK/ns" | awk -v n="$N" -v b="$before" -v a="$after" '
  { v[NR] = $1; s += $1 }
  END {
    p50 = v[int(NR * 0.50) < 1 ? 1 : int(NR * 0.50)]; p99 = v[int(NR * 0.99) < 1 ? 1 : int(NR * 0.99)]
    printf "minerctl status round trip over %d calls: p50 %.2f ms  p99 %.2f ms  max %.2f ms  mean %.2f ms\n", n, p50/1000, p99/1000, v[NR]/1000, s/NR/1000
    printf "trainer progress during the run: %s -> %s\n", b, a
  }'
