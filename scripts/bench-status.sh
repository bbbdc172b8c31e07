#!/usr/bin/env bash
# `minerctl status` round-trip latency while trainer-svc trains the embedded tiny model on the CPU
# with every core available to it (OMP threads = the machine's cores unless TRAIN_THREADS is set).
# Three variants, each N calls, repeated REPS times; prints p50/p99 per repetition and the
# medians over repetitions, with the load average:
#   process   `minerctl status --path RUN`, one process per call (what a user types): process
#             start, reading the run directory, connecting, GetStatus + ListCheckpoints, print;
#   watch     the same round trip inside one long-lived process over open connections (what a
#             dashboard or `minerctl status --watch` sees; taken from its `round_trip_ms`);
#   start     `minerctl --version`, one process per call: the part of `process` that is only
#             starting a process on this machine.
# The target is p99 < 20 ms.
#
#   scripts/bench-status.sh [N=1000]        (REPS=3, TRAIN_THREADS=all cores)
# Uses the binaries in ${CARGO_TARGET_DIR:-target}/${PROFILE:-release} (built here with
# `cargo build --profile $PROFILE -p trainer-svc -p minerctl` unless NO_BUILD=1), or
# TRAINER_BIN / MINERCTL_BIN. No chainsync-svc runs (it needs a chain): every call reports it
# unreachable from the run directory (no endpoints file, no connection attempted) and exits 69.
set -euo pipefail
N="${1:-1000}"
REPS="${REPS:-3}"
TRAIN_THREADS="${TRAIN_THREADS:-$(getconf _NPROCESSORS_ONLN)}"
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
OMP_NUM_THREADS="$TRAIN_THREADS" RUST_LOG=warn "$TRAINER" --device cpu --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --path "$RUN" 2>"$WORK/trainer.log" &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# The trainer's optimizer step (minerctl exits 69 here: chainsync-svc is not running).
step() {
  local s
  s=$("$MINERCTL" status --json --path "$RUN" 2>/dev/null || true)
  s=$(grep -o '"inner_opt_step": [0-9]*' <<< "$s" | grep -o '[0-9]*$' | head -1 || true)
  echo "${s:-0}"
}
# Measure while it trains: wait for the first optimizer step (model built, data loaded).
for _ in $(seq 600); do
  kill -0 "$PID" 2>/dev/null || { echo "bench-status: trainer-svc exited" >&2; cat "$WORK/trainer.log" >&2; exit 1; }
  [ "$(step)" -ge 1 ] && break
  sleep 0.2
done
[ "$(step)" -ge 1 ] || { echo "bench-status: trainer-svc made no optimizer step" >&2; cat "$WORK/trainer.log" >&2; exit 1; }

us() { local t="$EPOCHREALTIME"; echo "${t/./}"; }
# p50 p99 (ms) of the numbers (one per line, microseconds) in a file.
pct() { sort -n "$1" | awk '{ v[NR] = $1 } END {
  i50 = int(NR * 0.50); i99 = int(NR * 0.99); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1
  printf "%.2f %.2f\n", v[i50] / 1000, v[i99] / 1000 }'; }

run_process() {
  : > "$WORK/lat"
  for _ in $(seq "$N"); do
    t0=$(us)
    "$MINERCTL" status --path "$RUN" > "$WORK/out" 2>/dev/null || true
    t1=$(us)
    grep -q "trainer-svc    up at" "$WORK/out" || { echo "bench-status: a call did not reach trainer-svc" >&2; cat "$WORK/out" >&2; exit 1; }
    echo $(( t1 - t0 )) >> "$WORK/lat"
  done
}
run_start() {
  : > "$WORK/lat"
  for _ in $(seq "$N"); do
    t0=$(us); "$MINERCTL" --version > /dev/null; t1=$(us)
    echo $(( t1 - t0 )) >> "$WORK/lat"
  done
}
run_watch() {
  "$MINERCTL" status --watch --interval 0 --count "$N" --json --path "$RUN" > "$WORK/watch" 2>/dev/null || true
  [ "$(grep -c '"reachable":true' "$WORK/watch")" -ge "$N" ] || { echo "bench-status: --watch refreshes did not all reach trainer-svc" >&2; head -c 2000 "$WORK/watch" >&2; exit 1; }
  grep -o '"round_trip_ms":[0-9.e+-]*' "$WORK/watch" | cut -d: -f2 | awk '{ printf "%d\n", $1 * 1000 }' > "$WORK/lat"
}

echo "trainer-svc pid $PID, OMP threads $TRAIN_THREADS, $(getconf _NPROCESSORS_ONLN) cores; $N calls per variant, $REPS repetitions"
: > "$WORK/results"
for r in $(seq "$REPS"); do
  for v in process watch start; do
    s0=$(step); l0=$(cut -d' ' -f1 /proc/loadavg)
    "run_$v"
    s1=$(step); l1=$(cut -d' ' -f1 /proc/loadavg)
    read -r p50 p99 < <(pct "$WORK/lat")
    echo "$v $p50 $p99" >> "$WORK/results"
    printf "rep %d  %-8s p50 %7.2f ms  p99 %7.2f ms   trainer steps %s -> %s   load %s -> %s\n" \
      "$r" "$v" "$p50" "$p99" "$s0" "$s1" "$l0" "$l1"
    [ "$s1" -gt "$s0" ] || [ "$v" = start ] || { echo "bench-status: the trainer made no step during the $v run" >&2; exit 1; }
  done
done
echo "medians over $REPS repetitions (target p99 < 20 ms):"
for v in process watch start; do
  med() { grep "^$v " "$WORK/results" | cut -d' ' -f"$1" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
  p50=$(med 2); p99=$(med 3)
  verdict=$(awk -v p="$p99" 'BEGIN { print (p < 20 ? "meets the target" : "misses the target") }')
  case $v in
    process) what="minerctl status, one process per call";;
    watch) what="status round trip in one process (--watch)";;
    start) what="minerctl --version (process start only)"; verdict="";;
  esac
  printf "  %-44s p50 %7.2f ms  p99 %7.2f ms  %s\n" "$what" "$p50" "$p99" "$verdict"
done
echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
