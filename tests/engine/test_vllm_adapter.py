"""create_vllm_compatible_adapter as the Silogen engine's: LoRA tensors (embedding LoRA included)
stay, untrained base copies go, the original is kept as old_with_extra_layers_*, trained layers are
kept with exit 0, and --training-config decides as the Silogen engine's does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune_engine.adapters import BACKUP_PREFIX, KEEPING, create_vllm_compatible_adapter, main

PROMPT = "What is the capital of Peru?"


def _embedding_lora(base: Path, out: Path, modules_to_save=None) -> Path:
    """A LoRA adapter on q_proj and embed_tokens with non-zero B matrices (as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=modules_to_save
        ),
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


def _logits(base: Path, adapter: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**ids).logits[0]


def _config(tmp_path: Path, model: Path, **peft) -> Path:
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(tmp_path / "d.jsonl")}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
        },
        "training_args": {"output_dir": str(tmp_path / "out")},
        "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 4},
        "run_conf": {"model": str(model)},
        "peft_conf": peft
        or {"peft_type": "LORA", "peft_kwargs": {"r": 4, "target_modules": ["q_proj", "embed_tokens"]}},
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_embedding_lora_tensors_are_kept_and_the_adapter_is_unchanged(tiny_model_dir, tmp_path):
    adapter = _embedding_lora(tiny_model_dir, tmp_path / "adapter")
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    embedding_lora = {k for k in stored if "lora_embedding_" in k}
    assert len(embedding_lora) == 2
    base_copies = {k for k in stored if ".lora_" not in k}
    assert base_copies, "peft saves the base embedding next to an embedding LoRA"
    before = _logits(tiny_model_dir, adapter)
    assert (before - _logits(tiny_model_dir, None)).abs().max() > 0.1, "the embedding LoRA must matter"

    assert main([str(adapter)]) == 0
    kept = load_file(str(adapter / "adapter_model.safetensors"))
    assert embedding_lora <= set(kept) and not (set(kept) & base_copies)
    assert all(".lora_" in k for k in kept)
    backup = adapter / f"{BACKUP_PREFIX}adapter_model.safetensors"
    assert set(load_file(str(backup))) == set(stored)
    assert torch.allclose(_logits(tiny_model_dir, adapter), before, atol=1e-6)

    # a second run finds the backup and changes nothing
    data = (adapter / "adapter_model.safetensors").read_bytes()
    assert create_vllm_compatible_adapter(adapter)["action"] == "already-done"
    assert (adapter / "adapter_model.safetensors").read_bytes() == data


def test_trained_modules_are_kept_with_exit_0(tiny_model_dir, tmp_path, caplog):
    adapter = _embedding_lora(tiny_model_dir, tmp_path / "adapter", modules_to_save=["lm_head"])
    data = (adapter / "adapter_model.safetensors").read_bytes()
    caplog.set_level("INFO", logger="finetune_engine.adapters")
    assert main([str(adapter)]) == 0
    assert KEEPING in caplog.text and "modules_to_save" in caplog.text
    assert (adapter / "adapter_model.safetensors").read_bytes() == data
    assert not (adapter / f"{BACKUP_PREFIX}adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "peft,action",
    [
        ({}, "removed"),  # a LoRA run with the model's own template: the extra layers are untrained copies
        ({"peft_type": "NO_PEFT"}, "kept"),
        (
            {
                "peft_type": "LORA",
                "peft_kwargs": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
            },
            "kept",
        ),
    ],
)
def test_training_config_decides_as_the_silogen_engine(tiny_model_dir, tmp_path, peft, action):
    adapter = _embedding_lora(tiny_model_dir, tmp_path / "adapter")
    cfg = _config(tmp_path, tiny_model_dir, **peft)
    out = create_vllm_compatible_adapter(adapter, training_config=cfg)
    assert out["action"] == action
    assert (adapter / f"{BACKUP_PREFIX}adapter_model.safetensors").exists() == (action == "removed")


def test_chat_template_that_grows_the_vocabulary_keeps_the_layers(tiny_model_dir, tmp_path):
    adapter = _embedding_lora(tiny_model_dir, tmp_path / "adapter")
    cfg = _config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(cfg.read_text())
    data["data_conf"]["chat_template_name"] = "chat-ml"  # adds <|im_start|>, <|im_end|> to the tiny tokenizer
    cfg.write_text(yaml.safe_dump(data))
    out = create_vllm_compatible_adapter(adapter, training_config=cfg)
    assert out["action"] == "kept" and "grew the embeddings" in out["reasons"][0]


def test_a_config_that_is_neither_sft_nor_dpo_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    adapter = _embedding_lora(tiny_model_dir, tmp_path / "adapter")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_conf:\n  model: x\n  not_a_key: 1\n")
    assert main([str(adapter), "--training-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "could not load it as an SFT or DPO config" in err and "not_a_key" in err
    assert not (adapter / f"{BACKUP_PREFIX}adapter_model.safetensors").exists()


def _plain_adapter(root: Path, with_config: bool = True) -> Path:
    """A saved adapter file with one LoRA pair and one untrained base copy (no model needed)."""
    import json

    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "m.q_proj.lora_A.weight": torch.ones(2, 4),
            "m.q_proj.lora_B.weight": torch.ones(4, 2),
            "m.embed_tokens.base_layer.weight": torch.zeros(8, 4),
        },
        str(root / "adapter_model.safetensors"),
    )
    if with_config:
        (root / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
        )
    return root


def test_the_manifest_is_rewritten_so_the_adapter_still_verifies(tmp_path):
    from finetune_engine.manifest import read_manifest, verify_directory, write_manifest

    adapter = _plain_adapter(tmp_path / "adapter")
    write_manifest(adapter, extra={"global_step": 7})
    assert create_vllm_compatible_adapter(adapter)["action"] == "removed"
    assert verify_directory(adapter, check_hashes=True) == (True, "complete")
    manifest = read_manifest(adapter)
    assert manifest["extra"] == {"global_step": 7}
    listed = {entry["path"] for entry in manifest["files"]}
    assert {"adapter_model.safetensors", f"{BACKUP_PREFIX}adapter_model.safetensors"} <= listed


def test_an_incomplete_directory_is_not_blessed_by_a_new_manifest(tmp_path, caplog):
    from finetune_engine.manifest import MANIFEST_NAME, verify_directory, write_manifest

    adapter = _plain_adapter(tmp_path / "adapter")
    write_manifest(adapter)
    (adapter / "adapter_config.json").write_text("{}  ")  # changed after the manifest: size mismatch
    before = (adapter / MANIFEST_NAME).read_bytes()
    caplog.set_level("WARNING", logger="finetune_engine.adapters")
    assert create_vllm_compatible_adapter(adapter)["action"] == "removed"
    assert (adapter / MANIFEST_NAME).read_bytes() == before and "does not match" in caplog.text
    assert not verify_directory(adapter)[0]


def test_without_adapter_config_the_weights_alone_decide(tmp_path, capsys):
    adapter = _plain_adapter(tmp_path / "adapter", with_config=False)
    assert main([str(adapter)]) == 0
    assert set(load_file(str(adapter / "adapter_model.safetensors"))) == {
        "m.q_proj.lora_A.weight",
        "m.q_proj.lora_B.weight",
    }
    assert "no adapter_config.json" in capsys.readouterr().err  # a preflight warning, not an error
    assert main([str(adapter), "--strict"]) == 1
