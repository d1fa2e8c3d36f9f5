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
            f.write(
                json.dumps(
                    {
                        "prompt": f"{name} question {i}?",
                        "completion": f"{name} answer {i}.",
                        "id": f"{name}-{i}",
                    }
                )
                + "\n"
            )
    return path


def _data_conf(training: dict, validation: dict | None = None):
    data_conf = {"training_data": training}
    if validation is not None:
        data_conf["validation_data"] = validation
    cfg = parse_config(
        {"data_conf": data_conf, "batchsize_conf": {"total_train_batch_size": 2}, "run_conf": {"model": "m"}}
    )
    return cfg.data_conf


def _mix(tmp_path: Path, seed: int, weights=(2.0, 0.5, 1.25)) -> list[dict]:
    a, b, c = (
        _write(tmp_path / "a.jsonl", "a", 40),
        _write(tmp_path / "b.jsonl", "b", 30),
        _write(tmp_path / "c.jsonl", "c", 20),
    )
    conf = _data_conf(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "seed": seed,
            "datasets": [
                {"path": str(path), "sampling_weight": w} for path, w in zip((a, b, c), weights, strict=True)
            ],
        },
        {"type": "NONE"},
    )
    train, evaluation = load_data(conf)
    assert evaluation == []
    return train


def test_weighted_mix_oversamples_until_every_dataset_is_exhausted(tmp_path):
    train = _mix(tmp_path, seed=7)
    ids = Counter(r["id"] for r in train)
    # every example of every dataset is drawn at least once ...
    assert set(ids) == {f"{s}-{i}" for s, n in (("a", 40), ("b", 30), ("c", 20)) for i in range(n)}
    # ... and the mix ends right after the draw that completed the last dataset not yet seen whole
    by_source = Counter(r["id"].split("-")[0] for r in train)
    last = train[-1]["id"].split("-")[0]
    assert by_source[last] == {"a": 40, "b": 30, "c": 20}[last]
    assert [r["id"].split("-")[0] for r in train[:-1]].count(last) == by_source[last] - 1
    # a dataset that ran out started over from its first example (wrap-around, in order)
    a_order = [int(r["id"].split("-")[1]) for r in train if r["id"].startswith("a-")]
    assert a_order == [i % 40 for i in range(len(a_order))] and len(a_order) > 40
    # draws follow the relative weights: a (2.0 of 3.75) is drawn about 2/3.75 of the time
    assert abs(by_source["a"] / len(train) - 2.0 / 3.75) < 0.1


def test_weighted_mix_is_seeded(tmp_path):
    first, again, other = _mix(tmp_path, 7), _mix(tmp_path, 7), _mix(tmp_path, 8)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert [r["id"] for r in first] != [r["id"] for r in other]


def test_weighted_mix_equal_default_weights_is_an_exact_round_robin(tmp_path):
    train = _mix(tmp_path, seed=7, weights=(None, 1.0, None))
    # rounds of a, b, c until the longest (a, 40) is exhausted; shorter ones start over
    assert [r["id"] for r in train] == [
        f"{s}-{i % n}" for i in range(40) for s, n in (("a", 40), ("b", 30), ("c", 20))
    ]
    assert _mix(tmp_path, seed=8, weights=(None, None, None)) == train  # no randomness involved


def test_weighted_mix_weight_zero_leaves_the_dataset_out_unread(tmp_path):
    train = _mix(tmp_path, seed=7, weights=(1.0, 0, 1.0))
    assert [r["id"] for r in train] == [f"{s}-{i % n}" for i in range(40) for s, n in (("a", 40), ("c", 20))]
    (tmp_path / "gone.jsonl").unlink(missing_ok=True)
    conf = _data_conf(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "datasets": [
                {"path": str(tmp_path / "a.jsonl")},
                {"path": str(tmp_path / "gone.jsonl"), "sampling_weight": 0.0},
            ],
        },
        {"type": "NONE"},
    )
    assert len(load_data(conf)[0]) == 40


def test_weighted_mix_function_edge_cases():
    records = [{"i": i} for i in range(3)]
    assert weighted_mix([records], [None], seed=0) == records
    assert weighted_mix([records, [{"j": 0}]], [5.0, 0.0], seed=0) == records  # a single kept source: itself
    with pytest.raises(ValueError, match="every dataset has sampling_weight 0"):
        weighted_mix([records], [0.0], seed=0)
    with pytest.raises(ValueError, match="may not be negative"):
        weighted_mix([records], [-1.0], seed=0)


