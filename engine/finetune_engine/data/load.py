"""Read validated datasets and combine them: concatenation, weighted mixes, validation splits."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from finetune_engine.config import schema
from finetune_engine.data.validate import iter_records

log = logging.getLogger(__name__)


def read_dataset(path: str) -> list[dict[str, Any]]:
    return [record for _, record in iter_records(path)]


def weighted_mix(datasets: list[list[dict]], weights: list[float], seed: int) -> list[dict]:
    """Each dataset drawn ``weight`` times: whole copies plus a seeded sample of the remainder."""
    rng = random.Random(seed)
    out: list[dict] = []
    for records, weight in zip(datasets, weights, strict=True):
        whole = math.floor(weight)
        out.extend(records * whole)
        extra = round((weight - whole) * len(records))
        out.extend(rng.sample(records, extra))
    rng.shuffle(out)
    return out


def split(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(ratio * len(records))), len(records) - 1) if len(records) > 1 else 0
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    return train, [records[i] for i in sorted(eval_idx)]


def load_data(conf: schema.DataConf) -> tuple[list[dict], list[dict]]:
    """(train, validation) records as the config describes."""
    td = conf.training_data
    loaded = [read_dataset(ds.path) for ds in td.datasets]
    for ds, records in zip(td.datasets, loaded, strict=True):
        log.info("dataset %s: %d examples", ds.path, len(records))
    if isinstance(td, schema.WeightedMixData):
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
