"""Scheduled retraining: a challenger is trained from the champion's config whenever new data lands
(or weekly), both are scored on the same held-out set, and the challenger is promoted (deployed)
only if it is better.

Two DAGs share the ``finetune_retrain_data`` asset:

* ``finetune_retraining_data`` runs the data script and uploads ``train.jsonl`` and
  ``heldout.jsonl`` (validated) to ``s3://<bucket>/datasets/retrain/``; its task emits the asset.
  Any other producer can do the same: ``POST /api/v2/assets/events`` with the asset's id.
* ``finetune_retraining`` runs on that asset event and every Monday 04:00 UTC: preflight
  (champion record, config, data) -> new data? (a scheduled run whose training data has the content
  the champion was trained on, by sha256, is skipped: green, with the reason in its log; a manual run
  always trains) -> challenger fine-tune -> evaluate both on the
  held-out file -> decide -> deploy when promoted. The decision is written to the bucket
  (``champions/<line>/decisions/<run>.json``, and ``champion.json`` when promoted), tagged on the
  challenger's MLflow run, and carried as the extra of the ``finetune_champion`` asset event.

The first run of a line has no champion: its challenger is promoted. Later challengers start from
the champion's config (the experiment YAML stored in ``champion.json``), on the newest data.

The promotion gate is the DAG's, not a run's: the held-out set (``heldout_data``) and the margin a
challenger must gain (``min_improvement``) are ``[finetune] dag_defaults`` settings. A line's first
champion pins its held-out set in ``champion.json``; a challenger scored on another set is refused in
preflight, before any training. A promoted line is served as ``finetune-retraining-<line>``, so no
line of this DAG can replace another DAG's server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from airflow.sdk import DAG, Asset, Param, task

from airflow_provider_finetune import settings
from airflow_provider_finetune.compat import AssetOrTimeSchedule, CronTriggerTimetable
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    DeployVLLMOperator,
    EvaluateModelsOperator,
    FinetuneKubernetesOperator,
)
from airflow_provider_finetune.preflight import (
    SHIPPED_SFT_CONFIGS,
    CodeTrust,
    bundle_choices,
    literal_pattern,
    tensor_parallel_param,
)

ROOT = Path(__file__).resolve().parent.parent  # the DAG bundle: every file a param picks lies under it
DAG_ID = "finetune_retraining"
DATA_DAG_ID = "finetune_retraining_data"
BUCKET = settings.get("bucket")  # [finetune] bucket
DATA_PREFIX = f"s3://{BUCKET}/datasets/retrain"
RETRAIN_DATA = Asset(name="finetune_retrain_data", uri=DATA_PREFIX)
CHAMPION = Asset(name="finetune_champion", uri=f"s3://{BUCKET}/champions")
WEEKLY = CronTriggerTimetable("0 4 * * 1", timezone="UTC")
IN_BUCKET = rf"^s3://{literal_pattern(BUCKET)}/.+"  # the URIs a run may name: objects of the DAGs' own bucket
# [finetune] dag_defaults may replace these defaults (the suite: the tiny model on the CPU), add configs
# and data scripts of the DAG bundle to the choices, and set the promotion gate; a run's conf cannot
DATA_DEFAULTS = settings.dag_defaults(DATA_DAG_ID, known=("data_script", "data_scripts"))
DATA_SCRIPTS = bundle_choices(
    ROOT,
    DATA_DAG_ID,
    DATA_DEFAULTS,
    option="data_script",
    set_key="data_scripts",
    builtin={"retrain": "examples/retrain_data_script.py"},
    default="retrain",
)
D = settings.dag_defaults(
    DAG_ID,
    known=(
        "base_model",
        "config",
        "configs",
        "max_steps",
        "gpus",
        "deploy",
        "keep_serving",
        "heldout_data",
        "min_improvement",
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
TRUST = CodeTrust.from_defaults(DAG_ID, D)
# The promotion gate: settings of the DAG, the same for every run of a line. The held-out set is pinned
# by the line's champion record (a challenger scored on another set is refused).
HELDOUT = str(D.get("heldout_data", f"{DATA_PREFIX}/heldout.jsonl"))
MIN_IMPROVEMENT = D.get("min_improvement", 0.0)
if not re.fullmatch(r"s3://[^/]+/.+\.jsonl", HELDOUT):
    raise FinetuneConfigError(
        f"[finetune] dag_defaults.{DAG_ID}.heldout_data {HELDOUT!r}: give the s3:// URI of a .jsonl file"
    )
if isinstance(MIN_IMPROVEMENT, bool) or not isinstance(MIN_IMPROVEMENT, int | float) or MIN_IMPROVEMENT < 0:
    raise FinetuneConfigError(
        f"[finetune] dag_defaults.{DAG_ID}.min_improvement {MIN_IMPROVEMENT!r}: give a number >= 0 (the "
        "held-out loss a challenger must gain over the champion)"
    )
# the vLLM server of a line: named by this DAG and the line, so no line replaces another DAG's server
SERVED_PREFIX = DAG_ID.replace("_", "-") + "-"

with DAG(
    dag_id=DATA_DAG_ID,
    schedule=None,
    catchup=False,
    tags=["finetune", "retraining"],
    doc_md="Deliver fresh training data and a fixed held-out set; emits `finetune_retrain_data`.",
    params={
        "data_script": Param(
            DATA_SCRIPTS.default,
            type="string",
            enum=DATA_SCRIPTS.names,
            description="Data script (of the DAG bundle) that writes train.jsonl and heldout.jsonl into "
            "$FINETUNE_DATA_DIR.",
        ),
    },
):

    @task
    def preflight(params: dict, dag_run=None, dag=None) -> str:
        """The conf's keys and the data script, before anything runs."""
        from airflow_provider_finetune.preflight import check_conf_keys

        check_conf_keys(dag_run.conf if dag_run else None, dag.params if dag else params)
        return DATA_SCRIPTS.path(params["data_script"])

    preflight() >> DataScriptToBucketOperator(
        task_id="deliver_data",
        script_file="{{ " + json.dumps(DATA_SCRIPTS.files) + "[params.data_script] }}",
        destination=DATA_PREFIX,
        outlets=[RETRAIN_DATA],
    )


