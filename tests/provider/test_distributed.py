"""Multi-node manifests: TrainJob and PyTorchJob against the Kubeflow CRD schemas, golden, restricted."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from types import SimpleNamespace
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.exceptions import EngineJobFailed, FinetuneConfigError
from airflow_provider_finetune.pods.distributed import (
    TRAINER_CONTAINER,
    build_pytorchjob,
    build_trainjob,
    torchrun_command,
)
from airflow_provider_finetune.pods.pod import build_pod, pod_to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from airflow_provider_finetune.pods.spec import EngineJobSpec, Scratch, SecretEnv, label_value, labels_for
from airflow_provider_finetune.triggers.job import JOB_LABEL, TrainingJobTrigger, first_event, job_state
from tests.provider.conftest import CANARY, CRDS, K8S_VERSIONS, assert_golden, containers, crd_schema

SPEC = EngineJobSpec(
    name="tutorial-full-ft",
    image="registry.example/finetune-engine-cuda:0.1.0",
    command=torchrun_command(
        ["train-job", "--method", "sft", "--checkpoint-uri", "s3://finetune/experiments/t/full"]
    ),
    env={"FINETUNE_CONFIG": "run_conf: {}\n", "NCCL_DEBUG": "WARN"},
    secret_env=[
        SecretEnv("AWS_ACCESS_KEY_ID", "finetune-bucket", "AWS_ACCESS_KEY_ID"),
        SecretEnv("AWS_SECRET_ACCESS_KEY", "finetune-bucket", "AWS_SECRET_ACCESS_KEY"),
        SecretEnv("HF_TOKEN", "hf-token", "HF_TOKEN", optional=True),
    ],
    gpus=8,
    scratch=Scratch(kind="ephemeral", size="1Ti", storage_class="fast-nvme"),
    node_selector={"nvidia.com/gpu.product": "H100"},
    active_deadline_seconds=172800,
    labels=labels_for("retrain", "finetune", "scheduled__2026-11-01T00:00:00+00:00", None, 1),
    namespace="finetune",
)
AMD = EngineJobSpec(
    **{**SPEC.__dict__, "gpu_vendor": "amd", "image": "registry.example/finetune-engine-rocm:0.1.0"}
)


def _trainjob_pod(doc: dict) -> dict:
    job = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    return job["template"]["spec"]["template"]


def test_trainjob_golden_and_crd():
    doc = build_trainjob(SPEC, num_nodes=4, procs_per_node=8)
    assert_golden("trainjob-4x8-nvidia", doc)
    jsonschema.validate(doc, crd_schema("trainer.kubeflow.org_trainjobs.yaml"))
    trainer = doc["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["command"][0] == "torchrun"
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert doc["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert doc["spec"]["activeDeadlineSeconds"] == 172800
    pod = _trainjob_pod(doc)
    assert pod["metadata"]["labels"]["airflow-provider-finetune/dag-id"] == "retrain"
    assert pod["spec"]["containers"][0]["name"] == "node"  # the runtime's container
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]


def test_trainjob_targets_the_runtime_job_and_container():
    crd_schema("trainer.kubeflow.org_trainjobs.yaml")  # skips when shared/ is absent
    runtime = yaml.safe_load((CRDS / "runtime-torch_distributed.yaml").read_text())
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert runtime["metadata"]["name"] == "torch-distributed" and job["name"] == TRAINER_CONTAINER
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == TRAINER_CONTAINER


def test_trainjob_pod_patch_is_restricted_and_schema_rejects_typos():
    doc = build_trainjob(AMD, num_nodes=2, procs_per_node=8)
    assert restricted_violations(doc) == []
    assert "amd.com/gpu" in doc["spec"]["trainer"]["resourcesPerNode"]["limits"]
    schema = crd_schema("trainer.kubeflow.org_trainjobs.yaml")
    jsonschema.validate(doc, schema)
    bad = copy.deepcopy(doc)
    bad["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(doc)
    _trainjob_pod(bad)["spec"]["hostNetwork"] = True  # not a patchable field, and not restricted
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("elastic", [None, {"maxRestarts": 5}, {"minReplicas": 2, "maxReplicas": 4}])
def test_pytorchjob_crd_and_restricted(elastic):
    doc = build_pytorchjob(AMD, num_nodes=3, procs_per_node=8, elastic=elastic)
    jsonschema.validate(doc, crd_schema("kubeflow.org_pytorchjobs.yaml"))
    assert restricted_violations(doc) == []
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert doc["spec"]["nprocPerNode"] == "8"
    for r in replicas.values():
        pod = r["template"]["spec"]
        # static ranks cannot rejoin a running gang: exit codes decide; elastic workers rejoin
        assert pod["containers"][0]["name"] == "pytorch"
        assert r["restartPolicy"] == ("ExitCode" if elastic is None else "OnFailure")
        assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "8"
        assert "restartPolicy" not in pod and "activeDeadlineSeconds" not in pod
    assert doc["spec"]["runPolicy"]["activeDeadlineSeconds"] == 172800
    assert doc["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 86400
    if elastic is None:
        assert (
            replicas["Master"]["replicas"] == 1
            and replicas["Worker"]["replicas"] == 2
            and "elasticPolicy" not in doc["spec"]
        )
    else:
        assert set(replicas) == {"Worker"} and replicas["Worker"]["replicas"] == 3
        policy = doc["spec"]["elasticPolicy"]
        assert policy["rdzvBackend"] == "c10d" and policy == {
            "rdzvBackend": "c10d",
            "minReplicas": 3,
            "maxReplicas": 3,
            "maxRestarts": 3,
            **elastic,
        }


def test_pytorchjob_golden():
    assert_golden("pytorchjob-2x8-nvidia", build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8))
    assert_golden(
        "pytorchjob-elastic-nvidia",
        build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8, elastic={"minReplicas": 1, "maxReplicas": 4}),
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_replica_pod_templates_are_valid_pods(version):
    """Each replica's template, wrapped as a Pod, passes the official schema (strict)."""
    doc = build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8)
    for name, r in doc["spec"]["pytorchReplicaSpecs"].items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"x-{name.lower()}", **r["template"]["metadata"]},
            "spec": {**r["template"]["spec"], "restartPolicy": r["restartPolicy"]},
        }
        kubernetes_validate.validate(pod, version, strict=True)


