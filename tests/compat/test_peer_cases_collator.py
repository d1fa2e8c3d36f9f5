"""The Silogen engine's tests/test_collator.py, case by case.

- unk-convert-to-eos: the peer's collator writes EOS into padded input positions and -100 into
  their labels; here finetune_engine.modeling.load_tokenizer (missing_pad_token_strategy
  unk-convert-to-eos) and the PaddingCollator do it.
- completion-only labels: the peer masks in the collator, by finding the assistant start/end
  token sequences; this engine masks when it tokenizes (finetune_engine.data.tokenize.encode_batch,
  by rendering conversation prefixes). The cases use a one-token-per-character mock tokenizer whose
  chat template writes the given start and end markers, encode with the settings an SFT run
  derives from the default sft_args (EOS appended after the conversation, as the peer's training
  tokenizer adds it; the assistant start marker trained), and expect the peer's input ids and labels.
- in-context tokenization: the peer tokenizes a string after a prefix and drops the prefix's tokens
  by their offsets; here encode_batch labels an assistant reply by the offsets of its tokens in the
  whole rendered text.
"""

from __future__ import annotations

import pytest

from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch

EOS_ID = 1
CHARS = {10: "a", 11: "b", 12: "c", 2: "S", 3: "T", 4: "U", 5: "V", EOS_ID: "~"}
IDS = {c: i for i, c in CHARS.items()}


class CharTokenizer:
    """One token per character; a chat template that writes assistant turns as START+content+END."""

    bos_token = ""
    eos_token = "~"
    eos_token_id = EOS_ID
    pad_token_id = 0

    def __init__(self, start: str, end: str):
        self.start, self.end = start, end

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):
        text = "".join(
            self.start + m["content"] + self.end if m["role"] == "assistant" else m["content"]
            for m in messages
        )
        return text + (self.start if add_generation_prompt else "")

    def __call__(self, texts, return_offsets_mapping=False, **kwargs):
        out = {"input_ids": [[IDS[c] for c in t] for t in texts]}
        if return_offsets_mapping:
            out["offset_mapping"] = [[(i, i + 1) for i in range(len(t))] for t in texts]
        return out


def _config(sections: dict | None = None):
    from finetune_engine.config import parse_config

    return parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "unused.jsonl"}]},
                "validation_data": {"type": "NONE"},
                "chat_template_name": "keep-original",
                **(sections or {}).get("data_conf", {}),
            },
            "batchsize_conf": {"total_train_batch_size": 1},
            "run_conf": {"model": "unused"},
            **{k: v for k, v in (sections or {}).items() if k != "data_conf"},
        }
    )


@pytest.mark.parametrize("start, end", [([2], [3]), ([2], [2]), ([2, 3], [4, 5]), ([2, 3], [2, 3])])
def test_completion_only_collator(start, end):
    """Restates test_collator.py::test_completion_only_collator (all four marker cases): input ids
    are [10 11 12] + start + [10 11 12] + end + [10 11 12] + [EOS]; labels train the assistant start
    marker, the reply and the end marker, and nothing else (not the final EOS after a user turn)."""
    tok = CharTokenizer("".join(CHARS[i] for i in start), "".join(CHARS[i] for i in end))
    messages = [
        {"role": "user", "content": "abc"},
        {"role": "assistant", "content": "abc"},
        {"role": "user", "content": "abc"},
    ]
    # what an SFT run encodes with: sft_args as a Silogen config leaves them, completions only on
    sft = _config({"sft_args": {"max_seq_length": 64, "train_on_completions_only": True}}).sft_args
    settings = EncodeSettings.for_sft(sft, end_marker=tok.end, start_marker=tok.start)
    [item] = encode_batch([{"messages": messages}], tok, settings)
    assert item["input_ids"] == [10, 11, 12] + start + [10, 11, 12] + end + [10, 11, 12] + [EOS_ID]
    x = IGNORE_INDEX
    assert item["labels"] == [x, x, x] + start + [10, 11, 12] + end + [x, x, x] + [x]


class FixedFastTokenizer:
    """The peer's mock fast tokenizer: always ids [0, 1, 2, 3] at offsets (0,1) (1,2) (2,3) (3,4)."""

    bos_token = ""
    eos_token = None
    eos_token_id = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):
        return "".join(m["content"] for m in messages)

    def __call__(self, texts, **kwargs):
        return {
            "input_ids": [[0, 1, 2, 3] for _ in texts],
            "offset_mapping": [[(0, 1), (1, 2), (2, 3), (3, 4)] for _ in texts],
        }


def test_in_context_tokenize():
    """Restates test_collator.py::test_in_context_tokenize: after a one-character prefix ("\\n"),
    the string's tokens in context are [1, 2, 3]; the prefix's token is not part of them."""
    messages = [{"role": "user", "content": "\n"}, {"role": "assistant", "content": "xyz"}]
    [item] = encode_batch(
        [{"messages": messages}],
        FixedFastTokenizer(),
        EncodeSettings(max_seq_length=64, completions_only=True),
    )
    assert item["labels"][0] == IGNORE_INDEX
    assert [t for t in item["labels"] if t != IGNORE_INDEX][:3] == [1, 2, 3]


def test_unk_convert_to_eos_collator(tiny_model_dir):
    """Restates test_collator.py::test_unk_convert_to_eos_collator: with unk-convert-to-eos, a batch
    pads [2, 2, 3, EOS] with EOS on the input side and -100 on the labels."""
    from finetune_engine.data.collate import PaddingCollator
    from finetune_engine.modeling import load_tokenizer

    cfg = _config({"data_conf": {"missing_pad_token_strategy": "unk-convert-to-eos"}})
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    eos = tok.tokenizer.eos_token_id
    assert tok.tokenizer.pad_token_id == tok.tokenizer.unk_token_id
    collate = PaddingCollator(pad_token_id=tok.collate_pad_id)
    short = [2, 2, 3, eos]
    longer = [2, 2, 3, 4, eos]
    batch = collate([{"input_ids": short, "labels": short}, {"input_ids": longer, "labels": longer}])
    assert batch["input_ids"][0].tolist() == [2, 2, 3, eos, eos]
    assert batch["labels"][0].tolist() == [2, 2, 3, eos, IGNORE_INDEX]
