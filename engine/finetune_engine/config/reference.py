"""Render docs/config-reference.md from the schema's field descriptions."""

from __future__ import annotations

import enum
import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune_engine.config import schema, yamlio
from finetune_engine.config.training_args import (
    DERIVED_TRAINING_ARGS,
    ENGINE_TRAINING_ARGS,
    LEGACY_TRAINING_ARGS,
    LEGACY_VALUES,
    MANAGED_TRAINING_ARGS,
    VALUE_RULES_DOC,
)

_SECTIONS = [
    ("data_conf", schema.DataConf),
    ("data_conf.training_data (type: CONCATENATION)", schema.ConcatenationData),
    ("data_conf.training_data (type: PRECOMPUTE_WEIGHTED_MIX)", schema.WeightedMixData),
    ("data_conf.training_data (type: TEXT_FILES)", schema.TextFilesData),
    ("data_conf.training_data.datasets[] (TEXT_FILES)", schema.TextFileRef),
    ("data_conf.*.datasets[]", schema.DatasetRef),
    ("data_conf.validation_data (type: AUTO_SPLIT)", schema.AutoSplitValidation),
    ("data_conf.validation_data (type: CONCATENATION)", schema.ConcatenationValidation),
    ("data_conf.validation_data (type: NONE)", schema.NoValidation),
    ("batchsize_conf", schema.BatchsizeConf),
    ("peft_conf (peft_type: NO_PEFT)", schema.NoPeft),
    ("peft_conf (peft_type: PRETRAINED_PEFT)", schema.PretrainedPeft),
    ("peft_conf (peft_type: LORA and the other adapter types)", schema.AdapterPeft),
    ("quant_conf (quantization_type: no-quantization)", schema.NoQuantization),
    ("quant_conf (quantization_type: bits-and-bytes)", schema.BitsAndBytesQuantization),
    ("run_conf", schema.RunConf),
    ("run_conf.model_args", schema.ModelArgs),
    ("sft_args", schema.SftArgs),
    ("tracking", schema.Tracking),
    ("tracking.sample_generations", schema.SampleGenerations),
    ("overrides", schema.Overrides),
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if args:
        inner = [_type_name(a) for a in args if a is not type(None)]
        name = getattr(origin, "__name__", None)
        if name in ("list", "dict"):
            return f"{name}[{', '.join(inner)}]"
        text = " \\| ".join(inner)
        return text + (" \\| null" if type(None) in args else "")
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    value = field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value)}`"


def render_reference() -> str:
    out = [
        "# Experiment config reference",
        "",
        "Generated from `engine/finetune_engine/config/schema.py` by "
        "`python -m finetune_engine.config.generate`; a test fails when it is stale.",
        "Unknown keys are errors naming their place. Top-level sections: "
        + ", ".join(f"`{k}`" for k in schema.ExperimentConfig.model_fields)
        + ".",
        "",
        "The file is YAML (1.2 floats: `5e-05` is a number), read safely: a key given twice in one "
        "mapping, a tag that builds objects (`!!python/...`), "
        f"more than {yamlio.MAX_ALIASES} aliases or aliases expanding past {yamlio.MAX_NODES} values, "
        f"nesting deeper than {yamlio.MAX_DEPTH} levels and files over {yamlio.MAX_BYTES} bytes are "
        "errors naming the line. `--set key.path=value` values are YAML too, without tags.",
        "",
    ]
    for title, model in _SECTIONS:
        out += [f"## `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
        out.append("")
    out += [
        "## `training_args`",
        "",
        "Passed through to transformers `TrainingArguments` (sft) or TRL's config class "
        "(dpo, kto); keys are checked against the installed library's fields.",
        "",
        "Not allowed here:",
        "",
    ]
    for key in DERIVED_TRAINING_ARGS:
        out.append(f"- `{key}`: derived from `batchsize_conf`.")
    for key, why in MANAGED_TRAINING_ARGS.items():
        out.append(f"- `{key}`: {why}.")
    out += ["", "Values refused before any training starts:", ""]
    for keys, rule in VALUE_RULES_DOC.items():
        out.append(f"- {', '.join(f'`{k}`' for k in keys.split(', '))}: {rule}.")
    out.append(
        "- every number, here and in every section: finite (NaN and infinity are refused) and within 64 bits."
    )
    out += ["", "Keys the engine adds:", ""]
    for key, spec in ENGINE_TRAINING_ARGS.items():
        out.append(f"- `{key}` ({', '.join(spec['methods'])}): {spec['help']}")
    out += [
        "",
        "Keys of the transformers (4.57) and TRL (0.13) versions the Silogen engine pins that later "
        "releases removed or renamed are accepted, each with one log line saying what became of it:",
        "",
    ]
    for key, (methods, what) in LEGACY_TRAINING_ARGS.items():
        out.append(f"- `{key}`{f' ({chr(44).join(methods)})' if methods else ''}: {what}.")
    for (key, old), new in LEGACY_VALUES.items():
        out.append(f"- `{key}: {old}`: renamed to `{new}`.")
    out.append("")
    return "\n".join(out)
