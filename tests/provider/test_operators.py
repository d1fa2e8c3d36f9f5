"""Operator logic without a cluster: validation before any pod, rendering, multi-node jobs against
fake API clients, the secrets canary."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from airflow_provider_finetune.exceptions import EngineJobFailed, FinetuneConfigError, OutOfMemory
from airflow_provider_finetune.operators import (
    DataScriptToBucketOperator,
    DeployVLLMOperator,
    EvaluateModelsOperator,
    FinetuneKubernetesOperator,
    HFModelToBucketOperator,
    MergeAdapterOperator,
    QuantizeModelOperator,
)
from airflow_provider_finetune.pods.pod import to_dict
from airflow_provider_finetune.pods.security import restricted_violations
from tests.engine.test_bad_inputs import DUPLICATE_KEYS, _bomb

CONFIG = {
    "data_conf": {
        "training_data": {
            "type": "CONCATENATION",
            "datasets": [{"path": "s3://finetune/datasets/chat.jsonl"}],
        }
    },
    "batchsize_conf": {"total_train_batch_size": 8},
    "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
    "run_conf": {"model": "s3://finetune/models/org/tiny"},
}
CANARY = "sk-canary-9d1e55"


def ctx(map_index=-1):
    ti = SimpleNamespace(
        dag_id="tutorial", task_id="sweep", map_index=map_index, try_number=1, xcom_push=mock.Mock()
    )
    return {"ti": ti, "run_id": "manual__2026-11-24T10:00:00+00:00"}


def test_config_errors_name_the_key_before_any_pod():
    op = FinetuneKubernetesOperator(task_id="t", config=CONFIG, overrides=["training_args.learnin_rate=0.1"])
    with mock.patch.object(FinetuneKubernetesOperator, "build_pod_request_obj") as build:
        with pytest.raises(
            FinetuneConfigError,
            match=(
                r"training_args.learnin_rate: not a sft trainer argument "
                r"\(did you mean 'learning_rate'\?\)"
            ),
        ):
            op.execute(ctx())
        build.assert_not_called()
    with pytest.raises(FinetuneConfigError, match="method 'ppo'"):
        FinetuneKubernetesOperator(task_id="t", config=CONFIG, method="ppo").validate(ctx())
    with pytest.raises(
        FinetuneConfigError, match=r"/nope.yaml: 1 problem\(s\)\n  - file not found; check the path"
    ):
        FinetuneKubernetesOperator(task_id="t", config="/nope.yaml").validate(ctx())


# The same inputs the engine's bad-input table refuses (tests/engine/test_bad_inputs.py).
UNSAFE_YAML = [
    ("duplicate-keys", DUPLICATE_KEYS, "duplicate key 'training_args' on lines 3 and 5"),
    ("alias-bomb", _bomb(), "the aliases (*name) expand to more than 200000 values"),
    ("recursive", "a: &a [1, *a]\n", "refers to the node that contains it"),
    ("deep", "a: " + "[" * 500 + "]" * 500 + "\n", "nested deeper than 64 levels"),
    (
        "python-tag",
        'run_conf: !!python/object/apply:os.system ["echo hi"]\n',
        "could not determine a constructor",
    ),
    ("oversized", "# padding\n" * 120_000, "bytes"),
]


@pytest.mark.parametrize("name,text,fragment", UNSAFE_YAML, ids=[c[0] for c in UNSAFE_YAML])
def test_validate_refuses_the_yaml_validate_config_refuses(name, text, fragment, tmp_path, capsys):
    """validate() reads a config file or inline YAML with the engine's safe loader: what
    ``finetune-engine validate-config`` refuses, it refuses too, fast and naming the line."""
    from finetune_engine.cli.main import main as engine_main

    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert engine_main(["validate-config", str(path)]) == 2
    assert fragment in capsys.readouterr().err
    for config in (str(path), text):
        op = FinetuneKubernetesOperator(task_id="t", config=config)
        start = time.monotonic()
        with mock.patch.object(FinetuneKubernetesOperator, "build_pod_request_obj") as build:
            with pytest.raises(FinetuneConfigError) as err:
                op.execute(ctx())
            build.assert_not_called()
        assert time.monotonic() - start < 1, name
        assert fragment in str(err.value) and "Traceback" not in str(err.value)
        if name == "duplicate-keys":  # the file's own name (or the task's) and the line
            where = path if config == str(path) else "task t config"
            assert f"{where}:5: not valid YAML" in str(err.value)


def test_a_yaml_config_keeps_its_line_numbers_in_schema_errors(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "training_args": {"learnin_rate": 0.1}}, sort_keys=False))
    with pytest.raises(FinetuneConfigError, match=rf"training_args.learnin_rate \({path}:\d+\)"):
        FinetuneKubernetesOperator(task_id="t", config=str(path)).validate(ctx())


def test_the_stored_result_reaches_xcom_without_its_config(monkeypatch):
    """result.json records the run's config (the engine compares it on a relaunch); the operator's
    result, and so its XCom, leaves it out and keeps the rest."""
    stored = {"status": "completed", "final_eval_loss": 0.5, "config_sha256": "ab" * 32}
    stored["config"] = {**CONFIG, "training_args": {"learning_rate": 0.001}}

    def fake_download(uri, dest, client=None, **kwargs):
        assert uri == "s3://finetune/experiments/e/r/result.json"
        with open(dest, "w") as f:
            json.dump(stored, f)

    monkeypatch.setattr("finetune_engine.storage.download_file", fake_download)
    monkeypatch.setattr(
        "airflow_provider_finetune.hooks.BucketHook.storage_client", mock.PropertyMock(return_value=object())
    )
    op = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=4)
    result = op.handle_result(ctx(), op.read_remote_result("s3://finetune/experiments/e/r"))
    assert "config" not in result and "learning_rate" not in json.dumps(result)
    assert result == {
        "status": "completed",
        "final_eval_loss": 0.5,
        "config_sha256": "ab" * 32,
        "lora_rank": 4,
    }


def test_rank_overrides_checkpoint_keys_and_map_index_template():
    a = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8)
    b = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=16)
    assert a.map_index_template == "{{ task.sweep_label() }}" and a.sweep_label() == "r=8"
    assert "r: 8" in a.rendered_config() and "lora_alpha: 16" in a.rendered_config()
    ua, ub = a.resolved_checkpoint_uri(ctx(0)), b.resolved_checkpoint_uri(ctx(1))
    assert ua != ub and "/r8-" in ua and "/r16-" in ub
    # deterministic: the same task, run and config give the same prefix (a relaunch resumes)
    assert ua == FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8).resolved_checkpoint_uri(
        ctx(0)
    )
    assert a.engine_command(ctx(0))[:2] == ["finetune-engine", "train-job"]
    two = FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=4)
    assert two.engine_command(ctx())[:3] == ["torchrun", "--standalone", "--nproc-per-node=4"]


def test_the_run_prefix_hashes_what_the_config_asks_not_the_schemas_defaults():
    from finetune_engine.config import schema

    base = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8)
    defaults = {k: f.default for k, f in schema.SftArgs.model_fields.items()}
    # spelling out the schema's defaults is the same run (and so is an engine upgrade that adds a
    # key with a default): the pod's config shows them, the prefix's hash does not see them
    spelled = FinetuneKubernetesOperator(task_id="t", config={**CONFIG, "sft_args": defaults}, lora_rank=8)
    assert "packing: false" in base.rendered_config() and "max_seq_length: 2048" in base.rendered_config()
    assert spelled.config_hash() == base.config_hash()
    assert spelled.resolved_checkpoint_uri(ctx(0)) == base.resolved_checkpoint_uri(ctx(0))
    # any value that differs from the default is another run
    for key, value in (("max_seq_length", 1024), ("packing", True)):
        changed = FinetuneKubernetesOperator(
            task_id="t", config={**CONFIG, "sft_args": {**defaults, key: value}}, lora_rank=8
        )
        assert changed.config_hash() != base.config_hash(), key
    lr = FinetuneKubernetesOperator(
        task_id="t", config=CONFIG, lora_rank=8, overrides=["training_args.learning_rate=0.001"]
    )
    assert lr.config_hash() != base.config_hash()


def test_the_config_is_parsed_once_and_the_hash_does_not_depend_on_what_was_called_first():
    from finetune_engine import config

    with mock.patch.object(config, "parse_config", wraps=config.parse_config) as parse:
        hashed_first = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8)
        digest = hashed_first.config_hash()  # nothing rendered yet
        assert "r: 8" in hashed_first.rendered_config()
        assert hashed_first.config_hash() == digest and parse.call_count == 1
        rendered_first = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8)
        rendered_first.rendered_config()
        assert rendered_first.config_hash() == digest and parse.call_count == 2
    # the pod's config and the hash come from the same parsed config
    assert hashed_first.pod_config().peft_conf.peft_kwargs["r"] == 8


def test_pod_runs_resume_merge_and_use_the_charts_adapter_name_unless_the_config_says_otherwise():
    import yaml

    run = yaml.safe_load(FinetuneKubernetesOperator(task_id="t", config=CONFIG).rendered_config())["run_conf"]
    assert (run["resume_from_checkpoint"], run["merge_adapter"], run["final_checkpoint_name"]) == (
        "auto",
        True,
        "checkpoint-final-adapter",
    )  # adapter + checkpoint-final (merged), as the Silogen chart
    full = {**CONFIG, "peft_conf": {"peft_type": "NO_PEFT"}}
    run = yaml.safe_load(FinetuneKubernetesOperator(task_id="t", config=full).rendered_config())["run_conf"]
    assert (run["resume_from_checkpoint"], run["final_checkpoint_name"]) == ("auto", "checkpoint-final")
    own = {
        **CONFIG,
        "run_conf": {**CONFIG["run_conf"], "resume_from_checkpoint": False, "final_checkpoint_name": "out"},
    }
    op = FinetuneKubernetesOperator(task_id="t", config=own, merge_adapter=False)
    run = yaml.safe_load(op.rendered_config())["run_conf"]
    assert (run["resume_from_checkpoint"], run["merge_adapter"], run["final_checkpoint_name"]) == (
        False,
        False,
        "out",
    )
    assert op.config_hash() != FinetuneKubernetesOperator(task_id="t", config=CONFIG).config_hash()


def test_sweep_label_is_short_and_readable():
    from airflow.sdk import DAG

    label = FinetuneKubernetesOperator(
        task_id="t",
        config=CONFIG,
        overrides={"training_args.learning_rate": 1e-4, "peft_conf": {"peft_type": "NO_PEFT"}},
    ).sweep_label()
    assert label == "learning_rate=0.0001, peft_conf={peft_type: NO_PEFT}"
    long = FinetuneKubernetesOperator(
        task_id="t", config=CONFIG, overrides=[f"training_args.k{i}=v{i}" for i in range(40)]
    )
    assert len(long.sweep_label()) == 100 and long.sweep_label().endswith("...")
    assert FinetuneKubernetesOperator(task_id="t", config=CONFIG).map_index_template is None  # nothing swept
    with DAG("d", schedule=None):
        mapped = FinetuneKubernetesOperator.partial(task_id="m", config=CONFIG).expand(overrides=[["a.b=1"]])
        own = FinetuneKubernetesOperator.partial(
            task_id="o", config=CONFIG, map_index_template="{{ task.task_id }}"
        ).expand(lora_rank=[4])
    assert (
        mapped.map_index_template == "{{ task.sweep_label() }}"
        and own.map_index_template == "{{ task.task_id }}"
    )


CANARY_OPERATORS = {
    "finetune": lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=4, gpus=2),
    "hf-model": lambda: HFModelToBucketOperator(
        task_id="t", model_id="org/model", revision="abc", exclude_patterns=["original/*"]
    ),
    "data-script": lambda: DataScriptToBucketOperator(task_id="t", script="print(1)"),
    "merge": lambda: MergeAdapterOperator(
        task_id="t",
        base="s3://finetune/models/org/tiny",
        adapter="s3://finetune/e/r/checkpoint-final-adapter",
    ),
    "evaluate": lambda: EvaluateModelsOperator(
        task_id="t",
        models=["s3://finetune/m/a", "s3://finetune/m/b"],
        datasets="s3://finetune/datasets/heldout.jsonl",
    ),
    "quantize": lambda: QuantizeModelOperator(
        task_id="t",
        model="s3://finetune/e/r/checkpoint-final",
        calibration_data="s3://finetune/datasets/train.jsonl",
    ),
}


def test_the_canary_covers_every_engine_operator():
    from tests.provider.test_provider import _engine_operator_classes

    assert {type(make()) for make in CANARY_OPERATORS.values()} == _engine_operator_classes()


@pytest.mark.parametrize("name", sorted(CANARY_OPERATORS))
def test_every_operator_pod_is_restricted_and_carries_no_secret(name, monkeypatch):
    """The pod KubernetesPodOperator would create (XCom sidecar included), with the canary in the
    worker's environment and in the bucket and Hub connections: credentials appear only as
    secretKeyRef, never as values."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "login": "AKIDCANARY", "password": CANARY}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_HUGGINGFACE_DEFAULT", json.dumps({"conn_type": "generic", "password": CANARY})
    )
    op = CANARY_OPERATORS[name]()
    context = {**ctx(), "dag": SimpleNamespace(dag_id="tutorial")}
    op.validate(context)
    pod = to_dict(op.build_pod_request_obj(context, dry_run=True))
    text = json.dumps(pod)
    assert CANARY not in text and "AKIDCANARY" not in text
    assert restricted_violations(pod) == []
    assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *(("HF_TOKEN",) if name == "hf-model" else ())):
        assert set(env[var]) == {"name", "valueFrom"} and "secretKeyRef" in env[var]["valueFrom"], var


