"""A fake Kubernetes core API at the client level (``CoreV1Api`` methods), and a runner of a DAG
with ``dag.test()`` against it that prints the API calls as JSON.

Usage: python fake_k8s_run.py DAGS_FOLDER DAG_ID MODE   (MODE: fresh | reattach)
The environment (AIRFLOW_HOME etc.) is set by the calling test before Airflow is imported.

Pods end as their task's ``OUTCOMES`` entry says (default: success), so failure handling can be
tested: the container's exit code and reason, the pod's reason and the log the engine wrote.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from unittest import mock

from kubernetes.client import models as k8s


@dataclass(frozen=True)
class Outcome:
    phase: str = "Succeeded"
    exit_code: int = 0
    reason: str | None = None  # the container's terminated reason (OOMKilled, Error, Completed)
    pod_reason: str | None = None  # the pod's (DeadlineExceeded, Evicted)
    log: str = "done\n"


# by task id (the pod's task_id label)
OUTCOMES = {
    "host_oom": Outcome("Failed", 137, "OOMKilled", log="step 3/100\n"),
    "gpu_oom": Outcome(
        "Failed",
        1,
        "Error",
        log="Traceback (most recent call last):\n  ...\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to "
        "allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB\n",
    ),
    "sigkill": Outcome("Failed", 137, "Error", log="step 40/100\n"),
    "deadline": Outcome("Failed", 137, "Error", pod_reason="DeadlineExceeded", log="step 90/100\n"),
}


def _status(pod: k8s.V1Pod, phase: str, outcome: Outcome | None = None) -> k8s.V1Pod:
    outcome = outcome or Outcome()
    done = phase in ("Succeeded", "Failed")
    pod.status = k8s.V1PodStatus(
        phase=phase,
        reason=outcome.pod_reason if phase == "Failed" else None,
        container_statuses=[
            k8s.V1ContainerStatus(
                name=c.name,
                image=c.image or "",
                image_id="",
                ready=phase == "Running",
                restart_count=0,
                state=k8s.V1ContainerState(
                    terminated=k8s.V1ContainerStateTerminated(
                        exit_code=outcome.exit_code if c.name == "base" else 0,
                        reason=outcome.reason if c.name == "base" else "Completed",
                    )
                    if done
                    else None,
                    running=k8s.V1ContainerStateRunning() if phase == "Running" else None,
                ),
            )
            for c in pod.spec.containers
        ],
    )
    return pod


class FakeCore:
    """The CoreV1Api calls KubernetesPodOperator makes; ``calls`` records the ones that matter."""

    def __init__(self, mode: str = "fresh", outcomes: dict[str, Outcome] | None = None):
        from kubernetes.client import ApiClient

        self.api_client = ApiClient()
        self.mode = mode
        self.outcomes = OUTCOMES if outcomes is None else outcomes
        self.calls: list[dict] = []
        self.pods: dict[str, k8s.V1Pod] = {}

    def outcome(self, pod: k8s.V1Pod) -> Outcome:
        return self.outcomes.get((pod.metadata.labels or {}).get("task_id"), Outcome())

    def list_namespaced_pod(self, namespace, label_selector=None, **kw):
        self.calls.append({"op": "list", "namespace": namespace, "selector": label_selector})
        items = []
        if self.mode == "reattach":
            # a running pod of this task instance from a previous worker, found by its labels
            wanted = dict(
                p.split("=", 1) for p in (label_selector or "").split(",") if "=" in p and "!" not in p
            )
            pod = k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(
                    name=f"existing-{wanted.get('map_index', 'x')}",
                    namespace=namespace,
                    labels={**wanted, "try_number": "1"},
                ),
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="img")]),
            )
            self.pods[pod.metadata.name] = _status(pod, "Running")
            items = [pod]
        return k8s.V1PodList(items=items)

    def create_namespaced_pod(self, namespace, body, **kw):
        pod = body if isinstance(body, k8s.V1Pod) else None
        name = body["metadata"]["name"] if isinstance(body, dict) else body.metadata.name
        self.calls.append(
            {
                "op": "create",
                "namespace": namespace,
                "body": body if isinstance(body, dict) else None,
                "name": name,
            }
        )
        if pod is None:
            pod = self.api_client._ApiClient__deserialize(body, "V1Pod")
        self.pods[name] = _status(pod, "Running")
        return pod

    def read_namespaced_pod(self, name, namespace, **kw):
        pod = self.pods[name]
        outcome = self.outcome(pod)
        return _status(pod, outcome.phase, outcome)

    def read_namespaced_pod_log(
        self, name, namespace, container=None, tail_lines=None, _preload_content=True, **kw
    ):
        self.calls.append({"op": "log", "name": name, "container": container, "tail_lines": tail_lines})
        text = self.outcome(self.pods[name]).log
        if tail_lines:
            text = "".join(text.splitlines(keepends=True)[-tail_lines:])
        return text if _preload_content else iter(line.encode() for line in text.splitlines(keepends=True))

    def delete_namespaced_pod(self, name, namespace, **kw):
        self.calls.append({"op": "delete", "name": name, "namespace": namespace})

    def patch_namespaced_pod(self, name, namespace, body, **kw):
        self.calls.append({"op": "patch", "name": name})
        return self.pods.get(name)

    def list_namespaced_event(self, *a, **kw):
        return k8s.CoreV1EventList(items=[])


def patched(fake: FakeCore, result_json: str):
    """The patches that point KubernetesPodOperator (and its hook) at ``fake``."""
    import contextlib

    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    stack = contextlib.ExitStack()
    stack.enter_context(
        mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False)
    )
    stack.enter_context(
        mock.patch.object(KubernetesHook, "core_v1_client", new_callable=mock.PropertyMock, return_value=fake)
    )
    stack.enter_context(
        mock.patch.object(KubernetesPodOperator, "client", new_callable=mock.PropertyMock, return_value=fake)
    )
    # what the XCom sidecar would print; the operator parses it as it would a real one
    stack.enter_context(
        mock.patch(
            "airflow.providers.cncf.kubernetes.utils.pod_manager.PodManager.extract_xcom",
            return_value=result_json,
        )
    )
    stack.enter_context(
        mock.patch(
            "airflow.providers.cncf.kubernetes.utils.pod_manager.PodManager.await_xcom_sidecar_container_start"
        )
    )
    return stack


def _labels(run) -> dict[str, str | None]:
    """``task_id[map_index]`` -> the rendered map index the UI shows, as stored by the run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        return {f"{ti.task_id}[{ti.map_index}]": ti.rendered_map_index for ti in tis}


def _states(run) -> dict[str, dict]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        return {
            f"{ti.task_id}[{ti.map_index}]": {"state": str(ti.state), "try_number": ti.try_number}
            for ti in tis
        }


def main() -> int:
    try:
        from airflow.dag_processing.dagbag import DagBag

        serialize = None
    except ImportError:  # Airflow 3.1: dag.test() needs the DAG serialized in the database first
        from airflow.models.dagbag import DagBag, sync_bag_to_db

        def serialize(bag):
            from airflow.dag_processing.bundles.manager import DagBundlesManager

            DagBundlesManager().sync_bundles_to_db()
            sync_bag_to_db(bag, "dags-folder", None)

    fake = FakeCore(sys.argv[3])
    result_json = json.dumps({"status": "completed", "final_eval_loss": 1.5, "mlflow_run_id": None})
    with patched(fake, result_json):
        bag = DagBag(dag_folder=sys.argv[1])
        dag = bag.dags[sys.argv[2]]
        if serialize is not None:
            serialize(bag)
        run = dag.test()
        print(
            "FAKE_K8S_CALLS="
            + json.dumps(
                {"state": str(run.state), "calls": fake.calls, "labels": _labels(run), "tis": _states(run)},
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
