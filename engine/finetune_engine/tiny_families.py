"""Tiny random-weight models of the families people fine-tune, built locally (no download).

Each is built from transformers' own config class with the family's structural quirks, at the
smallest shape vLLM's CPU kernels serve (hidden 128, 4 heads of 32, 2 layers), and a tokenizer that
carries the family's special tokens and its real chat template (``families/<name>.jinja``, each
naming its public source):

========== ============== ==============================================================================
family     model_type     quirks kept
========== ============== ==============================================================================
llama3     llama          tied embeddings (as Llama 3.2 1B), GQA, rope scaling ``llama3``, <|eot_id|>
qwen2.5    qwen2          matrix padded past the tokenizer, tied, attention bias, no BOS token
qwen3      qwen3          q/k norms, explicit head_dim, padded and tied, <think> tokens
qwen3-moe  qwen3_moe      mixture of experts (router ``gate``, fused ``experts``), q/k norms, padded
mistral    mistral        sliding-window attention, [INST] template without a system role
gemma2     gemma2         scaled embeddings, attention and final logit soft-capping, sliding/global
                          layers, tied, <end_of_turn> ends turns, no system role
gemma3     gemma3_text    scaled embeddings, q/k norms, sliding/global layers with local rope, tied
phi3       phi3           fused ``qkv_proj`` and ``gate_up_proj``, matrix padded past the tokenizer
========== ============== ==============================================================================

    python -m finetune_engine.tiny_families OUT_DIR [--family NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

HIDDEN, HEADS, HEAD_DIM, LAYERS, INTERMEDIATE = 128, 4, 32, 2, 256
WINDOW = 64  # a sliding window shorter than the training sequences, so it really slides


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    template: str  # families/<template>.jinja
    bos: str | None
    eos: str
    end_of_turn: str  # the token that closes an assistant turn in the template
    special: tuple[str, ...]  # the family's special tokens (bos/eos/pad/unk included)
    pad: str | None = None
    unk: str | None = None
    spare_rows: int = 0  # embedding rows past the tokenizer (real checkpoints pad theirs)
    tied: bool = False
    system_role: bool = True  # False: the template refuses system messages
    preset: str = ""  # the catalog entry its config.json model_type matches
    stop: tuple[str, ...] = ()  # generation_config eos ids (end of turn first)
    config: Callable[[dict[str, Any]], Any] | None = field(default=None, compare=False)


def chat_template(family: Family) -> str:
    """The family's real chat template (the header comment naming its source removed)."""
    text = resources.files("finetune_engine").joinpath(f"families/{family.template}.jinja").read_text("utf-8")
    first, _, rest = text.partition("\n")
    return rest if first.startswith("{#") else text


def _llama3(common: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(
        **common,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    )


def _qwen2(common: dict[str, Any]):
    from transformers import Qwen2Config

    return Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=4096)


def _qwen3(common: dict[str, Any]):
    from transformers import Qwen3Config

    return Qwen3Config(**common, num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=4096)


def _qwen3_moe(common: dict[str, Any]):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **common,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


def _mistral(common: dict[str, Any]):
    from transformers import MistralConfig

    return MistralConfig(
        **common,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        max_position_embeddings=4096,
    )


def _gemma2(common: dict[str, Any]):
    from transformers import Gemma2Config

    return Gemma2Config(
        **common,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
    )


def _gemma3(common: dict[str, Any]):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **common,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
    )


def _phi3(common: dict[str, Any]):
    from transformers import Phi3Config

    return Phi3Config(**common, num_key_value_heads=HEADS, max_position_embeddings=4096)


