"""Strict checking of the training_args pass-through, without importing transformers.

The catalog of accepted keys is generated from the installed transformers/trl dataclasses into
``trainer_fields.json`` (``python -m finetune_engine.config.generate``); a test keeps it current.
"""

from __future__ import annotations

import difflib
import functools
import json
from importlib import resources
from typing import Any

# Derived from batchsize_conf so the same config runs on 1 or 8 devices.
DERIVED_TRAINING_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps")

# Keys the engine manages itself; each with the place to set it instead.
MANAGED_TRAINING_ARGS = {
    "resume_from_checkpoint": "set run_conf.resume_from_checkpoint instead",
    "hub_token": "secrets never go in a config; the engine does not push to the Hub",
    "push_to_hub": "the engine writes outputs to output_dir / the bucket, not to the Hub",
    "full_determinism": "set run_conf.determinism: full instead",
    "local_rank": "set by the launcher (torchrun/accelerate), not in the config",
}

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
}

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


def check_training_args(args: dict[str, Any], method: str | None = "sft") -> dict[str, Any]:
    """Raise ValueError naming every bad key of ``training_args``; return args unchanged.

    ``method`` None accepts the keys of any method (the loader re-checks with the real method)."""
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
    problems: list[tuple[str, str]] = []
    for key, value in args.items():
        if key in DERIVED_TRAINING_ARGS:
            problems.append((key, "derived from batchsize_conf (total_train_batch_size, max_per_device_train_batch_size); remove it"))
        elif key in MANAGED_TRAINING_ARGS:
            problems.append((key, MANAGED_TRAINING_ARGS[key]))
        elif key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((key, f"not a {method_name} argument{hint}" if method is None else f"not a {method} trainer argument{hint}"))
        else:
            kind = LOOSER_THAN_DECLARED.get(key, known[key]["type"])
            accepted = _SCALARS.get(kind.removesuffix(" | None"))
            bad_bool = kind.startswith(("int", "float")) and isinstance(value, bool)
            if value is None and kind.endswith("| None"):
                continue
            if accepted and (bad_bool or not isinstance(value, accepted)):
                problems.append((key, f"expected {kind}, got {type(value).__name__} {value!r}"))
            elif known[key].get("choices"):
                problem = _choice_problem(key, value, known[key]["choices"], method_name)
                if problem:
                    problems.append((key, problem))
    if problems:
        raise TrainingArgsError(problems)
    return args
