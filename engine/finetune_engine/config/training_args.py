"""Strict checking of the training_args pass-through, without importing transformers.

The catalog of accepted keys is generated from the installed transformers/trl dataclasses into
``trainer_fields.json`` (``python -m finetune_engine.config.generate``); a test keeps it current.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import posixpath
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

# Derived from batchsize_conf so the same config runs on 1 or 8 devices (as in the Silogen engine,
# which refuses these three keys in training_args too).
DERIVED_TRAINING_ARGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "per_device_eval_batch_size",
)
_DERIVED_FIX = {
    "per_device_eval_batch_size": "set batchsize_conf.per_device_eval_batch_size instead",
}

# Keys the engine manages itself; each with the place to set it instead.
MANAGED_TRAINING_ARGS = {
    "resume_from_checkpoint": "set run_conf.resume_from_checkpoint instead",
    "hub_token": "secrets never go in a config; the engine does not push to the Hub (null is accepted)",
    "push_to_hub_token": (
        "secrets never go in a config; the engine does not push to the Hub (null is accepted)"
    ),
    "push_to_hub": (
        "true is not done by this engine: it writes outputs to output_dir / the bucket; push the final "
        "checkpoint with `hf upload REPO_ID OUTPUT_DIR/checkpoint-final` afterwards (false is accepted)"
    ),
    "full_determinism": "set run_conf.determinism: full instead",
    "local_rank": "set by the launcher (torchrun/accelerate), not in the config",
}
# Managed keys whose harmless value is accepted (and dropped): push_to_hub: false, tokens left null.
_MANAGED_HARMLESS = {"push_to_hub": (False,), "hub_token": (None,), "push_to_hub_token": (None,)}

# Methods and the config class their training_args go to (sft: transformers TrainingArguments).
METHODS = ("sft", "dpo", "kto", "orpo", "cpo")

# Keys the engine adds to a method's training_args (not fields of the TRL config class); each is
# applied by the engine and removed before the TRL config is built.
ENGINE_TRAINING_ARGS = {
    "max_prompt_length": {
        "methods": ("dpo", "kto"),
        "type": "int",
        "help": "Longest prompt in tokens; longer prompts keep their last max_prompt_length tokens "
        "(TRL 1.x dropped this key; the engine applies it after tokenization).",
    },
    "logging_dir": {
        "methods": METHODS,
        "type": "str | None",
        "help": "Where TensorBoard event files go with report_to: [tensorboard]; default $LOGS_PATH or "
        "./logs, as in the Silogen engine (transformers 5 dropped this key; the engine applies it).",
    },
}

# Keys of the transformers (4.57) and TRL (0.13) versions the Silogen engine pins that later releases
# removed or renamed: each is mapped to its successor or accepted as a no-op, with one log line.
# key -> (methods it applies to, None for all; what the engine does with it)
LEGACY_TRAINING_ARGS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "warmup_ratio": (
        None,
        "mapped to warmup_steps (transformers 5 reads a float below 1 there as a "
        "ratio); giving both non-zero is an error",
    ),
    "overwrite_output_dir": (None, "no-op: the trainer never used it; the engine never deletes output_dir"),
    "group_by_length": (None, "true maps to train_sampling_strategy: group_by_length"),
    "no_cuda": (None, "mapped to use_cpu"),
    "use_mps_device": (None, "no-op: the MPS device is used when present"),
    "save_safetensors": (None, "no-op: checkpoints are always safetensors"),
    "adafactor": (None, "true maps to optim: adafactor"),
    "fp16_backend": (None, "no-op: mixed precision is torch amp (apex is gone)"),
    "half_precision_backend": (None, "no-op: mixed precision is torch amp (apex is gone)"),
    "fp16_opt_level": (None, "no-op: an apex setting (apex is gone)"),
    "fsdp_min_num_params": (None, "mapped to fsdp_config.min_num_params"),
    "fsdp_transformer_layer_cls_to_wrap": (None, "mapped to fsdp_config.transformer_layer_cls_to_wrap"),
    "include_inputs_for_metrics": (None, "true adds inputs to include_for_metrics"),
    "include_tokens_per_second": (
        None,
        "true maps to include_num_input_tokens_seen: all (tokens/s is logged with it)",
    ),
    "torchdynamo": (None, "mapped to torch_compile_backend"),
    "jit_mode_eval": (None, "no-op: removed from transformers"),
    "mp_parameters": (None, "no-op: a SageMaker setting"),
    "past_index": (None, "no-op: removed from transformers"),
    "ray_scope": (None, "no-op: a Ray Tune setting"),
    "tpu_metrics_debug": (None, "no-op: a TPU setting"),
    "tpu_num_cores": (None, "no-op: a TPU setting"),
    "use_legacy_prediction_loop": (None, "no-op: removed from transformers"),
    "push_to_hub_model_id": (None, "no-op: the engine does not push to the Hub"),
    "push_to_hub_organization": (None, "no-op: the engine does not push to the Hub"),
    "per_gpu_train_batch_size": (None, "error: derived from batchsize_conf"),
    "per_gpu_eval_batch_size": (None, "error: set batchsize_conf.per_device_eval_batch_size"),
    "rpo_alpha": (
        ("dpo",),
        "maps to loss_type [<loss_type>, sft] with loss_weights [1, rpo_alpha] (TRL's successor)",
    ),
    "reference_free": (
        ("dpo",),
        "false is a no-op; true is an error (use `finetuning orpo`, or "
        "`finetuning cpo` with loss_type: simpo, for reference-free training)",
    ),
    "max_completion_length": (("dpo",), "no-op: TRL 1.x bounds the whole sequence with max_length"),
    "max_target_length": (("dpo",), "no-op: an encoder-decoder setting"),
    "is_encoder_decoder": (("dpo",), "no-op: the engine trains causal LMs"),
    "label_pad_token_id": (("dpo",), "no-op: labels are always padded with -100"),
    "padding_value": (("dpo",), "no-op: the tokenizer's pad token pads"),
    "generate_during_eval": (("dpo",), "no-op: removed from TRL"),
    "ref_model_init_kwargs": (
        ("dpo",),
        "no-op: the reference model loads like the trained model (run_conf.model_args)",
    ),
    "model_adapter_name": (("dpo",), "no-op: removed from TRL"),
    "ref_adapter_name": (("dpo",), "no-op: removed from TRL"),
    "force_use_ref_model": (("dpo",), "no-op: removed from TRL"),
    "use_num_logits_to_keep": (("dpo",), "no-op: TRL decides it"),
}
# Values the older TRL spelled differently.
LEGACY_VALUES = {("loss_type", "aot_pair"): "aot_unpaired"}


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def translate_legacy(
    args: dict[str, Any], method: str | None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``args`` with the keys of LEGACY_TRAINING_ARGS mapped to their successors (or dropped), and
    the problems of those keys. Logs one line per legacy key."""
    out = dict(args)
    problems: list[tuple[str, str]] = []

    def note(key: str, what: str, warn: bool = False) -> None:
        (log.warning if warn else log.info)("training_args.%s: %s", key, what)

    for key in [k for k in args if k in LEGACY_TRAINING_ARGS]:
        methods, _ = LEGACY_TRAINING_ARGS[key]
        if methods is not None and method is not None and method not in methods:
            continue  # not a key of this method: the catalog check names it
        value = out.pop(key)
        if key == "warmup_ratio":
            if not _num(value) or not 0 <= value <= 1:
                problems.append((key, f"expected a float between 0 and 1, got {value!r}"))
            elif value and out.get("warmup_steps"):
                problems.append(
                    (
                        key,
                        f"warmup_ratio {value} and warmup_steps {out['warmup_steps']} are both "
                        "given; keep one (a float below 1 in warmup_steps is a ratio)",
                    )
                )
            elif value:
                out["warmup_steps"] = value if value < 1 else math.nextafter(1.0, 0.0)
                note(
                    key,
                    f"{value} -> warmup_steps: {out['warmup_steps']} (transformers 5 takes the ratio there)",
                )
            else:
                note(key, "0: no warmup")
        elif key in (
            "group_by_length",
            "adafactor",
            "include_inputs_for_metrics",
            "include_tokens_per_second",
        ):
            if not isinstance(value, bool):
                problems.append((key, f"expected bool, got {type(value).__name__} {value!r}"))
                continue
            target, want = {
                "group_by_length": ("train_sampling_strategy", "group_by_length"),
                "adafactor": ("optim", "adafactor"),
                "include_inputs_for_metrics": ("include_for_metrics", None),
                "include_tokens_per_second": ("include_num_input_tokens_seen", "all"),
            }[key]
            if not value:
                note(key, f"false: no-op ({target} is left as it is)")
            elif key == "include_inputs_for_metrics":
                out[target] = sorted({*(out.get(target) or []), "inputs"})
                note(key, f"true -> {target}: {out[target]}")
            elif key == "include_tokens_per_second" and out.get(target) not in (None, "no", False):
                note(key, f"true: {target} is already {out[target]!r}")
            elif out.get(target) not in (None, want) and not (key == "include_tokens_per_second"):
                problems.append(
                    (key, f"true asks for {target}: {want}, but {target} is {out[target]!r}; keep one")
                )
            else:
                out[target] = want
                note(key, f"true -> {target}: {want}")
        elif key == "no_cuda":
            if not isinstance(value, bool):
                problems.append((key, f"expected bool, got {type(value).__name__} {value!r}"))
            elif "use_cpu" in out and out["use_cpu"] != value:
                problems.append((key, f"no_cuda {value} contradicts use_cpu {out['use_cpu']}; keep use_cpu"))
            else:
                out["use_cpu"] = value
                note(key, f"{value} -> use_cpu: {value}")
        elif key in ("fsdp_min_num_params", "fsdp_transformer_layer_cls_to_wrap"):
            sub = key.removeprefix("fsdp_")
            if value in (None, 0, "", []):
                note(key, "unset: no-op")
                continue
            conf = out.get("fsdp_config")
            if conf is not None and not isinstance(conf, dict):
                problems.append(
                    (key, f"cannot be merged into fsdp_config {conf!r} (a file); put {sub} in that file")
                )
                continue
            conf = dict(conf or {})
            if sub in conf and conf[sub] != value:
                problems.append((key, f"contradicts fsdp_config.{sub} {conf[sub]!r}; keep fsdp_config.{sub}"))
                continue
            conf[sub] = value
            out["fsdp_config"] = conf
            note(key, f"-> fsdp_config.{sub}: {value!r}")
        elif key == "torchdynamo":
            if value in (None, ""):
                note(key, "unset: no-op")
            elif out.get("torch_compile_backend") not in (None, value):
                problems.append(
                    (key, f"contradicts torch_compile_backend {out['torch_compile_backend']!r}; keep one")
                )
            else:
                out["torch_compile_backend"] = value
                note(key, f"{value!r} -> torch_compile_backend: {value!r}")
        elif key in ("per_gpu_train_batch_size", "per_gpu_eval_batch_size"):
            if value is None:
                note(key, "null: no-op")
            else:
                fix = (
                    "set batchsize_conf.per_device_eval_batch_size instead"
                    if "eval" in key
                    else (
                        "derived from batchsize_conf (total_train_batch_size, "
                        "max_per_device_train_batch_size); remove it"
                    )
                )
                problems.append((key, fix))
        elif key == "rpo_alpha":
            if value is None:
                note(key, "null: no-op")
            elif not _num(value):
                problems.append((key, f"expected float, got {type(value).__name__} {value!r}"))
            elif out.get("loss_weights") is not None:
                problems.append(
                    (
                        key,
                        "cannot be combined with loss_weights; write loss_type [..., sft] and "
                        "loss_weights [..., rpo_alpha] instead",
                    )
                )
            else:
                losses = out.get("loss_type") or "sigmoid"
                losses = list(losses) if isinstance(losses, list) else [losses]
                out["loss_type"] = losses + ["sft"]
                out["loss_weights"] = [1.0] * len(losses) + [float(value)]
                note(key, f"{value} -> loss_type: {out['loss_type']}, loss_weights: {out['loss_weights']}")
        elif key == "reference_free":
            if value:
                problems.append(
                    (
                        key,
                        "true is not available in TRL 1.x's DPO; train reference-free with "
                        "`finetuning orpo`, or `finetuning cpo` with loss_type: simpo",
                    )
                )
            else:
                note(key, "false: no-op")
        else:
            harmless = (
                key == "overwrite_output_dir"
                or (key == "save_safetensors" and value is True)
                or value in (None, False, 0, "", -1, "auto", "amp", "O1")
            )
            note(key, f"{value!r}: {LEGACY_TRAINING_ARGS[key][1]}", warn=not harmless)
    if method in (None, "dpo"):
        lt = out.get("loss_type")
        for (k, old), new in LEGACY_VALUES.items():
            if k == "loss_type" and (lt == old or (isinstance(lt, list) and old in lt)):
                out[k] = new if lt == old else [new if x == old else x for x in lt]
                log.info("training_args.%s: %s -> %s (TRL's new name)", k, old, new)
    return out, problems


