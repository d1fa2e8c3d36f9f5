"""What every recipe (sft, dpo, kto, orpo, cpo) shares: inputs, training args, callbacks, final outputs.

Each recipe stays a linear script; the pieces here are the ones that must behave the same for all
methods (resume, manifests, the result JSON, the inference tokenizer, merge of the adapter).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_engine import fastpath
from finetune_engine.config import schema
from finetune_engine.manifest import verify_directory, write_manifest
from finetune_engine.tracking import TrackingSettings

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot train (e.g. nothing left after filtering)."""


def is_main_process() -> bool:
    """Global rank 0 writes outputs, results and tracking; other ranks only train."""
    return int(os.environ.get("RANK", "0")) == 0


def scaled_learning_rate(cfg: schema.ExperimentConfig, base_lr: float, total_batch: int) -> float:
    o = cfg.overrides
    ratio = total_batch / o.reference_batch_size
    factor = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[o.lr_batch_size_scaling]
    return base_lr * o.lr_multiplier * factor


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's outputs go under training_args.output_dir (the Silogen engine's layout).

    ``final``: final_checkpoint_name, the adapter of an adapter run or the model of a full run;
    ``merged``: the merged model when run_conf.merge_adapter asks for it (beside the adapter);
    ``grown_base``: sft_args.save_name_if_new_basemodel, the base with a grown vocabulary;
    ``done``: the directory whose manifest, written after result.json, marks the run finished."""

    out: Path
    final: Path
    adapter: Path | None
    merged: Path | None
    grown_base: Path

    @property
    def model(self) -> Path | None:
        """The full model a run leaves (served or evaluated alone), if any."""
        return self.merged if self.adapter is not None else self.final

    @property
    def done(self) -> Path:
        return self.merged or self.final


def merged_name(final_checkpoint_name: str) -> str:
    """checkpoint-final-adapter -> checkpoint-final (the Silogen chart's merge target), else
    <name>-merged."""
    stem = final_checkpoint_name.removesuffix("-adapter")
    return stem if stem and stem != final_checkpoint_name else f"{final_checkpoint_name}-merged"


def output_layout(cfg: schema.ExperimentConfig) -> OutputLayout:
    out = Path(cfg.training_args.get("output_dir") or schema.default_output_dir())
    final = out / cfg.run_conf.final_checkpoint_name
    is_adapter = not isinstance(cfg.peft_conf, schema.NoPeft)
    merged = out / merged_name(final.name) if is_adapter and cfg.run_conf.merge_adapter else None
    return OutputLayout(
        out, final, final if is_adapter else None, merged, out / cfg.sft_args.save_name_if_new_basemodel
    )


def output_paths(cfg: schema.ExperimentConfig) -> tuple[Path, Path, Path | None]:
    """(output_dir, final_checkpoint_name directory, adapter directory or None)."""
    lay = output_layout(cfg)
    return lay.out, lay.final, lay.adapter


def finished_result(cfg: schema.ExperimentConfig) -> dict[str, Any] | None:
    """The stored result of a run whose final output is complete, else None."""
    lay = output_layout(cfg)
    ok, _ = verify_directory(lay.done)
    stored = lay.out / "result.json"
    if ok and stored.exists():
        return json.loads(stored.read_text())
    return None


def skip_if_finished(cfg: schema.ExperimentConfig, result_file: str | None) -> dict[str, Any] | None:
    """Step 0 of a recipe: a finished run is not retrained when it resumes (resume_from_checkpoint
    auto or true); its stored result is reported again. With false, it trains again from step 0,
    as the Silogen engine does."""
    if cfg.run_conf.resume_from_checkpoint in (False, "false"):
        return None
    done = finished_result(cfg)
    if done is None:
        return None
    lay = output_layout(cfg)
    log.info("%s is complete: training already finished, nothing to do", lay.done)
    done = {**done, "status": "skipped"}
    write_result(done, lay.out, result_file, store=False)
    return done


def validate_inputs(cfg: schema.ExperimentConfig, method: str) -> None:
    """Check every dataset file for ``method``'s formats before anything heavy is loaded."""
    from finetune_engine.data.validate import validate_files, validate_text_files

    # A PRECOMPUTE_WEIGHTED_MIX dataset of sampling_weight 0 is left out, unread (as in the Silogen engine).
    paths = [
        ds.path for ds in cfg.data_conf.training_data.datasets if getattr(ds, "sampling_weight", None) != 0
    ]
    vpaths = []
    if isinstance(cfg.data_conf.validation_data, schema.ConcatenationValidation):
        vpaths = [ds.path for ds in cfg.data_conf.validation_data.datasets]
    for p in paths + vpaths:
        if "://" in p:
            raise DataError(
                f"{p}: bucket URIs are fetched by the train job "
                "(finetune-engine train-job); finetuning reads local files"
            )
    if isinstance(cfg.data_conf.training_data, schema.TextFilesData):
        validate_text_files(paths)
        if vpaths:
            validate_text_files(vpaths, where="data_conf.validation_data.datasets")
        return
    for report in validate_files(paths + vpaths, method=method):
        if report.kind == "text_file":
            raise DataError(
                f"{report.file} is plain text, not JSON Lines; plain text trains with "
                "data_conf.training_data.type: TEXT_FILES"
            )


def seed_everything(cfg: schema.ExperimentConfig) -> int:
    from transformers.trainer_utils import enable_full_determinism, set_seed

    seed = int(cfg.training_args.get("seed", 42))
    if cfg.run_conf.determinism == "full":
        enable_full_determinism(seed)
    elif cfg.run_conf.determinism == "half":
        set_seed(seed)
    return seed


# DPO defaults of the Silogen engine (its DPOConfig and the TRL version it pins) where TRL 1.x's differ.
PEER_DPO_DEFAULTS = {
    "max_length": 2048,
    "max_prompt_length": 1536,
    "f_alpha_divergence_coef": 1.0,
    "ref_model_mixup_alpha": 0.9,
    "ref_model_sync_steps": 64,
}


def report_to(value: Any, logging_dir: str | None) -> list[str]:
    """training_args.report_to for the trainer: MLflow is left out (the engine logs to MLflow itself,
    from the tracking section, --mlflow-server-uri or MLFLOW_TRACKING_URI), every other integration
    is honoured; tensorboard writes its event files to ``logging_dir``."""
    import importlib.util

    names = [] if value in (None, "none") else [value] if isinstance(value, str) else list(value)
    if "all" in names:
        from transformers.integrations import get_available_reporting_integrations

        names = [n for n in names if n != "all"] + get_available_reporting_integrations()
    names = [n for n in dict.fromkeys(names) if n != "none"]
    if "mlflow" in names:
        names.remove("mlflow")
        log.info(
            "training_args.report_to: mlflow is the engine's own logging (tracking section, "
            "--mlflow-server-uri or MLFLOW_TRACKING_URI); the trainer's MLflow callback is not added"
        )
    if "tensorboard" in names:
        if (
            importlib.util.find_spec("tensorboard") is None
            and importlib.util.find_spec("tensorboardX") is None
        ):
            raise ValueError(
                "training_args.report_to: tensorboard needs the tensorboard package, which is "
                "not installed; install finetune-engine[train] (or pip install tensorboard), "
                "or remove tensorboard from report_to"
            )
        directory = logging_dir or os.environ.get("LOGS_PATH") or "./logs"
        os.environ["TENSORBOARD_LOGGING_DIR"] = directory  # read by transformers' TensorBoardCallback
        log.info("training_args.report_to: tensorboard event files go to %s", directory)
    return names


def training_args_dict(
    cfg: schema.ExperimentConfig, plan, out_dir: Path, seed: int, has_eval: bool, method: str | None = None
) -> dict[str, Any]:
    """training_args with the engine's derived and default values; the caller builds its config class."""
    import torch

    method = method or cfg.method or "sft"
    args = dict(cfg.training_args)
    bs = cfg.batchsize_conf
    # As in the Silogen engine: the eval batch is the derived per-device train batch unless given.
    eval_batch = bs.per_device_eval_batch_size or plan.per_device
    base_lr = float(args.pop("learning_rate", 5e-5))
    logging_dir = args.pop("logging_dir", None)
    args.update(
        output_dir=str(out_dir),
        per_device_train_batch_size=plan.per_device,
        gradient_accumulation_steps=plan.accumulation,
        per_device_eval_batch_size=eval_batch,
        learning_rate=scaled_learning_rate(cfg, base_lr, plan.total),
        report_to=report_to(args.get("report_to"), logging_dir),
        seed=seed,
    )
    if isinstance(args.get("deepspeed"), dict):
        # As in the Silogen engine: an inline DeepSpeed config gets the derived batch sizes.
        args["deepspeed"] = {
            **args["deepspeed"],
            "train_micro_batch_size_per_gpu": plan.per_device,
            "train_batch_size": plan.total,
        }
    if method == "dpo":
        for key, value in PEER_DPO_DEFAULTS.items():
            args.setdefault(key, value)
    args.setdefault("logging_steps", 1)
    args.setdefault("save_strategy", "steps")
    args.setdefault("use_cpu", not torch.cuda.is_available())
    args.setdefault("disable_tqdm", not sys.stderr.isatty())  # pod logs get plain progress lines
    args.setdefault("ddp_find_unused_parameters", False)  # every trainable weight is used each step
    # CUDA: fused AdamW, pinned batches prefetched by workers; torch_compile is the engine's (per layer)
    fastpath.apply_training_defaults(args, torch.cuda.is_available())
    if cfg.run_conf.determinism == "full":
        args.setdefault("full_determinism", True)  # the Trainer re-applies it when training starts
    if has_eval:
        args.setdefault("eval_strategy", "no")
    return args


def compile_requested(cfg: schema.ExperimentConfig) -> bool:
    """training_args.torch_compile, on by default with CUDA: the engine compiles each decoder layer."""
    import torch

    value = cfg.training_args.get("torch_compile")
    return torch.cuda.is_available() if value is None else bool(value)


def build_training_args(config_cls, args: dict[str, Any], what: str = "training_args"):
    """``config_cls(**args)`` (TrainingArguments, DPOConfig...); a value it refuses becomes a
    ValueError naming the section, so the job reports it as a config error and writes nothing."""
    try:
        return config_cls(**args)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


def start_tracking(cfg: schema.ExperimentConfig, tracking: TrackingSettings, method: str, out_dir: Path):
    from finetune_engine.callbacks import MLflowCallback

    if not (tracking.enabled and is_main_process()):
        return None
    cb = MLflowCallback(tracking, cfg.model_dump(mode="json"), tags={"finetune.method": method})
    cb.start(str(out_dir))
    return cb


def callbacks(after_save: list[Callable[..., None]] | None, mlflow_cb, extra: list | None = None) -> list:
    from finetune_engine.callbacks import ManifestCallback, ProgressCallback, SigtermCallback

    # the train job's node upload rides along in after_save (see jobs/train.NodeUploader)
    node_upload = next((h for h in after_save or [] if getattr(h, "node_upload", False)), None)
    return (
        [
            SigtermCallback(),  # before ManifestCallback: it asks for the save ManifestCallback marks
            ManifestCallback([h for h in after_save or [] if h is not node_upload], node_upload),
            ProgressCallback(),
        ]
        + ([mlflow_cb] if mlflow_cb else [])
        + list(extra or [])
    )


def sample_prompts(conf: schema.SampleGenerations, chat: bool) -> list[dict[str, Any]]:
    """tracking.sample_generations prompts as generation items: {'messages'} (chat) or {'text'}."""
    texts: list[Any] = list(conf.prompts)
    if conf.prompts_file:
        path = Path(conf.prompts_file)
        if not path.is_file():
            raise DataError(f"tracking.sample_generations.prompts_file {path}: not found")
        if path.suffix == ".jsonl":
            from finetune_engine.generate import GenerateConfig, load_items

            texts += [it["messages"] for it in load_items(GenerateConfig(model="-", eval_file=str(path)))]
        else:
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = []
    for t in texts:
        if chat:
            items.append({"messages": t if isinstance(t, list) else [{"role": "user", "content": t}]})
        else:
            items.append({"text": t[-1]["content"] if isinstance(t, list) else t})
    if not items:
        raise DataError(f"tracking.sample_generations: no prompts in {conf.prompts_file}")
    return items


def sample_callback(cfg: schema.ExperimentConfig, tokenizer, mlflow_cb) -> list:
    """The sample-generation callback when tracking.sample_generations is set (else nothing)."""
    conf = cfg.tracking.sample_generations
    if conf is None:
        return []
    from finetune_engine.callbacks import SampleGenerationCallback

    chat = conf.use_chat_template
    if chat is None:
        chat = not isinstance(cfg.data_conf.training_data, schema.TextFilesData)
    items = sample_prompts(conf, chat)
    log.info(
        "sample generations: %d prompt(s) every %d steps (%s)",
        len(items),
        conf.every_n_steps,
        "chat template" if chat else "plain text",
    )
    return [
        SampleGenerationCallback(
            tokenizer,
            items,
            conf.every_n_steps,
            conf.max_new_tokens,
            conf.temperature,
            chat=chat,
            mlflow_cb=mlflow_cb,
        )
    ]


def quiet_printer(trainer) -> None:
    if trainer.args.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # ProgressCallback logs the same, with ETA and memory


def train(trainer, resume: Path | None) -> float | None:
    """``trainer.train``, resumed from ``resume`` when given; returns the mean training loss.

    A checkpoint that already holds the planned last step (a kill after its upload, before the
    final outputs) is finished from, not trained on: transformers' epoch loop checks its stop flag
    only after a step, so ``train()`` would take one step past ``max_steps``. The checkpoint's
    weights and trainer state are loaded instead and the run goes on to evaluation and saving."""
    if resume is not None:
        from transformers.trainer_callback import TrainerState

        saved = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        planned = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
        if saved.global_step >= planned:
            log.info(
                "%s already holds step %d of %d planned: finishing from it without training",
                resume.name,
                saved.global_step,
                planned,
            )
            trainer._load_from_checkpoint(str(resume))
            trainer.state = saved
            return last_logged(saved, "train_loss") or last_logged(saved, "loss")
    loss = trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
    from finetune_engine.callbacks import SIGTERM_EXIT, SigtermCallback

    if any(isinstance(cb, SigtermCallback) and cb.stopped for cb in trainer.callback_handler.callbacks):
        log.warning(
            "stopped by SIGTERM at step %d after saving its checkpoint: no final outputs; exit %d",
            trainer.state.global_step,
            SIGTERM_EXIT,
        )
        raise SystemExit(SIGTERM_EXIT)  # the job's cleanup (uploads) runs on the way out
    return loss


def log_parallelism(trainer) -> None:
    """Which parallelism really ran (DDP, FSDP, DeepSpeed): the model class shows FSDP2's wrapping."""
    acc = trainer.accelerator
    log.info(
        "distributed: %s, %d process(es), model %s",
        acc.distributed_type.value,
        acc.num_processes,
        type(trainer.model_wrapped).__name__,
    )
    asked = "FSDP" if trainer.args.fsdp else "DEEPSPEED" if trainer.args.deepspeed else None
    if asked and acc.distributed_type.value != asked:
        log.warning(
            "training_args asked for %s but accelerate ran %s (FSDP and DeepSpeed need GPUs/accelerators)",
            asked,
            acc.distributed_type.value,
        )


def _forget_manifest(directory: Path) -> None:
    """Before this engine writes into ``directory`` again: its earlier manifest (ours) no longer
    describes it."""
    from finetune_engine.manifest import MANIFEST_NAME

    (directory / MANIFEST_NAME).unlink(missing_ok=True)


def save_final(cfg: schema.ExperimentConfig, model, tok, meta: dict[str, Any]) -> dict[str, str | None]:
    """Write the final output: the adapter (adapter runs) or the model (full runs) to
    final_checkpoint_name, and the merged model beside an adapter when run_conf.merge_adapter asks;
    each with its finetune_meta.json. The manifest of ``layout.done`` is written by ``finish``,
    last, after the result; the others' here. Returns the paths written."""
    from finetune_engine.merge import META_NAME, merge_adapter, save_model

    lay = output_layout(cfg)
    for d in (lay.final, lay.merged):
        if d is not None and d.is_dir():
            _forget_manifest(d)
    save_model(model, tok.tokenizer, lay.final, tok.end_marker)
    (lay.final / META_NAME).write_text(json.dumps({**meta, "merged": False}, indent=1))
    log.info("%s saved to %s", "adapter" if lay.adapter else "model", lay.final)
    if lay.merged is not None:
        if meta.get("quantized"):
            merge_adapter(
                cfg.run_conf.model, str(lay.final), lay.merged
            )  # dequantized base, never 4-bit weights
        else:
            save_model(model.merge_and_unload(), tok.tokenizer, lay.merged, tok.end_marker)
        (lay.merged / META_NAME).write_text(json.dumps({**meta, "merged": True}, indent=1))
        write_manifest(lay.final)
        log.info("merged model saved to %s", lay.merged)
    model_dir = lay.model
    return {
        "final_checkpoint": str(model_dir) if model_dir is not None else None,
        "final_adapter": str(lay.adapter) if lay.adapter is not None else None,
    }


def finish(
    cfg: schema.ExperimentConfig,
    result: dict[str, Any],
    metrics: dict[str, Any],
    mlflow_cb,
    result_file: str | None,
) -> None:
    """Close tracking, store the result, then the manifest of the run's last output: the run
    counts as finished only from here."""
    lay = output_layout(cfg)
    if mlflow_cb is not None:
        mlflow_cb.finish({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_result(result, lay.out, result_file)
    write_manifest(lay.done)
    log.info(
        "final %s: %s%s",
        "adapter" if lay.adapter else "model",
        lay.final,
        f"; merged model: {lay.merged}" if lay.merged else "",
    )


def train_and_report(
    cfg: schema.ExperimentConfig,
    trainer,
    tok,
    *,
    method: str,
    resume: Path | None,
    tracking: TrackingSettings,
    mlflow_cb,
    result_file: str | None,
    meta: dict[str, Any],
    details: Callable[[Any, dict[str, Any]], dict[str, Any]],
    versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The end every recipe shares: train (resumed from ``resume``), evaluate when the trainer has
    an eval set, save the final outputs (``tok``: the recipe's loaded tokenizer) with ``meta`` as
    their finetune_meta.json, store the result and write the manifest that marks the run finished.

    ``details(trainer, metrics)`` gives the recipe's own result keys, called on rank 0 after
    training; the common keys (steps, losses, times, output paths, tracking, versions) are added
    here. ``versions`` names packages beyond transformers and torch. Other ranks only train and
    return a short status."""
    import torch
    import transformers

    t_train = time.monotonic()
    train_loss = train(trainer, resume)
    train_seconds = time.monotonic() - t_train
    log_parallelism(trainer)
    metrics: dict[str, Any] = {"train_loss": train_loss}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    state = trainer.state

    if not is_main_process():
        log.info("rank %s: training done; rank 0 writes the outputs", os.environ.get("RANK"))
        return {
            "status": "completed",
            "global_step": state.global_step,
            "rank": int(os.environ.get("RANK", "0")),
        }

    # Final outputs, each completed by its manifest (written last, by finish).
    own = details(trainer, metrics)
    if "ref" in (getattr(trainer.model, "peft_config", None) or {}):
        trainer.model.delete_adapter(
            "ref"
        )  # TRL's frozen copy of a pretrained adapter (dpo, kto), not an output
    saved = save_final(cfg, trainer.model, tok, meta)
    out_dir = output_layout(cfg).out
    result = {
        "status": "completed",
        "method": method,
        "global_step": state.global_step,
        "planned_steps": state.max_steps,
        "final_train_loss": last_logged(state, "loss") or train_loss,
        "train_loss": metrics.get("train_loss"),
        "final_eval_loss": metrics.get("eval_loss"),
        "train_seconds": round(train_seconds, 2),
        **own,
        "resumed_from": resume.name if resume else None,
        "output_dir": str(out_dir),
        **saved,
        "mlflow_run_id": mlflow_cb.run_id if mlflow_cb else None,
        "mlflow_tracking_uri": tracking.uri if mlflow_cb and mlflow_cb.run_id else None,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            **(versions or {}),
        },
    }
    finish(cfg, result, metrics, mlflow_cb, result_file)
    return result


def last_logged(state, key: str) -> float | None:
    for entry in reversed(state.log_history):
        if key in entry:
            return float(entry[key])
    return None


def write_result(result: dict, out_dir: Path, result_file: str | None, store: bool = True) -> None:
    text = json.dumps(result, indent=1, sort_keys=True)
    if store:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(text)
    target = result_file or os.environ.get("FINETUNE_RESULT_FILE")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)


class ListDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]
