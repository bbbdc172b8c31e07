#!/usr/bin/env bash
# The Python side the tests compare against: real PyTorch 2.11 (the `.pt` round trip, the numerics
# parity check against transformers' DeepseekV2 modules, and the reference benchmarks).
# Installs into .deps/venv; idempotent (a complete venv is marked by .deps/venv/.complete).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.deps/venv}"
reqs="$root/scripts/python-requirements.txt"
stamp="$(sha256sum "$reqs" | cut -c1-16)"
if [[ -f "$venv/.complete" ]] && [[ "$(cat "$venv/.complete")" == "$stamp" ]]; then
  echo "python venv already at $venv"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
# huggingface_hub pulls hf_xet; without it the client offers LFS basic/multipart (what the Hub stand-in serves).
"$venv/bin/pip" uninstall --quiet -y hf_xet || true
echo "$stamp" > "$venv/.complete"
echo "python venv ready at $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
