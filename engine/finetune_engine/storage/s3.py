"""The S3 client and object operations, configured from the standard environment.

``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``: the same code talks to AWS, MinIO, SeaweedFS or rclone. Path-style
addressing whenever an endpoint is set; retries with backoff for flaky networks and restarts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from finetune_engine.manifest import FORMAT_VERSION, MANIFEST_NAME
from finetune_engine.storage.uri import join, parse_uri

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A bucket operation failed; the message names the URI and what to check."""


class IncompleteError(ValueError):
    """A prefix without a valid completion manifest: treated as absent."""


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.cache
def _client(endpoint: str | None, key_id: str | None, secret_digest: str, region: str, max_attempts: int):
    """Cached per endpoint and credentials (by digest: the secret itself is read from the env)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=config,
        aws_access_key_id=key_id or None,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
    )


def make_client():
    """A thread-safe S3 client for the current environment (cached per endpoint and key id)."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return _client(
        endpoint_url(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        hashlib.sha256(secret.encode()).hexdigest(),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        int(os.environ.get("FINETUNE_S3_MAX_ATTEMPTS", "10")),
    )


def wrap_error(err: Exception, uri: str, action: str) -> Exception:
    """A StorageError naming the URI and the likely fix; never includes credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, NoCredentialsError):
        return StorageError(
            f"{action} {uri}: no bucket credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(the bucket Kubernetes Secret, or the Airflow aws connection's login/password)"
        )
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{action} {uri}: cannot reach the S3 endpoint {endpoint_url() or 'AWS'}; check AWS_ENDPOINT_URL")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(f"{action} {uri}: access denied ({code}); check the bucket access key and secret key")
        if code in ("NoSuchBucket",):
            return StorageError(f"{action} {uri}: the bucket does not exist; create it or fix the URI")
        return StorageError(f"{action} {uri}: {code or 'error'}: {err.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"{action} {uri}: {type(err).__name__}: {err}")


def _call(uri: str, action: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as err:
        raise wrap_error(err, uri, action) from None


def _not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    """True when ``uri`` is an object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_uri(uri)
    try:
        make_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if _not_found(err):
            return False
        raise wrap_error(err, uri, "head") from None
    except BotoCoreError as err:
        raise wrap_error(err, uri, "head") from None


def list_objects(uri: str) -> dict[str, int]:
    """{key relative to the prefix: size} of every object under ``uri/``."""
    bucket, prefix = parse_uri(uri)
    prefix = f"{prefix}/" if prefix else ""
    out: dict[str, int] = {}
    paginator = make_client().get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    for page in pages:
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["Size"]
    return out


def list_children(uri: str) -> list[str]:
    """Names of the immediate 'directories' under ``uri/``."""
    bucket, prefix = parse_uri(uri)
    prefix = f"{prefix}/" if prefix else ""
    paginator = make_client().get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")))
    return sorted(p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))


def read_manifest(uri: str) -> dict | None:
    """The completion manifest of prefix ``uri`` (None when missing or malformed)."""
    bucket, key = parse_uri(join(uri, MANIFEST_NAME))
    client = make_client()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:
        if _not_found(err):
            return None
        raise wrap_error(err, uri, "read manifest of") from None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("files"), list):
        return None
    return data


def is_complete(uri: str) -> bool:
    """A prefix is complete when its manifest exists and every listed object has its size."""
    manifest = read_manifest(uri)
    if manifest is None:
        return False
    objects = list_objects(uri)
    return all(objects.get(f["path"]) == f["size"] for f in manifest["files"])


def list_complete_children(uri: str) -> list[str]:
    """Children of ``uri`` (e.g. checkpoint-N) that are complete."""
    return [name for name in list_children(uri) if is_complete(join(uri, name))]


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri/``; the manifest goes first so readers stop trusting it."""
    bucket, prefix = parse_uri(uri)
    client = make_client()
    manifest_key = f"{prefix}/{MANIFEST_NAME}" if prefix else MANIFEST_NAME
    _call(uri, "delete", client.delete_object, Bucket=bucket, Key=manifest_key)
    keys = [f"{prefix}/{k}" if prefix else k for k in list_objects(uri)]
    for i in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[i : i + 1000]]
        _call(uri, "delete", client.delete_objects, Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(keys)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=64 * 2**20,
        multipart_chunksize=64 * 2**20,
        max_concurrency=8,
        use_threads=True,
    )


def upload_file(path: str | Path, uri: str, callback: Any = None) -> None:
    bucket, key = parse_uri(uri)
    _call(uri, "upload to", make_client().upload_file, str(path), bucket, key, Config=transfer_config(), Callback=callback)


def download_file(uri: str, path: str | Path, callback: Any = None) -> None:
    """Download one object; written to a temporary name and renamed, so no partial file remains."""
    bucket, key = parse_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        _call(uri, "download", make_client().download_file, bucket, key, str(tmp), Config=transfer_config(), Callback=callback)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_bucket(name: str) -> None:
    client = make_client()
    try:
        client.head_bucket(Bucket=name)
    except Exception:
        _call(f"s3://{name}", "create bucket", client.create_bucket, Bucket=name)
