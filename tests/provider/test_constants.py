"""Values with one home: the XCom result file, the runner resolution, the version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from airflow_provider_finetune import __version__, settings
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE

ROOT = Path(__file__).resolve().parents[2]
# the engine image tags the build commands and docs write out (REGISTRY/finetune-engine-cuda:X,
# ghcr.io/airflow-provider-finetune/engine-rocm:X)
_IMAGE_TAG = re.compile(
    r"(?:finetune-engine|airflow-provider-finetune/engine)-(?:cuda(?:12)?|rocm):([^\s`'\"]+)"
)


def test_xcom_result_file_is_in_the_kubernetes_pod_operators_xcom_volume():
    from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults

    directory, _, name = XCOM_RESULT_FILE.rpartition("/")
    assert directory == PodDefaults.XCOM_MOUNT_PATH
    assert name == "return.json"


def test_engine_commands_and_env_use_the_one_xcom_result_file():
    from airflow_provider_finetune.operators import EvaluateModelsOperator, MergeAdapterOperator

    merge = MergeAdapterOperator(
        task_id="m", base="s3://bkt/base", adapter="s3://bkt/run/checkpoint-final-adapter"
    )
    evaluate = EvaluateModelsOperator(task_id="e", models=["s3://bkt/m"], datasets=["s3://bkt/d.jsonl"])
    for op in (merge, evaluate):
        cmd = op.engine_command({})
        assert cmd[cmd.index("--result-file") + 1] == XCOM_RESULT_FILE


@pytest.mark.parametrize(
    ("explicit", "configured", "expected"),
    [
        (None, None, "kubernetes"),  # the provider default
        (None, "local", "local"),  # [finetune] runner
        ("kubernetes", "local", "kubernetes"),  # the operator argument wins
        ("LOCAL", None, "local"),
    ],
)
def test_runner_comes_from_the_argument_then_the_config(monkeypatch, explicit, configured, expected):
    if configured is None:
        monkeypatch.delenv("AIRFLOW__FINETUNE__RUNNER", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW__FINETUNE__RUNNER", configured)
    assert settings.runner(explicit) == expected


def test_an_unknown_runner_is_refused_by_every_operator(monkeypatch):
    from airflow_provider_finetune.operators import (
        DeployVLLMOperator,
        MergeAdapterOperator,
        UndeployVLLMOperator,
    )

    monkeypatch.setenv("AIRFLOW__FINETUNE__RUNNER", "locl")
    with pytest.raises(FinetuneConfigError, match=r"runner 'locl'.*\[finetune\] runner"):
        settings.runner()
    merge = MergeAdapterOperator(task_id="m", base="s3://bkt/base", adapter="s3://bkt/a")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        merge.execute({})
    deploy = DeployVLLMOperator(task_id="d", model_uri="s3://bkt/m", served_model_name="m")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        deploy.execute({})
    undeploy = UndeployVLLMOperator(task_id="u", served_model_name="m")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        undeploy.execute({})


def test_the_provider_package_reads_its_version_from_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version lives in airflow_provider_finetune/__init__.py"
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "airflow_provider_finetune.__version__"
    }


def test_the_engine_package_has_the_providers_version():
    # engine/ is built on its own (the images install it alone), so it cannot read the provider's file
    engine = tomllib.loads((ROOT / "engine" / "pyproject.toml").read_text())["project"]
    assert engine["version"] == __version__, "bump engine/pyproject.toml with airflow_provider_finetune"


def test_provider_info_and_the_default_engine_image_carry_the_version():
    from airflow_provider_finetune.get_provider_info import get_provider_info

    info = get_provider_info()
    assert info["versions"][0] == __version__
    assert settings.default("engine_image").endswith(f"/engine-cuda:{__version__}")


@pytest.mark.parametrize(
    "path",
    ["images/engine-cuda.Dockerfile", "images/engine-rocm.Dockerfile", "images/README.md", "README.md"],
)
def test_image_tags_written_out_in_build_commands_and_docs_are_the_version(path):
    tags = _IMAGE_TAG.findall((ROOT / path).read_text())
    assert tags, f"{path}: no engine image tag found (update this test's pattern if the text moved)"
    assert set(tags) == {__version__}, f"{path}: image tags {sorted(set(tags))}, version is {__version__}"


def test_the_changelog_has_a_section_for_the_version():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert __version__ in headings
