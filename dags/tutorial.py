"""The Silogen tutorial as one DAG: deliver a model and data, sweep LoRA ranks (one pod per rank),
pick the best by eval loss, optionally run a full-parameter job on N GPUs, merge the winner, serve
it with vLLM and chat with it.

Relaunching a DAG run resumes unfinished ranks from their newest complete checkpoint and skips
finished ones (checkpoint prefixes are derived from the run id, the rank and the config).

Locally (`make demo`): runner=local, the embedded S3 server, the tiny model built on the machine.
On a cluster: the defaults below deliver TinyLlama and the seed's LoRA config.
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import DAG, Asset, Param, task

from airflow_provider_finetune import settings
from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    DeployVLLMOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
)
from airflow_provider_finetune.preflight import (
    SHIPPED_SFT_CONFIGS,
    CodeTrust,
    bundle_choices,
    model_id_pattern,
    tensor_parallel_param,
)

ROOT = Path(__file__).resolve().parent.parent  # the DAG bundle: every file a param picks lies under it
DAG_ID = "finetune_tutorial"
BUCKET = settings.get("bucket")  # [finetune] bucket
DATA_PREFIX = f"s3://{BUCKET}/datasets/tutorial"
TUTORIAL_DATA = Asset(name="tutorial_dataset", uri=DATA_PREFIX)
MODEL_URI = f"s3://{BUCKET}/models/tutorial/base"
# [finetune] dag_defaults may replace these defaults (make demo: the tiny model on the CPU) and add
# configs and data scripts of the DAG bundle to the choices; a run's conf picks among them only
D = settings.dag_defaults(
    DAG_ID,
    known=(
        "model_id",
        "data_script",
        "data_scripts",
        "dataset_file",
        "config",
        "configs",
        "gpus",
        "max_steps",
        "keep_serving",
        "parallel_ranks",
        "allow_trust_remote_code",
        "allow_external_tokenizer",
    ),
)
CONFIGS = bundle_choices(
    ROOT,
    DAG_ID,
    D,
    option="config",
    set_key="configs",
    builtin=SHIPPED_SFT_CONFIGS,
    default="tutorial-01-finetune-lora",
)
DATA_SCRIPTS = bundle_choices(
    ROOT,
    DAG_ID,
    D,
    option="data_script",
    set_key="data_scripts",
    builtin={"argilla": "examples/argilla_data_script.py", "tiny": "examples/tiny_data_script.py"},
    default="argilla",
)
MODEL_ID = str(D.get("model_id", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"))
# an absolute model_id in dag_defaults is the one directory on the worker a run may deliver from
LOCAL_MODEL_DIR = MODEL_ID if MODEL_ID.startswith("/") else None
TRUST = CodeTrust.from_defaults(DAG_ID, D)
FULL_PARAM_OVERRIDES = ["peft_conf={peft_type: NO_PEFT}", "run_conf.final_checkpoint_name=checkpoint-final"]
DATASET_FILE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.jsonl$"

with DAG(
    dag_id=DAG_ID,
    schedule=None,
    catchup=False,
    tags=["finetune", "tutorial"],
    doc_md=__doc__,
    params={
        "model_id": Param(
            MODEL_ID,
            type="string",
            pattern=model_id_pattern(LOCAL_MODEL_DIR),
            description="Hub repo id (org/name)"
            + (f", or {LOCAL_MODEL_DIR} (the model directory of this platform)." if LOCAL_MODEL_DIR else "."),
        ),
        "data_script": Param(
            DATA_SCRIPTS.default,
            type="string",
            enum=DATA_SCRIPTS.names,
            description="Data script (of the DAG bundle) that writes JSONL into $FINETUNE_DATA_DIR.",
        ),
        "dataset_file": Param(
            D.get("dataset_file", "argilla.jsonl"),
            type="string",
            pattern=DATASET_FILE,
            description="The file the data script writes, trained on (a .jsonl file name).",
        ),
        "config": Param(
            CONFIGS.default,
            type="string",
            enum=CONFIGS.names,
            description="Experiment config (YAML, of the DAG bundle) of the sweep.",
        ),
        "ranks": Param(
            [4, 6, 8, 10, 12, 16, 20, 24, 32, 64],
            type="array",
            items={"type": "integer", "minimum": 1, "maximum": 512},
            minItems=1,
            description="LoRA ranks to sweep: one GPU pod each.",
        ),
        "max_steps": Param(
            D.get("max_steps", -1),
            type="integer",
            minimum=-1,
            **{"not": {"const": 0}},
            description="Cap the training steps (-1: the config's epochs; 0 is refused: it trains nothing).",
        ),
        "gpus": Param(
            D.get("gpus", 1), type="integer", minimum=0, maximum=8, description="GPUs per sweep pod."
        ),
        "tensor_parallel_size": tensor_parallel_param(),
        "full_param_gpus": Param(
            0,
            type="integer",
            minimum=0,
            maximum=64,
            description="Also run a full-parameter fine-tune on this many GPUs (0: skip).",
        ),
        "deploy": Param(True, type="boolean", description="Serve the best model with vLLM and chat with it."),
        "inference_only": Param(
            False,
            type="boolean",
            description="Train nothing: serve the already trained model at serve_model_uri and chat with it.",
        ),
        "serve_model_uri": Param(
            "",
            type="string",
            description="inference_only: the s3:// prefix of a complete trained (merged) model in the "
            "bucket, e.g. a sweep's .../checkpoint-final-merged.",
        ),
        "run_name": Param(
            "",
            type="string",
            description="Names the sweep's checkpoint prefixes; the same name again resumes and skips "
            "finished ranks (empty: the DAG run id).",
        ),
        "question": Param(
            "What is the capital of France?", type="string", description="Asked after deployment."
        ),
        "keep_serving": Param(
            bool(D.get("keep_serving", True)),
            type="boolean",
            description="Leave the vLLM server running after the run (stop it with "
            "UndeployVLLMOperator); off: stop_serving removes it when the run ends.",
        ),
    },
    max_active_tasks=4,
) as dag:

    @task
    def preflight(params: dict, dag_run=None, dag=None) -> list[int]:
        """Everything that can fail before the first upload: the conf's keys, the model id, the data
        script, the dataset name and the config with the run's overrides for every rank (and for the
        full-parameter run when asked). Returns the ranks to sweep."""
        from airflow_provider_finetune.preflight import (
            check_conf_keys,
            check_configs,
            check_model_id,
            check_serving,
            max_steps_overrides,
        )

        check_conf_keys(dag_run.conf if dag_run else None, dag.params if dag else params)
        if params["inference_only"]:
            from airflow_provider_finetune.preflight import check_model

            check_serving(True, params["gpus"], params["tensor_parallel_size"])
            check_model(params["serve_model_uri"], settings.get("bucket_conn_id"), "serve_model_uri")
            print(f"preflight passed: inference only, serving {params['serve_model_uri']}")
            return []
        check_model_id(params["model_id"], LOCAL_MODEL_DIR)
        local_config = Path(params["model_id"]) / "config.json"  # the heads, when the model is at hand
        heads = (
            json.loads(local_config.read_text()).get("num_attention_heads")
            if local_config.is_file()
            else None
        )
        check_serving(params["deploy"], params["gpus"], params["tensor_parallel_size"], attention_heads=heads)
        DATA_SCRIPTS.path(params["data_script"])
        config = CONFIGS.path(params["config"])
        overrides = max_steps_overrides(params["max_steps"])
        datasets = [f"{DATA_PREFIX}/{params['dataset_file']}"]
        common = {"config": config, "base_model": MODEL_URI, "datasets": datasets, "trust": TRUST}
        swept = check_configs(overrides=overrides, ranks=params["ranks"], **common)
        if int(params["full_param_gpus"]) > 0:
            check_configs(overrides=overrides + FULL_PARAM_OVERRIDES, ranks=[None], **common)
        print(
            f"preflight passed: model {params['model_id']}, data script {params['data_script']}, config "
            f"{params['config']} validates for ranks {swept}"
        )
        return swept

    swept = preflight()

    @task.short_circuit(ignore_downstream_trigger_rules=True)
    def want_training(params: dict) -> bool:
        """inference_only skips every training task (and the serving of a trained result)."""
        return not params["inference_only"]

    training = want_training()
    swept >> training
    model = HFModelToBucketOperator(
        task_id="deliver_model",
        model_id="{{ params.model_id }}",
        destination=MODEL_URI,
        exclude_patterns=["original/*"],
    )
    data = DataScriptToBucketOperator(
        task_id="deliver_data",
        script_file="{{ " + json.dumps(DATA_SCRIPTS.files) + "[params.data_script] }}",
        destination=DATA_PREFIX,
        outlets=[TUTORIAL_DATA],
    )
    training >> [model, data]
    config = "{{ " + json.dumps(CONFIGS.files) + "[params.config] }}"
    # -1 keeps the config's own schedule
    overrides = ["{{ 'training_args.max_steps=' ~ params.max_steps if params.max_steps > 0 else '' }}"]
    datasets = [DATA_PREFIX + "/{{ params.dataset_file }}"]
    sweep = FinetuneKubernetesOperator.partial(
        task_id="sweep",
        config=config,
        overrides=overrides,
        base_model=MODEL_URI,
        datasets=datasets,
        experiment="tutorial",
        run_name="{{ params.run_name or run_id }}",
        gpus="{{ params.gpus }}",
        max_active_tis_per_dagrun=int(D.get("parallel_ranks", 8)),
    ).expand(lora_rank=swept)

    @task(trigger_rule="all_done")
    def pick_best(results: list[dict | None], swept: list[int]) -> dict:
        """Lowest eval loss wins; ties go to the smaller rank; failed ranks are reported and skipped."""
        from airflow_provider_finetune.selection import pick_best

        best, summary = pick_best(results, swept)
        print(summary)
        return best

    best = pick_best(sweep.output, swept)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def want_full_param(params: dict) -> bool:
        return int(params["full_param_gpus"]) > 0

    full_param = FinetuneKubernetesOperator(
        task_id="full_param",
        config=config,
        # the whole peft section (LoRA keys do not apply), and the model under checkpoint-final (the sweep's
        # config names its adapter output checkpoint-final-adapter, as the Silogen chart does)
        overrides=overrides + FULL_PARAM_OVERRIDES,
        base_model=MODEL_URI,
        datasets=datasets,
        experiment="tutorial-full",
        run_name="{{ params.run_name or run_id }}",
        gpus="{{ params.full_param_gpus }}",
    )
    [model, data] >> want_full_param() >> full_param

    merged = MergeAdapterOperator(
        task_id="merge_best",
        base=MODEL_URI,
        adapter="{{ ti.xcom_pull(task_ids='pick_best')['final_adapter_uri'] }}",
        output_uri="{{ ti.xcom_pull(task_ids='pick_best')['checkpoint_uri'] }}/checkpoint-final-merged",
    )

    @task.short_circuit
    def want_deploy(params: dict) -> bool:
        return bool(params["deploy"])

    def serve(task_id: str, model_uri: str) -> DeployVLLMOperator:
        """The tutorial's vLLM server, kept running until chat has asked (stop_serving removes it at
        the end unless keep_serving)."""
        return DeployVLLMOperator(
            task_id=task_id,
            model_uri=model_uri,
            served_model_name="tutorial",
            gpus="{{ params.gpus }}",
            tensor_parallel_size="{{ params.tensor_parallel_size }}",
            keep_running=True,
            smoke_question="{{ params.question }}",
        )

    deploy = serve(
        "deploy", "{{ ti.xcom_pull(task_ids='pick_best')['checkpoint_uri'] }}/checkpoint-final-merged"
    )

    @task
    def chat(served: dict, params: dict) -> str:
        """Ask the live server the question through its OpenAI API, as a user would."""
        from airflow_provider_finetune.operators.deploy import chat_once

        reply = chat_once(
            served["endpoint"].removesuffix("/v1"), served["model"], params["question"], timeout=300
        ).strip()
        print(f"user: {params['question']}\nassistant: {reply}")
        print(f"endpoint: {served['endpoint']} (model {served['model']})")
        return reply

    @task
    def stop_serving(params: dict) -> bool:
        from airflow_provider_finetune.operators.deploy import undeploy

        if params["keep_serving"]:
            print("keep_serving: the vLLM server keeps running")
            return False
        return undeploy("tutorial")  # the function UndeployVLLMOperator runs, not an operator in a task

    [model, data] >> sweep
    best >> merged >> want_deploy() >> deploy
    chat(deploy.output) >> stop_serving().as_teardown(setups=deploy)

    # inference_only: serve a model trained before, without training
    @task.short_circuit
    def want_inference_only(params: dict) -> bool:
        return bool(params["inference_only"])

    serve_trained = serve("serve_trained", "{{ params.serve_model_uri }}")
    swept >> want_inference_only() >> serve_trained
    chat_trained = chat.override(task_id="chat_trained")(serve_trained.output)
    chat_trained >> stop_serving.override(task_id="stop_serving_trained")().as_teardown(setups=serve_trained)
