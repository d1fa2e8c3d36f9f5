"""Regenerate the files derived from code: the trainer and peft argument catalogs and the config
reference.

python -m finetune_engine.config.generate          # write them
python -m finetune_engine.config.generate --check  # exit 1 when they are stale
python -m finetune_engine.config.generate --check --reference-only
    # only the reference doc: needs the schema (pydantic), not transformers - what `make lint` runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path

CATALOG = Path(__file__).with_name("trainer_fields.json")
PEFT_CATALOG = Path(__file__).with_name("peft_fields.json")
REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "config-reference.md"


def _kind(tp: object) -> str:
    if tp in (int, float, bool, str):
        return tp.__name__  # type: ignore[union-attr]
    if isinstance(tp, str):
        return tp
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and non_none[0] in (int, float, bool, str):
            return f"{non_none[0].__name__} | None"
    return "any"


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _choices(f: dataclasses.Field) -> list[str] | None:
    """Allowed values: the field's declared choices, or for DPO's loss_type (a list field without
    declared choices) the values its help names."""
    if f.metadata.get("choices"):
        return list(f.metadata["choices"])
    help_text = str(f.metadata.get("help", ""))
    if f.name == "loss_type" and "Possible values are" in help_text:
        part = help_text.split("Possible values are", 1)[1].split(". ", 1)[0]
        return re.findall(r"`'([a-z0-9_]+)'`", part) or None
    return None


def build_catalog() -> dict:
    import transformers
    import trl
    from transformers import TrainingArguments
    from trl import DPOConfig, KTOConfig, SFTConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    classes = {
        "sft": TrainingArguments,
        "trl_sft": SFTConfig,
        "dpo": DPOConfig,
        "kto": KTOConfig,
        "orpo": ORPOConfig,
        "cpo": CPOConfig,
    }
    fields = {}
    for method, cls in classes.items():
        fields[method] = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            entry = {
                "type": _kind(f.type),
                "default": _default(f),
                "help": " ".join(str(f.metadata.get("help", "")).split())[:300],
            }
            if method != "sft" and (choices := _choices(f)):
                entry["choices"] = choices
            fields[method][f.name] = entry
    return {
        "generated_from": {"transformers": transformers.__version__, "trl": trl.__version__},
        "fields": fields,
    }


def build_peft_catalog() -> dict:
    """The keyword arguments of each peft config class the schema accepts (peft_conf.peft_type), so
    peft_kwargs can be checked without importing peft."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from finetune_engine.config.schema import PEFT_TYPES

    by_name = {str(getattr(k, "value", k)): cls for k, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    fields = {}
    for peft_type in PEFT_TYPES:
        cls = by_name.get(peft_type)  # None: this peft release no longer has the type
        fields[peft_type] = cls and {
            "class": cls.__name__,
            "fields": sorted(
                f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")
            ),
        }
    return {"generated_from": {"peft": peft.__version__}, "fields": fields}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.config.reference import render_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check; exit 1 when stale.")
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="Only the config reference (from the schema and the stored catalog); no transformers.",
    )
    args = parser.parse_args(argv)
    outputs = {REFERENCE: render_reference()}
    if not args.reference_only:
        outputs[CATALOG] = json.dumps(build_catalog(), indent=1, sort_keys=True) + "\n"
        outputs[PEFT_CATALOG] = json.dumps(build_peft_catalog(), indent=1, sort_keys=True) + "\n"
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.name}; run: python -m finetune_engine.config.generate", file=sys.stderr)
        return 1 if stale else 0
    for p, text in outputs.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
