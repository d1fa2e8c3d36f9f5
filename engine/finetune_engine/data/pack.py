"""Best-fit-decreasing packing of tokenized examples into rows of at most ``capacity`` tokens."""

from __future__ import annotations

import bisect
import random


def pack_lengths(lengths: list[int], capacity: int, seed: int | None = 0) -> list[list[int]]:
    """Group example indices into bins whose total length fits ``capacity``.

    Best-fit decreasing keeps padding low on long-tailed data; bins are shuffled with ``seed`` so
    long and short rows mix across batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the pack capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= n
        else:
            b = len(bins)
            bins.append([i])
            remaining = capacity - n
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    if seed is not None:
        random.Random(seed).shuffle(bins)
    return bins
