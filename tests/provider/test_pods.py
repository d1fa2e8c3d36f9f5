"""Engine pods: golden files, the official Kubernetes schemas (strict), restricted PSS, secrets, names."""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.pods.distributed import torchrun_command
from airflow_provider_finetune.pods.pod import build_pod, parse_quantity, pod_to_dict, scale_quantity
from airflow_provider_finetune.pods.security import (
    PodSecurityViolation,
    check_restricted,
    restricted_violations,
)
from airflow_provider_finetune.pods.spec import (
    EngineJobSpec,
    Scratch,
    SecretEnv,
    dns_name,
    label_value,
    labels_for,
    name_for,
)
from tests.provider.conftest import CANARY, K8S_VERSIONS, assert_golden

BUCKET_KEYS = [
    SecretEnv("AWS_ACCESS_KEY_ID", "finetune-bucket", "AWS_ACCESS_KEY_ID"),
    SecretEnv("AWS_SECRET_ACCESS_KEY", "finetune-bucket", "AWS_SECRET_ACCESS_KEY"),
]

SPECS = {
    "train-1gpu-nvidia": EngineJobSpec(
        name="finetune",
        command=["finetune-engine", "train-job", "--checkpoint-uri", "s3://finetune/experiments/e/r"],
        image="registry.example/finetune-engine-cuda:0.1.0",
        env={"FINETUNE_CONFIG": "data_conf: {}\n"},
        secret_env=BUCKET_KEYS,
        gpus=1,
        xcom=True,
        active_deadline_seconds=86400,
        labels=labels_for("tutorial", "sweep", "manual__2026-11-24T10:00:00+00:00", 3, try_number=1),
        node_selector={"nvidia.com/gpu.product": "H100"},
        priority_class_name="training",
        namespace="finetune",
    ),
    "train-8gpu-amd-ephemeral": EngineJobSpec(
        name="finetune-full",
        command=torchrun_command(["train-job", "--checkpoint-uri", "s3://finetune/experiments/e/full"]),
        image="registry.example/finetune-engine-rocm:0.1.0",
        gpus=8,
        gpu_vendor="amd",
        shm_size="64Gi",
        scratch=Scratch(kind="ephemeral", size="500Gi", storage_class="fast-nvme"),
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}],
        secret_env=[SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN", optional=True)],
        namespace="finetune",
    ),
    "deliver-cpu": EngineJobSpec(
        name="deliver-model",
        command=["finetune-engine", "deliver-model", "org/model", "s3://finetune/models/org/model"],
        image="registry.example/finetune-engine-cuda:0.1.0",
        gpus=0,
        cpu_per_gpu="2",
        memory_per_gpu="8Gi",
        secret_env=BUCKET_KEYS,
    ),
}


