"""Supervised fine-tuning, top to bottom: validate, load, tokenize, train, save, report.

finetuning sft CONFIG [--set key.path=value ...] [--result-file PATH]
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_engine.config import schema
from finetune_engine.config.batchsize import derive_batch_plan
from finetune_engine.manifest import verify_directory, write_manifest
from finetune_engine.recipes import common
from finetune_engine.recipes.common import (  # noqa: F401  (re-exported: older imports use sft.*)
    DataError,
    finished_result,
    is_main_process,
    output_paths,
    scaled_learning_rate,
)
from finetune_engine.tracking import TrackingSettings

log = logging.getLogger(__name__)


def encode_all(records: list[dict], tokenizer, settings, workers: int) -> tuple[list[dict], Counter]:
    """Tokenize with ``workers`` processes; returns kept examples and drop counts.

    Workers are forked with the tokenizer already in memory (nothing is pickled but the records
    and the token ids), in chunks of 1000, order preserved."""
    from finetune_engine.data.tokenize import encode_batch
    from finetune_engine.data.workers import forked_map

    counts: Counter = Counter()
    if not records:
        return [], counts
    chunks = [records[i : i + 1000] for i in range(0, len(records), 1000)]
    encoded = [
        item for part in forked_map(encode_batch, chunks, workers, tokenizer, settings) for item in part
    ]
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
    extra_callbacks: list | None = None,
) -> dict[str, Any]:
    """``extra_callbacks``: more TrainerCallbacks (e.g. a benchmark's step timer)."""
    out_dir, _, _ = output_paths(cfg)

    # 0. A finished run is not retrained.
    done = common.skip_if_finished(cfg, result_file)
    if done is not None:
        return done

    # 1. Data validation happens before anything heavy is loaded.
    common.validate_inputs(cfg, "sft")

    import torch
    from transformers import Trainer, TrainingArguments

    from finetune_engine.checkpoints import resolve_resume
    from finetune_engine.data.collate import PackedCollator, PaddingCollator
    from finetune_engine.data.load import load_data
    from finetune_engine.data.pack import pack_lengths
    from finetune_engine.data.tokenize import EncodeSettings
    from finetune_engine.fastpath import fast_trainer_class, maybe_compile
    from finetune_engine.merge import save_model
    from finetune_engine.modeling import load_model, load_tokenizer, prepare_tokenizer_for_inference

    seed = common.seed_everything(cfg)
    model_path = cfg.run_conf.model
    tok = load_tokenizer(cfg, model_path)
    # every save (checkpoints, grown base, final, merged) writes the inference tokenizer
    prepare_tokenizer_for_inference(tok.tokenizer, tok.end_marker)
    sft = cfg.sft_args
    text_stats: dict[str, Any] | None = None
    train_counts: Counter = Counter()
    eval_counts: Counter = Counter()
    t0 = time.monotonic()
    if isinstance(cfg.data_conf.training_data, schema.TextFilesData):
        # Continued pretraining: windows of a token stream, all tokens trained (already full rows).
        from finetune_engine.data.text_corpus import load_text_data

        train_examples, eval_windows, text_stats = load_text_data(
            cfg.data_conf, tok.tokenizer, sft.max_seq_length, num_preprocess_workers
        )
        eval_examples = eval_windows if eval_windows is not None else []
        if sft.packing:
            log.warning("sft_args.packing is ignored for TEXT_FILES: windows are already full rows")
    else:
        train_records, eval_records = load_data(cfg.data_conf)
        settings = EncodeSettings.for_sft(sft, tok.end_marker, tok.start_marker)
        train_examples, train_counts = encode_all(
            train_records, tok.tokenizer, settings, num_preprocess_workers
        )
        eval_examples, eval_counts = encode_all(eval_records, tok.tokenizer, settings, num_preprocess_workers)
        log.info(
            "tokenized %d examples in %.1fs: kept %d train / %d eval; filtered as too long %d, "
            "truncated %d, without trained tokens %d",
            len(train_records) + len(eval_records),
            time.monotonic() - t0,
            len(train_examples),
            len(eval_examples),
            train_counts["too_long"] + eval_counts["too_long"],
            train_counts["truncated"] + eval_counts["truncated"],
            train_counts["no_trained_tokens"] + eval_counts["no_trained_tokens"],
        )
    if not len(train_examples):
        if text_stats is not None:
            raise DataError(
                "no training windows from data_conf.training_data "
                f"({text_stats}); add text or lower validation_data.ratio"
            )
        raise DataError(
            f"no training examples left after length handling ({dict(train_counts)}); raise "
            f"sft_args.max_seq_length (now {sft.max_seq_length}) or set sft_args.length_handling: truncate"
        )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = cfg.batchsize_conf.total_train_batch_size
    auto_batch = cfg.batchsize_conf.max_per_device_train_batch_size == "auto"
    # Checked before the model loads (divisibility); with auto, derived again after probing.
    plan = derive_batch_plan(
        total, 1 if auto_batch else cfg.batchsize_conf.max_per_device_train_batch_size, world
    )

    # TrainingArguments are built before the model loads: a value they refuse stops the run before
    # anything is written (the grown base is saved while the model loads). Auto batch builds them
    # again below, with the probed batch.
    args_dict = common.training_args_dict(cfg, plan, out_dir, seed, has_eval=bool(len(eval_examples)))
    args_dict["remove_unused_columns"] = False
    training_args = common.build_training_args(TrainingArguments, args_dict)

    base_dir = common.output_layout(cfg).grown_base  # sft_args.save_name_if_new_basemodel
    needs_base = bool(tok.added_tokens) and not isinstance(cfg.peft_conf, schema.NoPeft)

    def save_grown_base(base_model) -> None:
        # New tokens + adapter: the adapter needs this grown-vocabulary base to load or merge.
        if (
            is_main_process()
            and needs_base
            and not verify_directory(base_dir)[0]
            and not isinstance(cfg.quant_conf, schema.BitsAndBytesQuantization)
        ):
            save_model(base_model, tok.tokenizer, base_dir)
            write_manifest(base_dir)
            log.info("grown-vocabulary base saved to %s", base_dir)

    model = load_model(cfg, model_path, tok, before_peft=save_grown_base)
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    pad_id = tok.collate_pad_id
    if sft.packing and text_stats is None:
        bins = pack_lengths([len(e["input_ids"]) for e in train_examples], sft.max_seq_length, seed=seed)
        train_rows: list[dict] = [{"segments": [train_examples[i] for i in b]} for b in bins]
        log.info(
            "packing: %d examples into %d rows of <= %d tokens (%s)",
            len(train_examples),
            len(train_rows),
            sft.max_seq_length,
            "varlen positions" if attn.startswith("flash") else "block-diagonal mask",
        )
    else:
        train_rows = train_examples
    padding = PaddingCollator(
        pad_id, cfg.data_conf.padding_side, pad_to_multiple_of=8 if torch.cuda.is_available() else None
    )
    # On a GPU packed rows are always max_seq_length wide: one shape, compiled once.
    packed = PackedCollator(
        pad_id, attn, pad_to_multiple_of=sft.max_seq_length if torch.cuda.is_available() else None
    )

    def collate(features):
        return packed(features) if "segments" in features[0] else padding(features)

    if auto_batch:
        from finetune_engine.autobatch import probe_per_device_batch

        if world > 1:
            from accelerate import PartialState

            PartialState()  # the process group, so every rank takes the smallest probed batch
        fitted = probe_per_device_batch(model, train_rows, collate, cfg.training_args, upper=total // world)
        plan = derive_batch_plan(total, fitted, world)
    log.info(
        "batch: %d process(es) x %d per device x %d accumulation = %d%s",
        plan.world_size,
        plan.per_device,
        plan.accumulation,
        plan.total,
        f" (auto: {fitted} fit per device)" if auto_batch else "",
    )

    if auto_batch:
        args_dict = common.training_args_dict(cfg, plan, out_dir, seed, has_eval=bool(len(eval_examples)))
        args_dict["remove_unused_columns"] = False
        training_args = common.build_training_args(TrainingArguments, args_dict)

    resume = resolve_resume(
        cfg.run_conf.resume_from_checkpoint,
        out_dir,
        clean_incomplete=int(os.environ.get("LOCAL_RANK", "0")) == 0,
    )
    mlflow_cb = common.start_tracking(cfg, tracking, "sft", out_dir)

    compiled = maybe_compile(model, common.compile_requested(cfg))
    trainer = fast_trainer_class(Trainer)(
        model=model,
        args=training_args,
        train_dataset=train_rows if text_stats is not None else common.ListDataset(train_rows),
        eval_dataset=(eval_examples if text_stats is not None else common.ListDataset(eval_examples))
        if len(eval_examples)
        else None,
        data_collator=collate,
        processing_class=tok.tokenizer,
        callbacks=common.callbacks(
            after_save,
            mlflow_cb,
            common.sample_callback(cfg, tok.tokenizer, mlflow_cb) + list(extra_callbacks or []),
        ),
    )
    trainer.compiled = compiled
    common.quiet_printer(trainer)

    def details(trainer, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "num_train_examples": len(train_examples),
            "num_eval_examples": len(eval_examples),
            "filtered_examples": train_counts["too_long"] + eval_counts["too_long"],
            "truncated_examples": train_counts["truncated"] + eval_counts["truncated"],
            "per_device_train_batch_size": plan.per_device,
            "gradient_accumulation_steps": plan.accumulation,
            "learning_rate": training_args.learning_rate,
            "text_data": text_stats,
            "grown_base": str(base_dir) if verify_directory(base_dir)[0] else None,
        }

    meta = {
        "base_model": model_path,
        "chat_template_name": tok.template_name,
        "added_tokens": tok.added_tokens,
        "trained_embeddings": bool(tok.added_tokens),
        "peft_type": cfg.peft_conf.peft_type,
        "quantized": not isinstance(cfg.quant_conf, schema.NoQuantization),
        "end_marker": tok.end_marker,
        "grown_base": base_dir.name if verify_directory(base_dir)[0] else None,
        "method": "sft",
    }
    return common.train_and_report(
        cfg,
        trainer,
        tok,
        method="sft",
        resume=resume,
        tracking=tracking,
        mlflow_cb=mlflow_cb,
        result_file=result_file,
        meta=meta,
        details=details,
    )
