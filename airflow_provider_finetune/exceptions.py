"""The provider's errors. Retry semantics are in the type: *Permanent* ones fail the task without
retries (a bad config or an out-of-memory will fail again the same way)."""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowFailException

HOST_OOM_FIX = (
    "the process was killed for using more host memory than allowed (exit 137 / OOMKilled): raise "
    "memory_per_gpu, lower batchsize_conf.max_per_device_train_batch_size, or quantize the base (quant_conf)"
)
GPU_OOM_FIX = (
    "the accelerator ran out of memory: lower batchsize_conf.max_per_device_train_batch_size (accumulation "
    "grows to keep the total batch), enable training_args.gradient_checkpointing, use LoRA/QLoRA, or add GPUs"
)
_GPU_OOM_MARKERS = ("CUDA out of memory", "torch.OutOfMemoryError", "HIP out of memory", "OutOfMemoryError")


class FinetuneConfigError(AirflowFailException, ValueError):
    """A config, URI or parameter that cannot work; found before any pod starts. Not retried."""


class EngineJobFailed(RuntimeError):
    """The engine job failed; retried per the task's retries."""

    kind = "failed"

    @classmethod
    def classify(cls, returncode: int | None, tail: str, reason: str | None = None) -> tuple[type[Exception], str]:
        if reason == "OOMKilled" or returncode in (137, -9):
            return OutOfMemory, f"out of host memory: {HOST_OOM_FIX}"
        if any(m in tail for m in _GPU_OOM_MARKERS):
            return OutOfMemory, f"out of accelerator memory: {GPU_OOM_FIX}"
        if returncode == 2:
            return FinetuneConfigError, "the engine rejected its input (exit 2); see the log above for file, line and key"
        return cls, f"exit code {returncode}"

    @classmethod
    def from_local(cls, err: Any) -> Exception:
        kind, text = cls.classify(err.returncode, err.tail)
        return kind(f"{err}: {text}")


class OutOfMemory(AirflowFailException):
    """Host or accelerator OOM; failing again the same way is certain, so it is not retried."""
