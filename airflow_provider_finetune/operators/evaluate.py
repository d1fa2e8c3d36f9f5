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
    :param gpus: GPUs of the pod; default (None): the accelerator of the training task upstream — one
        GPU of its vendor, on its node selector and tolerations, when it trained on GPUs (the CPU when
        it did not, or when there is no such task). ``gpus=0`` evaluates on the CPU.
    :param accelerator_from: the task id of the training task to take the accelerator from; default:
        the FinetuneKubernetesOperator directly upstream.
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
        gpus: int | str | None = None,
        accelerator_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("cpu_per_gpu", "4")
        kwargs.setdefault("memory_per_gpu", "32Gi")
        super().__init__(gpus=0 if gpus is None else gpus, **kwargs)
        self.inherit_accelerator = gpus is None
        self.accelerator_from = accelerator_from
        self.models = models
        self.datasets = datasets
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size

    def training_task(self) -> Any:
        """The training task whose accelerator this evaluation takes, or None."""
        from airflow_provider_finetune.operators.finetune import FinetuneKubernetesOperator

        if not self.has_dag():  # a task outside a DAG has no training task upstream
            if self.accelerator_from:
                raise FinetuneConfigError(
                    f"accelerator_from {self.accelerator_from!r}: the task is in no DAG"
                )
            return None
        if self.accelerator_from:
            dag = self.dag
            if dag is None or not dag.has_task(self.accelerator_from):
                raise FinetuneConfigError(
                    f"accelerator_from {self.accelerator_from!r}: no such task in the DAG (give the task id "
                    "of the training task, or gpus=)"
                )
            return dag.get_task(self.accelerator_from)
        found = [t for t in self.upstream_list if isinstance(t, FinetuneKubernetesOperator)]
        return found[0] if len(found) == 1 else None

    def take_accelerator(self, context: Context) -> None:
        """gpus=None: one GPU of the training task's vendor (its node selector and tolerations too, when
        this task sets none) when it trained on GPUs; the CPU otherwise."""
        train = self.training_task()
        if train is None:
            return
        try:
            gpus = int(train.render_template(train.gpus, context) or 0)
        except (TypeError, ValueError):
            gpus = 0
        if gpus < 1:
            return
        self.gpus = 1  # one model at a time: one GPU is what scoring uses
        self.gpu_vendor = self.gpu_vendor or train.gpu_vendor
        self.node_selector = self.node_selector or dict(train.node_selector or {})
        self.tolerations = self.tolerations or list(train.tolerations or [])
        self.log.info(
            "evaluating on 1 %s GPU, the accelerator of %s (%d GPU(s)); gpus=0 evaluates on the CPU",
            self.gpu_vendor or "default-vendor",
            train.task_id,
            gpus,
        )

    def validate(self, context: Context) -> None:
        if self.inherit_accelerator:
            self.take_accelerator(context)
            self.inherit_accelerator = False
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
