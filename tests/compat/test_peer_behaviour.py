"""Behaviours the Silogen engine's own tests assert, restated against this engine.

Each test names the peer test it restates (silogen/llm-finetuning, tests/). Config and data are
checked with ``finetuning --validate-only``: no model is trained.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import DATA, write_yaml


def _validate(tmp_path, data_files, method="sft", **data_conf):
    from finetune_engine.cli import finetuning

    paths = []
    for name in data_files:
        shutil.copyfile(DATA / name, tmp_path / name)
        paths.append(str(tmp_path / name))
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": p} for p in paths]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
            **data_conf,
        },
        "training_args": {"max_steps": 1},
        "batchsize_conf": {"total_train_batch_size": 1, "max_per_device_train_batch_size": 1},
        "run_conf": {"model": "unused-for-validation"},
    }
    if method == "sft":
        cfg["sft_args"] = {"max_seq_length": 128}
    return finetuning.main(["--validate-only", method, str(write_yaml(tmp_path / "config.yaml", cfg))])


@pytest.mark.parametrize(
    "data_file",
    [
        # test_dataset / the tutorial data script: every row has an empty system message
        "argilla-mistral-large-human-prompts.jsonl",
        # data_types.ChatConversation ignores unknown top-level keys (data_source, extra_info)
        "long-random-data.jsonl",
        # data_types.ChatConversation/ChatMessage: optional tags and labels
        "tags-labels.jsonl",
        # test_e2e writes its data with json.dumps(list): a JSON array
        "e2e-sft-array.json",
        # rows without dataset/id (tutorial-05 OPI script)
        "OPI_updated_160k.sample1000.jsonl",
        "odia-msgfmt.jsonl",
    ],
)
def test_sft_data_in_peer_formats_is_accepted(data_file, tmp_path):
    assert _validate(tmp_path, [data_file]) == 0


@pytest.mark.parametrize("data_file", ["ultrafeedback-binarized.json", "e2e-dpo-array.json"])
def test_dpo_data_in_peer_formats_is_accepted(data_file, tmp_path):
    """data_types.DirectPreference; test_e2e test_dpo_llama writes a JSON array."""
    assert _validate(tmp_path, [data_file], method="dpo") == 0


@pytest.mark.parametrize(
    "name", ["keep-original", "chat-ml", "mistral-with-system", "simplified-llama31", "poro"]
)
def test_every_peer_chat_template_name_is_known(name, tmp_path):
    """test_chat_template: the peer's template names (data/chat_templates.py) are all accepted."""
    assert _validate(tmp_path, ["odia-msgfmt.jsonl"], chat_template_name=name) == 0


def test_weighted_mix_defaults_sampling_weight_to_one(tmp_path):
    """config/data.py: a PRECOMPUTE_WEIGHTED_MIX dataset without sampling_weight weighs 1.0."""
    from finetune_engine.cli import finetuning

    shutil.copyfile(DATA / "odia-msgfmt.jsonl", tmp_path / "a.jsonl")
    cfg = {
        "data_conf": {
            "training_data": {
                "type": "PRECOMPUTE_WEIGHTED_MIX",
                "datasets": [{"path": str(tmp_path / "a.jsonl")}],
            },
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
        },
        "training_args": {"max_steps": 1},
        "batchsize_conf": {"total_train_batch_size": 1, "max_per_device_train_batch_size": 1},
        "run_conf": {"model": "unused-for-validation"},
        "sft_args": {"max_seq_length": 128},
    }
    assert finetuning.main(["--validate-only", "sft", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 0


def test_chart_number_formatting_is_read_as_numbers(tmp_path):
    """Helm writes 0.00005 as 5e-05, which a YAML 1.1 loader reads as a string; the peer's pydantic
    training arguments coerce it to a float, so learning_rate: 5e-05 must be a number here too."""
    from finetune_engine.config import load_config

    shutil.copyfile(DATA / "odia-msgfmt.jsonl", tmp_path / "a.jsonl")
    text = f"""\
data_conf:
  training_data:
    type: CONCATENATION
    datasets:
      - path: {tmp_path / "a.jsonl"}
  validation_data:
    type: NONE
  chat_template_name: keep-original
training_args:
  learning_rate: 5e-05
  weight_decay: 1e-06
batchsize_conf:
  total_train_batch_size: 1
  max_per_device_train_batch_size: 1
run_conf:
  model: unused
"""
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(str(tmp_path / "c.yaml"), method="sft")
    assert float(cfg.training_args["learning_rate"]) == 5e-05
    assert float(cfg.training_args["weight_decay"]) == 1e-06
