"""The experiment schema: one YAML file per fine-tuning experiment.

The sections and keys follow the Silogen engine's interface. Everything is strict: an unknown
key is an error naming its place. Help text lives once, in each field's description; the
reference doc (docs/config-reference.md) is generated from it.

This module imports no torch and no transformers, so Airflow can validate a config before any
pod starts.
"""

from __future__ import annotations

import difflib
import enum
import functools
import json
import logging
import math
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from finetune_engine.config.training_args import (
    DERIVED_TRAINING_ARGS,
    METHODS,
    check_training_args,
    non_finite,
)

_log = logging.getLogger(__name__)


class _Strict(BaseModel):
    # NaN and infinity are refused in every float field: no setting here means anything with them.
    model_config = ConfigDict(
        extra="forbid", validate_default=True, use_enum_values=True, allow_inf_nan=False
    )


def plain_dir_name(v: str) -> str:
    if not v or "/" in v or "\\" in v or v in (".", ".."):
        raise ValueError(f"must be a plain directory name, got {v!r}")
    return v


def default_output_dir() -> str:
    """training_args.output_dir when the config leaves it out: $CHECKPOINTS_PATH, else
    ./checkpoints (as the Silogen engine, whose chart syncs that directory to the bucket)."""
    import os

    return os.environ.get("CHECKPOINTS_PATH") or "checkpoints"


# ---------------------------------------------------------------------------------------------
# data_conf
# ---------------------------------------------------------------------------------------------


# The record type of each method in the Silogen engine's data_type key (kto has none there).
DATA_TYPE_BY_METHOD = {
    "sft": "ChatConversation",
    "dpo": "DirectPreference",
    "orpo": "DirectPreference",
    "cpo": "DirectPreference",
}


def _data_type_field() -> Any:
    return Field(
        default=None,
        description="The Silogen engine's record type (ChatConversation for sft, DirectPreference for "
        "dpo). Accepted for compatibility; as there, the method decides the record type: a "
        "different value is ignored, with a warning.",
    )


def _check_data_type(v: str | None, info: ValidationInfo) -> str | None:
    method = (info.context or {}).get("method")
    expected = DATA_TYPE_BY_METHOD.get(method) if method else None
    if v is not None and v != expected and method:
        _log.warning(
            "data_conf (type %s): data_type %r does not match method %s; the record type follows "
            "the method (%s)",
            info.data.get("type"),
            v,
            method,
            expected or "its own formats",
        )
    return v


class DatasetRef(_Strict):
    path: str = Field(
        description="Data file: JSON Lines or one JSON array of rows; a local path, a bucket URI "
        "(s3://bucket/key) or bucket/key.",
    )
    sampling_weight: float | None = Field(
        default=None,
        ge=0,
        description="PRECOMPUTE_WEIGHTED_MIX only: the relative probability of drawing the next "
        "example from this dataset; unset means 1.0; 0 leaves the dataset out.",
    )


class ConcatenationData(_Strict):
    type: Literal["CONCATENATION"] = Field(description="Use every example of every dataset once.")
    datasets: list[DatasetRef] = Field(min_length=1, description="Datasets to concatenate.")
    data_type: str | None = _data_type_field()

    _data_type = field_validator("data_type")(_check_data_type)


class WeightedMixData(_Strict):
    type: Literal["PRECOMPUTE_WEIGHTED_MIX"] = Field(
        description="Interleave the datasets as the Silogen engine does (datasets' interleave_datasets, "
        "stopping strategy all_exhausted): each next example comes from a dataset drawn with "
        "probability sampling_weight / sum of weights, a dataset starts over when it runs out, and "
        "the mix ends when every dataset has been seen whole, so small weights make the mix large. "
        "When every weight is 1.0 (the default) the datasets alternate exactly (round robin) until the "
        "longest is exhausted. The order follows seed, example for example the same as the Silogen "
        "engine's."
    )
    datasets: list[DatasetRef] = Field(
        min_length=1, description="Datasets, each with an optional sampling_weight (default 1.0)."
    )
    seed: int = Field(default=19851243, description="Seed of the interleaving draws.")
    data_type: str | None = _data_type_field()

    _data_type = field_validator("data_type")(_check_data_type)

    @model_validator(mode="after")
    def _some_weight(self) -> WeightedMixData:
        if all(ds.sampling_weight == 0 for ds in self.datasets):
            raise ValueError(
                "every dataset has sampling_weight 0, so nothing would be trained; give at least one "
                "dataset a positive weight (unset means 1.0)"
            )
        return self


