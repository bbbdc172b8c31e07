#!/usr/bin/env bash
# Installs rotel (a real OpenTelemetry collector, Rust, shipped as a PyPI wheel) to
# .deps/rotel/rotel-agent for minerctl's trace test (`minerctl/tests/online.rs`).
#   scripts/setup-rotel.sh            # or ROTEL_VERSION=... scripts/setup-rotel.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.deps/rotel"
VERSION="${ROTEL_VERSION:-0.0.1a15}"
PY="${MINER_PYTHON:-$ROOT/.deps/venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download "rotel==$VERSION" --no-deps --only-binary=:all: -d "$TMP" >&2
mkdir -p "$DEST"
"$PY" - "$TMP" "$DEST" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "rotel-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("rotel/rotel-agent")
out = os.path.join(dest, "rotel-agent")
with open(out + ".tmp", "wb") as f:
    f.write(data)
os.chmod(out + ".tmp", 0o755)
os.replace(out + ".tmp", out)
print(out)
PY
"$DEST/rotel-agent" --version
