"""Bucket URIs (``s3://bucket/prefix`` or bare ``bucket/prefix``) and safe mapping of keys to local paths."""

from __future__ import annotations

import re
from pathlib import Path

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html (general purpose buckets)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_DRIVE = re.compile(r"^[A-Za-z]:")


class StorageURIError(ValueError):
    """A malformed bucket URI or a scheme other than s3://."""


class UnsafeKeyError(ValueError):
    """An object key (or a symlink) that would read or write outside the directory it belongs to."""


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid S3 bucket name (the one home of the naming rules), or None."""
    if not name:
        return "the bucket name is empty"
    if not _BUCKET.match(name):
        return (
            "a bucket name has 3-63 characters: lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in name or ".-" in name or "-." in name:
        return "a bucket name has no two adjacent periods and no period next to a hyphen"
    if _IP.match(name):
        return "a bucket name is not formatted as an IP address"
    if name.startswith(_BUCKET_PREFIXES) or name.endswith(_BUCKET_SUFFIXES):
        return f"a bucket name does not start with {_BUCKET_PREFIXES} nor end with {_BUCKET_SUFFIXES}"
    return None


def validate_bucket(name: str, uri: str | None = None) -> str:
    where = f"{uri}: " if uri else ""
    problem = bucket_name_problem(name)
    if problem:
        raise StorageURIError(f"{where}{name!r} is not a valid bucket name ({problem})")
    return name


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes at the ends) of ``s3://bucket/prefix`` or ``bucket/prefix``."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageURIError(f"empty bucket URI {uri!r}; expected s3://bucket/prefix")
    rest = uri
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if scheme.lower() != "s3":
            raise StorageURIError(
                f"{uri}: only s3:// URIs are supported (AWS S3, MinIO, SeaweedFS, Ceph, rclone), not "
                f"{scheme}://; point AWS_ENDPOINT_URL at an S3-compatible server instead"
            )
    elif ":" in uri.split("/", 1)[0]:
        raise StorageURIError(f"{uri}: not a bucket URI; expected s3://bucket/prefix")
    bucket, _, key = rest.partition("/")
    validate_bucket(bucket, uri)
    if "\\" in key or "\x00" in key:
        raise StorageURIError(f"{uri}: backslashes and NUL characters are not allowed in bucket paths")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageURIError(f"{uri}: '.' and '..' are not allowed in bucket paths")
    return bucket, "/".join(parts)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/exp", "checkpoint-1", "x.json") == "s3://b/exp/checkpoint-1/x.json"``."""
    bucket, key = parse_uri(uri)
    pieces = [key] if key else []
    for part in parts:
        for piece in part.split("/"):
            if piece in (".", "..") or "\\" in piece or "\x00" in piece:
                raise StorageURIError(
                    f"cannot join {part!r} to {uri}: '.', '..', backslash and NUL are not allowed"
                )
            if piece:
                pieces.append(piece)
    return f"s3://{bucket}/{'/'.join(pieces)}" if pieces else f"s3://{bucket}"


def check_relative_key(key: str) -> str:
    """Raise UnsafeKeyError unless ``key`` is a plain relative POSIX path (no '..', '.', '//', '\\',
    drive, NUL)."""
    parts = key.split("/") if isinstance(key, str) else []
    bad = (
        not isinstance(key, str)
        or not key
        or key.startswith(("/", "\\"))
        or "\\" in key
        or "\x00" in key
        or _DRIVE.match(key) is not None
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        raise UnsafeKeyError(
            f"refusing unsafe object key {key!r}: absolute, drive/UNC/backslash form, or '.'/'..'/empty "
            "components could resolve outside the target directory; remove or rename the object"
        )
    return key


def safe_local_path(root: Path, relative_key: str) -> Path:
    """The local path of ``relative_key`` under ``root``; UnsafeKeyError if it could escape it
    (symlinks too)."""
    check_relative_key(relative_key)
    root = Path(root).resolve()
    target = (root / relative_key).resolve()
    if target == root or root not in target.parents:
        raise UnsafeKeyError(f"refusing object key {relative_key!r}: it resolves to {target}, outside {root}")
    return target
