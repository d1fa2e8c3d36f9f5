"""``finetune-engine pull URI DIR``: download a complete prefix (e.g. a model for vLLM), optionally
waiting for its completion marker first. Used by init containers; no curl of binaries at start."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.storage import download_dir, is_complete

    parser = argparse.ArgumentParser(prog="finetune-engine pull", description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="s3://bucket/prefix, or oci://REGISTRY/REPO:TAG (an OCI artifact)")
    parser.add_argument("directory")
    parser.add_argument(
        "--wait-complete", action="store_true", help="Wait until the prefix's manifest exists."
    )
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds to wait for completion.")
    parser.add_argument("--poll", type=float, default=10)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.uri.startswith("oci://"):  # an artifact is complete once its tag exists (manifest last)
        from finetune_engine.storage.oci import pull as oci_pull

        oci_pull(args.uri, Path(args.directory))
        return 0
    deadline = time.monotonic() + args.timeout
    while not is_complete(args.uri):
        if not args.wait_complete or time.monotonic() > deadline:
            print(f"error: {args.uri} is not complete (no valid manifest)", file=sys.stderr)
            return 2
        log.info("waiting for %s to be complete", args.uri)
        time.sleep(args.poll)
    download_dir(args.uri, Path(args.directory))
    log.info("pulled %s into %s", args.uri, args.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
