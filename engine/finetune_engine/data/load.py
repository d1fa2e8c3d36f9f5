"""Read validated datasets and combine them: concatenation, weighted mixes, validation splits.

The weighted mix and the automatic validation split reproduce the Silogen engine's, which uses
the datasets library: ``interleave_datasets(..., stopping_strategy="all_exhausted", seed=seed)``
and ``Dataset.train_test_split(test_size=ratio, seed=seed)``. Given the same files and seeds they
pick the same examples in the same order (numpy's default_rng is consumed the same way).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from finetune_engine.config import schema
from finetune_engine.data.validate import iter_records

log = logging.getLogger(__name__)

# interleave_datasets draws its source indices in blocks of this size; the same blocks give the same draws.
_DRAW_BLOCK = 1000


def read_dataset(path: str) -> list[dict[str, Any]]:
    return [record for _, record in iter_records(path)]


def weighted_mix(datasets: list[list[dict]], weights: list[float | None], seed: int) -> list[dict]:
    """The Silogen engine's PRECOMPUTE_WEIGHTED_MIX of ``datasets``.

    A weight of None is 1.0; a dataset of weight 0 is left out. When every remaining weight is 1.0
    the datasets alternate (round robin), each starting over when it runs out, for as many rounds
    as the longest has examples. Otherwise each next example comes from a dataset drawn with
    probability weight / total, a dataset starts over when it runs out, and the mix ends right
    after the draw that finishes the last dataset not yet seen whole.
    """
    kept = [(records, 1.0 if w is None else float(w)) for records, w in zip(datasets, weights, strict=True)]
    if any(w < 0 for _, w in kept):
        raise ValueError("sampling_weight may not be negative")
    kept = [(records, w) for records, w in kept if w != 0.0]
    if not kept:
        raise ValueError("every dataset has sampling_weight 0; nothing to train")
    if any(not records for records, _ in kept):
        raise ValueError("a dataset of the mix has no examples")
    sources = [records for records, _ in kept]
    lengths = [len(records) for records in sources]
    if all(w == 1.0 for _, w in kept):
        return [records[i % len(records)] for i in range(max(lengths)) for records in sources]

    import numpy as np

    total = sum(w for _, w in kept)
    probabilities = [w / total for _, w in kept]
    rng = np.random.default_rng(seed)
    n = len(sources)
    blocks = []
    counts = np.zeros(n, dtype=np.int64)
    while not (counts >= lengths).all():
        block = rng.choice(n, size=_DRAW_BLOCK, p=probabilities)
        blocks.append(block)
        counts += np.bincount(block, minlength=n)
    draws = np.concatenate(blocks)
    # Each dataset is seen whole at its len-th draw; the mix stops at the last of those.
    stop = max(int(np.flatnonzero(draws == s)[lengths[s] - 1]) for s in range(n))
    draws = draws[: stop + 1]
    row = np.empty(len(draws), dtype=np.int64)
    for s in range(n):
        where = np.flatnonzero(draws == s)
        row[where] = np.arange(len(where)) % lengths[s]
    return [sources[s][i] for s, i in zip(draws.tolist(), row.tolist(), strict=True)]


def split(records: list, ratio: float, seed: int, unit: str = "example") -> tuple[list, list]:
    """(train, validation) as the Silogen engine's AUTO_SPLIT: ceil(ratio x n) examples held out,
    taken from the front of a permutation seeded with ``seed``; both parts in permutation order.

    Where that would leave no training example the Silogen engine refuses, and so does this: a
    ValueError naming data_conf.validation_data and what to change (``unit`` names what is split).
    """
    import numpy as np

    n = len(records)
    n_eval = math.ceil(ratio * n)
    if n and n_eval >= n:
        raise ValueError(
            f"data_conf.validation_data: AUTO_SPLIT with ratio {ratio} holds out ceil({ratio} x {n}) = "
            f"{n_eval} of the {n} training {unit}(s), leaving nothing to train on (the Silogen engine "
            "refuses this too); add training data, lower data_conf.validation_data.ratio, or give separate "
            "validation data (type: CONCATENATION) or none (type: NONE)"
        )
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def load_data(conf: schema.DataConf) -> tuple[list[dict], list[dict]]:
    """(train, validation) records as the config describes."""
    td = conf.training_data
    weighted = isinstance(td, schema.WeightedMixData)
    # A dataset of weight 0 is not read at all, as in the Silogen engine.
    loaded = [
        read_dataset(ds.path) if not (weighted and ds.sampling_weight == 0) else [] for ds in td.datasets
    ]
    for ds, records in zip(td.datasets, loaded, strict=True):
        if weighted and ds.sampling_weight == 0:
            log.info("dataset %s: sampling_weight 0, left out", ds.path)
        else:
            log.info("dataset %s: %d examples", ds.path, len(records))
    if weighted:
        train = weighted_mix(loaded, [ds.sampling_weight for ds in td.datasets], td.seed)
        log.info("weighted mix: %d examples", len(train))
    else:
        train = [r for records in loaded for r in records]
    vd = conf.validation_data
    if isinstance(vd, schema.AutoSplitValidation):
        train, evaluation = split(train, vd.ratio, vd.seed)
    elif isinstance(vd, schema.ConcatenationValidation):
        evaluation = [r for ds in vd.datasets for r in read_dataset(ds.path)]
    else:
        evaluation = []
    log.info("data: %d training, %d validation examples", len(train), len(evaluation))
    return train, evaluation
