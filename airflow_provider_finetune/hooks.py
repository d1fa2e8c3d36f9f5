"""Connections: the bucket (an Airflow ``aws`` connection) and the Hub token.

Everything on the Airflow side that reaches the bucket goes through :class:`BucketHook`, built on the
amazon provider's ``AwsBaseHook``: keys, session token, role ARN (assume-role), profile, region and
endpoint_url of the connection are all honoured, and the credentials travel as an explicit boto3
session to the engine's storage calls (``client=``), never through ``os.environ``.

The pods get credentials only as Kubernetes Secret references; the local runner resolves those
same references from Airflow connections here. Nothing here logs a secret value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from airflow_provider_finetune.exceptions import FinetuneConfigError

BUCKET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DEFAULT_REGION = "us-east-1"


def missing_connection_message(conn_id: str) -> str:
    return (
        f"Airflow connection {conn_id!r} (the bucket: [finetune] bucket_conn_id or the operator's "
        "bucket_conn_id) is not defined; add an aws connection with login/password = access key/secret "
        "key and extra "
        f'endpoint_url, e.g. AIRFLOW_CONN_{conn_id.upper()}=\'{{"conn_type": "aws", "login": ..., '
        f'"password": ..., "extra": {{"endpoint_url": "http://127.0.0.1:9000"}}}}\''
    )


class BucketConnectionError(FinetuneConfigError):
    """The bucket connection is missing or yields no credentials (not retried: fix the connection)."""


class BucketHook(AwsBaseHook):
    """The bucket through an Airflow ``aws`` connection: the one way the provider reaches it.

    The amazon provider builds the boto3 session from the connection (``login``/``password`` or extra
    ``aws_access_key_id``/``aws_secret_access_key``, ``aws_session_token``, ``role_arn`` with its
    assume-role options, ``profile_name``, ``region_name``, ``endpoint_url`` or
    ``service_config.s3.endpoint_url``, ``verify``); :meth:`storage_client` turns that session into
    the engine's S3 client, to pass as ``client=`` to ``finetune_engine.storage`` calls. Unlike
    ``AwsBaseHook``, a connection that does not exist is an error naming the fix, not a silent fall
    back to the worker's own credentials.
    """

    hook_name = "Fine-tune bucket"

    def __init__(self, aws_conn_id: str, **kwargs: Any):
        super().__init__(aws_conn_id=aws_conn_id, client_type="s3", **kwargs)

    def require_connection(self) -> None:
        """BucketConnectionError (saying how to add it) when the connection is not defined."""
        from airflow.exceptions import AirflowNotFoundException

        try:
            self.get_connection(self.aws_conn_id)
        except AirflowNotFoundException:
            raise BucketConnectionError(missing_connection_message(self.aws_conn_id)) from None

    @property
    def endpoint_url(self) -> str | None:
        """The connection's S3 endpoint (``service_config.s3.endpoint_url``, else ``endpoint_url``);
        None: AWS."""
        return self.conn_config.get_service_endpoint_url("s3") or None

    @cached_property
    def storage_client(self):
        """The engine's S3 client (its retries, signer and path-style addressing) on this connection's
        boto3 session; thread-safe, built once per hook."""
        from finetune_engine.storage import MissingCredentialsError, session_client

        self.require_connection()
        try:
            return session_client(
                self.get_session(region_name=self.region_name),
                self.endpoint_url,
                self.region_name,
                self.verify,
                where=f"Airflow connection {self.aws_conn_id!r}",
            )
        except MissingCredentialsError as err:
            raise BucketConnectionError(str(err)) from None

    def env(self) -> dict[str, str]:
        """The connection as the standard AWS variables, for a subprocess's environment (the pods'
        contract): keys (temporary ones with ``AWS_SESSION_TOKEN`` for a role or session token),
        region and endpoint. Secrets are masked in task logs; never log the values."""
        self.require_connection()
        session = self.get_session(region_name=self.region_name)
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
        if frozen is not None:
            from airflow.sdk.log import mask_secret

            mask_secret(frozen.secret_key)
            if frozen.token:
                mask_secret(frozen.token)
        out = {
            "AWS_ACCESS_KEY_ID": (frozen.access_key if frozen else None) or "",
            "AWS_SECRET_ACCESS_KEY": (frozen.secret_key if frozen else None) or "",
            "AWS_DEFAULT_REGION": self.region_name or session.region_name or DEFAULT_REGION,
        }
        if frozen is not None and frozen.token:
            out["AWS_SESSION_TOKEN"] = frozen.token
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url
        return out


@dataclass(frozen=True)
class SecretNames:
    bucket: str
    hf_token: str


def bucket_connection_json(values: dict[str, str]) -> str:
    """An Airflow ``aws`` connection (for ``AIRFLOW_CONN_<ID>``) from the standard AWS variables,
    e.g. the embedded S3 server's env file: the inverse of :func:`bucket_settings`."""
    import json

    return json.dumps(
        {
            "conn_type": "aws",
            "login": values["AWS_ACCESS_KEY_ID"],
            "password": values["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": values["AWS_ENDPOINT_URL"]},
        }
    )


def bucket_settings(conn_id: str) -> dict[str, str]:
    """Endpoint, region and keys of the bucket connection (values are secrets: don't log them)."""
    return BucketHook(conn_id).env()


def bucket_settings_or_explain(conn_id: str) -> dict[str, str]:
    """:func:`bucket_settings`, but a missing connection raises KeyError saying how to add it."""
    try:
        return bucket_settings(conn_id)
    except BucketConnectionError as err:
        raise KeyError(str(err)) from None


def hf_token(conn_id: str) -> str | None:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return conn.password or None


class ConnectionSecretResolver:
    """Resolves a pod's secretKeyRef (Secret name, key) from Airflow connections."""

    def __init__(self, names: SecretNames, bucket_conn_id: str, hf_conn_id: str):
        self.names = names
        self.bucket_conn_id = bucket_conn_id
        self.hf_conn_id = hf_conn_id
        self._bucket: dict[str, str] | None = None

    def bucket(self) -> dict[str, str]:
        """The bucket connection's variables, resolved once: temporary keys (an assumed role) and
        their session token come from one resolution and stay a pair."""
        if self._bucket is None:
            self._bucket = bucket_settings_or_explain(self.bucket_conn_id)
        return self._bucket

    def __call__(self, secret: str, key: str) -> str:
        if secret == self.names.bucket and key in BUCKET_KEYS:
            value = self.bucket().get(key)
            if not value:
                field = "login (access key id)" if key.endswith("KEY_ID") else "password (secret access key)"
                raise KeyError(
                    f"Airflow connection {self.bucket_conn_id!r} has no {field}; set it on the connection"
                )
            return value
        if secret == self.names.hf_token and key == "HF_TOKEN":
            token = hf_token(self.hf_conn_id)
            if token is None:
                raise KeyError(
                    f"Airflow connection {self.hf_conn_id!r} ([finetune] hf_conn_id or the operator's "
                    "hf_conn_id) is missing or has no password; put the Hub token in its password"
                )
            return token
        raise KeyError(
            f"no Airflow connection stands in for Secret {secret!r} on the local runner (known: "
            f"{self.names.bucket!r} -> {self.bucket_conn_id!r}, "
            f"{self.names.hf_token!r} -> {self.hf_conn_id!r})"
        )
