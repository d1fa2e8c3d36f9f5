"""DeployVLLMOperator / UndeployVLLMOperator: serve a model (and LoRA adapters) with vLLM's
OpenAI server — a Deployment + Service on the cluster, or a local vLLM process on the worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from airflow_provider_finetune import checks, settings
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.links import ServedEndpointLink
from airflow_provider_finetune.oci import check_oci_reference
from airflow_provider_finetune.pods.kserve import KSERVE_RUNTIME, build_inference_service
from airflow_provider_finetune.pods.pod import parse_quantity
from airflow_provider_finetune.pods.serving import (
    REVISION_LABEL,
    ROLLOUTS,
    ServeSpec,
    build_httproute,
    build_ingress,
    build_vllm_deployment,
    build_vllm_networkpolicy,
    build_vllm_service,
    check_lora_ranks,
    engine_flags,
)
from airflow_provider_finetune.pods.spec import SecretEnv, dns_name
from airflow_provider_finetune.runners.kubernetes_apply import (
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    KubernetesApplier,
    Target,
    is_managed,
)
from airflow_provider_finetune.runners.vllm_local import (
    VLLM_INSTALL,
    chat_once,
    fetch_source,
    load_lora_adapter,
    start_vllm,
    stop_local,
)
from airflow_provider_finetune.triggers.deployment import KSERVE_POD_LABEL

# the local server's helpers, importable from here too (DAGs use chat_once)
__all__ = [
    "DeployVLLMOperator",
    "UndeployVLLMOperator",
    "VLLM_INSTALL",
    "chat_once",
    "load_lora_adapter",
    "proxy_post_json",
    "undeploy",
    "start_vllm",
    "stop_local",
]


def proxy_post_json(
    api_client: Any, namespace: str, service: str, path: str, body: dict, timeout: float = 120
) -> dict:
    """POST ``body`` as JSON to ``path`` of a Service through the Kubernetes API server's proxy.

    ``CoreV1Api.connect_post_namespaced_service_proxy_with_path`` takes no body, so the request is
    made with the client's ``call_api`` (same auth, TLS and host as every other call). ``service``
    may name the port (``name:http``); ``path`` stays literal (the generated method would encode
    its slashes).
    """
    resp = api_client.call_api(
        f"/api/v1/namespaces/{{namespace}}/services/{{name}}/proxy/{path.lstrip('/')}",
        "POST",
        path_params={"namespace": namespace, "name": service},
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _return_http_data_only=True,
        _request_timeout=timeout,
    )
    return json.loads(resp.data)


# What DeployVLLMOperator may create, in the order UndeployVLLMOperator deletes it. The routes are
# created only when asked: absent (404) or not allowed (403, RBAC without route rules) means there
# is nothing of ours to remove.
SERVED_OBJECTS = (
    Target("Deployment", "apps/v1"),
    Target("Service", "v1"),
    Target("Ingress", "networking.k8s.io/v1", optional=True),
    Target("HTTPRoute", "gateway.networking.k8s.io/v1", optional=True),
    Target("NetworkPolicy", "networking.k8s.io/v1", optional=True),
    Target("InferenceService", "serving.kserve.io/v1beta1", optional=True),
)
INGRESS_KEYS = ("host", "ingress_class", "tls_secret")
HTTPROUTE_KEYS = ("gateway", "hostnames", "gateway_namespace", "section_name")


def _route_kwargs(option: str, value: Any, allowed: tuple[str, ...], required: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FinetuneConfigError(
            f"{option} must be a mapping with keys {list(allowed)}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise FinetuneConfigError(f"{option}: unknown keys {unknown}; use {list(allowed)}")
    if not value.get(required):
        raise FinetuneConfigError(f"{option}.{required} is required")
    return dict(value)


def parse_secret_ref(option: str, value: Any) -> SecretEnv:
    """``{"name": SECRET, "key": KEY}`` or ``"SECRET/KEY"`` as the VLLM_API_KEY reference."""
    if isinstance(value, str) and value.count("/") == 1:
        name, key = value.split("/")
    elif isinstance(value, dict) and set(value) == {"name", "key"}:
        name, key = str(value["name"]), str(value["key"])
    else:
        raise FinetuneConfigError(
            f"{option} {value!r}: give the Secret's name and key, as {{'name': 'vllm-api-key', 'key': "
            "'api-key'}} or 'vllm-api-key/api-key' (the key's value never goes into the DAG)"
        )
    checks.check_service_account(f"{option} name", name)  # a Secret name is a DNS-1123 subdomain too
    if not _SECRET_KEY.match(key):
        raise FinetuneConfigError(f"{option} key {key!r}: a Secret key is letters, digits, '-', '_' and '.'")
    return SecretEnv("VLLM_API_KEY", name, key)


_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
PLATFORMS = ("deployment", "kserve")


def _revision(doc: dict[str, Any]) -> str:
    """A short hash of what a blue-green revision serves: the same spec gives the same revision, so
    a rerun finds its Deployment again."""
    import hashlib

    template = doc["spec"]["template"]
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:8]


class DeployVLLMOperator(BaseOperator):
    """Serve ``model_uri`` (a complete bucket prefix) with vLLM, optionally with LoRA adapters.

    On the cluster it creates, or replaces on a rerun, a Deployment and a Service (and the optional
    routes and NetworkPolicy) named after ``served_model_name``; an existing object of that name
    that the provider did not make is refused, never replaced. The Deployment is checked against the
    restricted Pod Security Standard and the secret guard before it is sent. The server runs
    ``vllm serve``; readiness reads the pods and their events too, so an image that cannot be
    pulled, a failed model pull, a crash loop or missing GPU capacity fails the task within a poll
    or two with the reason, not at ``ready_timeout``.

    ``platform="kserve"`` renders a ``serving.kserve.io/v1beta1`` InferenceService on KServe's
    ``kserve-vllmserver`` runtime instead (see :mod:`airflow_provider_finetune.pods.kserve` for why
    not an LLMInferenceService): the storage initializer pulls ``model_uri`` with the S3 credentials
    of ``kserve_service_account``; ``min_replicas=0`` scales to zero (Knative, Serverless mode);
    readiness is the InferenceService's Ready condition, a failure its reason.

    :param model_uri: s3:// prefix of the model (e.g. ``.../checkpoint-final``), or an OCI artifact
        ``oci://REGISTRY/REPOSITORY:TAG`` (also for ``adapters``; not with ``platform="kserve"``).
    :param served_model_name: the model name clients use.
    :param adapters: LoRA adapters to serve beside the model, name -> s3:// prefix.
    :param adapter_ranks: their ranks (to set and check ``--max-lora-rank``).
    :param max_lora_rank: vLLM's ``--max-lora-rank``; default the smallest value vLLM accepts that fits
        every adapter rank.
    :param gpus: GPUs of each server pod.
    :param tensor_parallel_size: vLLM's ``--tensor-parallel-size`` (<= ``gpus``; must divide the
        model's attention heads); 0 or unset: the largest power of two <= ``gpus`` (6 GPUs serve with 4).
    :param gpu_vendor: ``nvidia`` or ``amd``; default ``[finetune] gpu_vendor``.
    :param engine_args: extra vLLM server arguments, e.g. ``{"max_num_seqs": 64}``; keys may be
        written ``max-num-seqs`` or ``--max-num-seqs`` too; one the operator sets itself is refused.
    :param max_model_len: vLLM's ``--max-model-len``; default the model's own on the cluster, 256 on
        the local runner.
    :param gpu_memory_utilization: vLLM's ``--gpu-memory-utilization`` (0-1].
    :param api_key_secret: cluster: the Secret holding the API key, ``{"name": ..., "key": ...}`` or
        ``"name/key"``; the server reads it as ``VLLM_API_KEY`` (a secretKeyRef, never an argument)
        and answers 401 to a request without it. The smoke test reads the key from that Secret
        (RBAC: ``get`` on that Secret) and calls the server directly (the API server's proxy drops
        the ``Authorization`` header), at ``smoke_url`` or the Service's cluster address.
    :param api_key_conn_id: an Airflow connection whose password is the API key: the local runner
        starts vLLM with it (environment, never the command line); on the cluster the smoke test
        uses it instead of reading the Secret.
    :param api_key_env: local runner: the worker's environment variable holding the API key.
    :param allow_unauthenticated_ingress: allow ``ingress`` / ``http_route`` without ``api_key_secret``
        (an open model endpoint); refused by default.
    :param network_policy: cluster: also apply a NetworkPolicy that admits only the vLLM port, from
        these NetworkPolicy peers (``True``: every pod of the namespace). See deploy/.
    :param replicas: server pods (Deployment) or the most replicas (KServe).
    :param memory: the server's memory request and limit; default 32Gi per GPU.
    :param model_volume_size: size of the volume the model is pulled into (default 100Gi).
    :param tolerations: tolerations of the server pods (a GPU toleration is added).
    :param node_selector: nodeSelector of the server pods.
    :param supplemental_groups: extra groups of the server pods (ROCm: the hosts' video and render GIDs).
    :param vllm_image: the vLLM image; default ``vllm/vllm-openai`` (or ``-rocm``) of the pinned release.
    :param rollout: how a changed server replaces the old one: ``recreate`` (default: the old pod stops
        before the new one starts, so no spare GPUs are needed; the endpoint is down meanwhile),
        ``rolling`` (maxSurge 1, maxUnavailable 0: needs the GPUs of one more pod) or ``blue-green``
        (a new Deployment; the Service switches to it once it is ready, then the old one is removed;
        needs a second full set of GPUs).
    :param runtime_lora: start vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` so adapters can be
        loaded into the running server (:func:`load_lora_adapter`) without a restart.
    :param platform: cluster: ``deployment`` (default) or ``kserve``.
    :param min_replicas: KServe: the fewest replicas; 0 scales to zero (Serverless mode).
    :param kserve_service_account: KServe: service account with the S3 credentials of the bucket.
    :param kserve_runtime: KServe: the (Cluster)ServingRuntime; default ``kserve-vllmserver``.
    :param smoke_url: base URL the smoke test calls directly (default: through the API server's proxy;
        with an API key or on KServe: the server's cluster address).
    :param runner: ``kubernetes`` or ``local``; default ``[finetune] runner``.
    :param namespace: cluster: namespace of the Deployment and Service; default ``[finetune] namespace``.
    :param kubernetes_conn_id: cluster: Kubernetes connection; default ``[finetune] kubernetes_conn_id``.
    :param smoke_question: asked once through ``/v1/chat/completions`` after the server is ready.
    :param keep_running: local runner: leave the server running after the task (stop it with
        UndeployVLLMOperator) or stop it at the end of the task.
    :param ready_timeout: seconds the server may take to become ready; on the cluster also the
        Deployment's ``progressDeadlineSeconds``; default pull + startup budget + 10 minutes (7800 s)
        on the cluster, 3600 s locally.
    :param local_port: local runner: port of the server; default a free one.
    :param bucket_conn_id: local runner: Airflow ``aws`` connection the model and adapters are
        downloaded with; default ``[finetune] bucket_conn_id``.
    :param oci_secret: oci:// sources on the cluster: a ``kubernetes.io/dockerconfigjson`` Secret with
        the registry's credentials, passed to the pull init containers as a secretKeyRef.
    :param oci_docker_config: oci:// sources on the local runner: a Docker config file (or directory
        with config.json) on the worker; default ``$DOCKER_CONFIG`` or ``~/.docker``.
    :param oci_plain_http: oci:// sources: talk HTTP to the registry (a registry without TLS).
    :param deferrable: cluster: wait for readiness in the triggerer (DeploymentReadyTrigger) instead
        of on a worker; default ``[operators] default_deferrable``.
    :param poll_interval: seconds between readiness checks.
    :param ingress: cluster, off by default: also create an Ingress to the Service,
        ``{"host": ..., "ingress_class": ..., "tls_secret": ...}`` (host required).
    :param http_route: cluster, off by default: also create a Gateway API HTTPRoute,
        ``{"gateway": ..., "hostnames": [...], "gateway_namespace": ..., "section_name": ...}``.
        Both need RBAC for ``ingresses`` / ``httproutes`` (get, create, patch/update, delete) beyond
        deploy/rbac.yaml.
    """

    template_fields: Sequence[str] = (
        "model_uri",
        "served_model_name",
        "adapters",
        "adapter_ranks",
        "smoke_question",
        "gpus",
        "tensor_parallel_size",
        "engine_args",
        "max_model_len",
        "namespace",
        "replicas",
        "min_replicas",
        "memory",
        "model_volume_size",
        "gpu_memory_utilization",
        "ingress",
        "http_route",
    )
    operator_extra_links = (ServedEndpointLink(),)
    ui_color = "#d8f0e8"

    def __init__(
        self,
        *,
        model_uri: str,
        served_model_name: str,
        adapters: dict[str, str] | None = None,
        adapter_ranks: dict[str, int] | None = None,
        max_lora_rank: int | None = None,
        gpus: int = 1,
        tensor_parallel_size: int | None = None,
        gpu_vendor: str | None = None,
        engine_args: dict[str, Any] | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        api_key_secret: dict[str, str] | str | None = None,
        api_key_conn_id: str | None = None,
        api_key_env: str | None = None,
        allow_unauthenticated_ingress: bool = False,
        network_policy: bool | list[dict[str, Any]] = False,
        replicas: int = 1,
        memory: str | None = None,
        model_volume_size: str | None = None,
        tolerations: list[dict[str, Any]] | None = None,
        node_selector: dict[str, str] | None = None,
        supplemental_groups: list[int] | None = None,
        vllm_image: str | None = None,
        rollout: str = "recreate",
        runtime_lora: bool = False,
        platform: str = "deployment",
        min_replicas: int | None = None,
        kserve_service_account: str | None = None,
        kserve_runtime: str | None = None,
        smoke_url: str | None = None,
        runner: str | None = None,
        namespace: str | None = None,
        kubernetes_conn_id: str | None = None,
        smoke_question: str | None = "Hello! Who are you?",
        keep_running: bool = True,
        ready_timeout: float | None = None,
        local_port: int | None = None,
        bucket_conn_id: str | None = None,
        deferrable: bool | None = None,
        poll_interval: float = 15,
        ingress: dict[str, Any] | None = None,
        http_route: dict[str, Any] | None = None,
        oci_secret: str | None = None,
        oci_docker_config: str | None = None,
        oci_plain_http: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if deferrable is None:
            from airflow_provider_finetune.compat import conf

            deferrable = conf.getboolean("operators", "default_deferrable", fallback=False)
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.ingress = ingress
        self.http_route = http_route
        self.model_uri = model_uri
        self.served_model_name = served_model_name
        self.adapters = adapters or {}
        self.adapter_ranks = adapter_ranks or {}
        self.max_lora_rank = max_lora_rank
        self.gpus = gpus
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_vendor = gpu_vendor
        self.engine_args = engine_args or {}
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.api_key_secret = api_key_secret
        self.api_key_conn_id = api_key_conn_id
        self.api_key_env = api_key_env
        self.allow_unauthenticated_ingress = allow_unauthenticated_ingress
        self.network_policy = network_policy
        self.replicas = replicas
        self.memory = memory
        self.model_volume_size = model_volume_size
        self.tolerations = tolerations or []
        self.node_selector = node_selector or {}
        self.supplemental_groups = supplemental_groups or []
        self.vllm_image = vllm_image
        self.rollout = rollout
        self.runtime_lora = runtime_lora
        self.platform = platform
        self.min_replicas = min_replicas
        self.kserve_service_account = kserve_service_account
        self.kserve_runtime = kserve_runtime
        self.smoke_url = smoke_url
        self.runner = runner
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.smoke_question = smoke_question
        self.keep_running = keep_running
        self.ready_timeout = ready_timeout
        self.local_port = local_port
        self.bucket_conn_id = bucket_conn_id
        self.oci_secret = oci_secret
        self.oci_docker_config = oci_docker_config
        self.oci_plain_http = oci_plain_http
        self._proc: subprocess.Popen | None = None

    # -- shared -----------------------------------------------------------------------------------

    def resolved_namespace(self) -> str:
        return self.namespace or settings.get("namespace")

    def _int(self, option: str, value: Any, minimum: int) -> int | None:
        return (
            None if value in (None, "", "None") else checks.check_positive_int(option, value, minimum=minimum)
        )

    def serve_spec(self, revision: str | None = None) -> ServeSpec:
        extra: dict[str, Any] = {}
        if self.memory:
            extra["memory"] = str(self.memory)
        if self.model_volume_size:
            extra["model_volume_size"] = str(self.model_volume_size)
        if self.ready_timeout:
            extra["ready_timeout_seconds"] = int(float(self.ready_timeout))
        return ServeSpec(
            name=f"vllm-{self.served_model_name}",
            model_uri=self.model_uri,
            served_model_name=self.served_model_name,
            engine_image=settings.get("engine_image"),
            vllm_image=self.vllm_image,
            gpus=int(self.gpus),
            # 0 or unset: the largest power of two <= gpus
            tensor_parallel_size=self._int("tensor_parallel_size", self.tensor_parallel_size, 0) or None,
            gpu_vendor=self.gpu_vendor or settings.get("gpu_vendor"),
            adapters=dict(self.adapters),
            adapter_ranks={k: int(v) for k, v in self.adapter_ranks.items()},
            max_lora_rank=self.max_lora_rank,
            engine_args=dict(self.engine_args),
            max_model_len=self._int("max_model_len", self.max_model_len, 1),
            gpu_memory_utilization=float(self.gpu_memory_utilization)
            if self.gpu_memory_utilization
            else None,
            replicas=int(self.replicas),
            namespace=self.resolved_namespace(),
            bucket_secret=settings.get("bucket_secret_name"),
            api_key_secret=parse_secret_ref("api_key_secret", self.api_key_secret)
            if self.api_key_secret
            else None,
            env={"AWS_ENDPOINT_URL": settings.get("bucket_endpoint_url")}
            if settings.get("bucket_endpoint_url")
            else {},
            node_selector=dict(self.node_selector),
            tolerations=list(self.tolerations),
            supplemental_groups=[int(g) for g in self.supplemental_groups],
            rollout=self.rollout,
            revision=revision or ("pending" if self.rollout == "blue-green" else None),
            runtime_lora=bool(self.runtime_lora),
            oci_secret=self.oci_secret,
            oci_plain_http=bool(self.oci_plain_http),
            **extra,
        )

    def validate(self) -> None:
        for name, uri in {
            "model_uri": self.model_uri,
            **{f"adapters.{k}": v for k, v in self.adapters.items()},
        }.items():
            if str(uri).startswith("oci://"):
                check_oci_reference(self.task_id, name, uri)
                if self.platform == "kserve":
                    raise FinetuneConfigError(f"{name} {uri!r}: oci:// sources need platform 'deployment'")
            else:
                checks.check_bucket_uri(name, uri)
        if self.oci_secret and not checks.DNS_SUBDOMAIN.match(str(self.oci_secret)):
            raise FinetuneConfigError(f"oci_secret {self.oci_secret!r} is not a valid Secret name")
        if not str(self.served_model_name or "").strip():
            raise FinetuneConfigError("served_model_name is empty: give the model name clients will use")
        checks.check_namespace("namespace", self.resolved_namespace())
        checks.check_image("[finetune] engine_image", settings.get("engine_image"))
        if self.vllm_image:
            checks.check_image("vllm_image", self.vllm_image)
        gpus = checks.check_positive_int("gpus", self.gpus)
        tp = self._int("tensor_parallel_size", self.tensor_parallel_size, 0)
        if tp and gpus and tp > gpus:
            raise FinetuneConfigError(
                f"tensor_parallel_size {tp} > gpus {gpus}: each tensor-parallel rank needs its own GPU; "
                f"lower tensor_parallel_size or raise gpus"
            )
        self._int("max_model_len", self.max_model_len, 1)
        checks.check_positive_int("replicas", self.replicas)
        if self.gpu_memory_utilization not in (None, ""):
            try:
                gmu = float(self.gpu_memory_utilization)
            except (TypeError, ValueError):
                gmu = -1.0
            if not 0 < gmu <= 1:
                raise FinetuneConfigError(
                    f"gpu_memory_utilization {self.gpu_memory_utilization!r}: a fraction in (0, 1], e.g. 0.9"
                )
        for option in ("memory", "model_volume_size"):
            value = getattr(self, option)
            if value:
                try:
                    if parse_quantity(str(value)) <= 0:
                        raise ValueError
                except ValueError:
                    raise FinetuneConfigError(
                        f"{option} {value!r} is not a Kubernetes quantity; e.g. 64Gi, 500G"
                    ) from None
        if not isinstance(self.tolerations, list) or not all(isinstance(t, dict) for t in self.tolerations):
            raise FinetuneConfigError(
                "tolerations: a list of mappings, e.g. "
                "[{'key': 'gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]"
            )
        if not isinstance(self.node_selector, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.node_selector.items()
        ):
            raise FinetuneConfigError("node_selector: a mapping of label -> value strings")
        for g in self.supplemental_groups:
            checks.check_positive_int("supplemental_groups", g)
        if self.rollout not in ROLLOUTS:
            raise FinetuneConfigError(f"rollout {self.rollout!r}: use one of {list(ROLLOUTS)}")
        if self.platform not in PLATFORMS:
            raise FinetuneConfigError(f"platform {self.platform!r}: use one of {list(PLATFORMS)}")
        if self.platform == "kserve":
            if self.ingress or self.http_route:
                raise FinetuneConfigError(
                    "ingress / http_route are for platform 'deployment'; KServe routes an InferenceService "
                    "itself (its status.url)"
                )
            if self.rollout != "recreate":
                raise FinetuneConfigError(
                    "rollout is for platform 'deployment'; KServe rolls out a new revision itself"
                )
            if self.kserve_service_account:
                checks.check_service_account("kserve_service_account", self.kserve_service_account)
            self._int("min_replicas", self.min_replicas, 0)
        elif self.min_replicas not in (None, ""):
            raise FinetuneConfigError("min_replicas (scale to zero) needs platform='kserve'")
        if self.network_policy not in (True, False, None) and not (
            isinstance(self.network_policy, list) and all(isinstance(p, dict) for p in self.network_policy)
        ):
            raise FinetuneConfigError(
                "network_policy: True, or a list of NetworkPolicy peers, e.g. "
                "[{'namespaceSelector': {'matchLabels': {'kubernetes.io/metadata.name': 'ingress-nginx'}}}]"
            )
        missing = set(self.adapters) - set(self.adapter_ranks)
        if missing:
            raise FinetuneConfigError(
                f"adapter_ranks is missing {sorted(missing)}: vLLM needs --max-lora-rank >= every rank"
            )
        try:
            check_lora_ranks({k: int(v) for k, v in self.adapter_ranks.items()}, self.max_lora_rank)
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None
        if not isinstance(self.engine_args, dict):
            raise FinetuneConfigError(
                "engine_args must be a mapping of vLLM argument -> value, "
                f"got {type(self.engine_args).__name__}"
            )
        try:
            engine_flags(f"{type(self).__name__} {self.task_id!r}", self.engine_args)
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None
        if self.ingress:
            _route_kwargs("ingress", self.ingress, INGRESS_KEYS, "host")
        if self.http_route:
            _route_kwargs("http_route", self.http_route, HTTPROUTE_KEYS, "gateway")
        api_key = parse_secret_ref("api_key_secret", self.api_key_secret) if self.api_key_secret else None
        if (self.ingress or self.http_route) and not api_key and not self.allow_unauthenticated_ingress:
            raise FinetuneConfigError(
                "an ingress / http_route without api_key_secret would publish the model to anyone who "
                "reaches the host: set api_key_secret={'name': SECRET, 'key': KEY}, or "
                "allow_unauthenticated_ingress=True if the route is protected otherwise"
            )
        try:
            self.serve_spec()
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None

    def execute(self, context: Context) -> dict[str, Any]:
        self.validate()
        local = settings.runner(self.runner) == "local"
        result = self.execute_local(context) if local else self.execute_cluster(context)
        ServedEndpointLink.persist(context, result.get("external_endpoint") or result.get("endpoint"))
        return result

    # -- cluster ----------------------------------------------------------------------------------

    def _clients(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        hook = KubernetesHook(conn_id=self.kubernetes_conn_id or settings.get("kubernetes_conn_id"))
        from kubernetes import client

        api = hook.api_client
        return client.AppsV1Api(api), client.CoreV1Api(api)

    def route_manifests(self, spec: ServeSpec) -> list[dict[str, Any]]:
        """The optional Ingress / HTTPRoute (none unless ``ingress`` / ``http_route`` is given)."""
        docs = []
        if self.ingress:
            docs.append(build_ingress(spec, **_route_kwargs("ingress", self.ingress, INGRESS_KEYS, "host")))
        if self.http_route:
            docs.append(
                build_httproute(
                    spec, **_route_kwargs("http_route", self.http_route, HTTPROUTE_KEYS, "gateway")
                )
            )
        return docs

    def resolved_spec(self) -> ServeSpec:
        """The spec; a blue-green revision is named after a hash of its pod template."""
        spec = self.serve_spec()
        if self.rollout == "blue-green":
            spec = self.serve_spec(revision=_revision(build_vllm_deployment(spec)))
        return spec

    def manifests(self, context: Context | None = None) -> list[dict[str, Any]]:
        """Exactly the objects the operator applies on the cluster, in order (for review, dry runs
        and tests); validated first, nothing is sent. Blue-green applies the Deployment first and the
        rest (the Service switch) once it is ready."""
        self.validate()
        spec = self.resolved_spec()
        policy = []
        if self.network_policy:
            peers = self.network_policy if isinstance(self.network_policy, list) else None
            policy = [build_vllm_networkpolicy(spec, peers)]
        if self.platform == "kserve":
            isvc = build_inference_service(
                spec,
                min_replicas=self._int("min_replicas", self.min_replicas, 0)
                if self.min_replicas not in (None, "")
                else 1,
                max_replicas=int(self.replicas),
                service_account=self.kserve_service_account,
                runtime=self.kserve_runtime or KSERVE_RUNTIME,
            )
            return [isvc, *policy]
        deployment = build_vllm_deployment(spec)
        return [deployment, build_vllm_service(spec), *policy, *self.route_manifests(spec)]

    def _pod_labels(self, doc: dict[str, Any]) -> dict[str, str]:
        if doc["kind"] == "InferenceService":
            return {KSERVE_POD_LABEL: doc["metadata"]["name"]}
        return dict(doc["spec"]["selector"]["matchLabels"])

    def execute_cluster(self, context: Context) -> dict[str, Any]:
        from airflow_provider_finetune.pods.security import PodSecurityViolation, check_sent

        docs = self.manifests(context)
        server = docs[0]
        if server["kind"] == "Deployment":
            try:
                check_sent(server)
            except PodSecurityViolation as err:
                raise FinetuneConfigError(f"task {self.task_id}: {err}") from None
        _, core = self._clients()
        ns, name = self.resolved_namespace(), server["metadata"]["name"]
        applier = KubernetesApplier(core.api_client, self.log)
        # blue-green: the Service keeps pointing at the old revision until the new one is ready
        first = (
            docs[:1] if self.rollout == "blue-green" and self._service_exists(applier, docs[1], ns) else docs
        )
        applier.apply(first, ns)
        replicas = int(self.replicas)
        if self.deferrable:
            from airflow_provider_finetune.triggers.deployment import DeploymentReadyTrigger

            self.defer(
                trigger=DeploymentReadyTrigger(
                    name=name,
                    namespace=ns,
                    replicas=replicas,
                    kubernetes_conn_id=self.kubernetes_conn_id or settings.get("kubernetes_conn_id"),
                    poll_interval=self.poll_interval,
                    deadline=time.time() + self.effective_ready_timeout(),
                    kind=server["kind"],
                    pod_labels=self._pod_labels(server),
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.effective_ready_timeout() + 300),
            )
        doc = self.wait_ready(core.api_client, server, ns, replicas)
        return self.finish(core, server, doc, docs, first)

    def _service_exists(self, applier: KubernetesApplier, service: dict[str, Any], ns: str) -> bool:
        verbs = applier.verbs("Service", "v1")
        return applier.existing(verbs, "Service", service["metadata"]["name"], ns) is not None

    def effective_ready_timeout(self) -> float:
        """``ready_timeout``, or the Deployment's progressDeadlineSeconds (the same number)."""
        if self.ready_timeout not in (None, ""):
            return float(self.ready_timeout)
        return float(self.serve_spec().progress_deadline_seconds)

    def wait_ready(self, api_client: Any, server: dict[str, Any], ns: str, replicas: int) -> dict[str, Any]:
        """Poll until ready; fail with the pods' reason (or the rollout's) as soon as it is known;
        retry transient API errors until the deadline."""
        from airflow_provider_finetune.triggers.deployment import read_sync, readiness, transient

        kind, name = server["kind"], server["metadata"]["name"]
        timeout = self.effective_ready_timeout()
        deadline = time.monotonic() + timeout
        message = "not read yet"
        while True:
            try:
                doc, problem = read_sync(api_client, kind, name, ns, replicas, self._pod_labels(server))
                state, message = readiness(kind, doc, replicas)
                if state == "ready":
                    return doc
                if state == "failed" or problem:
                    raise RuntimeError(f"{kind} {ns}/{name}: {problem if state == 'waiting' else message}")
            except RuntimeError:
                raise
            except Exception as err:
                if not transient(err):
                    raise
                self.log.warning("%s %s/%s: transient API error, retrying: %s", kind, ns, name, err)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} {ns}/{name} not ready within {timeout:.0f}s: {message}")
            self.log.info("waiting for %s/%s: %s", ns, name, message)
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Deferrable mode: the trigger saw the server ready (or not); then the smoke test."""
        where = f"{event.get('namespace')}/{event.get('name')}"
        if event.get("status") != "ready":
            raise RuntimeError(f"{where} {event.get('status')}: {event.get('message')}")
        self.log.info("%s ready: %s", where, event.get("message"))
        _, core = self._clients()
        docs = self.manifests(context)
        server = docs[0]
        doc = server
        if server["kind"] == "InferenceService":
            from kubernetes import client

            doc = client.CustomObjectsApi(core.api_client).get_namespaced_custom_object(
                "serving.kserve.io", "v1beta1", event["namespace"], "inferenceservices", event["name"]
            )
        result = self.finish(core, server, doc, docs, docs[:1] if self.rollout == "blue-green" else docs)
        ServedEndpointLink.persist(context, result.get("external_endpoint") or result.get("endpoint"))
        return result

    def finish(
        self, core: Any, server: dict[str, Any], doc: dict[str, Any], docs: list[dict], applied: list[dict]
    ) -> dict[str, Any]:
        """After readiness: blue-green switches the Service and removes the old revisions; then the
        smoke test."""
        ns = self.resolved_namespace()
        applier = KubernetesApplier(core.api_client, self.log)
        if self.rollout == "blue-green":
            rest = [d for d in docs if d not in applied]
            if rest:
                applier.apply(rest, ns)  # the Service now selects the new revision
            self.remove_old_revisions(applier, server, ns)
        return self.smoke_and_result(core, server, doc)

    def remove_old_revisions(self, applier: KubernetesApplier, server: dict[str, Any], ns: str) -> list[str]:
        """Delete this server's other Deployments (earlier blue-green revisions, or the single one of
        a recreate/rolling deploy); only ones carrying the provider's label."""
        from kubernetes.client.exceptions import ApiException

        labels = dict(server["spec"]["selector"]["matchLabels"])
        labels.pop(REVISION_LABEL, None)
        selector = ",".join(
            f"{k}={v}" for k, v in sorted({**labels, MANAGED_BY_KEY: MANAGED_BY_VALUE}.items())
        )
        removed = []
        for dep in applier.apps.list_namespaced_deployment(ns, label_selector=selector).items:
            if dep.metadata.name == server["metadata"]["name"] or not is_managed(dep):
                continue
            try:
                applier.apps.delete_namespaced_deployment(name=dep.metadata.name, namespace=ns)
            except ApiException as err:
                if err.status != 404:
                    raise
            self.log.info("removed the previous revision %s/%s", ns, dep.metadata.name)
            removed.append(dep.metadata.name)
        return removed

    def api_key(self, core: Any | None = None, ns: str | None = None) -> str | None:
        """The API key for the smoke test: the connection's password, the worker's env var or (cluster)
        the Secret. Never logged."""
        if self.api_key_conn_id:
            from airflow.sdk import BaseHook

            key = BaseHook.get_connection(self.api_key_conn_id).password
            if not key:
                raise FinetuneConfigError(
                    f"connection {self.api_key_conn_id!r} has no password (the API key)"
                )
            return key
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise FinetuneConfigError(
                    f"api_key_env: the environment variable {self.api_key_env} is not set"
                )
            return key
        if self.api_key_secret and core is not None:
            import base64

            from kubernetes.client.exceptions import ApiException

            ref = parse_secret_ref("api_key_secret", self.api_key_secret)
            try:
                secret = core.read_namespaced_secret(ref.secret_name, ns)
            except ApiException as err:
                raise RuntimeError(
                    f"cannot read Secret {ns}/{ref.secret_name} for the smoke test "
                    f"({err.status} {err.reason}); grant 'get' on it (deploy/rbac-serving.yaml), "
                    "set api_key_conn_id, or smoke_question=None"
                ) from None
            value = (secret.data or {}).get(ref.secret_key)
            if not value:
                raise FinetuneConfigError(f"Secret {ns}/{ref.secret_name} has no key {ref.secret_key!r}")
            return base64.b64decode(value).decode()
        return None

    def smoke_and_result(self, core: Any, server: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        ns, name = self.resolved_namespace(), dns_name(self.serve_spec().name)
        if server["kind"] == "InferenceService":
            status = doc.get("status") or {}
            internal = (status.get("address") or {}).get(
                "url"
            ) or f"http://{name}-predictor.{ns}.svc.cluster.local"
            endpoint, external = f"{internal.rstrip('/')}/v1", status.get("url")
        else:
            endpoint, external = f"http://{name}.{ns}.svc.cluster.local/v1", None
        reply = None
        if self.smoke_question:
            key = self.api_key(core, ns)
            direct = self.smoke_url or (
                endpoint[: -len("/v1")] if key or server["kind"] == "InferenceService" else None
            )
            if direct:
                reply = chat_once(direct, self.served_model_name, self.smoke_question, api_key=key)
            else:
                body = {
                    "model": self.served_model_name,
                    "messages": [{"role": "user", "content": self.smoke_question}],
                    "max_tokens": 32,
                    "temperature": 0,
                }
                data = proxy_post_json(core.api_client, ns, f"{name}:http", "v1/chat/completions", body)
                reply = data["choices"][0]["message"]["content"]
            self.log.info("smoke test: %r -> %r", self.smoke_question, reply)
        result = {
            "endpoint": endpoint,
            "model": self.served_model_name,
            (
                "inference_service" if server["kind"] == "InferenceService" else "deployment"
            ): f"{ns}/{server['metadata']['name']}",
            "smoke_reply": reply,
            "adapters": sorted(self.adapters),
        }
        if self.ingress:
            scheme = "https" if self.ingress.get("tls_secret") else "http"
            external = f"{scheme}://{self.ingress['host']}"
            result["ingress_endpoint"] = f"{external}/v1"
        elif self.http_route and self.http_route.get("hostnames"):
            external = f"https://{self.http_route['hostnames'][0]}"
        if external:
            result["external_endpoint"] = f"{external.rstrip('/')}/v1"
        return result

    # -- local ------------------------------------------------------------------------------------

    def local_dir(self) -> Path:
        from airflow_provider_finetune.runners.local import ensure_private_dir, work_root

        root = work_root(settings.get("local_workdir"))
        return ensure_private_dir(root / "serving") / dns_name(self.served_model_name)

    def local_engine_args(self) -> dict[str, Any]:
        """``[finetune] local_vllm_engine_args`` under the operator's own ``engine_args``."""
        merged = {**settings.json_object("local_vllm_engine_args"), **self.engine_args}
        try:
            engine_flags("[finetune] local_vllm_engine_args", merged)
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None
        return merged

    def execute_local(self, context: Context) -> dict[str, Any]:
        from airflow_provider_finetune.hooks import BucketHook

        engine_args = self.local_engine_args()
        python = (
            Path(settings.get("vllm_python") or ".venv-vllm/bin/python").expanduser().absolute()
        )  # a venv python is a symlink: keep it
        if not python.exists():
            raise FinetuneConfigError(
                f"vLLM is not installed at {python} ([finetune] vllm_python); install it with: {VLLM_INSTALL}"
            )
        workdir = self.local_dir()
        stop_local(workdir)
        from finetune_engine.storage import download_dir

        adapter_dirs = {}
        client = BucketHook(self.bucket_conn_id or settings.get("bucket_conn_id")).storage_client
        oci = {"docker_config": self.oci_docker_config, "plain_http": bool(self.oci_plain_http) or None}
        fetch_source(self.model_uri, workdir / "model", download_dir, client, **oci)
        for name, uri in sorted(self.adapters.items()):
            fetch_source(uri, workdir / "adapters" / name, download_dir, client, **oci)
            adapter_dirs[name] = workdir / "adapters" / name
        rank = (
            check_lora_ranks({k: int(v) for k, v in self.adapter_ranks.items()}, self.max_lora_rank)
            if self.adapters
            else None
        )
        api_key = self.api_key()
        self._proc, base = start_vllm(
            python,
            workdir / "model",
            self.served_model_name,
            workdir,
            adapter_dirs,
            rank,
            self.max_model_len or 256,
            engine_args,
            self.local_port,
            float(self.ready_timeout or 3600),
            log=self.log.info,
            api_key=api_key,
            runtime_lora=bool(self.runtime_lora),
        )
        try:
            reply = (
                chat_once(base, self.served_model_name, self.smoke_question, api_key=api_key)
                if self.smoke_question
                else None
            )
            replies = {}
            for name in sorted(self.adapters):
                replies[name] = (
                    chat_once(base, name, self.smoke_question, api_key=api_key)
                    if self.smoke_question
                    else None
                )
            self.log.info("smoke test: %r -> %r", self.smoke_question, reply)
            for name, text in replies.items():
                self.log.info("smoke test (adapter %s): %r", name, text)
        except Exception:
            stop_local(workdir)
            raise
        if self.keep_running:
            self.log.info(
                "vLLM keeps serving at %s/v1 (stop: UndeployVLLMOperator). "
                "Try:\n  curl %s/v1/chat/completions "
                '-H \'Content-Type: application/json\' -d \'{"model": "%s", "messages": '
                '[{"role": "user", "content": "Hi"}]}\'',
                base,
                base,
                self.served_model_name,
            )
        else:
            stop_local(workdir)
        return {
            "endpoint": f"{base}/v1",
            "model": self.served_model_name,
            "smoke_reply": reply,
            "adapter_replies": replies,
            "pid": self._proc.pid if self.keep_running else None,
            "adapters": sorted(self.adapters),
        }

    def on_kill(self) -> None:
        stop_local(self.local_dir())


def undeploy(
    served_model_name: str,
    runner: str | None = None,
    namespace: str | None = None,
    kubernetes_conn_id: str | None = None,
    log: Any = None,
) -> bool:
    """Remove what DeployVLLMOperator created for ``served_model_name``: the local server process, or
    on the cluster its Deployment(s) (every blue-green revision), Service, routes, NetworkPolicy and
    InferenceService. True when anything was removed. A plain function, so a task can call it (the
    UndeployVLLMOperator calls it too)."""
    import logging

    log = log or logging.getLogger(__name__)
    deploy = DeployVLLMOperator(
        task_id="undeploy__spec",
        model_uri="s3://unused/x",
        served_model_name=served_model_name,
        namespace=namespace,
        kubernetes_conn_id=kubernetes_conn_id,
    )
    if settings.runner(runner) == "local":
        return stop_local(deploy.local_dir())
    checks.check_namespace("namespace", deploy.resolved_namespace())
    _, core = deploy._clients()
    spec = deploy.serve_spec()
    applier = KubernetesApplier(core.api_client, log)
    removed = applier.delete(SERVED_OBJECTS, dns_name(spec.name), spec.namespace)
    template = build_vllm_deployment(spec)
    template["metadata"]["name"] = "-"  # matches no Deployment: every revision of this server goes
    return bool(deploy.remove_old_revisions(applier, template, spec.namespace)) or removed


class UndeployVLLMOperator(BaseOperator):
    """Remove what DeployVLLMOperator created (Deployment + Service, or the local process). Objects of
    the same name that the provider did not make (no ``app.kubernetes.io/managed-by:
    airflow-provider-finetune`` label) are refused before anything is deleted.

    :param served_model_name: the ``served_model_name`` the server was deployed with.
    :param runner: ``kubernetes`` or ``local``; default ``[finetune] runner``.
    :param namespace: cluster: namespace of the Deployment; default ``[finetune] namespace``.
    :param kubernetes_conn_id: cluster: Kubernetes connection; default ``[finetune] kubernetes_conn_id``.
    """

    template_fields: Sequence[str] = ("served_model_name",)

    def __init__(
        self,
        *,
        served_model_name: str,
        runner: str | None = None,
        namespace: str | None = None,
        kubernetes_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.served_model_name = served_model_name
        self.runner = runner
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id

    def execute(self, context: Context) -> bool:
        return undeploy(
            self.served_model_name, self.runner, self.namespace, self.kubernetes_conn_id, log=self.log
        )
