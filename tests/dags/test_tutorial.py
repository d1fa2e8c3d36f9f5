"""The tutorial DAG end to end with `airflow dags test`: local runner, embedded S3, tiny model,
real training, merge, real vLLM on the CPU, chat; then a relaunch that retrains nothing."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from finetune_engine.storage import download_file, is_complete, list_children
from tests.airflow_env import AirflowEnv

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
CONF = json.dumps({"ranks": [4, 8, 16], "max_steps": 10, "gpus": 0, "full_param_gpus": 1, "run_name": "alpha",
                   "question": "What is the capital of France?"})


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, tiny_model_dir):
    if not VLLM_PY.exists():
        pytest.skip(f"vLLM CPU venv missing at {VLLM_PY}: run `make vllm` (scripts/test.sh installs it)")
    env = AirflowEnv(tmp_path_factory.mktemp("tutorial"), ROOT / "dags")
    env.env.update({
        "AIRFLOW__FINETUNE__VLLM_PYTHON": str(VLLM_PY),
        "FINETUNE_TUTORIAL_MODEL": str(tiny_model_dir),
        "FINETUNE_TUTORIAL_DATA_SCRIPT": "examples/tiny_data_script.py",
        "FINETUNE_TUTORIAL_DATASET_FILE": "tiny-chat.jsonl",
        "FINETUNE_TUTORIAL_CONFIG": "engine/configs/tiny-sft-lora.yaml",
        "FINETUNE_TUTORIAL_KEEP_SERVING": "false",
    })
    yield env
    env.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_tutorial_end_to_end_then_relaunch_trains_nothing(airflow, monkeypatch, tmp_path):
    first = airflow.run("dags", "test", "finetune_tutorial", "-c", CONF, timeout=1200)
    out = first.stdout + first.stderr
    assert "state=success" in out and "state=failed" not in out, out[-5000:]
    for key, value in airflow.bucket_env().items():
        monkeypatch.setenv(key, value)

    # three rank prefixes, each finished (final marker present)
    # the optional full-parameter run (one "GPU": the local runner runs the same command on the CPU)
    [full] = list_children("s3://finetune/experiments/tutorial-full/alpha")
    assert is_complete(f"s3://finetune/experiments/tutorial-full/alpha/{full}/checkpoint-final")
    assert not is_complete(f"s3://finetune/experiments/tutorial-full/alpha/{full}/checkpoint-final-adapter")  # no LoRA
    [prefix] = [f"s3://finetune/experiments/tutorial/{r}" for r in list_children("s3://finetune/experiments/tutorial")]
    assert prefix.endswith("/alpha")
    ranks = list_children(prefix)
    assert sorted(int(r.split("-")[0][1:]) for r in ranks) == [4, 8, 16]
    losses = {}
    for r in ranks:
        assert is_complete(f"{prefix}/{r}/checkpoint-final") and is_complete(f"{prefix}/{r}/checkpoint-final-adapter")
        download_file(f"{prefix}/{r}/result.json", tmp_path / f"{r}.json")
        losses[int(r.split("-")[0][1:])] = json.loads((tmp_path / f"{r}.json").read_text())["final_eval_loss"]

    # the picked rank is the one with the lowest eval loss
    picked = int(re.search(r"best: r=(\d+)", out).group(1))
    assert picked == min(losses, key=lambda k: (losses[k], k))
    [best_dir] = [r for r in ranks if r.startswith(f"r{picked}-")]
    assert is_complete(f"{prefix}/{best_dir}/checkpoint-final-merged")  # the merged winner

    # vLLM served it and the chat task logged a reply
    reply = re.search(r"assistant: (.+)", out)
    assert reply and reply.group(1).strip() not in ("", "None")
    endpoint = re.search(r"endpoint: (http://127\.0\.0\.1:\d+)/v1", out).group(1)
    # keep_serving off: the stop_serving teardown removed the server when the run ended
    [serving] = (airflow.root / "work" / "serving").iterdir()
    assert (serving / "vllm.log").exists() and not (serving / "server.pid").exists(), "the server was not stopped"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{endpoint}/health", timeout=5)

    # relaunch with the same run name: every rank is already finished, nothing retrains
    second = airflow.run("dags", "test", "finetune_tutorial", "-c", CONF, timeout=1200)
    out2 = second.stdout + second.stderr
    assert "state=success" in out2
    assert out2.count("this run already finished, nothing to train") == 4  # three ranks and the full-parameter run
    assert "training: step" not in out2
