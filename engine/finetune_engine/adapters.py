"""vLLM-ready adapters, as the Silogen engine's ``create_vllm_compatible_adapter`` makes them.

PEFT saves copies of base layers next to the LoRA matrices (e.g. ``embed_tokens.base_layer.weight``
when ``embed_tokens`` is a LoRA target); vLLM loads only LoRA tensors. The command removes every
tensor that is not a LoRA tensor (its name has no ``.lora_``: ``lora_A``/``lora_B`` and the
embedding LoRA ``lora_embedding_A``/``lora_embedding_B`` are kept), after moving the original file
aside as ``old_with_extra_layers_adapter_model.safetensors``. A second run finds that backup and
does nothing.

When the extra layers were trained (``modules_to_save``, new token embeddings, a grown vocabulary,
a full-parameter run) removing them would serve a different model: they are kept, with the log line
"Keeping non-LoRA layers, they are needed.", and the command exits 0 as the Silogen engine does.
With ``--training-config`` the decision also follows the training config, as the Silogen engine's;
without it the adapter's own files decide (``adapter_config.json``, ``finetune_meta.json`` and the
embedding shapes against the base model's vocabulary). Like the Silogen engine, the command needs only
``adapter_model.safetensors``: a directory without ``adapter_config.json`` carries no evidence of
trained layers besides the weights, so its non-LoRA tensors are removed.

When the directory carries this engine's completion manifest (``_finetune_manifest.json``) and was
complete before, the manifest is rewritten after the in-place rewrite, so the directory still
verifies as complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILE = "adapter_model.safetensors"
BACKUP_PREFIX = "old_with_extra_layers_"
KEEPING = "Keeping non-LoRA layers, they are needed."
# Modules vLLM applies LoRA to (linear projections, and the input embedding via lora_embedding_A/B).
VLLM_LORA_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
)


class AdapterError(ValueError):
    pass


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / ADAPTER_FILE))


def is_lora_key(key: str) -> bool:
    """A LoRA tensor: ``lora_A``/``lora_B`` of a linear layer, ``lora_embedding_A``/``_B`` of an
    embedding (the Silogen engine's rule: the name contains ``.lora_``)."""
    return ".lora_" in key


def _adapter_config(adapter_dir: Path, required: bool = True) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; ``{}`` when it is absent and not ``required``."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        if not required:
            return {}
        raise AdapterError(
            f"{adapter_dir}: no adapter_config.json; give the directory of a saved PEFT adapter"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: not readable JSON ({err}); restore it from the saved adapter") from None
    if not isinstance(cfg, dict):
        raise AdapterError(
            f"{path}: expected a JSON object, found {type(cfg).__name__}; restore it from the saved adapter"
        )
    return cfg


def _base_vocab_size(adapter_cfg: dict[str, Any]) -> int | None:
    base = adapter_cfg.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    cfg = json.loads((Path(base) / "config.json").read_text())
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(size) if size else None


def adapter_reasons(adapter_dir: Path, tensors: dict | None = None) -> list[str]:
    """Why the adapter's non-LoRA layers were trained, from its own files (empty: they were not).
    Without ``adapter_config.json`` only ``finetune_meta.json`` can tell (the Silogen engine reads
    no config at all)."""
    cfg = _adapter_config(adapter_dir, required=False)
    reasons = []
    if cfg.get("modules_to_save"):
        reasons.append(f"adapter_config.json trains modules_to_save {list(cfg['modules_to_save'])}")
    meta_path = adapter_dir / "finetune_meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("trained_embeddings"):
        reasons.append("finetune_meta.json: the run trained new token embeddings")
    vocab = _base_vocab_size(cfg)
    if vocab and tensors:
        for key, value in tensors.items():
            if not is_lora_key(key) and key.endswith(
                (
                    "embed_tokens.weight",
                    "embed_tokens.base_layer.weight",
                    "lm_head.weight",
                    "lm_head.base_layer.weight",
                )
            ):
                if value.ndim == 2 and value.shape[0] != vocab:
                    reasons.append(
                        f"{key} has {value.shape[0]} rows, the base vocabulary {vocab}: the vocabulary grew"
                    )
                    break
    return reasons


def _load_training_config(path: str | Path):
    """The training config, as SFT or DPO (whichever validates; its top-level ``method`` first)."""
    import yaml

    from finetune_engine.config.errors import ConfigError
    from finetune_engine.config.loader import parse_config
    from finetune_engine.config.yamlio import safe_load

    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise AdapterError(f"--training-config {path}: cannot read it: {err}") from None
    first = raw.get("method") if isinstance(raw, dict) and raw.get("method") in ("sft", "dpo") else "sft"
    errors = []
    for method in dict.fromkeys((first, "sft", "dpo")):  # the file is read and parsed once
        try:
            return parse_config(raw, source=str(path), method=method, text=text)
        except ConfigError as err:
            errors.append(err)
    raise AdapterError(f"--training-config: could not load it as an SFT or DPO config:\n{errors[0]}")


def config_reasons(training_config: str | Path) -> list[str]:
    """Why the training config says the non-LoRA layers are needed (the Silogen engine's rule:
    a full-parameter run, ``modules_to_save``, or a chat template whose tokens grow the vocabulary)."""
    from finetune_engine.config import schema

    cfg = _load_training_config(training_config)
    if isinstance(cfg.peft_conf, schema.NoPeft):
        return ["the training config has peft_conf.peft_type NO_PEFT (a full-parameter run)"]
    kwargs = getattr(cfg.peft_conf, "peft_kwargs", None) or {}
    if kwargs.get("modules_to_save"):
        return [
            f"the training config trains peft_conf.peft_kwargs.modules_to_save {kwargs['modules_to_save']}"
        ]
    if cfg.data_conf.chat_template_name == "keep-original":
        return []
    model = cfg.run_conf.model
    try:
        from transformers import AutoConfig

        from finetune_engine.modeling import load_tokenizer

        tok = load_tokenizer(cfg, model)
        if tok.added_tokens and AutoConfig.from_pretrained(model).vocab_size < len(tok.tokenizer):
            return [
                f"data_conf.chat_template_name {cfg.data_conf.chat_template_name} adds tokens "
                f"{tok.added_tokens}: the run grew the embeddings"
            ]
    except (OSError, ValueError) as err:
        log.warning(
            "could not check whether %s grows the vocabulary of %s (%s); deciding from the adapter's files",
            cfg.data_conf.chat_template_name,
            model,
            err,
        )
    return []


def create_vllm_compatible_adapter(
    adapter_dir: str | Path, training_config: str | Path | None = None
) -> dict[str, Any]:
    """Remove the non-LoRA tensors, keeping the original as ``old_with_extra_layers_*``; or keep
    them when they were trained. Returns what happened: ``action`` (removed, kept, already-done),
    ``dropped`` tensor names, ``kept`` (number of tensors in the adapter file), ``reasons``."""
    adapter_dir = Path(adapter_dir)
    model_path = adapter_dir / ADAPTER_FILE
    backup = adapter_dir / f"{BACKUP_PREFIX}{ADAPTER_FILE}"
    if not model_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_FILE}; give the directory of a saved PEFT adapter")
    reasons = config_reasons(training_config) if training_config else []
    tensors = _tensors(adapter_dir)
    reasons += adapter_reasons(adapter_dir, tensors)
    if reasons:
        log.info("%s (%s)", KEEPING, "; ".join(reasons))
        return {"action": "kept", "dropped": [], "kept": len(tensors), "reasons": reasons}
    if backup.exists():
        log.info("Model already has the extra layers removed (%s exists). Exiting.", backup.name)
        return {"action": "already-done", "dropped": [], "kept": len(tensors), "reasons": []}
    from safetensors.torch import save_file

    from finetune_engine.manifest import MANIFEST_NAME, read_manifest, verify_directory, write_manifest

    manifest = read_manifest(adapter_dir)
    was_complete = manifest is not None and verify_directory(adapter_dir)[0]
    if (adapter_dir / MANIFEST_NAME).exists() and not was_complete:
        log.warning(
            "%s: %s does not match the directory; it is left as it is (the directory stays incomplete)",
            adapter_dir,
            MANIFEST_NAME,
        )
    keep = {k: v for k, v in tensors.items() if is_lora_key(k)}
    dropped = sorted(set(tensors) - set(keep))
    log.info("Removing non-LoRA layers: %s", dropped)
    tmp = adapter_dir / f".{ADAPTER_FILE}.tmp"
    save_file(keep, str(tmp), metadata={"format": "pt"})  # complete before anything is moved
    os.replace(model_path, backup)
    os.replace(tmp, model_path)
    if was_complete:
        write_manifest(adapter_dir, extra=manifest.get("extra"))
    return {"action": "removed", "dropped": dropped, "kept": len(keep), "reasons": []}


def vllm_preflight(
    adapter_dir: str | Path,
    max_lora_rank: int | None = None,
    supported_modules: tuple[str, ...] = VLLM_LORA_MODULES,
) -> list[str]:
    """Problems vLLM would have with this adapter (empty list: it will load)."""
    adapter_dir = Path(adapter_dir)
    problems = []
    cfg = _adapter_config(adapter_dir, required=False)
    if not cfg:
        problems.append(
            "no adapter_config.json: vLLM needs it next to adapter_model.safetensors to load the "
            "adapter; copy it from the training run's adapter directory"
        )
    elif cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}: vLLM serves only LoRA adapters")
    rank = int(cfg.get("r", 0))
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(
            f"rank {rank} > --max-lora-rank {max_lora_rank}; raise it "
            f"to {next((r for r in VLLM_LORA_RANKS if r >= rank), rank)}"
        )
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"rank {rank} exceeds vLLM's largest max-lora-rank {VLLM_LORA_RANKS[-1]}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM; merge instead")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unsupported = sorted(
        t for t in targets if t.rsplit(".", 1)[-1] not in supported_modules and t != "all-linear"
    )
    if unsupported:
        problems.append(f"target modules {unsupported} may not be LoRA-capable in vLLM")
    extra = sorted(k for k in _tensors(adapter_dir) if not is_lora_key(k))
    if extra:
        problems.append(
            f"{len(extra)} non-LoRA tensors (e.g. {extra[0]}) that vLLM does not load; untrained copies "
            "of the base: run create_vllm_compatible_adapter; trained: serve the merged model (merge_adapter)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="create_vllm_compatible_adapter",
        description="Take in a HuggingFace adapter's binary folder path and remove the embeddings layer "
        "weights required for vLLM compatibility",
    )
    parser.add_argument(
        "model_path",
        help=(
            "Path to the model folder (e.g. path to the folder containing the adapter) to be made compatible"
        ),
    )
    parser.add_argument(
        "--training-config",
        default=None,
        help="Path to training config to check and determine whether the layers should be removed or not.",
    )
    parser.add_argument(
        "--max-lora-rank", type=int, default=None, help="Also check the rank against vLLM's --max-lora-rank."
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Exit 1 when the vLLM preflight finds a problem (default: warn only).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = create_vllm_compatible_adapter(args.model_path, args.training_config)
        problems = vllm_preflight(args.model_path, args.max_lora_rank)
    except AdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if out["action"] == "kept":
        print(f"{args.model_path}: {KEEPING} ({'; '.join(out['reasons'])})")
    elif out["action"] == "already-done":
        print(f"{args.model_path}: already done ({BACKUP_PREFIX}{ADAPTER_FILE} exists), nothing changed")
    else:
        print(
            f"{args.model_path}: {out['kept']} LoRA tensors kept, {len(out['dropped'])} removed; "
            f"the original is {BACKUP_PREFIX}{ADAPTER_FILE}"
        )
    return 1 if problems and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
