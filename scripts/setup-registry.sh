#!/usr/bin/env bash
# The CNCF distribution registry (Debian's docker-registry, 2.8) for the OCI artifact tests; the tests
# start it themselves on a free loopback port (tests/registry.py) and skip, saying why, without it.
set -euo pipefail
if command -v docker-registry >/dev/null 2>&1; then
  echo "setup-registry: $(command -v docker-registry) present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-registry: docker-registry is missing; install it with: sudo apt-get install docker-registry (the OCI tests skip without it)"
  exit 0
fi
t0=$(date +%s)
apt-get update -qq >/dev/null
# the package's service is not started: policy-rc.d or no init system; tests run their own instance
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
echo "setup-registry: docker-registry installed in $(( $(date +%s) - t0 ))s"