with DAG(
    dag_id=DAG_ID,
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
            description="Model line of this DAG: names the champion record (champions/<line>/) and the "
            f"served model ({SERVED_PREFIX}<line>).",
        ),
        "base_model": Param(
            D.get("base_model", f"s3://{BUCKET}/models/tutorial/base"),
            type="string",
            pattern=IN_BUCKET,
            description="Base model prefix (in the bucket) the challenger is trained from.",
        ),
        "train_data": Param(
            f"{DATA_PREFIX}/train.jsonl",
            type="string",
            pattern=IN_BUCKET,
            description="Training data of the challenger (in the bucket).",
        ),
        "initial_config": Param(
            CONFIGS.default,
            type="string",
            enum=CONFIGS.names,
            description="Experiment config (of the DAG bundle) of the first challenger (no champion yet).",
        ),
        "max_steps": Param(
            int(D.get("max_steps", -1)),
            type="integer",
            minimum=-1,
            **{"not": {"const": 0}},
            description="Cap the challenger's training steps (-1: the config's epochs; 0 is refused).",
        ),
        "gpus": Param(int(D.get("gpus", 1)), type="integer", minimum=0, maximum=8),
        "tensor_parallel_size": tensor_parallel_param(),
        "deploy": Param(
            bool(D.get("deploy", True)),
            type="boolean",
            description="Serve a promoted champion with vLLM.",
        ),
    },
) as dag:

    @task
    def preflight(params: dict, dag_run=None, dag=None) -> dict:
        """Everything that can fail before training: the conf's keys, the champion record (or the
        initial config of a new line) and its pinned held-out set, the config with the run's
        overrides, the base model, the training and held-out data. Returns the champion record (model
        URI, config) or, for a new line, the initial config."""
        import tempfile

        from airflow_provider_finetune import settings
        from airflow_provider_finetune.champion import ChampionStore
        from airflow_provider_finetune.preflight import (
            check_conf_keys,
            check_configs,
            check_dataset,
            check_model,
            max_steps_overrides,
        )

        check_conf_keys(dag_run.conf if dag_run else None, dag.params if dag else params)
        conn_id = settings.get("bucket_conn_id")
        store = ChampionStore(settings.get("bucket"), params["line"], conn_id)
        record = store.read()
        store.check_heldout(record, HELDOUT)
        if record is None:
            path = CONFIGS.path(params["initial_config"])
            print(
                f"line {params['line']!r} has no champion yet ({store.uri}): the challenger starts from "
                f"{params['initial_config']} ({path}) and pins the held-out set {HELDOUT}"
            )
            record = {"model_uri": "", "config": Path(path).read_text(encoding="utf-8"), "eval_loss": None}
        else:
            print(
                f"champion of {params['line']!r}: {record['model_uri']} (held-out loss "
                f"{record.get('eval_loss')} on {HELDOUT}, promoted {record.get('promoted_at')})"
            )
            check_model(record["model_uri"], conn_id, param=f"the champion of line {params['line']!r}")
        check_configs(
            config=record["config"],
            overrides=max_steps_overrides(params["max_steps"]),
            ranks=[None],
            base_model=params["base_model"],
            datasets=[params["train_data"]],
            trust=TRUST,
        )
        check_model(params["base_model"], conn_id, param="base_model")
        with tempfile.TemporaryDirectory() as tmp:
            check_dataset(params["train_data"], "sft", conn_id, Path(tmp), param="train_data")
            check_dataset(HELDOUT, "sft", conn_id, Path(tmp) / "heldout", param="heldout_data")
        # the champion record keeps its own train_data_sha256; this run's data is hashed beside it
        return {**record, "new_train_data_sha256": store.data_sha256(params["train_data"])}

    @task.short_circuit
    def new_data(current: dict, params: dict, dag_run=None) -> bool:
        """The asset event and the Monday schedule both start runs: a run whose training data is the
        content the champion was trained on is skipped (green, its tasks marked skipped, the reason in
        this task's log). A manual run always trains."""
        from airflow_provider_finetune import settings
        from airflow_provider_finetune.champion import ChampionStore

        store = ChampionStore(settings.get("bucket"), params["line"], settings.get("bucket_conn_id"))
        champion = current if current.get("model_uri") else None
        reason = store.unchanged_data(champion, params["train_data"], current["new_train_data_sha256"])
        if reason is None:
            print(f"training data {params['train_data']} differs from the champion's: training a challenger")
            return True
        run_type = getattr(dag_run, "run_type", None)
        if getattr(run_type, "value", run_type) == "manual":
            print(f"{reason.removesuffix(', the run is skipped')}; a manual run trains anyway")
            return True
        print(f"SKIPPED: {reason}")
        return False

    current = preflight()
    challenger = FinetuneKubernetesOperator(
        task_id="challenger",
        config="{{ ti.xcom_pull(task_ids='preflight')['config'] }}",
        overrides=["{{ 'training_args.max_steps=' ~ params.max_steps if params.max_steps > 0 else '' }}"],
        base_model="{{ params.base_model }}",
        datasets=["{{ params.train_data }}"],
        experiment="retraining-{{ params.line }}",
        gpus="{{ params.gpus }}",
    )
    evaluate = EvaluateModelsOperator(
        task_id="evaluate",
        models=[
            "{{ ti.xcom_pull(task_ids='challenger')['final_checkpoint_uri'] }}",
            "{{ ti.xcom_pull(task_ids='preflight')['model_uri'] }}",
        ],
        datasets=[HELDOUT],
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
            float(MIN_IMPROVEMENT),
        )
        record = {
            "model_uri": trained["final_checkpoint_uri"],
            "config": current["config"],
            "mlflow_run_id": trained.get("mlflow_run_id"),
            "checkpoint_uri": trained.get("checkpoint_uri"),
            "heldout_data": HELDOUT,
            "train_data": params["train_data"],
            "train_data_sha256": current.get("new_train_data_sha256"),
            "min_improvement": float(MIN_IMPROVEMENT),
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
        served_model_name=SERVED_PREFIX + "{{ params.line }}",
        gpus="{{ params.gpus }}",
        tensor_parallel_size="{{ params.tensor_parallel_size }}",
        keep_running=bool(D.get("keep_serving", True)),
    )
    current >> new_data(current) >> challenger >> evaluate
    promoted(decision) >> deploy
