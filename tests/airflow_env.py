"""A throwaway Airflow home wired to the embedded S3 server and the local runner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from airflow_provider_finetune.hooks import bucket_connection_json
from finetune_engine.storage.local_server import ensure_running, stop

BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
VLLM_PY = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"  # scripts/setup-vllm.sh
# [finetune] local_vllm_engine_args of every test that serves: no torch.compile warm-up (~20 s per start)
EAGER_VLLM = {"enforce_eager": True}


def failure_lines(output: str, limit: int = 60) -> str:
    """The lines of an Airflow run that say which task failed and why (errors, tracebacks' last lines)."""
    keep = [
        line
        for line in output.splitlines()
        if re.search(
            r"state=failed|Task failed|\[error|ERROR|Error:|Exception:|FinetuneError|EngineJob", line
        )
    ]
    return "\n".join(keep[-limit:]) or "(none found)"


class AirflowEnv:
    def __init__(self, root: Path, dags_folder: Path):
        self.root = root
        self.s3_dir = root / "s3"
        self.s3 = ensure_running(self.s3_dir)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "FINETUNE_"))}
        self.env = {
            **keep,
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__FINETUNE__RUNNER": "local",
            "AIRFLOW__FINETUNE__LOCAL_WORKDIR": str(root / "work"),
            "AIRFLOW__FINETUNE__BUCKET": self.s3["FINETUNE_BUCKET"],
            "AIRFLOW_CONN_AWS_DEFAULT": bucket_connection_json(self.s3),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.run("db", "migrate")

    def run(
        self, *args: str, timeout: float = 900, check: bool = True, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "airflow"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            out = proc.stdout + proc.stderr
            kept = ARTIFACTS / f"airflow-{args[0]}-{os.getpid()}-{len(list(ARTIFACTS.glob('airflow-*')))}.log"
            ARTIFACTS.mkdir(exist_ok=True)
            kept.write_text(out)
            raise AssertionError(
                f"airflow {' '.join(args)} exited {proc.returncode} (whole output: {kept}).\n"
                f"failed tasks and errors:\n{failure_lines(out)}\n--- tail ---\n{out[-3000:]}"
            )
        return proc

    def bucket_env(self) -> dict[str, str]:
        return dict(self.s3)

    def close(self) -> None:
        stop(self.s3_dir)


class AirflowStandalone(AirflowEnv):
    """``airflow standalone`` (scheduler, DAG processor, API server/UI, triggerer; SQLite,
    LocalExecutor) on a free loopback port, with a known admin password and the REST API."""

    def __init__(self, root: Path, dags_folder: Path, env: dict[str, str] | None = None):
        import secrets
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        root.mkdir(parents=True, exist_ok=True)
        (root / "passwords.json").write_text(json.dumps({"admin": self.password}))
        super().__init__(root, dags_folder)
        self.env.update(
            {
                # standalone starts `airflow` subcommands
                "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                **(env or {}),
            }
        )
        self.proc: subprocess.Popen | None = None
        self._token: str | None = None

    def start(self, timeout: float = 180) -> None:
        import time
        import urllib.request

        self.log = open(self.root / "standalone.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2) as r:
                    health = json.load(r)
                if all(
                    health.get(k, {}).get("status") == "healthy"
                    for k in ("metadatabase", "scheduler", "dag_processor")
                ):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"airflow standalone not healthy within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        return (self.root / "standalone.log").read_bytes()[-n:].decode(errors="replace")

    def token(self) -> str:
        import requests

        if self._token is None:
            r = requests.post(
                f"{self.url}/auth/token", json={"username": "admin", "password": self.password}, timeout=30
            )
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs):
        import requests

        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        return requests.request(
            method, f"{self.url}/api/v2/{path.lstrip('/')}", timeout=60, headers=headers, **kwargs
        )

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Until the DAG processor has parsed the DAG and it has no import error."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.api("GET", f"dags/{dag_id}")
            if r.status_code == 200:
                return
            time.sleep(2)
        errors = self.api("GET", "importErrors").json()
        raise TimeoutError(f"DAG {dag_id} not parsed within {timeout}s; import errors: {errors}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}").json()
            if run.get("state") in ("success", "failed"):
                return run
            time.sleep(3)
        raise TimeoutError(f"{dag_id}/{run_id} not finished within {timeout}s:\n{self.tail()}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for ti in self.api(
            "GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 500}
        ).json()["task_instances"]:
            out.setdefault(ti["task_id"], []).append(ti["state"])
        return out

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        r = self.api(
            "GET",
            f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            params={"map_index": map_index, "deserialize": True},
        )
        r.raise_for_status()
        return r.json()["value"]

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1
    ) -> str:
        r = self.api(
            "GET",
            f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "application/json"},
        )
        r.raise_for_status()
        body = r.json()
        content = body.get("content")
        if isinstance(content, list):
            return "\n".join(json.dumps(c, default=str) if isinstance(c, dict) else str(c) for c in content)
        return str(content)

    def close(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
            self.log.close()
        super().close()
