"""Preference data in TRL's shape, and the chat-template rule of preference training. No torch here.

Accepted formats (validated by data/validate.py before this runs):

- the seed's ``prompt_messages`` / ``chosen_messages`` / ``rejected_messages`` (dpo, orpo, cpo),
- TRL's ``prompt`` / ``chosen`` / ``rejected``, strings or message lists (dpo, orpo, cpo),
- unpaired ``prompt`` / ``completion`` / ``label`` (kto).

Message lists are rendered by TRL with the tokenizer's chat template (prompt with the generation
prompt, then prompt + answer); strings are used as raw text, with EOS appended to the answers.
"""

from __future__ import annotations

from typing import Any

# The data formats each preference method trains on (validate.py's method names).
DATA_METHOD = {"dpo": "dpo", "orpo": "dpo", "cpo": "dpo", "kto": "kto"}


def _answer_text(answer: Any) -> Any:
    """An answer as compared for sameness: a string stripped, a message list as (role, content) pairs."""
    if isinstance(answer, str):
        return answer.strip()
    if isinstance(answer, list):
        return [
            (
                m.get("role"),
                m.get("content", "").strip() if isinstance(m.get("content"), str) else m.get("content"),
            )
            if isinstance(m, dict)
            else m
            for m in answer
        ]
    return answer


def identical_answers(record: dict[str, Any]) -> bool:
    """Whether a preference pair's chosen and rejected answers are the same (after trimming
    whitespace): such a pair prefers nothing, and DPO's loss on it is a constant."""
    if "chosen_messages" in record:
        chosen, rejected = record.get("chosen_messages"), record.get("rejected_messages")
    else:
        chosen, rejected = record.get("chosen"), record.get("rejected")
    return chosen is not None and _answer_text(chosen) == _answer_text(rejected)


class PreferenceTemplateError(ValueError):
    """The chat template would change the vocabulary or differ from the one SFT trained."""


def to_trl(record: dict[str, Any]) -> dict[str, Any]:
    """One validated record as TRL expects it (ids and dataset names dropped)."""
    if "prompt_messages" in record:
        return {
            "prompt": record["prompt_messages"],
            "chosen": record["chosen_messages"],
            "rejected": record["rejected_messages"],
        }
    if "label" in record:
        return {
            "prompt": record["prompt"],
            "completion": record["completion"],
            "label": bool(record["label"]),
        }
    return {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}


def check_template(
    template_name: str,
    added_tokens: list[str],
    sft_meta: dict[str, Any],
    model: str,
    meta_source: str | None = None,
) -> None:
    """The seed's rule: preference training adds no tokens, and uses the template SFT trained.

    New tokens would start from untrained (mean) embeddings that a preference loss cannot teach,
    and a template other than the SFT one asks the model for a format it never learned."""
    trained = sft_meta.get("chat_template_name")
    if trained and template_name != "keep-original" and template_name != trained:
        raise PreferenceTemplateError(
            f"data_conf.chat_template_name {template_name} differs from the template {meta_source or model} "
            f"was fine-tuned with ({trained}, from its finetune_meta.json); "
            "set data_conf.chat_template_name: keep-original"
            + (f" (or {trained})" if trained != "keep-original" else "")
        )
    if added_tokens:
        raise PreferenceTemplateError(
            f"data_conf.chat_template_name {template_name} adds tokens {added_tokens} that {model} does not "
            "have; preference training (dpo, kto, orpo, cpo) adds no tokens. Run SFT with this template "
            "first and train its output (checkpoint-final), or set data_conf.chat_template_name: "
            "keep-original to use the template the model already has"
        )


def keep_prompt_end(ids: list[int], max_prompt_length: int | None) -> tuple[list[int], bool]:
    """A prompt cut to its last ``max_prompt_length`` tokens (the part next to the answer)."""
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids, False
    return ids[-max_prompt_length:], True
