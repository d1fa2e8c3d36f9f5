"""The S3 client and object operations, configured from the standard environment by default.

``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``: the same code talks to AWS, MinIO, SeaweedFS, Ceph or rclone.
Path-style addressing whenever an endpoint is set; retries with backoff ride out flaky networks and
server restarts. Error messages name the URI and the fix, never a secret.

Every operation also takes ``client=``: a client built by :func:`session_client` from an explicit
boto3 session (role ARN, session token, profile...), for callers that must not touch the process
environment. Without it the client comes from the environment (:func:`make_client`), as in a pod.
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
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "503",
    "500",
}


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


_KNOWN_SHA256 = threading.local()
SIGNATURE_VERSION = "s3v4-finetune"


_PROBE_BODY = b"probe"
_PROBE_SHA256 = hashlib.sha256(_PROBE_BODY).hexdigest()


def _register_signer() -> None:
    """SigV4 for S3 that signs a single PUT with the body's sha256 we already know from the manifest.

    botocore signs payloads over plain http (rclone, MinIO, SeaweedFS in a cluster) by reading and
    hashing the whole body once more before sending it. We hashed every file for its manifest, so the
    upload of a file passes that digest (``upload_file(..., sha256=...)``) and the body is read once;
    the server still checks the signed digest against what it received. Everything else - parts,
    other requests, https where botocore does not sign payloads - behaves exactly like ``s3v4``.

    botocore has no public way to do this, so a signer class it is: ``S3SigV4Auth`` recomputes the
    X-Amz-Content-SHA256 header from ``payload()`` while signing, after every event hook (a
    ``before-sign`` handler's header is overwritten), and ``Config`` only turns payload signing off
    altogether (UNSIGNED-PAYLOAD: the server would no longer check the body). Signers are looked up
    by name in ``botocore.auth.AUTH_TYPE_MAPS``, which ``Config(signature_version=...)`` then selects.
    The class overrides only the public ``payload()`` and asks the standard one which digest it would
    sign, on a small stand-in body, so botocore's own rules (https, checksums, streaming trailers,
    the ``s3`` config) still decide whether the payload is signed at all.
    """
    import botocore.auth

    if SIGNATURE_VERSION in botocore.auth.AUTH_TYPE_MAPS:
        return

    class KnownPayloadS3SigV4Auth(botocore.auth.S3SigV4Auth):
        def payload(self, request):
            known = getattr(_KNOWN_SHA256, "value", None)
            if not known or request.method != "PUT" or "uploadId=" in request.url:
                return super().payload(request)
            data, request.data = request.data, _PROBE_BODY
            try:
                standard = super().payload(request)
            finally:
                request.data = data
            # The stand-in's digest means botocore would hash the body: ours is that digest, already
            # known. Anything else (UNSIGNED-PAYLOAD, a streaming trailer) stays as botocore says.
            return known if standard == _PROBE_SHA256 else standard

    botocore.auth.AUTH_TYPE_MAPS[SIGNATURE_VERSION] = KnownPayloadS3SigV4Auth


def _client_config(endpoint: str | None, max_attempts: int, retry_mode: str):
    """The botocore config of every client: our signer, retries, path-style addressing on an endpoint."""
    from botocore.config import Config

    _register_signer()
    return Config(
        signature_version=SIGNATURE_VERSION,
        retries={"total_max_attempts": max_attempts, "mode": retry_mode},
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=64,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def _retry_settings() -> tuple[int, str]:
    return int(os.environ.get("FINETUNE_S3_MAX_ATTEMPTS", "10")), os.environ.get(
        "FINETUNE_S3_RETRY_MODE", "standard"
    )


@functools.cache
def _client(
    endpoint: str | None,
    key_id: str | None,
    secret_digest: str,
    region_name: str,
    max_attempts: int,
    retry_mode: str,
):
    """Cached per endpoint and credentials (keyed by a digest: the secret itself is read from the env)."""
    import boto3

    config = _client_config(endpoint, max_attempts, retry_mode)
    session = boto3.session.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        region_name=region_name,
    )
    if session.get_credentials() is None:
        raise MissingCredentialsError(
            "no bucket credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL "
            "for MinIO/SeaweedFS/rclone) - in a pod from the "
            "bucket Secret, in Airflow from the aws connection"
        )
    return session.client("s3", endpoint_url=endpoint, config=config)


def make_client():
    """A thread-safe S3 client for the current environment (cached per endpoint and credentials)."""
    key_id = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(key_id) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise MissingCredentialsError(
            f"incomplete bucket credentials: {missing} is not set (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY go together)"
        )
    return _client(
        endpoint_url(),
        key_id,
        hashlib.sha256((secret or "").encode()).hexdigest(),
        region(),
        *_retry_settings(),
    )


def session_client(
    session,
    endpoint: str | None = None,
    region_name: str | None = None,
    verify: bool | str | None = None,
    where: str = "the session",
):
    """A thread-safe S3 client from an explicit boto3 session, configured like :func:`make_client`
    (signer, retries, path-style on an endpoint) but reading no AWS_* variable itself: the session
    holds the credentials. ``where`` names their source in the error when the session has none."""
    if session.get_credentials() is None:
        raise MissingCredentialsError(
            f"no bucket credentials in {where}: give it an access key and secret "
            "(or a role, profile or session token)"
        )
    return session.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region_name or session.region_name or "us-east-1",
        verify=verify,
        config=_client_config(endpoint, *_retry_settings()),
    )


def _use(client):
    """The given client, else the environment's."""
    return client if client is not None else make_client()


