"""The engine job spec: what one engine pod needs, as plain data (no Kubernetes objects yet)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

LABEL_PREFIX = "finetune.airflow.apache.org"
MANAGED_BY = {"app.kubernetes.io/managed-by": "airflow-provider-finetune"}


@dataclass(frozen=True)
class SecretEnv:
    """An env var whose value comes from a Kubernetes Secret (never a literal)."""

    env_name: str
    secret_name: str
    secret_key: str
    optional: bool = False


@dataclass(frozen=True)
class Scratch:
    """The scratch volume at ``mount_path``: an emptyDir, or a generic ephemeral PVC of a class."""

    kind: str = "emptyDir"  # or "ephemeral"
    size: str = "100Gi"
    storage_class: str | None = None
    mount_path: str = "/workdir"


@dataclass(frozen=True)
class EngineJobSpec:
    name: str
    command: list[str]
    image: str
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[SecretEnv] = field(default_factory=list)
    image_pull_policy: str = "IfNotPresent"
    gpus: int = 0
    gpu_vendor: str = "nvidia"
    cpu_per_gpu: str = "4"
    memory_per_gpu: str = "32Gi"
    shm_size: str | None = None
    scratch: Scratch = field(default_factory=Scratch)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str | None = None
    active_deadline_seconds: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    service_account_name: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.gpu_vendor not in GPU_RESOURCES:
            raise ValueError(f"gpu_vendor {self.gpu_vendor!r}: use one of {sorted(GPU_RESOURCES)}")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.scratch.kind not in ("emptyDir", "ephemeral"):
            raise ValueError(f"scratch kind {self.scratch.kind!r}: use emptyDir or ephemeral")
        if self.scratch.kind == "ephemeral" and not self.scratch.storage_class:
            raise ValueError("an ephemeral scratch volume needs a storage_class")
        clash = set(self.env) & {s.env_name for s in self.secret_env}
        if clash:
            raise ValueError(f"env {sorted(clash)} set both as a value and from a Secret")


GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}

_NAME_BAD = re.compile(r"[^a-z0-9-]+")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_name(*parts: Any, max_length: int = 63) -> str:
    """A deterministic DNS-1123 label from ``parts`` (hash suffix keeps it unique when cut)."""
    raw = "-".join(str(p) for p in parts if p is not None and p != "")
    name = _NAME_BAD.sub("-", raw.lower()).strip("-") or "job"
    suffix = _digest(raw)
    keep = max_length - len(suffix) - 1
    return f"{name[:keep].rstrip('-')}-{suffix}"


def label_value(value: Any) -> str:
    """A valid label value (<= 63 chars, alphanumeric ends); a hash suffix when changed or cut."""
    text = str(value)
    clean = _LABEL_BAD.sub("_", text)
    if clean == text and len(text) <= 63 and (not text or (text[0].isalnum() and text[-1].isalnum())):
        return text
    cut = clean[:54].strip("_.-")
    return f"{cut}-{_digest(text)}" if cut else _digest(text)


def labels_for(dag_id: str, task_id: str, run_id: str, map_index: int | None = None,
               try_number: int | None = None) -> dict[str, str]:
    labels = {
        **MANAGED_BY,
        f"{LABEL_PREFIX}/dag-id": label_value(dag_id),
        f"{LABEL_PREFIX}/task-id": label_value(task_id),
        f"{LABEL_PREFIX}/run-id": label_value(run_id),
    }
    if map_index is not None and map_index >= 0:
        labels[f"{LABEL_PREFIX}/map-index"] = str(map_index)
    if try_number is not None:
        labels[f"{LABEL_PREFIX}/try-number"] = str(try_number)
    return labels
