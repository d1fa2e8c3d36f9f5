"""The embedded local S3 server used by the demo and the local runner."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from finetune_engine.storage import is_complete, upload_dir
from finetune_engine.storage.local_server import ensure_running, read_env, stop

pytestmark = pytest.mark.s3


def test_start_is_idempotent_keys_are_private_and_stop_works(tmp_path, monkeypatch):
    d = tmp_path / "s3"
    env = ensure_running(d)
    pid = (d / "server.pid").read_text()
    assert ensure_running(d) == env and (d / "server.pid").read_text() == pid
    assert stat.S_IMODE(os.stat(d / "s3.env").st_mode) == 0o600
    assert read_env(d) == env and env["FINETUNE_BUCKET"] == "finetune"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.txt").write_text("x")
    upload_dir(src, "s3://finetune/models/m")
    assert is_complete("s3://finetune/models/m")
    assert (d / "data" / "finetune" / "models" / "m" / "a.txt").read_text() == "x"  # plain files on disk
    assert stop(d) is True and stop(d) is False
    status = subprocess.run([sys.executable, "-m", "finetune_engine.storage.local_server", "status", "--dir", str(d)],
                            capture_output=True, text=True)
    assert status.returncode == 1 and "stopped" in status.stdout
    # restart keeps the keys and the data
    env2 = ensure_running(d)
    assert env2["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    assert is_complete("s3://finetune/models/m")
    stop(d)


def test_wrong_key_is_refused_by_the_server(tmp_path, monkeypatch):
    d = tmp_path / "s3"
    env = ensure_running(d)
    try:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
        from finetune_engine.storage import StorageError, list_objects

        with pytest.raises(StorageError, match="denied|access"):
            list_objects("s3://finetune/models")
    finally:
        stop(d)
