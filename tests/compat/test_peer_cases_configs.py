"""The Silogen engine's tests/test_configs.py, case by case, against this engine's config loader.

The peer tests its pydantic base class and its config classes directly; this engine's equivalent
public surface is ``finetune_engine.config.parse_config`` / ``load_config`` (the strict schema), the
training_args check, the batch-size derivation and the PEFT config builder.
"""

from __future__ import annotations

import pytest
import yaml

PEER_SFT_YAML = """\
data_conf:
  chat_template_name: "chat-ml"
  training_data:
    type: PRECOMPUTE_WEIGHTED_MIX
    datasets:
      - path: "./Dolly-Silosplit"
        sampling_weight: 1.0
      - path: "./OASST1"
        sampling_weight: 0.5
  validation_data:
    type: CONCATENATION
    datasets:
      - path: "Dolly-Silosplit"
batchsize_conf:
  total_train_batch_size: 512
  max_per_device_train_batch_size: 4
training_args:
  output_dir: "/experiments/SFT_DOLLY_BASIC/Config-Development-Experiments/EXP-B-replicate-with-new-data"
  bf16: {bf16}
  gradient_checkpointing: true
  gradient_checkpointing_kwargs: {{"use_reentrant": false}}
  learning_rate: 2.0e-05
  logging_steps: 5
  logging_strategy: "steps"
  lr_scheduler_type: "cosine"
  max_steps: 50
  num_train_epochs: 23
  overwrite_output_dir: true
  push_to_hub: False
  report_to: ["none"]
  save_strategy: "steps"
  save_steps: 5
  eval_strategy: "epoch"
{method_args}peft_conf:
  peft_type: "LORA"
  task_type: "CAUSAL_LM"
  peft_kwargs:
    r: 64
    lora_alpha: 16
    lora_dropout: 0.1
    target_modules:
      - q_proj
      - k_proj
      - v_proj
      - o_proj
run_conf:
  model: mistralai/Mistral-7B-v0.1
  model_args:
    attn_implementation: "flash_attention_2"
    use_cache: False
  resume_from_checkpoint: False
{tracking}"""

SFT_ARGS = "sft_args:\n  max_seq_length: 2048\n"
DPO_ARGS = '  beta: 0.01\n  loss_type: "sigmoid"\n  max_prompt_length: 123\n'
TRACKING = (
    'tracking:\n  mlflow_server_uri: "file:///mlruns"\n  '
    'experiment_name: default\n  hf_mlflow_log_artifacts: "False"\n'
)


def peer_sft_yaml(bf16: str = "true") -> str:
    return PEER_SFT_YAML.format(bf16=bf16, method_args=SFT_ARGS, tracking=TRACKING)


def peer_dpo_yaml() -> str:
    # The peer's DPO config puts beta/loss_type/max_prompt_length in training_args and has no
    # sft_args and no tracking section.
    text = PEER_SFT_YAML.format(bf16="true", method_args="", tracking="")
    return text.replace('  eval_strategy: "epoch"\n', '  eval_strategy: "epoch"\n' + DPO_ARGS)


def _minimal() -> dict:
    return {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": "train.jsonl"}]},
            "validation_data": {"type": "AUTO_SPLIT"},
        },
        "batchsize_conf": {"total_train_batch_size": 4},
        "run_conf": {"model": "some/model"},
    }


def _load(tmp_path, text: str, method: str = "sft"):
    from finetune_engine.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, method=method)


def test_validation():
    """Restates test_configs.py::test_validation: strict sections (valid input passes, a wrong key,
    an empty input, an extra key and a wrong nested structure are refused; defaults apply and can be
    changed). The peer checks its BaseConfig class; here the experiment schema itself."""
    from finetune_engine.config import ConfigError, parse_config

    # Valid:
    assert parse_config(_minimal()).run_conf.model == "some/model"
    # Wrong key specified (model misspelled):
    wrong = _minimal()
    wrong["run_conf"] = {"modle": "some/model"}
    with pytest.raises(ConfigError):
        parse_config(wrong)
    # Empty input:
    with pytest.raises(ConfigError):
        parse_config({})
    # Additional input:
    extra = _minimal()
    extra["run_conf"]["bar"] = "Another string"
    with pytest.raises(ConfigError):
        parse_config(extra)
    # Nested structure is enforced:
    nested = _minimal()
    nested["run_conf"] = "A string"
    with pytest.raises(ConfigError):
        parse_config(nested)
    # A default works, and can be changed:
    assert parse_config(_minimal()).data_conf.validation_data.ratio == 0.2
    changed = _minimal()
    changed["data_conf"]["validation_data"]["ratio"] = 0.3
    assert parse_config(changed).data_conf.validation_data.ratio == 0.3


