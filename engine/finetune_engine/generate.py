"""``generate CONFIG OUT``: Hugging Face generation over open prompts or an eval file, YAML output.

Config (YAML)::

    model: path/to/model            # a full model, or base + adapter below
    adapter: null                   # optional LoRA adapter directory
    prompts: ["What is 2 plus 3?"]  # open prompts, and/or
    eval_file: eval.jsonl           # `messages` (last assistant turn = correct answer) or prompt/completion
    max_new_tokens: 64
    temperature: 0.0                # 0 = greedy
    batch_size: 8

Output: a YAML list; each item has ``prompt``, ``answer`` and ``correct_answers``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    adapter: str | None = None
    prompts: list[str] = Field(default_factory=list)
    eval_file: str | None = None
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, gt=0)


def load_items(cfg: GenerateConfig) -> list[dict[str, Any]]:
    items = [{"messages": [{"role": "user", "content": p}], "correct_answers": []} for p in cfg.prompts]
    if cfg.eval_file:
        from finetune_engine.data.validate import iter_records, validate_files

        validate_files([cfg.eval_file], method="sft")
        for _, rec in iter_records(cfg.eval_file):
            if "messages" in rec:
                msgs = rec["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                items.append({"messages": msgs[:last], "correct_answers": [msgs[last]["content"]]})
            elif "prompt" in rec:
                items.append({"messages": [{"role": "user", "content": rec["prompt"]}], "correct_answers": [rec["completion"]]})
    if not items:
        raise ValueError("nothing to generate: give prompts or an eval_file")
    return items


def generate_answers(model, tok, items: list[dict[str, Any]], max_new_tokens: int = 64, temperature: float = 0.0,
                     batch_size: int = 8, chat: bool = True) -> list[str]:
    """The model's continuation of each item: ``messages`` rendered with the chat template and a
    generation prompt (``chat``), or ``text`` continued as it is (BOS first, as in training).

    Left padding and the KV cache are switched on for the call and restored after; the model is
    left in the mode it was in (generation may run in the middle of training)."""
    import torch

    from finetune_engine.data.tokenize import with_bos

    side, pad, was_training = tok.padding_side, tok.pad_token, model.training
    tok.padding_side = "left"
    if pad is None:
        tok.pad_token = tok.eos_token  # pads are masked; any id will do
    pad_id = tok.pad_token_id
    bos = tok.bos_token if tok.bos_token and tok.bos_token != tok.eos_token else ""
    model.eval()
    answers: list[str] = []
    try:
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            if chat:
                texts = [with_bos(tok, tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True))
                         for it in batch]
            else:
                texts = [bos + it["text"] for it in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            enc.pop("token_type_ids", None)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature or None,
                                     pad_token_id=pad_id, use_cache=True)
            answers += [tok.decode(row, skip_special_tokens=True) for row in gen[:, enc["input_ids"].shape[1]:]]
    finally:
        tok.padding_side = side
        if pad is None:
            tok.pad_token = None
        model.train(was_training)
    return answers


def generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.adapter or cfg.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    if model.get_input_embeddings().weight.shape[0] != len(tok):
        model.resize_token_embeddings(len(tok))
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()
    items = load_items(cfg)
    out = []
    for i in range(0, len(items), cfg.batch_size):
        batch = items[i : i + cfg.batch_size]
        answers = generate_answers(model, tok, batch, cfg.max_new_tokens, cfg.temperature, cfg.batch_size)
        for it, answer in zip(batch, answers, strict=True):
            out.append({"prompt": it["messages"][-1]["content"], "answer": answer.strip(), "correct_answers": it["correct_answers"]})
        log.info("generated %d / %d", min(i + cfg.batch_size, len(items)), len(items))
    return out


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="generate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="Generation config YAML.")
    parser.add_argument("output", help="Where to write the YAML list of answers.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = GenerateConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
        results = generate(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.output).write_text(yaml.safe_dump(results, sort_keys=False, allow_unicode=True))
    print(f"{len(results)} answers written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


