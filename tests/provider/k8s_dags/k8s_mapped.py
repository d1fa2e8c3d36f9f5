"""Mapped fine-tunes on the kubernetes runner, a LoRA-rank sweep and an overrides sweep (the API is
faked by the test that runs this)."""

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
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
    "run_conf": {"model": "s3://finetune/models/org/tiny"},
}

with DAG("k8s_mapped", schedule=None, catchup=False):
    FinetuneKubernetesOperator.partial(
        task_id="sweep", config=CONFIG, get_logs=False, namespace="finetune", runner="kubernetes"
    ).expand(lora_rank=[4, 8])
    FinetuneKubernetesOperator.partial(
        task_id="lr_sweep", config=CONFIG, get_logs=False, namespace="finetune", runner="kubernetes"
    ).expand(
        overrides=[
            ["training_args.learning_rate=0.0001", "training_args.max_steps=20"],
            {"training_args.learning_rate": 0.001},
        ]
    )