def _pod(name: str) -> dict:
    return pod_to_dict(build_pod(SPECS[name]))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_pods(name):
    assert_golden(f"pod-{name}", _pod(name))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_pods_validate_against_official_schemas(name, version):
    kubernetes_validate.validate(_pod(name), version, strict=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_pod_is_restricted_pss(name):
    doc = _pod(name)
    assert restricted_violations(doc) == []
    assert restricted_violations(build_pod(SPECS[name])) == []  # the model object works too
    check_restricted(doc)
    spec = doc["spec"]
    base = spec["containers"][0]
    assert (
        base["name"] == "base"
        and spec["restartPolicy"] == "Never"
        and spec["automountServiceAccountToken"] is False
    )
    assert spec["securityContext"] == {
        "fsGroup": 1000,
        "runAsGroup": 1000,
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert base["securityContext"]["readOnlyRootFilesystem"] is True
    assert base["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # a read-only root filesystem: every write location is a mounted volume
    mounts = {m["mountPath"] for m in base["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/workdir"} <= mounts
    env = {e["name"]: e.get("value") for e in base["env"]}
    for var in ("HOME", "TMPDIR", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert any(env[var].startswith(m) for m in mounts), var


def test_gpu_resources_shm_scratch_and_tolerations():
    amd = _pod("train-8gpu-amd-ephemeral")["spec"]
    res = amd["containers"][0]["resources"]
    assert res["limits"]["amd.com/gpu"] == res["requests"]["amd.com/gpu"] == "8"
    assert res["requests"]["cpu"] == "32" and res["requests"]["memory"] == res["limits"]["memory"] == "256Gi"
    assert "nvidia.com/gpu" not in json.dumps(amd)
    shm = next(v for v in amd["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    claim = next(v for v in amd["volumes"] if v["name"] == "scratch")["ephemeral"]["volumeClaimTemplate"][
        "spec"
    ]
    assert claim == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-nvme",
        "resources": {"requests": {"storage": "500Gi"}},
    }
    assert {t["key"] for t in amd["tolerations"]} == {"dedicated", "amd.com/gpu"}
    nv = _pod("train-1gpu-nvidia")["spec"]
    assert nv["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in nv["tolerations"]
    assert (
        next(v for v in nv["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"
    )  # half of 32Gi
    assert next(v for v in nv["volumes"] if v["name"] == "scratch")["emptyDir"] == {"sizeLimit": "100Gi"}
    assert nv["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and nv["priorityClassName"] == "training"
    assert nv["activeDeadlineSeconds"] == 86400
    cpu = _pod("deliver-cpu")["spec"]
    assert cpu["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "104Gi"},
        "limits": {"memory": "8Gi", "ephemeral-storage": "104Gi"},
    }
    assert "gpu" not in json.dumps(cpu) and not cpu.get("tolerations")


@pytest.mark.parametrize("name", ["deliver-cpu", "train-1gpu-nvidia", "train-8gpu-amd-ephemeral"])
def test_ephemeral_storage_covers_the_disk_backed_volumes(name):
    """The scheduler reserves the node disk the pod's emptyDirs may fill (scratch 100Gi by default plus
    /tmp): requests = limits = the sum of their sizeLimits; an ephemeral PVC scratch is not node disk."""
    spec = _pod(name)["spec"]
    disk = sum(
        parse_quantity(v["emptyDir"]["sizeLimit"])
        for v in spec["volumes"]
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )
    res = spec["containers"][0]["resources"]
    assert parse_quantity(res["requests"]["ephemeral-storage"]) == disk
    assert res["limits"]["ephemeral-storage"] == res["requests"]["ephemeral-storage"]
    assert spec["terminationGracePeriodSeconds"] == 300  # time to save a checkpoint on SIGTERM
    if name == "train-8gpu-amd-ephemeral":
        assert res["requests"]["ephemeral-storage"] == "4Gi"  # only /tmp: scratch is a PVC


def test_grace_period_pull_secrets_and_affinity_reach_the_pod():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    spec = EngineJobSpec(
        name="t",
        command=["c"],
        image="i",
        image_pull_secrets=["regcred"],
        affinity=affinity,
        termination_grace_period_seconds=900,
    )
    pod = pod_to_dict(build_pod(spec))["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["affinity"] == affinity
    assert pod["terminationGracePeriodSeconds"] == 900
    kubernetes_validate.validate(pod_to_dict(build_pod(spec)), "1.33", strict=True)
    with pytest.raises(ValueError, match="image_pull_secrets"):
        EngineJobSpec(name="t", command=["c"], image="i", image_pull_secrets=["Bad_Name"])
    with pytest.raises(ValueError, match="termination_grace_period_seconds"):
        EngineJobSpec(name="t", command=["c"], image="i", termination_grace_period_seconds=-1)


def test_given_gpu_toleration_is_not_duplicated_and_camel_case_keys_work():
    spec = EngineJobSpec(
        name="t",
        command=["c"],
        image="i",
        gpus=2,
        tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
        ],
    )
    tolerations = pod_to_dict(build_pod(spec))["spec"]["tolerations"]
    assert tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
    ]
    with pytest.raises(ValueError, match="unknown keys"):
        build_pod(EngineJobSpec(name="t", command=["c"], image="i", tolerations=[{"kee": "x"}]))


def test_xcom_convention():
    env = {e["name"]: e.get("value") for e in _pod("train-1gpu-nvidia")["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_RESULT_FILE"] == "/airflow/xcom/return.json"
    other = {e["name"] for e in _pod("deliver-cpu")["spec"]["containers"][0]["env"]}
    assert "FINETUNE_RESULT_FILE" not in other
    # KubernetesPodOperator adds the 'xcom' volume and sidecar itself: no clash with ours
    assert "xcom" not in {v["name"] for v in _pod("train-1gpu-nvidia")["spec"]["volumes"]}


def test_quantities():
    assert (
        scale_quantity("4", 8) == "32"
        and scale_quantity("32Gi", 8) == "256Gi"
        and scale_quantity("500m", 3) == "1500m"
    )
    assert scale_quantity("1.5", 2) == "3" and parse_quantity("1Gi") == 2**30
    with pytest.raises(ValueError, match="quantity '32 GB'"):
        scale_quantity("32 GB", 1)
    with pytest.raises(ValueError, match="shm_size 64Gi exceeds the pod memory 32Gi"):
        build_pod(EngineJobSpec(name="t", command=["c"], image="i", gpus=1, shm_size="64Gi"))


# -- secrets ---------------------------------------------------------------------------------------


def test_secret_env_is_a_secret_key_ref():
    env = {e["name"]: e for e in _pod("train-8gpu-amd-ephemeral")["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN", "optional": True}},
    }
    env = {e["name"]: e for e in _pod("deliver-cpu")["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "finetune-bucket", "key": "AWS_SECRET_ACCESS_KEY"}},
    }


@pytest.mark.parametrize(
    "where", ["env-secret-name", "env-plain-name", "command", "label", "annotation", "both"]
)
def test_secret_canary_never_reaches_a_pod(where):
    kwargs = {
        "env-secret-name": {"env": {"HF_TOKEN": CANARY}},
        "env-plain-name": {"env": {"EXTRA_SETTING": CANARY}},
        "command": {"command": ["finetune-engine", "train-job", f"--token={CANARY}"]},
        "label": {"labels": {"x": CANARY}},
        "annotation": {"annotations": {"note": f"key {CANARY}"}},
        "both": {"env": {"HF_TOKEN": CANARY}, "secret_env": [SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN")]},
    }[where]
    with pytest.raises(ValueError) as err:
        EngineJobSpec(**{"name": "x", "command": ["finetune-engine"], "image": "i", **kwargs})
    assert CANARY not in str(err.value), "the error must not echo the secret"
    assert "secret" in str(err.value).lower()  # and says where secrets go


@pytest.mark.parametrize(
    "name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "OPENAI_API_KEY"]
)
def test_credential_names_must_be_secret_refs(name):
    with pytest.raises(ValueError, match=f"env {name} looks like a credential"):
        EngineJobSpec(name="x", command=["c"], image="i", env={name: "anything"})
    EngineJobSpec(
        name="x", command=["c"], image="i", env={"TOKENIZERS_PARALLELISM": "false", "MAX_NEW_TOKENS": "8"}
    )


def test_rendered_pods_hold_references_only():
    for name in SPECS:
        doc = _pod(name)
        text = yaml.safe_dump(doc)
        assert CANARY not in text
        for c in doc["spec"]["containers"]:
            for e in c["env"]:
                if re.search(r"SECRET|TOKEN$|PASSWORD", e["name"]):
                    assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], (name, e)


def test_spec_validation_names_the_object():
    with pytest.raises(ValueError, match="EngineJobSpec 'x': gpu_vendor 'intel'"):
        EngineJobSpec(name="x", command=["c"], image="i", gpu_vendor="intel")
    with pytest.raises(ValueError, match="'x': image is empty"):
        EngineJobSpec(name="x", command=["c"], image="")
    with pytest.raises(ValueError, match="'x': command must be"):
        EngineJobSpec(name="x", command=[], image="i")
    with pytest.raises(ValueError, match="ephemeral scratch volume needs a storage_class"):
        EngineJobSpec(name="x", command=["c"], image="i", scratch=Scratch(kind="ephemeral"))
    with pytest.raises(ValueError, match="secret_name 'Bad_Name'"):
        SecretEnv("HF_TOKEN", "Bad_Name", "k")


# -- names and labels --------------------------------------------------------------------------------

LONG_RUN = "scheduled__2026-11-24T10:00:00+00:00-" + "x" * 80


def test_names_are_dns_labels_deterministic_and_distinct():
    dns = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    names = {name_for("Tutorial_DAG", "sweep", LONG_RUN, i) for i in range(50)}
    assert len(names) == 50
    for n in names | {
        name_for("d" * 300, "t" * 300, "r", None),
        name_for("1dag", "t", "r", -1),
        dns_name("Tutorial_DAG", LONG_RUN),
    }:
        assert len(n) <= 63 and dns.match(n), n
    assert name_for("dag", "task", "run", 3) == name_for("dag", "task", "run", 3)
    assert name_for("dag", "task", "run-a", 3) != name_for("dag", "task", "run-b", 3)
    assert name_for("dag", "task", "run", -1) == name_for("dag", "task", "run", None)
    assert name_for("tutorial", "sweep", "manual__x", 2).startswith("tutorial-sweep-2-")


def test_labels_are_valid_and_deterministic():
    labels = labels_for("a_dag" * 20, "task.with.dots", LONG_RUN, 12, try_number=2)
    value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    for key, v in labels.items():
        assert len(v) <= 63 and value.match(v), (key, v)
        assert key.startswith(("airflow-provider-finetune/", "app.kubernetes.io/"))
    assert labels["app.kubernetes.io/managed-by"] == "airflow-provider-finetune"
    assert (
        labels["airflow-provider-finetune/map-index"] == "12"
        and labels["airflow-provider-finetune/try-number"] == "2"
    )
    assert (
        labels["airflow-provider-finetune/task-id"] == "task.with.dots"
    )  # valid values are kept as they are
    assert labels == labels_for("a_dag" * 20, "task.with.dots", LONG_RUN, 12, try_number=2)
    assert label_value("manual__2026-11-24T10:00:00+00:00") != label_value(
        "manual__2026-11-24T10:00:01+00:00"
    )
    assert "airflow-provider-finetune/map-index" not in labels_for("d", "t", "r", -1)
    pod = pod_to_dict(build_pod(EngineJobSpec(name="x", command=["c"], image="i", labels=labels)))
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


# -- the restricted PSS checker catches what it should ---------------------------------------------

BAD_CONTAINERS = {
    "privileged": {"securityContext": {"privileged": True}},
    "escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "caps-add": {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}},
    "no-drop": {"securityContext": {"capabilities": {}}},
    "root-user": {"securityContext": {"runAsUser": 0}},
    "run-as-root-allowed": {"securityContext": {"runAsNonRoot": False}},
    "host-port": {"ports": [{"containerPort": 80, "hostPort": 80}]},
    "proc-mount": {"securityContext": {"procMount": "Unmasked"}},
    "selinux-type": {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}},
    "selinux-user": {"securityContext": {"seLinuxOptions": {"user": "system_u"}}},
    "apparmor": {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
    "seccomp": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
    "host-process": {"securityContext": {"windowsOptions": {"hostProcess": True}}},
}
BAD_POD_SPECS = {
    "host-network": {"hostNetwork": True},
    "host-pid": {"hostPID": True},
    "host-ipc": {"hostIPC": True},
    "host-path": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
    "nfs": {"volumes": [{"name": "n", "nfs": {"server": "nfs", "path": "/"}}]},
    "sysctl": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}},
    "pod-seccomp": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
    "no-seccomp": {"securityContext": {"runAsNonRoot": True}},
    "pod-root": {
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    },
}


def _bad_pod(case: str) -> dict:
    doc = copy.deepcopy(_pod("deliver-cpu"))
    if case in BAD_CONTAINERS:
        container = doc["spec"]["containers"][0]
        for key, value in BAD_CONTAINERS[case].items():
            container[key] = {**container.get(key, {}), **value} if key == "securityContext" else value
        if case == "no-seccomp":
            container["securityContext"].pop("seccompProfile")
    else:
        for key, value in BAD_POD_SPECS[case].items():
            doc["spec"][key] = doc["spec"]["volumes"] + value if key == "volumes" else value
        if case == "no-seccomp":
            doc["spec"]["containers"][0]["securityContext"].pop("seccompProfile")
    return doc


@pytest.mark.parametrize("case", sorted(BAD_CONTAINERS) + sorted(BAD_POD_SPECS))
def test_pss_checker_catches_violations(case):
    doc = _bad_pod(case)
    problems = restricted_violations(doc)
    assert problems, case
    with pytest.raises(PodSecurityViolation, match="Pod -/deliver-model-.* violates the restricted"):
        check_restricted(doc)


def test_pss_checker_reports_distinct_violations_and_every_container_group():
    seen = {tuple(restricted_violations(_bad_pod(c))) for c in [*BAD_CONTAINERS, *BAD_POD_SPECS]}
    assert len(seen) >= 20
    doc = _pod("deliver-cpu")
    doc["spec"]["initContainers"] = [{"name": "init", "image": "i"}]
    doc["spec"]["ephemeralContainers"] = [
        {"name": "debug", "image": "busybox", "securityContext": {"privileged": True}}
    ]
    problems = restricted_violations(doc)
    assert any("'init'" in p and "allowPrivilegeEscalation" in p for p in problems)
    assert any("'debug'" in p and "privileged" in p for p in problems)
    doc = _pod("deliver-cpu")
    doc["metadata"]["annotations"] = {"container.apparmor.security.beta.kubernetes.io/base": "unconfined"}
    assert restricted_violations(doc) == ["spec container 'base': AppArmor annotation unconfined"]


def test_pss_checker_reads_other_kinds_and_bare_pod_specs():
    pod_spec = _pod("deliver-cpu")["spec"]
    assert restricted_violations(pod_spec) == []
    for kind in ("Deployment", "Job", "StatefulSet", "ReplicaSet", "DaemonSet"):
        assert restricted_violations({"kind": kind, "spec": {"template": {"spec": pod_spec}}}) == []
        bad = {"kind": kind, "spec": {"template": {"spec": {**pod_spec, "hostPID": True}}}}
        assert restricted_violations(bad) == ["spec.template.spec: hostPID"]
    cron = {
        "kind": "CronJob",
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {**pod_spec, "hostIPC": True}}}}},
    }
    assert restricted_violations(cron) == ["spec.jobTemplate.spec.template.spec: hostIPC"]
    assert restricted_violations({"kind": "ConfigMap", "data": {}}) == [
        "ConfigMap: no pod spec found to check"
    ]
