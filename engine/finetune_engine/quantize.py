"""Post-training quantization into compressed-tensors checkpoints that vLLM loads.

    finetune-engine quantize MODEL_DIR OUT_DIR [--scheme W8A8|W4A16] [--calibration-data FILE --samples N]

Schemes (the compressed-tensors format of the vLLM project; vLLM's CPU and GPU builds load both):

* ``W8A8``: int8 weights (one scale per output channel) and int8 activations (dynamic, per token).
* ``W4A16``: int4 weights in groups of 128 (symmetric), 16-bit activations.

The weights are rounded by Intel's AutoRound (SignRound: the rounding and clipping of each block
are tuned on calibration text) and exported in llm-compressor's format. With a calibration file,
a fixed sample of its examples (seed 0) is rendered with the model's chat template; without one
the weights are rounded to nearest. The output records its scheme and calibration set (file name,
sample count, sha256 of the sample) in ``quantization_record.json`` and in its manifest, which is
written last: a cut-off run leaves no output, only a hidden staging directory.

Everything that can be checked without torch is checked before any weight loads (``preflight``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_NAME = "quantization_record.json"
SAMPLE_SEED = 0
DEFAULT_SAMPLES = 128
DEFAULT_ITERS = 200
DEFAULT_SEQLEN = 512
W4_GROUP = 128

# scheme -> (AutoRound preset, what it is)
SCHEMES: dict[str, tuple[str, str]] = {
    "W8A8": ("INT8_W8A8", "int8 weights per channel, int8 activations dynamic per token"),
    "W4A16": ("W4A16", f"int4 weights in groups of {W4_GROUP} (symmetric), 16-bit activations"),
}

# Dense decoder families that AutoRound quantizes block by block and vLLM serves from
# compressed-tensors. Others (mixture-of-experts, multimodal, encoder-decoder) are refused up front.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "granite",
    "olmo2",
)

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Calibration:
    """The calibration sample: which examples of which file, and their hash."""

    path: Path
    records: list[dict[str, Any]]
    lines: list[int]
    available: int

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for record in self.records:
            h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
            h.update(b"\n")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.path.name,
            "samples": len(self.records),
            "available": self.available,
            "seed": SAMPLE_SEED,
            "sha256": self.sha256,
        }


@dataclass
class Plan:
    model_dir: Path
    out_dir: Path
    scheme: str
    model_type: str
    calibration: Calibration | None
    iters: int
    seqlen: int
    notes: list[str] = field(default_factory=list)


def normalize_scheme(scheme: str) -> str:
    name = str(scheme).strip().upper()
    if name not in SCHEMES:
        raise ValueError(f"--scheme {scheme!r} is not supported; choose one of {', '.join(SCHEMES)}")
    return name


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model directory; give a saved Hugging Face model directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; {model_dir} is not a saved Hugging Face model")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    if not any(any(model_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise ValueError(f"{model_dir}: no weights (*.safetensors or pytorch_model*.bin) next to config.json")
    return config


def _check_model(model_dir: Path, scheme: str) -> str:
    config = _read_config(model_dir)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = str(config.get("model_type") or "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type {model_type!r} cannot be quantized here; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense decoder-only models)"
        )
    if config.get("quantization_config"):
        qc = config["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ValueError(
            f"{model_dir / 'config.json'}: the model is already quantized ({method}); quantize the "
            "unquantized (merged) model instead"
        )
    if scheme == "W4A16":
        for key in ("hidden_size", "intermediate_size"):
            size = text.get(key)
            if isinstance(size, int) and size % W4_GROUP:
                raise ValueError(
                    f"{model_dir / 'config.json'}: {key} {size} is not a multiple of the W4A16 group "
                    f"size {W4_GROUP}; use --scheme W8A8 for this model"
                )
    return model_type


def load_calibration(path: str | Path, samples: int) -> Calibration:
    """Validate ``path`` (every problem with file:line) and draw ``samples`` examples (seed 0)."""
    from finetune_engine.data.validate import DataValidationError, iter_records, validate_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calibration-data {path}: no such file")
    report = validate_file(path, allowed_kinds=("messages", "prompt_completion", "text"))
    if report.problems:
        raise DataValidationError(report.problems)
    rows = list(iter_records(path))
    if not rows:
        raise ValueError(f"--calibration-data {path}: no examples")
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(rows)), min(samples, len(rows))))
    if samples > len(rows):
        log.warning("%s has %d examples, fewer than --samples %d: using all", path, len(rows), samples)
    return Calibration(
        path=path,
        records=[rows[i][1] for i in chosen],
        lines=[rows[i][0] for i in chosen],
        available=len(rows),
    )


def preflight(
    model_dir: str | Path,
    out_dir: str | Path,
    scheme: str = "W8A8",
    calibration_data: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    iters: int | None = None,
    seqlen: int = DEFAULT_SEQLEN,
) -> Plan:
    """Every check that needs no torch: the model, the scheme, the output, the calibration file."""
    scheme = normalize_scheme(scheme)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be a positive integer, not {samples!r}")
    if iters is not None and (not isinstance(iters, int) or iters < 0):
        raise ValueError(f"--iters must be 0 (round to nearest) or a positive integer, not {iters!r}")
    if not isinstance(seqlen, int) or seqlen < 16:
        raise ValueError(f"--seqlen must be an integer >= 16, not {seqlen!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model_type = _check_model(model_dir, scheme)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"OUT_DIR {out_dir} is the model directory; give a new directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"OUT_DIR {out_dir} exists and is not empty; give a new directory")
    calibration = load_calibration(calibration_data, samples) if calibration_data else None
    if iters is None:
        iters = DEFAULT_ITERS if calibration else 0
    if iters and calibration is None:
        raise ValueError("--iters > 0 tunes the rounding on calibration text: give --calibration-data FILE")
    return Plan(model_dir, out_dir, scheme, model_type, calibration, iters, seqlen)


def _render(record: dict[str, Any], tokenizer) -> str:
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(record["messages"], tokenize=False)
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    if "text" in record:
        return str(record["text"])
    return f"{record.get('prompt', '')}{record.get('completion', '')}"


def calibration_texts(calibration: Calibration, tokenizer, seqlen: int) -> tuple[list[str], int]:
    """The rendered examples joined into chunks of at least ``seqlen`` tokens (AutoRound drops
    shorter samples), and the sequence length used: at most ``seqlen``, small enough for >= 4 chunks."""
    texts = [_render(r, tokenizer) for r in calibration.records]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    seqlen = max(8, min(seqlen, sum(lengths) // 4))
    chunks, current, size = [], [], 0
    for text, n in zip(texts, lengths, strict=True):
        current.append(text)
        size += n
        if size >= seqlen:
            chunks.append("".join(current))
            current, size = [], 0
    return chunks, seqlen


def _exported_dir(staging: Path) -> Path:
    """AutoRound saves into ``staging`` or one sub-directory of it, named after the model."""
    if (staging / "config.json").is_file():
        return staging
    found = [p.parent for p in staging.glob("*/config.json")]
    if len(found) != 1:
        raise RuntimeError(f"the quantizer left {len(found)} model directories under {staging}")
    return found[0]


def _dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def quantize(plan: Plan) -> dict[str, Any]:
    """Quantize ``plan.model_dir`` into ``plan.out_dir`` (staged, manifest last); the record."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.manifest import write_manifest

    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    model = AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype="auto")
    texts, seqlen = None, plan.seqlen
    if plan.calibration is not None:
        texts, seqlen = calibration_texts(plan.calibration, tokenizer, plan.seqlen)
    staging = plan.out_dir.parent / f".{plan.out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover of this very process id
    staging.mkdir(parents=True)
    try:
        kwargs: dict[str, Any] = {
            "scheme": SCHEMES[plan.scheme][0],
            "iters": plan.iters,
            "device_map": 0 if torch.cuda.is_available() else "cpu",
            "enable_torch_compile": False,
            "seed": SAMPLE_SEED,
        }
        if not texts:
            kwargs["disable_opt_rtn"] = True  # plain round to nearest: no data, never a Hub dataset
        else:
            kwargs.update(dataset=texts, nsamples=len(texts), seqlen=seqlen, batch_size=min(8, len(texts)))
        log.info(
            "quantizing %s to %s (%s, iters %d)",
            plan.model_dir,
            plan.scheme,
            SCHEMES[plan.scheme][1],
            plan.iters,
        )
        rounder = AutoRound(model, tokenizer, **kwargs)
        rounder.quantize_and_save(str(staging), format="llm_compressor")
        exported = _exported_dir(staging)
        record = {
            "scheme": plan.scheme,
            "description": SCHEMES[plan.scheme][1],
            "format": "compressed-tensors",
            "method": (
                f"AutoRound SignRound, {plan.iters} steps per block"
                if plan.iters
                else "AutoRound optimized round to nearest (calibrated)"
                if texts
                else "round to nearest"
            ),
            "iters": plan.iters,
            "seqlen": seqlen if texts else None,
            "base_model_type": plan.model_type,
            "calibration": plan.calibration.describe() if plan.calibration else None,
            "size_bytes": {"before": _dir_size(plan.model_dir), "after": _dir_size(exported)},
        }
        (exported / RECORD_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        write_manifest(exported, extra={"quantization": record})
        plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
        if plan.out_dir.exists():
            plan.out_dir.rmdir()  # empty (preflight): replaced by the finished output
        os.replace(exported, plan.out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    scheme: str = "W8A8",
    calibration_data: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    iters: int | None = None,
    seqlen: int = DEFAULT_SEQLEN,
) -> dict[str, Any]:
    return quantize(preflight(model_dir, out_dir, scheme, calibration_data, samples, iters, seqlen))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", default="W8A8", help=f"One of {', '.join(SCHEMES)} (default W8A8).")
    parser.add_argument(
        "--calibration-data",
        default=None,
        help="JSONL examples (e.g. the training data); a sample of them calibrates the rounding.",
    )
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="Calibration examples drawn (seed 0)."
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help=f"AutoRound tuning steps per block (default {DEFAULT_ITERS} with calibration data, else 0); "
        "0 rounds to nearest (scales searched on the calibration data when given).",
    )
    parser.add_argument(
        "--seqlen", type=int, default=DEFAULT_SEQLEN, help="Tokens per calibration sequence (at most)."
    )


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging

    parser = argparse.ArgumentParser(
        prog="finetune-engine quantize",
        description="Quantize a saved model into a compressed-tensors checkpoint (W8A8 or W4A16) for vLLM.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="A saved (merged) Hugging Face model.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="A new directory for the quantized model.")
    add_options(parser)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    plan = preflight(
        args.model_dir,
        args.out_dir,
        args.scheme,
        args.calibration_data,
        args.samples,
        args.iters,
        args.seqlen,
    )
    record = quantize(plan)
    size = record["size_bytes"]
    print(
        f"quantized model saved to {plan.out_dir} ({plan.scheme}, {size['before']} -> {size['after']} bytes)",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
