"""The modules an adapter can target, per architecture (config.json ``model_type``). No torch here.

peft matches each name of a ``target_modules`` list against the end of every module's path
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``); a name that matches nothing fails the
run inside the pod, after the model has been downloaded. Airflow checks the names against this table
before any pod: for each ``model_type`` the last path segment of every linear, Conv1D and embedding
module of its transformers causal-LM class (what LoRA adapts). A model type that is not here is not
checked; ``all-linear`` and a regex string are left to peft.

The table is tested against the installed transformers (tests/engine/test_config.py), each entry
built on the meta device.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from finetune_engine.config.presets import Preset

_LLAMA_LIKE = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
)
_GPT2_LIKE = ("c_attn", "c_proj", "c_fc", "wte", "wpe", "lm_head")
_FUSED_QKV = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head")

MODULE_NAMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "ministral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "stablelm",
            "smollm3",
        ),
        _LLAMA_LIKE,
    ),
    # mixture of experts: the experts are fused 3-D parameters and the router is no linear module
    **dict.fromkeys(
        ("qwen3_moe", "mixtral"), ("q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "lm_head")
    ),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "embed_tokens", "lm_head"),
    "gpt2": _GPT2_LIKE,
    "gpt_bigcode": _GPT2_LIKE,
    "gpt_neox": (*_FUSED_QKV, "embed_in"),
    "bloom": (*_FUSED_QKV, "word_embeddings"),
    "falcon": (*_FUSED_QKV, "word_embeddings"),
    "opt": (
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
        "embed_tokens",
        "embed_positions",
        "lm_head",
    ),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte", "lm_head"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj", "embed_tokens", "lm_head"),
}

# The architecture of each preset family whose entries match by model id only.
FAMILY_MODEL_TYPES = {
    "Llama-3.x": "llama",
    "TinyLlama": "llama",
    "Llama": "llama",
    "Qwen2.5": "qwen2",
    "Mistral": "mistral",
    "Phi-3": "phi3",
    "Qwen3": "qwen3",
    "Qwen3-MoE": "qwen3_moe",
    "Mixtral": "mixtral",
    "Gemma 2": "gemma2",
    "Gemma 3": "gemma3_text",
}


def preset_model_type(preset: Preset) -> str | None:
    """The ``model_type`` of the models a preset describes, or None when it does not say."""
    if preset.model_types:
        return preset.model_types[0]
    return FAMILY_MODEL_TYPES.get(preset.family)


def unmatched_target_modules(target_modules: Iterable[str], model_type: str | None) -> list[str]:
    """The names of a ``target_modules`` list that match no adaptable module of ``model_type``;
    [] when all match or the model type is not in the table."""
    known = MODULE_NAMES.get(str(model_type))
    if known is None:
        return []
    return [name for name in target_modules if str(name).rsplit(".", 1)[-1] not in known]


def describe_unmatched(unmatched: list[str], model_type: str) -> str:
    """What is wrong and what to write instead, for a message."""
    known = MODULE_NAMES[model_type]
    hints = []
    for name in unmatched:
        close = difflib.get_close_matches(str(name).rsplit(".", 1)[-1], known, n=1)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}")
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return (
        f"{', '.join(repr(n) for n in unmatched)} match{'es' if len(unmatched) == 1 else ''} no module of "
        f"a {model_type} model{hint}; its modules are {', '.join(sorted(known))}: name some of them, or "
        "use 'all-linear'"
    )
