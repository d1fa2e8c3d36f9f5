"""The storage layer against real S3 servers: round trips, completeness, key safety, restarts."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from finetune_engine.manifest import MANIFEST_NAME, verify_directory
from finetune_engine.storage import (
    IncompleteError,
    StorageError,
    StorageURIError,
    UnsafeKeyError,
    delete_prefix,
    download_dir,
    is_complete,
    join,
    list_complete_children,
    parse_uri,
    safe_local_path,
    upload_dir,
)


def make_tree(root: Path, big_mib: int = 0) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "x.txt").write_text("hello")
    (root / "sub" / "deeper" / "y.bin").write_bytes(os.urandom(300_000))
    if big_mib:
        with open(root / "model.safetensors", "wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(2**20))
    return root


def test_round_trip_with_multipart_file(s3_env, tmp_path):
    src = make_tree(tmp_path / "src", big_mib=70)
    uri = join(s3_env["uri"], "models", "m")
    upload_dir(src, uri)
    assert is_complete(uri)
    dst = tmp_path / "dst"
    download_dir(uri, dst)
    ok, reason = verify_directory(dst, check_hashes=True)
    assert ok, reason
    for rel in ("config.json", "sub/x.txt", "sub/deeper/y.bin", "model.safetensors"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    # A second download keeps verified files and writes nothing new.
    stamp = (dst / "model.safetensors").stat().st_mtime_ns
    download_dir(uri, dst)
    assert (dst / "model.safetensors").stat().st_mtime_ns == stamp


def test_prefix_without_manifest_is_absent(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    client.put_object(Bucket=bucket, Key="exp/checkpoint-5/model.safetensors", Body=b"half")
    uri = f"s3://{bucket}/exp/checkpoint-5"
    assert not is_complete(uri)
    with pytest.raises(IncompleteError, match="not complete"):
        download_dir(uri, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_manifest_naming_a_missing_object_is_incomplete(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    uri = join(s3_env["uri"], "exp", "checkpoint-7")
    upload_dir(src, uri)
    s3_env["server"].client().delete_object(Bucket=s3_env["bucket"], Key="exp/checkpoint-7/sub/x.txt")
    assert not is_complete(uri)
    assert list_complete_children(join(s3_env["uri"], "exp")) == []
    with pytest.raises(IncompleteError, match="missing or differ"):
        download_dir(uri, tmp_path / "d")


def test_local_partial_copy_is_not_complete_and_is_repaired(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    uri = join(s3_env["uri"], "m")
    upload_dir(src, uri)
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "x.txt").write_text("stale content")
    (dst / "leftover.tmp").write_text("junk")
    assert not verify_directory(dst)[0]
    download_dir(uri, dst)
    assert verify_directory(dst, check_hashes=True)[0]
    assert (dst / "sub" / "x.txt").read_text() == "hello" and not (dst / "leftover.tmp").exists()


UNSAFE_KEYS = [
    "../x", "a/../../x", "/abs/path", "C:\\windows\\x", "C:/x", "\\\\server\\share\\x", "a\\..\\..\\x",
    "./../x", "a/./b", "..", "a//b", "sub/../../../etc/passwd", "\x00evil",
]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_refused_locally(tmp_path, key):
    with pytest.raises(UnsafeKeyError):
        safe_local_path(tmp_path / "target", key)


def test_planted_manifest_with_traversal_writes_nothing_outside(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    for i, key in enumerate(UNSAFE_KEYS):
        files = [{"path": "ok.txt", "size": 2, "sha256": "0" * 64}, {"path": key, "size": 2, "sha256": "0" * 64}]
        manifest = {"format": 1, "files": files}
        client.put_object(Bucket=bucket, Key=f"evil{i}/ok.txt", Body=b"ok")
        client.put_object(Bucket=bucket, Key=f"evil{i}/{MANIFEST_NAME}", Body=json.dumps(manifest).encode())
        target = tmp_path / f"t{i}" / "inner"
        with pytest.raises((UnsafeKeyError, IncompleteError)):
            download_dir(f"s3://{bucket}/evil{i}", target)
        assert not target.exists(), key
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_symlink_out_of_the_source_is_refused(s3_env, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("not yours")
    src = make_tree(tmp_path / "src")
    (src / "link.txt").symlink_to(secret)
    with pytest.raises(UnsafeKeyError, match="points outside"):
        upload_dir(src, join(s3_env["uri"], "m"))


def test_uri_parsing():
    assert parse_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_uri("bucket/a") == ("bucket", "a")
    assert join("s3://bkt/x", "checkpoint-1", "f.json") == "s3://bkt/x/checkpoint-1/f.json"
    for bad in ("http://bkt/x", "gs://bkt/x", "file:///x", "s3://B_ad/x", "s3://bkt/../x", "s3://bkt/a\\b", "s3://b/x", ""):
        with pytest.raises(StorageURIError):
            parse_uri(bad)


def test_server_restart_mid_upload_completes(s3_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(150):
        (src / f"f{i:03d}.bin").write_bytes(os.urandom(200_000))
    uri = join(s3_env["uri"], "big")
    errors = []

    def upload():
        try:
            upload_dir(src, uri, workers=4)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(0.3)
    s3_env["server"].restart()
    t.join(240)
    assert not t.is_alive() and not errors, errors
    assert is_complete(uri)
    download_dir(uri, tmp_path / "back")
    assert verify_directory(tmp_path / "back", check_hashes=True)[0]


def test_wrong_credentials_error_names_the_fix_not_the_secret(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-canary-123")
    with pytest.raises(StorageError) as err:
        upload_dir(make_tree(tmp_path / "s"), join(s3_env["uri"], "x"))
    text = str(err.value)
    assert "access key" in text or "denied" in text.lower()
    assert "wrong-secret-canary-123" not in text and s3_env["server"].secret not in text


def test_delete_prefix_removes_marker_first(s3_env, tmp_path):
    uri = join(s3_env["uri"], "gone")
    upload_dir(make_tree(tmp_path / "s"), uri)
    assert delete_prefix(uri) >= 3
    assert not is_complete(uri)
