"""The local vLLM server's pid file: stop_local signals only the process it recorded."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time

import pytest

from airflow_provider_finetune.runners import vllm_local
from airflow_provider_finetune.runners.vllm_local import record_server, stop_local
from finetune_engine.processes import process_start_time
from finetune_engine.processes import ps_start_time as _ps_start_time


@pytest.fixture()
def sleeper():
    proc = subprocess.Popen(
        ["sleep", "600"], start_new_session=True
    )  # a group leader, like start_vllm's server
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_start_time_tells_processes_apart(sleeper):
    here = process_start_time(sleeper.pid)
    assert here and process_start_time(sleeper.pid) == here
    time.sleep(0.05)  # a later start, at least one clock tick (1/100 s) on
    other = subprocess.Popen(["sleep", "600"])
    try:
        assert process_start_time(other.pid) not in (None, here)
    finally:
        other.kill()
        other.wait(10)
    assert process_start_time(other.pid) is None  # reaped: no such process


def test_record_server_writes_pid_and_start_time(tmp_path, sleeper):
    record_server(tmp_path, sleeper.pid)
    assert (
        tmp_path / "server.pid"
    ).read_text() == f"{sleeper.pid}\n"  # the pid alone: kill -- -$(cat server.pid) works
    assert (tmp_path / "server.start").read_text() == f"{process_start_time(sleeper.pid)}\n"


@pytest.mark.parametrize(
    "recorded", ["1\n", "\n", None], ids=["wrong-start-time", "empty-start-time", "no-start-file"]
)
def test_stop_local_refuses_a_pid_that_another_process_reused(tmp_path, sleeper, recorded, caplog):
    (tmp_path / "server.pid").write_text(f"{sleeper.pid}\n")
    if recorded is not None:
        (tmp_path / "server.start").write_text(recorded)
    with caplog.at_level(logging.WARNING):
        assert stop_local(tmp_path) is False
    time.sleep(0.2)
    assert sleeper.poll() is None, "stop_local killed a process it did not start"
    assert (
        not (tmp_path / "server.pid").exists() and not (tmp_path / "server.start").exists()
    )  # stale: removed
    assert f"not stopping pid {sleeper.pid}" in caplog.text and "reused" in caplog.text


def test_stop_local_stops_the_recorded_process(tmp_path, sleeper):
    record_server(tmp_path, sleeper.pid)
    assert stop_local(tmp_path) is True
    assert sleeper.wait(10) is not None
    assert not (tmp_path / "server.pid").exists() and not (tmp_path / "server.start").exists()
    assert stop_local(tmp_path) is False  # nothing recorded any more


@pytest.mark.skipif(
    shutil.which("ps") is None, reason="no ps on this machine: the fallback for systems without /proc"
)
def test_ps_fallback_reads_a_start_time(sleeper):
    assert _ps_start_time(sleeper.pid)  # e.g. "Mon Jan 5 10:00:00 2026"
    assert _ps_start_time(2**22 + 1) is None  # above Linux's pid_max: no such process


def test_one_home_for_the_start_time_helper():
    """The runners use the engine's helper: the local S3 server and vLLM check pids the same way."""
    from airflow_provider_finetune.runners import local

    assert vllm_local.process_start_time is process_start_time
    assert local.process_start_time is process_start_time
    assert not hasattr(vllm_local, "_ps_start_time")