def test_same_pod_settings_as_the_single_pod():
    single = pod_to_dict(build_pod(SPEC))["spec"]
    job = build_pytorchjob(SPEC, num_nodes=2, procs_per_node=8)["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"
    ]["spec"]
    for key in ("securityContext", "volumes", "tolerations", "nodeSelector", "automountServiceAccountToken"):
        assert job[key] == single[key], key
    a, b = single["containers"][0], job["containers"][0]
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    trainer = build_trainjob(SPEC, num_nodes=2, procs_per_node=8)
    assert trainer["spec"]["trainer"]["env"] == a["env"]


def test_secrets_are_references_in_job_manifests():
    for doc in (build_trainjob(SPEC, 2, 8), build_pytorchjob(SPEC, 2, 8), build_pytorchjob(SPEC, 2, 8, {})):
        assert CANARY not in yaml.safe_dump(doc)
        for c in containers(doc):
            env = {e["name"]: e for e in c.get("env") or []}
            if "AWS_SECRET_ACCESS_KEY" in env:
                assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "finetune-bucket"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_nodes \\(0\\)"):
        build_trainjob(SPEC, 0, 8)
    with pytest.raises(ValueError, match="procs_per_node 16 exceeds the 8 GPUs"):
        build_pytorchjob(SPEC, 2, 16)
    single = EngineJobSpec(**{**SPEC.__dict__, "command": ["finetune-engine", "train-job"]})
    with pytest.raises(ValueError, match="must start with torchrun"):
        build_trainjob(single, 2, 8)
    with pytest.raises(ValueError, match="minReplicas <= maxReplicas"):
        build_pytorchjob(SPEC, 2, 8, {"minReplicas": 4, "maxReplicas": 2})


def test_missing_crd_schemas_skip_here_but_fail_in_ci(monkeypatch, tmp_path):
    import tests.provider.conftest as helpers

    monkeypatch.setattr(helpers, "CRDS", tmp_path)
    for value in (None, "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(
            pytest.skip.Exception, match=r"kubeflow.org_pytorchjobs.yaml not found .*FINETUNE_CRDS_DIR"
        ):
            helpers.crd_schema("kubeflow.org_pytorchjobs.yaml")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="a missing schema fails there"):
            helpers.crd_schema("kubeflow.org_pytorchjobs.yaml")


