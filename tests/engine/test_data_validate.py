"""The data validator: a corpus of malformed files, each rejected with the right line and reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune_engine.data.validate import (
    KINDS,
    DataProblem,
    DataValidationError,
    detect_kind,
    iter_records,
    validate_file,
    validate_files,
)


def chat(user="What is 2 plus 2?", answer="4.", **extra):
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        **extra,
    }


GOOD = json.dumps(chat())

# name -> (file bytes, expected line, keyword of the reason)
CORPUS = {
    "bad_json": (f'{GOOD}\n{{"messages": [}}\n'.encode(), 2, "bad JSON"),
    "not_an_object": (f"{GOOD}\n[1, 2]\n".encode(), 2, "expected a JSON object"),
    "latin1_bytes": (
        GOOD.encode() + b"\n" + json.dumps(chat("caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n",
        2,
        "not UTF-8",
    ),
    "empty_file": (b"", 0, "the file is empty"),
    "only_blank_lines": (b"\n\n  \n", 0, "the file is empty"),
    "missing_role": (
        json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}).encode(),
        1,
        "has no role",
    ),
    "misspelled_role": (
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistent", "content": "x"}]}
        ).encode(),
        1,
        "did you mean 'assistant'",
    ),
    "content_not_string": (json.dumps(chat(answer=42)).encode(), 1, "must be a string, got int"),
    "content_list": (json.dumps(chat(user=["a", "b"])).encode(), 1, "must be a string, got list"),
    "empty_messages": (json.dumps({"messages": []}).encode(), 1, "messages is empty"),
    "messages_not_list": (json.dumps({"messages": "hi"}).encode(), 1, "must be a list of messages"),
    "nan_constant": (b'{"text": NaN}\n', 1, "NaN is not valid JSON"),
    "deep_nesting": (b'{"text": "a", "dataset": ' + b"[" * 30 + b"]" * 30 + b"}", 1, "nested deeper than 20"),
    "deep_nesting_past_the_parser_recursion_limit": (
        f"{GOOD}\n".encode() + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        2,
        "nested deeper than 20",
    ),
    "huge_line": (b'{"text": "' + b"a" * (11 * 2**20) + b'"}\n', 1, "over the 10 MiB limit"),
    "mixed_kinds": (
        f"{GOOD}\n{json.dumps({'text': 'plain', 'extra': 1})}\n".encode(),
        2,
        "one format per file",
    ),
    "duplicate_id": (
        (json.dumps(chat(id="a")) + "\n" + json.dumps(chat(id="a"))).encode(),
        2,
        "duplicate id 'a' (first on line 1)",
    ),
    "id_wrong_type": (json.dumps(chat(id=[1])).encode(), 1, "id must be a string or an integer"),
    "unknown_format": (
        json.dumps({"question": "q", "answer": "a"}).encode(),
        1,
        "cannot tell the data format",
    ),
    "prompt_without_completion": (json.dumps({"prompt": "q"}).encode(), 1, "missing 'completion'"),
    "empty_completion": (json.dumps({"prompt": "q", "completion": ""}).encode(), 1, "completion is empty"),
    "text_not_string": (json.dumps({"text": 5}).encode(), 1, "text must be a string"),
    "bad_json_names_the_column": (b'{"text": "a",, "id": 1}\n', 1, "column 14"),
    "infinity_constant": (b'{"text": "a", "id": -Infinity}\n', 1, "-Infinity is not valid JSON"),
    "pretty_printed_object": (b'{\n  "text": "a"\n}\n', 1, "pretty-printed JSON"),
    "utf16_file": ('{"text": "a"}\n'.encode("utf-16"), 1, "UTF-16"),
    "lone_surrogate_escape": (
        f"{GOOD}\n".encode()
        + b'{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}\n',
        2,
        "unpaired surrogate",
    ),
    "message_not_an_object": (
        json.dumps({"messages": ["hi", {"role": "assistant", "content": "b"}]}).encode(),
        1,
        "messages[0] must be an object",
    ),
    "role_not_a_string": (
        json.dumps(
            {"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}
        ).encode(),
        1,
        "is not one of system, user, assistant",
    ),
    "missing_content": (
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}).encode(),
        1,
        "messages[0] has no content",
    ),
    "dataset_not_string": (json.dumps(chat(dataset=3)).encode(), 1, "dataset must be a string"),
    "bool_id": (json.dumps(chat(id=True)).encode(), 1, "id must be a string or an integer"),
    "crlf_file_with_bad_third_line": ((GOOD + "\r\n") * 2 + '{"text": "x"}\r\n', 3, "one format per file"),
    "error_after_good_lines": (
        (GOOD + "\n") * 5
        + '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}\n',
        6,
        "role 'bot' is not one of",
    ),
    # Empty content is allowed (the Silogen engine's data has empty system prompts), an all-empty
    # conversation is not.
    "all_messages_empty": (json.dumps(chat(user="", answer=" ")).encode(), 1, "every message is empty"),
    "empty_content_but_not_a_string": (
        json.dumps(chat(answer=None)).encode(),
        1,
        "content must be a string, got NoneType",
    ),
    "misspelled_format_key": (
        json.dumps({"mesages": chat()["messages"]}).encode(),
        1,
        "'mesages': did you mean 'messages'?",
    ),
    "misspelled_message_key": (
        json.dumps(
            {"messages": [{"role": "user", "contnet": "a"}, {"role": "assistant", "content": "b"}]}
        ).encode(),
        1,
        "has no content (found 'contnet'",
    ),
    "tags_not_a_list": (json.dumps(chat(tags="a,b")).encode(), 1, "tags must be a list of strings"),
    "labels_not_strings": (
        json.dumps(chat(labels={"k": 1})).encode(),
        1,
        "labels must be an object of string values",
    ),
    "message_tags_not_strings": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a", "tags": [1]},
                    {"role": "assistant", "content": "b"},
                ]
            }
        ).encode(),
        1,
        "messages[0].tags must be a list",
    ),
    # One JSON array of objects (what json.dump writes) is read; its problems name the element's line.
    "json_array_bad_element": (b"[\n" + GOOD.encode() + b',\n{"messages": []}\n]\n', 3, "messages is empty"),
    "json_array_syntax_error": (
        b"[\n" + GOOD.encode() + b',\n  {"messages": [}\n]\n',
        3,
        "bad JSON: Expecting value (column 17)",
    ),
    "json_array_of_non_objects": (
        b"[\n" + GOOD.encode() + b",\n[1, 2]\n]",
        3,
        "expected a JSON object, got list",
    ),
    "json_array_trailing_text": (
        b"[" + GOOD.encode() + b']\n\n{"text": "x"}\n',
        3,
        "text after the end of the JSON array",
    ),
    "json_array_missing_comma": (
        b"[" + GOOD.encode() + b"\n" + GOOD.encode() + b"]",
        2,
        "expected ',' or ']'",
    ),
    "json_array_duplicate_id": (
        json.dumps([chat(id="a"), chat(id="b"), chat(id="a")], indent=1).encode(),
        28,
        "duplicate id 'a' (first on line 2)",
    ),
    "json_array_latin1": (
        b"[\n" + json.dumps(chat("caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"]",
        2,
        "not UTF-8",
    ),
    "json_array_nan": (b'[{"text": "a"},\n{"text": NaN}]', 2, "NaN is not valid JSON"),
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
    "dpo_missing_rejected": (
        {
            "prompt_messages": [{"role": "user", "content": "q"}],
            "chosen_messages": [{"role": "assistant", "content": "a"}],
        },
        "missing 'rejected_messages'",
    ),
    "dpo_prompt_ends_with_assistant": (
        {
            "prompt_messages": [{"role": "assistant", "content": "q"}],
            "chosen_messages": [{"role": "assistant", "content": "a"}],
            "rejected_messages": [{"role": "assistant", "content": "b"}],
        },
        "must end with a user turn",
    ),
    "dpo_chosen_user_role": (
        {
            "prompt_messages": [{"role": "user", "content": "q"}],
            "chosen_messages": [{"role": "user", "content": "a"}],
            "rejected_messages": [{"role": "assistant", "content": "b"}],
        },
        "role must be assistant",
    ),
    "dpo_trl_missing_chosen": ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
    "kto_label_string": ({"prompt": "q", "completion": "a", "label": "yes"}, "label must be true or false"),
    "kto_missing_prompt": ({"completion": "a", "label": True}, "missing 'prompt' for kto data"),
    "kto_completion_user_turn": (
        {
            "prompt": [{"role": "user", "content": "q"}],
            "completion": [{"role": "user", "content": "a"}],
            "label": True,
        },
        "completion[0] role must be assistant",
    ),
    "dpo_trl_mixed_strings_and_lists": (
        {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        "all strings or all message lists",
    ),
    "dpo_trl_prompt_list_ends_with_assistant": (
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "prompt must end with a user turn",
    ),
    "dpo_all_empty_rejected": (
        {
            "prompt_messages": [{"role": "user", "content": "q"}],
            "chosen_messages": [{"role": "assistant", "content": "a"}],
            "rejected_messages": [{"role": "assistant", "content": ""}],
        },
        "rejected_messages: every message is empty",
    ),
    "dpo_empty_chosen": (
        {
            "prompt_messages": [{"role": "user", "content": "q"}],
            "chosen_messages": [],
            "rejected_messages": [{"role": "assistant", "content": "b"}],
        },
        "chosen_messages is empty",
    ),
    "dpo_messages_chosen_equals_rejected": (
        {
            "prompt_messages": [{"role": "user", "content": "q"}],
            "chosen_messages": [{"role": "assistant", "content": "same"}],
            "rejected_messages": [{"role": "assistant", "content": "same "}],
        },
        "chosen_messages and rejected_messages are identical",
    ),
    "dpo_trl_chosen_equals_rejected": (
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "chosen and rejected are identical",
    ),
    "dpo_trl_lists_chosen_equals_rejected": (
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "a"}],
        },
        "chosen and rejected are identical",
    ),
}


def test_identical_pair_names_file_and_line_and_different_pairs_pass(tmp_path):
    """Only the row whose answers match is refused, with its own file:line; pairs that differ by
    role or text (not just whitespace) stay valid."""
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": " tie\n", "rejected": "tie"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}],
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    report = validate_file(path)
    assert [str(p) for p in report.problems] == [
        f"{path}:2: chosen and rejected are identical, so the pair prefers nothing; fix the answers or "
        "drop the row"
    ]
    assert report.examples == 1
    with pytest.raises(DataValidationError, match=r"pairs.jsonl:2: chosen and rejected are identical"):
        validate_files([path], method="dpo")
    other = tmp_path / "lists.jsonl"
    other.write_text(json.dumps(rows[2]) + "\n")
    assert validate_file(other).problems == []


@pytest.mark.parametrize("name", sorted(DPO_CORPUS))
def test_preference_corpus(tmp_path, name):
    record, keyword = DPO_CORPUS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    report = validate_file(path)
    assert any(p.line == 1 and keyword in p.reason for p in report.problems), [
        str(p) for p in report.problems
    ]


@pytest.mark.parametrize(
    "record,kind",
    [
        (chat(dataset="d", id=3), "messages"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"text": "some words"}, "text"),
        (
            {
                "prompt_messages": [{"role": "user", "content": "q"}],
                "chosen_messages": [{"role": "assistant", "content": "a"}],
                "rejected_messages": [{"role": "assistant", "content": "b"}],
            },
            "dpo_messages",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "dpo_trl"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "dpo_trl",
        ),
        ({"prompt": "q", "completion": "a", "label": False}, "kto"),
    ],
)
def test_valid_files_of_each_kind(tmp_path, record, kind):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + (
            json.dumps(record) + "\n\n" + json.dumps({k: v for k, v in record.items() if k != "id"}) + "\n"
        ).encode()
    )
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


def test_missing_file_and_directory(tmp_path):
    report = validate_file(tmp_path / "nope.jsonl")
    assert [(p.line, p.reason.split(";")[0]) for p in report.problems] == [(0, "file not found")]
    assert [p.line for p in validate_file(tmp_path).problems] == [0]
    assert "not a regular file" in validate_file(tmp_path).problems[0].reason


def test_problem_text_and_error_attribute(tmp_path):
    assert str(DataProblem("a.jsonl", 7, "bad")) == "a.jsonl:7: bad"
    path = tmp_path / "two.jsonl"
    path.write_text("{bad\n" + GOOD + "\n[1]\n")
    with pytest.raises(DataValidationError) as err:
        validate_files([path])
    assert [p.line for p in err.value.problems] == [1, 3]
    assert isinstance(err.value, ValueError) and "... and" not in str(err.value)


def test_problem_cap(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("{bad\n" * 50)
    report = validate_file(path, max_problems=10)
    assert len(report.problems) == 11
    assert report.problems[-1].line == 0 and "40 more line(s)" in report.problems[-1].reason


def test_line_limit_is_a_parameter(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(
        GOOD + "\n" + json.dumps({"messages": chat(answer="x" * 5000)["messages"]}) + "\n" + GOOD + "\n"
    )
    report = validate_file(path, max_line_bytes=1000)
    assert [(p.line, "over the" in p.reason) for p in report.problems] == [(2, True)]
    assert report.examples == 2


def test_forced_kind(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert validate_file(path, kind="prompt_completion").examples == 1
    report = validate_file(path, kind="kto")
    assert [p.reason for p in report.problems] == ["missing 'label' for kto data"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "mesages"}, "did you mean 'messages'"),
        ({"method": "ppo"}, "unknown method 'ppo'"),
        ({"kind": "dpo_trl", "method": "sft"}, "not usable here"),
    ],
)
def test_bad_arguments_are_value_errors_not_data_problems(tmp_path, kwargs, match):
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n")
    with pytest.raises(ValueError, match=match) as err:
        validate_files([path], **kwargs)
    assert not isinstance(err.value, DataValidationError)


def test_mixed_kinds_rejected_in_both_directions(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + GOOD + "\n")
    report = validate_file(path)
    assert report.kind == "dpo_trl" and report.examples == 1
    assert [(p.line, "looks like messages data" in p.reason) for p in report.problems] == [(2, True)]


def test_iter_records_splits_lines_like_the_validator(tmp_path):
    path = tmp_path / "odd.jsonl"
    # BOM, a blank line, CRLF endings and a bare CR used as JSON whitespace inside a line.
    path.write_bytes(
        b"\xef\xbb\xbf"
        + GOOD.encode()
        + b"\r\n\n"
        + (
            b'{"messages": [{"role": "user", "content": "a"},\r'
            b'{"role": "assistant", "content": "b"}], "id": 9}\n'
        )
    )
    report = validate_file(path)
    assert report.problems == [] and report.examples == 2
    records = list(iter_records(path))
    assert [n for n, _ in records] == [1, 3]
    assert records[1][1]["id"] == 9


def test_kinds_constant():
    assert KINDS == ("messages", "prompt_completion", "text", "dpo_messages", "dpo_trl", "kto")


def test_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(GOOD + "\n")
    bad.write_text(GOOD + "\n{oops\n")
    ok = subprocess.run(
        [sys.executable, "-m", "finetune_engine.data.validate", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "1 valid messages example(s)" in ok.stdout
    ko = subprocess.run(
        [sys.executable, "-m", "finetune_engine.data.validate", str(good), str(bad)],
        capture_output=True,
        text=True,
    )
    assert (
        ko.returncode == 1
        and f"{bad}:2: bad JSON" in ko.stdout
        and "total: 1 problem(s) in 2 file(s)" in ko.stdout
    )
    wrong_method = subprocess.run(
        [sys.executable, "-m", "finetune_engine.data.validate", str(good), "--method", "dpo"],
        capture_output=True,
        text=True,
    )
    assert wrong_method.returncode == 1 and "messages data is not usable here" in wrong_method.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "finetune_engine.data.validate", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "nope.jsonl:0: file not found" in missing.stdout
    forced = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_engine.data.validate",
            str(good),
            "--kind",
            "messages",
            "--method",
            "sft",
        ],
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0


def test_training_refuses_invalid_data_before_loading_the_model(tmp_path):
    """The training CLI stops on bad data with exit 2 before torch is even imported (no model is needed)."""
    from tests.engine.conftest import make_config

    data = tmp_path / "bad.jsonl"
    data.write_text(
        GOOD
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})
        + "\n"
    )
    (tmp_path / "model").mkdir()
    config = make_config(tmp_path, tmp_path / "model", data)
    code = (
        "import sys; from finetune_engine.cli.finetuning import main; rc = main(sys.argv[1:]); "
        "print('torch imported:', 'torch' in sys.modules); raise SystemExit(rc)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "sft", str(config)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 2, run.stderr
    assert f"{data}:2: messages[1] role 'bot' is not one of" in run.stderr
    assert "torch imported: False" in run.stdout
    assert not (tmp_path / "out").exists()
