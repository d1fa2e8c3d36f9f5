"""Values with one home."""

from __future__ import annotations

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
