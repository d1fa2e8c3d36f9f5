"""SFT modes beyond the default run: pad strategies, record formats, continued adapters, 8-bit,
explicit resume paths, added tokens, length counts, the result file and refused model weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


# --- record formats: prompt/completion and text ------------------------------------------------


def _qa_records(n: int) -> list[dict]:
    from finetune_engine.tiny import COUNTRIES

    names = list(COUNTRIES)
    return [{"prompt": f"What is the capital of {names[i % len(names)]}?",
             "completion": f"The capital of {names[i % len(names)]} is {COUNTRIES[names[i % len(names)]]}."} for i in range(n)]


def _text_records(n: int) -> list[dict]:
    return [{"text": f"{i % 20} plus {(3 * i) % 20} is {i % 20 + (3 * i) % 20}."} for i in range(n)]


@pytest.mark.parametrize("template,end", [("chat-ml", "<|im_end|>"), ("keep-original", "</s>")])
def test_prompt_completion_mask_trains_only_the_completion(tiny_model_dir, template, end):
    tok = load_tokenizer(_cfg(tiny_model_dir, template), str(tiny_model_dir))
    t = tok.tokenizer
    record = {"prompt": "What is the capital of Peru?", "completion": "The capital of Peru is Lima."}
    [item] = encode_batch([record], t, EncodeSettings(512, completions_only=True, end_marker=tok.end_marker))
    ids, labels = item["input_ids"], item["labels"]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert t.decode(trained) == "The capital of Peru is Lima." + end
    # the trained tokens are one contiguous run: the completion and its end marker, nothing else
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert labels[first:first + len(trained)] == ids[first:first + len(trained)] == trained
    assert "What is the capital of Peru?" in t.decode(ids[:first])
    # without completions-only, every token but the first is trained
    [full] = encode_batch([record], t, EncodeSettings(512, end_marker=tok.end_marker))
    assert full["input_ids"] == ids and full["labels"] == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("completions_only", [True, False])
def test_text_records_train_every_token(tiny_model_dir, completions_only):
    tok = load_tokenizer(_cfg(tiny_model_dir, "chat-ml"), str(tiny_model_dir))
    t = tok.tokenizer
    [item] = encode_batch([{"text": "The capital of Peru is Lima."}], t,
                          EncodeSettings(512, completions_only=completions_only, end_marker=tok.end_marker))
    ids = item["input_ids"]
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id  # plain text: BOS + text + EOS, no template
    assert t.decode(ids[1:-1]) == "The capital of Peru is Lima."
    assert item["labels"] == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("kind", ["prompt_completion", "text"])
def test_training_on_prompt_completion_and_text_files(tiny_model, tmp_path, kind):
    records = _qa_records(48) if kind == "prompt_completion" else _text_records(48)
    data = _write_jsonl(tmp_path / f"{kind}.jsonl", records)
    config = make_config(tmp_path, tiny_model, data,
                         data_conf={"validation_data": {"type": "AUTO_SPLIT", "ratio": 0.25, "seed": 2}},
                         sft_args={"max_seq_length": 64, "train_on_completions_only": kind == "prompt_completion"},
                         training_args={"output_dir": str(tmp_path / "out"), "max_steps": 3, "learning_rate": 0.003})
    before = load_file(str(tiny_model / "model.safetensors"))
    result = _run(config)
    assert result["global_step"] == 3 and result["num_train_examples"] == 36 and result["num_eval_examples"] == 12
    assert all(0 < result[k] < 20 for k in ("final_train_loss", "final_eval_loss"))
    after = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(before[key], after[key])
