"""Choosing among the runs of a sweep (the XComs of a mapped FinetuneKubernetesOperator)."""

from __future__ import annotations

import math
from typing import Any


class NoRunFinished(RuntimeError):
    """Every run of the sweep failed or reported no eval loss."""


def pick_best(
    results: list[dict[str, Any] | None],
    swept: list[Any],
    key: str = "lora_rank",
    metric: str = "final_eval_loss",
) -> tuple[dict[str, Any], str]:
    """The run with the lowest ``metric``; ties go to the smaller ``key`` (the cheaper adapter).

    Failed runs (no XCom, or no finite metric) are left out and named in the summary line; when
    none is left, ``NoRunFinished`` says which ones failed.
    """
    done = []
    for r in results or []:
        value = (r or {}).get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            done.append(r)
    failed = sorted(
        set(swept) - {r.get(key) for r in done},
        key=lambda v: (not isinstance(v, int | float), v if isinstance(v, int | float) else str(v)),
    )
    if not done:
        raise NoRunFinished(
            f"no run of the sweep finished with a {metric} (failed {key}s: {failed}); see the sweep task logs"
        )
    best = min(done, key=lambda r: (r[metric], r.get(key) if r.get(key) is not None else 0))
    table = ", ".join(
        f"r={r.get(key)}: {r[metric]:.4f}"
        for r in sorted(done, key=lambda r: (r.get(key) is None, r.get(key) or 0))
    )
    summary = f"eval loss by rank: {table}; failed ranks: {failed or 'none'}; best: r={best.get(key)}"
    return best, summary
