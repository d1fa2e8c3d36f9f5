"""The argument checks every operator runs before anything is created: bucket URIs (S3 bucket naming
rules, no '.'/'..' or empty segments), Kubernetes names, image references, MLflow URIs."""

from __future__ import annotations

import pytest

from airflow_provider_finetune import checks
from airflow_provider_finetune.exceptions import FinetuneConfigError


@pytest.mark.parametrize(
    "uri,match",
    [
        ("s3://", "bucket name is empty"),
        ("s3:///models/x", "bucket name is empty"),
        ("s3://bucket/../x", "'.' and '..' are not path segments"),
        ("s3://bucket/models/./x", "'.' and '..' are not path segments"),
        ("s3://bucket/models/..", "'.' and '..' are not path segments"),
        ("s3://bucket", "names no key"),
        ("s3://bucket/", "names no key"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bk/x", "3-63 characters"),
        ("s3://My-Bucket/x", "lowercase letters"),
        ("s3://my_bucket/x", "lowercase letters"),
        ("s3://-bucket/x", "starting and ending with a letter or digit"),
        ("s3://" + "b" * 64 + "/x", "3-63 characters"),
        ("s3://my..bucket/x", "no two adjacent periods"),
        ("s3://192.168.1.10/x", "IP address"),
        ("s3://xn--bucket/x", "does not start with"),
        ("s3://bucket-s3alias/x", "nor end with"),
        ("bucket/models/x", "must be an s3:// URI"),
        ("/models/x", "must be an s3:// URI"),
        ("gs://bucket/x", "must be an s3:// URI"),
        ("s3://bucket/x\nrm", "control characters"),
        (None, "must be an s3:// URI"),
    ],
)
def test_malformed_bucket_uris_are_refused_naming_the_field(uri, match):
    with pytest.raises(FinetuneConfigError, match=match) as err:
        checks.check_bucket_uri("model_uri", uri)
    assert str(err.value).startswith("model_uri ")


@pytest.mark.parametrize(
    "uri,normal",
    [
        ("s3://finetune/models/org/tiny", "s3://finetune/models/org/tiny"),
        ("s3://finetune/models/org/tiny/", "s3://finetune/models/org/tiny"),
        ("s3://my.bucket-1/a/b.c/d..e/x@main", "s3://my.bucket-1/a/b.c/d..e/x@main"),
        ("s3://abc/datasets/chat.jsonl", "s3://abc/datasets/chat.jsonl"),
    ],
)
def test_well_formed_bucket_uris_pass_without_a_trailing_slash(uri, normal):
    assert checks.check_bucket_uri("x", uri) == normal


def test_a_bare_bucket_passes_only_where_no_key_is_needed():
    assert checks.check_bucket_uri("x", "s3://finetune/", need_key=False) == "s3://finetune"
    with pytest.raises(FinetuneConfigError, match="names no key"):
        checks.check_bucket_uri("x", "s3://finetune/")


@pytest.mark.parametrize("good", ["finetune", "ml-team-1", "a", "x" * 63])
def test_valid_namespaces_pass(good):
    checks.check_namespace("namespace", good)


@pytest.mark.parametrize("bad", ["", "Finetune", "fine_tune", "-ns", "ns-", "a.b", "x" * 64, "ns "])
def test_invalid_namespaces_are_refused(bad):
    with pytest.raises(FinetuneConfigError, match="not a valid Kubernetes namespace .DNS-1123 label"):
        checks.check_namespace("namespace", bad)


def test_service_account_names_are_dns_subdomains():
    checks.check_service_account("service_account_name", "airflow-finetune")
    checks.check_service_account("service_account_name", "team.trainer")
    for bad in ("Airflow", "sa_1", "sa..x", ".sa", "x" * 254):
        with pytest.raises(FinetuneConfigError, match="not a valid service account name"):
            checks.check_service_account("service_account_name", bad)


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/airflow-provider-finetune/engine-cuda:0.1.0",
        "engine",
        "localhost:5000/engine:dev",
        "registry.example.com:443/team/engine@sha256:" + "a" * 64,
        "ghcr.io/org/engine:1.0@sha256:" + "0" * 64,
        "[::1]:5000/engine:x",
    ],
)
def test_valid_image_references_pass(image):
    checks.check_image("engine_image", image)


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Ghcr.io/Org/Engine",  # repository paths are lowercase
        "ghcr.io/org/engine:",
        "ghcr.io/org/engine:bad tag",
        "ghcr.io//engine",
        "ghcr.io/org/engine@sha256:abc",  # digest too short
        "ghcr.io/org/engine:" + "t" * 129,
        "https://ghcr.io/org/engine",
    ],
)
def test_malformed_image_references_are_refused(image):
    with pytest.raises(FinetuneConfigError, match="not a valid image reference"):
        checks.check_image("engine_image", image)


def test_mlflow_userinfo_is_stripped_and_a_uri_with_credentials_refused():
    assert checks.strip_userinfo("https://alice:s3cret@mlflow.example.com:5000/x?y=1") == (
        "https://mlflow.example.com:5000/x?y=1"
    )
    assert checks.strip_userinfo("http://mlflow:5000") == "http://mlflow:5000"
    assert checks.strip_userinfo("") == ""
    checks.check_mlflow_uri("[finetune] mlflow_tracking_uri", "http://mlflow.mlflow.svc:5000")
    checks.check_mlflow_uri("[finetune] mlflow_tracking_uri", "")
    with pytest.raises(FinetuneConfigError, match="mlflow_secret_name") as err:
        checks.check_mlflow_uri("[finetune] mlflow_tracking_uri", "https://alice:s3cret@mlflow.example.com")
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value)


def test_integers_are_checked():
    assert checks.check_positive_int("gpus", 2) == 2 and checks.check_positive_int("gpus", "4") == 4
    for bad in (-1, "two", None, 1.5, True):
        with pytest.raises(FinetuneConfigError, match="gpus"):
            checks.check_positive_int("gpus", bad)
