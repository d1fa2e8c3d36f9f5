"""Continued pretraining on .txt files: windows, EOT placement, boundary-aware cuts, workers,
the content-hash cache, config checks, and a real training run on the tiny model."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.config import ConfigError, parse_config
from finetune_engine.data import text_corpus
from finetune_engine.data.text_corpus import LEVELS, WindowSettings, build_stream, load_windows, make_windows
from finetune_engine.tiny import _sentences
from tests.engine.conftest import make_config


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def write_corpus(folder: Path, docs: int = 5, seed: int = 0) -> list[str]:
    """Documents of several paragraphs (blank-line separated) of a few lines each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for d in range(docs):
        paragraphs = [
            "\n".join(rng.sample(_sentences(30, rng), rng.randrange(2, 5)))
            for _ in range(rng.randrange(2, 6))
        ]
        text = "\n\n".join(paragraphs) + "\n"
        (folder / f"doc-{d:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def _settings(tok, context: int = 48, boundary: str = "paragraph", waste: float = 0.25) -> WindowSettings:
    return WindowSettings(
        context, boundary, waste, eot_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )


def test_eot_after_every_document_and_documents_intact(tiny_model_dir, tmp_path):
    tok = _tokenizer(tiny_model_dir)
    texts = write_corpus(tmp_path / "c", docs=4)
    texts[2] = texts[2].replace("The capital", "A literal </s> is text, and the capital", 1)
    ids, levels, docs = build_stream(texts, tok, _settings(tok))
    assert docs == 4
    eot, bos = tok.eos_token_id, tok.bos_token_id
    assert int((ids == eot).sum()) == 4, "one EOT per document (a '</s>' inside a file is text, not EOT)"
    eot_at = np.flatnonzero(ids == eot)
    assert eot_at[-1] == len(ids) - 1
    assert (levels[eot_at] == LEVELS["document"]).all() and int((levels == LEVELS["document"]).sum()) == 4
    starts = np.concatenate([[0], eot_at[:-1] + 1])
    for text, a, b in zip(texts, starts, eot_at, strict=True):
        assert ids[a] == bos
        assert tok.decode(ids[a + 1 : b].tolist()) == text  # the document, whole, between BOS and its EOT
    # Paragraph boundaries: after tokens whose text ends a blank line.
    assert int((levels == LEVELS["paragraph"]).sum()) == sum(t.count("\n\n") for t in texts)


def test_window_count_shape_and_boundary_cuts(tiny_model_dir, tmp_path):
    tok = _tokenizer(tiny_model_dir)
    texts = write_corpus(tmp_path / "c", docs=6)
    settings = _settings(tok, context=48, boundary="paragraph", waste=0.25)
    ids, levels, _ = build_stream(texts, tok, settings)
    starts, ends = make_windows(levels, settings)
    lengths = ends - starts
    assert starts[0] == 0 and ends[-1] == len(ids) and (starts[1:] == ends[:-1]).all(), (
        "windows tile the stream"
    )
    assert (lengths <= 48).all()
    short = np.flatnonzero(lengths[:-1] < 48)
    assert len(short) > 0, "this corpus has boundaries within the slack; some windows must end at one"
    for i in short:
        assert lengths[i] >= 48 - 12, "a window gives up at most max_boundary_waste to end at a boundary"
        assert levels[ends[i] - 1] >= LEVELS["paragraph"], (
            "a short window ends right after a paragraph/document end"
        )
    # Without boundaries: fixed cuts, every window full but the last.
    starts_n, ends_n = make_windows(levels, _settings(tok, context=48, boundary="none"))
    assert len(starts_n) == -(-len(ids) // 48) and ((ends_n - starts_n)[:-1] == 48).all()


def test_document_end_preferred_over_later_paragraph_within_slack():
    levels = np.zeros(30, dtype=np.int8)
    levels[6] = LEVELS["document"]  # cut after token 6 -> window [0, 7)
    levels[8] = LEVELS["paragraph"]  # later, but a lesser boundary
    s = WindowSettings(10, "paragraph", 0.5, eot_token_id=0)
    starts, ends = make_windows(levels, s)
    assert (starts[0], ends[0]) == (0, 7)
    # A document end outside the slack (before 10 - 5) loses to a paragraph end inside it.
    levels = np.zeros(30, dtype=np.int8)
    levels[3], levels[8] = LEVELS["document"], LEVELS["paragraph"]
    assert make_windows(levels, s)[1][0] == 9
    # boundary: document ignores paragraph ends; no boundary in the slack -> hard cut.
    assert make_windows(levels, WindowSettings(10, "document", 0.5, eot_token_id=0))[1][0] == 10
    # Nothing to predict in a 1-token tail: dropped.
    starts, ends = make_windows(np.zeros(21, dtype=np.int8), WindowSettings(10, "none", 0.0, eot_token_id=0))
    assert list(zip(starts, ends, strict=True)) == [(0, 10), (10, 20)]


def test_workers_give_the_single_process_result(tiny_model_dir, tmp_path, monkeypatch):
    tok = _tokenizer(tiny_model_dir)
    texts = write_corpus(tmp_path / "c", docs=12, seed=3)
    texts.append("\n\n".join(texts) * 2)  # one large document, split into pieces for the workers
    monkeypatch.setattr(text_corpus, "PIECE_CHARS", 1000)
    monkeypatch.setattr(text_corpus, "TASK_CHARS", 1500)
    calls = []
    real = text_corpus._tokenize_task
    monkeypatch.setattr(
        text_corpus, "_tokenize_task", lambda task, t: calls.append(len(task)) or real(task, t)
    )
    settings = _settings(tok)
    one = build_stream(texts, tok, settings, workers=1)
    assert len(calls) > 3, "the corpus must span several worker tasks for this test to mean anything"
    two = build_stream(texts, tok, settings, workers=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]) and one[2] == two[2]
    # Pieces are cut at paragraph breaks: the big document decodes back to itself.
    big = one[0][np.flatnonzero(one[0] == tok.eos_token_id)[-2] + 2 : -1]
    assert tok.decode(big.tolist()) == texts[-1]


def test_cache_hit_skips_tokenization_and_content_changes_miss(tiny_model_dir, tmp_path, monkeypatch):
    tok = _tokenizer(tiny_model_dir)
    write_corpus(tmp_path / "c", docs=4)
    cache = tmp_path / "cache"
    settings = _settings(tok)
    first, stats1 = load_windows([str(tmp_path / "c")], tok, settings, cache_dir=cache)
    assert stats1["cache"] == "miss" and Path(stats1["cache_file"]).is_file()

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized although the cache matches")

    with monkeypatch.context() as m:
        m.setattr(text_corpus, "build_stream", no_tokenizing)
        second, stats2 = load_windows([str(tmp_path / "c")], tok, settings, cache_dir=cache)
    assert stats2["cache"] == "hit" and stats2["cache_file"] == stats1["cache_file"]
    assert len(first) == len(second) and all(first[i] == second[i] for i in range(len(first)))
    # Same names, one changed byte: a new key. Other settings: another key.
    f = tmp_path / "c" / "doc-01.txt"
    f.write_text(f.read_text() + "x")
    _, stats3 = load_windows([str(tmp_path / "c")], tok, settings, cache_dir=cache)
    _, stats4 = load_windows([str(tmp_path / "c")], tok, _settings(tok, context=40), cache_dir=cache)
    assert stats3["cache"] == stats4["cache"] == "miss"
    assert len({stats1["cache_file"], stats3["cache_file"], stats4["cache_file"]}) == 3


def test_windows_as_rows_train_every_token_but_bos(tiny_model_dir, tmp_path):
    tok = _tokenizer(tiny_model_dir)
    write_corpus(tmp_path / "c", docs=3)
    windows, _ = load_windows(
        [str(tmp_path / "c")], tok, _settings(tok, context=32), cache_dir=tmp_path / "cache"
    )
    for i in range(len(windows)):
        row = windows[i]
        assert len(row["input_ids"]) == len(row["labels"]) <= 32
        for j, (t, lab) in enumerate(zip(row["input_ids"], row["labels"], strict=True)):
            assert lab == (-100 if j == 0 or t == tok.bos_token_id else t)


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"sft_args": {"max_seq_length": 64, "train_on_completions_only": True}},
            "plain text (TEXT_FILES) has no completions",
        ),
        ({"sft_args": {"max_seq_length": 32}}, "context_length 48 exceeds sft_args.max_seq_length 32"),
    ],
)
def test_text_files_config_checks(change, expected):
    data = {
        "data_conf": {
            "training_data": {"type": "TEXT_FILES", "datasets": [{"path": "corpus"}], "context_length": 48}
        },
        "batchsize_conf": {"total_train_batch_size": 2},
        "run_conf": {"model": "m", "preset": "none"},
        **change,
    }
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(data)


