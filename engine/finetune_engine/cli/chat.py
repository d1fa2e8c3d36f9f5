"""Ask a saved model one question with its chat template: ``python -m finetune_engine.cli.chat MODEL Q``."""

from __future__ import annotations

import argparse
from pathlib import Path


def chat(model_dir: str, question: str, max_new_tokens: int = 32) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.data.tokenize import with_bos

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(with_bos(tok, text), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine chat", description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("question")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    args = parser.parse_args(argv)
    if not Path(args.model_dir, "config.json").is_file():
        raise FileNotFoundError(
            f"{args.model_dir}: no config.json; give the directory of a saved model (e.g. a run's "
            "checkpoint-final)"
        )
    print(f"user: {args.question}\nassistant: {chat(args.model_dir, args.question, args.max_new_tokens)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
