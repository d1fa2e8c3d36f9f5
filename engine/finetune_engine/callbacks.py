"""Trainer callbacks: checkpoint manifests, progress/memory log lines, fault-tolerant MLflow, sample
generations."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_engine.checkpoints import clear_writing, mark_writing
from finetune_engine.manifest import write_manifest
from finetune_engine.tracking import TrackingSettings

log = logging.getLogger(__name__)


def memory_summary() -> str:
    import psutil
    import torch

    parts = [f"rss {psutil.Process().memory_info().rss / 2**30:.2f} GiB"]
    if torch.cuda.is_available():
        parts.append(
            f"gpu {torch.cuda.memory_allocated() / 2**30:.2f} GiB alloc / "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak"
        )
    return ", ".join(parts)


def _process_group():
    """torch.distributed when several processes train (else None)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def several_nodes() -> bool:
    """More processes in the job than on this node (torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def node_leader() -> bool:
    """The process of a node other than global rank 0's that uploads what its node wrote."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("RANK", "0")) != 0


class ManifestCallback(TrainerCallback):
    """Marks a checkpoint as this engine's before the Trainer saves it; after the save, writes its
    manifest last (dropping the mark), then runs ``after_save`` hooks (e.g. the bucket upload) with
    the complete directory.

    Every rank writes into a checkpoint (its ``rng_state_<rank>.pth``, its DeepSpeed ZeRO shards) and
    the Trainer does not wait for the others before ``on_save``: all ranks meet at a barrier first, so
    the manifest is written only over finished files. With several nodes each node holds only its own
    ranks' files: the leader of every other node uploads them (``node_upload(ckpt, step)`` returns
    their manifest entries), the entries are gathered on rank 0 (which also waits for every node's
    upload) and the hooks get them as ``node_files``, to list in the bucket's manifest written last.
    """

    def __init__(
        self,
        after_save: list[Callable[..., None]] | None = None,
        node_upload: Callable[[Path, int], list[dict]] | None = None,
    ):
        self.after_save = after_save or []
        self.node_upload = node_upload

    def _before_save(self, args, state, control) -> None:
        # DefaultFlowCallback (first in the list) has decided should_save; the Trainer saves next.
        if control.should_save and state.is_world_process_zero:
            mark_writing(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        group = _process_group()
        if group is not None:
            group.barrier()  # every rank's files of this checkpoint are written
        node_files = self._gather_node_files(group, ckpt, state) if group and several_nodes() else None
        if not state.is_world_process_zero or not ckpt.is_dir():
            return
        clear_writing(ckpt)
        write_manifest(ckpt, extra={"global_step": state.global_step})
        log.info("checkpoint %s complete (manifest written)", ckpt.name)
        failed = [part for part in node_files or [] if isinstance(part, str)]
        if failed:  # a node could not upload: the bucket's copy stays without manifest (incomplete)
            log.warning("%s not uploaded: %s; the next save uploads again", ckpt.name, "; ".join(failed))
            return
        for hook in self.after_save:
            if node_files is None:
                hook(ckpt, state.global_step)
            else:
                hook(ckpt, state.global_step, node_files=[e for part in node_files for e in part])

    def _gather_node_files(self, group, ckpt: Path, state) -> list:
        """On rank 0: per node, the manifest entries of the files its leader uploaded (or why it
        could not); every rank takes part (a collective), only node leaders upload."""
        mine: list[dict] | str | None = None
        if node_leader() and self.node_upload is not None and ckpt.is_dir():
            try:
                mine = self.node_upload(ckpt, state.global_step)
            except Exception as err:  # reported to rank 0; the collective must still happen
                mine = f"node of rank {os.environ.get('RANK')}: {type(err).__name__}: {err}"
                log.warning("uploading this node's files of %s failed: %s", ckpt.name, err)
        gathered: list = [None] * group.get_world_size()
        group.all_gather_object(gathered, mine)
        return [part for part in gathered if part is not None]


class ProgressCallback(TrainerCallback):
    """One log line per logging step: step/total, loss, lr, tokens/s, ETA and memory."""

    def __init__(self, memory_every: int = 10):
        self.memory_every = memory_every
        self._t0 = None
        self._step0 = 0
        self._logs = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        log.info(
            "training: step %d of %d; memory at start: %s",
            state.global_step,
            state.max_steps,
            memory_summary(),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self._t0 is None:
            return
        self._logs += 1
        done = state.global_step - self._step0
        elapsed = time.monotonic() - self._t0
        eta = (state.max_steps - state.global_step) * elapsed / done if done else float("nan")
        shown = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        line = (
            f"step {state.global_step}/{state.max_steps} "
            f"({100 * state.global_step / max(state.max_steps, 1):.0f}%) {text} eta {eta:.0f}s"
        )
        if self._logs % self.memory_every == 1 or self.memory_every == 1:
            line += f" | {memory_summary()}"
        log.info(line)


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(data)[:500]
    return out


class MLflowCallback(TrainerCallback):
    """Logs params, per-step metrics and checkpoints to MLflow. MLflow failures never stop
    training: they are logged once as warnings and tracking continues when the server is back.

    The run id is kept in ``output_dir/mlflow_run.json`` so a resumed job continues the same run.
    """

    def __init__(
        self, settings: TrackingSettings, params: dict[str, Any], tags: dict[str, str] | None = None
    ):
        self.settings = settings
        self.params = params
        self.tags = tags or {}
        self.run_id: str | None = None
        self._warned = False

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # tracking must never crash a training run
            if not self._warned:
                log.warning(
                    "MLflow %s failed (%s: %s); training continues, tracking will retry",
                    what,
                    type(err).__name__,
                    str(err)[:200],
                )
                self._warned = True
            return None

    def start(self, output_dir: str) -> str | None:
        import mlflow

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        state_file = Path(output_dir) / "mlflow_run.json"
        previous = None
        if state_file.exists():
            previous = json.loads(state_file.read_text()).get("run_id")

        def _start():
            mlflow.set_tracking_uri(self.settings.uri)
            mlflow.set_experiment(self.settings.experiment)
            run = mlflow.start_run(run_id=previous, run_name=None if previous else self.settings.run_name)
            return run.info.run_id

        self.run_id = self._call("start_run", _start)
        if self.run_id:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.settings.uri}))
            if previous is None:
                flat = list(_flatten(self.params).items())
                for i in range(0, len(flat), 100):
                    self._call("log_params", lambda chunk=dict(flat[i : i + 100]): mlflow.log_params(chunk))
            self._call("set_tags", lambda: mlflow.set_tags(self.tags))
            log.info("MLflow run %s at %s", self.run_id, self.settings.uri)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.run_id:
            return
        import mlflow

        clean = {k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._call("log_metrics", lambda: mlflow.log_metrics(clean, step=step, run_id=self.run_id))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.log_metrics(logs, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if not (state.is_world_process_zero and self.run_id and self.settings.log_artifacts):
            return
        import mlflow

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._call(
            "log_artifacts",
            lambda: mlflow.log_artifacts(str(ckpt), f"checkpoints/{ckpt.name}", run_id=self.run_id),
        )

    def log_samples(self, step: int, text: str, samples: list[dict[str, str]]) -> None:
        """Sample generations: the step's YAML as a text artifact, its rows appended to a table."""
        if not self.run_id:
            return
        import mlflow

        self._call("log_text", lambda: mlflow.log_text(text, f"samples/step-{step}.yaml", run_id=self.run_id))
        table = {
            "step": [step] * len(samples),
            "prompt": [s["prompt"] for s in samples],
            "completion": [s["completion"] for s in samples],
        }
        self._call("log_table", lambda: mlflow.log_table(table, "samples/samples.json", run_id=self.run_id))

    def finish(self, metrics: dict[str, float], status: str = "FINISHED") -> None:
        if not self.run_id:
            return
        import mlflow

        self.log_metrics(metrics)
        self._call("end_run", lambda: mlflow.end_run(status=status))


class SampleGenerationCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, generate from fixed prompts and log the samples:
    ``output_dir/samples/step-N.yaml`` and, with MLflow, the same file as a text artifact plus
    rows (step, prompt, completion) appended to the ``samples/samples.json`` table.

    Every process generates (a sharded model needs all of them); the main one writes."""

    def __init__(
        self,
        tokenizer,
        items: list[dict[str, Any]],
        every_n_steps: int,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        chat: bool = True,
        mlflow_cb: MLflowCallback | None = None,
        batch_size: int = 8,
    ):
        self.tokenizer = tokenizer
        self.items = items
        self.every = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.chat = chat
        self.mlflow_cb = mlflow_cb
        self.batch_size = batch_size

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every:
            return
        import yaml

        from finetune_engine.generate import generate_answers

        t0 = time.monotonic()
        answers = generate_answers(
            model,
            self.tokenizer,
            self.items,
            self.max_new_tokens,
            self.temperature,
            self.batch_size,
            chat=self.chat,
        )
        if not state.is_world_process_zero:
            return
        prompts = [it["messages"][-1]["content"] if self.chat else it["text"] for it in self.items]
        samples = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True)]
        text = yaml.safe_dump(samples, sort_keys=False, allow_unicode=True)
        out = Path(args.output_dir) / "samples" / f"step-{state.global_step}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        log.info(
            "step %d: %d sample generation(s) in %.1fs -> %s; first: %r",
            state.global_step,
            len(samples),
            time.monotonic() - t0,
            out,
            (answers[0] if answers else "")[:120],
        )
        if self.mlflow_cb is not None:
            self.mlflow_cb.log_samples(state.global_step, text, samples)


SIGTERM_EXIT = 143  # 128 + SIGTERM: what a process ended by SIGTERM reports


class SigtermCallback(TrainerCallback):
    """SIGTERM (the pod deleted, preempted or evicted; the local runner's kill): the step in progress
    finishes, a checkpoint is saved (and uploaded by the save hooks) and training stops; the job then
    exits with 143 (:func:`finetune_engine.recipes.common.train`) without writing final outputs, so a
    retry resumes from that checkpoint. Every rank stops at the same step (the flag is reduced over
    the process group). A second SIGTERM ends the process at once. The pod's
    terminationGracePeriodSeconds must cover one step and one checkpoint upload."""

    def __init__(self) -> None:
        self.received = False
        self.stopped = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        import signal

        if self.received:  # asked twice: no more waiting
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping (a retry resumes from it)")

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received
        dist = _process_group()
        if dist is not None:
            import torch

            device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
            value = torch.tensor([1 if flag else 0], device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = bool(value.item())
        if flag:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        import signal
        import threading

        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
