"""Load the tokenizer and model an experiment asks for: template, pad token, quantization, PEFT."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_engine.config import schema
from finetune_engine.data.templates import NAMED_TEMPLATES
from finetune_engine.embeddings import fit_embeddings

log = logging.getLogger(__name__)


@dataclass
class TokenizerSetup:
    tokenizer: Any
    template_name: str
    end_marker: str | None  # the assistant end marker, trained and used as EOS at inference
    added_tokens: list[str] = field(default_factory=list)
    # unk-convert-to-eos: batches pad their inputs with EOS while the tokenizer's pad stays UNK.
    input_pad_token_id: int | None = None
    start_marker: str | None = None  # the named template's assistant start (None: keep-original)

    @property
    def collate_pad_id(self) -> int:
        """The id written into padded input positions (their labels are always ignored)."""
        return self.tokenizer.pad_token_id if self.input_pad_token_id is None else self.input_pad_token_id


def load_tokenizer(cfg: schema.ExperimentConfig, model_path: str) -> TokenizerSetup:
    from transformers import AutoTokenizer

    run = cfg.run_conf
    tokenizer = AutoTokenizer.from_pretrained(
        run.tokenizer or model_path,
        use_fast=run.use_fast_tokenizer,
        revision=run.model_args.revision,
        trust_remote_code=run.model_args.trust_remote_code,
    )
    name = cfg.data_conf.chat_template_name
    added: list[str] = []
    start_marker = None
    if name == "keep-original":
        if not tokenizer.chat_template:
            raise ValueError(
                f"data_conf.chat_template_name is keep-original but the tokenizer of {model_path} "
                "has no chat template; choose one, e.g. chat-ml"
            )
        end_marker = tokenizer.eos_token
    else:
        template = NAMED_TEMPLATES[name]
        vocab = tokenizer.get_vocab()
        added = [t for t in template.new_special_tokens if t not in vocab]
        if added:
            tokenizer.add_special_tokens({"additional_special_tokens": added})
            log.info("added %d special tokens for %s: %s", len(added), name, added)
        tokenizer.chat_template = template.jinja
        end_marker = template.end_marker(tokenizer.eos_token)
        start_marker = template.assistant_start
        if not added:
            log.info("chat template %s: no new tokens, the vocabulary stays as it is", name)
    input_pad = None
    if tokenizer.pad_token is None:
        strategy = cfg.data_conf.missing_pad_token_strategy
        source = {"bos-repurpose": "bos", "eos-repurpose": "eos"}.get(strategy, "unk")
        token = getattr(tokenizer, f"{source}_token")
        if token is None:
            raise ValueError(
                f"data_conf.missing_pad_token_strategy {strategy}: the tokenizer has no {source} "
                "token; choose another strategy"
            )
        tokenizer.pad_token = token
        log.info("pad token set to %r (%s); pads are masked by position, never by id", token, strategy)
        if strategy == "unk-convert-to-eos":
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "data_conf.missing_pad_token_strategy unk-convert-to-eos: the tokenizer has no "
                    "eos token; choose unk-repurpose"
                )
            # As in the Silogen engine: UNK is the pad token, but padded input positions hold EOS, so
            # padding looks like EOS to the model; their labels are ignored as for any pad.
            input_pad = tokenizer.eos_token_id
            log.info(
                "input-side padding written as EOS %r; the tokenizer's pad token stays %r",
                tokenizer.eos_token,
                token,
            )
    tokenizer.padding_side = cfg.data_conf.padding_side
    return TokenizerSetup(tokenizer, name, end_marker, added, input_pad, start_marker)


def _fsdp_active(cfg: schema.ExperimentConfig) -> bool:
    import os

    return bool(cfg.training_args.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in (
        "1",
        "true",
    )


def _training_dtype(cfg: schema.ExperimentConfig) -> str:
    ta = cfg.training_args
    return "bfloat16" if ta.get("bf16") else "float16" if ta.get("fp16") else "float32"


def quantization_config(cfg: schema.ExperimentConfig):
    """transformers' BitsAndBytesConfig of quant_conf (None without quantization): every key
    passes through; unset dtypes keep BitsAndBytesConfig's defaults, except the storage dtype under
    FSDP, which must be the training dtype for FSDP to shard the quantized weights."""
    q = cfg.quant_conf
    if not isinstance(q, schema.BitsAndBytesQuantization):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = q.model_dump(exclude={"quantization_type"})
    if kwargs["bnb_4bit_quant_storage"] is None and q.load_in_4bit and _fsdp_active(cfg):
        kwargs["bnb_4bit_quant_storage"] = _training_dtype(cfg)
        log.info(
            "quant_conf.bnb_4bit_quant_storage: %s, the training dtype (FSDP shards the quantized weights)",
            kwargs["bnb_4bit_quant_storage"],
        )
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if kwargs[key] is None:
            del kwargs[key]  # BitsAndBytesConfig's default (float32 compute, uint8 storage)
        else:
            kwargs[key] = getattr(torch, kwargs[key])
    return BitsAndBytesConfig(**kwargs)


# What each FlashAttention kernel needs: (its package, the GPU it trains on, transformers' check)
FLASH_NEEDS = {
    "flash_attention_2": ("flash-attn", "an NVIDIA GPU", "is_flash_attn_2_available"),
    "flash_attention_3": ("flash-attn-3", "an NVIDIA GPU", "is_flash_attn_3_available"),
    # FlashAttention 4 (CuTe DSL, a PyPI wheel): Hopper and newer; the CUDA engine images carry it
    "flash_attention_4": (
        "flash-attn-4",
        "a Hopper or newer GPU (compute capability 9.0+) with a CUDA 12.9+ driver",
        "is_flash_attn_4_available",
    ),
}


def flash_available(kind: str) -> bool:
    """Whether transformers can load ``kind`` (flash_attention_2/3/4) here: the package installed
    and a GPU present (transformers' own check, without fetching a Hub kernel); for
    flash_attention_4, a GPU it trains on (compute capability 9.0+)."""
    from transformers.utils import import_utils

    check = getattr(import_utils, FLASH_NEEDS[kind][2], None)  # older transformers lack FA4's
    if check is None or not check():
        return False
    if kind == "flash_attention_4":
        import torch

        # its CUTLASS DSL kernels need a CUDA 12.9+ driver (R575+): the CUDA 12 image runs on older ones
        return torch.cuda.get_device_capability()[0] >= 9 and cuda_driver_version() >= FA4_MIN_DRIVER
    return True


FA4_MIN_DRIVER = 12090  # CUDA 12.9, as cudaDriverGetVersion reports it


def cuda_driver_version() -> int:
    """The CUDA version the installed driver supports (12090 for 12.9), 0 when unknown."""
    import torch

    try:
        return int(torch._C._cuda_getDriverVersion())
    except (AttributeError, RuntimeError):
        return 0


def attention_implementation(requested: str | None) -> str | None:
    """The attention kernel to load with: ``requested``, or sdpa (with one warning) when it is a
    flash-attention kernel that cannot run here (its package missing, or no GPU it supports), which
    would otherwise fail the load. sdpa computes the same exact attention."""
    if requested in FLASH_NEEDS and not flash_available(requested):
        package, gpu, _check = FLASH_NEEDS[requested]
        log.warning(
            "run_conf.model_args.attn_implementation: %s needs the %s package and %s, which this "
            "machine lacks; falling back to sdpa (the same attention, without the flash kernel's "
            "speed and memory savings)",
            requested,
            package,
            gpu,
        )
        return "sdpa"
    return requested


def model_load_kwargs(cfg: schema.ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments of AutoModelForCausalLM.from_pretrained for run_conf.model_args and
    quant_conf: the declared keys, then every extra key unchanged."""
    import torch

    args = cfg.run_conf.model_args
    dtype = args.load_dtype
    kwargs: dict[str, Any] = {
        "dtype": "auto" if dtype == "auto" else getattr(torch, dtype),
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "use_safetensors": args.use_safetensors,
    }
    attn = attention_implementation(args.attn_implementation)
    if attn is None:
        from finetune_engine.fastpath import default_attention

        attn = default_attention()  # GPU: flash varlen, else flex_attention; CPU: the library's (sdpa)
        if attn:
            log.info("attention: %s (run_conf.model_args.attn_implementation picks another)", attn)
    if attn:
        kwargs["attn_implementation"] = attn
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    extra = args.extra_kwargs
    if extra:
        log.info("run_conf.model_args: passing %s to from_pretrained", ", ".join(sorted(extra)))
        kwargs.update(extra)
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def load_model(
    cfg: schema.ExperimentConfig, model_path: str, tok: TokenizerSetup, before_peft=None, wrap: bool = True
):
    """The base model, grown for new tokens (mean-resized), wrapped in PEFT when configured
    (``wrap=False``: the bare base, for trainers that apply the adapter themselves).

    ``before_peft(model)`` sees the grown base before the adapter wraps it (to save it)."""
    from transformers import AutoModelForCausalLM

    args = cfg.run_conf.model_args
    kwargs = model_load_kwargs(cfg)
    _refuse_pickle_only(model_path, args.use_safetensors)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except TypeError as err:
        extra = sorted(args.extra_kwargs)
        if extra and "unexpected keyword argument" in str(err):
            raise ValueError(
                f"run_conf.model_args: from_pretrained of {model_path} refused an argument ({err}); "
                f"the extra keys passed were {', '.join(extra)}: remove or rename the one it names"
            ) from err
        raise
    model.config.use_cache = args.use_cache
    fitted = fit_embeddings(model, tok.tokenizer, tok.added_tokens)
    if fitted:
        log.info("%s", fitted)
    model.config.pad_token_id = tok.tokenizer.pad_token_id
    if before_peft is not None:
        before_peft(model)
    if not wrap:
        return model
    return wrap_peft(cfg, model, trains_embeddings=bool(tok.added_tokens))


def _embedding_module_names(model) -> list[str]:
    names = []
    by_module = {id(m): n for n, m in model.named_modules()}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and id(module) in by_module:
            names.append(by_module[id(module)].rsplit(".", 1)[-1])
    return names


def wrap_peft(cfg: schema.ExperimentConfig, model, trains_embeddings: bool):
    peft_conf = cfg.peft_conf
    if isinstance(peft_conf, schema.NoPeft):
        return model
    from peft import PeftModel, get_peft_model

    model = prepare_quantized(cfg, model)
    if isinstance(peft_conf, schema.PretrainedPeft):
        return PeftModel.from_pretrained(model, peft_conf.name_or_path, is_trainable=True)
    config = peft_config(cfg, model, trains_embeddings)
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "adapter %s: %d trainable of %d parameters (%.2f%%)",
        peft_conf.peft_type,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def prepare_quantized(cfg: schema.ExperimentConfig, model):
    """A quantized base made trainable for an adapter (casts norms, enables input grads)."""
    if not isinstance(cfg.quant_conf, schema.BitsAndBytesQuantization):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(cfg.training_args.get("gradient_checkpointing"))
    )


