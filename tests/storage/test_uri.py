"""Bucket URIs and key safety rules (pure functions, no server)."""

from __future__ import annotations

import pytest

from finetune_engine.storage import (
    StorageURIError,
    UnsafeKeyError,
    check_relative_key,
    join,
    parse_uri,
    safe_local_path,
)

# Keys that must never be written: '..' components, absolute, drive letter, UNC, backslash forms.
UNSAFE_KEYS = [
    "../x",
    "a/../../x",
    "/abs/path",
    "C:\\windows\\x",
    "C:/x",
    "c:x",
    "\\\\server\\share\\x",
    "//server/share/x",
    "a\\..\\..\\x",
    "..\\x",
    "./../x",
    "a/./b",
    "..",
    ".",
    "a//b",
    "x/..",
    "sub/../../../etc/passwd",
    "\x00evil",
    "a/b\x00",
    "",
]


def test_parse_uri_forms():
    assert parse_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_uri("S3://bucket/a") == ("bucket", "a")
    assert parse_uri("bucket/a//b") == ("bucket", "a/b")
    assert parse_uri("s3://my.bucket-1") == ("my.bucket-1", "")
    assert parse_uri("bucket") == ("bucket", "")


@pytest.mark.parametrize(
    "uri", ["http://bkt/x", "https://bkt/x", "gs://bkt/x", "file:///x", "hdfs://bkt/x", "c:/bkt/x"]
)
def test_other_schemes_are_refused_with_a_clear_message(uri):
    with pytest.raises(StorageURIError, match="s3://"):
        parse_uri(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://B_ad/x",
        "s3://b/x",
        "s3://-bkt/x",
        "s3://bkt-/x",
        "s3://a..b/x",
        "s3://192.168.1.1/x",
        "s3:///x",
        "s3://" + "b" * 64,
        "",
    ],
)
def test_invalid_bucket_names(uri):
    with pytest.raises(StorageURIError):
        parse_uri(uri)


@pytest.mark.parametrize("uri", ["s3://bkt/../x", "s3://bkt/a/./b", "s3://bkt/a\\b", "s3://bkt/a\x00"])
def test_dot_segments_and_backslashes_in_uris(uri):
    with pytest.raises(StorageURIError):
        parse_uri(uri)


def test_join():
    assert join("s3://bkt/x", "checkpoint-1", "f.json") == "s3://bkt/x/checkpoint-1/f.json"
    assert join("bkt", "a/b/", "/c") == "s3://bkt/a/b/c"
    assert join("s3://bkt/") == "s3://bkt"
    for bad in ("..", "a/../b", "a\\b"):
        with pytest.raises(StorageURIError):
            join("s3://bkt/x", bad)


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(tmp_path, key):
    with pytest.raises(UnsafeKeyError):
        safe_local_path(tmp_path / "target", key)
    with pytest.raises(UnsafeKeyError):
        check_relative_key(key)


@pytest.mark.parametrize("key", ["a", "a/b/c.json", "...", "..a", "a..", "%2e%2e/x", "..%2fx", "a b/c"])
def test_odd_but_safe_keys_stay_inside(tmp_path, key):
    assert (tmp_path / "t").resolve() in safe_local_path(tmp_path / "t", key).parents


def test_symlink_inside_target_cannot_redirect_a_key(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeKeyError, match="outside"):
        safe_local_path(tmp_path / "t", "sub/x")
