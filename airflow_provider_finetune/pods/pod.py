"""Engine job spec -> V1Pod: resources per GPU vendor, sized /dev/shm, scratch, restricted security."""

from __future__ import annotations

import re
from typing import Any

from kubernetes.client import models as k8s

from airflow_provider_finetune.pods.spec import (
    GPU_RESOURCES,
    MANAGED_BY,
    XCOM_RESULT_FILE,
    EngineJobSpec,
    dns_name,
)

BASE_CONTAINER = "base"  # KubernetesPodOperator's name for the main container
RUN_AS = 1000
_QTY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_UNITS = {
    None: 1,
    "m": 10**-3,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_quantity(q: str) -> float:
    m = _QTY.match(str(q))
    if not m:
        raise ValueError(f"quantity {q!r}: expected e.g. 4, 500m, 32Gi, 100G")
    return float(m.group(1)) * _UNITS[m.group(2)]


def scale_quantity(q: str, factor: int) -> str:
    """``q`` times ``factor`` in the same unit (``4`` x 8 = ``32``, ``32Gi`` x 8 = ``256Gi``)."""
    m = _QTY.match(str(q))
    if not m:
        raise ValueError(f"quantity {q!r}: expected e.g. 4, 500m, 32Gi, 100G")
    value = float(m.group(1)) * factor
    text = str(int(value)) if value.is_integer() else f"{value:g}"
    return text + (m.group(2) or "")


def default_shm(memory: str) -> str:
    """Half the pod memory, at most 64Gi: enough for NCCL/dataloader shared memory."""
    gib = min(parse_quantity(memory) / 2**30 / 2, 64)
    return f"{max(int(gib), 1)}Gi"


def restricted_pod_security(supplemental_groups: list[int] | None = None) -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS,
        run_as_group=RUN_AS,
        fs_group=RUN_AS,
        supplemental_groups=list(supplemental_groups) if supplemental_groups else None,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def restricted_container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        privileged=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


TMP_SIZE = "4Gi"  # the /tmp emptyDir


def format_bytes(n: float) -> str:
    """A byte count as the largest binary unit that keeps it whole (``107374182400`` -> ``100Gi``)."""
    n = int(n)
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def ephemeral_storage(spec: EngineJobSpec) -> str:
    """The node disk the pod's disk-backed emptyDirs may fill: /tmp, and scratch when it is an emptyDir
    (an ephemeral PVC is the storage class's disk, not the node's)."""
    total = parse_quantity(TMP_SIZE)
    if spec.scratch.kind == "emptyDir":
        total += parse_quantity(spec.scratch.size)
    return format_bytes(total)


def resources_for(spec: EngineJobSpec) -> k8s.V1ResourceRequirements:
    """CPU/memory scaled by the GPU count; GPUs, memory and ephemeral storage have limit = request.

    No CPU limit on purpose: CFS throttling slows data loading and NCCL without protecting anyone.
    Ephemeral storage: the scheduler places the pod only on a node with disk for its scratch
    (:func:`ephemeral_storage`), instead of evicting it mid-run when the node's disk fills.
    """
    factor = max(spec.gpus, 1)
    cpu = scale_quantity(spec.cpu_per_gpu, factor)
    memory = scale_quantity(spec.memory_per_gpu, factor)
    disk = ephemeral_storage(spec)
    requests = {"cpu": cpu, "memory": memory, "ephemeral-storage": disk}
    limits = {"memory": memory, "ephemeral-storage": disk}
    if spec.gpus:
        requests[GPU_RESOURCES[spec.gpu_vendor]] = str(spec.gpus)
        limits[GPU_RESOURCES[spec.gpu_vendor]] = str(spec.gpus)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def env_for(spec: EngineJobSpec) -> list[k8s.V1EnvVar]:
    scratch = spec.scratch.mount_path
    # The root filesystem is read-only: every cache and home directory points into a volume.
    plain = {
        "HOME": f"{scratch}/home",
        "TMPDIR": "/tmp",
        "HF_HOME": f"{scratch}/hf",
        "XDG_CACHE_HOME": f"{scratch}/cache",
        "TRITON_CACHE_DIR": f"{scratch}/cache/triton",
        **({"FINETUNE_RESULT_FILE": XCOM_RESULT_FILE} if spec.xcom else {}),
        **spec.env,
    }
    env = [k8s.V1EnvVar(name=k, value=str(v)) for k, v in plain.items()]
    env += [
        k8s.V1EnvVar(
            name=s.env_name,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(
                    name=s.secret_name, key=s.secret_key, optional=s.optional or None
                )
            ),
        )
        for s in spec.secret_env
    ]
    return env


