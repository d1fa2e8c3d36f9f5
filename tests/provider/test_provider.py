"""Provider registration, config, DAG parsing without torch and the engine commands pods run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.airflow_compat import DAGBAG_IMPORT

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _airflow(tmp_path, *args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run(
        [str(BIN / "airflow"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "AIRFLOW_HOME": str(tmp_path), **env},
    )


def test_airflow_lists_the_provider_and_reads_its_config(tmp_path):
    listed = _airflow(tmp_path, "providers", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "airflow-provider-finetune" in listed.stdout
    default = _airflow(tmp_path, "config", "get-value", "finetune", "runner")
    assert default.returncode == 0 and default.stdout.strip() == "kubernetes", default.stderr[-2000:]
    override = _airflow(
        tmp_path, "config", "get-value", "finetune", "runner", AIRFLOW__FINETUNE__RUNNER="local"
    )
    assert override.stdout.strip() == "local"
    bucket = _airflow(tmp_path, "config", "get-value", "finetune", "bucket_secret_name")
    assert bucket.stdout.strip() == "finetune-bucket"
    import json

    triggers = _airflow(tmp_path, "providers", "triggers", "-o", "json")
    assert triggers.returncode == 0, triggers.stderr[-2000:]
    ours = [t for t in json.loads(triggers.stdout) if t["package_name"] == "airflow-provider-finetune"]
    assert sorted(ours, key=lambda t: t["class"]) == [
        {
            "package_name": "airflow-provider-finetune",
            "class": "airflow_provider_finetune.triggers.deployment",
            "integration_name": "Fine-tune",
        },
        {
            "package_name": "airflow-provider-finetune",
            "class": "airflow_provider_finetune.triggers.job",
            "integration_name": "Fine-tune",
        },
    ]


def test_provider_dag_files_parse_without_torch():
    """The provider's own test DAGs (tests/provider/dags) parse without import errors or a training
    library; the shipped DAGs (dags/) are checked file by file, with their parse time, in
    tests/dags/test_standalone.py."""
    folder = ROOT / "tests" / "provider" / "dags"
    assert sorted(folder.glob("*.py")), f"no DAG files in {folder.relative_to(ROOT)}"
    code = f"""
import sys
{DAGBAG_IMPORT}bag = DagBag(dag_folder={str(folder)!r})
assert not bag.import_errors, bag.import_errors
assert bag.dags, "no DAGs found"
heavy = [m for m in ("torch", "transformers", "trl", "peft", "accelerate") if m in sys.modules]
assert not heavy, f"DAG parsing imported {{heavy}}"
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SMOKE_MODEL_DIR": "/nonexistent"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _engine_operator_classes() -> set[type]:
    import airflow_provider_finetune.operators as ops
    from airflow_provider_finetune.operators.base import EngineJobOperator

    found, todo = set(), [EngineJobOperator]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(ops.__name__):
                found.add(sub)
            todo.append(sub)
    return found


def _built_commands() -> list[list[str]]:
    """The container commands of every pod, job and deployment our builders make, for a sample of
    each engine operator (single pod, torchrun, multi-node) and the vLLM deployment's init containers."""
    from airflow_provider_finetune.operators import DeployVLLMOperator, FinetuneKubernetesOperator
    from airflow_provider_finetune.pods.serving import build_vllm_deployment
    from tests.provider.conftest import containers
    from tests.provider.test_operator_pods import OPERATORS, context
    from tests.provider.test_operators import CONFIG

    operators = [make() for make in OPERATORS.values()]
    missing = _engine_operator_classes() - {type(op) for op in operators}
    assert not missing, f"no sample of {sorted(c.__name__ for c in missing)} in test_operator_pods.OPERATORS"
    commands = [op.engine_command(context(op)) for op in operators]
    for kind in ("trainjob", "pytorchjob"):
        op = FinetuneKubernetesOperator(task_id="multi", config=CONFIG, gpus=8, num_nodes=2, distributed=kind)
        commands += [c["command"] for c in containers(op.multinode_manifest(context(op))) if c.get("command")]
    deploy = DeployVLLMOperator(
        task_id="serve",
        model_uri="s3://finetune/m",
        served_model_name="m",
        adapters={"a": "s3://finetune/a"},
        adapter_ranks={"a": 8},
    )
    init = build_vllm_deployment(deploy.serve_spec())["spec"]["template"]["spec"]["initContainers"]
    return commands + [c["command"] for c in init]


def _engine_subcommand(command: list[str]) -> str | None:
    """``finetune-engine SUB ...`` or ``torchrun ... -m finetune_engine.cli.main SUB ...`` -> SUB."""
    if command[0] == "finetune-engine":
        return command[1]
    if "-m" in command and command[command.index("-m") + 1] == "finetune_engine.cli.main":
        return command[command.index("-m") + 2]
    return None


def test_every_engine_command_the_builders_use_exists():
    """Each engine command in a built pod answers --help; so do the launchers, the image's checks and
    the console scripts (finetune-engine, finetuning, and aimfttk: the Silogen chart's name for
    finetuning)."""
    commands = _built_commands()
    subcommands = {_engine_subcommand(c) for c in commands} - {None}
    # the sample covers every job kind the provider launches, eval-job included
    assert {"train-job", "deliver-model", "deliver-data", "merge-job", "eval-job", "pull"} <= subcommands
    unknown = [c for c in commands if _engine_subcommand(c) is None]
    assert unknown == [], f"commands that are not the engine's: {unknown}"
    helps = {}
    for cmd in sorted(subcommands):
        proc = subprocess.run([str(BIN / "finetune-engine"), cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage" in proc.stdout, (cmd, proc.stderr[-500:])
        helps[cmd] = proc.stdout
    for exe in sorted({c[0] for c in commands} | {"finetune-engine", "finetuning", "aimfttk"}):
        proc = subprocess.run([str(BIN / exe), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage" in proc.stdout, (exe, proc.stderr[-500:])
        helps[exe] = proc.stdout
    assert helps["aimfttk"] == helps["finetuning"]  # the chart's `aimfttk --num-preprocess-workers 4 sft CFG`
    # and every flag the builders pass is one the command knows (launcher flags: the launcher's)
    for command in commands:
        sub = _engine_subcommand(command)
        split = command.index(sub) if command[0] != "finetune-engine" else 1
        for part, text in ((command[:split], helps[command[0]]), (command[split:], helps[sub])):
            for flag in {a.split("=")[0] for a in part if a.startswith("--")}:
                assert flag in text, f"{' '.join(command[: split + 1])}: {flag} is not in its --help"


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
    assert "airflow_provider_finetune.triggers.deployment" in [
        m for t in info["triggers"] for m in t["python-modules"]
    ]
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert hasattr(importlib.import_module(module), name), link
    # the bucket and cluster reuse the amazon (aws) and cncf (kubernetes) connection types: none of our own
    assert "connection-types" not in info
