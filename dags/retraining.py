"""Scheduled retraining: a challenger is trained from the champion's config whenever new data lands
(or weekly), both are scored on the same held-out set, and the challenger is promoted (deployed)
only if it is better.

Two DAGs share the ``finetune_retrain_data`` asset:

* ``finetune_retraining_data`` runs the data script and uploads ``train.jsonl`` and
  ``heldout.jsonl`` (validated) to ``s3://<bucket>/datasets/retrain/``; its task emits the asset.
  Any other producer can do the same: ``POST /api/v2/assets/events`` with the asset's id.
* ``finetune_retraining`` runs on that asset event or every Monday 04:00 UTC, whichever comes
  first: champion -> challenger fine-tune -> evaluate both on the held-out file -> decide ->
  deploy when promoted. The decision is written to the bucket
  (``champions/<line>/decisions/<run>.json``, and ``champion.json`` when promoted), tagged on the
  challenger's MLflow run, and carried as the extra of the ``finetune_champion`` asset event.

The first run of a line has no champion: its challenger is promoted. Later challengers start from
the champion's config (the experiment YAML stored in ``champion.json``), on the newest data.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from airflow_provider_finetune import settings
from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    DeployVLLMOperator,
    EvaluateModelsOperator,
    FinetuneKubernetesOperator,
)

ROOT = Path(__file__).resolve().parent.parent
BUCKET = settings.get("bucket")  # [finetune] bucket
DATA_PREFIX = f"s3://{BUCKET}/datasets/retrain"
RETRAIN_DATA = Asset(name="finetune_retrain_data", uri=DATA_PREFIX)
CHAMPION = Asset(name="finetune_champion", uri=f"s3://{BUCKET}/champions")
WEEKLY = CronTriggerTimetable("0 4 * * 1", timezone="UTC")
# [finetune] dag_defaults may replace these defaults (the suite: the tiny model on the CPU)
DATA_DEFAULTS = settings.dag_defaults("finetune_retraining_data", known=("data_script",))
D = settings.dag_defaults(
    "finetune_retraining",
    known=("base_model", "config", "max_steps", "gpus", "deploy", "keep_serving"),
)

with DAG(
    dag_id="finetune_retraining_data",
    schedule=None,
    catchup=False,
    tags=["finetune", "retraining"],
    doc_md="Deliver fresh training data and a fixed held-out set; emits `finetune_retrain_data`.",
    params={
        "data_script": Param(
            str(ROOT / DATA_DEFAULTS.get("data_script", "examples/retrain_data_script.py")),
            type="string",
            description="Writes train.jsonl and heldout.jsonl into $FINETUNE_DATA_DIR.",
        ),
    },
):
    DataScriptToBucketOperator(
        task_id="deliver_data",
        script_file="{{ params.data_script }}",
        destination=DATA_PREFIX,
        outlets=[RETRAIN_DATA],
    )


with DAG(
    dag_id="finetune_retraining",
    schedule=AssetOrTimeSchedule(timetable=WEEKLY, assets=RETRAIN_DATA),
    catchup=False,
    max_active_runs=1,  # one challenger at a time: the champion record is read and written by one run
    tags=["finetune", "retraining"],
    doc_md=__doc__,
    params={
        "line": Param(
            "default",
            type="string",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
            description="Model line: names the champion record (champions/<line>/).",
        ),
        "base_model": Param(
            D.get("base_model", f"s3://{BUCKET}/models/tutorial/base"),
            type="string",
            pattern=r"^s3://",
            description="Base model prefix the challenger is trained from.",
        ),
        "train_data": Param(
            f"{DATA_PREFIX}/train.jsonl",
            type="string",
            pattern=r"^s3://",
            description="Training data of the challenger.",
        ),
        "heldout_data": Param(
            f"{DATA_PREFIX}/heldout.jsonl",
            type="string",
            pattern=r"^s3://",
            description="Held-out data both models are scored on; never trained on.",
        ),
        "initial_config": Param(
            str(ROOT / D.get("config", "engine/configs/tutorial-01-finetune-lora.yaml")),
            type="string",
            description="Experiment config of the first challenger (no champion yet).",
        ),
        "max_steps": Param(
            int(D.get("max_steps", -1)),
            type="integer",
            minimum=-1,
            description="Cap the challenger's training steps (-1: the config's epochs).",
        ),
        "min_improvement": Param(
            0.0,
            type="number",
            minimum=0,
            description="Promote only when the held-out loss drops by more than this.",
        ),
        "gpus": Param(int(D.get("gpus", 1)), type="integer", minimum=0, maximum=8),
        "deploy": Param(
            bool(D.get("deploy", True)),
            type="boolean",
            description="Serve a promoted champion with vLLM.",
        ),
    },
) as dag:

    @task
    def champion(params: dict) -> dict:
        """The current champion (model URI, config) or, for a new line, the initial config."""
        from airflow_provider_finetune import settings
        from airflow_provider_finetune.champion import ChampionStore

        store = ChampionStore(settings.get("bucket"), params["line"], settings.get("bucket_conn_id"))
        record = store.read()
        if record is None:
            path = Path(params["initial_config"])
            if not path.is_file():
                raise FileNotFoundError(f"initial_config {path} not found (param initial_config)")
            print(
                f"line {params['line']!r} has no champion yet "
                f"({store.uri}): the challenger starts from {path}"
            )
            return {"model_uri": "", "config": path.read_text(encoding="utf-8"), "eval_loss": None}
        print(
            f"champion of {params['line']!r}: {record['model_uri']} (held-out loss "
            f"{record.get('eval_loss')}, promoted {record.get('promoted_at')})"
        )
        return record

    current = champion()
    challenger = FinetuneKubernetesOperator(
        task_id="challenger",
        config="{{ ti.xcom_pull(task_ids='champion')['config'] }}",
        overrides=["{{ 'training_args.max_steps=' ~ params.max_steps if params.max_steps >= 0 else '' }}"],
        base_model="{{ params.base_model }}",
        datasets=["{{ params.train_data }}"],
        experiment="retraining-{{ params.line }}",
        gpus="{{ params.gpus }}",
    )
    evaluate = EvaluateModelsOperator(
        task_id="evaluate",
        models=[
            "{{ ti.xcom_pull(task_ids='challenger')['final_checkpoint_uri'] }}",
            "{{ ti.xcom_pull(task_ids='champion')['model_uri'] }}",
        ],
        datasets=["{{ params.heldout_data }}"],
    )

    @task(outlets=[CHAMPION])
    def decide(
        current: dict, trained: dict, scores: dict, params: dict, run_id: str, outlet_events=None
    ) -> dict:
        from airflow_provider_finetune import settings
        from airflow_provider_finetune.champion import ChampionStore, decide, tag_mlflow_run

        store = ChampionStore(settings.get("bucket"), params["line"], settings.get("bucket_conn_id"))
        verdict = decide(
            scores["models"],
            trained["final_checkpoint_uri"],
            current.get("model_uri") or None,
            float(params["min_improvement"]),
        )
        record = {
            "model_uri": trained["final_checkpoint_uri"],
            "config": current["config"],
            "mlflow_run_id": trained.get("mlflow_run_id"),
            "checkpoint_uri": trained.get("checkpoint_uri"),
            "heldout_data": params["heldout_data"],
            "previous_champion": current.get("model_uri") or None,
        }
        where = store.record(run_id, verdict, record)
        tagged = tag_mlflow_run(
            trained.get("mlflow_tracking_uri") or settings.get("mlflow_tracking_uri"),
            trained.get("mlflow_run_id"),
            {
                "finetune.decision": "promoted" if verdict.promoted else "rejected",
                "finetune.decision_reason": verdict.reason,
                "finetune.champion_loss": verdict.champion_loss,
                "finetune.challenger_loss": verdict.challenger_loss,
            },
        )
        out = {
            **verdict.as_dict(),
            "line": params["line"],
            "decision_uri": where,
            "mlflow_tagged": tagged,
            "model_uri": trained["final_checkpoint_uri"] if verdict.promoted else current.get("model_uri"),
        }
        outlet_events[CHAMPION].extra = out
        print(
            f"decision: {'PROMOTED' if verdict.promoted else 'kept the champion'} "
            f"— {verdict.reason} (recorded at {where})"
        )
        return out

    decision = decide(current, challenger.output, evaluate.output)

    @task.short_circuit
    def promoted(decision: dict, params: dict) -> bool:
        return bool(decision["promoted"]) and bool(params["deploy"])

    deploy = DeployVLLMOperator(
        task_id="deploy",
        model_uri="{{ ti.xcom_pull(task_ids='decide')['model_uri'] }}",
        served_model_name="{{ params.line }}",
        gpus="{{ params.gpus }}",
        keep_running=bool(D.get("keep_serving", True)),
    )
    current >> challenger >> evaluate
    promoted(decision) >> deploy
