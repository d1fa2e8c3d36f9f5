"""TrainingJobTrigger: wait in the triggerer until a multi-node TrainJob (Kubeflow Trainer) or
PyTorchJob (Training Operator) ends, polling the API asynchronously (kubernetes_asyncio through the
cncf provider's AsyncKubernetesHook), so FinetuneKubernetesOperator frees its worker slot for the
hours a multi-node run takes. The same loop runs on the worker when the operator is not deferrable.

Besides the job's own conditions it reads the job's pods (by the provider's job label), so what
makes a gang never finish is reported within two polls instead of at the deadline: an image that
cannot be pulled, a container killed for memory, a pod that no node can take (after
``schedule_timeout`` seconds of that: an autoscaler may still add the node).

A user who kills the deferred task (mark failed or success, clear) gets the job deleted, as
``on_kill`` does on the worker: Airflow 3.3+ calls the trigger's ``on_kill``; on 3.1 and 3.2 its
``cleanup`` deletes the job when the task instance is no longer deferred (a triggerer restart
leaves it deferred, and the job running).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from packaging.version import Version

JOB_LABEL = "airflow-provider-finetune/job"
# waiting reasons a restart does not cure: the pod's spec or its image is wrong
STUCK_WAITING = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
}


def _triggerer_calls_on_kill() -> bool:
    """Airflow 3.3+ calls ``BaseTrigger.on_kill`` when a user kills a deferred task."""
    from airflow import __version__

    return Version(Version(__version__).base_version) >= Version("3.3")


def _true_conditions(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c.get("type"): c
        for c in (doc.get("status") or {}).get("conditions") or []
        if str(c.get("status")) == "True"
    }


def pod_problem(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, message) of what stops a job's pod: ``stuck`` (image pull, container config),
    ``oom`` (a container OOMKilled, now or before its restart), ``unschedulable``; else None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = meta.get("name", "?")
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return "stuck", (
                f"pod {name} container {cs.get('name')}: {waiting['reason']}: {waiting.get('message') or ''}"
            ).strip()
        for term in (state.get("terminated") or {}, last.get("terminated") or {}):
            if term.get("reason") == "OOMKilled":
                return "oom", (
                    f"pod {name} container {cs.get('name')}: OOMKilled (exit {term.get('exitCode')}): out of "
                    "host memory; raise memory_per_gpu or lower the batch/sequence length"
                )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            if cond.get("reason") == "Unschedulable":
                return "unschedulable", f"pod {name} is unschedulable: {cond.get('message') or ''}".strip()
    return None


def job_state(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str, str | None]:
    """(state, message, pod name) of a TrainJob/PyTorchJob and its pods, as the API returns them.

    state: ``succeeded`` (Complete / Succeeded), ``failed`` (the job's Failed condition), ``stuck`` /
    ``oom`` / ``unschedulable`` (a pod's problem, :func:`pod_problem`), or ``running``.
    """
    kind = job.get("kind") or "job"
    conditions = _true_conditions(job)
    if "Failed" in conditions:
        cond = conditions["Failed"]
        reason = f"{cond.get('reason')}: " if cond.get("reason") else ""
        return "failed", f"{kind} failed: {reason}{cond.get('message') or ''}".strip(), None
    if conditions.keys() & {"Complete", "Succeeded"}:
        return "succeeded", f"{kind} succeeded", None
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        problem = pod_problem(pod)
        if problem is not None:
            return problem[0], problem[1], (pod.get("metadata") or {}).get("name")
    phases: dict[str, int] = {}
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase") or "Unknown"
        phases[phase] = phases.get(phase, 0) + 1
    summary = ", ".join(f"{n} {p}" for p, n in sorted(phases.items())) or "no pods yet"
    return "running", f"{kind} running ({summary})", None


class TrainingJobTrigger(BaseTrigger):
    """Fires ``{"status": "succeeded" | "failed" | "timeout" | "error", "message", "pod", "name",
    "namespace", "group", "version", "plural"}``.

    :param name: the job's name.
    :param namespace: its namespace.
    :param group: API group (``trainer.kubeflow.org`` or ``kubeflow.org``).
    :param version: API version (``v1alpha1`` or ``v1``).
    :param plural: ``trainjobs`` or ``pytorchjobs``.
    :param kubernetes_conn_id: Airflow Kubernetes connection (the one the operator used).
    :param poll_interval: seconds between reads of the job and its pods.
    :param deadline: epoch seconds after which the trigger gives up with ``timeout``.
    :param schedule_timeout: seconds a pod may stay unschedulable before the wait fails.
    :param delete_on_kill: delete the job when a user kills the deferred task (default True).
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        group: str,
        version: str,
        plural: str,
        kubernetes_conn_id: str | None = None,
        poll_interval: float = 30.0,
        deadline: float | None = None,
        schedule_timeout: float | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
        config_file: str | None = None,
        delete_on_kill: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.group = group
        self.version = version
        self.plural = plural
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = deadline
        self.schedule_timeout = schedule_timeout
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.config_file = config_file
        self.delete_on_kill = delete_on_kill
        self._fired = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "group": self.group,
                "version": self.version,
                "plural": self.plural,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "schedule_timeout": self.schedule_timeout,
                "cluster_context": self.cluster_context,
                "in_cluster": self.in_cluster,
                "config_file": self.config_file,
                "delete_on_kill": self.delete_on_kill,
            },
        )

    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(
            conn_id=self.kubernetes_conn_id,
            cluster_context=self.cluster_context,
            in_cluster=self.in_cluster,
            config_file=self.config_file,
        )

    async def read(self, hook) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The job and its pods (camelCase dicts)."""
        from kubernetes_asyncio import client

        async with hook.get_conn() as api:
            job = await client.CustomObjectsApi(api).get_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.name
            )
            # raw JSON: a status the client's models do not know yet must not break the wait
            response = await client.CoreV1Api(api).list_namespaced_pod(
                self.namespace, label_selector=f"{JOB_LABEL}={self.name}", _preload_content=False
            )
            return job, json.loads(await response.read()).get("items") or []

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async for event in self._wait():
            self._fired = True
            yield event

    async def delete(self) -> None:
        """Delete the job and its pods (background propagation); a job already gone is fine."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        async with self.hook().get_conn() as api:
            try:
                await client.CustomObjectsApi(api).delete_namespaced_custom_object(
                    self.group,
                    self.version,
                    self.namespace,
                    self.plural,
                    self.name,
                    body=client.V1DeleteOptions(propagation_policy="Background"),
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                return
        self.log.info("deleted %s %s/%s: the task was killed", self.plural[:-1], self.namespace, self.name)

    async def on_kill(self) -> None:
        """The user killed the deferred task (Airflow 3.3+ calls this): the job goes too, so the gang's
        GPUs are not held until its deadline."""
        if self._fired or not self.delete_on_kill:
            return
        try:
            await self.delete()
        except Exception:  # noqa: BLE001 - the kill goes on; the job's deadline and TTL remain
            self.log.exception("could not delete %s %s/%s", self.plural[:-1], self.namespace, self.name)

    async def task_state(self) -> str | None:
        """The task instance's state as the API server has it (Airflow 3.1/3.2 cleanup path)."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        ti = self.task_instance
        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index
        )
        key = f"{ti.task_id}_{ti.map_index}" if ti.map_index is not None and ti.map_index >= 0 else ti.task_id
        return (states.get(ti.run_id) or {}).get(key)

    async def cleanup(self) -> None:
        """Before Airflow 3.3 a user's kill only cancels the trigger: delete the job when the task is
        no longer deferred (a triggerer restart or hand-over leaves it deferred: the job stays)."""
        if _triggerer_calls_on_kill() or self._fired or not self.delete_on_kill:
            return
        if getattr(self, "task_instance", None) is None:
            return
        try:
            state = await self.task_state()
        except Exception as err:  # noqa: BLE001 - unknown state: keep the job (its deadline and TTL remain)
            self.log.warning("could not read the task's state; keeping the job: %s", err)
            return
        state = getattr(state, "value", state)  # TaskInstanceState or its string
        if state is not None and state != "deferred":
            await self.on_kill()

    async def _wait(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        where = {
            "name": self.name,
            "namespace": self.namespace,
            "group": self.group,
            "version": self.version,
            "plural": self.plural,
        }
        seen: str | None = None  # the pod problem of the previous poll
        unschedulable_since: float | None = None
        last_message = ""
        while True:
            try:
                job, pods = await self.read(hook)
                state, message, pod = job_state(job, pods)
            except Exception as err:  # an API error ends the wait with the reason, in the task's log
                yield TriggerEvent(
                    {"status": "error", "message": f"{type(err).__name__}: {err}", "pod": None, **where}
                )
                return
            if state in ("succeeded", "failed"):
                yield TriggerEvent({"status": state, "message": message, "pod": pod, **where})
                return
            now = time.time()
            if state == "unschedulable":
                unschedulable_since = unschedulable_since or now
                if self.schedule_timeout is not None and now - unschedulable_since >= self.schedule_timeout:
                    yield TriggerEvent(
                        {
                            "status": "failed",
                            "message": f"{message} (for {int(now - unschedulable_since)} s)",
                            "pod": pod,
                            **where,
                        }
                    )
                    return
            else:
                unschedulable_since = None
            if state in ("stuck", "oom"):
                if seen == message:  # the same problem on two polls in a row: it is not going away
                    yield TriggerEvent({"status": "failed", "message": message, "pod": pod, **where})
                    return
                seen = message
            else:
                seen = None
            if self.deadline is not None and now > self.deadline:
                yield TriggerEvent(
                    {"status": "timeout", "message": f"not finished in time: {message}", "pod": pod, **where}
                )
                return
            if message != last_message or state != "running":
                (self.log.warning if state != "running" else self.log.info)(
                    "%s %s/%s: %s", self.plural[:-1], self.namespace, self.name, message
                )
                last_message = message
            await asyncio.sleep(self.poll_interval)


async def first_event(trigger: BaseTrigger) -> dict[str, Any]:
    """The payload of the trigger's first event (the worker-side wait of a non-deferrable task)."""
    async for event in trigger.run():
        return event.payload
    raise RuntimeError(f"{type(trigger).__name__} ended without an event")


__all__ = ["JOB_LABEL", "TrainingJobTrigger", "first_event", "job_state", "pod_problem"]
