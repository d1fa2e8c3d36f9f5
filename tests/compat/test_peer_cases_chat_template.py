"""The Silogen engine's tests/test_chat_template.py, case by case. The peer renders preference data
to prompt/chosen/rejected text itself (apply_chat_template_to_preference_data); this engine hands
the records to TRL as message lists (finetune_engine.data.preference.to_trl) and TRL renders them
(trl.data_utils.maybe_apply_chat_template). The cases run that same path with the peer's mock
tokenizer: each message's content followed by "|", one token per character."""

from __future__ import annotations

import pytest

RECORDS = [
    {
        "dataset": "pref-1",
        "id": "test-1-1",
        "prompt_messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "B"}],
        "chosen_messages": [{"role": "assistant", "content": "C"}],
        "rejected_messages": [{"role": "assistant", "content": "D"}],
    },
    {
        "dataset": "pref-1",
        "id": "test-1-2",
        "prompt_messages": [{"role": "system", "content": "1"}, {"role": "user", "content": "2"}],
        "chosen_messages": [{"role": "assistant", "content": "3"}],
        "rejected_messages": [{"role": "assistant", "content": "4"}],
    },
]


class MockTokenizerWithChatTemplate:
    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        return "".join(message["content"] + "|" for message in messages)

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(letter) for letter in text]}


@pytest.fixture
def applied():
    from trl.data_utils import maybe_apply_chat_template

    from finetune_engine.data.preference import to_trl

    tokenizer = MockTokenizerWithChatTemplate()
    return [maybe_apply_chat_template(to_trl(record), tokenizer) for record in RECORDS], tokenizer


def test_apply_chat_template_to_preference_data_keys(applied):
    """Restates test_chat_template.py::test_apply_chat_template_to_preference_data_keys: the
    rendered examples have prompt, chosen and rejected."""
    rows, _ = applied
    assert all(key in row for row in rows for key in ("prompt", "chosen", "rejected"))


def test_apply_chat_template_to_preference_data_no_old_keys(applied):
    """Restates test_chat_template.py::test_apply_chat_template_to_preference_data_no_old_keys: the
    *_messages keys are gone."""
    rows, _ = applied
    assert not any(
        key in row for row in rows for key in ("prompt_messages", "chosen_messages", "rejected_messages")
    )


def test_apply_chat_template_to_preference_data_length(applied):
    """Restates test_chat_template.py::test_apply_chat_template_to_preference_data_length: the
    length of an example (the peer records it for group_by_length) is the token count of prompt +
    chosen + rejected: 8 for both examples."""
    rows, tokenizer = applied
    assert [len(tokenizer(r["prompt"] + r["chosen"] + r["rejected"])["input_ids"]) for r in rows] == [8, 8]


def test_apply_chat_template_to_preference_data_content(applied):
    """Restates test_chat_template.py::test_apply_chat_template_to_preference_data_content: the
    prompt is the rendered prompt messages, chosen/rejected what the answer adds after it."""
    rows, _ = applied
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == ("A|B|", "C|", "D|")
    assert (rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"]) == ("1|2|", "3|", "4|")
