"""replace_tokens: the Silogen engine's command (same arguments, same effect: a renamed token keeps
its id), registered as a console script and a finetune-engine subcommand."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from finetune_engine import replace_tokens as rt

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "{% for m in messages %}{{ '<|assistant|>' + m['content'] }}{% endfor %}"


@pytest.fixture()
def tokenizer_with_assistant(tiny_model_dir, tmp_path) -> tuple[Path, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|assistant|>"]})
    tok.chat_template = TEMPLATE
    out = tmp_path / "src-tok"
    tok.save_pretrained(out)
    return out, tok.convert_tokens_to_ids("<|assistant|>")


def test_renamed_token_keeps_its_id(tokenizer_with_assistant, tmp_path):
    from transformers import AutoTokenizer

    src, old_id = tokenizer_with_assistant
    assert rt.main([str(src), str(tmp_path / "out"), "--from", "<|assistant|>", "--to", "<|im_start|>"]) == 0
    old, new = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(new) == len(old)
    assert new.convert_tokens_to_ids("<|im_start|>") == old_id
    assert "<|assistant|>" not in new.get_vocab()
    assert new("<|im_start|>", add_special_tokens=False).input_ids == [old_id]
    assert "<|im_start|>" in new.chat_template and "<|assistant|>" not in new.chat_template
    assert new.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi"
    # the source is untouched
    assert old.convert_tokens_to_ids("<|assistant|>") == old_id


def test_replacements_apply_in_order_and_in_place(tokenizer_with_assistant):
    from transformers import AutoTokenizer

    src, old_id = tokenizer_with_assistant
    rt.replace_tokens(str(src), src, {"<|assistant|>": "<|a|>", "<|a|>": "<|b|>"})
    assert AutoTokenizer.from_pretrained(src).convert_tokens_to_ids("<|b|>") == old_id


@pytest.mark.parametrize(
    "argv",
    [
        ["tok", "out", "--from", "a"],
        ["tok", "out", "--to", "a"],
        ["tok", "out"],
        ["tok", "out", "--from", "a", "--to", "b", "--from", "c"],
    ],
)
def test_unpaired_arguments_exit_2(argv, monkeypatch):
    monkeypatch.setattr(rt, "replace_tokens", lambda *a: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as exc:
        rt.main(argv)
    assert exc.value.code == 2


def test_pairs_are_matched_by_position(monkeypatch):
    seen = {}
    monkeypatch.setattr(rt, "replace_tokens", lambda tok, out, repl: seen.update(tok=tok, out=out, repl=repl))
    assert (
        rt.main(
            ["tok", "out", "--from", "a", "--to", "b", "--from", "c", "--from", "e", "--to", "d", "--to", "f"]
        )
        == 0
    )
    assert seen == {"tok": "tok", "out": "out", "repl": {"a": "b", "c": "d", "e": "f"}}


def test_no_tokenizer_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer files found"):
        rt.modify_tokenizer_files(tmp_path, {"<|assistant|>": "<|im_start|>"})


def test_a_replacement_that_breaks_the_tokenizer_writes_nothing(tokenizer_with_assistant, tmp_path, capsys):
    src, _ = tokenizer_with_assistant
    out = tmp_path / "out"
    assert rt.main([str(src), str(out), "--from", '"model"', "--to", '"nonsense"']) == 1
    assert "does not load" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_registered_like_the_silogen_engine():
    from finetune_engine.cli.main import COMMANDS

    scripts = tomllib.loads((ROOT / "engine" / "pyproject.toml").read_text())["project"]["scripts"]
    # behind the engine's error boundary, which runs the same modules' main()
    assert scripts["replace_tokens"] == "finetune_engine.cli.scripts:replace_tokens"
    assert (
        scripts["create_vllm_compatible_adapter"]
        == "finetune_engine.cli.scripts:create_vllm_compatible_adapter"
    )
    assert scripts["generate"] == "finetune_engine.cli.scripts:generate"
    assert COMMANDS["replace-tokens"][0] == "finetune_engine.replace_tokens"
