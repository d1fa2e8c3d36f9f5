#!/usr/bin/env bash
# Create .venv with the provider, the engine (train + storage extras) and the test tools, pinned by
# constraints.txt. Re-running is cheap: nothing happens when the inputs did not change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
stamp_inputs=(pyproject.toml engine/pyproject.toml constraints.txt scripts/setup.sh)
want=$(cat "${stamp_inputs[@]}" | sha256sum | cut -c1-16)
if [[ -f $VENV/.setup-stamp && $(cat $VENV/.setup-stamp) == "$want" ]]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
t0=$(date +%s)
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, the CPU build: otherwise a dependency pulls a multi-GB CUDA build.
torch_pin=$(grep -E '^torch==' constraints.txt)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }  # pip's noise about absent local indexes
quiet "${PIP[@]}" install "$torch_pin"
# the engine's distribution was once named finetune-engine: one import package, one distribution
"${PIP[@]}" uninstall -y finetune-engine >/dev/null 2>&1 || true
quiet "${PIP[@]}" install -c constraints.txt -e "./engine[train,storage,quantize]" -e ".[dev]"
echo "$want" > $VENV/.setup-stamp
echo "setup: $VENV ready in $(( $(date +%s) - t0 ))s"
