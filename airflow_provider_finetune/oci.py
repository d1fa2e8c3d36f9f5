"""OCI registry parameters shared by the engine operators (``oci://`` outputs and sources).

A pod gets the registry credentials from a ``kubernetes.io/dockerconfigjson`` Secret, by reference:
its ``.dockerconfigjson`` key as a ``secretKeyRef`` (``FINETUNE_OCI_AUTH``; engine pods mount no
Secret and carry no credential as a value). On the local runner the credentials come from a Docker
config file on the worker (``oci_docker_config``; default ``$DOCKER_CONFIG`` or ``~/.docker``).
References are checked in ``validate()``, before any pod.
"""

from __future__ import annotations

import inspect
from typing import Any

from airflow_provider_finetune import checks
from airflow_provider_finetune.exceptions import FinetuneConfigError
from airflow_provider_finetune.pods.spec import SecretEnv

AUTH_ENV = "FINETUNE_OCI_AUTH"
PLAIN_HTTP_ENV = "FINETUNE_OCI_PLAIN_HTTP"
DOCKERCONFIG_KEY = ".dockerconfigjson"


def check_oci_reference(task_id: str, what: str, reference: Any, allow_path: bool = False) -> None:
    """FinetuneConfigError naming the parameter and the malformed part of an ``oci://`` reference."""
    from finetune_engine.storage.oci import OciInputError, parse_oci

    try:
        parse_oci(str(reference), allow_path=allow_path)
    except OciInputError as err:
        raise FinetuneConfigError(f"task {task_id}: {what}: {err}") from None


class OciMixin:
    """Adds ``oci_secret``, ``oci_docker_config`` and ``oci_plain_http`` to an engine operator (before
    EngineJobOperator in the bases), and, with ``oci_output=True``, ``output_oci``: where the job pushes
    its result after the bucket upload (``--output-oci`` of train-job and merge-job).

    :param output_oci: ``oci://REGISTRY/REPOSITORY:TAG`` to push the adapter / merged model to (the tag is
        templated, e.g. ``adapter:{{ ds_nodash }}-r{{ ti.map_index }}``). A tag holding other content
        is refused: one tag per result.
    :param oci_secret: name of a ``kubernetes.io/dockerconfigjson`` Secret with the registry's
        credentials (push and pull), passed to the pod by reference.
    :param oci_docker_config: local runner: a Docker config file (or directory with config.json) on the
        worker with the registry's credentials.
    :param oci_plain_http: talk HTTP to the registry (a registry without TLS; tests on loopback).
    """

    oci_output = False

    def __init__(
        self,
        *,
        output_oci: str | None = None,
        oci_secret: str | None = None,
        oci_docker_config: str | None = None,
        oci_plain_http: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.output_oci = output_oci
        self.oci_secret = oci_secret
        self.oci_docker_config = oci_docker_config
        self.oci_plain_http = oci_plain_http

    def oci_references(self) -> dict[str, Any]:
        """Parameter name -> oci:// reference the task reads or writes (checked in validate())."""
        return {"output_oci": self.output_oci} if self.output_oci else {}

    def validate(self, context: Any) -> None:
        super().validate(context)  # type: ignore[misc]
        if self.output_oci and not self.oci_output:
            raise FinetuneConfigError(f"task {self.task_id}: output_oci is not supported by this operator")
        for what, ref in self.oci_references().items():
            check_oci_reference(self.task_id, what, ref, allow_path=what != "output_oci")
        if self.oci_secret and not checks.DNS_SUBDOMAIN.match(str(self.oci_secret)):
            raise FinetuneConfigError(
                f"task {self.task_id}: oci_secret {self.oci_secret!r} is not a valid Secret name"
            )

    def build_spec(self, context: Any) -> Any:
        spec = super().build_spec(context)  # type: ignore[misc]
        if self.oci_plain_http:
            spec.env[PLAIN_HTTP_ENV] = "1"
        if self.resolved_runner == "local":
            if self.oci_docker_config:
                # a file or a directory with config.json: the engine reads either
                spec.env["DOCKER_CONFIG"] = str(self.oci_docker_config)
        elif self.oci_secret:
            spec.secret_env.append(SecretEnv(AUTH_ENV, self.oci_secret, DOCKERCONFIG_KEY))
        if self.output_oci and self.oci_output:
            spec.command.extend(["--output-oci", str(self.output_oci)])
        return spec


# Airflow's .partial() / .expand() accept only parameters it finds on the __init__s along the MRO that
# its operator metaclass wrapped (their _BaseOperatorMeta__param_names); a mixin's are listed the same
# way, so that a mapped sweep can push each result (output_oci="...:r{{ ti.map_index }}").
OciMixin.__init__._BaseOperatorMeta__param_names = {  # type: ignore[attr-defined]
    name for name, p in inspect.signature(OciMixin.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
}
