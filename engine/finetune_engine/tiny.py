"""Build a tiny Llama model and a learnable chat dataset locally, with no network.

Used by the demo and the tests: a byte-level BPE tokenizer trained on generated sentences, a
2-layer Llama (hidden 128, 4 heads of 32 — vLLM's CPU kernels need head size >= 32), and a
synthetic chat dataset whose answers follow rules a few training steps can pick up.

    python -m finetune_engine.tiny model OUT_DIR
    python -m finetune_engine.tiny data OUT.jsonl --examples 400
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "whale", "mouse", "eagle", "frog", "bear"]
PLACES = ["forest", "river", "city", "mountain", "desert", "garden", "harbor", "valley"]
VERBS = ["sees", "likes", "follows", "finds", "paints", "visits", "guards", "greets"]
COUNTRIES = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Greece": "Athens",
}

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System:\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User:\n' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant:\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
)


def _sentences(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.sample(ANIMALS, 2)
        out.append(
            f"The {rng.choice(COLOURS)} {a} {rng.choice(VERBS)} the {b} near the {rng.choice(PLACES)}."
        )
    for country, capital in COUNTRIES.items():
        out.append(f"The capital of {country} is {capital}.")
    for x in range(20):
        for y in range(20):
            out.append(f"{x} plus {y} is {x + y}.")
    return out


def chat_example(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(list(COUNTRIES))
        q, a = f"What is the capital of {country}?", f"The capital of {country} is {COUNTRIES[country]}."
    elif kind == 1:
        x, y = rng.randrange(20), rng.randrange(20)
        q, a = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    else:
        animal, colour = rng.choice(ANIMALS), rng.choice(COLOURS)
        q, a = f"Describe a {colour} {animal}.", f"The {colour} {animal} sees the {rng.choice(ANIMALS)}."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
    return {"messages": messages}


def write_chat_dataset(path: str | Path, examples: int = 400, seed: int = 0) -> Path:
    """A JSONL file of `messages` examples with learnable answers."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(examples):
            f.write(json.dumps({**chat_example(rng), "id": f"tiny-{seed}-{i}"}) + "\n")
    return path


def preference_example(rng: random.Random) -> tuple[list[dict], str, str]:
    """(prompt messages, right answer, wrong answer): a toy preference whose side is learnable."""
    if rng.random() < 0.5:
        country, wrong = rng.sample(list(COUNTRIES), 2)
        q = f"What is the capital of {country}?"
        good, bad = (
            f"The capital of {country} is {COUNTRIES[country]}.",
            f"The capital of {country} is {COUNTRIES[wrong]}.",
        )
    else:
        x, y = rng.randrange(20), rng.randrange(20)
        q = f"What is {x} plus {y}?"
        good, bad = f"{x} plus {y} is {x + y}.", f"{x} plus {y} is {x + y + rng.randrange(1, 9)}."
    return [{"role": "user", "content": q}], good, bad


def write_preference_dataset(
    path: str | Path, examples: int = 64, seed: int = 0, fmt: str = "dpo_messages"
) -> Path:
    """A JSONL preference file: ``dpo_messages`` (the seed's prompt_messages/chosen_messages/
    rejected_messages), ``dpo_trl`` (TRL's conversational prompt/chosen/rejected), ``dpo_text``
    (the same as plain strings) or ``kto`` (unpaired prompt/completion/label, both sides of each pair)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(examples):
            prompt, good, bad = preference_example(rng)
            chosen, rejected = (
                [{"role": "assistant", "content": good}],
                [{"role": "assistant", "content": bad}],
            )
            if fmt == "dpo_messages":
                rows = [{"prompt_messages": prompt, "chosen_messages": chosen, "rejected_messages": rejected}]
            elif fmt == "dpo_trl":
                rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
            elif fmt == "dpo_text":
                text = f"User:\n{prompt[0]['content']}\nAssistant:\n"
                rows = [{"prompt": text, "chosen": good, "rejected": bad}]
            elif fmt == "kto":
                rows = [
                    {"prompt": prompt, "completion": chosen, "label": True},
                    {"prompt": prompt, "completion": rejected, "label": False},
                ]
            else:
                raise ValueError(f"unknown preference format {fmt!r}")
            for j, row in enumerate(rows):
                f.write(json.dumps({**row, "id": f"pref-{seed}-{i}-{j}"}) + "\n")
    return path


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = _sentences(3000, rng)
    corpus += [json.dumps(chat_example(rng)["messages"]) for _ in range(500)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Save a tiny random Llama + tokenizer (no pad token, like most base models) to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, seed)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny model or dataset locally.")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="Write a tiny Llama model and tokenizer.")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("data", help="Write a synthetic chat JSONL dataset.")
    d.add_argument("out")
    d.add_argument("--examples", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "model":
        print(build_tiny_model(args.out_dir, seed=args.seed))
    else:
        print(write_chat_dataset(args.out, args.examples, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
