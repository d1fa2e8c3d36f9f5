"""DeployVLLM / UndeployVLLM on the cluster path, over the wire: the real ``kubernetes`` and
``kubernetes_asyncio`` clients talk HTTP to a local server that plays the Kubernetes API
(tests/provider/fake_kube_api.py) — the request bodies, methods and content types are the ones a
real API server would receive. Also the deferrable wait (DeploymentReadyTrigger), the optional
Ingress/HTTPRoute, and the local undeploy of a real process."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiTypeError

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import DeployVLLMOperator, UndeployVLLMOperator
from airflow_provider_finetune.operators.deploy import SERVED_OBJECTS
from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.serving import build_vllm_deployment, build_vllm_service
from airflow_provider_finetune.runners.kubernetes_apply import KubernetesApplier
from airflow_provider_finetune.runners.vllm_local import record_server
from airflow_provider_finetune.triggers.deployment import DeploymentReadyTrigger, deployment_readiness
from tests.provider.conftest import K8S_VERSIONS
from tests.provider.fake_kube_api import FakeKubeAPI

NS = "finetune"


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    api = FakeKubeAPI(ready_after=2).start()
    config = api.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAKE_KUBE",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(config)}}),
    )
    yield api
    api.stop()


def ctx():
    ti = SimpleNamespace(dag_id="serve", task_id="deploy", map_index=-1, try_number=1, xcom_push=mock.Mock())
    return {"ti": ti, "run_id": "manual__2026-12-01T00:00:00+00:00"}


def deploy_op(**kw) -> DeployVLLMOperator:
    kw = {
        "task_id": "deploy",
        "model_uri": "s3://finetune/e/r/checkpoint-final",
        "served_model_name": "tiny",
        "adapters": {"r8": "s3://finetune/e/r8/checkpoint-final-adapter"},
        "adapter_ranks": {"r8": 8},
        "namespace": NS,
        "runner": "kubernetes",
        "kubernetes_conn_id": "fake_kube",
        "poll_interval": 0,
        "deferrable": False,
        **kw,
    }
    return DeployVLLMOperator(**kw)


def test_smoke_test_posts_json_through_the_service_proxy(kube):
    op = deploy_op()
    context = ctx()
    result = op.execute(context)
    name = result["deployment"].split("/")[1]
    assert (
        result["endpoint"] == f"http://{name}.{NS}.svc.cluster.local/v1"
        and result["smoke_reply"] == kube.chat_reply
    )
    [proxied] = kube.proxied
    assert proxied["method"] == "POST" and proxied["content_type"] == "application/json"
    assert proxied["path"] == f"/api/v1/namespaces/{NS}/services/{name}%3Ahttp/proxy/v1/chat/completions"
    assert proxied["body"] == {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": 32,
        "temperature": 0,
    }
    # the objects the API server received: the Deployment waited for, the Service the proxy used
    dep = kube.get("deployments", NS, name)
    assert (
        restricted_violations(dep) == []
        and "--max-lora-rank" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert kube.get("services", NS, name)["spec"]["ports"][0]["name"] == "http"
    assert kube.status_reads == 2  # polled until ready
    assert kube.calls(proxy=False) == [
        # every name is looked up first: an object the provider did not make is never replaced
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
        ("GET", f"/api/v1/namespaces/{NS}/services/{name}"),
        ("POST", f"/apis/apps/v1/namespaces/{NS}/deployments"),
        ("POST", f"/api/v1/namespaces/{NS}/services"),
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status"),
        # while not ready, the server's pods are read for a reason to fail early (none here)
        ("GET", f"/api/v1/namespaces/{NS}/pods"),
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status"),
    ]
    context["ti"].xcom_push.assert_called_with(key="_link_ServedEndpointLink", value=result["endpoint"])


def test_the_generated_proxy_method_takes_no_body(kube, tmp_path):
    """Why the operator does not use connect_post_namespaced_service_proxy_with_path: the real client
    refuses a body."""
    from kubernetes import client, config

    api = config.new_client_from_config(str(kube.kubeconfig(tmp_path / "kc")))
    with pytest.raises(ApiTypeError, match="body"):
        client.CoreV1Api(api).connect_post_namespaced_service_proxy_with_path(
            name="x:http", namespace=NS, path="v1/chat/completions", body={"messages": []}
        )
    assert kube.requests == []


def test_redeploy_updates_in_place(kube):
    deploy_op().execute(ctx())
    first = {k: v["metadata"]["uid"] for k, v in kube.objects.items()}
    kube.requests.clear()
    deploy_op(engine_args={"enforce_eager": True}).execute(ctx())
    assert {k: v["metadata"]["uid"] for k, v in kube.objects.items()} == first  # same objects, updated
    methods = [
        (r["method"], r["path"].rsplit("/", 2)[-2], r["content_type"])
        for r in kube.requests
        if "/proxy/" not in r["path"]
    ]
    assert ("PUT", "deployments", "application/json") in methods
    assert ("PATCH", "services", "application/strategic-merge-patch+json") in methods
    [dep] = [v for k, v in kube.objects.items() if k[2] == "deployments"]
    assert (
        "--enforce-eager" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
        and dep["metadata"]["generation"] == 2
    )


def test_create_failure_names_the_object(kube):
    kube.objects[("apis/apps/v1", NS, "deployments", "ignored")] = {}
    with mock.patch.object(
        FakeKubeAPI, "_create", return_value=(403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
    ):
        with pytest.raises(RuntimeError, match="Failed to create Deployment finetune/vllm-tiny-.*403"):
            deploy_op().execute(ctx())


def test_rollout_past_its_deadline_fails():
    doc = {
        "metadata": {"generation": 3},
        "status": {
            "observedGeneration": 3,
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet x has timed out",
                }
            ],
        },
    }
    assert deployment_readiness(doc, 1) == (
        "failed",
        "rollout exceeded its progress deadline: ReplicaSet x has timed out",
    )
    stale = {
        "metadata": {"generation": 2},
        "status": {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1},
    }
    assert deployment_readiness(stale, 1)[0] == "waiting"  # the old generation's replica does not count
    assert (
        deployment_readiness({**stale, "status": {**stale["status"], "observedGeneration": 2}}, 1)[0]
        == "ready"
    )


# -- optional routes -----------------------------------------------------------------------------


def test_no_routes_by_default(kube):
    deploy_op().execute(ctx())
    assert {k[2] for k in kube.objects} == {"deployments", "services"}


def test_ingress_and_httproute_created_idempotently(kube):
    ingress = {"host": "chat.example.com", "ingress_class": "nginx", "tls_secret": "chat-tls"}
    route = {"gateway": "public", "gateway_namespace": "gateways", "hostnames": ["chat.example.com"]}
    open_route = {"allow_unauthenticated_ingress": True}
    result = deploy_op(ingress=ingress, http_route=route, **open_route).execute(ctx())
    name = result["deployment"].split("/")[1]
    assert result["ingress_endpoint"] == result["external_endpoint"] == "https://chat.example.com/v1"
    ing = kube.get("ingresses", NS, name)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(ing, version, strict=True)
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["tls"] == [
        {"hosts": ["chat.example.com"], "secretName": "chat-tls"}
    ]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": name, "port": {"name": "http"}}
    hr = kube.get("httproutes", NS, name)
    assert hr["apiVersion"] == "gateway.networking.k8s.io/v1" and hr["kind"] == "HTTPRoute"
    assert set(hr["spec"]) == {"parentRefs", "rules", "hostnames"}
    assert hr["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    [rule] = hr["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"name": name, "port": kube.get("services", NS, name)["spec"]["ports"][0]["port"]}
    ]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # again: the Ingress is replaced, the HTTPRoute (a custom resource: PUT needs resourceVersion)
    # merge-patched
    kube.requests.clear()
    deploy_op(ingress={**ingress, "host": "chat2.example.com"}, http_route=route, **open_route).execute(ctx())
    calls = {(r["method"], r["path"].rsplit("/", 2)[-2], r["content_type"]) for r in kube.requests}
    assert ("PUT", "ingresses", "application/json") in calls
    assert ("PATCH", "httproutes", "application/merge-patch+json") in calls
    assert kube.get("ingresses", NS, name)["spec"]["rules"][0]["host"] == "chat2.example.com"
    assert len(kube.objects) == 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"ingress": {"hostname": "x"}},
            r"ingress: unknown keys \['hostname'\]; use \['host', 'ingress_class', 'tls_secret'\]",
        ),
        ({"ingress": {"ingress_class": "nginx"}}, "ingress.host is required"),
        ({"http_route": {"hostnames": ["x"]}}, "http_route.gateway is required"),
        ({"http_route": "public"}, "http_route must be a mapping"),
    ],
)
def test_route_options_are_checked_before_any_call(kube, kw, match):
    with pytest.raises(FinetuneConfigError, match=match):
        deploy_op(**kw).execute(ctx())
    assert kube.requests == []


def test_undeploy_knows_every_kind_deploy_can_create():
    routes = {"ingress": {"host": "chat.example.com"}, "http_route": {"gateway": "public"}}
    op = deploy_op(**routes, network_policy=True, api_key_secret="vllm-key/key")
    created = op.manifests() + deploy_op(platform="kserve").manifests()
    assert {(d["kind"], d["apiVersion"]) for d in created} == {
        (t.kind, t.api_version) for t in SERVED_OBJECTS
    }
    assert [t.kind for t in SERVED_OBJECTS][:2] == ["Deployment", "Service"]


def test_applier_refuses_an_unknown_kind_before_any_call(kube):
    from kubernetes import client

    config = client.Configuration()
    config.host = kube.url
    service = build_vllm_service(deploy_op().serve_spec())
    with pytest.raises(ValueError, match="cannot apply kind 'ConfigMap'"):
        KubernetesApplier(client.ApiClient(config), mock.Mock()).apply(
            [service, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}], NS
        )
    assert kube.requests == []


# -- deferrable ----------------------------------------------------------------------------------


def test_deferrable_defaults_to_the_operators_setting(monkeypatch):
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "true")
    assert deploy_op(deferrable=None).deferrable is True
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "false")
    assert deploy_op(deferrable=None).deferrable is False


def _cluster_undeploy(task_id: str = "u") -> UndeployVLLMOperator:
    """UndeployVLLMOperator for the served model "tiny" on the fake cluster."""
    return UndeployVLLMOperator(
        task_id=task_id,
        served_model_name="tiny",
        namespace=NS,
        kubernetes_conn_id="fake_kube",
        runner="kubernetes",
    )


def _run_trigger(trigger: DeploymentReadyTrigger) -> dict:
    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first(), 60))


def test_defers_then_trigger_fires_then_smoke_test(kube):
    from airflow_provider_finetune.compat import TaskDeferred

    op = deploy_op(deferrable=True, ready_timeout=600, poll_interval=0.05)
    context = ctx()
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "execute_complete"
    trigger = deferred.value.trigger
    assert isinstance(trigger, DeploymentReadyTrigger)
    path, kwargs = trigger.serialize()
    name = kwargs["name"]
    assert path == "airflow_provider_finetune.triggers.deployment.DeploymentReadyTrigger"
    assert {k: kwargs[k] for k in ("namespace", "replicas", "kubernetes_conn_id")} == {
        "namespace": NS,
        "replicas": 1,
        "kubernetes_conn_id": "fake_kube",
    }
    assert before + 600 <= kwargs["deadline"] <= time.time() + 600
    assert (
        kube.get("deployments", NS, name) is not None and kube.status_reads == 0 and kube.proxied == []
    )  # nothing waited on the worker
    # the triggerer rebuilds the trigger from its serialized form and polls with kubernetes_asyncio
    event = _run_trigger(DeploymentReadyTrigger(**kwargs))
    assert event == {"status": "ready", "message": "1/1 replicas available", "name": name, "namespace": NS}
    assert kube.status_reads == 2
    result = op.execute_complete(context, event)
    assert (
        result["endpoint"] == f"http://{name}.{NS}.svc.cluster.local/v1"
        and result["smoke_reply"] == kube.chat_reply
    )
    assert len(kube.proxied) == 1
    context["ti"].xcom_push.assert_called_with(key="_link_ServedEndpointLink", value=result["endpoint"])


def test_trigger_times_out_and_execute_complete_fails(kube):
    kube.ready_after = None  # never ready
    dep = build_vllm_deployment(deploy_op().serve_spec())
    kube.objects[("apis/apps/v1", NS, "deployments", dep["metadata"]["name"])] = {
        **dep,
        "metadata": {**dep["metadata"], "generation": 1},
    }
    trigger = DeploymentReadyTrigger(
        name=dep["metadata"]["name"],
        namespace=NS,
        kubernetes_conn_id="fake_kube",
        poll_interval=0.05,
        deadline=time.time() + 0.3,
    )
    event = _run_trigger(trigger)
    assert event["status"] == "timeout" and "0 of 1 replicas available" in event["message"]
    with pytest.raises(RuntimeError, match="timeout: not ready in time"):
        deploy_op().execute_complete(ctx(), event)
    missing = _run_trigger(
        DeploymentReadyTrigger(name="nope", namespace=NS, kubernetes_conn_id="fake_kube", poll_interval=0)
    )
    assert missing["status"] == "error" and "404" in missing["message"]


def test_sync_wait_times_out(kube):
    kube.ready_after = None
    with pytest.raises(TimeoutError, match="not ready within 0s: 0 of 1 replicas available"):
        deploy_op(ready_timeout=0).execute(ctx())


# -- undeploy ------------------------------------------------------------------------------------


def test_undeploy_removes_what_deploy_created(kube):
    routes = {"ingress": {"host": "chat.example.com"}, "http_route": {"gateway": "public"}}
    result = deploy_op(**routes, allow_unauthenticated_ingress=True).execute(ctx())
    name = result["deployment"].split("/")[1]
    assert len(kube.objects) == 4
    kube.requests.clear()
    undeploy = _cluster_undeploy("undeploy")
    assert undeploy.execute(ctx()) is True
    assert kube.objects == {}
    calls = kube.calls()
    deletes = [path for method, path in calls if method == "DELETE"]
    # each object was read (its owner label checked) before the first deletion
    first_delete = calls.index(("DELETE", deletes[0]))
    assert {("GET", path) for path in deletes} <= set(calls[:first_delete])
    assert [c for c in calls[first_delete:] if c[0] == "DELETE"] == [
        ("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
        ("DELETE", f"/api/v1/namespaces/{NS}/services/{name}"),
        ("DELETE", f"/apis/networking.k8s.io/v1/namespaces/{NS}/ingresses/{name}"),
        ("DELETE", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/{name}"),
    ]
    # then every other revision of this server (blue-green) is looked for by its labels
    assert calls[-1] == ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments")
    assert undeploy.execute(ctx()) is False  # nothing left: 404s are fine


def test_undeploy_without_route_rights_still_removes_the_server(kube):
    deploy_op().execute(ctx())
    real = FakeKubeAPI.dispatch

    def forbid_routes(self, req):
        if "/ingresses/" in req["path"] or "/httproutes/" in req["path"]:
            return 403, {"kind": "Status", "code": 403, "reason": "Forbidden"}
        return real(self, req)

    with mock.patch.object(FakeKubeAPI, "dispatch", forbid_routes):
        assert _cluster_undeploy().execute(ctx()) is True
    assert kube.objects == {}


def test_undeploy_local_stops_the_server_process(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_WORKDIR", str(tmp_path))
    workdir = deploy_op(runner="local").local_dir()
    workdir.mkdir(parents=True)
    # a stand-in server with a child, in its own process group like start_vllm's
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); time.sleep(600)",
        ],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        record_server(workdir, proc.pid)
        assert (
            UndeployVLLMOperator(task_id="u", served_model_name="tiny", runner="local").execute(ctx()) is True
        )
        assert proc.wait(10) is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the whole group is gone, the child too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server's child survived undeploy")
        assert not (workdir / "server.pid").exists()
        assert (
            UndeployVLLMOperator(task_id="u", served_model_name="tiny", runner="local").execute(ctx())
            is False
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


# -- only the provider's own objects are replaced or deleted ----------------------------------------


def _foreign(kube, plural: str, group: str, name: str) -> dict:
    """An object of the name DeployVLLM would use, made by someone else (no managed-by label)."""
    spec = deploy_op().serve_spec()
    obj = build_vllm_deployment(spec) if plural == "deployments" else build_vllm_service(spec)
    obj["metadata"] = {"name": name, "namespace": NS, "labels": {"app": "theirs"}}
    kube.objects[(group, NS, plural, name)] = obj
    return copy.deepcopy(obj)


@pytest.mark.parametrize(
    "plural,group", [("deployments", "apis/apps/v1"), ("services", "api/v1")], ids=["deployment", "service"]
)
def test_deploy_refuses_to_replace_an_object_it_did_not_make(kube, plural, group):
    name = build_vllm_deployment(deploy_op().serve_spec())["metadata"]["name"]
    theirs = _foreign(kube, plural, group, name)
    before = copy.deepcopy(kube.objects)
    with pytest.raises(FinetuneConfigError, match=r"exists and was not made by airflow-provider-finetune"):
        deploy_op().execute(ctx())
    assert {m for m, _ in kube.calls()} == {"GET"}  # looked, wrote nothing
    assert kube.objects == before and kube.get(plural, NS, name) == theirs


def test_undeploy_refuses_to_delete_an_object_it_did_not_make(kube):
    result = deploy_op().execute(ctx())
    name = result["deployment"].split("/")[1]
    kube.objects[("api/v1", NS, "services", name)]["metadata"]["labels"] = {"app": "theirs"}
    kube.requests.clear()
    undeploy = _cluster_undeploy()
    with pytest.raises(FinetuneConfigError, match=f"Service {NS}/{name} exists and was not made by"):
        undeploy.execute(ctx())
    assert "DELETE" not in {m for m, _ in kube.calls()} and len(kube.objects) == 2  # the Deployment stays too


def test_serving_defaults_to_the_dedicated_namespace_and_checks_names_before_any_call(kube, monkeypatch):
    monkeypatch.delenv("AIRFLOW__FINETUNE__NAMESPACE", raising=False)
    assert deploy_op(namespace=None).serve_spec().namespace == "finetune"
    for kw, match in (
        ({"namespace": "Prod_NS"}, "namespace 'Prod_NS' is not a valid Kubernetes namespace"),
        ({"model_uri": "s3://finetune/e/../x"}, "model_uri 's3://finetune/e/../x'"),
        ({"adapters": {"r8": "s3://Bad/x"}}, r"adapters.r8 's3://Bad/x': bucket"),
        ({"served_model_name": " "}, "served_model_name is empty"),
    ):
        with pytest.raises(FinetuneConfigError, match=match):
            deploy_op(**kw).execute(ctx())
    monkeypatch.setenv("AIRFLOW__FINETUNE__ENGINE_IMAGE", "ghcr.io/org/engine:")
    with pytest.raises(FinetuneConfigError, match="engine_image .* is not a valid image reference"):
        deploy_op().execute(ctx())
    assert kube.requests == []


def test_a_deployment_that_breaks_the_pod_rules_is_never_sent(kube):
    from airflow_provider_finetune.operators import deploy as deploy_module

    real = deploy_module.build_vllm_deployment

    def tampered(spec):
        doc = real(spec)
        doc["spec"]["template"]["spec"]["hostNetwork"] = True
        doc["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "x"})
        return doc

    with mock.patch.object(deploy_module, "build_vllm_deployment", tampered):
        with pytest.raises(
            FinetuneConfigError, match=r"(?s)hostNetwork.*env HF_TOKEN looks like a credential"
        ):
            deploy_op().execute(ctx())
    assert kube.requests == []


# -- failures surface with their reason, within a poll ---------------------------------------------


def _pod(op: DeployVLLMOperator, status: dict) -> dict:
    labels = op.manifests()[0]["spec"]["selector"]["matchLabels"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "server-0", "labels": labels},
        "status": status,
    }


def _waiting(reason: str, message: str = "", init: bool = False, last: dict | None = None) -> dict:
    cs = {
        "name": "pull-model" if init else "vllm",
        "image": "vllm/vllm-openai:v0.32.0",
        "imageID": "",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": reason, "message": message}},
    }
    if last:
        cs["lastState"] = {"terminated": last}
    return {"initContainerStatuses" if init else "containerStatuses": [cs]}


FAILURES = {
    "image-pull": (
        _waiting("ImagePullBackOff", 'Back-off pulling image "vllm/vllm-openai:v0.32.0"'),
        None,
        "container vllm ImagePullBackOff: the image cannot be pulled",
    ),
    "init-exit-log-line": (
        _waiting("CrashLoopBackOff", init=True, last={"exitCode": 1, "reason": "Error"}),
        "pulling s3://finetune/e/r/checkpoint-final\nbotocore.exceptions.ClientError: InvalidAccessKeyId",
        "init container pull-model failed (exit code 1: botocore.exceptions.ClientError: InvalidAccessKeyId)",
    ),
    "init-termination-message": (
        {
            "initContainerStatuses": [
                {
                    "name": "pull-model",
                    "image": "registry.example/finetune-engine:1",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 2,
                            "message": "no complete marker under s3://finetune/e/r/checkpoint-final",
                        }
                    },
                }
            ]
        },
        None,
        "init container pull-model failed (exit code 2: no complete marker",
    ),
    "crash-loop": (
        _waiting(
            "CrashLoopBackOff", "back-off 5m0s", last={"exitCode": 1, "message": "torch.OutOfMemoryError"}
        ),
        None,
        "container vllm CrashLoopBackOff: it keeps crashing (last run: exit code 1: torch.OutOfMemoryError)",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_broken_start_fails_at_the_first_poll_with_its_reason(kube, case):
    status, log, words = FAILURES[case]
    op = deploy_op(poll_interval=0)
    kube.ready_after = None
    kube.objects[("api/v1", NS, "pods", "server-0")] = _pod(op, status)
    if log:
        kube.logs[(NS, "server-0")] = log
    with pytest.raises(RuntimeError) as err:
        op.execute(ctx())
    assert words in str(err.value) and "server-0" in str(err.value)
    assert kube.status_reads == 1  # one poll, not ready_timeout


def test_no_gpu_capacity_fails_unless_the_autoscaler_scales_up(kube):
    op = deploy_op(poll_interval=0, ready_timeout=0.3)
    kube.ready_after = None
    kube.objects[("api/v1", NS, "pods", "server-0")] = _pod(op, {"phase": "Pending"})
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e1"},
        "reason": "FailedScheduling",
        "involvedObject": {"kind": "Pod", "name": "server-0"},
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }
    kube.objects[("api/v1", NS, "events", "e1")] = event
    with pytest.raises(
        RuntimeError, match=r"pod server-0 cannot be scheduled: 0/3 nodes .*Insufficient nvidia.com/gpu"
    ):
        op.execute(ctx())
    kube.objects[("api/v1", NS, "events", "e2")] = {
        **event,
        "metadata": {"name": "e2"},
        "reason": "TriggeredScaleUp",
        "message": "pod triggered scale-up",
    }
    with pytest.raises(TimeoutError, match="not ready within 0s"):  # a node is coming: wait for it
        deploy_op(poll_interval=0, ready_timeout=0).execute(ctx())


def test_trigger_fails_with_the_pods_reason(kube):
    status, _, words = FAILURES["crash-loop"]
    op = deploy_op()
    dep = op.manifests()[0]
    kube.ready_after = None
    kube.objects[("apis/apps/v1", NS, "deployments", dep["metadata"]["name"])] = {
        **dep,
        "metadata": {**dep["metadata"], "generation": 1},
    }
    kube.objects[("api/v1", NS, "pods", "server-0")] = _pod(op, status)
    trigger = DeploymentReadyTrigger(
        name=dep["metadata"]["name"],
        namespace=NS,
        kubernetes_conn_id="fake_kube",
        poll_interval=0,
        deadline=time.time() + 600,
        pod_labels=dep["spec"]["selector"]["matchLabels"],
    )
    event = _run_trigger(DeploymentReadyTrigger(**trigger.serialize()[1]))
    assert event["status"] == "failed" and words in event["message"]
    assert kube.status_reads == 1


def test_transient_api_errors_are_retried_not_fatal(kube):
    real, failures = FakeKubeAPI.dispatch, iter([503, 500])

    def flaky(self, req):
        if req["path"].endswith("/status"):
            code = next(failures, None)
            if code:
                return code, {"kind": "Status", "code": code, "reason": "ServiceUnavailable"}
        return real(self, req)

    with mock.patch.object(FakeKubeAPI, "dispatch", flaky):
        result = deploy_op(poll_interval=0).execute(ctx())
    assert result["smoke_reply"] == kube.chat_reply


# -- API key, manifests(), blue-green, runtime LoRA, KServe ------------------------------------------


def test_api_key_reaches_vllm_from_the_secret_and_the_smoke_test_sends_it(kube):
    import base64

    from tests.provider.fake_kube_api import FakeOpenAI

    kube.objects[("api/v1", NS, "secrets", "vllm-key")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "vllm-key"},
        "data": {"api-key": base64.b64encode(b"sk-test-key").decode()},
    }
    server = FakeOpenAI(api_key="sk-test-key")
    try:
        op = deploy_op(
            api_key_secret={"name": "vllm-key", "key": "api-key"},
            smoke_url=server.url,
            ingress={"host": "chat.example.com"},
            network_policy=True,
        )
        result = op.execute(ctx())
    finally:
        server.stop()
    name = result["deployment"].split("/")[1]
    vllm = kube.get("deployments", NS, name)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "vllm-key", "key": "api-key"}}
    assert "sk-test-key" not in json.dumps(kube.objects[("apis/apps/v1", NS, "deployments", name)])
    assert not any("api" in a and "key" in a for a in vllm["args"])
    [req] = server.requests
    assert (
        req["headers"]["Authorization"] == "Bearer sk-test-key" and result["smoke_reply"] == kube.chat_reply
    )
    assert kube.proxied == []  # the API server's proxy would drop the Authorization header
    assert kube.get("networkpolicies", NS, name)["spec"]["ingress"][0]["ports"] == [
        {"protocol": "TCP", "port": 8000}
    ]
    assert result["external_endpoint"] == "http://chat.example.com/v1"


def test_an_open_route_is_refused_and_settings_are_checked_before_any_call(kube):
    with pytest.raises(FinetuneConfigError, match="without api_key_secret would publish the model"):
        deploy_op(http_route={"gateway": "public"}).execute(ctx())
    bad = [
        ({"engine_args": {"--api-key": "x"}}, r"engine_args \['--api-key'\] are set by the builder"),
        ({"gpus": 2, "tensor_parallel_size": 4}, "tensor_parallel_size 4 > gpus 2"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization 1.5: a fraction in \(0, 1\]"),
        ({"memory": "lots"}, "memory 'lots' is not a Kubernetes quantity"),
        ({"model_volume_size": "-1Gi"}, "model_volume_size '-1Gi' is not a Kubernetes quantity"),
        ({"max_model_len": "abc"}, "max_model_len 'abc' is not an integer"),
        ({"rollout": "canary"}, "rollout 'canary': use one of"),
        ({"api_key_secret": "just-a-name"}, "give the Secret's name and key"),
        ({"min_replicas": 0}, "min_replicas .* needs platform='kserve'"),
        ({"tolerations": {"key": "gpu"}}, "tolerations: a list of mappings"),
        ({"vllm_image": "bad image"}, "vllm_image 'bad image' is not a valid image reference"),
    ]
    for kw, match in bad:
        with pytest.raises(FinetuneConfigError, match=match):
            deploy_op(**kw).execute(ctx())
    assert kube.requests == []


def test_settings_reach_the_manifests_and_templated_fields():
    op = deploy_op(
        gpus=4,
        tensor_parallel_size=2,
        memory="96Gi",
        model_volume_size="300Gi",
        replicas=2,
        node_selector={"gpu": "h100"},
        tolerations=[{"key": "dedicated", "operator": "Exists"}],
        supplemental_groups=[44, 110],
        vllm_image="registry.example/vllm:1",
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        engine_args={"max-num-seqs": 64},
    )
    assert {"engine_args", "max_model_len", "namespace", "tensor_parallel_size"} <= set(op.template_fields)
    dep = op.manifests()[0]
    pod = dep["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    args = vllm["args"]
    assert (
        args[args.index("--tensor-parallel-size") + 1] == "2"
        and vllm["resources"]["limits"]["nvidia.com/gpu"] == "4"
    )
    assert (
        args[args.index("--max-model-len") + 1] == "8192" and args[args.index("--max-num-seqs") + 1] == "64"
    )
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.85"
    assert vllm["resources"]["limits"]["memory"] == "96Gi" and vllm["image"] == "registry.example/vllm:1"
    assert next(v for v in pod["volumes"] if v["name"] == "models")["emptyDir"]["sizeLimit"] == "300Gi"
    assert dep["spec"]["replicas"] == 2 and pod["nodeSelector"] == {"gpu": "h100"}
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    assert pod["securityContext"]["supplementalGroups"] == [44, 110]
    assert dep["spec"]["progressDeadlineSeconds"] == op.effective_ready_timeout()  # one deadline


def test_blue_green_switches_the_service_after_the_new_revision_is_ready(kube):
    first = deploy_op(rollout="blue-green").execute(ctx())
    old = first["deployment"].split("/")[1]
    svc_name = next(n for (_, _, p, n) in kube.objects if p == "services")
    second_op = deploy_op(rollout="blue-green", model_uri="s3://finetune/e/r2/checkpoint-final")
    new = second_op.manifests()[0]["metadata"]["name"]
    assert new != old
    selector_seen = []
    real = FakeKubeAPI.dispatch

    def watch(self, req):  # the Service selector while the new revision is polled
        if req["path"].endswith(f"/deployments/{new}/status"):
            selector_seen.append(dict(self.get("services", NS, svc_name)["spec"]["selector"]))
        return real(self, req)

    kube.status_reads = 0
    with mock.patch.object(FakeKubeAPI, "dispatch", watch):
        second = second_op.execute(ctx())
    revision = "finetune.airflow.apache.org/revision"
    old_rev = first and kube_rev(old)
    assert selector_seen and all(s[revision] == old_rev for s in selector_seen)  # old line serves meanwhile
    assert kube.get("services", NS, svc_name)["spec"]["selector"][revision] != old_rev
    assert kube.get("deployments", NS, old) is None and kube.get("deployments", NS, new) is not None
    assert second["deployment"] == f"{NS}/{new}"


def kube_rev(deployment_name: str) -> str:
    return deployment_name.split("-")[-2]


def test_load_lora_adapter_into_a_running_server():
    from airflow_provider_finetune.operators.deploy import load_lora_adapter
    from tests.provider.fake_kube_api import FakeOpenAI

    server = FakeOpenAI(api_key="k")
    try:
        with pytest.raises(PermissionError, match="401"):
            from airflow_provider_finetune.runners.vllm_local import chat_once

            chat_once(server.url, "tiny", "hi")
        assert "added successfully" in load_lora_adapter(
            server.url, "r16", "/models/adapters/r16", api_key="k"
        )
        with pytest.raises(RuntimeError, match="loading LoRA adapter 'r8'.*401"):
            load_lora_adapter(server.url, "r8", "/x", api_key="wrong")
    finally:
        server.stop()
    assert server.adapters == {"r16": "/models/adapters/r16"}
    assert server.requests[1]["body"] == {"lora_name": "r16", "lora_path": "/models/adapters/r16"}


def test_kserve_lifecycle_created_ready_scaled_to_zero(kube):
    from airflow_provider_finetune.compat import TaskDeferred
    from tests.provider.fake_kube_api import FakeOpenAI

    op = deploy_op(
        platform="kserve",
        min_replicas=0,
        kserve_service_account="kserve-s3",
        deferrable=True,
        poll_interval=0,
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx())
    kwargs = deferred.value.trigger.serialize()[1]
    assert kwargs["kind"] == "InferenceService"
    name = kwargs["name"]
    isvc = kube.get("inferenceservices", NS, name)
    assert isvc["spec"]["predictor"]["minReplicas"] == 0
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    # the model failed to load: the reason, at once
    isvc["status"] = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "False"}],
        "modelStatus": {
            "transitionStatus": "BlockedByFailedLoad",
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no config.json"},
        },
    }
    failed = _run_trigger(DeploymentReadyTrigger(**{**kwargs, "deadline": time.time() + 60}))
    assert failed["status"] == "failed" and "ModelLoadFailed: no config.json" in failed["message"]
    # Ready, then scaled to zero (no pods): still Ready; the first request wakes it
    isvc["status"] = {
        "observedGeneration": 1,
        "url": "https://tiny.finetune.example.com",
        "address": {"url": "http://tiny-predictor.finetune.svc.cluster.local"},
        "conditions": [{"type": "Ready", "status": "True"}],
        "components": {"predictor": {"replicas": 0}},
    }
    ready = _run_trigger(DeploymentReadyTrigger(**kwargs))
    assert ready["status"] == "ready"
    server = FakeOpenAI(api_key=None)
    try:
        op.smoke_url = server.url
        context = ctx()
        result = op.execute_complete(context, ready)
    finally:
        server.stop()
    assert result["endpoint"] == "http://tiny-predictor.finetune.svc.cluster.local/v1"
    assert result["external_endpoint"] == "https://tiny.finetune.example.com/v1"
    context["ti"].xcom_push.assert_called_with(
        key="_link_ServedEndpointLink", value=result["external_endpoint"]
    )
    assert _cluster_undeploy().execute(ctx()) is True
    assert kube.get("inferenceservices", NS, name) is None
