"""KServe: the same vLLM server as a ``serving.kserve.io/v1beta1`` InferenceService.

Why an InferenceService on KServe's own ``kserve-vllmserver`` ClusterServingRuntime (and not an
LLMInferenceService): the InferenceService is KServe's stable API, it scales to zero through
Knative (``Serverless`` mode, ``minReplicas: 0``), its storage initializer pulls ``s3://`` prefixes
with the credentials of a service account (KServe's S3 Secret annotations), and the runtime is the
plain vLLM OpenAI server, so ``VLLM_API_KEY`` and the LoRA flags work as on a Deployment. The
LLMInferenceService (``serving.kserve.io/v1alpha1``) targets llm-d (disaggregated prefill/decode,
a Gateway API inference pool) and needs the Gateway API Inference Extension installed; it is still
alpha and does not scale to zero, so it is not the default.

The model comes from ``spec.model_uri`` (``storageUri``); with LoRA adapters the predictor's
``storageUris`` mount the model at ``/mnt/models`` and each adapter at ``/mnt/adapters/<name>``.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_finetune.pods.serving import (
    GPU_RESOURCES,
    MANAGED_BY,
    ServeSpec,
    _selector,
    check_lora_ranks,
    engine_flags,
)
from airflow_provider_finetune.pods.spec import dns_name

KSERVE_RUNTIME = "kserve-vllmserver"  # the ClusterServingRuntime KServe ships (config/runtimes/)
KSERVE_API = "serving.kserve.io/v1beta1"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
KSERVE_MODEL_DIR = "/mnt/models"
KSERVE_ADAPTER_DIR = "/mnt/adapters"


def kserve_args(spec: ServeSpec) -> list[str]:
    """Arguments added to the runtime's own (``--model=/mnt/models --port=8080``); a repeated flag
    takes the last value, so ``--served-model-name`` replaces the runtime's ``{{.Name}}``."""
    args = [f"--served-model-name={spec.served_model_name}", f"--tensor-parallel-size={spec.tp}"]
    if spec.max_model_len:
        args.append(f"--max-model-len={spec.max_model_len}")
    if spec.gpu_memory_utilization:
        args.append(f"--gpu-memory-utilization={spec.gpu_memory_utilization}")
    if spec.adapters or spec.runtime_lora:
        rank = (
            check_lora_ranks({n: spec.adapter_ranks[n] for n in spec.adapters}, spec.max_lora_rank)
            if spec.adapters
            else spec.max_lora_rank or 16
        )
        args += ["--enable-lora", f"--max-lora-rank={rank}", f"--max-loras={max(len(spec.adapters), 1)}"]
        if spec.adapters:
            args += ["--lora-modules", *[f"{n}={KSERVE_ADAPTER_DIR}/{n}" for n in sorted(spec.adapters)]]
    return args + engine_flags(f"ServeSpec {spec.name!r}", spec.engine_args)


def build_inference_service(
    spec: ServeSpec,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    service_account: str | None = None,
    runtime: str = KSERVE_RUNTIME,
    deployment_mode: str | None = None,
) -> dict[str, Any]:
    """The InferenceService. ``min_replicas=0`` scales to zero (Knative: ``Serverless`` mode, the
    default then); otherwise ``RawDeployment``. ``service_account`` carries the S3 credentials the
    storage initializer uses (a Secret with KServe's ``serving.kserve.io/s3-*`` annotations)."""
    if min_replicas < 0:
        raise ValueError(f"ServeSpec {spec.name!r}: min_replicas must be >= 0")
    mode = deployment_mode or ("Serverless" if min_replicas == 0 else "RawDeployment")
    if min_replicas == 0 and mode != "Serverless":
        raise ValueError(f"ServeSpec {spec.name!r}: min_replicas 0 (scale to zero) needs the Serverless mode")
    top = max(max_replicas or spec.replicas or 1, min_replicas, 1)
    resources: dict[str, Any] = {
        "requests": {"cpu": spec.cpu_per_gpu, "memory": spec.memory or spec.memory_per_gpu}
    }
    resources["limits"] = {"memory": resources["requests"]["memory"]}
    if spec.gpus:
        gpu = GPU_RESOURCES[spec.gpu_vendor]
        resources["requests"][gpu] = resources["limits"][gpu] = str(spec.gpus)
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    if spec.runtime_lora:
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    if spec.api_key_secret:
        ref = {"name": spec.api_key_secret.secret_name, "key": spec.api_key_secret.secret_key}
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    model: dict[str, Any] = {
        "modelFormat": {"name": "vLLM"},
        "runtime": runtime,
        "args": kserve_args(spec),
        "env": env,
        "resources": resources,
    }
    predictor: dict[str, Any] = {"minReplicas": min_replicas, "maxReplicas": top, "model": model}
    if spec.adapters:
        predictor["storageUris"] = [{"uri": spec.model_uri, "mountPath": KSERVE_MODEL_DIR}] + [
            {"uri": uri, "mountPath": f"{KSERVE_ADAPTER_DIR}/{n}"} for n, uri in sorted(spec.adapters.items())
        ]
    else:
        model["storageUri"] = spec.model_uri
    if service_account:
        predictor["serviceAccountName"] = service_account
    tolerations = list(spec.tolerations)
    if spec.gpus and not any(t.get("key") == GPU_RESOURCES[spec.gpu_vendor] for t in tolerations):
        tolerations.append(
            {"key": GPU_RESOURCES[spec.gpu_vendor], "operator": "Exists", "effect": "NoSchedule"}
        )
    if tolerations:
        predictor["tolerations"] = tolerations
    if spec.node_selector:
        predictor["nodeSelector"] = dict(spec.node_selector)
    if spec.supplemental_groups:
        predictor["securityContext"] = {"supplementalGroups": list(spec.supplemental_groups)}
    meta: dict[str, Any] = {
        "name": dns_name(spec.name),
        "labels": {**MANAGED_BY, **_selector(spec), **spec.labels},
        "annotations": {DEPLOYMENT_MODE: mode},
    }
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }


def inference_service_readiness(doc: dict[str, Any]) -> tuple[str, str]:
    """(state, message) of an InferenceService: ``ready`` when its Ready condition is True (also when
    scaled to zero: Knative's activator wakes it on the next request), ``failed`` when the model
    failed to load (``status.modelStatus``) or a condition reports a failure reason, else ``waiting``."""
    status = doc.get("status") or {}
    generation = int((doc.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    model = status.get("modelStatus") or {}
    failure = model.get("lastFailureInfo") or {}
    if model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec") or failure:
        why = failure.get("reason") or model.get("transitionStatus")
        return "failed", f"model not loaded: {why}: {failure.get('message') or ''}".rstrip(": ")
    ready = conditions.get("Ready") or {}
    if ready.get("status") == "True" and observed >= generation:
        url = status.get("url") or ""
        return "ready", f"Ready{' at ' + url if url else ''}"
    bad = [
        c
        for c in conditions.values()
        if c.get("status") == "False"
        and c.get("reason")
        and c.get("severity", "Error") == "Error"
        and c.get("reason") not in ("PredictorConfigurationReady", "RevisionMissing", "Unknown")
        and any(w in c.get("reason", "") for w in ("Fail", "Error", "Invalid", "Exceeded", "BackOff"))
    ]
    if bad:
        c = bad[0]
        return "failed", f"{c['type']}: {c['reason']}: {c.get('message') or ''}".rstrip(": ")
    pending = [f"{t}={c.get('status')}" for t, c in sorted(conditions.items()) if c.get("status") != "True"]
    return "waiting", "not Ready yet" + (f" ({', '.join(pending)})" if pending else "")