def multipart_threshold() -> int:
    """Files up to this size go in one PUT (``$FINETUNE_S3_MULTIPART_MIB``, default 512 MiB; S3 allows 5 GiB).

    One request per file costs the server least (rclone serve s3 spends ~15% more CPU on multipart) and
    lets the manifest's sha256 sign the body; bigger files go in parallel ``CHUNK`` parts, so a retry
    re-sends one part, not the file.
    """
    return int(float(os.environ.get("FINETUNE_S3_MULTIPART_MIB", "512")) * 2**20)


def transfer_config(max_concurrency: int = 8):
    """boto3 managed transfers: multipart above ``multipart_threshold()``, 64 MiB parts, parts in parallel."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=multipart_threshold(),
        multipart_chunksize=CHUNK,
        max_concurrency=max_concurrency,
        use_threads=True,
    )


def _endpoint_of(err: Exception) -> str:
    """The endpoint a botocore connection error names (explicit clients), else the environment's."""
    from urllib.parse import urlsplit

    kwargs = getattr(err, "kwargs", None)
    url = (
        kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    )  # the request's URL: keep the server part
    return (f"{urlsplit(url).scheme}://{urlsplit(url).netloc}" if url else None) or endpoint_url() or "AWS"


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
        return TransientStorageError(
            f"{action} {uri}: cannot reach the S3 endpoint {_endpoint_of(err)} after "
            "retries; check AWS_ENDPOINT_URL and that the server runs"
        )
    if isinstance(err, BotoConnectionError | HTTPClientError):
        return TransientStorageError(
            f"{action} {uri}: connection to {_endpoint_of(err)} failed after retries ({type(err).__name__})"
        )
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(
                f"{action} {uri}: access denied ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY and the key's permissions on the bucket"
            )
        if code == "NoSuchBucket":
            return StorageError(f"{action} {uri}: the bucket does not exist; create it or fix the URI")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or code in _TRANSIENT_CODES:
            return TransientStorageError(
                f"{action} {uri}: the server failed ({code or status}) after retries"
            )
        return StorageError(f"{action} {uri}: {code or 'error'}: {error.get('Message', '')}".rstrip(": "))
    return StorageError(f"{action} {uri}: {type(err).__name__}: {err}")


