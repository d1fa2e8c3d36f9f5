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
    result = deploy_op(ingress=ingress, http_route=route).execute(ctx())
    name = result["deployment"].split("/")[1]
    assert result["ingress_endpoint"] == "https://chat.example.com/v1"
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
    deploy_op(ingress={**ingress, "host": "chat2.example.com"}, http_route=route).execute(ctx())
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
    op = deploy_op(ingress={"host": "chat.example.com"}, http_route={"gateway": "public"})
    spec = op.serve_spec()
    created = [build_vllm_deployment(spec), build_vllm_service(spec), *op.route_manifests(spec)]
    assert [(d["kind"], d["apiVersion"]) for d in created] == [
        (t.kind, t.api_version) for t in SERVED_OBJECTS
    ]


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


def _run_trigger(trigger: DeploymentReadyTrigger) -> dict:
    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first(), 60))


def test_defers_then_trigger_fires_then_smoke_test(kube):
    from airflow.sdk.exceptions import TaskDeferred

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
    result = deploy_op(ingress={"host": "chat.example.com"}, http_route={"gateway": "public"}).execute(ctx())
    name = result["deployment"].split("/")[1]
    assert len(kube.objects) == 4
    kube.requests.clear()
    undeploy = UndeployVLLMOperator(
        task_id="undeploy",
        served_model_name="tiny",
        namespace=NS,
        kubernetes_conn_id="fake_kube",
        runner="kubernetes",
    )
    assert undeploy.execute(ctx()) is True
    assert kube.objects == {}
    calls = kube.calls()
    deletes = [path for method, path in calls if method == "DELETE"]
    # each object was read (its owner label checked) before the first deletion
    assert calls[: len(deletes)] == [("GET", path) for path in deletes]
    assert calls[len(deletes) :] == [
        ("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
        ("DELETE", f"/api/v1/namespaces/{NS}/services/{name}"),
        ("DELETE", f"/apis/networking.k8s.io/v1/namespaces/{NS}/ingresses/{name}"),
        ("DELETE", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/{name}"),
    ]
    assert undeploy.execute(ctx()) is False  # nothing left: 404s are fine


def test_undeploy_without_route_rights_still_removes_the_server(kube):
    deploy_op().execute(ctx())
    real = FakeKubeAPI.dispatch

    def forbid_routes(self, req):
        if "/ingresses/" in req["path"] or "/httproutes/" in req["path"]:
            return 403, {"kind": "Status", "code": 403, "reason": "Forbidden"}
        return real(self, req)

    with mock.patch.object(FakeKubeAPI, "dispatch", forbid_routes):
        assert (
            UndeployVLLMOperator(
                task_id="u",
                served_model_name="tiny",
                namespace=NS,
                kubernetes_conn_id="fake_kube",
                runner="kubernetes",
            ).execute(ctx())
            is True
        )
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
    undeploy = UndeployVLLMOperator(
        task_id="u",
        served_model_name="tiny",
        namespace=NS,
        kubernetes_conn_id="fake_kube",
        runner="kubernetes",
    )
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
