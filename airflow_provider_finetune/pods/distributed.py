"""Multi-node training manifests with the same engine image and pod settings as a single pod.

The engine runs under ``torchrun`` (``torchrun_command``) with no rendezvous flags: torchrun
reads every option from a ``PET_<OPTION>`` variable, and both operators inject them.

- Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the ``torch-distributed``
  ClusterTrainingRuntime: the torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
  PET_MASTER_ADDR and PET_MASTER_PORT in the ``node`` container. Image, command, env and
  resources go into ``spec.trainer``; the pod settings the trainer has no field for (security
  context, volumes, mounts, tolerations, node selector, labels) go into a ``runtimePatches`` entry,
  the only pod-level patch the CRD accepts.
- Kubeflow Training Operator ``PyTorchJob`` (kubeflow.org/v1): pods built like the single pod
  (container ``pytorch``), ``nprocPerNode``; static jobs have a Master and Workers, elastic jobs
  Workers only (as in the Intel chart). For static jobs the operator injects MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK and PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
  PET_MASTER_ADDR, PET_MASTER_PORT. With ``elasticPolicy`` (c10d rendezvous) it sets
  PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID, PET_NNODES=min:max and PET_MAX_RESTARTS
  instead of the static master address.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from airflow_provider_finetune.pods.pod import (
    build_container,
    build_pod_spec,
    to_dict,
    tolerations_for,
    volumes_for,
)
from airflow_provider_finetune.pods.spec import MANAGED_BY, EngineJobSpec, dns_name

TRAINER_CONTAINER = "node"  # the torch-distributed runtime's replicated job and container
PYTORCHJOB_CONTAINER = "pytorch"
DNS_1035 = re.compile(
    r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
)  # the Training Operator finds the main container by this name


def torchrun_command(engine_args: list[str]) -> list[str]:
    """``torchrun`` taking nodes, ranks and rendezvous from the injected PET_* variables."""
    return ["torchrun", "-m", "finetune_engine.cli.main", *engine_args]


def _check(spec: EngineJobSpec, num_nodes: int, procs_per_node: int) -> None:
    if num_nodes < 1 or procs_per_node < 1:
        raise ValueError(
            f"{spec.name}: num_nodes ({num_nodes}) and procs_per_node ({procs_per_node}) must be >= 1"
        )
    if spec.gpus and procs_per_node > spec.gpus:
        raise ValueError(
            f"{spec.name}: procs_per_node {procs_per_node} exceeds the {spec.gpus} GPUs of a node"
        )
    if spec.command[0] != "torchrun":
        raise ValueError(
            f"{spec.name}: a multi-node command must start with torchrun (use torchrun_command), "
            f"got {spec.command[:2]}"
        )


def _metadata(spec: EngineJobSpec) -> dict[str, Any]:
    # a name that already is a DNS-1035 label is kept (the operator's job names are; pods and
    # Services derive theirs from it), anything else is made one
    name = spec.name if DNS_1035.match(spec.name) else dns_name(spec.name)
    meta: dict[str, Any] = {"name": name, "labels": {**MANAGED_BY, **spec.labels}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    if spec.annotations:
        meta["annotations"] = dict(spec.annotations)
    return meta


RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
# a finished PyTorchJob (and its pods, with their logs) stays this long unless the operator deletes it
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 86400


def build_trainjob(
    spec: EngineJobSpec,
    num_nodes: int,
    procs_per_node: int,
    runtime: str = "torch-distributed",
    runtime_kind: str = "ClusterTrainingRuntime",
) -> dict[str, Any]:
    """A TrainJob on a (Cluster)TrainingRuntime, its pods patched to the single pod's settings: security,
    volumes, scheduling (tolerations, node selector, affinity), image pull secrets, grace period,
    labels and annotations (a Kueue ``kueue.x-k8s.io/queue-name`` label goes on the TrainJob too)."""
    _check(spec, num_nodes, procs_per_node)
    if runtime_kind not in RUNTIME_KINDS:
        raise ValueError(f"{spec.name}: runtime kind {runtime_kind!r}: use one of {RUNTIME_KINDS}")
    container = to_dict(build_container(spec, TRAINER_CONTAINER))
    pod = to_dict(build_pod_spec(spec, TRAINER_CONTAINER))
    patch_container = {
        "name": TRAINER_CONTAINER,
        "securityContext": container["securityContext"],
        "volumeMounts": container["volumeMounts"],
    }
    pod_patch = {
        k: v
        for k, v in {
            "securityContext": pod["securityContext"],
            "volumes": pod["volumes"],
            "tolerations": pod.get("tolerations"),
            "nodeSelector": pod.get("nodeSelector"),
            "affinity": pod.get("affinity"),
            "imagePullSecrets": pod.get("imagePullSecrets"),
            "terminationGracePeriodSeconds": pod.get("terminationGracePeriodSeconds"),
            "serviceAccountName": pod.get("serviceAccountName"),
            "containers": [patch_container],
        }.items()
        if v is not None and v != [] and v != {}
    }
    pod_meta: dict[str, Any] = {"labels": {**MANAGED_BY, **spec.labels}}
    if spec.annotations:
        pod_meta["annotations"] = dict(spec.annotations)
    job_spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": runtime_kind, "name": runtime},
        "trainer": {
            "image": spec.image,
            "command": list(spec.command),
            "env": container["env"],
            "numNodes": num_nodes,
            "numProcPerNode": procs_per_node,
            "resourcesPerNode": container["resources"],
        },
        "runtimePatches": [
            {
                "manager": "airflow-provider-finetune",
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": TRAINER_CONTAINER,
                                    "template": {
                                        "spec": {
                                            "template": {
                                                "metadata": pod_meta,
                                                "spec": pod_patch,
                                            }
                                        }
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(spec),
        "spec": job_spec,
    }


def build_pytorchjob(
    spec: EngineJobSpec,
    num_nodes: int,
    procs_per_node: int,
    elastic: dict[str, Any] | None = None,
    ttl_seconds_after_finished: int | None = DEFAULT_TTL_SECONDS_AFTER_FINISHED,
) -> dict[str, Any]:
    """A PyTorchJob whose pods are built like ``build_pod`` (container ``pytorch``).

    Static (``elastic=None``): one Master and ``num_nodes - 1`` Workers, restartPolicy ExitCode (a
    static torchrun rank restarted alone cannot rejoin its gang: a permanent error, exit 1-127, fails
    the job; a retryable one, 128-255 such as a preemption's SIGTERM/SIGKILL, restarts it). Elastic:
    ``num_nodes`` Workers, restartPolicy OnFailure (c10d rendezvous takes a restarted worker back) and
    an elasticPolicy (defaults c10d, minReplicas = maxReplicas = num_nodes, maxRestarts 3;
    ``elastic`` overrides them). ``runPolicy.ttlSecondsAfterFinished`` removes a finished job the
    operator did not delete (a failed one is kept that long for its logs).
    """
    _check(spec, num_nodes, procs_per_node)
    pod = to_dict(build_pod_spec(spec, PYTORCHJOB_CONTAINER))
    pod.pop("restartPolicy", None)  # set per replica type below
    pod.pop("activeDeadlineSeconds", None)  # on runPolicy instead: a pod deadline would fail the gang
    meta: dict[str, Any] = {"labels": {**MANAGED_BY, **spec.labels}}
    if spec.annotations:
        meta["annotations"] = dict(spec.annotations)
    template = {"metadata": meta, "spec": pod}
    # A restarted rank resumes from the newest complete checkpoint in the bucket.
    if elastic is not None:
        # Elastic jobs are Worker-only (as in the Intel chart): c10d rendezvous on worker-0.
        replicas: dict[str, Any] = {
            "Worker": {
                "replicas": num_nodes,
                "restartPolicy": "OnFailure",
                "template": copy.deepcopy(template),
            }
        }
    else:
        replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
        if num_nodes > 1:
            replicas["Worker"] = {
                "replicas": num_nodes - 1,
                "restartPolicy": "ExitCode",
                "template": copy.deepcopy(template),
            }
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 3}
    if spec.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = int(ttl_seconds_after_finished)
    job_spec: dict[str, Any] = {
        "pytorchReplicaSpecs": replicas,
        "nprocPerNode": str(procs_per_node),
        "runPolicy": run_policy,
    }
    if elastic is not None:
        policy = {
            "rdzvBackend": "c10d",
            "minReplicas": num_nodes,
            "maxReplicas": num_nodes,
            "maxRestarts": 3,
            **elastic,
        }
        if not 1 <= policy["minReplicas"] <= policy["maxReplicas"]:
            raise ValueError(
                f"{spec.name}: elasticPolicy needs 1 <= minReplicas <= maxReplicas, got {policy}"
            )
        job_spec["elasticPolicy"] = policy
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec),
        "spec": job_spec,
    }


__all__ = [
    "DEFAULT_TTL_SECONDS_AFTER_FINISHED",
    "RUNTIME_KINDS",
    "build_pytorchjob",
    "build_trainjob",
    "torchrun_command",
    "tolerations_for",
    "volumes_for",
]