def peft_config(cfg: schema.ExperimentConfig, model, trains_embeddings: bool = False):
    """The peft config of a new adapter (AdapterPeft), not yet applied."""
    from peft import get_peft_config

    peft_conf = cfg.peft_conf
    kwargs = dict(peft_conf.peft_kwargs)
    if trains_embeddings:
        # New tokens need trained embeddings: the adapter then carries full embed/lm_head copies.
        extra = [n for n in _embedding_module_names(model) if n not in (kwargs.get("modules_to_save") or [])]
        kwargs["modules_to_save"] = list(kwargs.get("modules_to_save") or []) + extra
        log.info("new tokens: training %s fully alongside the adapter", extra)
        if getattr(model.config, "tie_word_embeddings", False) and peft_conf.peft_type == "LORA":
            kwargs.setdefault("ensure_weight_tying", True)  # tied embeddings stay tied, merged too
    return get_peft_config({"peft_type": peft_conf.peft_type, "task_type": peft_conf.task_type, **kwargs})


def _refuse_pickle_only(model_path: str, use_safetensors: bool | None) -> None:
    path = Path(model_path)
    if not path.is_dir() or use_safetensors is False:
        return
    names = {p.name for p in path.iterdir()}
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if has_pickle and not has_safe:
        raise ValueError(
            f"{model_path} has only pickle weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors, or set run_conf.model_args.use_safetensors: false if you "
            "trust the source"
        )


