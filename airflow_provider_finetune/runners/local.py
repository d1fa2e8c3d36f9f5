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
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_finetune.pods.spec import XCOM_RESULT_FILE
from finetune_engine.processes import process_start_time

HOST_PATHS = ("/tmp", "/dev/shm")
SecretResolver = Callable[[str, str], str]


class LocalRunError(RuntimeError):
    """The local process could not start or failed.

    ``returncode`` is None when it never started (a setup problem: missing connection, command);
    ``reason`` says why it was stopped (``Killed`` by on_kill, ``DeadlineExceeded``, ``OOMKilled``)
    in the words Kubernetes uses for a container.
    """

    def __init__(
        self, message: str, returncode: int | None = None, tail: str = "", reason: str | None = None
    ):
        self.returncode = returncode
        self.tail = tail
        self.reason = reason
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
    xcom_dir = str(Path(XCOM_RESULT_FILE).parent)
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


def build_env(
    pod: Any, mounts: dict[str, Path], resolve_secret: SecretResolver
) -> tuple[dict[str, str], list[str]]:
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
                    f"env {var.name}: no local value for Kubernetes Secret "
                    f"{ref.name!r} key {ref.key!r}: {err.args[0] if err.args else err}"
                ) from None
            secret_names.append(var.name)
        elif var.value_from.field_ref is not None:
            field = var.value_from.field_ref.field_path
            env[var.name] = {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": pod.metadata.namespace or "default",
            }.get(field, "")
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
            raise LocalRunError(
                f"{first!r} is not installed on this worker; install finetune-engine[train,storage]"
            )
        return [found, *command[1:]]
    return command


