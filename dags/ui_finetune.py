"""Fine-tune from the Airflow UI: fill the trigger form, press Trigger.

The form (Params, validated by Airflow before a run is created) picks the base model and dataset
in the bucket, the method, the LoRA ranks to sweep (one pod each), learning rate, epochs, GPUs and
whether to serve the result. A ``preflight`` task then checks what the form cannot: the model
prefix is complete, the dataset exists and every line is valid for the method, and the experiment
config with the form's values validates for every rank. Only then do GPU pods start. The best rank
by eval loss is reported, and served with vLLM when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_provider_finetune import settings
from airflow_provider_finetune.operators import DeployVLLMOperator, FinetuneKubernetesOperator
from airflow_provider_finetune.preflight import CodeTrust, contained, tensor_parallel_param

ROOT = Path(__file__).resolve().parent.parent
BUCKET = settings.get("bucket")  # [finetune] bucket
# [finetune] dag_defaults may replace these defaults (the suite: the tiny model on the CPU)
DAG_ID = "finetune_ui"
D = settings.dag_defaults(
    DAG_ID,
    known=(
        "model_uri",
        "dataset_uri",
        "sft_config",
        "dpo_config",
        "gpus",
        "keep_serving",
        "allow_trust_remote_code",
        "allow_external_tokenizer",
    ),
)
CONFIGS = {  # one config per method, files of the DAG bundle
    method: str(
        contained(
            ROOT, D.get(f"{method}_config", default), f"[finetune] dag_defaults.{DAG_ID}.{method}_config"
        )
    )
    for method, default in (
        ("sft", "engine/configs/tutorial-01-finetune-lora.yaml"),
        ("dpo", "engine/configs/tiny-dpo-lora.yaml"),
    )
}
TRUST = CodeTrust.from_defaults(DAG_ID, D)
DATA = "Model and data"
TRAINING = "Training"
RESOURCES = "Resources and serving"

with DAG(
    dag_id=DAG_ID,
    dag_display_name="Fine-tune (form)",
    description="Fine-tune a model from a form: LoRA rank sweep, best by eval loss, optional vLLM serving.",
    schedule=None,
    catchup=False,
    tags=["finetune", "ui"],
    doc_md=__doc__,
    params={
        "model_uri": Param(
            D.get("model_uri", f"s3://{BUCKET}/models/tutorial/base"),
            type="string",
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+",
            title="Base model",
            description="Bucket prefix of the base model (delivered by deliver-model / the tutorial DAG).",
            section=DATA,
        ),
        "dataset_uri": Param(
            D.get("dataset_uri", f"s3://{BUCKET}/datasets/tutorial/argilla.jsonl"),
            type="string",
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+\.jsonl$",
            title="Dataset",
            description=(
                "JSONL training data in the bucket (messages for SFT; prompt/chosen/rejected for DPO)."
            ),
            section=DATA,
        ),
        "method": Param(
            "sft",
            type="string",
            enum=["sft", "dpo"],
            title="Method",
            values_display={"sft": "Supervised fine-tuning (SFT)", "dpo": "Preference optimisation (DPO)"},
            description="What the engine runs.",
            section=TRAINING,
        ),
        "lora_ranks": Param(
            [8, 16],
            type="array",
            items={"type": "integer", "minimum": 1, "maximum": 512},
            minItems=1,
            maxItems=64,
            uniqueItems=True,
            title="LoRA ranks",
            description="A JSON list, e.g. [8, 16]: one pod per rank; the best by eval loss wins.",
            section=TRAINING,
        ),
        "learning_rate": Param(
            2e-4,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Learning rate",
            description="Peak learning rate of the cosine schedule.",
            section=TRAINING,
        ),
        "epochs": Param(1, type="integer", minimum=1, maximum=100, title="Epochs", section=TRAINING),
        "max_steps": Param(
            -1,
            type="integer",
            minimum=-1,
            maximum=1_000_000,
            **{"not": {"const": 0}},
            title="Max steps",
            description="Stop after this many optimizer steps (-1: run the epochs; 0 is refused).",
            section=TRAINING,
        ),
        "gpus": Param(
            int(D.get("gpus", 1)),
            type="integer",
            minimum=0,
            maximum=8,
            title="GPUs per run",
            description="0 runs on the CPU (tiny models only).",
            section=RESOURCES,
        ),
        "tensor_parallel_size": tensor_parallel_param(
            title="Serving tensor-parallel size", section=RESOURCES
        ),
        "deploy": Param(
            False,
            type="boolean",
            title="Serve the best model",
            description="Start vLLM with the best run's merged model and smoke-test a chat.",
            section=RESOURCES,
        ),
    },
) as dag:

    @task
    def preflight(params: dict, dag_run=None, dag=None) -> list[dict]:
        """Everything that can fail before GPU time: model prefix, data lines, config for every rank."""
        import tempfile

        from airflow_provider_finetune import settings
        from airflow_provider_finetune.preflight import (
            check_conf_keys,
            check_inputs,
            check_serving,
            form_overrides,
        )

        check_conf_keys(
            dag_run.conf if dag_run else None, dag.params if dag else params
        )  # the declared params
        check_serving(params["deploy"], params["gpus"], params["tensor_parallel_size"])
        overrides = form_overrides(params)
        with tempfile.TemporaryDirectory() as tmp:
            ranks = check_inputs(
                model_uri=params["model_uri"],
                dataset_uri=params["dataset_uri"],
                method=params["method"],
                config=CONFIGS[params["method"]],
                overrides=overrides,
                ranks=params["lora_ranks"],
                conn_id=settings.get("bucket_conn_id"),
                workdir=Path(tmp),
                trust=TRUST,
            )
        print(
            f"preflight passed: {params['model_uri']} is complete, {params['dataset_uri']} is valid for "
            f"{params['method']}, the config validates for ranks {ranks}"
        )
        return [{"lora_rank": rank, "overrides": overrides} for rank in ranks]  # one sweep pod each

    runs = preflight()
    sweep = FinetuneKubernetesOperator.partial(
        task_id="sweep",
        config="{{ " + json.dumps(CONFIGS) + "[params.method] }}",
        method="{{ params.method }}",
        base_model="{{ params.model_uri }}",
        datasets=["{{ params.dataset_uri }}"],
        experiment="ui",
        gpus="{{ params.gpus }}",
        map_index_template="r={{ task.lora_rank }}",
    ).expand_kwargs(runs)

    @task(trigger_rule="all_done")
    def pick_best(results: list[dict | None], runs: list[dict]) -> dict:
        from airflow_provider_finetune.selection import pick_best

        best, summary = pick_best(results, [r["lora_rank"] for r in runs])
        print(summary)
        return best

    best = pick_best(sweep.output, runs)

    @task.short_circuit
    def want_deploy(params: dict) -> bool:
        return bool(params["deploy"])

    deploy = DeployVLLMOperator(
        task_id="deploy",
        model_uri="{{ ti.xcom_pull(task_ids='pick_best')['final_checkpoint_uri'] }}",
        served_model_name="finetune-ui",
        gpus="{{ params.gpus }}",
        tensor_parallel_size="{{ params.tensor_parallel_size }}",
        keep_running=bool(D.get("keep_serving", True)),
    )
    best >> want_deploy() >> deploy