class TextFileRef(_Strict):
    path: str = Field(
        description="A .txt file, or a directory whose .txt files (recursively, in sorted order) "
        "are used. Local path or bucket URI of one file.",
    )


class TextFilesData(_Strict):
    type: Literal["TEXT_FILES"] = Field(
        description="Continued pretraining on plain text: each .txt file is one document, "
        "tokenized into fixed context windows with the end-of-text token after every document; "
        "every token is trained. validation_data AUTO_SPLIT holds out a ratio of the windows; "
        "CONCATENATION takes .txt files too."
    )
    datasets: list[TextFileRef] = Field(min_length=1, description="Text files and directories.")
    context_length: int | None = Field(
        default=None,
        gt=8,
        description="Tokens per window; defaults to sft_args.max_seq_length (may not exceed it).",
    )
    boundary: Literal["document", "paragraph", "line", "none"] = Field(
        default="paragraph",
        description="The finest boundary a window may end at instead of a hard cut: a full window "
        "ends at the best boundary (document > paragraph (blank line) > line) within its last "
        "max_boundary_waste, and the rest starts the next window. none: cut every context_length "
        "tokens.",
    )
    max_boundary_waste: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Largest fraction of a window left as padding to end it at a boundary.",
    )
    eot_token: str | None = Field(
        default=None,
        description="Token written after each document; defaults to the tokenizer's EOS token.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where tokenized windows are cached, keyed by the sha256 of the files' "
        "contents, the tokenizer and these settings (a second run skips tokenization); defaults "
        "to $FINETUNE_CACHE_DIR or ~/.cache/finetune-engine/text-windows.",
    )


TrainingData = Annotated[ConcatenationData | WeightedMixData | TextFilesData, Field(discriminator="type")]


class AutoSplitValidation(_Strict):
    type: Literal["AUTO_SPLIT"] = Field(
        description="Hold out a random part of the training data, as the Silogen engine does "
        "(datasets' train_test_split): ceil(ratio x examples) held out, chosen by a permutation "
        "seeded with seed."
    )
    ratio: float = Field(default=0.2, gt=0, lt=1, description="Fraction of training examples held out.")
    seed: int = Field(default=1289525893, description="Seed of the split (the Silogen engine's default).")
    data_type: str | None = _data_type_field()

    _data_type = field_validator("data_type")(_check_data_type)


class ConcatenationValidation(_Strict):
    type: Literal["CONCATENATION"] = Field(description="Separate validation datasets.")
    datasets: list[DatasetRef] = Field(min_length=1, description="Validation datasets.")
    data_type: str | None = _data_type_field()

    _data_type = field_validator("data_type")(_check_data_type)


class NoValidation(_Strict):
    type: Literal["NONE"] = Field(description="No validation; no eval loss is reported.")
    data_type: str | None = _data_type_field()

    _data_type = field_validator("data_type")(_check_data_type)


ValidationData = Annotated[
    AutoSplitValidation | ConcatenationValidation | NoValidation,
    Field(discriminator="type"),
]


class ChatTemplateName(enum.StrEnum):
    mistral_with_system = "mistral-with-system"
    chat_ml = "chat-ml"
    poro = "poro"
    keep_original = "keep-original"
    simplified_llama31 = "simplified-llama31"
    llama_3 = "llama-3"


class PadTokenStrategy(enum.StrEnum):
    bos_repurpose = "bos-repurpose"
    eos_repurpose = "eos-repurpose"
    unk_repurpose = "unk-repurpose"
    unk_convert_to_eos = "unk-convert-to-eos"


