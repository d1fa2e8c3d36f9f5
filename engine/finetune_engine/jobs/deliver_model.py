"""``finetune-engine deliver-model``: put a model into the bucket (from the Hub, a directory or
another bucket prefix), verified, with a completion manifest uploaded last.

Idempotent: a complete copy from the same source and revision is not uploaded again unless
``--overwrite``. Only safetensors weights are taken unless ``--allow-pickle``.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from finetune_engine.manifest import MANIFEST_NAME, write_manifest

log = logging.getLogger(__name__)
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


class DeliveryError(ValueError):
    pass


def default_destination(bucket: str, source: str, revision: str | None) -> str:
    name = source.rstrip("/").split("/")[-2:]  # org/name of a Hub id, or the last two path parts
    suffix = f"@{revision}" if revision and revision != "main" else ""
    return f"s3://{bucket}/models/{'/'.join(name)}{suffix}"


def _materialize(
    src: Path, dst: Path, allow_pickle: bool, allow: list[str] | None = None, exclude: list[str] | None = None
) -> None:
    """Copy ``src`` into ``dst`` resolving the hub cache's symlinks (hard links when possible),
    keeping only files that match ``allow`` (if given) and none of ``exclude``. A symlink may point
    only inside ``src`` (or, for a hub cache snapshot ``.../snapshots/<commit>``, into that repo's
    cache: its ``blobs/``); one pointing anywhere else is refused before anything is copied."""
    root = src.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # the hub cache: snapshots/<commit>/x -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            real = path.resolve()
            if not any(real == base or base in real.parents for base in allowed):
                raise DeliveryError(
                    f"{path} is a symlink to {real}, outside the source directory {src}; "
                    "copy the file into the directory instead"
                )
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel.parts[0] in (".cache", ".git") or rel.name == MANIFEST_NAME:
            continue
        posix = rel.as_posix()
        if allow and not any(fnmatch.fnmatch(posix, p) for p in allow):
            continue
        if any(fnmatch.fnmatch(posix, p) for p in (exclude or [])):
            continue
        if not allow_pickle and any(fnmatch.fnmatch(rel.name, p) for p in PICKLE_PATTERNS):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    names = [p.name for p in directory.rglob("*") if p.is_file()]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        hint = (
            " (pickle weights were skipped; pass --allow-pickle if you trust the source)"
            if not allow_pickle
            else ""
        )
        raise DeliveryError(f"no model weights found in the delivered files{hint}")


def fetch_from_hub(
    repo_id: str, revision: str | None, allow: list[str] | None, exclude: list[str] | None, allow_pickle: bool
) -> tuple[Path, str]:
    """snapshot_download into the hub cache (HF_HOME / HF_HUB_CACHE); returns (snapshot dir, commit)."""
    from huggingface_hub import snapshot_download

    ignore = list(exclude or [])
    if not allow_pickle:
        ignore += PICKLE_PATTERNS
    path = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=allow or None,
        ignore_patterns=ignore or None,
        token=os.environ.get("HF_TOKEN") or None,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not at import
    )
    return Path(path), Path(path).name


def _same_copy(remote: dict, local: dict) -> bool:
    """Whether a bucket manifest describes the same delivery: source, revision, commit and files."""

    def files(m: dict) -> list[tuple]:
        return sorted((f.get("path"), f.get("size"), f.get("sha256")) for f in m.get("files") or [])

    return remote.get("extra") == local.get("extra") and files(remote) == files(local)


def deliver_model(
    source: str,
    destination: str,
    revision: str | None = None,
    allow: list[str] | None = None,
    exclude: list[str] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    workdir: Path | None = None,
) -> dict:
    from finetune_engine.storage import delete_prefix, download_dir, is_complete, read_manifest, upload_dir

    origin = {"source": source, "revision": revision or "main"}
    if is_complete(destination) and not overwrite:
        extra = (read_manifest(destination) or {}).get("extra") or {}
        if extra.get("source") == source and extra.get("revision") == origin["revision"]:
            log.info(
                "%s already holds a complete copy of %s@%s; nothing to do",
                destination,
                source,
                origin["revision"],
            )
            return {"status": "skipped", "destination": destination, **extra}
        raise DeliveryError(
            f"{destination} already holds a complete model from "
            f"{extra.get('source')}@{extra.get('revision')}; pass "
            "--overwrite to replace it or choose another destination"
        )
    with tempfile.TemporaryDirectory(dir=workdir, prefix="deliver-") as tmp:
        tmp_path = Path(tmp)
        staged = tmp_path / "staged"
        staged.mkdir()
        if source.startswith("s3://"):
            download_dir(source, tmp_path / "from-bucket")
            _materialize(tmp_path / "from-bucket", staged, allow_pickle, allow, exclude)
        elif source.startswith("oci://"):
            from finetune_engine.storage.oci import pull as oci_pull

            origin["digest"] = oci_pull(source, tmp_path / "from-registry")["digest"]
            _materialize(tmp_path / "from-registry", staged, allow_pickle, allow, exclude)
        elif Path(source).is_dir():
            _materialize(Path(source), staged, allow_pickle, allow, exclude)
        elif "://" in source or source.startswith(("/", ".")):
            raise DeliveryError(
                f"source {source!r}: not a directory, an s3:// prefix, an oci:// artifact or a Hub repo id "
                "(org/name)"
            )
        else:
            snapshot, commit = fetch_from_hub(source, revision, allow, exclude, allow_pickle)
            origin["commit"] = commit
            _materialize(snapshot, staged, allow_pickle, allow, exclude)
        _check_weights(staged, allow_pickle)
        manifest = write_manifest(staged, extra=origin)
        if overwrite and is_complete(destination):
            remote = read_manifest(destination) or {}
            if _same_copy(remote, manifest):
                log.info(
                    "%s already holds this copy of %s (same files, revision and commit)", destination, source
                )
                return {"status": "skipped", "destination": destination, **origin}
            delete_prefix(destination)
        upload_dir(staged, destination)
    log.info("delivered %s to %s", source, destination)
    return {"status": "delivered", "destination": destination, **origin}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.jobs.common import finish

    parser = argparse.ArgumentParser(
        prog="finetune-engine deliver-model", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "source",
        help="Hub repo id (org/name), a local directory, s3://bucket/prefix or oci://REGISTRY/REPO:TAG",
    )
    parser.add_argument(
        "destination",
        nargs="?",
        default=None,
        help="s3://bucket/models/org/name (default: models/<org>/<name>[@rev] in $FINETUNE_BUCKET)",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default main).")
    parser.add_argument(
        "--allow-pattern", action="append", default=[], help="Only files matching (repeatable)."
    )
    parser.add_argument(
        "--exclude-pattern", action="append", default=[], help="Skip files matching, e.g. 'original/*'."
    )
    parser.add_argument("--allow-pickle", action="store_true", help="Also take pickle (.bin/.pt) weights.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing complete copy.")
    parser.add_argument("--result-file", default=None)
    parser.add_argument("--logging-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.logging_level)
    destination = args.destination
    if destination is None:
        bucket = os.environ.get("FINETUNE_BUCKET")
        if not bucket:
            print("error: give a destination or set FINETUNE_BUCKET", file=sys.stderr)
            return 2
        destination = default_destination(bucket, args.source, args.revision)
    return finish(
        lambda: deliver_model(
            args.source,
            destination,
            args.revision,
            args.allow_pattern,
            args.exclude_pattern,
            args.allow_pickle,
            args.overwrite,
        ),
        args.result_file,
    )


if __name__ == "__main__":
    raise SystemExit(main())
