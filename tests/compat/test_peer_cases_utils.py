"""The Silogen engine's tests/test_utils.py, case by case: batch size and gradient accumulation
from batchsize_conf (the peer's resolve_batchsize_and_accumulation; here derive_batch_plan, which
takes the number of processes as an argument instead of reading it from accelerate)."""

from __future__ import annotations

import pytest

from finetune_engine.config.batchsize import derive_batch_plan


@pytest.mark.parametrize(
    "total, max_per_device, processes, expected",
    [
        (8, 4, 1, (4, 2)),
        (8, 4, 2, (4, 1)),
        (8, 4, 4, (2, 1)),
        (8, 4, 8, (1, 1)),
        (8, 8, 1, (8, 1)),
        (8, 8, 8, (1, 1)),
        (8, 10, 8, (1, 1)),
        (8, 10, 2, (4, 1)),
        (8, 10, 1, (8, 1)),
        (8, 3, 2, (2, 2)),
    ],
)
def test_resolve_batchsize_and_accumulation_correct_inputs(total, max_per_device, processes, expected):
    """Restates test_utils.py::test_resolve_batchsize_and_accumulation_correct_inputs:
    (per-device batch, accumulation steps) for each (total, max per device, processes)."""
    plan = derive_batch_plan(total, max_per_device, processes)
    assert (plan.per_device, plan.accumulation) == expected
    assert plan.total == total


@pytest.mark.parametrize("total, max_per_device, processes", [(8, 4, 10), (8, 10, 10), (1, 10, 2)])
def test_resolve_batchsize_and_accumulation_impossible(total, max_per_device, processes):
    """Restates test_utils.py::test_resolve_batchsize_and_accumulation_impossible: a total batch
    that the processes cannot share evenly is a ValueError."""
    with pytest.raises(ValueError):
        derive_batch_plan(total, max_per_device, processes)
