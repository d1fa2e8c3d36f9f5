"""Hostile bucket contents: keys planted straight into real S3 servers must never write outside the target."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune_engine.manifest import MANIFEST_NAME
from finetune_engine.storage import (
    UnsafeKeyError,
    check_relative_key,
    download_dir,
    join,
    list_objects,
    upload_dir,
)

pytestmark = pytest.mark.s3

# Traversal corpus: '..' components, absolute, drive letter, UNC, backslash and dot forms.
CORPUS = [
    "../x",
    "a/../../x",
    "/abs",
    "C:\\x",
    "C:/x",
    "\\\\server\\share\\x",
    "a\\..\\..\\x",
    "./../x",
    "..\\x",
    "a//b",
    "a/./b",
    "sub/../../../etc/passwd",
    "..",
    "x/..",
    "//double-leading",
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>") for p in root.rglob("*")
    }


def _is_unsafe(rel: str) -> bool:
    try:
        check_relative_key(rel)
        return False
    except UnsafeKeyError:
        return True


def test_planted_object_keys_are_refused_and_nothing_escapes(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "sentinel").write_text("untouched")
    accepted, refused_by_server = {}, []

    def plant(i: int, key: str) -> None:
        try:
            client.put_object(Bucket=bucket, Key=f"p{i}/{key}", Body=b"pwned")
            client.put_object(Bucket=bucket, Key=f"p{i}/ok.txt", Body=b"ok")
        except Exception:  # many servers reject dot segments themselves; ours must not rely on it
            refused_by_server.append(key)
            return
        accepted[key] = sorted(list_objects(f"s3://{bucket}/p{i}"))

    with ThreadPoolExecutor(16) as pool:  # rclone answers a refused key after ~1 s
        list(pool.map(plant, range(len(CORPUS)), CORPUS))
    verbatim_unsafe = 0
    for i, key in enumerate(CORPUS):
        if key not in accepted:
            continue
        uri = f"s3://{bucket}/p{i}"
        before = snapshot(work)
        target = work / f"t{i}" / "inner"
        if any(_is_unsafe(rel) for rel in accepted[key]):
            verbatim_unsafe += 1
            with pytest.raises(UnsafeKeyError, match="refusing"):
                download_dir(uri, target, require_complete=False)
            # The same keys behind a well-formed manifest are refused too.
            files = [
                {
                    "path": rel,
                    "size": 5 if rel != "ok.txt" else 2,
                    "sha256": hashlib.sha256(b"pwned" if rel != "ok.txt" else b"ok").hexdigest(),
                }
                for rel in accepted[key]
            ]
            client.put_object(
                Bucket=bucket,
                Key=f"p{i}/{MANIFEST_NAME}",
                Body=json.dumps({"format": 1, "files": files}).encode(),
            )
            with pytest.raises(UnsafeKeyError):
                download_dir(uri, target)
            assert snapshot(work) == before, key  # not even the target directory was created
        else:  # the server normalised the key into a safe one: it downloads, inside the target
            download_dir(uri, target, require_complete=False)
            after = snapshot(work)
            assert {k for k in after if k not in before} <= {f"t{i}", f"t{i}/inner"} | {
                f"t{i}/inner/{'/'.join(rel.split('/')[:n])}"
                for rel in accepted[key]
                for n in range(1, rel.count("/") + 2)
            }
    assert (work / "sentinel").read_text() == "untouched"
    assert not list(tmp_path.glob("x")) and not (tmp_path / "abs").exists()
    # The test is only meaningful if some hostile keys really reached the bucket verbatim.
    assert verbatim_unsafe >= 1, (s3_env["kind"], accepted, refused_by_server)
    print(
        f"{s3_env['kind']}: server refused {len(refused_by_server)}, stored {len(accepted)} "
        f"({verbatim_unsafe} verbatim unsafe, refused by download_dir)"
    )


def test_manifest_listing_traversal_paths_writes_nothing(s3_env, tmp_path):
    """Every corpus key, named by a manifest (any server stores that): refused before any write."""
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    work = tmp_path / "work"
    work.mkdir()
    for i, key in enumerate(CORPUS):
        files = [
            {"path": "ok.txt", "size": 2, "sha256": hashlib.sha256(b"ok").hexdigest()},
            {"path": key, "size": 2, "sha256": hashlib.sha256(b"ok").hexdigest()},
        ]
        client.put_object(Bucket=bucket, Key=f"evil{i}/ok.txt", Body=b"ok")
        client.put_object(
            Bucket=bucket,
            Key=f"evil{i}/{MANIFEST_NAME}",
            Body=json.dumps({"format": 1, "files": files}).encode(),
        )
        with pytest.raises((UnsafeKeyError, ValueError)):
            download_dir(f"s3://{bucket}/evil{i}", work / f"t{i}")
    assert list(work.iterdir()) == []


def test_percent_encoded_dots_are_literal_names(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    for key in ("%2e%2e/x", "%2e%2e%2fy", "..%2fz"):
        client.put_object(Bucket=bucket, Key=f"enc/{key}", Body=b"literal")
    target = tmp_path / "t"
    download_dir(f"s3://{bucket}/enc", target, require_complete=False)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "%2e%2e%2fy",
        "%2e%2e/x",
        "..%2fz",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_symlink_in_existing_target_cannot_redirect_download(s3_env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.txt").write_text("payload")
    uri = join(s3_env["uri"], "m")
    upload_dir(src, uri)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(outside)
    with pytest.raises(UnsafeKeyError, match="outside"):
        download_dir(uri, target)
    assert list(outside.iterdir()) == []


def test_upload_refuses_symlinks_leaving_the_source(s3_env, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("not yours")
    (tmp_path / "outdir").mkdir()
    uri = join(s3_env["uri"], "m")
    for name, target in (
        ("link.txt", secret),
        ("linkdir", tmp_path / "outdir"),
        ("dangling", tmp_path / "nope"),
    ):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / "a.txt").write_text("a")
        (src / name).symlink_to(target)
        with pytest.raises(UnsafeKeyError, match="points outside"):
            upload_dir(src, uri)
    assert list_objects(uri) == {}
    # A symlink that stays inside the directory is fine (uploaded as the file it points to).
    src = tmp_path / "src-ok"
    src.mkdir()
    (src / "a.txt").write_text("a")
    os.symlink("a.txt", src / "b.txt")
    upload_dir(src, uri)
    assert sorted(list_objects(uri)) == [MANIFEST_NAME, "a.txt", "b.txt"]