def test_weighted_mix_and_split_match_the_datasets_library():
    """The Silogen engine mixes with interleave_datasets(all_exhausted) and splits with
    train_test_split: the same examples in the same order for the same seeds."""
    datasets = pytest.importorskip("datasets", reason="the datasets library is the reference")
    datasets.disable_progress_bars()
    sources = [[{"id": f"{name}-{i}"} for i in range(n)] for name, n in (("a", 7), ("b", 3), ("c", 12))]
    for weights, seed in (([10.0, 1.0, 2.0], 19851243), ([0.2, 3.0, 1.5], 4)):
        probabilities = [w / sum(weights) for w in weights]
        reference = datasets.interleave_datasets(
            [datasets.Dataset.from_list(s) for s in sources],
            probabilities=probabilities,
            seed=seed,
            stopping_strategy="all_exhausted",
        )
        assert [r["id"] for r in weighted_mix(sources, weights, seed)] == reference["id"]
    records = [{"id": i} for i in range(23)]
    for ratio, seed in ((0.2, 1289525893), (0.3, 5)):
        reference = datasets.Dataset.from_list(records).train_test_split(test_size=ratio, seed=seed)
        train, evaluation = split(records, ratio, seed)
        assert [r["id"] for r in train] == reference["train"]["id"]
        assert [r["id"] for r in evaluation] == reference["test"]["id"]


def test_auto_split_ratio_no_overlap_and_seeded(tmp_path):
    data = _write(tmp_path / "d.jsonl", "d", 200)
    conf = _data_conf(
        {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
        {"type": "AUTO_SPLIT", "ratio": 0.15, "seed": 3},
    )
    train, evaluation = load_data(conf)
    assert len(evaluation) == 30 and len(train) == 170
    train_ids, eval_ids = {r["id"] for r in train}, {r["id"] for r in evaluation}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {f"d-{i}" for i in range(200)}
    again_train, again_eval = load_data(conf)
    assert [r["id"] for r in again_eval] == [r["id"] for r in evaluation] and [
        r["id"] for r in again_train
    ] == [r["id"] for r in train]
    other = _data_conf(
        {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
        {"type": "AUTO_SPLIT", "ratio": 0.15, "seed": 4},
    )
    assert {r["id"] for r in load_data(other)[1]} != eval_ids


def test_auto_split_holds_out_the_ceiling_and_refuses_to_leave_nothing_to_train():
    records = [{"i": i} for i in range(3)]
    train, evaluation = split(records, 0.01, seed=0)
    assert len(evaluation) == 1 and len(train) == 2  # ceil(0.03)
    with pytest.raises(
        ValueError,
        match=r"data_conf.validation_data: AUTO_SPLIT with ratio 0.99 holds out "
        r"ceil\(0.99 x 3\) = 3 .*lower data_conf.validation_data.ratio",
    ):
        split(records, 0.99, seed=0)  # as the Silogen engine (datasets' train_test_split) refuses
    with pytest.raises(ValueError, match="leaving nothing to train on"):
        split([{"i": 0}], 0.2, seed=0)
    assert split([], 0.2, seed=0) == ([], [])  # nothing to split, as there


def test_auto_split_defaults_are_the_silogen_engines():
    conf = _data_conf({"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]}, {"type": "AUTO_SPLIT"})
    assert (conf.validation_data.ratio, conf.validation_data.seed) == (0.2, 1289525893)
    conf = _data_conf({"type": "PRECOMPUTE_WEIGHTED_MIX", "datasets": [{"path": "d.jsonl"}]})
    assert conf.training_data.seed == 19851243 and conf.validation_data.seed == 1289525893


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
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8]},
        {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10]},
    ]
    batch = PaddingCollator(pad_token_id=0, padding_side=side)(features)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8]
    short = {
        "right": ([9, 10, 0, 0], [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX], [1, 1, 0, 0]),
        "left": ([0, 0, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 10], [0, 0, 1, 1]),
    }[side]
    assert batch["input_ids"][1].tolist() == short[0]
    assert batch["labels"][1].tolist() == short[1]
    assert batch["attention_mask"][1].tolist() == short[2]
    assert int(batch["num_real_tokens"]) == 6


def test_pad_to_multiple_of():
    batch = PaddingCollator(pad_token_id=1, pad_to_multiple_of=8)([{"input_ids": [5] * 9, "labels": [5] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert torch.equal(batch["attention_mask"][0], torch.tensor([1] * 9 + [0] * 7))
