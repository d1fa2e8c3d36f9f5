"""Model presets: what a model family needs that a config may leave out.

A preset gives LoRA target modules, a chat template, and the GPUs a LoRA run in bf16 needs
(count and memory per GPU). It is matched by the model's Hub id (``run_conf.model``, also as the
tail of a bucket URI or directory) and, for local directories, by ``model_type`` in config.json.
It fills only what the config leaves out: ``peft_conf.peft_kwargs.target_modules``, and
``data_conf.chat_template_name`` when the preset is named in ``run_conf.preset``; a value in the
config always wins. A matched (``auto``) preset leaves ``chat_template_name`` to its default
(mistral-with-system, the Silogen engine's), so a config means the same here as there; the log
names the preset's template. ``run_conf.preset`` chooses: ``auto`` (match), a preset name (force
it) or ``none``.

    finetune-engine presets [--match MODEL] [--json]

No torch here: Airflow applies presets when it validates a config.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3/Phi-4-mini fuse q/k/v and gate/up into one linear each.
PHI3_FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Mixture-of-experts models (Qwen3-MoE, Mixtral): transformers fuses each layer's experts into 3-D
# parameters (not linear modules) and its router is not a linear either, so LoRA adapts attention.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Adapter types whose peft config takes target_modules with the same meaning as LoRA's.
TARGETED_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    patterns: tuple[str, ...]  # regexes searched (case-insensitive) in the model id
    model_types: tuple[str, ...]  # config.json model_type; matched only when no id pattern matched
    target_modules: tuple[str, ...]
    chat_template: str  # a data_conf.chat_template_name value
    gpus: int  # recommended GPUs for LoRA in bf16
    gpu_memory_gib: int  # per GPU
    note: str = ""


# Specific sizes first; the family entries (model_types only) catch the rest by config.json.
CATALOG: tuple[Preset, ...] = (
    Preset("llama-3.2-1b", "Llama-3.x", (r"llama-3\.2-1b",), (), ATTENTION_MLP, "llama-3", 1, 16),
    Preset("llama-3.2-3b", "Llama-3.x", (r"llama-3\.2-3b",), (), ATTENTION_MLP, "llama-3", 1, 24),
    Preset("llama-3.1-8b", "Llama-3.x", (r"llama-3(\.1)?-8b",), (), ATTENTION_MLP, "llama-3", 1, 48),
    Preset(
        "llama-3.x-70b",
        "Llama-3.x",
        (r"llama-3(\.[13])?-70b",),
        (),
        ATTENTION_MLP,
        "llama-3",
        4,
        80,
        "QLoRA fits one 80 GiB GPU",
    ),
    Preset("qwen2.5-small", "Qwen2.5", (r"qwen2\.5-(0\.5|1\.5|3)b",), (), ATTENTION_MLP, "chat-ml", 1, 24),
    Preset("qwen2.5-7b", "Qwen2.5", (r"qwen2\.5-7b",), (), ATTENTION_MLP, "chat-ml", 1, 48),
    Preset("qwen2.5-14b", "Qwen2.5", (r"qwen2\.5-14b",), (), ATTENTION_MLP, "chat-ml", 1, 80),
    Preset("qwen2.5-32b", "Qwen2.5", (r"qwen2\.5-32b",), (), ATTENTION_MLP, "chat-ml", 2, 80),
    Preset(
        "qwen2.5-72b",
        "Qwen2.5",
        (r"qwen2\.5-72b",),
        (),
        ATTENTION_MLP,
        "chat-ml",
        4,
        80,
        "QLoRA fits one 80 GiB GPU",
    ),
    Preset(
        "mistral-7b",
        "Mistral",
        (r"mistral-7b",),
        (),
        ATTENTION_MLP,
        "keep-original",
        1,
        48,
        "base v0.1 has no chat template: chat-ml is used for a local copy without one",
    ),
    Preset(
        "phi-3-mini",
        "Phi-3",
        (r"phi-3(\.5)?-mini",),
        (),
        PHI3_FUSED,
        "keep-original",
        1,
        24,
    ),
    Preset(
        "phi-3-medium",
        "Phi-3",
        (r"phi-3-medium",),
        (),
        PHI3_FUSED,
        "keep-original",
        1,
        80,
    ),
    Preset("qwen3-small", "Qwen3", (r"qwen3-(0\.6|1\.7|4)b",), (), ATTENTION_MLP, "keep-original", 1, 24),
    Preset("qwen3-8b", "Qwen3", (r"qwen3-8b",), (), ATTENTION_MLP, "keep-original", 1, 48),
    Preset("qwen3-14b", "Qwen3", (r"qwen3-14b",), (), ATTENTION_MLP, "keep-original", 1, 80),
    Preset(
        "qwen3-30b-a3b",
        "Qwen3-MoE",
        (r"qwen3-30b-a3b",),
        (),
        ATTENTION,
        "keep-original",
        2,
        80,
        "mixture of experts: LoRA on attention (the experts are fused parameters, the router is no linear)",
    ),
    Preset("qwen3-32b", "Qwen3", (r"qwen3-32b",), (), ATTENTION_MLP, "keep-original", 2, 80),
    Preset(
        "mixtral-8x7b",
        "Mixtral",
        (r"mixtral-8x7b",),
        (),
        ATTENTION,
        "keep-original",
        4,
        80,
        "mixture of experts: LoRA on attention; QLoRA fits two 80 GiB GPUs",
    ),
    Preset("gemma-2-2b", "Gemma 2", (r"gemma-2-2b",), (), ATTENTION_MLP, "keep-original", 1, 24),
    Preset("gemma-2-9b", "Gemma 2", (r"gemma-2-9b",), (), ATTENTION_MLP, "keep-original", 1, 48),
    Preset(
        "gemma-2-27b",
        "Gemma 2",
        (r"gemma-2-27b",),
        (),
        ATTENTION_MLP,
        "keep-original",
        2,
        80,
        "its template refuses system messages",
    ),
    Preset("gemma-3-1b", "Gemma 3", (r"gemma-3-1b",), (), ATTENTION_MLP, "keep-original", 1, 16),
    Preset("gemma-3-4b", "Gemma 3", (r"gemma-3-4b",), (), ATTENTION_MLP, "keep-original", 1, 24),
    Preset("gemma-3-12b", "Gemma 3", (r"gemma-3-12b",), (), ATTENTION_MLP, "keep-original", 1, 80),
    Preset("gemma-3-27b", "Gemma 3", (r"gemma-3-27b",), (), ATTENTION_MLP, "keep-original", 2, 80),
    Preset("phi-4-mini", "Phi-3", (r"phi-4-mini",), (), PHI3_FUSED, "keep-original", 1, 24),
    Preset(
        "tinyllama-1.1b",
        "TinyLlama",
        (r"tinyllama",),
        (),
        ATTENTION_MLP,
        "chat-ml",
        1,
        16,
        "the seed tutorial's model; chat-ml adds <|im_start|>/<|im_end|>",
    ),
    # Families by config.json model_type (size unknown: the smallest member's needs).
    Preset(
        "qwen2",
        "Qwen2.5",
        (),
        ("qwen2",),
        ATTENTION_MLP,
        "chat-ml",
        1,
        24,
        "matched by model_type; size not known",
    ),
    Preset(
        "qwen3",
        "Qwen3",
        (),
        ("qwen3",),
        ATTENTION_MLP,
        "keep-original",
        1,
        24,
        "matched by model_type; size not known",
    ),
    Preset(
        "qwen3_moe",
        "Qwen3-MoE",
        (),
        ("qwen3_moe",),
        ATTENTION,
        "keep-original",
        2,
        80,
        "matched by model_type; size not known; LoRA on attention",
    ),
    Preset(
        "mixtral",
        "Mixtral",
        (),
        ("mixtral",),
        ATTENTION,
        "keep-original",
        4,
        80,
        "matched by model_type; size not known; LoRA on attention",
    ),
    Preset(
        "gemma2",
        "Gemma 2",
        (),
        ("gemma2",),
        ATTENTION_MLP,
        "keep-original",
        1,
        24,
        "matched by model_type; size not known; its template refuses system messages",
    ),
    Preset(
        "gemma3_text",
        "Gemma 3",
        (),
        ("gemma3_text",),
        ATTENTION_MLP,
        "keep-original",
        1,
        16,
        "matched by model_type; size not known",
    ),
    Preset(
        "mistral",
        "Mistral",
        (),
        ("mistral",),
        ATTENTION_MLP,
        "keep-original",
        1,
        48,
        "matched by model_type; size not known",
    ),
    Preset(
        "phi3",
        "Phi-3",
        (),
        ("phi3",),
        PHI3_FUSED,
        "keep-original",
        1,
        24,
        "matched by model_type; size not known",
    ),
    Preset(
        "llama",
        "Llama",
        (),
        ("llama",),
        ATTENTION_MLP,
        "keep-original",
        1,
        16,
        "any Llama-architecture model, e.g. the tiny local model; chat-ml when it has no chat template",
    ),
)
BY_NAME = {p.name: p for p in CATALOG}


def _local_json(model: str, name: str) -> dict[str, Any] | None:
    path = Path(model) / name
    if "://" in model or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def local_model_type(model: str) -> str | None:
    data = _local_json(model, "config.json")
    value = (data or {}).get("model_type")
    return value if isinstance(value, str) else None


def local_has_chat_template(model: str) -> bool | None:
    """True/False for a local directory (tokenizer_config.json or chat_template.jinja), None when unknown."""
    if "://" in model or not (Path(model) / "config.json").is_file():
        return None
    if (Path(model) / "chat_template.jinja").is_file() or (Path(model) / "chat_template.json").is_file():
        return True
    data = _local_json(model, "tokenizer_config.json")
    return bool(data and data.get("chat_template")) if data is not None else None


def match_preset(model: str) -> tuple[Preset, str] | None:
    """(preset, why) for ``model``, or None. Id patterns first (specific sizes), then model_type."""
    for preset in CATALOG:
        for pattern in preset.patterns:
            if re.search(pattern, model, re.IGNORECASE):
                return preset, f"model id matches {pattern!r}"
    model_type = local_model_type(model)
    if model_type:
        for preset in CATALOG:
            if model_type in preset.model_types:
                return preset, f"config.json model_type {model_type!r}"
    return None


def apply_preset(data: dict[str, Any]) -> tuple[dict[str, Any], Preset | None, list[str]]:
    """Fill what the raw config ``data`` leaves out from the matching preset.

    Returns (new data, the preset or None, the keys set as 'key = value' lines). Malformed data is
    returned unchanged; the schema reports it."""
    run = data.get("run_conf")
    if not isinstance(run, dict) or not isinstance(run.get("model"), str):
        return data, None, []
    choice = run.get("preset", "auto")
    if choice == "none" or not isinstance(choice, str):
        return data, None, []
    model = run["model"]
    if choice == "auto":
        found = match_preset(model)
        if found is None:
            return data, None, []
        preset, why = found
    elif choice in BY_NAME:
        preset, why = BY_NAME[choice], "run_conf.preset"
    else:
        return data, None, []  # the schema names the unknown preset
    data = copy.deepcopy(data)
    applied: list[str] = []
    peft = data.get("peft_conf")
    if isinstance(peft, dict) and peft.get("peft_type") in TARGETED_PEFT_TYPES:
        kwargs = peft.setdefault("peft_kwargs", {})
        if isinstance(kwargs, dict) and "target_modules" not in kwargs:
            kwargs["target_modules"] = list(preset.target_modules)
            applied.append(f"peft_conf.peft_kwargs.target_modules = {list(preset.target_modules)}")
    dc = data.get("data_conf")
    if isinstance(dc, dict) and "chat_template_name" not in dc:
        template = preset.chat_template
        if template == "keep-original" and local_has_chat_template(model) is False:
            template = "chat-ml"  # the seed's rule: keep the model's own template, else chat-ml
        if choice == "auto":
            log.info(
                "model preset %s suggests data_conf.chat_template_name: %s; the config leaves it "
                "out, so the default (mistral-with-system) applies",
                preset.name,
                template,
            )
        else:
            dc["chat_template_name"] = template
            applied.append(f"data_conf.chat_template_name = {template}")
    if applied:
        log.info("model preset %s (%s): %s", preset.name, why, "; ".join(applied))
    return data, preset, applied


def _table() -> str:
    rows = [("name", "family", "matches", "target modules", "chat template", "GPUs x GiB (LoRA bf16)")]
    for p in CATALOG:
        matches = ", ".join(p.patterns) or "model_type " + ", ".join(p.model_types)
        targets = {ATTENTION_MLP: "attention+MLP", ATTENTION: "attention"}.get(
            p.target_modules, ",".join(p.target_modules)
        )
        rows.append((p.name, p.family, matches, targets, p.chat_template, f"{p.gpus} x {p.gpu_memory_gib}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"attention+MLP = {', '.join(ATTENTION_MLP)}; attention = {', '.join(ATTENTION)}")
    lines += [f"{p.name}: {p.note}" for p in CATALOG if p.note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine presets", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--match", metavar="MODEL", help="Show the preset a model (Hub id, URI or directory) gets."
    )
    parser.add_argument("--json", action="store_true", help="Machine-readable output.")
    args = parser.parse_args(argv)
    if args.match:
        found = match_preset(args.match)
        if found is None:
            print(f"{args.match}: no preset matches; set target_modules and chat_template_name in the config")
            return 1
        preset, why = found
        print(
            json.dumps({**asdict(preset), "why": why}, indent=1)
            if args.json
            else f"{args.match}: {preset.name} ({why})"
        )
        return 0
    print(json.dumps([asdict(p) for p in CATALOG], indent=1) if args.json else _table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