# -- the operator's multi-node path over the wire: the real kubernetes / kubernetes_asyncio clients
# against tests/provider/fake_kube_api.py (the test plays the Kubeflow controller and the kubelet) --

NS = "finetune"
MN_CONFIG = {
    "data_conf": {
        "training_data": {
            "type": "CONCATENATION",
            "datasets": [{"path": "s3://finetune/datasets/chat.jsonl"}],
        }
    },
    "batchsize_conf": {"total_train_batch_size": 32},
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
    "run_conf": {"model": "s3://finetune/models/org/tiny"},
}
CRD_FILES = {"trainjob": "trainer.kubeflow.org_trainjobs.yaml", "pytorchjob": "kubeflow.org_pytorchjobs.yaml"}
PLURALS = {"trainjob": "trainjobs", "pytorchjob": "pytorchjobs"}
GROUPS = {"trainjob": "apis/trainer.kubeflow.org/v1alpha1", "pytorchjob": "apis/kubeflow.org/v1"}
DONE = {"trainjob": "Complete", "pytorchjob": "Succeeded"}


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    from tests.provider.fake_kube_api import FakeKubeAPI

    api = FakeKubeAPI().start()
    config = api.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAKE_KUBE",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(config)}}),
    )
    yield api
    api.stop()


def mn_ctx(run_id="manual__2026-12-01T00:00:00+00:00", map_index=-1):
    ti = SimpleNamespace(dag_id="retrain", task_id="finetune", map_index=map_index, try_number=1)
    ti.xcom_push = mock.Mock()
    return {"ti": ti, "run_id": run_id}


def mn_op(kind="trainjob", **kw):
    from airflow_provider_finetune.operators import FinetuneKubernetesOperator

    kw = {
        "task_id": "finetune",
        "config": MN_CONFIG,
        "gpus": 8,
        "num_nodes": 2,
        "distributed": kind,
        "poll_interval": 0.01,
        "namespace": NS,
        "runner": "kubernetes",
        "kubernetes_conn_id": "fake_kube",
        "deferrable": False,
        **kw,
    }
    return FinetuneKubernetesOperator(**kw)


def controller(api, kind, status=None, pods=()):
    """Plays the Kubeflow controller: a created job gets ``status`` and the pods ``pods`` (status dicts),
    labelled as the operator's job label asks."""
    from tests.provider.fake_kube_api import FakeKubeAPI

    real = FakeKubeAPI._create

    def create(self, group, ns, plural, body):
        code, obj = real(self, group, ns, plural, body)
        if code == 201 and plural == PLURALS[kind]:
            if status is not None:
                obj["status"] = copy.deepcopy(status)
            name = obj["metadata"]["name"]
            for i, pod_status in enumerate(pods):
                pod_name = f"{name}-node-0-{i}"
                self.objects[("api/v1", ns, "pods", pod_name)] = {
                    "metadata": {"name": pod_name, "namespace": ns, "labels": {JOB_LABEL: name}},
                    "status": copy.deepcopy(pod_status),
                }
                self.logs[(ns, pod_name)] = f"rank {i} starting\nrank {i} step 1\nrank {i} last line"
        return code, obj

    return mock.patch.object(FakeKubeAPI, "_create", create)


def done(kind):
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": DONE[kind], "status": "True"}]}


def job_calls(api, kind, method):
    return [r for r in api.requests if r["method"] == method and f"/{PLURALS[kind]}" in r["path"]]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_each_run_gets_its_own_job_validated_awaited_and_deleted(kube, kind):
    """Two runs of the same config: two jobs (no 409, no reattaching to last run's job), each named and
    labelled for its run, valid against the CRD, awaited, its result read, deleted on success."""
    results = iter([{"status": "completed", "final_eval_loss": 1.0}, {"status": "completed"}])
    names = []
    with (
        controller(kube, kind, status=done(kind), pods=[{"phase": "Succeeded"}]),
        mock.patch(
            "airflow_provider_finetune.operators.finetune.FinetuneKubernetesOperator.read_remote_result",
            side_effect=lambda uri: next(results),
        ),
    ):
        for run_id in ("scheduled__2026-12-01T00:00:00+00:00", "scheduled__2026-12-08T00:00:00+00:00"):
            assert mn_op(kind).execute(mn_ctx(run_id))["status"] == "completed"
            [post] = [r for r in job_calls(kube, kind, "POST")][len(names) :]
            body = post["body"]
            jsonschema.validate(body, crd_schema(CRD_FILES[kind]))
            assert body["metadata"]["labels"]["airflow-provider-finetune/run-id"] == label_value(run_id)
            names.append(body["metadata"]["name"])
    assert len(set(names)) == 2 and all(len(n) <= 40 and re.match(r"^[a-z][-a-z0-9]*$", n) for n in names)
    assert [r["path"].rsplit("/", 1)[-1] for r in job_calls(kube, kind, "DELETE")] == names
    assert not [k for k in kube.objects if k[2] == PLURALS[kind]]  # nothing left running


