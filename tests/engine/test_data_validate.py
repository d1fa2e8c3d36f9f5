"""The data validator: a corpus of malformed files, each rejected with the right line and reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune_engine.data.validate import DataValidationError, detect_kind, validate_file, validate_files


def chat(user="What is 2 plus 2?", answer="4.", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


GOOD = json.dumps(chat())

# name -> (file bytes, expected line, keyword of the reason)
CORPUS = {
    "bad_json": (f"{GOOD}\n{{\"messages\": [}}\n".encode(), 2, "bad JSON"),
    "json_array_file": (b'[{"messages": []}]\n', 1, "JSON array, not JSON Lines"),
    "not_an_object": (f"{GOOD}\n[1, 2]\n".encode(), 2, "expected a JSON object"),
    "latin1_bytes": (GOOD.encode() + b"\n" + json.dumps(chat("caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n", 2, "not UTF-8"),
    "empty_file": (b"", 0, "the file is empty"),
    "only_blank_lines": (b"\n\n  \n", 0, "the file is empty"),
    "missing_role": (json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}).encode(), 1, "has no role"),
    "misspelled_role": (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistent", "content": "x"}]}).encode(), 1, "did you mean 'assistant'"),
    "empty_content": (json.dumps(chat(answer="   ")).encode(), 1, "content is empty"),
    "content_not_string": (json.dumps(chat(answer=42)).encode(), 1, "must be a string, got int"),
    "content_list": (json.dumps(chat(user=["a", "b"])).encode(), 1, "must be a string, got list"),
    "no_assistant": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 1, "no assistant turn"),
    "empty_messages": (json.dumps({"messages": []}).encode(), 1, "messages is empty"),
    "messages_not_list": (json.dumps({"messages": "hi"}).encode(), 1, "must be a list of messages"),
    "unknown_message_key": (json.dumps({"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}).encode(), 1, "unknown key(s) ['name']"),
    "unknown_top_key": (json.dumps(chat(mesage="x")).encode(), 1, "unknown key 'mesage'"),
    "late_system": (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}).encode(), 1, "system message after the first turn"),
    "nan_constant": (b'{"text": NaN}\n', 1, "NaN is not valid JSON"),
    "deep_nesting": (json.dumps({"text": "x", "dataset": "d", "id": 1} | {"messages": None}).encode()[:0] + (b'{"text": "a", "dataset": ' + b"[" * 30 + b"]" * 30 + b"}"), 1, "nested deeper than 20"),
    "huge_line": (b'{"text": "' + b"a" * (11 * 2**20) + b'"}\n', 1, "over the 10 MiB limit"),
    "mixed_kinds": (f"{GOOD}\n{json.dumps({'text': 'plain', 'extra': 1})}\n".encode(), 2, "one format per file"),
    "duplicate_id": ((json.dumps(chat(id="a")) + "\n" + json.dumps(chat(id="a"))).encode(), 2, "duplicate id 'a' (first on line 1)"),
    "id_wrong_type": (json.dumps(chat(id=[1])).encode(), 1, "id must be a string or an integer"),
    "unknown_format": (json.dumps({"question": "q", "answer": "a"}).encode(), 1, "cannot tell the data format"),
    "prompt_without_completion": (json.dumps({"prompt": "q"}).encode(), 1, "missing 'completion'"),
    "empty_completion": (json.dumps({"prompt": "q", "completion": ""}).encode(), 1, "completion is empty"),
    "text_not_string": (json.dumps({"text": 5}).encode(), 1, "text must be a string"),
    "error_after_good_lines": ((GOOD + "\n") * 5 + '{"messages": [{"role": "user", "content": "x"}]}\n', 6, "no assistant turn"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_corpus(tmp_path, name):
    content, line, keyword = CORPUS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    report = validate_file(path)
    assert report.problems, f"{name} was accepted"
    matching = [p for p in report.problems if p.line == line and keyword in p.reason]
    assert matching, [str(p) for p in report.problems]
    assert str(matching[0]).startswith(f"{path}:{line}: ")


DPO_CORPUS = {
    "dpo_missing_rejected": ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_messages": [{"role": "assistant", "content": "a"}]}, "missing 'rejected_messages'"),
    "dpo_prompt_ends_with_assistant": ({"prompt_messages": [{"role": "assistant", "content": "q"}], "chosen_messages": [{"role": "assistant", "content": "a"}], "rejected_messages": [{"role": "assistant", "content": "b"}]}, "must end with a user turn"),
    "dpo_chosen_user_role": ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_messages": [{"role": "user", "content": "a"}], "rejected_messages": [{"role": "assistant", "content": "b"}]}, "role must be assistant"),
    "dpo_trl_missing_chosen": ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
    "kto_label_string": ({"prompt": "q", "completion": "a", "label": "yes"}, "label must be true or false"),
}


@pytest.mark.parametrize("name", sorted(DPO_CORPUS))
def test_preference_corpus(tmp_path, name):
    record, keyword = DPO_CORPUS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    report = validate_file(path)
    assert any(p.line == 1 and keyword in p.reason for p in report.problems), [str(p) for p in report.problems]


@pytest.mark.parametrize(
    "record,kind",
    [
        (chat(dataset="d", id=3), "messages"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"text": "some words"}, "text"),
        ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_messages": [{"role": "assistant", "content": "a"}], "rejected_messages": [{"role": "assistant", "content": "b"}]}, "dpo_messages"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "dpo_trl"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}, "dpo_trl"),
        ({"prompt": "q", "completion": "a", "label": False}, "kto"),
    ],
)
def test_valid_files_of_each_kind(tmp_path, record, kind):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n\n" + json.dumps({k: v for k, v in record.items() if k != "id"}) + "\n").encode())
    report = validate_file(path)
    assert report.problems == [] and report.kind == kind and report.examples == 2
    assert detect_kind(record) == kind


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(["{bad"] * 30 + [GOOD]) + "\n")
    with pytest.raises(DataValidationError) as err:
        validate_files([path])
    assert len(err.value.problems) == 30
    assert "... and 10 more" in str(err.value)


def test_method_restricts_formats(tmp_path):
    path = tmp_path / "dpo.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataValidationError, match="dpo_trl data is not usable here"):
        validate_files([path], method="sft")
    assert validate_files([path], method="dpo")[0].examples == 1


def test_missing_file(tmp_path):
    report = validate_file(tmp_path / "nope.jsonl")
    assert [p.reason for p in report.problems] == ["file not found"]


def test_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(GOOD + "\n")
    bad.write_text(GOOD + "\n{oops\n")
    ok = subprocess.run([sys.executable, "-m", "finetune_engine.data.validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "1 valid messages example(s)" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "finetune_engine.data.validate", str(good), str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1 and f"{bad}:2: bad JSON" in ko.stdout


def test_training_refuses_invalid_data_before_loading_the_model(tmp_path, tiny_model_dir):
    from finetune_engine.cli.finetuning import main as finetuning
    from tests.engine.conftest import make_config

    data = tmp_path / "bad.jsonl"
    data.write_text(GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    config = make_config(tmp_path, tiny_model_dir, data)
    assert finetuning(["sft", str(config)]) == 2
    assert not (tmp_path / "out").exists()