_LLAMA3_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
_GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3",
            "llama",
            "llama3",
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            end_of_turn="<|eot_id|>",
            special=_LLAMA3_SPECIAL,
            tied=True,
            preset="llama",
            stop=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
            config=_llama3,
        ),
        Family(
            "qwen2.5",
            "qwen2",
            "qwen2_5",
            bos=None,
            eos="<|im_end|>",
            end_of_turn="<|im_end|>",
            special=_QWEN_SPECIAL,
            pad="<|endoftext|>",
            spare_rows=40,
            tied=True,
            preset="qwen2",
            stop=("<|im_end|>", "<|endoftext|>"),
            config=_qwen2,
        ),
        Family(
            "qwen3",
            "qwen3",
            "qwen3",
            bos=None,
            eos="<|im_end|>",
            end_of_turn="<|im_end|>",
            special=(*_QWEN_SPECIAL, "<think>", "</think>"),
            pad="<|endoftext|>",
            spare_rows=24,
            tied=True,
            preset="qwen3",
            stop=("<|im_end|>", "<|endoftext|>"),
            config=_qwen3,
        ),
        Family(
            "qwen3-moe",
            "qwen3_moe",
            "qwen3",
            bos=None,
            eos="<|im_end|>",
            end_of_turn="<|im_end|>",
            special=(*_QWEN_SPECIAL, "<think>", "</think>"),
            pad="<|endoftext|>",
            spare_rows=24,
            preset="qwen3_moe",
            stop=("<|im_end|>", "<|endoftext|>"),
            config=_qwen3_moe,
        ),
        Family(
            "mistral",
            "mistral",
            "mistral",
            bos="<s>",
            eos="</s>",
            end_of_turn="</s>",
            special=("<unk>", "<s>", "</s>"),
            unk="<unk>",
            system_role=False,
            preset="mistral",
            config=_mistral,
        ),
        Family(
            "gemma2",
            "gemma2",
            "gemma2",
            bos="<bos>",
            eos="<eos>",
            end_of_turn="<end_of_turn>",
            special=_GEMMA_SPECIAL,
            pad="<pad>",
            unk="<unk>",
            tied=True,
            system_role=False,
            preset="gemma2",
            stop=("<end_of_turn>", "<eos>"),
            config=_gemma2,
        ),
        Family(
            "gemma3",
            "gemma3_text",
            "gemma3",
            bos="<bos>",
            eos="<eos>",
            end_of_turn="<end_of_turn>",
            special=_GEMMA_SPECIAL,
            pad="<pad>",
            unk="<unk>",
            tied=True,
            preset="gemma3_text",
            stop=("<end_of_turn>", "<eos>"),
            config=_gemma3,
        ),
        Family(
            "phi3",
            "phi3",
            "phi3",
            bos="<s>",
            eos="<|endoftext|>",
            end_of_turn="<|end|>",
            special=(
                "<unk>",
                "<s>",
                "</s>",
                "<|endoftext|>",
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|end|>",
            ),
            pad="<|endoftext|>",
            unk="<unk>",
            spare_rows=53,
            preset="phi3",
            stop=("<|end|>", "<|endoftext|>", "<|assistant|>"),
            config=_phi3,
        ),
    )
}


@functools.lru_cache(maxsize=4)
def _bpe_json(vocab_size: int, seed: int) -> str:
    """A byte-level BPE trained once on the tiny corpus (no special tokens), as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from finetune_engine.tiny import _sentences, chat_example

    rng = random.Random(seed)
    corpus = _sentences(1500, rng) + [json.dumps(chat_example(rng)["messages"]) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def build_family_tokenizer(family: Family | str, vocab_size: int = 512, seed: int = 0):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[family] if isinstance(family, str) else family
    tok = Tokenizer.from_str(_bpe_json(vocab_size, seed))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
    )
    fast.chat_template = chat_template(family)
    return fast


def build_family_model(family: Family | str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` and its tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[family] if isinstance(family, str) else family
    out = Path(out_dir)
    tokenizer = build_family_tokenizer(family, seed=seed)
    ids = tokenizer.convert_tokens_to_ids
    common = dict(
        vocab_size=len(tokenizer) + family.spare_rows,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        bos_token_id=ids(family.bos) if family.bos else None,
        eos_token_id=ids(family.eos),
        pad_token_id=ids(family.pad) if family.pad else None,
        tie_word_embeddings=family.tied,
    )
    torch.manual_seed(seed)
    config = family.config(common)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stop = [ids(t) for t in family.stop] or [ids(family.eos)]
    model.generation_config = GenerationConfig(
        bos_token_id=common["bos_token_id"],
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=common["pad_token_id"] if common["pad_token_id"] is not None else ids(family.eos),
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build tiny random models of the fine-tuned families.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: all")
    args = parser.parse_args(argv)
    for name in args.family or FAMILIES:
        print(build_family_model(name, Path(args.out_dir) / name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
