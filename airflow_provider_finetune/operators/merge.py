"""MergeAdapterOperator: merge a LoRA/QLoRA adapter into its base in a pod (dequantized base)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_provider_finetune import checks
from airflow_provider_finetune.oci import OciMixin
from airflow_provider_finetune.operators.base import EngineJobOperator
from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE


class MergeAdapterOperator(OciMixin, EngineJobOperator):
    """``finetune-engine merge-job``.

    :param base: base model prefix (the grown-vocabulary base of the run is used automatically).
    :param adapter: adapter prefix, e.g. ``.../checkpoint-final-adapter``.
    :param output_uri: merged model prefix; default ``<adapter parent>/checkpoint-final-merged``.
    :param dtype: dtype of the dequantized base for the merge.
    :param output_oci: also push the merged model to ``oci://REGISTRY/REPOSITORY:TAG`` (after the bucket
        upload, by the same pod); ``oci_secret`` / ``oci_docker_config`` / ``oci_plain_http`` as in
        :class:`~airflow_provider_finetune.oci.OciMixin`.
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "base",
        "adapter",
        "output_uri",
        "output_oci",
    )
    oci_output = True
    hub_offline = True

    def __init__(
        self, *, base: str, adapter: str, output_uri: str | None = None, dtype: str = "auto", **kwargs: Any
    ) -> None:
        kwargs.setdefault("gpus", 0)
        kwargs.setdefault("cpu_per_gpu", "4")
        kwargs.setdefault("memory_per_gpu", "64Gi")
        super().__init__(**kwargs)
        self.base = base
        self.adapter = adapter
        self.output_uri = output_uri
        self.dtype = dtype

    def resolved_output(self) -> str:
        return (
            self.output_uri or self.adapter.rstrip("/").rsplit("/", 1)[0] + "/checkpoint-final-merged"
        ).rstrip("/")

    def validate(self, context: Context) -> None:
        super().validate(context)
        checks.check_bucket_uri("base", self.base)
        checks.check_bucket_uri("adapter", self.adapter)
        checks.check_bucket_uri("output_uri", self.output_uri or self.resolved_output())

    def engine_command(self, context: Context) -> list[str]:
        return [
            "finetune-engine",
            "merge-job",
            "--base",
            self.base,
            "--adapter",
            self.adapter,
            "--output",
            self.resolved_output(),
            "--dtype",
            self.dtype,
            "--result-file",
            XCOM_RESULT_FILE,
        ]
