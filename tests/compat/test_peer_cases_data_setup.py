"""The Silogen engine's tests/test_data_setup.py, case by case. The peer mocks make_dataset and
calls setup_datainput / handle_auto_split on its data-input configs; here the same two datasets
are real JSONL files and go through finetune_engine.data.load.load_data with the data_conf the
peer's config objects describe."""

from __future__ import annotations

import json

import pytest

from finetune_engine.config import parse_config
from finetune_engine.data.load import load_data


def _conversation(dataset: str, id_: str, system: str, user: str, assistant: str) -> dict:
    return {
        "dataset": dataset,
        "id": id_,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
    }


TESTDATA1 = [
    _conversation("test-1", "test-1-1", "lorem ipsum", "dolor sit amet", "consectetur adipiscing elit"),
    _conversation(
        "test-1", "test-1-2", "sed do eiusmod tempor", "incididunt ut labore", "et dolore magna aliqua"
    ),
]
TESTDATA2 = [
    _conversation("test-2", "test-2-1", "Ut enim ad", "minim veniam", "quis nostrud exercitation"),
    _conversation("test data", "test-2-2", "ullamco laboris nisi", "ut aliquip ex", "ea commodo consequat"),
]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, rows in (("testdata1.jsonl", TESTDATA1), ("testdata2.jsonl", TESTDATA2)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _data(training: dict, validation: dict | None = None):
    cfg = parse_config(
        {
            "data_conf": {"training_data": training, "validation_data": validation or {"type": "NONE"}},
            "batchsize_conf": {"total_train_batch_size": 1},
            "run_conf": {"model": "unused"},
        }
    )
    return load_data(cfg.data_conf)


def _ids(records) -> list[str]:
    return [r["id"] for r in records]


def test_setup_precompute_weightedmix_datainput(files):
    """Restates test_data_setup.py::test_setup_precompute_weightedmix_datainput: a weighted mix
    with no sampling weights is an exact round robin (1-1, 2-1, 1-2, 2-2), then stops."""
    train, _ = _data(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "datasets": [{"path": "testdata1.jsonl"}, {"path": "testdata2.jsonl"}],
        }
    )
    assert _ids(train) == ["test-1-1", "test-2-1", "test-1-2", "test-2-2"]


def test_setup_concatenation_datainput(files):
    """Restates test_data_setup.py::test_setup_concatenation_datainput: concatenation keeps the
    exact order (1-1, 1-2, 2-1, 2-2), then stops."""
    train, _ = _data(
        {"type": "CONCATENATION", "datasets": [{"path": "testdata1.jsonl"}, {"path": "testdata2.jsonl"}]}
    )
    assert _ids(train) == ["test-1-1", "test-1-2", "test-2-1", "test-2-2"]


def test_setup_none_datainput(files):
    """Restates test_data_setup.py::test_setup_none_datainput: validation_data type NONE gives no
    validation data."""
    _, validation = _data(
        {"type": "CONCATENATION", "datasets": [{"path": "testdata1.jsonl"}]}, {"type": "NONE"}
    )
    assert not validation


def test_setup_unknown_dataset(files):
    """Restates test_data_setup.py::test_setup_unknown_dataset: a dataset path that does not exist
    is a FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        _data({"type": "CONCATENATION", "datasets": [{"path": "non-existent-path.jsonl"}]})


def test_setup_weightedmix_exact_round_robin(files):
    """Restates test_data_setup.py::test_setup_weightedmix_exact_round_robin: equal weights 1.0 and
    1.0 give the exact round robin (1-1, 2-1, 1-2, 2-2), then stop."""
    train, _ = _data(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "datasets": [
                {"path": "testdata1.jsonl", "sampling_weight": 1.0},
                {"path": "testdata2.jsonl", "sampling_weight": 1.0},
            ],
        }
    )
    assert _ids(train) == ["test-1-1", "test-2-1", "test-1-2", "test-2-2"]


def test_setup_weightedmix_relative_weights(files):
    """Restates test_data_setup.py::test_setup_weightedmix_relative_weights: weights 10.0 and 1.0
    give a mix that can be iterated (it is not empty)."""
    train, _ = _data(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "datasets": [
                {"path": "testdata1.jsonl", "sampling_weight": 10.0},
                {"path": "testdata2.jsonl", "sampling_weight": 1.0},
            ],
        }
    )
    assert next(iter(train))


def test_setup_weightedmix_zero_weights(files):
    """Restates test_data_setup.py::test_setup_weightedmix_zero_weights: a dataset of weight 0.0 is
    skipped; the mix is the other dataset in order (1-1, 1-2), then stops."""
    train, _ = _data(
        {
            "type": "PRECOMPUTE_WEIGHTED_MIX",
            "datasets": [
                {"path": "testdata1.jsonl", "sampling_weight": 1.0},
                {"path": "testdata2.jsonl", "sampling_weight": 0.0},
            ],
        }
    )
    assert _ids(train) == ["test-1-1", "test-1-2"]


def test_relative_weighting_maths(files):
    """Restates test_data_setup.py::test_relative_weighting_maths: weights are relative, so
    [4.5, 4.5, 1.0] means the probabilities [0.45, 0.45, 0.1]. The peer checks its private
    normalising helper; observable here: both weightings give the same mix."""

    def mix(weights):
        return _data(
            {
                "type": "PRECOMPUTE_WEIGHTED_MIX",
                "datasets": [
                    {"path": p, "sampling_weight": w}
                    for p, w in zip(
                        ["testdata1.jsonl", "testdata2.jsonl", "testdata1.jsonl"], weights, strict=True
                    )
                ],
            }
        )[0]

    assert _ids(mix([4.5, 4.5, 1.0])) == _ids(mix([0.45, 0.45, 0.1]))


def test_handle_auto_split(files):
    """Restates test_data_setup.py::test_handle_auto_split: AUTO_SPLIT with ratio 0.5 (seed 123) of
    two examples gives one training and one validation example."""
    train, validation = _data(
        {"type": "CONCATENATION", "datasets": [{"path": "testdata1.jsonl"}]},
        {"type": "AUTO_SPLIT", "ratio": 0.5, "seed": 123},
    )
    assert len(train) == 1
    assert len(validation) == 1


def test_handle_auto_split_fails_for_iterable(files, tmp_path):
    """Restates test_data_setup.py::test_handle_auto_split_fails_for_iterable: AUTO_SPLIT of data it
    cannot split is a ValueError. The peer's case is a streamed dataset, which this engine never
    makes (it reads datasets whole); the data that cannot be split here is a single example,
    which would leave either no training or no validation data."""
    (tmp_path / "one.jsonl").write_text(json.dumps(TESTDATA1[0]) + "\n")
    with pytest.raises(ValueError):
        _data(
            {"type": "CONCATENATION", "datasets": [{"path": "one.jsonl"}]},
            {"type": "AUTO_SPLIT", "ratio": 0.5, "seed": 123},
        )
