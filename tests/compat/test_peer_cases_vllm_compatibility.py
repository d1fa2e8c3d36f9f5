"""The Silogen engine's tests/test_vllm_compatibility.py, case by case, against this engine's
create_vllm_compatible_adapter (finetune_engine.adapters), with the same input: a LoRA adapter
file with an extra untrained non-LoRA tensor (embedding.weight) added."""

from __future__ import annotations

import filecmp

import pytest

ADAPTER = "adapter_model.safetensors"
BACKUP = "old_with_extra_layers_adapter_model.safetensors"


@pytest.fixture
def adapter_dir(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    class DummyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(10, 10)
            self.linear = torch.nn.Linear(10, 10)
            self.lm_head = torch.nn.Linear(10, 10)

    model = inject_adapter_in_model(
        LoraConfig(lora_alpha=16, lora_dropout=0.1, r=64, bias="none", target_modules=["linear"]),
        DummyModel(),
    )
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state["embedding.weight"] = model.embedding.weight.detach().clone()  # the extra layer
    save_file(state, str(tmp_path / ADAPTER))
    return tmp_path


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_remove_non_lora_layers(adapter_dir):
    """Restates test_vllm_compatibility.py::test_remove_non_lora_layers: the non-LoRA layers are
    removed, the original is kept as old_with_extra_layers_adapter_model.safetensors, and only LoRA
    tensors (no lm_head, no embedding) remain."""
    from finetune_engine.adapters import create_vllm_compatible_adapter

    create_vllm_compatible_adapter(adapter_dir)
    assert (adapter_dir / BACKUP).is_file()
    keys = _keys(adapter_dir / ADAPTER)
    assert keys
    for key in keys:
        assert "lora" in key
        assert "lm_head" not in key
        assert "embedding" not in key


def test_remove_non_lora_layers_noop(adapter_dir):
    """Restates test_vllm_compatibility.py::test_remove_non_lora_layers_noop: a second run changes
    nothing; the cleaned adapter and the kept original stay different files."""
    from finetune_engine.adapters import create_vllm_compatible_adapter

    create_vllm_compatible_adapter(adapter_dir)
    create_vllm_compatible_adapter(adapter_dir)
    assert not filecmp.cmp(adapter_dir / ADAPTER, adapter_dir / BACKUP, shallow=False)
