"""SFT modes beyond the default run: pad strategies, record formats, continued adapters, 8-bit,
explicit resume paths, added tokens, length counts, the result file and refused model weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.config import parse_config
from finetune_engine.data.collate import PaddingCollator
from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch
from finetune_engine.modeling import load_tokenizer
from tests.engine.conftest import make_config

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And the capital of Peru?"},
        {"role": "assistant", "content": "The capital of Peru is Lima."},
    ]
}
SHORT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
NO_VALIDATION = {"type": "NONE"}


def _cfg(model: Path, template: str = "keep-original", pad: str = "bos-repurpose", **data_conf):
    return parse_config({
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "x.jsonl"}]},
                      "chat_template_name": template, "missing_pad_token_strategy": pad, **data_conf},
        "batchsize_conf": {"total_train_batch_size": 2},
        "run_conf": {"model": str(model)},
    })


def _run(config: Path, *extra: str) -> dict:
    result = config.parent / "result.json"
    assert finetuning(["sft", str(config), "--result-file", str(result), "--num-preprocess-workers", "1", *extra]) == 0
    return json.loads(result.read_text())


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- missing_pad_token_strategy ------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,pad,input_pad",
    [
        ("bos-repurpose", "<s>", "<s>"),
        ("eos-repurpose", "</s>", "</s>"),
        ("unk-repurpose", "<unk>", "<unk>"),
        ("unk-convert-to-eos", "<unk>", "</s>"),  # the pad token stays UNK; padded inputs hold EOS
    ],
)
@pytest.mark.parametrize("completions_only", [True, False])
def test_pad_strategy_sets_pad_and_never_masks_eos(tiny_model_dir, strategy, pad, input_pad, completions_only):
    tok = load_tokenizer(_cfg(tiny_model_dir, pad=strategy), str(tiny_model_dir))
    t = tok.tokenizer
    assert t.pad_token == pad and t.pad_token_id == t.convert_tokens_to_ids(pad)
    assert tok.collate_pad_id == t.convert_tokens_to_ids(input_pad)
    assert tok.end_marker == t.eos_token == "</s>"  # keep-original: EOS ends each assistant turn
    settings = EncodeSettings(512, completions_only=completions_only, end_marker=tok.end_marker)
    items = encode_batch([CONVERSATION, SHORT], t, settings)
    batch = PaddingCollator(tok.collate_pad_id)(items)
    eos = t.eos_token_id
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert item["input_ids"].count(eos) == (2 if row == 0 else 1)
        # every EOS of the example is a label after collation, whatever the pad token is
        assert int((batch["labels"][row, :n] == eos).sum()) == item["input_ids"].count(eos)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tok.collate_pad_id).all()
        assert not batch["attention_mask"][row, n:].any()
    assert batch["input_ids"].shape[1] > len(items[1]["input_ids"])  # the short row really was padded


def test_pad_strategy_without_the_source_token_names_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.unk_token = None
    t.save_pretrained(tmp_path / "tok")
    for strategy in ("unk-repurpose", "unk-convert-to-eos"):
        with pytest.raises(ValueError, match=f"missing_pad_token_strategy {strategy}: the tokenizer has no unk token"):
            load_tokenizer(_cfg(tiny_model_dir, pad=strategy), str(tmp_path / "tok"))


def test_unk_convert_to_eos_pads_training_batches_with_eos(tiny_model, chat_data, tmp_path, monkeypatch):
    seen: list[dict] = []
    real_call = PaddingCollator.__call__

    def recording_call(self, features):
        batch = real_call(self, features)
        seen.append(batch)
        return batch

    monkeypatch.setattr(PaddingCollator, "__call__", recording_call)
    config = make_config(tmp_path, tiny_model, chat_data,
                         data_conf={"training_data": {"type": "CONCATENATION", "datasets": [{"path": str(chat_data)}]},
                                    "validation_data": NO_VALIDATION, "chat_template_name": "keep-original",
                                    "missing_pad_token_strategy": "unk-convert-to-eos"},
                         training_args={"output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 0.003})
    result = _run(config)
    assert result["global_step"] == 2 and result["final_train_loss"] == result["final_train_loss"]
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model)
    padded = [b for b in seen if not b["attention_mask"].all()]
    assert padded, "no batch needed padding; the test data must vary in length"
    for b in padded:
        pads = b["attention_mask"] == 0
        assert (b["input_ids"][pads] == base.eos_token_id).all()
        assert (b["labels"][pads] == IGNORE_INDEX).all()
        real_eos = (b["input_ids"] == base.eos_token_id) & ~pads
        assert (b["labels"][real_eos] == base.eos_token_id).all() and real_eos.any()
