"""Bucket URIs: ``s3://bucket/prefix`` (or bare ``bucket/prefix``) and safe local key mapping."""

from __future__ import annotations

import re
from pathlib import Path

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageURIError(ValueError):
    pass


class UnsafeKeyError(ValueError):
    """A bucket key that would land outside the target directory."""


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix`` or ``bucket/prefix``."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageURIError(f"empty bucket URI {uri!r}")
    rest = uri
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if scheme != "s3":
            raise StorageURIError(f"{uri}: only s3:// URIs are supported (S3, MinIO, SeaweedFS, Ceph), not {scheme}://")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StorageURIError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    if "\\" in key or "\x00" in key:
        raise StorageURIError(f"{uri}: backslashes and NUL are not allowed in keys")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageURIError(f"{uri}: '.' and '..' are not allowed in bucket paths")
    return bucket, "/".join(parts)


def join(uri: str, *parts: str) -> str:
    bucket, key = parse_uri(uri)
    for part in parts:
        for piece in part.split("/"):
            if piece in (".", ".."):
                raise StorageURIError(f"cannot join {part!r}: '.' and '..' are not allowed")
    tail = "/".join(p.strip("/") for p in (key, *parts) if p and p.strip("/"))
    return f"s3://{bucket}/{tail}" if tail else f"s3://{bucket}"


def safe_local_path(root: Path, relative_key: str) -> Path:
    """The local path of ``relative_key`` under ``root``; UnsafeKeyError if it could escape it."""
    bad = (
        not relative_key
        or relative_key.startswith(("/", "\\"))
        or "\\" in relative_key
        or "\x00" in relative_key
        or re.match(r"^[A-Za-z]:", relative_key) is not None
        or any(p in ("..", ".") for p in relative_key.split("/"))
        or any(p == "" for p in relative_key.split("/")[:-1])
    )
    if bad:
        raise UnsafeKeyError(f"refusing unsafe object key {relative_key!r}: it could resolve outside {root}")
    root = root.resolve()
    target = (root / relative_key).resolve()
    if target != root and root not in target.parents:
        raise UnsafeKeyError(f"refusing object key {relative_key!r}: resolves outside {root}")
    return target
