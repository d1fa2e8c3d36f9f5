"""QuantizeModelOperator: post-training quantization of a bucket model in a pod (W8A8 / W4A16)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_provider_finetune import checks
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators.base import EngineJobOperator
from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE

# the engine's schemes (finetune_engine.quantize.SCHEMES), repeated so the provider stays torch-free
SCHEMES = ("W8A8", "W4A16")


class QuantizeModelOperator(EngineJobOperator):
    """``finetune-engine quantize-job``: a compressed-tensors checkpoint that vLLM loads.

    The rounding is calibrated on a fixed sample (seed 0) of ``calibration_data``; the output records
    the scheme and the sample (file name, count, sha256). Returns ``{"quantized_uri", "scheme",
    "calibration", "size_bytes", ...}``.

    :param model: complete model prefix (e.g. the merged champion).
    :param output_uri: quantized model prefix; default ``<model>-<scheme lower case>``.
    :param scheme: ``W8A8`` (int8 weights and activations) or ``W4A16`` (int4 weights, groups of 128).
    :param calibration_data: JSONL URI (e.g. the training data); without it weights are rounded to nearest.
    :param samples: calibration examples drawn.
    :param iters: AutoRound tuning steps per block (engine default with calibration data: 200).
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "model",
        "output_uri",
        "scheme",
        "calibration_data",
    )
    hub_offline = True

    def __init__(
        self,
        *,
        model: str,
        output_uri: str | None = None,
        scheme: str = "W8A8",
        calibration_data: str | None = None,
        samples: int = 128,
        iters: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("gpus", 0)
        kwargs.setdefault("cpu_per_gpu", "4")
        kwargs.setdefault("memory_per_gpu", "64Gi")
        super().__init__(**kwargs)
        self.model = model
        self.output_uri = output_uri
        self.scheme = scheme
        self.calibration_data = calibration_data
        self.samples = samples
        self.iters = iters

    def resolved_output(self) -> str:
        return (self.output_uri or f"{self.model.rstrip('/')}-{str(self.scheme).strip().lower()}").rstrip("/")

    def validate(self, context: Context) -> None:
        super().validate(context)
        checks.check_bucket_uri("model", self.model)
        if str(self.scheme).strip().upper() not in SCHEMES:
            raise FinetuneConfigError(
                f"scheme: {self.scheme!r} is not supported; choose one of {', '.join(SCHEMES)}"
            )
        checks.check_bucket_uri("output_uri", self.resolved_output())
        if self.resolved_output() == self.model.rstrip("/"):
            raise FinetuneConfigError("output_uri: must differ from model (the model is never overwritten)")
        if self.calibration_data:
            checks.check_bucket_uri("calibration_data", self.calibration_data)
        checks.check_positive_int("samples", self.samples, minimum=1)
        if self.iters is not None:
            checks.check_positive_int("iters", self.iters, minimum=0)
            if self.iters and not self.calibration_data:
                raise FinetuneConfigError("iters: tuning needs calibration_data (a JSONL URI)")

    def engine_command(self, context: Context) -> list[str]:
        cmd = [
            "finetune-engine",
            "quantize-job",
            "--model",
            self.model,
            "--output",
            self.resolved_output(),
            "--scheme",
            str(self.scheme).strip().upper(),
            "--samples",
            str(int(self.samples)),
        ]
        if self.calibration_data:
            cmd += ["--calibration-data", self.calibration_data]
        if self.iters is not None:
            cmd += ["--iters", str(int(self.iters))]
        return cmd + ["--result-file", XCOM_RESULT_FILE]
