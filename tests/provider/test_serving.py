"""vLLM serving manifests: golden, official schemas, restricted PSS, LoRA ranks, secrets by reference."""

from __future__ import annotations

import functools
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
    assert server["image"] == VLLM_IMAGES["nvidia"] and server["command"] == ["vllm", "serve"]
    args = server["args"]
    assert (
        args[0] == "/models/tiny-llama-argilla" and "--model" not in args
    )  # positional, as vllm serve wants
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
    assert args[0] == "/models/org-merged"
    assert json.loads(args[args.index("--override-generation-config") + 1]) == {"temperature": 0.2}
    assert "--enable-lora" not in args


def test_cpu_server_has_no_gpu():
    dep = build_vllm_deployment(CPU)
    assert "gpu" not in json.dumps(dep)
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
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
    with pytest.raises(ValueError, match="model_uri '/local/m' must be an s3:// or oci:// URI"):
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


# -- engine arguments, rollouts, runtime LoRA, NetworkPolicy, KServe ------------------------------


@pytest.mark.parametrize(
    "key,field",
    [
        ("api-key", "api_key_secret"),
        ("--api-key", "api_key_secret"),
        ("tensor-parallel-size", "tensor_parallel_size"),
        ("--max_model_len", "max_model_len"),
        ("model", "model_uri"),
    ],
)
def test_reserved_arguments_are_refused_in_any_spelling(key, field):
    from airflow_provider_finetune.pods.serving import engine_flags

    with pytest.raises(ValueError, match=f"set by the builder; use {field}"):
        engine_flags("here", {key: "x"})


def test_engine_arguments_are_normalised_and_a_repeat_is_refused():
    from airflow_provider_finetune.pods.serving import engine_flags

    assert engine_flags("here", {"--max-num-seqs": 8, "enforce_eager": True}) == [
        "--enforce-eager",
        "--max-num-seqs",
        "8",
    ]
    with pytest.raises(ValueError, match="'max-num-seqs' and 'max_num_seqs' are the same vLLM argument"):
        engine_flags("here", {"max-num-seqs": 8, "max_num_seqs": 16})


def _spec(**kw) -> ServeSpec:
    return ServeSpec(**{**SPEC.__dict__, "engine_args": {}, **kw})


def test_tensor_parallel_size_is_separate_from_gpus():
    args = vllm_args(_spec(gpus=6, tensor_parallel_size=4))
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    with pytest.raises(ValueError, match="tensor_parallel_size 8 > gpus 6"):
        _spec(gpus=6, tensor_parallel_size=8)


