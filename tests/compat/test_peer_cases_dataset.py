"""The Silogen engine's tests/test_dataset.py, case by case. The peer's make_dataset loads one
dataset definition into a datasets.Dataset coerced to its data model; here datasets are read by
finetune_engine.data.load.read_dataset after finetune_engine.data.validate.validate_files checked
them. This engine never streams a dataset (it reads each whole), so the peer's iterable cases are
restated on the engine's streaming reader of a file, iter_records."""

from __future__ import annotations

import json

import pytest

from finetune_engine.data.load import read_dataset
from finetune_engine.data.validate import DataValidationError, iter_records, validate_files

EXAMPLES = [
    {
        "dataset": "test-1",
        "id": "test-1-1",
        "messages": [
            {"role": "system", "content": "lorem ipsum"},
            {"role": "user", "content": "dolor sit amet"},
            {"role": "assistant", "content": "consectetur adipiscing elit"},
        ],
    },
    {
        "dataset": "test-1",
        "id": "test-1-2",
        "messages": [
            {"role": "system", "content": "sed do eiusmod tempor"},
            {"role": "user", "content": "incididunt ut labore"},
            {"role": "assistant", "content": "et dolore magna aliqua"},
        ],
    },
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def test_dataset_random_access_by_default(jsonl):
    """Restates test_dataset.py::test_dataset_random_access_by_default: the loaded dataset allows
    random access."""
    validate_files([jsonl], method="sft")
    assert read_dataset(str(jsonl))[1]["messages"][0]["content"] == "sed do eiusmod tempor"


def test_coerces_to_chatconversation(jsonl):
    """Restates test_dataset.py::test_coerces_to_chatconversation: the examples are conversations
    with exactly the data model's fields (dataset, id, messages)."""
    [report] = validate_files([jsonl], method="sft")
    assert report.kind == "messages" and report.examples == 2
    assert all(set(record) == {"dataset", "id", "messages"} for record in read_dataset(str(jsonl)))


def test_coercing_fails_for_wrong_type(jsonl):
    """Restates test_dataset.py::test_coercing_fails_for_wrong_type: conversations given where
    preference data (DirectPreference) is expected are a validation error."""
    with pytest.raises(DataValidationError):
        validate_files([jsonl], method="dpo")


def test_dataset_no_random_access_when_iterable(jsonl):
    """Restates test_dataset.py::test_dataset_no_random_access_when_iterable: read as a stream,
    the dataset has no random access."""
    stream = iter_records(jsonl)
    with pytest.raises(TypeError):
        stream[1]  # noqa: B018


def test_dataset_iterabledataset_through(jsonl):
    """Restates test_dataset.py::test_dataset_iterabledataset_through: iterating yields the examples
    in file order, then stops."""
    iterator = iter(read_dataset(str(jsonl)))
    assert next(iterator)["messages"][0]["content"] == "lorem ipsum"
    assert next(iterator)["messages"][0]["content"] == "sed do eiusmod tempor"
    with pytest.raises(StopIteration):
        next(iterator)


def test_dataset_non_existant_raises(tmp_path, monkeypatch):
    """Restates test_dataset.py::test_dataset_non_existant_raises: a dataset path that does not
    exist is a FileNotFoundError."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_dataset("non-existant-path.jsonl")
