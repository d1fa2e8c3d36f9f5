"""Real S3 servers for tests: rclone serve s3 and SeaweedFS, on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

from tests.conftest import stop_group

BIN = Path(sys.executable).parent


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS binds gRPC at +10000)."""
    for _ in range(200):
        p = random.randint(20000, 45000)
        if _port_free(p) and _port_free(p + 10000):
            return p
    raise RuntimeError("no free port pair")


@dataclass
class S3Server:
    kind: str
    root: Path
    port: int
    key: str
    secret: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def start(self, timeout: float = 60) -> None:
        log = open(self.root / f"{self.kind}.log", "ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited: {(self.root / f'{self.kind}.log').read_text()[-2000:]}"
                )
            try:
                self.client().list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def rclone_server(root: Path) -> S3Server:
    port = free_port_pair()
    (root / "data").mkdir(parents=True, exist_ok=True)
    key, secret = "rclonekey", "rclone-secret-" + os.urandom(6).hex()
    cmd = [
        str(BIN / "rclone"),
        "serve",
        "s3",
        "--addr",
        f"127.0.0.1:{port}",
        "--auth-key",
        f"{key},{secret}",
        "--config",
        "/dev/null",
        str(root / "data"),
    ]
    return S3Server("rclone", root, port, key, secret, cmd)


def seaweed_server(root: Path) -> S3Server:
    ports = [free_port_pair() for _ in range(6)]
    key, secret = "weedkey", "weed-secret-" + os.urandom(6).hex()
    (root / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    s3, master, volume, filer, iceberg, lance = ports
    cmd = [
        str(BIN / "weed"),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={root / 's3.json'}",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.port={s3}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port.iceberg={iceberg}",
        f"-s3.port.lance={lance}",
        # Each bucket is a collection with volumes of its own. By default the volume count is
        # free disk / volume size (~20 on a small disk), so a session of per-test buckets ran out
        # of volumes and PutObject failed with InternalError. Small volumes, many of them.
        "-master.volumeSizeLimitMB=32",
        "-volume.max=5000",
    ]
    return S3Server("seaweedfs", root, s3, key, secret, cmd, env={"TMPDIR": str(root)})
