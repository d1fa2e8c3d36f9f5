"""``finetune-engine merge-job``: merge an adapter from the bucket into its base; upload the result
(manifest last). A complete output is not merged again."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def run_merge_job(
    base: str, adapter: str, output: str, workdir: Path, dtype: str = "auto", output_oci: str | None = None
) -> dict:
    from finetune_engine.merge import merge_adapter
    from finetune_engine.storage import download_dir, is_complete, join, upload_dir

    if output_oci:  # a malformed reference fails before any download
        from finetune_engine.storage.oci import parse_oci

        parse_oci(output_oci)
    if is_complete(output):
        log.info("%s is complete: already merged", output)
        result = {"status": "skipped", "merged_uri": output}
        if output_oci:
            download_dir(output, workdir / "merged")
            result.update(push_to_oci(workdir / "merged", output_oci))
        return result
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
    result = {"status": "merged", "merged_uri": output, "base": base, "adapter": adapter}
    if output_oci:  # after the bucket upload, by the same pod
        result.update(push_to_oci(out, output_oci))
    return result


def push_to_oci(directory: Path, reference: str) -> dict:
    """Push a finished output to a registry; the result keys a task's XCom carries."""
    from finetune_engine.storage.oci import push

    pushed = push(directory, reference)
    return {"oci_reference": pushed["reference"], "oci_digest": pushed["digest"]}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.jobs.common import finish

    parser = argparse.ArgumentParser(prog="finetune-engine merge-job", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="Base model: s3:// prefix or local directory.")
    parser.add_argument(
        "--adapter", required=True, help="Adapter prefix (s3://.../checkpoint-final-adapter)."
    )
    parser.add_argument("--output", required=True, help="Where the merged model goes (s3:// prefix).")
    parser.add_argument(
        "--output-oci", default=None, help="Also push the merged model to oci://REGISTRY/REPO:TAG."
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--workdir", default=os.environ.get("FINETUNE_WORKDIR", "workdir"))
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    return finish(
        lambda: run_merge_job(
            args.base, args.adapter, args.output, Path(args.workdir), args.dtype, args.output_oci
        ),
        args.result_file,
    )


if __name__ == "__main__":
    raise SystemExit(main())