class DataConf(_Strict):
    training_data: TrainingData = Field(description="Training datasets and how they combine.")
    validation_data: ValidationData = Field(
        default_factory=lambda: AutoSplitValidation(type="AUTO_SPLIT"),
        description="Where the validation examples come from.",
    )
    chat_template_name: ChatTemplateName = Field(
        default=ChatTemplateName.mistral_with_system,
        description="The chat format (the Silogen engine's names, text and default). "
        "mistral-with-system: [INST] ... [/INST] with a <<SYS>> block, adds no tokens; chat-ml: "
        "adds <|im_start|> and <|im_end|> when the tokenizer lacks them; poro: adds <|user|> and "
        "<|assistant|>; simplified-llama31 and llama-3: Llama 3 headers (simplified-llama31 trims "
        "contents), add <|start_header_id|>, <|end_header_id|>, <|eot_id|> when missing; "
        "keep-original: the tokenizer's own template. New tokens grow the vocabulary (the "
        "embeddings are then trained and saved).",
    )
    padding_side: Literal["left", "right"] = Field(
        default="right", description="Padding side in training batches."
    )
    missing_pad_token_strategy: PadTokenStrategy = Field(
        default=PadTokenStrategy.bos_repurpose,
        description="What becomes the pad token when the tokenizer has none: bos-repurpose, "
        "eos-repurpose or unk-repurpose use that token; unk-convert-to-eos makes the unk token the "
        "pad token but writes EOS into padded input positions, so padding looks like EOS to the "
        "model (labels of pads are ignored either way). A pad token equal "
        "to the trained end-of-turn token is never masked out of the loss.",
    )


# ---------------------------------------------------------------------------------------------
# batchsize_conf
# ---------------------------------------------------------------------------------------------


class BatchsizeConf(_Strict):
    total_train_batch_size: int = Field(
        gt=0,
        description="Effective batch size: processes x per-device batch x accumulation steps.",
    )
    max_per_device_train_batch_size: int | Literal["auto"] = Field(
        default=1,
        description="Largest batch one device holds; per-device batch is set as high as allowed. "
        "auto (or -1, sft only): probe the largest batch of the longest training rows that fits "
        "in memory (doubling, then binary search) and derive accumulation from it.",
    )
    per_device_eval_batch_size: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Eval batch per device; defaults to max_per_device_train_batch_size "
            "(with auto: the probed per-device batch)."
        ),
    )

    @field_validator("max_per_device_train_batch_size", mode="before")
    @classmethod
    def _auto_or_positive(cls, v: Any) -> Any:
        if v == -1 and not isinstance(v, bool):
            return "auto"  # the CoreWeave finetuner's batch_size: -1
        if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
            raise ValueError(f"must be a positive integer, auto or -1, got {v}")
        return v


# ---------------------------------------------------------------------------------------------
# peft_conf
# ---------------------------------------------------------------------------------------------


class NoPeft(_Strict):
    peft_type: Literal["NO_PEFT"] = Field(description="Full-parameter training.")


class PretrainedPeft(_Strict):
    peft_type: Literal["PRETRAINED_PEFT"] = Field(description="Continue training an existing adapter.")
    name_or_path: str = Field(description="Path (or bucket URI) of the adapter to continue.")


# The PEFT types of the peft library, by name. Kept as names so validation needs no peft import.
PEFT_TYPES = (
    "LORA",
    "LOHA",
    "LOKR",
    "ADALORA",
    "IA3",
    "OFT",
    "BOFT",
    "VERA",
    "FOURIERFT",
    "HRA",
    "BONE",
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
)


