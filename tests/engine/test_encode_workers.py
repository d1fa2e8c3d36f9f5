"""Tokenization with worker processes gives exactly what one process gives, in order."""

from __future__ import annotations

import json

from finetune_engine.data.tokenize import EncodeSettings
from finetune_engine.recipes.sft import encode_all
from finetune_engine.tiny import write_chat_dataset


def test_workers_match_one_process(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_chat_dataset(tmp_path / "d.jsonl", examples=2500, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[7]["messages"][-1]["content"] = "word " * 400  # one too long: filtered the same way in both
    settings = EncodeSettings(max_seq_length=128, completions_only=True, end_marker=tok.eos_token)
    one, counts_one = encode_all(records, tok, settings, workers=1)
    two, counts_two = encode_all(records, tok, settings, workers=2)
    assert counts_one == counts_two and counts_one["too_long"] == 1
    assert len(one) == 2499 and one == two
