"""``finetune-engine eval-job``: score one or more models on the same held-out JSONL data.

Each model is a complete bucket prefix (or a local directory) saved by the engine, so its
tokenizer carries the chat template it was trained with. The loss is the token-weighted mean
cross-entropy over assistant tokens (the completion-only mask of SFT, end marker included), so a
champion and a challenger are compared on exactly the same tokens of their own templates. The data
is validated before any model loads; a model prefix without its completion marker is refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _local_copy(uri: str, target: Path, *, directory: bool) -> Path:
    from finetune_engine.storage import download_dir, download_file, is_complete

    if not uri.startswith("s3://"):
        path = Path(uri)
        if not path.exists():
            raise ValueError(f"{uri}: no such {'directory' if directory else 'file'}")
        return path
    if directory:
        if not is_complete(uri):
            raise ValueError(
                f"{uri} is not a complete model prefix (no valid manifest); was it trained to the end?"
            )
        download_dir(uri, target)
    elif not target.exists():
        download_file(uri, target)
    return target


def score_model(
    model_dir: Path, records: list[dict[str, Any]], max_seq_length: int, batch_size: int
) -> dict[str, Any]:
    """Token-weighted assistant-token loss of a saved model on records (messages or prompt/completion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.data.collate import PaddingCollator
    from finetune_engine.data.tokenize import EncodeSettings, encode_batch

    if (Path(model_dir) / "adapter_config.json").exists() and not (Path(model_dir) / "config.json").exists():
        raise ValueError(
            f"{model_dir}: a PEFT adapter, not a model; eval-job scores full models: merge it first "
            "(finetune-engine merge-job, MergeAdapterOperator, or run_conf.merge_adapter: true)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{model_dir}: the tokenizer has no chat template; evaluate a model saved by the engine"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()
    # the saved tokenizer is set up for inference: its EOS is the template's assistant end marker
    encoded = encode_batch(
        records,
        tokenizer,
        EncodeSettings(
            max_seq_length=max_seq_length,
            length_handling="truncate",
            completions_only=True,
            end_marker=tokenizer.eos_token,
        ),
    )
    items = [e for e in encoded if isinstance(e, dict)]
    dropped = len(encoded) - len(items)
    if not items:
        raise ValueError("no held-out example has assistant tokens to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PaddingCollator(pad_token_id=pad)
    total_loss, total_tokens = 0.0, 0
    t0 = time.monotonic()
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = collate(
                [
                    {"input_ids": i["input_ids"], "labels": i["labels"]}
                    for i in items[start : start + batch_size]
                ]
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_loss += float(loss)
            total_tokens += int((labels != -100).sum())
    mean = total_loss / total_tokens
    return {
        "eval_loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "tokens": total_tokens,
        "examples": len(items),
        "dropped": dropped,
        "seconds": round(time.monotonic() - t0, 3),
    }


def run_eval_job(
    models: list[str], data: list[str], workdir: Path, max_seq_length: int = 1024, batch_size: int = 8
) -> dict[str, Any]:
    from finetune_engine.data.validate import iter_records, validate_files
    from finetune_engine.jobs.common import local_name

    workdir.mkdir(parents=True, exist_ok=True)
    files = [
        _local_copy(uri, workdir / "data" / local_name(uri, str(i)), directory=False)
        for i, uri in enumerate(data)
    ]
    validate_files(files, method="sft")  # raises DataValidationError naming file:line
    records = [record for path in files for _, record in iter_records(path)]
    records = [r for r in records if "messages" in r or ("prompt" in r and "completion" in r)]
    if not records:
        raise ValueError(f"{', '.join(data)}: no chat or prompt/completion examples to evaluate on")
    scores = []
    for i, uri in enumerate(models):
        local = _local_copy(uri, workdir / f"model-{i}", directory=True)
        score = score_model(local, records, max_seq_length, batch_size)
        log.info(
            "%s: eval loss %.4f over %d assistant tokens of %d examples",
            uri,
            score["eval_loss"],
            score["tokens"],
            score["examples"],
        )
        scores.append({"model_uri": uri, **score})
    best = min(scores, key=lambda s: s["eval_loss"])
    return {"status": "evaluated", "data": list(data), "models": scores, "best_model_uri": best["model_uri"]}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.data.validate import DataValidationError
    from finetune_engine.jobs.common import write_result
    from finetune_engine.storage import StorageError
    from finetune_engine.storage.s3 import TransientStorageError

    parser = argparse.ArgumentParser(prog="finetune-engine eval-job", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        dest="models",
        help="Model to score: s3:// prefix (complete) or local directory. Repeatable.",
    )
    parser.add_argument(
        "--data", action="append", required=True, help="Held-out JSONL: s3:// URI or file. Repeatable."
    )
    parser.add_argument("--max-seq-length", type=int, default=1024, help="Longer examples are truncated.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=os.environ.get("FINETUNE_WORKDIR", "workdir"))
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        result = run_eval_job(
            args.models, args.data, Path(args.workdir), args.max_seq_length, args.batch_size
        )
    except TransientStorageError as err:
        # the bucket was unreachable or failing after the retries: not the input's fault, so not
        # exit 2 (an input error is not retried); the task's next try scores again
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, DataValidationError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_result(result, args.result_file)
    for s in result["models"]:
        print(f"{s['model_uri']}: eval_loss={s['eval_loss']:.4f} tokens={s['tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
