"""The experiment schema: shipped configs validate, bad keys fail with their path, batch derivation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_engine.config import ConfigError, apply_overrides, load_config, parse_config
from finetune_engine.config.architectures import MODULE_NAMES
from finetune_engine.config.batchsize import derive_batch_plan
from finetune_engine.config.training_args import check_training_args

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


LORA = ["peft_conf.peft_type=LORA"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["training_args.max_steps=0"], "training_args.max_steps: 0 is not a step count"),
        (["training_args.max_steps=-5"], "training_args.max_steps: -5 is not a step count"),
        (["training_args.num_train_epochs=0"], "training_args.num_train_epochs: must be greater than 0"),
        (
            ["training_args.num_train_epochs=-1", "training_args.max_steps=-1"],
            "training_args.num_train_epochs: must be greater than 0",
        ),
        (["training_args.learning_rate=0"], "training_args.learning_rate: must be greater than 0, got 0"),
        (["training_args.learning_rate=-1e-5"], "training_args.learning_rate: must be greater than 0"),
        (["training_args.learning_rate=.nan"], "training_args.learning_rate: nan is not a usable value"),
        (["training_args.learning_rate=.inf"], "training_args.learning_rate: inf is not a usable value"),
        (["training_args.max_grad_norm=-.inf"], "training_args.max_grad_norm: -inf is not a usable value"),
        (
            ["training_args.lr_scheduler_kwargs={min_lr: .nan}"],
            "training_args.lr_scheduler_kwargs: {'min_lr': nan} is not a usable value",
        ),
        (["training_args.save_steps=-1"], "training_args.save_steps: must not be negative"),
        (["training_args.eval_steps=-10"], "training_args.eval_steps: must not be negative"),
        (["training_args.logging_steps=-0.5"], "training_args.logging_steps: must not be negative"),
        (["training_args.logging_steps=0"], "training_args.logging_steps: 0 with logging_strategy steps"),
        (["training_args.warmup_steps=-1"], "training_args.warmup_steps: must not be negative"),
        (["training_args.output_dir=/"], "training_args.output_dir: is the filesystem root"),
        (["training_args.output_dir=//."], "training_args.output_dir: is the filesystem root"),
        (["training_args.output_dir="], "training_args.output_dir: is empty"),
        (["training_args.output_dir='  '"], "training_args.output_dir: is empty"),
        (["training_args.max_steps=123456789012345678901234567890"], "is too large a number"),
        (
            ["data_conf.validation_data.type=AUTO_SPLIT", "data_conf.validation_data.ratio=.nan"],
            "data_conf.validation_data.ratio: Input should be a finite number",
        ),
        (["overrides.lr_multiplier=.inf"], "overrides.lr_multiplier"),
        (LORA + ["peft_conf.peft_kwargs.lora_dropout=1"], "lora_dropout must be a probability in [0, 1)"),
        (LORA + ["peft_conf.peft_kwargs.lora_dropout=-0.1"], "lora_dropout must be a probability"),
        (LORA + ["peft_conf.peft_kwargs.lora_dropout=.nan"], "lora_dropout must be a probability"),
        (LORA + ["peft_conf.peft_kwargs.lora_alpha=-16"], "lora_alpha must be a positive number"),
        (LORA + ["peft_conf.peft_kwargs.lora_alpha=0"], "lora_alpha must be a positive number"),
        (LORA + ["peft_conf.peft_kwargs.r=-8"], "r must be a positive integer, got -8"),
        (
            LORA + ["peft_conf.peft_kwargs.lora_dropuot=0.1"],
            "peft_conf.peft_kwargs: lora_dropuot: not an argument of peft's LoraConfig (did you mean "
            "'lora_dropout'?)",
        ),
        (
            ["peft_conf.peft_type=IA3", "peft_conf.peft_kwargs.lora_alpha=16"],
            "lora_alpha: not an argument of peft's IA3Config",
        ),
        (["peft_conf.peft_type=BONE"], "peft_type BONE is not provided by peft"),
    ],
)
def test_unusable_values_fail_with_key_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_with(*overrides))
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["training_args.max_steps=-1"],
        ["training_args.max_steps=15", "training_args.num_train_epochs=-1"],  # Silogen configs do this
        ["training_args.max_steps=15", "training_args.num_train_epochs=0"],
        ["training_args.num_train_epochs=0.5"],
        ["training_args.save_steps=0.2", "training_args.eval_steps=0.1", "training_args.logging_steps=0.01"],
        ["training_args.logging_steps=0", "training_args.logging_strategy=no"],
        ["training_args.eval_steps=0"],
        ["training_args.max_grad_norm=0", "training_args.warmup_steps=0", "training_args.weight_decay=0"],
        ["training_args.output_dir=/experiments/run-1"],
        ["training_args.output_dir=relative/out"],
        ["training_args.learning_rate=5e-06"],
        LORA + ["peft_conf.peft_kwargs={r: 8, lora_alpha: 16, lora_dropout: 0, target_modules: all-linear}"],
        LORA
        + ["peft_conf.peft_kwargs={use_dora: true, use_rslora: true, bias: none, fan_in_fan_out: false}"],
        LORA + ["peft_conf.peft_kwargs={lora_alpha: 16.5, lora_dropout: 0.999, modules_to_save: [lm_head]}"],
        ["peft_conf.peft_type=LOHA", "peft_conf.peft_kwargs={r: 4, alpha: 8, rank_dropout: 0.1}"],
        ["peft_conf.peft_type=PROMPT_TUNING", "peft_conf.peft_kwargs={num_virtual_tokens: 8}"],
    ],
)
def test_edge_values_that_stay_valid(overrides):
    cfg = parse_config(_with(*overrides))
    assert cfg.training_args == check_training_args(cfg.training_args, method="sft")


def test_peft_catalog_matches_the_schema_types():
    """Every peft type of the schema has an entry, and LORA's lists the keys the shipped configs use."""
    from finetune_engine.config.schema import PEFT_TYPES, peft_fields

    catalog = peft_fields()
    assert set(catalog["fields"]) == set(PEFT_TYPES)
    lora = catalog["fields"]["LORA"]
    assert lora["class"] == "LoraConfig"
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "bias"):
        assert key in lora["fields"]


