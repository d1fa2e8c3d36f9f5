"""Provider registration, config, DAG parsing without torch, images and engine commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _airflow(tmp_path, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run([str(BIN / "airflow"), *args], capture_output=True, text=True, timeout=120,
                          env={**base, "AIRFLOW_HOME": str(tmp_path), **env})


def test_airflow_lists_the_provider_and_reads_its_config(tmp_path):
    listed = _airflow(tmp_path, "providers", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "airflow-provider-finetune" in listed.stdout
    default = _airflow(tmp_path, "config", "get-value", "finetune", "runner")
    assert default.returncode == 0 and default.stdout.strip() == "kubernetes", default.stderr[-2000:]
    override = _airflow(tmp_path, "config", "get-value", "finetune", "runner", AIRFLOW__FINETUNE__RUNNER="local")
    assert override.stdout.strip() == "local"
    bucket = _airflow(tmp_path, "config", "get-value", "finetune", "bucket_secret_name")
    assert bucket.stdout.strip() == "finetune-bucket"
    import json

    triggers = _airflow(tmp_path, "providers", "triggers", "-o", "json")
    assert triggers.returncode == 0, triggers.stderr[-2000:]
    ours = [t for t in json.loads(triggers.stdout) if t["package_name"] == "airflow-provider-finetune"]
    assert ours == [{"package_name": "airflow-provider-finetune", "class": "airflow_provider_finetune.triggers.deployment",
                     "integration_name": "Fine-tune"}]


DAG_DIRS = [ROOT / "dags", ROOT / "tests" / "provider" / "dags"]


@pytest.mark.parametrize("folder", DAG_DIRS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dag_files_parse_without_torch(folder):
    files = sorted(folder.glob("*.py"))
    if not files:
        pytest.skip(f"no DAG files in {folder.relative_to(ROOT)} yet")
    code = f"""
import sys, time
from airflow.dag_processing.dagbag import DagBag
t0 = time.perf_counter()
bag = DagBag(dag_folder={str(folder)!r})
elapsed = time.perf_counter() - t0
assert not bag.import_errors, bag.import_errors
assert bag.dags, "no DAGs found"
heavy = [m for m in ("torch", "transformers", "trl", "peft", "accelerate") if m in sys.modules]
assert not heavy, f"DAG parsing imported {{heavy}}"
print(len(bag.dags), f"{{elapsed:.2f}}")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SMOKE_MODEL_DIR": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dockerfiles_lint_clean():
    files = sorted((ROOT / "images").glob("*.Dockerfile"))
    assert len(files) == 2
    proc = subprocess.run([str(BIN / "hadolint"), *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in files:
        text = f.read_text()
        assert "USER 1000" in text and "requirements-engine.txt" in text
        assert "TOKEN" not in text.replace("HF_HUB_DISABLE_TELEMETRY", "")


def test_every_engine_command_the_builders_use_exists():
    """The commands in built pods (and the image's own checks) answer --help."""
    from airflow_provider_finetune.pods.distributed import torchrun_command

    commands = {"train-job", "deliver-model", "deliver-data", "merge-job", "pull", "validate-config", "validate-data"}
    assert torchrun_command(["train-job"])[:3] == ["torchrun", "-m", "finetune_engine.cli.main"]
    for cmd in sorted(commands):
        proc = subprocess.run([str(BIN / "finetune-engine"), cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage" in proc.stdout, (cmd, proc.stderr[-500:])
    for exe in ("finetuning", "torchrun"):
        assert subprocess.run([str(BIN / exe), "--help"], capture_output=True).returncode == 0


def test_image_pins_match_the_tested_versions():
    pins = dict(line.split("==") for line in (ROOT / "images" / "requirements-engine.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    tested = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for name, version in pins.items():
        assert tested.get(name) == version, f"{name}: image pins {version}, tests run {tested.get(name)}"


def test_provider_info_is_valid_for_this_airflow():
    """get_provider_info against the schema the installed Airflow validates providers with."""
    import importlib
    import json

    import airflow
    import jsonschema

    from airflow_provider_finetune.get_provider_info import get_provider_info

    info = get_provider_info()
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(info, schema)
    integrations = {i["integration-name"] for i in info["integrations"]}
    for entry in info["triggers"]:
        assert entry["integration-name"] in integrations
        for module in entry["python-modules"]:
            importlib.import_module(module)
    assert "airflow_provider_finetune.triggers.deployment" in [m for t in info["triggers"] for m in t["python-modules"]]
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert hasattr(importlib.import_module(module), name), link
    # the bucket and cluster reuse the amazon (aws) and cncf (kubernetes) connection types: none of our own
    assert "connection-types" not in info
