"""DeploymentReadyTrigger: wait in the triggerer until a vLLM server is ready, polling the API
asynchronously (kubernetes_asyncio through the cncf provider's AsyncKubernetesHook), so
DeployVLLMOperator frees its worker slot during vLLM's long start.

Readiness alone would turn every broken start into a timeout an hour later. Each poll therefore
also reads the server's pods and their events, and fails at once with the reason: an image that
cannot be pulled, an init container (the model pull) that exited with an error (its termination
message or last log line), a server in CrashLoopBackOff, no node with a free GPU. A transient API
error (5xx, 429, a reset connection) is logged and retried at the next poll; only the deadline
ends a wait on a server that is merely slow. The same functions serve the operator's wait on a
worker (``deferrable=False``) and the KServe InferenceService (``kind="InferenceService"``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

# A container waiting for one of these reasons will not start by itself.
FATAL_WAITING = {
    "ErrImagePull": "the image cannot be pulled",
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and imagePullPolicy is Never",
    "CreateContainerConfigError": "the container's configuration is invalid (a missing Secret or key?)",
    "CrashLoopBackOff": "it keeps crashing",
}
_NO_CAPACITY = re.compile(
    r"Insufficient ([\w.-]+/gpu)|(\d+) node\(s\) didn't match Pod's node affinity/selector"
)
KSERVE_POD_LABEL = "serving.kserve.io/inferenceservice"


def deployment_readiness(doc: dict[str, Any], replicas: int) -> tuple[str, str]:
    """(state, message) of a Deployment as the API returns it (camelCase dict).

    state is ``ready`` (the current generation's replicas are updated and available), ``failed``
    (the rollout exceeded its progress deadline) or ``waiting``.
    """
    meta, status = doc.get("metadata") or {}, doc.get("status") or {}
    generation, observed = int(meta.get("generation") or 0), int(status.get("observedGeneration") or 0)
    updated, available = int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0)
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "Progressing"
            and cond.get("status") == "False"
            and cond.get("reason") == "ProgressDeadlineExceeded"
        ):
            return "failed", f"rollout exceeded its progress deadline: {cond.get('message') or ''}".strip()
    if observed >= generation and updated >= replicas and available >= replicas:
        return "ready", f"{available}/{replicas} replicas available"
    return (
        "waiting",
        f"{available} of {replicas} replicas available, "
        f"{updated} updated (generation {observed}/{generation})",
    )


def readiness(kind: str, doc: dict[str, Any], replicas: int) -> tuple[str, str]:
    if kind == "InferenceService":
        from airflow_provider_finetune.pods.kserve import inference_service_readiness

        return inference_service_readiness(doc)
    return deployment_readiness(doc, replicas)


def _statuses(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    status = pod.get("status") or {}
    return [("init container", s) for s in status.get("initContainerStatuses") or []] + [
        ("container", s) for s in status.get("containerStatuses") or []
    ]


def _failed_termination(cs: dict[str, Any]) -> dict[str, Any] | None:
    for state in (cs.get("state") or {}, cs.get("lastState") or {}):
        term = state.get("terminated")
        if term and int(term.get("exitCode") or 0) != 0:
            return term
    return None


def logs_wanted(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod, container) pairs whose last log line explains a failure that has no termination message."""
    out = []
    for pod in pods:
        for _, cs in _statuses(pod):
            term = _failed_termination(cs)
            if term and not (term.get("message") or "").strip():
                out.append((pod["metadata"]["name"], cs["name"]))
    return out


def diagnose_pods(
    pods: list[dict[str, Any]], events: list[dict[str, Any]], logs: dict[tuple[str, str], str] | None = None
) -> str | None:
    """Why the server's pods cannot become ready, or None while they may still. ``pods`` and
    ``events`` as the API returns them (camelCase dicts); ``logs``: the last log line of the
    containers :func:`logs_wanted` names."""
    logs = logs or {}
    for pod in pods:
        name = pod["metadata"]["name"]
        for group, cs in _statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            term = _failed_termination(cs)
            reason = waiting.get("reason")
            detail = ""
            if term:
                detail = (term.get("message") or "").strip() or logs.get((name, cs["name"]), "").strip()
                detail = f"exit code {term.get('exitCode')}" + (
                    f": {detail.splitlines()[-1]}" if detail else ""
                )
            if group == "init container" and term:
                return f"pod {name}: init container {cs['name']} failed ({detail})"
            if reason in FATAL_WAITING:
                extra = waiting.get("message") or ""
                if reason == "CrashLoopBackOff" and detail:
                    extra = f"last run: {detail}"
                return (
                    f"pod {name}: {group} {cs['name']} {reason}: {FATAL_WAITING[reason]}"
                    + (f" ({extra})" if extra else "")
                    + (f"; image {cs.get('image')}" if "image" in FATAL_WAITING[reason] else "")
                )
    names = {p["metadata"]["name"] for p in pods}
    by_pod: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        obj = ev.get("involvedObject") or {}
        if obj.get("kind", "Pod") == "Pod" and obj.get("name") in names:
            by_pod.setdefault(obj["name"], []).append(ev)
    for pod_name, evs in sorted(by_pod.items()):
        reasons = {e.get("reason") for e in evs}
        if "TriggeredScaleUp" in reasons:
            continue  # the cluster autoscaler is adding a node: wait for it
        for ev in evs:
            message = ev.get("message") or ""
            if ev.get("reason") == "FailedScheduling" and _NO_CAPACITY.search(message):
                return f"pod {pod_name} cannot be scheduled: {message.strip()}"
    return None


def transient(err: BaseException) -> bool:
    """An API error worth retrying at the next poll: 5xx, 429, a timeout or a dropped connection."""
    status = getattr(err, "status", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("aiohttp", "urllib3")) and status is None


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class DeploymentReadyTrigger(BaseTrigger):
    """Fires ``{"status": "ready" | "failed" | "timeout" | "error", "message", "name", "namespace"}``.

    :param name: Deployment (or InferenceService) name.
    :param namespace: its namespace.
    :param replicas: replicas that must be updated and available.
    :param kubernetes_conn_id: Airflow Kubernetes connection (the same one the operator used).
    :param poll_interval: seconds between reads of the status.
    :param deadline: epoch seconds after which the trigger gives up with ``timeout``.
    :param kind: ``Deployment`` or ``InferenceService``.
    :param pod_labels: labels of the server's pods (default: the InferenceService's pod label).
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        replicas: int = 1,
        kubernetes_conn_id: str | None = None,
        poll_interval: float = 15.0,
        deadline: float | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
        kind: str = "Deployment",
        pod_labels: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.replicas = int(replicas)
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = deadline
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.kind = kind
        self.pod_labels = dict(pod_labels or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "replicas": self.replicas,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "cluster_context": self.cluster_context,
                "in_cluster": self.in_cluster,
                "kind": self.kind,
                "pod_labels": self.pod_labels,
            },
        )

    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(
            conn_id=self.kubernetes_conn_id, cluster_context=self.cluster_context, in_cluster=self.in_cluster
        )

    def selector(self) -> str:
        return label_selector(self.pod_labels or {KSERVE_POD_LABEL: self.name})

    async def read(self, hook) -> tuple[dict[str, Any], str | None]:
        """The object's status and, while it is not ready, what its pods say is wrong (or None)."""
        from kubernetes_asyncio import client

        async with hook.get_conn() as api:
            if self.kind == "InferenceService":
                doc = await client.CustomObjectsApi(api).get_namespaced_custom_object(
                    "serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name
                )
            else:
                obj = await client.AppsV1Api(api).read_namespaced_deployment_status(
                    name=self.name, namespace=self.namespace
                )
                doc = api.sanitize_for_serialization(obj)
            if readiness(self.kind, doc, self.replicas)[0] != "waiting":
                return doc, None
            core = client.CoreV1Api(api)
            pods = (
                api.sanitize_for_serialization(
                    await core.list_namespaced_pod(self.namespace, label_selector=self.selector())
                ).get("items")
                or []
            )
            events: list[dict[str, Any]] = []
            for pod in pods:
                listed = await core.list_namespaced_event(
                    self.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}"
                )
                events += api.sanitize_for_serialization(listed).get("items") or []
            logs = {}
            for pod_name, container in logs_wanted(pods):
                try:
                    logs[(pod_name, container)] = await core.read_namespaced_pod_log(
                        pod_name, self.namespace, container=container, tail_lines=1
                    )
                except Exception:  # the reason without its log line is still the reason
                    logs[(pod_name, container)] = ""
            return doc, diagnose_pods(pods, events, logs)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        where = {"name": self.name, "namespace": self.namespace}
        while True:
            try:
                doc, problem = await self.read(hook)
            except Exception as err:
                if transient(err) and (self.deadline is None or time.time() < self.deadline):
                    self.log.warning(
                        "%s %s/%s: transient API error, retrying: %s",
                        self.kind,
                        self.namespace,
                        self.name,
                        err,
                    )
                    await asyncio.sleep(self.poll_interval)
                    continue
                # anything else ends the wait with the reason, in the task's log
                yield TriggerEvent({"status": "error", "message": f"{type(err).__name__}: {err}", **where})
                return
            state, message = readiness(self.kind, doc, self.replicas)
            if state == "waiting" and problem:
                state, message = "failed", problem
            if state != "waiting":
                yield TriggerEvent({"status": state, "message": message, **where})
                return
            if self.deadline is not None and time.time() > self.deadline:
                yield TriggerEvent({"status": "timeout", "message": f"not ready in time: {message}", **where})
                return
            self.log.info("%s %s/%s: %s", self.kind, self.namespace, self.name, message)
            await asyncio.sleep(self.poll_interval)


