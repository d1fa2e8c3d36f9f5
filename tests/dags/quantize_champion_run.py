"""The quantize_champion DAG on a trained model: `airflow dags test finetune_quantize_champion` with
the demo's Airflow home, bucket and local runner. The tutorial test module calls it on the model its
demo trained and merged, so no extra training run is needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from finetune_engine.storage import is_complete, list_children, put_bytes, read_bytes
from finetune_engine.storage.local_server import read_env
from tests.airflow_env import EAGER_VLLM, VLLM_PY

ROOT = Path(__file__).resolve().parents[2]
LINE = "quantized-demo"


def run_quantize_champion(demo_dir: Path, question: str, scheme: str = "W4A16", iters: int = 0) -> dict:
    """Record the demo's merged best model as a line's champion, run the DAG, return what it left:
    {"log", "seconds", "quantized_uri", "record"}."""
    s3 = read_env(demo_dir / "s3")
    [merged] = [
        f"s3://finetune/experiments/tutorial/demo/{r}/checkpoint-final-merged"
        for r in list_children("s3://finetune/experiments/tutorial/demo")
        if is_complete(f"s3://finetune/experiments/tutorial/demo/{r}/checkpoint-final-merged")
    ]
    [data] = sorted((demo_dir / "s3" / "data" / "finetune" / "datasets").rglob("*.jsonl"))[:1]
    data_uri = "s3://finetune/" + data.relative_to(demo_dir / "s3" / "data" / "finetune").as_posix()
    champion = {"model_uri": merged, "config": "tiny-sft-lora", "eval_loss": None}
    put_bytes(f"s3://finetune/champions/{LINE}/champion.json", json.dumps(champion).encode())
    defaults = {"gpus": 0, "samples": 32, "iters": iters, "keep_serving": False, "calibration_data": data_uri}
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "FINETUNE_"))}
    env = {
        **keep,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DISABLE_MLFLOW_INTEGRATION": "TRUE",
        "AIRFLOW_HOME": str(demo_dir / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__FINETUNE__RUNNER": "local",
        "AIRFLOW__FINETUNE__LOCAL_WORKDIR": str(demo_dir / "work"),
        "AIRFLOW__FINETUNE__BUCKET": s3["FINETUNE_BUCKET"],
        "AIRFLOW__FINETUNE__VLLM_PYTHON": str(VLLM_PY),
        "AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS": json.dumps(EAGER_VLLM),
        "AIRFLOW__FINETUNE__DAG_DEFAULTS": json.dumps({"finetune_quantize_champion": defaults}),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {
                "conn_type": "aws",
                "login": s3["AWS_ACCESS_KEY_ID"],
                "password": s3["AWS_SECRET_ACCESS_KEY"],
                "extra": {"endpoint_url": s3["AWS_ENDPOINT_URL"]},
            }
        ),
    }
    conf = {"line": LINE, "scheme": scheme, "question": question}
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "dags", "test", "finetune_quantize_champion"]
        + ["-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in log, log[-4000:]
    quantized = f"{merged}-{scheme.lower()}"
    record = json.loads(read_bytes(f"{quantized}/quantization_record.json"))
    reply = re.search(r"smoke test: '[^']*' -> '([^']*)'", log)
    return {
        "log": log,
        "seconds": seconds,
        "quantized_uri": quantized,
        "record": record,
        "data_uri": data_uri,
        "reply": reply.group(1) if reply else None,
    }
