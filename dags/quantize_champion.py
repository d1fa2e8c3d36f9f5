"""Post-training quantization of a line's champion, then serving the quantized model with vLLM.

    champion (read ``champions/<line>/champion.json``) -> quantize (W8A8 or W4A16, calibrated on a
    sample of the training data) -> deploy (vLLM loads the compressed-tensors checkpoint) -> the smoke
    question's answer is the deploy task's XCom

The quantized model lands beside the champion, ``<champion model URI>-<scheme>``; its
``quantization_record.json`` names the scheme and the calibration sample (file, count, sha256). A
complete output is not quantized again, so a rerun only serves it.
"""

from __future__ import annotations

from airflow.sdk import DAG, Param, task

from airflow_provider_finetune import settings
from airflow_provider_finetune.operators import DeployVLLMOperator, QuantizeModelOperator
from airflow_provider_finetune.preflight import literal_pattern

DAG_ID = "finetune_quantize_champion"
BUCKET = settings.get("bucket")  # [finetune] bucket
IN_BUCKET = rf"^s3://{literal_pattern(BUCKET)}/.+\.jsonl$"
# [finetune] dag_defaults may replace these (the suite: the CPU, a few tuning steps)
D = settings.dag_defaults(
    DAG_ID, known=("calibration_data", "scheme", "samples", "iters", "gpus", "keep_serving", "question")
)
SERVED_PREFIX = "finetune-quantized-"

with DAG(
    dag_id=DAG_ID,
    schedule=None,
    catchup=False,
    tags=["finetune", "quantization"],
    doc_md=__doc__,
    params={
        "line": Param(
            "default",
            type="string",
            pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
            description="Model line whose champion is quantized (champions/<line>/champion.json).",
        ),
        "scheme": Param(
            str(D.get("scheme", "W8A8")),
            enum=["W8A8", "W4A16"],
            description="W8A8: int8 weights and activations. W4A16: int4 weights (groups of 128).",
        ),
        "calibration_data": Param(
            str(D.get("calibration_data", f"s3://{BUCKET}/datasets/retrain/train.jsonl")),
            type="string",
            pattern=IN_BUCKET,
            description="JSONL examples a fixed sample of which calibrates the rounding (the training data).",
        ),
        "question": Param(
            str(D.get("question", "What is the capital of France?")),
            type="string",
            maxLength=500,
            description="Asked of the served quantized model once it is up.",
        ),
    },
) as dag:

    @task
    def champion(params: dict) -> dict:
        """The champion's model URI; a line without a champion fails here, before any pod."""
        from airflow_provider_finetune.champion import ChampionStore
        from airflow_provider_finetune.exceptions import FinetuneConfigError
        from airflow_provider_finetune.preflight import check_model

        conn_id = settings.get("bucket_conn_id")
        store = ChampionStore(settings.get("bucket"), params["line"], conn_id)
        record = store.read()
        if record is None:
            raise FinetuneConfigError(
                f"line {params['line']!r} has no champion ({store.uri}); run finetune_retraining first"
            )
        check_model(record["model_uri"], conn_id, param=f"the champion of line {params['line']!r}")
        print(
            f"champion of {params['line']!r}: {record['model_uri']} (held-out loss {record.get('eval_loss')})"
        )
        return {"model_uri": record["model_uri"]}

    quantize = QuantizeModelOperator(
        task_id="quantize",
        model="{{ ti.xcom_pull(task_ids='champion')['model_uri'] }}",
        scheme="{{ params.scheme }}",
        calibration_data="{{ params.calibration_data }}",
        samples=int(D.get("samples", 128)),
        iters=D.get("iters"),
        gpus=int(D.get("gpus", 1)),
    )
    deploy = DeployVLLMOperator(
        task_id="deploy",
        model_uri="{{ ti.xcom_pull(task_ids='quantize')['quantized_uri'] }}",
        served_model_name=SERVED_PREFIX + "{{ params.line }}",
        gpus=int(D.get("gpus", 1)),
        smoke_question="{{ params.question }}",
        keep_running=bool(D.get("keep_serving", True)),
    )
    champion() >> quantize >> deploy
