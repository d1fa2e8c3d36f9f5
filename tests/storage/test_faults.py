"""Fault tolerance of the train job: random SIGKILLs (mid-step, mid-save, mid-upload) and MLflow down mid-run.

The kill trials launch many short jobs. Importing torch/transformers/peft costs ~10 s of CPU per
process, so the jobs are forked from one process that imported them once (``_Forker``); each job is
``finetune-engine train-job``'s own ``main`` in a fresh child with its own process group, log and
environment, and is killed with a real SIGKILL of that group. The uninterrupted reference run and
the MLflow test start the ``finetune-engine`` command itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_engine.checkpoints import scan_checkpoints
from finetune_engine.manifest import MANIFEST_NAME, verify_directory
from finetune_engine.storage import (
    download_dir,
    is_complete,
    join,
    list_complete_children,
    list_objects,
)
from tests.conftest import free_port, stop_group, wait_http
from tests.storage.conftest import train_config

pytestmark = pytest.mark.s3
CLI = str(Path(sys.executable).parent / "finetune-engine")
FINAL_OUTPUTS = ("checkpoint-final", "checkpoint-final-adapter", "checkpoint-new-basemodel")


def _job_env(s3_env) -> dict[str, str]:
    server = s3_env["server"]
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONUNBUFFERED": "1",
        # a relaunch takes over the lease of the job it replaces once it sees no renewal (2.5 x 0.4 s)
        "FINETUNE_LEASE_SECONDS": "2",
        "FINETUNE_LEASE_SETTLE_SECONDS": "0.1",
    }


def _complete_steps(ckpt: str) -> list[int]:
    return sorted(
        int(m.group(1)) for n in list_complete_children(ckpt) if (m := re.match(r"^checkpoint-(\d+)$", n))
    )


def _final_structure(ckpt: str) -> dict[str, list[str]]:
    """File lists of the final outputs, the result's keys and the log: what two finished runs share."""
    out = {name: sorted(list_objects(join(ckpt, name))) for name in FINAL_OUTPUTS}
    out["result.json"] = sorted(json.loads(_read_object(join(ckpt, "result.json"))))
    out["logs"] = sorted(list_objects(join(ckpt, "logs")))
    return out


def _read_object(uri: str) -> bytes:
    from finetune_engine.storage import make_client, parse_uri

    bucket, key = parse_uri(uri)
    return make_client().get_object(Bucket=bucket, Key=key)["Body"].read()


# -- forked train jobs --------------------------------------------------------------------------------

_FORKER = r"""
import json, os, sys, traceback
# imported once, shared by every fork
import torch, transformers, peft, accelerate, safetensors.torch  # noqa: F401
import transformers.trainer, torch.optim  # noqa: F401
import finetune_engine.jobs.train, finetune_engine.recipes.sft, finetune_engine.modeling  # noqa: F401
import finetune_engine.data.load, finetune_engine.data.tokenize, finetune_engine.storage  # noqa: F401
from finetune_engine.cli.main import main

out = os.fdopen(os.dup(1), "w")
out.write(json.dumps({"ready": os.getpid()}) + "\n"); out.flush()
for line in sys.stdin:
    req = json.loads(line)
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # exists once the pid is reported
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.setsid()  # its own process group: the kill and the job's own kill hook hit only this job
            os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
            os.environ.clear(); os.environ.update(req["env"])
            rc = main(["train-job", *req["argv"]])
        except SystemExit as err:
            rc = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
    os.close(fd)
    out.write(json.dumps({"pid": pid}) + "\n"); out.flush()
    _, status = os.waitpid(pid, 0)
    out.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n"); out.flush()
"""


