"""Run a function over chunks in forked worker processes, with large arguments already in memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# What forked workers read: set just before the fork, so nothing is pickled but the chunks and
# the results (a tokenizer is never serialized).
_STATE: dict[str, Any] = {}


def _call(chunk: Any) -> Any:
    return _STATE["fn"](chunk, *_STATE["args"])


def forked_map(fn: Callable[..., Any], chunks: Sequence[Any], workers: int, *args: Any) -> list[Any]:
    """``[fn(chunk, *args) for chunk in chunks]``, in order, with up to ``workers`` forked processes."""
    if workers <= 1 or len(chunks) <= 1:
        return [fn(chunk, *args) for chunk in chunks]
    import multiprocessing

    _STATE.update(fn=fn, args=args)
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            return list(pool.imap(_call, chunks))
    finally:
        _STATE.clear()
