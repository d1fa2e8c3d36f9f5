"""The Silogen engine's data, as its chart scripts, data model and tests write it, is read unchanged.

The files under tests/compat/data/peer-* are written in those formats: the argilla tutorial data
(an empty system prompt in every row), the long-random data (extra top-level keys), the data
model's tags/labels and null ids, the JSON-array files of its end-to-end tests, the DPO data of
its ultrafeedback script, and the two datasets of its data-setup tests.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finetune_engine.config import parse_config
from finetune_engine.data.load import load_data
from finetune_engine.data.validate import iter_records, validate_files

DATA = Path(__file__).resolve().parents[1] / "compat" / "data"

# file -> (method, rows)
FILES = {
    "peer-argilla-sft.jsonl": ("sft", 4),
    "peer-long-random-sft.jsonl": ("sft", 3),
    "peer-datamodel-sft.json": ("sft", 3),
    "peer-e2e-sft.json": ("sft", 1),
    "peer-mix-1.jsonl": ("sft", 2),
    "peer-mix-2.jsonl": ("sft", 2),
    "peer-e2e-dpo.json": ("dpo", 1),
    "peer-ultrafeedback-dpo.jsonl": ("dpo", 3),
}


def _data_conf(training: dict, validation: dict | None = None, method: str | None = None):
    data_conf = {"training_data": training, "validation_data": validation or {"type": "NONE"}}
    cfg = parse_config(
        {"data_conf": data_conf, "batchsize_conf": {"total_train_batch_size": 2}, "run_conf": {"model": "m"}},
        method=method or "sft",
    )
    return cfg.data_conf


def _ids(records: list[dict]) -> list[str]:
    return [r["id"] for r in records]


def test_every_peer_file_is_in_the_table():
    assert sorted(p.name for p in DATA.glob("peer-*")) == sorted(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_peer_files_validate_and_read_whole(name):
    method, rows = FILES[name]
    path = DATA / name
    (report,) = validate_files([path], method=method)
    assert report.problems == [] and report.examples == rows
    assert len(list(iter_records(path))) == rows
    conf = _data_conf({"type": "CONCATENATION", "datasets": [{"path": str(path)}]}, method=method)
    train, evaluation = load_data(conf)
    assert len(train) == rows and evaluation == []


def test_argilla_rows_keep_their_empty_system_prompt():
    records = [r for _, r in iter_records(DATA / "peer-argilla-sft.jsonl")]
    assert all(r["messages"][0] == {"content": "", "role": "system"} for r in records)
    assert records[1]["messages"][1]["content"] == "Write a haiku about autumn/fall leaves."  # "\/" unescaped


def test_json_array_rows_carry_the_line_they_start_on():
    assert [n for n, _ in iter_records(DATA / "peer-datamodel-sft.json")] == [2, 30, 50]
    assert [n for n, _ in iter_records(DATA / "peer-e2e-sft.json")] == [1]


def test_a_broken_row_in_a_peer_style_file_is_still_refused_with_its_line(tmp_path):
    rows = json.loads((DATA / "peer-datamodel-sft.json").read_text())
    rows[1]["messages"][0]["role"] = "human"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(ValueError) as err:
        validate_files([path], method="sft")
    assert f"{path}:30: messages[0] role 'human' is not one of system, user, assistant" in str(err.value)


def _peer_mix(weights: list[float | None] | None, seed: int | None = None) -> list[dict]:
    datasets = []
    for name, weight in zip(("peer-mix-1.jsonl", "peer-mix-2.jsonl"), weights or [None, None], strict=True):
        datasets.append({"path": str(DATA / name)} | ({} if weight is None else {"sampling_weight": weight}))
    training = {"type": "PRECOMPUTE_WEIGHTED_MIX", "datasets": datasets} | (
        {} if seed is None else {"seed": seed}
    )
    return load_data(_data_conf(training))[0]


def test_weighted_mix_without_weights_alternates_exactly():
    assert _ids(_peer_mix(None)) == ["test-1-1", "test-2-1", "test-1-2", "test-2-2"]


def test_weighted_mix_with_weights_one_alternates_exactly():
    assert _ids(_peer_mix([1.0, 1.0])) == ["test-1-1", "test-2-1", "test-1-2", "test-2-2"]


def test_weighted_mix_zero_weight_skips_the_dataset():
    assert _ids(_peer_mix([1.0, 0.0])) == ["test-1-1", "test-1-2"]


def test_weighted_mix_relative_weights_oversample_until_all_are_seen():
    mix = _ids(_peer_mix([10.0, 1.0]))
    assert set(mix) == {"test-1-1", "test-1-2", "test-2-1", "test-2-2"}
    # dataset 1 is drawn ten times as often, so it starts over many times before dataset 2 is seen whole
    assert sum(i.startswith("test-1") for i in mix) > 2 * sum(i.startswith("test-2") for i in mix)
    assert mix[-1].startswith("test-2")  # the last draw completes the last dataset
    assert _ids(_peer_mix([10.0, 1.0])) == mix and _ids(_peer_mix([10.0, 1.0], seed=1)) != mix


def test_concatenation_keeps_file_order():
    conf = _data_conf(
        {
            "type": "CONCATENATION",
            "datasets": [{"path": str(DATA / "peer-mix-1.jsonl")}, {"path": str(DATA / "peer-mix-2.jsonl")}],
        }
    )
    assert _ids(load_data(conf)[0]) == ["test-1-1", "test-1-2", "test-2-1", "test-2-2"]


def test_auto_split_half_of_two():
    conf = _data_conf(
        {"type": "CONCATENATION", "datasets": [{"path": str(DATA / "peer-mix-1.jsonl")}]},
        {"type": "AUTO_SPLIT", "ratio": 0.5, "seed": 123},
    )
    train, evaluation = load_data(conf)
    assert (
        len(train) == 1
        and len(evaluation) == 1
        and {*_ids(train), *_ids(evaluation)} == {"test-1-1", "test-1-2"}
    )


def test_data_type_is_accepted_and_follows_the_method(caplog):
    training = {"type": "CONCATENATION", "data_type": "ChatConversation", "datasets": [{"path": "a.jsonl"}]}
    with caplog.at_level(logging.WARNING, logger="finetune_engine.config.schema"):
        conf = _data_conf(training, {"type": "AUTO_SPLIT", "data_type": "ChatConversation"}, method="sft")
    assert conf.training_data.data_type == "ChatConversation" and not caplog.records
    with caplog.at_level(logging.WARNING, logger="finetune_engine.config.schema"):
        _data_conf(training, {"type": "NONE"}, method="dpo")
    assert [r.getMessage() for r in caplog.records] == [
        "data_conf (type CONCATENATION): data_type 'ChatConversation' does not match method dpo; "
        "the record type follows the method (DirectPreference)"
    ]


def test_peer_rows_encode_for_sft(tiny_model_dir):
    """Empty system prompts, a late system prompt and an empty reply tokenize; with completions
    only, a row still trains its assistant turns."""
    from finetune_engine.data.tokenize import EncodeSettings, encode_batch
    from finetune_engine.modeling import load_tokenizer

    cfg = parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "a.jsonl"}]},
                "chat_template_name": "chat-ml",
            },
            "batchsize_conf": {"total_train_batch_size": 2},
            "run_conf": {"model": str(tiny_model_dir)},
        }
    )
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    records = [
        r
        for name in ("peer-argilla-sft.jsonl", "peer-datamodel-sft.json", "peer-long-random-sft.jsonl")
        for _, r in iter_records(DATA / name)
    ]
    for completions_only in (False, True):
        encoded = encode_batch(
            records, tok.tokenizer, EncodeSettings(512, "filter", completions_only, tok.end_marker)
        )
        assert all(isinstance(e, dict) for e in encoded), encoded
        assert all(any(label != -100 for label in e["labels"]) for e in encoded)
