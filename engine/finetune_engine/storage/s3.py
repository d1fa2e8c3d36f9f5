"""The S3 client and object operations, configured from the standard environment.

``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``: the same code talks to AWS, MinIO, SeaweedFS, Ceph or rclone.
Path-style addressing whenever an endpoint is set; retries with backoff ride out flaky networks and
server restarts. Error messages name the URI and the fix, never a secret.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from finetune_engine.manifest import FORMAT_VERSION, MANIFEST_NAME
from finetune_engine.storage.uri import join, parse_uri

log = logging.getLogger(__name__)

CHUNK = 64 * 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "503", "500"}


class StorageError(RuntimeError):
    """A bucket operation failed; the message names the URI and what to check."""


class TransientStorageError(StorageError):
    """A network or server-side failure that outlasted botocore's retries; worth retrying later."""


class MissingCredentialsError(StorageError):
    """No bucket credentials in the environment."""


class IncompleteError(ValueError):
    """A prefix without a valid completion manifest (or with objects missing): treated as absent."""


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


@functools.cache
def _client(endpoint: str | None, key_id: str | None, secret_digest: str, region_name: str, max_attempts: int,
            retry_mode: str):
    """Cached per endpoint and credentials (keyed by a digest: the secret itself is read from the env)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": retry_mode},
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=64,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        region_name=region_name,
    )
    if session.get_credentials() is None:
        raise MissingCredentialsError(
            "no bucket credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for "
            "MinIO/SeaweedFS/rclone) - in a pod from the bucket Secret, in Airflow from the aws connection"
        )
    return session.client("s3", endpoint_url=endpoint, config=config)


def make_client():
    """A thread-safe S3 client for the current environment (cached per endpoint and credentials)."""
    key_id = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(key_id) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise MissingCredentialsError(
            f"incomplete bucket credentials: {missing} is not set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "go together)"
        )
    return _client(
        endpoint_url(),
        key_id,
        hashlib.sha256((secret or "").encode()).hexdigest(),
        region(),
        int(os.environ.get("FINETUNE_S3_MAX_ATTEMPTS", "10")),
        os.environ.get("FINETUNE_S3_RETRY_MODE", "standard"),
    )


def transfer_config(max_concurrency: int = 8):
    """boto3 managed transfers: multipart above 64 MiB, 64 MiB parts, parts in parallel."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=CHUNK, multipart_chunksize=CHUNK, max_concurrency=max_concurrency,
                          use_threads=True)


def wrap_error(err: Exception, uri: str, action: str) -> StorageError:
    """A StorageError naming the URI and the likely fix; never includes credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, StorageError):
        return err
    if isinstance(err, NoCredentialsError):
        return MissingCredentialsError(
            f"{action} {uri}: no bucket credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(the bucket Kubernetes Secret, or the Airflow aws connection's login/password)"
        )
    if isinstance(err, EndpointConnectionError):
        return TransientStorageError(f"{action} {uri}: cannot reach the S3 endpoint {endpoint_url() or 'AWS'} after "
                                     "retries; check AWS_ENDPOINT_URL and that the server runs")
    if isinstance(err, BotoConnectionError | HTTPClientError):
        return TransientStorageError(f"{action} {uri}: connection to {endpoint_url() or 'AWS'} failed after retries "
                                     f"({type(err).__name__})")
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(f"{action} {uri}: access denied ({code}); check AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY and the key's permissions on the bucket")
        if code == "NoSuchBucket":
            return StorageError(f"{action} {uri}: the bucket does not exist; create it or fix the URI")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or code in _TRANSIENT_CODES:
            return TransientStorageError(f"{action} {uri}: the server failed ({code or status}) after retries")
        return StorageError(f"{action} {uri}: {code or 'error'}: {error.get('Message', '')}".rstrip(": "))
    return StorageError(f"{action} {uri}: {type(err).__name__}: {err}")


def _call(uri: str, action: str, fn, *args, **kwargs):
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError, S3UploadFailedError, S3TransferFailedError) as err:
        cause = err.__context__ if isinstance(err, S3UploadFailedError | S3TransferFailedError) else None
        raise wrap_error(cause if isinstance(cause, BotoCoreError | ClientError) else err, uri, action) from None


def _not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in (
        "404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    """True when ``uri`` names an object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_uri(uri)
    try:
        make_client().head_object(Bucket=bucket, Key=key)
        return True
    except (BotoCoreError, ClientError) as err:
        if _not_found(err):
            return False
        raise wrap_error(err, uri, "check") from None


