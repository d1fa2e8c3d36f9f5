"""The embedding rules of training, merging and generation, in one place.

Real checkpoints pad their embedding matrix past the tokenizer (Qwen2.5: 151936 rows for 151665
tokens; Phi-3: 32064 for 32011), so the matrix and ``len(tokenizer)`` differ without anything being
wrong. The rules:

* grow only when the tokenizer needs more rows than the matrix has; never shrink (a shrunk model no
  longer matches its base, adapters that saved embeddings fail to load, and tensor-parallel serving
  loses its padding);
* tokens a run adds take spare rows when the matrix has them, initialised to the mean of the rows of
  the tokens that were there before (input and, when untied, output embeddings);
* tied embeddings stay tied (``resize_token_embeddings`` keeps the tie; a tied output matrix is the
  input matrix, written once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def embedding_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def fit_embeddings(
    model: Any, tokenizer: Any, added_tokens: Sequence[str] = (), mean_init: bool = True
) -> str:
    """Make ``model``'s embeddings hold every id of ``tokenizer`` by the rules above.

    ``added_tokens``: the tokens this run added to the tokenizer (their rows are initialised);
    ``mean_init`` False leaves new rows as ``resize_token_embeddings`` makes them (an adapter or a
    checkpoint brings the trained rows). Returns what was done, for the log ("" when nothing was)."""
    rows, need = embedding_rows(model), len(tokenizer)
    done = []
    if need > rows:
        model.resize_token_embeddings(need, mean_resizing=mean_init)
        how = " (mean-initialised new rows)" if mean_init else ""
        done.append(f"embeddings grown {rows} -> {need}{how}")
    ids = tokenizer.convert_tokens_to_ids(list(added_tokens)) if added_tokens else []
    spare = sorted({int(i) for i in ids if i is not None and 0 <= int(i) < rows})
    if spare and mean_init and min(spare) > 0:
        import torch

        known = min(spare)  # a run's tokens come after the ones the base was trained with
        with torch.no_grad():
            inputs = model.get_input_embeddings().weight
            inputs[spare] = inputs[:known].mean(dim=0).to(inputs.dtype)
            outputs = model.get_output_embeddings()
            if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
                outputs.weight[spare] = outputs.weight[:known].mean(dim=0).to(outputs.weight.dtype)
        done.append(f"{len(spare)} added token(s) took spare rows of the {rows}-row matrix, mean-initialised")
    return "; ".join(done)
