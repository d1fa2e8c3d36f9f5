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
def test_demo_script_fine_tunes_and_chats(tmp_path):
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FINETUNE_DEMO_DIR": str(tmp_path / "demo")})
    subprocess.run([str(ROOT / ".venv" / "bin" / "finetune-engine"), "local-s3", "stop", "--dir", str(tmp_path / "demo" / "s3")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "assistant: The capital of France is Paris." in proc.stdout
    bucket = tmp_path / "demo" / "s3" / "data" / "finetune"
    assert (bucket / "experiments" / "demo" / "tiny-sft-lora" / "checkpoint-final" / "_finetune_manifest.json").exists()
    assert (bucket / "datasets" / "tiny-chat.jsonl").exists() and (bucket / "models" / "local" / "tiny-model").is_dir()
