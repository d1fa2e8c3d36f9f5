"""The benchmark scripts of the README's Performance section run (`make bench` runs them at full
size; here each runs once at the smallest size that exercises every measurement and prints its
ratios). The figures themselves are not asserted: benchmarks are not timed tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow]

CASES = {
    "bench_transfer.py": (
        ["--size-mib", "8", "--repeat", "1"],
        [
            r"upload:\s+ours/cp [\d.]+ .* ours/naive [\d.]+",
            r"download:\s+ours/cp [\d.]+ .* ours/naive [\d.]+",
        ],
    ),
    "bench_training.py": (
        [
            "--examples",
            "64",
            "--prep-examples",
            "200",
            "--steps",
            "2",
            "--total-batch",
            "4",
            "--per-device",
            "2",
            "--max-len",
            "128",
        ],
        [
            r"ours \(packed, best-fit decreasing\): 0\.\d+",
            r"ratio ours / TRL, its defaults: [\d.]+x",
            r"ratio ours / TRL, fp32, no checkpointing: [\d.]+x",
            r"2 process\(es\): ours .* ratio [\d.]+x",
        ],
    ),
    # the GPU benchmark's rows on a tiny model and the CPU (the figures come from a GPU run)
    "bench_gpu.py": (
        ["--smoke", "--json", "{tmp}/bench_gpu.json"],
        [
            r"engine full\s+\d+ tok/s",
            r"engine lora\s+\d+ tok/s",
            r"engine full fa4\s+skipped: needs the flash-attn-4 package and a Hopper or newer GPU",
            r"bare loop full\s+\d+ tok/s",
            r"TRL packing\s+(\d+ tok/s|skipped)",
            r"ratio engine full / bare loop full: [\d.]+x",
            r"ratio engine full / TRL packing: ([\d.]+x|n/a)",
        ],
    ),
    # the sweep measurement (two `airflow dags test` runs) is left to `make bench`: the local runner's
    # mapped sweeps through `airflow dags test` are covered by tests/provider/test_local_dag.py
    "bench_orchestration.py": (
        ["--sweep", "0", "--repeat", "1", "--pods", "5"],
        [
            r"tutorial\.py\s+\d+ ms",
            r"render \+ validate config.*\(\d[\d.]*x\)",
            r"mapped sweep: skipped \(--sweep 0\)",
        ],
    ),
    # the quantized checkpoints' size and loss against the unquantized model (vLLM speed: `make bench`)
    "bench_quantize.py": (
        ["--no-vllm", "--train-steps", "2", "--iters", "0", "--samples", "4"],
        [r"\| W8A8 \| [\d.]+ MB \| 0\.\d+ \|", r"\| W4A16 \| [\d.]+ MB \| 0\.\d+ \|"],
    ),
    "bench_resume.py": (
        ["--trials", "1", "--steps", "6", "--save-steps", "2", "--seed", "3"],
        [
            r"steps lost: max \d+, mean [\d.]+; <= save interval \(2\) in [01]/1 trials",
            r"restart/cold = [\d.]+",
        ],
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs_and_prints_its_ratios(script, tmp_path):
    args, patterns = CASES[script]
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for pattern in patterns:
        assert re.search(pattern, proc.stdout), (
            f"{script}: no line matching {pattern!r}\n{proc.stdout[-3000:]}"
        )
