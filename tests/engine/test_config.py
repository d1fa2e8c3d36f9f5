"""The experiment schema: shipped configs validate, bad keys fail with their path, batch derivation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_engine.config import ConfigError, apply_overrides, load_config, parse_config
from finetune_engine.config.batchsize import derive_batch_plan

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "engine" / "configs").glob("*.yaml"))
BASE = {
    "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]}},
    "batchsize_conf": {"total_train_batch_size": 8},
    "run_conf": {"model": "m"},
}


def _with(*overrides: str) -> dict:
    return apply_overrides(BASE, overrides)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    # The method is the one of the `finetuning <method>` command the config's comments give (default sft).
    command = re.search(r"finetuning (sft|dpo|kto|orpo|cpo) ", path.read_text())
    cfg = load_config(path, method=command.group(1) if command else "sft")
    assert cfg.batchsize_conf.total_train_batch_size > 0


def test_shipped_configs_exist():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["data_conf.chat_templte=chat-ml"],
            "data_conf.chat_templte: unknown key; did you mean 'chat_template_name'?",
        ),
        (["run_conf.modle=x"], "run_conf.modle: unknown key; did you mean 'model'?"),
        (
            ["data_conf.training_data.datasets[0].pth=x"],
            "data_conf.training_data.datasets[0].pth: unknown key; did you mean 'path'?",
        ),
        (
            ["training_args.learnin_rate=0.1"],
            "training_args.learnin_rate: not a sft trainer argument (did you mean 'learning_rate'?)",
        ),
        (
            ["training_args.per_device_train_batch_size=4"],
            "training_args.per_device_train_batch_size: derived from batchsize_conf",
        ),
        (
            ["training_args.gradient_accumulation_steps=4"],
            "training_args.gradient_accumulation_steps: derived from batchsize_conf",
        ),
        (["training_args.hub_token=hf_x"], "training_args.hub_token: secrets never go in a config"),
        (["training_args.learning_rate=fast"], "training_args.learning_rate: expected float"),
        (["training_args.max_steps=true"], "training_args.max_steps: expected int"),
        (["peft_conf.peft_type=LORRA"], "peft_conf: peft_type 'LORRA' is not one of"),
        (
            ["peft_conf.peft_type=LORA", "peft_conf.peft_kwargs.r=0"],
            "peft_conf.peft_kwargs: r must be a positive integer",
        ),
        (
            ["peft_conf.peft_type=LORA", "peft_conf.peft_kwargs.target_modules=q_proj vproj"],
            "looks like several names in one string",
        ),
        (
            [
                "quant_conf.quantization_type=bits-and-bytes",
                "quant_conf.load_in_4bit=true",
                "quant_conf.load_in_8bit=true",
                "peft_conf.peft_type=LORA",
            ],
            "load_in_4bit and load_in_8bit are both true",
        ),
        (
            ["quant_conf.quantization_type=bits-and-bytes", "quant_conf.load_in_4bit=true"],
            "cannot be trained without an adapter",
        ),
        (["run_conf.model_args.trust_remote_code=true"], "pin run_conf.model_args.revision"),
        (
            ["run_conf.final_checkpoint_name=../x"],
            "run_conf.final_checkpoint_name: must be a plain directory name",
        ),
        (
            ["data_conf.validation_data.type=AUTO_SPLIT", "data_conf.validation_data.ratio=1.5"],
            "data_conf.validation_data.ratio",
        ),
        (
            [
                "data_conf.training_data.type=PRECOMPUTE_WEIGHTED_MIX",
                "data_conf.training_data.datasets[0].sampling_weight=0",
            ],
            "every dataset has sampling_weight 0",
        ),
        (
            [
                "data_conf.training_data.type=PRECOMPUTE_WEIGHTED_MIX",
                "data_conf.training_data.datasets[0].sampling_weight=-1",
            ],
            "data_conf.training_data.datasets[0].sampling_weight",
        ),
        (["batchsize_conf.total_train_batch_size=0"], "batchsize_conf.total_train_batch_size"),
        (["sft_args.length_handling=drop"], "sft_args.length_handling"),
        (["overrides.lr_batch_size_scaling=cubic"], "overrides.lr_batch_size_scaling"),
        (["run_conf.determinism=total"], "run_conf.determinism"),
        (["tracking.mlflow_uri=x"], "tracking.mlflow_uri: unknown key; did you mean 'mlflow_server_uri'?"),
    ],
)
def test_bad_keys_fail_with_their_path(overrides, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_with(*overrides))
    assert expected in str(err.value), str(err.value)


def test_missing_sections_and_every_problem_reported_together():
    with pytest.raises(ConfigError) as err:
        parse_config({"data_conf": {"training_data": {"type": "CONCATENATION", "datasets": []}}, "extra": 1})
    text = str(err.value)
    for needle in (
        "batchsize_conf: required key is missing",
        "run_conf: required key is missing",
        "extra: unknown key",
        "datasets",
    ):
        assert needle in text
    assert len(err.value.problems) >= 4


def test_errors_carry_file_and_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False) + "sft_args:\n  max_seq_lenght: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = path.read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines, 1) if "max_seq_lenght" in line)
    assert f"sft_args.max_seq_lenght ({path}:{line_no}): unknown key; did you mean 'max_seq_length'?" in str(
        err.value
    )


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data_conf:\n  training_data: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)


def test_set_overrides_parse_yaml_values_and_indices():
    out = apply_overrides(
        BASE,
        [
            "peft_conf.peft_kwargs.r=16",
            "peft_conf.peft_kwargs.target_modules=[q_proj, v_proj]",
            "data_conf.training_data.datasets[0].path=other.jsonl",
            "training_args.bf16=true",
        ],
    )
    assert out["peft_conf"]["peft_kwargs"] == {"r": 16, "target_modules": ["q_proj", "v_proj"]}
    assert out["data_conf"]["training_data"]["datasets"][0]["path"] == "other.jsonl"
    assert out["training_args"]["bf16"] is True
    assert BASE["data_conf"]["training_data"]["datasets"][0]["path"] == "d.jsonl"  # input untouched
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(BASE, ["nonsense"])
    with pytest.raises(ConfigError, match="index 3 out of range"):
        apply_overrides(BASE, ["data_conf.training_data.datasets[3].path=x"])


@pytest.mark.parametrize(
    "total,max_per_device,world,expected",
    [
        (64, 8, 1, (8, 8)),
        (64, 8, 8, (8, 1)),
        (64, 2, 8, (2, 4)),
        (64, 16, 1, (16, 4)),
        (12, 8, 1, (6, 2)),
        (12, 5, 2, (3, 2)),
        (7, 4, 1, (1, 7)),
        (1, 8, 1, (1, 1)),
        (96, 10, 4, (8, 3)),
    ],
)
def test_batch_derivation(total, max_per_device, world, expected):
    plan = derive_batch_plan(total, max_per_device, world)
    assert (plan.per_device, plan.accumulation) == expected
    assert plan.total == total and plan.per_device <= max_per_device


def test_batch_derivation_refuses_uneven_split():
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        derive_batch_plan(10, 4, 4)


def test_reference_doc_and_trainer_catalog_are_current():
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_engine.config.generate", "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_config_package_imports_no_torch():
    code = (
        "import sys, finetune_engine.config as c; c.load_config; assert "
        "'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_helm_style_exponent_floats_are_numbers(tmp_path):
    """Helm writes 0.00005 as 5e-05, which YAML 1.1 (PyYAML) reads as a string; YAML 1.2 and the engine
    read a float. Real strings and integers keep their types."""
    from finetune_engine.config.yamlio import safe_load

    doc = safe_load("a: 5e-05\nb: 1E+3\nc: -2e4\nd: '5e-05'\ne: 3\nf: 1.5e-3\ng: e5\nh: 5e\n")
    assert doc == {
        "a": 5e-05,
        "b": 1000.0,
        "c": -20000.0,
        "d": "5e-05",
        "e": 3,
        "f": 0.0015,
        "g": "e5",
        "h": "5e",
    }
    assert yaml.safe_load("a: 5e-05") == {"a": "5e-05"}  # the plain loader this replaces
