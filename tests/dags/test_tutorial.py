"""`make demo` and the tutorial DAG end to end, in one shared run: scripts/demo.sh as a user runs it
(`airflow dags test` on the local runner, embedded S3, tiny model, three-rank LoRA sweep, pick best,
merge, real vLLM on the CPU, chat), then checks of what it left (the bucket, the live server), then
`make demo` again: every rank is finished and nothing retrains, the optional full-parameter run
trains, and with keep_serving off the server is stopped when the run ends.

The tests run in file order and share the module's demo directory; each asserts its own part."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune_engine.storage import download_file, is_complete, list_children
from finetune_engine.storage.local_server import read_env
from tests.airflow_env import VLLM_PY

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
QUESTION = "What is the capital of France?"
DEMO_CONF = {"ranks": [4, 8, 16], "max_steps": 120, "gpus": 0, "run_name": "demo", "question": QUESTION}

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _run_demo(demo_dir: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "FINETUNE_DEMO_DIR": str(demo_dir), **env},
    )
    log = demo_dir / "tutorial-run.log"
    if proc.returncode != 0 and log.exists():  # keep the whole DAG log for the CI artifacts
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(log, ARTIFACTS / f"tutorial-run-{os.getpid()}.log")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not VLLM_PY.exists():
        pytest.skip(f"vLLM CPU venv missing at {VLLM_PY}: run `make vllm` (scripts/test.sh installs it)")
    demo_dir = tmp_path_factory.mktemp("demo") / "demo"
    state = SimpleNamespace(dir=demo_dir, first=None)
    try:
        state.first = _run_demo(demo_dir)
        yield state
    finally:
        for pid_file in (demo_dir / "work" / "serving").glob("*/server.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "finetune-engine"),
                "local-s3",
                "stop",
                "--dir",
                str(demo_dir / "s3"),
            ]
        )


@pytest.fixture()
def bucket(demo, monkeypatch):
    for key, value in read_env(demo.dir / "s3").items():  # the embedded server the demo started
        monkeypatch.setenv(key, value)


def _chat(endpoint: str, question: str) -> str:
    body = json.dumps(
        {
            "model": "tutorial",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(f"{endpoint}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def test_make_demo_prints_the_sweep_and_a_chat_and_leaves_a_server_to_chat_with(demo):
    """The README's `make demo`: its summary lines, then the curl it prints works on the live server."""
    out = demo.first.stdout
    assert re.search(
        r"^eval loss by rank: r=4: [\d.]+, r=8: [\d.]+, r=16: [\d.]+; failed ranks: none; best: r=\d+$",
        out,
        re.M,
    ), out
    assert f"user: {QUESTION}" in out and "assistant: The capital of France is Paris." in out
    assert re.search(r"time to first chat: \d+s", out)
    bucket_dir = demo.dir / "s3" / "data" / "finetune"
    assert (bucket_dir / "models" / "tutorial" / "base" / "_finetune_manifest.json").exists()
    endpoint = re.search(r"vLLM serving:\s+(http://127\.0\.0\.1:\d+/v1)", out).group(1)
    assert "Paris" in _chat(endpoint, QUESTION)
    # and the curl it printed, with its own request body (greedy, so the answer is the trained one)
    body = json.loads(re.search(r"^\s+curl \S+/chat/completions .* -d '(\{.*\})'$", out, re.M).group(1))
    assert body["temperature"] == 0
    req = urllib.request.Request(
        f"{endpoint}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert "Paris" in json.load(r)["choices"][0]["message"]["content"]


def test_every_rank_finished_the_lowest_loss_won_and_was_merged(demo, bucket, tmp_path):
    log = (demo.dir / "tutorial-run.log").read_text()
    assert "state=success" in log and "state=failed" not in log
    # the preflight checked the config for every rank before anything was uploaded; the demo's
    # dag_defaults name the tiny model's directory, data script and config
    passed = re.search(
        r"preflight passed: model (\S+), data script (\S+), config (\S+) validates for ranks "
        r"(\[[\d, ]+\])",
        log,
    )
    assert passed and passed.group(1) == str(demo.dir / "tiny-model"), log[-3000:]
    assert passed.groups()[1:] == ("tiny", "tiny-sft-lora", "[4, 8, 16]")
    [prefix] = [
        f"s3://finetune/experiments/tutorial/{r}" for r in list_children("s3://finetune/experiments/tutorial")
    ]
    assert prefix.endswith("/demo")
    ranks = list_children(prefix)
    assert sorted(int(r.split("-")[0][1:]) for r in ranks) == [4, 8, 16]
    losses = {}
    for r in ranks:
        # the operator asks for the adapter and, beside it, the merged model (the Silogen chart's names)
        assert is_complete(f"{prefix}/{r}/checkpoint-final") and is_complete(
            f"{prefix}/{r}/checkpoint-final-adapter"
        )
        download_file(f"{prefix}/{r}/result.json", tmp_path / f"{r}.json")
        losses[int(r.split("-")[0][1:])] = json.loads((tmp_path / f"{r}.json").read_text())["final_eval_loss"]
    picked = int(re.search(r"best: r=(\d+)", log).group(1))
    assert picked == min(losses, key=lambda k: (losses[k], k))
    [best_dir] = [r for r in ranks if r.startswith(f"r{picked}-")]
    assert is_complete(f"{prefix}/{best_dir}/checkpoint-final-merged")  # what was served
    assert re.search(r"endpoint: (http://127\.0\.0\.1:\d+)/v1", log)


def test_make_demo_again_trains_no_rank_runs_the_full_parameter_job_and_stops_serving(demo, bucket):
    """The README: `make demo` again retrains nothing (same run_name); here also with the optional
    full-parameter run (one "GPU": the local runner runs the same command on the CPU) and keep_serving off."""
    conf = {**DEMO_CONF, "full_param_gpus": 1, "keep_serving": False}
    second = _run_demo(demo.dir, FINETUNE_DEMO_CONF=json.dumps(conf))
    assert "vLLM serving:" not in second.stdout  # nothing left running to point at
    log = (demo.dir / "tutorial-run.log").read_text()
    assert "state=success" in log and "state=failed" not in log
    assert log.count("this run already finished, nothing to train") == 3  # the three ranks
    [full] = list_children("s3://finetune/experiments/tutorial-full/demo")
    assert is_complete(f"s3://finetune/experiments/tutorial-full/demo/{full}/checkpoint-final")
    assert not is_complete(
        f"s3://finetune/experiments/tutorial-full/demo/{full}/checkpoint-final-adapter"
    )  # no LoRA
    reply = re.search(r"assistant: (.+)", log)
    assert reply and reply.group(1).strip() not in ("", "None")
    endpoint = re.search(r"endpoint: (http://127\.0\.0\.1:\d+)/v1", log).group(1)
    # keep_serving off: the stop_serving teardown removed the server when the run ended
    [serving] = (demo.dir / "work" / "serving").iterdir()
    assert (serving / "vllm.log").exists() and not (serving / "server.pid").exists(), (
        "the server was not stopped"
    )
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{endpoint}/health", timeout=5)


def test_the_quantized_champion_is_served_and_still_answers(demo, bucket):
    """dags/quantize_champion.py on the model the demo merged: W4A16 (compressed-tensors), served by
    vLLM on the CPU, and the chat still answers correctly."""
    from tests.dags.quantize_champion_run import run_quantize_champion

    run = run_quantize_champion(demo.dir, QUESTION)
    assert is_complete(run["quantized_uri"])
    assert run["record"]["scheme"] == "W4A16" and run["record"]["format"] == "compressed-tensors"
    assert run["record"]["size_bytes"]["after"] < 0.5 * run["record"]["size_bytes"]["before"]
    assert run["reply"] and "Paris" in run["reply"], run["log"][-3000:]
