"""The Silogen engine's tests/test_tokenizer.py, case by case. The peer wraps the tokenizer's
save_pretrained (wrap_for_save_in_inference_mode) so that a save writes the inference settings -
EOS = the template's end marker, BOS added, EOS not added - while the tokenizer in memory keeps its
training settings. Here finetune_engine.modeling.prepare_tokenizer_for_inference wraps it the
same way (the training recipes call it right after loading the tokenizer); the cases use the tiny
model's real tokenizer (with <|im_end|>, EOS and BOS added as tokens) instead of the peer's mock,
and read the saved settings back by loading the saved tokenizer."""

from __future__ import annotations

import pytest

END = "<|im_end|>"


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": [END, "EOS", "BOS"]})
    assert (tok.eos_token, tok.bos_token) == ("</s>", "<s>")
    return tok


def _wrap(tok) -> None:
    from finetune_engine.modeling import prepare_tokenizer_for_inference

    prepare_tokenizer_for_inference(tok, END)


def _saved(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _adds(tok) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding plain text."""
    ids = tok("the cat")["input_ids"]
    return ids[0] == tok.bos_token_id, ids[-1] in (tok.eos_token_id, tok.convert_tokens_to_ids("</s>"))


def test_wrap_for_save_in_inference_mode_keeps_default_params(tokenizer, tmp_path):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_keeps_default_params: after
    preparing and saving for inference, the tokenizer in memory keeps its EOS, BOS and whether it
    adds them."""
    tokenizer.add_eos_token = True
    tokenizer.add_bos_token = True
    _wrap(tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.bos_token == "<s>"
    assert _adds(tokenizer) == (True, True)


def test_wrap_for_save_in_inference_mode_keeps_same_params(tokenizer, tmp_path):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_keeps_same_params: values
    set in memory after the preparation stay as set across a save."""
    _wrap(tokenizer)
    tokenizer.eos_token = "EOS"
    tokenizer.bos_token = "BOS"
    tokenizer.add_eos_token = False
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer.eos_token == "EOS"
    assert tokenizer.bos_token == "BOS"
    assert _adds(tokenizer) == (False, False)


def test_wrap_for_save_in_inference_mode_saves_inference_params(tokenizer, tmp_path):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_saves_inference_params: the
    saved tokenizer has EOS <|im_end|>, BOS <s>, adds BOS and does not add EOS."""
    _wrap(tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    saved = _saved(tmp_path / "tok")
    assert (saved.eos_token, saved.bos_token) == (END, "<s>")
    assert _adds(saved) == (True, False)


def test_wrap_for_save_in_inference_mode_doesnt_change_bos(tokenizer, tmp_path):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_doesnt_change_bos: a BOS
    changed in memory after the preparation is saved, while the saved EOS stays the end marker
    and the saved tokenizer adds BOS and not EOS, whatever the tokenizer in memory adds."""
    _wrap(tokenizer)
    tokenizer.eos_token = "EOS"
    tokenizer.bos_token = "BOS"
    tokenizer.add_eos_token = False
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(tmp_path / "tok")
    saved = _saved(tmp_path / "tok")
    assert (saved.eos_token, saved.bos_token) == (END, "BOS")
    assert _adds(saved) == (True, False)


def test_wrap_for_save_in_inference_mode_cannot_wrap_twice(tokenizer):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_cannot_wrap_twice: preparing
    the same tokenizer twice is a RuntimeError."""
    _wrap(tokenizer)
    with pytest.raises(RuntimeError):
        _wrap(tokenizer)


def test_wrap_for_save_in_inference_mode_return_the_same(tokenizer, tmp_path):
    """Restates test_tokenizer.py::test_wrap_for_save_in_inference_mode_return_the_same: a prepared
    tokenizer's save_pretrained returns what an unprepared one's returns (the files written)."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    _wrap(tokenizer)
    written = tokenizer.save_pretrained(tmp_path / "a")
    expected = plain.save_pretrained(tmp_path / "b")
    assert [p.replace(str(tmp_path / "a"), "") for p in written] == [
        p.replace(str(tmp_path / "b"), "") for p in expected
    ]
