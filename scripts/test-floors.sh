#!/usr/bin/env bash
# The version floors are true: install the LOWEST versions pyproject.toml allows of Airflow and the
# providers (apache-airflow, apache-airflow-providers-cncf-kubernetes, apache-airflow-providers-amazon)
# into a fresh venv, with the engine and the test tools, and run the provider's tests there.
# Not part of the normal CI run: `make test-floors` (a few minutes; needs the package index).
#   FLOORS_VENV   where the venv goes (default .work/venv-floors; removed and made again)
#   PYTEST_ARGS   what to run (default: the provider tests that need no S3 server, vLLM or browser)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${FLOORS_VENV:-.work/venv-floors}
t0=$(date +%s)
# "name>=X" in [project] dependencies -> "name==X"; a dependency without a floor is an error
mapfile -t floors < <("$PY" - <<'PYEOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    if not dep.startswith("apache-airflow"):
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;]*)", dep.replace(" ", ""))
    if not m:
        sys.exit(f"test-floors: {dep!r} has no single >= floor")
    print(f"{m[1]}=={m[2]}")
PYEOF
)
echo "test-floors: ${floors[*]}"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
torch_pin=$(grep -E '^torch==' constraints.txt)
"${PIP[@]}" install "$torch_pin"  # the CPU build first, as setup.sh does
# What Airflow's own constraints file of the floor release pins where its metadata is too loose:
# Airflow 3.1.0 imports structlog.dev.Styles, which structlog 26 removed; its ObjectStoragePath
# refuses s3:// with universal-pathlib 0.3; and its in-process execution API (dag.test()) answers
# every task start with a validation error under cadwyn 9 / fastapi 0.136 / pydantic 2.14: the
# versions of its release month work.
compat=("structlog==25.4.0" "universal-pathlib==0.2.6" "cadwyn==5.4.4" "fastapi==0.117.1" "pydantic==2.11.9")
"${PIP[@]}" install "${floors[@]}" "${compat[@]}" -e "./engine[train,storage,quantize]" -e ".[dev]"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -E "^apache-airflow(-providers-(cncf-kubernetes|amazon))? " || true
echo "test-floors: installed in $(( $(date +%s) - t0 ))s"
# test_lock_is_complete walks the installed packages' requirements against the image lock, which is
# made from constraints.txt; this venv resolves the engine's dependencies afresh, so it is left out.
# shellcheck disable=SC2086
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider -q -n 2 \
  ${PYTEST_ARGS:-tests/provider -m "not slow and not s3 and not vllm and not browser and not gpu" \
    --deselect tests/provider/test_images.py::test_lock_is_complete}
echo "test-floors: done in $(( $(date +%s) - t0 ))s"
