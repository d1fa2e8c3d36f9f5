"""``finetune-engine pull`` (the vLLM init containers' command) against a real S3 server (rclone):
``--wait-complete`` really waits for the completion marker, then downloads; without it an
incomplete prefix is refused at once; the wait has a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.s3servers import rclone_server

BIN = Path(sys.executable).parent
BUCKET = "pull"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = rclone_server(tmp_path_factory.mktemp("rclone"))
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture()
def env(s3, monkeypatch):
    values = {
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return {**os.environ, **values}


def _model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    return root


def _pull(env, uri, dest, *flags) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "finetune-engine"), "pull", *flags, uri, str(dest)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_wait_complete_waits_for_the_manifest_then_downloads(s3, env, tmp_path):
    from finetune_engine.manifest import MANIFEST_NAME
    from finetune_engine.storage import upload_dir

    src = _model(tmp_path / "src")
    uri = f"s3://{BUCKET}/experiments/e/r/checkpoint-final"
    # the writer is half-way: files are there, the manifest (written last) is not
    s3.client().put_object(
        Bucket=BUCKET,
        Key="experiments/e/r/checkpoint-final/config.json",
        Body=(src / "config.json").read_bytes(),
    )
    dest = tmp_path / "models" / "m"
    proc = _pull(env, uri, dest, "--wait-complete", "--poll", "0.2", "--timeout", "120")
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[0]  # still waiting
        assert not dest.exists() or not any(dest.iterdir())  # and nothing pulled from the incomplete prefix
        upload_dir(src, uri, progress=False)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "waiting for" in out and f"pulled {uri}" in out
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (dest / "config.json").read_text() == (src / "config.json").read_text()
    assert (dest / MANIFEST_NAME).exists()


def test_without_wait_an_incomplete_prefix_is_refused(s3, env, tmp_path):
    s3.client().put_object(Bucket=BUCKET, Key="half/config.json", Body=b"{}")
    t0 = time.monotonic()
    proc = _pull(env, f"s3://{BUCKET}/half", tmp_path / "d")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "is not complete" in out and time.monotonic() - t0 < 30
    assert not (tmp_path / "d").exists()


def test_the_wait_has_a_deadline(s3, env, tmp_path):
    t0 = time.monotonic()
    proc = _pull(
        env, f"s3://{BUCKET}/never", tmp_path / "d", "--wait-complete", "--poll", "0.2", "--timeout", "1.5"
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "is not complete" in out
    assert time.monotonic() - t0 >= 1.5
