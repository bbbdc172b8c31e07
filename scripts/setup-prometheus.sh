#!/usr/bin/env bash
# Installs a real Prometheus (Debian's `prometheus` package) for the metrics scrape test
# (`tests/tests/prometheus.rs`). Does nothing when `prometheus` is already on PATH.
# The package's own service is stopped and disabled so nothing stays bound to :9090.
#   scripts/setup-prometheus.sh
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    prometheus --version 2>&1 | head -1
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# No service may start during the install: a policy-rc.d that denies every start.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    CREATED_POLICY=1
fi
cleanup() { if [ "$CREATED_POLICY" -eq 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT
LOG="$(mktemp)"
if ! { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus; } \
    >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -f "$LOG"
    echo "setup-prometheus.sh: apt-get install prometheus failed (output above)" >&2
    exit 1
fi
rm -f "$LOG"
# In case an init system started it anyway.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
prometheus --version 2>&1 | head -1
