"""oci:// parameters of the engine operators: refused in validate() when malformed (before any pod);
in the pod, the push as the job's last argument and the credentials only as a secretKeyRef."""

from __future__ import annotations

import pytest

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import (
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
)
from airflow_provider_finetune.pods.pod import to_dict
from airflow_provider_finetune.pods.security import secret_violations
from tests.provider.test_operator_pods import _defaults, context  # noqa: F401 - autouse fixture
from tests.provider.test_operators import CONFIG
from tests.registry import docker_config, oci_registry  # noqa: F401, F811 - fixtures

REF = "oci://registry.example.com:5000/team/adapter:v1"


def _engine(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


@pytest.mark.parametrize(
    ("make", "part"),
    [
        (
            lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, output_oci="oci://reg.io/Team:v1"),
            "repository part 'Team'",
        ),
        (
            lambda: MergeAdapterOperator(
                task_id="m", base="s3://finetune/base", adapter="s3://finetune/a", output_oci="oci://x"
            ),
            "no repository",
        ),
        (lambda: HFModelToBucketOperator(task_id="d", model_id="oci://reg.io/m:-bad"), "tag '-bad'"),
    ],
)
def test_malformed_reference_fails_in_validate(make, part):
    op = make()
    with pytest.raises(FinetuneConfigError) as err:
        op.validate(context(op))
    assert part in str(err.value) and op.task_id in str(err.value)


def test_finetune_pod_pushes_with_a_secret_reference():
    op = FinetuneKubernetesOperator(
        task_id="sweep", config=CONFIG, lora_rank=8, gpus=1, output_oci=REF, oci_secret="registry-push"
    )
    ctx = context(op, map_index=0)
    op.validate(ctx)
    pod = to_dict(op.build_pod_request_obj(ctx, dry_run=True))
    engine = _engine(pod)
    assert engine["command"][-2:] == ["--output-oci", REF]
    [auth] = [e for e in engine["env"] if e["name"] == "FINETUNE_OCI_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "registry-push", "key": ".dockerconfigjson"}
    assert secret_violations(pod) == []


def test_merge_and_deliver_take_oci():
    merge = MergeAdapterOperator(
        task_id="merge",
        base="s3://finetune/base",
        adapter="s3://finetune/e/r/checkpoint-final-adapter",
        output_oci=REF,
        oci_plain_http=True,
    )
    merge.validate(context(merge))
    engine = _engine(to_dict(merge.build_pod_request_obj(context(merge), dry_run=True)))
    assert engine["command"][-2:] == ["--output-oci", REF]
    assert {"name": "FINETUNE_OCI_PLAIN_HTTP", "value": "1"} in engine["env"]
    deliver = HFModelToBucketOperator(task_id="deliver", model_id=REF)
    deliver.validate(context(deliver))
    assert deliver.resolved_destination().endswith("/models/team/adapter@v1")
    with pytest.raises(FinetuneConfigError, match="output_oci is not supported"):
        HFModelToBucketOperator(task_id="d2", model_id="org/m", output_oci=REF).validate(context(deliver))


def test_deploy_pulls_oci_sources_with_a_secret_reference():
    from airflow_provider_finetune.operators import DeployVLLMOperator

    op = DeployVLLMOperator(
        task_id="serve",
        model_uri="s3://finetune/models/base",
        served_model_name="tiny",
        adapters={"tuned": REF},
        adapter_ranks={"tuned": 8},
        oci_secret="registry-pull",
        oci_plain_http=True,
    )
    op.validate()
    [dep] = [m for m in op.manifests() if m["kind"] == "Deployment"]
    inits = {c["name"]: c for c in dep["spec"]["template"]["spec"]["initContainers"]}
    adapter, model = inits["pull-adapter-tuned"], inits["pull-model"]
    assert adapter["command"][-2:] == [REF, "/models/adapters/tuned"]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in adapter["env"] if "valueFrom" in e}
    # the registry's credentials by reference; no bucket keys where nothing comes from the bucket
    assert secret_refs == {"FINETUNE_OCI_AUTH": {"name": "registry-pull", "key": ".dockerconfigjson"}}
    assert {"name": "FINETUNE_OCI_PLAIN_HTTP", "value": "1"} in adapter["env"]
    model_refs = {e["name"] for e in model["env"] if "valueFrom" in e}
    assert "AWS_SECRET_ACCESS_KEY" in model_refs and "FINETUNE_OCI_AUTH" not in model_refs
    assert secret_violations(dep) == []


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        ({"model_uri": "oci://reg.io/Team/m:v1"}, "repository part 'Team'"),
        ({"model_uri": REF, "platform": "kserve"}, "need platform 'deployment'"),
        ({"model_uri": REF, "oci_secret": "Bad_Name"}, "oci_secret 'Bad_Name'"),
    ],
)
def test_deploy_refuses_bad_oci_sources_in_validate(kwargs, part):
    from airflow_provider_finetune.operators import DeployVLLMOperator

    with pytest.raises(FinetuneConfigError, match=part.replace("(", r"\(")):
        DeployVLLMOperator(task_id="serve", served_model_name="tiny", **kwargs).validate()


def test_local_runner_pulls_an_oci_source_over_an_earlier_copy(oci_registry, docker_config, tmp_path):  # noqa: F811
    """The local server's model/adapter dir: an artifact replaces what an earlier deploy left there."""
    from airflow_provider_finetune.runners.vllm_local import fetch_source
    from finetune_engine.storage.oci import push

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    ref = oci_registry.ref("serve/adapter", "local")
    push(src, ref, plain_http=True)
    target = tmp_path / "work" / "adapters" / "tuned"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")

    def no_bucket(*args, **kwargs):
        raise AssertionError("an oci:// source never reads the bucket")

    assert fetch_source(ref, target, no_bucket, plain_http=True) == target
    assert sorted(p.name for p in target.iterdir()) == [
        "_finetune_manifest.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (target / name).read_bytes() == (src / name).read_bytes()


def test_data_delivery_takes_files_of_oci_artifacts():
    from airflow_provider_finetune.operators import DataScriptToBucketOperator

    good = DataScriptToBucketOperator(task_id="data", urls=[f"{REF}#train/chat.jsonl"], oci_secret="reg")
    good.validate(context(good))
    engine = _engine(to_dict(good.build_pod_request_obj(context(good), dry_run=True)))
    assert engine["command"][-2:] == ["--url", f"{REF}#train/chat.jsonl"]
    [auth] = [e for e in engine["env"] if e["name"] == "FINETUNE_OCI_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "reg", "key": ".dockerconfigjson"}
    bad = DataScriptToBucketOperator(task_id="data", urls=["https://example.com/a.jsonl", f"{REF}#../x"])
    with pytest.raises(FinetuneConfigError, match=r"urls\[1\]: .*file part"):
        bad.validate(context(bad))


def test_a_mapped_sweep_pushes_each_result():
    """partial()/expand() take the OciMixin parameters (a mapped sweep tags each push); a typo is still
    refused."""
    from airflow.sdk import DAG

    with DAG("oci_sweep", schedule=None):
        FinetuneKubernetesOperator.partial(
            task_id="sweep", config=CONFIG, output_oci=REF + "-r{{ ti.map_index }}", oci_plain_http=True
        ).expand(lora_rank=[2, 4])
    with pytest.raises(TypeError, match="unexpected keyword argument 'oci_secrets'"):
        FinetuneKubernetesOperator.partial(task_id="typo", config=CONFIG, oci_secrets="reg")
