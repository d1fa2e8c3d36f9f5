"""``finetune-engine merge-job``: merge an adapter from the bucket into its base; upload the result
(manifest last). A complete output is not merged again."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def run_merge_job(base: str, adapter: str, output: str, workdir: Path, dtype: str = "auto") -> dict:
    from finetune_engine.merge import merge_adapter
    from finetune_engine.storage import download_dir, is_complete, join, upload_dir

    if is_complete(output):
        log.info("%s is complete: already merged", output)
        return {"status": "skipped", "merged_uri": output}
    local_adapter = workdir / "adapter"
    download_dir(adapter, local_adapter)
    from finetune_engine.merge import read_meta

    grown = read_meta(local_adapter).get("grown_base")
    parent = adapter.rstrip("/").rsplit("/", 1)[0]
    if grown and is_complete(join(parent, grown)):
        base = join(parent, grown)  # the run added tokens: merge into its grown-vocabulary base
    local_base = workdir / "base"
    if base.startswith("s3://"):
        download_dir(base, local_base)
    else:
        local_base = Path(base)
    out = workdir / "merged"
    merge_adapter(str(local_base), str(local_adapter), out, dtype=dtype)
    upload_dir(out, output)
    return {"status": "merged", "merged_uri": output, "base": base, "adapter": adapter}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.jobs.common import write_result

    parser = argparse.ArgumentParser(prog="finetune-engine merge-job", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="Base model: s3:// prefix or local directory.")
    parser.add_argument(
        "--adapter", required=True, help="Adapter prefix (s3://.../checkpoint-final-adapter)."
    )
    parser.add_argument("--output", required=True, help="Where the merged model goes (s3:// prefix).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--workdir", default=os.environ.get("FINETUNE_WORKDIR", "workdir"))
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        result = run_merge_job(args.base, args.adapter, args.output, Path(args.workdir), args.dtype)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_result(result, args.result_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
