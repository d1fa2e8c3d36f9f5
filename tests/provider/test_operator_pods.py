"""The pod EACH engine operator really builds — through KubernetesPodOperator's own
``build_pod_request_obj`` (labels, XCom sidecar, pod name), not just our builder: golden files,
the official schemas (strict) for Kubernetes 1.29-1.37, restricted PSS, and the KPO defaults every
engine operator sets (scheduling budget for GPU autoscalers, events on failure, cleanup)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from unittest import mock

import kubernetes_validate
import pytest
from kubernetes.client import models as k8s

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    EvaluateModelsOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
    QuantizeModelOperator,
)
from airflow_provider_finetune.pods.pod import to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.settings import default
from tests.provider.conftest import K8S_VERSIONS, assert_golden
from tests.provider.test_operators import CONFIG

RUN_ID = "manual__2026-11-24T10:00:00+00:00"
OPERATORS = {
    "hf-model": lambda: HFModelToBucketOperator(
        task_id="deliver_model", model_id="org/model", revision="v1", exclude_patterns=["original/*"]
    ),
    "data-script": lambda: DataScriptToBucketOperator(
        task_id="deliver_data", script="print('data')", method="sft"
    ),
    "finetune": lambda: FinetuneKubernetesOperator(
        task_id="sweep",
        config=CONFIG,
        lora_rank=8,
        gpus=1,
        node_selector={"nvidia.com/gpu.product": "H100"},
        active_deadline_seconds=86400,
    ),
    "finetune-fsdp-4gpu": lambda: FinetuneKubernetesOperator(
        task_id="full",
        config=CONFIG,
        gpus=4,
        gpu_vendor="amd",
        distributed_strategy="fsdp",
        scratch_storage_class="fast-nvme",
        scratch_size="500Gi",
    ),
    "merge": lambda: MergeAdapterOperator(
        task_id="merge",
        base="s3://finetune/models/org/tiny",
        adapter="s3://finetune/experiments/e/r8/checkpoint-final-adapter",
    ),
    "evaluate": lambda: EvaluateModelsOperator(
        task_id="evaluate",
        models=["s3://finetune/m/champion", "s3://finetune/m/challenger"],
        datasets="s3://finetune/datasets/heldout.jsonl",
    ),
    "quantize": lambda: QuantizeModelOperator(
        task_id="quantize",
        model="s3://finetune/champions-models/line/checkpoint-final-merged",
        calibration_data="s3://finetune/datasets/retrain/train.jsonl",
        scheme="w4a16",
        samples=64,
        iters=100,
    ),
}
ENGINE_OPERATORS = [
    HFModelToBucketOperator,
    DataScriptToBucketOperator,
    FinetuneKubernetesOperator,
    MergeAdapterOperator,
    EvaluateModelsOperator,
    QuantizeModelOperator,
]


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    """The provider defaults, whatever the calling environment says."""
    import os

    for key in list(os.environ):
        if key.startswith("AIRFLOW__FINETUNE__"):
            monkeypatch.delenv(key)


def context(op, map_index: int = -1) -> dict:
    ti = SimpleNamespace(
        dag_id="tutorial",
        task_id=op.task_id,
        map_index=map_index,
        try_number=1,
        run_id=RUN_ID,
        xcom_push=mock.Mock(),
    )
    return {"ti": ti, "run_id": RUN_ID, "dag": SimpleNamespace(dag_id="tutorial")}


def built_pod(name: str) -> dict:
    op = OPERATORS[name]()
    ctx = context(op, map_index=3 if name == "finetune" else -1)
    op.validate(ctx)
    pod = to_dict(op.build_pod_request_obj(ctx, dry_run=True))
    return pod


def normalized(pod: dict) -> dict:
    """Stable across runs and the Airflow and cncf-kubernetes releases the provider supports: the random
    pod-name suffix, the version label, and the XCom sidecar's image (the cncf provider's default,
    which its releases move; checked to be exactly that default)."""
    from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults

    doc = copy.deepcopy(pod)
    doc["metadata"]["name"] = re.sub(r"-[a-z0-9]{8}$", "-RANDOM", doc["metadata"]["name"])
    doc["metadata"]["labels"]["airflow_version"] = "AIRFLOW_VERSION"
    for container in doc["spec"]["containers"]:
        if container["name"] == PodDefaults.SIDECAR_CONTAINER_NAME:
            assert container["image"] == PodDefaults.SIDECAR_CONTAINER.image
            container["image"] = "CNCF_KUBERNETES_XCOM_SIDECAR_IMAGE"
    return doc


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_golden_operator_pods(name):
    assert_golden(f"op-pod-{name}", normalized(built_pod(name)))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_pods_validate_against_official_schemas(name, version):
    kubernetes_validate.validate(built_pod(name), version, strict=True)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_pods_are_restricted_and_identified(name):
    pod = built_pod(name)
    assert restricted_violations(pod) == []  # the XCom sidecar too
    assert [c["name"] for c in pod["spec"]["containers"]] == ["base", "airflow-xcom-sidecar"]
    labels = pod["metadata"]["labels"]
    assert (
        labels["dag_id"] == "tutorial"
        and labels["kubernetes_pod_operator"] == "True"
        and labels["try_number"] == "1"
    )
    assert (labels.get("map_index") == "3") == (name == "finetune")
    assert pod["metadata"]["name"].startswith(OPERATORS[name]().task_id.replace("_", "-"))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "finetune-bucket",
        "key": "AWS_SECRET_ACCESS_KEY",
    }


def test_the_same_task_builds_the_same_pod_but_for_the_name():
    a, b = built_pod("finetune"), built_pod("finetune")
    assert normalized(a) == normalized(b)
    assert (
        a["metadata"]["name"] != b["metadata"]["name"]
    )  # a unique suffix per attempt; reattach finds pods by labels


def _minimal(cls, **kw):
    args = {
        HFModelToBucketOperator: {"model_id": "org/m"},
        DataScriptToBucketOperator: {"script": "print(1)"},
        FinetuneKubernetesOperator: {"config": CONFIG},
        MergeAdapterOperator: {"base": "s3://bkt/m", "adapter": "s3://bkt/a"},
        EvaluateModelsOperator: {"models": ["s3://bkt/m"], "datasets": ["s3://bkt/d.jsonl"]},
        QuantizeModelOperator: {"model": "s3://bkt/m"},
    }[cls]
    return cls(task_id="t", **args, **kw)


@pytest.mark.parametrize("cls", ENGINE_OPERATORS, ids=lambda c: c.__name__)
def test_every_engine_operator_sets_the_kpo_defaults(cls):
    op = _minimal(cls)
    gpu = int(op.gpus or 0) > 0
    assert op.schedule_timeout_seconds == (1800 if gpu else 600)  # GPU nodes may come from an autoscaler
    assert op.startup_timeout_seconds == (1800 if gpu else 600)
    assert op.log_events_on_failure is True
    assert op.on_finish_action.value == "delete_succeeded_pod"  # failed pods stay for inspection
    assert op.do_xcom_push is True and op.get_logs is True
    assert op.xcom_sidecar_container_security_context["runAsNonRoot"] is True
    # with GPUs the budget is the long one, whatever the operator's own default
    assert _minimal(cls, gpus=2).schedule_timeout_seconds == 1800
    # and every default yields to the caller
    custom = _minimal(
        cls, schedule_timeout_seconds=42, log_events_on_failure=False, startup_timeout_seconds=7
    )
    assert (
        custom.schedule_timeout_seconds,
        custom.log_events_on_failure,
        custom.startup_timeout_seconds,
    ) == (42, False, 7)


# -- the locked-down pod cannot be replaced ------------------------------------------------------

REPLACING_ARGS = {
    "cmds": ["sh", "-c", "env"],
    "arguments": ["--help"],
    "container_security_context": {"privileged": True},
    "security_context": {"runAsUser": 0},
    "volumes": [k8s.V1Volume(name="host", host_path=k8s.V1HostPathVolumeSource(path="/"))],
    "volume_mounts": [k8s.V1VolumeMount(name="host", mount_path="/host")],
    "hostnetwork": True,
    "env_vars": {"HF_TOKEN": "hf_" + "x" * 30},
    "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="all-keys"))],
    "secrets": ["any"],
    "pod_template_file": "/tmp/pod.yaml",
    "pod_template_dict": {"spec": {"hostPID": True}},
    "full_pod_spec": k8s.V1Pod(spec=k8s.V1PodSpec(host_ipc=True, containers=[])),
    "init_containers": [k8s.V1Container(name="root", image="busybox")],
    "container_resources": k8s.V1ResourceRequirements(limits={"cpu": "1"}),
    "automount_service_account_token": True,
    "xcom_sidecar_container_security_context": {"privileged": True},
}


@pytest.mark.parametrize("arg", sorted(REPLACING_ARGS))
@pytest.mark.parametrize("cls", ENGINE_OPERATORS, ids=lambda c: c.__name__)
def test_kpo_arguments_that_replace_the_locked_down_pod_are_refused(cls, arg):
    with pytest.raises(
        FinetuneConfigError, match=rf"{cls.__name__}: {arg} cannot be set on an engine operator"
    ):
        _minimal(cls, **{arg: REPLACING_ARGS[arg]})


def test_refused_arguments_are_refused_in_partial_too_and_default_like_values_pass():
    with pytest.raises(FinetuneConfigError, match="cmds, env_vars cannot be set"):
        FinetuneKubernetesOperator.partial(
            task_id="sweep", config=CONFIG, cmds=["sh"], env_vars={"A": "1"}
        ).expand(lora_rank=[4, 8])
    op = _minimal(
        FinetuneKubernetesOperator, hostnetwork=False, env_vars=None, automount_service_account_token=False
    )
    assert op.hostnetwork is False


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda op: setattr(op, "hostnetwork", True), "spec: hostNetwork"),
        (lambda op: setattr(op, "cmds", ["sh", "-c", "env"]), "the engine command was replaced"),
        (lambda op: setattr(op, "arguments", ["--x"]), "the engine command was replaced"),
        (
            lambda op: setattr(op, "container_security_context", {"privileged": True}),
            "container 'base': privileged",
        ),
        (lambda op: setattr(op, "security_context", {"runAsUser": 0}), "pod runAsUser 0"),
        (
            lambda op: setattr(op, "env_vars", [k8s.V1EnvVar(name="HF_TOKEN", value="hf_" + "x" * 30)]),
            "env HF_TOKEN looks like a credential",
        ),
        (
            lambda op: setattr(
                op, "volumes", [k8s.V1Volume(name="h", host_path=k8s.V1HostPathVolumeSource(path="/"))]
            ),
            r"volume 'h': type \['hostPath'\] not allowed",
        ),
        (
            lambda op: setattr(
                op, "volumes", [k8s.V1Volume(name="s", secret=k8s.V1SecretVolumeSource(secret_name="keys"))]
            ),
            "volume 's': mounts a Secret",
        ),
        (lambda op: setattr(op, "automount_service_account_token", True), "automountServiceAccountToken"),
        (
            lambda op: setattr(op, "annotations", {"note": "sk-" + "a" * 20}),
            "looks like a token or key",
        ),
    ],
)
def test_the_final_pod_is_checked_after_kpo_merges_its_arguments(change, match):
    """Attributes changed after construction (or by templates) reach KPO's merge; the pod it would send
    is checked last, and refused before anything is created."""
    op = OPERATORS["finetune"]()
    ctx = context(op, map_index=3)
    op.validate(ctx)
    change(op)
    with pytest.raises(FinetuneConfigError, match=match) as err:
        op.build_pod_request_obj(ctx, dry_run=True)
    assert "is not sent" in str(err.value) and "hf_xxxx" not in str(err.value)


def test_a_refused_pod_is_never_created():
    op = OPERATORS["hf-model"]()
    op.hostnetwork = True
    with (
        mock.patch("airflow_provider_finetune.operators.base.settings.runner", return_value="kubernetes"),
        mock.patch("airflow.providers.cncf.kubernetes.utils.pod_manager.PodManager.create_pod") as create,
        mock.patch(
            "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.find_pod",
            return_value=None,
        ),
        mock.patch(
            "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.client",
            new_callable=mock.PropertyMock,
        ),
        mock.patch(
            "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.hook",
            new_callable=mock.PropertyMock,
        ),
    ):
        with pytest.raises(FinetuneConfigError, match="hostNetwork"):
            op.execute(context(op))
    create.assert_not_called()


# -- defaults: no spec in failure logs, deadlines, Hub access, namespace --------------------------


@pytest.mark.parametrize("cls", ENGINE_OPERATORS, ids=lambda c: c.__name__)
def test_a_failed_pod_does_not_dump_its_spec_and_every_pod_has_a_deadline(cls, monkeypatch):
    op = _minimal(cls)
    assert op.log_pod_spec_on_failure is False  # the parent's default would log the env of a failed pod
    assert op.active_deadline_seconds == int(default("active_deadline_seconds")) > 0
    assert _minimal(cls, log_pod_spec_on_failure=True).log_pod_spec_on_failure is True  # explicit opt-in
    assert _minimal(cls, active_deadline_seconds=60).active_deadline_seconds == 60
    monkeypatch.setenv("AIRFLOW__FINETUNE__ACTIVE_DEADLINE_SECONDS", "3600")
    assert _minimal(cls).active_deadline_seconds == 3600
    monkeypatch.setenv("AIRFLOW__FINETUNE__ACTIVE_DEADLINE_SECONDS", "0")
    assert _minimal(cls).active_deadline_seconds is None  # 0: no deadline
    monkeypatch.setenv("AIRFLOW__FINETUNE__ACTIVE_DEADLINE_SECONDS", "two days")
    with pytest.raises(FinetuneConfigError, match=r"\[finetune\] active_deadline_seconds 'two days'"):
        _minimal(cls)


def test_the_default_deadline_reaches_the_pod_and_the_local_runner():
    pod = built_pod("hf-model")
    assert pod["spec"]["activeDeadlineSeconds"] == int(default("active_deadline_seconds"))
    op = OPERATORS["merge"]()
    runner = mock.Mock()
    runner.run.return_value = SimpleNamespace(xcom={"ok": 1})
    with (
        mock.patch("airflow_provider_finetune.runners.local.LocalRunner", return_value=runner),
        mock.patch.dict("os.environ", {"AIRFLOW__FINETUNE__BUCKET_ENDPOINT_URL": "http://s3:9000"}),
    ):
        op.runner = "local"
        assert op.execute(context(op)) == {"ok": 1}
    assert runner.run.call_args.kwargs["timeout"] == int(default("active_deadline_seconds"))


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_only_the_delivery_pods_may_reach_the_hub(name):
    env = {e["name"]: e.get("value") for e in built_pod(name)["spec"]["containers"][0]["env"]}
    offline = name in ("finetune", "finetune-fsdp-4gpu", "merge", "evaluate", "quantize")
    assert (env.get("HF_HUB_OFFLINE") == "1") is offline


def test_pods_run_in_the_dedicated_namespace_by_default():
    assert default("namespace") == "finetune"
    assert {built_pod(name)["metadata"]["namespace"] for name in OPERATORS} == {"finetune"}


def test_mlflow_credentials_are_optional_secret_refs_and_the_uri_never_holds_them(monkeypatch):
    monkeypatch.setenv("AIRFLOW__FINETUNE__MLFLOW_SECRET_NAME", "mlflow-credentials")
    monkeypatch.setenv("AIRFLOW__FINETUNE__MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")
    for name in OPERATORS:
        env = {e["name"]: e for e in built_pod(name)["spec"]["containers"][0]["env"]}
        for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {
                "name": "mlflow-credentials",
                "key": key,
                "optional": True,
            }, (name, key)
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow.svc:5000"
    monkeypatch.delenv("AIRFLOW__FINETUNE__MLFLOW_SECRET_NAME")
    env = {e["name"] for e in built_pod("finetune")["spec"]["containers"][0]["env"]}
    assert not {n for n in env if n.startswith("MLFLOW_TRACKING_") and n != "MLFLOW_TRACKING_URI"}
    # a URI with a password is refused before any pod, pointing at the Secret option
    monkeypatch.setenv("AIRFLOW__FINETUNE__MLFLOW_TRACKING_URI", "https://bob:hunter2@mlflow.example.com")
    op = OPERATORS["finetune"]()
    with pytest.raises(FinetuneConfigError, match="mlflow_secret_name") as err:
        op.validate(context(op))
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("option", ["bucket_secret_name", "mlflow_secret_name"])
def test_secret_names_from_the_options_are_checked_before_any_pod(option, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW__FINETUNE__{option.upper()}", "Bucket_Keys")
    op = OPERATORS["merge"]()
    with pytest.raises(FinetuneConfigError, match=rf"\[finetune\] {option} 'Bucket_Keys' is not a valid"):
        op.validate(context(op))


@pytest.mark.parametrize("train_gpus,eval_gpus,want", [("2", None, "1"), ("0", None, None), ("2", 0, None)])
def test_evaluation_takes_the_trainings_accelerator_unless_told(train_gpus, eval_gpus, want):
    """gpus=None: one GPU of the training task's vendor, on its nodes; the CPU when training used none,
    or when the evaluation says gpus=0."""
    from airflow.sdk import DAG

    with DAG("retrain_eval", schedule=None, params={"gpus": train_gpus}):
        train = FinetuneKubernetesOperator(
            task_id="challenger",
            config=CONFIG,
            gpus="{{ params.gpus }}",
            gpu_vendor="amd",
            node_selector={"gpu": "mi300"},
        )
        kw = {} if eval_gpus is None else {"gpus": eval_gpus}
        evaluate = EvaluateModelsOperator(
            task_id="evaluate", models=["s3://bkt/m"], datasets=["s3://bkt/d.jsonl"], **kw
        )
        train >> evaluate
    ctx = {**context(evaluate), "params": {"gpus": train_gpus}}
    evaluate.validate(ctx)
    spec = to_dict(evaluate.build_pod_request_obj(ctx, dry_run=True))["spec"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert limits.get("amd.com/gpu") == want and "nvidia.com/gpu" not in limits
    assert (spec.get("nodeSelector") == {"gpu": "mi300"}) == (want is not None)
