"""``finetune-engine quantize-job``: quantize a model from the bucket, upload the compressed-tensors
checkpoint (manifest last). A complete output is not quantized again."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def run_quantize_job(
    model: str,
    output: str,
    workdir: Path,
    scheme: str = "W8A8",
    calibration_data: str | None = None,
    samples: int = 128,
    iters: int | None = None,
    seqlen: int = 512,
) -> dict:
    from finetune_engine.jobs.common import local_name
    from finetune_engine.jobs.evaluate import _local_copy
    from finetune_engine.quantize import normalize_scheme, preflight, quantize
    from finetune_engine.storage import is_complete, upload_dir

    scheme = normalize_scheme(scheme)  # before any download
    if output.startswith("s3://") and is_complete(output):
        log.info("%s is complete: already quantized", output)
        return {"status": "skipped", "quantized_uri": output, "scheme": scheme}
    workdir.mkdir(parents=True, exist_ok=True)
    calibration = None
    if calibration_data:
        # its own name in the record: a sub-directory keeps it apart from the model's files
        name = local_name(calibration_data, "calibration").removeprefix("calibration-")
        (workdir / "calibration").mkdir(exist_ok=True)
        calibration = _local_copy(calibration_data, workdir / "calibration" / name, directory=False)
    local_model = _local_copy(model, workdir / "model", directory=True)
    out = workdir / "quantized"
    if out.exists() and output.startswith("s3://"):
        import shutil

        shutil.rmtree(out)  # this job's own leftover from an earlier try
    plan = preflight(local_model, out, scheme, calibration, samples, iters, seqlen)
    record = quantize(plan)
    if output.startswith("s3://"):
        upload_dir(out, output)
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, output)
    return {
        "status": "quantized",
        "quantized_uri": output,
        "model": model,
        "scheme": scheme,
        "calibration": record["calibration"],
        "size_bytes": record["size_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.jobs.common import finish
    from finetune_engine.quantize import DEFAULT_ITERS, DEFAULT_SAMPLES, DEFAULT_SEQLEN, SCHEMES

    parser = argparse.ArgumentParser(prog="finetune-engine quantize-job", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Model to quantize: s3:// prefix or local directory.")
    parser.add_argument("--output", required=True, help="Where the quantized model goes (s3:// prefix).")
    parser.add_argument("--scheme", default="W8A8", help=f"One of {', '.join(SCHEMES)}.")
    parser.add_argument("--calibration-data", default=None, help="JSONL examples (s3:// or local file).")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    parser.add_argument("--iters", type=int, default=None, help=f"AutoRound steps (default {DEFAULT_ITERS}).")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    parser.add_argument("--workdir", default=os.environ.get("FINETUNE_WORKDIR", "workdir"))
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    return finish(
        lambda: run_quantize_job(
            args.model,
            args.output,
            Path(args.workdir),
            args.scheme,
            args.calibration_data,
            args.samples,
            args.iters,
            args.seqlen,
        ),
        args.result_file,
    )


if __name__ == "__main__":
    raise SystemExit(main())
