"""vLLM (CPU) serves every family: its merged model, and its base with the LoRA adapter, chatting through
the family's own chat template. One vLLM process (the offline ``LLM`` API, engine in-process) loads
them all in turn: far cheaper than one server per model (~5 s a model instead of ~40 s)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from finetune_engine.adapters import create_vllm_compatible_adapter, vllm_preflight
from finetune_engine.config.presets import match_preset
from finetune_engine.merge import merge_adapter
from finetune_engine.tiny_families import FAMILIES, build_family_model
from tests.airflow_env import VLLM_PY

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
DRIVER = Path(__file__).with_name("vllm_families_driver.py")
MESSAGES = [{"role": "user", "content": "What is the capital of Peru?"}]
RANK = 8


def _lora(base: Path, out: Path) -> Path:
    """A random (non-zero) LoRA adapter on the modules the family's preset names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset, _ = match_preset(str(base))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=list(preset.target_modules), init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    if not VLLM_PY.exists():
        pytest.skip(f"vLLM CPU venv missing at {VLLM_PY}: run `make vllm` (scripts/test.sh installs it)")
    root = tmp_path_factory.mktemp("families-vllm")
    jobs = []
    for name in FAMILIES:
        base = build_family_model(name, root / name / "base")
        adapter = _lora(base, root / name / "adapter")
        merged = merge_adapter(str(base), str(adapter), root / name / "merged")
        create_vllm_compatible_adapter(adapter)
        assert vllm_preflight(adapter, max_lora_rank=RANK) == []
        jobs.append(
            {"name": name, "merged": str(merged), "base": str(base), "adapter": str(adapter), "rank": RANK}
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    work = root / "vllm"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "HF_TOKEN"))}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine and worker in this one process: no spawns per model
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(work / "cache"),
        TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
        TMPDIR=str(work),
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.run(
        [str(VLLM_PY), str(DRIVER), str(root / "jobs.json"), str(root / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((root / "out.json").read_text())
    return {"jobs": {j["name"]: j for j in jobs}, "out": out}


def _first_token(path: str) -> int:
    """The greedy first reply token of ``path`` in transformers, through the same template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return int(model(**enc).logits[0, -1].argmax())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vllm_serves_the_family_merged_and_base_plus_lora(name, served):
    from transformers import AutoTokenizer

    job, result = served["jobs"][name], served["out"][name]
    tok = AutoTokenizer.from_pretrained(job["merged"])
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # the merged model loads and chats through the family's own template, as transformers renders it
    assert "merged_error" not in result, result.get("merged_error")
    assert result["merged_prompt"] == prompt and len(result["merged"]) > 0
    assert result["merged"][0] == _first_token(job["merged"])
    if "lora_error" in result:
        if name == "qwen3-moe" and "triton" in result["lora_error"]:
            pytest.skip(
                "vLLM's CPU build cannot serve LoRA on a mixture-of-experts model: its LoRA MoE layer "
                f"runs Triton kernels ({result['lora_error']}); the merged model is served"
            )
        pytest.fail(result["lora_error"])
    # base + adapter answers like the merged model, and the adapter changes the base's answer
    assert result["lora_prompt"] == prompt
    assert result["lora"] == result["merged"]
    assert result["base"] != result["lora"]
