"""The Silogen engine's tests/test_replace_tokens.py, case by case, against this engine's
``replace_tokens`` command (finetune_engine.replace_tokens). The peer rewrites the files with sed;
this engine replaces the text itself, so the sed-specific cases are restated as what sed achieves:
the literal replacement in the tokenizer files."""

from __future__ import annotations

import json
from unittest.mock import patch

import pytest

from finetune_engine import replace_tokens


@pytest.mark.parametrize(
    "argv",
    [
        ["tokenizer", "outpath", "--from", "blah"],
        ["tokenizer", "outpath", "--to", "blah"],
        ["tokenizer", "outpath", "--to", "blah"],
        ["tokenizer", "outpath"],
        ["tokenizer", "outpath", "--from", "a", "--to", "b", "--from", "c"],
    ],
)
def test_replace_tokens_cli_unpaired_replacements(argv):
    """Restates test_replace_tokens.py::test_replace_tokens_cli_unpaired_replacements: unpaired
    (or missing) --from/--to exit with a usage error before anything is loaded."""
    with patch.object(replace_tokens, "replace_tokens") as work, pytest.raises(SystemExit) as exit_:
        replace_tokens.main(argv)
    assert exit_.value.code != 0
    assert not work.called


def test_replace_tokens_cli_check_replacements():
    """Restates test_replace_tokens.py::test_replace_tokens_cli_check_replacements: --from and --to
    pair up in the order given, even interleaved (a->b, c->d, e->f)."""
    argv = [
        "tokenizer",
        "outpath",
        "--from",
        "a",
        "--to",
        "b",
        "--from",
        "c",
        "--from",
        "e",
        "--to",
        "d",
        "--to",
        "f",
    ]
    with patch.object(replace_tokens, "replace_tokens") as work:
        assert replace_tokens.main(argv) == 0
    work.assert_called_once_with("tokenizer", "outpath", {"a": "b", "c": "d", "e": "f"})


@pytest.mark.parametrize("token", ["Normal string", "String/With/Slash"])
def test_escape_for_sed(tmp_path, token):
    """Restates test_replace_tokens.py::test_escape_for_sed: a token with slashes (which the peer
    escapes for sed) is replaced literally, like one without."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": token}))
    replace_tokens.modify_tokenizer_files(tmp_path, {token: "<|im_end|>"})
    assert (tmp_path / "tokenizer_config.json").read_text() == '{"eos_token": "<|im_end|>"}'


def test_modify_tokens(tmp_path):
    """Restates test_replace_tokens.py::test_modify_tokens: with a tokenizer_config.json present,
    <|assistant|> is replaced by <|im_start|> everywhere in it."""
    (tmp_path / "tokenizer_config.json").write_text('{"a": "<|assistant|>", "b": "x<|assistant|>y"}')
    replace_tokens.modify_tokenizer_files(tmp_path, {"<|assistant|>": "<|im_start|>"})
    assert (tmp_path / "tokenizer_config.json").read_text() == '{"a": "<|im_start|>", "b": "x<|im_start|>y"}'


def test_modify_tokens_raises_when_no_files(tmp_path):
    """Restates test_replace_tokens.py::test_modify_tokens_raises_when_no_files: a directory with no
    tokenizer files is a FileNotFoundError, and nothing is written."""
    with pytest.raises(FileNotFoundError):
        replace_tokens.modify_tokenizer_files(tmp_path, {"<|assistant|>": "<|im_start|>"})
    assert list(tmp_path.iterdir()) == []