# Fields whose dataclass annotation is narrower than what TrainingArguments accepts (transformers 5
# declares ``fsdp: str | None`` and converts ``True`` / a list of FSDP options in __post_init__).
LOOSER_THAN_DECLARED = {"fsdp": "any"}

_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


@functools.cache
def trainer_fields() -> dict[str, dict[str, dict[str, Any]]]:
    """{'sft': {name: {'type': ..., 'default': ..., 'help': ...}}, 'dpo': {...}, ...}"""
    text = resources.files("finetune_engine.config").joinpath("trainer_fields.json").read_text()
    return json.loads(text)["fields"]


class TrainingArgsError(ValueError):
    """Bad training_args keys; ``problems`` holds (key, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))


def method_fields(method: str) -> dict[str, dict[str, Any]]:
    """The accepted training_args of ``method``: its TRL/transformers fields plus the engine's keys."""
    fields = dict(trainer_fields()[method])
    for key, spec in ENGINE_TRAINING_ARGS.items():
        if method in spec["methods"]:
            fields[key] = {"type": spec["type"], "default": None, "help": spec["help"]}
    return fields


def _choice_problem(key: str, value: Any, choices: list[str], method: str) -> str | None:
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v not in choices]
    if not bad:
        return None
    hint = ""
    if key == "loss_type" and "simpo" in bad and method != "cpo":
        hint = "; SimPO is TRL's CPO trainer with loss_type simpo: run `finetuning cpo` with loss_type: simpo"
    elif key == "loss_type" and "orpo" in bad:
        hint = "; ORPO is its own trainer: run `finetuning orpo`"
    shown = ", ".join(repr(b) for b in bad)
    return f"{shown} is not a {method} {key}; allowed: {', '.join(choices)}{hint}"


