#!/usr/bin/env bash
# Headless Chromium from the Debian/Ubuntu packages, for the browser test of `bcc report`
# (tests/test_report.py). Does nothing when a chromium is already on PATH. Needs root or sudo.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
chromium --version