def _call(uri: str, action: str, fn, *args, **kwargs):
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError, S3UploadFailedError, S3TransferFailedError) as err:
        cause = err.__context__ if isinstance(err, S3UploadFailedError | S3TransferFailedError) else None
        raise wrap_error(
            cause if isinstance(cause, BotoCoreError | ClientError) else err, uri, action
        ) from None


def _not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in (
        "404",
        "NoSuchKey",
        "NotFound",
    )


def exists(uri: str, *, client=None) -> bool:
    """True when ``uri`` names an object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_uri(uri)
    try:
        _use(client).head_object(Bucket=bucket, Key=key)
        return True
    except (BotoCoreError, ClientError) as err:
        if _not_found(err):
            return False
        raise wrap_error(err, uri, "check") from None


def _prefix(key: str) -> str:
    return f"{key}/" if key else ""


def list_objects(uri: str, *, client=None) -> dict[str, int]:
    """{key relative to the prefix: size} of every object under ``uri/``."""
    bucket, key = parse_uri(uri)
    prefix = _prefix(key)
    paginator = _use(client).get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return {obj["Key"][len(prefix) :]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


def list_children(uri: str, *, client=None) -> list[str]:
    """Names of the immediate 'directories' under ``uri/``."""
    bucket, key = parse_uri(uri)
    prefix = _prefix(key)
    paginator = _use(client).get_paginator("list_objects_v2")
    pages = _call(uri, "list", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")))
    return sorted(
        p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])
    )


def parse_manifest(body: bytes) -> dict | None:
    """A manifest dict if ``body`` is a well-formed manifest, else None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT_VERSION
        or not isinstance(data.get("files"), list)
    ):
        return None
    for entry in data["files"]:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and entry["path"] != MANIFEST_NAME
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"]) is not None
        )
        if not ok:
            return None
    return data


def read_manifest(uri: str, *, client=None) -> dict | None:
    """The completion manifest of prefix ``uri`` (None when missing or malformed)."""
    bucket, key = parse_uri(join(uri, MANIFEST_NAME))
    try:
        body = _use(client).get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:
        if _not_found(err):
            return None
        raise wrap_error(err, uri, "read the manifest of") from None
    return parse_manifest(body)


def missing_objects(manifest: dict, objects: dict[str, int]) -> list[str]:
    """Paths the manifest lists that are absent from ``objects`` or have another size."""
    return [f["path"] for f in manifest["files"] if objects.get(f["path"]) != f["size"]]


def is_complete(uri: str, *, client=None) -> bool:
    """A prefix is complete when its manifest exists and every listed object exists with its size."""
    manifest = read_manifest(uri, client=client)
    return manifest is not None and not missing_objects(manifest, list_objects(uri, client=client))


def list_complete_children(uri: str, *, client=None) -> list[str]:
    """Children of ``uri`` (e.g. ``checkpoint-N``) that are complete; one listing plus one GET per
    manifest."""
    objects = list_objects(uri, client=client)
    by_child: dict[str, dict[str, int]] = {}
    for rel, size in objects.items():
        child, sep, rest = rel.partition("/")
        if sep and rest:
            by_child.setdefault(child, {})[rest] = size
    out = []
    for child, files in sorted(by_child.items()):
        if MANIFEST_NAME in files:
            manifest = read_manifest(join(uri, child), client=client)
            if manifest is not None and not missing_objects(manifest, files):
                out.append(child)
    return out