def test_txt_in_a_jsonl_dataset_type_is_refused_and_dpo_cannot_use_text():
    base = {"batchsize_conf": {"total_train_batch_size": 2}, "run_conf": {"model": "m", "preset": "none"}}
    with pytest.raises(ConfigError, match="plain text trains with data_conf.training_data.type: TEXT_FILES"):
        parse_config(
            {
                **base,
                "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "a.txt"}]}},
            }
        )
    with pytest.raises(ConfigError, match="TEXT_FILES trains with sft, not dpo"):
        parse_config(
            {**base, "data_conf": {"training_data": {"type": "TEXT_FILES", "datasets": [{"path": "c"}]}}},
            method="dpo",
        )


def _text_config(tmp_path: Path, model: Path, corpus: Path, **sections) -> Path:
    data_conf = {
        "training_data": {
            "type": "TEXT_FILES",
            "datasets": [{"path": str(corpus)}],
            "context_length": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.2, "seed": 1},
    }
    return make_config(tmp_path, model, corpus, data_conf=data_conf, **sections)


def test_bad_text_file_reported_with_file_and_line(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "c"
    write_corpus(corpus, docs=2)
    (corpus / "latin1.txt").write_bytes(b"first line\nsecond caf\xe9\n")
    config = _text_config(tmp_path, tiny_model_dir, corpus)
    assert finetuning(["sft", str(config), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert f"{corpus / 'latin1.txt'}:2: not UTF-8 (bad byte 0xe9)" in err
    (corpus / "latin1.txt").unlink()
    assert finetuning(["sft", str(config), "--validate-only"]) == 0


def test_continued_pretraining_trains_and_second_run_hits_the_cache(tiny_model, tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, docs=10, seed=5)
    before = load_file(str(tiny_model / "model.safetensors"))
    config = _text_config(tmp_path, tiny_model, corpus, sft_args={"max_seq_length": 128})
    result_file = tmp_path / "result.json"
    assert (
        finetuning(["sft", str(config), "--result-file", str(result_file), "--num-preprocess-workers", "2"])
        == 0
    )
    result = json.loads(result_file.read_text())
    assert result["status"] == "completed" and result["global_step"] == 6
    assert result["text_data"]["cache"] == "miss" and result["text_data"]["documents"] == 10
    windows = result["text_data"]["windows"]
    assert (
        result["num_train_examples"] + result["num_eval_examples"] == windows
        and result["num_eval_examples"] >= 1
    )
    losses = [result["final_train_loss"], result["final_eval_loss"]]
    assert all(x is not None and np.isfinite(x) for x in losses)
    after = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "lm_head.weight" in moved
    # A second experiment over the same files and tokenizer skips tokenization.
    again = _text_config(
        tmp_path,
        tiny_model,
        corpus,
        sft_args={"max_seq_length": 128},
        training_args={"output_dir": str(tmp_path / "out2"), "max_steps": 1, "learning_rate": 0.003},
    )
    assert finetuning(["sft", str(again), "--result-file", str(result_file)]) == 0
    second = json.loads(result_file.read_text())
    assert second["text_data"]["cache"] == "hit" and second["text_data"]["windows"] == windows