def non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds (in lists and mappings), a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    return False


def _steps_rule(strategy_key: str, default_strategy: str | None):
    """save_steps / logging_steps / eval_steps: not negative; 0 only when their strategy is not steps."""

    def rule(value: Any, args: dict[str, Any]) -> str | None:
        if value < 0:
            return f"must not be negative, got {value}; give a number of steps, or a ratio below 1"
        strategy = args.get(strategy_key, default_strategy)
        if value == 0 and strategy in ("steps", None) and default_strategy is not None:
            return (
                f"0 with {strategy_key} steps means never; give a positive number of steps, or set "
                f"{strategy_key}: 'no'"
            )
        return None

    return rule


def _positive_max_steps(args: dict[str, Any]) -> bool:
    steps = args.get("max_steps", -1)
    return _num(steps) and steps > 0


# Ranges of numeric training_args, checked after their types: key -> rule(value, all args) -> problem.
_RANGE_RULES: dict[str, Any] = {
    "learning_rate": lambda v, a: None if v > 0 else f"must be greater than 0, got {v}",
    "max_steps": lambda v, a: (
        None
        if v == -1 or v > 0
        else f"{v} is not a step count: transformers would silently train num_train_epochs instead; "
        "give a positive number of steps, or -1 (the default) to train by epochs"
    ),
    "num_train_epochs": lambda v, a: (
        None
        if v > 0 or _positive_max_steps(a)
        else f"must be greater than 0 (got {v}): nothing would be trained; give a number of epochs, or a "
        "positive max_steps (which then decides the length)"
    ),
    "save_steps": _steps_rule("save_strategy", "steps"),
    "logging_steps": _steps_rule("logging_strategy", "steps"),
    "eval_steps": _steps_rule("eval_strategy", None),
    "warmup_steps": lambda v, a: None if v >= 0 else f"must not be negative, got {v}",
    "weight_decay": lambda v, a: None if v >= 0 else f"must not be negative, got {v}",
    "max_grad_norm": lambda v, a: None if v >= 0 else f"must not be negative (0 turns clipping off), got {v}",
    "save_total_limit": lambda v, a: None if v > 0 else f"must be a positive number of checkpoints, got {v}",
    "dataloader_num_workers": lambda v, a: None if v >= 0 else f"must not be negative, got {v}",
}


