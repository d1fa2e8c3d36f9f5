"""vllm_preflight on hand-made adapter directories: target modules vLLM cannot serve LoRA on,
tensors that are not LoRA matrices, DoRA, non-LoRA PEFT types, ranks; and the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune_engine.adapters import vllm_preflight

LAYER = "base_model.model.model.layers.0"


def _adapter(
    root: Path, *, targets=("q_proj", "v_proj"), extra: dict | None = None, rank: int = 8, **cfg
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets) if not isinstance(targets, str) else targets,
        "modules_to_save": None,
        **cfg,
    }
    (root / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for t in [targets] if isinstance(targets, str) else targets:
        module = t if "." in t else f"self_attn.{t}"
        tensors[f"{LAYER}.{module}.lora_A.weight"] = torch.zeros(rank, 16)
        tensors[f"{LAYER}.{module}.lora_B.weight"] = torch.zeros(16, rank)
    tensors.update(extra or {})
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


def test_a_clean_lora_adapter_passes(tmp_path):
    assert (
        vllm_preflight(
            _adapter(
                tmp_path / "a",
                targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            ),
            max_lora_rank=8,
        )
        == []
    )
    assert vllm_preflight(_adapter(tmp_path / "all", targets="all-linear")) == []
    # dotted module paths are judged by their last part
    assert vllm_preflight(_adapter(tmp_path / "dotted", targets=("model.layers.0.self_attn.q_proj",))) == []


def test_unsupported_target_modules_are_named(tmp_path):
    problems = vllm_preflight(_adapter(tmp_path / "a", targets=("q_proj", "mlp.fc_in", "conv1d")))
    assert problems == ["target modules ['conv1d', 'mlp.fc_in'] may not be LoRA-capable in vLLM"]


def test_extra_tensors_are_counted_and_one_is_named(tmp_path):
    extra = {
        "base_model.model.lm_head.weight": torch.zeros(4, 16),
        "base_model.model.model.embed_tokens.weight": torch.zeros(4, 16),
    }
    problems = vllm_preflight(_adapter(tmp_path / "a", extra=extra))
    assert problems == [
        "2 non-LoRA tensors (e.g. base_model.model.lm_head.weight) that vLLM does not load; untrained copies "
        "of the base: run create_vllm_compatible_adapter; trained: serve the merged model (merge_adapter)"
    ]


def test_every_problem_is_reported_at_once(tmp_path):
    problems = vllm_preflight(
        _adapter(
            tmp_path / "a",
            targets=("q_proj", "wte"),
            rank=64,
            use_dora=True,
            extra={"base_model.model.model.norm.weight": torch.zeros(16)},
        ),
        max_lora_rank=16,
    )
    assert problems == [
        "rank 64 > --max-lora-rank 16; raise it to 64",
        "DoRA adapters are not supported by vLLM; merge instead",
        "target modules ['wte'] may not be LoRA-capable in vLLM",
        "1 non-LoRA tensors (e.g. base_model.model.model.norm.weight) that vLLM does not load; untrained "
        "copies of the base: run create_vllm_compatible_adapter; "
        "trained: serve the merged model (merge_adapter)",
    ]


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ({"peft_type": "IA3"}, "peft_type IA3: vLLM serves only LoRA adapters"),
        ({"rank": 1024}, "rank 1024 exceeds vLLM's largest max-lora-rank 512"),
        ({"rank": 24, "max": 16}, "rank 24 > --max-lora-rank 16; raise it to 32"),
    ],
)
def test_type_and_rank(tmp_path, cfg, expected):
    rank = cfg.pop("rank", 8)
    max_rank = cfg.pop("max", None)
    problems = vllm_preflight(_adapter(tmp_path / "a", rank=rank, **cfg), max_lora_rank=max_rank)
    assert expected in problems


def test_embedding_lora_is_a_lora_target_vllm_serves(tmp_path):
    targets = ("q_proj", "embed_tokens")
    adapter = _adapter(
        tmp_path / "a",
        targets=("q_proj",),
        extra={
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 32),
            "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 8),
        },
    )
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": list(targets)}))
    assert vllm_preflight(adapter) == []


def test_cli_warns_exits_0_like_the_silogen_engine_and_1_with_strict(tmp_path):
    from finetune_engine.adapters import main

    bad = _adapter(tmp_path / "bad", targets=("q_proj", "fc_in"))
    assert main([str(bad), "--max-lora-rank", "8"]) == 0
    assert main([str(bad), "--max-lora-rank", "8", "--strict"]) == 1
    good = _adapter(tmp_path / "good", extra={"base_model.model.model.norm.weight": torch.zeros(16)})
    # the extra tensor is stripped (no modules_to_save, no trained embeddings), then the preflight is clean
    assert main([str(good), "--max-lora-rank", "8", "--strict"]) == 0
    assert (good / "old_with_extra_layers_adapter_model.safetensors").is_file()
    assert main([str(tmp_path / "missing")]) == 1
