"""The Silogen engine's config keys: accepted with the same meaning, checked on what they build
(the TrainingArguments, the from_pretrained keyword arguments, the BitsAndBytesConfig), and the
keys it refuses refused here too, with the key named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from finetune_engine.config import ConfigError, apply_overrides, load_config, parse_config
from finetune_engine.config.batchsize import derive_batch_plan

BASE = {
    "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]}},
    "batchsize_conf": {"total_train_batch_size": 8},
    "run_conf": {"model": "m"},
}


def _cfg(*overrides: str, method: str = "sft", **sections):
    data = apply_overrides({**BASE, **sections}, overrides)
    return parse_config(data, method=method)


def _error(*overrides: str, method: str = "sft", **sections) -> str:
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides, method=method, **sections)
    return str(err.value)


def _args(cfg, method: str = "sft", total: int = 8, max_per_device: int = 1):
    from finetune_engine.recipes.common import training_args_dict

    plan = derive_batch_plan(total, max_per_device)
    return training_args_dict(cfg, plan, Path("out"), 42, has_eval=True, method=method)


# --- method ---------------------------------------------------------------------------------


def test_method_key_agrees_with_the_command(tmp_path):
    assert _cfg("method=sft").method == "sft"
    assert _cfg("method=dpo", method="dpo").method == "dpo"
    assert _cfg().method is None  # unset: the command decides
    path = tmp_path / "exp.yaml"
    path.write_text("method: dpo\n" + yaml.safe_dump(BASE))
    with pytest.raises(ConfigError) as err:
        load_config(path, method="sft")
    assert (
        f"method ({path}:1): the config says method: dpo but "
        "the command runs sft; run `finetuning dpo CONFIG`" in str(err.value)
    )
    assert "method: not a" not in _error("method=ppo")  # an unknown method is named as the key
    assert "method" in _error("method=ppo")


# --- training_args --------------------------------------------------------------------------


def test_chart_training_args_are_accepted_with_their_meaning(caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.config.training_args")
    cfg = _cfg(
        training_args={
            "push_to_hub": False,
            "warmup_ratio": 0.05,
            "overwrite_output_dir": True,
            "group_by_length": True,
            "logging_first_step": True,
            "lr_scheduler_type": "cosine",
        }
    )
    assert cfg.training_args == {
        "warmup_steps": 0.05,
        "train_sampling_strategy": "group_by_length",
        "logging_first_step": True,
        "lr_scheduler_type": "cosine",
    }
    lines = [r.getMessage() for r in caplog.records]
    for key in ("warmup_ratio", "overwrite_output_dir", "group_by_length"):
        assert sum(line.startswith(f"training_args.{key}:") for line in lines) == 1, lines

    from transformers import TrainingArguments

    built = TrainingArguments(**_args(cfg))
    assert built.warmup_steps == 0.05 and built.get_warmup_steps(200) == 10  # 5% of the steps
    assert built.train_sampling_strategy == "group_by_length"
    assert built.push_to_hub is False


def test_push_to_hub_true_is_refused_with_what_to_do():
    text = _error("training_args.push_to_hub=true")
    assert "training_args.push_to_hub: true is not done by this engine" in text and "hf upload" in text


@pytest.mark.parametrize(
    "given,expected",
    [
        ({"warmup_ratio": 0.1, "warmup_steps": 0}, {"warmup_steps": 0.1}),
        ({"warmup_ratio": 0.0, "warmup_steps": 5}, {"warmup_steps": 5}),
        ({"warmup_ratio": 1.0}, {"warmup_steps": pytest.approx(1.0)}),
        ({"no_cuda": True}, {"use_cpu": True}),
        ({"adafactor": True}, {"optim": "adafactor"}),
        ({"adafactor": False}, {}),
        ({"include_inputs_for_metrics": True}, {"include_for_metrics": ["inputs"]}),
        ({"include_tokens_per_second": True}, {"include_num_input_tokens_seen": "all"}),
        (
            {"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "fsdp_min_num_params": 1000},
            {"fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "min_num_params": 1000}},
        ),
        ({"torchdynamo": "inductor"}, {"torch_compile_backend": "inductor"}),
        (
            {
                "save_safetensors": True,
                "use_mps_device": False,
                "past_index": -1,
                "fp16_backend": "auto",
                "half_precision_backend": "auto",
                "jit_mode_eval": False,
                "ray_scope": "last",
                "tpu_num_cores": None,
                "push_to_hub_model_id": None,
                "use_legacy_prediction_loop": False,
                "hub_token": None,
            },
            {},
        ),
    ],
)
def test_keys_transformers_5_removed_map_to_their_successors(given, expected):
    assert _cfg(training_args=given).training_args == expected


def test_legacy_mapping_builds_real_training_arguments():
    from transformers import TrainingArguments

    cfg = _cfg(
        training_args={
            "warmup_ratio": 0.1,
            "no_cuda": True,
            "include_tokens_per_second": True,
            "save_safetensors": True,
            "logging_dir": "tb",
        }
    )
    built = TrainingArguments(**_args(cfg))
    assert built.use_cpu is True and built.include_num_input_tokens_seen == "all"
    assert built.get_warmup_steps(50) == 5


@pytest.mark.parametrize(
    "given,needle",
    [
        (
            {"warmup_ratio": 0.1, "warmup_steps": 10},
            "training_args.warmup_ratio: warmup_ratio 0.1 and warmup_steps 10 are both given",
        ),
        ({"warmup_ratio": 2}, "training_args.warmup_ratio: expected a float between 0 and 1"),
        (
            {"per_device_eval_batch_size": 4},
            "training_args.per_device_eval_batch_size: set batchsize_conf.per_device_eval_batch_size instead",
        ),
        (
            {"per_gpu_train_batch_size": 4},
            "training_args.per_gpu_train_batch_size: derived from batchsize_conf",
        ),
        (
            {"adafactor": True, "optim": "adamw_torch"},
            "training_args.adafactor: true asks for optim: adafactor, but optim is 'adamw_torch'",
        ),
        (
            {"no_cuda": True, "use_cpu": False},
            "training_args.no_cuda: no_cuda True contradicts use_cpu False",
        ),
        ({"push_to_hub_token": "hf_secret"}, "training_args.push_to_hub_token: secrets never go in a config"),
        (
            {"warmup_ratoi": 0.1},
            "training_args.warmup_ratoi: not a sft trainer argument (did you mean 'warmup_ratio'?)",
        ),
        (
            {"group_by_lenght": True},
            "training_args.group_by_lenght: not a sft trainer argument (did you mean 'group_by_length'?)",
        ),
    ],
)
def test_contradictions_and_really_unknown_keys_stay_errors(given, needle):
    assert needle in _error(training_args=given)


def test_eval_batch_is_the_derived_train_batch_unless_given():
    # total 8, at most 3 per device: 2 per device x 4 accumulation; the eval batch follows the 2.
    cfg = _cfg()
    assert _args(cfg, max_per_device=3)["per_device_eval_batch_size"] == 2
    assert (
        _args(_cfg("batchsize_conf.per_device_eval_batch_size=6"), max_per_device=3)[
            "per_device_eval_batch_size"
        ]
        == 6
    )
    assert (
        _cfg("batchsize_conf.per_device_eval_batch_size=null").batchsize_conf.per_device_eval_batch_size
        is None
    )


def test_defaults_follow_the_silogen_engine():
    from transformers import TrainingArguments

    built = TrainingArguments(**_args(_cfg()))
    assert built.save_steps == 500 and built.save_strategy == "steps"
    assert built.report_to == []
    # an inline DeepSpeed config gets the derived batch sizes, as in the Silogen engine
    ds = _args(
        _cfg(training_args={"deepspeed": {"zero_optimization": {"stage": 1}, "train_batch_size": 99}}),
        max_per_device=2,
    )["deepspeed"]
    assert ds == {
        "zero_optimization": {"stage": 1},
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 8,
    }


def test_dpo_legacy_keys_and_defaults():
    from trl import DPOConfig

    cfg = _cfg(
        method="dpo",
        training_args={
            "rpo_alpha": 0.5,
            "loss_type": "sigmoid",
            "reference_free": False,
            "max_completion_length": 256,
            "label_pad_token_id": -100,
            "generate_during_eval": False,
            "bf16": False,
        },
    )
    assert cfg.training_args["loss_type"] == ["sigmoid", "sft"] and cfg.training_args["loss_weights"] == [
        1.0,
        0.5,
    ]
    args = _args(cfg, method="dpo")
    assert args.pop("max_prompt_length") == 1536  # the engine applies it after tokenization
    built = DPOConfig(**args)
    assert (
        built.max_length == 2048 and built.ref_model_sync_steps == 64 and built.ref_model_mixup_alpha == 0.9
    )
    assert built.f_alpha_divergence_coef == 1.0
    assert list(built.loss_weights) == [1.0, 0.5]
    assert (
        _cfg(method="dpo", training_args={"loss_type": "aot_pair"}).training_args["loss_type"]
        == "aot_unpaired"
    )
    assert "training_args.reference_free: true is not available" in _error(
        method="dpo", training_args={"reference_free": True}
    )
    # sft keeps TRL-free defaults: no DPO defaults leak into it.
    assert "max_length" not in _args(_cfg())


# --- report_to ------------------------------------------------------------------------------


def test_report_to_is_honoured_and_mlflow_left_to_the_engine(monkeypatch, tmp_path):
    import importlib.util

    from finetune_engine.recipes.common import report_to

    monkeypatch.delenv("LOGS_PATH", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert report_to(None, None) == [] and report_to("none", None) == []
    assert report_to(["mlflow"], None) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else real(name, *a)
    )
    assert report_to(["tensorboard", "mlflow"], None) == ["tensorboard"]
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "./logs"  # the Silogen engine's default logging dir
    monkeypatch.setenv("LOGS_PATH", str(tmp_path / "env-logs"))
    report_to("tensorboard", None)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "env-logs")
    report_to("tensorboard", str(tmp_path / "cfg-logs"))
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "cfg-logs")
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a),
    )
    with pytest.raises(
        ValueError, match="training_args.report_to: tensorboard needs the tensorboard package"
    ):
        report_to(["tensorboard"], None)


# --- run_conf.model_args ----------------------------------------------------------------------


def test_model_args_dtype_and_extras_pass_to_from_pretrained():
    import torch

    from finetune_engine.modeling import model_load_kwargs

    cfg = _cfg(
        "run_conf.model_args.dtype=bfloat16",
        "run_conf.model_args.max_memory={0: 10GB}",
        "run_conf.model_args.subfolder=sub",
        "run_conf.model_args.device_map=0",
    )
    kwargs = model_load_kwargs(cfg)
    assert (
        kwargs["dtype"] is torch.bfloat16
        and kwargs["max_memory"] == {0: "10GB"}
        and kwargs["subfolder"] == "sub"
    )
    assert kwargs["device_map"] == 0
    assert model_load_kwargs(_cfg("run_conf.model_args.torch_dtype=float16"))["dtype"] is torch.float16
    assert model_load_kwargs(_cfg())["dtype"] == "auto"
    # the dump keeps the extras (the Airflow operator renders the config from it)
    assert cfg.model_dump(mode="json")["run_conf"]["model_args"]["subfolder"] == "sub"


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            ["run_conf.model_args.dtype=bfloat16", "run_conf.model_args.torch_dtype=bfloat16"],
            "dtype (bfloat16) and torch_dtype (bfloat16) are both given",
        ),
        (["run_conf.model_args.token=hf_abc"], "token: secrets never go in a config; set HF_TOKEN"),
        (["run_conf.model_args.quantization_config={}"], "quantization_config: set quant_conf instead"),
        (["run_conf.model_args.silogen_extra_args={}"], "silogen_extra_args: reserved"),
        (["run_conf.model_args.trust_remote_code=true"], "pin run_conf.model_args.revision"),
        (["run_conf.model_args.dtype=float8"], "run_conf.model_args.dtype"),
        (["run_conf.model_args.attn_implementation=flash"], "attn_implementation 'flash' is not one of"),
    ],
)
def test_model_args_refusals_name_the_key(override, needle):
    text = _error(*override)
    assert "run_conf.model_args" in text and needle in text, text


@pytest.mark.parametrize(
    "kind, package",
    [
        ("flash_attention_2", "flash-attn"),
        ("flash_attention_3", "flash-attn-3"),
        ("flash_attention_4", "flash-attn-4"),
    ],
)
def test_each_flash_kernel_names_its_package_when_it_cannot_run(caplog, kind, package):
    from finetune_engine.modeling import attention_implementation

    assert (
        _cfg(f"run_conf.model_args.attn_implementation={kind}").run_conf.model_args.attn_implementation
        == kind
    )
    with caplog.at_level(logging.WARNING, logger="finetune_engine.modeling"):
        assert attention_implementation(kind) == "sdpa"  # no package here, and no GPU
    (message,) = [r.getMessage() for r in caplog.records]
    assert kind in message and f"the {package} package" in message and "falling back to sdpa" in message


@pytest.mark.parametrize(
    "capability, driver, chosen",
    [
        ((8, 0), 13000, "sdpa"),
        ((9, 0), 12080, "sdpa"),
        ((9, 0), 12090, "flash_attention_4"),
        ((10, 0), 13000, "flash_attention_4"),
    ],
)
def test_flash_attention_4_needs_hopper_or_newer_and_a_cuda_12_9_driver(
    monkeypatch, caplog, capability, driver, chosen
):
    """flash-attn-4 trains on compute capability 9.0+ and its kernels need a CUDA 12.9+ driver: on an
    Ampere GPU or an older driver the config's choice falls back to sdpa with the reason (the
    package, the GPU and the driver are stood in: none exists here)."""
    import torch
    from transformers.utils import import_utils

    from finetune_engine import modeling

    monkeypatch.setattr(import_utils, "is_flash_attn_4_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(modeling, "cuda_driver_version", lambda: driver)
    with caplog.at_level(logging.WARNING, logger="finetune_engine.modeling"):
        assert modeling.attention_implementation("flash_attention_4") == chosen
    assert ("Hopper or newer GPU (compute capability 9.0+) with a CUDA 12.9+ driver" in caplog.text) == (
        chosen == "sdpa"
    )


def test_flash_attention_without_flash_attn_falls_back_to_sdpa(caplog, tiny_model_dir):
    from finetune_engine.modeling import load_model, load_tokenizer, model_load_kwargs

    cfg = _cfg(
        f"run_conf.model={tiny_model_dir}",
        "run_conf.model_args.attn_implementation=flash_attention_2",
        "data_conf.chat_template_name=chat-ml",
    )
    with caplog.at_level(logging.WARNING, logger="finetune_engine.modeling"):
        assert model_load_kwargs(cfg)["attn_implementation"] == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if "attn_implementation" in r.getMessage()]
    assert len(warnings) == 1 and "flash_attention_2" in warnings[0] and "falling back to sdpa" in warnings[0]
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    model = load_model(cfg, str(tiny_model_dir), tok)
    assert model.config._attn_implementation == "sdpa"
    assert (
        model_load_kwargs(_cfg("run_conf.model_args.attn_implementation=eager"))["attn_implementation"]
        == "eager"
    )


# --- quant_conf -----------------------------------------------------------------------------


def test_bitsandbytes_keys_and_defaults_match_bitsandbytes_config(monkeypatch):
    import torch

    from finetune_engine.modeling import quantization_config

    peft = {"peft_type": "LORA", "peft_kwargs": {"r": 4}}
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    q = quantization_config(
        _cfg(quant_conf={"quantization_type": "bits-and-bytes", "load_in_4bit": True}, peft_conf=peft)
    )
    assert q.bnb_4bit_quant_type == "fp4"  # the Silogen engine's (and BitsAndBytesConfig's) default
    assert q.bnb_4bit_compute_dtype == torch.float32 and q.bnb_4bit_quant_storage == torch.uint8
    q = quantization_config(
        _cfg(
            peft_conf=peft,
            quant_conf={
                "quantization_type": "bits-and-bytes",
                "load_in_8bit": True,
                "llm_int8_enable_fp32_cpu_offload": True,
                "llm_int8_has_fp16_weight": True,
                "llm_int8_threshold": 5.0,
                "llm_int8_skip_modules": ["lm_head"],
            },
        )
    )
    assert q.load_in_8bit and q.llm_int8_enable_fp32_cpu_offload and q.llm_int8_has_fp16_weight
    assert q.llm_int8_threshold == 5.0 and q.llm_int8_skip_modules == ["lm_head"]
    # Under FSDP an unset storage dtype is the training dtype, so FSDP can shard the 4-bit weights.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    q = quantization_config(
        _cfg(
            peft_conf=peft,
            training_args={"bf16": True},
            quant_conf={
                "quantization_type": "bits-and-bytes",
                "load_in_4bit": True,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_type": "nf4",
            },
        )
    )
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


# --- tracking, run_conf defaults ------------------------------------------------------------


def test_tracking_null_means_no_tracking_and_peer_strings_are_read():
    from finetune_engine.tracking import resolve_tracking

    cfg = _cfg(tracking=None)
    assert not resolve_tracking(cfg.tracking, env={}).enabled
    cfg = _cfg(
        tracking={
            "mlflow_server_uri": "file:///tmp/m",
            "experiment_name": "e",
            "hf_mlflow_log_artifacts": "False",
        }
    )
    settings = resolve_tracking(cfg.tracking, env={})
    assert settings.uri == "file:///tmp/m" and settings.experiment == "e" and settings.log_artifacts is False
    assert _cfg(tracking={"hf_mlflow_log_artifacts": "True"}).tracking.hf_mlflow_log_artifacts is True


def test_run_conf_model_defaults_to_the_peer_download_location():
    data = {k: v for k, v in BASE.items() if k != "run_conf"}
    data["run_conf"] = {"model_args": {}}
    assert parse_config(data).run_conf.model == "/local_resources/basemodel"


# --- a chart-rendered config trains ---------------------------------------------------------


def _train(tmp_path, model, data, report_to=None, max_steps=2) -> Path:
    from finetune_engine.cli.finetuning import main as finetuning
    from tests.engine.conftest import make_config

    config = make_config(
        tmp_path,
        model,
        data,
        training_args={
            "max_steps": max_steps,
            "save_steps": max_steps,
            "report_to": report_to or [],
            "warmup_ratio": 0.5,
            "push_to_hub": False,
            "overwrite_output_dir": True,
            "group_by_length": True,
            "logging_first_step": True,
        },
        run_conf={"model_args": {"dtype": "float32", "attn_implementation": "flash_attention_2"}},
        tracking=None,
    )
    config.write_text("method: sft\n" + config.read_text())
    result_file = tmp_path / "result.json"
    assert (
        finetuning(["sft", str(config), "--result-file", str(result_file), "--num-preprocess-workers", "1"])
        == 0
    )
    assert json.loads(result_file.read_text())["global_step"] == max_steps
    return config


def test_chart_style_config_trains(tiny_model, chat_data, tmp_path, caplog):
    # method, push_to_hub: false, warmup_ratio, overwrite_output_dir, group_by_length, dtype,
    # flash_attention_2 without flash-attn, tracking: null: the run trains, with one warning.
    with caplog.at_level(logging.INFO):
        _train(tmp_path, tiny_model, chat_data)
    assert sum("falling back to sdpa" in r.getMessage() for r in caplog.records) == 1
    assert any("train_sampling_strategy: group_by_length" in r.getMessage() for r in caplog.records)


def test_report_to_tensorboard_writes_event_files_under_logs_path(
    tiny_model, chat_data, tmp_path, monkeypatch
):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is in finetune-engine[train]; not installed in this environment"
    )
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setenv("LOGS_PATH", str(tmp_path / "logs"))
    _train(tmp_path, tiny_model, chat_data, report_to=["tensorboard"], max_steps=1)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0, "no TensorBoard event files under $LOGS_PATH"