def test_duplicate_keys_name_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False) + "run_conf:\n  model: other\n"
    path.write_text(text)
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith("run_conf:")]
    assert len(lines) == 2 and yaml.safe_load(text)["run_conf"] == {"model": "other"}  # PyYAML: last wins
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (
        f"{path}:{lines[1]}: not valid YAML: duplicate key 'run_conf' on lines {lines[0]} and {lines[1]}"
        in str(err.value)
    )


def test_duplicate_nested_key_and_merge_keys(tmp_path):
    """A duplicate deep inside a section is found too; a key that overrides a merged (<<) anchor is not a
    duplicate."""
    from finetune_engine.config.yamlio import safe_load

    with pytest.raises(yaml.YAMLError, match="duplicate key 'r' on lines 3 and 4"):
        safe_load("peft_conf:\n  peft_kwargs:\n    r: 8\n    r: 16\n")
    doc = safe_load("base: &b {r: 8, lora_alpha: 16}\nlora:\n  <<: *b\n  r: 4\n")
    assert doc["lora"] == {"r": 4, "lora_alpha": 16}
    assert safe_load("a: {1: x, '1': y}") == {"a": {1: "x", "1": "y"}}  # an int and a string differ


def test_yaml_bounds(tmp_path):
    """Aliases are bounded in number and expansion, recursion and deep nesting are refused, and so is
    an input over the size cap; a config that shares a few anchors still loads."""
    from finetune_engine.config import yamlio

    with pytest.raises(yamlio.YamlLimitError, match="refers to the node that contains it"):
        yamlio.safe_load("a: &a {b: *a}")
    with pytest.raises(yamlio.YamlLimitError, match=f"more than {yamlio.MAX_ALIASES} aliases"):
        yamlio.safe_load("a: &a 1\nb: [" + ", ".join(["*a"] * (yamlio.MAX_ALIASES + 1)) + "]\n")
    with pytest.raises(yamlio.YamlLimitError, match="nested deeper than"):
        yamlio.safe_load("[" * (yamlio.MAX_DEPTH + 1) + "]" * (yamlio.MAX_DEPTH + 1))
    with pytest.raises(yamlio.YamlLimitError, match="more than the 1048576"):
        yamlio.safe_load("#" * (yamlio.MAX_BYTES + 1))
    shared = "defaults: &d {lr: 0.1, steps: 5}\nruns: [" + ", ".join(["*d"] * 50) + "]\n"
    assert yamlio.safe_load(shared)["runs"][49] == {"lr": 0.1, "steps": 5}


