"""The DAGs under a real `airflow standalone` (scheduler, DAG processor, API server and UI,
triggerer; SQLite, LocalExecutor), driven the way users drive it: the REST API, asset events, and
the trigger form in headless Chromium. Tasks run on the local runner against the embedded S3
server, with a real MLflow server and real training steps of the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_engine.storage import is_complete, list_children, list_objects
from tests.airflow_compat import DAGBAG_IMPORT
from tests.airflow_env import EAGER_VLLM, VLLM_PY, AirflowStandalone

ROOT = Path(__file__).resolve().parents[2]
ENGINE = Path(sys.executable).parent / "finetune-engine"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MODEL = "s3://finetune/models/tutorial/base"
DATASET = "s3://finetune/datasets/tutorial/tiny-chat.jsonl"

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, tiny_model_dir, mlflow_server):
    root = tmp_path_factory.mktemp("standalone")
    tiny = {"config": "engine/configs/tiny-sft-lora.yaml", "gpus": 0, "keep_serving": False}
    dag_defaults = {  # [finetune] dag_defaults: the shipped DAGs on the tiny model and the CPU
        "finetune_ui": {
            "model_uri": MODEL,
            "dataset_uri": DATASET,
            "sft_config": tiny["config"],
            "gpus": 0,
            "keep_serving": False,
        },
        "finetune_retraining": {**tiny, "base_model": MODEL, "max_steps": 8, "deploy": VLLM_PY.exists()},
    }
    env = {
        "AIRFLOW__FINETUNE__DAG_DEFAULTS": json.dumps(dag_defaults),
        "AIRFLOW__FINETUNE__VLLM_PYTHON": str(VLLM_PY),
        "AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS": json.dumps(EAGER_VLLM),
        "AIRFLOW__FINETUNE__MLFLOW_TRACKING_URI": mlflow_server,
    }
    sa = AirflowStandalone(root, ROOT / "dags", env)
    sa.env.pop("DISABLE_MLFLOW_INTEGRATION", None)
    bucket = {**os.environ, **sa.bucket_env(), "HF_HUB_OFFLINE": "1"}
    # what the tutorial DAG leaves in the bucket: the base model and a dataset
    subprocess.run(
        [str(ENGINE), "deliver-model", str(tiny_model_dir), MODEL],
        env=bucket,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(ENGINE), "deliver-data", "s3://finetune/datasets/tutorial"],
        check=True,
        capture_output=True,
        env={**bucket, "FINETUNE_DATA_SCRIPT": (ROOT / "examples" / "tiny_data_script.py").read_text()},
    )
    try:
        sa.start()
        for dag_id in ("finetune_ui", "finetune_retraining", "finetune_retraining_data"):
            sa.wait_dag(dag_id)
        yield sa
    finally:
        sa.close()


@pytest.fixture()
def bucket(airflow, monkeypatch):
    for key, value in airflow.bucket_env().items():
        monkeypatch.setenv(key, value)


def trigger(airflow, dag_id: str, conf: dict):
    return airflow.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})


KPO_DAG = """
from airflow.sdk import dag
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

@dag(schedule=None)
def plain_kpo():
    KubernetesPodOperator(task_id="t", image="busybox", cmds=["true"])

