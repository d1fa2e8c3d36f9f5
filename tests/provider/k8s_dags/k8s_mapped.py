"""A mapped fine-tune on the kubernetes runner (the API is faked by the test that runs this)."""

from airflow.sdk import DAG

from airflow_provider_finetune.operators import FinetuneKubernetesOperator

CONFIG = {
    "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "s3://finetune/datasets/chat.jsonl"}]}},
    "batchsize_conf": {"total_train_batch_size": 8},
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
    "run_conf": {"model": "s3://finetune/models/org/tiny"},
}

with DAG("k8s_mapped", schedule=None, catchup=False):
    FinetuneKubernetesOperator.partial(task_id="sweep", config=CONFIG, get_logs=False, namespace="finetune",
                                       runner="kubernetes").expand(lora_rank=[4, 8])