def test_expanding_mapping_from_another_loader_is_refused():
    """A config mapping parsed elsewhere (the Airflow operator's YAML) with shared or recursive parts is
    refused before validation walks it."""
    leaf = ["x"] * 10
    for _ in range(8):
        leaf = [leaf] * 10
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_config({**BASE, "training_args": {"lr_scheduler_kwargs": {"a": leaf}}})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ConfigError, match="contains itself"):
        parse_config({**BASE, "training_args": loop})


@pytest.mark.parametrize(
    "item,expected",
    [
        ("run_conf.model=[", "run_conf.model: the value '[' is not valid YAML"),
        ("run_conf.model={a: 1, a: 2}", "duplicate key 'a'"),
        ("run_conf.model=!!python/object/apply:os.system [id]", "carries a YAML tag"),
        ("run_conf.model=!!str 5", "carries a YAML tag"),
        ("run_conf.model=!custom x", "carries a YAML tag"),
    ],
)
def test_set_values_that_are_not_plain_yaml(item, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides(BASE, [item])
    assert expected in str(err.value)
    assert apply_overrides(BASE, ["run_conf.model='!!str 5'"])["run_conf"]["model"] == "!!str 5"


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
        "import sys, finetune_engine.config as c, finetune_engine.config.architectures; c.load_config; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
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


def test_inline_yaml_is_read_with_the_engines_loader_naming_its_source():
    """read_config_yaml: what the operator uses for a config given as YAML text."""
    from finetune_engine.config import read_config_yaml

    assert read_config_yaml("training_args:\n  learning_rate: 5e-05\n", "task t config") == {
        "training_args": {"learning_rate": 5e-05}
    }
    with pytest.raises(
        ConfigError, match=r"task t config:3: not valid YAML: duplicate key 'a' on lines 1 and 3"
    ):
        read_config_yaml("a: 1\nb: 2\na: 3\n", "task t config")


@pytest.mark.parametrize("model_type", sorted(MODULE_NAMES))
def test_the_architecture_table_is_what_transformers_builds(model_type):
    """Each entry is exactly the adaptable module names (linear, Conv1D, embedding) of the installed
    transformers' causal-LM class for that model_type, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, pad_token_id=None
    )
    config = AutoConfig.for_model(model_type, **small)
    for key, value in (("num_key_value_heads", 2), ("intermediate_size", 128), ("head_dim", 16)):
        if hasattr(config, key) and model_type != "falcon":
            setattr(config, key, value)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adaptable = (torch.nn.Linear, torch.nn.Embedding)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, adaptable) or type(module).__name__ == "Conv1D"
    }
    assert names == set(MODULE_NAMES[model_type])


def test_every_preset_names_an_architecture_of_the_table_with_its_target_modules():
    from finetune_engine.config.architectures import preset_model_type, unmatched_target_modules
    from finetune_engine.config.presets import CATALOG

    for preset in CATALOG:
        model_type = preset_model_type(preset)
        assert model_type is not None, preset.name
        assert unmatched_target_modules(preset.target_modules, model_type) == [], preset.name


def test_target_module_names_match_like_peft_by_their_last_segment():
    from finetune_engine.config.architectures import describe_unmatched, unmatched_target_modules

    assert (
        unmatched_target_modules(["q_proj", "self_attn.k_proj", "model.layers.0.mlp.down_proj"], "llama")
        == []
    )
    assert unmatched_target_modules(["c_attn", "q_proj", "mlp"], "llama") == ["c_attn", "mlp"]
    assert unmatched_target_modules(["q_proj"], "gpt2") == ["q_proj"]
    assert unmatched_target_modules(["anything"], "an-architecture-not-in-the-table") == []
    assert unmatched_target_modules(["anything"], None) == []
    message = describe_unmatched(["c_atn"], "gpt2")
    assert message.startswith("'c_atn' matches no module of a gpt2 model (did you mean 'c_atn' -> 'c_attn'?)")
    assert "its modules are c_attn, c_fc, c_proj, lm_head, wpe, wte" in message
