"""Multi-node training manifests with the same engine image and pod settings as a single pod.

- Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the ``torch-distributed``
  runtime: the trainer injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
  PET_MASTER_PORT, which ``torchrun`` reads as its defaults.
- Kubeflow Training Operator ``PyTorchJob`` (kubeflow.org/v1): Master + Workers, ``nprocPerNode``,
  optional ``elasticPolicy`` (c10d rendezvous), as in the Intel chart; the operator injects the
  same PET_* variables (and MASTER_ADDR/MASTER_PORT).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_finetune.pods.pod import (
    build_container,
    build_pod_spec,
    to_dict,
    tolerations_for,
    volumes_for,
)
from airflow_provider_finetune.pods.spec import MANAGED_BY, EngineJobSpec, dns_name


def torchrun_command(engine_args: list[str]) -> list[str]:
    """``torchrun`` taking nodes, ranks and rendezvous from the injected PET_* variables."""
    return ["torchrun", "-m", "finetune_engine.cli.main", *engine_args]


def build_trainjob(spec: EngineJobSpec, num_nodes: int, procs_per_node: int, runtime: str = "torch-distributed") -> dict[str, Any]:
    if num_nodes < 1 or procs_per_node < 1:
        raise ValueError(f"num_nodes ({num_nodes}) and procs_per_node ({procs_per_node}) must be >= 1")
    container = to_dict(build_container(spec, "node"))
    pod = to_dict(build_pod_spec(spec, "node"))
    resources = container["resources"]
    patch_container = {"name": "node", "securityContext": container["securityContext"], "volumeMounts": container["volumeMounts"]}
    pod_patch = {k: v for k, v in {
        "securityContext": pod["securityContext"],
        "volumes": pod["volumes"],
        "tolerations": pod.get("tolerations"),
        "nodeSelector": pod.get("nodeSelector"),
        "serviceAccountName": pod.get("serviceAccountName"),
        "containers": [patch_container],
    }.items() if v}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": dns_name(spec.name), "namespace": spec.namespace, "labels": {**MANAGED_BY, **spec.labels}},
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": runtime},
            "trainer": {
                "image": spec.image,
                "command": list(spec.command),
                "env": container["env"],
                "numNodes": num_nodes,
                "numProcPerNode": procs_per_node,
                "resourcesPerNode": resources,
            },
            **({"activeDeadlineSeconds": spec.active_deadline_seconds} if spec.active_deadline_seconds else {}),
            "runtimePatches": [{
                "manager": "airflow-provider-finetune",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": "node", "template": {"spec": {"template": {"spec": pod_patch}}}}
                ]}}},
            }],
        },
    }


def build_pytorchjob(spec: EngineJobSpec, num_nodes: int, procs_per_node: int, elastic: dict[str, Any] | None = None) -> dict[str, Any]:
    if num_nodes < 1 or procs_per_node < 1:
        raise ValueError(f"num_nodes ({num_nodes}) and procs_per_node ({procs_per_node}) must be >= 1")
    pod = to_dict(build_pod_spec(spec, "pytorch", restart_policy="OnFailure"))
    pod.pop("restartPolicy", None)
    pod.pop("activeDeadlineSeconds", None)
    labels = {**MANAGED_BY, **spec.labels}
    template = {"metadata": {"labels": labels}, "spec": pod}
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if num_nodes > 1:
        replicas["Worker"] = {"replicas": num_nodes - 1, "restartPolicy": "OnFailure", "template": template}
    job_spec: dict[str, Any] = {"pytorchReplicaSpecs": replicas, "nprocPerNode": str(procs_per_node),
                                "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3}}
    if spec.active_deadline_seconds:
        job_spec["runPolicy"]["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if elastic:
        job_spec["elasticPolicy"] = {"rdzvBackend": "c10d", "minReplicas": num_nodes, "maxReplicas": num_nodes,
                                     "maxRestarts": 3, **elastic}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": dns_name(spec.name), "namespace": spec.namespace, "labels": labels}, "spec": job_spec}


__all__ = ["build_pytorchjob", "build_trainjob", "torchrun_command", "tolerations_for", "volumes_for"]
