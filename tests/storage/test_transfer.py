"""Directory transfers against real S3 servers: round trips, completeness, stale local copies, restarts."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from finetune_engine.manifest import MANIFEST_NAME, verify_directory, write_manifest
from finetune_engine.storage import (
    IncompleteError,
    StorageError,
    delete_prefix,
    download_dir,
    download_file,
    exists,
    is_complete,
    join,
    list_complete_children,
    list_objects,
    make_client,
    read_manifest,
    upload_dir,
    upload_file,
)

pytestmark = pytest.mark.s3


def make_tree(root: Path, big_mib: int = 0) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "x.txt").write_text("hello")
    (root / "sub" / "deeper" / "y.bin").write_bytes(os.urandom(300_000))
    (root / "empty.txt").write_bytes(b"")
    if big_mib:
        with open(root / "model.safetensors", "wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(2**20))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def test_round_trip_nested_dir_with_multipart_file(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_S3_MULTIPART_MIB", "64")  # multipart above 64 MiB (default 512)
    src = make_tree(tmp_path / "src", big_mib=70)
    uri = join(s3_env["uri"], "models", "org", "m")
    calls: dict[str, int] = {}
    events = make_client().meta.events

    def count(model, **_):
        calls[model.name] = calls.get(model.name, 0) + 1

    events.register("before-call.s3.*", count)
    try:
        manifest = upload_dir(src, uri)
    finally:
        events.unregister("before-call.s3.*", count)
    assert calls.get("CreateMultipartUpload") == 1 and calls.get("UploadPart") == 2, calls  # 70 MiB = 64 + 6
    assert not (src / MANIFEST_NAME).exists()  # the source directory is not written to
    assert is_complete(uri) and read_manifest(uri)["files"] == manifest["files"]
    assert sorted(list_objects(uri)) == sorted([*tree_bytes(src), MANIFEST_NAME])

    dst = tmp_path / "dst"
    assert download_dir(uri, dst)["files"] == manifest["files"]
    assert tree_bytes(dst) == tree_bytes(src)
    assert verify_directory(dst, check_hashes=True) == (True, "complete")
    assert not (tmp_path / ".dst.partial").exists()
    # A second download keeps the verified files: nothing is rewritten.
    stamp = (dst / "model.safetensors").stat().st_mtime_ns
    download_dir(uri, dst)
    assert (dst / "model.safetensors").stat().st_mtime_ns == stamp


def test_single_put_is_signed_with_the_manifest_sha256(s3_env, tmp_path):
    """Files below the multipart threshold go in one PUT whose signed payload digest is the manifest's
    sha256 (botocore does not read and hash the body a second time)."""
    src = make_tree(tmp_path / "src", big_mib=3)
    uri = join(s3_env["uri"], "signed")
    sent: dict[str, str] = {}
    events = make_client().meta.events

    def capture(request, **_):
        if request.method == "PUT" and "/signed/" in request.url:
            sent[request.url.split("/signed/", 1)[1]] = (
                request.headers["X-Amz-Content-SHA256"].decode()
                if isinstance(request.headers["X-Amz-Content-SHA256"], bytes)
                else request.headers["X-Amz-Content-SHA256"]
            )

    events.register("before-send.s3.PutObject", capture)
    try:
        manifest = upload_dir(src, uri)
    finally:
        events.unregister("before-send.s3.PutObject", capture)
    expected = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert {k: v for k, v in sent.items() if k in expected} == expected
    assert download_dir(uri, tmp_path / "dst")["files"] == manifest["files"]
    assert tree_bytes(tmp_path / "dst") == tree_bytes(src)


def test_existing_local_manifest_is_reused_with_its_extra(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    write_manifest(src, extra={"source": "org/model", "revision": "main"})
    uri = join(s3_env["uri"], "m")
    upload_dir(src, uri)
    assert read_manifest(uri)["extra"] == {"source": "org/model", "revision": "main"}
    # A file changed after the manifest was written: a fresh manifest is computed instead.
    time.sleep(0.01)
    (src / "sub" / "x.txt").write_text("HELLO")
    upload_dir(src, uri)
    remote = {f["path"]: f["sha256"] for f in read_manifest(uri)["files"]}
    assert remote["sub/x.txt"] == hashlib.sha256(b"HELLO").hexdigest()


def test_files_without_manifest_are_refused(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    client.put_object(Bucket=bucket, Key="exp/checkpoint-5/model.safetensors", Body=b"half")
    uri = f"s3://{bucket}/exp/checkpoint-5"
    assert not is_complete(uri) and read_manifest(uri) is None
    with pytest.raises(IncompleteError, match=f"{uri} is not complete.*require_complete=False"):
        download_dir(uri, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging dir
    # Explicitly asking for whatever is there works, but writes no completion marker.
    download_dir(uri, tmp_path / "d", require_complete=False)
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == b"half"
    assert not verify_directory(tmp_path / "d")[0]


def test_malformed_manifest_is_no_manifest(s3_env, tmp_path):
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    client.put_object(Bucket=bucket, Key="m/a.txt", Body=b"a")
    for body in (
        b"{not json",
        b'{"format": 1}',
        b'{"format": 1, "files": [{"path": "a.txt", "size": "1"}]}',
        json.dumps({"format": 99, "files": []}).encode(),
    ):
        client.put_object(Bucket=bucket, Key=f"m/{MANIFEST_NAME}", Body=body)
        assert not is_complete(f"s3://{bucket}/m")
        with pytest.raises(IncompleteError):
            download_dir(f"s3://{bucket}/m", tmp_path / "d")


def test_manifest_naming_a_missing_or_short_object_is_incomplete(s3_env, tmp_path):
    exp = join(s3_env["uri"], "exp")
    for step in (1, 2, 3):
        upload_dir(make_tree(tmp_path / f"src{step}"), join(exp, f"checkpoint-{step}"))
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    client.delete_object(Bucket=bucket, Key="exp/checkpoint-2/sub/x.txt")
    client.put_object(Bucket=bucket, Key="exp/checkpoint-3/sub/x.txt", Body=b"hell")  # truncated
    client.put_object(Bucket=bucket, Key="exp/checkpoint-4/config.json", Body=b"{}")  # still uploading
    assert list_complete_children(exp) == ["checkpoint-1"]
    for step, name in ((2, "missing"), (3, "differ in size")):
        uri = join(exp, f"checkpoint-{step}")
        assert not is_complete(uri)
        with pytest.raises(IncompleteError, match=f"{uri} is not complete.*sub/x.txt"):
            download_dir(uri, tmp_path / f"d{step}")
        assert not (tmp_path / f"d{step}").exists(), name


def test_stale_local_partial_copy_is_not_taken_as_complete(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    uri = join(s3_env["uri"], "m")
    upload_dir(src, uri)
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "x.txt").write_text("hellO")  # same size, wrong content
    (dst / "config.json").write_text('{"a": 1}')  # correct: kept
    (dst / ".y.bin.part-1-2").write_text("leftover temporary")
    (dst / "notes.md").write_text("not ours")  # unrelated file in an existing dir: left alone
    assert not verify_directory(dst)[0]
    download_dir(uri, dst)
    assert verify_directory(dst, check_hashes=True)[0]
    assert (dst / "sub" / "x.txt").read_text() == "hello"
    assert not (dst / ".y.bin.part-1-2").exists() and (dst / "notes.md").exists()
    # A newer version of the prefix replaces files the older local manifest listed.
    (src / "sub" / "x.txt").unlink()
    (src / "new.txt").write_text("new")
    upload_dir(src, uri)
    download_dir(uri, dst)
    assert not (dst / "sub" / "x.txt").exists() and (dst / "new.txt").read_text() == "new"
    assert verify_directory(dst, check_hashes=True)[0]


def test_interrupted_fresh_download_leaves_no_target_and_resumes(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    (src / "z.bin").write_bytes(os.urandom(100_000))
    uri = join(s3_env["uri"], "m")
    upload_dir(src, uri)
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    client.put_object(Bucket=bucket, Key="m/z.bin", Body=os.urandom(100_000))  # same size, other bytes
    dst = tmp_path / "dst"
    with pytest.raises(StorageError, match="m/z.bin: sha256 does not match"):
        download_dir(uri, dst, workers=1)
    assert not dst.exists()  # the partial copy lives only in the hidden sibling
    partial = tmp_path / ".dst.partial"
    assert partial.is_dir() and not (partial / MANIFEST_NAME).exists() and not (partial / "z.bin").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in partial.rglob("*") if p.is_file()}
    client.upload_file(str(src / "z.bin"), bucket, "m/z.bin")  # repaired upstream
    download_dir(uri, dst)
    assert verify_directory(dst, check_hashes=True)[0] and not partial.exists()
    for p in dst.rglob("*"):
        if p.name in kept:
            assert p.stat().st_mtime_ns == kept[p.name]  # resumed, not downloaded again


def test_server_restart_mid_upload_is_retried_to_completion(s3_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(256 * 1024)
    n = 400
    for i in range(n):
        (src / f"shard-{i:04d}.bin").write_bytes(i.to_bytes(4, "big") + block)
    uri = join(s3_env["uri"], "big")
    client, bucket = s3_env["server"].client(), s3_env["bucket"]
    errors: list[BaseException] = []

    def upload():
        try:
            upload_dir(src, uri, workers=4, progress=False)
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    t = threading.Thread(target=upload)
    t.start()
    deadline = time.monotonic() + 60
    while client.list_objects_v2(Bucket=bucket, Prefix="big/").get("KeyCount", 0) < n // 10:
        assert time.monotonic() < deadline and t.is_alive(), errors
        time.sleep(0.01)
    assert t.is_alive() and not exists(join(uri, MANIFEST_NAME))  # the restart really is mid-upload
    port = s3_env["server"].port
    s3_env["server"].restart()
    assert s3_env["server"].port == port
    t.join(180)
    assert not t.is_alive() and not errors, errors
    assert is_complete(uri)
    back = tmp_path / "back"
    download_dir(uri, back)
    assert verify_directory(back, check_hashes=True)[0] and len(list(back.glob("shard-*"))) == n


def test_single_files_exists_and_delete(s3_env, tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"messages": []}\n')
    uri = join(s3_env["uri"], "datasets", "data.jsonl")
    assert not exists(uri)
    upload_file(f, uri)
    assert exists(uri)
    download_file(uri, tmp_path / "out" / "d.jsonl")
    assert (tmp_path / "out" / "d.jsonl").read_text() == f.read_text()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["d.jsonl"]  # no temporary left behind
    prefix = join(s3_env["uri"], "gone")
    upload_dir(make_tree(tmp_path / "s"), prefix)
    assert delete_prefix(prefix) == 4
    assert not is_complete(prefix) and list_objects(prefix) == {}
    with pytest.raises(StorageError, match="s3://.*gone/a.txt"):
        download_file(join(prefix, "a.txt"), tmp_path / "a.txt")


def test_outage_longer_than_botocore_retries_is_ridden_out_per_file(s3_env, tmp_path, monkeypatch, caplog):
    src = make_tree(tmp_path / "src")
    uri = join(s3_env["uri"], "outage")
    monkeypatch.setenv("FINETUNE_S3_MAX_ATTEMPTS", "2")  # botocore gives up within a second
    server = s3_env["server"]
    make_client().list_buckets()
    server.stop()
    restarter = threading.Timer(1.5, server.start)
    restarter.start()
    try:
        with caplog.at_level("WARNING", logger="finetune_engine.storage.transfer"):
            upload_dir(src, uri, workers=2)
    finally:
        restarter.join()
    assert "retrying in" in caplog.text and "cannot reach the S3 endpoint" in caplog.text
    assert is_complete(uri)


@pytest.mark.parametrize("mode", ["bar", "log"])
def test_progress_shows_throughput(s3_env, tmp_path, monkeypatch, capsys, caplog, mode):
    """Big transfers show bytes and MB/s: a tqdm bar on a terminal (forced here), log lines in pods."""
    import logging
    import re

    from finetune_engine.storage import transfer

    monkeypatch.setattr(transfer, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setenv("FINETUNE_PROGRESS", mode)
    monkeypatch.setenv("FINETUNE_PROGRESS_INTERVAL", "0")
    caplog.set_level(logging.INFO, logger="finetune_engine.storage.transfer")
    src = make_tree(tmp_path / "src", big_mib=4)
    uri = join(s3_env["uri"], "progress")
    upload_dir(src, uri)
    download_dir(uri, tmp_path / "dst")
    if mode == "bar":
        err = capsys.readouterr().err
        assert re.search(r"upload s3://\S+progress.*\d+(\.\d+)?[kMG]?B/s", err), err[-500:]
        assert re.search(r"download s3://\S+progress.*\d+(\.\d+)?[kMG]?B/s", err), err[-500:]
    else:
        lines = [r.getMessage() for r in caplog.records if " MiB/s, eta " in r.getMessage()]
        assert any(line.startswith("upload s3://") for line in lines), caplog.text[-800:]
        assert any(line.startswith("download s3://") and "(100%)" in line for line in lines), caplog.text[
            -800:
        ]
        assert all(re.search(r"at \d+\.\d MiB/s", line) for line in lines)


class _ReplacingClient:
    """An S3 client that records every GetObject and, right after the first ranged one answers,
    replaces the object with another version of the same size (a writer racing the download)."""

    def __init__(self, client, bucket: str, key: str, replacement: bytes):
        self._client, self._bucket, self._key, self._replacement = client, bucket, key, replacement
        self.gets: list[dict] = []
        self.replaced = False

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, **kwargs):
        self.gets.append(kwargs)
        response = self._client.get_object(**kwargs)
        if "Range" in kwargs and not self.replaced:
            self.replaced = True
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=self._replacement)
        return response


def test_ranged_download_is_pinned_to_one_version(s3_env, tmp_path, monkeypatch, caplog):
    """Ranges after the first carry If-Match with the object's ETag; an object replaced between
    two ranges is detected (412 where the server checks the condition, the response's ETag where
    it does not: rclone serve s3) and fetched again whole: never two versions stitched together."""
    from finetune_engine.storage import s3

    monkeypatch.setattr(s3, "CHUNK", 64 * 1024)  # 4 ranges for a 256 KiB object
    old, new = os.urandom(256 * 1024), os.urandom(256 * 1024)
    uri = join(s3_env["uri"], "big.bin")
    make_client().put_object(Bucket=s3_env["bucket"], Key="big.bin", Body=old)
    client = _ReplacingClient(make_client(), s3_env["bucket"], "big.bin", new)

    for size in (None, len(old)):  # with a HEAD first, and with the size known from a manifest
        client.replaced, client.gets = False, []
        make_client().put_object(Bucket=s3_env["bucket"], Key="big.bin", Body=old)
        out = tmp_path / f"big-{size}.bin"
        with caplog.at_level("WARNING"):
            assert s3.download_file(uri, out, size=size, client=client) is None
        assert client.replaced and out.read_bytes() == new  # the new version whole, not a mix
        ranged = [g for g in client.gets if "Range" in g]
        assert len(ranged) > 4  # the first pass was abandoned and the object fetched again
        first_etag = ranged[0].get("IfMatch")
        assert all(g.get("IfMatch") for g in ranged[1:]), ranged  # every later range is pinned
        assert first_etag is None or size is None  # without a HEAD the first range pins the version
        assert "changed while it was downloaded" in caplog.text
        assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]


def test_a_download_that_keeps_changing_gives_up_with_a_clear_error(s3_env, tmp_path, monkeypatch):
    from finetune_engine.storage import s3

    monkeypatch.setattr(s3, "CHUNK", 64 * 1024)
    make_client().put_object(Bucket=s3_env["bucket"], Key="hot.bin", Body=os.urandom(200 * 1024))

    # every answer names a new version, as if a writer replaced the object all the time
    monkeypatch.setattr(s3, "_etag", lambda response: f'"{os.urandom(4).hex()}"')
    with pytest.raises(s3.ObjectChangedError, match="changed during 3 downloads in a row"):
        s3.download_file(join(s3_env["uri"], "hot.bin"), tmp_path / "hot.bin")
    assert not list(tmp_path.iterdir())  # nothing partial left


def _node_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """checkpoint-2 as two nodes of a 2-node run leave it: node 0 holds rank 0's files, node 1 its
    own rank's rng state and ZeRO shard."""
    node0 = tmp_path / "node0" / "checkpoint-2"
    node1 = tmp_path / "node1" / "checkpoint-2"
    (node0 / "global_step2").mkdir(parents=True)
    (node1 / "global_step2").mkdir(parents=True)
    (node0 / "trainer_state.json").write_text('{"global_step": 2}')
    (node0 / "rng_state_0.pth").write_bytes(os.urandom(100))
    (node0 / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(500))
    (node1 / "rng_state_1.pth").write_bytes(os.urandom(100))
    (node1 / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(os.urandom(500))
    return node0, node1


def test_every_node_uploads_its_own_files_and_rank_0_writes_the_manifest_last(s3_env, tmp_path):
    from finetune_engine.jobs.train import CheckpointUploader, NodeUploader

    node0, node1 = _node_dirs(tmp_path)
    prefix = join(s3_env["uri"], "experiments", "nodes", "run")
    entries = NodeUploader(prefix)(node1, 2)  # node 1's leader, at the save
    assert sorted(e["path"] for e in entries) == [
        "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_state_1.pth",
    ]
    assert not is_complete(join(prefix, "checkpoint-2"))  # no manifest until rank 0 writes it
    uploader = CheckpointUploader(prefix, tmp_path / "staging", None)
    uploader(node0, 2, node_files=entries)
    uploader.close()
    assert uploader.failures == [] and uploader.uploaded == ["checkpoint-2"]
    listed = sorted(f["path"] for f in read_manifest(join(prefix, "checkpoint-2"))["files"])
    assert listed == sorted(
        [
            "trainer_state.json",
            "rng_state_0.pth",
            "rng_state_1.pth",
            "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    )
    # a resume on any node gets every rank's state back
    download_dir(join(prefix, "checkpoint-2"), tmp_path / "resumed")
    assert (tmp_path / "resumed" / "rng_state_1.pth").read_bytes() == (node1 / "rng_state_1.pth").read_bytes()


def test_a_node_file_missing_in_the_bucket_leaves_the_checkpoint_incomplete(s3_env, tmp_path):
    from finetune_engine.jobs.train import CheckpointUploader

    node0, node1 = _node_dirs(tmp_path)
    prefix = join(s3_env["uri"], "experiments", "nodes", "lost")
    never_uploaded = [{"path": "rng_state_1.pth", "size": 100, "sha256": "0" * 64}]
    uploader = CheckpointUploader(prefix, tmp_path / "staging", None)
    uploader(node0, 2, node_files=never_uploaded)
    uploader.close()
    assert uploader.failures and "missing or truncated on the server" in uploader.failures[0]
    assert read_manifest(join(prefix, "checkpoint-2")) is None
