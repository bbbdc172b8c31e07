#!/usr/bin/env bash
# One command: a miner through live subnet cycles on the local devnet. Starts the devnet
# (shared/devnet), an owner-phase-API stand-in, two validator stand-ins that commit a baseline
# every cycle and verify submissions against the chain, then trainer-svc and chainsync-svc as
# processes sharing one run directory (tiny embedded model on the CPU), and prints the block,
# phase, training state and chainsync jobs as it goes. Ctrl-C stops everything (the services
# get SIGTERM and write their final checkpoint; the chain is killed).
#
#   scripts/demo.sh [WORK_DIR]        # default: a temporary directory, removed at the end
#   DEMO_BLOCK_MS=1000                # block interval
#
# While it runs, `target/debug/minerctl status --path <run dir printed above>` shows the
# same from another shell.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
[ -d .deps/libtorch ] || scripts/setup-libtorch.sh
cargo build -p trainer-svc -p chainsync-svc -p minerctl -p miner-tests --bin miner-demo
exec "$CARGO_TARGET_DIR/debug/miner-demo" "$@"
