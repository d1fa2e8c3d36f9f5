"""The provider's errors. Retry semantics are in the type: *Permanent* ones fail the task without
retries (a bad config or an out-of-memory will fail again the same way).

Failures of an engine job are classified the same way on both runners, from the exit code, the
reason Kubernetes gives (``OOMKilled``, ``DeadlineExceeded``, ``Evicted``; the local runner uses
the same words) and the tail of the log. The kind is the first word of the message, in brackets.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from airflow_provider_finetune.compat import AirflowFailException

HOST_OOM_FIX = (
    "the job needed more host memory than it has: raise memory_per_gpu (the pod's memory limit), lower "
    "batchsize_conf.max_per_device_train_batch_size, or quantize the base (quant_conf)"
)
GPU_OOM_FIX = (
    "the accelerator ran out of memory: lower batchsize_conf.max_per_device_train_batch_size (accumulation "
    "grows to keep the total batch), quantize the base (quant_conf, QLoRA), enable "
    "training_args.gradient_checkpointing, use LoRA, or add GPUs"
)
# torch's messages for CUDA, ROCm (HIP), Intel XPU and Apple MPS, and the allocator failures below them
_GPU_OOM = re.compile(
    r"(CUDA|HIP|XPU|MPS backend) out of memory|torch(\.cuda)?\.OutOfMemoryError|"
    r"CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|hipErrorOutOfMemory|"
    r"NCCL.*(out of memory|cudaErrorMemoryAllocation)|BatchTooLargeError"
)
# a host allocation that failed without the kernel killing anyone (torch's CPU allocator, Python)
_HOST_OOM = re.compile(r"DefaultCPUAllocator: can't allocate memory|^MemoryError\b", re.MULTILINE)
SIGKILL_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)


class FinetuneConfigError(AirflowFailException, ValueError):
    """A config, URI or parameter that cannot work; found before any pod starts. Not retried."""


class EngineJobFailed(RuntimeError):
    """The engine job failed; retried per the task's retries (the retry resumes from checkpoints)."""

    kind = "failed"

    def __init__(self, message: str, kind: str | None = None):
        if kind:
            self.kind = kind
        super().__init__(message)

    @classmethod
    def classify(
        cls, returncode: int | None, tail: str, reason: str | None = None
    ) -> tuple[type[Exception], str, str]:
        """(exception type, kind, explanation) of a failed engine job.

        An OOM needs evidence: the reason ``OOMKilled`` (Kubernetes, or the local cgroup's OOM-kill
        counter) for host memory, torch's message in the log for an accelerator. A SIGKILL alone
        (exit 137 / -9) is not called OOM: preemption, ``kill -9`` and eviction end the same way.
        """
        if reason == "OOMKilled":
            return (
                OutOfMemory,
                "host-oom",
                f"out of host memory (OOMKilled, exit {returncode}): {HOST_OOM_FIX}",
            )
        if _GPU_OOM.search(tail or ""):
            return (
                OutOfMemory,
                "accelerator-oom",
                f"out of accelerator memory (exit {returncode}): {GPU_OOM_FIX}",
            )
        if _HOST_OOM.search(tail or ""):
            return (
                OutOfMemory,
                "host-oom",
                f"out of host memory (allocation failed, exit {returncode}): {HOST_OOM_FIX}",
            )
        if reason == "DeadlineExceeded":
            return (
                cls,
                "deadline",
                (
                    "ran longer than active_deadline_seconds: raise it, or let the retry resume from "
                    "the newest complete checkpoint"
                ),
            )
        if reason == "Killed":
            return (
                cls,
                "killed",
                "stopped from Airflow (on_kill: the task was marked failed, cleared or timed out)",
            )
        if reason == "Evicted":
            return (
                cls,
                "evicted",
                "the node evicted the pod (memory or disk pressure); the retry resumes from checkpoints",
            )
        if returncode == 2:
            return (
                FinetuneConfigError,
                "config",
                "the engine rejected its input (exit 2); see the log above for file, line and key",
            )
        if returncode in SIGKILL_CODES:
            return (
                cls,
                "killed",
                (
                    f"killed by SIGKILL (exit {returncode}) without an OOMKilled reason: preempted, evicted "
                    "or killed by hand; if the node logged an OOM kill, raise memory_per_gpu"
                ),
            )
        return cls, "failed", f"exit code {returncode}" + (f", reason {reason}" if reason else "")

    @classmethod
    def make(cls, where: str, returncode: int | None, tail: str = "", reason: str | None = None) -> Exception:
        kind_type, kind, text = cls.classify(returncode, tail, reason)
        message = f"[{kind}] {where}: {text}"
        if issubclass(kind_type, EngineJobFailed):
            return kind_type(message, kind)
        err = kind_type(message)
        err.kind = kind
        return err

    @classmethod
    def from_local(cls, err: Any) -> Exception:
        """From the local runner's LocalRunError; one that never started is a setup error (not retried)."""
        if err.returncode is None:
            return FinetuneConfigError(f"[setup] {err}")
        return cls.make(str(err), err.returncode, err.tail, getattr(err, "reason", None))

    @classmethod
    def from_pod(cls, pod_name: str, container: str, state: dict[str, Any], tail: str = "") -> Exception:
        """From a failed pod: ``state`` holds the container's ``exit_code`` and ``reason`` and the pod's."""
        reason = state.get("reason") or state.get("pod_reason")
        where = f"pod {pod_name} container {container} exited with {state.get('exit_code')}" + (
            f" ({reason})" if reason else ""
        )
        return cls.make(where, state.get("exit_code"), tail, reason)


class OutOfMemory(AirflowFailException):
    """Host or accelerator OOM; failing again the same way is certain, so it is not retried.
    ``kind``: ``host-oom`` or ``accelerator-oom``."""

    kind = "oom"
