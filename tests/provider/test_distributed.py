"""Multi-node manifests: TrainJob and PyTorchJob against the Kubeflow CRD schemas, golden, restricted."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.pods.distributed import (
    TRAINER_CONTAINER,
    build_pytorchjob,
    build_trainjob,
    torchrun_command,
)
from airflow_provider_finetune.pods.pod import build_pod, pod_to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.spec import EngineJobSpec, Scratch, SecretEnv, labels_for
from tests.provider.conftest import CANARY, CRDS, K8S_VERSIONS, assert_golden, containers, crd_schema

SPEC = EngineJobSpec(
    name="tutorial-full-ft",
    image="registry.example/finetune-engine-cuda:0.1.0",
    command=torchrun_command(
        ["train-job", "--method", "sft", "--checkpoint-uri", "s3://finetune/experiments/t/full"]
    ),
    env={"FINETUNE_CONFIG": "run_conf: {}\n", "NCCL_DEBUG": "WARN"},
    secret_env=[
        SecretEnv("AWS_ACCESS_KEY_ID", "finetune-bucket", "AWS_ACCESS_KEY_ID"),
        SecretEnv("AWS_SECRET_ACCESS_KEY", "finetune-bucket", "AWS_SECRET_ACCESS_KEY"),
        SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN", optional=True),
    ],
    gpus=8,
    scratch=Scratch(kind="ephemeral", size="1Ti", storage_class="fast-nvme"),
    node_selector={"nvidia.com/gpu.product": "H100"},
    active_deadline_seconds=172800,
    labels=labels_for("retrain", "finetune", "scheduled__2026-11-01T00:00:00+00:00", None, 1),
    namespace="finetune",
)
AMD = EngineJobSpec(
    **{**SPEC.__dict__, "gpu_vendor": "amd", "image": "registry.example/finetune-engine-rocm:0.1.0"}
)


def _trainjob_pod(doc: dict) -> dict:
    job = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    return job["template"]["spec"]["template"]


def test_trainjob_golden_and_crd():
    doc = build_trainjob(SPEC, num_nodes=4, procs_per_node=8)
    assert_golden("trainjob-4x8-nvidia", doc)
    jsonschema.validate(doc, crd_schema("trainer.kubeflow.org_trainjobs.yaml"))
    trainer = doc["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["command"][0] == "torchrun"
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert doc["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert doc["spec"]["activeDeadlineSeconds"] == 172800
    pod = _trainjob_pod(doc)
    assert pod["metadata"]["labels"]["airflow-provider-finetune/dag-id"] == "retrain"
    assert pod["spec"]["containers"][0]["name"] == "node"  # the runtime's container
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]


def test_trainjob_targets_the_runtime_job_and_container():
    crd_schema("trainer.kubeflow.org_trainjobs.yaml")  # skips when shared/ is absent
    runtime = yaml.safe_load((CRDS / "runtime-torch_distributed.yaml").read_text())
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert runtime["metadata"]["name"] == "torch-distributed" and job["name"] == TRAINER_CONTAINER
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == TRAINER_CONTAINER


def test_trainjob_pod_patch_is_restricted_and_schema_rejects_typos():
    doc = build_trainjob(AMD, num_nodes=2, procs_per_node=8)
    assert restricted_violations(doc) == []
    assert "amd.com/gpu" in doc["spec"]["trainer"]["resourcesPerNode"]["limits"]
    schema = crd_schema("trainer.kubeflow.org_trainjobs.yaml")
    jsonschema.validate(doc, schema)
    bad = copy.deepcopy(doc)
    bad["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(doc)
    _trainjob_pod(bad)["spec"]["hostNetwork"] = True  # not a patchable field, and not restricted
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("elastic", [None, {"maxRestarts": 5}, {"minReplicas": 2, "maxReplicas": 4}])
def test_pytorchjob_crd_and_restricted(elastic):
    doc = build_pytorchjob(AMD, num_nodes=3, procs_per_node=8, elastic=elastic)
    jsonschema.validate(doc, crd_schema("kubeflow.org_pytorchjobs.yaml"))
    assert restricted_violations(doc) == []
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert doc["spec"]["nprocPerNode"] == "8"
    for r in replicas.values():
        pod = r["template"]["spec"]
        assert pod["containers"][0]["name"] == "pytorch" and r["restartPolicy"] == "OnFailure"
        assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "8"
        assert "restartPolicy" not in pod and "activeDeadlineSeconds" not in pod
    assert doc["spec"]["runPolicy"]["activeDeadlineSeconds"] == 172800
    if elastic is None:
        assert (
            replicas["Master"]["replicas"] == 1
            and replicas["Worker"]["replicas"] == 2
            and "elasticPolicy" not in doc["spec"]
        )
    else:
        assert set(replicas) == {"Worker"} and replicas["Worker"]["replicas"] == 3
        policy = doc["spec"]["elasticPolicy"]
        assert policy["rdzvBackend"] == "c10d" and policy == {
            "rdzvBackend": "c10d",
            "minReplicas": 3,
            "maxReplicas": 3,
            "maxRestarts": 3,
            **elastic,
        }


def test_pytorchjob_golden():
    assert_golden("pytorchjob-2x8-nvidia", build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8))
    assert_golden(
        "pytorchjob-elastic-nvidia",
        build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8, elastic={"minReplicas": 1, "maxReplicas": 4}),
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_replica_pod_templates_are_valid_pods(version):
    """Each replica's template, wrapped as a Pod, passes the official schema (strict)."""
    doc = build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8)
    for name, r in doc["spec"]["pytorchReplicaSpecs"].items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"x-{name.lower()}", **r["template"]["metadata"]},
            "spec": {**r["template"]["spec"], "restartPolicy": r["restartPolicy"]},
        }
        kubernetes_validate.validate(pod, version, strict=True)