class _Forker:
    """One process that imported the engine; ``start`` forks a train job from it, ``returncode`` reaps."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._buf = b""
        self.job: int | None = None
        self._line(300)

    def _line(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the fork server exited with {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        self.job = self._line(60)["pid"]
        return self.job

    def returncode(self, timeout: float | None = 0) -> int | None:
        msg = self._line(timeout)
        if msg is None:
            return None
        self.job = None
        return msg["returncode"]

    def kill_job(self) -> None:
        if self.job is not None:
            try:
                os.killpg(self.job, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.kill_job()
        if self.job is not None:
            self.returncode(30)
        self.proc.stdin.close()
        stop_group(self.proc)


# -- 20 random SIGKILLs -------------------------------------------------------------------------------

PLANNED, SAVE_EVERY, KILLS = 16, 2, 20
STEP_LINE = re.compile(rf"step (\d+)/{PLANNED} \(")
FRESH = {
    "finished": False,
    "local_finished": False,
    "bucket": None,
    "resume": None,
    "incomplete_local": [],
    "cut": None,
}
DOWNLOADED = re.compile(r"resuming: downloading newest complete checkpoint (checkpoint-\d+)")


def _expect_resume(text: str, workdir: Path, expected: dict, seed: int, where: str) -> None:
    """The relaunch log names exactly the checkpoint that was newest and complete at kill time."""
    msg = f"seed {seed}, {where}: expected {expected}\n{text[-4000:]}"
    if expected["finished"]:  # the final outputs were complete in the bucket
        assert "nothing to train" in text, msg
        return
    if expected["local_finished"]:  # ... or only on local disk: the relaunch uploads them
        assert "training already finished, nothing to do" in text, msg
        return
    bucket = expected["bucket"]
    if bucket is None:
        assert "no complete checkpoint under" in text, msg
    # exactly the newest complete bucket checkpoint is downloaded; one cut off mid-upload never is
    assert DOWNLOADED.findall(text) == ([] if bucket is None else [f"checkpoint-{bucket}"]), msg
    assert expected["cut"] is None or expected["cut"] not in DOWNLOADED.findall(text), msg
    for name in expected["incomplete_local"]:
        assert f"ignoring incomplete checkpoint {workdir / 'output' / name} (" in text, msg
    resume = expected["resume"]
    if resume is None:
        assert "starting from step 0" in text and f"training: step 0 of {PLANNED}" in text, msg
    else:
        assert (
            f"resuming from the newest complete checkpoint {workdir / 'output' / f'checkpoint-{resume}'}\n"
            in text
        ), msg
        if resume == PLANNED:  # the last step's checkpoint: finished from, not trained on
            assert (
                f"checkpoint-{resume} already holds step {resume} of {PLANNED} planned: finishing from it"
                in text
            ), msg
            assert "training: step" not in text, msg
        else:
            assert f"training: step {resume} of {PLANNED}" in text, msg
    used = re.findall(r"resuming from the newest complete checkpoint \S*checkpoint-(\d+)", text)
    assert used == ([] if resume is None else [str(resume)]), msg


def _state_after_kill(ckpt: str, workdir: Path, keep: bool) -> dict:
    """What the relaunch must resume from: the newest checkpoint complete in the bucket or, when the
    same workdir is reused, on local disk - judged from what is there now that the job is dead."""
    bucket = _complete_steps(ckpt)
    scan = scan_checkpoints(workdir / "output") if keep else None  # read-only: nothing is removed
    local = [step for step, _ in scan.complete] if scan else []
    newest = max(bucket[-1:] + local[-1:], default=None)
    output = workdir / "output"
    return {
        "finished": is_complete(join(ckpt, "checkpoint-final")),
        "local_finished": keep
        and verify_directory(output / "checkpoint-final")[0]
        and (output / "result.json").exists(),
        "bucket": bucket[-1] if bucket else None,
        "resume": newest,
        "incomplete_local": sorted(path.name for path, _ in scan.incomplete) if scan else [],
        "cut": None,  # set by the caller after a mid-upload kill: the checkpoint cut off
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("s3_server", ["rclone"], indirect=True)
def test_twenty_random_sigkills_all_finish_at_the_planned_step(s3_env, delivered, tmp_path):
    """20 SIGKILLs of train jobs, each one of: mid-step (at a random moment after a random step line),
    mid-save (while a checkpoint directory exists without its manifest), mid-upload (the uploader's
    FINETUNE_TEST_KILL_AT hook, after M objects of its K-th upload). Killed jobs are relaunched, in the
    same workdir (a container restart: always after a mid-save kill) or a fresh one (a new pod), until
    they finish; then the next run starts. Every relaunch resumes from the checkpoint that was newest
    and complete at kill time (bucket or local) - its log names it, training restarts at its step and
    the result records it - never an incomplete one nor one cut off mid-upload; after every mid-upload
    kill each remote checkpoint that reads as complete downloads and verifies; every run ends at the
    planned step with the same final outputs as an uninterrupted run."""
    seed = int(os.environ.get("FINETUNE_TEST_SEED") or random.SystemRandom().randrange(10**6))
    print(f"kill trials: seed {seed} (set FINETUNE_TEST_SEED={seed} to replay the same plan)")
    rng = random.Random(seed)
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri, max_steps=PLANNED, save_steps=SAVE_EVERY)
    env = _job_env(s3_env)
    base = join(s3_env["uri"], "experiments", "faults")

    # the uninterrupted reference, through the command itself
    ref = join(base, "reference")
    ref_result = tmp_path / "reference.json"
    proc = subprocess.run(
        [
            CLI,
            "train-job",
            "--config",
            str(config),
            "--checkpoint-uri",
            ref,
            "--workdir",
            str(tmp_path / "wref"),
            "--result-file",
            str(ref_result),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(ref_result.read_text())["global_step"] == PLANNED
    reference = _final_structure(ref)
    assert all(reference[name] for name in FINAL_OUTPUTS)

    kinds = ["step"] * 7 + ["save"] * 7 + ["upload"] * 6
    rng.shuffle(kinds)
    forker = _Forker(env)
    landed: list[str] = []  # where each kill landed
    finished_runs: list[tuple[str, int]] = []  # (checkpoint uri, kills in its life)
    run, kills_in_run, launch = 0, 0, 0
    expected = dict(FRESH)
    workdir = tmp_path / "w0"
    try:
        while True:
            ckpt = join(base, f"run-{run}")
            kind = kinds[len(landed)] if len(landed) < KILLS else None
            launch += 1
            assert launch <= 80, f"seed {seed}: no progress after {launch} launches ({landed})"
            log_path = tmp_path / f"launch-{launch:02d}.log"
            result_file = tmp_path / f"result-{launch:02d}.json"
            job_env = dict(env)
            resume_at = expected["resume"] or 0
            if kind == "upload":
                job_env["FINETUNE_TEST_KILL_AT"] = f"{rng.randint(1, 2)}:{rng.randint(1, 9)}"
            target_step = min(PLANNED, resume_at + rng.randint(1, 3))
            # a save of this launch: past the resume point and any half-written leftover, never the download
            floor = max([resume_at] + [int(name.split("-")[1]) for name in expected["incomplete_local"]])
            target_save = min(PLANNED, floor + SAVE_EVERY * rng.randint(1, 2))
            delay = rng.uniform(0.0, 0.6)
            forker.start(
                [
                    "--config",
                    str(config),
                    "--checkpoint-uri",
                    ckpt,
                    "--workdir",
                    str(workdir),
                    "--result-file",
                    str(result_file),
                ],
                job_env,
                log_path,
            )
            rc, killed_by_test = None, False
            deadline = time.monotonic() + 300
            save_dir = workdir / "output" / f"checkpoint-{target_save}"
            watch_save = kind == "save" and target_save > floor
            while rc is None:
                assert time.monotonic() < deadline, (
                    f"seed {seed}: launch {launch} hangs\n{log_path.read_text()[-3000:]}"
                )
                if watch_save and not killed_by_test:
                    if save_dir.is_dir() and not (save_dir / MANIFEST_NAME).exists():
                        forker.kill_job()
                        killed_by_test = True
                    rc = forker.returncode(0.002)
                    continue
                if kind == "step" and not killed_by_test:
                    text = log_path.read_text(errors="replace")
                    steps = [int(s) for s in STEP_LINE.findall(text)]
                    if steps and max(steps) >= target_step:
                        time.sleep(delay)
                        forker.kill_job()
                        killed_by_test = True
                rc = forker.returncode(0.05)
            text = log_path.read_text(errors="replace")
            _expect_resume(text, workdir, expected, seed, f"launch {launch}")

            if rc == 0:  # the run finished before a kill (or after the last one)
                result = json.loads(result_file.read_text())
                assert result["global_step"] == PLANNED, (
                    f"seed {seed}: launch {launch} (resumed from {result.get('resumed_from')}) ended at step "
                    f"{result['global_step']}, planned {PLANNED}\n{text[-3000:]}"
                )
                assert result["status"] in ("completed", "skipped"), result
                if result["status"] == "completed" and not expected["local_finished"]:
                    resumed = None if expected["resume"] is None else f"checkpoint-{expected['resume']}"
                    assert result["resumed_from"] == resumed, (
                        f"seed {seed}: launch {launch}: {result}, expected {expected}"
                    )
                stored = json.loads(_read_object(join(ckpt, "result.json")))
                assert stored["global_step"] == PLANNED and stored["planned_steps"] == PLANNED, stored
                assert all(is_complete(join(ckpt, name)) for name in FINAL_OUTPUTS), ckpt
                assert _final_structure(ckpt) == reference, (
                    f"seed {seed}: {ckpt} differs from the reference run"
                )
                for step in _complete_steps(
                    ckpt
                ):  # whatever reads as complete downloads and verifies (sha256)
                    download_dir(
                        join(ckpt, f"checkpoint-{step}"),
                        tmp_path / "verify" / f"run-{run}" / f"checkpoint-{step}",
                    )
                finished_runs.append((ckpt, kills_in_run))
                if len(landed) >= KILLS:
                    break
                run, kills_in_run = run + 1, 0
                workdir = tmp_path / f"w-run{run}-{launch}"
                expected = dict(FRESH)
                continue

            assert rc == -signal.SIGKILL, f"seed {seed}: launch {launch} exited with {rc}\n{text[-3000:]}"
            if kind == "upload":
                k, m = job_env["FINETUNE_TEST_KILL_AT"].split(":")
                hit = re.search(
                    rf"FINETUNE_TEST_KILL_AT={k}:{m}: {m} objects of (checkpoint-\d+) stored; SIGKILL", text
                )
                assert hit, f"seed {seed}: launch {launch} was killed elsewhere\n{text[-3000:]}"
                cut = join(ckpt, hit.group(1))
                assert list_objects(cut) and not is_complete(cut), "the kill must land mid-upload"
                # the uploader only ever uploads checkpoints newer than the bucket's newest complete one
                assert int(hit.group(1).split("-")[1]) > (expected["bucket"] or 0), (hit.group(1), expected)
                for step in _complete_steps(
                    ckpt
                ):  # what reads as complete now downloads and verifies (sha256)
                    download_dir(
                        join(ckpt, f"checkpoint-{step}"),
                        tmp_path / "verify" / f"launch-{launch}" / f"checkpoint-{step}",
                    )
                where = "upload"
            elif kind == "save":
                complete, _ = verify_directory(save_dir)
                where = "step" if complete else "save"  # a save that finished first counts as a mid-step kill
            else:
                where = "step"
            landed.append(where)
            kills_in_run += 1
            keep = where == "save" or rng.random() < 0.3
            if not keep:
                workdir = tmp_path / f"w-run{run}-{launch}"
            expected = _state_after_kill(ckpt, workdir, keep)
            if where == "upload":
                expected["cut"] = hit.group(1)
            if where == "save":
                assert save_dir.name in expected["incomplete_local"], expected
            print(
                f"launch {launch}: {ckpt.rsplit('/', 1)[-1]} killed {where} (planned {kind}); relaunch "
                f"{'in the same' if keep else 'in a fresh'} workdir resumes from {expected['resume']}"
            )
    finally:
        forker.close()

    print(
        f"seed {seed}: kills landed {dict((k, landed.count(k)) for k in ('step', 'save', 'upload'))}; "
        f"runs finished {[(c.rsplit('/', 1)[-1], n) for c, n in finished_runs]}; {launch} launches"
    )
    assert len(landed) == KILLS and sum(n for _, n in finished_runs) == KILLS
    assert landed.count("upload") == kinds.count("upload")
    assert landed.count("save") >= kinds.count("save") // 2, (
        f"seed {seed}: too few kills landed mid-save: {landed}"
    )


@pytest.mark.parametrize("s3_server", ["rclone"], indirect=True)
def test_resume_from_the_last_steps_checkpoint_trains_no_extra_step(s3_env, delivered, tmp_path):
    """A kill after the final step's checkpoint is complete in the bucket but before the final outputs
    are: the relaunch must finish at the planned step from that checkpoint, not train past it."""
    from finetune_engine.jobs.train import main as train_job
    from finetune_engine.storage import upload_dir

    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri, max_steps=4, save_steps=2)
    done, cut = (
        join(s3_env["uri"], "experiments", "last", "done"),
        join(s3_env["uri"], "experiments", "last", "cut"),
    )
    assert (
        train_job(["--config", str(config), "--checkpoint-uri", done, "--workdir", str(tmp_path / "w1")]) == 0
    )
    # the bucket as a kill right after checkpoint-4's upload leaves it: no final outputs yet
    download_dir(join(done, "checkpoint-4"), tmp_path / "copy")
    upload_dir(tmp_path / "copy", join(cut, "checkpoint-4"))
    result_file = tmp_path / "result.json"
    assert (
        train_job(
            [
                "--config",
                str(config),
                "--checkpoint-uri",
                cut,
                "--workdir",
                str(tmp_path / "w2"),
                "--result-file",
                str(result_file),
            ]
        )
        == 0
    )
    result = json.loads(result_file.read_text())
    assert result["resumed_from"] == "checkpoint-4"
    assert result["global_step"] == 4, f"trained past the planned step: {result['global_step']}"
    assert _complete_steps(cut) == [4]
    # finished from the checkpoint's weights (not the untrained base): the same adapter as the run that
    # went through
    from safetensors.torch import load_file

    adapters = {}
    for name, ckpt in (("done", done), ("cut", cut)):
        download_dir(join(ckpt, "checkpoint-final-adapter"), tmp_path / name)
        adapters[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert adapters["done"].keys() == adapters["cut"].keys()
    assert all(adapters["done"][k].equal(adapters["cut"][k]) for k in adapters["done"]), (
        "final adapter differs"
    )
    assert result["final_train_loss"] is not None and result["final_eval_loss"] is not None


# -- MLflow down during training ----------------------------------------------------------------------


class _MlflowServer:
    """A real MLflow server whose process group the test kills and restarts on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        wait_http(f"{self.uri}/health", 120, self.proc)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = re.search(pattern, path.read_text(errors="replace"))
        if hit:
            return hit
        assert proc.poll() is None, (
            f"the job ended ({proc.returncode}) before {pattern!r}\n{path.read_text()[-3000:]}"
        )
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout}s\n{path.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("s3_server", ["rclone"], indirect=True)
def test_mlflow_server_killed_mid_run_training_continues_and_tracking_catches_up(s3_env, delivered, tmp_path):
    """The MLflow server's process group is SIGKILLed after step 3 and restarted (same port and store)
    a few steps later: the job warns, trains to the planned step, writes its result, and the metrics
    logged after the restart (and the run's end) reach the same MLflow run."""
    import requests

    planned = 24
    model_uri, data_uri = delivered
    config = train_config(tmp_path, model_uri, data_uri, max_steps=planned, save_steps=7)
    server = _MlflowServer(tmp_path)
    server.start()
    log_path, result_file = tmp_path / "job.log", tmp_path / "result.json"
    env = _job_env(s3_env)
    env.pop("DISABLE_MLFLOW_INTEGRATION", None)  # the suite's default; it would win over --mlflow-server-uri
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [
                    CLI,
                    "train-job",
                    "--config",
                    str(config),
                    "--checkpoint-uri",
                    join(s3_env["uri"], "experiments", "mlflow", "run"),
                    "--workdir",
                    str(tmp_path / "w"),
                    "--result-file",
                    str(result_file),
                    "--mlflow-server-uri",
                    server.uri,
                    "--experiment-name",
                    "faults",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for(log_path, rf"step 3/{planned} \(", proc)
            server.kill()
            down_at = max(int(s) for s in re.findall(rf"step (\d+)/{planned} \(", log_path.read_text()))
            _wait_for(log_path, r"MLflow \w+ failed \(.*training continues", proc)
            up_from = down_at + 2
            _wait_for(log_path, rf"step {up_from}/{planned} \(", proc)
            server.start()
            up_at = max(int(s) for s in re.findall(rf"step (\d+)/{planned} \(", log_path.read_text()))
            assert up_at < planned, "the run ended before the server was back; nothing to catch up"
            rc = proc.wait(timeout=600)
        finally:
            stop_group(proc)
        text = log_path.read_text(errors="replace")
        assert rc == 0, text[-3000:]
        assert len(re.findall(r"WARNING .*MLflow \w+ failed", text)) >= 1, text[-3000:]
        result = json.loads(result_file.read_text())
        assert result["status"] == "completed" and result["global_step"] == planned, result
        run_id = result["mlflow_run_id"]
        assert run_id and result["mlflow_tracking_uri"] == server.uri
        history = requests.get(
            f"{server.uri}/api/2.0/mlflow/metrics/get-history",
            params={"run_id": run_id, "metric_key": "loss"},
            timeout=30,
        ).json()["metrics"]
        steps = {m["step"] for m in history}
        assert {1, 2} <= steps, steps  # before the kill
        assert {s for s in steps if s > up_at} == set(range(up_at + 1, planned + 1)), (
            up_at,
            sorted(steps),
        )  # after the restart
        run = requests.get(
            f"{server.uri}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30
        ).json()["run"]
        assert run["info"]["status"] == "FINISHED", run["info"]
        assert "eval_loss" in {m["key"] for m in run["data"]["metrics"]}
        print(
            f"MLflow down after step {down_at}, back after step {up_at}; loss logged at steps {sorted(steps)}"
        )
    finally:
        server.stop()
