"""vLLM serving manifests: golden, official schemas, restricted PSS, LoRA ranks, secrets by reference."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.serving import (
    VLLM_IMAGES,
    VLLM_LORA_RANKS,
    ServeSpec,
    build_httproute,
    build_ingress,
    build_vllm_deployment,
    build_vllm_service,
    check_lora_ranks,
    vllm_args,
)
from airflow_provider_finetune.pods.spec import SecretEnv
from tests.provider.conftest import CANARY, K8S_VERSIONS, assert_golden, containers

SPEC = ServeSpec(
    name="tutorial-best",
    model_uri="s3://finetune/experiments/t/r16/checkpoint-final",
    served_model_name="tiny-llama-argilla",
    engine_image="registry.example/finetune-engine-cuda:0.1.0",
    gpus=2,
    adapters={
        "r16": "s3://finetune/experiments/t/r16/checkpoint-final-adapter",
        "r32": "s3://finetune/experiments/t/r32/checkpoint-final-adapter",
    },
    adapter_ranks={"r16": 16, "r32": 32},
    engine_args={"gpu_memory_utilization": 0.9, "enforce_eager": True, "disable_log_requests": False},
    namespace="finetune",
    env={"AWS_ENDPOINT_URL": "http://minio.storage:9000"},
)
AMD = ServeSpec(
    name="merged",
    model_uri="s3://finetune/experiments/t/r16/checkpoint-final",
    served_model_name="org/merged",
    engine_image="registry.example/finetune-engine-rocm:0.1.0",
    gpus=8,
    gpu_vendor="amd",
    model_storage_class="fast-nvme",
    model_volume_size="400Gi",
    api_key_secret=SecretEnv("VLLM_API_KEY", "vllm-api-key", "key"),
    supplemental_groups=[44, 110],
    engine_args={"override_generation_config": {"temperature": 0.2}},
)
CPU = ServeSpec(
    name="cpu",
    model_uri="s3://b/m",
    served_model_name="m",
    engine_image="i",
    gpus=0,
    cpu_per_gpu="8",
    memory_per_gpu="16Gi",
)


def _docs():
    for spec in (SPEC, AMD, CPU):
        yield build_vllm_deployment(spec)
        yield build_vllm_service(spec)
    yield build_ingress(SPEC, "chat.example.com", "nginx", tls_secret="chat-tls")


def test_golden():
    assert_golden("vllm-deployment-lora-nvidia", build_vllm_deployment(SPEC))
    assert_golden("vllm-deployment-amd-ephemeral", build_vllm_deployment(AMD))
    assert_golden("vllm-service", build_vllm_service(SPEC))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate(version):
    for doc in _docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_deployment_is_restricted():
    for spec in (SPEC, AMD, CPU):
        assert restricted_violations(build_vllm_deployment(spec)) == []


def test_deployment_renders_vllm_server():
    dep = build_vllm_deployment(SPEC)
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == VLLM_IMAGES["nvidia"] and server["command"] == [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    args = server["args"]
    assert args[args.index("--model") + 1] == "/models/tiny-llama-argilla"
    assert args[args.index("--served-model-name") + 1] == "tiny-llama-argilla"
    assert args[args.index("--tensor-parallel-size") + 1] == "2" and args[args.index("--port") + 1] == "8000"
    assert args[args.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in args
    lora = args[args.index("--lora-modules") + 1 : args.index("--lora-modules") + 3]
    assert lora == ["r16=/models/adapters/r16", "r32=/models/adapters/r32"]
    assert "--enforce-eager" in args and args[args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--disable-log-requests" not in args
    assert (
        server["resources"]["limits"]["nvidia.com/gpu"]
        == server["resources"]["requests"]["nvidia.com/gpu"]
        == "2"
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    startup = server["startupProbe"]
    assert (
        startup["httpGet"]["path"] == "/health"
        and startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    )
    assert (
        server["readinessProbe"]["httpGet"]["path"] == server["livenessProbe"]["httpGet"]["path"] == "/health"
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
        and "emptyDir" in volumes["models"]
    )
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["HOME"] == "/cache" and env["HF_HUB_OFFLINE"] == "1" and env["USER"] == "vllm"
    assert (
        pod["securityContext"]["runAsUser"] == 1000
        and server["securityContext"]["readOnlyRootFilesystem"] is True
    )
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert dep["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


def test_init_containers_pull_complete_prefixes_without_a_shell():
    pod = build_vllm_deployment(SPEC)["spec"]["template"]["spec"]
    inits = pod["initContainers"]
    assert [c["name"] for c in inits] == ["pull-model", "pull-adapter-r16", "pull-adapter-r32"]
    for c in inits:
        assert c["image"] == SPEC.engine_image
        assert c["command"][:3] == ["finetune-engine", "pull", "--wait-complete"]
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"] == {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "finetune-bucket", "key": "AWS_SECRET_ACCESS_KEY"}},
        }
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert inits[0]["command"][-2:] == [SPEC.model_uri, "/models/tiny-llama-argilla"]
    assert inits[2]["command"][-2:] == [SPEC.adapters["r32"], "/models/adapters/r32"]
    text = json.dumps(pod)
    assert "curl" not in text and "wget" not in text and "/bin/sh" not in text


def test_amd_ephemeral_model_volume_api_key_and_groups():
    dep = build_vllm_deployment(AMD)
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == VLLM_IMAGES["amd"] and server["resources"]["limits"]["amd.com/gpu"] == "8"
    assert "nvidia" not in json.dumps(dep)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "fast-nvme"
    env = {e["name"]: e for e in server["env"]}
    assert env["VLLM_API_KEY"] == {
        "name": "VLLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "key"}},
    }
    assert pod["securityContext"]["supplementalGroups"] == [44, 110]
    args = server["args"]
    assert args[args.index("--model") + 1] == "/models/org-merged"
    assert json.loads(args[args.index("--override-generation-config") + 1]) == {"temperature": 0.2}
    assert "--enable-lora" not in args


def test_cpu_server_has_no_gpu():
    dep = build_vllm_deployment(CPU)
    assert "gpu" not in json.dumps(dep) and dep["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert "--tensor-parallel-size" in vllm_args(CPU)


def test_service_and_optional_routes():
    dep, svc = build_vllm_deployment(SPEC), build_vllm_service(SPEC)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["name"] == dep["metadata"]["name"]
    route = build_httproute(SPEC, "public", ["chat.example.com"], gateway_namespace="gateways")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["spec"]["hostnames"] == [
        "chat.example.com"
    ]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": svc["metadata"]["name"], "port": 80}]
    ingress = build_ingress(SPEC, "chat.example.com")
    assert "ingressClassName" not in ingress["spec"] and "tls" not in ingress["spec"]


def test_lora_rank_checks():
    assert check_lora_ranks({"a": 4, "b": 12}) == 16
    assert check_lora_ranks({"a": 64}) == 64
    assert check_lora_ranks({"a": 300}) == 320
    assert check_lora_ranks({"a": 16}, 64) == 64
    assert all(check_lora_ranks({"a": r}) == r for r in VLLM_LORA_RANKS)
    with pytest.raises(ValueError, match="exceed max_lora_rank 16"):
        check_lora_ranks({"a": 4, "big": 32}, 16)
    with pytest.raises(ValueError, match="not one vLLM accepts"):
        check_lora_ranks({"a": 4}, 12)
    with pytest.raises(ValueError, match="merge the adapter instead"):
        check_lora_ranks({"a": 1024})
    with pytest.raises(ValueError, match="positive integers"):
        check_lora_ranks({"a": 0})
    with pytest.raises(ValueError, match="exceed"):
        build_vllm_deployment(
            ServeSpec(
                name="x",
                model_uri="s3://b/m",
                served_model_name="m",
                engine_image="i",
                adapters={"a": "s3://bkt/a"},
                adapter_ranks={"a": 64},
                max_lora_rank=32,
            )
        )
    with pytest.raises(ValueError, match="adapter_ranks has no rank for \\['a'\\]"):
        build_vllm_deployment(
            ServeSpec(
                name="x",
                model_uri="s3://b/m",
                served_model_name="m",
                engine_image="i",
                adapters={"a": "s3://bkt/a"},
            )
        )


def test_spec_errors_name_the_problem():
    base = {"name": "x", "model_uri": "s3://b/m", "served_model_name": "m", "engine_image": "i"}
    with pytest.raises(ValueError, match="model_uri '/local/m' must be an s3:// URI"):
        ServeSpec(**{**base, "model_uri": "/local/m"})
    with pytest.raises(ValueError, match="adapter names \\['bad name'\\]"):
        ServeSpec(**{**base, "adapters": {"bad name": "s3://b/a"}})
    with pytest.raises(ValueError, match="startup_budget_seconds 60"):
        ServeSpec(**{**base, "startup_budget_seconds": 60})
    with pytest.raises(
        ValueError, match="engine_args \\['port', 'tensor_parallel_size'\\] are set by the builder"
    ):
        vllm_args(ServeSpec(**{**base, "engine_args": {"port": 9000, "tensor_parallel_size": 4}}))


@pytest.mark.parametrize("field", ["env", "engine_args", "api_key_env"])
def test_secret_canary_never_reaches_serving(field):
    base = {"name": "x", "model_uri": "s3://b/m", "served_model_name": "m", "engine_image": "i"}
    kwargs = {
        "env": {"env": {"HF_TOKEN": CANARY}},
        "engine_args": {"engine_args": {"api_key": CANARY}},
        "api_key_env": {"env": {"VLLM_API_KEY": CANARY}},
    }[field]
    with pytest.raises(ValueError) as err:
        build_vllm_deployment(ServeSpec(**{**base, **kwargs}))
    assert CANARY not in str(err.value)


def test_rendered_serving_objects_hold_references_only():
    for doc in _docs():
        assert CANARY not in yaml.safe_dump(doc)
        for c in containers(doc):
            for e in c.get("env") or []:
                if "SECRET" in e["name"] or e["name"].endswith(("TOKEN", "API_KEY")):
                    assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], e
