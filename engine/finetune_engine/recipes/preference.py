"""Preference optimisation on TRL 1.16, top to bottom: validate, load, train, save, report.

    finetuning dpo CONFIG    # DPOTrainer; training_args.loss_type picks the variant (sigmoid, ipo,
                               hinge, robust, ...)
    finetuning kto CONFIG    # KTOTrainer, unpaired prompt/completion/label data
    finetuning orpo CONFIG   # trl.experimental.orpo.ORPOTrainer, reference-free
    finetuning cpo CONFIG    # trl.experimental.cpo.CPOTrainer; SimPO is loss_type: simpo (cpo_alpha: 0
                               for pure SimPO)

TRL 1.16 has no SimPO loss in DPOTrainer: SimPO lives in the (experimental) CPO trainer, so it is
selected with ``finetuning cpo`` and ``training_args.loss_type: simpo``.

Reference model: with a new adapter (peft_conf LORA, ...) the adapter is the policy and the same
base with the adapter disabled is the reference, so no second model is held; with a pretrained
adapter TRL keeps a frozen copy of it as the "ref" adapter; full-parameter training keeps a frozen
copy of the starting model. ORPO and CPO/SimPO need no reference.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_engine.config import schema
from finetune_engine.config.batchsize import derive_batch_plan
from finetune_engine.recipes import common
from finetune_engine.tracking import TrackingSettings

log = logging.getLogger(__name__)

PREFERENCE_METHODS = ("dpo", "kto", "orpo", "cpo")
_REFERENCE_METHODS = ("dpo", "kto")  # the ones that compare against a reference model


def _trainer_classes(method: str):
    """(config class, trainer class) of the installed TRL for ``method``."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    if method == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    raise ValueError(f"unknown preference method {method!r}; expected one of {', '.join(PREFERENCE_METHODS)}")


def _with_prompt_limit(trainer_cls, max_prompt_length: int | None, counts: dict[str, int]):
    """``trainer_cls`` whose tokenized prompts keep their last ``max_prompt_length`` tokens
    (DPOTrainer/KTOTrainer tokenize in ``_prepare_dataset`` into ``prompt_ids``).

    TRL drops examples whose prompt alone fills ``max_length`` inside ``_prepare_dataset``; that
    filter runs here after the cut instead, so a long prompt is shortened rather than dropped.

    TRL 1.16 offers no public way to do this, so the (private) method is extended: DPOConfig and
    KTOConfig have no ``max_prompt_length`` and no ``dataset_kwargs``/``skip_prepare_dataset`` (only
    SFTConfig has), the trainers skip preparation only for vision datasets, and an already tokenized
    dataset cannot be passed (preparation always re-tokenizes the ``prompt`` text). Cutting after
    construction is no way out either: the filter has run by then, and reference log-probs
    (precompute_ref_log_probs) are computed in ``__init__`` from the uncut prompts."""
    if max_prompt_length is None:
        return trainer_cls
    from finetune_engine.data.preference import keep_prompt_end

    class PromptLimited(trainer_cls):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            unfiltered = copy.copy(args)
            unfiltered.max_length = None
            dataset = super()._prepare_dataset(dataset, processing_class, unfiltered, dataset_name)

            def cut(example):
                ids, cut_ = keep_prompt_end(example["prompt_ids"], max_prompt_length)
                return {"prompt_ids": ids, "prompt_truncated": int(cut_)}

            dataset = dataset.map(
                cut, desc=f"Keeping the last {max_prompt_length} prompt tokens ({dataset_name})"
            )
            counts[dataset_name] = counts.get(dataset_name, 0) + sum(dataset["prompt_truncated"])
            dataset = dataset.remove_columns("prompt_truncated")
            # The filter TRL would have applied (DPO: only with keep_start truncation; KTO: always).
            if args.max_length is not None and getattr(args, "truncation_mode", "keep_start") == "keep_start":
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    PromptLimited.__name__ = trainer_cls.__name__
    return PromptLimited