# What _RANGE_RULES and _value_problem accept, for the config reference.
VALUE_RULES_DOC = {
    "max_steps": "-1 (train by epochs, the default) or a positive count; 0 would silently train the epochs",
    "num_train_epochs": "greater than 0, unless max_steps is positive (then it is ignored)",
    "learning_rate": "greater than 0",
    "save_steps, logging_steps": "not negative (below 1: a ratio of the run); 0 only when their strategy "
    "is not steps",
    "eval_steps": "not negative",
    "warmup_steps, weight_decay, max_grad_norm, dataloader_num_workers": "not negative",
    "save_total_limit": "a positive count, or null",
    "output_dir": "not empty and not the filesystem root",
}


def _output_dir_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return None  # the type check names it
    if not value.strip():
        return (
            "is empty; give the directory checkpoints go to, or leave it out ($CHECKPOINTS_PATH, "
            "else ./checkpoints)"
        )
    if posixpath.normpath(value.strip()) in ("/", "//"):
        return "is the filesystem root; give a directory of its own, e.g. /checkpoints/my-experiment"
    return None


def _value_problem(key: str, value: Any, args: dict[str, Any]) -> str | None:
    """The problem of a value whose type is right but which no trainer can use, or None."""
    if non_finite(value):
        return f"{value!r} is not a usable value (NaN or infinity); give a finite number"
    if key == "output_dir":
        return _output_dir_problem(value)
    rule = _RANGE_RULES.get(key)
    if rule is not None and _num(value):
        return rule(value, args)
    return None