def test_a_job_of_another_run_under_the_name_is_refused_never_reattached(kube):
    op, context = mn_op(), mn_ctx()
    doc = op.multinode_manifest(context)
    doc["metadata"]["labels"]["airflow-provider-finetune/run-id"] = "scheduled__2026-11-01T00-00-00-00-00"
    kube.objects[(GROUPS["trainjob"], NS, "trainjobs", doc["metadata"]["name"])] = {
        **doc,
        "status": done("trainjob"),
    }
    with pytest.raises(FinetuneConfigError, match="not this task instance's job.*kubectl delete trainjobs"):
        op.execute(context)
    assert job_calls(kube, "trainjob", "DELETE") == []  # another run's job is never touched
    assert kube.get("trainjobs", NS, doc["metadata"]["name"]) is not None


def test_a_retry_reattaches_to_its_own_job_and_recreates_a_failed_one(kube):
    op, context = mn_op(), mn_ctx()
    doc = op.multinode_manifest(context)
    key = (GROUPS["trainjob"], NS, "trainjobs", doc["metadata"]["name"])
    kube.objects[key] = {**copy.deepcopy(doc), "status": done("trainjob")}
    with mock.patch.object(type(op), "read_remote_result", return_value={"status": "completed"}):
        assert op.execute(context)["status"] == "completed"
    assert len(job_calls(kube, "trainjob", "POST")) == 1  # the 409, then reattached
    failed = {"conditions": [{"type": "Failed", "status": "True", "message": "node lost"}]}
    kube.objects[key] = {**copy.deepcopy(doc), "status": failed}
    kube.requests.clear()
    with (
        controller(kube, "trainjob", status=done("trainjob")),
        mock.patch.object(type(op), "read_remote_result", return_value={"status": "completed"}),
    ):
        assert mn_op().execute(context)["status"] == "completed"
    # the failed job deleted and created again: a retry runs again (resuming from checkpoints)
    assert [r["method"] for r in kube.requests if r["path"].endswith(doc["metadata"]["name"])][:2] == [
        "GET",
        "DELETE",
    ]
    assert len(job_calls(kube, "trainjob", "POST")) == 2


@pytest.mark.parametrize(
    "pods,status,reason,deleted",
    [
        (
            [
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": "node",
                            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such tag"}},
                        }
                    ],
                }
            ],
            None,
            "ImagePullBackOff: no such tag",
            True,
        ),
        (
            [
                {
                    "phase": "Running",
                    "containerStatuses": [
                        {
                            "name": "node",
                            "state": {"running": {}},
                            "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                        }
                    ],
                }
            ],
            None,
            "OOMKilled",
            True,
        ),
        (
            [{"phase": "Failed"}],
            {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "pod node-0 exited 1",
                    }
                ]
            },
            "BackoffLimitExceeded: pod node-0 exited 1",
            False,  # the controller failed it: kept for its TTL, its pods' logs readable
        ),
    ],
)
def test_a_failed_jobs_reason_and_log_reach_the_task_log(kube, pods, status, reason, deleted):
    op = mn_op()
    with controller(kube, "trainjob", status=status, pods=pods):
        with pytest.raises(EngineJobFailed, match=re.escape(reason)) as failed:
            op.execute(mn_ctx())
    assert len(job_calls(kube, "trainjob", "GET")) <= 2  # surfaced within two polls
    assert "rank 0 last line" in str(failed.value)  # the failing pod's log tail in the task's error
    assert bool(job_calls(kube, "trainjob", "DELETE")) == deleted


def test_an_unschedulable_gang_fails_after_the_schedule_timeout(kube):
    pods = [
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        }
    ]
    with controller(kube, "trainjob", pods=pods):
        with pytest.raises(EngineJobFailed, match="unschedulable: 0/3 nodes.*Insufficient nvidia.com/gpu"):
            mn_op(schedule_timeout_seconds=1, poll_interval=0.2).execute(mn_ctx())
    assert job_calls(kube, "trainjob", "DELETE")


