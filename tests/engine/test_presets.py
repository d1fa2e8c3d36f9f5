"""Model presets: matching by Hub id and config.json model_type, defaults applied only where the
config is silent, explicit values win, run_conf.preset choices, and the CLI listing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from finetune_engine.config import ConfigError, parse_config
from finetune_engine.config.presets import ATTENTION_MLP, BY_NAME, CATALOG, match_preset

PHI3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _config(model: str, peft_kwargs: dict | None = None, **data_conf) -> dict:
    return {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]},
            **data_conf,
        },
        "batchsize_conf": {"total_train_batch_size": 8},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 8, **(peft_kwargs or {})}},
        "run_conf": {"model": model},
    }


@pytest.mark.parametrize(
    "model,name",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("meta-llama/Meta-Llama-3-8B", "llama-3.1-8b"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.x-70b"),
        ("s3://finetune/models/Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("Qwen/Qwen2.5-0.5B", "qwen2.5-small"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
        ("s3://finetune/models/TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama-1.1b"),
        ("Qwen/Qwen3-0.6B", "qwen3-small"),
        ("Qwen/Qwen3-8B", "qwen3-8b"),
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("google/gemma-3-1b-it", "gemma-3-1b"),
        ("microsoft/Phi-4-mini-instruct", "phi-4-mini"),
    ],
)
def test_matched_by_hub_id(model, name):
    preset, why = match_preset(model)
    assert preset.name == name and "model id" in why


def test_unknown_model_matches_nothing_and_family_entries_need_model_type():
    assert match_preset("openai-community/gpt2") is None
    assert match_preset("s3://bucket/models/org/tiny") is None  # no id pattern, no local config.json


def test_local_directory_matched_by_model_type(tiny_model_dir, tmp_path):
    preset, why = match_preset(str(tiny_model_dir))
    assert preset.name == "llama" and "model_type 'llama'" in why
    other = tmp_path / "m"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    assert match_preset(str(other))[0].name == "phi3"


def test_defaults_applied_when_left_out_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.config.presets")
    cfg = parse_config(_config("microsoft/Phi-3-mini-4k-instruct"))
    assert cfg.peft_conf.peft_kwargs["target_modules"] == PHI3
    # A matched preset leaves the chat template to the Silogen engine's default, and says so.
    assert cfg.data_conf.chat_template_name == "mistral-with-system"
    assert "model preset phi-3-mini" in caplog.text and "target_modules" in caplog.text
    assert "suggests data_conf.chat_template_name: keep-original" in caplog.text
    cfg = parse_config(_config("Qwen/Qwen2.5-7B-Instruct"))
    assert cfg.peft_conf.peft_kwargs["target_modules"] == list(ATTENTION_MLP)
    assert cfg.data_conf.chat_template_name == "mistral-with-system"
    # A preset named in the config fills the template too.
    data = _config("Qwen/Qwen2.5-7B-Instruct")
    data["run_conf"]["preset"] = "qwen2.5-7b"
    assert parse_config(data).data_conf.chat_template_name == "chat-ml"


def test_explicit_config_wins():
    cfg = parse_config(
        _config(
            "meta-llama/Llama-3.1-8B-Instruct",
            {"target_modules": ["q_proj", "v_proj"]},
            chat_template_name="chat-ml",
        )
    )
    assert cfg.peft_conf.peft_kwargs["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.data_conf.chat_template_name == "chat-ml"
    # --set beats the preset too (overrides are applied before it).
    cfg = parse_config(
        _config("meta-llama/Llama-3.1-8B-Instruct"),
        overrides=["peft_conf.peft_kwargs.target_modules=all-linear"],
    )
    assert cfg.peft_conf.peft_kwargs["target_modules"] == "all-linear"
    assert cfg.data_conf.chat_template_name == "mistral-with-system"  # the config left it out: the default


def test_no_adapter_gets_only_the_template_and_preset_none_disables():
    data = _config("microsoft/Phi-3-mini-4k-instruct")
    data["peft_conf"] = {"peft_type": "NO_PEFT"}
    data["run_conf"]["preset"] = "phi-3-mini"
    cfg = parse_config(data)
    assert cfg.data_conf.chat_template_name == "keep-original"
    data = _config("Qwen/Qwen2.5-7B-Instruct")
    data["run_conf"]["preset"] = "none"
    cfg = parse_config(data)
    assert (
        "target_modules" not in cfg.peft_conf.peft_kwargs
        and cfg.data_conf.chat_template_name == "mistral-with-system"
    )


def test_named_preset_forced_and_unknown_name_refused():
    data = _config("s3://bucket/models/org/my-finetune")
    data["run_conf"]["preset"] = "phi-3-mini"
    assert parse_config(data).peft_conf.peft_kwargs["target_modules"] == PHI3
    data["run_conf"]["preset"] = "phi-4"
    with pytest.raises(ConfigError, match="unknown preset 'phi-4'"):
        parse_config(data)


def test_local_model_without_chat_template_gets_chat_ml(tiny_model, tmp_path):
    cfg = parse_config(_config(str(tiny_model)))
    assert (
        cfg.data_conf.chat_template_name == "mistral-with-system"
    )  # auto: the default, as in the Silogen engine
    named = _config(str(tiny_model))
    named["run_conf"]["preset"] = "llama"
    assert (
        parse_config(named).data_conf.chat_template_name == "keep-original"
    )  # the tiny tokenizer has a template
    tc = tiny_model / "tokenizer_config.json"
    data = json.loads(tc.read_text())
    data.pop("chat_template", None)
    tc.write_text(json.dumps(data))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (tiny_model / extra).unlink(missing_ok=True)
    cfg = parse_config(named)
    assert cfg.data_conf.chat_template_name == "chat-ml"
    assert cfg.peft_conf.peft_kwargs["target_modules"] == list(ATTENTION_MLP)


def test_catalog_is_consistent():
    from finetune_engine.config.schema import ChatTemplateName

    templates = {t.value for t in ChatTemplateName}
    assert len(BY_NAME) == len(CATALOG)
    for p in CATALOG:
        assert p.patterns or p.model_types, p.name
        assert p.chat_template in templates and p.target_modules and p.gpus >= 1 and p.gpu_memory_gib >= 8


def test_cli_lists_presets():
    out = subprocess.run(
        [sys.executable, "-m", "finetune_engine.cli.main", "presets"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in BY_NAME:
        assert name in out.stdout
    assert "GPUs x GiB" in out.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from finetune_engine.config.presets import main; "
            "main([]); assert 'torch' not in sys.modules",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    match = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_engine.cli.main",
            "presets",
            "--match",
            "Qwen/Qwen2.5-7B-Instruct",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert match.returncode == 0 and json.loads(match.stdout)["name"] == "qwen2.5-7b"
    none = subprocess.run(
        [sys.executable, "-m", "finetune_engine.cli.main", "presets", "--match", "gpt2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert none.returncode == 1 and "no preset matches" in none.stdout