def run_preference(
    cfg: schema.ExperimentConfig,
    tracking: TrackingSettings,
    method: str = "dpo",
    num_preprocess_workers: int = 1,
    result_file: str | None = None,
    after_save: list[Callable[[Path, int], None]] | None = None,
) -> dict[str, Any]:
    config_cls, trainer_cls = _trainer_classes(method)  # fails fast on an unknown method
    out_dir, _, _ = common.output_paths(cfg)

    # 0. A finished run is not retrained.
    done = common.skip_if_finished(cfg, result_file)
    if done is not None:
        return done

    # 1. Data validation happens before anything heavy is loaded.
    from finetune_engine.data.preference import DATA_METHOD, check_template, to_trl

    common.validate_inputs(cfg, DATA_METHOD[method])

    import datasets
    import torch
    import trl

    from finetune_engine.checkpoints import resolve_resume
    from finetune_engine.data.load import load_data
    from finetune_engine.merge import read_meta
    from finetune_engine.modeling import (
        load_model,
        load_tokenizer,
        peft_config,
        prepare_quantized,
        prepare_tokenizer_for_inference,
    )

    seed = common.seed_everything(cfg)
    model_path = cfg.run_conf.model

    # 2. Tokenizer, under the seed's rule: no new tokens, the template SFT trained.
    tok = load_tokenizer(cfg, model_path)
    # every save (checkpoints, final, merged) writes the inference tokenizer
    prepare_tokenizer_for_inference(tok.tokenizer, tok.end_marker)
    # What SFT trained: the adapter's finetune_meta.json when continuing an adapter, else the model's.
    sources = [cfg.peft_conf.name_or_path] if isinstance(cfg.peft_conf, schema.PretrainedPeft) else []
    sft_meta, trained_from = {}, model_path
    for source in [*sources, model_path]:
        if Path(source).is_dir() and (found := read_meta(source)):
            sft_meta, trained_from = found, source
            break
    check_template(tok.template_name, tok.added_tokens, sft_meta, model_path, trained_from)
    tok.tokenizer.padding_side = "left"  # TRL's preference collators pad completions themselves

    train_records, eval_records = load_data(cfg.data_conf)
    train_rows = [to_trl(r) for r in train_records]
    eval_rows = [to_trl(r) for r in eval_records]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = derive_batch_plan(
        cfg.batchsize_conf.total_train_batch_size, cfg.batchsize_conf.max_per_device_train_batch_size, world
    )
    log.info(
        "%s batch: %d process(es) x %d per device x %d accumulation = %d",
        method,
        plan.world_size,
        plan.per_device,
        plan.accumulation,
        plan.total,
    )

    args_dict = common.training_args_dict(cfg, plan, out_dir, seed, has_eval=bool(eval_rows), method=method)
    max_prompt_length = args_dict.pop("max_prompt_length", None)
    if not torch.cuda.is_available():
        args_dict.setdefault("bf16", False)  # TRL defaults to bf16, which CPUs run slowly or not at all
    args_dict.setdefault("gradient_checkpointing", False)  # as in sft; TRL defaults to True
    args_dict.setdefault("dataset_num_proc", num_preprocess_workers if num_preprocess_workers > 1 else None)
    if method == "kto" and plan.per_device <= 1 and args_dict.get("loss_type", "kto") == "kto":
        raise ValueError(
            "kto estimates its KL term from the other completions of a device batch, so it needs a "
            f"per-device batch of at least 2 (now {plan.per_device}); raise "
            "batchsize_conf.max_per_device_train_batch_size (and "
            "total_train_batch_size), or set training_args.loss_type: apo_zero_unpaired"
        )
    try:
        training_args = config_cls(**args_dict)
    except ValueError as err:
        raise ValueError(f"training_args for {method}: {err}") from err

    # 3. Model: policy, and the reference the method needs.
    model = load_model(cfg, model_path, tok, wrap=False)
    adapter_conf = None
    if isinstance(cfg.peft_conf, schema.AdapterPeft):
        adapter_conf = peft_config(cfg, model)  # the trainer wraps; the reference is the adapter disabled
        if method in _REFERENCE_METHODS:
            model = prepare_quantized(cfg, model)
    elif isinstance(cfg.peft_conf, schema.PretrainedPeft):
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            prepare_quantized(cfg, model), cfg.peft_conf.name_or_path, is_trainable=True
        )
    ref_model = None
    if (
        method in _REFERENCE_METHODS
        and isinstance(cfg.peft_conf, schema.NoPeft)
        and not training_args.precompute_ref_log_probs
    ):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen starting point
    reference = (
        "none (reference-free)"
        if method not in _REFERENCE_METHODS
        else "the base with the adapter disabled"
        if adapter_conf is not None
        else "a frozen copy of the pretrained adapter"
        if isinstance(cfg.peft_conf, schema.PretrainedPeft)
        else "precomputed log-probs of the starting model"
        if training_args.precompute_ref_log_probs
        else "a frozen copy of the starting model"
    )
    log.info(
        "%s: loss %s, beta %s; reference: %s",
        method,
        getattr(training_args, "loss_type", method),
        training_args.beta,
        reference,
    )

    resume = resolve_resume(
        cfg.run_conf.resume_from_checkpoint,
        out_dir,
        clean_incomplete=int(os.environ.get("LOCAL_RANK", "0")) == 0,
    )
    mlflow_cb = common.start_tracking(cfg, tracking, method, out_dir)
    truncated: dict[str, int] = {}
    cls = (
        _with_prompt_limit(trainer_cls, max_prompt_length, truncated)
        if method in _REFERENCE_METHODS
        else trainer_cls
    )
    kwargs: dict[str, Any] = dict(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tok.tokenizer,
        callbacks=common.callbacks(after_save, mlflow_cb),
        peft_config=adapter_conf,
    )
    if method in _REFERENCE_METHODS:
        kwargs["ref_model"] = ref_model
    from finetune_engine.fastpath import fast_trainer_class, maybe_compile

    t_prep = time.monotonic()
    # TRL's preference losses need each token's log-prob from the full logits, so the engine's
    # lean loss does not apply; compilation, fused AdamW and prefetched batches do.
    trainer = fast_trainer_class(cls, lean=False)(**kwargs)
    trainer.compiled = maybe_compile(trainer.model, common.compile_requested(cfg))
    log.info(
        "prepared %d train / %d eval examples in %.1fs; prompts cut to max_prompt_length: %s",
        len(trainer.train_dataset),
        len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        time.monotonic() - t_prep,
        truncated or 0,
    )
    if len(trainer.train_dataset) == 0:
        prompt_cap_useless = max_prompt_length is None or max_prompt_length >= (training_args.max_length or 0)
        hint = (
            " or set training_args.max_prompt_length below it"
            if method in _REFERENCE_METHODS and prompt_cap_useless
            else ""
        )
        raise common.DataError(
            f"no training examples left after tokenization: every prompt fills training_args.max_length "
            f"(now {training_args.max_length}); raise it{hint}"
        )
    common.quiet_printer(trainer)

    def details(trainer, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "loss_type": getattr(training_args, "loss_type", None),
            "beta": training_args.beta,
            "reference": reference,
            # final_eval_loss (common) is the preference objective on the validation set
            "final_eval_metrics": {
                k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
            },  # e.g. eval_rewards/margins
            "final_train_reward_margin": common.last_logged(trainer.state, "rewards/margins"),
            "tokens_seen": int(
                getattr(trainer, "_total_train_tokens", 0) or trainer.state.num_input_tokens_seen
            ),
            "num_train_examples": len(trainer.train_dataset),
            "num_eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
            "truncated_prompts": sum(truncated.values()),
            "grown_base": None,
        }

    meta = {
        "base_model": model_path,
        "chat_template_name": sft_meta.get("chat_template_name")
        if tok.template_name == "keep-original" and sft_meta.get("chat_template_name")
        else tok.template_name,
        "added_tokens": [],
        "trained_embeddings": False,
        "peft_type": cfg.peft_conf.peft_type,
        "quantized": not isinstance(cfg.quant_conf, schema.NoQuantization),
        "end_marker": tok.end_marker,
        "grown_base": None,
        "method": method,
        "loss_type": getattr(training_args, "loss_type", None),
    }
    return common.train_and_report(
        cfg,
        trainer,
        tok,
        method=method,
        resume=resume,
        tracking=tracking,
        mlflow_cb=mlflow_cb,
        result_file=result_file,
        meta=meta,
        details=details,
        versions={"trl": trl.__version__},
    )