def test_on_kill_deletes_the_running_job(kube):
    import threading

    op = mn_op()
    errors = []

    def run():
        try:
            op.execute(mn_ctx())
        except Exception as err:  # noqa: BLE001 - the wait ends when the job is gone
            errors.append(err)

    with controller(kube, "trainjob", pods=[{"phase": "Running"}]):
        thread = threading.Thread(target=run)
        thread.start()
        for _ in range(500):
            if op._job is not None:
                break
            time.sleep(0.01)
        op.on_kill()
        thread.join(10)
    assert not thread.is_alive() and len(job_calls(kube, "trainjob", "DELETE")) == 1
    assert not [k for k in kube.objects if k[2] == "trainjobs"] and errors


def test_deferrable_wait_runs_in_the_triggerer(kube):
    from airflow_provider_finetune.compat import TaskDeferred

    op, context = mn_op(deferrable=True), mn_ctx()
    with controller(kube, "trainjob", status=done("trainjob"), pods=[{"phase": "Succeeded"}]):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
    trigger = deferred.value.trigger
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_finetune.triggers.job.TrainingJobTrigger"
    assert isinstance(trigger, TrainingJobTrigger) and kwargs["deadline"] is not None
    event = asyncio.run(first_event(TrainingJobTrigger(**json.loads(json.dumps(kwargs)))))
    assert event["status"] == "succeeded"
    resumed = mn_op(deferrable=True)  # a fresh worker resumes the task
    with mock.patch.object(type(resumed), "read_remote_result", return_value={"status": "completed"}):
        assert getattr(resumed, deferred.value.method_name)(context, event)["status"] == "completed"
    assert len(job_calls(kube, "trainjob", "DELETE")) == 1


def test_pull_secrets_affinity_kueue_labels_and_runtime_reach_the_trainjob(kube):
    affinity = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
            ]
        }
    }
    op = mn_op(
        image_pull_secrets="regcred",
        affinity=affinity,
        labels={"kueue.x-k8s.io/queue-name": "gpu-queue"},
        annotations={"example.com/owner": "ml-team"},
        training_runtime="deepspeed-distributed",
        termination_grace_period=600,
    )
    op.validate(mn_ctx())
    doc = op.multinode_manifest(mn_ctx())
    jsonschema.validate(doc, crd_schema(CRD_FILES["trainjob"]))
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert doc["metadata"]["annotations"] == {"example.com/owner": "ml-team"}
    assert doc["spec"]["runtimeRef"]["name"] == "deepspeed-distributed"
    template = _trainjob_pod(doc)
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert (
        template["spec"]["affinity"] == affinity and template["spec"]["terminationGracePeriodSeconds"] == 600
    )
    assert template["metadata"]["annotations"] == {"example.com/owner": "ml-team"}
    pj = mn_op("pytorchjob", image_pull_secrets="regcred", labels={"kueue.x-k8s.io/queue-name": "q"})
    pdoc = pj.multinode_manifest(mn_ctx())
    jsonschema.validate(pdoc, crd_schema(CRD_FILES["pytorchjob"]))
    assert pdoc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert pdoc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "regcred"}
    ]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"training_runtime_kind": "Runtime"}, "training_runtime_kind 'Runtime'"),
        ({"training_runtime": "Torch_Distributed"}, "training_runtime 'Torch_Distributed'"),
        ({"labels": {"kueue.x-k8s.io/queue-name": "bad value!"}}, "labels 'kueue.x-k8s.io/queue-name'"),
        ({"annotations": {"bad key!": "x"}}, "annotations 'bad key!'"),
        ({"image_pull_secrets": "Reg_Cred"}, "image_pull_secrets: 'Reg_Cred'"),
        ({"ttl_seconds_after_finished": -1}, "ttl_seconds_after_finished"),
    ],
)
def test_bad_job_arguments_are_refused_before_any_job(kube, kw, match):
    with pytest.raises(FinetuneConfigError, match=re.escape(match)):
        mn_op(**kw).execute(mn_ctx())
    assert kube.requests == []


