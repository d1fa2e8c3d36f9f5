"""Every engine operator once, on the local runner: deliver, a 2-rank mapped sweep, merge.

With ``SMOKE_OCI_REPO`` (``oci://REGISTRY/REPOSITORY``) each sweep task also pushes its adapter there,
tagged ``r<map index>``, with the Docker config ``SMOKE_DOCKER_CONFIG`` (a registry without TLS); with
``SMOKE_SERVE`` as well, vLLM (CPU, local runner) then serves the base model with the first rank's
adapter pulled from its OCI reference, answers the smoke question and stops."""

from __future__ import annotations

import os

from airflow.sdk import DAG, task

from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    DeployVLLMOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
)

MODEL_DIR = os.environ.get("SMOKE_MODEL_DIR", "/nonexistent")
OCI_REPO = os.environ.get("SMOKE_OCI_REPO")
SERVE = bool(OCI_REPO and os.environ.get("SMOKE_SERVE"))
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
        # the tokenizer's own template adds no tokens: an adapter vLLM can load (no modules_to_save)
        overrides={"data_conf.chat_template_name": "keep-original"},
        gpus=0,
        output_oci=f"{OCI_REPO}:r{{{{ ti.map_index }}}}" if OCI_REPO else None,
        oci_docker_config=os.environ.get("SMOKE_DOCKER_CONFIG"),
        oci_plain_http=bool(OCI_REPO),
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
    if SERVE:
        serve = DeployVLLMOperator(
            task_id="serve_from_oci",
            model_uri="s3://finetune/models/smoke/tiny",
            served_model_name="smoke",
            adapters={"tuned": f"{OCI_REPO}:r0"},
            adapter_ranks={"tuned": 2},
            oci_docker_config=os.environ.get("SMOKE_DOCKER_CONFIG"),
            oci_plain_http=True,
            smoke_question="What is the capital of France?",
            ready_timeout=300,
            keep_running=False,
        )
        sweep >> serve
