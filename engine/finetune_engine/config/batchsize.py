"""Derive per-device batch size and gradient accumulation from the total batch size."""

from __future__ import annotations

from typing import NamedTuple


class BatchPlan(NamedTuple):
    per_device: int
    accumulation: int
    world_size: int

    @property
    def total(self) -> int:
        return self.per_device * self.accumulation * self.world_size


def derive_batch_plan(total: int, max_per_device: int, world_size: int = 1) -> BatchPlan:
    """Per-device batch as large as allowed, so that world x per_device x accumulation == total.

    Raises ValueError when the total batch cannot be split evenly over the processes.
    """
    if total <= 0 or max_per_device <= 0 or world_size <= 0:
        raise ValueError(
            f"batch sizes and world size must be positive (total={total}, "
            f"max_per_device={max_per_device}, world_size={world_size})"
        )
    if total % world_size:
        raise ValueError(
            f"batchsize_conf.total_train_batch_size={total} is not divisible by the number of "
            f"processes ({world_size}); use a multiple of {world_size}"
        )
    per_process = total // world_size
    per_device = max(b for b in range(1, min(max_per_device, per_process) + 1) if per_process % b == 0)
    return BatchPlan(per_device, per_process // per_device, world_size)
