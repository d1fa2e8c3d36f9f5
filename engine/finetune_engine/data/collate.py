"""Batch collators: padded batches, and packed rows isolated per example.

Packed rows reset ``position_ids`` at each example. With FlashAttention (varlen) the positions are
enough; on sdpa/eager they are not (measured: cross-contamination), so the packed collator also
builds a 4D block-diagonal causal mask. sdpa takes it as booleans (True = may attend); eager needs
an additive float mask. For flex_attention it gives each token's ``document_ids`` instead, which the
trainer turns into a document-causal BlockMask on the GPU (see ``finetune_engine.fastpath``).

The first label of every packed example is -100: it is no target (nothing precedes it), but after
the shift it would be the target of the previous example's last token. So a packed row's loss has
exactly the terms of its examples' unpacked losses. ``num_real_tokens`` is a Python int, so counting
tokens never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune_engine.data.tokenize import IGNORE_INDEX


def _pad_to(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class PaddingCollator:
    """Pad each batch to its longest example; pads are masked by position, never by token id."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = _pad_to(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, sl] = torch.tensor(f["input_ids"])
            labels[row, sl] = torch.tensor(f["labels"])
            mask[row, sl] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "num_real_tokens": int(mask.sum()),
        }


@dataclass
class PackedCollator:
    """Rows are lists of examples ({'segments': [{'input_ids', 'labels'}, ...]})."""

    pad_token_id: int
    attn_implementation: str = "sdpa"
    pad_to_multiple_of: int | None = None

    @property
    def varlen(self) -> bool:
        return self.attn_implementation.startswith("flash_attention")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(s["input_ids"]) for s in f["segments"]) for f in features]
        width = _pad_to(max(lengths), self.pad_to_multiple_of)
        batch = len(features)
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        seq_id = torch.full((batch, width), -1, dtype=torch.long)
        for row, f in enumerate(features):
            at = 0
            for k, seg in enumerate(f["segments"]):
                n = len(seg["input_ids"])
                ids[row, at : at + n] = torch.tensor(seg["input_ids"])
                labels[row, at : at + n] = torch.tensor(seg["labels"])
                labels[row, at] = IGNORE_INDEX  # no target; after the shift it would be the last one's
                positions[row, at : at + n] = torch.arange(n)
                seq_id[row, at : at + n] = k
                at += n
            # Trailing pads form their own segment, so no attention row is empty (sdpa would NaN).
            positions[row, at:] = torch.arange(width - at)
            seq_id[row, at:] = len(f["segments"])
        out = {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "num_real_tokens": sum(lengths),
        }
        if self.varlen:
            return out
        if self.attn_implementation == "flex_attention":
            out["document_ids"] = seq_id
            return out
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (seq_id[:, :, None] == seq_id[:, None, :]) & causal  # (batch, q, k)
        if self.attn_implementation == "eager":
            mask = torch.zeros(allowed.shape, dtype=torch.float32)
            mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
            out["attention_mask"] = mask[:, None]
        else:
            out["attention_mask"] = allowed[:, None]
        return out
