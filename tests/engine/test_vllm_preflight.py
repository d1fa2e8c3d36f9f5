"""vllm_preflight on hand-made adapter directories: target modules vLLM cannot serve LoRA on,
tensors that are not LoRA matrices, DoRA, non-LoRA PEFT types, ranks; and the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune_engine.adapters import vllm_preflight

LAYER = "base_model.model.model.layers.0"


def _adapter(root: Path, *, targets=("q_proj", "v_proj"), extra: dict | None = None, rank: int = 8, **cfg) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets) if not isinstance(targets, str) else targets,
              "modules_to_save": None, **cfg}
    (root / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for t in ([targets] if isinstance(targets, str) else targets):
        module = t if "." in t else f"self_attn.{t}"
        tensors[f"{LAYER}.{module}.lora_A.weight"] = torch.zeros(rank, 16)
        tensors[f"{LAYER}.{module}.lora_B.weight"] = torch.zeros(16, rank)
    tensors.update(extra or {})
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


def test_a_clean_lora_adapter_passes(tmp_path):
    assert vllm_preflight(_adapter(tmp_path / "a", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                            "down_proj")), max_lora_rank=8) == []
    assert vllm_preflight(_adapter(tmp_path / "all", targets="all-linear")) == []
    # dotted module paths are judged by their last part
    assert vllm_preflight(_adapter(tmp_path / "dotted", targets=("model.layers.0.self_attn.q_proj",))) == []


def test_unsupported_target_modules_are_named(tmp_path):
    problems = vllm_preflight(_adapter(tmp_path / "a", targets=("q_proj", "mlp.fc_in", "conv1d")))
    assert problems == ["target modules ['conv1d', 'mlp.fc_in'] may not be LoRA-capable in vLLM"]


def test_extra_tensors_are_counted_and_one_is_named(tmp_path):
    extra = {"base_model.model.lm_head.weight": torch.zeros(4, 16), "base_model.model.model.embed_tokens.weight": torch.zeros(4, 16)}
    problems = vllm_preflight(_adapter(tmp_path / "a", extra=extra))
    assert problems == ["2 non-LoRA tensors (e.g. base_model.model.lm_head.weight); run create_vllm_compatible_adapter or merge"]


def test_every_problem_is_reported_at_once(tmp_path):
    problems = vllm_preflight(_adapter(tmp_path / "a", targets=("q_proj", "wte"), rank=64, use_dora=True,
                                       extra={"base_model.model.model.norm.weight": torch.zeros(16)}), max_lora_rank=16)
    assert problems == [
        "rank 64 > --max-lora-rank 16; raise it to 64",
        "DoRA adapters are not supported by vLLM; merge instead",
        "target modules ['wte'] may not be LoRA-capable in vLLM",
        "1 non-LoRA tensors (e.g. base_model.model.model.norm.weight); run create_vllm_compatible_adapter or merge",
    ]


@pytest.mark.parametrize("cfg,expected", [
    ({"peft_type": "IA3"}, "peft_type IA3: vLLM serves only LoRA adapters"),
    ({"rank": 1024}, "rank 1024 exceeds vLLM's largest max-lora-rank 512"),
    ({"rank": 24, "max": 16}, "rank 24 > --max-lora-rank 16; raise it to 32"),
])
def test_type_and_rank(tmp_path, cfg, expected):
    rank = cfg.pop("rank", 8)
    max_rank = cfg.pop("max", None)
    problems = vllm_preflight(_adapter(tmp_path / "a", rank=rank, **cfg), max_lora_rank=max_rank)
    assert expected in problems


def test_cli_warns_and_exits_1_on_problems(tmp_path):
    exe = Path(sys.executable).parent / "create_vllm_compatible_adapter"
    bad = _adapter(tmp_path / "bad", targets=("q_proj", "fc_in"))
    proc = subprocess.run([str(exe), str(bad), "--max-lora-rank", "8"], capture_output=True, text=True)
    assert proc.returncode == 1 and "warning: target modules ['fc_in'] may not be LoRA-capable in vLLM" in proc.stderr
    good = _adapter(tmp_path / "good", extra={"base_model.model.model.norm.weight": torch.zeros(16)})
    proc = subprocess.run([str(exe), str(good), "--max-lora-rank", "8"], capture_output=True, text=True)
    # the extra tensor is stripped (no modules_to_save, no trained embeddings), then the preflight is clean
    assert proc.returncode == 0, proc.stderr
    assert "1 removed" in proc.stdout
