"""Built manifests: golden files, the official Kubernetes schemas (strict), restricted PSS, secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.pods.distributed import build_pytorchjob, build_trainjob, torchrun_command
from airflow_provider_finetune.pods.pod import build_pod, to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.spec import (
    EngineJobSpec,
    Scratch,
    SecretEnv,
    dns_name,
    label_value,
    labels_for,
)
from tests.provider.conftest import K8S_VERSIONS, crd_schema

GOLDEN = Path(__file__).parent / "golden"
CANARY = "sk-canary-3f9a7c1e"

SPECS = {
    "train-1gpu-nvidia": EngineJobSpec(
        name="finetune", command=["finetune-engine", "train-job", "--checkpoint-uri", "s3://finetune/experiments/e/r"],
        image="registry.example/finetune-engine-cuda:0.1.0", env={"FINETUNE_CONFIG": "data_conf: {}\n"},
        secret_env=[SecretEnv("AWS_ACCESS_KEY_ID", "finetune-bucket", "AWS_ACCESS_KEY_ID"),
                    SecretEnv("AWS_SECRET_ACCESS_KEY", "finetune-bucket", "AWS_SECRET_ACCESS_KEY")],
        gpus=1, labels=labels_for("tutorial", "sweep", "manual__2026-11-24T10:00:00+00:00", 3), active_deadline_seconds=86400,
        node_selector={"nvidia.com/gpu.product": "H100"}, priority_class_name="training", namespace="finetune",
    ),
    "train-8gpu-amd-ephemeral": EngineJobSpec(
        name="finetune-full", command=torchrun_command(["train-job", "--checkpoint-uri", "s3://finetune/experiments/e/full"]),
        image="registry.example/finetune-engine-rocm:0.1.0", gpus=8, gpu_vendor="amd", shm_size="64Gi",
        scratch=Scratch(kind="ephemeral", size="500Gi", storage_class="fast-nvme"),
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}],
        secret_env=[SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN", optional=True)], namespace="finetune",
    ),
    "deliver-cpu": EngineJobSpec(
        name="deliver-model", command=["finetune-engine", "deliver-model", "org/model", "s3://finetune/models/org/model"],
        image="registry.example/finetune-engine-cuda:0.1.0", gpus=0, cpu_per_gpu="2", memory_per_gpu="8Gi",
    ),
}


def _docs():
    for name, spec in SPECS.items():
        yield f"pod-{name}", to_dict(build_pod(spec))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_pods(name):
    doc = to_dict(build_pod(SPECS[name]))
    path = GOLDEN / f"pod-{name}.yaml"
    text = yaml.safe_dump(doc, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; rerun with UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pods_validate_against_official_schemas(version):
    for name, doc in _docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} invalid for Kubernetes {version}: {err}")


def test_every_pod_is_restricted_pss():
    for name, doc in _docs():
        assert restricted_violations(doc) == [], name


def test_gpu_resources_shm_and_tolerations():
    amd = to_dict(build_pod(SPECS["train-8gpu-amd-ephemeral"]))["spec"]
    res = amd["containers"][0]["resources"]
    assert res["limits"]["amd.com/gpu"] == "8" and res["requests"]["cpu"] == "32" and res["requests"]["memory"] == "256Gi"
    shm = next(v for v in amd["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    scratch = next(v for v in amd["volumes"] if v["name"] == "scratch")
    claim = scratch["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "fast-nvme" and claim["resources"]["requests"]["storage"] == "500Gi"
    keys = {t["key"] for t in amd["tolerations"]}
    assert keys == {"dedicated", "amd.com/gpu"}
    nv = to_dict(build_pod(SPECS["train-1gpu-nvidia"]))["spec"]
    assert nv["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert next(v for v in nv["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"  # half of 32Gi
    cpu = to_dict(build_pod(SPECS["deliver-cpu"]))["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu) and not cpu.get("tolerations")


def test_secrets_only_by_reference():
    spec = EngineJobSpec(name="x", command=["finetune-engine"], image="i", secret_env=[SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN")])
    doc = to_dict(build_pod(spec))
    env = {e["name"]: e for e in doc["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
    with pytest.raises(ValueError, match="set both as a value and from a Secret"):
        EngineJobSpec(name="x", command=["c"], image="i", env={"HF_TOKEN": CANARY}, secret_env=[SecretEnv("HF_TOKEN", "s", "k")])


def test_names_and_labels_are_valid_and_deterministic():
    long_run = "scheduled__2026-11-24T10:00:00+00:00-" + "x" * 80
    labels = labels_for("a_dag" * 20, "task.with.dots", long_run, 12)
    for value in labels.values():
        assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum(), value
    assert labels == labels_for("a_dag" * 20, "task.with.dots", long_run, 12)
    assert label_value("manual__2026-11-24T10:00:00+00:00") != label_value("manual__2026-11-24T10:00:01+00:00")
    name = dns_name("Tutorial_DAG", "sweep", long_run)
    assert len(name) <= 63 and name == name.lower() and name == dns_name("Tutorial_DAG", "sweep", long_run)


BAD_PODS = {
    "privileged": {"securityContext": {"privileged": True}},
    "escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "caps": {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}},
    "no-drop": {"securityContext": {"capabilities": {}}},
    "root-user": {"securityContext": {"runAsUser": 0}},
    "host-port": {"ports": [{"containerPort": 80, "hostPort": 80}]},
    "proc-mount": {"securityContext": {"procMount": "Unmasked"}},
    "selinux": {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}},
    "apparmor": {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
    "seccomp": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
}
BAD_POD_SPECS = {
    "host-network": {"hostNetwork": True},
    "host-pid": {"hostPID": True},
    "host-path": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
    "sysctl": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}},
}


@pytest.mark.parametrize("case", sorted(BAD_PODS) + sorted(BAD_POD_SPECS))
def test_pss_checker_catches_violations(case):
    doc = to_dict(build_pod(SPECS["deliver-cpu"]))
    if case in BAD_PODS:
        container = doc["spec"]["containers"][0]
        for key, value in BAD_PODS[case].items():
            if key == "securityContext":
                container["securityContext"] = {**container["securityContext"], **value}
            else:
                container[key] = value
    else:
        for key, value in BAD_POD_SPECS[case].items():
            doc["spec"][key] = value if key != "volumes" else doc["spec"]["volumes"] + value
    assert restricted_violations(doc), case


def test_trainjob_matches_crd_and_is_restricted():
    spec = SPECS["train-1gpu-nvidia"]
    doc = build_trainjob(spec, num_nodes=2, procs_per_node=8)
    jsonschema.validate(doc, crd_schema("trainer.kubeflow.org_trainjobs.yaml"))
    assert doc["spec"]["trainer"]["numNodes"] == 2 and doc["spec"]["trainer"]["numProcPerNode"] == 8
    assert restricted_violations({"kind": "Pod", "spec": {
        **doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]}}) == []
    bad = json.loads(json.dumps(doc))
    bad["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("trainer.kubeflow.org_trainjobs.yaml"))


@pytest.mark.parametrize("elastic", [None, {"maxRestarts": 5}])
def test_pytorchjob_matches_crd_and_is_restricted(elastic):
    doc = build_pytorchjob(SPECS["train-8gpu-amd-ephemeral"], num_nodes=3, procs_per_node=8, elastic=elastic)
    jsonschema.validate(doc, crd_schema("kubeflow.org_pytorchjobs.yaml"))
    assert doc["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert restricted_violations(doc) == []
    assert doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] == "pytorch"
    if elastic:
        assert doc["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d" and doc["spec"]["elasticPolicy"]["maxRestarts"] == 5
