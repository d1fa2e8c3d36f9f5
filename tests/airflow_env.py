"""A throwaway Airflow home wired to the embedded S3 server and the local runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_engine.storage.local_server import ensure_running, stop

BIN = Path(sys.executable).parent


class AirflowEnv:
    def __init__(self, root: Path, dags_folder: Path):
        self.root = root
        self.s3_dir = root / "s3"
        self.s3 = ensure_running(self.s3_dir)
        conn = {"conn_type": "aws", "login": self.s3["AWS_ACCESS_KEY_ID"], "password": self.s3["AWS_SECRET_ACCESS_KEY"],
                "extra": {"endpoint_url": self.s3["AWS_ENDPOINT_URL"]}}
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "FINETUNE_"))}
        self.env = {
            **keep,
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__FINETUNE__RUNNER": "local",
            "AIRFLOW__FINETUNE__LOCAL_WORKDIR": str(root / "work"),
            "AIRFLOW__FINETUNE__BUCKET": self.s3["FINETUNE_BUCKET"],
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.run("db", "migrate")

    def run(self, *args: str, timeout: float = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "airflow"), *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def bucket_env(self) -> dict[str, str]:
        return dict(self.s3)

    def close(self) -> None:
        stop(self.s3_dir)
