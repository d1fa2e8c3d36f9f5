#!/usr/bin/env bash
# Chromium (Debian's package) for the UI tests; Playwright drives it and never downloads a browser.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "setup-browser: $(command -v chromium) present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-browser: Chromium is missing; install it with: sudo apt-get install chromium (the UI tests skip without it)"
  exit 0
fi
t0=$(date +%s)
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "setup-browser: chromium installed in $(( $(date +%s) - t0 ))s"
