"""Reading and combining datasets (data/load.py) and the padding collator's sides (data/collate.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from finetune_engine.config import parse_config
from finetune_engine.data.collate import PaddingCollator
from finetune_engine.data.load import load_data, split, weighted_mix
from finetune_engine.data.tokenize import IGNORE_INDEX


def _write(path: Path, name: str, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{name} question {i}?", "completion": f"{name} answer {i}.", "id": f"{name}-{i}"}) + "\n")
    return path


def _data_conf(training: dict, validation: dict | None = None):
    data_conf = {"training_data": training}
    if validation is not None:
        data_conf["validation_data"] = validation
    cfg = parse_config({"data_conf": data_conf, "batchsize_conf": {"total_train_batch_size": 2}, "run_conf": {"model": "m"}})
    return cfg.data_conf


def _mix(tmp_path: Path, seed: int) -> list[dict]:
    a, b, c = _write(tmp_path / "a.jsonl", "a", 40), _write(tmp_path / "b.jsonl", "b", 30), _write(tmp_path / "c.jsonl", "c", 20)
    conf = _data_conf(
        {"type": "PRECOMPUTE_WEIGHTED_MIX", "seed": seed, "datasets": [
            {"path": str(a), "sampling_weight": 2.0},
            {"path": str(b), "sampling_weight": 0.5},
            {"path": str(c), "sampling_weight": 1.25},
        ]},
        {"type": "NONE"},
    )
    train, evaluation = load_data(conf)
    assert evaluation == []
    return train


def test_weighted_mix_counts_follow_sampling_weight(tmp_path):
    train = _mix(tmp_path, seed=7)
    by_source = Counter(r["id"].split("-")[0] for r in train)
    # weight 2.0 of 40 -> every example twice; 0.5 of 30 -> 15 distinct; 1.25 of 20 -> 20 + 5
    assert by_source == {"a": 80, "b": 15, "c": 25}
    ids = Counter(r["id"] for r in train)
    assert all(ids[f"a-{i}"] == 2 for i in range(40))
    assert all(ids[r] == 1 for r in ids if r.startswith("b-"))  # a fraction samples without repeats
    assert sorted(ids[f"c-{i}"] for i in range(20)).count(2) == 5
    # the mix is shuffled, not dataset after dataset
    assert [r["id"][0] for r in train[:80]] != ["a"] * 80


def test_weighted_mix_is_seeded(tmp_path):
    first, again, other = _mix(tmp_path, 7), _mix(tmp_path, 7), _mix(tmp_path, 8)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert [r["id"] for r in first] != [r["id"] for r in other]
    assert Counter(r["id"][0] for r in first) == Counter(r["id"][0] for r in other)  # same counts, other draw/order


def test_weighted_mix_unit_rounding():
    records = [{"i": i} for i in range(10)]
    assert len(weighted_mix([records], [0.34], seed=0)) == 3  # round(3.4)
    assert len(weighted_mix([records], [3.0], seed=0)) == 30


def test_auto_split_ratio_no_overlap_and_seeded(tmp_path):
    data = _write(tmp_path / "d.jsonl", "d", 200)
    conf = _data_conf({"type": "CONCATENATION", "datasets": [{"path": str(data)}]}, {"type": "AUTO_SPLIT", "ratio": 0.15, "seed": 3})
    train, evaluation = load_data(conf)
    assert len(evaluation) == 30 and len(train) == 170
    train_ids, eval_ids = {r["id"] for r in train}, {r["id"] for r in evaluation}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {f"d-{i}" for i in range(200)}
    again_train, again_eval = load_data(conf)
    assert [r["id"] for r in again_eval] == [r["id"] for r in evaluation] and [r["id"] for r in again_train] == [r["id"] for r in train]
    other = _data_conf({"type": "CONCATENATION", "datasets": [{"path": str(data)}]}, {"type": "AUTO_SPLIT", "ratio": 0.15, "seed": 4})
    assert {r["id"] for r in load_data(other)[1]} != eval_ids


def test_auto_split_keeps_at_least_one_on_each_side():
    records = [{"i": i} for i in range(3)]
    train, evaluation = split(records, 0.01, seed=0)
    assert len(evaluation) == 1 and len(train) == 2
    train, evaluation = split(records, 0.99, seed=0)
    assert len(evaluation) == 2 and len(train) == 1


def test_concatenation_validation_reads_separate_files(tmp_path):
    a, b = _write(tmp_path / "a.jsonl", "a", 12), _write(tmp_path / "b.jsonl", "b", 8)
    va, vb = _write(tmp_path / "va.jsonl", "va", 3), _write(tmp_path / "vb.jsonl", "vb", 2)
    conf = _data_conf(
        {"type": "CONCATENATION", "datasets": [{"path": str(a)}, {"path": str(b)}]},
        {"type": "CONCATENATION", "datasets": [{"path": str(va)}, {"path": str(vb)}]},
    )
    train, evaluation = load_data(conf)
    # training: every example of both files once, in file order; validation: exactly the two files
    assert [r["id"] for r in train] == [f"a-{i}" for i in range(12)] + [f"b-{i}" for i in range(8)]
    assert [r["id"] for r in evaluation] == ["va-0", "va-1", "va-2", "vb-0", "vb-1"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side(side):
    features = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10]}]
    batch = PaddingCollator(pad_token_id=0, padding_side=side)(features)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8]
    short = {"right": ([9, 10, 0, 0], [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX], [1, 1, 0, 0]),
             "left": ([0, 0, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 10], [0, 0, 1, 1])}[side]
    assert batch["input_ids"][1].tolist() == short[0]
    assert batch["labels"][1].tolist() == short[1]
    assert batch["attention_mask"][1].tolist() == short[2]
    assert int(batch["num_real_tokens"]) == 6


def test_pad_to_multiple_of():
    batch = PaddingCollator(pad_token_id=1, pad_to_multiple_of=8)([{"input_ids": [5] * 9, "labels": [5] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert torch.equal(batch["attention_mask"][0], torch.tensor([1] * 9 + [0] * 7))
