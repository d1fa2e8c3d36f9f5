"""Run a built pod's main container as a subprocess on the worker.

The same command and environment the pod would run: volume mounts become directories under a work
directory (paths in the command and env are rewritten), ``secretKeyRef`` values are resolved by a
callback (from Airflow connections), and the XCom file is read back from the same relative path.
Secret values are never logged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

XCOM_PATH = "/airflow/xcom/return.json"
HOST_PATHS = ("/tmp", "/dev/shm")
SecretResolver = Callable[[str, str], str]


class LocalRunError(RuntimeError):
    """The local process could not start or failed; ``returncode`` tells how."""

    def __init__(self, message: str, returncode: int | None = None, tail: str = ""):
        self.returncode = returncode
        self.tail = tail
        super().__init__(message)


@dataclass
class LocalRunResult:
    returncode: int
    xcom: Any
    workdir: Path


def _container(pod: Any) -> Any:
    containers = pod.spec.containers
    base = [c for c in containers if c.name == "base"]
    return base[0] if base else containers[0]


def _mounts(pod: Any, workdir: Path) -> dict[str, Path]:
    """Container mount path -> local directory (one per volume, shared across mounts)."""
    out: dict[str, Path] = {}
    for m in _container(pod).volume_mounts or []:
        if m.mount_path in HOST_PATHS:
            continue  # the worker's own /tmp and /dev/shm serve
        local = workdir / "volumes" / m.name
        if m.sub_path:
            local = local / m.sub_path
        local.mkdir(parents=True, exist_ok=True)
        out[m.mount_path.rstrip("/") or "/"] = local
    xcom_dir = str(Path(XCOM_PATH).parent)
    out.setdefault(xcom_dir, workdir / "xcom")
    out[xcom_dir].mkdir(parents=True, exist_ok=True)
    return out


def rewrite_paths(value: str, mounts: dict[str, Path]) -> str:
    """Map container paths to local ones: '/workdir/x' -> '<workdir>/volumes/scratch/x'."""
    for mount in sorted(mounts, key=len, reverse=True):
        for prefix in ("", "="):
            needle = prefix + mount
            idx = value.find(needle)
            if idx < 0:
                continue
            end = idx + len(needle)
            if (idx == 0 or prefix) and (end == len(value) or value[end] == "/"):
                return value[: idx + len(prefix)] + str(mounts[mount]) + value[end:]
    return value


def build_env(pod: Any, mounts: dict[str, Path], resolve_secret: SecretResolver) -> tuple[dict[str, str], list[str]]:
    """The container env with local paths and resolved secrets; also the names of secret vars."""
    env: dict[str, str] = {}
    secret_names: list[str] = []
    for var in _container(pod).env or []:
        if var.value_from is None:
            env[var.name] = rewrite_paths(var.value or "", mounts)
        elif var.value_from.secret_key_ref is not None:
            ref = var.value_from.secret_key_ref
            try:
                env[var.name] = resolve_secret(ref.name, ref.key)
            except KeyError as err:
                if ref.optional:
                    continue
                raise LocalRunError(
                    f"env {var.name}: no local value for Kubernetes Secret {ref.name!r} key {ref.key!r} ({err}); "
                    "configure the matching Airflow connection"
                ) from None
            secret_names.append(var.name)
        elif var.value_from.field_ref is not None:
            field = var.value_from.field_ref.field_path
            env[var.name] = {"metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace or "default"}.get(field, "")
    return env, secret_names


def resolve_command(command: list[str]) -> list[str]:
    """Prefer executables installed beside this Python (the worker's venv)."""
    first = command[0]
    if "/" not in first:
        beside = Path(sys.executable).parent / first
        if beside.exists():
            return [str(beside), *command[1:]]
        found = shutil.which(first)
        if found is None:
            raise LocalRunError(f"{first!r} is not installed on this worker; install finetune-engine[train,storage]")
        return [found, *command[1:]]
    return command


class LocalRunner:
    """Runs one pod's main container locally; ``kill()`` stops it and its children."""

    def __init__(self, workdir: str | Path, resolve_secret: SecretResolver, log: Callable[[str], None] = print,
                 extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.resolve_secret = resolve_secret
        self.log = log
        self.extra_env = extra_env or {}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, pod: Any, timeout: float | None = None) -> LocalRunResult:
        self.workdir.mkdir(parents=True, exist_ok=True)
        mounts = _mounts(pod, self.workdir)
        container = _container(pod)
        env, secret_names = build_env(pod, mounts, self.resolve_secret)
        argv = [rewrite_paths(a, mounts) for a in [*(container.command or []), *(container.args or [])]]
        if not argv:
            raise LocalRunError(f"pod {pod.metadata.name}: container {container.name} has no command")
        argv = resolve_command(argv)
        xcom_file = mounts[str(Path(XCOM_PATH).parent)] / Path(XCOM_PATH).name
        xcom_file.unlink(missing_ok=True)
        full_env = {**_inherited_env(), **self.extra_env, **env}
        self.log(f"local runner: {' '.join(argv)}")
        self.log(f"local runner: env {sorted(env)} (secrets from connections: {sorted(secret_names)}); workdir {self.workdir}")
        tail: list[str] = []
        with self._lock:
            self._proc = subprocess.Popen(
                argv, env=full_env, cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, text=True, errors="replace", bufsize=1,
            )
        timer = threading.Timer(timeout, self.kill) if timeout else None
        if timer:
            timer.start()
        try:
            assert self._proc.stdout is not None  # noqa: S101 - Popen with PIPE
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                self.log(line)
                tail.append(line)
                del tail[:-50]
            rc = self._proc.wait()
        finally:
            if timer:
                timer.cancel()
        xcom = json.loads(xcom_file.read_text()) if xcom_file.exists() else None
        if rc != 0:
            raise LocalRunError(f"pod {pod.metadata.name}: {argv[0]} exited with {rc}", rc, "\n".join(tail))
        return LocalRunResult(rc, xcom, self.workdir)

    def kill(self, grace: float = 10.0) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _inherited_env() -> dict[str, str]:
    """What a pod would also have: PATH and locale; not the worker's credentials."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keep if k in os.environ}
