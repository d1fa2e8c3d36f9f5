"""The Silogen engine's output layout, defaults and resume, on configs shaped as its chart renders them.

The chart (ai-workloads, llm-finetune-silogen-engine) runs the engine in /workdir without
training_args.output_dir (so ./checkpoints), with run_conf.final_checkpoint_name
checkpoint-final-adapter for adapter runs and resume_from_checkpoint auto, and then runs
``create_vllm_compatible_adapter --training-config CFG ./checkpoints/checkpoint-final-adapter`` and,
with mergeAdapter,
``merge_adapter BASE ./checkpoints/checkpoint-final-adapter ./checkpoints/checkpoint-final``
(BASE: ./checkpoints/checkpoint-new-basemodel when it exists).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from finetune_engine.adapters import main as create_vllm_compatible_adapter
from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.manifest import MANIFEST_NAME
from finetune_engine.merge import main as merge_adapter_cli

LORA = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "peft_kwargs": {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
}
NO_PEFT = {"peft_type": "NO_PEFT"}


def _chart_config(
    workdir: Path, model: Path, data: Path, peft: dict, template: str = "keep-original", **run
) -> Path:
    """A config as the chart's configmap renders it (model and data paths local, few steps)."""
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": template,
        },
        "training_args": {
            "learning_rate": 0.003,
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
            "seed": 42,
        },
        "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 4},
        "peft_conf": peft,
        "run_conf": {
            "model": str(model),
            "final_checkpoint_name": "checkpoint-final"
            if peft["peft_type"] == "NO_PEFT"
            else "checkpoint-final-adapter",
            "resume_from_checkpoint": "auto",
            **run,
        },
        "sft_args": {"max_seq_length": 128},
    }
    path = workdir / "finetuning_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, workdir: Path) -> dict:
    assert (
        finetuning(
            ["sft", str(config), "--num-preprocess-workers", "1", "--result-file", str(workdir / "r.json")]
        )
        == 0
    )
    return json.loads((workdir / "r.json").read_text())