def test_yaml_instantiation(tmp_path):
    """Restates test_configs.py::test_yaml_instantiation: a config loads from YAML, an unknown nested
    key in YAML is refused, and a loaded config dumped back to YAML loads to the same config."""
    from finetune_engine.config import ConfigError, parse_config

    text = yaml.safe_dump(_minimal())
    cfg = _load(tmp_path, text)
    assert cfg.run_conf.model == "some/model"
    assert cfg.batchsize_conf.total_train_batch_size == 4
    bad = _minimal()
    bad["run_conf"]["buzz"] = 3
    with pytest.raises(ConfigError):
        _load(tmp_path, yaml.safe_dump(bad))
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again.batchsize_conf.total_train_batch_size == 4
    assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    "key", ["per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"]
)
def test_disallowed_input(key):
    """Restates test_configs.py::test_disallowed_input: the peer's DisallowedInput fields
    (training_args.per_device_train_batch_size, gradient_accumulation_steps and
    per_device_eval_batch_size come from batchsize_conf) are refused when given, even when the
    value equals the one the engine would derive; left out, the config is fine."""
    from finetune_engine.config import ConfigError, parse_config

    assert parse_config(_minimal()).training_args.get(key) is None
    cfg = _minimal()
    cfg["training_args"] = {key: 1}
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert key in str(err.value)


def test_hf_training_args_config():
    """Restates test_configs.py::test_hf_training_args_config: training_args with just output_dir
    are accepted, and what was set survives a round trip through the check unchanged."""
    from finetune_engine.config.training_args import check_training_args

    args = check_training_args({"output_dir": "Dummy dir"}, method="sft")
    assert args["output_dir"] == "Dummy dir"
    recreated = check_training_args(dict(args), method="sft")
    assert recreated == args


def test_peft_config():
    """Restates test_configs.py::test_peft_config: peft_type LORA / task_type CAUSAL_LM builds a
    peft LoraConfig, with and without peft_kwargs."""
    import peft

    from finetune_engine.config import parse_config
    from finetune_engine.modeling import peft_config

    base = _minimal()
    base["peft_conf"] = {"peft_type": "LORA", "task_type": "CAUSAL_LM"}
    assert isinstance(peft_config(parse_config(base), model=None), peft.LoraConfig)
    base["peft_conf"]["peft_kwargs"] = {"r": 32, "target_modules": ["v_proj"]}
    built = peft_config(parse_config(base), model=None)
    assert isinstance(built, peft.LoraConfig)
    assert built.r == 32 and set(built.target_modules) == {"v_proj"}


def test_full_sft_config(tmp_path):
    """Restates test_configs.py::test_full_sft_config: the peer's full SFT config (weighted mix,
    overwrite_output_dir, push_to_hub: False, num_train_epochs, flash_attention_2, tracking with a
    string hf_mlflow_log_artifacts) loads without an error."""
    cfg = _load(tmp_path, peer_sft_yaml())
    assert cfg.batchsize_conf.total_train_batch_size == 512


def test_full_config_resolve_training_arguments(tmp_path):
    """Restates test_configs.py::test_full_config_resolve_training_arguments: the per-device batch
    is not set in the config; resolved for one process, total 512 with at most 4 per device gives
    per_device_train_batch_size 4 and gradient_accumulation_steps 128, and the resolved arguments
    are real transformers TrainingArguments (distributed_state is there)."""
    from transformers import TrainingArguments

    from finetune_engine.config.batchsize import derive_batch_plan
    from finetune_engine.recipes.common import training_args_dict

    cfg = _load(tmp_path, peer_sft_yaml(bf16="false"))
    assert "per_device_train_batch_size" not in cfg.training_args
    bs = cfg.batchsize_conf
    plan = derive_batch_plan(bs.total_train_batch_size, bs.max_per_device_train_batch_size, 1)
    args = TrainingArguments(**training_args_dict(cfg, plan, tmp_path / "out", seed=1, has_eval=True))
    assert args.per_device_train_batch_size == 4
    assert args.gradient_accumulation_steps == 128
    assert args.distributed_state is not None


def test_dpo_config(tmp_path):
    """Restates test_configs.py::test_dpo_config: the peer's DPO config (beta, loss_type and
    max_prompt_length in training_args) loads as a dpo config without an error."""
    cfg = _load(tmp_path, peer_dpo_yaml(), method="dpo")
    assert cfg.training_args["beta"] == 0.01
    assert cfg.training_args["max_prompt_length"] == 123