class AdapterPeft(_Strict):
    peft_type: Literal[PEFT_TYPES] = Field(  # type: ignore[valid-type]
        description="A peft library adapter type (LORA for LoRA, DoRA and rsLoRA)."
    )
    task_type: Literal["CAUSAL_LM"] = Field(default="CAUSAL_LM", description="PEFT task type.")
    peft_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the peft config class, e.g. r, lora_alpha, "
        "lora_dropout, target_modules (a list or 'all-linear'), use_dora, use_rslora. A key that is "
        "not a field of that class is an error; r and lora_alpha must be positive, lora_dropout in "
        "[0, 1).",
    )

    @field_validator("peft_kwargs")
    @classmethod
    def _check_kwargs(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "task_type" in v or "peft_type" in v:
            raise ValueError("set task_type/peft_type beside peft_kwargs, not inside it")
        peft_type = info.data.get("peft_type")
        problems = _peft_key_problems(peft_type, v) + _lora_value_problems(v)
        bad = [k for k, value in v.items() if non_finite(value)]
        problems += [
            f"{k} {v[k]!r} is not a usable value (NaN or infinity); give a finite number" for k in bad
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return v


@functools.cache
def peft_fields() -> dict[str, Any]:
    """{peft_type: {'class': name, 'fields': [...]} or None}: the keyword arguments of each peft config
    class, generated from the installed peft (``python -m finetune_engine.config.generate``)."""
    text = resources.files("finetune_engine.config").joinpath("peft_fields.json").read_text()
    return json.loads(text)


def _peft_key_problems(peft_type: str | None, kwargs: dict[str, Any]) -> list[str]:
    catalog = peft_fields()
    if peft_type not in catalog["fields"]:
        return []
    entry = catalog["fields"][peft_type]
    version = catalog["generated_from"]["peft"]
    if entry is None:
        return [f"peft_type {peft_type} is not provided by peft {version}, which the engine trains with"]
    known = entry["fields"]
    out = []
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{key}: not an argument of peft's {entry['class']}{hint}")
    return out


def _lora_value_problems(v: dict[str, Any]) -> list[str]:
    out = []
    tm = v.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear" and " " in tm.strip():
        # The seeds shipped 'q_proj vproj' once and silently trained one module.
        out.append(
            f"target_modules {tm!r} looks like several names in one string; "
            "write a YAML list, e.g. [q_proj, v_proj], or 'all-linear'"
        )
    r = v.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        out.append(f"r must be a positive integer, got {r!r}")
    alpha = v.get("lora_alpha")
    if alpha is not None and (not _number(alpha) or alpha <= 0):
        out.append(
            f"lora_alpha must be a positive number (the adapter's scale is lora_alpha / r; "
            f"commonly 2 x r), got {alpha!r}"
        )
    dropout = v.get("lora_dropout")
    if dropout is not None and (not _number(dropout) or not 0 <= dropout < 1):
        out.append(f"lora_dropout must be a probability in [0, 1) (e.g. 0.05, 0 for none), got {dropout!r}")
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


PeftConf = Annotated[NoPeft | PretrainedPeft | AdapterPeft, Field(discriminator="peft_type")]


# ---------------------------------------------------------------------------------------------
# quant_conf
# ---------------------------------------------------------------------------------------------


class NoQuantization(_Strict):
    quantization_type: Literal["no-quantization"] = Field(description="Load weights as they are.")


class BitsAndBytesQuantization(_Strict):
    quantization_type: Literal["bits-and-bytes"] = Field(
        description="Quantize the base model with bitsandbytes (QLoRA when combined with LoRA). "
        "The keys and defaults are transformers' BitsAndBytesConfig's, as in the Silogen engine."
    )
    load_in_4bit: bool = Field(default=False, description="4-bit weights.")
    load_in_8bit: bool = Field(default=False, description="8-bit weights.")
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None,
        description="Compute dtype of 4-bit layers; null: BitsAndBytesConfig's default, float32. "
        "bfloat16 is faster on GPUs that have it.",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        default="fp4", description="4-bit type (fp4 is BitsAndBytesConfig's default; QLoRA uses nf4)."
    )
    bnb_4bit_use_double_quant: bool = Field(default=False, description="Quantize the constants.")
    bnb_4bit_quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] | None = Field(
        default=None,
        description="Storage dtype of the packed weights; null: uint8, except under FSDP, where it is "
        "the training dtype (bfloat16 with bf16, float16 with fp16, else float32) so FSDP can shard it.",
    )
    llm_int8_threshold: float = Field(default=6.0, description="8-bit outlier threshold.")
    llm_int8_skip_modules: list[str] | None = Field(default=None, description="Modules kept unquantized.")
    llm_int8_enable_fp32_cpu_offload: bool = Field(
        default=False, description="Keep modules a device_map puts on the CPU in float32 (8-bit)."
    )
    llm_int8_has_fp16_weight: bool = Field(
        default=False, description="8-bit: keep fp16 main weights (for training without an adapter)."
    )

    @model_validator(mode="after")
    def _one_width(self) -> BitsAndBytesQuantization:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true; choose one")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("bits-and-bytes needs load_in_4bit: true or load_in_8bit: true")
        return self