def delete_prefix(uri: str, *, client=None) -> int:
    """Delete every object under ``uri/``; the manifest goes first so readers stop trusting the prefix."""
    bucket, key = parse_uri(uri)
    client = _use(client)
    _call(uri, "delete", client.delete_object, Bucket=bucket, Key=_prefix(key) + MANIFEST_NAME)
    keys = [_prefix(key) + rel for rel in list_objects(uri, client=client)]
    for i in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[i : i + 1000]]
        _call(uri, "delete", client.delete_objects, Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(keys)


class _CountingReader:
    """A file object for put_object that reports bytes read to a progress callback."""

    def __init__(self, f, callback):
        self._f, self._callback = f, callback

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._callback is not None:
            self._callback(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.tell()
        new = self._f.seek(offset, whence)
        if self._callback is not None and new < pos:
            self._callback(new - pos)  # a retry rewinds: take the bytes back
        return new

    def tell(self) -> int:
        return self._f.tell()


def upload_file(
    path: str | Path,
    uri: str,
    callback: Any = None,
    max_concurrency: int = 8,
    sha256: str | None = None,
    *,
    client=None,
) -> None:
    """Upload one file: one PUT up to ``multipart_threshold()`` (signed with ``sha256`` when given, so
    the body is not hashed again), else a managed multipart transfer (parallel parts, retried)."""
    bucket, key = parse_uri(uri)
    size = os.path.getsize(path)
    if size > multipart_threshold():
        _call(
            uri,
            "upload to",
            _use(client).upload_file,
            str(path),
            bucket,
            key,
            Config=transfer_config(max_concurrency),
            Callback=callback,
        )
        return
    _KNOWN_SHA256.value = sha256
    try:
        with open(path, "rb") as f:
            _call(
                uri,
                "upload to",
                _use(client).put_object,
                Bucket=bucket,
                Key=key,
                ContentLength=size,
                Body=_CountingReader(f, callback),
            )
    finally:
        _KNOWN_SHA256.value = None


def put_bytes(uri: str, body: bytes, content_type: str = "application/octet-stream", *, client=None) -> None:
    bucket, key = parse_uri(uri)
    _call(uri, "write", _use(client).put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def read_bytes(uri: str, *, client=None) -> bytes | None:
    """The body of object ``uri`` (a small one: it is held in memory), or None when there is no such
    object."""
    bucket, key = parse_uri(uri)
    try:
        response = _use(client).get_object(Bucket=bucket, Key=key)
    except Exception as err:
        if _not_found(err):
            return None
        raise wrap_error(err, uri, "read") from None
    return _call(uri, "read", response["Body"].read)


READ_BLOCK = 1 << 20


class ObjectChangedError(TransientStorageError):
    """The object was replaced between two ranged GETs of one download (its ETag changed)."""


def _etag(response: dict) -> str | None:
    return response.get("ETag") or None


def _get_range(
    bucket: str,
    key: str,
    uri: str,
    fd: int,
    start: int,
    end: int | None,
    callback: Any,
    digest: Any = None,
    client=None,
    etag: str | None = None,
    expect_size: int | None = None,
) -> tuple[int, str | None]:
    """Stream ``bytes=start-end`` (or the whole object when ``end`` is None) into ``fd`` at its offsets,
    in 1 MiB reads (no per-8-KiB Python overhead), optionally hashing on the way.

    ``etag`` pins the version: the GET carries ``If-Match`` (the server answers 412 for another
    version) and the response's ETag is compared too, for servers that ignore the condition (rclone
    serve s3 does); either way ObjectChangedError, before a byte of this range is written. So is a
    ranged response whose Content-Range names another total than ``expect_size``.
    Returns (bytes written, the response's ETag)."""
    from botocore.exceptions import ClientError

    kwargs: dict[str, Any] = {"Range": f"bytes={start}-{end}"} if end is not None else {}
    if etag:
        kwargs["IfMatch"] = etag
    try:
        resp = _use(client).get_object(Bucket=bucket, Key=key, **kwargs)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if etag and (code in ("PreconditionFailed", "412") or status == 412):
            raise ObjectChangedError(f"download {uri}: the object was replaced during the download") from None
        raise wrap_error(err, uri, "download") from None
    except Exception as err:
        raise wrap_error(err, uri, "download") from None
    body, offset = resp["Body"], start
    got_etag = _etag(resp)
    try:
        if etag and got_etag and got_etag != etag:
            raise ObjectChangedError(f"download {uri}: the object was replaced during the download")
        total = str(resp.get("ContentRange") or "").rpartition("/")[2]
        if expect_size is not None and total.isdigit() and int(total) != expect_size:
            raise ObjectChangedError(f"download {uri}: the object's size changed to {total} bytes")
        while True:
            chunk = _call(uri, "download", body.read, READ_BLOCK)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.pwrite(fd, view, offset + len(chunk) - len(view)) :]
            offset += len(chunk)
            if digest is not None:
                digest.update(chunk)
            if callback is not None:
                callback(len(chunk))
    finally:
        body.close()
    return offset - start, got_etag


CHANGED_ATTEMPTS = 3


def download_file(
    uri: str,
    path: str | Path,
    callback: Any = None,
    max_concurrency: int = 8,
    size: int | None = None,
    *,
    client=None,
) -> str | None:
    """Download one object to ``path`` via a temporary sibling name and a rename: no partial file remains.

    Objects up to ``CHUNK`` come in one streamed GET hashed while it is written, so the sha256 is
    returned without reading the file again; bigger ones come in ``CHUNK`` ranged GETs in parallel,
    written in place (returns None: hash the file if needed). ``size`` skips a HEAD when known.

    The ranged GETs of one download are pinned to one version of the object: its ETag (from the HEAD,
    or the first range's response) goes as ``If-Match`` on every other range and is compared with
    each response. An object replaced mid-download is fetched again whole (up to ``CHANGED_ATTEMPTS``
    times), never stitched together from two versions.
    """
    for attempt in range(1, CHANGED_ATTEMPTS + 1):
        try:
            return _download_file_once(uri, path, callback, max_concurrency, size, client)
        except ObjectChangedError:
            if attempt == CHANGED_ATTEMPTS:
                raise ObjectChangedError(
                    f"download {uri}: the object changed during {CHANGED_ATTEMPTS} downloads in a row; "
                    "retry when nothing writes it"
                ) from None
            log.warning("%s changed while it was downloaded; downloading it again, whole", uri)
            size = None  # the new version's size comes from a fresh HEAD
    raise AssertionError("unreachable")


def _download_file_once(
    uri: str, path: str | Path, callback: Any, max_concurrency: int, size: int | None, client
) -> str | None:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    bucket, key = parse_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
    client = _use(client)
    etag = None
    if size is None:
        head = _call(uri, "download", client.head_object, Bucket=bucket, Key=key)
        size, etag = head["ContentLength"], _etag(head)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size <= CHUNK:
                digest = hashlib.sha256()
                got, _ = _get_range(bucket, key, uri, fd, 0, None, callback, digest, client)
                sha = digest.hexdigest()
            else:
                sha = None
                os.ftruncate(fd, size)
                ranges = [(a, min(a + CHUNK, size) - 1) for a in range(0, size, CHUNK)]
                # the first range pins the version (its ETag) when no HEAD did
                first, etag = _get_range(bucket, key, uri, fd, *ranges[0], callback, None, client, etag, size)
                if not etag:
                    log.warning("%s: no ETag from the server: ranges not pinned to one version", uri)
                with ThreadPoolExecutor(
                    max_workers=max(1, min(max_concurrency, len(ranges))), thread_name_prefix="s3-part"
                ) as pool:
                    parts = [
                        pool.submit(
                            _get_range, bucket, key, uri, fd, a, b, callback, None, client, etag, size
                        )
                        for a, b in ranges[1:]
                    ]
                    got = first + sum(f.result()[0] for f in parts)
        finally:
            os.close(fd)
        if got != size:
            raise TransientStorageError(
                f"download {uri}: got {got} bytes, expected {size}; the transfer was cut "
                "short or the object changed"
            )
        os.replace(tmp, path)
        return sha
    finally:
        tmp.unlink(missing_ok=True)


def ensure_bucket(name: str, *, client=None) -> None:
    """Create bucket ``name`` unless it exists."""
    client = _use(client)
    try:
        client.head_bucket(Bucket=name)
    except Exception as err:
        if not _not_found(err):
            raise wrap_error(err, f"s3://{name}", "check bucket") from None
        _call(f"s3://{name}", "create bucket", client.create_bucket, Bucket=name)