def volumes_for(spec: EngineJobSpec) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    memory = scale_quantity(spec.memory_per_gpu, max(spec.gpus, 1))
    shm = spec.shm_size or default_shm(memory)
    if parse_quantity(shm) > parse_quantity(memory):
        # a memory-backed emptyDir is charged to the pod's memory limit
        raise ValueError(f"EngineJobSpec {spec.name!r}: shm_size {shm} exceeds the pod memory {memory}")
    volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=TMP_SIZE)),
    ]
    if spec.scratch.kind == "ephemeral":
        claim = k8s.V1PersistentVolumeClaimTemplate(
            spec=k8s.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name=spec.scratch.storage_class,
                resources=k8s.V1VolumeResourceRequirements(requests={"storage": spec.scratch.size}),
            )
        )
        volumes.append(
            k8s.V1Volume(name="scratch", ephemeral=k8s.V1EphemeralVolumeSource(volume_claim_template=claim))
        )
    else:
        volumes.append(
            k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=spec.scratch.size))
        )
    mounts = [
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        k8s.V1VolumeMount(name="scratch", mount_path=spec.scratch.mount_path),
    ]
    return volumes, mounts


def _toleration(t: Any) -> k8s.V1Toleration:
    if not isinstance(t, dict):
        return t
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in t.items()}
    unknown = set(snake) - set(k8s.V1Toleration.attribute_map)
    if unknown:
        raise ValueError(f"toleration {t!r}: unknown keys {sorted(unknown)}")
    return k8s.V1Toleration(**snake)


def tolerations_for(spec: EngineJobSpec) -> list[k8s.V1Toleration]:
    """The spec's tolerations plus the GPU taint toleration of its vendor (when it asks for GPUs)."""
    tolerations = [_toleration(t) for t in spec.tolerations]
    if spec.gpus and not any(t.key == GPU_RESOURCES[spec.gpu_vendor] for t in tolerations):
        tolerations.append(
            k8s.V1Toleration(key=GPU_RESOURCES[spec.gpu_vendor], operator="Exists", effect="NoSchedule")
        )
    return tolerations


def build_container(spec: EngineJobSpec, name: str = BASE_CONTAINER) -> k8s.V1Container:
    _, mounts = volumes_for(spec)
    return k8s.V1Container(
        name=name,
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=list(spec.command),
        env=env_for(spec),
        resources=resources_for(spec),
        volume_mounts=mounts,
        security_context=restricted_container_security(),
        working_dir=spec.scratch.mount_path,
    )


def affinity_for(spec: EngineJobSpec) -> k8s.V1Affinity | None:
    """The spec's affinity (a manifest dict) as the client's model, so it merges like the rest."""
    if not spec.affinity:
        return None
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(spec.affinity, "V1Affinity")


def build_pod_spec(
    spec: EngineJobSpec, container_name: str = BASE_CONTAINER, restart_policy: str = "Never"
) -> k8s.V1PodSpec:
    volumes, _ = volumes_for(spec)
    return k8s.V1PodSpec(
        affinity=affinity_for(spec),
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in spec.image_pull_secrets] or None,
        termination_grace_period_seconds=spec.termination_grace_period_seconds,
        containers=[build_container(spec, container_name)],
        volumes=volumes,
        restart_policy=restart_policy,
        security_context=restricted_pod_security(spec.supplemental_groups),
        automount_service_account_token=False,
        service_account_name=spec.service_account_name,
        node_selector=spec.node_selector or None,
        tolerations=tolerations_for(spec) or None,
        priority_class_name=spec.priority_class_name,
        active_deadline_seconds=spec.active_deadline_seconds,
        enable_service_links=False,
    )


def build_pod(spec: EngineJobSpec) -> k8s.V1Pod:
    """The engine pod: main container ``base``, restricted PSS, restartPolicy Never."""
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(
            name=dns_name(spec.name),
            namespace=spec.namespace,
            labels={**MANAGED_BY, **spec.labels},
            annotations=spec.annotations or None,
        ),
        spec=build_pod_spec(spec),
    )


def pod_to_dict(obj: Any) -> dict:
    """A Kubernetes model object as its manifest dict (camelCase keys, no None values)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


to_dict = pod_to_dict
