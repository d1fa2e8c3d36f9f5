"""distributed_strategy of FinetuneKubernetesOperator: the HF TrainingArguments it renders into the
experiment config (what the pod gets in FINETUNE_CONFIG), the launch command, and the checks that
run before any pod.

FSDP is not run for real here: accelerate (1.15) turns FSDP on only for accelerator device types
(MULTI_GPU/XPU/NPU/HPU...); with 2 CPU processes on gloo it silently trains with DDP instead
(measured: "distributed: MULTI_CPU, 2 process(es), model DistributedDataParallel"). The engine now
logs what ran and warns when it is not what training_args asked for; the slow test below keeps
that honest and will fail the day accelerate shards on the CPU (then make it a real FSDP test).
DeepSpeed is not installed in the test environment (see images/README.md), so it is not run either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import FinetuneKubernetesOperator
from airflow_provider_finetune.operators.finetune import STRATEGIES
from airflow_provider_finetune.pods.pod import build_pod, to_dict
from tests.provider.test_operators import CONFIG, ctx


def _op(**kw) -> FinetuneKubernetesOperator:
    return FinetuneKubernetesOperator(
        **{"task_id": "t", "config": CONFIG, "gpus": 2, "runner": "kubernetes", **kw}
    )


def _pod_config(op) -> dict:
    op.validate(ctx())
    pod = to_dict(build_pod(op.build_spec(ctx())))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return {
        "training_args": yaml.safe_load(env["FINETUNE_CONFIG"])["training_args"],
        "command": pod["spec"]["containers"][0]["command"],
    }


def test_fsdp_renders_fsdp2_with_layer_wrapping():
    out = _pod_config(_op(distributed_strategy="fsdp"))
    ta = out["training_args"]
    assert ta["fsdp"] is True and ta.get("deepspeed") is None
    assert ta["fsdp_config"] == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    }
    assert out["command"][:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]


@pytest.mark.parametrize("strategy,stage", [("deepspeed-zero1", 1), ("deepspeed-zero3", 3)])
def test_deepspeed_renders_a_zero_config_with_auto_values(strategy, stage):
    out = _pod_config(_op(distributed_strategy=strategy, gpus=1))
    ds = out["training_args"]["deepspeed"]
    assert ds["zero_optimization"]["stage"] == stage and out["training_args"].get("fsdp") in (None, False)
    # batch sizes come from the engine's derived TrainingArguments ("auto"), never fixed in the config
    assert (
        ds["train_micro_batch_size_per_gpu"]
        == ds["gradient_accumulation_steps"]
        == ds["train_batch_size"]
        == "auto"
    )
    if stage == 3:
        assert (
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        )  # a loadable final model
    # DeepSpeed needs the distributed env: torchrun even for one GPU
    assert out["command"][:3] == ["torchrun", "--standalone", "--nproc-per-node=1"]


def test_ddp_and_default_leave_the_config_alone():
    default, ddp = _pod_config(_op()), _pod_config(_op(distributed_strategy="ddp"))
    assert default == ddp
    assert (
        default["training_args"].get("fsdp") in (None, False)
        and default["training_args"].get("deepspeed") is None
    )
    assert _pod_config(_op(gpus=1, distributed_strategy="ddp"))["command"][:2] == [
        "finetune-engine",
        "train-job",
    ]


def test_overrides_refine_the_strategy_and_it_changes_the_run_key():
    op = _op(distributed_strategy="fsdp", overrides={"training_args.fsdp_config.cpu_offload": True})
    assert _pod_config(op)["training_args"]["fsdp_config"]["cpu_offload"] is True
    assert op.config_hash() != _op().config_hash()  # another strategy is another run (no resume across)
    assert STRATEGIES["fsdp"]["fsdp_config"].get("cpu_offload") is None  # the table was not mutated


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"distributed_strategy": "zero2"},
            r"distributed_strategy 'zero2': use one of \['ddp', "
            r"'deepspeed-zero1', 'deepspeed-zero3', 'fsdp'\]",
        ),
        ({"distributed_strategy": "deepspeed-zero3", "gpus": 0}, "needs gpus >= 1"),
        ({"distributed_strategy": "deepspeed-zero1", "gpus": 0}, "needs gpus >= 1"),
        ({"distributed_strategy": "fsdp", "gpus": 1}, "give gpus >= 2 or num_nodes >= 2"),
        (
            {
                "distributed_strategy": "fsdp",
                "config": {**CONFIG, "training_args": {"deepspeed": {"zero_optimization": {"stage": 2}}}},
            },
            r"already set \['deepspeed'\]",
        ),
    ],
)
def test_bad_strategies_fail_before_any_pod(kw, match):
    op = _op(**kw)
    with (
        mock.patch.object(FinetuneKubernetesOperator, "build_pod_request_obj") as build,
        mock.patch("airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.execute") as parent,
    ):
        with pytest.raises(FinetuneConfigError, match=match):
            op.execute(ctx())
    build.assert_not_called()
    parent.assert_not_called()


def test_fsdp_over_nodes_is_allowed_with_one_gpu_each():
    op = _op(distributed_strategy="fsdp", gpus=1, num_nodes=2)
    op.check_strategy()
    manifest = json.dumps(op.multinode_manifest(ctx()))
    assert "fsdp" in manifest and "TRANSFORMER_BASED_WRAP" in manifest  # the nodes' pods get the same config


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_falls_back_to_ddp_and_says_so(tiny_model_dir, chat_data, tmp_path):
    """The operator's fsdp training_args through the engine under torchrun (2 processes, gloo)."""
    ta = dict(STRATEGIES["fsdp"])
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(chat_data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "learning_rate": 0.003,
            "max_steps": 2,
            "logging_steps": 1,
            "save_steps": 100,
            **ta,
        },
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 2},
        "run_conf": {"model": str(tiny_model_dir)},
        "sft_args": {"max_seq_length": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "finetune_engine.cli.main",
            "finetuning",
            "sft",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "distributed: MULTI_CPU, 2 process(es), model DistributedDataParallel" in out
    assert "training_args asked for FSDP but accelerate ran MULTI_CPU" in out