def ensure_private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) as this user's, mode 0700; refuse a directory, or a
    parent, that another user owns or could change (group/world-writable without the sticky bit,
    as /tmp has), since its pid file decides which processes get killed. Returns the path."""
    path = Path(path).absolute()
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    _check_owned(path, probe)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise LocalRunError(
                f"cannot create the local work directory {directory}: {err.strerror}; set "
                "[finetune] local_workdir (AIRFLOW__FINETUNE__LOCAL_WORKDIR) to a directory of your own"
            ) from None
    _check_owned(path, path)
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def work_root(configured: str | Path | None = None) -> Path:
    """Where local runs keep their work directories: ``[finetune] local_workdir`` when set (used as
    it is; each run's own directory under it is made private), else ``$TMPDIR/finetune-<uid>``, one
    per user, created private (mode 0700) and refused when another user owns it."""
    if configured:
        return Path(configured).expanduser()
    import tempfile

    return ensure_private_dir(Path(tempfile.gettempdir()) / f"finetune-{os.geteuid()}")


def _check_owned(path: Path, start: Path) -> None:
    """LocalRunError unless ``start`` and its parents are safe: the work directory itself this
    user's, its parents this user's or root's, none writable by others unless sticky."""
    uid = os.geteuid()
    for directory in [start, *start.parents]:
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
            problem = "is a symbolic link of another user"
        else:
            st = os.stat(directory)
            owners = (uid,) if directory == path else (uid, 0)
            if st.st_uid not in owners:
                problem = f"is owned by another user (uid {st.st_uid})"
            elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                problem = "is writable by other users"
            else:
                continue
        raise LocalRunError(
            f"local work directory {path}: {directory} {problem}; set [finetune] local_workdir "
            "(AIRFLOW__FINETUNE__LOCAL_WORKDIR) to a directory of your own"
        )


class LocalRunner:
    """Runs one pod's main container locally; ``kill()`` stops it and its children.

    The command runs under a group leader (``group_leader``) in its own session: ``kill()`` and the
    deadline stop the whole process group, and the group also goes down when the worker process
    dies, even by SIGKILL. A pid file in the work directory lets the next try stop a group a dead
    worker left behind (should one survive) before it starts the engine again.
    """

    PID_FILE = "engine.pid"

    def __init__(
        self,
        workdir: str | Path,
        resolve_secret: SecretResolver,
        log: Callable[[str], None] = print,
        extra_env: dict[str, str] | None = None,
        grace: float = 10.0,
    ):
        self.workdir = Path(workdir)
        self.resolve_secret = resolve_secret
        self.log = log
        self.extra_env = extra_env or {}
        self.grace = grace
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stop_reason: str | None = None

    def run(self, pod: Any, timeout: float | None = None) -> LocalRunResult:
        ensure_private_dir(self.workdir)
        mounts = _mounts(pod, self.workdir)
        container = _container(pod)
        env, secret_names = build_env(pod, mounts, self.resolve_secret)
        argv = [rewrite_paths(a, mounts) for a in [*(container.command or []), *(container.args or [])]]
        if not argv:
            raise LocalRunError(f"pod {pod.metadata.name}: container {container.name} has no command")
        argv = resolve_command(argv)
        xcom_file = mounts[str(Path(XCOM_RESULT_FILE).parent)] / Path(XCOM_RESULT_FILE).name
        xcom_file.unlink(missing_ok=True)
        full_env = {**_inherited_env(), **self.extra_env, **env}
        self.log(f"local runner: {' '.join(argv)}")
        self.log(
            f"local runner: env {sorted(env)} (secrets from connections: "
            f"{sorted(secret_names)}); workdir {self.workdir}"
        )
        self.stop_stale_group()
        leader = [
            sys.executable,
            "-m",
            "airflow_provider_finetune.runners.group_leader",
            "--parent",
            str(os.getpid()),
            "--grace",
            str(self.grace),
            "--",
        ]
        tail: list[str] = []
        oom_before = cgroup_oom_kills()
        with self._lock:
            self._stop_reason = None
            self._proc = subprocess.Popen(
                [*leader, *argv],
                env=full_env,
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
                errors="replace",
                bufsize=1,
            )
            self._write_pid_file(self._proc.pid)
        timer = (
            threading.Timer(timeout, self.kill, kwargs={"reason": "DeadlineExceeded"}) if timeout else None
        )
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
        self._remove_pid_file()
        xcom = json.loads(xcom_file.read_text()) if xcom_file.exists() else None
        if rc != 0:
            reason = self._stop_reason
            if (
                reason is None
                and rc in (-signal.SIGKILL, 137)
                and oom_before is not None
                and (cgroup_oom_kills() or 0) > oom_before
            ):
                reason = "OOMKilled"  # the kernel's OOM killer acted in this cgroup while the engine ran
            how = {
                "Killed": "stopped by on_kill",
                "DeadlineExceeded": f"stopped after active_deadline_seconds={timeout}",
            }
            raise LocalRunError(
                f"pod {pod.metadata.name}: {argv[0]} exited with {rc}"
                + (f" ({how.get(reason, reason)})" if reason else ""),
                rc,
                "\n".join(tail),
                reason,
            )
        return LocalRunResult(rc, xcom, self.workdir)

    def kill(self, grace: float | None = None, reason: str = "Killed") -> None:
        """Stop the run: SIGTERM to the group leader (it stops the group), SIGKILL to the group after
        ``grace``."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            self._stop_reason = self._stop_reason or reason
        grace = self.grace if grace is None else grace
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(grace + 1)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _killpg(proc.pid, signal.SIGKILL)  # stragglers that ignored SIGTERM after their leader exited

    # -- a group a dead worker left behind -----------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        return self.workdir / self.PID_FILE

    def _write_pid_file(self, pid: int) -> None:
        self.pid_file.write_text(json.dumps({"pgid": pid, "start": process_start_time(pid)}))

    def _remove_pid_file(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def stop_stale_group(self) -> bool:
        """Stop the process group recorded by an earlier try, if it still runs and is the one recorded
        (same start time; a pid file without one is not trusted). The work directory is this
        user's own (``ensure_private_dir``), so no other user could have written the pid file."""
        ensure_private_dir(self.workdir)
        try:
            old = json.loads(self.pid_file.read_text())
            pgid, start = int(old["pgid"]), old.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        alive = _group_alive(pgid) and start is not None and process_start_time(pgid) == start
        if alive:
            self.log(
                f"local runner: an earlier try's engine (process group {pgid}) still runs; stopping it first"
            )
            _killpg(pgid, signal.SIGTERM)
            for _ in range(int(self.grace * 10)):
                if not _group_alive(pgid):
                    break
                threading.Event().wait(0.1)
            _killpg(pgid, signal.SIGKILL)
        self._remove_pid_file()
        return alive


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs; zombies (dead, waiting for a reaper) do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat_file in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat_file.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def cgroup_oom_kills() -> int | None:
    """The kernel's OOM-kill count of this process's memory cgroup; None where it cannot be read.

    cgroup v2: ``oom_kill`` in ``memory.events``; v1: ``oom_kill`` in ``memory.oom_control``.
    """
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            candidates += [
                root / "memory" / path.lstrip("/") / "memory.oom_control",
                root / "memory" / "memory.oom_control",
            ]
        elif controllers == "":
            candidates += [root / path.lstrip("/") / "memory.events"]
    for events in candidates:
        try:
            rows = events.read_text().splitlines()
        except OSError:
            continue
        for row in rows:
            key, _, value = row.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _inherited_env() -> dict[str, str]:
    """What a pod would also have: PATH and locale; not the worker's credentials."""
    keep = (
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "PYTHONPATH",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
    )
    return {k: os.environ[k] for k in keep if k in os.environ}