def check_training_args(args: dict[str, Any], method: str | None = "sft") -> dict[str, Any]:
    """Raise ValueError naming every bad key of ``training_args``; return them with the keys of
    earlier transformers/TRL versions mapped (LEGACY_TRAINING_ARGS) and harmless managed values
    (push_to_hub: false) dropped.

    ``method`` None accepts the keys of any method (the loader re-checks with the real method)."""
    args, problems = translate_legacy(args, method)
    for key, harmless in _MANAGED_HARMLESS.items():
        if key in args and any(args[key] is h for h in harmless):
            del args[key]
    if method is None:
        known: dict[str, dict[str, Any]] = {}
        for m in METHODS:
            known.update({k: v for k, v in method_fields(m).items() if k not in known})
        known = {k: {**v, "choices": None} for k, v in known.items()}
        method_name = "trainer"
    else:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        known = method_fields(method)
        method_name = method
    for key, value in args.items():
        if key in DERIVED_TRAINING_ARGS:
            problems.append(
                (
                    key,
                    _DERIVED_FIX.get(
                        key,
                        "derived from batchsize_conf (total_train_batch_size, "
                        "max_per_device_train_batch_size); remove it",
                    ),
                )
            )
        elif key in MANAGED_TRAINING_ARGS:
            problems.append((key, MANAGED_TRAINING_ARGS[key]))
        elif key not in known:
            legacy = [
                k
                for k, (ms, _) in LEGACY_TRAINING_ARGS.items()
                if ms is None or method is None or method in ms
            ]
            close = difflib.get_close_matches(key, list(known) + legacy, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                (
                    key,
                    f"not a {method_name} argument{hint}"
                    if method is None
                    else f"not a {method} trainer argument{hint}",
                )
            )
        else:
            kind = LOOSER_THAN_DECLARED.get(key, known[key]["type"])
            accepted = _SCALARS.get(kind.removesuffix(" | None"))
            bad_bool = kind.startswith(("int", "float")) and isinstance(value, bool)
            if value is None and kind.endswith("| None"):
                continue
            if accepted and (bad_bool or not isinstance(value, accepted)):
                problems.append((key, f"expected {kind}, got {type(value).__name__} {value!r}"))
            elif known[key].get("choices") and (
                problem := _choice_problem(key, value, known[key]["choices"], method_name)
            ):
                problems.append((key, problem))
            elif problem := _value_problem(key, value, args):
                problems.append((key, problem))
    if problems:
        raise TrainingArgsError(problems)
    return args