def test_job_state_reads_conditions_and_pod_problems():
    running = {"kind": "TrainJob", "status": {"conditions": [{"type": "Created", "status": "True"}]}}
    assert job_state(running, [])[0] == "running"
    assert job_state(running, [{"metadata": {"name": "p"}, "status": {"phase": "Running"}}])[1] == (
        "TrainJob running (1 Running)"
    )
    pending = {
        "metadata": {"name": "p"},
        "status": {
            "initContainerStatuses": [{"name": "init", "state": {"waiting": {"reason": "ErrImagePull"}}}]
        },
    }
    assert job_state(running, [pending])[:3:2] == ("stuck", "p")
    crash = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [{"name": "node", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
        },
    }
    assert job_state(running, [crash])[0] == "running"  # a restart may cure it; the job's condition decides


def _trigger(kube, name: str, **kw) -> TrainingJobTrigger:
    return TrainingJobTrigger(
        name=name,
        namespace=NS,
        group="trainer.kubeflow.org",
        version="v1alpha1",
        plural="trainjobs",
        kubernetes_conn_id="fake_kube",
        poll_interval=0.01,
        **kw,
    )


def _running_job(kube, name: str) -> None:
    kube.objects[(GROUPS["trainjob"], NS, "trainjobs", name)] = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": NS},
        "status": {"conditions": []},
    }


def test_killing_the_deferred_task_deletes_the_job(kube):
    """A user kills the task while it is deferred: the triggerer's on_kill (Airflow 3.3+) deletes the
    job; once the trigger has fired, the worker owns the job and on_kill leaves it alone."""
    _running_job(kube, "ft-killed")
    trigger = _trigger(kube, "ft-killed")
    asyncio.run(trigger.on_kill())
    assert [r["path"] for r in job_calls(kube, "trainjob", "DELETE")] == [
        f"/{GROUPS['trainjob']}/namespaces/{NS}/trainjobs/ft-killed"
    ]
    assert (GROUPS["trainjob"], NS, "trainjobs", "ft-killed") not in kube.objects
    asyncio.run(trigger.on_kill())  # already gone: no error
    _running_job(kube, "ft-done")
    kube.objects[(GROUPS["trainjob"], NS, "trainjobs", "ft-done")]["status"] = done("trainjob")
    fired = _trigger(kube, "ft-done")

    async def fire_then_kill():
        async for _ in fired.run():
            break
        await fired.on_kill()

    asyncio.run(fire_then_kill())
    assert (GROUPS["trainjob"], NS, "trainjobs", "ft-done") in kube.objects
    _running_job(kube, "ft-kept")
    asyncio.run(_trigger(kube, "ft-kept", delete_on_kill=False).on_kill())
    assert (GROUPS["trainjob"], NS, "trainjobs", "ft-kept") in kube.objects


@pytest.mark.parametrize(("state", "deleted"), [("failed", True), ("success", True), ("deferred", False)])
def test_before_airflow_3_3_cleanup_deletes_the_job_only_when_the_task_left_deferred(
    kube, monkeypatch, state, deleted
):
    """Airflow 3.1/3.2 only cancel the trigger on a kill: cleanup asks the task's state; a triggerer
    restart leaves the task deferred, and the job must keep running."""
    import airflow_provider_finetune.triggers.job as job_module

    monkeypatch.setattr(job_module, "_triggerer_calls_on_kill", lambda: False)
    _running_job(kube, "ft-old")
    trigger = _trigger(kube, "ft-old")
    trigger.task_instance = SimpleNamespace(dag_id="retrain", task_id="finetune", run_id="r1", map_index=-1)

    async def task_state():
        return state

    monkeypatch.setattr(trigger, "task_state", task_state)
    asyncio.run(trigger.cleanup())
    assert ((GROUPS["trainjob"], NS, "trainjobs", "ft-old") not in kube.objects) is deleted


def test_on_airflow_3_3_cleanup_never_deletes(kube, monkeypatch):
    import airflow_provider_finetune.triggers.job as job_module

    monkeypatch.setattr(job_module, "_triggerer_calls_on_kill", lambda: True)
    _running_job(kube, "ft-new")
    trigger = _trigger(kube, "ft-new")
    trigger.task_instance = SimpleNamespace(dag_id="retrain", task_id="finetune", run_id="r1", map_index=-1)
    asyncio.run(trigger.cleanup())
    assert (GROUPS["trainjob"], NS, "trainjobs", "ft-new") in kube.objects
