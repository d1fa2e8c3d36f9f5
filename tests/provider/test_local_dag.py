"""A real `airflow dags test` of a DAG using each engine operator, on the local runner, against
the embedded S3 server and the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_engine.storage import is_complete, list_children
from tests.airflow_env import AirflowEnv

DAGS = Path(__file__).parent / "dags"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    env = AirflowEnv(tmp_path_factory.mktemp("af"), DAGS)
    yield env
    env.close()


@pytest.mark.slow
def test_every_operator_runs_locally_through_airflow(airflow, tiny_model_dir, monkeypatch):
    proc = airflow.run("dags", "test", "provider_smoke", env={"SMOKE_MODEL_DIR": str(tiny_model_dir)})
    out = proc.stdout + proc.stderr
    assert "state=success" in out and "state=failed" not in out
    for key, value in airflow.bucket_env().items():
        monkeypatch.setenv(key, value)
    assert is_complete("s3://finetune/models/smoke/tiny")
    runs = list_children("s3://finetune/experiments/smoke")
    run_dirs = [r for r in runs if r != "merged"]
    assert len(run_dirs) == 1
    ranks = list_children(f"s3://finetune/experiments/smoke/{run_dirs[0]}")
    assert sorted(r.split("-")[0] for r in ranks) == ["r2", "r4"]  # one prefix per mapped rank
    for r in ranks:
        assert is_complete(f"s3://finetune/experiments/smoke/{run_dirs[0]}/{r}/checkpoint-final")
    assert is_complete("s3://finetune/experiments/smoke/merged")
    # the 2-process task: same total batch (4), per-device batch and accumulation derived for 2 ranks
    assert "batch: 2 process(es) x 2 per device x 1 accumulation = 4" in out
    assert "rank 1: training done; rank 0 writes the outputs" in out
    [ddp_run] = list_children("s3://finetune/experiments/smoke-ddp")
    [ddp_key] = list_children(f"s3://finetune/experiments/smoke-ddp/{ddp_run}")
    assert is_complete(f"s3://finetune/experiments/smoke-ddp/{ddp_run}/{ddp_key}/checkpoint-final")
    # Secrets canary: the bucket secret key never shows in the task logs.
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"] not in out
    logs = "".join(p.read_text(errors="replace") for p in Path(airflow.env["AIRFLOW_HOME"]).rglob("*.log"))
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"] not in logs
    # ... nor in XCom or rendered template fields, which live in the metadata database
    db = (Path(airflow.env["AIRFLOW_HOME"]) / "airflow.db").read_bytes()
    assert b'"final_eval_loss"' in db or b"final_eval_loss" in db  # the XComs are there
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"].encode() not in db
