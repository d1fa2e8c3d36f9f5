"""The pod EACH engine operator really builds — through KubernetesPodOperator's own
``build_pod_request_obj`` (labels, XCom sidecar, pod name), not just our builder: golden files,
the official schemas (strict) for Kubernetes 1.29-1.37, restricted PSS, and the KPO defaults every
engine operator sets (scheduling budget for GPU autoscalers, events on failure, cleanup)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from unittest import mock

import kubernetes_validate
import pytest

from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    EvaluateModelsOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
)
from airflow_provider_finetune.pods.pod import to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from tests.provider.conftest import K8S_VERSIONS, assert_golden
from tests.provider.test_operators import CONFIG

RUN_ID = "manual__2026-11-24T10:00:00+00:00"
OPERATORS = {
    "hf-model": lambda: HFModelToBucketOperator(
        task_id="deliver_model", model_id="org/model", revision="v1", exclude_patterns=["original/*"]
    ),
    "data-script": lambda: DataScriptToBucketOperator(
        task_id="deliver_data", script="print('data')", method="sft"
    ),
    "finetune": lambda: FinetuneKubernetesOperator(
        task_id="sweep",
        config=CONFIG,
        lora_rank=8,
        gpus=1,
        node_selector={"nvidia.com/gpu.product": "H100"},
        active_deadline_seconds=86400,
    ),
    "finetune-fsdp-4gpu": lambda: FinetuneKubernetesOperator(
        task_id="full",
        config=CONFIG,
        gpus=4,
        gpu_vendor="amd",
        distributed_strategy="fsdp",
        scratch_storage_class="fast-nvme",
        scratch_size="500Gi",
    ),
    "merge": lambda: MergeAdapterOperator(
        task_id="merge",
        base="s3://finetune/models/org/tiny",
        adapter="s3://finetune/experiments/e/r8/checkpoint-final-adapter",
    ),
    "evaluate": lambda: EvaluateModelsOperator(
        task_id="evaluate",
        models=["s3://finetune/m/champion", "s3://finetune/m/challenger"],
        datasets="s3://finetune/datasets/heldout.jsonl",
    ),
}
ENGINE_OPERATORS = [
    HFModelToBucketOperator,
    DataScriptToBucketOperator,
    FinetuneKubernetesOperator,
    MergeAdapterOperator,
    EvaluateModelsOperator,
]


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    """The provider defaults, whatever the calling environment says."""
    import os

    for key in list(os.environ):
        if key.startswith("AIRFLOW__FINETUNE__"):
            monkeypatch.delenv(key)


def context(op, map_index: int = -1) -> dict:
    ti = SimpleNamespace(
        dag_id="tutorial",
        task_id=op.task_id,
        map_index=map_index,
        try_number=1,
        run_id=RUN_ID,
        xcom_push=mock.Mock(),
    )
    return {"ti": ti, "run_id": RUN_ID, "dag": SimpleNamespace(dag_id="tutorial")}


def built_pod(name: str) -> dict:
    op = OPERATORS[name]()
    ctx = context(op, map_index=3 if name == "finetune" else -1)
    op.validate(ctx)
    pod = to_dict(op.build_pod_request_obj(ctx, dry_run=True))
    return pod


def normalized(pod: dict) -> dict:
    """Stable across runs and Airflow patch releases: the random pod-name suffix and the version label."""
    doc = copy.deepcopy(pod)
    doc["metadata"]["name"] = re.sub(r"-[a-z0-9]{8}$", "-RANDOM", doc["metadata"]["name"])
    doc["metadata"]["labels"]["airflow_version"] = "AIRFLOW_VERSION"
    return doc


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_golden_operator_pods(name):
    assert_golden(f"op-pod-{name}", normalized(built_pod(name)))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_pods_validate_against_official_schemas(name, version):
    kubernetes_validate.validate(built_pod(name), version, strict=True)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_pods_are_restricted_and_identified(name):
    pod = built_pod(name)
    assert restricted_violations(pod) == []  # the XCom sidecar too
    assert [c["name"] for c in pod["spec"]["containers"]] == ["base", "airflow-xcom-sidecar"]
    labels = pod["metadata"]["labels"]
    assert (
        labels["dag_id"] == "tutorial"
        and labels["kubernetes_pod_operator"] == "True"
        and labels["try_number"] == "1"
    )
    assert (labels.get("map_index") == "3") == (name == "finetune")
    assert pod["metadata"]["name"].startswith(OPERATORS[name]().task_id.replace("_", "-"))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "finetune-bucket",
        "key": "AWS_SECRET_ACCESS_KEY",
    }


def test_the_same_task_builds_the_same_pod_but_for_the_name():
    a, b = built_pod("finetune"), built_pod("finetune")
    assert normalized(a) == normalized(b)
    assert (
        a["metadata"]["name"] != b["metadata"]["name"]
    )  # a unique suffix per attempt; reattach finds pods by labels


def _minimal(cls, **kw):
    args = {
        HFModelToBucketOperator: {"model_id": "org/m"},
        DataScriptToBucketOperator: {"script": "print(1)"},
        FinetuneKubernetesOperator: {"config": CONFIG},
        MergeAdapterOperator: {"base": "s3://bkt/m", "adapter": "s3://bkt/a"},
        EvaluateModelsOperator: {"models": ["s3://bkt/m"], "datasets": ["s3://bkt/d.jsonl"]},
    }[cls]
    return cls(task_id="t", **args, **kw)


@pytest.mark.parametrize("cls", ENGINE_OPERATORS, ids=lambda c: c.__name__)
def test_every_engine_operator_sets_the_kpo_defaults(cls):
    op = _minimal(cls)
    gpu = int(op.gpus or 0) > 0
    assert op.schedule_timeout_seconds == (1800 if gpu else 600)  # GPU nodes may come from an autoscaler
    assert op.startup_timeout_seconds == (1800 if gpu else 600)
    assert op.log_events_on_failure is True
    assert op.on_finish_action.value == "delete_succeeded_pod"  # failed pods stay for inspection
    assert op.do_xcom_push is True and op.get_logs is True
    assert op.xcom_sidecar_container_security_context["runAsNonRoot"] is True
    # with GPUs the budget is the long one, whatever the operator's own default
    assert _minimal(cls, gpus=2).schedule_timeout_seconds == 1800
    # and every default yields to the caller
    custom = _minimal(
        cls, schedule_timeout_seconds=42, log_events_on_failure=False, startup_timeout_seconds=7
    )
    assert (
        custom.schedule_timeout_seconds,
        custom.log_events_on_failure,
        custom.startup_timeout_seconds,
    ) == (42, False, 7)
