"""EvaluateModelsOperator: score models (e.g. champion and challenger) on the same held-out data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_provider_finetune import checks
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.operators.base import EngineJobOperator
from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(v) for v in value if v and str(v).strip()]


class EvaluateModelsOperator(EngineJobOperator):
    """``finetune-engine eval-job``: the assistant-token loss of each model on the same held-out set.

    Every model is scored in one pod with the same code and the same examples, so the losses are
    comparable. Returns ``{"models": [{"model_uri", "eval_loss", "tokens", ...}], "best_model_uri"}``.

    :param models: complete model prefixes (``s3://.../checkpoint-final``); empty entries are dropped
        (e.g. a champion that does not exist yet).
    :param datasets: held-out JSONL URIs.
    :param max_seq_length: longer examples are truncated.
    :param batch_size: examples per forward pass.
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "models",
        "datasets",
        "max_seq_length",
    )
    hub_offline = True

    def __init__(
        self,
        *,
        models: list[str] | str,
        datasets: list[str] | str,
        max_seq_length: int = 1024,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("gpus", 0)
        kwargs.setdefault("cpu_per_gpu", "4")
        kwargs.setdefault("memory_per_gpu", "32Gi")
        super().__init__(**kwargs)
        self.models = models
        self.datasets = datasets
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size

    def validate(self, context: Context) -> None:
        super().validate(context)
        models, datasets = _as_list(self.models), _as_list(self.datasets)
        if not models:
            raise FinetuneConfigError("models: give at least one model prefix to evaluate")
        if not datasets:
            raise FinetuneConfigError("datasets: give at least one held-out JSONL URI")
        for name, uris in (("models", models), ("datasets", datasets)):
            for i, uri in enumerate(uris):
                checks.check_bucket_uri(f"{name}[{i}]", uri)
        checks.check_positive_int("max_seq_length", self.max_seq_length, minimum=8)
        checks.check_positive_int("batch_size", self.batch_size, minimum=1)

    def engine_command(self, context: Context) -> list[str]:
        cmd = ["finetune-engine", "eval-job"]
        for uri in _as_list(self.models):
            cmd += ["--model", uri]
        for uri in _as_list(self.datasets):
            cmd += ["--data", uri]
        return cmd + [
            "--max-seq-length",
            str(int(self.max_seq_length)),
            "--batch-size",
            str(int(self.batch_size)),
            "--result-file",
            XCOM_RESULT_FILE,
        ]