def test_lora_run_leaves_the_adapter_where_the_charts_next_commands_read_it(
    tiny_model, chat_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHECKPOINTS_PATH", raising=False)
    config = _chart_config(tmp_path, tiny_model, chat_data, LORA)
    result = _train(config, tmp_path)

    ckpts = Path("checkpoints")
    adapter = ckpts / "checkpoint-final-adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "tokenizer_config.json").is_file() and (adapter / MANIFEST_NAME).is_file()
    assert not (adapter / "model.safetensors").exists()
    # no merge unless asked, no grown base (no tokens added), nothing named after the adapter
    assert sorted(
        p.name for p in ckpts.iterdir() if not p.name.startswith("checkpoint-") or not p.name[11:].isdigit()
    ) == ["checkpoint-final-adapter", "result.json"]
    assert (
        result["final_adapter"] == str(adapter)
        and result["final_checkpoint"] is None
        and result["grown_base"] is None
    )

    # the chart's next commands, as it runs them
    assert (
        create_vllm_compatible_adapter(
            ["--training-config", str(config), "./checkpoints/checkpoint-final-adapter"]
        )
        == 0
    )
    assert (
        merge_adapter_cli(
            [str(tiny_model), "./checkpoints/checkpoint-final-adapter", "./checkpoints/checkpoint-final"]
        )
        == 0
    )
    merged = load_file("checkpoints/checkpoint-final/model.safetensors")
    base = load_file(str(tiny_model / "model.safetensors"))
    q = next(k for k in base if "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.allclose(merged[q], base[q]), "the merged model does not carry the adapter"
    v = next(k for k in base if "layers.0.mlp" in k and k.endswith("weight"))
    assert torch.equal(merged[v], base[v])  # untargeted modules are the base's


def test_added_tokens_save_the_grown_base_by_its_silogen_name_and_merge_asked_goes_beside(
    tiny_model, chat_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHECKPOINTS_PATH", str(tmp_path / "ckpts"))  # the peer's env override of the default
    config = _chart_config(tmp_path, tiny_model, chat_data, LORA, template="chat-ml", merge_adapter=True)
    result = _train(config, tmp_path)

    ckpts = tmp_path / "ckpts"
    grown, adapter, merged = (
        ckpts / "checkpoint-new-basemodel",
        ckpts / "checkpoint-final-adapter",
        ckpts / "checkpoint-final",
    )
    assert result["grown_base"] == str(grown) and result["final_adapter"] == str(adapter)
    assert result["final_checkpoint"] == str(
        merged
    )  # checkpoint-final-adapter -> checkpoint-final, as the chart's merge
    base_rows = load_file(str(tiny_model / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    assert load_file(str(grown / "model.safetensors"))["model.embed_tokens.weight"].shape[0] == base_rows + 2
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    assert (merged / "model.safetensors").is_file() and (merged / MANIFEST_NAME).is_file()

    # the chart's merge step (base: checkpoint-new-basemodel, since it exists) gives the same model
    assert merge_adapter_cli([str(grown), str(adapter), str(tmp_path / "chart-merged")]) == 0
    ours, chart = (
        load_file(str(merged / "model.safetensors")),
        load_file(str(tmp_path / "chart-merged" / "model.safetensors")),
    )
    assert ours.keys() == chart.keys() and all(torch.allclose(ours[k], chart[k], atol=1e-5) for k in ours)


def _plain_trainer_checkpoint(model_dir: Path, out: Path, steps: int) -> Path:
    """Train ``steps`` steps with a bare transformers Trainer (no callbacks of ours, no manifest),
    as the Silogen engine does, saving checkpoint-<steps> into ``out``."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        for ids in torch.randint(5, model.config.vocab_size, (32, 24), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.003,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    ckpt = out / f"checkpoint-{steps}"
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / MANIFEST_NAME).exists()
    return ckpt


def test_auto_resumes_from_a_plain_trainer_checkpoint_and_deletes_nothing(
    tiny_model, chat_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHECKPOINTS_PATH", raising=False)
    theirs = _plain_trainer_checkpoint(tiny_model, tmp_path / "checkpoints", steps=2)
    state_before = (theirs / "trainer_state.json").read_text()
    cut = tmp_path / "checkpoints" / "checkpoint-5"  # someone else's save, cut off before trainer_state.json
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"partial")
    config = _chart_config(tmp_path, tiny_model, chat_data, NO_PEFT)
    data = yaml.safe_load(config.read_text())
    data["training_args"]["max_steps"] = 6
    config.write_text(yaml.safe_dump(data))
    caplog.set_level(logging.INFO)
    result = _train(config, tmp_path)

    assert result["resumed_from"] == "checkpoint-2" and result["global_step"] == 6
    assert "training: step 2 of 6" in caplog.text
    assert (theirs / "trainer_state.json").read_text() == state_before  # resumed from, not rewritten
    assert (cut / "model.safetensors").read_bytes() == b"partial"  # not complete, not ours: left as it was
    assert (tmp_path / "checkpoints" / "checkpoint-4" / MANIFEST_NAME).is_file()
    # a full fine-tune: the model itself in checkpoint-final, no adapter anywhere
    final = tmp_path / "checkpoints" / "checkpoint-final"
    assert result["final_checkpoint"] == "checkpoints/checkpoint-final" and result["final_adapter"] is None
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    assert not (tmp_path / "checkpoints" / "checkpoint-final-merged").exists()


def test_false_default_starts_from_step_0_beside_existing_checkpoints(
    tiny_model, chat_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHECKPOINTS_PATH", raising=False)
    theirs = _plain_trainer_checkpoint(tiny_model, tmp_path / "checkpoints", steps=2)
    state_before = (theirs / "trainer_state.json").read_text()
    config = _chart_config(tmp_path, tiny_model, chat_data, NO_PEFT)
    data = yaml.safe_load(config.read_text())
    del data["run_conf"]["resume_from_checkpoint"]  # the Silogen default: false
    data["training_args"].update(max_steps=3, save_steps=3)
    config.write_text(yaml.safe_dump(data))
    caplog.set_level(logging.INFO)
    result = _train(config, tmp_path)

    assert result["resumed_from"] is None and result["global_step"] == 3
    assert "training: step 0 of 3" in caplog.text
    assert "run_conf.resume_from_checkpoint is false: training starts from step 0 although" in caplog.text
    assert (theirs / "trainer_state.json").read_text() == state_before  # left in place
    assert (tmp_path / "checkpoints" / "checkpoint-3" / MANIFEST_NAME).is_file()
    # false trains again even when the run finished (no skip), as the Silogen engine does
    again = _train(config, tmp_path)
    assert again["status"] == "completed" and again["resumed_from"] is None
