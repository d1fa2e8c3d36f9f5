"""Pure builders: engine job spec -> Pod / Deployment / Service / TrainJob / PyTorchJob manifests.

No cluster access and no side effects: the operators and runners call these and act on the result.
"""

from airflow_provider_finetune.pods.distributed import build_pytorchjob, build_trainjob, torchrun_command
from airflow_provider_finetune.pods.pod import build_pod, pod_to_dict
from airflow_provider_finetune.pods.security import check_restricted, restricted_violations
from airflow_provider_finetune.pods.serving import (
    ServeSpec,
    build_httproute,
    build_ingress,
    build_vllm_deployment,
    build_vllm_service,
    check_lora_ranks,
)
from airflow_provider_finetune.pods.spec import EngineJobSpec, Scratch, SecretEnv, labels_for, name_for

__all__ = [
    "EngineJobSpec",
    "Scratch",
    "SecretEnv",
    "ServeSpec",
    "build_httproute",
    "build_ingress",
    "build_pod",
    "build_pytorchjob",
    "build_trainjob",
    "build_vllm_deployment",
    "build_vllm_service",
    "check_lora_ranks",
    "check_restricted",
    "labels_for",
    "name_for",
    "pod_to_dict",
    "restricted_violations",
    "torchrun_command",
]
