"""Connections: the bucket (an Airflow ``aws`` connection) and the Hub token.

The pods get credentials only as Kubernetes Secret references; the local runner resolves those
same references from Airflow connections here. Nothing here logs a secret value.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

BUCKET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class SecretNames:
    bucket: str
    hf_token: str


def bucket_connection_json(values: dict[str, str]) -> str:
    """An Airflow ``aws`` connection (for ``AIRFLOW_CONN_<ID>``) from the standard AWS variables,
    e.g. the embedded S3 server's env file: the inverse of :func:`bucket_settings`."""
    import json

    return json.dumps({"conn_type": "aws", "login": values["AWS_ACCESS_KEY_ID"], "password": values["AWS_SECRET_ACCESS_KEY"],
                       "extra": {"endpoint_url": values["AWS_ENDPOINT_URL"]}})


def bucket_settings(conn_id: str) -> dict[str, str]:
    """Endpoint, region and keys of the bucket connection (values are secrets: don't log them)."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson
    out = {
        "AWS_ACCESS_KEY_ID": conn.login or extra.get("aws_access_key_id") or "",
        "AWS_SECRET_ACCESS_KEY": conn.password or extra.get("aws_secret_access_key") or "",
        "AWS_DEFAULT_REGION": extra.get("region_name") or "us-east-1",
    }
    endpoint = extra.get("endpoint_url") or (extra.get("service_config", {}).get("s3", {}) or {}).get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
    return out


@contextlib.contextmanager
def bucket_env(conn_id: str) -> Iterator[dict[str, str]]:
    """The bucket connection as the standard AWS variables (what the engine's storage layer reads)
    for the duration of the block; the previous environment is restored afterwards."""
    values = bucket_settings(conn_id)
    saved = {k: os.environ.get(k) for k in (*values, "AWS_ENDPOINT_URL")}
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.update({k: v for k, v in values.items() if v})
    try:
        yield values
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bucket_settings_or_explain(conn_id: str) -> dict[str, str]:
    """:func:`bucket_settings`, but a missing connection raises KeyError saying how to add it."""
    from airflow.exceptions import AirflowNotFoundException

    try:
        return bucket_settings(conn_id)
    except AirflowNotFoundException:
        raise KeyError(
            f"Airflow connection {conn_id!r} (the bucket: [finetune] bucket_conn_id or the operator's bucket_conn_id) "
            f"is not defined; add an aws connection with login/password = access key/secret key and extra "
            f"endpoint_url, e.g. AIRFLOW_CONN_{conn_id.upper()}='{{\"conn_type\": \"aws\", \"login\": ..., \"password\": ..., "
            f"\"extra\": {{\"endpoint_url\": \"http://127.0.0.1:9000\"}}}}'"
        ) from None


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

    def __call__(self, secret: str, key: str) -> str:
        if secret == self.names.bucket and key in BUCKET_KEYS:
            if self._bucket is None:
                self._bucket = bucket_settings_or_explain(self.bucket_conn_id)
            value = self._bucket.get(key)
            if not value:
                field = "login (access key id)" if key.endswith("KEY_ID") else "password (secret access key)"
                raise KeyError(f"Airflow connection {self.bucket_conn_id!r} has no {field}; set it on the connection")
            return value
        if secret == self.names.hf_token and key == "HF_TOKEN":
            token = hf_token(self.hf_conn_id)
            if token is None:
                raise KeyError(f"Airflow connection {self.hf_conn_id!r} ([finetune] hf_conn_id or the operator's hf_conn_id) "
                               "is missing or has no password; put the Hub token in its password")
            return token
        raise KeyError(f"no Airflow connection stands in for Secret {secret!r} on the local runner (known: "
                       f"{self.names.bucket!r} -> {self.bucket_conn_id!r}, {self.names.hf_token!r} -> {self.hf_conn_id!r})")
