"""Storage tests run against both real servers (rclone serve s3, SeaweedFS)."""

from __future__ import annotations

import pytest

from tests.s3servers import rclone_server, seaweed_server

pytestmark = pytest.mark.s3


@pytest.fixture(scope="session", params=["rclone", "seaweedfs"])
def s3_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    server = (rclone_server if request.param == "rclone" else seaweed_server)(root)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch, request):
    """Environment pointing the engine at the server, with a fresh bucket per test."""
    import hashlib

    bucket = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    s3_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FINETUNE_BUCKET", bucket)
    return {"bucket": bucket, "server": s3_server, "uri": f"s3://{bucket}"}
