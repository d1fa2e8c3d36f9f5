"""Engine pods that fail in different ways on the kubernetes runner (the fake API decides how, by
task id): OOMs must fail without a retry, other failures are retried once."""

from datetime import timedelta

from airflow.sdk import DAG

from airflow_provider_finetune.operators import FinetuneKubernetesOperator

CONFIG = {
    "data_conf": {
        "training_data": {
            "type": "CONCATENATION",
            "datasets": [{"path": "s3://finetune/datasets/chat.jsonl"}],
        }
    },
    "batchsize_conf": {"total_train_batch_size": 8},
    "run_conf": {"model": "s3://finetune/models/org/tiny"},
}

with DAG(
    "k8s_failures", schedule=None, catchup=False, default_args={"retries": 1, "retry_delay": timedelta(0)}
):
    for task_id in ("host_oom", "gpu_oom", "sigkill", "deadline"):
        FinetuneKubernetesOperator(
            task_id=task_id,
            config=CONFIG,
            get_logs=False,
            namespace="finetune",
            runner="kubernetes",
            on_finish_action="delete_pod",
        )  # deleted even when failed: the log is read first
