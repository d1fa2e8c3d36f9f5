"""Supervised fine-tuning, top to bottom: validate, load, tokenize, train, save, report.

    finetuning sft CONFIG [--set key.path=value ...] [--result-file PATH]
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_engine.config import schema
from finetune_engine.config.batchsize import derive_batch_plan
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


def output_paths(cfg: schema.ExperimentConfig) -> tuple[Path, Path, Path]:
    out = Path(cfg.training_args.get("output_dir") or "output")
    final = out / cfg.run_conf.final_checkpoint_name
    return out, final, out / f"{cfg.run_conf.final_checkpoint_name}-adapter"


def finished_result(cfg: schema.ExperimentConfig) -> dict[str, Any] | None:
    """The stored result of a run whose final output is complete, else None."""
    out, final, _ = output_paths(cfg)
    ok, _ = verify_directory(final)
    stored = out / "result.json"
    if ok and stored.exists():
        return json.loads(stored.read_text())
    return None


def encode_all(records: list[dict], tokenizer, settings, workers: int) -> tuple[list[dict], Counter]:
    """Tokenize with ``workers`` processes (datasets.map); returns kept examples and drop counts."""
    from finetune_engine.data.tokenize import encode_batch

    counts: Counter = Counter()
    if not records:
        return [], counts
    if workers > 1 and len(records) >= 2000:
        import datasets

        ds = datasets.Dataset.from_dict({"record": [json.dumps(r) for r in records]})

        def _map(batch):
            enc = encode_batch([json.loads(r) for r in batch["record"]], tokenizer, settings)
            return {"encoded": [json.dumps(e) for e in enc]}

        mapped = ds.map(_map, batched=True, batch_size=500, num_proc=workers, remove_columns=["record"])
        encoded = [json.loads(e) for e in mapped["encoded"]]
    else:
        encoded = []
        for i in range(0, len(records), 1000):
            encoded.extend(encode_batch(records[i : i + 1000], tokenizer, settings))
    kept = []
    for item in encoded:
        if isinstance(item, str):
            counts[item] += 1
        else:
            if item.pop("truncated", None):
                counts["truncated"] += 1
            kept.append(item)
    return kept, counts


def run_sft(
    cfg: schema.ExperimentConfig,
    tracking: TrackingSettings,
    num_preprocess_workers: int = 1,
    result_file: str | None = None,
    after_save: list[Callable[[Path, int], None]] | None = None,
) -> dict[str, Any]:
    out_dir, final_dir, adapter_dir = output_paths(cfg)

    # 0. A finished run is not retrained.
    done = finished_result(cfg)
    if done is not None:
        log.info("%s is complete: training already finished, nothing to do", final_dir)
        done = {**done, "status": "skipped"}
        _write_result(done, out_dir, result_file, store=False)
        return done

    # 1. Data validation happens before anything heavy is loaded.
    from finetune_engine.data.validate import validate_files

    paths = [ds.path for ds in cfg.data_conf.training_data.datasets]
    if isinstance(cfg.data_conf.validation_data, schema.ConcatenationValidation):
        paths += [ds.path for ds in cfg.data_conf.validation_data.datasets]
    for p in paths:
        if "://" in p:
            raise DataError(f"{p}: bucket URIs are fetched by the train job (finetune-engine train-job); finetuning reads local files")
    validate_files(paths, method="sft")

    import torch
    import transformers
    from transformers import TrainingArguments
    from transformers.trainer_utils import enable_full_determinism, set_seed

    from finetune_engine.callbacks import ManifestCallback, MLflowCallback, ProgressCallback
    from finetune_engine.checkpoints import resolve_resume
    from finetune_engine.data.collate import PackedCollator, PaddingCollator
    from finetune_engine.data.load import load_data
    from finetune_engine.data.pack import pack_lengths
    from finetune_engine.data.tokenize import EncodeSettings
    from finetune_engine.merge import META_NAME, merge_adapter, save_model
    from finetune_engine.modeling import load_model, load_tokenizer, prepare_tokenizer_for_inference

    seed = int(cfg.training_args.get("seed", 42))
    if cfg.run_conf.determinism == "full":
        enable_full_determinism(seed)
    elif cfg.run_conf.determinism == "half":
        set_seed(seed)

    model_path = cfg.run_conf.model
    train_records, eval_records = load_data(cfg.data_conf)
    tok = load_tokenizer(cfg, model_path)
    sft = cfg.sft_args
    settings = EncodeSettings(sft.max_seq_length, sft.length_handling, sft.train_on_completions_only, tok.end_marker)
    t0 = time.monotonic()
    train_examples, train_counts = encode_all(train_records, tok.tokenizer, settings, num_preprocess_workers)
    eval_examples, eval_counts = encode_all(eval_records, tok.tokenizer, settings, num_preprocess_workers)
    log.info(
        "tokenized %d examples in %.1fs: kept %d train / %d eval; filtered as too long %d, "
        "truncated %d, without trained tokens %d",
        len(train_records) + len(eval_records), time.monotonic() - t0, len(train_examples), len(eval_examples),
        train_counts["too_long"] + eval_counts["too_long"], train_counts["truncated"] + eval_counts["truncated"],
        train_counts["no_trained_tokens"] + eval_counts["no_trained_tokens"],
    )
    if not train_examples:
        raise DataError(
            f"no training examples left after length handling ({dict(train_counts)}); raise "
            f"sft_args.max_seq_length (now {sft.max_seq_length}) or set sft_args.length_handling: truncate"
        )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = derive_batch_plan(cfg.batchsize_conf.total_train_batch_size, cfg.batchsize_conf.max_per_device_train_batch_size, world)
    log.info("batch: %d process(es) x %d per device x %d accumulation = %d", plan.world_size, plan.per_device, plan.accumulation, plan.total)

    base_dir = out_dir / f"{cfg.run_conf.final_checkpoint_name}-base"
    needs_base = bool(tok.added_tokens) and not isinstance(cfg.peft_conf, schema.NoPeft)

    def save_grown_base(base_model) -> None:
        # New tokens + adapter: the adapter needs this grown-vocabulary base to load or merge.
        if is_main_process() and needs_base and not verify_directory(base_dir)[0] and not isinstance(cfg.quant_conf, schema.BitsAndBytesQuantization):
            save_model(base_model, tok.tokenizer, base_dir)
            write_manifest(base_dir)
            log.info("grown-vocabulary base saved to %s", base_dir)

    model = load_model(cfg, model_path, tok, before_peft=save_grown_base)
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    pad_id = tok.tokenizer.pad_token_id
    if sft.packing:
        bins = pack_lengths([len(e["input_ids"]) for e in train_examples], sft.max_seq_length, seed=seed)
        train_rows: list[dict] = [{"segments": [train_examples[i] for i in b]} for b in bins]
        log.info("packing: %d examples into %d rows of <= %d tokens (%s)", len(train_examples), len(train_rows), sft.max_seq_length, "varlen positions" if attn.startswith("flash") else "block-diagonal mask")
    else:
        train_rows = train_examples
    padding = PaddingCollator(pad_id, cfg.data_conf.padding_side, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    packed = PackedCollator(pad_id, attn)

    def collate(features):
        return packed(features) if "segments" in features[0] else padding(features)

    args_dict = dict(cfg.training_args)
    base_lr = float(args_dict.pop("learning_rate", 5e-5))
    args_dict.update(
        output_dir=str(out_dir),
        per_device_train_batch_size=plan.per_device,
        gradient_accumulation_steps=plan.accumulation,
        per_device_eval_batch_size=cfg.batchsize_conf.per_device_eval_batch_size or cfg.batchsize_conf.max_per_device_train_batch_size,
        learning_rate=scaled_learning_rate(cfg, base_lr, plan.total),
        remove_unused_columns=False,
        report_to=[],
        seed=seed,
    )
    args_dict.setdefault("logging_steps", 1)
    args_dict.setdefault("save_strategy", "steps")
    args_dict.setdefault("save_steps", 50)
    args_dict.setdefault("use_cpu", not torch.cuda.is_available())
    args_dict.setdefault("disable_tqdm", not sys.stderr.isatty())
    args_dict.setdefault("ddp_find_unused_parameters", False)  # every trainable weight is used each step  # pod logs get plain progress lines
    if eval_examples:
        args_dict.setdefault("eval_strategy", "no")
    training_args = TrainingArguments(**args_dict)

    resume = resolve_resume(cfg.run_conf.resume_from_checkpoint, out_dir,
                            clean_incomplete=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    mlflow_cb = MLflowCallback(tracking, cfg.model_dump(mode="json"), tags={"finetune.method": "sft"}) if tracking.enabled and is_main_process() else None
    if mlflow_cb is not None:
        mlflow_cb.start(str(out_dir))

    trainer = _make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=_ListDataset(train_rows),
        eval_dataset=_ListDataset(eval_examples) if eval_examples else None,
        data_collator=collate,
        processing_class=tok.tokenizer,
        callbacks=[ManifestCallback(after_save), ProgressCallback()] + ([mlflow_cb] if mlflow_cb else []),
    )
    if training_args.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # ProgressCallback logs the same, with ETA and memory
    t_train = time.monotonic()
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.monotonic() - t_train
    # which parallelism really ran (DDP, FSDP, DeepSpeed): the model class shows FSDP2's wrapping
    log.info("distributed: %s, %d process(es), model %s", trainer.accelerator.distributed_type.value,
             trainer.accelerator.num_processes, type(trainer.model_wrapped).__name__)
    asked = "FSDP" if training_args.fsdp else "DEEPSPEED" if training_args.deepspeed else None
    if asked and trainer.accelerator.distributed_type.value != asked:
        log.warning("training_args asked for %s but accelerate ran %s (FSDP and DeepSpeed need GPUs/accelerators)",
                    asked, trainer.accelerator.distributed_type.value)
    metrics: dict[str, float] = {"train_loss": train_out.training_loss}
    if eval_examples:
        metrics.update(trainer.evaluate())
    state = trainer.state

    if not is_main_process():
        log.info("rank %s: training done; rank 0 writes the outputs", os.environ.get("RANK"))
        return {"status": "completed", "global_step": state.global_step, "rank": int(os.environ.get("RANK", "0"))}

    # Final outputs, each completed by its manifest (written last).
    prepare_tokenizer_for_inference(tok.tokenizer, tok.end_marker)
    is_adapter = not isinstance(cfg.peft_conf, schema.NoPeft)
    meta = {
        "base_model": model_path,
        "chat_template_name": tok.template_name,
        "added_tokens": tok.added_tokens,
        "trained_embeddings": bool(tok.added_tokens),
        "peft_type": cfg.peft_conf.peft_type,
        "quantized": not isinstance(cfg.quant_conf, schema.NoQuantization),
        "end_marker": tok.end_marker,
        "grown_base": base_dir.name if verify_directory(base_dir)[0] else None,
    }
    if is_adapter:
        save_model(trainer.model, tok.tokenizer, adapter_dir, tok.end_marker)
        (adapter_dir / META_NAME).write_text(json.dumps(meta, indent=1))
        write_manifest(adapter_dir)
        log.info("adapter saved to %s", adapter_dir)
        if cfg.run_conf.merge_adapter:
            if meta["quantized"]:
                merge_adapter(model_path, str(adapter_dir), final_dir)  # dequantized base, never 4-bit weights
            else:
                save_model(trainer.model.merge_and_unload(), tok.tokenizer, final_dir, tok.end_marker)
    else:
        save_model(trainer.model, tok.tokenizer, final_dir, tok.end_marker)
    if final_dir.exists():
        (final_dir / META_NAME).write_text(json.dumps({**meta, "merged": is_adapter}, indent=1))
    result = {
        "status": "completed",
        "method": "sft",
        "global_step": state.global_step,
        "planned_steps": state.max_steps,
        "final_train_loss": _last_logged(state, "loss"),
        "train_loss": metrics.get("train_loss"),
        "final_eval_loss": metrics.get("eval_loss"),
        "tokens_seen": int(state.num_input_tokens_seen),
        "train_seconds": round(train_seconds, 2),
        "num_train_examples": len(train_examples),
        "num_eval_examples": len(eval_examples),
        "filtered_examples": train_counts["too_long"] + eval_counts["too_long"],
        "truncated_examples": train_counts["truncated"] + eval_counts["truncated"],
        "resumed_from": resume.name if resume else None,
        "output_dir": str(out_dir),
        "final_checkpoint": str(final_dir) if final_dir.exists() else None,
        "final_adapter": str(adapter_dir) if is_adapter else None,
        "grown_base": str(base_dir) if verify_directory(base_dir)[0] else None,
        "mlflow_run_id": mlflow_cb.run_id if mlflow_cb else None,
        "mlflow_tracking_uri": tracking.uri if mlflow_cb and mlflow_cb.run_id else None,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    if mlflow_cb is not None:
        mlflow_cb.finish({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    _write_result(result, out_dir, result_file)
    if final_dir.exists():
        write_manifest(final_dir)  # last: the run counts as finished only from here
    log.info("final model: %s", final_dir if final_dir.exists() else adapter_dir)
    return result


def _last_logged(state, key: str) -> float | None:
    for entry in reversed(state.log_history):
        if key in entry:
            return float(entry[key])
    return None


def _write_result(result: dict, out_dir: Path, result_file: str | None, store: bool = True) -> None:
    text = json.dumps(result, indent=1, sort_keys=True)
    if store:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(text)
    target = result_file or os.environ.get("FINETUNE_RESULT_FILE")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)


class _ListDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _make_trainer_class():
    from transformers import Trainer

    class TokenCountingTrainer(Trainer):
        """Counts real (non-pad) training tokens into ``state.num_input_tokens_seen``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)
            if model.training and real is not None:
                self.state.num_input_tokens_seen += int(real)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return TokenCountingTrainer
