"""The kubernetes runner through the parent operator's machinery, against a fake core API:
exact create/delete calls for a mapped sweep, and reattach instead of duplicate pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from airflow_provider_finetune.pods.security import restricted_violations

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("k8s-airflow")
    env = _env(home)
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        env=env,
        check=True,
        capture_output=True,
    )
    return home


def _env(home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_"))}
    return {
        **base,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "k8s_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__FINETUNE__ENGINE_IMAGE": "registry.example/engine:1",
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(
            {"conn_type": "kubernetes", "extra": {"in_cluster": False}}
        ),
    }


def _run(home: Path, mode: str, dag_id: str = "k8s_mapped") -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "fake_k8s_run.py"), str(HERE / "k8s_dags"), dag_id, mode],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FAKE_K8S_CALLS=")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads(line.split("=", 1)[1]), "output": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def fresh(airflow_home):
    return _run(airflow_home, "fresh")


def _task(call: dict) -> str:
    return call["body"]["metadata"]["labels"]["task_id"]


def test_mapped_sweep_creates_one_restricted_pod_per_rank_and_cleans_up(fresh):
    out = fresh
    assert out["state"] == "success"
    ops = [c["op"] for c in out["calls"]]
    # two mapped tasks x two map indexes: one pod each, each deleted after success
    assert ops.count("create") == 4 and ops.count("delete") == 4 and ops.index("list") < ops.index("create")
    creates = sorted(
        (c for c in out["calls"] if c["op"] == "create" and _task(c) == "sweep"),
        key=lambda c: c["body"]["metadata"]["labels"]["map_index"],
    )
    for index, (call, rank) in enumerate(zip(creates, (4, 8), strict=True)):
        pod = call["body"]
        labels = pod["metadata"]["labels"]
        assert (
            labels["dag_id"] == "k8s_mapped"
            and labels["task_id"] == "sweep"
            and labels["map_index"] == str(index)
        )
        base = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
        assert base["image"] == "registry.example/engine:1"
        assert base["command"][:2] == ["finetune-engine", "train-job"]
        uri = base["command"][base["command"].index("--checkpoint-uri") + 1]
        assert uri.startswith("s3://finetune/experiments/k8s_mapped/") and f"/r{rank}-" in uri
        env = {e["name"]: e for e in base["env"]}
        assert f"r: {rank}" in env["FINETUNE_CONFIG"]["value"]
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "finetune-bucket",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
        assert env["FINETUNE_RESULT_FILE"]["value"] == "/airflow/xcom/return.json"
        assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])
        assert restricted_violations(pod) == []
        kubernetes_validate.validate(pod, "1.33", strict=True)
    deleted = {c["name"] for c in out["calls"] if c["op"] == "delete"}
    assert deleted == {c["name"] for c in out["calls"] if c["op"] == "create"}
    sweep = sorted(
        (c for c in out["calls"] if c["op"] == "create" and _task(c) == "lr_sweep"),
        key=lambda c: c["body"]["metadata"]["labels"]["map_index"],
    )
    configs = [
        next(e["value"] for e in c["body"]["spec"]["containers"][0]["env"] if e["name"] == "FINETUNE_CONFIG")
        for c in sweep
    ]
    assert (
        "learning_rate: 0.0001" in configs[0]
        and "max_steps: 20" in configs[0]
        and "learning_rate: 0.001" in configs[1]
    )


def test_mapped_rows_are_labelled_by_what_they_sweep(fresh):
    """The rendered map index Airflow stores (and the grid shows) for rank and overrides sweeps."""
    out = fresh
    assert out["state"] == "success"
    assert out["labels"] == {
        "sweep[0]": "r=4",
        "sweep[1]": "r=8",
        "lr_sweep[0]": "learning_rate=0.0001, max_steps=20",
        "lr_sweep[1]": "learning_rate=0.001",
    }


def test_retry_reattaches_to_running_pods_instead_of_creating(airflow_home):
    out = _run(airflow_home, "reattach")
    assert out["state"] == "success"
    ops = [c["op"] for c in out["calls"]]
    assert "create" not in ops, "a running pod of the task instance must be reused, not duplicated"
    # the fake lists one running pod per task instance (by its labels): two tasks x two map indexes
    assert sorted(c["name"] for c in out["calls"] if c["op"] == "delete") == [
        "existing-0",
        "existing-0",
        "existing-1",
        "existing-1",
    ]


def test_failed_pods_are_classified_and_ooms_are_not_retried(airflow_home):
    """The engine container's terminated reason / exit code and its log tail, read before the pod
    is deleted: OOMs fail at once with the fix in the error; a plain SIGKILL and a deadline retry."""
    out = _run(airflow_home, "fresh", "k8s_failures")
    assert out["state"] == "failed"
    # OOMs: one try (AirflowFailException); the others used their retry
    assert out["tis"] == {
        "host_oom[-1]": {"state": "failed", "try_number": 1},
        "gpu_oom[-1]": {"state": "failed", "try_number": 1},
        "sigkill[-1]": {"state": "failed", "try_number": 2},
        "deadline[-1]": {"state": "failed", "try_number": 2},
    }
    # the log tail is read from each failed try's pod, before the pod is deleted
    logs = [c for c in out["calls"] if c["op"] in ("log", "delete")]
    assert [c["op"] for c in logs].count("log") == 6 and all(
        c["container"] == "base" and c["tail_lines"] for c in logs if c["op"] == "log"
    )
    assert all(
        logs[i + 1] == {"op": "delete", "name": c["name"], "namespace": "finetune"}
        for i, c in enumerate(logs)
        if c["op"] == "log"
    )
    text = out["output"]
    assert (
        "[host-oom] pod " in text and "container base exited with 137 (OOMKilled): out of host memory" in text
    )
    assert "[accelerator-oom] pod " in text and "exited with 1 (Error): out of accelerator memory" in text
    assert "[killed] pod " in text and "killed by SIGKILL (exit 137) without an OOMKilled reason" in text
    assert (
        "[deadline] pod " in text
        and "exited with 137 (DeadlineExceeded): ran longer than active_deadline_seconds" in text
    )
