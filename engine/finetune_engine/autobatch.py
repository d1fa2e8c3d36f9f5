"""Auto batch size (``max_per_device_train_batch_size: auto``): probe the largest per-device batch
that fits in memory, then derive accumulation from it like a configured maximum.

Each try runs a forward and backward pass over copies of the longest training row (the worst
case) with the training precision; on an accelerator the optimizer's state is reserved first
(two fp32 copies of the trainable weights, as AdamW keeps), so the batch found also fits the
optimizer step. Sizes double from 1 until one runs out of memory, then a binary search between
the last fit and the first failure; memory is freed between tries. Several processes take the
smallest result.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

OOM_MARKERS = (
    " out of memory",  # CUDA, HIP, XPU ("CUDA out of memory.", "HIP out of memory.")
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MARKERS)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchTooLargeError(RuntimeError):
    """Not even one row fits in memory."""


def find_max_batch(
    try_batch: Callable[[int], None], upper: int, release: Callable[[], None] = free_memory
) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in [1, upper] that ``try_batch`` runs without running out of memory, and
    the tries made ((size, fitted) in order). Other errors propagate."""
    tried: list[tuple[int, bool]] = []

    def fits(size: int) -> bool:
        ok = True
        try:
            try_batch(size)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            ok = False
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        release()
        tried.append((size, ok))
        log.info("auto batch: %d row(s) per device %s", size, "fit" if ok else "ran out of memory")
        return ok

    if upper < 1:
        raise ValueError(f"upper bound must be >= 1, got {upper}")
    if not fits(1):
        raise BatchTooLargeError(
            "auto batch size: one row of the longest training example does not fit in memory; lower "
            "sft_args.max_seq_length, set training_args.gradient_checkpointing: true, train an adapter "
            "(peft_conf) or quantize the base (quant_conf), or use a larger accelerator"
        )
    good, bad = 1, None
    while good < upper:
        size = min(good * 2, upper)
        if fits(size):
            good = size
        else:
            bad = size
            break
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    return good, tried


def training_trial(
    model, row: dict[str, Any], collate: Callable[[list[dict]], dict], training_args: dict[str, Any]
) -> Callable[[int], None]:
    """A try: forward + backward over ``size`` copies of ``row`` as the trainer would run it."""
    import torch

    device = next(model.parameters()).device
    dtype = (
        torch.bfloat16 if training_args.get("bf16") else torch.float16 if training_args.get("fp16") else None
    )

    def trial(size: int) -> None:
        batch = collate([row] * size)
        batch.pop("num_real_tokens", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        model.train()
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        try:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return trial


def probe_per_device_batch(model, rows, collate, training_args: dict[str, Any], upper: int) -> int:
    """Largest per-device batch of the longest row in ``rows`` that fits; the minimum over processes."""
    import torch

    if hasattr(rows, "lengths"):  # text windows: lengths without building every row
        longest = int(rows.lengths().argmax())
    else:
        longest = max(range(len(rows)), key=lambda i: _row_length(rows[i]))
    reserve = None
    if torch.cuda.is_available():
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if (
            next(model.parameters()).device.type == "cpu"
            and not getattr(model, "is_loaded_in_4bit", False)
            and not getattr(model, "is_loaded_in_8bit", False)
        ):
            model.to(local)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        reserve = torch.empty(2 * trainable, dtype=torch.float32, device=local)  # AdamW's two moments
    if training_args.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=training_args.get("gradient_checkpointing_kwargs")
            or {"use_reentrant": False}
        )
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    try:
        found, tried = find_max_batch(training_trial(model, rows[longest], collate, training_args), upper)
    finally:
        del reserve
        free_memory()
    log.info(
        "auto batch: %d row(s) of %d tokens per device fit (tries: %s)",
        found,
        _row_length(rows[longest]),
        ", ".join(f"{s}{'+' if ok else '-'}" for s, ok in tried),
    )
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        value = torch.tensor([found], device=next(model.parameters()).device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        found = int(value.item())
        log.info(
            "auto batch: %d per device, the smallest over %d processes",
            found,
            torch.distributed.get_world_size(),
        )
    return found


def _row_length(row: dict[str, Any]) -> int:
    if "segments" in row:
        return sum(len(s["input_ids"]) for s in row["segments"])
    return len(row["input_ids"])
