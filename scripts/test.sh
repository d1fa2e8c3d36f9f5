#!/usr/bin/env bash
# The whole suite, CPU only. Tests start their own servers (S3, MLflow) on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup-vllm.sh   # real vLLM (CPU) for the serving tests
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m finetune_engine.config.generate --check
.venv/bin/ruff check airflow_provider_finetune engine dags tests scripts
.venv/bin/lint-imports --no-cache | tail -n 4
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
