"""Run a DAG with `dag.test()` against a fake Kubernetes core API; print the API calls as JSON.

Usage: python fake_k8s_run.py DAGS_FOLDER DAG_ID MODE   (MODE: fresh | reattach)
The environment (AIRFLOW_HOME etc.) is set by the calling test before Airflow is imported.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

from kubernetes.client import models as k8s

calls: list[dict] = []
MODE = sys.argv[3]
_pods: dict[str, k8s.V1Pod] = {}


def _status(pod: k8s.V1Pod, phase: str) -> k8s.V1Pod:
    pod.status = k8s.V1PodStatus(
        phase=phase,
        container_statuses=[k8s.V1ContainerStatus(name=c.name, image=c.image or "", image_id="", ready=phase == "Running",
                                                    restart_count=0, state=k8s.V1ContainerState(
                                                        terminated=k8s.V1ContainerStateTerminated(exit_code=0) if phase == "Succeeded" else None,
                                                        running=k8s.V1ContainerStateRunning() if phase == "Running" else None))
                            for c in pod.spec.containers],
    )
    return pod


class FakeCore:
    def __init__(self):
        from kubernetes.client import ApiClient

        self.api_client = ApiClient()
    def list_namespaced_pod(self, namespace, label_selector=None, **kw):
        calls.append({"op": "list", "namespace": namespace, "selector": label_selector})
        items = []
        if MODE == "reattach":
            # a running pod of this task instance from a previous worker, found by its labels
            wanted = dict(p.split("=", 1) for p in (label_selector or "").split(",") if "=" in p and "!" not in p)
            pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=f"existing-{wanted.get('map_index', 'x')}", namespace=namespace,
                                                      labels={**wanted, "try_number": "1"}),
                            spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="img")]))
            _pods[pod.metadata.name] = _status(pod, "Running")
            items = [pod]
        return k8s.V1PodList(items=items)

    def create_namespaced_pod(self, namespace, body, **kw):
        pod = body if isinstance(body, k8s.V1Pod) else None
        name = body["metadata"]["name"] if isinstance(body, dict) else body.metadata.name
        calls.append({"op": "create", "namespace": namespace, "body": body if isinstance(body, dict) else None, "name": name})
        if pod is None:
            pod = self.api_client._ApiClient__deserialize(body, "V1Pod")
        _pods[name] = _status(pod, "Running")
        return pod

    def read_namespaced_pod(self, name, namespace, **kw):
        pod = _pods[name]
        return _status(pod, "Succeeded")

    def delete_namespaced_pod(self, name, namespace, **kw):
        calls.append({"op": "delete", "name": name, "namespace": namespace})

    def patch_namespaced_pod(self, name, namespace, body, **kw):
        calls.append({"op": "patch", "name": name})
        return _pods.get(name)

    def list_namespaced_event(self, *a, **kw):
        return k8s.CoreV1EventList(items=[])


def _labels(run) -> dict[str, str | None]:
    """``task_id[map_index]`` -> the rendered map index the UI shows, as stored by the run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        return {f"{ti.task_id}[{ti.map_index}]": ti.rendered_map_index for ti in tis}


def main() -> int:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    fake = FakeCore()
    result_json = json.dumps({"status": "completed", "final_eval_loss": 1.5, "mlflow_run_id": None})
    with mock.patch.object(KubernetesHook, "is_in_cluster", new_callable=mock.PropertyMock, return_value=False), \
         mock.patch.object(KubernetesHook, "core_v1_client", new_callable=mock.PropertyMock, return_value=fake), \
         mock.patch.object(KubernetesPodOperator, "client", new_callable=mock.PropertyMock, return_value=fake), \
         mock.patch.object(KubernetesPodOperator, "extract_xcom", return_value=result_json), \
         mock.patch("airflow.providers.cncf.kubernetes.utils.pod_manager.PodManager.await_xcom_sidecar_container_start"):
        bag = DagBag(dag_folder=sys.argv[1])
        dag = bag.dags[sys.argv[2]]
        run = dag.test()
        print("FAKE_K8S_CALLS=" + json.dumps({"state": str(run.state), "calls": calls, "labels": _labels(run)}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
