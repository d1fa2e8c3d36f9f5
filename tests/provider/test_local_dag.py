"""A real `airflow dags test` of a DAG using each engine operator, on the local runner, against
the embedded S3 server and the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune_engine.manifest import read_manifest as local_manifest
from finetune_engine.storage import is_complete, list_children, read_manifest
from finetune_engine.storage.oci import pull
from tests.airflow_env import EAGER_VLLM, VLLM_PY, AirflowEnv
from tests.registry import PASSWORD, oci_registry  # noqa: F401 - the fixture, asked for by name

DAGS = Path(__file__).parent / "dags"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    env = AirflowEnv(tmp_path_factory.mktemp("af"), DAGS)
    yield env
    env.close()


@pytest.mark.slow
def test_every_operator_runs_locally_through_airflow(airflow, tiny_model_dir, monkeypatch, tmp_path, request):
    env = {"SMOKE_MODEL_DIR": str(tiny_model_dir)}
    # the sweep also pushes its adapters to a registry where one can run (else the rest still runs)
    registry = request.getfixturevalue("oci_registry") if shutil.which("docker-registry") else None
    if registry is not None:
        docker_config = registry.docker_config(tmp_path / "docker")
        env.update(
            SMOKE_OCI_REPO=f"oci://{registry.host}/smoke/adapter", SMOKE_DOCKER_CONFIG=str(docker_config)
        )
    # ... and vLLM (CPU) serves the first rank's adapter from its OCI reference, where it is installed
    serve = registry is not None and VLLM_PY.exists()
    if serve:
        env.update(
            SMOKE_SERVE="1",
            AIRFLOW__FINETUNE__VLLM_PYTHON=str(VLLM_PY),
            AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS=json.dumps(EAGER_VLLM),
        )
    proc = airflow.run("dags", "test", "provider_smoke", env=env)
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
    # each sweep task pushed its adapter after the bucket upload: the artifact's completion manifest
    # is the bucket copy's (every file's size and sha256), and the pull verified every byte against it
    for map_index, rank in enumerate([2, 4] if registry is not None else []):
        [r] = [r for r in ranks if r.split("-")[0] == f"r{rank}"]
        pulled = tmp_path / f"pulled-r{map_index}"
        ref = registry.ref("smoke/adapter", f"r{map_index}")
        pull(ref, pulled, plain_http=True, docker_config=docker_config)
        bucket = read_manifest(f"s3://finetune/experiments/smoke/{run_dirs[0]}/{r}/checkpoint-final-adapter")
        assert local_manifest(pulled)["files"] == bucket["files"] and len(bucket["files"]) > 2
    assert is_complete("s3://finetune/experiments/smoke/merged")
    if serve:  # the adapter a DAG task pushed, pulled by the serving task and answering through vLLM
        assert "serve_from_oci" in out and "smoke test (adapter tuned): " in out, out[-3000:]
        assert f"{registry.host}/smoke/adapter:r0" in out
    # the 2-process task: same total batch (4), per-device batch and accumulation derived for 2 ranks
    assert "batch: 2 process(es) x 2 per device x 1 accumulation = 4" in out
    assert "rank 1: training done; rank 0 writes the outputs" in out
    [ddp_run] = list_children("s3://finetune/experiments/smoke-ddp")
    [ddp_key] = list_children(f"s3://finetune/experiments/smoke-ddp/{ddp_run}")
    assert is_complete(f"s3://finetune/experiments/smoke-ddp/{ddp_run}/{ddp_key}/checkpoint-final")
    # Secrets canary: the bucket secret key never shows in the task logs.
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"] not in out
    assert PASSWORD not in out  # nor the registry's password
    logs = "".join(p.read_text(errors="replace") for p in Path(airflow.env["AIRFLOW_HOME"]).rglob("*.log"))
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"] not in logs
    # ... nor in XCom or rendered template fields, which live in the metadata database
    db = (Path(airflow.env["AIRFLOW_HOME"]) / "airflow.db").read_bytes()
    assert b'"final_eval_loss"' in db or b"final_eval_loss" in db  # the XComs are there
    assert airflow.s3["AWS_SECRET_ACCESS_KEY"].encode() not in db
