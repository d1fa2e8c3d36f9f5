"""The engine job spec: what one engine pod needs, as plain data (no Kubernetes objects yet).

Secrets never enter a spec as values: ``env`` holds plain settings only, and a value or name
that looks like a credential is refused with a pointer to ``secret_env`` (a ``secretKeyRef``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

LABEL_PREFIX = "airflow-provider-finetune"
MANAGED_BY = {"app.kubernetes.io/managed-by": "airflow-provider-finetune"}
GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
DEFAULT_TERMINATION_GRACE_SECONDS = 300
XCOM_RESULT_FILE = "/airflow/xcom/return.json"  # KubernetesPodOperator's XCom sidecar convention
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

_NAME_BAD = re.compile(r"[^a-z0-9-]+")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
# Names that hold credentials by convention, and value shapes of common tokens/keys.
_SECRET_WORDS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "APIKEY", "CREDENTIAL", "CREDENTIALS"}
_SECRET_VALUE = re.compile(
    r"(^|[\s=:\"'])(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"github_pat_[A-Za-z0-9_]{20,}|(AKIA|ASIA)[A-Z0-9]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)


@dataclass(frozen=True)
class SecretEnv:
    """An env var whose value comes from a Kubernetes Secret (never a literal)."""

    env_name: str
    secret_name: str
    secret_key: str
    optional: bool = False

    def __post_init__(self) -> None:
        if not _ENV_NAME.match(self.env_name):
            raise ValueError(f"SecretEnv {self.env_name!r}: not a valid environment variable name")
        if not DNS_SUBDOMAIN.match(self.secret_name or ""):
            raise ValueError(
                f"SecretEnv {self.env_name}: secret_name {self.secret_name!r} is not a valid Secret name"
            )
        if not self.secret_key or not re.match(r"^[-._a-zA-Z0-9]+$", self.secret_key):
            raise ValueError(
                f"SecretEnv {self.env_name}: secret_key {self.secret_key!r} is not a valid Secret key"
            )


@dataclass(frozen=True)
class Scratch:
    """The scratch volume at ``mount_path``: an emptyDir, or a generic ephemeral PVC of a class."""

    kind: str = "emptyDir"  # or "ephemeral"
    size: str = "100Gi"
    storage_class: str | None = None
    mount_path: str = "/workdir"


@dataclass(frozen=True)
class EngineJobSpec:
    """One engine pod. ``cpu_per_gpu``/``memory_per_gpu`` are per GPU, or the pod's own when gpus=0.

    ``xcom``: the engine writes its result JSON to ``/airflow/xcom/return.json``
    (``FINETUNE_RESULT_FILE``); KubernetesPodOperator's ``do_xcom_push`` adds the ``xcom`` volume
    and sidecar that read it.
    """

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
    shm_size: str | None = None  # default: half the pod memory, at most 64Gi
    scratch: Scratch = field(default_factory=Scratch)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str | None = None
    active_deadline_seconds: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    service_account_name: str | None = None
    namespace: str | None = None
    xcom: bool = False
    supplemental_groups: list[int] = field(default_factory=list)  # e.g. the hosts' video/render GIDs for ROCm
    image_pull_secrets: list[str] = field(default_factory=list)  # Secret names of a private registry
    affinity: dict[str, Any] | None = None  # a V1Affinity as its manifest dict (camelCase)
    # SIGTERM to SIGKILL: time for the trainer to save and upload a checkpoint
    termination_grace_period_seconds: int | None = DEFAULT_TERMINATION_GRACE_SECONDS

    def __post_init__(self) -> None:
        where = f"EngineJobSpec {self.name!r}"
        if not str(self.name or "").strip():
            raise ValueError("EngineJobSpec: name is empty")
        if not self.image:
            raise ValueError(f"{where}: image is empty (set [finetune] engine_image)")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ValueError(f"{where}: command must be a non-empty list of strings, got {self.command!r}")
        if self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(
                f"{where}: image_pull_policy {self.image_pull_policy!r}: use one of {PULL_POLICIES}"
            )
        if self.gpu_vendor not in GPU_RESOURCES:
            raise ValueError(f"{where}: gpu_vendor {self.gpu_vendor!r}: use one of {sorted(GPU_RESOURCES)}")
        if self.gpus < 0:
            raise ValueError(f"{where}: gpus must be >= 0, got {self.gpus}")
        if self.scratch.kind not in ("emptyDir", "ephemeral"):
            raise ValueError(f"{where}: scratch kind {self.scratch.kind!r}: use emptyDir or ephemeral")
        if self.scratch.kind == "ephemeral" and not self.scratch.storage_class:
            raise ValueError(f"{where}: an ephemeral scratch volume needs a storage_class")
        if self.active_deadline_seconds is not None and self.active_deadline_seconds <= 0:
            raise ValueError(
                f"{where}: active_deadline_seconds must be > 0, got {self.active_deadline_seconds}"
            )
        if self.termination_grace_period_seconds is not None and self.termination_grace_period_seconds < 0:
            raise ValueError(
                f"{where}: termination_grace_period_seconds must be >= 0, got "
                f"{self.termination_grace_period_seconds}"
            )
        bad = [s for s in self.image_pull_secrets if not DNS_SUBDOMAIN.match(str(s))]
        if bad:
            raise ValueError(f"{where}: image_pull_secrets {bad} are not valid Secret names")
        bad = [k for k in self.env if not _ENV_NAME.match(str(k))]
        if bad:
            raise ValueError(f"{where}: env names {bad} are not valid environment variable names")
        clash = set(self.env) & {s.env_name for s in self.secret_env}
        if clash:
            raise ValueError(f"{where}: env {sorted(clash)} set both as a value and from a Secret")
        refuse_secret_values(where, self.env, self.command, self.labels, self.annotations)


def refuse_secret_values(
    where: str, env: dict[str, Any], args: list[str] = (), *maps: dict[str, Any]
) -> None:
    """Raise ValueError when a plain value is (or is named like) a credential; never echo the value."""
    for name, value in env.items():
        if _secret_name(str(name)) and value not in (None, ""):
            raise ValueError(
                f"{where}: env {name} looks like a credential; pass it as "
                f"secret_env=[SecretEnv({name!r}, '<secret>', '<key>')] (a secretKeyRef), never as a value"
            )
        if _SECRET_VALUE.search(str(value)):
            raise ValueError(
                f"{where}: the value of env {name} looks like a token or key; use secret_env (a secretKeyRef)"
            )
    for i, arg in enumerate(args):
        if _SECRET_VALUE.search(str(arg)):
            raise ValueError(
                f"{where}: command argument {i} looks like a token or key; pass it through secret_env"
            )
    for mapping in maps:
        for key, value in mapping.items():
            if _SECRET_VALUE.search(str(value)):
                raise ValueError(
                    f"{where}: the value of {key} looks like a token or "
                    "key; secrets belong in a Secret, never in metadata"
                )


def _secret_name(name: str) -> bool:
    """HF_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY: yes; TOKENIZERS_PARALLELISM: no."""
    words = re.split(r"[^A-Z0-9]+", name.upper())
    return bool(_SECRET_WORDS & set(words)) or name.upper().endswith(("API_KEY", "PRIVATE_KEY"))


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_name(*parts: Any, max_length: int = 63) -> str:
    """A deterministic DNS-1123 label from ``parts``; a hash suffix keeps distinct inputs distinct."""
    raw = "-".join(str(p) for p in parts if p is not None and p != "")
    name = _NAME_BAD.sub("-", raw.lower()).strip("-") or "job"
    if not name[0].isalpha():
        name = f"x-{name}"
    suffix = _digest(raw)
    keep = max_length - len(suffix) - 1
    return f"{name[:keep].rstrip('-')}-{suffix}"


def name_for(dag_id: str, task_id: str, run_id: str, map_index: int | None = None) -> str:
    """The object name of one task instance's pod/job: DNS-1123, <= 63 chars, same on every retry."""
    index = map_index if map_index is not None and map_index >= 0 else None
    readable = "-".join(str(p) for p in (dag_id, task_id, index) if p is not None)
    name = _NAME_BAD.sub("-", readable.lower()).strip("-") or "job"
    if not name[0].isalpha():
        name = f"x-{name}"
    suffix = _digest(f"{dag_id}\0{task_id}\0{run_id}\0{index}", 10)
    return f"{name[: 63 - len(suffix) - 1].rstrip('-')}-{suffix}"


def label_value(value: Any) -> str:
    """A valid label value (<= 63 chars, alphanumeric ends); a hash suffix when changed or cut."""
    text = str(value)
    clean = _LABEL_BAD.sub("_", text)
    if clean == text and len(text) <= 63 and (not text or (text[0].isalnum() and text[-1].isalnum())):
        return text
    cut = clean[:54].strip("_.-")
    return f"{cut}-{_digest(text)}" if cut else _digest(text)


def labels_for(
    dag_id: str, task_id: str, run_id: str, map_index: int | None = None, try_number: int | None = None
) -> dict[str, str]:
    """Labels that let a retry find its objects: dag, task, run, map index (and try number)."""
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
