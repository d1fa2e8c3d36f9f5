"""The Silogen-compatibility corpus: rendered chart configs, that engine's own configs, its data formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

COMPAT = Path(__file__).parent
CONFIGS = COMPAT / "configs"
DATA = COMPAT / "data"

# Files the chart's download step puts under /local_resources (bucket path with "/" -> "_"), and the
# corpus file in the same format that stands in for each.
LOCAL_RESOURCES = {
    "default-bucket_datasets_argilla-mistral-large-human-prompts.jsonl": (
        "argilla-mistral-large-human-prompts.jsonl"
    ),
    "default-bucket_datasets_ultrafeedback-binarized.json": "ultrafeedback-binarized.json",
    "default-bucket_datasets_long-random-data.jsonl": "long-random-data.jsonl",
    "default-bucket_datasets_OPI_updated_160k.sample1000.jsonl": "OPI_updated_160k.sample1000.jsonl",
    "default-bucket_datasets_dolly-odia-15k-msgfmt.jsonl": "odia-msgfmt.jsonl",
    "default-bucket_datasets_odia-domain-context-train-v1-msgfmt.jsonl": "odia-msgfmt.jsonl",
    "default-bucket_datasets_alpaca-odia-52k-msgfmt.jsonl": "odia-msgfmt.jsonl",
    "default-bucket_datasets_hardcode-odia-qa-105-msgfmt.jsonl": "odia-msgfmt.jsonl",
    "default-bucket_datasets_odiencorp-odia-25k-msgfmt.jsonl": "odia-msgfmt.jsonl",
}

# The Silogen engine's own configs name placeholder data paths; each stands for a corpus file.
ENGINE_DATA = {
    "/datasets/data.json": "e2e-sft-array.json",
    "/datasets/dpo/data.json": "e2e-dpo-array.json",
    "/datasets/Dolly-Silosplit-train.jsonl": "argilla-mistral-large-human-prompts.jsonl",
    "/datasets/OASST1.jsonl": "tags-labels.jsonl",
    "/datasets/Dolly-Silosplit-validation.jsonl": "odia-msgfmt.jsonl",
    # test_dpo_config names SFT-looking paths for a DPO config; preference data stands in.
    "./Dolly-Silosplit": "ultrafeedback-binarized.json",
    "./OASST1": "e2e-dpo-array.json",
    "Dolly-Silosplit": "ultrafeedback-binarized.json",
}


def _body(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))


def chart_configs(distinct: bool = True) -> list[Path]:
    """The rendered chart configs; with ``distinct``, one per distinct config (many model recipes
    render to the same config and the same Job commands; training each once keeps the corpus fast)."""
    paths = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("engine-"))
    if not distinct:
        return paths
    seen: dict[tuple[str, tuple[str, ...]], Path] = {}
    for p in paths:
        seen.setdefault((_body(p), tuple(header_commands(p))), p)
    return list(seen.values())


def engine_configs() -> list[Path]:
    return sorted(CONFIGS.glob("engine-*.yaml"))


def header_commands(path: Path) -> list[str]:
    """The Job's commands recorded in a rendered config's header (``#   $ cmd``)."""
    return [line.split("$ ", 1)[1] for line in path.read_text().splitlines() if line.startswith("#   $ ")]


def header_flag(path: Path, name: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#   ") and f"{name}: " in line:
            return line.split(f"{name}: ", 1)[1].split(",")[0].strip()
    raise KeyError(name)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def compat_base_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model, as the chart's download step lays it out (never modified by a run)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def chat_ml_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as an SFT run with chat_template_name: chat-ml leaves it (merged): its vocabulary
    grown by <|im_start|> and <|im_end|>. The Silogen engine's DPO docs train such a model - DPO, there
    and here, refuses a template that would add tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chat-ml") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
