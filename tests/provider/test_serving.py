"""vLLM serving manifests: official schemas, restricted PSS, LoRA rank checks, secrets by reference."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.serving import (
    ServeSpec,
    build_ingress,
    build_vllm_deployment,
    build_vllm_service,
    check_lora_ranks,
)
from tests.provider.conftest import K8S_VERSIONS

SPEC = ServeSpec(
    name="tutorial-best", model_uri="s3://finetune/experiments/t/r16/checkpoint-final", served_model_name="tiny-llama-argilla",
    engine_image="registry.example/finetune-engine-cuda:0.1.0", gpus=2,
    adapters={"r16": "s3://finetune/experiments/t/r16/checkpoint-final-adapter", "r32": "s3://finetune/experiments/t/r32/checkpoint-final-adapter"},
    adapter_ranks={"r16": 16, "r32": 32}, engine_args={"gpu_memory_utilization": 0.9, "enforce_eager": True, "disable_log_requests": False},
    namespace="finetune",
)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate(version):
    for doc in (build_vllm_deployment(SPEC), build_vllm_service(SPEC), build_ingress(SPEC, "chat.example.com", "nginx")):
        kubernetes_validate.validate(doc, version, strict=True)


def test_deployment_renders_vllm_server():
    dep = build_vllm_deployment(SPEC)
    assert restricted_violations(dep) == []
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    args = server["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in args
    assert "r16=/models/adapters/r16" in args and "r32=/models/adapters/r32" in args
    assert "--enforce-eager" in args and args[args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--disable-log-requests" not in args
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "2"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    init = pod["initContainers"][0]
    assert init["image"] == SPEC.engine_image and "--wait-complete" in init["command"][-1]
    assert "curl" not in json.dumps(pod) and "wget" not in json.dumps(pod)
    env = {e["name"]: e for e in init["env"]}
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    svc = build_vllm_service(SPEC)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_lora_rank_checks():
    assert check_lora_ranks({"a": 4, "b": 12}) == 16
    assert check_lora_ranks({"a": 64}) == 64
    with pytest.raises(ValueError, match="exceed max_lora_rank 16"):
        check_lora_ranks({"a": 4, "big": 32}, 16)
    with pytest.raises(ValueError, match="not one vLLM accepts"):
        check_lora_ranks({"a": 4}, 12)
    with pytest.raises(ValueError, match="merge the adapter instead"):
        check_lora_ranks({"a": 1024})
    with pytest.raises(ValueError, match="exceed"):
        build_vllm_deployment(ServeSpec(name="x", model_uri="s3://b/m", served_model_name="m", engine_image="i",
                                        adapters={"a": "s3://bkt/a"}, adapter_ranks={"a": 64}, max_lora_rank=32))