def test_same_pod_settings_as_the_single_pod():
    single = pod_to_dict(build_pod(SPEC))["spec"]
    job = build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8)["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"
    ]["spec"]
    for key in ("securityContext", "volumes", "tolerations", "nodeSelector", "automountServiceAccountToken"):
        assert job[key] == single[key], key
    a, b = single["containers"][0], job["containers"][0]
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    trainer = build_trainjob(SPEC, num_nodes=2, procs_per_node=8)
    assert trainer["spec"]["trainer"]["env"] == a["env"]


def test_secrets_are_references_in_job_manifests():
    for doc in (build_trainjob(SPEC, 2, 8), build_pytorchjob(SPEC, 2, 8), build_pytorchjob(SPEC, 2, 8, {})):
        assert CANARY not in yaml.safe_dump(doc)
        for c in containers(doc):
            env = {e["name"]: e for e in c.get("env") or []}
            if "AWS_SECRET_ACCESS_KEY" in env:
                assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "finetune-bucket"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_nodes \\(0\\)"):
        build_trainjob(SPEC, 0, 8)
    with pytest.raises(ValueError, match="procs_per_node 16 exceeds the 8 GPUs"):
        build_pytorchjob(SPEC, 2, 16)
    single = EngineJobSpec(**{**SPEC.__dict__, "command": ["finetune-engine", "train-job"]})
    with pytest.raises(ValueError, match="must start with torchrun"):
        build_trainjob(single, 2, 8)
    with pytest.raises(ValueError, match="minReplicas <= maxReplicas"):
        build_pytorchjob(SPEC, 2, 8, {"minReplicas": 4, "maxReplicas": 2})


def test_missing_crd_schemas_skip_here_but_fail_in_ci(monkeypatch, tmp_path):
    import tests.provider.conftest as helpers

    monkeypatch.setattr(helpers, "CRDS", tmp_path)
    for value in (None, "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(
            pytest.skip.Exception, match=r"kubeflow.org_pytorchjobs.yaml not found .*FINETUNE_CRDS_DIR"
        ):
            helpers.crd_schema("kubeflow.org_pytorchjobs.yaml")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="a missing schema fails there"):
            helpers.crd_schema("kubeflow.org_pytorchjobs.yaml")
