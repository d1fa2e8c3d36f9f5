"""The README's commands run: the demo end to end, and the README names the two commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_runs_the_tutorial_dag_and_leaves_a_server_to_chat_with(tmp_path):
    """`make demo` as a user runs it: the tutorial DAG end to end, then the printed curl works."""
    import json
    import re
    import signal
    import urllib.request

    demo = tmp_path / "demo"
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "FINETUNE_DEMO_DIR": str(demo)})
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert re.search(r"^eval loss by rank: r=4: [\d.]+, r=8: [\d.]+, r=16: [\d.]+; failed ranks: none; best: r=\d+$", out, re.M), out
        assert "assistant: The capital of France is Paris." in out
        assert re.search(r"time to first chat: \d+s", out)
        bucket = demo / "s3" / "data" / "finetune"
        assert (bucket / "models" / "tutorial" / "base" / "_finetune_manifest.json").exists()
        ranks = sorted((bucket / "experiments" / "tutorial" / "demo").iterdir())
        assert len(ranks) == 3 and all((r / "checkpoint-final" / "_finetune_manifest.json").exists() for r in ranks)
        # the server the demo leaves running answers the curl it printed
        endpoint = re.search(r"vLLM serving:\s+(http://127\.0\.0\.1:\d+/v1)", out).group(1)
        body = json.dumps({"model": "tutorial", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(f"{endpoint}/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)["choices"][0]["message"]["content"]
        assert "Paris" in reply, reply
    finally:
        for pid_file in (demo / "work" / "serving").glob("*/server.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run([str(ROOT / ".venv" / "bin" / "finetune-engine"), "local-s3", "stop", "--dir", str(demo / "s3")])