QuantConf = Annotated[NoQuantization | BitsAndBytesQuantization, Field(discriminator="quantization_type")]


# ---------------------------------------------------------------------------------------------
# run_conf
# ---------------------------------------------------------------------------------------------


DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")

# from_pretrained keyword arguments that may not pass through run_conf.model_args, each with the fix.
_REFUSED_MODEL_ARGS = {
    "silogen_extra_args": "reserved; write the from_pretrained arguments directly in model_args",
    "quantization_config": "set quant_conf instead",
    "pretrained_model_name_or_path": "set run_conf.model instead",
}


class ModelArgs(_Strict):
    """Keyword arguments of AutoModelForCausalLM.from_pretrained. As in the Silogen engine, keys
    not declared here pass through to from_pretrained unchanged (e.g. max_memory, subfolder,
    variant, cache_dir, local_files_only)."""

    model_config = ConfigDict(extra="allow", validate_default=True, use_enum_values=True, allow_inf_nan=False)

    dtype: Literal[DTYPES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Weights dtype when loading the model (transformers 5's name); null: auto "
        "(the checkpoint's dtype).",
    )
    torch_dtype: Literal[DTYPES] | None = Field(  # type: ignore[valid-type]
        default=None, description="The earlier name of dtype; give one of the two."
    )
    attn_implementation: str | None = Field(
        default=None,
        description="Attention kernel: eager, sdpa, flex_attention, flash_attention_2, flash_attention_3, "
        "flash_attention_4 (Hopper and newer; in the CUDA engine images) or a Hub kernel "
        "(namespace/repo[@revision][:kernel]). Default on a GPU: flash_attention_3 or 2 when "
        "installed, else flex_attention; on the CPU, sdpa. A flash kernel that cannot run here (its "
        "package missing, or the GPU too old) falls back to sdpa with a warning.",
    )
    use_cache: bool = Field(default=False, description="KV cache (off in training).")
    device_map: str | int | dict[str, Any] | None = Field(
        default=None, description="Device map for loading (leave unset for multi-GPU training)."
    )
    revision: str | None = Field(default=None, description="Model revision (Hub models).")
    trust_remote_code: bool = Field(
        default=False,
        description="Run code shipped with the model. Needs a pinned revision (a commit sha).",
    )
    low_cpu_mem_usage: bool = Field(
        default=True, description="Accepted for older configs; transformers 5 always loads shard by shard."
    )
    use_safetensors: bool | None = Field(
        default=True,
        description="Load only safetensors weights. Set false to allow pickle (.bin) weights, "
        "which can run code when loaded.",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, v: str | None) -> str | None:
        known = (
            "eager",
            "sdpa",
            "flash_attention_2",
            "flash_attention_3",
            "flash_attention_4",
            "flex_attention",
        )
        if v is None or v in known or "/" in v:
            return v
        raise ValueError(
            f"attn_implementation {v!r} is not one of {', '.join(known)} or a Hub kernel (namespace/repo)"
        )

    @model_validator(mode="after")
    def _checks(self) -> ModelArgs:
        if self.dtype is not None and self.torch_dtype is not None:
            raise ValueError(
                f"dtype ({self.dtype}) and torch_dtype ({self.torch_dtype}) are both given; they are "
                "the same setting (torch_dtype is its earlier name): keep dtype"
            )
        if self.trust_remote_code and not (
            self.revision and len(self.revision) == 40 and all(c in "0123456789abcdef" for c in self.revision)
        ):
            raise ValueError(
                "trust_remote_code: true runs code from the model repository; pin "
                "run_conf.model_args.revision to a 40-character commit sha"
            )
        for key, value in (self.model_extra or {}).items():
            if key in _REFUSED_MODEL_ARGS:
                raise ValueError(f"{key}: {_REFUSED_MODEL_ARGS[key]}")
            if key == "token" and isinstance(value, str):
                raise ValueError(
                    "token: secrets never go in a config; set HF_TOKEN in the environment (a "
                    "Kubernetes secret) instead"
                )
            if key in ("from_tf", "from_flax") and value:
                raise ValueError(f"{key}: true is not supported: transformers 5 loads PyTorch weights only")
            if key == "output_loading_info" and value:
                raise ValueError("output_loading_info: true is not supported in training; remove it")
        return self

    @property
    def load_dtype(self) -> str:
        """The dtype to load with, from dtype or its earlier name torch_dtype (default auto)."""
        return self.dtype or self.torch_dtype or "auto"

    @property
    def extra_kwargs(self) -> dict[str, Any]:
        """The keys given beyond the declared ones: passed to from_pretrained unchanged."""
        return dict(self.model_extra or {})


class RunConf(_Strict):
    model: str = Field(
        default="/local_resources/basemodel",
        description="Base model: a local directory, a bucket URI, or a Hub id (default: the "
        "Silogen engine's download location).",
    )
    model_args: ModelArgs = Field(default_factory=ModelArgs, description="Model loading options.")
    tokenizer: str | None = Field(default=None, description="Tokenizer path or id; defaults to the model's.")
    use_fast_tokenizer: bool = Field(default=True, description="Use the fast (Rust) tokenizer.")
    resume_from_checkpoint: bool | Literal["auto"] | str = Field(
        default=False,
        description="false (the Silogen engine's default): start from step 0; checkpoints already in "
        "training_args.output_dir are left in place, and the trainer saves beside them (same step: "
        "overwritten; save_total_limit rotation counts them). true: resume from the newest complete "
        "checkpoint, error if none; auto: resume if a complete checkpoint exists (the train job's "
        "default); a path: resume from that checkpoint. Complete: written by this engine (manifest) "
        "or by any transformers Trainer (trainer_state.json and weights). Checkpoints this engine did "
        "not write are never deleted.",
    )
    final_checkpoint_name: str = Field(
        default="checkpoint-final",
        description="Directory name of the final output under training_args.output_dir: the "
        "adapter for adapter runs (peft_conf), the model for full fine-tuning. The Silogen chart "
        "sets checkpoint-final-adapter for adapter runs.",
    )
    determinism: Literal["no", "half", "full"] = Field(
        default="no",
        description="no: fastest (the trainer still seeds its data order); half: every random "
        "generator seeded before the model loads (adapter init, data order); full: seeded + "
        "deterministic kernels (torch.use_deterministic_algorithms, cuDNN/cuBLAS settings) and "
        "TrainingArguments.full_determinism, so two runs give identical losses.",
    )
    preset: str = Field(
        default="auto",
        description="Model preset (finetune-engine presets) filling peft_conf.peft_kwargs."
        "target_modules and data_conf.chat_template_name when the config leaves them out. auto: "
        "match by Hub id or config.json model_type; a preset name: use it; none: no preset.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="With an adapter: also write the merged full model beside it, to "
        "final_checkpoint_name without its -adapter suffix (checkpoint-final-adapter -> "
        "checkpoint-final, where the Silogen chart's merge step writes it), else to "
        "<final_checkpoint_name>-merged. Off by default, as in the Silogen engine (merge later with "
        "merge_adapter BASE ADAPTER OUT); this project's operators ask for it.",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from finetune_engine.config.presets import BY_NAME

        if v not in ("auto", "none") and v not in BY_NAME:
            raise ValueError(f"unknown preset {v!r}; expected auto, none or one of {', '.join(BY_NAME)}")
        return v

    @field_validator("final_checkpoint_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_dir_name(v)


# ---------------------------------------------------------------------------------------------
# sft_args, tracking, overrides
# ---------------------------------------------------------------------------------------------


class SftArgs(_Strict):
    save_name_if_new_basemodel: str = Field(
        default="checkpoint-new-basemodel",
        description="When the chat template added tokens and an adapter trains, the base with the "
        "grown vocabulary is saved under training_args.output_dir with this name (the adapter "
        "needs it to load or merge).",
    )
    max_seq_length: int = Field(default=2048, gt=8, description="Longest training sequence.")
    length_handling: Literal["filter", "truncate"] = Field(
        default="filter",
        description="Longer examples are dropped (filter) or cut (truncate); counts are logged.",
    )
    train_on_completions_only: bool = Field(
        default=False,
        description="Loss only on assistant turns: each reply with the assistant start marker "
        "before it and its end marker (see train_assistant_start_marker).",
    )
    train_assistant_start_marker: bool = Field(
        default=True,
        description="With train_on_completions_only: the assistant start marker before each "
        "reply (<|im_start|>assistant\\n for chat-ml, [/INST] for mistral-with-system, the "
        "generation prompt for keep-original) carries labels too, as in the Silogen engine. "
        "false: only the reply and its end marker are trained.",
    )
    append_eos_token: bool = Field(
        default=True,
        description="End every rendered conversation with the tokenizer's EOS token, as the "
        "Silogen engine's training tokenizer does (not added twice when the text already ends "
        "with it). It is trained only in full-sequence training. false: the rendered text as is.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into one row of max_seq_length, isolated from each "
        "other (block-diagonal attention, reset positions), to avoid padding.",
    )

    @field_validator("save_name_if_new_basemodel")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_dir_name(v)


class SampleGenerations(_Strict):
    every_n_steps: int = Field(gt=0, description="Generate after every this many optimizer steps.")
    prompts: list[str] = Field(default_factory=list, description="Prompts, inline.")
    prompts_file: str | None = Field(
        default=None,
        description="More prompts: a .txt file (one prompt a line) or a .jsonl file (messages "
        "without the last assistant turn, or prompt/completion).",
    )
    max_new_tokens: int = Field(default=64, gt=0, description="Tokens generated per prompt.")
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy.")
    use_chat_template: bool | None = Field(
        default=None,
        description="Render prompts as a user turn with the chat template; default: yes, except "
        "for TEXT_FILES training, whose prompts are continued as plain text.",
    )

    @model_validator(mode="after")
    def _has_prompts(self) -> SampleGenerations:
        if not self.prompts and not self.prompts_file:
            raise ValueError("give prompts or prompts_file")
        return self


class Tracking(_Strict):
    mlflow_server_uri: str | None = Field(
        default=None, description="MLflow tracking URI (http(s)://, file://, sqlite://)."
    )
    experiment_name: str | None = Field(default=None, description="MLflow experiment name.")
    hf_mlflow_log_artifacts: bool = Field(
        default=False, description="Copy each saved checkpoint to MLflow artifacts."
    )
    run_name: str | None = Field(default=None, description="MLflow run name.")
    sample_generations: SampleGenerations | None = Field(
        default=None,
        description="Generate from fixed prompts during training and log the samples to "
        "output_dir/samples/step-N.yaml and, with MLflow, as text artifacts and a table.",
    )


class Overrides(_Strict):
    lr_multiplier: float = Field(default=1.0, gt=0, description="Multiplies learning_rate.")
    lr_batch_size_scaling: Literal["none", "sqrt", "linear"] = Field(
        default="none",
        description="Scale learning_rate by (total batch / reference_batch_size) (linear) or "
        "its square root (sqrt).",
    )
    reference_batch_size: int = Field(
        default=1, gt=0, description="The batch size learning_rate was chosen for."
    )


# ---------------------------------------------------------------------------------------------
# The whole experiment
# ---------------------------------------------------------------------------------------------


class ExperimentConfig(_Strict):
    method: Literal[METHODS] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="The training method; must equal the command's (`finetuning sft CONFIG` runs "
        "sft). Unset: the command's method is filled in.",
    )
    data_conf: DataConf = Field(description="Data: datasets, validation, chat template.")
    training_args: dict[str, Any] = Field(
        default_factory=dict,
        description="transformers TrainingArguments (sft) or TRL's DPOConfig, KTOConfig, "
        "ORPOConfig, CPOConfig (dpo, kto, orpo, cpo), passed through. output_dir defaults to "
        "$CHECKPOINTS_PATH, else ./checkpoints. With CUDA: torch_compile defaults to true (the "
        "engine compiles each decoder layer; false turns it off), batches are collated by 2 "
        "prefetching workers (dataloader_num_workers) and optim is adamw_torch_fused. "
        f"{', '.join(DERIVED_TRAINING_ARGS)} are derived from batchsize_conf and may not be set.",
    )
    batchsize_conf: BatchsizeConf = Field(description="Batch size targets.")
    peft_conf: PeftConf = Field(default_factory=lambda: NoPeft(peft_type="NO_PEFT"), description="Adapters.")
    quant_conf: QuantConf = Field(
        default_factory=lambda: NoQuantization(quantization_type="no-quantization"),
        description="Base model quantization.",
    )
    run_conf: RunConf = Field(description="Model, tokenizer, resume and output naming.")
    sft_args: SftArgs = Field(default_factory=SftArgs, description="SFT data handling.")
    tracking: Tracking = Field(default_factory=Tracking, description="MLflow tracking; null: none.")
    overrides: Overrides = Field(default_factory=Overrides, description="Learning-rate scaling.")

    @field_validator("method")
    @classmethod
    def _method_matches_command(cls, v: str | None, info: ValidationInfo) -> str | None:
        command = (info.context or {}).get("method")
        if v is not None and command is not None and v != command:
            raise ValueError(
                f"the config says method: {v} but the command runs {command}; run "
                f"`finetuning {v} CONFIG`, or set method: {command}"
            )
        return v

    @field_validator("tracking", mode="before")
    @classmethod
    def _null_tracking(cls, v: Any) -> Any:
        return {} if v is None else v  # tracking: null (the Silogen engine's default) means no tracking

    @field_validator("training_args", mode="before")
    @classmethod
    def _null_training_args(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("training_args")
    @classmethod
    def _check_training_args(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # The loader passes the method (sft, dpo, ...) as validation context; without it, keys of
        # any method pass here (a config already checked, re-validated after rewriting paths).
        method = (info.context or {}).get("method") or info.data.get("method")
        return check_training_args(v, method=method)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> ExperimentConfig:
        method = (info.context or {}).get("method") or self.method
        if isinstance(self.quant_conf, BitsAndBytesQuantization) and isinstance(self.peft_conf, NoPeft):
            raise ValueError(
                "quant_conf: a quantized base cannot be trained without an adapter; "
                "set peft_conf (e.g. peft_type: LORA) or quantization_type: no-quantization"
            )
        if self.batchsize_conf.max_per_device_train_batch_size == "auto" and method not in (None, "sft"):
            raise ValueError(
                f"batchsize_conf.max_per_device_train_batch_size: auto is supported by sft only, "
                f"not {method}; set a number"
            )
        td = self.data_conf.training_data
        if isinstance(td, TextFilesData):
            if method not in (None, "sft"):
                raise ValueError(f"data_conf.training_data: TEXT_FILES trains with sft, not {method}")
            if self.sft_args.train_on_completions_only:
                raise ValueError(
                    "sft_args.train_on_completions_only: plain text (TEXT_FILES) has no completions; "
                    "set it false"
                )
            if td.context_length is not None and td.context_length > self.sft_args.max_seq_length:
                raise ValueError(
                    f"data_conf.training_data.context_length {td.context_length} exceeds "
                    f"sft_args.max_seq_length {self.sft_args.max_seq_length}; raise max_seq_length "
                    "or leave context_length out"
                )
        else:
            for i, ds in enumerate(td.datasets):
                if ds.path.lower().endswith(".txt"):
                    raise ValueError(
                        f"data_conf.training_data.datasets[{i}] ({ds.path}) is a .txt file; plain "
                        "text trains with data_conf.training_data.type: TEXT_FILES"
                    )
        return self
