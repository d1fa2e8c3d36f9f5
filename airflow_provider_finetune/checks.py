"""Checks of operator arguments that must pass before anything is created on the cluster.

Each raises :class:`FinetuneConfigError` naming the argument, the value (never a secret) and the fix.
Templated arguments are checked after rendering, in the operators' ``validate()``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_finetune.exceptions import FinetuneConfigError

# Kubernetes object names: https://kubernetes.io/docs/concepts/overview/working-with-objects/names/
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The image reference grammar of the distribution project (github.com/distribution/reference,
# regexp.go): [domain[:port]/]path[:tag][@digest].
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def bucket_name_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name, or None (the engine's rules: one home)."""
    from finetune_engine.storage.uri import bucket_name_problem as problem

    return problem(bucket)


def check_bucket(field: str, bucket: str) -> None:
    problem = bucket_name_problem(str(bucket or ""))
    if problem:
        raise FinetuneConfigError(f"{field} {bucket!r} is not a valid S3 bucket name: {problem}")


def check_bucket_uri(field: str, uri: Any, *, need_key: bool = True) -> str:
    """``uri`` as ``s3://bucket/key``; refuses other schemes, bad bucket names, ``.``/``..`` or empty
    key segments, control characters, and (``need_key``) a bare bucket. Returns the URI without a
    trailing slash."""
    text = str(uri if uri is not None else "")
    fix = "give a URI like s3://bucket/models/org/name"
    if not text.startswith("s3://"):
        raise FinetuneConfigError(f"{field} {text!r} must be an s3:// URI; {fix}")
    if _CONTROL.search(text):
        raise FinetuneConfigError(f"{field} {text!r} contains control characters (a newline?)")
    bucket, _, key = text[len("s3://") :].partition("/")
    check_bucket(f"{field} {text!r}: bucket", bucket)
    key = key.rstrip("/")
    if need_key and not key:
        raise FinetuneConfigError(f"{field} {text!r} names no key under the bucket; {fix}")
    if key:
        segments = key.split("/")
        if any(s in (".", "..") for s in segments):
            raise FinetuneConfigError(
                f"{field} {text!r}: '.' and '..' are not path segments of a bucket key; write the key out"
            )
        if "" in segments:
            raise FinetuneConfigError(f"{field} {text!r} has an empty path segment ('//')")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def check_namespace(field: str, value: Any) -> None:
    text = str(value or "")
    if not DNS_LABEL.match(text):
        raise FinetuneConfigError(
            f"{field} {text!r} is not a valid Kubernetes namespace (DNS-1123 label: at most 63 lowercase "
            "letters, digits and '-', starting and ending with a letter or digit)"
        )


def check_service_account(field: str, value: Any) -> None:
    text = str(value or "")
    if not DNS_SUBDOMAIN.match(text):
        raise FinetuneConfigError(
            f"{field} {text!r} is not a valid service account name (DNS-1123 subdomain: lowercase "
            "letters, digits, '-' and '.', at most 253 characters)"
        )


def check_image(field: str, value: Any) -> None:
    text = str(value or "")
    if len(text) > 255 or not _IMAGE.match(text):
        raise FinetuneConfigError(
            f"{field} {text!r} is not a valid image reference; use "
            "[registry[:port]/]name[:tag][@sha256:...], e.g. ghcr.io/org/engine-cuda:1.0"
        )


def check_positive_int(field: str, value: Any, *, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise FinetuneConfigError(f"{field} {value!r} is not an integer") from None
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer() or number < minimum:
        raise FinetuneConfigError(f"{field} {value!r}: must be an integer >= {minimum}")
    return number


def strip_userinfo(uri: str | None) -> str:
    """``uri`` without ``user:password@`` (an MLflow URI that is stored or shown never holds them)."""
    if not uri:
        return uri or ""
    try:
        parts = urlsplit(str(uri))
    except ValueError:
        return str(uri)
    if "@" not in parts.netloc:
        return str(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def check_mlflow_uri(field: str, uri: str | None) -> None:
    """A tracking URI with a password in it is refused: the credentials go into a Secret."""
    if not uri:
        return
    try:
        parts = urlsplit(str(uri))
        password = parts.password
    except ValueError:
        raise FinetuneConfigError(f"{field} is not a valid URI") from None
    if password or "@" in parts.netloc:
        raise FinetuneConfigError(
            f"{field} {strip_userinfo(uri)!r} carries credentials (user:password@); remove them from "
            "the URI and put MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) in the Kubernetes Secret named by [finetune] mlflow_secret_name "
            "(local runner: the connection [finetune] mlflow_conn_id)"
        )