def read_sync(
    api_client: Any, kind: str, name: str, namespace: str, replicas: int, pod_labels: dict[str, str]
) -> tuple[dict[str, Any], str | None]:
    """The blocking twin of :meth:`DeploymentReadyTrigger.read` (the operator's wait on a worker)."""
    from kubernetes import client

    if kind == "InferenceService":
        doc = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", namespace, "inferenceservices", name
        )
    else:
        doc = api_client.sanitize_for_serialization(
            client.AppsV1Api(api_client).read_namespaced_deployment_status(name=name, namespace=namespace)
        )
    if readiness(kind, doc, replicas)[0] != "waiting":
        return doc, None
    core = client.CoreV1Api(api_client)
    ser: Callable[[Any], dict] = api_client.sanitize_for_serialization
    pods = (
        ser(core.list_namespaced_pod(namespace, label_selector=label_selector(pod_labels))).get("items") or []
    )
    events: list[dict[str, Any]] = []
    for pod in pods:
        listed = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}"
        )
        events += ser(listed).get("items") or []
    logs = {}
    for pod_name, container in logs_wanted(pods):
        try:
            logs[(pod_name, container)] = core.read_namespaced_pod_log(
                pod_name, namespace, container=container, tail_lines=1
            )
        except Exception:  # the reason without its log line is still the reason
            logs[(pod_name, container)] = ""
    return doc, diagnose_pods(pods, events, logs)
