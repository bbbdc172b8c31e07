#!/usr/bin/env bash
# The main job on its embedded default: assembles libtorch, builds, and trains the miner's expert group on the
# tiny built-in model and corpus on CPU, showing the loss fall. Extra arguments go to trainer-svc.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
scripts/setup-libtorch.sh
cargo build --release --locked -p trainer-svc
exec target/release/trainer-svc "$@"
