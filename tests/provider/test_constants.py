"""Values with one home: the XCom result file, the runner resolution, the version."""

from __future__ import annotations

import pytest

from airflow_provider_finetune import settings
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE


def test_xcom_result_file_is_in_the_kubernetes_pod_operators_xcom_volume():
    from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults

    directory, _, name = XCOM_RESULT_FILE.rpartition("/")
    assert directory == PodDefaults.XCOM_MOUNT_PATH
    assert name == "return.json"


def test_engine_commands_and_env_use_the_one_xcom_result_file():
    from airflow_provider_finetune.operators import EvaluateModelsOperator, MergeAdapterOperator

    merge = MergeAdapterOperator(
        task_id="m", base="s3://b/base", adapter="s3://b/run/checkpoint-final-adapter"
    )
    evaluate = EvaluateModelsOperator(task_id="e", models=["s3://b/m"], datasets=["s3://b/d.jsonl"])
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
    merge = MergeAdapterOperator(task_id="m", base="s3://b/base", adapter="s3://b/a")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        merge.execute({})
    deploy = DeployVLLMOperator(task_id="d", model_uri="s3://b/m", served_model_name="m")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        deploy.execute({})
    undeploy = UndeployVLLMOperator(task_id="u", served_model_name="m")
    with pytest.raises(FinetuneConfigError, match="runner 'locl'"):
        undeploy.execute({})
