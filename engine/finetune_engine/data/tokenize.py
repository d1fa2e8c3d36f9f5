"""Render examples with the chat template and tokenize them, with completion-only labels.

A rendered conversation is framed as BOS + text + EOS, as the Silogen engine's training tokenizer
does (``add_bos_token``/``add_eos_token``); neither is doubled when the text already has it.

Assistant spans are found by rendering prefixes of the conversation (``messages[:i]`` with the
generation prompt, then ``messages[:i+1]``), so any prefix-stable template works, including a
model's own. Labels are -100 outside the trained spans. A trained span runs from the assistant
start marker (the named template's, or what the generation prompt adds) through the end marker,
as in the Silogen engine's completion-only collator; the EOS appended after the conversation is
trained only in full-sequence training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template cannot be used for this training setup."""


@dataclass
class EncodeSettings:
    max_seq_length: int
    length_handling: str = "filter"  # or "truncate"
    completions_only: bool = False
    end_marker: str | None = None  # the template's assistant end, trimmed to when known
    start_marker: str | None = None  # the template's assistant start; None: the generation prompt
    train_start_marker: bool = False  # completions only: the start marker carries labels too
    append_eos: bool = False  # end chat texts with EOS (not doubled)

    @classmethod
    def for_sft(cls, sft: Any, end_marker: str | None, start_marker: str | None) -> EncodeSettings:
        """The settings of an SFT run from its ``sft_args`` and the template's markers."""
        return cls(
            sft.max_seq_length,
            sft.length_handling,
            sft.train_on_completions_only,
            end_marker,
            start_marker=start_marker,
            train_start_marker=sft.train_assistant_start_marker,
            append_eos=sft.append_eos_token,
        )


def _as_messages(record: dict[str, Any]) -> list[dict[str, str]] | None:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "prompt" in record and "completion" in record:
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    return None


def render_with_spans(
    tokenizer: Any,
    messages: list[dict[str, str]],
    end_marker: str | None,
    start_marker: str | None = None,
    with_start_marker: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of every assistant reply (with its end marker, and with
    its start marker when ``with_start_marker``)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes, so "
                "assistant turns cannot be located; set sft_args.train_on_completions_only: false "
                "or choose a named data_conf.chat_template_name (e.g. chat-ml)"
            )
        start, end = len(before), len(upto)
        if with_start_marker and i:
            floor = spans[-1][1] if spans else 0
            if start_marker:
                at = text.rfind(start_marker, floor, start)
                if at >= 0:
                    start = at
            else:  # what the generation prompt adds is the start marker
                plain = tokenizer.apply_chat_template(messages[:i], tokenize=False)
                if before.startswith(plain) and floor <= len(plain) < start:
                    start = len(plain)
        if end_marker:
            cut = text.rfind(end_marker, start, end)
            if cut >= 0:
                end = cut + len(end_marker)
        spans.append((start, end))
    return text, spans


def with_bos(tokenizer: Any, text: str) -> str:
    """A rendered prompt as training saw it: BOS first (once), for templates that do not write it."""
    bos = tokenizer.bos_token
    return text if not bos or text.startswith(bos) else bos + text


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return value if isinstance(value, int) else None


def encode_batch(
    records: list[dict[str, Any]], tokenizer: Any, settings: EncodeSettings
) -> list[dict[str, list[int]] | str]:
    """Encode records; each result is {'input_ids', 'labels'} or a string naming why it was dropped
    ('too_long', 'no_trained_tokens'). Truncated examples carry 'truncated': [1]."""
    texts: list[str] = []
    all_spans: list[list[tuple[int, int]] | None] = []
    chat: list[bool] = []
    for record in records:
        messages = _as_messages(record)
        chat.append(messages is not None)
        if messages is None:  # plain text: BOS + text + EOS, every token trained
            texts.append((tokenizer.bos_token or "") + record["text"] + (tokenizer.eos_token or ""))
            all_spans.append(None)
        elif settings.completions_only:
            text, spans = render_with_spans(
                tokenizer, messages, settings.end_marker, settings.start_marker, settings.train_start_marker
            )
            texts.append(text)
            all_spans.append(spans)
        else:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            all_spans.append(None)
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=settings.completions_only,
        return_attention_mask=False,
    )
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    out: list[dict[str, list[int]] | str] = []
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        spans = all_spans[i]
        if spans is None:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            offsets = enc["offset_mapping"][i]
            s = 0
            for t, (a, b) in enumerate(offsets):
                while s < len(spans) and spans[s][1] <= a:
                    s += 1
                if s < len(spans) and b > spans[s][0] and a < spans[s][1]:
                    labels[t] = ids[t]
        if chat[i]:
            if bos is not None and (not ids or ids[0] != bos):
                ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
            if settings.append_eos and eos is not None and ids[-1] != eos:
                ids.append(eos)
                labels.append(IGNORE_INDEX if spans is not None else eos)
        truncated = False
        if len(ids) > settings.max_seq_length:
            if settings.length_handling == "filter":
                out.append("too_long")
                continue
            ids, labels, truncated = ids[: settings.max_seq_length], labels[: settings.max_seq_length], True
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (also isolates packed rows)
        if all(x == IGNORE_INDEX for x in labels):
            out.append("no_trained_tokens")
            continue
        item = {"input_ids": ids, "labels": labels}
        if truncated:
            item["truncated"] = [1]
        out.append(item)
    return out
