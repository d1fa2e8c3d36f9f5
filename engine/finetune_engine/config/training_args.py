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


def check_training_args(args: dict[str, Any], method: str = "sft") -> dict[str, Any]:
    """Raise ValueError naming every bad key of ``training_args``; return args unchanged."""
    known = trainer_fields().get(method) or trainer_fields()["sft"]
    problems: list[tuple[str, str]] = []
    for key, value in args.items():
        if key in DERIVED_TRAINING_ARGS:
            problems.append((key, "derived from batchsize_conf (total_train_batch_size, max_per_device_train_batch_size); remove it"))
        elif key in MANAGED_TRAINING_ARGS:
            problems.append((key, MANAGED_TRAINING_ARGS[key]))
        elif key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((key, f"not a {method} trainer argument{hint}"))
        else:
            kind = known[key]["type"]
            accepted = _SCALARS.get(kind)
            bad_bool = kind in ("int", "float") and isinstance(value, bool)
            if accepted and (bad_bool or not isinstance(value, accepted)):
                problems.append((key, f"expected {kind}, got {type(value).__name__} {value!r}"))
    if problems:
        raise TrainingArgsError(problems)
    return args
