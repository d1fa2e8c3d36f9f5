"""SIGTERM on the local runner (what a kill, a pod deletion or a preemption sends): the train job
finishes its step, saves and uploads a checkpoint, exits 143 without final outputs, and the next try
resumes from that checkpoint."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_finetune.pods.pod import build_pod
from airflow_provider_finetune.pods.spec import EngineJobSpec, SecretEnv
from airflow_provider_finetune.runners.local import LocalRunError, LocalRunner
from finetune_engine.storage import join, read_bytes
from tests.storage.conftest import train_config
from tests.storage.test_faults import _complete_steps

pytestmark = [pytest.mark.s3, pytest.mark.slow]
CLI = str(Path(sys.executable).parent / "finetune-engine")
PLANNED = 16


def _pod(s3_env, config: Path, ckpt: str):
    server = s3_env["server"]
    spec = EngineJobSpec(
        name="sigterm",
        image="local",
        command=[CLI, "train-job", "--config", str(config), "--checkpoint-uri", ckpt],
        env={
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
            "FINETUNE_LEASE_SECONDS": "2",
            "FINETUNE_LEASE_SETTLE_SECONDS": "0.1",
        },
        secret_env=[
            SecretEnv("AWS_ACCESS_KEY_ID", "bucket", "AWS_ACCESS_KEY_ID"),
            SecretEnv("AWS_SECRET_ACCESS_KEY", "bucket", "AWS_SECRET_ACCESS_KEY"),
        ],
    )
    keys = {"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret}
    return build_pod(spec), (lambda secret, key: keys[key])


def test_sigterm_saves_a_checkpoint_and_the_next_try_resumes_from_it(s3_env, delivered, tmp_path):
    if s3_env["kind"] != "rclone":
        pytest.skip("the SIGTERM path does not depend on the S3 server: one server (rclone) covers it")
    model_uri, data_uri = delivered
    # no scheduled save before the end: any checkpoint in the bucket is the SIGTERM's
    config = train_config(tmp_path, model_uri, data_uri, max_steps=PLANNED, save_steps=1000)
    ckpt = join(s3_env["uri"], "experiments", "sigterm")
    pod, resolve = _pod(s3_env, config, ckpt)
    lines: list[str] = []
    runner = LocalRunner(tmp_path / "try1", resolve, log=lines.append, grace=120)
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(runner.run(pod, timeout=600))
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcome.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(re.search(r"\bstep [3-9]/", line) for line in lines):
        assert thread.is_alive(), "\n".join(lines[-40:])
        time.sleep(0.05)
    runner.kill(reason="Killed")  # SIGTERM first, SIGKILL only after the grace
    thread.join(300)
    log = "\n".join(lines)
    [err] = outcome
    assert isinstance(err, LocalRunError) and err.returncode == 143, log[-3000:]
    assert "SIGTERM: saving a checkpoint" in log and "stopped by SIGTERM" in log, log[-3000:]
    [saved] = _complete_steps(ckpt)  # the SIGTERM's checkpoint, complete (manifest last)
    assert 3 <= saved < PLANNED
    assert read_bytes(join(ckpt, "result.json")) is None, "a stopped run wrote final outputs"

    # the next try (a new pod: a fresh work directory) resumes from it and finishes
    lines.clear()
    result = LocalRunner(tmp_path / "try2", resolve, log=lines.append).run(pod, timeout=600)
    log = "\n".join(lines)
    assert result.returncode == 0, log[-3000:]
    assert f"checkpoint-{saved}" in log and "resuming" in log, log[-3000:]
    assert f"training: step {saved} of {PLANNED}" in log, log[-3000:]
    assert read_bytes(join(ckpt, "result.json")) is not None
