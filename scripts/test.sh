#!/usr/bin/env bash
# The test command: installs what the tests need (libtorch, the PyTorch venv; the devnet installs its npm
# packages on first start) and runs every test of the workspace. Safe to run on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export OMP_NUM_THREADS=1
scripts/setup-libtorch.sh
scripts/setup-python.sh
scripts/setup-rotel.sh >/dev/null   # a real OTLP collector for the trace test
scripts/setup-prometheus.sh >/dev/null   # a real Prometheus for the metrics scrape test
export MINER_PYTHON="${MINER_PYTHON:-$root/.deps/venv/bin/python}"
# Binaries first: end-to-end tests run the real trainer-svc, chainsync-svc and minerctl.
cargo build --workspace --locked --bins
cargo test --workspace --locked "$@"