INFERENCE_SAVE_MARK = "_finetune_engine_inference_save"


def prepare_tokenizer_for_inference(tokenizer, end_marker: str | None) -> None:
    """Make every later ``tokenizer.save_pretrained`` write the inference settings, as the Silogen
    engine does: BOS added, EOS not added, EOS = the assistant end marker. The tokenizer in memory
    keeps its training settings (they are set for the save only and restored after it), so
    checkpoints, the grown-vocabulary base, the final and the merged model all carry the inference
    tokenizer while training goes on unchanged. Preparing the same tokenizer twice is an error."""
    if hasattr(tokenizer, INFERENCE_SAVE_MARK):
        raise RuntimeError("the tokenizer is already prepared for saving in inference mode")
    settings: dict[str, Any] = {"add_bos_token": True, "add_eos_token": False}
    if end_marker:
        settings["eos_token"] = end_marker
    # bound to the instance (a copy of the tokenizer gets a wrapper bound to the copy)
    setattr(tokenizer, INFERENCE_SAVE_MARK, (tokenizer.save_pretrained, settings))
    tokenizer.save_pretrained = types.MethodType(_save_in_inference_mode, tokenizer)


def _save_in_inference_mode(self, *args, **kwargs):
    training_save, settings = getattr(self, INFERENCE_SAVE_MARK)
    log.info("saving the tokenizer with its inference settings %s", settings)
    restore = _apply_settings(self, settings)
    try:
        return training_save(*args, **kwargs)
    finally:
        restore()


def _apply_settings(tokenizer, settings: dict[str, Any]):
    """Set tokenizer attributes (in ``init_kwargs``, which the save writes, where the tokenizer
    has no such attribute); returns the function that puts every one back as it was."""
    missing = object()
    undo: list[tuple[str, bool, Any]] = []  # (name, set as attribute, value before)
    for attr, value in settings.items():
        before = getattr(tokenizer, attr, missing)
        if before is not missing:
            if before == value:
                continue
            try:
                setattr(tokenizer, attr, value)
                undo.append((attr, True, before))
                continue
            except (AttributeError, ValueError):
                pass
        undo.append((attr, False, tokenizer.init_kwargs.get(attr, missing)))
        tokenizer.init_kwargs[attr] = value

    def restore() -> None:
        for attr, as_attribute, before in reversed(undo):
            if as_attribute:
                setattr(tokenizer, attr, before)
            elif before is missing:
                tokenizer.init_kwargs.pop(attr, None)
            else:
                tokenizer.init_kwargs[attr] = before

    return restore