def test_the_vllm_deployment_carries_no_secret(monkeypatch):
    from airflow_provider_finetune.pods.serving import build_vllm_deployment

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "login": "AKIDCANARY", "password": CANARY}),
    )
    op = DeployVLLMOperator(
        task_id="d",
        model_uri="s3://finetune/m",
        served_model_name="m",
        adapters={"a": "s3://finetune/a"},
        adapter_ranks={"a": 8},
    )
    op.validate()
    doc = build_vllm_deployment(op.serve_spec())
    assert CANARY not in json.dumps(doc) and restricted_violations(doc) == []


def _build(op):
    from airflow_provider_finetune.pods.pod import build_pod

    return build_pod(op.build_spec(ctx()))


def test_hf_model_destination_and_command():
    op = HFModelToBucketOperator(
        task_id="t",
        model_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        revision="v1",
        exclude_patterns=["original/*"],
    )
    assert op.resolved_destination() == "s3://finetune/models/TinyLlama/TinyLlama-1.1B-Chat-v1.0@v1"
    cmd = op.engine_command(ctx())
    assert cmd[:3] == ["finetune-engine", "deliver-model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert cmd[cmd.index("--exclude-pattern") + 1] == "original/*" and "--allow-pickle" not in cmd
    [hf] = [s for s in op.build_spec(ctx()).secret_env if s.env_name == "HF_TOKEN"]
    assert hf.optional and hf.secret_name == "hf-token"


def test_hf_model_token_secret_and_overwrite_reach_the_pod(monkeypatch):
    op = HFModelToBucketOperator(
        task_id="t", model_id="meta-llama/Llama-3.2-1B", hf_token_secret="team-hf-token", allow_overwrite=True
    )
    op.validate(ctx())
    pod = to_dict(_build(op))
    base = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in base["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-hf-token",
        "key": "HF_TOKEN",
        "optional": True,
    }
    assert base["command"][-1] == "--overwrite"
    default = HFModelToBucketOperator(task_id="t", model_id="org/m")
    assert "--overwrite" not in default.engine_command(ctx())
    monkeypatch.setenv("AIRFLOW__FINETUNE__HF_TOKEN_SECRET_NAME", "cluster-hf")
    [hf] = [s for s in default.build_spec(ctx()).secret_env if s.env_name == "HF_TOKEN"]
    assert hf.secret_name == "cluster-hf"  # the [finetune] default when the operator names none
    with pytest.raises(
        FinetuneConfigError, match="hf_token_secret 'Team_HF' is not a valid Kubernetes Secret name"
    ):
        HFModelToBucketOperator(task_id="t", model_id="org/m", hf_token_secret="Team_HF").validate(ctx())


def test_local_runner_resolves_the_operators_token_secret_from_its_connection(monkeypatch):
    from airflow_provider_finetune.runners.local import build_env

    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", "login": "AKIDLOCAL", "password": CANARY})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_TEAM_HF", json.dumps({"conn_type": "generic", "password": "hf-team-token-value"})
    )
    op = HFModelToBucketOperator(
        task_id="t", model_id="org/m", hf_token_secret="team-hf-token", hf_conn_id="team_hf"
    )
    env, secret_vars = build_env(_build(op), {}, op.local_secret_resolver())
    assert env["HF_TOKEN"] == "hf-team-token-value" and env["AWS_SECRET_ACCESS_KEY"] == CANARY
    assert sorted(secret_vars) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    # the token is optional (public models): a missing connection leaves HF_TOKEN unset, nothing else
    public = HFModelToBucketOperator(
        task_id="t", model_id="org/m", hf_token_secret="team-hf-token", hf_conn_id="absent_conn"
    )
    env, _ = build_env(_build(public), {}, public.local_secret_resolver())
    assert "HF_TOKEN" not in env and env["AWS_ACCESS_KEY_ID"] == "AKIDLOCAL"


def test_data_operator_needs_exactly_one_source():
    with pytest.raises(FinetuneConfigError, match="exactly one"):
        DataScriptToBucketOperator(task_id="t").validate(ctx())
    with pytest.raises(FinetuneConfigError, match="exactly one"):
        DataScriptToBucketOperator(task_id="t", script="x", urls=["https://e/x.jsonl"]).validate(ctx())


@pytest.mark.parametrize(
    "returncode,tail,reason,kind,text",
    [
        (137, "", "OOMKilled", "host-oom", "raise memory_per_gpu"),
        (-9, "", "OOMKilled", "host-oom", "lower batchsize_conf.max_per_device_train_batch_size"),
        (
            1,
            "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes",
            None,
            "host-oom",
            "quant_conf",
        ),
        (
            1,
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            None,
            "accelerator-oom",
            "lower batchsize_conf.max_per_device_train_batch_size",
        ),
        (
            1,
            "RuntimeError: HIP out of memory. Tried to allocate",
            None,
            "accelerator-oom",
            "gradient_checkpointing",
        ),
        (-9, "", None, "killed", "without an OOMKilled reason"),  # a plain SIGKILL is not an OOM
        (137, "", None, "killed", "without an OOMKilled reason"),
        (137, "", "Error", "killed", "killed by SIGKILL (exit 137)"),
        (143, "", "DeadlineExceeded", "deadline", "active_deadline_seconds"),
        (137, "", "Evicted", "evicted", "evicted"),
        (2, "error: invalid experiment config", None, "config", "rejected its input"),
        (1, "RuntimeError: something else", None, "failed", "exit code 1"),
    ],
)
def test_failures_are_classified(returncode, tail, reason, kind, text):
    from airflow_provider_finetune.compat import AirflowFailException
    from airflow_provider_finetune.runners.local import LocalRunError

    err = EngineJobFailed.from_local(LocalRunError("pod x failed", returncode, tail, reason))
    assert err.kind == kind and str(err).startswith(f"[{kind}] pod x failed: ") and text in str(err)
    # OOM and bad input fail without retries (the Task SDK's AirflowFailException); the rest is retried
    assert isinstance(err, AirflowFailException) == (kind in ("host-oom", "accelerator-oom", "config"))
    assert isinstance(err, OutOfMemory) == kind.endswith("oom")


# torch's accelerator OOM, as its traceback names it (no torch import here)
TorchOOM = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch"})


@pytest.mark.parametrize(
    "error,code,kind",
    [
        (TorchOOM("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "accelerator-oom"),
        (MemoryError(), 1, "host-oom"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes"),
            1,
            "host-oom",
        ),
        (None, 1, "accelerator-oom"),  # BatchTooLargeError: one row never fits
        (ValueError("training_args.max_steps: must be > 0"), 2, "config"),
        (FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"), 2, "config"),
        (RuntimeError("NCCL watchdog timeout"), 1, "failed"),
    ],
)
def test_what_the_engine_prints_on_an_error_is_classified(error, code, kind, capsys, monkeypatch):
    """The engine's error boundary and the provider's classification agree: a crash's traceback (an
    out-of-memory among them) and a known failure's line say enough to classify from the log tail;
    bad input exits 2 and fails without retries."""
    from airflow_provider_finetune.runners.local import LocalRunError
    from finetune_engine.autobatch import BatchTooLargeError
    from finetune_engine.cli import errors as cli_errors

    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")
    error = error or BatchTooLargeError("auto batch size: one row does not fit in memory")

    def job(argv):
        raise error

    assert cli_errors.run_guarded("finetune-engine train-job", job, []) == code
    tail = capsys.readouterr().err
    # a crash shows its traceback; bad input and a failure the engine words itself are one line
    assert ("Traceback" in tail) == (code == 1 and not isinstance(error, BatchTooLargeError))
    err = EngineJobFailed.from_local(LocalRunError("pod x failed", code, tail, None))
    assert err.kind == kind, tail


class FakeCustomObjects:
    def __init__(self, exists=False):
        self.created = []
        self.exists = exists
        self.polls = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append((group, version, namespace, plural, body))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.polls += 1
        conditions = [{"type": "Created", "status": "True"}]
        if self.polls >= 2:
            conditions.append(
                {"type": "Complete" if plural == "trainjobs" else "Succeeded", "status": "True"}
            )
        return {"status": {"conditions": conditions}}


# The multi-node path over the wire (create per run, 409 of another run, reattach, the deferrable wait,
# failure reasons, deletion on success and kill): test_distributed.py


# DeployVLLM's cluster path (over the wire against a fake API server): test_deploy_cluster.py


def test_deploy_vllm_refuses_bad_ranks_and_uris():
    with pytest.raises(FinetuneConfigError, match="exceed max_lora_rank 8"):
        DeployVLLMOperator(
            task_id="d",
            model_uri="s3://finetune/m",
            served_model_name="m",
            adapters={"a": "s3://finetune/a"},
            adapter_ranks={"a": 16},
            max_lora_rank=8,
        ).validate()
    with pytest.raises(FinetuneConfigError, match="adapter_ranks is missing"):
        DeployVLLMOperator(
            task_id="d", model_uri="s3://finetune/m", served_model_name="m", adapters={"a": "s3://finetune/a"}
        ).validate()
    with pytest.raises(FinetuneConfigError, match="must be an s3:// URI"):
        DeployVLLMOperator(task_id="d", model_uri="/local/model", served_model_name="m").validate()


def test_local_vllm_missing_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__FINETUNE__VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    op = DeployVLLMOperator(task_id="d", model_uri="s3://finetune/m", served_model_name="m", runner="local")
    with pytest.raises(FinetuneConfigError, match="make vllm"):
        op.execute(ctx())


def test_local_vllm_engine_args_come_from_the_option_under_the_operators_own(monkeypatch):
    """[finetune] local_vllm_engine_args: extra flags for local servers; the operator's engine_args win;
    a flag the runner sets itself, a non-object or bad JSON is refused naming the option, before any
    download."""
    op = DeployVLLMOperator(
        task_id="d",
        model_uri="s3://finetune/m",
        served_model_name="m",
        runner="local",
        engine_args={"max_num_seqs": 4},
    )
    monkeypatch.delenv("AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS", raising=False)
    assert op.local_engine_args() == {"max_num_seqs": 4}
    monkeypatch.setenv(
        "AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS", '{"enforce_eager": true, "max_num_seqs": 8}'
    )
    assert op.local_engine_args() == {"enforce_eager": True, "max_num_seqs": 4}
    for value, match in (
        ('{"port": 9000}', r"local_vllm_engine_args: engine_args \['port'\] are set by the builder"),
        ('{"max_model_len": 64}', r"\['max_model_len'\] are set by the builder; use max_model_len"),
        ("[1]", r"local_vllm_engine_args must be a JSON object, got list"),
        ("{eager", r"local_vllm_engine_args is not JSON"),
    ):
        monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS", value)
        with pytest.raises(FinetuneConfigError, match=match):
            op.local_engine_args()
        with pytest.raises(FinetuneConfigError, match=match):
            op.execute_local({})  # before the vLLM venv or the bucket is looked at


def test_deploy_vllm_refuses_engine_args_the_server_builder_sets():
    with pytest.raises(FinetuneConfigError, match=r"DeployVLLMOperator 'd': engine_args \['model'\]"):
        DeployVLLMOperator(
            task_id="d", model_uri="s3://finetune/m", served_model_name="m", engine_args={"model": "/x"}
        ).validate()


def test_deferrable_mode_defers_after_one_pod_and_returns_the_result_on_reentry(monkeypatch):
    """Against the fake core API: validation, exactly one pod created, deferral to the parent's
    KubernetesPodTrigger; re-entry with the trigger's success event reads the XCom result, adds
    ours (rank, MLflow link) and deletes the pod."""
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

    from airflow_provider_finetune.compat import TaskDeferred
    from tests.provider.fake_k8s_run import FakeCore, patched

    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": False}}),
    )
    op = FinetuneKubernetesOperator(
        task_id="sweep",
        config=CONFIG,
        lora_rank=8,
        deferrable=True,
        runner="kubernetes",
        namespace="finetune",
        get_logs=False,
    )
    context = {**ctx(0), "dag": SimpleNamespace(dag_id="tutorial")}
    fake = FakeCore(outcomes={})
    result = {
        "status": "completed",
        "final_eval_loss": 1.25,
        "mlflow_run_id": "abc",
        "mlflow_tracking_uri": "http://mlflow:5000",
    }
    with patched(fake, json.dumps(result)):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
        [create] = [c for c in fake.calls if c["op"] == "create"]
        assert [c["op"] for c in fake.calls] == [
            "list",
            "create",
        ]  # looked for a pod to reattach to, then one create
        trigger = deferred.value.trigger
        assert isinstance(trigger, KubernetesPodTrigger) and deferred.value.method_name == "trigger_reentry"
        assert (trigger.pod_name, trigger.pod_namespace) == (create["name"], "finetune")
        pod = fake.pods[create["name"]]
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert "r: 8" in env["FINETUNE_CONFIG"].value  # the validated, rendered config went into the pod

        out = op.trigger_reentry(
            context,
            event={
                "status": "success",
                "name": trigger.pod_name,
                "namespace": "finetune",
                "message": "Container succeeded",
            },
        )
    assert out == {**result, "lora_rank": 8}
    assert [c["op"] for c in fake.calls] == ["list", "create", "delete"] and fake.calls[-1]["name"] == create[
        "name"
    ]
    context["ti"].xcom_push.assert_any_call(key="_link_MLflowRunLink", value="http://mlflow:5000/#/runs/abc")


def test_deferrable_reentry_after_an_oom_fails_without_retry(monkeypatch):
    """The trigger's failure event: the pod's OOMKilled reason is read before cleanup deletes it."""
    from airflow_provider_finetune.compat import TaskDeferred
    from tests.provider.fake_k8s_run import FakeCore, Outcome, patched

    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": False}}),
    )
    op = FinetuneKubernetesOperator(
        task_id="sweep",
        config=CONFIG,
        deferrable=True,
        runner="kubernetes",
        namespace="finetune",
        get_logs=False,
        on_finish_action="delete_pod",
    )
    context = {**ctx(), "dag": SimpleNamespace(dag_id="tutorial")}
    fake = FakeCore(outcomes={"sweep": Outcome("Failed", 137, "OOMKilled", log="step 7/100\n")})
    with patched(fake, "{}"):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context)
        with pytest.raises(
            OutOfMemory, match=r"^\[host-oom\] pod .* container base exited with 137 \(OOMKilled\)"
        ):
            op.trigger_reentry(
                context,
                event={
                    "status": "failed",
                    "name": deferred.value.trigger.pod_name,
                    "namespace": "finetune",
                    "message": "Container failed",
                },
            )
    ops = [c["op"] for c in fake.calls]
    assert (
        ops[:3] == ["list", "create", "log"] and ops[-1] == "delete"
    )  # the log tail before the deletion (a label patch between)


def test_every_operator_is_importable_from_the_package():
    import importlib
    import inspect
    import pkgutil

    import airflow_provider_finetune.operators as ops

    defined = {}
    for mod in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{mod.name}")
        defined |= {
            name: cls
            for name, cls in inspect.getmembers(module, inspect.isclass)
            if name.endswith("Operator") and cls.__module__ == module.__name__
        }
    assert {"DeployVLLMOperator", "UndeployVLLMOperator", "FinetuneKubernetesOperator"} <= set(defined)
    assert sorted(defined) == sorted(ops.__all__)
    assert all(getattr(ops, name) is cls for name, cls in defined.items())


# -- validate(): every operator refuses bad arguments before any pod --------------------------------

BAD_ARGUMENTS = [
    (
        lambda: HFModelToBucketOperator(task_id="t", model_id="org/m", destination="s3://"),
        "bucket name is empty",
    ),
    (
        lambda: HFModelToBucketOperator(task_id="t", model_id="org/m", destination="s3://finetune/../x"),
        "destination 's3://finetune/../x': '.' and '..'",
    ),
    (lambda: HFModelToBucketOperator(task_id="t", model_id="s3://bk/m"), "model_id 's3://bk/m': bucket"),
    (
        lambda: HFModelToBucketOperator(task_id="t", model_id="org/m", bucket="Fine_Tune"),
        "bucket 'Fine_Tune'",
    ),
    (
        lambda: DataScriptToBucketOperator(task_id="t", script="x", destination="s3://finetune/a/./b"),
        "'.' and '..'",
    ),
    (
        lambda: MergeAdapterOperator(task_id="t", base="s3://finetune", adapter="s3://finetune/a"),
        "names no key",
    ),
    (lambda: MergeAdapterOperator(task_id="t", base="s3://finetune/b", adapter="/a"), "adapter '/a' must be"),
    (
        lambda: EvaluateModelsOperator(
            task_id="t", models=["s3://finetune/m"], datasets=["s3://192.168.0.1/d"]
        ),
        r"datasets\[0\] .*IP address",
    ),
    (
        lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, checkpoint_uri="s3://x/y"),
        "3-63 characters",
    ),
    (
        lambda: FinetuneKubernetesOperator(
            task_id="t", config=CONFIG, base_model="s3://finetune/models/../m"
        ),
        "base_model",
    ),
    (
        lambda: FinetuneKubernetesOperator(
            task_id="t", config={**CONFIG, "run_conf": {"model": "s3://finetune//tiny"}}
        ),
        r"config run_conf.model .*empty path segment",
    ),
    (
        lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, namespace="ML_Team"),
        "namespace 'ML_Team' is not a valid Kubernetes namespace",
    ),
    (
        lambda: MergeAdapterOperator(
            task_id="t", base="s3://finetune/b", adapter="s3://finetune/a", service_account_name="Trainer!"
        ),
        "service_account_name 'Trainer!'",
    ),
    (
        lambda: EvaluateModelsOperator(
            task_id="t", models="s3://finetune/m", datasets="s3://finetune/d", engine_image="ghcr.io/Org/x:"
        ),
        "engine_image .* is not a valid image reference",
    ),
    (lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=-1), "gpus -1"),
    (lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, num_nodes=0), "num_nodes 0"),
    (
        lambda: FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=3),
        r"total_train_batch_size=8 is not divisible by the number of processes \(3\).*gpus=3",
    ),
    (
        lambda: FinetuneKubernetesOperator(task_id="t", config={**CONFIG, "run_conf": {"model": "org/tiny"}}),
        "run_conf.model 'org/tiny': training pods read the base model from the bucket",
    ),
]


@pytest.mark.parametrize("make,match", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_pod(make, match, monkeypatch):
    monkeypatch.setenv("AIRFLOW__FINETUNE__RUNNER", "kubernetes")
    op = make()
    with mock.patch.object(type(op), "build_pod_request_obj") as build:
        with pytest.raises(FinetuneConfigError, match=match):
            op.execute(ctx())
        build.assert_not_called()


def test_the_batch_split_accepts_a_world_size_that_divides_it():
    for gpus, nodes in ((1, 1), (2, 1), (4, 2)):
        FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=gpus, num_nodes=nodes).validate(ctx())
    with pytest.raises(FinetuneConfigError, match=r"number of processes \(16\)"):
        FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=8, num_nodes=2).validate(ctx())
    # an override that fixes the total is what counts (the pod's config)
    FinetuneKubernetesOperator(
        task_id="t",
        config=CONFIG,
        gpus=8,
        num_nodes=2,
        overrides=["batchsize_conf.total_train_batch_size=64"],
    ).validate(ctx())


def test_templated_arguments_are_checked_after_rendering():
    op = HFModelToBucketOperator(task_id="t", model_id="org/m", destination="{{ params.dest }}")
    context = {**ctx(), "params": {"dest": "s3://finetune/models/../../etc"}}
    op.render_template_fields(context)
    assert op.destination == "s3://finetune/models/../../etc"
    with pytest.raises(FinetuneConfigError, match="'.' and '..'"):
        op.validate(context)


def test_a_sweep_may_not_ask_for_more_gpus_than_the_cap(monkeypatch):
    def sweep_ctx(n):
        return {**ctx(0), "expanded_ti_count": n}

    op = FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=8, lora_rank=8)
    op.validate(sweep_ctx(8))  # 64 GPUs: the default cap
    with pytest.raises(FinetuneConfigError, match=r"asks for 512 GPUs \(64 mapped instance\(s\) x 1 node"):
        op.validate(sweep_ctx(64))
    monkeypatch.setenv("AIRFLOW__FINETUNE__MAX_SWEEP_GPUS", "0")  # no cap
    op.validate(sweep_ctx(64))
    monkeypatch.setenv("AIRFLOW__FINETUNE__MAX_SWEEP_GPUS", "4")
    with pytest.raises(FinetuneConfigError, match="max_sweep_gpus = 4"):
        FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=4, num_nodes=2).validate(ctx())
    FinetuneKubernetesOperator(task_id="t", config=CONFIG, gpus=0).validate(sweep_ctx(100))  # CPU only


def test_a_hub_model_id_is_fine_on_the_local_runner(monkeypatch):
    FinetuneKubernetesOperator(
        task_id="t", config={**CONFIG, "run_conf": {"model": "/models/tiny"}}, runner="local"
    ).validate(ctx())


def test_results_and_links_never_show_mlflow_credentials(monkeypatch):
    from airflow_provider_finetune.links import mlflow_run_url

    op = FinetuneKubernetesOperator(task_id="t", config=CONFIG, lora_rank=8)
    context = ctx()
    result = op.handle_result(
        context, {"mlflow_tracking_uri": "https://ann:pw123@mlflow.example.com", "mlflow_run_id": "abc"}
    )
    assert result["mlflow_tracking_uri"] == "https://mlflow.example.com"
    context["ti"].xcom_push.assert_called_with(
        key="_link_MLflowRunLink", value="https://mlflow.example.com/#/runs/abc"
    )
    assert mlflow_run_url("http://u:p@ui:5000/", "r1", "7") == "http://ui:5000/#/experiments/7/runs/r1"


def test_local_runner_takes_mlflow_credentials_from_a_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW__FINETUNE__MLFLOW_SECRET_NAME", "mlflow-credentials")
    op = MergeAdapterOperator(task_id="t", base="s3://finetune/b", adapter="s3://finetune/a")
    resolve = op.local_secret_resolver()
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "login": "ann", "password": "pw"})
    )
    assert resolve("mlflow-credentials", "MLFLOW_TRACKING_USERNAME") == "ann"
    assert resolve("mlflow-credentials", "MLFLOW_TRACKING_PASSWORD") == "pw"
    with pytest.raises(KeyError):
        resolve("mlflow-credentials", "MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "password": "tok"}))
    assert resolve("mlflow-credentials", "MLFLOW_TRACKING_TOKEN") == "tok"
    monkeypatch.delenv("AIRFLOW_CONN_MLFLOW_DEFAULT")
    with pytest.raises(KeyError, match="mlflow_conn_id"):  # optional in the pod: the run goes on without
        resolve("mlflow-credentials", "MLFLOW_TRACKING_TOKEN")
    with pytest.raises(KeyError, match="no Airflow connection stands in"):
        resolve("other-secret", "MLFLOW_TRACKING_TOKEN")


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_a_multinode_manifest_that_breaks_the_pod_rules_is_never_created(kind):
    op = FinetuneKubernetesOperator(
        task_id="t",
        config=CONFIG,
        gpus=4,
        num_nodes=2,
        distributed=kind,
        poll_interval=0,
        runner="kubernetes",
    )
    fake = FakeCustomObjects()
    real = FinetuneKubernetesOperator.multinode_manifest

    def tampered(self, context):
        from airflow_provider_finetune.pods.security import pod_specs

        doc = real(self, context)
        for _, spec, _ in pod_specs(doc):
            spec["hostPID"] = True
        return doc

    with (
        mock.patch("kubernetes.client.CustomObjectsApi", return_value=fake),
        mock.patch(
            "airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook.api_client",
            new_callable=mock.PropertyMock,
        ),
        mock.patch.object(FinetuneKubernetesOperator, "multinode_manifest", tampered),
    ):
        with pytest.raises(FinetuneConfigError, match="hostPID"):
            op.execute(ctx())
    assert fake.created == [] and fake.polls == 0


# -- target_modules against the base model's architecture, before any pod ------------------------------


@pytest.fixture(scope="module")
def local_bucket(tmp_path_factory):
    """The embedded S3 server (rclone serve s3): its environment (endpoint, keys, bucket)."""
    from finetune_engine.storage.local_server import ensure_running, stop

    root = tmp_path_factory.mktemp("s3")
    values = ensure_running(root)
    yield values
    stop(root)


@pytest.fixture()
def delivered_tiny(local_bucket, tiny_model_dir, monkeypatch):
    """The tiny Llama delivered to the bucket (deliver-model), an Airflow connection to that bucket,
    and a model prefix whose config.json names an architecture the table does not know: (tiny URI,
    unknown URI, connection id)."""
    from finetune_engine.jobs.deliver_model import deliver_model
    from finetune_engine.storage import put_bytes

    bucket = f"s3://{local_bucket['FINETUNE_BUCKET']}"
    with monkeypatch.context() as m:  # deliver-model reads the pod's variables
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            m.setenv(key, local_bucket[key])
        deliver_model(str(tiny_model_dir), f"{bucket}/models/tiny")
        put_bytes(f"{bucket}/models/novel/config.json", b'{"model_type": "novel-arch"}')
    monkeypatch.setenv(
        "AIRFLOW_CONN_TEAM_BUCKET",
        json.dumps(
            {
                "conn_type": "aws",
                "login": local_bucket["AWS_ACCESS_KEY_ID"],
                "password": local_bucket["AWS_SECRET_ACCESS_KEY"],
                "extra": {"endpoint_url": local_bucket["AWS_ENDPOINT_URL"]},
            }
        ),
    )
    # the worker's own variables reach nothing: only the connection can read the bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    return f"{bucket}/models/tiny", f"{bucket}/models/novel", "team_bucket"


def _targeted(model: str, targets, **kwargs) -> FinetuneKubernetesOperator:
    return FinetuneKubernetesOperator(
        task_id="t",
        config=CONFIG,
        base_model=model,
        overrides={"peft_conf.peft_kwargs.target_modules": targets},
        **kwargs,
    )


def test_target_modules_that_match_nothing_in_the_delivered_model_are_refused(delivered_tiny):
    """The tiny Llama's config.json is read from the bucket through the connection: a misspelt module
    name is refused before any pod, naming it, the module names a Llama has and where the
    architecture was read; the right names, all-linear and an unknown architecture pass."""
    tiny, novel, conn = delivered_tiny
    with mock.patch.object(FinetuneKubernetesOperator, "build_pod_request_obj") as build:
        with pytest.raises(FinetuneConfigError) as err:
            _targeted(tiny, ["q_prj", "v_proj", "mlp"], bucket_conn_id=conn).execute(ctx())
        build.assert_not_called()
    message = str(err.value)
    assert "'q_prj', 'mlp' match no module of a llama model" in message
    assert "did you mean 'q_prj' -> 'q_proj'?" in message
    assert "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert f"model_type 'llama' from {tiny}/config.json" in message
    for targets in (["q_proj", "v_proj"], ["model.layers.0.self_attn.o_proj", "down_proj"], "all-linear"):
        _targeted(tiny, targets, bucket_conn_id=conn).validate(ctx())
    _targeted(novel, ["anything"], bucket_conn_id=conn).validate(ctx())  # not in the table: not refused


def test_target_modules_are_checked_from_a_preset_without_the_bucket(monkeypatch):
    """No connection to read config.json: a preset that names the architecture (by the model id, or
    run_conf.preset) decides; a model nothing names is not refused, and nothing waits on the network."""
    monkeypatch.delenv("AIRFLOW_CONN_NOWHERE", raising=False)
    start = time.monotonic()
    with pytest.raises(
        FinetuneConfigError, match=r"'c_attn' matches no module of a llama model.*preset llama-3.2-1b"
    ):
        _targeted(
            "s3://finetune/models/meta-llama/Llama-3.2-1B", ["c_attn"], bucket_conn_id="nowhere"
        ).validate(ctx())
    with pytest.raises(
        FinetuneConfigError, match=r"'q_proj' matches no module of a phi3 model.*run_conf.preset"
    ):
        FinetuneKubernetesOperator(
            task_id="t",
            config=CONFIG,
            bucket_conn_id="nowhere",
            overrides={"peft_conf.peft_kwargs.target_modules": ["q_proj"], "run_conf.preset": "phi-3-mini"},
        ).validate(ctx())
    _targeted("s3://finetune/models/org/tiny", ["whatever"], bucket_conn_id="nowhere").validate(ctx())
    assert time.monotonic() - start < 2
