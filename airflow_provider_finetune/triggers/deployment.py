"""DeploymentReadyTrigger: wait in the triggerer until a Deployment's replicas are updated and
available, polling the API asynchronously (kubernetes_asyncio through the cncf provider's
AsyncKubernetesHook), so DeployVLLMOperator frees its worker slot during vLLM's long start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


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


class DeploymentReadyTrigger(BaseTrigger):
    """Fires ``{"status": "ready" | "failed" | "timeout", "message", "name", "namespace"}``.

    :param name: Deployment name.
    :param namespace: its namespace.
    :param replicas: replicas that must be updated and available.
    :param kubernetes_conn_id: Airflow Kubernetes connection (the same one the operator used).
    :param poll_interval: seconds between reads of the Deployment's status.
    :param deadline: epoch seconds after which the trigger gives up with ``timeout``.
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
            },
        )

    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(
            conn_id=self.kubernetes_conn_id, cluster_context=self.cluster_context, in_cluster=self.in_cluster
        )

    async def read(self, hook) -> dict[str, Any]:
        from kubernetes_asyncio import client

        async with hook.get_conn() as api:
            obj = await client.AppsV1Api(api).read_namespaced_deployment_status(
                name=self.name, namespace=self.namespace
            )
            return api.sanitize_for_serialization(obj)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        where = {"name": self.name, "namespace": self.namespace}
        while True:
            try:
                state, message = deployment_readiness(await self.read(hook), self.replicas)
            except Exception as err:  # an API error ends the wait with the reason, in the task's log
                yield TriggerEvent({"status": "error", "message": f"{type(err).__name__}: {err}", **where})
                return
            if state != "waiting":
                yield TriggerEvent({"status": state, "message": message, **where})
                return
            if self.deadline is not None and time.time() > self.deadline:
                yield TriggerEvent({"status": "timeout", "message": f"not ready in time: {message}", **where})
                return
            self.log.info("Deployment %s/%s: %s", self.namespace, self.name, message)
            await asyncio.sleep(self.poll_interval)
