"""Delivery operators: a Hugging Face model, or data from a script or URLs, into the bucket."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Context

from airflow_provider_finetune import checks, settings
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.hooks import SecretNames
from airflow_provider_finetune.oci import OciMixin
from airflow_provider_finetune.operators.base import EngineJobOperator
from airflow_provider_finetune.pods.spec import DNS_SUBDOMAIN, SecretEnv


class HFModelToBucketOperator(OciMixin, EngineJobOperator):
    """``finetune-engine deliver-model``: Hub model (or a directory / bucket prefix) -> bucket.

    :param model_id: Hub repo id (org/name), a directory on the worker (local runner), s3:// prefix, or
        an OCI artifact ``oci://REGISTRY/REPOSITORY:TAG`` (credentials: ``oci_secret`` /
        ``oci_docker_config``, see :class:`~airflow_provider_finetune.oci.OciMixin`).
    :param revision: branch, tag or commit.
    :param exclude_patterns: globs of files to skip, e.g. ``["original/*"]``.
    :param allow_patterns: globs of the only files to deliver (default: all but the excluded).
    :param destination: bucket prefix; default ``s3://<bucket>/models/<org>/<name>[@rev]``.
    :param allow_pickle: also deliver pickle (.bin/.pt) weights.
    :param allow_overwrite: replace an existing complete copy from another source/revision.
    :param hf_token_secret: Kubernetes Secret whose ``HF_TOKEN`` key the pod gets (gated models);
        default ``[finetune] hf_token_secret_name``. Optional in the pod: public models need none.
    :param hf_conn_id: the Airflow connection (password = token) that stands in for that Secret on
        the local runner; default ``[finetune] hf_conn_id``.
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "model_id",
        "revision",
        "destination",
        "hf_token_secret",
    )

    def __init__(
        self,
        *,
        model_id: str,
        revision: str | None = None,
        exclude_patterns: list[str] | None = None,
        allow_patterns: list[str] | None = None,
        destination: str | None = None,
        allow_pickle: bool = False,
        allow_overwrite: bool = False,
        hf_token_secret: str | None = None,
        hf_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("gpus", 0)
        kwargs.setdefault("cpu_per_gpu", "2")
        kwargs.setdefault("memory_per_gpu", "8Gi")
        super().__init__(**kwargs)
        self.model_id = model_id
        self.revision = revision
        self.exclude_patterns = exclude_patterns or []
        self.allow_patterns = allow_patterns or []
        self.destination = destination
        self.allow_pickle = allow_pickle
        self.allow_overwrite = allow_overwrite
        self.hf_token_secret = hf_token_secret
        self.hf_conn_id = hf_conn_id

    def resolved_destination(self) -> str:
        if self.destination:
            return self.destination.rstrip("/")
        name = "/".join(self.model_id.rstrip("/").split("/")[-2:])
        suffix = f"@{self.revision}" if self.revision and self.revision != "main" else ""
        if str(self.model_id).startswith("oci://"):  # models/<org>/<name>@<tag or digest>
            from finetune_engine.storage.oci import parse_oci

            ref = parse_oci(self.model_id)
            name, suffix = "/".join(ref.repository.split("/")[-2:]), "@" + ref.reference.replace(":", "-")
        return self.bucket_uri("models", name + suffix)

    def oci_references(self) -> dict[str, Any]:
        return {"model_id": self.model_id} if str(self.model_id).startswith("oci:") else {}

    def validate(self, context: Context) -> None:
        super().validate(context)
        if str(self.model_id).startswith("s3:"):
            checks.check_bucket_uri("model_id", self.model_id)
        elif not str(self.model_id or "").strip():
            raise FinetuneConfigError(
                "model_id is empty: give a Hub repo id (org/name), a directory or s3://"
            )
        checks.check_bucket_uri("destination", self.destination or self.resolved_destination())
        name = self.secret_names().hf_token
        if not DNS_SUBDOMAIN.match(name or ""):
            raise FinetuneConfigError(
                f"hf_token_secret {name!r} is not a valid Kubernetes Secret name (lowercase letters, "
                "digits, '-' and '.'); set hf_token_secret= or [finetune] hf_token_secret_name"
            )

    def secret_names(self) -> SecretNames:
        return SecretNames(
            super().secret_names().bucket, self.hf_token_secret or settings.get("hf_token_secret_name")
        )

    def local_hf_conn_id(self) -> str:
        return self.hf_conn_id or super().local_hf_conn_id()

    def engine_command(self, context: Context) -> list[str]:
        cmd = ["finetune-engine", "deliver-model", self.model_id, self.resolved_destination()]
        if self.revision:
            cmd += ["--revision", self.revision]
        for p in self.allow_patterns:
            cmd += ["--allow-pattern", p]
        for p in self.exclude_patterns:
            cmd += ["--exclude-pattern", p]
        if self.allow_pickle:
            cmd.append("--allow-pickle")
        if self.allow_overwrite:
            cmd.append("--overwrite")
        return cmd

    def extra_secret_env(self) -> list[SecretEnv]:
        # optional: public models need no token
        return [SecretEnv("HF_TOKEN", self.secret_names().hf_token, "HF_TOKEN", optional=True)]


class DataScriptToBucketOperator(OciMixin, EngineJobOperator):
    """``finetune-engine deliver-data``: run a data script (or fetch URLs), validate, upload.

    :param script: Python source of the data script (writes JSONL into ``$FINETUNE_DATA_DIR``).
    :param script_file: path of the script on the worker (read at run time) instead of ``script``.
    :param urls: http(s) URLs of JSONL files instead of a script, or files of OCI artifacts
        ``oci://REGISTRY/REPOSITORY:TAG#FILE`` (credentials: ``oci_secret`` / ``oci_docker_config``).
    :param destination: bucket prefix; default ``s3://<bucket>/datasets``.
    :param method: validate the files for ``sft``, ``dpo`` or ``kto``.
    :param timeout_seconds: seconds the script or the downloads may take.
    :param allow_private_urls: let ``urls`` reach private and loopback addresses (refused by default).
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "script",
        "script_file",
        "urls",
        "destination",
    )
    template_fields_renderers = {**EngineJobOperator.template_fields_renderers, "script": "py"}

    def __init__(
        self,
        *,
        script: str | None = None,
        script_file: str | None = None,
        urls: list[str] | None = None,
        destination: str | None = None,
        method: str = "sft",
        timeout_seconds: int = 3600,
        allow_private_urls: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("gpus", 0)
        kwargs.setdefault("cpu_per_gpu", "2")
        kwargs.setdefault("memory_per_gpu", "8Gi")
        super().__init__(**kwargs)
        self.script = script
        self.script_file = script_file
        self.urls = urls or []
        self.destination = destination
        self.method = method
        self.timeout_seconds = timeout_seconds
        self.allow_private_urls = allow_private_urls

    def oci_references(self) -> dict[str, Any]:
        return {f"urls[{i}]": u for i, u in enumerate(self.urls) if str(u).startswith("oci:")}

    def source_script(self) -> str | None:
        if self.script_file:
            path = Path(self.script_file)
            if not path.is_file():
                raise FinetuneConfigError(f"script_file {self.script_file} not found")
            return path.read_text(encoding="utf-8")
        return self.script

    def validate(self, context: Context) -> None:
        super().validate(context)
        if bool(self.source_script()) == bool(self.urls):
            raise FinetuneConfigError("give exactly one of script / script_file / urls")
        if self.method not in ("sft", "dpo", "kto"):
            raise FinetuneConfigError(f"method {self.method!r}: use sft, dpo or kto")
        checks.check_bucket_uri("destination", self.destination or self.resolved_destination())
        checks.check_positive_int("timeout_seconds", self.timeout_seconds, minimum=1)

    def resolved_destination(self) -> str:
        return (self.destination or self.bucket_uri("datasets")).rstrip("/")

    def engine_command(self, context: Context) -> list[str]:
        cmd = [
            "finetune-engine",
            "deliver-data",
            self.resolved_destination(),
            "--method",
            self.method,
            "--timeout",
            str(self.timeout_seconds),
        ]
        for url in self.urls:
            cmd += ["--url", url]
        if self.allow_private_urls:
            cmd.append("--allow-private-urls")
        return cmd

    def engine_env(self, context: Context) -> dict[str, str]:
        script = self.source_script()
        return {"FINETUNE_DATA_SCRIPT": script} if script else {}
