"""vLLM serving manifests: a Deployment running vLLM's OpenAI server and a ClusterIP Service.

The model (and LoRA adapters) come from bucket prefixes, pulled by an init container with the
engine image (``finetune-engine pull --wait-complete``: it waits for the completion marker, so a
half-uploaded model is never served).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_provider_finetune.pods.pod import (
    build_container,
    default_shm,
    restricted_container_security,
    restricted_pod_security,
    scale_quantity,
    to_dict,
)
from airflow_provider_finetune.pods.spec import GPU_RESOURCES, MANAGED_BY, EngineJobSpec, SecretEnv, dns_name

VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
VLLM_PORT = 8000
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def check_lora_ranks(adapter_ranks: dict[str, int], max_lora_rank: int | None = None) -> int:
    """The ``--max-lora-rank`` to use: the smallest vLLM-supported value >= every adapter rank.

    Raises ValueError naming the adapter when a rank exceeds a given ``max_lora_rank``.
    """
    largest = max(adapter_ranks.values(), default=0)
    if max_lora_rank is not None:
        too_big = {n: r for n, r in adapter_ranks.items() if r > max_lora_rank}
        if too_big:
            raise ValueError(f"adapter rank(s) {too_big} exceed max_lora_rank {max_lora_rank}; raise it to at least {largest}")
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {max_lora_rank} is not one vLLM accepts: {VLLM_LORA_RANKS}")
        return max_lora_rank
    for r in VLLM_LORA_RANKS:
        if r >= largest:
            return r
    raise ValueError(f"adapter rank {largest} exceeds vLLM's largest max-lora-rank {VLLM_LORA_RANKS[-1]}; merge the adapter instead")


@dataclass(frozen=True)
class ServeSpec:
    name: str
    model_uri: str
    served_model_name: str
    engine_image: str
    vllm_image: str = VLLM_IMAGE
    gpus: int = 1
    gpu_vendor: str = "nvidia"
    cpu_per_gpu: str = "4"
    memory_per_gpu: str = "32Gi"
    model_volume_size: str = "100Gi"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> bucket prefix
    adapter_ranks: dict[str, int] = field(default_factory=dict)
    max_lora_rank: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    replicas: int = 1
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    bucket_secret: str = "finetune-bucket"
    env: dict[str, str] = field(default_factory=dict)
    startup_budget_seconds: int = 3600


def vllm_args(spec: ServeSpec) -> list[str]:
    args = ["--model", "/models/model", "--served-model-name", spec.served_model_name, "--host", "0.0.0.0",
            "--port", str(VLLM_PORT), "--tensor-parallel-size", str(max(spec.gpus, 1))]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.adapters:
        rank = check_lora_ranks(spec.adapter_ranks, spec.max_lora_rank)
        args += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(spec.adapters)), "--lora-modules"]
        args += [f"{n}=/models/adapters/{n}" for n in sorted(spec.adapters)]
    for key, value in sorted(spec.engine_args.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    return args


def _pull_init_container(spec: ServeSpec) -> dict:
    pulls = [f"finetune-engine pull --wait-complete {spec.model_uri} /models/model"]
    pulls += [f"finetune-engine pull --wait-complete {uri} /models/adapters/{n}" for n, uri in sorted(spec.adapters.items())]
    job = EngineJobSpec(
        name=f"{spec.name}-pull", command=["/bin/sh", "-c", " && ".join(pulls)], image=spec.engine_image,
        cpu_per_gpu="2", memory_per_gpu="8Gi", env=dict(spec.env),
        secret_env=[SecretEnv("AWS_ACCESS_KEY_ID", spec.bucket_secret, "AWS_ACCESS_KEY_ID"),
                    SecretEnv("AWS_SECRET_ACCESS_KEY", spec.bucket_secret, "AWS_SECRET_ACCESS_KEY")],
    )
    c = to_dict(build_container(job, "pull-model"))
    c["volumeMounts"] = [{"name": "models", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}]
    c["env"] = [e for e in c["env"] if e["name"] not in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR")]
    c["env"].append({"name": "HOME", "value": "/tmp"})
    c.pop("workingDir", None)
    return c


def build_vllm_deployment(spec: ServeSpec) -> dict[str, Any]:
    factor = max(spec.gpus, 1)
    memory = scale_quantity(spec.memory_per_gpu, factor)
    requests = {"cpu": scale_quantity(spec.cpu_per_gpu, factor), "memory": memory}
    limits = {"memory": memory}
    if spec.gpus:
        requests[GPU_RESOURCES[spec.gpu_vendor]] = limits[GPU_RESOURCES[spec.gpu_vendor]] = str(spec.gpus)
    probe = {"httpGet": {"path": "/health", "port": VLLM_PORT}}
    server = {
        "name": "vllm",
        "image": spec.vllm_image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(spec),
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        "env": [{"name": "HOME", "value": "/cache"}, {"name": "XDG_CACHE_HOME", "value": "/cache"},
                {"name": "HF_HOME", "value": "/cache/hf"}, {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
                {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": to_dict(restricted_container_security()),
        # Loading weights and compiling graphs can take long: a generous startup budget.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": spec.startup_budget_seconds // 10},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
    }
    tolerations = [{"key": GPU_RESOURCES[spec.gpu_vendor], "operator": "Exists", "effect": "NoSchedule"}] if spec.gpus else None
    labels = {**MANAGED_BY, "app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(spec.name), **spec.labels}
    selector = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(spec.name)}
    pod_spec = {
        "securityContext": to_dict(restricted_pod_security()),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "initContainers": [_pull_init_container(spec)],
        "containers": [server],
        "volumes": [
            {"name": "models", "emptyDir": {"sizeLimit": spec.model_volume_size}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": default_shm(memory)}},
            {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        ],
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": dns_name(spec.name), "namespace": spec.namespace, "labels": labels},
        "spec": {"replicas": spec.replicas, "selector": {"matchLabels": selector},
                 "strategy": {"type": "Recreate"} if spec.gpus else {"type": "RollingUpdate"},
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }


def build_vllm_service(spec: ServeSpec) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(spec.name)}
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": dns_name(spec.name), "namespace": spec.namespace, "labels": {**MANAGED_BY, **selector, **spec.labels}},
        "spec": {"type": "ClusterIP", "selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": VLLM_PORT}]},
    }


def build_ingress(spec: ServeSpec, host: str, ingress_class: str | None = None) -> dict[str, Any]:
    """Optional, off by default: expose the Service through an Ingress."""
    name = dns_name(spec.name)
    rule = {"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                                              "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}
    body: dict[str, Any] = {"rules": [rule]}
    if ingress_class:
        body["ingressClassName"] = ingress_class
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": spec.namespace, "labels": dict(MANAGED_BY)}, "spec": body}