plain_kpo()
"""


def test_dag_files_parse_fast_without_torch(tmp_path):
    # Our operators are KubernetesPodOperators, so a DAG of ours costs at least what a plain KPO DAG
    # costs to parse (airflow + the kubernetes clients). Measured in one process: parse a plain KPO
    # DAG first, then ours; what ours adds (CPU time, so a busy machine does not skew it) must stay
    # small, and no heavy training library may be imported by parsing.
    baseline = tmp_path / "plain_kpo.py"
    baseline.write_text(KPO_DAG)
    code = (
        "import sys, time\n"
        + DAGBAG_IMPORT
        + "t = time.process_time(); base = DagBag(sys.argv[1]); t_base = time.process_time() - t\n"
        "t = time.process_time(); bag = DagBag(sys.argv[2]); dt = time.process_time() - t\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'trl', 'mlflow', 'pandas') "
        "if m in sys.modules)\n"
        "import json; print(json.dumps({'errors': "
        "{k: str(v) for k, v in {**base.import_errors, **bag.import_errors}.items()}, "
        "'dags': sorted(bag.dags), 'heavy': heavy, 'baseline': t_base, 'seconds': dt}))"
    )
    for path in sorted((ROOT / "dags").glob("*.py")):
        out = subprocess.run(
            [sys.executable, "-c", code, str(baseline), str(path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
        ).stdout
        report = json.loads(out.strip().splitlines()[-1])
        assert report["errors"] == {}, path
        assert report["dags"], f"{path.name} defines no DAG"
        assert report["heavy"] == [], f"parsing {path.name} imported {report['heavy']}"
        assert report["seconds"] < 0.5, (
            f"{path.name} took {report['seconds']:.2f}s CPU to parse on top of a plain "
            f"KubernetesPodOperator DAG (which took {report['baseline']:.2f}s)"
        )


def test_rest_refuses_invalid_params_and_creates_no_run(airflow):
    before = airflow.api("GET", "dags/finetune_ui/dagRuns").json()["total_entries"]
    bad = [
        ({"lora_ranks": [0]}, "lora_ranks"),
        ({"lora_ranks": []}, "lora_ranks"),
        ({"learning_rate": 5}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"method": "ppo"}, "method"),
        ({"epochs": 0}, "epochs"),
        ({"gpus": 9}, "gpus"),
        ({"dataset_uri": "http://example.org/d.jsonl"}, "dataset_uri"),
        ({"model_uri": "/etc/passwd"}, "model_uri"),
        ({"deploy": "yes"}, "deploy"),
    ]
    for conf, key in bad + [({"max_steps": 0}, "max_steps")]:
        r = trigger(airflow, "finetune_ui", conf)
        assert r.status_code == 400, (conf, r.status_code, r.text)
        assert key in r.json()["detail"], (conf, r.text)
    assert airflow.api("GET", "dags/finetune_ui/dagRuns").json()["total_entries"] == before
    # the retraining DAGs: files by name only, URIs in the bucket, no step-less run
    retraining = {
        "finetune_retraining": [
            ({"initial_config": "/proc/self/environ"}, "initial_config"),
            ({"initial_config": "run_conf: {tokenizer: x/y}"}, "initial_config"),
            ({"train_data": "s3://another-bucket/train.jsonl"}, "train_data"),
            ({"max_steps": 0}, "max_steps"),
        ],
        "finetune_retraining_data": [({"data_script": "/opt/airflow/airflow.cfg"}, "data_script")],
    }
    for dag_id, cases in retraining.items():
        runs = airflow.api("GET", f"dags/{dag_id}/dagRuns").json()["total_entries"]
        for conf, key in cases:
            r = trigger(airflow, dag_id, conf)
            assert r.status_code == 400 and key in r.json()["detail"], (dag_id, conf, r.text)
        assert airflow.api("GET", f"dags/{dag_id}/dagRuns").json()["total_entries"] == runs


def test_rest_trigger_with_conf_sweeps_and_picks_the_best(airflow, bucket):
    r = trigger(airflow, "finetune_ui", {"lora_ranks": [4, 8], "max_steps": 6, "learning_rate": 0.003})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    run = airflow.wait_run("finetune_ui", run_id)
    states = airflow.task_states("finetune_ui", run_id)
    assert run["state"] == "success", (states, airflow.tail())
    assert states["sweep"] == ["success", "success"] and states["deploy"] == ["skipped"]
    results = [airflow.xcom("finetune_ui", run_id, "sweep", i) for i in (0, 1)]
    assert sorted(r["lora_rank"] for r in results) == [4, 8]
    assert all(r["global_step"] == 6 for r in results)
    best = airflow.xcom("finetune_ui", run_id, "pick_best")
    assert best["final_eval_loss"] == min(r["final_eval_loss"] for r in results)
    assert is_complete(best["final_checkpoint_uri"])
    # the rendered rows read r=4, r=8 in the grid
    tis = airflow.api(
        "GET", f"dags/finetune_ui/dagRuns/{run_id}/taskInstances", params={"task_id_pattern": "sweep"}
    ).json()
    assert sorted(
        ti.get("rendered_map_index") for ti in tis["task_instances"] if ti["task_id"] == "sweep"
    ) == ["r=4", "r=8"]


def test_bad_inputs_fail_in_preflight_before_any_training(airflow, bucket):
    cases = {
        "missing dataset": ({"dataset_uri": "s3://finetune/datasets/tutorial/nope.jsonl"}, "no such object"),
        "incomplete model": ({"model_uri": "s3://finetune/models/never-delivered"}, "no complete model"),
        "typo in conf": ({"lora_rank": [4]}, "did you mean 'lora_ranks'"),
    }
    for name, (conf, message) in cases.items():
        r = trigger(airflow, "finetune_ui", conf)
        assert r.status_code == 200, r.text
        run_id = r.json()["dag_run_id"]
        run = airflow.wait_run("finetune_ui", run_id, timeout=180)
        states = airflow.task_states("finetune_ui", run_id)
        assert run["state"] == "failed", name
        assert states["preflight"] == ["failed"], (name, states)
        assert "sweep" not in states or set(states["sweep"]) <= {"upstream_failed", None}, (name, states)
        log = airflow.task_log("finetune_ui", run_id, "preflight")
        assert message in log, (name, log[-3000:])
        # the preflight failure is not retried, and nothing was written under the run's experiment
        assert (
            len(
                airflow.api("GET", f"dags/finetune_ui/dagRuns/{run_id}/taskInstances/preflight/tries").json()[
                    "task_instances"
                ]
            )
            == 1
        )


@pytest.mark.browser
def test_trigger_form_in_a_real_browser(airflow, bucket):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (scripts/setup-browser.sh installs Debian's package as root)")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    before = {
        r["dag_run_id"]
        for r in airflow.api("GET", "dags/finetune_ui/dagRuns", params={"limit": 100}).json()["dag_runs"]
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(f"{airflow.url}/", wait_until="networkidle")
        page.locator("input[name=username]").fill("admin")
        page.locator("input[name=password]").fill(airflow.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda u: "/login" not in u, timeout=30_000)
        page.goto(f"{airflow.url}/dags/finetune_ui", wait_until="networkidle")
        page.get_by_role("button", name="Trigger Dag").first.click()
        dialog = page.get_by_role("dialog")

        def open_section(name: str) -> None:  # the form's sections are an accordion, one open at a time
            header = dialog.get_by_role("button", name=name, exact=True)
            if header.get_attribute("aria-expanded") != "true":
                header.click()

        open_section("Model and data")
        model = dialog.locator("#element_model_uri")
        model.wait_for()
        assert model.input_value() == MODEL  # the Param default, from the DAG file
        assert dialog.get_by_text(re.compile(r"^Dataset")).first.is_visible()
        open_section("Resources and serving")
        dialog.locator("[name=element_gpus]").wait_for()
        assert dialog.locator("[name=element_gpus]").input_value() == "0"
        open_section("Training")
        dialog.locator("[name=element_max_steps]").wait_for()
        for label in ("Method", "LoRA ranks", "Learning rate", "Epochs"):
            assert dialog.get_by_text(re.compile(f"^{label}")).first.is_visible(), label
        dialog.locator("[name=element_max_steps]").fill("5")
        dialog.locator("[name=element_epochs]").fill("2")
        editor = dialog.locator(".monaco-editor:visible").first  # LoRA ranks: a JSON editor
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("4")  # replaces the selection (a bracket would wrap it)
        page.keyboard.press("Home")
        page.keyboard.type("[")  # "[4": not JSON
        trigger_button = dialog.get_by_role("button", name="Trigger").last
        expect(trigger_button).to_be_disabled()  # the form refuses it before anything is sent
        page.keyboard.press("End")
        page.keyboard.type("]")  # "[4]"
        dialog.get_by_text(re.compile("^Learning rate")).first.click()  # blur: the form stores the values
        page.screenshot(path=str(ARTIFACTS / "finetune_ui-trigger-form.png"), full_page=True)
        expect(trigger_button).to_be_enabled()
        trigger_button.click()
        deadline = time.monotonic() + 60
        new = set()
        while time.monotonic() < deadline and not new:
            runs = airflow.api("GET", "dags/finetune_ui/dagRuns", params={"limit": 100}).json()["dag_runs"]
            new = {r["dag_run_id"] for r in runs} - before
            time.sleep(1)
        browser.close()
    assert len(new) == 1, "the form did not create a run"
    [run_id] = new
    run = airflow.wait_run("finetune_ui", run_id)
    assert (
        run["conf"]["max_steps"] == 5 and run["conf"]["epochs"] == 2 and run["conf"]["lora_ranks"] == [4]
    ), run["conf"]
    assert run["state"] == "success", airflow.task_states("finetune_ui", run_id)
    assert airflow.xcom("finetune_ui", run_id, "pick_best")["global_step"] == 5
    assert (ARTIFACTS / "finetune_ui-trigger-form.png").stat().st_size > 10_000


def _deliver_retrain_data(airflow) -> None:
    env = {
        **os.environ,
        **airflow.bucket_env(),
        "FINETUNE_DATA_SCRIPT": (ROOT / "examples" / "retrain_data_script.py").read_text(),
    }
    subprocess.run(
        [str(ENGINE), "deliver-data", "s3://finetune/datasets/retrain"],
        env=env,
        check=True,
        capture_output=True,
    )


def _asset_triggered_run(airflow, before: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = airflow.api("GET", "dags/finetune_retraining/dagRuns", params={"limit": 100}).json()[
            "dag_runs"
        ]
        new = [r for r in runs if r["dag_run_id"] not in before]
        if new:
            assert new[0]["run_type"] == "asset_triggered", new[0]
            return new[0]["dag_run_id"]
        time.sleep(2)
    raise TimeoutError(f"no asset-triggered run of finetune_retraining within {timeout}s:\n{airflow.tail()}")


def test_retraining_on_asset_events_records_champion_challenger_decisions(airflow, bucket, mlflow_server):
    import requests

    [asset] = airflow.api("GET", "assets", params={"name_pattern": "finetune_retrain_data"}).json()["assets"]
    [champion_asset] = airflow.api("GET", "assets", params={"name_pattern": "finetune_champion"}).json()[
        "assets"
    ]
    decisions = []
    for round_ in (1, 2):
        _deliver_retrain_data(airflow)
        before = {
            r["dag_run_id"] for r in airflow.api("GET", "dags/finetune_retraining/dagRuns").json()["dag_runs"]
        }
        r = airflow.api("POST", "assets/events", json={"asset_id": asset["id"], "extra": {"round": round_}})
        assert r.status_code == 200, r.text
        run_id = _asset_triggered_run(airflow, before)
        run = airflow.wait_run("finetune_retraining", run_id, timeout=900)
        states = airflow.task_states("finetune_retraining", run_id)
        assert run["state"] == "success", (states, airflow.tail())
        scores = airflow.xcom("finetune_retraining", run_id, "evaluate")
        decision = airflow.xcom("finetune_retraining", run_id, "decide")
        challenger = airflow.xcom("finetune_retraining", run_id, "challenger")
        by_uri = {s["model_uri"]: s["eval_loss"] for s in scores["models"]}
        assert decision["challenger_uri"] == challenger["final_checkpoint_uri"]
        if round_ == 1:  # a new line: one model scored, promoted
            assert list(by_uri) == [challenger["final_checkpoint_uri"]]
            assert decision["promoted"] is True and decision["champion_uri"] is None
        else:  # both scored on the same held-out set; promoted exactly when better
            assert decision["champion_uri"] == decisions[0]["model_uri"] and len(by_uri) == 2
            assert decision["promoted"] == (
                by_uri[decision["challenger_uri"]] < by_uri[decision["champion_uri"]]
            )
            assert scores["models"][0]["tokens"] == scores["models"][1]["tokens"]  # the same held-out tokens
        expected_deploy = "success" if decision["promoted"] and VLLM_PY.exists() else "skipped"
        assert states["deploy"] == [expected_deploy], states
        assert states["preflight"] == ["success"], states
        if expected_deploy == "success":  # served under this DAG's name for the line
            assert (
                airflow.xcom("finetune_retraining", run_id, "deploy")["model"]
                == "finetune-retraining-default"
            )
        # recorded: in the bucket, on the MLflow run, as the champion asset's event extra
        objects = list_objects("s3://finetune/champions/default/decisions")
        assert any(run_id.replace(":", "-").replace("+", "-") in k for k in objects), objects
        tags = (
            requests.get(
                f"{mlflow_server}/api/2.0/mlflow/runs/get",
                params={"run_id": challenger["mlflow_run_id"]},
                timeout=30,
            )
            .json()["run"]["data"]
            .get("tags", [])
        )
        assert {
            "key": "finetune.decision",
            "value": "promoted" if decision["promoted"] else "rejected",
        } in tags
        events = airflow.api(
            "GET", "assets/events", params={"asset_id": champion_asset["id"], "order_by": "-timestamp"}
        ).json()
        assert events["asset_events"][0]["extra"]["challenger_uri"] == decision["challenger_uri"]
        assert events["asset_events"][0]["extra"]["promoted"] == decision["promoted"]
        decisions.append(decision)
    champion = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from finetune_engine.storage import make_client; "
                "print(make_client().get_object(Bucket='finetune', "
                "Key='champions/default/champion.json')['Body'].read().decode())",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **airflow.bucket_env()},
        ).stdout
    )
    latest = decisions[-1]["model_uri"]
    assert champion["model_uri"] == latest and "data_conf" in champion["config"]
    # the line's held-out set is pinned in its record (the DAG's setting, not a param)
    assert champion["heldout_data"] == "s3://finetune/datasets/retrain/heldout.jsonl"
    assert len(list_children("s3://finetune/experiments")) >= 1
