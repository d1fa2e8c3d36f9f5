"""Merge a PEFT adapter into its base model, safely.

A QLoRA adapter is merged into a base loaded unquantized (never into 4-bit weights). When the run
added tokens, the base is grown to the adapter's tokenizer before the adapter loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from finetune_engine.embeddings import fit_embeddings

log = logging.getLogger(__name__)
META_NAME = "finetune_meta.json"


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / META_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def merge_adapter(
    base: str,
    adapter: str,
    out: str | Path,
    tokenizer: str | None = None,
    device_map: str | dict | None = "cpu",
    dtype: str = "auto",
) -> Path:
    """Load ``base`` unquantized, apply ``adapter``, merge, save model + tokenizer to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grown = read_meta(adapter).get("grown_base")
    if grown and (Path(adapter).parent / grown / "config.json").exists():
        base = str(Path(adapter).parent / grown)  # the run added tokens: its grown-vocabulary base
        log.info("using the grown-vocabulary base %s", base)
    tok = AutoTokenizer.from_pretrained(tokenizer or adapter)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, device_map=device_map)
    if getattr(model, "hf_quantizer", None) is not None:
        # a base saved quantized (e.g. a bnb-4bit checkpoint): never merge into quantized weights
        qc = model.config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        log.info(
            "the base %s is saved quantized (%s): dequantizing it before the merge",
            base,
            getattr(method, "value", method),
        )
        model = dequantized(model)
    fitted = fit_embeddings(model, tok, mean_init=False)  # grow only: a padded base keeps its rows
    if fitted:
        log.info("%s to match the adapter's tokenizer", fitted)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    save_model(merged, tok, out)
    return Path(out)


def dequantized(model):
    """``model.dequantize()``, and forget the load-time conversion of the quantized checkpoint
    (transformers would try to reverse it on save, which bnb's deserializer cannot)."""
    model = model.dequantize()

    def reversible(conversion) -> bool:
        try:
            conversion.reverse_transform()
            return True
        except NotImplementedError:
            return False

    if getattr(model, "_weight_conversions", None):
        model._weight_conversions = [c for c in model._weight_conversions if reversible(c)]
    return model


def save_model(model, tokenizer, out: str | Path, end_marker: str | None = None) -> None:
    """Save weights (safetensors) and tokenizer; EOS ids for generation include the end marker."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = end_marker or tokenizer.eos_token
    marker_id = tokenizer.convert_tokens_to_ids(marker) if marker else None
    gen = getattr(model, "generation_config", None)
    if gen is not None and marker_id is not None:
        eos = gen.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if marker_id not in ids:
            ids.insert(0, marker_id)
        gen.eos_token_id = ids if len(ids) > 1 else ids[0]
        gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="merge_adapter",
        description="Merges adapters into a base model and saves the output as a single model",
    )
    parser.add_argument("basemodel", help="Name (e.g. HuggingFace Hub id) or Path of Base Model")
    parser.add_argument("peftmodel", help="Name or Path of Peft adapter")
    parser.add_argument("outpath", help="Where to save the merged model")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help=(
            "Name or Path to tokenizer to save with the model. If "
            "not specified, will use the adapter model tokenizer."
        ),
    )
    parser.add_argument(
        "--device_map",
        default="cpu",
        help="Device map for loading the model. Can be 'auto', 'cpu', 'cuda' or a JSON string.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device_map = json.loads(args.device_map) if args.device_map.startswith("{") else args.device_map
    try:
        out = merge_adapter(
            args.basemodel, args.peftmodel, args.outpath, tokenizer=args.tokenizer, device_map=device_map
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from finetune_engine.manifest import write_manifest

    write_manifest(out)
    print(f"merged model saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
