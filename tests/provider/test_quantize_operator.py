"""QuantizeModelOperator's pod: the engine command it runs, the official schemas, the restricted
profile, and bad arguments refused before any pod."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest

from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators import QuantizeModelOperator
from airflow_provider_finetune.pods.pod import to_dict
from tests.provider.test_operator_pods import _defaults, context, normalized  # noqa: F401 - autouse fixture

MODEL = "s3://finetune/champions-models/line/checkpoint-final-merged"
DATA = "s3://finetune/datasets/retrain/train.jsonl"


def _op(**kw) -> QuantizeModelOperator:
    args = {"model": MODEL, "calibration_data": DATA, "scheme": "w4a16", "samples": 64, "iters": 100}
    return QuantizeModelOperator(task_id="quantize", **{**args, **kw})


def _pod(op: QuantizeModelOperator) -> dict:
    ctx = context(op)
    op.validate(ctx)
    return to_dict(op.build_pod_request_obj(ctx, dry_run=True))


def test_the_pod_runs_the_quantize_job():
    """Golden file, schemas, restricted profile: test_operator_pods.OPERATORS["quantize"]."""
    pod = _pod(_op())
    [base] = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    command = " ".join(base.get("command", []) + base.get("args", []))
    assert (
        f"finetune-engine quantize-job --model {MODEL} --output {MODEL}-w4a16 --scheme W4A16 --samples 64 "
        f"--calibration-data {DATA} --iters 100 --result-file" in command
    )
    env = {e["name"]: e.get("value") for e in base["env"]}
    assert env.get("HF_HUB_OFFLINE") == "1"  # quantizing never reaches the Hub
    assert "nvidia.com/gpu" not in str(base["resources"])  # a CPU pod unless asked for GPUs


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"scheme": "int3"}, r"scheme: 'int3' is not supported; choose one of W8A8, W4A16"),
        ({"model": "/local/dir"}, r"model"),
        ({"output_uri": MODEL}, r"output_uri: must differ from model"),
        ({"calibration_data": "http://x/y.jsonl"}, r"calibration_data"),
        ({"samples": 0}, r"samples"),
        ({"calibration_data": None, "iters": 5}, r"iters: tuning needs calibration_data"),
    ],
)
def test_bad_arguments_fail_before_any_pod(kw, match):
    op = _op(**kw)
    with pytest.raises(FinetuneConfigError, match=match):
        op.validate(context(op))


def test_local_runner_runs_the_same_command():
    op = _op()
    runner = mock.Mock()
    runner.run.return_value = SimpleNamespace(xcom={"quantized_uri": f"{MODEL}-w4a16"})
    with (
        mock.patch("airflow_provider_finetune.runners.local.LocalRunner", return_value=runner),
        mock.patch.dict("os.environ", {"AIRFLOW__FINETUNE__BUCKET_ENDPOINT_URL": "http://s3:9000"}),
    ):
        op.runner = "local"
        assert op.execute(context(op)) == {"quantized_uri": f"{MODEL}-w4a16"}
    cmd = runner.run.call_args.args[0] if runner.run.call_args.args else runner.run.call_args.kwargs
    assert "quantize-job" in str(cmd) and f"{MODEL}-w4a16" in str(cmd)
