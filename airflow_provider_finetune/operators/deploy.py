"""DeployVLLMOperator / UndeployVLLMOperator: serve a model (and LoRA adapters) with vLLM's
OpenAI server — a Deployment + Service on the cluster, or a local vLLM process on the worker."""

from __future__ import annotations

import json
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
from airflow_provider_finetune.pods.serving import (
    ServeSpec,
    build_httproute,
    build_ingress,
    build_vllm_deployment,
    build_vllm_service,
    check_lora_ranks,
    engine_flags,
)
from airflow_provider_finetune.pods.spec import dns_name
from airflow_provider_finetune.runners.kubernetes_apply import KubernetesApplier, Target
from airflow_provider_finetune.runners.vllm_local import VLLM_INSTALL, chat_once, start_vllm, stop_local

# the local server's helpers, importable from here too (DAGs use chat_once)
__all__ = [
    "DeployVLLMOperator",
    "UndeployVLLMOperator",
    "VLLM_INSTALL",
    "chat_once",
    "proxy_post_json",
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


class DeployVLLMOperator(BaseOperator):
    """Serve ``model_uri`` (a complete bucket prefix) with vLLM, optionally with LoRA adapters.

    On the cluster it creates, or replaces on a rerun, a Deployment and a Service (and the optional
    routes) named after ``served_model_name``; an existing object of that name that the provider did
    not make is refused, never replaced. The Deployment is checked against the restricted Pod Security
    Standard and the secret guard before it is sent.

    :param model_uri: s3:// prefix of the model (e.g. ``.../checkpoint-final``).
    :param served_model_name: the model name clients use.
    :param adapters: LoRA adapters to serve beside the model, name -> s3:// prefix.
    :param adapter_ranks: their ranks (to set and check ``--max-lora-rank``).
    :param max_lora_rank: vLLM's ``--max-lora-rank``; default the smallest value vLLM accepts that fits
        every adapter rank.
    :param gpus: GPUs (= tensor parallel size) of the server.
    :param gpu_vendor: ``nvidia`` or ``amd``; default ``[finetune] gpu_vendor``.
    :param engine_args: extra vLLM server arguments, e.g. ``{"gpu_memory_utilization": 0.9}``.
    :param max_model_len: vLLM's ``--max-model-len``; default the model's own on the cluster, 256 on
        the local runner.
    :param runner: ``kubernetes`` or ``local``; default ``[finetune] runner``.
    :param namespace: cluster: namespace of the Deployment and Service; default ``[finetune] namespace``.
    :param kubernetes_conn_id: cluster: Kubernetes connection; default ``[finetune] kubernetes_conn_id``.
    :param smoke_question: asked once through ``/v1/chat/completions`` after the server is ready.
    :param keep_running: local runner: leave the server running after the task (stop it with
        UndeployVLLMOperator) or stop it at the end of the task.
    :param ready_timeout: seconds the server may take to become ready.
    :param local_port: local runner: port of the server; default a free one.
    :param bucket_conn_id: local runner: Airflow ``aws`` connection the model and adapters are
        downloaded with; default ``[finetune] bucket_conn_id``.
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
        gpu_vendor: str | None = None,
        engine_args: dict[str, Any] | None = None,
        max_model_len: int | None = None,
        runner: str | None = None,
        namespace: str | None = None,
        kubernetes_conn_id: str | None = None,
        smoke_question: str | None = "Hello! Who are you?",
        keep_running: bool = True,
        ready_timeout: float = 3600,
        local_port: int | None = None,
        bucket_conn_id: str | None = None,
        deferrable: bool | None = None,
        poll_interval: float = 15,
        ingress: dict[str, Any] | None = None,
        http_route: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if deferrable is None:
            from airflow.sdk import conf

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
        self.gpu_vendor = gpu_vendor
        self.engine_args = engine_args or {}
        self.max_model_len = max_model_len
        self.runner = runner
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.smoke_question = smoke_question
        self.keep_running = keep_running
        self.ready_timeout = ready_timeout
        self.local_port = local_port
        self.bucket_conn_id = bucket_conn_id
        self._proc: subprocess.Popen | None = None

    # -- shared -----------------------------------------------------------------------------------

    def resolved_namespace(self) -> str:
        return self.namespace or settings.get("namespace")

    def serve_spec(self) -> ServeSpec:
        return ServeSpec(
            name=f"vllm-{self.served_model_name}",
            model_uri=self.model_uri,
            served_model_name=self.served_model_name,
            engine_image=settings.get("engine_image"),
            gpus=int(self.gpus),
            gpu_vendor=self.gpu_vendor or settings.get("gpu_vendor"),
            adapters=dict(self.adapters),
            adapter_ranks={k: int(v) for k, v in self.adapter_ranks.items()},
            max_lora_rank=self.max_lora_rank,
            engine_args=self.engine_args,
            max_model_len=self.max_model_len,
            namespace=self.resolved_namespace(),
            bucket_secret=settings.get("bucket_secret_name"),
            env={"AWS_ENDPOINT_URL": settings.get("bucket_endpoint_url")}
            if settings.get("bucket_endpoint_url")
            else {},
        )

    def validate(self) -> None:
        for name, uri in {
            "model_uri": self.model_uri,
            **{f"adapters.{k}": v for k, v in self.adapters.items()},
        }.items():
            checks.check_bucket_uri(name, uri)
        if not str(self.served_model_name or "").strip():
            raise FinetuneConfigError("served_model_name is empty: give the model name clients will use")
        checks.check_namespace("namespace", self.resolved_namespace())
        checks.check_image("[finetune] engine_image", settings.get("engine_image"))
        checks.check_positive_int("gpus", self.gpus)
        missing = set(self.adapters) - set(self.adapter_ranks)
        if missing:
            raise FinetuneConfigError(
                f"adapter_ranks is missing {sorted(missing)}: vLLM needs --max-lora-rank >= every rank"
            )
        try:
            check_lora_ranks({k: int(v) for k, v in self.adapter_ranks.items()}, self.max_lora_rank)
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None
        try:
            engine_flags(f"{type(self).__name__} {self.task_id!r}", self.engine_args)
        except ValueError as err:
            raise FinetuneConfigError(str(err)) from None
        if self.ingress:
            _route_kwargs("ingress", self.ingress, INGRESS_KEYS, "host")
        if self.http_route:
            _route_kwargs("http_route", self.http_route, HTTPROUTE_KEYS, "gateway")

    def execute(self, context: Context) -> dict[str, Any]:
        self.validate()
        local = settings.runner(self.runner) == "local"
        result = self.execute_local(context) if local else self.execute_cluster(context)
        ServedEndpointLink.persist(context, result.get("endpoint"))
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

    def execute_cluster(self, context: Context) -> dict[str, Any]:
        from airflow_provider_finetune.pods.security import PodSecurityViolation, check_sent

        spec = self.serve_spec()
        deployment, service = build_vllm_deployment(spec), build_vllm_service(spec)
        try:
            check_sent(deployment)
        except PodSecurityViolation as err:
            raise FinetuneConfigError(f"task {self.task_id}: {err}") from None
        apps, core = self._clients()
        ns, name = spec.namespace, deployment["metadata"]["name"]
        KubernetesApplier(core.api_client, self.log).apply(
            [deployment, service, *self.route_manifests(spec)], ns
        )
        if self.deferrable:
            from airflow_provider_finetune.triggers.deployment import DeploymentReadyTrigger

            self.defer(
                trigger=DeploymentReadyTrigger(
                    name=name,
                    namespace=ns,
                    replicas=spec.replicas,
                    kubernetes_conn_id=self.kubernetes_conn_id or settings.get("kubernetes_conn_id"),
                    poll_interval=self.poll_interval,
                    deadline=time.time() + self.ready_timeout,
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.ready_timeout + 300),
            )
        self.wait_ready(apps, name, ns, spec.replicas)
        return self.smoke_and_result(core, name, ns)

    def wait_ready(self, apps: Any, name: str, ns: str, replicas: int) -> None:
        from airflow_provider_finetune.triggers.deployment import deployment_readiness

        deadline = time.monotonic() + self.ready_timeout
        while True:
            doc = apps.api_client.sanitize_for_serialization(
                apps.read_namespaced_deployment_status(name=name, namespace=ns)
            )
            state, message = deployment_readiness(doc, replicas)
            if state == "ready":
                return
            if state == "failed":
                raise RuntimeError(f"Deployment {ns}/{name}: {message}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Deployment {ns}/{name} not ready within {self.ready_timeout:.0f}s: {message}"
                )
            self.log.info("waiting for %s/%s: %s", ns, name, message)
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Deferrable mode: the trigger saw the Deployment ready (or not); then the smoke test."""
        where = f"{event.get('namespace')}/{event.get('name')}"
        if event.get("status") != "ready":
            raise RuntimeError(f"Deployment {where} {event.get('status')}: {event.get('message')}")
        self.log.info("Deployment %s ready: %s", where, event.get("message"))
        _, core = self._clients()
        result = self.smoke_and_result(core, event["name"], event["namespace"])
        ServedEndpointLink.persist(context, result.get("endpoint"))
        return result

    def smoke_and_result(self, core: Any, name: str, ns: str) -> dict[str, Any]:
        reply = None
        if self.smoke_question:
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
            "endpoint": f"http://{name}.{ns}.svc.cluster.local/v1",
            "model": self.served_model_name,
            "deployment": f"{ns}/{name}",
            "smoke_reply": reply,
            "adapters": sorted(self.adapters),
        }
        if self.ingress:
            scheme = "https" if self.ingress.get("tls_secret") else "http"
            result["ingress_endpoint"] = f"{scheme}://{self.ingress['host']}/v1"
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
        download_dir(self.model_uri, workdir / "model", client=client)
        for name, uri in sorted(self.adapters.items()):
            download_dir(uri, workdir / "adapters" / name, client=client)
            adapter_dirs[name] = workdir / "adapters" / name
        rank = (
            check_lora_ranks({k: int(v) for k, v in self.adapter_ranks.items()}, self.max_lora_rank)
            if self.adapters
            else None
        )
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
            self.ready_timeout,
            log=self.log.info,
        )
        try:
            reply = (
                chat_once(base, self.served_model_name, self.smoke_question) if self.smoke_question else None
            )
            replies = {}
            for name in sorted(self.adapters):
                replies[name] = chat_once(base, name, self.smoke_question) if self.smoke_question else None
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
        deploy = DeployVLLMOperator(
            task_id=f"{self.task_id}__spec",
            model_uri="s3://unused/x",
            served_model_name=self.served_model_name,
            namespace=self.namespace,
            kubernetes_conn_id=self.kubernetes_conn_id,
        )
        if settings.runner(self.runner) == "local":
            return stop_local(deploy.local_dir())
        checks.check_namespace("namespace", deploy.resolved_namespace())
        _, core = deploy._clients()
        spec = deploy.serve_spec()
        return KubernetesApplier(core.api_client, self.log).delete(
            SERVED_OBJECTS, dns_name(spec.name), spec.namespace
        )
