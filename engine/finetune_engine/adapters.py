"""vLLM-ready adapters: strip what vLLM cannot load, when that is correct, and check before serving.

vLLM serves LoRA adapters whose tensors are only ``lora_A``/``lora_B`` of supported linear layers,
with a rank <= ``--max-lora-rank``. An adapter that trained embeddings or other modules fully
(``modules_to_save``, e.g. after adding chat tokens) is not a pure LoRA: dropping those tensors
would silently serve a different model, so it is refused — merge it instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILE = "adapter_model.safetensors"


class AdapterError(ValueError):
    pass


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / ADAPTER_FILE))


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or key.endswith((".lora_A.weight", ".lora_B.weight"))


def trained_extras(adapter_dir: Path, training_config: dict | None = None) -> list[str]:
    """What the run trained besides LoRA matrices (from the adapter config and metadata)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    extras = list(cfg.get("modules_to_save") or [])
    meta_path = adapter_dir / "finetune_meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("trained_embeddings"):
        extras += [m for m in ("embed_tokens", "lm_head") if m not in extras]
    if training_config and training_config.get("data_conf", {}).get("chat_template_name") not in (None, "keep-original"):
        # a named template may have added tokens; the metadata above tells for sure when present
        if not meta_path.exists():
            extras.append("possibly new token embeddings (chat_template_name adds tokens)")
    return extras


def create_vllm_compatible_adapter(adapter_dir: str | Path, training_config: str | Path | None = None) -> dict:
    """Keep only LoRA tensors in place; idempotent. Refuses when the run trained other modules."""
    adapter_dir = Path(adapter_dir)
    cfg_data = None
    if training_config:
        import yaml

        cfg_data = yaml.safe_load(Path(training_config).read_text())
    extras = trained_extras(adapter_dir, cfg_data)
    if extras:
        raise AdapterError(
            f"{adapter_dir}: the run trained {extras} fully besides LoRA; vLLM would serve the adapter without "
            "them, which is a different model. Merge it instead: merge_adapter BASE ADAPTER OUT (or serve "
            "checkpoint-final, already merged)"
        )
    from safetensors.torch import save_file

    tensors = _tensors(adapter_dir)
    keep = {k: v for k, v in tensors.items() if is_lora_key(k)}
    dropped = sorted(set(tensors) - set(keep))
    if dropped:
        save_file(keep, str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
        log.info("removed %d non-LoRA tensors: %s", len(dropped), dropped[:5])
    return {"kept": len(keep), "dropped": dropped}


def vllm_preflight(adapter_dir: str | Path, max_lora_rank: int | None = None,
                   supported_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                          "down_proj", "qkv_proj", "gate_up_proj")) -> list[str]:
    """Problems vLLM would have with this adapter (empty list: it will load)."""
    adapter_dir = Path(adapter_dir)
    problems = []
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}: vLLM serves only LoRA adapters")
    rank = int(cfg.get("r", 0))
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"rank {rank} > --max-lora-rank {max_lora_rank}; raise it to {next((r for r in VLLM_LORA_RANKS if r >= rank), rank)}")
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"rank {rank} exceeds vLLM's largest max-lora-rank {VLLM_LORA_RANKS[-1]}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM; merge instead")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unsupported = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in supported_modules and t != "all-linear")
    if unsupported:
        problems.append(f"target modules {unsupported} may not be LoRA-capable in vLLM")
    extra = sorted(k for k in _tensors(adapter_dir) if not is_lora_key(k))
    if extra:
        problems.append(f"{len(extra)} non-LoRA tensors (e.g. {extra[0]}); run create_vllm_compatible_adapter or merge")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="create_vllm_compatible_adapter",
        description="Take in a HuggingFace adapter's binary folder path and remove the embeddings layer weights "
        "required for vLLM compatibility",
    )
    parser.add_argument("model_path", help="Path to the model folder (e.g. path to the folder containing the adapter) to be made compatible")
    parser.add_argument("--training-config", default=None, help="Path to training config to check and determine whether the layers should be removed or not.")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="Also check the rank against vLLM's --max-lora-rank.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = create_vllm_compatible_adapter(args.model_path, args.training_config)
        problems = vllm_preflight(args.model_path, args.max_lora_rank)
    except AdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"{args.model_path}: {out['kept']} LoRA tensors kept, {len(out['dropped'])} removed")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
