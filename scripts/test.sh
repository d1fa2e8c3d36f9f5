#!/usr/bin/env bash
# The whole suite, CPU only. Tests start their own servers (S3, MLflow) on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-browser.sh &   # Chromium for the UI tests, in parallel with the venvs
browser_pid=$!
./scripts/setup-vllm.sh &      # real vLLM (CPU) for the serving tests; its own venv, independent
vllm_pid=$!
./scripts/setup.sh
wait $vllm_pid
wait $browser_pid
./scripts/setup-registry.sh    # the OCI registry for the oci:// tests (apt, after setup-browser's apt)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LINT_VENV=.venv ./scripts/lint.sh   # the static checks (make lint), with the tools .venv already has
# two workers, whole modules each (module fixtures such as an Airflow server are built once), longest
# modules first (tests/conftest.py); FINETUNE_TEST_WORKERS=0 runs in one process
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=20 \
  -n "${FINETUNE_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
