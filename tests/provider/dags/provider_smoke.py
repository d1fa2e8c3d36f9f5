"""Every engine operator once, on the local runner: deliver, a 2-rank mapped sweep, merge."""

from __future__ import annotations

import os

from airflow.sdk import DAG, task

from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
)

MODEL_DIR = os.environ.get("SMOKE_MODEL_DIR", "/nonexistent")
SCRIPT = """
import os
from finetune_engine.tiny import write_chat_dataset
write_chat_dataset(os.path.join(os.environ["FINETUNE_DATA_DIR"], "chat.jsonl"), examples=64, seed=3)
"""
CONFIG = {
    "data_conf": {
        "training_data": {"type": "CONCATENATION", "datasets": [{"path": "s3://placeholder/x.jsonl"}]},
        "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.25},
        "chat_template_name": "chat-ml",
    },
    "training_args": {"learning_rate": 0.003, "max_steps": 3, "save_steps": 2, "logging_steps": 1},
    "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
    "run_conf": {"model": "s3://placeholder/model"},
    "sft_args": {"max_seq_length": 128},
}

with DAG("provider_smoke", schedule=None, catchup=False, tags=["test"]):
    model = HFModelToBucketOperator(
        task_id="deliver_model", model_id=MODEL_DIR, destination="s3://finetune/models/smoke/tiny"
    )
    data = DataScriptToBucketOperator(
        task_id="deliver_data", script=SCRIPT, destination="s3://finetune/datasets/smoke"
    )
    sweep = FinetuneKubernetesOperator.partial(
        task_id="finetune",
        config=CONFIG,
        base_model="s3://finetune/models/smoke/tiny",
        datasets=["s3://finetune/datasets/smoke/chat.jsonl"],
        experiment="smoke",
        gpus=0,
    ).expand(lora_rank=[2, 4])

    @task
    def best(results: list[dict]) -> str:
        winner = min(results, key=lambda r: r["final_eval_loss"])
        return winner["final_adapter_uri"]

    adapter = best(sweep.output)
    merge = MergeAdapterOperator(
        task_id="merge",
        base="s3://finetune/models/smoke/tiny",
        adapter=adapter,
        output_uri="s3://finetune/experiments/smoke/merged",
    )
    # Two processes on the CPU (gloo): torchrun with one process per "GPU", accumulation derived.
    two_procs = FinetuneKubernetesOperator(
        task_id="finetune_2proc",
        config=CONFIG,
        overrides={"peft_conf": {"peft_type": "NO_PEFT"}, "training_args.max_steps": 2},
        base_model="s3://finetune/models/smoke/tiny",
        datasets=["s3://finetune/datasets/smoke/chat.jsonl"],
        experiment="smoke-ddp",
        gpus=2,
        extra_env={"CUDA_VISIBLE_DEVICES": ""},
    )
    [model, data] >> sweep
    [model, data] >> two_procs
