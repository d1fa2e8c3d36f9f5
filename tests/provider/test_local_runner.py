"""The local runner's process handling with real processes: on_kill and the deadline stop the whole
process group, a SIGKILLed worker takes its engine down with it and the retry resumes, a group a
dead worker left behind is stopped before the next try starts, missing connections are named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_finetune.exceptions import EngineJobFailed, FinetuneConfigError
from tests.provider.local_jobs import CommandJob, checkpointing_job, context

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = ["sh", "-c", 'sleep 300 & echo $! > "$FINETUNE_WORKDIR/child.pid"; echo started; wait']


@pytest.fixture(autouse=True)
def local_env(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("AIRFLOW__FINETUNE__") or key.startswith("AIRFLOW_CONN_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIDTEST",
                "password": "secret-test",
                "extra": {"endpoint_url": "http://127.0.0.1:9"},
            }
        ),
    )
    return tmp_path / "runs"


def live_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies waiting for a reaper do not count)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scratch(runs: Path, task_id: str) -> Path:
    [path] = runs.glob(f"*{task_id}*/volumes/scratch")
    return path


def engine_pgid(runs: Path, task_id: str) -> int:
    [pid_file] = runs.glob(f"*{task_id}*/engine.pid")
    return json.loads(pid_file.read_text())["pgid"]


def test_on_kill_stops_the_whole_process_group(local_env):
    op = CommandJob(task_id="sleeper", command=SLEEPER)
    seen: dict[str, int] = {}

    def kill_when_started():
        child = wait_for(
            lambda: next(local_env.glob("*sleeper*/volumes/scratch/child.pid"), None), 30, "the job to start"
        )
        seen["child"] = int(wait_for(lambda: child.read_text().strip(), 5, "the child pid"))
        seen["pgid"] = engine_pgid(local_env, "sleeper")
        op.on_kill()

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    start = time.monotonic()
    with pytest.raises(
        EngineJobFailed,
        match=r"^\[killed\] pod .*exited with -15 \(stopped by on_kill\): stopped from Airflow",
    ) as err:
        op.execute(context("sleeper"))
    killer.join()
    assert err.value.kind == "killed" and time.monotonic() - start < 20
    assert not alive(seen["child"]), "the background child of the job survived on_kill"
    assert live_members(seen["pgid"]) == []
    assert not list(local_env.glob("*sleeper*/engine.pid"))  # a finished try leaves no pid file behind


def test_active_deadline_stops_the_run(local_env):
    op = CommandJob(task_id="slow", command=SLEEPER, active_deadline_seconds=2)
    start = time.monotonic()
    with pytest.raises(
        EngineJobFailed, match=r"^\[deadline\] .*stopped after active_deadline_seconds=2\): ran longer than"
    ) as err:
        op.execute(context("slow"))
    assert 2 <= time.monotonic() - start < 20
    assert err.value.kind == "deadline"  # retried: the next try resumes from checkpoints
    child = int((scratch(local_env, "slow") / "child.pid").read_text())
    assert not alive(child)


def test_missing_bucket_connection_is_named_before_anything_starts(local_env, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT")
    op = CommandJob(task_id="noconn", command=SLEEPER, bucket_conn_id="team_bucket")
    with pytest.raises(
        FinetuneConfigError,
        match=r"Airflow connection 'team_bucket' \(the bucket: \[finetune\] bucket_conn_id "
        r"or the operator's bucket_conn_id\) is not defined.*AIRFLOW_CONN_TEAM_BUCKET",
    ):
        op.execute(context("noconn"))
    # the endpoint set in [finetune]: the secret lookup is what finds the connection missing
    monkeypatch.setenv("AIRFLOW__FINETUNE__BUCKET_ENDPOINT_URL", "http://minio:9000")
    with pytest.raises(
        FinetuneConfigError,
        match=r"^\[setup\] env AWS_ACCESS_KEY_ID: no local value for Kubernetes Secret "
        r"'finetune-bucket' key 'AWS_ACCESS_KEY_ID': Airflow connection 'team_bucket'",
    ):
        op.execute(context("noconn"))
    assert not list(local_env.glob("*noconn*/volumes/scratch/child.pid"))  # nothing ran


def test_worker_death_takes_the_engine_down_and_the_retry_resumes(local_env):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.provider.local_jobs", "1", "400", "0.05"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        progress = wait_for(
            lambda: next(local_env.glob("*resumable*/volumes/scratch/progress.json"), None),
            60,
            "the first step",
        )
        wait_for(lambda: json.loads(progress.read_text())["step"] >= 10, 30, "ten steps")
        pgid = engine_pgid(local_env, "resumable")
        [pids] = [json.loads(p.read_text()) for p in progress.parent.glob("pids-*.json")]
        assert pgid != worker.pid and pgid in live_members(pgid)
        os.kill(worker.pid, signal.SIGKILL)  # the Airflow task process dies without any cleanup
        worker.wait(10)
        wait_for(lambda: not live_members(pgid), 10, "the engine's process group to go after the worker died")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.stdout.close()
    assert not alive(pids["engine"]) and not alive(pids["helper"])
    stopped_at = json.loads(progress.read_text())["step"]
    time.sleep(0.5)
    assert json.loads(progress.read_text())["step"] == stopped_at, "something still advances the job"
    assert 10 <= stopped_at < 400

    # the retry: same task instance, same work directory; the dead try's pid file names a group that is gone
    logs: list[str] = []
    op = checkpointing_job(steps=stopped_at + 5)
    op.log.info = lambda msg, *args: logs.append(msg % args if args else msg)
    result = op.execute(context("resumable", try_number=2))
    assert result == {"status": "completed", "resumed_from": stopped_at, "steps": stopped_at + 5}
    assert f"resuming at step {stopped_at}" in logs
    assert not any("still runs" in line for line in logs)


def test_a_group_left_behind_is_stopped_before_the_next_try(local_env):
    from airflow_provider_finetune.runners.local import LocalRunner
    from finetune_engine.processes import process_start_time

    op = CommandJob(task_id="leftover", command=["sh", "-c", 'echo fresh > "$FINETUNE_WORKDIR/ran"'])
    workdir = op.local_workdir(context("leftover"))
    workdir.mkdir(parents=True)
    # an engine of an earlier try on a platform without parent-death signals: its own group, still running
    stale = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], start_new_session=True)
    try:
        (workdir / LocalRunner.PID_FILE).write_text(
            json.dumps({"pgid": stale.pid, "start": process_start_time(stale.pid)})
        )
        logs: list[str] = []
        op.log.info = lambda msg, *args: logs.append(msg % args if args else msg)
        op.execute(context("leftover", try_number=2))
        stale.wait(5)
    finally:
        if stale.poll() is None:
            os.killpg(stale.pid, signal.SIGKILL)
    assert live_members(stale.pid) == []
    assert any(
        f"an earlier try's engine (process group {stale.pid}) still runs; stopping it first" in ln
        for ln in logs
    )
    assert (scratch(local_env, "leftover") / "ran").read_text() == "fresh\n"


def test_a_reused_pid_is_not_killed(local_env):
    """The pid file also records the start time: an unrelated process that got the pid is left alone."""
    from airflow_provider_finetune.runners.local import LocalRunner

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        runner = LocalRunner(local_env / "reuse", resolve_secret=lambda *_: "x", log=lambda _: None)
        runner.workdir.mkdir(parents=True)
        runner.pid_file.write_text(json.dumps({"pgid": other.pid, "start": "1"}))
        assert runner.stop_stale_group() is False
        assert other.poll() is None and not runner.pid_file.exists()
    finally:
        other.kill()
        other.wait()


def _leader(command: list[str], env: dict[str, str], no_caps: bool = False) -> subprocess.CompletedProcess:
    # with capabilities (root) any process's environment is readable: drop them all, as pods do
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if no_caps and os.geteuid() == 0 else []
    leader = [sys.executable, "-m", "airflow_provider_finetune.runners.group_leader", "--parent"]
    return subprocess.run(
        [*prefix, *leader, str(os.getpid()), "--grace", "1", "--", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,  # as the local runner starts it: the group is the job's alone
    )


def test_the_leader_holding_the_credentials_is_unreadable_to_the_job(tmp_path):
    """A process the engine starts (a data script) cannot read the leader's environment, where
    the bucket keys are."""
    peek = 'import os; print(open(f"/proc/{os.getppid()}/environ", "rb").read())'
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "canary-leader-secret"}
    done = _leader([sys.executable, "-c", peek], env, no_caps=True)
    assert done.returncode == 1 and "PermissionError" in done.stderr, done.stderr
    assert "canary-leader-secret" not in done.stdout + done.stderr


def test_the_leader_kills_what_the_command_left_in_its_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    done = _leader(["sh", "-c", f'sleep 300 & echo $! > "{pid_file}"; exit 3'], dict(os.environ))
    assert done.returncode == 3, done.stderr
    assert "stopped 1 process(es) the command left running" in done.stderr
    child = int(pid_file.read_text())
    wait_for(lambda: not alive(child), 5, "the left-behind sleep to be killed")


def test_work_directories_are_private_and_shared_ones_refused(tmp_path):
    from airflow_provider_finetune.runners.local import LocalRunError, ensure_private_dir

    made = ensure_private_dir(tmp_path / "a" / "b")
    assert made.is_dir()
    assert (made.stat().st_mode & 0o777, made.parent.stat().st_mode & 0o777) == (0o700, 0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a pid file here
    with pytest.raises(
        LocalRunError, match=r"shared is writable by other users; set \[finetune\] local_workdir"
    ):
        ensure_private_dir(shared / "run")
    assert not (shared / "run").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_work_directory_of_another_user_is_refused(tmp_path):
    from airflow_provider_finetune.runners.local import LocalRunError, ensure_private_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(LocalRunError, match=r"foreign is owned by another user \(uid 65534\)"):
        ensure_private_dir(foreign)


def test_a_pid_file_without_a_start_time_is_not_trusted(local_env):
    from airflow_provider_finetune.runners.local import LocalRunner

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        runner = LocalRunner(local_env / "untrusted", resolve_secret=lambda *_: "x", log=lambda _: None)
        runner.workdir.mkdir(parents=True)
        runner.pid_file.write_text(json.dumps({"pgid": other.pid}))
        assert runner.stop_stale_group() is False
        assert other.poll() is None and not runner.pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_the_default_work_root_is_per_user_and_private(tmp_path, monkeypatch):
    """Without [finetune] local_workdir, runs and served models live under $TMPDIR/finetune-<uid>,
    mode 0700: one user's pid files and models are not in another user's reach."""
    from airflow_provider_finetune.operators.deploy import DeployVLLMOperator
    from airflow_provider_finetune.runners.local import LocalRunError

    monkeypatch.delenv("AIRFLOW__FINETUNE__LOCAL_WORKDIR")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # $TMPDIR, as gettempdir() read it
    (tmp_path / "tmp").mkdir()
    root = tmp_path / "tmp" / f"finetune-{os.geteuid()}"
    workdir = CommandJob(task_id="per-user", command=["true"]).local_workdir(context("per-user"))
    assert workdir.parent == root and root.stat().st_mode & 0o777 == 0o700
    served = DeployVLLMOperator(
        task_id="deploy",
        model_uri="s3://finetune/e/r/checkpoint-final",
        served_model_name="tiny",
        runner="local",
    ).local_dir()
    assert served.parent == root / "serving" and served.name.startswith("tiny")
    assert (root / "serving").stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "tmp" / "finetune").exists()  # the old shared root is not used
    # a root someone made writable for all is refused, with the setting that avoids it
    root.chmod(0o777)
    with pytest.raises(LocalRunError, match="writable by other users"):
        CommandJob(task_id="per-user", command=["true"]).local_workdir(context("per-user"))