@pytest.mark.parametrize("version", K8S_VERSIONS[-1:])
def test_rollouts(version):
    rolling = build_vllm_deployment(_spec(rollout="rolling"))
    assert rolling["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    blue = _spec(rollout="blue-green", revision="abc123")
    dep, svc = build_vllm_deployment(blue), build_vllm_service(blue)
    assert dep["metadata"]["name"].startswith("tutorial-best-abc123-")
    assert svc["metadata"]["name"] == build_vllm_service(SPEC)["metadata"]["name"]  # the stable name
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["selector"]["matchLabels"]["finetune.airflow.apache.org/revision"] == "abc123"
    for doc in (rolling, dep, svc):
        kubernetes_validate.validate(doc, version, strict=True)
    with pytest.raises(ValueError, match="rollout 'blue-green' needs a revision"):
        _spec(rollout="blue-green")
    with pytest.raises(ValueError, match="rollout 'canary'"):
        _spec(rollout="canary")


def test_runtime_lora_and_progress_deadline():
    spec = _spec(
        adapters={}, adapter_ranks={}, runtime_lora=True, max_lora_rank=32, ready_timeout_seconds=5400
    )
    dep = build_vllm_deployment(spec)
    server = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert (
        server["args"][server["args"].index("--max-lora-rank") + 1] == "32"
        and "--enable-lora" in server["args"]
    )
    assert dep["spec"]["progressDeadlineSeconds"] == 5400
    # probes leave a loaded server time to answer
    assert all(server[p]["timeoutSeconds"] >= 5 for p in ("startupProbe", "readinessProbe", "livenessProbe"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_networkpolicy_admits_only_the_vllm_port(version):
    from airflow_provider_finetune.pods.serving import build_vllm_networkpolicy

    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    policy = build_vllm_networkpolicy(SPEC, peers)
    kubernetes_validate.validate(policy, version, strict=True)
    assert policy["spec"]["podSelector"]["matchLabels"] == build_vllm_service(SPEC)["spec"]["selector"]
    assert policy["spec"]["ingress"] == [{"from": peers, "ports": [{"protocol": "TCP", "port": 8000}]}]
    assert build_vllm_networkpolicy(SPEC)["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]


def _strict(schema):
    """The schema with unknown fields refused (one pass; the KServe CRDs are 40k lines)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(crd: str):
    import jsonschema

    from tests.provider.conftest import CRDS, crd_schema

    if not (CRDS / crd).exists():
        crd_schema(crd)  # skips (or fails in CI) with the reason
    doc = yaml.load((CRDS / crd).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _validate_crd(doc: dict, crd: str) -> None:
    _crd_validator(crd).validate(doc)


def test_inference_service_scales_to_zero_and_validates_against_the_kserve_crd():
    from airflow_provider_finetune.pods.kserve import build_inference_service

    spec = _spec(api_key_secret=SecretEnv("VLLM_API_KEY", "vllm-api-key", "key"), max_model_len=4096)
    isvc = build_inference_service(spec, min_replicas=0, max_replicas=2, service_account="kserve-s3")
    _validate_crd(isvc, "kserve/serving.kserve.io_inferenceservices.yaml")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    pred = isvc["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["serviceAccountName"]) == (0, 2, "kserve-s3")
    model = pred["model"]
    assert model["modelFormat"] == {"name": "vLLM"} and model["runtime"] == "kserve-vllmserver"
    # adapters: the model and each adapter pulled by the storage initializer, served by name
    assert pred["storageUris"][0] == {"uri": SPEC.model_uri, "mountPath": "/mnt/models"}
    assert {"uri": SPEC.adapters["r16"], "mountPath": "/mnt/adapters/r16"} in pred["storageUris"]
    assert "r16=/mnt/adapters/r16" in model["args"] and "--max-lora-rank=32" in model["args"]
    assert "--max-model-len=4096" in model["args"] and "--tensor-parallel-size=2" in model["args"]
    env = {e["name"]: e for e in model["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "vllm-api-key", "key": "key"}}
    assert not any("api-key" in a or "api_key" in a for a in model["args"])
    plain = build_inference_service(_spec(adapters={}, adapter_ranks={}), min_replicas=1)
    _validate_crd(plain, "kserve/serving.kserve.io_inferenceservices.yaml")
    assert plain["spec"]["predictor"]["model"]["storageUri"] == SPEC.model_uri
    assert plain["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_the_runtime_the_inference_service_names_serves_its_format():
    """kserve-vllmserver, as KServe ships it, is a valid ClusterServingRuntime for the vLLM format."""
    from tests.provider.conftest import CRDS

    runtime = yaml.safe_load((CRDS / "kserve" / "runtime-kserve-vllmserver.yaml").read_text())
    _validate_crd(runtime, "kserve/serving.kserve.io_clusterservingruntimes.yaml")
    assert runtime["metadata"]["name"] == "kserve-vllmserver"
    assert {"name": "vLLM", "version": "1", "autoSelect": True, "priority": 1} in runtime["spec"][
        "supportedModelFormats"
    ]


@pytest.mark.parametrize(
    "status,state,words",
    [
        (
            {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://m.example.com"},
            "ready",
            "m.example",
        ),
        (
            {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]},
            "waiting",
            "Ready=False",
        ),
        (
            {
                "conditions": [{"type": "Ready", "status": "False"}],
                "modelStatus": {
                    "transitionStatus": "BlockedByFailedLoad",
                    "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no config.json"},
                },
            },
            "failed",
            "ModelLoadFailed: no config.json",
        ),
        (
            {
                "conditions": [
                    {"type": "PredictorReady", "status": "False", "reason": "RevisionFailed", "message": "x"}
                ]
            },
            "failed",
            "PredictorReady: RevisionFailed",
        ),
    ],
)
def test_inference_service_readiness(status, state, words):
    from airflow_provider_finetune.pods.kserve import inference_service_readiness

    got, message = inference_service_readiness(
        {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, **status}}
    )
    assert got == state and words in message
