"""Shared test settings: offline, quiet, CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs two workers on two cores: one compute thread each (and in what they start),
    # or torch's OpenMP threads spin against the other worker's
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _connections_outside_a_task_runner() -> None:
    """Tests call operators' execute() and build pods outside a task runner. There a connection that
    no secrets backend has is "not found" on Airflow 3.2+; 3.1 asks the supervisor instead, which does
    not exist (ImportError of SUPERVISOR_COMMS). On 3.1 a stand-in supervisor channel answers as 3.2+
    does, so the floor runs the same tests (scripts/test-floors.sh)."""
    import importlib.metadata as md

    try:
        major, minor = (int(x) for x in md.version("apache-airflow-task-sdk").split(".")[:2])
    except (md.PackageNotFoundError, ValueError):
        return
    if (major, minor) >= (1, 2):
        return
    from airflow.sdk.exceptions import ErrorType
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.comms import ErrorResponse, GetConnection, GetVariable

    if getattr(task_runner, "SUPERVISOR_COMMS", None) is not None:
        return

    class NotFound:
        def send(self, msg):
            if isinstance(msg, GetConnection):
                return ErrorResponse(error=ErrorType.CONNECTION_NOT_FOUND, detail={"conn_id": msg.conn_id})
            if isinstance(msg, GetVariable):
                return ErrorResponse(error=ErrorType.VARIABLE_NOT_FOUND, detail={"key": msg.key})
            raise RuntimeError(f"no task runner here to answer {type(msg).__name__}")

    task_runner.SUPERVISOR_COMMS = NotFound()


def pytest_sessionstart(session):
    _connections_outside_a_task_runner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True, children included."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# -- time limits and per-test durations -----------------------------------------------------------------

# pytest-timeout's default (pyproject: timeout = 600) covers a test with its fixtures' set-up; tests that
# start Airflow, vLLM or a browser, or are marked slow, get this much unless they set their own limit.
MARKER_TIMEOUTS = {"slow": 1800, "vllm": 1800, "browser": 1200}
DURATIONS_FILE = Path(".work") / "test-durations.txt"


# How long a test roughly takes, by marker, to run the longest modules first: with `--dist loadscope
# --no-loadscope-reorder` (scripts/test.sh) a worker takes whole modules in this order, so the two
# Airflow end-to-end modules start at once on different workers and the short ones fill in after.
MARKER_WEIGHTS = {"slow": 30, "vllm": 60, "browser": 20}


def _run_longest_modules_first(items) -> None:
    weight: dict[str, int] = {}
    for item in items:
        cost = 1 + sum(w for name, w in MARKER_WEIGHTS.items() if item.get_closest_marker(name))
        weight[item.nodeid.split("::")[0]] = weight.get(item.nodeid.split("::")[0], 0) + cost
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: module order kept


def pytest_collection_modifyitems(config, items):
    _run_longest_modules_first(items)
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        limits = [seconds for name, seconds in MARKER_TIMEOUTS.items() if item.get_closest_marker(name)]
        if limits:
            item.add_marker(pytest.mark.timeout(max(limits)))


_durations: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    entry = _durations.setdefault(
        report.nodeid, {"setup": 0.0, "call": 0.0, "teardown": 0.0, "outcome": "passed"}
    )
    entry[report.when] += report.duration
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else f"error ({report.when})"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call" and hasattr(report, "wasxfail"):
        entry["outcome"] = "xpassed"


def pytest_sessionfinish(session):
    """Every test's time (set-up + call + teardown), slowest first, with its outcome, under .work/."""
    if hasattr(session.config, "workerinput") or not _durations:  # an xdist worker: the controller writes
        return
    rows = sorted(_durations.items(), key=lambda kv: -(kv[1]["setup"] + kv[1]["call"] + kv[1]["teardown"]))
    total = sum(e["setup"] + e["call"] + e["teardown"] for _, e in rows)
    lines = [
        f"# {len(rows)} tests, {total:.1f} s in tests (set-up + call + teardown), slowest first",
        f"# {'total':>9} {'setup':>9} {'call':>9} {'teardown':>9}  outcome  test",
    ]
    for nodeid, e in rows:
        lines.append(
            f"{e['setup'] + e['call'] + e['teardown']:>11.2f} {e['setup']:>9.2f} {e['call']:>9.2f} "
            f"{e['teardown']:>9.2f}  {e['outcome']}  {nodeid}"
        )
    path = session.config.rootpath / DURATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def pytest_terminal_summary(terminalreporter, config):
    if _durations and not hasattr(config, "workerinput"):
        terminalreporter.write_line(f"per-test durations: {config.rootpath / DURATIONS_FILE}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from finetune_engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def tiny_model(tiny_model_dir, tmp_path) -> Path:
    """A private copy, for tests that may modify the model directory."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    from finetune_engine.tiny import write_chat_dataset

    return write_chat_dataset(tmp_path_factory.mktemp("data") / "chat.jsonl", examples=120, seed=1)