def _prefix(key: str) -> str:
    return f"{key}/" if key else ""


def list_objects(uri: str) -> dict[str, int]:
    """{key relative to the prefix: size} of every object under ``uri/``."""
    bucket, key = parse_uri(uri)
    prefix = _prefix(key)
    paginator = make_client().get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return {obj["Key"][len(prefix):]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


def list_children(uri: str) -> list[str]:
    """Names of the immediate 'directories' under ``uri/``."""
    bucket, key = parse_uri(uri)
    prefix = _prefix(key)
    paginator = make_client().get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")))
    return sorted(p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))


def parse_manifest(body: bytes) -> dict | None:
    """A manifest dict if ``body`` is a well-formed manifest, else None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("files"), list):
        return None
    for entry in data["files"]:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and entry["path"] != MANIFEST_NAME
            and isinstance(entry.get("size"), int) and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"]) is not None
        )
        if not ok:
            return None
    return data


def read_manifest(uri: str) -> dict | None:
    """The completion manifest of prefix ``uri`` (None when missing or malformed)."""
    bucket, key = parse_uri(join(uri, MANIFEST_NAME))
    try:
        body = make_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:
        if _not_found(err):
            return None
        raise wrap_error(err, uri, "read the manifest of") from None
    return parse_manifest(body)


def missing_objects(manifest: dict, objects: dict[str, int]) -> list[str]:
    """Paths the manifest lists that are absent from ``objects`` or have another size."""
    return [f["path"] for f in manifest["files"] if objects.get(f["path"]) != f["size"]]


def is_complete(uri: str) -> bool:
    """A prefix is complete when its manifest exists and every listed object exists with its size."""
    manifest = read_manifest(uri)
    return manifest is not None and not missing_objects(manifest, list_objects(uri))


def list_complete_children(uri: str) -> list[str]:
    """Children of ``uri`` (e.g. ``checkpoint-N``) that are complete; one listing plus one GET per manifest."""
    objects = list_objects(uri)
    by_child: dict[str, dict[str, int]] = {}
    for rel, size in objects.items():
        child, sep, rest = rel.partition("/")
        if sep and rest:
            by_child.setdefault(child, {})[rest] = size
    out = []
    for child, files in sorted(by_child.items()):
        if MANIFEST_NAME in files:
            manifest = read_manifest(join(uri, child))
            if manifest is not None and not missing_objects(manifest, files):
                out.append(child)
    return out


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri/``; the manifest goes first so readers stop trusting the prefix."""
    bucket, key = parse_uri(uri)
    client = make_client()
    _call(uri, "delete", client.delete_object, Bucket=bucket, Key=_prefix(key) + MANIFEST_NAME)
    keys = [_prefix(key) + rel for rel in list_objects(uri)]
    for i in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[i : i + 1000]]
        _call(uri, "delete", client.delete_objects, Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(keys)


def upload_file(path: str | Path, uri: str, callback: Any = None, max_concurrency: int = 8) -> None:
    """Upload one file with a managed (multipart above 64 MiB, retried) transfer."""
    bucket, key = parse_uri(uri)
    _call(uri, "upload to", make_client().upload_file, str(path), bucket, key,
          Config=transfer_config(max_concurrency), Callback=callback)


def put_bytes(uri: str, body: bytes, content_type: str = "application/octet-stream") -> None:
    bucket, key = parse_uri(uri)
    _call(uri, "write", make_client().put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def download_file(uri: str, path: str | Path, callback: Any = None, max_concurrency: int = 8) -> None:
    """Download one object to ``path`` via a temporary sibling name and a rename: no partial file remains."""
    bucket, key = parse_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        _call(uri, "download", make_client().download_file, bucket, key, str(tmp),
              Config=transfer_config(max_concurrency), Callback=callback)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_bucket(name: str) -> None:
    """Create bucket ``name`` unless it exists."""
    client = make_client()
    try:
        client.head_bucket(Bucket=name)
    except Exception as err:
        if not _not_found(err):
            raise wrap_error(err, f"s3://{name}", "check bucket") from None
        _call(f"s3://{name}", "create bucket", client.create_bucket, Bucket=name)
